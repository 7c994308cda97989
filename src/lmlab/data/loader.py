"""Batches of token windows from prepared shards (memory-mapped, never loaded whole).

Sampling is stateless: the batch of training step ``s`` is drawn from a generator seeded with
``(seed, s, rank)``. The data position of a run is therefore just its step number, and a resumed
run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmlab.data.prepare import load_meta
from lmlab.errors import DataError

_EVAL_STREAM = 2**31 - 1  # seed component that separates evaluation batches from training batches


class TokenShards:
    """The token shards of one split of a prepared data folder, as memory maps."""

    def __init__(self, data_dir: str | Path, split: str):
        data_dir = Path(data_dir)
        meta = load_meta(data_dir)
        if split not in meta["splits"]:
            raise DataError(f"{data_dir}: no split {split!r} (has {', '.join(meta['splits'])})")
        info = meta["splits"][split]
        self.split, self.meta, self.data_dir = split, meta, data_dir
        self.shards = [_open_shard(data_dir / name, np.dtype(meta["dtype"])) for name in info["shards"]]
        self.tokens = sum(len(s) for s in self.shards)
        if "tokens" in info and info["tokens"] != self.tokens:
            raise DataError(f"{data_dir}: the {split} shards hold {self.tokens:,} tokens, meta.json says "
                            f"{info['tokens']:,}: a shard was cut short or replaced; prepare the data again")
        self.bytes = info.get("bytes")
        self.vocab_size = meta.get("vocab_size")

    def _checked(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` read from the shards, refused if one lies outside the vocabulary they were written with
        (a damaged shard, or one of another tokenizer's, would index past the embedding)."""
        if self.vocab_size is not None and ids.size and int(ids.max()) >= self.vocab_size:
            raise DataError(f"{self.data_dir}: the {self.split} shards hold token id {int(ids.max())}, outside "
                            f"the vocabulary of {self.vocab_size} they were prepared with; prepare the data again")
        return ids

    def check_context(self, block_size: int) -> None:
        """Fail early, with the numbers, if no shard holds a window of block_size + 1 tokens."""
        longest = max((len(s) for s in self.shards), default=0)
        if longest < block_size + 1:
            raise DataError(
                f"the {self.split} split has {longest} tokens in its longest shard, fewer than the context "
                f"length + 1 = {block_size + 1}; use more text or a smaller model.block_size")

    def sample(self, batch_size: int, block_size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs x (B, T) and next-token targets y (B, T), as int64 tensors."""
        room = np.array([max(len(s) - block_size, 0) for s in self.shards], dtype=np.float64)
        shard_ids = rng.choice(len(self.shards), size=batch_size, p=room / room.sum())
        rows = []
        for sid in shard_ids:
            start = int(rng.integers(0, room[sid]))
            rows.append(np.asarray(self.shards[sid][start:start + block_size + 1], dtype=np.int64))
        window = torch.from_numpy(self._checked(np.stack(rows)))  # (B, T + 1)
        return window[:, :-1], window[:, 1:]


    def read(self, start: int, end: int) -> np.ndarray:
        """Tokens start..end-1 of the split, the shards read as one stream."""
        pieces, offset = [], 0
        for shard in self.shards:
            lo, hi = max(start - offset, 0), min(end - offset, len(shard))
            if lo < hi:
                pieces.append(np.asarray(shard[lo:hi], dtype=np.int64))
            offset += len(shard)
        return self._checked(np.concatenate(pieces)) if pieces else np.zeros(0, dtype=np.int64)


def _open_shard(path: Path, dtype: np.dtype) -> np.memmap:
    """A shard as a memory map of tokens, refused with a one-line error if it is missing or not a whole
    number of tokens long."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read the shard ({e.strerror or type(e).__name__}); prepare the data again")
    if size % dtype.itemsize:
        raise DataError(f"{path}: {size:,} bytes is not a whole number of {dtype.name} tokens: the shard is "
                        f"damaged; prepare the data again")
    if size == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")


def sequential_batch(shards: TokenShards, batch_size: int, block_size: int,
                     step: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The batch of step ``step`` when reading the split in order (for models that carry a state).

    The stream is cut into ``batch_size`` contiguous rows; step s reads window s (mod the windows per
    epoch) of every row, so row b of consecutive batches continues the same text. Returns x, y (B, T)
    and whether this window starts an epoch (where a carried state must be reset).
    """
    row_len = shards.tokens // batch_size
    windows = (row_len - 1) // block_size
    if windows < 1:
        raise DataError(f"the {shards.split} split has {shards.tokens} tokens: too few for {batch_size} rows of "
                        f"{block_size + 1} tokens; lower train.batch_size or model.block_size")
    w = step % windows
    rows = [shards.read(b * row_len + w * block_size, b * row_len + (w + 1) * block_size + 1) for b in range(batch_size)]
    window = torch.from_numpy(np.stack(rows))  # (B, T + 1)
    return window[:, :-1], window[:, 1:], w == 0


def train_batch(shards: TokenShards, batch_size: int, block_size: int, seed: int, step: int,
                micro: int = 0, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of training step ``step`` (micro-batch ``micro`` of gradient accumulation)."""
    rng = np.random.default_rng([seed, step, micro, rank])
    return shards.sample(batch_size, block_size, rng)


def eval_batches(shards: TokenShards, batch_size: int, block_size: int, seed: int, count: int):
    """The same ``count`` evaluation batches every time, so val losses compare across steps."""
    rng = np.random.default_rng([seed, _EVAL_STREAM])
    for _ in range(count):
        yield shards.sample(batch_size, block_size, rng)

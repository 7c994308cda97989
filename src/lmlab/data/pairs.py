"""Parallel text (translation, summarization): aligned pairs -> a prepared pairs folder -> padded batches.

What ``lmlab data prepare --pairs`` reads, for train and for each of --val and --test:

    SOURCE TARGET   two aligned text files, one example per line (.gz too); their line counts must agree
    TABLE           one .tsv/.csv with a header, or .jsonl (.gz too); source_field / target_field pick the
                    two columns (CSV fields may be quoted and span lines, as SAMSum's dialogues do)

Texts are NFC-normalised and stripped of surrounding whitespace; a pair with an empty side is skipped
(counted in meta.json, logged). A prepared pairs folder holds

    tokenizer.json                 one tokenizer for both sides (by default trained on both sides of train)
    meta.json                      format lmlab-pairs: pairs, tokens and longest example per split and side
    {split}_{side}.bin             the token ids of every example, back to back (uint16, or uint32)
    {split}_{side}_offsets.bin     int64, pairs + 1 of them: example i is tokens[off[i]:off[i + 1]]
    {split}.jsonl                  val and test: the texts as read, {"source", "target"}, to score
                                   generated text against untokenized references

for split in train, val, test (with test inputs) and side in source, target. Without val inputs, a
pair goes to val when sha256(source), read as a number in [0, 1), is below val_fraction: deterministic,
and pairs with the same source never straddle the split.

Batches (``pair_batch`` for training, ``eval_pair_batches`` for evaluation) are padded on the right:
src (B, S), src_mask (B, S), tgt_in (B, T) = [eot] + target, targets (B, T) = target + [eot] with -100
on padding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from array import array
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from lmlab.data.labeled import TABLE_SUFFIXES, iter_rows, pad_rows, sequential_batches, table_suffix
from lmlab.data.prepare import _unit_interval, read_meta_json, token_dtype
from lmlab.data.sources import iter_lines
from lmlab.data.tokenizer import Tokenizer, noted_after_first, train_tokenizer
from lmlab.errors import DataError
from lmlab.runs import atomic_dir, check_output

log = logging.getLogger(__name__)

FORMAT, VERSION = "lmlab-pairs", 1
SIDES = ("source", "target")
IGNORE = -100  # target id the loss skips (padding)
BATCH_PAIRS = 4096  # pairs encoded at once


# ---------------------------------------------------------------------------- reading pairs


def iter_pairs(paths: list[str], source_field: str = "source", target_field: str = "target",
               counts: dict | None = None, warn: bool = True) -> Iterator[tuple[str, str]]:
    """(source, target) texts of one input: two aligned line files, or one TSV/CSV/JSONL table.

    Texts are NFC-normalised (as read) and stripped; pairs with an empty side are skipped, counted in
    ``counts["skipped"]`` and (``warn``) logged. Misaligned files are a DataError naming both line counts.
    """
    check_pair_input(paths)
    counts = counts if counts is not None else {}
    counts.setdefault("skipped", 0)
    paths = [str(p) for p in paths]
    pairs = _line_pairs(*paths) if len(paths) == 2 else _table_pairs(paths[0], source_field, target_field)
    skipped = 0
    for source, target in pairs:
        source, target = clean_text(source), clean_text(target)
        if source and target:
            yield source, target
        else:
            skipped += 1
    counts["skipped"] += skipped
    if skipped and warn:
        log.warning(f"{' + '.join(paths)}: skipped {skipped} pairs with an empty source or target")


def clean_text(text: str) -> str:
    """A text as the data path stores it: NFC-normalised, surrounding whitespace stripped (what generation
    does to a source too, so that the model reads it as it read its training sources)."""
    return unicodedata.normalize("NFC", text).strip()


def check_pair_input(paths: list[str], what: str = "input") -> None:
    """Refuse, before any work, an input that is neither one table nor two aligned text files."""
    paths = [str(p) for p in paths or []]
    tables = [p for p in paths if table_suffix(p) in TABLE_SUFFIXES]
    if len(paths) == 1 and not tables:
        raise DataError(f"{paths[0]}: pairs given as one {what} come as a table (.tsv, .csv or .jsonl, optionally "
                        f".gz); aligned text files come as two: SOURCE TARGET")
    if len(paths) == 2 and tables:
        raise DataError(f"{tables[0]}: pairs given as two {what}s are SOURCE TARGET text files with one example per "
                        f"line; a table comes alone")
    if len(paths) not in (1, 2):
        raise DataError(f"pairs come as one table or two aligned files (SOURCE TARGET), got {len(paths)} {what}s: "
                        f"{' '.join(paths)}")
    for p in paths:
        if not Path(p).is_file():
            raise DataError(f"{p}: no such file")


def _line_pairs(source: str, target: str) -> Iterator[tuple[str, str]]:
    """Line i of source with line i of target; a DataError naming both counts if one file is longer."""
    src, tgt = iter_lines(source), iter_lines(target)
    n = 0
    for s, t in zip_longest(src, tgt):
        if s is None or t is None:
            n_src = n + (s is not None) + sum(1 for _ in src)
            n_tgt = n + (t is not None) + sum(1 for _ in tgt)
            raise DataError(f"{source} has {n_src:,} lines but {target} has {n_tgt:,}: the files are not aligned "
                            f"(one example per line on both sides)")
        n += 1
        yield s, t


def _table_pairs(path: str, source_field: str, target_field: str) -> Iterator[tuple[str, str]]:
    """The two fields of every record of a TSV/CSV/JSONL table (missing cells read as empty)."""
    for line, row in iter_rows(path):
        texts = []
        for field, flag in ((source_field, "--source-field"), (target_field, "--target-field")):
            if field not in row:
                raise DataError(f"{path}:{line}: no field {field!r} (fields: {', '.join(map(str, row))}); "
                                f"choose one with {flag}")
            value = row[field]
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}:{line}: field {field!r} is {type(value).__name__}, not a string")
            texts.append(unicodedata.normalize("NFC", value or ""))
        yield texts[0], texts[1]


def pairs_tokenizer(inputs: list[str], tokenizer: str | os.PathLike | None, kind: str = "bpe",
                    source_field: str = "source", target_field: str = "target", vocab_size: int | None = None,
                    min_freq: int = 1, max_bytes: int | None = None) -> Tokenizer:
    """The tokenizer saved at ``tokenizer``, or (None) one joint tokenizer of ``kind`` trained on both
    sides of the train pairs (at most ``max_bytes`` of text): one vocabulary, so that a model may tie its
    encoder and decoder embeddings and copy names from source to target."""
    if tokenizer is not None:
        return Tokenizer.load(tokenizer)
    def texts() -> Iterable[str]:
        seen = 0
        for source, target in iter_pairs(inputs, source_field, target_field, warn=False):  # writing them warns
            yield source
            yield target
            seen += len(source.encode("utf-8")) + len(target.encode("utf-8"))
            if max_bytes is not None and seen >= max_bytes:
                return

    note = f"training a {kind} tokenizer on both sides of the train pairs (pass --tokenizer to reuse one)"
    return train_tokenizer(kind, noted_after_first(texts(), note), vocab_size, min_freq=min_freq)


# ---------------------------------------------------------------------------- writing a pairs folder


def prepare_pairs(inputs: list[str], tokenizer: Tokenizer, out_dir: str | os.PathLike,
                  val_inputs: list[str] | None = None, test_inputs: list[str] | None = None,
                  source_field: str = "source", target_field: str = "target", val_fraction: float = 0.1,
                  force: bool = False) -> dict:
    """Tokenize aligned pairs into a prepared pairs folder ``out_dir``; return its meta.json dict.

    ``inputs``, ``val_inputs`` and ``test_inputs`` are each one table or two aligned files (see the
    module docstring). Without ``val_inputs``, val takes a hash split of ``inputs`` (``val_fraction``).
    ``out_dir`` is checked like every output (runs.check_output) and appears whole or not at all.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    sources = {"train": inputs, "val": val_inputs, "test": test_inputs}
    out = check_output(out_dir, "data", [p for paths in sources.values() for p in paths or []], force)
    for name, paths in sources.items():
        if paths is not None:
            check_pair_input(paths, "input" if name == "train" else f"--{name} input")
    dtype = token_dtype(tokenizer.vocab_size)
    fields = (source_field, target_field)
    with atomic_dir(out) as tmp:
        writers = {name: _SplitWriter(tmp, name, dtype, keep_texts=name != "train")
                   for name, paths in sources.items() if paths is not None or name == "val"}
        skipped = {}
        if val_inputs is None:
            def choose(source: str) -> _SplitWriter:
                digest = hashlib.sha256(source.encode("utf-8")).digest()
                return writers["val"] if _unit_interval(digest) < val_fraction else writers["train"]
            skipped["train"] = _write_pairs(inputs, fields, tokenizer, choose)
        for name in ("train", "val", "test") if val_inputs is not None else ("test",):
            if sources[name] is not None:
                skipped[name] = _write_pairs(sources[name], fields, tokenizer, lambda _, w=writers[name]: w)
        splits = {name: w.close() for name, w in writers.items()}
        _check_not_empty(splits, val_fraction, val_inputs is not None)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "pad_id": tokenizer.pad_id,
            "tokenizer_sha256": tokenizer.sha256(),
            "tokenizer_kind": tokenizer.kind,
            "normalization": "NFC, surrounding whitespace stripped",
            "split": "files" if val_inputs is not None else "hash",
            "val_fraction": None if val_inputs is not None else val_fraction,
            "fields": None if all(len(p) == 2 for p in sources.values() if p) else dict(zip(SIDES, fields)),
            "inputs": {name: [str(p) for p in paths] for name, paths in sources.items() if paths is not None},
            "skipped": skipped,
            "splits": splits,
        }
        tokenizer.save(tmp / "tokenizer.json")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


class _SideWriter:
    """One side of one split: token ids appended to a .bin file, example ends kept for the offsets file."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype):
        self.folder, self.name, self.dtype = folder, name, dtype
        self.f = open(folder / f"{name}.bin", "wb")
        self.ends = array("q", [0])
        self.longest = 0

    def write(self, rows: list[list[int]]) -> None:
        for ids in rows:
            self.f.write(np.asarray(ids, dtype=self.dtype).tobytes())
            self.ends.append(self.ends[-1] + len(ids))
            self.longest = max(self.longest, len(ids))

    def close(self) -> dict:
        """Close the token file, write the offsets file; return the side's entry in meta.json."""
        self.f.close()
        np.asarray(self.ends, dtype=np.int64).tofile(self.folder / f"{self.name}_offsets.bin")
        pairs = len(self.ends) - 1
        return {"tokens": self.ends[-1], "max_len": self.longest,
                "mean_len": round(self.ends[-1] / pairs, 2) if pairs else 0.0,
                "file": f"{self.name}.bin", "offsets": f"{self.name}_offsets.bin"}


class _SplitWriter:
    """The two sides of a split (and, for val/test, the texts as JSONL)."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, keep_texts: bool):
        self.split = split
        self.sides = [_SideWriter(folder, f"{split}_{side}", dtype) for side in SIDES]
        self.texts = open(folder / f"{split}.jsonl", "w", encoding="utf-8") if keep_texts else None
        self.pending: list[tuple[str, str]] = []

    def add(self, pair: tuple[str, str], tok: Tokenizer) -> None:
        self.pending.append(pair)
        if len(self.pending) >= BATCH_PAIRS:
            self.flush(tok)

    def flush(self, tok: Tokenizer) -> None:
        """Encode the pending pairs (both sides in one parallel call) and append them."""
        if not self.pending:
            return
        n = len(self.pending)
        ids = tok.encode_batch([s for s, _ in self.pending] + [t for _, t in self.pending], allow_special=False)
        self.sides[0].write(ids[:n])
        self.sides[1].write(ids[n:])
        if self.texts is not None:
            for s, t in self.pending:
                self.texts.write(json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\n")
        self.pending = []

    def close(self) -> dict:
        """Close the files; return the split's entry in meta.json."""
        entry = {side: w.close() for side, w in zip(SIDES, self.sides)}
        entry = {"pairs": len(self.sides[0].ends) - 1, **entry}
        if self.texts is not None:
            self.texts.close()
            entry["texts"] = f"{self.split}.jsonl"
        return entry


def _write_pairs(paths: list[str], fields: tuple[str, str], tok: Tokenizer, choose) -> int:
    """Encode the pairs of one input into the split writer ``choose(source)`` picks; return how many were skipped."""
    counts: dict = {}
    used: dict[int, _SplitWriter] = {}
    for pair in iter_pairs(paths, *fields, counts=counts):
        w = choose(pair[0])
        used[id(w)] = w
        w.add(pair, tok)
    for w in used.values():
        w.flush(tok)
    return counts["skipped"]


def _check_not_empty(splits: dict, val_fraction: float, files: bool) -> None:
    """Every split that must hold pairs has some (val only when asked for)."""
    for name, info in splits.items():
        if info["pairs"] == 0 and (name != "val" or files or val_fraction > 0):
            hint = " (too few pairs for the hash split: add pairs, raise --val-fraction or give --val)" \
                if name == "val" and not files else ""
            raise DataError(f"the {name} split has no pairs{hint}")


# ---------------------------------------------------------------------------- reading a pairs folder


def load_pairs_meta(data_dir: str | os.PathLike) -> dict:
    """Read and check a prepared pairs folder's meta.json (format, version, files present)."""
    folder = Path(data_dir)
    path = folder / "meta.json"
    meta = read_meta_json(folder, "lmlab data prepare --pairs")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise DataError(f"{folder}: not a prepared pairs folder (format {found!r}, not {FORMAT!r}); "
                        f"prepare it with `lmlab data prepare --pairs`")
    if meta.get("version") != VERSION:
        raise DataError(f"{path}: pairs format version {meta.get('version')!r}; this lmlab reads version {VERSION}")
    for name, info in meta["splits"].items():
        for side in SIDES:
            for key in ("file", "offsets"):
                if not (folder / info[side][key]).is_file():
                    raise DataError(f"{folder / info[side][key]}: missing file of the {name} split; prepare the data again")
    return meta


class PairShards:
    """One split of a prepared pairs folder: ``len()`` pairs, ``pair(i)`` -> (source ids, target ids)."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        data_dir = Path(data_dir)
        meta = load_pairs_meta(data_dir)
        if split not in meta["splits"]:
            raise DataError(f"{data_dir}: no {split!r} split (has {', '.join(meta['splits'])})")
        self.folder, self.split, self.meta = data_dir, split, meta
        self.eot_id, self.pad_id = meta["eot_id"], meta.get("pad_id", meta["eot_id"])
        info = meta["splits"][split]
        self.tokens, self.offsets = [], []
        for side in SIDES:
            offsets = np.fromfile(data_dir / info[side]["offsets"], dtype=np.int64)
            size = (data_dir / info[side]["file"]).stat().st_size // np.dtype(meta["dtype"]).itemsize
            if len(offsets) != info["pairs"] + 1 or offsets[-1] != size:
                raise DataError(f"{data_dir / info[side]['offsets']}: does not match meta.json or "
                                f"{info[side]['file']}; prepare the data again")
            tokens = np.memmap(data_dir / info[side]["file"], dtype=meta["dtype"], mode="r") if size \
                else np.zeros(0, dtype=meta["dtype"])
            self.tokens.append(tokens)
            self.offsets.append(offsets)
        self._warned: set[tuple[int, int]] = set()

    def __len__(self) -> int:
        return len(self.offsets[0]) - 1

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The source and target token ids of pair ``i`` (int64 arrays)."""
        return tuple(np.asarray(t[o[i]:o[i + 1]], dtype=np.int64) for t, o in zip(self.tokens, self.offsets))

    def lengths(self, side: str = "source") -> np.ndarray:
        """Token count of every example of one side (int64, in order)."""
        return np.diff(self.offsets[SIDES.index(side)])

    def texts(self) -> list[dict]:
        """The val/test texts as read, [{"source": ..., "target": ...}] in order (train keeps none)."""
        name = self.meta["splits"][self.split].get("texts")
        if name is None:
            raise DataError(f"{self.folder}: the {self.split} split keeps no texts (only val and test do)")
        with open(self.folder / name, encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def note_cuts(self, max_source_len: int, max_target_len: int) -> None:
        """Log once per pair of limits how many pairs of the split they cut."""
        if (max_source_len, max_target_len) in self._warned:
            return
        self._warned.add((max_source_len, max_target_len))
        long_src = int((self.lengths("source") > max_source_len).sum())
        long_tgt = int((self.lengths("target") + 1 > max_target_len).sum())
        if long_src or long_tgt:
            log.warning(f"{self.split}: {long_src:,} of {len(self):,} sources are longer than {max_source_len} tokens "
                        f"and {long_tgt:,} targets (+ end-of-text) longer than {max_target_len}; they are cut")


# ---------------------------------------------------------------------------- batches


@dataclass
class PairBatch:
    """Padded pairs (padded on the right). ``indices`` are the pairs' positions in the split."""

    src: torch.Tensor  # (B, S) int64, padded with pad_id
    src_mask: torch.Tensor  # (B, S) bool, True on real tokens
    tgt_in: torch.Tensor  # (B, T) int64: [eot] + target, padded with pad_id
    targets: torch.Tensor  # (B, T) int64: target + [eot], IGNORE (-100) on padding
    indices: list[int]


def make_batch(shards: PairShards, indices: Iterable[int], max_source_len: int, max_target_len: int) -> PairBatch:
    """The pairs at ``indices`` as a PairBatch: sources cut to ``max_source_len`` tokens, [eot] + target +
    [eot] cut to ``max_target_len`` + 1 (a cut target loses its closing eot: it does not end there)."""
    if max_source_len < 1 or max_target_len < 1:
        raise DataError(f"max lengths must be at least 1, got source {max_source_len}, target {max_target_len}")
    shards.note_cuts(max_source_len, max_target_len)
    indices = [int(i) for i in indices]
    srcs, seqs = [], []
    for i in indices:
        src, tgt = shards.pair(i)
        srcs.append(src[:max_source_len].tolist())
        seqs.append([shards.eot_id, *tgt[:max_target_len].tolist(), shards.eot_id][:max_target_len + 1])
    return PairBatch(
        src=pad_rows(srcs, shards.pad_id),
        src_mask=pad_rows([[1] * len(s) for s in srcs], 0).bool(),
        tgt_in=pad_rows([s[:-1] for s in seqs], shards.pad_id),
        targets=pad_rows([s[1:] for s in seqs], IGNORE),
        indices=indices,
    )


def pair_batch(shards: PairShards, batch_size: int, seed: int, step: int, max_source_len: int = 512,
               max_target_len: int = 512, group: int = 0, micro: int = 0, rank: int = 0) -> PairBatch:
    """The training batch of step ``step``: ``batch_size`` random pairs, the same for the same (seed, step,
    micro, rank), so a resumed run sees the batches an uninterrupted one would (as data/loader.py).

    ``group`` = k > 1 draws a pool of k * batch_size pairs, sorts it by length (source, then target),
    cuts it into batches and takes one of them at random: pairs of similar length share a batch (less
    padding) while every pair stays as likely to be drawn.
    """
    n = len(shards)
    if n == 0:
        raise DataError(f"the {shards.split} split has no pairs")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    rng = np.random.default_rng([seed, step, micro, rank])
    if group <= 1:
        return make_batch(shards, rng.choice(n, size=batch_size, replace=n < batch_size), max_source_len,
                          max_target_len)
    pool = rng.choice(n, size=max(batch_size, min(group * batch_size, n)), replace=n < batch_size)
    pool = pool[np.lexsort((shards.lengths("target")[pool], shards.lengths("source")[pool]))]
    pick = int(rng.integers(len(pool) // batch_size))
    return make_batch(shards, pool[pick * batch_size:(pick + 1) * batch_size], max_source_len, max_target_len)


def eval_pair_batches(shards: PairShards, batch_size: int, max_source_len: int = 512,
                      max_target_len: int = 512) -> Iterator[PairBatch]:
    """Every pair of the split once, in batches of similar source length (``indices`` give each pair's
    place in the split, to put generated text back in order)."""
    for indices in sequential_batches(shards.lengths("source").tolist(), batch_size):
        yield make_batch(shards, indices, max_source_len, max_target_len)


def padding_fraction(batch: PairBatch) -> dict:
    """The share of padded positions in a batch's source, target, and both: what length grouping cuts."""
    src_pad = int((~batch.src_mask).sum())
    tgt_pad = int((batch.targets == IGNORE).sum())
    return {"source": src_pad / batch.src.numel(), "target": tgt_pad / batch.targets.numel(),
            "all": (src_pad + tgt_pad) / (batch.src.numel() + batch.targets.numel())}

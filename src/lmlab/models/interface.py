"""The written interface of lmlab's models: what the trainer, the generation engine and the task heads
may count on, whatever the family.

Every model, task heads included (``SequenceClassifier``), has ``config`` and ``context_length``
(``Model``); every backbone (GPT, RecurrentLM, Encoder) also has ``hidden_size`` and ``features``
(``Backbone``); decoders (GPT, RecurrentLM) also decode incrementally with ``make_cache`` and
``forward(idx, cache=...)`` (``LanguageModel``); encoder-decoders (Seq2SeqTransformer, RecurrentSeq2Seq)
have their own shape (``Seq2SeqModel``). tests/test_models_interface.py checks every family. ``context_length`` is the number of tokens a model can attend to at once,
or ``None`` when it has no limit (a recurrent model carries a state instead); ``config.block_size`` is
the training window, which for Transformers is the same number.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from lmlab.config import ModelConfig

IGNORE_INDEX = -100  # a target the loss skips (padding, prompt tokens in instruction tuning)


class Cache(Protocol):
    """What a model carries between incremental decoding steps (a KV cache, a recurrent state)."""

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows leave the batch)."""

    def compact(self, rows: torch.Tensor, start: int, max_len: int) -> None:
        """Keep only these batch rows and drop the first ``start`` positions, padding in all of them; room
        for ``max_len`` positions in all (continuous batching gives finished rows' columns back)."""


@runtime_checkable
class Model(Protocol):
    """What every lmlab model has, a task head too: what checkpoints, evaluation and serving read."""

    config: ModelConfig  # a head's is its backbone's
    context_length: int | None


@runtime_checkable
class Backbone(Model, Protocol):
    """A network that turns token ids into hidden states (every family)."""

    hidden_size: int

    def features(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, hidden_size) of token ids idx (B, T); attention_mask marks real tokens."""


@runtime_checkable
class LanguageModel(Backbone, Protocol):
    """A decoder: next-token logits, the mean loss against targets, and incremental decoding."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: Cache | None = None,
                only_last: bool = False, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, with targets (B, T), the mean cross-entropy (IGNORE_INDEX skipped)."""

    def make_cache(self, batch_size: int, max_len: int | None = None) -> Cache:
        """An empty cache for ``batch_size`` sequences, for ``forward(idx, cache=cache)``."""

    def resize_vocab(self, vocab_size: int) -> None:
        """Grow the vocabulary (new special tokens)."""


class Seq2SeqCache(Protocol):
    """What an encoder-decoder decodes from: what it read from the sources (computed once per source)
    and the decoder's own state, one row per sequence."""

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows, in this order (finished rows leave; beam search repeats rows)."""

    def shrink(self, rows: torch.Tensor, room: int) -> None:
        """Keep only these rows, drop the positions and source columns none of them needs, and leave room
        for ``room`` more target tokens (continuous batching gives finished rows' room back)."""

    def join(self, other: "Seq2SeqCache", max_len: int) -> "Seq2SeqCache":
        """A cache with this cache's rows, then ``other``'s (of any source and target lengths), with room
        for ``max_len`` target positions (rows joining a running batch)."""


@runtime_checkable
class Seq2SeqModel(Model, Protocol):
    """An encoder-decoder over one joint vocabulary: a source (B, S), padded on the right with ``src_mask``
    (B, S) 1 for real tokens, in; the logits of a target out. ``context_length`` (= config.block_size) is
    the longest source and the longest target."""

    hidden_size: int

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, src_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: logits (B, T, vocab) after each token of tgt_in (B, T), the decoder causal over
        it, and with targets (B, T) the mean cross-entropy (IGNORE_INDEX skipped)."""

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """What the decoder reads of the sources: memory (B, S, width)."""

    def make_cache(self, memory: torch.Tensor, src_mask: torch.Tensor | None = None,
                   max_len: int | None = None) -> Seq2SeqCache:
        """A cache for decoding ``max_len`` target tokens from memory: what the decoder reads of the
        sources at every step, computed here once, and the decoder's empty state."""

    def decode(self, idx: torch.Tensor, cache: Seq2SeqCache) -> torch.Tensor:
        """Logits (B, T, vocab) after each of the target tokens idx (B, T), which follow those already in
        the cache; the cache advances by T positions."""

    def flops_per_token(self) -> float:
        """Training FLOPs per target token (a source of the same length counted with it), for MFU."""


def width_of(model: torch.nn.Module) -> int | None:
    """The model's d_model, which decides a CPU's ``precision: auto`` (None for a model without one)."""
    return getattr(getattr(model, "config", None), "d_model", None)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared (tied) tensors counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total

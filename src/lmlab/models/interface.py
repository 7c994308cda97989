"""The written interface of lmlab's models: what the trainer, the generation engine and the task heads
may count on, whatever the family.

Every model, task heads included (``SequenceClassifier``), has ``config`` and ``context_length``
(``Model``); every backbone (GPT, RecurrentLM, Encoder) also has ``hidden_size`` and ``features``
(``Backbone``); decoders (GPT, RecurrentLM) also decode incrementally with ``make_cache`` and
``forward(idx, cache=...)`` (``LanguageModel``). tests/test_models_interface.py checks every family. ``context_length`` is the number of tokens a model can attend to at once,
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

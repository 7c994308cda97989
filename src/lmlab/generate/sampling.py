"""Logit processors and the sampling step: temperature, top-k, top-p (nucleus), greedy."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmlab.errors import ConfigError


@dataclass
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` means greedy (argmax)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_tokens: list[int] = field(default_factory=list)

    def validate(self) -> None:
        """Raise ConfigError for values that make no sense (negative temperature, top_p outside (0, 1])."""
        if self.max_new_tokens < 1:
            raise ConfigError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top-p must be in (0, 1], got {self.top_p}")


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (B, V); set the rest to -inf."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probabilities add up to at least p (nucleus sampling)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop a token if the tokens before it already reach p (the top token always stays)
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token id for each row of logits (B, V); returns (B,)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k is not None:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1:
        logits = apply_top_p(logits, params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

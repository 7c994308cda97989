"""Choosing the next token: logit processors that compose, and the sampling step.

Each processor is a function ``(logits (B, V), values (B, 1), history) -> logits`` applied in a fixed
order: repetition, presence and frequency penalties (on the raw logits), then temperature, then the
filters top-k, top-p (nucleus) and min-p. ``temperature == 0`` means greedy: the argmax after the
penalties. Every row of a batch may use different values (one ``SamplingParams`` per row), so requests
with different settings share a batch; a row that does not use a processor gets its neutral value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from lmlab.errors import ConfigError

MAX_NEW_TOKENS_CAP = 1_000_000
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes (the API's signed 64-bit seed + i)
MIN_TEMPERATURE = 1e-6  # a smaller temperature counts as this one


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop, for one sequence."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p
    min_p: float | None = None  # keep tokens at least min_p times as likely as the most likely one
    repetition_penalty: float = 1.0  # CTRL-style: divide positive (multiply negative) logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI-style: subtract once from tokens already generated
    frequency_penalty: float = 0.0  # OpenAI-style: subtract per occurrence in the generated tokens
    seed: int | None = None
    stop_tokens: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings: the text ends before the first one

    def validate(self) -> None:
        """Raise ConfigError naming the first value that makes no sense."""
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_CAP:
            raise ConfigError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS_CAP}, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 100:
            raise ConfigError(f"temperature must be between 0 and 100, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ConfigError(f"min-p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty <= 10:
            raise ConfigError(f"repetition penalty must be in (0, 10], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ConfigError(f"{name.replace('_', ' ')} must be between -2 and 2, got {getattr(self, name)}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ConfigError(f"seed must be a 64-bit integer (from {SEED_RANGE[0]} to {SEED_RANGE[1]}), got {self.seed}")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")


class TokenHistory:
    """What the penalties look at, per row: tokens seen (prompt + generated) and generated-token counts."""

    def __init__(self, prompts: list[list[int]], vocab_size: int, device: torch.device):
        self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)  # (B, V)
        for row, ids in enumerate(prompts):
            self.seen[row, torch.tensor(ids, dtype=torch.long, device=device)] = True
        self.counts = torch.zeros(len(prompts), vocab_size, device=device)  # (B, V)

    def add(self, tokens: torch.Tensor) -> None:
        """Record the tokens (B,) just generated."""
        self.seen.scatter_(1, tokens[:, None], True)
        self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=self.counts.dtype))

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (when finished sequences leave the batch)."""
        self.seen, self.counts = self.seen[rows], self.counts[rows]


def repetition_penalty(logits: torch.Tensor, penalty: torch.Tensor, history: TokenHistory) -> torch.Tensor:
    """Make tokens already seen less likely: positive logits divided by ``penalty``, negative multiplied."""
    penalised = torch.where(logits > 0, _finite(logits / penalty), logits * penalty)
    return torch.where(history.seen, penalised, logits)


def presence_penalty(logits: torch.Tensor, penalty: torch.Tensor, history: TokenHistory) -> torch.Tensor:
    """Subtract ``penalty`` once from every token that was already generated."""
    return logits - penalty * (history.counts > 0)


def frequency_penalty(logits: torch.Tensor, penalty: torch.Tensor, history: TokenHistory) -> torch.Tensor:
    """Subtract ``penalty`` times the number of times each token was already generated."""
    return logits - penalty * history.counts


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor, history=None) -> torch.Tensor:
    """Divide by the temperature (greedy rows, temperature 0, are divided by 1: their argmax is kept).

    Temperatures below MIN_TEMPERATURE count as that (greedy in effect already): dividing by a smaller
    one could overflow to inf, and turn the probabilities into NaN.
    """
    return _finite(logits / torch.where(temperature > 0, temperature.clamp(min=MIN_TEMPERATURE),
                                        torch.ones_like(temperature)))


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """Logits divided by a tiny value (a repetition penalty of 1e-30, then a temperature of 1e-6) capped at
    the largest float, not inf, which would make the probabilities NaN."""
    biggest = torch.finfo(logits.dtype).max
    return logits.clamp(min=-biggest, max=biggest)


def apply_top_k(logits: torch.Tensor, k: torch.Tensor | int, history=None) -> torch.Tensor:
    """Keep the k largest logits of each row (B, V); set the rest to -inf. ``k`` is an int or (B, 1)."""
    V = logits.size(-1)
    k = torch.as_tensor(k, device=logits.device).long().clamp(1, V).expand(logits.size(0), 1)  # (B, 1)
    top = torch.topk(logits, int(k.max()), dim=-1).values  # (B, k_max), descending
    kth = top.gather(-1, k - 1)  # (B, 1): the k-th largest of each row
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: torch.Tensor | float, history=None) -> torch.Tensor:
    """Keep the smallest set of tokens whose probabilities add up to at least p (nucleus sampling)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    # drop a token if the tokens before it already reach p; the top token always stays (even if p
    # is so small that it rounds to 0 in float32)
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor | float, history=None) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times that of the most likely token."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


# (name of the SamplingParams field, processor, neutral value): the order they are applied in
PROCESSORS: list[tuple[str, Callable, float]] = [
    ("repetition_penalty", repetition_penalty, 1.0),
    ("presence_penalty", presence_penalty, 0.0),
    ("frequency_penalty", frequency_penalty, 0.0),
    ("temperature", apply_temperature, 1.0),
    ("top_k", apply_top_k, float("inf")),
    ("top_p", apply_top_p, 1.0),
    ("min_p", apply_min_p, 0.0),
]
PENALTIES = {"repetition_penalty", "presence_penalty", "frequency_penalty"}


class Sampler:
    """Picks the next token of every row of a batch, each row with its own ``SamplingParams``.

    Only the processors some row uses are run. Each row draws from its own random generator (seeded
    from its ``seed`` if it has one), so a sequence comes out the same alone or in a batch.
    """

    def __init__(self, params: list[SamplingParams], prompts: list[list[int]], vocab_size: int, device: torch.device):
        self.vocab_size, self.device = vocab_size, device
        self.params = list(params)
        uses_penalty = any(getattr(p, name) != neutral for p in params for name, _, neutral in PROCESSORS
                           if name in PENALTIES)
        self.history = TokenHistory(prompts, vocab_size, device) if uses_penalty else None
        self.generators = [torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None
                           for p in params]
        self._build()

    def _build(self) -> None:
        """The processors some row uses, each with its value per row (B, 1); which rows are greedy."""
        self.steps: list[tuple[str, Callable, torch.Tensor]] = []
        # greedy rows take the argmax, which temperature and the filters (they always keep the top token)
        # never change: when every row is greedy only the penalties run (a decoding step's sampling is one argmax)
        all_greedy = all(p.temperature == 0 for p in self.params)
        for name, fn, neutral in PROCESSORS:
            values = [neutral if getattr(p, name) is None else float(getattr(p, name)) for p in self.params]
            if all(v == neutral for v in values) or (all_greedy and name not in PENALTIES):
                continue
            if name == "top_k":
                values = [min(v, self.vocab_size) for v in values]
            self.steps.append((name, fn, torch.tensor(values, device=self.device)[:, None]))  # (B, 1)
        # (B,): a temperature too small for a float32 is 0 here, as in apply_temperature
        self.greedy = torch.tensor([p.temperature for p in self.params], device=self.device) == 0
        self.all_greedy = bool(self.greedy.all())

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Run the processors on logits (B, V) in order; returns float32 logits."""
        logits = logits.float()
        for _, fn, values in self.steps:
            logits = fn(logits, values, self.history)
        return logits

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token (B,) of each row: argmax for greedy rows, a draw from the processed distribution otherwise."""
        logits = self.process(logits)
        if self.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            probs = logits.softmax(dim=-1)
            drawn = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
            tokens = torch.where(self.greedy, logits.argmax(dim=-1), drawn)
        if self.history is not None:
            self.history.add(tokens)
        return tokens

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices into the current batch)."""
        keep = rows.tolist()
        self.params = [self.params[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        if self.history is not None:
            self.history.select(rows)
        self._build()

    def extend(self, other: "Sampler") -> None:
        """Append ``other``'s rows after these (sequences joining a running batch)."""
        if self.history is not None or other.history is not None:
            def history_of(sampler: Sampler) -> TokenHistory:
                return sampler.history or TokenHistory([[]] * len(sampler.params), self.vocab_size, self.device)
            mine, theirs = history_of(self), history_of(other)
            mine.seen, mine.counts = torch.cat([mine.seen, theirs.seen]), torch.cat([mine.counts, theirs.counts])
            self.history = mine
        self.params += other.params
        self.generators += other.generators
        self._build()

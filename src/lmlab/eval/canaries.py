"""Memorisation check with canaries ("The Secret Sharer", Carlini et al., 2019).

Random secrets in a fixed format ("my secret number is 3 1 4 1 5") are planted R times each in the
training text (``plant_canaries``); after training, a canary's exposure says how much more likely the
model finds its secret than the other secrets of the same format:

    exposure = log2 |R| - log2 rank      R: every secret of the format (10^digits)
                                         rank: 1 + how many of them have a lower log-perplexity
                                         log-perplexity: -log2 P(secret | prefix), over the secret's tokens

A model that learned nothing of the canary gives exposure about 1 (rank about |R| / 2); one that
memorised it gives log2 |R| (rank 1), the most there is. Canaries planted 0 times are the control.
The rank is exact when |R| <= ``enumerate_up_to`` (every secret scored); above it, it is estimated
from ``samples`` random secrets as rank = |R| (lower + 1) / (samples + 1), which caps exposure at
log2(samples + 1).

    lmlab eval canaries RUN --canaries canaries.jsonl    -> exposure of each canary (JSON)

The canaries file is JSONL, one {"prefix", "secret", "repeats"} per line (``write_canaries``).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lmlab.config import Count, NonNegativeInt, check_argument
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import DataError
from lmlab.eval.loglik import score_requests
from lmlab.runs import atomic_write_text, read_text_file

PREFIX = "my secret number is"


@dataclass(frozen=True)
class Canary:
    """A secret of ``len(secret.split())`` space-separated digits, written after ``prefix``, planted ``repeats`` times."""

    prefix: str
    secret: str
    repeats: int

    @property
    def text(self) -> str:
        return f"{self.prefix} {self.secret}"

    @property
    def digits(self) -> int:
        return len(self.secret.split())


def make_canaries(repeats: list[int], digits: int = 6, seed: int = 0, prefix: str = PREFIX) -> list[Canary]:
    """One canary of ``digits`` random digits for each entry of ``repeats`` (0: a control, never planted)."""
    rng = random.Random(seed)
    return [Canary(prefix, " ".join(rng.choice("0123456789") for _ in range(digits)), r) for r in repeats]


def plant_canaries(lines: list[str], canaries: list[Canary], seed: int = 0) -> list[str]:
    """``lines`` with each canary's text inserted as a line of its own ``repeats`` times, at random places."""
    out = list(lines)
    rng = random.Random(seed)
    for canary in canaries:
        for _ in range(canary.repeats):
            out.insert(rng.randrange(len(out) + 1), canary.text)
    return out


def write_canaries(canaries: list[Canary], path: str | Path) -> None:
    """Save canaries as JSONL (the file ``lmlab eval canaries --canaries`` reads)."""
    atomic_write_text(Path(path), "".join(json.dumps(asdict(c)) + "\n" for c in canaries))


def read_canaries(path: str | Path) -> list[Canary]:
    """The canaries of a JSONL file, or a one-line DataError naming the bad line."""
    canaries = []
    for number, line in enumerate(read_text_file(path, "canaries", DataError).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            canary = Canary(str(row["prefix"]), str(row["secret"]), int(row.get("repeats", 0)))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DataError(f"{path}:{number}: expected a JSON object with prefix, secret (and repeats)") from None
        if not all(len(d) == 1 and d.isdigit() for d in canary.secret.split()):
            raise DataError(f"{path}:{number}: a secret is space-separated digits, got {canary.secret!r}")
        canaries.append(canary)
    if not canaries:
        raise DataError(f"{path} holds no canaries")
    return canaries


def log_perplexities(model: nn.Module, tokenizer: Tokenizer, prefix: str, secrets: list[str],
                     batch_size: int = 256) -> torch.Tensor:
    """-log2 P(secret | prefix) of each secret (N,), summed over the secret's tokens: eval/loglik.py's scorer
    (the prefix read once into a cache, the secrets scored on copies of it)."""
    context = tokenizer.encode(prefix)
    requests = [(context, tokenizer.encode(" " + s)) for s in secrets]
    limit = model.context_length
    if limit is not None and max(len(context) + len(secret) for _, secret in requests) > limit:
        raise DataError(f"a canary is longer than the model's context of {limit} tokens")
    scores = score_requests(model, requests, batch_size)
    return torch.tensor([-logprob / math.log(2) for logprob, _ in scores])


def exposure(model: nn.Module, tokenizer: Tokenizer, canary: Canary, enumerate_up_to: int = 100_000,
             samples: int = 10_000, seed: int = 0, batch_size: int = 256) -> dict:
    """The canary's exposure (see the module docstring), its log-perplexity and rank, and how the rank was found."""
    for name, value, ftype in (("enumerate_up_to", enumerate_up_to, NonNegativeInt), ("samples", samples, Count),
                               ("batch_size", batch_size, Count)):
        check_argument(f"--{name.replace('_', '-')}", value, ftype)  # samples 0 would rank by NaN
    space = 10 ** canary.digits
    if space <= enumerate_up_to:
        others = [" ".join(d) for d in itertools.product("0123456789", repeat=canary.digits)]
        others.remove(canary.secret)
        method = "enumerated"
    else:
        rng = random.Random(seed)
        others = [" ".join(rng.choice("0123456789") for _ in range(canary.digits)) for _ in range(samples)]
        method = f"sampled {samples}"
    scores = log_perplexities(model, tokenizer, canary.prefix, [canary.secret] + others, batch_size)
    lower = int((scores[1:] < scores[0]).sum())
    rank = 1 + lower if method == "enumerated" else space * (lower + 1) / (len(others) + 1)
    return {"secret": canary.secret, "repeats": canary.repeats, "exposure": math.log2(space) - math.log2(rank),
            "max_exposure": math.log2(space), "rank": rank, "log_perplexity": float(scores[0]),
            "median_log_perplexity": float(scores[1:].median()), "rank_method": method}


def evaluate_canaries(model: nn.Module, tokenizer: Tokenizer, canaries: list[Canary], **options) -> dict:
    """The exposure of every canary, and the mean exposure of the planted ones and of the controls."""
    was_training = model.training
    model.eval()
    try:
        rows = [exposure(model, tokenizer, c, **options) for c in canaries]
    finally:
        model.train(was_training)
    planted = [r["exposure"] for r in rows if r["repeats"] > 0]
    controls = [r["exposure"] for r in rows if r["repeats"] == 0]
    return {"canaries": rows,
            "mean_exposure_planted": sum(planted) / len(planted) if planted else None,
            "mean_exposure_controls": sum(controls) / len(controls) if controls else None}


def canaries_markdown(report: dict) -> str:
    """``evaluate_canaries``'s report as a Markdown table, one row per canary."""
    lines = ["# Canary exposure", "", f"checkpoint: {report.get('checkpoint', '')}", "",
             "| secret | planted | exposure (bits) | of at most | rank | log-perplexity | median of the others |",
             "|---|---|---|---|---|---|---|"]
    for r in report["canaries"]:
        lines.append(f"| {r['secret']} | {r['repeats']} | {r['exposure']:.2f} | {r['max_exposure']:.2f} | "
                     f"{r['rank']:.4g} ({r['rank_method']}) | {r['log_perplexity']:.2f} | "
                     f"{r['median_log_perplexity']:.2f} |")
    return "\n".join(lines) + "\n"

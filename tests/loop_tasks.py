"""A minimal task for testing the one training loop (train/loop.py) apart from any model family:
least-squares regression with a linear layer, on fixed random data."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lmlab.config import ModelConfig, TrainConfig
from lmlab.data.tokenizer import train_tokenizer
from lmlab.train.checkpoint import load_checkpoint
from lmlab.train.logger import read_metrics
from lmlab.train.loop import Batch, TaskBase, Trainer, prepare_run


@dataclass
class RegressionConfig:
    train: TrainConfig = field(default_factory=TrainConfig)


def regression_config(out_dir, **train) -> RegressionConfig:
    defaults = dict(out_dir=str(out_dir), progress=False, log_interval=1)
    return RegressionConfig(TrainConfig(**{**defaults, **train}))


class RegressionTask(TaskBase):
    """Fit y = x @ w + noise; the examples of step s are rows [s*B*A, (s+1)*B*A) of the data, cyclically."""

    kind = "test"

    def __init__(self, batch_size: int, grad_accum: int, n: int = 64):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        self.model.config = ModelConfig()  # checkpoints record a model config; this one is only a placeholder
        self.x, self.y = torch.randn(n, 4), torch.randn(n, 1)
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.tokenizer = train_tokenizer("char", ["abc"])
        self.seen: list[torch.Tensor] = []

    def steps_per_epoch(self) -> int:
        return len(self.x) // (self.batch_size * self.grad_accum)

    def step_batches(self, step: int) -> list[Batch]:
        per_step = self.batch_size * self.grad_accum
        start = (step * per_step) % len(self.x)
        rows = torch.arange(start, start + per_step) % len(self.x)
        chunks = rows.split(self.batch_size)
        return [Batch({"x": self.x[c], "y": self.y[c]}, units=len(c), tokens=len(c)) for c in chunks]

    def loss(self, model, batch):
        return nn.functional.mse_loss(model(batch.tensors["x"]), batch.tensors["y"])

    def evaluate(self, model, device, precision):
        self.seen.append(model.weight.detach().clone())
        return {"val_loss": float(nn.functional.mse_loss(model(self.x), self.y))}


def run_task(task, cfg, resume: bool = False, stop_after: int | None = None, force: bool = False):
    device, precision = prepare_run(cfg.train, resume, force)
    return Trainer(task, cfg, device, precision, resume=resume, stop_after=stop_after, replace=force).run()


def train_losses(run_dir) -> dict[int, float]:
    """{step: train_loss} of a run folder's metrics.jsonl."""
    return {r["step"]: r["train_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in r}


def assert_same_run(full_dir, part_dir, steps: int) -> None:
    """Two runs logged a loss at steps 1..steps, the same bit for bit, and ended with identical weights
    (what a resumed run must give against an uninterrupted one on CPU fp32)."""
    a, b = train_losses(full_dir), train_losses(part_dir)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]
    wa = load_checkpoint(full_dir).model.state_dict()
    wb = load_checkpoint(part_dir).model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

"""Exponential moving average (EMA) of a model's trainable weights.

Fine-tuning a small model on a small dataset makes the weights, and the dev score, wander from one
evaluation to the next; the average of the recent weights is steadier, and often a little better
(Polyak averaging). ``train.ema_decay`` = 0.999 averages roughly the last 1,000 steps. Evaluation and
the saved checkpoint use the averaged weights; training continues on the raw ones.

Written here rather than with ``torch.optim.swa_utils.AveragedModel`` because that copies and
averages every parameter and buffer of the module, frozen ones included (with LoRA: the whole base
model, every step); this keeps a copy of the trainable parameters only.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager

import torch
import torch.nn as nn

from lmlab.errors import ConfigError


def weight_average(model: nn.Module, decay: float) -> "WeightAverage | None":
    """A WeightAverage of ``model`` when ``decay`` > 0 (train.ema_decay, in [0, 1) once loaded), else None."""
    return WeightAverage(model, decay) if decay > 0 else None


def averaged(ema: "WeightAverage | None"):
    """A context in which the model holds the weight average, or its own weights when there is none."""
    return ema.applied() if ema is not None else contextlib.nullcontext()


class WeightAverage:
    """A shadow copy of ``model``'s trainable parameters, moved towards them after every step."""

    def __init__(self, model: nn.Module, decay: float):
        # a guard for direct use: train.ema_decay itself is checked when the config loads
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be between 0 and 1 (exclusive), got {decay}")
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- shadow + (1 - d) * (param - shadow), with d warming up as min(decay, (1 + n) / (10 + n))
        so that the first steps' weights (far from the end point) do not linger in the average."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def _swap(self) -> None:
        for p, s in zip(self.params, self.shadow):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    @contextmanager
    def applied(self):
        """Inside the block the model holds the averaged weights; the raw ones come back after it."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def raw_state(self) -> dict:
        """What a checkpoint holding the *averaged* weights needs besides them to resume: the raw weights."""
        return {"updates": self.updates, "raw": [p.detach().clone() for p in self.params]}

    @torch.no_grad()
    def load_raw_state(self, state: dict) -> None:
        """Resume: the model holds the averaged weights (from the checkpoint); put them in the shadow
        and the raw weights of ``state`` (from ``raw_state``) back into the model."""
        if len(state["raw"]) != len(self.params):
            raise ConfigError("--resume: the saved weight average does not match the model's trainable parameters")
        for p, s, raw in zip(self.params, self.shadow, state["raw"]):
            s.copy_(p)
            p.copy_(raw)
        self.updates = state["updates"]

    def copy_to_model(self) -> None:
        """Put the averaged weights into the model for good (end of training, before saving)."""
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)

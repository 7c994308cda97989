"""Differentially private training: DP-SGD (Abadi et al., 2016) through Opacus, for any task of the one
loop (train/loop.py) that can hand out single examples (``Task.example_count`` / ``example_batch``).

    train:
      dp: {target_epsilon: 8, max_grad_norm: 1.0}   # delta: 1 / (2 N) unless given; accountant: prv

What changes in a step when ``train.dp`` is on (the Trainer calls ``make_private`` once and this
module's ``step_batches`` / ``before_step`` each step):

    sampling    each of the task's N examples joins the step's batch on its own with probability
                q = 1 / ceil(N / batch_size) (Poisson sampling, which the privacy bound assumes: the
                batch size varies, and may be 0); step s draws from a generator seeded with (seed, s),
                so a resumed run draws the same batches as an uninterrupted one. The batch goes through
                forward/backward in micro-batches of train.dp.micro_batch examples of similar length
                (each micro-batch's mean loss, which Opacus turns into exact per-example gradients)
    gradients   Opacus' hooks give every trainable layer's per-example gradient (functorch for layers
                without a rule of their own, such as lmlab's RMSNorm); each example's whole gradient is
                clipped to max_grad_norm, the clipped ones summed, Gaussian noise of std
                noise_multiplier * max_grad_norm added, and the sum divided by the expected batch q N.
                This replaces train.grad_clip (not applied under DP)
    accounting  the accountant (PRV or RDP) records (noise, q) for each step; the spent epsilon at
                delta is logged with every train record, and the accountant's history is saved with
                each checkpoint (state.pt) so that --resume continues the same account

With ``target_epsilon`` the noise is the smallest that keeps max_steps steps within (epsilon, delta)
(Opacus' get_noise_multiplier). We call PrivacyEngine.make_private with that noise rather than
make_private_with_epsilon, which converts epochs to steps by rounding; and we draw the Poisson batches
ourselves (Opacus' DPDataLoader is not a function of the step, which --resume needs); the engine's
own loader, over the examples' indices, only fixes q the way Opacus does. Opacus runs without
secure_mode (its noise comes from torch's generator): fine for experiments, not a production guarantee.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
import torch.nn as nn

from lmlab.config import DpConfig, TrainConfig
from lmlab.errors import ConfigError

log = logging.getLogger(__name__)
# Opacus' hooks on the first layer fire when its input (token ids) needs no gradient: expected, not a problem
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")


class PrivateTraining:
    """The DP-SGD state of a run: the Opacus engine (accountant), the private optimizer and the sampling rate.

    Built by ``make_private``; ``optimizer`` replaces the run's optimizer (it wraps it and shares its
    parameter groups, so the learning-rate schedule still applies).
    """

    def __init__(self, dp: DpConfig, examples: int, batch_size: int, seed: int, steps: int, model: nn.Module,
                 optimizer: torch.optim.Optimizer):
        PrivacyEngine, get_noise_multiplier = _opacus()
        self.dp, self.examples, self.seed = dp, examples, seed
        self.delta = dp.delta if dp.delta is not None else 1 / (2 * examples)
        self.sample_rate = 1 / math.ceil(examples / batch_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "secure RNG turned off": said in the module docstring
            self.engine = PrivacyEngine(accountant=dp.accountant)
        if dp.target_epsilon is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # RDP: "optimal order is the largest alpha" (a looser bound, still true)
                self.noise_multiplier = get_noise_multiplier(target_epsilon=dp.target_epsilon, target_delta=self.delta,
                                                             sample_rate=self.sample_rate, steps=steps,
                                                             accountant=dp.accountant)
        else:
            self.noise_multiplier = dp.noise_multiplier
        for module in model.modules():
            if hasattr(module, "row_positions"):
                module.row_positions = True  # learned positions per row: Opacus' hooks see each example's rows
        indices = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(examples)),
                                              batch_size=batch_size)  # fixes q = 1 / len(indices), as Opacus does
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns of its beta functorch fallback, of full backward hooks
            self.hooks, self.optimizer, _ = self.engine.make_private(
                module=model, optimizer=optimizer, data_loader=indices, noise_multiplier=self.noise_multiplier,
                max_grad_norm=dp.max_grad_norm, poisson_sampling=True, wrap_model=False)
        # our micro-batches are parts of one Poisson batch, merged before the step (before_step), not the
        # accumulation over several batches that Opacus guards against
        self.hooks.allow_grad_accumulation()
        self.model = model
        self._norms: list[torch.Tensor] = []  # per-example gradient norms of the steps since gradient_norms()
        log.info("DP-SGD: %d examples, sampling rate %.5f (expected batch %.1f), noise multiplier %.4f, delta %.3g",
                 examples, self.sample_rate, self.sample_rate * examples, self.noise_multiplier, self.delta)

    def step_indices(self, step: int) -> list[int]:
        """The examples of step ``step``: each of them with probability ``sample_rate``, drawn from a
        generator seeded with (seed, step)."""
        rng = np.random.default_rng([self.seed, step])
        return np.flatnonzero(rng.random(self.examples) < self.sample_rate).tolist()

    def step_batches(self, task, step: int) -> list:
        """The micro-batches of step ``step`` ([] when no example was drawn): its Poisson-sampled examples
        sorted by length (where the task's examples differ in length), train.dp.micro_batch at a time, so
        that each micro-batch pads only to its own longest example. Per-example gradients do not depend
        on which examples share a forward pass, so the update is the same as from one batch."""
        indices = self.step_indices(step)
        lengths = task.example_lengths()
        if lengths is not None:
            indices.sort(key=lambda i: lengths[i])
        size = self.dp.micro_batch
        return [task.example_batch(indices[i:i + size]) for i in range(0, len(indices), size)]

    def before_step(self) -> None:
        """Give every trainable parameter its per-example gradients before the private optimizer's step:
        zeros for a parameter the step's forward did not use (and for all of them after an empty batch),
        so that the step still adds its noise and counts in the account. A parameter that got a gradient
        the hooks did not see (a weight read directly, not through its layer's forward) is refused:
        its examples' gradients could not be clipped."""
        params = self.optimizer.params
        for p in params:  # one tensor per parameter: Opacus would take a list (one per micro-batch) for k steps
            if isinstance(getattr(p, "grad_sample", None), list):
                p.grad_sample = torch.cat(p.grad_sample)
        sampled = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
        rows = len(sampled[0]) if sampled else 0
        if rows:
            self._norms.append(per_example_norms(sampled))
        for name, p in self.model.named_parameters():
            if not p.requires_grad or getattr(p, "grad_sample", None) is not None:
                continue
            if p.grad is not None and rows:  # used, but not through a layer Opacus hooks
                raise ConfigError(f"train.dp: parameter {name} gets its gradient outside its layer's forward, "
                                  f"so it has no per-example gradient; freeze it or train without train.dp")
            p.grad_sample = torch.zeros((rows, *p.shape), device=p.device, dtype=p.dtype)

    def gradient_norms(self) -> dict:
        """The median per-example gradient norm (before clipping) of the steps since the last call, and the
        fraction of those examples that max_grad_norm clipped: what to look at when choosing max_grad_norm.
        Nearly every example clipped means every example counts the same, a confident one as much as a
        wrong one; hardly any clipped means max_grad_norm is larger than it needs to be, and the noise grows with it."""
        if not self._norms:
            return {}
        norms = torch.cat(self._norms)
        self._norms = []
        return {"grad_norm_median": float(norms.median()),
                "clipped_fraction": float((norms > self.dp.max_grad_norm).float().mean())}

    @property
    def steps(self) -> int:
        """The private steps taken so far (in the accountant's history)."""
        return sum(steps for _, _, steps in self.engine.accountant.history)

    def epsilon(self) -> float:
        """The epsilon spent so far at ``delta`` (infinite once a step ran without noise)."""
        if self.steps == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # as in __init__
            return float(self.engine.get_epsilon(self.delta))

    def summary(self) -> dict:
        """What a checkpoint's manifest records: the spent epsilon, delta and how the steps were made private."""
        epsilon = self.epsilon()
        return {"epsilon": epsilon if math.isfinite(epsilon) else None, "delta": self.delta,
                "target_epsilon": self.dp.target_epsilon, "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.dp.max_grad_norm, "sample_rate": self.sample_rate, "steps": self.steps,
                "examples": self.examples, "accountant": self.dp.accountant}

    def state_dict(self) -> dict:
        """The accountant's history, which --resume needs to go on counting from where the run stopped."""
        return self.engine.accountant.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s output."""
        self.engine.accountant.load_state_dict(state)


def per_example_norms(grad_samples: list[torch.Tensor]) -> torch.Tensor:
    """(B,) L2 norm of each example's whole gradient, from every parameter's per-example gradients (B, ...).
    Each tensor's norms are taken in its own dtype (as Opacus' clipping does; no float copy of the per-example
    gradients, which can be the largest tensors of a DP step)."""
    return torch.stack([g.reshape(len(g), -1).norm(dim=1).float() for g in grad_samples], dim=1).norm(dim=1)


def make_private(task, model: nn.Module, optimizer: torch.optim.Optimizer, tc: TrainConfig,
                 world: int = 1) -> PrivateTraining | None:
    """DP-SGD for ``model`` trained by ``optimizer`` on ``task``'s examples as ``tc.dp`` says, or None
    when train.dp is off. ``world`` is the number of training processes (DP runs in one)."""
    if not tc.dp.enabled:
        return None
    if world > 1:
        raise ConfigError("train.dp runs in one process; run it without torchrun")
    examples = task.example_count()
    if examples < 2:
        raise ConfigError(f"train.dp needs at least 2 training examples, the data has {examples}")
    return PrivateTraining(tc.dp, examples, tc.batch_size, tc.seed, tc.max_steps, model, optimizer)


def _opacus():
    """Opacus' PrivacyEngine and get_noise_multiplier, imported on first use (only DP runs pay for it), without
    the root logging handler its import adds (logging.basicConfig), which would print lmlab's messages twice."""
    root = logging.getLogger()
    before = list(root.handlers)
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier

    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
    return PrivacyEngine, get_noise_multiplier

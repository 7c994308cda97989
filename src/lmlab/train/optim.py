"""AdamW with weight decay on matrices only (or Muon for the hidden matrices), and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lmlab.config import TrainConfig
from lmlab.errors import ConfigError


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str,
                    lr_by_prefix: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """AdamW (or SGD) over ``param_groups``: weight matrices and embeddings decay; biases and norm gains do not.

    ``lr_by_prefix`` gives parameters whose names start with a prefix their own learning rate (e.g.
    a new classifier head that must learn faster than the pretrained body); the schedule scales
    every group alike. Uses the fused kernel where this torch has one for the device (CPU and CUDA
    in torch >= 2.4). SGD is there to reproduce classic recipes (Zaremba et al.'s recurrent LMs);
    sparse_adam (torch's SparseAdam: Adam's moments updated only in the rows a batch touched, no weight
    decay) trains the sparse-gradient embedding tables of word2vec, where a dense step would touch every row.
    """
    if cfg.optimizer == "muon":
        return build_muon(model, cfg, device_type, lr_by_prefix or {})
    groups = param_groups(model, cfg, lr_by_prefix or {})
    if cfg.optimizer == "sparse_adam":
        groups = [{"params": g["params"], "lr": g["lr"]} for g in groups]
        return torch.optim.SparseAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    # adamw, the only other choice (train.optimizer is checked when the config loads)
    return adamw(groups, cfg, device_type)


def adamw(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """torch's AdamW over ``groups``, with its fused kernel where this torch has one for the device."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device_type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # torch without a fused kernel for this device
            pass
    return torch.optim.AdamW(groups, **kwargs)


def param_groups(model: nn.Module, cfg: TrainConfig, lr_by_prefix: dict[str, float],
                 skip: frozenset[int] = frozenset()) -> list[dict]:
    """The trainable parameters (but those whose id is in ``skip``) in groups of equal (weight decay,
    learning rate): decay for weight matrices and embeddings, none for biases and norm gains (as in GPT-2
    and nanoGPT); the lr of the first prefix in ``lr_by_prefix`` that a parameter's name starts with, else
    cfg.lr."""
    by_kind: dict[tuple[bool, float], list[nn.Parameter]] = {}  # (decays, lr) -> parameters
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in skip:
            by_kind.setdefault((p.dim() >= 2, lr_of(name, cfg, lr_by_prefix)), []).append(p)
    return [{"params": params, "weight_decay": cfg.weight_decay if decays else 0.0, "lr": lr}
            for (decays, lr), params in by_kind.items()]


def lr_of(name: str, cfg: TrainConfig, lr_by_prefix: dict[str, float]) -> float:
    """The lr of the first prefix in ``lr_by_prefix`` that parameter ``name`` starts with, else cfg.lr."""
    return next((lr for prefix, lr in lr_by_prefix.items() if name.startswith(prefix)), cfg.lr)


def hidden_matrices(model: nn.Module) -> frozenset[int]:
    """The ids of the trainable weights of the ``nn.Linear`` layers inside the model's stacks of layers (its
    ``nn.ModuleList``s): attention and MLP projections, the matrices Muon is made for. Embeddings, output
    and classifier heads, poolers, biases, norm gains and recurrent cells are not among them (as in Keller
    Jordan's Muon recipe), nor is a Linear that shares its weight with an embedding (a tied head)."""
    stacked = [m for stack in model.modules() if isinstance(stack, nn.ModuleList)
               for m in stack.modules() if isinstance(m, nn.Linear)]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return frozenset(id(m.weight) for m in stacked if m.weight.requires_grad and id(m.weight) not in embeddings)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon (torch.optim.Muon) for the hidden matrices and AdamW for every other parameter, stepped,
    scheduled and checkpointed as one optimizer: its ``param_groups`` are the two optimizers' own groups, so
    the learning-rate schedule scales both; ``state_dict`` holds both states."""

    def __init__(self, muon: torch.optim.Optimizer, rest: torch.optim.Optimizer):
        self.muon, self.rest = muon, rest
        super().__init__(muon.param_groups + rest.param_groups, {})  # the same group dicts, not copies

    @torch.no_grad()
    def step(self, closure=None):
        """One step of each optimizer (a closure, if given, is evaluated once, before them)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.rest.step()
        return loss

    def state_dict(self) -> dict:
        """Both optimizers' states, under "muon" and "adamw"."""
        return {"muon": self.muon.state_dict(), "adamw": self.rest.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what ``state_dict`` returned; the groups are the loaded ones again (loading replaces them)."""
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("this optimizer state is not Muon's (the checkpoint was trained with another "
                             "train.optimizer)")
        self.muon.load_state_dict(state_dict["muon"])
        self.rest.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.rest.param_groups


def build_muon(model: nn.Module, cfg: TrainConfig, device_type: str,
               lr_by_prefix: dict[str, float]) -> torch.optim.Optimizer:
    """Muon for ``hidden_matrices(model)`` at train.muon_lr (default train.lr), with Moonshot's scaling
    (``adjust_lr_fn="match_rms_adamw"``: the update's RMS matches AdamW's, so AdamW's learning rate and
    weight decay carry over); AdamW, as ``build_optimizer`` sets it up, for the rest (if any). Muon
    orthogonalises each matrix's momentum (5 Newton-Schulz steps), which speeds up learning per step."""
    hidden = hidden_matrices(model)
    if not hidden:
        raise ConfigError("train.optimizer muon found no hidden matrices in this model (nn.Linear layers in "
                          "its stacks of layers); use adamw")
    scale = (cfg.muon_lr or cfg.lr) / cfg.lr  # lr_by_prefix's learning rates, relative to train.lr, apply too
    by_lr: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if id(p) in hidden:
            by_lr.setdefault(scale * lr_of(name, cfg, lr_by_prefix), []).append(p)
    muon = torch.optim.Muon([{"params": params, "lr": lr} for lr, params in by_lr.items()], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                            adjust_lr_fn="match_rms_adamw")
    rest = param_groups(model, cfg, lr_by_prefix, skip=hidden)
    if not rest:  # every trainable parameter is a hidden matrix (e.g. LoRA adapters alone)
        return muon
    return MuonWithAdamW(muon, adamw(rest, cfg, device_type))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at ``step``: linear warmup, then cosine/linear decay to min_lr, or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "step":
        decays = 0 if step < cfg.lr_decay_start else (step - cfg.lr_decay_start) // cfg.lr_decay_every + 1
        return cfg.lr_decay ** decays
    min_ratio = (cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10) / cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.lr_schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``lr_factor`` (its state is saved with the checkpoint)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))

"""AdamW with weight decay on matrices only, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lmlab.config import TrainConfig


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
    groups = param_groups(model, cfg, lr_by_prefix or {})
    if cfg.optimizer == "sparse_adam":
        groups = [{"params": g["params"], "lr": g["lr"]} for g in groups]
        return torch.optim.SparseAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    # adamw, the only other choice (train.optimizer is checked when the config loads)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device_type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # torch without a fused kernel for this device
            pass
    return torch.optim.AdamW(groups, **kwargs)


def param_groups(model: nn.Module, cfg: TrainConfig, lr_by_prefix: dict[str, float]) -> list[dict]:
    """The trainable parameters in groups of equal (weight decay, learning rate): decay for weight
    matrices and embeddings, none for biases and norm gains (as in GPT-2 and nanoGPT); the lr of
    the first prefix in ``lr_by_prefix`` that a parameter's name starts with, else cfg.lr."""

    def lr_of(name: str) -> float:
        return next((lr for prefix, lr in lr_by_prefix.items() if name.startswith(prefix)), cfg.lr)

    by_kind: dict[tuple[bool, float], list[nn.Parameter]] = {}  # (decays, lr) -> parameters
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_kind.setdefault((p.dim() >= 2, lr_of(name)), []).append(p)
    return [{"params": params, "weight_decay": cfg.weight_decay if decays else 0.0, "lr": lr}
            for (decays, lr), params in by_kind.items()]


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

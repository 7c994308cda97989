"""Typed configs: dataclasses, loaded from YAML and overridden from the command line, checked by pydantic.

A run is described by one ``RunConfig`` (model + data + train sections). Users write YAML and
override any field as ``section.key=value`` (``model.n_layer=6``); values are parsed as YAML scalars.

Each field's annotation says what it accepts: a type, ``Literal[...]`` for a choice, and
``Annotated[..., Field(ge=...)]`` for a range. ``from_dict`` checks every value with pydantic, strictly
("3" is not an int and True is not an int, but 1 is a float, and YAML's ``3e-4``, which PyYAML reads
as a string, is a float; NaN and infinity are refused), then the rules that tie fields together
(``d_model`` divisible by ``n_head``, ``min_lr <= lr``, ...). ``load_config`` also refuses a model
field set for a family it does not apply to. Every problem is a one-line ``ConfigError`` naming the
key, raised before any work starts.

The configs stay plain dataclasses: code reads ``cfg.field`` and uses ``dataclasses.replace``
(which does not validate), and checkpoints store ``dataclasses.asdict(model_config)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter

from lmlab.errors import ConfigError, first_line
from lmlab.runs import atomic_write_text, read_text_file

RECURRENT = ("rnn", "lstm", "gru")
TRANSFORMERS = ("gpt", "encoder", "seq2seq")
SEQ2SEQ = ("seq2seq", "rnn_seq2seq")  # encoder-decoders: (source, target) pairs, one joint vocabulary
# The presets of each Transformer family (the first is the default) and the positions each implies;
# models/gpt.py, models/encoder.py and models/seq2seq.py hold the presets in full (tests check that they agree).
PRESETS = {"gpt": ("gpt2", "llama"), "encoder": ("bert",), "seq2seq": ("gpt2", "llama")}
PRESET_POS_EMB = {"gpt2": "learned", "llama": "rope", "bert": "learned"}

# Value ranges, as pydantic constraints (describe_config and the error messages show them).
Count = Annotated[int, Field(ge=1)]  # 1, 2, ...
NonNegativeInt = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]  # dropouts, betas, decay rates: [0, 1)
# auto: bf16 on GPUs that have it and on CPUs with bf16 units where a probe finds it pays (runtime.resolve_precision)
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Factor = Annotated[float, Field(gt=0, le=1)]  # a multiplier that shrinks: (0, 1]
Name = Annotated[str, Field(min_length=1)]  # a string that must not be empty
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]  # a random seed torch takes
Finite = Annotated[float, Field()]  # any number but NaN and infinity (all floats are checked finite)
Device = Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto | cpu | cuda | cuda:N | mps")]


def described(default: Any, help: str) -> Any:
    """A dataclass field with its default and a one-line ``help`` (shown as a command-line flag's help)."""
    return field(default=default, metadata={"help": help})


def only(*names: str, default: Any = None) -> Any:
    """A dataclass field that applies only to these model families (on ModelConfig and MlmConfig) or commands
    (on BaseModelConfig): setting it elsewhere is a ConfigError, and ``describe_config`` says where it applies."""
    return field(default=default, metadata={"only": names})


@dataclass
class ModelConfig:
    """Architecture of a language model; ``preset`` fills the choices a family is known by.

    The fields are grouped by the families they apply to. One marked ``only(...)`` set for another
    family is an error (a GPT has no ``init_range``, an LSTM no ``n_head``); a value equal to the
    default, or None, counts as not set, so complete saved configs load whatever their family.
    """

    # every family
    family: Literal["gpt", "rnn", "lstm", "gru", "encoder", "seq2seq", "rnn_seq2seq",
                    "word2vec"] = "gpt"  # registry name
    n_layer: Count = 4  # encoder-decoders: the encoder's layers
    d_model: Count = 128
    # MLP width (None = 4*d_model for gelu, ~8/3*d_model for swiglu); RNN hidden size (None = d_model)
    d_ff: Count | None = None
    # the context length; for recurrent models the training window (truncated BPTT length); for
    # encoder-decoders the longest source and the longest target
    block_size: Count = 256
    vocab_size: Count | None = None  # None = taken from the tokenizer
    dropout: Fraction = 0.0
    # Transformers (gpt, encoder, seq2seq); preset: gpt2 (gpt's and seq2seq's default) | llama; bert (encoder);
    # it sets the fields left None
    preset: Literal["gpt2", "llama", "bert"] | None = only(*TRANSFORMERS)
    n_head: Count = only(*TRANSFORMERS, default=4)
    n_kv_head: Count | None = only(*TRANSFORMERS)  # grouped-query attention when < n_head (llama); None = n_head
    pos_emb: Literal["learned", "rope"] | None = only(*TRANSFORMERS)
    norm: Literal["layernorm", "rmsnorm"] | None = only(*TRANSFORMERS)
    mlp: Literal["gelu", "gelu_exact", "swiglu"] | None = only(*TRANSFORMERS)  # gelu: tanh approximation (GPT-2)
    bias: bool | None = only(*TRANSFORMERS)  # biases in linear layers and norms
    norm_eps: Positive = only(*TRANSFORMERS, default=1e-5)
    init_std: Positive = only(*TRANSFORMERS, default=0.02)  # normal(0, init_std)
    # language models (not encoder): the output layer softmax(h @ E^T) shares E with the input (encoder-decoders:
    # the encoder's input, the decoder's input and the output layer share one matrix)
    tie_embeddings: bool | None = only("gpt", *RECURRENT, *SEQ2SEQ)
    # rotary positions (gpt or seq2seq with pos_emb rope, e.g. preset llama); scaling stretches them (gpt)
    rope_theta: Positive = only("gpt", "encoder", "seq2seq", default=10000.0)
    rope_scaling: Literal["linear", "llama3"] | None = only("gpt")
    rope_factor: Positive = only("gpt", default=1.0)  # linear/llama3: how many times longer than the original context
    rope_low_freq_factor: Positive = only("gpt", default=1.0)  # llama3
    rope_high_freq_factor: Positive = only("gpt", default=4.0)  # llama3
    rope_original_context: Count | None = only("gpt")  # llama3: the pretraining context (None = block_size)
    # recurrent models (rnn, lstm, gru, rnn_seq2seq)
    init_range: Positive | None = only(*RECURRENT, "rnn_seq2seq")  # uniform(-r, r); None = 0.1
    # the state is zeroed before this token id (a document start); None = end-of-text, -1 = never
    reset_token: Annotated[int, Field(ge=-1)] | None = only(*RECURRENT)
    # encoder
    type_vocab_size: NonNegativeInt | None = only("encoder")  # token-type (segment) embeddings, 0 = none; None = 2 (bert)
    # pre-norm layers (x + attn(norm(x)), a final norm after the last layer) instead of BERT's post-norm ones
    # (norm(x + attn(x))): they leave the masked-LM loss plateau sooner in short pretraining; no BertModel export
    pre_norm: bool | None = only("encoder")  # None = False (bert)
    # encoder-decoders (seq2seq, rnn_seq2seq)
    n_dec_layer: Count | None = only(*SEQ2SEQ)  # the decoder's layers; None = n_layer
    n_dec_head: Count | None = only("seq2seq")  # the decoder's attention heads; None = n_head
    # the encoder's blocks: None = the preset's pre-norm blocks; bert = models/encoder.py's post-norm BERT
    # encoder (its own embedding LayerNorm; n_layer, n_head, d_ff are its shape), what encoder_init loads
    encoder_preset: Literal["bert"] | None = only("seq2seq")
    # a pretrained BERT (a name such as all-MiniLM-L6-v2, or a Hugging Face folder) whose weights start the
    # encoder (lmlab train; interop/warmstart.py): its shape fills the encoder's fields; checkpoints hold the
    # weights, so loading one never reads it again
    encoder_init: str | None = only("seq2seq")
    cell: Literal["lstm", "gru"] | None = only("rnn_seq2seq")  # the recurrent cell; None = lstm
    attention: Literal["luong", "bahdanau"] | None = only("rnn_seq2seq")  # None = luong (general score)
    # word2vec (its vectors have d_model dimensions): predict each context word from the centre word
    # (skipgram) or the centre word from the mean of its context (cbow); sparse gradients touch only the rows
    # a batch uses (train with train.optimizer sparse_adam or sgd)
    w2v_mode: Literal["skipgram", "cbow"] = only("word2vec", default="skipgram")
    w2v_sparse: bool = only("word2vec", default=True)


@dataclass
class DataConfig:
    """Where the prepared token shards are (the output folder of ``lmlab data prepare``)."""

    path: str = ""
    train_split: Name = "train"
    val_split: Name = "val"


@dataclass
class DpConfig:
    """Differentially private training (DP-SGD through Opacus, train/privacy.py): Poisson-sampled batches,
    each example's gradient clipped to max_grad_norm, Gaussian noise added. On when target_epsilon or
    noise_multiplier is set (one of them); for tasks that hand out single examples (classify, pretrain)."""

    target_epsilon: Positive | None = None  # the run's budget: the noise that spends (epsilon, delta) in max_steps
    noise_multiplier: NonNegative | None = None  # instead: this noise std / max_grad_norm (epsilon then only reported)
    delta: Annotated[float, Field(gt=0, lt=1)] | None = None  # None = 1 / (2 N), N the training examples
    max_grad_norm: Positive = 1.0  # each example's whole gradient is clipped to this L2 norm
    accountant: Literal["prv", "rdp"] = "prv"  # how spent epsilon is computed (prv: tighter; rdp: the classic bound)
    micro_batch: Count = 64  # a step's examples, sorted by length, go through forward/backward this many at a time
    #                          (less padding, bounded activation memory; the private update is the same)

    @property
    def enabled(self) -> bool:
        """Whether the run trains with differential privacy."""
        return self.target_epsilon is not None or self.noise_multiplier is not None


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, evaluation and checkpointing of a training run."""

    out_dir: Name = "runs/run"
    seed: Seed = 1337
    device: Device = "auto"
    precision: Precision = "auto"  # auto: bf16 on capable GPUs and CPUs (docs/performance.md), else fp32
    compile: bool = False
    batch_size: Count = 12
    grad_accum: Count = 1
    max_steps: Count = 2000
    epochs: Positive | None = None  # passes over the training data; when set, it decides max_steps
    max_minutes: Positive | None = None  # stop (and checkpoint) after this much wall time
    lr: Positive = 1e-3
    min_lr: NonNegative | None = None  # None = lr / 10
    warmup_steps: NonNegativeInt = 100
    lr_schedule: Literal["cosine", "linear", "constant", "step"] = "cosine"
    lr_decay: Factor = 0.5  # step schedule: multiply lr by this ...
    lr_decay_every: Count = 1000  # ... every this many steps ...
    lr_decay_start: NonNegativeInt = 0  # ... from this step on (e.g. Zaremba et al.: x0.5 per epoch after epoch 4)
    # sparse_adam: for sparse gradients (word2vec); muon: Muon for the hidden layers' matrices, AdamW for the rest
    optimizer: Literal["adamw", "sgd", "sparse_adam", "muon"] = "adamw"
    momentum: Fraction = 0.0  # sgd only
    muon_lr: Positive | None = None  # muon only; None = lr (Muon's update is scaled to AdamW's size)
    muon_momentum: Fraction = 0.95  # muon only (Nesterov)
    weight_decay: NonNegative = 0.1
    beta1: Fraction = 0.9
    beta2: Fraction = 0.99
    eps: Positive = 1e-8
    grad_clip: NonNegative = 1.0  # 0 disables clipping
    ema_decay: Fraction = 0.0  # > 0: evaluate and save an exponential moving average of the weights (e.g. 0.999)
    batching: Literal["random", "sequential"] = "random"  # random windows, or rows of the text read in order
    carry_state: bool = False  # recurrent models: carry the hidden state across batches (truncated BPTT; needs sequential)
    eval_interval: Count = 250
    eval_batches: Count = 20
    eval_batch_size: Count | None = None  # None = batch_size
    log_interval: Count = 10
    checkpoint_interval: Count = 1000  # also at the end of training
    keep_checkpoints: NonNegativeInt = 2  # 0 keeps them all
    tensorboard: bool = False
    progress: bool = True
    threads: Annotated[int, Field(ge=1, le=4096)] | None = None  # torch.set_num_threads on CPU; None = torch's default
    # under torchrun: ddp keeps a whole model per process, fsdp (FSDP2) shards weights, grads and optimizer state
    distributed: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: bool = False  # recompute blocks' activations in backward: less memory, more compute
    dp: DpConfig = field(default_factory=DpConfig)  # differential privacy (off unless dp.target_epsilon is set)


@dataclass
class LoraConfig:
    """Low-rank adapters (see models/lora.py); ``r = 0`` means none: full fine-tuning."""

    r: NonNegativeInt = 0
    alpha: Positive = 16.0
    dropout: Fraction = 0.0
    targets: Name = "attn.qkv,attn.proj,mlp.up,mlp.down"  # comma-separated module-name patterns
    rslora: bool = False  # scale by alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r


@dataclass
class BaseModelConfig:
    """The pretrained model a fine-tuning run starts from, and the head it puts on it."""

    path: str = ""  # lmlab checkpoint or run folder, Hugging Face folder, or a pretrained name (all-MiniLM-L6-v2)
    pooling: Literal["cls", "mean", "last"] | None = only("classify")  # None = cls for encoders, last for decoders
    dropout: Fraction = only("classify", default=0.1)  # before the classifier
    head_lr: Positive | None = only("classify")  # learning rate of the new classifier layer (None = train.lr)
    # < 1 gives each layer below the top this times the lr of the one above
    layer_lr_decay: Factor = only("classify", default=1.0)
    # R-Drop weight; > 0 runs each batch twice and penalises disagreement (2x compute)
    rdrop: NonNegative = only("classify", default=0.0)


@dataclass
class ClassifyDataConfig:
    """Labelled text files (TSV/CSV with a header, or JSONL) for sequence classification."""

    train: str = ""
    val: str | None = None
    text_field: Name = "sentence"
    label_field: Name = "label"
    max_length: Count = 128  # tokens per text, template tokens ([CLS], [SEP]) included


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
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.02
    max_examples: Count | None = None  # use the first N training conversations
    system_prompt: str | None = None  # added as the system turn where a conversation has none
    pack: bool = True  # concatenate short conversations into full context windows


@dataclass
class SftConfig:
    """Everything ``lmlab finetune sft`` needs (the model fields marked classify-only do not apply)."""

    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    data: SftDataConfig = field(default_factory=SftDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class ServeConfig:
    """How ``lmlab serve`` runs: where it listens, who may call it, and the limits on every request.
    Each field is a flag of ``lmlab serve`` (``--max-queue``); its ``help`` is the flag's help."""

    host: Name = described("127.0.0.1", "address to listen on (127.0.0.1: this machine only)")
    port: Annotated[int, Field(ge=1, le=65535)] = described(8000, "port to listen on")
    model_name: Name | None = described(None, 'the id clients name in "model" (default: the checkpoint folder\'s name)')
    api_key: Name | None = described(None, "require 'Authorization: Bearer KEY' on /v1/* (default: $LMLAB_API_KEY, "
                                           "else none)")
    max_batch_size: Count = described(8, "sequences generated together in one batch")
    max_queue: Count = described(64, "sequences allowed to wait; more are refused with 429")
    max_body_bytes: Count = described(1_000_000, "largest request body; larger ones get 413")
    max_prompt_tokens: Count | None = described(None, "longest prompt in tokens (default: the model's context)")
    max_new_tokens: Count = described(1024, "the most max_tokens a request may ask for")
    default_max_tokens: Count = described(256, "max_tokens of chat requests that do not say")
    request_timeout: Positive = described(300.0, "seconds before a request fails with 504 (or an error event)")


@dataclass
class MlmConfig:
    """Masked-language-model pretraining (model.family encoder, train/mlm.py): which tokens the model
    learns to fill in. Of the chosen tokens 80% become [MASK], 10% a random token and 10% stay (BERT)."""

    mask_prob: Annotated[float, Field(gt=0, lt=1)] = only("encoder", default=0.15)  # share of tokens chosen
    whole_word: bool = only("encoder", default=False)  # choose whole words: all of a word's tokens or none
    # mlm: predict the chosen tokens (BERT); electra: a small generator fills them in and the encoder learns to
    # tell, for every token, original from replacement (Clark et al., 2020; more learning per token)
    objective: Literal["mlm", "electra"] = only("encoder", default="mlm")
    generator_layers: Count = only("encoder", default=1)  # electra: the generator's layers (same width, shared embeddings)
    disc_weight: Positive = only("encoder", default=50.0)  # electra: weight of the discriminator's loss (the paper's 50)


@dataclass
class Seq2SeqConfig:
    """Training an encoder-decoder (model.family seq2seq or rnn_seq2seq, train/seq2seq.py) on a prepared
    pairs folder: length limits, length grouping, label smoothing, and greedy BLEU at each evaluation."""

    label_smoothing: Fraction = only(*SEQ2SEQ, default=0.0)  # of the training loss (val_loss is without)
    max_source_len: Count | None = only(*SEQ2SEQ)  # longer sources are cut; None = model.block_size
    max_target_len: Count | None = only(*SEQ2SEQ)  # longer targets are cut (+ end-of-text); None = model.block_size
    # a pool of this many batches is sorted by length and one of them taken (less padding); 0 or 1 = off
    length_grouping: NonNegativeInt = only(*SEQ2SEQ, default=16)
    val_bleu_examples: NonNegativeInt = only(*SEQ2SEQ, default=0)  # greedy-translate this many val pairs, report BLEU
    # the learning rate of a warm-started encoder's layers, positions and embedding LayerNorm (model.encoder_init;
    # the shared word embeddings are also the decoder's output layer and train at train.lr); None = train.lr
    encoder_lr: Positive | None = only("seq2seq")


@dataclass
class Word2VecConfig:
    """Training word vectors (model.family word2vec, train/word2vec.py) as word2vec.c and gensim do."""

    window: Count = only("word2vec", default=5)  # context words each side, at most (each centre draws 1..window)
    negatives: Count = only("word2vec", default=5)  # noise words per (centre, context) pair, drawn from unigram^0.75
    sample: NonNegative = only("word2vec", default=1e-3)  # subsampling threshold of frequent words; 0 = keep all
    min_count: Count = only("word2vec", default=5)  # words seen fewer times in the train split are dropped


@dataclass
class RunConfig:
    """Everything ``lmlab train`` needs: the model, the data and the training recipe (and, for an
    encoder, its masking; for an encoder-decoder, how it reads its pairs)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlm: MlmConfig = field(default_factory=MlmConfig)
    seq2seq: Seq2SeqConfig = field(default_factory=Seq2SeqConfig)
    word2vec: Word2VecConfig = field(default_factory=Word2VecConfig)


def to_dict(cfg: Any) -> dict:
    """A plain dict of a config dataclass (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build config dataclass ``cls`` from ``data``, or raise a one-line ConfigError.

    Refuses unknown keys (with a did-you-mean), values of the wrong type, outside their choices or
    range, and combinations the models or the trainer cannot run; missing keys take their defaults.
    ``prefix`` names the section in messages (``"model."``). Configs saved by earlier versions (every
    field present, e.g. a checkpoint's ``model_config``) load as they are.
    """
    cfg = _build(cls, data, prefix)
    _check_rules(cfg, prefix)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), cls: type = RunConfig) -> Any:
    """Read a YAML config (or start from defaults when ``path`` is None), apply overrides, and validate.

    Everything ``from_dict`` checks, and also that no model field is set for a family it does not
    apply to, so that a user's mistake fails here rather than mid-run or silently.
    """
    data = {} if path is None else read_yaml_mapping(path)
    for item in overrides:
        _apply_override(data, item)
    cfg = _build(cls, data, "")
    _check_families(cfg)
    _check_rules(cfg, "")
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last one silently:
    a config with two ``train:`` sections would lose the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice in one mapping (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: str | os.PathLike) -> dict:
    """The mapping a YAML config file holds ({} when empty), or a one-line ConfigError saying why not:
    missing, a folder, binary, not UTF-8, invalid YAML (a key given twice included), or not a mapping."""
    try:
        data = yaml.load(read_text_file(path, "config", ConfigError), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping of sections, not a {type(data).__name__}")
    return data


def check_argument(name: str, value: Any, ftype: Any) -> Any:
    """``value`` if annotation ``ftype`` accepts it (``Count``, ``Positive``, ``Seed``, ... or ``| None``), else a
    one-line ConfigError naming ``name``: a function's arguments checked as strictly as config fields are."""
    try:
        return _type_adapter(ftype).validate_python(value)
    except pydantic.ValidationError as e:
        raise ConfigError(_explain(name, value, ftype, e.errors()[0])) from None


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write a config as YAML, atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe_config(cls: type = RunConfig) -> str:
    """Every config key with its default, type, choices or range, and the families (or commands) it is
    limited to, one per line: the listing of ``lmlab train --help`` and ``lmlab finetune ... --help``."""
    return "\n".join(_describe_lines(cls, "", ""))


# ---------------------------------------------------------------------------------------------
# building and checking single values


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Dataclass ``cls`` from mapping ``data``, each value checked against its field's annotation."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(_unknown_key_message(prefix + str(key), [prefix + k for k in names]))
        if dataclasses.is_dataclass(hints[key]):
            values[key] = _build(hints[key], value, prefix + key + ".")
        else:
            values[key] = _check_value(cls, key, value, prefix + key)
    return cls(**values)


def _check_value(cls: type, name: str, value: Any, key: str) -> Any:
    """``value`` as field ``name`` of ``cls`` takes it (an int becomes a float), else a ConfigError for ``key``."""
    try:
        return _adapter(cls, name).validate_python(value)
    except pydantic.ValidationError as e:
        raise ConfigError(_explain(key, value, _hints(cls)[name], e.errors()[0])) from None


_STRICT = ConfigDict(strict=True, allow_inf_nan=False)


@functools.cache
def _adapter(cls: type, name: str) -> TypeAdapter:
    """A strict pydantic validator of one field (no NaN or infinity); a float field also takes a number
    written as text, because PyYAML reads ``3e-4`` (no dot) as a string."""
    ftype = _hints(cls)[name]
    if _spec(ftype).base is float:
        ftype = Annotated[ftype, BeforeValidator(_number_from_text)]
    return TypeAdapter(ftype, config=_STRICT)


_TYPE_ADAPTERS: dict[str, TypeAdapter] = {}


def _type_adapter(ftype: Any) -> TypeAdapter:
    """A strict validator of annotation ``ftype`` (no NaN or infinity), made once per annotation."""
    key = repr(ftype)
    if key not in _TYPE_ADAPTERS:
        _TYPE_ADAPTERS[key] = TypeAdapter(ftype, config=_STRICT)
    return _TYPE_ADAPTERS[key]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _number_from_text(value: Any) -> Any:
    """``float(value)`` for text that spells a number ("3e-4", "nan"), anything else as it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


_BOUNDS = ("gt", "ge", "lt", "le", "min_length")


class _Spec(typing.NamedTuple):
    """What a field annotation accepts, unpacked for messages and ``describe_config``."""

    base: Any  # int, float, str, bool, or a Literal
    choices: list[str]  # of a Literal, or a FieldInfo description "a | b | c"; [] when free
    bounds: dict[str, Any]  # gt, ge, lt, le, min_length
    nullable: bool


def _spec(ftype: Any) -> _Spec:
    """Unpack ``T``, ``Annotated[T, Field(...)]``, ``Literal[...]``, each optionally ``| None``."""
    args = typing.get_args(ftype) if typing.get_origin(ftype) in (typing.Union, types.UnionType) else (ftype,)
    (base,) = [a for a in args if a is not type(None)]
    bounds, choices = {}, []
    if typing.get_origin(base) is Annotated:
        base, *infos = typing.get_args(base)
        for info in infos:
            choices = info.description.split(" | ") if info.description else choices
            for constraint in info.metadata:
                bounds.update({k: getattr(constraint, k) for k in _BOUNDS if hasattr(constraint, k)})
    if typing.get_origin(base) is Literal:
        choices = [str(c) for c in typing.get_args(base)]
    return _Spec(base, choices, bounds, type(None) in args)


def _type_text(ftype: Any) -> str:
    """``int >= 1 or null``, ``float in [0, 1)``, ``cosine | linear | constant | step``, ..."""
    spec = _spec(ftype)
    if spec.choices:
        return " | ".join(spec.choices + ["null"] * spec.nullable)
    if spec.bounds.get("min_length"):
        return "non-empty str"
    return f"{spec.base.__name__} {_range_text(spec.bounds)}".strip() + " or null" * spec.nullable


def _range_text(bounds: dict[str, Any]) -> str:
    """``>= 1``, ``> 0``, ``in [0, 1)``, ... for pydantic's gt/ge/lt/le."""
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = (bounds["le"], "]") if "le" in bounds else (bounds["lt"], ")") if "lt" in bounds else None
    if low and high:
        return f"in {low[0]}{_number(low[1])}, {_number(high[0])}{high[1]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {_number(low[1])}"
    if high:
        return f"{'<=' if high[1] == ']' else '<'} {_number(high[0])}"
    return ""


def _number(bound: float) -> str:
    """A range bound as written: an int in full, a float short (``0.5``, ``1e-05``)."""
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _explain(key: str, value: Any, ftype: Any, error: dict) -> str:
    """One line for pydantic's first ``error`` about ``value`` at ``key``: the value, and what would do."""
    spec, kind = _spec(ftype), error["type"]
    if spec.choices:
        return _not_one_of(key, value, spec.choices + ["null"] * spec.nullable)
    if kind == "finite_number":
        return f"{key} must be a finite number, got {float(value)}"
    if kind in _RANGE_ERRORS:
        return f"{key} must be {_range_text(spec.bounds)}, got {value!r}"
    if kind == "string_too_short":
        return f"{key} must not be empty"
    return f"{key} expects {spec.base.__name__}{' or null' * spec.nullable}, got {value!r}"


def _not_one_of(key: str, value: Any, choices: list[str]) -> str:
    close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key} {value!r} is not one of {', '.join(choices)}{hint}"


# ---------------------------------------------------------------------------------------------
# rules across fields


def _check_rules(cfg: Any, prefix: str) -> None:
    """Apply the cross-field rules of ``cfg``'s sections, then its own."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_rules(value, prefix + f.name + ".")
    rule = _RULES.get(type(cfg))
    if rule is not None:
        rule(cfg, prefix)


def _is_set(cfg: Any, f: dataclasses.Field) -> bool:
    """Whether field ``f`` of ``cfg`` holds a value of its own: not None and not the default."""
    return getattr(cfg, f.name) not in (None, f.default)


def _foreign_fields(cfg: Any, where: str) -> list[dataclasses.Field]:
    """The fields of ``cfg`` that are set though marked ``only(...)`` for places other than ``where``."""
    return [f for f in dataclasses.fields(cfg) if where not in f.metadata.get("only", (where,)) and _is_set(cfg, f)]


def _check_families(cfg: Any, prefix: str = "") -> None:
    """Refuse a model field set for a family it does not apply to (``model.init_range`` on a GPT).

    Only for what users write (``load_config``): model configs saved by lmlab hold values it filled in
    itself whatever the family (the trainer records reset_token for every family, the bert preset
    sets tie_embeddings), and must keep loading through ``from_dict``.
    """
    if isinstance(cfg, ModelConfig):
        for f in _foreign_fields(cfg, cfg.family):
            raise ConfigError(f"{prefix}{f.name} applies to {prefix}family {', '.join(f.metadata['only'])} only, "
                              f"not {cfg.family}")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_families(value, prefix + f.name + ".")


def _model_rules(m: ModelConfig, p: str) -> None:
    """Shapes that fit together and choices that fit the family: what the model constructors assume."""
    if m.family in ("rnn_seq2seq", "word2vec"):  # no heads: attention with one score per source token; none
        return
    if m.family in RECURRENT:
        if m.tie_embeddings and m.d_ff not in (None, m.d_model):
            raise ConfigError(f"{p}tie_embeddings needs {p}d_ff ({m.d_ff}) equal to {p}d_model ({m.d_model})")
        return
    presets = PRESETS[m.family]
    if m.preset is not None and m.preset not in presets:
        raise ConfigError(f"{p}preset {m.preset!r} is not a {m.family} preset; choose {' or '.join(presets)}")
    if m.d_model % m.n_head:
        raise ConfigError(f"{p}d_model {m.d_model} is not divisible by {p}n_head {m.n_head}")
    if m.n_kv_head is not None and m.n_head % m.n_kv_head:
        raise ConfigError(f"{p}n_head {m.n_head} is not divisible by {p}n_kv_head {m.n_kv_head}")
    if m.family == "encoder" and m.pos_emb == "rope" and not m.pre_norm:
        raise ConfigError(f"{p}pos_emb rope needs {p}pre_norm: true for family encoder (post-norm BERT layers have "
                          "learned positions)")
    if m.family == "encoder" and m.norm not in (None, "layernorm"):
        raise ConfigError(f"{p}norm {m.norm!r} does not fit family encoder: it has layernorm (BERT)")
    pos_emb = m.pos_emb or PRESET_POS_EMB[m.preset or presets[0]]
    if m.family == "seq2seq":
        _seq2seq_rules(m, p, pos_emb)
    if pos_emb == "rope":
        if (m.d_model // m.n_head) % 2:
            raise ConfigError(f"{p}pos_emb rope needs an even head size, but {p}d_model / {p}n_head is "
                              f"{m.d_model // m.n_head}")
        if m.rope_scaling == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
            raise ConfigError(f"{p}rope_high_freq_factor must be above {p}rope_low_freq_factor for llama3 scaling")
        return
    for f in dataclasses.fields(m):
        if f.name.startswith("rope_") and _is_set(m, f):
            raise ConfigError(f"{p}{f.name} needs rotary positions ({p}pos_emb rope or {p}preset llama), "
                              f"but {p}pos_emb is {pos_emb}")


def _seq2seq_rules(m: ModelConfig, p: str, pos_emb: str) -> None:
    """A decoder's heads that divide its width; a BERT encoder beside a decoder of the same kind of blocks."""
    if m.n_dec_head is not None:
        if m.d_model % m.n_dec_head and not m.encoder_init:  # encoder_init: the width is the pretrained one's
            raise ConfigError(f"{p}d_model {m.d_model} is not divisible by {p}n_dec_head {m.n_dec_head}")
        if pos_emb == "rope" and m.n_dec_head != m.n_head:
            raise ConfigError(f"{p}n_dec_head needs learned positions (encoder and decoder share one rotary table)")
    if (m.encoder_preset or m.encoder_init) and (pos_emb, m.norm or "layernorm") != ("learned", "layernorm"):
        raise ConfigError(f"{p}encoder_preset bert (and {p}encoder_init) needs learned positions and layernorm "
                          f"({p}preset gpt2), not pos_emb {pos_emb} / norm {m.norm}")


def _train_rules(t: TrainConfig, p: str) -> None:
    """A schedule that makes sense, and a carried state only where it can work."""
    if t.min_lr is not None and t.min_lr > t.lr:
        raise ConfigError(f"{p}min_lr {t.min_lr:g} is above {p}lr {t.lr:g}")
    if t.epochs is None and t.warmup_steps >= t.max_steps:
        raise ConfigError(f"{p}warmup_steps {t.warmup_steps} must be less than {p}max_steps {t.max_steps}")
    if t.carry_state and (t.batching != "sequential" or t.grad_accum != 1):
        raise ConfigError(f"{p}carry_state needs {p}batching=sequential and {p}grad_accum=1")
    if t.optimizer == "muon" and t.distributed == "fsdp":
        raise ConfigError(f"{p}optimizer muon needs whole matrices: use {p}distributed ddp, not fsdp")
    if t.dp.enabled:
        _dp_rules(t, p)


def _dp_rules(t: TrainConfig, p: str) -> None:
    """What DP-SGD cannot run with: each step is one Poisson-sampled batch whose examples have their own
    gradients, in one process, uncompiled (Opacus' hooks), in fp32 or bf16."""
    if t.dp.target_epsilon is not None and t.dp.noise_multiplier is not None:
        raise ConfigError(f"{p}dp: give {p}dp.target_epsilon or {p}dp.noise_multiplier, not both")
    refused = {"grad_accum": t.grad_accum > 1, "compile": t.compile, "carry_state": t.carry_state,
               "activation_checkpointing": t.activation_checkpointing, "precision": t.precision == "fp16"}
    why = {"grad_accum": "a step is one Poisson-sampled batch; set train.batch_size to the expected batch instead",
           "compile": "Opacus' per-example gradient hooks do not run under torch.compile",
           "carry_state": "a carried state ties examples together, so they have no gradients of their own",
           "activation_checkpointing": "recomputed activations would be recorded twice by Opacus' hooks",
           "precision": "fp16's loss scaling does not fit per-example clipping; use fp32 or bf16"}
    for name, bad in refused.items():
        if bad:
            raise ConfigError(f"{p}dp does not work with {p}{name} {getattr(t, name)!r}: {why[name]}")


def _run_rules(r: RunConfig, p: str) -> None:
    """What ``lmlab train`` can train: a language model (an encoder as a masked one, the mlm fields for it
    alone; an encoder-decoder on pairs, the seq2seq fields for it alone), with a carried state only if it
    has one."""
    for f in _foreign_fields(r.mlm, r.model.family):
        raise ConfigError(f"{p}mlm.{f.name} applies to masked-LM pretraining ({p}model.family encoder) only, "
                          f"not {r.model.family}")
    if r.mlm.objective == "mlm":
        for f in dataclasses.fields(r.mlm):
            if f.name in ("generator_layers", "disc_weight") and _is_set(r.mlm, f):
                raise ConfigError(f"{p}mlm.{f.name} applies to {p}mlm.objective electra, not mlm")
    if r.mlm.objective == "electra" and r.train.distributed == "fsdp":
        raise ConfigError(f"{p}mlm.objective electra runs under torchrun with {p}train.distributed ddp, not fsdp "
                          f"(its evaluation calls the generator and discriminator apart)")
    for f in _foreign_fields(r.seq2seq, r.model.family):
        raise ConfigError(f"{p}seq2seq.{f.name} applies to {p}model.family {', '.join(SEQ2SEQ)} only, "
                          f"not {r.model.family}")
    for f in _foreign_fields(r.word2vec, r.model.family):
        raise ConfigError(f"{p}word2vec.{f.name} applies to {p}model.family word2vec only, not {r.model.family}")
    if r.model.family in SEQ2SEQ:
        for name in ("max_source_len", "max_target_len"):
            limit = getattr(r.seq2seq, name)
            if limit is not None and limit > r.model.block_size:
                raise ConfigError(f"{p}seq2seq.{name} {limit} is above {p}model.block_size {r.model.block_size} "
                                  f"(the model's longest source and target)")
        if r.train.batching != "random":
            raise ConfigError(f"{p}train.batching {r.train.batching!r} does not apply to pairs; an encoder-decoder "
                              f"draws random (length-grouped) batches")
        if r.seq2seq.encoder_lr is not None and not (r.model.encoder_preset or r.model.encoder_init):
            raise ConfigError(f"{p}seq2seq.encoder_lr is for a BERT encoder ({p}model.encoder_init or "
                              f"{p}model.encoder_preset bert)")
    if r.train.carry_state and r.model.family not in RECURRENT:
        raise ConfigError(f"{p}train.carry_state needs a model that carries a state ({p}model.family "
                          f"{', '.join(RECURRENT)}), not {r.model.family}")


def _sft_rules(s: SftConfig, p: str) -> None:
    """Instruction tuning has no classifier head: the classify-only model fields must stay unset."""
    for f in _foreign_fields(s.model, "sft"):
        raise ConfigError(f"{p}model.{f.name} applies to lmlab finetune classify only")


def _classify_rules(c: ClassifyConfig, p: str) -> None:
    """R-Drop feeds each example twice, which DP-SGD would count as two examples."""
    if c.train.dp.enabled and c.model.rdrop > 0:
        raise ConfigError(f"{p}model.rdrop does not work with {p}train.dp: each example would count twice")


def _serve_rules(s: ServeConfig, p: str) -> None:
    """The default completion length must be one the server allows."""
    if s.default_max_tokens > s.max_new_tokens:
        raise ConfigError(f"{p}default_max_tokens {s.default_max_tokens} is above {p}max_new_tokens {s.max_new_tokens}")


_RULES = {ModelConfig: _model_rules, TrainConfig: _train_rules, RunConfig: _run_rules, SftConfig: _sft_rules,
          ServeConfig: _serve_rules, ClassifyConfig: _classify_rules}


# ---------------------------------------------------------------------------------------------
# overrides, listings, messages


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


def _describe_lines(cls: type, prefix: str, indent: str) -> list[str]:
    """``describe_config``'s lines for ``cls``: a heading per section, then ``key = default  (type)``."""
    lines = []
    for f in dataclasses.fields(cls):
        ftype = _hints(cls)[f.name]
        if dataclasses.is_dataclass(ftype):
            lines += [f"{indent}{f.name}:", *_describe_lines(ftype, prefix + f.name + ".", indent + "  ")]
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        where = f"; {', '.join(f.metadata['only'])} only" if "only" in f.metadata else ""
        lines.append(f"{indent}{prefix}{f.name} = {default!r}  ({_type_text(ftype)}{where})")
    return lines


def _unknown_key_message(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"
    return f"unknown config key {key!r}{hint}"



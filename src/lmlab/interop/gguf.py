"""GGUF export for llama.cpp: an lmlab language model and its tokenizer in one ``.gguf`` file.

    lmlab GPT, preset gpt2   ->  general.architecture "gpt2"  (learned positions, LayerNorm, GELU, biases)
    lmlab GPT, preset llama  ->  general.architecture "llama" (RoPE with linear or llama3 scaling, RMSNorm,
                                 SwiGLU, grouped-query attention)

The file is what llama.cpp's own converter (convert_hf_to_gguf.py) writes for the same model: the
same metadata keys, tensor names and layouts (llama's Q and K rows permuted from the "rotate half"
RoPE layout lmlab and transformers use to the interleaved pairs llama.cpp rotates), 1-D tensors and
the position table kept in f32. That converter cannot take an lmlab model itself: it recognises a
BPE pre-tokenizer by hashing the token ids a known vocabulary gives for a fixed text, so a newly
trained vocabulary is unknown to it by construction. Here the pre-tokenizer is named directly.

Tokenizer: lmlab's byte-level BPE (and the byte tokenizer, BPE without merges) is llama.cpp's "gpt2"
vocabulary type with pre-tokenizer "gpt-2", whose regex is exactly the one of the ByteLevel
pre-tokenizer from `tokenizers` (``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``),
so llama.cpp tokenizes text to the same ids (tests/test_interop_gguf.py checks it where
llama-cpp-python is installed). The char tokenizer (one token per character, <0xXX> byte tokens for
the others) is llama.cpp's SentencePiece-style "llama" vocabulary without merges, with the space
spelled "▁" as llama.cpp looks it up: the same ids for every text without a literal "▁" (U+2581),
which llama.cpp reads as a space. The word tokenizer (newlines normalised to <eos>, unknown words to
<unk>) has no llama.cpp counterpart and is refused. Weights: f32, f16, or q8_0 (blocks of 32 values
sharing one f16 scale, gguf.quants).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn as nn

from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import ConfigError
from lmlab.interop.hf import Unsupported, eos_id, hf_architecture
from lmlab.models.heads import SequenceClassifier
from lmlab.models.layers import rope_frequencies
from lmlab.models.lora import base_view, has_lora, merge_lora, unmerge_lora
from lmlab.runs import atomic_file

log = logging.getLogger(__name__)

DTYPES = ("f32", "f16", "q8_0")
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for the ByteLevel regex (llama-vocab.cpp: LLAMA_VOCAB_PRE_TYPE_GPT2)
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_QUANT_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                "q8_0": gguf.GGMLQuantizationType.Q8_0}
# llama.cpp refuses a gpt2 vocabulary without merges; a byte tokenizer has none. This one never
# applies: its left side is two symbols, and no merge makes a two-symbol token.
_INERT_MERGE = "ĠĠ Ġ"
SPACE = "\u2581"  # how llama.cpp's SentencePiece-style vocabularies spell a space ("▁")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


# ---------------------------------------------------------------------------------------------
# tensors: (GGUF name, tensor) with nn.Linear weights as they are: (out, in) is ggml's {in, out}


def _permute_for_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Q or K rows of each head from the "rotate half" order (i pairs with i + d/2) to interleaved
    pairs (2i, 2i+1), the order llama.cpp's RoPE rotates (convert_hf_to_gguf.py: LlamaModel.permute)."""
    rows = weight.shape[0]
    # (n_head, 2, d/2, in): the two halves of each head -> (n_head, d/2, 2, in): the halves interleaved
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _gpt2_tensors(state: dict[str, torch.Tensor], cfg) -> list[tuple[str, torch.Tensor]]:
    out = [("token_embd.weight", state["tok_emb.weight"]), ("position_embd.weight", state["pos_emb.weight"])]
    for i in range(cfg.n_layer):
        ours, blk = f"blocks.{i}.", f"blk.{i}."
        for o, g in (("norm1", "attn_norm"), ("attn.qkv", "attn_qkv"), ("attn.proj", "attn_output"),
                     ("norm2", "ffn_norm"), ("mlp.up", "ffn_up"), ("mlp.down", "ffn_down")):
            out += [(f"{blk}{g}.weight", state[f"{ours}{o}.weight"]), (f"{blk}{g}.bias", state[f"{ours}{o}.bias"])]
    out += [("output_norm.weight", state["norm_f.weight"]), ("output_norm.bias", state["norm_f.bias"])]
    if not cfg.tie_embeddings:  # tied: llama.cpp reuses token_embd as the output layer
        out.append(("output.weight", state["lm_head.weight"]))
    return out


def _llama_tensors(state: dict[str, torch.Tensor], cfg) -> list[tuple[str, torch.Tensor]]:
    head_dim = cfg.d_model // cfg.n_head
    out = [("token_embd.weight", state["tok_emb.weight"])]
    for i in range(cfg.n_layer):
        ours, blk = f"blocks.{i}.", f"blk.{i}."
        q, k, v = state[f"{ours}attn.qkv.weight"].split(
            [cfg.n_head * head_dim, cfg.n_kv_head * head_dim, cfg.n_kv_head * head_dim])
        gate, up = state[f"{ours}mlp.up.weight"].chunk(2)  # lmlab fuses SwiGLU's gate (first) and up
        out += [(f"{blk}attn_norm.weight", state[f"{ours}norm1.weight"]),
                (f"{blk}attn_q.weight", _permute_for_rope(q, cfg.n_head)),
                (f"{blk}attn_k.weight", _permute_for_rope(k, cfg.n_kv_head)),
                (f"{blk}attn_v.weight", v),
                (f"{blk}attn_output.weight", state[f"{ours}attn.proj.weight"]),
                (f"{blk}ffn_norm.weight", state[f"{ours}norm2.weight"]),
                (f"{blk}ffn_gate.weight", gate), (f"{blk}ffn_up.weight", up),
                (f"{blk}ffn_down.weight", state[f"{ours}mlp.down.weight"])]
    out.append(("output_norm.weight", state["norm_f.weight"]))
    if not cfg.tie_embeddings:
        out.append(("output.weight", state["lm_head.weight"]))
    if cfg.rope_scaling == "llama3":  # llama.cpp divides each frequency by its factor
        out.append(("rope_freqs.weight", _rope_factors(cfg)))
    return out


def _rope_args(cfg, scaled: bool) -> tuple:
    head_dim = cfg.d_model // cfg.n_head
    if not scaled:
        return head_dim, cfg.rope_theta
    return (head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor, cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor, cfg.rope_original_context or cfg.block_size)


def _rope_factors(cfg) -> torch.Tensor:
    """llama3 RoPE scaling as llama.cpp stores it: unscaled frequency / scaled frequency, per pair."""
    return rope_frequencies(*_rope_args(cfg, False)) / rope_frequencies(*_rope_args(cfg, True))


def _stored(name: str, tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The array to write for ``tensor`` and its GGML type: f32 for 1-D tensors, norms and the position
    table (as llama.cpp's converter keeps them), else ``dtype``; f16 where q8_0's blocks of 32 do not
    divide a row."""
    data = tensor.detach().cpu().float().contiguous().numpy()
    qtype = _QUANT_TYPES[dtype]
    if data.ndim <= 1 or name.endswith("_norm.weight") or name == "position_embd.weight":
        qtype = gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError as e:
        log.warning("%s: %s; stored as f16", name, e)
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


# ---------------------------------------------------------------------------------------------
# tokenizer


def _byte_level_spec(tokenizer: Tokenizer) -> dict:
    """The tokenizer's JSON, checked to be a byte-level BPE that llama.cpp's "gpt-2" pre-tokenizer reproduces."""
    spec = json.loads(tokenizer.tk.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    plain_bpe = (model.get("type") == "BPE" and not model.get("byte_fallback") and model.get("dropout") is None
                 and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
                 and not model.get("ignore_merges"))
    gpt2_pre = (pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and pre.get("use_regex", True))
    if not (plain_bpe and gpt2_pre and spec.get("normalizer") is None):
        raise Unsupported("this tokenizer is not the byte-level BPE of GPT-2 (BPE model, ByteLevel pre-tokenizer "
                          "without prefix space, no normalizer), the one llama.cpp's pre-tokenizer 'gpt-2' reproduces")
    return spec


def _char_spec(tokenizer: Tokenizer) -> dict:
    """The tokenizer's JSON, checked to be lmlab's char tokenizer with no token llama.cpp would confuse with a space."""
    spec = json.loads(tokenizer.tk.to_str())
    pre = spec.get("pre_tokenizer") or {}
    one_per_character = pre.get("pattern") == {"Regex": "[\\s\\S]"} and pre.get("behavior") == "Isolated"
    if spec.get("normalizer") is not None or not one_per_character:
        raise Unsupported("this character tokenizer normalises or splits text unlike lmlab's char tokenizer")
    if SPACE in spec["model"]["vocab"]:
        raise Unsupported(f"the char tokenizer has a token {SPACE!r} (U+2581), which llama.cpp reads as a space")
    return spec


def _vocabulary(tokenizer: Tokenizer, spec: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id (``vocab_size`` of them) and their llama.cpp token types: special tokens are control
    tokens, ``<0xXX>`` byte tokens (char) byte tokens. Ids the tokenizer does not use (a model vocabulary
    larger than the tokenizer's) become unused ``[PADi]`` tokens, as in llama.cpp's converter."""
    vocab = tokenizer.tk.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise Unsupported(f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} "
                          "embedding rows")
    added = {t["content"]: t for t in spec.get("added_tokens") or []}
    byte_fallback = spec["model"].get("byte_fallback")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i] = token
        if token in added:
            types[i] = gguf.TokenType.CONTROL if added[token].get("special") else gguf.TokenType.USER_DEFINED
        elif byte_fallback and _BYTE_TOKEN.fullmatch(token):
            types[i] = gguf.TokenType.BYTE
        else:
            types[i] = gguf.TokenType.NORMAL
    return tokens, [int(t) for t in types]


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    kind = tokenizer.kind
    if kind == "word":
        raise Unsupported("a word tokenizer has no llama.cpp counterpart (it turns newlines into <eos> and unknown "
                          "words into <unk>); GGUF export takes lmlab's bpe, byte and char tokenizers")
    if kind == "char":
        spec = _char_spec(tokenizer)
        tokens, types = _vocabulary(tokenizer, spec, vocab_size)
        writer.add_tokenizer_model("llama")  # SentencePiece-style: characters, then <0xXX> bytes
        writer.add_token_list([SPACE if t == " " else t for t in tokens])
        writer.add_token_types(types)
        writer.add_add_space_prefix(False)
    else:
        spec = _byte_level_spec(tokenizer)
        tokens, types = _vocabulary(tokenizer, spec, vocab_size)
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges") or []]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(PRE_TOKENIZER)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges or [_INERT_MERGE])
    eos = eos_id(tokenizer)
    if eos is not None:  # lmlab's documents end with it and begin after it (llama.cpp's gpt2 default bos is id 11)
        writer.add_bos_token_id(eos)
        writer.add_eos_token_id(eos)
        writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)  # lmlab puts nothing before a prompt
    writer.add_add_eos_token(False)


# ---------------------------------------------------------------------------------------------
# metadata and the file


def _architecture(model: nn.Module) -> str:
    """gpt2 or llama: the llama.cpp architecture of ``model``, or Unsupported naming what does not fit."""
    if isinstance(model, SequenceClassifier):
        raise Unsupported("a classifier has no llama.cpp counterpart (GGUF export takes language models: gpt2 and "
                          "llama presets)")
    cfg = model.config
    if cfg.family != "gpt":
        raise Unsupported(f"a {cfg.family} model has no llama.cpp counterpart (GGUF export takes GPT models: gpt2 "
                          "and llama presets)")
    arch = hf_architecture(model)
    if arch == "gpt2" and cfg.mlp != "gelu":
        raise Unsupported("GPT-2 with exact GELU (llama.cpp's GPT-2 uses the tanh approximation)")
    return arch


def _add_hyperparameters(writer: gguf.GGUFWriter, cfg, arch: str) -> None:
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.d_model // cfg.n_head)
    writer.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_factor)


def export_gguf(model: nn.Module, tokenizer: Tokenizer, path: str | os.PathLike, dtype: str = "f32",
                name: str | None = None) -> Path:
    """Write ``model`` (a GPT, gpt2 or llama preset) and ``tokenizer`` as one GGUF file that llama.cpp
    runs, atomically; LoRA adapters are merged into the weights (the caller's model is left unmerged).

    ``dtype``: f32, f16 or q8_0 for the matrices (see the module docstring). ``name`` is general.name.
    Anything llama.cpp would compute differently (a classifier, an RNN, exact GELU in GPT-2, a word
    tokenizer) is refused with an Unsupported error naming it.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    arch = _architecture(model)
    if has_lora(model):
        merge_lora(model)
        try:
            with base_view(model):
                return export_gguf(model, tokenizer, path, dtype, name)
        finally:
            unmerge_lora(model)
    cfg = model.config
    state = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    tensors = (_gpt2_tensors if arch == "gpt2" else _llama_tensors)(state, cfg)
    path = Path(path)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name or path.stem)
        writer.add_file_type(_FILE_TYPES[dtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # as llama.cpp's converter, whatever the dtype
        _add_hyperparameters(writer, cfg, arch)
        _add_tokenizer(writer, tokenizer, cfg.vocab_size)
        for tensor_name, tensor in tensors:
            data, qtype = _stored(tensor_name, tensor, dtype)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


__all__ = ["DTYPES", "PRE_TOKENIZER", "export_gguf"]

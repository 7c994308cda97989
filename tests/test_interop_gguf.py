"""GGUF export: every key and tensor read back with the gguf package; RoPE layout as llama.cpp rotates;
the tokenizer's pre-tokenizer; refusals; the CLI. Where llama-cpp-python is installed (the llama-cpp
extra), llama.cpp itself runs the files: same tokens for text, same greedy generation as lmlab."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lmlab.cli import main  # noqa: E402
from lmlab.config import ModelConfig  # noqa: E402
from lmlab.data.tokenizer import train_tokenizer  # noqa: E402
from lmlab.generate.engine import generate_tokens  # noqa: E402
from lmlab.generate.sampling import SamplingParams  # noqa: E402
from lmlab.interop.gguf import export_gguf  # noqa: E402
from lmlab.interop.hf import Unsupported  # noqa: E402
from lmlab.models.heads import ClassifierConfig, SequenceClassifier  # noqa: E402
from lmlab.models.layers import apply_rope, rope_tables  # noqa: E402
from lmlab.models.registry import build_model  # noqa: E402
from lmlab.train.checkpoint import save_checkpoint  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog. It's 2024, isn't it? We'll see: 12345 + 6789 = 19134!\n",
         "  Indented   lines,\ttabs and\n\nblank lines; émigré café naïve, Ελληνικά, 日本語のテキスト 😀 'quoted' \"x\".\n"] * 20
# text that exercises every branch of the GPT-2 pre-tokenizer regex
TRICKY = ("Hello world! It's they're we've I'm you'll he'd 'S CAPS'LL  two  spaces   three\n\n\tnewline-tab "
          "123 4567 x1y2 3.14 ... ?!? ¿Qué? naïve ﬁ Ελληνικά 日本語 😀😀 a\u00a0b\u2003c end   ")


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer("bpe", TEXTS, vocab_size=400)


def tiny(preset: str, vocab_size: int, seed: int = 0, **extra):
    """A small random GPT of ``preset``; init_std 0.2 makes its logits far apart (a clear greedy choice)."""
    torch.manual_seed(seed)
    if preset == "llama":
        extra = {"n_kv_head": 2, **extra}
    cfg = ModelConfig(preset=preset, n_layer=2, n_head=4, d_model=64, block_size=64, vocab_size=vocab_size,
                      init_std=0.2, **extra)
    return build_model(cfg).eval()


def read(path):
    """(metadata {key: value}, tensors {name: ReaderTensor}) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Interleaved RoPE pairs back to "rotate half" (the inverse of llama.cpp's converter's permute)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def expected_tensors(model) -> dict[str, np.ndarray]:
    """What each GGUF tensor must hold, in lmlab's terms (llama's Q/K in lmlab's order: compared after unpermute)."""
    cfg, s = model.config, {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": s["tok_emb.weight"], "output_norm.weight": s["norm_f.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = s["lm_head.weight"]
    for i in range(cfg.n_layer):
        b, m = f"blk.{i}.", f"blocks.{i}."
        out.update({f"{b}attn_norm.weight": s[f"{m}norm1.weight"], f"{b}ffn_norm.weight": s[f"{m}norm2.weight"],
                    f"{b}attn_output.weight": s[f"{m}attn.proj.weight"], f"{b}ffn_down.weight": s[f"{m}mlp.down.weight"]})
        if cfg.preset == "gpt2":
            out.update({f"{b}attn_qkv.weight": s[f"{m}attn.qkv.weight"], f"{b}ffn_up.weight": s[f"{m}mlp.up.weight"]})
            for g, o in (("attn_norm", "norm1"), ("ffn_norm", "norm2"), ("attn_qkv", "attn.qkv"),
                         ("attn_output", "attn.proj"), ("ffn_up", "mlp.up"), ("ffn_down", "mlp.down")):
                out[f"{b}{g}.bias"] = s[f"{m}{o}.bias"]
        else:
            hd = cfg.d_model // cfg.n_head
            q, k, v = np.split(s[f"{m}attn.qkv.weight"], [cfg.n_head * hd, (cfg.n_head + cfg.n_kv_head) * hd])
            gate, up = np.split(s[f"{m}mlp.up.weight"], 2)
            out.update({f"{b}attn_q.weight": q, f"{b}attn_k.weight": k, f"{b}attn_v.weight": v,
                        f"{b}ffn_gate.weight": gate, f"{b}ffn_up.weight": up})
    if cfg.preset == "gpt2":
        out.update({"position_embd.weight": s["pos_emb.weight"], "output_norm.bias": s["norm_f.bias"]})
    return out


def expected_keys(model, tokenizer, dtype: str) -> dict:
    cfg = model.config
    arch = cfg.preset
    keys = {"general.architecture": arch, "general.name": "model",
            "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7}[dtype], "general.quantization_version": 2,
            f"{arch}.context_length": 64, f"{arch}.embedding_length": 64, f"{arch}.block_count": 2,
            f"{arch}.feed_forward_length": cfg.d_ff, f"{arch}.attention.head_count": 4,
            f"{arch}.attention.head_count_kv": 4 if arch == "gpt2" else 2,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": [tokenizer.tk.id_to_token(i) for i in range(tokenizer.vocab_size)],
            "tokenizer.ggml.token_type": [3 if i == tokenizer.eot_id else 1 for i in range(tokenizer.vocab_size)],
            "tokenizer.ggml.merges": [" ".join(m) for m in json.loads(tokenizer.tk.to_str())["model"]["merges"]],
            "tokenizer.ggml.bos_token_id": tokenizer.eot_id, "tokenizer.ggml.eos_token_id": tokenizer.eot_id,
            "tokenizer.ggml.padding_token_id": tokenizer.eot_id,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False}
    if arch == "gpt2":
        keys["gpt2.attention.layer_norm_epsilon"] = pytest.approx(1e-5)
    else:
        keys.update({"llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-5), "llama.vocab_size": cfg.vocab_size,
                     "llama.rope.dimension_count": 16, "llama.rope.freq_base": cfg.rope_theta})
    return keys


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_every_key_and_tensor_reads_back(preset, dtype, bpe, tmp_path):
    model = tiny(preset, bpe.vocab_size)
    fields, tensors = read(export_gguf(model, bpe, tmp_path / "model.gguf", dtype))
    assert fields == expected_keys(model, bpe, dtype)
    expected = expected_tensors(model)
    assert sorted(tensors) == sorted(expected)
    for name, want in expected.items():
        t = tensors[name]
        assert list(t.shape) == list(reversed(want.shape)), name  # ggml lists dimensions innermost first
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if preset == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            got = unpermute(got, 4 if "attn_q" in name else 2)
        kept_f32 = want.ndim == 1 or name.endswith("_norm.weight") or name == "position_embd.weight"
        if dtype == "f32" or kept_f32:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, want), name
        elif dtype == "f16":
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, name
            assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), name
        else:  # q8_0: blocks of 32 share one scale amax/127 (stored as f16); each value is off by at most half a step
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
            blocks = want.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(got.reshape(-1, 32) - blocks) <= 0.51 * step + 127 * step * 2**-11), name


def rope_pairs(x: np.ndarray, position: int, theta: float, factors: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's RoPE for the llama architecture (ggml rope mode 0): rotate each adjacent pair
    (x[2i], x[2i+1]) of x (..., d) by position * theta^(-2i/d) / factor_i."""
    d = x.shape[-1]
    freq = theta ** (-np.arange(0, d, 2) / d) / (1 if factors is None else factors)
    cos, sin = np.cos(position * freq), np.sin(position * freq)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


@pytest.mark.parametrize("scaling", [{}, {"rope_scaling": "linear", "rope_factor": 2.0},
                                     {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_context": 64}])
def test_llama_attention_scores_match_llama_cpp_rope(scaling, bpe, tmp_path):
    """Q and K from the file, rotated as llama.cpp rotates them (pairs, scaled by the file's RoPE keys),
    give the attention scores lmlab computes: the permutation and the scaling keys are right."""
    model = tiny("llama", bpe.vocab_size, rope_theta=500.0, **scaling)
    cfg = model.config
    fields, tensors = read(export_gguf(model, bpe, tmp_path / "model.gguf"))
    factors = None
    if cfg.rope_scaling == "linear":
        assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == 2.0
        factors = np.full(8, 2.0)
    elif cfg.rope_scaling == "llama3":
        factors = tensors["rope_freqs.weight"].data
        assert factors.min() == pytest.approx(1.0) and factors.max() == pytest.approx(8.0)  # both ends of the blend
    else:
        assert "rope_freqs.weight" not in tensors and "llama.rope.scaling.type" not in fields
    x = torch.randn(64)
    wq, wk = tensors["blk.0.attn_q.weight"].data, tensors["blk.0.attn_k.weight"].data
    q_file, k_file = (wq @ x.numpy()).reshape(4, 16), (wk @ x.numpy()).reshape(2, 16)
    q, k, _ = (model.blocks[0].attn.qkv.weight.detach() @ x).split([64, 32, 32])
    cos, sin = rope_tables(16, 64, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor, cfg.rope_low_freq_factor,
                           cfg.rope_high_freq_factor, cfg.rope_original_context)
    for pq, pk in [(0, 0), (5, 3), (40, 1), (63, 62)]:
        ours = apply_rope(q.view(1, 4, 1, 16), cos[pq:pq + 1], sin[pq:pq + 1])[0, :, 0] @ \
            apply_rope(k.view(1, 2, 1, 16), cos[pk:pk + 1], sin[pk:pk + 1])[0, :, 0].T  # (4, 2)
        theirs = rope_pairs(q_file, pq, cfg.rope_theta, factors) @ rope_pairs(k_file, pk, cfg.rope_theta, factors).T
        assert np.allclose(ours.numpy(), theirs, atol=1e-4), (pq, pk)


def test_lmlab_pre_tokenizer_is_llama_cpps_gpt2_regex(bpe):
    """llama.cpp's pre-tokenizer "gpt-2" splits with this regex (llama-vocab.cpp, unicode.cpp's
    unicode_regex_split_custom_gpt2, which adds the final \\s+); lmlab's ByteLevel splits the same."""
    regex = pytest.importorskip("regex")
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
    to_bytes = {c: b for b, c in enumerate(bytes_to_unicode_chars())}
    for text in [TRICKY, *TEXTS[:2]]:
        ours = [bytes(to_bytes[c] for c in piece).decode("utf-8")
                for piece, _ in bpe.tk.pre_tokenizer.pre_tokenize_str(text)]
        assert ours == gpt2.findall(text)


def bytes_to_unicode_chars() -> list[str]:
    from lmlab.data.tokenizer import bytes_to_unicode
    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def test_byte_tokenizer_gets_a_merge_that_never_applies(tmp_path):
    tok = train_tokenizer("byte", [])
    fields, _ = read(export_gguf(tiny("gpt2", tok.vocab_size), tok, tmp_path / "byte.gguf"))
    assert fields["tokenizer.ggml.merges"] == ["ĠĠ Ġ"]  # llama.cpp needs one; no merge makes the 2-symbol "ĠĠ"
    assert fields["tokenizer.ggml.tokens"][:256] == bytes_to_unicode_chars()


@pytest.fixture(scope="module")
def char():
    return train_tokenizer("char", TEXTS)


def test_char_tokenizer_is_a_sentencepiece_style_vocabulary(char, tmp_path):
    """Characters as normal tokens (the space spelled "▁", as llama.cpp looks it up), <0xXX> as byte tokens."""
    fields, _ = read(export_gguf(tiny("llama", char.vocab_size), char, tmp_path / "char.gguf"))
    tokens = [char.tk.id_to_token(i) for i in range(char.vocab_size)]
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is False
    assert fields["tokenizer.ggml.tokens"] == ["\u2581" if t == " " else t for t in tokens]
    assert fields["tokenizer.ggml.token_type"] == [3 if t == "<|endoftext|>" else 6 if t.startswith("<0x") else 1
                                                   for t in tokens]
    assert "tokenizer.ggml.merges" not in fields and "tokenizer.ggml.pre" not in fields


def test_larger_model_vocabulary_is_padded_with_unused_tokens(bpe, tmp_path):
    fields, tensors = read(export_gguf(tiny("llama", bpe.vocab_size + 3), bpe, tmp_path / "m.gguf"))
    assert fields["tokenizer.ggml.tokens"][-3:] == [f"[PAD{bpe.vocab_size + i}]" for i in range(3)]
    assert fields["tokenizer.ggml.token_type"][-3:] == [5, 5, 5]
    assert list(tensors["token_embd.weight"].shape) == [64, bpe.vocab_size + 3]


def test_unsupported_models_and_tokenizers_are_refused_in_one_line(bpe, tmp_path):
    out = tmp_path / "x.gguf"
    cases = [
        (tiny("gpt2", bpe.vocab_size), train_tokenizer("char", TEXTS + ["\u2581"]), "a token '\u2581' .U.2581."),
        (tiny("gpt2", bpe.vocab_size), train_tokenizer("word", TEXTS), "a word tokenizer has no llama.cpp counterpart"),
        (tiny("gpt2", bpe.vocab_size, mlp="gelu_exact"), bpe, "GPT-2 with exact GELU"),
        (tiny("gpt2", 100), bpe, "the tokenizer has ids up to"),
        (build_model(ModelConfig(family="lstm", n_layer=1, d_model=16, vocab_size=bpe.vocab_size)), bpe,
         "a lstm model has no llama.cpp counterpart"),
        (build_model(ModelConfig(family="encoder", preset="bert", n_layer=1, n_head=2, d_model=16,
                                 vocab_size=bpe.vocab_size)), bpe, "a encoder model has no llama.cpp counterpart"),
        (SequenceClassifier(tiny("gpt2", bpe.vocab_size), ClassifierConfig(labels=["a", "b"], pooling="last")), bpe,
         "a classifier has no llama.cpp counterpart"),
    ]
    for model, tokenizer, fragment in cases:
        with pytest.raises(Unsupported, match=fragment) as e:
            export_gguf(model, tokenizer, out)
        assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporaries left


def test_cli_convert_writes_a_gguf_file_and_guards_it(bpe, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny("llama", bpe.vocab_size), bpe)
    out = tmp_path / "model.gguf"
    assert main(["convert", str(ckpt), str(out), "--dtype", "q8_0"]) == 0
    assert "GGUF file for llama.cpp, q8_0 weights" in capsys.readouterr().out
    assert read(out)[0]["general.file_type"] == 7
    first = out.read_bytes()
    for argv, fragment in [([str(ckpt), str(out)], "already holds a GGUF file; pass --force"),
                           ([str(ckpt), str(tmp_path / "hf"), "--dtype", "f16"], "--dtype applies to GGUF output only"),
                           ([str(ckpt), str(tmp_path / "text.gguf"), "--force"], "is not a GGUF file")]:
        (tmp_path / "text.gguf").write_text("not a model")
        assert main(["convert", *argv]) == 1
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert out.read_bytes() == first and (tmp_path / "text.gguf").read_text() == "not a model"
    assert main(["convert", str(ckpt), str(out), "--force"]) == 0  # f32 now
    assert read(out)[0]["general.file_type"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "model.gguf", "text.gguf"]


# ---------------------------------------------------------------------------------------------
# llama.cpp itself (pip install 'lmlab[llama-cpp]': compiles llama.cpp)


def llama_cpp_model(path, n_ctx=64):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_batch=64, seed=0, logits_all=True,
                           verbose=False)


def llama_cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """n tokens after ``prompt``, each the argmax of llama.cpp's logits (no sampler in between)."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


@pytest.mark.parametrize("preset,extra", [("gpt2", {}), ("gpt2", {"tie_embeddings": False}), ("llama", {}),
                                          ("llama", {"tie_embeddings": True, "rope_scaling": "llama3",
                                                     "rope_factor": 8.0, "rope_original_context": 16}),
                                          ("llama", {"rope_scaling": "linear", "rope_factor": 2.0})])
def test_llama_cpp_generates_the_same_greedy_tokens(preset, extra, bpe, tmp_path):
    pytest.importorskip("llama_cpp")
    model = tiny(preset, bpe.vocab_size, **extra)
    llm = llama_cpp_model(export_gguf(model, bpe, tmp_path / "model.gguf"))
    prompt = bpe.encode(TEXTS[0])[:12]
    ours = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=40, temperature=0.0)))
    assert llama_cpp_greedy(llm, prompt, len(ours)) == ours


@pytest.fixture
def no_repacking(monkeypatch):
    """Models load without llama.cpp's repacked weight buffers (llama.cpp's --no-repack): on a CPU with
    AMX-INT8, llama-cpp-python 0.3.36 crashes (SIGSEGV) in the AMX repacking of q8_0 weights, for llama.cpp's
    own converter's files as for lmlab's."""
    llama_cpp = pytest.importorskip("llama_cpp.llama_cpp")  # the ctypes bindings, as llama_cpp.Llama calls them
    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    monkeypatch.setattr(llama_cpp, "llama_model_default_params", params)


@pytest.mark.parametrize("dtype,tolerance", [("f16", 0.05), ("q8_0", 0.25)])
def test_llama_cpp_runs_f16_and_q8_0_files(dtype, tolerance, bpe, tmp_path, no_repacking):
    """Rounded weights: llama.cpp's next-token logits stay close to lmlab's fp32 ones (relative to their spread)."""
    for preset in ("gpt2", "llama"):
        model = tiny(preset, bpe.vocab_size)
        llm = llama_cpp_model(export_gguf(model, bpe, tmp_path / f"{preset}.gguf", dtype))
        prompt = bpe.encode(TEXTS[1])[:12]
        llm.eval(prompt)
        theirs = np.asarray(llm.scores[llm.n_tokens - 1])
        with torch.no_grad():
            ours = model(torch.tensor([prompt]))[0][0, -1].numpy()
        assert np.abs(theirs - ours).max() <= tolerance * ours.std(), preset
        assert theirs.argmax() == ours.argmax(), preset


@pytest.mark.parametrize("kind", ["bpe", "byte", "char"])
def test_llama_cpp_tokenizes_and_detokenizes_as_lmlab_does(kind, bpe, char, tmp_path):
    """bpe: the pre-tokenizer "gpt-2" and the merges give lmlab's ids; char: characters and byte
    fallback give them; special tokens parse alike; token pieces join to lmlab's text."""
    tokenizer = {"bpe": bpe, "char": char, "byte": train_tokenizer("byte", [])}[kind]
    llm = llama_cpp_model(export_gguf(tiny("gpt2", tokenizer.vocab_size), tokenizer, tmp_path / "model.gguf"))
    for text in [TRICKY, *TEXTS[:2], "a<|endoftext|>b", " leading space", "\n\n"]:
        ids = tokenizer.encode(text, allow_special=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text), text
        assert b"".join(llm.detokenize([i]) for i in ids).decode() == tokenizer.decode(ids), text
    assert llm.token_eos() == tokenizer.eot_id


def test_llama_cpp_generates_with_a_char_tokenizer(char, tmp_path):
    pytest.importorskip("llama_cpp")
    model = tiny("gpt2", char.vocab_size)
    llm = llama_cpp_model(export_gguf(model, char, tmp_path / "model.gguf"))
    prompt = char.encode(TEXTS[1])[:12]
    ours = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=40, temperature=0.0)))
    assert llama_cpp_greedy(llm, prompt, len(ours)) == ours

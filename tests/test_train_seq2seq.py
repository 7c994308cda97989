"""Training encoder-decoders on the one loop (train/seq2seq.py): they learn, resume exactly, accumulate
gradients as one batch does, smooth labels as the formula says, and refuse the wrong data in one line."""

import dataclasses
import json
import math
import random

import pytest
import torch

from lmlab.cli import main
from lmlab.config import RunConfig, load_config
from lmlab.data.pairs import PairShards, make_batch, prepare_pairs
from lmlab.data.tokenizer import train_tokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.train.checkpoint import load_checkpoint
from lmlab.train.lm import pretrain
from lmlab.train.logger import read_metrics
from lmlab.train.seq2seq import Seq2SeqTask, micro_batch, target_loss

from loop_tasks import assert_same_run

LETTERS = "a b c d e f".split()
MODELS = {
    "transformer": "{family: seq2seq, n_layer: 1, n_head: 2, d_model: 32, block_size: 12}",
    "gru": "{family: rnn_seq2seq, cell: gru, attention: luong, n_layer: 1, d_model: 32, block_size: 12}",
}


def write_pairs(folder, name, n, seed):
    """n (source, target) pairs of the copy task: a target is its source, words of a 6-letter alphabet."""
    rng = random.Random(seed)
    sources = [" ".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 5))) for _ in range(n)]
    paths = [folder / f"{name}.src", folder / f"{name}.tgt"]
    for path in paths:
        path.write_text("\n".join(sources) + "\n", encoding="utf-8")
    return [str(p) for p in paths]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A prepared pairs folder of the copy task (word tokenizer: 6 letters + specials)."""
    folder = tmp_path_factory.mktemp("copy")
    train, val = write_pairs(folder, "train", 400, 0), write_pairs(folder, "val", 40, 1)
    tok = train_tokenizer("word", LETTERS)
    prepare_pairs(train, tok, folder / "data", val_inputs=val)
    return folder / "data"


def run_config(pairs, out_dir, model="transformer", **train) -> RunConfig:
    """A tiny encoder-decoder run on ``pairs`` (train fields overridable)."""
    values = {"out_dir": str(out_dir), "batch_size": 8, "max_steps": 8, "warmup_steps": 2, "lr": 3e-3,
              "eval_interval": 100, "eval_batches": 2, "log_interval": 1, "checkpoint_interval": 100,
              "progress": False, "precision": "fp32", **train}
    overrides = [f"train.{k}={v}" for k, v in values.items()]
    return load_config(None, [f"model={MODELS[model]}", f"data.path={pairs}", *overrides])



@pytest.mark.parametrize("model", ["transformer", "gru"])
def test_lmlab_train_teaches_a_copy_task(pairs, tmp_path, model, capsys):
    """Through the CLI: val_loss ends far below what a model that ignores the source can reach (the
    letters' entropy, ln 6), and greedy val BLEU is reported; the checkpoint is kind seq2seq."""
    config = tmp_path / "copy.yaml"
    config.write_text(f"""
model: {MODELS[model]}
data: {{path: {pairs}}}
seq2seq: {{val_bleu_examples: 10, length_grouping: 0}}
train: {{out_dir: {tmp_path / 'run'}, batch_size: 16, max_steps: 120, warmup_steps: 10, lr: 1.0e-2, min_lr: 1.0e-3,
        eval_interval: 60, eval_batches: 3, log_interval: 20, progress: false, precision: fp32}}
""")
    assert main(["train", str(config), "-q"]) == 0
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [60, 120]
    assert evals[-1]["val_loss"] < 0.5 * math.log(len(LETTERS)), evals
    assert 0 <= evals[-1]["val_bleu"] <= 100
    assert "val_bleu" in capsys.readouterr().out
    manifest = json.loads(next((tmp_path / "run" / "checkpoints").iterdir()).joinpath("manifest.json").read_text())
    assert manifest["kind"] == "seq2seq" and manifest["max_source_len"] == 12


@pytest.mark.parametrize("model", ["transformer", "gru"])
def test_resumed_training_equals_uninterrupted(pairs, tmp_path, model):
    """Stopping at step 3 and resuming gives the same per-step losses and weights (dropout included)."""
    runs = {}
    for name in ("full", "part"):
        cfg = run_config(pairs, tmp_path / name, model)
        runs[name] = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.1))
    pretrain(runs["full"])
    assert pretrain(runs["part"], stop_after=3).step == 3
    assert pretrain(runs["part"], resume=True).step == 8
    assert_same_run(tmp_path / "full", tmp_path / "part", 8)  # bit-identical on CPU fp32


def test_grad_accumulation_equals_one_big_batch(pairs, tmp_path):
    """grad_accum 2 x batch 4 reads the pairs of batch 8 and takes the same steps (up to rounding: each
    micro-batch is trimmed to its own longest pair)."""
    tasks = {}
    weights = {}
    for name, batch, accum in (("big", 8, 1), ("accum", 4, 2)):
        cfg = run_config(pairs, tmp_path / name, batch_size=batch, grad_accum=accum, max_steps=3)
        tasks[name] = Seq2SeqTask(cfg, torch.device("cpu"))
        pretrain(cfg)
        weights[name] = load_checkpoint(tmp_path / name).model.state_dict()
    big, accum = tasks["big"].step_batches(1), tasks["accum"].step_batches(1)
    assert len(big) == 1 and len(accum) == 2
    assert sum(b.units for b in accum) == big[0].units
    assert torch.equal(torch.cat([b.tensors["targets"][:, :3] for b in accum]), big[0].tensors["targets"][:, :3])
    assert all(torch.allclose(weights["big"][k], weights["accum"][k], atol=1e-5) for k in weights["big"])


def test_micro_batches_are_trimmed_and_count_target_tokens(pairs):
    """units = target tokens + end-of-text (what the loss is a mean over); tokens = (source + target) / 2,
    the unit of flops_per_token; a slice of a padded batch loses the columns it does not need."""
    shards = PairShards(pairs, "train")
    lengths = shards.lengths("source")
    short, long = int(lengths.argmin()), int(lengths.argmax())
    batch = make_batch(shards, [short, long], 12, 12)
    n_short, n_long = int(lengths[short]), int(lengths[long])  # copy task: target = source
    whole, first = micro_batch(batch, slice(None)), micro_batch(batch, slice(0, 1))
    assert whole.units == n_short + n_long + 2 and whole.tokens == (2 * (n_short + n_long) + 2) // 2
    assert whole.row_units.tolist() == [n_short + 1, n_long + 1]
    assert first.tensors["src"].shape == (1, n_short) and first.tensors["targets"].shape == (1, n_short + 1)
    assert first.units == n_short + 1 and not (first.tensors["targets"] == -100).any()


def test_label_smoothing_mixes_the_target_with_a_uniform_distribution():
    """On a hand-made batch: (1 - e) x cross-entropy + e x the mean of -log p over the vocabulary,
    padding skipped; the task trains with it but reports val_loss without it."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 4, -100], [0, -100, -100]])
    logp = logits.log_softmax(-1)
    real = targets != -100
    nll = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0][real]
    uniform = -logp.mean(-1)[real]
    e = 0.1
    assert target_loss(logits, targets) == pytest.approx(nll.mean().item(), rel=1e-6)
    assert target_loss(logits, targets, e) == pytest.approx(((1 - e) * nll + e * uniform).mean().item(), rel=1e-6)
    assert target_loss(logits, targets, e).item() != pytest.approx(target_loss(logits, targets).item())


def test_label_smoothing_changes_the_training_loss_not_val_loss(pairs, tmp_path):
    plain = run_config(pairs, tmp_path / "plain")
    smooth = load_config(None, [f"model={MODELS['transformer']}", f"data.path={pairs}", "seq2seq.label_smoothing=0.2"])
    smooth = dataclasses.replace(smooth, train=plain.train)
    tasks = [Seq2SeqTask(cfg, torch.device("cpu")) for cfg in (plain, smooth)]
    tasks[1].model.load_state_dict(tasks[0].model.state_dict())
    batch = tasks[0].step_batches(0)[0]
    t = batch.tensors
    with torch.no_grad():
        losses = [task.loss(task.model, batch).item() for task in tasks]
        logits, _ = tasks[0].model(t["src"], t["tgt_in"], t["src_mask"])
        tasks[0].model.eval()
        assert tasks[0].evaluate(tasks[0].model, "cpu", "fp32") == tasks[1].evaluate(tasks[0].model, "cpu", "fp32")
    assert losses[0] == pytest.approx(target_loss(logits, t["targets"]).item(), rel=1e-6)
    assert losses[1] == pytest.approx(target_loss(logits, t["targets"], 0.2).item(), rel=1e-6)
    assert losses[1] != pytest.approx(losses[0], rel=1e-4)


def test_wrong_data_and_settings_are_one_line_errors(pairs, prepared, tmp_path, capsys):
    """A seq2seq model on token shards, a GPT on pairs, seq2seq fields on a GPT, a limit beyond block_size,
    val_bleu without a scorer: one line each, before any work."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")

    def train(*overrides):
        assert main(["train", str(empty), "-q", f"train.out_dir={tmp_path / 'run'}", *overrides]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()
        return err

    seq2seq = f"model={MODELS['transformer']}"
    assert "not a prepared pairs folder" in train(seq2seq, f"data.path={prepared}")
    assert "holds parallel pairs" in train("model.block_size=8", f"data.path={pairs}")
    assert "seq2seq.label_smoothing applies to model.family seq2seq, rnn_seq2seq only" in \
        train("seq2seq.label_smoothing=0.1", f"data.path={prepared}")
    assert "seq2seq.max_source_len 20 is above model.block_size 12" in \
        train(seq2seq, "seq2seq.max_source_len=20", f"data.path={pairs}")
    assert "train.batching 'sequential' does not apply to pairs" in \
        train(seq2seq, "train.batching=sequential", f"data.path={pairs}")
    cfg = run_config(pairs, tmp_path / "run")
    cfg = dataclasses.replace(cfg, seq2seq=dataclasses.replace(cfg.seq2seq, val_bleu_examples=4))
    with pytest.raises(ConfigError, match="needs a scorer"):
        pretrain(cfg)
    with pytest.raises(DataError, match="no 'test' split"):
        pretrain(dataclasses.replace(run_config(pairs, tmp_path / "run"), data=dataclasses.replace(cfg.data, val_split="test")))

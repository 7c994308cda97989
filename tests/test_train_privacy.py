"""Differential privacy (train.dp, train/privacy.py): DP-SGD classification, full and LoRA, the spent epsilon
logged, saved and carried over --resume, per-example clipping, refused combinations, DP language modelling."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lmlab.cli import main
from lmlab.config import ClassifyConfig, LoraConfig, ModelConfig, load_config
from lmlab.data.tokenizer import train_tokenizer
from lmlab.errors import ConfigError
from lmlab.finetune.classify import build_classifier
from lmlab.models.lora import inject_lora
from lmlab.models.registry import build_model
from lmlab.train.checkpoint import save_checkpoint
from lmlab.train.privacy import PrivateTraining

import toy_sentiment
from toy_sentiment import write_tsv



def sentences(n: int, seed: int) -> list[tuple[str, str]]:
    """Short toy sentiment rows (4 label words a side, 8 filler words, 2-6 of them): quick to train privately."""
    return toy_sentiment.sentences(n, seed, label_words=4, filler_words=8, fillers=(2, 6))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny random-init encoder checkpoint and train/dev TSV files of easy sentiment."""
    root = tmp_path_factory.mktemp("dp")
    train, dev = sentences(400, 0), sentences(100, 1)
    tokenizer = train_tokenizer("word", [t for t, _ in train])
    torch.manual_seed(0)
    encoder = build_model(ModelConfig(family="encoder", n_layer=1, n_head=2, d_model=16, block_size=16,
                                      vocab_size=tokenizer.vocab_size, dropout=0.0))
    base = save_checkpoint(root / "base", encoder, tokenizer)
    config = root / "cls.yaml"
    config.write_text(f"""
model: {{path: {base}, dropout: 0.0}}
data: {{train: {write_tsv(root / 'train.tsv', train)}, val: {write_tsv(root / 'dev.tsv', dev)}, max_length: 16}}
train: {{out_dir: {root / "unused"}, batch_size: 100, max_steps: 30, lr: 0.1, warmup_steps: 2,
         lr_schedule: constant, weight_decay: 0.0, eval_interval: 1000, log_interval: 10,
         checkpoint_interval: 1000, progress: false, precision: fp32, threads: 1}}
""")
    return {"root": root, "base": base, "config": config}


def finetune(toy, out, *overrides):
    return main(["finetune", "classify", str(toy["config"]), f"train.out_dir={out}", *overrides])


def manifest(run):
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    return json.loads((ckpt / "manifest.json").read_text()), ckpt


def accuracy(run) -> float:
    return json.loads((run / "results.json").read_text())["accuracy"]


def test_dp_classifier_learns_within_its_budget(toy, tmp_path):
    out = tmp_path / "dp"
    assert finetune(toy, out, "train.dp.target_epsilon=8") == 0
    assert accuracy(out) >= 0.85
    info, _ = manifest(out)
    privacy = info["privacy"]
    assert 7.0 < privacy["epsilon"] <= 8.0  # the noise is the least that spends the budget in max_steps
    assert privacy["steps"] == 30 and privacy["delta"] == pytest.approx(1 / 800)  # 1 / (2 N), N = 400
    assert privacy["sample_rate"] == pytest.approx(1 / 4) and privacy["noise_multiplier"] > 0.5
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "epsilon" in r]
    logged = [r["epsilon"] for r in records]
    assert len(logged) == 3 and logged == sorted(logged) and logged[-1] == pytest.approx(privacy["epsilon"])
    assert all(r["grad_norm_median"] > 0 and 0 <= r["clipped_fraction"] <= 1 for r in records)


def test_huge_noise_drowns_the_signal_and_no_noise_learns(toy, tmp_path):
    """Per-example clipping bounds what any example adds, so noise 1000 x max_grad_norm leaves the model at
    chance while the same run without noise learns."""
    assert finetune(toy, tmp_path / "loud", "train.dp.noise_multiplier=1000", "train.dp.accountant=rdp") == 0
    assert finetune(toy, tmp_path / "quiet", "train.dp.noise_multiplier=0", "train.lr=3e-2") == 0
    assert accuracy(tmp_path / "loud") < 0.7 and accuracy(tmp_path / "quiet") >= 0.9
    assert manifest(tmp_path / "quiet")[0]["privacy"]["epsilon"] is None  # no noise: no finite epsilon


@pytest.mark.parametrize("family, preset, lora", [("encoder", None, 0), ("gpt", "llama", 0), ("gpt", "gpt2", 4)])
def test_without_noise_the_update_is_the_mean_of_clipped_example_gradients(family, preset, lora):
    """The private optimizer's gradient = sum over examples of g_i * min(1, C / |g_i|), over the expected batch:
    Opacus' per-example gradients are right for lmlab's layers (Linear, Embedding, LayerNorm, RMSNorm through
    functorch, LoRA, attention through SDPA with a padding mask, rotary positions)."""
    torch.manual_seed(0)
    backbone = build_model(ModelConfig(family=family, preset=preset, n_layer=1, n_head=2, d_model=16, block_size=8,
                                       vocab_size=30, dropout=0.0))
    model = build_classifier(backbone, ["0", "1"], "cls" if family == "encoder" else "last", 0.0)
    if lora:
        inject_lora(model, LoraConfig(r=lora), keep_trainable=("classifier",))
    x, mask, y = torch.randint(1, 30, (5, 6)), torch.ones(5, 6, dtype=torch.long), torch.tensor([0, 1, 1, 0, 1])
    mask[1, 4:] = 0
    params = [p for p in model.parameters() if p.requires_grad]
    per_example = []
    for i in range(5):
        grads = torch.autograd.grad(model(x[i:i + 1], mask[i:i + 1], y[i:i + 1])[1], params, allow_unused=True)
        per_example.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()  # unused: 0
                                      for g, p in zip(grads, params)]))
    g = torch.stack(per_example)  # (5, P)
    clip = 0.05
    assert (g.norm(dim=1) > clip).all()  # every example is clipped
    expected = (g * (clip / g.norm(dim=1, keepdim=True))).sum(0) / 10  # expected batch: q N = 10

    dp = load_config(None, ["train.dp.noise_multiplier=0", f"train.dp.max_grad_norm={clip}"], ClassifyConfig).train.dp
    private = PrivateTraining(dp, examples=40, batch_size=10, seed=0, steps=1, model=model,
                              optimizer=torch.optim.SGD(params, lr=0.0))
    model(x, mask, y)[1].backward()
    private.before_step()
    private.optimizer.pre_step()
    got = torch.cat([p.grad.flatten() for p in params])
    assert torch.allclose(got, expected, atol=1e-5)
    private.optimizer.zero_grad()
    logged = private.gradient_norms()  # what the train records show: the norms before clipping
    assert logged["grad_norm_median"] == pytest.approx(float(g.norm(dim=1).median()), rel=1e-5)
    assert logged["clipped_fraction"] == 1.0

    private.before_step()  # an empty Poisson batch: zero per-example gradients, so the step still adds noise
    private.optimizer.pre_step()
    assert all(torch.count_nonzero(p.grad) == 0 for p in params) and private.steps == 2
    assert private.gradient_norms() == {}  # no examples since the last call


def test_micro_batches_give_the_update_and_account_of_one_batch(toy, tmp_path):
    """A step's Poisson batch cut into length-sorted micro-batches (train.dp.micro_batch) yields the same
    per-example gradients, so the same weights; the accountant still counts one step at rate q per step."""
    extra = ["train.dp.noise_multiplier=0.5", "train.max_steps=6", "train.log_interval=1"]
    assert finetune(toy, tmp_path / "one", *extra, "train.dp.micro_batch=1000") == 0
    assert finetune(toy, tmp_path / "many", *extra, "train.dp.micro_batch=7") == 0  # ~15 micro-batches a step
    (one, one_ckpt), (many, many_ckpt) = manifest(tmp_path / "one"), manifest(tmp_path / "many")
    assert many["privacy"]["steps"] == 6 and many["privacy"]["epsilon"] == pytest.approx(one["privacy"]["epsilon"])
    a, b = load_file(one_ckpt / "model.safetensors"), load_file(many_ckpt / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    base = {f"backbone.{k}": v for k, v in load_file(toy["base"] / "model.safetensors").items()}
    assert all(not torch.equal(a[k], base[k]) for k in base)  # every weight moved
    losses = [[r["train_loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
               if "train_loss" in r] for run in ("one", "many")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_lora_with_dp_trains_only_the_adapters_and_head(toy, tmp_path):
    out = tmp_path / "lora"
    assert finetune(toy, out, "train.dp.target_epsilon=8", "train.dp.accountant=rdp", "lora.r=4", "lora.alpha=8",
                    "train.max_steps=20") == 0
    info, ckpt = manifest(out)
    assert info["privacy"]["epsilon"] <= 8
    base = load_file(toy["base"] / "model.safetensors")
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert adapter and all("lora_" in k or "classifier" in k for k in adapter)
    assert all(w.abs().sum() > 0 for k, w in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    tuned = load_file(ckpt / "model.safetensors")
    backbone = {k.removeprefix("backbone."): w for k, w in tuned.items() if k.startswith("backbone.") and "lora_" not in k}
    backbone = {k.replace(".base.", "."): w for k, w in backbone.items()}  # a LoRA layer's frozen base
    assert set(backbone) == set(base) and all(torch.equal(w, base[k]) for k, w in backbone.items())


def test_resumed_dp_run_spends_what_an_uninterrupted_one_does(toy, tmp_path):
    extra = ["train.dp.target_epsilon=4", "train.dp.accountant=rdp", "train.max_steps=8", "train.log_interval=1", "train.ema_decay=0.5"]
    assert finetune(toy, tmp_path / "whole", *extra) == 0
    assert finetune(toy, tmp_path / "part", *extra, "--stop-after", "3") == 0
    assert manifest(tmp_path / "part")[0]["privacy"]["steps"] == 3
    assert finetune(toy, tmp_path / "part", *extra, "--resume") == 0
    whole, part = manifest(tmp_path / "whole")[0]["privacy"], manifest(tmp_path / "part")[0]["privacy"]
    assert part["steps"] == 8 and part["epsilon"] == pytest.approx(whole["epsilon"], rel=1e-9)
    losses = [[r["train_loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
               if "train_loss" in r] for run in ("whole", "part")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # the same Poisson batches and noise after resuming


@pytest.mark.parametrize("override, message", [
    ("train.dp.target_epsilon=-1", "train.dp.target_epsilon must be > 0"),
    ("train.dp.delta=1.5", "train.dp.delta must be in (0, 1)"),
    ("train.dp.max_grad_norm=0", "train.dp.max_grad_norm must be > 0"),
    ("train.dp.accountant=gdp", "train.dp.accountant 'gdp' is not one of prv, rdp"),
    ("train.dp.noise_multiplier=1", "not both"),
    ("train.grad_accum=2", "train.dp does not work with train.grad_accum 2"),
    ("train.compile=true", "train.dp does not work with train.compile"),
    ("train.precision=fp16", "train.dp does not work with train.precision 'fp16'"),
    ("model.rdrop=0.5", "model.rdrop does not work with train.dp"),
])
def test_bad_dp_configs_are_one_line_errors(toy, tmp_path, capsys, override, message):
    assert finetune(toy, tmp_path / "bad", "train.dp.target_epsilon=8", override) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not (tmp_path / "bad").exists()


def test_resume_must_keep_train_dp(toy, tmp_path, capsys):
    assert finetune(toy, tmp_path / "run", "train.dp.noise_multiplier=1", "--stop-after", "2") == 0
    capsys.readouterr()
    assert finetune(toy, tmp_path / "run", "--resume") == 1
    assert "was trained with train.dp" in capsys.readouterr().err


def test_dp_language_model_through_lmlab_train(prepared, tmp_path):
    """The LM task hands out block_size windows as examples: a GPT trains privately, epsilon in its manifest."""
    out, config = tmp_path / "lm", tmp_path / "lm.yaml"
    config.write_text(f"""
model: {{n_layer: 1, n_head: 2, d_model: 32, block_size: 16}}
data: {{path: {prepared}}}
train: {{out_dir: {out}, batch_size: 8, max_steps: 8, warmup_steps: 1, lr: 1.0e-2, eval_interval: 1000,
         eval_batches: 1, progress: false, precision: fp32, log_interval: 1, threads: 1,
         dp: {{target_epsilon: 3, delta: 1.0e-5, accountant: rdp}}}}
""")
    args = ["train", str(config)]
    assert main(args) == 0
    privacy = manifest(out)[0]["privacy"]
    assert 2.5 < privacy["epsilon"] <= 3.0 and privacy["delta"] == 1e-5 and privacy["accountant"] == "rdp"
    losses = [r["train_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "train_loss" in r]
    assert losses[-1] < losses[0]


def test_tasks_without_single_examples_refuse_dp():
    from lmlab.train.loop import TaskBase

    class Pairs(TaskBase):
        kind = "pairs"

    with pytest.raises(ConfigError, match="train.dp does not work with pairs training"):
        Pairs().example_count()

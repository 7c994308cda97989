"""precision auto (runtime.resolve_precision), bf16/fp32 quality parity, FLOPs per token and MFU."""

import logging

import pytest
import torch

from lmlab import runtime
from lmlab.config import ModelConfig
from lmlab.errors import ConfigError
from lmlab.eval.perplexity import evaluate_perplexity
from lmlab.models.registry import build_model
from lmlab.train.checkpoint import load_checkpoint
from lmlab.train.lm import pretrain
from lmlab.train.logger import read_metrics

from conftest import tiny_run_config
from loop_tasks import train_losses

CPU = torch.device("cpu")


def test_bf16_training_reaches_the_loss_of_fp32(prepared, tmp_path):
    """Same seed, same data, 40 steps of a tiny GPT: bf16 autocast ends within 2% of fp32's train loss
    (mean of the last 5 logged steps; bf16 autocast runs on any x86 CPU, slowly without bf16 units)."""
    final = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        pretrain(tiny_run_config(prepared, out, max_steps=40, eval_interval=40, checkpoint_interval=40,
                                 precision=precision))
        losses = list(train_losses(out).values())
        assert losses[-1] < losses[0] - 0.5  # both learn
        final[precision] = sum(losses[-5:]) / 5
    assert abs(final["bf16"] - final["fp32"]) <= 0.02 * final["fp32"], final


def test_mfu_is_logged_with_the_train_records(prepared, tmp_path):
    pretrain(tiny_run_config(prepared, tmp_path / "run", max_steps=4, precision="fp32"))
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train_loss" in r]
    assert records and all(0 < r["mfu"] < 1.5 for r in records)
    assert all(r["tflops"] > 0 for r in records)


def test_eval_ppl_takes_a_precision(trained_run, corpus_dir):
    ckpt = load_checkpoint(trained_run)
    data = str(corpus_dir / "doc000.txt")
    ppl = {p: evaluate_perplexity(ckpt.model, ckpt.tokenizer, data, progress=False, precision=p)["perplexity"]
           for p in ("auto", "fp32", "bf16")}
    assert ppl["auto"] == ppl["fp32"]  # d_model 32: too narrow for bf16 to pay
    assert ppl["bf16"] == pytest.approx(ppl["fp32"], rel=0.02)
    with pytest.raises(ConfigError, match="precision"):
        evaluate_perplexity(ckpt.model, ckpt.tokenizer, data, progress=False, precision="fp8")


def test_auto_keeps_fp32_for_narrow_models_and_without_bf16_units(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="lmlab.runtime")
    assert runtime.resolve_precision("auto", CPU) == "fp32"  # width not known yet: no probe
    assert runtime.resolve_precision("auto", CPU, runtime.BF16_MIN_WIDTH - 1) == "fp32"
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: "")
    assert runtime.resolve_precision("auto", CPU, 4096) == "fp32"
    assert "precision auto: fp32 (CPU has no bf16 matrix units)" in caplog.text


def test_auto_follows_the_probe_on_a_cpu_with_bf16_units(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="lmlab.runtime")
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: "AMX")
    speed = {torch.float32: 1.0, torch.bfloat16: 4.2}
    monkeypatch.setattr(runtime, "matmul_tflops", lambda dtype, n, device: speed[dtype])
    assert runtime.resolve_precision("auto", CPU, 384) == "bf16"
    assert "precision auto: bf16 (CPU has AMX; bf16 matmul 4.2x fp32 at 384x1536" in caplog.text
    speed[torch.bfloat16] = 1.1
    assert runtime.resolve_precision("auto", CPU, 384) == "fp32"


def test_matmul_probe_is_measured_once():
    first = runtime.matmul_tflops(torch.float32, 64, CPU)
    assert first > 0 and runtime.matmul_tflops(torch.float32, 64, CPU) == first


def test_gpu_peaks_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert runtime.peak_tflops(torch.device("cuda"), "bf16") == 989.4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert runtime.peak_tflops(torch.device("cuda"), "fp32") == 51.2
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert runtime.peak_tflops(torch.device("cuda"), "bf16") is None


# FLOPs per token: 6 per weight that multiplies (2 forward, 4 backward), counted by hand on tiny configs.

@pytest.mark.parametrize("family,gates", [("rnn", 1), ("gru", 3), ("lstm", 4)])
def test_recurrent_flops_per_token_is_a_hand_count(family, gates):
    model = build_model(ModelConfig(family=family, n_layer=2, d_model=8, d_ff=6, vocab_size=10, block_size=16))
    d, H, V = 8, 6, 10
    weights = gates * H * d + gates * H * H  # layer 0: weight_ih, weight_hh
    weights += gates * H * H + gates * H * H  # layer 1
    weights += V * H  # the output layer
    assert model.flops_per_token() == 6 * weights


def test_encoder_flops_per_token_is_a_hand_count():
    cfg = ModelConfig(family="encoder", preset="bert", n_layer=1, d_model=8, n_head=2, d_ff=16, vocab_size=10,
                      block_size=16)
    model = build_model(cfg)
    d, f = 8, 16
    attention = 3 * (d * d + d) + (d * d + d)  # q, k, v and the output projection, with biases
    mlp = (d * f + f) + (f * d + d)
    norms = 2 * 2 * d + 2 * d  # two per layer, and the one after the embeddings
    assert model.flops_per_token() == 6 * (attention + mlp + norms) + 12 * 1 * d * 16


def test_classifier_flops_per_token_leave_out_the_output_layer():
    gpt = build_model(ModelConfig(n_layer=1, d_model=8, n_head=2, vocab_size=10, block_size=16),
                      head={"labels": ["a", "b"], "pooling": "last"})
    assert gpt.flops_per_token() == gpt.backbone.flops_per_token() - 6 * 10 * 8
    lstm = build_model(ModelConfig(family="lstm", n_layer=1, d_model=8, vocab_size=10, block_size=16),
                       head={"labels": ["a", "b"]})
    assert lstm.flops_per_token() == 6 * (4 * 8 * 8 + 4 * 8 * 8)


def test_the_trainer_decides_auto_at_the_models_width(monkeypatch, tmp_path):
    from loop_tasks import RegressionTask, regression_config
    from lmlab.train.loop import Trainer, prepare_run

    widths = []
    monkeypatch.setattr(runtime, "BF16_MIN_WIDTH", 64)
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: "AMX")
    monkeypatch.setattr(runtime, "matmul_tflops", lambda dtype, n, device: widths.append(n) or
                        {torch.float32: 1.0, torch.bfloat16: 3.0}[dtype])
    cfg = regression_config(tmp_path / "run", max_steps=2)
    device, precision = prepare_run(cfg.train, resume=False)
    assert precision == "fp32" and not widths  # the model is not built yet: no probe
    trainer = Trainer(RegressionTask(4, 1), cfg, device, precision)
    assert trainer.precision == "bf16" and widths == [128, 128]  # the placeholder config's d_model
    assert trainer.run().step == 2

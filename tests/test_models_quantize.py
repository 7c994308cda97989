import copy
import logging
import math

import pytest
import torch
import torch.nn as nn

from lmlab.config import ModelConfig
from lmlab.errors import ConfigError
from lmlab.generate import precision
from lmlab.generate.engine import BatchGeneration
from lmlab.generate.precision import choose_dtype, for_decoding_as
from lmlab.generate.sampling import SamplingParams
from lmlab.models import quantize
from lmlab.models.quantize import BlockedLinear, Int8Linear, PackedBf16Linear, for_decoding
from lmlab.models.registry import build_model

V = 96


def peaky_model(preset: str) -> nn.Module:
    """A random model with weights large enough that its next-token distributions are far from uniform, so
    that what it assigns to a text depends on its weights (a plain small init gives ~V perplexity to anything)."""
    torch.manual_seed(0)
    cfg = ModelConfig(preset=preset, n_layer=2, n_head=4, n_kv_head=2 if preset == "llama" else None, d_model=64,
                      block_size=64, vocab_size=V, init_std=0.4)
    return build_model(cfg).eval()


def sample_text(model: nn.Module, n_rows: int = 8, length: int = 63) -> torch.Tensor:
    """Held-out text drawn from ``model`` itself at temperature 1: (n_rows, length + 1) token ids."""
    prompts = [[i] for i in range(n_rows)]
    params = [SamplingParams(max_new_tokens=length, temperature=1.0, seed=i) for i in range(n_rows)]
    rows = [[] for _ in prompts]
    for step in BatchGeneration(model, prompts, params):
        for row, token in enumerate(step):
            if token is not None:
                rows[row].append(token)
    return torch.tensor([p + r for p, r in zip(prompts, rows)])


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor) -> float:
    _, loss = model(ids[:, :-1], ids[:, 1:])
    return math.exp(loss.item())


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_lower_precision_perplexity_within_one_percent_of_fp32(preset, dtype):
    model = peaky_model(preset)
    text = sample_text(model)
    reference = perplexity(model, text)
    assert reference < V / 4  # a text the weights matter for (uniform guessing would give V)
    low = for_decoding(copy.deepcopy(model), dtype)
    assert abs(perplexity(low, text) / reference - 1) < 0.01


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_lower_precision_cache_equals_recompute_and_batch_equals_alone(dtype):
    model = for_decoding(peaky_model("llama"), dtype)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    params = [SamplingParams(max_new_tokens=12, temperature=0) for _ in prompts]
    cached = list(BatchGeneration(model, [prompts[0]], params[:1]))
    recomputed = list(BatchGeneration(model, [prompts[0]], params[:1], use_cache=False))
    assert cached == recomputed
    together = list(zip(*[s for s in BatchGeneration(model, prompts, params)]))
    alone = [[s[0] for s in BatchGeneration(model, [p], [q])] for p, q in zip(prompts, params)]
    assert [list(t) for t in together] == alone


def test_int8_linear_is_the_rounded_weight_times_its_scale():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127  # each row's largest weight maps to 127
    scale = q.scale.float()[:, None]  # (out, 1)
    dequantized = q.weight.float() * scale
    error = (dequantized - linear.weight).abs()
    # rounding: half a step, except where a row's largest weight was clipped to 127 (its bf16 scale rounded down)
    assert (error <= scale / 2 + 1e-7).float().mean() > 0.97 and (error <= scale).all()
    x = torch.randn(3, 5, 64)
    expected = x.bfloat16().float() @ dequantized.t() + linear.bias
    assert torch.allclose(q(x.bfloat16()).float(), expected, atol=0.05)


def test_blocked_linear_is_the_linear():
    """Few rows through blocks of output rows (one bmm), more rows as one matmul: the Linear's output, in
    the Linear's own weight; a width the blocks do not divide is padded with zero rows, cut off again."""
    torch.manual_seed(0)
    for linear, blocks, pad in ((nn.Linear(64, 48), 2, 0), (nn.Linear(64, 48, bias=False), 4, 0),
                                (nn.Linear(63, 10), 4, 2), (nn.Linear(16, 7, bias=False), 2, 1), (nn.Linear(8, 5), 1, 0)):
        blocked = BlockedLinear(linear, blocks)
        assert blocked.pad == pad and (blocked.weight.data_ptr() == linear.weight.data_ptr()) == (pad == 0)
        for shape in [(1, 1), (2, 5), (32,), (3, 11), (40,)]:  # rows 1, 10, 32 in blocks; 33, 40 whole
            x = torch.randn(*shape, linear.in_features)
            assert torch.allclose(blocked(x), linear(x), atol=1e-5, rtol=1e-5)
            assert blocked(x).shape == linear(x).shape and blocked(x).is_contiguous()


def test_fp32_decoding_gives_the_models_perplexity_and_greedy_tokens(monkeypatch):
    monkeypatch.setattr(quantize, "blocked_pays", lambda linears: True)  # whatever this machine measures
    model = peaky_model("llama")
    text = sample_text(model)
    fast = for_decoding(copy.deepcopy(model), "fp32")
    assert isinstance(fast.lm_head, BlockedLinear) and not [m for m in fast.modules() if type(m) is nn.Linear]
    assert abs(perplexity(fast, text) / perplexity(model, text) - 1) < 1e-5
    params = [SamplingParams(max_new_tokens=16, temperature=0)]
    assert list(BatchGeneration(fast, [[1, 2, 3]], params)) == list(BatchGeneration(model, [[1, 2, 3]], params))


def test_fp32_keeps_plain_linears_where_blocks_do_not_pay(monkeypatch):
    monkeypatch.setattr(quantize, "blocked_pays", lambda linears: False)
    model = for_decoding(peaky_model("gpt2"), "fp32")
    assert type(model.lm_head) is nn.Linear and not [m for m in model.modules() if isinstance(m, BlockedLinear)]


def test_blocked_pays_is_measured_once_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(quantize, "_blocked_verdicts", {})
    linears = [nn.Linear(64, 96), nn.Linear(96, 64)]
    with caplog.at_level(logging.INFO, logger="lmlab"):
        verdict = quantize.blocked_pays(linears)
        assert quantize.blocked_pays(linears) is verdict
    assert caplog.text.count("fp32 decoding:") == 1 and "2 linears: blocked" in caplog.text


def test_for_decoding_swaps_every_linear_and_unties_the_head():
    model = for_decoding(peaky_model("gpt2"), "int8")
    assert not [m for m in model.modules() if type(m) is nn.Linear]
    assert isinstance(model.lm_head, Int8Linear) and model.tok_emb.weight.dtype == torch.bfloat16
    model = for_decoding(peaky_model("gpt2"), "bf16")
    assert isinstance(model.lm_head, PackedBf16Linear)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        for_decoding(model, "int4")


def test_auto_keeps_fp32_without_bf16_units(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "")
    with caplog.at_level(logging.INFO, logger="lmlab"):
        model, dtype = for_decoding_as(peaky_model("gpt2"), "auto")
    assert dtype == "fp32" and "no bf16 matrix units" in caplog.text
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("fp32,bf16,int8,expected", [(2.0, 3.0, 1.0, "int8"), (2.0, 1.5, 1.4, "bf16"),
                                                     (2.0, 1.9, 1.95, "fp32"), (2.0, 3.0, 1.85, "fp32")])
def test_auto_picks_the_fastest_measured_step_unless_it_is_a_near_tie(fp32, bf16, int8, expected, monkeypatch,
                                                                      caplog):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "AMX")
    monkeypatch.setattr(quantize, "blocked_pays", lambda linears: True)
    kinds = []

    def fake_step_seconds(model):  # which dtype it is, by its output layer
        kind = type(model.lm_head).__name__
        kinds.append(kind)
        return {"BlockedLinear": fp32, "PackedBf16Linear": bf16, "Int8Linear": int8}[kind] / 1000

    monkeypatch.setattr(precision, "step_seconds", fake_step_seconds)
    with caplog.at_level(logging.INFO, logger="lmlab"):
        assert choose_dtype(peaky_model("gpt2")) == expected
    assert sorted(set(kinds)) == ["BlockedLinear", "Int8Linear", "PackedBf16Linear"]
    assert len(kinds) == 3 * precision.PROBE_ROUNDS
    assert f"dtype auto: {expected}" in caplog.text and "fp32 2.00 ms" in caplog.text


def test_step_seconds_times_a_real_step():
    assert 0 < precision.step_seconds(peaky_model("gpt2")) < 1

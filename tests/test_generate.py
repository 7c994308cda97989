import pytest
import torch

from lmlab.errors import ConfigError, LmlabError
from lmlab.generate.engine import generate_text, generate_tokens
from lmlab.generate.sampling import SamplingParams, apply_top_k, apply_top_p, next_token
from lmlab.train.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def ckpt(trained_run):
    return load_checkpoint(trained_run)


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=20, temperature=0),
    SamplingParams(max_new_tokens=20, temperature=0.9, top_k=5, seed=3),
    SamplingParams(max_new_tokens=20, temperature=1.2, top_p=0.8, seed=4),
])
def test_cached_generation_equals_full_recompute(ckpt, params):
    prompt = ckpt.tokenizer.encode("the quick ")
    cached = list(generate_tokens(ckpt.model, prompt, params))
    recomputed = list(generate_tokens(ckpt.model, prompt, params, use_cache=False))
    assert cached == recomputed and len(cached) >= 1


def test_greedy_is_argmax_of_recompute(ckpt):
    prompt = ckpt.tokenizer.encode("a lazy ")
    tokens = list(generate_tokens(ckpt.model, prompt, SamplingParams(max_new_tokens=5, temperature=0)))
    ids = list(prompt)
    for t in tokens:
        logits, _ = ckpt.model(torch.tensor([ids]))
        assert int(logits[0, -1].argmax()) == t
        ids.append(t)


def test_same_seed_same_text_and_streaming_matches(ckpt):
    params = dict(max_new_tokens=25, temperature=1.0, seed=7)
    pieces = []
    a = generate_text(ckpt.model, ckpt.tokenizer, "the ", SamplingParams(**params), on_text=pieces.append)
    b = generate_text(ckpt.model, ckpt.tokenizer, "the ", SamplingParams(**params))
    assert a == b == "".join(pieces)


def test_generation_stops_at_the_context(ckpt):
    prompt = ckpt.tokenizer.encode("the quick brown fox jumps")  # 25 of 32 positions
    params = SamplingParams(max_new_tokens=100, temperature=1.0, seed=0)
    assert len(list(generate_tokens(ckpt.model, prompt, params))) <= 32 - len(prompt)


def test_prompt_longer_than_context_is_refused(ckpt):
    with pytest.raises(LmlabError, match="context is 32"):
        generate_text(ckpt.model, ckpt.tokenizer, "x" * 40, SamplingParams())


def test_top_k_and_top_p_on_hand_made_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(apply_top_k(logits, 2)).tolist() == [[True, False, False, True]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = ~torch.isinf(apply_top_p(probs.log(), 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(apply_top_p(probs.log(), 0.5))
    assert kept.tolist() == [[True, False, False, False]]
    assert next_token(logits, SamplingParams(temperature=0), None).tolist() == [1]


def test_invalid_sampling_values():
    for bad in [dict(temperature=-1), dict(top_p=1.5), dict(top_k=0), dict(max_new_tokens=0)]:
        with pytest.raises(ConfigError):
            SamplingParams(**bad).validate()

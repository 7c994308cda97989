import itertools
import random

import pytest
import torch

from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.config import ModelConfig
from lmlab.data.tokenizer import train_tokenizer
from lmlab.errors import ConfigError, LmlabError
from lmlab.generate.engine import (BatchGeneration, TextGeneration, TextStream, beam_search, fit_prompt, generate_text,
                                   generate_texts, generate_tokens)
from lmlab.generate.sampling import (Sampler, SamplingParams, TokenHistory, apply_min_p, apply_temperature,
                                     apply_top_k, apply_top_p, frequency_penalty, presence_penalty,
                                     repetition_penalty)
from lmlab.models.registry import build_model
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


def test_long_prompt_truncated_from_the_left_by_flag(ckpt):
    assert fit_prompt(list(range(40)), 32, 10, truncate=True) == list(range(18, 40))  # 22 kept + 10 new = 32
    with pytest.raises(LmlabError, match="max new tokens"):
        fit_prompt([1, 2], 32, 32, truncate=True)
    text = generate_text(ckpt.model, ckpt.tokenizer, "the quick " * 4, SamplingParams(max_new_tokens=5, temperature=0),
                         truncate=True)
    assert 1 <= len(text) <= 5


def test_top_k_and_top_p_on_hand_made_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(apply_top_k(logits, 2)).tolist() == [[True, False, False, True]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = ~torch.isinf(apply_top_p(probs.log(), 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(apply_top_p(probs.log(), 0.5))
    assert kept.tolist() == [[True, False, False, False]]
    sampler = Sampler([SamplingParams(temperature=0)], [[0]], 4, torch.device("cpu"))
    assert sampler.pick(logits).tolist() == [1]


def test_invalid_sampling_values():
    for bad in [dict(temperature=-1), dict(top_p=1.5), dict(top_k=0), dict(max_new_tokens=0), dict(min_p=2.0),
                dict(repetition_penalty=0), dict(presence_penalty=3), dict(frequency_penalty=-2.5), dict(stop=[""]),
                dict(seed=2 ** 64), dict(seed=-2 ** 63 - 1)]:
        with pytest.raises(ConfigError):
            SamplingParams(**bad).validate()


def tiny_model(**kw):
    """A random tiny decoder (no training needed to compare generation paths)."""
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=2, d_model=32, block_size=48, vocab_size=50)
    cfg.update(kw)
    return build_model(ModelConfig(**cfg)).eval()


PROMPTS = [[5, 9, 2, 7, 7, 1, 30, 12, 4, 4, 8, 19], [3], [11, 40, 2, 2, 6]]
MODELS = {
    "gpt2": dict(preset="gpt2"),
    "llama": dict(preset="llama", n_kv_head=1),
    "lstm": dict(family="lstm", reset_token=0),
    "gru": dict(family="gru"),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_batched_generation_equals_one_by_one(kind):
    """Prompts of different lengths, padded on the left in one batch, give what each gives alone."""
    model = tiny_model(**MODELS[kind])
    params = [SamplingParams(max_new_tokens=15, temperature=0),
              SamplingParams(max_new_tokens=9, temperature=1.0, top_k=20, seed=1, stop_tokens=[3]),
              SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=2)]
    generation = BatchGeneration(model, PROMPTS, params)
    batched = [[] for _ in PROMPTS]
    for step in generation:
        for row, token in enumerate(step):
            if token is not None:
                batched[row].append(token)
    alone = [list(generate_tokens(model, p, q)) for p, q in zip(PROMPTS, params)]
    assert batched == alone
    assert [len(b) for b in batched] == [15, len(alone[1]), 20] and generation.finish_reason[0] == "length"
    recomputed = BatchGeneration(model, PROMPTS, params, use_cache=False)
    rows = [[] for _ in PROMPTS]
    for step in recomputed:
        for row, token in enumerate(step):
            if token is not None:
                rows[row].append(token)
    assert rows == alone


@pytest.mark.parametrize("kind", list(MODELS))
def test_rows_joining_a_running_batch_get_what_they_get_alone(kind):
    """Continuous batching: sequences added mid-generation, shorter or longer than the running ones."""
    model = tiny_model(**MODELS[kind])
    late_long = [7, 3, 9, 21, 4, 4, 18, 2, 33, 5, 6, 12, 40, 1, 1, 9, 22, 30, 8, 2]  # longer than the batch so far
    jobs = [(PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=0)),
            (PROMPTS[1], SamplingParams(max_new_tokens=10, temperature=0.9, seed=4, presence_penalty=0.5)),
            (late_long, SamplingParams(max_new_tokens=8, temperature=0)),
            (PROMPTS[2], SamplingParams(max_new_tokens=6, top_k=10, seed=6))]
    generation = BatchGeneration(model)
    out: dict[int, list[int]] = {}
    generation.add(*jobs[0])
    for step in range(30):
        if step == 2:
            generation.add(*jobs[1])
            generation.add(*jobs[2])
        if step == 5:
            generation.add(*jobs[3])
        for row, token in generation.step():
            out.setdefault(row, []).append(token)
    assert not generation.active
    alone = [list(generate_tokens(model, prompt, params)) for prompt, params in jobs]
    assert [out[i] for i in range(4)] == alone


@pytest.mark.parametrize("kind", ["gpt2", "lstm"])
def test_under_steady_load_the_cache_stays_as_wide_as_the_longest_running_row(kind):
    """Continuous batching for many steps, a row joining every other step and rows leaving as they finish:
    the batch is never empty, yet finished rows give their cache columns back, so the width stays bounded
    (it used to grow by one every step), and every row still gets what it gets alone."""
    model = tiny_model(**MODELS[kind])
    rng = random.Random(0)
    max_prompt, max_new = 12, 10
    jobs = [([rng.randrange(1, 50) for _ in range(rng.randint(1, max_prompt))],
             SamplingParams(max_new_tokens=rng.randint(1, max_new), temperature=0 if i % 2 else 0.9, seed=i))
            for i in range(40)]
    generation, out, positions, widths = BatchGeneration(model), {}, [], []
    for step in itertools.count():
        if step % 2 == 0 and step // 2 < len(jobs):
            generation.add(*jobs[step // 2])
        if not generation.active:
            break
        for row, token in generation.step():
            out.setdefault(row, []).append(token)
        positions.append(generation.cache.pos)
        widths.append(generation.width)
        if hasattr(generation.cache, "k"):
            assert generation.cache.k.size(3) == generation.width  # the mask and the cache agree
    assert len(widths) > 2 * (max_prompt + 2 * max_new)  # long enough that unbounded growth would show
    assert max(positions) <= max_prompt + max_new  # the longest running sequence, no dead columns
    assert max(widths) <= max_prompt + 2 * max_new  # and room for what a row may still add
    assert [out[i] for i in range(len(jobs))] == [list(generate_tokens(model, *job)) for job in jobs]


def test_left_padding_gives_finite_outputs_and_the_same_logits():
    model = tiny_model(preset="llama", n_kv_head=1)
    short = torch.tensor([[4, 8, 15]])
    padded = torch.tensor([[0, 0, 0, 4, 8, 15]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]])
    alone, _ = model(short)
    batched, _ = model(padded, attention_mask=mask)
    assert torch.isfinite(batched).all()
    assert torch.allclose(batched[:, 3:], alone, atol=1e-5)


def test_greedy_is_argmax_in_a_batch_with_sampled_rows():
    model = tiny_model()
    params = [SamplingParams(max_new_tokens=6, temperature=0), SamplingParams(max_new_tokens=6, seed=3)]
    tokens = [t[0] for t in BatchGeneration(model, [[1, 2, 3], [4]], params)]
    ids = [1, 2, 3]
    for t in tokens:
        assert int(model(torch.tensor([ids]))[0][0, -1].argmax()) == t
        ids.append(t)


def test_penalties_on_hand_made_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    history = TokenHistory([[0, 1]], 4, torch.device("cpu"))  # prompt saw tokens 0 and 1
    history.add(torch.tensor([2]))
    history.add(torch.tensor([2]))  # token 2 generated twice
    pen = torch.tensor([[2.0]])
    assert repetition_penalty(logits, pen, history).tolist() == [[1.0, -2.0, 0.25, 1.0]]
    assert presence_penalty(logits, torch.tensor([[0.5]]), history).tolist() == [[2.0, -1.0, 0.0, 1.0]]
    assert frequency_penalty(logits, torch.tensor([[0.5]]), history).tolist() == [[2.0, -1.0, -0.5, 1.0]]


def test_temperature_on_hand_made_logits():
    logits = torch.tensor([[2.0, -1.0], [2.0, -1.0]])
    scaled = apply_temperature(logits, torch.tensor([[2.0], [0.0]]))  # row 2 is greedy: left as it is
    assert scaled.tolist() == [[1.0, -0.5], [2.0, -1.0]]


def test_min_p_and_per_row_top_k_on_hand_made_logits():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = ~torch.isinf(apply_min_p(probs.log(), 0.2))  # keep p >= 0.1
    assert kept.tolist() == [[True, True, True, False]]
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    kept = ~torch.isinf(apply_top_k(logits, torch.tensor([[1], [3]])))
    assert kept.tolist() == [[False, True, False, False], [True, True, True, False]]


def test_processors_compose_in_the_sampler():
    """A repetition penalty strong enough turns the greedy choice away from a token already seen."""
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    plain = Sampler([SamplingParams(temperature=0)], [[0]], 3, torch.device("cpu"))
    penalised = Sampler([SamplingParams(temperature=0, repetition_penalty=2.0)], [[0]], 3, torch.device("cpu"))
    assert plain.pick(logits).tolist() == [0] and penalised.pick(logits).tolist() == [1]
    # top-k 1 then any temperature: always the argmax
    sampler = Sampler([SamplingParams(temperature=5.0, top_k=1, seed=0)], [[0]], 3, torch.device("cpu"))
    assert {sampler.pick(logits).item() for _ in range(20)} == {0}


@pytest.fixture(scope="module")
def byte_tokenizer():
    return train_tokenizer("byte", [])


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=0, max_size=30), stop=st.text(min_size=1, max_size=4))
def test_text_stream_never_splits_characters_and_cuts_at_stop_strings(byte_tokenizer, text, stop):
    ids = byte_tokenizer.encode(text)
    stream, pieces = TextStream(byte_tokenizer, [stop]), []
    for i in ids:
        pieces.append(stream.push(i))
        if stream.stopped:
            break
    pieces.append(stream.close())
    expected = text.split(stop)[0]
    assert "".join(pieces) == expected
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


def test_streaming_equals_non_streaming_and_stop_strings_end_rows(ckpt):
    tok, model = ckpt.tokenizer, ckpt.model
    params = [SamplingParams(max_new_tokens=20, temperature=0), SamplingParams(max_new_tokens=20, seed=5)]
    streamed: dict[int, list[str]] = {0: [], 1: []}
    done = {}
    result = generate_texts(model, tok, ["the quick ", "a "], params, on_text=lambda r, p: streamed[r].append(p),
                            on_done=lambda r, c: done.setdefault(r, c))
    assert ["".join(streamed[r]) for r in (0, 1)] == [c.text for c in result]
    assert done == dict(enumerate(result))
    alone = generate_text(model, tok, "the quick ", params[0])
    assert alone == result[0].text
    cut = alone[3:5]
    stopped = generate_texts(model, tok, ["the quick "], [SamplingParams(max_new_tokens=20, temperature=0, stop=[cut])])
    assert stopped[0].text == alone.split(cut)[0] and stopped[0].finish_reason == "stop"


def test_beam_search_finds_the_most_likely_sequence():
    """With beams enough to keep every prefix, beam search is exact: it matches brute force."""
    model = tiny_model(vocab_size=5, block_size=16)
    prompt, n = [1, 2], 3

    @torch.no_grad()
    def logprob(seq):
        logits, _ = model(torch.tensor([prompt + list(seq)]))
        lp = logits[0, len(prompt) - 1:-1].log_softmax(-1)
        return sum(float(lp[i, t]) for i, t in enumerate(seq))

    best = max(itertools.product(range(5), repeat=n), key=logprob)
    assert beam_search(model, prompt, num_beams=25, max_new_tokens=n, length_penalty=0.0) == list(best)
    greedy = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=n, temperature=0)))
    assert beam_search(model, prompt, num_beams=1, max_new_tokens=n) == greedy


def test_beam_search_ends_sequences_at_stop_tokens():
    model = tiny_model(vocab_size=5, block_size=16)
    out = beam_search(model, [1, 2], num_beams=3, max_new_tokens=10, stop_tokens=[0, 1, 2, 3, 4])
    assert len(out) == 1  # every token stops: the best one-token sequence


def test_a_cancelled_row_stops_and_leaves_the_batch(ckpt):
    """What the server does when a client goes away: the row ends at the next step, the others go on."""
    generation = TextGeneration(ckpt.model, ckpt.tokenizer)
    steps = {"n": 0}
    done = {}
    params = SamplingParams(max_new_tokens=20, temperature=0, stop_tokens=[], stop=[])
    gone = generation.add("the ", params, on_done=lambda c: done.setdefault("gone", c),
                          cancelled=lambda: steps["n"] >= 3)
    stays = generation.add("a ", params, on_done=lambda c: done.setdefault("stays", c))
    while generation.active:
        generation.step()
        steps["n"] += 1
        if steps["n"] == 5:  # cancelled during step 4: computed no further, gone from the batch
            assert generation.generation.rows == [stays]
    assert done["gone"].finish_reason == "cancelled" and done["gone"].completion_tokens == 4
    assert done["stays"].finish_reason in ("length", "stop") and gone != stays


def test_beam_search_says_which_sampling_flags_it_ignores(trained_run, capsys):
    from lmlab.cli import main

    assert main(["generate", str(trained_run), "--prompt", "the", "--num-beams", "2", "--max-new-tokens", "4",
                 "--top-k", "5", "--stop", "x"]) == 0
    assert "warning: beam search keeps the most likely beams and ignores --top-k, --stop" in capsys.readouterr().err
    assert main(["generate", str(trained_run), "--prompt", "the", "--num-beams", "2", "--max-new-tokens", "4"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_generation_that_never_empties_holds_only_its_live_rows(ckpt):
    """A server's generation runs for ever: finished rows must leave no bookkeeping behind."""
    generation = TextGeneration(ckpt.model, ckpt.tokenizer)
    done, added = [], 0
    while len(done) < 60:
        while generation.active < 4:  # the batch never empties: a new request joins as one leaves
            generation.add("the ", SamplingParams(max_new_tokens=1 + added % 5, temperature=0.8, seed=added),
                           on_done=done.append)
            added += 1
        generation.step()
        assert len(generation.rows) <= 4
        assert len(generation.generation.prompts) <= 8 and len(generation.generation.finish_reason) <= 8
    assert generation.generation.next_row == added > 60

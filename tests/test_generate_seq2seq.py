"""Generation from encoder-decoders (generate/seq2seq.py): batched == one by one (greedy and seeded
sampling), sources that join a running batch, greedy == argmax of teacher forcing, beam search ==
brute force, text in and out."""

import itertools

import pytest
import torch

from lmlab.config import ModelConfig
from lmlab.data.tokenizer import train_tokenizer
from lmlab.errors import LmlabError
from lmlab.generate.sampling import SamplingParams
from lmlab.generate.seq2seq import (Seq2SeqGeneration, generate_target_texts, generate_targets,
                                    seq2seq_beam_search)
from lmlab.models.registry import build_model

VOCAB = 11
START = END = 0  # end-of-text starts and ends a target, as in the data path
SMALL = dict(n_layer=2, d_model=32, block_size=10)
CONFIGS = {
    "gpt2": ModelConfig(family="seq2seq", preset="gpt2", n_head=4, **SMALL),
    "llama": ModelConfig(family="seq2seq", preset="llama", n_head=4, n_kv_head=2, **SMALL),
    "lstm-luong": ModelConfig(family="rnn_seq2seq", cell="lstm", attention="luong", **SMALL),
    "gru-bahdanau": ModelConfig(family="rnn_seq2seq", cell="gru", attention="bahdanau", **SMALL),
}
SOURCES = [[3, 4, 5, 6, 7, 8, 9], [5, 2], [1, 2, 3, 4], [9, 9, 8, 10, 1, 2]]


def model_of(name: str, vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**CONFIGS[name].__dict__, "vocab_size": vocab})).eval()


def mixed_params() -> list[SamplingParams]:
    """Greedy and sampled rows (seeded), with different limits and settings."""
    return [SamplingParams(max_new_tokens=6, temperature=0),
            SamplingParams(max_new_tokens=9, temperature=1.0, seed=2),
            SamplingParams(max_new_tokens=4, temperature=0.8, top_k=4, seed=2),
            SamplingParams(max_new_tokens=8, temperature=1.2, top_p=0.9, seed=6, stop_tokens=[5, 7])]


def alone(model, source, params):
    return generate_targets(model, [source], [params], START, END)[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_a_batch_of_sources_comes_out_as_each_alone(name):
    model = model_of(name)
    params = mixed_params()
    streamed = [[] for _ in SOURCES]
    batched = generate_targets(model, SOURCES, params, START, END,
                               on_token=lambda row, token: streamed[row].append(token))
    assert batched == [alone(model, s, p) for s, p in zip(SOURCES, params)]
    assert streamed == batched
    for out, p in zip(batched, params):
        assert 1 <= len(out) <= p.max_new_tokens and (len(out) == p.max_new_tokens or out[-1] in [END, *p.stop_tokens])
        assert not set(out[:-1]) & {END, *p.stop_tokens}


@pytest.mark.parametrize("name", CONFIGS)
def test_sources_that_join_a_running_batch_come_out_as_each_alone(name):
    """Continuous batching: rows join between steps while others run and others finish and leave."""
    model = model_of(name)
    params = mixed_params() + [SamplingParams(max_new_tokens=3, temperature=0.7, seed=5)]
    sources = SOURCES + [[4, 4, 4, 4, 4, 4, 4, 4, 4, 4]]  # as long as block_size
    generation = Seq2SeqGeneration(model, START, END)
    out = {}
    joins = {0: [0, 1], 2: [2], 3: [3, 4]}  # step -> rows that join before it
    step = 0
    while step <= max(joins) or generation.active:
        for i in joins.get(step, []):
            assert generation.add(sources[i], params[i]) == i
        for row, token in generation.step():
            out.setdefault(row, []).append(token)
        step += 1
    assert [out[i] for i in range(5)] == [alone(model, s, p) for s, p in zip(sources, params)]
    assert all(generation.finish_reason[i] in ("stop", "length") for i in range(5))


@pytest.mark.parametrize("name", ["gpt2", "gru-bahdanau"])
def test_greedy_generation_is_the_argmax_of_teacher_forcing(name):
    model = model_of(name)
    tokens = alone(model, SOURCES[0], SamplingParams(max_new_tokens=8, temperature=0))
    target = [START]
    for token in tokens:
        logits, _ = model(torch.tensor([SOURCES[0]]), torch.tensor([target]))
        assert int(logits[0, -1].argmax()) == token
        target.append(token)


def test_a_row_ends_at_the_end_token_or_at_block_size():
    model = model_of("llama")
    greedy = SamplingParams(max_new_tokens=50, temperature=0)
    tokens = alone(model, SOURCES[1], greedy)
    assert len(tokens) == 10  # no end token from this untrained model: block_size target positions
    end = tokens[2]
    generation = Seq2SeqGeneration(model, START, end, [SOURCES[1]], [greedy])
    stopped = [step[0] for step in generation]
    assert stopped == tokens[:tokens.index(end) + 1] and generation.finish_reason[0] == "stop"


def scores(model, source, targets, length_penalty):
    """Total log-probability of each target given source (teacher forcing, one batch), / len ** length_penalty."""
    longest = max(map(len, targets))
    tgt_in = torch.tensor([[START] + t[:-1] + [END] * (longest - len(t)) for t in targets])  # causal: the filler
    logits, _ = model(torch.tensor([source] * len(targets)), tgt_in)  # after each target changes nothing of it
    logprobs = logits.float().log_softmax(-1)  # (targets, longest, V)
    return [float(logprobs[i, torch.arange(len(t)), torch.tensor(t)].sum()) / len(t) ** length_penalty
            for i, t in enumerate(targets)]


def every_target(vocab: int, longest: int):
    """Every target of at most ``longest`` tokens: ended by END (once, at the end), or of length ``longest``."""
    for n in range(1, longest + 1):
        for body in itertools.product(range(1, vocab), repeat=n - 1):
            yield list(body) + [END]
    yield from (list(t) for t in itertools.product(range(1, vocab), repeat=longest))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_finds_the_best_target_of_brute_force_for_several_sources(name, length_penalty):
    vocab, longest = 4, 3
    model = model_of(name, vocab=vocab)
    sources = [[1, 2, 3, 1], [3], [2, 2, 1]]
    targets = list(every_target(vocab, longest))
    with torch.no_grad():
        best = [max(zip(scores(model, s, targets, length_penalty), targets))[1] for s in sources]
    found = seq2seq_beam_search(model, sources, num_beams=40, max_new_tokens=longest, start_id=START, end_id=END,
                                length_penalty=length_penalty)
    assert found == best


@pytest.mark.parametrize("name", ["llama", "lstm-luong"])
def test_one_beam_is_greedy_and_a_batch_of_searches_is_each_alone(name):
    model = model_of(name)
    greedy = [alone(model, s, SamplingParams(max_new_tokens=7, temperature=0)) for s in SOURCES]
    assert seq2seq_beam_search(model, SOURCES, 1, 7, START, END) == greedy
    batched = seq2seq_beam_search(model, SOURCES, 3, 7, START, END, length_penalty=0.6)
    assert batched == [seq2seq_beam_search(model, [s], 3, 7, START, END, length_penalty=0.6)[0] for s in SOURCES]


def test_text_in_text_out_streams_and_cuts_at_stop_strings():
    tok = train_tokenizer("char", ["the quick brown fox jumps over a lazy dog"])  # ids: 28 characters, 256 bytes, eot
    model = model_of("llama", vocab=tok.vocab_size)
    with torch.no_grad():
        model.lm_head.weight[28:tok.eot_id] = 0  # the untrained model writes characters, not loose bytes
    params = [SamplingParams(max_new_tokens=8, temperature=0),
              SamplingParams(max_new_tokens=8, temperature=1, top_k=3, seed=0)]
    streamed = [[], []]
    done = generate_target_texts(model, tok, ["the fox", "a dog"], params,
                                 on_text=lambda row, piece: streamed[row].append(piece))
    tokens = generate_targets(model, [tok.encode("the fox"), tok.encode("a dog")], params, tok.eot_id, tok.eot_id)
    for i in range(2):
        assert done[i].text == "".join(streamed[i]) == tok.decode([t for t in tokens[i] if t != tok.eot_id])
        assert done[i].prompt_tokens == len(tok.encode(["the fox", "a dog"][i]))
        assert done[i].completion_tokens == len(tokens[i]) and done[i].finish_reason in ("stop", "length")
    cut = done[0].text[3:5]
    stopped = generate_target_texts(model, tok, ["the fox"], [SamplingParams(max_new_tokens=8, temperature=0,
                                                                             stop=[cut])])[0]
    assert stopped.text == done[0].text[:done[0].text.index(cut)] and stopped.finish_reason == "stop"


def test_an_empty_or_too_long_source_or_no_beams_is_a_clear_error():
    model = model_of("lstm-luong")
    with pytest.raises(LmlabError, match="empty"):
        generate_targets(model, [[]], [SamplingParams()], START, END)
    with pytest.raises(LmlabError, match="block_size"):
        seq2seq_beam_search(model, [[1] * 11], 2, 5, START, END)
    with pytest.raises(LmlabError, match="num beams"):
        seq2seq_beam_search(model, [[1]], 0, 5, START, END)
    assert seq2seq_beam_search(model, [], 2, 5, START, END) == [] and generate_targets(model, [], [], START) == []

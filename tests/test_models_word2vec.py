"""word2vec (models/word2vec.py, train/word2vec.py): the loss, the noise distribution, subsampling, the
windows, and training through the one loop until words that share their contexts are each other's
nearest neighbours."""

import dataclasses
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F

from lmlab.config import DataConfig, ModelConfig, RunConfig, TrainConfig, Word2VecConfig, load_config
from lmlab.data.prepare import prepare
from lmlab.data.tokenizer import train_tokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.inspect.embeddings import EmbeddingSpace
from lmlab.models.registry import build_model
from lmlab.models.word2vec import RowScores
from lmlab.train.checkpoint import load_checkpoint
from lmlab.train.lm import pretrain
from lmlab.train.optim import build_optimizer
from lmlab.train.word2vec import Vocabulary, Word2VecTask, alias_table, subsample_probability, window_rows

PAIRS = 6  # the synthetic language: word a_i or b_i, always between l_i and r_i


def paired_corpus(sentences: int = 1500, seed: int = 0) -> str:
    """Lines "l_i X r_i" with X a_i or b_i at random: a_i and b_i share every context, nothing else does."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        i = rng.randrange(PAIRS)
        lines.append(f"l{i} {rng.choice('ab')}{i} r{i}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def paired_data(tmp_path_factory):
    """Word-level shards of the paired corpus (train and val)."""
    folder = tmp_path_factory.mktemp("w2v")
    (folder / "train.txt").write_text(paired_corpus(), encoding="utf-8")
    (folder / "val.txt").write_text(paired_corpus(200, seed=1), encoding="utf-8")
    tok = train_tokenizer("word", [paired_corpus()])
    prepare([str(folder / "train.txt")], tok, folder / "data", val_inputs=[str(folder / "val.txt")])
    return folder / "data"


def w2v_config(data_dir, out_dir, mode="skipgram", **train) -> RunConfig:
    defaults = dict(out_dir=str(out_dir), batch_size=512, epochs=6, lr=0.05, min_lr=1e-4, lr_schedule="linear",
                    warmup_steps=0, optimizer="sparse_adam", weight_decay=0.0, grad_clip=0.0, precision="fp32",
                    eval_interval=1000, eval_batches=2, checkpoint_interval=1000, log_interval=5, progress=False,
                    seed=3)
    defaults.update(train)
    return RunConfig(model=ModelConfig(family="word2vec", w2v_mode=mode, d_model=16),
                     data=DataConfig(path=str(data_dir)), train=TrainConfig(**defaults),
                     word2vec=Word2VecConfig(window=1, negatives=4, sample=0.0, min_count=1))


def test_loss_is_the_negative_sampling_objective_for_both_modes():
    contexts, mask = torch.tensor([[1, 2, 0], [3, 0, 0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    centres, negatives = torch.tensor([5, 6]), torch.tensor([[7, 8, 9], [10, 11, 12]])
    for mode in ("skipgram", "cbow"):
        model = build_model(ModelConfig(family="word2vec", w2v_mode=mode, d_model=8, vocab_size=30))
        torch.nn.init.normal_(model.output_emb.weight)
        h, out = model.input_emb.weight, model.output_emb.weight

        def pair(vector, t, n):
            return -(F.logsigmoid(vector @ out[t]) + F.logsigmoid(-(out[n] @ vector)).sum())

        if mode == "skipgram":  # a pair per real context word, the row's noise words shared by its pairs
            by_hand = [pair(h[1], 5, negatives[0]), pair(h[2], 5, negatives[0]), pair(h[3], 6, negatives[1])]
        else:  # the mean of the real context words (the mask drops the padding) predicts the centre
            by_hand = [pair((h[1] + h[2]) / 2, 5, negatives[0]), pair(h[3], 6, negatives[1])]
        loss = model(contexts, centres, negatives, mask)
        assert loss.shape == () and torch.allclose(loss, torch.stack(by_hand).mean())
        assert model.features(torch.tensor([[1, 2, 3]])).shape == (1, 3, 8)


def test_a_noise_word_equal_to_the_centre_is_skipped():
    """As in word2vec.c: drawing the centre itself as a noise word adds nothing to the loss (nor pushes the
    centre's output vector away); the row's other noise words count as before."""
    model = build_model(ModelConfig(family="word2vec", d_model=8, vocab_size=30))
    torch.nn.init.normal_(model.output_emb.weight, generator=torch.Generator().manual_seed(0))
    contexts, centre = torch.tensor([[1, 2]]), torch.tensor([5])
    with_centre = model(contexts, centre, torch.tensor([[7, 5, 9]]))
    without = model(contexts, centre, torch.tensor([[7, 9]]))
    assert torch.allclose(with_centre, without)


def test_row_scores_are_bmm_with_its_gradients():
    """RowScores (a faster backward layout) gives torch.bmm's scores and gradients, also under bf16 autocast."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    c = torch.randn(7, 4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(RowScores.apply, (h, c))
    weights = torch.randn(7, 5, 4, dtype=torch.float64, generator=gen)
    grads = torch.autograd.grad((RowScores.apply(h, c) * weights).sum(), (h, c))
    expected = torch.autograd.grad((torch.bmm(h, c.transpose(1, 2)) * weights).sum(), (h, c))
    assert all(torch.allclose(g, e) for g, e in zip(grads, expected))
    h32, c32 = h.detach().float().requires_grad_(), c.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = RowScores.apply(h32, c32)
    (scores.float() * weights.float()).sum().backward()
    assert h32.grad.dtype == torch.float32 and torch.allclose(h32.grad, expected[0].float(), atol=0.1)


def test_sparse_tables_give_sparse_gradients_of_the_rows_used():
    model = build_model(ModelConfig(family="word2vec", d_model=4, vocab_size=50))
    model(torch.tensor([[1]]), torch.tensor([2]), torch.tensor([[3, 4]])).backward()
    grad = model.output_emb.weight.grad
    assert grad.is_sparse and set(grad.coalesce().indices()[0].tolist()) == {2, 3, 4}


def test_a_sparse_sgd_step_is_word2vec_cs_update_summed_over_the_pairs():
    """train.optimizer sgd on sparse gradients moves each row by -lr / pairs times the sum of its pairs'
    gradients (word2vec.c's per-pair update at lr / pairs), a word seen twice getting both updates."""
    model = build_model(ModelConfig(family="word2vec", d_model=4, vocab_size=20))
    torch.nn.init.normal_(model.output_emb.weight, generator=torch.Generator().manual_seed(0))
    contexts, mask = torch.tensor([[1, 1, 2]]), torch.tensor([[1, 1, 1]])  # word 1 twice in the window
    centre, noise = torch.tensor([5]), torch.tensor([[6]])
    h0, out0 = model.input_emb.weight.detach().clone(), model.output_emb.weight.detach().clone()
    optimizer = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.3, weight_decay=0.0), "cpu")
    model(contexts, centre, noise, mask).backward()
    optimizer.step()
    step = 0.3 / 3  # lr over the 3 pairs of the (mean) loss
    new_h, new_out = h0.clone(), out0.clone()
    for c in (1, 1, 2):  # d(-log sigmoid(h.o))/dh = -(1 - sigmoid(h.o)) o; d(-log sigmoid(-h.n))/dh = sigmoid(h.n) n
        pos, neg = torch.sigmoid(h0[c] @ out0[5]), torch.sigmoid(h0[c] @ out0[6])
        new_h[c] -= step * (-(1 - pos) * out0[5] + neg * out0[6])
        new_out[5] -= step * -(1 - pos) * h0[c]
        new_out[6] -= step * neg * h0[c]
    assert torch.allclose(model.input_emb.weight, new_h, atol=1e-6)
    assert torch.allclose(model.output_emb.weight, new_out, atol=1e-6)
    untouched = [i for i in range(20) if i not in (1, 2, 5, 6)]
    assert torch.equal(model.input_emb.weight[untouched], h0[untouched])


def test_negatives_follow_the_unigram_distribution_to_the_power_three_quarters():
    counts = np.array([0, 0, 1000, 100, 10, 1, 3])  # ids 0, 1 dropped (<unk>, <eos>); id 6 below min_count
    dropped = np.array([True, True, False, False, False, False, False])
    vocab = Vocabulary(counts, dropped, Word2VecConfig(min_count=1))
    draws = vocab.negatives((400_000,), np.random.default_rng(0))
    observed = np.bincount(draws, minlength=7) / len(draws)
    expected = np.where(dropped, 0, counts) ** 0.75
    expected = expected / expected.sum()
    assert np.allclose(observed, expected, atol=0.003)
    assert observed[:2].sum() == 0  # never a dropped word
    vocab5 = Vocabulary(counts, dropped, Word2VecConfig(min_count=5))
    assert not vocab5.kept[5] and not vocab5.kept[6] and vocab5.kept[4]  # below min_count: never drawn either
    assert (vocab5.negatives((10_000,), np.random.default_rng(1)) < 5).all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e6)), min_size=1, max_size=60).filter(lambda w: sum(w) > 0))
def test_the_alias_table_gives_each_outcome_exactly_its_probability(weights):
    p = np.array(weights) / sum(weights)
    keep, alias = alias_table(p)
    V = len(p)
    # slot s gives its own outcome with probability keep[s] / V and alias[s] with (1 - keep[s]) / V
    given_prob = keep / V
    np.add.at(given_prob, alias, (1 - keep) / V)
    assert np.allclose(given_prob, p, atol=1e-12)
    assert ((keep >= 0) & (keep <= 1)).all()
    assert (keep[p == 0] == 0).all() and (p[alias[keep < 1]] > 0).all()  # a zero outcome is never given


def test_subsampling_keeps_rare_words_and_thins_frequent_ones_by_mikolovs_formula():
    freq = np.array([0.1, 1e-3, 1e-4, 1e-6])
    keep = subsample_probability(freq, 1e-3)
    assert keep[0] == pytest.approx((np.sqrt(0.1 / 1e-3) + 1) * 1e-3 / 0.1)  # 0.11
    assert keep[1] == 1.0 and keep[2] == 1.0 and keep[3] == 1.0  # at or below the threshold: always kept
    assert (subsample_probability(freq, 0.0) == 1).all()


def test_windows_stay_inside_sentences_and_never_exceed_the_drawn_size():
    words = np.array([10, 11, 12, 13, 14, 15])
    sentence = np.array([0, 0, 0, 1, 1, 1])
    ctx, mask, centre = window_rows(words, sentence, 1, np.random.default_rng(0))
    pairs = sorted((int(c), int(x)) for row, m, c in zip(ctx, mask, centre) for x in row[m])
    assert pairs == [(10, 11), (11, 10), (11, 12), (12, 11), (13, 14), (14, 13), (14, 15), (15, 14)]
    ctx, mask, centre = window_rows(words, sentence, 2, np.random.default_rng(0))
    assert ctx.shape == (6, 4) and centre.tolist() == words.tolist()
    for i, (c, m) in enumerate(zip(ctx, mask)):  # context words come from the centre's own sentence
        assert set(c[m]) <= set(words[sentence == sentence[i]]) - {centre[i]}


# sgd as in configs/word2vec_wikitext2.yaml, at word2vec's 0.025 per pair times the ~120 pairs of a 64-word
# step (a vocabulary of 24 words: bigger steps sum too many updates of one word)
SGD = dict(optimizer="sgd", lr=3.0, min_lr=0.01, batch_size=64, epochs=3)


@pytest.mark.parametrize("mode,optimizer", [("skipgram", {}), ("cbow", {}), ("skipgram", SGD)])
def test_trained_vectors_put_words_that_share_their_contexts_nearest_each_other(paired_data, tmp_path, mode,
                                                                                optimizer):
    result = pretrain(w2v_config(paired_data, tmp_path / mode, mode, **optimizer))
    assert result.metrics["val_loss"] < 1.5  # an untrained model scores (1 + 4) * log 2 = 3.47
    ckpt = load_checkpoint(result.checkpoint)
    space = EmbeddingSpace.from_model(ckpt.model, ckpt.tokenizer, ckpt.manifest)
    for i in range(PAIRS):
        assert space.neighbors(f"a{i}", 1)[0].word == f"b{i}"
        assert space.neighbors(f"b{i}", 1)[0].word == f"a{i}"


def test_a_recipe_that_cannot_take_sparse_gradients_is_refused(paired_data, tmp_path):
    with pytest.raises(ConfigError, match="sparse_adam"):
        pretrain(w2v_config(paired_data, tmp_path / "adamw", optimizer="adamw"))
    with pytest.raises(ConfigError, match="grad_clip"):
        pretrain(w2v_config(paired_data, tmp_path / "clip", grad_clip=1.0))


def test_every_step_has_pairs_even_an_epochs_one_word_tail_or_a_step_subsampled_to_nothing(paired_data, tmp_path):
    words = len(Word2VecTask(w2v_config(paired_data, tmp_path / "n"), torch.device("cpu")).words)
    cfg = w2v_config(paired_data, tmp_path / "tail", batch_size=words - 1)  # a step, then a tail of one word
    task = Word2VecTask(cfg, torch.device("cpu"))
    last = task.steps_per_epoch() - 1
    assert len(task.words) % cfg.train.batch_size == 1
    assert all(b.units > 0 for b in task.step_batches(last))  # the last step reads the last batch_size words
    cfg.word2vec.sample = 1e-9  # keeps almost no word: a step whose words are all skipped learns from them whole
    task = Word2VecTask(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=4)), torch.device("cpu"))
    assert all(b.units > 0 for step in range(50) for b in task.step_batches(step))


def test_a_corpus_whose_sentences_have_one_word_each_is_refused(tmp_path):
    (tmp_path / "one.txt").write_text("".join(f"w{i % 7}\n" for i in range(200)), encoding="utf-8")
    prepare([str(tmp_path / "one.txt")], train_tokenizer("word", ["w0 w1 w2 w3 w4 w5 w6"]), tmp_path / "data")
    with pytest.raises(DataError, match="share a sentence"):
        pretrain(w2v_config(tmp_path / "data", tmp_path / "run"))


def test_word2vec_fields_belong_to_the_word2vec_family(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  family: gpt\n  w2v_mode: cbow\n")
    with pytest.raises(ConfigError, match="w2v_mode applies to model.family word2vec"):
        load_config(cfg)
    cfg.write_text("model:\n  family: gpt\nword2vec:\n  window: 3\n")
    with pytest.raises(ConfigError, match="word2vec.window applies to model.family word2vec"):
        load_config(cfg)
    assert load_config("configs/word2vec_wikitext2.yaml").model.family == "word2vec"

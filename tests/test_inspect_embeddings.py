"""lmlab inspect embeddings (inspect/embeddings.py): neighbours, analogies and similarity on hand-made
vectors whose answers are known, the two benchmarks against hand-computed scores (and against gensim's
own evaluation where gensim is installed), the command end to end, and one-line errors."""

import json

import numpy as np
import pytest

from lmlab.cli import main
from lmlab.errors import DataError
from lmlab.inspect.embeddings import EmbeddingSpace, input_embedding, project_2d, spearman
from lmlab.train.checkpoint import load_checkpoint
from lmlab.train.lm import pretrain

import test_models_word2vec as w2v_tests

paired_data = w2v_tests.paired_data  # the fixture: word shards of the paired corpus

# 2-D vectors: a gender axis (x) and a royalty axis (y); "Man" is a rarer casing of "man"
WORDS = ["<unk>", "<eos>", "man", "woman", "king", "queen", "apple", "Man"]
VECTORS = np.array([[0, 0], [0, 0], [1, 0.1], [-1, 0.1], [1, 1], [-1, 1], [0.1, -1], [0.9, 0.3]], dtype=np.float32)


@pytest.fixture(scope="module")
def paired_run(paired_data, tmp_path_factory):
    """A tiny skip-gram run on the paired corpus (a_i and b_i share their contexts)."""
    out = tmp_path_factory.mktemp("w2v-run") / "run"
    pretrain(w2v_tests.w2v_config(paired_data, out))
    return out


def space() -> EmbeddingSpace:
    return EmbeddingSpace(VECTORS, WORDS, np.arange(2, len(WORDS)))


def unit(v):
    return v / np.linalg.norm(v)


def test_neighbours_analogy_and_similarity_are_cosines_of_unit_vectors():
    s = space()
    assert s.similarity("king", "queen") == pytest.approx(float(unit(VECTORS[4]) @ unit(VECTORS[5])))
    assert [n.word for n in s.neighbors("man", 2)] == ["Man", "king"]
    answers = s.analogy("man", "king", "woman", 2)  # man : king :: woman : ?  (king - man + woman)
    assert answers[0].word == "queen"
    query = unit(unit(VECTORS[4]) - unit(VECTORS[2]) + unit(VECTORS[3]))
    assert answers[0].score == pytest.approx(float(unit(VECTORS[5]) @ query), abs=1e-6)
    with pytest.raises(DataError, match="'prince' is not a known word"):
        s.neighbors("prince")


def test_analogy_accuracy_per_section_as_gensim_counts_it(tmp_path):
    questions = tmp_path / "q.txt"
    questions.write_text(": royal\nman king woman queen\nMAN KING WOMAN QUEEN\nman king woman apple\n"
                         ": fruit\nman apple woman prince\nking queen man woman\n", encoding="utf-8")
    report = space().evaluate_analogies(questions)
    # royal: 2 of 3 right (case-insensitive: the second line is the first again); fruit: "prince" is out
    # of vocabulary (skipped); king : queen :: man : woman is right
    assert [(s["section"], s["correct"], s["total"]) for s in report["sections"]] == [("royal", 2, 3), ("fruit", 1, 1)]
    assert report["accuracy"] == pytest.approx(3 / 4) and report["oov"] == 1 and report["questions"] == 5
    # only the 3 most frequent words count: every question has a word outside them
    assert space().evaluate_analogies(questions, restrict=3)["total"] == 0


def test_word_pair_spearman_and_oov_ratio(tmp_path):
    pairs = tmp_path / "ws.tsv"
    pairs.write_text("# a comment\nking\tqueen\t8.0\nman\twoman\t7.0\nking\tapple\t1.0\nqueen\tprince\t6.0\n",
                     encoding="utf-8")
    report = space().evaluate_similarity(pairs)
    cosines = [float(unit(VECTORS[i]) @ unit(VECTORS[j])) for i, j in [(4, 5), (2, 3), (4, 6)]]
    # by hand: cosines 0 (king, queen), -0.98 (man, woman), -0.63 (king, apple): ranks 3, 1, 2 against 3, 2, 1
    assert np.argsort(np.argsort(cosines)).tolist() == [2, 0, 1]
    assert report["spearman"] == pytest.approx(0.5)
    assert report["pairs"] == 3 and report["oov"] == 1 and report["oov_ratio"] == pytest.approx(0.25)


def test_spearman_gives_ties_their_mean_rank():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486833, abs=1e-6)  # scipy.stats.spearmanr


def test_the_benchmarks_agree_with_gensims_own_evaluation(tmp_path):
    gensim = pytest.importorskip("gensim.models")
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    vectors = rng.normal(size=(40, 5)).astype(np.float32)
    kv = gensim.KeyedVectors(5)
    kv.add_vectors(words, vectors)
    questions = tmp_path / "q.txt"
    lines = [": s1"] + [" ".join(rng.choice(words, 4, replace=False)) for _ in range(150)]
    questions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for i in range(40):  # questions whose answer is gensim's, so that accuracy is not just 0
        a, b, c = words[i], words[(i + 1) % 40], words[(i + 2) % 40]
        lines.append(f"{a} {b} {c} {kv.most_similar(positive=[b, c], negative=[a], topn=1)[0][0]}")
    questions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pairs = tmp_path / "ws.tsv"
    lines = [f"{a}\t{b}\t{rng.uniform(0, 10):.2f}" for a, b in rng.choice(words, (60, 2))]
    pairs.write_text("\n".join(lines + ["x\ty\t3"]) + "\n")
    ours = EmbeddingSpace(vectors, words, np.arange(40))
    score, _ = kv.evaluate_word_analogies(str(questions), restrict_vocab=30)
    assert ours.evaluate_analogies(questions, restrict=30)["accuracy"] == pytest.approx(score)
    assert ours.evaluate_analogies(questions, restrict=30)["correct"] >= 40 * 0.5
    _, theirs, oov = kv.evaluate_word_pairs(str(pairs))
    report = ours.evaluate_similarity(pairs)
    assert report["spearman"] == pytest.approx(theirs[0]) and report["oov_ratio"] * 100 == pytest.approx(oov)


def test_pca_projection_keeps_the_largest_spread():
    points = project_2d(np.array([[0, 0, 0], [10, 0, 0], [0, 1, 0], [10, 1, 0]], dtype=np.float64))
    assert np.ptp(points[:, 0]) == pytest.approx(10) and np.ptp(points[:, 1]) == pytest.approx(1)  # long axis first


def test_the_command_end_to_end_on_a_trained_word2vec(tmp_path, capsys, paired_run):
    out, png = tmp_path / "report", tmp_path / "words.png"
    questions = tmp_path / "q.txt"
    questions.write_text(": pairs\nl0 a0 l1 a1\n", encoding="utf-8")
    main(["inspect", "embeddings", str(paired_run), "--neighbors", "a0", "--analogy", "l0", "a0", "l1",
          "--similarity", "a0", "b0", "--plot", "a0", "b0", "a1", "b1", "-o", str(png),
          "--eval-analogies", str(questions), "--top-k", "3", "--out", str(out)])
    report = json.loads(capsys.readouterr().out)
    assert report["neighbors"]["a0"][0]["word"] == "b0" and len(report["neighbors"]["a0"]) == 3
    assert report["similarity"]["cosine"] > 0.5 and report["analogies"]["total"] == 1
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "results.json").read_text()) == report
    assert "Nearest to **a0**" in (out / "results.md").read_text()


def test_an_unknown_word_or_nothing_to_do_is_a_one_line_error(capsys, paired_run):
    for flags, message in [(["--neighbors", "zebra"], "'zebra' is not a known word"),
                           ([], "nothing to do"), (["--plot", "a0", "b0"], "-o OUT.png")]:
        assert main(["inspect", "embeddings", str(paired_run), *flags]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_word_vectors_are_not_a_language_model(paired_run, capsys):
    for command in (["generate", str(paired_run), "--prompt", "a0"], ["eval", "ppl", str(paired_run), "--data",
                                                                      str(paired_run)]):
        assert main(command) == 1
        assert "holds word vectors (word2vec)" in capsys.readouterr().err


def test_any_models_input_embedding_with_its_tokens(trained_run, capsys):
    """A char-level GPT: its 'words' are characters; the table is the token embedding."""
    ckpt = load_checkpoint(trained_run)
    assert input_embedding(ckpt.model).shape == (ckpt.model.config.vocab_size, ckpt.model.config.d_model)
    main(["inspect", "embeddings", str(trained_run), "--neighbors", "q", "--top-k", "2"])
    found = json.loads(capsys.readouterr().out)["neighbors"]["q"]
    assert len(found) == 2 and all(len(n["word"]) == 1 for n in found)
    assert main(["inspect", "embeddings", str(trained_run), "--neighbors", "quick"]) == 1
    assert "not a known token" in capsys.readouterr().err

"""Seq2seq metrics: BLEU/chrF/ROUGE equal the libraries' own figures; the LONGEST-k baseline."""

import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer

from lmlab.errors import ConfigError, DataError
from lmlab.eval.text_metrics import bleu, chrf, longest_k, rouge, sentence_lines, text_scores

HYPS = ["The cat sat on the mat.", "A man is riding a red bicycle down the street.", "Two dogs play in the snow!"]
REFS = ["The cat is sitting on the mat.", "A man rides a bicycle along the street.", "Two dogs are playing in snow."]


def test_bleu_and_chrf_are_sacrebleus_corpus_scores_with_signatures():
    b, c = bleu(HYPS, REFS), chrf(HYPS, REFS)
    assert b["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert c["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert 0 < b["bleu"] < 100 and "tok:13a" in b["bleu_signature"] and "nrefs:1" in b["bleu_signature"]
    assert "nc:6" in c["chrf_signature"]
    assert bleu(REFS, REFS)["bleu"] == pytest.approx(100)


def test_rouge_is_the_mean_stemmed_f_measure_times_100():
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    own = [scorer.score(r, h) for h, r in zip(HYPS, REFS)]
    got = rouge(HYPS, REFS)
    for name in ("rouge1", "rouge2", "rougeL"):
        assert got[name] == pytest.approx(100 * sum(s[name].fmeasure for s in own) / len(own))
    # by hand: 3 of 3 hypothesis unigrams (stemmed: cats = cat) in a 6-word reference: P 1, R 1/2, F 2/3
    assert rouge(["the cats sat"], ["the cat sat on the mat"])["rouge1"] == pytest.approx(200 / 3)
    assert rouge(["cats sitting"], ["cat sits"])["rouge1"] == pytest.approx(100)


def test_rouge_lsum_takes_sentences_and_lines():
    assert sentence_lines("One. Two!  Three?\nFour") == "One.\nTwo!\nThree?\nFour"
    # reversed sentence order: one LCS over the whole text finds one sentence, the summary-level LCS both
    got = rouge(["b c d. a x y."], ["a x y. b c d."])
    assert got["rougeLsum"] == pytest.approx(100) and got["rougeL"] == pytest.approx(50)


def test_text_scores_and_bad_input():
    scores = text_scores(HYPS, REFS, ["bleu", "rouge"])
    assert scores["examples"] == 3 and {"bleu", "bleu_signature", "rouge1", "rougeLsum"} <= set(scores)
    assert "chrf" not in scores
    with pytest.raises(ConfigError, match="unknown metric meteor"):
        text_scores(HYPS, REFS, ["meteor"])
    with pytest.raises(DataError, match="3 hypotheses but 2 references"):
        bleu(HYPS, REFS[:2])
    with pytest.raises(DataError, match="no hypotheses"):
        rouge([], [])


def test_longest_k_keeps_the_longest_utterances_in_dialogue_order():
    dialogue = ("Ann: hi\n"
                "Bob: I am going to the cinema tonight\n"
                "Ann: which film?\n"
                "\n"
                "Bob: the new one with the dragons in it\n"
                "Ann: sounds great, can I come along too\n"
                "Bob: ok\n")
    assert longest_k(dialogue) == ("Bob: I am going to the cinema tonight\n"
                                   "Bob: the new one with the dragons in it\n"
                                   "Ann: sounds great, can I come along too")
    assert longest_k(dialogue, k=1) == "Bob: the new one with the dragons in it"
    assert longest_k("A: one\nB: two", k=1) == "A: one"  # a tie keeps the earlier
    assert longest_k("A: x", k=3) == "A: x"
    with pytest.raises(ConfigError):
        longest_k(dialogue, k=0)

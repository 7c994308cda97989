"""Scores of generated text against reference text: BLEU and chrF (sacrebleu), ROUGE (rouge-score),
and the SAMSum paper's LONGEST-3 baseline.

    bleu    corpus BLEU on detokenized text, sacrebleu's defaults (13a tokenization, exp smoothing)
    chrf    corpus chrF (character 6-grams, beta 2), sacrebleu's defaults
    rouge   ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures, Porter stemming, the mean over examples,
            x100 (as the SAMSum paper reports them)

ROUGE-L is the longest common subsequence of the whole texts; ROUGE-Lsum is the summary-level
variant (an LCS union over sentences), with sentences cut at line breaks and after . ! ? and a space.
The SAMSum paper's ROUGE-L (py-rouge) is summary-level: compare with rougeLsum. rouge-score's
tokenizer keeps only ASCII letters and digits (lowercased): ROUGE suits English text only.
Every figure comes with what makes it comparable: sacrebleu's signature, the ROUGE settings.
"""

from __future__ import annotations

import re
from typing import Sequence

from lmlab.errors import ConfigError, DataError

METRICS = ("bleu", "chrf", "rouge")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU (0-100) of detokenized hypotheses against one reference each, and sacrebleu's signature."""
    from sacrebleu.metrics import BLEU

    _check(hypotheses, references)
    metric = BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": score.score, "bleu_signature": str(metric.get_signature())}


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus chrF (0-100) against one reference each, and sacrebleu's signature."""
    from sacrebleu.metrics import CHRF

    _check(hypotheses, references)
    metric = CHRF()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {"chrf": score.score, "chrf_signature": str(metric.get_signature())}


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Mean ROUGE-1/2/L/Lsum F-measures x100 (rouge-score, stemmed), and the settings as a signature."""
    from rouge_score.rouge_scorer import RougeScorer

    _check(hypotheses, references)
    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hypotheses, references):
        scores = scorer.score(sentence_lines(ref), sentence_lines(hyp))  # (target, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    out = {name: 100 * total / len(hypotheses) for name, total in totals.items()}
    out["rouge_signature"] = "rouge-score|stemmer:porter|f-measure|mean|x100|Lsum:sentences=lines+.!?"
    return out


def text_scores(hypotheses: Sequence[str], references: Sequence[str], metrics: Sequence[str] = METRICS) -> dict:
    """The named metrics (any of bleu, chrf, rouge) as one flat dict (figures and signatures), plus the
    number of examples: what a seq2seq evaluation writes to results.json / results.md."""
    check_metrics(metrics)
    out: dict = {"examples": len(hypotheses)}
    for name in dict.fromkeys(metrics):
        out.update({"bleu": bleu, "chrf": chrf, "rouge": rouge}[name](hypotheses, references))
    return out


def check_metrics(metrics: Sequence[str]) -> None:
    """Refuse an empty list or a metric text_scores does not know, naming the ones it does."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ConfigError(f"unknown metric {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}")


def sentence_lines(text: str) -> str:
    """The text with one sentence per line (cut at line breaks and after . ! ? and whitespace): the
    sentences ROUGE-Lsum takes its LCS union over."""
    return "\n".join(s for line in text.splitlines() for s in _SENTENCE_END.split(line.strip()) if s)


def longest_k(dialogue: str, k: int = 3) -> str:
    """The SAMSum paper's LONGEST-k baseline: the k longest utterances (lines; length in characters,
    the speaker's name included) of a dialogue, kept in dialogue order, joined by newlines. Equal
    lengths keep the earlier utterance."""
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    utterances = [line.strip() for line in dialogue.splitlines() if line.strip()]
    longest = sorted(range(len(utterances)), key=lambda i: (-len(utterances[i]), i))[:k]
    return "\n".join(utterances[i] for i in sorted(longest))


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} hypotheses but {len(references)} references; they must pair up")
    if not hypotheses:
        raise DataError("no hypotheses to score")

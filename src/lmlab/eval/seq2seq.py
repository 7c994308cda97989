"""Scores of an encoder-decoder on a test set (``lmlab eval seq2seq``): every source decoded (greedy, or
beam search), the targets detokenized and scored against the reference texts with eval/text_metrics
(BLEU and chrF by sacrebleu, ROUGE by rouge-score).

The references are the texts as read (a pairs folder keeps them in val.jsonl / test.jsonl), never
token ids decoded back, so that the scores compare with published ones. The sources are encoded with
the checkpoint's own tokenizer, so any pairs input serves any checkpoint: a prepared pairs folder,
two aligned files, or a table. A source longer than the model reads keeps its first block_size
tokens, as training cut it (and the report says how many were cut).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import torch.nn as nn

from lmlab.config import Count, check_argument
from lmlab.data.pairs import PairShards, iter_pairs
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.eval.report import write_metrics_report
from lmlab.eval.text_metrics import METRICS, bleu, check_metrics, text_scores
from lmlab.generate.sampling import SamplingParams
from lmlab.generate.seq2seq import encode_sources, fit_source, seq2seq_completions
from lmlab.generate.text import check_generation_options, one_line
from lmlab.progress import progress_bar
from lmlab.runs import atomic_write_text

log = logging.getLogger(__name__)
PROGRESS_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal


def read_eval_pairs(data: Sequence[str], split: str = "test", source_field: str = "source",
                    target_field: str = "target", limit: int | None = None) -> list[tuple[str, str]]:
    """The (source, reference) texts to score: the ``split`` (val or test) of a prepared pairs folder, or
    the pairs of two aligned files or one table (data/pairs.iter_pairs, ``source_field`` / ``target_field``
    naming a table's columns); the first ``limit`` of them if given."""
    data = [str(d) for d in data]
    if limit is not None:
        check_argument("limit", limit, Count)
    if len(data) == 1 and Path(data[0]).is_dir():
        texts = PairShards(data[0], split).texts()
        pairs = [(t["source"], t["target"]) for t in texts[:limit]]
    else:
        if split != "test":
            raise ConfigError("--split picks a split of a prepared pairs folder; aligned files or a table are one split")
        pairs = []
        for pair in iter_pairs(data, source_field, target_field):
            if limit is not None and len(pairs) == limit:
                break
            pairs.append(pair)
    if not pairs:
        raise DataError(f"{' '.join(data)}: no pairs to score")
    return pairs


def evaluate_seq2seq(model: nn.Module, tokenizer: Tokenizer, pairs: list[tuple[str, str]],
                     metrics: Sequence[str] = METRICS, num_beams: int = 1, length_penalty: float = 1.0,
                     batch_size: int = 32, max_new_tokens: int | None = None, progress: bool = True
                     ) -> tuple[dict, list[str]]:
    """The scores of ``model``'s targets for the sources of ``pairs`` against their references, and the
    targets (hypotheses) in order.

    Greedy decoding (``num_beams`` 1) or beam search; at most ``batch_size`` sources at once; targets of
    at most ``max_new_tokens`` (None: the model's block_size). The report holds the metrics'
    figures and signatures (text_scores), the decoding settings, the sources cut to fit and the speed.
    """
    check_argument("batch_size", batch_size, Count)
    check_generation_options(num_beams, length_penalty, 1)
    check_metrics(metrics)  # now, not after decoding
    context = model.context_length
    max_new_tokens = context if max_new_tokens is None else max_new_tokens
    check_argument("max_new_tokens", max_new_tokens, Count)
    if context is not None and max_new_tokens > context - 1:  # the target starts with the start token
        if max_new_tokens > context:
            log.warning(f"the model's context of {context} tokens leaves room for at most {context - 1} new tokens "
                        f"after the start token, not {max_new_tokens}")
        max_new_tokens = context - 1  # what decoding can give, and what the report records
    encoded = encode_sources(tokenizer, [source for source, _ in pairs])
    sources = [fit_source(ids, context, truncate=True) for ids in encoded]
    cut = sum(len(a) < len(b) for a, b in zip(sources, encoded))
    if cut:
        log.warning(f"{cut} of {len(sources)} sources are longer than the model's {context} tokens: "
                    f"their first {context} are read, as in training")
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)] * len(sources)
    started = time.monotonic()
    with progress_bar(len(sources), unit="example", desc="decoding", enabled=progress, every=PROGRESS_EVERY) as bar:
        shown = started

        def one_done(_i: int, _completion) -> None:
            """Count a finished target; every PROGRESS_EVERY seconds, show the examples per second."""
            nonlocal shown
            bar.update(1)
            now = time.monotonic()
            if now - shown >= PROGRESS_EVERY:
                shown = now
                bar.set_postfix(examples_s=f"{bar.n / (now - started):.1f}")

        done = seq2seq_completions(model, tokenizer, sources, params, num_beams, length_penalty, batch_size,
                                   on_done=one_done)
        seconds = time.monotonic() - started
        bar.set_postfix(examples_s=f"{len(sources) / max(seconds, 1e-9):.1f}")
    hypotheses = [c.text for c in done]
    scores = text_scores(hypotheses, [target for _, target in pairs], metrics)
    report = {**scores, "decoding": "greedy" if num_beams == 1 else f"beam search, {num_beams} beams",
              "num_beams": num_beams, "length_penalty": length_penalty, "max_new_tokens": max_new_tokens,
              "sources_cut": cut, "targets_cut": sum(c.finish_reason == "length" for c in done),
              "seconds": round(seconds, 2), "examples_per_s": round(len(sources) / max(seconds, 1e-9), 2)}
    return report, hypotheses


def write_seq2seq_report(report: dict, hypotheses: list[str], out_dir: str | Path) -> None:
    """results.json, results.md (eval/report.py's format) and hypotheses.txt (one target per line, in the
    order of the sources; a target's own line breaks written as spaces) into ``out_dir``."""
    write_metrics_report(report, out_dir, "Sequence-to-sequence evaluation")
    atomic_write_text(Path(out_dir) / "hypotheses.txt", "".join(one_line(h) + "\n" for h in hypotheses))


def greedy_scores(model, tokenizer, sources: list[list[int]], references: list[str], max_new_tokens: int) -> dict:
    """BLEU of an encoder-decoder's greedy targets for token-id sources against reference texts: the
    val_bleu ``lmlab train`` reports (train/ sits below generate/ and eval/: the CLI hands this scorer to it)."""
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)] * len(sources)
    hypotheses = [c.text for c in seq2seq_completions(model, tokenizer, sources, params)]  # as evaluate_seq2seq
    return {"bleu": bleu(hypotheses, references)["bleu"]}

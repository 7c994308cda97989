"""Decontamination: drop training documents that share a long n-gram with evaluation data.

As in GPT-3's decontamination (Brown et al. 2020, appendix C: 13-grams), a training document goes
when any ``n`` consecutive tokens of it also occur in an evaluation text. Tokens are lowercased
``\\w+`` words (letters, digits, underscore; punctuation and whitespace only separate them), so
"The cat, sat." and "the cat sat" agree whatever the tokenizer. Evaluation texts are read with
data/sources.py and data/labeled.py: every string of a JSONL/JSON record (an ARC question's stem and
choices alike), every cell of a CSV/TSV row, and plain text files whole. An evaluation text shorter
than ``n`` tokens has no n-gram and so can mark nothing; the report counts them.

Only the training inputs are checked (prepare's pipeline runs on them); ``--val``/``--test`` files
are never changed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from lmlab.data.labeled import iter_rows, table_suffix
from lmlab.data.sources import expand_inputs, iter_documents, iter_records

_WORD = re.compile(r"\w+")


def tokens(text: str) -> list[str]:
    """The decontamination tokens of a text: lowercased \\w+ words."""
    return _WORD.findall(text.lower())


def ngram_hashes(words: list[str], n: int) -> Iterator[int]:
    """The hash of every n-gram of ``words`` (Python's hash: the same within one process)."""
    for i in range(len(words) - n + 1):
        yield hash(tuple(words[i:i + n]))


def evaluation_texts(path: str | Path) -> Iterator[str]:
    """Every text of an evaluation file: strings of JSONL/JSON records, cells of CSV/TSV rows, or the
    documents of a text file (see sources.iter_documents)."""
    suffix = table_suffix(path)
    if suffix in (".jsonl", ".json"):
        for _, record in iter_records(path):
            yield from _strings(record)
    elif suffix in (".csv", ".tsv"):
        for _, row in iter_rows(path):
            yield from (v for v in row.values() if isinstance(v, str))
    else:
        for doc in iter_documents([str(path)]):
            yield doc.text


class Decontaminator:
    """``keep(text, words)``: False for a document sharing an ``n``-token n-gram with any of ``paths``
    (files, folders or globs), which are read once, here. ``report()`` says what each file removed."""

    def __init__(self, paths: list[str], n: int = 13):
        self.n = n
        self.files = [str(p) for p in expand_inputs(paths)]
        self.index: dict[int, int] = {}  # n-gram hash -> bit mask of the files holding it
        self.stats = [{"texts": 0, "short_texts": 0, "ngrams": 0, "documents": 0} for _ in self.files]
        for i, path in enumerate(self.files):
            self._add(path, i)

    def _add(self, path: str, i: int) -> None:
        stats, bit = self.stats[i], 1 << i
        for text in evaluation_texts(path):
            words = tokens(text)
            stats["texts"] += 1
            stats["short_texts"] += len(words) < self.n
            for h in ngram_hashes(words, self.n):
                self.index[h] = self.index.get(h, 0) | bit
        stats["ngrams"] = sum(1 for mask in self.index.values() if mask & bit)

    def __call__(self, text: str, words: list[str] | None = None) -> bool:
        """Whether the document stays (it shares no n-gram with the evaluation files)."""
        found = 0
        for h in ngram_hashes(tokens(text), self.n):
            found |= self.index.get(h, 0)
        for i, stats in enumerate(self.stats):
            if found >> i & 1:
                stats["documents"] += 1
        return not found

    def report(self) -> dict:
        """Per evaluation file: its texts, those too short to match, its distinct n-grams, and the training
        documents that shared one with it (a document matching two files counts for both)."""
        return {"ngram": self.n, "tokens": "lowercased \\w+ words", "applies_to": "train inputs only",
                "files": dict(zip(self.files, self.stats))}


def _strings(value: object) -> Iterator[str]:
    """Every string inside a JSON value (keys excluded)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)

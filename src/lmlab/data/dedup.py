"""Near-duplicate documents: MinHash signatures in an LSH index (datasketch), streamed.

A document's shingles are its word n-grams (``shingle`` words) after normalisation: lowercased, runs
of anything that is not a letter or digit taken as one space. Documents are indexed as they come;
a document that the LSH index (bands and rows chosen by datasketch for the ``jaccard`` threshold)
pairs with an earlier kept one is a near-duplicate and goes, so the first of each cluster stays.
LSH candidates are taken as they are: checking each by its estimated Jaccard cost recall near the
threshold and bought no precision on the planted-copies benchmark (benchmarks/near_dedup.py).
Memory: the index keeps about 4 bytes per permutation per kept document.
"""

from __future__ import annotations

import re

from datasketch import MinHash, MinHashLSH

_NOT_WORD = re.compile(r"[\W_]+")


def normalise(text: str) -> list[str]:
    """The document's words for shingling: lowercased, punctuation and symbols removed."""
    return _NOT_WORD.sub(" ", text.lower()).split()


def shingles(words: list[str], n: int) -> set[bytes]:
    """The set of word n-grams of ``words`` (UTF-8, space-joined); a shorter document is one shingle."""
    if len(words) <= n:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


def minhash(words: list[str], num_perm: int = 128, shingle: int = 5) -> MinHash:
    """The MinHash signature of a document's normalised words' shingles (seed 1, datasketch's default)."""
    m = MinHash(num_perm=num_perm)
    m.update_batch(list(shingles(words, shingle)))
    return m


class NearDuplicates:
    """A streaming near-duplicate filter: ``keep(text, words)`` is False for a document that MinHash LSH finds
    about ``jaccard`` similar (or more) to one kept before (documents without words are kept)."""

    def __init__(self, jaccard: float = 0.8, num_perm: int = 128, shingle: int = 5):
        self.jaccard, self.num_perm, self.shingle = jaccard, num_perm, shingle
        self.lsh = MinHashLSH(threshold=jaccard, num_perm=num_perm)
        self.kept = 0  # documents in the index (their keys are 0, 1, ...)

    def __call__(self, text: str, words: list[str] | None = None) -> bool:
        """Whether the document stays (and is indexed), or is a near-copy of an earlier one."""
        norm = normalise(text)
        if not norm:
            return True
        m = minhash(norm, self.num_perm, self.shingle)
        if self.lsh.query(m):
            return False
        self.lsh.insert(self.kept, m, check_duplication=False)
        self.kept += 1
        return True

"""Near-duplicate removal on planted near-copies: lmlab's MinHash stage beside datasketch used directly
and exact dedupe, in one run on the same corpus.

The corpus: WikiText-2 train paragraphs (at least MIN_WORDS words); for a share of them a copy is
planted with 5-20% of its words edited (substitutions, insertions, deletions in equal parts, words
drawn from the corpus; seeded), and the whole is shuffled. In stream order the first document of each
planted pair must stay and the second must go. Recall = planted second members removed / planted pairs;
precision = of the removed documents, those that are a planted second member. Recall is also given per
edit band (5-10%, 10-15%, 15-20%).

Methods, each with the same parameters (jaccard threshold, permutations, shingle words):
    lmlab        lmlab.data.dedup.NearDuplicates (the --near-dedupe stage)
    datasketch   MinHash + MinHashLSH as datasketch's documentation shows them, query then insert, written
                 here without lmlab; the same normalised word shingles
    (An earlier lmlab version also checked each LSH candidate's estimated Jaccard; on this corpus that lost
    recall near the threshold and gained no precision, so the stage now takes LSH's answer as it is.)
    exact        sha256 of the text (lmlab data prepare --dedupe)

    python benchmarks/near_dedup.py                     # 3,000 paragraphs + 1,000 copies, three settings
    python benchmarks/near_dedup.py --originals 500     # quicker
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, write_results  # noqa: E402
from datasketch import MinHash, MinHashLSH  # noqa: E402
from lmlab.data.dedup import NearDuplicates, normalise, shingles  # noqa: E402

MIN_WORDS = 60
BANDS = ((0.05, 0.10), (0.10, 0.15), (0.15, 0.20))
SETTINGS = ((0.8, 128, 5), (0.7, 128, 3), (0.5, 128, 2))  # (jaccard, num_perm, shingle): the default first


def paragraphs(limit: int, seed: int) -> list[str]:
    """``limit`` WikiText-2 train paragraphs of at least MIN_WORDS words, sampled with ``seed``."""
    lines = (SHARED_DATA / "wikitext-2" / "train.txt").read_text(encoding="utf-8").splitlines()
    paras = [line.strip() for line in lines if len(line.split()) >= MIN_WORDS and not line.strip().startswith("=")]
    return random.Random(seed).sample(paras, limit)


def edit(text: str, rate: float, vocab: list[str], rng: random.Random) -> str:
    """``text`` with round(rate * words) edits, each a substitution, insertion or deletion at a random place."""
    words = text.split()
    for _ in range(round(rate * len(words))):
        i, kind = rng.randrange(len(words)), rng.choice("sid")
        if kind == "s":
            words[i] = rng.choice(vocab)
        elif kind == "i":
            words.insert(i, rng.choice(vocab))
        elif len(words) > 1:
            del words[i]
    return " ".join(words)


def corpus(n_originals: int, n_copies: int, seed: int) -> tuple[list[str], dict[int, int], dict[int, float]]:
    """(documents in stream order, {index of a pair's second member: index of its first}, {second: edit rate})."""
    originals = paragraphs(n_originals, seed)
    rng = random.Random(seed + 1)
    vocab = sorted({w for p in originals for w in p.split()})
    docs = [(text, i, 0.0) for i, text in enumerate(originals)]
    for i in rng.sample(range(n_originals), n_copies):
        rate = rng.uniform(BANDS[0][0], BANDS[-1][1])
        docs.append((edit(originals[i], rate, vocab, rng), i, rate))
    rng.shuffle(docs)
    first: dict[int, int] = {}
    seconds, rates = {}, {}
    for pos, (_, origin, rate) in enumerate(docs):
        if origin in first:
            seconds[pos] = first[origin]
            rates[pos] = max(rate, rates.get(first[origin], 0.0))  # the pair's edit rate
        else:
            first[origin] = pos
            rates[pos] = rate
    return [d[0] for d in docs], seconds, {p: rates[p] for p in seconds}


def run_lmlab(docs: list[str], jaccard: float, num_perm: int, shingle: int) -> list[bool]:
    near = NearDuplicates(jaccard, num_perm, shingle)
    return [not near(d) for d in docs]


def run_datasketch(docs: list[str], jaccard: float, num_perm: int, shingle: int) -> list[bool]:
    lsh = MinHashLSH(threshold=jaccard, num_perm=num_perm)
    removed = []
    for i, d in enumerate(docs):
        m = MinHash(num_perm=num_perm)
        m.update_batch(list(shingles(normalise(d), shingle)))
        duplicate = bool(lsh.query(m))
        if not duplicate:
            lsh.insert(str(i), m)
        removed.append(duplicate)
    return removed


def run_exact(docs: list[str], *_) -> list[bool]:
    seen, removed = set(), []
    for d in docs:
        h = hashlib.sha256(d.encode()).digest()
        removed.append(h in seen)
        seen.add(h)
    return removed


def true_jaccard(a: str, b: str, shingle: int) -> float:
    """The exact Jaccard similarity of two documents' normalised word shingles."""
    x, y = shingles(normalise(a), shingle), shingles(normalise(b), shingle)
    return len(x & y) / len(x | y)


def score(removed: list[bool], seconds: dict[int, int], rates: dict[int, float], above: list[int]) -> dict:
    """Recall (overall, per edit band, and of the pairs whose true Jaccard reaches the threshold) and precision."""
    hits = [p for p in seconds if removed[p]]
    n_removed = sum(removed)
    row = {"removed": n_removed, "recall": len(hits) / len(seconds),
           "precision": len(hits) / n_removed if n_removed else None,
           "pairs_J>=t": len(above), "recall_J>=t": sum(removed[p] for p in above) / len(above) if above else None}
    for low, high in BANDS:
        band = [p for p in seconds if low <= rates[p] < high]
        row[f"recall_{round(100 * low)}-{round(100 * high)}%"] = sum(removed[p] for p in band) / len(band)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--originals", type=int, default=3000)
    ap.add_argument("--copies", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    docs, seconds, rates = corpus(args.originals, args.copies, args.seed)
    rows = []
    for jaccard, num_perm, shingle in SETTINGS:
        above = [p for p, q in seconds.items() if true_jaccard(docs[p], docs[q], shingle) >= jaccard]
        for name, method in (("lmlab", run_lmlab), ("datasketch", run_datasketch), ("exact", run_exact)):
            if name == "exact" and (jaccard, num_perm, shingle) != SETTINGS[0]:
                continue
            start = time.perf_counter()
            removed = method(docs, jaccard, num_perm, shingle)
            seconds_taken = time.perf_counter() - start
            setting = "-" if name == "exact" else f"J>={jaccard}, {num_perm} perm, {shingle}-word shingles"
            rows.append({"method": name, "setting": setting, **score(removed, seconds, rates, above),
                         "docs_per_s": round(len(docs) / seconds_taken)})
    words = sum(len(d.split()) for d in docs) / len(docs)
    summary = {"documents": len(docs), "planted_pairs": len(seconds), "mean_words": round(words, 1),
               "edits": "5-20% of the words (uniform), substitutions/insertions/deletions in equal parts",
               "seed": args.seed}
    notes = ("Planted near-copies of WikiText-2 train paragraphs; recall = planted copies removed, precision = "
             "removed documents that are planted copies (a natural near-duplicate in WikiText would count "
             "against precision); pairs_J>=t: planted pairs whose exact shingle Jaccard reaches the setting's "
             "threshold, the ones MinHash LSH is meant to find, and recall_J>=t the share of them removed. Timings are on a shared CPU: compare within the run.")
    write_results("near_dedup", rows, summary, notes)


if __name__ == "__main__":
    main()

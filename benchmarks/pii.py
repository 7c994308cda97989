"""PII redaction: recall and precision per kind on a planted corpus, and redaction speed.

The corpus (tests/pii_corpus.py, another seed and ~30x the size of the test's) holds sentences with
one e-mail / phone / IP / card number / IBAN / secret each, in varied formats and contexts, and as
many look-alikes that must survive (versions, dates, times, ISBNs, order numbers, non-Luhn 16-digit
numbers, invalid IBANs, hashes, UUIDs, math, prices, MAC addresses, code). A planted sentence counts
as found when it comes out exactly as expected (the value, and only it, replaced by its kind's
placeholder); a false positive is a placeholder where there was nothing of that kind. Real prose
without PII: all of WikiText-2 (13 MB of Wikipedia articles, full of numbers, dates and versions),
line by line; every detection there counts as a false positive.

    python benchmarks/pii.py                  # 2,000 per kind (about 30 s)
    python benchmarks/pii.py --per-kind 500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import SHARED_DATA, write_results  # noqa: E402
from lmlab.data.pii import redact  # noqa: E402
from pii_corpus import KINDS, planted_corpus, score  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    units = planted_corpus(seed=args.seed, per_kind=args.per_kind)
    text = "\n".join(u.text for u in units)
    start = time.perf_counter()
    table = score(units, redact)
    redact(text)  # once more as one document, for the speed figure
    seconds = (time.perf_counter() - start) / 2
    rows = [{"kind": kind, **{k: table[kind][k] for k in ("planted", "found", "false_positives", "recall",
                                                          "precision")}} for kind in (*KINDS, "all")]
    lookalikes = sum(u.kind is None for u in units)
    summary = {"look-alike sentences": lookalikes, "look-alikes changed": len(table["_wrong"]),
               "redaction speed (MB/s, one process)": round(len(text.encode()) / seconds / 1e6, 2),
               "goal": "recall >= 0.99 and precision >= 0.95 for every kind",
               "met": all(r["recall"] >= 0.99 and r["precision"] >= 0.95 for r in rows)}
    wiki = SHARED_DATA / "wikitext-2"
    if wiki.is_dir():
        found = {}
        for name in ("train.txt", "valid.txt", "test.txt"):
            for line in (wiki / name).read_text(encoding="utf-8").splitlines():
                counts = redact(line)[1]
                for kind, n in counts.items():
                    found[kind] = found.get(kind, 0) + n
        summary["detections in WikiText-2 (13 MB of prose, all false positives)"] = sum(found.values())
        summary["WikiText-2 detections per kind"] = found or "none"
    misses = "\n".join(f"- missed {k}: `{t!r}` -> `{o!r}`" for k, t, o in table["_missed"][:10])
    wrong = "\n".join(f"- changed {c}: `{t!r}` -> `{o!r}`" for c, t, o in table["_wrong"][:10])
    write_results("pii", rows, summary, notes=__doc__.split("\n\n")[1].replace("\n", " "),
                  extra_md="\n".join(x for x in ("Examples of misses and false positives:", misses, wrong) if x))


if __name__ == "__main__":
    main()

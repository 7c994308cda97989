"""Near-duplicate removal (data/dedup.py): MinHash LSH drops edited copies, keeps different documents,
keeps the first of each cluster, and `--near-dedupe` counts what it removed."""

import json
import random

from lmlab.cli import main
from lmlab.data.dedup import NearDuplicates, normalise, shingles


def fake_words(rng: random.Random, n: int) -> list[str]:
    vocab = ["".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(1, 4)))
             for _ in range(3000)]
    return [rng.choice(vocab) for _ in range(n)]


def edited(words: list[str], fraction: float, rng: random.Random) -> list[str]:
    """A copy with ``fraction`` of the words substituted (seeded)."""
    out = list(words)
    for i in rng.sample(range(len(words)), int(fraction * len(words))):
        out[i] = out[i] + "x"
    return out


def test_a_ten_percent_edited_copy_goes_and_a_different_document_stays():
    rng = random.Random(0)
    original, other = fake_words(rng, 300), fake_words(rng, 300)
    copy = edited(original, 0.10, rng)  # word 2-gram Jaccard about 0.68
    near = NearDuplicates(jaccard=0.5, num_perm=128, shingle=2)
    verdicts = [near(" ".join(w)) for w in (original, copy, other)]
    assert verdicts == [True, False, True]


def test_default_parameters_drop_a_lightly_edited_copy_only():
    rng = random.Random(1)
    original = fake_words(rng, 400)
    near = NearDuplicates()  # jaccard 0.8, 128 permutations, 5-word shingles
    assert near(" ".join(original))
    assert not near(" ".join(edited(original, 0.01, rng)).upper() + " !!!")  # case and punctuation are normalised
    assert near(" ".join(edited(original, 0.20, rng)))  # 5-gram Jaccard about 0.2: a different document here


def test_the_first_of_a_cluster_stays_and_later_ones_are_compared_with_it():
    near = NearDuplicates(jaccard=0.8, shingle=3)
    docs = ["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"] * 3 + ["", "!!!"]
    assert [near(d) for d in docs] == [True, False, False, True, True]  # no words: nothing to compare


def test_normalised_shingles():
    assert normalise("Hello, WORLD -- it's 2024!") == ["hello", "world", "it", "s", "2024"]
    assert shingles(["a", "b", "c"], 2) == {b"a b", b"b c"}
    assert shingles(["a"], 5) == {b"a"}


def test_cli_near_dedupe_counts_in_meta(tmp_path, capsys):
    rng = random.Random(2)
    original = fake_words(rng, 200)
    lines = [" ".join(original), " ".join(fake_words(rng, 200)), " ".join(edited(original, 0.01, rng))]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in lines) + "\n")
    code = main(["data", "prepare", str(tmp_path / "c.jsonl"), "--kind", "byte", "--val-fraction", "0",
                 "--near-dedupe", "--jaccard", "0.7", "-o", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and "near_duplicates" in out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["filters"]["removed"]["near_duplicates"] == {"documents": 1, "bytes": len(lines[2].encode())}
    assert meta["filters"]["config"] == {"near_dedupe": True, "jaccard": 0.7}
    assert meta["splits"]["train"]["documents"] == 2

"""Toy sentiment data shared by the classification tests: a label word hidden among filler words."""

import random

POSITIVE = ["great", "lovely", "superb", "moving", "brilliant", "charming"]
NEGATIVE = ["awful", "dull", "boring", "clumsy", "tedious", "bland"]
FILLER = ["the", "film", "was", "a", "story", "and", "plot", "acting", "really", "quite", "its", "cast"]


def sentences(n: int, seed: int, label_words: int = 6, filler_words: int = 12,
              fillers: tuple[int, int] = (3, 9)) -> list[tuple[str, str]]:
    """n (sentence, label) rows: label "1" when one of the first ``label_words`` positive words is among
    ``fillers`` (min, max) words drawn from the first ``filler_words`` filler words, "0" for a negative one."""
    rng = random.Random(seed)
    positive, negative, filler = POSITIVE[:label_words], NEGATIVE[:label_words], FILLER[:filler_words]
    rows = []
    for _ in range(n):
        label = rng.choice(["0", "1"])
        words = rng.choices(filler, k=rng.randint(*fillers))
        words.insert(rng.randrange(len(words) + 1), rng.choice(positive if label == "1" else negative))
        rows.append((" ".join(words), label))
    return rows


def write_tsv(path, rows):
    """``rows`` as a sentence<TAB>label file with a header; returns ``path``."""
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
    return path

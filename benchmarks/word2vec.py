"""word2vec on WikiText-2: lmlab (configs/word2vec_wikitext2.yaml, the one training loop) against gensim's
Word2Vec (workers=2) with the same settings, in one run: analogy accuracy on the Google analogy set
(questions-words.txt, top 30,000 words) and Spearman on WordSim-353, both from gensim's test data and both
scored for both models by gensim's own evaluate_word_analogies / evaluate_word_pairs (lmlab's vectors are
loaded into gensim KeyedVectors; lmlab's own scores are reported beside them), words/s and wall time.

    python benchmarks/word2vec.py                  # skip-gram, 5 epochs
    python benchmarks/word2vec.py --epochs 2       # what fits a busy machine
    python benchmarks/word2vec.py --mode cbow
    python benchmarks/word2vec.py --seeds 5        # both systems with seeds 1..5: means and spreads
    python benchmarks/word2vec.py --seeds 5 --gensim-alpha 0.0375   # and gensim at lmlab's learning rate

words/s is words read (the train split's 2.09M words, <eos> included, times the epochs) over the wall
time of training, both clocks started after the library is imported: gensim reading the sentences,
building its vocabulary and training; lmlab running what `lmlab train` runs in this process (reading the
shards, the vocabulary, training, the checkpoint and the plots). `time_ratio_with_cli_start` adds what a
fresh `lmlab train` process spends before that (interpreter start, importing torch and lmlab; measured
once as cli_start_s).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESTRICT = 30000


def lmlab(*args: str) -> str:
    """Run the lmlab CLI in a fresh process, failing loudly; return its stdout."""
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", *args], check=True, cwd=ROOT, stdout=subprocess.PIPE,
                          text=True)
    return done.stdout

# A fresh process that imports lmlab (torch included), then times what `lmlab train CONFIG OVERRIDES...` runs:
# reading the shards, the vocabulary, training, the checkpoint and the plots. Its last line: the seconds.
TIMED_TRAIN = """
import sys, time
from lmlab.config import load_config
from lmlab.train.lm import pretrain
cfg = load_config(sys.argv[1], sys.argv[2:])
started = time.perf_counter()
pretrain(cfg, force=True)
print(time.perf_counter() - started)
"""


def cli_start_seconds() -> float:
    """Wall seconds of a fresh interpreter importing what `lmlab train` imports before it starts (torch
    included): what the command line adds to the in-process time of lmlab's rows."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import lmlab.cli, lmlab.train.lm"], check=True, cwd=ROOT)
    return time.perf_counter() - started


def gensim_scores(kv, questions: str, pairs: str) -> dict:
    """gensim's own evaluation of KeyedVectors ``kv``."""
    accuracy, _ = kv.evaluate_word_analogies(questions, restrict_vocab=RESTRICT)
    _, spearman, oov = kv.evaluate_word_pairs(pairs)
    return {"analogy_acc": float(accuracy), "wordsim_spearman": float(spearman[0]), "wordsim_oov_pct": float(oov)}


def run_gensim(train: Path, args, seed: int, alpha: float | None = None) -> tuple[dict, object]:
    """Train gensim's Word2Vec on the lines of ``train`` with ``seed`` (its own learning rates, or ``alpha``
    decayed to alpha / 250, the ratio of its defaults); its row and its vectors."""
    from gensim.models import Word2Vec

    started = time.perf_counter()
    sentences = [line.split() for line in train.open(encoding="utf-8") if line.split()]
    rates = {} if alpha is None else {"alpha": alpha, "min_alpha": alpha / 250}
    model = Word2Vec(sentences, vector_size=args.dim, window=args.window, negative=args.negatives, min_count=5,
                     sample=1e-3, sg=int(args.mode == "skipgram"), workers=2, epochs=args.epochs, seed=seed, **rates)
    seconds = time.perf_counter() - started
    system = f"gensim {__import__('gensim').__version__} (workers=2{'' if alpha is None else f', alpha {alpha}'})"
    return {"system": system, "seed": seed, "wall_s": seconds}, model.wv


def prepare_words(train: Path, valid: Path, out: Path) -> Path:
    """Word-level shards of WikiText-2 for lmlab (once for all seeds)."""
    data = out / "words"
    lmlab("data", "prepare", str(train), "--val", str(valid), "--kind", "word", "-o", str(data), "--force", "-q")
    return data


def run_lmlab(data: Path, out: Path, args, seed: int) -> tuple[dict, object, dict]:
    """Train the recipe on ``data`` with ``seed`` and read the vectors back; its row, KeyedVectors, lmlab's own scores."""
    from gensim.models import KeyedVectors
    from gensim.test.utils import datapath

    from lmlab.inspect.embeddings import EmbeddingSpace
    from lmlab.train.checkpoint import load_checkpoint

    run = out / "run"
    overrides = [f"data.path={data}", f"train.out_dir={run}", f"train.epochs={args.epochs}",
                 f"model.w2v_mode={args.mode}", f"model.d_model={args.dim}", f"word2vec.window={args.window}",
                 f"word2vec.negatives={args.negatives}", f"train.seed={seed}", "train.progress=false",
                 *args.overrides]
    seconds = float(subprocess.run([sys.executable, "-c", TIMED_TRAIN, "configs/word2vec_wikitext2.yaml", *overrides],
                                   check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True).stdout.split()[-1])
    ckpt = load_checkpoint(run)
    space = EmbeddingSpace.from_model(ckpt.model, ckpt.tokenizer, ckpt.manifest)
    kv = KeyedVectors(args.dim)
    kv.add_vectors([space.words[i] for i in space.allowed], np.asarray(space.unit[space.allowed]))
    own = {"lmlab_analogy_acc": space.evaluate_analogies(datapath("questions-words.txt"), RESTRICT)["accuracy"],
           "lmlab_wordsim_spearman": space.evaluate_similarity(datapath("wordsim353.tsv"))["spearman"]}
    system = "lmlab (" + " ".join(o for o in overrides[2:] if not o.startswith("train.seed=")) + ")"
    return {"system": system, "seed": seed, "wall_s": seconds}, kv, own


def mean_row(rows: list[dict], system: str) -> dict:
    """The mean of the seeds' rows of one system (std of the scores in the *_std columns)."""
    row = {"system": f"{system}: mean of {len(rows)} seeds", "seed": "all"}
    for key in ("analogy_acc", "wordsim_spearman", "wordsim_oov_pct", "words_per_s", "wall_s"):
        values = np.array([r[key] for r in rows], dtype=float)
        row[key] = float(values.mean())
        if key in ("analogy_acc", "wordsim_spearman") and len(rows) > 1:
            row[f"{key}_std"] = float(values.std(ddof=1))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED_DATA / "wikitext-2"), help="folder with train.txt and valid.txt")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "word2vec"), help="scratch folder")
    p.add_argument("--mode", choices=["skipgram", "cbow"], default="skipgram")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--dim", type=int, default=100)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--negatives", type=int, default=5)
    p.add_argument("--seed", type=int, default=1, help="the first seed (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per system, from --seed on; the goal compares the "
                                                       "means (default: %(default)s)")
    p.add_argument("--gensim-alpha", type=float, default=None,
                   help="also run gensim with this learning rate (e.g. lmlab's per pair), beside its default 0.025")
    p.add_argument("--name", default="word2vec_wikitext2", help="results/<name>.json and .md")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for lmlab's run")
    args = p.parse_args()
    from gensim.test.utils import datapath

    logging.basicConfig(level=logging.WARNING)
    src, out = Path(args.data), Path(args.out)
    train, valid = src / "train.txt", src / "valid.txt"
    words = sum(len(line.split()) + 1 for line in train.open(encoding="utf-8"))  # <eos> per line, as lmlab reads it
    questions, pairs = datapath("questions-words.txt"), datapath("wordsim353.tsv")
    if args.seeds < 1:
        sys.exit(f"error: --seeds must be at least 1, got {args.seeds}")
    data = prepare_words(train, valid, out)
    start_s = cli_start_seconds()
    per_seed: dict[str, list[dict]] = {"gensim": [], "lmlab": [], "gensim_alpha": []}
    for seed in range(args.seed, args.seed + args.seeds):
        row, kv = run_gensim(train, args, seed)
        per_seed["gensim"].append({**row, **gensim_scores(kv, questions, pairs)})
        if args.gensim_alpha is not None:
            row, kv = run_gensim(train, args, seed, args.gensim_alpha)
            per_seed["gensim_alpha"].append({**row, **gensim_scores(kv, questions, pairs)})
        row, kv, own = run_lmlab(data, out, args, seed)
        per_seed["lmlab"].append({**row, **gensim_scores(kv, questions, pairs), **own})
    rows = per_seed["gensim"] + per_seed["gensim_alpha"] + per_seed["lmlab"]
    for r in rows:
        r["words_per_s"] = words * args.epochs / r["wall_s"]
    systems = [k for k in ("gensim", "gensim_alpha", "lmlab") if per_seed[k]]
    labels = {"gensim": "gensim", "gensim_alpha": f"gensim alpha {args.gensim_alpha}", "lmlab": "lmlab"}
    means = {k: mean_row(per_seed[k], labels[k]) if args.seeds > 1 else per_seed[k][0] for k in systems}
    gensim, ours = means["gensim"], means["lmlab"]
    if args.seeds > 1:
        rows += list(means.values())
    met = (ours["analogy_acc"] >= gensim["analogy_acc"] and ours["wordsim_spearman"] >= gensim["wordsim_spearman"]
           and ours["wall_s"] <= 2 * gensim["wall_s"])
    summary = {
        "settings": f"{args.mode}, dim {args.dim}, window {args.window}, negatives {args.negatives}, min_count 5, "
                    f"sample 1e-3, {args.epochs} epochs, {words:,} words per epoch",
        "seeds": f"{args.seed}..{args.seed + args.seeds - 1}" if args.seeds > 1 else str(args.seed),
        "time_ratio_lmlab_over_gensim": round(ours["wall_s"] / gensim["wall_s"], 2),
        "time_ratio_with_cli_start": round((ours["wall_s"] + start_s) / gensim["wall_s"], 2),
        "cli_start_s": round(start_s, 2),
        "analogy_acc_lmlab_minus_gensim": round(ours["analogy_acc"] - gensim["analogy_acc"], 4),
        "spearman_lmlab_minus_gensim": round(ours["wordsim_spearman"] - gensim["wordsim_spearman"], 4),
        "goal": "accuracy and Spearman >= gensim's (means over the seeds), time <= 2x gensim's",
        "met": met,
    }
    if "gensim_alpha" in means:
        same = means["gensim_alpha"]
        summary[f"analogy_acc_lmlab_minus_gensim_alpha_{args.gensim_alpha}"] = round(
            ours["analogy_acc"] - same["analogy_acc"], 4)
        summary[f"spearman_lmlab_minus_gensim_alpha_{args.gensim_alpha}"] = round(
            ours["wordsim_spearman"] - same["wordsim_spearman"], 4)
    notes = ("Both rows scored by gensim's evaluate_word_analogies (restrict_vocab 30,000) and evaluate_word_pairs; "
             "lmlab_* columns: the same scores computed by `lmlab inspect embeddings` (they should agree). "
             "With --seeds N, one row per system and seed, then each system's mean (the spread across seeds as "
             "the std columns): the goal compares the means. wall_s: both clocks start once the library is "
             "imported (lmlab in a fresh process, through the function `lmlab train` calls); "
             "time_ratio_with_cli_start adds a fresh process's start-up (cli_start_s).")
    write_results(args.name, rows, summary, notes,
                  columns=["system", "seed", "analogy_acc", "analogy_acc_std", "wordsim_spearman", "wordsim_spearman_std",
                           "wordsim_oov_pct", "words_per_s", "wall_s", "lmlab_analogy_acc", "lmlab_wordsim_spearman"])
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

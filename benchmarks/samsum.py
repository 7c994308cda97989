"""SAMSum dialogue summarization: lmlab encoder-decoders against the LONGEST-3 baseline.

Recipes (``--recipes``, each its own row): ``transformer``, a Transformer trained from scratch on one
joint BPE of 8k (configs/samsum_transformer.yaml); ``minilm``, the all-MiniLM-L6-v2 encoder warm-started
under a new decoder, on its own WordPiece (configs/samsum_minilm.yaml). A recipe's figure counts its
whole wall time from its first command: preparing the data, training (``lmlab train``, stopped by
train.max_minutes) and summarizing the test set (``lmlab eval seq2seq ... --metrics rouge``, beam
search), each a fresh ``lmlab`` process. ROUGE-1/2/L/Lsum are rouge-score's F-measures with stemming, x100
(lmlab's eval/text_metrics.py); the LONGEST-3 row (the dialogue's three longest utterances, the SAMSum
paper's lead baseline) is scored by the same code on the same references. The paper's ROUGE-L is
summary-level: compare it with rougeLsum.

    python benchmarks/samsum.py                              # the issue's goal: beat longest-3 in 60 min
    python benchmarks/samsum.py --recipes transformer,minilm # both rows, one after the other
    python benchmarks/samsum.py --recipes minilm --name samsum_minilm   # one row, its own results file
    python benchmarks/samsum.py train.max_minutes=5          # overrides go to every recipe
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, write_results  # noqa: E402
from lmlab.data.pairs import PairShards  # noqa: E402
from lmlab.eval.text_metrics import longest_k, rouge  # noqa: E402
from lmlab.runs import RunFolder  # noqa: E402
from lmlab.train.logger import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# name -> (config, row name, how `lmlab data prepare` gets its tokenizer: None = train the joint BPE)
RECIPES = {
    "transformer": ("configs/samsum_transformer.yaml", "Transformer (lmlab, from scratch)", None),
    "minilm": ("configs/samsum_minilm.yaml", "MiniLM-L6 encoder + new decoder (lmlab, warm start)", "all-MiniLM-L6-v2"),
}
GOAL = "beat LONGEST-3 on ROUGE-1, ROUGE-2 and ROUGE-L within 60 min of wall time on a 2-core CPU"
PAPER = {"longest-3 (paper)": (32.46, 10.27, 29.92), "Transformer from scratch (paper)": (36.62, 11.18, 33.06)}
COLUMNS = ["system", "rouge1", "rouge2", "rougeL", "rougeLsum", "steps", "val_loss", "wall_min"]


def lmlab(*args: str) -> float:
    """Run one lmlab command in a fresh process (failing loudly); return its wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmlab.cli", *map(str, args)], check=True, cwd=ROOT)
    return time.perf_counter() - start


def rounded(scores: dict) -> dict:
    return {k: round(scores[k], 2) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}


def run_recipe(name: str, src: Path, out: Path, args: argparse.Namespace) -> tuple[dict, dict, dict, Path]:
    """Prepare, train and evaluate one recipe in fresh folders under ``out``: its row, its summary lines, its
    test scores and its data folder."""
    config, system, tokenizer = RECIPES[name]
    data, run, report = out / f"data_{name}", out / name, out / f"{name}-test"
    for folder in (data, run, report):
        shutil.rmtree(folder, ignore_errors=True)
    vocab = ["--vocab-size", args.vocab_size] if tokenizer is None else ["--tokenizer", tokenizer]
    prepare_s = lmlab("data", "prepare", "--pairs", src / "train.csv.gz", "--val", src / "validation.csv", "--test",
                      src / "test.csv", "--source-field", "dialogue", "--target-field", "summary", *vocab, "-o", data)
    train_s = lmlab("train", config, f"data.path={data}", f"train.out_dir={run}", "train.progress=false",
                    *args.overrides)
    eval_s = lmlab("eval", "seq2seq", run, "--data", data, "--split", "test", "--metrics", "rouge",
                   "--num-beams", args.num_beams, "--max-new-tokens", args.max_new_tokens, "--out", report)
    model = json.loads((report / "results.json").read_text())
    evals = [r for r in read_metrics(RunFolder(run).metrics) if "val_loss" in r]
    wall = prepare_s + train_s + eval_s
    row = {"system": system, **rounded(model), "steps": evals[-1]["step"] if evals else None,
           "val_loss": round(evals[-1]["val_loss"], 3) if evals else None, "wall_min": round(wall / 60, 1)}
    summary = {"wall_min": round(wall / 60, 1), "prepare / train / eval min":
               f"{prepare_s / 60:.1f} / {train_s / 60:.1f} / {eval_s / 60:.1f}", "rouge": model.get("rouge_signature")}
    return row, summary, model, data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED_DATA / "samsum"), help="folder with train.csv.gz, validation.csv, "
                   "test.csv")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "samsum"), help="scratch folder for runs")
    p.add_argument("--recipes", default="transformer", help=f"comma-separated, each its own row: "
                   f"{', '.join(RECIPES)} (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8000, help="joint BPE vocabulary of the transformer recipe "
                   "(default: %(default)s)")
    p.add_argument("--num-beams", type=int, default=4, help="beam width of the test summaries (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="longest summary in tokens (default: %(default)s)")
    p.add_argument("--name", default="samsum", help="results file name under benchmarks/results, so that a run of "
                   "one recipe does not overwrite another's rows (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every recipe")
    args = p.parse_args()
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not recipes:
        p.error(f"--recipes: unknown {', '.join(unknown) or 'nothing'}; choose from {', '.join(RECIPES)}")
    src, out = Path(args.data), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    rows, summary, scores = [], {"goal": GOAL}, {}
    for name in recipes:
        row, info, scores[name], data = run_recipe(name, src, out, args)
        rows.append(row)
        summary.update({f"{name}: {key}": value for key, value in info.items()})
    texts = PairShards(data, "test").texts()  # the same texts in every recipe's data folder
    baseline = rouge([longest_k(t["source"], 3) for t in texts], [t["target"] for t in texts])
    for row, name in zip(rows, recipes):
        beaten = all(scores[name][k] > baseline[k] for k in ("rouge1", "rouge2", "rougeLsum"))
        summary[f"{name}: goal_met"] = beaten and row["wall_min"] <= 60
    rows.append({"system": "longest-3 (lmlab's metric code)", **rounded(baseline)})
    rows += [{"system": name, "rouge1": r1, "rouge2": r2, "rougeLsum": rl} for name, (r1, r2, rl) in PAPER.items()]
    summary.update({"test set": f"{len(texts)} dialogues", "evaluation": f"beam {args.num_beams}, at most "
                    f"{args.max_new_tokens} new tokens"})
    write_results(args.name, rows, summary, notes=__doc__.split("\n\n")[0], columns=COLUMNS)


if __name__ == "__main__":
    main()

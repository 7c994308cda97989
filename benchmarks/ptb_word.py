"""Penn Treebank, word level: recurrent recipes against the published test perplexities.

Runs as a user would, through the CLI in fresh processes: ``lmlab data prepare`` (word tokenizer
trained on ptb.train.txt, the official valid/test files as val/test splits), ``lmlab train``, then
``lmlab eval ppl --split test`` (the state carried through the whole test text).

    python benchmarks/ptb_word.py                      # the small LSTM (about 20 minutes on 2 CPU cores)
    python benchmarks/ptb_word.py --recipes medium     # the medium LSTM (hours on a CPU; use a GPU)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, write_results  # noqa: E402
from lmlab.runs import RunFolder  # noqa: E402
from lmlab.train.logger import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {  # name: (config, published test perplexity of Zaremba et al. 2014, our target)
    "small": ("configs/ptb_lstm_small.yaml", 114.5, 115.0),
    "medium": ("configs/ptb_lstm_medium.yaml", 82.7, None),
}


def lmlab(*args: str, capture: bool = False) -> str:
    """Run the lmlab CLI in a fresh process, failing loudly; return its stdout when captured."""
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", *args], check=True, cwd=ROOT,
                          stdout=subprocess.PIPE if capture else None, text=True)
    return done.stdout if capture else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="small", help="comma-separated: small, medium (default: small)")
    p.add_argument("--data", default=str(SHARED_DATA / "ptb"), help="folder with ptb.{train,valid,test}.txt")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "ptb"), help="scratch folder for runs")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate runs already in --out (OUT/data, OUT/<recipe>) instead of training them")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every recipe")
    args = p.parse_args()
    src, out = Path(args.data), Path(args.out)
    if not (src / "ptb.train.txt").is_file():
        sys.exit(f"error: {src}/ptb.train.txt not found (see ../shared/data/README.md)")
    data = out / "data"
    if not args.eval_only:
        shutil.rmtree(data, ignore_errors=True)
        lmlab("data", "prepare", str(src / "ptb.train.txt"), "--val", str(src / "ptb.valid.txt"),
              "--test", str(src / "ptb.test.txt"), "--kind", "word", "-o", str(data))
    rows, curves = [], {}
    for name in [n.strip() for n in args.recipes.split(",") if n.strip()]:
        config, published, target = RECIPES[name]
        run = out / name
        if not args.eval_only:
            shutil.rmtree(run, ignore_errors=True)
            lmlab("train", config, f"data.path={data}", f"train.out_dir={run}", "train.progress=false", *args.overrides)
        records = read_metrics(RunFolder(run).metrics)
        minutes = max(r.get("elapsed_s", 0) for r in records) / 60
        curves[name] = [(r["elapsed_s"], r["val_ppl"]) for r in records if "val_ppl" in r]
        results = {split: json.loads(lmlab("eval", "ppl", str(run), "--data", str(data), "--split", split,
                                           capture=True)) for split in ("val", "test")}
        test = results["test"]["perplexity"]
        rows.append({"recipe": name, "config": config, "train_minutes": round(minutes, 1),
                     "val_ppl": round(results["val"]["perplexity"], 1), "test_ppl": round(test, 1),
                     "published_test_ppl": published, "target": target,
                     "met": "" if target is None else ("yes" if test <= target else "NO")})
    curve_md = "\n".join(f"- {n}: " + ", ".join(f"{t / 60:.0f} min → {v:.1f}" for t, v in c) for n, c in curves.items())
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    write_results("ptb_word" if names == ["small"] else "ptb_word_" + "_".join(names), rows, {"recipes": args.recipes},
                  extra_md="Val perplexity during training (the trainer's periodic evaluation) against training "
                           f"time:\n\n{curve_md}",
                  notes="Penn Treebank (Mikolov's word-level version, 10k vocabulary). Perplexity with the "
                        "recurrent state carried through the whole split. Published: Zaremba et al. (2014).")


if __name__ == "__main__":
    main()

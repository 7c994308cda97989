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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, write_results  # noqa: E402

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
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every recipe")
    args = p.parse_args()
    src, out = Path(args.data), Path(args.out)
    if not (src / "ptb.train.txt").is_file():
        sys.exit(f"error: {src}/ptb.train.txt not found (see ../shared/data/README.md)")
    data = out / "data"
    shutil.rmtree(data, ignore_errors=True)
    lmlab("data", "prepare", str(src / "ptb.train.txt"), "--val", str(src / "ptb.valid.txt"),
          "--test", str(src / "ptb.test.txt"), "--kind", "word", "-o", str(data))
    rows = []
    for name in [n.strip() for n in args.recipes.split(",") if n.strip()]:
        config, published, target = RECIPES[name]
        run = out / name
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.time()
        lmlab("train", config, f"data.path={data}", f"train.out_dir={run}", "train.progress=false", *args.overrides)
        minutes = (time.time() - t0) / 60
        results = {split: json.loads(lmlab("eval", "ppl", str(run), "--data", str(data), "--split", split,
                                           capture=True)) for split in ("val", "test")}
        test = results["test"]["perplexity"]
        rows.append({"recipe": name, "config": config, "train_minutes": round(minutes, 1),
                     "val_ppl": round(results["val"]["perplexity"], 1), "test_ppl": round(test, 1),
                     "published_test_ppl": published, "target": target,
                     "met": "" if target is None else ("yes" if test <= target else "NO")})
    write_results("ptb_word", rows, {"recipes": args.recipes},
                  notes="Penn Treebank (Mikolov's word-level version, 10k vocabulary). Perplexity with the "
                        "recurrent state carried through the whole split. Published: Zaremba et al. (2014).")


if __name__ == "__main__":
    main()

"""Does masked-LM pretraining pay? A small encoder pretrained on WikiText-2, then fine-tuned on SST-2,
beside the same encoder fine-tuned from random initialisation in the same budget (issue 15).

Steps, each a fresh ``lmlab`` process as a user runs it: ``lmlab data prepare`` WikiText-2 (byte-level
BPE, 8192), ``lmlab train configs/wikitext2_mlm.yaml`` (stopped by ``train.max_minutes``, 20 by default),
``lmlab eval ppl`` of the MLM checkpoint (masked-token loss and accuracy), then ``lmlab finetune classify
configs/sst2_wikitext2_mlm.yaml`` twice: from the pretrained checkpoint and from a random one. The random
checkpoint is the same recipe saved after one step at a learning rate of 1e-30 (its weights are its
initialisation to ~1e-30), so both rows share the architecture, the tokenizer (with [MASK]) and every
fine-tuning setting. Goal: pretrained >= random + 3 points of SST-2 dev accuracy.

    python benchmarks/mlm_sst2.py                                   # ~20 min pretraining + 2 x 10 min
    python benchmarks/mlm_sst2.py --pretrain-minutes 2 --finetune-minutes 1    # a quick check of the script
    python benchmarks/mlm_sst2.py mlm.mask_prob=0.3 --finetune train.lr=1e-4 --name mlm_sst2_mask30   # overrides of either recipe
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
from lmlab.runs import RunFolder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN, FINETUNE = "configs/wikitext2_mlm.yaml", "configs/sst2_wikitext2_mlm.yaml"
GOAL_POINTS = 3.0


def lmlab(*args: str) -> float:
    """Run one lmlab command in a fresh process (failing loudly); return its wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmlab.cli", *map(str, args)], check=True, cwd=ROOT)
    return time.perf_counter() - start


def finetune(name: str, base: Path, sst2: Path, out: Path, minutes: float, overrides: list[str]) -> dict:
    """Fine-tune on SST-2 from checkpoint ``base``; the table row of its dev results."""
    run = out / f"sst2_{name.replace(' ', '_')}"
    seconds = lmlab("finetune", "classify", FINETUNE, f"model.path={base}", f"train.out_dir={run}",
                    f"data.train={sst2 / 'train.tsv'}", f"data.val={sst2 / 'dev.tsv'}",
                    f"train.max_minutes={minutes}", "train.progress=false", *overrides, "--force")
    results = json.loads((run / "results.json").read_text())
    return {"encoder": name, "dev_accuracy_%": round(100 * results["accuracy"], 2),
            "dev_macro_f1": round(results["macro_f1"], 4), "finetune_steps": results["steps"],
            "finetune_minutes": round(results["train_seconds"] / 60, 1), "wall_s": round(seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wikitext", default=str(SHARED_DATA / "wikitext-2"), help="folder with train.txt, valid.txt")
    p.add_argument("--sst2", default=str(SHARED_DATA / "sst2"), help="folder with train.tsv and dev.tsv")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "mlm_sst2"), help="scratch folder for runs")
    p.add_argument("--pretrain-minutes", type=float, default=20.0, help="MLM pretraining budget (default: 20)")
    p.add_argument("--finetune-minutes", type=float, default=10.0, help="each fine-tuning's budget (default: 10)")
    p.add_argument("pretrain_overrides", nargs="*", metavar="KEY=VALUE",
                   help=f"overrides of the pretraining recipe ({PRETRAIN}), e.g. mlm.whole_word=true")
    p.add_argument("--finetune", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"overrides of the fine-tuning recipe ({FINETUNE}), applied to both rows")
    p.add_argument("--name", default="mlm_sst2", help="results file name under benchmarks/results (default: mlm_sst2)")
    args = p.parse_args()
    wikitext, sst2, out = Path(args.wikitext), Path(args.sst2), Path(args.out)
    for needed in (wikitext / "train.txt", sst2 / "train.tsv"):
        if not needed.is_file():
            sys.exit(f"error: {needed} not found (see ../shared/data/README.md)")
    shutil.rmtree(out, ignore_errors=True)
    data, mlm, random = out / "data", out / "mlm", out / "random"
    lmlab("data", "prepare", wikitext / "train.txt", "--val", wikitext / "valid.txt", "--vocab-size", "8192",
          "-o", data)
    pretrain_s = lmlab("train", PRETRAIN, f"data.path={data}", f"train.out_dir={mlm}",
                       f"train.max_minutes={args.pretrain_minutes}", "train.progress=false", *args.pretrain_overrides)
    lmlab("eval", "ppl", mlm, "--data", data, "--out", out / "mlm_eval")
    masked = json.loads((out / "mlm_eval" / "results.json").read_text())
    lmlab("train", PRETRAIN, f"data.path={data}", f"train.out_dir={random}",
          *args.pretrain_overrides, "train.max_steps=1", "train.warmup_steps=0", "train.lr=1e-30", "train.min_lr=0",
          "train.progress=false")
    manifest = json.loads((RunFolder(mlm).checkpoints()[-1] / "manifest.json").read_text())
    objective = manifest.get("mlm", {}).get("objective", "mlm")
    rows = [finetune(f"{objective.upper()}-pretrained", mlm, sst2, out, args.finetune_minutes, args.finetune),
            finetune("random init", random, sst2, out, args.finetune_minutes, args.finetune)]
    gain = rows[0]["dev_accuracy_%"] - rows[1]["dev_accuracy_%"]
    summary = {"pretraining minutes (wall)": round(pretrain_s / 60, 1),
               # of an ELECTRA run: its generator's (lmlab eval ppl scores the generator)
               "MLM val masked loss / accuracy": f"{masked['masked_loss']:.3f} / {100 * masked['accuracy']:.1f}%",
               "gain (points)": round(gain, 2), "goal": f"pretrained >= random init + {GOAL_POINTS} points",
               "goal met": gain >= GOAL_POINTS,
               "pretraining overrides": " ".join(args.pretrain_overrides) or "none",
               "fine-tuning overrides": " ".join(args.finetune) or "none"}
    write_results(args.name, rows, summary,
                  notes=f"A 4 x 256 encoder ({PRETRAIN}) pretrained as a masked LM on WikiText-2 for "
                        f"{args.pretrain_minutes:g} min, then fine-tuned on SST-2 ({FINETUNE}, "
                        f"{args.finetune_minutes:g} min each) beside the same encoder from random initialisation.")


if __name__ == "__main__":
    main()

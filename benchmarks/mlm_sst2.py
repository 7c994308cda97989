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
    python benchmarks/mlm_sst2.py --reuse --seeds 1337 1 2          # fine-tune the same two checkpoints with 3 seeds

SST-2's dev set has 872 sentences: one fine-tuning's accuracy moves by about half a point with its seed, so
``--seeds`` fine-tunes each row once per seed and the table shows the mean (and each seed's figure).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, write_results  # noqa: E402
from lmlab.runs import RunFolder  # noqa: E402
from lmlab.train.logger import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN, FINETUNE = "configs/wikitext2_mlm.yaml", "configs/sst2_wikitext2_mlm.yaml"
GOAL_POINTS = 3.0


def lmlab(*args: str) -> float:
    """Run one lmlab command in a fresh process (failing loudly); return its wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmlab.cli", *map(str, args)], check=True, cwd=ROOT)
    return time.perf_counter() - start


def finetune(name: str, base: Path, sst2: Path, out: Path, minutes: float, overrides: list[str], seed: int) -> dict:
    """Fine-tune on SST-2 from checkpoint ``base`` with one seed; its dev results."""
    run = out / f"sst2_{name.replace(' ', '_')}_seed{seed}"
    seconds = lmlab("finetune", "classify", FINETUNE, f"model.path={base}", f"train.out_dir={run}",
                    f"data.train={sst2 / 'train.tsv'}", f"data.val={sst2 / 'dev.tsv'}",
                    f"train.max_minutes={minutes}", f"train.seed={seed}", "train.progress=false", *overrides,
                    "--force")
    results = json.loads((run / "results.json").read_text())
    return {"accuracy": 100 * results["accuracy"], "macro_f1": results["macro_f1"], "steps": results["steps"],
            "minutes": results["train_seconds"] / 60, "wall_s": seconds}


def seeds_row(name: str, runs: list[dict], seeds: list[int]) -> dict:
    """One table row per encoder: the mean over fine-tuning seeds, with each seed's accuracy beside it."""
    accuracies = [r["accuracy"] for r in runs]
    return {"encoder": name, "dev_accuracy_%": round(statistics.mean(accuracies), 2),
            "std": round(statistics.stdev(accuracies), 2) if len(runs) > 1 else 0.0,
            "per_seed_%": " / ".join(f"{a:.2f}" for a in accuracies), "seeds": " ".join(map(str, seeds)),
            "dev_macro_f1": round(statistics.mean(r["macro_f1"] for r in runs), 4),
            "finetune_steps": runs[0]["steps"],
            "finetune_minutes": round(statistics.mean(r["minutes"] for r in runs), 1),
            "wall_s": round(sum(r["wall_s"] for r in runs), 1)}


def pretrain(args: argparse.Namespace, wikitext: Path, out: Path) -> float:
    """Prepare WikiText-2, pretrain the MLM, evaluate it and save its random-init twin; the pretraining's seconds."""
    shutil.rmtree(out, ignore_errors=True)
    data = out / "data"
    lmlab("data", "prepare", wikitext / "train.txt", "--val", wikitext / "valid.txt", "--vocab-size", "8192",
          "-o", data)
    seconds = lmlab("train", PRETRAIN, f"data.path={data}", f"train.out_dir={out / 'mlm'}",
                    f"train.max_minutes={args.pretrain_minutes}", "train.progress=false", *args.pretrain_overrides)
    lmlab("eval", "ppl", out / "mlm", "--data", data, "--out", out / "mlm_eval")
    lmlab("train", PRETRAIN, f"data.path={data}", f"train.out_dir={out / 'random'}",
          *args.pretrain_overrides, "train.max_steps=1", "train.warmup_steps=0", "train.lr=1e-30", "train.min_lr=0",
          "train.progress=false")
    return seconds


def reused_pretraining_seconds(out: Path) -> float:
    """The training seconds of an earlier pretraining in ``out`` (``--reuse``), from its metrics log."""
    logged = RunFolder(out / "mlm").metrics
    earlier = logged.is_file() and (out / "mlm_eval" / "results.json").is_file()
    if not (earlier and RunFolder(out / "random").checkpoints()):
        sys.exit(f"error: --reuse needs an earlier run of this script in {out} (pretraining, its eval, random init)")
    return max(record.get("elapsed_s", 0.0) for record in read_metrics(logged))


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
    p.add_argument("--seeds", nargs="+", type=int, default=[1337], metavar="SEED",
                   help="fine-tuning seeds: each row is fine-tuned once per seed and the table shows the mean "
                        "(default: 1337, the recipe's)")
    p.add_argument("--reuse", action="store_true",
                   help="keep the pretraining already in --out from an earlier run of this script; only fine-tune")
    p.add_argument("--name", default="mlm_sst2", help="results file name under benchmarks/results (default: mlm_sst2)")
    args = p.parse_args()
    wikitext, sst2, out = Path(args.wikitext), Path(args.sst2), Path(args.out)
    for needed in (wikitext / "train.txt", sst2 / "train.tsv"):
        if not needed.is_file():
            sys.exit(f"error: {needed} not found (see ../shared/data/README.md)")
    pretrain_s = reused_pretraining_seconds(out) if args.reuse else pretrain(args, wikitext, out)
    masked = json.loads((out / "mlm_eval" / "results.json").read_text())
    manifest = json.loads((RunFolder(out / "mlm").checkpoints()[-1] / "manifest.json").read_text())
    objective = manifest.get("mlm", {}).get("objective", "mlm")
    rows = []
    for name, base in ((f"{objective.upper()}-pretrained", out / "mlm"), ("random init", out / "random")):
        runs = [finetune(name, base, sst2, out, args.finetune_minutes, args.finetune, seed) for seed in args.seeds]
        rows.append(seeds_row(name, runs, args.seeds))
    gain = rows[0]["dev_accuracy_%"] - rows[1]["dev_accuracy_%"]
    seeds_note = f" (means over {len(args.seeds)} fine-tuning seeds)" if len(args.seeds) > 1 else ""
    summary = {"pretraining minutes": round(pretrain_s / 60, 1),
               # of an ELECTRA run: its generator's (lmlab eval ppl scores the generator)
               "MLM val masked loss / accuracy": f"{masked['masked_loss']:.3f} / {100 * masked['accuracy']:.1f}%",
               "gain (points)": round(gain, 2), "goal": f"pretrained >= random init + {GOAL_POINTS} points{seeds_note}",
               "goal met": gain >= GOAL_POINTS,
               "pretraining overrides": " ".join(args.pretrain_overrides) or "none",
               "fine-tuning overrides": " ".join(args.finetune) or "none"}
    write_results(args.name, rows, summary,
                  notes=f"A 4 x 256 encoder ({PRETRAIN}) pretrained as a masked LM on WikiText-2 for "
                        f"{args.pretrain_minutes:g} min, then fine-tuned on SST-2 ({FINETUNE}, "
                        f"{args.finetune_minutes:g} min each) beside the same encoder from random initialisation.")


if __name__ == "__main__":
    main()

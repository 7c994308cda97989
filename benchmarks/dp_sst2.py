"""GLUE SST-2 with LoRA on all-MiniLM-L6-v2: dev accuracy without privacy, at epsilon 8 and at epsilon 3,
the same recipe and budget (steps, batch, time) for each (configs/sst2_minilm_lora_dp.yaml).

Each row runs the recipe through the CLI in a fresh process (``lmlab finetune classify``): the non-private
row with train.dp off (ordinary shuffled batches, train.grad_clip), the private ones with DP-SGD
(Poisson-sampled batches, per-example clipping, noise for the target epsilon at delta 1/(2N)). Published
anchor: DP LoRA on RoBERTa-base reaches about 92% at epsilon about 7 (Yu et al., 2022). Goal: epsilon 8
within 5 points of non-private in 60 minutes on a CPU.

    python benchmarks/dp_sst2.py                                     # the full recipe (3 x up to 55 min)
    python benchmarks/dp_sst2.py --train-examples 4000 --epochs 1    # a short version (minutes)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, write_results  # noqa: E402
from lmlab.runs import RunFolder  # noqa: E402
from lmlab.train.logger import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/sst2_minilm_lora_dp.yaml"
ROWS = {"non-private": ["train.dp.target_epsilon=null"], "epsilon 8": ["train.dp.target_epsilon=8"],
        "epsilon 3": ["train.dp.target_epsilon=3"]}


def subsample(data: Path, n: int | None, out: Path, seed: int) -> Path:
    """data/train.tsv, or a seeded random ``n`` of its sentences written to out/train.tsv."""
    if n is None:
        return data / "train.tsv"
    header, *rows = (data / "train.tsv").read_text(encoding="utf-8").splitlines()
    random.Random(seed).shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.tsv").write_text("\n".join([header, *rows[:n]]) + "\n", encoding="utf-8")
    return out / "train.tsv"


def run_row(name: str, train: Path, dev: Path, out: Path, overrides: list[str], reuse: bool = False) -> dict:
    """Fine-tune one row to the end (with ``reuse``, read a finished run instead); its table row."""
    run = out / name.replace(" ", "_")
    if not (reuse and (run / "results.json").is_file()):
        shutil.rmtree(run, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "lmlab.cli", "finetune", "classify", CONFIG, f"train.out_dir={run}",
                        f"data.train={train}", f"data.val={dev}", "train.progress=false", *ROWS[name], *overrides],
                       check=True, cwd=ROOT)
    results = json.loads((run / "results.json").read_text())
    records = read_metrics(RunFolder(run).metrics)
    manifest = json.loads((RunFolder(run).checkpoints()[-1] / "manifest.json").read_text())
    privacy = manifest.get("privacy") or {}
    speed = [r["examples_per_s"] for r in records if "examples_per_s" in r][1:]
    return {"training": name, "dev_accuracy_%": round(100 * results["accuracy"], 2),
            "epsilon_spent": round(privacy["epsilon"], 3) if privacy.get("epsilon") is not None else None,
            "delta": privacy.get("delta"), "noise_multiplier": round(privacy["noise_multiplier"], 3) if privacy else None,
            "steps": results["steps"], "train_minutes": round(results["train_seconds"] / 60, 1),
            "examples_per_s": round(statistics.median(speed), 1) if speed else None,
            "peak_mem_MiB": round(results["peak_mem_mib"]), "trainable_params": results["trainable_params"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {', '.join(ROWS)}")
    p.add_argument("--data", default=str(SHARED_DATA / "sst2"), help="folder with train.tsv and dev.tsv")
    p.add_argument("--train-examples", type=int, default=None, help="train on a seeded random subset (short runs)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "dp_sst2"), help="scratch folder for runs")
    p.add_argument("--reuse", action="store_true", help="read rows whose run folder holds results.json instead of "
                                                         "training again (rows run in separate processes)")
    p.add_argument("--name", default="dp_sst2", help="results file name under benchmarks/results (default: dp_sst2)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every row")
    args = p.parse_args()
    data, out = Path(args.data), Path(args.out)
    if not (data / "train.tsv").is_file():
        sys.exit(f"error: {data}/train.tsv not found (see ../shared/data/README.md)")
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        sys.exit(f"error: unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    train = subsample(data, args.train_examples, out, seed=0)
    rows = [run_row(n, train, data / "dev.tsv", out, args.overrides, args.reuse) for n in names]
    by_name = {r["training"]: r for r in rows}
    summary = {"goal": "epsilon 8 within 5 points of non-private, in <= 60 min on this CPU",
               "train examples": args.train_examples or "all (67,349)", "overrides": " ".join(args.overrides) or "none"}
    if {"non-private", "epsilon 8"} <= set(by_name):
        gap = by_name["non-private"]["dev_accuracy_%"] - by_name["epsilon 8"]["dev_accuracy_%"]
        summary["epsilon 8 gap (points)"] = round(gap, 2)
        summary["meets goal"] = gap <= 5 and by_name["epsilon 8"]["train_minutes"] <= 60
    write_results(args.name, rows, summary,
                  notes=f"GLUE SST-2 dev (872 sentences), LoRA r 8 on all-MiniLM-L6-v2 with `{CONFIG}`; the rows "
                        "differ only in train.dp.target_epsilon. Published anchor: DP LoRA on RoBERTa-base about "
                        "92% at epsilon about 7 (Yu et al., 2022, 'Differentially private fine-tuning of language "
                        "models').")


if __name__ == "__main__":
    main()

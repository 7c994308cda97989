"""GLUE SST-2 sentiment: full fine-tuning vs LoRA of all-MiniLM-L6-v2, side by side.

Each method runs through the CLI in a fresh process (``lmlab finetune classify configs/sst2_minilm.yaml``,
plus the LoRA overrides), then the table reports dev accuracy and macro F1 (872 sentences), training
time, peak memory (RSS of the training process), training speed and the trainable-parameter count.

    python benchmarks/sst2.py                      # full and LoRA (about an hour on 2 CPU cores)
    python benchmarks/sst2.py --methods lora       # one of them
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED_DATA, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/sst2_minilm.yaml"
METHODS = {  # name: overrides of the recipe
    "full": [],
    "lora": ["lora.r=8", "lora.alpha=16", "train.lr=1e-3"],
}
ANCHORS = "BERT-base 92.7, DistilBERT 91.3, BiLSTM+ELMo 90.4, 2-layer LSTM about 86 (dev accuracy, %)"


def run_method(name: str, data: Path, out: Path, extra: list[str]) -> dict:
    """Fine-tune with one method; return its table row."""
    run = out / name
    shutil.rmtree(run, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "lmlab.cli", "finetune", "classify", CONFIG, f"train.out_dir={run}",
                    f"data.train={data / 'train.tsv'}", f"data.val={data / 'dev.tsv'}", "train.progress=false",
                    *METHODS[name], *extra], check=True, cwd=ROOT)
    results = json.loads((run / "results.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    speed = [r["examples_per_s"] for r in records if "examples_per_s" in r][1:]
    return {"method": name, "dev_accuracy_%": round(100 * results["accuracy"], 2),
            "dev_macro_f1": round(results["macro_f1"], 4), "trainable_params": results["trainable_params"],
            "trainable_%": round(100 * results["trainable_params"] / results["total_params"], 2),
            "train_minutes": round(results["train_seconds"] / 60, 1), "steps": results["steps"],
            "examples_per_s": round(statistics.median(speed), 1) if speed else None,
            "peak_mem_MiB": round(results["peak_mem_mib"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="full,lora", help="comma-separated: full, lora (default: both)")
    p.add_argument("--data", default=str(SHARED_DATA / "sst2"), help="folder with train.tsv and dev.tsv")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "sst2"), help="scratch folder for runs")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every method")
    args = p.parse_args()
    data = Path(args.data)
    if not (data / "train.tsv").is_file():
        sys.exit(f"error: {data}/train.tsv not found (see ../shared/data/README.md)")
    rows = [run_method(m.strip(), data, Path(args.out), args.overrides) for m in args.methods.split(",") if m.strip()]
    summary = {"goal": "full >= 90.0% in <= 30 min; LoRA within 1.5 points of full with <= 2% of the parameters"}
    by_name = {r["method"]: r for r in rows}
    if "full" in by_name:
        full = by_name["full"]
        summary["full meets goal"] = full["dev_accuracy_%"] >= 90.0 and full["train_minutes"] <= 30
    if {"full", "lora"} <= set(by_name):
        lora = by_name["lora"]
        summary["lora gap (points)"] = round(by_name["full"]["dev_accuracy_%"] - lora["dev_accuracy_%"], 2)
        summary["lora meets goal"] = summary["lora gap (points)"] <= 1.5 and lora["trainable_%"] <= 2.0
        summary["LoRA / full peak memory"] = round(lora["peak_mem_MiB"] / by_name["full"]["peak_mem_MiB"], 2)
        summary["LoRA / full examples per s"] = round(lora["examples_per_s"] / by_name["full"]["examples_per_s"], 2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_results("sst2", rows, summary,
                  notes="GLUE SST-2 (67,349 train / 872 dev sentences), fine-tuning all-MiniLM-L6-v2 (22.7M "
                        f"parameters) with `{CONFIG}`. Published anchors: {ANCHORS}.")


if __name__ == "__main__":
    main()

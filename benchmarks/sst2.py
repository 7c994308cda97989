"""GLUE SST-2 sentiment: full fine-tuning vs LoRA of all-MiniLM-L6-v2, side by side.

Each method runs its recipe through the CLI in a fresh process (``lmlab finetune classify
configs/sst2_minilm.yaml`` and ``configs/sst2_minilm_lora.yaml``); the table reports dev accuracy and
macro F1 (872 sentences), training time, peak memory (RSS of the training process), training speed
and the trainable-parameter count. The recipes differ in batch size, so a second table compares the
two methods at the same batch sizes: peak memory and time per step over a short run (no evaluation).

    python benchmarks/sst2.py                      # both recipes + the same-batch table (about 35 min)
    python benchmarks/sst2.py --methods lora       # one recipe
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED_DATA, markdown_table, write_results  # noqa: E402
from lmlab.runs import RunFolder  # noqa: E402
from lmlab.train.logger import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"full": "configs/sst2_minilm.yaml", "lora": "configs/sst2_minilm_lora.yaml"}
SAME_BATCH_SIZES = (32, 128)
SAME_BATCH_STEPS = 60
ANCHORS = "BERT-base 92.7, DistilBERT 91.3, BiLSTM+ELMo 90.4, 2-layer LSTM about 86 (dev accuracy, %)"


def finetune(name: str, data: Path, run: Path, overrides: list[str]) -> tuple[dict, list[dict]]:
    """Fine-tune with one method's recipe (plus overrides); return results.json ({} without evaluation) and
    the metrics records."""
    shutil.rmtree(run, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "lmlab.cli", "finetune", "classify", CONFIGS[name],
                    f"train.out_dir={run}", f"data.train={data / 'train.tsv'}", f"data.val={data / 'dev.tsv'}",
                    "train.progress=false", *overrides], check=True, cwd=ROOT)
    records = read_metrics(RunFolder(run).metrics)
    results = run / "results.json"
    return (json.loads(results.read_text()) if results.is_file() else {}), records


def recipe_row(name: str, data: Path, out: Path, extra: list[str]) -> dict:
    """The recipe of one method, to the end; its table row."""
    results, records = finetune(name, data, out / name, extra)
    config = yaml.safe_load(RunFolder(out / name).config.read_text())  # the resolved recipe
    speed = [r["examples_per_s"] for r in records if "examples_per_s" in r][1:]
    return {"method": name, "batch": config["train"]["batch_size"], "epochs": config["train"]["epochs"],
            "dev_accuracy_%": round(100 * results["accuracy"], 2),
            "dev_macro_f1": round(results["macro_f1"], 4), "trainable_params": results["trainable_params"],
            "trainable_%": round(100 * results["trainable_params"] / results["total_params"], 2),
            "train_minutes": round(results["train_seconds"] / 60, 1), "steps": results["steps"],
            "examples_per_s": round(statistics.median(speed), 1) if speed else None,
            "peak_mem_MiB": round(results["peak_mem_mib"])}


def same_batch_overrides(batch: int) -> list[str]:
    """The recipe cut to SAME_BATCH_STEPS steps of ``batch`` examples, without evaluation. No warmup:
    the recipes' (100 and 200 steps) would not fit in the run, which the config refuses, and the
    learning rate does not change the time or memory of a step."""
    return [f"train.batch_size={batch}", "train.epochs=null", f"train.max_steps={SAME_BATCH_STEPS}",
            "train.warmup_steps=0", "train.log_interval=10", "data.val="]


def same_batch_row(name: str, batch: int, data: Path, out: Path, extra: list[str]) -> dict:
    """A short run of one method at a given batch size (no evaluation): peak memory and time per step."""
    run = out / f"{name}_batch{batch}"
    _, records = finetune(name, data, run, same_batch_overrides(batch) + extra)
    speed = [r["examples_per_s"] for r in records if "examples_per_s" in r][1:]  # the first window warms up
    per_example_s = 1 / statistics.median(speed)
    return {"method": name, "batch": batch, "ms_per_step": round(1000 * per_example_s * batch, 1),
            "examples_per_s": round(1 / per_example_s, 1),
            "peak_mem_MiB": round(max(r["peak_mem_mib"] for r in records if "peak_mem_mib" in r))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="full,lora", help="comma-separated: full, lora (default: both)")
    p.add_argument("--data", default=str(SHARED_DATA / "sst2"), help="folder with train.tsv and dev.tsv")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "sst2"), help="scratch folder for runs")
    p.add_argument("--no-same-batch", action="store_true", help="skip the same-batch memory/step-time table")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every method")
    args = p.parse_args()
    data, out = Path(args.data), Path(args.out)
    if not (data / "train.tsv").is_file():
        sys.exit(f"error: {data}/train.tsv not found (see ../shared/data/README.md)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(CONFIGS))
    if unknown:
        sys.exit(f"error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    rows = [recipe_row(m, data, out, args.overrides) for m in methods]
    same_batch = [] if args.no_same_batch else [same_batch_row(m, b, data, out, args.overrides)
                                                  for b in SAME_BATCH_SIZES for m in methods]
    summary = {"goal": "full >= 90.0% in <= 30 min; LoRA within 1.5 points of full with <= 2% of the parameters"}
    by_name = {r["method"]: r for r in rows}
    if "full" in by_name:
        full = by_name["full"]
        summary["full meets goal"] = full["dev_accuracy_%"] >= 90.0 and full["train_minutes"] <= 30
    if {"full", "lora"} <= set(by_name):
        lora = by_name["lora"]
        summary["lora gap (points)"] = round(by_name["full"]["dev_accuracy_%"] - lora["dev_accuracy_%"], 2)
        summary["lora meets goal"] = summary["lora gap (points)"] <= 1.5 and lora["trainable_%"] <= 2.0
    for batch in SAME_BATCH_SIZES:
        pair = {r["method"]: r for r in same_batch if r["batch"] == batch}
        if {"full", "lora"} <= set(pair):
            summary[f"batch {batch}: LoRA / full peak memory"] = round(
                pair["lora"]["peak_mem_MiB"] / pair["full"]["peak_mem_MiB"], 2)
            summary[f"batch {batch}: LoRA / full time per step"] = round(
                pair["lora"]["ms_per_step"] / pair["full"]["ms_per_step"], 2)
    extra_md = ""
    if same_batch:
        extra_md = (f"Same batch size, {SAME_BATCH_STEPS} steps, no evaluation (memory: peak RSS of the process):\n\n"
                    + markdown_table(same_batch))
        print(markdown_table(same_batch))
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_results("sst2", rows, summary, extra_md=extra_md,
                  notes="GLUE SST-2 (67,349 train / 872 dev sentences), fine-tuning all-MiniLM-L6-v2 (22.7M "
                        f"parameters): full with `{CONFIGS['full']}`, LoRA with `{CONFIGS['lora']}`. "
                        f"Published anchors: {ANCHORS}.")


if __name__ == "__main__":
    main()

"""Character-level Tiny Shakespeare: the plain CPU recipe, the fast CPU recipe, and the GPU recipe.

Each recipe runs as a user would run it, through the CLI in fresh processes: ``lmlab data prepare``
(char tokenizer, first 90% train / last 10% val) then ``lmlab train``. Wall time counts everything
(process start-up, data preparation, training, evaluation, checkpointing), measured from just before
the first command. Prints the curve of val loss against wall time and writes results/ files.

    python benchmarks/shakespeare_char.py                  # plain + fast (CPU)
    python benchmarks/shakespeare_char.py --recipes gpu    # on a CUDA machine
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED_DATA, write_results  # noqa: E402
from lmlab.runs import RunFolder  # noqa: E402
from lmlab.train.logger import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {  # name: (config file, target val loss, time budget: seconds, "plain" (its wall time, same run) or None)
    "plain": ("configs/shakespeare_char.yaml", 1.90, None),
    "fast": ("configs/shakespeare_char_fast.yaml", 1.70, "plain"),
    "gpu": ("configs/shakespeare_char_gpu.yaml", 1.47, None),
}
GOALS = {"plain": "plain: val <= 1.90", "fast": "fast: val <= 1.70 within the plain recipe's wall time (same run)",
         "gpu": "gpu: val <= 1.47 (nanoGPT's figure)"}


def lmlab(*args: str) -> None:
    """Run the lmlab CLI in a fresh process (as a user would), failing loudly."""
    subprocess.run([sys.executable, "-m", "lmlab.cli", *args], check=True, cwd=ROOT)


def run_recipe(name: str, text: Path, out: Path) -> dict:
    """Prepare + train one recipe; return its row and its (wall seconds, val loss) curve."""
    config, target, budget = RECIPES[name]
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    lmlab("data", "prepare", str(text), "--kind", "char", "--split", "tail", "--val-fraction", "0.1",
          "-o", str(run_dir / "data"))
    lmlab("train", config, f"data.path={run_dir / 'data'}", f"train.out_dir={run_dir / 'run'}", "train.progress=false")
    wall = time.time() - t0
    records = read_metrics(RunFolder(run_dir / "run").metrics)
    curve = [(r["time"] - t0, r["val_loss"]) for r in records if "val_loss" in r]
    steps = max(r["step"] for r in records)
    final = curve[-1][1]
    reached = next((t for t, v in curve if v <= target), None)
    row = {"recipe": name, "config": config, "steps": steps, "wall_s": round(wall, 1),
           "val_loss": round(final, 4), "bits_per_char": round(final / math.log(2), 4), "target": target,
           "target_reached_s": None if reached is None else round(reached, 1), "budget_s": budget}
    return {"row": row, "curve": curve}


def judge(results: dict) -> None:
    """Mark each row met or not: the target val loss, reached within its budget (seconds, or the wall time
    of the plain recipe measured in this same run: absolute times do not carry from one machine to another)."""
    for r in results.values():
        row = r["row"]
        budget = row["budget_s"]
        if budget == "plain":
            budget = results["plain"]["row"]["wall_s"] if "plain" in results else None
            row["budget_s"] = budget if budget is None else f"{budget} (plain's wall time)"
        reached = row["target_reached_s"]
        row["met"] = "yes" if reached is not None and (budget is None or reached <= budget) else "NO"


def plot(curves: dict, path: Path) -> None:
    """Val loss against wall time, one line per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(*zip(*curve), "o-", label=name, markersize=3)
    for name in curves:
        ax.axhline(RECIPES[name][1], linestyle="--", linewidth=0.8, color="gray")
    ax.set(xlabel="wall time since start (s)", ylabel="val loss (nats/char)", title="Tiny Shakespeare, char level")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="plain,fast", help="comma-separated: plain, fast, gpu (default: plain,fast)")
    p.add_argument("--data", default=str(SHARED_DATA / "tinyshakespeare" / "input.txt"), help="input.txt of Tiny Shakespeare")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "shakespeare_char"), help="scratch folder for runs")
    args = p.parse_args()
    text = Path(args.data)
    if not text.is_file():
        sys.exit(f"error: {text} not found (see ../shared/data/README.md)")
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    results = {name: run_recipe(name, text, Path(args.out)) for name in names}
    judge(results)
    curves = {name: r["curve"] for name, r in results.items()}
    print("\nval loss against wall time:")
    for name, curve in curves.items():
        print(f"  {name}: " + ", ".join(f"{t:.0f}s {v:.3f}" for t, v in curve))
    suffix = "" if names == ["plain", "fast"] else "_" + "_".join(names)
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"shakespeare_char{suffix}.png"
    plot(curves, png)
    curve_md = "\n".join(f"- {n}: " + ", ".join(f"{t:.0f}s → {v:.3f}" for t, v in c) for n, c in curves.items())
    write_results(f"shakespeare_char{suffix}", [r["row"] for r in results.values()],
                  {"all targets met": all(r["row"]["met"] == "yes" for r in results.values()),
                   "goal": "; ".join(GOALS[n] for n in names)},
                  notes="Character-level Tiny Shakespeare (first 90% train, last 10% val). Wall time counts "
                        "process start-up, data preparation, training, evaluation and checkpointing.",
                  extra_md=f"Val loss against wall time:\n\n{curve_md}\n\n![curve]({png.name})",
                  )


if __name__ == "__main__":
    main()

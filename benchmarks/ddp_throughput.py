"""Training on 1 vs N processes (torchrun, DDP or FSDP2, gloo on CPU): tokens/s and the loss curves.

The same config and global batch run as one process with every core, and under
``torchrun --standalone --nproc-per-node N`` with the cores split between the processes; lmlab takes
the same steps either way (each process computes its rows of the global batch), so the loss curves
should coincide (dropout 0) and only the speed differs. On one CPU machine N processes share the
cores one process would use, so this measures the overhead of the collectives rather than a
speed-up; on several GPUs (one per process) the same script measures the scaling.

    python benchmarks/ddp_throughput.py                       # Tiny Shakespeare (char), 4 x 256, 150 steps
    python benchmarks/ddp_throughput.py --nproc 2 --mode fsdp --steps 100

Reads ../shared/data/tinyshakespeare/input.txt (or --data PATH). Writes results/{ddp,fsdp}_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` importable as a package

from benchmarks.common import SHARED_DATA, write_results  # noqa: E402

LMLAB = [sys.executable, "-m", "lmlab.cli"]


def run(name: str, cmd: list[str], env: dict, cwd: Path) -> list[dict]:
    """Run one training command; its metrics.jsonl records."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (cwd / name / "metrics.jsonl").read_text().splitlines()]


def summary_of(name: str, records: list[dict], processes: int, threads: int) -> dict:
    """Tokens/s (median of the logged windows after the first), final train and val loss."""
    train = [r for r in records if "train_loss" in r]
    speeds = sorted(r["tokens_per_s"] for r in train[1:]) or [train[0]["tokens_per_s"]]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    return {"run": name, "processes": processes, "threads per process": threads,
            "tokens/s (median)": speeds[len(speeds) // 2], "final train loss": train[-1]["train_loss"],
            "final val loss": val[-1] if val else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED_DATA / "tinyshakespeare" / "input.txt"))
    p.add_argument("--nproc", type=int, default=2, help="processes of the distributed run (default 2)")
    p.add_argument("--mode", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([*LMLAB, "-q", "data", "prepare", args.data, "--kind", "char", "--split", "tail", "-o",
                        str(work / "data")], check=True)
        (work / "cfg.yaml").write_text(f"""
model: {{preset: gpt2, n_layer: 4, n_head: 4, d_model: 256, block_size: 128, dropout: 0.0}}
data: {{path: {work / 'data'}}}
train: {{batch_size: 16, max_steps: {args.steps}, warmup_steps: 10, lr: 1.0e-3, eval_interval: {args.steps},
        eval_batches: 10, log_interval: 10, checkpoint_interval: {args.steps}, progress: false,
        precision: fp32, distributed: {args.mode}}}
""")
        env = {**os.environ}
        one = run("one", [*LMLAB, "-q", "train", str(work / "cfg.yaml"), "train.out_dir=one",
                          f"train.threads={cores}"], env, work)
        threads = max(cores // args.nproc, 1)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(args.nproc), "-m", "lmlab.cli", "-q", "train", str(work / "cfg.yaml"),
                    "train.out_dir=many", f"train.threads={threads}"]
        many = run("many", torchrun, {**env, "OMP_NUM_THREADS": str(threads)}, work)
    rows = [summary_of("1 process", one, 1, cores), summary_of(f"{args.nproc} processes ({args.mode})", many,
                                                                  args.nproc, threads)]
    pairs = [(a["train_loss"], b["train_loss"]) for a, b in zip([r for r in one if "train_loss" in r],
                                                                 [r for r in many if "train_loss" in r])]
    worst = max(abs(a - b) / abs(a) for a, b in pairs)
    summary = {f"tokens/s {args.nproc} processes / 1": round(rows[1]["tokens/s (median)"] / rows[0]["tokens/s (median)"], 3),
               "largest relative difference of the logged train losses": f"{worst:.2e}",
               "logged steps compared": len(pairs)}
    notes = (f"Tiny Shakespeare (char), GPT-2 preset 4 x 256, context 128, global batch 16, {args.steps} steps, fp32, "
             f"dropout 0; 1 process with {cores} threads vs torchrun --nproc-per-node {args.nproc} ({args.mode}, gloo) "
             f"with {threads} thread(s) each. On one CPU machine the processes share its cores: the ratio shows the "
             f"collectives' overhead, not a speed-up.")
    write_results(f"{args.mode}_throughput", rows, summary, notes)


if __name__ == "__main__":
    main()

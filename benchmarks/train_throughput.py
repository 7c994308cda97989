"""Training throughput: lmlab's GPT-2 preset beside the same model in Hugging Face transformers.

One training step = forward + backward + optimizer step on a (batch, 256) batch of token ids, CPU, fp32.
The model: 6 layers, 6 heads, width 384, context 256, vocabulary 8192, no dropout, tied embeddings,
built in lmlab and as ``transformers.GPT2LMHeadModel`` (random init, nothing downloaded).

Implementations measured:
- ``lmlab``: ``build_model`` + ``build_optimizer`` (AdamW, fused CPU kernel, as ``lmlab train`` uses).
- ``hf``: ``GPT2LMHeadModel`` + ``torch.optim.AdamW(model.parameters(), lr=1e-3)``, as a HF user writes it.
- ``hf_fused``: the same with ``fused=True``, to show how much of the gap is the optimizer.

Every measurement runs in a fresh subprocess (one per implementation per round), so peak memory
(``ru_maxrss``) belongs to one implementation only; rounds alternate the order of implementations so
that load from other users of the machine falls on all of them alike.

    python benchmarks/train_throughput.py                 # 3 rounds x 10 timed steps
    python benchmarks/train_throughput.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` importable as a package

IMPLS = ["lmlab", "hf", "hf_fused"]
SIZE = dict(n_layer=6, n_head=6, d_model=384, block_size=256, vocab_size=8192)


def rss_mib() -> float:
    """Current resident set size of this process (MiB), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(impl: str):
    """(model, optimizer, step function) of one implementation; step(x, y) returns the loss."""
    import torch

    if impl == "lmlab":
        from lmlab.config import ModelConfig, TrainConfig
        from lmlab.models.registry import build_model
        from lmlab.train.optim import build_optimizer

        model = build_model(ModelConfig(preset="gpt2", **SIZE))
        opt = build_optimizer(model, TrainConfig(), "cpu")

        def loss_of(x, y):
            return model(x, targets=y)[1]
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=SIZE["n_layer"], n_head=SIZE["n_head"], n_embd=SIZE["d_model"],
                         n_positions=SIZE["block_size"], vocab_size=SIZE["vocab_size"], resid_pdrop=0,
                         embd_pdrop=0, attn_pdrop=0, bos_token_id=None, eos_token_id=None)
        model = GPT2LMHeadModel(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=(impl == "hf_fused"))

        def loss_of(x, y):
            return model(input_ids=x, labels=x).loss  # HF shifts the labels itself

    model.train()

    def step(x, y):
        loss = loss_of(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step


def worker(args) -> None:
    """Run in a subprocess: build one implementation, warm up, time steps, print one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.impl != "lmlab":
        import transformers  # noqa: F401  (import cost is not part of the memory figure)
    else:
        import lmlab.models.gpt  # noqa: F401
    torch.manual_seed(0)
    base_rss = rss_mib()
    model, step = build(args.impl)
    T = SIZE["block_size"]
    data = torch.randint(0, SIZE["vocab_size"], (args.batch_size, T + 1))
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    for _ in range(args.warmup):
        step(x, y)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step(x, y)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    extra = {}
    if args.impl != "lmlab":
        extra["attn_implementation"] = model.config._attn_implementation
    print(json.dumps({"impl": args.impl, "step_times": times, "tokens": args.batch_size * T, "base_rss_mib": base_rss,
                      "peak_rss_mib": peak, "loss": float(loss), "threads": torch.get_num_threads(), **extra}))


def run_one(impl: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch-size", str(args.batch_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every implementation once")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--quick", action="store_true", help="1 round, 1 warmup, 3 steps, batch 4")
    p.add_argument("--worker", choices=IMPLS, dest="impl", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        return worker(args)
    if args.quick:
        args.rounds, args.warmup, args.steps, args.batch_size = 1, 1, 3, 4
    impls = args.impls.split(",")

    results: dict[str, list[dict]] = {i: [] for i in impls}
    for r in range(args.rounds):
        order = impls if r % 2 == 0 else impls[::-1]  # alternate who goes first
        for impl in order:
            res = run_one(impl, args)
            results[impl].append(res)
            tps = res["tokens"] / statistics.median(res["step_times"])
            print(f"round {r + 1}/{args.rounds} {impl:9s} {tps:8.0f} tokens/s  peak RSS {res['peak_rss_mib']:.0f} MiB",
                  file=sys.stderr)

    rows = []
    for impl in impls:
        runs = results[impl]
        step_times = [t for res in runs for t in res["step_times"]]
        tokens = runs[0]["tokens"]
        peak = statistics.median(res["peak_rss_mib"] for res in runs)
        growth = statistics.median(res["peak_rss_mib"] - res["base_rss_mib"] for res in runs)
        rows.append({
            "implementation": impl,
            "optimizer": {"lmlab": "AdamW fused (build_optimizer)", "hf": "AdamW (default, not fused)",
                          "hf_fused": "AdamW fused=True"}[impl],
            "tokens/s (median)": tokens / statistics.median(step_times),
            "tokens/s (best round)": max(res["tokens"] / statistics.median(res["step_times"]) for res in runs),
            "ms/step (median)": 1000 * statistics.median(step_times),
            "peak RSS MiB": peak,
            "peak RSS growth MiB": growth,
            "final loss": runs[-1]["loss"],
        })
    by = {r["implementation"]: r for r in rows}
    summary = {}
    if "lmlab" in by and "hf" in by:
        summary["lmlab / hf (tokens/s)"] = round(by["lmlab"]["tokens/s (median)"] / by["hf"]["tokens/s (median)"], 3)
    if "lmlab" in by and "hf_fused" in by:
        summary["lmlab / hf_fused (tokens/s)"] = round(
            by["lmlab"]["tokens/s (median)"] / by["hf_fused"]["tokens/s (median)"], 3)
    if "lmlab" in by and "hf" in by:
        summary["peak RSS growth lmlab / hf"] = round(by["lmlab"]["peak RSS growth MiB"] / by["hf"]["peak RSS growth MiB"], 3)
    summary["goal"] = "lmlab >= 1.5x transformers"
    attn = {res.get("attn_implementation") for i in impls if i != "lmlab" for res in results[i]}
    summary["transformers attention"] = ", ".join(sorted(a for a in attn if a)) or "n/a"
    threads = results[impls[0]][0]["threads"]
    notes = (f"Forward + backward + optimizer step, CPU fp32, batch {args.batch_size} x {SIZE['block_size']} tokens, "
             f"GPT-2 6 layers x 6 heads x 384 wide, vocabulary 8192, tied embeddings, no dropout. "
             f"{args.rounds} rounds x ({args.warmup} warmup + {args.steps} timed steps), each implementation in a "
             f"fresh subprocess per round, order alternating between rounds; {threads} torch threads. "
             f"tokens/s = batch tokens / median step time over all timed steps. Peak RSS is the subprocess's "
             f"ru_maxrss; growth is that minus the RSS after imports (model, optimizer state, activations). "
             f"HF computes its loss with labels=input_ids (shifted inside, T-1 positions); lmlab with shifted "
             f"targets (T positions). The machine is shared, so figures carry a few percent of noise.")
    from benchmarks.common import write_results

    write_results("train_throughput", rows, summary, notes=notes)


if __name__ == "__main__":
    main()

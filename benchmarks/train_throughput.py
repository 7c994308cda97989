"""Training throughput: lmlab's GPT-2 preset beside the same model in Hugging Face transformers.

One training step = forward + backward + optimizer step on a (batch, 256) batch of token ids, CPU.
The model: 6 layers, 6 heads, width 384, context 256, vocabulary 8192, no dropout, tied embeddings,
built in lmlab and as ``transformers.GPT2LMHeadModel`` (random init, nothing downloaded).

Implementations measured:
- ``lmlab``: ``build_model`` + ``build_optimizer`` (AdamW, fused CPU kernel, as ``lmlab train`` uses).
- ``hf``: ``GPT2LMHeadModel`` + ``torch.optim.AdamW(model.parameters(), lr=1e-3)``, as a HF user writes it.
- ``hf_fused``: the same with ``fused=True``, to show how much of the gap is the optimizer.
- ``lmlab_auto``: lmlab at the precision ``train.precision: auto`` picks on this machine (bf16 autocast on a
  CPU with bf16 matrix units, else fp32), as ``lmlab train`` runs by default.
- ``lmlab_bf16`` and ``hf_bf16``: both under the same ``torch.autocast("cpu", torch.bfloat16)``, to compare
  at equal precision. (On a CPU without bf16 units bf16 is emulated and slow: these rows say so.)

Timing builds every implementation in one process and interleaves their steps one by one (the order
rotates every round), so that a burst of load from other users of the shared machine falls on all of
them alike; the summary also gives the median ratio of back-to-back step pairs. Peak memory
(VmHWM, the peak RSS) is measured in a fresh subprocess per implementation, so it belongs to one only.

    python benchmarks/train_throughput.py                 # 3 rounds x 5 steps of each
    python benchmarks/train_throughput.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` importable as a package

IMPLS = ["lmlab", "hf", "hf_fused", "lmlab_auto", "lmlab_bf16", "hf_bf16"]
SIZE = dict(n_layer=6, n_head=6, d_model=384, block_size=256, vocab_size=8192)


def rss_mib() -> float:
    """Current resident set size of this process (MiB), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process (MiB), as lmlab's trainer reports it."""
    import torch

    from lmlab.runtime import peak_memory_mib

    return peak_memory_mib(torch.device("cpu"))


def build(impl: str):
    """(model, step function) of one implementation; step(x, y) trains one step and returns the loss."""
    import torch

    torch.manual_seed(0)  # the same random init for hf and hf_fused, whatever was built before

    if impl.startswith("lmlab"):
        from lmlab.config import ModelConfig, TrainConfig
        from lmlab.models.registry import build_model
        from lmlab.train.optim import build_optimizer

        model = build_model(ModelConfig(preset="gpt2", **SIZE))
        opt = build_optimizer(model, TrainConfig(), "cpu")

        def loss_of(x, y):
            return model(x, targets=y)[1]
    else:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel

        transformers.logging.set_verbosity_error()
        cfg = GPT2Config(n_layer=SIZE["n_layer"], n_head=SIZE["n_head"], n_embd=SIZE["d_model"],
                         n_positions=SIZE["block_size"], vocab_size=SIZE["vocab_size"], resid_pdrop=0,
                         embd_pdrop=0, attn_pdrop=0, bos_token_id=None, eos_token_id=None)
        model = GPT2LMHeadModel(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=(impl == "hf_fused"))

        def loss_of(x, y):
            return model(input_ids=x, labels=x).loss  # HF shifts the labels itself

    from lmlab.runtime import autocast_context

    device = torch.device("cpu")
    model.train()

    def step(x, y):
        with autocast_context(precision_of(impl), device):
            loss = loss_of(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step


def precision_of(impl: str) -> str:
    """fp32, bf16, or what ``train.precision: auto`` resolves to on this CPU (lmlab_auto)."""
    import torch

    from lmlab.runtime import resolve_precision

    if impl == "lmlab_auto":
        return resolve_precision("auto", torch.device("cpu"), SIZE["d_model"])  # as the trainer asks, at the width
    return "bf16" if impl.endswith("_bf16") else "fp32"


def worker(args) -> None:
    """Run in a subprocess: build one implementation, run warmup + a few steps, print its memory as JSON."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.impl.startswith("lmlab"):
        import transformers  # noqa: F401  (import cost is not part of the memory figure)
    else:
        import lmlab.models.gpt  # noqa: F401
    torch.manual_seed(0)
    base_rss = rss_mib()
    model, step = build(args.impl)
    x, y = batch(args.batch_size)
    for _ in range(args.warmup + 2):
        step(x, y)
    peak = peak_rss_mib()
    print(json.dumps({"impl": args.impl, "base_rss_mib": base_rss, "peak_rss_mib": peak}))


def batch(batch_size: int):
    """A fixed random batch of inputs and next-token targets, each (batch_size, block_size)."""
    import torch

    T = SIZE["block_size"]
    data = torch.randint(0, SIZE["vocab_size"], (batch_size, T + 1), generator=torch.Generator().manual_seed(1))
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def memory_of(impl: str, args) -> dict:
    """Peak memory of one implementation, measured in a fresh subprocess."""
    cmd = [sys.executable, __file__, "--worker", impl, "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_steps(impls: list[str], args) -> tuple[dict[str, list[float]], dict]:
    """Seconds per training step of each implementation, all built in this process.

    Steps are interleaved one by one (lmlab, hf, hf_fused, lmlab, ...), with the order rotated every
    round, so a burst of load from other users of the machine slows every implementation alike.
    """
    import torch

    torch.manual_seed(0)
    built = {impl: build(impl) for impl in impls}
    x, y = batch(args.batch_size)
    for _ in range(args.warmup):
        for impl in impls:
            built[impl][1](x, y)
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    losses = {}
    for r in range(args.rounds):
        order = impls[r % len(impls):] + impls[:r % len(impls)]
        for _ in range(args.steps):
            for impl in order:
                t0 = time.perf_counter()
                losses[impl] = built[impl][1](x, y).item()
                times[impl].append(time.perf_counter() - t0)
        line = "  ".join(f"{i} {args.batch_size * SIZE['block_size'] / statistics.median(times[i][-args.steps:]):.0f}"
                         for i in impls)
        print(f"round {r + 1}/{args.rounds} tokens/s: {line}", file=sys.stderr)
    extra = {"losses": losses, "threads": torch.get_num_threads()}
    extra["attn"] = ", ".join(sorted({m.config._attn_implementation for i, (m, _) in built.items()
                                      if not i.startswith("lmlab")}))
    return times, extra


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed steps of each implementation per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the order of implementations rotates each round")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--quick", action="store_true", help="1 round, 1 warmup, 2 steps, batch 4")
    p.add_argument("--worker", choices=IMPLS, dest="impl", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        return worker(args)
    if args.quick:
        args.rounds, args.warmup, args.steps, args.batch_size = 1, 1, 2, 4
    impls = args.impls.split(",")

    times, extra = time_steps(impls, args)
    memory = {impl: memory_of(impl, args) for impl in impls}
    tokens = args.batch_size * SIZE["block_size"]

    rows = []
    for impl in impls:
        mem = memory[impl]
        rows.append({
            "implementation": impl,
            "precision": precision_of(impl),
            "optimizer": "AdamW fused (build_optimizer)" if impl.startswith("lmlab") else
                         {"hf": "AdamW (default, not fused)", "hf_fused": "AdamW fused=True",
                          "hf_bf16": "AdamW (default, not fused)"}[impl],
            "tokens/s (median)": tokens / statistics.median(times[impl]),
            "tokens/s (fastest step)": tokens / min(times[impl]),
            "ms/step (median)": 1000 * statistics.median(times[impl]),
            "peak RSS MiB": mem["peak_rss_mib"],
            "peak RSS growth MiB": mem["peak_rss_mib"] - mem["base_rss_mib"],
            "loss after last step": extra["losses"][impl],
        })
    by = {r["implementation"]: r for r in rows}

    def paired(a: str, b: str) -> float:
        """Median over steps of time(b) / time(a), each pair measured back to back."""
        return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))

    summary = {}
    for other in ("hf", "hf_fused"):
        if "lmlab" in by and other in by:
            summary[f"lmlab / {other} (median tokens/s)"] = round(
                by["lmlab"]["tokens/s (median)"] / by[other]["tokens/s (median)"], 3)
            summary[f"lmlab / {other} (median of back-to-back step pairs)"] = round(paired("lmlab", other), 3)
            summary[f"lmlab / {other} (fastest steps)"] = round(
                by["lmlab"]["tokens/s (fastest step)"] / by[other]["tokens/s (fastest step)"], 3)
    for a, b in (("lmlab_auto", "hf"), ("lmlab_bf16", "hf_bf16"), ("lmlab_bf16", "lmlab")):
        if a in by and b in by:
            summary[f"{a} / {b} (median tokens/s)"] = round(by[a]["tokens/s (median)"] / by[b]["tokens/s (median)"], 3)
            summary[f"{a} / {b} (median of back-to-back step pairs)"] = round(paired(a, b), 3)
    if "lmlab" in by and "hf" in by:
        summary["peak RSS growth lmlab / hf"] = round(by["lmlab"]["peak RSS growth MiB"] / by["hf"]["peak RSS growth MiB"], 3)
    summary["goal"] = ("fp32: lmlab >= 1.5x transformers; on a CPU with bf16 units: lmlab_auto >= 2.5x transformers "
                       "default (hf), lmlab_bf16 >= 1.3x hf_bf16")
    summary["transformers attention"] = extra["attn"] or "n/a"
    threads = extra["threads"]
    notes = (f"Forward + backward + optimizer step, CPU (precision per row), batch {args.batch_size} x {SIZE['block_size']} tokens, "
             f"GPT-2 6 layers x 6 heads x 384 wide, vocabulary 8192, tied embeddings, no dropout; {threads} torch "
             f"threads. Timing: all implementations in one process, {args.warmup} warmup steps each, then "
             f"{args.rounds} rounds x {args.steps} steps, the steps of the implementations interleaved one by one "
             f"(order rotated each round) so that load from other users of the shared machine falls on all alike. "
             f"tokens/s = batch tokens / median step time. Memory: each implementation alone in a fresh "
             f"subprocess ({args.warmup + 2} steps); peak RSS is its VmHWM, growth is that minus the RSS after "
             f"imports (model, gradients, optimizer state, activations). HF computes its loss with "
             f"labels=input_ids (shifted inside, T-1 positions); lmlab with shifted targets (T positions).")
    from benchmarks.common import write_results

    write_results("train_throughput", rows, summary, notes=notes)


if __name__ == "__main__":
    main()

"""MFU of the GPT-2 124M GPU recipe (configs/gpt2_124m_gpu.yaml) beside nanoGPT and transformers, on one GPU.

Every row trains GPT-2 small (12 x 768, context 1024, vocabulary 50,304) with bf16 autocast, torch.compile,
fused AdamW, gradient clipping and the same micro-batch and accumulation, on windows of the same prepared
token file, for a few optimizer steps; the first ``--warmup`` steps (compilation, autotuning) are not timed.

- lmlab: the recipe through ``lmlab train``, in a fresh process, as a user runs it (its metrics.jsonl
  gives tokens/s per step, each step timed after the device finished it);
- nanoGPT: its ``model.py`` (pass the folder of a nanoGPT checkout with --nanogpt; skipped otherwise);
- transformers: ``GPT2LMHeadModel`` with its SDPA attention.

MFU = tokens/s x FLOPs per token / the GPU's datasheet bf16 peak (runtime.GPU_PEAK_TFLOPS), with FLOPs per
token 6N + 12 x layers x width x context for every row (N: parameters less the position table; PaLM
appendix B, as nanoGPT counts). The bf16 matmul rate measured on an 8192^3 product is printed beside it:
the ceiling this GPU reaches in practice. Goal (issue 14): lmlab >= 45% MFU on one H100-class GPU.

    python benchmarks/mfu.py --data runs/gpt2_124m/data --nanogpt ../nanoGPT
    python benchmarks/mfu.py --smoke --data DATA   # a tiny model on the CPU: checks the script itself
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

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402
from lmlab.data.prepare import memmap_split  # noqa: E402
from lmlab.runs import RunFolder  # noqa: E402
from lmlab.runtime import GPU_PEAK_TFLOPS, peak_tflops  # noqa: E402
from lmlab.train.logger import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/gpt2_124m_gpu.yaml"
GPT2_SMALL = dict(n_layer=12, n_head=12, d_model=768, block_size=1024, vocab_size=50304)
SMOKE = dict(n_layer=2, n_head=2, d_model=64, block_size=64, vocab_size=50304)
GOAL_MFU = 0.45


def flops_per_token(n_params: int, shape: dict) -> float:
    """6N + 12 L d T: training FLOPs per token (N without the position table)."""
    return 6 * n_params + 12 * shape["n_layer"] * shape["d_model"] * shape["block_size"]


def lmlab_row(args, shape: dict, out: Path) -> dict:
    """Train the recipe for warmup + steps optimizer steps through the CLI; tokens/s of the timed steps."""
    run = out / "lmlab"
    overrides = [f"model.{k}={v}" for k, v in shape.items()] + [
        f"data.path={args.data}", f"train.out_dir={run}", f"train.batch_size={args.batch_size}",
        f"train.grad_accum={args.grad_accum}", f"train.max_steps={args.warmup + args.steps}",
        "train.warmup_steps=1", "train.log_interval=1", "train.eval_interval=100000", "train.eval_batches=1",
        "train.checkpoint_interval=100000", "train.progress=false"]
    if args.smoke:
        overrides += ["train.device=cpu", "train.compile=false", "train.precision=fp32"]
    started = time.time()
    subprocess.run([sys.executable, "-m", "lmlab.cli", "train", CONFIG, *overrides, "--force"], check=True, cwd=ROOT,
                   timeout=args.timeout)
    records = [r for r in read_metrics(RunFolder(run).metrics) if "tokens_per_s" in r]
    timed = [r for r in records if r["step"] > args.warmup]
    first = next(r for r in records if r["step"] == args.warmup)
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "flops_per_token": timed[-1]["tflops"] * 1e12 / timed[-1]["tokens_per_s"],
            "start_to_timed_s": first["time"] - started,
            "peak_mem_gib": max(r["peak_mem_mib"] for r in records) / 1024,
            "final_loss": timed[-1]["train_loss"]}


def peer_row(name: str, args, shape: dict) -> dict:
    """Time a peer's training steps in this process (called in a fresh process per peer)."""
    device = torch.device("cpu" if args.smoke else "cuda")
    model, n_params, step_loss = build_peer(name, args, shape)
    model.to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                  lr=6e-4, betas=(0.9, 0.95), fused=True)
    compiled = model if args.smoke else torch.compile(model)
    tokens = memmap_split(args.data, "train")[0]
    rng = np.random.default_rng(0)
    block, rows = shape["block_size"], args.batch_size
    dtype = torch.float32 if args.smoke else torch.bfloat16
    started = time.time()
    t0 = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            t0 = time.perf_counter()
            timed_from = time.time()
        for _ in range(args.grad_accum):
            starts = rng.integers(0, len(tokens) - block - 1, rows)
            window = torch.from_numpy(np.stack([tokens[s:s + block + 1] for s in starts]).astype(np.int64))
            x, y = window[:, :-1].contiguous().to(device), window[:, 1:].contiguous().to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=not args.smoke):
                loss = step_loss(compiled, x, y)
            (loss / args.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    final_loss = loss.item()
    seconds = time.perf_counter() - t0
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"tokens_per_s": args.steps * args.grad_accum * rows * block / seconds,
            "flops_per_token": float(flops_per_token(n_params, shape)), "start_to_timed_s": timed_from - started,
            "peak_mem_gib": memory, "final_loss": final_loss}


def build_peer(name: str, args, shape: dict):
    """(model, N for the FLOP count, loss function) of a peer implementation at ``shape``."""
    if name == "nanogpt":
        sys.path.insert(0, str(Path(args.nanogpt).resolve()))
        from model import GPT, GPTConfig  # nanoGPT's model.py

        model = GPT(GPTConfig(block_size=shape["block_size"], vocab_size=shape["vocab_size"], n_layer=shape["n_layer"],
                              n_head=shape["n_head"], n_embd=shape["d_model"], dropout=0.0, bias=True))
        return model, model.get_num_params(non_embedding=True), lambda m, x, y: m(x, y)[1]
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=shape["vocab_size"], n_positions=shape["block_size"], n_embd=shape["d_model"],
                        n_layer=shape["n_layer"], n_head=shape["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    n_params = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()

    def step_loss(m, x, y):
        logits = m(input_ids=x).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    return model, n_params, step_loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measured_matmul_tflops() -> float | None:
    """bf16 TFLOP/s of an 8192^3 matmul (best of 10 after warm-up): this GPU's practical ceiling."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        sync(torch.device("cuda"))
        t0 = time.perf_counter()
        a @ b
        sync(torch.device("cuda"))
        best = min(best, time.perf_counter() - t0)
    return 2 * 8192**3 / best / 1e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "runs" / "gpt2_124m" / "data"),
                   help="prepared data folder (lmlab data prepare ... --vocab-size 50257) (default: %(default)s)")
    p.add_argument("--nanogpt", help="folder of a nanoGPT checkout (its model.py); without it the row is skipped")
    p.add_argument("--impls", default="lmlab,nanogpt,transformers", help="rows to run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="micro-batch rows (default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=8, help="micro-batches per step (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (default: %(default)s)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (default: %(default)s)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "mfu"), help="scratch folder (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=900, help="seconds each row may take (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, fp32, no compile: checks the script")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one peer in this process, print JSON
    args = p.parse_args()
    shape = SMOKE if args.smoke else GPT2_SMALL
    if args.row:
        print("ROW " + json.dumps(peer_row(args.row, args, shape)), flush=True)
        return
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("error: this benchmark needs a CUDA GPU (use --smoke to check the script on a CPU)")
    if not (Path(args.data) / "meta.json").is_file():
        sys.exit(f"error: {args.data} is not a prepared data folder (lmlab data prepare ... -o {args.data})")
    device = torch.device("cpu" if args.smoke else "cuda")
    peak = None if args.smoke else peak_tflops(device, "bf16")
    rows = []
    for impl in [i.strip() for i in args.impls.split(",") if i.strip()]:
        row = {"impl": impl}
        if impl == "nanogpt" and not args.nanogpt:
            rows.append({**row, "note": "skipped: no --nanogpt folder"})
            continue
        try:
            if impl == "lmlab":
                row.update(lmlab_row(args, shape, Path(args.out)))
            else:
                row.update(run_peer(impl, args))
        except (subprocess.SubprocessError, RuntimeError, ValueError, StopIteration) as e:
            rows.append({**row, "note": f"failed: {type(e).__name__}: {str(e)[:200]}"})
            continue
        row["tflops"] = row["tokens_per_s"] * row["flops_per_token"] / 1e12
        row["mfu"] = row["tflops"] / peak if peak else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    done = {r["impl"]: r for r in rows if "tokens_per_s" in r}
    for r in done.values():
        r["vs_lmlab"] = r["tokens_per_s"] / done["lmlab"]["tokens_per_s"] if "lmlab" in done else None
    matmul = measured_matmul_tflops()
    lmlab_mfu = done.get("lmlab", {}).get("mfu")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke)"
    summary = {"gpu": gpu, "datasheet bf16 peak TFLOP/s": peak, "measured bf16 8192^3 matmul TFLOP/s": matmul,
               "lmlab MFU": lmlab_mfu, "goal": f"lmlab MFU >= {GOAL_MFU:.0%}",
               "goal met": None if lmlab_mfu is None else lmlab_mfu >= GOAL_MFU,
               "tokens per step": args.batch_size * args.grad_accum * shape["block_size"]}
    columns = ["impl", "tokens_per_s", "tflops", "mfu", "vs_lmlab", "flops_per_token", "peak_mem_gib",
               "start_to_timed_s", "final_loss", "note"]
    if args.smoke:  # a check of the script, not a result: print, write nothing
        print(markdown_table(rows, columns))
        return
    write_results("mfu", rows, summary, columns=columns,
                  notes=f"GPT-2 124M training, bf16 autocast + torch.compile, micro-batch {args.batch_size} x "
                        f"{shape['block_size']}, {args.grad_accum} accumulation steps; median (lmlab) or mean "
                        f"(peers) over {args.steps} steps after {args.warmup} untimed ones; peers take no .item() "
                        f"per step, lmlab logs each step (one sync). MFU divides by the datasheet peak of "
                        f"runtime.GPU_PEAK_TFLOPS (GPUs there: {', '.join(GPU_PEAK_TFLOPS)}).")


def run_peer(impl: str, args) -> dict:
    """One peer's row, measured in a fresh process (its own CUDA memory and compilation)."""
    cmd = [sys.executable, __file__, "--row", impl, "--data", args.data, "--batch-size", str(args.batch_size),
           "--grad-accum", str(args.grad_accum), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += ["--nanogpt", args.nanogpt] if args.nanogpt else []
    cmd += ["--smoke"] if args.smoke else []
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                          timeout=args.timeout)
    line = next((x for x in done.stdout.splitlines() if x.startswith("ROW ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"{impl} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}")
    return json.loads(line[4:])


if __name__ == "__main__":
    main()

"""Architecture comparison: LSTM, GRU, Elman RNN and a GPT at equal parameter count and equal wall time.

For one dataset, each family is trained through the CLI (``lmlab train`` in a fresh process) for the
same wall-time budget, with the same batch shape (rows x window) and a parameter count matched to the
GPT's within a few percent (recurrent widths are solved for it). Then, for each:

- quality: ``lmlab eval ppl`` on the held-out split (recurrent models carry their state through the
  whole split; the GPT reads it in sliding windows of its context with stride = half the context),
  in nats per token, bits per character (char level) and perplexity;
- speed: training tokens/s (median over the run's log) and greedy generation tokens/s (batch 1);
- memory: peak RSS of the training process;
- the curve of val loss against wall time (PNG), from the run's own periodic evaluations.

``--scaling`` adds how each family scales with context length, on random weights of the same sizes:
training tokens/s at windows of 64/256/1024 tokens (8 rows), generation time per token after a
prompt of 64/512/2000 tokens, and the bytes of state a sequence carries (KV cache vs recurrent state).

    python benchmarks/architectures.py --dataset shakespeare --minutes 3 --scaling
    python benchmarks/architectures.py --dataset wikitext2 --minutes 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED_DATA, markdown_table, write_results  # noqa: E402

from lmlab.config import ModelConfig, TrainConfig  # noqa: E402
from lmlab.generate.engine import generate_tokens  # noqa: E402
from lmlab.generate.sampling import SamplingParams  # noqa: E402
from lmlab.models.interface import count_parameters  # noqa: E402
from lmlab.models.registry import build_model  # noqa: E402
from lmlab.train.checkpoint import load_checkpoint  # noqa: E402
from lmlab.train.optim import build_optimizer  # noqa: E402
from lmlab.runs import RunFolder  # noqa: E402
from lmlab.train.logger import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["lstm", "gru", "rnn", "gpt"]
RECURRENT_LAYERS = 2  # the classic depth (Zaremba et al.); widths are solved for equal parameters

DATASETS = {
    "shakespeare": {
        "title": "Tiny Shakespeare, character level (first 90% train, last 10% val)",
        "prepare": lambda d: [str(d / "tinyshakespeare" / "input.txt"), "--kind", "char", "--split", "tail",
                              "--val-fraction", "0.1"],
        "eval_split": "val", "char_level": True, "prompt": "ROMEO:\n",
        # the GPT of the fast CPU recipe (configs/shakespeare_char_fast.yaml)
        "gpt": dict(preset="llama", n_layer=4, n_head=6, d_model=192), "tie": False,
        "batch_size": 24, "block_size": 128, "lr": {"gpt": 3e-3, "lstm": 3e-3, "gru": 3e-3, "rnn": 1e-3},
    },
    "wikitext2": {
        "title": "WikiText-2, word level (33,278-word vocabulary; official valid/test files)",
        "prepare": lambda d: [str(d / "wikitext-2" / "train.txt"), "--val", str(d / "wikitext-2" / "valid.txt"),
                              "--test", str(d / "wikitext-2" / "test.txt"), "--kind", "word"],
        "eval_split": "test", "char_level": False, "prompt": "The history of the",
        "gpt": dict(preset="llama", n_layer=4, n_head=4, d_model=256), "tie": True,
        "batch_size": 16, "block_size": 128, "lr": {"gpt": 2e-3, "lstm": 2e-3, "gru": 2e-3, "rnn": 1e-3},
    },
}


def lmlab(*args: str, capture: bool = False) -> str:
    """Run the lmlab CLI in a fresh process, failing loudly; return its stdout when captured."""
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", *args], check=True, cwd=ROOT,
                          stdout=subprocess.PIPE if capture else None, text=True)
    return done.stdout if capture else ""


def model_config(family: str, spec: dict, vocab_size: int, width: int | None = None) -> ModelConfig:
    """The ModelConfig of ``family`` for a dataset spec (recurrent width given, GPT from the spec)."""
    if family == "gpt":
        return ModelConfig(family="gpt", block_size=spec["block_size"], vocab_size=vocab_size,
                           tie_embeddings=spec["tie"], **spec["gpt"])
    return ModelConfig(family=family, n_layer=RECURRENT_LAYERS, d_model=width, d_ff=width,
                       block_size=spec["block_size"], vocab_size=vocab_size, tie_embeddings=spec["tie"])


def count_params(cfg: ModelConfig) -> int:
    """Parameters of the model ``cfg`` describes (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        return count_parameters(build_model(cfg))[1]


def matched_configs(spec: dict, vocab_size: int) -> dict[str, ModelConfig]:
    """One config per family, recurrent widths (multiples of 8) chosen to match the GPT's parameters."""
    configs = {"gpt": model_config("gpt", spec, vocab_size)}
    target = count_params(configs["gpt"])
    for family in FAMILIES:
        if family != "gpt":
            width = min(range(16, 4097, 8),
                        key=lambda w: abs(count_params(model_config(family, spec, vocab_size, w)) - target))
            configs[family] = model_config(family, spec, vocab_size, width)
    return configs


def run_config(family: str, cfg: ModelConfig, spec: dict, max_steps: int, minutes: float,
               data: Path, run: Path) -> dict:
    """The YAML config (as a dict) of one family's run; written next to the run so it can be re-run."""
    model = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
             if f.name in ("family", "preset", "n_layer", "n_head", "d_model", "d_ff", "block_size",
                           "tie_embeddings") and getattr(cfg, f.name) is not None}
    lr = spec["lr"][family]
    train = {"out_dir": str(run), "batch_size": spec["batch_size"], "max_steps": max_steps, "max_minutes": minutes,
             "lr": lr, "min_lr": lr / 10, "warmup_steps": min(50, max_steps // 10),
             "weight_decay": 0.1 if family == "gpt" else 0.0, "beta2": 0.99, "grad_clip": 1.0,
             "eval_interval": max(1, max_steps // 8), "eval_batches": 20, "log_interval": max(1, max_steps // 40), "checkpoint_interval": max_steps,
             "progress": False}
    if family != "gpt":  # truncated BPTT through the training text read in order
        train.update({"batching": "sequential", "carry_state": True})
    return {"model": model, "data": {"path": str(data)}, "train": train}


def steps_per_second(cfg: ModelConfig, spec: dict, steps: int = 6) -> float:
    """Training steps/s of ``cfg`` at the dataset's batch shape, on random tokens (for the step budget)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    tc = TrainConfig(lr=1e-3)
    optimizer = build_optimizer(model, tc, "cpu")
    x = torch.randint(0, cfg.vocab_size, (spec["batch_size"], spec["block_size"]))
    state = model.make_cache(spec["batch_size"]) if cfg.family != "gpt" else None

    def step():
        loss = model(x, x, cache=state)[1] if state is not None else model(x, x)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if state is not None:
            state.detach()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t0)


def generation_tokens_per_s(run: Path, prompt: str, context: int) -> float:
    """Greedy generation speed (batch 1) of a trained run, after a short warm-up.

    Every family generates the same number of tokens: as many as fit in the GPT's context.
    """
    ckpt = load_checkpoint(run)
    ids = ckpt.tokenizer.encode(prompt)
    n_new = context - len(ids)
    params = SamplingParams(max_new_tokens=n_new, temperature=0.0)
    with torch.inference_mode():
        list(generate_tokens(ckpt.model, ids, SamplingParams(max_new_tokens=8, temperature=0.0)))
        t0 = time.perf_counter()
        produced = len(list(generate_tokens(ckpt.model, ids, params)))
        return produced / (time.perf_counter() - t0)


def run_metrics(run: Path) -> list[dict]:
    """The metrics.jsonl records of a run folder."""
    return read_metrics(RunFolder(run).metrics)


def train_family(family: str, cfg: ModelConfig, spec: dict, minutes: float, data: Path, out: Path) -> dict:
    """Train one family for the budget, evaluate and time it; return its row and val-loss curve."""
    run = out / family
    shutil.rmtree(run, ignore_errors=True)
    rate = steps_per_second(cfg, spec)
    max_steps = max(10, int(rate * minutes * 60 * 0.92))  # ~8% of the budget goes to evaluation
    config = out / f"{family}.yaml"
    config.write_text(yaml.safe_dump(run_config(family, cfg, spec, max_steps, minutes, data, run), sort_keys=False))
    t0 = time.time()
    lmlab("train", str(config))
    wall = time.time() - t0
    records = run_metrics(run)
    stride = {"--stride": str(spec["block_size"] // 2)} if family == "gpt" else {}
    report = json.loads(lmlab("eval", "ppl", str(run), "--data", str(data), "--split", spec["eval_split"],
                              *[a for kv in stride.items() for a in kv], capture=True))
    train_logs = [r for r in records if "train_loss" in r]
    row = {"family": family, "width": cfg.d_model if family == "gpt" else cfg.d_ff,
           "params_M": count_params(cfg) / 1e6, "steps": train_logs[-1]["step"], "train_wall_s": round(wall),
           f"{spec['eval_split']}_nll": report["mean_nll"], f"{spec['eval_split']}_ppl": report["perplexity"]}
    if spec["char_level"]:
        row["bits_per_char"] = report["bits_per_token"]
    row.update({"train_tok_s": statistics.median(r["tokens_per_s"] for r in train_logs[1:] or train_logs),
                "gen_tok_s": generation_tokens_per_s(run, spec["prompt"], spec["block_size"]),
                "peak_mem_MiB": max(r.get("peak_mem_mib", 0) for r in train_logs)})
    curve = [(r["elapsed_s"], r["val_loss"]) for r in records if "val_loss" in r]
    return {"row": row, "curve": curve}


def plot_curves(curves: dict, title: str, ylabel: str, path: Path) -> None:
    """Val loss against training wall time, one line per family (y axis cut where the curves settle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for family, curve in curves.items():
        if curve:
            ax.plot(*zip(*curve), "o-", label=family, markersize=3)
    finals = [c[-1][1] for c in curves.values() if c]
    if finals:  # early evaluations of a recurrent model can be huge; keep the interesting range readable
        ax.set_ylim(min(v for c in curves.values() for _, v in c) - 0.1, max(finals) * 1.6)
    ax.set(xlabel="training wall time (s)", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def state_bytes(cfg: ModelConfig, length: int) -> int:
    """Bytes (fp32) a sequence of ``length`` tokens keeps between steps: KV cache or recurrent state."""
    with torch.device("meta"):
        cfg = build_model(cfg).config  # presets resolved (n_kv_head of grouped-query attention)
    if cfg.family == "gpt":
        kv_heads, head_dim = cfg.n_kv_head or cfg.n_head, cfg.d_model // cfg.n_head
        return 2 * cfg.n_layer * length * kv_heads * head_dim * 4  # keys and values of every layer
    copies = 2 if cfg.family == "lstm" else 1  # h (and the LSTM's cell c) of every layer
    return copies * cfg.n_layer * cfg.d_ff * 4


def scaling_rows(configs: dict[str, ModelConfig], windows=(64, 256, 1024), prompts=(64, 512, 2000)) -> list[dict]:
    """Training tokens/s against window length and generation ms/token against prompt length."""
    rows = []
    for family, cfg in configs.items():
        long_cfg = dataclasses.replace(cfg, block_size=max(max(windows), max(prompts) + 40))
        row = {"family": family}
        for t in windows:
            spec = {"batch_size": 8, "block_size": t}
            row[f"train tok/s @{t}"] = steps_per_second(dataclasses.replace(long_cfg, block_size=t), spec, steps=3) * 8 * t
        torch.manual_seed(0)
        model = build_model(long_cfg).eval()
        for p in prompts:
            prompt = torch.randint(0, cfg.vocab_size, (p,)).tolist()
            params = SamplingParams(max_new_tokens=33, temperature=0.0)
            with torch.inference_mode():
                it = generate_tokens(model, prompt, params)
                next(it)  # the prompt is processed here; time only the tokens after it
                t0 = time.perf_counter()
                n = len(list(it))
                row[f"gen ms/token @{p}"] = 1000 * (time.perf_counter() - t0) / n
            row[f"state KiB @{p}"] = state_bytes(cfg, p) / 1024
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=list(DATASETS), default="shakespeare", help="which comparison to run")
    p.add_argument("--minutes", type=float, default=3.0, help="training wall-time budget per family")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of lstm,gru,rnn,gpt")
    p.add_argument("--scaling", action="store_true", help="also measure scaling with context length")
    p.add_argument("--plot-only", action="store_true", help="redraw the curves of the runs already in --out")
    p.add_argument("--data", default=str(SHARED_DATA), help="the shared data folder")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "architectures"), help="scratch folder for runs")
    args = p.parse_args()
    spec = DATASETS[args.dataset]
    out = Path(args.out) / args.dataset
    unit = "nats/char" if spec["char_level"] else "nats/word"
    title = f"{spec['title'].split(',')[0]}: {args.minutes:g} min per family"
    png = RESULTS / f"architectures_{args.dataset}.png"
    if args.plot_only:
        curves = {f: [(r["elapsed_s"], r["val_loss"]) for r in run_metrics(out / f) if "val_loss" in r]
                  for f in args.families.split(",") if RunFolder(out / f).metrics.is_file()}
        plot_curves(curves, title, f"val loss ({unit})", png)
        return
    data = out / "data"
    shutil.rmtree(data, ignore_errors=True)
    lmlab("data", "prepare", *spec["prepare"](Path(args.data)), "-o", str(data))
    vocab_size = json.loads((data / "meta.json").read_text())["vocab_size"]
    configs = matched_configs(spec, vocab_size)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    results = {f: train_family(f, configs[f], spec, args.minutes, data, out) for f in families}
    rows = [r["row"] for r in results.values()]
    curves = {f: r["curve"] for f, r in results.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot_curves(curves, title, f"val loss ({unit})", png)
    extra = f"Val loss against training wall time (the runs' own periodic evaluations):\n\n![curves]({png.name})\n"
    summary = {"minutes per family": args.minutes, "batch": f"{spec['batch_size']} x {spec['block_size']} tokens"}
    if args.scaling:
        scaling = scaling_rows({f: configs[f] for f in families})
        print(markdown_table(scaling))
        extra += ("\n## Scaling with context length (random weights, same sizes)\n\n"
                  "Training tokens/s at 8 rows of T tokens; generation ms per new token after a prompt of P "
                  "tokens (batch 1, cache/state carried); bytes of state a sequence keeps (fp32).\n\n"
                  + markdown_table(scaling) + "\n")
        (RESULTS / f"architectures_{args.dataset}_scaling.json").write_text(json.dumps(scaling, indent=2) + "\n")
    write_results(f"architectures_{args.dataset}", rows, summary,
                  notes=f"{spec['title']}. Every family trained for the same wall time with the same batch shape "
                        f"and (nearly) the same parameter count; quality from `lmlab eval ppl` on the "
                        f"{spec['eval_split']} split (recurrent: state carried through the split; GPT: sliding "
                        f"windows, stride half the context).",
                  extra_md=extra)


if __name__ == "__main__":
    main()

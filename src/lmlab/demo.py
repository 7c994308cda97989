"""``lmlab demo``: the whole pipeline in a few minutes on a laptop CPU.

The corpus is the ``.py`` sources of the running interpreter's standard library, which exists on every
machine with Python: the demo trains a byte-level BPE tokenizer on it, prepares token shards,
pretrains a small GPT, measures validation perplexity, and completes a few code prompts.

The completions are the demo's output (stdout); the steps leading to them and the closing hints are
status lines, logged at INFO (stderr under the CLI; ``lmlab -q demo`` shows the samples alone).
"""

from __future__ import annotations

import logging
import sys
import sysconfig
import time
from pathlib import Path

from lmlab.config import DataConfig, ModelConfig, Name, Positive, RunConfig, Seed, TrainConfig, check_argument
from lmlab.data.prepare import prepare
from lmlab.data.tokenizer import train_tokenizer_from_files
from lmlab.errors import DataError
from lmlab.eval.perplexity import evaluate_perplexity
from lmlab.eval.report import write_metrics_report
from lmlab.generate.engine import generate_text, print_stream
from lmlab.generate.sampling import SamplingParams
from lmlab.runs import check_output
from lmlab.train.checkpoint import load_checkpoint
from lmlab.train.lm import pretrain

logger = logging.getLogger(__name__)

PROMPTS = ["def fibonacci(", "class Stack:\n    def __init__(self", "import os\n\ndef list_files("]
SKIP_DIRS = {"test", "tests", "idlelib", "encodings", "pydoc_data", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}


def stdlib_sources(max_bytes: int) -> list[Path]:
    """The standard library's .py files (tests and bundled apps left out), sorted, up to max_bytes in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]) or not path.is_file():
            continue
        size = path.stat().st_size
        if total + size > max_bytes:
            continue
        files.append(path)
        total += size
    if not files:
        raise DataError(f"found no .py files in the standard library at {root}")
    return files


def demo_config(data_dir: Path, run_dir: Path, minutes: float, seed: int) -> RunConfig:
    """A small GPT (4 layers, 192 wide, context 128) sized to learn something in a few CPU minutes."""
    steps = max(50, int(minutes * 300))  # ~5 steps/s on 2 CPU cores; max_minutes stops it in time anyway
    return RunConfig(
        model=ModelConfig(preset="gpt2", n_layer=4, n_head=4, d_model=192, block_size=128),
        data=DataConfig(path=str(data_dir)),
        train=TrainConfig(out_dir=str(run_dir), seed=seed, batch_size=16, max_steps=steps, max_minutes=minutes,
                          lr=2e-3, warmup_steps=50, eval_interval=max(steps // 8, 1), eval_batches=10,
                          checkpoint_interval=steps, log_interval=10, keep_checkpoints=1),
    )


def run_demo(out_dir: str = "runs/demo", minutes: float = 4.0, seed: int = 1337, corpus_bytes: int = 8_000_000,
             force: bool = False) -> dict:
    """Tokenizer -> shards -> pretraining -> perplexity -> samples; returns the figures it reported.

    ``corpus_bytes`` caps the corpus (the tokenizer learns from at most 3 MB of it). ``out_dir`` must
    be new or empty, or (with ``force``) hold a previous demo (``data/`` and ``run/``), which is replaced.
    """
    check_argument("out_dir", out_dir, Name)
    check_argument("minutes", minutes, Positive)
    check_argument("seed", seed, Seed)
    out = check_output(out_dir, "demo", force=force)
    started = time.perf_counter()
    files = stdlib_sources(max_bytes=corpus_bytes)
    inputs = [str(p) for p in files]
    logger.info(f"[1/5] corpus: {len(files)} files of Python's standard library ({sum(p.stat().st_size for p in files) / 1e6:.1f} MB)")

    tokenizer = train_tokenizer_from_files("bpe", inputs, vocab_size=4096, max_bytes=min(corpus_bytes, 3_000_000))
    logger.info(f"[2/5] byte-level BPE tokenizer: {tokenizer.vocab_size} tokens")

    data_dir = out / "data"
    meta = prepare(inputs, tokenizer, data_dir, val_fraction=0.05, split="hash", force=True)  # checked above
    s = meta["splits"]
    logger.info(f"      shards: train {s['train']['tokens']:,} tokens, val {s['val']['tokens']:,} tokens -> {data_dir}")

    logger.info(f"[3/5] pretraining a small GPT for up to {minutes:g} minutes")
    cfg = demo_config(data_dir, out / "run", minutes, seed)
    summary = pretrain(cfg, force=True)  # a previous demo's run, as checked above

    ckpt = load_checkpoint(out / "run")
    report = evaluate_perplexity(ckpt.model, ckpt.tokenizer, str(data_dir), split="val", progress=False)
    write_metrics_report(report, out / "run" / "eval", "Demo validation perplexity")
    logger.info(f"[4/5] validation: {report['mean_nll']:.3f} nats/token, perplexity {report['perplexity']:.1f}, "
                f"{report['bits_per_byte']:.3f} bits/byte (checkpoint {ckpt.path})")

    print("[5/5] samples (temperature 0.8, top-k 50):")
    for i, prompt in enumerate(PROMPTS):
        print(f"--- sample {i + 1} ---")
        print_stream(prompt)
        params = SamplingParams(max_new_tokens=80, temperature=0.8, top_k=50, seed=seed + i)
        generate_text(ckpt.model, ckpt.tokenizer, prompt, params, on_text=print_stream)
        print()
    sys.stdout.flush()  # the samples before the closing lines, also when stdout and stderr go to one file
    total = time.perf_counter() - started
    logger.info(f"done in {total / 60:.1f} minutes. Loss curve: {out / 'run' / 'plots' / 'loss.png'}")
    logger.info(f"try: lmlab generate {out / 'run'} --prompt 'def main(' --top-k 50")
    logger.info(f"     lmlab serve {out / 'run'}   (then open http://127.0.0.1:8000 to chat with it)")
    return {"val_loss": summary.metrics["val_loss"], "perplexity": report["perplexity"], "bits_per_byte": report["bits_per_byte"],
            "minutes": total / 60, "steps": summary.step}

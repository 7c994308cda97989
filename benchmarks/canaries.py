"""Memorisation check ("The Secret Sharer", Carlini et al., 2019): canaries planted in a real text, their
exposure after normal training, after DP training (train.dp) and, where lmlab.data.pii exists, after PII
redaction of the training text.

The corpus is the start of Tiny Shakespeare (--chars characters) with random-digit canaries
("my secret number is 4 0 9 3") planted R times each for R in --repeats, plus --controls canaries that
are never planted. A character-level GPT is trained on it (the same recipe and steps for every row) and
``lmlab eval canaries`` ranks each secret among all 10^digits secrets (enumerated).

    python benchmarks/canaries.py                              # the default (about 15 min on a quiet CPU)
    python benchmarks/canaries.py --steps 300 --chars 200000   # shorter
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, write_results  # noqa: E402
from lmlab.data.prepare import prepare  # noqa: E402
from lmlab.data.tokenizer import train_tokenizer  # noqa: E402
from lmlab.eval.canaries import make_canaries, plant_canaries, write_canaries  # noqa: E402
from lmlab.runs import RunFolder  # noqa: E402
from lmlab.train.logger import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def recipe(data: Path, out: Path, steps: int, threads: int) -> dict:
    """The character-level GPT every row trains (dropout 0: memorisation is what is measured)."""
    return {"model": {"n_layer": 2, "n_head": 4, "d_model": 128, "block_size": 64, "dropout": 0.0},
            "data": {"path": str(data)},
            "train": {"out_dir": str(out), "batch_size": 32, "max_steps": steps, "warmup_steps": min(50, steps // 10),
                      "lr": 3e-3, "eval_interval": steps, "eval_batches": 20, "log_interval": 50,
                      "checkpoint_interval": steps, "progress": False, "precision": "fp32", "threads": threads}}


def prepared_corpus(lines: list[str], val: list[str], folder: Path) -> Path:
    """A char-level prepared data folder of ``lines`` (train) and ``val``."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "val.txt").write_text("\n".join(val) + "\n", encoding="utf-8")
    tokenizer = train_tokenizer("char", lines + val + ["0123456789"])
    prepare([str(folder / "train.txt")], tokenizer, folder / "data", val_inputs=[str(folder / "val.txt")])
    return folder / "data"


def train_and_measure(name: str, data: Path, out: Path, args, canaries_file: Path, overrides: list[str]) -> dict:
    """Train one row's model, then the exposure of every canary; the row."""
    run = out / name
    shutil.rmtree(run, ignore_errors=True)
    config = out / f"{name}.yaml"
    config.write_text(yaml.safe_dump(recipe(data, run, args.steps, args.threads)))
    subprocess.run([sys.executable, "-m", "lmlab.cli", "train", str(config), *overrides], check=True, cwd=ROOT)
    report = subprocess.run([sys.executable, "-m", "lmlab.cli", "eval", "canaries", str(run), "--canaries",
                             str(canaries_file)], check=True, cwd=ROOT, capture_output=True, text=True)
    exposures = json.loads(report.stdout)["canaries"]
    records = read_metrics(RunFolder(run).metrics)
    manifest = json.loads((RunFolder(run).checkpoints()[-1] / "manifest.json").read_text())
    row = {"training": name, "val_loss": [r["val_loss"] for r in records if "val_loss" in r][-1],
           "epsilon": (manifest.get("privacy") or {}).get("epsilon"),
           "minutes": round(records[-1]["elapsed_s"] / 60, 1)}
    controls = [e["exposure"] for e in exposures if e["repeats"] == 0]
    row["exposure R=0 (controls, mean)"] = round(sum(controls) / len(controls), 2) if controls else None
    for e in exposures:
        if e["repeats"]:
            row[f"exposure R={e['repeats']}"] = round(e["exposure"], 2)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=str(SHARED_DATA / "tinyshakespeare" / "input.txt"), help="the real text")
    p.add_argument("--chars", type=int, default=300_000, help="characters of the text to train on")
    p.add_argument("--repeats", default="1,4,16,64", help="how often each planted canary appears")
    p.add_argument("--controls", type=int, default=2, help="canaries never planted (the baseline)")
    p.add_argument("--digits", type=int, default=4, help="digits of a secret (10^digits candidates, all scored)")
    p.add_argument("--steps", type=int, default=1500, help="training steps of every row")
    p.add_argument("--epsilon", type=float, default=8.0, help="train.dp.target_epsilon of the DP row")
    p.add_argument("--threads", type=int, default=None, help="train.threads")
    p.add_argument("--rows", default="normal,dp,pii", help="which trainings: normal, dp, pii")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "canaries"), help="scratch folder")
    args = p.parse_args()
    text = Path(args.text)
    if not text.is_file():
        sys.exit(f"error: {text} not found (see ../shared/data/README.md)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = text.read_text(encoding="utf-8")[:args.chars].splitlines()
    cut = int(len(lines) * 0.95)
    train, val = lines[:cut], lines[cut:]
    repeats = [int(r) for r in args.repeats.split(",")]
    canaries = make_canaries(repeats + [0] * args.controls, args.digits, args.seed)
    write_canaries(canaries, out / "canaries.jsonl")
    planted = plant_canaries(train, canaries, args.seed)
    rows, notes = [], []
    wanted = args.rows.split(",")
    if "normal" in wanted:
        rows.append(train_and_measure("normal", prepared_corpus(planted, val, out / "plain"), out, args,
                                      out / "canaries.jsonl", []))
    if "dp" in wanted:
        rows.append(train_and_measure(f"dp (epsilon {args.epsilon:g})", prepared_corpus(planted, val, out / "plain"),
                                      out, args, out / "canaries.jsonl", [f"train.dp.target_epsilon={args.epsilon}"]))
    if "pii" in wanted:
        try:
            from lmlab.data.pii import redact_batch
        except ImportError:
            notes.append("PII row skipped: lmlab.data.pii is not in this checkout.")
        else:
            redacted, counts = redact_batch(planted)
            notes.append(f"PII redaction (lmlab.data.pii) replaced {dict(counts) or 'nothing'} in the training text.")
            normal = next((r for r in rows if r["training"] == "normal"), None)
            if redacted == planted and normal is not None:  # the same text: the same model, the same exposures
                rows.append({**normal, "training": "pii-redacted (text unchanged: the normal row)"})
            else:
                rows.append(train_and_measure("pii-redacted", prepared_corpus(redacted, val, out / "redacted"), out,
                                              args, out / "canaries.jsonl", []))
    summary = {"candidates per canary": 10 ** args.digits, "max exposure (bits)": round(args.digits * 3.3219, 2),
               "steps": args.steps, "training characters": args.chars}
    write_results("canaries", rows, summary,
                  notes=(f"Canaries `my secret number is` + {args.digits} random digits, planted R times in the "
                         f"first {args.chars:,} characters of Tiny Shakespeare; a char-level GPT (2 layers, d 128, "
                         f"block 64) trained {args.steps} steps per row; exposure = log2(10^{args.digits}) - "
                         f"log2(rank), rank among all candidates (enumerated). The DP row delta is 1/(2N), N the "
                         f"block-size windows of the training text. " + " ".join(notes)))


if __name__ == "__main__":
    main()

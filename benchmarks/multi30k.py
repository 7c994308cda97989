"""Multi30k English -> German translation: the Transformer and the LSTM-attention recipes, end to end.

Each model's figure counts the whole wall time from the first command: preparing the data (one joint
BPE of 8k), training (``lmlab train configs/multi30k_<model>.yaml``, stopped by train.max_minutes) and
evaluating on test2016 (``lmlab eval seq2seq ... --metrics bleu,chrf``, beam search): every step a
fresh ``lmlab`` process, as a user would run it. BLEU and chrF are sacrebleu's on detokenized, cased
text (lmlab's eval/text_metrics.py; the signature is in the results).

    python benchmarks/multi30k.py                               # both models, one after the other (~90 min)
    python benchmarks/multi30k.py --models transformer          # the issue's goal: >= 35 BLEU in 45 min
    python benchmarks/multi30k.py --models lstm --name multi30k_lstm   # one model: its own results file
    python benchmarks/multi30k.py --models lstm train.max_minutes=5   # overrides go to every recipe
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, write_results  # noqa: E402
from lmlab.runs import RunFolder  # noqa: E402
from lmlab.train.logger import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"transformer": "configs/multi30k_transformer.yaml", "lstm": "configs/multi30k_lstm.yaml"}
GOAL = "test2016 BLEU >= 35 within 45 min of wall time (prepare + train + evaluate) on a 2-core CPU"
ANCHORS = "text-only attention NMT 33.7; small Transformers 35-38 (published tables)"


def lmlab(*args: str) -> float:
    """Run one lmlab command in a fresh process (failing loudly); return its wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmlab.cli", *map(str, args)], check=True, cwd=ROOT)
    return time.perf_counter() - start


def prepare(data: Path, out: Path, vocab_size: int) -> float:
    """The pairs folder (train, val, test2016) with one joint BPE; its wall seconds."""
    shutil.rmtree(out, ignore_errors=True)
    files = {split: [data / f"{split}.en.gz", data / f"{split}.de.gz"] for split in ("train", "val", "test_2016_flickr")}
    return lmlab("data", "prepare", "--pairs", *files["train"], "--val", *files["val"], "--test",
                 *files["test_2016_flickr"], "--vocab-size", vocab_size, "-o", out)


def model_row(name: str, data: Path, out: Path, prepare_s: float, num_beams: int, overrides: list[str]) -> dict:
    """Train and evaluate one recipe; its table row (wall time includes the data preparation)."""
    run, report = out / name, out / f"{name}-test"
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(report, ignore_errors=True)
    train_s = lmlab("train", CONFIGS[name], f"data.path={data}", f"train.out_dir={run}", "train.progress=false",
                    *overrides)
    eval_s = lmlab("eval", "seq2seq", run, "--data", data, "--split", "test", "--metrics", "bleu,chrf",
                   "--num-beams", num_beams, "--out", report)
    scores = json.loads((report / "results.json").read_text())
    records = read_metrics(RunFolder(run).metrics)
    evals = [r for r in records if "val_loss" in r]
    speed = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    wall = prepare_s + train_s + eval_s
    return {"model": name, "steps": evals[-1]["step"] if evals else None,
            "val_loss": round(evals[-1]["val_loss"], 3) if evals else None,
            "val_bleu_greedy": round(evals[-1]["val_bleu"], 2) if evals and "val_bleu" in evals[-1] else None,
            "test_bleu": round(scores["bleu"], 2), "test_chrf": round(scores["chrf"], 2),
            "tokens_per_s": round(sorted(speed)[len(speed) // 2]) if speed else None,
            "prepare_min": round(prepare_s / 60, 1), "train_min": round(train_s / 60, 1),
            "eval_min": round(eval_s / 60, 1), "wall_min": round(wall / 60, 1),
            "goal_met": scores["bleu"] >= 35 and wall <= 45 * 60, "signature": scores.get("bleu_signature")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="transformer,lstm", help="comma-separated: transformer, lstm (default: both)")
    p.add_argument("--data", default=str(SHARED_DATA / "multi30k"), help="folder with {train,val,test_2016_flickr}"
                   ".{en,de}.gz")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "multi30k"), help="scratch folder for runs")
    p.add_argument("--vocab-size", type=int, default=8000, help="joint BPE vocabulary (default: %(default)s)")
    p.add_argument("--num-beams", type=int, default=4, help="beam width of the test translation (default: %(default)s)")
    p.add_argument("--name", default="multi30k", help="results/<name>.json and .md (default: %(default)s; "
                   "e.g. multi30k_lstm for a run of --models lstm alone)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every recipe")
    args = p.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in CONFIGS]
    if unknown:
        p.error(f"unknown model {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepare_s = prepare(Path(args.data), out / "data", args.vocab_size)
    rows = [model_row(m, out / "data", out, prepare_s, args.num_beams, args.overrides) for m in models]
    summary = {"goal": GOAL, "anchors": ANCHORS, "test set": "test2016 (flickr), 1,000 sentences",
               "evaluation": f"beam {args.num_beams}, sacrebleu on detokenized cased text",
               "wall time": "per model: the data preparation + its training + its evaluation, each a fresh process"}
    write_results(args.name, rows, summary, notes=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()

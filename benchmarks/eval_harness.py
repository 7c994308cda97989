"""ARC-Easy scoring speed: ``lmlab eval task`` beside lm-evaluation-harness, on the same model, task and batch size.

Three ways to score ARC-Easy test (zero-shot, acc and acc_norm, lm-eval's arc_easy prompt) in one process:

- ``lmlab eval task``: lmlab's arc_easy spec through eval/tasks.py (``evaluate_task``, what the command runs
  after loading the checkpoint) and eval/loglik.py's scorer;
- lm-eval ``hf``: the harness's Hugging Face backend on the checkpoint exported with lmlab's exporter (what
  ``lmlab convert`` writes), task ``arc_easy_local`` (lmlab/eval/harness_tasks, the same questions);
- lm-eval ``lmlab``: the harness through lmlab's adapter (eval/harness.py) on the checkpoint.

Models are loaded before the clocks start; each timing covers what one evaluation does from there (reading the
questions, building the requests, scoring, the metrics). Rounds alternate the order, so load from other users
of the machine falls on all alike; the figure is each one's best round. All three must agree: every choice's
log-likelihood within 1e-4 of the ``hf`` backend's, and the same acc / acc_norm.

The default model is lmlab's GPT-2 preset of realistic size (6 layers, 6 heads, width 384, context 512,
random init: speed does not depend on the weights) with a BPE tokenizer of 8192 tokens trained on ARC-Easy
train; ``--checkpoint`` scores any lmlab checkpoint instead.

    python benchmarks/eval_harness.py                  # all 2,376 test questions, 3 rounds
    python benchmarks/eval_harness.py --limit 300 --rounds 1   # a short run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` importable as a package

from benchmarks.common import SHARED_DATA, write_results  # noqa: E402
from lmlab.config import ModelConfig  # noqa: E402
from lmlab.data.tokenizer import train_tokenizer  # noqa: E402
from lmlab.eval.tasks import evaluate_task, load_spec  # noqa: E402
from lmlab.interop.hf import export_hf  # noqa: E402
from lmlab.models.registry import build_model  # noqa: E402
from lmlab.train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

SIZE = dict(preset="gpt2", n_layer=6, n_head=6, d_model=384, block_size=512)
VOCAB = 8192
ARC = SHARED_DATA / "arc-easy"


def arc_texts(folder: Path) -> list[str]:
    """Questions and choices of ARC-Easy train: what the benchmark's tokenizer learns from."""
    texts = []
    for line in (folder / "ARC-Easy-Train.jsonl").read_text(encoding="utf-8").splitlines():
        q = json.loads(line)["question"]
        texts.append(f"Question: {q['stem']}\nAnswer: " + " ".join(c["text"] for c in q["choices"]))
    return texts


def make_checkpoint(folder: Path, arc: Path) -> Path:
    """A random-init GPT-2-preset checkpoint of ``SIZE`` with a BPE tokenizer trained on ARC-Easy train."""
    tokenizer = train_tokenizer("bpe", arc_texts(arc), vocab_size=VOCAB)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SIZE, vocab_size=tokenizer.vocab_size)).eval()
    return save_checkpoint(folder / "ckpt", model, tokenizer)


def lm_eval_runner(lm, arc: Path, limit: int | None):
    """A function that runs the harness on ``arc_easy_local`` with model instance ``lm``: (results, samples)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmlab.eval.harness import HARNESS_TASKS

    manager = TaskManager(include_path=str(HARNESS_TASKS), include_defaults=False, metadata={"data_dir": str(arc)})

    def run():
        out = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy_local"], task_manager=manager, limit=limit,
                                      log_samples=True)
        samples = sorted(out["samples"]["arc_easy_local"], key=lambda s: s["doc_id"])
        metrics = out["results"]["arc_easy_local"]
        return ({"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"]},
                [[float(r[0][0]) for r in s["resps"]] for s in samples])
    return run


def lmlab_runner(ckpt, arc: Path, limit: int | None, batch_size: int):
    """A function that runs lmlab's arc_easy task (what ``lmlab eval task`` runs): (metrics, log-likelihoods)."""
    overrides = {"data": str(arc), **({"limit": limit} if limit else {})}

    def run():
        result = evaluate_task(ckpt.model, ckpt.tokenizer, load_spec("arc_easy", overrides), batch_size=batch_size)
        return ({m: result["metrics"][m] for m in ("acc", "acc_norm")},
                [s["logprobs"] for s in result["samples"]])
    return run


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    """Largest |difference| between two runs' per-choice log-likelihoods (they must cover the same questions)."""
    if [len(x) for x in a] != [len(x) for x in b]:
        raise SystemExit("the runs scored different questions or choices")
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="an lmlab checkpoint (default: a random GPT-2-preset 6x384, ctx 512)")
    parser.add_argument("--data", default=str(ARC), help="folder of the ARC-Easy JSONL files")
    parser.add_argument("--limit", type=int, help="score only the first N test questions (default: all 2,376)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass, for all three")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads for all three (default: torch's own)")
    parser.add_argument("--name", default="eval_harness", help="results/<name>.json and .md")
    parser.add_argument("--note", default="", help="a line for the Markdown (e.g. what else ran on the machine)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    arc = Path(args.data)

    from lm_eval.models.huggingface import HFLM

    from lmlab.eval.harness import LmlabLM

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.checkpoint) if args.checkpoint else make_checkpoint(Path(tmp), arc)
        ckpt = load_checkpoint(path)
        hf_folder = export_hf(ckpt.model, ckpt.tokenizer, Path(tmp) / "hf")
        runners = {
            "lmlab eval task": lmlab_runner(ckpt, arc, args.limit, args.batch_size),
            "lm-eval hf (exported folder)": lm_eval_runner(
                HFLM(pretrained=str(hf_folder), dtype="float32", device="cpu", batch_size=args.batch_size),
                arc, args.limit),
            "lm-eval lmlab adapter": lm_eval_runner(
                LmlabLM(path=str(path), batch_size=args.batch_size, device="cpu"), arc, args.limit),
        }
        times = {name: [] for name in runners}
        outputs = {}
        for r in range(args.rounds):
            names = list(runners) if r % 2 == 0 else list(reversed(runners))
            for name in names:
                start = time.perf_counter()
                outputs[name] = runners[name]()
                times[name].append(time.perf_counter() - start)
                print(f"round {r + 1}: {name}: {times[name][-1]:.2f} s", flush=True)
        n_questions = len(outputs["lmlab eval task"][1])
        hf_name = "lm-eval hf (exported folder)"
        rows = []
        for name in runners:
            metrics, lls = outputs[name]
            best = min(times[name])
            rows.append({"implementation": name, "questions": n_questions, "best_s": best,
                         "examples_per_s": n_questions / best, "vs_hf": min(times[hf_name]) / best,
                         "acc": metrics["acc"], "acc_norm": metrics["acc_norm"],
                         "max_abs_loglik_diff_vs_hf": max_difference(lls, outputs[hf_name][1]),
                         "rounds_s": " / ".join(f"{t:.2f}" for t in times[name])})
        agree = all(r["max_abs_loglik_diff_vs_hf"] <= 1e-4 and (r["acc"], r["acc_norm"]) == (rows[1]["acc"],
                                                                                           rows[1]["acc_norm"])
                    for r in rows)
        summary = {"model": str(path) if args.checkpoint else f"random GPT-2 preset {SIZE}, BPE {VOCAB}",
                   "questions": n_questions, "batch_size": args.batch_size, "rounds": args.rounds,
                   "lmlab_eval_task_vs_hf": round(rows[0]["vs_hf"], 2), "all_agree_within_1e-4": agree,
                   "load_avg_at_end": os.getloadavg()[0]}
        notes = ("ARC-Easy test, zero-shot, fp32 on the CPU, same batch size for all; best round of each; vs_hf = "
                 "hf backend's time / this one's. " + args.note)
        write_results(args.name, rows, summary, notes=notes)
        if not agree:
            raise SystemExit("the three scorings disagree (see max_abs_loglik_diff_vs_hf, acc)")


if __name__ == "__main__":
    main()

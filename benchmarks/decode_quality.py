"""Quality of the lower-precision decoding dtypes: held-out perplexity of trained models in fp32, bf16 and int8.

``lmlab generate/chat/serve --dtype bf16|int8`` round weights (lmlab.models.quantize); the bar is
perplexity within 1% of fp32 on held-out text. Each checkpoint is scored on the validation split of
the data folder it was trained on (its config.yaml's data.path), windows of the full context, the
forward passes in the dtype itself (no autocast).

    python benchmarks/decode_quality.py [RUN ...]   # default: the Shakespeare GPTs the benchmarks train
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` importable as a package

from benchmarks.common import write_results  # noqa: E402
from lmlab.eval.perplexity import evaluate_perplexity  # noqa: E402
from lmlab.models.interface import count_parameters  # noqa: E402
from lmlab.models.quantize import DECODE_DTYPES, for_decoding  # noqa: E402
from lmlab.train.checkpoint import load_checkpoint  # noqa: E402

RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench"  # where the benchmarks write their runs
DEFAULT_RUNS = [RUNS / "shakespeare_char" / "plain" / "run", RUNS / "architectures" / "shakespeare" / "gpt"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, default=DEFAULT_RUNS)
    args = p.parse_args()
    rows = []
    for run in args.runs:
        ckpt = load_checkpoint(run)
        data = yaml.safe_load((run / "config.yaml").read_text())["data"]["path"]
        cfg = ckpt.model.config
        name = f"{'/'.join(run.parts[-3:])} ({cfg.preset} {cfg.n_layer}x{cfg.d_model}, " \
               f"{count_parameters(ckpt.model)[1] / 1e6:.1f}M)"
        reference = None
        for dtype in DECODE_DTYPES:
            model = for_decoding(copy.deepcopy(ckpt.model), dtype)
            ppl = evaluate_perplexity(model, ckpt.tokenizer, data, split="val", progress=False,
                                      precision="fp32")["perplexity"]
            reference = reference or ppl
            rows.append({"model": name, "dtype": dtype, "val perplexity": ppl,
                         "change vs fp32": f"{100 * (ppl / reference - 1):+.2f}%"})
            print(rows[-1], file=sys.stderr)
    worst = max(abs(r["val perplexity"] / next(x["val perplexity"] for x in rows if x["model"] == r["model"]) - 1)
                for r in rows)
    summary = {"largest change vs fp32": f"{100 * worst:.2f}%", "bar": "within 1% of fp32"}
    notes = ("Validation perplexity of trained checkpoints in each decoding dtype: fp32; bf16 (bf16 model, "
             "oneDNN-packed bf16 linears); int8 (weight-only int8 linears, one scale per output channel, bf16 "
             "activations). Windows of the full context, stride = context.")
    write_results("decode_quality", rows, summary, notes=notes)


if __name__ == "__main__":
    main()

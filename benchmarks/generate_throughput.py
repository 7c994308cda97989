"""Generation throughput: lmlab's engine beside ``transformers`` ``generate`` on the same weights.

Greedy decoding at batch 1, 8 and 32 (prompts of different lengths, padded on the left), 256 new
tokens per row, CPU fp32, both with a KV cache and under ``torch.inference_mode``. The model is lmlab's GPT-2 preset (6 layers, 6 heads, width 384,
context 512, vocabulary 8192, random init); its weights are copied into a
``transformers.GPT2LMHeadModel`` (``copy_to_hf`` below maps the names), and the two must produce
identical token sequences before anything is timed, which also checks the mapping.

Rounds alternate which implementation goes first, so load from other users of the machine falls on
both alike. Time to first token: lmlab until its generator yields the first id; transformers a
``generate`` call with ``max_new_tokens=1``.

    python benchmarks/generate_throughput.py            # 5 rounds
    python benchmarks/generate_throughput.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` importable as a package

from benchmarks.common import write_results  # noqa: E402
from lmlab.config import ModelConfig  # noqa: E402
from lmlab.generate.engine import BatchGeneration  # noqa: E402
from lmlab.generate.sampling import SamplingParams  # noqa: E402
from lmlab.models.registry import build_model  # noqa: E402

SIZE = dict(n_layer=6, n_head=6, d_model=384, block_size=512, vocab_size=8192)


def copy_to_hf(model):
    """A ``GPT2LMHeadModel`` holding the weights of lmlab GPT-2-preset ``model``.

    HF GPT-2 keeps its projections in ``Conv1D`` layers whose weight is (in, out), the transpose of
    ``nn.Linear``'s (out, in); ``c_attn`` is our ``qkv`` (q, k, v concatenated in the same order).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    hf = GPT2LMHeadModel(GPT2Config(
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.d_model, n_inner=cfg.d_ff, n_positions=cfg.block_size,
        vocab_size=cfg.vocab_size, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, layer_norm_epsilon=cfg.norm_eps,
        activation_function="gelu_new", tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
        pad_token_id=0))
    ours = model.state_dict()
    theirs = {"transformer.wte.weight": ours["tok_emb.weight"], "transformer.wpe.weight": ours["pos_emb.weight"],
              "transformer.ln_f.weight": ours["norm_f.weight"], "transformer.ln_f.bias": ours["norm_f.bias"]}
    names = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
             "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}
    for i in range(cfg.n_layer):
        for src, dst in names.items():
            w, b = ours[f"blocks.{i}.{src}.weight"], ours[f"blocks.{i}.{src}.bias"]
            theirs[f"transformer.h.{i}.{dst}.weight"] = w if src.startswith("norm") else w.t().contiguous()
            theirs[f"transformer.h.{i}.{dst}.bias"] = b
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte
    assert not missing and not unexpected, (missing, unexpected)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr(), "lm_head must be tied to wte"
    return hf.eval()


def prompts_for(batch: int, base_len: int) -> list[list[int]]:
    """``batch`` random prompts; with batch > 1 their lengths spread over base_len/2 .. 3*base_len/2."""
    g = torch.Generator().manual_seed(1)
    lengths = [base_len] if batch == 1 else [base_len // 2 + (i * base_len) // (batch - 1) for i in range(batch)]
    return [torch.randint(0, SIZE["vocab_size"], (n,), generator=g).tolist() for n in lengths]


def run_lmlab(model, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float, float]:
    """(tokens of each row, seconds to the first token of every row, seconds in all)."""
    params = [SamplingParams(max_new_tokens=n, temperature=0) for _ in prompts]
    rows = [[] for _ in prompts]
    t0 = time.perf_counter()
    first = None
    for step in BatchGeneration(model, prompts, params):
        if first is None:
            first = time.perf_counter() - t0
        for row, token in enumerate(step):
            if token is not None:
                rows[row].append(token)
    return rows, first, time.perf_counter() - t0


def run_hf(hf, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float]:
    """(tokens of each row, seconds in all) of a greedy ``generate`` of exactly n new tokens, left-padded."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, use_cache=True, pad_token_id=0)
        total = time.perf_counter() - t0
    return out[:, longest:].tolist(), total


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of rows whose greedy sequences are identical."""
    return sum(x == y for x, y in zip(a, b)) / len(a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; each runs both implementations")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each before timing")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="2 rounds of 32 new tokens")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.new_tokens = 2, 32
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="gpt2", **SIZE)).eval()
    hf = copy_to_hf(model)
    n = args.new_tokens
    single = prompts_for(1, args.prompt_len)
    ours, _, _ = run_lmlab(model, single, n)
    theirs, _ = run_hf(hf, single, n)
    assert len(ours[0]) == n, f"lmlab produced {len(ours[0])} tokens, expected {n}"
    assert ours == theirs, "batch-1 greedy token sequences differ"
    print(f"identical {n}-token greedy sequences at batch 1 (first 12: {ours[0][:12]})", file=sys.stderr)
    with torch.inference_mode():  # logits agree too, not only their argmax
        ids = torch.tensor([single[0] + ours[0][:-1]])
        diff = (model(ids)[0] - hf(ids).logits).abs().max().item()

    rows, summary = [], {}
    for batch in args.batch_sizes:
        prompts = prompts_for(batch, args.prompt_len)
        for _ in range(args.warmup):
            ours, _, _ = run_lmlab(model, prompts, n)
            theirs, _ = run_hf(hf, prompts, n)
        same = agreement(ours, theirs)
        times, firsts = {"lmlab": [], "hf": []}, {"lmlab": [], "hf": []}
        for r in range(args.rounds):
            for impl in (["lmlab", "hf"] if r % 2 == 0 else ["hf", "lmlab"]):
                if impl == "lmlab":
                    _, first, total = run_lmlab(model, prompts, n)
                else:
                    _, total = run_hf(hf, prompts, n)
                    _, first = run_hf(hf, prompts, 1)
                times[impl].append(total)
                firsts[impl].append(first)
                print(f"batch {batch:3d} round {r + 1}/{args.rounds} {impl:5s} {batch * n / total:8.1f} tokens/s  "
                      f"first token {1000 * first:.1f} ms", file=sys.stderr)
        for impl, label in [("lmlab", "lmlab BatchGeneration"), ("hf", "transformers generate")]:
            rows.append({
                "batch": batch,
                "implementation": label,
                "tokens/s (median)": batch * n / statistics.median(times[impl]),
                "tokens/s (best)": batch * n / min(times[impl]),
                "ms/step (median)": 1000 * statistics.median(times[impl]) / n,
                "first token ms (median)": 1000 * statistics.median(firsts[impl]),
                "total s (median)": statistics.median(times[impl]),
            })
        ratio = rows[-2]["tokens/s (median)"] / rows[-1]["tokens/s (median)"]
        summary[f"batch {batch}: lmlab / hf (tokens/s)"] = round(ratio, 3)
        summary[f"batch {batch}: hf / lmlab (time to first token)"] = round(
            rows[-1]["first token ms (median)"] / rows[-2]["first token ms (median)"], 3)
        summary[f"batch {batch}: rows with identical greedy sequences"] = f"{same:.0%}"
    summary.update({
        "max |logit difference| (full forward, batch 1)": f"{diff:.2e}",
        "goal": "lmlab >= 1.5x transformers at batch 1, >= 2x at batch 8",
        "transformers attention": hf.config._attn_implementation,
    })
    notes = (f"Greedy decoding, {n} new tokens per row, CPU fp32, KV cache, torch.inference_mode, "
             f"{torch.get_num_threads()} torch threads. GPT-2 6 layers x 6 heads x 384 wide, context "
             f"{SIZE['block_size']}, vocabulary 8192, random init; the transformers GPT2LMHeadModel holds a copy "
             f"of the same weights (identical {n}-token sequence at batch 1, asserted before timing). Batch 1: a "
             f"{args.prompt_len}-token prompt; batch B > 1: prompts of {args.prompt_len // 2} to "
             f"{args.prompt_len // 2 + args.prompt_len} tokens, padded on the left with an attention mask in both. "
             f"{args.rounds} rounds after {args.warmup} warmup run(s), order alternating; tokens/s = B x {n} / wall "
             f"time of the whole call (prefill included). Time to first token: lmlab until the first step yields; "
             f"transformers a generate call with max_new_tokens=1. 'rows with identical greedy sequences': with "
             f"padding the two compute in different orders, and a random-init model's near-ties can flip an argmax "
             f"and then the rest of that row. The machine is shared, so figures carry a few percent of noise.")
    write_results("generate_throughput", rows, summary, notes=notes)


if __name__ == "__main__":
    main()

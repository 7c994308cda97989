"""Generation throughput: lmlab's engine beside ``transformers`` ``generate`` on the same weights.

Greedy decoding, batch 1, 256 new tokens after a 16-token prompt, CPU fp32, both with a KV cache and
under ``torch.inference_mode``. The model is lmlab's GPT-2 preset (6 layers, 6 heads, width 384,
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
from lmlab.generate.engine import generate_tokens  # noqa: E402
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


def run_lmlab(model, prompt: list[int], n: int) -> tuple[list[int], float, float]:
    """(tokens, seconds to the first token, seconds in all)."""
    params = SamplingParams(max_new_tokens=n, temperature=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        it = generate_tokens(model, prompt, params)
        tokens = [next(it)]
        first = time.perf_counter() - t0
        tokens += list(it)
        total = time.perf_counter() - t0
    return tokens, first, total


def run_hf(hf, prompt: list[int], n: int) -> tuple[list[int], float]:
    """(tokens, seconds in all) of a greedy ``generate`` of exactly n new tokens."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, use_cache=True, pad_token_id=0)
        total = time.perf_counter() - t0
    return out[0, len(prompt):].tolist(), total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; each runs both implementations")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each before timing")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="2 rounds of 64 new tokens")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.new_tokens = 2, 64
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="gpt2", **SIZE)).eval()
    hf = copy_to_hf(model)
    prompt = torch.randint(0, SIZE["vocab_size"], (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    n = args.new_tokens

    ours, _, _ = run_lmlab(model, prompt, n)
    theirs, _ = run_hf(hf, prompt, n)
    assert len(ours) == n, f"lmlab produced {len(ours)} tokens, expected {n}"
    assert ours == theirs, f"token sequences differ at position {next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)}"
    print(f"identical {n}-token greedy sequences (first 12: {ours[:12]})", file=sys.stderr)
    with torch.inference_mode():  # logits agree too, not only their argmax
        ids = torch.tensor([prompt + ours[:-1]])
        diff = (model(ids)[0] - hf(ids).logits).abs().max().item()

    for _ in range(args.warmup):
        run_lmlab(model, prompt, n), run_hf(hf, prompt, n)
    times = {"lmlab": [], "hf": []}
    firsts = {"lmlab": [], "hf": []}
    for r in range(args.rounds):
        for impl in (["lmlab", "hf"] if r % 2 == 0 else ["hf", "lmlab"]):
            if impl == "lmlab":
                _, first, total = run_lmlab(model, prompt, n)
            else:
                _, total = run_hf(hf, prompt, n)
                _, first = run_hf(hf, prompt, 1)
            times[impl].append(total)
            firsts[impl].append(first)
            print(f"round {r + 1}/{args.rounds} {impl:5s} {n / total:7.1f} tokens/s  first token {1000 * first:.1f} ms",
                  file=sys.stderr)

    rows = []
    for impl, label in [("lmlab", "lmlab generate_tokens"), ("hf", "transformers generate")]:
        rows.append({
            "implementation": label,
            "tokens/s (median)": n / statistics.median(times[impl]),
            "tokens/s (best)": n / min(times[impl]),
            "ms/token (median)": 1000 * statistics.median(times[impl]) / n,
            "first token ms (median)": 1000 * statistics.median(firsts[impl]),
            "total s (median)": statistics.median(times[impl]),
        })
    summary = {
        "lmlab / hf (tokens/s)": round(rows[0]["tokens/s (median)"] / rows[1]["tokens/s (median)"], 3),
        "hf / lmlab (time to first token)": round(rows[1]["first token ms (median)"] / rows[0]["first token ms (median)"], 3),
        "identical token sequences": True,
        "max |logit difference| (full forward)": f"{diff:.2e}",
        "goal": "lmlab >= 1.5x transformers",
        "transformers attention": hf.config._attn_implementation,
    }
    notes = (f"Greedy decoding, batch 1, {n} new tokens after a {args.prompt_len}-token prompt, CPU fp32, KV cache, "
             f"torch.inference_mode, {torch.get_num_threads()} torch threads. GPT-2 6 layers x 6 heads x 384 wide, "
             f"context {SIZE['block_size']}, vocabulary 8192, random init; the transformers GPT2LMHeadModel holds a "
             f"copy of the same weights and produced the identical token sequence (asserted before timing). "
             f"{args.rounds} rounds after {args.warmup} warmup run(s), order alternating; tokens/s = {n} / wall time "
             f"of the whole call (prefill included). Time to first token: lmlab until the generator yields its "
             f"first id; transformers a generate call with max_new_tokens=1. The machine is shared, so figures "
             f"carry a few percent of noise.")
    write_results("generate_throughput", rows, summary, notes=notes)


if __name__ == "__main__":
    main()

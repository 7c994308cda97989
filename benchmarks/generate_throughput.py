"""Generation throughput: lmlab's engine beside ``transformers`` ``generate`` and llama.cpp on the same weights.

Greedy decoding at batch 1, 8 and 32 (prompts of different lengths, padded on the left), 256 new
tokens per row, CPU, all with a KV cache. The model is lmlab's GPT-2 preset (6 layers, 6 heads,
width 384, context 512, vocabulary 8192, random init); its weights are copied into a
``transformers.GPT2LMHeadModel`` (``copy_to_hf`` below maps the names), and the two must produce
identical token sequences before anything is timed, which also checks the mapping.

lmlab runs in each decoding dtype (``--dtypes``: fp32, bf16, int8; lmlab.models.quantize). Where
llama-cpp-python imports, the same weights exported to GGUF by lmlab's exporter (what ``lmlab
convert RUN out.gguf --dtype f32|f16|q8_0`` writes) run in llama.cpp at batch 1, greedy through its
own sampler, each timing in a child process so that a crash is reported as a row, not lost. q8_0
loads without llama.cpp's AMX weight repacking (``use_extra_bufts=False``), which crashes on CPUs
with AMX-INT8 in llama-cpp-python 0.3.36. Every row says how many of its greedy tokens equal lmlab
fp32's (the common prefix: after one near-tie flips, the rest of a row differs).

Rounds alternate the order of the implementations, so load from other users of the machine falls on
all alike. Time to first token: lmlab until its generator yields the first id; transformers a
``generate`` call with ``max_new_tokens=1``; llama.cpp until its generator yields the first id.

    python benchmarks/generate_throughput.py            # 3 rounds
    python benchmarks/generate_throughput.py --quick    # a smoke run

``--profile N`` adds where a decoding step's time goes: for each lmlab dtype at batch 1 and 8 (those of
--batch-sizes), N greedy steps under ``torch.profiler``, the time of the top-level ops summed by kind
(matrix products, attention, every other op) beside the wall time of N steps without the profiler; the
rest of the wall time is Python and dispatch between the ops. The profiler adds its own cost to each op,
so the op times are upper bounds and "between ops" a lower bound.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` importable as a package

from benchmarks.common import markdown_table, write_results  # noqa: E402
from lmlab.config import ModelConfig  # noqa: E402
from lmlab.generate.engine import BatchGeneration  # noqa: E402
from lmlab.generate.precision import choose_dtype  # noqa: E402
from lmlab.generate.sampling import SamplingParams  # noqa: E402
from lmlab.models.quantize import for_decoding  # noqa: E402
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


def common_prefix(a: list[list[int]], b: list[list[int]]) -> str:
    """How many tokens of ``a`` equal ``b``'s before the first difference in each row, summed: "k/n"."""
    same = sum(next((i for i, (x, y) in enumerate(zip(r, t)) if x != y), min(len(r), len(t))) for r, t in zip(a, b))
    return f"{same}/{sum(map(len, b))}"


LLAMA_CPP_DTYPES = ("f32", "f16", "q8_0")


def llama_cpp_worker(path: str, prompt: list[int], n: int, threads: int) -> dict:
    """In a child process: load the GGUF file (without repacked weight buffers), one untimed run, one timed
    greedy run of n tokens after ``prompt``; its tokens and times."""
    import llama_cpp
    import llama_cpp.llama_cpp as bindings

    default = bindings.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False  # llama.cpp's --no-repack: AMX repacking of q8_0 crashes on this CPU
        return p
    bindings.llama_model_default_params = params
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + n + 1, n_threads=threads, n_threads_batch=threads,
                          seed=0, verbose=False)

    def run() -> tuple[list[int], float, float]:
        llm.reset()
        tokens, first = [], None
        start = time.perf_counter()
        for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            tokens.append(token)
            if first is None:
                first = time.perf_counter() - start
            if len(tokens) == n:
                break
        return tokens, first, time.perf_counter() - start

    run()
    tokens, first, total = run()
    return {"tokens": tokens, "first": first, "total": total}


def run_llama_cpp(path: Path, prompt: list[int], n: int, threads: int) -> dict:
    """``llama_cpp_worker`` in a child process: its result, or {"crash": what killed it}."""
    cmd = [sys.executable, __file__, "--llama-cpp-worker", json.dumps([str(path), prompt, n, threads])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        reason = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        return {"crash": f"{reason}: {(done.stderr.strip().splitlines() or [''])[-1][:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def export_for_llama_cpp(model, folder: Path) -> dict[str, Path] | str:
    """The model in GGUF files, one per LLAMA_CPP_DTYPES (with a byte tokenizer: the prompts are token ids
    and the rest of the vocabulary is padding), or why llama.cpp rows are skipped."""
    try:
        importlib.import_module("llama_cpp")
    except ImportError as e:
        return f"llama.cpp rows skipped: llama_cpp does not import ({e}); pip install llama-cpp-python"
    from lmlab.data.tokenizer import train_tokenizer
    from lmlab.interop.gguf import export_gguf

    tokenizer = train_tokenizer("byte", [])
    return {dtype: Path(export_gguf(model, tokenizer, folder / f"model-{dtype}.gguf", dtype))
            for dtype in LLAMA_CPP_DTYPES}


def row(batch: int, label: str, n: int, times: list[float], firsts: list[float], same: str) -> dict:
    return {
        "batch": batch,
        "implementation": label,
        "tokens/s (median)": batch * n / statistics.median(times),
        "tokens/s (best)": batch * n / min(times),
        "ms/step (median)": 1000 * statistics.median(times) / n,
        "first token ms (median)": 1000 * statistics.median(firsts),
        "total s (median)": statistics.median(times),
        "greedy tokens = lmlab fp32": same,
    }


MATMUL_OPS = {"aten::linear", "aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::baddbmm",
              "aten::_weight_int8pack_mm", "mkldnn::_linear_pointwise"}
ATTENTION_OPS = {"aten::scaled_dot_product_attention"}


def step_profile(model, prompts: list[list[int]], steps: int, repeats: int = 3) -> dict:
    """Where a greedy decoding step of ``model`` goes: wall ms per step (no profiler), and per step the ms of
    the top-level ops by kind and their number (``torch.profiler`` over as many steps).

    Each measurement runs its own generation: a prefill and 4 warm steps, then ``steps`` measured ones, so
    all cover the same cache lengths; the wall time is the best of ``repeats``, the profile the one of
    ``repeats`` with the least op time (load from other processes only ever adds).
    """
    from torch.profiler import ProfilerActivity, profile

    def warm_generation():
        params = [SamplingParams(max_new_tokens=steps + 6, temperature=0) for _ in prompts]
        generation = iter(BatchGeneration(model, prompts, params))
        for _ in range(5):
            next(generation)
        return generation

    def op_times(prof) -> tuple[dict[str, float], int]:
        kinds = {"matrix products": 0.0, "attention": 0.0, "other ops": 0.0}
        top_level = [e for e in prof.events() if e.cpu_parent is None]
        for event in top_level:
            kind = ("matrix products" if event.name in MATMUL_OPS else
                    "attention" if event.name in ATTENTION_OPS else "other ops")
            kinds[kind] += event.cpu_time_total / 1000 / steps  # us in all -> ms per step
        return kinds, len(top_level)

    wall, kinds, ops = float("inf"), None, 0
    for _ in range(repeats):
        generation = warm_generation()
        start = time.perf_counter()
        for _ in range(steps):
            next(generation)
        wall = min(wall, (time.perf_counter() - start) / steps * 1000)
        generation = warm_generation()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                next(generation)
        these, count = op_times(prof)
        if kinds is None or sum(these.values()) < sum(kinds.values()):
            kinds, ops = these, count
    return {"wall ms/step": wall, **{f"{k} ms": v for k, v in kinds.items()},
            "between ops ms (Python, dispatch)": max(wall - sum(kinds.values()), 0.0), "top-level ops/step": ops / steps}


def profile_table(models: dict, batch_sizes: list[int], prompt_len: int, steps: int) -> tuple[list[dict], str]:
    """``step_profile`` of each lmlab dtype at batch 1 and 8 (those in ``batch_sizes``): rows and Markdown."""
    rows = []
    for batch in [b for b in batch_sizes if b in (1, 8)]:
        for dtype, model in models.items():
            if dtype == "bf16-cast":
                continue
            print(f"profiling lmlab {dtype} at batch {batch} ({steps} steps)", file=sys.stderr)
            rows.append({"batch": batch, "lmlab dtype": dtype,
                         **step_profile(model, prompts_for(batch, prompt_len), steps)})
    md = (f"Where a decoding step goes (`--profile {steps}`: torch.profiler over {steps} greedy steps after "
          f"4 warm ones, the least loaded of 3; wall: the best of 3 without the profiler; ms per step; op times "
          f"include the profiler's own cost, so 'between ops' is a lower bound):\n\n{markdown_table(rows)}")
    return rows, md


def auto_choice(model) -> str:
    """What ``--dtype auto`` chooses for ``model`` here, with the probe's times (its log line)."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("lmlab.generate.precision")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        choose_dtype(copy.deepcopy(model))
    finally:
        log.removeHandler(handler)
    return lines[-1] if lines else "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "int8"], help="lmlab decoding dtypes to time")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; each runs every implementation")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each before timing")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp rows")
    p.add_argument("--quick", action="store_true", help="2 rounds of 32 new tokens")
    p.add_argument("--name", default="generate_throughput",
                   help="results file name under benchmarks/results (default: generate_throughput)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile STEPS decoding steps of each lmlab dtype at batch 1 and 8, best of 3 (default: 0 = no)")
    p.add_argument("--llama-cpp-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.llama_cpp_worker:
        print(json.dumps(llama_cpp_worker(*json.loads(args.llama_cpp_worker))))
        return
    if args.quick:
        args.rounds, args.new_tokens = 2, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

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
    auto = auto_choice(model)
    models = {d: for_decoding(copy.deepcopy(model), d) for d in args.dtypes}  # as `lmlab generate --dtype d`
    if "bf16" in args.dtypes:  # what issue 16 measured first: the model merely cast, linears unpacked
        models["bf16-cast"] = copy.deepcopy(model).to(torch.bfloat16)
    folder = tempfile.TemporaryDirectory()
    gguf = "llama.cpp rows skipped (--no-llama-cpp)" if args.no_llama_cpp else export_for_llama_cpp(model, Path(folder.name))

    rows, summary, crashes = [], {}, {}
    for batch in args.batch_sizes:
        prompts = prompts_for(batch, args.prompt_len)
        impls = [f"lmlab {d}" for d in models if d != "bf16-cast" or batch <= 8] + ["hf"]
        if batch == 1 and isinstance(gguf, dict):
            impls += [f"llama.cpp {d}" for d in gguf]
        reference = run_lmlab(models["fp32"], prompts, n)[0] if "fp32" in models else None
        tokens, times, firsts = {}, {i: [] for i in impls}, {i: [] for i in impls}
        for _ in range(args.warmup):
            for impl in impls:
                if impl.startswith("lmlab"):
                    run_lmlab(models[impl.split()[1]], prompts, n)
                elif impl == "hf":
                    run_hf(hf, prompts, n)
        for r in range(args.rounds):
            for impl in (impls if r % 2 == 0 else impls[::-1]):
                if impl in crashes:
                    continue
                if impl.startswith("lmlab"):
                    out, first, total = run_lmlab(models[impl.split()[1]], prompts, n)
                elif impl == "hf":
                    out, total = run_hf(hf, prompts, n)
                    _, first = run_hf(hf, prompts, 1)
                else:
                    result = run_llama_cpp(gguf[impl.split()[1]], prompts[0], n, threads)
                    if "crash" in result:
                        crashes[impl] = result["crash"]
                        print(f"{impl} crashed: {result['crash']}", file=sys.stderr)
                        continue
                    out, first, total = [result["tokens"]], result["first"], result["total"]
                tokens[impl] = out
                times[impl].append(total)
                firsts[impl].append(first)
                print(f"batch {batch:3d} round {r + 1}/{args.rounds} {impl:15s} {batch * n / total:8.1f} tokens/s  "
                      f"first token {1000 * first:.1f} ms", file=sys.stderr)
        for impl in impls:
            label = {"hf": "transformers generate fp32"}.get(impl, impl.replace("lmlab", "lmlab BatchGeneration"))
            if impl in crashes:
                rows.append({"batch": batch, "implementation": label, "greedy tokens = lmlab fp32": f"crashed ({crashes[impl]})"})
                continue
            same = common_prefix(tokens[impl], reference) if reference is not None else ""
            rows.append(row(batch, label, n, times[impl], firsts[impl], same))
        speed = {impl: batch * n / statistics.median(times[impl]) for impl in impls if times[impl]}
        if "lmlab fp32" in speed:
            summary[f"batch {batch}: lmlab fp32 / transformers (tokens/s)"] = round(speed["lmlab fp32"] / speed["hf"], 3)
        best = max((i for i in speed if i.startswith("lmlab")), key=speed.get)
        summary[f"batch {batch}: fastest lmlab dtype"] = f"{best.split()[1]} ({speed[best]:.0f} tokens/s)"
        if batch == 1 and isinstance(gguf, dict):
            for ours_, theirs_ in (("lmlab fp32", "llama.cpp f32"), (best, "llama.cpp f16"), (best, "llama.cpp q8_0")):
                if ours_ in speed and theirs_ in speed:
                    summary[f"batch 1: {ours_} / {theirs_} (tokens/s)"] = round(speed[ours_] / speed[theirs_], 3)
    summary.update({
        "max |logit difference| lmlab vs transformers (full forward, batch 1)": f"{diff:.2e}",
        "goals": "batch 1, same weights: lmlab fp32 >= 1.0x llama.cpp f32; lmlab's best dtype >= 1.0x llama.cpp f16; "
                 "lmlab >= 1.5x transformers at batch 1, >= 2x at batch 8",
        "--dtype auto here": auto,
        "llama.cpp": gguf if isinstance(gguf, str) else "llama-cpp-python " + __import__("llama_cpp").__version__,
        "transformers attention": hf.config._attn_implementation,
    })
    folder.cleanup()
    notes = (f"Greedy decoding, {n} new tokens per row, CPU, KV cache, {threads} threads (torch and llama.cpp). "
             f"GPT-2 6 layers x 6 heads x 384 wide, context {SIZE['block_size']}, vocabulary 8192, random init; the "
             f"transformers GPT2LMHeadModel holds a copy of the same weights (identical {n}-token sequence at batch 1, "
             f"asserted before timing), llama.cpp the same weights in GGUF files written by lmlab's exporter (lmlab "
             f"convert), q8_0 loaded without AMX repacking. lmlab dtypes: fp32; bf16 = bf16 model with oneDNN-packed "
             f"bf16 linears; bf16-cast = model.to(bfloat16) alone (batch 1 and 8); int8 = weight-only int8 linears "
             f"(per-channel scales) with bf16 activations. Batch 1: a "
             f"{args.prompt_len}-token prompt; batch B > 1: prompts of {args.prompt_len // 2} to "
             f"{args.prompt_len // 2 + args.prompt_len} tokens, padded on the left with an attention mask. "
             f"{args.rounds} rounds after {args.warmup} warmup run(s), order alternating; tokens/s = B x {n} / wall "
             f"time of the whole call (prefill included). 'greedy tokens = lmlab fp32': tokens equal to lmlab fp32's "
             f"before the first difference, summed over rows (rounded weights, and padding computed in another order, "
             f"can flip a random-init model's near-tie and then the rest of that row). The machine is shared, so "
             f"figures carry a few percent of noise.")
    profile_rows, profile_md = profile_table(models, args.batch_sizes, args.prompt_len, args.profile) if args.profile else ([], "")
    write_results(args.name, rows, summary, notes=notes, extra_md=profile_md,
                  extra_json={"step profile": profile_rows} if profile_rows else None)
    if profile_md:
        print(profile_md)


if __name__ == "__main__":
    main()

"""Load test of ``lmlab serve``: N concurrent clients on loopback, batched server vs unbatched.

The server runs in this process (uvicorn in a thread, the real app from ``lmlab.serve.app``) on
a GPT-2-preset model (6 layers, 6 heads, width 384, context 512, random init) with a byte-level
tokenizer, or on ``--checkpoint``. For each number of clients (1, 8, 32), every client sends
streaming ``/v1/completions`` requests one after another (prompts of 8 to 24 tokens, greedy,
``max_tokens`` 64) until the fixed number of requests is done. Every response is checked: status
200, well-formed events, ``[DONE]`` last, usage present, text equal to what the same request gives
alone (greedy, so batching must not change it). Reported: requests/s, generated tokens/s, p50/p99
latency and time to first token, failures. The same load runs against the server with
``--max-batch-size 1`` (one sequence at a time: no batching) as the baseline beside it.

    python benchmarks/serve_load.py                  # 1, 8, 32 clients, 64 requests each
    python benchmarks/serve_load.py --quick          # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` importable as a package

from benchmarks.common import write_results  # noqa: E402
from lmlab.config import ModelConfig, ServeConfig  # noqa: E402
from lmlab.data.tokenizer import train_tokenizer  # noqa: E402
from lmlab.models.registry import build_model  # noqa: E402
from lmlab.serve.app import create_app  # noqa: E402

SIZE = dict(preset="gpt2", n_layer=6, n_head=6, d_model=384, block_size=512)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``lmlab serve``'s app under uvicorn in a background thread."""

    def __init__(self, model, tokenizer, max_batch_size: int):
        import uvicorn

        self.port = free_port()
        cfg = ServeConfig(model_name="bench", port=self.port, max_batch_size=max_batch_size, max_queue=256)
        app = create_app(model, tokenizer, cfg)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


async def one_request(client, url: str, prompt: list[int], max_tokens: int) -> dict:
    """One streaming completion; returns its timings, text and token count, or the reason it failed."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, pieces, usage, done = None, [], None, False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"status {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    return {"error": event["error"]["message"]}
                if event["choices"] and event["choices"][0]["text"]:
                    first = first or time.perf_counter() - t0
                    pieces.append(event["choices"][0]["text"])
                usage = event.get("usage") or usage
    except Exception as e:  # a malformed response is a failure to count, not a crash
        return {"error": f"{type(e).__name__}: {e}"}
    if not done or usage is None:
        return {"error": "stream ended without usage and [DONE]"}
    return {"latency": time.perf_counter() - t0, "first": first or time.perf_counter() - t0,
            "tokens": usage["completion_tokens"], "text": "".join(pieces)}


async def load(url: str, prompts: list[list[int]], clients: int, max_tokens: int) -> tuple[list[dict], float]:
    """``clients`` workers take the prompts in turn until none is left; (results in prompt order, seconds)."""
    import httpx

    results: list[dict | None] = [None] * len(prompts)
    next_index = iter(range(len(prompts)))

    async def worker(client):
        for i in next_index:
            results[i] = await one_request(client, url, prompts[i], max_tokens)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return results, time.perf_counter() - t0


def summarise(results: list[dict], seconds: float, reference: list[str] | None) -> dict:
    ok = [r for r in results if "error" not in r]
    wrong = sum(reference is not None and r.get("text") != ref for r, ref in zip(results, reference or results))
    latencies = sorted(r["latency"] for r in ok) or [float("nan")]
    firsts = sorted(r["first"] for r in ok) or [float("nan")]

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))]
    return {
        "requests/s": len(ok) / seconds,
        "tokens/s": sum(r["tokens"] for r in ok) / seconds,
        "p50 latency s": statistics.median(latencies),
        "p99 latency s": pct(latencies, 0.99),
        "p50 first token s": statistics.median(firsts),
        "failed": len(results) - len(ok),
        "text differs from alone": wrong - (len(results) - len(ok)) if reference is not None else 0,
        "wall s": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64, help="requests per load level (default: 64)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=32, help="the batched server's batch size (default: 32)")
    p.add_argument("--checkpoint", default=None, help="serve this checkpoint instead of the random GPT-2-preset model")
    p.add_argument("--quick", action="store_true", help="1 and 8 clients, 16 requests of 16 tokens")
    args = p.parse_args()
    if args.quick:
        args.clients, args.requests, args.max_tokens = [1, 8], 16, 16

    torch.manual_seed(0)
    if args.checkpoint:
        from lmlab.train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint)
        model, tokenizer = ckpt.model, ckpt.tokenizer
    else:
        tokenizer = train_tokenizer("byte", [])
        model = build_model(ModelConfig(vocab_size=tokenizer.vocab_size, **SIZE)).eval()
    g = torch.Generator().manual_seed(1)
    # random ids other than end-of-text (which would end a row at once)
    prompts = [[t for t in torch.randint(0, 256, (8 + (i * 7) % 17,), generator=g).tolist()]
               for i in range(args.requests)]
    prompts = [[t if t != tokenizer.eot_id else t - 1 for t in p] for p in prompts]

    rows, summary, reference = [], {}, None
    for label, batch in [("batched", args.max_batch_size), ("unbatched (--max-batch-size 1)", 1)]:
        with Server(model, tokenizer, batch) as url:
            if reference is None:  # every request alone, once: what each answer must be
                alone, _ = asyncio.run(load(url, prompts, 1, args.max_tokens))
                reference = [r.get("text") for r in alone]
            for clients in args.clients:
                results, seconds = asyncio.run(load(url, prompts, clients, args.max_tokens))
                row = {"server": label, "clients": clients, **summarise(results, seconds, reference)}
                rows.append(row)
                print(f"{label:32s} {clients:3d} clients  {row['requests/s']:6.2f} req/s  {row['tokens/s']:7.1f} tok/s  "
                      f"p50 {row['p50 latency s']:.2f} s  p99 {row['p99 latency s']:.2f} s  failed {row['failed']}",
                      file=sys.stderr)
    for clients in args.clients:
        batched = next(r for r in rows if r["clients"] == clients and r["server"] == "batched")
        single = next(r for r in rows if r["clients"] == clients and r["server"] != "batched")
        summary[f"{clients} clients: batched / unbatched (tokens/s)"] = round(batched["tokens/s"] / single["tokens/s"], 3)
    summary["failed or malformed responses (all runs)"] = sum(r["failed"] for r in rows)
    summary["answers that differ from the same request alone (all runs)"] = sum(r["text differs from alone"] for r in rows)
    notes = (f"Streaming /v1/completions over loopback (httpx), greedy, max_tokens {args.max_tokens}, prompts of 8-24 "
             f"tokens, {args.requests} requests per level; each client sends its next request when the last one "
             f"ends. Model: {'checkpoint ' + args.checkpoint if args.checkpoint else 'GPT-2 preset 6x384, context 512, random init, byte tokenizer'}; "
             f"CPU fp32, {torch.get_num_threads()} torch threads; server and clients share the machine. The batched "
             f"server runs up to {args.max_batch_size} sequences at once with continuous batching (waiting requests "
             f"join the running batch between two decoding steps). Latency: request sent to [DONE]; first token: to "
             f"the first non-empty text event.")
    write_results("serve_load", rows, summary, notes=notes)


if __name__ == "__main__":
    main()

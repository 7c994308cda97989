"""Soak test of ``lmlab serve``: mixed clients for N minutes against one server; does anything drift?

The server is the real app under uvicorn on loopback, in a process of its own (this script started
with ``--serve``) so that its resident memory is its own: a GPT-2-preset model (4 layers, 4 heads,
width 256, context 512, random init) with a byte-level tokenizer, or ``--checkpoint``. ``--clients``
clients send requests one after another, each drawn at random (fixed seed): /v1/completions or
/v1/chat/completions, streamed or not, max_tokens from 1 to 128, greedy or sampled with a seed;
one streamed request in six is dropped by its client after a few events (a client that goes away
mid-stream). Every 2 s the server's /health is read (sequences running, the batch's ``cache_width``)
and its resident memory (VmRSS of /proc/PID/status).

Reported per time window and overall: requests served, dropped on purpose, errors (any status other
than 200, an error event, a malformed answer, a connection error: the goal is 0), p50/p99 latency,
generated tokens/s, the server's memory and the cache width. Memory is compared from the end of the
warm-up to the end (goal: flat), and after the load the server must go back to idle (nothing
running, cache width 0): sequences whose client left must not linger.

    python benchmarks/serve_soak.py                 # 5 minutes, 16 clients
    python benchmarks/serve_soak.py --minutes 1     # a short check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` importable as a package

from benchmarks.common import write_results  # noqa: E402

SIZE = dict(preset="gpt2", n_layer=4, n_head=4, d_model=256, block_size=512)
MODEL = "soak"
MAX_TOKENS = [1, 4, 16, 32, 64, 128]
WORDS = "the of and a to in is you that it he was for on are as with his they at be this from".split()
WARMUP_S = 10.0


# ---- the server (this script with --serve PORT, in its own process) ----

def serve(port: int, checkpoint: str | None, max_batch_size: int) -> None:
    """Run the app under uvicorn on 127.0.0.1:port until terminated."""
    import uvicorn

    from lmlab.config import ModelConfig, ServeConfig
    from lmlab.data.tokenizer import train_tokenizer
    from lmlab.models.registry import build_model
    from lmlab.serve.app import create_app

    torch.manual_seed(0)
    if checkpoint:
        from lmlab.train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint)
        model, tokenizer = ckpt.model, ckpt.tokenizer
    else:
        tokenizer = train_tokenizer("byte", [])
        model = build_model(ModelConfig(vocab_size=tokenizer.vocab_size, **SIZE)).eval()
    cfg = ServeConfig(model_name=MODEL, port=port, max_batch_size=max_batch_size, max_queue=256,
                      max_new_tokens=max(MAX_TOKENS), request_timeout=120)
    uvicorn.run(create_app(model, tokenizer, cfg), host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, log) -> tuple[subprocess.Popen, str]:
    """This script in --serve mode, in a process of its own; returns it and its URL once /health answers."""
    import httpx

    port = free_port()
    cmd = [sys.executable, __file__, "--serve", str(port), "--max-batch-size", str(args.max_batch_size)]
    cmd += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start; its output is in {log.name}")


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- the clients ----

def draw_request(rng: random.Random) -> dict:
    """One request at random: endpoint, streaming, length, sampling, and whether the client leaves early."""
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40)))
    chat = rng.random() < 0.5
    body = {"model": MODEL, "max_tokens": rng.choice(MAX_TOKENS), "stream": rng.random() < 0.6}
    body |= {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    body |= {"temperature": 0} if rng.random() < 0.5 else {"temperature": 0.8, "seed": rng.randrange(1000)}
    drop_after = rng.randint(1, 4) if body["stream"] and rng.random() < 1 / 6 else None
    return {"path": "/v1/chat/completions" if chat else "/v1/completions", "body": body, "drop_after": drop_after}


async def streamed(client, url: str, request: dict) -> dict:
    """A streamed request read to [DONE], or dropped after ``drop_after`` events."""
    body, events = {**request["body"], "stream_options": {"include_usage": True}}, 0
    usage = done = None
    async with client.stream("POST", url + request["path"], json=body) as r:
        if r.status_code != 200:
            return {"error": f"status {r.status_code}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data, events = line[len("data: "):], events + 1
            if request["drop_after"] is not None and events >= request["drop_after"]:
                return {"dropped": True}  # leaving the `async with` closes the connection mid-stream
            if data == "[DONE]":
                done = True
            elif "error" in (event := json.loads(data)):
                return {"error": event["error"]["message"]}
            else:
                usage = event.get("usage") or usage
    if not done or usage is None:
        return {"error": "stream ended without usage and [DONE]"}
    return {"tokens": usage["completion_tokens"]}


async def whole(client, url: str, request: dict) -> dict:
    """A request answered in one JSON body."""
    r = await client.post(url + request["path"], json=request["body"])
    if r.status_code != 200:
        return {"error": f"status {r.status_code}: {r.text[:200]}"}
    return {"tokens": r.json()["usage"]["completion_tokens"]}


async def one_request(client, url: str, request: dict) -> dict:
    """Send ``request``; its outcome with when it started and how long it took."""
    t0 = time.monotonic()
    try:
        send = streamed if request["body"]["stream"] else whole
        outcome = await send(client, url, request)
    except Exception as e:  # a connection error or a malformed answer: an error to count, not a crash
        outcome = {"error": f"{type(e).__name__}: {e}"}
    return {**outcome, "start": t0, "latency": time.monotonic() - t0, "kind": kind_of(request)}


def kind_of(request: dict) -> str:
    """A short label: chat or completions, streamed or not."""
    return ("chat" if "chat" in request["path"] else "completions") + (" stream" if request["body"]["stream"] else "")


async def client_loop(client, url: str, seed: int, until: float, results: list) -> None:
    """One client: requests one after another until ``until``."""
    rng = random.Random(seed)
    while time.monotonic() < until:
        results.append(await one_request(client, url, draw_request(rng)))


async def monitor(client, url: str, pid: int, until: float, samples: list) -> None:
    """Every 2 s: the server's /health (running, cache_width) and resident memory."""
    while time.monotonic() < until:
        try:
            health = (await client.get(url + "/health")).json()
            samples.append({"t": time.monotonic(), "rss": rss_mib(pid), "running": health["running"],
                            "width": health.get("cache_width")})
        except Exception as e:
            samples.append({"t": time.monotonic(), "rss": rss_mib(pid), "error": f"{type(e).__name__}: {e}"})
        await asyncio.sleep(2)


async def soak(url: str, pid: int, clients: int, seconds: float) -> tuple[list, list, float]:
    """Run the clients and the monitor for ``seconds``; (request outcomes, samples, start time)."""
    import httpx

    results, samples = [], []
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        t0 = time.monotonic()
        until = t0 + seconds
        await asyncio.gather(monitor(client, url, pid, until, samples),
                             *(client_loop(client, url, seed, until, results) for seed in range(clients)))
    return results, samples, t0


async def wait_idle(url: str, seconds: float = 60) -> dict:
    """/health once nothing runs or waits (or after ``seconds``): dropped sequences must not linger."""
    import httpx

    async with httpx.AsyncClient(timeout=10) as client:
        deadline = time.monotonic() + seconds
        while True:
            health = (await client.get(url + "/health")).json()
            if (health["running"] == 0 and health["queued"] == 0) or time.monotonic() > deadline:
                return health
            await asyncio.sleep(0.5)


# ---- the report ----

def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``; NaN if empty."""
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def window_row(label: str, results: list, samples: list, seconds: float) -> dict:
    """The figures of one time window (or of the whole run)."""
    served = [r for r in results if "tokens" in r]
    latencies = [r["latency"] for r in served]
    widths = [s["width"] for s in samples if s.get("width") is not None]
    return {"window": label, "served": len(served), "dropped": sum("dropped" in r for r in results),
            "errors": sum("error" in r for r in results),
            "p50 latency s": statistics.median(latencies) if latencies else float("nan"),
            "p99 latency s": pct(latencies, 0.99), "tokens/s": sum(r["tokens"] for r in served) / seconds,
            "server RSS MiB": samples[-1]["rss"] if samples else float("nan"),
            "cache width max": max(widths, default=None), "cache width p50": pct(widths, 0.5) if widths else None}


def windows(results: list, samples: list, t0: float, seconds: float, count: int) -> list[dict]:
    """One row per window of the run (requests by the time they started, samples by when they were taken)."""
    size, rows = seconds / count, []
    for i in range(count):
        lo, hi = t0 + i * size, t0 + (i + 1) * size
        rows.append(window_row(f"{i * size:.0f}-{(i + 1) * size:.0f} s", [r for r in results if lo <= r["start"] < hi],
                               [s for s in samples if lo <= s["t"] < hi], size))
    return rows


def rss_trend(rss: list[float]) -> str:
    """Mean resident memory over the first and the last third of the samples: growth there is a leak,
    while a rise during the first seconds is the allocator and caches warming up."""
    third = max(len(rss) // 3, 1)
    first, last = statistics.fmean(rss[:third]), statistics.fmean(rss[-third:])
    return f"{first:.1f} / {last:.1f} ({last - first:+.1f})"


def summarise(results: list, samples: list, t0: float, seconds: float, idle: dict, log_text: str) -> dict:
    """The verdicts: errors, memory from warm-up to end, cache width, idle afterwards, server log."""
    warm = [s for s in samples if s["t"] >= t0 + WARMUP_S] or samples
    errors = [r["error"] for r in results if "error" in r]
    by_kind = {}
    for kind in sorted({r["kind"] for r in results}):
        latencies = [r["latency"] for r in results if r["kind"] == kind and "tokens" in r]
        by_kind[kind] = f"{len(latencies)} served, p50 {statistics.median(latencies):.2f} s, p99 {pct(latencies, 0.99):.2f} s" \
            if latencies else "none served"
    widths = [s["width"] for s in samples if s.get("width") is not None]
    return {
        "requests served": sum("tokens" in r for r in results),
        "dropped mid-stream by the client (on purpose)": sum("dropped" in r for r in results),
        "errors (goal 0)": len(errors),
        "first errors": errors[:5],
        "server RSS MiB after warm-up -> end": f"{warm[0]['rss']:.1f} -> {warm[-1]['rss']:.1f} "
                                               f"({warm[-1]['rss'] - warm[0]['rss']:+.1f})",
        "server RSS MiB max": round(max(s["rss"] for s in samples), 1),
        "server RSS MiB mean, first third / last third (goal: flat)": rss_trend([s["rss"] for s in samples]),
        "cache width: first third max / last third max / overall max": cache_width_trend(widths),
        "idle after the load (running, queued, cache_width)": (idle["running"], idle["queued"],
                                                               idle.get("cache_width")),
        "server log lines with Traceback or ERROR": sum(("Traceback" in line or "ERROR" in line)
                                                        for line in log_text.splitlines()),
        "by kind": by_kind,
    }


def cache_width_trend(widths: list[int]) -> str:
    """Max width in the first and last thirds of the run, and overall: flat, not growing, is the goal."""
    if not widths:
        return "not reported by /health"
    third = max(1, len(widths) // 3)
    return f"{max(widths[:third])} / {max(widths[-third:])} / {max(widths)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="how long the load runs (default: 5)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default: 16)")
    p.add_argument("--max-batch-size", type=int, default=8, help="the server's --max-batch-size (default: 8)")
    p.add_argument("--windows", type=int, default=5, help="time windows in the table (default: 5)")
    p.add_argument("--checkpoint", default=None, help="serve this checkpoint instead of the random GPT-2-preset model")
    p.add_argument("--serve", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)  # the server process
    args = p.parse_args()
    if args.serve is not None:
        return serve(args.serve, args.checkpoint, args.max_batch_size)

    seconds = args.minutes * 60
    with tempfile.NamedTemporaryFile("w+", prefix="serve_soak_", suffix=".log", delete=False) as log:
        proc, url = start_server(args, log)
        try:
            results, samples, t0 = asyncio.run(soak(url, proc.pid, args.clients, seconds))
            idle = asyncio.run(wait_idle(url))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        log.seek(0)
        log_text = log.read()
    rows = windows(results, samples, t0, seconds, args.windows) + [window_row("all", results, samples, seconds)]
    summary = summarise(results, samples, t0, seconds, idle, log_text)
    model = f"checkpoint {args.checkpoint}" if args.checkpoint else "GPT-2 preset 4x256, context 512, random init, byte tokenizer"
    notes = (f"{args.minutes:g} min of {args.clients} clients against one `lmlab serve` process (uvicorn on loopback, "
             f"--max-batch-size {args.max_batch_size}); model: {model}; CPU fp32. Each client sends random requests "
             f"one after another: completions or chat (half each), streamed (60 %) or not, max_tokens in "
             f"{MAX_TOKENS}, greedy or sampled; one streamed request in six is dropped by its client after 1-4 "
             f"events. Errors: any non-200, error event, malformed answer or connection error. Memory: the server "
             f"process's VmRSS, from {WARMUP_S:g} s in (warm-up) to the end. Cache width: /health's cache_width "
             f"(positions per sequence in the batch's KV cache), sampled every 2 s. Server log: {log.name}")
    write_results("serve_soak", rows, summary, notes=notes)


if __name__ == "__main__":
    main()

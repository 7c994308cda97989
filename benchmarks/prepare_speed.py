"""Data preparation speed: `lmlab data prepare` beside `datasets.map(batched=True, num_proc=2)` + the
same uint16 shards, on the same files and tokenizer, side by side in one run.

The corpus is WikiText-2 (train + valid + test) concatenated a few times (~50 MB), as JSONL with one
article section per record; a byte-level BPE tokenizer (8,192 tokens) is trained on it once and used
by both. Each method runs in its own subprocess; the table gives the wall time, MB/s of document
text, CPU seconds (all its processes; MB per CPU second is the figure that other load on a shared
machine disturbs least), and the peak resident memory (sampled with psutil every 50 ms: the largest single process,
and all its processes together). The peer loads the JSONL with `datasets`, maps the tokenizer over
it in 2 processes, and writes the token ids + end-of-text into 100M-token uint16 shards as lmlab
does; the check "same tokens" compares its shards with lmlab's byte for byte. The speed-up is the
median over --pairs lmlab / peer runs (the table's, then pairs alternated peer first), since this
machine's speed drifts by more than the goal's margin from one minute to the next.

Needs the data extra (pyarrow, datasets) and psutil (installed with peft, of the test extra).

    python benchmarks/prepare_speed.py                # about 10 minutes on 2 busy cores
    python benchmarks/prepare_speed.py --copies 1     # ~13 MB
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, write_results  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}

PEER = r'''
import sys, numpy as np, datasets, tokenizers
corpus, tok_path, out, cache = sys.argv[1:5]
datasets.disable_progress_bars()
tk = tokenizers.Tokenizer.from_file(tok_path)
tk.encode_special_tokens = True  # as lmlab: "<|endoftext|>" in text is text
eot = tk.token_to_id("<|endoftext|>")
ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True, num_proc=2)
def encode(batch):
    return {"ids": [e.ids + [eot] for e in tk.encode_batch_fast(batch["text"], add_special_tokens=False)]}
ds = ds.map(encode, batched=True, num_proc=2, remove_columns=ds.column_names)
shard_tokens, shard, room, f = 100_000_000, 0, 0, None
for batch in ds.iter(batch_size=10_000):
    ids = np.concatenate([np.asarray(x, dtype=np.uint16) for x in batch["ids"]])
    while len(ids):
        if room == 0:
            f = open(f"{out}/train_{shard:03d}.bin", "wb"); shard += 1; room = shard_tokens
        part, ids = ids[:room], ids[room:]
        f.write(part.tobytes()); room -= len(part)
f.close()
'''


def build_corpus(work: Path, copies: int) -> tuple[Path, int]:
    """WikiText-2's three files, ``copies`` times, as JSONL (one record per "= Heading =" section)."""
    path = work / f"wikitext2_x{copies}.jsonl"
    text = "".join((SHARED_DATA / "wikitext-2" / name).read_text(encoding="utf-8")
                   for name in ("train.txt", "valid.txt", "test.txt"))
    sections, current = [], []
    for line in text.splitlines(keepends=True):
        if line.startswith(" = ") and not line.startswith(" = = ") and current:
            sections.append("".join(current))
            current = []
        current.append(line)
    sections.append("".join(current))
    nbytes = 0
    with path.open("w", encoding="utf-8") as f:
        for i in range(copies):
            for s in sections:
                if s.strip():
                    f.write(json.dumps({"text": s}) + "\n")
                    nbytes += len(s.encode("utf-8"))
    return path, nbytes


def measure(cmd: list[str], out: Path) -> dict:
    """Run cmd in a fresh output folder; wall seconds, CPU seconds (the process and every process it
    started and waited for) and peak RSS (largest process, all processes)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    log = (out.parent / f"{out.name}.log").open("w+b")
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=ENV)
    peak_one = peak_all = 0
    while proc.poll() is None:
        try:
            rss = [p.memory_info().rss for p in [proc, *proc.children(recursive=True)]]
        except psutil.Error:
            rss = []
        if rss:
            peak_one, peak_all = max(peak_one, max(rss)), max(peak_all, sum(rss))
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        log.seek(0)
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read().decode()[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": peak_one / 2**20, "peak_rss_all_mib": peak_all / 2**20}


def load_now() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def shards(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.glob("train_*.bin")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4, help="WikiText-2 copies (4: ~50 MB)")
    parser.add_argument("--work", default="/tmp/lmlab_prepare_speed", help="scratch folder (deleted at the end)")
    parser.add_argument("--pairs", type=int, default=3,
                        help="lmlab and peer runs behind the speed-up: the table's pair, then the rest alternated "
                             "peer-first; the goal is judged on their median (this machine's speed drifts)")
    args = parser.parse_args()
    load_start = load_now()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus, nbytes = build_corpus(work, args.copies)
    small, small_bytes = build_corpus(work, 1)
    tok = work / "tok.json"
    py = sys.executable
    subprocess.run([py, "-m", "lmlab", "tokenizer", "train", str(small), "-o", str(tok), "--kind", "bpe",
                    "--vocab-size", "8192", "--force"], check=True, stdout=subprocess.DEVNULL, env=ENV)
    lmlab = [py, "-m", "lmlab", "data", "prepare", "--tokenizer", str(tok), "--val-fraction", "0", "--force"]
    runs = [
        ("lmlab data prepare (workers = cores)", [*lmlab, str(corpus), "-o"], nbytes, "lmlab"),
        ("lmlab data prepare --workers 1 (encoding in the main process)", [*lmlab, "--workers", "1", str(corpus), "-o"],
         nbytes, "lmlab1"),
        ("datasets.map(batched, num_proc=2) + uint16 shards", [py, "-c", PEER, str(corpus), str(tok)], nbytes, "peer"),
        ("lmlab data prepare, 1/4 of the corpus (memory check)", [*lmlab, str(small), "-o"], small_bytes, "small"),
        ("lmlab data prepare --redact-pii, 1/4 of the corpus", [*lmlab, "--redact-pii", str(small), "-o"],
         small_bytes, "pii"),
        ("lmlab data prepare --redact-pii --workers 1, 1/4", [*lmlab, "--redact-pii", "--workers", "1", str(small),
                                                              "-o"], small_bytes, "pii1"),
    ]
    commands = {key: cmd for _, cmd, _, key in runs}

    def run(key: str) -> dict:
        """measure() of run ``key`` in its own folder work/key (the peer's datasets cache inside it)."""
        out = work / key
        extra = [str(out / "hf_cache")] if key == "peer" else []
        return measure([*commands[key], str(out), *extra], out)

    rows, results = [], {}
    for name, _, size, key in runs:
        r = results[key] = run(key)
        rows.append({"method": name, "input_mb": round(size / 1e6, 1), "seconds": r["seconds"],
                     "mb_per_s": size / 1e6 / r["seconds"], "cpu_seconds": r["cpu_seconds"],
                     "mb_per_cpu_s": size / 1e6 / r["cpu_seconds"], "peak_rss_mib": r["peak_rss_mib"],
                     "peak_rss_all_processes_mib": r["peak_rss_all_mib"]})
        print(rows[-1], flush=True)
    same = shards(work / "lmlab") == shards(work / "peer")
    ratios = [results["peer"]["seconds"] / results["lmlab"]["seconds"]]
    for _ in range(args.pairs - 1):  # peer first, so that a drifting machine favours neither side
        peer = run("peer")
        ratios.append(peer["seconds"] / run("lmlab")["seconds"])
        print(f"pair {len(ratios)}: {ratios[-1]:.2f}x", flush=True)
    speedup = statistics.median(ratios)
    summary = {
        "speed-up over datasets.map (MB/s ratio; median of the pairs)": round(speedup, 2),
        "speed-up of each lmlab / peer pair (the first is the table's)": ", ".join(f"{r:.2f}" for r in ratios),
        "CPU-time ratio (datasets.map / lmlab; what the speed-up is on idle cores)":
            round(results["peer"]["cpu_seconds"] / results["lmlab"]["cpu_seconds"], 2),
        "goal": ">= 1.5x",
        "met": speedup >= 1.5,
        "workers = cores vs --workers 1 (speed ratio)": round(results["lmlab1"]["seconds"] / results["lmlab"]["seconds"], 2),
        "with --redact-pii: workers = cores vs --workers 1": round(results["pii1"]["seconds"] / results["pii"]["seconds"], 2),
        "load average (1, 5, 15 min) at the start and at the end": f"{load_start} / " + load_now(),
        "same tokens as the peer (shards byte-identical)": same,
        "same tokens for any number of workers": shards(work / "lmlab") == shards(work / "lmlab1"),
        "corpus": f"WikiText-2 train+valid+test x{args.copies} as JSONL sections, {nbytes / 1e6:.1f} MB of text",
    }
    write_results("prepare_speed", rows, summary, notes=" ".join(__doc__.split("\n\n")[0:2]).replace("\n", " "))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Hardening audit: every bad input a skeptical user tries, run through the real ``lmlab`` command.

Two parts, counted together:
1. A catalogue of named cases (the ones the hardening issue listed, and their kin), each run as a
   subprocess with what it must do: ``error`` (exit 1, one ``error:`` line, nothing written, no input
   changed), ``ok`` (exit 0), ``warn`` (exit 0 with a ``warning:`` line), ``usage`` (exit 2),
   ``interrupt`` (Ctrl-C: exit 130 with a checkpoint saved), ``resume`` (kill -9, then --resume gives
   the uninterrupted losses).
2. The property-based tests (tests/test_hardening.py) with ``--examples`` times their usual number
   of hypothesis examples, each case logged and tallied.

Prints a table and writes benchmarks/results/hardening.{json,md} (machine info included) and
docs/hardening.md. Usage: ``.venv/bin/python benchmarks/hardening.py [--examples 10]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import RESULTS, machine_info, write_results

ROOT = Path(__file__).resolve().parents[1]
LMLAB = [sys.executable, "-m", "lmlab.cli"]
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxers".split()


def corpus(n_lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + ".\n" for _ in range(n_lines))


def lmlab(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*LMLAB, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def build_workspace(ws: Path) -> None:
    """Inputs: text, bad files, prepared data, a tiny LM run, a classifier, an HF folder, configs."""
    ws.mkdir(parents=True)
    (ws / "corpus.txt").write_text(corpus(600))
    (ws / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (ws / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (ws / "other").mkdir()
    (ws / "other" / "notes.txt").write_text("a user's own file\n")
    (ws / "labels.tsv").write_text("sentence\tlabel\n" + "".join(
        f"{line.strip()}\t{i % 2}\n" for i, line in enumerate(corpus(60, 1).splitlines())))
    (ws / "chat.jsonl").write_text("".join(json.dumps({"instruction": f"say {w}", "input": "", "output": w}) + "\n"
                                           for w in WORDS * 3))
    train = ("batch_size: 4, max_steps: 30, warmup_steps: 2, eval_interval: 10, eval_batches: 2, log_interval: 1, "
             "checkpoint_interval: 10, progress: false")
    (ws / "tiny.yaml").write_text(f"model: {{preset: gpt2, n_layer: 1, n_head: 2, d_model: 32, block_size: 32}}\n"
                                  f"data: {{path: data}}\ntrain: {{out_dir: run, {train}}}\n")
    (ws / "cls.yaml").write_text(f"model: {{path: run}}\ndata: {{train: labels.tsv, val: labels.tsv, max_length: 32}}\n"
                                 f"train: {{out_dir: cls, {train}}}\n")
    (ws / "sft.yaml").write_text(f"model: {{path: run}}\ndata: {{train: chat.jsonl}}\ntrain: {{out_dir: sft, {train}}}\n")
    for args in (["data", "prepare", "corpus.txt", "--kind", "char", "-o", "data"], ["train", "tiny.yaml"],
                 ["finetune", "classify", "cls.yaml"], ["convert", "run", "hf"]):
        done = lmlab(*args, cwd=ws)
        if done.returncode:
            sys.exit(f"workspace: lmlab {' '.join(args)} failed:\n{done.stderr[-2000:]}")


def nan_checkpoint(ws: Path) -> str:
    """A copy of the run's newest checkpoint with NaN weights and a matching SHA-256 in its manifest."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    src = sorted((ws / "run" / "checkpoints").iterdir())[-1]
    dst = ws / "nan_ckpt"
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    rehash(dst, hashlib)
    return "nan_ckpt"


def bad_manifest_checkpoint(ws: Path) -> str:
    src = sorted((ws / "run" / "checkpoints").iterdir())[-1]
    dst = ws / "neg_vocab_ckpt"
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["model_config"]["vocab_size"] = -5
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return "neg_vocab_ckpt"


def rehash(folder: Path, hashlib) -> None:
    """Recompute the manifest's SHA-256 of each file it lists (a corruption the checksum does not catch)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for key in ("sha256", "files"):
        table = manifest.get(key)
        if isinstance(table, dict):
            for name in table:
                if (folder / name).is_file():
                    table[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def truncated_state_run(ws: Path) -> str:
    """A copy of the run whose newest state.pt lost its second half."""
    shutil.copytree(ws / "run", ws / "trunc_run")
    state = sorted((ws / "trunc_run" / "checkpoints").iterdir())[-1] / "state.pt"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    import hashlib

    rehash(state.parent, hashlib)
    return "trunc_run"


def catalogue(ws: Path) -> list[tuple[str, list[str], str]]:
    """(name, lmlab arguments, expected outcome) of every named case."""
    t = ["train", "tiny.yaml", "train.out_dir=new_run"]
    cases = [
        ("convert a run onto itself", ["convert", "run", "run"], "error"),
        ("convert into a folder of other files", ["convert", "run", "other"], "error"),
        ("convert onto an existing file", ["convert", "run", "corpus.txt"], "error"),
        ("convert into a run folder (other kind)", ["convert", "hf", "cls"], "error"),
        ("tokenizer train onto its own input", ["tokenizer", "train", "corpus.txt", "--kind", "char", "-o",
                                                "corpus.txt"], "error"),
        ("data prepare onto its own input", ["data", "prepare", "corpus.txt", "--kind", "char", "-o", "corpus.txt"],
         "error"),
        ("data prepare into a folder of other files", ["data", "prepare", "corpus.txt", "--kind", "char", "-o",
                                                       "other"], "error"),
        ("train into a folder of other files", ["train", "tiny.yaml", "train.out_dir=other"], "error"),
        ("train into an existing run without --resume", ["train", "tiny.yaml"], "error"),
        ("eval ppl --out onto a file", ["eval", "ppl", "run", "--data", "corpus.txt", "--out", "corpus.txt"], "error"),
        ("eval ppl --out unwritable", ["eval", "ppl", "run", "--data", "corpus.txt", "--out", "/proc/x"], "error"),
        ("eval classify --out onto a file", ["eval", "classify", "cls", "--data", "labels.tsv", "--out", "labels.tsv"],
         "error"),
        ("tokenizer -o below a file", ["tokenizer", "train", "corpus.txt", "-o", "corpus.txt/tok.json"], "error"),
        ("train.out_dir below a file", ["train", "tiny.yaml", "train.out_dir=corpus.txt/run"], "error"),
        ("convert into an unwritable place", ["convert", "run", "/proc/x"], "error"),
    ]
    for override in ["train.batch_size=0", "train.lr=-1", "train.lr=nan", "model.block_size=0", "train.max_steps=0",
                     "train.grad_accum=0", "train.eval_interval=0", "train.beta2=2", "train.lr_schedule=foo",
                     "train.threads=0", "train.eval_batches=0", "train.epochs=0", "train.warmup_steps=-1",
                     "train.lr=inf", "model.d_model=-3", "model.n_head=3", "model.family=transformer",
                     "train.device=cuda:99", "train.precision=fp8", "train.batch_size=abc", "model.dropout=1.5",
                     "data.path=missing", "train.threads=99999999999999999999", "model.d_model=99999999999999",
                     "nosuchsection.x=1", "train=3", "train.lr"]:
        cases.append((f"train {override}", [*t, override], "error"))
    cases += [
        ("train --stop-after 0", [*t, "--stop-after", "0"], "error"),
        ("train --stop-after -1", [*t, "--stop-after", "-1"], "error"),
        ("train a binary config", ["train", "binary.bin"], "error"),
        ("train a latin-1 config", ["train", "latin1.txt"], "error"),
        ("train a missing config", ["train", "missing.yaml"], "error"),
        ("train a folder as config", ["train", "other"], "error"),
        ("finetune classify train.batch_size=0", ["finetune", "classify", "cls.yaml", "train.out_dir=c2",
                                                  "train.batch_size=0"], "error"),
        ("finetune sft data.max_examples=0", ["finetune", "sft", "sft.yaml", "train.out_dir=s2",
                                              "data.max_examples=0"], "error"),
        ("eval ppl --batch-size 0", ["eval", "ppl", "run", "--data", "corpus.txt", "--batch-size", "0"], "error"),
        ("eval ppl --stride 0", ["eval", "ppl", "run", "--data", "corpus.txt", "--stride", "0"], "error"),
        ("eval ppl --stride -4", ["eval", "ppl", "run", "--data", "corpus.txt", "--stride", "-4"], "error"),
        ("eval ppl on binary data", ["eval", "ppl", "run", "--data", "binary.bin"], "error"),
        ("eval ppl of a classifier", ["eval", "ppl", "cls", "--data", "corpus.txt"], "error"),
        ("eval classify --batch-size 0", ["eval", "classify", "cls", "--data", "labels.tsv", "--batch-size", "0"],
         "error"),
        ("eval classify --max-length 0", ["eval", "classify", "cls", "--data", "labels.tsv", "--max-length", "0"],
         "error"),
        ("eval classify of a language model", ["eval", "classify", "run", "--data", "labels.tsv"], "error"),
        ("predict --max-length 0", ["predict", "cls", "--max-length", "0", "good"], "error"),
        ("predict with a language model", ["predict", "run", "good"], "error"),
        ("generate --prompt-file missing", ["generate", "run", "--prompt-file", "missing.txt"], "error"),
        ("generate --prompt-file binary", ["generate", "run", "--prompt-file", "binary.bin"], "error"),
        ("generate --prompt-file latin-1", ["generate", "run", "--prompt-file", "latin1.txt"], "error"),
        ("generate with a classifier", ["generate", "cls", "--prompt", "the"], "error"),
        ("chat with a classifier", ["chat", "cls", "--message", "hi"], "error"),
        ("generate --num-samples 0", ["generate", "run", "--prompt", "the", "--num-samples", "0"], "error"),
        ("generate --num-beams 0", ["generate", "run", "--prompt", "the", "--num-beams", "0"], "error"),
        ("generate --num-beams -2", ["generate", "run", "--prompt", "the", "--num-beams", "-2"], "error"),
        ("generate --temperature nan", ["generate", "run", "--prompt", "the", "--temperature", "nan"], "error"),
        ("generate --top-p 2", ["generate", "run", "--prompt", "the", "--top-p", "2"], "error"),
        ("generate --max-new-tokens 0", ["generate", "run", "--prompt", "the", "--max-new-tokens", "0"], "error"),
        ("generate a NaN checkpoint", ["generate", nan_checkpoint(ws), "--prompt", "the"], "error"),
        ("generate a checkpoint whose manifest has vocab_size -5", ["generate", bad_manifest_checkpoint(ws),
                                                                     "--prompt", "the"], "error"),
        ("resume from a truncated state.pt", ["train", "tiny.yaml", f"train.out_dir={truncated_state_run(ws)}",
                                              "train.max_steps=40", "--resume"], "error"),
        ("generate from a missing checkpoint", ["generate", "nowhere", "--prompt", "the"], "error"),
        ("generate from a text file as checkpoint", ["generate", "corpus.txt", "--prompt", "the"], "error"),
        ("tokenizer --vocab-size 0", ["tokenizer", "train", "corpus.txt", "-o", "t.json", "--vocab-size", "0"],
         "error"),
        ("data prepare --val-fraction 1.5", ["data", "prepare", "corpus.txt", "-o", "d2", "--val-fraction", "1.5"],
         "error"),
        ("data prepare --val-fraction nan", ["data", "prepare", "corpus.txt", "-o", "d2", "--val-fraction", "nan"],
         "error"),
        ("data prepare --shard-tokens 0", ["data", "prepare", "corpus.txt", "-o", "d2", "--kind", "char",
                                           "--shard-tokens", "0"], "error"),
        ("data prepare of a binary file", ["data", "prepare", "binary.bin", "-o", "d2", "--kind", "char"], "error"),
        ("serve --port 70000", ["serve", "run", "--port", "70000"], "error"),
        ("demo --minutes 0", ["demo", "--minutes", "0", "--out", "demo_run"], "error"),
        ("generate --max-new-tokens beyond the context", ["generate", "run", "--prompt", "the", "--max-new-tokens",
                                                          "500", "--greedy"], "warn"),
        ("predict CKPT --max-length 8 TEXT", ["predict", "cls", "--max-length", "8", "quick brown fox"], "ok"),
        ("lmlab --version", ["--version"], "ok"),
        ("an unknown command", ["nosuchverb"], "usage"),
        ("an unknown flag", ["generate", "run", "--no-such-flag"], "usage"),
        ("--max-new-tokens abc", ["generate", "run", "--prompt", "x", "--max-new-tokens", "abc"], "usage"),
    ]
    return cases


def judge(case: tuple[str, list[str], str], ws: Path) -> dict:
    """Run one catalogue case in the workspace and say whether it did what it must."""
    name, args, expected = case
    before = snapshot(ws)
    started = time.monotonic()
    done = lmlab(*args, cwd=ws)
    after = snapshot(ws)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    traceback = "Traceback" in done.stderr
    written = sorted(set(after) - set(before))
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    verdict = {"error": done.returncode == 1 and len(errors) == 1 and not written,
               "ok": done.returncode == 0,
               "warn": done.returncode == 0 and "warning:" in done.stderr,
               "usage": done.returncode == 2}[expected] and not traceback and not changed
    if written or changed:  # leave the workspace as it was for the next case
        shutil.rmtree(ws)
        shutil.copytree(ws.parent / "pristine", ws, symlinks=True)
    lines = done.stderr.strip().splitlines()
    message = errors[0][len("error: "):] if errors else lines[-1] if lines else ""
    return {"case": name, "expected": expected, "exit": done.returncode, "pass": verdict, "traceback": traceback,
            "written": len(written) if done.returncode else 0, "inputs_changed": len(changed),
            "message": message[:110],
            "seconds": round(time.monotonic() - started, 1)}


def snapshot(folder: Path) -> dict[str, float]:
    """Every path under ``folder`` (top two levels for folders' contents) with its size and mtime."""
    shot = {}
    for p in folder.rglob("*"):
        try:
            st = p.stat()
        except OSError:
            continue
        shot[str(p.relative_to(folder))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return shot


def interrupt_case(ws: Path) -> dict:
    """Ctrl-C during training: exit 130, a checkpoint saved, and --resume continues."""
    cfg = ["train", "tiny.yaml", "train.out_dir=sigint_run", "train.max_steps=100000", "train.warmup_steps=2",
           "train.checkpoint_interval=100000", "train.eval_interval=100000"]
    proc = subprocess.Popen([*LMLAB, *cfg], cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (ws / "sigint_run" / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    saved = list((ws / "sigint_run" / "checkpoints").glob("step-*")) if (ws / "sigint_run").exists() else []
    shutil.rmtree(ws / "sigint_run", ignore_errors=True)
    ok = proc.returncode == 130 and bool(saved) and "Traceback" not in err
    return {"case": "Ctrl-C during train", "expected": "interrupt", "exit": proc.returncode, "pass": ok,
            "traceback": "Traceback" in err, "written": 0, "inputs_changed": 0,
            "message": err.strip().splitlines()[-1][:110] if err.strip() else "", "seconds": 0}


def kill_resume_cases(ws: Path, trials: int, seed: int) -> list[dict]:
    """kill -9 a training run at random moments; --resume must reproduce the uninterrupted losses."""
    base = ["train", "tiny.yaml", "train.max_steps=60", "train.checkpoint_interval=5", "train.eval_interval=20"]
    if lmlab(*base, "train.out_dir=full_run", cwd=ws).returncode:
        return [{"case": "kill -9 baseline", "expected": "resume", "exit": 1, "pass": False}]
    full = losses(ws / "full_run")
    rng, rows = random.Random(seed), []
    for trial in range(trials):
        out = f"killed_{trial}"
        proc = subprocess.Popen([*LMLAB, *base, f"train.out_dir={out}"], cwd=ws, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 6.0))
        proc.kill()
        proc.wait()
        args = [*base, f"train.out_dir={out}"] + (["--resume"] if list((ws / out / "checkpoints").glob("step-*"))
                                                  else [])
        if not args[-1] == "--resume":
            shutil.rmtree(ws / out, ignore_errors=True)
        done = lmlab(*args, cwd=ws)
        same = done.returncode == 0 and losses(ws / out) == full
        temporaries = [p.name for p in (ws / out).rglob(".*")]
        rows.append({"case": f"kill -9 then --resume (trial {trial})", "expected": "resume", "exit": done.returncode,
                     "pass": same and not temporaries, "traceback": "Traceback" in done.stderr, "written": 0,
                     "inputs_changed": 0, "message": "losses equal the uninterrupted run" if same else "losses differ",
                     "seconds": 0})
        shutil.rmtree(ws / out, ignore_errors=True)
    shutil.rmtree(ws / "full_run", ignore_errors=True)
    return rows


def losses(run: Path) -> dict[int, float]:
    """step -> train loss of a run's metrics.jsonl (the last record of a step wins: a resumed run rewrites)."""
    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train_loss" in record:
            rows[record["step"]] = record["train_loss"]
    return rows


def property_tests(examples: float) -> tuple[Counter, list[dict], Counter, int]:
    """Run tests/test_hardening.py and tests/test_serve_fuzz.py with ``examples`` times their examples; tally
    each CLI case's verdict and each fuzzed request's status."""
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as log:
        env = {**os.environ, "LMLAB_FUZZ_EXAMPLES": str(examples), "LMLAB_FUZZ_LOG": log.name}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-o", "addopts=",
                               "tests/test_hardening.py", "tests/test_serve_fuzz.py"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        records = [json.loads(line) for line in log.read().splitlines()]
    cli = [r for r in records if "verdict" in r]
    tally = Counter(r["verdict"].split(":")[0] for r in cli)
    bad = [r for r in cli if r["verdict"] not in ("ok", "error", "usage")]
    statuses = Counter(f"{r['status'] // 100}xx" for r in records if "status" in r)
    return tally, bad, statuses, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=float, default=10, help="times the tests' hypothesis examples (default 10; 0 skips the property tests)")
    parser.add_argument("--kill-trials", type=int, default=4, help="kill -9 trials (default 4)")
    parser.add_argument("--docs-only", action="store_true",
                        help="rewrite docs/hardening.md from results/hardening.json (e.g. after a new serve soak)")
    args = parser.parse_args()
    if args.docs_only:
        saved = json.loads((RESULTS / "hardening.json").read_text())
        return write_docs(saved["rows"], saved["summary"], saved.get("violations", []))
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        build_workspace(ws)
        cases = catalogue(ws)  # (it adds the corrupt checkpoints to the workspace)
        shutil.copytree(ws, ws.parent / "pristine", symlinks=True)
        rows = [judge(case, ws) for case in cases]
        rows.append(interrupt_case(ws))
        rows += kill_resume_cases(ws, args.kill_trials, seed=0)
    tally, bad, statuses, pytest_status = (property_tests(args.examples) if args.examples > 0
                                           else (Counter(), [], Counter(), None))
    summary = {
        "catalogue cases": len(rows), "catalogue passed": sum(r["pass"] for r in rows),
        "catalogue tracebacks": sum(r["traceback"] for r in rows),
        "catalogue silent wrong results": sum(r["exit"] == 0 and r["expected"] == "error" for r in rows),
        "catalogue partial outputs": sum(r["written"] > 0 for r in rows),
        "catalogue inputs changed": sum(r["inputs_changed"] > 0 for r in rows),
        "property cases": sum(tally.values()), **{f"property {k}": v for k, v in sorted(tally.items())},
        "property violations": len(bad),
        "server fuzz requests": sum(statuses.values()), **{f"server fuzz {k}": v for k, v in sorted(statuses.items())},
        "server fuzz 5xx": statuses.get("5xx", 0), "property and fuzz tests exit status": pytest_status,
    }
    notes = ("Catalogue: each case run as `python -m lmlab.cli ...` in a workspace of tiny inputs. Property: "
             "tests/test_hardening.py (hypothesis, derandomized) and tests/test_serve_fuzz.py (schemathesis) with "
             f"LMLAB_FUZZ_EXAMPLES={args.examples}: that many times the examples of the test suite.")
    extra = "" if not bad else "\n\nViolations:\n\n" + "\n".join(f"- `{shown(b['argv'])}`: {b['verdict']}"
                                                                  for b in bad[:30])
    write_results("hardening", rows, summary, notes, extra_md=extra,
                  columns=["case", "expected", "exit", "pass", "message"])
    payload = json.loads((RESULTS / "hardening.json").read_text())  # keep the violations for --docs-only
    (RESULTS / "hardening.json").write_text(json.dumps({**payload, "violations": bad[:30]}, indent=2) + "\n")
    write_docs(rows, summary, bad)


def shown(argv: list[str]) -> str:
    """A command line as text that any file takes (a lone surrogate, as fuzzing types, escaped)."""
    return " ".join(argv).encode("utf-8", "backslashreplace").decode("utf-8")


def write_docs(rows: list[dict], summary: dict, bad: list[dict]) -> None:
    """docs/hardening.md: the figures and the catalogue, regenerated by this script."""
    machine = machine_info()
    failed = [r for r in rows if not r["pass"]]
    lines = ["# Hardening: what lmlab does with bad input, crashes and load", "",
             f"Generated by `benchmarks/hardening.py` on {machine['date']} ({machine['cpu']}, {machine['cores']} "
             f"cores, lmlab {machine.get('lmlab_commit', '?')}). The server figures come from "
             "`benchmarks/serve_soak.py` and `tests/test_serve_fuzz.py` (see below).", "",
             "What is promised (README, \"Errors, exit status and your data\"): whatever the input, a command exits "
             "0 with a valid result, or 1 after exactly one `error:` line (2 for argparse usage errors, 130 for "
             "Ctrl-C after the checkpoint is saved), writes nothing when it fails, and never changes or deletes "
             "its inputs or a folder it did not write; the server answers every request without a 5xx.", "",
             "Where the figures come from:", "",
             "- **Catalogue**: the cases the hardening audit reported (43 tracebacks, 17 silent wrong results, 12 "
             "half-made outputs, `lmlab convert RUN RUN` destroying the run) and their kin, each run as a real "
             "`python -m lmlab.cli` process in a workspace of tiny inputs, plus Ctrl-C and kill -9 + `--resume` "
             "trials.",
             "- **Property**: `tests/test_hardening.py` under hypothesis (derandomized): config overrides and flag "
             "values (zero, negative, NaN, infinity, huge, empty, text, lone surrogates, missing/binary/latin-1 "
             "files, outputs that are files, foreign folders or the verb's own input) for train, finetune "
             "classify/sft, generate, chat, eval ppl/classify, predict, tokenizer train, data prepare and convert, "
             "and every writing verb against every kind of output place, with and without `--force`. Each case is "
             "checked: exit 0 with a valid result (finite metrics, a loadable output), or one error line and the "
             "workspace unchanged, byte for byte.",
             "- **Server fuzz**: `tests/test_serve_fuzz.py` generates requests for every operation from the "
             "server's own `/openapi.json` (schemathesis); each must get a documented status, content type and "
             "body, and no 5xx.",
             "- **Crashes** (in the test suite, not re-run here): `tests/test_checkpoint_faults.py` kills a real "
             "`lmlab train` with SIGKILL at 5 seeded random moments and in each of 6 phases of a checkpoint write "
             "(after the weights, the tokenizer, the state, the manifest, the rename, during pruning), and fills "
             "the disk (ENOSPC patched into each of 3 writes, and a real 4 MiB tmpfs); every time `--resume` "
             "reproduces the uninterrupted run's per-step losses bit for bit and no temporary is left.", "",
             "## Figures", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.items()]
    soak = RESULTS / "serve_soak.json"
    if soak.is_file():
        data = json.loads(soak.read_text())
        lines += ["", "## Server soak", ""] + [f"- {k}: {v}" for k, v in data.get("summary", {}).items()]
    lines += ["", "## Catalogue", "", "| case | expected | exit | pass | message |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['expected']} | {r['exit']} | {'yes' if r['pass'] else '**no**'} | "
              f"{r['message'].replace('|', '/')} |" for r in rows]
    if failed or bad:
        lines += ["", "## Not yet right", ""] + [f"- {r['case']}: exit {r['exit']}, {r['message']}" for r in failed]
        lines += [f"- `lmlab {shown(b['argv'])}`: {b['verdict']}" for b in bad[:30]]
    (ROOT / "docs" / "hardening.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

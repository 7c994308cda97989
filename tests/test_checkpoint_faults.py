"""Fault injection: a training run killed at any moment, or while it writes a checkpoint, or stopped by
a full disk, leaves only sound checkpoints, and ``--resume`` then gives the uninterrupted run's
per-step losses bit for bit.

    kill -9 at random moments       a real ``lmlab train`` subprocess, delays from a seeded RNG
    kill -9 in each write phase     a subprocess whose ``python -c`` wraps one function that
                                    checkpointing calls and ``os._exit(9)``s there (what kill -9 does)
    disk full                       writes that fail with ENOSPC as the libraries raise it, and a
                                    real size-limited tmpfs where mounting one is allowed
"""

from __future__ import annotations

import errno
import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import time

import pytest
import safetensors
import torch

from lmlab.cli import main
from lmlab.runs import list_checkpoints
from lmlab.train.checkpoint import load_checkpoint, load_train_state, read_manifest
from lmlab.train.logger import read_metrics

TRIALS = 5  # random kills
SEED = 20240611
KEEP = 2  # train.keep_checkpoints
COMPARED = ("step", "train_loss", "lr", "tokens", "val_loss", "val_ppl")
TEMPORARY = re.compile(r"^\..+\.(?:tmp|old)-\d+$")  # what atomic_dir leaves behind when killed

# Runs ``lmlab train ...`` (argv[3:]) and os._exit(9)s at the argv[2]-th checkpoint, in phase argv[1].
FAULT = r"""
import os, pathlib, re, shutil, sys
import safetensors.torch, torch
import lmlab.runs
from lmlab.cli import main
from lmlab.data.tokenizer import Tokenizer

phase, nth = sys.argv[1], int(sys.argv[2])
seen = {}

def at(name):
    seen[name] = seen.get(name, 0) + 1
    return seen[name] == nth

def after(module, attr, name, test=lambda *a, **k: True):
    original = getattr(module, attr)
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if test(*args, **kwargs) and at(name) and phase == name:
            os._exit(9)
        return result
    setattr(module, attr, wrapper)

after(safetensors.torch, "save_model", "weights")
after(Tokenizer, "save", "tokenizer")
after(torch, "save", "state")
after(pathlib.Path, "write_text", "manifest", lambda self, *a, **k: self.name == "manifest.json")

replace = os.replace
def renaming(src, dst):  # atomic_dir: the temporary folder becomes step-N
    if re.match(r"^\.step-\d+\.tmp-\d+$", pathlib.Path(src).name) and at("rename") and phase == "rename":
        replace(src, dst)
        os._exit(9)
    return replace(src, dst)
lmlab.runs.os.replace = renaming

rmtree = shutil.rmtree
def pruning(path, *args, **kwargs):  # prune_checkpoints: killed with half of the old checkpoint deleted
    doomed = re.match(r"^\.step-\d+\.tmp-\d+$", pathlib.Path(path).name) and (pathlib.Path(path) / "manifest.json").exists()
    if doomed and phase == "prune" and at("prune"):
        (pathlib.Path(path) / "model.safetensors").unlink()
        os._exit(9)
    return rmtree(path, *args, **kwargs)
lmlab.runs.shutil.rmtree = pruning

sys.exit(main(sys.argv[3:]))
"""
PHASES = ["weights", "tokenizer", "state", "manifest", "rename", "prune"]


@pytest.fixture(scope="module")
def setup(prepared, tmp_path_factory):
    """A config (tiny GPT with dropout, one thread, a checkpoint every 3 of 24 steps, 2 kept) and the
    records and training seconds of its uninterrupted run."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("faults")
    config = root / "tiny.yaml"
    config.write_text(f"""
model: {{n_layer: 1, n_head: 2, d_model: 16, block_size: 16, dropout: 0.1}}
data: {{path: {prepared}}}
train: {{batch_size: 2, max_steps: 24, warmup_steps: 2, eval_interval: 100, eval_batches: 1, log_interval: 1,
        checkpoint_interval: 3, keep_checkpoints: {KEEP}, progress: false, threads: 1}}
""")
    assert main(["train", str(config), f"train.out_dir={root / 'reference'}"]) == 0
    seconds = read_metrics(root / "reference" / "metrics.jsonl")[-1]["elapsed_s"]  # training and checkpoints
    yield config, records(root / "reference"), seconds
    torch.set_num_threads(threads)


def records(run_dir) -> list[dict]:
    """What must not change when a run is interrupted: loss, learning rate and tokens of every step, and
    the final evaluation (a run stopped with --stop-after also evaluates where it stops)."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    return [{k: r[k] for k in COMPARED if k in r} for r in rows if "train_loss" in r or r["step"] == rows[-1]["step"]]


def train_argv(config, run_dir, *more) -> list[str]:
    return ["train", str(config), f"train.out_dir={run_dir}", *more]


def temporaries(run_dir) -> list[str]:
    """Leftovers of atomic writes in the run folder and its checkpoints folder."""
    folders = [run_dir, run_dir / "checkpoints"]
    return [p.name for f in folders if f.is_dir() for p in f.iterdir() if TEMPORARY.match(p.name)]


def assert_sound(ckpt) -> None:
    """The checkpoint passes every check of generate and --resume."""
    read_manifest(ckpt)
    load_checkpoint(ckpt)
    load_train_state(ckpt)


def assert_recovered(setup, run_dir, capsys) -> None:
    """--resume (a fresh start, replacing what is there, if no checkpoint was written) completes the run: the uninterrupted
    run's records, only sound checkpoints, no temporary folder."""
    config, expected, _ = setup
    resume = ["--resume"] if list_checkpoints(run_dir) else ["--force"] if run_dir.exists() else []
    code = main(train_argv(config, run_dir, *resume))
    assert code == 0, capsys.readouterr().err
    assert records(run_dir) == expected
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000021", "step-000024"]
    for ckpt in list_checkpoints(run_dir):
        assert_sound(ckpt)
    assert temporaries(run_dir) == []


def start(argv: list[str], fault: tuple[str, int] | None = None) -> subprocess.Popen:
    """``lmlab ARGV`` in a subprocess; with ``fault`` (phase, n) it kills itself there at the n-th checkpoint."""
    prefix = ["-c", FAULT, fault[0], str(fault[1])] if fault else ["-m", "lmlab.cli"]
    return subprocess.Popen([sys.executable, *prefix, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def test_kill_9_at_random_moments_then_resume(setup, tmp_path, capsys):
    """TRIALS runs killed with SIGKILL a random time after their first step, up to one and a half times
    the uninterrupted run's training time (a run may also finish first)."""
    config, _, seconds = setup
    rng = random.Random(SEED)
    killed = 0
    for trial in range(TRIALS):
        run_dir = tmp_path / f"trial{trial}"
        delay = rng.uniform(0, 1.5 * seconds)
        proc = start(train_argv(config, run_dir))
        deadline = time.monotonic() + 60
        while proc.poll() is None and not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        if proc.poll() is None:
            proc.kill()
            killed += 1
        _, err = proc.communicate()
        assert proc.returncode in (0, -9), err
        if list_checkpoints(run_dir):
            assert_sound(list_checkpoints(run_dir)[-1])  # what --resume reads
        assert_recovered(setup, run_dir, capsys)
    assert killed >= TRIALS // 2  # most kills landed while the run was training


@pytest.mark.parametrize("phase", PHASES)
def test_kill_9_while_writing_a_checkpoint_then_resume(phase, setup, tmp_path, capsys):
    """Killed at the third checkpoint (step 9) after its weights, tokenizer, state or manifest, after
    the rename into place, or halfway through pruning the oldest."""
    config = setup[0]
    run_dir = tmp_path / "run"
    proc = start(train_argv(config, run_dir), fault=(phase, 1 if phase == "prune" else 3))  # the first prune is at the third checkpoint
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 9, err
    names = [p.name for p in list_checkpoints(run_dir)]
    if phase == "rename":  # step 9 is in place; the oldest is still there
        assert names == ["step-000003", "step-000006", "step-000009"]
    elif phase == "prune":  # the oldest was renamed to a temporary before its deletion began: no half step-N
        assert names == ["step-000006", "step-000009"]
        assert [t for t in temporaries(run_dir) if t.startswith(".step-000003.tmp-")]
    else:  # step 9 was never renamed into place: its temporary folder is left, for the next run to remove
        assert names == ["step-000003", "step-000006"]
        assert [t for t in temporaries(run_dir) if t.startswith(".step-000009.tmp-")]
    assert_sound(list_checkpoints(run_dir)[-1])
    assert_recovered(setup, run_dir, capsys)


def enospc_in_weights(monkeypatch):
    def save_model(*args, **kwargs):  # safetensors' own error, as it reports a full disk
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_model", save_model)


def enospc_in_state(monkeypatch):
    def save(obj, f, *args, **kwargs):  # torch.save into a file object: a RuntimeError with the OSError as context
        f.write(b"PK\x03\x04")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", save)


def enospc_in_manifest(monkeypatch):
    write_text = pathlib.Path.write_text

    def failing(self, *args, **kwargs):
        if self.name == "manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, *args, **kwargs)
    monkeypatch.setattr(pathlib.Path, "write_text", failing)


def assert_disk_full_error(code, err, run_dir):
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error: disk full: no space left in {run_dir / 'checkpoints'}"), errors[0]


@pytest.mark.parametrize("fail", [enospc_in_weights, enospc_in_state, enospc_in_manifest])
def test_disk_full_while_checkpointing_is_one_error_line(fail, setup, tmp_path, capsys, monkeypatch):
    """The write of step 9's checkpoint fails with ENOSPC: one error line naming the folder, exit 1,
    step 6's checkpoint intact, no temporary folder; once there is space, --resume completes the run."""
    config = setup[0]
    run_dir = tmp_path / "run"
    assert main(train_argv(config, run_dir, "--stop-after", "6")) == 0
    capsys.readouterr()
    with monkeypatch.context() as patch:
        fail(patch)
        code = main(train_argv(config, run_dir, "--resume"))
    assert_disk_full_error(code, capsys.readouterr().err, run_dir)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000003", "step-000006"]
    assert_sound(list_checkpoints(run_dir)[-1])
    assert temporaries(run_dir) == []
    assert_recovered(setup, run_dir, capsys)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (skips where mounting is not allowed)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = shutil.which("mount") and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                                                       capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_really_full_disk(setup, small_disk, capsys):
    """The same on a real full file system: filled up to 48 KiB after step 6, step 9's checkpoint
    (about 130 KiB) does not fit."""
    config = setup[0]
    run_dir = small_disk / "run"
    assert main(train_argv(config, run_dir, "--stop-after", "6")) == 0
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 48 * 1024))
    capsys.readouterr()
    code = main(train_argv(config, run_dir, "--resume"))
    assert_disk_full_error(code, capsys.readouterr().err, run_dir)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000003", "step-000006"]
    assert_sound(list_checkpoints(run_dir)[-1])
    assert temporaries(run_dir) == []
    filler.unlink()
    assert_recovered(setup, run_dir, capsys)


def test_torn_metrics_line_and_a_run_killed_before_its_first_checkpoint(setup, tmp_path, capsys):
    """What a kill can leave in metrics.jsonl: a last line cut short (dropped on --resume), and the
    records of a run killed before its first checkpoint (dropped when it starts afresh)."""
    config = setup[0]
    run_dir = tmp_path / "run"
    assert main(train_argv(config, run_dir, "--stop-after", "6")) == 0
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train_loss": 5.1}\n{"step": 8, "train_lo')
    assert_recovered(setup, run_dir, capsys)
    shutil.rmtree(run_dir / "checkpoints")
    assert_recovered(setup, run_dir, capsys)  # no checkpoint: a fresh run over the old records

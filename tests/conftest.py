"""Shared fixtures: a tiny corpus, a char tokenizer, prepared shards and a tiny trained checkpoint.

Everything is built here, in temporary folders; tests never download and never read ../shared.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
import torch

from lmlab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from lmlab.data.prepare import prepare
from lmlab.data.tokenizer import train_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxers".split()


def tiny_corpus(n_docs: int = 60, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences, a few lines per document."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + "." for _ in range(rng.randint(2, 5))]
        docs.append("\n".join(lines) + "\n")
    return docs


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(tiny_corpus()):
        (folder / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def prepared(corpus_dir, tmp_path_factory):
    """A prepared data folder (char tokenizer, hash split) from the tiny corpus."""
    tok = train_tokenizer("char", tiny_corpus())
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare([str(corpus_dir)], tok, out, val_fraction=0.2, split="hash")
    return out


def tiny_run_config(data_dir, out_dir, preset: str = "gpt2", **train) -> RunConfig:
    """A model and recipe small enough to train in a second or two on a CPU."""
    model = ModelConfig(preset=preset, n_layer=2, n_head=2, n_kv_head=1 if preset == "llama" else None,
                        d_model=32, block_size=32)
    defaults = dict(out_dir=str(out_dir), batch_size=4, max_steps=20, warmup_steps=2, eval_interval=10,
                    eval_batches=2, checkpoint_interval=10, log_interval=1, progress=False, lr=3e-3)
    defaults.update(train)
    return RunConfig(model=model, data=DataConfig(path=str(data_dir)), train=TrainConfig(**defaults))


@pytest.fixture(scope="session")
def trained_run(prepared, tmp_path_factory):
    """A run folder with a checkpoint of a tiny GPT trained for 40 steps."""
    from lmlab.train.lm import pretrain

    out = tmp_path_factory.mktemp("runs") / "tiny"
    pretrain(tiny_run_config(prepared, out, max_steps=40, eval_interval=20, checkpoint_interval=40))
    return out


@contextlib.contextmanager
def live_server(checkpoint, *flags: str):
    """Run ``lmlab serve CHECKPOINT`` in a subprocess on a free port; yields its base URL.

    Waits until /health answers; stops the server afterwards. Fails with the server's output if it
    dies. LMLAB_API_KEY is not passed on: a key is used only when the flags give one.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lmlab.cli", "serve", str(checkpoint), "--port", str(port), "--log-level", "warning",
           *flags]
    env = {k: v for k, v in os.environ.items() if k != "LMLAB_API_KEY"}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        url = f"http://127.0.0.1:{port}"

        def output() -> str:
            log.seek(0)
            return log.read()[-4000:]

        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"lmlab serve exited with {proc.returncode}:\n{output()}")
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"lmlab serve did not answer /health within 60 s:\n{output()}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

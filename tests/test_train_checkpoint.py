"""Checkpoints that pass their SHA-256 check but are still wrong (edited by hand, written by a buggy
tool), and checkpoints missing files: every one is a one-line ``error:`` from ``lmlab generate`` and
``lmlab train --resume``, naming the file and the problem, exit status 1, no traceback."""

import errno
import json
import os
import shutil

import pytest
import safetensors.torch
import torch

from lmlab.cli import main
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import CheckpointError
from lmlab.runs import list_checkpoints
from lmlab.train.checkpoint import load_checkpoint, read_manifest, save_checkpoint, sha256_file


@pytest.fixture(scope="module")
def cli_run(prepared, tmp_path_factory):
    """A config and a run of 4 steps with one checkpoint, trained through the CLI."""
    root = tmp_path_factory.mktemp("ckpt")
    config = root / "tiny.yaml"
    config.write_text(f"""
model: {{n_layer: 1, n_head: 2, d_model: 16, block_size: 16}}
data: {{path: {prepared}}}
train: {{out_dir: {root / 'run'}, batch_size: 2, max_steps: 4, warmup_steps: 1, eval_interval: 100,
        eval_batches: 1, log_interval: 1, checkpoint_interval: 4, progress: false}}
""")
    assert main(["train", str(config)]) == 0
    return config, root / "run"


def rehash(ckpt):
    """Recompute the manifest's SHA-256 of every listed file that exists: the corruption stays unnoticed
    by the hash check."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"] = {name: sha256_file(ckpt / name) for name in manifest["files"] if (ckpt / name).is_file()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def edit_weights(change):
    def corrupt(ckpt):
        tensors = safetensors.torch.load_file(ckpt / "model.safetensors")
        change(tensors)
        safetensors.torch.save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
        rehash(ckpt)
    return corrupt


def poison(name, value):
    def change(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[3] = value
    return change


def edit_manifest(change):
    def corrupt(ckpt):
        manifest = json.loads((ckpt / "manifest.json").read_text())
        change(manifest)
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return corrupt


def model_config(**values):
    return edit_manifest(lambda m: m["model_config"].update(values))


def write_file(name, data: bytes):
    def corrupt(ckpt):
        (ckpt / name).write_bytes(data)
        rehash(ckpt)
    return corrupt


def truncate(name):
    def corrupt(ckpt):
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[:len(data) // 2])
        rehash(ckpt)
    return corrupt


def save_state(state):
    def corrupt(ckpt):
        torch.save(state, ckpt / "state.pt")
        rehash(ckpt)
    return corrupt


def bigger_tokenizer(ckpt):
    """The checkpoint's tokenizer with 100 more tokens than the model has rows."""
    tok = Tokenizer.load(ckpt / "tokenizer.json")
    tok.tk.add_tokens([f"extra{i}" for i in range(100)])
    (ckpt / "tokenizer.json").unlink()
    tok.save(ckpt / "tokenizer.json")
    rehash(ckpt)


def delete(name, from_manifest: bool = False):
    def corrupt(ckpt):
        (ckpt / name).unlink()
        if from_manifest:
            rehash(ckpt)
    return corrupt


EMB = "lm_head.weight"  # tied to the input embedding: stored once, under this name
QKV = "blocks.0.attn.qkv.weight"
WRONG_OPTIMIZER = {"step": 4, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "scaler": {},
                   "rng": {}, "elapsed_s": 0.0, "tokens_seen": 0}

# name: (corruption, what generate says (None: it works), what --resume says)
CASES = {
    "nan weight": (edit_weights(poison(QKV, float("nan"))), f"model.safetensors: tensor {QKV} holds NaN", None),
    "inf weight": (edit_weights(poison(EMB, float("inf"))), f"model.safetensors: tensor {EMB} holds NaN or infinite",
                   None),
    "wrong shape": (edit_weights(lambda t: t.update({QKV: torch.zeros(3)})),
                    f"model.safetensors: tensor {QKV} has shape [3], but the model of the manifest needs [48, 16]",
                    None),
    "missing tensor": (edit_weights(lambda t: t.pop(QKV)), "model.safetensors does not match", None),
    "unexpected tensor": (edit_weights(lambda t: t.update(extra=torch.zeros(2))), "unexpected ['extra']", None),
    "garbage weights": (write_file("model.safetensors", b"\x08" + b"\x00" * 7 + b"not json"),
                        "model.safetensors cannot be loaded", None),
    "truncated weights": (truncate("model.safetensors"), "model.safetensors cannot be loaded", None),
    "negative vocab_size": (model_config(vocab_size=-5), "manifest.json has an invalid model config "
                            "(model.vocab_size must be >= 1, got -5)", None),
    "n_head not dividing d_model": (model_config(n_head=3), "manifest.json has an invalid model config "
                                    "(model.d_model 16 is not divisible by model.n_head 3)", None),
    "unknown preset": (model_config(preset="gpt5"), "manifest.json has an invalid model config (model.preset", None),
    "unknown family": (model_config(family="mamba"), "manifest.json has an invalid model config (model.family",
                       None),
    "wrong type": (model_config(d_model="wide"), "manifest.json has an invalid model config "
                   "(model.d_model expects int", None),
    "unknown key": (model_config(n_layers=2), "manifest.json has an invalid model config (unknown config key", None),
    "missing key": (edit_manifest(lambda m: m["model_config"].pop("vocab_size")),
                    "manifest.json describes a model that cannot be built", "vocab_size: 286 here, None in the checkpoint"),
    "model config not a mapping": (edit_manifest(lambda m: m.update(model_config=[1])),
                                   "manifest.json has an invalid model config (model must be a mapping", None),
    "no model config": (edit_manifest(lambda m: m.pop("model_config")), "manifest.json has no model_config", None),
    "no file list": (edit_manifest(lambda m: m.update(files=["model.safetensors"])),
                     "manifest.json has no valid 'files' entry", None),
    "manifest not JSON": (lambda ckpt: (ckpt / "manifest.json").write_text('{"format": '), "manifest.json is unreadable",
                          None),
    "truncated state": (truncate("state.pt"), "", "state.pt is truncated or not a training state"),
    "garbage state": (write_file("state.pt", b"garbage" * 50), "", "state.pt is not a training state written by lmlab"),
    "incomplete state": (save_state({"step": 4}), "", "state.pt is not a complete training state (no optimizer"),
    "state of another run": (save_state(WRONG_OPTIMIZER), "", "state.pt does not fit this run (ValueError"),
    "garbage tokenizer": (write_file("tokenizer.json", b"{not json"), "tokenizer.json: not a tokenizer.json", None),
    "tokenizer bigger than the model": (bigger_tokenizer, "tokenizer.json has 386 tokens, more than the model's "
                                        "vocab_size 286", None),
    "weights missing": (delete("model.safetensors"), "is incomplete: model.safetensors is missing", None),
    "tokenizer missing": (delete("tokenizer.json"), "is incomplete: tokenizer.json is missing", None),
    "state missing": (delete("state.pt"), "is incomplete: state.pt is missing", None),
    "weights missing and unlisted": (delete("model.safetensors", from_manifest=True),
                                     "is incomplete: model.safetensors is not in its manifest", None),
    "state missing and unlisted": (delete("state.pt", from_manifest=True), "",
                                   "holds no training state (state.pt); it cannot be resumed"),
    "manifest missing": (delete("manifest.json"), "is not an lmlab checkpoint", "is incomplete: manifest.json is missing"),
}


def run(argv, capsys):
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    return code, err


def assert_one_line_error(code, err, fragment):
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and fragment in errors[0] and "Traceback" not in err, err


@pytest.mark.parametrize("case", list(CASES))
def test_a_wrong_checkpoint_is_a_one_line_error(case, cli_run, tmp_path, capsys):
    corrupt, generate_says, resume_says = CASES[case]
    config, run_dir = cli_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    ckpt = list_checkpoints(copy)[-1]
    read_manifest(ckpt)  # sound before
    corrupt(ckpt)
    capsys.readouterr()
    code, err = run(["generate", ckpt, "--prompt", "x", "--max-new-tokens", "2", "--no-stream"], capsys)
    if generate_says:
        assert_one_line_error(code, err, generate_says)
    else:  # the training state is not needed to generate
        assert code == 0, err
    code, err = run(["train", config, f"train.out_dir={copy}", "train.max_steps=6", "--resume"], capsys)
    assert_one_line_error(code, err, resume_says or generate_says)
    assert list_checkpoints(copy) == [ckpt]  # nothing was trained or written


def test_a_failed_write_is_a_checkpoint_error_and_leaves_nothing(cli_run, tmp_path, monkeypatch):
    """No permission: a one-line CheckpointError, no partial folder. A failure that is no I/O error
    (a bug) keeps its own exception."""
    ckpt = load_checkpoint(cli_run[1])

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(Tokenizer, "save", denied)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*out \(Permission denied\)"):
        save_checkpoint(tmp_path / "out", ckpt.model, ckpt.tokenizer)

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr(Tokenizer, "save", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        save_checkpoint(tmp_path / "out", ckpt.model, ckpt.tokenizer)
    assert list(tmp_path.iterdir()) == []

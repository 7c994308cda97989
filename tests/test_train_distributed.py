"""Training on two processes (torchrun, gloo on the CPU) takes the steps of one process.

Each rank computes its rows of the same global batch, so the per-step losses of 1 and 2 processes
agree up to float reduction order: within a relative 1e-5 (seen: about 2e-7); so do the validation
losses, of which each rank scores a share. Checkpoints hold
the whole weights (and, under FSDP2, the optimizer state in shards), so a run resumes on another number
of processes (2 -> 1, 1 -> 2) with the losses of an uninterrupted run, and FSDP2 (train.distributed:
fsdp) takes the steps of DDP.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import lmlab
from lmlab.config import save_config
from lmlab.train.checkpoint import load_checkpoint, read_manifest
from lmlab.train.lm import pretrain
from lmlab.train.logger import read_metrics

from conftest import tiny_run_config

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

TOLERANCE = 1e-5  # relative, per-step loss: float sums in another order, nothing more
STEPS = 8


def run_config(data, out, **train):
    """A tiny GPT (two blocks, so that FSDP2 shards each), grad_accum 2 to exercise no_sync, 3 validation
    batches (2 processes score 2 and 1 of them)."""
    cfg = tiny_run_config(data, out, max_steps=STEPS, batch_size=4, grad_accum=2, eval_interval=4,
                          eval_batches=3, checkpoint_interval=4, **train)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=16, dropout=0.0))


def torchrun(cfg, tmp_path: Path, *flags: str) -> None:
    """``torchrun --nproc-per-node 2 -m lmlab.cli train cfg.yaml FLAGS`` in a subprocess."""
    path = tmp_path / f"{Path(cfg.train.out_dir).name}.yaml"
    save_config(cfg, path)
    launch("lmlab.cli", "train", str(path), *flags)


def launch(module: str, *args: str) -> None:
    """``torchrun --standalone --nproc-per-node 2 -m MODULE ARGS``: two processes on this machine."""
    src = str(Path(lmlab.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", module, *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(run: Path, key: str = "train_loss") -> list[float]:
    return [r[key] for r in read_metrics(run / "metrics.jsonl") if key in r]


@pytest.fixture(scope="module")
def one_process(prepared, tmp_path_factory):
    """The reference: the run on one process, uninterrupted."""
    out = tmp_path_factory.mktemp("dist") / "one"
    pretrain(run_config(prepared, out))
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_take_the_steps_of_one(prepared, one_process, tmp_path, mode):
    run = tmp_path / mode
    torchrun(run_config(prepared, run, distributed=mode), tmp_path)
    assert len(losses(run)) == STEPS
    assert losses(run) == pytest.approx(losses(one_process), rel=TOLERANCE)
    assert losses(run, "val_loss") == pytest.approx(losses(one_process, "val_loss"), rel=TOLERANCE)
    two, one = load_checkpoint(run), load_checkpoint(one_process)  # rank 0 wrote one ordinary checkpoint
    for name, tensor in one.model.state_dict().items():
        assert torch.allclose(two.model.state_dict()[name], tensor, rtol=1e-4, atol=1e-6), name


def test_muon_on_two_processes_takes_the_steps_of_one(prepared, tmp_path):
    """Muon under DDP: each process orthogonalises the same averaged gradient, so two processes take one's
    steps. Muon's Newton-Schulz steps run in bf16, where a last-bit difference in a gradient can round
    differently, so the tolerance is 10x the fp32 one (seen: 5e-7)."""
    pretrain(run_config(prepared, tmp_path / "one", optimizer="muon"))
    torchrun(run_config(prepared, tmp_path / "two", optimizer="muon"), tmp_path)
    assert len(losses(tmp_path / "two")) == STEPS
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=10 * TOLERANCE)


def test_resume_two_processes_on_one(prepared, one_process, tmp_path):
    run = tmp_path / "two_then_one"
    torchrun(run_config(prepared, run), tmp_path, "--stop-after", "4")
    pretrain(run_config(prepared, run), resume=True)
    assert losses(run) == pytest.approx(losses(one_process), rel=TOLERANCE)


def test_resume_one_process_on_two_sharded(prepared, one_process, tmp_path):
    """A single process's checkpoint (plain optimizer state) resumes under FSDP2 on two processes (with
    activation checkpointing, which changes nothing but memory)."""
    run = tmp_path / "one_then_two"
    pretrain(run_config(prepared, run), stop_after=4)
    torchrun(run_config(prepared, run, distributed="fsdp", activation_checkpointing=True), tmp_path, "--resume")
    assert losses(run) == pytest.approx(losses(one_process), rel=TOLERANCE)


def test_activation_checkpointing_changes_no_step(prepared, one_process, tmp_path):
    pretrain(run_config(prepared, tmp_path / "recomputed", activation_checkpointing=True))
    assert losses(tmp_path / "recomputed") == pytest.approx(losses(one_process), rel=TOLERANCE)


def test_shards_of_a_batch_split_its_rows_and_units():
    """Rows rank::world; units follow the rows (a task with uneven rows, like SFT, gives row_units)."""
    from lmlab.train.loop import Batch

    y = torch.tensor([[1, 1, -100], [1, -100, -100], [1, 1, 1], [-100, -100, 1], [1, 1, -100]])
    row_units = (y != -100).sum(1)
    batch = Batch({"y": y}, units=int(row_units.sum()), tokens=15, row_units=row_units)
    shards = [batch.shard(r, 2) for r in range(2)]
    assert [s.examples for s in shards] == [3, 2]
    assert torch.equal(shards[1].tensors["y"], y[1::2])
    assert [s.units for s in shards] == [7, 2]
    even = Batch({"y": y}, units=15, tokens=15)  # no row_units: every row counts alike
    assert [even.shard(r, 2).units for r in range(2)] == [9, 6]
    assert batch.shard(0, 1) is batch
    assert torch.equal(batch.stand_in().tensors["y"], y[2:3])  # an empty share computes a row with units, x 0


def test_distributed_mode_is_checked():
    from lmlab.config import TrainConfig, from_dict
    from lmlab.errors import ConfigError

    assert from_dict(TrainConfig, {"distributed": "fsdp"}).distributed == "fsdp"
    with pytest.raises(ConfigError, match="distributed"):
        from_dict(TrainConfig, {"distributed": "deepspeed"}, "train.")


def test_fine_tuning_on_two_processes_with_a_one_row_micro_batch(one_process, tmp_path):
    """Classification: 37 examples in steps of 6 leave one step of one row, so rank 1's share is empty
    (it computes a stand-in row weighted 0); the losses are still those of one process."""
    from lmlab.cli import main

    lines = ["sentence\tlabel"] + [f"{'the fox ' * (1 + i % 4)}{('bad', 'good')[i % 2]}\t{i % 2}" for i in range(37)]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    runs = {n: tmp_path / n for n in ("one", "two")}
    for name, run in runs.items():
        (tmp_path / f"{name}.yaml").write_text(f"""
model: {{path: {one_process}, dropout: 0.0}}
data: {{train: {tmp_path / 'train.tsv'}, max_length: 32}}
train: {{out_dir: {run}, batch_size: 3, grad_accum: 2, epochs: 1, warmup_steps: 2, log_interval: 1, progress: false}}
""")
    assert main(["finetune", "classify", str(tmp_path / "one.yaml")]) == 0
    launch("lmlab", "finetune", "classify", str(tmp_path / "two.yaml"))  # python -m lmlab works too
    assert len(losses(runs["two"])) == 7
    assert losses(runs["two"]) == pytest.approx(losses(runs["one"]), rel=TOLERANCE)


@pytest.mark.parametrize("then", ["one", "two_fsdp"])
def test_fsdp_checkpoint_keeps_the_optimizer_sharded(prepared, one_process, tmp_path, then):
    """Under FSDP2 each rank writes its shard of the optimizer state (torch.distributed.checkpoint, listed
    and hashed in the manifest; nothing gathered into state.pt), and the run resumes from it on one plain
    process or on two sharded ones with the losses of the uninterrupted run."""
    run = tmp_path / f"sharded_then_{then}"
    torchrun(run_config(prepared, run, distributed="fsdp"), tmp_path, "--stop-after", "4")
    ckpt = run / "checkpoints" / "step-000004"
    shards = sorted(p.name for p in (ckpt / "optimizer").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert torch.load(ckpt / "state.pt", weights_only=True)["optimizer"] is None
    assert set(read_manifest(ckpt)["files"]) >= {"optimizer/.metadata", "optimizer/__0_0.distcp"}
    if then == "one":
        pretrain(run_config(prepared, run), resume=True)
    else:
        torchrun(run_config(prepared, run, distributed="fsdp"), tmp_path, "--resume")
    assert losses(run) == pytest.approx(losses(one_process), rel=TOLERANCE)
    assert not list(run.glob("checkpoints/.*")), "a temporary was left behind"

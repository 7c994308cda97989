"""The one training loop (train/loop.py), tested with a minimal task apart from any model family."""

import os
import signal
import time

import pytest
import torch

from lmlab.errors import ConfigError, OutputError
from lmlab.train.logger import read_metrics
from lmlab.train.loop import Batch, _ctrl_c_between_steps, steps_for_epochs

from loop_tasks import RegressionTask, regression_config, run_task


def test_accumulated_micro_batches_give_the_update_of_one_big_batch(tmp_path):
    """4 micro-batches of 8 and one batch of 32 take the same steps (the loss is weighted per micro-batch)."""
    small = RegressionTask(batch_size=8, grad_accum=4)
    big = RegressionTask(batch_size=32, grad_accum=1)
    for name, task in (("small", small), ("big", big)):
        run_task(task, regression_config(tmp_path / name, max_steps=6, lr=0.05, warmup_steps=0, grad_clip=1.0))
    assert torch.allclose(small.model.weight, big.model.weight, atol=1e-6)
    losses = [[r["train_loss"] for r in read_metrics(tmp_path / n / "metrics.jsonl") if "train_loss" in r]
              for n in ("small", "big")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


class UnevenTask(RegressionTask):
    """Each step: rows 0..31 as two micro-batches of 24 and 8 rows, or as one of 32."""

    def __init__(self, split: bool):
        super().__init__(batch_size=32, grad_accum=2 if split else 1)
        self.split = split

    def step_batches(self, step):
        cuts = [slice(0, 24), slice(24, 32)] if self.split else [slice(0, 32)]
        return [Batch({"x": self.x[c], "y": self.y[c]}, units=c.stop - c.start, tokens=1) for c in cuts]


def test_uneven_micro_batches_are_weighted_by_their_units(tmp_path):
    """A smaller micro-batch counts by its size (8 of 32 rows), not as much as a full one."""
    split, whole = UnevenTask(split=True), UnevenTask(split=False)
    for name, task in (("split", split), ("whole", whole)):
        run_task(task, regression_config(tmp_path / name, max_steps=3, lr=0.05, warmup_steps=0))
    assert torch.allclose(split.model.weight, whole.model.weight, atol=1e-6)


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    for name, stops in (("full", [None]), ("part", [3, 2, None])):
        for i, stop in enumerate(stops):
            run_task(RegressionTask(8, 2), regression_config(tmp_path / name, max_steps=9, lr=0.05, warmup_steps=2,
                                                             checkpoint_interval=100),
                     resume=i > 0, stop_after=stop)
    a, b = (read_metrics(tmp_path / n / "metrics.jsonl") for n in ("full", "part"))
    assert [r["train_loss"] for r in a if "train_loss" in r] == [r["train_loss"] for r in b if "train_loss" in r]


def test_bad_runs_are_refused_before_any_work(tmp_path):
    cfg = regression_config(tmp_path / "run", max_steps=2)
    with pytest.raises(ConfigError, match="--stop-after"):
        run_task(RegressionTask(8, 1), cfg, stop_after=0)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="no checkpoints"):
        run_task(RegressionTask(8, 1), cfg, resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        run_task(RegressionTask(8, 1), regression_config(tmp_path / "file", max_steps=2))


def test_stale_temporary_checkpoints_are_cleaned_up(tmp_path):
    stale = tmp_path / "run" / "checkpoints" / ".step-000004.tmp-999999999"
    stale.mkdir(parents=True)
    run_task(RegressionTask(8, 1), regression_config(tmp_path / "run", max_steps=2))
    assert not stale.exists()


def test_epochs_become_steps():
    assert steps_for_epochs(1.0, 10) == 10
    assert steps_for_epochs(0.01, 10) == 1
    assert steps_for_epochs(2.5, 3) == 8


def test_ctrl_c_is_remembered_until_the_step_ends_and_a_second_press_interrupts(monkeypatch):
    """The first SIGINT only sets .pressed (a KeyboardInterrupt raised inside a finalizer would be swallowed
    and training would go on); a second raises at once; the default handler is back afterwards. A process
    that ignores SIGINT keeps ignoring it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with _ctrl_c_between_steps(True) as ctrl_c:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs between bytecodes of this thread
            assert ctrl_c.pressed
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with _ctrl_c_between_steps(False) as ctrl_c:  # several processes (torchrun): untouched
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with _ctrl_c_between_steps(True) as ctrl_c:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and not ctrl_c.pressed
    finally:
        signal.signal(signal.SIGINT, previous)

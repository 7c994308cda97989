"""The one training loop: every task (language modelling, classification, instruction tuning, ...)
runs through ``Trainer``.

A task (see ``Task``) supplies the model, the micro-batches of each step, the loss of a micro-batch
and its evaluation metrics. The loop alone owns everything else:

    device and precision      autocast (bf16/fp16), a GradScaler for fp16, torch.compile
    the update                gradient accumulation (each micro-batch's loss weighted by its share of
                              the step's loss units, so 4 x 8 examples == 1 x 32), clipping, the
                              optimizer and the learning-rate schedule, a weight average (EMA)
    time and stopping         max_steps (or epochs), max_minutes, --stop-after, Ctrl-C (saves first)
    files                     config.yaml, metrics.jsonl, plots/, periodic and final checkpoints,
                              --resume from the newest one with the same per-step losses
    reporting                 a progress bar with tokens/s and ETA; ``.item()`` only on logging steps
    processes                 under torchrun: DDP or FSDP2, each rank computing its rows of the same
                              global batch; rank 0 logs and writes (train/distributed.py)
    privacy                   with train.dp: DP-SGD (train/privacy.py): Poisson-sampled batches of the
                              task's examples, per-example clipping and noise, the spent epsilon

The batches of step s are a pure function of s (and of the task's saved state), so a resumed run
sees exactly what an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

import torch
import torch.nn as nn

from lmlab.config import TrainConfig, save_config
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import CheckpointError, ConfigError, DataError, first_line
from lmlab.models.interface import width_of
from lmlab.models.lora import has_lora
from lmlab.progress import progress_bar
from lmlab.runs import RunFolder, check_output, claim_output, output_kind, remove_stale_temporaries
from lmlab.runtime import (autocast_context, peak_memory_mib, peak_tflops, resolve_device, resolve_precision,
                           rng_state, seed_everything, set_rng_state, set_threads)
from lmlab.train.checkpoint import (load_tokenizer, load_train_state, load_weights, manifest_model_config,
                                   read_manifest, save_checkpoint)
from lmlab.train.distributed import (all_mean, barrier, checkpoint_activations, full_model_state, gradient_sync,
                                     is_main, is_sharded, load_full_optimizer_state, load_sharded_optimizer, rank,
                                     rank0_says, rank0_temporary, save_sharded_optimizer, setup, world_size, wrap)
from lmlab.train.ema import averaged, weight_average
from lmlab.train.logger import MetricsLogger, plot_losses
from lmlab.train.optim import build_optimizer, build_scheduler
from lmlab.train.privacy import make_private

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One micro-batch: tensors for the task's loss (moved to the device by the loop) and its sizes."""

    tensors: dict[str, torch.Tensor]
    units: int  # what the task's loss is a mean over (target tokens, examples): weights accumulation
    tokens: int  # tokens read, for tokens/s
    row_units: torch.Tensor | None = None  # units of each row where rows differ (None: units spread evenly)

    @property
    def examples(self) -> int:
        """Sequences (rows) in the batch."""
        return len(next(iter(self.tensors.values())))

    def to(self, device: torch.device) -> "Batch":
        """The batch with its tensors on ``device``."""
        return Batch({k: v.to(device, non_blocking=True) for k, v in self.tensors.items()}, self.units, self.tokens,
                     self.row_units)

    def shard(self, rank: int, world: int) -> "Batch":
        """Rows ``rank::world``: this process's share of a batch that ``world`` processes split."""
        if world == 1:
            return self
        rows = self.examples
        tensors = {k: v[rank::world] for k, v in self.tensors.items()}
        share = len(range(rank, rows, world))
        if self.row_units is not None:
            units = int(self.row_units[rank::world].sum())
        else:
            units = self.units * share // rows
        return Batch(tensors, units, self.tokens * share // rows)

    def stand_in(self) -> "Batch":
        """One row of the batch that has units: what a rank whose share is empty computes, weighted 0, so
        that its collectives keep step with the other ranks' (a share without units would give NaN)."""
        row = int(self.row_units.argmax()) if self.row_units is not None else 0
        return Batch({k: v[row:row + 1] for k, v in self.tensors.items()}, 1, 0)


class Task(Protocol):
    """What a task gives the loop. ``kind`` names it in checkpoints ("pretrain", "classify", "sft").
    ``TaskBase`` gives the optional methods (learning_rates ... checkpoint_info) their usual defaults."""

    kind: str
    model: nn.Module
    tokenizer: Tokenizer

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the training data (for ``train.epochs``)."""

    def step_batches(self, step: int) -> list[Batch]:
        """The micro-batches of optimizer step ``step`` (at most train.grad_accum), on the CPU."""

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The mean loss of ``batch`` under ``model`` (the compiled model when train.compile is on)."""

    def evaluate(self, model: nn.Module, device: torch.device, precision: str) -> dict[str, float]:
        """Validation metrics ({} when there is no validation data); "val_loss" first by convention."""

    def learning_rates(self) -> dict[str, float]:
        """Learning rates of parameters by name prefix ({} = train.lr for all)."""

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. to detach a carried recurrent state)."""

    def state_dict(self) -> dict:
        """What the task needs besides the step number to resume exactly (e.g. a carried state)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s output."""

    def checkpoint_info(self) -> dict:
        """Extra manifest entries of this task's checkpoints (e.g. the base model, max_length)."""

    def example_count(self) -> int:
        """The training examples (train.dp samples each step's batch from them; the unit of privacy)."""

    def example_batch(self, indices: list[int]) -> Batch:
        """One batch of the training examples ``indices`` (of ``example_count``), on the CPU."""

    def example_lengths(self) -> list[int] | None:
        """Each training example's length in tokens (train.dp groups a step's examples by it), or None
        when all examples are equally long."""


class TaskBase:
    """What most tasks do for the optional parts of ``Task``: one learning rate, nothing after a step,
    no state of their own, nothing extra in the manifest. A task overrides what it needs."""

    def learning_rates(self) -> dict[str, float]:
        return {}

    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def checkpoint_info(self) -> dict:
        return {}

    def example_count(self) -> int:
        raise ConfigError(f"train.dp does not work with {self.kind} training yet (its task has no single examples)")

    def example_batch(self, indices: list[int]) -> Batch:
        raise ConfigError(f"train.dp does not work with {self.kind} training yet (its task has no single examples)")

    def example_lengths(self) -> list[int] | None:
        return None


def steps_for_epochs(epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps for ``epochs`` passes over data of ``steps_per_epoch`` steps each (at least 1)."""
    return max(1, math.ceil(epochs * steps_per_epoch))


@dataclass
class RunResult:
    """What a run did: steps, time, the last evaluation and where the final checkpoint is."""

    step: int
    train_loss: float
    metrics: dict = field(default_factory=dict)  # the last evaluation
    elapsed_s: float = 0.0
    tokens_seen: int = 0
    peak_mem_mib: float = 0.0
    checkpoint: str = ""
    plots: list[str] = field(default_factory=list)
    interrupted: bool = False
    privacy: dict = field(default_factory=dict)  # with train.dp: the spent epsilon, delta, noise (PrivateTraining.summary)
    extra: dict = field(default_factory=dict)  # what a task adds (parameter counts, labels, a full report)


def prepare_run(tc: TrainConfig, resume: bool, force: bool = False, inputs: Iterable = ()) -> tuple[torch.device, str]:
    """Check the output folder against --resume and --force, apply train.threads and the seed; return
    device, precision.

    Under torchrun this joins the process group first (the device is then this rank's GPU), and every
    rank checks the folder before rank 0 may write to it.

    Called by a task builder before it builds anything, so a bad run folder fails before any work:
    without --resume, train.out_dir must be new or empty, or (with --force) hold a previous run (see
    runs.check_output; ``inputs`` are the paths the run reads, which it must not write over).
    """
    run = RunFolder(tc.out_dir)
    set_threads(tc.threads)
    device = setup(resolve_device(tc.device))  # under torchrun: joins the process group, this rank's GPU
    if resume and force:
        raise ConfigError("--resume continues the run in train.out_dir and --force replaces it; give one of them")
    if resume:
        if is_main():
            remove_stale_temporaries(run.root.parent, run.root.name)  # may put back a run a killed --force replaced
        barrier()
        if run.root.exists() and not run.root.is_dir():
            raise ConfigError(f"train.out_dir {run.root} is a file, not a folder")
        if not run.checkpoints():
            raise ConfigError(f"--resume: {run.root} has no checkpoints to resume from")
    elif not force and output_kind(run.root) == "run":
        if not run.checkpoints():
            raise ConfigError(f"{run.root} holds a run that saved no checkpoint (killed before its first?); pass "
                              f"--force to replace it, or set train.out_dir to a new folder")
        raise ConfigError(f"{run.root} already holds a run; pass --resume to continue it, --force to replace it, "
                          f"or set train.out_dir to a new folder")
    else:
        check_output(run.root, "run", inputs, force)
    barrier()  # every rank has checked the folder before rank 0 writes to it
    precision = resolve_precision(tc.precision, device)
    seed_everything(tc.seed)
    return device, precision


class Trainer:
    """Runs a task for ``cfg.train.max_steps`` steps (see the module docstring); ``run()`` returns a RunResult.

    ``cfg`` is the run's whole config (saved as config.yaml); its ``train`` section drives the loop.
    The task's model must already be on ``device``. ``replace`` (--force) takes over a previous run in
    train.out_dir, which is deleted once this run saves its first checkpoint (see ``run``).
    """

    def __init__(self, task: Task, cfg, device: torch.device, precision: str, resume: bool = False,
                 stop_after: int | None = None, replace: bool = False):
        if stop_after is not None and stop_after < 1:
            raise ConfigError(f"--stop-after must be at least 1 step, got {stop_after}")
        tc = cfg.train
        if tc.epochs is not None:  # passes over the training data decide the step count
            tc = dataclasses.replace(tc, max_steps=steps_for_epochs(tc.epochs, task.steps_per_epoch()))
            cfg = dataclasses.replace(cfg, train=tc)
        self.task, self.cfg, self.tc = task, cfg, tc
        self.device, self.precision = device, precision
        self.stop_after, self.replace = stop_after, replace
        self.claim = None  # the run folder while run() fills it
        self.run_folder = RunFolder(tc.out_dir)
        self.model = task.model
        if tc.precision == "auto":  # a CPU's choice depends on the model's width, known only now
            self.precision = precision = resolve_precision("auto", device, width_of(self.model))
        self.peak_tflops = _peak_tflops(self.model, device, precision)  # of all processes, as tokens/s counts
        _check_distributed(task, tc)
        checkpoint = self._restore_weights() if resume else None  # before sharding: FSDP2 shards what is loaded
        if tc.activation_checkpointing:
            checkpoint_activations(self.model)
        wrapped = wrap(self.model, tc.distributed, device)  # DDP or FSDP2 under torchrun, else the model
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, tc, device.type, task.learning_rates())
        self.privacy = make_private(task, self.model, self.optimizer, tc, world_size())  # None without train.dp
        if self.privacy is not None:
            self.optimizer = self.privacy.optimizer  # clips each example's gradient and adds noise
        self.scheduler = build_scheduler(self.optimizer, tc)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.ema = weight_average(self.model, tc.ema_decay)
        self.step, self.elapsed_before, self.tokens_seen, self.examples_seen = 0, 0.0, 0, 0
        self.logger = MetricsLogger(self.run_folder, tc.tensorboard, enabled=is_main())
        if checkpoint is not None:
            self._restore_state(checkpoint)
        self.forward_model = torch.compile(wrapped) if tc.compile else wrapped

    # ----------------------------------------------------------------------------------------
    # one step

    def train_step(self) -> torch.Tensor:
        """One optimizer step over the step's micro-batches; returns the step's mean loss (a 0-d tensor)."""
        if self.privacy is not None:
            batches = self.privacy.step_batches(self.task, self.step)  # Poisson-sampled: may be empty
        else:
            batches = self.task.step_batches(self.step)
        units = sum(b.units for b in batches)
        if units == 0 and self.privacy is None:
            raise DataError(f"step {self.step} has no examples or target tokens to learn from")
        total = torch.zeros((), device=self.device)
        world = world_size()
        for i, batch in enumerate(batches):
            self.tokens_seen += batch.tokens  # of the whole step, over every rank
            self.examples_seen += batch.examples
            part = batch.shard(rank(), world)  # this rank's rows of the global batch
            # the step's loss is the mean over all its units; DDP and FSDP2 average gradients over the
            # ranks, hence the factor world (1 for a single process)
            weight = part.units * world / units
            if part.units == 0 and world > 1:
                part = batch.stand_in()
            with gradient_sync(self.forward_model, sync=i == len(batches) - 1):
                with autocast_context(self.precision, self.device):
                    loss = self.task.loss(self.forward_model, part.to(self.device))
                # under DP, each micro-batch's own mean loss: Opacus turns it into per-example gradients
                backward = loss if self.privacy is not None else loss * weight
                self.scaler.scale(backward).backward()
            total += loss.detach().float() * weight
        if self.privacy is not None:
            self.privacy.before_step()  # per-example clipping replaces train.grad_clip
        elif self.tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, self.tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        self.task.after_step()
        self.step += 1
        return total

    def evaluate(self) -> dict[str, float]:
        """The task's validation metrics, of the weight average with train.ema_decay, in eval mode."""
        with averaged(self.ema), torch.no_grad(), autocast_context(self.precision, self.device):
            self.model.eval()
            try:
                return self.task.evaluate(self.model, self.device, self.precision)
            finally:
                self.model.train()

    # ----------------------------------------------------------------------------------------
    # the run

    def run(self) -> RunResult:
        """Train until max_steps, max_minutes or --stop-after; checkpoint, plot and return what happened.

        A run folder that this run made (or emptied, or took over with ``replace``) is removed again if
        the run fails before its first checkpoint, and a run it replaced is put back; Ctrl-C saves a
        checkpoint first, so an interrupted run is kept (continue it with --resume). Under torchrun only
        rank 0 claims and writes the folder, and Ctrl-C stops without that last save.
        """
        if not is_main():  # rank 0 alone writes the run folder
            return self._run()
        with claim_output(self.run_folder.root, replace=self.replace) as self.claim:
            return self._run()

    def _run(self) -> RunResult:
        tc = self.tc
        if is_main():
            self.run_folder.remove_stale_temporaries()
            self.logger.truncate_after(self.step)  # what a killed process logged past its last checkpoint
            save_config(self.cfg, self.run_folder.config)
        self.started = time.perf_counter()
        self.model.train()
        first_step = self.step
        result = RunResult(step=self.step, train_loss=float("nan"))
        window = _Window(time.perf_counter(), self.tokens_seen, self.examples_seen)
        bar = progress_bar(total=tc.max_steps, initial=self.step, unit="step", enabled=tc.progress and is_main())
        try:
            with _ctrl_c_between_steps(world_size() == 1) as ctrl_c:
                while self.step < tc.max_steps:
                    window.add(self.train_step())
                    bar.update(1)
                    if ctrl_c.pressed:
                        raise KeyboardInterrupt
                    out_of_time = tc.max_minutes is not None and rank0_says(self.elapsed() >= tc.max_minutes * 60,
                                                                            self.device)  # all ranks stop together
                    stopped = self.stop_after is not None and self.step - first_step >= self.stop_after
                    last = self.step == tc.max_steps or out_of_time or stopped
                    if self.step % tc.log_interval == 0 or last:
                        result.train_loss = self._log_train(window, bar)
                    if self.step % tc.eval_interval == 0 or last:
                        result.metrics = self._log_eval(bar) or result.metrics
                    if self.step % tc.checkpoint_interval == 0 or last:
                        self.save()
                    if last:
                        break
        except KeyboardInterrupt:
            result.interrupted = True
            if world_size() > 1:  # the ranks stop at different points: a save's collectives could wait forever
                bar.write("interrupted: continue with --resume from the last checkpoint")
                raise
            bar.write(f"interrupted: saving a checkpoint at step {self.step} (continue with --resume)")
            self.save()
        finally:
            bar.close()
            self.logger.close()
        if is_main():
            result.plots = [str(p) for p in plot_losses(self.run_folder.metrics, self.run_folder.plots)]
        result.step, result.elapsed_s, result.tokens_seen = self.step, self.elapsed(), self.tokens_seen
        result.peak_mem_mib = peak_memory_mib(self.device)
        if self.privacy is not None:
            result.privacy = self.privacy.summary()
        result.checkpoint = str(self.run_folder.checkpoints()[-1])
        return result

    def _log_train(self, window: "_Window", bar) -> float:
        """Log the mean train loss and speed of the steps since the last log; refuse a non-finite loss."""
        loss = window.mean_loss()  # the only .item() of the steps in between: it waits for the device ...
        now = time.perf_counter()  # ... so that a GPU's queued steps count in this window, not the next
        if not math.isfinite(loss):
            raise DataError(f"loss became {loss} by step {self.step}; lower train.lr or check the data")
        seconds = max(now - window.start, 1e-9)
        tok_s = (self.tokens_seen - window.tokens_at_start) / seconds
        record = {"step": self.step, "train_loss": loss, "lr": self.scheduler.get_last_lr()[0],
                  "tokens": self.tokens_seen, "tokens_per_s": tok_s,
                  "examples_per_s": (self.examples_seen - window.examples_at_start) / seconds,
                  "elapsed_s": self.elapsed(),
                  "peak_mem_mib": peak_memory_mib(self.device), "time": time.time()}
        postfix = {"loss": f"{loss:.4f}", "tok_s": f"{tok_s:,.0f}"}
        if self.privacy is not None:
            epsilon = self.privacy.epsilon()
            record["epsilon"] = epsilon if math.isfinite(epsilon) else None  # None: spent without noise (infinite)
            record.update(self.privacy.gradient_norms())  # per-example norms before clipping: how much clipping did
            postfix["eps"] = f"{epsilon:.2f}"
        flops = model_flops_per_token(self.model)
        if flops is not None:  # achieved model FLOP/s, and its share of the peak (MFU)
            record["tflops"] = tok_s * flops / 1e12
            if self.peak_tflops:
                record["mfu"] = record["tflops"] / self.peak_tflops
                postfix["mfu"] = f"{record['mfu']:.1%}"
        self.logger.log(record)
        bar.set_postfix(**postfix)
        window.reset(now, self.tokens_seen, self.examples_seen)
        return loss

    def _log_eval(self, bar) -> dict:
        metrics = self.evaluate()
        if metrics:
            self.logger.log({"step": self.step, **metrics, "elapsed_s": self.elapsed(), "time": time.time()})
            bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def elapsed(self) -> float:
        """Training seconds so far, over every invocation of this run."""
        return self.elapsed_before + time.perf_counter() - self.started

    # ----------------------------------------------------------------------------------------
    # checkpoints

    def save(self) -> Path:
        """Checkpoint the current step: weights (the average with train.ema_decay), tokenizer, and what
        --resume needs (optimizer, schedule, scaler, RNG, the task's state, the raw weights under EMA).

        Under torchrun rank 0 writes the checkpoint; under FSDP2 the whole weights are gathered to it first,
        and every rank writes its shard of the optimizer state (distributed.save_sharded_optimizer) into a
        folder that becomes the checkpoint's ``optimizer/``. Every rank waits until it is written."""
        path = self.run_folder.checkpoint(self.step)
        weights, optimizer, folders = None, self.optimizer.state_dict(), {}
        if is_sharded(self.model):  # collectives: every rank takes part
            weights, optimizer = full_model_state(self.model), None
            folders["optimizer"] = rank0_temporary(path, "optimizer")
            save_sharded_optimizer(self.model, self.optimizer, folders["optimizer"])
            barrier()  # every shard is written before rank 0 moves the folder
        if is_main():
            self._write_checkpoint(path, optimizer, weights, folders)
        barrier()
        return path

    def _write_checkpoint(self, path: Path, optimizer: dict | None, weights: dict | None,
                          folders: dict[str, Path]) -> None:
        """Write checkpoint ``path`` (rank 0 only) with optimizer state ``optimizer`` (None: it is sharded,
        in ``folders``) and, for a sharded model, its gathered ``weights``."""
        state = {
            "step": self.step,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "task": self.task.state_dict(),
            "elapsed_s": self.elapsed(),
            "tokens_seen": self.tokens_seen,
        }
        if self.ema is not None:
            state["ema"] = self.ema.raw_state()
        info = {"step": self.step, "kind": self.task.kind, **self.task.checkpoint_info()}
        if self.privacy is not None:
            state["privacy"] = self.privacy.state_dict()  # the accountant's history: --resume goes on counting
            info["privacy"] = self.privacy.summary()
        with averaged(self.ema):
            save_checkpoint(path, self.model, self.task.tokenizer, state, info=info, weights=weights, folders=folders)
        if self.claim is not None:
            self.claim.keep()  # the run now holds a checkpoint: it stays, whatever happens next
        self.run_folder.prune_checkpoints(self.tc.keep_checkpoints)

    def _restore_weights(self) -> Path:
        """Load the newest checkpoint's weights into the (not yet wrapped) model, after checking that its
        model config and tokenizer are this run's; return the checkpoint."""
        ckpt = self.run_folder.checkpoints()[-1]
        saved = manifest_model_config(ckpt, read_manifest(ckpt))
        if saved != self.model.config:
            raise ConfigError(f"--resume: the model config differs from the one in {ckpt} "
                              f"({_differences(self.model.config, saved)})")
        load_weights(self.model, ckpt, self.device)
        if load_tokenizer(ckpt, saved.vocab_size).sha256() != self.task.tokenizer.sha256():
            raise ConfigError(f"--resume: the data's tokenizer differs from the one {ckpt} was trained with; "
                              f"resume on the same data (the run's config.yaml says which)")
        return ckpt

    def _restore_state(self, ckpt: Path) -> None:
        """Restore what --resume needs besides the weights from checkpoint ``ckpt``."""
        state = load_train_state(ckpt)
        try:
            self._load_state(state, ckpt)
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt}/state.pt does not fit this run ({type(e).__name__}: "
                                  f"{first_line(e)[:120]})") from None
        if self.step > self.tc.max_steps:
            raise ConfigError(f"{self.run_folder.root} already reached step {self.step}, past this run's last step "
                              f"{self.tc.max_steps}: nothing to resume (raise train.max_steps or train.epochs to "
                              f"train further)")
        if self.step == self.tc.max_steps:  # a finished run (or one killed after its last save): a no-op
            log.info("note: %s already finished at step %d; nothing to train (raise train.max_steps or "
                     "train.epochs to train further)", self.run_folder.root, self.step)
        else:
            log.info("resuming %s from step %d", self.run_folder.root, self.step)

    def _load_state(self, state: dict, ckpt: Path) -> None:
        """Optimizer, schedule, scaler, RNG, the task's state and the raw weights under EMA, from ``state``
        (the training state of checkpoint ``ckpt``)."""
        if (ckpt / "optimizer").is_dir():  # written in shards under FSDP2: read on any number of processes
            load_sharded_optimizer(self.model, self.optimizer, ckpt / "optimizer")
        elif is_sharded(self.model):
            load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.task.load_state_dict(state.get("task", {}))
        if self.ema is not None:
            if "ema" not in state:
                raise ConfigError(f"--resume: {ckpt} was trained without train.ema_decay")
            self.ema.load_raw_state(state["ema"])
        if (self.privacy is not None) != ("privacy" in state):
            raise ConfigError(f"--resume: {ckpt} was trained {'with' if 'privacy' in state else 'without'} train.dp; "
                              f"resume with the train.dp it was trained with")
        if self.privacy is not None:
            self.privacy.load_state_dict(state["privacy"])
        self.step, self.elapsed_before, self.tokens_seen = state["step"], state["elapsed_s"], state["tokens_seen"]


class _CtrlC:
    pressed = False


@contextmanager
def _ctrl_c_between_steps(enabled: bool):
    """Ctrl-C (SIGINT) during training stops it after the current step: the first press is remembered and
    the loop raises KeyboardInterrupt at the step's end (``.pressed``); a second press interrupts at once.

    A KeyboardInterrupt raised wherever the signal happens to land can be lost: one that lands in a
    finalizer (``__del__``, a weakref callback) is printed and swallowed by Python, and training would go
    on for good. Only in a single process's main thread, where Python handles Ctrl-C itself (a process
    that ignores SIGINT keeps ignoring it); under torchrun the ranks must stop together, as before.
    """
    state = _CtrlC()
    default = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if not (enabled and default and threading.current_thread() is threading.main_thread()):
        yield state
        return

    def remember(signum, frame):
        if state.pressed:
            raise KeyboardInterrupt
        state.pressed = True

    signal.signal(signal.SIGINT, remember)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def model_flops_per_token(model: nn.Module) -> float | None:
    """The training FLOPs per token that ``model`` counts (for FLOP/s and MFU), None if it counts none
    (word vectors, or a classifier on them: lookups, not matrix products)."""
    count = getattr(model, "flops_per_token", None)
    return count() if count is not None else None


def _peak_tflops(model: nn.Module, device: torch.device, precision: str) -> float | None:
    """The peak MFU divides by (runtime.peak_tflops), for models that count their FLOPs; measured here, before
    any step is timed, since a CPU's peak is a timing probe."""
    if model_flops_per_token(model) is None:
        return None
    peak = peak_tflops(device, precision, width_of(model))
    if peak is None or device.type != "cuda":
        return peak  # a CPU's probe already measures the whole machine, which its processes share
    return peak * world_size()  # one GPU per process


def _check_distributed(task: Task, tc: TrainConfig) -> None:
    """Refuse what training on several processes cannot do (nothing to check for a single process)."""
    world = world_size()
    if world == 1:
        return
    if tc.batch_size < world:
        raise ConfigError(f"train.batch_size {tc.batch_size} is smaller than the {world} processes; each process "
                          f"computes a share of the batch, so give at least one row per process")
    if tc.carry_state:
        raise ConfigError("train.carry_state does not work on several processes (each carries its own rows' state)")
    if tc.distributed == "fsdp" and tc.ema_decay > 0:
        raise ConfigError("train.ema_decay does not work with train.distributed fsdp yet; use ddp")
    if tc.distributed == "fsdp" and has_lora(task.model):
        raise ConfigError("LoRA adapters do not work with train.distributed fsdp yet; use ddp")


def _differences(here, there) -> str:
    """``name: A here, B in the checkpoint`` for the first fields where two configs differ."""
    names = [f.name for f in dataclasses.fields(here) if getattr(here, f.name) != getattr(there, f.name)]
    return "; ".join(f"{n}: {getattr(here, n)!r} here, {getattr(there, n)!r} in the checkpoint" for n in names[:3])


class _Window:
    """Losses, tokens and examples since the last log; the losses stay on the device so that no step
    waits for an ``.item()``."""

    def __init__(self, start: float, tokens_seen: int, examples_seen: int):
        self.reset(start, tokens_seen, examples_seen)

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.steps += 1

    def mean_loss(self) -> float:
        """The mean step loss since the last reset, over every rank (a collective under torchrun)."""
        if not self.steps:
            return float("nan")
        return float(all_mean(self.loss_sum).item()) / self.steps

    def reset(self, now: float, tokens_seen: int, examples_seen: int) -> None:
        self.start, self.loss_sum, self.steps = now, None, 0
        self.tokens_at_start, self.examples_at_start = tokens_seen, examples_seen

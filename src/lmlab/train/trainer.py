"""The training loop: any registered model, prepared token shards, AdamW, checkpoints, exact resume.

The trainer knows nothing of a specific model: it calls ``model(x, y)`` and uses the returned loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn as nn
from tqdm import tqdm

from lmlab.config import RunConfig, TrainConfig, save_config
from lmlab.data.loader import TokenShards, eval_batches, sequential_batch, train_batch
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.eval.perplexity import stateful_nll
from lmlab.models.registry import build_model
from lmlab.runs import RunFolder, list_checkpoints
from lmlab.runtime import (autocast_context, peak_memory_mib, resolve_device, resolve_precision, rng_state,
                           set_rng_state)
from lmlab.train.checkpoint import load_train_state, read_manifest, save_checkpoint
from lmlab.train.ema import averaged, weight_average
from lmlab.train.logger import MetricsLogger, plot_losses
from lmlab.train.optim import build_optimizer, build_scheduler


@torch.no_grad()
def estimate_loss(model: nn.Module, shards: TokenShards, cfg: TrainConfig, block_size: int,
                  device: torch.device, precision: str) -> float:
    """Mean loss over the fixed evaluation batches of a split.

    A model without a context limit (recurrent) is scored instead on the first tokens of the split
    read in order with its state carried through (as many tokens as the batches would hold), which
    is how its perplexity is measured; fresh-state windows would understate it.
    """
    was_training = model.training
    model.eval()
    batch_size = cfg.eval_batch_size or cfg.batch_size
    with autocast_context(precision, device):
        if model.context_length is None:
            n_tokens = min(cfg.eval_batches * batch_size * block_size, shards.tokens - 1)
            total, count = stateful_nll(model, shards.read(0, n_tokens + 1))
            mean = total / count
        else:
            losses = [model(x.to(device), y.to(device))[1].item()
                      for x, y in eval_batches(shards, batch_size, block_size, cfg.seed, cfg.eval_batches)]
            mean = float(np.mean(losses))
    model.train(was_training)
    return mean


class Trainer:
    """Trains ``cfg.model`` on ``cfg.data`` following ``cfg.train``; ``run()`` returns a summary."""

    def __init__(self, cfg: RunConfig, resume: bool = False, stop_after: int | None = None):
        self.cfg, self.tc = cfg, cfg.train
        self.resume, self.stop_after = resume, stop_after
        self.out_dir = Path(self.tc.out_dir)
        self._check_out_dir()
        if self.tc.threads:
            torch.set_num_threads(self.tc.threads)
        self.device = resolve_device(self.tc.device)
        self.precision = resolve_precision(self.tc.precision, self.device)
        self._load_data()
        if self.tc.epochs is not None:  # passes over the training tokens decide the step count
            tokens_per_step = self.tc.batch_size * self.tc.grad_accum * self.cfg.model.block_size
            steps = max(1, math.ceil(self.tc.epochs * self.train_data.tokens / tokens_per_step))
            self.tc = dataclasses.replace(self.tc, max_steps=steps)
            self.cfg = dataclasses.replace(self.cfg, train=self.tc)
        torch.manual_seed(self.tc.seed)
        random.seed(self.tc.seed)
        self.model = build_model(self.cfg.model).to(self.device)
        self.cfg = dataclasses.replace(self.cfg, model=self.model.config)  # presets resolved, for config.yaml
        self.optimizer = build_optimizer(self.model, self.tc, self.device.type)
        self.scheduler = build_scheduler(self.optimizer, self.tc)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.step, self.elapsed_before, self.tokens_seen = 0, 0.0, 0
        self.carry = self._make_carry()
        self.ema = weight_average(self.model, self.tc.ema_decay)
        self.logger = MetricsLogger(self.out_dir, self.tc.tensorboard)
        if resume:
            self._restore()
        self.forward_model = torch.compile(self.model) if self.tc.compile else self.model

    def _make_carry(self):
        """The state carried across batches (truncated BPTT), or None when every batch starts afresh."""
        tc = self.tc
        if tc.batching not in ("random", "sequential"):
            raise ConfigError(f"train.batching {tc.batching!r} is not one of random, sequential")
        if not tc.carry_state:
            return None
        if tc.batching != "sequential" or tc.grad_accum != 1:
            raise ConfigError("train.carry_state needs train.batching=sequential and train.grad_accum=1")
        if self.model.context_length is not None:
            raise ConfigError("train.carry_state needs a model that carries a state (model.family rnn, lstm or gru)")
        return self.model.make_cache(tc.batch_size)

    def _check_out_dir(self) -> None:
        has_checkpoints = bool(list_checkpoints(self.out_dir))
        if self.resume and not has_checkpoints:
            raise ConfigError(f"--resume: {self.out_dir} has no checkpoints to resume from")
        if not self.resume and has_checkpoints:
            raise ConfigError(f"{self.out_dir} already holds a run; pass --resume to continue it "
                              f"or set train.out_dir to a new folder")

    def _load_data(self) -> None:
        data_dir = self.cfg.data.path
        if not data_dir:
            raise ConfigError("data.path is not set (the folder written by `lmlab data prepare`)")
        self.train_data = TokenShards(data_dir, self.cfg.data.train_split)
        self.val_data = TokenShards(data_dir, self.cfg.data.val_split)
        block = self.cfg.model.block_size
        self.train_data.check_context(block)
        self.val_data.check_context(block)
        self.tokenizer = Tokenizer.load(Path(data_dir) / "tokenizer.json")
        model_cfg = self.cfg.model
        if model_cfg.vocab_size is None:
            model_cfg = dataclasses.replace(model_cfg, vocab_size=self.tokenizer.vocab_size)
        elif model_cfg.vocab_size < self.tokenizer.vocab_size:
            raise DataError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {self.tokenizer.vocab_size}")
        if model_cfg.reset_token is None:  # documents are separated by end-of-text in prepared data
            model_cfg = dataclasses.replace(model_cfg, reset_token=self.tokenizer.eot_id)
        self.cfg = dataclasses.replace(self.cfg, model=model_cfg)

    def _restore(self) -> None:
        ckpt = list_checkpoints(self.out_dir)[-1]
        manifest = read_manifest(ckpt)
        if manifest["model_config"] != dataclasses.asdict(self.model.config):
            raise ConfigError(f"--resume: the model config differs from the one in {ckpt}")
        safetensors.torch.load_model(self.model, str(ckpt / "model.safetensors"), device=str(self.device))
        state = load_train_state(ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        if self.carry is not None:
            self.carry.load_state_dict(state["carry"])
        if self.ema is not None:
            if "ema" not in state:
                raise ConfigError(f"--resume: {ckpt} was trained without train.ema_decay")
            self.ema.load_raw_state(state["ema"])
        self.step, self.elapsed_before, self.tokens_seen = state["step"], state["elapsed_s"], state["tokens_seen"]
        self.logger.truncate_after(self.step)

    def save(self) -> Path:
        """Checkpoint the current step (weights, tokenizer, optimizer/scheduler/RNG/data state). With
        train.ema_decay the checkpoint's weights are the average, the raw ones go with the training state."""
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "data": {"seed": self.tc.seed, "next_step": self.step},
            "elapsed_s": self.elapsed(),
            "tokens_seen": self.tokens_seen,
        }
        if self.carry is not None:
            state["carry"] = self.carry.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.raw_state()
        path = self.out_dir / "checkpoints" / f"step-{self.step:06d}"
        with averaged(self.ema):
            save_checkpoint(path, self.model, self.tokenizer, state, info={"step": self.step, "kind": "pretrain"})
        RunFolder(self.out_dir).prune_checkpoints(self.tc.keep_checkpoints)
        return path

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss."""
        tc, block = self.tc, self.model.config.block_size
        total = 0.0
        for micro in range(tc.grad_accum):
            x, y = self._batch(micro)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast_context(self.precision, self.device):
                if self.carry is not None:
                    _, loss = self.forward_model(x, y, cache=self.carry)
                else:
                    _, loss = self.forward_model(x, y)
            self.scaler.scale(loss / tc.grad_accum).backward()
            total += loss.item()
        if tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        if self.carry is not None:
            self.carry.detach()  # truncated BPTT: keep the values, drop the history
        self.step += 1
        self.tokens_seen += tc.grad_accum * tc.batch_size * block
        return total / tc.grad_accum

    def _batch(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the current step: random windows, or the next windows in order."""
        tc, block = self.tc, self.model.config.block_size
        if tc.batching == "random":
            return train_batch(self.train_data, tc.batch_size, block, tc.seed, self.step, micro)
        x, y, new_epoch = sequential_batch(self.train_data, tc.batch_size, block, self.step * tc.grad_accum + micro)
        if new_epoch and self.carry is not None:
            self.carry = self.model.make_cache(tc.batch_size)  # each epoch starts from a zero state
        return x, y

    def evaluate(self) -> float:
        """Validation loss (of the weight average with train.ema_decay)."""
        with averaged(self.ema):
            return estimate_loss(self.model, self.val_data, self.tc, self.model.config.block_size, self.device, self.precision)

    def run(self) -> dict:
        """Train until max_steps, max_minutes or stop_after; checkpoint, plot and return a summary."""
        tc = self.tc
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out_dir / "config.yaml")
        self.started = time.perf_counter()
        self.model.train()
        first_step, val_loss, loss = self.step, None, float("nan")
        bar = tqdm(total=tc.max_steps, initial=self.step, unit="step", disable=not tc.progress, dynamic_ncols=True,
                   mininterval=0.5)
        window_start, window_tokens = time.perf_counter(), 0
        interrupted = False
        try:
            while self.step < tc.max_steps:
                loss = self.train_step()
                if not math.isfinite(loss):
                    raise DataError(f"loss became {loss} at step {self.step}; lower train.lr or check the data")
                window_tokens += tc.grad_accum * tc.batch_size * self.model.config.block_size
                bar.update(1)
                if self.step % tc.log_interval == 0 or self.step == tc.max_steps:
                    now = time.perf_counter()
                    tok_s = window_tokens / max(now - window_start, 1e-9)
                    record = {"step": self.step, "train_loss": loss, "lr": self.scheduler.get_last_lr()[0],
                              "tokens": self.tokens_seen, "tokens_per_s": tok_s, "elapsed_s": self.elapsed(),
                              "peak_mem_mib": peak_memory_mib(self.device), "time": time.time()}
                    if hasattr(self.model, "flops_per_token"):  # achieved model FLOP/s, for MFU
                        record["tflops"] = tok_s * self.model.flops_per_token() / 1e12
                    self.logger.log(record)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
                    window_start, window_tokens = now, 0
                out_of_time = tc.max_minutes is not None and self.elapsed() >= tc.max_minutes * 60
                stop_now = self.stop_after is not None and self.step - first_step >= self.stop_after
                last = self.step == tc.max_steps or out_of_time or stop_now
                if self.step % tc.eval_interval == 0 or last:
                    val_loss = self.evaluate()
                    self.logger.log({"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                                     "elapsed_s": self.elapsed(), "time": time.time()})
                    bar.write(f"step {self.step}: train loss {loss:.4f}, val loss {val_loss:.4f}")
                if self.step % tc.checkpoint_interval == 0 or last:
                    self.save()
                if last:
                    break
        except KeyboardInterrupt:
            interrupted = True
            bar.write(f"interrupted: saving a checkpoint at step {self.step} (continue with --resume)")
            self.save()
        finally:
            bar.close()
            self.logger.close()
        plots = plot_losses(self.logger.path, self.out_dir / "plots")
        return {"step": self.step, "train_loss": loss, "val_loss": val_loss, "elapsed_s": self.elapsed(),
                "tokens_seen": self.tokens_seen, "peak_mem_mib": peak_memory_mib(self.device),
                "checkpoint": str(list_checkpoints(self.out_dir)[-1]),
                "plots": [str(p) for p in plots], "interrupted": interrupted}


def train(cfg: RunConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Train a model as ``cfg`` describes (see ``Trainer``)."""
    return Trainer(cfg, resume=resume, stop_after=stop_after).run()

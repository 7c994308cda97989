"""The fine-tuning loop shared by ``finetune classify`` and ``finetune sft``.

The task supplies ``loss_of(step) -> (loss, tokens)`` (it builds the step's batch and runs the model)
and, optionally, ``evaluate(step) -> dict`` of metrics to log; the loop does the rest: AdamW and the
schedule, mixed precision, gradient clipping, logging to metrics.jsonl with tokens/s and peak
memory, a progress bar with ETA, periodic evaluation, ``max_minutes``, and Ctrl-C (stops cleanly so
the caller can save what was trained), and with ``train.ema_decay`` an average of the weights that
evaluation and the saved model use (see train/ema.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from lmlab.config import TrainConfig, save_config
from lmlab.train.logger import MetricsLogger
from lmlab.train.optim import build_optimizer, build_scheduler
from lmlab.errors import ConfigError
from lmlab.runs import list_checkpoints
from lmlab.train.ema import averaged, check_ema_decay, weight_average
from lmlab.runtime import autocast_context, peak_memory_mib, resolve_device, resolve_precision


def check_run(tc: TrainConfig) -> tuple[torch.device, str]:
    """Refuse an out_dir that already holds a run or a bad train.ema_decay, apply train.threads; return the
    device and precision."""
    if list_checkpoints(tc.out_dir):
        raise ConfigError(f"{tc.out_dir} already holds a run; choose another train.out_dir or delete it")
    check_ema_decay(tc.ema_decay)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    return device, resolve_precision(tc.precision, device)


def begin_run(cfg, steps_per_epoch: int):
    """Resolve ``train.epochs`` into max_steps, create the run folder, save config.yaml; return (cfg, logger).

    ``cfg`` is a fine-tuning config with ``train`` and its output folder in ``train.out_dir``.
    """
    tc = cfg.train
    if tc.epochs is not None:
        tc = dataclasses.replace(tc, max_steps=max(1, math.ceil(tc.epochs * steps_per_epoch)))
    cfg = dataclasses.replace(cfg, train=tc)
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    return cfg, MetricsLogger(out, tc.tensorboard)


@dataclass
class LoopResult:
    steps: int
    seconds: float
    interrupted: bool
    last_eval: dict = field(default_factory=dict)


def run_loop(model: nn.Module, tc: TrainConfig, logger: MetricsLogger, device: torch.device, precision: str,
             loss_of: Callable[[int], tuple[torch.Tensor, int]],
             evaluate: Callable[[int], dict] | None = None, examples_per_step: int | None = None,
             lr_by_prefix: dict[str, float] | None = None) -> LoopResult:
    """Train the trainable parameters of ``model`` for ``tc.max_steps`` (or ``tc.max_minutes``).

    ``lr_by_prefix``: learning rates of parameters whose names start with a prefix (see build_optimizer)."""
    optimizer = build_optimizer(model, tc, device.type, lr_by_prefix)
    scheduler = build_scheduler(optimizer, tc)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ema = weight_average(model, tc.ema_decay)
    model.train()
    started = window_start = time.perf_counter()
    step, window_loss, window_n, window_tokens = 0, 0.0, 0, 0
    result = LoopResult(0, 0.0, False)
    bar = tqdm(total=tc.max_steps, unit="step", disable=not tc.progress, dynamic_ncols=True, mininterval=0.5)
    try:
        while step < tc.max_steps:
            with autocast_context(precision, device):
                loss, tokens = loss_of(step)
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update()
            step += 1
            bar.update(1)
            window_loss, window_n, window_tokens = window_loss + loss.item(), window_n + 1, window_tokens + tokens
            elapsed = time.perf_counter() - started
            if step % tc.log_interval == 0 or step == tc.max_steps:
                now = time.perf_counter()
                record = {"step": step, "train_loss": window_loss / window_n, "lr": scheduler.get_last_lr()[0],
                          "tokens_per_s": window_tokens / (now - window_start), "elapsed_s": elapsed,
                          "peak_mem_mib": peak_memory_mib(device), "time": time.time()}
                if examples_per_step:
                    record["examples_per_s"] = window_n * examples_per_step / (now - window_start)
                logger.log(record)
                bar.set_postfix(loss=f"{record['train_loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                window_loss, window_n, window_tokens, window_start = 0.0, 0, 0, now
            out_of_time = tc.max_minutes is not None and elapsed >= tc.max_minutes * 60
            last = step == tc.max_steps or out_of_time
            if evaluate is not None and (step % tc.eval_interval == 0 or last):
                with averaged(ema):
                    metrics = evaluate(step)
                model.train()
                logger.log({"step": step, **metrics, "elapsed_s": time.perf_counter() - started, "time": time.time()})
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                result.last_eval = metrics
            if last:
                break
    except KeyboardInterrupt:
        result.interrupted = True
        bar.write(f"interrupted at step {step}: saving what was trained so far")
    finally:
        bar.close()
    if ema is not None:
        ema.copy_to_model()
    result.steps, result.seconds = step, time.perf_counter() - started
    return result

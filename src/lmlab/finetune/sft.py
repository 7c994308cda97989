"""Instruction tuning (supervised fine-tuning, SFT) of a decoder on conversations.

Conversations are rendered in lmlab's chat template (data/chat.py); the loss is computed on the
assistant's words and its closing <|end|> only, so the model learns to answer, not to predict
questions. Short conversations are packed into full context windows (``data.pack``).
"""

from __future__ import annotations

import logging
import math
import random
from typing import Callable

import torch
import torch.nn as nn

from lmlab.config import SftConfig
from lmlab.data.chat import add_chat_tokens, read_conversations, render
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.data.labeled import pad_rows
from lmlab.models.heads import kind_of, model_kind
from lmlab.models.interface import IGNORE_INDEX, count_parameters
from lmlab.models.lora import inject_lora
from lmlab.runtime import seed_everything
from lmlab.train.checkpoint import load_checkpoint
from lmlab.train.loop import Batch, RunResult, TaskBase, Trainer, prepare_run

log = logging.getLogger(__name__)


def training_rows(tokenizer: Tokenizer, conversations: list[list[dict]], block_size: int,
                  pack: bool) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) rows of at most ``block_size`` tokens; targets are IGNORE_INDEX where the loss skips.

    Packed: conversations (each ending in end-of-text) are concatenated and cut into full windows.
    Not packed: one row per conversation, cut to the context.
    """
    rendered = []
    for messages in conversations:
        ids, learn = render(tokenizer, messages)
        ids, learn = ids + [tokenizer.eot_id], learn + [False]
        targets = [t if counted else IGNORE_INDEX for t, counted in zip(ids[1:], learn[1:])]
        rendered.append((ids[:-1][:block_size], targets[:block_size]))
    if not pack:
        return [r for r in rendered if any(t != IGNORE_INDEX for t in r[1])]
    stream_x = [t for x, _ in rendered for t in x]
    stream_y = [t for _, y in rendered for t in y]
    return [(stream_x[i:i + block_size], stream_y[i:i + block_size]) for i in range(0, len(stream_x), block_size)
            if any(t != IGNORE_INDEX for t in stream_y[i:i + block_size])]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, T) padded on the right, and targets (B, T) with IGNORE_INDEX on the padding."""
    return pad_rows([x for x, _ in rows], pad_id), pad_rows([y for _, y in rows], IGNORE_INDEX)


@torch.no_grad()
def sft_loss(model: nn.Module, rows, batch_size: int, pad_id: int, device) -> float:
    """Mean loss per counted (assistant) token over ``rows``."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x, y = collate(rows[i:i + batch_size], pad_id)
        logits, _ = model(x.to(device))
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(),
                                                   ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((y != IGNORE_INDEX).sum())
    return total / max(count, 1)


class SftTask(TaskBase):
    """Instruction tuning as a task of the one training loop (train/loop.py): the rows of step s are
    the epoch's rows in a seeded random order, batch_size * grad_accum of them, cut into grad_accum
    micro-batches; the loss is the mean over the assistant's tokens of the step."""

    kind = "sft"

    def __init__(self, cfg: SftConfig, base, device: torch.device):
        tc, dc = cfg.train, cfg.data
        self.cfg, self.tc = cfg, tc
        conversations, val_conversations = _split_conversations(cfg)
        self.model, self.tokenizer = base.model, base.tokenizer
        if kind_of(self.model) != "language_model":
            raise ConfigError(f"the base model is {model_kind(self.model)}: instruction tuning needs a decoder (a gpt "
                              f"or recurrent language model)")
        seed_everything(tc.seed)
        self.added = add_chat_tokens(self.tokenizer, self.model)
        self.block = self.model.context_length or self.model.config.block_size
        self.rows = training_rows(self.tokenizer, conversations, self.block, dc.pack)
        self.val_rows = training_rows(self.tokenizer, val_conversations, self.block, pack=False) if val_conversations else []
        if not self.rows:
            raise DataError(f"{dc.train}: no assistant tokens to learn from")
        if cfg.lora.r:
            inject_lora(self.model, cfg.lora)
        self.model.to(device).train()
        self.conversations = len(conversations)
        self._epoch: tuple[int, list[int]] | None = None

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.rows) / (self.tc.batch_size * self.tc.grad_accum))

    def step_batches(self, step: int) -> list[Batch]:
        per_step = self.tc.batch_size * self.tc.grad_accum
        order = self._epoch_order(step // self.steps_per_epoch())
        first = (step % self.steps_per_epoch()) * per_step
        chosen = order[first:first + per_step]
        size = self.tc.batch_size
        return [self._batch(chosen[i:i + size]) for i in range(0, len(chosen), size)]

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._epoch is None or self._epoch[0] != epoch:
            order = list(range(len(self.rows)))
            random.Random(self.tc.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch = (epoch, order[::-1])
        return self._epoch[1]

    def _batch(self, indices: list[int]) -> Batch:
        x, y = collate([self.rows[i] for i in indices], self.tokenizer.pad_id)
        counted = int((y != IGNORE_INDEX).sum())
        return Batch({"x": x, "y": y}, units=counted, tokens=counted, row_units=(y != IGNORE_INDEX).sum(1))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch.tensors["x"], batch.tensors["y"])[1]

    def evaluate(self, model: nn.Module, device: torch.device, precision: str) -> dict[str, float]:
        if not self.val_rows:
            return {}
        loss = sft_loss(model, self.val_rows, self.tc.eval_batch_size or self.tc.batch_size, self.tokenizer.pad_id,
                        device)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}

    def checkpoint_info(self) -> dict:
        return {"chat_template": "lmlab", "base": str(self.cfg.model.path)}


def _split_conversations(cfg: SftConfig) -> tuple[list, list]:
    """Training and validation conversations: data.val, or a seeded held-out slice of data.train."""
    dc = cfg.data
    conversations = read_conversations(dc.train, dc.max_examples, dc.system_prompt)
    if dc.val:
        return conversations, read_conversations(dc.val, None, dc.system_prompt)
    order = list(range(len(conversations)))
    random.Random(cfg.train.seed).shuffle(order)
    n_val = max(1, int(len(order) * dc.val_fraction)) if len(order) > 1 else 0
    held = set(order[:n_val])
    return ([c for i, c in enumerate(conversations) if i not in held],
            [c for i, c in enumerate(conversations) if i in held])


def finetune_sft(cfg: SftConfig, load_base: Callable = load_checkpoint, resume: bool = False,
                 stop_after: int | None = None, force: bool = False) -> RunResult:
    """Instruction-tune a decoder as ``cfg`` says; write the run folder and return what happened.

    ``load_base(path)`` opens model.path (the CLI passes one that also opens Hugging Face folders);
    ``resume`` continues the run in train.out_dir from its newest checkpoint; ``force`` replaces a
    previous run there (see Trainer).
    """
    if not cfg.model.path or not cfg.data.train:
        raise ConfigError("model.path and data.train must be set (a decoder checkpoint and a JSONL/JSON file)")
    device, precision = prepare_run(cfg.train, resume, force, inputs=[cfg.model.path, cfg.data.train, cfg.data.val])
    task = SftTask(cfg, load_base(cfg.model.path), device)
    trainable, total = count_parameters(task.model)
    log.info("%s conversations -> %s rows of <= %d tokens%s; %d chat tokens added; %s of %s parameters trainable",
             f"{task.conversations:,}", f"{len(task.rows):,}", task.block, " (packed)" if cfg.data.pack else "",
             task.added, f"{trainable:,}", f"{total:,}")
    result = Trainer(task, cfg, device, precision, resume=resume, stop_after=stop_after, replace=force).run()
    result.extra = {"trainable_params": trainable, "total_params": total}
    return result

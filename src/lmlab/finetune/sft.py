"""Instruction tuning (supervised fine-tuning, SFT) of a decoder on conversations.

Conversations are rendered in lmlab's chat template (data/chat.py); the loss is computed on the
assistant's words and its closing <|end|> only, so the model learns to answer, not to predict
questions. Short conversations are packed into full context windows (``data.pack``).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
import torch.nn as nn

from lmlab.config import SftConfig
from lmlab.data.chat import add_chat_tokens, read_conversations, render
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.models.interface import count_parameters
from lmlab.models.lora import inject_lora
from lmlab.finetune.loop import begin_run, check_run, run_loop
from lmlab.interop import load_model as load_checkpoint
from lmlab.train.checkpoint import save_checkpoint
from lmlab.train.logger import plot_losses
from lmlab.runtime import autocast_context, peak_memory_mib

IGNORE = -100  # target value the loss skips


def training_rows(tokenizer: Tokenizer, conversations: list[list[dict]], block_size: int,
                  pack: bool) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) rows of at most ``block_size`` tokens; targets are IGNORE where the loss skips.

    Packed: conversations (each ending in end-of-text) are concatenated and cut into full windows.
    Not packed: one row per conversation, cut to the context.
    """
    rendered = []
    for messages in conversations:
        ids, learn = render(tokenizer, messages)
        ids, learn = ids + [tokenizer.eot_id], learn + [False]
        targets = [t if counted else IGNORE for t, counted in zip(ids[1:], learn[1:])]
        rendered.append((ids[:-1][:block_size], targets[:block_size]))
    if not pack:
        return [r for r in rendered if any(t != IGNORE for t in r[1])]
    stream_x = [t for x, _ in rendered for t in x]
    stream_y = [t for _, y in rendered for t in y]
    return [(stream_x[i:i + block_size], stream_y[i:i + block_size]) for i in range(0, len(stream_x), block_size)
            if any(t != IGNORE for t in stream_y[i:i + block_size])]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, T) padded on the right, and targets (B, T) with IGNORE on the padding."""
    width = max(len(x) for x, _ in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (inputs, targets) in enumerate(rows):
        x[i, :len(inputs)] = torch.tensor(inputs)
        y[i, :len(targets)] = torch.tensor(targets)
    return x, y


@torch.no_grad()
def sft_loss(model: nn.Module, rows, batch_size: int, pad_id: int, device, precision: str) -> float:
    """Mean loss per counted (assistant) token over ``rows``."""
    model.eval()
    total, count = 0.0, 0
    with autocast_context(precision, device):
        for i in range(0, len(rows), batch_size):
            x, y = collate(rows[i:i + batch_size], pad_id)
            logits, _ = model(x.to(device))
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(),
                                                       ignore_index=IGNORE, reduction="sum").item()
            count += int((y != IGNORE).sum())
    return total / max(count, 1)


def finetune_sft(cfg: SftConfig) -> dict:
    """Instruction-tune a decoder as ``cfg`` says; write the run folder and return a summary."""
    tc, dc = cfg.train, cfg.data
    out = Path(tc.out_dir)
    if not cfg.model.path or not dc.train:
        raise ConfigError("model.path and data.train must be set (a decoder checkpoint and a JSONL/JSON file)")
    device, precision = check_run(tc)
    conversations = read_conversations(dc.train, dc.max_examples, dc.system_prompt)
    if dc.val:
        val_conversations = read_conversations(dc.val, None, dc.system_prompt)
    else:  # a seeded held-out slice of train
        order = list(range(len(conversations)))
        random.Random(tc.seed).shuffle(order)
        n_val = max(1, int(len(order) * dc.val_fraction)) if len(order) > 1 else 0
        held = set(order[:n_val])
        val_conversations = [c for i, c in enumerate(conversations) if i in held]
        conversations = [c for i, c in enumerate(conversations) if i not in held]

    base = load_checkpoint(cfg.model.path)
    model, tokenizer = base.model, base.tokenizer
    if getattr(model, "head_config", None) is not None or model.config.family == "encoder":
        raise ConfigError("instruction tuning needs a decoder (a gpt or recurrent language model)")
    torch.manual_seed(tc.seed)
    added = add_chat_tokens(tokenizer, model)
    block = model.context_length or model.config.block_size
    rows = training_rows(tokenizer, conversations, block, dc.pack)
    val_rows = training_rows(tokenizer, val_conversations, block, pack=False) if val_conversations else []
    if not rows:
        raise DataError(f"{dc.train}: no assistant tokens to learn from")
    if cfg.lora.r:
        inject_lora(model, cfg.lora)
    model.to(device).train()
    trainable, total = count_parameters(model)
    steps_per_epoch = math.ceil(len(rows) / tc.batch_size)
    cfg, logger = begin_run(cfg, steps_per_epoch)
    tc = cfg.train
    print(f"{len(conversations):,} conversations -> {len(rows):,} rows of <= {block} tokens"
          f"{' (packed)' if dc.pack else ''}; {added} chat tokens added; {trainable:,} of {total:,} parameters "
          f"trainable; {tc.max_steps:,} steps")
    order: list[int] = []

    def loss_of(step: int) -> tuple[torch.Tensor, int]:
        if not order:  # a new epoch, in a seeded order
            epoch_order = list(range(len(rows)))
            random.Random(tc.seed * 1_000_003 + step // steps_per_epoch).shuffle(epoch_order)
            order.extend(epoch_order)
        batch = [rows[order.pop()] for _ in range(min(tc.batch_size, len(order)))]
        x, y = collate(batch, tokenizer.pad_id)
        return model(x.to(device), y.to(device))[1], int((y != IGNORE).sum())

    def evaluate(step: int) -> dict:
        return {"val_loss": sft_loss(model, val_rows, tc.eval_batch_size or tc.batch_size, tokenizer.pad_id,
                                     device, precision)}

    result = run_loop(model, tc, logger, device, precision, loss_of, evaluate if val_rows else None)
    logger.close()
    ckpt = save_checkpoint(out / "checkpoints" / f"step-{result.steps:06d}", model.eval(), tokenizer,
                           info={"step": result.steps, "kind": "sft", "chat_template": "lmlab", "base": str(cfg.model.path)})
    plot_losses(out / "metrics.jsonl", out / "plots")
    return {"steps": result.steps, "train_seconds": result.seconds, "val_loss": result.last_eval.get("val_loss"),
            "trainable_params": trainable, "total_params": total, "peak_mem_mib": peak_memory_mib(device),
            "checkpoint": str(ckpt), "interrupted": result.interrupted}

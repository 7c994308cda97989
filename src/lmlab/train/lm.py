"""Causal language-model pretraining as a task of the one loop: GPT and recurrent models on token shards.

    lmlab train configs/shakespeare_char.yaml     -> RUN/config.yaml, metrics.jsonl, plots/, checkpoints/

Batches are windows of ``model.block_size`` tokens: random windows (``train.batching: random``, the
windows of step s drawn from a generator seeded with (seed, s)), or the text read in order
(``sequential``), where a recurrent model may carry its state from batch to batch (truncated
backpropagation through time, ``train.carry_state``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lmlab.config import RECURRENT, SEQ2SEQ, ModelConfig, RunConfig
from lmlab.data.loader import TokenShards, eval_batches, sequential_batch, train_batch
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.models.registry import build_model
from lmlab.progress import progress_bar
from lmlab.train.distributed import all_sum, rank, world_size
from lmlab.train.loop import Batch, RunResult, TaskBase, Trainer, prepare_run

if TYPE_CHECKING:
    from lmlab.train.seq2seq import ModelInit, Scorer

PROGRESS_EVERY = 10.0  # seconds between plain progress lines of long evaluations when output is not a terminal


@torch.no_grad()
def stateful_nll(model: nn.Module, ids: np.ndarray | list[int], chunk: int = 1024,
                 progress: bool = False) -> tuple[float, int]:
    """Total NLL of ids[1:] for a model that carries a state (its cache) across chunks of the text, and
    the count of scored tokens: how a recurrent model's perplexity is measured."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    if len(ids) < 2:
        raise DataError("the text has no tokens to score")
    device = next(model.parameters()).device
    cache = model.make_cache(1)
    total = 0.0
    starts = range(0, len(ids) - 1, chunk)
    with progress_bar(len(starts), unit="chunk", desc="perplexity", enabled=progress, every=PROGRESS_EVERY) as bar:
        for begin in starts:
            x = ids[begin:begin + chunk].unsqueeze(0).to(device)  # (1, T)
            y = ids[begin + 1:begin + chunk + 1].unsqueeze(0).to(device)  # (1, T'), T' = T or T - 1 at the end
            logits, _ = model(x, cache=cache)
            logits = logits[:, :y.size(1)]
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                                       reduction="sum").item()
            bar.update(1)
    return total, len(ids) - 1


class LanguageModelTask(TaskBase):
    """Next-token prediction on the token shards of ``cfg.data`` (see the module docstring)."""

    kind = "pretrain"

    def __init__(self, cfg: RunConfig, device: torch.device):
        self.tc = cfg.train
        self.train_data, self.val_data, self.tokenizer = load_shards(cfg)
        self.block = cfg.model.block_size
        self.model = build_model(fit_model_config(cfg.model, self.tokenizer)).to(device)
        self.carry = self._make_carry()

    def _make_carry(self):
        """The state carried across batches (truncated BPTT), or None when every batch starts afresh."""
        tc = self.tc
        if not tc.carry_state:
            return None
        if tc.batching != "sequential" or tc.grad_accum != 1:
            raise ConfigError("train.carry_state needs train.batching=sequential and train.grad_accum=1")
        if self.model.context_length is not None:
            raise ConfigError("train.carry_state needs a model that carries a state (model.family rnn, lstm or gru)")
        return self.model.make_cache(tc.batch_size)

    def steps_per_epoch(self) -> int:
        return max(1, self.train_data.tokens // (self.tc.batch_size * self.tc.grad_accum * self.block))

    def step_batches(self, step: int) -> list[Batch]:
        """grad_accum micro-batches of batch_size windows: together the step's batch_size * grad_accum
        windows, the same whichever way they are split."""
        x, y = self._step_windows(step)
        size = self.tc.batch_size
        return [Batch({"x": x[i:i + size], "y": y[i:i + size]}, units=y[i:i + size].numel(),
                      tokens=x[i:i + size].numel()) for i in range(0, len(x), size)]

    def _step_windows(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        tc, rows = self.tc, self.tc.batch_size * self.tc.grad_accum
        if tc.batching == "random":
            return train_batch(self.train_data, rows, self.block, tc.seed, step)
        x, y, new_epoch = sequential_batch(self.train_data, rows, self.block, step)
        if new_epoch and self.carry is not None:
            self.carry = self.model.make_cache(rows)  # each epoch starts from a zero state
        return x, y

    def example_count(self) -> int:
        """Examples for train.dp: the training text cut into consecutive windows of block_size tokens."""
        return (self.train_data.tokens - 1) // self.block

    def example_batch(self, indices: list[int]) -> Batch:
        start = [i * self.block for i in indices]
        rows = torch.from_numpy(np.stack([self.train_data.read(s, s + self.block + 1) for s in start]))  # (B, T + 1)
        x, y = rows[:, :-1], rows[:, 1:]
        return Batch({"x": x, "y": y}, units=y.numel(), tokens=x.numel())

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch.tensors["x"], batch.tensors["y"]
        if self.carry is not None:
            return model(x, y, cache=self.carry)[1]
        return model(x, y)[1]

    def after_step(self) -> None:
        if self.carry is not None:
            self.carry.detach()  # truncated BPTT: keep the values, drop the history

    def evaluate(self, model: nn.Module, device: torch.device, precision: str) -> dict[str, float]:
        """Mean validation loss over fixed batches (the same every time, so values compare across steps).

        A model without a context limit (recurrent) is scored on the first tokens of the split read in
        order with its state carried through (as many tokens as the batches would hold), which is how
        its perplexity is measured; fresh-state windows would understate it.
        """
        tc = self.tc
        batch_size = tc.eval_batch_size or tc.batch_size
        if model.context_length is None:
            n_tokens = min(tc.eval_batches * batch_size * self.block, self.val_data.tokens - 1)
            total, count = stateful_nll(model, self.val_data.read(0, n_tokens + 1))
            loss = total / count
        else:
            batches = list(eval_batches(self.val_data, batch_size, self.block, tc.seed, tc.eval_batches))
            loss = _mean_batch_loss(model, batches, device)
        return {"val_loss": loss, "val_ppl": float(np.exp(min(loss, 50)))}

    def state_dict(self) -> dict:
        return {"carry": self.carry.state_dict()} if self.carry is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.carry is not None:
            self.carry.load_state_dict(state["carry"])


def _mean_batch_loss(model: nn.Module, batches: list, device: torch.device) -> float:
    """The mean of the batches' losses. Under torchrun each rank scores batches rank::world and the sums
    are all-reduced; every rank runs as many forwards (the last batch again, not counted, where its
    share is short), which FSDP2's all-gathers need."""
    world, me = world_size(), rank()
    if world == 1:
        return float(np.mean([model(x.to(device), y.to(device))[1].item() for x, y in batches]))
    total = 0.0
    for i in range(me, me + world * math.ceil(len(batches) / world), world):
        x, y = batches[min(i, len(batches) - 1)]
        loss = model(x.to(device), y.to(device))[1].item()
        total += loss if i < len(batches) else 0.0
    return all_sum(total, device) / len(batches)


def load_shards(cfg: RunConfig) -> tuple[TokenShards, TokenShards, Tokenizer]:
    """The train and val shards of ``cfg.data`` (each long enough for a window of model.block_size) and
    the tokenizer that made them."""
    data_dir = cfg.data.path
    if not data_dir:
        raise ConfigError("data.path is not set (the folder written by `lmlab data prepare`)")
    train_data = TokenShards(data_dir, cfg.data.train_split)
    val_data = TokenShards(data_dir, cfg.data.val_split)
    train_data.check_context(cfg.model.block_size)
    val_data.check_context(cfg.model.block_size)
    return train_data, val_data, Tokenizer.load(Path(data_dir) / "tokenizer.json")


def fit_model_config(model_cfg: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """``model_cfg`` completed from the tokenizer: its vocabulary (checked when given), and for recurrent
    models the reset token (documents end with end-of-text)."""
    if model_cfg.vocab_size is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    elif model_cfg.vocab_size < tokenizer.vocab_size:
        raise DataError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    if model_cfg.family in RECURRENT and model_cfg.reset_token is None:
        model_cfg = dataclasses.replace(model_cfg, reset_token=tokenizer.eot_id)
    return model_cfg


def pretrain(cfg: RunConfig, resume: bool = False, stop_after: int | None = None,
             force: bool = False, scorer: "Scorer | None" = None,
             init_model: "ModelInit | None" = None) -> RunResult:
    """Train a model on the data ``cfg`` describes: a language model, an encoder as a masked language model
    (train/mlm.py), an encoder-decoder on pairs (train/seq2seq.py, whose val_bleu needs ``scorer``), word
    vectors (train/word2vec.py); ``init_model`` sets an encoder-decoder's starting weights (model.encoder_init);
    ``resume`` continues the run in train.out_dir, ``force`` replaces a previous run there (see Trainer)."""
    from lmlab.train.mlm import MaskedLMTask  # these tasks build on this module
    from lmlab.train.seq2seq import Seq2SeqTask
    from lmlab.train.word2vec import Word2VecTask

    device, precision = prepare_run(cfg.train, resume, force, inputs=[cfg.data.path])
    if cfg.model.family in SEQ2SEQ:
        task = Seq2SeqTask(cfg, device, scorer, init_model)
    elif cfg.model.family == "encoder":
        task = MaskedLMTask(cfg, device)
    elif cfg.model.family == "word2vec":
        task = Word2VecTask(cfg, device)
    else:
        task = LanguageModelTask(cfg, device)
    cfg = dataclasses.replace(cfg, model=task.model.config)  # presets resolved, for config.yaml
    return Trainer(task, cfg, device, precision, resume=resume, stop_after=stop_after, replace=force).run()

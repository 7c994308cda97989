"""Encoder-decoder training as a task of the one loop: translation or summarisation on a pairs folder.

    lmlab data prepare --pairs SRC TGT --val VSRC VTGT -o data/pairs
    lmlab train configs/multi30k_transformer.yaml       (model.family seq2seq or rnn_seq2seq)

A step's batch is ``train.batch_size * train.grad_accum`` pairs drawn by ``data.pairs.pair_batch``
from a generator seeded with (seed, step), so a resumed run sees what an uninterrupted one would
have; with ``seq2seq.length_grouping`` = k a pool of k such batches is sorted by length and one of
them taken (pairs of similar length share a batch: less padding). The batch is then cut into
``grad_accum`` micro-batches of ``batch_size`` rows, each trimmed to its own longest source and target,
so grad_accum 2 x batch 4 takes the same step as 1 x 8.

The loss is the cross-entropy of the target tokens (their end-of-text included, padding skipped),
with ``seq2seq.label_smoothing``; a micro-batch's loss units are its target tokens. The speed the
loop reports counts a pair of S source and T target tokens as (S + T) / 2 tokens: the unit of the
models' ``flops_per_token`` (a target token with a source token of its own), so that tokens/s x
flops_per_token is the model's FLOP/s and MFU holds however long sources are against targets.

Evaluation: ``val_loss`` (no smoothing) and ``val_ppl`` over the first ``eval_batches *
eval_batch_size`` val pairs (the same every time), and with ``seq2seq.val_bleu_examples`` = n > 0 the
BLEU of the greedy translations of the first n val sources (``val_bleu``). Generating and scoring
text belong to layers above this one (generate/, eval/), so the caller hands in that ``scorer``
(``lmlab train`` does: eval.seq2seq.greedy_scores).

Warm start: with ``model.encoder_init`` the new model's encoder starts from a pretrained BERT. Reading
Hugging Face folders belongs to interop/, above this layer, so the caller hands in ``init_model``, which
sets the new model's starting weights (``lmlab train`` does: interop.warmstart.encoder_warm_start), and
``seq2seq.encoder_lr`` gives the pretrained encoder a learning rate of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import RunConfig
from lmlab.data.labeled import sequential_batches
from lmlab.data.pairs import IGNORE, PairBatch, PairShards, make_batch, pair_batch
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.models.registry import build_model
from lmlab.train.lm import fit_model_config
from lmlab.train.loop import Batch, TaskBase

# (model, tokenizer, source token ids, reference texts, max_new_tokens) -> {"bleu": ..., ...}: the
# scores of the model's greedy targets for these sources
Scorer = Callable[[nn.Module, Tokenizer, list[list[int]], list[str], int], dict[str, float]]
# (new model, the data's tokenizer) -> None: sets the model's starting weights (a warm start)
ModelInit = Callable[[nn.Module, Tokenizer], None]


def target_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
                reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against targets (B, T), padding (IGNORE) skipped; with
    ``label_smoothing`` = e the target distribution is (1 - e) on the target token + e spread evenly
    over the whole vocabulary (Szegedy et al. 2016; Vaswani et al. 2017 use e = 0.1)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                           label_smoothing=label_smoothing, reduction=reduction)


def micro_batch(batch: PairBatch, rows: slice) -> Batch:
    """Rows ``rows`` of a padded pair batch as a loop Batch, trimmed to their own longest source and
    target; units = target tokens (end-of-text included), tokens = (source + target tokens) / 2."""
    src_mask, targets = batch.src_mask[rows], batch.targets[rows]
    src_lengths, tgt_lengths = src_mask.sum(dim=1), (targets != IGNORE).sum(dim=1)
    S, T = int(src_lengths.max()), int(tgt_lengths.max())
    tensors = {"src": batch.src[rows, :S], "src_mask": src_mask[:, :S], "tgt_in": batch.tgt_in[rows, :T],
               "targets": targets[:, :T]}
    units = int(tgt_lengths.sum())
    return Batch(tensors, units=units, tokens=(int(src_lengths.sum()) + units) // 2, row_units=tgt_lengths)


class Seq2SeqTask(TaskBase):
    """Teacher-forced training of an encoder-decoder on the pairs folder ``cfg.data.path`` (see the
    module docstring); ``scorer`` computes val_bleu when seq2seq.val_bleu_examples asks for it;
    ``init_model`` starts the new model's weights (model.encoder_init)."""

    kind = "seq2seq"

    def __init__(self, cfg: RunConfig, device: torch.device, scorer: Scorer | None = None,
                 init_model: ModelInit | None = None):
        self.tc, self.sc = cfg.train, cfg.seq2seq
        if self.sc.val_bleu_examples and scorer is None:
            raise ConfigError("seq2seq.val_bleu_examples needs a scorer to translate and score text (lmlab train "
                              "has one; from Python pass pretrain(..., scorer=lmlab.eval.seq2seq.greedy_scores))")
        if cfg.model.encoder_init and init_model is None:
            raise ConfigError("model.encoder_init needs init_model to load the pretrained encoder (lmlab train has "
                              "one; from Python: cfg, init = lmlab.interop.warmstart.encoder_warm_start(cfg), then "
                              "pretrain(cfg, ..., init_model=init))")
        self.scorer = scorer
        self.train_data, self.val_data, self.tokenizer = load_pairs(cfg)
        self.model = build_model(fit_model_config(cfg.model, self.tokenizer))
        if init_model is not None:
            init_model(self.model, self.tokenizer)
        self.model.to(device)
        block = self.model.config.block_size
        self.max_source_len = self.sc.max_source_len or block
        self.max_target_len = self.sc.max_target_len or block

    def steps_per_epoch(self) -> int:
        return max(1, len(self.train_data) // (self.tc.batch_size * self.tc.grad_accum))

    def step_batches(self, step: int) -> list[Batch]:
        """The step's batch_size * grad_accum pairs (see the module docstring) in grad_accum micro-batches."""
        tc = self.tc
        pairs = pair_batch(self.train_data, tc.batch_size * tc.grad_accum, tc.seed, step, self.max_source_len,
                           self.max_target_len, group=self.sc.length_grouping)
        return [micro_batch(pairs, slice(i, i + tc.batch_size)) for i in range(0, len(pairs.indices), tc.batch_size)]

    def learning_rates(self) -> dict[str, float]:
        """seq2seq.encoder_lr for the BERT encoder's layers, positions and embedding LayerNorm (its word
        embeddings are the decoder's too, and train at train.lr with it)."""
        if self.sc.encoder_lr is None:  # the config allows it with a BERT encoder only
            return {}
        return {prefix: self.sc.encoder_lr for prefix in ("encoder.layers.", "encoder.pos_emb.", "encoder.norm_emb.")}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        t = batch.tensors
        logits, _ = model(t["src"], t["tgt_in"], t["src_mask"])
        return target_loss(logits, t["targets"], self.sc.label_smoothing)

    def evaluate(self, model: nn.Module, device: torch.device, precision: str) -> dict[str, float]:
        """val_loss (mean over target tokens, no smoothing) and val_ppl of fixed val pairs; val_bleu of
        greedy translations when asked. Every process computes the same figures (the val pairs are few)."""
        total, count = 0.0, 0
        for batch in self._val_batches():
            t = micro_batch(batch, slice(None)).to(device).tensors
            logits, _ = model(t["src"], t["tgt_in"], t["src_mask"])
            total += target_loss(logits, t["targets"], reduction="sum").item()
            count += int((t["targets"] != IGNORE).sum())
        loss = total / count
        metrics = {"val_loss": loss, "val_ppl": float(np.exp(min(loss, 50)))}
        if self.sc.val_bleu_examples:
            metrics.update(self._val_scores(model))
        return metrics

    def _val_batches(self) -> list[PairBatch]:
        """The first eval_batches * eval_batch_size val pairs, in batches of similar source length."""
        size = self.tc.eval_batch_size or self.tc.batch_size
        n = min(len(self.val_data), self.tc.eval_batches * size)
        lengths = self.val_data.lengths("source")[:n].tolist()
        return [make_batch(self.val_data, indices, self.max_source_len, self.max_target_len)
                for indices in sequential_batches(lengths, size)]

    def _val_scores(self, model: nn.Module) -> dict[str, float]:
        """The scorer's figures (val_bleu, ...) for greedy targets of the first val_bleu_examples sources."""
        texts = self.val_data.texts()[:self.sc.val_bleu_examples]
        sources = [self.val_data.pair(i)[0][:self.max_source_len].tolist() for i in range(len(texts))]
        scores = self.scorer(model, self.tokenizer, sources, [t["target"] for t in texts], self.max_target_len)
        return {f"val_{name}": float(value) for name, value in scores.items()}

    def checkpoint_info(self) -> dict:
        return {"max_source_len": self.max_source_len, "max_target_len": self.max_target_len}


def load_pairs(cfg: RunConfig) -> tuple[PairShards, PairShards, Tokenizer]:
    """The train and val splits of the pairs folder ``cfg.data.path`` and its tokenizer (a folder of
    token shards, language-model data, is a one-line DataError of data.pairs)."""
    data_dir = cfg.data.path
    if not data_dir:
        raise ConfigError("data.path is not set (the folder written by `lmlab data prepare --pairs`)")
    train_data = PairShards(data_dir, cfg.data.train_split)
    val_data = PairShards(data_dir, cfg.data.val_split)
    if len(val_data) == 0:
        raise DataError(f"{data_dir}: the {cfg.data.val_split} split has no pairs to evaluate on")
    return train_data, val_data, Tokenizer.load(Path(data_dir) / "tokenizer.json")

"""Masked-language-model pretraining of the encoder (BERT) as a task of the one loop.

    lmlab train configs/wikitext2_mlm.yaml     (model.family: encoder)

Batches are the windows the causal language model reads (train/lm.py: ``model.block_size`` tokens of
the same token shards, random or in order). In each window ``mlm.mask_prob`` of the tokens are chosen
(never end-of-text or another special token); of those, 80% are replaced by [MASK], 10% by a random
ordinary token and 10% are kept, and the loss is the cross-entropy of the original tokens at the chosen
positions only. The choice of step s is drawn from a generator seeded with (seed, s), like its windows,
so a resumed run masks exactly as an uninterrupted one.

With ``mlm.whole_word`` words are chosen instead of tokens: every token of a chosen word, or none. A
word starts at a token whose text begins with whitespace (byte-level BPE's space marker "Ġ" decodes to
" "), after a token that ends with whitespace (a newline; for char and byte tokenizers, the space
itself), and at and after a special token; a word tokenizer's tokens are words already.

The [MASK] token is the data tokenizer's own ([MASK] or <mask>), or [MASK] added to it as a special
token (a new id at the end of the vocabulary); the checkpoint's tokenizer has it. The checkpoint holds
the encoder under its MLM head (models/encoder.py: MaskedLM); ``lmlab finetune classify`` starts from
the encoder and drops the head.

With ``mlm.objective: electra`` the same masked windows train ELECTRA (models/encoder.py:
ReplacedTokenDetector): a small generator (``mlm.generator_layers``) predicts the chosen tokens, its
samples replace them, and the encoder learns to tell original from replaced at every position (loss:
generator + ``mlm.disc_weight`` x discriminator). Fine-tuning keeps the encoder (the discriminator).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import RunConfig
from lmlab.data.loader import eval_batches, sequential_batch, train_batch
from lmlab.data.tokenizer import Tokenizer
from lmlab.models.encoder import MaskedLM, ReplacedTokenConfig, ReplacedTokenDetector
from lmlab.models.interface import IGNORE_INDEX
from lmlab.models.registry import build_model
from lmlab.progress import progress_bar
from lmlab.train.distributed import all_sum, rank, world_size
from lmlab.train.lm import PROGRESS_EVERY, fit_model_config, load_shards
from lmlab.train.loop import Batch, TaskBase

MASK_NAMES = ("[MASK]", "<mask>")  # the first is what lmlab adds
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen tokens; the rest are kept as they are (BERT)
_MASK_STREAM = 2**31 - 2  # seed component that separates masks from the windows of the same step
_EVAL_MASK_STREAM = 2**31 - 3


def mask_token_id(tokenizer: Tokenizer) -> int | None:
    """The id of the tokenizer's mask token ([MASK] or <mask>), or None if it has none."""
    found = [tokenizer.tk.token_to_id(name) for name in MASK_NAMES]
    return next((i for i in found if i is not None), None)


def add_mask_token(tokenizer: Tokenizer) -> int:
    """The id of the tokenizer's mask token; a tokenizer without one gets [MASK] as a new special token
    first (at the end of its vocabulary)."""
    if mask_token_id(tokenizer) is None:
        tokenizer.add_special_tokens([MASK_NAMES[0]])
    return mask_token_id(tokenizer)


class Masker:
    """BERT's masking of token windows (see the module docstring): ``masker(x, rng)`` gives the model's
    inputs and the targets (the original token where chosen, IGNORE_INDEX elsewhere)."""

    def __init__(self, tokenizer: Tokenizer, mask_prob: float = 0.15, whole_word: bool = False):
        self.mask_id = add_mask_token(tokenizer)
        self.mask_prob, self.whole_word = mask_prob, whole_word
        self.special = np.zeros(tokenizer.vocab_size, dtype=bool)  # (V,)
        self.special[tokenizer.special_ids] = True
        self.ordinary = np.flatnonzero(~self.special)  # what a random replacement draws from
        if whole_word:
            self.space_before, self.space_after = _whitespace_edges(tokenizer)  # (V,) each

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, T) of token ids x (B, T); at least one token of the batch is chosen
        (where it has an ordinary one), so that every batch has a loss."""
        ids = x.numpy()
        chosen = self._choose(ids, rng) & ~self.special[ids]  # (B, T)
        if not chosen.any() and not self.special[ids].all():
            chosen.flat[rng.choice(np.flatnonzero(~self.special[ids]))] = True
        action = rng.random(ids.shape)  # < 0.8: [MASK]; < 0.9: a random token; else kept
        inputs = ids.copy()
        inputs[chosen & (action < MASK_SHARE)] = self.mask_id
        swap = chosen & (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE)
        inputs[swap] = rng.choice(self.ordinary, size=int(swap.sum()))
        targets = np.where(chosen, ids, IGNORE_INDEX)
        return torch.from_numpy(inputs), torch.from_numpy(targets)

    def _choose(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Which tokens are chosen (B, T): each with probability mask_prob, or each word (its first token's draw)."""
        draws = rng.random(ids.shape)
        if not self.whole_word:
            return draws < self.mask_prob
        starts = self.word_starts(ids)
        positions = np.arange(ids.shape[1])
        word_start = np.maximum.accumulate(np.where(starts, positions, 0), axis=1)  # (B, T) where each token's word starts
        return np.take_along_axis(draws, word_start, axis=1) < self.mask_prob

    def word_starts(self, ids: np.ndarray) -> np.ndarray:
        """(B, T) True where a word starts (see the module docstring); a window starts with one."""
        special = self.special[ids]
        starts = self.space_before[ids] | special
        starts[:, 1:] |= self.space_after[ids[:, :-1]] | special[:, :-1]
        starts[:, 0] = True
        return starts


def _whitespace_edges(tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """For every token id: whether its text begins with whitespace, and whether it ends with it. Every
    token of a word tokenizer counts as beginning a word."""
    if tokenizer.kind == "word":
        return np.ones(tokenizer.vocab_size, dtype=bool), np.zeros(tokenizer.vocab_size, dtype=bool)
    texts = tokenizer.tk.decode_batch([[i] for i in range(tokenizer.vocab_size)], skip_special_tokens=False)
    before = np.array([t[:1].isspace() for t in texts], dtype=bool)
    after = np.array([t[-1:].isspace() for t in texts], dtype=bool)
    return before, after


def chosen_token_sums(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int, int]:
    """Summed cross-entropy, correct predictions and count of a batch's chosen tokens: ``logits`` (N, vocab)
    at the N chosen positions of ``targets`` (B, T) (the original token there, else IGNORE_INDEX)."""
    gold = targets[targets != IGNORE_INDEX]  # (N,)
    nll = F.cross_entropy(logits.float(), gold, reduction="sum").item()
    return nll, int((logits.argmax(-1) == gold).sum()), len(gold)


@torch.no_grad()
def masked_lm_totals(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                     progress: bool = False) -> tuple[float, int, int]:
    """Summed cross-entropy, correct predictions and count of the chosen tokens of (inputs, targets)
    batches. Under torchrun each rank scores batches rank::world and the sums are all-reduced; every
    rank runs as many forwards (the last batch again, not counted), which FSDP2's all-gathers need."""
    world, me = world_size(), rank()
    nll, correct, count = 0.0, 0, 0
    mine = range(me, me + world * math.ceil(len(batches) / world), world)
    with progress_bar(len(mine), unit="batch", desc="masked LM", enabled=progress, every=PROGRESS_EVERY) as bar:
        for i in mine:
            inputs, targets = batches[min(i, len(batches) - 1)]
            logits, _ = model(inputs.to(device), targets.to(device))  # (N, vocab): the chosen positions
            bar.update(1)
            if i >= len(batches):
                continue
            sums = chosen_token_sums(logits, targets.to(device))
            nll, correct, count = nll + sums[0], correct + sums[1], count + sums[2]
    if world > 1:
        nll, correct, count = all_sum(nll, device), round(all_sum(correct, device)), round(all_sum(count, device))
    return nll, correct, count


@torch.no_grad()
def replaced_token_metrics(model: ReplacedTokenDetector, batches: list[tuple[torch.Tensor, torch.Tensor]],
                           device: torch.device) -> dict[str, float]:
    """ELECTRA's validation figures on (inputs, targets) batches, the generator's argmax filling in (the
    same corruption every time): the objective's loss, the generator's masked-token loss and accuracy, the
    discriminator's accuracy over all tokens and its recall of the replaced ones. Every process scores
    every batch (the validation windows are few)."""
    loss = nll = 0.0
    correct = count = disc_right = tokens = caught = replaced_total = 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        gen_logits, gen_loss, corrupted, replaced = model.corrupt(inputs, targets)
        logits = model.detect(corrupted)  # (B, T)
        loss += float(model.objective(gen_loss, logits, replaced))
        sums = chosen_token_sums(gen_logits, targets)
        nll, correct, count = nll + sums[0], correct + sums[1], count + sums[2]
        flagged, is_replaced = logits > 0, replaced.bool()
        disc_right += int((flagged == is_replaced).sum())
        tokens += replaced.numel()
        caught += int((flagged & is_replaced).sum())
        replaced_total += int(is_replaced.sum())
    return {"val_loss": loss / max(len(batches), 1), "val_gen_loss": nll / max(count, 1),
            "val_gen_accuracy": correct / max(count, 1), "val_disc_accuracy": disc_right / max(tokens, 1),
            "val_disc_recall": caught / max(replaced_total, 1)}


class MaskedLMTask(TaskBase):
    """Masked-token prediction on the token shards of ``cfg.data`` (see the module docstring)."""

    kind = "mlm"

    def __init__(self, cfg: RunConfig, device: torch.device):
        self.tc, self.mc = cfg.train, cfg.mlm
        self.train_data, self.val_data, self.tokenizer = load_shards(cfg)
        self.masker = Masker(self.tokenizer, self.mc.mask_prob, self.mc.whole_word)  # adds [MASK] if missing
        self.block = cfg.model.block_size
        encoder = build_model(fit_model_config(cfg.model, self.tokenizer))
        if self.mc.objective == "electra":
            head = ReplacedTokenConfig(generator_layers=self.mc.generator_layers, disc_weight=self.mc.disc_weight)
            self.model = ReplacedTokenDetector(encoder, head).to(device)
        else:
            self.model = MaskedLM(encoder).to(device)
        self.model.scored_fraction = self.mc.mask_prob
        # the MLM loss never reaches the pooler (BERT trained it with next-sentence prediction): frozen, so
        # that DDP waits for no gradient of it; it is saved as initialised, and fine-tuning trains it
        self.model.backbone.pooler.requires_grad_(False)
        self._val: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def steps_per_epoch(self) -> int:
        return max(1, self.train_data.tokens // (self.tc.batch_size * self.tc.grad_accum * self.block))

    def step_batches(self, step: int) -> list[Batch]:
        """grad_accum micro-batches of batch_size masked windows; each counts its chosen tokens."""
        tc, rows = self.tc, self.tc.batch_size * self.tc.grad_accum
        if tc.batching == "random":
            x, _ = train_batch(self.train_data, rows, self.block, tc.seed, step)
        else:
            x, _, _ = sequential_batch(self.train_data, rows, self.block, step)
        inputs, targets = self.masker(x, np.random.default_rng([tc.seed, step, _MASK_STREAM]))
        batches = []
        for i in range(0, rows, tc.batch_size):
            x, y = inputs[i:i + tc.batch_size], targets[i:i + tc.batch_size]
            per_row = (y != IGNORE_INDEX).sum(1)  # (rows,)
            batches.append(Batch({"x": x, "y": y}, units=int(per_row.sum()), tokens=x.numel(), row_units=per_row))
        return batches

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch.tensors["x"], batch.tensors["y"])[1]

    def evaluate(self, model: nn.Module, device: torch.device, precision: str) -> dict[str, float]:
        """Masked-token loss and accuracy on fixed validation windows, masked the same way every time
        (electra: the whole objective, the generator's masked-token figures and the discriminator's accuracy)."""
        if isinstance(model, ReplacedTokenDetector):
            return replaced_token_metrics(model, self._val_batches(), device)
        nll, correct, count = masked_lm_totals(model, self._val_batches(), device)
        return {"val_loss": nll / count, "val_accuracy": correct / count}

    def _val_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._val is None:
            tc = self.tc
            rng = np.random.default_rng([tc.seed, _EVAL_MASK_STREAM])
            windows = eval_batches(self.val_data, tc.eval_batch_size or tc.batch_size, self.block, tc.seed,
                                   tc.eval_batches)
            self._val = [self.masker(x, rng) for x, _ in windows]
        return self._val

    def checkpoint_info(self) -> dict:
        return {"mlm": {"mask_prob": self.mc.mask_prob, "whole_word": self.mc.whole_word, "objective": self.mc.objective}}

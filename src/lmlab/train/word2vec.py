"""Training word vectors (model.family word2vec) as a task of the one loop, the way word2vec.c and gensim do.

    lmlab data prepare wikitext-2/train.txt --val wikitext-2/valid.txt --kind word -o data/wt2-words
    lmlab train configs/word2vec_wikitext2.yaml

What the train split becomes, once, when the task starts:

    min_count   words seen fewer than ``word2vec.min_count`` times, and <unk>, are dropped from the text
                (the window then spans over them, as in word2vec.c); <eos> and special tokens end a
                sentence: no window crosses them
    noise       negatives are drawn from the counts of the kept words to the power 0.75

A step reads the next ``train.batch_size * train.grad_accum`` words of that stream (one micro-batch
per ``batch_size`` words; an epoch is one pass, its last step the last words in full, overlapping the step
before) and, with a generator seeded with (seed, step):

    subsampling   keeps a word of frequency f with probability (sqrt(f / t) + 1) * t / f, t = word2vec.sample
                  (word2vec.c's formula, also gensim's), so frequent words ("the", ",") are mostly skipped
    window        each kept word draws its window size b uniformly from 1..word2vec.window (word2vec.c's
                  "dynamic window", which weights near words more); its context is the b kept words each side
    rows          one row per centre word with its context words (skipgram learns a pair per context word,
                  cbow one per row)
    negatives     word2vec.negatives noise words per row, shared by its pairs (word2vec.c draws them per
                  pair; sharing gathers each output vector once per row, and scored as well in our runs)

All of it is vectorised numpy over the whole micro-batch (a grid of each word's 2 * window neighbours),
not a loop over words. Learning rate: word2vec.c and gensim decay it linearly to ~0 over the run
(train.lr_schedule linear, train.min_lr small). The loss unit is a pair (a context word and its centre;
for cbow a whole row); tokens/s counts words read, before subsampling, which is what gensim's words/s
counts too.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lmlab.config import RunConfig, Word2VecConfig
from lmlab.data.loader import TokenShards
from lmlab.data.tokenizer import EOS, UNK, Tokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.models.registry import build_model
from lmlab.train.lm import fit_model_config
from lmlab.train.loop import Batch, TaskBase

log = logging.getLogger(__name__)

NOISE_POWER = 0.75  # the unigram distribution's exponent for negatives (Mikolov et al. 2013)
_EVAL_STREAM = 2**31 - 4  # seed component of the validation rows


class Vocabulary:
    """What the training text says about each word id: its count, whether it is kept, its
    subsampling probability and the noise distribution (see the module docstring)."""

    def __init__(self, counts: np.ndarray, dropped: np.ndarray, cfg: Word2VecConfig):
        self.kept = (counts >= cfg.min_count) & ~dropped  # (V,)
        self.counts = np.where(self.kept, counts, 0).astype(np.float64)  # (V,)
        total = self.counts.sum()
        if total == 0:
            raise DataError(f"no word of the train split is seen word2vec.min_count={cfg.min_count} times; "
                            f"lower it or use more text")
        self.keep_prob = subsample_probability(self.counts / total, cfg.sample)  # (V,)
        noise = self.counts ** NOISE_POWER
        self.noise_keep, self.noise_alias = alias_table(noise / noise.sum())  # (V,), (V,)

    def negatives(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """Noise word ids of ``shape``, drawn from the unigram^0.75 distribution of the kept words: a uniform
        draw u in [0, V) picks the slot floor(u), whose own word is taken if the fraction of u falls below its
        share, its alias otherwise (Walker's alias method: one random number and two lookups per draw, ~10x
        faster than a binary search of the cumulative distribution)."""
        u = rng.random(shape) * len(self.noise_keep)
        slot = np.minimum(u.astype(np.int64), len(self.noise_keep) - 1)  # u * V may round up to V
        return np.where(u - slot < self.noise_keep[slot], slot, self.noise_alias[slot])


def alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias table of a distribution ``p`` over V outcomes (Vose's construction): (keep (V,), alias
    (V,)) such that drawing a slot uniformly and then keeping it with probability keep[slot], or else taking
    alias[slot], draws i with probability p[i]. Each slot holds its own share p[i] * V (when below 1) and is
    topped up by one outcome of a larger share; outcomes of probability 0 are never drawn."""
    scaled = p * len(p)  # (V,) each outcome's share in slots: mean 1
    keep, alias = np.ones(len(p)), np.arange(len(p))
    small = [int(i) for i in np.flatnonzero(scaled < 1.0)]
    large = [int(i) for i in np.flatnonzero(scaled >= 1.0)]
    while small and large:
        s, big = small.pop(), large[-1]
        keep[s], alias[s] = scaled[s], big  # slot s: its own share, the rest goes to `big`
        scaled[big] -= 1.0 - scaled[s]
        if scaled[big] < 1.0:
            small.append(large.pop())
    for s in small:  # rounding left shares of ~1 without a partner; a zero share must still never be drawn
        keep[s], alias[s] = (1.0, s) if scaled[s] > 0 else (0.0, int(np.argmax(p)))
    return keep, alias


def subsample_probability(freq: np.ndarray, sample: float) -> np.ndarray:
    """The probability of keeping each word of relative frequency ``freq``: (sqrt(f/t) + 1) * t/f, capped
    at 1 (word2vec.c; gensim), so words rarer than about t are always kept; ``sample`` t = 0 keeps all."""
    if sample <= 0:
        return np.ones_like(freq)
    with np.errstate(divide="ignore"):
        ratio = np.where(freq > 0, sample / np.where(freq > 0, freq, 1.0), np.inf)
    return np.minimum(1.0, (np.sqrt(1.0 / ratio) + 1.0) * ratio)


def sentence_stream(ids: np.ndarray, kept: np.ndarray, boundary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kept words of token ids (n,) and the sentence each belongs to (a boundary token starts the next
    sentence); boundaries and dropped words leave the stream."""
    sentence = np.cumsum(boundary[ids], dtype=np.int64)  # (n,)
    keep = kept[ids]
    return ids[keep].astype(np.int64), sentence[keep]


def window_rows(words: np.ndarray, sentence: np.ndarray, window: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(contexts (N, 2 * window), mask (N, 2 * window), centres (N,)) for every word with at least one
    context word in its dynamic window (size drawn from 1..window) inside its sentence: the rows of both
    modes (skipgram learns a pair per real context word, cbow one per row)."""
    n = len(words)
    reach = rng.integers(1, window + 1, n)  # (n,)
    offsets = [o for o in range(-window, window + 1) if o != 0]
    positions = np.arange(n)[:, None] + np.array(offsets)[None, :]  # (n, 2W)
    inside = (positions >= 0) & (positions < n)
    positions = np.clip(positions, 0, n - 1)
    mask = inside & (np.abs(offsets)[None, :] <= reach[:, None]) & (sentence[positions] == sentence[:, None])
    rows = mask.any(1)
    return words[positions][rows], mask[rows], words[rows]


class Word2VecTask(TaskBase):
    """word2vec training on the word shards of ``cfg.data`` (see the module docstring)."""

    kind = "word2vec"

    def __init__(self, cfg: RunConfig, device: torch.device):
        self.tc, self.wc, self.mode = cfg.train, cfg.word2vec, cfg.model.w2v_mode
        data_dir = cfg.data.path
        if not data_dir:
            raise ConfigError("data.path is not set (the folder written by `lmlab data prepare --kind word`)")
        self.tokenizer = Tokenizer.load(Path(data_dir) / "tokenizer.json")
        model_cfg = fit_model_config(cfg.model, self.tokenizer)
        _check_optimizer(model_cfg.w2v_sparse, cfg.train)
        train = TokenShards(data_dir, cfg.data.train_split)
        ids = train.read(0, train.tokens)
        V = model_cfg.vocab_size
        if ids.size and ids.max() >= V:
            raise DataError(f"{data_dir}: token id {int(ids.max())} is outside the vocabulary of {V}")
        self.boundary, dropped = self._special_words(V)
        self.vocab = Vocabulary(np.bincount(ids, minlength=V), dropped | self.boundary, self.wc)
        self.words, self.sentence = sentence_stream(ids, self.vocab.kept, self.boundary)
        if not (self.sentence[1:] == self.sentence[:-1]).any():
            raise DataError(f"{data_dir}: no two of the {len(self.words)} words kept by word2vec.min_count share a "
                            f"sentence: word2vec learns from the words around a word; use more text or a lower min_count")
        log.info("word2vec: %d of %d words kept (%d distinct), %d sentences", len(self.words), train.tokens,
                 int(self.vocab.kept.sum()), len(np.unique(self.sentence)))
        self.val = TokenShards(data_dir, cfg.data.val_split) if _has_split(data_dir, cfg.data.val_split) else None
        self.model = build_model(model_cfg).to(device)

    def _special_words(self, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(V,) masks: the words that end a sentence (<eos>, special tokens such as end-of-text) and
        those dropped wherever they are (<unk>)."""
        boundary, dropped = np.zeros(vocab_size, dtype=bool), np.zeros(vocab_size, dtype=bool)
        boundary[[i for i in self.tokenizer.special_ids if i < vocab_size]] = True
        eos, unk = self.tokenizer.tk.token_to_id(EOS), self.tokenizer.tk.token_to_id(UNK)
        if eos is not None:
            boundary[eos] = True
        if unk is not None:
            dropped[unk] = True
        return boundary, dropped

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.words) / (self.tc.batch_size * self.tc.grad_accum)))

    def step_batches(self, step: int) -> list[Batch]:
        """One micro-batch per ``batch_size`` words of the step's stretch of the stream."""
        per_step = self.tc.batch_size * self.tc.grad_accum
        # the last step of an epoch reads the last per_step words, not a short tail (a word or two might
        # have no context word to learn from)
        start = min((step % self.steps_per_epoch()) * per_step, max(0, len(self.words) - per_step))
        rng = np.random.default_rng([self.tc.seed, step])
        batches = []
        for lo in range(start, min(start + per_step, len(self.words)), self.tc.batch_size):
            hi = min(lo + self.tc.batch_size, len(self.words))
            batches.append(self.rows(self.words[lo:hi], self.sentence[lo:hi], rng))
        return batches

    def rows(self, words: np.ndarray, sentence: np.ndarray, rng: np.random.Generator,
             subsample: bool = True) -> Batch:
        """The training rows of a stretch of the stream: subsampled, windowed, with negatives."""
        read = len(words)
        kept_words, kept_sentence = words, sentence
        if subsample:
            keep = rng.random(read) < self.vocab.keep_prob[words]
            kept_words, kept_sentence = words[keep], sentence[keep]
        inputs, mask, targets = window_rows(kept_words, kept_sentence, self.wc.window, rng)
        if len(targets) == 0 and subsample:  # all but one word of a short stretch skipped: learn from it whole
            return self.rows(words, sentence, rng, subsample=False)
        negatives = self.vocab.negatives((len(targets), self.wc.negatives), rng)  # shared by a row's pairs
        tensors = {"inputs": inputs, "input_mask": mask, "targets": targets, "negatives": negatives}
        tensors = {k: torch.from_numpy(v) for k, v in tensors.items()}
        if self.mode == "cbow":  # a pair per row
            return Batch(tensors, units=len(targets), tokens=read)
        pairs = tensors["input_mask"].sum(1)  # (N,) a skip-gram pair per real context word
        return Batch(tensors, units=int(pairs.sum()), tokens=read, row_units=pairs)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        t = batch.tensors
        return model(t["inputs"], t["targets"], t["negatives"], t.get("input_mask"))

    def evaluate(self, model: nn.Module, device: torch.device, precision: str) -> dict[str, float]:
        """The loss of fixed rows of the first val words (the same rows every time); {} without a val split."""
        if self.val is None:
            return {}
        n = min(self.val.tokens, self.tc.eval_batches * (self.tc.eval_batch_size or self.tc.batch_size))
        words, sentence = sentence_stream(self.val.read(0, n), self.vocab.kept, self.boundary)
        batch = self.rows(words, sentence, np.random.default_rng([self.tc.seed, _EVAL_STREAM]))
        if batch.units == 0:
            return {}
        return {"val_loss": float(self.loss(model, batch.to(device)))}

    def checkpoint_info(self) -> dict:
        kept = np.flatnonzero(self.vocab.kept)
        return {"word2vec": {"window": self.wc.window, "negatives": self.wc.negatives, "sample": self.wc.sample,
                             "min_count": self.wc.min_count, "words": int(len(kept)),
                             "trained_below": int(kept.max()) + 1}}


def _check_optimizer(sparse: bool, tc) -> None:
    """Sparse gradients need an optimizer that takes them and no clipping (which needs dense ones)."""
    if not sparse:
        return
    if tc.optimizer == "adamw":
        raise ConfigError("model.w2v_sparse gives sparse gradients, which adamw cannot take; set "
                          "train.optimizer=sparse_adam (or sgd), or model.w2v_sparse=false")
    if tc.grad_clip > 0:
        raise ConfigError("model.w2v_sparse gives sparse gradients, which clipping cannot take; set train.grad_clip=0")
    if tc.optimizer == "sgd" and (tc.weight_decay > 0 or tc.momentum > 0):
        raise ConfigError("sgd on sparse gradients (model.w2v_sparse) takes no train.weight_decay or train.momentum; "
                          "set both to 0")


def _has_split(data_dir: str, split: str) -> bool:
    """Whether the prepared folder has split ``split``."""
    try:
        TokenShards(data_dir, split)
    except DataError:
        return False
    return True

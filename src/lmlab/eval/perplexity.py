"""Sliding-window perplexity and bits per byte of a language model on a text.

The text (documents joined by the end-of-text token, one in front as the start) is cut into windows
of the model's context that start ``stride`` tokens apart. Each token is scored once, in the first
window that covers it, with as much left context as the window gives it; so stride = context is
fastest and stride = 1 gives every token the full context.

Bits per byte = total NLL / ln 2 / UTF-8 bytes of the text: unlike perplexity, it compares models
with different tokenizers.

A masked language model (an encoder with its MLM head, train/mlm.py) predicts no next token; it is
scored on consecutive windows of its context, masked as BERT pretrains (15% of the tokens, 80/10/10,
whatever mlm settings it was trained with) by a generator with a fixed seed: the mean cross-entropy of the masked tokens, its exp (a
"pseudo" perplexity of that one masking, not Salazar et al.'s token-by-token pseudo-log-likelihood) and
the share of masked tokens predicted exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lmlab.config import Count, Precision, check_argument
from lmlab.data.sources import iter_documents
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import DataError, LmlabError
from lmlab.models.encoder import MaskedLM, ReplacedTokenDetector
from lmlab.models.interface import IGNORE_INDEX, width_of
from lmlab.progress import progress_bar
from lmlab.runtime import autocast_context, resolve_precision
from lmlab.train.lm import PROGRESS_EVERY, stateful_nll
from lmlab.train.mlm import Masker, add_mask_token, mask_token_id, masked_lm_totals

MLM_EVAL_SEED = 0  # the masking of a masked language model's evaluation


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of every window: tokens first_scored..end-1 are scored in it.

    Targets are positions 1..n_tokens-1 (position 0 is the start token and is never predicted).
    """
    spans, scored_until = [], 1
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + context + 1, n_tokens)  # a window of `context` inputs predicts up to `end`
        spans.append((begin, end, scored_until))
        scored_until = end
        begin += stride
    return spans


@torch.no_grad()
def sliding_window_nll(model: nn.Module, ids: np.ndarray | list[int], stride: int, batch_size: int = 8,
                       progress: bool = False) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of ids[1:] given what precedes, and the count of scored tokens.

    A model without a context limit (``context_length`` None: recurrent models) reads the text once,
    carrying its state from chunk to chunk, so every token sees the whole history; stride is unused.
    """
    context = model.context_length
    if context is None:
        return stateful_nll(model, ids, progress=progress)
    if not 1 <= stride <= context:
        raise LmlabError(f"stride must be between 1 and the context length {context}, got {stride}")
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    if len(ids) < 2:
        raise DataError("the text has no tokens to score")
    device = next(model.parameters()).device
    spans = windows(len(ids), context, stride)
    total, count = 0.0, 0
    starts = range(0, len(spans), batch_size)
    with progress_bar(len(starts), unit="batch", desc="perplexity", enabled=progress, every=PROGRESS_EVERY) as bar:
        for i in starts:
            batch_total, batch_count = _window_batch_nll(model, ids, spans[i:i + batch_size], device)
            total, count = total + batch_total, count + batch_count
            bar.update(1)
    return total, count


def _window_batch_nll(model: nn.Module, ids: torch.Tensor, group: list[tuple[int, int, int]],
                      device: torch.device) -> tuple[float, int]:
    """Summed NLL and scored-token count of one batch of windows (each row padded to the widest)."""
    width = max(end - begin - 1 for begin, end, _ in group)
    x = torch.zeros(len(group), width, dtype=torch.long)
    y = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)  # not scored
    for row, (begin, end, first) in enumerate(group):
        n = end - begin - 1
        x[row, :n] = ids[begin:end - 1]
        y[row, first - begin - 1:n] = ids[first:end]
    logits, _ = model(x.to(device))
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(),
                                            ignore_index=IGNORE_INDEX, reduction="sum")
    return nll.item(), int((y != IGNORE_INDEX).sum())


def text_token_ids(tokenizer: Tokenizer, inputs: list[str], field: str = "text") -> tuple[np.ndarray, int]:
    """Token ids of the documents of ``inputs``, each preceded by end-of-text, and their UTF-8 byte count."""
    ids, n_bytes, continued = [], 0, False
    for doc in iter_documents(inputs, field=field):
        if doc.text and not continued:
            ids.append(tokenizer.eot_id)
        continued = doc.continues  # the next piece belongs to the same (large) document
        ids.extend(tokenizer.encode(doc.text, allow_special=False))
        n_bytes += len(doc.text.encode("utf-8"))
    if n_bytes == 0:
        raise DataError(f"no text to evaluate in {', '.join(inputs)}")
    return np.asarray(ids, dtype=np.int64), n_bytes


def perplexity_report(total_nll: float, count: int, n_bytes: int | None) -> dict:
    """Mean NLL, perplexity, bits per token and (when the byte count is known) bits per byte."""
    mean = total_nll / count
    report = {"tokens": count, "mean_nll": mean, "perplexity": math.exp(min(mean, 700)),
              "bits_per_token": mean / math.log(2)}
    if n_bytes:
        report["bytes"] = n_bytes
        report["bits_per_byte"] = total_nll / math.log(2) / n_bytes
    return report


@torch.no_grad()
def masked_lm_report(model: MaskedLM, tokenizer: Tokenizer, ids: np.ndarray, batch_size: int = 8,
                     seed: int = MLM_EVAL_SEED, progress: bool = False) -> dict:
    """Masked-token loss, its exp and accuracy of a masked language model on token ids: consecutive
    windows of its context, BERT-masked (15%, 80/10/10) by a generator seeded with ``seed``."""
    if mask_token_id(tokenizer) is None:
        raise DataError("the tokenizer has no mask token ([MASK] or <mask>)")
    context = model.context_length
    n_full = len(ids) // context
    rows = torch.as_tensor(np.asarray(ids[:n_full * context], dtype=np.int64)).view(n_full, context)  # (N, context)
    groups = [rows[i:i + batch_size] for i in range(0, n_full, batch_size)]
    if len(ids) % context:
        groups.append(torch.as_tensor(np.asarray(ids[n_full * context:], dtype=np.int64)).unsqueeze(0))
    masker, rng = Masker(tokenizer), np.random.default_rng(seed)
    batches = [masker(x, rng) for x in groups]
    nll, correct, count = masked_lm_totals(model, batches, next(model.parameters()).device, progress)
    if count == 0:
        raise DataError("the text has no tokens to mask")
    loss = nll / count
    return {"tokens": len(ids), "masked_tokens": count, "masked_loss": loss,
            "pseudo_perplexity": math.exp(min(loss, 700)), "accuracy": correct / count,
            "masking": f"{masker.mask_prob:.0%} of the tokens (80% [MASK], 10% random, 10% kept), seed {seed}; "
                       f"pseudo_perplexity = exp(masked_loss)",
            "context": context}


def evaluate_perplexity(model: nn.Module, tokenizer: Tokenizer, data: str | list[str], stride: int | None = None,
                        split: str | None = None, field: str = "text", batch_size: int = 8, progress: bool = True,
                        precision: str = "auto") -> dict:
    """Perplexity of ``model`` on text files/dirs/globs, or on a split of a prepared data folder; of a
    masked language model, its masked-token figures instead (``masked_lm_report``; of an ELECTRA pretrainer,
    its generator's).

    ``stride`` None means the model's context; ``batch_size`` windows go through the model at once;
    ``precision`` is train.precision's choice for the forward passes (auto: as training would choose).
    """
    check_argument("batch_size", batch_size, Count)
    check_argument("precision", precision, Precision)
    if isinstance(model, ReplacedTokenDetector):  # ELECTRA: the generator is its masked language model
        model = model.generator
    masked = isinstance(model, MaskedLM)
    if masked and stride is not None:
        raise LmlabError("stride does not apply to a masked language model (it reads consecutive windows)")
    if model.context_length is None and stride is not None:
        raise LmlabError("stride does not apply to a recurrent model (it reads the text once, carrying its state)")
    stride = model.context_length if check_argument("stride", stride, Count | None) is None else stride
    inputs = [data] if isinstance(data, str) else list(data)
    prepared = [p for p in inputs if (Path(p) / "meta.json").is_file()]
    if prepared and len(inputs) > 1:
        raise LmlabError(f"{prepared[0]} is a prepared data folder: give it alone (its --split is scored), not with "
                         f"other inputs")
    if prepared:
        ids, n_bytes = _prepared_ids(inputs[0], split or "val", tokenizer, masked)
    elif split is not None:
        raise LmlabError(f"--split picks a split of a prepared data folder; {', '.join(map(str, inputs))} is text, "
                         f"scored whole")
    else:
        ids, n_bytes = text_token_ids(tokenizer, inputs, field)
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device, width_of(model))
    with autocast_context(precision, device):
        if masked:
            return masked_lm_report(model, tokenizer, ids, batch_size, progress=progress)
        total, count = sliding_window_nll(model, ids, stride, batch_size, progress)
    return {**perplexity_report(total, count, n_bytes), "stride": stride if model.context_length else None,
            "context": model.context_length or "unlimited (recurrent state)"}


def _prepared_ids(data_dir: str, split: str, tokenizer: Tokenizer, masked: bool) -> tuple[np.ndarray, int | None]:
    """The token ids of a split of a prepared data folder, end-of-text in front, and its byte count; the
    folder's tokenizer must be the model's (with the [MASK] that masked-LM pretraining added, if it did)."""
    from lmlab.data.loader import TokenShards

    shards = TokenShards(data_dir, split)
    expected = shards.meta["tokenizer_sha256"]
    if masked:
        data_tokenizer = Tokenizer.load(data_dir)
        add_mask_token(data_tokenizer)
        expected = data_tokenizer.sha256()
    if expected != tokenizer.sha256():
        raise DataError(f"{data_dir} was prepared with another tokenizer than the checkpoint's")
    ids = np.concatenate([[tokenizer.eot_id], shards.read(0, shards.tokens)])
    return ids, shards.bytes

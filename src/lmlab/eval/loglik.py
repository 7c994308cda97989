"""The one scorer of text continuations for decoder language models (GPT presets, recurrent LMs):
what multiple-choice, last-word and classification-by-label-word tasks, and the lm-eval adapter, build on.

For a (context, continuation) pair it returns lm-evaluation-harness's ``(logprob, is_greedy)``: the
summed log-probability of the continuation's tokens after the context, and whether greedy decoding
from the context would produce exactly those tokens. Tokenization is the harness's: trailing spaces of
the context move to the continuation, then context + continuation is encoded whole and split where the
context's own encoding ends (so " Paris" after "Answer:" is scored as the model saw it in training);
an empty context is replaced by the end-of-text token. No other start token is added (as the harness's
``hf`` backend for GPT-2-like models).

Speed: requests are sorted by total length (longest first, so the first batch shows an out-of-memory
at once), padded on the right (causal models never read the padding that follows a token, so no mask is
needed and scores equal those of one request alone), and the choices of one context are kept in the
same batch: one forward per context + continuation, all of a question's in one call. A request longer
than the window keeps its last ``max_length + 1`` tokens (the context is cut on the left).

``score_rolling`` is the harness's ``loglikelihood_rolling``: the total log-probability of a whole text,
end-of-text in front, over windows of the model's context that score every token once; these are
perplexity.py's windows with stride = context, the last one given full left context, as the harness does.
"""

from __future__ import annotations

from itertools import groupby

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import DataError
from lmlab.eval.perplexity import windows

Request = tuple[list[int], list[int]]  # (context token ids, continuation token ids)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> Request:
    """Context and continuation token ids, split as lm-evaluation-harness splits them (see the module
    docstring): trailing whitespace of the context goes to the continuation; an empty context is the
    end-of-text token (or the continuation's own first token, if that is end-of-text). Special tokens
    written in the text are encoded as special tokens, as Hugging Face tokenizers (and so the harness) do."""
    return encode_pairs(tokenizer, [(context, continuation)])[0]


def encode_pairs(tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> list[Request]:
    """``encode_pair`` of many pairs, their texts encoded in parallel by the Rust library."""
    moved = []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())
        moved.append((context[:-spaces], context[-spaces:] + continuation) if spaces else (context, continuation))
    wholes = tokenizer.encode_batch([context + continuation for context, continuation in moved])
    contexts = tokenizer.encode_batch([context for context, _ in moved])
    requests = []
    for (context, _), whole, context_ids in zip(moved, wholes, contexts):
        if context:
            requests.append((whole[:len(context_ids)], whole[len(context_ids):]))
        elif whole and whole[0] == tokenizer.eot_id:  # the continuation starts with its own end-of-text
            requests.append((whole[:1], whole[1:]))
        else:
            requests.append(([tokenizer.eot_id], whole))
    return requests


def score_continuations(model: nn.Module, tokenizer: Tokenizer, pairs: list[tuple[str, str]], batch_size: int = 32,
                        max_length: int | None = None) -> list[tuple[float, bool]]:
    """(summed log-probability of the continuation, whether greedy decoding produces it) per (context,
    continuation) pair, in the order given. ``max_length`` (default: the model's context; none for a
    recurrent model) is the longest input; longer ones lose tokens on the left."""
    return score_requests(model, encode_pairs(tokenizer, pairs), batch_size, max_length)


def score_rolling(model: nn.Module, tokenizer: Tokenizer, texts: list[str], batch_size: int = 32) -> list[float]:
    """Total log-probability (nats) of each text, end-of-text in front, every token scored once over
    windows of the model's context (lm-evaluation-harness's ``loglikelihood_rolling``)."""
    requests, owners = [], []
    for i, text in enumerate(texts):
        ids = [tokenizer.eot_id, *tokenizer.encode(text)]
        for begin, end, first in rolling_windows(len(ids), model.context_length):
            requests.append((ids[begin:first], ids[first:end]))
            owners.append(i)
    totals = [0.0] * len(texts)
    for i, (logprob, _) in zip(owners, score_requests(model, requests, batch_size)):
        totals[i] += logprob
    return totals


def rolling_windows(n_tokens: int, context: int | None) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of the harness's rolling windows over n_tokens ids (position 0, the
    start token, never scored): perplexity.windows with stride = context, each window reaching back as
    far as the context allows (only the last, shorter one changes). One window without a context limit."""
    if n_tokens < 2:
        return []
    if context is None:
        return [(0, n_tokens, 1)]
    return [(max(0, end - 1 - context), end, first) for _, end, first in windows(n_tokens, context, context)]


@torch.no_grad()
def score_requests(model: nn.Module, requests: list[Request], batch_size: int = 32,
                   max_length: int | None = None) -> list[tuple[float, bool]]:
    """(logprob, is_greedy) of token-level requests (context ids, continuation ids), in the order given:
    the core of ``score_continuations`` and ``score_rolling``. Identical requests are computed once."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    max_length = max_length or model.context_length
    pieces, owners = [], []
    for i, (context, continuation) in enumerate(requests):
        if not continuation:
            raise DataError("a continuation encodes to no tokens; every choice must have text")
        if not context:
            raise DataError("a request has no context tokens (give the end-of-text token for none)")
        for piece in window_pieces(list(context), list(continuation), max_length):
            pieces.append(piece)
            owners.append(i)
    unique = list(dict.fromkeys(pieces))
    scores = dict(zip(unique, _score_unique(model, unique, batch_size, max_length)))
    totals = [(0.0, True)] * len(requests)
    for i, piece in zip(owners, pieces):
        logprob, greedy = scores[piece]
        totals[i] = (totals[i][0] + logprob, totals[i][1] and greedy)
    return totals


def window_pieces(context: list[int], continuation: list[int], max_length: int | None) -> list[tuple[tuple, tuple]]:
    """A request as what one forward pass scores: itself, or, when the continuation alone outgrows the
    window, consecutive pieces of at most ``max_length`` continuation tokens, each with the window's
    worth of left context (so every token is scored once; the harness would fail on such a request)."""
    if max_length is None or len(continuation) <= max_length:
        return [(tuple(context), tuple(continuation))]
    ids = context + continuation
    pieces = []
    for start in range(len(context), len(ids), max_length):
        end = min(start + max_length, len(ids))
        pieces.append((tuple(ids[max(0, end - max_length - 1):start]), tuple(ids[start:end])))
    return pieces


def _score_unique(model: nn.Module, requests: list[tuple[tuple, tuple]], batch_size: int,
                  max_length: int | None) -> list[tuple[float, bool]]:
    """Scores of distinct requests: grouped by context, groups sorted longest first, batches filled with
    whole groups where they fit (a group larger than a batch is split)."""
    order = sorted(range(len(requests)), key=lambda i: requests[i][0])
    groups = [list(g) for _, g in groupby(order, key=lambda i: requests[i][0])]
    groups.sort(key=lambda g: -max(len(requests[i][0]) + len(requests[i][1]) for i in g))
    batches: list[list[int]] = [[]]
    for group in groups:
        for start in range(0, len(group), batch_size):
            part = group[start:start + batch_size]
            if len(batches[-1]) + len(part) > batch_size:
                batches.append([])
            batches[-1].extend(part)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    device = next(model.parameters()).device
    for batch in batches:
        for i, score in zip(batch, _score_batch(model, [requests[i] for i in batch], max_length, device)):
            results[i] = score
    return results


def _score_batch(model: nn.Module, requests: list[tuple[tuple, tuple]], max_length: int | None,
                 device: torch.device) -> list[tuple[float, bool]]:
    """One forward over a batch of requests padded on the right: each row is (context + continuation)
    without its last token, cut on the left to max_length; the last len(continuation) logits score it."""
    inputs = []
    for context, continuation in requests:
        whole = [*context, *continuation]
        if max_length is not None:
            whole = whole[-(max_length + 1):]
        inputs.append(whole[:-1])
    width = max(len(x) for x in inputs)
    x = torch.zeros(len(inputs), width, dtype=torch.long)  # (B, T), right padding after each row
    for row, ids in enumerate(inputs):
        x[row, :len(ids)] = torch.tensor(ids)
    logits, _ = model(x.to(device))  # (B, T, vocab)
    out = []
    for row, (ids, (_, continuation)) in enumerate(zip(inputs, requests)):
        n = len(continuation)
        logprobs = F.log_softmax(logits[row, len(ids) - n:len(ids)].float(), dim=-1)  # (n, vocab)
        target = torch.tensor(continuation, device=logprobs.device)
        logprob = logprobs.gather(1, target[:, None]).sum().item()
        out.append((logprob, bool((logprobs.argmax(-1) == target).all())))
    return out

"""The one scorer of text continuations for decoder language models (GPT presets, recurrent LMs):
what multiple-choice, last-word and classification-by-label-word tasks, and the lm-eval adapter, build on.

For a (context, continuation) pair it returns lm-evaluation-harness's ``(logprob, is_greedy)``: the
summed log-probability of the continuation's tokens after the context, and whether greedy decoding
from the context would produce exactly those tokens. Tokenization is the harness's: trailing spaces of
the context move to the continuation, then context + continuation is encoded whole and split where the
context's own encoding ends (so " Paris" after "Answer:" is scored as the model saw it in training);
an empty context is replaced by the end-of-text token. No other start token is added (as the harness's
``hf`` backend for GPT-2-like models).

Speed: a request that fits the window whole shares its context's forward with the other continuations
of that context (all of a question's choices): the distinct contexts, longest first (so the first batch
shows an out-of-memory at once), are read ``batch_size`` at a time into a KV cache (or recurrent state)
without their last token; the cache rows are repeated for each continuation, and the continuations,
sorted by length, ``batch_size`` rows per forward, read [last context token, continuation but its last
token] on top. So a context is computed once, not once per choice, the padding is small, and the output
layer runs only where a continuation token is predicted; the scores equal those of one request read
alone. A request longer than the window keeps its last ``max_length + 1`` tokens (the context is cut on
the left, differently for each continuation): such requests are read whole, longest first, padded on the
right (causal models never read the padding that follows a token).

``score_rolling`` is the harness's ``loglikelihood_rolling``: the total log-probability of a whole text,
end-of-text in front, over windows of the model's context that score every token once; these are
perplexity.py's windows with stride = context, the last one given full left context, as the harness does.
"""

from __future__ import annotations

import copy

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
    """Scores of distinct requests (see the module docstring): those that fit the window through
    ``_score_shared``, ``batch_size`` distinct contexts at a time, longest first; those cut on the left
    through ``_score_whole``, ``batch_size`` at a time, longest first."""
    fits = [max_length is None or len(c) + len(x) <= max_length + 1 for c, x in requests]
    by_context: dict[tuple, list[int]] = {}
    for i, (context, _) in enumerate(requests):
        if fits[i]:
            by_context.setdefault(context, []).append(i)
    contexts = sorted(by_context, key=len, reverse=True)
    cut = sorted((i for i in range(len(requests)) if not fits[i]), key=lambda i: -len(requests[i][0] + requests[i][1]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    device = next(model.parameters()).device
    for start in range(0, len(contexts), batch_size):
        group = [i for context in contexts[start:start + batch_size] for i in by_context[context]]
        for i, score in zip(group, _score_shared(model, [requests[i] for i in group], batch_size, device)):
            results[i] = score
    for start in range(0, len(cut), batch_size):
        group = cut[start:start + batch_size]
        for i, score in zip(group, _score_whole(model, [requests[i] for i in group], max_length, device)):
            results[i] = score
    return results


def _score_shared(model: nn.Module, requests: list[tuple[tuple, tuple]], batch_size: int,
                  device: torch.device) -> list[tuple[float, bool]]:
    """Requests that fit the window, each distinct context read once: its tokens but the last go through the
    model into a cache (contexts padded on the left); then the continuations, shortest to longest,
    ``batch_size`` rows per forward, each row on a copy of its context's cache row, read [last context
    token, continuation but its last token] (padded on the right), which gives every logit that scores them."""
    contexts = list(dict.fromkeys(c for c, _ in requests))
    row_of = {c: g for g, c in enumerate(contexts)}
    width, steps = max(len(c) for c in contexts) - 1, max(len(x) for _, x in requests)
    prefix = torch.zeros(len(contexts), width, dtype=torch.long)  # (G, P), left padding
    prefix_mask = torch.zeros(len(contexts), width, dtype=torch.bool)
    for g, context in enumerate(contexts):
        if len(context) > 1:
            prefix[g, width - len(context) + 1:] = torch.tensor(context[:-1])
            prefix_mask[g, width - len(context) + 1:] = True
    cache = model.make_cache(len(contexts), width + steps)
    if width:
        model(prefix.to(device), cache=cache, only_last=True, attention_mask=prefix_mask.to(device))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    order = sorted(range(len(requests)), key=lambda r: len(requests[r][1]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rows = torch.tensor([row_of[requests[r][0]] for r in chunk])
        chunk_cache = copy.copy(cache)
        chunk_cache.select(rows.to(device))  # a new cache of these rows (repeats allowed); ``cache`` stays as is
        length = max(len(requests[r][1]) for r in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)  # (b, S), right padding
        mask = torch.zeros(len(chunk), length, dtype=torch.bool)
        for row, r in enumerate(chunk):
            context, continuation = requests[r]
            ids[row, :len(continuation)] = torch.tensor([context[-1], *continuation[:-1]])
            mask[row, :len(continuation)] = True
        attention_mask = torch.cat([prefix_mask[rows], mask], dim=1)  # (b, P + S)
        logits, _ = model(ids.to(device), cache=chunk_cache, attention_mask=attention_mask.to(device))  # (b, S, V)
        for row, r in enumerate(chunk):
            continuation = requests[r][1]
            out[r] = _continuation_score(logits[row, :len(continuation)], continuation)
    return out


def _score_whole(model: nn.Module, requests: list[tuple[tuple, tuple]], max_length: int | None,
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
    return [_continuation_score(logits[row, len(ids) - len(cont):len(ids)], cont)
            for row, (ids, (_, cont)) in enumerate(zip(inputs, requests))]


def _continuation_score(logits: torch.Tensor, continuation: tuple) -> tuple[float, bool]:
    """(summed log-probability, all greedy) of the continuation's tokens from their logits (n, vocab)."""
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (n, vocab)
    target = torch.tensor(continuation, device=logprobs.device)
    return logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())

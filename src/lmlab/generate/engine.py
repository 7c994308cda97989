"""The generation engine behind every front end (``generate``, ``chat``, the HTTP server, the page).

- ``BatchGeneration``: several prompts of different lengths at once, step by step. Prompts are
  padded on the left and an attention mask hides the padding (a row's positions count only its
  real tokens), so each row comes out as it would alone. One preallocated cache; rows that finish
  leave the batch (and give back the cache columns no remaining row needs), and new rows can join
  it between steps (continuous batching).
- ``TextGeneration`` / ``generate_texts`` / ``generate_text``: the same with text in and out:
  prompts encoded, output decoded as it streams (never splitting a character that spans several
  byte-level tokens), cut at stop strings.
- ``beam_search``: the highest-scoring continuation among ``num_beams`` kept at each step (``Beams``:
  one search's state, also driven by the encoder-decoders' batched beam search, generate/seq2seq.py).

Every decoder family makes its own cache (``model.make_cache``) and steps on it
(``model(idx, cache=cache)``), so the engine never asks which family it drives.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import LmlabError
from lmlab.generate.sampling import Sampler, SamplingParams


def fit_prompt(prompt_ids: list[int], context: int | None, max_new_tokens: int,
               truncate: bool = False) -> list[int]:
    """The prompt to generate from, or a clear error if it cannot fit the model's context.

    Without ``truncate`` a prompt must leave room for at least one new token (generation stops
    when the context is full). With ``truncate`` the oldest tokens are dropped so that the prompt
    plus ``max_new_tokens`` fits.
    """
    if not prompt_ids:
        raise LmlabError("the prompt is empty; give at least one token of text")
    if context is None:
        return prompt_ids
    if truncate:
        keep = context - max_new_tokens
        if keep < 1:
            raise LmlabError(f"max new tokens ({max_new_tokens}) must be below the model's context ({context}) "
                             f"to leave room for the prompt")
        return prompt_ids[-keep:]
    if len(prompt_ids) >= context:
        raise LmlabError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {context}; "
                         f"shorten the prompt or truncate it from the left (--truncate-prompt)")
    return prompt_ids


def new_token_limit(context: int | None, prompt_len: int, max_new_tokens: int) -> int:
    """Most tokens a prompt may get: max_new_tokens, or fewer if the context fills up first."""
    return max_new_tokens if context is None else min(max_new_tokens, context - prompt_len)


class BatchGeneration:
    """Generate continuations of token-id prompts together, each row with its own ``SamplingParams``.

    ``step()`` advances every running row by one token and returns the (row, token) pairs.
    ``add(prompt, params)`` queues another row at any time: at the next step it is prefilled and
    joins the running batch (continuous batching), its cache right-aligned with the others'.
    Iterating yields, per step, a list with the new token of each row (None for rows that produced
    none). ``finish_reason[row]`` becomes "stop" (a stop token, or ``finish(row)`` was called, e.g.
    for a stop string) or "length" (max new tokens, or the context is full); finished rows leave
    the batch. Row numbers are never reused; ``release(row)`` forgets a finished row's bookkeeping,
    so that a generation that runs for ever (a server's) holds only its live rows.
    ``use_cache=False`` recomputes every sequence at each step: slow, the reference the
    cache is tested against (it takes no rows once started).
    """

    def __init__(self, model: nn.Module, prompts: list[list[int]] = (), params: list[SamplingParams] = (),
                 use_cache: bool = True):
        if len(prompts) != len(params):
            raise ValueError("give one SamplingParams per prompt")
        self.model, self.use_cache = model, use_cache
        self.context = model.context_length
        self.device = next(model.parameters()).device
        # per row, by row number (kept until ``release``)
        self.prompts: dict[int, list[int]] = {}
        self.params: dict[int, SamplingParams] = {}
        self.limits: dict[int, int] = {}  # most tokens each row may add
        self.counts: dict[int, int] = {}  # tokens generated so far
        self.finish_reason: dict[int, str | None] = {}
        self.next_row = 0
        self.released: set[int] = set()  # finished rows to forget once they have left the batch
        self.waiting: list[int] = []  # rows added but not yet in the batch
        self.rows: list[int] = []  # the original row of each batch row
        self.cache = self.mask = self.ids = self.sampler = self.next_input = None
        self.padded = False  # whether some running row has padding (then the model needs the mask)
        self.started = False
        for prompt, p in zip(prompts, params):
            self.add(prompt, p)

    def add(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Queue a sequence; it joins the batch at the next step. Returns its row number."""
        params.validate()
        fit_prompt(prompt_ids, self.context, params.max_new_tokens)
        if self.started and not self.use_cache:
            raise ValueError("the recompute reference (use_cache=False) takes no rows once started")
        return self._queue(prompt_ids, params, new_token_limit(self.context, len(prompt_ids), params.max_new_tokens))

    def _queue(self, ids: list[int], params: SamplingParams, limit: int) -> int:
        """Register a new row of input ``ids`` (a prompt, or a source) that may generate ``limit`` tokens;
        it waits to join the batch at the next step. Returns its row number."""
        row, self.next_row = self.next_row, self.next_row + 1
        self.prompts[row] = list(ids)
        self.params[row] = params
        self.limits[row] = limit
        self.counts[row] = 0
        self.finish_reason[row] = None
        self.waiting.append(row)
        return row

    @property
    def active(self) -> int:
        """Unfinished rows, running or waiting to join."""
        return sum(self.finish_reason[r] is None for r in self.rows) + len(self.waiting)

    @property
    def width(self) -> int:
        """Positions the running batch holds per row (its cache and mask): the longest running sequence,
        plus room for the most tokens a row may still add; 0 when no row runs. Rows that leave give
        theirs back (``_compact``), so this stays bounded under any load."""
        return 0 if self.mask is None else self.mask.size(1)

    def finish(self, row: int, reason: str = "stop") -> None:
        """Stop generating for ``row`` (it leaves the batch at the next step)."""
        self.finish_reason[row] = reason
        if row in self.waiting:
            self.waiting.remove(row)

    def release(self, row: int) -> None:
        """Forget finished ``row`` (its prompt, params, counts and finish reason): a caller that has read
        what it needs releases each row, so memory does not grow with every row ever added."""
        if self.finish_reason[row] is None:
            raise ValueError(f"row {row} is still generating")
        self.released.add(row)
        self._forget_released()

    def _forget_released(self) -> None:
        """Drop the bookkeeping of released rows that are no longer in the batch."""
        running = set(self.rows)
        for row in [r for r in self.released if r not in running]:
            for table in (self.prompts, self.params, self.limits, self.counts, self.finish_reason):
                del table[row]
            self.released.discard(row)

    def __iter__(self) -> Iterator[list[int | None]]:
        while self.active:
            out: list[int | None] = [None] * self.next_row
            for row, token in self.step():
                out[row] = token
            yield out

    @torch.inference_mode()  # like no_grad, and cheaper per operation (no autograd bookkeeping at all)
    def step(self) -> list[tuple[int, int]]:
        """Advance every running row by one token (prefilling rows that join); returns (row, token) pairs."""
        self.started = True
        self._drop_finished()
        if not self.use_cache:
            logits = self._recompute()
        else:
            parts = [self._decode()] if self.rows else []
            if self.waiting:
                parts.append(self._join())
            if not parts:
                return []
            logits = torch.cat(parts) if len(parts) > 1 else parts[0]  # (b, V): running rows, then joining ones
        tokens = self.sampler.pick(logits)  # (b,)
        self.next_input = tokens[:, None]  # (b, 1)
        return self._record(tokens.tolist())

    def _decode(self) -> torch.Tensor:
        """Feed each running row its last token; logits (b, V) of the next."""
        length = self.cache.pos + 1
        logits, _ = self.model(self.next_input, cache=self.cache, only_last=True,
                               attention_mask=self.mask[:, :length] if self.padded else None)
        return logits[:, -1]

    def _join(self) -> torch.Tensor:
        """Prefill the waiting rows (one left-padded batch) and merge them into the running batch."""
        new, self.waiting = self.waiting, []
        ids, mask = self._left_padded([self.prompts[r] for r in new])
        length = ids.size(1)
        remaining = max(self.limits[r] - self.counts[r] for r in self.rows + new)
        capacity = length + remaining if not self.rows else length  # joined below into a larger cache
        cache = self.model.make_cache(len(new), capacity)
        padded = not bool(mask.all())
        logits, _ = self.model(ids, cache=cache, only_last=True, attention_mask=mask if padded else None)
        sampler = self._sampler_for(new)
        if not self.rows:
            self.cache, self.sampler, self.rows = cache, sampler, new
            self.mask, self.padded = _right_aligned(mask, length, length + remaining), padded
            return logits[:, -1]
        joined = max(self.cache.pos, length)
        self.mask = torch.cat([_right_aligned(self.mask[:, :self.cache.pos], joined, joined + remaining),
                               _right_aligned(mask, joined, joined + remaining)])
        self.cache = self.cache.join(cache, joined + remaining)
        self.padded = not bool(self.mask[:, :joined].all())
        self.sampler.extend(sampler)
        self.rows = self.rows + new
        return logits[:, -1]

    def _recompute(self) -> torch.Tensor:
        """The reference path: the whole of every sequence through the model, no cache."""
        if self.ids is None:
            self.rows, self.waiting = self.waiting, []
            self.ids, self.mask = self._left_padded([self.prompts[r] for r in self.rows])
            self.sampler = self._sampler_for(self.rows)
        else:
            self.ids = torch.cat([self.ids, self.next_input], dim=1)
            self.mask = F.pad(self.mask, (0, 1), value=True)
        padded = not bool(self.mask.all())
        logits, _ = self.model(self.ids, only_last=True, attention_mask=self.mask if padded else None)
        return logits[:, -1]

    def _sampler_for(self, rows: list[int]) -> Sampler:
        """A sampler for these rows, with their params and prompts (penalties look at the prompt)."""
        return Sampler([self.params[r] for r in rows], [self.prompts[r] for r in rows],
                       self.model.config.vocab_size, self.device)

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (b, T) padded on the left, and the mask (b, T) that is False on the padding."""
        longest = max(map(len, prompts))
        ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=self.device)
        mask = torch.ones(len(prompts), longest, dtype=torch.bool, device=self.device)
        for i, prompt in enumerate(prompts):
            ids[i, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, :longest - len(prompt)] = False
        return ids, mask

    def _record(self, tokens: list[int]) -> list[tuple[int, int]]:
        """Count each row's new token and mark rows that are done; (row, token) pairs."""
        out = []
        for row, token in zip(self.rows, tokens):
            if self.finish_reason[row] is not None:  # finished from outside during the last step
                continue
            out.append((row, token))
            self.counts[row] += 1
            if token in self.params[row].stop_tokens:
                self.finish_reason[row] = "stop"
            elif self.counts[row] >= self.limits[row]:
                self.finish_reason[row] = "length"
        return out

    def _drop_finished(self) -> None:
        """Rows that finished since the last step (a stop, a limit, or ``finish()``) leave every batched tensor."""
        keep = [j for j, row in enumerate(self.rows) if self.finish_reason[row] is None]
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.rows = [self.rows[j] for j in keep]
        self.next_input = self.next_input[index]
        self.sampler.select(index)
        if self.ids is not None:  # the recompute reference
            self.ids, self.mask = self.ids[index], self.mask[index]
        elif self.rows:
            self._compact(index)
        else:  # nobody left: the next rows to join start a new cache
            self.cache = self.mask = None
            self.padded = False
        self._forget_released()

    def _compact(self, index: torch.Tensor) -> None:
        """Keep the cache rows at ``index`` and drop the leading columns that are padding in all of them.

        Rows are right-aligned, so the cache is then as wide as the longest remaining sequence, plus room
        for the most tokens a row may still add: finished rows give their columns back, and under steady
        load the width stays bounded instead of growing with every step.
        """
        pos = self.cache.pos
        mask = self.mask[index, :pos]  # (b, pos)
        start = int(mask.any(dim=0).long().argmax())  # the first column some remaining row needs
        length = pos - start
        width = length + max(self.limits[r] - self.counts[r] for r in self.rows)
        self.cache.compact(index, start, width)
        self.mask = _right_aligned(mask[:, start:], length, width)  # (b, width)
        self.padded = not bool(self.mask[:, :length].all())


def _right_aligned(mask: torch.Tensor, end: int, width: int) -> torch.Tensor:
    """``mask`` (b, n) moved to end at column ``end``: False before it, True after it, ``width`` columns."""
    out = torch.ones(mask.size(0), width, dtype=torch.bool, device=mask.device)
    out[:, :end - mask.size(1)] = False
    out[:, end - mask.size(1):end] = mask
    return out


def generate_tokens(model: nn.Module, prompt_ids: list[int], params: SamplingParams,
                    use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time until a stop token, max_new_tokens, or the context is full.

    The stop token that ends generation is yielded too. (One prompt; see BatchGeneration for many.)
    """
    for step in BatchGeneration(model, [prompt_ids], [params], use_cache):
        yield step[0]


class TextStream:
    """One sequence's text as its tokens arrive: whole characters only, and cut before the first stop string.

    Text that might be the start of a stop string is held back until it is clear either way, so
    nothing after a stop string is ever emitted.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] = ()):
        self.decoder = tokenizer.stream_decoder()
        self.stop = list(stop)
        self.held = ""  # decoded text not yet emitted
        self.stopped = False  # a stop string was found

    def push(self, token_id: int) -> str:
        """Feed one token id; return the text that can be emitted now (maybe "")."""
        return self._emit(self.decoder.step(token_id), final=False)

    def close(self) -> str:
        """No more tokens: return whatever is still held back."""
        return self._emit(self.decoder.flush(), final=True)

    def _emit(self, piece: str, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped, self.held = True, ""
            return text[:min(found)]
        hold = 0 if final else self._partial_stop_suffix(text)
        self.held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest end of ``text`` that a stop string starts with."""
        longest = min(len(text), max((len(s) - 1 for s in self.stop), default=0))
        for n in range(longest, 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop):
                return n
        return 0


@dataclass
class Completion:
    """One finished generation: its text, its new token ids, why it stopped, and token counts."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop": a stop token or string; "length": max new tokens or the context
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _TextRow:
    stream: TextStream
    prompt_tokens: int
    on_text: Callable[[str], None] | None
    on_done: Callable[[Completion], None] | None
    cancelled: Callable[[], bool] | None
    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


class TextGeneration:
    """Text in, text out, over one BatchGeneration: prompts are encoded, each row's output is decoded
    as it streams (TextStream) and ends at end-of-text, a stop token or a stop string. Rows may be
    added while others run (``add``); ``step()`` advances them all by one token."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, truncate: bool = False):
        self.tokenizer, self.truncate = tokenizer, truncate
        self.generation = BatchGeneration(model)
        self.rows: dict[int, _TextRow] = {}

    def add(self, prompt: str | list[int], params: SamplingParams, on_text: Callable[[str], None] | None = None,
            on_done: Callable[[Completion], None] | None = None,
            cancelled: Callable[[], bool] | None = None) -> int:
        """Queue a prompt; ``on_text(piece)`` gets its text as it comes, ``on_done(completion)`` fires when it
        ends, and it stops with finish reason "cancelled" once ``cancelled()`` is true. Returns its row."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        ids = fit_prompt(ids, self.generation.context, params.max_new_tokens, self.truncate)
        params = dataclasses.replace(params, stop_tokens=list(dict.fromkeys([*params.stop_tokens,
                                                                             self.tokenizer.eot_id])))
        row = self.generation.add(ids, params)
        self.rows[row] = _TextRow(TextStream(self.tokenizer, params.stop), len(ids), on_text, on_done, cancelled)
        return row

    @property
    def active(self) -> int:
        """Rows running or waiting to join."""
        return self.generation.active

    def step(self) -> None:
        """Generate one more token for every running row; stream its text; finish rows that are done."""
        generation = self.generation
        for row, token in generation.step():
            text = self.rows[row]
            if token not in generation.params[row].stop_tokens:
                text.token_ids.append(token)
                self._emit(text, text.stream.push(token))
                if text.stream.stopped:
                    generation.finish(row)
            if text.cancelled is not None and generation.finish_reason[row] is None and text.cancelled():
                generation.finish(row, "cancelled")
            if generation.finish_reason[row] is not None:
                self._emit(text, text.stream.close())
                completion = Completion("".join(text.pieces), text.token_ids, generation.finish_reason[row],
                                        text.prompt_tokens, generation.counts[row])
                del self.rows[row]  # delivered: nothing of a finished row stays behind
                generation.release(row)
                if text.on_done is not None:
                    text.on_done(completion)

    @staticmethod
    def _emit(text: _TextRow, piece: str) -> None:
        if piece:
            text.pieces.append(piece)
            if text.on_text is not None:
                text.on_text(piece)


def generate_texts(model: nn.Module, tokenizer: Tokenizer, prompts: list[str | list[int]],
                   params: list[SamplingParams], on_text: Callable[[int, str], None] | None = None,
                   on_done: Callable[[int, Completion], None] | None = None, truncate: bool = False,
                   ) -> list[Completion]:
    """Continue several prompts (text or token ids) in one batch; returns a Completion per prompt.

    ``on_text(row, piece)`` receives each row's text as it is produced and ``on_done(row, completion)``
    fires as soon as a row finishes. End-of-text, ``params.stop_tokens`` and ``params.stop`` strings
    end a row and are not part of its text. ``truncate`` cuts prompts that do not fit from the left.
    """
    return complete_all(TextGeneration(model, tokenizer, truncate), prompts, params, on_text, on_done)


def complete_all(generation: TextGeneration, prompts: list, params: list[SamplingParams],
                 on_text: Callable[[int, str], None] | None = None,
                 on_done: Callable[[int, Completion], None] | None = None) -> list[Completion]:
    """Add every prompt (the i-th with ``params[i]``) to ``generation`` and run it until all are done; a
    Completion per prompt. ``on_text(i, piece)`` streams the i-th row's text, ``on_done(i, completion)``
    fires when it ends. (The loop of ``generate_texts``, for any TextGeneration: seq2seq's too.)"""
    completions: list[Completion | None] = [None] * len(prompts)

    def done(i: int, completion: Completion) -> None:
        completions[i] = completion
        if on_done is not None:
            on_done(i, completion)

    for i, (prompt, p) in enumerate(zip(prompts, params)):
        generation.add(prompt, p, on_text=None if on_text is None else functools.partial(on_text, i),
                       on_done=functools.partial(done, i))
    while generation.active:
        generation.step()
    return completions


def generate_text(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[int], params: SamplingParams,
                  on_text: Callable[[str], None] | None = None, truncate: bool = False) -> str:
    """Generate a continuation of one prompt; ``on_text`` receives the text as it is produced."""
    stream = (lambda _row, piece: on_text(piece)) if on_text is not None else None
    return generate_texts(model, tokenizer, [prompt], [params], on_text=stream, truncate=truncate)[0].text


class Beams:
    """The state of one beam search: the ``num_beams`` best open sequences and the best ended ones.

    A sequence's score is its total log-probability divided by length ** length_penalty (above 0
    favours longer answers). Sequences end at a stop token (kept in the output). ``done`` becomes true
    when no sequence is open, or ``num_beams`` have ended and no open one can still beat them.
    """

    def __init__(self, num_beams: int, stop_tokens: list[int] = (), length_penalty: float = 1.0):
        if num_beams < 1:
            raise LmlabError(f"num beams must be at least 1, got {num_beams}")
        self.num_beams, self.stop_tokens, self.length_penalty = num_beams, set(stop_tokens), length_penalty
        self.open: list[list[int]] = [[]]  # token lists of the open sequences
        self.scores: list[float] = [0.0]  # their total log-probabilities
        self.ended: list[tuple[float, list[int]]] = []  # (length-normalised score, tokens), best first
        self.done = False

    def normalised(self, score: float, length: int) -> float:
        """A sequence's score: total log-probability / length ** length_penalty."""
        return score / length ** self.length_penalty

    def advance(self, logprobs: torch.Tensor) -> list[int]:
        """Extend the open sequences by the best of their next tokens, given log-probabilities
        (len(open), V); returns, per new open sequence, the index of the open sequence it extends."""
        vocab = logprobs.size(-1)
        scores = torch.tensor(self.scores, device=logprobs.device)
        candidates = (scores[:, None] + logprobs.float()).flatten()  # (open * V,)
        top_scores, top_index = candidates.topk(min(2 * self.num_beams, candidates.numel()))
        next_open, next_scores, origin = [], [], []
        for score, index in zip(top_scores.tolist(), top_index.tolist()):
            beam, token = divmod(index, vocab)
            sequence = self.open[beam] + [token]
            if token in self.stop_tokens:
                self.ended.append((self.normalised(score, len(sequence)), sequence))
            else:
                next_open.append(sequence)
                next_scores.append(score)
                origin.append(beam)
            if len(next_open) == self.num_beams:
                break
        self.ended = sorted(self.ended, key=lambda e: e[0], reverse=True)[:self.num_beams]
        self.open, self.scores = next_open, next_scores
        self.done = not next_open or (len(self.ended) == self.num_beams and
                                      self.normalised(max(next_scores), len(next_open[0])) <= self.ended[-1][0])
        return origin

    def best(self) -> list[int]:
        """The highest-scoring sequence, ended or still open."""
        final = self.ended + [(self.normalised(s, len(b)), b) for s, b in zip(self.scores, self.open)]
        return max(final, key=lambda e: e[0])[1]


@torch.inference_mode()
def beam_search(model: nn.Module, prompt_ids: list[int], num_beams: int, max_new_tokens: int,
                stop_tokens: list[int] = (), length_penalty: float = 1.0) -> list[int]:
    """The most likely continuation found keeping the ``num_beams`` best partial sequences at each step.

    A sequence's score is its total log-probability divided by length ** length_penalty (above 0
    favours longer answers). Sequences end at a stop token (kept in the output) or after
    ``max_new_tokens``. Search stops early once ``num_beams`` sequences have ended and no open one
    can still beat them. ``num_beams=1`` is greedy decoding.
    """
    beams = Beams(num_beams, stop_tokens, length_penalty)
    context = model.context_length
    prompt_ids = fit_prompt(prompt_ids, context, max_new_tokens)
    limit = new_token_limit(context, len(prompt_ids), max_new_tokens)
    device = next(model.parameters()).device
    cache = model.make_cache(1, len(prompt_ids) + limit)
    logits, _ = model(torch.tensor([prompt_ids], device=device), cache=cache, only_last=True)
    for _ in range(limit):
        origin = beams.advance(logits[:, -1].float().log_softmax(dim=-1))  # from (open, V)
        if beams.done:
            break
        cache.select(torch.tensor(origin, device=device))
        logits, _ = model(torch.tensor([b[-1:] for b in beams.open], device=device), cache=cache, only_last=True)
    return beams.best()


def print_stream(text: str) -> None:
    """An ``on_text`` callback that writes to stdout immediately."""
    sys.stdout.write(text)
    sys.stdout.flush()

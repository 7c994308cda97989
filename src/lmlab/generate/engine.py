"""The generation engine behind every front end (``generate``, ``chat``, the HTTP server, the page).

- ``BatchGeneration``: several prompts of different lengths at once. Prompts are padded on the left
  and an attention mask hides the padding (a row's positions count only its real tokens), so each
  row comes out as it would alone. One preallocated cache; rows that finish leave the batch.
- ``generate_texts`` / ``generate_text``: the same with text in and out: prompts encoded, output
  decoded as it streams (never splitting a character that spans several byte-level tokens), cut
  at stop strings.
- ``beam_search``: the highest-scoring continuation among ``num_beams`` kept at each step.

Every decoder family makes its own cache (``model.make_cache``) and steps on it
(``model(idx, cache=cache)``), so the engine never asks which family it drives.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import LmlabError
from lmlab.generate.sampling import Sampler, SamplingParams


def fit_prompt(prompt_ids: list[int], block_size: int | None, max_new_tokens: int,
               truncate: bool = False) -> list[int]:
    """The prompt to generate from, or a clear error if it cannot fit the model's context.

    Without ``truncate`` a prompt must leave room for at least one new token (generation stops
    when the context is full). With ``truncate`` the oldest tokens are dropped so that the prompt
    plus ``max_new_tokens`` fits.
    """
    if not prompt_ids:
        raise LmlabError("the prompt is empty; give at least one token of text")
    if block_size is None:
        return prompt_ids
    if truncate:
        keep = block_size - max_new_tokens
        if keep < 1:
            raise LmlabError(f"max new tokens ({max_new_tokens}) must be below the model's context ({block_size}) "
                             f"to leave room for the prompt")
        return prompt_ids[-keep:]
    if len(prompt_ids) >= block_size:
        raise LmlabError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {block_size}; "
                         f"shorten the prompt or truncate it from the left (--truncate-prompt)")
    return prompt_ids


class BatchGeneration:
    """Generate continuations of several token-id prompts at once, each row with its own ``SamplingParams``.

    Iterating yields, per step, a list with the new token of each row (None once a row has
    finished). ``finish_reason[row]`` becomes "stop" (a stop token, or ``finish(row)`` was called,
    e.g. for a stop string) or "length" (max new tokens, or the context is full).
    ``use_cache=False`` recomputes every sequence at each step: slow, the reference the cache is
    tested against.
    """

    def __init__(self, model: nn.Module, prompts: list[list[int]], params: list[SamplingParams],
                 use_cache: bool = True):
        if len(prompts) != len(params) or not prompts:
            raise ValueError("give one SamplingParams per prompt, and at least one prompt")
        block_size = getattr(model, "block_size", None)
        for p, ids in zip(params, prompts):
            p.validate()
            fit_prompt(ids, block_size, p.max_new_tokens)
        self.model, self.prompts, self.params, self.use_cache = model, prompts, params, use_cache
        room = [p.max_new_tokens if block_size is None else min(p.max_new_tokens, block_size - len(ids))
                for p, ids in zip(params, prompts)]
        self.limits = room  # most tokens each row may add
        self.counts = [0] * len(prompts)  # tokens generated so far, per row
        self.finish_reason: list[str | None] = [None] * len(prompts)

    def finish(self, row: int, reason: str = "stop") -> None:
        """Stop generating for ``row`` (it leaves the batch at the next step)."""
        self.finish_reason[row] = reason

    @torch.inference_mode()  # like no_grad, and cheaper per operation (no autograd bookkeeping at all)
    def __iter__(self) -> Iterator[list[int | None]]:
        model, B = self.model, len(self.prompts)
        device = next(model.parameters()).device
        longest, steps = max(map(len, self.prompts)), max(self.limits)
        ids = torch.zeros(B, longest, dtype=torch.long, device=device)  # (B, T0), padded on the left
        mask = torch.ones(B, longest + steps, dtype=torch.bool, device=device)  # (B, T0 + steps): False = padding
        for row, prompt in enumerate(self.prompts):
            ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, :longest - len(prompt)] = False
        padded = not bool(mask.all())
        sampler = Sampler(self.params, self.prompts, model.config.vocab_size, device)
        cache = model.make_cache(B, longest + steps) if self.use_cache else None
        rows = list(range(B))  # the original row of each batch row (finished rows leave the batch)
        step_input, length = ids, longest
        for _ in range(steps):
            attention_mask = mask[:, :length] if padded else None
            logits, _ = model(step_input if self.use_cache else ids, cache=cache, only_last=True,
                              attention_mask=attention_mask)
            tokens = sampler.pick(logits[:, -1])  # (b,)
            yield self._record(rows, tokens.tolist())
            keep = [j for j, row in enumerate(rows) if self.finish_reason[row] is None]
            if not keep:
                return
            if len(keep) < len(rows):  # drop finished rows from every batched tensor
                index = torch.tensor(keep, device=device)
                rows, tokens, mask, ids = [rows[j] for j in keep], tokens[index], mask[index], ids[index]
                sampler.select(index)
                if cache is not None:
                    cache.select(index)
                padded = padded and not bool(mask.all())
            step_input = tokens[:, None]  # (b, 1)
            if cache is None:
                ids = torch.cat([ids, step_input], dim=1)
            length += 1

    def _record(self, rows: list[int], tokens: list[int]) -> list[int | None]:
        """Count each row's new token, mark rows that are done; the tokens by original row."""
        out: list[int | None] = [None] * len(self.prompts)
        for row, token in zip(rows, tokens):
            if self.finish_reason[row] is not None:  # finished from outside during the last step
                continue
            out[row] = token
            self.counts[row] += 1
            if token in self.params[row].stop_tokens:
                self.finish_reason[row] = "stop"
            elif self.counts[row] >= self.limits[row]:
                self.finish_reason[row] = "length"
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


def generate_texts(model: nn.Module, tokenizer: Tokenizer, prompts: list[str | list[int]],
                   params: list[SamplingParams], on_text: Callable[[int, str], None] | None = None,
                   on_done: Callable[[int, Completion], None] | None = None, truncate: bool = False,
                   cancelled: Callable[[int], bool] | None = None) -> list[Completion]:
    """Continue several prompts (text or token ids) in one batch; returns a Completion per prompt.

    ``on_text(row, piece)`` receives each row's text as it is produced and ``on_done(row, completion)``
    fires as soon as a row finishes. End-of-text, ``params.stop_tokens`` and ``params.stop`` strings
    end a row and are not part of its text. ``truncate`` cuts prompts that do not fit from the left.
    A row for which ``cancelled(row)`` turns true stops with finish reason "cancelled".
    """
    block_size = getattr(model, "block_size", None)
    ids = [fit_prompt(tokenizer.encode(p) if isinstance(p, str) else list(p), block_size, q.max_new_tokens, truncate)
           for p, q in zip(prompts, params)]
    params = [dataclasses.replace(q, stop_tokens=list(dict.fromkeys([*q.stop_tokens, tokenizer.eot_id])))
              for q in params]
    generation = BatchGeneration(model, ids, params)
    streams = [TextStream(tokenizer, q.stop) for q in params]
    texts: list[list[str]] = [[] for _ in ids]
    new_ids: list[list[int]] = [[] for _ in ids]
    done: list[Completion | None] = [None] * len(ids)

    def emit(row: int, piece: str) -> None:
        if piece:
            texts[row].append(piece)
            if on_text is not None:
                on_text(row, piece)

    for step in generation:
        for row, token in enumerate(step):
            if token is None:
                continue
            if token not in params[row].stop_tokens:
                new_ids[row].append(token)
                emit(row, streams[row].push(token))
                if streams[row].stopped:
                    generation.finish(row)
            if cancelled is not None and generation.finish_reason[row] is None and cancelled(row):
                generation.finish(row, "cancelled")
            if generation.finish_reason[row] is not None:
                emit(row, streams[row].close())
                done[row] = Completion("".join(texts[row]), new_ids[row], generation.finish_reason[row],
                                       len(ids[row]), generation.counts[row])
                if on_done is not None:
                    on_done(row, done[row])
    return done


def generate_text(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[int], params: SamplingParams,
                  on_text: Callable[[str], None] | None = None, truncate: bool = False) -> str:
    """Generate a continuation of one prompt; ``on_text`` receives the text as it is produced."""
    stream = (lambda _row, piece: on_text(piece)) if on_text is not None else None
    return generate_texts(model, tokenizer, [prompt], [params], on_text=stream, truncate=truncate)[0].text


@torch.inference_mode()
def beam_search(model: nn.Module, prompt_ids: list[int], num_beams: int, max_new_tokens: int,
                stop_tokens: list[int] = (), length_penalty: float = 1.0) -> list[int]:
    """The most likely continuation found keeping the ``num_beams`` best partial sequences at each step.

    A sequence's score is its total log-probability divided by length ** length_penalty (above 0
    favours longer answers). Sequences end at a stop token (kept in the output) or after
    ``max_new_tokens``. Search stops early once ``num_beams`` sequences have ended and no open one
    can still beat them. ``num_beams=1`` is greedy decoding.
    """
    if num_beams < 1:
        raise LmlabError(f"num beams must be at least 1, got {num_beams}")
    block_size = getattr(model, "block_size", None)
    prompt_ids = fit_prompt(prompt_ids, block_size, max_new_tokens)
    limit = max_new_tokens if block_size is None else min(max_new_tokens, block_size - len(prompt_ids))
    device = next(model.parameters()).device
    cache = model.make_cache(1, len(prompt_ids) + limit)
    logits, _ = model(torch.tensor([prompt_ids], device=device), cache=cache, only_last=True)
    beams, scores = [[]], torch.zeros(1, device=device)  # token lists and total log-probs of the open sequences
    ended: list[tuple[float, list[int]]] = []  # (length-normalised score, tokens), best first

    def normalised(score: float, length: int) -> float:
        return score / length ** length_penalty

    for _ in range(limit):
        logprobs = logits[:, -1].float().log_softmax(dim=-1)  # (beams, V)
        vocab = logprobs.size(-1)
        candidates = (scores[:, None] + logprobs).flatten()  # (beams * V,)
        top_scores, top_index = candidates.topk(min(2 * num_beams, candidates.numel()))
        next_beams, next_scores, origin = [], [], []
        for score, index in zip(top_scores.tolist(), top_index.tolist()):
            beam, token = divmod(index, vocab)
            sequence = beams[beam] + [token]
            if token in stop_tokens:
                ended.append((normalised(score, len(sequence)), sequence))
            else:
                next_beams.append(sequence)
                next_scores.append(score)
                origin.append(beam)
            if len(next_beams) == num_beams:
                break
        ended = sorted(ended, key=lambda e: e[0], reverse=True)[:num_beams]
        beams, scores = next_beams, torch.tensor(next_scores, device=device)
        if not beams or (len(ended) == num_beams and normalised(max(next_scores), len(beams[0])) <= ended[-1][0]):
            break
        cache.select(torch.tensor(origin, device=device))
        logits, _ = model(torch.tensor([b[-1:] for b in beams], device=device), cache=cache, only_last=True)
    ended += [(normalised(s, len(b)), b) for s, b in zip(scores.tolist(), beams)]
    return max(ended, key=lambda e: e[0])[1]


def print_stream(text: str) -> None:
    """An ``on_text`` callback that writes to stdout immediately."""
    sys.stdout.write(text)
    sys.stdout.flush()

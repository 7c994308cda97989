"""Generation from encoder-decoders (``model.family: seq2seq | rnn_seq2seq``): a target for each source.

- ``Seq2SeqGeneration``: the engine's ``BatchGeneration`` with an encoder in front. Several sources of
  different lengths at once (padded on the right, with a mask), each row with its own
  ``SamplingParams`` (greedy or sampled, seeds, max_new_tokens, stop tokens); every row starts from
  ``start_id`` and ends at ``end_id`` (the data path uses end-of-text for both); ``step()`` returns the
  (row, token) pairs for streaming; finished rows leave the batch (``cache.shrink``); new sources join
  a running batch at the next step (``add``: continuous batching, ``cache.join``).
- ``Seq2SeqTextGeneration`` / ``generate_target_texts``: text in and out, as the engine's
  ``TextGeneration`` / ``generate_texts`` (TextStream, stop strings, Completion).
- ``seq2seq_beam_search``: beam search with length penalty for several sources at once, their beams
  one batch (the engine's ``Beams``, one per source).

The source is encoded once per row; what the decoder reads of it (cross-attention keys and values)
is computed once, when its cache is made (models/seq2seq.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn as nn

from lmlab.data.pairs import clean_text
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import LmlabError
from lmlab.generate.engine import (BatchGeneration, Beams, Completion, TextGeneration, TextStream, _TextRow,
                                   complete_all, new_token_limit)
from lmlab.generate.sampling import Sampler, SamplingParams


def check_source(source_ids: list[int], context: int | None) -> None:
    """Refuse an empty source, or one longer than the model's positions, with a clear one-line error."""
    if not source_ids:
        raise LmlabError("the source is empty; give at least one token of text")
    if context is not None and len(source_ids) > context:
        raise LmlabError(f"the source has {len(source_ids)} tokens but the model takes at most {context} "
                         f"(its block_size); shorten it")


def fit_source(source_ids: list[int], context: int | None, truncate: bool = False) -> list[int]:
    """The source to encode: refused when empty or, without ``truncate``, longer than the model's positions
    (a one-line error naming --truncate-source); with ``truncate``, its first ``context`` tokens, as training
    cuts long sources."""
    if truncate and source_ids and context is not None and len(source_ids) > context:
        return source_ids[:context]
    if source_ids and context is not None and len(source_ids) > context:
        raise LmlabError(f"the source has {len(source_ids)} tokens but the model reads at most {context} (its "
                         f"block_size); shorten it or keep its first {context} tokens with --truncate-source")
    check_source(source_ids, context)
    return source_ids


def right_padded(sources: list[list[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (b, S) padded on the right (with 0) and the mask (b, S) that is False on the padding."""
    longest = max(map(len, sources))
    src = torch.zeros(len(sources), longest, dtype=torch.long, device=device)
    mask = torch.zeros(len(sources), longest, dtype=torch.bool, device=device)
    for i, ids in enumerate(sources):
        src[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, :len(ids)] = True
    return src, mask


class Seq2SeqGeneration(BatchGeneration):
    """Generate a target for each of several token-id sources together (see the module docstring).

    As ``BatchGeneration``: ``add(source, params)`` queues a row at any time and returns its number,
    ``step()`` advances every running row by one token, ``finish_reason[row]`` says why a row ended
    ("stop" or "length": max_new_tokens, or block_size target positions), ``release(row)`` forgets it.
    The token that ends a row (``end_id`` or a stop token) is returned too.
    """

    def __init__(self, model: nn.Module, start_id: int, end_id: int | None = None,
                 sources: list[list[int]] = (), params: list[SamplingParams] = ()):
        if len(sources) != len(params):
            raise ValueError("give one SamplingParams per source")
        self.start_id, self.end_id = start_id, end_id
        super().__init__(model)
        for source, p in zip(sources, params):
            self.add(source, p)

    def add(self, source_ids: list[int], params: SamplingParams) -> int:
        """Queue a source; it is encoded and joins the batch at the next step. Returns its row number."""
        params.validate()
        check_source(source_ids, self.context)
        if self.end_id is not None and self.end_id not in params.stop_tokens:
            params = dataclasses.replace(params, stop_tokens=[*params.stop_tokens, self.end_id])
        limit = new_token_limit(self.context, 0, params.max_new_tokens)  # the target's positions alone
        return self._queue(source_ids, params, limit)

    @property
    def width(self) -> int:
        """Target positions the running batch has used per row (its longest row's; 0 when no row runs)."""
        return 0 if self.cache is None else self.cache.pos

    def _decode(self) -> torch.Tensor:
        """Feed each running row its last token; logits (b, V) of the next."""
        return self.model.decode(self.next_input, self.cache)[:, -1]

    def _join(self) -> torch.Tensor:
        """Encode the waiting sources (one right-padded batch), feed them the start token, and merge
        their cache into the running batch's; logits (b, V) of their first token."""
        new, self.waiting = self.waiting, []
        src, mask = right_padded([self.prompts[r] for r in new], self.device)
        room = max(self.limits[r] - self.counts[r] for r in self.rows + new)  # tokens a row may still feed
        cache = self.model.make_cache(self.model.encode(src, mask), mask, room)
        start = torch.full((len(new), 1), self.start_id, dtype=torch.long, device=self.device)
        logits = self.model.decode(start, cache)[:, -1]  # (b, V)
        sampler = self._sampler_for(new)
        if not self.rows:
            self.cache, self.sampler, self.rows = cache, sampler, new
        else:
            self.cache = self.cache.join(cache, max(self.cache.pos, cache.pos) + room)
            self.sampler.extend(sampler)
            self.rows = self.rows + new
        return logits

    def _compact(self, index: torch.Tensor) -> None:
        """Keep the cache rows at ``index``; give back the positions and source columns no remaining row
        needs, so that under steady load the cache stays as wide as the rows that run."""
        self.cache.shrink(index, max(self.limits[r] - self.counts[r] for r in self.rows))

    def _sampler_for(self, rows: list[int]) -> Sampler:
        """A sampler for these rows; penalties look at the target's tokens only (none yet), not the source."""
        return Sampler([self.params[r] for r in rows], [[] for _ in rows], self.model.config.vocab_size, self.device)


def generate_targets(model: nn.Module, sources: list[list[int]], params: list[SamplingParams], start_id: int,
                     end_id: int | None = None, on_token: Callable[[int, int], None] | None = None
                     ) -> list[list[int]]:
    """The new token ids for each source (one batch), the token that ended a row included;
    ``on_token(row, token)`` receives each token as it is produced (streaming)."""
    generation = Seq2SeqGeneration(model, start_id, end_id, sources, params)
    out: list[list[int]] = [[] for _ in sources]
    while generation.active:
        for row, token in generation.step():
            out[row].append(token)
            if on_token is not None:
                on_token(row, token)
    return out


class Seq2SeqTextGeneration(TextGeneration):
    """Text in, text out, over one Seq2SeqGeneration: sources are encoded, each row's target is decoded
    as it streams (TextStream) and ends at ``end_id``, end-of-text, a stop token or a stop string. Rows
    may be added while others run (``add``); ``step()`` advances them all by one token.
    ``start_id`` and ``end_id`` default to the tokenizer's end-of-text (what the data path uses)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, start_id: int | None = None,
                 end_id: int | None = None):
        eot = tokenizer.eot_id
        self.tokenizer, self.truncate = tokenizer, False
        self.generation = Seq2SeqGeneration(model, eot if start_id is None else start_id,
                                            eot if end_id is None else end_id)
        self.rows: dict[int, _TextRow] = {}

    def add(self, source: str | list[int], params: SamplingParams, on_text: Callable[[str], None] | None = None,
            on_done: Callable[[Completion], None] | None = None,
            cancelled: Callable[[], bool] | None = None) -> int:
        """Queue a source (a text is read as the data path reads it: encode_sources); ``on_text(piece)``
        gets its target's text as it comes, ``on_done(completion)`` fires when it ends (``prompt_tokens``
        counts the source), and it stops with finish reason "cancelled" once ``cancelled()`` is true.
        Returns its row."""
        ids = encode_sources(self.tokenizer, [source])[0] if isinstance(source, str) else list(source)
        params = dataclasses.replace(params, stop_tokens=list(dict.fromkeys([*params.stop_tokens,
                                                                             self.tokenizer.eot_id])))
        row = self.generation.add(ids, params)
        self.rows[row] = _TextRow(TextStream(self.tokenizer, params.stop), len(ids), on_text, on_done, cancelled)
        return row


def generate_target_texts(model: nn.Module, tokenizer: Tokenizer, sources: list[str | list[int]],
                          params: list[SamplingParams], on_text: Callable[[int, str], None] | None = None,
                          on_done: Callable[[int, Completion], None] | None = None, start_id: int | None = None,
                          end_id: int | None = None) -> list[Completion]:
    """The target text of each source (text or token ids), one batch; a Completion per source.

    ``on_text(row, piece)`` streams each row's text and ``on_done(row, completion)`` fires as soon as a
    row finishes. The end token, end-of-text, ``params.stop_tokens`` and ``params.stop`` strings end a
    row and are not part of its text.
    """
    return complete_all(Seq2SeqTextGeneration(model, tokenizer, start_id, end_id), sources, params, on_text, on_done)


@torch.inference_mode()
def seq2seq_beam_search(model: nn.Module, sources: list[list[int]], num_beams: int, max_new_tokens: int,
                        start_id: int, end_id: int, length_penalty: float = 1.0) -> list[list[int]]:
    """The best target found for each source keeping its ``num_beams`` best partial targets at each step;
    all sources' beams decode as one batch.

    A target's score is its total log-probability / length ** length_penalty (above 0 favours longer
    ones); targets end at ``end_id`` (kept in the output) or after ``max_new_tokens`` (or block_size).
    A source's search stops once ``num_beams`` targets have ended and no open one can still beat them
    (its rows then leave the batch). ``num_beams=1`` is greedy decoding.
    """
    searches = [Beams(num_beams, [end_id], length_penalty) for _ in sources]
    for source in sources:
        check_source(source, model.context_length)
    if not sources:
        return []
    device = next(model.parameters()).device
    limit = new_token_limit(model.context_length, 0, max_new_tokens)
    src, mask = right_padded(sources, device)
    cache = model.make_cache(model.encode(src, mask), mask, limit)
    start = torch.full((len(sources), 1), start_id, dtype=torch.long, device=device)
    logprobs = model.decode(start, cache)[:, -1].float().log_softmax(dim=-1)  # (rows, V): one row per open target
    running = list(range(len(sources)))  # the searches with rows in the batch, in row order
    for step in range(limit):
        keep, last_tokens, still_running, row = [], [], [], 0
        for i in running:
            open_rows = len(searches[i].open)
            origin = searches[i].advance(logprobs[row:row + open_rows])
            if not searches[i].done:
                keep += [row + o for o in origin]
                last_tokens += [b[-1] for b in searches[i].open]
                still_running.append(i)
            row += open_rows
        running = still_running
        if not running or step == limit - 1:  # the last step's targets need no next token
            break
        cache.select(torch.tensor(keep, device=device))
        idx = torch.tensor(last_tokens, device=device)[:, None]  # (rows, 1)
        logprobs = model.decode(idx, cache)[:, -1].float().log_softmax(dim=-1)
    return [search.best() for search in searches]


def encode_sources(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of source texts, read as the data path reads them (clean_text; a literal end-of-text
    marker in the text is ordinary text)."""
    return tokenizer.encode_batch([clean_text(t) for t in texts], allow_special=False) if texts else []


def seq2seq_completions(model: nn.Module, tokenizer: Tokenizer, sources: list[list[int]],
                        params: list[SamplingParams], num_beams: int = 1, length_penalty: float = 1.0,
                        batch_size: int = 32, on_text: Callable[[int, str], None] | None = None,
                        on_done: Callable[[int, Completion], None] | None = None) -> list[Completion]:
    """The target of each token-id source, a Completion each, in order, at most ``batch_size`` sources
    decoding at once (for a file or a test set of any size).

    Sampling or greedy (``num_beams`` 1, each source with its ``params``): continuous batching, a new
    source joining as soon as another finishes. Beam search (``num_beams`` > 1; of the params it reads
    only max_new_tokens, the batch's largest): the sources in batches of ``batch_size``. Sources are
    taken shortest first, so that a batch holds sources of similar length (less padding); seeded rows
    come out the same in any batch.
    ``on_text(i, piece)`` streams source i's text (sampling only), ``on_done(i, completion)`` fires when
    it ends. Start and end are the tokenizer's end-of-text, as the data path makes targets.
    """
    if len(sources) != len(params):
        raise ValueError("give one SamplingParams per source")
    if batch_size < 1:
        raise LmlabError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    done: list[Completion | None] = [None] * len(sources)

    def finished(i: int, completion: Completion) -> None:
        done[i] = completion
        if on_done is not None:
            on_done(i, completion)

    if num_beams > 1:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            best = seq2seq_beam_search(model, [sources[i] for i in chunk], num_beams,
                                       max(params[i].max_new_tokens for i in chunk), tokenizer.eot_id,
                                       tokenizer.eot_id, length_penalty)
            for i, ids in zip(chunk, best):
                finished(i, _ended_completion(tokenizer, ids, len(sources[i])))
        return done
    generation = Seq2SeqTextGeneration(model, tokenizer)
    waiting = iter(order)
    while True:
        while generation.active < batch_size and (i := next(waiting, None)) is not None:
            generation.add(sources[i], params[i], on_text=None if on_text is None else functools.partial(on_text, i),
                           on_done=functools.partial(finished, i))
        if not generation.active:
            return done
        generation.step()


def _ended_completion(tokenizer: Tokenizer, ids: list[int], source_tokens: int) -> Completion:
    """A beam search's target as a Completion: "stop" when it ended at end-of-text (left out of the text)."""
    ended = bool(ids) and ids[-1] == tokenizer.eot_id
    tokens = ids[:-1] if ended else ids
    return Completion(tokenizer.decode(tokens), tokens, "stop" if ended else "length", source_tokens, len(ids))

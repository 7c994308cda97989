"""The request queue between the HTTP server and the generation engine.

Requests arrive on the server's event loop; the model runs in one worker thread, so the server
keeps answering (health checks, new requests, streaming) while the batch generates. Batching is
continuous: between two decoding steps the worker lets waiting requests join the running batch
(``engine.TextGeneration.add``) as long as it holds at most ``max_batch_size`` sequences, so a
new request starts at the next step instead of waiting for the batch to end, and finished rows
leave at once. Each sequence reports its text pieces and its end to its request through an
asyncio queue. For an encoder-decoder the batch is a ``Seq2SeqTextGeneration`` (same interface):
a sequence's prompt is its source.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import threading
from dataclasses import dataclass, field

import torch.nn as nn

from lmlab.data.tokenizer import Tokenizer
from lmlab.generate.engine import TextGeneration
from lmlab.generate.sampling import SamplingParams
from lmlab.generate.seq2seq import Seq2SeqTextGeneration
from lmlab.models.heads import is_encoder_decoder

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More sequences are waiting than the server accepts."""


@dataclass
class Sequence:
    """One sequence to generate (a request with n choices or several prompts has several)."""

    prompt_ids: list[int]
    params: SamplingParams
    index: int  # its choice index in the response
    events: asyncio.Queue = field(repr=False)  # ("text", index, piece) / ("done", index, Completion) / ("error", index, msg)
    loop: asyncio.AbstractEventLoop = field(repr=False)
    cancelled: bool = False  # set by the server when the client goes away or the request times out

    def send(self, *event) -> None:
        """Hand an event to the request's event loop (called from the worker thread). A loop that has
        closed (the server shutting down) has nobody left to listen: the sequence is cancelled."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # "Event loop is closed"
            self.cancelled = True


class Scheduler:
    """Queues requests and runs them in batches on a worker thread (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_batch_size: int, max_queue: int):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.waiting: collections.deque[list[Sequence]] = collections.deque()  # one entry per request
        self.lock = threading.Condition()
        self.running = 0  # sequences in the batch being generated
        self.width = 0  # positions per row of the batch's cache (engine.BatchGeneration.width)
        self.closed = False
        self.worker = threading.Thread(target=self._work, name="lmlab-generate", daemon=True)
        self.worker.start()

    @property
    def queued(self) -> int:
        """Sequences waiting for a batch."""
        return sum(len(r) for r in self.waiting)

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue one request's sequences; raises QueueFull if the queue has no room for them."""
        with self.lock:
            if self.queued + len(sequences) > self.max_queue:
                raise QueueFull(f"the server is busy ({self.queued} sequences waiting); try again shortly")
            self.waiting.append(sequences)
            self.lock.notify()

    def close(self) -> None:
        """Stop the worker after the current batch."""
        with self.lock:
            self.closed = True
            self.lock.notify()

    def _admit(self, running: int) -> list[Sequence] | None:
        """Wait while there is nothing to do; then take the waiting requests that fit beside ``running``
        sequences (a request larger than the batch still goes alone into an empty batch). None: closed."""
        with self.lock:
            while not self.waiting and not running and not self.closed:
                self.lock.wait()
            if self.closed:
                return None
            admitted: list[Sequence] = []
            while self.waiting and (running + len(admitted) + len(self.waiting[0]) <= self.max_batch_size
                                    or running + len(admitted) == 0):
                admitted.extend(self.waiting.popleft())
            return [s for s in admitted if not s.cancelled]

    def new_generation(self) -> TextGeneration:
        """An empty batch for the model: a decoder's TextGeneration, or an encoder-decoder's Seq2SeqTextGeneration."""
        kind = Seq2SeqTextGeneration if is_encoder_decoder(self.model) else TextGeneration
        return kind(self.model, self.tokenizer)

    def _work(self) -> None:
        generation = self.new_generation()
        members: dict[int, Sequence] = {}  # row of the generation -> its sequence
        while (admitted := self._admit(generation.active)) is not None:
            for s in admitted:
                self._join(generation, members, s)
            self.running = generation.active
            try:
                generation.step()
            except Exception as e:  # a failing batch must not take the server down: report it to its requests
                log.exception("generation failed; the batch's requests get an error")
                for row, s in members.items():
                    if generation.generation.finish_reason.get(row) is None:
                        s.send("error", s.index, f"generation failed: {type(e).__name__}: {e}")
                generation, members = self.new_generation(), {}
            if not generation.active:  # all done: start afresh (row numbers, cache)
                generation, members = self.new_generation(), {}
            members = {row: s for row, s in members.items() if row in generation.rows}  # finished ones go
            self.running, self.width = generation.active, generation.generation.width

    @staticmethod
    def _join(generation: TextGeneration, members: dict[int, Sequence], s: Sequence) -> None:
        """Add ``s`` to the batch; a sequence the engine refuses gets an error, and the others go on."""
        try:
            row = generation.add(s.prompt_ids, s.params, on_text=functools.partial(s.send, "text", s.index),
                                 on_done=functools.partial(s.send, "done", s.index), cancelled=lambda: s.cancelled)
        except Exception as e:
            log.exception("a sequence could not join the batch; its request gets an error")
            s.send("error", s.index, f"generation failed: {type(e).__name__}: {e}")
            return
        members[row] = s

"""The request queue between the HTTP server and the generation engine.

Requests arrive on the server's event loop; the model runs in one worker thread, so the server
keeps answering (health checks, new requests, streaming) while a batch generates. The worker
takes every waiting request that fits in ``max_batch_size`` sequences and generates them as one
batch (``engine.generate_texts``); requests that arrive meanwhile form the next batch. Each
sequence reports its text pieces and its end to its request through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field

import torch.nn as nn

from lmlab.data.tokenizer import Tokenizer
from lmlab.generate.engine import generate_texts
from lmlab.generate.sampling import SamplingParams


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
        """Hand an event to the request's event loop (called from the worker thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    """Queues requests and runs them in batches on a worker thread (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_batch_size: int, max_queue: int):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.waiting: collections.deque[list[Sequence]] = collections.deque()  # one entry per request
        self.lock = threading.Condition()
        self.running = 0  # sequences in the batch being generated
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

    def _next_batch(self) -> list[Sequence] | None:
        """Block until requests wait; take as many whole requests as fit in one batch (at least one)."""
        with self.lock:
            while not self.waiting and not self.closed:
                self.lock.wait()
            if self.closed:
                return None
            batch = list(self.waiting.popleft())
            while self.waiting and len(batch) + len(self.waiting[0]) <= self.max_batch_size:
                batch.extend(self.waiting.popleft())
            return [s for s in batch if not s.cancelled]

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            self.running = len(batch)
            try:
                generate_texts(self.model, self.tokenizer, [s.prompt_ids for s in batch], [s.params for s in batch],
                               on_text=lambda i, piece: batch[i].send("text", batch[i].index, piece),
                               on_done=lambda i, done: batch[i].send("done", batch[i].index, done),
                               cancelled=lambda i: batch[i].cancelled)
            except Exception as e:  # a failing batch must not take the server down: report it to its requests
                for s in batch:
                    s.send("error", s.index, f"generation failed: {type(e).__name__}: {e}")
            finally:
                self.running = 0


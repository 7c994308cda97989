"""Worker processes and threads for data preparation: ordered, memory-bounded maps over a stream of batches.

Why processes: the tokenizers library encodes a batch on several threads, but the work around it
(reading, NFC, PII redaction, the per-document filters, hashing, turning ids into arrays) is Python
and holds the GIL, so on a real corpus one process keeps little more than one core busy. Workers take whole batches (a
batch's texts in, its results out), and results come back in input order, so the output does not
depend on the number of workers. At most ``AHEAD`` batches per worker are in flight: memory stays
bounded whatever the corpus size.

Workers are started with "spawn" (a fresh interpreter): forking a process whose tokenizer threads
already ran is what the tokenizers library warns against.

Work that releases the GIL (the tokenizers library encodes a batch in Rust on all cores) needs no
processes: ``thread_map`` runs it on threads of this process, overlapped with the Python work between
batches (reading, hashing, writing), without the processes' start-up and the pickling of texts and ids.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

log = logging.getLogger(__name__)

T, R = TypeVar("T"), TypeVar("R")
AHEAD = 2  # batches in flight per worker
_STATE: dict = {}  # what a worker's initializer loaded (the tokenizer), read by the task functions


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Workers:
    """A pool of ``n`` processes started on first need; ``map`` runs a function over batches in it.

    ``init(*init_args)`` runs once in each worker (e.g. load the tokenizer into worker_state()).
    With n <= 1, or a stream of a single batch, everything runs in this process (no start-up cost).
    Use as a context manager: leaving it stops the processes.
    """

    def __init__(self, n: int, init: Callable | None = None, init_args: tuple = ()):
        self.n, self.init, self.init_args = max(1, n), init, init_args
        self.pool = None

    def map(self, fn: Callable[[T], R], batches: Iterable[T], local: Callable[[T], R] | None = None) -> Iterator[R]:
        """fn(batch) for every batch, in order. ``local`` (default fn) is what runs in this process
        when no worker is needed; it must give the same results."""
        local = local or fn
        it = iter(batches)
        first = next(it, _END)
        second = next(it, _END) if first is not _END else _END
        if first is _END:
            return
        if self.n == 1 or second is _END:
            yield local(first)
            if second is not _END:
                yield local(second)
                yield from map(local, it)
            return
        pool = self._start()
        pending: deque = deque()
        for batch in _chain(first, second, it):
            pending.append(pool.apply_async(fn, (batch,)))
            if len(pending) >= AHEAD * self.n:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def _start(self):
        if self.pool is None:
            log.info(f"starting {self.n} worker processes")
            self.pool = multiprocessing.get_context("spawn").Pool(self.n, self.init, self.init_args)
        return self.pool

    def close(self) -> None:
        """Stop the worker processes (if any started)."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def thread_map(fn: Callable[[T], R], batches: Iterable[T], threads: int = AHEAD) -> Iterator[R]:
    """fn(batch) for every batch, in order, on ``threads`` threads of this process, at most ``threads``
    batches ahead of the caller: for a ``fn`` that spends its time outside the GIL."""
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.submit(fn, batch))
            if len(pending) >= threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def worker_state() -> dict:
    """The dict a worker's initializer fills and its task functions read."""
    return _STATE


_END = object()


def _chain(first, second, rest: Iterator) -> Iterator:
    yield first
    yield second
    yield from rest

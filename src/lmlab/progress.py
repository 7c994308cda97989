"""Progress bars that suit where the output goes: a live bar on a terminal, plain lines in a log.

``progress_bar`` returns a tqdm bar (rate, ETA) when stderr is a terminal. Otherwise (output piped
to a file, a CI log, a notebook) a carriage-return bar would fill the log with thousands of
overwritten updates, so it returns a ``PlainBar``: the same small interface, writing one complete
line per ``set_postfix`` call (a training loop calls it once per logging interval)::

    step 120/2000 (6%), loss=3.21, tok_s=1,234, 0:00:42 elapsed, ETA 0:10:58

Every line goes through ``logging`` (logger ``lmlab.progress``, level INFO), so the command line's
``-q`` silences it, and a program that uses lmlab as a library sees progress only once it turns INFO
logging on. ``ConsoleHandler`` is the logging handler for a terminal: it prints records above a
live bar instead of through it. tqdm is imported only when a live bar is made, so that importing
this module (the command line does, to set up logging) stays cheap.
"""

from __future__ import annotations

import datetime
import functools
import logging
import sys
import time

logger = logging.getLogger(__name__)


def progress_bar(total: int | None = None, unit: str = "step", desc: str | None = None, enabled: bool = True,
                 initial: int = 0, every: float | None = None):
    """A progress bar over ``total`` units (``initial`` of them already done, as on a resumed run).

    A live tqdm bar when stderr is a terminal, else a ``PlainBar``; either has ``update(n)``,
    ``set_postfix(**values)``, ``write(message)`` and ``close()`` and is a context manager.
    ``enabled=False`` shows no progress, but ``write`` still logs its messages. A ``PlainBar`` writes
    a line per ``set_postfix``, and also on ``update`` once ``every`` seconds have passed since its
    last line (for loops that never call ``set_postfix``). Progress shows only while the
    ``lmlab.progress`` logger lets INFO through (the CLI's default; ``-q`` stops it).
    """
    shown = enabled and logger.isEnabledFor(logging.INFO)
    if shown and _stderr_is_terminal():
        return terminal_bar_class()(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True,
                                    mininterval=0.5, file=sys.stderr)
    return PlainBar(total, unit=unit, desc=desc, enabled=shown, initial=initial, every=every)


def _stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal (where a bar can redraw itself in place)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


@functools.cache
def terminal_bar_class() -> type:
    """``TerminalBar``: tqdm's live bar, except that ``write`` logs its message (so that ``-q`` and
    log handlers apply to it). Made on first use, which is when tqdm is imported."""
    from tqdm import tqdm

    class TerminalBar(tqdm):
        def write(self, message: str) -> None:  # tqdm's is a classmethod printing to stdout
            """Log ``message`` at INFO; ``ConsoleHandler`` prints it above the bar."""
            logger.info(message)

    return TerminalBar


class PlainBar:
    """The progress of a loop as whole log lines, never a carriage return (see the module docstring)."""

    def __init__(self, total: int | None = None, unit: str = "step", desc: str | None = None, enabled: bool = True,
                 initial: int = 0, every: float | None = None):
        self.total, self.unit, self.desc, self.enabled, self.every = total, unit, desc, enabled, every
        self.n = self.initial = initial
        self.started = self.last_line_at = time.monotonic()
        self.postfix: dict = {}
        self.n_at_last_line = initial

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done; writes a line if ``every`` seconds passed since the last one."""
        self.n += n
        if self.every is not None and time.monotonic() - self.last_line_at >= self.every:
            self._line()

    def set_postfix(self, **values) -> None:
        """Write one line: the count so far, these values (``loss=3.21``), elapsed time and ETA."""
        self.postfix = values
        self._line()

    def write(self, message: str) -> None:
        """Log a message of the loop (an evaluation result, a note) at INFO, even when disabled."""
        logger.info(message)

    def close(self) -> None:
        """Write a last line if the count moved since the previous one (where a loop stopped)."""
        if self.n != self.n_at_last_line:
            self._line()
        self.enabled = False  # nothing more after closing, as with tqdm

    def __enter__(self) -> "PlainBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def format_line(self) -> str:
        """The line as written: ``[desc: ]unit n/total (pct%), key=value..., elapsed[, ETA]``."""
        elapsed = time.monotonic() - self.started
        count = f"{self.unit} {self.n}"
        if self.total:
            count += f"/{self.total} ({100 * self.n / self.total:.0f}%)"
        parts = [count, *(f"{k}={v}" for k, v in self.postfix.items()), f"{_clock(elapsed)} elapsed"]
        done = self.n - self.initial
        if self.total and 0 < done and self.n < self.total:
            parts.append(f"ETA {_clock(elapsed / done * (self.total - self.n))}")
        line = ", ".join(parts)
        return f"{self.desc}: {line}" if self.desc else line

    def _line(self) -> None:
        """Log the current line (if enabled) and remember when and where it was written."""
        if self.enabled:
            logger.info(self.format_line())
        self.last_line_at, self.n_at_last_line = time.monotonic(), self.n


def _clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    return str(datetime.timedelta(seconds=int(seconds)))


class ConsoleHandler(logging.Handler):
    """A logging handler printing to stderr through ``tqdm.write``: above a live bar, not across it.

    The stream is looked up when a record is written, so a replaced ``sys.stderr`` (a test's capture,
    a redirect) receives the output.
    """

    def emit(self, record: logging.LogRecord) -> None:
        """Write the formatted record as one line (through tqdm only if it is loaded: else no bar is live)."""
        try:
            message = self.format(record)
            tqdm = sys.modules.get("tqdm")
            if tqdm is not None and hasattr(tqdm, "tqdm"):
                tqdm.tqdm.write(message, file=sys.stderr)
            else:
                sys.stderr.write(message + "\n")
                sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging's convention: report, never raise
            self.handleError(record)

"""Progress bars: a live tqdm bar on a terminal, whole log lines (never a carriage return) elsewhere."""

import io
import logging
import sys

import pytest
from tqdm import tqdm

from lmlab.progress import ConsoleHandler, PlainBar, progress_bar


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _no_cli_handler(monkeypatch):
    """Take away the handler an earlier ``main()`` in this process put on the lmlab logger."""
    monkeypatch.setattr(logging.getLogger("lmlab"), "handlers", [])


@pytest.fixture
def progress_log(caplog):
    """The messages of the lmlab.progress logger, with INFO let through (as the CLI does by default)."""
    caplog.set_level(logging.INFO, logger="lmlab.progress")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "lmlab.progress"]


def test_not_a_terminal_gives_one_plain_line_per_set_postfix(monkeypatch, progress_log):
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    handler = ConsoleHandler()  # as the CLI sets it up
    monkeypatch.setattr(logging.getLogger("lmlab.progress"), "handlers", [handler])
    with progress_bar(200, unit="step") as bar:
        assert isinstance(bar, PlainBar)
        for step in range(1, 201):
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{5 - step / 100:.2f}", tok_s=f"{1234:,}")
    lines = progress_log()
    assert len(lines) == 10  # closing after the last set_postfix adds nothing
    assert lines[0].startswith("step 20/200 (10%), loss=4.80, tok_s=1,234, 0:00:00 elapsed, ETA 0:00:")
    assert lines[-1] == "step 200/200 (100%), loss=3.00, tok_s=1,234, 0:00:00 elapsed"  # done: no ETA
    assert not any("\r" in line or "\n" in line for line in lines)
    assert stderr.getvalue() == "".join(line + "\n" for line in lines)  # exactly these lines reach stderr


def test_a_terminal_gets_a_tqdm_bar_whose_write_logs(monkeypatch, progress_log):
    monkeypatch.setattr("sys.stderr", Terminal())
    bar = progress_bar(10, unit="batch", desc="perplexity")
    assert isinstance(bar, tqdm)
    bar.update(3)
    bar.set_postfix(loss="1.00")
    bar.write("step 3: val loss 1.00")
    bar.close()
    assert progress_log() == ["step 3: val loss 1.00"]


def test_quiet_logging_shows_no_progress_even_on_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr", Terminal())
    caplog.set_level(logging.WARNING, logger="lmlab.progress")
    with progress_bar(10) as bar:
        assert not isinstance(bar, tqdm)
        bar.update(5)
        bar.set_postfix(loss="1.00")
        bar.write("a message")
    assert [r for r in caplog.records if r.name == "lmlab.progress"] == []


def test_disabled_bar_still_logs_its_messages(progress_log):
    with progress_bar(10, enabled=False) as bar:
        bar.update(5)
        bar.set_postfix(loss="1.00")
        bar.write("step 5: val loss 1.00")
    assert progress_log() == ["step 5: val loss 1.00"]


def test_resumed_bar_counts_from_initial_and_closing_writes_where_it_stopped(progress_log):
    bar = PlainBar(1000, unit="step", desc="train", initial=900)
    bar.started -= 100  # 100 s for the 50 steps of this run: 2 s a step, not 100 / 950
    bar.update(50)
    line = "train: step 950/1000 (95%), 0:01:40 elapsed, ETA 0:01:40"
    assert bar.format_line() == line
    bar.close()
    bar.set_postfix(loss="1")  # closed: nothing more
    assert progress_log() == [line]


def test_every_seconds_lines_for_loops_without_postfix(progress_log):
    with progress_bar(None, unit="chunk", every=0.0) as bar:  # every update is due; no total: no ETA
        bar.update(1)
        bar.update(2)
    assert progress_log() == ["chunk 1, 0:00:00 elapsed", "chunk 3, 0:00:00 elapsed"]


@pytest.mark.parametrize("tqdm_loaded", [True, False])
def test_console_handler_prints_to_the_current_stderr(capsys, monkeypatch, tqdm_loaded):
    if not tqdm_loaded:  # no bar can be live: it writes to stderr directly
        monkeypatch.delitem(sys.modules, "tqdm")
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log = logging.getLogger("lmlab.test_progress")
    log.addHandler(handler)
    try:
        log.warning("careful")
    finally:
        log.removeHandler(handler)
    assert capsys.readouterr().err == "WARNING: careful\n"

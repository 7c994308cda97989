"""The demo end to end on a small slice of the standard library and a few seconds of training."""

import logging

import pytest

from lmlab.demo import run_demo, stdlib_sources
from lmlab.errors import OutputError


def test_stdlib_corpus_has_no_tests_and_respects_the_cap():
    files = stdlib_sources(max_bytes=500_000)
    assert files and sum(f.stat().st_size for f in files) <= 500_000
    assert all("test" not in f.parts for f in files)


def test_demo_runs_end_to_end(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="lmlab.demo")
    result = run_demo(out_dir=str(tmp_path / "demo"), minutes=0.1, corpus_bytes=400_000)
    out = capsys.readouterr().out
    assert "[5/5]" in out and out.count("--- sample") == 3 and "def fibonacci(" in out
    assert "[1/5] corpus" in caplog.text and "[4/5] validation" in caplog.text  # status lines are logged
    assert "[1/5]" not in out  # not printed: the samples are the output
    assert result["perplexity"] > 1 and result["bits_per_byte"] > 0 and result["steps"] >= 1
    assert (tmp_path / "demo" / "run" / "plots" / "loss.png").is_file()
    assert (tmp_path / "demo" / "run" / "eval" / "results.json").is_file()
    with pytest.raises(OutputError, match="already holds a demo folder; pass --force"):
        run_demo(out_dir=str(tmp_path / "demo"))  # refused before any work

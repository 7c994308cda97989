"""The command line end to end: every verb on tiny data, and every bad input as a one-line error."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.cli import build_parser, main

from conftest import tiny_corpus


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, fragment):
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in err, err


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """tokenizer train -> data prepare -> train, all through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"body": d}) + "\n" for d in tiny_corpus(80)), encoding="utf-8")
    assert main(["tokenizer", "train", str(corpus), "--field", "body", "--kind", "bpe", "--vocab-size", "300",
                 "-o", str(root / "tok.json")]) == 0
    assert main(["data", "prepare", str(corpus), "--field", "body", "--tokenizer", str(root / "tok.json"),
                 "-o", str(root / "data"), "--val-fraction", "0.2"]) == 0
    config = root / "tiny.yaml"
    config.write_text(f"""
model: {{preset: llama, n_layer: 2, n_head: 2, n_kv_head: 1, d_model: 32, block_size: 32}}
data: {{path: {root / 'data'}}}
train: {{out_dir: {root / 'run'}, batch_size: 4, max_steps: 30, warmup_steps: 3, eval_interval: 15,
        eval_batches: 2, log_interval: 5, progress: false, lr: 0.003}}
""")
    assert main(["train", str(config), "train.max_steps=30"]) == 0
    return root


def test_generate_and_eval_from_the_cli(cli_run, capsys):
    code, out, _ = run(["generate", cli_run / "run", "--prompt", "the quick", "--max-new-tokens", "10",
                        "--seed", "1", "--no-stream"], capsys)
    assert code == 0 and out.startswith("the quick")
    code, again, _ = run(["generate", cli_run / "run", "--prompt", "the quick", "--max-new-tokens", "10",
                          "--seed", "1"], capsys)
    assert again == out  # streaming prints the same text; the seed makes it reproducible
    code, out, _ = run(["eval", "ppl", cli_run / "run", "--data", cli_run / "data", "--out", cli_run / "eval"], capsys)
    report = json.loads(out)
    assert code == 0 and report["perplexity"] > 1 and report["bits_per_byte"] > 0
    assert json.loads((cli_run / "eval" / "results.json").read_text())["tokens"] == report["tokens"]


def test_bad_inputs_are_one_line_errors(cli_run, tmp_path, capsys):
    binary = tmp_path / "x.txt"
    binary.write_bytes(b"abc\x00\x01\x02")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["data", "prepare", tmp_path / "missing.txt", "-o", tmp_path / "d1", "--kind", "char"], "missing.txt"),
        (["data", "prepare", empty, "-o", tmp_path / "d2", "--kind", "char"], "empty"),
        (["data", "prepare", binary, "-o", tmp_path / "d3", "--kind", "char"], "binary"),
        (["data", "prepare", latin1, "-o", tmp_path / "d4", "--kind", "char"], "UTF-8"),
        (["train", tmp_path / "nope.yaml"], "config file not found"),
        (["train", cli_run / "tiny.yaml", "model.n_layers=2"], "unknown config key"),
        (["train", cli_run / "tiny.yaml", "train.lr=fast"], "train.lr expects float"),
        (["train", cli_run / "tiny.yaml", f"train.out_dir={tmp_path / 'r'}", "model.block_size=100000"], "context"),
        (["generate", tmp_path, "--prompt", "x"], "not an lmlab checkpoint"),
        (["generate", cli_run / "run", "--prompt", "the quick brown fox " * 10], "context is 32"),
        (["eval", "ppl", cli_run / "run", "--data", empty], "no text"),
    ]
    for argv, fragment in cases:
        code, _, err = run(argv, capsys)
        assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d3").exists() and not (tmp_path / "r" / "checkpoints").exists()


def snapshot(*paths):
    """Every file under ``paths`` (or the file itself) with its bytes, and every folder: to compare."""
    found = {}
    for path in map(Path, paths):
        for p in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
            found[str(p)] = None if p.is_dir() else p.read_bytes()
    return found


def test_writing_verbs_refuse_to_lose_data(cli_run, tmp_path, capsys):
    """Every writing verb refuses, before any work, an output that is an input, a foreign folder, a
    file where a folder goes, a previous output without --force, or a place that cannot be written."""
    corpus, run_dir, data = cli_run / "corpus.jsonl", cli_run / "run", cli_run / "data"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "x").write_text("mine")
    a_file = tmp_path / "a.txt"
    a_file.write_text("keep me")
    ppl = ["eval", "ppl", run_dir, "--data", a_file, "--out"]
    classify = ["eval", "classify", run_dir, "--data", a_file, "--out"]
    cases = [
        (["tokenizer", "train", corpus, "-o", corpus, "--kind", "char"], "is also an input"),
        (["tokenizer", "train", a_file, "-o", cli_run / "tok.json", "--kind", "char"], "pass --force"),
        (["tokenizer", "train", corpus, "-o", data, "--kind", "char", "--force"], "which holds a prepared data"),
        (["data", "prepare", corpus, "-o", data, "--kind", "char"], "already holds a prepared data folder"),
        (["data", "prepare", corpus, "-o", mine, "--kind", "char", "--force"], "lmlab did not write"),
        (["data", "prepare", corpus, "-o", a_file, "--kind", "char"], "is a file, not a folder"),
        (["data", "prepare", corpus, "--tokenizer", mine / "x", "-o", mine, "--force"], "contains the input"),
        (["train", cli_run / "tiny.yaml", f"train.out_dir={mine}"], "lmlab did not write"),
        (["train", cli_run / "tiny.yaml", f"train.out_dir={mine}", "--force"], "lmlab did not write"),
        (["train", cli_run / "tiny.yaml", f"train.out_dir={data}"], "is also an input"),
        (["train", cli_run / "tiny.yaml"], "already holds a run; pass --resume to continue it, --force"),
        (["convert", run_dir, run_dir], "is also an input"),
        (["convert", run_dir, run_dir / "hf"], "is inside the input"),
        (["convert", run_dir, mine], "lmlab did not write"),
        (["convert", run_dir, a_file], "is a file, not a folder"),
        (["convert", run_dir, data, "--force"], "holds a prepared data folder; refusing"),
        ([*ppl, a_file], "is also an input"),
        ([*ppl, tmp_path / "b.txt"], "is a file, not a folder"),
        ([*ppl, "/proc/x"], "cannot write /proc/x"),
        ([*ppl, a_file / "sub"], "is inside the input"),
        ([*ppl, run_dir], "contains the input"),
        ([*ppl, mine, "--force"], "lmlab did not write"),
        ([*classify, tmp_path / "b.txt" / "sub"], "b.txt is a file, not a folder"),
        ([*classify, data / "eval"], "which holds a prepared data folder"),
        (["demo", "--out", mine, "--force"], "lmlab did not write"),
    ]
    (tmp_path / "b.txt").write_text("b")
    before = snapshot(cli_run, tmp_path)
    for argv, fragment in cases:
        code, out, err = run(argv, capsys)
        assert_one_line_error(code, err, fragment)
        assert not out
    assert snapshot(cli_run, tmp_path) == before  # nothing changed, nothing created, no temporaries


def test_force_replaces_a_previous_output_of_the_same_kind(cli_run, tmp_path, capsys):
    corpus = cli_run / "corpus.jsonl"
    tok = tmp_path / "tok.json"
    assert run(["tokenizer", "train", corpus, "--field", "body", "--kind", "char", "-o", tok], capsys)[0] == 0
    char = tok.read_text()
    assert run(["tokenizer", "train", corpus, "--field", "body", "--kind", "byte", "-o", tok, "--force"], capsys)[0] == 0
    assert tok.read_text() != char and sorted(tmp_path.iterdir()) == [tok]
    ppl = ["eval", "ppl", cli_run / "run", "--data", cli_run / "data", "--out", tmp_path / "eval"]
    assert run(ppl, capsys)[0] == 0
    (tmp_path / "eval" / "stale.md").write_text("from before")
    assert_one_line_error(*run(ppl, capsys)[::2], "already holds an evaluation report; pass --force")
    assert run([*ppl, "--force"], capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["results.json", "results.md"]  # replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "tok.json"]  # no temporaries left


def test_every_flag_is_documented():
    parser = build_parser()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if action.choices and isinstance(action.choices, dict):
                stack.extend(action.choices.values())
            elif action.dest != "help":
                assert action.help, f"{p.prog}: {action.dest} has no help"


def test_console_script_exit_status(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lmlab.cli", "generate", str(tmp_path), "--prompt", "x"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, info_shown, debug_shown", [
    ([], True, False), (["-q"], False, False), (["-v"], True, True), (["--quiet"], False, False)])
def test_quiet_and_verbose_say_how_much_is_logged(flags, info_shown, debug_shown, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(tiny_corpus(10)), encoding="utf-8")
    for position in ("before", "after"):  # lmlab -q data prepare ... == lmlab data prepare -q ...
        command = ["data", "prepare", corpus, "--kind", "char", "-o", tmp_path / position]
        argv = [*flags, *command] if position == "before" else [*command[:2], *flags, *command[2:]]
        code, out, err = run(argv, capsys)
        assert code == 0 and out.startswith("wrote ")  # results on stdout, whatever the level
        assert ("training a char tokenizer" in err) == info_shown, err  # an info line: the bare message
        assert ("debug: arguments:" in err) == debug_shown, err
        assert "\r" not in err


def test_log_lines_are_plain():
    from lmlab.cli import PlainFormatter

    def line(level, message):
        return PlainFormatter().format(logging.LogRecord("lmlab.x", level, __file__, 1, message, None, None))

    assert line(logging.INFO, "note: something") == "note: something"
    assert line(logging.WARNING, "careful") == "warning: careful"
    assert line(logging.DEBUG, "detail") == "debug: detail"


def test_help_documents_quiet_and_verbose(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "-q, --quiet" in out and "-v, --verbose" in out and "before or after the command" in out

"""The command line end to end: every verb on tiny data, and every bad input as a one-line error."""

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

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


def test_generate_with_lower_precision_weights(cli_run, capsys, caplog):
    greedy = ["generate", cli_run / "run", "--prompt", "the quick", "--max-new-tokens", "8", "--greedy", "--no-stream"]
    for dtype in ("bf16", "int8"):
        code, out, _ = run([*greedy, "--dtype", dtype], capsys)
        assert code == 0 and out.startswith("the quick") and len(out) > len("the quick")
    with caplog.at_level(logging.INFO, logger="lmlab"):
        code, out, _ = run([*greedy, "--dtype", "auto"], capsys)
    assert code == 0 and "dtype auto: " in caplog.text  # the choice and its reason are logged
    with pytest.raises(SystemExit):
        run([*greedy, "--dtype", "int4"], capsys)
    assert "invalid choice: 'int4'" in capsys.readouterr().err


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
        (["tokenizer", "train", corpus, "-o", data / "tok.json", "--kind", "char", "--force"],
         "which holds a prepared data"),
        (["tokenizer", "train", corpus, "-o", tmp_path, "--kind", "char"], "is a folder; give the path"),
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


# ---------------------------------------------------------------------------------------------
# hardening: every flag value gets a correct result or one `error:` line (exit 1), never a traceback


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Untrained tiny checkpoints of every kind (a GPT with context 32, a GRU, an encoder, a classifier)
    and small input files: enough to check what each command accepts."""
    from lmlab.config import ModelConfig
    from lmlab.data.tokenizer import train_tokenizer
    from lmlab.finetune.classify import build_classifier
    from lmlab.models.registry import build_model
    from lmlab.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("models")
    tok = train_tokenizer("char", tiny_corpus())
    small = dict(n_layer=1, d_model=16, block_size=32, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    encoder = build_model(ModelConfig(family="encoder", n_head=2, **small))
    gru = build_model(ModelConfig(family="gru", **small))
    with torch.no_grad():
        gru.head.bias[tok.eot_id] = -1e4  # it never ends a text, so an interrupted generate is still generating
    paths = {"lm": save_checkpoint(root / "lm", build_model(ModelConfig(n_head=2, **small)), tok),
             "gru": save_checkpoint(root / "gru", gru, tok),
             "enc": save_checkpoint(root / "enc", encoder, tok),
             "cls": save_checkpoint(root / "cls", build_classifier(encoder, ["0", "1"], None, 0.0), tok,
                                    info={"max_length": 16})}
    (root / "a.txt").write_text("".join(tiny_corpus(10)), encoding="utf-8")
    (root / "big.txt").write_text("".join(tiny_corpus(1500)), encoding="utf-8")
    (root / "dev.tsv").write_text("sentence\tlabel\nthe quick fox\t1\na lazy dog\t0\n", encoding="utf-8")
    (root / "bin.yaml").write_bytes(b"model:\x00\x01\xff")
    (root / "latin1.yaml").write_bytes("# caf\xe9\nmodel: {n_layer: 2}\n".encode("latin-1"))
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "bad.yaml").write_text("model: {n_layer: [\n")
    (root / "empty.yaml").write_text("")
    (root / "folder").mkdir()
    with socket.socket() as s:  # serve checks that it can listen before it loads the model
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**{k: str(v) for k, v in paths.items()}, "root": str(root), "port": port}


BAD_FLAGS = [  # (argv with {placeholders} for the `models` paths, fragment of the one error line)
    ("eval ppl {lm} --data {root}/a.txt --batch-size 0", "batch_size must be >= 1, got 0"),
    ("eval ppl {lm} --data {root}/a.txt --batch-size -1", "batch_size must be >= 1, got -1"),
    ("eval ppl {lm} --data {root}/a.txt --stride 0", "stride must be >= 1, got 0"),
    ("eval ppl {lm} --data {root}/a.txt --stride -3", "stride must be >= 1"),
    ("eval ppl {lm} --data {root}/a.txt --stride 33", "stride must be between 1 and the context length 32"),
    ("eval ppl {lm} --data ''", "an input file name is empty"),
    ("eval classify {cls} --data {root}/dev.tsv --batch-size 0", "batch_size must be >= 1, got 0"),
    ("eval classify {cls} --data {root}/dev.tsv --batch-size -1", "batch_size must be >= 1"),
    ("eval classify {cls} --data {root}/dev.tsv --max-length 0", "max_length must be >= 1, got 0"),
    ("eval classify {cls} --data {root}/dev.tsv --max-length -5", "max_length must be >= 1"),
    ("eval classify {cls} --data {root}/dev.tsv --max-length 33", "max_length 33 exceeds the model's context of 32"),
    ("predict {cls} --max-length 0 text", "max_length must be >= 1, got 0"),
    ("train {root}/bin.yaml", "a binary file, not a config"),
    ("train {root}/latin1.yaml", "not UTF-8 text"),
    ("train {root}/list.yaml", "must be a YAML mapping"),
    ("train {root}/bad.yaml", "invalid YAML"),
    ("train {root}/missing.yaml", "config file not found"),
    ("train {root}/folder", "is a folder, not a config file"),
    ("train .", ". is a folder, not a config file"),
    ("finetune sft {root}/latin1.yaml", "not UTF-8 text"),
    ("finetune classify {root}/folder", "is a folder"),
    ("generate {lm} --prompt the --num-samples 0", "num_samples must be in [1, 1000], got 0"),
    ("generate {lm} --prompt the --num-samples -1", "num_samples must be in [1, 1000]"),
    ("generate {lm} --prompt the --num-beams 0", "num_beams must be in [1, 1000], got 0"),
    ("generate {lm} --prompt the --num-beams 1000000000000", "num_beams must be in [1, 1000]"),
    ("generate {lm} --prompt the --num-beams 2 --num-samples 2", "do not combine"),
    ("generate {lm} --prompt the --length-penalty nan", "length_penalty must be a finite number"),
    ("generate {lm} --prompt the --length-penalty=-inf", "length_penalty must be a finite number"),
    ("generate {lm} --prompt the --temperature nan", "temperature must be between 0 and 100, got nan"),
    ("generate {lm} --prompt the --top-p inf", "top-p must be in (0, 1]"),
    ("generate {lm} --prompt the --top-p 2", "top-p must be in (0, 1]"),
    ("generate {lm} --prompt the --seed 100000000000000000000000000000", "seed must be a 64-bit integer"),
    ("generate {lm} --prompt the --seed 18446744073709551616", "seed must be a 64-bit integer"),
    ("generate {lm} --prompt-file {root}/folder", "is a folder, not a prompt file"),
    ("generate {lm} --prompt \udcff", "text is not valid UTF-8: '\\udcff' at character 0"),  # argv byte 0xff
    ("chat {lm} --message a\udcff", "text is not valid UTF-8: '\\udcff'"),
    ("predict {cls} \udcff", "text is not valid UTF-8"),
    ("generate {cls} --prompt the", "is a sequence classifier, not a language model; use lmlab predict"),
    ("generate {enc} --prompt the", "is an encoder without a language-model head"),
    ("chat {cls} --message hi", "is a sequence classifier"),
    ("serve {cls} --port {port}", "is a sequence classifier"),
    ("eval ppl {cls} --data {root}/a.txt", "is a sequence classifier"),
    ("eval ppl {enc} --data {root}/a.txt", "is an encoder without a language-model head"),
    ("predict {lm} text", "is a language model, not a classifier"),
    ("eval classify {enc} --data {root}/dev.tsv", "is an encoder without a classifier head"),
    ("chat {lm} --message hi --system " + "x" * 40, "the message and the system prompt take"),
    ("data prepare {root}/a.txt --kind char -o {root}/d --val-fraction nan", "val_fraction must be in [0, 1)"),
    ("data prepare {root}/a.txt --kind char -o {root}/d --val-fraction 1.5", "val_fraction must be in [0, 1)"),
    ("data prepare {root}/a.txt --kind char -o {root}/d --vocab-size 0", "vocab_size 0 is too small"),
    ("data prepare {root}/a.txt --kind char -o {root}/d --min-freq -1", "min_freq must be at least 1"),
    ("data prepare {root}/a.txt --kind char -o {root}/d --shard-tokens 0", "shard_tokens must be at least 1"),
    ("data prepare {root}/a.txt --kind char -o {root}/d --max-bytes 0", "max_bytes must be >= 1, got 0"),
    ("data prepare {root}/a.txt --tokenizer '' -o {root}/d", "the tokenizer file name is empty"),
    ("data prepare {root}/a.txt --kind char -o {root}/d --shingle 3", "--shingle sets the --near-dedupe filter, which is off"),
    ("data prepare {root}/a.txt --kind char -o {root}/d --lang-threshold 0.9", "--lang-threshold sets the --lang filter"),
    ("data prepare {root}/a.txt --kind char -o {root}/d --min-words 100000", "the filters removed 1 documents and kept 0"),
    ("data prepare {root}/a.txt --kind char -o {root}/d --val {root}/a.txt --split tail", "--split: not used with --val"),
    ("data prepare {root}/a.txt --kind char -o {root}/d --val {root}/a.txt --val-fraction 0.5",
     "--val-fraction: not used with --val"),
    ("eval ppl {lm} --data {root}/a.txt --split test", "--split picks a split of a prepared data folder"),
    ("eval ppl {gru} --data {root}/a.txt --stride 5", "stride does not apply to a recurrent model"),
    ("tokenizer train {root}/a.txt --kind bpe --vocab-size 1000000000000 -o {root}/t.json", "vocab_size must be <="),
    ("tokenizer train {root}/a.txt --kind char --special '' -o {root}/t.json", "special tokens must not be empty"),
    ("demo --minutes 0", "minutes must be > 0, got 0.0"),
    ("demo --minutes nan", "minutes must be a finite number"),
    ("demo --seed -1", "seed must be in [0, "),
    ("serve {lm} --port 70000", "port must be in [1, 65535], got 70000"),
    ("serve {lm} --api-key ''", "api_key must not be empty"),
    ("train {root}/empty.yaml train.threads=100000000000", "train.threads must be in [1, 4096]"),
]


@pytest.mark.parametrize("argv, fragment", BAD_FLAGS, ids=[a for a, _ in BAD_FLAGS])
def test_bad_flag_values_are_one_line_errors(argv, fragment, models, capsys):
    code, _, err = run(["" if a == "''" else a.format(**models) for a in argv.split(" ")], capsys)
    assert_one_line_error(code, err, fragment)
    assert err.strip().splitlines()[-1].startswith("error: ")


def test_positionals_may_follow_flags(models, capsys):
    code, out, _ = run(["predict", models["cls"], "--max-length", "8", "the quick fox", "a lazy dog"], capsys)
    assert code == 0 and [json.loads(line)["text"] for line in out.splitlines()] == ["the quick fox", "a lazy dog"]
    args = build_parser().parse_args(["train", "run.yaml", "--resume", "train.lr=0.1", "--stop-after", "3", "a.b=1"])
    assert args.config == "run.yaml" and args.overrides == ["train.lr=0.1", "a.b=1"] and args.resume


def test_max_new_tokens_beyond_the_context_is_announced(models, capsys):
    code, out, err = run(["generate", models["lm"], "--prompt", "the", "--max-new-tokens", "100", "--greedy"], capsys)
    assert code == 0 and out.startswith("the")
    assert "warning: the model's context of 32 tokens leaves room for at most 29 new tokens" in err, err
    code, _, err = run(["generate", models["lm"], "--prompt", "the", "--max-new-tokens", "29", "--greedy"], capsys)
    assert code == 0 and "warning" not in err


def test_flags_that_greedy_or_one_beam_do_not_use_are_announced(models, capsys):
    base = ["generate", models["lm"], "--prompt", "the", "--max-new-tokens", "3"]
    for flags, warning in [(["--greedy", "--temperature", "0.5"], "--greedy takes the most likely token: --temperature 0.5"),
                           (["--temperature", "0", "--top-p", "0.5", "--seed", "3"], "--top-p, --seed not used"),
                           (["--length-penalty", "5"], "without --num-beams 2 or more it is not used")]:
        code, _, err = run([*base, *flags], capsys)
        assert code == 0 and warning in err, err
    code, _, err = run([*base, "--greedy"], capsys)
    assert code == 0 and "warning" not in err


def start_then_interrupt(argv: list[str], ready) -> subprocess.Popen:
    """Start ``lmlab ARGV`` in a subprocess; a thread sends it Ctrl-C (SIGINT) once ``ready(stdout, stderr)``."""
    # a shell without job control starts background jobs with SIGINT ignored, and children inherit that
    # (Python then installs no KeyboardInterrupt handler): give the command the default, as in a terminal
    proc = subprocess.Popen([sys.executable, "-m", "lmlab.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.seen = {"out": "", "err": ""}

    def read(stream, key):
        for chunk in iter(lambda: stream.read(1), ""):
            proc.seen[key] += chunk

    for stream, key in ((proc.stdout, "out"), (proc.stderr, "err")):
        threading.Thread(target=read, args=(stream, key), daemon=True).start()

    def interrupt():
        deadline = time.monotonic() + 120
        while proc.poll() is None and not ready(proc.seen["out"], proc.seen["err"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    return proc


def scoring(out: str, err: str) -> bool:
    """Whether ``lmlab -v eval ppl`` (which logs nothing while it scores) is likely scoring: 2 s after it started
    (long before it is done with the text of the test)."""
    if "debug: arguments" not in err:
        return False
    time.sleep(2)
    return True


def test_ctrl_c_exits_130_without_a_traceback(models, prepared, tmp_path):
    """Interrupted mid-work (training steps, generating tokens, scoring windows) or while it imports torch,
    each command exits 130."""
    config = tmp_path / "long.yaml"
    config.write_text(f"""
model: {{n_layer: 1, n_head: 2, d_model: 16, block_size: 16}}
data: {{path: {prepared}}}
train: {{out_dir: {tmp_path / 'run'}, batch_size: 2, max_steps: 1000000, warmup_steps: 1, log_interval: 1,
         eval_interval: 1000000, checkpoint_interval: 1000000, device: cpu}}
""")
    procs = {
        "train": start_then_interrupt(["train", str(config)], lambda out, err: "step 2/" in err),
        "generate": start_then_interrupt(["generate", models["gru"], "--prompt", "the", "--max-new-tokens", "1000000",
                                          "--device", "cpu"], lambda out, err: len(out) > 20),
        "eval ppl": start_then_interrupt(["-v", "eval", "ppl", models["lm"], "--data", f"{models['root']}/big.txt",
                                          "--stride", "1", "--device", "cpu"], scoring),
        # at once, while the command imports torch: the interpreter would die by SIGINT on its way out (-2)
        "importing": start_then_interrupt(["-v", "eval", "ppl", models["lm"], "--data", f"{models['root']}/big.txt",
                                           "--device", "cpu"], lambda out, err: "debug: arguments" in err),
    }
    for name, proc in procs.items():
        status = proc.wait(timeout=180)
        time.sleep(0.2)  # the reader threads catch up (before the asserts, so a failure shows all of stderr)
        assert status == 130, (name, status, proc.seen["err"][-3000:])
        assert "Traceback" not in proc.seen["err"] and proc.seen["err"].rstrip().endswith("interrupted"), (name, proc.seen)
    assert list((tmp_path / "run" / "checkpoints").iterdir())  # training saved where it stopped


def test_out_of_memory_is_one_line_and_other_errors_keep_their_traceback(models, monkeypatch, capsys):
    import lmlab.eval.perplexity

    def fail(message):
        def evaluate(*args, **kwargs):
            raise RuntimeError(message)
        return evaluate

    argv = ["eval", "ppl", models["lm"], "--data", f"{models['root']}/a.txt"]
    monkeypatch.setattr(lmlab.eval.perplexity, "evaluate_perplexity", fail(
        "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate "
        "128000000000000 bytes. Error code 12 (Cannot allocate memory)"))
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, "out of memory (tried to allocate 128000000000000 bytes)")
    monkeypatch.setattr(lmlab.eval.perplexity, "evaluate_perplexity", fail("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        main(argv)


def test_a_full_or_read_only_disk_is_one_line_and_other_os_errors_keep_their_traceback(models, monkeypatch, capsys):
    import errno
    import os

    import lmlab.eval.perplexity

    def fail(code):
        def evaluate(*args, **kwargs):
            raise OSError(code, os.strerror(code), "/data/run/metrics.jsonl")
        return evaluate

    argv = ["eval", "ppl", models["lm"], "--data", f"{models['root']}/a.txt"]
    for code, words in [(errno.ENOSPC, "disk full"), (errno.EROFS, "read-only file system"),
                        (errno.EACCES, "permission denied")]:
        monkeypatch.setattr(lmlab.eval.perplexity, "evaluate_perplexity", fail(code))
        status, _, err = run(argv, capsys)
        assert_one_line_error(status, err, f"{words}: /data/run/metrics.jsonl")
    monkeypatch.setattr(lmlab.eval.perplexity, "evaluate_perplexity", fail(errno.EBADF))
    with pytest.raises(OSError):
        main(argv)


def test_an_error_is_one_line_even_when_a_library_message_goes_on(models, monkeypatch, capsys):
    import lmlab.eval.perplexity
    from lmlab.errors import DataError

    def evaluate(*args, **kwargs):
        raise DataError("the first line says what\nframe #0: c10::Error ...\nframe #1: ...")

    monkeypatch.setattr(lmlab.eval.perplexity, "evaluate_perplexity", evaluate)
    code, _, err = run(["eval", "ppl", models["lm"], "--data", f"{models['root']}/a.txt"], capsys)
    assert code == 1 and err.strip().splitlines() == ["error: the first line says what"]

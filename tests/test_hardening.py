"""Property-based hardening: whatever arguments a user types, every verb either succeeds with a valid
result, or prints one ``error:`` line (exit 1; argparse usage errors exit 2) and writes nothing.
Never a traceback, and never a change to any input.

Hypothesis draws config overrides and flag values (zero, negative, NaN, infinity, huge, empty, text,
missing/binary/latin-1 files, outputs that are files, folders of other things or the verb's own input)
for every verb that writes or reads a model. ``derandomize`` pins the examples (no flaky tests);
``LMLAB_FUZZ_EXAMPLES`` scales how many are tried (benchmarks/hardening.py runs many more).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmlab.cli import build_parser, main
from lmlab.config import ClassifyConfig, RunConfig, SftConfig, _hints, _spec
from lmlab.data.tokenizer import train_tokenizer

from conftest import tiny_corpus

SCALE = float(os.environ.get("LMLAB_FUZZ_EXAMPLES", "1"))


def fuzz_settings(examples: int):
    """Deterministic, time-unbounded settings with ``examples`` (times LMLAB_FUZZ_EXAMPLES) examples."""
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                    database=None)


# values a user might type for a number (as command-line text); HUGE only where it cannot mean hours of work
NUMBERS = ["0", "-1", "1", "2", "3", "0.5", "1e-3", "nan", "inf", "-inf", "abc", "", " ", "1,5", "0x10"]
HUGE = ["99999999999999999999", "1e400", "1e30"]
# the same as YAML scalars in KEY=VALUE overrides, plus YAML's own shapes
YAML_VALUES = ["0", "-1", "1", "2", "3", "0.5", "1e-3", "nan", ".inf", "-.inf", "abc", "''", "true", "null",
               "[1, 2]", "{a: 1}", "'3'", "~"]
YAML_HUGE = ["99999999999999999999", "1e30"]
# keys where a huge value means hours of work or gigabytes, not a wrong input (users may really want them)
COSTLY_KEYS = {"train.batch_size", "train.eval_batches", "train.eval_batch_size", "train.grad_accum",
               "model.n_layer", "data.max_examples", "train.threads"}


# ---------------------------------------------------------------------------------------------
# the workspace: inputs every example may read (and must never change), and a fresh output place


@pytest.fixture(scope="module")
def ws(tmp_path_factory, trained_run):
    """Inputs of every kind: text, bad files, prepared data, an LM run, a classifier run, configs."""
    root = tmp_path_factory.mktemp("hardening") / "ws"
    inputs = root / "in"
    inputs.mkdir(parents=True)
    (inputs / "corpus.txt").write_text("".join(tiny_corpus(30)), encoding="utf-8")
    (inputs / "empty.txt").write_text("")
    (inputs / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (inputs / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    (inputs / "other").mkdir()
    (inputs / "other" / "notes.txt").write_text("a user's own files\n")
    shutil.copytree(trained_run, inputs / "run", ignore=shutil.ignore_patterns("tensorboard"))
    from lmlab.data.prepare import prepare

    prepare([str(inputs / "corpus.txt")], train_tokenizer("char", tiny_corpus(30)), inputs / "data",
            val_fraction=0.2, split="tail")
    write_labelled(inputs / "labels.tsv")
    records = [{"instruction": f"say {w}", "input": "", "output": w} for w in tiny_corpus(1)[0].split()[:20]] * 3
    (inputs / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_configs(inputs)
    assert main(["-q", "finetune", "classify", str(inputs / "cls.yaml"), f"train.out_dir={inputs / 'cls'}",
                 "train.max_steps=4"]) == 0
    assert main(["-q", "convert", str(inputs / "run"), str(inputs / "hf")]) == 0
    assert main(["-q", "eval", "ppl", str(inputs / "run"), "--data", str(inputs / "corpus.txt"),
                 "--out", str(inputs / "report")]) == 0
    shutil.copy(inputs / "data" / "tokenizer.json", inputs / "tokenizer.json")
    shutil.copytree(inputs, root.parent / "pristine")
    return root


def write_labelled(path: Path) -> None:
    words = tiny_corpus(1)[0].split()
    rows = [f"{' '.join(words[i:i + 5])}\t{i % 2}\n" for i in range(40)]
    path.write_text("sentence\tlabel\n" + "".join(rows), encoding="utf-8")


def write_configs(inputs: Path) -> None:
    train = ("batch_size: 4, max_steps: 6, warmup_steps: 1, eval_interval: 3, eval_batches: 1, log_interval: 1, "
             "checkpoint_interval: 3, progress: false")
    (inputs / "tiny.yaml").write_text(f"""
model: {{preset: gpt2, n_layer: 1, n_head: 2, d_model: 16, block_size: 16}}
data: {{path: {inputs / 'data'}}}
train: {{out_dir: {inputs / 'unused'}, {train}}}
""")
    (inputs / "cls.yaml").write_text(f"""
model: {{path: {inputs / 'run'}}}
data: {{train: {inputs / 'labels.tsv'}, val: {inputs / 'labels.tsv'}, max_length: 16}}
train: {{out_dir: {inputs / 'unused'}, {train}}}
""")
    (inputs / "sft.yaml").write_text(f"""
model: {{path: {inputs / 'run'}}}
data: {{train: {inputs / 'chat.jsonl'}, val_fraction: 0.2}}
train: {{out_dir: {inputs / 'unused'}, {train}}}
""")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> SHA-256) and every folder (-> "dir")."""
    shot = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        shot[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return shot


class Outcome(typing.NamedTuple):
    code: int
    out: str
    err: str


TRACEBACK = -1  # Outcome.code of a run that raised (the property's failure); err holds the exception


def run_cli(argv: list[str], capsys) -> Outcome:
    """``lmlab -q ARGV`` in this process; an exception other than SystemExit comes back as TRACEBACK."""
    capsys.readouterr()
    try:
        code = main(["-q", *argv])
    except SystemExit as e:  # argparse: usage errors, --help
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # noqa: BLE001 - the property under test: nothing else escapes
        out, err = capsys.readouterr()
        return Outcome(TRACEBACK, out, f"{err[-1500:]}\n{type(e).__name__}: {e}")
    out, err = capsys.readouterr()
    return Outcome(code, out, err)


def restore_inputs(ws: Path) -> None:
    """Put the inputs back as the fixture made them (after a verb replaced or wrongly changed one)."""
    shutil.rmtree(ws / "in")
    shutil.copytree(ws.parent / "pristine", ws / "in")


def check(ws: Path, argv: list[str], capsys, valid, may_replace: bool = False, prepare=None) -> Outcome:
    """Run ``argv``; assert the property: exit 0 and ``valid(outcome)``, or one error line, nothing written.
    ``may_replace``: the verb was given --force and an output of its own kind, which it may replace;
    ``prepare()`` sets up the output place once the output folder is fresh."""
    out_root = ws / "out"
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir()
    if prepare:
        prepare()
    before = snapshot(ws)
    result = run_cli(argv, capsys)
    after = snapshot(ws)
    verdict = judge(result, before, after, valid, may_replace)
    if snapshot_of_inputs(after) != snapshot_of_inputs(before):  # a wrong change, or a --force replacement
        restore_inputs(ws)
    record(argv, result, verdict)
    if verdict not in ("ok", "error", "usage"):
        pytest.fail(f"lmlab {' '.join(argv)}: {verdict} (exit {result.code})\n{result.err[-2000:]}")
    return result


def snapshot_of_inputs(shot: dict) -> dict:
    return {k: v for k, v in shot.items() if k.startswith("in")}


def judge(result: Outcome, before: dict, after: dict, valid, may_replace: bool) -> str:
    """ok / error / usage when the property holds; else what broke it."""
    inputs_before, inputs_after = snapshot_of_inputs(before), snapshot_of_inputs(after)
    if inputs_after != inputs_before and not may_replace:
        changed = sorted(k for k in inputs_before.keys() | inputs_after.keys() if inputs_before.get(k) != inputs_after.get(k))
        return f"inputs changed: {changed[:5]}"
    if result.code == TRACEBACK or "Traceback" in result.err:
        return "traceback"
    if result.code == 0:
        try:
            valid(result)
        except (AssertionError, ValueError, KeyError, OSError) as e:
            return f"invalid result: {type(e).__name__}: {e}"
        return "ok"
    if result.code not in (1, 2):
        return f"exit status {result.code}"
    if after != before:
        return f"partial output: {sorted(set(after) ^ set(before))[:5]}"
    if result.code == 2:
        return "usage"
    errors = [line for line in result.err.splitlines() if line.startswith("error: ")]
    if len(errors) != 1 or result.err.rstrip().splitlines()[-1] != errors[0]:
        return "not one error line"
    return "error"


def record(argv: list[str], result: Outcome, verdict: str) -> None:
    """Append the case to $LMLAB_FUZZ_LOG (JSONL), for benchmarks/hardening.py's figures."""
    path = os.environ.get("LMLAB_FUZZ_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"argv": argv, "code": result.code, "verdict": verdict,
                                "error": next((line for line in result.err.splitlines() if line.startswith("error: ")),
                                              None)}, ensure_ascii=True) + "\n")


# ---------------------------------------------------------------------------------------------
# strategies


def number(huge: bool = True):
    return st.sampled_from(NUMBERS + (HUGE if huge else []))


def output_place(ws: Path, own_input: str | None = None, file_like: bool = False):
    """Where a verb is told to write: new places, and places it must refuse."""
    inputs = ws / "in"
    places = [ws / "out" / "new", ws / "out" / "a" / "b" / "c", inputs / "corpus.txt", inputs / "other",
              inputs / "corpus.txt" / "below-a-file", Path("/proc/lmlab-cannot-write-here"), inputs / "data",
              inputs / "run"]
    if own_input:
        places.append(inputs / own_input)
    if file_like:
        places.append(ws / "out" / "tokenizer.json")
    return st.sampled_from([str(p) for p in places])


def input_file(ws: Path, good: list[str]):
    """An input file: a good one, or missing, empty, binary, latin-1, a folder."""
    names = good + ["missing.txt", "empty.txt", "binary.bin", "latin1.txt", "other"]
    return st.sampled_from([str(ws / "in" / n) for n in names])


def flags(table: dict[str, typing.Any]):
    """A subset of ``table``'s flags, each with a drawn value (None: a flag without a value)."""
    return st.dictionaries(st.sampled_from(sorted(table)), st.none(), max_size=len(table)).flatmap(
        lambda chosen: st.fixed_dictionaries({k: table[k] for k in chosen}))


def as_argv(chosen: dict[str, typing.Any]) -> list[str]:
    argv = []
    for flag, value in chosen.items():
        argv += [flag] if value is True else [] if value is False else [flag, str(value)]
    return argv


def leaf_keys(cls: type, prefix: str = "") -> dict[str, list[str]]:
    """Every config key of ``cls`` with the YAML values to try on it (its choices among them)."""
    keys = {}
    for f in dataclasses.fields(cls):
        ftype = _hints(cls)[f.name]
        if dataclasses.is_dataclass(ftype):
            keys.update(leaf_keys(ftype, prefix + f.name + "."))
            continue
        key = prefix + f.name
        choices = _spec(ftype).choices
        keys[key] = YAML_VALUES + ([] if key in COSTLY_KEYS else YAML_HUGE) + [c for c in choices if " " not in c]
    keys.pop("train.out_dir", None)
    return keys


def overrides(cls: type, exclude: tuple[str, ...] = ()):
    keys = {k: v for k, v in leaf_keys(cls).items() if not k.startswith(exclude)}
    return st.dictionaries(st.sampled_from(sorted(keys)), st.none(), min_size=1, max_size=3).flatmap(
        lambda chosen: st.fixed_dictionaries({k: st.sampled_from(keys[k]) for k in chosen})).map(
        lambda d: [f"{k}={v}" for k, v in d.items()])


def has_force(*command: str) -> bool:
    """Whether this lmlab subcommand takes --force (replace a previous output of the same kind)."""
    parser = build_parser()
    for name in command:
        parser = next(a for a in parser._actions if a.dest in ("command", "action")).choices[name]
    return any("--force" in a.option_strings for a in parser._actions)


# ---------------------------------------------------------------------------------------------
# what a valid result is


def finite_metrics(run_dir: Path) -> None:
    from lmlab.runs import list_checkpoints

    assert list_checkpoints(run_dir), f"{run_dir}: exit 0 without a checkpoint"
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        for key, value in json.loads(line).items():
            assert not (isinstance(value, float) and not math.isfinite(value)), f"{key} = {value} in metrics.jsonl"


def valid_report(result: Outcome) -> None:
    report = json.loads(result.out)
    assert all(math.isfinite(v) for v in report.values() if isinstance(v, float)), report


# ---------------------------------------------------------------------------------------------
# the properties, one per verb


TRAINING = {"train": (RunConfig, "tiny.yaml", ()),
            "classify": (ClassifyConfig, "cls.yaml", ("model.path",)),
            "sft": (SftConfig, "sft.yaml", ("model.path",))}


@pytest.mark.parametrize("verb", sorted(TRAINING))
def test_training_verbs_take_any_override(ws, capsys, verb):
    cls, config, exclude = TRAINING[verb]
    command = ["train"] if verb == "train" else ["finetune", verb]
    out_dir = ws / "out" / "run"

    @fuzz_settings(25 if verb == "train" else 10)
    @given(extra=overrides(cls, exclude), stop_after=st.sampled_from([None, "2", "0", "-1", "abc"]))
    def prop(extra, stop_after):
        argv = [*command, str(ws / "in" / config), f"train.out_dir={out_dir}", *extra]
        argv += ["--stop-after", stop_after] if stop_after else []
        check(ws, argv, capsys, lambda r: finite_metrics(out_dir))

    prop()


def test_training_config_files_of_every_kind(ws, capsys):
    @fuzz_settings(8)
    @given(config=input_file(ws, ["tiny.yaml", "labels.tsv", "corpus.txt"]))
    def prop(config):
        check(ws, ["train", config, f"train.out_dir={ws / 'out' / 'run'}"], capsys,
              lambda r: finite_metrics(ws / "out" / "run"))

    prop()


def test_training_output_places(ws, capsys):
    """train.out_dir anywhere: a new folder trains; a file, a folder of other things, an input: refused."""
    @fuzz_settings(8)
    @given(out=output_place(ws))
    def prop(out):
        check(ws, ["train", str(ws / "in" / "tiny.yaml"), f"train.out_dir={out}"], capsys,
              lambda r: finite_metrics(Path(out)))

    prop()


GENERATE = {"--max-new-tokens": number(huge=True), "--temperature": number(), "--top-k": number(),
            "--top-p": number(), "--min-p": number(), "--repetition-penalty": number(),
            "--presence-penalty": number(), "--frequency-penalty": number(), "--seed": number(),
            "--num-beams": number(huge=False), "--length-penalty": number(), "--num-samples": number(huge=False),
            "--stop": st.sampled_from(["", "e", "the"]), "--greedy": st.booleans(), "--no-stream": st.booleans(),
            "--truncate-prompt": st.booleans(), "--device": st.sampled_from(["cpu", "auto", "cuda", "tpu", ""])}


GENERATE_ONLY = ("--num-beams", "--length-penalty", "--num-samples", "--no-stream", "--truncate-prompt")


@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_generate_and_chat_take_any_flags(ws, capsys, verb):
    table = GENERATE if verb == "generate" else {k: v for k, v in GENERATE.items() if k not in GENERATE_ONLY}

    @fuzz_settings(40 if verb == "generate" else 20)
    @given(chosen=flags(table), prompt=st.sampled_from(["the", "", "\ud800", "x" * 100, "é"]),
           checkpoint=st.sampled_from(["run", "cls", "data", "missing", "corpus.txt"]))
    def prop(chosen, prompt, checkpoint):
        argv = [verb, str(ws / "in" / checkpoint), "--prompt" if verb == "generate" else "--message", prompt,
                *as_argv(chosen)]
        check(ws, argv, capsys, lambda r: None)

    prop()


def test_generate_prompt_files(ws, capsys):
    @fuzz_settings(6)
    @given(prompt_file=input_file(ws, ["corpus.txt"]))
    def prop(prompt_file):
        check(ws, ["generate", str(ws / "in" / "run"), "--prompt-file", prompt_file, "--max-new-tokens", "4"],
              capsys, lambda r: None)

    prop()


def test_eval_ppl_takes_any_flags(ws, capsys):
    table = {"--batch-size": number(), "--stride": number(), "--split": st.sampled_from(["val", "train", "test", ""]),
             "--field": st.sampled_from(["text", ""]), "--out": output_place(ws, "run")}

    @fuzz_settings(25)
    @given(chosen=flags(table), data=input_file(ws, ["corpus.txt", "data"]),
           checkpoint=st.sampled_from(["run", "cls", "missing"]))
    def prop(chosen, data, checkpoint):
        check(ws, ["eval", "ppl", str(ws / "in" / checkpoint), "--data", data, *as_argv(chosen)], capsys,
              valid_report)

    prop()


def test_eval_classify_and_predict_take_any_flags(ws, capsys):
    table = {"--batch-size": number(), "--max-length": number(), "--text-field": st.sampled_from(["sentence", "x"]),
             "--label-field": st.sampled_from(["label", "sentence", "x"]), "--out": output_place(ws)}

    @fuzz_settings(20)
    @given(chosen=flags(table), data=input_file(ws, ["labels.tsv"]), checkpoint=st.sampled_from(["cls", "run"]))
    def evaluate(chosen, data, checkpoint):
        check(ws, ["eval", "classify", str(ws / "in" / checkpoint), "--data", data, *as_argv(chosen)], capsys,
              valid_report)

    @fuzz_settings(15)
    @given(max_length=number(), texts=st.lists(st.sampled_from(["good", "", " ", "\ud800", "é" * 50]), max_size=2),
           file=st.sampled_from([None, str(ws / "in" / "labels.tsv"), str(ws / "in" / "binary.bin")]))
    def predict(max_length, texts, file):
        argv = ["predict", str(ws / "in" / "cls"), "--max-length", max_length, *texts]
        check(ws, argv + (["--file", file] if file else []), capsys,
              lambda r: all(json.loads(line)["label"] in ("0", "1") for line in r.out.splitlines()))

    evaluate()
    predict()


def test_tokenizer_and_data_prepare_take_any_flags(ws, capsys):
    table = {"--kind": st.sampled_from(["bpe", "char", "byte", "word", "bad"]), "--vocab-size": number(huge=False),
             "--min-freq": number(huge=False), "--max-bytes": number(huge=True),
             "--field": st.sampled_from(["text", ""])}
    prepare_table = {**table, "--val-fraction": number(), "--split": st.sampled_from(["hash", "tail", "x"]),
                     "--shard-tokens": number(huge=False), "--dedupe": st.booleans(), "--split-lines": st.booleans()}
    force = {"--force": st.booleans()}

    @fuzz_settings(15)
    @given(chosen=flags({**table, **(force if has_force("tokenizer", "train") else {})}),
           source=input_file(ws, ["corpus.txt"]), out=output_place(ws, "corpus.txt", file_like=True))
    def tokenizer(chosen, source, out):
        check(ws, ["tokenizer", "train", source, "-o", out, *as_argv(chosen)], capsys,
              lambda r: json.loads(Path(out).read_text())["model"])

    @fuzz_settings(15)
    @given(chosen=flags({**prepare_table, **(force if has_force("data", "prepare") else {})}),
           source=input_file(ws, ["corpus.txt"]), out=output_place(ws, "data"))
    def data(chosen, source, out):
        check(ws, ["data", "prepare", source, "-o", out, *as_argv(chosen)], capsys,
              lambda r: json.loads((Path(out) / "meta.json").read_text())["splits"],
              may_replace=chosen.get("--force") is True and out == str(ws / "in" / "data"))

    tokenizer()
    data()


def test_convert_never_destroys(ws, capsys):
    @fuzz_settings(10)
    @given(source=st.sampled_from(["run", "cls", "data", "missing", "corpus.txt"]), out=output_place(ws, "run"),
           to=st.sampled_from([None, "hf", "lmlab"]), force=st.booleans() if has_force("convert") else st.just(False))
    def prop(source, out, to, force):
        argv = ["convert", str(ws / "in" / source), out] + (["--to", to] if to else []) + (["--force"] if force else [])
        check(ws, argv, capsys, lambda r: None, may_replace=force)

    prop()


# ---------------------------------------------------------------------------------------------
# every writing verb against every kind of output place, exhaustively

IN = "{in}"
WRITERS = {  # verb: (argv with {out}, the inputs of its own kind it may replace with --force, its own inputs)
    "tokenizer": (["tokenizer", "train", f"{IN}/corpus.txt", "--kind", "char", "-o", "{out}"], {"tokenizer.json"},
                  {"corpus.txt"}),
    "prepare": (["data", "prepare", f"{IN}/corpus.txt", "--kind", "char", "-o", "{out}"], {"data"}, {"corpus.txt"}),
    "train": (["train", f"{IN}/tiny.yaml", "train.out_dir={out}"], {"run", "cls"}, {"data", "tiny.yaml"}),
    "classify": (["finetune", "classify", f"{IN}/cls.yaml", "train.out_dir={out}"], {"cls"},
                 {"run", "labels.tsv", "cls.yaml"}),
    "sft": (["finetune", "sft", f"{IN}/sft.yaml", "train.out_dir={out}"], {"cls"}, {"run", "chat.jsonl", "sft.yaml"}),
    "eval-ppl": (["eval", "ppl", f"{IN}/run", "--data", f"{IN}/corpus.txt", "--out", "{out}"], {"report"},
                 {"run", "corpus.txt"}),
    "eval-classify": (["eval", "classify", f"{IN}/cls", "--data", f"{IN}/labels.tsv", "--out", "{out}"], {"report"},
                      {"cls", "labels.tsv"}),
    "convert-hf": (["convert", f"{IN}/run", "{out}"], {"hf"}, {"run"}),
    "convert-lmlab": (["convert", f"{IN}/hf", "{out}"], set(), {"hf"}),
}
PLACES = ["NEW", "NEW/a/b", "EMPTY", "corpus.txt", "corpus.txt/below", "other", "/proc/lmlab-x", "data", "run", "cls",
          "hf", "report", "tokenizer.json"]


def place_path(ws: Path, place: str) -> Path:
    if place.startswith("NEW"):
        return ws / "out" / place.replace("NEW", "new")
    if place == "EMPTY":
        return ws / "out" / "empty"
    return Path(place) if place.startswith("/") else ws / "in" / place


def writer_cases():
    for verb in WRITERS:
        for place in PLACES:
            for force in (False, True):
                if force and (place.startswith("NEW") or place == "EMPTY"):
                    continue
                yield pytest.param(verb, place, force, id=f"{verb}-{place}{'-force' if force else ''}")


@pytest.mark.parametrize("verb,place,force", list(writer_cases()))
def test_writing_verbs_refuse_to_overwrite(ws, capsys, verb, place, force):
    """New or empty places are written; anything else is refused, and --force replaces only an earlier
    output of the verb's own kind that is not one of its inputs."""
    template, same_kind, own_inputs = WRITERS[verb]
    out = place_path(ws, place)
    argv = [a.replace(IN, str(ws / "in")).replace("{out}", str(out)) for a in template]
    if force:
        if not has_force(*argv[:1 if verb in ("train", "convert-hf", "convert-lmlab") else 2]):
            pytest.skip(f"{verb} has no --force yet")
        argv.append("--force")
    replaceable = force and place in same_kind and place not in own_inputs
    result = check(ws, argv, capsys, lambda r: None, may_replace=replaceable,
                   prepare=(lambda: out.mkdir(parents=True)) if place == "EMPTY" else None)
    if place.startswith("NEW") or replaceable or (place == "EMPTY" and verb != "tokenizer"):
        assert result.code == 0, result.err
    elif not (place == "EMPTY" and verb == "tokenizer"):
        assert result.code == 1, f"lmlab {' '.join(argv)} wrote to {place}: exit {result.code}"

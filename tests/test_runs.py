"""Output paths (runs.py): the checks every writing command makes first, atomic folders, stale
temporaries, and a training run that fails before its first checkpoint leaving nothing behind."""

import json
import logging
import os
from pathlib import Path

import pytest

from lmlab.errors import OutputError
from lmlab.runs import (PNG_SIGNATURE, atomic_dir, atomic_write_text, check_output, check_page_output, claim_output,
                        output_kind, remove_stale_temporaries)

from loop_tasks import RegressionTask, regression_config, run_task

DEAD = 999999999  # no process has this id


def tree(folder):
    """Every path under ``folder`` with its bytes (None for a folder): to compare before and after."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


MARKERS = {"manifest.json": '{"format": "lmlab-checkpoint"}', "meta.json": '{"format": "lmlab-tokens"}',
           "results.json": '{"perplexity": 2.0}'}


def make(folder, *files, text="x"):
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(MARKERS.get(Path(name).name, text) if text == "x" else text)
    return folder


def kinds(tmp_path):
    """One folder (or file) of every kind of output, and a foreign folder."""
    return {
        "run": make(tmp_path / "run", "config.yaml", "metrics.jsonl", "checkpoints/step-000001/manifest.json"),
        "checkpoint": make(tmp_path / "ckpt", "manifest.json", "model.safetensors"),
        "hf": make(tmp_path / "hf", "config.json", "model.safetensors"),
        "data": make(tmp_path / "data", "train_000.bin", "meta.json"),
        "report": make(tmp_path / "report", "results.json", "results.md"),
        "tokenizer": make(tmp_path, "tok.json", text='{"version": "1.0", "model": {}}') / "tok.json",
        None: make(tmp_path / "mine", "notes.txt"),
    }


def test_output_kind_recognises_every_output(tmp_path):
    for kind, path in kinds(tmp_path).items():
        assert output_kind(path) == kind, path
    make(tmp_path / "demo" / "data", "meta.json")
    make(tmp_path / "demo" / "run", "config.yaml", "metrics.jsonl")
    assert output_kind(tmp_path / "demo") == "demo"
    make(tmp_path / "demo", "extra.txt")
    assert output_kind(tmp_path / "demo") is None
    assert output_kind(make(tmp_path, "a.json", text='{"model": 1}') / "a.json") == "tokenizer"
    assert output_kind(make(tmp_path, "b.json", text='["model"]') / "b.json") is None
    assert output_kind(tmp_path / "missing") is None
    for name in ("manifest.json", "meta.json"):  # another tool's file of the same name is not lmlab's
        assert output_kind(make(tmp_path / name.split(".")[0], name, text='{"format": "other"}')) is None
    assert output_kind(make(tmp_path / "res", "results.json")) is None  # a report has results.md too


def test_inputs_are_never_outputs(tmp_path):
    corpus = make(tmp_path / "corpus", "a.txt", "b.txt")
    for output, inputs, message in [
        (corpus / "a.txt", [corpus / "a.txt"], "is also an input"),
        (tmp_path, [corpus / "a.txt"], "contains the input"),
        (corpus / "tok.json", [corpus], "is inside the input"),
        (corpus / "a.txt" / "sub", [corpus / "a.txt"], "is inside the input"),
        (corpus, [str(corpus / "*.txt")], "contains the input"),  # a glob's matches are inputs
        (tmp_path / "link", [corpus], "is also an input"),  # compared resolved
    ]:
        if output.name == "link":
            output.symlink_to(corpus)
        before = tree(tmp_path)
        with pytest.raises(OutputError, match=message):
            check_output(output, "tokenizer" if output.suffix else "data", inputs)
        assert tree(tmp_path) == before
    assert check_output(tmp_path / "out", "data", [corpus / "*.txt", None, "all-MiniLM-L6-v2"]) == tmp_path / "out"
    assert not (tmp_path / "out").exists()


def test_existing_outputs_need_force_and_foreign_ones_are_refused(tmp_path):
    outputs = kinds(tmp_path)
    before = tree(tmp_path)
    for kind, path in outputs.items():
        for wanted in ("run", "checkpoint", "hf", "data", "report", "tokenizer"):
            for force in (False, True):
                if wanted == "tokenizer" and path.is_dir():
                    continue  # FOLDER/tokenizer.json: see test_nothing_is_written_inside_a_finished_output
                if kind == wanted and force:
                    assert check_output(path, wanted, force=True) == path
                    continue
                with pytest.raises(OutputError) as err:
                    check_output(path, wanted, force=force)
                message = str(err.value)
                assert str(path) in message and "\n" not in message
                if kind == wanted:
                    assert "pass --force to replace it" in message
                elif wanted == "tokenizer" or kind == "tokenizer":
                    assert "not a" in message or "is a file" in message
                else:
                    assert "refusing to replace it" in message
    assert tree(tmp_path) == before


def test_nothing_is_written_inside_a_finished_output(tmp_path):
    outputs = kinds(tmp_path)
    before = tree(tmp_path)
    for kind in ("checkpoint", "hf", "data", "report"):
        for output, wanted in [(outputs[kind] / "tokenizer.json", "tokenizer"), (outputs[kind] / "x", "report")]:
            with pytest.raises(OutputError, match=f"is inside {outputs[kind]}, which holds"):
                check_output(output, wanted, force=True)
    with pytest.raises(OutputError, match="which holds the checkpoints of a run"):
        check_output(outputs["run"] / "checkpoints" / "eval", "report")
    assert tree(tmp_path) == before
    assert check_output(outputs["run"] / "eval", "report") == outputs["run"] / "eval"  # a run holds reports
    with pytest.raises(OutputError, match="is a folder; give the path of the tokenizer file"):
        check_output(outputs[None], "tokenizer")  # a tokenizer is a file of its own, not one added to a folder


def test_empty_folders_and_new_paths_are_fine(tmp_path):
    make(tmp_path / "empty" / "sub" / "deeper")
    assert check_output(tmp_path / "empty", "run") == tmp_path / "empty"
    assert check_output(tmp_path / "new" / "deep" / "out", "report") == tmp_path / "new" / "deep" / "out"
    assert not (tmp_path / "new").exists()  # the probe leaves no folder behind
    make(tmp_path / "folder")
    with pytest.raises(OutputError, match="is a folder; give the path of the tokenizer file"):
        check_output(tmp_path / "folder", "tokenizer")
    assert check_output(tmp_path / "folder" / "tok.json", "tokenizer") == tmp_path / "folder" / "tok.json"


def test_unwritable_places_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(OutputError, match="a.txt is a file, not a folder"):
        check_output(tmp_path / "a.txt" / "out", "data")
    with pytest.raises(OutputError, match="cannot write /proc/x"):
        check_output("/proc/x", "report")
    with pytest.raises(OutputError, match="cannot write /proc/nope/x: cannot create /proc/nope"):
        check_output("/proc/nope/x", "tokenizer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_picture_replaces_a_picture_but_never_a_users_file_or_a_folder(tmp_path):
    picture = tmp_path / "old.png"
    picture.write_bytes(PNG_SIGNATURE + b"rest of a picture")
    assert check_page_output(picture, ".png") == picture  # replaced, as plotting tools do
    (tmp_path / "notes.png").write_text("my notes, misnamed")
    with pytest.raises(OutputError, match="exists and is not a PNG picture"):
        check_page_output(tmp_path / "notes.png", ".png")
    (tmp_path / "corpus.txt").write_text("text")
    with pytest.raises(OutputError, match="does not end in .png"):
        check_page_output(tmp_path / "corpus.txt", ".png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_page_output(tmp_path / "dir.png", ".png")


def test_atomic_dir_never_replaces_a_file(tmp_path):
    (tmp_path / "out").write_text("precious")
    with pytest.raises(OutputError, match="is a file"):
        with atomic_dir(tmp_path / "out"):
            pass
    assert tree(tmp_path) == {"out": b"precious"}


def test_atomic_dir_leaves_nothing_on_failure(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "a" / "b" / "out") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []  # neither the temporary folder nor the parents it made
    make(tmp_path / "out", "old.txt")
    real_replace = os.replace

    def failing(src, dst):
        if str(src).endswith(f".out.tmp-{os.getpid()}"):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "new.txt").write_text("y")
    assert tree(tmp_path) == {"out": None, "out/old.txt": b"x"}  # the old folder is back, nothing else


def test_stale_temporaries_are_removed_or_restored_and_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lmlab.runs")
    make(tmp_path / f".data.tmp-{DEAD}", "train_000.bin")  # atomic_dir's temporary of a killed process
    make(tmp_path, f".tok.json.abcd1234.tmp-{DEAD}")  # atomic_write_text's
    make(tmp_path / f".hf.old-{DEAD}", "config.json")  # killed mid-replacement: hf itself is gone
    make(tmp_path / "run", "config.yaml")  # a --force run killed before its first checkpoint ...
    make(tmp_path / f".run.replaced-{DEAD}", "config.yaml", "checkpoints/step-000002/manifest.json")  # ... replaced this
    make(tmp_path / f".live.tmp-{os.getpid()}")  # a process still running: kept
    make(tmp_path / f".other.tmp-{DEAD}")  # another output's: kept when cleaning one output
    assert remove_stale_temporaries(tmp_path, "data") == [tmp_path / f".data.tmp-{DEAD}"]
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".live.tmp-{os.getpid()}", "hf", "run"]
    assert (tmp_path / "run" / "checkpoints" / "step-000002").is_dir()  # the old run is back
    assert (tmp_path / "hf" / "config.json").is_file()
    assert f"removed stale temporary {tmp_path / f'.tok.json.abcd1234.tmp-{DEAD}'}" in caplog.text
    assert f"restored {tmp_path / 'hf'}" in caplog.text


def test_check_output_cleans_its_own_stale_temporaries(tmp_path):
    make(tmp_path / f".out.tmp-{DEAD}", "half.bin")
    make(tmp_path / "out")
    check_output(tmp_path / "out", "data")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    atomic_write_text(tmp_path / "x.txt", "x")  # its temporary matches the stale pattern, and is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "x.txt"]
    assert oct((tmp_path / "x.txt").stat().st_mode & 0o777) != oct(0o600)  # not private like mkstemp's


def test_claim_output_undoes_a_failed_start(tmp_path):
    with pytest.raises(RuntimeError):
        with claim_output(tmp_path / "a" / "run"):
            make(tmp_path / "a" / "run", "config.yaml")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    make(tmp_path / "empty")
    with pytest.raises(KeyboardInterrupt):
        with claim_output(tmp_path / "empty"):
            make(tmp_path / "empty", "config.yaml")
            raise KeyboardInterrupt
    assert tree(tmp_path) == {"empty": None}  # the user's empty folder stays, empty
    make(tmp_path / "old", "config.yaml", "metrics.jsonl")
    with pytest.raises(RuntimeError):
        with claim_output(tmp_path / "old", replace=True):
            make(tmp_path / "old", "new.txt")
            raise RuntimeError
    assert sorted(tree(tmp_path / "old")) == ["config.yaml", "metrics.jsonl"]  # put back
    with claim_output(tmp_path / "old", replace=True) as claim:
        make(tmp_path / "old", "new.txt")
        claim.keep()
        make(tmp_path / "old", "later.txt")
    assert sorted(tree(tmp_path / "old")) == ["later.txt", "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "old"]


class FailingTask(RegressionTask):
    """Raises ``error`` when the batches of step ``at`` are asked for."""

    def __init__(self, error, at=0):
        super().__init__(8, 1)
        self.error, self.at = error, at

    def step_batches(self, step):
        if step == self.at:
            raise self.error
        return super().step_batches(step)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path):
    cfg = regression_config(tmp_path / "runs" / "run", max_steps=4, checkpoint_interval=2)
    with pytest.raises(RuntimeError):
        run_task(FailingTask(RuntimeError("boom")), cfg)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        run_task(FailingTask(RuntimeError("boom"), at=3), cfg)  # after the checkpoint at step 2: kept
    assert [p.name for p in (tmp_path / "runs" / "run" / "checkpoints").iterdir()] == ["step-000002"]


def test_ctrl_c_keeps_the_run_with_a_checkpoint(tmp_path):
    cfg = regression_config(tmp_path / "run", max_steps=4)
    result = run_task(FailingTask(KeyboardInterrupt(), at=1), cfg)
    assert result.interrupted and [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000001"]


def test_force_replaces_a_run_only_once_the_new_one_has_a_checkpoint(tmp_path):
    cfg = regression_config(tmp_path / "run", max_steps=2)
    run_task(RegressionTask(8, 1), cfg)
    old = tree(tmp_path)
    with pytest.raises(Exception, match="already holds a run; pass --resume to continue it, --force"):
        run_task(RegressionTask(8, 1), cfg)
    with pytest.raises(RuntimeError):
        run_task(FailingTask(RuntimeError("boom")), cfg, force=True)
    assert tree(tmp_path) == old  # the old run is back, untouched
    run_task(RegressionTask(8, 1), regression_config(tmp_path / "run", max_steps=3), force=True)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000003"]
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if "train_loss" in line] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with pytest.raises(Exception, match="give one of them"):
        run_task(RegressionTask(8, 1), cfg, resume=True, force=True)


def test_a_foreign_folder_is_never_a_run(tmp_path):
    make(tmp_path / "mine", "x")
    for force in (False, True):
        with pytest.raises(OutputError, match="holds files lmlab did not write"):
            run_task(RegressionTask(8, 1), regression_config(tmp_path / "mine", max_steps=1), force=force)
    assert tree(tmp_path) == {"mine": None, "mine/x": b"x"}

"""Decontamination (data/decontaminate.py): a training document sharing a 13-token n-gram with evaluation
data goes, one sharing 12 stays; evaluation files of every format; counts per file; train inputs only."""

import json

import pytest

from lmlab.cli import main
from lmlab.data.decontaminate import Decontaminator, evaluation_texts, tokens
from lmlab.errors import DataError

QUESTION = ("Which of these would help a student measure the mass of a small rock most accurately in the "
            "school laboratory today")
WORDS = QUESTION.split()  # 19 words


def arc_record(stem: str) -> dict:
    return {"id": "Q1", "question": {"stem": stem, "choices": [{"text": "a balance", "label": "A"},
                                                               {"text": "a ruler", "label": "B"}]},
            "answerKey": "A"}


def training_doc(shared: int) -> str:
    """Prose around the first ``shared`` words of QUESTION (differently cased and punctuated)."""
    return "Yesterday our teacher asked: " + ", ".join(WORDS[:shared]).upper() + "? Nobody knew."


def test_a_document_sharing_13_tokens_goes_and_one_sharing_12_stays(tmp_path):
    (tmp_path / "arc.jsonl").write_text(json.dumps(arc_record(QUESTION)) + "\n")
    decon = Decontaminator([str(tmp_path / "arc.jsonl")], n=13)
    assert not decon(training_doc(13))
    assert decon(training_doc(12))
    assert decon("An unrelated text about rivers and bread, long enough to have many thirteen word windows in it.")
    stats = decon.report()["files"][str(tmp_path / "arc.jsonl")]
    assert stats == {"texts": 7, "short_texts": 6, "ngrams": len(WORDS) - 12, "documents": 1}  # every string field


def test_tokens_are_lowercased_words_without_punctuation():
    assert tokens("The cat, sat... ON the MAT!") == ["the", "cat", "sat", "on", "the", "mat"]


def test_every_evaluation_format_and_per_file_counts(tmp_path):
    (tmp_path / "eval.txt").write_text("intro line\n" + QUESTION + "\n")
    (tmp_path / "eval.csv").write_text('id,dialogue,summary\n1,"' + QUESTION + '\nsecond line",short\n')
    (tmp_path / "eval.json").write_text(json.dumps([{"q": "nothing in common with anything here at all, no"}]))
    paths = [str(tmp_path / n) for n in ("eval.txt", "eval.csv", "eval.json")]
    assert QUESTION in next(evaluation_texts(paths[0]))
    assert list(evaluation_texts(paths[1])) == ["1", QUESTION + "\nsecond line", "short"]
    decon = Decontaminator(paths, n=13)
    assert not decon(training_doc(15))
    files = decon.report()["files"]
    assert [files[p]["documents"] for p in paths] == [1, 1, 0]  # one document, charged to both files holding it


def test_a_missing_or_malformed_evaluation_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl"):
        Decontaminator([str(tmp_path / "missing.jsonl")])
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1: invalid JSON"):
        Decontaminator([str(tmp_path / "bad.jsonl")])


def test_cli_exclude_applies_to_train_only_and_reports_per_file(tmp_path, capsys):
    (tmp_path / "arc.jsonl").write_text(json.dumps(arc_record(QUESTION)) + "\n")
    docs = [training_doc(13), training_doc(12), "Bread needs flour, water, salt and time to rise well."]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs) + "\n")
    (tmp_path / "val.txt").write_text(training_doc(19))  # contaminated, but val from --val is left alone
    code = main(["data", "prepare", str(tmp_path / "train.jsonl"), "--val", str(tmp_path / "val.txt"), "--kind",
                 "byte", "--exclude", str(tmp_path / "arc.jsonl"), "--exclude-ngram", "13",
                 "-o", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and f"decontamination by {tmp_path / 'arc.jsonl'}: 1 documents" in out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] == 2 and meta["splits"]["val"]["documents"] == 1
    assert meta["filters"]["removed"]["decontamination"] == {"documents": 1, "bytes": len(docs[0].encode())}
    assert meta["filters"]["decontamination"]["applies_to"] == "train inputs only"

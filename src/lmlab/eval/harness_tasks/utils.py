"""Loads the local ARC JSONL of arc_easy_local.yaml (imported by lm-eval from this folder, not by lmlab)."""

from pathlib import Path

import datasets


def flatten(record: dict) -> dict:
    """AI2's record ({"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}) in the fields of the
    hub's allenai/ai2_arc, which lm-eval's arc_easy prompt reads."""
    choices = record["question"]["choices"]
    return {"id": record["id"], "question": record["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": record["answerKey"]}


def load_arc(data_dir: str | None = None, data_files: dict | None = None, **_metadata) -> datasets.DatasetDict:
    """The splits in ``data_files`` (names relative to ``data_dir``, from ``--metadata '{"data_dir": DIR}'``),
    loaded by the datasets library's json builder and flattened. Every split's file must be there (lm-eval
    reads the train split even at zero shots)."""
    if not data_dir:
        raise ValueError('arc_easy_local needs the folder of the ARC-Easy JSONL files: --metadata \'{"data_dir": "DIR"}\'')
    folder = Path(data_dir).expanduser()
    files = {split: folder / name for split, name in (data_files or {}).items()}
    missing = [path.name for path in files.values() if not path.is_file()]
    if missing:
        raise ValueError(f"arc_easy_local: {folder} lacks {', '.join(missing)}")
    loaded = datasets.load_dataset("json", data_files={split: str(path) for split, path in files.items()})
    return datasets.DatasetDict({split: ds.map(flatten, remove_columns=ds.column_names) for split, ds in loaded.items()})

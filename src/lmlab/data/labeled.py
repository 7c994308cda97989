"""Labelled text for classification: TSV, CSV or JSONL files -> (text, label) examples -> padded batches.

    .tsv / .csv   a header row names the columns; ``text_field`` and ``label_field`` pick two of them
    .jsonl        one object per line with those two keys
    (any of them may be gzipped: .csv.gz; iter_rows reads the records, also for data/pairs.py)

Labels are kept as strings ("0", "positive", ...); a classifier's label list fixes their ids.
Batches group examples of similar length (less padding) in a seeded, reproducible order.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import DataError


@dataclass
class Example:
    text: str
    label: str | None  # None when the file has no label column (prediction)
    where: str  # "file:line", for error messages


def read_examples(path: str | Path, text_field: str = "sentence", label_field: str | None = "label") -> list[Example]:
    """Every (text, label) of a TSV/CSV/JSONL file; empty texts and missing fields are DataErrors."""
    path = Path(path)
    rows = list(iter_rows(path))
    if not rows:
        raise DataError(f"{path}: no examples")
    examples = []
    for line, row in rows:
        where = f"{path}:{line}"
        if text_field not in row:
            raise DataError(f"{where}: no field {text_field!r} (fields: {', '.join(map(str, row))}); set the text field")
        if not isinstance(row[text_field], (str, type(None))):
            raise DataError(f"{where}: field {text_field!r} is {row[text_field]!r}, not a text")
        text = (row[text_field] or "").strip()
        if not text:
            raise DataError(f"{where}: empty text")
        label = None
        if label_field is not None and label_field in row and row[label_field] not in (None, ""):
            label = str(row[label_field]).strip()
        elif label_field is not None and label_field not in row:
            raise DataError(f"{where}: no field {label_field!r} (fields: {', '.join(map(str, row))}); set the label field")
        examples.append(Example(text, label, where))
    return examples


TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")


def table_suffix(path: str | Path) -> str:
    """The suffix that says a table's format, looking through .gz (a.csv.gz -> .csv); may be none of TABLE_SUFFIXES."""
    name = Path(path).name.lower().removesuffix(".gz")
    return Path(name).suffix


def iter_rows(path: str | Path):
    """(line number, dict) for every record of a TSV/CSV file with a header or a JSONL file, gzipped or not.

    CSV fields may be quoted and hold line breaks (the csv module reads them); the line number is where
    the record ends. A missing, unreadable or malformed file is a DataError.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = table_suffix(path)
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path}: unknown format {suffix!r} (use .tsv, .csv or .jsonl, optionally .gz)")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:  # -sig: a byte-order mark is no header text
            yield from _rows(f, suffix, path)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed {suffix[1:].upper()} ({e})") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({e})") from None


def _rows(f, suffix: str, path: Path):
    """(line number, dict) for every record of an open file."""
    if suffix in (".jsonl", ".json"):
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{i}: expected a JSON object")
                yield i, obj
        return
    reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",",
                            quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL)
    header = reader.fieldnames or []
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:  # a dict keeps the last of them: say so rather than read one silently
        raise DataError(f"{path}: the header names {', '.join(map(repr, repeated))} more than once; rename the columns")
    for row in reader:
        yield reader.line_num, row


def label_ids(examples: list[Example], labels: list[str]) -> list[int]:
    """Label ids in ``labels`` order; a label outside the list is a DataError naming it and where."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for ex in examples:
        if ex.label is None:
            raise DataError(f"{ex.where}: no label")
        if ex.label not in index:
            raise DataError(f"{ex.where}: label {ex.label!r} was not seen in training (labels: {', '.join(labels)})")
        out.append(index[ex.label])
    return out


def encode_texts(tokenizer: Tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids with the tokenizer's template ([CLS] ... [SEP] for BERT), cut to ``max_length``."""
    ids = tokenizer.encode_batch(texts, add_special_tokens=True, max_length=max_length)
    return [x if x else [tokenizer.eot_id] for x in ids]


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    """Rows of different lengths as one (B, T) int64 tensor, padded on the right with ``value``:
    the one padding helper (token ids with the pad id, targets with the ignore index, masks with 0)."""
    width = max(map(len, rows))
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def pad_batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T) padded on the right with ``pad_id``, and the attention mask (B, T): 1 for real tokens."""
    return pad_rows(rows, pad_id), pad_rows([[1] * len(row) for row in rows], 0)


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index batches for one epoch: shuffled, then sorted by length within windows of 50 batches.

    Examples of similar length share a batch (little padding), yet the order stays random;
    the same (seed, epoch) always gives the same batches.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def sequential_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches for evaluation: sorted by length (fast), every example once."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[j:j + batch_size] for j in range(0, len(order), batch_size)]

"""Reading user text: files, directories, globs, JSONL, gzip -> a stream of NFC-normalised documents.

Text is read as strict UTF-8, streamed, never all at once. What counts as a document:

    .txt .md .py .rst (and any other file named explicitly)   the whole file (or one per line, split_lines=True)
    .jsonl                                                    one per line, the string in ``field``
    .json                                                     a list of strings/objects, or one object
    .gz                                                       gunzipped, then by the inner suffix (.txt.gz, .jsonl.gz)
    .parquet .arrow .feather                                  one per row, the string in column ``field`` (pyarrow)
    a Hugging Face ``datasets`` folder (save_to_disk)         its .arrow files, likewise; a DatasetDict folder
                                                              means its "train" split (give FOLDER/SPLIT for another)

Table files are read one record batch at a time (Arrow files memory-mapped), so memory stays
bounded whatever their size; pyarrow is optional (``pip install 'lmlab[data]'``).

A file bigger than PIECE_BYTES is not yielded as one giant string: it comes as consecutive
pieces of about PIECE_BYTES, cut after a newline where there is one, and every piece but the
last has ``continues=True``: the next Document continues the same text, so a consumer that
separates documents (prepare's end-of-text token) must not separate there.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from lmlab.errors import DataError, first_line

TABLE_SUFFIXES = (".parquet", ".arrow", ".feather")
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".jsonl", ".json", *TABLE_SUFFIXES)
HF_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes besides .arrow
PIECE_BYTES = 1 << 20  # big files are yielded in pieces of about this size
SNIFF_BYTES = 8192  # a NUL byte in this much of a file means it is binary


@dataclass
class Document:
    """One document's text (NFC) and where it came from ("path", or "path:line" for JSONL/lines).

    ``continues`` is True when the next Document is the rest of this same document (big files).
    """

    text: str
    source: str
    continues: bool = False


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Turn files, directories (recursive, sorted, known text suffixes) and glob patterns into files.

    Raises DataError for an input that is missing or matches nothing, or if no files result.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: dict[Path, None] = {}  # ordered set
    for item in map(str, inputs):
        for path in _expand_one(item):
            files.setdefault(path, None)
    if not files:
        raise DataError("no input files given")
    return list(files)


def iter_documents(inputs: list[str], field: str = "text", split_lines: bool = False) -> Iterator[Document]:
    """Yield the documents of all inputs in order, NFC-normalised, skipping blank ones.

    Raises DataError for binary files, invalid UTF-8, bad JSONL, or if no input has any text.
    """
    files = expand_inputs(inputs)
    found = False
    for path in files:
        for doc in _iter_file(path, field, split_lines):
            found = True
            yield doc
    if not found:
        names = ", ".join(str(p) for p in files[:3]) + (", ..." if len(files) > 3 else "")
        raise DataError(f"{names}: no text (the input is empty)")


def iter_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of a .jsonl or .json file (a list, or one value), gzipped or not."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = _inner_suffix(path)
    if suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: expected .jsonl or .json (optionally .gz)")
    try:
        with _open(path) as f:
            if suffix == ".json":
                raw = f.read()
                try:
                    data = json.loads(_decode(raw, path, 0))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
                for i, record in enumerate(data if isinstance(data, list) else [data]):
                    yield f"{path}[{i}]", record
                return
            offset = 0
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, path, offset)
                offset += len(raw)
                if line.strip():
                    try:
                        yield f"{path}:{lineno}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def iter_lines(path: str | Path) -> Iterator[str]:
    """Every line of a text file (gzipped or not), blank ones included, NFC-normalised, without its
    newline or a trailing \\r: what aligned files (one example per line) need, where a skipped blank
    line would shift every later line. Lines end at "\\n" only (as ``wc -l`` counts them)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with _open(path) as f:
            offset = 0
            for raw in f:
                line = _decode(raw, path, offset)
                offset += len(raw)
                yield _nfc(line.removesuffix("\n").removesuffix("\r"))
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


# ---------------------------------------------------------------------------- finding files


def _expand_one(item: str) -> list[Path]:
    if not item:
        raise DataError("an input file name is empty")
    path = Path(item)
    if path.is_dir() and _is_hf_folder(path):
        return _hf_files(path)
    if path.is_dir():
        found = _walk_dir(path)
        if not found:
            raise DataError(f"{item}: directory has no text files ({', '.join(TEXT_SUFFIXES)}, or .gz of them)")
        return found
    if path.is_file():
        return [path]
    if glob.has_magic(item):
        found = []
        for match in sorted(glob.glob(item, recursive=True)):
            p = Path(match)
            found += _walk_dir(p) if p.is_dir() else [p] if p.is_file() else []
        if not found:
            raise DataError(f"{item}: pattern matches no files")
        return found
    raise DataError(f"{item}: no such file or directory")


def _walk_dir(root: Path) -> list[Path]:
    """Text files under root, recursively, sorted; hidden files and folders (.git) are skipped."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).parts
        if p.name in HF_FILES and _is_hf_folder(p.parent):  # its .arrow files are the data
            continue
        if p.is_file() and not any(part.startswith(".") for part in rel) and _is_text_name(p):
            out.append(p)
    return out


def _is_hf_folder(path: Path) -> bool:
    """A folder written by datasets' save_to_disk: a Dataset (state.json) or a DatasetDict."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _hf_files(folder: Path) -> list[Path]:
    """The .arrow files of a save_to_disk folder, in order; a DatasetDict's "train" split."""
    if (folder / "dataset_dict.json").is_file():
        splits = _read_json(folder / "dataset_dict.json").get("splits", [])
        if "train" not in splits:
            raise DataError(f"{folder}: a DatasetDict without a train split (has {', '.join(splits)}); "
                            f"give {folder}/SPLIT")
        folder = folder / "train"
    state = _read_json(folder / "state.json")
    files = [folder / f["filename"] for f in state.get("_data_files", [])]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise DataError(f"{folder}: not a complete datasets folder (state.json lists {missing or 'no files'})")
    return files


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def _is_text_name(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return name.endswith(TEXT_SUFFIXES)


def _inner_suffix(path: Path) -> str:
    """The suffix that says the format, looking through .gz: a.jsonl.gz -> .jsonl."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return Path(name).suffix


# ---------------------------------------------------------------------------- reading files


def _open(path: Path) -> IO[bytes]:
    f: IO[bytes] = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    try:
        head = f.peek(SNIFF_BYTES)[:SNIFF_BYTES] if hasattr(f, "peek") else b""
    except (OSError, EOFError) as e:
        f.close()
        raise DataError(f"{path}: cannot read ({e})") from None
    if b"\x00" in head:
        f.close()
        raise DataError(f"{path}: looks binary (NUL bytes); lmlab reads UTF-8 text")
    return f


def _decode(data: bytes, path: Path, offset: int) -> str:
    """Strict UTF-8 decode; on failure name the file and the absolute byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: invalid UTF-8 at byte {offset + e.start}; lmlab reads UTF-8 text (re-encode the file)"
        ) from None


def _iter_file(path: Path, field: str, split_lines: bool) -> Iterator[Document]:
    suffix = _inner_suffix(path)
    if suffix in TABLE_SUFFIXES:
        yield from _iter_table(path, field)
        return
    try:
        if suffix == ".jsonl":
            yield from _iter_jsonl(path, field)
        elif suffix == ".json":
            yield from _iter_json(path, field)
        elif split_lines:
            yield from _iter_lines(path)
        else:
            yield from _iter_whole(path)
    except (OSError, EOFError, gzip.BadGzipFile) as e:  # unreadable, truncated or corrupt .gz
        raise DataError(f"{path}: cannot read ({e})") from None


def _iter_pieces(path: Path) -> Iterator[tuple[str, bool]]:
    """The file's text as (piece, is_last) of about PIECE_BYTES each, NFC-normalised.

    Cuts fall after a newline, or, in a line longer than a piece, before a space or an ASCII
    byte: safe points for UTF-8 and for NFC, which never composes across them.
    """
    with _open(path) as f:
        buf, offset = b"", 0  # offset: position of buf[0] in the file
        while chunk := f.read(PIECE_BYTES):
            buf += chunk
            while len(buf) > PIECE_BYTES:  # ">" so that a cut never leaves an empty last piece
                cut = _cut_point(buf)
                yield _nfc(_decode(buf[:cut], path, offset)), False
                buf, offset = buf[cut:], offset + cut
        if buf:
            yield _nfc(_decode(buf, path, offset)), True


def _cut_point(buf: bytes) -> int:
    """Where to end the next piece of buf (len(buf) > PIECE_BYTES)."""
    nl = buf.rfind(b"\n", 0, PIECE_BYTES)
    if nl >= 0:
        return nl + 1
    sp = buf.rfind(b" ", 1, PIECE_BYTES)
    if sp > 0:
        return sp
    for i in range(PIECE_BYTES - 1, 0, -1):  # before the last ASCII byte
        if buf[i] < 0x80:
            return i
    cut = PIECE_BYTES  # a megabyte of non-ASCII: back off to the start of a UTF-8 character
    while cut > PIECE_BYTES - 4 and 0x80 <= buf[cut] < 0xC0:
        cut -= 1
    return cut


def _iter_whole(path: Path) -> Iterator[Document]:
    """One document per file, in pieces (continues=True) when the file is big."""
    first = True
    for piece, is_last in _iter_pieces(path):
        if not (first and is_last and not piece.strip()):  # skip a blank file, never end a chain early
            yield Document(piece, str(path), continues=not is_last)
        first = False


def _iter_lines(path: Path) -> Iterator[Document]:
    """One document per non-blank line (without its newline or a trailing \\r)."""
    lineno, cont = 0, False  # cont: the previous Document continues into the current line
    for piece, is_last in _iter_pieces(path):
        lines = piece.split("\n")
        tail = lines.pop()  # text after the last newline: "", or a line going on past this piece
        if tail and is_last:  # last line without a final newline
            lines.append(tail)
            tail = ""
        for line in lines:
            lineno += 1
            line = line.removesuffix("\r")
            if cont or line.strip():
                yield Document(line, f"{path}:{lineno}")
            cont = False
        if tail:  # a line longer than a piece: yield its start now, the rest follows
            yield Document(tail, f"{path}:{lineno + 1}", continues=True)
            cont = True


def _iter_jsonl(path: Path, field: str) -> Iterator[Document]:
    """One document per JSONL line: the string at ``field``; blank lines are skipped."""
    with _open(path) as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, path, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            text = _field(record, field, f"{path}:{lineno}")
            if text.strip():
                yield Document(_nfc(text), f"{path}:{lineno}")


def _iter_json(path: Path, field: str) -> Iterator[Document]:
    """A .json file: a list of strings or objects with ``field``, or one such object (read whole)."""
    with _open(path) as f:
        raw = f.read()
    try:
        data = json.loads(_decode(raw, path, 0))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    records = data if isinstance(data, list) else [data]
    for i, record in enumerate(records):
        where = f"{path}[{i}]" if isinstance(data, list) else str(path)
        text = record if isinstance(record, str) else _field(record, field, where)
        if text.strip():
            yield Document(_nfc(text), where)


def _iter_table(path: Path, field: str) -> Iterator[Document]:
    """One document per row of a Parquet or Arrow file: the string in column ``field``; nulls and
    blank strings are skipped. Read one record batch at a time."""
    row = 0
    for batch in _record_batches(path, field):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is not None and text.strip():
                yield Document(_nfc(text), f"{path}[{row - 1}]")


def _record_batches(path: Path, field: str) -> Iterator:
    """The column ``field`` of a table file, as record batches (of Parquet's row groups, or the
    Arrow file's own batches, memory-mapped)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading {path.suffix} files needs pyarrow: pip install 'lmlab[data]'") from None
    try:
        if path.suffix.lower() == ".parquet":
            table = pq.ParquetFile(path)
            _check_column(path, table.schema_arrow, field, pa)
            yield from table.iter_batches(batch_size=1024, columns=[field])
            return
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_file(source)  # .feather / .arrow written as a file
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            reader = pa.ipc.open_stream(source)  # what datasets' save_to_disk writes
            batches = iter(reader)
        _check_column(path, reader.schema, field, pa)
        index = reader.schema.get_field_index(field)
        for batch in batches:
            yield batch.select([index])
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read ({first_line(e)})") from None


def _check_column(path: Path, schema, field: str, pa) -> None:
    if field not in schema.names:
        names = ", ".join(schema.names[:5])
        raise DataError(f"{path}: no column {field!r} (columns: {names}); choose one with --field")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"):
        raise DataError(f"{path}: column {field!r} is {kind}, not text")


def _field(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a {field!r} field, got {type(record).__name__}")
    if field not in record:
        keys = ", ".join(list(record)[:5])
        raise DataError(f"{where}: no field {field!r} (fields: {keys}); choose one with --field")
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
    return text


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)

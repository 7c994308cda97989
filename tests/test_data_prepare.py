"""Reading inputs and preparing token shards: formats, splits, dedupe, meta.json, errors."""

import gzip
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest

import lmlab.data.sources as sources
from lmlab.data.prepare import load_meta, memmap_split, prepare
from lmlab.data.sources import iter_documents
from lmlab.data.tokenizer import EOT, Tokenizer, train_tokenizer
from lmlab.errors import DataError, OutputError

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\n\u00e9"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer("char", [ALPHABET])


def tokens(out: Path, split: str) -> list[int]:
    return [int(t) for m in memmap_split(out, split) for t in m]


def docs_of(ids: list[int], tok: Tokenizer) -> list[str]:
    """Split a token stream at end-of-text tokens and decode each document."""
    out, cur = [], []
    for i in ids:
        if i == tok.eot_id:
            out.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert cur == [], "stream must end with end-of-text"
    return out


def mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def write_docs(folder: Path, n: int = 40) -> list[str]:
    texts = [f"document number {i}: some text here.\n" for i in range(n)]
    for i, t in enumerate(texts):
        (folder / f"doc{i:03d}.txt").write_text(t, encoding="utf-8")
    return texts


def test_txt_file_tail_split(tok, tmp_path):
    text = "".join(f"line {i} of the play.\n" for i in range(200))
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "data"
    meta = prepare([str(tmp_path / "input.txt")], tok, out, split="tail", val_fraction=0.1)
    train, val = tokens(out, "train"), tokens(out, "val")
    allids = tok.encode(text) + [tok.eot_id]
    assert train + val == allids
    assert len(val) == round(0.1 * len(allids))  # the last 10% of the tokens
    assert meta["split"] == "tail" and meta["documents"] == 1
    assert meta["splits"]["train"]["documents"] == meta["splits"]["val"]["documents"] == 1
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == len(text.encode())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "input.txt"]  # no temporary folder left


def test_meta_json_fields(tok, tmp_path):
    write_docs(mkdir(tmp_path / "in"))
    out = tmp_path / "data"
    meta = prepare([str(tmp_path / "in")], tok, out, val_fraction=0.25)
    assert json.loads((out / "meta.json").read_text()) == meta == load_meta(out)
    for key, value in {
        "format": "lmlab-tokens", "version": 1, "dtype": "uint16", "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id, "tokenizer_sha256": tok.sha256(), "tokenizer_kind": "char",
        "normalization": "NFC", "dedupe": False, "duplicates_removed": 0, "split": "hash",
        "val_fraction": 0.25, "documents": 40, "inputs": [str(tmp_path / "in")],
    }.items():
        assert meta[key] == value, key
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["shards"] == ["train_000.bin"] and val["shards"] == ["val_000.bin"]
    assert train["documents"] + val["documents"] == 40 and val["documents"] > 0
    assert train["tokens"] == len(tokens(out, "train")) and val["tokens"] == len(tokens(out, "val"))
    assert train["bytes"] + val["bytes"] == 40 * len("document number 10: some text here.\n") - 10
    assert Tokenizer.load(out).sha256() == tok.sha256()


def test_eot_separates_documents_and_hash_split_is_deterministic(tok, tmp_path):
    texts = write_docs(mkdir(tmp_path / "in"))
    m1 = prepare([str(tmp_path / "in")], tok, tmp_path / "a")
    m2 = prepare([str(tmp_path / "in" / "*.txt")], tok, tmp_path / "b")  # a glob, same files
    assert m1["splits"] == m2["splits"]
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"{split}_000.bin").read_bytes() == (tmp_path / "b" / f"{split}_000.bin").read_bytes()
    got = docs_of(tokens(tmp_path / "a", "train"), tok) + docs_of(tokens(tmp_path / "a", "val"), tok)
    assert sorted(got) == sorted(texts)


def test_hash_split_falls_back_to_tail_for_one_document(tok, tmp_path):
    (tmp_path / "one.txt").write_text("a single document. " * 30, encoding="utf-8")
    meta = prepare([str(tmp_path / "one.txt")], tok, tmp_path / "out", val_fraction=0.1)
    assert meta["split"] == "tail" and meta["split_requested"] == "hash"
    assert meta["splits"]["val"]["tokens"] == round(0.1 * (30 * 19 + 1))
    assert not list((tmp_path / "out").glob(".*"))  # no leftover temporary shards


def test_jsonl_field_and_gzip(tok, tmp_path):
    rows = [{"body": f"row {i} text", "id": i} for i in range(10)]
    lines = "".join(json.dumps(r) + "\n" for r in rows) + "\n"  # a blank line is skipped
    folder = mkdir(tmp_path / "in")
    (folder / "a.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    with gzip.open(folder / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("gzipped plain text\n")
    docs = list(iter_documents([str(folder)], field="body"))
    assert [d.text for d in docs] == [r["body"] for r in rows] * 2 + ["gzipped plain text\n"]
    assert docs[0].source.endswith("a.jsonl:1")
    meta = prepare([str(folder)], tok, tmp_path / "out", field="body", val_fraction=0.2)
    assert meta["documents"] == 21


def test_split_lines_and_big_files_in_pieces(tok, tmp_path, monkeypatch):
    text = "".join(f"line {i}\r\n" if i % 3 else "\n" for i in range(30)) + "last line"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    lines = [d.text for d in iter_documents([str(tmp_path / "a.txt")], split_lines=True)]
    assert lines == [f"line {i}" for i in range(30) if i % 3] + ["last line"]
    monkeypatch.setattr(sources, "PIECE_BYTES", 16)  # force many pieces
    pieces = list(iter_documents([str(tmp_path / "a.txt")]))
    assert len(pieces) > 5 and all(p.continues for p in pieces[:-1]) and not pieces[-1].continues
    assert "".join(p.text for p in pieces) == text
    meta = prepare([str(tmp_path / "a.txt")], tok, tmp_path / "out", split="tail")
    ids = tokens(tmp_path / "out", "train") + tokens(tmp_path / "out", "val")
    assert ids == tok.encode(text) + [tok.eot_id]  # one document: no end-of-text between pieces
    assert meta["documents"] == 1


def test_nfc_normalisation(tok, tmp_path):
    composed, decomposed = "caf\u00e9 au lait\n", "cafe\u0301 au lait\n"
    assert composed != decomposed and unicodedata.normalize("NFC", decomposed) == composed
    (tmp_path / "c.txt").write_text(composed, encoding="utf-8")
    (tmp_path / "d.txt").write_text(decomposed, encoding="utf-8")
    docs = list(iter_documents([str(tmp_path / "c.txt"), str(tmp_path / "d.txt")]))
    assert docs[0].text == docs[1].text == composed
    for name in ("c", "d"):
        prepare([str(tmp_path / f"{name}.txt")], tok, tmp_path / name, split="tail", val_fraction=0)
    assert (tmp_path / "c" / "train_000.bin").read_bytes() == (tmp_path / "d" / "train_000.bin").read_bytes()


def test_dedupe_drops_exact_duplicates(tok, tmp_path):
    rows = ["alpha one", "beta two", "alpha one", "gamma three", "beta two", "alpha one"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    meta = prepare([str(tmp_path / "a.jsonl")], tok, tmp_path / "out", dedupe=True, split="tail", val_fraction=0)
    assert meta["dedupe"] is True and meta["duplicates_removed"] == 3 and meta["documents"] == 3
    assert docs_of(tokens(tmp_path / "out", "train"), tok) == ["alpha one", "beta two", "gamma three"]
    meta = prepare([str(tmp_path / "a.jsonl")], tok, tmp_path / "out", split="tail", val_fraction=0, force=True)
    assert meta["duplicates_removed"] == 0 and meta["documents"] == 6


def test_literal_eot_in_text_is_not_a_separator(tok, tmp_path):
    (tmp_path / "a.txt").write_text(f"before {EOT} after", encoding="utf-8")
    prepare([str(tmp_path / "a.txt")], tok, tmp_path / "out", split="tail", val_fraction=0)
    ids = tokens(tmp_path / "out", "train")
    assert ids.count(tok.eot_id) == 1 and tok.decode(ids[:-1]) == f"before {EOT} after"


def test_shards_and_replacing_an_existing_folder(tok, tmp_path):
    write_docs(mkdir(tmp_path / "in"))
    out = tmp_path / "out"
    meta = prepare([str(tmp_path / "in")], tok, out, shard_tokens=100)
    train = meta["splits"]["train"]
    assert len(train["shards"]) == -(-train["tokens"] // 100)
    assert all(len(m) == 100 for m in memmap_split(out, "train")[:-1])
    with pytest.raises(OutputError, match="already holds a prepared data folder; pass --force"):
        prepare([str(tmp_path / "in" / "doc00*.txt")], tok, out, val_fraction=0.5)
    assert load_meta(out) == meta
    meta2 = prepare([str(tmp_path / "in" / "doc00*.txt")], tok, out, val_fraction=0.5, force=True)  # replaces it
    assert meta2["documents"] == 10 and sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    assert set(p.name for p in out.iterdir()) == {"meta.json", "tokenizer.json", *meta2["splits"]["train"]["shards"],
                                                 *meta2["splits"]["val"]["shards"]}


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (path to give prepare, text the message must contain)."""
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "binary.txt").write_bytes(b"PK\x03\x04\x00\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("ok text then caf\u00e9".encode("latin-1"))
    (tmp_path / "nofield.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n', encoding="utf-8")
    (tmp_path / "badjson.jsonl").write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    (tmp_path / "notstr.jsonl").write_text('{"text": 5}\n', encoding="utf-8")
    return {
        "missing": (str(tmp_path / "missing.txt"), "missing.txt: no such file"),
        "glob": (str(tmp_path / "*.nothing"), "matches no files"),
        "empty": (str(tmp_path / "empty.txt"), "empty.txt: no text"),
        "binary": (str(tmp_path / "binary.txt"), "binary.txt: looks binary"),
        "utf8": (str(tmp_path / "latin1.txt"), "latin1.txt: invalid UTF-8 at byte 16"),
        "field": (str(tmp_path / "nofield.jsonl"), "nofield.jsonl:2: no field 'text'"),
        "json": (str(tmp_path / "badjson.jsonl"), "badjson.jsonl:2: invalid JSON"),
        "notstr": (str(tmp_path / "notstr.jsonl"), "notstr.jsonl:1: field 'text' is int"),
    }


@pytest.mark.parametrize("case", ["missing", "glob", "empty", "binary", "utf8", "field", "json", "notstr"])
def test_bad_inputs_raise_data_error_and_leave_nothing(tok, tmp_path, case):
    path, message = _bad_inputs(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError) as err:
        prepare([path], tok, tmp_path / "out")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out dir, no temporary dir


def test_failed_prepare_keeps_the_old_folder(tok, tmp_path):
    write_docs(mkdir(tmp_path / "in"))
    out = tmp_path / "out"
    meta = prepare([str(tmp_path / "in")], tok, out)
    (tmp_path / "in" / "zzz.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match="zzz.txt: invalid UTF-8 at byte 0"):
        prepare([str(tmp_path / "in")], tok, out, force=True)
    assert load_meta(out) == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_bad_settings(tok, tmp_path):
    (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
    for vf in (-0.1, 1.0, 1.5):
        with pytest.raises(DataError, match="val_fraction"):
            prepare([str(tmp_path / "a.txt")], tok, tmp_path / "out", val_fraction=vf)
    with pytest.raises(DataError, match=r"a.txt: too little text: train has \d+ tokens and val has \d+"):
        prepare([str(tmp_path / "a.txt")], tok, tmp_path / "out", min_split_tokens=1000)
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious.txt").write_text("mine", encoding="utf-8")
    for force in (False, True):
        with pytest.raises(OutputError, match="keep holds files lmlab did not write"):
            prepare([str(tmp_path / "a.txt")], tok, tmp_path / "keep", force=force)
    assert (tmp_path / "keep" / "precious.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "keep"]


def test_load_meta_errors(tmp_path):
    with pytest.raises(DataError, match="is not a prepared data folder .no meta.json.; run `lmlab data prepare`"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"format": "other"}')
    with pytest.raises(DataError, match="meta.json"):
        load_meta(tmp_path)


def test_uint32_for_big_vocab(tmp_path):
    from lmlab.data.prepare import token_dtype

    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    with pytest.raises(DataError, match="too large"):
        token_dtype(2**33)


# ---------------------------------------------------------------------------- explicit split files


def write_benchmark(folder: Path) -> dict[str, Path]:
    """A tiny PTB-like benchmark: train/valid/test files of space-separated words, one sentence a line."""
    texts = {
        "train": "the cat sat on the mat\n the dog sat \n\na cat ran\n",
        "valid": "the cat ran\nthe zebra sat\n",
        "test": "a dog sat on the mat\n",
    }
    paths = {}
    for name, text in texts.items():
        paths[name] = folder / f"bench.{name}.txt"
        paths[name].write_text(text, encoding="utf-8")
    return paths


def test_explicit_val_and_test_files(tmp_path):
    paths = write_benchmark(tmp_path)
    tok = train_tokenizer("word", [paths["train"].read_text()])
    out = tmp_path / "out"
    meta = prepare([str(paths["train"])], tok, out, val_inputs=[str(paths["valid"])], test_inputs=[str(paths["test"])])
    assert meta["split"] == "files" and meta["val_fraction"] is None and meta["documents"] == 3
    assert meta["inputs"] == [str(paths["train"])]
    assert meta["val_inputs"] == [str(paths["valid"])] and meta["test_inputs"] == [str(paths["test"])]
    assert load_meta(out) == meta and meta["tokenizer_kind"] == "word"
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        text = paths[name].read_text()
        ids = tokens(out, split)
        assert ids == tok.encode(text) + [tok.eot_id]
        assert len(ids) == len(text.split()) + text.count("\n") + 1  # words + one <eos> a line + one EOT
        info = meta["splits"][split]
        assert info == {"shards": [f"{split}_000.bin"], "tokens": len(ids), "documents": 1, "bytes": len(text.encode())}
    assert tok.decode(tokens(out, "val")[:-1]) == "the cat ran\nthe <unk> sat\n"


def test_test_files_beside_a_hash_split(tok, tmp_path):
    write_docs(mkdir(tmp_path / "in"))
    (tmp_path / "test.txt").write_text("held out text\n", encoding="utf-8")
    meta = prepare([str(tmp_path / "in")], tok, tmp_path / "out", test_inputs=[str(tmp_path / "test.txt")])
    assert meta["split"] == "hash" and meta["val_fraction"] == 0.1 and "val_inputs" not in meta
    assert set(meta["splits"]) == {"train", "val", "test"} and meta["documents"] == 41
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40
    assert docs_of(tokens(tmp_path / "out", "test"), tok) == ["held out text\n"]


def test_dedupe_stays_within_a_split(tok, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "same"}\n{"text": "same"}\n{"text": "other"}\n', encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "same"}\n', encoding="utf-8")
    meta = prepare([str(tmp_path / "a.jsonl")], tok, tmp_path / "out", dedupe=True,
                   val_inputs=[str(tmp_path / "b.jsonl")], test_inputs=[str(tmp_path / "b.jsonl")])
    assert meta["duplicates_removed"] == 1
    assert [meta["splits"][s]["documents"] for s in ("train", "val", "test")] == [2, 1, 1]


def test_explicit_split_errors_leave_nothing(tok, tmp_path):
    (tmp_path / "a.txt").write_text("some train text\n", encoding="utf-8")
    (tmp_path / "v.txt").write_text("val\n", encoding="utf-8")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError, match="missing.txt: no such file"):
        prepare([str(tmp_path / "a.txt")], tok, tmp_path / "out", test_inputs=[str(tmp_path / "missing.txt")])
    with pytest.raises(DataError, match=r"v.txt: too little text: train has 17 tokens, val has 5 and test has 5; "
                                        r"each split needs at least 10"):
        prepare([str(tmp_path / "a.txt")], tok, tmp_path / "out", val_inputs=[str(tmp_path / "v.txt")],
                test_inputs=[str(tmp_path / "v.txt")], min_split_tokens=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_prepare_word_benchmark(tmp_path, capsys):
    from lmlab.cli import main

    paths = write_benchmark(tmp_path)
    out = tmp_path / "data"
    assert main(["data", "prepare", str(paths["train"]), "--val", str(paths["valid"]), "--test", str(paths["test"]),
                 "--kind", "word", "--min-freq", "2", "-o", str(out)]) == 0
    assert "train 17 tokens, val 9 tokens, test 8 tokens" in capsys.readouterr().out
    tok = Tokenizer.load(out)  # trained on the train file only: "zebra" is unknown, min_freq drops "a", "ran"...
    assert tok.kind == "word" and tok.vocab_size == 6  # <unk> <eos> the cat sat EOT
    assert load_meta(out)["split"] == "files"

"""Parallel data: reading aligned pairs (two files, TSV, CSV, JSONL, .gz), the pairs folder, batches."""

import csv
import gzip
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.data.loader import TokenShards
from lmlab.data.pairs import (IGNORE, PairShards, eval_pair_batches, make_batch, pair_batch, padding_fraction,
                              prepare_pairs)
from lmlab.data.prepare import prepare
from lmlab.data.tokenizer import Tokenizer, train_tokenizer
from lmlab.errors import DataError
from lmlab.runs import output_kind

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\n\u00e9\u00fc"
SOURCES = [f"source sentence {i} " + "word " * (i % 7) for i in range(40)]
TARGETS = [f"Zielsatz {i} " + "wort " * (i % 5) + "\u00fc" for i in range(40)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer("char", [ALPHABET])


def write_lines(path: Path, lines: list[str]) -> Path:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def decoded(tok: Tokenizer, shards: PairShards) -> list[tuple[str, str]]:
    return [(tok.decode(s), tok.decode(t)) for s, t in (shards.pair(i) for i in range(len(shards)))]


def test_two_gz_files_round_trip_and_skip_empty_pairs(tok, tmp_path):
    src = SOURCES[:10] + ["  padded source  ", "no target", "", "cafe\u0301"]  # NFD e + accent
    tgt = TARGETS[:10] + ["padded target", "   ", "no source", "Caf\u00e9"]
    train = [str(write_lines(tmp_path / "train.en.gz", src)), str(write_lines(tmp_path / "train.de.gz", tgt))]
    val = [str(write_lines(tmp_path / "val.en", SOURCES[10:14])), str(write_lines(tmp_path / "val.de", TARGETS[10:14]))]
    out = tmp_path / "data"
    meta = prepare_pairs(train, tok, out, val_inputs=val)
    assert meta["format"] == "lmlab-pairs" and meta["split"] == "files" and meta["skipped"] == {"train": 2, "val": 0}
    expected = list(zip(src[:10], tgt[:10])) + [("padded source", "padded target"), ("caf\u00e9", "Caf\u00e9")]
    assert decoded(tok, PairShards(out, "train")) == [(s.strip(), t.strip()) for s, t in expected]
    val_shards = PairShards(out, "val")
    assert decoded(tok, val_shards) == [(s.strip(), t.strip()) for s, t in zip(SOURCES[10:14], TARGETS[10:14])]
    assert val_shards.texts() == [{"source": s.strip(), "target": t.strip()} for s, t in zip(SOURCES[10:14], TARGETS[10:14])]
    info = meta["splits"]["train"]
    assert info["pairs"] == 12 and info["target"]["max_len"] == max(len(t.strip()) for _, t in expected)
    offsets = np.fromfile(out / info["source"]["offsets"], dtype=np.int64)
    assert len(offsets) == 13 and offsets[-1] == info["source"]["tokens"]
    assert output_kind(out) == "data" and Tokenizer.load(out).sha256() == tok.sha256()


def test_misaligned_files_refused_with_both_counts_and_nothing_written(tok, tmp_path):
    en = str(write_lines(tmp_path / "a.en.gz", SOURCES[:7]))
    de = str(write_lines(tmp_path / "a.de.gz", TARGETS[:9]))
    out = tmp_path / "data"
    with pytest.raises(DataError, match=r"a.en.gz has 7 lines but .*a.de.gz has 9: the files are not aligned"):
        prepare_pairs([en, de], tok, out, val_fraction=0.5)
    ok = [str(write_lines(tmp_path / "b.en", SOURCES)), str(write_lines(tmp_path / "b.de", TARGETS))]
    with pytest.raises(DataError, match="9 lines but .* has 7"):  # a bad test split, found after train was written
        prepare_pairs(ok, tok, out, test_inputs=[de, en])
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_tsv_jsonl_and_multiline_csv_gz_tables(tok, tmp_path):
    dialogues = ["Amanda: hi!\nTom: hello, how are you?\r\nAmanda: fine", "Bob: \"quoted\", yes\nAnn: ok"]
    summaries = ["Amanda greets Tom.", "Bob agrees."]
    with gzip.open(tmp_path / "train.csv.gz", "wt", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "dialogue", "summary"])
        w.writerows([[i, d, s] for i, (d, s) in enumerate(zip(dialogues * 5, summaries * 5))])
    (tmp_path / "val.tsv").write_text("src\ttgt\nein Satz\ta sentence\nzwei\ttwo\n", encoding="utf-8")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"dialogue": d, "summary": s}) + "\n"
                                                 for d, s in zip(dialogues, summaries)), encoding="utf-8")
    out = tmp_path / "data"
    with pytest.raises(DataError, match=r"val.tsv:2: no field 'dialogue' \(fields: src, tgt\)"):
        prepare_pairs([str(tmp_path / "train.csv.gz")], tok, out, val_inputs=[str(tmp_path / "val.tsv")],
                      source_field="dialogue", target_field="summary")
    (tmp_path / "val.tsv").write_text("dialogue\tsummary\nein Satz\ta sentence\nzwei\ttwo\n", encoding="utf-8")
    prepare_pairs([str(tmp_path / "train.csv.gz")], tok, out, val_inputs=[str(tmp_path / "val.tsv")],
                  test_inputs=[str(tmp_path / "test.jsonl")], source_field="dialogue", target_field="summary")
    # csv keeps the line breaks inside quoted fields as written, \r\n included
    assert decoded(tok, PairShards(out, "train"))[:2] == list(zip(dialogues, summaries))
    assert decoded(tok, PairShards(out, "val")) == [("ein Satz", "a sentence"), ("zwei", "two")]
    assert [x["source"] for x in PairShards(out, "test").texts()] == dialogues


def test_hash_split_is_deterministic_and_keeps_equal_sources_together(tok, tmp_path):
    src = SOURCES + SOURCES[:5]  # five sources twice, with other targets
    tgt = TARGETS + ["another"] * 5
    inputs = [str(write_lines(tmp_path / "s.txt", src)), str(write_lines(tmp_path / "t.txt", tgt))]
    meta = prepare_pairs(inputs, tok, tmp_path / "a", val_fraction=0.3)
    again = prepare_pairs(inputs, tok, tmp_path / "b", val_fraction=0.3)
    assert meta["split"] == "hash" and meta["splits"] == again["splits"]
    train, val = (decoded(tok, PairShards(tmp_path / "a", s)) for s in ("train", "val"))
    assert len(train) + len(val) == 45 and 0 < len(val) < 45
    assert not {s for s, _ in train} & {s for s, _ in val}
    assert sorted(train + val) == sorted((s.strip(), t.strip()) for s, t in zip(src, tgt))


@pytest.fixture(scope="module")
def shards(tok, tmp_path_factory) -> PairShards:
    folder = tmp_path_factory.mktemp("pairs")
    src = [("word " * (1 + i % 13)).strip() for i in range(60)]
    tgt = [f"t{i}" + " x" * (i % 9) for i in range(60)]
    inputs = [str(write_lines(folder / "s.txt", src)), str(write_lines(folder / "t.txt", tgt))]
    prepare_pairs(inputs, tok, folder / "data", val_inputs=inputs)
    return PairShards(folder / "data", "train")


def test_batches_are_padded_right_with_masks_and_ignored_targets(shards):
    batch = pair_batch(shards, batch_size=8, seed=1, step=3, max_source_len=100, max_target_len=100)
    same = pair_batch(shards, batch_size=8, seed=1, step=3, max_source_len=100, max_target_len=100)
    other = pair_batch(shards, batch_size=8, seed=1, step=4, max_source_len=100, max_target_len=100)
    assert batch.indices == same.indices and batch.indices != other.indices
    eot, pad = shards.eot_id, shards.pad_id
    assert batch.src.dtype == batch.tgt_in.dtype == batch.targets.dtype == torch.int64
    assert batch.src_mask.dtype == torch.bool and batch.src.shape[0] == batch.targets.shape[0] == 8
    for row, i in enumerate(batch.indices):
        src, tgt = shards.pair(i)
        n, m = len(src), len(tgt) + 1
        assert batch.src[row, :n].tolist() == src.tolist() and batch.src_mask[row].sum() == n
        assert (batch.src[row, n:] == pad).all() and not batch.src_mask[row, n:].any()
        assert batch.tgt_in[row, :m].tolist() == [eot, *tgt.tolist()]
        assert batch.targets[row, :m].tolist() == [*tgt.tolist(), eot]
        assert (batch.targets[row, m:] == IGNORE).all() and (batch.tgt_in[row, m:] == pad).all()
    assert batch.src.shape[1] == max(len(shards.pair(i)[0]) for i in batch.indices)


def test_long_pairs_are_cut_and_the_cut_logged_once(shards, caplog):
    batches = [pair_batch(shards, batch_size=8, seed=0, step=s, max_source_len=10, max_target_len=4) for s in range(3)]
    assert len([r for r in caplog.records if "they are cut" in r.getMessage()]) == 1
    for batch in batches:
        assert batch.src.shape[1] <= 10 and batch.tgt_in.shape[1] <= 4
        for row, i in enumerate(batch.indices):
            src, tgt = shards.pair(i)
            assert batch.src[row][batch.src_mask[row]].tolist() == src[:10].tolist()
            full = [shards.eot_id, *tgt.tolist(), shards.eot_id][:5]  # a cut target does not end in eot
            kept = batch.targets[row] != IGNORE
            assert batch.targets[row][kept].tolist() == full[1:] and batch.tgt_in[row][kept].tolist() == full[:-1]


def test_length_grouping_cuts_padding_and_stays_deterministic(shards):
    def mean_padding(group, side="all"):
        return np.mean([padding_fraction(pair_batch(shards, 8, seed=5, step=s, group=group))[side]
                        for s in range(20)])

    grouped = pair_batch(shards, 8, seed=5, step=2, group=4)
    assert grouped.indices == pair_batch(shards, 8, seed=5, step=2, group=4).indices
    assert len(set(grouped.indices)) == 8
    assert mean_padding(4, "source") < 0.6 * mean_padding(0, "source")  # sorted by source length first
    assert mean_padding(4) < 0.8 * mean_padding(0)


def test_eval_batches_cover_every_pair_once_in_length_order(shards):
    seen = []
    for batch in eval_pair_batches(shards, batch_size=7):
        seen += batch.indices
        ref = make_batch(shards, batch.indices, 512, 512)
        assert (batch.src == ref.src).all() and (batch.targets == ref.targets).all()
    assert sorted(seen) == list(range(len(shards)))
    lengths = shards.lengths("source")[seen]
    assert (np.diff(lengths) >= 0).all()


def test_folders_of_the_other_format_are_refused(tok, tmp_path, shards):
    (tmp_path / "a.txt").write_text("some text for a token stream\n" * 20, encoding="utf-8")
    prepare([str(tmp_path / "a.txt")], tok, tmp_path / "tokens", split="tail")
    with pytest.raises(DataError, match="not a prepared pairs folder"):
        PairShards(tmp_path / "tokens", "train")
    with pytest.raises(DataError, match="holds parallel pairs"):
        TokenShards(shards.folder, "train")
    with pytest.raises(DataError, match="no 'test' split"):
        PairShards(shards.folder, "test")


def test_cli_prepares_pairs_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    en = str(write_lines(tmp_path / "train.en.gz", SOURCES))
    de = str(write_lines(tmp_path / "train.de.gz", TARGETS))
    out = str(tmp_path / "data")
    assert main(["data", "prepare", "--pairs", en, de, "--kind", "char", "--val-fraction", "0.2", "-o", out, "-q"]) == 0
    assert "train" in capsys.readouterr().out and output_kind(out) == "data"
    assert main(["data", "prepare", "--pairs", en, de, "--kind", "char", "-o", out, "-q"]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert main(["data", "prepare", "--pairs", en, de, "--kind", "char", "-o", out, "--force", "-q"]) == 0
    capsys.readouterr()
    cases = [
        (["--pairs", en, "-o", str(tmp_path / "x")], "pairs given as one input come as a table"),
        (["--pairs", en, de, en, "-o", str(tmp_path / "x")], "got 3"),
        (["--pairs", en, str(write_lines(tmp_path / "short.de", TARGETS[:3])), "-o", str(tmp_path / "x")],
         "has 40 lines but"),
        (["--pairs", en, de, "--split-lines", "-o", str(tmp_path / "x")], "--split-lines: not used with --pairs"),
        ([en, "--source-field", "a", "-o", str(tmp_path / "x")], "--source-field: only with --pairs"),
    ]
    for argv, message in cases:
        assert main(["data", "prepare", *argv, "--kind", "char", "-q"]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and not (tmp_path / "x").exists()


def test_nfc_of_table_text(tok, tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"source": "e\u0301t\u00e9", "target": "x"}) + "\n", encoding="utf-8")
    prepare_pairs([str(tmp_path / "t.jsonl")], tok, tmp_path / "d", val_inputs=[str(tmp_path / "t.jsonl")])
    assert decoded(tok, PairShards(tmp_path / "d", "val")) == [(unicodedata.normalize("NFC", "e\u0301t\u00e9"), "x")]

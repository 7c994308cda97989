"""Table inputs: Parquet, Arrow/Feather files and Hugging Face datasets folders, read by record batch."""

import sys

import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.feather as feather  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from lmlab.data.prepare import prepare  # noqa: E402
from lmlab.data.sources import expand_inputs, iter_documents  # noqa: E402
from lmlab.data.tokenizer import train_tokenizer  # noqa: E402
from lmlab.errors import DataError  # noqa: E402

ROWS = [f"row {i}: cafe\u0301 text" if i % 7 else "" for i in range(2500)]  # blanks every 7th; NFD accents


def table():
    return pa.table({"id": list(range(len(ROWS))), "body": ROWS})


def expected():
    return [r.replace("e\u0301", "\u00e9") for r in ROWS if r]


def test_parquet_by_row_groups(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(table(), path, row_group_size=300)
    docs = list(iter_documents([str(path)], field="body"))
    assert [d.text for d in docs] == expected()
    assert docs[0].source == f"{path}[1]"


@pytest.mark.parametrize("suffix, write", [
    (".feather", lambda t, p: feather.write_feather(t, p, chunksize=400)),
    (".arrow", lambda t, p: _write_stream(t, p)),
])
def test_arrow_files_and_streams(tmp_path, suffix, write):
    path = tmp_path / f"t{suffix}"
    write(table(), str(path))
    assert [d.text for d in iter_documents([str(path)], field="body")] == expected()


def _write_stream(t, path):
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, t.schema) as writer:
        for batch in t.to_batches(max_chunksize=400):
            writer.write_batch(batch)


def test_datasets_folders_and_prepare(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"body": ROWS, "n": list(range(len(ROWS)))})
    ds.save_to_disk(str(tmp_path / "one"), num_shards=3)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(10))}).save_to_disk(str(tmp_path / "dict"))
    assert [p.name for p in expand_inputs([str(tmp_path / "one")])] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    for folder in ("one", "dict", "dict/train"):
        assert [d.text for d in iter_documents([str(tmp_path / folder)], field="body")] == expected()
    assert len(list(iter_documents([str(tmp_path / "dict/test")], field="body"))) == 8
    tok = train_tokenizer("byte", [])
    meta = prepare([str(tmp_path / "one")], tok, tmp_path / "data", field="body")
    assert meta["documents"] == len(expected())


def test_table_errors_are_one_line(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    pq.write_table(table(), path)
    with pytest.raises(DataError, match=r"no column 'text' \(columns: id, body\); choose one with --field"):
        list(iter_documents([str(path)]))
    with pytest.raises(DataError, match="column 'id' is int64, not text"):
        list(iter_documents([str(path)], field="id"))
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match="junk.arrow: cannot read"):
        list(iter_documents([str(tmp_path / "junk.arrow")]))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match=r"needs pyarrow: pip install 'lmlab\[data\]'"):
        list(iter_documents([str(path)], field="body"))

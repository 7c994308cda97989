"""TokenShards: the shards of a prepared split as one token stream, refused when damaged."""

import shutil

import numpy as np
import pytest

from lmlab.data.loader import TokenShards
from lmlab.data.prepare import prepare
from lmlab.data.tokenizer import train_tokenizer
from lmlab.errors import DataError

TEXT = "".join(f"line {i} of some text to read back\n" for i in range(300))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A char-level prepared folder (train and val splits)."""
    folder = tmp_path_factory.mktemp("loader")
    (folder / "in.txt").write_text(TEXT, encoding="utf-8")
    prepare([str(folder / "in.txt")], train_tokenizer("char", [TEXT]), folder / "data")
    return folder / "data"


def damaged_copy(prepared, tmp_path, change) -> TokenShards:
    """TokenShards of a copy of ``prepared`` whose train shard ``change(bytes) -> bytes`` altered."""
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = copy / "train_000.bin"
    shard.write_bytes(change(shard.read_bytes()))
    return TokenShards(copy, "train")


def test_reads_the_shards_as_one_stream(prepared):
    shards = TokenShards(prepared, "train")
    stream = shards.read(0, shards.tokens)
    assert len(stream) == shards.tokens and stream.dtype == np.int64
    assert np.array_equal(shards.read(10, 20), stream[10:20])
    x, y = shards.sample(4, 16, np.random.default_rng(0))
    assert x.shape == (4, 16) and np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())


def test_a_shard_cut_to_an_odd_number_of_bytes_is_refused(prepared, tmp_path):
    with pytest.raises(DataError, match="not a whole number of uint16 tokens"):
        damaged_copy(prepared, tmp_path, lambda b: b[:1001])


def test_a_shard_shorter_than_meta_json_says_is_refused(prepared, tmp_path):
    with pytest.raises(DataError, match="the train shards hold 500 tokens, meta.json says"):
        damaged_copy(prepared, tmp_path, lambda b: b[:1000])


def test_a_token_id_outside_the_vocabulary_is_refused_when_read(prepared, tmp_path):
    def poison(raw: bytes) -> bytes:
        ids = np.frombuffer(raw, dtype=np.uint16).copy()
        ids[::2] = 60000
        return ids.tobytes()

    shards = damaged_copy(prepared, tmp_path, poison)  # the size is right: found when the ids are read
    with pytest.raises(DataError, match="token id 60000, outside the vocabulary"):
        shards.read(0, 100)
    with pytest.raises(DataError, match="token id 60000, outside the vocabulary"):
        shards.sample(2, 8, np.random.default_rng(0))

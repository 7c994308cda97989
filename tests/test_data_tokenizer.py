"""Tokenizers: exact round trips, save/load, streaming decode, determinism, errors."""

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.data.tokenizer import EOT, KINDS, Tokenizer, train_tokenizer, train_tokenizer_from_files
from lmlab.errors import LmlabError

CORPUS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "All:\nSpeak, speak.\n" * 5,
    "The quick brown fox jumps over the lazy dog. 0123456789\n" * 3,
    "café naïve résumé — 日本語のテキスト 😀👍\r\n\tdef f(x):\n        return x\n",
]
TRICKY = [
    "",
    "\x00",
    "  leading spaces",
    "trailing   \n\n",
    "line\r\nwindows\r\n",
    "emoji 😀👩‍👩‍👧 flags 🇫🇷",
    "combining e\u0301 vs \u00e9 and a\u0308\u0301",
    "CJK 漢字かなカナ 한국어",
    f"literal {EOT} inside{EOT}{EOT}",
    "<0x41> looks like a byte token",
    "\ufffd replacement char at the end \ufffd",
    "x" * 5000,
]


@pytest.fixture(scope="module")
def toks() -> dict[str, Tokenizer]:
    return {
        "bpe": train_tokenizer("bpe", CORPUS, vocab_size=400, special_tokens=["<pad>"]),
        "byte": train_tokenizer("byte", []),
        "char": train_tokenizer("char", CORPUS),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_tricky_strings_round_trip(toks, kind):
    tok = toks[kind]
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, allow_special=False)) == text


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_property(toks, kind):
    tok = toks[kind]

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(st.text())
    def check(text):
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, allow_special=False)) == text

    check()


@pytest.mark.parametrize("kind", KINDS)
def test_kind_eot_and_literal_special(toks, kind):
    tok = toks[kind]
    assert tok.kind == kind
    assert tok.tk.id_to_token(tok.eot_id) == EOT
    text = f"a{EOT}b"
    assert tok.eot_id in tok.encode(text)
    assert tok.eot_id not in tok.encode(text, allow_special=False)
    assert tok.encode_batch(["a", text]) == [tok.encode("a"), tok.encode(text)]


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(toks, kind, tmp_path):
    tok = toks[kind]
    tok.save(tmp_path / "tokenizer.json")
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temporary file left
    for path in (tmp_path / "tokenizer.json", tmp_path):  # the file, or the folder holding it
        again = Tokenizer.load(path)
        assert again.sha256() == tok.sha256()
        assert again.kind == tok.kind and again.vocab_size == tok.vocab_size and again.eot_id == tok.eot_id
        for text in TRICKY:
            assert again.encode(text) == tok.encode(text)


@pytest.mark.parametrize("kind", KINDS)
def test_stream_decoder_matches_decode(toks, kind):
    tok = toks[kind]
    for text in ["héllo 😀 wörld 日本語 e\u0301", "😀😀😀", "ends in \ufffd", f"a{EOT}b 👍"]:
        ids = tok.encode(text)
        sd = tok.stream_decoder()
        parts = [sd.step(i) for i in ids]
        assert all(isinstance(p, str) for p in parts)
        assert "".join(parts) + sd.flush() == text
        for p in parts:  # never half a character: every piece is valid on its own
            assert "\ufffd" not in p or "\ufffd" in text


def test_training_is_deterministic():
    for kind in ("bpe", "char"):
        a = train_tokenizer(kind, CORPUS, vocab_size=300 if kind == "bpe" else None)
        b = train_tokenizer(kind, iter(CORPUS), vocab_size=300 if kind == "bpe" else None)
        assert a.sha256() == b.sha256()
        assert a.encode(CORPUS[3]) == b.encode(CORPUS[3])


def test_byte_ids_are_byte_values(toks):
    tok = toks["byte"]
    assert tok.vocab_size == 257 and tok.eot_id == 256
    text = "é\x00A"
    assert tok.encode(text) == list(text.encode("utf-8"))


def test_bpe_learns_merges_and_respects_vocab_size(toks):
    tok = toks["bpe"]
    assert tok.vocab_size == 400
    text = "Speak, speak."
    assert len(tok.encode(text)) < len(text.encode("utf-8"))
    assert tok.eot_id == 0 and tok.tk.token_to_id("<pad>") == 1


def test_char_vocab_and_byte_fallback(toks):
    tok = toks["char"]
    chars = sorted(set("".join(CORPUS)))
    assert tok.vocab_size == len(chars) + 256 + 1
    assert tok.encode("".join(chars)) == list(range(len(chars)))  # ids in codepoint order
    assert len(tok.encode("Ω")) == 2  # unseen: two UTF-8 bytes as <0xXX> tokens
    small = train_tokenizer("char", ["aaab\n"], vocab_size=256 + 1 + 1)
    assert small.tk.token_to_id("a") is not None and small.tk.token_to_id("b") is None
    assert small.decode(small.encode("ab\n")) == "ab\n"


def test_char_long_line_is_fast(toks):
    tok = toks["char"]
    text = "Speak, speak. " * 20_000  # one 280k-character line
    start = time.perf_counter()
    assert tok.decode(tok.encode(text)) == text
    assert time.perf_counter() - start < 5


def test_bad_settings():
    with pytest.raises(LmlabError, match="too small"):
        train_tokenizer("bpe", CORPUS, vocab_size=200)
    with pytest.raises(LmlabError, match="unknown tokenizer kind"):
        train_tokenizer("wordpiece", CORPUS)
    with pytest.raises(LmlabError, match="exactly 257"):
        train_tokenizer("byte", [], vocab_size=1000)


def test_load_errors_name_the_file(tmp_path):
    from lmlab.errors import DataError

    with pytest.raises(DataError, match="nope.json"):
        Tokenizer.load(tmp_path / "nope.json")
    with pytest.raises(DataError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)  # a folder without one
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(DataError, match="bad.json"):
        Tokenizer.load(bad)


def test_train_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("".join(CORPUS), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "Жук Жук"}) + "\n", encoding="utf-8")
    tok = train_tokenizer_from_files("char", [str(tmp_path)], field="body")
    assert tok.tk.token_to_id("Ж") is not None
    first = train_tokenizer_from_files("char", [str(tmp_path)], field="body", max_bytes=10)
    assert first.tk.token_to_id("Ж") is None  # stopped after the first document
    assert train_tokenizer_from_files("byte", [str(tmp_path / "a.txt")]).kind == "byte"

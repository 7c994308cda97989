"""Tokenizers: exact round trips, save/load, streaming decode, determinism, errors."""

import random
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.data.tokenizer import EOS, EOT, KINDS, UNK, Tokenizer, train_tokenizer, train_tokenizer_from_files
from lmlab.errors import ConfigError, LmlabError

EXACT = ("bpe", "byte", "char")  # kinds with decode(encode(text)) == text for any text

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
        "word": train_tokenizer("word", CORPUS),
    }


@pytest.mark.parametrize("kind", EXACT)
def test_tricky_strings_round_trip(toks, kind):
    tok = toks[kind]
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, allow_special=False)) == text


@pytest.mark.parametrize("kind", EXACT)
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


@pytest.mark.parametrize("kind", EXACT)
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


def test_char_long_line_round_trips(toks):
    # one 280k-character line: a quadratic path here would take minutes (no timed assertion: timings
    # on a shared CI machine are noise; speed is the benchmarks' business)
    tok = toks["char"]
    text = "Speak, speak. " * 20_000
    assert tok.decode(tok.encode(text)) == text


def test_bad_settings():
    with pytest.raises(LmlabError, match="too small"):
        train_tokenizer("bpe", CORPUS, vocab_size=200)
    with pytest.raises(LmlabError, match="unknown tokenizer kind"):
        train_tokenizer("wordpiece", CORPUS)
    with pytest.raises(LmlabError, match="exactly 257"):
        train_tokenizer("byte", [], vocab_size=1000)
    with pytest.raises(ConfigError, match="word vocab_size 2 is too small"):
        train_tokenizer("word", CORPUS, vocab_size=2)
    with pytest.raises(ConfigError, match="min_freq must be at least 1"):
        train_tokenizer("word", CORPUS, min_freq=0)
    with pytest.raises(ConfigError, match="min_freq does not apply"):
        train_tokenizer("byte", [], min_freq=2)


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


# ---------------------------------------------------------------------------- the word kind

WORDS = ["the cat sat on the mat\n", "the dog sat\n\n", "  a   cat\tran \r\n"]


def words_text(text: str) -> str:
    """What the word kind decodes text to: its words joined by one space, each line ended by "\n"."""
    *lines, last = text.split("\n")
    return "".join(" ".join(line.split()) + "\n" for line in lines) + " ".join(last.split())


def test_word_tokens_and_eos_per_line():
    tok = train_tokenizer("word", WORDS)
    assert tok.kind == "word"
    text = "the cat sat\n\n  on the   mat \r\n"
    assert tok.tk.encode(text).tokens == ["the", "cat", "sat", EOS, EOS, "on", "the", "mat", EOS]
    assert tok.decode(tok.encode(text)) == words_text(text) == "the cat sat\n\non the mat\n"
    assert tok.decode(tok.encode("\ncat\n")) == "\ncat\n"  # an empty first line
    assert tok.decode(tok.encode("cat dog")) == "cat dog"  # a last line without newline has no <eos>
    assert tok.encode(f"cat {EOS} dog") == tok.encode("cat\ndog")  # a literal <eos> is a line end


def test_word_unknown_words_become_unk():
    tok = train_tokenizer("word", WORDS)
    ids = tok.encode("the zebra sat on a unicorn\n")
    assert tok.tk.token_to_id(UNK) == 0 and ids.count(0) == 2
    assert tok.decode(ids) == f"the {UNK} sat on a {UNK}\n"
    literal = tok.encode(f"the {EOT} cat", allow_special=False)  # a literal end-of-text is an unknown word
    assert tok.eot_id not in literal and literal[1] == 0
    assert tok.encode(f"the {EOT} cat")[1] == tok.eot_id


def test_word_round_trip_property():
    tok = train_tokenizer("word", WORDS)
    vocab = ["the", "cat", "sat", "on", "mat", "dog", "a", "ran"]
    space = st.text(alphabet=" \t\r\u3000\u00a0", max_size=3)
    gap = st.text(alphabet=" \t\r\u3000\u00a0", min_size=1, max_size=3)
    line = st.lists(st.tuples(gap, st.sampled_from(vocab)), max_size=6)

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(st.lists(st.tuples(line, space), max_size=5), st.booleans())
    def check(lines, final_newline):
        text = "\n".join("".join(s + w for s, w in ws) + end for ws, end in lines) + ("\n" if final_newline else "")
        ids = tok.encode(text)
        assert tok.decode(ids) == words_text(text)
        assert UNK not in tok.tk.encode(text).tokens
        sd = tok.stream_decoder()
        assert "".join(sd.step(i) for i in ids) + sd.flush() == tok.decode(ids)

    check()


def test_word_ids_are_deterministic():
    tok = train_tokenizer("word", WORDS, special_tokens=["<pad>", UNK])
    counts = {"the": 3, "cat": 2, "sat": 2, "a": 1, "dog": 1, "mat": 1, "on": 1, "ran": 1}
    words = sorted(counts, key=lambda w: (-counts[w], w))  # by descending count, ties by string
    vocab = [UNK, EOS] + words + [EOT, "<pad>"]  # specials last, EOT first of them; UNK is no extra special
    assert [tok.tk.id_to_token(i) for i in range(tok.vocab_size)] == vocab
    assert tok.eot_id == len(vocab) - 2
    again = train_tokenizer("word", iter(WORDS[::-1]), special_tokens=["<pad>"])  # order of texts does not matter
    assert again.sha256() == tok.sha256()


def test_word_vocab_size_and_min_freq():
    full = train_tokenizer("word", WORDS)
    assert full.vocab_size == 2 + 8 + 1  # <unk>, <eos>, 8 words, EOT
    small = train_tokenizer("word", WORDS, vocab_size=6)  # <unk> <eos> the cat sat EOT
    assert small.vocab_size == 6
    assert small.decode(small.encode("the cat sat on a mat\n")) == f"the cat sat {UNK} {UNK} {UNK}\n"
    frequent = train_tokenizer("word", WORDS, min_freq=2)
    assert [frequent.tk.id_to_token(i) for i in range(frequent.vocab_size)] == [UNK, EOS, "the", "cat", "sat", EOT]
    assert train_tokenizer("word", WORDS, min_freq=3).vocab_size == 4  # <eos> is kept whatever its count
    char = train_tokenizer("char", ["aaab\n"], min_freq=2)
    assert char.tk.token_to_id("a") is not None and char.tk.token_to_id("b") is None


def test_word_save_load(tmp_path):
    tok = train_tokenizer("word", WORDS, special_tokens=["<pad>"])
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.kind == "word" and again.sha256() == tok.sha256() and again.eot_id == tok.eot_id
    text = "the cat\nsat on zebra\n"
    assert again.encode(text) == tok.encode(text) and again.decode(again.encode(text)) == f"the cat\nsat on {UNK}\n"


def test_word_from_files_and_cli_kinds(tmp_path):
    from lmlab.cli import build_parser

    kinds = build_parser().parse_args(["tokenizer", "train", "x", "-o", "y"])
    assert kinds.kind == "bpe"
    (tmp_path / "a.txt").write_text("".join(WORDS), encoding="utf-8")
    tok = train_tokenizer_from_files("word", [str(tmp_path / "a.txt")], min_freq=2)
    assert tok.kind == "word" and tok.vocab_size == 6


@pytest.mark.parametrize("kind", ["bpe", "byte", "char"])
def test_stream_decoder_survives_any_id_sequence(toks, kind):
    """A sampled model can emit byte tokens that form no valid text: streaming must not fail, and the
    pieces are what it shows (never taken back), ending the same way as decode() when the text is valid."""
    tok = toks[kind]
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))]
        sd = tok.stream_decoder()
        text = "".join(sd.step(i) for i in ids) + sd.flush()
        assert isinstance(text, str)
        if "\ufffd" not in tok.decode(ids):
            assert text == tok.decode(ids)


def wordpiece() -> Tokenizer:
    """A tiny BERT-style uncased WordPiece tokenizer (the tokenizer.json pipeline of all-MiniLM-L6-v2)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

    words = "jerry it isn i they do n t s m re ve ok fine yes here said not".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "##s", "##n", ".", ",", "!", "?", "'", ":", "(", ")"]
    tk = HFTokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece(cleanup=True)
    tk.add_special_tokens(vocab[:5])
    return Tokenizer(tk)


WORDPIECE_TEXTS = ["Jerry's ok.", "it's fine, isn't it? yes!", "i'm here (they're 'fine') : ok", "do n't", "Jerrys ."]


def test_wordpiece_decodes_to_normal_text_as_transformers_does():
    """BERT's WordPiece decoder leaves "jerry ' s"; decode cleans the spaces up exactly as transformers'
    tokenizer with clean_up_tokenization_spaces=True does. Byte-level BPE text is left as it is."""
    transformers = pytest.importorskip("transformers")
    tok = wordpiece()
    assert tok.decode(tok.encode("Jerry's ok. Isn't it?")) == "jerry's ok. isn't it?"
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tk, clean_up_tokenization_spaces=True)
    for text in WORDPIECE_TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == reference.decode(ids), text
    bpe = train_tokenizer("bpe", CORPUS, vocab_size=300)
    spaced = "jerry ' s ok . isn ' t it ?"
    assert bpe.decode(bpe.encode(spaced)) == spaced


def test_wordpiece_stream_decoder_matches_decode():
    """Streamed WordPiece text is the cleaned-up text, never taken back: the end that more tokens could
    still change ("jerry '") waits, for any token sequence."""
    tok = wordpiece()
    sd = tok.stream_decoder()
    assert [sd.step(i) for i in tok.encode("jerry's ok")] == ["jerry", "", "'s", " ok"]
    assert sd.flush() == ""
    pieces = [tok.tk.token_to_id(t) for t in ["it", "n", "t", "s", "m", "re", "ve", "'", ".", ",", "?", "##s", "[SEP]"]]
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.choice(pieces) for _ in range(rng.randint(1, 16))]
        sd = tok.stream_decoder()
        assert "".join(sd.step(i) for i in ids) + sd.flush() == tok.decode(ids), [tok.tk.id_to_token(i) for i in ids]

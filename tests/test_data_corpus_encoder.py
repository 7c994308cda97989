"""The corpus encoder gives the tokenizers library's own ids, id for id, for any text and any tokenizer."""

import json

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings, strategies as st

import lmlab.data.corpus_encoder as corpus_encoder
from lmlab.data.corpus_encoder import CorpusEncoder
from lmlab.data.tokenizer import EOT, Tokenizer, train_tokenizer

TRAIN = ["The cat's hat isn't red; it's 12.5 cm wide.\n\n  Indented   line\twith\ttabs\n",
         "Naïve café — ünïcödé ΑΒΓ αβγ кириллица 日本語のテキスト 😀👍 123 ٣٤٥ Ⅻ ½",
         "def f(x):\n    return x ** 2  # comment\r\n", "'s 't 're 've 'm 'll 'd 'S 'LL"] * 20
# characters where two regular-expression engines may disagree: kinds of space, recently assigned letters
# (U+0558 ARMENIAN, U+0C5C TELUGU, U+A7CE LATIN, U+1E5D0 OL ONAL), marks, controls, a lone apostrophe
AWKWARD = ("\t\n\x0b\x0c\r \x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u2029\u202f\u3000\u200b\ufeff"
           "\u0558\u0c5c\ua7ce\U0001e5d0\u0301\u00ad\x00\x7f'’0a A")


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_tokenizer("bpe", TRAIN, vocab_size=400)


def library_ids(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return tok.encode_batch(texts, allow_special=False)


def corpus_ids(encoder: CorpusEncoder, texts: list[str]) -> list[list[int]]:
    flat, lengths = encoder.encode(texts)
    out, start = [], 0
    for n in lengths:
        out.append(flat[start:start + n].tolist())
        start += n
    return out


texts = st.lists(st.text(alphabet=st.one_of(st.sampled_from(AWKWARD), st.characters(exclude_categories=["Cs"])),
                         max_size=60), min_size=1, max_size=8)


@settings(max_examples=300, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=texts)
def test_ids_equal_the_librarys_for_any_text(bpe, batch):
    encoder = CorpusEncoder(bpe)
    assert encoder.fast
    assert corpus_ids(encoder, batch) == library_ids(bpe, batch)
    assert corpus_ids(encoder, batch) == library_ids(bpe, batch)  # again, from the remembered pieces


def test_special_token_strings_are_text_and_documents_keep_their_lengths(bpe):
    batch = [f"a{EOT}b", "", EOT, "  ", "x"]
    encoder = CorpusEncoder(bpe)
    flat, lengths = encoder.encode(batch)
    assert lengths.tolist() == [len(ids) for ids in library_ids(bpe, batch)]
    assert bpe.eot_id not in flat.tolist()
    assert flat.dtype.name == "uint32"


def test_a_character_the_engines_cut_differently_sends_its_document_to_the_library(bpe):
    """Letters newer than one engine's Unicode tables are found by the probes; documents holding one are
    encoded by the library, the others still by pieces."""
    encoder = CorpusEncoder(bpe)
    batch = ["'\u0558s plain text", "plain text", "'\ua7ces and \U0001e5d0x"]
    assert corpus_ids(encoder, batch) == library_ids(bpe, batch)
    assert set("plain text") <= encoder.agreed
    assert not (encoder.agreed & encoder.differing)


def test_a_small_memory_gives_the_same_ids(bpe, monkeypatch):
    monkeypatch.setattr(corpus_encoder, "CACHE_PIECES", 5)
    encoder = CorpusEncoder(bpe)
    batch = TRAIN[:4] * 3
    for _ in range(3):
        assert corpus_ids(encoder, batch) == library_ids(bpe, batch)
    assert len(encoder.ids) <= max(5, len(set(corpus_encoder.PIECES.findall("".join(TRAIN[:4])))))


@pytest.mark.parametrize("kind", ["byte", "char", "word"])
def test_other_tokenizer_kinds_give_the_librarys_ids(kind):
    tok = train_tokenizer(kind, TRAIN, vocab_size=None if kind == "byte" else 300)
    encoder = CorpusEncoder(tok)
    assert encoder.fast == (kind == "byte")  # byte: ByteLevel pieces without merges
    assert corpus_ids(encoder, TRAIN[:4]) == library_ids(tok, TRAIN[:4])


def reshaped(tok: Tokenizer, change) -> Tokenizer:
    spec = json.loads(tok.tk.to_str())
    change(spec)
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))


@pytest.mark.parametrize("change", [
    lambda s: s["pre_tokenizer"].update(add_prefix_space=True),
    lambda s: s.update(normalizer={"type": "Lowercase"}),
    lambda s: s["added_tokens"].append({**s["added_tokens"][0], "id": len(s["model"]["vocab"]), "content": "cat",
                                        "special": False}),
], ids=["prefix-space", "normalizer", "ordinary-added-token"])
def test_tokenizers_cut_otherwise_are_encoded_by_the_library(bpe, change):
    tok = reshaped(bpe, change)
    encoder = CorpusEncoder(tok)
    assert not encoder.fast
    assert corpus_ids(encoder, TRAIN[:4]) == library_ids(tok, TRAIN[:4])

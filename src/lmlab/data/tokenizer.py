"""Tokenizers: byte-level BPE, bytes, characters and words, all as one `tokenizers.Tokenizer`.

Every lmlab tokenizer is a ``tokenizer.json`` of the Hugging Face `tokenizers` library, so one
load/save path serves every kind and a checkpoint's tokenizer loads in `transformers` unchanged.

    bpe   byte-level BPE (GPT-2 style): ByteLevel pre-tokenizer and decoder, learned merges
    byte  the 256 byte symbols of the same ByteLevel scheme, no merges (id = byte value)
    char  one token per character seen in training, plus 256 byte-fallback tokens <0x00>..<0xFF>
          so that unseen characters still round-trip
    word  one token per whitespace-separated word (WordLevel), <eos> for every newline, <unk> for
          words out of the vocabulary: the Penn Treebank / WikiText convention of the PyTorch
          word_language_model example ("a b c\n" -> a b c <eos>)

bpe, byte and char decode(encode(text)) == text exactly, for any Unicode string; they set no
normalizer: Unicode normalisation (NFC) happens once, when text is read (see sources.py).
word decodes to the words joined by single spaces, <eos> as "\n", unknown words as <unk>.
The kind is not stored separately; it is read off the structure of the tokenizer.json.

A WordPiece tokenizer from elsewhere (BERT's, all-MiniLM-L6-v2's) decodes its tokens joined by spaces,
"jerry ' s"; decode then cleans up the spaces as transformers' BertTokenizer does ("jerry's").
"""

from __future__ import annotations

import hashlib
import logging
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Callable, Iterable, Iterator, Sequence

import tokenizers
from pydantic import Field
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from lmlab.config import Count, check_argument
from lmlab.errors import ConfigError, DataError, first_line
from lmlab.runs import atomic_write_text

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
KINDS = ("bpe", "byte", "char", "word")
DEFAULT_BPE_VOCAB = 8192
MAX_VOCAB = 2**24  # far above any real vocabulary; the BPE trainer aborts the process on huge sizes
UNK, EOS = "<unk>", "<eos>"  # the word kind's unknown word and end of line: ids 0 and 1
# a word: what tokenizers' WhitespaceSplit keeps (Rust's char::is_whitespace separates; Python's
# str.split would also split at \x1c-\x1f)
_WORD = re.compile(r"[^\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
# transformers' clean_up_tokenization, in its order: what BertTokenizer(Fast) does to decoded WordPiece text
# (clean_up_tokenization_spaces=True); the tokenizers library's WordPiece decoder, which sees one token at a
# time, cannot join "jerry ' s"
CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
           (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
# what more text may add to a text whose end the clean-up could still change: the rest of each pattern
# (and of " n ' t", which becomes " n't" and then "n't"), or nothing
_CLEANUP_ENDINGS = ("", *sorted({p[k:] for p in [*(old for old, _ in CLEANUP), " n ' t"] for k in range(1, len(p))}))
_EOS_NAMES = (EOT, "<eos>", "</s>", "<|end_of_text|>", "[SEP]")  # what eot_id accepts in tokenizers lmlab did not train
# words whose BPE merges the encoder of plain text remembers. The library's default (10,000) fills up
# early in a corpus and then never takes a word again, so every rarer word is merged anew each time it
# comes: 10% of WikiText-2's words. 2**16 holds all of its 33,000 (about 10 MiB).
BPE_CACHE_WORDS = 2**16


class Tokenizer:
    """Wraps a tokenizers.Tokenizer; every lmlab tokenizer is a tokenizer.json."""

    def __init__(self, tk: tokenizers.Tokenizer):
        tk.no_padding()  # tokenizer.json files from elsewhere may pad or truncate every encoding:
        tk.no_truncation()  # lmlab pads and cuts where it needs to, itself
        self.tk = tk
        self._plain: tokenizers.Tokenizer | None = None  # copy that reads special tokens as text
        self.clean_up = isinstance(tk.model, models.WordPiece)  # decoded text gets clean_up_spaces

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a tokenizer.json, or the tokenizer.json inside a directory (a checkpoint, a data folder)."""
        if not str(path):
            raise DataError("the tokenizer file name is empty")
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path}: no such tokenizer file")
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON or an unknown model
            msg = first_line(e)
            raise DataError(f"{path}: not a tokenizer.json ({msg})") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically (temporary file in the same folder, then rename).

        ``path`` is the file to write, or an existing directory to write tokenizer.json into.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        atomic_write_text(path, self.tk.to_str(pretty=True))

    def encode(self, text: str, *, allow_special: bool = True, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``.

        With ``allow_special=False`` a literal "<|endoftext|>" in the text is encoded as ordinary
        text rather than as the special token (what data preparation wants: only lmlab decides where
        documents end). Both ways decode back to the same text. ``add_special_tokens`` applies the
        tokenizer's template, if it has one (BERT's [CLS] text [SEP]); lmlab's own have none.
        """
        return self.encode_batch([text], allow_special=allow_special, add_special_tokens=add_special_tokens)[0]

    def encode_batch(self, texts: list[str], *, allow_special: bool = True, add_special_tokens: bool = False,
                     max_length: int | None = None) -> list[list[int]]:
        """Token ids of many texts at once (encoded in parallel by the Rust library).

        ``max_length`` cuts each text so that, template tokens included, it fits (the template's
        tokens are kept: [CLS] start [SEP], not [CLS] start).
        """
        encoder = self._encoder(allow_special)
        if max_length is not None:
            encoder = self._truncating(max_length)
        # encode_batch_fast skips character offsets, which lmlab never uses: ~1.5x faster
        try:
            encs = encoder.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)
        except TypeError:  # the Rust library's answer to a lone surrogate, among other things
            _refuse_invalid_text(texts)
            raise
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids, special tokens included, so decode(encode(text)) == text (lmlab's kinds; a
        WordPiece tokenizer's text is cleaned up as transformers does, see ``clean_up_spaces``)."""
        text = self.tk.decode([int(i) for i in ids], skip_special_tokens=False)
        return clean_up_spaces(text) if self.clean_up else text

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added (special) tokens included."""
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        """Id of the end-of-text token that separates documents."""
        for name in _EOS_NAMES:
            i = self.tk.token_to_id(name)
            if i is not None:
                return i
        raise DataError(f"tokenizer has no end-of-text token (none of {', '.join(_EOS_NAMES)})")

    @property
    def kind(self) -> str:
        """"bpe", "byte", "char" or "word" (read off the tokenizer's structure), else "other"."""
        spec = json.loads(self.tk.to_str())
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        if model.get("type") == "WordLevel" and pre.get("type") == "WhitespaceSplit":
            return "word"
        if model.get("type") != "BPE":
            return "other"
        if pre.get("type") == "ByteLevel":
            return "bpe" if model.get("merges") else "byte"
        if model.get("byte_fallback") and not model.get("merges"):
            return "char"
        return "other"

    def sha256(self) -> str:
        """sha256 of the tokenizer's JSON: a stable identity to check data and model agree."""
        return hashlib.sha256(self.tk.to_str().encode("utf-8")).hexdigest()

    def stream_decoder(self) -> "StreamDecoder":
        """A decoder for generation: feed ids one at a time, get text that never splits a character."""
        return StreamDecoder(self.tk, self.clean_up)

    def add_special_tokens(self, tokens: list[str]) -> None:
        """Add special tokens (new ids at the end of the vocabulary), e.g. a chat template's markers."""
        self.tk.add_special_tokens(list(tokens))
        self._plain = None
        self.__dict__.pop("_truncators", None)

    @property
    def special_ids(self) -> list[int]:
        """Ids of the special tokens (end-of-text, [MASK], a chat template's markers, ...), in order."""
        return sorted(i for i, token in self.tk.get_added_tokens_decoder().items() if token.special)

    @property
    def pad_id(self) -> int:
        """Id to pad batches with: the tokenizer's padding token if it has one, else end-of-text."""
        for name in ("[PAD]", "<pad>", "<|pad|>"):
            i = self.tk.token_to_id(name)
            if i is not None:
                return i
        return self.eot_id

    def _truncating(self, max_length: int) -> tokenizers.Tokenizer:
        """A copy that cuts encodings to max_length (cached per length)."""
        cache = self.__dict__.setdefault("_truncators", {})
        if max_length not in cache:
            tk = tokenizers.Tokenizer.from_str(self.tk.to_str())
            tk.enable_truncation(max_length)
            cache[max_length] = tk
        return cache[max_length]

    def _encoder(self, allow_special: bool) -> tokenizers.Tokenizer:
        if allow_special:
            return self.tk
        if self._plain is None:  # a separate copy, so no shared flag is flipped per call
            self._plain = tokenizers.Tokenizer.from_str(self.tk.to_str())
            self._plain.encode_special_tokens = True
            resize = getattr(self._plain.model, "_resize_cache", None)  # tokenizers >= 0.21; private, so guarded
            if isinstance(self._plain.model, models.BPE) and resize:  # the encoder of corpora: same ids, faster
                resize(BPE_CACHE_WORDS)
        return self._plain

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Incremental decoding: ``step(id)`` returns the text that id completes (maybe ""), ``flush()`` the rest.

    The ids since the last clean boundary are decoded after a few ids of context (decoders that
    join or space tokens look at their neighbours). Trailing U+FFFD is held back: it may be a
    character whose bytes are split over several tokens (a byte-level token can even end one
    character and start the next). If decoding the ids together changes text before them (a byte
    sequence that turned out invalid), the new ids are decoded on their own: streamed text never
    takes back what it showed. For valid text, "".join(steps) + flush() == tokenizer.decode(all ids).

    With ``clean_up`` (a WordPiece tokenizer) the text so far is cleaned up as ``clean_up_spaces`` does, and
    its end is held back while more tokens could still change it ("jerry '" may become "jerry's").
    """

    CONTEXT = 4  # ids kept before the new ones

    def __init__(self, tk: tokenizers.Tokenizer, clean_up: bool = False):
        tk.no_padding()  # tokenizer.json files from elsewhere may pad or truncate every encoding:
        tk.no_truncation()  # lmlab pads and cuts where it needs to, itself
        self.tk, self.clean_up = tk, clean_up
        self.context: list[int] = []  # the last few ids before the pending ones
        self.pending: list[int] = []  # ids since the last clean boundary
        self.given = 0  # characters of the pending ids' text already returned
        self.raw = ""  # with clean_up: the text so far, before clean-up
        self.shown = 0  # with clean_up: characters of its cleaned-up text already returned

    def step(self, token_id: int) -> str:
        """Feed one id; return the newly completed text ("" while a character is incomplete)."""
        self.pending.append(int(token_id))
        return self._cleaned(self._take(final=False), final=False)

    def flush(self) -> str:
        """Return whatever is held back (incomplete bytes decode to U+FFFD) and start afresh."""
        out = self._take(final=True) if self.pending else ""
        self.context = []
        return self._cleaned(out, final=True)

    def _cleaned(self, piece: str, final: bool) -> str:
        """With clean_up, the new text of the cleaned-up text so far: what it starts with however it goes on."""
        if not self.clean_up:
            return piece
        self.raw += piece
        if final:
            text, shown = clean_up_spaces(self.raw), self.shown
            self.raw, self.shown = "", 0
            return text[shown:]
        stable = os.path.commonprefix([clean_up_spaces(self.raw + more) for more in _CLEANUP_ENDINGS])
        out = stable[self.shown:]
        self.shown = max(self.shown, len(stable))
        return out

    def _take(self, final: bool) -> str:
        before = self._decode(self.context)
        text = self._decode(self.context + self.pending)
        body = text[len(before):] if text.startswith(before) else self._decode(self.pending)
        stable = body if final else body.rstrip("\ufffd")
        out = stable[self.given:]
        self.given = max(self.given, len(stable))
        if final or not body.endswith("\ufffd"):  # a clean boundary: the pending ids become context
            self.context = (self.context + self.pending)[-self.CONTEXT:]
            self.pending, self.given = [], 0
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False) if ids else ""


def clean_up_spaces(text: str) -> str:
    """``text`` with the spaces a WordPiece decoder leaves before punctuation and in contractions removed,
    by transformers' rules (``CLEANUP``): "jerry ' s ok ." -> "jerry's ok.", "isn ' t" -> "isn't"."""
    for old, new in CLEANUP:
        text = text.replace(old, new)
    return text


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def train_tokenizer(
    kind: str,
    texts: Iterable[str],
    vocab_size: int | None = None,
    special_tokens: Sequence[str] | None = (),
    min_freq: int = 1,
) -> Tokenizer:
    """Build a tokenizer of ``kind`` ("bpe", "byte", "char", "word") from an iterable of texts.

    ``vocab_size`` counts every token, special ones included (default 8192 for bpe; every
    character / word seen for char / word, else the most frequent; byte ignores the texts and has
    exactly 256 + specials tokens). ``min_freq`` drops characters / words seen fewer times (for
    bpe: pairs merged at least this often). EOT is always the first special token. The same texts
    and settings give the same ids.
    """
    specials = [EOT] + [s for s in dict.fromkeys(special_tokens or ()) if s != EOT]
    check_argument("vocab_size", vocab_size, Annotated[int, Field(le=MAX_VOCAB)] | None)
    if any(not s for s in specials):
        raise ConfigError("special tokens must not be empty")
    if min_freq < 1:
        raise ConfigError(f"min_freq must be at least 1, got {min_freq}")
    if kind == "bpe":
        tk = _train_bpe(texts, DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size, specials, min_freq)
    elif kind == "byte":
        if min_freq != 1:
            raise ConfigError("the byte tokenizer learns nothing from text; min_freq does not apply")
        tk = _byte_tokenizer(vocab_size, specials)
    elif kind == "char":
        tk = _train_char(texts, vocab_size, specials, min_freq)
    elif kind == "word":
        tk = _train_word(texts, vocab_size, [s for s in specials if s not in (UNK, EOS)], min_freq)
    else:
        raise ConfigError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")
    return Tokenizer(tk)


def tokenizer_for(tokenizer: str | os.PathLike | None, kind: str,
                  **train_options) -> Tokenizer | Callable[[Iterable[str]], Tokenizer]:
    """What ``lmlab data prepare`` tokenizes with: the tokenizer saved at ``tokenizer``, or (None) a trainer
    of ``kind`` (``tokenizer_trainer(kind, **train_options)``) that prepare calls on the train inputs'
    documents as it writes them (PII redacted, filtered). A byte tokenizer learns nothing: it comes built."""
    if tokenizer is not None:
        return Tokenizer.load(tokenizer)
    trainer = tokenizer_trainer(kind, **train_options)
    if kind == "byte":
        return trainer([])
    note = (f"training a {kind} tokenizer on the train documents (those the filters keep, when filters are on; "
            "pass --tokenizer to reuse one)")
    return lambda texts: trainer(noted_after_first(texts, note))


def noted_after_first(texts: Iterable[str], note: str) -> Iterator[str]:
    """``texts``, with ``note`` logged once the first has been read: reading checks the inputs (missing,
    empty, binary, not UTF-8), so a bad input is its one error line, with no note of work before it."""
    texts = iter(texts)
    first = next(texts, None)
    if first is None:
        return
    log.info(note)
    yield first
    yield from texts


def tokenizer_trainer(
    kind: str,
    vocab_size: int | None = None,
    special_tokens: Sequence[str] | None = (),
    min_freq: int = 1,
    max_bytes: int | None = None,
) -> Callable[[Iterable[str]], Tokenizer]:
    """A function that trains a tokenizer of ``kind`` (see ``train_tokenizer``) on the texts it is given,
    reading at most ``max_bytes`` UTF-8 bytes of them (a sample is enough for BPE)."""
    check_argument("max_bytes", max_bytes, Count | None)

    def first_bytes(texts: Iterable[str]) -> Iterable[str]:
        seen = 0
        for text in texts:
            yield text
            seen += len(text.encode("utf-8"))
            if max_bytes is not None and seen >= max_bytes:
                return

    def train(texts: Iterable[str]) -> Tokenizer:
        return train_tokenizer(kind, first_bytes(texts), vocab_size, special_tokens, min_freq)

    return train


def train_tokenizer_from_files(
    kind: str,
    inputs: list[str],
    vocab_size: int | None = None,
    special_tokens: Sequence[str] | None = (),
    field: str = "text",
    max_bytes: int | None = None,
    min_freq: int = 1,
) -> Tokenizer:
    """Train a tokenizer on text files / JSONL / directories / globs (see sources.iter_documents).

    ``max_bytes`` stops reading after that many UTF-8 bytes of text (a sample is enough for BPE).
    (``lmlab data prepare`` trains through prepare instead, on the documents its filters keep.)
    """
    from lmlab.data.sources import expand_inputs, iter_documents

    trainer = tokenizer_trainer(kind, vocab_size, special_tokens, min_freq, max_bytes)
    if kind == "byte":  # nothing to learn; still check the inputs exist
        expand_inputs(inputs)
        return trainer([])
    return trainer(doc.text for doc in iter_documents(inputs, field=field))


def _byte_level_pipeline(tk: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return tk


def _train_bpe(texts: Iterable[str], vocab_size: int, specials: list[str], min_freq: int) -> tokenizers.Tokenizer:
    if vocab_size < 256 + len(specials):
        raise ConfigError(
            f"bpe vocab_size {vocab_size} is too small: need at least 256 bytes + {len(specials)} special tokens"
        )
    tk = _byte_level_pipeline(tokenizers.Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_freq,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return tk


def _byte_tokenizer(vocab_size: int | None, specials: list[str]) -> tokenizers.Tokenizer:
    if vocab_size is not None and vocab_size != 256 + len(specials):
        raise ConfigError(f"byte tokenizer has exactly {256 + len(specials)} tokens, not vocab_size {vocab_size}")
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}  # id == byte value
    tk = _byte_level_pipeline(tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[])))
    tk.add_special_tokens(specials)  # ids 256, 257, ...
    return tk


def _train_char(
    texts: Iterable[str], vocab_size: int | None, specials: list[str], min_freq: int
) -> tokenizers.Tokenizer:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    chars = sorted(c for c, n in counts.items() if n >= min_freq)
    if vocab_size is not None:
        room = vocab_size - 256 - len(specials)
        if room < 0:
            raise ConfigError(
                f"char vocab_size {vocab_size} is too small: need at least 256 byte tokens + {len(specials)} special tokens"
            )
        keep = sorted(chars, key=lambda c: (-counts[c], ord(c)))[:room]
        chars = sorted(keep)
    vocab = {c: i for i, c in enumerate(chars)}  # ids 0.. in codepoint order, as in nanoGPT's char model
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    # one pre-token per character keeps encoding linear on long lines; "[\s\S]" because "." skips "\n"
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens(specials)
    return tk


def _train_word(
    texts: Iterable[str], vocab_size: int | None, specials: list[str], min_freq: int
) -> tokenizers.Tokenizer:
    """WordLevel over whitespace-split words; a normalizer turns every "\n" into an <eos> word.

    Ids: <unk> 0, <eos> 1, then words by descending count (ties by string), then the special
    tokens. Specials come last, outside the model's vocabulary, so that a literal "<|endoftext|>"
    in text encoded with allow_special=False is an unknown word, never the end-of-text id.
    """
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(_WORD.findall(text))
        counts[EOS] += text.count("\n")
    reserved = {UNK, EOS, *specials}
    words = sorted((w for w, n in counts.items() if n >= min_freq and w not in reserved), key=lambda w: (-counts[w], w))
    if vocab_size is not None:
        room = vocab_size - 2 - len(specials)
        if room < 0:
            raise ConfigError(
                f"word vocab_size {vocab_size} is too small: need at least {UNK}, {EOS} + {len(specials)} special tokens"
            )
        words = words[:room]
    vocab = {w: i for i, w in enumerate([UNK, EOS, *words])}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.normalizer = normalizers.Replace("\n", f" {EOS} ")
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # decode: words joined by one space, <eos> -> "\n" with no space either side. WordPiece puts a
    # space before every token but those starting with its prefix " " (which it strips): <eos>
    # becomes " \n"; the spaces left next to a newline (first token, word after <eos>) go after Fuse.
    tk.decoder = decoders.Sequence([
        decoders.Replace(Regex(f"^{re.escape(EOS)}$"), " \n"),
        decoders.WordPiece(prefix=" ", cleanup=False),
        decoders.Fuse(),
        decoders.Replace("\n ", "\n"),
        decoders.Replace(" \n", "\n"),
    ])
    tk.add_special_tokens(specials)
    return tk


def _refuse_invalid_text(texts: list[str]) -> None:
    """Raise a DataError for the first text that is not valid Unicode: a lone surrogate, which is what
    Python makes of bytes that are not UTF-8 in a command-line argument (``--prompt $'\\xff'``)."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"text is not valid UTF-8: {text[e.start]!r} at character {e.start} (was it typed in "
                            f"another encoding?)") from None

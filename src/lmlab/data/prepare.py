"""`lmlab data prepare`: text -> token shards (.bin) + tokenizer.json + meta.json.

A prepared data folder holds

    train_000.bin, train_001.bin, ...   raw token ids (uint16, or uint32 for vocabularies over 65535),
    val_000.bin, ...                    each document's tokens followed by the end-of-text token
    test_000.bin, ...                   (only with explicit test inputs)
    tokenizer.json                      the tokenizer that made them
    meta.json                           dtype, vocab, splits with their shards/tokens/documents/bytes

Shards concatenated in order are one token stream per split; read them with np.memmap.
Everything is streamed (documents are encoded in batches and appended to the shards) and written
into a temporary sibling folder that is renamed into place only when all went well.

Splits: "hash" sends a document to val when sha256(text), read as a number in [0, 1), is below
val_fraction (deterministic, independent of order; falls back to "tail" when that leaves val
empty); "tail" puts the last val_fraction of all tokens in val (first 90% train, last 10% val);
"files" (chosen by giving val_inputs) takes a benchmark's own splits: all inputs go to train and
val_inputs to val. test_inputs, with any split, make a "test" split. Dedupe works within a split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from array import array
from collections import Counter, deque
from bisect import bisect_right
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import tokenizers

from lmlab.runs import atomic_dir, check_output
from lmlab.data import pii
from lmlab.data.corpus_encoder import CorpusEncoder
from lmlab.data.filters import DocumentRules, FilterConfig, FilterPipeline, Verdict, load_filter_config
from lmlab.data.parallel import Workers, available_cores, thread_map, worker_state
from lmlab.data.sources import Document, expand_inputs, iter_documents
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import DataError

FORMAT, VERSION = "lmlab-tokens", 1
SPLITS = ("hash", "tail")
BATCH_CHARS = 1 << 20  # encode (and redact) documents in batches of about this many characters
COPY_TOKENS = 1 << 22  # tokens per read when cutting the tail split
TokenizerTrainer = Callable[[Iterable[str]], Tokenizer]
Encode = Callable[[Iterable[list[str]]], Iterator[tuple[np.ndarray, np.ndarray]]]  # batches -> (ids, lengths)


class ShardWriter:
    """Appends token ids to prefix_000.bin, prefix_001.bin, ... of at most shard_tokens each.

    Also counts documents and UTF-8 bytes, and (while ``log`` is kept) remembers where every
    written unit ends, so that the stream can later be cut at any token (the tail split).
    """

    def __init__(self, folder: Path, prefix: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.prefix, self.dtype, self.shard_tokens = folder, prefix, dtype, shard_tokens
        self.shards: list[str] = []
        self.tokens = self.documents = self.bytes = 0
        self.room = 0  # tokens left in the open shard
        self.f = None
        self.log: dict[str, array] | None = {"tok_end": array("q"), "byte_end": array("q"), "doc": array("q")}

    def write(self, ids: np.ndarray, nbytes: int = 0, new_doc: bool = False) -> None:
        """Append ids; ``nbytes`` of text they encode; ``new_doc`` when they start a document."""
        self.documents += new_doc
        self.bytes += nbytes
        self._append(ids)
        if self.log is not None:
            self.log["tok_end"].append(self.tokens)
            self.log["byte_end"].append(self.bytes)
            self.log["doc"].append(self.documents - 1)

    def _append(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.room == 0:
                self._next_shard()
            part, ids = ids[: self.room], ids[self.room :]
            self.f.write(part.astype(self.dtype, copy=False).tobytes())
            self.room -= len(part)
            self.tokens += len(part)

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.prefix}_{len(self.shards):03d}.bin"
        self.shards.append(name)
        self.f = open(self.folder / name, "wb")
        self.room = self.shard_tokens

    def close(self) -> None:
        """Close the open shard (writing more opens a new one)."""
        if self.f is not None:
            self.f.close()
            self.f = None
        self.room = 0

    def stats(self) -> dict:
        """The split's entry in meta.json."""
        return {"shards": list(self.shards), "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes}


def prepare(
    inputs: list[str],
    tokenizer: Tokenizer | TokenizerTrainer,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.1,
    split: str = "hash",
    dedupe: bool = False,
    field: str = "text",
    split_lines: bool = False,
    shard_tokens: int = 100_000_000,
    min_split_tokens: int = 1,
    val_inputs: list[str] | None = None,
    test_inputs: list[str] | None = None,
    force: bool = False,
    filters: FilterConfig | None = None,
    redact_pii: bool = False,
    workers: int | None = None,
) -> dict:
    """Tokenize ``inputs`` into a prepared data folder ``out_dir`` and return its meta.json dict.

    ``tokenizer`` is the Tokenizer to encode with, or a function that trains one on texts
    (tokenizer.tokenizer_trainer): it is then trained on the train inputs' documents as prepare writes
    them, PII redacted and filtered, from the one pass that redacts and filters them (with redaction or
    filters on, the kept documents wait in a temporary file of the output folder, which then holds them
    twice over for a while, and are read back for the shards).

    ``filters`` (data/filters.py) drop documents of ``inputs`` (never of val_inputs or test_inputs)
    before exact dedupe and tokenization; what each removed goes to meta.json's "filters".

    With ``val_inputs`` all ``inputs`` go to train and ``val_inputs`` to val (split "files";
    val_fraction and split are then unused); ``test_inputs`` add a "test" split.
    ``out_dir`` must be new or empty, or (with ``force``) hold a prepared data folder, which is then
    replaced only after success (runs.check_output); a failure leaves nothing behind.
    ``redact_pii`` replaces e-mails, phones, IPs, card numbers, IBANs and secrets in every document by
    typed placeholders (data/pii.py; counts in meta.json's "pii_redacted"). ``workers`` processes
    (default: the cores available) redact and filter batches, and as many encode them (data/corpus_encoder.py;
    a tokenizer that is not byte-level BPE encodes on threads here, in Rust), beside the reading and writing
    here; the output is the same for any number.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be at least 1, got {shard_tokens}")
    if workers is not None and workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    sources = {"train": inputs, "val": val_inputs, "test": test_inputs}
    out = check_output(out_dir, "data", [p for paths in sources.values() for p in paths or []], force)
    for paths in sources.values():
        if paths is not None:
            expand_inputs(paths)  # fail on a missing input before creating anything

    pipeline = FilterPipeline(filters) if filters is not None and filters.any() else None
    rules = dataclasses.asdict(pipeline.cfg) if pipeline is not None else None
    pool = Workers(workers or available_cores(), _load_rules, (rules,))
    counts = {"documents": 0, "duplicates": 0}

    def cleaned(name: str) -> Iterator[Document]:
        """The documents of split ``name``'s inputs, PII redacted and (train inputs only) filtered: the
        workers redact and judge by the per-document rules, then the pipeline's ordered stages run here."""
        docs = iter_documents(sources[name], field=field, split_lines=split_lines)
        judge = pipeline is not None and name == "train"  # the training inputs, not --val/--test
        if not (redact_pii or judge):
            return docs
        found = counts.setdefault("pii", Counter()) if redact_pii else Counter()
        if not judge:
            return (doc for doc, _ in _cleaned(((doc, None) for doc in docs), pool, redact_pii, None, found))
        return pipeline.apply(_cleaned(pipeline.whole(docs), pool, redact_pii, pipeline.rules, found))

    with atomic_dir(out) as tmp, pool:  # the folder appears whole, or the old one stays as it was
        spool = None
        if not isinstance(tokenizer, Tokenizer):
            if pipeline is None and not redact_pii:  # nothing to redact or filter: read the inputs twice
                tokenizer = tokenizer(doc.text for doc in cleaned("train"))
            else:
                spool = _Spool(tmp / ".train-documents")
                spool.write(cleaned("train"))
                tokenizer = tokenizer(doc.text for doc in spool.read())
        tokenizer.save(tmp / "tokenizer.json")

        def read(name: str) -> Iterator[tuple[Document, bytes]]:
            return _unique(spool.read() if spool is not None and name == "train" else cleaned(name), dedupe, counts)

        encoder = CorpusEncoder(tokenizer)
        encoders = Workers(workers or available_cores(), _load_encoder, (tokenizer.tk.to_str(),))

        def encode(batches: Iterable[list[str]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            if encoder.fast:  # Python work (holds the GIL): on worker processes
                return encoders.map(_encode_in_worker, batches, local=encoder.encode)
            return thread_map(encoder.encode, batches)  # the library's Rust threads release the GIL

        with encoders:
            meta = _write_folder(tmp, sources, tokenizer, val_fraction, split, read, dedupe, shard_tokens, encode,
                                 counts)
        if spool is not None:
            spool.path.unlink()
        if pipeline is not None:
            meta["filters"] = pipeline.report()
        if redact_pii:
            found = meta.pop("pii")
            meta["pii_redacted"] = {kind: found.get(kind, 0) for kind in pii.KINDS}
        _check_sizes(meta, min_split_tokens, sources)
        _write_json(tmp / "meta.json", meta)
    return meta


def check_prepare_output(out_dir: str | os.PathLike, inputs: list[str], val_inputs: list[str] | None = None,
                         test_inputs: list[str] | None = None, tokenizer: str | None = None,
                         force: bool = False) -> Path:
    """What ``prepare`` checks of ``out_dir`` (runs.check_output), for the command line to check before
    it trains a tokenizer: every input, and the tokenizer file, stays out of the output."""
    reads = [*inputs, *(val_inputs or []), *(test_inputs or []), tokenizer]
    return check_output(out_dir, "data", reads, force)


def read_meta_json(folder: Path, command: str) -> object:
    """The parsed meta.json of a prepared data folder (of either format), or a DataError naming ``command``
    (the one that prepares it) when the folder has none or it is not JSON."""
    path = folder / "meta.json"
    if not path.is_file():
        raise DataError(f"{folder} is not a prepared data folder (no meta.json); run `{command}` first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None


def load_meta(data_dir: str | os.PathLike) -> dict:
    """Read and check a prepared data folder's meta.json (format, version, shards present)."""
    folder = Path(data_dir)
    path = folder / "meta.json"
    meta = read_meta_json(folder, "lmlab data prepare")
    if isinstance(meta, dict) and meta.get("format") == "lmlab-pairs":
        raise DataError(f"{folder} holds parallel pairs (lmlab data prepare --pairs), not a token stream")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path}: not an lmlab data folder's meta.json (format is not {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise DataError(f"{path}: data format version {meta.get('version')!r}; this lmlab reads version {VERSION}")
    for key in ("dtype", "vocab_size", "eot_id", "splits"):
        if key not in meta:
            raise DataError(f"{path}: missing key {key!r}")
    for name, info in meta["splits"].items():
        for shard in info["shards"]:
            if not (folder / shard).is_file():
                raise DataError(f"{folder / shard}: missing {name} shard listed in meta.json; prepare the data again")
    return meta


def memmap_split(data_dir: str | os.PathLike, split: str) -> list[np.memmap]:
    """The token shards of one split ("train", "val", or "test" when prepared) as read-only memmaps, in order."""
    meta = load_meta(data_dir)
    if split not in meta["splits"]:
        raise DataError(f"{data_dir}: no {split!r} split (have {', '.join(meta['splits'])})")
    return [np.memmap(Path(data_dir) / s, dtype=meta["dtype"], mode="r") for s in meta["splits"][split]["shards"]]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    if vocab_size <= 2**16 - 1:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32 - 1:
        return np.dtype(np.uint32)
    raise DataError(f"vocab_size {vocab_size} is too large for uint32 token shards")


# ---------------------------------------------------------------------------- writing


def _write_folder(
    folder: Path,
    sources: dict[str, list[str] | None],
    tok: Tokenizer,
    val_fraction: float,
    split: str,
    read: Callable[[str], Iterator[tuple[Document, bytes]]],
    dedupe: bool,
    shard_tokens: int,
    encode: Encode,
    counts: dict,
) -> dict:
    """Write every split's shards into folder; return meta.json's dict. ``read(split)`` gives a split's
    inputs' documents; ``counts`` (documents, duplicates, pii) are updated as they are written."""
    dtype = token_dtype(tok.vocab_size)

    def writer(prefix: str, log: bool = True) -> ShardWriter:
        w = ShardWriter(folder, prefix, dtype, shard_tokens)
        if not log:  # the log only serves cutting a stream (tail split)
            w.log = None
        return w

    if sources["val"] is not None:
        train, val, used = writer("train", log=False), writer("val", log=False), "files"
        _write_docs(read("train"), tok, counts, lambda _: train, encode)
        _write_docs(read("val"), tok, counts, lambda _: val, encode)
    else:
        train, val, used = _write_train_val(folder, read("train"), tok, counts, writer, val_fraction, split, encode)
    splits = {"train": train.stats(), "val": val.stats()}
    if sources["test"] is not None:
        test = writer("test", log=False)
        _write_docs(read("test"), tok, counts, lambda _: test, encode)
        splits["test"] = test.stats()
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "tokenizer_sha256": tok.sha256(),
        "tokenizer_kind": tok.kind,
        "normalization": "NFC",
        "dedupe": dedupe,
        "duplicates_removed": counts["duplicates"],
        "split": used,
        **({"pii": counts["pii"]} if "pii" in counts else {}),
        "val_fraction": None if used == "files" else val_fraction,
        "documents": counts["documents"],
        "inputs": [str(x) for x in sources["train"]],
        **{f"{name}_inputs": [str(x) for x in sources[name]] for name in ("val", "test") if sources[name] is not None},
        "splits": splits,
    }
    if used not in (split, "files"):
        meta["split_requested"] = split
        meta["split_note"] = "hash split left val empty (too few documents); used the tail split instead"
    return meta


def _write_train_val(
    folder: Path,
    docs: Iterable[tuple[Document, bytes]],
    tok: Tokenizer,
    counts: dict,
    writer: Callable[[str], ShardWriter],
    val_fraction: float,
    split: str,
    encode: Encode,
) -> tuple[ShardWriter, ShardWriter, str]:
    """Split one document stream into train and val ("hash" or "tail"); return them and the split used."""
    train, val = writer("train"), writer("val")
    val.log = None
    if split == "tail":
        stream = ShardWriter(folder, ".all", train.dtype, 2**62)
        _write_docs(docs, tok, counts, lambda _: stream, encode)
        _cut_tail(stream, train, val, val_fraction)
        return train, val, split

    def by_hash(digest: bytes) -> ShardWriter:
        if _unit_interval(digest) < val_fraction:
            train.log = None  # val is not empty, so no fallback to tail will be needed
            return val
        return train

    _write_docs(docs, tok, counts, by_hash, encode)
    val.close()
    if val_fraction > 0 and val.tokens == 0 and train.tokens > 0:
        old, train = train, writer("train")  # all went to train: cut as "tail"
        for i, name in enumerate(old.shards):  # rename away so the new train shards can take the names
            os.replace(folder / name, folder / f".old_{i:03d}.bin")
        old.shards = [f".old_{i:03d}.bin" for i in range(len(old.shards))]
        _cut_tail(old, train, val, val_fraction)
        return train, val, "tail"
    return train, val, split


def _write_docs(
    docs: Iterable[tuple[Document, bytes]], tok: Tokenizer, counts: dict, choose: Callable[[bytes], ShardWriter],
    encode: Encode,
) -> None:
    """Encode documents, each followed by the end-of-text token, into the writer ``choose(digest)``
    picks at every document start (pieces of a big document follow their first); close them."""
    eot = np.array([tok.eot_id], dtype=np.int64)
    dest, starts, used = None, True, []  # starts: the next unit starts a new document
    for doc, digest, ids in _encoded(docs, encode):
        if starts:
            counts["documents"] += 1
            dest = choose(digest)
            if dest not in used:
                used.append(dest)
        tokens = ids
        if not doc.continues:
            tokens = np.concatenate([tokens, eot])
        dest.write(tokens, len(doc.text.encode("utf-8")), new_doc=starts)
        starts = not doc.continues
    for w in used:
        w.close()


def _unique(docs: Iterable[Document], dedupe: bool, counts: dict) -> Iterator[tuple[Document, bytes]]:
    """(document, sha256 of its text), dropping exact repeats of whole documents when dedupe.

    Documents that come in pieces (bigger than sources.PIECE_BYTES) are never dropped.
    """
    seen: set[bytes] = set()
    in_chain = False  # the previous piece continues into this one
    for doc in docs:
        digest = hashlib.sha256(doc.text.encode("utf-8")).digest()
        whole = not in_chain and not doc.continues
        in_chain = doc.continues
        if dedupe and whole:
            if digest in seen:
                counts["duplicates"] += 1
                continue
            seen.add(digest)
        yield doc, digest


def _batches(items: Iterable, text: Callable[[object], str]) -> Iterator[list]:
    """items in lists of about BATCH_CHARS characters of text(item)."""
    batch: list = []
    size = 0
    for item in items:
        batch.append(item)
        size += len(text(item))
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded(items: Iterable[tuple[Document, bytes]], encode: Encode) -> Iterator[tuple[Document, bytes, np.ndarray]]:
    """Encode documents in batches with ``encode`` (in parallel, beside this thread); special tokens in the
    text are plain text. Each document's ids come as a uint32 array."""
    waiting: deque[list] = deque()  # batches sent out, in order, to pair with their ids

    def texts() -> Iterator[list[str]]:
        for batch in _batches(items, lambda item: item[0].text):
            waiting.append(batch)
            yield [doc.text for doc, _ in batch]

    for flat, lengths in encode(texts()):
        batch = waiting.popleft()
        for (doc, digest), ids in zip(batch, np.split(flat, np.cumsum(lengths)[:-1])):
            yield doc, digest, ids


def _load_encoder(tokenizer_json: str) -> None:
    """A worker's initializer: the corpus encoder of the tokenizer whose JSON is ``tokenizer_json``."""
    worker_state()["encoder"] = CorpusEncoder(Tokenizer(tokenizers.Tokenizer.from_str(tokenizer_json)))


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return worker_state()["encoder"].encode(texts)


def _cleaned(docs: Iterable[tuple[Document, Verdict | None]], pool: Workers, redact: bool,
             rules: DocumentRules | None, found: Counter) -> Iterator[tuple[Document, Verdict | None]]:
    """(document, verdict) pairs with the documents' PII replaced by placeholders (data/pii.py) when
    ``redact`` (first, so that no filter report's removed examples show anyone's PII) and each verdict
    that is None filled in by the per-document filter ``rules`` (it stays None without rules, and for a
    piece that continues a document), done in batches by the workers; ``found`` counts what was
    replaced, per kind. A PII string that a big file's piece boundary cuts in two is not seen when the
    pieces are not joined (filters.FilterPipeline.whole joins them)."""
    waiting: deque[list[tuple[Document, Verdict | None]]] = deque()

    def jobs() -> Iterator[tuple[list[str], bool, list[bool]]]:
        in_chain = False
        for batch in _batches(docs, lambda item: item[0].text):
            waiting.append(batch)
            asks = []
            for doc, verdict in batch:
                asks.append(rules is not None and not in_chain and verdict is None)
                in_chain = doc.continues
            yield [doc.text for doc, _ in batch], redact, asks

    for texts, counts, verdicts in pool.map(_clean_in_worker, jobs(), local=lambda job: _clean_texts(job, rules)):
        found.update(counts)
        for (doc, given), text, verdict in zip(waiting.popleft(), texts, verdicts):
            yield Document(text, doc.source, doc.continues), given or verdict


def _clean_texts(job: tuple[list[str], bool, list[bool]],
                 rules: DocumentRules | None) -> tuple[list[str], Counter, list[Verdict | None]]:
    """A batch (texts, redact, judge each?) redacted when asked, and each text's verdict by ``rules`` where
    asked (else None), with the counts of what redaction replaced: a worker's unit."""
    texts, redact, judge = job
    found: Counter = Counter()
    if redact:
        texts, found = pii.redact_batch(texts)
    verdicts = [rules.judge(text) if asked else None for text, asked in zip(texts, judge)]
    return texts, found, verdicts


def _load_rules(cfg: dict | None) -> None:
    """A worker's initializer: the per-document filters of the FilterConfig fields ``cfg`` (None: none)."""
    worker_state()["rules"] = DocumentRules(load_filter_config(None, cfg)) if cfg is not None else None


def _clean_in_worker(job: tuple[list[str], bool, list[bool]]) -> tuple[list[str], Counter, list[Verdict | None]]:
    return _clean_texts(job, worker_state()["rules"])


class _Spool:
    """Documents kept on disk in order (text, source, continues), written once and read back."""

    HEAD = struct.Struct("<QI?")  # text bytes, source bytes, continues

    def __init__(self, path: Path):
        self.path = path

    def write(self, docs: Iterable[Document]) -> None:
        """Write all documents (replacing what was there)."""
        with open(self.path, "wb", buffering=1 << 20) as f:
            for doc in docs:
                text, source = doc.text.encode("utf-8"), doc.source.encode("utf-8")
                f.write(self.HEAD.pack(len(text), len(source), doc.continues) + text + source)

    def read(self) -> Iterator[Document]:
        """The documents written, in order."""
        with open(self.path, "rb", buffering=1 << 20) as f:
            while head := f.read(self.HEAD.size):
                n_text, n_source, continues = self.HEAD.unpack(head)
                text, source = f.read(n_text).decode("utf-8"), f.read(n_source).decode("utf-8")
                yield Document(text, source, continues)


def _unit_interval(digest: bytes) -> float:
    """A sha256 digest as a number in [0, 1)."""
    return int.from_bytes(digest[:8], "big") / 2**64


def _cut_tail(src: ShardWriter, train: ShardWriter, val: ShardWriter, val_fraction: float) -> None:
    """Copy src's token stream: the first tokens to train, the last val_fraction of them to val.

    Documents and bytes follow the tokens: a document cut in two counts in both splits, and its
    bytes are shared in proportion to its tokens. The source shards are deleted.
    """
    total = src.tokens
    n_train = total - round(total * val_fraction)
    for name in src.shards:
        data = np.memmap(src.folder / name, dtype=src.dtype, mode="r")  # shards are never empty
        for i in range(0, len(data), COPY_TOKENS):
            chunk = np.asarray(data[i : i + COPY_TOKENS])
            room = max(0, n_train - train.tokens)
            train._append(chunk[:room])
            val._append(chunk[room:])
        del data
        (src.folder / name).unlink()
    for w in (train, val):
        w.close()
    log = src.log
    assert log is not None
    train.bytes, train.documents = _stats_before(log, n_train)
    val.bytes, val.documents = src.bytes - train.bytes, 0
    if n_train < total:
        unit = bisect_right(log["tok_end"], n_train)
        val.documents = src.documents - log["doc"][unit]


def _stats_before(log: dict[str, array], n: int) -> tuple[int, int]:
    """(bytes, documents) of the first n tokens of a logged stream."""
    if n == 0:
        return 0, 0
    unit = bisect_right(log["tok_end"], n - 1)  # the unit holding token n-1
    start_tok = log["tok_end"][unit - 1] if unit else 0
    start_byte = log["byte_end"][unit - 1] if unit else 0
    frac = (n - start_tok) / (log["tok_end"][unit] - start_tok)
    nbytes = start_byte + round((log["byte_end"][unit] - start_byte) * frac)
    return nbytes, log["doc"][unit] + 1


def _check_sizes(meta: dict, min_tokens: int, sources: dict[str, list[str] | None]) -> None:
    """Every split that must hold text (val unless val_fraction is 0) has at least min_tokens tokens."""
    splits = meta["splits"]
    need = [n for n in splits if n != "val" or meta["split"] == "files" or meta["val_fraction"] > 0]
    small = [n for n in need if splits[n]["tokens"] < min_tokens]
    if small:
        paths = sources[small[0]] if meta["split"] == "files" or small[0] == "test" else sources["train"]
        names = ", ".join(map(str, paths[:3])) + (", ..." if len(paths) > 3 else "")
        sizes = [f"{n} has {info['tokens']}" for n, info in splits.items()]
        sizes[0] += " tokens"
        listed = ", ".join(sizes[:-1]) + " and " + sizes[-1]
        removed = sum(r["documents"] for r in meta.get("filters", {}).get("removed", {}).values())
        advice = "add text or change val_fraction"
        if removed:  # the filters may be why
            kept = meta["filters"]["kept"]["documents"]
            advice = f"the filters removed {removed:,} documents and kept {kept:,}: loosen them, " + advice
        raise DataError(f"{names}: too little text: {listed}; each split needs at least {min_tokens} ({advice})")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

"""Document filters for ``lmlab data prepare``: quality rules, language, near-duplicates, decontamination.

Every filter is off unless asked for (a code corpus must not be judged by prose rules);
``FilterConfig.preset("default")`` (``--filters default``) turns on the web-text rules of Gopher
(Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training Gopher",
appendix A.1.1, MassiveText quality and repetition filters) with their published thresholds.

A filter is a small function ``(text, words) -> bool`` that says whether a document stays
(``words = text.split()``, computed once per document). ``FilterPipeline`` runs the chosen ones in
order over a stream of ``sources.Document``; the first filter that refuses a document is charged
with it (documents and UTF-8 bytes), and keeps a few removed examples for the report. A big file
that comes in pieces (``Document.continues``) is judged whole: its pieces are joined first (held in
memory), except that one passing max_chars/max_words is dropped as it is read, without being held.
The per-document rules (``DocumentRules``) run in prepare's worker processes; near-duplicates and
decontamination, which remember what they saw, run in document order in the main process.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Callable, Iterable, Iterator

import yaml
from pydantic import Field

from lmlab.config import Count, Name, NonNegative, Positive, from_dict, read_yaml_mapping
from lmlab.data.sources import Document
from lmlab.errors import ConfigError

Probability = Annotated[float, Field(ge=0, le=1)]
BULLETS = ("•", "‣", "◦", "⁃", "●", "▪", "-", "*", "·")
ELLIPSES = ("...", "…")
STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))  # Gopher's English stop words
WORD_PUNCTUATION = string.punctuation + "“”‘’«»…"  # stripped from a word's ends to find stop words
LANG_CHARS = 20_000  # language identification reads at most this many characters of a document
# the languages py3langid tells apart (its identifier's labels): written out, so that checking a config does not
# load py3langid into a process that judges no document (tests/test_data_filters.py compares)
LANGUAGES = frozenset("""
af am ar as az be bg bn br bs ca cs cy da de el en eo es et eu fa fi fr fy ga gd gl gu ha he hi hr ht hu hy id ig
is it ja jv ka kk km kn ko ku ky la lg ln lo lt lv mg mk ml mn mr ms my ne nl no om or pa pl ps pt qu ro ru sa si
sk sl so sq sr sv sw ta te th tl tr ug uk ur uz vi xh yo zh zu zxx ace bcl dz ext gcf gom grc gug hbo kik nso pcm
rw se sn st an ary crh fo fuv gcr guw kab lb lij ltg uzs wa sdh arz ba mt nn oc tg tk tt vec vo wuu yue
""".split())
EXAMPLES = 3  # removed examples kept per filter for the report
EXAMPLE_CHARS = 300


@dataclass
class FilterConfig:
    """The ``data.filters`` block: which document filters ``lmlab data prepare`` applies (None/False = off).

    Thresholds named after Gopher's rules take Gopher's MassiveText values in the "default" preset.
    """

    min_words: Count | None = None  # Gopher: 50
    max_words: Count | None = None  # Gopher: 100,000
    min_chars: Count | None = None
    max_chars: Count | None = None
    max_symbol_ratio: NonNegative | None = None  # ("#" + "..." + "…") per word; Gopher: 0.1
    min_alnum_fraction: Probability | None = None  # letters and digits among the non-space characters
    min_alpha_words: Probability | None = None  # words with a letter; Gopher: 0.8
    min_mean_word_length: NonNegative | None = None  # Gopher: 3
    max_mean_word_length: Positive | None = None  # Gopher: 10
    max_bullet_lines: Probability | None = None  # lines starting with a bullet; Gopher: 0.9
    max_ellipsis_lines: Probability | None = None  # lines ending with an ellipsis; Gopher: 0.3
    repetition: bool = False  # Gopher's repetition rules, with the thresholds below
    max_dup_line_fraction: Probability = 0.30  # duplicate lines among the lines
    max_dup_para_fraction: Probability = 0.30  # duplicate paragraphs among the paragraphs
    max_dup_line_chars: Probability = 0.20  # characters in duplicate lines
    max_dup_para_chars: Probability = 0.20  # characters in duplicate paragraphs
    top_ngram_chars: dict[Annotated[int, Field(ge=2, le=4)], Probability] = field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})  # characters in the most frequent n-gram
    dup_ngram_chars: dict[Annotated[int, Field(ge=5, le=10)], Probability] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})  # in repeated n-grams
    min_stop_words: Count | None = None  # English documents only; Gopher: 2 of the, be, to, of, and, that, have, with
    lang: list[Name] = field(default_factory=list)  # keep only these languages (ISO 639-1: en, de, ...)
    lang_threshold: Probability = 0.5  # py3langid's normalised probability of the language, at least
    near_dedupe: bool = False  # MinHash LSH near-duplicate removal (data/dedup.py)
    jaccard: Annotated[float, Field(gt=0, lt=1)] = 0.8
    num_perm: Annotated[int, Field(ge=16, le=1024)] = 128
    shingle: Count = 5  # words per shingle
    exclude: list[Name] = field(default_factory=list)  # evaluation files (data/decontaminate.py)
    exclude_ngram: Count = 13  # tokens per shared n-gram that marks a training document contaminated

    @classmethod
    def preset(cls, name: str) -> "FilterConfig":
        """A named preset: "default" = Gopher's web-text quality and repetition rules (Rae et al. 2021)."""
        if name != "default":
            raise ConfigError(f"--filters {name!r} is neither the preset 'default' nor a YAML file")
        return cls(min_words=50, max_words=100_000, max_symbol_ratio=0.1, min_alpha_words=0.8,
                   min_mean_word_length=3, max_mean_word_length=10, max_bullet_lines=0.9,
                   max_ellipsis_lines=0.3, repetition=True, min_stop_words=2)

    def any(self) -> bool:
        """Whether any filter is on."""
        return bool(filter_functions(self) or self.lang or self.min_stop_words or self.near_dedupe or self.exclude)


def load_filter_config(source: str | None = None, overrides: dict | None = None,
                       settings: Iterable[str] = ()) -> FilterConfig:
    """The filters of ``source`` ("default", a YAML file holding the block or ``data: {filters: ...}``, or None
    for all off) with ``overrides`` (field -> value, from command-line flags) and ``settings`` ("field=value",
    the value read as YAML: ``--filter max_dup_line_fraction=0.2``) applied; a ConfigError if invalid."""
    overrides = {**(overrides or {}), **dict(_setting(item) for item in settings)}
    data: dict = {}
    if source == "default":
        data = dataclasses.asdict(FilterConfig.preset("default"))
    elif source is not None:
        if not Path(source).is_file() and not source.endswith((".yaml", ".yml")):
            raise ConfigError(f"--filters {source!r} is neither the preset 'default' nor a YAML file")
        data = read_yaml_mapping(source)
        if set(data) == {"data"} and isinstance(data["data"], dict):
            data = data["data"].get("filters") or {}
    cfg = from_dict(FilterConfig, {**data, **overrides}, "data.filters.")
    if cfg.min_words and cfg.max_words and cfg.min_words > cfg.max_words:
        raise ConfigError(f"data.filters.min_words ({cfg.min_words}) is above max_words ({cfg.max_words})")
    if cfg.min_chars and cfg.max_chars and cfg.min_chars > cfg.max_chars:
        raise ConfigError(f"data.filters.min_chars ({cfg.min_chars}) is above max_chars ({cfg.max_chars})")
    if cfg.lang:
        _check_languages(cfg.lang)
    return cfg


# ---------------------------------------------------------------------------- the filters


def word_count(text: str, words: list[str], low: int | None, high: int | None) -> bool:
    """Between low and high whitespace-separated words (Gopher: 50 to 100,000)."""
    return (low is None or len(words) >= low) and (high is None or len(words) <= high)


def char_count(text: str, words: list[str], low: int | None, high: int | None) -> bool:
    """Between low and high characters."""
    return (low is None or len(text) >= low) and (high is None or len(text) <= high)


def symbol_ratio(text: str, words: list[str], limit: float) -> bool:
    """Hash signs and ellipses per word at most ``limit`` (Gopher: 0.1): tag clouds, link lists."""
    symbols = text.count("#") + text.count("...") + text.count("…")
    return symbols <= limit * max(len(words), 1)


def alnum_fraction(text: str, words: list[str], low: float) -> bool:
    """At least ``low`` of the non-space characters are letters or digits (markup and binary junk fail)."""
    chars = sum(len(w) for w in words)
    return chars > 0 and sum(c.isalnum() for w in words for c in w) >= low * chars


def alpha_words(text: str, words: list[str], low: float) -> bool:
    """At least ``low`` of the words hold a letter (Gopher: 80%): tables of numbers, symbol soup fail."""
    return bool(words) and sum(any(c.isalpha() for c in w) for w in words) >= low * len(words)


def mean_word_length(text: str, words: list[str], low: float | None, high: float | None) -> bool:
    """The mean word length between low and high characters (Gopher: 3 to 10)."""
    mean = sum(map(len, words)) / max(len(words), 1)
    return (low is None or mean >= low) and (high is None or mean <= high)


def bullet_lines(text: str, words: list[str], limit: float) -> bool:
    """At most ``limit`` of the lines start with a bullet (Gopher: 90%): navigation menus, lists of links."""
    lines = _lines(text)
    return sum(line.lstrip().startswith(BULLETS) for line in lines) <= limit * len(lines)


def ellipsis_lines(text: str, words: list[str], limit: float) -> bool:
    """At most ``limit`` of the lines end with an ellipsis (Gopher: 30%): truncated teasers, snippet lists."""
    lines = _lines(text)
    return sum(line.rstrip().endswith(ELLIPSES) for line in lines) <= limit * len(lines)


def repetition(text: str, words: list[str], cfg: FilterConfig) -> bool:
    """Gopher's repetition rules (Rae et al. 2021, table A1): duplicate lines and paragraphs (by count and
    by characters), the most frequent 2-4-gram's share of the characters, and the share of characters
    in 5-10-grams that occur more than once, each at most its threshold."""
    lines, paras = _lines(text), [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    line_dups, line_chars = _duplicates(lines)
    para_dups, para_chars = _duplicates(paras)
    if line_dups > cfg.max_dup_line_fraction * len(lines) or para_dups > cfg.max_dup_para_fraction * len(paras):
        return False
    if line_chars > cfg.max_dup_line_chars * len(text) or para_chars > cfg.max_dup_para_chars * len(text):
        return False
    total = sum(map(len, words))
    for n, limit in cfg.top_ngram_chars.items():
        if _top_ngram_chars(words, n) > limit * total:
            return False
    for n, limit in cfg.dup_ngram_chars.items():
        if _dup_ngram_chars(words, n) > limit * total:
            return False
    return True


class LanguageOf:
    """A document's language by py3langid (its model ships in the package; nothing is downloaded), read
    from its first LANG_CHARS characters: (ISO 639-1 code, normalised probability). The answer for the
    last text asked about is remembered: the language and stop-word rules ask about the same document.
    py3langid is loaded at the first question, in the process that asks (prepare's workers judge)."""

    def __init__(self):
        self.text: str | None = None
        self.answer: tuple[str, float] = ("", 0.0)

    def __call__(self, text: str) -> tuple[str, float]:
        """(language, probability) of ``text``."""
        if text is not self.text:
            lang, prob = _identifier().classify(text[:LANG_CHARS])
            self.text, self.answer = text, (lang, float(prob))
        return self.answer


class LanguageFilter:
    """Keeps documents that py3langid puts in one of ``langs`` with a normalised probability of at least
    ``threshold``."""

    def __init__(self, langs: list[str], threshold: float, language_of: LanguageOf | None = None):
        self.langs, self.threshold = set(langs), threshold
        self.language_of = language_of or LanguageOf()

    def __call__(self, text: str, words: list[str]) -> bool:
        """Whether the document's language is one of the wanted ones."""
        lang, prob = self.language_of(text)
        return lang in self.langs and prob >= self.threshold


class StopWordFilter:
    """Gopher's stop-word rule (Rae et al. 2021, A.1.1): an English document must hold at least ``low`` of
    the, be, to, of, and, that, have, with (different ones, any case, punctuation around them ignored),
    which coherent English prose does and word lists, keyword spam and boilerplate often do not. Documents
    that py3langid does not put in English are kept: the rule is about English."""

    def __init__(self, low: int, language_of: LanguageOf | None = None):
        self.low = low
        self.language_of = language_of or LanguageOf()

    def __call__(self, text: str, words: list[str]) -> bool:
        """Whether the document stays."""
        found = {w.strip(WORD_PUNCTUATION).lower() for w in words} & STOP_WORDS
        return len(found) >= self.low or self.language_of(text)[0] != "en"


def filter_functions(cfg: FilterConfig) -> list[tuple[str, Callable[[str, list[str]], bool]]]:
    """The stateless filters ``cfg`` turns on, as (name, keep(text, words)), cheapest first."""
    chosen = []
    if cfg.min_chars is not None or cfg.max_chars is not None:
        chosen.append(("chars", partial(char_count, low=cfg.min_chars, high=cfg.max_chars)))
    if cfg.min_words is not None or cfg.max_words is not None:
        chosen.append(("words", partial(word_count, low=cfg.min_words, high=cfg.max_words)))
    if cfg.min_mean_word_length is not None or cfg.max_mean_word_length is not None:
        chosen.append(("mean_word_length", partial(mean_word_length, low=cfg.min_mean_word_length,
                                                   high=cfg.max_mean_word_length)))
    if cfg.max_symbol_ratio is not None:
        chosen.append(("symbol_ratio", partial(symbol_ratio, limit=cfg.max_symbol_ratio)))
    if cfg.min_alnum_fraction is not None:
        chosen.append(("alnum_fraction", partial(alnum_fraction, low=cfg.min_alnum_fraction)))
    if cfg.min_alpha_words is not None:
        chosen.append(("alpha_words", partial(alpha_words, low=cfg.min_alpha_words)))
    if cfg.max_bullet_lines is not None:
        chosen.append(("bullet_lines", partial(bullet_lines, limit=cfg.max_bullet_lines)))
    if cfg.max_ellipsis_lines is not None:
        chosen.append(("ellipsis_lines", partial(ellipsis_lines, limit=cfg.max_ellipsis_lines)))
    if cfg.repetition:
        chosen.append(("repetition", partial(repetition, cfg=cfg)))
    return chosen


# ---------------------------------------------------------------------------- the pipeline


@dataclass
class FilterStats:
    """What one filter removed: documents, UTF-8 bytes, and the first few examples (source, start of text)."""

    name: str
    documents: int = 0
    bytes: int = 0
    examples: list[dict] = field(default_factory=list)


Verdict = tuple[str, int]  # (the per-document stage that refuses a document, or "" when all keep it; its words)


class DocumentRules:
    """The per-document stages of a ``FilterConfig`` (quality rules, language): each a function of one
    document's text alone, so documents can be judged in any process, in any order, with the same verdicts."""

    def __init__(self, cfg: FilterConfig):
        self.stages = filter_functions(cfg)
        language_of = LanguageOf() if cfg.lang or cfg.min_stop_words else None  # one identification per document
        if cfg.lang:
            self.stages.append(("language", LanguageFilter(cfg.lang, cfg.lang_threshold, language_of)))
        if cfg.min_stop_words:
            self.stages.append(("stop_words", StopWordFilter(cfg.min_stop_words, language_of)))

    def judge(self, text: str) -> Verdict:
        """(the name of the first stage that refuses ``text``, or "" when all keep it; its word count)."""
        words = text.split()
        for name, keep in self.stages:
            if not keep(text, words):
                return name, len(words)
        return "", len(words)


class FilterPipeline:
    """The filters of a ``FilterConfig`` applied in order to a document stream, with counts: the
    per-document rules (``rules``, a DocumentRules, which prepare runs in its worker processes), then
    the stages that remember what they saw (near-duplicates, decontamination), in document order here.

    The stateful stages are fresh in every pipeline: make a new one for every pass over the data.
    """

    def __init__(self, cfg: FilterConfig):
        from lmlab.data.decontaminate import Decontaminator
        from lmlab.data.dedup import NearDuplicates

        cfg = load_filter_config(None, dataclasses.asdict(cfg))  # a config built in code is checked too
        self.cfg = cfg
        self.rules = DocumentRules(cfg)
        self.stages: list[tuple[str, Callable]] = []  # the stateful ones
        if cfg.near_dedupe:
            self.stages.append(("near_duplicates", NearDuplicates(cfg.jaccard, cfg.num_perm, cfg.shingle)))
        self.decontaminator = Decontaminator(cfg.exclude, cfg.exclude_ngram) if cfg.exclude else None
        if self.decontaminator:
            self.stages.append(("decontamination", self.decontaminator))
        self.stats = {name: FilterStats(name) for name, _ in [*self.rules.stages, *self.stages]}
        self.seen = FilterStats("input")
        self.lengths: dict[str, Counter] = {"before": Counter(), "after": Counter()}  # log2 word-count bins

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        """The documents that every filter keeps, whole (see ``whole``), judged here (see ``apply``)."""

        def judged() -> Iterator[tuple[Document, Verdict | None]]:
            in_chain = False
            for doc, verdict in self.whole(docs):
                yield doc, verdict or (None if in_chain else self.rules.judge(doc.text))
                in_chain = doc.continues

        return self.apply(judged())

    def whole(self, docs: Iterable[Document]) -> Iterator[tuple[Document, Verdict | None]]:
        """Each document whole, so that every rule judges all of it: a big document's pieces
        (``Document.continues``) joined into one, held in memory until its last piece, with None.
        A document that passes max_chars or max_words while it is read is not held: its pieces come as they
        are, the first with its verdict ("chars" or "words", the words counted so far), and follow its fate."""
        pieces: list[Document] = []
        chars = words = 0
        refused = False  # the current chain passed a bound: its pieces pass through
        for doc in docs:
            if refused:
                yield doc, None
                refused = doc.continues
                continue
            if not pieces and not doc.continues:
                yield doc, None
                continue
            joined = bool(pieces) and _in_word(pieces[-1].text[-1:]) and _in_word(doc.text[:1])  # a word cut in two
            pieces.append(doc)
            chars, words = chars + len(doc.text), words + len(doc.text.split()) - joined
            verdict = self._too_long(chars, words)
            if verdict and doc.continues:
                yield pieces[0], (verdict, words)
                yield from ((piece, None) for piece in pieces[1:])
                pieces, chars, words, refused = [], 0, 0, True
            elif not doc.continues:
                yield Document("".join(p.text for p in pieces), pieces[0].source), None
                pieces, chars, words = [], 0, 0

    def _too_long(self, chars: int, words: int) -> str:
        """"chars" or "words" when a document of at least this many is refused by its length bound."""
        if self.cfg.max_chars is not None and chars > self.cfg.max_chars:
            return "chars"
        if self.cfg.max_words is not None and words > self.cfg.max_words:
            return "words"
        return ""

    def apply(self, judged: Iterable[tuple[Document, Verdict | None]]) -> Iterator[Document]:
        """The documents that every filter keeps, given each one's per-document verdict (``rules.judge``
        of its text; None for a piece that continues a document: a big document's pieces all follow
        its first's fate). Counts what each stage removed."""
        verdict, in_chain = "", False  # verdict: the stage that dropped the current chain, or "" (kept)
        for doc, local in judged:
            nbytes = len(doc.text.encode("utf-8"))
            if not in_chain:
                assert local is not None, "a document's first piece needs its verdict"
                verdict, n_words = local
                verdict = verdict or self._judge_in_order(doc.text)
                self.seen.documents += 1
                self.lengths["before"][_length_bin(n_words)] += 1
                if verdict:
                    self._charge(verdict, doc)
                else:
                    self.lengths["after"][_length_bin(n_words)] += 1
            self.seen.bytes += nbytes
            in_chain = doc.continues
            if verdict:
                self.stats[verdict].bytes += nbytes
            else:
                yield doc

    def _judge_in_order(self, text: str) -> str:
        """The name of the first stateful stage that refuses the document, or "" when all keep it."""
        for name, keep in self.stages:
            if not keep(text, None):
                return name
        return ""

    def _charge(self, name: str, doc: Document) -> None:
        """Count a removed document against stage ``name``, keeping the first few as examples."""
        stats = self.stats[name]
        stats.documents += 1
        if len(stats.examples) < EXAMPLES:
            stats.examples.append({"source": doc.source, "text": _shorten(doc.text)})

    def report(self) -> dict:
        """meta.json's "filters": the config, per-filter documents/bytes removed, what went in and what stayed,
        a few removed examples per filter, and word-count histograms before and after (bin b holds documents
        of 2**((b-1)/2) to 2**(b/2) words; bin 0 those without words)."""
        removed = {n: {"documents": s.documents, "bytes": s.bytes} for n, s in self.stats.items()}
        kept_docs = self.seen.documents - sum(s.documents for s in self.stats.values())
        kept_bytes = self.seen.bytes - sum(s.bytes for s in self.stats.values())
        out = {"config": _changed_fields(self.cfg), "input": {"documents": self.seen.documents, "bytes": self.seen.bytes},
               "removed": removed, "kept": {"documents": kept_docs, "bytes": kept_bytes},
               "examples": {n: s.examples for n, s in self.stats.items()},
               "word_histogram": {k: {str(b): c for b, c in sorted(v.items())} for k, v in self.lengths.items()}}
        if self.decontaminator:
            out["decontamination"] = self.decontaminator.report()
        return out


def filter_table(report: dict) -> str:
    """The per-filter table of a pipeline report (meta.json's "filters"), as aligned text lines."""
    rows = [("filter", "documents", "bytes")]
    rows += [(name, f"{r['documents']:,}", f"{r['bytes']:,}") for name, r in report["removed"].items()]
    rows += [("kept", f"{report['kept']['documents']:,}", f"{report['kept']['bytes']:,}")]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    for name, r in report.get("decontamination", {}).get("files", {}).items():
        lines.append(f"  decontamination by {name}: {r['documents']:,} documents")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- helpers


def _setting(item: str) -> tuple[str, object]:
    """("field", value) of "field=value", the value read as a YAML scalar or list."""
    key, eq, raw = item.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"filter setting {item!r} must look like field=value (e.g. min_words=50)")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        return key.strip(), raw


def _lines(text: str) -> list[str]:
    """The non-blank lines."""
    return [line for line in text.split("\n") if line.strip()]


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(how many items repeat an earlier one, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    """Characters (of words) covered by the most frequent word n-gram, counted once per occurrence."""
    if len(words) < n:
        return 0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = counts.most_common(1)[0]
    return sum(map(len, gram)) * count if count > 1 else 0


def _dup_ngram_chars(words: list[str], n: int) -> int:
    """Characters of the words that lie in a word n-gram seen earlier in the document (each word once)."""
    seen: set[tuple[str, ...]] = set()
    dup = [False] * len(words)
    for i, gram in enumerate(zip(*(words[i:] for i in range(n)))):
        if gram in seen:
            dup[i:i + n] = [True] * n
        else:
            seen.add(gram)
    return sum(len(w) for w, d in zip(words, dup) if d)


def _length_bin(n_words: int) -> int:
    """A histogram bin of a document's word count: 0 for none, else 1 + floor(2 * log2(words))."""
    return 0 if n_words == 0 else 1 + int(2 * math.log2(n_words))


def _in_word(char: str) -> bool:
    return bool(char) and not char.isspace()


def _shorten(text: str) -> str:
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + " …"


def _changed_fields(cfg: FilterConfig) -> dict:
    """The fields of ``cfg`` that differ from the defaults (what was asked for)."""
    base = FilterConfig()
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)}


_IDENTIFIER = None


def _identifier():
    """py3langid's identifier with normalised probabilities (loaded once; the model is in the package)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def _check_languages(langs: list[str]) -> None:
    unknown = [x for x in langs if x not in LANGUAGES]
    if unknown:
        raise ConfigError(f"data.filters.lang: unknown language {unknown[0]!r} (py3langid knows ISO 639-1 codes "
                          f"such as en, de, fr, zh)")

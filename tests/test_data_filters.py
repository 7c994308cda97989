"""Document filters (data/filters.py): each rule drops a crafted document and keeps a look-alike; the
pipeline's counts; configs and their one-line errors; `lmlab data prepare` with filters end to end."""

import importlib
import json
import sys
from collections import Counter

import pytest

from lmlab.cli import main
from lmlab.data import filters, pii, sources
from lmlab.data.decontaminate import Decontaminator
from lmlab.data.dedup import NearDuplicates
from lmlab.data.filters import FilterConfig, FilterPipeline, LanguageFilter, load_filter_config
from lmlab.data.prepare import memmap_split, prepare
from lmlab.data.sources import Document
from lmlab.data.tokenizer import Tokenizer, tokenizer_trainer, train_tokenizer
from lmlab.errors import ConfigError

PROSE = [
    "The river runs through the old town, past the mill and the church, before it turns north toward the hills. "
    "In spring the water rises quickly, and the farmers along its banks move their animals to higher ground. "
    "Most years the flood is gentle, but every decade or so it reaches the market square and the bakery.",
    "Astronomers measured the distance to the nearby galaxy using variable stars whose brightness changes in a "
    "regular rhythm. Because the period of each star reveals its true luminosity, comparing that with how bright "
    "it appears from Earth gives the distance, which turned out to be far larger than anyone had expected.",
    "A good loaf needs only flour, water, salt and time. The dough rests overnight in a cool kitchen while the "
    "yeast slowly feeds, producing the gas that lifts it and the acids that give the crust its flavour. Bakers "
    "fold it gently in the morning, shape it, and bake it in a very hot oven until the bottom sounds hollow.",
]
GERMAN = ("Der Fluss fließt durch die alte Stadt, vorbei an der Mühle und der Kirche, bevor er nach Norden in "
          "Richtung der Hügel abbiegt. Im Frühling steigt das Wasser schnell, und die Bauern bringen ihre Tiere "
          "auf höher gelegene Weiden.")
CODE = '''import json
from pathlib import Path


def load_settings(path):
    """Read the settings file, or return the defaults when it is missing."""
    path = Path(path)
    if not path.is_file():
        return {"width": 80, "height": 24, "colour": True}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object, got {type(data).__name__}")
    return data


def save_settings(path, settings):
    """Write the settings as indented JSON (keys sorted, so diffs stay small)."""
    text = json.dumps(settings, indent=2, sort_keys=True)
    Path(path).write_text(text + "\\n", encoding="utf-8")


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key, n=1):
        self.counts[key] = self.counts.get(key, 0) + n
        return self.counts[key]
'''


def kept(cfg: FilterConfig, *texts: str) -> list[bool]:
    """Which of the texts a pipeline of ``cfg`` keeps."""
    pipeline = FilterPipeline(cfg)
    out = {d.text for d in pipeline(Document(t, f"doc{i}") for i, t in enumerate(texts))}
    return [t in out for t in texts]


def test_length_bounds_drop_outside_and_keep_short_valid_doc_when_only_max_is_set():
    long_doc = " ".join(PROSE * 3)  # 150+ words
    assert kept(FilterConfig(max_words=100), long_doc, "A short but perfectly valid note.", PROSE[0]) == [False, True, True]
    assert kept(FilterConfig(min_words=10), "Too short.", PROSE[0]) == [False, True]
    assert kept(FilterConfig(min_chars=20, max_chars=400), "tiny", PROSE[0], long_doc) == [False, True, False]


def test_symbol_ratio_drops_hashtag_soup_keeps_prose_with_a_hash():
    tags = "Great day! #sun #beach #fun #summer #love #travel #happy #blessed #goals #vibes ... more ..."
    one_hash = PROSE[0] + " Issue #42 explains it."
    assert kept(FilterConfig(max_symbol_ratio=0.1), tags, one_hash) == [False, True]


def test_alnum_fraction_drops_markup_junk_keeps_prose():
    junk = "<<< >>> ||| --- === *** ;;; ::: {{ }} [[ ]] ~~~ ^^^ %%% ??? !!! ((( )))"
    assert kept(FilterConfig(min_alnum_fraction=0.6), junk, PROSE[1]) == [False, True]


def test_alpha_words_drops_number_tables_keeps_prose_with_numbers():
    table = "\n".join(f"{i} {i * 3.5:.1f} {i * i} {i % 7} -- {i * 11}" for i in range(20))
    dated = PROSE[2] + " In 1998 it cost 2.50 and in 2024 about 4.10, 64% more."
    assert kept(FilterConfig(min_alpha_words=0.8), table, dated) == [False, True]


def test_mean_word_length_drops_letter_soup_and_url_blobs_keeps_prose():
    soup = "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3
    blob = " ".join(["https://example.com/very/long/path/segment/with/many/parts?query=value&other=thing"] * 8)
    cfg = FilterConfig(min_mean_word_length=3, max_mean_word_length=10)
    assert kept(cfg, soup, blob, PROSE[0]) == [False, False, True]


def test_bullet_lines_drop_menus_keep_prose_with_a_short_list():
    menu = "\n".join(f"• {w}" for w in ["Home", "About us", "Products", "Blog", "Careers", "Contact"])
    article = PROSE[0] + "\nWhat to pack:\n- boots\n- a raincoat\n" + PROSE[1]
    assert kept(FilterConfig(max_bullet_lines=0.9), menu, article) == [False, True]


def test_ellipsis_lines_drop_teaser_lists_keep_prose_with_one():
    teasers = "\n".join(f"You will never believe what happened to story number {i}..." for i in range(6))
    article = PROSE[0] + "\nAnd then...\n" + PROSE[1] + "\n" + PROSE[2]
    assert kept(FilterConfig(max_ellipsis_lines=0.3), teasers, article) == [False, True]


def test_repetition_drops_repeated_lines_and_ngrams_keeps_code_and_prose():
    repeated_lines = "\n".join([PROSE[0]] + ["Click here to subscribe to our newsletter today."] * 8)
    spam = "buy cheap pills now " * 30 + PROSE[1]  # one 4-gram covers most of the characters
    stutter = PROSE[0] + " " + " ".join(PROSE[1].split()[:12] * 6)  # a 12-word phrase six times
    cfg = FilterConfig(repetition=True)
    assert kept(cfg, repeated_lines, spam, stutter, CODE, "\n\n".join(PROSE)) == [False, False, False, True, True]


def test_code_is_judged_by_prose_rules_only_when_asked():
    small = "def area(r):\n    return 3.14159 * r ** 2\n\n\nprint(area(2))\n"
    assert kept(FilterConfig(repetition=True), CODE, small) == [True, True]  # symbols are no repetition
    assert kept(FilterConfig(), CODE, small) == [True, True] and not FilterConfig().any()  # all off by default
    assert kept(FilterConfig.preset("default"), small, " ".join(PROSE)) == [False, True]  # web-text preset


def test_language_filter_drops_german_only_when_asked():
    assert kept(FilterConfig(lang=["en"]), GERMAN, PROSE[0]) == [False, True]
    assert kept(FilterConfig(lang=["de"]), GERMAN, PROSE[0]) == [True, False]
    assert kept(FilterConfig(min_words=5), GERMAN) == [True]  # no --lang: German stays
    assert kept(FilterConfig(lang=["en"], lang_threshold=1.0), PROSE[0]) == [False]  # nothing is that sure


def test_stop_words_rule_drops_english_keyword_lists_and_spares_other_languages():
    spam = ("Cheap shoes online. Best prices, fast shipping, free returns on all orders. Buy now: sneakers, boots, "
            "sandals, heels. Great deals every day, top brands, secure checkout, happy customers.")
    one_kind = spam + " The best. The cheapest. The fastest."  # "the" three times: still one stop word
    cfg = FilterConfig(min_stop_words=2)
    assert kept(cfg, spam, one_kind, PROSE[0], GERMAN) == [False, False, True, True]
    assert kept(FilterConfig(min_stop_words=2, lang=["en", "de"]), GERMAN, spam) == [True, False]
    pipeline = FilterPipeline(FilterConfig(min_stop_words=2, lang=["en"]))
    list(pipeline(Document(t, "s") for t in (GERMAN, spam, PROSE[1])))
    assert {n: r["documents"] for n, r in pipeline.report()["removed"].items()} == {"language": 1, "stop_words": 1}
    assert FilterConfig.preset("default").min_stop_words == 2  # one of Gopher's quality rules


def test_pipeline_charges_the_first_refusing_filter_with_documents_and_bytes():
    docs = ["x", "y y", PROSE[0], " ".join(PROSE * 3)]
    pipeline = FilterPipeline(FilterConfig(min_chars=2, max_words=100))
    out = [d.text for d in pipeline(Document(t, "s") for t in docs)]
    report = pipeline.report()
    assert out == ["y y", PROSE[0]]
    assert report["removed"] == {"chars": {"documents": 1, "bytes": 1},
                                 "words": {"documents": 1, "bytes": len(docs[3].encode())}}
    assert report["kept"] == {"documents": 2, "bytes": 3 + len(PROSE[0].encode())}
    assert report["examples"]["words"][0]["text"].endswith(" …")  # truncated
    assert report["config"] == {"min_chars": 2, "max_words": 100}
    assert sum(report["word_histogram"]["before"].values()) == 4 and sum(report["word_histogram"]["after"].values()) == 2


def test_a_big_document_in_pieces_is_judged_whole():
    pieces = [Document("Kurz.", "big", continues=True), Document(PROSE[0], "big", continues=True),
              Document(PROSE[1], "big"), Document("Short.", "next")]
    pipeline = FilterPipeline(FilterConfig(min_words=5))
    assert [d.text for d in pipeline(pieces)] == ["Kurz." + PROSE[0] + PROSE[1]]  # one document, kept
    assert pipeline.report()["removed"]["words"]["documents"] == 1  # "Short."
    pipeline = FilterPipeline(FilterConfig(max_words=60))  # passed after two pieces: the third is never held
    assert [d.text for d in pipeline(pieces)] == ["Short."]
    report = pipeline.report()
    assert report["removed"]["words"] == {"documents": 1, "bytes": sum(len(p.text.encode()) for p in pieces[:3])}
    assert report["input"]["documents"] == 2


def test_prepare_judges_a_document_bigger_than_a_piece_by_all_of_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", 64)  # every file comes in many pieces
    exam = tmp_path / "exam.txt"
    exam.write_text(PROSE[2])
    texts = {"contaminated": PROSE[0] + "\n" + PROSE[2],  # the shared 13-grams are in later pieces only
             "tags": PROSE[1] + "\n" + "#tag " * 40,  # the symbols come after a clean first piece
             "long": " ".join(PROSE * 3),  # over max_words: dropped while read
             "good": PROSE[0] + "\n" + PROSE[1]}
    for name, text in texts.items():
        (tmp_path / f"{name}.txt").write_text(text)
    cfg = FilterConfig(max_words=150, max_symbol_ratio=0.1, exclude=[str(exam)])
    tok = train_tokenizer("byte", [])
    paths = [str(tmp_path / f"{name}.txt") for name in texts]
    meta = prepare(paths, tok, tmp_path / "out", filters=cfg, val_fraction=0, split="tail")
    removed = meta["filters"]["removed"]
    assert {name: r["documents"] for name, r in removed.items()} == {"words": 1, "symbol_ratio": 1, "decontamination": 1}
    assert removed["words"]["bytes"] == len(texts["long"].encode())
    ids = [int(t) for m in memmap_split(tmp_path / "out", "train") for t in m]
    assert ids == tok.encode(texts["good"]) + [tok.eot_id] and meta["documents"] == 1


def test_configs_load_from_yaml_flags_and_settings(tmp_path):
    path = tmp_path / "filters.yaml"
    path.write_text("data:\n  filters:\n    min_words: 20\n    repetition: true\n    top_ngram_chars: {2: 0.3}\n")
    cfg = load_filter_config(str(path), {"max_words": 500}, ["lang=[en, de]", "jaccard=0.7"])
    assert (cfg.min_words, cfg.max_words, cfg.repetition, cfg.top_ngram_chars) == (20, 500, True, {2: 0.3})
    assert (cfg.lang, cfg.jaccard) == (["en", "de"], 0.7)
    assert load_filter_config("default").min_words == 50


@pytest.mark.parametrize("source, overrides, settings, fragment", [
    (None, {"min_word": 3}, [], "data.filters.min_word"),
    (None, {"min_words": 0}, [], "data.filters.min_words"),
    (None, {"min_words": 9, "max_words": 3}, [], "above max_words"),
    (None, {"lang": ["xx"]}, [], "unknown language 'xx'"),
    (None, {"jaccard": 1.5}, [], "data.filters.jaccard"),
    (None, {}, ["top_ngram_chars={7: 0.1}"], "data.filters.top_ngram_chars"),
    (None, {}, ["min_words"], "must look like field=value"),
    ("strict", {}, [], "neither the preset 'default' nor a YAML file"),
])
def test_bad_configs_are_one_line_errors(source, overrides, settings, fragment):
    with pytest.raises(ConfigError) as e:
        load_filter_config(source, overrides, settings)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_prepare_filters_train_inputs_only_and_records_them_in_meta(tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.txt"
    train.write_text("\n".join(json.dumps({"text": t}) for t in [*PROSE, GERMAN]) + "\n")
    val.write_text(GERMAN)
    tok = train_tokenizer("byte", [])
    meta = prepare([str(train)], tok, tmp_path / "out", val_inputs=[str(val)], filters=FilterConfig(lang=["en"]))
    assert meta["splits"]["train"]["documents"] == 3 and meta["splits"]["val"]["documents"] == 1
    assert meta["filters"]["removed"]["language"]["documents"] == 1
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk["filters"]["kept"]["documents"] == 3


def test_only_the_processes_that_judge_load_py3langid(tmp_path, monkeypatch):
    """With workers the main process never loads py3langid (checking --lang reads filters.LANGUAGES, which is
    py3langid's labels); with --workers 1 it judges, and the verdicts are the same."""
    monkeypatch.setattr(importlib.import_module("lmlab.data.prepare"), "BATCH_CHARS", 100)  # a batch per document
    for name in [m for m in sys.modules if m.split(".")[0] == "py3langid"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(filters, "_IDENTIFIER", None)
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": t}) for t in [*PROSE, GERMAN]) + "\n")
    cfg, tok = load_filter_config(None, {"lang": ["en"], "min_stop_words": 2}), train_tokenizer("byte", [])
    two = prepare([str(train)], tok, tmp_path / "two", filters=cfg, workers=2, val_fraction=0)
    assert "py3langid" not in sys.modules
    assert two["filters"]["removed"]["language"]["documents"] == 1
    one = prepare([str(train)], tok, tmp_path / "one", filters=cfg, workers=1, val_fraction=0)
    assert "py3langid" in sys.modules and one["filters"]["removed"] == two["filters"]["removed"]
    assert filters.LANGUAGES == set(filters._identifier().labels)


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_filters_end_to_end_with_report_and_filtered_tokenizer_training(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(PROSE[0] + "\n" + PROSE[1])
    (corpus / "b.txt").write_text(PROSE[2])
    (corpus / "d.txt").write_text(GERMAN)
    (corpus / "e.txt").write_text((PROSE[0] + "\n" + PROSE[1]).replace("north", "south"))  # a near-copy of a.txt
    out, report = tmp_path / "data", tmp_path / "report"
    argv = ["data", "prepare", corpus, "--kind", "word", "--val-fraction", "0", "-o", out,
            "--lang", "en", "--near-dedupe", "--report", report]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert "language" in stdout and "near_duplicates" in stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["filters"]["removed"]["language"] == {"documents": 1, "bytes": len(GERMAN.encode())}
    assert meta["filters"]["removed"]["near_duplicates"]["documents"] == 1
    assert meta["splits"]["train"]["documents"] == 2
    vocab = Tokenizer.load(out / "tokenizer.json").tk.get_vocab()
    assert "Fluss" not in vocab and "south" not in vocab and "river" in vocab  # never seen by tokenizer training
    assert {p.name for p in report.iterdir()} == {"report.md", "report.json", "lengths.png"}
    assert "| language | 1 |" in (report / "report.md").read_text()
    code, _, err = run([*argv, "--force"], capsys)  # a report folder is replaced with --force
    assert code == 0, err
    for same in (out, out / "report", tmp_path):  # the report would replace the data folder's files
        code, _, err = run([*argv[:-1], same, "--force"], capsys)
        assert code == 1 and "the report needs a folder of its own, apart from the data folder" in err, err
    assert (out / "meta.json").is_file()


def test_tokenizer_training_and_shards_share_one_filter_pass(tmp_path, monkeypatch):
    """With a tokenizer to train, every filter (and PII redaction) still sees each document once."""
    calls: Counter = Counter()

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += len(args[0]) if name == "pii" else 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(filters, "word_count", counted("words", filters.word_count))
    monkeypatch.setattr(pii, "redact_batch", counted("pii", pii.redact_batch))
    for cls, name in ((LanguageFilter, "language"), (NearDuplicates, "near"), (Decontaminator, "decontamination")):
        monkeypatch.setattr(cls, "__call__", counted(name, cls.__call__))
    exam = tmp_path / "exam.jsonl"
    exam.write_text(json.dumps({"question": PROSE[2]}) + "\n")
    docs = [*PROSE, GERMAN, "Too short to keep.", PROSE[0] + " Truly.", "Write to bob@example.com about the mill, the church and the bakery before the flood comes."]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    cfg = FilterConfig(min_words=5, lang=["en"], near_dedupe=True, exclude=[str(exam)])
    meta = prepare([str(train)], tokenizer_trainer("word"), tmp_path / "out", val_fraction=0, filters=cfg,
                   redact_pii=True, workers=1)
    removed = {name: r["documents"] for name, r in meta["filters"]["removed"].items()}
    assert removed == {"words": 1, "language": 1, "near_duplicates": 1, "decontamination": 1}
    assert meta["filters"]["input"]["documents"] == 7 and meta["documents"] == meta["filters"]["kept"]["documents"] == 3
    assert meta["pii_redacted"]["email"] == 1
    assert calls == {"pii": 7, "words": 7, "language": 6, "near": 5, "decontamination": 4}  # once per document
    vocab = Tokenizer.load(tmp_path / "out").tk.get_vocab()
    assert "river" in vocab and "Fluss" not in vocab and "bob@example.com" not in vocab


@pytest.mark.parametrize("extra, fragment", [
    (["--filters", "nope"], "neither the preset"),
    (["--filter", "min_wrds=3"], "data.filters.min_wrds"),
    (["--lang", "xx"], "unknown language"),
    (["--report", "REPORT"], "--report: no filter is on"),
    (["--exclude", "missing.jsonl"], "missing.jsonl"),
])
def test_cli_bad_filter_input_is_one_line_error(tmp_path, capsys, extra, fragment):
    (tmp_path / "a.txt").write_text(PROSE[0])
    extra = [str(tmp_path / x) if x in ("REPORT", "missing.jsonl") else x for x in extra]
    code, _, err = run(["data", "prepare", tmp_path / "a.txt", "--kind", "byte", "-o", tmp_path / "out", *extra],
                       capsys)
    assert code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], err
    assert not (tmp_path / "out").exists()


def test_a_config_built_in_code_is_checked_when_used():
    with pytest.raises(ConfigError, match="data.filters.jaccard"):
        FilterPipeline(FilterConfig(jaccard=2.0))

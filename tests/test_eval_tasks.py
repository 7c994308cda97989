"""eval/loglik.py (the continuation scorer) and eval/tasks.py (YAML task specs), with the CLI: tiny models
built here, tiny data written to tmp_path."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.data.tokenizer import train_tokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.eval.loglik import encode_pair, rolling_windows, score_continuations, score_requests, score_rolling
from lmlab.eval.perplexity import sliding_window_nll
from lmlab.eval.tasks import evaluate_task, load_spec, normalize_answer, token_f1
from lmlab.models.registry import build_model
from lmlab.train.checkpoint import save_checkpoint

FAMILIES = {"gpt2": dict(preset="gpt2"), "llama": dict(preset="llama", n_kv_head=1),
            "lstm": dict(family="lstm", n_layer=1, d_ff=32)}
FACTS = [("the sky is", "blue"), ("grass is", "green"), ("blood is", "red"), ("snow is", "white")]
COLOURS = ["blue", "green", "red", "white"]


def tiny_model(tokenizer, family="gpt2", block_size=16, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(n_layer=2, n_head=2, d_model=32, block_size=block_size,
                                vocab_size=tokenizer.vocab_size), **FAMILIES[family]})
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer("bpe", ["the quick brown fox jumps over a lazy dog", "seven wizards hex jolly boxers"] * 5,
                           vocab_size=300)


def naive_score(model, tokenizer, context, continuation, max_length=None):
    """One pair, one full forward, no batching: the reference the scorer must equal."""
    ctx, cont = encode_pair(tokenizer, context, continuation)
    whole = ctx + cont
    if max_length:
        whole = whole[-(max_length + 1):]
    logits, _ = model(torch.tensor([whole[:-1]]))
    logprobs = F.log_softmax(logits[0, -len(cont):].float(), -1)
    target = torch.tensor(cont)
    return logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


PAIRS = [("the quick", " brown fox"), ("the quick", " lazy"), ("the quick", " jolly boxers dog"),
         ("seven wizards", " hex"), ("", "the dog"), ("over a ", "lazy dog"),
         ("a lazy dog jumps over the quick brown fox while seven wizards hex", " jolly")]


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_equal_one_pair_at_a_time(family, bpe):
    model = tiny_model(bpe, family)
    got = score_continuations(model, bpe, PAIRS, batch_size=3)
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        ref_logprob, ref_greedy = naive_score(model, bpe, context, continuation, model.context_length)
        assert logprob == pytest.approx(ref_logprob, abs=1e-5) and greedy == ref_greedy


def test_batch_size_and_padding_do_not_change_scores(bpe):
    model = tiny_model(bpe, "llama")
    alone = [score_continuations(model, bpe, [pair], batch_size=1)[0] for pair in PAIRS]
    for batch_size in (1, 2, 64):
        batched = score_continuations(model, bpe, PAIRS * 2, batch_size=batch_size)
        assert [s for s, _ in batched] == pytest.approx([s for s, _ in alone * 2], abs=1e-5)


def test_long_contexts_are_cut_on_the_left(bpe):
    model = tiny_model(bpe, "gpt2", block_size=8)
    context = "the quick brown fox jumps over a lazy dog while seven wizards hex"
    assert len(encode_pair(bpe, context, " jolly")[0]) > 8
    (logprob, _), = score_continuations(model, bpe, [(context, " jolly")])
    assert logprob == pytest.approx(naive_score(model, bpe, context, " jolly", 8)[0], abs=1e-5)
    lstm = tiny_model(bpe, "lstm")  # no window of its own: max_length cuts it
    (cut, _), = score_continuations(lstm, bpe, [(context, " jolly")], max_length=5)
    assert cut == pytest.approx(naive_score(lstm, bpe, context, " jolly", 5)[0], abs=1e-5)
    # a continuation longer than the window: scored in pieces of the window, each with left context
    context, continuation = encode_pair(bpe, "the", " quick brown fox jumps over a lazy dog while seven wizards")
    assert len(continuation) > 8
    ids, expected, greedy = context + continuation, 0.0, True
    for start in range(len(context), len(ids), 8):
        end = min(start + 8, len(ids))
        inputs = ids[max(0, end - 9):end - 1]
        logprobs = F.log_softmax(model(torch.tensor([inputs]))[0][0, -(end - start):], -1)
        target = torch.tensor(ids[start:end])
        expected += logprobs.gather(1, target[:, None]).sum().item()
        greedy &= bool((logprobs.argmax(-1) == target).all())
    (logprob, is_greedy), = score_continuations(model, bpe, [("the", " quick brown fox jumps over a lazy dog while "
                                                                     "seven wizards")], batch_size=2)
    assert logprob == pytest.approx(expected, abs=1e-5) and is_greedy == greedy


@pytest.mark.parametrize("family", ["gpt2", "lstm"])
def test_a_batch_of_shared_and_cut_contexts_equals_one_pair_at_a_time(family, bpe):
    """Requests that fit share their context's forward, requests cut on the left are read whole: one batch of both."""
    model = tiny_model(bpe, family, block_size=8)
    pairs = [("the quick brown fox jumps over a lazy dog while seven wizards hex", " jolly"), *PAIRS[:4]]
    got = score_continuations(model, bpe, pairs, batch_size=8, max_length=8)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        assert (logprob, greedy) == (pytest.approx(naive_score(model, bpe, context, continuation, 8)[0], abs=1e-5),
                                     naive_score(model, bpe, context, continuation, 8)[1])


def test_the_split_gives_leading_spaces_to_the_continuation(bpe):
    context, continuation = encode_pair(bpe, "the quick ", "brown")
    assert (context, continuation) == (bpe.encode("the quick"), bpe.encode("the quick brown")[len(context):])
    assert bpe.decode(continuation) == " brown"
    assert encode_pair(bpe, "", "the dog") == ([bpe.eot_id], bpe.encode("the dog"))


def test_identical_requests_are_scored_once_and_answered_in_order(bpe, monkeypatch):
    model = tiny_model(bpe, "gpt2")
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x, *a, **k: calls.append(x.shape) or forward(x, *a, **k))
    requests = [([1, 2], [3]), ([1, 2], [4]), ([1, 2], [3]), ([5], [6, 7])]
    scores = score_requests(model, requests, batch_size=8)
    # the 2 distinct contexts read once (but their last tokens), then the 3 distinct continuations in one forward
    assert scores[0] == scores[2] and [shape[0] for shape in calls] == [2, 3]


def test_rolling_scores_every_token_once(bpe):
    model = tiny_model(bpe, "gpt2", block_size=8)
    text = "the quick brown fox jumps over a lazy dog while seven wizards hex jolly boxers"
    ids = [bpe.eot_id, *bpe.encode(text)]
    spans = rolling_windows(len(ids), 8)
    assert [i for _, end, first in spans for i in range(first, end)] == list(range(1, len(ids)))
    whole = ids[:1 + 8 * ((len(ids) - 1) // 8)]  # a whole number of windows: perplexity's windows exactly
    total, _ = sliding_window_nll(model, whole, stride=8)
    assert score_rolling(model, bpe, [bpe.decode(whole[1:])])[0] == pytest.approx(-total, abs=1e-4)
    lm_eval_utils = pytest.importorskip("lm_eval.utils")
    tokens = ids[1:]
    harness = [lm_eval_utils.make_disjoint_window(w)
               for w in lm_eval_utils.get_rolling_token_windows(tokens, bpe.eot_id, 8, 1)]
    assert harness == [(ids[b:f], ids[f:e]) for b, e, f in spans]


# ---------------------------------------------------------------------------------------------
# tasks


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_spec(path, **spec):
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def test_acc_norm_divides_by_characters_and_acc_bytes_by_utf8_bytes(tmp_path):
    """A model with zero output weights gives every token the same probability, so a continuation's
    log-probability is -(tokens) * ln V: acc picks the shortest choice, the normalised ones the longest
    (by characters, or by bytes; byte tokens make "ééé" 6 tokens long)."""
    tokenizer = train_tokenizer("byte", [])
    model = tiny_model(tokenizer, "gpt2")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    data = write_jsonl(tmp_path / "test.jsonl", [{"context": "Q:", "choices": ["ab", "abcdefgh"], "label": 1},
                                                 {"context": "Q:", "choices": ["abcd", "ééé"], "label": 1}])
    spec = load_spec(str(write_spec(tmp_path / "t.yaml", name="t", type="multiple_choice", data=str(data),
                                    metrics=["acc", "acc_norm", "acc_bytes"])))
    result = evaluate_task(model, tokenizer, spec)
    assert [s["pred"] for s in result["samples"]] == [0, 0]  # the fewest tokens: "ab", then "abcd" (4 < 6)
    assert [s["pred_norm"] for s in result["samples"]] == [1, 0]  # per character: -9/8 > -3/2; -5/4 > -7/3
    assert result["metrics"] == {"acc": 0.0, "acc_norm": 0.5, "acc_bytes": 1.0}  # per byte: -7/6 > -5/4


@pytest.fixture(scope="module")
def taught():
    """A char-level GPT trained until it says which colour each thing is: (model, tokenizer). (No
    end-of-text in front: the harness's way of scoring adds none to a context.)"""
    texts = [f"{thing} {colour}\n" for thing, colour in FACTS]
    tokenizer = train_tokenizer("char", texts)
    model = tiny_model(tokenizer, "gpt2", block_size=32).train()
    rows = [torch.tensor(tokenizer.encode(t)) for t in texts]
    x = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        _, loss = model(x[:, :-1].clamp(min=0), targets=x[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer


@pytest.fixture
def facts(tmp_path):
    """A folder with train/test JSONL of the facts in every task type's fields."""
    records = [{"context": thing, "choices": COLOURS, "label": COLOURS.index(colour), "text": f"{thing} {colour}",
                "answer": [colour, colour.upper()], "colour": colour[0]} for thing, colour in FACTS]
    folder = tmp_path / "facts"
    folder.mkdir()
    write_jsonl(folder / "facts_test.jsonl", records)
    write_jsonl(folder / "facts_train.jsonl", records[::-1])
    return folder


@pytest.mark.parametrize("kind, extra, figures", [
    ("multiple_choice", {}, {"acc": 1.0, "acc_norm": 1.0}),
    ("last_word", {}, {"acc": 1.0}),
    ("generation", {"max_new_tokens": 8}, {"exact_match": 1.0, "f1": 1.0}),
    ("generation", {"max_new_tokens": 8, "metrics": ["rouge", "bleu"]}, {"rouge1": 100.0, "rougeL": 100.0}),
    ("classification", {"labels": {c[0]: c for c in COLOURS}, "fields": {"text": "context", "label": "colour"}},
     {"acc": 1.0, "macro_f1": 1.0}),
    ("classification", {"labels": {i: c for i, c in enumerate(COLOURS)}, "fields": {"text": "context"}},
     {"acc": 1.0}),  # label values that YAML reads as ints
])
def test_a_model_that_knows_the_answers_gets_them_all(kind, extra, figures, taught, facts):
    model, tokenizer = taught
    spec = load_spec(str(write_spec(facts / "spec.yaml", name="facts", type=kind, data=".", **extra)))
    result = evaluate_task(model, tokenizer, spec, batch_size=3)
    assert result["examples"] == 4
    assert {k: result["metrics"][k] for k in figures} == figures
    if kind == "last_word":
        assert 1.0 <= result["metrics"]["perplexity"] < 2.0


def test_an_untrained_model_is_near_chance_not_perfect(taught, facts):
    _, tokenizer = taught
    spec = load_spec(str(write_spec(facts / "spec.yaml", name="facts", type="multiple_choice", data=".")))
    result = evaluate_task(tiny_model(tokenizer, "gpt2", block_size=32), tokenizer, spec)
    assert result["metrics"]["acc"] < 1.0 and result["chance"] == 0.25


def test_fewshot_examples_come_from_the_train_split_with_the_seed(taught, facts):
    model, tokenizer = taught
    spec = load_spec(str(write_spec(facts / "spec.yaml", name="facts", type="multiple_choice", data=".",
                                    prompt="{context} is coloured", num_fewshot=2)))
    first = evaluate_task(model, tokenizer, spec)["samples"]
    again = evaluate_task(model, tokenizer, spec)["samples"]
    assert [s["prompt"] for s in first] == [s["prompt"] for s in again]
    prompt = first[0]["prompt"]
    shots = prompt.split("\n\n")
    assert len(shots) == 3 and shots[-1] == "the sky is is coloured"
    assert all(shot.split(" is coloured ")[1] == dict(FACTS)[shot.split(" is coloured ")[0]] for shot in shots[:2])
    one_file = load_spec(str(write_spec(facts / "one.yaml", name="facts", type="multiple_choice", num_fewshot=3,
                                        data="facts_test.jsonl")))
    for sample in evaluate_task(model, tokenizer, one_file)["samples"]:  # drawn from the same file: never itself
        assert sample["prompt"].count(sample["prompt"].split("\n\n")[-1]) == 1


def test_arc_format_reads_labels_of_letters_and_digits(taught, tmp_path):
    model, tokenizer = taught
    records = [{"question": {"stem": "grass is", "choices": [{"label": "1", "text": "red"}, {"label": "2",
                                                                                            "text": "green"}]},
                "answerKey": "2"},
               {"question": {"stem": "snow is", "choices": [{"label": "A", "text": "white"}, {"label": "B",
                                                                                            "text": "blue"}]},
                "answerKey": "A"}]
    write_jsonl(tmp_path / "ARC-Test.jsonl", records)
    spec = load_spec("arc_easy", {"data": str(tmp_path), "limit": 2})
    result = evaluate_task(model, tokenizer, dataclasses_replace(spec, prompt="{question}"))
    assert [s["gold"] for s in result["samples"]] == [1, 0] and result["metrics"]["acc"] == 1.0
    assert result["samples"][0]["choices"] == ["red", "green"]
    assert load_spec("arc_easy").prompt == "Question: {question}\nAnswer:"


def dataclasses_replace(spec, **changes):
    import dataclasses

    return dataclasses.replace(spec, **changes)


def test_hellaswag_format_joins_and_cleans_the_context(tmp_path):
    from lmlab.eval.tasks import read_docs

    write_jsonl(tmp_path / "hellaswag_val.jsonl", [{"activity_label": "Baking", "ctx_a": "She mixes flour.",
                                                    "ctx_b": "then she", "endings": ["bakes [title] it", "b"],
                                                    "label": "0"}])
    doc, = read_docs(load_spec("hellaswag", {"data": str(tmp_path)}))
    assert doc.fields["context"] == "Baking: She mixes flour. Then she" and doc.targets[0] == "bakes. it"


def test_squad_normalisation_and_token_f1():
    assert normalize_answer("The  Blue, sky!") == "blue sky"
    assert token_f1("a blue sky", "the blue sea") == pytest.approx(0.5)
    assert token_f1("", "") == 1.0 and token_f1("red", "") == 0.0


@pytest.mark.parametrize("spec, fragment", [
    ({"name": "t", "type": "multiple_choice", "promt": "x"}, "prompt"),  # did you mean
    ({"name": "t", "type": "ranking"}, "task.type"),
    ({"type": "multiple_choice"}, "name must be given"),
    ({"name": "t", "type": "multiple_choice", "num_fewshot": -1}, "task.num_fewshot"),
    ({"name": "t", "type": "multiple_choice", "metrics": ["bleu"]}, "does not apply to multiple_choice"),
    ({"name": "t", "type": "classification"}, "needs labels"),
    ({"name": "t", "type": "classification", "labels": {0: "bad", 1: "bad", 2: "good"}}, "must be distinct and not empty"),
    ({"name": "t", "type": "classification", "labels": {0: "", 1: "good"}}, "must be distinct and not empty"),
    ({"name": "t", "type": "classification", "labels": {1: "good"}}, "at least 2 labels"),
    ({"name": "t", "type": "generation", "format": "arc"}, "format arc is a multiple_choice format"),
    ({"name": "t", "type": "last_word", "fields": {"answer": "a"}}, "reads no field 'answer'"),
    ({"name": "t", "type": "multiple_choice", "prompt": "{context"}, "not a valid template"),
])
def test_bad_specs_are_one_line_config_errors(spec, fragment, tmp_path):
    with pytest.raises(ConfigError, match=fragment) as e:
        load_spec(str(write_spec(tmp_path / "bad.yaml", **spec)))
    assert "\n" not in str(e.value)


def test_bad_data_is_a_one_line_data_error(taught, tmp_path):
    model, tokenizer = taught
    cases = [({"context": "x", "choices": ["a", "b"], "label": 3}, "neither an index"),
             ({"context": "x", "options": ["a"], "label": 0}, "no field 'choices'"),
             ({"context": "x", "choices": "a b", "label": 0}, "must be a list of non-empty strings"),
             ({"context": "x", "choices": ["", "b"], "label": 0}, "must be a list of non-empty strings"),
             ({"context": "x", "choices": ["a"], "label": 0}, "holds 1 choice; a question needs 2 or more"),
             ({"context": None, "choices": ["a", "b"], "label": 0}, "'context' is None, not a text")]
    for record, fragment in cases:
        data = write_jsonl(tmp_path / "test.jsonl", [record])
        spec = load_spec(str(write_spec(tmp_path / "s.yaml", name="t", type="multiple_choice", data=str(data))))
        with pytest.raises(DataError, match=fragment):
            evaluate_task(model, tokenizer, spec)
    write_jsonl(tmp_path / "test.jsonl", [{"context": "x", "choices": ["a", "b"], "label": 0}])
    spec = load_spec(str(write_spec(tmp_path / "s.yaml", name="t", type="multiple_choice", data=".",
                                    prompt="{nothing}")))
    with pytest.raises(DataError, match="names {nothing}"):
        evaluate_task(model, tokenizer, spec)
    with pytest.raises(ConfigError, match="has no data"):
        evaluate_task(model, tokenizer, load_spec("arc_easy"))
    with pytest.raises(ConfigError, match="unknown task 'arc_hard'"):
        load_spec("arc_hard")


def test_cli_task_and_compare_end_to_end(taught, facts, tmp_path, capsys):
    model, tokenizer = taught
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    spec = write_spec(facts / "spec.yaml", name="facts", type="multiple_choice")
    assert main(["eval", "task", str(ckpt), "--task", str(spec), "--data", str(facts), "--limit", "3",
                 "--out", str(tmp_path / "a")]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == {"acc": 1.0, "acc_norm": 1.0}
    result = json.loads((tmp_path / "a" / "results.json").read_text())
    assert result["examples"] == 3 and "samples" not in result
    assert len((tmp_path / "a" / "samples.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "a" / "metrics.png").stat().st_size > 0 and "| acc |" in (tmp_path / "a" / "results.md").read_text()
    assert main(["eval", "task", str(ckpt), "--task", str(spec), "--data", str(facts), "--num-fewshot", "1",
                 "--out", str(tmp_path / "runs" / "b")]) == 0
    capsys.readouterr()
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "runs"), "--out", str(tmp_path / "c")]) == 0
    table = (tmp_path / "c" / "results.md").read_text()
    assert "| a | facts | 3 |" in table and "| runs/b | facts | 4 |" in table  # named by their folders
    assert (tmp_path / "c" / "comparison.png").is_file()
    (tmp_path / "hand").mkdir()
    (tmp_path / "hand" / "results.json").write_text(json.dumps({**result, "metrics": {"acc": "high"}}))
    for argv, fragment in [(["eval", "task", str(ckpt), "--task", "nope", "--out", str(tmp_path / "d")], "unknown task"),
                           (["eval", "task", str(ckpt), "--task", str(spec), "--limit", "0", "--out",
                             str(tmp_path / "d")], "task.limit"),
                           (["eval", "task", str(ckpt), "--task", str(spec), "--data", str(tmp_path / "none"),
                             "--out", str(tmp_path / "d")], "no such file or folder"),
                           (["eval", "compare", str(ckpt), "--out", str(tmp_path / "d")], "no results.json"),
                           (["eval", "compare", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "d")],
                            "the same results given twice"),
                           (["eval", "compare", str(tmp_path / "hand"), "--out", str(tmp_path / "d")],
                            "metric 'acc' is 'high', not a number")]:
        assert main(argv) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and fragment in errors[0]
    assert not (tmp_path / "d").exists()


def test_a_classifier_checkpoint_runs_a_classification_task_as_eval_classify_does(taught, tmp_path):
    from lmlab.finetune.classify import build_classifier, evaluate_classification_task, evaluate_file
    from lmlab.train.checkpoint import load_checkpoint

    _, tokenizer = taught
    classifier = build_classifier(tiny_model(tokenizer, "gpt2", block_size=32, seed=3), ["cold", "warm"], None, 0.0)
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "clf", classifier, tokenizer))
    records = [{"text": thing, "label": "cold" if colour in ("blue", "white") else "warm"} for thing, colour in FACTS]
    (tmp_path / "data").mkdir()
    data = write_jsonl(tmp_path / "data" / "test.jsonl", records)
    spec = load_spec(str(write_spec(tmp_path / "s.yaml", name="warmth", type="classification", data=str(data),
                                    labels={"warm": "warm", "cold": "cold"})))  # another order than the head's
    result = evaluate_classification_task(ckpt, spec)
    reference = evaluate_file(ckpt, str(data), text_field="text")
    assert result["examples"] == 4 and result["metrics"]["acc"] == pytest.approx(reference["accuracy"])
    assert result["metrics"]["macro_f1"] == pytest.approx(reference["macro_f1"])
    with pytest.raises(ConfigError, match="label 'hot' is not one of the classifier's"):
        evaluate_classification_task(ckpt, dataclasses_replace(spec, labels={"hot": "hot"}))

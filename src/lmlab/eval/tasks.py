"""Evaluation tasks described by small YAML specs (``lmlab eval task``), so that users add their own.

A spec names the data (a file, or a folder whose files are named after their splits), its format, the
prompt and the metrics; every record becomes a prompt and either choices to score (multiple choice,
classification by label words, last word) or references to compare a greedy generation with.

    multiple_choice  the choice with the highest log-probability after the prompt (eval/loglik.py):
                     acc; acc_norm, the log-probability divided by the choice's length in characters,
                     and acc_bytes, divided by its UTF-8 bytes (lm-evaluation-harness's definitions:
                     the length of the choice text, the delimiter before it not counted)
    last_word        LAMBADA: acc = greedy decoding yields the whole last word; perplexity =
                     exp(-mean log-probability of the last word) over the examples (the harness's)
    generation       greedy decoding (the generation engine) until a stop string: exact_match and f1
                     (SQuAD's normalisation, best over the references), bleu / rouge (eval/text_metrics)
    classification   a language model chooses among label words by log-likelihood; a classifier
                     checkpoint classifies the text (finetune/classify.py): acc, macro_f1

Formats: ``arc`` (AI2's ARC JSONL: question.stem, question.choices[{label, text}], answerKey),
``hellaswag`` (ctx or ctx_a/ctx_b, endings, label; the harness's clean-up of WikiHow's brackets) and
``json`` (JSONL/JSON/TSV/CSV records whose fields ``fields`` names: context/choices/label, text,
context/answer, text/label). Few-shot examples come from the ``fewshot_split`` with a fixed seed.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import random
import re
import string
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import torch.nn as nn

from lmlab.config import Count, Name, NonNegativeInt, Precision, Seed, check_argument, from_dict, read_yaml_mapping
from lmlab.data.labeled import TABLE_SUFFIXES, iter_rows, table_suffix
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.eval.loglik import score_continuations
from lmlab.eval.metrics import classification_report
from lmlab.eval.text_metrics import text_scores
from lmlab.generate.engine import generate_texts
from lmlab.generate.sampling import SamplingParams
from lmlab.models.interface import width_of
from lmlab.runtime import autocast_context, resolve_precision

log = logging.getLogger(__name__)
TaskType = Literal["multiple_choice", "last_word", "generation", "classification"]
TaskFormat = Literal["json", "arc", "hellaswag"]
METRICS = {
    "multiple_choice": ("acc", "acc_norm", "acc_bytes"),
    "last_word": ("acc", "perplexity"),
    "generation": ("exact_match", "f1", "bleu", "rouge"),
    "classification": ("acc", "macro_f1"),
}
DEFAULT_METRICS = {"multiple_choice": ["acc", "acc_norm"], "last_word": ["acc", "perplexity"],
                   "generation": ["exact_match", "f1"], "classification": ["acc", "macro_f1"]}
ROLES = {  # the fields each task type reads from a record of format json (role -> default key)
    "multiple_choice": {"context": "context", "choices": "choices", "label": "label"},
    "last_word": {"text": "text"},
    "generation": {"context": "context", "answer": "answer"},
    "classification": {"text": "text", "label": "label"},
}
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev", "val"), "test": ("test",)}
SPEC_DIR = "task_specs"  # the built-in specs, package data of lmlab.eval


@dataclass
class TaskSpec:
    """One evaluation task, as a YAML spec writes it (see docs/evaluation.md)."""

    name: Name
    type: TaskType
    data: str | None = None  # a file, or a folder of split files; relative to the spec's folder
    format: TaskFormat = "json"
    fields: dict[str, str] = field(default_factory=dict)  # role -> record key (a.b for nested), format json
    split: Name = "test"
    fewshot_split: Name = "train"
    num_fewshot: NonNegativeInt = 0
    fewshot_seed: Seed = 1234
    prompt: str | None = None  # a str.format template over the record's fields; default {context} / {text}
    target_delimiter: str = " "  # between the prompt and a choice / answer / label word
    fewshot_delimiter: str = "\n\n"  # between few-shot examples
    metrics: list[str] = field(default_factory=list)  # default: DEFAULT_METRICS of the type
    limit: Count | None = None  # the first N examples
    labels: dict[str, str] = field(default_factory=dict)  # classification: label value -> label word
    max_new_tokens: Count = 32  # generation
    stop: list[str] = field(default_factory=lambda: ["\n"])  # generation ends before any of these


@dataclass
class Doc:
    """One example, whatever its format: the fields its prompt reads, the choices (or references) and
    the gold choice's index (-1 for generation)."""

    fields: dict
    targets: list[str]
    gold: int
    where: str


def builtin_tasks() -> list[str]:
    """Names of the specs that ship with lmlab (src/lmlab/eval/task_specs/*.yaml)."""
    folder = resources.files("lmlab.eval") / SPEC_DIR
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_spec(task: str, overrides: dict | None = None) -> TaskSpec:
    """The spec of a built-in task name or a YAML file, with ``overrides`` (data, limit, num_fewshot...)
    applied; a relative ``data`` in a file is relative to that file's folder. One-line ConfigErrors."""
    path = Path(task)
    if task.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"{task}: no such task spec file")
        data, base = read_yaml_mapping(path), path.parent
    elif task in builtin_tasks():
        source = resources.files("lmlab.eval") / SPEC_DIR / f"{task}.yaml"
        with resources.as_file(source) as file:
            data, base = read_yaml_mapping(file), None
    else:
        raise ConfigError(f"unknown task {task!r}: give a spec file (.yaml) or one of {', '.join(builtin_tasks())}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if isinstance(data.get("labels"), dict):  # YAML reads "0: negative" with an int key; records' labels are text
        data["labels"] = {str(k): v for k, v in data["labels"].items()}
    data = {**data, **overrides}
    missing = [key for key in ("name", "type") if key not in data]
    if missing:
        raise ConfigError(f"task spec {task}: {' and '.join(missing)} must be given (type: {', '.join(METRICS)})")
    spec = from_dict(TaskSpec, data, "task.")
    if spec.data and base is not None and not Path(spec.data).is_absolute() and "data" not in overrides:
        spec = dataclasses.replace(spec, data=str(base / spec.data))
    check_spec(spec)
    return spec


def check_spec(spec: TaskSpec) -> None:
    """Refuse what the types let through but the task cannot use: metrics of another type, fields of
    another type, a classification without label words, a prompt that is no template."""
    allowed = METRICS[spec.type]
    unknown = [m for m in spec.metrics if m not in allowed]
    if unknown:
        raise ConfigError(f"task {spec.name}: metric {unknown[0]!r} does not apply to {spec.type} "
                          f"(choose from {', '.join(allowed)})")
    if spec.format != "json" and spec.type != "multiple_choice":
        raise ConfigError(f"task {spec.name}: format {spec.format} is a multiple_choice format; "
                          f"use format json for {spec.type}")
    if spec.format != "json" and spec.fields:
        raise ConfigError(f"task {spec.name}: fields apply to format json only ({spec.format} has fixed fields)")
    wrong = [r for r in spec.fields if r not in ROLES[spec.type]]
    if wrong:
        raise ConfigError(f"task {spec.name}: {spec.type} reads no field {wrong[0]!r} "
                          f"(its fields: {', '.join(ROLES[spec.type])})")
    if spec.type == "classification":
        words = [str(w).strip() for w in spec.labels.values()]
        if not words:
            raise ConfigError(f"task {spec.name}: classification needs labels (label value -> label word)")
        if not all(words) or len(set(words)) < len(words):
            raise ConfigError(f"task {spec.name}: the label words must be distinct and not empty, got "
                              f"{', '.join(map(repr, spec.labels.values()))} (a label no word tells apart is never "
                              f"predicted)")
        if len(words) < 2:
            raise ConfigError(f"task {spec.name}: classification needs at least 2 labels")
    try:
        list(string.Formatter().parse(prompt_template(spec)))
    except ValueError as e:
        raise ConfigError(f"task {spec.name}: prompt is not a valid template ({e})") from None


def prompt_template(spec: TaskSpec) -> str:
    """The spec's prompt, or the type's default: {text} for last_word and classification, else {context}."""
    if spec.prompt is not None:
        return spec.prompt
    return "{text}" if spec.type == "classification" else "{context}"


# ---------------------------------------------------------------------------------------------
# reading the data


def split_file(spec: TaskSpec, split: str) -> Path:
    """The file of ``split``: ``spec.data`` itself if it is a file (the evaluated split), else the one
    file in that folder whose name holds the split's name (test; validation also as dev, valid, val)."""
    if not spec.data:
        raise ConfigError(f"task {spec.name} has no data: give --data (a file, or a folder of split files)")
    data = Path(spec.data)
    if data.is_file():
        return data
    if not data.is_dir():
        raise DataError(f"{data}: no such file or folder")
    names = SPLIT_NAMES.get(split, (split,))
    found = [p for p in sorted(data.iterdir()) if p.is_file() and table_suffix(p) in TABLE_SUFFIXES
             and any(n in p.name.lower() for n in names)]
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({', '.join(p.name for p in found)})"
        raise DataError(f"{data}: {what} named after split {split!r}; give the file itself with --data")
    return found[0]


def read_docs(spec: TaskSpec, split: str | None = None, limit: int | None = None) -> list[Doc]:
    """The examples of a split (default: the spec's), the first ``limit`` of them if given."""
    path = split_file(spec, split or spec.split)
    docs = []
    for line, record in iter_rows(path):
        if limit is not None and len(docs) == limit:
            break
        docs.append(to_doc(spec, record, f"{path}:{line}"))
    if not docs:
        raise DataError(f"{path}: no examples")
    return docs


def to_doc(spec: TaskSpec, record: dict, where: str) -> Doc:
    """One record as a Doc, by the spec's format and type."""
    if spec.format == "arc":
        return _arc_doc(record, where)
    if spec.format == "hellaswag":
        return _hellaswag_doc(record, where)
    keys = {**ROLES[spec.type], **spec.fields}
    values = {role: lookup(record, key, where) for role, key in keys.items()}
    fields = {k: v for k, v in record.items() if isinstance(v, (str, int, float))}
    for role in ("context", "text"):  # a number reads as its text; null, a list or a boolean is a mistake
        value = values.get(role)
        if role in values and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise DataError(f"{where}: {keys[role]!r} is {value!r}, not a text")
    if spec.type == "multiple_choice":
        choices = values["choices"]
        if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
            raise DataError(f"{where}: {keys['choices']!r} must be a list of non-empty strings")
        if len(choices) < 2:
            raise DataError(f"{where}: {keys['choices']!r} holds {len(choices)} choice; a question needs 2 or more")
        return Doc({**fields, "context": str(values["context"])}, choices, gold_index(values["label"], choices, where),
                   where)
    if spec.type == "last_word":
        text = str(values["text"]).rstrip()
        if " " not in text:
            raise DataError(f"{where}: the text has no space, so no last word after a context")
        context, word = text.rsplit(" ", 1)
        return Doc({**fields, "context": context, "text": context}, [word], 0, where)
    if spec.type == "generation":
        answers = values["answer"] if isinstance(values["answer"], list) else [values["answer"]]
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise DataError(f"{where}: {keys['answer']!r} must be a non-empty string or a list of them")
        return Doc({**fields, "context": str(values["context"])}, answers, -1, where)
    label = str(values["label"]).strip()
    if label not in spec.labels:
        raise DataError(f"{where}: label {label!r} is none of the spec's labels ({', '.join(spec.labels)})")
    return Doc({**fields, "text": str(values["text"])}, list(spec.labels.values()), list(spec.labels).index(label),
               where)


def lookup(record: dict, key: str, where: str):
    """record[a][b] for key "a.b"; a missing key is a DataError naming the fields there are."""
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            there = ", ".join(map(str, value)) if isinstance(value, dict) else type(value).__name__
            raise DataError(f"{where}: no field {key!r} (fields: {there}); set it in the spec's fields")
        value = value[part]
    return value


def gold_index(label, choices: list[str], where: str) -> int:
    """The gold choice's index from a label: an index (int or digits), or the choice's own text."""
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(choices):
        return label
    if isinstance(label, str) and label in choices:
        return choices.index(label)
    raise DataError(f"{where}: label {label!r} is neither an index of the {len(choices)} choices nor one of them")


def _arc_doc(record: dict, where: str) -> Doc:
    """AI2 ARC's JSONL: the stem, the choices' texts in order, and the answer key's index among the labels."""
    stem = lookup(record, "question.stem", where)
    choices = lookup(record, "question.choices", where)
    labels = [str(c.get("label")) for c in choices]
    answer = str(lookup(record, "answerKey", where))
    if answer not in labels:
        raise DataError(f"{where}: answerKey {answer!r} is none of the labels {', '.join(labels)}")
    return Doc({"context": stem, "question": stem}, [str(c.get("text", "")) for c in choices],
               labels.index(answer), where)


def _hellaswag_doc(record: dict, where: str) -> Doc:
    """HellaSwag: activity label, ctx_a and ctx_b (or ctx), the endings and the label, cleaned as the
    harness cleans them (WikiHow's [title] becomes a full stop, other [brackets] go)."""
    if "ctx_a" in record:
        context = lookup(record, "ctx_a", where) + " " + lookup(record, "ctx_b", where).capitalize()
    else:
        context = lookup(record, "ctx", where)
    if record.get("activity_label"):
        context = f"{record['activity_label']}: {context}"
    endings = [_hellaswag_clean(e) for e in lookup(record, "endings", where)]
    return Doc({"context": _hellaswag_clean(context)}, endings, gold_index(lookup(record, "label", where), endings,
                                                                         where), where)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


# ---------------------------------------------------------------------------------------------
# prompts


def render(spec: TaskSpec, doc: Doc) -> str:
    """The prompt of one example (without few-shot examples)."""
    try:
        return prompt_template(spec).format_map(doc.fields)
    except KeyError as e:
        raise DataError(f"{doc.where}: the prompt names {{{e.args[0]}}}, which is not a field of the record "
                        f"(fields: {', '.join(doc.fields)})") from None
    except (IndexError, ValueError) as e:
        raise ConfigError(f"task {spec.name}: prompt is not a valid template ({e})") from None


def fewshot_prompts(spec: TaskSpec, docs: list[Doc], pool: list[Doc] | None) -> list[str]:
    """Each example's full prompt: ``num_fewshot`` solved examples drawn from ``pool`` (None: the evaluated
    docs themselves, never the example itself) by one generator seeded with fewshot_seed, then its own."""
    k = spec.num_fewshot
    if k == 0:
        return [render(spec, doc) for doc in docs]
    candidates = docs if pool is None else pool
    if len(candidates) < k + (pool is None):
        usable = len(candidates) - (pool is None)
        where = "other examples to draw from (an example is never its own shot)" if pool is None else "examples in its pool"
        raise DataError(f"task {spec.name}: {k} few-shot examples asked for, but it has {usable} {where}")
    rng = random.Random(spec.fewshot_seed)
    prompts = []
    for i, doc in enumerate(docs):
        if pool is None:
            shots = [j for j in rng.sample(range(len(docs)), k + 1) if j != i][:k]
        else:
            shots = rng.sample(range(len(pool)), k)
        solved = [render(spec, candidates[j]) + spec.target_delimiter + solved_target(candidates[j]) for j in shots]
        prompts.append(spec.fewshot_delimiter.join(solved) + spec.fewshot_delimiter + render(spec, doc))
    return prompts


def solved_target(doc: Doc) -> str:
    """What follows the prompt in a solved few-shot example: the gold choice, or the first reference."""
    return doc.targets[max(doc.gold, 0)]


def fewshot_pool(spec: TaskSpec) -> list[Doc] | None:
    """The few-shot examples' pool: the fewshot_split's docs; None (draw from the evaluated docs) when that
    is the evaluated split or ``data`` is one file."""
    if spec.num_fewshot == 0 or spec.fewshot_split == spec.split or Path(spec.data or "").is_file():
        return None
    return read_docs(spec, spec.fewshot_split)


# ---------------------------------------------------------------------------------------------
# scoring


def evaluate_task(model: nn.Module, tokenizer: Tokenizer, spec: TaskSpec, batch_size: int = 32,
                  precision: str = "fp32") -> dict:
    """Run one task on a decoder language model: {"task", "metrics", "stderr", "samples", ...}.

    ``samples`` holds each example's prompt, gold answer and what the model scored or wrote (what
    samples.jsonl keeps); ``precision`` is autocast's for the forward passes (fp32 by default, so that
    the log-likelihoods equal those of other tools).
    """
    check_argument("batch_size", batch_size, Count)
    check_argument("precision", precision, Precision)
    docs = read_docs(spec, limit=spec.limit)
    prompts = fewshot_prompts(spec, docs, fewshot_pool(spec))
    log.info("%s: %d examples, %d-shot, %s", spec.name, len(docs), spec.num_fewshot,
             "greedy generation" if spec.type == "generation" else f"{sum(len(d.targets) for d in docs)} continuations")
    device = next(model.parameters()).device
    start = time.perf_counter()
    with autocast_context(resolve_precision(precision, device, width_of(model)), device):
        if spec.type == "generation":
            per_example, samples = _generation(model, tokenizer, spec, docs, prompts, batch_size)
        else:
            per_example, samples = _choices(model, tokenizer, spec, docs, prompts, batch_size)
    return task_result(spec, docs, per_example, samples, time.perf_counter() - start)


def task_result(spec: TaskSpec, docs: list[Doc], per_example: dict, samples: list[dict], seconds: float) -> dict:
    """What a task run reports, whoever scored it (a language model here, a classifier in finetune/classify):
    the spec's settings, the metrics with their standard errors, chance, the speed and the samples."""
    metrics = spec.metrics or DEFAULT_METRICS[spec.type]
    return {"task": spec.name, "type": spec.type, "data": str(split_file(spec, spec.split)), "split": spec.split,
            "examples": len(docs), "num_fewshot": spec.num_fewshot, "fewshot_seed": spec.fewshot_seed,
            **({"chance": float(np.mean([1 / len(d.targets) for d in docs]))} if spec.type != "generation" else {}),
            "metrics": aggregate(metrics, per_example, samples, docs),
            "stderr": {m: mean_stderr(per_example[m]) for m in metrics if m in per_example},
            "seconds": round(seconds, 3), "examples_per_s": round(len(docs) / max(seconds, 1e-9), 2),
            "samples": samples}


def _choices(model: nn.Module, tokenizer: Tokenizer, spec: TaskSpec, docs: list[Doc], prompts: list[str],
             batch_size: int) -> tuple[dict, list[dict]]:
    """Multiple choice, last word and classification: every (prompt, delimiter + choice) pair scored in one
    call of the scorer; per-example figures and samples."""
    pairs = [(prompt, spec.target_delimiter + choice) for prompt, doc in zip(prompts, docs) for choice in doc.targets]
    scores = iter(score_continuations(model, tokenizer, pairs, batch_size))
    per_example: dict[str, list[float]] = collections.defaultdict(list)
    samples = []
    for prompt, doc in zip(prompts, docs):
        logprobs, greedy = zip(*[next(scores) for _ in doc.targets])
        lls = np.asarray(logprobs)
        chars = np.asarray([len(c) for c in doc.targets], dtype=float)
        nbytes = np.asarray([len(c.encode("utf-8")) for c in doc.targets], dtype=float)
        pred, pred_norm, pred_bytes = int(np.argmax(lls)), int(np.argmax(lls / chars)), int(np.argmax(lls / nbytes))
        if spec.type == "last_word":
            per_example["acc"].append(float(greedy[0]))
            per_example["loglik"].append(float(lls[0]))
        else:
            per_example["acc"].append(float(pred == doc.gold))
            per_example["acc_norm"].append(float(pred_norm == doc.gold))
            per_example["acc_bytes"].append(float(pred_bytes == doc.gold))
            per_example["pred"].append(pred)
        samples.append({"where": doc.where, "prompt": prompt, "choices": doc.targets, "gold": doc.gold,
                        "logprobs": list(logprobs), "is_greedy": list(greedy), "pred": pred, "pred_norm": pred_norm})
    return per_example, samples


def _generation(model: nn.Module, tokenizer: Tokenizer, spec: TaskSpec, docs: list[Doc], prompts: list[str],
                batch_size: int) -> tuple[dict, list[dict]]:
    """Greedy generation (the generation engine, ``batch_size`` prompts at once, prompts cut on the left to
    fit), the text stripped and compared with every reference: exact match and token F1 at best."""
    params = SamplingParams(max_new_tokens=spec.max_new_tokens, temperature=0.0, stop=list(spec.stop))
    params.validate()
    outputs = []
    for i in range(0, len(prompts), batch_size):
        group = prompts[i:i + batch_size]
        outputs += [c.text.strip() for c in generate_texts(model, tokenizer, group, [params] * len(group),
                                                           truncate=True)]
    per_example: dict[str, list[float]] = collections.defaultdict(list)
    samples = []
    for prompt, doc, output in zip(prompts, docs, outputs):
        per_example["exact_match"].append(max(float(normalize_answer(output) == normalize_answer(r))
                                              for r in doc.targets))
        per_example["f1"].append(max(token_f1(output, r) for r in doc.targets))
        samples.append({"where": doc.where, "prompt": prompt, "references": doc.targets, "output": output})
    return per_example, samples


def aggregate(metrics: list[str], per_example: dict, samples: list[dict], docs: list[Doc]) -> dict:
    """The task's figures: means of per-example ones; perplexity from the last words' log-likelihoods;
    macro F1 over the labels; corpus BLEU / ROUGE over the generations (first reference)."""
    out = {}
    for name in metrics:
        if name == "perplexity":
            out[name] = math.exp(min(-float(np.mean(per_example["loglik"])), 700))
        elif name == "macro_f1":
            labels = [str(i) for i in range(len(docs[0].targets))]
            out[name] = classification_report([d.gold for d in docs], per_example["pred"], labels)["macro_f1"]
        elif name in ("bleu", "rouge"):
            scores = text_scores([s["output"] for s in samples], [d.targets[0] for d in docs], [name])
            out.update({k: v for k, v in scores.items() if k != "examples"})
        else:
            out[name] = float(np.mean(per_example[name]))
    return out


def mean_stderr(values: list[float]) -> float:
    """Standard error of a mean (sample standard deviation / sqrt n), as the harness reports it."""
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 of a prediction against one reference, both normalised (two empty texts: 1)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)

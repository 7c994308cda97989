"""Sequence classification: fine-tune a pretrained model (fully or with LoRA), evaluate it, predict.

    lmlab finetune classify configs/sst2_minilm.yaml    -> run folder: checkpoint, metrics.jsonl, plots,
                                                          results.json/.md, confusion.png
    lmlab eval classify RUN --data dev.tsv              -> accuracy, macro P/R/F1, confusion matrix
    lmlab predict RUN "a gripping film"                 -> label and probability

Any lmlab model or Hugging Face folder can be the base: an encoder pools [CLS] through its pooler
(or the mean of its tokens), a decoder or recurrent model reads out its last real token.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from lmlab.config import ClassifyConfig, Count, check_argument
from lmlab.runs import RunFolder
from lmlab.data.labeled import (Example, encode_texts, label_ids, length_grouped_batches, pad_batch, read_examples,
                                sequential_batches)
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.eval.metrics import classification_report
from lmlab.eval.report import write_classification_report
from lmlab.eval.tasks import TaskSpec, read_docs, task_result
from lmlab.models.encoder import MaskedLM, ReplacedTokenDetector
from lmlab.models.interface import count_parameters
from lmlab.models.lora import inject_lora
from lmlab.models.heads import ClassifierConfig, SequenceClassifier, is_encoder_decoder, model_kind
from lmlab.train.checkpoint import load_checkpoint
from lmlab.train.loop import Batch, RunResult, TaskBase, Trainer, prepare_run
from lmlab.runtime import autocast_context, seed_everything

log = logging.getLogger(__name__)


def sorted_labels(examples: list[Example]) -> list[str]:
    """The distinct labels of the training examples, numerically ordered when they are all integers."""
    names = {ex.label for ex in examples if ex.label is not None}
    if len(names) < 2:
        raise DataError(f"the training data needs at least two distinct labels, found {sorted(names)}")
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def learning_rates(model: SequenceClassifier, cfg: ClassifyConfig) -> dict[str, float]:
    """Learning rates by parameter-name prefix: ``model.head_lr`` for the new classifier, and with
    ``model.layer_lr_decay`` < 1 layer-wise decay: the top layer trains at train.lr, each layer below
    at ``decay`` times the one above, the embeddings below them all."""
    rates = {"classifier.": cfg.model.head_lr} if cfg.model.head_lr is not None else {}
    decay = cfg.model.layer_lr_decay
    if decay != 1.0:
        layers = {m.group(1, 2) for name, _ in model.backbone.named_parameters()
                  if (m := re.match(r"(layers|blocks)\.(\d+)\.", name))}  # {(stack name, index)}
        depth = max((int(i) for _, i in layers), default=-1) + 1
        for stack, i in layers:
            rates[f"backbone.{stack}.{i}."] = cfg.train.lr * decay ** (depth - 1 - int(i))
        for name, _ in model.backbone.named_parameters():
            if "emb" in name.split(".")[0]:
                rates[f"backbone.{name}"] = cfg.train.lr * decay ** depth
    return rates


def rdrop_loss(model: SequenceClassifier, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor,
               alpha: float) -> torch.Tensor:
    """R-Drop (Liang et al., 2021): the batch goes through the model twice, under two dropout masks;
    the loss is the mean cross-entropy of both passes plus ``alpha`` times the symmetric KL divergence
    between their predictions, which keeps full fine-tuning from leaning on any one dropout pattern."""
    logits, _ = model(torch.cat([x, x]), torch.cat([mask, mask]))  # (2B, n_labels): both passes in one batch
    log_p, log_q = logits.float().log_softmax(-1).chunk(2)  # (B, n_labels) each
    cross_entropy = (F.nll_loss(log_p, y) + F.nll_loss(log_q, y)) / 2
    kl = (F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
          + F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")) / 2
    return cross_entropy + alpha * kl


def build_classifier(backbone: nn.Module, labels: list[str], pooling: str | None, dropout: float) -> SequenceClassifier:
    """A SequenceClassifier on ``backbone``; default pooling: [CLS] for encoders, the mean for word vectors
    (word2vec: a bag of words), the last token for decoders. An encoder-decoder is refused.

    ``pooling`` is model.pooling, which the config checks; ``labels`` come from ``sorted_labels`` (two or more).
    """
    if isinstance(backbone, (SequenceClassifier, MaskedLM, ReplacedTokenDetector)):  # a new head on the backbone
        backbone = backbone.backbone  # of a classifier or a masked-LM / ELECTRA pretrainer (its heads dropped)
    family = backbone.config.family
    if is_encoder_decoder(backbone):
        raise ConfigError(f"the base model is {model_kind(backbone)}: a classifier reads one text, so fine-tune "
                          f"an encoder or a decoder (a language model) instead")
    if family == "word2vec":  # the mean of the text's word vectors (fastText-style); dense gradients for AdamW
        backbone.input_emb.sparse = backbone.output_emb.sparse = False
        backbone.config = dataclasses.replace(backbone.config, w2v_sparse=False)
    if pooling is None:
        pooling = {"encoder": "cls", "word2vec": "mean"}.get(family, "last")
    return SequenceClassifier(backbone, ClassifierConfig(labels=labels, pooling=pooling, dropout=dropout))


@torch.no_grad()
def predict_proba(model: SequenceClassifier, tokenizer: Tokenizer, texts: list[str], max_length: int,
                  batch_size: int = 64, precision: str = "fp32") -> torch.Tensor:
    """Class probabilities (N, n_labels) of ``texts``, in their order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = encode_texts(tokenizer, texts, max_length)
    probs = torch.empty(len(texts), len(model.head_config.labels))
    with autocast_context(precision, device):
        for batch in sequential_batches([len(x) for x in ids], batch_size):
            x, mask = pad_batch([ids[i] for i in batch], tokenizer.pad_id)
            logits, _ = model(x.to(device), mask.to(device))
            probs[batch] = logits.float().softmax(-1).cpu()
    model.train(was_training)
    return probs


def evaluate_classifier(model: SequenceClassifier, tokenizer: Tokenizer, examples: list[Example], max_length: int,
                        batch_size: int = 64, precision: str = "fp32") -> dict:
    """Accuracy, macro precision/recall/F1, per-label figures, confusion matrix and mean loss on ``examples``."""
    labels = model.head_config.labels
    gold = label_ids(examples, labels)
    probs = predict_proba(model, tokenizer, [ex.text for ex in examples], max_length, batch_size, precision)
    report = classification_report(gold, probs.argmax(-1).tolist(), labels)
    report["loss"] = float(-probs[torch.arange(len(gold)), torch.tensor(gold)].clamp(min=1e-12).log().mean())
    return report


def check_max_length(model: nn.Module, max_length: int, name: str = "data.max_length") -> None:
    """Refuse a max_length (called ``name`` in the message) longer than the model's context."""
    context = model.context_length
    if context is not None and max_length > context:
        raise ConfigError(f"{name} {max_length} exceeds the model's context of {context} tokens")


class ClassificationTask(TaskBase):
    """Sequence classification as a task of the one training loop (train/loop.py).

    The examples of step s: the epoch's examples in a seeded random order, grouped into batches of
    batch_size * grad_accum texts of similar length (little padding), each cut into grad_accum
    micro-batches; the loss is the mean cross-entropy over examples (with R-Drop: see rdrop_loss).
    """

    kind = "classify"

    def __init__(self, cfg: ClassifyConfig, base, device: torch.device):
        tc, dc = cfg.train, cfg.data
        self.cfg, self.tc, self.dc = cfg, tc, dc
        self.train_examples = read_examples(dc.train, dc.text_field, dc.label_field)
        self.val_examples = read_examples(dc.val, dc.text_field, dc.label_field) if dc.val else []
        self.labels = sorted_labels(self.train_examples)
        self.train_y = label_ids(self.train_examples, self.labels)
        if self.val_examples:
            label_ids(self.val_examples, self.labels)  # unseen labels fail now, not after training
        self.tokenizer = base.tokenizer
        seed_everything(tc.seed)  # the new head's initial weights
        self.model = build_classifier(base.model, self.labels, cfg.model.pooling, cfg.model.dropout)
        check_max_length(self.model, dc.max_length)
        if cfg.lora.r:
            inject_lora(self.model, cfg.lora, keep_trainable=("classifier",))
        self.model.to(device).train()
        self.train_ids = encode_texts(self.tokenizer, [ex.text for ex in self.train_examples], dc.max_length)
        self.lengths = [len(x) for x in self.train_ids]
        self.reports: list[dict] = []
        self._epoch: tuple[int, list[list[int]]] | None = None

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_ids) / (self.tc.batch_size * self.tc.grad_accum))

    def step_batches(self, step: int) -> list[Batch]:
        group = self._epoch_groups(step // self.steps_per_epoch())[-1 - step % self.steps_per_epoch()]
        size = self.tc.batch_size
        return [self._batch(group[i:i + size]) for i in range(0, len(group), size)]

    def _epoch_groups(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            rows = self.tc.batch_size * self.tc.grad_accum
            self._epoch = (epoch, length_grouped_batches(self.lengths, rows, self.tc.seed, epoch))
        return self._epoch[1]

    def _batch(self, indices: list[int]) -> Batch:
        x, mask = pad_batch([self.train_ids[i] for i in indices], self.tokenizer.pad_id)
        y = torch.tensor([self.train_y[i] for i in indices])
        return Batch({"x": x, "mask": mask, "y": y}, units=len(indices), tokens=int(mask.sum()))

    def example_count(self) -> int:
        return len(self.train_ids)

    def example_batch(self, indices: list[int]) -> Batch:
        return self._batch(indices)

    def example_lengths(self) -> list[int]:
        return self.lengths

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, mask, y = batch.tensors["x"], batch.tensors["mask"], batch.tensors["y"]
        if self.cfg.model.rdrop > 0:
            return rdrop_loss(model, x, mask, y, self.cfg.model.rdrop)
        return model(x, mask, y)[1]

    def evaluate(self, model: nn.Module, device: torch.device, precision: str) -> dict[str, float]:
        if not self.val_examples:
            return {}
        report = evaluate_classifier(model, self.tokenizer, self.val_examples, self.dc.max_length,
                                     self.tc.eval_batch_size or 2 * self.tc.batch_size, precision)
        self.reports.append(report)
        return {"val_loss": report["loss"], "val_accuracy": report["accuracy"], "val_macro_f1": report["macro_f1"]}

    def learning_rates(self) -> dict[str, float]:
        return learning_rates(self.model, self.cfg)

    def checkpoint_info(self) -> dict:
        return {"base": str(self.cfg.model.path), "max_length": self.dc.max_length}


def finetune_classifier(cfg: ClassifyConfig, load_base: Callable = load_checkpoint, resume: bool = False,
                        stop_after: int | None = None, force: bool = False) -> RunResult:
    """Train a classifier as ``cfg`` says; write the run folder (see the module docstring) and return what happened.

    ``load_base(path)`` opens model.path (the CLI passes one that also opens Hugging Face folders and
    pretrained names); ``resume`` continues the run in train.out_dir from its newest checkpoint;
    ``force`` replaces a previous run there (see Trainer).
    """
    if not cfg.model.path:
        raise ConfigError("model.path is empty: give an lmlab checkpoint, a Hugging Face folder or a pretrained name")
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give a TSV, CSV or JSONL file of labelled text")
    device, precision = prepare_run(cfg.train, resume, force, inputs=[cfg.model.path, cfg.data.train, cfg.data.val])
    task = ClassificationTask(cfg, load_base(cfg.model.path), device)
    trainable, total = count_parameters(task.model)
    log.info("%s training examples, labels %s; %s of %s parameters trainable (%.2f%%)", f"{len(task.train_ids):,}",
             task.labels, f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    trainer = Trainer(task, cfg, device, precision, resume=resume, stop_after=stop_after, replace=force)
    result = trainer.run()
    result.extra = {"trainable_params": trainable, "total_params": total, "labels": task.labels, "lora_r": cfg.lora.r}
    if task.reports:
        summary = {"steps": result.step, "train_seconds": result.elapsed_s, "peak_mem_mib": result.peak_mem_mib,
                   "checkpoint": result.checkpoint, "interrupted": result.interrupted, **result.extra}
        write_classification_report(task.reports[-1], trainer.run_folder.root, f"Validation: {cfg.data.val}",
                                    extra=summary)
        result.extra["val"] = task.reports[-1]
    return result


def evaluate_file(ckpt, data: str, text_field: str = "sentence", label_field: str = "label", max_length: int | None = None,
                  batch_size: int = 64) -> dict:
    """The classification report (see evaluate_classifier) of a classifier checkpoint on a labelled file;
    ``max_length`` defaults to the one it was trained with."""
    check_argument("batch_size", batch_size, Count)
    max_length = checked_max_length(ckpt, max_length)
    examples = read_examples(data, text_field, label_field)
    report = evaluate_classifier(ckpt.model, ckpt.tokenizer, examples, max_length, batch_size)
    return {"checkpoint": str(ckpt.path), "data": data, **report}


def predict_texts(ckpt, texts: list[str], file: str | None = None, text_field: str = "sentence",
                  max_length: int | None = None) -> list[dict]:
    """The most likely label and its probability for each text (and each text of ``file``), in order."""
    max_length = checked_max_length(ckpt, max_length)
    texts = list(texts) + ([ex.text for ex in read_examples(file, text_field, None)] if file else [])
    if not texts:
        raise DataError("give texts to classify as arguments or with --file")
    if any(not t.strip() for t in texts):
        raise DataError("cannot classify an empty text")
    cut = sum(len(ids) > max_length for ids in ckpt.tokenizer.encode_batch(texts, add_special_tokens=True))
    if cut:
        log.info(f"note: {cut} of {len(texts)} texts are longer than {max_length} tokens; the classifier reads their "
                 f"first {max_length} (--max-length sets it, up to the model's context)")
    probs = predict_proba(ckpt.model, ckpt.tokenizer, texts, max_length)
    labels = ckpt.model.head_config.labels
    best = probs.argmax(-1).tolist()
    return [{"label": labels[b], "probability": round(float(p[b]), 4), "text": t} for t, p, b in zip(texts, probs, best)]


def evaluate_classification_task(ckpt, spec: TaskSpec, batch_size: int = 64) -> dict:
    """A classification task spec (eval/tasks.py) run on a classifier checkpoint: each record's text (not
    the prompt: a classifier reads the text alone) classified, the prediction taken among the spec's
    labels, which must be labels of the classifier. The same report as ``evaluate_task``'s."""
    check_argument("batch_size", batch_size, Count)
    classes = ckpt.model.head_config.labels
    if spec.type != "classification":
        raise ConfigError(f"{ckpt.path} is a classifier: it runs classification tasks, not {spec.type}")
    missing = [label for label in spec.labels if label not in classes]
    if missing:
        raise ConfigError(f"task {spec.name}: label {missing[0]!r} is not one of the classifier's ({', '.join(classes)})")
    docs = read_docs(spec, limit=spec.limit)
    start = time.perf_counter()
    texts = [doc.fields["text"] for doc in docs]
    probs = predict_proba(ckpt.model, ckpt.tokenizer, texts, max_length_of(ckpt), batch_size)
    probs = probs[:, [classes.index(label) for label in spec.labels]]  # (N, spec labels)
    preds = probs.argmax(-1).tolist()
    per_example = {"acc": [float(p == doc.gold) for p, doc in zip(preds, docs)], "pred": preds}
    samples = [{"where": doc.where, "text": text, "gold": doc.gold, "pred": pred, "probabilities": row.tolist()}
               for doc, text, pred, row in zip(docs, texts, preds, probs)]
    return task_result(spec, docs, per_example, samples, time.perf_counter() - start)


def require_classifier(ckpt):
    """``ckpt`` itself if it holds a classifier, else a ConfigError saying what it is."""
    if not isinstance(ckpt.model, SequenceClassifier):
        raise ConfigError(f"{ckpt.path} is {model_kind(ckpt.model)}, not a classifier (train one with lmlab finetune "
                          f"classify)")
    return ckpt


def checked_max_length(ckpt, max_length: int | None) -> int:
    """``max_length`` tokens per text, at least 1 and within the model's context; None: as trained."""
    if check_argument("max_length", max_length, Count | None) is None:
        return max_length_of(ckpt)
    check_max_length(ckpt.model, max_length, "max_length")
    return max_length


def max_length_of(ckpt) -> int:
    """The max_length a classifier was trained with (its manifest, or its run's config.yaml for older
    checkpoints), else its context or 512."""
    if "max_length" in ckpt.manifest:
        return int(ckpt.manifest["max_length"])
    config = RunFolder.of_checkpoint(ckpt.path).config
    if config.is_file():
        try:
            return int(yaml.safe_load(config.read_text())["data"]["max_length"])
        except (KeyError, TypeError, ValueError, yaml.YAMLError):
            pass
    return min(ckpt.model.context_length or 512, 512)

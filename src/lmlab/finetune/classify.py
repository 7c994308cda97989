"""Sequence classification: fine-tune a pretrained model (fully or with LoRA), evaluate it, predict.

    lmlab finetune classify configs/sst2_minilm.yaml    -> run folder: checkpoint, metrics.jsonl, plots,
                                                          results.json/.md, confusion.png
    lmlab eval classify RUN --data dev.tsv              -> accuracy, macro P/R/F1, confusion matrix
    lmlab predict RUN "a gripping film"                 -> label and probability

Any lmlab model or Hugging Face folder can be the base: an encoder pools [CLS] through its pooler
(or the mean of its tokens), a decoder or recurrent model reads out its last real token.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import ClassifyConfig
from lmlab.runs import atomic_write_text
from lmlab.data.labeled import (Example, encode_texts, label_ids, length_grouped_batches, pad_batch, read_examples,
                                sequential_batches)
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.eval.metrics import classification_report, confusion_text, plot_confusion
from lmlab.models.interface import count_parameters
from lmlab.models.lora import inject_lora
from lmlab.models.heads import ClassifierConfig, SequenceClassifier
from lmlab.interop import load_model as load_checkpoint
from lmlab.train.checkpoint import save_checkpoint
from lmlab.finetune.loop import begin_run, check_run, run_loop
from lmlab.train.logger import plot_losses
from lmlab.runtime import autocast_context, peak_memory_mib, resolve_device


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
    """A SequenceClassifier on ``backbone``; default pooling: [CLS] for encoders, last token otherwise."""
    if isinstance(backbone, SequenceClassifier):  # start a new head on a classifier's backbone
        backbone = backbone.backbone
    if pooling is None:
        pooling = "cls" if backbone.config.family == "encoder" else "last"
    try:
        return SequenceClassifier(backbone, ClassifierConfig(labels=labels, pooling=pooling, dropout=dropout))
    except ValueError as e:
        raise ConfigError(f"model.pooling: {e}") from None


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


def check_max_length(model: nn.Module, max_length: int) -> None:
    context = model.context_length
    if context is not None and max_length > context:
        raise ConfigError(f"data.max_length {max_length} exceeds the model's context of {context} tokens")


def finetune_classifier(cfg: ClassifyConfig) -> dict:
    """Train a classifier as ``cfg`` says; write the run folder and return a summary (see module docstring)."""
    tc, dc = cfg.train, cfg.data
    out = Path(tc.out_dir)
    if not cfg.model.path:
        raise ConfigError("model.path is empty: give an lmlab checkpoint, a Hugging Face folder or a pretrained name")
    if not dc.train:
        raise ConfigError("data.train is empty: give a TSV, CSV or JSONL file of labelled text")
    if cfg.model.rdrop < 0:
        raise ConfigError(f"model.rdrop must be 0 (off) or a positive weight, e.g. 1.0; got {cfg.model.rdrop}")
    device, precision = check_run(tc)
    train_examples = read_examples(dc.train, dc.text_field, dc.label_field)
    val_examples = read_examples(dc.val, dc.text_field, dc.label_field) if dc.val else []
    labels = sorted_labels(train_examples)
    train_y = label_ids(train_examples, labels)
    if val_examples:
        label_ids(val_examples, labels)  # unseen labels fail now, not after training

    base = load_checkpoint(cfg.model.path)
    tokenizer = base.tokenizer
    torch.manual_seed(tc.seed)
    model = build_classifier(base.model, labels, cfg.model.pooling, cfg.model.dropout)
    check_max_length(model, dc.max_length)
    if cfg.lora.r:
        inject_lora(model, cfg.lora, keep_trainable=("classifier",))
    model.to(device).train()
    trainable, total = count_parameters(model)
    train_ids = encode_texts(tokenizer, [ex.text for ex in train_examples], dc.max_length)
    lengths = [len(x) for x in train_ids]
    steps_per_epoch = math.ceil(len(train_ids) / tc.batch_size)
    cfg, logger = begin_run(cfg, steps_per_epoch)
    tc = cfg.train
    print(f"{len(train_examples):,} training examples, labels {labels}; {trainable:,} of {total:,} parameters "
          f"trainable ({100 * trainable / total:.2f}%); {tc.max_steps:,} steps")
    batches: list[list[int]] = []
    reports: list[dict] = []

    def loss_of(step: int) -> tuple[torch.Tensor, int]:
        if not batches:  # a new epoch: batches of similar lengths, in a seeded random order
            batches.extend(length_grouped_batches(lengths, tc.batch_size, tc.seed, step // steps_per_epoch))
        batch = batches.pop()
        x, mask = pad_batch([train_ids[i] for i in batch], tokenizer.pad_id)
        x, mask, y = x.to(device), mask.to(device), torch.tensor([train_y[i] for i in batch], device=device)
        if cfg.model.rdrop > 0:
            return rdrop_loss(model, x, mask, y, cfg.model.rdrop), int(mask.sum())
        return model(x, mask, y)[1], int(mask.sum())

    def evaluate(step: int) -> dict:
        reports.append(evaluate_classifier(model, tokenizer, val_examples, dc.max_length,
                                           tc.eval_batch_size or 2 * tc.batch_size, precision))
        return {"val_loss": reports[-1]["loss"], "val_accuracy": reports[-1]["accuracy"],
                "val_macro_f1": reports[-1]["macro_f1"]}

    result = run_loop(model, tc, logger, device, precision, loss_of, evaluate if val_examples else None,
                      examples_per_step=tc.batch_size, lr_by_prefix=learning_rates(model, cfg))
    logger.close()
    step, train_seconds, interrupted = result.steps, result.seconds, result.interrupted
    report = reports[-1] if reports else None
    ckpt = save_checkpoint(out / "checkpoints" / f"step-{step:06d}", model.eval(), tokenizer,
                           info={"step": step, "kind": "classify", "base": str(cfg.model.path)})
    summary = {"steps": step, "train_seconds": train_seconds, "trainable_params": trainable, "total_params": total,
               "peak_mem_mib": peak_memory_mib(device), "checkpoint": str(ckpt), "interrupted": interrupted,
               "labels": labels, "lora_r": cfg.lora.r}
    if report is not None:
        summary["val"] = report
        write_classification_report(report, out, f"Validation: {dc.val}", extra=summary)
    plot_losses(out / "metrics.jsonl", out / "plots")
    return summary


def write_classification_report(report: dict, out_dir: str | Path, title: str, extra: dict | None = None) -> None:
    """results.json, results.md (metrics, per-label table, confusion matrix) and confusion.png in ``out_dir``."""
    out_dir = Path(out_dir)
    payload = {**{k: v for k, v in (extra or {}).items() if k != "val"}, **report}
    atomic_write_text(out_dir / "results.json", json.dumps(payload, indent=2) + "\n")
    rows = [f"| {k} | {report[k]:.4f} |" for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "loss")
            if k in report]
    per_label = [f"| {name} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |"
                 for name, v in report["per_label"].items()]
    md = (f"# {title}\n\n{report['examples']} examples\n\n| metric | value |\n|---|---|\n" + "\n".join(rows)
          + "\n\n| label | precision | recall | F1 | support |\n|---|---|---|---|---|\n" + "\n".join(per_label)
          + f"\n\nConfusion matrix (rows: true label, columns: predicted):\n\n```\n{confusion_text(report)}\n```\n\n"
          + "![confusion matrix](confusion.png)\n")
    atomic_write_text(out_dir / "results.md", md)
    plot_confusion(report, out_dir / "confusion.png", title)


def load_classifier(path: str | Path, device: str = "auto"):
    """A trained classifier checkpoint (or run folder, or HF BertForSequenceClassification folder)."""
    ckpt = load_checkpoint(path, device=resolve_device(device))
    if not isinstance(ckpt.model, SequenceClassifier):
        raise ConfigError(f"{path} is a language model, not a classifier (train one with lmlab finetune classify)")
    return ckpt


def max_length_of(ckpt) -> int:
    """The max_length a classifier was trained with (from its run's config.yaml), else its context or 512."""
    config = Path(ckpt.path).parent.parent / "config.yaml"
    if config.is_file():
        import yaml

        try:
            return int(yaml.safe_load(config.read_text())["data"]["max_length"])
        except (KeyError, TypeError, ValueError, yaml.YAMLError):
            pass
    return min(ckpt.model.context_length or 512, 512)

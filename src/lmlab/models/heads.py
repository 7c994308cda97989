"""Task heads, written once for every family: a head reads ``backbone.features(idx, attention_mask)``.

``SequenceClassifier`` puts a linear classifier on a pooled summary of the sequence:

    cls   the first token ([CLS]); through the encoder's pooler (dense + tanh) when it has one,
          which is exactly Hugging Face's ``BertForSequenceClassification``
    mean  the mean of the real (non-padding) tokens (sentence-transformers' pooling)
    last  the last real token: what a causal decoder or a recurrent model has read everything by

Sequences are padded on the right; ``attention_mask`` (B, T) is 1 for real tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import SEQ2SEQ
from lmlab.errors import ConfigError
from lmlab.models.encoder import MaskedLM, ReplacedTokenDetector

POOLINGS = ("cls", "mean", "last")


@dataclass
class ClassifierConfig:
    """What a classification head adds to its backbone: labels (in id order) and pooling."""

    labels: list[str] = field(default_factory=list)
    pooling: str = "cls"
    dropout: float = 0.1


class SequenceClassifier(nn.Module):
    """backbone -> pooled features -> dropout -> linear over the labels."""

    def __init__(self, backbone: nn.Module, head: ClassifierConfig):
        super().__init__()
        if head.pooling not in POOLINGS:  # model.pooling is checked by the config; a checkpoint's head is not
            raise ValueError(f"pooling {head.pooling!r} is not one of {', '.join(POOLINGS)}")
        if len(head.labels) < 2:
            raise ValueError("a classifier needs at least two labels")
        self.backbone = backbone
        self.config = backbone.config  # the backbone's ModelConfig (what checkpoints record)
        self.head_config = head
        self.context_length = backbone.context_length
        self.drop = nn.Dropout(head.dropout)
        self.classifier = nn.Linear(backbone.hidden_size, len(head.labels))
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, d) summary of hidden (B, T, d) under the head's pooling."""
        if self.head_config.pooling == "cls":
            pool = getattr(self.backbone, "pool", None)
            return pool(hidden) if pool is not None else hidden[:, 0]
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        if self.head_config.pooling == "mean":
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        last = attention_mask.sum(1).long().clamp(min=1) - 1  # (B,) index of each row's last real token
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]

    def flops_per_token(self) -> float | None:
        """Approximate training FLOPs per token, for the MFU estimate: the backbone's, less its output
        layer (``features`` stops before it: 6 FLOPs per weight of lm_head or head). The classifier runs
        once per sequence, not per token, and is left out; so is the backbone's pooler. None for a
        backbone that counts none (word vectors)."""
        if not hasattr(self.backbone, "flops_per_token"):
            return None
        output = getattr(self.backbone, "lm_head", None) or getattr(self.backbone, "head", None)
        unused = output.weight.numel() if output is not None else 0
        return self.backbone.flops_per_token() - 6 * unused

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, n_labels), and the mean cross-entropy when label ids (B,) are given."""
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        hidden = self.backbone.features(idx, attention_mask)  # (B, T, d)
        logits = self.classifier(self.drop(self.pooled(hidden, attention_mask)))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return logits, loss


def head_from_dict(data: dict, cls: type = ClassifierConfig):
    """A head config of dataclass ``cls`` (a ClassifierConfig unless told) from a checkpoint manifest's
    ``head`` entry; keys ``cls`` does not know are ignored."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


def require_language_model(ckpt, masked: bool = False):
    """``ckpt`` itself if its model predicts tokens (what generate, chat, serve and eval ppl need), else a
    ConfigError saying what it is and which commands take it. With ``masked``, a masked language model
    (an encoder with its MLM head) counts too: eval ppl scores one, nothing generates with one."""
    kind = kind_of(ckpt.model)
    if kind == "language_model" or (masked and kind == "masked_lm"):
        return ckpt
    refusals = {
        "masked_lm": "is a masked language model (an encoder): it fills in [MASK] tokens but does not generate; "
                     "evaluate it with lmlab eval ppl, fine-tune it with lmlab finetune classify",
        "encoder_decoder": f"is {model_kind(ckpt.model)}: it writes a target for a source; use lmlab generate "
                           f"--source, lmlab eval seq2seq or lmlab serve",
        "classifier": "is a sequence classifier, not a language model; use lmlab predict or lmlab eval classify",
        "encoder": "is an encoder without a language-model head; fine-tune a classifier on it with lmlab finetune "
                   "classify",
        "word2vec": "holds word vectors (word2vec), not a language model; look at them with lmlab inspect embeddings",
    }
    raise ConfigError(f"{ckpt.path} {refusals[kind]}")


def kind_of(model: nn.Module) -> str:
    """What a checkpoint's model is, the one place that tells: "classifier", "masked_lm", "encoder_decoder",
    "encoder" (no head), "word2vec" or "language_model" (a decoder: gpt, llama, recurrent)."""
    family = getattr(getattr(model, "config", None), "family", None)
    if isinstance(model, SequenceClassifier):
        return "classifier"
    if isinstance(model, (MaskedLM, ReplacedTokenDetector)):
        return "masked_lm"
    if family in SEQ2SEQ:
        return "encoder_decoder"
    if family in ("encoder", "word2vec"):
        return family
    return "language_model"


def model_kind(model: nn.Module) -> str:
    """``kind_of(model)`` in words, for messages that refuse it: "a sequence classifier", "word vectors
    (word2vec)", "an encoder-decoder (seq2seq)", ..."""
    kind = kind_of(model)
    if kind == "encoder_decoder":
        return f"an encoder-decoder ({model.config.family})"
    return {"classifier": "a sequence classifier", "masked_lm": "a masked language model (an encoder)",
            "encoder": "an encoder without a classifier head", "word2vec": "word vectors (word2vec)",
            "language_model": "a language model"}[kind]


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is an encoder-decoder (model.family seq2seq or rnn_seq2seq: a source in, a target out)."""
    return getattr(getattr(model, "config", None), "family", None) in SEQ2SEQ


def require_generator(ckpt):
    """``ckpt`` itself if its model generates text, a decoder (see require_language_model) or an
    encoder-decoder: what generate and serve take."""
    return ckpt if is_encoder_decoder(ckpt.model) else require_language_model(ckpt)


def require_encoder_decoder(ckpt):
    """``ckpt`` itself if its model is an encoder-decoder (what eval seq2seq scores), else a ConfigError."""
    if not is_encoder_decoder(ckpt.model):
        family = getattr(ckpt.model.config, "family", "?")
        raise ConfigError(f"{ckpt.path} is not an encoder-decoder (model.family {family}); lmlab eval seq2seq "
                          f"scores seq2seq and rnn_seq2seq checkpoints (a language model: lmlab eval ppl)")
    return ckpt

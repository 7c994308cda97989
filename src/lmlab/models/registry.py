"""Model families by name: one line per family, so the rest of lmlab never imports a model class."""

from __future__ import annotations

import torch.nn as nn

from lmlab.config import ModelConfig
from lmlab.errors import ConfigError, first_line
from lmlab.models.encoder import Encoder, MaskedLM, ReplacedTokenConfig, ReplacedTokenDetector
from lmlab.models.gpt import GPT
from lmlab.models.heads import SequenceClassifier, head_from_dict
from lmlab.models.rnn import RecurrentLM
from lmlab.models.seq2seq import RecurrentSeq2Seq, Seq2SeqTransformer
from lmlab.models.word2vec import Word2Vec

MODELS: dict[str, type[nn.Module]] = {
    "gpt": GPT,
    "rnn": RecurrentLM,
    "lstm": RecurrentLM,
    "gru": RecurrentLM,
    "encoder": Encoder,
    "seq2seq": Seq2SeqTransformer,
    "rnn_seq2seq": RecurrentSeq2Seq,
    "word2vec": Word2Vec,
}


def build_model(cfg: ModelConfig, head: dict | None = None) -> nn.Module:
    """Instantiate the model family named by ``cfg.family``.

    With ``head`` (a checkpoint's ``head`` entry), the model is that family's backbone under a
    ``SequenceClassifier`` (labels, pooling) or, for kind mlm, an encoder under a ``MaskedLM`` head (kind
    electra: an encoder with its ELECTRA generator, ``ReplacedTokenDetector``).
    ``cfg`` is a checked config (``from_dict`` or ``load_config``: a known family, shapes that fit); what
    the constructors still refuse, such as a missing vocab_size or a head's unknown pooling, becomes a
    one-line ConfigError.
    """
    try:
        model = MODELS[cfg.family](cfg)
        if not head:
            return model
        if head.get("kind") == "mlm":
            return MaskedLM(model)
        if head.get("kind") == "electra":
            return ReplacedTokenDetector(model, head_from_dict(head, ReplacedTokenConfig))
        return SequenceClassifier(model, head_from_dict(head))
    except (ValueError, AssertionError, TypeError) as e:
        raise ConfigError(f"invalid model config: {first_line(e)}") from None

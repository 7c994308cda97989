"""Every model family satisfies the written interface of models/interface.py, which the trainer, the
generation engine, evaluation and the task heads count on."""

import pytest
import torch

from lmlab.config import ModelConfig
from lmlab.models.heads import ClassifierConfig, SequenceClassifier
from lmlab.models.interface import Backbone, LanguageModel, Model, Seq2SeqModel
from lmlab.models.registry import build_model

VOCAB = 40
SMALL = dict(n_layer=1, d_model=16, block_size=12, vocab_size=VOCAB)
FAMILIES = {
    "gpt-gpt2": ModelConfig(preset="gpt2", n_head=2, **SMALL),
    "gpt-llama": ModelConfig(preset="llama", n_head=2, n_kv_head=1, **SMALL),
    "rnn": ModelConfig(family="rnn", **SMALL),
    "lstm": ModelConfig(family="lstm", d_ff=24, **SMALL),  # hidden size (24) other than d_model
    "gru": ModelConfig(family="gru", **SMALL),
    "encoder": ModelConfig(family="encoder", n_head=2, **SMALL),
}
DECODERS = {"gpt-gpt2", "gpt-llama", "rnn", "lstm", "gru"}
ENCODER_DECODERS = {
    "seq2seq-gpt2": ModelConfig(family="seq2seq", preset="gpt2", n_head=2, **SMALL),
    "seq2seq-llama": ModelConfig(family="seq2seq", preset="llama", n_head=2, n_kv_head=1, **SMALL),
    "rnn_seq2seq-luong": ModelConfig(family="rnn_seq2seq", cell="lstm", attention="luong", **SMALL),
    "rnn_seq2seq-bahdanau": ModelConfig(family="rnn_seq2seq", cell="gru", attention="bahdanau", d_ff=24, **SMALL),
}


def tokens(batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_is_a_backbone_and_every_decoder_a_language_model(name):
    model = build_model(FAMILIES[name]).eval()
    assert isinstance(model, Model) and isinstance(model, Backbone)
    assert isinstance(model, LanguageModel) == (name in DECODERS)
    assert isinstance(model.config, ModelConfig) and model.config.family == FAMILIES[name].family
    if name.startswith(("gpt", "encoder")):
        assert type(model.context_length) is int and model.context_length == model.config.block_size
    else:
        assert model.context_length is None  # a recurrent state has no context limit
    x = tokens()
    with torch.no_grad():
        hidden = model.features(x, torch.ones_like(x))
    assert hidden.shape == (2, 5, model.hidden_size)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_a_decoder_decodes_incrementally_through_its_cache(name):
    model = build_model(FAMILIES[name]).eval()
    x = tokens()
    with torch.no_grad():
        full, _ = model(x)
        cache = model.make_cache(2)
        steps = [model(x[:, i:i + 1], cache=cache)[0] for i in range(x.size(1))]
        cache.select(torch.tensor([1]))  # what the Cache protocol names
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert full.shape == (2, 5, VOCAB)
    model.resize_vocab(VOCAB + 3)
    assert model.config.vocab_size == VOCAB + 3 and model(x)[0].shape == (2, 5, VOCAB + 3)


@pytest.mark.parametrize("name", ["encoder", "gpt-llama", "lstm"])
def test_a_classifier_is_a_model_over_a_backbone(name):
    """A task head has the backbone's config and context (what checkpoints and evaluation read); it is
    not itself a backbone: heads read ``backbone.features``."""
    backbone = build_model(FAMILIES[name])
    classifier = SequenceClassifier(backbone, ClassifierConfig(labels=["a", "b", "c"], pooling="last"))
    assert isinstance(classifier, Model) and isinstance(classifier.backbone, Backbone)
    assert classifier.config is backbone.config and classifier.context_length == backbone.context_length
    x = tokens()
    logits, loss = classifier(x, torch.ones_like(x), torch.tensor([0, 2]))
    assert logits.shape == (2, 3) and loss.ndim == 0


@pytest.mark.parametrize("name", sorted(ENCODER_DECODERS))
def test_an_encoder_decoder_is_a_seq2seq_model_that_decodes_through_its_cache(name):
    """Encoder-decoders have their own interface (a source and a target), not a language model's."""
    model = build_model(ENCODER_DECODERS[name]).eval()
    assert isinstance(model, Model) and isinstance(model, Seq2SeqModel)
    assert not isinstance(model, LanguageModel) and not isinstance(model, Backbone)
    assert model.config.family == ENCODER_DECODERS[name].family and model.context_length == model.config.block_size
    src, tgt = tokens(2, 6), tokens(2, 4)
    src_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        full, loss = model(src, tgt, src_mask, targets=tgt)
        cache = model.make_cache(model.encode(src, src_mask), src_mask, max_len=4)
        steps = [model.decode(tgt[:, i:i + 1], cache) for i in range(4)]
        cache.select(torch.tensor([1]))
    assert full.shape == (2, 4, VOCAB) and loss.ndim == 0
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert model.flops_per_token() > 0

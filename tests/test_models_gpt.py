import pytest
import torch

from lmlab.config import ModelConfig, from_dict
from lmlab.errors import ConfigError
from lmlab.models.registry import build_model

PRESETS = [("gpt2", None), ("llama", 2), ("llama", 1)]


def make(preset, n_kv_head, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(preset=preset, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=32, block_size=24,
                      vocab_size=50, **kw)
    return build_model(cfg).eval()


@pytest.mark.parametrize("preset,n_kv_head", PRESETS)
def test_shapes_and_loss(preset, n_kv_head):
    model = make(preset, n_kv_head)
    x = torch.randint(0, 50, (3, 24))
    logits, loss = model(x, x)
    assert logits.shape == (3, 24, 50)
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5  # near uniform at init


@pytest.mark.parametrize("preset,n_kv_head", PRESETS)
def test_causal_model_cannot_see_the_future(preset, n_kv_head):
    model = make(preset, n_kv_head)
    x = torch.randint(0, 50, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 50, (2, 8))  # change only the future
    a, _ = model(x)
    b, _ = model(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("preset,n_kv_head", PRESETS)
def test_kv_cache_equals_full_recompute(preset, n_kv_head):
    model = make(preset, n_kv_head)
    x = torch.randint(0, 50, (2, 20))
    full, _ = model(x)
    cache = model.make_cache(2)
    parts = [model(x[:, a:b], cache=cache)[0] for a, b in [(0, 7), (7, 8), (8, 13), (13, 20)]]
    assert cache.pos == 20
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_presets_resolve():
    gpt2, llama = make("gpt2", None).config, make("llama", 2).config
    assert (gpt2.pos_emb, gpt2.norm, gpt2.mlp, gpt2.bias, gpt2.tie_embeddings) == ("learned", "layernorm", "gelu", True, True)
    assert (llama.pos_emb, llama.norm, llama.mlp, llama.bias, llama.tie_embeddings) == ("rope", "rmsnorm", "swiglu", False, False)


def test_gpt2_output_layer_is_the_tied_embedding():
    model = make("gpt2", None)
    assert model.lm_head.weight is model.tok_emb.weight


def test_llama_has_no_biases_and_fewer_kv_heads():
    model = make("llama", 1)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert model.blocks[0].attn.qkv.out_features == (4 + 2 * 1) * 8


def test_context_is_enforced():
    model = make("gpt2", None)
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.parametrize("fields, message", [
    ({"n_head": 3, "d_model": 32}, "model.d_model 32 is not divisible by model.n_head 3"),
    ({"preset": "bert"}, "model.preset 'bert' is not a gpt preset"),
    ({"family": "mamba"}, "model.family 'mamba' is not one of gpt, rnn, lstm, gru, encoder"),
    ({"norm": "batchnorm"}, "model.norm 'batchnorm' is not one of layernorm, rmsnorm, null"),
    ({"mlp": "relu"}, "model.mlp 'relu' is not one of gelu, gelu_exact, swiglu, null"),
    ({"preset": "llama", "rope_scaling": "ntk"}, "model.rope_scaling 'ntk' is not one of linear, llama3, null"),
    ({"family": "encoder", "norm": "rmsnorm"}, "model.norm 'rmsnorm' does not fit family encoder"),
    ({"family": "encoder", "pos_emb": "rope"}, "model.pos_emb rope needs model.pre_norm: true for family encoder"),
])
def test_bad_architecture_is_refused_by_the_config(fields, message):
    """The models assume a checked config: every config and checkpoint manifest goes through from_dict."""
    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, {"vocab_size": 10, **fields}, "model.")
    assert str(e.value).startswith(message)


def test_what_the_config_cannot_know_is_still_a_config_error():
    with pytest.raises(ConfigError, match="vocab_size must be set"):
        build_model(ModelConfig())  # None (taken from the tokenizer) is a valid config value
    with pytest.raises(ConfigError, match="pooling"):
        build_model(ModelConfig(vocab_size=10), head={"labels": ["a", "b"], "pooling": "max"})  # a checkpoint's head

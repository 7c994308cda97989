"""LoRA: injection, freezing, merge/unmerge, PEFT-format adapters that peft itself loads after export."""

import dataclasses
import json

import pytest
import torch
import torch.nn as nn

from lmlab.config import LoraConfig, ModelConfig
from lmlab.data.tokenizer import train_tokenizer
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models.interface import count_parameters
from lmlab.models.lora import (LoraLinear, inject_lora, load_adapter, lora_modules, merge_lora,
                                 remove_lora, save_adapter, unmerge_lora)
from lmlab.models.heads import ClassifierConfig, SequenceClassifier
from lmlab.models.registry import build_model

VOCAB = 300


def tiny(preset="llama", **kw):
    torch.manual_seed(0)
    cfg = dict(preset=preset, n_layer=2, n_head=4, n_kv_head=2 if preset == "llama" else None, d_model=32,
               block_size=32, vocab_size=VOCAB)
    cfg.update(kw)
    return build_model(ModelConfig(**cfg)).eval()


def randomise_adapters(model):
    """Give every B a non-zero value (a freshly injected adapter is a no-op by construction)."""
    torch.manual_seed(1)
    for m in lora_modules(model).values():
        nn.init.normal_(m.lora_B.weight, std=0.05)


def x(batch=2, length=12):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(3))


def test_injection_freezes_the_base_and_starts_as_a_no_op():
    model = tiny()
    before = model(x())[0]
    names = inject_lora(model, LoraConfig(r=4, alpha=8, targets="attn.qkv,mlp.down"))
    assert names == ["blocks.0.attn.qkv", "blocks.0.mlp.down", "blocks.1.attn.qkv", "blocks.1.mlp.down"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert torch.equal(model(x())[0], before)
    m = lora_modules(model)["blocks.0.attn.qkv"]
    assert m.scaling == 2.0 and torch.all(m.lora_B.weight == 0) and m.lora_A.weight.abs().sum() > 0
    n_trainable, total = count_parameters(model)
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) < 0.2 * total


def test_rslora_scaling_and_bad_targets():
    model = tiny()
    inject_lora(model, LoraConfig(r=16, alpha=8, rslora=True, targets="attn.proj"))
    assert lora_modules(model)["blocks.0.attn.proj"].scaling == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="match no linear layer"):
        inject_lora(tiny(), LoraConfig(r=4, targets="nonexistent"))
    with pytest.raises(ConfigError, match="positive rank"):
        inject_lora(tiny(), LoraConfig(r=0))


def test_merge_equals_unmerged_and_unmerge_restores():
    model = tiny()
    base_weight = model.blocks[0].attn.qkv.weight.detach().clone()
    inject_lora(model, LoraConfig(r=4, alpha=8))
    randomise_adapters(model)
    unmerged = model(x())[0]
    merge_lora(model)
    assert torch.allclose(model(x())[0], unmerged, atol=1e-5)
    unmerge_lora(model)
    assert torch.allclose(model.blocks[0].attn.qkv.base.weight, base_weight, atol=1e-6)
    assert torch.allclose(model(x())[0], unmerged, atol=1e-5)
    plain = remove_lora(model)
    assert not lora_modules(plain) and isinstance(plain.blocks[0].attn.qkv, nn.Linear)
    assert torch.allclose(plain(x())[0], unmerged, atol=1e-5)


def test_gradients_reach_only_the_adapters():
    model = tiny().train()
    inject_lora(model, LoraConfig(r=4, alpha=8))
    ids = x()
    model(ids, ids)[1].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name


def test_adapter_round_trip_in_peft_format(tmp_path):
    model = tiny()
    inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    randomise_adapters(model)
    expected = model(x())[0]
    folder = save_adapter(model, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    peft = pytest.importorskip("peft")
    assert set(config) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}  # peft warns about unknown keys
    fresh = tiny()
    load_adapter(fresh, folder)
    assert torch.allclose(fresh.eval()(x())[0], expected, atol=1e-6)
    encoder = build_model(ModelConfig(family="encoder", n_layer=2, n_head=4, d_model=32, vocab_size=VOCAB))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_adapter(encoder, folder)  # another architecture: its layers have other names
    assert not lora_modules(encoder)  # and a refused adapter leaves the model untouched
    with pytest.raises(CheckpointError, match="shape"):
        load_adapter(tiny(d_model=64), folder)  # the same names, another size


def test_checkpoint_of_a_lora_model_keeps_the_adapter(tmp_path):
    from lmlab.train.checkpoint import load_checkpoint, save_checkpoint

    tokenizer = train_tokenizer("byte", [])
    model = tiny(vocab_size=tokenizer.vocab_size)
    inject_lora(model, LoraConfig(r=2, alpha=4))
    randomise_adapters(model)
    ids = torch.randint(0, tokenizer.vocab_size, (1, 8))
    expected = model(ids)[0]
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    loaded = load_checkpoint(ckpt).model
    assert isinstance(loaded.blocks[0].attn.qkv, LoraLinear)
    assert torch.allclose(loaded(ids)[0], expected, atol=1e-6)


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_exported_adapter_loads_in_peft_with_the_same_logits(preset, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lmlab.interop.hf import export_hf

    tokenizer = train_tokenizer("byte", [])
    model = tiny(preset, vocab_size=tokenizer.vocab_size)
    inject_lora(model, LoraConfig(r=4, alpha=8, targets="attn.qkv,attn.proj,mlp.up,mlp.down"))
    randomise_adapters(model)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 10))
    expected = model(ids)[0]
    folder = export_hf(model, tokenizer, tmp_path / "hf")
    cls = transformers.LlamaForCausalLM if preset == "llama" else transformers.GPT2LMHeadModel
    base = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, expected, atol=1e-3)  # the base alone differs
        peft_model = peft.PeftModel.from_pretrained(base, folder / "adapter").eval()
        assert torch.allclose(peft_model(ids).logits, expected, atol=1e-4)
    merged = cls.from_pretrained(export_hf(model, tokenizer, tmp_path / "merged", merge=True)).eval()
    assert not (tmp_path / "merged" / "adapter").exists()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected, atol=1e-4)
    assert isinstance(model.blocks[0].attn.qkv, LoraLinear) and not model.blocks[0].attn.qkv.merged


def test_bert_classifier_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lmlab.interop.hf import export_hf

    tokenizer = train_tokenizer("byte", [])
    torch.manual_seed(0)
    encoder = build_model(ModelConfig(family="encoder", n_layer=2, n_head=4, d_model=32, block_size=32,
                                      vocab_size=tokenizer.vocab_size))
    model = SequenceClassifier(encoder, ClassifierConfig(labels=["neg", "pos"], pooling="cls")).eval()
    inject_lora(model, LoraConfig(r=4, alpha=8, targets="attn.qkv,attn.proj"), keep_trainable=("classifier",))
    randomise_adapters(model)
    nn.init.normal_(model.classifier.weight, std=0.5)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    expected = model(ids, mask)[0]
    folder = export_hf(model, tokenizer, tmp_path / "hf")
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    base = transformers.BertForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        peft_model = peft.PeftModel.from_pretrained(base, folder / "adapter").eval()
        assert torch.allclose(peft_model(ids, attention_mask=mask).logits, expected, atol=1e-4)

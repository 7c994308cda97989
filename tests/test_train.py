import json
import shutil

import pytest
import torch

from lmlab.errors import CheckpointError, ConfigError, DataError
from lmlab.runs import list_checkpoints
from lmlab.train.checkpoint import load_checkpoint
from lmlab.train.logger import read_metrics
from lmlab.config import ModelConfig, TrainConfig, from_dict
from lmlab.train.optim import lr_factor
from lmlab.train.lm import pretrain

from conftest import tiny_run_config
from loop_tasks import assert_same_run



@pytest.mark.parametrize("preset,ema_decay,optimizer", [("gpt2", 0.0, "adamw"), ("llama", 0.0, "adamw"),
                                                        ("gpt2", 0.9, "adamw"), ("llama", 0.0, "muon")])
def test_resumed_training_equals_uninterrupted(prepared, tmp_path, preset, ema_decay, optimizer):
    """Stopping at step 7 and resuming gives the same losses and weights (the weight average too; Muon's
    momentum and AdamW's moments both come back)."""
    runs = {}
    for name in ("full", "part"):
        runs[name] = tiny_run_config(prepared, tmp_path / name, preset, max_steps=16, checkpoint_interval=100,
                                     optimizer=optimizer)
        runs[name].model.dropout = 0.1  # dropout consumes the RNG: resume must restore it
        runs[name].train.ema_decay = ema_decay
    pretrain(runs["full"])
    first = pretrain(runs["part"], stop_after=7)
    assert first.step == 7
    second = pretrain(runs["part"], resume=True)
    assert second.step == 16

    assert_same_run(tmp_path / "full", tmp_path / "part", 16)  # bit-identical on CPU fp32


def test_weight_average_is_what_the_checkpoint_holds(prepared, tmp_path):
    """With train.ema_decay the saved weights are the average: close to, but not, the raw weights."""
    from lmlab.train.checkpoint import load_train_state

    cfg = tiny_run_config(prepared, tmp_path / "ema", max_steps=12, checkpoint_interval=100)
    cfg.train.ema_decay = 0.8
    pretrain(cfg)
    ckpt = list_checkpoints(tmp_path / "ema")[-1]
    saved = load_checkpoint(ckpt).model
    raw = load_train_state(ckpt)["ema"]["raw"]
    trainable = [p for p in saved.parameters() if p.requires_grad]
    assert len(raw) == len(trainable)
    assert not all(torch.equal(p, r) for p, r in zip(trainable, raw))
    with pytest.raises(ConfigError, match=r"^train.ema_decay must be in \[0, 1\), got 1.0"):
        from_dict(TrainConfig, {"ema_decay": 1.0}, "train.")  # refused when the config loads


def test_training_learns_and_writes_its_files(trained_run):
    records = read_metrics(trained_run / "metrics.jsonl")
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < losses[0] - 0.5
    assert any("val_loss" in r for r in records)
    assert (trained_run / "config.yaml").is_file()
    assert (trained_run / "plots" / "loss.png").stat().st_size > 1000
    ckpt = list_checkpoints(trained_run)[-1]
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "tokenizer.json", "state.pt", "manifest.json"}
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["format"] == "lmlab-checkpoint" and manifest["step"] == 40
    assert set(manifest["files"]) == {"model.safetensors", "tokenizer.json", "state.pt"}


def test_checkpoint_round_trip_keeps_logits(trained_run):
    ckpt = load_checkpoint(trained_run)
    again = load_checkpoint(ckpt.path)
    x = torch.randint(0, ckpt.tokenizer.vocab_size, (2, 16))
    assert torch.equal(ckpt.model(x)[0], again.model(x)[0])
    assert ckpt.model.lm_head.weight is ckpt.model.tok_emb.weight  # tying survives safetensors


def test_corrupt_checkpoint_is_refused(trained_run, tmp_path):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(list_checkpoints(trained_run)[-1], copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-10, 2)
        f.write(b"0123456789")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(copy)


def test_foreign_checkpoints_are_refused(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="Hugging Face"):
        load_checkpoint(hf)
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not written by lmlab"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing")


def test_existing_run_needs_resume_and_context_must_fit(prepared, trained_run, tmp_path):
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(tiny_run_config(prepared, trained_run))
    with pytest.raises(ConfigError, match="no checkpoints"):
        pretrain(tiny_run_config(prepared, tmp_path / "new"), resume=True)
    copy = tmp_path / "finished"
    shutil.copytree(trained_run, copy)  # trained for 40 steps
    finished = pretrain(tiny_run_config(prepared, copy, max_steps=40), resume=True)  # nothing left to do: fine
    assert finished.step == 40 and len(list((copy / "checkpoints").iterdir())) == 1
    with pytest.raises(ConfigError, match="already reached step 40, past this run's last step 39"):
        pretrain(tiny_run_config(prepared, copy, max_steps=39), resume=True)
    cfg = tiny_run_config(prepared, tmp_path / "long")
    cfg.model.block_size = 100_000
    with pytest.raises(DataError, match="context length"):
        pretrain(cfg)


def test_resume_refuses_data_of_another_tokenizer(trained_run, tmp_path):
    """Same vocabulary size, other tokens: resuming on it would train on a shuffled alphabet without a word."""
    from lmlab.data.prepare import prepare
    from lmlab.data.tokenizer import train_tokenizer

    from conftest import tiny_corpus

    import shutil

    docs = [doc.replace("q", "Q") for doc in tiny_corpus()]  # one character swapped: as many tokens, not the same
    (tmp_path / "text").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "text" / f"{i}.txt").write_text(doc)
    other = tmp_path / "other"
    prepare([str(tmp_path / "text")], train_tokenizer("char", docs), other, val_fraction=0.2, split="hash")

    shutil.copytree(trained_run, tmp_path / "run")
    cfg = tiny_run_config(other, tmp_path / "run", max_steps=60)
    with pytest.raises(ConfigError, match="tokenizer differs"):
        pretrain(cfg, resume=True)


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr=0.1)
    assert lr_factor(0, cfg) < lr_factor(5, cfg) < lr_factor(9, cfg) <= 1.0
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_grad_accumulation_matches_a_bigger_batch(prepared, tmp_path):
    from lmlab.data.loader import TokenShards

    # two micro-batches of 4 give the same gradient as their concatenation
    shards = TokenShards(prepared, "train")
    from lmlab.data.loader import train_batch
    from lmlab.models.registry import build_model

    cfg = tiny_run_config(prepared, tmp_path)
    cfg.model.vocab_size = 400
    torch.manual_seed(0)
    model = build_model(cfg.model)
    xs = [train_batch(shards, 4, 32, 0, 0, micro) for micro in range(2)]
    for x, y in xs:
        (model(x, y)[1] / 2).backward()
    accumulated = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(torch.cat([x for x, _ in xs]), torch.cat([y for _, y in xs]))[1].backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(accumulated, model.parameters()))


def test_step_schedule_and_sgd(prepared, tmp_path):
    from lmlab.train.optim import build_optimizer

    cfg = TrainConfig(lr=1.0, warmup_steps=0, lr_schedule="step", lr_decay=0.5, lr_decay_start=10, lr_decay_every=5)
    assert [lr_factor(s, cfg) for s in (0, 9, 10, 14, 15, 20)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]
    opt = build_optimizer(torch.nn.Linear(2, 2), TrainConfig(optimizer="sgd", momentum=0.9), "cpu")
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    with pytest.raises(ConfigError, match="^train.optimizer 'lion' is not one of adamw, sgd"):
        from_dict(TrainConfig, {"optimizer": "lion"}, "train.")  # refused when the config loads


def test_optimizer_groups_learning_rates_by_name_prefix():
    """A new head can learn faster than a pretrained body; decay still skips biases and norm gains."""
    from lmlab.train.optim import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    tc = TrainConfig(lr=1e-4, weight_decay=0.1)
    opt = build_optimizer(model, tc, "cpu", lr_by_prefix={"2.": 1e-3})
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model[2].weight)] == lr_of[id(model[2].bias)] == 1e-3
    assert lr_of[id(model[0].weight)] == lr_of[id(model[1].weight)] == 1e-4
    assert decay_of[id(model[0].weight)] == decay_of[id(model[2].weight)] == 0.1
    assert decay_of[id(model[0].bias)] == decay_of[id(model[1].weight)] == 0.0


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    """Muon gets the Linear weights inside the stack of blocks; embeddings (the tied head), biases and norm
    gains go to AdamW; the schedule scales both; layer learning rates by prefix apply to both; LoRA adapters
    alone (all inside the blocks) get Muon alone."""
    from lmlab.config import LoraConfig
    from lmlab.models.lora import inject_lora
    from lmlab.models.registry import build_model
    from lmlab.train.optim import build_optimizer, build_scheduler

    model = build_model(ModelConfig(preset="gpt2", vocab_size=50, n_layer=2, n_head=2, d_model=16, block_size=8))
    tc = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=2e-3, warmup_steps=0, max_steps=10, min_lr=0.0)
    opt = build_optimizer(model, tc, "cpu", lr_by_prefix={"blocks.1.": 5e-4})
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[i] for i in muon) == sorted(f"blocks.{b}.{m}.weight" for b in (0, 1)
                                                   for m in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down"))
    rest = {id(p) for g in opt.rest.param_groups for p in g["params"]}
    assert rest.isdisjoint(muon) and rest | muon == set(names)
    assert isinstance(opt.rest, torch.optim.AdamW) and isinstance(opt.muon, torch.optim.Muon)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model.blocks[0].attn.qkv.weight)] == 2e-3  # train.muon_lr
    assert lr_of[id(model.blocks[1].attn.qkv.weight)] == 1e-3  # the prefix's 5e-4, times muon_lr / lr
    assert lr_of[id(model.tok_emb.weight)] == 1e-3 and lr_of[id(model.blocks[1].attn.qkv.bias)] == 5e-4
    scheduler = build_scheduler(opt, tc)
    for _ in range(5):
        opt.step()
        scheduler.step()
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(2e-3 * lr_factor(5, tc))
    assert opt.rest.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(5, tc))

    inject_lora(model, LoraConfig(r=2))  # only the adapters train, all inside the blocks: Muon alone
    adapters = build_optimizer(model, tc, "cpu")
    assert isinstance(adapters, torch.optim.Muon)
    assert {id(p) for g in adapters.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad}


def test_muon_learns_and_refuses_what_it_cannot_train(prepared, tmp_path):
    """A short Muon run lowers the loss; a model without hidden matrices (an LSTM), FSDP, and resuming an
    AdamW run with Muon are refused, each in one line."""
    from lmlab.models.registry import build_model
    from lmlab.train.optim import build_optimizer

    result = pretrain(tiny_run_config(prepared, tmp_path / "muon", max_steps=30, optimizer="muon", lr=1e-2))
    losses = [r["train_loss"] for r in read_metrics(tmp_path / "muon" / "metrics.jsonl") if "train_loss" in r]
    assert losses[-1] < losses[0] - 0.5 and result.step == 30
    lstm = build_model(ModelConfig(family="lstm", vocab_size=50, n_layer=1, d_model=16))
    with pytest.raises(ConfigError, match="^train.optimizer muon found no hidden matrices"):
        build_optimizer(lstm, TrainConfig(optimizer="muon"), "cpu")
    with pytest.raises(ConfigError, match="^train.optimizer muon needs whole matrices"):
        from_dict(TrainConfig, {"optimizer": "muon", "distributed": "fsdp"}, "train.")
    pretrain(tiny_run_config(prepared, tmp_path / "adamw", max_steps=10, checkpoint_interval=5), stop_after=5)
    with pytest.raises(CheckpointError, match="does not fit this run .*another train.optimizer"):
        pretrain(tiny_run_config(prepared, tmp_path / "adamw", max_steps=10, optimizer="muon"), resume=True)


def test_grad_accumulation_in_the_loop_equals_one_big_batch(prepared, tmp_path):
    """train.grad_accum=4 at batch 8 takes the same steps as batch 32: the step's windows are the same."""
    weights = {}
    for name, batch, accum in (("big", 32, 1), ("accum", 8, 4)):
        cfg = tiny_run_config(prepared, tmp_path / name, max_steps=3, batch_size=batch, grad_accum=accum,
                              checkpoint_interval=100)
        pretrain(cfg)
        weights[name] = load_checkpoint(tmp_path / name).model.state_dict()
    assert all(torch.allclose(weights["big"][k], weights["accum"][k], atol=1e-5) for k in weights["big"])

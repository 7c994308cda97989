"""Sequence classification end to end: data reading, metrics, fine-tuning (full and LoRA), eval, predict."""

import json
import random

import pytest
import torch

from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.data.labeled import length_grouped_batches, read_examples
from lmlab.data.tokenizer import train_tokenizer
from lmlab.errors import DataError
from lmlab.eval.metrics import classification_report
from lmlab.models.registry import build_model
from lmlab.train.checkpoint import save_checkpoint

from toy_sentiment import sentences, write_tsv

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny random-init encoder checkpoint (word-level vocabulary) and train/dev TSV files."""
    root = tmp_path_factory.mktemp("classify")
    train, dev = sentences(400, 0), sentences(100, 1)
    tokenizer = train_tokenizer("word", [t for t, _ in train])
    torch.manual_seed(0)
    encoder = build_model(ModelConfig(family="encoder", n_layer=2, n_head=2, d_model=32, block_size=32,
                                      vocab_size=tokenizer.vocab_size, dropout=0.0))
    base = save_checkpoint(root / "base", encoder, tokenizer)
    return {"root": root, "base": base, "train": write_tsv(root / "train.tsv", train),
            "dev": write_tsv(root / "dev.tsv", dev)}


def finetune(toy, out, *overrides, base=None):
    config = toy["root"] / "cls.yaml"
    config.write_text(f"""
model: {{path: {base or toy['base']}}}
data: {{train: {toy['train']}, val: {toy['dev']}, max_length: 32}}
train: {{out_dir: {out}, batch_size: 16, epochs: 3, lr: 3.0e-3, warmup_steps: 5, lr_schedule: linear,
         weight_decay: 0.01, eval_interval: 1000, log_interval: 10, progress: false}}
""")
    return main(["finetune", "classify", str(config), *overrides])


@pytest.fixture(scope="module")
def full_run(toy):
    out = toy["root"] / "full"
    assert finetune(toy, out) == 0
    return out


def test_full_finetune_learns_and_eval_and_predict_agree(toy, full_run, capsys):
    out = full_run
    results = json.loads((out / "results.json").read_text())
    assert results["accuracy"] >= 0.95 and results["trainable_params"] == results["total_params"]
    assert (out / "confusion.png").is_file() and (out / "results.md").is_file() and (out / "plots" / "loss.png").is_file()
    capsys.readouterr()
    assert main(["eval", "classify", str(out), "--data", str(toy["dev"])]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(results["accuracy"])
    assert main(["predict", str(out), "the film was superb", "a dull and tedious plot"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["label"] for line in lines] == ["1", "0"] and all(line["probability"] > 0.5 for line in lines)


def test_lora_finetune_trains_few_parameters(toy, full_run, tmp_path, capsys):
    """LoRA adapts a pretrained backbone (here: the fully fine-tuned one, under a fresh head)."""
    out = tmp_path / "lora"
    assert finetune(toy, out, "lora.r=4", "lora.alpha=8", "train.lr=1e-2", base=full_run) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["trainable_params"] < 0.2 * results["total_params"]
    assert results["accuracy"] >= 0.9
    ckpt = next((out / "checkpoints").iterdir())
    assert (ckpt / "adapter_config.json").is_file()
    capsys.readouterr()
    assert main(["eval", "classify", str(out), "--data", str(toy["dev"])]) == 0  # adapter reloaded from the checkpoint
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(results["accuracy"])


def test_rdrop_adds_the_disagreement_of_two_dropout_passes(toy, tmp_path):
    """Without dropout R-Drop is plain cross-entropy; with it the KL term is positive; training with it learns."""
    from lmlab.finetune.classify import build_classifier, rdrop_loss
    from lmlab.data.labeled import pad_batch

    torch.manual_seed(0)
    backbone = build_model(ModelConfig(family="encoder", n_layer=2, n_head=2, d_model=16, block_size=16,
                                       vocab_size=40, dropout=0.3))
    model = build_classifier(backbone, ["0", "1"], "mean", 0.3)
    x, mask = pad_batch([[3, 4, 5], [6, 7], [8, 9, 10, 11]], 0)
    y = torch.tensor([0, 1, 1])
    model.eval()
    assert rdrop_loss(model, x, mask, y, alpha=5.0).item() == pytest.approx(model(x, mask, y)[1].item(), abs=1e-6)
    model.train()
    torch.manual_seed(1)
    plain = rdrop_loss(model, x, mask, y, alpha=0.0)
    torch.manual_seed(1)
    assert rdrop_loss(model, x, mask, y, alpha=1.0) > plain + 1e-4
    out = tmp_path / "rdrop"
    assert finetune(toy, out, "model.rdrop=1.0") == 0
    assert json.loads((out / "results.json").read_text())["accuracy"] >= 0.95
    assert finetune(toy, tmp_path / "bad", "model.rdrop=-1") == 1


def test_bad_classification_input_is_one_line_errors(toy, tmp_path, capsys):
    unseen = write_tsv(tmp_path / "unseen.tsv", [("a fine film", "2")])
    assert finetune(toy, tmp_path / "a", f"data.val={unseen}") == 1
    assert "label '2'" in capsys.readouterr().err
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n \t1\n")
    assert finetune(toy, tmp_path / "b", f"data.train={empty}") == 1
    assert "empty text" in capsys.readouterr().err
    assert finetune(toy, tmp_path / "c", "data.text_field=review") == 1
    assert "no field 'review'" in capsys.readouterr().err
    assert main(["predict", str(toy["base"]), "hello"]) == 1
    assert "not a classifier" in capsys.readouterr().err


def test_word_vectors_make_a_bag_of_words_classifier_and_an_encoder_decoder_is_refused():
    from lmlab.errors import ConfigError
    from lmlab.finetune.classify import build_classifier

    w2v = build_model(ModelConfig(family="word2vec", vocab_size=30, d_model=8))
    model = build_classifier(w2v, ["0", "1"], None, 0.0)
    assert model.head_config.pooling == "mean" and not model.config.w2v_sparse
    _, loss = model(torch.randint(0, 30, (3, 5)), labels=torch.tensor([0, 1, 1]))
    loss.backward()
    assert not model.backbone.input_emb.weight.grad.is_sparse  # AdamW and clipping take it
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    s2s = build_model(ModelConfig(family="seq2seq", vocab_size=30, n_layer=1, n_head=2, d_model=16, block_size=8))
    with pytest.raises(ConfigError, match=r"is an encoder-decoder \(seq2seq\): a classifier reads one text"):
        build_classifier(s2s, ["0", "1"], None, 0.0)


def test_readers_and_batches(tmp_path):
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"text": "good", "y": "pos"}\n{"text": "bad", "y": "neg"}\n')
    examples = read_examples(jsonl, "text", "y")
    assert [(e.text, e.label) for e in examples] == [("good", "pos"), ("bad", "neg")]
    csv_file = tmp_path / "x.csv"
    csv_file.write_text('text,label\n"hello, world",1\n')
    assert read_examples(csv_file, "text", "label")[0].text == "hello, world"
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(DataError, match="unknown format"):
        read_examples(tmp_path / "x.txt")
    (tmp_path / "dup.tsv").write_text("sentence\tlabel\tlabel\ngood\t1\t0\n")
    with pytest.raises(DataError, match="the header names 'label' more than once"):
        read_examples(tmp_path / "dup.tsv")
    (tmp_path / "num.jsonl").write_text('{"sentence": 5, "label": 1}\n')
    with pytest.raises(DataError, match="num.jsonl:1: field 'sentence' is 5, not a text"):
        read_examples(tmp_path / "num.jsonl")
    lengths = [random.Random(i).randint(1, 50) for i in range(1000)]
    batches = length_grouped_batches(lengths, 32, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == length_grouped_batches(lengths, 32, seed=1, epoch=0) != length_grouped_batches(lengths, 32, 1, 1)


def test_metrics_match_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    gold = [rng.randrange(3) for _ in range(200)]
    pred = [g if rng.random() < 0.7 else rng.randrange(3) for g in gold]
    pred = [p if p != 2 else 1 for p in pred]  # label 2 is never predicted: precision 0 by convention
    report = classification_report(gold, pred, ["a", "b", "c"])
    p, r, f, _ = sklearn_metrics.precision_recall_fscore_support(gold, pred, average="macro", zero_division=0)
    assert report["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(gold, pred))
    assert (report["macro_precision"], report["macro_recall"], report["macro_f1"]) == pytest.approx((p, r, f))
    assert report["confusion_matrix"] == sklearn_metrics.confusion_matrix(gold, pred).tolist()


def test_head_learning_rate_and_layer_wise_decay():
    """model.head_lr speeds up the new classifier; layer_lr_decay slows each lower layer, embeddings most."""
    from lmlab.config import ClassifyConfig
    from lmlab.finetune.classify import build_classifier, learning_rates
    from lmlab.train.optim import build_optimizer

    backbone = build_model(ModelConfig(family="encoder", n_layer=3, n_head=2, d_model=16, block_size=16, vocab_size=30))
    model = build_classifier(backbone, ["a", "b"], "cls", 0.1)
    cfg = ClassifyConfig()
    cfg.train.lr, cfg.model.head_lr, cfg.model.layer_lr_decay = 1e-4, 1e-3, 0.5
    opt = build_optimizer(model, cfg.train, "cpu", learning_rates(model, cfg))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["classifier.weight"])] == 1e-3
    assert [lr_of[id(params[f"backbone.layers.{i}.attn.qkv.weight"])] for i in range(3)] == [2.5e-5, 5e-5, 1e-4]
    assert lr_of[id(params["backbone.tok_emb.weight"])] == 1.25e-5
    cfg.model.head_lr, cfg.model.layer_lr_decay = None, 1.0
    assert learning_rates(model, cfg) == {}


def classify_losses(run):
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "train_loss" in line]


def test_classifier_training_resumes_exactly(toy, tmp_path):
    """Stopped after 5 steps and resumed (LoRA, dropout, weight average): the same per-step losses."""
    extra = ["train.epochs=null", "train.max_steps=12", "train.log_interval=1", "train.checkpoint_interval=100",
             "train.ema_decay=0.9", "lora.r=4", "model.dropout=0.1"]
    assert finetune(toy, tmp_path / "full", *extra) == 0
    assert main(["finetune", "classify", str(toy["root"] / "cls.yaml"), *extra, f"train.out_dir={tmp_path / 'part'}",
                 "--stop-after", "5"]) == 0
    assert main(["finetune", "classify", str(toy["root"] / "cls.yaml"), *extra, f"train.out_dir={tmp_path / 'part'}",
                 "--resume"]) == 0
    full, part = classify_losses(tmp_path / "full"), classify_losses(tmp_path / "part")
    assert len(full) == 12 and full == part


def test_classifier_grad_accumulation_equals_one_big_batch(toy, tmp_path):
    from lmlab.train.checkpoint import load_checkpoint

    extra = ["train.epochs=null", "train.max_steps=3", "train.warmup_steps=1", "data.val=", "train.checkpoint_interval=100"]
    assert finetune(toy, tmp_path / "big", *extra, "train.batch_size=32") == 0
    assert finetune(toy, tmp_path / "accum", *extra, "train.batch_size=8", "train.grad_accum=4") == 0
    big, accum = (load_checkpoint(tmp_path / n).model.state_dict() for n in ("big", "accum"))
    assert all(torch.allclose(big[k], accum[k], atol=1e-5) for k in big)

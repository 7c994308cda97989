"""Masked-LM pretraining of the encoder (train/mlm.py): BERT masking, the loss on masked positions only,
exact resume, eval ppl of an MLM checkpoint, and fine-tuning a classifier on the pretrained encoder."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.cli import main
from lmlab.config import DataConfig, MlmConfig, ModelConfig, RunConfig, TrainConfig
from lmlab.data.tokenizer import train_tokenizer
from lmlab.models.encoder import Encoder, MaskedLM, ReplacedTokenConfig, ReplacedTokenDetector
from lmlab.models.interface import IGNORE_INDEX
from lmlab.train.checkpoint import load_checkpoint
from lmlab.train.lm import pretrain
from lmlab.train.logger import read_metrics
from lmlab.train.mlm import Masker, mask_token_id

from conftest import tiny_corpus
from loop_tasks import assert_same_run


def corpus_windows(tokenizer, rows: int, width: int = 64) -> torch.Tensor:
    """(rows, width) token ids of the tiny corpus, documents separated by end-of-text, cycled as needed."""
    ids = []
    for doc in tiny_corpus(200):
        ids += [tokenizer.eot_id] + tokenizer.encode(doc)
    need = rows * width
    stream = np.resize(np.array(ids, dtype=np.int64), need)
    return torch.from_numpy(stream).view(rows, width)


def mlm_config(data_dir, out_dir, layout: dict | None = None, **train) -> RunConfig:
    model = ModelConfig(family="encoder", n_layer=2, n_head=2, d_model=32, block_size=32, **(layout or {}))
    defaults = dict(out_dir=str(out_dir), batch_size=4, max_steps=16, warmup_steps=2, eval_interval=8, eval_batches=2,
                    checkpoint_interval=100, log_interval=1, progress=False, lr=3e-3)
    defaults.update(train)
    return RunConfig(model=model, data=DataConfig(path=str(data_dir)), train=TrainConfig(**defaults))


@pytest.fixture(scope="module", params=["bert", "pre-norm rope"])
def mlm_run(prepared, tmp_path_factory, request):
    """A tiny encoder pretrained as a masked language model for 30 steps: BERT's post-norm layers with learned
    positions, and the recipe's pre-norm layers with rotary positions (configs/wikitext2_mlm.yaml)."""
    layout = {"pre-norm rope": {"pre_norm": True, "pos_emb": "rope"}}.get(request.param)
    out = tmp_path_factory.mktemp("mlm") / "run"
    pretrain(mlm_config(prepared, out, layout, max_steps=30, eval_interval=10, lr=1e-2))
    return out


def test_bert_masking_statistics():
    """15% of the ordinary tokens are chosen; of them 80% become [MASK], 10% a random ordinary token, 10%
    stay; special tokens are never chosen, nor drawn as replacements."""
    tok = train_tokenizer("char", tiny_corpus())
    masker = Masker(tok)  # adds [MASK]
    mask_id = mask_token_id(tok)
    assert mask_id == tok.vocab_size - 1 and mask_id in tok.special_ids
    x = corpus_windows(tok, 1000)  # 64,000 tokens
    inputs, targets = masker(x, np.random.default_rng(0))
    chosen = targets != IGNORE_INDEX
    special = x == tok.eot_id
    assert special.any() and not chosen[special].any() and torch.equal(inputs[special], x[special])
    assert torch.equal(targets[chosen], x[chosen]) and torch.equal(inputs[~chosen], x[~chosen])
    assert chosen.sum() / (~special).sum() == pytest.approx(0.15, abs=0.005)
    masked, kept = (inputs == mask_id) & chosen, (inputs == x) & chosen
    replaced = chosen & ~masked & ~kept
    n = chosen.sum()
    assert masked.sum() / n == pytest.approx(0.8, abs=0.015)
    assert replaced.sum() / n == pytest.approx(0.1, abs=0.01)
    assert kept.sum() / n == pytest.approx(0.1, abs=0.01)
    assert not np.isin(inputs[replaced].numpy(), tok.special_ids).any()
    again, _ = masker(x, np.random.default_rng(0))
    assert torch.equal(again, inputs)  # the same generator state, the same masks


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_whole_word_masking_masks_whole_words(kind):
    """With whole_word every token of a chosen word is chosen (words: runs of non-space characters; a
    space is a word of its own for char), and still about 15% of the tokens."""
    tok = train_tokenizer(kind, tiny_corpus(), vocab_size=300 if kind == "bpe" else None)
    masker = Masker(tok, whole_word=True)
    x = corpus_windows(tok, 400)
    inputs, targets = masker(x, np.random.default_rng(1))
    chosen = (targets != IGNORE_INDEX).numpy()
    starts = masker.word_starts(x.numpy())
    multi_token_words = 0
    for row in range(len(x)):
        bounds = list(np.flatnonzero(starts[row])) + [x.shape[1]]
        for a, b in zip(bounds, bounds[1:]):
            text = tok.decode(x[row, a:b].tolist())
            assert not any(c.isspace() for c in text.strip()), text  # one word (and its leading space)
            if not (x[row, a:b] == tok.eot_id).any():
                assert chosen[row, a:b].all() or not chosen[row, a:b].any(), text
            multi_token_words += b - a > 1 and chosen[row, a]
    assert multi_token_words > 100
    assert chosen.mean() == pytest.approx(0.15, abs=0.02)


def test_loss_is_on_masked_positions_only():
    """The loss is the cross-entropy of the full logits at the chosen positions; the tokens elsewhere do not count."""
    tok = train_tokenizer("char", tiny_corpus())
    masker = Masker(tok)
    model = MaskedLM(Encoder(ModelConfig(family="encoder", n_layer=1, n_head=2, d_model=16, block_size=64,
                                         vocab_size=tok.vocab_size))).eval()
    inputs, targets = masker(corpus_windows(tok, 4), np.random.default_rng(0))
    logits, loss = model(inputs, targets)
    chosen = targets != IGNORE_INDEX
    full, _ = model(inputs)  # (B, T, vocab)
    assert logits.shape == (int(chosen.sum()), tok.vocab_size)
    assert torch.allclose(logits, full[chosen], atol=1e-5)
    assert loss.item() == pytest.approx(F.cross_entropy(full[chosen], targets[chosen]).item(), rel=1e-5)
    _, none_scored = model(inputs, torch.full_like(targets, IGNORE_INDEX))
    assert none_scored.item() == 0.0  # a micro-batch without masked tokens adds nothing (not NaN) to its step


def test_electra_corrupts_the_chosen_tokens_and_its_generator_learns_only_from_its_own_loss():
    """ELECTRA: the generator's tokens replace the chosen positions only; the discriminator's loss is the
    binary cross-entropy of 'replaced' at every token (a sampled original counts as original); the sampling
    passes no gradient, so the generator's own layers get the same gradient whatever disc_weight is; the
    generator shares the discriminator's token embedding; evaluation corrupts the same way every time."""
    tok = train_tokenizer("char", tiny_corpus())
    masker = Masker(tok)
    inputs, targets = masker(corpus_windows(tok, 4, 32), np.random.default_rng(0))
    chosen = targets != IGNORE_INDEX
    original = torch.where(chosen, targets, inputs)
    grads = []
    for weight in (1.0, 50.0):
        torch.manual_seed(0)
        encoder = Encoder(ModelConfig(family="encoder", n_layer=2, n_head=2, d_model=16, block_size=32,
                                      vocab_size=tok.vocab_size, pre_norm=True, pos_emb="rope"))
        model = ReplacedTokenDetector(encoder, ReplacedTokenConfig(generator_layers=1, disc_weight=weight))
        assert model.generator.backbone.tok_emb.weight is model.backbone.tok_emb.weight
        assert len(model.generator.backbone.layers) == 1 and len(model.backbone.layers) == 2
        torch.manual_seed(1)
        gen_logits, gen_loss, corrupted, replaced = model.corrupt(inputs, targets)
        assert torch.equal(corrupted[~chosen], original[~chosen]) and torch.equal(replaced, (corrupted != original).float())
        assert gen_logits.shape == (int(chosen.sum()), tok.vocab_size)
        logits = model.detect(corrupted)
        expected = gen_loss + weight * F.binary_cross_entropy_with_logits(logits, replaced)
        torch.manual_seed(1)
        _, loss = model(inputs, targets)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        loss.backward()
        grads.append([p.grad.clone() for p in model.generator.backbone.layers.parameters()])
        model.eval()
        assert torch.equal(model.corrupt(inputs, targets)[2], model.corrupt(inputs, targets)[2])
        assert model(inputs)[0].shape == inputs.shape  # without targets: the discriminator's logits
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_electra_run_learns_saves_and_fine_tunes(prepared, tmp_path, capsys):
    """mlm.objective electra through lmlab train: the loss falls, the validation figures of both halves are
    logged, the checkpoint loads back with the embedding still shared, eval ppl scores its generator, and
    finetune classify starts from the discriminator."""
    out = tmp_path / "electra"
    cfg = mlm_config(prepared, out, {"pre_norm": True, "pos_emb": "rope"}, max_steps=30, eval_interval=10, lr=1e-2)
    cfg.mlm = MlmConfig(objective="electra", generator_layers=1, disc_weight=20.0)
    pretrain(cfg)
    metrics = read_metrics(out / "metrics.jsonl")
    train = [r["train_loss"] for r in metrics if "train_loss" in r]
    val = [r for r in metrics if "val_loss" in r]
    assert train[-1] < train[0] - 1.0 and val[-1]["val_loss"] < val[0]["val_loss"]
    assert {"val_gen_loss", "val_gen_accuracy", "val_disc_accuracy", "val_disc_recall"} <= set(val[-1])
    ckpt = load_checkpoint(out)
    assert isinstance(ckpt.model, ReplacedTokenDetector)
    assert ckpt.manifest["head"] == {"kind": "electra", "generator_layers": 1, "disc_weight": 20.0}
    assert ckpt.model.generator.backbone.tok_emb.weight is ckpt.model.backbone.tok_emb.weight
    assert main(["eval", "ppl", str(out), "--data", str(prepared)]) == 0
    assert 0 < json.loads(capsys.readouterr().out)["accuracy"] <= 1
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nthe quick fox\t1\na lazy dog\t0\n", encoding="utf-8")
    config = tmp_path / "classify.yaml"
    config.write_text(f"""
model: {{path: {out}, pooling: mean}}
data: {{train: {tmp_path / 'train.tsv'}, max_length: 16}}
train: {{out_dir: {tmp_path / 'cls'}, batch_size: 2, max_steps: 1, warmup_steps: 0, lr: 1.0e-6, progress: false}}
""")
    assert main(["finetune", "classify", str(config)]) == 0
    tuned = load_checkpoint(tmp_path / "cls").model.backbone.state_dict()
    assert all(torch.allclose(tuned[k], v, atol=1e-4) for k, v in ckpt.model.backbone.state_dict().items())


def test_resumed_mlm_run_equals_uninterrupted(prepared, tmp_path):
    """Stopping at step 7 and resuming gives the same losses and weights (masks and dropout included)."""
    runs = {}
    for name in ("full", "part"):
        runs[name] = mlm_config(prepared, tmp_path / name)
        runs[name].model.dropout = 0.1
        runs[name].mlm = MlmConfig(whole_word=True)
    pretrain(runs["full"])
    assert pretrain(runs["part"], stop_after=7).step == 7
    assert pretrain(runs["part"], resume=True).step == 16
    assert_same_run(tmp_path / "full", tmp_path / "part", 16)


def test_mlm_run_learns_and_its_checkpoint_holds_encoder_and_head(mlm_run):
    metrics = read_metrics(mlm_run / "metrics.jsonl")
    train = [r["train_loss"] for r in metrics if "train_loss" in r]
    val = [r for r in metrics if "val_loss" in r]
    assert train[-1] < train[0] - 1.0
    assert list(val[0])[1:3] == ["val_loss", "val_accuracy"] and val[-1]["val_loss"] < val[0]["val_loss"]
    assert "mfu" in metrics[0] or "tflops" in metrics[0]
    ckpt = load_checkpoint(mlm_run)
    assert isinstance(ckpt.model, MaskedLM) and ckpt.manifest["head"] == {"kind": "mlm"}
    assert ckpt.manifest["kind"] == "mlm" and ckpt.manifest["mlm"] == {"mask_prob": 0.15, "whole_word": False, "objective": "mlm"}
    assert mask_token_id(ckpt.tokenizer) == ckpt.model.config.vocab_size - 1  # [MASK] added to the data's tokenizer
    assert {n.split(".")[0] for n in ckpt.model.state_dict()} == {"backbone", "head"}


def test_eval_ppl_of_an_mlm_checkpoint(mlm_run, prepared, tmp_path, capsys):
    """eval ppl reports masked-token loss, its exp and accuracy (same figures twice: the masks are seeded),
    on a prepared folder (whose tokenizer lacks the [MASK] the run added) and on text files."""
    reports = []
    for data in (prepared, prepared, tmp_path / "a.txt"):
        (tmp_path / "a.txt").write_text("".join(tiny_corpus(5)), encoding="utf-8")
        assert main(["eval", "ppl", str(mlm_run), "--data", str(data)]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    report = reports[0]
    assert {"masked_loss", "pseudo_perplexity", "accuracy", "masked_tokens", "masking"} <= set(report)
    assert report["pseudo_perplexity"] == pytest.approx(np.exp(report["masked_loss"]))
    assert 0 < report["accuracy"] <= 1 and "seed 0" in report["masking"]
    assert reports[1] == reports[0] and reports[2]["masked_tokens"] != report["masked_tokens"]
    assert main(["eval", "ppl", str(mlm_run), "--data", str(prepared), "--stride", "4"]) == 1
    assert "stride does not apply" in capsys.readouterr().err
    assert main(["generate", str(mlm_run), "--prompt", "the"]) == 1
    assert "is a masked language model" in capsys.readouterr().err


def test_pretrained_encoder_fine_tunes_as_a_classifier(mlm_run, tmp_path):
    """lmlab finetune classify on the MLM checkpoint starts from its encoder and drops the MLM head."""
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nthe quick fox\t1\na lazy dog\t0\nseven wizards\t1\n"
                                        "the dog sleeps\t0\n", encoding="utf-8")
    config = tmp_path / "classify.yaml"
    config.write_text(f"""
model: {{path: {mlm_run}}}
data: {{train: {tmp_path / 'train.tsv'}, max_length: 16}}
train: {{out_dir: {tmp_path / 'cls'}, batch_size: 2, max_steps: 2, warmup_steps: 1, lr: 1.0e-6, progress: false}}
""")
    assert main(["finetune", "classify", str(config)]) == 0
    classifier = load_checkpoint(tmp_path / "cls").model
    encoder = load_checkpoint(mlm_run).model.backbone
    assert not any(name.startswith("head.") for name in classifier.state_dict())
    tuned = classifier.backbone.state_dict()
    assert all(torch.allclose(tuned[k], v, atol=1e-4) for k, v in encoder.state_dict().items())


def test_mlm_on_two_processes_takes_the_steps_of_one(prepared, tmp_path):
    """Under torchrun (DDP, gloo) the rows and their masked-token counts split over the ranks, and the frozen
    pooler (no MLM gradient reaches it) keeps DDP from waiting for its gradient."""
    import torch.distributed as dist
    from test_train_distributed import TOLERANCE, losses, torchrun

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    one, two = (mlm_config(prepared, tmp_path / name, max_steps=6, grad_accum=2, eval_interval=3, eval_batches=3)
                for name in ("one", "two"))
    one.mlm = two.mlm = MlmConfig(whole_word=True)
    pretrain(one)
    torchrun(two, tmp_path)
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert losses(tmp_path / "two", key) == pytest.approx(losses(tmp_path / "one", key), rel=TOLERANCE)


@pytest.mark.parametrize("override, fragment", [
    ("mlm.mask_prob=1.5", "mlm.mask_prob must be in (0, 1), got 1.5"),
    ("mlm.mask_prob=0", "mlm.mask_prob must be in (0, 1), got 0"),
    ("mlm.whole_word=maybe", "mlm.whole_word expects bool"),
    ("model.family=gpt", "mlm.mask_prob applies to masked-LM pretraining (model.family encoder) only, not gpt"),
    ("mlm.generator_layers=2", "mlm.generator_layers applies to mlm.objective electra, not mlm"),
    ("mlm.objective=gan", "mlm.objective 'gan' is not one of mlm, electra"),
])
def test_bad_masking_config_is_a_one_line_error(prepared, tmp_path, capsys, override, fragment):
    config = tmp_path / "mlm.yaml"
    config.write_text(f"model: {{family: encoder}}\ndata: {{path: {prepared}}}\nmlm: {{mask_prob: 0.2}}\n"
                      f"train: {{out_dir: {tmp_path / 'run'}}}\n")
    assert main(["train", str(config), override]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in err, err

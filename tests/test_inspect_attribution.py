"""Attributions on a classifier whose answer is known: trained on filler sentences where the label is 1
iff "zebra" appears, the word "zebra" gets the largest attribution; the attributions add up to
logit(x) - logit(baseline) (completeness); predict --explain prints them, coloured or not, and as HTML."""

import json
import random

import pytest
import torch

from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.data.labeled import encode_texts, pad_batch
from lmlab.data.tokenizer import train_tokenizer
from lmlab.errors import OutputError
from lmlab.inspect.attribution import PAGE_MARK, ansi_line, baseline_ids, checked_page_path, integrated_gradients
from lmlab.finetune.classify import build_classifier
from lmlab.interop import load_model
from lmlab.models.registry import build_model
from lmlab.train.checkpoint import save_checkpoint

FILLER = ["the", "a", "cat", "dog", "ran", "sat", "on", "under", "big", "small", "red", "old", "tree", "house", "park"]


def sentences(n: int, seed: int) -> list[tuple[str, str]]:
    """Random filler words; half the sentences get "zebra" somewhere, and only those are labelled 1."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.choices(FILLER, k=rng.randint(4, 10))
        if i % 2:
            words.insert(rng.randrange(len(words) + 1), "zebra")
        rows.append((" ".join(words), str(i % 2)))
    return rows


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny encoder classifier trained on the zebra data (40 steps of a plain loop; it is right on every
    training sentence by step 20), saved as a checkpoint and loaded back as the CLI would."""
    train = sentences(256, 0)
    tokenizer = train_tokenizer("word", [t for t, _ in train])
    torch.manual_seed(0)
    encoder = build_model(ModelConfig(family="encoder", n_layer=1, n_head=2, d_model=32, block_size=32,
                                      vocab_size=tokenizer.vocab_size, dropout=0.0))
    model = build_classifier(encoder, ["0", "1"], pooling="mean", dropout=0.0)
    x, mask = pad_batch(encode_texts(tokenizer, [t for t, _ in train], 32), tokenizer.pad_id)
    y = torch.tensor([int(label) for _, label in train])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(40):
        rows = torch.arange(32) + 32 * (step % 8)
        loss = model(x[rows], mask[rows], y[rows])[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = save_checkpoint(tmp_path_factory.mktemp("zebra") / "ckpt", model.eval(), tokenizer)
    return load_model(path)


def test_the_deciding_token_gets_the_largest_attribution(classifier):
    model, tokenizer = classifier.model, classifier.tokenizer
    texts = [t for t, y in sentences(12, 1) if y == "1"]
    for text in texts:
        a = integrated_gradients(model, tokenizer, text, max_length=32)
        assert a.label == "1"
        assert a.tokens[max(range(len(a.scores)), key=a.scores.__getitem__)] == "zebra", (text, a.scores)


def test_attributions_add_up_to_the_change_of_the_logit(classifier):
    model, tokenizer = classifier.model, classifier.tokenizer
    for text in ("the cat sat under a zebra tree", "a small dog ran in the old park"):
        a = integrated_gradients(model, tokenizer, text, max_length=32, n_steps=200)
        idx = torch.tensor(encode_texts(tokenizer, [text], 32))
        label = model.head_config.labels.index(a.label)
        with torch.no_grad():
            change = model(idx)[0][0, label] - model(baseline_ids(idx, tokenizer))[0][0, label]
        assert abs(a.delta) < 0.01 * max(1.0, abs(float(change)))
        assert sum(a.scores) == pytest.approx(float(change), abs=0.02 * max(1.0, abs(float(change))))


def test_predict_explain_prints_json_colours_and_html(classifier, tmp_path, capsys):
    ckpt = str(classifier.path)
    text = "a big zebra sat on the house"
    page = tmp_path / "why.html"
    assert main(["predict", ckpt, text, "--explain", "--html", str(page), "--png", str(tmp_path / "why.png")]) == 0
    captured = capsys.readouterr()
    row = json.loads(captured.out)
    assert row["label"] == "1" and [t for t, _ in row["attributions"]] == text.split()
    assert "\x1b[" not in captured.err and "zebra[+" in captured.err  # stderr is no terminal here: no colours
    assert 'title="' in page.read_text() and "zebra" in page.read_text() and (tmp_path / "why.png").is_file()
    coloured = ansi_line(row, classifier.tokenizer, color=True)
    assert "\x1b[32;1mzebra\x1b[0m" in coloured  # the strongest push toward the label: bold green
    assert main(["predict", ckpt, text, "--html", str(tmp_path)]) == 1  # a folder
    assert "is a folder" in capsys.readouterr().err


def test_page_paths_get_the_place_checks_of_every_output(classifier, tmp_path):
    """checked_page_path: its own rules for what a page replaces, then runs.check_place: no page inside a
    checkpoint (it would change what the checkpoint holds), no parent that is a file; a page it wrote is replaced."""
    inside = classifier.path / "why.html"
    with pytest.raises(OutputError, match="is inside .* which holds an lmlab checkpoint"):
        checked_page_path(inside, ".html")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot create"):
        checked_page_path(tmp_path / "file" / "why.png", ".png")
    page = tmp_path / "why.html"
    page.write_text(f"<html>{PAGE_MARK}</html>")
    assert checked_page_path(page, ".html") == page
    page.write_text("<html>mine</html>")
    with pytest.raises(OutputError, match="is not an attribution page written by lmlab"):
        checked_page_path(page, ".html")

"""Attributions: which tokens drove a classifier's decision (integrated gradients, via captum).

    lmlab predict CKPT "a gripping film" --explain [--html why.html] [--no-color]

Integrated gradients (Sundararajan et al., 2017) integrate the gradient of the predicted label's logit
along the straight line from a baseline input to the real one, in the space of the input token
embeddings (captum's ``LayerIntegratedGradients`` over the backbone's token-embedding layer; positions
and the rest of the model are left as they are). The baseline is the same text with every ordinary
token replaced by the padding token ([PAD], else end-of-text); template tokens ([CLS], [SEP]) stay, so
they get no attribution. A token's score is its attribution summed over the embedding dimensions:
positive pushed towards the predicted label, negative against it. The scores add up to
logit(x) - logit(baseline) up to the integral's error, which captum reports as the convergence delta
(kept in each row: ``delta``).
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lmlab.data.labeled import encode_texts
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import ConfigError
from lmlab.finetune.classify import checked_max_length, predict_texts, require_classifier
from lmlab.inspect.attention import token_labels
from lmlab.models.heads import SequenceClassifier
from lmlab.runs import atomic_file, atomic_write_text, check_page_output

log = logging.getLogger(__name__)

PAGE_MARK = '<meta name="generator" content="lmlab predict --explain">'  # a page this module wrote (may be replaced)


@dataclass
class Attribution:
    """Integrated-gradients scores of one text toward ``label``: one per token, in order, and captum's
    convergence delta (the attributions' sum less logit(x) - logit(baseline))."""

    tokens: list[str]
    scores: list[float]
    label: str
    delta: float


def token_embedding(model: SequenceClassifier) -> nn.Embedding:
    """The backbone's token-embedding layer, whose output the attributions are taken over."""
    backbone = model.backbone
    names = ("tok_emb", "embed", "input_emb")  # the Transformers', the recurrent models', word2vec's
    layer = next((getattr(backbone, n) for n in names if isinstance(getattr(backbone, n, None), nn.Embedding)), None)
    if layer is None:
        raise ConfigError(f"found no token embedding in a {backbone.config.family} model to attribute over")
    return layer


def baseline_ids(ids: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """ids (B, T) with every ordinary token replaced by the padding token; special tokens ([CLS]) kept."""
    special = torch.tensor(tokenizer.special_ids, dtype=ids.dtype)
    return torch.where(torch.isin(ids, special), ids, torch.full_like(ids, tokenizer.pad_id))


def integrated_gradients(model: SequenceClassifier, tokenizer: Tokenizer, text: str, max_length: int,
                         n_steps: int = 100) -> Attribution:
    """The attribution of each token of ``text`` (as the classifier reads it) toward its predicted label."""
    from captum.attr import LayerIntegratedGradients

    model.eval()
    device = next(model.parameters()).device
    idx = torch.tensor(encode_texts(tokenizer, [text], max_length), device=device)  # (1, T)
    mask = torch.ones_like(idx)
    with torch.no_grad():
        label = int(model(idx, mask)[0].argmax(-1))

    def label_logits(ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model(ids, attention_mask)[0]  # (n, n_labels): captum picks the target's column

    ig = LayerIntegratedGradients(label_logits, token_embedding(model))
    attributions, delta = ig.attribute(idx, baselines=baseline_ids(idx.cpu(), tokenizer).to(device),
                                       additional_forward_args=(mask,), target=label, n_steps=n_steps,
                                       internal_batch_size=50, return_convergence_delta=True)
    scores = attributions.sum(-1)[0]  # (T,): summed over the embedding dimensions
    return Attribution(token_labels(tokenizer, idx[0].tolist()), [round(float(s), 4) for s in scores],
                       model.head_config.labels[label], float(delta))


def explain_texts(ckpt, texts: list[str], file: str | None = None, text_field: str = "sentence",
                  max_length: int | None = None, n_steps: int = 100) -> list[dict]:
    """``predict_texts``' rows (label, probability, text), each with its tokens' attributions
    (``[[token, score], ...]``) and the convergence delta."""
    require_classifier(ckpt)
    rows = predict_texts(ckpt, texts, file, text_field, max_length)
    max_length = checked_max_length(ckpt, max_length)
    for row in rows:
        a = integrated_gradients(ckpt.model, ckpt.tokenizer, row["text"], max_length, n_steps)
        row["attributions"] = [[t, s] for t, s in zip(a.tokens, a.scores)]
        row["delta"] = round(a.delta, 4) + 0.0  # + 0.0: no "-0.0"
    return rows


def _separator(tokenizer: Tokenizer) -> str:
    """What goes between tokens when a text is shown token by token: nothing where the tokens carry their
    own spaces (BPE, bytes, characters), a space otherwise (words, word pieces)."""
    return "" if tokenizer.kind in ("bpe", "byte", "char") else " "


def ansi_line(row: dict, tokenizer: Tokenizer, color: bool = True) -> str:
    """The text of an explained row, token by token, green where a token pushed toward the predicted
    label and red where against it (brighter: more), then the label; plain tokens and [scores] without
    ``color``."""
    pairs = row["attributions"]
    top = max((abs(s) for _, s in pairs), default=0.0) or 1.0
    pieces = []
    for token, score in pairs:
        text = token.replace("·", " ")
        if not color:
            pieces.append(f"{text}[{score:+.2f}]")
            continue
        strength = abs(score) / top
        if strength < 0.1:
            pieces.append(text)
        else:
            code = ("32" if score > 0 else "31") + (";1" if strength > 0.5 else "")  # green/red, bold when strong
            pieces.append(f"\x1b[{code}m{text}\x1b[0m")
    return f"{_separator(tokenizer).join(pieces)}  -> {row['label']} ({row['probability']:.2f})"


def html_page(rows: list[dict], tokenizer: Tokenizer) -> str:
    """One self-contained HTML page: each text with its tokens' backgrounds green (toward the predicted
    label) or red (against), their strength the score over the text's largest; scores on hover."""
    blocks = []
    for row in rows:
        pairs = row["attributions"]
        top = max((abs(s) for _, s in pairs), default=0.0) or 1.0
        spans = []
        for token, score in pairs:
            alpha = min(1.0, abs(score) / top)
            rgb = "0,160,60" if score > 0 else "220,40,40"
            spans.append(f'<span title="{score:+.4f}" style="background:rgba({rgb},{alpha:.2f})">'
                         f'{html.escape(token.replace("·", " "))}</span>')
        blocks.append(f'<div class="row"><div class="text">{_separator(tokenizer).join(spans)}</div>'
                      f'<div class="label">{html.escape(row["label"])} ({row["probability"]:.2f}), '
                      f'delta {row["delta"]:+.4f}</div></div>')
    return f"""<!doctype html>
<html><head><meta charset="utf-8">{PAGE_MARK}<title>Attributions</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:60em}} .row{{margin:1em 0}}
.text{{font-family:monospace;font-size:1.1em;line-height:1.8}} .text span{{padding:0.1em 0.05em;white-space:pre}}
.label{{color:#555}}</style></head><body>
<h2>Attributions (integrated gradients toward the predicted label)</h2>
<p>Green: pushed toward the predicted label; red: against it; hover a token for its score.</p>
{"".join(blocks)}
</body></html>
"""


def plot_attributions(rows: list[dict], tokenizer: Tokenizer, path: str | Path, width: int = 900) -> Path:
    """A PNG of the explained texts, tokens on green (toward the predicted label) or red (against)
    backgrounds as in ``html_page``, one text per paragraph with its label: for documents and slides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    line, gap = 26, 8  # pixels per line of tokens, between tokens without their own spaces
    space = 6 if _separator(tokenizer) else 0
    fig = plt.figure(figsize=(width / 100, 10), dpi=100)
    renderer = fig.canvas.get_renderer()
    y = 10 * 100 - 20  # from the top, in pixels
    for row in rows:
        pairs = row["attributions"]
        top = max((abs(s) for _, s in pairs), default=0.0) or 1.0
        x = 10
        for token, score in pairs:
            rgb = (0.0, 0.63, 0.24) if score > 0 else (0.86, 0.16, 0.16)
            text = fig.text(x, y, token.replace("·", " "), transform=None, fontsize=12, family="monospace", va="top",
                            bbox=dict(facecolor=(*rgb, min(1.0, abs(score) / top)), edgecolor="none", pad=1.5))
            w = text.get_window_extent(renderer).width
            if x + w > width - 10 and x > 10:  # wrap: move the token to the next line
                x, y = 10, y - line
                text.set_position((x, y))
            x += w + space + (0 if space else gap // 4)
        y -= line
        fig.text(10, y, f"-> {row['label']} ({row['probability']:.2f})", transform=None, fontsize=10, color="#555",
                 va="top")
        y -= line + gap
    height = 10 * 100 - y
    fig.set_size_inches(width / 100, height / 100)
    for text in fig.texts:  # keep each text's distance from the top as the figure shrinks
        x0, y0 = text.get_position()
        text.set_position((x0, y0 - (10 * 100 - height)))
    with atomic_file(checked_page_path(path, ".png")) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def checked_page_path(path: str | Path, suffix: str) -> Path:
    """``path`` if an attribution page (.html) or picture (.png) may be written there (runs.check_page_output:
    an .html page is replaced only if this module wrote it)."""
    return check_page_output(path, suffix, PAGE_MARK, "an attribution page written by lmlab")


def write_html(rows: list[dict], tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write ``html_page(rows)`` to ``path`` (atomically); refuse a folder, or a file this module did not write."""
    path = checked_page_path(path, ".html")
    atomic_write_text(path, html_page(rows, tokenizer))
    return path

"""The logit lens (nostalgebraist, 2020): what each layer of a decoder would predict if it were the last.

    lmlab inspect lens CKPT --prompt "To be, or not to be" --top-k 5 --out lens/

A pre-norm decoder (models/gpt.py) adds each block's output to one residual stream and reads its
prediction as lm_head(norm_f(stream)). Applying that same final norm and LM head to the stream after
the embeddings and after every block shows how the prediction forms, layer by layer; after the last
block it is the model's own output (tests/test_inspect_lens.py checks that).

The output folder holds lens.png (the top-1 token of every layer at every position, coloured by its
probability), results.json (the top-k tokens and probabilities of every layer and position) and results.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import ConfigError
from lmlab.eval.report import write_results
from lmlab.inspect.attention import encode_prompt, token_labels
from lmlab.models.gpt import GPT

log = logging.getLogger(__name__)


@dataclass
class Lens:
    """The top-k predictions of every layer at every position of one prompt.

    ``layers`` names the rows ("embed", then "layer 0" ...); ``probs`` and ``ids`` are (L + 1, T, k),
    best first; ``tokens`` are the prompt's tokens (T).
    """

    layers: list[str]
    tokens: list[str]
    probs: torch.Tensor
    ids: torch.Tensor


def residual_streams(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream (B, T, C) after the embeddings and after each block of ``model`` for idx (B, T),
    read by forward hooks on the blocks during one ordinary forward pass."""
    streams: list[torch.Tensor] = []
    hooks = [model.blocks[0].register_forward_pre_hook(lambda _m, args: streams.append(args[0]))]
    hooks += [block.register_forward_hook(lambda _m, _args, out: streams.append(out)) for block in model.blocks]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return streams


def lens_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits (L + 1, B, T, vocab): the final norm and LM head applied to each residual stream (embeddings
    first); the last row is the model's own logits."""
    return torch.stack([model.lm_head(model.norm_f(x)) for x in residual_streams(model, idx)])


@torch.no_grad()
def logit_lens(model: nn.Module, tokenizer: Tokenizer, prompt: str, top_k: int = 5) -> Lens:
    """The top ``top_k`` tokens and probabilities of each layer at each position of ``prompt``."""
    if not isinstance(model, GPT):
        raise ConfigError(f"the logit lens reads a Transformer decoder (family gpt), not a {model.config.family} model")
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, not {top_k}")
    model.eval()
    ids = encode_prompt(model, tokenizer, prompt)
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    probs = lens_logits(model, idx)[:, 0].float().softmax(-1)  # (L + 1, T, vocab)
    if top_k > probs.size(-1):
        log.warning("--top-k %d is larger than the vocabulary: showing all %d tokens", top_k, probs.size(-1))
        top_k = probs.size(-1)
    top = probs.topk(top_k, dim=-1)
    names = ["embed"] + [f"layer {i}" for i in range(len(model.blocks))]
    return Lens(names, token_labels(tokenizer, ids), top.values.cpu(), top.indices.cpu())


def lens_table(lens: Lens, tokenizer: Tokenizer, width: int = 7) -> str:
    """A text table for the terminal: the top-1 token of every layer (rows) at every position (columns,
    as wide as the longest token, at most ``width``), then each layer's top-k at the last position (what
    the model would write next)."""
    top1 = [token_labels(tokenizer, ids.tolist()) for ids in lens.ids[:, :, 0]]
    width = min(width, max(len(t) for t in lens.tokens + [t for row in top1 for t in row]))

    def line(name: str, cells: list[str]) -> str:
        return name.ljust(14) + " ".join(t[:width].ljust(width) for t in cells)

    rows = [line("layer \\ input", lens.tokens)] + [line(name, cells) for name, cells in zip(lens.layers, top1)]
    rows.append(f"\ntop {lens.ids.size(-1)} after the last token ({lens.tokens[-1]!r}):")
    for name, ids, probs in zip(lens.layers, lens.ids[:, -1], lens.probs[:, -1]):
        pairs = ", ".join(f"{t!r} {p:.2f}" for t, p in zip(token_labels(tokenizer, ids.tolist()), probs.tolist()))
        rows.append(f"  {name.ljust(12)}{pairs}")
    return "\n".join(rows)


def plot_lens(lens: Lens, tokenizer: Tokenizer, path: Path) -> Path:
    """A PNG grid: a row per layer, a column per input token; each cell shows the top-1 prediction there
    and its probability (.82), and is coloured by it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top1 = lens.probs[:, :, 0].numpy()  # (L + 1, T)
    L, T = top1.shape
    labels = [token_labels(tokenizer, ids.tolist()) for ids in lens.ids[:, :, 0]]
    longest = min(6, max(len(t) for t in lens.tokens + [t for row in labels for t in row]))
    fig, ax = plt.subplots(figsize=(2.5 + T * (0.15 + 0.09 * longest), 1.2 + 0.45 * L))
    image = ax.imshow(top1, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for layer, row in enumerate(labels):
        for pos, token in enumerate(row):
            p = float(top1[layer, pos])
            ax.text(pos, layer, f"{token[:6]}\n" + f"{p:.2f}".removeprefix("0"), ha="center", va="center", fontsize=7,
                    color="white" if p > 0.6 else "black")
    ax.set_xticks(range(T), lens.tokens, rotation=90 if longest > 2 else 0, fontsize=9)
    ax.set_yticks(range(L), lens.layers, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_title("Logit lens: top-1 next token per layer and its probability", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def inspect_lens(model: nn.Module, tokenizer: Tokenizer, prompt: str, out_dir: str | Path, top_k: int = 5) -> str:
    """What ``lmlab inspect lens`` does: lens.png and results.json/.md in ``out_dir`` (a folder being written:
    the caller's ``atomic_dir``); returns the terminal table."""
    lens = logit_lens(model, tokenizer, prompt, top_k)
    plot_lens(lens, tokenizer, Path(out_dir) / "lens.png")
    top = [[[{"token": t, "p": round(p, 4)} for t, p in zip(token_labels(tokenizer, ids.tolist()), probs.tolist())]
             for ids, probs in zip(layer_ids, layer_probs)] for layer_ids, layer_probs in zip(lens.ids, lens.probs)]
    results = {"prompt": prompt, "tokens": lens.tokens, "layers": lens.layers, "top_k": top}
    table = lens_table(lens, tokenizer)
    write_results(out_dir, results, f"# Logit lens\n\nPrompt: `{prompt}`\n\n![](lens.png)\n\n```\n{table}\n```\n")
    log.debug("wrote lens.png and results.json")
    return table

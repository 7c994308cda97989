"""Attention maps: what each head of each layer attends to, for one prompt.

    lmlab inspect attention CKPT --prompt "To be, or not to be" --out maps/

Every Transformer in lmlab attends through one module (models/layers.py ``Attention``, and the
encoder-decoder's ``CrossAttention``, both through ``sdpa``). Setting a module's ``recorded`` list
switches it to the written-out reference attention, which appends its weights (B, H, T, S) there;
``recorded_attention`` does that for a whole model, for one forward pass, and switches back.

The output folder holds one heat map per layer and head (``<module>.h<head>.png``: queries down, keys
across, token strings on both axes), ``index.html`` to browse them (a module and a head selector;
the images are relative links, no network), and results.json / results.md (what was drawn).

A recurrent model (family rnn, lstm, gru) has no attention: its report is the norm of each layer's
hidden state at each position (``state_norms.png``) instead.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import ConfigError, DataError
from lmlab.eval.report import write_results
from lmlab.models.heads import is_encoder_decoder
from lmlab.models.layers import Attention
from lmlab.models.rnn import RecurrentLM
from lmlab.models.seq2seq import CrossAttention

log = logging.getLogger(__name__)

RECURRENT = ("rnn", "lstm", "gru")


@dataclass
class AttentionMap:
    """The weights of one attention module for one prompt: ``weights`` (H, T, S), each row summing to 1,
    ``queries`` (T) and ``keys`` (S) the token strings they are drawn against."""

    name: str  # the module's name in the model, e.g. blocks.0.attn, decoder.1.cross
    weights: torch.Tensor
    queries: list[str]
    keys: list[str]

    @property
    def layer(self) -> int:
        """The layer's index: the first number in the module's name."""
        return next(int(part) for part in self.name.split(".") if part.isdigit())


def token_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Each token as a short readable string for a plot's axis: spaces as '·', newlines as '↵'."""
    labels = []
    for i in ids:
        text = tokenizer.decode([i]) or tokenizer.tk.id_to_token(i) or f"#{i}"
        labels.append(text.replace("\n", "↵").replace(" ", "·"))
    return labels


def encode_prompt(model: nn.Module, tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The token ids of ``prompt`` as the model reads it (an encoder's with its [CLS] ... [SEP] template);
    a DataError for an empty prompt or one longer than the model's context."""
    if not prompt or not prompt.strip():
        raise DataError("give a non-empty --prompt")
    ids = tokenizer.encode(prompt, add_special_tokens=model.config.family == "encoder")
    context = model.context_length
    if context is not None and len(ids) > context:
        raise DataError(f"the prompt is {len(ids)} tokens, longer than the model's context of {context}")
    return ids


@contextlib.contextmanager
def recorded_attention(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the block, every attention module of ``model`` computes its weights explicitly and appends
    them (B, H, T, S) to its list in the yielded {module name: list}; afterwards the fast path is back."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, (Attention, CrossAttention))}
    records: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    for name, module in modules.items():
        module.recorded = records[name]
    try:
        yield records
    finally:
        for module in modules.values():
            module.recorded = None


@torch.no_grad()
def attention_maps(model: nn.Module, tokenizer: Tokenizer, prompt: str,
                   target: str | None = None) -> list[AttentionMap]:
    """Every attention module's weights for ``prompt``, in the model's module order.

    Decoders, encoders and their classifiers read the prompt; an encoder-decoder reads it as the source
    and, with ``target``, decodes it too (start token, then the target's tokens): then the decoder's
    self- and cross-attention are drawn as well as the encoder's.
    """
    family = model.config.family
    if family == "word2vec":
        raise ConfigError("word vectors (word2vec) have no attention heads to draw; look at them with lmlab inspect "
                          "embeddings")
    if family in RECURRENT or family == "rnn_seq2seq":
        raise ConfigError(f"a {family} model has no attention heads to draw (lmlab inspect attention draws the "
                          f"hidden-state norms of a recurrent language model, not of a {family} model)")
    if target is not None and not is_encoder_decoder(model):
        raise ConfigError(f"--target is for encoder-decoders; a {family} model reads the prompt only")
    model.eval()
    device = next(model.parameters()).device
    ids = encode_prompt(model, tokenizer, prompt)
    source = token_labels(tokenizer, ids)
    idx = torch.tensor([ids], device=device)
    tgt = [tokenizer.eot_id] + tokenizer.encode(target) if target is not None else []  # the start token first
    if len(tgt) > model.config.block_size:
        raise DataError(f"the target is {len(tgt)} tokens with the start token, longer than the model's context "
                        f"of {model.config.block_size}; give a shorter --target")
    with recorded_attention(model) as records:
        if not is_encoder_decoder(model):
            model(idx)
        elif target is None:
            model.encode(idx)
        else:
            model(idx, torch.tensor([tgt], device=device))
    targets = token_labels(tokenizer, tgt)
    maps = []
    for name, weights in records.items():
        if not weights:
            continue
        in_decoder = name.startswith("decoder.")
        queries = targets if in_decoder else source
        keys = source if name.endswith(".cross") or not in_decoder else targets
        maps.append(AttentionMap(name, weights[0][0].float().cpu(), queries, keys))  # (H, T, S) of the one row
    return maps


def select_maps(maps: list[AttentionMap], layers: list[int] | None, heads: list[int] | None
                ) -> list[tuple[AttentionMap, list[int]]]:
    """The maps of ``layers`` (default: all) with the heads to draw of each (default: all of that map's);
    a ConfigError for a layer or head the model does not have. Maps may differ in heads (a warm-started
    encoder-decoder's encoder and decoder): a chosen head is drawn in the maps that have it."""
    n_layers = 1 + max(m.layer for m in maps)
    n_heads = max(m.weights.size(0) for m in maps)
    for what, chosen, count in (("layer", layers, n_layers), ("head", heads, n_heads)):
        bad = [i for i in chosen or [] if not 0 <= i < count]
        if bad:
            raise ConfigError(f"{what} {bad[0]} does not exist: the model has {count} {what}s (0..{count - 1})")
    chosen_maps = [m for m in maps if not layers or m.layer in layers]
    selected = [(m, [h for h in heads if h < m.weights.size(0)] if heads else list(range(m.weights.size(0))))
                for m in chosen_maps]
    return [(m, drawn) for m, drawn in selected if drawn]


def plot_attention(weights: torch.Tensor, queries: list[str], keys: list[str], title: str, path: Path) -> Path:
    """A PNG heat map of one head's weights (T, S): queries down the side, keys along the top, tokens
    as tick labels (readable up to ~60 tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T, S = weights.shape
    font = 9 if max(T, S) <= 45 else 7
    fig, ax = plt.subplots(figsize=(2.0 + 0.18 * S, 1.6 + 0.18 * T))
    image = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(S), keys, rotation=90 if max(map(len, keys)) > 2 else 0, fontsize=font)
    ax.set_yticks(range(T), queries, fontsize=font)
    ax.xaxis.tick_top()
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_attention_report(maps: list[AttentionMap], out_dir: str | Path, prompt: str,
                           layers: list[int] | None = None, heads: list[int] | None = None) -> list[Path]:
    """Write each chosen map's heads as PNGs, index.html to browse them and results.json/.md into ``out_dir``
    (a folder being written: the caller's ``atomic_dir``). Returns the PNGs written."""
    out_dir = Path(out_dir)
    pages, written = [], []
    for m, chosen in select_maps(maps, layers, heads):
        for h in chosen:
            title, path = f"{m.name}, head {h}", out_dir / f"{m.name}.h{h}.png"
            path = plot_attention(m.weights[h], m.queries, m.keys, title, path)
            written.append(path)
            pages.append({"module": m.name, "head": h, "file": path.name})
    (out_dir / "index.html").write_text(attention_page(prompt, pages), encoding="utf-8")
    results = {"prompt": prompt, "tokens": maps[0].keys if maps else [],
               "modules": sorted({p["module"] for p in pages}, key=[m.name for m in maps].index), "maps": pages}
    lines = [f"# Attention maps\n\nPrompt: `{prompt}`\n", "| module | head | map |", "|---|---|---|"]
    lines += [f"| {p['module']} | {p['head']} | ![]({p['file']}) |" for p in pages]
    write_results(out_dir, results, "\n".join(lines) + "\n")
    log.debug("drew %d attention maps", len(written))
    return written


def attention_page(prompt: str, pages: list[dict]) -> str:
    """One HTML page (inline script, no network) that shows one map at a time, picked by module and head."""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Attention maps</title>
<style>body{{font-family:sans-serif;margin:1.5em}} select{{font-size:1em;margin-right:1em}}
img{{max-width:100%;margin-top:1em}}</style>
</head><body>
<h2>Attention maps</h2>
<p>Prompt: <code>{html.escape(prompt)}</code></p>
<label>module <select id="module"></select></label>
<label>head <select id="head"></select></label>
<span>(keys: the arrow keys step through heads)</span>
<div><img id="map" alt="attention map"></div>
<script>
const maps = {json.dumps(pages)};
const modules = [...new Set(maps.map(m => m.module))];
const mod = document.getElementById("module"), head = document.getElementById("head");
const img = document.getElementById("map");
modules.forEach(m => mod.add(new Option(m, m)));
function heads() {{
  const keep = head.value; head.innerHTML = "";
  maps.filter(m => m.module === mod.value).forEach(m => head.add(new Option(m.head, m.head)));
  if ([...head.options].some(o => o.value === keep)) head.value = keep;
  show();
}}
function show() {{
  const m = maps.find(m => m.module === mod.value && String(m.head) === head.value);
  if (m) img.src = m.file;
}}
mod.onchange = heads; head.onchange = show;
document.onkeydown = e => {{
  const sel = {{ArrowRight: head, ArrowLeft: head, ArrowDown: mod, ArrowUp: mod}}[e.key];
  if (!sel || document.activeElement === sel) return;  // a focused select steps by itself
  const step = e.key === "ArrowRight" || e.key === "ArrowDown" ? 1 : -1;
  sel.selectedIndex = Math.max(0, Math.min(sel.options.length - 1, sel.selectedIndex + step));
  e.preventDefault(); sel === mod ? heads() : show();
}};
heads();
</script>
</body></html>
"""


# ---------------------------------------------------------------------------------------------------
# recurrent models: hidden-state norms instead of attention


@torch.no_grad()
def state_norms(model: RecurrentLM, ids: list[int]) -> torch.Tensor:
    """The L2 norm of each layer's hidden state (output) at each position, (n_layer, T).

    The fused recurrent layer returns only the last layer's outputs, so each layer runs on its own here,
    a one-layer copy of the fused layer's weights for it, on the previous layer's outputs.
    """
    rnn = model.rnn
    x = model.embed(torch.tensor([ids], device=model.embed.weight.device))  # (1, T, d_model)
    norms = []
    for k in range(rnn.num_layers):
        kwargs = {"nonlinearity": rnn.nonlinearity} if rnn.mode.startswith("RNN") else {}
        layer = type(rnn)(x.size(-1), rnn.hidden_size, 1, bias=rnn.bias, batch_first=True, **kwargs).to(x.device)
        layer.load_state_dict({f"{name}_l0": getattr(rnn, f"{name}_l{k}")
                               for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")[:4 if rnn.bias else 2]})
        x, _ = layer(x)  # (1, T, hidden)
        norms.append(x[0].norm(dim=-1))
    return torch.stack(norms).float().cpu()


def plot_state_norms(norms: torch.Tensor, tokens: list[str], path: Path) -> Path:
    """A PNG of each layer's hidden-state norm (n_layer, T) against position, tokens on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = norms.size(1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.18 * T), 4))
    for k, row in enumerate(norms):
        ax.plot(range(T), row.numpy(), "o-", markersize=3, label=f"layer {k}")
    ax.set_xticks(range(T), tokens, rotation=90, fontsize=8 if T <= 40 else 6)
    ax.set(ylabel="hidden-state L2 norm", title="Recurrent hidden-state norm per position")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_state_norm_report(model: RecurrentLM, tokenizer: Tokenizer, prompt: str, out_dir: str | Path) -> Path:
    """state_norms.png and results.json/.md of a recurrent model for ``prompt`` into ``out_dir``."""
    model.eval()
    ids = encode_prompt(model, tokenizer, prompt)
    tokens = token_labels(tokenizer, ids)
    norms = state_norms(model, ids)
    path = plot_state_norms(norms, tokens, Path(out_dir) / "state_norms.png")
    results = {"prompt": prompt, "tokens": tokens, "state_norms": [[round(float(v), 4) for v in row] for row in norms]}
    write_results(out_dir, results, f"# Hidden-state norms\n\nPrompt: `{prompt}`\n\n![](state_norms.png)\n")
    log.info("a %s model has no attention: drawing its hidden-state norms instead", model.config.family)
    return path


def inspect_attention(model: nn.Module, tokenizer: Tokenizer, prompt: str, out_dir: str | Path,
                      layers: list[int] | None = None, heads: list[int] | None = None,
                      target: str | None = None) -> Path:
    """What ``lmlab inspect attention`` writes into ``out_dir``: the attention report of a Transformer
    (decoder, encoder, classifier, encoder-decoder with ``target``), or the hidden-state norms of a
    recurrent language model. Returns the file to open: index.html, or state_norms.png."""
    backbone = getattr(model, "backbone", model)  # a classifier's or masked LM's attention is its backbone's
    if isinstance(backbone, RecurrentLM):
        return write_state_norm_report(backbone, tokenizer, prompt, out_dir)
    maps = attention_maps(model, tokenizer, prompt, target)
    write_attention_report(maps, out_dir, prompt, layers, heads)
    return Path(out_dir) / "index.html"

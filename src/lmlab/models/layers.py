"""Building blocks shared by every Transformer in lmlab: norms, RoPE, attention, MLPs, KV cache.

There is one attention (``Attention``): multi-head or grouped-query, learned or rotary
positions, with or without a KV cache, through ``F.scaled_dot_product_attention``, except when its
``recorded`` list is set (inspection: ``lmlab inspect attention``): then the same attention is written
out (``reference_attention``) and its weights are appended to that list.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# enable_gqa arrived in torch 2.5; with older torch we repeat the key/value heads ourselves.
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): x / rms(x) * weight, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(kind: str, dim: int, bias: bool, eps: float) -> nn.Module:
    """The normalisation layer a preset asks for: ``rmsnorm``, else ``layernorm`` (model.norm's choices)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)


def rope_tables(head_dim: int, max_len: int, theta: float, scaling: str | None = None, factor: float = 1.0,
                low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                original_context: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of rotary position embedding, each (max_len, head_dim // 2).

    ``scaling`` stretches the rotations for contexts longer than pretraining: ``linear`` divides
    every frequency by ``factor`` (position interpolation); ``llama3`` divides only the low
    frequencies (wavelengths longer than original_context / low_freq_factor), keeps the high ones
    (shorter than original_context / high_freq_factor), and blends smoothly in between. ``None``
    leaves them as they are (model.rope_scaling's choices are checked when the config loads).
    """
    inv_freq = rope_frequencies(head_dim, theta, scaling, factor, low_freq_factor, high_freq_factor, original_context)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def register_rope_tables(module: nn.Module, cfg) -> None:
    """Give ``module`` the rotary tables its attention reads, ``rope_cos`` and ``rope_sin`` (block_size,
    head_dim // 2), for ModelConfig ``cfg`` (its theta and, for decoders, its scaling). They are
    buffers (they follow .to(device)) but not saved: they are computed from the config."""
    cos, sin = rope_tables(cfg.d_model // cfg.n_head, cfg.block_size, cfg.rope_theta, cfg.rope_scaling,
                           cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                           cfg.rope_original_context or cfg.block_size)
    module.register_buffer("rope_cos", cos, persistent=False)
    module.register_buffer("rope_sin", sin, persistent=False)


def rope_frequencies(head_dim: int, theta: float, scaling: str | None = None, factor: float = 1.0,
                     low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     original_context: int | None = None) -> torch.Tensor:
    """The rotation speed of each pair of a head's dimensions, (head_dim // 2,), scaled as ``rope_tables``
    describes: what the tables are made of, and what an export that stores the scaling needs."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling == "linear":
        inv_freq = inv_freq / factor
    elif scaling == "llama3":
        wavelen = 2 * math.pi / inv_freq
        blend = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blend = blend.clamp(0.0, 1.0)  # 0 for long wavelengths (fully divided), 1 for short (kept)
        inv_freq = (1 - blend) * inv_freq / factor + blend * inv_freq
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + d/2]) of x (B, H, T, d) by the angles for its positions.

    This is the "rotate half" layout that Hugging Face Llama uses, so weights convert as they are.
    """
    x1, x2 = x.chunk(2, dim=-1)  # each (B, H, T, d/2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (T, d/2), broadcast over B, H
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache:
    """Preallocated keys and values of every layer for incremental decoding.

    ``k`` and ``v`` are (n_layer, B, n_kv_head, max_len, head_dim); ``pos`` is how many positions
    are filled. The model writes the new keys/values of each step at ``pos`` and then advances it.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        # uninitialised: a position is always written before it is read (reads stop at pos)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self._split_layers()
        self.max_len = max_len
        self.pos = 0

    def _split_layers(self) -> None:
        """Each layer's (B, n_kv, max_len, d) views of k and v, made once per new k and v rather than
        indexed out at every layer of every decoding step."""
        # one select per layer, not unbind: its views may not be written in place when grad mode is on
        self.layer_k, self.layer_v = [self.k[i] for i in range(len(self.k))], [self.v[i] for i in range(len(self.v))]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, d) at the current position; return all keys/values so far."""
        T, end = k.size(2), self.pos + k.size(2)
        keys, values = self.layer_k[layer], self.layer_v[layer]  # (B, n_kv, max_len, d) views
        keys.narrow(2, self.pos, T).copy_(k)  # narrow + copy_: fewer ops per decoding step than slice assignment
        values.narrow(2, self.pos, T).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def select(self, rows: torch.Tensor) -> None:
        """Keep the sequences at these batch indices, in this order (repeats allowed: beam search)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self._split_layers()

    def compact(self, rows: torch.Tensor, start: int, max_len: int) -> None:
        """Keep the sequences at these batch indices and drop the first ``start`` positions (padding that
        none of them needs): positions ``start:pos`` move to the front, in a cache of ``max_len``."""
        kept = self.pos - start
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty(old.size(0), len(rows), old.size(2), max_len, old.size(4))  # (L, b, n_kv, max_len, d)
            new.narrow(3, 0, kept).copy_(old[:, rows, :, start:self.pos])
            setattr(self, name, new)
        self._split_layers()
        self.max_len, self.pos = max_len, kept

    def join(self, other: "KVCache", max_len: int) -> "KVCache":
        """A cache of ``max_len`` positions holding this cache's sequences, then ``other``'s, both
        right-aligned at the longer one's length. The slots before a shorter group's keys are zeros
        (padding, masked out by the caller; zeros, not garbage, so they cannot carry NaN into the
        attention's weighted sum)."""
        n_layer, _, n_kv, _, d = self.k.shape
        pos = max(self.pos, other.pos)
        out = KVCache(n_layer, self.k.size(1) + other.k.size(1), n_kv, max_len, d, self.k.device, self.k.dtype)
        rows = 0
        for part in (self, other):
            b = part.k.size(1)
            for mine, theirs in ((out.k, part.k), (out.v, part.v)):
                mine[:, rows:rows + b, :, :pos - part.pos].zero_()
                mine[:, rows:rows + b, :, pos - part.pos:pos] = theirs[:, :, :, :part.pos]
            rows += b
        out.pos = pos
        return out


class Attention(nn.Module):
    """Self-attention: multi-head, or grouped-query when n_kv_head < n_head; causal (decoders) or not (encoders).

    ``key_mask`` (B, S) marks the keys that may be attended to (False for padding). ``n_head`` divides
    ``d_model`` and ``n_kv_head`` divides ``n_head``: the config's rules (model.d_model, model.n_kv_head).
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, bias: bool, dropout: float, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = d_model // n_head
        self.qkv = nn.Linear(d_model, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout
        self.recorded: list[torch.Tensor] | None = None  # a list: each forward appends its weights (B, H, T, S)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x)  # (B, T, (H + 2 * H_kv) * d) -> (B, H + 2 * H_kv, T, d): one token needs no transpose
        qkv = qkv.view(B, -1, 1, self.head_dim) if T == 1 else qkv.view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)  # (B, H, T, d), (B, H_kv, T, d) x2
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(layer, k, v)  # (B, H_kv, past + T, d)
        y = self._attend(q, k, v, past, key_mask)  # (B, H, T, d)
        y = y.reshape(B, T, C) if T == 1 else y.transpose(1, 2).reshape(B, T, C)  # one token: a view again
        return self.proj(y)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        """Scaled dot-product attention; if causal, query i (at position past+i) sees keys 0..past+i."""
        T = q.size(2)
        mask, causal = None, False
        if self.causal and key_mask is None:
            if past == 0:
                causal = T > 1  # SDPA's own causal mask: the fast path
            elif T > 1:  # several new tokens after a cached prefix: causal within the new block
                mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
        elif key_mask is not None:
            mask = key_mask[:, None, None, :]  # (B, 1, 1, S): broadcast over heads and queries
            if self.causal and T > 1:
                query_pos = torch.arange(past, past + T, device=q.device)[:, None]  # (T, 1)
                key_pos = torch.arange(past + T, device=q.device)  # (S,)
                # causal, and every query sees at least itself: a padding query with no visible key
                # would give NaN, which would then leak into real tokens through the values
                mask = (mask & (key_pos <= query_pos)) | (key_pos == query_pos)  # (B, 1, T, S)
        return sdpa(q, k, v, mask, causal, self.dropout if self.training else 0.0, self.recorded)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         is_causal: bool = False, dropout: float = 0.0, record: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` of q (B, H, T, d) over k, v (B, H_kv, S, d), grouped-query
    when H_kv < H (key/value heads repeated by hand on a torch without ``enable_gqa``).

    With ``record`` (a list), the attention is computed by ``reference_attention`` instead and its
    weights (B, H, T, S) are appended to ``record``: slower, for inspection only.
    """
    if record is not None:
        y, weights = reference_attention(q, k, v, mask, is_causal, dropout)
        record.append(weights.detach())
        return y
    gqa = {}
    if k.size(1) != q.size(1):
        if _SDPA_HAS_GQA:
            gqa = {"enable_gqa": True}
        else:
            repeat = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout, **gqa)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                        is_causal: bool = False, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d) + mask) @ v written out, with the same arguments as ``sdpa``: the output
    (B, H, T, d) and the attention weights (B, H, T, S) that the fused kernel never shows.

    ``mask`` is boolean (True: may attend), broadcast to (B, H, T, S); ``is_causal`` lets query i see
    keys 0..i (S == T). The weights are those before dropout (what the model attends to).
    """
    if k.size(1) != q.size(1):
        repeat = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # (B, H, S, d)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.size(-1))  # (B, H, T, S)
    if is_causal:
        mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()  # (T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1).to(q.dtype)  # (B, H, T, S): each query's weights sum to 1
    dropped = F.dropout(weights, dropout) if dropout else weights
    return dropped @ v, weights


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (tanh approximation: GPT-2), exact GELU (BERT) or SwiGLU (Llama)."""

    def __init__(self, d_model: int, d_ff: int, kind: str, bias: bool):
        super().__init__()
        self.kind = kind  # gelu | gelu_exact | swiglu (model.mlp's choices)
        # swiglu: gate and up projections, fused
        self.up = nn.Linear(d_model, 2 * d_ff if kind == "swiglu" else d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gelu":
            return self.down(F.gelu(self.up(x), approximate="tanh"))
        if self.kind == "gelu_exact":
            return self.down(F.gelu(self.up(x)))
        gate, up = self.up(x).chunk(2, dim=-1)  # each (B, T, d_ff)
        return self.down(F.silu(gate) * up)


def fill_from_preset(cfg, presets: dict[str, dict], default: str):
    """``cfg`` (a ModelConfig) with its preset named (``default`` if None) and the fields it left as None
    filled from that preset, n_kv_head (= n_head) and d_ff (the MLP's customary width): explicit and complete.

    The preset is one of the family's (the config checks that: model.preset).
    """
    cfg = dataclasses.replace(cfg, preset=cfg.preset or default)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in presets[cfg.preset].items() if getattr(cfg, k) is None})
    if cfg.n_kv_head is None:
        cfg = dataclasses.replace(cfg, n_kv_head=cfg.n_head)
    if cfg.d_ff is None:
        cfg = dataclasses.replace(cfg, d_ff=default_d_ff(cfg.d_model, cfg.mlp))
    return cfg


def default_d_ff(d_model: int, mlp: str) -> int:
    """The customary MLP width: 4*d for GELU; 2/3 of that for SwiGLU, rounded up to a multiple of 64."""
    if mlp in ("gelu", "gelu_exact"):
        return 4 * d_model
    return 64 * math.ceil(int(8 * d_model / 3) / 64)


@torch.no_grad()
def grow_embedding(emb: nn.Embedding, rows: int) -> nn.Embedding:
    """A copy of ``emb`` with ``rows`` rows: old rows kept, new ones drawn around the old rows' mean.

    (Mean plus noise of the old rows' spread: new tokens start as plausible, distinct tokens.)
    """
    new = nn.Embedding(rows, emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype)
    n = min(rows, emb.num_embeddings)
    new.weight[:n] = emb.weight[:n]
    old = emb.weight.float()
    fresh = old.mean(0) + torch.randn(rows - n, emb.embedding_dim, device=old.device) * old.std(0)
    new.weight[n:] = fresh.to(new.weight.dtype)
    return new


@torch.no_grad()
def grow_linear_rows(linear: nn.Linear, rows: int) -> nn.Linear:
    """A copy of ``linear`` with ``rows`` outputs: old rows kept, new rows (and biases) set to the old mean."""
    new = nn.Linear(linear.in_features, rows, bias=linear.bias is not None, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    n = min(rows, linear.out_features)
    new.weight[:n] = linear.weight[:n]
    new.weight[n:] = linear.weight.mean(0)
    if linear.bias is not None:
        new.bias[:n] = linear.bias[:n]
        new.bias[n:] = linear.bias.mean()
    return new

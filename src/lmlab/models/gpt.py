"""Decoder-only Transformer language model with two presets.

- ``gpt2``: learned positions, LayerNorm, GELU MLP, biases, tied input/output embedding
  (the output layer is softmax(h @ E^T) with E the token embedding).
- ``llama``: rotary positions (RoPE), RMSNorm, SwiGLU MLP, grouped-query attention, no biases.

The model knows nothing about training: ``model(idx, targets)`` returns logits and the mean
cross-entropy; ``model.make_cache(...)`` and ``model(idx, cache=cache)`` decode incrementally.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.models.interface import IGNORE_INDEX, count_parameters
from lmlab.models.layers import (MLP, Attention, KVCache, fill_from_preset, grow_embedding, grow_linear_rows, make_norm,
                                 register_rope_tables)

PRESETS = {
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    "llama": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
}


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """Fill the fields left as None from the preset (gpt2 unless named), so a saved config is explicit."""
    return fill_from_preset(cfg, PRESETS, default="gpt2")


class Block(nn.Module):
    """One pre-norm Transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.bias, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.bias, cfg.dropout)
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.bias, cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.mlp, cfg.bias)
        self.dropout = cfg.dropout  # on what each sublayer adds to the residual stream

    def forward(self, x, rope=None, cache=None, layer=0, key_mask=None):
        x = x + self._drop(self.attn(self.norm1(x), rope, cache, layer, key_mask))
        return x + self._drop(self.mlp(self.norm2(x)))

    def _drop(self, y: torch.Tensor) -> torch.Tensor:
        # skipped outright when dropout is 0 (the usual case): the calls alone cost ~4% of a decoding step
        return F.dropout(y, self.dropout, self.training) if self.dropout else y


class GPT(nn.Module):
    """Decoder-only Transformer LM (see the module docstring for the two presets)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = resolve_config(cfg)
        assert cfg.vocab_size, "vocab_size must be set (it comes from the tokenizer)"
        self.config = cfg
        self.context_length = cfg.block_size
        self.hidden_size = cfg.d_model  # width of features(), for task heads
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos_emb == "learned" else None
        # True: learned positions are looked up per row (B, T), not sliced once (T, C), so that hooks on
        # pos_emb see every row (per-example gradients, train.dp); same values, more work
        self.row_positions = False
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg.norm, cfg.d_model, cfg.bias, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos_emb == "rope":
            register_rope_tables(self, cfg)
        self.apply(self._init_weights)
        # GPT-2: scale the init of layers that write into the residual stream by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def make_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` tokens (default: the context).

        Left-padded batches may need more than the context: padding takes cache slots, not positions.
        """
        cfg, p = self.config, self.tok_emb.weight
        max_len = max_len or cfg.block_size
        return KVCache(cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.d_model // cfg.n_head, p.device, p.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                only_last: bool = False, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) for token ids idx (B, T), and the mean cross-entropy if targets are given.

        With ``cache``, idx holds the next tokens after the cached ones and the cache advances.
        Targets equal to IGNORE_INDEX (-100) are ignored. ``only_last`` computes logits for the last position only.
        ``attention_mask`` marks real tokens when rows are padded (see ``features``).
        """
        x = self.features(idx, attention_mask, cache)  # (B, T, C)
        if only_last and x.size(1) > 1:
            x = x[:, -1:]
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    def features(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C) of idx (B, T): what the LM head and task heads read.

        ``attention_mask`` is 1 for real tokens and 0 for padding, over every key: (B, T), or
        (B, cached + T) with a cache. Padding may be on either side: a row's positions count only its
        real tokens, and no token attends to padding. (Batched generation pads prompts on the left.)
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        key_mask = positions = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_mask = attention_mask.bool()  # (B, start + T)
            positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T): real tokens before, per row
        length = start + T if positions is None else int(positions[:, -1].max()) + 1
        if length > self.context_length:
            raise ValueError(f"sequence of {length} tokens exceeds the context of {self.context_length}")
        x = self.tok_emb(idx)  # (B, T, C)
        rope = None
        if self.pos_emb is not None:
            # (T, C) rows of positions start..start+T-1, or (B, T, C) with per-row positions
            rows = positions
            if rows is None and self.row_positions:
                rows = torch.arange(start, start + T, device=idx.device).expand(idx.size(0), T)  # (B, T)
            x = x + (self.pos_emb.weight[start:start + T] if rows is None else self.pos_emb(rows))
        elif positions is None:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])  # each (T, d/2)
        else:
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])  # each (B, 1, T, d/2)
        if self.training and self.drop.p:  # skipped otherwise: a module call per decoding step for nothing
            x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i, key_mask)
        if cache is not None:
            cache.pos += T
        return self.norm_f(x)

    def resize_vocab(self, vocab_size: int) -> None:
        """Grow the token embedding (and output layer) to ``vocab_size`` rows, e.g. for new special tokens.

        Existing rows are kept; new rows start at the mean of the old ones, so new tokens begin as an
        "average" token rather than noise.
        """
        self.tok_emb = grow_embedding(self.tok_emb, vocab_size)
        if self.config.tie_embeddings:
            self.lm_head = nn.Linear(self.config.d_model, vocab_size, bias=False, device=self.tok_emb.weight.device)
            self.lm_head.weight = self.tok_emb.weight
        else:
            self.lm_head = grow_linear_rows(self.lm_head, vocab_size)
        self.config = dataclasses.replace(self.config, vocab_size=vocab_size)

    def flops_per_token(self) -> float:
        """Approximate training FLOPs per token, for the MFU estimate: 6N for the weights (forward and
        backward) plus 12 * n_layer * d_model * block_size for attention (PaLM, appendix B; nanoGPT).

        N is ``count_parameters`` less the learned position table, a lookup that does no multiply-adds
        (the token embedding stays in, as in nanoGPT: tied, it is also the output layer).
        """
        cfg = self.config
        _, n = count_parameters(self)
        if self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.d_model * cfg.block_size

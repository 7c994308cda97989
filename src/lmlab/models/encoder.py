"""BERT-style bidirectional Transformer encoder (``model.family: encoder``, preset ``bert``).

token + position + token-type embeddings -> LayerNorm -> N post-norm layers (x = norm(x + attn(x)),
then x = norm(x + mlp(x)), exact GELU) -> hidden states (B, T, d); a pooler (dense + tanh on the
first token, [CLS]) for sentence-level tasks. This is the layout of Hugging Face ``BertModel``, so
its checkpoints (all-MiniLM-L6-v2, bert-base, ...) convert weight for weight (see interop/hf.py).

Attention is the same module the decoders use, with ``causal=False`` and a key mask for padding.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmlab.config import ModelConfig
from lmlab.models.layers import MLP, Attention, fill_from_preset

PRESETS = {
    "bert": dict(pos_emb="learned", norm="layernorm", mlp="gelu_exact", bias=True, tie_embeddings=False,
                 type_vocab_size=2),
}


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """Fill the fields left as None from the preset (bert), so a saved config is explicit.

    The encoder has LayerNorm and learned positions whatever ``norm`` and ``pos_emb`` say; the config
    refuses any other value for family encoder.
    """
    return fill_from_preset(cfg, PRESETS, default="bert")


class EncoderLayer(nn.Module):
    """One post-norm layer (BERT): x = norm1(x + attn(x)); x = norm2(x + mlp(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.bias, cfg.dropout, causal=False)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.mlp, cfg.bias)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x, key_mask=key_mask)))
        return self.norm2(x + self.drop(self.mlp(x)))


class Encoder(nn.Module):
    """Bidirectional Transformer encoder (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = resolve_config(cfg)
        assert cfg.vocab_size, "vocab_size must be set (it comes from the tokenizer)"
        self.config = cfg
        self.context_length = cfg.block_size
        self.hidden_size = cfg.d_model  # width of features(), for task heads
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.norm_emb = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layer))
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def flops_per_token(self) -> float:
        """Approximate training FLOPs per token, for the MFU estimate: 6N for the weights of the layers
        (forward and backward) plus 12 * n_layer * d_model * block_size for attention (PaLM, appendix B),
        as for the GPT (models/gpt.py).

        N leaves out the embedding tables (token, position, type: lookups, with no output layer to tie
        to) and the pooler, which runs once per sequence, not per token.
        """
        cfg = self.config
        tables = [self.tok_emb, self.pos_emb, self.type_emb, self.pooler]
        skipped = {id(p) for m in tables if m is not None for p in m.parameters()}
        n = sum(p.numel() for p in self.parameters() if id(p) not in skipped)
        return 6 * n + 12 * cfg.n_layer * cfg.d_model * cfg.block_size

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, d) of token ids idx (B, T); attention_mask (B, T) is 1 for real tokens."""
        B, T = idx.shape
        if T > self.context_length:
            raise ValueError(f"sequence of {T} tokens exceeds the context of {self.context_length}")
        x = self.tok_emb(idx) + self.pos_emb.weight[:T]  # (B, T, d)
        if self.type_emb is not None:  # segment A = 0 unless told otherwise
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(idx)
            x = x + self.type_emb(types)
        x = self.drop(self.norm_emb(x))
        key_mask = attention_mask.bool() if attention_mask is not None else None  # (B, T)
        for layer in self.layers:
            x = layer(x, key_mask)
        return x

    def features(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, d): the common interface of task heads (see models/heads.py)."""
        return self(idx, attention_mask)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooled output: tanh(dense(h of the first token)), (B, d)."""
        return torch.tanh(self.pooler(hidden[:, 0]))

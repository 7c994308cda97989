"""BERT-style bidirectional Transformer encoder (``model.family: encoder``, preset ``bert``).

token + position + token-type embeddings -> LayerNorm -> N post-norm layers (x = norm(x + attn(x)),
then x = norm(x + mlp(x)), exact GELU) -> hidden states (B, T, d); a pooler (dense + tanh on the
first token, [CLS]) for sentence-level tasks. This is the layout of Hugging Face ``BertModel``, so
its checkpoints (all-MiniLM-L6-v2, bert-base, ...) convert weight for weight (see interop/hf.py).
``model.pre_norm: true`` swaps in pre-norm layers and a final LayerNorm (faster out of the masked-LM
plateau in short pretraining; such an encoder has no BertModel counterpart and does not export).

Attention is the same module the decoders use, with ``causal=False`` and a key mask for padding.

``MaskedLM`` puts BERT's masked-language-model head on an encoder (pretraining: train/mlm.py). Its
weights are named after Hugging Face ``BertForMaskedLM``'s, one to one: ``backbone.*`` is ``bert.*``
(BertForMaskedLM has no pooler), ``head.dense`` / ``head.norm`` / ``head.bias`` are
``cls.predictions.transform.dense`` / ``.transform.LayerNorm`` / ``cls.predictions.bias``, and the
decoder is the token embedding, as in BERT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.models.gpt import Block
from lmlab.models.interface import IGNORE_INDEX
from lmlab.models.layers import MLP, Attention, fill_from_preset, rope_tables

PRESETS = {
    "bert": dict(pos_emb="learned", norm="layernorm", mlp="gelu_exact", bias=True, tie_embeddings=False,
                 type_vocab_size=2, pre_norm=False),
}


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """Fill the fields left as None from the preset (bert), so a saved config is explicit.

    The encoder has LayerNorm whatever ``norm`` says, and learned positions unless ``pre_norm`` layers
    ask for rotary ones (``pos_emb: rope``); the config refuses any other value for family encoder.
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

    def forward(self, x: torch.Tensor, rope: None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Called as an EncoderBlock is; ``rope`` is always None (these layers come with learned positions)."""
        x = self.norm1(x + self.drop(self.attn(x, key_mask=key_mask)))
        return self.norm2(x + self.drop(self.mlp(x)))


class EncoderBlock(Block):
    """A pre-norm GPT block whose attention sees every position (not causal): x + attn(norm(x)), then
    x + mlp(norm(x)). The encoder's layer with ``model.pre_norm`` (the residual stream is never
    normalised, which keeps gradients large early in training; the encoder then adds a final norm), and
    an encoder-decoder's encoder block (models/seq2seq.py)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.attn.causal = False


class Encoder(nn.Module):
    """Bidirectional Transformer encoder (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, pooler: bool = True):
        """``pooler=False`` leaves the pooler out (an encoder-decoder's encoder reads every position)."""
        super().__init__()
        cfg = resolve_config(cfg)
        assert cfg.vocab_size, "vocab_size must be set (it comes from the tokenizer)"
        self.config = cfg
        self.context_length = cfg.block_size
        self.hidden_size = cfg.d_model  # width of features(), for task heads
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos_emb == "learned" else None
        if cfg.pos_emb == "rope":  # rotary positions (pre-norm layers only): relative offsets from the first step
            cos, sin = rope_tables(cfg.d_model // cfg.n_head, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.row_positions = False  # True: positions looked up per row, which per-example gradients (train.dp) see
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.norm_emb = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList((EncoderBlock if cfg.pre_norm else EncoderLayer)(cfg) for _ in range(cfg.n_layer))
        self.norm_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.pre_norm else None  # pre-norm's last norm
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model) if pooler else None
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
        tables = [self.tok_emb, self.pos_emb, self.type_emb, self.pooler]  # pos_emb None with rope
        skipped = {id(p) for m in tables if m is not None for p in m.parameters()}
        n = sum(p.numel() for p in self.parameters() if id(p) not in skipped)
        return 6 * n + 12 * cfg.n_layer * cfg.d_model * cfg.block_size

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, d) of token ids idx (B, T); attention_mask (B, T) is 1 for real tokens."""
        B, T = idx.shape
        if T > self.context_length:
            raise ValueError(f"sequence of {T} tokens exceeds the context of {self.context_length}")
        x = self.tok_emb(idx)  # (B, T, d)
        rope = None
        if self.pos_emb is None:
            rope = (self.rope_cos[:T], self.rope_sin[:T])  # each (T, head_dim / 2)
        elif self.row_positions:
            x = x + self.pos_emb(torch.arange(T, device=idx.device).expand(B, T))
        else:
            x = x + self.pos_emb.weight[:T]
        if self.type_emb is not None:  # segment A = 0 unless told otherwise
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(idx)
            x = x + self.type_emb(types)
        x = self.drop(self.norm_emb(x))
        key_mask = attention_mask.bool() if attention_mask is not None else None  # (B, T)
        for layer in self.layers:
            x = layer(x, rope, key_mask=key_mask)
        return self.norm_f(x) if self.norm_f is not None else x

    def features(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, d): the common interface of task heads (see models/heads.py)."""
        return self(idx, attention_mask)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooled output: tanh(dense(h of the first token)), (B, d)."""
        return torch.tanh(self.pooler(hidden[:, 0]))


@dataclass
class MaskedLMConfig:
    """What a masked-LM head records in a checkpoint manifest's ``head`` entry: that it is one."""

    kind: str = "mlm"


class MaskedLMHead(nn.Module):
    """BERT's MLM head: dense + GELU + LayerNorm, then logits over the vocabulary through the token
    embedding (the decoder weight, tied) plus a bias of its own."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.approximate = "tanh" if cfg.mlp == "gelu" else "none"  # the encoder's own GELU
        nn.init.normal_(self.dense.weight, std=cfg.init_std)
        nn.init.zeros_(self.dense.bias)

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab) of hidden states (..., d); ``embedding`` is the (vocab, d) token embedding."""
        h = self.norm(F.gelu(self.dense(hidden), approximate=self.approximate))
        return F.linear(h, embedding, self.bias)


class MaskedLM(nn.Module):
    """An encoder with BERT's masked-language-model head: it predicts the original token at the positions
    that targets mark (the others are IGNORE_INDEX)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        if not isinstance(backbone, Encoder):
            raise ValueError(f"a masked-LM head needs an encoder, not a {backbone.config.family} model")
        self.backbone = backbone
        self.config = backbone.config  # the encoder's ModelConfig (what checkpoints record)
        self.head_config = MaskedLMConfig()
        self.context_length = backbone.context_length
        self.head = MaskedLMHead(backbone.config)
        self.scored_fraction = 0.15  # share of tokens the head decodes in training (the task sets it), for MFU

    def flops_per_token(self) -> float:
        """Approximate training FLOPs per token, for the MFU estimate: the encoder's, plus 6 per weight of
        the head (dense and the tied decoder) for the share of tokens it decodes (only the masked ones)."""
        cfg = self.config
        head = cfg.d_model * cfg.d_model + cfg.d_model * cfg.vocab_size
        return self.backbone.flops_per_token() + 6 * head * self.scored_fraction

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) of token ids idx (B, T); with targets (B, T), the logits (N, vocab) of the N
        scored positions only (targets != IGNORE_INDEX, in row-major order: the head skips the rest) and
        their mean cross-entropy (0 where none is scored, so that a micro-batch without any adds nothing)."""
        hidden = self.backbone(idx, attention_mask)  # (B, T, d)
        embedding = self.backbone.tok_emb.weight
        if targets is None:
            return self.head(hidden, embedding), None
        scored = targets != IGNORE_INDEX  # (B, T)
        logits = self.head(hidden[scored], embedding)  # (N, vocab)
        total = F.cross_entropy(logits.float(), targets[scored], reduction="sum")
        return logits, total / max(logits.size(0), 1)  # a batch without scored positions has loss 0, not NaN

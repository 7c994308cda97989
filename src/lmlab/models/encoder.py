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

``ReplacedTokenDetector`` is ELECTRA's pretraining instead (``mlm.objective: electra``): a small generator
under an MLM head fills in the masked tokens, and the encoder learns to spot which tokens were replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.models.gpt import Block
from lmlab.models.interface import IGNORE_INDEX
from lmlab.models.layers import MLP, Attention, fill_from_preset, register_rope_tables

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
            register_rope_tables(self, cfg)
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


@dataclass
class ReplacedTokenConfig:
    """What an ELECTRA pretrainer records in a checkpoint manifest's ``head`` entry: the generator's depth
    and the weight of the discriminator's loss (``mlm.objective: electra``)."""

    kind: str = "electra"
    generator_layers: int = 1
    disc_weight: float = 50.0


class ReplacedTokenDetector(nn.Module):
    """ELECTRA (Clark et al., 2020): a small masked-LM generator fills in the masked positions with tokens
    it samples, and the encoder, the discriminator, learns to tell for every token whether it is the
    original or a replacement. The discriminator learns from all tokens of a window, not only the 15%
    masked, which the paper found more sample-efficient than masked-LM pretraining (in lmlab's 20-minute
    WikiText-2 recipe it was not: docs/finetuning.md); it is the encoder that fine-tuning keeps
    (``backbone``, as for ``MaskedLM``).

    The generator is an encoder of the same width with ``generator_layers`` layers under a BERT MLM head;
    it shares the discriminator's token (and learned position) embeddings, as in ELECTRA. Loss: the
    generator's masked-LM cross-entropy + disc_weight x the discriminator's binary cross-entropy over the
    real tokens. The sampled tokens carry no gradient back to the generator (ELECTRA's choice).
    """

    def __init__(self, backbone: nn.Module, head_config: ReplacedTokenConfig | None = None):
        super().__init__()
        if not isinstance(backbone, Encoder):
            raise ValueError(f"replaced-token detection needs an encoder, not a {backbone.config.family} model")
        self.head_config = head_config or ReplacedTokenConfig()
        if self.head_config.generator_layers < 1:
            raise ValueError(f"generator_layers must be at least 1, got {self.head_config.generator_layers}")
        self.backbone = backbone  # the discriminator
        self.config = backbone.config
        self.context_length = backbone.context_length
        cfg = backbone.config
        generator = Encoder(replace(cfg, n_layer=self.head_config.generator_layers), pooler=False)
        generator.tok_emb.weight = backbone.tok_emb.weight  # shared embeddings (ELECTRA)
        if generator.pos_emb is not None:
            generator.pos_emb.weight = backbone.pos_emb.weight
        self.generator = MaskedLM(generator)
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)  # ELECTRA's discriminator head: dense, GELU, dense -> 1
        self.classifier = nn.Linear(cfg.d_model, 1)
        for layer in (self.dense, self.classifier):
            nn.init.normal_(layer.weight, std=cfg.init_std)
            nn.init.zeros_(layer.bias)

    @property
    def scored_fraction(self) -> float:
        """Share of tokens the generator's head decodes (the task sets it), for the MFU estimate."""
        return self.generator.scored_fraction

    @scored_fraction.setter
    def scored_fraction(self, value: float) -> None:
        self.generator.scored_fraction = value

    def flops_per_token(self) -> float:
        """Approximate training FLOPs per token, for the MFU estimate: the discriminator's and its head's on
        every token, plus the generator's (its MLM head on the masked share only)."""
        d = self.config.d_model
        return self.backbone.flops_per_token() + 6 * (d * d + d) + self.generator.flops_per_token()

    def detect(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The discriminator's logits (B, T) that each token of idx (B, T) is a replacement."""
        hidden = self.backbone(idx, attention_mask)  # (B, T, d)
        approximate = "tanh" if self.config.mlp == "gelu" else "none"
        return self.classifier(F.gelu(self.dense(hidden), approximate=approximate)).squeeze(-1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """With targets (B, T) (the original token where a position was chosen, else IGNORE_INDEX): the
        generator's masked-LM loss on idx, its samples (argmax in eval mode) put in place of the chosen
        tokens, and the discriminator's logits (B, T) on that text with the combined loss. Without targets:
        the discriminator's logits on idx as it is."""
        if targets is None:
            return self.detect(idx, attention_mask), None
        _, gen_loss, corrupted, replaced = self.corrupt(idx, targets, attention_mask)
        logits = self.detect(corrupted, attention_mask)  # (B, T)
        return logits, self.objective(gen_loss, logits, replaced, attention_mask)

    def objective(self, gen_loss: torch.Tensor, logits: torch.Tensor, replaced: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ELECTRA's loss: the generator's masked-LM loss + disc_weight x the discriminator's binary
        cross-entropy of its logits (B, T) against ``replaced`` (B, T), averaged over the real tokens."""
        real = torch.ones_like(replaced) if attention_mask is None else attention_mask.to(replaced.dtype)
        bce = F.binary_cross_entropy_with_logits(logits.float(), replaced, reduction="none")  # (B, T)
        disc_loss = (bce * real).sum() / real.sum().clamp(min=1)
        return gen_loss + self.head_config.disc_weight * disc_loss

    def corrupt(self, idx: torch.Tensor, targets: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(generator logits (N, vocab) at the N chosen positions, the generator's loss, the corrupted text
        (B, T): the original with the generator's tokens at the chosen positions, and (B, T) 1.0 where the
        corrupted token differs from the original - a sampled token equal to the original counts as
        original, as in ELECTRA)."""
        gen_logits, gen_loss = self.generator(idx, targets, attention_mask)  # (N, vocab)
        scored = targets != IGNORE_INDEX  # (B, T)
        original = torch.where(scored, targets, idx)
        with torch.no_grad():
            if self.training:
                sampled = torch.multinomial(gen_logits.float().softmax(-1), 1).squeeze(1)  # (N,)
            else:
                sampled = gen_logits.argmax(-1)  # evaluation: the same corruption every time
            corrupted = original.masked_scatter(scored, sampled)  # row-major order, as the logits
        return gen_logits, gen_loss, corrupted, (corrupted != original).float()

"""Encoder-decoder models: a source sequence in, a target sequence out (translation, summarisation).

- ``Seq2SeqTransformer`` (``model.family: seq2seq``): a pre-norm Transformer encoder (self-attention
  over the whole source) and decoder (causal self-attention, then cross-attention over the encoder's
  output, then the MLP), in the block style of a GPT preset: ``gpt2`` (learned positions, LayerNorm,
  GELU, biases, tied embeddings) or ``llama`` (rotary positions in the self-attentions, RMSNorm,
  SwiGLU, no biases). With ``encoder_preset: bert`` the encoder is instead models/encoder.py's post-norm
  BERT (its own embedding LayerNorm; n_layer, n_head, d_ff are its shape; the decoder has n_dec_layer
  layers of n_dec_head heads): the layout of Hugging Face ``BertModel``, so that a pretrained encoder
  (all-MiniLM-L6-v2) can start it (``load_encoder``; ``model.encoder_init`` in interop/warmstart.py).
- ``RecurrentSeq2Seq`` (``model.family: rnn_seq2seq``): a bidirectional LSTM/GRU encoder and an
  LSTM/GRU decoder with attention, ``luong`` (general score, input feeding; Luong et al. 2015) or
  ``bahdanau`` (additive score on the previous state; Bahdanau et al. 2015): the classic comparison.

Both read one joint vocabulary; with ``tie_embeddings`` the encoder's input, the decoder's input and
the output layer share one matrix. Sources are padded on the RIGHT; ``src_mask`` (B, S) is 1 for real
tokens (every source has at least one). Both have the same interface (models/interface.py,
``Seq2SeqModel``):

    forward(src, tgt_in, src_mask, targets) -> logits (B, T, V), mean loss   (teacher forcing)
    encode(src, src_mask) -> memory; make_cache(memory, src_mask, max_len) -> cache
    decode(idx, cache) -> logits (B, T, V), the cache advanced by T positions

The cache holds what every decoding step reads from the source, computed once per source (the
cross-attention keys/values; the attention keys of the recurrent decoder), and the decoder's own
state (a self-attention KV cache; the recurrent state). Caches of different batches join into one
(``join``: continuous batching) and rows leave (``select``, ``shrink``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lmlab.config import ModelConfig
from lmlab.models.encoder import Encoder, EncoderBlock
from lmlab.models.gpt import PRESETS, Block
from lmlab.models.interface import IGNORE_INDEX, count_parameters
from lmlab.models.layers import KVCache, fill_from_preset, make_norm, register_rope_tables, sdpa

__all__ = ["PRESETS", "RecurrentSeq2Seq", "RecurrentSeq2SeqCache", "Seq2SeqCache", "Seq2SeqTransformer"]


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """Fill the fields left as None: the preset's (gpt2 unless named), n_dec_layer (= n_layer) and
    n_dec_head (= n_head)."""
    cfg = fill_from_preset(cfg, PRESETS, default="gpt2")
    return dataclasses.replace(cfg, n_dec_layer=cfg.n_dec_layer or cfg.n_layer, n_dec_head=cfg.n_dec_head or cfg.n_head)


def decoder_config(cfg: ModelConfig) -> ModelConfig:
    """The config the decoder's blocks are built from: n_dec_head heads (grouped keys only when it is n_head)."""
    if cfg.n_dec_head == cfg.n_head:
        return cfg
    return dataclasses.replace(cfg, n_head=cfg.n_dec_head, n_kv_head=cfg.n_dec_head)


def bert_config(cfg: ModelConfig) -> ModelConfig:
    """The encoder's own config when ``encoder_preset`` is bert: a models/encoder.py Encoder of the shared
    fields, without token types (a source is one segment; load_encoder folds segment A into the positions)."""
    return dataclasses.replace(cfg, family="encoder", preset="bert", type_vocab_size=0, tie_embeddings=None,
                               n_dec_layer=None, n_dec_head=None, encoder_preset=None, encoder_init=None)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    """The mean cross-entropy of logits (B, T, V) against targets (B, T), IGNORE_INDEX skipped; None without targets."""
    if targets is None:
        return None
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def key_mask_of(src_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``src_mask`` as booleans, or None when it hides nothing (attention then takes its fast path)."""
    if src_mask is None or bool(src_mask.all()):
        return None
    return src_mask.bool()


def check_length(length: int, limit: int, what: str) -> None:
    """Refuse a source or target longer than the model's positions (block_size)."""
    if length > limit:
        raise ValueError(f"{what} of {length} tokens exceeds the model's block_size of {limit}")


# ---------------------------------------------------------------------------------------------------
# Transformer


class CrossAttention(nn.Module):
    """Attention of the decoder's positions over the encoder's output (memory), padding masked out.

    ``keys_values(memory)`` is computed once per source; ``forward`` reads it at every step.
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, bias: bool, dropout: float):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = d_model // n_head
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.kv = nn.Linear(d_model, 2 * n_kv_head * self.head_dim, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout
        self.recorded: list[torch.Tensor] | None = None  # as Attention's: a list records the weights (B, H, T, S)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H_kv, S, d) of memory (B, S, C)."""
        B, S, _ = memory.shape
        kv = self.kv(memory).view(B, S, 2 * self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, 2 * H_kv, S, d)
        return kv[:, :self.n_kv_head], kv[:, self.n_kv_head:]

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        mask = None if src_mask is None else src_mask[:, None, None, :]  # (B, 1, 1, S)
        y = sdpa(q, k, v, mask, dropout=self.dropout if self.training else 0.0, record=self.recorded)  # (B, H, T, d)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class DecoderBlock(Block):
    """A pre-norm GPT block with cross-attention between its two sublayers:
    x + self_attn(norm(x)), then x + cross_attn(norm(x), memory), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.norm_cross = make_norm(cfg.norm, cfg.d_model, cfg.bias, cfg.norm_eps)
        self.cross = CrossAttention(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.bias, cfg.dropout)

    def forward(self, x, cross_kv, src_mask, rope=None, cache=None, layer=0, key_mask=None):
        x = x + self._drop(self.attn(self.norm1(x), rope, cache, layer, key_mask))
        x = x + self._drop(self.cross(self.norm_cross(x), *cross_kv, src_mask))
        return x + self._drop(self.mlp(self.norm2(x)))


class Seq2SeqCache:
    """What a Transformer decoder reads at every step: the cross-attention keys and values of every
    layer, computed once per source, and the KV cache of its own (causal) self-attention.

    ``cross_k``, ``cross_v``: (n_dec_layer, B, H_kv, S, d); ``src_mask``: (B, S) bool, None when no source
    has padding; ``self_kv``: a ``KVCache`` of ``max_len`` positions; ``filled``: (B, max_len) bool, which
    self-attention slots hold a real token, None while every row has the same length (rows that joined
    a running batch are right-aligned behind empty slots, as in the decoder-only engine).
    """

    def __init__(self, cross_k: torch.Tensor, cross_v: torch.Tensor, src_mask: torch.Tensor | None,
                 self_kv: KVCache):
        self.cross_k, self.cross_v, self.src_mask, self.self_kv = cross_k, cross_v, src_mask, self_kv
        self.filled: torch.Tensor | None = None

    @property
    def pos(self) -> int:
        """Self-attention slots used so far (the longest row's target tokens)."""
        return self.self_kv.pos

    def select(self, rows: torch.Tensor) -> None:
        """Keep the sequences at these batch indices, in this order (repeats allowed: beam search)."""
        self.cross_k, self.cross_v = self.cross_k[:, rows], self.cross_v[:, rows]
        self.src_mask = None if self.src_mask is None else self.src_mask[rows]
        self.filled = None if self.filled is None else self.filled[rows]
        self.self_kv.select(rows)

    def shrink(self, rows: torch.Tensor, room: int) -> None:
        """Keep these rows; drop the self-attention slots and source columns none of them needs (empty
        in all: rows that joined late, sources that were longer); room for ``room`` more tokens."""
        self.select(rows)
        start, pos = 0, self.pos
        if self.filled is not None:
            start = int(self.filled[:, :pos].any(dim=0).long().argmax())  # first slot some row needs
        self.self_kv.compact(torch.arange(len(rows), device=rows.device), start, pos - start + room)
        if self.filled is not None:
            self.filled = F.pad(self.filled[:, start:pos], (0, room), value=True)
            if bool(self.filled.all()):
                self.filled = None
        if self.src_mask is not None:
            width = int(self.src_mask.sum(dim=1).max())  # sources are padded on the right
            self.cross_k, self.cross_v = self.cross_k[:, :, :, :width], self.cross_v[:, :, :, :width]
            self.src_mask = key_mask_of(self.src_mask[:, :width])

    def join(self, other: "Seq2SeqCache", max_len: int) -> "Seq2SeqCache":
        """One cache of ``max_len`` self-attention slots holding this cache's rows, then ``other``'s:
        sources padded on the right to the longer one, targets right-aligned at the longer one."""
        S = max(self.cross_k.size(3), other.cross_k.size(3))
        parts = [self, other]
        cross_k = torch.cat([F.pad(c.cross_k, (0, 0, 0, S - c.cross_k.size(3))) for c in parts], dim=1)
        cross_v = torch.cat([F.pad(c.cross_v, (0, 0, 0, S - c.cross_v.size(3))) for c in parts], dim=1)
        src_mask = torch.cat([F.pad(c._source_mask(), (0, S - c.cross_k.size(3)), value=False) for c in parts])
        pos = max(self.pos, other.pos)
        filled = torch.ones(src_mask.size(0), max_len, dtype=torch.bool, device=src_mask.device)
        rows = 0
        for c in parts:
            b = c.cross_k.size(1)
            filled[rows:rows + b, :pos - c.pos] = False
            if c.filled is not None:
                filled[rows:rows + b, pos - c.pos:pos] = c.filled[:, :c.pos]
            rows += b
        joined = Seq2SeqCache(cross_k, cross_v, key_mask_of(src_mask), self.self_kv.join(other.self_kv, max_len))
        joined.filled = None if bool(filled.all()) else filled
        return joined

    def _source_mask(self) -> torch.Tensor:
        """``src_mask``, or all True when it is None: (B, S) bool."""
        if self.src_mask is not None:
            return self.src_mask
        return torch.ones(self.cross_k.size(1), self.cross_k.size(3), dtype=torch.bool, device=self.cross_k.device)


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = resolve_config(cfg)
        assert cfg.vocab_size, "vocab_size must be set (it comes from the tokenizer)"
        self.config = cfg
        self.context_length = cfg.block_size  # the longest source and the longest target
        self.hidden_size = cfg.d_model
        learned = cfg.pos_emb == "learned"
        if cfg.encoder_preset == "bert":  # post-norm BERT, with its own embeddings (models/encoder.py)
            self.encoder = Encoder(bert_config(cfg), pooler=False)
            self.src_emb = self.src_pos = self.norm_enc = None
        else:
            self.src_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.src_pos = nn.Embedding(cfg.block_size, cfg.d_model) if learned else None
            self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer))
            self.norm_enc = make_norm(cfg.norm, cfg.d_model, cfg.bias, cfg.norm_eps)
        self.tgt_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.tgt_pos = nn.Embedding(cfg.block_size, cfg.d_model) if learned else None
        self.drop = nn.Dropout(cfg.dropout)
        self.decoder_config = decoder_config(cfg)
        self.decoder = nn.ModuleList(DecoderBlock(self.decoder_config) for _ in range(cfg.n_dec_layer))
        self.norm_dec = make_norm(cfg.norm, cfg.d_model, cfg.bias, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if not learned:
            register_rope_tables(self, cfg)
        self.apply(self._init_weights)
        # GPT-2: layers that write into the residual stream start smaller, by 1/sqrt(2 * layers)
        depth = cfg.n_layer + cfg.n_dec_layer
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "cross.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * depth))
        if cfg.tie_embeddings:  # one matrix: source input, target input, output layer
            self.tgt_emb.weight = self.source_embedding.weight
            self.lm_head.weight = self.source_embedding.weight

    @property
    def source_embedding(self) -> nn.Embedding:
        """The encoder's token embedding (the BERT encoder's own, or src_emb)."""
        return self.encoder.tok_emb if self.src_emb is None else self.src_emb

    def load_encoder(self, encoder: Encoder) -> None:
        """Start the encoder (``encoder_preset`` bert) from a BERT encoder of the same shape, e.g. one
        imported from Hugging Face: its word embeddings (with ``tie_embeddings`` also the decoder's input and
        output layer), its first block_size positions, embedding LayerNorm and layers. A source is one
        segment, so the token-type embedding of segment A is added into the position table: the same sums."""
        if self.config.encoder_preset != "bert":
            raise ValueError("load_encoder needs model.encoder_preset bert")
        state = {k: v for k, v in encoder.state_dict().items() if not k.startswith(("pooler.", "type_emb."))}
        positions = state["pos_emb.weight"][:self.context_length]  # (block_size, C)
        if encoder.type_emb is not None:
            positions = positions + encoder.type_emb.weight[0]
        state["pos_emb.weight"] = positions
        self.encoder.load_state_dict(state)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, src_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: logits (B, T, V) of the next target token after each of tgt_in (B, T), given
        src (B, S) padded on the right (``src_mask`` 1 for real tokens), and the mean cross-entropy
        against targets (B, T) if given (IGNORE_INDEX skipped)."""
        memory = self.encode(src, src_mask)
        cross = [block.cross.keys_values(memory) for block in self.decoder]
        logits = self.lm_head(self._decoder_states(tgt_in, cross, key_mask_of(src_mask)))
        return logits, cross_entropy(logits, targets)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output (B, S, C) for src (B, S): what cross-attention reads. Right padding
        (``src_mask`` 0) is never attended to, so it changes nothing at the real positions."""
        check_length(src.size(1), self.context_length, "a source")
        if self.src_emb is None:
            return self.encoder(src, key_mask_of(src_mask))
        x, rope = self._with_positions(self.src_emb(src), self.src_pos, 0, None)
        x = self.drop(x)
        key_mask = key_mask_of(src_mask)
        for block in self.encoder:
            x = block(x, rope, key_mask=key_mask)
        return self.norm_enc(x)

    def make_cache(self, memory: torch.Tensor, src_mask: torch.Tensor | None = None,
                   max_len: int | None = None) -> Seq2SeqCache:
        """A cache to decode from: every layer's cross-attention keys/values of memory (B, S, C), computed
        here once, and an empty self-attention cache for ``max_len`` target tokens (default block_size)."""
        cfg, p = self.decoder_config, self.tgt_emb.weight
        k, v = zip(*(block.cross.keys_values(memory) for block in self.decoder))  # n_dec_layer x (B, H_kv, S, d)
        self_kv = KVCache(cfg.n_dec_layer, memory.size(0), cfg.n_kv_head, max_len or cfg.block_size,
                          cfg.d_model // cfg.n_head, p.device, p.dtype)
        return Seq2SeqCache(torch.stack(k), torch.stack(v), key_mask_of(src_mask), self_kv)

    def decode(self, idx: torch.Tensor, cache: Seq2SeqCache) -> torch.Tensor:
        """Logits (B, T, V) of the next target token after each of idx (B, T), the target tokens that
        follow those in the cache; the cache advances by T positions."""
        cross = list(zip(cache.cross_k, cache.cross_v))
        return self.lm_head(self._decoder_states(idx, cross, cache.src_mask, cache))

    def _decoder_states(self, idx: torch.Tensor, cross: list[tuple[torch.Tensor, torch.Tensor]],
                        src_mask: torch.Tensor | None, cache: Seq2SeqCache | None = None) -> torch.Tensor:
        """Final decoder states (B, T, C) of target tokens idx (B, T), after those in ``cache`` if given."""
        T = idx.size(1)
        start = 0 if cache is None else cache.pos
        key_mask = positions = None
        if cache is not None and cache.filled is not None:  # rows of different lengths: per-row positions
            cache.filled[:, start:start + T] = True
            key_mask = cache.filled[:, :start + T]  # (B, start + T)
            positions = (key_mask.long().cumsum(-1) - 1)[:, -T:]  # (B, T): real tokens before, per row
        check_length(start + T if positions is None else int(positions.max()) + 1, self.context_length, "a target")
        x, rope = self._with_positions(self.tgt_emb(idx), self.tgt_pos, start, positions)
        x = self.drop(x)
        self_kv = None if cache is None else cache.self_kv
        for i, block in enumerate(self.decoder):
            x = block(x, cross[i], src_mask, rope, self_kv, i, key_mask)
        if cache is not None:
            cache.self_kv.pos += T
        return self.norm_dec(x)

    def _with_positions(self, x: torch.Tensor, table: nn.Embedding | None, start: int,
                        positions: torch.Tensor | None) -> tuple[torch.Tensor, tuple | None]:
        """x (B, T, C) plus learned positions start..start+T-1 (or per row: positions (B, T)), or x and
        the rotary tables for those positions (the llama preset)."""
        T = x.size(1)
        if table is not None:
            return x + (table.weight[start:start + T] if positions is None else table(positions)), None
        if positions is None:
            return x, (self.rope_cos[start:start + T], self.rope_sin[start:start + T])  # each (T, d/2)
        return x, (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])  # each (B, 1, T, d/2)

    def flops_per_token(self) -> float:
        """Approximate training FLOPs per TARGET token, a source of the same length counted with it (the
        encoder's work per source token comes with each target token): 6N for the weights (forward and
        backward) plus 12 * d_model * block_size per attention (PaLM, appendix B; nanoGPT): the encoder's
        self-attention, the decoder's self- and cross-attention.

        N leaves out the position tables (lookups); the token embedding stays in, as for the GPT (tied,
        it is the output layer).
        """
        cfg = self.config
        _, n = count_parameters(self)
        positions = [self.src_pos, self.tgt_pos, self.encoder.pos_emb if self.src_emb is None else None]
        n -= sum(table.weight.numel() for table in positions if table is not None)
        attentions = cfg.n_layer + 2 * cfg.n_dec_layer
        return 6 * n + 12 * attentions * cfg.d_model * cfg.block_size


# ---------------------------------------------------------------------------------------------------
# recurrent encoder-decoder with attention

CELLS = {"lstm": (nn.LSTM, nn.LSTMCell), "gru": (nn.GRU, nn.GRUCell)}


def resolve_recurrent_config(cfg: ModelConfig) -> ModelConfig:
    """Fill the fields left as None: lstm, luong attention, hidden size d_model, init range 0.1, no tying,
    as many decoder layers as encoder layers."""
    defaults = dict(cell="lstm", attention="luong", d_ff=cfg.d_model, init_range=0.1, tie_embeddings=False,
                    n_dec_layer=cfg.n_layer)
    return dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})


class RecurrentSeq2SeqCache:
    """What the recurrent decoder reads at every step: the encoder's output ``memory`` (B, S, 2H) and its
    attention ``keys`` (B, S, A), computed once per source, ``src_mask`` (B, S) bool (None: no padding),
    and the decoder's state: ``h`` (n_dec_layer, B, H) (a pair h, c for an LSTM) and ``feed`` (B, C), the
    last attentional output (Luong's input feeding). ``pos`` counts the target tokens consumed."""

    def __init__(self, memory: torch.Tensor, keys: torch.Tensor, src_mask: torch.Tensor | None, h, feed: torch.Tensor):
        self.memory, self.keys, self.src_mask, self.h, self.feed = memory, keys, src_mask, h, feed
        self.pos = 0

    def select(self, rows: torch.Tensor) -> None:
        """Keep the sequences at these batch indices, in this order (repeats allowed: beam search)."""
        self.memory, self.keys, self.feed = self.memory[rows], self.keys[rows], self.feed[rows]
        self.src_mask = None if self.src_mask is None else self.src_mask[rows]
        self.h = tuple(t[:, rows] for t in self.h) if isinstance(self.h, tuple) else self.h[:, rows]

    def shrink(self, rows: torch.Tensor, room: int = 0) -> None:
        """Keep these rows and drop the source columns none of them needs (a state has no slots to free)."""
        self.select(rows)
        if self.src_mask is not None:
            width = int(self.src_mask.sum(dim=1).max())  # sources are padded on the right
            self.memory, self.keys = self.memory[:, :width], self.keys[:, :width]
            self.src_mask = key_mask_of(self.src_mask[:, :width])

    def join(self, other: "RecurrentSeq2SeqCache", max_len: int | None = None) -> "RecurrentSeq2SeqCache":
        """One cache holding this cache's rows, then ``other``'s (sources padded on the right)."""
        S = max(self.memory.size(1), other.memory.size(1))
        parts = [self, other]

        def padded(name: str) -> torch.Tensor:
            return torch.cat([F.pad(getattr(c, name), (0, 0, 0, S - c.memory.size(1))) for c in parts])

        masks = []
        for c in parts:
            mask = c.src_mask if c.src_mask is not None else torch.ones(c.memory.shape[:2], dtype=torch.bool,
                                                                         device=c.memory.device)
            masks.append(F.pad(mask, (0, S - c.memory.size(1)), value=False))
        if isinstance(self.h, tuple):
            h = tuple(torch.cat([a, b], dim=1) for a, b in zip(self.h, other.h))
        else:
            h = torch.cat([self.h, other.h], dim=1)
        joined = RecurrentSeq2SeqCache(padded("memory"), padded("keys"), key_mask_of(torch.cat(masks)), h,
                                       torch.cat([self.feed, other.feed]))
        joined.pos = max(self.pos, other.pos)
        return joined


class RecurrentSeq2Seq(nn.Module):
    """LSTM/GRU encoder-decoder with Luong or Bahdanau attention (see the module docstring).

    encoder: embedding -> bidirectional recurrent layers (hidden H each way) -> memory (B, S, 2H).
    decoder, per target token (``_step``), with c the attention's context (a weighted sum of memory):
      luong:    h = rnn([emb(y); out_prev], h);  c = attend(h);       out = tanh(W [c; h])
      bahdanau: c = attend(h_prev);               h = rnn([emb(y); c], h);  out = tanh(W [c; h])
    logits = head(out); out has width d_model, so the head can share the embedding matrix. The decoder
    starts from tanh(bridge(the encoder's final forward and backward states)) in every layer.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = resolve_recurrent_config(cfg)
        assert cfg.vocab_size, "vocab_size must be set (it comes from the tokenizer)"
        self.config = cfg
        self.context_length = cfg.block_size  # the longest source and target the data path makes
        self.hidden_size = cfg.d_model  # width of the attentional outputs the head reads
        d, H = cfg.d_model, cfg.d_ff
        fused, cell = CELLS[cfg.cell]
        self.src_emb = nn.Embedding(cfg.vocab_size, d)
        self.tgt_emb = nn.Embedding(cfg.vocab_size, d)
        self.encoder = fused(d, H, num_layers=cfg.n_layer, batch_first=True, bidirectional=True,
                             dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.bridge = nn.Linear(2 * H, H)
        self.cells = nn.ModuleList(cell((2 * d if cfg.attention == "luong" else d + 2 * H) if i == 0 else H, H)
                                   for i in range(cfg.n_dec_layer))
        self.key_proj = nn.Linear(2 * H, H, bias=cfg.attention == "bahdanau")  # luong: W_a m; bahdanau: W_k m + b
        if cfg.attention == "bahdanau":
            self.query_proj = nn.Linear(H, H, bias=False)
            self.score_v = nn.Linear(H, 1, bias=False)
        self.combine = nn.Linear(2 * H + H, d, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(d, cfg.vocab_size)
        for p in self.parameters():  # uniform init, as in Luong et al.
            nn.init.uniform_(p, -cfg.init_range, cfg.init_range)
        if cfg.tie_embeddings:
            self.tgt_emb.weight = self.src_emb.weight
            self.head.weight = self.src_emb.weight

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, src_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: logits (B, T, V) after each token of tgt_in (B, T) given src (B, S) padded on
        the right, and the mean cross-entropy against targets if given (the same steps as ``decode``)."""
        memory = self.encode(src, src_mask)
        logits = self.decode(tgt_in, self.make_cache(memory, src_mask))
        return logits, cross_entropy(logits, targets)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output (B, S, 2H) for src (B, S): each row read forwards and backwards over its
        real tokens only (packed sequences), zeros at the padding."""
        B, S = src.shape
        lengths = src_mask.long().sum(dim=1) if src_mask is not None else torch.full((B,), S)
        x = self.drop(self.src_emb(src))  # (B, S, d)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.encoder(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=S)  # (B, S, 2H)
        return self.drop(memory)

    def make_cache(self, memory: torch.Tensor, src_mask: torch.Tensor | None = None,
                   max_len: int | None = None) -> RecurrentSeq2SeqCache:
        """A cache to decode from: memory (B, S, 2H), its attention keys (computed here, once) and the
        decoder's first state. ``max_len`` is accepted for the common interface (a state has no length)."""
        B, S, _ = memory.shape
        H = self.config.d_ff
        lengths = src_mask.long().sum(dim=1) if src_mask is not None else torch.full((B,), S, device=memory.device)
        last = memory[torch.arange(B, device=memory.device), lengths.to(memory.device) - 1, :H]  # forward's final state
        first = memory[:, 0, H:]  # the backward direction's final state (it ends at the first token)
        h0 = torch.tanh(self.bridge(torch.cat([last, first], dim=-1)))  # (B, H)
        h = h0[None].expand(self.config.n_dec_layer, B, H).contiguous()  # (n_dec_layer, B, H)
        if self.config.cell == "lstm":
            h = (h, torch.zeros_like(h))
        feed = memory.new_zeros(B, self.config.d_model)
        return RecurrentSeq2SeqCache(memory, self.key_proj(memory), key_mask_of(src_mask), h, feed)

    def decode(self, idx: torch.Tensor, cache: RecurrentSeq2SeqCache) -> torch.Tensor:
        """Logits (B, T, V) of the next target token after each of idx (B, T), continuing from the cache's
        state; the cache advances by T positions."""
        x = self.drop(self.tgt_emb(idx))  # (B, T, d)
        outs = [self._step(x[:, t], cache) for t in range(idx.size(1))]  # T x (B, d)
        cache.pos += idx.size(1)
        return self.head(self.drop(torch.stack(outs, dim=1)))  # (B, T, V)

    def _step(self, x: torch.Tensor, cache: RecurrentSeq2SeqCache) -> torch.Tensor:
        """One target token x (B, d) through the decoder; the attentional output (B, d). Updates the cache."""
        if self.config.attention == "luong":
            top = self._cells(torch.cat([x, cache.feed], dim=-1), cache)
            context = self._attend(top, cache)
        else:
            context = self._attend(self._top_state(cache), cache)
            top = self._cells(torch.cat([x, context], dim=-1), cache)
        cache.feed = torch.tanh(self.combine(torch.cat([context, top], dim=-1)))
        return cache.feed

    def _top_state(self, cache: RecurrentSeq2SeqCache) -> torch.Tensor:
        """The top decoder layer's hidden state (B, H)."""
        return cache.h[0][-1] if isinstance(cache.h, tuple) else cache.h[-1]

    def _cells(self, x: torch.Tensor, cache: RecurrentSeq2SeqCache) -> torch.Tensor:
        """x (B, in) through every decoder layer (dropout between them); the top hidden state (B, H)."""
        lstm = isinstance(cache.h, tuple)
        states = []
        for i, cell in enumerate(self.cells):
            state = cell(x, (cache.h[0][i], cache.h[1][i]) if lstm else cache.h[i])
            states.append(state)
            x = state[0] if lstm else state
            if i < len(self.cells) - 1:
                x = self.drop(x)
        cache.h = tuple(torch.stack(s) for s in zip(*states)) if lstm else torch.stack(states)
        return states[-1][0] if lstm else states[-1]

    def _attend(self, query: torch.Tensor, cache: RecurrentSeq2SeqCache) -> torch.Tensor:
        """The context (B, 2H): memory weighted by the softmax of each source token's score for query (B, H)."""
        if self.config.attention == "luong":
            scores = (cache.keys @ query[:, :, None])[..., 0]  # (B, S): h^T W_a m_s
        else:
            scores = self.score_v(torch.tanh(cache.keys + self.query_proj(query)[:, None]))[..., 0]  # (B, S)
        if cache.src_mask is not None:
            scores = scores.masked_fill(~cache.src_mask, float("-inf"))
        weights = scores.softmax(dim=-1)  # (B, S)
        return (weights[:, None] @ cache.memory)[:, 0]  # (B, 2H)

    def flops_per_token(self) -> float:
        """Approximate training FLOPs per TARGET token, a source of the same length counted with it: 6 x
        the weights that multiply (encoder both ways, bridge left out: once per source; decoder cells,
        attention, combine, head), plus 6 x 2 x 2H x block_size for the scores and the context."""
        cfg = self.config
        skipped = {id(p) for m in (self.src_emb, self.tgt_emb, self.bridge) for p in m.parameters()}
        skipped -= {id(self.head.weight)}
        weights = {id(p): p for name, p in self.named_parameters() if "bias" not in name and id(p) not in skipped}
        return 6 * sum(p.numel() for p in weights.values()) + 6 * 2 * 2 * cfg.d_ff * cfg.block_size

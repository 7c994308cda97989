"""Recurrent language models: Elman RNN, LSTM and GRU (``model.family: rnn | lstm | gru``).

embedding -> dropout -> stacked recurrent layers (dropout between them) -> dropout -> linear output,
optionally tied to the embedding: the regularised LSTM of Zaremba et al. (2014), and its RNN/GRU twins.

The recurrent state plays the role of the KV cache: ``make_cache`` returns an empty
``RecurrentState`` and ``model(idx, cache=state)`` continues from it and updates it, so the generation
engine and the evaluator drive a recurrent model exactly as they drive a Transformer. A recurrent
model has no context limit (``context_length`` is None); ``config.block_size`` is the length of the
training windows (the truncated-backpropagation length).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.models.interface import IGNORE_INDEX
from lmlab.models.layers import grow_embedding, grow_linear_rows

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
# one time step of one layer, by the ``mode`` of the fused layer (nn.RNN's mode says its nonlinearity)
STEP_CELLS = {"LSTM": torch.lstm_cell, "GRU": torch.gru_cell, "RNN_TANH": torch.rnn_tanh_cell,
              "RNN_RELU": torch.rnn_relu_cell}
_WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")  # a fused layer's parameters, per layer


class RecurrentState:
    """The hidden state of every layer: h (n_layer, B, H), and for LSTMs also the cell state c."""

    def __init__(self, h: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None):
        self.h = h  # None until the first step: the recurrent layer then starts from zeros
        self.pos = 0  # tokens consumed so far (for symmetry with the KV cache)

    def state_dict(self) -> dict:
        """The tensors to save with a training checkpoint (for an exact resume)."""
        return {"h": self.h, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        self.h, self.pos = state["h"], state["pos"]

    def select(self, rows: torch.Tensor) -> None:
        """Keep the sequences at these batch indices, in this order (repeats allowed: beam search)."""
        if isinstance(self.h, tuple):
            self.h = tuple(t[:, rows] for t in self.h)
        elif self.h is not None:
            self.h = self.h[:, rows]

    def compact(self, rows: torch.Tensor, start: int, max_len: int | None = None) -> None:
        """Keep these batch rows; ``start`` leading positions were padding for all of them (a state has no
        columns to drop: only the count of positions goes down)."""
        self.select(rows)
        self.pos -= start

    def join(self, other: "RecurrentState", max_len: int | None = None) -> "RecurrentState":
        """One state holding this state's sequences, then ``other``'s (a state has no length to align)."""
        if isinstance(self.h, tuple):
            h = tuple(torch.cat([a, b], dim=1) for a, b in zip(self.h, other.h))
        else:
            h = torch.cat([self.h, other.h], dim=1)
        joined = RecurrentState(h)
        joined.pos = max(self.pos, other.pos)
        return joined

    def detach(self) -> None:
        """Cut the gradient history (truncated backpropagation through time) but keep the values."""
        if isinstance(self.h, tuple):
            self.h = tuple(t.detach() for t in self.h)
        elif self.h is not None:
            self.h = self.h.detach()


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """Fill the fields a recurrent model leaves open: no tying, hidden size d_model and init range 0.1 unless asked.

    Tying needs d_ff = d_model; the config refuses a tied model with another d_ff (model.tie_embeddings).
    """
    filled = {}
    if cfg.tie_embeddings is None:
        filled["tie_embeddings"] = False
    if cfg.d_ff is None:
        filled["d_ff"] = cfg.d_model  # the hidden size of the recurrent layers
    if cfg.init_range is None:
        filled["init_range"] = 0.1
    return dataclasses.replace(cfg, **filled)


class RecurrentLM(nn.Module):
    """A recurrent language model over token ids (see the module docstring)."""

    context_length = None  # no context limit: the state carries everything read so far

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = resolve_config(cfg)
        assert cfg.vocab_size, "vocab_size must be set (it comes from the tokenizer)"
        self.config = cfg
        self.hidden_size = cfg.d_ff  # width of features(), for task heads
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rnn = CELLS[cfg.family](cfg.d_model, cfg.d_ff, num_layers=cfg.n_layer, batch_first=True,
                                     dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.d_ff, cfg.vocab_size)
        for p in self.parameters():  # uniform init, as in Zaremba et al.
            nn.init.uniform_(p, -cfg.init_range, cfg.init_range)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def make_cache(self, batch_size: int, max_len: int | None = None) -> RecurrentState:
        """An empty recurrent state (the counterpart of a Transformer's KV cache)."""
        return RecurrentState()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: RecurrentState | None = None,
                only_last: bool = False, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) for idx (B, T), and the mean cross-entropy if targets are given.

        With ``cache``, the sequence continues from the state it holds and the state advances.
        ``attention_mask`` marks real tokens when rows are padded (see ``features``).
        """
        out = self.features(idx, attention_mask, cache)  # (B, T, H)
        if only_last:
            out = out[:, -1:]
        logits = self.head(self.drop(out))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    def flops_per_token(self) -> float:
        """Approximate training FLOPs per token, for the MFU estimate: 6 x the weights that multiply.

        Per token and layer, a cell multiplies its input by weight_ih (gates*H x in) and its previous
        state by weight_hh (gates*H x H), gates = 1 (rnn), 3 (gru) or 4 (lstm); then the output layer
        multiplies by head (V x H). Each weight costs 2 FLOPs (a multiply-add) forward and 4 backward
        (gradients of the input and of the weight): 6 per weight. The embedding is a lookup, and biases,
        gate nonlinearities and the softmax are a few FLOPs per unit, not per weight: left out.
        """
        weights = [w for name, w in self.rnn.named_parameters() if name.startswith("weight_")]
        return 6 * (sum(w.numel() for w in weights) + self.head.weight.numel())

    def resize_vocab(self, vocab_size: int) -> None:
        """Grow the embedding and output layer to ``vocab_size`` rows (new rows: the mean of the old)."""
        self.embed = grow_embedding(self.embed, vocab_size)
        if self.config.tie_embeddings:
            self.head = nn.Linear(self.config.d_ff, vocab_size, device=self.embed.weight.device)
            nn.init.zeros_(self.head.bias)
            self.head.weight = self.embed.weight
        else:
            self.head = grow_linear_rows(self.head, vocab_size)
        self.config = dataclasses.replace(self.config, vocab_size=vocab_size)

    def features(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 cache: RecurrentState | None = None) -> torch.Tensor:
        """Outputs of the last recurrent layer (B, T, H): what the output layer and task heads read.

        With ``cache`` the sequence continues from its state and the state advances.
        ``attention_mask`` (B, T), or (B, cached + T) with a cache, is 0 for padding: right padding
        never reaches the real tokens before it; after left padding a row's state starts from zero at
        its first real token, as if the padding were not there.
        """
        x = self.drop(self.embed(idx))  # (B, T, d_model)
        out, h = self._recur(x, self._starts(idx, attention_mask), cache.h if cache is not None else None)
        if cache is not None:
            cache.h, cache.pos = h, cache.pos + idx.size(1)
        return out

    def _starts(self, idx: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, T) True where a row's state must restart from zero: at each ``config.reset_token``
        (end-of-text: no text leaks from one document into the next) and at the first real token
        after left padding. None if nowhere."""
        reset = self.config.reset_token
        starts = idx == reset if reset is not None and reset >= 0 else None  # (B, T) bool
        if attention_mask is not None and not bool(attention_mask.all()):
            real = attention_mask.bool()  # (B, S)
            after_pad = real & ~F.pad(real, (1, 0), value=True)[:, :-1]  # a 0 -> 1 step along the row
            after_pad = after_pad[:, -idx.size(1):]  # (B, T)
            starts = after_pad if starts is None else starts | after_pad
        return starts

    def _recur(self, x: torch.Tensor, starts: torch.Tensor | None, h):
        """Run the recurrent layers over x (B, T, d), zeroing a row's state before each of its ``starts``.

        The time axis is cut at those positions; with none in the batch this is a single call of the
        fused layer.
        """
        if starts is None or not starts.any():
            return self._layers(x, h)
        cuts = starts.any(0).nonzero().flatten().tolist()
        bounds = sorted({0, *cuts, x.size(1)})
        outs = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if h is not None and a in cuts:
                keep = (~starts[:, a]).to(x.dtype)[None, :, None]  # (1, B, 1): 0 for rows that start anew
                h = tuple(t * keep for t in h) if isinstance(h, tuple) else h * keep
            out, h = self._layers(x[:, a:b], h)  # (B, b - a, H)
            outs.append(out)
        return torch.cat(outs, dim=1), h

    def _layers(self, x: torch.Tensor, h):
        """The recurrent layers over x (B, T, d): one fused call, except for a one-token call on a CPU.

        Each step of generation is such a call. The fused CPU layer goes through oneDNN, whose LSTM
        re-packs the weights on every call: 5-14x slower than PyTorch's own kernels, which ``_step``
        calls per layer (measured: 2 layers x 650, batch 1, 2 cores: 4.8 ms against 0.8 ms). Longer
        sequences (training, prompts) keep the fused layer, where oneDNN is the faster one. Training
        with dropout between layers keeps it too, so that its dropout masks stay those of the fused layer.
        """
        dropping = self.training and self.rnn.dropout > 0
        if x.size(1) == 1 and x.device.type == "cpu" and not dropping:
            return self._step(x[:, 0], h)
        return self.rnn(x, h)

    def _step(self, x: torch.Tensor, h):
        """One time step through every layer with the cell functions (``torch.lstm_cell`` and kin),
        on the fused layer's own weights: x (B, d) -> output (B, 1, H) and the new state, as
        ``self.rnn`` would return them. No process-wide backend flag is touched."""
        rnn = self.rnn
        lstm = rnn.mode == "LSTM"
        if h is None:
            zeros = x.new_zeros(rnn.num_layers, x.size(0), rnn.hidden_size)
            h = (zeros, zeros) if lstm else zeros
        cell = STEP_CELLS[rnn.mode]
        states = []
        for k in range(rnn.num_layers):
            weights = [getattr(rnn, f"{name}_l{k}") for name in _WEIGHT_NAMES[:4 if rnn.bias else 2]]
            state = cell(x, (h[0][k], h[1][k]) if lstm else h[k], *weights)
            x = state[0] if lstm else state
            states.append(state)
        if lstm:
            new_h = (torch.stack([s[0] for s in states]), torch.stack([s[1] for s in states]))
        else:
            new_h = torch.stack(states)
        return x[:, None], new_h

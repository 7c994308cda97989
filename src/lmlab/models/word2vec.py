"""word2vec (Mikolov et al. 2013): word vectors learned by telling observed word pairs from noise.

Two tables of ``d_model``-dimensional vectors: ``input_emb`` (the word vectors one keeps) and
``output_emb`` (what a predicted word is scored against). Negative sampling turns prediction into
binary classification: for a predicted word t and an input vector h, maximise

    log sigmoid(h . out[t]) + sum over k noise words n of log sigmoid(-h . out[n])

    skipgram   h = in[centre], t = one context word      (one row per (centre, context) pair)
    cbow       h = mean of in[context words], t = centre (one row per centre word)

The noise words come with the batch (the training task draws them from the unigram^0.75 distribution),
so this module knows nothing of counts, windows or files. As in word2vec.c, input vectors start
uniform in [-0.5/d, 0.5/d] and output vectors at zero. With ``w2v_sparse`` the tables give sparse
gradients: an optimizer step touches only the rows of a batch's words (SparseAdam or SGD).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import ModelConfig


class Word2Vec(nn.Module):
    """Skip-gram or CBOW with negative sampling; ``forward`` gives the mean loss of a batch of rows."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("word2vec needs model.vocab_size (taken from the tokenizer when training)")
        self.config = config
        self.context_length = None  # no sequence: a model of word pairs
        self.hidden_size = config.d_model
        V, D = config.vocab_size, config.d_model
        self.input_emb = nn.Embedding(V, D, sparse=config.w2v_sparse)
        self.output_emb = nn.Embedding(V, D, sparse=config.w2v_sparse)
        nn.init.uniform_(self.input_emb.weight, -0.5 / D, 0.5 / D)
        nn.init.zeros_(self.output_emb.weight)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
                input_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The mean negative-sampling loss of N rows.

        skipgram: inputs (N,) centre words; cbow: inputs (N, C) context words, ``input_mask`` (N, C) 1
        where a context word is real (rows have different window sizes). targets (N,) the word to tell
        from negatives (N, k) noise words.
        """
        h = self.input_vector(inputs, input_mask)  # (N, D)
        candidates = torch.cat([targets.unsqueeze(1), negatives], dim=1)  # (N, 1 + k)
        scores = torch.bmm(self.output_emb(candidates), h.unsqueeze(2)).squeeze(2)  # (N, 1 + k)
        signs = torch.ones_like(scores)
        signs[:, 1:] = -1.0  # the target is a positive, the noise words negatives
        return -F.logsigmoid(scores * signs).sum(1).mean()

    def input_vector(self, inputs: torch.Tensor, input_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h (N, D): the centre word's vector (inputs (N,)), or the mean of the context words' (inputs (N, C))."""
        if inputs.dim() == 1:
            return self.input_emb(inputs)
        vectors = self.input_emb(inputs)  # (N, C, D)
        mask = torch.ones_like(inputs, dtype=vectors.dtype) if input_mask is None else input_mask.to(vectors.dtype)
        return (vectors * mask.unsqueeze(2)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)

    def features(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The word vectors (B, T, d_model) of token ids idx (B, T): a word's features are its own vector."""
        return self.input_emb(idx)

"""word2vec (Mikolov et al. 2013): word vectors learned by telling observed word pairs from noise.

Two tables of ``d_model``-dimensional vectors: ``input_emb`` (the word vectors one keeps) and
``output_emb`` (what a predicted word is scored against). Negative sampling turns prediction into
binary classification: for a predicted word t and an input vector h, maximise

    log sigmoid(h . out[t]) + sum over k noise words n of log sigmoid(-h . out[n])

    skipgram   h = in[one context word], t = centre     (a pair per context word; word2vec.c's orientation)
    cbow       h = mean of in[context words], t = centre (a pair per centre word)

A batch row is a centre word with its context words and k noise words that the row's pairs share.

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
    """Skip-gram or CBOW with negative sampling; ``forward`` gives the mean loss of a batch's pairs."""

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
        """The mean negative-sampling loss over the (input, target) pairs of N rows, one row per centre word.

        inputs (N, C) the centre's context words, ``input_mask`` (N, C) 1 where a context word is real (rows
        have different window sizes); targets (N,) the centre words; negatives (N, k) noise words, shared by
        the pairs of a row. skipgram: each real context word's vector predicts the centre (word2vec.c's
        orientation), sum(input_mask) pairs; cbow: the mean of the context vectors does, N pairs. Scoring a
        row's context vectors against its centre and noise words in one matrix product gathers each output
        vector once per row instead of once per pair (k + 1 times fewer, in skipgram).
        """
        mask = torch.ones_like(inputs, dtype=torch.float32) if input_mask is None else input_mask.float()  # (N, C)
        h, weight = self.input_vectors(inputs, mask)  # (N, P, D), (N, P): P = C (skipgram) or 1 (cbow)
        candidates = self.output_emb(torch.cat([targets.unsqueeze(1), negatives], dim=1))  # (N, 1 + k, D)
        scores = RowScores.apply(h, candidates)  # (N, P, 1 + k)
        labels = torch.zeros_like(scores[:1, :1])  # (1, 1, 1 + k): the target is a positive, noise words negatives
        labels[..., 0] = 1.0
        # a noise word that is the row's own centre is skipped, as word2vec.c does: it would push the
        # centre's output vector away from the very contexts that just pulled it closer
        keep = torch.ones_like(scores[:, 0])  # (N, 1 + k)
        keep[:, 1:] = negatives != targets.unsqueeze(1)
        pair_weight = keep.unsqueeze(1) * weight.to(scores.dtype).unsqueeze(2)  # (N, P, 1 + k)
        # -log sigmoid(score) for the target, -log sigmoid(-score) for a noise word, in one fused operation
        loss = F.binary_cross_entropy_with_logits(scores, labels.expand_as(scores), pair_weight, reduction="sum")
        return loss / weight.sum().clamp(min=1)

    def input_vectors(self, inputs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The vectors that predict a row's centre, (N, P, D), and the weight of each, (N, P): skipgram each
        context word's own (P = C, weight the mask), cbow the mean of the real ones (P = 1, weight 1)."""
        vectors = self.input_emb(inputs)  # (N, C, D)
        if self.config.w2v_mode == "skipgram":
            return vectors, mask
        mean = (vectors * mask.unsqueeze(2)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (N, D)
        return mean.unsqueeze(1), torch.ones_like(mask[:, :1])

    def features(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The word vectors (B, T, d_model) of token ids idx (B, T): a word's features are its own vector."""
        return self.input_emb(idx)


class RowScores(torch.autograd.Function):
    """Each row's input vectors scored against its candidates: (N, P, D) x (N, K, D) -> (N, P, K), h @ c^T.

    The same as torch.bmm(h, c.transpose(1, 2)) with a backward that computes the candidates' gradient as
    grad^T @ h, (N, K, P) x (N, P, D), instead of autograd's (h^T @ grad)^T: for word2vec's shapes (hundreds
    of rows of ~10 x 100 by 6) that layout is ~6x faster on CPU, and a training step ~30% faster.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, candidates)
        return torch.bmm(h, candidates.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, candidates = ctx.saved_tensors
        grad = grad.to(h.dtype)  # under autocast the scores (and so grad) may be of a lower precision
        return torch.bmm(grad, candidates.to(h.dtype)), torch.bmm(grad.transpose(1, 2), h)


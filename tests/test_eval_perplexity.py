import math

import numpy as np
import pytest
import torch

from lmlab.data.loader import TokenShards
from lmlab.errors import LmlabError
from lmlab.eval.perplexity import evaluate_perplexity, sliding_window_nll, windows
from lmlab.train.checkpoint import load_checkpoint


def reference_nll(model, ids):
    """Score every token with its whole history (sequence shorter than the context)."""
    x = torch.tensor([ids[:-1]])
    logits, _ = model(x)
    return torch.nn.functional.cross_entropy(logits[0], torch.tensor(ids[1:]), reduction="sum").item()


@pytest.mark.parametrize("n, context, stride", [(10, 4, 4), (10, 4, 1), (33, 8, 3), (5, 8, 8)])
def test_windows_score_every_token_once(n, context, stride):
    scored = []
    for begin, end, first in windows(n, context, stride):
        assert end - begin - 1 <= context and first > begin
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


def test_short_text_equals_full_context_score(trained_run):
    ckpt = load_checkpoint(trained_run)
    ids = [ckpt.tokenizer.eot_id] + ckpt.tokenizer.encode("the lazy dog jumps over")
    total, count = sliding_window_nll(ckpt.model, ids, stride=32)
    assert count == len(ids) - 1
    assert total == pytest.approx(reference_nll(ckpt.model, ids), rel=1e-5)


def test_stride_one_gives_full_context_each_token(trained_run):
    ckpt = load_checkpoint(trained_run)
    ids = np.array([ckpt.tokenizer.eot_id] + ckpt.tokenizer.encode("the quick brown fox. " * 4))
    full, n1 = sliding_window_nll(ckpt.model, ids, stride=32)
    small, n2 = sliding_window_nll(ckpt.model, ids, stride=1)
    assert n1 == n2 == len(ids) - 1
    assert small <= full * 1.01  # more context never hurts much; usually it helps


def test_report_on_text_and_on_prepared_folder(trained_run, prepared, corpus_dir):
    ckpt = load_checkpoint(trained_run)
    text = evaluate_perplexity(ckpt.model, ckpt.tokenizer, str(corpus_dir / "doc000.txt"), progress=False)
    assert text["perplexity"] == pytest.approx(math.exp(text["mean_nll"]))
    n_bytes = len((corpus_dir / "doc000.txt").read_bytes())
    assert text["bytes"] == n_bytes
    assert text["bits_per_byte"] == pytest.approx(text["mean_nll"] * text["tokens"] / math.log(2) / n_bytes)
    folder = evaluate_perplexity(ckpt.model, ckpt.tokenizer, str(prepared), split="val", progress=False)
    assert folder["perplexity"] < ckpt.tokenizer.vocab_size / 5  # well below a uniform guess after 40 steps
    assert folder["tokens"] == TokenShards(prepared, "val").tokens


def test_bad_stride(trained_run):
    ckpt = load_checkpoint(trained_run)
    with pytest.raises(LmlabError, match="stride"):
        sliding_window_nll(ckpt.model, [0, 1, 2], stride=0)

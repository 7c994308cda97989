"""Recurrent LMs (RNN, LSTM, GRU) through the same model, generation, evaluation and checkpoint paths."""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lmlab.config import ModelConfig, from_dict
from lmlab.errors import ConfigError
from lmlab.eval.perplexity import sliding_window_nll
from lmlab.generate.engine import generate_tokens
from lmlab.generate.sampling import SamplingParams
from lmlab.models.registry import build_model

FAMILIES = ["rnn", "lstm", "gru"]


def make(family, **kw):
    torch.manual_seed(0)
    cfg = dict(family=family, n_layer=2, d_model=24, block_size=16, vocab_size=40)
    cfg.update(kw)
    return build_model(ModelConfig(**cfg)).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_and_state_carry_over(family):
    model = make(family)
    x = torch.randint(0, 40, (3, 20))
    full, _ = model(x)
    assert full.shape == (3, 20, 40)
    state = model.make_cache(3)
    first, _ = model(x[:, :9], cache=state)
    second, _ = model(x[:, 9:], cache=state)
    assert state.pos == 20
    assert torch.allclose(torch.cat([first, second], dim=1), full, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_resets_at_a_document_boundary(family):
    """After an end-of-text token a row continues as if the model had started afresh there."""
    eot = 0
    model = make(family, reset_token=eot)
    torch.manual_seed(1)
    first_doc, second_doc = torch.randint(1, 40, (1, 7)), torch.randint(1, 40, (1, 6))
    eot_col = torch.full((1, 1), eot)
    joined = torch.cat([first_doc, eot_col, second_doc], dim=1)  # (1, 14)
    other_row = torch.randint(1, 40, (1, 14))  # no boundary: its output must be unaffected
    batch = torch.cat([joined, other_row])
    out, _ = model(batch)
    fresh, _ = model(torch.cat([eot_col, second_doc], dim=1))
    assert torch.allclose(out[:1, 7:], fresh, atol=1e-5)
    assert torch.allclose(out[1:], model(other_row)[0], atol=1e-5)
    # the same through a carried state, with the boundary falling inside the second chunk
    state = model.make_cache(2)
    chunks = [model(batch[:, :5], cache=state)[0], model(batch[:, 5:], cache=state)[0]]
    assert torch.allclose(torch.cat(chunks, dim=1), out, atol=1e-5)
    # and never resetting (-1) lets the first document leak into the second
    leaky, _ = make(family, reset_token=-1)(joined)
    assert not torch.allclose(leaky[:, 7:], fresh, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_causal(family):
    model = make(family)
    x = torch.randint(0, 40, (1, 12))
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 40
    assert torch.allclose(model(x)[0][:, :8], model(y)[0][:, :8])


@pytest.mark.parametrize("family", FAMILIES)
def test_truncated_bptt_detaches_the_state(family):
    model = make(family).train()
    x = torch.randint(0, 40, (2, 8))

    def two_steps(detach: bool):
        state = model.make_cache(2)
        model(x, x, cache=state)[1].backward()  # frees the graph of the first window
        if detach:
            state.detach()
            hs = state.h if isinstance(state.h, tuple) else (state.h,)
            assert all(h.grad_fn is None and not h.requires_grad for h in hs)
        model(x, x, cache=state)[1].backward()

    two_steps(detach=True)  # no gradient flows back into the first window
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        two_steps(detach=False)  # without detaching, it would


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_state_equals_recompute(family):
    model = make(family)
    for params in [SamplingParams(max_new_tokens=30, temperature=0), SamplingParams(max_new_tokens=30, seed=5)]:
        assert list(generate_tokens(model, [1, 2, 3], params)) == list(generate_tokens(model, [1, 2, 3], params, use_cache=False))


class BackendFlags(TorchFunctionMode):
    """Records the process-wide backend flags as every torch function inside the block sees them."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.add((torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", FAMILIES + ["rnn_relu"])
def test_one_token_steps_equal_one_pass_and_leave_the_backend_flags_alone(family):
    """Decoding steps (one token per call, through the cell kernels) give what one call over the
    sequence gives, and no torch.backends flag changes while they run."""
    model = make(family.removesuffix("_relu"), n_layer=3)
    if family == "rnn_relu":  # the Elman layer's other nonlinearity: the step must follow the layer's mode
        model.rnn = torch.nn.RNN(24, 24, num_layers=3, batch_first=True, nonlinearity="relu").eval()
    x = torch.randint(0, 40, (2, 12))
    full, _ = model(x)
    outside = (torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled)
    state = model.make_cache(2)
    with BackendFlags() as flags:
        steps = [model(x[:, t:t + 1], cache=state)[0] for t in range(12)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert flags.seen == {outside}
    # a prompt through the fused layer, then steps: the state hands over in both directions
    state = model.make_cache(2)
    prompt, _ = model(x[:, :5], cache=state)
    rest = [model(x[:, t:t + 1], cache=state)[0] for t in range(5, 12)]
    assert torch.allclose(torch.cat([prompt, *rest], dim=1), full, atol=1e-5)


def test_one_token_steps_train_through_the_cells():
    """Without dropout a training step may take the cell path too; its gradients match the fused layer's."""
    model = make("lstm").train()
    x = torch.randint(0, 40, (2, 1))
    model(x, x)[1].backward()
    stepped = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model.head(model.rnn(model.embed(x))[0])  # the fused layer, called directly
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(stepped, model.parameters()))


def test_no_context_limit_in_generation():
    model = make("lstm")
    assert len(list(generate_tokens(model, [1] * 20, SamplingParams(max_new_tokens=40, temperature=0, stop_tokens=[])))) == 40


@pytest.mark.parametrize("family", FAMILIES)
def test_memorises_a_tiny_corpus(family):
    torch.manual_seed(0)
    model = make(family, d_model=64, n_layer=1).train()
    seq = torch.tensor([[5, 9, 2, 7, 1, 3, 8, 6, 4, 0] * 3])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_stateful_perplexity_equals_one_pass():
    model = make("gru")
    ids = torch.randint(0, 40, (50,)).tolist()
    total, count = sliding_window_nll(model, ids, stride=1)
    logits, _ = model(torch.tensor([ids[:-1]]))
    ref = torch.nn.functional.cross_entropy(logits[0], torch.tensor(ids[1:]), reduction="sum").item()
    assert count == 49 and total == pytest.approx(ref, rel=1e-5)


def test_tying_and_its_constraint():
    model = make("lstm", tie_embeddings=True)
    assert model.head.weight is model.embed.weight
    with pytest.raises(ConfigError, match="^model.tie_embeddings needs model.d_ff .32. equal to model.d_model .24."):
        from_dict(ModelConfig, {"family": "lstm", "d_model": 24, "d_ff": 32, "tie_embeddings": True}, "model.")


@pytest.mark.parametrize("family", FAMILIES)
def test_train_checkpoint_generate_eval(family, prepared, tmp_path):
    from conftest import tiny_run_config
    from lmlab.eval.perplexity import evaluate_perplexity
    from lmlab.generate.engine import generate_text
    from lmlab.train.checkpoint import load_checkpoint
    from lmlab.train.lm import pretrain

    cfg = tiny_run_config(prepared, tmp_path / "run", max_steps=30, lr=1e-2)
    cfg.model.family, cfg.model.n_layer, cfg.model.dropout = family, 2, 0.1
    summary = pretrain(cfg)
    ckpt = load_checkpoint(tmp_path / "run")
    uniform = math.log(ckpt.tokenizer.vocab_size)
    assert ckpt.model.config.family == family and summary.metrics["val_loss"] < uniform - 1.5
    x = torch.randint(0, ckpt.tokenizer.vocab_size, (1, 10))
    again = load_checkpoint(ckpt.path)
    assert torch.equal(ckpt.model(x)[0], again.model(x)[0])
    text = generate_text(ckpt.model, ckpt.tokenizer, "the ", SamplingParams(max_new_tokens=50, seed=1))
    assert isinstance(text, str)
    report = evaluate_perplexity(ckpt.model, ckpt.tokenizer, str(prepared), progress=False)
    assert report["context"] == "unlimited (recurrent state)" and report["perplexity"] > 1


def test_truncated_bptt_training_resumes_exactly(prepared, tmp_path):
    from conftest import tiny_run_config
    from lmlab.train.logger import read_metrics
    from lmlab.train.lm import pretrain

    def config(name):
        cfg = tiny_run_config(prepared, tmp_path / name, max_steps=14, lr=1e-2, batching="sequential",
                              carry_state=True, checkpoint_interval=100)
        cfg.model.family, cfg.model.dropout, cfg.model.block_size = "lstm", 0.1, 8
        return cfg

    pretrain(config("full"))
    pretrain(config("part"), stop_after=5)
    pretrain(config("part"), resume=True)
    losses = [[r["train_loss"] for r in read_metrics(tmp_path / n / "metrics.jsonl") if "train_loss" in r]
              for n in ("full", "part")]
    assert len(losses[0]) == 14 and losses[0] == losses[1]


def test_sequential_batches_continue_each_row(prepared):
    from lmlab.data.loader import TokenShards, sequential_batch

    shards = TokenShards(prepared, "train")
    x0, y0, first = sequential_batch(shards, 3, 8, 0)
    x1, _, later = sequential_batch(shards, 3, 8, 1)
    assert first and not later
    assert torch.equal(x1[:, 0], y0[:, -1])  # row b of step 1 continues row b of step 0
    row_len = shards.tokens // 3
    assert x0[1, 0].item() == int(shards.read(row_len, row_len + 1)[0])


def test_carry_state_needs_a_recurrent_model(prepared, tmp_path):
    from conftest import tiny_run_config
    from lmlab.train.lm import pretrain

    with pytest.raises(ConfigError, match="carries a state"):
        pretrain(tiny_run_config(prepared, tmp_path / "gpt", batching="sequential", carry_state=True))
    with pytest.raises(ConfigError, match="sequential"):
        cfg = tiny_run_config(prepared, tmp_path / "rnn", carry_state=True)
        cfg.model.family = "rnn"
        pretrain(cfg)

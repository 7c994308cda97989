"""The exponential moving average of weights (train/ema.py) and its use by the training loop."""

import pytest
import torch
import torch.nn as nn

from lmlab.train.ema import WeightAverage


def test_average_follows_the_formula_and_skips_frozen_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)
    ema = WeightAverage(model, decay=0.9)
    expected = model[0].weight.detach().clone()
    for n in range(1, 30):
        with torch.no_grad():
            model[0].weight.add_(torch.randn_like(model[0].weight))
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * model[0].weight.detach()
    assert torch.allclose(ema.shadow[0], expected, atol=1e-6)
    assert len(ema.shadow) == 3  # the frozen weight has no copy


def test_applied_swaps_in_the_average_and_restores_the_raw_weights_exactly():
    torch.manual_seed(0)
    model = nn.Linear(5, 5)
    ema = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.mul_(3.0)
    ema.update()
    raw = model.weight.detach().clone()
    with ema.applied():
        assert torch.equal(ema.shadow[0], raw)  # the shadow holds the raw weights meanwhile
        averaged = model.weight.detach().clone()
    assert torch.equal(model.weight, raw)
    assert not torch.equal(averaged, raw)
    ema.copy_to_model()
    assert torch.equal(model.weight, averaged)


def test_bad_decay_is_refused():
    with pytest.raises(ValueError, match="between 0 and 1"):
        WeightAverage(nn.Linear(2, 2), decay=1.0)


def test_loop_evaluates_and_saves_the_averaged_weights(tmp_path):
    """With train.ema_decay the loop's evaluation sees the average, and its checkpoint holds the average."""
    from lmlab.train.checkpoint import load_train_state
    from loop_tasks import RegressionTask, regression_config, run_task

    cfg = regression_config(tmp_path / "run", max_steps=20, lr=0.1, warmup_steps=0, lr_schedule="constant",
                            weight_decay=0.0, grad_clip=0.0, eval_interval=20, log_interval=10, ema_decay=0.9)
    task = RegressionTask(batch_size=64, grad_accum=1)
    raw_copy = nn.Linear(4, 1)
    raw_copy.load_state_dict(task.model.state_dict())
    result = run_task(task, cfg)
    # the same 20 steps without the average, tracked by hand
    optimizer = torch.optim.AdamW(raw_copy.parameters(), lr=0.1, weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8)
    shadow = [p.detach().clone() for p in raw_copy.parameters()]
    for n in range(1, 21):
        nn.functional.mse_loss(raw_copy(task.x), task.y).backward()
        optimizer.step()
        optimizer.zero_grad()
        d = min(0.9, (1 + n) / (10 + n))
        shadow = [d * s + (1 - d) * p.detach() for s, p in zip(shadow, raw_copy.parameters())]
    assert torch.allclose(task.seen[-1], shadow[0], atol=1e-5)  # what evaluation saw
    assert torch.allclose(task.model.weight, raw_copy.weight, atol=1e-5)  # training goes on with the raw weights
    state = load_train_state(__import__("pathlib").Path(result.checkpoint))
    assert torch.allclose(state["ema"]["raw"][0], raw_copy.weight, atol=1e-5)

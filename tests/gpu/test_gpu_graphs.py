"""CUDA: graph-captured micro-steps equal eager ones (CapturedMicroStep with capture=None vs capture=False).

Replays run the kernels the eager micro-step runs, so fp32 results agree to
rounding (usually bit for bit); under bf16 autocast to bf16 rounding. Every test
runs several windows with device-tensor weights, and a ragged last micro-batch
that runs eagerly inside a captured window.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accumopt import AccumulatingOptimizer, CapturedMicroStep

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

K = 4


def make_model(seed=0, dropout=0.1, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(16, 64), nn.LayerNorm(64)]
    if bn:
        layers.append(nn.BatchNorm1d(64))
    layers += [nn.GELU(), nn.Dropout(dropout), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 5)]
    return nn.Sequential(*layers).cuda()


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, ignore_index=-100)


def make_data(n=14, size=8, ragged=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        s = ragged if i == n - 1 else size
        y = torch.randint(0, 5, (s,), generator=g)
        y[torch.rand(s, generator=g) < 0.2] = -100  # padding: a different token count per micro-batch
        out.append((torch.randn(s, 16, generator=g).cuda(), y.cuda()))
    return out


def run(capture, data, *, mode="inplace", scaler=False, weights=True, autocast=False, bn=False,
        nonfinite="ignore", seed=0):
    model = make_model(bn=bn)
    kw = {"scaler": torch.amp.GradScaler("cuda", init_scale=2.0**10)} if scaler else {}
    opt = AccumulatingOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), K,
                                mode=mode, nonfinite=nonfinite, **kw)
    step = CapturedMicroStep(opt, model, loss_fn, data[0], capture=capture)
    torch.manual_seed(seed)  # the same dropout stream for both runs (capture restores what warm-up drew)
    losses = []
    for b in data:
        w = (b[1] != -100).sum() if weights else None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            losses.append(step(b, weight=w))
    opt.flush()
    torch.cuda.synchronize()
    return model, opt, step, torch.stack(losses)


def assert_runs_close(a, b, rtol, atol):
    (m1, o1, s1, l1), (m2, o2, s2, l2) = a, b
    assert o1.num_updates == o2.num_updates
    torch.testing.assert_close(l1, l2, rtol=rtol, atol=atol)
    for (name, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(p1, p2, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
@pytest.mark.parametrize("scaler", [False, True])
def test_captured_equals_eager_fp32(mode, scaler):
    data = make_data()
    eager = run(False, data, mode=mode, scaler=scaler)
    captured = run(None, data, mode=mode, scaler=scaler)
    step = captured[2]
    assert step.captured, step.fallback_reason
    assert step.replays == len(data) - 1 and step.eager_steps == 1  # the ragged last micro-batch
    assert eager[2].replays == 0
    assert_runs_close(eager, captured, rtol=1e-5, atol=1e-6)
    if scaler:
        assert eager[1].scaler.get_scale() == captured[1].scaler.get_scale()


def test_captured_equals_eager_bf16_autocast_and_batchnorm():
    data = make_data(n=13)
    eager = run(False, data, autocast=True, bn=True)
    captured = run(None, data, autocast=True, bn=True)
    assert captured[2].captured
    assert_runs_close(eager, captured, rtol=2e-2, atol=2e-3)


def test_dropout_draws_fresh_masks_each_replay():
    """Graph-safe RNG: replays do not repeat one dropout mask (losses of equal batches differ)."""
    data = make_data(n=8, ragged=8)
    same = [data[0]] * 8
    _, _, step, losses = run(None, same, weights=False)
    assert step.replays >= 7
    assert len(set(losses[:K].tolist())) == K  # one window, same batch and weights: only the masks differ


def test_drop_policy_with_nonfinite_micro_batch():
    data = make_data(n=12, ragged=8)
    data[5] = (torch.full_like(data[5][0], float("inf")), data[5][1])
    eager = run(False, data, mode="buffered", nonfinite="drop")
    captured = run(None, data, mode="buffered", nonfinite="drop")
    assert captured[2].replays == len(data)
    assert eager[1].stats()["dropped_micro_batches"] == captured[1].stats()["dropped_micro_batches"] == 1
    m1, m2 = eager[0], captured[0]
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.isfinite(p2).all()
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)


def test_train_eval_switch_and_replaced_parameter_recapture():
    data = make_data(n=16, ragged=8)
    results = []
    for capture in (False, None):
        model = make_model()
        opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), K)
        step = CapturedMicroStep(opt, model, loss_fn, data[0], capture=capture)
        torch.manual_seed(3)
        for i, b in enumerate(data):
            if i == 4:
                model.eval()
            if i == 8:
                model.train()
                torch.manual_seed(11)
                model[-1].weight = nn.Parameter(torch.randn(5, 64, device="cuda") * 0.1)
                opt.add_param_group({"params": [model[-1].weight]})
            step(b)
        torch.cuda.synchronize()
        results.append((model, step))
    (m1, _), (m2, s2) = results
    assert s2.captures == 3 and s2.eager_steps == 0
    for p1, p2 in zip(m1.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)


def test_capture_true_succeeds_and_returns_independent_losses():
    data = make_data(n=8, ragged=8)
    model = make_model(dropout=0.0)
    opt = AccumulatingOptimizer(torch.optim.AdamW(model.parameters()), K)
    step = CapturedMicroStep(opt, model, loss_fn, data[0], capture=True)
    losses = [step(b) for b in data]
    ref = [loss_fn(make_model(dropout=0.0), data[0]).detach()]
    torch.testing.assert_close(losses[0], ref[0])  # the first window starts from the same weights
    assert len({t.data_ptr() for t in losses}) == len(losses)

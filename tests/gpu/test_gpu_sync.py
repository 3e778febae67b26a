"""CUDA: a micro-step that does not update makes no host-device synchronisation.

``torch.cuda.set_sync_debug_mode("error")`` turns every synchronising CUDA call
(``.item()``, ``bool(tensor)``, a blocking copy to the host, ...) into an error.
It is switched on around whole non-updating micro-steps (forward, backward,
``opt.step()``, ``opt.zero_grad()``), after a warm-up window so that one-time
initialisation is done, and switched off around the updating one (which may
sync by design, for example a GradScaler reading its inf flag).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from accumopt import AccumulatingOptimizer, CapturedMicroStep

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

K = 4


@contextlib.contextmanager
def no_sync():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def setup(mode, scaler=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10)).cuda()
    kw = {"scaler": torch.amp.GradScaler("cuda")} if scaler else {}
    opt = AccumulatingOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), K, mode=mode, **kw)
    x = torch.randn(8, 32, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    y[:3] = -100  # ignored targets: the weight is the count of real tokens, computed on the GPU
    return model, opt, x, y


def micro_step(model, opt, x, y, how):
    loss = nn.functional.cross_entropy(model(x), y, ignore_index=-100)
    weight = (y != -100).sum()  # a 0-dim device tensor
    if how == "plain":
        loss.backward()
        opt.step(loss=loss)
    elif how == "step-weight":  # buffered mode: weight after backward
        loss.backward()
        opt.step(weight=weight, loss=loss)
    else:  # "backward-weight": weight (and scaler's scale) applied before backward
        opt.backward(loss, weight=weight)
        opt.step(loss=loss)
    opt.zero_grad()


@pytest.mark.parametrize(
    "mode, how, scaler",
    [
        ("inplace", "plain", False),
        ("inplace", "backward-weight", False),
        ("inplace", "backward-weight", True),
        ("buffered", "plain", False),
        ("buffered", "step-weight", False),
        ("buffered", "backward-weight", True),
    ],
)
def test_non_updating_micro_steps_do_not_sync(mode, how, scaler):
    model, opt, x, y = setup(mode, scaler)
    for _ in range(K):  # warm-up window: lazy initialisation may sync once
        micro_step(model, opt, x, y, how)
    torch.cuda.synchronize()
    for window in range(3):
        with no_sync():
            for _ in range(K - 1):
                micro_step(model, opt, x, y, how)
                assert not opt.stepped
        micro_step(model, opt, x, y, how)  # the update
        assert opt.stepped
    assert opt.num_updates == 4


def test_sync_debug_mode_catches_a_sync():
    """The guard is real: an .item() inside it raises."""
    t = torch.ones((), device="cuda")
    with pytest.raises(RuntimeError), no_sync():
        t.item()


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
def test_captured_micro_steps_do_not_sync(mode):
    model, opt, x, y = setup(mode)
    step = CapturedMicroStep(opt, model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], ignore_index=-100),
                             (x, y))
    for _ in range(K):  # window 1 captures
        step((x, y), weight=(y != -100).sum())
    assert step.captured
    torch.cuda.synchronize()
    for _ in range(2):
        step((x, y), weight=(y != -100).sum())  # window start: signature checks and re-attachment
        with no_sync():
            for _ in range(K - 2):
                step((x, y), weight=(y != -100).sum())
        step((x, y), weight=(y != -100).sum())
    assert step.replays >= 8 and opt.num_updates == 3

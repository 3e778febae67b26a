"""Buffered mode's gradient hand-over, checked against plain torch.

On CPU each fresh gradient is copied, during the backward pass, into a tensor kept from
the last micro-step, and ``.grad`` is released at every ``step()``; a window's first
micro-batch writes the buffers instead of adding into zeros. None of it may change a
number: a gradient discarded with ``zero_grad()`` never reaches the window, a parameter
without a gradient in the window gets none, and every update equals the plain
large-batch step (float64 reference).
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn.functional as F

from accumopt import AccumulatingOptimizer

DT = torch.float64


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(3, 4)
        self.a = torch.nn.Linear(4, 1)
        self.b = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, head: str) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return sum(getattr(self, name)(h) for name in head)  # "a", "b" or both


def _data(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, generator=g, dtype=DT), torch.randn(2, 1, generator=g, dtype=DT)) for _ in range(n)]


def _release_instead(opt: AccumulatingOptimizer) -> None:
    """Hand gradients over as on a device with a caching allocator (no kept tensors, no hooks)."""
    for g in opt._store.groups:
        if g.landing is not None:
            g.landing.remove()
            g.landing = None


def _windows(ks: list[int], data: list) -> list[list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """Split ``data`` into windows of the sizes ``ks``, with the head each micro-batch trains.

    A window's first micro-batch trains head "b" alone and the others head "a" (so "a"'s buffers
    still hold the last window when a window starts); a one-micro-batch window trains both.
    """
    out, i = [], 0
    for k in ks:
        out.append([("ab" if k == 1 else "b" if j == 0 else "a", *data[i + j]) for j in range(k)])
        i += k
    return out


def _train(opt: AccumulatingOptimizer, model: TwoHeads, windows: list) -> None:
    for window in windows:
        for head, x, y in window:
            F.mse_loss(model(x, head), y).backward()
            opt.step()
            opt.zero_grad()


def _reference(model: TwoHeads, windows: list) -> TwoHeads:
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for window in windows:
        ref_opt.zero_grad()
        sum(F.mse_loss(ref(x, head), y) for head, x, y in window).div(len(window)).backward()
        ref_opt.step()
    return ref


def test_fresh_gradient_lands_in_a_kept_tensor_and_grad_is_released() -> None:
    torch.manual_seed(0)
    model = TwoHeads().to(DT)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, mode="buffered")
    kept = []
    for x, y in _data(6):
        expected = torch.autograd.grad(F.mse_loss(model(x, "a"), y), model.body.weight)[0]
        F.mse_loss(model(x, "a"), y).backward()
        assert torch.equal(model.body.weight.grad, expected)  # this micro-batch's gradient, nothing else
        kept.append(model.body.weight.grad)
        opt.step()
        opt.zero_grad()
        assert model.body.weight.grad is None  # released: no part of the window lives in .grad
    assert opt.num_updates == 3
    assert all(t is kept[0] for t in kept)  # one tensor receives every micro-batch: no page faults per step


@pytest.mark.parametrize("schedule", ["1", "4", "2, 1, 2, 1, ..."])
def test_stale_buffers_and_both_hand_overs_match_the_large_batch(schedule: str) -> None:
    """Windows that start without a gradient for head "a", or close on their first micro-batch: the
    buffers still hold the last window's sums and must count as zeros. Releasing ``.grad`` (other
    devices) gives the same bits as the kept CPU tensors."""
    torch.manual_seed(0)
    model = TwoHeads().to(DT)
    k = {"1": 1, "4": 4, "2, 1, 2, 1, ...": lambda n: 2 if n % 2 == 0 else 1}[schedule]
    ks = {"1": [1] * 12, "4": [4] * 3, "2, 1, 2, 1, ...": [2, 1] * 4}[schedule]
    windows = _windows(ks, _data(12, seed=3))
    ref = _reference(model, windows)
    models = []
    for release in (False, True):
        m = copy.deepcopy(model)
        opt = AccumulatingOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), k, mode="buffered")
        if release:
            _release_instead(opt)
        _train(opt, m, windows)
        assert opt.num_updates == len(ks) and opt.pending == 0
        models.append(m)
    for p, q, r in zip(models[0].parameters(), models[1].parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)
        assert torch.equal(p, q)


def test_two_backward_passes_in_one_micro_batch_are_summed() -> None:
    torch.manual_seed(0)
    model = TwoHeads().to(DT)
    ref = copy.deepcopy(model)
    data = _data(4, seed=5)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, mode="buffered")
    for x, y in data:
        F.mse_loss(model(x, "a"), y).backward()  # lands in the kept tensor
        F.mse_loss(model(x, "b"), y).backward()  # adds into it in place
        opt.step()
        opt.zero_grad()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for w in (0, 2):
        ref_opt.zero_grad()
        sum(F.mse_loss(ref(x, "a"), y) + F.mse_loss(ref(x, "b"), y) for x, y in data[w:w + 2]).div(2).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_hooks_go_with_the_wrapper_and_come_with_a_copy() -> None:
    torch.manual_seed(0)
    model = TwoHeads().to(DT)
    data = _data(8, seed=7)
    windows = _windows([4, 4], data)
    ref = _reference(model, windows)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 4, mode="buffered")
    _train(opt, model, [windows[0][:2]])  # mid-window
    both = copy.deepcopy({"model": model, "opt": opt})
    twin, twin_opt = both["model"], both["opt"]
    for p in twin.parameters():
        assert p._post_accumulate_grad_hooks  # the copy's parameters hand over too
    for m, o in ((model, opt), (twin, twin_opt)):
        _train(o, m, [windows[0][2:], windows[1]])
    for p, q, r in zip(model.parameters(), twin.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)
    del opt, both, twin_opt
    gc.collect()
    for p in model.parameters():
        assert not p._post_accumulate_grad_hooks  # nothing of the wrapper stays on the model
    F.mse_loss(model(data[0][0], "a"), data[0][1]).backward()
    first = model.body.weight.grad
    model.zero_grad()
    F.mse_loss(model(data[0][0], "a"), data[0][1]).backward()
    assert model.body.weight.grad is not first  # plain torch again: a fresh gradient


def test_discarded_gradient_and_unused_head_match_the_large_batch() -> None:
    torch.manual_seed(0)
    model = TwoHeads().to(DT)
    ref = copy.deepcopy(model)
    data = _data(4)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 3, mode="buffered")
    # micro-batch 0, then a gradient thrown away with zero_grad(), then micro-batches 2 and 3 (head "a" only)
    for i, (x, y) in enumerate(data):
        F.mse_loss(model(x, "a" if i != 1 else "b"), y).backward()
        if i == 1:
            opt.zero_grad()  # discard: neither its gradient nor head "b" may count
            continue
        opt.step()
        opt.zero_grad()
    assert opt.num_updates == 1
    assert model.b.weight.grad is None  # head "b" got no gradient in the window: never stepped
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    sum(F.mse_loss(ref(x, "a"), y) for i, (x, y) in enumerate(data) if i != 1).div(3).backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert torch.equal(model.b.weight, ref.b.weight)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_between_backward_and_step_discards_in_buffered_mode(set_to_none: bool) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).to(DT)
    ref = copy.deepcopy(model)
    (x0, y0), (x1, y1), (x2, y2) = _data(3, seed=1)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, mode="buffered")
    F.mse_loss(model(x0), y0).backward()
    opt.step()
    F.mse_loss(model(x1), y1).backward()  # lands on the kept .grad
    opt.zero_grad(set_to_none=set_to_none)  # and is thrown away
    F.mse_loss(model(x2), y2).backward()
    opt.step()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ((F.mse_loss(ref(x0), y0) + F.mse_loss(ref(x2), y2)) / 2).backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_kept_tensor_on_another_device_is_not_reused() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(DT)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, generator=g, dtype=DT), torch.randn(4, 2, generator=g, dtype=DT)) for _ in range(4)]
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, mode="buffered")
    for x, y in data[:2]:  # one window: the landing tensors are kept
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    group = opt._store.groups[0]
    landing = group.landing
    assert landing is not None
    i = next(j for j, p in enumerate(group.params) if p is model.weight)
    kept = landing.tensors[i]
    assert kept is not None
    # As if the parameter had moved since (same shape, dtype and stride, another device).
    landing.tensors[i] = torch.empty_strided(kept.shape, kept.stride(), dtype=kept.dtype, device="meta")
    x, y = data[2]
    expected = torch.autograd.grad(F.mse_loss(model(x), y), model.weight)[0]
    F.mse_loss(model(x), y).backward()
    grad = model.weight.grad
    assert grad is not None and grad.device == model.weight.device
    assert torch.equal(grad, expected)
    opt.step()
    opt.zero_grad()
    x, y = data[3]
    F.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    assert opt.num_updates == 2
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for w in (0, 2):
        ref_opt.zero_grad()
        sum(F.mse_loss(ref(x), y) for x, y in data[w:w + 2]).div(2).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def _frozen_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(DT)
    model[0].weight.requires_grad_(False)  # fine-tuning: a frozen tensor still given to the optimizer
    return model


def _fit(model: torch.nn.Module, opt: torch.optim.Optimizer, data: list, per_step: bool) -> None:
    for x, y in data:
        F.mse_loss(model(x), y).backward()
        if per_step:
            opt.step()
            opt.zero_grad()
    if not per_step:
        opt.step()
        opt.zero_grad()


def test_frozen_parameters_are_accepted_wherever_the_storage_is_planned() -> None:
    data = _data(4, seed=9)
    ref = _frozen_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for w in (0, 2):
        ref_opt.zero_grad()
        sum(F.mse_loss(ref(x), y) for x, y in data[w:w + 2]).div(2).backward()
        ref_opt.step()
    model = _frozen_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 2, mode="buffered")
    _fit(model, opt, data, per_step=True)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    # bf16 parameters get fp32 buffers in the default mode; a frozen one among them
    half = _frozen_model().to(torch.bfloat16)
    AccumulatingOptimizer(torch.optim.SGD(half.parameters(), lr=0.1), 2)
    # a frozen parameter in a group added later, a copy, and a new plan after a dtype change
    extra = torch.nn.Linear(2, 2).to(DT).requires_grad_(False)
    opt.add_param_group({"params": list(extra.parameters())})
    assert len(opt.param_groups) == 2
    both = copy.deepcopy({"model": model, "opt": opt})
    model.to(torch.float32)
    _fit(model, opt, [(x.float(), y.float()) for x, y in data[:2]], per_step=True)
    assert opt.num_updates == 3
    _fit(both["model"], both["opt"], data[:2], per_step=True)
    assert both["opt"].num_updates == 3


@pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph=True:UserWarning")  # torch's own advice
def test_create_graph_gradients_do_not_chain_the_sums_across_windows() -> None:
    torch.manual_seed(0)
    model = TwoHeads().to(DT)
    windows = _windows([2, 2], _data(4, seed=11))
    ref = _reference(model, windows)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 2, mode="buffered")
    for window in windows:
        for head, x, y in window:
            F.mse_loss(model(x, head), y).backward(create_graph=True)  # e.g. a gradient penalty's pattern
            opt.step()
            for g in opt._store.groups:  # no autograd history kept from micro-step to micro-step
                assert not any(b.requires_grad for b in g.buffers)
            opt.zero_grad()
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)

"""accumopt under Hugging Face Accelerate against its own ``accumulate()`` and one large batch.

Float64, a tiny token-level model, CPU, one process.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from accumopt import AccumulatingOptimizer  # noqa: E402
from accumopt.integrations.accelerate import check_accelerator, prepare  # noqa: E402

V, LEN, K, B, CLIP = 20, 6, 4, 2, 0.05


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test starts from none."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_batches(n: int, variable: bool, size: int = B, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, LEN), generator=g)
    y = torch.randint(0, V, (n, LEN), generator=g)
    if variable:
        lengths = torch.randint(1, LEN + 1, (n, 1), generator=g)
        y = y.masked_fill(torch.arange(LEN) >= lengths, -100)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, n, size)]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, V)).double()


def token_loss(model, x, y):
    return F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1), ignore_index=-100)  # token mean


def schedule(n):
    return 1.0 / (1 + n)


def flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def rel(a, b):
    fa, fb = flat(a), flat(b)
    return float((fa - fb).abs().max() / fb.abs().max())


def run_accumopt(batches, weighted=True, use_accumulate=False, mode="inplace"):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(make_model())
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, schedule)
    opt = AccumulatingOptimizer(inner, K, scheduler=scheduler, max_grad_norm=CLIP, model=model, mode=mode)
    prepared = prepare(accelerator, opt)
    for x, y in batches:
        with accelerator.accumulate(model) if use_accumulate else _nothing():
            loss = token_loss(model, x, y)
            if weighted:
                opt.backward(loss, weight=(y != -100).sum())
            else:
                accelerator.backward(loss)
            prepared.step()
            prepared.zero_grad()
    opt.flush()
    return model, opt, scheduler


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def run_reference(batches, steps=1):
    """Accelerate alone: accumulate() with gradient_accumulation_steps=steps (1: the large batch)."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=steps)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model, opt, scheduler = accelerator.prepare(model, opt, scheduler)
    for x, y in batches:
        with accelerator.accumulate(model):
            accelerator.backward(token_loss(model, x, y))
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            scheduler.step()
            opt.zero_grad()
    return model, scheduler


def test_fixed_length_equals_accelerate_accumulation():
    batches = make_batches(32, variable=False)  # 16 micro-batches: 4 windows of 4
    ref, ref_sched = run_reference(batches, steps=K)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc, opt, sched = run_accumopt(batches, weighted=False)
    assert [str(w.message) for w in caught] == []
    assert rel(acc, make_model()) > 1e-3  # it trained
    assert torch.equal(flat(acc), flat(ref))  # bitwise
    assert opt.num_updates == sched.last_epoch == ref_sched.scheduler.last_epoch == 4


def test_variable_length_and_partial_window_equal_one_large_batch():
    batches = make_batches(36, variable=True)  # 18 micro-batches: windows 4, 4, 4, 4 and a partial 2
    big, big_sched = run_reference(make_batches(36, variable=True, size=B * K))
    acc, opt, sched = run_accumopt(batches)
    assert rel(acc, big) <= 1e-12
    assert opt.num_updates == sched.last_epoch == big_sched.scheduler.last_epoch == 5
    # Control: Accelerate's own accumulation averages micro-batch means (the short last window too).
    own, _ = run_reference(batches, steps=K)
    assert rel(own, big) > 1e-4


def test_accumulate_context_with_one_step_is_harmless():
    batches = make_batches(36, variable=True)
    plain, _, _ = run_accumopt(batches)
    inside, _, _ = run_accumopt(batches, use_accumulate=True)
    assert torch.equal(flat(inside), flat(plain))


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
def test_mid_window_save_state_resumes_bitwise(tmp_path, mode):
    batches = make_batches(36, variable=True)
    full, _, _ = run_accumopt(batches, mode=mode)

    def start():
        accelerator = Accelerator(cpu=True)
        model = accelerator.prepare(make_model())
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        opt = AccumulatingOptimizer(inner, K, scheduler=torch.optim.lr_scheduler.LambdaLR(inner, schedule),
                                    max_grad_norm=CLIP, model=model, mode=mode)
        return accelerator, model, opt, prepare(accelerator, opt)

    def train(accelerator, model, opt, prepared, part):
        for x, y in part:
            opt.backward(token_loss(model, x, y), weight=(y != -100).sum())
            prepared.step()
            prepared.zero_grad()

    accelerator, model, opt, prepared = start()
    train(accelerator, model, opt, prepared, batches[:10])
    assert opt.pending == 2
    accelerator.save_state(str(tmp_path / "state"))

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator, model, opt, prepared = start()
    accelerator.load_state(str(tmp_path / "state"))
    assert opt.pending == 2
    train(accelerator, model, opt, prepared, batches[10:])
    opt.flush()
    assert torch.equal(flat(model), flat(full))


def test_accumulating_accelerator_and_prepared_scheduler_are_refused():
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = AccumulatingOptimizer(inner, K)
    with pytest.raises(ValueError, match=r"Accelerator\(gradient_accumulation_steps=4\) with an Accumulating"):
        prepare(Accelerator(cpu=True, gradient_accumulation_steps=K), opt)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    for sched in (torch.optim.lr_scheduler.LambdaLR(inner, schedule), torch.optim.lr_scheduler.LambdaLR(opt, schedule)):
        with pytest.raises(ValueError, match="scheduler on an AccumulatingOptimizer"):
            prepare(accelerator, opt, sched)
    with pytest.raises(TypeError, match="expected an accelerate.Accelerator"):
        check_accelerator(object())

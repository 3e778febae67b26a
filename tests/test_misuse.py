"""Misuse the wrapper reports (once, with what to do), and correct loops that stay silent.

References: the large batch in float64 (one backward over the concatenated micro-batches).
"""

from __future__ import annotations

import copy
import gc
import io
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

from accumopt import AccumulatingOptimizer
from accumopt.misuse import MisuseWarning

K = 4


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def make_data(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64))
            for _ in range(n)]


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def large_batch(model: torch.nn.Module, data, lr: float = 0.1) -> torch.nn.Module:
    """One SGD step per window of K micro-batches, on the mean of their losses (the large batch)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for i in range(0, len(data), K):
        window = data[i:i + K]
        (sum(loss_fn(model, b) for b in window) / len(window)).backward()
        opt.step()
        opt.zero_grad()
    return model


def assert_close(a: torch.nn.Module, b: torch.nn.Module, rtol: float = 1e-12) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=0.0)


# ------------------------------------------------------------------ .grad cleared behind the wrapper's back
def test_model_zero_grad_mid_window_raises_in_inplace_mode():
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), K)
    data = make_data(3)
    loss_fn(model, data[0]).backward()
    opt.step()
    model.zero_grad()  # what the Hugging Face Trainer does after every optimizer.step()
    loss_fn(model, data[1]).backward()
    with pytest.raises(RuntimeError, match=r"window was lost.*opt\.zero_grad\(\).*model\.zero_grad\(\).*buffered"):
        opt.step()
    assert opt.pending == 1  # raised before changing anything
    loss_fn(model, data[2]).backward()
    opt.step()  # once per wrapper
    opt.discard()


def test_model_zero_grad_in_buffered_mode_is_harmless():
    """Buffered storage keeps the sums in its own buffers: model.zero_grad() loses nothing, silently."""
    data = make_data(2 * K)
    ref = large_batch(make_model(), data)
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), K, mode="buffered")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for b in data:
            loss_fn(model, b).backward()
            opt.step()
            model.zero_grad()
    assert_close(model, ref)


def test_legitimate_grad_replacements_are_accepted():
    """create_graph=True sums out of place; a mid-window load_state_dict after model.zero_grad() (Lightning)."""
    data = make_data(K)
    ref = large_batch(make_model(), data)
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), K)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MisuseWarning)
        # torch's own advice on create_graph=True (the .grad <-> graph reference cycle, broken at the end below)
        warnings.filterwarnings("ignore", r"Using backward\(\) with create_graph=True", UserWarning)
        loss_fn(model, data[0]).backward()
        opt.step()
        loss_fn(model, data[1]).backward(create_graph=True)  # .grad = .grad + new, a new tensor
        opt.step()
        saved = copy.deepcopy(opt.state_dict())
        model.zero_grad()
        opt.load_state_dict(saved)  # restores the sums into new .grad tensors
        for b in data[2:]:
            loss_fn(model, b).backward()
            opt.step()
            opt.zero_grad()
    for p in model.parameters():
        p.grad = None  # the create_graph gradient's graph
    assert_close(model, ref)


# ------------------------------------------------------------------ schedulers stepped per micro-batch
def test_scheduler_given_to_the_wrapper_and_stepped_in_the_loop_warns():
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=100)  # the LR does not even change
    opt = AccumulatingOptimizer(inner, K, scheduler=sched)
    with pytest.warns(MisuseWarning, match=r"scheduler StepLR given as scheduler=.*stepped more often"), \
            pytest.warns(UserWarning, match=r"lr_scheduler.step\(\)` before `optimizer.step\(\)"):  # torch's view
        for b in make_data(2):
            loss_fn(model, b).backward()
            opt.step()
            sched.step()  # the wrapper steps it already
            opt.zero_grad()
    opt.discard()  # the window stays open on purpose


@pytest.mark.parametrize("built_on", ["wrapper", "inner"])
def test_scheduler_stepped_on_every_micro_batch_warns_once(built_on):
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = AccumulatingOptimizer(inner, K)
    sched = torch.optim.lr_scheduler.LambdaLR(opt if built_on == "wrapper" else inner, lambda n: 1.0 / (n + 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in make_data(3 * K):
            loss_fn(model, b).backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    messages = [str(w.message) for w in caught if w.category is MisuseWarning]
    assert len(messages) == 1 and "K times too fast" in messages[0]


# ------------------------------------------------------------------ clipping a partial window
def test_clip_grad_norm_between_micro_steps_warns():
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), K)
    with pytest.warns(MisuseWarning, match=r"clip_grad_norm_.*max_grad_norm="):
        for b in make_data(K):
            loss_fn(model, b).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            opt.step()
            opt.zero_grad()


# ------------------------------------------------------------------ a window left pending
def _pending(model: torch.nn.Module) -> AccumulatingOptimizer:
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), K)
    for b in make_data(2):
        loss_fn(model, b).backward()
        opt.step()
    return opt


def test_pending_window_warns_when_the_wrapper_is_collected():
    model = make_model()
    opt = _pending(model)
    with pytest.warns(MisuseWarning, match=r"2 micro-batch\(es\) pending.*opt\.flush\(\)"):
        del opt
        gc.collect()
    flushed = _pending(model)
    flushed.flush()
    saved = _pending(model)
    saved.state_dict()  # a mid-window checkpoint (a preempted job): the window resumes from it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del flushed, saved  # no reference cycle: they go here, without gc


def test_pending_window_warns_at_interpreter_exit():
    code = textwrap.dedent("""
        import torch
        from accumopt import AccumulatingOptimizer
        model = torch.nn.Linear(3, 2)
        opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 4)
        for _ in range(3):
            model(torch.randn(2, 3)).sum().backward()
            opt.step()
        done = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 4)
        print("end of script")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "end of script" in out.stdout
    assert out.stderr.count("MisuseWarning") == 1
    assert "3 micro-batch(es) pending" in out.stderr and "opt.flush()" in out.stderr


# ------------------------------------------------------------------ dtype changed after wrapping
def test_bf16_after_wrapping_sums_in_fp32_again():
    """model.to(bfloat16) after wrapping: K=65 positive gradients, against the float64 sum of the same ones."""
    k = 65
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 16, bias=False)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), k)
    model.to(torch.bfloat16)  # after wrapping
    g = torch.Generator().manual_seed(2)
    xs = [torch.rand(4, 64, generator=g).bfloat16() for _ in range(k)]
    grads: list[torch.Tensor] = []
    opt.register_step_pre_hook(lambda o, a, kw: grads.append(model.weight.grad.clone()))
    for x in xs:
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    assert len(grads) == 1 and grads[0].dtype == torch.bfloat16
    # The same micro-batch gradients (bf16, as autograd produced them), summed in float64.
    w = torch.nn.Parameter(model.weight.detach().clone())
    reference = torch.zeros(16, 64, dtype=torch.float64)
    for x in xs:
        (x @ w.t()).sum().backward()
        reference += w.grad.double()
        w.grad = None
    # Not exact: each applied gradient is the fp32 mean rounded once to bf16 (2^-9 relative).
    err = float((grads[0].double() - reference / k).abs().max() / (reference / k).abs().max())
    assert err <= 2.0 ** -8  # summed in bf16 it was 6e-2

    # Bitwise what a wrapper built on the bf16 model gives (fp32 buffers planned from the start).
    torch.manual_seed(0)
    planned = torch.nn.Linear(64, 16, bias=False).to(torch.bfloat16)
    opt2 = AccumulatingOptimizer(torch.optim.SGD(planned.parameters(), lr=1.0), k)
    opt2.register_step_pre_hook(lambda o, a, kw: grads.append(planned.weight.grad.clone()))
    for x in xs:
        planned(x).sum().backward()
        opt2.step()
        opt2.zero_grad()
    assert torch.equal(grads[1], grads[0])


# ------------------------------------------------------------------ copies mid-window
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_mid_window_carries_the_pending_sums(how):
    data = make_data(2 * K)
    ref = large_batch(make_model(), data)
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), K)
    for b in data[:2]:
        loss_fn(model, b).backward()
        opt.step()
        opt.zero_grad()
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        buf = io.BytesIO()
        pickle.dump((model, opt), buf)
        model2, opt2 = pickle.loads(buf.getvalue())
    assert opt2.pending == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for b in data[2:]:
            loss_fn(model2, b).backward()
            opt2.step()
            opt2.zero_grad()
    assert_close(model2, ref)
    for b in data[2:]:  # the original is untouched by its copy
        loss_fn(model, b).backward()
        opt.step()
        opt.zero_grad()
    assert_close(model, ref)


# ------------------------------------------------------------------ correct loops stay silent
def _loop(kind: str, model: torch.nn.Module, data) -> AccumulatingOptimizer:
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs: dict = {}
    k = 1 if kind == "k1" else K
    if kind == "buffered":
        kwargs["mode"] = "buffered"
    if kind == "scaler":
        kwargs["scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    if kind == "scheduler":
        kwargs["scheduler"] = torch.optim.lr_scheduler.LambdaLR(inner, lambda n: 1.0 / (n + 1))
    if kind == "clip":
        kwargs["max_grad_norm"] = 0.05
    opt = AccumulatingOptimizer(inner, k, **kwargs)
    on_wrapper = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 0.9 ** n) if kind == "wrapper-scheduler" else None
    for i, b in enumerate(data):
        if kind == "two-losses":  # two backward passes per micro-batch
            (0.5 * loss_fn(model, b)).backward()
            (0.5 * loss_fn(model, b)).backward()
        elif kind in ("scaler",):
            opt.backward(loss_fn(model, b))
        else:
            loss_fn(model, b).backward()
        opt.step()
        if on_wrapper is not None and opt.stepped:
            on_wrapper.step()
        opt.zero_grad(set_to_none=(i % 2 == 0))
    opt.flush()
    return opt


@pytest.mark.parametrize("kind", ["k1", "inplace", "buffered", "scaler", "scheduler", "wrapper-scheduler", "clip",
                                  "two-losses"])
def test_correct_loops_emit_no_warning(kind):
    data = make_data(3 * K + 2)  # a partial last window, flushed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = _loop(kind, make_model(), data)
        assert opt.pending == 0
        del opt
        gc.collect()


def test_the_checks_keep_no_gradient_alive():
    """The wrapper remembers .grad weakly: after flush() and zero_grad() the window's tensors are freed."""
    import weakref

    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), K)
    for b in make_data(2):
        loss_fn(model, b).backward()
        opt.step()
        opt.zero_grad()
    refs = [weakref.ref(p.grad) for p in model.parameters()]
    opt.flush()
    opt.zero_grad()
    assert all(r() is None for r in refs)


# ------------------------------------------------------------ correct loops that once looked like misuse
@pytest.mark.parametrize("k,epoch", [(8, 10), (3, 4)])
def test_per_epoch_scheduler_with_windows_spanning_epochs_is_silent(k, epoch):
    """A per-epoch StepLR changes the LR once per epoch, inside some window: not a per-micro-batch scheduler."""
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.9)
    data = make_data(6 * epoch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for e in range(6):
            for b in data[e * epoch:(e + 1) * epoch]:
                loss_fn(model, b).backward()
                opt.step()
                opt.zero_grad()
            sched.step()
        opt.flush()


def test_scheduler_restored_before_training_is_silent():
    """scheduler= restored (resumed at update 10) after the wrapper is built is not 'stepped in the loop'."""
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(inner, 2, 0.5)
    opt = AccumulatingOptimizer(inner, 3, scheduler=sched)
    sched.load_state_dict({**sched.state_dict(), "last_epoch": 10, "_step_count": 11})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for b in make_data(7):
            loss_fn(model, b).backward()
            opt.step()
            opt.zero_grad()
        opt.flush()


def test_a_wrapper_that_only_loaded_a_pending_window_goes_silently():
    """Loading a mid-window state to inspect it, then dropping the wrapper: the window is in its file."""
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), K, mode="buffered")
    for b in make_data(2):
        loss_fn(model, b).backward()
        opt.step()
        opt.zero_grad()
    state = copy.deepcopy(opt.state_dict())
    opt.discard()
    other = AccumulatingOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), K, mode="buffered")
    other.load_state_dict(state)
    assert other.pending == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del other
        gc.collect()

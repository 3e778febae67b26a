"""Non-finite gradients: the ``nonfinite=`` policies, with and without a GradScaler.

A NaN/inf is injected into micro-batch j of window w. The reference is a plain
torch run (SGD with momentum + StepLR) that applies, per window, the large-batch update on
the micro-batches the policy keeps, or nothing for a skipped window.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from accumopt import AccumulatingOptimizer, NonFiniteGradientError
from accumopt.misuse import MisuseWarning

K, W, B = 3, 3, 2
BAD_VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def make_model(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(dtype)


def data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(K * W * B, 4, generator=g).to(dtype), torch.randn(K * W * B, 2, generator=g).to(dtype)


def micro(xs: torch.Tensor, ys: torch.Tensor, w: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    i = (w * K + j) * B
    return xs[i:i + B], ys[i:i + B]


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).pow(2).mean()


def inject(model: torch.nn.Module, kind: str) -> None:
    model[0].weight.grad[1, 2] = BAD_VALUES[kind]


def reference(policy_effect: str, bad: tuple[int, int] | None):
    """Plain torch: per window the large-batch step on the kept micro-batches ('drop') or none ('skip')."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    xs, ys = data()
    for w in range(W):
        keep = list(range(K))
        if bad is not None and bad[0] == w:
            if policy_effect == "skip":
                continue
            keep.remove(bad[1])
        x = torch.cat([micro(xs, ys, w, j)[0] for j in keep])
        y = torch.cat([micro(xs, ys, w, j)[1] for j in keep])
        loss_fn(model, x, y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out.extend(v.clone() for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor))
    return out


def run(policy: str, mode: str, bad: tuple[int, int] | None, kind: str = "nan", pattern: str | None = None,
        scaler: torch.amp.GradScaler | None = None):
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)
    opt = AccumulatingOptimizer(inner, K, mode=mode, nonfinite=policy, scheduler=sched, model=model,
                                scaler=scaler if pattern == "owned" else None)
    xs, ys = data()
    raised = []
    # inject() edits .grad in place after backward, as clip_grad_norm_ would: past a window's first micro-batch,
    # in mode="inplace", that is an edit of the window's sum, and the wrapper reports it (once), as it should.
    in_place_edit = mode == "inplace" and bad is not None and bad[1] > 0
    with pytest.warns(MisuseWarning, match="changed in place between micro-steps") if in_place_edit \
            else contextlib.nullcontext():
        for w in range(W):
            before = snapshot(model, inner)
            lr_before = sched.get_last_lr()
            for j in range(K):
                loss = loss_fn(model, *micro(xs, ys, w, j))
                (scaler.scale(loss) if pattern else loss).backward()
                if bad == (w, j):
                    inject(model, kind)
                try:
                    if pattern == "external":
                        scaler.step(opt)
                    else:
                        opt.step()
                except NonFiniteGradientError as e:
                    raised.append(str(e))
                finally:
                    if pattern == "external":
                        scaler.update()
                opt.zero_grad()
            assert opt.pending == 0
            if bad is not None and bad[0] == w and not opt.stepped:  # a skipped window leaves everything untouched
                assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model, inner)))
                assert sched.get_last_lr() == lr_before
    return model, opt, sched, raised


def assert_same_run(model, opt, sched, ref_model, ref_opt, ref_sched, tol: float = 1e-10) -> None:
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.isfinite(p).all(), n
        assert ((p - q).norm() / q.norm()).item() <= tol, n
    for p, q in zip(model.parameters(), ref_model.parameters()):
        s, r = opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"]
        assert ((s - r).norm() / r.norm()).item() <= tol
    assert sched.get_last_lr() == pytest.approx(ref_sched.get_last_lr(), rel=1e-12)


@settings(max_examples=20)
@given(w=st.integers(0, W - 1), j=st.integers(0, K - 1), policy=st.sampled_from(["skip", "drop", "raise"]),
       kind=st.sampled_from(list(BAD_VALUES)), mode=st.sampled_from(["inplace", "buffered"]))
def test_policy_outcome_without_scaler(w: int, j: int, policy: str, kind: str, mode: str) -> None:
    if policy == "drop":
        mode = "buffered"
    model, opt, sched, raised = run(policy, mode, (w, j), kind)
    ref = reference("drop" if policy == "drop" else "skip", (w, j))
    assert_same_run(model, opt, sched, *ref)
    stats = opt.stats()
    if policy == "raise":
        assert len(raised) == 1 and "'0.weight'" in raised[0] and "nonfinite='raise'" in raised[0]
        assert opt.num_updates == W - 1
    else:
        assert not raised
    assert stats["skipped_updates"] == (1 if policy in ("skip", "raise") else 0)  # a raised window is not applied
    assert stats["dropped_micro_batches"] == (1 if policy == "drop" else 0)
    assert stats["nonfinite_events"] == 1


def test_clean_run_equals_reference_for_every_policy() -> None:
    ref = reference("skip", None)
    for policy, mode in (("ignore", "inplace"), ("skip", "inplace"), ("drop", "buffered"), ("raise", "buffered")):
        model, opt, sched, raised = run(policy, mode, None)
        assert not raised
        assert_same_run(model, opt, sched, *ref)


def test_ignore_applies_nan_like_torch() -> None:
    """The default policy does what a torch optimizer does with a NaN gradient: it applies it."""
    model, opt, _, _ = run("ignore", "inplace", (W - 1, 1))  # the last window: one step with the NaN
    assert not torch.isfinite(model[0].weight).all()
    plain = make_model()
    p = plain[0].weight
    p.grad = torch.zeros_like(p)
    p.grad[1, 2] = math.nan
    torch.optim.SGD([p], lr=0.1, momentum=0.9).step()
    assert torch.equal(torch.isfinite(model[0].weight), torch.isfinite(p))


def test_drop_every_micro_batch_skips_the_window() -> None:
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = AccumulatingOptimizer(inner, K, mode="buffered", nonfinite="drop")
    xs, ys = data()
    before = snapshot(model, inner)
    for j in range(K):
        loss_fn(model, *micro(xs, ys, 0, j)).backward()
        inject(model, "inf")
        opt.step()
        opt.zero_grad()
    assert not opt.stepped and opt.num_updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model, inner)))
    assert opt.stats()["skipped_updates"] == 1
    assert opt.stats()["dropped_micro_batches"] == K


def test_bf16_nonfinite_sum_skipped_and_buffers_cleared() -> None:
    """Checklist 9: bf16 parameters, no scaler: step skipped, fp32 buffers cleared, skip counted."""
    model = make_model(torch.bfloat16)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, nonfinite="skip")
    xs, ys = data(torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn(model, xs[:2], ys[:2]).backward()
    inject(model, "inf")
    opt.step()
    assert any(not torch.isfinite(s).all() for s in opt.state_dict()["accumulation"]["sums"])
    loss_fn(model, xs[2:4], ys[2:4]).backward()
    opt.step()
    assert not opt.stepped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(s is None or not s.any() for s in opt.state_dict()["accumulation"]["sums"])
    assert opt.stats()["skipped_updates"] == 1
    # the next window is clean and applied
    for i in (4, 6):
        loss_fn(model, xs[i:i + 2], ys[i:i + 2]).backward()
        opt.step()
    assert opt.stepped and all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------ with a GradScaler

@settings(max_examples=12)
@given(w=st.integers(0, W - 1), j=st.integers(0, K - 1), kind=st.sampled_from(list(BAD_VALUES)),
       policy=st.sampled_from(["ignore", "skip", "drop", "raise"]))
def test_external_scaler_overflow(w: int, j: int, kind: str, policy: str) -> None:
    """The standard AMP loop: an overflowing micro-batch is dropped ('ignore'/'drop') or skips the window."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    model, opt, sched, raised = run(policy, "buffered", (w, j), kind, pattern="external", scaler=scaler)
    assert len(raised) == (1 if policy == "raise" else 0)
    if raised:
        assert "'0.weight'" in raised[0]
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    effect = "skip" if policy in ("skip", "raise") else "drop"
    assert_same_run(model, opt, sched, *reference(effect, (w, j)))
    assert scaler.get_scale() == 2.0**7  # GradScaler backed off once (for the one overflowing micro-step)


@settings(max_examples=12)
@given(w=st.integers(0, W - 1), j=st.integers(0, K - 1), kind=st.sampled_from(list(BAD_VALUES)),
       policy=st.sampled_from(["ignore", "skip", "drop", "raise"]))
def test_owned_scaler_overflow(w: int, j: int, kind: str, policy: str) -> None:
    """Owned scaler: the window is skipped (or only the micro-batch dropped); the scale backs off exactly once."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    mode = "buffered" if policy == "drop" else "inplace"
    model, opt, sched, raised = run(policy, mode, (w, j), kind, pattern="owned", scaler=scaler)
    effect = "drop" if policy == "drop" else "skip"
    assert_same_run(model, opt, sched, *reference(effect, (w, j)))
    assert scaler.get_scale() == 2.0**8 * 2.0 ** (W - 1) * 0.5  # W-1 clean windows, one backoff
    assert len(raised) == (1 if policy == "raise" else 0)
    if raised:
        assert "'0.weight'" in raised[0]


def _two_branches() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1).double(), torch.nn.Linear(3, 1).double()


@pytest.mark.parametrize("pattern", ["drop", "owned scaler + drop", "external scaler"])
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_parameter_used_only_by_a_dropped_micro_batch_gets_no_gradient(pattern: str, optim: str) -> None:
    """The large batch without the dropped micro-batch gives a branch used only there no gradient, so
    torch skips it (no momentum, weight decay or Adam step); the wrapper must not hand it a zero."""
    def make(params):
        if optim == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
        return torch.optim.Adam(params, lr=0.1)

    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a_ref, b_ref = _two_branches()
    ref = make([*a_ref.parameters(), *b_ref.parameters()])
    (a_ref(x).pow(2).mean() + b_ref(x).pow(2).mean()).backward()  # window 1: both branches, 2 halves
    ref.step()
    ref.zero_grad()
    a_ref(x[:2]).pow(2).mean().backward()  # window 2 without its dropped micro-batch: branch A only
    ref.step()

    a, b = _two_branches()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    kwargs = {"mode": "buffered"}
    if pattern != "external scaler":
        kwargs["nonfinite"] = "drop"
    if pattern == "owned scaler + drop":
        kwargs["scaler"] = scaler
    opt = AccumulatingOptimizer(make([*a.parameters(), *b.parameters()]), 2, **kwargs)

    def micro(loss: torch.Tensor) -> None:
        if pattern == "external scaler":
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            opt.backward(loss)
            opt.step()
        opt.zero_grad()

    micro(a(x[:2]).pow(2).mean() + b(x[:2]).pow(2).mean())
    micro(a(x[2:]).pow(2).mean() + b(x[2:]).pow(2).mean())
    micro(a(x[:2]).pow(2).mean())
    micro(b(x[2:]).pow(2).mean() * math.nan)  # branch B only, non-finite: dropped
    assert opt.num_updates == 2
    for p, q in zip([*a.parameters(), *b.parameters()], [*a_ref.parameters(), *b_ref.parameters()]):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    for p, q in zip(opt.optimizer.state_dict()["state"].values(), ref.state_dict()["state"].values()):
        for key in q:
            torch.testing.assert_close(p[key], q[key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("pattern", ["drop", "external scaler"])
def test_sparse_gradients_with_a_droppable_micro_batch(pattern: str) -> None:
    """Sparse gradients (nn.Embedding(sparse=True)) on the drop path: no crash, a clean window exact."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3, sparse=True).double()
    ref = torch.nn.Embedding(10, 3, sparse=True).double()
    ref.load_state_dict(emb.state_dict())
    idx = torch.tensor([[1, 2], [3, 1], [4, 5], [1, 9]])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    opt = AccumulatingOptimizer(torch.optim.SparseAdam(emb.parameters(), lr=0.1), 2, mode="buffered",
                                nonfinite="drop" if pattern == "drop" else "ignore")
    for j in range(2):
        loss = emb(idx[2 * j:2 * j + 2]).pow(2).mean()
        if pattern == "drop":
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    ref_opt = torch.optim.SparseAdam(ref.parameters(), lr=0.1)
    ref(idx).pow(2).mean().backward()
    ref_opt.step()
    torch.testing.assert_close(emb.weight, ref.weight, rtol=1e-12, atol=1e-14)

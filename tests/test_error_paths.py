"""An error raised mid-loop leaves nothing behind that changes a later window."""

import copy

import pytest
import torch

import accumopt


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _data(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)


def _large_batch(model, x, y, lr=0.1):
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    torch.nn.functional.mse_loss(ref(x), y).backward()
    opt.step()
    return list(ref.parameters())


def test_external_scaler_error_leaves_no_stale_scale():
    """GradScaler deletes grad_scale/found_inf only after a successful step; a failed step must not
    leave them on the wrapper, where the next scaler.step would multiply them into its scale."""
    model = _model()
    x, y = _data(8)
    want = _large_batch(model, x, y)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = accumopt.AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, mode="buffered")
    scaler.scale(torch.nn.functional.mse_loss(model(x[:4]), y[:4])).backward()
    with pytest.raises(ValueError, match="Invalid weight"):
        scaler.step(opt, weight=-1.0)
    assert "grad_scale" not in vars(opt) and "found_inf" not in vars(opt)
    opt.zero_grad()
    scaler.update()
    for i in range(2):
        scaler.scale(torch.nn.functional.mse_loss(model(x[4 * i:4 * i + 4]), y[4 * i:4 * i + 4])).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert opt.num_updates == 1
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p, w, rtol=1e-5, atol=1e-6)


def test_raise_policy_discards_the_window_losses_and_counts_a_skip():
    model = _model().double()
    x, y = (t.double() for t in _data(8))
    opt = accumopt.AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, nonfinite="raise",
                                         model=model)
    loss = torch.nn.functional.mse_loss(model(x[:4]), y[:4]) * float("nan")
    loss.backward()
    opt.step(loss=loss)
    loss = torch.nn.functional.mse_loss(model(x[4:]), y[4:])
    loss.backward()
    with pytest.raises(accumopt.NonFiniteGradientError):
        opt.step(loss=loss)
    losses = []
    for i in range(2):
        loss = torch.nn.functional.mse_loss(model(x[4 * i:4 * i + 4]), y[4 * i:4 * i + 4])
        losses.append(loss.item())
        loss.backward()
        opt.step(loss=loss)
    s = opt.stats()
    assert s["skipped_updates"] == 1 and s["updates"] == 1
    assert s["last_loss"] == pytest.approx(sum(losses) / 2, rel=1e-12)  # not NaN from the raised window


def test_discard_forgets_a_dropped_micro_batch():
    """Owned scaler + drop: an overflow backs the scale off at the window's end, unless the window was discarded."""
    model = _model()
    x, y = _data(8)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1000)
    opt = accumopt.AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, mode="buffered",
                                         scaler=scaler, nonfinite="drop")
    opt.backward(torch.nn.functional.mse_loss(model(x[:4]), y[:4]) * float("inf"))
    opt.step()
    opt.discard()
    for i in range(2):
        opt.backward(torch.nn.functional.mse_loss(model(x[4 * i:4 * i + 4]), y[4 * i:4 * i + 4]))
        opt.step()
    assert opt.num_updates == 1
    assert scaler.get_scale() == 256.0


def test_flush_of_an_empty_window_resets_stepped():
    model = _model()
    x, y = _data(8)
    opt = accumopt.AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 1)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert opt.stepped
    assert opt.flush() is False
    assert not opt.stepped


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
def test_error_at_the_boundary_before_the_step_discards_the_window(mode, monkeypatch):
    """An error between finalize and the inner step (here a simulated OOM in clipping) must not leave
    half-divided sums behind: the window is discarded, the parameters unchanged, and the next window
    equals a fresh large batch."""
    model = _model()
    x, y = _data(16)
    before = [p.detach().clone() for p in model.parameters()]
    want = _large_batch(model, x[8:], y[8:])
    opt = accumopt.AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, mode=mode,
                                         max_grad_norm=1e9)
    real = torch.nn.utils.clip_grad_norm_
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", flaky)
    for i in range(2):
        torch.nn.functional.mse_loss(model(x[4 * i:4 * i + 4]), y[4 * i:4 * i + 4]).backward()
        if i == 1:
            with pytest.raises(torch.OutOfMemoryError):
                opt.step()
        else:
            opt.step()
        opt.zero_grad()
    assert opt.pending == 0 and opt.num_updates == 0
    assert all(p.grad is None for p in model.parameters())
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for i in (2, 3):
        torch.nn.functional.mse_loss(model(x[4 * i:4 * i + 4]), y[4 * i:4 * i + 4]).backward()
        opt.step()
        opt.zero_grad()
    assert opt.num_updates == 1
    for p, q in zip(model.parameters(), want):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_bad_schedule_value_at_a_boundary_leaves_a_consistent_wrapper():
    """A callable K schedule that returns a bad value raises when the window closes; the update it
    closed stands (stepped, counted), K stays, and training can go on."""
    model = _model()
    x, y = _data(16)
    opt = accumopt.AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                         lambda n: 2 if n == 0 else 0)
    torch.nn.functional.mse_loss(model(x[:4]), y[:4]).backward()
    opt.step()
    torch.nn.functional.mse_loss(model(x[4:8]), y[4:8]).backward()
    with pytest.raises(ValueError, match=r"accumulation_steps\(1\): 0"):
        opt.step()
    assert opt.stepped and opt.num_updates == 1 and opt.pending == 0 and opt.accumulation_steps == 2


def test_zero_sum_of_cpu_tensor_weights_is_refused():
    """CPU tensor weights are host values: a window whose weights sum to 0 is refused as with numbers
    (no device read is involved), and AdamW's weight decay does not move the parameters."""
    model = _model()
    x, y = _data(8)
    before = [p.detach().clone() for p in model.parameters()]
    opt = accumopt.AccumulatingOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5), 2,
                                         mode="buffered")
    torch.nn.functional.mse_loss(model(x[:4]), y[:4]).backward()
    opt.step(weight=torch.tensor(0))
    torch.nn.functional.mse_loss(model(x[4:]), y[4:]).backward()
    with pytest.raises(ValueError, match="sum to 0"):
        opt.step(weight=torch.tensor(0))
    assert opt.num_updates == 0 and not opt.optimizer.state
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)

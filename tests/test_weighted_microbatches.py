"""Weighted micro-batches: sample- and token-weighted accumulation equals the large batch.

References are independent of accumopt: the plain torch optimizer stepping once
on the concatenated batch, in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from accumopt import AccumulatingOptimizer

DT = torch.float64
TOL = 1e-10


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(DT)


def _make_opt(name: str, params) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _deviation(model, opt, ref_model, ref_opt) -> float:
    """Largest relative deviation over parameters and optimizer state tensors."""
    dev = max(_rel(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))
    for p, q in zip(model.parameters(), ref_model.parameters()):
        for key, v in ref_opt.state[q].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0:
                dev = max(dev, _rel(opt.state[p][key], v))
    return dev


def _reference(model, opt_name, batches):
    ref = copy.deepcopy(model)
    opt = _make_opt(opt_name, ref.parameters())
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        opt.step()
    return ref, opt


def _accumulated(model, opt_name, batches, sizes, *, route: str, weight_kind: str):
    """route: 'step' (buffered, step(weight=)), 'backward' (inplace, backward(weight=)), 'none' (uniform)."""
    acc = copy.deepcopy(model)
    mode = "buffered" if route == "step" else "inplace"
    opt = AccumulatingOptimizer(_make_opt(opt_name, acc.parameters()), len(sizes), mode=mode)
    for x, y in batches:
        for xs, ys in zip(x.split(sizes), y.split(sizes)):
            loss = F.mse_loss(acc(xs), ys)  # plain mean over the micro-batch
            n = len(xs) if weight_kind == "number" else torch.tensor(len(xs))
            if route == "step":
                loss.backward()
                opt.step(weight=n)
            elif route == "backward":
                opt.backward(loss, weight=n)
                opt.step()
            else:
                loss.backward()
                opt.step()
            opt.zero_grad()
        assert opt.pending == 0
    return acc, opt


@settings(max_examples=12)
@given(
    sizes=st.lists(st.integers(1, 7), min_size=1, max_size=5),
    opt_name=st.sampled_from(["sgd", "adamw"]),
    route=st.sampled_from(["step", "backward"]),
    weight_kind=st.sampled_from(["number", "tensor"]),
    seed=st.integers(0, 2**16),
)
def test_uneven_sample_weighted_equals_large_batch(sizes, opt_name, route, weight_kind, seed):
    model = _model(seed)
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    batches = [(torch.randn(n, 5, generator=g, dtype=DT), torch.randn(n, 3, generator=g, dtype=DT)) for _ in range(2)]
    ref, ref_opt = _reference(model, opt_name, batches)
    acc, opt = _accumulated(model, opt_name, batches, sizes, route=route, weight_kind=weight_kind)
    assert opt.num_updates == 2
    assert _deviation(acc, opt, ref, ref_opt) <= TOL


@settings(max_examples=8)
@given(
    sizes=st.lists(st.integers(1, 7), min_size=2, max_size=5).filter(lambda s: len(set(s)) > 1),
    opt_name=st.sampled_from(["sgd", "adamw"]),
    seed=st.integers(0, 2**16),
)
def test_uniform_average_is_wrong_for_uneven_sizes(sizes, opt_name, seed):
    """Control: the unweighted mean of micro-batch means is measurably off the large batch."""
    model = _model(seed)
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    batches = [(torch.randn(n, 5, generator=g, dtype=DT), torch.randn(n, 3, generator=g, dtype=DT)) for _ in range(2)]
    ref, ref_opt = _reference(model, opt_name, batches)
    uniform, uopt = _accumulated(model, opt_name, batches, sizes, route="none", weight_kind="number")
    weighted, wopt = _accumulated(model, opt_name, batches, sizes, route="step", weight_kind="number")
    assert _deviation(weighted, wopt, ref, ref_opt) <= TOL
    assert _deviation(uniform, uopt, ref, ref_opt) > 1e-6


def test_equal_sizes_weighted_and_uniform_agree():
    """With equal sizes the weights cancel: weighted == uniform (to rounding)."""
    model = _model(3)
    x, y = torch.randn(12, 5, dtype=DT), torch.randn(12, 3, dtype=DT)
    a, aopt = _accumulated(model, "adamw", [(x, y)], [4, 4, 4], route="step", weight_kind="number")
    b, bopt = _accumulated(model, "adamw", [(x, y)], [4, 4, 4], route="none", weight_kind="number")
    assert max(_rel(p, q) for p, q in zip(a.parameters(), b.parameters())) <= TOL


# ----------------------------------------------------------------- tokens
PAD, VOCAB = 0, 11


class _TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 6)
        self.rnn = torch.nn.Linear(6, 6)
        self.out = torch.nn.Linear(6, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.rnn(self.emb(tokens)))).cumsum(1) / 4


def _padded_batch(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = max(lengths) + 1
    tokens = torch.full((len(lengths), T), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, : n + 1] = torch.randint(1, VOCAB, (n + 1,), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    for i, n in enumerate(lengths):
        targets[i, n:] = PAD  # positions past the sequence are padding
    return inputs, targets


def _token_loss(model, inputs, targets):
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=PAD)  # mean over real tokens


@pytest.mark.parametrize("mode", ["buffered", "inplace"])
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_token_weighted_cross_entropy_equals_full_batch_token_mean(mode, opt_name):
    torch.manual_seed(0)
    model = _TinyLM().to(DT)
    lengths = [1, 9, 3, 7, 2, 8, 5, 1]  # very uneven token counts
    inputs, targets = _padded_batch(lengths, seed=1)
    split = [1, 3, 2, 2]  # sequences per micro-batch

    ref = copy.deepcopy(model)
    ref_opt = _make_opt(opt_name, ref.parameters())
    for _ in range(2):
        ref_opt.zero_grad()
        _token_loss(ref, inputs, targets).backward()
        ref_opt.step()

    acc = copy.deepcopy(model)
    opt = AccumulatingOptimizer(_make_opt(opt_name, acc.parameters()), len(split), mode=mode)
    counts = []
    for _ in range(2):
        for xi, ti in zip(inputs.split(split), targets.split(split)):
            loss = _token_loss(acc, xi, ti)
            n_tokens = (ti != PAD).sum()  # a tensor (on the device in real runs): no .item()
            counts.append(int(n_tokens))
            if mode == "buffered":
                loss.backward()
                opt.step(weight=n_tokens)
            else:
                opt.backward(loss, weight=n_tokens)
                opt.step()
            opt.zero_grad()
    assert len(set(counts)) > 1 and opt.num_updates == 2
    assert _deviation(acc, opt, ref, ref_opt) <= TOL

    # Control: uniform averaging of the per-micro-batch token means is off.
    uni = copy.deepcopy(model)
    uopt = AccumulatingOptimizer(_make_opt(opt_name, uni.parameters()), len(split), mode=mode)
    for _ in range(2):
        for xi, ti in zip(inputs.split(split), targets.split(split)):
            _token_loss(uni, xi, ti).backward()
            uopt.step()
            uopt.zero_grad()
    assert _deviation(uni, uopt, ref, ref_opt) > 1e-6


# ------------------------------------------------------- flush and mixing
@pytest.mark.parametrize("mode", ["buffered", "inplace"])
def test_flush_partial_window_uses_weights(mode):
    model = _model(5)
    x, y = torch.randn(9, 5, dtype=DT), torch.randn(9, 3, dtype=DT)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    F.mse_loss(ref(x), y).backward()
    ref_opt.step()

    acc = copy.deepcopy(model)
    opt = AccumulatingOptimizer(torch.optim.SGD(acc.parameters(), lr=0.1), 8, mode=mode)
    for xs, ys in zip(x.split([6, 3]), y.split([6, 3])):  # 2 of 8 micro-batches, then flush
        loss = F.mse_loss(acc(xs), ys)
        if mode == "buffered":
            loss.backward()
            opt.step(weight=len(xs))
        else:
            opt.backward(loss, weight=len(xs))
            opt.step()
        opt.zero_grad()
    assert opt.num_updates == 0 and opt.flush()
    assert max(_rel(p, q) for p, q in zip(acc.parameters(), ref.parameters())) <= TOL


def test_weighted_and_unweighted_calls_mix_with_weight_one():
    """An unweighted micro-batch counts 1: sizes (1, 3) as weights (default, 3)."""
    model = _model(6)
    x, y = torch.randn(4, 5, dtype=DT), torch.randn(4, 3, dtype=DT)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    F.mse_loss(ref(x), y).backward()
    ref_opt.step()
    acc = copy.deepcopy(model)
    opt = AccumulatingOptimizer(torch.optim.SGD(acc.parameters(), lr=0.1), 2, mode="buffered")
    F.mse_loss(acc(x[:1]), y[:1]).backward()
    opt.step()
    opt.zero_grad()
    F.mse_loss(acc(x[1:]), y[1:]).backward()
    opt.step(weight=3)
    assert max(_rel(p, q) for p, q in zip(acc.parameters(), ref.parameters())) <= TOL
    assert opt.stats()["samples"] == 4


def test_weights_in_float64_even_for_float32_tensor_weights():
    """Token counts given as int or float32 tensors are summed and inverted in float64."""
    model = _model(7)
    x, y = torch.randn(10, 5, dtype=DT), torch.randn(10, 3, dtype=DT)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    F.mse_loss(ref(x), y).backward()
    ref_opt.step()
    acc = copy.deepcopy(model)
    opt = AccumulatingOptimizer(torch.optim.SGD(acc.parameters(), lr=0.1), 3, mode="buffered")
    for xs, ys, dtype in zip(x.split([3, 4, 3]), y.split([3, 4, 3]), [torch.float32, torch.int32, torch.bool]):
        F.mse_loss(acc(xs), ys).backward()
        w = torch.tensor(len(xs)).to(dtype) if dtype != torch.bool else torch.tensor(True)
        opt.step(weight=w * 3 if dtype == torch.bool else w)  # bool*3 -> int64 tensor 3
        opt.zero_grad()
    assert max(_rel(p, q) for p, q in zip(acc.parameters(), ref.parameters())) <= TOL


# ------------------------------------------------------------------ errors
def _simple_opt(mode="buffered", k=2):
    model = _model(0)
    return model, AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), k, mode=mode)


@pytest.mark.parametrize(
    "weight, exc, message",
    [
        (-1, ValueError, "Invalid weight: -1.0 (expected a number >= 0)"),
        (float("nan"), ValueError, "Invalid weight: nan (expected a finite number)"),
        (float("inf"), ValueError, "Invalid weight: inf (expected a finite number)"),
        (torch.tensor(-2.0), ValueError, "Invalid weight: -2.0 (expected a number >= 0)"),
        (torch.ones(2), ValueError, "Invalid weight: a tensor of shape (2,) (expected one element)"),
        ("3", TypeError, "Invalid weight: '3' (expected a real number, got str)"),
        (True, TypeError, "Invalid weight: True (expected a real number, got bool)"),
    ],
)
def test_bad_micro_batch_weights_rejected(weight, exc, message):
    model, opt = _simple_opt()
    F.mse_loss(model(torch.randn(2, 5, dtype=DT)), torch.randn(2, 3, dtype=DT)).backward()
    with pytest.raises(exc) as info:
        opt.step(weight=weight)
    assert str(info.value) == message
    assert opt.pending == 0  # nothing counted
    with pytest.raises(exc) as info:
        opt.backward(F.mse_loss(model(torch.randn(2, 5, dtype=DT)), torch.randn(2, 3, dtype=DT)), weight=weight)
    assert str(info.value) == message


def test_step_weight_in_inplace_mode_points_to_backward():
    model, opt = _simple_opt(mode="inplace")
    calls = []

    def closure():
        calls.append(1)
        loss = F.mse_loss(model(torch.randn(2, 5, dtype=DT)), torch.randn(2, 3, dtype=DT))
        loss.backward()
        return loss

    with pytest.raises(ValueError) as info:
        opt.step(closure, weight=2)
    assert str(info.value) == (
        "Invalid weight: step(weight=...) with mode='inplace': this micro-batch's gradient is already "
        "summed into .grad and cannot be reweighted. Give the weight before backward with "
        "opt.backward(loss, weight=n), or build the wrapper with mode='buffered'."
    )
    assert calls == [] and opt.pending == 0  # rejected before the closure ran
    opt.step(closure, weight=1)  # weight 1 is the default and always fine
    assert opt.pending == 1
    opt.discard()  # the window stays open on purpose


def test_weight_given_to_backward_and_step_rejected():
    model, opt = _simple_opt()
    opt.backward(F.mse_loss(model(torch.randn(2, 5, dtype=DT)), torch.randn(2, 3, dtype=DT)), weight=2)
    with pytest.raises(ValueError, match="given both to backward\\(\\) and to step\\(\\)"):
        opt.step(weight=2)


def test_window_with_zero_total_weight_rejected_and_discarded():
    model, opt = _simple_opt(k=2)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        F.mse_loss(model(torch.randn(2, 5, dtype=DT)), torch.randn(2, 3, dtype=DT)).backward()
        if opt.pending == 1:
            with pytest.raises(ValueError) as info:
                opt.step(weight=0)
        else:
            opt.step(weight=0)
    assert str(info.value) == (
        "Invalid weights: the 2 micro-batch weights of this window sum to 0 "
        "(expected a positive total; the window was discarded)"
    )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.pending == 0 and opt.num_updates == 0
    assert all(p.grad is None for p in model.parameters())


def test_zero_grad_forgets_weight_of_cleared_gradient():
    """buffered mode: zero_grad() after backward(weight=) discards both the gradient and its weight."""
    model = _model(8)
    x, y = torch.randn(4, 5, dtype=DT), torch.randn(4, 3, dtype=DT)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    F.mse_loss(ref(x), y).backward()
    ref_opt.step()
    acc = copy.deepcopy(model)
    opt = AccumulatingOptimizer(torch.optim.SGD(acc.parameters(), lr=0.1), 1, mode="buffered")
    opt.backward(F.mse_loss(acc(torch.randn(7, 5, dtype=DT)), torch.randn(7, 3, dtype=DT)), weight=7)
    opt.zero_grad()  # the user abandons that micro-batch
    opt.backward(F.mse_loss(acc(x), y), weight=4)
    opt.step()
    assert max(_rel(p, q) for p, q in zip(acc.parameters(), ref.parameters())) <= TOL


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
@pytest.mark.parametrize("weight_kind", ["number", "tensor"])
def test_scale_free_weights_with_owned_scaler_equal_large_batch(mode, weight_kind):
    """Owned GradScaler: the loss is multiplied by w / w_ref (in-place sums) or not at all (buffers); the update
    is still the token-weighted large batch, in float64 to 1e-10, with weights of very different sizes."""
    sizes = [3, 1, 5, 2]
    tokens = [4096.0, 1.0, 523.0, 16.0]  # weights of the micro-batches, not their sizes
    model = _model(11)
    g = torch.Generator().manual_seed(12)
    n = sum(sizes)
    batches = [(torch.randn(n, 5, generator=g, dtype=DT), torch.randn(n, 3, generator=g, dtype=DT)) for _ in range(3)]
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.1)
    for x, y in batches:  # sum_i t_i mean_i / sum_i t_i, computed directly
        ref_opt.zero_grad()
        losses = [F.mse_loss(ref(xs), ys) * t for xs, ys, t in zip(x.split(sizes), y.split(sizes), tokens)]
        (sum(losses) / sum(tokens)).backward()
        ref_opt.step()
    acc = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    opt = AccumulatingOptimizer(torch.optim.AdamW(acc.parameters(), lr=0.05, weight_decay=0.1), len(sizes),
                                mode=mode, scaler=scaler)
    for x, y in batches:
        for xs, ys, t in zip(x.split(sizes), y.split(sizes), tokens):
            opt.backward(F.mse_loss(acc(xs), ys), weight=t if weight_kind == "number" else torch.tensor(t))
            opt.step()
            opt.zero_grad()
    assert opt.num_updates == 3 and scaler.get_scale() == 2.0**13
    assert _deviation(acc, opt, ref, ref_opt) <= TOL


def test_unweighted_backward_after_a_weighted_first_micro_batch_is_refused_in_place():
    """Scale-free in-place sums are relative to the window's first weight: a raw loss.backward() later in the
    window cannot be placed in that unit, and is refused with the fix; opt.backward(loss) counts 1."""
    model = _model(2)
    x = torch.randn(4, 5, dtype=DT)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 3,
                                scaler=torch.amp.GradScaler("cpu", init_scale=4.0))
    opt.backward(model(x).sum(), weight=7.0)
    opt.step()
    opt.backward(model(x).sum())  # no weight: counts 1, placed in the window's unit
    opt.step()
    assert opt.pending == 2
    model(x).sum().backward()
    with pytest.raises(ValueError, match=r"opt.backward\(loss, weight=n\)"):
        opt.step()
    opt.discard()  # the refused micro-batch ends the test mid-window


def test_second_weighted_backward_in_one_micro_batch_with_buffers_is_refused():
    """With buffers, step() applies the weight to the micro-batch's whole gradient: a second weighted
    backward in the same micro-batch cannot be told apart, so it is refused before it runs."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, mode="buffered")
    x = torch.randn(4, 4, dtype=torch.float64)
    opt.backward(model(x[:1]).pow(2).mean(), weight=1.0)
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="second opt.backward"):
        opt.backward(model(x[1:]).pow(2).mean(), weight=3.0)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))  # nothing ran
    opt.step()
    opt.discard()

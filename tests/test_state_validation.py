"""Every field of a loaded state is validated before anything changes.

Table-driven: each case mutates a valid state dict (or a checkpoint file) of a
wrapper that owns a GradScaler, a scheduler, a noise-scale estimator and the LR
rule, and knows the parameter names (``model=``). Every case must be refused with
a ``ValueError``/``TypeError`` whose message names the field, and the optimizer must
be bitwise what it was (its full ``state_dict()`` and the parameters).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from accumopt import AccumulatingOptimizer

K = 4


class EncDec(torch.nn.Module):
    """Two layers of the same shape: a state of one fits the other (only the names tell them apart)."""

    def __init__(self, first: str = "enc", second: str = "dec") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.add_module(first, torch.nn.Linear(3, 3))
        self.add_module(second, torch.nn.Linear(3, 3))
        self._order = (first, second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = (getattr(self, n) for n in self._order)
        return b(torch.tanh(a(x)))


def build(model: torch.nn.Module | None = None, mode: str = "inplace"):
    model = EncDec() if model is None else model
    inner = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
    opt = AccumulatingOptimizer(inner, K, mode=mode, scheduler=sched, scaler=scaler, model=model,
                                noise_scale=True, lr_scaling="linear", nonfinite="skip")
    return model, opt


def train(model, opt, n: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        x, y = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.backward(loss, weight=float(2 + i % 3))
        opt.step(loss=loss.detach())


def valid_state() -> dict:
    model, opt = build()
    train(model, opt, 2 * K + 2)  # two updates, two micro-batches pending
    return copy.deepcopy(opt.state_dict())


def tree_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(tree_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def observable(model, opt):
    """Everything a load could change: the full state dict, parameters and gradients (copies)."""
    return copy.deepcopy({"sd": opt.state_dict(),
                          "params": [p.detach().clone() for p in model.parameters()],
                          "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
                          "stepped": opt.stepped, "pending": opt.pending})


# ------------------------------------------------------------------ the table
def acc(sd):
    return sd["accumulation"]


def _set(path, value):
    def mutate(sd):
        node = sd
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _other_names_state(sd):
    """A real state of another model whose layers are named differently (same shapes)."""
    model, opt = build(EncDec("encoder", "decoder"))
    train(model, opt, K + 1)
    sd.clear()
    sd.update(copy.deepcopy(opt.state_dict()))


def _reordered_names_state(sd):
    """The same names registered in the other order: each state would land on the other layer."""
    model, opt = build(EncDec("dec", "enc"))
    train(model, opt, K + 1)
    sd.clear()
    sd.update(copy.deepcopy(opt.state_dict()))


def _swap_signature_names(sd):
    names = acc(sd)["signature"]["names"]
    names[0], names[2] = names[2], names[0]


def _legacy(sd):
    """An old entry: no format, version or signature, carrying a K the schedule never gives."""
    a = acc(sd)
    for key in ("format", "version", "signature"):
        a.pop(key)
    a["window"]["k"] = 8


CASES = {
    # parameter names (model=)
    "other parameter names": (_other_names_state, "'enc.weight'"),
    "same names, other order": (_reordered_names_state, "'dec.weight'"),
    "signature names swapped": (_swap_signature_names, "'dec.weight'"),
    "signature names not a list": (_set(["accumulation", "signature", "names"], "enc"), "names"),
    # window counters and totals
    "window k not the constant K": (_set(["accumulation", "window", "k"], 7), "window['k']"),
    "window count == K": (_set(["accumulation", "window", "count"], K), "window['count']"),
    "window count negative": (_set(["accumulation", "window", "count"], -1), "window['count']"),
    "window closed not an int": (_set(["accumulation", "window", "closed"], 2.5), "window['closed']"),
    "window total NaN": (_set(["accumulation", "window", "total"], float("nan")), "window['total']"),
    "window total negative": (_set(["accumulation", "window", "total"], -3.0), "window['total']"),
    "window total tensor inf": (_set(["accumulation", "window", "total"], torch.tensor(float("inf"))),
                                "window['total']"),
    "window total without micro-batches": (lambda sd: acc(sd)["window"].update(count=0, total=5.0),
                                           "window['total']"),
    "window reference weight 0": (_set(["accumulation", "window", "ref"], 0.0), "window['ref']"),
    "lr_scaling factor not K's": (_set(["accumulation", "window", "lr_scaling", "factor"], 2.0),
                                  "window['lr_scaling']['factor']"),
    # noise estimator
    "noise windows=99": (_set(["accumulation", "noise", "windows"], 99), "noise['windows']"),
    "noise valid > windows": (_set(["accumulation", "noise", "valid"], torch.tensor(50.0, dtype=torch.float64)),
                              "'valid'"),
    "noise trace NaN": (_set(["accumulation", "noise", "trace"], torch.tensor(float("nan"), dtype=torch.float64)),
                        "'trace'"),
    # owned scaler
    "scaler entry None": (_set(["accumulation", "scaler"], None), "scaler entry"),
    "scaler scale NaN": (_set(["accumulation", "scaler", "scale"], float("nan")), "scaler['scale']"),
    "scaler scale -4": (_set(["accumulation", "scaler", "scale"], -4.0), "scaler['scale']"),
    "scaler growth 0.5": (_set(["accumulation", "scaler", "growth_factor"], 0.5), "growth_factor"),
    "scaler backoff 2.0": (_set(["accumulation", "scaler", "backoff_factor"], 2.0), "backoff_factor"),
    "scaler interval 0": (_set(["accumulation", "scaler", "growth_interval"], 0), "growth_interval"),
    "scaler tracker past interval": (_set(["accumulation", "scaler", "_growth_tracker"], 3), "_growth_tracker"),
    # legacy, unsigned, foreign
    "legacy entry with k=8": (_legacy, "legacy"),
    "version 1": (_set(["accumulation", "version"], 1), "version"),
    "no signature": (lambda sd: acc(sd).pop("signature"), "signature"),
    "signature of another mode": (_set(["accumulation", "signature", "mode"], "buffered"), "mode"),
    # the rest of the entry
    "scheduler entry None": (_set(["accumulation", "scheduler"], None), "scheduler entry"),
    "stepped not a bool": (_set(["accumulation", "stepped"], "yes"), "'stepped'"),
    "pending backward weight NaN": (_set(["accumulation", "pre_weight"], float("nan")), "pre_weight"),
    "pending backward weight negative": (_set(["accumulation", "pre_weight"], -1.0), "pre_weight"),
    "dropped flag out of range": (_set(["accumulation", "precision", "dropped"], torch.tensor(5.0)), "dropped"),
    "sum of another shape": (lambda sd: acc(sd)["sums"].__setitem__(0, torch.zeros(2, 2)), "accumulation sum 0"),
    "stats counter negative": (_set(["accumulation", "stats", "updates"], -1), "updates"),
}


@pytest.fixture(scope="module")
def good() -> dict:
    return valid_state()


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_state_is_refused_and_changes_nothing(good, case):
    mutate, field = CASES[case]
    sd = copy.deepcopy(good)
    mutate(sd)
    model, victim = build()
    train(model, victim, K + 3, seed=7)  # a window pending, state of its own
    before = observable(model, victim)
    with pytest.raises((ValueError, TypeError)) as info:
        victim.load_state_dict(sd)
    assert field in str(info.value), f"{case}: {info.value}"
    assert tree_equal(observable(model, victim), before), case


FILE_CASES = {
    "file: scale NaN": (_set(["accumulation", "scaler", "scale"], float("nan")), "scaler['scale']"),
    "file: window k=7": (_set(["accumulation", "window", "k"], 7), "window['k']"),
    "file: names swapped": (_swap_signature_names, "'dec.weight'"),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_malformed_checkpoint_file_is_refused_and_changes_nothing(good, case, tmp_path):
    """The same checks through ``opt.load(path)`` (a file written with ``torch.save``, and one with ``save``)."""
    mutate, field = FILE_CASES[case]
    sd = copy.deepcopy(good)
    mutate(sd)
    torch.save(sd, tmp_path / "plain.pt")
    model, victim = build()
    train(model, victim, K + 1, seed=7)
    before = observable(model, victim)
    with pytest.raises(ValueError, match=None) as info:
        victim.load(tmp_path / "plain.pt")
    assert field in str(info.value)
    assert tree_equal(observable(model, victim), before)


def test_checkpoint_file_with_a_changed_field_fails_its_checksum(good, tmp_path):
    model, opt = build()
    opt.load_state_dict(good)
    opt.save(tmp_path / "ck.pt")
    obj = torch.load(tmp_path / "ck.pt", weights_only=True)
    obj["optimizer"]["accumulation"]["window"]["k"] = 7
    torch.save(obj, tmp_path / "ck.pt")
    before = observable(model, opt)
    with pytest.raises(ValueError, match="checksum"):
        opt.load(tmp_path / "ck.pt")
    assert tree_equal(observable(model, opt), before)


def test_the_table_is_large_enough():
    assert len(CASES) + len(FILE_CASES) + 1 >= 25


def test_valid_state_loads_and_resumes_bit_identically(good):
    """Positive control: the unmodified state loads, and training on gives the uninterrupted run."""
    model_a, a = build()
    train(model_a, a, 2 * K + 2)
    model_b, b = build()
    train(model_b, b, 3, seed=9)  # something else first
    b.load_state_dict(copy.deepcopy(good))
    model_b.load_state_dict(model_a.state_dict())
    assert tree_equal(b.state_dict(), a.state_dict())
    train(model_a, a, K, seed=5)
    train(model_b, b, K, seed=5)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    a.discard()  # both stopped mid-window on purpose
    b.discard()


def test_names_known_on_one_side_only_still_load():
    """A state saved without model= (no names) loads into a wrapper with names, and the reverse."""
    model, named = build()
    train(model, named, K + 1)
    inner = torch.optim.AdamW(EncDec().parameters(), lr=0.01)
    anon = AccumulatingOptimizer(inner, K, scheduler=torch.optim.lr_scheduler.StepLR(inner, 1, 0.9),
                                 scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3),
                                 noise_scale=True, lr_scaling="linear", nonfinite="skip")
    anon.load_state_dict(copy.deepcopy(named.state_dict()))
    named.load_state_dict(copy.deepcopy(anon.state_dict()))
    assert named.pending == anon.pending == 1


def test_scaler_factors_set_after_construction_are_refused():
    """torch's setters accept any factor; the wrapper refuses them at build and at the next update."""
    scaler = torch.amp.GradScaler("cpu")
    scaler.set_growth_factor(0.5)
    inner = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="growth_factor: 0.5"):
        AccumulatingOptimizer(inner, 2, scaler=scaler)
    scaler = torch.amp.GradScaler("cpu")
    scaler.set_backoff_factor(2.0)
    with pytest.raises(ValueError, match="backoff_factor: 2.0"):
        AccumulatingOptimizer(inner, 2, scaler=scaler)

    model = torch.nn.Linear(2, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, scaler=scaler)
    scaler.set_growth_factor(1.0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="growth_factor: 1.0"):
        for _ in range(2):
            opt.backward(model(torch.ones(3, 2)).sum())
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert scaler.get_scale() == 4.0

"""Layer weights, group weights and selective accumulation (exclusion).

References: the gradient of the full-batch loss computed by plain autograd, and
SGD(lr=1, no momentum) whose update is exactly ``-weight * gradient``; for
exclusion, a plain AdamW over the non-excluded parameters only.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accumopt import AccumulatingOptimizer
from accumopt.weights import parameter_names, pattern_specificity, resolve_weights

DT = torch.float64


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6))
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.encoder(x)))


NAMES = ["encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias", "head.weight", "head.bias"]


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().to(DT)


def _data(seed: int = 1, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT)


def _full_grads(model: Net, x, y) -> dict[str, torch.Tensor]:
    ref = copy.deepcopy(model)
    F.mse_loss(ref(x), y).backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters()}


def _run_sgd1(model: Net, x, y, *, k: int = 3, mode: str = "inplace", groups=None, **kw) -> None:
    """One window of K equal micro-batches with SGD(lr=1): update == -w * full-batch gradient."""
    params = groups(model) if groups is not None else model.parameters()
    opt = AccumulatingOptimizer(torch.optim.SGD(params, lr=1.0), k, mode=mode, model=model, **kw)
    for xs, ys in zip(x.chunk(k), y.chunk(k)):
        F.mse_loss(model(xs), ys).backward()
        opt.step()
        opt.zero_grad()
    assert opt.num_updates == 1


def _check_update(before: Net, after: Net, grads: dict, expected_w: dict[str, float]) -> None:
    start = dict(before.named_parameters())
    for name, p in after.named_parameters():
        want = start[name] - expected_w[name] * grads[name]
        torch.testing.assert_close(p, want, rtol=1e-12, atol=1e-14, msg=name)


# ------------------------------------------------------------- layer weights
@pytest.mark.parametrize("mode", ["inplace", "buffered"])
def test_layer_weights_match_hand_computed_update(mode):
    model = _net()
    x, y = _data()
    grads = _full_grads(model, x, y)
    before = copy.deepcopy(model)
    _run_sgd1(model, x, y, mode=mode, layer_weights={"encoder.*": 0.25, "head.weight": 0.5})
    w = {n: 0.25 if n.startswith("encoder") else 1.0 for n in NAMES}
    w["head.weight"] = 0.5
    _check_update(before, model, grads, w)


def test_precedence_exact_then_most_literal_then_first_listed():
    model = _net()
    names = parameter_names(model)
    layer = {
        "*": 0.1,  # 0 literal characters
        "encoder.*": 0.2,  # 8
        "encoder.0.*": 0.3,  # 10: beats encoder.* for encoder.0.*
        "*.weight": 0.7,  # 7: loses to encoder.* (8) for encoder.2.weight
        "head.weight": 0.5,  # exact name: beats everything
        "h*.weight": 0.9,  # 8, but head.weight is exact
    }
    resolver = resolve_weights(torch.optim.SGD(model.parameters(), lr=1).param_groups, names, layer)
    by_name = {n: resolver(0, p) for n, p in model.named_parameters()}
    assert by_name == {
        "encoder.0.weight": 0.3,
        "encoder.0.bias": 0.3,
        "encoder.2.weight": 0.2,
        "encoder.2.bias": 0.2,
        "head.weight": 0.5,
        "head.bias": 0.1,
    }


@pytest.mark.parametrize("first, second", [("encoder.?.weight", "encoder.[02].weight"), ("encoder.[02].weight", "encoder.?.weight")])
def test_precedence_tie_goes_to_first_listed(first, second):
    model = _net()
    assert pattern_specificity(first) == pattern_specificity(second) == 15
    resolver = resolve_weights(
        torch.optim.SGD(model.parameters(), lr=1).param_groups, parameter_names(model), {first: 0.4, second: 0.6}
    )
    assert resolver(0, model.encoder[2].weight) == 0.4
    assert resolver(0, model.encoder[0].bias) == 1.0  # matched by neither


def test_exact_name_beats_equally_literal_pattern_listed_first():
    model = _net()
    assert pattern_specificity("head.weight*") == pattern_specificity("head.weight")
    resolver = resolve_weights(torch.optim.SGD(model.parameters(), lr=1).param_groups, parameter_names(model),
                               {"head.weight*": 0.9, "head.weight": 0.5})
    assert resolver(0, model.head.weight) == 0.5


def test_pattern_specificity_follows_fnmatch_classes():
    assert pattern_specificity("head.weight") == 11
    assert pattern_specificity("*") == 0
    assert pattern_specificity("layer[0-9].w") == 7  # a class is one wildcard position
    assert pattern_specificity("a[!]x]b") == 2  # ']' first in a class is a member
    assert pattern_specificity("a[b") == 3  # unclosed '[' is literal (as in fnmatch)


def test_wrapper_prefixes_are_stripped():
    model = _net()
    dp = torch.nn.DataParallel(model)  # 'module.' prefix, as DDP
    assert sorted(n for n, _ in dp.named_parameters())[0].startswith("module.")
    assert sorted(parameter_names(dp).values()) == sorted(NAMES)
    opt = AccumulatingOptimizer(
        torch.optim.SGD(model.parameters(), lr=1), 2, model=dp, layer_weights={"head.weight": 0.5}
    )
    assert opt._store._weight_of(0, model.head.weight) == 0.5


# ------------------------------------------------------------- group weights
def _two_groups(model: Net):
    return [{"params": model.encoder.parameters()}, {"params": model.head.parameters()}]


@pytest.mark.parametrize(
    "kw",
    [
        {"group_weights": [0.5, 2.0]},
        {"group_weights": {"group_0": 0.5, "group_1": 2.0}},
        {"group_weights": {0: 0.5, 1: 2.0}},
    ],
)
def test_group_weights_match_hand_computed_update(kw):
    model = _net()
    x, y = _data()
    grads = _full_grads(model, x, y)
    before = copy.deepcopy(model)
    _run_sgd1(model, x, y, groups=_two_groups, mode="buffered", **kw)
    _check_update(before, model, grads, {n: 0.5 if n.startswith("encoder") else 2.0 for n in NAMES})


def test_layer_group_and_accumulation_weight_multiply():
    model = _net()
    x, y = _data()
    grads = _full_grads(model, x, y)
    before = copy.deepcopy(model)

    def groups(m):
        return [{"params": m.encoder.parameters(), "accumulation_weight": 3.0}, {"params": m.head.parameters()}]

    _run_sgd1(model, x, y, groups=groups, group_weights=[0.5, 0.25], layer_weights={"*.bias": 0.1})
    w = {}
    for n in NAMES:
        g = 0.5 * 3.0 if n.startswith("encoder") else 0.25
        w[n] = g * (0.1 if n.endswith("bias") else 1.0)
    _check_update(before, model, grads, w)


def test_add_param_group_gets_its_accumulation_weight():
    model = _net()
    x, y = _data()
    grads = _full_grads(model, x, y)
    before = copy.deepcopy(model)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.encoder.parameters(), lr=1.0), 2, model=model,
                                layer_weights={"head.bias": 0.5})
    opt.add_param_group({"params": list(model.head.parameters()), "accumulation_weight": 0.2})
    for xs, ys in zip(x.chunk(2), y.chunk(2)):
        F.mse_loss(model(xs), ys).backward()
        opt.step()
        opt.zero_grad()
    w = {n: 1.0 for n in NAMES}
    w["head.weight"], w["head.bias"] = 0.2, 0.2 * 0.5
    _check_update(before, model, grads, w)


def test_add_param_group_with_weight_zero_is_excluded():
    model = _net()
    opt = AccumulatingOptimizer(torch.optim.AdamW(model.encoder.parameters(), lr=0.1, weight_decay=0.1), 1,
                                mode="buffered")
    opt.add_param_group({"params": list(model.head.parameters()), "accumulation_weight": 0})
    head = [p.detach().clone() for p in model.head.parameters()]
    x, y = _data()
    F.mse_loss(model(x), y).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(head, model.head.parameters()))
    assert all(p.grad is None for p in model.head.parameters())
    enc_bytes = sum(p.numel() * p.element_size() for p in model.encoder.parameters())
    assert opt.stats()["buffer_bytes"] == enc_bytes


def test_add_param_group_with_bad_weight_changes_nothing():
    model = _net()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.encoder.parameters(), lr=1.0), 2)
    with pytest.raises(ValueError) as info:
        opt.add_param_group({"params": list(model.head.parameters()), "accumulation_weight": -1})
    assert str(info.value) == "Invalid param_groups[1]['accumulation_weight']: -1.0 (expected a number >= 0)"
    assert len(opt.param_groups) == 1 and len(opt.optimizer.param_groups) == 1


# ------------------------------------------------------------------ errors
def _build(**kw):
    model = _net()
    params = kw.pop("params", None)
    params = params(model) if params is not None else model.parameters()
    return AccumulatingOptimizer(torch.optim.SGD(params, lr=1.0), 2, **kw)


@pytest.mark.parametrize(
    "kw, exc, message",
    [
        ({"layer_weights": {"head.weight": -1}}, ValueError, "Invalid layer_weights['head.weight']: -1.0 (expected a number >= 0)"),
        ({"layer_weights": {"head.weight": float("nan")}}, ValueError, "Invalid layer_weights['head.weight']: nan (expected a finite number)"),
        ({"layer_weights": {"head.weight": float("inf")}}, ValueError, "Invalid layer_weights['head.weight']: inf (expected a finite number)"),
        ({"layer_weights": {"head.weight": "1"}}, TypeError, "Invalid layer_weights['head.weight']: '1' (expected a real number, got str)"),
        ({"layer_weights": {3: 1.0}}, TypeError, "Invalid layer_weights key: 3 (expected a parameter name or glob pattern)"),
        ({"layer_weights": [("head.weight", 1.0)]}, TypeError, "Invalid layer_weights: [('head.weight', 1.0)] (expected a mapping of parameter name or pattern to weight)"),
        ({"group_weights": [1.0]}, ValueError, "Invalid group_weights: [1.0] (expected 2 weights, one per param group)"),
        ({"group_weights": [1.0, 2.0, 3.0]}, ValueError, "Invalid group_weights: [1.0, 2.0, 3.0] (expected 2 weights, one per param group)"),
        ({"group_weights": [1.0, -0.5]}, ValueError, "Invalid group_weights[1]: -0.5 (expected a number >= 0)"),
        ({"group_weights": [float("nan"), 1.0]}, ValueError, "Invalid group_weights[0]: nan (expected a finite number)"),
        ({"group_weights": {"group_2": 1.0}}, ValueError, "Invalid group_weights key: 'group_2' (expected a group index 0..1 or 'group_<i>')"),
        ({"group_weights": {"encoder": 1.0}}, ValueError, "Invalid group_weights key: 'encoder' (expected a group index 0..1 or 'group_<i>')"),
        ({"group_weights": {"group_1": float("inf")}}, ValueError, "Invalid group_weights['group_1']: inf (expected a finite number)"),
        ({"group_weights": 2.0}, TypeError, "Invalid group_weights: 2.0 (expected a sequence with one weight per param group, or a mapping by group index or 'group_<i>')"),
        ({"group_weights": [0, 0]}, ValueError, "Invalid weights: every parameter of the optimizer has accumulation weight 0 or is excluded (expected at least one parameter to train)"),
        ({"exclude": [3]}, TypeError, "Invalid exclude entry: 3 (expected a parameter name, a glob pattern or a parameter)"),
    ],
)
def test_bad_weight_arguments_rejected_with_exact_messages(kw, exc, message):
    model = _net()
    with pytest.raises(exc) as info:
        AccumulatingOptimizer(torch.optim.SGD(_two_groups(model), lr=1.0), 2, model=model, **kw)
    assert str(info.value) == message


def test_bad_accumulation_weight_in_group_rejected():
    model = _net()
    groups = [{"params": model.encoder.parameters(), "accumulation_weight": float("nan")}, {"params": model.head.parameters()}]
    with pytest.raises(ValueError) as info:
        AccumulatingOptimizer(torch.optim.SGD(groups, lr=1.0), 2)
    assert str(info.value) == "Invalid param_groups[0]['accumulation_weight']: nan (expected a finite number)"


@pytest.mark.parametrize("kw", [{"layer_weights": {"decoder.*": 1.0, "head.weight": 2.0}}, {"exclude": ["decoder.*"]},
                                {"layer_weights": {"head.weights": 1.0}}])
def test_unmatched_names_and_patterns_rejected(kw):
    model = _net()
    with pytest.raises(ValueError) as info:
        AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), 2, model=model, **kw)
    bad = [k for k in (kw.get("layer_weights") or kw.get("exclude")) if k != "head.weight"]
    assert str(info.value) == (
        f"Invalid layer_weights/exclude: {bad!r} match no parameter name "
        "(names look like ['encoder.0.bias', 'encoder.0.weight', 'encoder.2.bias', 'encoder.2.weight'])"
    )


def test_names_needed_without_model():
    model = _net()
    with pytest.raises(ValueError) as info:
        AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), 2, layer_weights={"head.*": 0.5})
    assert str(info.value) == (
        "Invalid layer_weights/exclude: parameter names are needed to resolve ['head.*']; "
        "pass model=... (the module whose named_parameters() they refer to)"
    )


def test_overflowing_weight_product_rejected():
    model = _net()
    with pytest.raises(ValueError, match=re.escape("Invalid accumulation weight: inf for a parameter of group 0")):
        AccumulatingOptimizer(torch.optim.SGD(_two_groups(model), lr=1.0), 2, model=model,
                              group_weights=[1e200, 1.0], layer_weights={"encoder.0.weight": 1e200})


# --------------------------------------------------------------- exclusion
@pytest.mark.parametrize("mode", ["inplace", "buffered"])
@pytest.mark.parametrize(
    "how",
    [
        {"exclude": ["head.*"]},
        {"exclude": "head.*"},
        {"layer_weights": {"head.*": 0.0}},
        {"group_weights": [1.0, 0.0]},
        {"exclude": "tensors"},
    ],
)
def test_excluded_params_bit_identical_with_adamw_weight_decay(mode, how):
    model = _net()
    if how.get("exclude") == "tensors":
        how = {"exclude": list(model.head.parameters())}
    ref = copy.deepcopy(model)
    head0 = [p.detach().clone() for p in model.head.parameters()]
    opt = AccumulatingOptimizer(
        torch.optim.AdamW(_two_groups(model), lr=0.05, weight_decay=0.1), 3, mode=mode, model=model, **how
    )
    # Reference: plain AdamW over the encoder only, on the full batch.
    ref_opt = torch.optim.AdamW(ref.encoder.parameters(), lr=0.05, weight_decay=0.1)
    for step in range(3):
        x, y = _data(seed=10 + step)
        for xs, ys in zip(x.chunk(3), y.chunk(3)):
            F.mse_loss(model(xs), ys).backward()
            opt.step()
            assert all(p.grad is None for p in model.head.parameters())
            opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert opt.num_updates == 3
    assert all(torch.equal(a, b) for a, b in zip(head0, model.head.parameters()))
    assert all(len(opt.state[p]) == 0 for p in model.head.parameters())  # AdamW never saw them
    for p, q in zip(model.encoder.parameters(), ref.encoder.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    enc_bytes = sum(p.numel() * p.element_size() for p in model.encoder.parameters())
    assert opt.stats()["buffer_bytes"] == (enc_bytes if mode == "buffered" else 0)


def test_exclusion_halves_buffer_bytes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(4)])
    full = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, mode="buffered")
    half = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, mode="buffered", model=model,
                                 exclude=["0.*", "1.*"])
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert full.stats()["buffer_bytes"] == param_bytes
    assert half.stats()["buffer_bytes"] * 2 == param_bytes


def test_exclude_tensor_not_in_optimizer_rejected():
    model = _net()
    stray = torch.nn.Parameter(torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError) as info:
        AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), 2, exclude=[stray])
    assert str(info.value) == "Invalid exclude entry: a tensor of shape (3,) that is not a parameter of the optimizer"


def test_exclude_overrides_layer_weight():
    model = _net()
    resolver = resolve_weights(torch.optim.SGD(model.parameters(), lr=1).param_groups, parameter_names(model),
                               {"head.weight": 2.0}, exclude=["head.*"])
    assert resolver(0, model.head.weight) == 0.0 and resolver(0, model.head.bias) == 0.0
    assert resolver(0, model.encoder[0].weight) == 1.0


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_layer_weights_follow_the_parameters_through_copies(copier):
    import pickle

    model = _net()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), 2, model=model,
                                layer_weights={"encoder.*": 0.5}, exclude=["head.bias"])
    clone = copy.deepcopy(opt) if copier == "deepcopy" else pickle.loads(pickle.dumps(opt))
    weights = [clone._store._weight_of(0, p) for p in clone.param_groups[0]["params"]]
    assert weights == [0.5, 0.5, 0.5, 0.5, 1.0, 0.0]


def test_weights_of_parameters_added_later_survive_deepcopy():
    """Layer weights and exclusions of model parameters not yet in the optimizer are kept by parameter,
    not by id, so a deep copy applies them to the copied parameters when their group is added."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(3, 3), nn.Linear(3, 1)

    net = Net()
    opt = AccumulatingOptimizer(torch.optim.SGD(net.body.parameters(), lr=0.1), 2, model=net,
                                exclude=["head.bias"], layer_weights={"head.weight": 0.5})
    copied = copy.deepcopy({"net": net, "opt": opt})
    for n, o in ((net, opt), (copied["net"], copied["opt"])):
        o.add_param_group({"params": list(n.head.parameters())})
        assert any(p is n.head.bias for p in o._store.excluded)
        assert o._store._weight_of(1, n.head.weight) == 0.5


def test_wrapper_prefixes_are_removed_as_whole_name_components():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc_orig_mod, self.head = nn.Linear(2, 2), nn.Linear(2, 1)

    net = Net()
    assert sorted(parameter_names(net).values()) == ["enc_orig_mod.bias", "enc_orig_mod.weight", "head.bias",
                                                     "head.weight"]
    AccumulatingOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), 2, model=net, exclude=["enc_orig_mod.weight"])
    compiled_like = nn.Module()
    compiled_like._orig_mod = net
    assert "enc_orig_mod.weight" in parameter_names(compiled_like).values()


@pytest.mark.parametrize("optim, warns", [(torch.optim.Adam, True), (torch.optim.RMSprop, True),
                                          (torch.optim.SGD, False)])
def test_fractional_weights_with_a_scale_invariant_optimizer_warn(optim, warns):
    """Adam-like optimizers divide by the gradient's scale: a weight of 0.5 barely changes their update."""
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AccumulatingOptimizer(optim(net.parameters(), lr=0.1), 2, model=net, layer_weights={"0.*": 0.5})
        AccumulatingOptimizer(optim(net.parameters(), lr=0.1), 2, model=net, exclude=["0.*"])  # freezing: fine
    assert [("barely changes" in str(w.message)) for w in caught] == ([True] if warns else [])

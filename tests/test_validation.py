"""Bad input, table-driven: every rejected argument raises with its exact message, changing nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import accumopt
from accumopt import AccumulatingOptimizer


def sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)


def no_params() -> torch.optim.Optimizer:
    opt = sgd()
    opt.param_groups[0]["params"] = []
    return opt


def shared_param() -> torch.optim.Optimizer:
    opt = sgd()
    opt.param_groups.append(dict(opt.param_groups[0], params=[opt.param_groups[0]["params"][1]]))
    return opt


def frozen() -> torch.optim.Optimizer:
    return torch.optim.SGD(torch.nn.Linear(2, 1).requires_grad_(False).parameters(), lr=0.1)


def int_param() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2)), torch.zeros(2, dtype=torch.long)], lr=0.1)


_DTYPES = "(torch.float16, torch.bfloat16, torch.float32, torch.float64)"

# (id, optimizer factory, positional K, keyword arguments, exception, exact message)
CASES = [
    ("K=0", sgd, 0, {}, ValueError, "Invalid accumulation_steps: 0 (expected an int >= 1)"),
    ("K<0", sgd, -3, {}, ValueError, "Invalid accumulation_steps: -3 (expected an int >= 1)"),
    ("K float", sgd, 2.0, {}, TypeError, "Invalid accumulation_steps: 2.0 (expected an int >= 1, got float)"),
    ("K bool", sgd, True, {}, TypeError, "Invalid accumulation_steps: True (expected an int >= 1, got bool)"),
    ("K str", sgd, "4", {}, TypeError, "Invalid accumulation_steps: '4' (expected an int >= 1, got str)"),
    ("K None", sgd, None, {}, TypeError, "Invalid accumulation_steps: None (expected an int >= 1, got NoneType)"),
    ("K empty list", sgd, [], {}, ValueError, "Invalid accumulation_steps: [] (expected a non-empty list of ints >= 1)"),
    ("K list with 0", sgd, [2, 0], {}, ValueError, "Invalid accumulation_steps[1]: 0 (expected an int >= 1)"),
    ("K empty mapping", sgd, {}, {}, ValueError,
     "Invalid accumulation_steps: {} (expected a non-empty mapping {start: K} containing 0)"),
    ("K mapping without 0", sgd, {1: 2}, {}, ValueError,
     "Invalid accumulation_steps: {1: 2} (a mapping must give K from 0 on)"),
    ("K mapping float", sgd, {0: 2, 3: 1.5}, {}, TypeError,
     "Invalid accumulation_steps[3]: 1.5 (expected an int >= 1, got float)"),
    ("schedule_by", sgd, [1, 2], {"schedule_by": "batch"}, ValueError,
     "Invalid schedule_by: 'batch' (expected one of 'epoch', 'update')"),
    ("not an optimizer", lambda: torch.nn.Linear(2, 1), 2, {}, TypeError,
     "Invalid optimizer: Linear (expected a torch.optim.Optimizer instance)"),
    ("wrapped twice", lambda: AccumulatingOptimizer(sgd(), 2), 2, {}, TypeError,
     "Invalid optimizer: an AccumulatingOptimizer (expected the optimizer it should wrap; "
     "wrapping twice would accumulate twice)"),
    ("no parameters", no_params, 2, {}, ValueError, "Invalid optimizer: SGD has no parameters (expected at least one)"),
    ("parameter in two groups", shared_param, 2, {}, ValueError,
     "Invalid optimizer: param_groups[1]['params'][0] also appears in param_groups[0] "
     "(expected each parameter in one group)"),
    ("all frozen", frozen, 2, {}, ValueError,
     "Invalid optimizer: every parameter has requires_grad=False (nothing to accumulate)"),
    ("integer parameter", int_param, 2, {}, ValueError,
     "Invalid optimizer: param_groups[0]['params'][1] has dtype torch.int64 (expected floating-point or complex parameters)"),
    ("closure optimizer", lambda: torch.optim.LBFGS(torch.nn.Linear(2, 1).parameters()), 2, {}, ValueError,
     "Invalid optimizer: LBFGS.step requires a closure, i.e. it re-evaluates the loss several times per step "
     "(as LBFGS does); an accumulated gradient cannot serve those re-evaluations. "
     "Use the large batch directly with such optimizers."),
    ("mode", sgd, 2, {"mode": "fast"}, ValueError, "Invalid mode: 'fast' (expected one of 'inplace', 'buffered')"),
    ("nonfinite", sgd, 2, {"nonfinite": "zero"}, ValueError,
     "Invalid nonfinite: 'zero' (expected one of 'ignore', 'skip', 'drop', 'raise')"),
    ("drop in place", sgd, 2, {"nonfinite": "drop"}, ValueError,
     "Invalid nonfinite: 'drop' with mode='inplace' (dropping one micro-batch needs its gradient apart from the "
     "window's: use mode='buffered')"),
    ("accumulate_dtype int", sgd, 2, {"accumulate_dtype": torch.int32}, TypeError,
     f"Invalid accumulate_dtype: torch.int32 (expected one of {_DTYPES})"),
    ("accumulate_dtype str", sgd, 2, {"accumulate_dtype": "float32"}, TypeError,
     f"Invalid accumulate_dtype: 'float32' (expected one of {_DTYPES})"),
    ("max_grad_norm negative", sgd, 2, {"max_grad_norm": -1}, ValueError,
     "Invalid max_grad_norm: -1.0 (expected a number >= 0)"),
    ("max_grad_norm nan", sgd, 2, {"max_grad_norm": float("nan")}, ValueError,
     "Invalid max_grad_norm: nan (expected a finite number)"),
    ("max_grad_norm str", sgd, 2, {"max_grad_norm": "1"}, TypeError,
     "Invalid max_grad_norm: '1' (expected a real number, got str)"),
    ("clip_value", sgd, 2, {"clip_value": -1.0}, ValueError, "Invalid clip_value: -1.0 (expected a number >= 0)"),
    ("norm_type", sgd, 2, {"norm_type": 0}, ValueError, "Invalid norm_type: 0.0 (expected a number > 0)"),
    ("scaler type", sgd, 2, {"scaler": object()}, TypeError, "Invalid scaler: object (expected a torch.amp.GradScaler)"),
    ("reduction", sgd, 2, {"reduction": "x"}, ValueError, "Invalid reduction: 'x' (expected one of 'mean', 'sum')"),
    ("model", sgd, 2, {"model": object()}, TypeError, "Invalid model: object (expected a torch.nn.Module)"),
    ("scheduler type", sgd, 2, {"scheduler": 3}, TypeError,
     "Invalid scheduler: int (expected a torch.optim.lr_scheduler scheduler)"),
    ("scheduler of another optimizer", sgd, 2, {"scheduler": torch.optim.lr_scheduler.StepLR(sgd(), 1)}, ValueError,
     "Invalid scheduler: StepLR was built on another optimizer (expected one built on the optimizer being wrapped)"),
]


@pytest.mark.parametrize("make,k,kwargs,exc,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rejected_with_exact_message(make, k, kwargs, exc, message):
    inner = make()
    groups_before = repr(getattr(inner, "param_groups", None))
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        AccumulatingOptimizer(inner, k, **kwargs)
    # nothing half-applied: the optimizer given is untouched
    assert repr(getattr(inner, "param_groups", None)) == groups_before
    if isinstance(inner, torch.optim.Optimizer) and not isinstance(inner, AccumulatingOptimizer):
        assert "step" not in vars(inner) and not inner.state


def test_table_messages_are_distinct():
    assert len({c[-1] for c in CASES}) == len(CASES)
    assert all(c[-2] in (TypeError, ValueError) for c in CASES)


_PACKAGE = Path(accumopt.__file__).resolve().parent


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(f, ast.parse(f.read_text(encoding="utf-8"), str(f))) for f in sorted(_PACKAGE.glob("*.py"))]


def test_the_library_never_asserts():
    """`assert` vanishes under python -O, so no check of user input (or anything else) may rely on it."""
    found = [f"{f.name}:{node.lineno}" for f, tree in _modules() for node in ast.walk(tree)
             if isinstance(node, ast.Assert)]
    assert found == []


def _constructor_raises() -> list[tuple[str, ast.Raise]]:
    """raise ValueError/TypeError(...) in the __init__ of every public class, and in the argument checkers."""
    public = set(accumopt.__all__)
    sites = []
    for f, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name in public:
                functions = [m for m in node.body if isinstance(m, ast.FunctionDef) and m.name == "__init__"]
            elif f.name == "_checks.py" and isinstance(node, ast.FunctionDef) and node.name.startswith("check_"):
                functions = [node]
            else:
                continue
            for fn in functions:
                for r in ast.walk(fn):
                    if (isinstance(r, ast.Raise) and isinstance(r.exc, ast.Call) and isinstance(r.exc.func, ast.Name)
                            and r.exc.func.id in ("ValueError", "TypeError")):
                        sites.append((f"{f.name}:{r.lineno}", r))
    return sites


def test_constructor_errors_name_the_value_and_the_expectation():
    """Every ValueError/TypeError a public constructor (or an argument checker) raises is built from a message
    that says what is invalid or what was expected; never a bare exception."""
    sites = _constructor_raises()
    assert len(sites) >= 20  # the scan sees the constructors (AccumulatingOptimizer alone has more)
    bad = []
    for where, r in sites:
        text = " ".join(n.value for n in ast.walk(r.exc) if isinstance(n, ast.Constant) and isinstance(n.value, str))
        if not r.exc.args or not ("Invalid" in text or "expected" in text):
            bad.append(where)
    assert bad == []


# ------------------------------------------------------------ runtime misuse
def _wrapper(mode="inplace", **kw):
    model = torch.nn.Linear(2, 1)
    return model, AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, mode=mode, **kw)


def test_set_epoch_rejects_negative():
    _, opt = _wrapper()
    with pytest.raises(ValueError, match=r"^Invalid epoch: -1 \(expected an int >= 0\)$"):
        opt.set_epoch(-1)


def test_step_weight_in_inplace_mode_is_refused_before_any_change():
    model, opt = _wrapper()
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(ValueError, match=r"^Invalid weight: step\(weight=\.\.\.\) with mode='inplace'"):
        opt.step(weight=3.0)
    assert opt.pending == 0


def test_step_weight_one_as_a_cpu_tensor_is_accepted_in_inplace_mode():
    """Weight exactly 1 changes nothing in .grad, whatever its type (a CPU tensor is read for free)."""
    model, opt = _wrapper()
    for w in (1, 1.0, torch.tensor(1), torch.tensor([1.0])):
        model(torch.ones(1, 2)).sum().backward()
        opt.step(weight=w)
    assert opt.num_updates == 2


def test_closure_with_owned_scaler_is_refused():
    model = torch.nn.Linear(2, 1)
    scaler = torch.amp.GradScaler("cpu")
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, scaler=scaler)
    calls = []
    with pytest.raises(ValueError, match=r"^Closures are not supported with a GradScaler \(GradScaler refuses closures too\)$"):
        opt.step(lambda: calls.append(1))
    assert not calls and opt.pending == 0

"""Every optimizer configuration in torch's own catalogue (``optim_db``): equivalent or rejected.

``torch.testing._internal.common_optimizers.optim_db`` with
``optim_inputs_func(device="cpu")`` gives 91 configurations in torch 2.13. Each
one is either equivalent to the large-batch run (float64, 1e-10 relative,
parameters and optimizer state, both modes) or rejected at construction with a
clear error (listed in ``REJECTED`` and in docs/core.md).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from accumopt import AccumulatingOptimizer
from accumopt.testing import check_equivalence

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")
optim_db = common_optimizers.optim_db

# Optimizers rejected at construction, with the start of their message.
REJECTED = {
    "LBFGS": "Invalid optimizer: LBFGS.step requires a closure",
}

CASES = [
    pytest.param(info, oi, id=f"{info.optim_cls.__name__}-{oi.desc}")
    for info in optim_db
    for oi in info.optim_inputs_func(device="cpu")
]


def test_rejected_exactly_where_step_requires_a_closure():
    """accumopt rejects an optimizer of the catalogue exactly when its ``step`` requires a closure (read from the
    signature, independently of accumopt), and REJECTED names nothing the catalogue lacks."""
    assert set(REJECTED) <= {info.optim_cls.__name__ for info in optim_db}
    for info in optim_db:
        closure = inspect.signature(info.optim_cls.step).parameters.get("closure")
        requires = closure is not None and closure.default is inspect.Parameter.empty
        model_fn, _ = _setup(info)
        inner = info.optim_cls(model_fn().parameters(), **info.optim_inputs_func(device="cpu")[0].kwargs)
        try:
            AccumulatingOptimizer(inner, 2)
            rejected = False
        except ValueError as e:
            rejected = True
            assert str(e).startswith("Invalid optimizer: "), e
        assert rejected == requires == (info.optim_cls.__name__ in REJECTED), info.optim_cls.__name__


class _Embed(torch.nn.Module):
    """Sparse gradients for SparseAdam."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(7, 2, sparse=True)

    def forward(self, idx):
        return self.emb(idx)


def _setup(info):
    g = torch.Generator().manual_seed(0)
    name = info.optim_cls.__name__
    if info.only_supports_sparse_grads:
        # indices drawn so that some rows are hit by some micro-batches only, and row 6 never
        return _Embed, [(torch.randint(0, 6, (8,), generator=g), torch.randn(8, 2, generator=g)) for _ in range(3)]
    bias = name != "Muon"  # Muon takes 2-D parameters only

    def model_fn():
        return torch.nn.Sequential(torch.nn.Linear(3, 4, bias=bias), torch.nn.Tanh(), torch.nn.Linear(4, 2, bias=bias))

    return model_fn, [(torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)) for _ in range(3)]


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("info,optim_input", CASES)
def test_equivalent_or_rejected(info, optim_input):
    name = info.optim_cls.__name__
    model_fn, batches = _setup(info)

    def factory(model):
        return info.optim_cls(model.parameters(), **optim_input.kwargs)

    if name in REJECTED:
        inner = factory(model_fn().double())
        before = [p.detach().clone() for g in inner.param_groups for p in g["params"]]
        with pytest.raises(ValueError, match="^" + REJECTED[name]):
            AccumulatingOptimizer(inner, 4)
        assert all(torch.equal(a, b) for a, b in zip(before, [p for g in inner.param_groups for p in g["params"]]))
        return
    for mode in ("inplace", "buffered"):
        report = check_equivalence(model_fn, _loss, factory, batches, 4, mode=mode, rtol=1e-10)
        assert report.updates == 3
        if info.only_supports_sparse_grads:
            assert report.state, "SparseAdam state was compared"

"""DDP in the default mode with forwards run ahead of their backwards (2 gloo ranks on CPU).

DDP decides at *forward* time whether the backward of that output reduces
gradients. A loop that runs all forwards of a window first (``losses = [ddp(x) for
x in xs]``, then backward and step for each) or prefetches one forward ahead runs
the closing micro-batch's forward before the wrapper switches synchronisation on.
Each scenario trains K=3 in float64 on both ranks and compares the parameters with
each other (bitwise) and with one process stepping the plain optimizer on every
rank's micro-batches of each window, concatenated (1e-10).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import accumopt
from test_distributed import _Counters, _data, _make_model, _make_opt, _params, _per_sample, _reference, _spawn

pytestmark = pytest.mark.distributed

K = 3
TOL = 1e-10
EQUAL = [[4] * 6, [4] * 6]
UNEVEN = [[3, 5, 2, 6, 1, 4], [4, 1, 6, 2, 7, 3]]
SHAPES = {
    "ordinary": dict(shape="ordinary", sizes=EQUAL),
    "forwards_first": dict(shape="forwards_first", sizes=EQUAL),
    "forwards_first_weighted": dict(shape="forwards_first", sizes=UNEVEN, weighted=True),
    "prefetch": dict(shape="prefetch", sizes=EQUAL),
    "prefetch_weighted": dict(shape="prefetch", sizes=UNEVEN, weighted=True),
}


def _run(rank: int, spec: dict) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    counters = _Counters()
    try:
        model = DDP(_make_model())
        model.register_comm_hook(None, counters.hook)
        opt = accumopt.AccumulatingOptimizer(_make_opt(model.parameters()), K, model=model)
        sizes = spec["sizes"][rank]
        batches = [_data(rank, i, n) for i, n in enumerate(sizes)]
        weighted = spec.get("weighted", False)

        def loss_of(out, i):
            return _per_sample(out, batches[i][1]).mean()

        def backward_step(loss, i):
            if weighted:
                opt.backward(loss, weight=sizes[i])
            else:
                loss.backward()
            opt.step()
            opt.zero_grad()

        n = len(sizes)
        if spec["shape"] == "ordinary":
            for i in range(n):
                backward_step(loss_of(model(batches[i][0]), i), i)
        elif spec["shape"] == "forwards_first":
            for start in range(0, n, K):
                window = range(start, start + K)
                losses = [loss_of(model(batches[i][0]), i) for i in window]  # every forward first
                for loss, i in zip(losses, window):
                    backward_step(loss, i)
        else:  # prefetch: within a window, the next micro-batch's forward runs before this one's backward
            out = None
            for i in range(n):
                out = model(batches[i][0]) if out is None else out
                nxt = model(batches[i + 1][0]) if (i + 1) % K else None  # not across an update
                backward_step(loss_of(out, i), i)
                out = nxt
        return {"params": _params(model), "updates": opt.num_updates, "hook_buckets": counters.hook_buckets,
                "explicit": counters.grad_all_reduces}
    finally:
        dist.all_reduce = counters._orig


def _worker(rank: int, out: Path) -> dict:
    return {name: _run(rank, spec) for name, spec in SHAPES.items()}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return _spawn(_worker, tmp_path_factory.mktemp("shapes"), "shapes")


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_ranks_bit_identical_and_equal_to_the_large_batch(results, name):
    a, b = results[0][name], results[1][name]
    assert a["updates"] == b["updates"] == 2
    for p, q in zip(a["params"], b["params"]):
        assert torch.equal(p, q), name
    want = _reference(SHAPES[name]["sizes"], [K], flush=False)
    for got, ref in zip(a["params"], want):
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        assert err < TOL, f"{name}: relative error {err:.3e}"


def test_ordinary_loop_reduces_once_per_update_natively(results):
    """The plain loop keeps DDP's own reduction of the closing backward, and nothing else."""
    for r in results:
        assert r["ordinary"]["explicit"] == 0
        assert r["ordinary"]["hook_buckets"] == r["ordinary"]["updates"]  # one bucket: this model is small


def test_forwards_first_is_reduced_explicitly_at_the_boundary(results):
    """DDP did not reduce (every forward ran with sync off): the wrapper reduced each window itself."""
    for r in results:
        assert r["forwards_first"]["hook_buckets"] == 0
        assert r["forwards_first"]["explicit"] >= r["forwards_first"]["updates"]

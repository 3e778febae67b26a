"""Statistics under DDP (2 gloo ranks on CPU): global where the docs say so, per-rank otherwise.

Each rank trains a DDP model with the wrapper, passing its micro-batches' mean loss and
sample counts, and records what it fed in (loss, count) and what ``opt.stats()`` said
after each real update. The test then computes the global values from both ranks'
records, independently of the library: the window's sample-weighted mean loss over all
ranks, its summed sample count, the samples seen by all ranks, and what a
``ReduceLROnPlateau`` fed those global losses does to the learning rate. It also checks
that no micro-step that does not update makes a collective call.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import accumopt
from test_distributed import _data, _make_model, _make_opt, _per_sample, _spawn

pytestmark = pytest.mark.distributed

K = 3
SIZES = [[3, 5, 2, 6, 1, 4, 2, 7, 3], [4, 1, 6, 2, 7, 3, 5, 2, 4]]  # uneven across micro-batches and ranks
SCENARIOS = {
    "inplace_weighted": dict(mode="inplace", weighted=True),
    "buffered_weighted": dict(mode="buffered", weighted=True),
    "inplace_unweighted": dict(mode="inplace", weighted=False),
}


def _run(rank: int, mode: str, weighted: bool) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_make_model())
    inner = _make_opt(model.parameters())
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(inner, factor=0.5, patience=0, threshold=0.0)
    opt = accumopt.AccumulatingOptimizer(inner, K, mode=mode, model=model, scheduler=plateau)
    collectives = [0]
    orig = dist.all_reduce

    def counting(*args, **kwargs):
        collectives[0] += 1
        return orig(*args, **kwargs)

    fed, seen, lrs, micro_collectives = [], [], [], []
    dist.all_reduce = counting
    try:
        for i, n in enumerate(SIZES[rank]):
            x, y = _data(rank, i, n)
            x = x * (1 + 2 * rank)  # the ranks' losses differ clearly
            loss = _per_sample(model(x), y).mean()
            before = collectives[0]
            w = n if weighted else None
            if mode == "inplace":
                opt.backward(loss, weight=w)
                opt.step(loss=loss)
            else:
                loss.backward()
                opt.step(weight=w, loss=loss)
            opt.zero_grad()
            fed.append((float(loss.detach()), float(n if weighted else 1)))
            if opt.stepped:
                seen.append(opt.stats())
                lrs.append(inner.param_groups[0]["lr"])
            else:
                micro_collectives.append(collectives[0] - before)
    finally:
        dist.all_reduce = orig
    return {"fed": fed, "seen": seen, "lrs": lrs, "micro_collectives": micro_collectives}


def _stats_worker(rank: int, out: Path) -> dict:
    return {name: _run(rank, spec["mode"], spec["weighted"]) for name, spec in SCENARIOS.items()}


@pytest.fixture(scope="module")
def stats_results(tmp_path_factory) -> list[dict]:
    return _spawn(_stats_worker, tmp_path_factory.mktemp("ddp_stats"), "stats")


def _global_windows(results: list[dict], name: str) -> list[dict]:
    """Per window: the global weighted mean loss, the summed weight, and the samples seen so far."""
    fed = [r[name]["fed"] for r in results]
    out, samples = [], 0.0
    for start in range(0, len(SIZES[0]), K):
        pairs = [p for rank in fed for p in rank[start:start + K]]
        total = sum(w for _, w in pairs)
        samples += total
        out.append({"loss": sum(v * w for v, w in pairs) / total, "batch": total, "samples": samples,
                    "rank_losses": [sum(v * w for v, w in rank[start:start + K]) / sum(w for _, w in rank[start:start + K])
                                    for rank in fed]})
    return out


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_loss_batch_and_samples_are_global_on_every_rank(stats_results, name):
    windows = _global_windows(stats_results, name)
    for rank, res in enumerate(stats_results):
        seen = res[name]["seen"]
        assert len(seen) == len(windows) == 3
        for u, (s, g) in enumerate(zip(seen, windows)):
            assert not math.isclose(g["rank_losses"][0], g["rank_losses"][1], rel_tol=1e-3)  # a real difference
            assert math.isclose(s["last_loss"], g["loss"], rel_tol=1e-12), (rank, u, s["last_loss"], g)
            assert s["effective_batch"] == g["batch"], (rank, u)
            assert s["samples"] == g["samples"], (rank, u)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_plateau_scheduler_follows_the_global_loss_on_every_rank(stats_results, name):
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, factor=0.5, patience=0, threshold=0.0)
    want = []
    for g in _global_windows(stats_results, name):
        ref.step(g["loss"])
        want.append(ref_opt.param_groups[0]["lr"])
    assert stats_results[0][name]["lrs"] == stats_results[1][name]["lrs"] == want


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_no_collective_on_micro_steps_that_do_not_update(stats_results, name):
    for res in stats_results:
        counts = res[name]["micro_collectives"]
        assert len(counts) == len(SIZES[0]) - len(SIZES[0]) // K and counts == [0] * len(counts)


def test_memory_is_the_ranks_own(stats_results):
    for res in stats_results:
        s = res["inplace_weighted"]["seen"][-1]
        assert s["memory_kind"] == "rss" and s["memory_bytes"] > 0 and s["memory_peak_bytes"] >= s["memory_bytes"]

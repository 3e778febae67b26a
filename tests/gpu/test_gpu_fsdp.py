"""FSDP2 and DDP on CUDA with NCCL, one rank: gradient synchronisation only on the closing backward.

One rank is enough to prove the switching (what the model reduces, and when); the
two-rank numerics are covered on CPU/gloo by tests/test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from accumopt import AccumulatingOptimizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not dist.is_available() or not dist.is_nccl_available(),
        reason="needs a CUDA device and NCCL",
    ),
]

DT = torch.float64
SIZES = [3, 5, 2, 6, 1, 4]
K = 3


@pytest.fixture
def nccl_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    torch.cuda.set_device(0)
    yield
    dist.destroy_process_group()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to("cuda", DT)


def _data(i: int, n: int):
    g = torch.Generator().manual_seed(i)
    return torch.randn(n, 5, generator=g, dtype=DT).cuda(), torch.randn(n, 3, generator=g, dtype=DT).cuda()


def _reference() -> list[torch.Tensor]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    for w in range(len(SIZES) // K):
        xs, ys = zip(*(_data(i, SIZES[i]) for i in range(w * K, (w + 1) * K)))
        ((model(torch.cat(xs)) - torch.cat(ys)) ** 2).sum(1).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()]


def _train(model, params, after_backward) -> AccumulatingOptimizer:
    opt = AccumulatingOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), K, model=model)
    for i, n in enumerate(SIZES):
        x, y = _data(i, n)
        opt.backward(((model(x) - y) ** 2).sum(1).mean(), weight=n)
        after_backward.append(after_backward_probe(params))
        opt.step()
        opt.zero_grad()
    return opt


def after_backward_probe(params) -> int:
    return int(any(p.grad is not None for p in params))


def test_fsdp2_reduce_scatters_only_on_the_closing_backward(nccl_group):
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model[0])
    fully_shard(model)
    sharded = list(model.parameters())
    seen: list[int] = []
    _train(model, sharded, seen)
    assert seen == [0, 0, 1, 0, 0, 1]  # sharded .grad exists only after FSDP2 reduce-scattered
    for got, want in zip(sharded, _reference()):
        got = got.full_tensor()
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-10


def test_ddp_reduces_only_on_the_closing_backward(nccl_group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_model(), device_ids=[0])
    buckets = []

    def hook(state, bucket):
        buckets.append(len(seen))
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())  # one rank: the mean is the tensor itself
        return fut

    model.register_comm_hook(None, hook)
    seen: list[int] = []
    _train(model, list(model.parameters()), seen)
    assert sorted(set(buckets)) == [K - 1, 2 * K - 1]  # only during the closing backward of each window
    for got, want in zip(model.parameters(), _reference()):
        assert ((got.detach() - want).abs().max() / want.abs().max()).item() < 1e-10

"""CUDA: ``stats()`` is the only synchronisation; checkpoints resume bit-identically on the device."""

from __future__ import annotations

import pytest
import torch

from accumopt import AccumulatingOptimizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _setup(mode: str, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).cuda()
    opt = AccumulatingOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), 4, mode=mode,
                                track_grad_norm=True, noise_scale=True, **kw)
    g = torch.Generator(device="cuda").manual_seed(1)
    data = [(torch.randn(8, 16, device="cuda", generator=g), torch.randn(8, 1, device="cuda", generator=g))
            for _ in range(12)]
    return model, opt, data


@pytest.mark.parametrize("mode, policy", [("inplace", "ignore"), ("buffered", "drop"), ("buffered", "ignore")])
def test_micro_steps_do_not_sync_and_stats_reads(mode, policy):
    model, opt, data = _setup(mode, nonfinite=policy)
    weight = torch.tensor(8.0, device="cuda")

    def micro(i):
        x, y = data[i]
        loss = torch.nn.functional.mse_loss(model(x), y)
        if mode == "inplace":
            opt.backward(loss, weight=weight)
            opt.step(loss=loss.detach())
        else:
            loss.backward()
            opt.step(weight=weight, loss=loss.detach())
        opt.zero_grad()

    for i in range(4):  # warm-up window (allocations, first boundary)
        micro(i)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(4, 7):  # micro-steps without an update
            micro(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    s = opt.stats()
    assert s["micro_steps"] == 7 and s["updates"] == 1 and s["samples"] == 56.0
    assert s["memory_kind"] == "cuda" and s["memory_peak_bytes"] >= s["memory_bytes"] > 0
    assert s["last_grad_norm"] > 0 and s["accumulated_loss"] > 0
    opt.discard()  # the second window stays open on purpose


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
def test_mid_window_resume_on_cuda_is_bit_identical(tmp_path, mode):
    model, opt, data = _setup(mode)

    def train(m, o, lo, hi):
        for x, y in data[lo:hi]:
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
            o.zero_grad()

    train(model, opt, 0, 12)
    first, first_opt, _ = _setup(mode)
    train(first, first_opt, 0, 6)
    first_opt.save(tmp_path / "ck.pt", extra={"model": first.state_dict()})
    resumed, resumed_opt, _ = _setup(mode)
    resumed.load_state_dict(resumed_opt.load(tmp_path / "ck.pt")["model"])
    assert all(t.device.type == "cuda" for t in resumed_opt.state_dict()["accumulation"]["sums"] if t is not None)
    train(resumed, resumed_opt, 6, 12)
    for p, q in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(p, q)
    assert resumed_opt.stats()["noise_scale"] == opt.stats()["noise_scale"]

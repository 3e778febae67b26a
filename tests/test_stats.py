"""``stats()``: counts against hand-counted runs, values against independent computations, no host reads
on micro-steps, periodic logging."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from accumopt import AccumulatingOptimizer


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 1, generator=g, dtype=torch.float64))
            for _ in range(n)]


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def test_drop_policy_counts_against_hand_count():
    """Buffered, nonfinite='drop', K=3, weights 1,2,3,1,2,3,...; NaN injected into micro-batches
    4 (window 1), 6, 7, 8 (all of window 2: skipped) and 11 (window 3)."""
    K, bad = 3, {4, 6, 7, 8, 11}
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), K, mode="buffered",
                                nonfinite="drop", track_grad_norm=True)
    losses, weights = [], []
    for i, (x, y) in enumerate(batches(12)):
        loss = loss_fn(model, x, y)
        loss.backward()
        if i in bad:
            model[0].weight.grad[0, 0] = math.nan
        w = float(i % 3 + 1)
        opt.step(weight=w, loss=loss.detach())
        opt.zero_grad()
        losses.append(loss.item())
        weights.append(w)
    s = opt.stats()
    # Hand count: windows 0, 1 and 3 applied; window 2 lost all three micro-batches and was skipped.
    assert s["micro_steps"] == 12
    assert s["updates"] == 3 and opt.num_updates == 3
    assert s["skipped_updates"] == 1
    assert s["dropped_micro_batches"] == 5
    assert s["nonfinite_events"] == 5
    kept = [i for i in range(12) if i not in bad]
    assert s["samples"] == sum(weights[i] for i in kept) == 1 + 2 + 3 + 1 + 3 + 1 + 2
    assert s["effective_batch"] == weights[9] + weights[10] == 3.0  # last window: 9, 10 kept
    last = (weights[9] * losses[9] + weights[10] * losses[10]) / (weights[9] + weights[10])
    assert s["last_loss"] == pytest.approx(last, rel=1e-12)
    assert s["accumulated_loss"] is None and s["pending"] == 0
    assert s["accumulation_steps"] == K
    assert math.isfinite(s["last_grad_norm"]) and math.isfinite(s["mean_grad_norm"])


def test_skip_policy_inplace_counts_and_grad_norms_against_large_batch():
    """Inplace, nonfinite='skip', K=2: windows 0 and 2 applied, window 1 (NaN in micro-batch 3) skipped.
    Grad norms equal the norm of the plain large-batch gradient of each applied window."""
    K = 2
    data = batches(6)
    model = make_model()
    ref = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), K, nonfinite="skip",
                                track_grad_norm=True)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    norms = []
    for i, (x, y) in enumerate(data):
        loss = loss_fn(model, x, y)
        loss.backward()
        if i == 3:
            model[2].bias.grad.fill_(math.inf)
        opt.step(loss=loss.detach())
        opt.zero_grad()
        if i % K == K - 1 and i // K != 1:  # the reference: one plain step on the window's concatenated batch
            xs = torch.cat([data[j][0] for j in range(i - 1, i + 1)])
            ys = torch.cat([data[j][1] for j in range(i - 1, i + 1)])
            ref_opt.zero_grad()
            loss_fn(ref, xs, ys).backward()
            norms.append(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ref.parameters()])).item())
            ref_opt.step()
    s = opt.stats()
    assert (s["micro_steps"], s["updates"], s["skipped_updates"]) == (6, 2, 1)
    assert s["dropped_micro_batches"] == 0 and s["nonfinite_events"] == 1
    assert s["effective_batch"] == 2.0 and s["samples"] == 6.0
    assert s["last_grad_norm"] == pytest.approx(norms[-1], rel=1e-10)
    assert s["mean_grad_norm"] == pytest.approx(sum(norms) / 2, rel=1e-10)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=0)


def test_accumulated_loss_of_the_open_window_and_rate_and_memory():
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 4, mode="buffered")
    values = []
    for x, y in batches(6):
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step(weight=4.0, loss=loss.detach())
        values.append(loss.item())
    s = opt.stats()
    assert s["pending"] == 2
    assert s["accumulated_loss"] == pytest.approx(sum(values[4:]) / 2, rel=1e-12)
    assert s["last_loss"] == pytest.approx(sum(values[:4]) / 4, rel=1e-12)
    assert s["samples"] == 24.0 and s["samples_per_second"] > 0
    assert s["memory_kind"] == "rss" and s["memory_bytes"] > 0 and s["memory_peak_bytes"] >= s["memory_bytes"] / 2
    assert s["buffer_bytes"] == sum(p.numel() * 8 for p in model.parameters())
    opt.discard()  # the open window was the point


def test_micro_steps_never_read_device_values(monkeypatch):
    """A proxy on CPU for "stats() is the only sync": every host read of a tensor raises during
    micro-steps that do not update (drop policy, noise scale, grad norms and losses on)."""
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), 4, mode="buffered",
                                nonfinite="drop", track_grad_norm=True, noise_scale=True)
    data = batches(9)

    def micro(i):
        x, y = data[i]
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step(weight=4.0, loss=loss.detach())  # (a CPU tensor weight is validated on the host by design)
        opt.zero_grad()

    for i in range(4):  # one full window first (its boundary may read the non-finite flag)
        micro(i)

    def forbidden(*_a, **_k):
        raise AssertionError("host read of a device value on a micro-step")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
            m.setattr(torch.Tensor, name, forbidden)
        for i in range(4, 7):  # three micro-steps of the second window: no update
            micro(i)
    s = opt.stats()  # reads now
    assert s["micro_steps"] == 7 and s["updates"] == 1 and s["samples"] == 28.0
    opt.discard()  # the second window stays open on purpose


def test_log_every(caplog):
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, log_every=3)
    with caplog.at_level(logging.INFO, logger="accumopt"):
        for x, y in batches(14):  # 7 updates: logs at 3 and 6
            loss = loss_fn(model, x, y)
            loss.backward()
            opt.step(loss=loss.detach())
            opt.zero_grad()
    records = [r for r in caplog.records if r.name == "accumopt" and "update" in r.getMessage()]
    assert [r.getMessage().split()[2] for r in records] == ["3", "6"]


@pytest.mark.parametrize("info", [False, True])
def test_log_every_reads_only_while_info_is_on(monkeypatch, caplog, info):
    """The record's values come with the update's one host read; INFO off: no read at all."""
    from accumopt import hostread

    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 1, log_every=1)
    reads = []
    real = hostread.host_read
    monkeypatch.setattr(hostread, "host_read", lambda t: reads.append(t.numel()) or real(t))
    with caplog.at_level(logging.INFO if info else logging.WARNING, logger="accumopt"):
        for x, y in batches(3):
            loss = loss_fn(model, x, y)
            loss.backward()
            opt.step(loss=loss.detach())
    assert opt.num_updates == 3
    assert len(reads) == (3 if info else 0)


def test_log_record_matches_stats(caplog):
    """Every figure of the record (built from the update's read) equals what stats() reads afterwards."""
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, mode="buffered", log_every=1,
                                track_grad_norm=True, nonfinite="skip")
    expected = []
    with caplog.at_level(logging.INFO, logger="accumopt"):
        for i, (x, y) in enumerate(batches(6)):
            loss = loss_fn(model, x, y)
            loss.backward()
            opt.step(loss=loss.detach(), weight=torch.tensor(float(i + 1), dtype=torch.float64))
            opt.zero_grad()
            if opt.stepped:
                s = opt.stats()
                expected.append(f"update {s['updates']} ({s['micro_steps']} micro-steps, 0 skipped): "
                                f"loss {s['last_loss']:.6g}, grad norm {s['last_grad_norm']:.6g}, K 2, "
                                f"effective batch {s['effective_batch']:.6g}")
    got = [r.getMessage() for r in caplog.records if r.name == "accumopt"]
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        assert g.startswith("accumopt: " + e), (g, e)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3"])
def test_invalid_log_every(bad):
    model = make_model()
    with pytest.raises((TypeError, ValueError), match="log_every"):
        AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2, log_every=bad)


def test_stats_survive_a_state_round_trip():
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 3, mode="buffered",
                                nonfinite="drop", track_grad_norm=True)
    for i, (x, y) in enumerate(batches(8)):
        loss = loss_fn(model, x, y)
        loss.backward()
        if i == 1:
            model[0].bias.grad[0] = math.nan
        opt.step(weight=2.0, loss=loss.detach())
        opt.zero_grad()
    other = AccumulatingOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), 3, mode="buffered",
                                  nonfinite="drop", track_grad_norm=True)
    other.load_state_dict(opt.state_dict())
    a, b = opt.stats(), other.stats()
    for key in ("micro_steps", "updates", "skipped_updates", "dropped_micro_batches", "nonfinite_events", "samples",
                "effective_batch", "last_loss", "accumulated_loss", "last_grad_norm", "mean_grad_norm", "pending"):
        assert a[key] == b[key], key
    other.discard()  # the loaded window stays pending on purpose


def test_get_accumulation_stats_alias():
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2)
    assert opt.get_accumulation_stats()["micro_steps"] == 0


def test_host_read_reads_everything_with_one_copy():
    from accumopt.hostread import HostRead

    copies = []
    read = HostRead(lambda t: copies.append(t.numel()) or t.tolist())
    read.add("flags", torch.tensor([2.0, 0.0, 1.0]))
    read.add("metric", torch.tensor(0.25, dtype=torch.float32))
    read.add("k", 7)
    read.add("count", torch.tensor(3))
    assert not read.done and read.scalar("metric") is None
    read.run()
    assert copies == [5]  # every tensor in one copy; the number needs none
    assert read.get("flags") == [2.0, 0.0, 1.0] and read.scalar("metric") == 0.25
    assert read.scalar("k") == 7.0 and read.scalar("count") == 3.0 and read.scalar("absent") is None
    with pytest.raises(RuntimeError, match="requested after the read"):
        read.add("late", torch.ones(()))
    empty = HostRead(lambda t: copies.append(t.numel()) or t.tolist())
    empty.run()
    assert copies == [5] and empty.syncs == 0

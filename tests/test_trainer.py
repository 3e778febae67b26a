"""GradientAccumulationTrainer: last partial window, resume from a checkpoint, progress output, history."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn
import torch.utils.data as data

import accumopt.trainer as trainer_mod
from accumopt import AccumulationMode, AccumulationStrategy, GradientAccumulationConfig, GradientAccumulationTrainer


def dataset(n=100, features=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g, dtype=torch.float64)
    return data.TensorDataset(x, (x @ torch.randn(features, 3, generator=g, dtype=torch.float64)).argmax(1))


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 3)).double()


def make(config, *, lr=0.05, stream=None, sched=False):
    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    s = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if sched else None
    t = GradientAccumulationTrainer(config, progress_stream=stream or io.StringIO())
    t.setup_training(m, opt, nn.CrossEntropyLoss(), s)
    return t, m


@pytest.mark.parametrize("mode", [AccumulationMode.STANDARD, AccumulationMode.EFFICIENT])
def test_last_partial_window_is_applied_with_sample_weights(mode):
    # 100 samples, batches of 16, K=4: windows of 64 and 36 samples (the last batch has 4).
    ds = dataset()
    t, m = make(GradientAccumulationConfig(accumulation_steps=4, mode=mode, progress_bar=False), sched=True)
    torch.manual_seed(5)
    t.train(data.DataLoader(ds, batch_size=16, shuffle=True), num_epochs=3)
    assert [h["optimization_steps"] for h in t.training_history] == [2, 2, 2]
    ref = model()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    torch.manual_seed(5)
    loader = data.DataLoader(ds, batch_size=64, shuffle=True)  # same permutation, large batches 64 + 36
    for _ in range(3):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(ref(x), y).backward()
            opt.step()
            sched.step()
    # (Dropout is switched off by the autouse fixture: its draws differ between one 64-batch and four 16-batches.)
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.fixture(autouse=True)
def no_dropout(monkeypatch):
    monkeypatch.setattr(nn.Dropout, "forward", lambda self, x: x)  # deterministic forward for equality tests


def test_history_records_each_epoch_and_loss_decreases():
    t, _ = make(GradientAccumulationConfig(accumulation_steps=2, effective_batch_size=10, progress_bar=False))
    hist = t.train(data.DataLoader(dataset(), batch_size=10), num_epochs=4)
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]
    assert all(h["num_samples"] == 100 and h["num_batches"] == 10 and h["optimization_steps"] == 5 for h in hist)
    assert hist[-1]["epoch_loss"] < hist[0]["epoch_loss"]
    assert hist[0]["effective_batch_size"] == 20


@pytest.mark.parametrize("strategy", [AccumulationStrategy.UNIFORM, AccumulationStrategy.MEMORY_AWARE])
def test_resume_from_checkpoint_is_bit_identical(tmp_path, strategy):
    torch.set_num_threads(1)
    ds = dataset(n=96)
    cfg = dict(accumulation_steps=3, progress_bar=False, checkpoint_every=5, checkpoint_path=str(tmp_path / "ck.pt"),
               strategy=strategy)

    def loader():
        return data.DataLoader(ds, batch_size=8, shuffle=True)

    torch.manual_seed(7)
    full, m_full = make(GradientAccumulationConfig(**cfg), sched=True)
    full.train(loader(), num_epochs=3)

    class Crash(Exception):
        pass

    torch.manual_seed(7)
    t, m = make(GradientAccumulationConfig(**cfg), sched=True)
    calls = {"n": 0}
    crit = t.criterion

    def crashing(out, y):
        calls["n"] += 1
        if calls["n"] == 20:  # epoch 1, batch 8: after the checkpoint at update 5 (batch 15 overall)
            raise Crash
        return crit(out, y)

    t.criterion = crashing
    with pytest.raises(Crash):
        t.train(loader(), num_epochs=3)
    t.optimizer.discard()  # the window the crash interrupted: the checkpoint is what resumes
    torch.manual_seed(12345)  # whatever the RNG state now, the checkpoint restores it
    t2, m2 = make(GradientAccumulationConfig(**cfg), sched=True)
    t2.train(loader(), num_epochs=3, resume_from=tmp_path / "ck.pt")
    assert all(torch.equal(p, q) for p, q in zip(m_full.parameters(), m2.parameters()))
    assert [h["epoch_loss"] for h in t2.training_history] == [h["epoch_loss"] for h in full.training_history]
    assert t2.optimizer.optimizer.param_groups[0]["lr"] == full.optimizer.optimizer.param_groups[0]["lr"] < 0.05


def test_memory_aware_checkpoint_mid_window_holds_the_pending_batches(tmp_path):
    # MEMORY_AWARE keeps a window's loader batches until its K-th (MicroBatcher runs them then).
    ds = dataset(n=40)
    batches = list(data.DataLoader(ds, batch_size=8))
    cfg = GradientAccumulationConfig(strategy=AccumulationStrategy.MEMORY_AWARE, accumulation_steps=4,
                                     progress_bar=False)
    a, m_a = make(cfg)
    b, m_b = make(cfg)
    for x, y in batches[:2]:
        a.train_step(x, y)
    assert a.accumulator.state.accumulation_step == 2 and a.accumulator.pending_batches == 2
    a.save_checkpoint(tmp_path / "mid.pt")
    b.load_checkpoint(tmp_path / "mid.pt")
    for t in (a, b):
        for x, y in batches[2:]:
            r = t.train_step(x, y)
        assert r["should_optimize"] is False and t.accumulator.flush(loss_fn=t._micro_loss)
    assert a.accumulator.state.total_optimizer_steps == b.accumulator.state.total_optimizer_steps == 2
    assert all(torch.equal(p, q) for p, q in zip(m_a.parameters(), m_b.parameters()))


def test_wrapper_param_groups_follow_a_loaded_state():
    t, _ = make(GradientAccumulationConfig(accumulation_steps=2, progress_bar=False), sched=True)
    t.train(data.DataLoader(dataset(), batch_size=10), num_epochs=1)
    sd = t.accumulator.state_dict()
    t2, _ = make(GradientAccumulationConfig(accumulation_steps=2, progress_bar=False), sched=True)
    t2.accumulator.load_state_dict(sd)
    assert t2.optimizer.param_groups is t2.optimizer.optimizer.param_groups


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    t, _ = make(GradientAccumulationConfig(accumulation_steps=2, progress_bar=False))
    t.train(data.DataLoader(dataset(), batch_size=10), num_epochs=1)
    t.save_checkpoint(tmp_path / "ck.pt")
    other, m = make(GradientAccumulationConfig(accumulation_steps=4, progress_bar=False))
    before = [p.clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="different configuration"):
        other.load_checkpoint(tmp_path / "ck.pt")
    assert all(torch.equal(p, q) for p, q in zip(before, m.parameters()))


@pytest.mark.parametrize("kind", ["accumulator_file", "other_model"])
def test_a_file_that_is_not_this_trainers_checkpoint_changes_nothing(tmp_path, kind):
    cfg = GradientAccumulationConfig(accumulation_steps=4, progress_bar=False)
    t, _ = make(cfg)
    x, y = dataset(n=30)[:]
    for i in range(3):
        t.train_step(x[10 * i: 10 * i + 10], y[10 * i: 10 * i + 10])  # a window of 3 micro-batches
    if kind == "accumulator_file":
        t.accumulator.save_accumulation_state(tmp_path / "f.pt")  # no model, no trainer state
    else:
        small = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Dropout(0.1), nn.Linear(4, 3)).double()
        other = GradientAccumulationTrainer(cfg, progress_stream=io.StringIO())
        other.setup_training(small, torch.optim.AdamW(small.parameters(), lr=0.05), nn.CrossEntropyLoss())
        other.train_step(x[:10], y[:10])
        other.save_checkpoint(tmp_path / "f.pt")
    fresh, m = make(cfg)
    fresh.train_step(x[:10], y[:10])
    before = [p.clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="not a trainer checkpoint"):
        fresh.load_checkpoint(tmp_path / "f.pt")
    assert all(torch.equal(p, q) for p, q in zip(before, m.parameters()))
    st = fresh.accumulator.state
    assert st.accumulation_step == 1 and st.total_steps == 1  # the accumulator's window is its own still
    t.optimizer.discard()  # both windows stay open on purpose
    fresh.optimizer.discard()


class FakeTqdm:
    instances: list = []

    def __init__(self, **kw):
        self.kw, self.updates, self.postfix, self.closed = kw, 0, [], False
        FakeTqdm.instances.append(self)

    def update(self, n):
        self.updates += n

    def set_postfix_str(self, s):
        self.postfix.append(s)

    def close(self):
        self.closed = True


def test_progress_bar_with_tqdm_shows_loss_lr_k_and_throughput(monkeypatch):
    FakeTqdm.instances = []
    monkeypatch.setattr(trainer_mod, "_tqdm", lambda: FakeTqdm)
    out = io.StringIO()
    t, _ = make(GradientAccumulationConfig(accumulation_steps=2, logging_frequency=1), stream=out)
    t.train(data.DataLoader(dataset(), batch_size=10), num_epochs=2)
    assert len(FakeTqdm.instances) == 2
    bar = FakeTqdm.instances[0]
    assert bar.updates == 10 and bar.closed and bar.kw["total"] == 10
    assert all(k in bar.postfix[-1] for k in ("loss=", "lr=", "K=2", "samples/s"))
    assert out.getvalue() == ""  # the bar, not extra lines


@pytest.mark.parametrize("progress_bar, disable", [(None, None), (True, False)])
def test_the_bar_is_automatic_unless_asked_for(monkeypatch, progress_bar, disable):
    FakeTqdm.instances = []
    monkeypatch.setattr(trainer_mod, "_tqdm", lambda: FakeTqdm)
    t, _ = make(GradientAccumulationConfig(accumulation_steps=2, progress_bar=progress_bar))
    t.train(data.DataLoader(dataset(), batch_size=10), num_epochs=1)
    assert FakeTqdm.instances[0].kw["disable"] is disable  # None: tqdm draws only on a terminal


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream", [io.StringIO, Terminal])
def test_real_tqdm_draws_on_a_terminal_only(stream):
    pytest.importorskip("tqdm")
    out = stream()
    t, _ = make(GradientAccumulationConfig(accumulation_steps=2), stream=out)
    t.train(data.DataLoader(dataset(), batch_size=10), num_epochs=1)
    text = out.getvalue()
    if stream is Terminal:
        assert "epoch 0" in text and "K=2" in text and "samples/s" in text and "\r" in text
    else:
        assert text == ""  # not a terminal: no bar (tqdm's disable=None)


@pytest.mark.parametrize("progress_bar", [None, True, False])
def test_without_tqdm_or_when_disabled_nothing_is_written_and_nothing_read(monkeypatch, progress_bar):
    monkeypatch.setattr(trainer_mod, "_tqdm", lambda: None if progress_bar is not False else FakeTqdm)
    out = io.StringIO()
    t, _ = make(GradientAccumulationConfig(accumulation_steps=2, logging_frequency=1, progress_bar=progress_bar),
                stream=out)
    reads = []
    monkeypatch.setattr(t.optimizer, "stats", lambda: reads.append(1))  # (the trainer's per-update read)
    t.train(data.DataLoader(dataset(), batch_size=10), num_epochs=1)
    assert out.getvalue() == "" and reads == []  # the logger "accumopt" reports at INFO (see logging_frequency)


def test_mixed_precision_float16_uses_an_owned_scaler_and_trains():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    t = GradientAccumulationTrainer(GradientAccumulationConfig(accumulation_steps=2, mixed_precision="float16",
                                                               progress_bar=False, device="cpu"))
    t.setup_training(m, torch.optim.Adam(m.parameters(), lr=0.01), nn.CrossEntropyLoss())
    assert t.accumulator.scaler is not None
    ds = data.TensorDataset(dataset()[:][0].float(), dataset()[:][1])
    hist = t.train(data.DataLoader(ds, batch_size=10), num_epochs=5)
    assert hist[-1]["epoch_loss"] < hist[0]["epoch_loss"]
    assert t.optimizer.stats()["updates"] >= 20


def test_bad_arguments():
    t = GradientAccumulationTrainer(GradientAccumulationConfig())
    with pytest.raises(RuntimeError, match="setup_training"):
        t.train_step(torch.zeros(1, 8), torch.zeros(1))
    with pytest.raises(TypeError, match="criterion"):
        t.setup_training(model(), torch.optim.SGD(model().parameters(), lr=0.1), criterion=3)
    if not torch.cuda.is_available():
        t = GradientAccumulationTrainer(GradientAccumulationConfig(device="cuda"))
        m = model()
        with pytest.raises(ValueError, match="CUDA is not available"):
            t.setup_training(m, torch.optim.SGD(m.parameters(), lr=0.1), nn.CrossEntropyLoss())


# ----------------------------------------------------------------------------------- regressions
def _sgd_trained(config, *, stale: str | None, loader, epochs=1, lr=0.5):
    """Train a fresh model; ``stale``: leave a full-batch .grad before setup_training or between it and train."""
    m = model()
    x, y = dataset()[:]
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    if stale == "before_setup":
        nn.functional.cross_entropy(m(x), y).backward()
    t = GradientAccumulationTrainer(config, progress_stream=io.StringIO())
    t.setup_training(m, opt, nn.CrossEntropyLoss())
    if stale == "before_train":
        nn.functional.cross_entropy(m(x), y).backward()
    t.train(loader, num_epochs=epochs)
    return m


@pytest.mark.parametrize("mode", [AccumulationMode.STANDARD, AccumulationMode.EFFICIENT])
@pytest.mark.parametrize("stale", ["before_setup", "before_train"])
def test_stale_gradients_from_before_training_never_enter_an_update(mode, stale):
    cfg = GradientAccumulationConfig(accumulation_steps=4, mode=mode, progress_bar=False, device="cpu")
    loader = data.DataLoader(dataset(n=64), batch_size=16)  # one window of 64 samples: one SGD step
    trained = _sgd_trained(cfg, stale=stale, loader=loader)
    ref = model()  # reference: one plain SGD step from fresh gradients on the 64 samples
    x, y = dataset(n=64)[:]
    nn.functional.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        for p, q in zip(trained.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q - 0.5 * q.grad, rtol=1e-12, atol=1e-14)


def test_history_counts_the_samples_of_each_update():
    # Loader batches of 32 while the config says 16: one warning; updates of 4 x 32 = 128 samples reported.
    cfg = GradientAccumulationConfig(accumulation_steps=4, effective_batch_size=16, target_batch_size=64,
                                     progress_bar=False)
    t, _ = make(cfg)
    with pytest.warns(UserWarning, match=r"micro-batches hold 32 samples but effective_batch_size=16") as rec:
        hist = t.train(data.DataLoader(dataset(n=256), batch_size=32), num_epochs=2)
    assert sum("effective_batch_size=16" in str(w.message) for w in rec) == 1
    assert [h["effective_batch_size"] for h in hist] == [128, 128]
    assert t.accumulator.get_accumulation_stats()["effective_batch_size"] == 128
    # No batch sizes in the config: still the real count. PROGRESSIVE K=8 on an epoch of 4 batches of 10:
    # one flushed update of 40 samples, never 8 x 10.
    cfg = GradientAccumulationConfig(mode=AccumulationMode.PROGRESSIVE, accumulation_schedule=[2, 8],
                                     progress_bar=False)
    t, _ = make(cfg)
    hist = t.train(data.DataLoader(dataset(n=40), batch_size=10), num_epochs=2)
    assert [h["effective_batch_size"] for h in hist] == [20, 40]
    assert all(h["effective_batch_size"] <= h["num_samples"] for h in hist)


@pytest.mark.parametrize("policy", ["skip", "drop"])
def test_non_finite_losses_are_left_out_of_the_epoch_loss(policy):
    ds = dataset(n=60)
    x, y = ds[:]
    x = x.clone()
    x[20:30] = float("nan")  # the third batch of 10
    cfg = GradientAccumulationConfig(accumulation_steps=2, nan_handling=True, nan_policy=policy, progress_bar=False)
    t, m = make(cfg, lr=0.0)  # lr 0: the model stays fixed, so the reference is one forward pass
    hist = t.train(data.DataLoader(data.TensorDataset(x, y), batch_size=10), num_epochs=1)
    ok = torch.isfinite(x).all(dim=1)
    with torch.no_grad():
        expected = nn.functional.cross_entropy(m(x[ok]), y[ok]).item()
    assert hist[0]["epoch_loss"] == pytest.approx(expected, rel=1e-12)
    assert hist[0]["num_samples"] == 60
    # Without nan_handling nothing is filtered (the NaN reaches the model too, as in plain torch).
    t, _ = make(GradientAccumulationConfig(accumulation_steps=2, progress_bar=False), lr=0.0)
    assert math.isnan(t.train(data.DataLoader(data.TensorDataset(x, y), batch_size=10), num_epochs=1)[0]["epoch_loss"])


def test_epoch_log_line_rounds_to_four_significant_digits(caplog):
    import logging
    import re

    t, _ = make(GradientAccumulationConfig(accumulation_steps=2, progress_bar=False))
    with caplog.at_level(logging.INFO, logger="accumopt"):
        t.train(data.DataLoader(dataset(), batch_size=10), num_epochs=1)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 0:"))
    loss = re.search(r"loss (\S+?),", line).group(1)
    assert 0 < len(loss.replace(".", "").lstrip("0")) <= 4, line
    assert "20 samples per update" in line


@pytest.mark.parametrize("device,match", [("tpu", r"Invalid device: 'tpu'"), ("mps", r"Invalid device: 'mps'")])
def test_unusable_device_is_a_value_error(device, match):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(ValueError, match=match):
        t = GradientAccumulationTrainer(GradientAccumulationConfig(device=device))
        m = model()
        t.setup_training(m, torch.optim.SGD(m.parameters(), lr=0.1), nn.CrossEntropyLoss())
    if torch.cuda.is_available():
        t = GradientAccumulationTrainer(GradientAccumulationConfig(device=f"cuda:{torch.cuda.device_count()}"))
        m = model()
        with pytest.raises(ValueError, match="expected an index below"):
            t.setup_training(m, torch.optim.SGD(m.parameters(), lr=0.1), nn.CrossEntropyLoss())


def test_micro_steps_that_do_not_update_read_no_device_value(monkeypatch):
    # A host read of a device value (.item(), float(), bool(), .tolist()) is a sync on an accelerator:
    # none may happen on a micro-step that does not close a window, nan_handling included.
    cfg = GradientAccumulationConfig(accumulation_steps=4, nan_handling=True, nan_policy="drop", progress_bar=False)
    t, _ = make(cfg)
    x, y = dataset(n=40)[:]

    def no_read(*args, **kwargs):
        raise AssertionError("host read of a tensor on a micro-step that does not update")

    ep = dict(trainer_mod._NEW_EPOCH)
    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
            patch.setattr(torch.Tensor, name, no_read)
        for i in range(3):
            r = t.train_step(x[10 * i: 10 * i + 10], y[10 * i: 10 * i + 10])
            t._add_loss(ep, r["loss"], r["loss_samples"])
        assert not r["should_optimize"] and r["accumulation_step"] == 3 and r["effective_batch_size"] == 40
    assert t.accumulator.state.accumulation_step == 3  # the snapshot reads the statistics: one host read
    r = t.train_step(x[30:], y[30:])
    assert r["should_optimize"] and r["effective_batch_size"] == 40


def test_batches_move_to_the_device_keeping_their_structure():
    from collections import UserDict, namedtuple

    from accumopt.trainer import _to

    Pair = namedtuple("Pair", "x y")
    enc = UserDict({"input_ids": torch.ones(2, 3), "mask": torch.zeros(2, 3)})  # like HF's BatchEncoding
    moved = _to([Pair(torch.ones(2), 5), enc, {"t": torch.ones(1)}, ["a", "b"]], torch.device("meta"))
    assert type(moved[0]) is Pair and moved[0].x.device.type == "meta" and moved[0].y == 5
    assert type(moved[1]) is UserDict and all(v.device.type == "meta" for v in moved[1].values())
    assert moved[2]["t"].device.type == "meta" and moved[3] == ["a", "b"]

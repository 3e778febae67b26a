"""State dicts and checkpoint files: bit-identical mid-window resume, atomic saves, refused files.

The reference for every resume is the same run without interruption (same
seeds, same data); comparisons are ``torch.equal`` (bitwise).
"""

from __future__ import annotations

import copy
import io
import multiprocessing
import os
import pickle
import signal
import struct
import zipfile

import pytest
import torch
from hypothesis import given, settings, strategies as st

import accumopt.checkpoint as ckpt
from accumopt import AccumulatingOptimizer

MODES = ["inplace", "buffered"]


# ------------------------------------------------------------------- helpers
def tree_equal(a, b) -> bool:
    """Bitwise equality of nested state (tensors by torch.equal, dtype and shape included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.device == b.device and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(tree_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # NaN
    return type(a) is type(b) and a == b


def make_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(dtype)


def make_data(n: int, dtype: torch.dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2 + i % 3, 3, generator=g).to(dtype), torch.randn(2 + i % 3, 2, generator=g).to(dtype))
            for i in range(n)]


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.01),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01),
}


def build(cfg: dict):
    model = make_model(cfg["dtype"])
    inner = OPTIMIZERS[cfg["optim"]](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=2, gamma=0.7)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2) if cfg["scaler"] else None
    opt = AccumulatingOptimizer(inner, cfg["k"], mode=cfg["mode"], scheduler=sched, scaler=scaler,
                                track_grad_norm=True, noise_scale=cfg.get("noise", False),
                                nonfinite="skip" if cfg["scaler"] else "ignore")
    return model, opt


def train(model, opt, data, start: int, stop: int, epoch_len: int) -> None:
    """Micro-batches ``start..stop-1``; epochs of ``epoch_len`` micro-batches, flushed at their end."""
    for i in range(start, stop):
        if i % epoch_len == 0:
            opt.set_epoch(i // epoch_len)
        x, y = data[i]
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.backward(loss, weight=float(len(x)))
        opt.step(loss=loss.detach())
        opt.zero_grad()
        if (i + 1) % epoch_len == 0:
            opt.flush()


def full_state(model, opt) -> dict:
    return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}


# ------------------------------------------------------ mid-window resume (hypothesis)
@settings(max_examples=16)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64]),
    mode=st.sampled_from(MODES),
    scaler=st.booleans(),
    k=st.sampled_from([3, [2, 4, 3], {0: 4, 1: 2}]),
    optim=st.sampled_from(sorted(OPTIMIZERS)),
    noise=st.booleans(),
    cut=st.integers(min_value=1, max_value=29),
)
def test_mid_window_resume_is_bit_identical(tmp_path_factory, dtype, mode, scaler, k, optim, noise, cut):
    if scaler and dtype == torch.float64:
        dtype = torch.float32  # GradScaler("cpu") unscales fp32 gradients
    cfg = dict(dtype=dtype, mode=mode, scaler=scaler, k=k, optim=optim, noise=noise)
    n, epoch_len = 30, 10
    data = make_data(n, dtype)

    model, opt = build(cfg)
    train(model, opt, data, 0, n, epoch_len)

    first, first_opt = build(cfg)
    train(first, first_opt, data, 0, cut, epoch_len)
    pending, updates = first_opt.pending, first_opt.num_updates
    path = tmp_path_factory.mktemp("ck") / "opt.pt"
    first_opt.save(path, extra={"model": first.state_dict()})
    del first, first_opt

    resumed, resumed_opt = build(cfg)
    extra = resumed_opt.load(path)
    resumed.load_state_dict(extra["model"])
    assert (resumed_opt.pending, resumed_opt.num_updates) == (pending, updates)
    train(resumed, resumed_opt, data, cut, n, epoch_len)

    for p, q in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(p, q)
    a, b = resumed_opt.state_dict(), opt.state_dict()
    assert tree_equal(a["state"], b["state"])
    assert tree_equal(a["param_groups"], b["param_groups"])
    acc_a, acc_b = a["accumulation"], b["accumulation"]
    for key in ("window", "sums", "scaler", "scheduler", "noise", "signature"):
        assert tree_equal(acc_a[key], acc_b[key]), key
    sa, sb = resumed_opt.stats(), opt.stats()
    for key in ("micro_steps", "updates", "skipped_updates", "last_loss", "last_grad_norm", "mean_grad_norm",
                "effective_batch", "samples", "noise_scale"):
        assert tree_equal(sa.get(key), sb.get(key)), key


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_roundtrips_weights_only_and_is_not_mutated_by_load(mode):
    """Checklist 13/14/15: weights_only round trip equal; load does not mutate; two loads agree."""
    cfg = dict(dtype=torch.float32, mode=mode, scaler=True, k=4, optim="adamw", noise=True)
    data = make_data(16, torch.float32)
    model, opt = build(cfg)
    train(model, opt, data, 0, 11, 100)
    assert opt.pending == 3
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert tree_equal(loaded, sd)
    snapshot = copy.deepcopy(loaded)

    others = []
    for _ in range(2):
        m, o = build(cfg)
        o.load_state_dict(loaded)
        others.append((m, o))
        assert tree_equal(loaded, snapshot), "load_state_dict mutated its argument"
    assert tree_equal(others[0][1].state_dict(), others[1][1].state_dict())
    s1, s2 = opt.scaler, others[0][1].scaler
    assert s1.get_scale() == s2.get_scale() and s1._get_growth_tracker() == s2._get_growth_tracker()
    # Training the loaded optimizer on must not reach back into the dict it was loaded from.
    m, o = others[0]
    train(m, o, data, 11, 11 + 5, 100)
    assert tree_equal(loaded, snapshot), "the loaded optimizer aliases the state dict"


def test_loaded_wrapper_keeps_param_groups_shared():
    """torch's load_state_dict replaces param_groups/state; the wrapper and schedulers must still share them."""
    cfg = dict(dtype=torch.float64, mode="inplace", scaler=False, k=2, optim="sgd")
    data = make_data(5, torch.float64)
    model, opt = build(cfg)
    train(model, opt, data, 0, 5, 100)
    m2, o2 = build(cfg)
    groups, state = o2.param_groups, o2.state
    o2.load_state_dict(opt.state_dict())
    assert o2.param_groups is o2.optimizer.param_groups is groups
    assert o2.state is o2.optimizer.state is state
    assert o2.scheduler.optimizer.param_groups is groups
    assert o2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    o2.discard()  # the loaded window stays pending on purpose


# ------------------------------------------------------------ refused inputs
def _fresh(dtype=torch.float64, hidden=5, optim="adamw", mode="inplace", k=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2)).to(dtype)
    opt = AccumulatingOptimizer(OPTIMIZERS[optim](model.parameters()), k, mode=mode)
    return model, opt


def _trained(mode="inplace", **kw):
    model, opt = _fresh(mode=mode, **kw)
    for x, y in make_data(4, kw.get("dtype", torch.float64)):  # one update and one pending micro-batch
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


def _observable(opt) -> dict:
    """Everything that must stay as it was: state dict (incl. pending sums), .grad, identities."""
    return {"sd": copy.deepcopy(opt.state_dict()),
            "grads": [None if p.grad is None else p.grad.clone() for g in opt.param_groups for p in g["params"]],
            "stats": {k: v for k, v in opt.stats().items() if k not in ("samples_per_second", "memory_bytes",
                                                                         "memory_peak_bytes")}}


@pytest.fixture
def victim():
    """An optimizer mid-window, with a good checkpoint of another run on disk."""
    _, opt = _trained()
    yield opt
    opt.discard()  # mid-window on purpose


FOREIGN = {
    "shapes": (dict(hidden=6), "parameter 0 has shape"),
    "optimizer class": (dict(optim="sgd"), "wrapped optimizer class"),
    "mode": (dict(mode="buffered"), "mode"),
    "accumulation_steps": (dict(k=4), "accumulation_steps"),
    "dtype": (dict(dtype=torch.float32), "dtype float32"),
}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_foreign_checkpoint_is_refused_and_changes_nothing(tmp_path, victim, kind):
    kwargs, message = FOREIGN[kind]
    _, other = _trained(**kwargs)
    other.save(tmp_path / "foreign.pt")
    before = _observable(victim)
    with pytest.raises(ValueError, match=message):
        victim.load(tmp_path / "foreign.pt")
    assert tree_equal(_observable(victim), before)


def test_another_model_with_other_param_count_is_refused(tmp_path, victim):
    model = torch.nn.Linear(3, 2).double()
    other = AccumulatingOptimizer(torch.optim.AdamW(model.parameters()), 3)
    other.save(tmp_path / "f.pt")
    before = _observable(victim)
    with pytest.raises(ValueError, match="param groups of sizes|parameters"):
        victim.load(tmp_path / "f.pt")
    assert tree_equal(_observable(victim), before)


def _good_file(tmp_path) -> bytes:
    _, opt = _trained()
    opt.save(tmp_path / "good.pt")
    return (tmp_path / "good.pt").read_bytes()


def test_truncated_files_are_refused(tmp_path, victim):
    data = _good_file(tmp_path)
    before = _observable(victim)
    for frac in (0.0, 0.1, 0.5, 0.9, 0.999):
        path = tmp_path / f"trunc{frac}.pt"
        path.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(ValueError, match="Invalid checkpoint file"):
            victim.load(path)
    assert tree_equal(_observable(victim), before)


def _payload_ranges(data: bytes) -> list[tuple[str, int, int]]:
    """(name, start, end) of every record's stored bytes in a torch zip file."""
    out = []
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            off = info.header_offset
            name_len, extra_len = struct.unpack("<HH", data[off + 26:off + 30])
            begin = off + 30 + name_len + extra_len
            out.append((info.filename, begin, begin + info.compress_size))
    return out


def test_corrupted_tensor_data_is_refused(tmp_path, victim):
    """One flipped byte in every record of the file (tensor payloads included, which torch's reader does
    not checksum): each is refused."""
    data = _good_file(tmp_path)
    before = _observable(victim)
    ranges = [r for r in _payload_ranges(data) if r[2] > r[1]]
    assert sum(name.startswith("archive/data/") for name, _, _ in ranges) >= 10
    for name, begin, end in ranges:
        if name.endswith((".format_version", "archive/version", "serialization_id")):
            continue  # metadata torch does not use to rebuild the content
        bad = bytearray(data)
        bad[(begin + end) // 2] ^= 0x10
        path = tmp_path / "bad.pt"
        path.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="Invalid checkpoint file"):
            victim.load(path)
    assert tree_equal(_observable(victim), before)


def test_randomly_corrupted_files_are_refused_or_load_unchanged(tmp_path, victim):
    """64 random bytes flipped at 16 random places: refused, unless they only hit padding, in which
    case what loads is exactly the saved state."""
    data = _good_file(tmp_path)
    reference, _ = ckpt.load_checkpoint(tmp_path / "good.pt")
    before = _observable(victim)
    g = torch.Generator().manual_seed(0)
    refused = 0
    for trial in range(16):
        bad = bytearray(data)
        start = int(torch.randint(0, len(bad) - 64, (1,), generator=g))
        bad[start:start + 64] = bytes((b ^ 0xA5) for b in bad[start:start + 64])
        path = tmp_path / f"bad{trial}.pt"
        path.write_bytes(bytes(bad))
        try:
            sd, _ = ckpt.load_checkpoint(path)
        except ValueError as e:
            assert "Invalid checkpoint file" in str(e)
            refused += 1
            continue
        assert tree_equal(sd, reference), f"corruption at {start} loaded silently as different content"
    assert refused >= 12
    assert tree_equal(_observable(victim), before)


@pytest.mark.parametrize("content", ["text", "list", "model_state", "plain_optimizer_file"])
def test_non_checkpoint_files_are_refused(tmp_path, victim, content):
    path = tmp_path / "x.pt"
    if content == "text":
        path.write_text("hello, I am not a checkpoint\n")
    elif content == "list":
        torch.save([1, 2, 3], path)
    elif content == "model_state":
        torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    else:
        torch.save({"weights": torch.ones(3)}, path)
    before = _observable(victim)
    with pytest.raises(ValueError, match="Invalid checkpoint file"):
        victim.load(path)
    assert tree_equal(_observable(victim), before)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create a file when unpickled


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the raw pickle is the attacker's, protocol 4
@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle", "inside_state"])
def test_malicious_pickle_is_refused_without_running_code(tmp_path, victim, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if container == "torch_zip":
        torch.save({"format": ckpt.FILE_FORMAT, "version": 1, "optimizer": _Evil(str(marker))}, path)
    elif container == "raw_pickle":
        with open(path, "wb") as f:
            pickle.dump({"format": ckpt.FILE_FORMAT, "x": _Evil(str(marker))}, f)
    else:
        _, good = _trained()
        sd = good.state_dict()
        sd["accumulation"]["stats"]["last_loss"] = _Evil(str(marker))
        torch.save({"format": ckpt.FILE_FORMAT, "version": 1, "optimizer": sd, "extra": None}, path)
    before = _observable(victim)
    with pytest.raises(ValueError, match="Invalid checkpoint file"):
        victim.load(path)
    assert not marker.exists(), "unpickling ran code"
    assert tree_equal(_observable(victim), before)


BROKEN = {
    "sum shape": (lambda acc: acc["sums"].__setitem__(0, torch.zeros(7, 7, dtype=torch.float64)), "accumulation sum 0"),
    "sums length": (lambda acc: acc["sums"].pop(), "accumulation sums"),
    "window count": (lambda acc: acc["window"].__setitem__("count", -1), "window"),
    "window k": (lambda acc: acc["window"].__setitem__("k", "3"), "window"),
    "stats": (lambda acc: acc["stats"].__setitem__("updates", "many"), "stats"),
    "signature": (lambda acc: acc.pop("signature"), "signature"),
    "scaler": (lambda acc: acc.__setitem__("scaler", {"scale": 1.0}), "scaler"),
}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_malformed_accumulation_entry_is_refused_before_any_change(victim, what):
    """Validation is complete before the first change: a late-detected defect changes nothing."""
    _, good = _trained()
    sd = copy.deepcopy(good.state_dict())
    sd["state"][0]["exp_avg"].fill_(123.0)  # would be visible if the inner optimizer were loaded first
    breaker, message = BROKEN[what]
    breaker(sd["accumulation"])
    before = _observable(victim)
    with pytest.raises(ValueError, match=message):
        victim.load_state_dict(sd)
    assert tree_equal(_observable(victim), before)


def test_missing_file_raises_file_not_found(tmp_path, victim):
    with pytest.raises(FileNotFoundError):
        victim.load(tmp_path / "nope.pt")


def test_plain_torch_saved_state_dict_file_is_accepted(tmp_path):
    _, opt = _trained()
    torch.save(opt.state_dict(), tmp_path / "sd.pt")
    _, other = _fresh()
    other.load(tmp_path / "sd.pt")
    assert tree_equal(other.state_dict()["accumulation"]["sums"], opt.state_dict()["accumulation"]["sums"])
    other.discard()  # the loaded window stays pending on purpose


def test_seed_names_are_aliases(tmp_path):
    _, opt = _trained()
    opt.save_accumulation_state(tmp_path / "a.pt")
    _, other = _fresh()
    other.load_accumulation_state(tmp_path / "a.pt")
    assert other.pending == opt.pending == 1 and other.num_updates == 1
    other.discard()  # the loaded window stays pending on purpose


# -------------------------------------------------------------- crash during save
KILL_TRIALS = 12


def _child_save(path: str, started, stop_after: int) -> None:
    """Build a large optimizer state and save it, blocking for ever after ``stop_after`` bytes (or at fsync)."""
    torch.manual_seed(1)
    model = torch.nn.Linear(512, 512).double()
    opt = AccumulatingOptimizer(torch.optim.Adam(model.parameters()), 2, mode="buffered")
    for _ in range(3):  # Adam moments (2 x 2 MB) and a pending window (2 MB): a ~6 MB file
        model(torch.randn(8, 512, dtype=torch.float64)).sum().backward()
        opt.step()
    real_open = ckpt._open_temp

    class Blocking:
        def __init__(self, f) -> None:
            self.f, self.n = f, 0

        def write(self, b) -> int:
            if stop_after >= 0 and self.n + len(b) > stop_after:
                self.f.write(bytes(b)[: max(stop_after - self.n, 0)])
                self.f.flush()
                started.set()
                signal.pause()  # killed here
            self.n += len(b)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def blocking_open(folder, name):
        f, tmp = real_open(folder, name)
        return Blocking(f), tmp

    real_fsync = os.fsync

    def blocking_fsync(fd):
        real_fsync(fd)
        if stop_after < 0:
            started.set()
            signal.pause()

    ckpt._open_temp = blocking_open
    os.fsync = blocking_fsync
    opt.save(path)


def test_sigkill_during_save_leaves_previous_checkpoint_intact(tmp_path):
    """A child process is SIGKILLed inside save() at 12 points (11 byte offsets of the write, and after
    fsync before the rename): the previous file is byte-identical and loads, every time."""
    path = tmp_path / "ck.pt"
    _, opt = _trained()
    opt.save(path)
    original = path.read_bytes()
    expected = copy.deepcopy(opt.state_dict())
    ctx = multiprocessing.get_context("fork")
    offsets = [0, 1, 100, 1000, 10_000, 100_000, 500_000, 1_000_000, 2_000_000, 3_000_000, 4_000_000, -1]
    assert len(offsets) == KILL_TRIALS
    intact = 0
    for stop_after in offsets:
        started = ctx.Event()
        child = ctx.Process(target=_child_save, args=(str(path), started, stop_after))
        child.start()
        assert started.wait(timeout=20), f"the child never reached the kill point ({child.exitcode})"
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        assert path.read_bytes() == original
        _, fresh = _fresh()
        fresh.load(path)
        assert tree_equal(fresh.state_dict()["accumulation"], expected["accumulation"])
        assert tree_equal(fresh.state_dict()["state"], expected["state"])
        intact += 1
        for stray in tmp_path.glob(".ck.pt.*.accumopt-tmp"):
            stray.unlink()  # the killed save's partial temporary file
    assert intact == KILL_TRIALS


def test_failed_save_removes_its_temporary_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    _, opt = _trained()
    opt.save(path)
    original = path.read_bytes()

    def failing_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        opt.save(path)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def test_owned_scaler_resume_then_flush_equals_uninterrupted():
    """GradScaler.load_state_dict leaves the scale tensor to be created lazily by scale(); a flush right
    after a mid-window resume (no backward yet) must still unscale, like the uninterrupted run."""
    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 4,
                                    scaler=torch.amp.GradScaler("cpu", init_scale=2.0**6))
        return model, opt

    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    model, opt = build()
    for i in range(2):
        opt.backward(model(x[5 * i:5 * i + 5]).pow(2).mean())
        opt.step()
        opt.zero_grad()
    sd, msd = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    model2, opt2 = build()
    model2.load_state_dict(msd)
    opt2.load_state_dict(sd)
    assert opt.flush() and opt2.flush()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt.optimizer.state_dict()["state"].keys() == opt2.optimizer.state_dict()["state"].keys()


def test_plain_state_dict_of_another_model_is_refused():
    """A plain torch optimizer state dict whose state tensors do not fit the parameters is refused at
    load (not at the first step), and the optimizer is left unchanged."""
    torch.manual_seed(0)
    small, big = torch.nn.Linear(5, 7), torch.nn.Linear(5, 8)
    donor = torch.optim.Adam(small.parameters())
    small(torch.randn(2, 5)).sum().backward()
    donor.step()
    opt = AccumulatingOptimizer(torch.optim.Adam(big.parameters()), 2)
    before = copy.deepcopy(opt.optimizer.state_dict())
    with pytest.raises(ValueError, match=r"'exp_avg' of parameter .* has shape \(7, 5\), which does not fit"):
        opt.load_state_dict(donor.state_dict())
    assert opt.optimizer.state_dict() == before


def test_extra_with_a_set_loads_in_another_process(tmp_path):
    """A set's iteration order depends on the hash seed: the file's checksum must not."""
    import subprocess
    import sys

    _, opt = _trained()
    path = tmp_path / "ckpt.pt"
    tags = {f"tag{i}" for i in range(8)}
    opt.save(path, extra={"tags": tags})
    _, other = _fresh()
    assert other.load(path)["tags"] == tags
    other.discard()  # the loaded window stays pending on purpose
    code = ("import torch, accumopt.checkpoint as c; "
            f"sd, extra = c.load_checkpoint({str(path)!r}); assert extra['tags'] == {tags!r}")
    for seed in ("1", "2", "3"):
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_state_without_noise_estimate_loads_into_a_wrapper_that_estimates():
    """The noise estimator is not part of the signature: a state saved without one resumes the window."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 3)
    torch.nn.functional.mse_loss(model(torch.randn(4, 3, dtype=torch.float64)),
                                 torch.zeros(4, 1, dtype=torch.float64)).backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["accumulation"]["noise"] is None
    other = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 3, noise_scale=True)
    other.load_state_dict(sd)
    assert other.pending == 1 and tree_equal(other.state_dict()["accumulation"]["sums"], sd["accumulation"]["sums"])


# ------------------------------------------------------------- saving at the edges
def test_save_creates_missing_parent_folders(tmp_path):
    _, opt = _trained()
    path = tmp_path / "run" / "nested" / "ck.pt"
    opt.save(path)
    _, other = _fresh()
    other.load(path)
    assert tree_equal(other.state_dict()["accumulation"]["sums"], opt.state_dict()["accumulation"]["sums"])


def test_save_under_a_file_names_the_users_folder(tmp_path):
    _, opt = _trained()
    (tmp_path / "blocker").write_text("not a folder")
    with pytest.raises(OSError) as info:
        opt.save(tmp_path / "blocker" / "ck.pt")
    assert "blocker" in str(info.value) and "accumopt-tmp" not in str(info.value)


def _weighted_run(mode: str, cut: int | None, data, weights, k: int = 3):
    """Micro-batches with ``opt.backward(loss, weight=w)``; at ``cut`` the state is taken between backward()
    and step() and resumed in a fresh wrapper, which then calls that step()."""
    model, opt = build(dict(dtype=torch.float64, mode=mode, scaler=False, k=k, optim="adamw"))
    for i, ((x, y), w) in enumerate(zip(data, weights)):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.backward(loss, weight=w)
        if i == cut:
            sd = copy.deepcopy(opt.state_dict())
            grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
            model_sd = copy.deepcopy(model.state_dict())
            model, opt = build(dict(dtype=torch.float64, mode=mode, scaler=False, k=k, optim="adamw"))
            model.load_state_dict(model_sd)
            opt.load_state_dict(sd)
            for p, g in zip(model.parameters(), grads):
                assert tree_equal(p.grad, g)  # the pending micro-batch's gradient is part of the state
        opt.step(loss=loss.detach())
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("cut", [0, 1, 4])
def test_state_between_backward_and_step_inplace_includes_the_micro_batch(cut):
    """In-place sums: the state holds .grad (the pending micro-batch included) and the weight given to
    backward(); resuming and calling that step() equals the uninterrupted run bitwise."""
    data = make_data(7, torch.float64)
    weights = [5.0, 2.0, 3.0, 7.0, 5.0, 1.0, 4.0]
    ref, ref_opt = _weighted_run("inplace", None, data, weights)
    got, got_opt = _weighted_run("inplace", cut, data, weights)
    for p, q in zip(got.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert tree_equal(got_opt.stats()["effective_batch"], ref_opt.stats()["effective_batch"])
    ref_opt.discard()  # 7 micro-batches, K=3: the last window stays pending on purpose
    got_opt.discard()


def test_state_between_backward_and_step_buffered_is_refused_and_loses_nothing():
    """Buffered: the micro-batch's gradient is outside the buffers; state_dict() raises, and the run goes on
    exactly as if it had not been called."""
    data = make_data(7, torch.float64)
    weights = [5.0, 2.0, 3.0, 7.0, 5.0, 1.0, 4.0]
    ref, ref_opt = _weighted_run("buffered", None, data, weights)
    ref_opt.discard()  # 7 micro-batches, K=3: the last window stays pending on purpose
    model, opt = build(dict(dtype=torch.float64, mode="buffered", scaler=False, k=3, optim="adamw"))
    for i, ((x, y), w) in enumerate(zip(data, weights)):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.backward(loss, weight=w)
        with pytest.raises(RuntimeError, match="between backward\\(\\) and step\\(\\)"):
            opt.state_dict()
        opt.step(loss=loss.detach())
        opt.state_dict()  # after step(): fine
        opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("last_applied", [True, False])
def test_stepped_is_restored_by_a_load(last_applied):
    model, opt = build(dict(dtype=torch.float64, mode="inplace", scaler=False, k=2, optim="sgd"))
    data = make_data(4 if last_applied else 3, torch.float64)
    for x, y in data:
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert opt.stepped is last_applied
    sd = copy.deepcopy(opt.state_dict())
    other_model, other = build(dict(dtype=torch.float64, mode="inplace", scaler=False, k=2, optim="sgd"))
    for x, y in make_data(1 if last_applied else 2, torch.float64, seed=3):  # the other flag before the load
        torch.nn.functional.mse_loss(other_model(x), y).backward()
        other.step()
    assert other.stepped is not last_applied
    other.load_state_dict(sd)
    assert other.stepped is last_applied
    other.discard()  # the loaded window stays pending on purpose (last_applied=False)

"""Host-device syncs per micro-step and per update, counted on fake CUDA tensors (runs on CPU).

The wrapper is driven on ``FakeTensorMode`` tensors whose device is ``"cuda"``: shapes,
dtypes and devices are tracked but no kernel runs, so the test needs no GPU. A
``TorchDispatchMode`` (:class:`SyncRecorder`) sits between the code under test and the fake
mode and records every operation that forces the host to wait for the device:

* ``aten._local_scalar_dense`` on a CUDA tensor (``.item()``, ``bool(t)``, ``float(t)``,
  ``int(t)``, ``if t:``);
* a device-to-host copy (``aten._to_copy`` / ``aten.copy_`` from CUDA to CPU: ``.cpu()``,
  ``.to("cpu")``, ``.tolist()``, ``.numpy()``);
* a *blocking* host-to-device copy (``non_blocking=False`` from CPU to CUDA), whatever its
  size: CUDA's copy kernel follows a blocking copy with a stream synchronisation
  (``cudaStreamSynchronize``), so the host waits for all work queued before it, exactly
  as for a read. (0-dim CPU tensors used as operands of CUDA ops are not copies: they are
  passed to the kernel as arguments, and do not appear here.)
* operations whose output shape or value depends on the data (``aten.nonzero``,
  ``masked_select``, ``unique``, ...: torch's ``dynamic_output_shape`` and
  ``data_dependent_output`` tags), which read a count back to the host.

Fake tensors hold no values, so the recorder also answers host reads: a read of a CUDA
tensor (counted) and of a CPU tensor filled by a device-to-host copy returns 0 (no
non-finite flag raised: the update is applied, the path a healthy run takes); any other
CPU tensor reads as 1 (the optimizers' CPU ``step`` counters, for instance).

Autograd on fake CUDA tensors needs a CUDA device guard, which a CPU-only torch build does
not have (the engine aborts the process in ``InputMetadata``), and the engine asks the
accelerator hooks for the current stream (``at::getAccelerator``). The lightest fix found
on torch 2.13.0+cpu: a 20-line C++ shim (:data:`_SHIM_SOURCE`), compiled once with the
system ``g++`` against torch's own headers (about 2 s; cached in the temporary directory),
that registers torch's ``c10::impl::FakeGuardImpl<CUDA>`` as the CUDA device guard and a
``CUDAHooks`` that reports CUDA as built. It must be loaded before ``import torch`` (the
hooks are created once, on first use, and the autograd engine sizes its device threads on
the first backward), so the configurations run in one child process, started from this
file (``python tests/test_sync_budget.py <shim> <out.json>``), that loads the shim, then
imports torch. ``torch.cuda.is_available()`` stays False there; an owned ``GradScaler`` is
built under a patched ``torch.cuda.is_available``. ``FakeTensor.tolist`` is made to copy
to the host once, as CUDA does (a fake tensor would be read element by element). Where
no compiler or no torch headers are found, the test skips with the reason; a CUDA build
of torch runs the child without the shim (its own guard), and skips if autograd on fake
tensors fails there. Only accumopt's public API is used.

Bars: no sync on any micro-step that does not update; at most one per update.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

K = 4
WINDOWS = 3

# Each name is a configuration built in _configurations(). The combinations put together the update's host
# readers (the non-finite/overflow flag of an owned scaler or a skip/drop/raise policy, ReduceLROnPlateau's
# metric, the log_every record, AdaptiveK's estimate): all of them share the update's single read.
CONFIGS: list[str] = [
    "adamw-foreach",
    "adamw-single-tensor",
    "adamw-fused",
    "adamw-capturable",
    "sgd-momentum",
    "bf16-params-fp32-buffers",
    "bf16-params-inplace",
    "token-weights-backward",
    "buffered",
    "buffered-token-weights-step",
    "max-grad-norm",
    "grad-scaler",
    "grad-scaler-buffered-token-weights",
    "nonfinite-skip",
    "nonfinite-raise",
    "nonfinite-drop",
    "noise-scale",
    "scheduler-lambda",
    "scheduler-plateau",
    "log-every",
    "adaptive-k",
    "skip+max-grad-norm+scaler",
    "skip+noise-scale",
    "skip+plateau",
    "skip+log-every",
    "adaptive-k+skip",
    "scaler+plateau",
    "scaler+log-every",
    "drop+plateau",
    "plateau+log-every",
    "adaptive-k+plateau",
    "adaptive-k+log-every",
    "all-readers",
]

_SHIM_SOURCE = r"""
// Fake CUDA for autograd on FakeTensorMode tensors in a CPU-only torch build (test use only).
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

namespace {
struct FakeCUDAHooks final : at::CUDAHooksInterface {
  explicit FakeCUDAHooks(at::CUDAHooksArgs) {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  bool isPinnedPtr(const void*) const override { return false; }
};
c10::impl::FakeGuardImpl<c10::DeviceType::CUDA> fake_cuda_guard;
struct Register {
  Register() { c10::impl::registerDeviceGuard(c10::DeviceType::CUDA, &fake_cuda_guard); }
} register_fake_cuda_guard;
}  // namespace

namespace at {
C10_REGISTER_CLASS(CUDAHooksRegistry, CUDAHooks, FakeCUDAHooks)
}  // namespace at
"""


# ----------------------------------------------------------------------------- the shim
def _torch_location() -> tuple[str, str, bool]:
    """(torch's package directory, its version, whether it was built with CUDA)."""
    torch = sys.modules.get("torch")  # tests/conftest.py has imported it; this module must not (see _child)
    if torch is None:
        code = "import torch, os; print(os.path.dirname(torch.__file__), torch.__version__, torch.version.cuda, sep='\\n')"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout.split("\n")
        return out[0], out[1], out[2] != "None"
    return os.path.dirname(torch.__file__), torch.__version__, torch.version.cuda is not None


def _build_shim() -> str | None:
    """Compile the fake-CUDA shim (cached by torch version and source); None for a CUDA build (which has its
    own guard); ``pytest.skip`` where it cannot be built."""
    torch_dir, version, has_cuda = _torch_location()
    if has_cuda:
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no C++ compiler (g++ or $CXX) to build the fake CUDA device guard that autograd needs")
    include, lib = os.path.join(torch_dir, "include"), os.path.join(torch_dir, "lib")
    if not os.path.exists(os.path.join(include, "c10", "core", "impl", "FakeGuardImpl.h")):
        pytest.skip(f"torch {version} ships no C++ headers (needed for the fake CUDA device guard)")
    key = hashlib.sha256(f"{version}\n{torch_dir}\n{_SHIM_SOURCE}".encode()).hexdigest()[:16]
    cache = os.path.join(tempfile.gettempdir(), "accumopt-fake-cuda")
    os.makedirs(cache, exist_ok=True)
    target = os.path.join(cache, f"fake_cuda_{key}.so")
    if os.path.exists(target):
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        source = os.path.join(tmp, "fake_cuda.cpp")
        with open(source, "w") as f:
            f.write(_SHIM_SOURCE)
        built = os.path.join(tmp, "fake_cuda.so")
        cmd = [compiler, "-std=c++20", "-O0", "-shared", "-fPIC", "-w", f"-I{include}", source, f"-L{lib}",
               f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu", "-o", built]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"the fake CUDA device guard did not compile ({' '.join(cmd[:2])}): "
                        f"{result.stderr.strip()[-500:]}")
        os.replace(built, target)  # atomic: a concurrent run sees the old state or the whole file
    return target


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    shim = _build_shim()
    out = tmp_path_factory.mktemp("sync") / "counts.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), shim or "-", str(out)], capture_output=True,
                          text=True, env=env, cwd=root, timeout=300)
    if proc.returncode != 0 or not out.exists():
        if shim is None:  # a CUDA build: its own guard may refuse fake tensors without a device
            pytest.skip(f"autograd on fake CUDA tensors failed with this CUDA build of torch (the shim is for "
                        f"CPU-only builds; tests/gpu measures syncs on a device): {proc.stderr.strip()[-300:]}")
        pytest.fail(f"the fake-CUDA child process failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- the tests
def _kinds(events: list[str]) -> list[str]:
    return [e.split(" @ ")[0] for e in events]


def test_detector_flags_item_bool_and_cpu(measured):
    controls = {name: _kinds(events) for name, events in measured["controls"].items()}
    assert controls["item"] == ["item"]
    assert controls["bool_any"] == ["item"]
    assert controls["float"] == ["item"]
    assert controls["cpu"] == ["d2h"]
    assert controls["tolist"] == ["d2h"]
    assert controls["blocking_h2d"] == ["h2d"]
    assert controls["nonzero"] == ["data-dependent:aten.nonzero.default"]


def test_detector_ignores_device_only_work(measured):
    controls = {name: _kinds(events) for name, events in measured["controls"].items()}
    assert controls["device_ops"] == []  # arithmetic, reductions, foreach ops, masked fills, .to(cuda) of a cuda tensor
    assert controls["non_blocking_h2d"] == []
    assert controls["cpu_read"] == []  # reading a CPU tensor is free
    assert controls["plain_backward"] == []  # forward + backward of the model alone


def test_every_configuration_ran(measured):
    assert sorted(measured["configs"]) == sorted(CONFIGS)
    errors = {n: c["error"] for n, c in measured["configs"].items() if c.get("error")}
    assert not errors, errors


@pytest.mark.parametrize("name", CONFIGS)
def test_no_sync_on_micro_steps_that_do_not_update(measured, name):
    c = measured["configs"][name]
    assert not c.get("error"), c.get("error")
    assert len(c["micro"]) == WINDOWS * (K - 1) and len(c["update"]) == WINDOWS  # every update happened
    syncing = [events for events in c["micro"] if events]
    assert not syncing, f"{name}: syncs on non-updating micro-steps: {syncing}"


@pytest.mark.parametrize("name", CONFIGS)
def test_at_most_one_sync_per_update(measured, name):
    c = measured["configs"][name]
    assert not c.get("error"), c.get("error")
    assert len(c["update"]) == WINDOWS
    over = [events for events in c["update"] if len(events) > 1]
    assert not over, f"{name}: more than one sync per update: {over}"


# ============================================================================ child process
# Everything below runs in the child, after the shim is loaded; torch is imported only there.

def _recorder_class():
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    data_dependent = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)

    def on_device(t) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type != "cpu"

    class SyncRecorder(TorchDispatchMode):
        """Records sync-forcing ops in ``events`` and answers host reads of fake tensors."""

        def __init__(self) -> None:
            super().__init__()
            self.events: list[str] = []  # "kind @ file:line" (the innermost accumopt frame, else the caller)
            self._from_device: set = set()  # storages of CPU tensors filled from the device

        _own = ("_record", "_copy", "__torch_dispatch__", "__torch_function__")

        def _record(self, kind: str) -> None:
            frame, where = sys._getframe(1), None
            while frame is not None:
                name = frame.f_code.co_filename.replace(os.sep, "/")
                if "/accumopt/" in name:
                    where = f"accumopt/{name.rsplit('/accumopt/', 1)[1]}:{frame.f_lineno}"
                    break
                if where is None and "/torch/" not in name and frame.f_code.co_name not in self._own:
                    where = f"{os.path.basename(name)}:{frame.f_lineno}"
                frame = frame.f_back
            self.events.append(f"{kind} @ {where}")

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            packet = func.overloadpacket
            if packet is aten._local_scalar_dense:
                t = args[0]
                if on_device(t):
                    self._record("item")
                zero = on_device(t) or StorageWeakRef(t.untyped_storage()) in self._from_device
                v = 0 if zero else 1
                return bool(v) if t.dtype == torch.bool else float(v) if t.is_floating_point() else v
            if any(tag in func.tags for tag in data_dependent):
                if any(on_device(a) for a in args):
                    self._record(f"data-dependent:{func}")
                if packet is aten.nonzero:  # fake tensors cannot size it: answer "no element"
                    return torch.empty((0, args[0].dim()), dtype=torch.long, device=args[0].device)
            out = func(*args, **kwargs)
            if packet is aten._to_copy:
                self._copy(args[0], out, kwargs.get("non_blocking", False))
            elif packet is aten.copy_:
                self._copy(args[1], args[0], args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            return out

        def _copy(self, src, dst, non_blocking) -> None:
            if not (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)):
                return
            if on_device(src) and not on_device(dst):
                self._record("d2h")  # blocking or not, the host data is only valid after a sync
                self._from_device.add(StorageWeakRef(dst.untyped_storage()))
            elif not on_device(src) and on_device(dst) and not non_blocking:
                self._record("h2d")

        def take(self) -> list[str]:
            out, self.events = self.events, []
            return out

    return SyncRecorder


def _controls(recorder) -> dict:
    import torch
    from torch import nn

    def run(fn) -> list[str]:
        recorder.take()
        fn()
        return recorder.take()

    dev = "cuda"
    t = torch.randn(8, device=dev)
    flag = torch.zeros((), device=dev)
    model = nn.Linear(4, 2, device=dev)
    x = torch.randn(3, 4, device=dev)

    def device_ops():
        y = (t * 2 + 1).sum() / t.numel()
        torch._foreach_mul_([t, t.clone()], 0.5)
        t.clone().masked_fill_(flag > 0, 0.0)
        torch.where(flag > 0, y, torch.zeros_like(y))
        t.to("cuda")
        torch.full((), 3.0, device=dev) * torch.tensor(2.0)  # a CPU scalar operand, not a copy

    def plain_backward():
        model(x).pow(2).mean().backward()

    return {
        "item": run(lambda: t.sum().item()),
        "bool_any": run(lambda: bool(t.isnan().any())),
        "float": run(lambda: float(flag)),
        "cpu": run(lambda: t.cpu()),
        "tolist": run(lambda: t.tolist()),
        "blocking_h2d": run(lambda: torch.ones(4).to(dev)),
        "nonzero": run(lambda: t.nonzero()),
        "device_ops": run(device_ops),
        "non_blocking_h2d": run(lambda: torch.ones(4).to(dev, non_blocking=True)),
        "cpu_read": run(lambda: torch.ones(()).item()),
        "plain_backward": run(plain_backward),
    }


def _configurations():
    """name -> (build(model) -> (optimizer, how), dtype); ``how`` is the micro-step's call pattern."""
    import logging
    from unittest import mock

    import torch

    import accumopt

    def adamw(model, **kw):
        kw.setdefault("foreach", True)  # torch's default on CUDA (it cannot tell for fake tensors)
        return torch.optim.AdamW(model.parameters(), lr=1e-3, **kw)

    def scaler():
        with mock.patch.object(torch.cuda, "is_available", return_value=True):
            return torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)

    def wrap(inner, k=K, **kw):
        return accumopt.AccumulatingOptimizer(inner, k, **kw)

    def plateau(inner):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(inner, patience=0)

    def logging_on():
        logging.getLogger("accumopt").setLevel(logging.INFO)

    def adaptive_k():  # decides at every boundary after the first; K stays within the measured windows' K
        return accumopt.AdaptiveK(k_min=K, k_max=K, warmup=1, patience=1)

    def c(build, how="plain", dtype=None, setup=None):
        return {"build": build, "how": how, "dtype": dtype, "setup": setup}

    return {
        "adamw-foreach": c(lambda m: wrap(adamw(m))),
        "adamw-single-tensor": c(lambda m: wrap(adamw(m, foreach=False))),
        "adamw-fused": c(lambda m: wrap(adamw(m, foreach=None, fused=True))),
        "adamw-capturable": c(lambda m: wrap(adamw(m, capturable=True))),
        "sgd-momentum": c(lambda m: wrap(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, foreach=True))),
        "bf16-params-fp32-buffers": c(lambda m: wrap(adamw(m), mode="buffered"), dtype=torch.bfloat16),
        "bf16-params-inplace": c(lambda m: wrap(adamw(m)), dtype=torch.bfloat16),
        "token-weights-backward": c(lambda m: wrap(adamw(m)), how="backward-weight"),
        "buffered": c(lambda m: wrap(adamw(m), mode="buffered")),
        "buffered-token-weights-step": c(lambda m: wrap(adamw(m), mode="buffered"), how="step-weight"),
        "max-grad-norm": c(lambda m: wrap(adamw(m), max_grad_norm=1.0)),
        "grad-scaler": c(lambda m: wrap(adamw(m), scaler=scaler()), how="backward"),
        "grad-scaler-buffered-token-weights": c(lambda m: wrap(adamw(m), mode="buffered", scaler=scaler()),
                                                how="backward-weight"),
        "nonfinite-skip": c(lambda m: wrap(adamw(m), nonfinite="skip")),
        "nonfinite-raise": c(lambda m: wrap(adamw(m), nonfinite="raise")),
        "nonfinite-drop": c(lambda m: wrap(adamw(m), mode="buffered", nonfinite="drop")),
        "noise-scale": c(lambda m: wrap(adamw(m), noise_scale=True)),
        "scheduler-lambda": c(lambda m: (lambda i: wrap(i, scheduler=torch.optim.lr_scheduler.LambdaLR(
            i, lambda n: 0.9 ** n)))(adamw(m))),
        "scheduler-plateau": c(lambda m: (lambda i: wrap(i, scheduler=plateau(i)))(adamw(m))),
        "log-every": c(lambda m: wrap(adamw(m), log_every=1), setup=logging_on),
        "adaptive-k": c(lambda m: wrap(adamw(m), adaptive_k(), noise_scale=True)),
        "skip+max-grad-norm+scaler": c(lambda m: wrap(adamw(m), nonfinite="skip", max_grad_norm=1.0,
                                                      scaler=scaler()), how="backward"),
        "skip+noise-scale": c(lambda m: wrap(adamw(m), nonfinite="skip", noise_scale=True)),
        "skip+plateau": c(lambda m: (lambda i: wrap(i, nonfinite="skip", scheduler=plateau(i)))(adamw(m))),
        "skip+log-every": c(lambda m: wrap(adamw(m), nonfinite="skip", log_every=1), setup=logging_on),
        "adaptive-k+skip": c(lambda m: wrap(adamw(m), adaptive_k(), nonfinite="skip", noise_scale=True)),
        "scaler+plateau": c(lambda m: (lambda i: wrap(i, scaler=scaler(), scheduler=plateau(i)))(adamw(m)),
                            how="backward"),
        "scaler+log-every": c(lambda m: wrap(adamw(m), scaler=scaler(), log_every=1), how="backward",
                              setup=logging_on),
        "drop+plateau": c(lambda m: (lambda i: wrap(i, mode="buffered", nonfinite="drop", scheduler=plateau(i)))(
            adamw(m))),
        "plateau+log-every": c(lambda m: (lambda i: wrap(i, scheduler=plateau(i), log_every=1))(adamw(m)),
                               setup=logging_on),
        "adaptive-k+plateau": c(lambda m: (lambda i: wrap(i, adaptive_k(), noise_scale=True, scheduler=plateau(i)))(
            adamw(m))),
        "adaptive-k+log-every": c(lambda m: wrap(adamw(m), adaptive_k(), noise_scale=True, log_every=1),
                                  setup=logging_on),
        "all-readers": c(lambda m: (lambda i: wrap(i, adaptive_k(), noise_scale=True, nonfinite="skip",
                                                   scheduler=plateau(i), log_every=1))(adamw(m)), setup=logging_on),
    }


def _run_configuration(recorder, spec) -> dict:
    import logging

    import torch
    from torch import nn

    logging.getLogger("accumopt").setLevel(logging.WARNING)
    if spec["setup"] is not None:
        spec["setup"]()
    torch.manual_seed(0)
    kw = {"device": "cuda", "dtype": spec["dtype"]}  # built in place: Module.to cannot swap fake parameters
    model = nn.Sequential(nn.Linear(8, 16, **kw), nn.Tanh(), nn.Linear(16, 5, **kw))
    opt = spec["build"](model)
    x = torch.randn(6, 8, device="cuda", dtype=spec["dtype"] or torch.float32)
    y = torch.randint(0, 5, (6,), device="cuda")
    how = spec["how"]

    def micro_step():
        logits = model(x).float()
        loss = nn.functional.cross_entropy(logits, y, ignore_index=-100)
        weight = (y != -100).sum()  # the micro-batch's token count: a 0-dim device tensor
        if how == "plain":
            loss.backward()
            opt.step(loss=loss)
        elif how == "backward":  # the owned scaler's scale applied by opt.backward
            opt.backward(loss)
            opt.step(loss=loss)
        elif how == "backward-weight":
            opt.backward(loss, weight=weight)
            opt.step(loss=loss)
        else:  # "step-weight": buffered mode, weight after backward
            loss.backward()
            opt.step(weight=weight, loss=loss)
        opt.zero_grad()

    micro: list[list[str]] = []
    update: list[list[str]] = []
    recorder.take()  # construction is not a micro-step
    for _ in range(WINDOWS * K):
        micro_step()
        (update if opt.stepped else micro).append(recorder.take())
    return {"micro": micro, "update": update, "updates": opt.num_updates}


def _child(shim: str, out_path: str) -> None:
    import ctypes

    if shim != "-":
        ctypes.CDLL(shim, mode=ctypes.RTLD_GLOBAL)  # before torch: the fake CUDA guard and hooks
    import traceback

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.set_num_threads(1)
    from torch._subclasses.fake_tensor import FakeTensor

    element_wise = FakeTensor.tolist

    def tolist(self):  # as CUDA does it: one copy to the host, then host reads (not one read per element)
        return self.cpu().tolist() if self.device.type != "cpu" else element_wise(self)

    FakeTensor.tolist = tolist
    SyncRecorder = _recorder_class()
    result: dict = {"configs": {}}
    with FakeTensorMode():
        recorder = SyncRecorder()
        with recorder:
            result["controls"] = _controls(recorder)
            for name, spec in _configurations().items():
                try:
                    result["configs"][name] = _run_configuration(recorder, spec)
                except Exception:
                    result["configs"][name] = {"error": traceback.format_exc(limit=8), "micro": [], "update": []}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])

"""State dicts and checkpoint files of :class:`~accumopt.AccumulatingOptimizer`.

``opt.state_dict()`` is the wrapped optimizer's state dict plus an
``"accumulation"`` entry holding everything a mid-window resume needs (pending
sums, window count and weight total, K-schedule position, owned GradScaler and
scheduler, statistics, noise-scale estimator) and a small ``"signature"`` of the
setup it was taken from. All of it is tensors, numbers, strings, lists and dicts,
so ``torch.load(..., weights_only=True)`` reads it.

``opt.load_state_dict(sd)`` validates everything first (signature: parameter
count, shapes, dtypes, optimizer class, mode, K, owned scaler and scheduler; then
the shape of every entry), copies what it keeps (the argument is never aliased
or mutated), and only then changes the optimizer. A refused state dict raises
``ValueError`` and leaves the optimizer exactly as it was.

:func:`save_checkpoint` writes atomically: a temporary file in the destination's
folder, flush, ``fsync``, ``os.replace``, ``fsync`` of the folder. A crash (even
SIGKILL) at any point before the rename leaves the previous file untouched (and
at most a stray ``.accumopt-*.tmp`` file next to it); after it, the new file is
complete. :func:`load_checkpoint` reads with ``weights_only=True`` and turns
every failure to read (truncated, corrupted, not a torch file, pickled code) into
a ``ValueError`` naming the file.
"""

from __future__ import annotations

import os
import pickle
import struct
import tempfile
import zlib
from collections.abc import Mapping
from typing import IO, Any

import torch
from torch import Tensor

__all__ = [
    "FILE_FORMAT",
    "load_checkpoint",
    "load_optimizer_state",
    "optimizer_state_dict",
    "save_checkpoint",
    "signature",
    "validate_state_dict",
]

FILE_FORMAT = "accumopt.checkpoint"
STATE_FORMAT = "accumopt.AccumulatingOptimizer"
STATE_VERSION = 2
_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


# --------------------------------------------------------------------- helpers
def _clone_tree(x: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor cloned (never aliases ``x``)."""
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, Mapping):
        return {k: _clone_tree(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clone_tree(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_clone_tree(v) for v in x)
    return x


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _params(wrapper: Any) -> list[Tensor]:
    return [p for g in wrapper.param_groups for p in g["params"]]


def _device(wrapper: Any) -> torch.device:
    devices = {p.device for p in _params(wrapper)}
    return next(iter(devices)) if len(devices) == 1 else torch.device("cpu")


def _k_spec(schedule: Any) -> dict[str, Any]:
    spec: Any = None
    if schedule.kind == "constant":
        spec = int(schedule.spec)
    elif schedule.kind in ("list", "mapping"):
        spec = [[int(a), int(b)] for a, b in schedule._points]
    elif schedule.kind == "object":
        spec = type(schedule.spec).__name__
    return {"kind": schedule.kind, "spec": spec, "by": schedule.schedule_by}


def signature(wrapper: Any) -> dict[str, Any]:
    """What a state dict must match to be loaded into ``wrapper`` (plain data)."""
    inner = wrapper.optimizer
    scheduler = wrapper.scheduler
    scaling = wrapper._window.lr_scaling
    return {
        "optimizer": f"{type(inner).__module__}.{type(inner).__qualname__}",
        "mode": wrapper._store.mode,
        "k": _k_spec(wrapper._window.schedule),
        "groups": [len(g["params"]) for g in wrapper.param_groups],
        "params": [[list(p.shape), _dtype_name(p.dtype)] for p in _params(wrapper)],
        "scaler": wrapper._precision.scaler is not None,
        "scheduler": None if scheduler is None else type(scheduler).__name__,
        "lr_scaling": None if scaling is None else scaling.rule,
    }


def _compare_signatures(saved: Any, ours: dict[str, Any]) -> None:
    if not isinstance(saved, dict):
        raise ValueError("Invalid state dict: the accumulation entry has no 'signature' (expected one from "
                         "AccumulatingOptimizer.state_dict())")
    params = saved.get("params")
    if not isinstance(params, list) or len(params) != len(ours["params"]):
        n = len(params) if isinstance(params, list) else params
        raise ValueError(f"Invalid state dict: saved from {n} parameters (expected {len(ours['params'])}); "
                         "it belongs to another model")
    if saved.get("groups") != ours["groups"]:
        raise ValueError(f"Invalid state dict: param group sizes {saved.get('groups')} (expected {ours['groups']})")
    for i, (a, b) in enumerate(zip(params, ours["params"])):
        if list(a) != b:
            raise ValueError(f"Invalid state dict: parameter {i} has shape {tuple(a[0])} and dtype {a[1]} in the "
                             f"state dict (expected shape {tuple(b[0])} and dtype {b[1]}); it belongs to another model")
    names = {"optimizer": "wrapped optimizer class", "mode": "mode", "k": "accumulation_steps",
             "scaler": "owned GradScaler (scaler=...)", "scheduler": "owned scheduler class (scheduler=...)",
             "lr_scaling": "lr_scaling"}
    for key, what in names.items():
        if saved.get(key) != ours[key]:
            raise ValueError(f"Invalid state dict: saved with {what} {saved.get(key)!r} (this optimizer has "
                             f"{ours[key]!r})")


def _check_number(where: str, value: Any, *, integer: bool = False, minimum: float | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else \
        (isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok or (minimum is not None and value < minimum):
        kind = "an int" if integer else "a number"
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"Invalid state dict: {where} is {value!r} (expected {kind}{bound})")


def _check_scalar(where: str, value: Any) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid state dict: {where} is a tensor of shape {tuple(value.shape)} (expected a scalar)")
    else:
        _check_number(where, value)


# ----------------------------------------------------------------- validation
def validate_state_dict(wrapper: Any, optimizer_sd: Any, acc: Any) -> None:
    """Raise ``ValueError`` if ``optimizer_sd``/``acc`` do not fit ``wrapper``; change nothing."""
    if not isinstance(optimizer_sd, Mapping):
        raise ValueError(f"Invalid state dict: a {type(optimizer_sd).__name__} (expected a dict)")
    groups = optimizer_sd.get("param_groups")
    state = optimizer_sd.get("state")
    if not isinstance(groups, list) or not isinstance(state, Mapping) or \
            not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups):
        raise ValueError("Invalid state dict: missing or malformed 'state' or 'param_groups' "
                         "(expected an optimizer state dict)")
    ours = wrapper.param_groups
    if len(groups) != len(ours) or any(len(a["params"]) != len(b["params"]) for a, b in zip(groups, ours)):
        raise ValueError(
            f"Invalid state dict: {len(groups)} param groups of sizes {[len(g['params']) for g in groups]} "
            f"(expected {len(ours)} of sizes {[len(g['params']) for g in ours]})"
        )
    ids = [i for g in groups for i in g["params"]]
    if len(set(map(repr, ids))) != len(ids):
        raise ValueError("Invalid state dict: a parameter id appears twice in 'param_groups'")
    for key, value in state.items():
        if not isinstance(value, Mapping):
            raise ValueError(f"Invalid state dict: state[{key!r}] is a {type(value).__name__} (expected a dict)")
    if acc is None:
        _check_state_shapes(wrapper, groups, state)
        return
    if not isinstance(acc, Mapping):
        raise ValueError(f"Invalid state dict: the accumulation entry is a {type(acc).__name__} (expected a dict)")
    for key in ("window", "sums", "stats"):
        if key not in acc:
            raise ValueError(f"Invalid state dict: accumulation entry lacks {key!r}")
    if "signature" in acc or acc.get("version", 1) >= STATE_VERSION:
        _compare_signatures(acc.get("signature"), signature(wrapper))
    _check_window(wrapper, acc["window"])
    _check_sums(wrapper, acc["sums"])
    wrapper._stats.check_state(acc["stats"])
    scaler_state = acc.get("scaler")
    if scaler_state is not None:
        if not isinstance(scaler_state, Mapping) or any(k not in scaler_state for k in _SCALER_KEYS):
            raise ValueError(f"Invalid state dict: the scaler entry lacks one of {_SCALER_KEYS}")
        for k in _SCALER_KEYS:
            _check_number(f"scaler[{k!r}]", scaler_state[k])
    sched = acc.get("scheduler")
    if sched is not None and not isinstance(sched, Mapping):
        raise ValueError(f"Invalid state dict: the scheduler entry is a {type(sched).__name__} (expected a dict)")
    prec = acc.get("precision")
    if prec is not None and (not isinstance(prec, Mapping) or
                             not (prec.get("dropped") is None or isinstance(prec.get("dropped"), Tensor))):
        raise ValueError("Invalid state dict: malformed 'precision' entry")
    if acc.get("noise") is not None and getattr(wrapper, "_noise", None) is not None:
        wrapper._noise.check_state(acc["noise"])
    pre = acc.get("pre_weight")
    if pre is not None:
        _check_scalar("pre_weight", pre)
    _check_state_shapes(wrapper, groups, state)


def _check_state_shapes(wrapper: Any, groups: list, state: Mapping) -> None:
    """Each per-parameter state tensor must fit its parameter (same shape, or one that broadcasts to it,
    as Adafactor's row and column factors do): a state dict of another model is refused here, not at
    the first step."""
    for gi, (theirs, ours) in enumerate(zip(groups, wrapper.param_groups)):
        for pi, (key, p) in enumerate(zip(theirs["params"], ours["params"])):
            for name, t in (state.get(key) or {}).items():
                if not isinstance(t, Tensor) or t.dim() == 0:
                    continue
                try:
                    fits = t.dim() == p.dim() and torch.broadcast_shapes(t.shape, p.shape) == p.shape
                except RuntimeError:
                    fits = False
                if not fits:
                    where = wrapper._names.get(id(p)) if getattr(wrapper, "_names", None) else None
                    label = repr(where) if where else f"param_groups[{gi}]['params'][{pi}]"
                    raise ValueError(
                        f"Invalid state dict: state {name!r} of parameter {label} has shape {tuple(t.shape)}, "
                        f"which does not fit the parameter's shape {tuple(p.shape)} (expected the state dict "
                        "of this model's optimizer)"
                    )


def _check_window(wrapper: Any, win: Any) -> None:
    if not isinstance(win, Mapping):
        raise ValueError(f"Invalid state dict: the window entry is a {type(win).__name__} (expected a dict)")
    for key, minimum in (("epoch", 0), ("closed", 0), ("count", 0), ("k", 1)):
        if key not in win:
            raise ValueError(f"Invalid state dict: window entry lacks {key!r}")
        _check_number(f"window[{key!r}]", win[key], integer=True, minimum=minimum)
    _check_scalar("window['total']", win.get("total"))
    scaling = win.get("lr_scaling")
    if scaling is not None:
        if not isinstance(scaling, Mapping) or any(k not in scaling for k in ("k_ref", "factor", "base", "applied")):
            raise ValueError("Invalid state dict: malformed window['lr_scaling'] entry")
        n = len(wrapper.param_groups)
        if len(scaling["base"]) != n or len(scaling["applied"]) != n:
            raise ValueError(f"Invalid state dict: window['lr_scaling'] has {len(scaling['base'])} groups (expected {n})")


def _check_sums(wrapper: Any, sums: Any) -> None:
    expected = wrapper._store.expected()
    if not isinstance(sums, list):
        raise ValueError(f"Invalid state dict: accumulation sums are a {type(sums).__name__} (expected a list)")
    if len(sums) != len(expected):
        raise ValueError(f"Invalid state dict: {len(sums)} accumulation sums (expected {len(expected)})")
    for i, (t, (shape, dtype)) in enumerate(zip(sums, expected)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"Invalid state dict: accumulation sum {i} is a {type(t).__name__} (expected a tensor)")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(
                f"Invalid state dict: accumulation sum {i} has shape {tuple(t.shape)} and dtype {t.dtype} "
                f"(expected {shape} and {dtype})"
            )


# ------------------------------------------------------------ build and load
def optimizer_state_dict(wrapper: Any) -> dict[str, Any]:
    """The body of :meth:`AccumulatingOptimizer.state_dict`."""
    for hook in wrapper._optimizer_state_dict_pre_hooks.values():
        hook(wrapper)
    wrapper._sync.consolidate(wrapper._store, wrapper._window)
    sd = wrapper.optimizer.state_dict()
    precision = wrapper._precision
    scaler = precision.scaler
    noise = getattr(wrapper, "_noise", None)
    pre = wrapper._pre_weight
    sd["accumulation"] = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "signature": signature(wrapper),
        "window": wrapper._window.state(),
        "sums": wrapper._store.state(),
        "stats": wrapper._stats.state(),
        "precision": {"dropped": None if precision._dropped is None else precision._dropped.detach().clone()},
        "noise": None if noise is None else noise.state(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "scheduler": wrapper.scheduler.state_dict() if wrapper.scheduler is not None else None,
        "stepped": bool(wrapper._stepped),
        "pre_weight": pre.detach().clone() if isinstance(pre, Tensor) else pre,
    }
    for hook in wrapper._optimizer_state_dict_post_hooks.values():
        result = hook(wrapper, sd)
        if result is not None:
            sd = result
    return sd


def _load_inner_keeping_identity(inner: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """``inner.load_state_dict(sd)``, keeping the ``param_groups`` list, its dicts and the ``state`` dict.

    torch's ``Optimizer.load_state_dict`` replaces them; the wrapper, LR schedulers
    built on it, ``lr_scaling`` and captured graphs hold the originals.
    """
    groups, state = inner.param_groups, inner.state
    inner.load_state_dict(sd)
    new_groups, new_state = inner.param_groups, inner.state
    if new_groups is not groups:
        for old, new in zip(groups, new_groups):
            for key, value in new.items():
                before = old.get(key)
                if isinstance(before, Tensor) and isinstance(value, Tensor) and before.shape == value.shape \
                        and key != "params":
                    before.copy_(value)  # a tensor LR stays the same tensor (captured/compiled steps hold it)
                else:
                    old[key] = value
            for key in [k for k in old if k not in new]:
                del old[key]
        inner.param_groups = groups
    if new_state is not state:
        state.clear()
        state.update(new_state)
        inner.state = state


def load_optimizer_state(wrapper: Any, state_dict: Mapping[str, Any]) -> None:
    """The body of :meth:`AccumulatingOptimizer.load_state_dict` (validate, copy, then apply)."""
    sd: Any = state_dict
    for hook in wrapper._optimizer_load_state_dict_pre_hooks.values():
        result = hook(wrapper, sd)
        if result is not None:
            sd = result
    if not isinstance(sd, Mapping):
        raise ValueError(f"Invalid state dict: a {type(sd).__name__} (expected a dict)")
    sd = dict(sd)
    acc = sd.pop("accumulation", None)
    validate_state_dict(wrapper, sd, acc)
    # Copies first (an allocation failure here changes nothing), then the changes.
    sd = _clone_tree(sd)
    acc = _clone_tree(dict(acc)) if acc is not None else None
    device = _device(wrapper)
    inner = wrapper.optimizer
    _load_inner_keeping_identity(inner, sd)
    wrapper.param_groups = inner.param_groups
    wrapper.state = inner.state
    precision = wrapper._precision
    wrapper._pre_weight = None
    if acc is None:  # a plain optimizer state dict: no window to resume
        wrapper.discard()
        return
    win = dict(acc["window"])
    if isinstance(win.get("total"), Tensor):
        win["total"] = win["total"].to(device)
    wrapper._window.load(win)
    wrapper._store.load(acc["sums"])
    wrapper._stats.load(acc["stats"], device)
    dropped = (acc.get("precision") or {}).get("dropped")
    precision._dropped = None if dropped is None else dropped.to(device)
    noise = getattr(wrapper, "_noise", None)
    if noise is not None:
        if acc.get("noise") is not None:
            noise.load(acc["noise"], device)
        else:
            noise.discard_window()
    if acc.get("scaler") is not None and precision.scaler is not None:
        precision.scaler.load_state_dict(acc["scaler"])
    if acc.get("scheduler") is not None and wrapper.scheduler is not None:
        wrapper.scheduler.load_state_dict(acc["scheduler"])
    wrapper._stepped = bool(acc.get("stepped", False))
    pre = acc.get("pre_weight")
    wrapper._pre_weight = pre.to(device) if isinstance(pre, Tensor) else (None if pre is None else float(pre))
    wrapper._sync.set(wrapper._window.next_is_last)
    for hook in wrapper._optimizer_load_state_dict_post_hooks.values():
        hook(wrapper)


# --------------------------------------------------------------------- files
def _open_temp(folder: str, name: str) -> tuple[IO[bytes], str]:
    """A new temporary file next to the destination (a seam for the crash tests)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".accumopt-tmp", dir=folder)
    return os.fdopen(fd, "wb"), tmp


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically: temp file in the same folder, fsync, rename, fsync folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    f, tmp = _open_temp(folder, os.path.basename(path))
    try:
        with f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600: give the file torch.save's usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def _digest(obj: Any) -> int:
    """CRC-32 of ``obj``'s content (tensor bytes, dtypes, shapes, keys, plain values), in traversal order.

    torch's zip reader does not verify the checksums of tensor records, so a
    flipped byte in tensor data would load silently; this catches it. Tensors on
    an accelerator are copied to the host to be hashed.
    """
    crc = 0

    def feed(tag: bytes, payload: bytes = b"") -> None:
        nonlocal crc
        crc = zlib.crc32(tag + struct.pack("<Q", len(payload)) + payload, crc)

    def walk(x: Any) -> None:
        nonlocal crc
        if isinstance(x, Tensor):
            t = x.detach()
            if t.is_sparse:
                t = t.coalesce()
                feed(b"P", f"{t.dtype}{tuple(t.shape)}".encode())
                walk(t.indices())
                walk(t.values())
                return
            feed(b"T", f"{t.dtype}{tuple(t.shape)}".encode())
            flat = t.reshape(-1).contiguous().cpu()
            if flat.numel():
                crc = zlib.crc32(flat.view(torch.uint8).numpy().data, crc)
        elif isinstance(x, Mapping):
            feed(b"D", str(len(x)).encode())
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            feed(b"L" if isinstance(x, list) else b"U", str(len(x)).encode())
            for v in x:
                walk(v)
        elif isinstance(x, (set, frozenset)):  # iteration order is hash-seeded: digest order-free
            parts = sorted(_digest(v) for v in x)
            feed(b"E" if isinstance(x, set) else b"Z", b"".join(struct.pack("<I", d) for d in parts))
        elif isinstance(x, str):
            feed(b"S", x.encode("utf-8", "surrogatepass"))
        elif isinstance(x, bool) or x is None:
            feed(b"B", repr(x).encode())
        elif isinstance(x, int):
            feed(b"I", str(x).encode())
        elif isinstance(x, float):
            feed(b"F", x.hex().encode())
        else:
            feed(b"R", f"{type(x).__name__}:{x!r}".encode())

    walk(obj)
    return crc


def save_checkpoint(path: str | os.PathLike, obj_state: dict[str, Any], extra: Any = None) -> None:
    """Write an optimizer state dict (and optional plain ``extra`` data) to ``path`` atomically.

    Args:
        path: destination; its folder must exist. An existing file is replaced only
            once the new one is complete and on disk.
        obj_state: ``opt.state_dict()``.
        extra: anything ``weights_only`` can read back (e.g. ``{"model": model.state_dict()}``).
    """
    payload = {"optimizer": obj_state, "extra": extra}
    atomic_save({"format": FILE_FORMAT, "version": 1, "checksum": _digest(payload), **payload}, path)


def _read(path: str | os.PathLike, map_location: Any) -> Any:
    name = os.fspath(path)
    try:
        return torch.load(name, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            raise ValueError(
                f"Invalid checkpoint file {name!r}: it contains pickled objects other than tensors and plain data "
                "(refused by torch.load(weights_only=True); not an accumopt checkpoint, or a file that would run "
                "code when loaded)"
            ) from e
        raise ValueError(f"Invalid checkpoint file {name!r}: not a torch checkpoint or corrupted ({e})") from e
    except Exception as e:  # zip/CRC/EOF errors from truncation or corruption
        raise ValueError(f"Invalid checkpoint file {name!r}: truncated or corrupted ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e


def load_checkpoint(path: str | os.PathLike, map_location: Any = None) -> tuple[dict[str, Any], Any]:
    """Read a file written by :func:`save_checkpoint` with ``weights_only=True``.

    Also accepts a file holding just ``opt.state_dict()`` (``torch.save(opt.state_dict(), path)``).

    Returns:
        ``(optimizer_state_dict, extra)``.

    Raises:
        ValueError: the file is truncated, corrupted, not a torch file, contains
            pickled code, or is not an accumopt checkpoint.
        FileNotFoundError: no such file.
    """
    name = os.fspath(path)
    obj = _read(path, map_location)
    if isinstance(obj, dict) and obj.get("format") == FILE_FORMAT:
        sd = obj.get("optimizer")
        if not isinstance(sd, dict):
            raise ValueError(f"Invalid checkpoint file {name!r}: the 'optimizer' entry is missing or not a dict")
        if "checksum" in obj and obj["checksum"] != _digest({"optimizer": sd, "extra": obj.get("extra")}):
            raise ValueError(f"Invalid checkpoint file {name!r}: corrupted (its content does not match the "
                             "checksum written with it)")
        return sd, obj.get("extra")
    if isinstance(obj, dict) and isinstance(obj.get("accumulation"), dict) and "param_groups" in obj:
        return obj, None
    raise ValueError(f"Invalid checkpoint file {name!r}: not an accumopt checkpoint (a {type(obj).__name__} "
                     f"without format {FILE_FORMAT!r}; expected a file written by opt.save())")


def load_into(wrapper: Any, path: str | os.PathLike) -> Any:
    """Load ``path`` into ``wrapper``; returns the checkpoint's ``extra``. Nothing changes on error."""
    sd, extra = load_checkpoint(path, map_location=_device(wrapper))
    wrapper.load_state_dict(sd)
    return extra

"""State-dict helpers and checkpoint files of :class:`~accumopt.AccumulatingOptimizer` (see docs/state.md).

The ``"accumulation"`` entry is plain data (``weights_only=True``), validated whole before anything changes. Files are
written atomically (a crash, even SIGKILL, leaves the previous one intact); a failure to read one is a ``ValueError``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import tempfile
import zlib
from collections.abc import Mapping
from typing import IO, Any, Callable

import torch
from torch import Tensor

__all__ = [
    "FILE_FORMAT", "atomic_save", "check_header", "clone_tree", "compare_signatures", "load_checkpoint",
    "load_inner_keeping_identity", "save_checkpoint", "signature", "validate_optimizer_state", "validate_state_shapes",
]

FILE_FORMAT = "accumopt.checkpoint"
STATE_FORMAT = "accumopt.AccumulatingOptimizer"
STATE_VERSION = 2


def clone_tree(x: Any, device: torch.device | None = None) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor cloned (onto ``device``); never aliases ``x``."""
    if isinstance(x, Tensor):
        return (x.detach() if device is None else x.detach().to(device)).clone()
    if isinstance(x, Mapping):
        return {k: clone_tree(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):  # subclasses (named tuples) come back as plain lists and tuples
        return (list if isinstance(x, list) else tuple)(clone_tree(v, device) for v in x)
    return x


def signature(optimizer: torch.optim.Optimizer, *, mode: str, k: dict[str, Any], scaler: bool,
              scheduler: Any, lr_scaling: str | None, names: list[str] | None = None) -> dict[str, Any]:
    """What a state dict must match to be loaded (plain data); ``names``: model names in optimizer order, or None."""
    groups = optimizer.param_groups
    return {"names": names, "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "mode": mode, "k": k, "groups": [len(g["params"]) for g in groups],
            "params": [[list(p.shape), str(p.dtype).replace("torch.", "")] for g in groups for p in g["params"]],
            "scaler": scaler, "scheduler": None if scheduler is None else type(scheduler).__name__,
            "lr_scaling": lr_scaling}


def check_header(acc: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless the entry has this format and version (legacy ones cannot be checked)."""
    if acc.get("format") != STATE_FORMAT or acc.get("version") != STATE_VERSION:
        raise ValueError(f"Invalid state dict: accumulation entry of format {acc.get('format')!r} version "
                         f"{acc.get('version')!r} (expected format {STATE_FORMAT!r} version {STATE_VERSION}: a legacy "
                         "or foreign entry cannot be checked against this optimizer)")


def compare_signatures(saved: Any, ours: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first difference between a saved signature and ``ours``."""
    if not isinstance(saved, dict):
        raise ValueError("Invalid state dict: the accumulation entry has no 'signature' (expected one from "
                         "AccumulatingOptimizer.state_dict())")
    theirs, mine = saved.get("names"), ours.get("names")
    if theirs is not None and not (isinstance(theirs, list) and all(isinstance(n, (str, type(None))) for n in theirs)):
        raise ValueError(f"Invalid state dict: signature['names'] is {theirs!r} (expected a list of parameter names)")
    if theirs is not None and mine is not None:
        if len(theirs) != len(mine):
            raise ValueError(f"Invalid state dict: saved from {len(theirs)} named parameters (expected {len(mine)}); "
                             "it belongs to another model")
        for i, (a, b) in enumerate(zip(theirs, mine)):
            if a != b:
                raise ValueError(f"Invalid state dict: parameter {i} is {a!r} in the state dict but {b!r} in this "
                                 "optimizer (other parameter names, or the same names in another order: its state "
                                 "would land on the wrong parameters)")
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


def validate_optimizer_state(sd: Mapping[str, Any], param_groups: list[dict[str, Any]]) -> None:
    """Raise ``ValueError`` unless the mapping ``sd`` is an optimizer state dict with the layout of ``param_groups``."""
    groups, state = sd.get("param_groups"), sd.get("state")
    if not isinstance(groups, list) or not isinstance(state, Mapping) or \
            not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups):
        raise ValueError("Invalid state dict: missing or malformed 'state' or 'param_groups' "
                         "(expected an optimizer state dict)")
    if len(groups) != len(param_groups) or any(len(a["params"]) != len(b["params"])
                                               for a, b in zip(groups, param_groups)):
        raise ValueError(f"Invalid state dict: {len(groups)} param groups of sizes "
                         f"{[len(g['params']) for g in groups]} (expected {len(param_groups)} of sizes "
                         f"{[len(g['params']) for g in param_groups]})")
    ids = [i for g in groups for i in g["params"]]
    if len(set(map(repr, ids))) != len(ids):
        raise ValueError("Invalid state dict: a parameter id appears twice in 'param_groups'")
    for key, value in state.items():
        if not isinstance(value, Mapping):
            raise ValueError(f"Invalid state dict: state[{key!r}] is a {type(value).__name__} (expected a dict)")


def validate_state_shapes(sd: Mapping[str, Any], param_groups: list[dict[str, Any]],
                          label: Callable[[int, int], str]) -> None:
    """Raise ``ValueError`` unless each per-parameter state tensor of ``sd`` fits its parameter.

    Same shape, or one broadcasting to it (Adafactor's factors): another model's state is refused here, not at the
    first step. ``label(i, j)`` names parameter ``j`` of group ``i``. Call after :func:`validate_optimizer_state`.
    """
    for gi, (theirs, ours) in enumerate(zip(sd["param_groups"], param_groups)):
        for pi, (key, p) in enumerate(zip(theirs["params"], ours["params"])):
            for name, t in (sd["state"].get(key) or {}).items():
                if not isinstance(t, Tensor) or t.dim() == 0:
                    continue
                if t.dim() != p.dim() or any(a not in (1, b) for a, b in zip(t.shape, p.shape)):
                    raise ValueError(f"Invalid state dict: state {name!r} of parameter {label(gi, pi)} has shape "
                                     f"{tuple(t.shape)}, which does not fit the parameter's shape {tuple(p.shape)} "
                                     "(expected the state dict of this model's optimizer)")


def load_inner_keeping_identity(inner: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """``inner.load_state_dict(sd)``, keeping the ``param_groups`` list, its dicts and the ``state`` dict.

    torch replaces them; the wrapper, LR schedulers built on it and captured graphs hold the originals.
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


def _open_temp(folder: str, name: str) -> tuple[IO[bytes], str]:
    """A new temporary file next to the destination (a seam for the crash tests)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".accumopt-tmp", dir=folder)
    return os.fdopen(fd, "wb"), tmp


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to ``path`` atomically: temp file in the same folder, fsync, rename, fsync folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise type(e)(e.errno, f"Cannot create the folder of {path!r}: {e.strerror}", folder) from e
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
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename durable; platforms without directory handles, and some filesystems, refuse: it stands anyway.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _digest(obj: Any) -> int:
    """CRC-32 of ``obj``'s content (tensor bytes, dtypes, shapes, keys, plain values), in traversal order.

    torch's zip reader does not check tensor records' checksums: a flipped byte would load silently.
    """
    crc = 0

    def feed(tag: bytes, payload: bytes = b"") -> None:
        nonlocal crc
        crc = zlib.crc32(tag + struct.pack("<Q", len(payload)) + payload, crc)

    def walk(x: Any) -> None:
        nonlocal crc
        if isinstance(x, Tensor):
            t = x.detach().coalesce() if x.is_sparse else x.detach()
            feed(b"P" if t.is_sparse else b"T", f"{t.dtype}{tuple(t.shape)}".encode())
            if t.is_sparse:
                walk(t.indices())
                walk(t.values())
            elif (flat := t.reshape(-1).contiguous().cpu()).numel():
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


def save_checkpoint(path: str | os.PathLike[str], obj_state: dict[str, Any], extra: Any = None) -> None:
    """Write an optimizer state dict (and optional plain ``extra`` data) to ``path`` atomically.

    Args:
        path: destination (missing folders are created; an existing file is replaced once the new one is on disk).
        obj_state: ``opt.state_dict()``.
        extra: anything ``weights_only`` can read back (e.g. ``{"model": model.state_dict()}``).
    """
    payload = {"optimizer": obj_state, "extra": extra}
    atomic_save({"format": FILE_FORMAT, "version": 1, "checksum": _digest(payload), **payload}, path)


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = None) -> tuple[dict[str, Any], Any]:
    """Read a file of :func:`save_checkpoint` (or a plain ``torch.save(opt.state_dict())``) with ``weights_only=True``.

    Returns:
        ``(optimizer_state_dict, extra)``.

    Raises:
        ValueError: truncated, corrupted, not a torch file, pickled code, or not an accumopt checkpoint.
        FileNotFoundError: no such file.
    """
    name = os.fspath(path)
    try:
        obj = torch.load(name, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            raise ValueError(f"Invalid checkpoint file {name!r}: it contains pickled objects other than tensors and "
                             "plain data (refused by torch.load(weights_only=True); not an accumopt checkpoint, or a "
                             "file that would run code when loaded)") from e
        raise ValueError(f"Invalid checkpoint file {name!r}: not a torch checkpoint or corrupted ({e})") from e
    except Exception as e:  # zip/CRC/EOF errors from truncation or corruption
        raise ValueError(f"Invalid checkpoint file {name!r}: truncated or corrupted ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
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

"""``accumopt demo``: one large batch vs accumopt (K micro-batches) vs plain small batches (README.md).

A small MLP on synthetic data, trained the three ways on the same samples in the same order.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import io
import math
import multiprocessing as mp
import os
import sys
import time
import warnings
from typing import Any, Sequence, TextIO

import torch
from torch import Tensor, nn

from . import __version__
from ._checks import check_choice, check_cuda_present, check_int
from .optimizer import AccumulatingOptimizer

__all__ = ["build_parser", "main", "run_demo"]


def _data_and_model(cfg: dict[str, Any], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, nn.Module]:
    """The data set (a fixed random teacher labels Gaussian inputs) and the initial MLP, the same in every run."""
    n, features, hidden, classes = cfg["samples"], cfg["features"], cfg["hidden"], cfg["classes"]
    g = torch.Generator().manual_seed(1234)
    x, teacher, noise = (torch.randn(*shape, generator=g, dtype=torch.float64)
                         for shape in ((n, features), (features, classes), (n, classes)))
    y = (torch.tanh(x @ teacher / math.sqrt(features)) * 3 + 0.5 * noise).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                          nn.Linear(hidden, classes)).to(device=device, dtype=dtype)
    return x.to(dtype).to(device), y.to(device), model


def _rss(field: str = "VmRSS") -> int:
    """This process's resident memory (VmRSS), or its high-water mark (VmHWM), in bytes; 0 off Linux."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":")), 0)
    except (OSError, ValueError):  # pragma: no cover - non-Linux
        return 0


def _train(kind: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one way; returns losses per update, final parameters, final loss, peak memory, time."""
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    x, y, model = _data_and_model(cfg, getattr(torch, cfg["dtype"]), device)
    loss_fn = nn.CrossEntropyLoss()
    inner = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    acc = AccumulatingOptimizer(inner, cfg["k"]) if kind == "accumopt" else None
    batch = cfg["micro_batch_size"] * (cfg["k"] if kind == "large batch" else 1)
    curve: list[tuple[int, Tensor]] = []  # (samples seen, loss), kept on the device until the end
    window: list[Any] = [0.0, 0]  # (loss x samples, samples) of the open window
    seen = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        warm = copy.deepcopy(model)  # first-use allocations of torch kernels stay out of the figure
        warm_opt = torch.optim.AdamW(warm.parameters(), lr=cfg["lr"], weight_decay=0.01)
        loss_fn(warm(x[:batch]), y[:batch]).backward()
        warm_opt.step()
        del warm, warm_opt
        base = _rss()
    t0 = time.perf_counter()
    for epoch in range(cfg["epochs"]):
        order = torch.randperm(cfg["samples"], generator=torch.Generator().manual_seed(epoch)).to(device)
        for a in range(0, cfg["samples"], batch):
            idx = order[a:a + batch]
            loss, n = loss_fn(model(x[idx]), y[idx]), len(idx)
            seen += n
            if acc is None:
                loss.backward()
                inner.step()
                inner.zero_grad()
                curve.append((seen, loss.detach()))
                continue
            acc.backward(loss, weight=n)  # weighted by sample count: exact for a short last batch
            acc.step()
            acc.zero_grad()
            window = [window[0] + loss.detach() * n, window[1] + n]
            # a full window, or the epoch's last, partial one (flushed)
            if acc.pending == 0 or (a + batch >= cfg["samples"] and acc.flush()):
                curve.append((seen, window[0] / window[1]))
                window = [0.0, 0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss("VmHWM")) - base
    elapsed = time.perf_counter() - t0
    with torch.no_grad():  # after the memory reading: the whole data set in one pass is not training
        final = loss_fn(model(x), y)
    return {"kind": kind, "curve": [(s, float(v)) for s, v in curve],
            "params": [p.detach().cpu() for p in model.parameters()],
            "final_loss": float(final), "peak_bytes": max(peak, 0), "time": elapsed}


def _child(kind: str, cfg: dict[str, Any], conn: Any) -> None:
    try:  # a fixed glibc mmap threshold: freed tensors leave RSS, so its high-water mark tracks live memory
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (also turns off its dynamic growth)
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass
    try:
        result = _train(kind, cfg)
        buf = io.BytesIO()
        torch.save(result.pop("params"), buf)  # plain bytes: no shared-memory handles outliving the child
        result["params_bytes"] = buf.getvalue()
        conn.send(result)
    except BaseException as e:  # pragma: no cover - reported by the parent
        conn.send(e)
    finally:
        conn.close()


def _run(kind: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """On CPU each run is a forked child, so that its peak RSS is its own."""
    if cfg["device"] != "cpu" or "fork" not in mp.get_all_start_methods() or not cfg["fork"]:
        return _train(kind, cfg)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(kind, cfg, child))
    proc.start()
    child.close()
    result: dict[str, Any] | BaseException = parent.recv()
    proc.join()
    if isinstance(result, BaseException):
        raise result
    result["params"] = torch.load(io.BytesIO(result.pop("params_bytes")), weights_only=True)
    return result


def check_output(path: str) -> None:
    """Refuse (ValueError, one line) an output path the plot could not be written to, before any training."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # no plot without matplotlib: any extension will do
        pass
    else:
        formats = sorted(FigureCanvasAgg(Figure()).get_supported_filetypes())
        if os.path.splitext(path)[1].lower().lstrip(".") not in formats:
            raise ValueError(f"Invalid output: {path!r} (expected a file name ending in one of "
                             f"{', '.join('.' + f for f in formats)})")
    if os.path.isdir(path):
        raise ValueError(f"Invalid output: {path!r} is a folder (expected a file name, e.g. {path}/demo.png)")
    existing = folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):  # the nearest folder that exists: the plot creates the rest
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"Invalid output: {path!r} ({existing!r} is not a folder)")
    if existing != folder:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"Invalid output: {path!r} (cannot create folders in {existing!r})")
        return
    created = not os.path.exists(path)
    try:  # the only reliable test (procfs, read-only mounts, permissions): open it for writing
        with open(path, "ab"):
            pass
    except OSError as e:
        raise ValueError(f"Invalid output: {path!r} (cannot write there: {e.strerror or e})") from None
    if created:
        os.remove(path)


def _plot(results: list[dict[str, Any]], path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    styles: dict[str, dict[str, Any]] = {"large batch": dict(lw=3.0, alpha=0.45, color="tab:blue"),
                                         "accumopt": dict(lw=1.2, ls="--", color="tab:orange"),
                                         "small batches": dict(lw=0.8, alpha=0.8, color="tab:green")}
    for r in results:
        ax.plot([s for s, _ in r["curve"]], [v for _, v in r["curve"]], label=r["kind"], **styles[r["kind"]])
    ax.set(xlabel="samples seen", ylabel="training loss (per update)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def run_demo(*, k: int = 8, micro_batch_size: int = 32, device: str = "cpu", dtype: str = "float32",
             output: str | None = "accumopt_demo.png", samples: int = 4096, epochs: int = 3,
             features: int = 64, hidden: int = 256, classes: int = 10, lr: float = 3e-3,
             fork: bool = True, threads: int | None = None, stream: TextIO | None = None) -> dict[str, Any]:
    """Run the three trainings and print the table; every argument is checked first (ValueError, TypeError).

    Returns:
        The figures per run, the deviations from the large batch and the plot's path (None when none was written).
    """
    for name, value in (("k", k), ("micro_batch_size", micro_batch_size), ("samples", samples), ("epochs", epochs)):
        check_int(name, value)
    check_choice("dtype", dtype, ("float32", "float64"))
    expected = f"Invalid device: {device!r} (expected 'cpu', 'cuda' or 'cuda:<index>')"
    if not isinstance(device, str):
        raise TypeError(expected)
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(expected) from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"Invalid device: {device!r} (the demo runs on 'cpu' or 'cuda')")
    if dev.type == "cuda":
        check_cuda_present(device, dev)
    if output:
        check_output(output)
    if samples < k * micro_batch_size:
        same = ("so the three runs are the same training" if samples <= micro_batch_size else
                "so each epoch is a single, partial window")
        warnings.warn(f"--samples {samples} is smaller than one large batch (K {k} x micro-batch {micro_batch_size} "
                      f"= {k * micro_batch_size} samples), {same}", UserWarning, stacklevel=2)
    out = stream or sys.stdout
    cfg = dict(k=k, micro_batch_size=micro_batch_size, device=str(dev), dtype=dtype, samples=samples,
               epochs=epochs, features=features, hidden=hidden, classes=classes, lr=lr, fork=fork,
               threads=threads or (1 if dev.type == "cpu" else torch.get_num_threads()))
    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    try:
        if cfg["fork"] and dev.type == "cpu":  # initialise torch's kernels once, before the children fork
            _train("accumopt", dict(cfg, samples=2 * k * micro_batch_size, epochs=1))
        results = [_run(kind, cfg) for kind in ("large batch", "accumopt", "small batches")]
    finally:
        torch.set_num_threads(threads_before)
    for r in results:  # the largest over parameters of max|p - p_ref| / max|p_ref|
        r["deviation"] = max([0.0, *((p.double() - q.double()).abs().max().item() / (q.abs().max().item() or 1.0)
                                     for p, q in zip(r["params"], results[0]["params"]))])
    mem = "peak GPU memory" if dev.type == "cuda" else "peak RSS (+)"
    print(f"accumopt demo: {samples} samples, {epochs} epoch{'' if epochs == 1 else 's'}, {dtype} on {dev}; AdamW; "
          f"large batch {k * micro_batch_size} = K {k} x micro-batch {micro_batch_size}", file=out)
    header = f"{'run':<15}{'final loss':>12}{'max rel. deviation':>21}{mem:>18}{'time':>9}"
    print(header, "-" * len(header), sep="\n", file=out)
    for r in results:
        dev_txt = "(reference)" if r is results[0] else f"{r['deviation']:.2e}"
        print(f"{r['kind']:<15}{r['final_loss']:>12.6f}{dev_txt:>21}{r['peak_bytes'] / 2**20:>15.1f} MiB"
              f"{r['time']:>8.2f}s", file=out)
    acc_dev = results[1]["deviation"]
    if k == 1:
        print("K=1: one micro-batch per update, so the three runs are the same training (use --k 2 or more "
              "to compare accumulation with the large batch).", file=out)
    elif dtype == "float64":
        print(f"float64: accumopt equals the large batch to {acc_dev:.1e} (bar: 1e-9); small batches without "
              f"accumulation follow another trajectory ({results[2]['deviation']:.1e}).", file=out)
    elif acc_dev > 0:
        print("float32: this deviation is rounding, not method: K partial sums round differently from one "
              "large-batch reduction (~1e-7 relative), and AdamW's division by sqrt(v) amplifies that for "
              "weights with tiny gradients over the updates; --dtype float64 shows the same run equal to "
              "~1e-13.", file=out)
    title = f"accumopt demo: K={k}, micro-batch {micro_batch_size}, {dtype}"
    png = output if output and _plot(results, output, title) else None
    if png:
        print(f"loss curves written to {output}", file=out)
    elif output:
        print("(install matplotlib for a PNG of the loss curves: pip install matplotlib)", file=out)
    print(f"total time {time.perf_counter() - t0:.1f}s", file=out)
    return {"results": [{k_: v for k_, v in r.items() if k_ != "params"} for r in results],
            "deviation": acc_dev, "small_deviation": results[2]["deviation"], "png": png}


def build_parser(prog: str = "accumopt") -> argparse.ArgumentParser:
    """The command line, named ``prog`` (``accumopt`` or ``python -m accumopt``); every option has a help text."""
    parser = argparse.ArgumentParser(prog=prog, description="accumopt: gradient accumulation for any torch optimizer.")
    parser.add_argument("--version", action="version", version=f"accumopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="large batch vs accumopt vs small batches, with a table and a PNG",
                       description="Train a small MLP three ways on the same samples: one large batch, accumopt "
                       "(K micro-batches), and plain small batches; print a table and plot the loss curves.")
    d.add_argument("--k", type=int, default=8, help="micro-batches per update (default 8)")
    d.add_argument("--micro-batch-size", type=int, default=32, help="samples per micro-batch (default 32)")
    d.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:<index>")
    d.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help="parameter and data dtype (default float32; float64 shows the equality to ~1e-13)")
    d.add_argument("--output", default="accumopt_demo.png",
                   help="path of the plot, checked before training; .png, .pdf, .svg, ... ('' for none)")
    d.add_argument("--samples", type=int, default=4096,
                   help="samples in the synthetic data set, seen once per epoch (default 4096)")
    d.add_argument("--epochs", type=int, default=3, help="passes over the data set (default 3)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "accumopt") -> int:
    """Entry point of ``accumopt`` and ``python -m accumopt``; errors (exit status 2, or 1 on I/O) are one line."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # restores showwarning on the way out
        warnings.showwarning = lambda message, *_: print(f"{prog}: warning: {message}", file=sys.stderr)
        try:
            run_demo(k=args.k, micro_batch_size=args.micro_batch_size, device=args.device, dtype=args.dtype,
                     output=args.output or None, samples=args.samples, epochs=args.epochs)
        except (ValueError, TypeError) as e:
            parser.exit(2, f"{prog}: error: {e}\n")
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            parser.exit(1, f"{prog}: error: {e.strerror or e}{where}\n")
    return 0

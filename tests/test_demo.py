"""The demo: runs with small sizes, float64 equality with the large batch, the PNG, the CLI."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from accumopt.demo import run_demo

SMALL = dict(samples=192, epochs=2, features=16, hidden=32, k=4, micro_batch_size=12)


def test_demo_float64_equals_large_batch_and_small_batches_do_not(tmp_path):
    out = io.StringIO()
    res = run_demo(dtype="float64", output=str(tmp_path / "curves.png"), stream=out, **SMALL)
    text = out.getvalue()
    assert res["deviation"] <= 1e-9
    assert res["small_deviation"] > 1e-3  # the comparison is real: no accumulation is another trajectory
    for word in ("large batch", "accumopt", "small batches", "final loss", "max rel. deviation", "peak RSS"):
        assert word in text
    losses = {r["kind"]: r["final_loss"] for r in res["results"]}
    assert abs(losses["accumopt"] - losses["large batch"]) <= 1e-9 * abs(losses["large batch"])
    assert all(r["curve"][-1][1] < r["curve"][0][1] for r in res["results"])  # every run trains


def test_demo_float32_explains_its_deviation():
    out = io.StringIO()
    res = run_demo(dtype="float32", output=None, stream=out, fork=False, **SMALL)
    assert res["deviation"] < 1e-2
    assert "float32: this deviation is rounding, not method" in out.getvalue()


def test_demo_png_is_a_valid_image(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    path = tmp_path / "curves.png"
    res = run_demo(dtype="float64", output=str(path), stream=io.StringIO(), **SMALL)
    assert res["png"] == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 0.01  # not a blank canvas


def test_cli(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "accumopt", "demo", "--k", "4", "--micro-batch-size", "12", "--dtype", "float64",
           "--device", "cpu", "--samples", "96", "--epochs", "1", "--output", str(tmp_path / "d.png")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "accumopt" in r.stdout and "float64: accumopt equals the large batch" in r.stdout
    bad = subprocess.run(cmd[:4] + ["--dtype", "float16"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "float16" in bad.stderr

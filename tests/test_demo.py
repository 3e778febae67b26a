"""The demo: runs with small sizes, float64 equality with the large batch, the PNG, the CLI."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from accumopt.demo import build_parser, main, run_demo

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
    assert "equal to ~1e-13." in out.getvalue()  # measured: 5.6e-14 at K=8, 1.3e-13 at K=4


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


# ------------------------------------------------------------------ review fixes (regressions)
def test_k1_prints_no_rounding_note():
    out = io.StringIO()
    res = run_demo(dtype="float32", output=None, stream=out, fork=False, **dict(SMALL, k=1, micro_batch_size=16))
    assert res["deviation"] == 0.0 and res["small_deviation"] == 0.0  # one micro-batch per update: the large batch
    assert "this deviation is rounding" not in out.getvalue() and "K=1" in out.getvalue()


def test_every_demo_option_has_help_text():
    parser = build_parser()
    demo = next(a for a in parser._actions if a.dest == "command").choices["demo"]
    options = [a for a in demo._actions if a.option_strings and a.dest != "help"]
    assert {o.dest for o in options} >= {"k", "micro_batch_size", "device", "dtype", "output", "samples", "epochs"}
    assert all(o.help and len(o.help) > 10 for o in options), [o.dest for o in options if not o.help]
    text = demo.format_help()
    assert "passes over the data set" in text and "samples in the synthetic data set" in text


@pytest.mark.parametrize("device", ["bogus", "tpu", "meta"])
def test_bad_device_is_a_usage_error_not_a_traceback(device, capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--device", device, "--samples", "48", "--epochs", "1", "--output", ""])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert f"Invalid device: {device!r}" in err and "Traceback" not in err
    with pytest.raises(ValueError, match=f"Invalid device: {device!r}"):
        run_demo(device=device, output=None, stream=io.StringIO(), **SMALL)


def test_ddp_example_without_torchrun_explains_and_runs_one_process(tmp_path):
    # examples/ddp_train.py started with plain python: a clear message, then a single-process run.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU
    r = subprocess.run([sys.executable, os.path.join(root, "examples", "ddp_train.py"), "--epochs", "1"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "torchrun --nproc_per_node=2 examples/ddp_train.py" in r.stderr and "Traceback" not in r.stderr
    assert "world=1" in r.stdout and "identical on all ranks: True" in r.stdout

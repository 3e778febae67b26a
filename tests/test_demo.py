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
    assert res["deviation"] > 0  # the note is printed because float32 rounding shows


def test_demo_uneven_split_and_partial_last_window_equal_the_large_batch():
    # 222 samples, K=4 x 12: each epoch ends with micro-batches of 12, 12 and 6 (uneven) in a window of 3 of 4
    # (partial), against a last large batch of 30. Dropping the sample weights or the flush deviates by 2e-2 and
    # 3e-2 (measured); float64 gives 2.8e-16.
    cfg = dict(SMALL, samples=222)
    assert cfg["samples"] % cfg["micro_batch_size"] and cfg["samples"] % 48 > cfg["micro_batch_size"]
    res = run_demo(dtype="float64", output=None, stream=io.StringIO(), **cfg)
    assert res["deviation"] <= 1e-13
    assert res["small_deviation"] > 1e-3
    losses = {r["kind"]: r["final_loss"] for r in res["results"]}
    assert abs(losses["accumopt"] - losses["large batch"]) <= 1e-13 * abs(losses["large batch"])
    large, acc = (next(r for r in res["results"] if r["kind"] == k) for k in ("large batch", "accumopt"))
    assert [s for s, _ in acc["curve"]] == [s for s, _ in large["curve"]]  # one point per update, same samples
    assert len(acc["curve"]) == 2 * 5  # 4 full windows + the partial one, per epoch


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
    assert "96 samples, 1 epoch," in r.stdout  # not "1 epochs"
    assert (tmp_path / "d.png").stat().st_size > 0
    bad = subprocess.run(cmd[:4] + ["--dtype", "float16"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "float16" in bad.stderr
    # python -m names itself so; --version
    helped = subprocess.run([sys.executable, "-m", "accumopt", "--help"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: python -m accumopt")
    version = subprocess.run([sys.executable, "-m", "accumopt", "--version"], capture_output=True, text=True,
                             timeout=120, env=env)
    import accumopt

    assert version.returncode == 0 and version.stdout.strip() == f"accumopt {accumopt.__version__}"


def _cli(argv, capsys):
    """main(argv) in this process: (exit status, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


FAST = ["--k", "2", "--micro-batch-size", "8", "--samples", "32", "--epochs", "1"]


def test_console_script_names_itself_accumopt(capsys):
    code, out, _ = _cli(["--help"], capsys)
    assert code == 0 and out.startswith("usage: accumopt ")
    code, out, _ = _cli(["demo", "--help"], capsys)
    assert code == 0 and out.startswith("usage: accumopt demo")


def test_help_has_no_markup(capsys):
    for argv in (["--help"], ["demo", "--help"]):
        code, out, _ = _cli(argv, capsys)
        assert code == 0
        for markup in ("``", ":mod:", ":func:", ":class:", "* ``"):
            assert markup not in out, (argv, markup)
    assert "three ways" in _cli(["demo", "--help"], capsys)[1]


@pytest.mark.parametrize("output, why", [
    ("/proc/accumopt_demo.png", "cannot write there"),  # procfs: no new files, even for root
    ("curves.foo", "expected a file name ending in one of"),
    (".", "expected a file name ending in one of"),
])
def test_bad_output_is_refused_before_training(output, why, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    import accumopt.demo as demo

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the output")

    monkeypatch.setattr(demo, "_run", no_training)
    monkeypatch.setattr(demo, "_train", no_training)
    code, out, err = _cli(["demo", *FAST, "--output", output], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("accumopt: error: Invalid output: ") and why in err, err
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_output_folder_that_does_not_exist_yet_is_created(tmp_path):
    path = tmp_path / "new" / "folder" / "curves.png"
    res = run_demo(dtype="float64", output=str(path), stream=io.StringIO(), fork=False,
                   **dict(SMALL, samples=48, epochs=1))
    if res["png"] is not None:  # with matplotlib
        assert path.exists()


def test_io_error_while_writing_is_one_line(capsys, monkeypatch, tmp_path):
    import accumopt.demo as demo

    def full_disk(results, path, title):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(demo, "_plot", full_disk)
    code, _, err = _cli(["demo", *FAST, "--output", str(tmp_path / "x.png")], capsys)
    assert code == 1
    assert err == f"accumopt: error: No space left on device ({tmp_path / 'x.png'})\n"


@pytest.mark.parametrize("samples, says", [(10, "the three runs are the same training"),
                                           (20, "each epoch is a single, partial window")])
def test_samples_smaller_than_one_batch_warns(samples, says, capsys):
    code, out, err = _cli(["demo", "--k", "4", "--micro-batch-size", "16", "--samples", str(samples),
                           "--epochs", "1", "--output", ""], capsys)
    assert code == 0 and "final loss" in out
    assert err == (f"accumopt: warning: --samples {samples} is smaller than one large batch (K 4 x micro-batch 16 "
                   f"= 64 samples), so {says}\n")
    with pytest.warns(UserWarning, match="smaller than one large batch"):
        run_demo(samples=samples, k=4, micro_batch_size=16, epochs=1, output=None, stream=io.StringIO(), fork=False)


def test_no_warning_when_the_samples_fill_a_batch(capsys):
    code, _, err = _cli(["demo", "--k", "2", "--micro-batch-size", "8", "--samples", "16", "--epochs", "1",
                         "--output", ""], capsys)
    assert code == 0 and err == ""


# ----------------------------------------------------------------------------------- regressions
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
    env["TMPDIR"] = str(tmp_path)  # where its file store goes
    r = subprocess.run([sys.executable, os.path.join(root, "examples", "ddp_train.py"), "--epochs", "1"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "torchrun --nproc_per_node=2 examples/ddp_train.py" in r.stderr and "Traceback" not in r.stderr
    assert "world=1" in r.stdout and "identical on all ranks: True" in r.stdout
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("torchinductor")] == []  # no file store


def _example_env(root):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def test_ddp_example_refuses_bad_arguments_in_one_line(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "examples", "ddp_train.py"), "--accumulation-steps", "0"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_example_env(root))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "ddp_train.py: error: argument --accumulation-steps: invalid value 0 (expected an int >= 1)")


def test_trainer_example_leaves_no_file_behind(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = _example_env(root)
    env["TMPDIR"] = str(tmp_path)  # where tempfile puts its folders
    work = tmp_path / "cwd"
    work.mkdir()
    r = subprocess.run([sys.executable, os.path.join(root, "examples", "trainer.py")],
                       capture_output=True, text=True, timeout=300, cwd=work, env=env)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("torchinductor")] == ["cwd"]  # torch's cache
    assert list(work.iterdir()) == []

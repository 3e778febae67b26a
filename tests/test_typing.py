"""accumopt is a typed package: mypy --strict is clean on it, and it catches misuse in a user's code.

The user's side runs mypy on a file outside the repository that imports accumopt as an installed package
would be seen (through the import path, so py.typed decides whether mypy reads it at all).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("mypy")


def _mypy(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH",)}
    env["PYTHONPATH"] = str(ROOT)  # accumopt found on the import path, as an installed package is
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache), "--no-color-output",
                           "--no-error-summary", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mypy_cache")


def test_py_typed_is_shipped() -> None:
    assert (ROOT / "accumopt" / "py.typed").is_file()


def test_mypy_strict_is_clean_on_the_package(cache: Path) -> None:
    r = _mypy(["--strict", "-p", "accumopt"], ROOT, cache)
    errors = [line for line in r.stdout.splitlines() if ": error:" in line]
    assert errors == [] and r.returncode == 0, "\n".join(errors[:50]) + r.stderr


USER_CODE = '''\
import torch
import accumopt

model = torch.nn.Linear(4, 2)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
wrapped = accumopt.AccumulatingOptimizer(opt, {steps})
applied: bool = wrapped.flush()
pending: int = wrapped.pending
'''


def test_mypy_flags_a_string_accumulation_steps_in_user_code(tmp_path: Path, cache: Path) -> None:
    good = tmp_path / "good.py"
    good.write_text(USER_CODE.format(steps="8"), encoding="utf-8")
    r = _mypy(["--strict", str(good)], tmp_path, cache)
    assert r.returncode == 0, r.stdout + r.stderr  # py.typed: accumopt is read, and a correct call is clean
    bad = tmp_path / "bad.py"
    bad.write_text(USER_CODE.format(steps='"8"'), encoding="utf-8")
    r = _mypy(["--strict", str(bad)], tmp_path, cache)
    assert r.returncode == 1
    errors = [line for line in r.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and re.match(r".*bad\.py:6: error: .*\"str\".*\[arg-type\]", errors[0]), r.stdout
    assert "py.typed" not in r.stdout and "import-untyped" not in r.stdout

"""Every ```python block of README.md and docs/*.md runs, on CPU, as the page shows it.

Convention (for whoever writes a page):

* the python blocks of one page run in order, in one shared namespace, with the
  working directory a fresh temporary folder (one pytest test per block, named
  ``<page>:<line of the opening fence>``);
* a page whose examples need a model or data starts with a short setup block
  ("The examples on this page assume:") that the reader sees too;
* a block that needs CUDA or several processes has ``<!-- skip: reason -->`` on
  the line just above its opening fence; it is reported as skipped with that
  reason;
* other blocks (bash, text, ...) are not run.

New pages under docs/ are picked up automatically. The API reference
(docs/api, Sphinx autodoc) is built with warnings as errors at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_SKIP = re.compile(r"^\s*<!--\s*skip:\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    source: str
    skip: str | None  # the reason of a skip marker


def extract_blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """The ```python blocks of a Markdown file, with their line and skip marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = path.relative_to(root).as_posix()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1  # the closing fence
        if lang.lower() not in ("python", "py", "python3"):
            continue
        marker = _SKIP.match(lines[start - 1]) if start > 0 else None
        blocks.append(Block(page, start + 1, "\n".join(body) + "\n", marker.group(1) if marker else None))
    return blocks


BLOCKS = [b for p in PAGES for b in extract_blocks(p)]


class _Page:
    """The shared namespace and working directory of one page's blocks."""

    def __init__(self, folder: Path) -> None:
        self.namespace: dict[str, Any] = {"__name__": "__docs__"}
        self.folder = folder
        self.done = 0  # blocks of the page run so far (in order)
        self.failed: str | None = None


_pages: dict[str, _Page] = {}


@pytest.fixture(scope="module", autouse=True)
def _no_leftovers() -> Any:
    """A page that failed half-way must not leave a process group to the rest of the suite."""
    environ = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environ)
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _exec(block: Block, page: _Page) -> None:
    # Blank lines in front, so that a traceback shows the page and its line numbers.
    code = compile("\n" * block.line + block.source, str(ROOT / block.page), "exec")
    cwd = os.getcwd()
    os.chdir(page.folder)
    try:
        exec(code, page.namespace)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.page}:{b.line}" for b in BLOCKS])
def test_doc_block(block: Block, tmp_path_factory: pytest.TempPathFactory) -> None:
    if block.skip is not None:
        pytest.skip(f"{block.page}:{block.line}: {block.skip}")
    torch = pytest.importorskip("torch")
    page = _pages.get(block.page)
    if page is None:
        page = _pages[block.page] = _Page(tmp_path_factory.mktemp(block.page.replace("/", "_")))
    blocks = [b for b in BLOCKS if b.page == block.page]
    index = blocks.index(block)
    if page.failed is not None:
        pytest.fail(f"{block.page}:{block.line} not run: an earlier block of the page failed ({page.failed})")
    # Earlier blocks first (when this one is selected alone, e.g. with -k).
    for earlier in blocks[page.done:index + 1]:
        if earlier.skip is not None:
            page.done += 1
            continue
        if page.done == 0:
            torch.manual_seed(0)
        try:
            _exec(earlier, page)
        except BaseException:
            page.failed = f"{earlier.page}:{earlier.line}"
            raise
        finally:
            page.done += 1


def test_every_page_is_collected() -> None:
    """The glob finds the pages, and every skip marker sits right above a python block."""
    assert ROOT / "README.md" in PAGES and any(p.name == "core.md" for p in PAGES)
    for path in PAGES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            if _SKIP.match(line):
                nxt = lines[n + 1] if n + 1 < len(lines) else ""
                m = _FENCE.match(nxt)
                assert m and m.group(3).lower() in ("python", "py", "python3"), (
                    f"{path.relative_to(ROOT)}:{n + 1}: a skip marker must sit on the line just above "
                    "a ```python fence")


def test_extractor_reads_markers_and_languages(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("text\n```python\nx = 1\n```\n```bash\nrm -rf /\n```\n<!-- skip: needs CUDA -->\n"
                    "```python\ny = x.cuda()\n```\n", encoding="utf-8")
    blocks = extract_blocks(page, root=tmp_path)
    assert [(b.line, b.source, b.skip) for b in blocks] == [(2, "x = 1\n", None), (9, "y = x.cuda()\n", "needs CUDA")]


# ---------------------------------------------------------------- API reference
def test_api_reference_builds_without_warnings(tmp_path: Path) -> None:
    """docs/api (Sphinx autodoc + napoleon) builds with -W: a renamed argument cannot leave it stale."""
    pytest.importorskip("sphinx")
    out = tmp_path / "html"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d", str(tmp_path / "doctrees"),
         str(ROOT / "docs" / "api"), str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "AccumulatingOptimizer" in html and "accumulation_steps" in html
    shutil.rmtree(out, ignore_errors=True)

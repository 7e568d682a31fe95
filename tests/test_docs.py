"""Every snippet of the README and docs/usage.md runs as written, on the real screen in ../shared/data.

The Python blocks of one page run in order in one namespace, as a reader
runs them one after another in a notebook; shell blocks run with bash. Both
run in a fresh directory beside a ``shared/data`` link to the data folder, so
that the pages' paths (``../shared/data/papalexi2021_eccite.h5ad``, from the
repository root) resolve as they do for a reader of the repository. A block
that cannot run here says why in a comment on the line before it:
``<!-- not run: needs a SLURM cluster -->``. The README's quick start (its
install line and its ``pertscale run`` line) is what .ci/run and
tests/test_cli.py run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DATA_DIR, ROOT, real_path

BLOCK = re.compile(
    r"(?:<!-- not run: (?P<why>[^>]+?) -->\s*\n)?^```(?P<lang>python|bash)\n(?P<code>.*?)^```", re.S | re.M
)


def blocks(page: str) -> list[tuple[str, str, str | None, int]]:
    """``(language, code, reason not run, line)`` for each fenced Python or bash block of a page."""
    text = (ROOT / page).read_text()
    return [(m["lang"], m["code"], m["why"], text.count("\n", 0, m.start("code")) + 1) for m in BLOCK.finditer(text)]


@pytest.fixture()
def reader_dir(tmp_path, monkeypatch) -> Path:
    """A directory where ``../shared/data`` is the data folder, as it is from the repository root."""
    real_path("papalexi")  # skips, with the reason, when the data are absent
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(DATA_DIR.resolve(), target_is_directory=True)
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_every_block_that_is_not_run_says_why():
    for page in ("README.md", "docs/usage.md"):
        text = (ROOT / page).read_text()
        fences = len(re.findall(r"^```(?:python|bash)\n", text, flags=re.M))
        assert fences == len(blocks(page)) > 0, page
        assert all(why is None or len(why.split()) >= 2 for _, _, why, _ in blocks(page)), page


@pytest.mark.parametrize("page", ["README.md", "docs/usage.md"])
def test_python_snippets_run_as_written(page, reader_dir):
    namespace: dict = {"__name__": "__snippets__"}
    ran = 0
    for lang, code, why, line in blocks(page):
        if lang != "python" or why is not None:
            continue
        try:
            exec(compile(code, f"{page}, block at line {line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{page}: the Python block at line {line} fails: {type(err).__name__}: {err}") from err
        ran += 1
    assert ran > 0


def test_shell_snippets_run_as_written(reader_dir):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    ran = 0
    for lang, code, why, line in blocks("docs/usage.md"):
        if lang != "bash" or why is not None:
            continue
        done = subprocess.run(["bash", "-e", "-c", code], cwd=reader_dir, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"docs/usage.md: the bash block at line {line} fails:\n{done.stderr[-3000:]}"
        ran += 1
    assert ran > 0


@pytest.mark.slow  # ~1 min each; tests/test_face.py runs a short script both ways in the default suite
@pytest.mark.parametrize("how", ["a script without a main guard", "python - (stdin)"])
def test_readme_first_python_block_runs_as_a_plain_script(how, reader_dir):
    """The README's analysis, as scanpy users run such code: a file without a main guard, or ``python -``."""
    code = next(code for lang, code, why, _ in blocks("README.md") if lang == "python" and why is None)
    if how.startswith("a script"):
        (reader_dir / "analysis.py").write_text(code)
        cmd, stdin = [sys.executable, "analysis.py"], None
    else:
        cmd, stdin = [sys.executable, "-"], code
    done = subprocess.run(cmd, input=stdin, cwd=reader_dir, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README's first Python block, run as {how}, fails:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr and "Nanny failed" not in done.stderr, done.stderr[-3000:]
    about_scheduler = [line for line in done.stderr.splitlines() if "threads" in line or "scheduler" in line]
    assert len(about_scheduler) <= 1, done.stderr[-3000:]
    assert (reader_dir / "de_wilcoxon.zarr").is_dir()  # the snippet's write happened

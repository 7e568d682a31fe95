"""The documentation site builds with warnings as errors, and its tutorials run.

The build is the one CI and Read the Docs make (``sphinx-build -W --keep-going
-b html docs ...``; myst-nb executes the notebooks, a cell that raises fails
it), on a copy of ``docs/`` (and ``benchmarks/RESULTS.md``, which the
benchmarks page includes) in a temporary directory, so that autosummary's
generated pages and the notebooks' outputs never land in the working tree.
The real screen comes from the same folder as the other tests' (``DATA_DIR``,
passed to the notebooks as ``$PERTSCALE_DATA``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import DATA_DIR, ROOT, real_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# what the site needs besides pertscale (the `docs` extra); scanpy for neighbors/UMAP and the scanpy how-to
NEEDS = ("sphinx", "myst_nb", "numpydoc", "sphinx_book_theme", "scanpy")


def _embedded_pngs(page: Path) -> list[Path]:
    """The PNG files a built page shows in ``<img>`` tags (myst-nb writes notebook figures to ``_images/``)."""
    sources = re.findall(r'<img[^>]+src="([^"]+\.png)"', page.read_text())
    return [(page.parent / src).resolve() for src in sources]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built from a copy of docs/; returns the HTML folder."""
    for module in NEEDS:
        pytest.importorskip(module, reason=f"the docs build needs {module} (pip install -e '.[docs,embedding]')")
    real_path("papalexi")  # the tutorial reads the real screen; skips, with the reason, when it is absent
    base = tmp_path_factory.mktemp("docs_site")
    repo = base / "repo"
    shutil.copytree(
        ROOT / "docs",
        repo / "docs",
        ignore=shutil.ignore_patterns("_build", "generated", ".jupyter_cache", "jupyter_execute", ".ipynb_checkpoints"),
    )
    (repo / "benchmarks").mkdir()
    shutil.copy2(ROOT / "benchmarks" / "RESULTS.md", repo / "benchmarks" / "RESULTS.md")
    html = base / "html"
    env = {**os.environ, "PERTSCALE_DATA": str(DATA_DIR.resolve())}
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-D", "nb_execution_mode=force"]
    start = time.perf_counter()
    done = subprocess.run(
        [*command, str(repo / "docs"), str(html)], cwd=repo, env=env, capture_output=True, text=True, timeout=1500
    )
    seconds = time.perf_counter() - start
    log = done.stdout + done.stderr
    (base / "sphinx.log").write_text(log)
    warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    shown = "\n".join(warnings[-40:] or [log[-4000:]])
    assert done.returncode == 0, f"sphinx-build -W failed after {seconds:.0f} s:\n{shown}"
    print(f"docs site built in {seconds:.0f} s")
    return html


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_site_has_its_pages(site):
    for page in ("index", "installation", "quickstart", "concepts", "api", "usage", "design", "benchmarks"):
        assert (site / f"{page}.html").is_file(), page
    for page in ("local-cluster", "slurm", "resume", "choosing-a-test", "scanpy"):
        assert (site / "how-to" / f"{page}.html").is_file(), page
    # the included pages keep their content: the usage page's generated table, the benchmark tables
    assert "pvals_adj" in (site / "usage.html").read_text()
    assert "Wilcoxon rank-sum, every perturbation against control" in (site / "benchmarks.html").read_text()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_api_reference_is_generated_from_the_docstrings(site):
    import inspect

    import pertscale as ps

    page = site / "generated" / "pertscale.pl.volcano.html"
    assert page.is_file()
    html = page.read_text()
    assert 'id="pertscale.pl.volcano"' in html
    text = re.sub(r"<[^>]+>", " ", html)
    assert "Parameters" in text and "Returns" in text  # numpydoc rendered its sections
    # every argument of the function is documented on its page (numpydoc's parameter list, from the docstring)
    entries = re.findall(r"<dt><strong>([^<]+)</strong>", html)  # "pval_threshold" or "ax, save, show"
    documented = {name.strip().lstrip("*") for entry in entries for name in entry.split(",")}
    missing = [name for name in inspect.signature(ps.pl.volcano).parameters if name not in documented]
    assert not missing, f"ps.pl.volcano's page does not document {missing}"
    for name in ("pertscale.read", "pertscale.run", "pertscale.tl.rank_genes_groups", "pertscale.WilcoxonSettings"):
        assert (site / "generated" / f"{name}.html").is_file(), name


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tutorials_were_executed_with_figures(site):
    for page, least in (("tutorials/papalexi", 6), ("tutorials/larger_than_memory", 2), ("how-to/scanpy", 2)):
        html = site / f"{page}.html"
        text = html.read_text()
        assert 'class="cell_output' in text, f"{page} has no cell outputs: it was not executed"
        pngs = _embedded_pngs(html)
        assert len(pngs) >= least, f"{page} shows {len(pngs)} figures, expected at least {least}"
        for png in pngs:
            assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC, png
            assert png.stat().st_size > 5_000, f"{png} is too small to hold a figure"

"""`pertscale simulate`: a screen with known effects written from the command line, and the README's no-data start.

The screens are checked with anndata and numpy on the stored counts, not
with pertscale's readers: shape and labels, the recorded effects against
the counts' own means, and the main job's calls against the recorded truth.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import pertscale as ps
from pertscale.cli import main

from .conftest import ROOT

#: a small screen: 1,500 cells x 120 genes, 6 perturbations, 300 control cells
SMALL = ["--cells", "1500", "--genes", "120", "--perturbations", "6", "--control-fraction", "0.2", "--seed", "3"]


def _simulate(out, *args):
    return CliRunner().invoke(main, ["simulate", str(out), *args, "--no-progress"])


def _same_counts(a: ad.AnnData, b: ad.AnnData) -> bool:
    return (
        a.X.shape == b.X.shape
        and np.array_equal(a.X.indptr, b.X.indptr)
        and np.array_equal(a.X.indices, b.X.indices)
        and np.array_equal(a.X.data, b.X.data)
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def small_screen(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("simulate") / "small.h5ad"
    result = _simulate(path, *SMALL)
    assert result.exit_code == 0, result.output
    return path, result.output


def test_writes_the_requested_screen_and_says_what(small_screen):
    path, output = small_screen
    adata = ad.read_h5ad(path)
    assert adata.shape == (1_500, 120) and adata.X.format == "csr" and adata.X.dtype == np.int32
    labels = adata.obs["perturbation"].astype(str)
    assert sorted(set(labels)) == ["P0000", "P0001", "P0002", "P0003", "P0004", "P0005", "control"]
    assert (labels == "control").sum() == 300  # --control-fraction 0.2 of 1,500
    assert adata.var_names.is_unique and adata.obs_names.is_unique
    sim = adata.uns["simulation"]
    assert sim["log2_effects"].shape == (6, 120) and len(sim["targets"]) == 6
    # each perturbed cell carries its perturbation's target
    target_of = dict(zip(sim["perturbations"], sim["targets"], strict=True))
    perturbed = labels != "control"
    assert (adata.obs["target_gene"].astype(str)[perturbed] == labels[perturbed].map(target_of)).all()
    # the summary: the numbers of the file, and where the truth is
    assert "cells: 1,500 (300 control" in output and "genes: 120" in output and "perturbations: 6" in output
    assert f"non-zero counts: {adata.X.nnz:,}" in output
    assert f"({path.stat().st_size / 2**20:,.1f} MiB)" in output
    assert "uns['simulation']['log2_effects']" in output and "ps.datasets.known_effects" in output
    assert f"next: pertscale run {path}" in output


def test_same_seed_same_counts_in_either_format_and_any_jobs(small_screen, tmp_path):
    path, _ = small_screen
    first = ad.read_h5ad(path)
    assert _simulate(tmp_path / "again.h5ad", *SMALL).exit_code == 0
    assert _simulate(tmp_path / "again.zarr", *SMALL).exit_code == 0
    other = [*SMALL[:-1], "4"]  # --seed 4
    assert _simulate(tmp_path / "other.h5ad", *other).exit_code == 0
    assert _same_counts(first, ad.read_h5ad(tmp_path / "again.h5ad"))
    zarr_copy = ad.read_zarr(tmp_path / "again.zarr")
    assert _same_counts(first, zarr_copy)
    pd.testing.assert_frame_equal(first.obs, zarr_copy.obs)
    assert not _same_counts(first, ad.read_h5ad(tmp_path / "other.h5ad"))
    # more cells than one block (5,000), so --jobs 2 simulates in two worker processes
    big = ["--cells", "5600", "--genes", "40", "--perturbations", "3", "--seed", "9"]
    assert _simulate(tmp_path / "serial.h5ad", *big).exit_code == 0
    assert _simulate(tmp_path / "parallel.h5ad", *big, "--jobs", "2").exit_code == 0
    assert _same_counts(ad.read_h5ad(tmp_path / "serial.h5ad"), ad.read_h5ad(tmp_path / "parallel.h5ad"))


def test_recorded_effects_match_the_counts(small_screen):
    path, _ = small_screen
    adata = ad.read_h5ad(path)
    sim = adata.uns["simulation"]
    x = adata.X.toarray().astype(np.float64)
    share = x / x.sum(axis=1, keepdims=True)  # each gene's share of the cell's counts: library size out
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    control = share[labels == "control"].mean(axis=0)
    truth, measured = [], []
    for i, (pert, target) in enumerate(zip(sim["perturbations"], sim["targets"], strict=True)):
        mean = share[labels == pert].mean(axis=0)
        j = adata.var_names.get_loc(target)
        assert sim["log2_effects"][i, j] < 0  # recorded as a knock-down ...
        assert mean[j] < control[j]  # ... and lower in the perturbed cells than in control
        changed = np.flatnonzero(sim["log2_effects"][i])
        truth.extend(sim["log2_effects"][i, changed])
        measured.extend(np.log2(mean[changed] / control[changed]))
    truth, measured = np.asarray(truth), np.asarray(measured)
    strong = np.abs(truth) > 1
    assert strong.sum() >= 10 and (np.sign(measured[strong]) == np.sign(truth[strong])).all()
    assert np.corrcoef(truth, measured)[0, 1] > 0.8  # the recorded sizes, not only directions
    # the table lists exactly the non-zero recorded effects
    table = ps.datasets.known_effects(path)
    rows, cols = np.nonzero(sim["log2_effects"])
    assert len(table) == len(rows) == 6 * 11  # target + 10 other genes each
    pairs = zip(rows, cols, strict=True)
    expected = {(sim["perturbations"][r], adata.var_names[c]): sim["log2_effects"][r, c] for r, c in pairs}
    got = {(p, g): v for p, g, v in zip(table["perturbation"], table["gene"], table["log2_effect"], strict=True)}
    assert got.keys() == expected.keys()
    assert np.allclose([got[k] for k in expected], list(expected.values()))
    targets = table[table["is_target"]]
    assert list(targets["gene"]) == list(sim["targets"]) and (targets["log2_effect"] < 0).all()


def test_refuses_an_existing_out_unless_overwrite(tmp_path):
    path = tmp_path / "s.h5ad"
    assert _simulate(path, *SMALL).exit_code == 0
    before = _sha256(path)
    result = _simulate(path, *SMALL[:-1], "4")
    assert result.exit_code != 0 and "already exists" in result.output and "--overwrite" in result.output
    assert _sha256(path) == before
    result = _simulate(path, *SMALL[:-1], "4", "--overwrite")
    assert result.exit_code == 0, result.output
    assert _sha256(path) != before and ad.read_h5ad(path).uns["simulation"]["seed"] == 4
    # a directory that is not a zarr store is never replaced, even with --overwrite
    folder = tmp_path / "mine.zarr"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    result = _simulate(folder, *SMALL, "--overwrite")
    assert result.exit_code != 0 and "not a zarr store" in result.output
    assert (folder / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.zarr", "s.h5ad"]  # no temporary left


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--cells", "0"], "--cells"),
        (["--perturbations", "-1"], "--perturbations"),
        (["--genes", "0"], "--genes"),
        (["--control-fraction", "1.5"], "--control-fraction"),
        (["--control-fraction", "nan"], "--control-fraction"),
        (["--cells", "2"], "--cells"),  # all control: no cell left for the perturbations
        (["--jobs", "0"], "--jobs"),
        (["--seed", "-3"], "--seed"),
    ],
)
def test_refuses_bad_numbers_naming_the_option(tmp_path, args, flag):
    result = _simulate(tmp_path / "s.h5ad", *args)
    assert result.exit_code != 0 and flag in result.output, result.output
    assert "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


def test_refuses_an_unknown_format(tmp_path):
    result = _simulate(tmp_path / "s.csv", *SMALL)
    assert result.exit_code != 0 and ".h5ad" in result.output and ".zarr" in result.output
    assert not list(tmp_path.iterdir())


def test_main_job_on_the_simulated_screen_finds_the_knock_downs(tmp_path):
    """The README's no-data start at a small size (the slow test below runs it as written), and its check."""
    path = tmp_path / "sim.h5ad"
    args = ["--cells", "3000", "--genes", "200", "--perturbations", "10", "--seed", "11"]
    assert _simulate(path, *args).exit_code == 0
    out = tmp_path / "results" / "sim"
    run = ["run", str(path), "--perturbation-column", "perturbation", "--control-label", "control"]
    result = CliRunner().invoke(main, [*run, "--out", str(out), "--scheduler", "synchronous", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "perturbations tested: 10" in result.output
    res = ad.read_h5ad(out / "de_wilcoxon.h5ad")
    sim = ad.read_h5ad(path).uns["simulation"]
    found = 0
    for pert, target in zip(sim["perturbations"], sim["targets"], strict=True):
        row, col = res.obs_names.get_loc(pert), res.var_names.get_loc(target)
        found += res.layers["pvals_adj"][row, col] < 0.05 and res.layers["logfoldchanges"][row, col] < 0
    assert found >= 8  # the target significant and lower in most perturbations
    # the README's check against the truth, on this screen: it counts the same knock-downs
    _, python = _readme_no_data_blocks()
    printed = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert f"knock-downs found: {found} of 10" in printed.stdout, printed.stdout


def _readme_no_data_blocks() -> tuple[str, str]:
    """The bash block and the Python check of the README's "A start without our data"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## A start without our data", 1)[1].split("\n## ", 1)[0]
    bash = re.search(r"^```bash\n(.*?)^```", section, re.S | re.M)
    python = re.search(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert bash and python, "README.md: the no-data start lost its commands or its check"
    return bash[1], python[1]


@pytest.mark.slow  # ~10-20 s: two commands and a Python start in subprocesses at the README's 20,000 cells
def test_readme_no_data_start_runs_as_written(tmp_path):
    """The README's two commands as written (20,000 cells), then its check against the truth."""
    bash, python = _readme_no_data_blocks()
    assert bash.splitlines()[0].startswith("pertscale simulate sim.h5ad")
    assert bash.splitlines()[1].startswith("pertscale run sim.h5ad")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-e", "-c", bash], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"README's no-data start fails:\n{done.stderr[-3000:]}"
    assert "cells: 20,000 (2,000 control" in done.stdout and "perturbations tested: 50" in done.stdout
    printed = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr[-3000:]
    # what the README says of this screen: every knock-down found, about half of the other effects
    knock = re.search(r"knock-downs found: (\d+) of (\d+)", printed.stdout)
    other = re.search(r"other effects found: (\d+) of (\d+)", printed.stdout)
    assert knock and other, printed.stdout
    assert knock[1] == knock[2] == "50"
    assert int(other[2]) == 500 and 0.35 < int(other[1]) / 500 < 0.7

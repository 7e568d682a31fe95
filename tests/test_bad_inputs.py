"""Bad and awkward inputs: every one ends in a clear error or a correct result, and no input changes.

Each case builds a tiny input, runs the command line (or the Python API) on
it, and asserts the exit code (or exception type), a fragment of the
message that names the problem or the fix, that the input's checksum is
unchanged and that a failed run leaves no output directory behind. Cases
marked ``early`` must fail before any pass over the matrix: a guard makes
every computation raise, so a late check fails the test.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import dask
import dask.array as da
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from click.testing import CliRunner

import pertscale as ps
from pertscale.cli import main

from .conftest import assert_close

# ---------------------------------------------------------------- inputs


def checksum(path: Path) -> str:
    """sha256 over a file, or over every file (relative path and bytes) of a directory."""
    h = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny() -> ad.AnnData:
    """400 cells x 40 genes, 100 control cells, four perturbations of 67-82 cells, random cell order."""
    a = ps.datasets.simulate_screen(400, 40, 4, control_fraction=0.25, seed=3, n_affected=3)
    del a.uns["simulation"]
    return a


def write_zarr(adata: ad.AnnData, path: Path, *, chunks: int | None = 2_000, fmt: int = 3) -> Path:
    """A zarr store as anndata writes it, with 1-d arrays cut into ``chunks``-long chunks."""
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    with ad.settings.override(auto_shard_zarr_v3=False):
        ad.io.write_elem(group, "/", adata, dataset_kwargs={"chunks": (chunks,)} if chunks else {})
    return path


def h5ad(adata: ad.AnnData, path: Path) -> Path:
    adata.write_h5ad(path)
    return path


def with_labels(adata: ad.AnnData, mapping: dict) -> ad.AnnData:
    a = adata.copy()
    labels = a.obs["perturbation"].astype(str)
    a.obs["perturbation"] = labels.replace(mapping).to_numpy()
    return a


def with_value(adata: ad.AnnData, value: float) -> ad.AnnData:
    a = adata.copy()
    a.X = a.X.astype(np.float32)
    a.X.data[7] = value
    return a


def garble(path: Path, offset: int, n: int = 64) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(range(n)))


def first_chunk_offset(path: Path, dataset: str) -> int:
    with h5py.File(path, "r") as f:
        return f[dataset].id.get_chunk_info(0).byte_offset


# ---------------------------------------------------------------- the command line


@dataclass
class Case:
    """One bad or awkward input for ``pertscale run``."""

    build: object  # (tmp_path, tiny) -> (input path, extra args, out path)
    exit_code: int
    message: str  # regex searched in the output
    early: bool = False  # must fail before any pass over the matrix
    check: object = None  # (tmp_path, out) -> None, more assertions on a success
    extra: list = field(default_factory=list)


def _plain(tmp, tiny, *args):
    return h5ad(tiny, tmp / "in.h5ad"), list(args), tmp / "out"


def _zarr_in(tmp, tiny, *args, fmt=3):
    return write_zarr(tiny, tmp / "in.zarr", fmt=fmt), list(args), tmp / "out"


def _zarr_out_is_input(tmp, tiny):
    store = write_zarr(tiny, tmp / "in.zarr")
    return store, [], store


def _zarr_out_inside(tmp, tiny):
    store = write_zarr(tiny, tmp / "in.zarr")
    return store, [], store / "results"


def _zarr_out_symlink(tmp, tiny, sub=""):
    store = write_zarr(tiny, tmp / "in.zarr")
    (tmp / "link").symlink_to(store, target_is_directory=True)
    return store, [], tmp / "link" / sub if sub else tmp / "link"


def _h5ad_named_like_output(tmp, tiny):
    (tmp / "d").mkdir()
    return h5ad(tiny, tmp / "d" / "de_wilcoxon.h5ad"), [], tmp / "d"


def _h5ad_symlinked_dir(tmp, tiny):
    (tmp / "d").mkdir()
    path = h5ad(tiny, tmp / "d" / "de_wilcoxon.h5ad")
    (tmp / "alias").symlink_to(tmp / "d", target_is_directory=True)
    return path, [], tmp / "alias"


def _out_is_file(tmp, tiny):
    (tmp / "out.txt").write_text("x")
    return h5ad(tiny, tmp / "in.h5ad"), [], tmp / "out.txt"


def _out_has_results(tmp, tiny):
    """An --out holding the results of an earlier run (recorded in its manifest)."""
    path = h5ad(tiny, tmp / "in.h5ad")
    ps.run(path, tmp / "out", perturbation_column="perturbation", control_label="control", scheduler="synchronous")
    return path, [], tmp / "out"


def _out_has_results_overwrite(tmp, tiny):
    path, _, out = _out_has_results(tmp, tiny)
    return path, ["--overwrite"], out


def _dangling_out(tmp, tiny):
    (tmp / "gone").symlink_to(tmp / "nowhere")
    return h5ad(tiny, tmp / "in.h5ad"), [], tmp / "gone"


def _out_locked(tmp, tiny):
    import fcntl

    (tmp / "out").mkdir()
    lock = open(tmp / "out" / ".pertscale.lock", "a")  # noqa: SIM115 - held for the test's lifetime
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _HELD.append(lock)
    return h5ad(tiny, tmp / "in.h5ad"), [], tmp / "out"


_HELD: list = []  # locks held by another "run" during a test


def _out_unwritable(tmp, tiny):
    (tmp / "blocker").write_text("x")
    return h5ad(tiny, tmp / "in.h5ad"), [], tmp / "blocker" / "sub"


def _zarr_missing(name: str, key: str):
    def build(tmp, tiny):
        store = write_zarr(tiny, tmp / "in.zarr", chunks=2_000 if name != "indptr" else 100)
        os.remove(store / "X" / name / key)
        return store, [], tmp / "out"

    return build


def _zarr_sharded_missing_shard(tmp, tiny):
    group = zarr.open_group(str(tmp / "in.zarr"), mode="w", zarr_format=3)
    ad.io.write_elem(group, "/", tiny, dataset_kwargs={"chunks": (1_000,), "shards": (4_000,)})
    os.remove(tmp / "in.zarr" / "X" / "data" / "c" / "1")
    return tmp / "in.zarr", [], tmp / "out"


def _zarr_v2_missing_data(tmp, tiny):
    store = write_zarr(tiny, tmp / "in.zarr", fmt=2)
    os.remove(store / "X" / "data" / "3")
    return store, [], tmp / "out"


def _zarr_corrupt_chunk(tmp, tiny):
    store = write_zarr(tiny, tmp / "in.zarr")
    (store / "X" / "data" / "c" / "2").write_bytes(b"not a zstd frame" * 20)
    return store, [], tmp / "out"


def _h5ad_truncated(tmp, tiny):
    path = h5ad(tiny, tmp / "in.h5ad")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path, [], tmp / "out"


def _h5ad_corrupt_chunk(tmp, tiny):
    path = tmp / "in.h5ad"
    tiny.write_h5ad(path, compression="gzip")
    garble(path, first_chunk_offset(path, "X/data") + 4)
    return path, [], tmp / "out"


def _h5ad_corrupt_header(tmp, tiny):
    path = h5ad(tiny, tmp / "in.h5ad")
    with h5py.File(path, "r") as f:
        offset = h5py.h5o.get_info(f["obs"].id).addr  # the object header of the obs group
    garble(path, offset, 256)
    return path, [], tmp / "out"


def _not_hdf5(tmp, tiny):
    (tmp / "in.h5ad").write_text("cell,gene,count\n")
    return tmp / "in.h5ad", [], tmp / "out"


def _missing_file(tmp, tiny):
    return tmp / "nope.h5ad", [], tmp / "out"


def _dir_not_zarr(tmp, tiny):
    (tmp / "in.zarr").mkdir()
    (tmp / "in.zarr" / "notes.txt").write_text("x")
    return tmp / "in.zarr", [], tmp / "out"


def _plain_hdf5(tmp, tiny):
    with h5py.File(tmp / "in.h5", "w") as f:
        f["matrix"] = np.ones((3, 3))
    return tmp / "in.h5", [], tmp / "out"


def _x_only_in_layers(tmp, tiny):
    a = ad.AnnData(obs=tiny.obs, var=tiny.var, layers={"counts": tiny.X})
    return h5ad(a, tmp / "in.h5ad"), [], tmp / "out"


def _x_only_in_raw(tmp, tiny):
    a = tiny.copy()
    a.raw = a
    a.X = None
    return h5ad(a, tmp / "in.h5ad"), [], tmp / "out"


def _raw_and_normalized_x(tmp, tiny):
    a = tiny.copy()
    a.raw = a
    a.X = a.X.astype(np.float32)
    a.X.data = np.log1p(a.X.data)
    return h5ad(a, tmp / "in.h5ad"), ["--use-raw"], tmp / "out"


def _layer_and_raw(tmp, tiny):
    a = tiny.copy()
    a.raw = a
    a.layers["counts"] = a.X.copy()
    return h5ad(a, tmp / "in.h5ad"), ["--use-raw", "--layer", "counts"], tmp / "out"


def _zero(axis: int):
    def build(tmp, tiny):
        a = tiny[:0].copy() if axis == 0 else tiny[:, :0].copy()
        return h5ad(a, tmp / "in.h5ad"), [], tmp / "out"

    return build


def _labels(mapping, *args):
    def build(tmp, tiny):
        return h5ad(with_labels(tiny, mapping), tmp / "in.h5ad"), list(args), tmp / "out"

    return build


def _one_control_cell(tmp, tiny):
    a = tiny.copy()
    labels = a.obs["perturbation"].astype(str).to_numpy()
    control = np.flatnonzero(labels == "control")
    labels[control[1:]] = "unassigned"
    a.obs["perturbation"] = labels
    return h5ad(a, tmp / "in.h5ad"), [], tmp / "out"


def _missing_labels(tmp, tiny):
    a = tiny.copy()
    labels = a.obs["perturbation"].astype(object).to_numpy()
    labels[:5] = np.nan
    a.obs["perturbation"] = pd.Categorical(labels)
    return h5ad(a, tmp / "in.h5ad"), [], tmp / "out"


def _value(value):
    def build(tmp, tiny):
        return h5ad(with_value(tiny, value), tmp / "in.h5ad"), [], tmp / "out"

    return build


def _normalized(tmp, tiny):
    a = tiny.copy()
    a.X = a.X.astype(np.float32)
    a.X.data = np.log1p(a.X.data)
    return h5ad(a, tmp / "in.h5ad"), [], tmp / "out"


def _duplicate_genes(tmp, tiny):
    a = tiny.copy()
    names = a.var_names.to_numpy().copy()
    names[5] = names[4]
    names[9] = names[4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata's own note about repeated names
        a.var_names = names
    return h5ad(a, tmp / "in.h5ad"), [], tmp / "out"


def _all_zero_matrix(tmp, tiny):
    a = tiny.copy()
    a.X = sp.csr_matrix(a.shape, dtype=np.int32)
    return h5ad(a, tmp / "in.h5ad"), [], tmp / "out"


def _results_equal_to_default(kind: str):
    """On success: the results equal a default run on the same counts (computed here, independently)."""

    def check(tmp, out):
        res = ad.read_h5ad(out / "de_wilcoxon.h5ad")
        ref_out = tmp / "reference"
        ref_in = tmp / "reference.h5ad"
        if kind == "raw":
            a = ad.read_h5ad(tmp / "in.h5ad")
            ad.AnnData(X=a.raw.X, obs=a.obs, var=a.raw.var).write_h5ad(ref_in)
        else:
            shutil.copy(tmp / "in.h5ad", ref_in)
        result = CliRunner().invoke(main, _args(ref_in, ref_out))
        assert result.exit_code == 0, result.output
        ref = ad.read_h5ad(ref_out / "de_wilcoxon.h5ad")
        assert list(res.obs_names) == list(ref.obs_names) and list(res.var_names) == list(ref.var_names)
        for layer in ref.layers:
            assert_close(res.layers[layer], ref.layers[layer], rtol=1e-12, err_msg=layer)

    return check


def _overwritten(tmp, out):
    assert ad.read_h5ad(out / "de_wilcoxon.h5ad").n_obs == 4
    assert ad.read_zarr(out / "de_wilcoxon.zarr").n_obs == 4
    expected = ["de_wilcoxon.h5ad", "de_wilcoxon.parquet", "de_wilcoxon.zarr", "de_wilcoxon_effects.csv"]
    expected += ["de_wilcoxon_knockdown.csv", "de_wilcoxon_significant.csv", "knockdown_cells.parquet", "qc.csv"]
    expected += ["qc_cells.zarr", "report.html", "run.json", "working_store.zarr"]
    assert sorted(p.name for p in out.iterdir()) == [".pertscale-manifest.json", *expected]


def _unique_genes(tmp, out):
    res = ad.read_h5ad(out / "de_wilcoxon.h5ad")
    assert res.var_names.is_unique
    repeated = res.var["original_var_name"].value_counts()
    assert repeated.max() == 3  # the three cells of one name are told apart, and can be traced back


CASES = {
    # writing into the input
    "out-is-the-zarr-input": Case(_zarr_out_is_input, 1, r"would overwrite the input", early=True),
    "out-inside-the-zarr-input": Case(_zarr_out_inside, 1, r"lies inside the input", early=True),
    "out-symlink-to-the-zarr-input": Case(_zarr_out_symlink, 1, r"would overwrite the input", early=True),
    "out-symlink-inside-the-zarr-input": Case(
        lambda t, a: _zarr_out_symlink(t, a, "sub"), 1, r"lies inside the input", early=True
    ),
    "out-file-is-the-h5ad-input": Case(_h5ad_named_like_output, 1, r"would overwrite the input", early=True),
    "out-symlinked-dir-holds-the-h5ad-input": Case(_h5ad_symlinked_dir, 1, r"would overwrite the input", early=True),
    "out-is-a-file": Case(_out_is_file, 1, r"is a file, not a directory", early=True),
    "out-has-earlier-results": Case(_out_has_results, 1, r"already holds results.*--overwrite", early=True),
    "out-has-earlier-results-overwrite": Case(
        _out_has_results_overwrite, 0, r"perturbations tested: 4", check=_overwritten
    ),
    "out-not-writable": Case(_out_unwritable, 1, r"cannot write to output directory.*writable --out", early=True),
    # damaged stores
    "zarr-v3-missing-data-chunk": Case(
        _zarr_missing("data", "c/3"), 1, r"incomplete.*'X/data/c/3'.*write or copy it again", early=True
    ),
    "zarr-v3-missing-indices-chunk": Case(
        _zarr_missing("indices", "c/0"), 1, r"incomplete.*'X/indices/c/0'", early=True
    ),
    "zarr-v3-missing-indptr-chunk": Case(
        _zarr_missing("indptr", "c/2"), 1, r"broken row pointer.*write or copy it again", early=True
    ),
    "zarr-v3-sharded-missing-shard": Case(
        _zarr_sharded_missing_shard,
        1,
        r"incomplete: 1 chunk\(s\) of its data array are missing \('X/data/c/1'\)",
        early=True,
    ),
    "zarr-v2-missing-data-chunk": Case(_zarr_v2_missing_data, 1, r"incomplete.*'X/data/3'", early=True),
    "zarr-corrupt-chunk": Case(
        _zarr_corrupt_chunk, 1, r"cannot read rows .* of X in .*in\.zarr.*data chunks? [^)]*'c/2'.*damaged"
    ),
    "h5ad-truncated": Case(_h5ad_truncated, 1, r"truncated or damaged", early=True),
    "h5ad-corrupt-chunk": Case(_h5ad_corrupt_chunk, 1, r"cannot read rows .* of X in .*in\.h5ad.*damaged"),
    "h5ad-corrupt-header": Case(_h5ad_corrupt_header, 1, r"truncated or damaged|not an AnnData store", early=True),
    "not-hdf5": Case(_not_hdf5, 1, r"not an AnnData store.*not an HDF5 file", early=True),
    "missing-file": Case(_missing_file, 1, r"no such file or directory", early=True),
    "directory-not-zarr": Case(_dir_not_zarr, 1, r"not an AnnData store", early=True),
    "hdf5-not-anndata": Case(_plain_hdf5, 1, r"not an AnnData store.*no 'obs'", early=True),
    "zarr-v2-input": Case(lambda t, a: _zarr_in(t, a, fmt=2), 0, r"perturbations tested: 4"),
    # where the matrix is
    "matrix-only-in-layers": Case(
        _x_only_in_layers, 1, r"stores no X.*layers\['counts'\] \(--layer counts", early=True
    ),
    "matrix-only-in-raw": Case(_x_only_in_raw, 1, r"stores no X.*raw\.X \(--use-raw", early=True),
    "use-raw-reads-raw-counts": Case(
        _raw_and_normalized_x, 0, r"perturbations tested: 4", check=_results_equal_to_default("raw")
    ),
    "layer-and-use-raw": Case(_layer_and_raw, 1, r"either layer= \(--layer\) or use_raw", early=True),
    "layer-missing": Case(
        lambda t, a: _plain(t, a, "--layer", "nope"), 1, r"layer 'nope' not found.*omit --layer", early=True
    ),
    "use-raw-without-raw": Case(lambda t, a: _plain(t, a, "--use-raw"), 1, r"has no raw matrix", early=True),
    "zero-cells": Case(_zero(0), 1, r"has no cells \(n_obs = 0", early=True),
    "zero-genes": Case(_zero(1), 1, r"has no genes \(n_vars = 0", early=True),
    # numbers
    "target-sum-inf": Case(
        lambda t, a: _plain(t, a, "--target-sum", "inf"),
        2,
        r"target_sum \(--target-sum\) must be a finite number",
        early=True,
    ),
    "target-sum-nan": Case(lambda t, a: _plain(t, a, "--target-sum", "nan"), 2, r"must be a finite number", early=True),
    "target-sum-zero": Case(lambda t, a: _plain(t, a, "--target-sum", "0"), 2, r"must be > 0", early=True),
    "target-sum-negative": Case(lambda t, a: _plain(t, a, "--target-sum", "-5"), 2, r"must be > 0", early=True),
    "min-genes-negative": Case(lambda t, a: _plain(t, a, "--min-genes", "-1"), 2, r"--min-genes.*>=0", early=True),
    "min-cells-fraction": Case(
        lambda t, a: _plain(t, a, "--min-cells", "2.5"), 2, r"--min-cells.*not a valid integer", early=True
    ),
    "chunk-size-zero": Case(lambda t, a: _plain(t, a, "--chunk-size", "0"), 2, r"--chunk-size.*>=1", early=True),
    "min-cells-per-perturbation-one": Case(
        lambda t, a: _plain(t, a, "--min-cells-per-perturbation", "1"),
        2,
        r"--min-cells-per-perturbation.*>=2",
        early=True,
    ),
    "chunk-size-7-unsorted": Case(
        lambda t, a: _plain(t, a, "--chunk-size", "7"),
        0,
        r"perturbations tested: 4",
        check=_results_equal_to_default("x"),
    ),
    "unknown-scheduler": Case(
        lambda t, a: _plain(t, a, "--scheduler", "gpu"), 1, r"scheduler 'gpu' is not known", early=True
    ),
    "unknown-corr-method": Case(
        lambda t, a: _plain(t, a, "--corr-method", "holm"), 2, r"'holm' is not one of", early=True
    ),
    # labels
    "column-missing": Case(
        lambda t, a: _plain(t, a, "--perturbation-column", "guide"),
        1,
        r"'guide' not found in obs; columns present",
        early=True,
    ),
    "control-label-missing": Case(
        lambda t, a: _plain(t, a, "--control-label", "NT"), 1, r"control_label 'NT' not found.*labels seen", early=True
    ),
    "labels-missing": Case(_missing_labels, 1, r"5 missing labels.*'unassigned'", early=True),
    "one-control-cell": Case(_one_control_cell, 1, r"only 1 cell\(s\) labelled 'control'.*at least 2", early=True),
    "all-cells-control": Case(
        _labels({"P0000": "control", "P0001": "control", "P0002": "control", "P0003": "control"}),
        1,
        r"every cell .* is labelled 'control'.*no perturbation to test",
        early=True,
    ),
    "all-perturbations-excluded": Case(
        _labels({}, "--exclude-labels", "P0000,P0001,P0002,P0003"),
        1,
        r"no perturbation to test.*--exclude-labels",
        early=True,
    ),
    "control-excluded": Case(
        _labels({}, "--exclude-labels", "control"), 1, r"--exclude-labels includes the control label", early=True
    ),
    "groups-too-small": Case(
        lambda t, a: _plain(t, a, "--min-cells-per-perturbation", "500"),
        1,
        r"even before filtering.*lower --min-cells-per-perturbation",
        early=True,
    ),
    "empty-label": Case(_labels({"P0001": ""}), 1, r"cannot name a result.*''.*rename them", early=True),
    "blank-label": Case(_labels({"P0001": "   "}), 1, r"cannot name a result.*'   '", early=True),
    "label-dtype": Case(
        _labels({"P0001": "dtype"}), 1, r"cannot be written to \.h5ad: 'dtype'.*Rename them", early=True
    ),
    "label-reserved-index": Case(_labels({"P0001": "_index"}), 1, r"cannot be written.*'_index'", early=True),
    "label-with-slash": Case(_labels({"P0001": "P0000/P0002"}), 1, r"'P0000/P0002' \('/' separates groups", early=True),
    "dangling-symlink-out": Case(_dangling_out, 1, r"symbolic link to a missing path", early=True),
    "out-locked-by-another-run": Case(_out_locked, 1, r"another pertscale run is writing to --out", early=True),
    "relabelled-and-excluded": Case(_labels({"P0001": "unassigned"}), 0, r"perturbations tested: 3"),
    # values
    "nan-value": Case(_value(np.nan), 1, r"1 NaN and 0 infinite values.*remove or impute"),
    "inf-value": Case(_value(np.inf), 1, r"0 NaN and 1 infinite values"),
    "negative-value": Case(_value(-3.0), 1, r"1 negative values.*raw counts.*--layer counts"),
    "normalized-values": Case(_normalized, 1, r"looks normalized already.*--layer counts or --use-raw"),
    "all-zero-matrix": Case(_all_zero_matrix, 1, r"0 control cell\(s\) left after filtering.*lower --min-genes"),
    "duplicate-gene-names": Case(
        _duplicate_genes, 0, r"warning: 1 gene name\(s\) occur more than once", check=_unique_genes
    ),
}


def _args(path, out, *extra, scheduler="synchronous"):
    args = ["run", str(path), "--perturbation-column", "perturbation", "--control-label", "control"]
    return [*args, "--out", str(out), "--scheduler", scheduler, "--no-progress", *extra]


def _forbid_passes(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a pass over the matrix ran before this error was raised")

    monkeypatch.setattr(dask, "compute", forbidden)
    monkeypatch.setattr(da.Array, "compute", forbidden)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_bad_input(name, tiny, tmp_path, monkeypatch):
    case = CASES[name]
    path, extra, out = case.build(tmp_path, tiny)
    before = checksum(path) if path.exists() else None
    out_existed = out.exists()
    if case.early:
        _forbid_passes(monkeypatch)
    try:
        result = CliRunner().invoke(main, _args(path, out, *extra))
    finally:
        monkeypatch.undo()
        while _HELD:
            _HELD.pop().close()
    assert result.exit_code == case.exit_code, f"{result.output}\n{result.exception!r}"
    assert re.search(case.message, result.output, flags=re.DOTALL), result.output
    assert "Traceback" not in result.output
    if before is not None:
        assert checksum(path) == before, "the input changed"
    if case.exit_code != 0:
        assert out.exists() == out_existed, "a failed run left an output directory behind"
        if out.is_dir() and not out.is_symlink():
            assert not any(p.name.startswith(".pertscale-run-") for p in out.iterdir()), "staging left behind"
    if case.check is not None:
        case.check(tmp_path, out)


# ---------------------------------------------------------------- the Python API


@pytest.fixture()
def tiny_h5ad(tiny, tmp_path) -> Path:
    return h5ad(tiny, tmp_path / "tiny.h5ad")


def _prepared(adata):
    adata = adata.copy()
    ps.pp.normalize_total(adata)
    ps.pp.log1p(adata)
    return adata


def _rank(adata, **kwargs):
    return ps.compute(
        ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control", **kwargs),
        scheduler="synchronous",
    )


def _mixed_int_and_str(tiny):
    a = _prepared(tiny)
    labels = a.obs["perturbation"].astype(object).to_numpy()
    labels[labels == "P0000"] = 1
    labels[labels == "P0001"] = "1"
    a.obs["perturbation"] = labels
    return _rank(a)


API_CASES = {
    "read-chunk-size-zero": (
        lambda t, p: ps.read(p, chunk_size=0),
        ValueError,
        r"chunk_size \(--chunk-size\) must be >= 1",
    ),
    "read-chunk-size-fraction": (lambda t, p: ps.read(p, chunk_size=2.5), ValueError, r"must be a whole number"),
    "read-chunk-size-bool": (lambda t, p: ps.read(p, chunk_size=True), TypeError, r"must be a number"),
    "read-chunk-size-str": (lambda t, p: ps.read(p, chunk_size="100"), TypeError, r"must be a number, got '100'"),
    "read-layer-and-raw": (lambda t, p: ps.read(p, layer="x", use_raw=True), ValueError, r"either layer="),
    "normalize-target-sum-inf": (
        lambda t, p: ps.pp.normalize_total(ps.read(p), target_sum=float("inf")),
        ValueError,
        r"target_sum \(--target-sum\) must be a finite number",
    ),
    "normalize-target-sum-nan": (
        lambda t, p: ps.pp.normalize_total(ps.read(p), target_sum=float("nan")),
        ValueError,
        r"must be a finite number",
    ),
    "normalize-target-sum-negative": (
        lambda t, p: ps.pp.normalize_total(ps.read(p), target_sum=-1),
        ValueError,
        r"must be > 0",
    ),
    "filter-cells-nan": (
        lambda t, p: ps.pp.filter_cells(ps.read(p), min_genes=float("nan")),
        ValueError,
        r"min_genes must be a finite",
    ),
    "filter-cells-fraction": (lambda t, p: ps.pp.filter_cells(ps.read(p), min_genes=1.5), ValueError, r"whole number"),
    "filter-cells-two-bounds": (
        lambda t, p: ps.pp.filter_cells(ps.read(p), min_genes=1, max_genes=5),
        ValueError,
        r"exactly one of min_genes",
    ),
    "filter-genes-negative": (
        lambda t, p: ps.pp.filter_genes(ps.read(p), min_cells=-1),
        ValueError,
        r"min_cells must be >= 0",
    ),
    "filter-genes-inf-counts": (
        lambda t, p: ps.pp.filter_genes(ps.read(p), max_counts=float("inf")),
        ValueError,
        r"max_counts must be a finite",
    ),
    "filter-perturbations-min-cells-nan": (
        lambda t, p: ps.pp.filter_perturbations(
            ps.read(p),
            perturbation_column="perturbation",
            control_label="control",
            min_cells_per_perturbation=float("nan"),
        ),
        ValueError,
        r"min_cells_per_perturbation must be a finite",
    ),
    "rank-min-cells-zero": (
        lambda t, p: _rank(_prepared(t), min_cells_per_perturbation=0),
        ValueError,
        r"min_cells_per_perturbation must be >= 1",
    ),
    "rank-labels-collide-as-text": (
        lambda t, p: _mixed_int_and_str(t),
        ValueError,
        r"different values but the same text: 1 \(int\) and '1' \(str\)",
    ),
    "rank-empty-label": (
        lambda t, p: _rank(_prepared(with_labels(t, {"P0002": ""}))),
        ValueError,
        r"cannot name a result",
    ),
    "rank-nul-label": (
        lambda t, p: _rank(_prepared(with_labels(t, {"P0002": "a\x00b"}))),
        ValueError,
        r"NUL character",
    ),
    "rank-all-control": (
        lambda t, p: _rank(_prepared(with_labels(t, {f"P000{i}": "control" for i in range(4)}))),
        ValueError,
        r"every cell .* is labelled 'control'",
    ),
    "rank-perturbation-unknown": (
        lambda t, p: _rank(_prepared(t), perturbations=["P0009"]),
        ValueError,
        r"perturbations not found.*'P0009'",
    ),
    "run-target-sum-inf": (
        lambda t, p: _run(p, target_sum=float("inf")),
        ValueError,
        r"target_sum \(--target-sum\) must be a finite number",
    ),
    "run-min-genes-negative": (
        lambda t, p: _run(p, min_genes=-1),
        ValueError,
        r"min_genes \(--min-genes\) must be >= 0",
    ),
    "run-chunk-size-nan": (
        lambda t, p: _run(p, chunk_size=float("nan")),
        ValueError,
        r"chunk_size \(--chunk-size\) must be a finite",
    ),
    "settings-memory-fraction": (lambda t, p: setattr(ps.settings, "memory_fraction", 0), ValueError, r"must be > 0"),
    "settings-n-workers": (lambda t, p: setattr(ps.settings, "n_workers", 0), ValueError, r"n_workers must be >= 1"),
    "write-over-the-input": (
        lambda t, p: ps.write(ps.read(p), p),
        ValueError,
        r"would overwrite the input.*choose a path outside",
    ),
    "write-into-the-zarr-input": (
        lambda t, p: (ps.read(p.with_suffix(".zarr")), ps.write(t, p.with_suffix(".zarr") / "sub.h5ad")),
        ValueError,
        r"lies inside the input",
    ),
    "write-over-the-dir-holding-the-input": (
        lambda t, p: ps.write(ps.read(p), p.parent),
        ValueError,
        r"would replace the directory that holds the input",
    ),
}


def t_out(path: Path) -> Path:
    return path.parent / "out"


def _run(path: Path, **options):
    return ps.run(path, t_out(path), perturbation_column="perturbation", control_label="control", **options)


@pytest.mark.parametrize("name", sorted(API_CASES))
def test_api_bad_input(name, tiny, tiny_h5ad, monkeypatch):
    call, error, message = API_CASES[name]
    if name.startswith("write-into"):
        write_zarr(tiny, tiny_h5ad.with_suffix(".zarr"))
    before = checksum(tiny_h5ad)
    _forbid_passes(monkeypatch)  # every one of these is refused before any pass over the matrix
    settings = (ps.settings.memory_fraction, ps.settings.n_workers)
    with pytest.raises(error, match=message):
        call(tiny, tiny_h5ad)
    assert (ps.settings.memory_fraction, ps.settings.n_workers) == settings  # a refused setting is not kept
    assert checksum(tiny_h5ad) == before
    assert not t_out(tiny_h5ad).exists()


def test_api_read_refuses_a_missing_chunk(tiny, tmp_path):
    store = write_zarr(tiny, tmp_path / "in.zarr")
    os.remove(store / "X" / "data" / "c" / "1")
    before = checksum(store)
    with pytest.raises(ps.io.DamagedStoreError, match=r"incomplete.*'X/data/c/1'") as err:
        ps.read(store)
    assert isinstance(err.value, ValueError)
    assert checksum(store) == before


def test_api_labels_of_one_kind_are_not_collisions(tiny):
    # integers alone, or numpy and Python integers mixed, are one label each: no false alarm
    a = _prepared(tiny)
    codes = {"control": 0, "P0000": 1, "P0001": 2, "P0002": 3, "P0003": 4}
    labels = [codes[v] for v in a.obs["perturbation"].astype(str)]
    a.obs["perturbation"] = np.array([np.int64(v) if i % 2 else v for i, v in enumerate(labels)], dtype=object)
    res = ps.tl.rank_genes_groups(a, perturbation_column="perturbation", control_label=0)
    assert list(res.obs_names) == ["1", "2", "3", "4"]


def test_api_single_string_is_one_label(tiny, tiny_h5ad):
    a = ps.read(tiny_h5ad)
    kept = ps.pp.filter_perturbations(
        a, perturbation_column="perturbation", control_label="control", exclude_labels="P0001"
    )
    table = kept.uns["pertscale"]["perturbation_filter"]
    assert table.loc["P0001", "reason"] == "excluded" and (table["reason"] == "excluded").sum() == 1
    assert "P0001" not in set(kept.obs["perturbation"].astype(str))
    res = _rank(_prepared(tiny), perturbations="P0002")
    assert list(res.obs_names) == ["P0002"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # expm1 of raw counts overflows: the wrong fold changes warned of
def test_api_raw_counts_warn(tiny):
    with pytest.warns(UserWarning, match=r"holds integers: raw counts.*ps\.pp\.normalize_total.*ps\.pp\.log1p"):
        _rank(tiny.copy())
    floats = tiny.copy()
    floats.X = floats.X.astype(np.float32)
    with pytest.warns(UserWarning, match=r"not marked as log1p data.*uns\['log1p'\]"):
        _rank(floats)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _rank(_prepared(tiny))  # log1p data: no warning


def test_api_duplicate_gene_names_stay_distinguishable(tiny):
    a = _prepared(tiny)
    names = a.var_names.to_numpy().copy()
    names[3] = names[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a.var_names = names
    with pytest.warns(UserWarning, match=r"1 gene name\(s\) occur more than once.*original_var_name"):
        res = _rank(a)
    assert res.var_names.is_unique and res.n_vars == a.n_vars
    assert res.var["original_var_name"].iloc[3] == names[2]


@pytest.mark.parametrize("chunk_size", [1, 13, 150])
def test_api_small_chunks_on_unsorted_input(tiny, tiny_h5ad, chunk_size):
    # the main job's issue: chunks far below the largest group used to fail inside dask's shuffle
    ref = _rank(_prepared(tiny))
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # 400 one-row blocks draw the "many blocks" warning only above 10,000
        got = _rank(_prepared(ps.read(tiny_h5ad, chunk_size=chunk_size)))
    for layer in ref.layers:
        assert_close(got.layers[layer], ref.layers[layer], rtol=1e-12, err_msg=layer)


def test_api_many_blocks_warn(tmp_path):
    a = ps.datasets.simulate_screen(12_000, 5, 2, seed=1, n_affected=1)
    path = h5ad(a, tmp_path / "wide.h5ad")
    with pytest.warns(UserWarning, match=r"12,000 row blocks.*Omit --chunk-size"):
        ps.read(path, chunk_size=1)


def test_api_legitimately_omitted_chunks_are_read(tmp_path):
    # zarr leaves out chunks that hold only the fill value: here every column index is 0
    x = sp.csr_matrix(np.c_[np.ones((40, 1)), np.zeros((40, 19))].astype(np.float32))
    for fmt in (2, 3):
        path = write_zarr(ad.AnnData(x), tmp_path / f"col0-v{fmt}.zarr", chunks=None, fmt=fmt)
        assert not any((path / "X" / "indices").rglob("0"))  # the chunk really is absent
        got = ps.read(path).X.compute(scheduler="synchronous")
        assert (got != x).nnz == 0


def test_api_explicit_zero_chunk_is_refused_with_the_fix(tmp_path):
    x = sp.csr_matrix((np.zeros(40, dtype=np.float32), np.arange(40) % 20, np.arange(41)), shape=(40, 20))
    path = write_zarr(ad.AnnData(x), tmp_path / "zeros.zarr", chunks=None)
    with pytest.raises(ps.io.DamagedStoreError, match=r"data array are missing.*X\.eliminate_zeros\(\)"):
        ps.read(path)


def test_api_h5ad_written_element_by_element_is_read(tiny, tmp_path):
    # ad.io.write_elem stores raw=None as a "null" placeholder dataset
    path = tmp_path / "elem.h5ad"
    with h5py.File(path, "w") as f:
        ad.io.write_elem(f, "/", tiny)
    a = ps.read(path)
    assert (a.X.compute(scheduler="synchronous") != tiny.X).nnz == 0
    with h5py.File(path, "a") as f:
        del f["X"]
    with pytest.raises(ValueError, match=r"not an AnnData store.*no 'X', no layers and no raw"):
        ps.read(path)


def test_api_tidy_threshold_is_checked(tiny):
    res = _rank(_prepared(tiny))
    with pytest.raises(ValueError, match=r"max_pval_adj must be a finite number"):
        ps.tl.tidy(res, max_pval_adj=float("nan"))
    with pytest.raises(ValueError, match=r"max_pval_adj must be >= 0 and <= 1"):
        ps.tl.tidy(res, max_pval_adj=5)


def test_more_perturbations_than_scanpy_uns_holds(tmp_path):
    # scanpy's record arrays stop fitting an HDF5 object header past ~1,100 perturbations: the main job
    # says so before any pass and writes every statistic in the layers
    a = ps.datasets.simulate_screen(4_000, 20, 4, control_fraction=0.1, seed=2, n_affected=0)
    del a.uns["simulation"]
    labels = a.obs["perturbation"].astype(str).to_numpy()
    others = np.flatnonzero(labels != "control")
    labels[others] = [f"G{i % 1_300:04d}" for i in range(others.size)]  # 1,300 groups of 2-3 cells
    a.obs["perturbation"] = labels
    path = h5ad(a, tmp_path / "wide.h5ad")
    extra = ["--min-cells-per-perturbation", "2", "--min-genes", "0", "--min-cells", "0"]
    result = CliRunner().invoke(main, _args(path, tmp_path / "out", *extra))
    assert result.exit_code == 0, result.output
    assert "de_wilcoxon.h5ad is not written" in result.output and "about 1,100" in result.output
    assert not (tmp_path / "out" / "de_wilcoxon.h5ad").exists()
    res = ad.read_zarr(tmp_path / "out" / "de_wilcoxon.zarr")
    tested = (a.obs["perturbation"].value_counts().drop("control") >= 2).sum()
    assert res.n_obs == tested > 1_100 and "rank_genes_groups" not in res.uns
    assert np.isfinite(res.layers["pvals"]).any()


def test_commit_restores_earlier_results_when_a_move_fails(tiny, tmp_path, monkeypatch):
    path, _, out = _out_has_results(tmp_path, tiny)
    earlier = {p.name: checksum(p) for p in out.iterdir()}
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        if Path(dst) == out / "qc.csv" and Path(src).parent.name != "previous":  # the new qc.csv moved in
            raise OSError("disk went away")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        ps.run(
            path,
            out,
            perturbation_column="perturbation",
            control_label="control",
            overwrite=True,
            scheduler="synchronous",
        )
    monkeypatch.undo()
    assert any(str(c).endswith("de_wilcoxon.h5ad") for c in calls)  # the first move had happened
    assert {p.name: checksum(p) for p in out.iterdir()} == earlier  # and was undone, the manifest unchanged


# ---------------------------------------------------------------- whole processes: Ctrl-C and worker errors


def _subprocess_run(path, out, *extra, verbose=False, **popen):
    cmd = [
        sys.executable,
        "-m",
        "pertscale.cli",
        *(["-v"] if verbose else []),
        *_args(path, out, *extra, scheduler="local"),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.cluster
def test_ctrl_c_ends_quietly_with_130_and_no_output(tmp_path):
    import threading

    path = ps.datasets.simulate_screen(40_000, 1_000, 60, seed=5, path=tmp_path / "screen.h5ad")
    before = checksum(path)
    out = tmp_path / "out"
    proc = _subprocess_run(path, out, "--chunk-size", "500", verbose=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read_stderr():
        for line in proc.stderr:
            lines.append(line)
            if "Dask dashboard" in line:  # logged once the LocalCluster is up and the first pass starts
                ready.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    assert ready.wait(120), "".join(lines)
    time.sleep(1.0)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    proc.wait(timeout=120)
    reader.join(10)
    stderr = "".join(lines)
    assert proc.returncode == 130, stderr
    assert "interrupted: no results were written" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert not list(out.glob("de_wilcoxon*")) and not (out / "qc.csv").exists()
    assert checksum(path) == before
    # the run can be run again: the working store is resumed or reused, not trusted when incomplete
    again = _subprocess_run(path, out, "--chunk-size", "500")
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert ad.read_zarr(out / "de_wilcoxon.zarr").n_obs == 60


@pytest.mark.cluster
def test_sigterm_cleans_up_exits_143_and_leaves_no_process(tmp_path):
    import psutil

    path = ps.datasets.simulate_screen(30_000, 800, 40, seed=6, path=tmp_path / "screen.h5ad")
    out = tmp_path / "out"
    proc = _subprocess_run(path, out, "--chunk-size", "1000", start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "working_store.zarr" / "blocks").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the sort has started: workers are running
    time.sleep(0.5)
    group = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == proc.pid]
    assert len(group) >= 3, "expected the client, the fork server and workers"
    os.killpg(proc.pid, signal.SIGTERM)  # as a batch system ending the job
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "terminated: no results were written" in stderr and "Traceback" not in stderr, stderr
    assert not list(out.glob("de_wilcoxon*")) and not list(out.glob(".pertscale-run-*"))
    time.sleep(2)
    left = [p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {[p.cmdline() for p in left]}"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


@pytest.mark.cluster
def test_ctrl_c_while_the_cluster_starts(tiny, tmp_path):
    path = h5ad(tiny, tmp_path / "in.h5ad")
    out = tmp_path / "out"
    proc = _subprocess_run(path, out, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (out.exists() and any(out.glob(".pertscale-run-*"))) and time.monotonic() < deadline:
        time.sleep(0.01)  # the staging directory appears just before the first pass starts the cluster
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "interrupted: no results were written", stderr
    assert not list(out.glob("de_wilcoxon*")) if out.exists() else True


@pytest.mark.cluster
def test_worker_error_is_one_line_without_worker_tracebacks(tiny, tmp_path):
    path, _, out = _zarr_corrupt_chunk(tmp_path, tiny)
    proc = _subprocess_run(path, out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: cannot read rows"), stderr
    assert not out.exists()


def test_ctrl_c_swallowed_by_a_finalizer_still_stops_the_run(tiny, tmp_path, monkeypatch):
    # Python drops an exception raised while it runs a finalizer ("Exception ignored in ..."): a Ctrl-C that
    # arrives then must still stop the run before its results are committed, and print nothing of it
    import weakref

    path = h5ad(tiny, tmp_path / "in.h5ad")
    before = checksum(path)
    original = ps.tl.write_significant  # the job's last step before the commit: ps.tl's public table writer

    def interrupted_in_a_finalizer(*args, **kwargs):
        class Obj:
            pass

        obj = Obj()
        ref = weakref.ref(obj, lambda _: os.kill(os.getpid(), signal.SIGINT) or sum(range(10_000)))
        del obj  # the callback runs, the handler raises inside it, Python swallows the KeyboardInterrupt
        assert ref() is None
        return original(*args, **kwargs)

    monkeypatch.setattr(ps.tl, "write_significant", interrupted_in_a_finalizer)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, _args(path, out, scheduler="synchronous"))
    assert result.exit_code == 130, result.output
    assert "interrupted: no results were written" in result.output
    assert "Exception ignored" not in result.output
    assert not list(out.glob("de_wilcoxon*")) and not (out / "qc.csv").exists() if out.exists() else True
    assert checksum(path) == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the command's handlers are undone

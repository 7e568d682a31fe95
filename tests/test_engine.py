"""The engine at scale: lazy results, the working store, block-by-block results, the plan.

References are independent: scipy's Mann-Whitney U, scanpy, and the same
test on the matrix in memory; every array type and every scheduler must give
the same statistics.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from click.testing import CliRunner
from scipy import stats

import pertscale as ps
from pertscale.cli import main

from .conftest import assert_close

LAYERS = ("scores", "pvals", "pvals_adj", "logfoldchanges", "pts", "pts_rest", "u_statistic")


@pytest.fixture(scope="module")
def screen():
    """2,000 cells x 120 genes, 9 perturbations, random order."""
    return ps.datasets.simulate_screen(2_000, 120, 9, control_fraction=0.2, seed=4, n_affected=8)


def _lognorm(adata):
    ps.pp.normalize_total(adata)
    ps.pp.log1p(adata)
    return adata


def _results(adata, scheduler="synchronous"):
    return ps.compute(
        ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control"), scheduler=scheduler
    )


def _same(a, b):
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    for layer in LAYERS:
        np.testing.assert_array_equal(a.layers[layer], b.layers[layer], err_msg=layer)


# ------------------------------------------------------------------ array types x schedulers


def _as(kind, screen, tmp_path):
    if kind == "csr-memory":
        return screen.copy()
    if kind == "dense-memory":
        a = screen.copy()
        a.X = a.X.toarray()
        return a
    if kind == "dask-dense":
        a = screen.copy()
        a.X = da.from_array(a.X.toarray(), chunks=(333, 120))
        return a
    a = screen.copy()
    if kind == "csc-h5ad":
        a.X = sp.csc_matrix(a.X)
    if kind == "dense-h5ad":
        a.X = a.X.toarray()
    path = tmp_path / ("s.zarr" if kind == "zarr" else "s.h5ad")
    ps.write(a, path)
    return ps.read(path, chunk_size=451)


@pytest.fixture(scope="module")
def reference(screen):
    return _results(_lognorm(screen.copy()))


@pytest.mark.parametrize(
    "kind", ["csr-memory", "dense-memory", "dask-dense", "csr-h5ad", "csc-h5ad", "dense-h5ad", "zarr"]
)
def test_every_array_type_gives_the_same_results(kind, screen, reference, tmp_path):
    _same(_results(_lognorm(_as(kind, screen, tmp_path))), reference)


@pytest.mark.parametrize("scheduler", ["synchronous", "threads", "processes"])
def test_every_local_scheduler_gives_the_same_results(scheduler, screen, reference, tmp_path):
    _same(_results(_lognorm(_as("csr-h5ad", screen, tmp_path)), scheduler=scheduler), reference)


@pytest.mark.cluster
def test_distributed_gives_the_same_results_and_replicates_the_summary(
    screen, reference, tmp_path, cluster_client, monkeypatch
):
    adata = _lognorm(_as("zarr", screen, tmp_path))
    # the control summary goes to both workers before the pass (replicated, not fetched from one)
    holders = {}
    replicate = cluster_client.replicate

    def spy(futures, *args, **kwargs):
        replicate(futures, *args, **kwargs)
        holders.update(cluster_client.who_has(futures))

    monkeypatch.setattr(cluster_client, "replicate", spy)
    _same(_results(adata, scheduler=cluster_client), reference)
    from pertscale.tl._engine import SUMMARY_PREFIX

    assert holders and all(str(key).startswith(SUMMARY_PREFIX) for key in holders), holders
    assert all(len(workers) == 2 for workers in holders.values()), holders


@pytest.mark.parametrize("chunk_size", [37, 500, 2_000])
def test_results_do_not_depend_on_blocks(chunk_size, screen, reference, tmp_path):
    path = tmp_path / "s.h5ad"
    screen.write_h5ad(path)
    _same(_results(_lognorm(ps.read(path, chunk_size=chunk_size))), reference)


def test_equal_to_scipy_for_every_group(screen, reference):
    x = _lognorm(screen.copy()).X
    x = ps.compute(ad.AnnData(X=x)).X.toarray().astype(np.float64) if isinstance(x, da.Array) else x
    labels = screen.obs["perturbation"].astype(str).to_numpy()
    for g in reference.obs_names:
        r = stats.mannwhitneyu(x[labels == g], x[labels == "control"], method="asymptotic", use_continuity=False)
        defined = ~np.isnan(r.pvalue)
        assert_close(reference[g].layers["u_statistic"][0], r.statistic, rtol=0)
        assert_close(reference[g].layers["pvals"][0][defined], r.pvalue[defined], rtol=1e-10, err_msg=g)


# ------------------------------------------------------------------ laziness


def test_analyses_build_graphs_without_computing(screen, tmp_path, monkeypatch):
    path = tmp_path / "s.h5ad"
    screen.write_h5ad(path)

    def forbidden(*args, **kwargs):
        raise AssertionError("a computation ran while a graph was built")

    monkeypatch.setattr(dask, "compute", forbidden)
    monkeypatch.setattr(dask, "persist", forbidden)
    monkeypatch.setattr(da.Array, "compute", forbidden)
    monkeypatch.setattr(ps.cluster, "compute", forbidden)
    with dask.config.set(scheduler=forbidden):  # a stray .compute() with the default scheduler fails too
        a = ps.read(path, chunk_size=300)
        ps.pp.normalize_total(a)
        ps.pp.log1p(a)
        res = ps.tl.rank_genes_groups(a, perturbation_column="perturbation", control_label="control")
        ds = ps.get.dataset(res)
    assert all(isinstance(res.layers[k], da.Array) for k in LAYERS)
    assert set(ds.data_vars) == set(LAYERS) and ds.sizes == {"perturbation": 9, "gene": 120}


def test_lazy_results_write_block_by_block_and_read_back(screen, reference, tmp_path):
    res = ps.tl.rank_genes_groups(_lognorm(screen.copy()), perturbation_column="perturbation", control_label="control")
    ps.write(res, tmp_path / "r.zarr", scheduler="synchronous")
    back = ad.read_zarr(tmp_path / "r.zarr")
    _same(back, reference)
    ds = ps.get.dataset(tmp_path / "r.zarr")
    assert isinstance(ds["pvals"].data, da.Array)  # lazily backed by the store
    g = reference.obs_names[2]
    np.testing.assert_array_equal(ds["pvals"].sel(perturbation=g).values, reference[g].layers["pvals"][0])
    assert ds.attrs["corr_method"] == "benjamini-hochberg" and ds["n_cells"].sel(perturbation=g) > 0


def test_significant_table_from_the_store_equals_tidy(screen, reference, tmp_path):
    ps.write(reference, tmp_path / "r.zarr")
    from pertscale.tl._results import write_significant

    counts = write_significant(tmp_path / "r.zarr", tmp_path / "sig.csv", max_pval_adj=0.05, rows_per_block=2)
    table = pd.read_csv(tmp_path / "sig.csv")
    expected = ps.tl.tidy(reference, max_pval_adj=0.05)
    key = ["perturbation", "gene"]
    merged = table.merge(expected, on=key, suffixes=("", "_ref"))
    assert len(table) == len(expected) == len(merged)
    assert_close(merged["pvals_adj"], merged["pvals_adj_ref"], rtol=1e-12)  # CSV keeps ~16 digits
    assert counts.to_dict() == expected.groupby("perturbation").size().reindex(counts.index, fill_value=0).to_dict()


# ------------------------------------------------------------------ the working store


def test_prepare_sorts_out_of_core_and_is_reused(screen, tmp_path):
    path = tmp_path / "s.h5ad"
    screen.write_h5ad(path)
    store = tmp_path / "sorted.zarr"
    kw = dict(out=store, chunk_size=300, exclude_labels=["P0004"])
    sorted_ = ps.io.prepare(path, perturbation_column="perturbation", control_label="control", **kw)
    labels = sorted_.obs["perturbation"].astype(str).to_numpy()
    assert labels[0] == "control" and "P0004" not in set(labels)
    runs = pd.Series(labels).ne(pd.Series(labels).shift()).sum()
    assert runs == len(set(labels))  # each label one contiguous run
    rows = sorted_.obs["input_row"].to_numpy()
    x = sorted_.X.compute(scheduler="synchronous")
    assert (x != screen.X[rows]).nnz == 0  # the same cells, moved
    # blocks hold whole groups
    bounds = np.cumsum((0,) + sorted_.X.chunks[0])
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    assert set(bounds[:-1]) <= set(starts) | set(np.flatnonzero(labels == "control"))
    # reused while the input is unchanged: nothing is read again
    mtime = (store / "pertscale_working_store.json").stat().st_mtime_ns
    again = ps.io.prepare(path, perturbation_column="perturbation", control_label="control", **kw)
    assert (store / "pertscale_working_store.json").stat().st_mtime_ns == mtime
    assert (again.X.compute(scheduler="synchronous") != x).nnz == 0


def test_prepare_rebuilds_when_the_input_changed_and_resumes_when_interrupted(screen, tmp_path):
    path = tmp_path / "s.h5ad"
    screen.write_h5ad(path)
    store = tmp_path / "sorted.zarr"
    kw = dict(out=store, chunk_size=300)
    first = ps.io.prepare(path, perturbation_column="perturbation", control_label="control", **kw).X.compute(
        scheduler="synchronous"
    )
    # an interrupted run: two blocks missing, the store marked incomplete
    info = json.loads((store / "pertscale_working_store.json").read_text())
    info["complete"] = False
    (store / "pertscale_working_store.json").write_text(json.dumps(info))
    for k in (1, 3):
        shutil.rmtree(store / "blocks" / str(k))
    kept = (store / "blocks" / "0" / "zarr.json").stat().st_mtime_ns
    resumed = ps.io.prepare(path, perturbation_column="perturbation", control_label="control", **kw)
    assert (store / "blocks" / "0" / "zarr.json").stat().st_mtime_ns == kept  # finished blocks not redone
    assert (resumed.X.compute(scheduler="synchronous") != first).nnz == 0
    # the input changes: never reused
    changed = screen.copy()
    changed.X = changed.X.copy()
    changed.X.data[:] = 1
    changed.write_h5ad(path)
    rebuilt = ps.io.prepare(path, perturbation_column="perturbation", control_label="control", **kw).X.compute(
        scheduler="synchronous"
    )
    assert (rebuilt != first).nnz > 0 and set(np.unique(rebuilt.data)) == {1}


def test_damaged_working_store_block_is_named(screen, tmp_path):
    path = tmp_path / "s.h5ad"
    screen.write_h5ad(path)
    sorted_ = ps.io.prepare(
        path, perturbation_column="perturbation", control_label="control", out=tmp_path / "w.zarr", chunk_size=300
    )
    shutil.rmtree(tmp_path / "w.zarr" / "blocks" / "2")
    with pytest.raises(ps.io.DamagedStoreError, match=r"block 2 of the working store.*written again when the run"):
        sorted_.X.compute(scheduler="synchronous")
    again = ps.io.prepare(
        path, perturbation_column="perturbation", control_label="control", out=tmp_path / "w.zarr", chunk_size=300
    )  # rebuilt
    fresh = ps.io.prepare(
        path, perturbation_column="perturbation", control_label="control", out=tmp_path / "fresh.zarr", chunk_size=300
    )
    assert (again.X.compute(scheduler="synchronous") != fresh.X.compute(scheduler="synchronous")).nnz == 0


# ------------------------------------------------------------------ the main job at many perturbations


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """10,000 cells x 40 genes, 1,600 perturbations of ~5 cells, 1,600 control cells, random order."""
    a = ps.datasets.simulate_screen(10_000, 40, 1_600, control_fraction=0.16, seed=9, n_affected=2)
    del a.uns["simulation"]
    path = tmp_path_factory.mktemp("wide") / "wide.h5ad"
    a.write_h5ad(path)
    return a, path


def test_main_job_with_1600_perturbations_reads_back_everywhere(wide, tmp_path):
    a, path = wide
    out = tmp_path / "out"
    args = ["run", str(path), "--perturbation-column", "perturbation", "--control-label", "control", "--out", str(out)]
    args += ["--min-cells-per-perturbation", "2", "--min-genes", "0", "--min-cells", "0", "--no-progress"]
    args += ["--scheduler", "threads", "--chunk-size", "700"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "de_wilcoxon.h5ad is not written" in result.output  # scanpy's view does not fit
    # AnnData
    res = ad.read_zarr(out / "de_wilcoxon.zarr")
    counts = a.obs["perturbation"].value_counts().drop("control")
    assert res.n_obs == int((counts >= 2).sum()) > 1_500
    # independent check of a few groups against scipy, on the same normalized values
    norm = a.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)  # the same float32 values the job tests (scanpy's arithmetic)
    sc.pp.log1p(norm)
    x = norm.X.toarray().astype(np.float64)
    labels = a.obs["perturbation"].astype(str).to_numpy()
    for g in res.obs_names[[0, 700, -1]]:
        r = stats.mannwhitneyu(x[labels == g], x[labels == "control"], method="asymptotic", use_continuity=False)
        defined = ~np.isnan(r.pvalue)
        assert_close(res[g].layers["pvals"][0][defined], r.pvalue[defined], rtol=1e-6, err_msg=g)
    # xarray, lazily
    ds = ps.get.dataset(out / "de_wilcoxon.zarr")
    assert ds.sizes["perturbation"] == res.n_obs
    np.testing.assert_array_equal(ds["scores"].isel(perturbation=5).values, res.layers["scores"][5])
    # scanpy, on a subset that fits its record arrays
    sub = res[:200].copy()
    ps.tl.scanpy_uns(sub)
    sub.write_h5ad(tmp_path / "sub.h5ad")
    back = ad.read_h5ad(tmp_path / "sub.h5ad")
    g = sub.obs_names[7]
    df = sc.get.rank_genes_groups_df(back, g).set_index("names").loc[sub.var_names]
    assert_close(df["pvals_adj"], sub[g].layers["pvals_adj"][0], rtol=1e-12)
    # the significant table agrees with the store
    sig = pd.read_csv(out / "de_wilcoxon_significant.csv")
    assert len(sig) == int((res.layers["pvals_adj"] < 0.05).sum())


# ------------------------------------------------------------------ the plan


def test_dry_run_prints_the_plan_and_writes_nothing(wide, tmp_path):
    _, path = wide
    out = tmp_path / "out"
    args = ["run", str(path), "--perturbation-column", "perturbation", "--control-label", "control", "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--dry-run", "--min-cells-per-perturbation", "2"])
    assert result.exit_code == 0, result.output
    for fragment in ("input: 10,000 cells x 40 genes", "blocks:", "peak memory per worker", "passes over the matrix"):
        assert fragment in result.output
    assert "sort into the working store" in result.output  # the cells are stored unsorted
    assert not out.exists()
    tight = CliRunner().invoke(main, [*args, "--memory-limit", "2MB", "--min-cells-per-perturbation", "2"])
    assert tight.exit_code == 1 and "does not fit" in tight.output and "--memory-limit" in tight.output
    assert not out.exists()


def test_plan_chooses_threads_for_small_inputs(wide):
    _, path = wide
    plan = ps.run(
        path,
        "unused",
        perturbation_column="perturbation",
        control_label="control",
        min_cells_per_perturbation=2,
        dry_run=True,
    )
    assert plan.scheduler == "threads" and plan.needs_sort and not plan.problems
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan.block_rows >= plan.largest_group
    assert os.path.basename("unused") == "unused" and not os.path.exists("unused")


def test_too_little_disk_is_refused_before_any_pass(wide, tmp_path, monkeypatch):
    import shutil as shutil_module

    _, path = wide
    real = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: real(p)._replace(free=1_000))
    args = ["run", str(path), "--perturbation-column", "perturbation", "--control-label", "control"]
    args += ["--out", str(tmp_path / "out"), "--min-cells-per-perturbation", "2", "--scheduler", "synchronous"]
    monkeypatch.setattr(dask, "compute", lambda *a, **k: pytest.fail("a pass ran before the disk was checked"))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "free but the working store and results need" in result.output
    assert "on a larger disk" in result.output and not (tmp_path / "out").exists()


def test_prepare_never_empties_a_directory_that_is_not_a_working_store(screen, tmp_path):
    path = tmp_path / "s.h5ad"
    screen.write_h5ad(path)
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(ValueError, match="is a directory that is not a working store.*never emptied"):
        ps.io.prepare(path, perturbation_column="perturbation", control_label="control", out=precious)
    assert (precious / "thesis.txt").read_text() == "do not delete"


def test_prepare_restarts_when_an_unfinished_store_has_other_blocks(screen, tmp_path):
    path = tmp_path / "s.h5ad"
    screen.write_h5ad(path)
    store = tmp_path / "w.zarr"
    ps.io.prepare(path, perturbation_column="perturbation", control_label="control", out=store, chunk_size=300)
    info = json.loads((store / "pertscale_working_store.json").read_text())
    info["complete"] = False  # interrupted, then run again with another memory plan (other blocks)
    (store / "pertscale_working_store.json").write_text(json.dumps(info))
    again = ps.io.prepare(path, perturbation_column="perturbation", control_label="control", out=store, chunk_size=700)
    rows = again.obs["input_row"].to_numpy()
    assert again.X.chunks[0] != tuple(np.diff(info["bounds"]))
    assert (again.X.compute(scheduler="synchronous") != screen.X[rows]).nnz == 0


def test_filters_keep_the_blocks_of_whole_groups(screen, tmp_path):
    path = tmp_path / "s.h5ad"
    screen.write_h5ad(path)
    sorted_ = ps.io.prepare(
        path, perturbation_column="perturbation", control_label="control", out=tmp_path / "w.zarr", chunk_size=300
    )
    with ps.cluster.using("synchronous"):
        kept = ps.pp.filter_cells(sorted_, min_genes=95)  # drops about a third
    assert kept.n_obs < sorted_.n_obs
    assert kept.X.numblocks == sorted_.X.numblocks  # each block filtered where it is, not re-blocked
    from pertscale.tl._engine import aligned, find_groups

    labels = kept.obs["perturbation"].astype(str)
    names = [g for g in pd.unique(labels.to_numpy()) if g != "control"]
    lay = aligned(kept.X, find_groups(labels, names, "control"))
    assert lay.sliced and all(c in kept.X.chunks[0] for c in lay.x.chunks[0])  # no data moved between blocks

"""QC summary, adaptive thresholds, and the filtered matrix streamed into .h5ad / .zarr.

References are computed independently on the matrix in memory: scanpy's
filters and QC metrics, numpy percentiles.
"""

from __future__ import annotations

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from dask.callbacks import Callback

import pertscale as ps
from pertscale.io._read import as_dask, subset
from pertscale.pp._qc_summary import ADAPTIVE_BOUNDS

from .conftest import assert_close

COL = "perturbation"
#: Thresholds under which every filter of the summary drops something on the simulated screen.
THRESHOLDS = {"min_genes": 215, "min_cells_per_perturbation": 110, "min_cells_per_gene": 1000}


@pytest.fixture(scope="module")
def screen(sim_adata, tmp_path_factory):
    """The simulated screen with some cells labelled 'multiple', in memory and as .h5ad."""
    a = sim_adata.copy()
    labels = a.obs[COL].astype(str).to_numpy().copy()
    labels[::37] = "multiple"
    a.obs[COL] = pd.Categorical(labels)
    path = tmp_path_factory.mktemp("qc") / "screen.h5ad"
    a.write_h5ad(path)
    return a, path


def _scanpy_filtered(a, *, control_label="control", exclude=("multiple",), **t):
    """The three filters with scanpy on the matrix in memory."""
    ref = a[~a.obs[COL].isin(exclude)].copy()
    sc.pp.filter_cells(ref, min_genes=t["min_genes"])
    counts = ref.obs[COL].astype(str).value_counts()
    keep = counts.index[(counts >= t["min_cells_per_perturbation"]) | (counts.index == control_label)]
    ref = ref[ref.obs[COL].astype(str).isin(keep)].copy()
    sc.pp.filter_genes(ref, min_cells=t["min_cells_per_gene"])
    return ref


def _summary(adata, *, scheduler="synchronous", **kwargs):
    options = {"perturbation_column": COL, "control_label": "control", "exclude_labels": ["multiple"]}
    with ps.cluster.using(scheduler):
        return ps.pp.qc_summary(adata, **(options | THRESHOLDS | kwargs))


@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
@pytest.mark.parametrize("chunk_size", [700, 3_000])
def test_qc_summary_equals_scanpy(screen, chunk_size, scheduler):
    a, path = screen
    s = _summary(ps.read(path, chunk_size=chunk_size), scheduler=scheduler)
    ref = _scanpy_filtered(a, **THRESHOLDS)
    assert list(a.obs_names[s.cell_mask]) == list(ref.obs_names)
    assert list(a.var_names[s.gene_mask]) == list(ref.var_names)
    np.testing.assert_array_equal(s.genes["n_cells_kept"].to_numpy()[s.gene_mask], ref.var["n_cells"])

    # the metrics, as scanpy computes them on all cells
    m = a.copy()
    m.var["mt"] = m.var_names.str.startswith("MT-")
    obs, var = sc.pp.calculate_qc_metrics(m, qc_vars=["mt"], percent_top=None, inplace=False)
    for col in ("n_genes_by_counts", "total_counts", "total_counts_mt", "pct_counts_mt"):
        assert_close(s.cells[col], obs[col], err_msg=col)
    for col in ("n_cells_by_counts", "total_counts", "mean_counts", "pct_dropout_by_counts"):
        assert_close(s.genes[col], var[col], err_msg=col)

    # why each item is dropped, counted independently
    labels = a.obs[COL].astype(str).to_numpy()
    n_genes = np.diff(sp.csr_matrix(a.X > 0).indptr)
    excluded = labels == "multiple"
    low = ~excluded & (n_genes < THRESHOLDS["min_genes"])
    small = ~excluded & ~low & ~a.obs_names.isin(ref.obs_names)
    expected = pd.Series("", index=a.obs_names, dtype=object)
    expected[excluded], expected[low], expected[small] = "excluded", "min_genes", "min_cells_per_perturbation"
    assert (s.cells["reason"] == expected).all()
    t = s.table
    assert t.loc["cells"].to_dict() == {
        "total": 3_000,
        "kept": ref.n_obs,
        "dropped": 3_000 - ref.n_obs,
        "excluded": int(excluded.sum()),
        "min_genes": int(low.sum()),
        "min_cells_per_perturbation": int(small.sum()),
        "min_cells_per_gene": 0,
    }
    assert t.loc["genes", "min_cells_per_gene"] == 300 - ref.n_vars > 0
    assert min(t.loc["cells", ["excluded", "min_genes", "min_cells_per_perturbation"]]) > 0  # each filter bites

    p = s.perturbations
    after = pd.Series(labels[~excluded & ~low]).value_counts()
    assert (p["n_cells"] == pd.Series(labels).value_counts().reindex(p.index)).all()
    assert (p["n_cells_min_genes"] == after.reindex(p.index, fill_value=0)).all()
    small_groups = set(after.index[(after < THRESHOLDS["min_cells_per_perturbation"]) & (after.index != "control")])
    assert small_groups and set(p.index[p["reason"] == "min_cells_per_perturbation"]) == small_groups
    assert p.loc["multiple", "reason"] == "excluded" and p.loc["control", "is_control"]
    assert (p["n_cells_kept"] == ref.obs[COL].astype(str).value_counts().reindex(p.index, fill_value=0)).all()
    assert (s.perturbation_mask == (p["reason"] == "")).all()

    text = repr(s)
    assert f"{ref.n_obs:,} of 3,000 cells" in text and "min_cells_per_perturbation=110" in text
    assert "'multiple'" in text and "(min_cells_per_perturbation)" in text


def test_control_is_never_dropped_for_its_size_and_memory_input(screen):
    a, _ = screen
    small = {"min_cells_per_perturbation": 300, "min_cells_per_gene": 100}
    lazy = _summary(ps.read(screen[1], chunk_size=1_000), scheduler="synchronous", **small)
    in_memory = _summary(a, scheduler="synchronous", **small)
    pd.testing.assert_frame_equal(lazy.cells, in_memory.cells)
    pd.testing.assert_frame_equal(lazy.genes, in_memory.genes)
    pd.testing.assert_frame_equal(lazy.perturbations, in_memory.perturbations)
    kept = lazy.perturbations.index[lazy.perturbation_mask]
    assert list(kept) == ["control"]  # every other group has fewer than 300 cells left; the control is kept
    ref = _scanpy_filtered(a, **(THRESHOLDS | small))
    assert list(a.obs_names[lazy.cell_mask]) == list(ref.obs_names)
    assert list(a.var_names[lazy.gene_mask]) == list(ref.var_names)


@pytest.mark.cluster
def test_qc_summary_on_distributed_scheduler(screen, cluster_client):
    path = screen[1]
    here = _summary(ps.read(path, chunk_size=500), scheduler="synchronous")
    there = _summary(ps.read(path, chunk_size=500), scheduler=cluster_client)
    pd.testing.assert_frame_equal(here.cells, there.cells)
    pd.testing.assert_frame_equal(here.genes, there.genes)
    out = ps.write(there.apply(ps.read(path, chunk_size=500)), path.parent / "dist.h5ad", scheduler=cluster_client)
    back = ad.read_h5ad(out)
    ref = _scanpy_filtered(screen[0], **THRESHOLDS)
    assert (sp.csr_matrix(back.X) != ref.X).nnz == 0


def test_apply_is_lazy_and_the_filtered_output_round_trips(screen, tmp_path, monkeypatch):
    a, path = screen
    lz = ps.read(path, chunk_size=600)
    s = _summary(lz, scheduler="synchronous")

    def forbidden(*args, **kwargs):
        raise AssertionError("apply computed something")

    with monkeypatch.context() as m:
        m.setattr(dask, "compute", forbidden)
        m.setattr(da.Array, "compute", forbidden)
        m.setattr(ps.cluster, "compute", forbidden)
        filtered = s.apply(lz)
    assert isinstance(filtered.X, da.Array)
    assert filtered.X.chunks[0] == tuple(int(s.cell_mask[i : i + 600].sum()) for i in range(0, 3_000, 600))
    ref = _scanpy_filtered(a, **THRESHOLDS)
    for name in ("f.h5ad", "f.zarr"):
        out = ps.write(filtered, tmp_path / name, scheduler="synchronous")
        back = ad.read_h5ad(out) if name.endswith("h5ad") else ad.read_zarr(out)
        assert back.X.dtype == a.X.dtype  # counts stay integers
        assert list(back.obs_names) == list(ref.obs_names) and list(back.var_names) == list(ref.var_names)
        assert (sp.csr_matrix(back.X) != ref.X).nnz == 0
        np.testing.assert_array_equal(back.obs["n_genes_by_counts"], ref.obs["n_genes"])
        np.testing.assert_array_equal(back.var["n_cells"], ref.var["n_cells"])
        table = back.uns["pertscale"]["qc_summary"]["perturbations"]
        assert list(table.index) == list(s.perturbations.index)
        assert back.uns["pertscale"]["qc_summary"]["min_genes"] == THRESHOLDS["min_genes"]
    with pytest.raises(ValueError, match="describes 3,000 cells x 300 genes.*apply it to the AnnData"):
        s.apply(a[:100])


# --- the streamed .h5ad write -------------------------------------------------------------------------


class _LargestResult(Callback):
    """Rows of the largest 2-D result of any task (synchronous and threaded schedulers)."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def _posttask(self, key, result, dsk, state, id):
        if getattr(result, "ndim", 0) == 2:
            self.rows = max(self.rows, result.shape[0])


@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
def test_h5ad_write_streams_row_blocks(sim_h5ad, sim_adata, tmp_path, scheduler):
    lz = ps.read(sim_h5ad, chunk_size=400)
    lz.layers["counts"] = lz.X  # the same blocks: read once for both
    ps.pp.normalize_total(lz, target_sum=1e4)
    with _LargestResult() as seen:
        out = ps.write(lz, tmp_path / "n.h5ad", scheduler=scheduler)
    assert 0 < seen.rows <= 400 < sim_adata.n_obs  # no task ever held more than one row block
    with _LargestResult() as whole:
        expected = lz.X.compute(scheduler="synchronous")
    assert whole.rows == sim_adata.n_obs  # the check sees a matrix computed whole
    back = ad.read_h5ad(out)
    assert sp.issparse(back.X) and back.X.dtype == np.float32 and back.layers["counts"].dtype == sim_adata.X.dtype
    assert (back.layers["counts"] != sim_adata.X).nnz == 0
    assert abs(back.X - expected).max() == 0
    ref = sim_adata.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    assert_close(back.X.toarray(), ref.X.toarray(), rtol=1e-6)
    assert back.obs.equals(sim_adata.obs) and back.var.equals(sim_adata.var)


def test_h5ad_write_streams_uneven_and_empty_blocks(sim_adata, sim_h5ad, tmp_path):
    lz = ps.read(sim_h5ad, chunk_size=500)
    rows = np.zeros(sim_adata.n_obs, dtype=bool)
    rows[1_100:1_700] = True  # blocks 0, 1 and 4, 5 empty
    part = subset(lz, obs_mask=rows, var_mask=np.arange(sim_adata.n_vars) % 3 > 0)
    assert part.X.chunks[0][0] == 0
    part.layers["rechunked"] = part.X.rechunk({0: 250})  # other row blocks than X
    part.layers["dense"] = part.X.map_blocks(lambda b: b.toarray(), dtype=part.X.dtype, meta=np.empty((0, 0)))
    ps.write(part, tmp_path / "p.h5ad", scheduler="synchronous")
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    expected = sim_adata.X[rows][:, np.arange(sim_adata.n_vars) % 3 > 0]
    assert (back.X != expected).nnz == 0 and (back.layers["rechunked"] != expected).nnz == 0
    np.testing.assert_array_equal(back.layers["dense"], expected.toarray())  # dense: computed, as before
    none = subset(lz, obs_mask=np.zeros(sim_adata.n_obs, dtype=bool))
    ps.write(none, tmp_path / "none.h5ad", scheduler="synchronous")
    assert ad.read_h5ad(tmp_path / "none.h5ad").shape == (0, sim_adata.n_vars)
    # in-memory X with a lazy layer
    mixed = sim_adata[:900].copy()
    mixed.layers["lazy"] = ps.read(sim_h5ad, chunk_size=300).X[:900]
    ps.write(mixed, tmp_path / "m.h5ad", scheduler="synchronous")
    back = ad.read_h5ad(tmp_path / "m.h5ad")
    assert (back.X != sim_adata.X[:900]).nnz == 0 and (back.layers["lazy"] != sim_adata.X[:900]).nnz == 0


# --- adaptive thresholds ------------------------------------------------------------------------------


def _expected_thresholds(a, percentile, *, rows=None, control=None):
    labels = a.obs[COL].astype(str)
    sizes = labels[labels != control].value_counts().to_numpy()
    x = sp.csr_matrix(a.X)
    used = x if rows is None else x[rows]
    n_genes = np.diff(sp.csr_matrix(used != 0).indptr)
    per_gene = np.asarray((used != 0).sum(axis=0)).ravel() * (a.n_obs / used.shape[0])
    raw = {
        "median_genes_per_cell": np.median(n_genes),
        "perturbation_size_percentile": np.percentile(sizes, percentile),
        "cells_per_gene_percentile": np.percentile(per_gene, percentile),
    }
    clipped = {
        "min_genes": int(np.clip(np.floor(raw["median_genes_per_cell"] / 10), 5, 50)),
        "min_cells_per_perturbation": int(np.clip(np.floor(raw["perturbation_size_percentile"]), 5, 50)),
        "min_cells_per_gene": int(np.clip(np.floor(raw["cells_per_gene_percentile"]), 5, 100)),
    }
    return raw, clipped


@pytest.mark.parametrize("chunk_size", [70, 300])
def test_adaptive_thresholds_equal_numpy_percentiles(sim_adata, chunk_size):
    small = sim_adata[:300].copy()  # small enough that no threshold is clipped
    lazy = ad.AnnData(as_dask(small.X, chunk_size=chunk_size), obs=small.obs, var=small.var)
    found = {}
    for mode, percentile in (("conservative", 5), ("aggressive", 10)):
        with ps.cluster.using("synchronous"):
            t = ps.pp.adaptive_qc_thresholds(lazy, perturbation_column=COL, mode=mode)
        raw, clipped = _expected_thresholds(small, percentile)
        for name, value in raw.items():
            assert_close(getattr(t, name), value, err_msg=name)
        assert t.as_kwargs() == clipped and t.percentile == percentile and t.n_cells_used == 300
        assert all(
            ADAPTIVE_BOUNDS[k][0] < v < ADAPTIVE_BOUNDS[k][1] for k, v in clipped.items()
        )  # the data decide, not the bounds
        found[mode] = t
    assert all(found["aggressive"].as_kwargs()[k] >= v for k, v in found["conservative"].as_kwargs().items())
    assert found["aggressive"].min_cells_per_gene > found["conservative"].min_cells_per_gene
    assert found["aggressive"].min_cells_per_perturbation > found["conservative"].min_cells_per_perturbation

    # a given percentile; the control left out of the sizes
    with ps.cluster.using("synchronous"):
        t = ps.pp.adaptive_qc_thresholds(small, perturbation_column=COL, percentile=50, control_label="control")
    raw, clipped = _expected_thresholds(small, 50, control="control")
    assert t.mode == "percentile" and t.as_kwargs() == clipped
    assert_close(t.perturbation_size_percentile, raw["perturbation_size_percentile"])


def test_adaptive_thresholds_sample_and_feed_qc_summary(sim_adata, sim_h5ad):
    lz = ps.read(sim_h5ad, chunk_size=700)
    with ps.cluster.using("threads"):
        t = ps.pp.adaptive_qc_thresholds(lz, perturbation_column=COL, sample_size=800, random_state=3)
    rows = np.sort(np.random.default_rng(3).choice(sim_adata.n_obs, size=800, replace=False))
    raw, clipped = _expected_thresholds(sim_adata, 5, rows=rows)
    assert t.n_cells_used == 800 and t.as_kwargs() == clipped
    for name, value in raw.items():
        assert_close(getattr(t, name), value, err_msg=name)
    with ps.cluster.using("threads"):
        s = ps.pp.qc_summary(lz, perturbation_column=COL, control_label="control", **t.as_kwargs())
    assert s.min_genes == t.min_genes and s.cell_mask.sum() > 0.9 * sim_adata.n_obs


# --- bad inputs ---------------------------------------------------------------------------------------


def test_bad_inputs(screen):
    a, _ = screen
    with pytest.raises(KeyError, match="perturbation_column 'guide' not found in obs; columns present: 'perturbation'"):
        ps.pp.qc_summary(a, perturbation_column="guide")
    with pytest.raises(KeyError, match="'guide' not found"):
        ps.pp.adaptive_qc_thresholds(a, perturbation_column="guide")
    with pytest.raises(
        ValueError, match="control_label 'NT' not found in obs\\['perturbation'\\]; labels seen: 'control'"
    ):
        ps.pp.qc_summary(a, perturbation_column=COL, control_label="NT")
    with pytest.raises(ValueError, match="exclude_labels includes the control label"):
        ps.pp.qc_summary(a, perturbation_column=COL, control_label="control", exclude_labels=["control"])
    with pytest.raises(ValueError, match="no cell is left; remove some labels"):
        ps.pp.qc_summary(a, perturbation_column=COL, exclude_labels=a.obs[COL].unique())
    with pytest.raises(ValueError, match="min_genes must be >= 0, got -1"):
        ps.pp.qc_summary(a, perturbation_column=COL, min_genes=-1)
    with pytest.raises(ValueError, match="min_cells_per_gene must be a whole number, got 2.5"):
        ps.pp.qc_summary(a, perturbation_column=COL, min_cells_per_gene=2.5)
    with pytest.raises(TypeError, match="min_cells_per_perturbation must be a number"):
        ps.pp.qc_summary(a, perturbation_column=COL, min_cells_per_perturbation="50")
    with pytest.raises(ValueError, match="mode 'strict' is not known; choose 'conservative'"):
        ps.pp.adaptive_qc_thresholds(a, perturbation_column=COL, mode="strict")
    with pytest.raises(ValueError, match="percentile must be >= 0 and <= 100"):
        ps.pp.adaptive_qc_thresholds(a, perturbation_column=COL, percentile=150)
    with pytest.raises(ValueError, match="sample_size must be >= 1"):
        ps.pp.adaptive_qc_thresholds(a, perturbation_column=COL, sample_size=0)


def test_a_filter_that_drops_everything_says_which_and_what_keeps_some(screen):
    a, _ = screen
    x = sp.csr_matrix(a.X)
    not_excluded = (a.obs[COL] != "multiple").to_numpy()
    most_genes = int(np.diff(sp.csr_matrix(x[not_excluded] != 0).indptr).max())
    options = {"perturbation_column": COL, "exclude_labels": ["multiple"]}
    with pytest.raises(ValueError, match=f"min_genes={most_genes + 1} drops every cell.*min_genes <= {most_genes}"):
        ps.pp.qc_summary(a, min_genes=most_genes + 1, **options)
    largest = int(a.obs.loc[not_excluded, COL].value_counts().max())  # min_genes=0 keeps every cell
    with pytest.raises(
        ValueError,
        match=f"min_cells_per_perturbation={largest + 1} drops every perturbation.*"
        f"'control', has {largest} cells; min_cells_per_perturbation <= {largest}",
    ):
        ps.pp.qc_summary(a, min_genes=0, min_cells_per_perturbation=largest + 1, **options)
    most_cells = int(np.asarray((x[not_excluded] != 0).sum(axis=0)).max())
    with pytest.raises(ValueError, match=f"min_cells_per_gene={most_cells + 1} drops every gene.*<= {most_cells}"):
        ps.pp.qc_summary(a, min_genes=0, min_cells_per_perturbation=0, min_cells_per_gene=most_cells + 1, **options)
    negative = a[:50].copy()
    negative.X = negative.X.astype(np.float32)
    negative.X[0, 0] = -1
    with pytest.raises(ValueError, match="negative values"), ps.cluster.using("synchronous"):
        ps.pp.qc_summary(
            negative, perturbation_column=COL, min_genes=0, min_cells_per_perturbation=0, min_cells_per_gene=0
        )

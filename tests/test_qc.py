"""QC metrics, filters and normalization against scanpy on the same data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

import pertscale as ps

from .conftest import assert_close


def _scanpy_qc(path):
    ref = ad.read_h5ad(path)
    ref.var["mt"] = ref.var_names.str.startswith(("MT-", "mt-"))
    qc_vars = ["mt"] if ref.var["mt"].any() else []
    sc.pp.calculate_qc_metrics(ref, qc_vars=qc_vars, percent_top=None, inplace=True)
    return ref


def test_qc_metrics_equal_scanpy(real_screen):
    adata = ps.read(real_screen, chunk_size=4_000)
    with ps.cluster.using("synchronous"):
        ps.pp.calculate_qc_metrics(adata, perturbation_column="perturbation")
    ref = _scanpy_qc(real_screen)
    for col in ref.obs.columns.difference(adata.obs.columns.drop(ref.obs.columns, errors="ignore")):
        if col in ("n_genes_by_counts", "total_counts", "pct_counts_mt", "total_counts_mt", "log1p_total_counts"):
            assert_close(adata.obs[col], ref.obs[col], rtol=1e-6, err_msg=col)
    for col in ("n_cells_by_counts", "mean_counts", "pct_dropout_by_counts", "total_counts", "log1p_mean_counts"):
        assert_close(adata.var[col], ref.var[col], rtol=1e-6, err_msg=col)
    counts = adata.uns["pertscale"]["perturbation_counts"]["n_cells"]
    assert counts.to_dict() == ref.obs["perturbation"].value_counts().to_dict()


def test_qc_metrics_with_mitochondrial_genes(sim_adata):
    adata = sim_adata.copy()
    with ps.cluster.using("synchronous"):
        ps.pp.calculate_qc_metrics(adata)
    ref = sim_adata.copy()
    ref.var["mt"] = ref.var_names.str.startswith("MT-")
    assert ref.var["mt"].sum() > 0
    sc.pp.calculate_qc_metrics(ref, qc_vars=["mt"], percent_top=None, inplace=True)
    for col in ("pct_counts_mt", "total_counts_mt", "n_genes_by_counts", "log1p_n_genes_by_counts"):
        assert_close(adata.obs[col], ref.obs[col], rtol=1e-6, err_msg=col)


@pytest.mark.parametrize("chunk_size", [997, 4_000, 50_000])
def test_filters_equal_scanpy(real_screen, chunk_size):
    adata = ps.read(real_screen, chunk_size=chunk_size)
    adata = ps.pp.filter_perturbations(
        adata, perturbation_column="perturbation", control_label="control", exclude_labels=("multiple", "unassigned")
    )
    with ps.cluster.using("synchronous"):
        adata = ps.pp.filter_cells(adata, min_genes=40)
        adata = ps.pp.filter_genes(adata, min_cells=200)
    ref = ad.read_h5ad(real_screen)
    ref = ref[~ref.obs["perturbation"].isin(["multiple", "unassigned"])].copy()
    sc.pp.filter_cells(ref, min_genes=40)
    sc.pp.filter_genes(ref, min_cells=200)
    assert list(adata.obs_names) == list(ref.obs_names)
    assert list(adata.var_names) == list(ref.var_names)
    assert (adata.obs["n_genes"].to_numpy() == ref.obs["n_genes"].to_numpy()).all()
    assert (adata.var["n_cells"].to_numpy() == ref.var["n_cells"].to_numpy()).all()


def test_filter_counts_bounds_return_new_objects(sim_adata):
    adata = sim_adata.copy()
    with ps.cluster.using("synchronous"):
        kept = ps.pp.filter_cells(adata, max_counts=2_000)
    assert adata.n_obs == sim_adata.n_obs and "n_counts" not in adata.obs  # untouched
    totals = np.asarray(sim_adata.X.sum(axis=1)).ravel()
    assert list(kept.obs_names) == list(sim_adata.obs_names[totals <= 2_000])
    assert (kept.obs["n_counts"].to_numpy() == totals[totals <= 2_000]).all()
    with ps.cluster.using("synchronous"):
        genes = ps.pp.filter_genes(adata, min_counts=100)
    assert list(genes.var_names) == list(sim_adata.var_names[np.asarray(sim_adata.X.sum(axis=0)).ravel() >= 100])
    with pytest.raises(ValueError, match="exactly one"):
        ps.pp.filter_cells(adata, min_genes=1, min_counts=1)


def test_filter_perturbations(sim_adata):
    adata = sim_adata.copy()
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    labels[:5] = "multiple"
    adata.obs["perturbation"] = labels
    counts = adata.obs["perturbation"].value_counts()
    cutoff = int(counts.drop(["control", "multiple"]).median())
    kept = ps.pp.filter_perturbations(
        adata,
        perturbation_column="perturbation",
        control_label="control",
        min_cells_per_perturbation=cutoff,
        exclude_labels=["multiple"],
    )
    table = kept.uns["pertscale"]["perturbation_filter"]
    assert table.loc["multiple", "reason"] == "excluded"
    small = counts[(counts < cutoff) & ~counts.index.isin(["control", "multiple"])].index
    assert set(table.index[table["reason"] == "min_cells_per_perturbation"]) == set(small)
    assert set(kept.obs["perturbation"]) == set(counts.index) - set(small) - {"multiple"}
    assert kept.n_obs == table["n_cells_after"].sum()
    with pytest.raises(KeyError, match="perturbation_column 'guide' not found.*'perturbation'"):
        ps.pp.filter_perturbations(adata, perturbation_column="guide")


def test_normalize_log1p_equal_scanpy_bitwise(real_screen):
    adata = ps.read(real_screen, chunk_size=5_000)
    ps.pp.normalize_total(adata, target_sum=1e4)
    ps.pp.log1p(adata)
    ref = ad.read_h5ad(real_screen)
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    got = adata.X.compute(scheduler="synchronous")
    assert got.dtype == ref.X.dtype == np.float32
    assert (got != ref.X).nnz == 0  # bit for bit


def test_normalize_median_target_equals_scanpy(sim_adata):
    adata = sim_adata.copy()
    with ps.cluster.using("synchronous"):
        ps.pp.normalize_total(adata, target_sum=None)
    ref = sim_adata.copy()
    sc.pp.normalize_total(ref)
    assert_close(adata.X.compute().toarray(), ref.X.toarray(), rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, -3])
def test_qc_rejects_nan_and_negative(sim_adata, bad):
    adata = sim_adata[:100].copy()
    adata.X = sp.csr_matrix(adata.X.astype(np.float32))
    adata.X.data[3] = bad
    with pytest.raises(ValueError, match="NaN|negative"):
        with ps.cluster.using("synchronous"):
            ps.pp.calculate_qc_metrics(adata)

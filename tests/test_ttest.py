"""The t-test and one-sided alternatives: scipy and scanpy references, chunk and scheduler invariance."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from scipy import stats

import pertscale as ps
from pertscale.kernels.ttest import TTEST_STATS, control_moments, ttest_block

from .conftest import assert_close


def _prepared(path_or_adata, *, chunk_size=None):
    a = ps.read(path_or_adata, chunk_size=chunk_size) if not isinstance(path_or_adata, ad.AnnData) else path_or_adata
    a = ps.pp.filter_perturbations(
        a, perturbation_column="perturbation", control_label="control", exclude_labels=["multiple", "unassigned"]
    )
    ps.pp.normalize_total(a, target_sum=1e4)
    ps.pp.log1p(a)
    return a


def _run(adata, scheduler="synchronous", **kw):
    return ps.compute(
        ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control", **kw),
        scheduler=scheduler,
    )


def _dense_groups(adata):
    x = adata.X.compute() if hasattr(adata.X, "compute") else adata.X
    x = x.toarray().astype(np.float64)
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    return x, labels


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_ttest_equals_scipy_welch(sim_adata, alternative):
    adata = _prepared(sim_adata.copy())
    res = _run(adata, method="t-test", alternative=alternative)
    x, labels = _dense_groups(adata)
    control = x[labels == "control"]
    for g in res.obs_names:
        with np.errstate(invalid="ignore", divide="ignore"):
            r = stats.ttest_ind(x[labels == g], control, equal_var=False, alternative=alternative, axis=0)
        defined = ~np.isnan(r.pvalue)
        assert defined.sum() > 0.9 * defined.size
        assert_close(res[g].layers["scores"][0][defined], r.statistic[defined], rtol=1e-9, err_msg=g)
        assert_close(res[g].layers["pvals"][0][defined], r.pvalue[defined], rtol=1e-8, atol=1e-300, err_msg=g)
        # no variance on either side: scanpy's convention, score 0 and p-value 1
        assert (res[g].layers["scores"][0][~defined] == 0).all() and (res[g].layers["pvals"][0][~defined] == 1).all()


def test_ttest_overestim_var_equals_scipy_from_stats(sim_adata):
    adata = _prepared(sim_adata.copy())
    res = _run(adata, method="t-test_overestim_var")
    x, labels = _dense_groups(adata)
    control = x[labels == "control"]
    for g in res.obs_names:
        grp = x[labels == g]
        with np.errstate(invalid="ignore", divide="ignore"):
            r = stats.ttest_ind_from_stats(
                grp.mean(0), grp.std(0, ddof=1), len(grp), control.mean(0), control.std(0, ddof=1), len(grp), False
            )
        defined = ~np.isnan(r.pvalue)
        assert_close(res[g].layers["pvals"][0][defined], r.pvalue[defined], rtol=1e-8, err_msg=g)
    assert res.uns["pertscale"]["settings"]["method"] == "t-test_overestim_var"


@pytest.mark.parametrize("method", ["t-test", "t-test_overestim_var"])
def test_ttest_equals_scanpy_on_real_data(real_screen, method):
    res = _run(_prepared(real_screen, chunk_size=4_000), method=method)
    ref = ad.read_h5ad(real_screen)
    ref = ref[~ref.obs["perturbation"].isin(["multiple", "unassigned"])].copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy on genes without variance
        sc.tl.rank_genes_groups(ref, "perturbation", reference="control", method=method, pts=True)
    assert set(res.obs_names) == set(ref.uns["rank_genes_groups"]["names"].dtype.names)
    for g in res.obs_names:
        df = sc.get.rank_genes_groups_df(ref, g, pval_cutoff=None).set_index("names").loc[res.var_names]
        row = res[g]
        # scanpy: one-pass variances (float32 squares summed in float64), scores stored as float32
        assert_close(row.layers["scores"][0], df["scores"], rtol=1e-4, atol=1e-5, err_msg=g)
        # p-values agree to the same relative precision in -log p
        logp = (-np.log(np.maximum(p, 1e-300)) for p in (row.layers["pvals"][0], df["pvals"].to_numpy()))
        assert_close(*logp, rtol=1e-4, atol=1e-9, err_msg=g)
        assert_close(row.layers["logfoldchanges"][0], df["logfoldchanges"], rtol=1e-5, atol=1e-5, err_msg=g)
        assert_close(row.layers["pts"][0], df["pct_nz_group"], rtol=1e-12, err_msg=g)


@pytest.mark.parametrize("use_continuity", [False, True])
@pytest.mark.parametrize("alternative", ["greater", "less"])
def test_wilcoxon_one_sided_equals_scipy(sim_adata, alternative, use_continuity):
    adata = _prepared(sim_adata.copy())
    res = _run(adata, alternative=alternative, use_continuity=use_continuity)
    x, labels = _dense_groups(adata)
    control = x[labels == "control"]
    for g in res.obs_names:
        r = stats.mannwhitneyu(
            x[labels == g], control, alternative=alternative, use_continuity=use_continuity, method="asymptotic", axis=0
        )
        defined = ~np.isnan(r.pvalue)
        assert_close(res[g].layers["pvals"][0][defined], r.pvalue[defined], rtol=1e-10, err_msg=g)
        assert_close(res[g].layers["u_statistic"][0], r.statistic, rtol=0)
    two = _run(adata, use_continuity=use_continuity)
    np.testing.assert_array_equal(res.layers["scores"], two.layers["scores"])  # scores keep their sign
    assert res.uns["pertscale"]["settings"]["alternative"] == alternative


@pytest.mark.parametrize("chunk_size", [97, 1_000])
def test_ttest_does_not_depend_on_chunking(sim_h5ad, chunk_size):
    base = _run(_prepared(sim_h5ad, chunk_size=3_000), method="t-test")
    res = _run(_prepared(sim_h5ad, chunk_size=chunk_size), method="t-test")
    assert list(res.obs_names) == list(base.obs_names)
    for layer in TTEST_STATS:
        assert_close(res.layers[layer], base.layers[layer], rtol=1e-12, err_msg=layer)


@pytest.mark.cluster
def test_ttest_distributed_equals_synchronous(sim_h5ad, cluster_client):
    sync = _run(_prepared(sim_h5ad, chunk_size=700), method="t-test")
    dist = _run(_prepared(sim_h5ad, chunk_size=700), method="t-test", scheduler=cluster_client)
    for layer in TTEST_STATS:
        np.testing.assert_array_equal(dist.layers[layer], sync.layers[layer], err_msg=layer)


def test_ttest_kernel_parts_stored_zeros_and_constant_genes():
    rng = np.random.default_rng(0)
    x = sp.random(60, 9, density=0.4, random_state=1, format="csr", dtype=np.float64).toarray() * 5
    control = rng.poisson(1.0, size=(40, 9)).astype(np.float64)
    for m in (x, control):
        m[:, 0] = 0.0  # a gene never detected
        m[:, 1] = 2.0  # a gene constant everywhere
    x, control = sp.csr_matrix(x), sp.csr_matrix(control)
    whole = ttest_block(x, np.array([20, 25, 15]), control_moments(control))
    parts = [control_moments(control[:, :4]), control_moments(control[:, 4:])]
    split = ttest_block(x, np.array([20, 25, 15]), parts, [0, 4, 9])
    assert_close(split, whole, rtol=1e-15)
    stat = {n: i for i, n in enumerate(TTEST_STATS)}
    assert (whole[:, stat["scores"], :2] == 0).all() and (whole[:, stat["pvals"], :2] == 1).all()
    stored = x.copy()
    stored.data[:5] = 0.0  # explicit zeros count as zeros
    clean = stored.copy()
    clean.eliminate_zeros()
    assert_close(
        ttest_block(stored, [60], control_moments(control)), ttest_block(clean, [60], control_moments(control))
    )
    with pytest.raises(ValueError, match="do not split"):
        ttest_block(x, [20, 20], control_moments(control))
    with pytest.raises(ValueError, match="do not cover"):
        ttest_block(x, [60], control_moments(control[:, :4]))


def test_bad_alternative_and_method(sim_adata):
    adata = _prepared(sim_adata.copy())
    with pytest.raises(ValueError, match="alternative 'bigger'.*two-sided"):
        ps.tl.rank_genes_groups(
            adata, perturbation_column="perturbation", control_label="control", alternative="bigger"
        )
    with pytest.raises(ValueError, match="method 't_test'.*'t-test'"):
        ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control", method="t_test")


@pytest.mark.parametrize("method", ["wilcoxon", "t-test", "nb-glm"])
def test_genes_low_on_both_sides_are_reported_as_nan_and_leave_the_family(sim_adata, method):
    if method == "nb-glm":
        adata = ps.pp.filter_perturbations(
            sim_adata.copy(), perturbation_column="perturbation", control_label="control", exclude_labels=[]
        )
        ps.pp.size_factors(adata)  # nb-glm's prerequisites, each its own step
        ps.tl.dispersions(adata, perturbation_column="perturbation")
    else:
        adata = _prepared(sim_adata.copy())
    args = dict(method=method)
    full = ps.compute(
        ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control", **args),
        scheduler="synchronous",
    )
    kept = ps.compute(
        ps.tl.rank_genes_groups(
            adata, perturbation_column="perturbation", control_label="control", min_pct=(0.3, 0.5), min_mean=0.2, **args
        ),
        scheduler="synchronous",
    )
    x = adata.X.compute() if hasattr(adata.X, "compute") else adata.X
    x = sp.csr_matrix(x).astype(np.float64)
    if method == "nb-glm":
        x = sp.diags(1 / adata.obs["size_factors"].to_numpy()) @ x  # its means are of normalized counts
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    ctrl = x[labels == "control"]
    c_pts, c_mean = np.asarray((ctrl != 0).mean(axis=0)).ravel(), np.asarray(ctrl.mean(axis=0)).ravel()
    for g in kept.obs_names:
        grp = x[labels == g]
        g_pts, g_mean = np.asarray((grp != 0).mean(axis=0)).ravel(), np.asarray(grp.mean(axis=0)).ravel()
        low = ~(((g_pts >= 0.5) & (g_mean >= 0.2)) | ((c_pts >= 0.3) & (c_mean >= 0.2)))  # crispyx's rule
        assert low.any() and not low.all()
        row, ref = kept[g], full[g]
        assert np.isnan(row.layers["pvals"][0][low]).all() and np.isnan(row.layers["scores"][0][low]).all()
        assert_close(row.layers["pvals"][0][~low], ref.layers["pvals"][0][~low], rtol=1e-12)
        assert_close(row.layers["pts"][0], ref.layers["pts"][0], rtol=0)  # still reported
        # the family of the correction: the tested genes only
        expected = stats.false_discovery_control(ref.layers["pvals"][0][~low])
        assert_close(row.layers["pvals_adj"][0][~low], expected, rtol=1e-10)
    with pytest.raises(ValueError, match="min_pct must be >= 0 and <= 1"):
        ps.tl.rank_genes_groups(
            adata, perturbation_column="perturbation", control_label="control", method=method, min_pct=1.5
        )

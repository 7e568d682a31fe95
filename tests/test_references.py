"""Every analysis meets every array type and every scheduler, against an independent reference (issue 22).

As anndata's tests share their array types, these share conftest's
:data:`~tests.conftest.ARRAY_TYPES` (numpy, CSR, CSC, Dask dense, Dask CSR,
``.h5ad``- and ``.zarr``-backed) and :data:`~tests.conftest.SCHEDULERS`
(synchronous, threads, processes, distributed): each test below is one
public analysis, run on one array type under one scheduler (computing only
at the face: ``ps.cluster.using``, ``ps.compute``), and compared with a
reference computed once, on the same counts in memory, by another package
(scanpy, scipy, PyDESeq2, statsmodels, pandas) or by the formula that
defines the statistic. The screen is small (480 cells x 50 genes, 4
perturbations in random cell order) and its Dask and file-backed blocks of
:data:`~tests.conftest.CHUNK_ROWS` rows split every group.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

import pertscale as ps

from .conftest import CHUNK_ROWS, as_array_type, assert_close

sc = pytest.importorskip("scanpy")

PERTURBATION, CONTROL = "perturbation", "control"


# ------------------------------------------------------------------------------------------------ the screen


@pytest.fixture(scope="module")
def screen() -> ad.AnnData:
    """480 cells x 50 genes (two mitochondrial), 4 perturbations, ~50 % non-zero counts, in random order."""
    adata = ps.datasets.simulate_screen(
        480, 50, 4, control_fraction=0.3, seed=3, n_affected=5, n_mito=2, median_umi=250
    )
    del adata.uns["simulation"]
    labels = adata.obs[PERTURBATION].to_numpy()
    starts = np.arange(0, adata.n_obs, CHUNK_ROWS)
    assert all(len(set(labels[s : s + CHUNK_ROWS])) == 5 for s in starts[:-1])  # every block splits every group
    return adata


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    """Where the file-backed array types are written, once for the module."""
    return tmp_path_factory.mktemp("references")


@pytest.fixture
def data(screen, array_type, directory) -> ad.AnnData:
    """The screen's counts as one of the array types."""
    return as_array_type(screen, array_type, directory)


@pytest.fixture(scope="module")
def counts(screen) -> np.ndarray:
    """The counts in memory, float64."""
    return screen.X.toarray().astype(np.float64)


@pytest.fixture(scope="module")
def labels(screen) -> np.ndarray:
    return screen.obs[PERTURBATION].astype(str).to_numpy()


@pytest.fixture(scope="module")
def scanpy_lognorm(screen) -> ad.AnnData:
    """scanpy's ``normalize_total(target_sum=1e4)`` then ``log1p`` of the counts (CSR, float32)."""
    ref = screen.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    return ref


def _lognorm(adata: ad.AnnData) -> ad.AnnData:
    """Our lazy normalize_total + log1p (nothing computed)."""
    ps.pp.normalize_total(adata, target_sum=1e4)
    ps.pp.log1p(adata)
    return adata


def _dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def _using(scheduler):
    return ps.cluster.using(scheduler, progress=False)


# ------------------------------------------------------------------------------------------------------- QC


@pytest.fixture(scope="module")
def scanpy_qc(screen):
    ref = screen.copy()
    ref.var["mt"] = ref.var_names.str.startswith("MT-")
    return sc.pp.calculate_qc_metrics(ref, qc_vars=["mt"], percent_top=None, inplace=False)


def test_calculate_qc_metrics_equal_scanpy(data, scheduler, scanpy_qc):
    with _using(scheduler):
        obs, var = ps.pp.calculate_qc_metrics(data, inplace=False)
    ref_obs, ref_var = scanpy_qc
    assert list(obs.index) == list(ref_obs.index) and list(var.index) == list(ref_var.index)
    assert "pct_counts_mt" in obs.columns and set(obs.columns) <= set(ref_obs.columns)
    assert set(var.columns) <= set(ref_var.columns) and "pct_dropout_by_counts" in var.columns
    for frame, ref in ((obs, ref_obs), (var, ref_var)):
        for col in frame.columns:
            assert_close(frame[col], ref[col], rtol=1e-12, err_msg=col)


#: Bounds that keep some cells and genes and drop others.
MIN_GENES, MIN_COUNTS = 20, 60


def test_filter_cells_and_genes_equal_scanpy(data, scheduler, screen, counts):
    with _using(scheduler):
        cells = ps.pp.filter_cells(data, min_genes=MIN_GENES)
        genes = ps.pp.filter_genes(data, min_counts=MIN_COUNTS)
    cell_mask, n_genes = sc.pp.filter_cells(screen.copy(), min_genes=MIN_GENES, inplace=False)
    gene_mask, n_counts = sc.pp.filter_genes(screen.copy(), min_counts=MIN_COUNTS, inplace=False)
    assert 0 < cell_mask.sum() < screen.n_obs and 0 < gene_mask.sum() < screen.n_vars
    assert list(cells.obs_names) == list(screen.obs_names[cell_mask]) and cells.n_vars == screen.n_vars
    assert list(genes.var_names) == list(screen.var_names[gene_mask]) and genes.n_obs == screen.n_obs
    assert_close(cells.obs["n_genes"], n_genes[cell_mask], rtol=0)
    assert_close(genes.var["n_counts"], n_counts[gene_mask], rtol=0)
    # the kept matrix, computed at the face
    assert_close(_dense(ps.compute(cells, scheduler=scheduler, progress=False).X), counts[cell_mask], rtol=0)
    assert_close(_dense(ps.compute(genes, scheduler=scheduler, progress=False).X), counts[:, gene_mask], rtol=0)


#: The main job's filters on this screen: cells with fewer genes, then P0000 and P0001 (72-74 cells left,
#: fewer than 75), then the three sparsest genes.
QC_MIN_GENES, QC_MIN_CELLS_PER_PERTURBATION, QC_MIN_CELLS_PER_GENE = 20, 75, 15


def test_qc_summary_equals_scanpy_filters(data, scheduler, screen):
    with _using(scheduler):
        summary = ps.pp.qc_summary(
            data,
            perturbation_column=PERTURBATION,
            control_label=CONTROL,
            min_genes=QC_MIN_GENES,
            min_cells_per_perturbation=QC_MIN_CELLS_PER_PERTURBATION,
            min_cells_per_gene=QC_MIN_CELLS_PER_GENE,
        )
    kept = ps.compute(summary.apply(data), scheduler=scheduler, progress=False)
    # the same filters in scanpy, as the docstring says: cells, then small perturbations, then genes
    ref = screen.copy()
    sc.pp.filter_cells(ref, min_genes=QC_MIN_GENES)
    sizes = ref.obs[PERTURBATION].value_counts()
    small = [p for p, n in sizes.items() if n < QC_MIN_CELLS_PER_PERTURBATION and p != CONTROL]
    assert sorted(small) == ["P0000", "P0001"]
    ref = ref[~ref.obs[PERTURBATION].isin(small)].copy()
    sc.pp.filter_genes(ref, min_cells=QC_MIN_CELLS_PER_GENE)
    assert 0 < ref.n_vars < screen.n_vars
    assert list(kept.obs_names) == list(ref.obs_names) and list(kept.var_names) == list(ref.var_names)
    assert_close(_dense(kept.X), _dense(ref.X), rtol=0)
    assert_close(kept.obs["n_genes_by_counts"], ref.obs["n_genes"], rtol=0)
    assert_close(kept.var["n_cells"], ref.var["n_cells"], rtol=0)


# ---------------------------------------------------------------------------------------------- normalize


def test_normalize_total_and_log1p_equal_scanpy(data, scheduler, screen, scanpy_lognorm, array_type, directory):
    got = ps.compute(_lognorm(data), scheduler=scheduler, progress=False).X
    assert got.dtype == np.float32
    assert_close(_dense(got), _dense(scanpy_lognorm.X), rtol=0)  # scanpy's float32 arithmetic, bit for bit
    # target_sum=None: the median of the cell totals, one pass
    median = as_array_type(screen, array_type, directory)
    with _using(scheduler):
        ps.pp.normalize_total(median, target_sum=None)
    ref = screen.copy()
    sc.pp.normalize_total(ref, target_sum=None)
    assert_close(_dense(ps.compute(median, scheduler=scheduler, progress=False).X), _dense(ref.X), rtol=0)


# ------------------------------------------------------------------------------------ highly variable genes


#: Genes selected by seurat_v3; the dispersion flavors select by scanpy's default cutoffs (on 50 genes, their
#: bins hold two or three genes, whose normalized dispersions tie, so a top-n cut would fall within ties).
N_TOP = 12


@pytest.fixture(scope="module")
def scanpy_hvg(screen, scanpy_lognorm):
    out = {}
    for flavor in ("seurat", "cell_ranger"):
        out[flavor] = sc.pp.highly_variable_genes(scanpy_lognorm, flavor=flavor, inplace=False)
        norm, means = out[flavor]["dispersions_norm"].to_numpy(), out[flavor]["means"].to_numpy()
        assert np.abs(norm - 0.5).min() > 1e-3 and np.abs(means - 0.0125).min() > 1e-3  # no gene at a cutoff
        assert np.abs(means - 3).min() > 1e-3
    out["seurat_v3"] = sc.pp.highly_variable_genes(screen, flavor="seurat_v3", n_top_genes=N_TOP, inplace=False)
    return out


def test_highly_variable_genes_equal_scanpy(data, scheduler, screen, array_type, directory, scanpy_hvg):
    lognorm = _lognorm(data)
    raw = as_array_type(screen, array_type, directory)
    for flavor, adata, n_top, columns in (
        ("seurat", lognorm, None, ("means", "dispersions", "dispersions_norm")),
        ("cell_ranger", lognorm, None, ("means", "dispersions", "dispersions_norm")),
        ("seurat_v3", raw, N_TOP, ("means", "variances", "variances_norm", "highly_variable_rank")),
    ):
        with _using(scheduler):
            df = ps.pp.highly_variable_genes(adata, flavor=flavor, n_top_genes=n_top, inplace=False)
        ref = scanpy_hvg[flavor]
        assert 0 < df["highly_variable"].sum() < screen.n_vars, flavor
        np.testing.assert_array_equal(df["highly_variable"].to_numpy(), ref["highly_variable"].to_numpy(), flavor)
        for col in columns:  # scanpy sums float32 squares, we sum float64
            assert_close(df[col], ref[col], rtol=5e-5, atol=1e-9, err_msg=f"{flavor} {col}")


# ------------------------------------------------------------------------------------------------------ PCA

N_COMPS = 8


@pytest.fixture(scope="module")
def scanpy_pca(scanpy_lognorm):
    ref = scanpy_lognorm.copy()
    ref.X = ref.X.astype(np.float64)  # ARPACK in float64: a reference to 1e-8
    sc.pp.pca(ref, n_comps=N_COMPS, svd_solver="arpack", mask_var=None)
    return ref


def test_pca_equals_scanpy(data, scheduler, scanpy_pca):
    adata = _lognorm(data)
    with _using(scheduler):
        ps.pp.pca(adata, n_comps=N_COMPS, method="covariance")
        ps.pp.pca(adata, n_comps=N_COMPS, method="randomized", key_added="randomized")
    got = ps.compute(adata, scheduler=scheduler, progress=False)
    ref = scanpy_pca
    variance = ref.uns["pca"]["variance"]
    assert (np.diff(variance) < -1e-3 * variance[:-1]).all()  # distinct eigenvalues: each axis defined up to sign
    for scores, loadings, uns in (("X_pca", "PCs", "pca"), ("randomized",) * 3):
        assert_close(got.uns[uns]["variance"], variance, rtol=1e-8, err_msg=uns)
        assert_close(got.uns[uns]["variance_ratio"], ref.uns["pca"]["variance_ratio"], rtol=1e-8, err_msg=uns)
        signs = np.sign((got.varm[loadings] * ref.varm["PCs"]).sum(0))
        assert_close(got.varm[loadings] * signs, ref.varm["PCs"], rtol=1e-6, atol=1e-9, err_msg=uns)
        assert_close(got.obsm[scores] * signs, ref.obsm["X_pca"], rtol=1e-6, atol=1e-9, err_msg=uns)


# ---------------------------------------------------------------------------------------------- pseudo-bulk


def test_pseudobulk_equals_pandas_groupby(data, scheduler, screen, counts, labels):
    with _using(scheduler):
        pb = ps.pb.pseudobulk(data, perturbation_column=PERTURBATION)
    normalized = screen.copy()
    sc.pp.normalize_total(normalized, target_sum=1e4)
    logged = normalized.copy()
    sc.pp.log1p(logged)
    groups = pd.Index(labels, name=PERTURBATION)
    for got, values in (
        (pb.X, counts),
        (pb.layers["mean_normalized"], _dense(normalized.X)),
        (pb.layers["mean_log1p"], _dense(logged.X)),
    ):
        frame = pd.DataFrame(values.astype(np.float64), index=groups)
        ref = (frame.groupby(level=0).sum() if values is counts else frame.groupby(level=0).mean()).loc[pb.obs_names]
        assert_close(_dense(got), ref.to_numpy(), rtol=0 if values is counts else 1e-12)
    assert_close(pb.obs["n_cells"], pd.Series(labels).value_counts().loc[pb.obs_names], rtol=0)


# --------------------------------------------------------------------------------------------- size factors


def _geometric_one(sf: np.ndarray) -> np.ndarray:
    return sf / np.exp(np.mean(np.log(sf)))


@pytest.fixture(scope="module")
def reference_size_factors(screen, counts):
    """PyDESeq2's poscounts (scaled to geometric mean 1, as DESeq2 scales them) and ratio (not scaled), and
    crispyx's sparse median of ratios from its definition."""
    pytest.importorskip("pydeseq2")
    from pydeseq2.dds import DeseqDataSet

    out = {}
    obs = pd.DataFrame({"condition": np.where(screen.obs[PERTURBATION] == CONTROL, "A", "B")}, index=screen.obs_names)
    for fit_type in ("poscounts", "ratio"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dds = DeseqDataSet(adata=ad.AnnData(counts.astype(np.int64), obs=obs), design="~condition", quiet=True)
            dds.fit_size_factors(fit_type=fit_type)
        sf = dds.obs["size_factors"].to_numpy()
        out[fit_type] = sf if fit_type == "ratio" else _geometric_one(sf)  # PyDESeq2 scales poscounts, as DESeq2
    with np.errstate(divide="ignore"):
        logs = np.where(counts > 0, np.log(counts), np.nan)
    geo = np.exp(np.nanmean(logs, axis=0))
    out["sparse"] = _geometric_one(np.array([np.median(row[row > 0] / geo[row > 0]) for row in counts]))
    return out


def test_size_factors_equal_pydeseq2_and_their_definition(data, scheduler, reference_size_factors):
    for method, ref in reference_size_factors.items():
        with _using(scheduler):
            got = ps.pp.size_factors(data, method=method, key_added=f"sf_{method}")
        assert_close(got, ref, rtol=1e-10, err_msg=method)
        assert_close(data.obs[f"sf_{method}"], ref, rtol=1e-10, err_msg=method)


# ----------------------------------------------------------------------------------------------- dispersions


@pytest.fixture(scope="module")
def reference_moments(counts, labels, reference_size_factors):
    """PyDESeq2's starting dispersions (the smaller of the rough and the moments estimates, clipped), per gene."""
    pytest.importorskip("pydeseq2")
    from pydeseq2.utils import fit_moments_dispersions, fit_rough_dispersions

    sf = reference_size_factors["poscounts"]
    normed = counts / sf[:, None]
    design = pd.get_dummies(pd.Series(labels)).astype(float)
    rough, moments = fit_rough_dispersions(normed, design), fit_moments_dispersions(normed, sf)
    # as DESeq2 but where the rough estimate is 0 (its means floored at 1: sparse genes), which takes the moments one
    alpha = np.where(rough > 1e-8, np.minimum(rough, moments), moments)
    assert (rough <= 1e-8).any() and (rough > moments).any()  # both rules are met
    return np.clip(alpha, 1e-8, max(10, counts.shape[0])), normed.mean(axis=0)


@pytest.fixture(scope="module")
def reference_dispersions(screen, counts, labels, reference_size_factors, reference_moments):
    """PyDESeq2's dispersion steps for a design of the 5 groups: gene-wise Cox-Reid fits (``fit_alpha_mle``)
    from the starting values of :func:`reference_moments`, each group's mean held at the mean of ``y / s``
    (PyDESeq2's linear model for such a design), ``min_mu`` 0.5, genes stuck at the floor refitted from the
    best point of a grid (as DESeq2 in R); then PyDESeq2's parametric trend and prior variance of those
    gene-wise values, the maximum a posteriori fits around them, and DESeq2's outlier rule."""
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.utils import fit_alpha_mle, grid_fit_alpha

    sf = reference_size_factors["poscounts"]
    n_obs, max_disp = counts.shape[0], max(10, counts.shape[0])
    design = pd.get_dummies(pd.Series(labels)).to_numpy(dtype=float)
    means = (design.T @ (counts / sf[:, None])) / design.sum(axis=0)[:, None]
    mu = np.maximum(sf[:, None] * (design @ means), 0.5)
    start, base_mean = reference_moments

    def fit(j, alpha_hat, **prior):
        args = (counts[:, j], design, mu[:, j])
        alpha, _ = fit_alpha_mle(*args, alpha_hat, 1e-8, max_disp, **prior)
        if alpha < 1e-7:  # at the floor: DESeq2 (R) then starts from the best point of a grid (PyDESeq2 stays)
            alpha_hat = grid_fit_alpha(*args, alpha_hat, 1e-8, max_disp, **prior)
            alpha, _ = fit_alpha_mle(*args, alpha_hat, 1e-8, max_disp, **prior)
        return alpha

    obs = pd.DataFrame({"condition": labels}, index=screen.obs_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        genewise = np.array([fit(j, start[j]) for j in range(len(start))])
        dds = DeseqDataSet(adata=ad.AnnData(counts.astype(np.int64), obs=obs), design="~condition", quiet=True)
        dds.var["non_zero"] = True
        dds.non_zero_idx, dds.non_zero_genes = np.arange(dds.n_vars), dds.var_names
        dds.var["genewise_dispersions"], dds.var["_normed_means"] = genewise, base_mean
        dds.fit_dispersion_trend()
        dds.fit_dispersion_prior()
        trend, prior = dds.var["fitted_dispersions"].to_numpy(), float(dds.uns["prior_disp_var"])
        posterior = np.array([fit(j, trend[j], prior_disp_var=prior, prior_reg=True) for j in range(len(start))])
    assert dds.uns["disp_function_type"] == "parametric"
    outlier = np.log(genewise) > np.log(trend) + 2 * np.sqrt(prior)  # DESeq2's: keep the gene-wise estimate
    at_bounds = (genewise < 1e-6) | (genewise > 0.5 * n_obs)
    assert 0 < at_bounds.sum() <= 4  # sparse genes at a bound of [1e-8, n_obs] (flat likelihoods) are compared too
    return {"genewise": genewise, "trend": trend, "prior": prior, "final": np.where(outlier, genewise, posterior)}


def test_dispersions_equal_pydeseq2(data, scheduler, reference_size_factors, reference_moments, reference_dispersions):
    sf = reference_size_factors["poscounts"]
    with _using(scheduler):
        start = ps.tl.fit_genewise_dispersions(
            data, perturbation_column=PERTURBATION, size_factors=sf, method="moments"
        )
        table = ps.tl.dispersions(data, perturbation_column=PERTURBATION, size_factors=sf, tol=1e-6)
    alpha, base_mean = reference_moments
    assert_close(start["dispersion_genewise"], alpha, rtol=1e-10, err_msg="starting values")
    assert_close(start["baseMean"], base_mean, rtol=1e-12, err_msg="baseMean")
    ref = reference_dispersions
    assert_close(table["dispersion_genewise"], ref["genewise"], rtol=2e-3, err_msg="gene-wise")
    assert_close(table["dispersion_trend"], ref["trend"], rtol=2e-3, err_msg="trend")
    assert_close(data.uns["pertscale"]["dispersion"]["prior_variance"], ref["prior"], rtol=2e-3, err_msg="prior")
    assert_close(table["dispersion"], ref["final"], rtol=2e-3, err_msg="final")


# -------------------------------------------------------------------------------- rank_genes_groups: tests


@pytest.fixture(scope="module")
def reference_tests(scanpy_lognorm, labels):
    """Per perturbation: scipy's Mann-Whitney U and Welch t-test, statsmodels' Benjamini-Hochberg adjustment
    over the genes, and scanpy's fold change and fractions."""
    from statsmodels.stats.multitest import multipletests

    x = _dense(scanpy_lognorm.X).astype(np.float64)
    control = x[labels == CONTROL]
    out = {}
    for group in sorted(set(labels) - {CONTROL}):
        g = x[labels == group]
        u = stats.mannwhitneyu(g, control, method="asymptotic", use_continuity=False, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            t = stats.ttest_ind(g, control, equal_var=False, axis=0)
        mean_g, mean_c = g.mean(axis=0), control.mean(axis=0)
        out[group] = {
            "u_statistic": u.statistic,
            "wilcoxon_pvals": u.pvalue,
            "t_scores": t.statistic,
            "t_pvals": t.pvalue,
            "wilcoxon_pvals_adj": multipletests(u.pvalue, method="fdr_bh")[1],
            "t_pvals_adj": multipletests(t.pvalue, method="fdr_bh")[1],
            "logfoldchanges": np.log2(np.expm1(mean_g) + 1e-9) - np.log2(np.expm1(mean_c) + 1e-9),
            "pts": (g > 0).mean(axis=0),
            "pts_rest": (control > 0).mean(axis=0),
        }
    return out


@pytest.mark.parametrize("method", ["wilcoxon", "t-test"])
def test_rank_genes_groups_equal_scipy(data, scheduler, method, reference_tests):
    res = ps.tl.rank_genes_groups(
        _lognorm(data), perturbation_column=PERTURBATION, control_label=CONTROL, method=method
    )
    got = ps.compute(res, scheduler=scheduler, progress=False)
    assert sorted(got.obs_names) == sorted(reference_tests)
    for group, ref in reference_tests.items():
        row = got[group]
        if method == "wilcoxon":
            assert_close(row.layers["u_statistic"][0], ref["u_statistic"], rtol=1e-12, err_msg=group)
            assert_close(row.layers["pvals"][0], ref["wilcoxon_pvals"], rtol=1e-8, err_msg=group)
            assert_close(row.layers["pvals_adj"][0], ref["wilcoxon_pvals_adj"], rtol=1e-8, err_msg=group)
        else:
            assert_close(row.layers["scores"][0], ref["t_scores"], rtol=1e-8, err_msg=group)
            assert_close(row.layers["pvals"][0], ref["t_pvals"], rtol=1e-8, err_msg=group)
            assert_close(row.layers["pvals_adj"][0], ref["t_pvals_adj"], rtol=1e-8, err_msg=group)
        assert_close(row.layers["logfoldchanges"][0], ref["logfoldchanges"], rtol=1e-5, atol=1e-6, err_msg=group)
        assert_close(row.layers["pts"][0], ref["pts"], rtol=1e-12, err_msg=group)
        assert_close(row.layers["pts_rest"][0], ref["pts_rest"], rtol=1e-12, err_msg=group)


# ------------------------------------------------------------------------------- rank_genes_groups: nb-glm

#: Two perturbations x four genes (each perturbation's target among them) fitted by statsmodels.
NB_GENES = 4


@pytest.fixture(scope="module")
def reference_nbglm(screen, counts, labels, reference_size_factors):
    """statsmodels' NB GLM ``y ~ 1 + perturbed`` with offset ``log s`` and the simulation's dispersions."""
    sm = pytest.importorskip("statsmodels.api")
    sf = reference_size_factors["poscounts"]
    alpha = screen.var["dispersion"].to_numpy()
    out = {}
    for group in ("P0000", "P0001"):
        target = screen.obs.loc[labels == group, "target_gene"].iloc[0]
        genes = [screen.var_names.get_loc(target), *range(2, 2 + NB_GENES - 1)]
        keep = (labels == group) | (labels == CONTROL)
        design = sm.add_constant((labels[keep] == group).astype(float))
        for j in genes:
            fit = sm.GLM(
                counts[keep, j], design, family=sm.families.NegativeBinomial(alpha=alpha[j]), offset=np.log(sf[keep])
            ).fit(tol=1e-12, maxiter=100)
            out[group, j] = (fit.params[1], fit.bse[1], fit.pvalues[1])
    return out


def test_nbglm_equals_statsmodels(data, scheduler, screen, reference_size_factors, reference_nbglm):
    with _using(scheduler):
        res = ps.tl.rank_genes_groups(
            data,
            perturbation_column=PERTURBATION,
            control_label=CONTROL,
            method="nb-glm",
            size_factors=reference_size_factors["poscounts"],
            size_factor_method="poscounts",
            dispersions=screen.var["dispersion"].to_numpy(),
            shrink=False,
            lfc_base="natural",
        )
    got = ps.compute(res, scheduler=scheduler, progress=False)
    for (group, j), (beta, se, pval) in reference_nbglm.items():
        row = got[group]
        assert_close(row.layers["logfoldchanges_raw"][0, j], beta, rtol=1e-6, err_msg=f"{group} {j}")
        assert_close(row.layers["lfcSE"][0, j], se, rtol=1e-6, err_msg=f"{group} {j}")
        assert_close(row.layers["pvals"][0, j], pval, rtol=1e-5, err_msg=f"{group} {j}")

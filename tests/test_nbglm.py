"""nb-glm through its steps, rank_genes_groups and the main job: PyDESeq2 references, invariance, bad input."""

from __future__ import annotations

import pickle
import warnings

import anndata as ad
import dask
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner
from scipy import stats

import pertscale as ps
from pertscale.cli import main
from pertscale.kernels.nbglm import NBGLM_STATS

from . import test_bad_inputs
from .conftest import assert_close, real_path
from .test_bad_inputs import _forbid_passes

tiny = test_bad_inputs.tiny  # the bad-input suite's fixture: 400 cells x 40 genes, 4 perturbations

#: What the dispersion steps write to ``var``.
DISPERSION_COLUMNS = (
    "dispersion",
    "dispersion_genewise",
    "dispersion_genewise_converged",
    "dispersion_genewise_curvature",
    "dispersion_trend",
    "dispersion_outlier",
    "dispersion_converged",
    "baseMean",
)


def _raw(path_or_adata, *, chunk_size=None):
    a = ps.read(path_or_adata, chunk_size=chunk_size) if not isinstance(path_or_adata, ad.AnnData) else path_or_adata
    return ps.pp.filter_perturbations(
        a, perturbation_column="perturbation", control_label="control", exclude_labels=["multiple", "unassigned"]
    )


def _steps(adata, *, size_factor_method="sparse", covariates=None, dispersion_method="cox-reid", cache=None):
    """nb-glm's prerequisites, each its own call: size factors, then dispersions."""
    ps.pp.size_factors(adata, method=size_factor_method)
    ps.tl.dispersions(
        adata, perturbation_column="perturbation", covariates=covariates, method=dispersion_method, cache=cache
    )


def _run(adata, scheduler="synchronous", *, steps=True, **kw):
    """The steps (unless done already), then the test, computed, all on ``scheduler``."""
    with dask.config.set(scheduler=scheduler):
        if steps:
            _steps(adata, **{k: kw[k] for k in ("size_factor_method", "covariates") if k in kw})
        res = ps.tl.rank_genes_groups(
            adata, perturbation_column="perturbation", control_label="control", method="nb-glm", **kw
        )
        return ps.compute(res)


def _same(a: ad.AnnData, b: ad.AnnData) -> None:
    """The dispersion steps left the same columns, bit for bit, and the same record."""
    for column in DISPERSION_COLUMNS:
        x, y = a.var[column].to_numpy(), b.var[column].to_numpy()
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), column
    assert pickle.dumps(a.uns["pertscale"]["dispersion"]) == pickle.dumps(b.uns["pertscale"]["dispersion"])


def _pydeseq2(raw: ad.AnnData, group: str):
    """PyDESeq2 on the control and one perturbation, design ~condition, poscounts size factors."""
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.ds import DeseqStats

    sub = raw[raw.obs["perturbation"].isin(["control", group])]
    x = sub.X.toarray().astype(np.int64)
    keep = x.sum(axis=0) > 0
    obs = pd.DataFrame({"condition": np.where(sub.obs["perturbation"] == group, "B", "A")}, index=sub.obs_names)
    data = ad.AnnData(x[:, keep], obs=obs, var=pd.DataFrame(index=sub.var_names[keep]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(adata=data, design="~condition", size_factors_fit_type="poscounts", quiet=True)
        dds.deseq2()
        res = DeseqStats(dds, contrast=["condition", "B", "A"], quiet=True)
        res.summary()
    return res.results_df


@pytest.mark.parametrize("size_factor_method", ["sparse", "poscounts"])
def test_agrees_with_pydeseq2_per_comparison_on_papalexi(size_factor_method):
    pytest.importorskip("pydeseq2")
    path = real_path("papalexi")
    res = _run(_raw(path, chunk_size=5_000), "threads", size_factor_method=size_factor_method, shrink=False)
    raw = ad.read_h5ad(path)
    for group in ("IFNGR1", "BRD4", "CAV1"):  # a strong, a medium and a null perturbation
        ref = _pydeseq2(raw, group)
        ours = pd.DataFrame({k: res[group].layers[k][0] for k in ("logfoldchanges", "pvals")}, index=res.var_names)
        ours = ours.loc[ref.index]
        m = (ref["baseMean"] >= 1).to_numpy() & np.isfinite(ref["log2FoldChange"].to_numpy())
        assert m.sum() >= 40
        r = np.corrcoef(ours["logfoldchanges"][m], ref["log2FoldChange"][m])[0, 1]
        assert r >= 0.99, (group, r)
        rho = stats.spearmanr(-np.log10(ours["pvals"][m]), -np.log10(ref["pvalue"][m])).statistic
        assert rho >= 0.95, (group, rho)


def _screen(seed=8):
    adata = ps.datasets.simulate_screen(1_500, 60, 4, control_fraction=0.3, seed=seed)
    del adata.uns["simulation"]
    adata.obs["rep"] = np.where(np.arange(adata.n_obs) % 2, "r1", "r2")
    return adata


def test_dispersion_steps_equal_pydeseq2_fits_given_the_same_means():
    pytest.importorskip("pydeseq2")
    from pydeseq2.utils import fit_alpha_mle

    adata = _screen()
    with dask.config.set(scheduler="synchronous"):
        ps.pp.size_factors(adata)
        ps.tl.fit_genewise_dispersions(adata, perturbation_column="perturbation", tol=1e-6)
        ps.tl.fit_dispersion_trend(adata)
        ps.tl.fit_dispersion_prior(adata)
        table = ps.tl.fit_map_dispersions(adata, tol=1e-6).join(adata.var[["dispersion_genewise", "dispersion_trend"]])
    info = adata.uns["pertscale"]["dispersion"]
    assert info["steps"] == "genewise,trend,prior,map"
    x = adata.X.toarray().astype(np.float64)
    sf = adata.obs["size_factors"].to_numpy()
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    design = pd.get_dummies(labels).to_numpy(dtype=float)
    z = x / sf[:, None]
    means = (design.T @ z) / design.sum(axis=0)[:, None]  # the linear model's group means
    mu = np.maximum(sf[:, None] * (design @ means), info["min_mu"])
    checked = 0
    for j in np.flatnonzero(np.isfinite(table["dispersion"].to_numpy()))[:25]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            genewise, _ = fit_alpha_mle(x[:, j], design, mu[:, j], 0.5, 1e-8, 1_500.0)
            trend = table["dispersion_trend"].iloc[j]
            posterior, _ = fit_alpha_mle(
                x[:, j], design, mu[:, j], trend, 1e-8, 1_500.0, prior_disp_var=info["prior_variance"], prior_reg=True
            )
        assert_close(table["dispersion_genewise"].iloc[j], genewise, rtol=2e-3, err_msg=f"gene-wise {j}")
        if not table["dispersion_outlier"].iloc[j]:
            assert_close(table["dispersion"].iloc[j], posterior, rtol=2e-3, err_msg=f"MAP {j}")
        checked += 1
    assert checked >= 20
    assert table["dispersion_converged"].all()


@pytest.mark.parametrize("scale", [1e7, 1e9])
def test_dispersions_of_huge_counts_reach_the_likelihoods_maximum(scale):
    """Pseudo-bulk sums of 1e7-1e9: the fit stops on its step, not on the log likelihood's size."""
    from scipy import special
    from scipy.optimize import brentq

    def slope(a, y, sf, groups):
        """d/d(log alpha) of the Cox-Reid adjusted profile log likelihood, linear-model means (digamma form)."""
        alpha = np.exp(a)
        r, out = 1 / alpha, 0.0
        for lo, hi in groups:
            yy, ss = y[lo:hi], sf[lo:hi]
            mu = ss * (yy / ss).mean()
            d_r = special.digamma(yy + r) - special.digamma(r) - np.log1p(alpha * mu) + (mu - yy) / (r + mu)
            w = mu / (1 + alpha * mu)
            out += (-d_r.sum() / alpha**2 + 0.5 * (w * w).sum() / w.sum()) * alpha
        return out

    rng = np.random.default_rng(4)
    n, n_genes, alpha = 24, 6, np.array([0.002, 0.01, 0.05, 0.1, 0.02, 0.2])
    sf = rng.lognormal(0, 0.2, n)
    mean = scale * rng.uniform(0.5, 2.0, n_genes)
    mu = sf[:, None] * mean
    counts = rng.negative_binomial(1 / alpha, 1 / (1 + alpha * mu)).astype(np.float64)
    labels = np.repeat(["control", "A", "B"], n // 3)
    obs = pd.DataFrame({"perturbation": labels}, index=[str(i) for i in range(n)])
    adata = ad.AnnData(sp.csr_matrix(counts), obs=obs)
    adata.obs["size_factors"] = sf
    with dask.config.set(scheduler="synchronous"):
        table = ps.tl.fit_genewise_dispersions(adata, perturbation_column="perturbation", tol=1e-8, max_iter=100)
    starts = np.cumsum([0, n // 3, n // 3])
    groups = [(a, a + n // 3) for a in starts]
    for j in range(n_genes):
        best = brentq(slope, np.log(1e-6), np.log(10.0), args=(counts[:, j], sf, groups), xtol=1e-12)
        assert table["dispersion_genewise_converged"].iloc[j]
        assert_close(table["dispersion_genewise"].iloc[j], np.exp(best), rtol=1e-6, err_msg=f"gene {j}")
        assert abs(np.log(table["dispersion_genewise"].iloc[j] / alpha[j])) < 1.0  # near the truth


def _additive_screen(seed=5, n_genes=30):
    """Raw counts of ~ batch + perturbation: a large control and label A, two small labels, three batches."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(["control", "A", "B", "C"], [300, 150, 40, 40])
    n = labels.size
    batch = rng.choice(["b1", "b2", "b3"], n)
    sf = rng.lognormal(0, 0.3, n)
    base = rng.uniform(2.0, 40.0, n_genes)
    alpha = (0.05 + 1.0 / base) * rng.lognormal(0, 0.3, n_genes)  # about a trend a0 + a1 / mu
    effect = {"control": 0.0, "A": 0.4, "B": -0.5, "C": 0.8}
    shift = {"b1": 0.0, "b2": 0.3, "b3": -0.4}
    log_mu = np.log(base)[None] + np.array([effect[k] + shift[b] for k, b in zip(labels, batch, strict=True)])[:, None]
    mu = sf[:, None] * np.exp(log_mu)
    counts = rng.negative_binomial(1 / alpha, 1 / (1 + alpha * mu)).astype(np.float64)
    obs = pd.DataFrame({"perturbation": labels, "batch": batch}, index=[f"c{i}" for i in range(n)])
    adata = ad.AnnData(sp.csr_matrix(counts), obs=obs)
    adata.obs["size_factors"] = sf
    return adata


def test_additive_design_dispersions_are_deseq2s_adjusted_profile_likelihood_maximum(tmp_path):
    """With covariates: DESeq2's starting values, GLM means, and the maximum of its APL, computed independently.

    The reference, gene by gene, from DESeq2's definitions (estimateDispersionsGeneEst): the starting
    dispersion min(rough, moments) from numpy's least squares on y / s; the means of statsmodels' NB GLM of
    the full design (intercept, batches, labels) at it, floored at min_mu; the maximum over log alpha of
    sum_i log NB(y_i; mu_i, alpha) - 1/2 log det(X' W X) by scipy. Blocks of 60 rows cut the control and
    label A into pieces: the same estimates as blocks holding every label whole.
    """
    import statsmodels.api as sm
    from scipy.optimize import minimize_scalar

    adata = _additive_screen()
    y = adata.X.toarray()
    sf = adata.obs["size_factors"].to_numpy()
    obs = adata.obs
    x = np.column_stack(
        [np.ones(adata.n_obs)]
        + [(obs["batch"] == b).to_numpy(float) for b in ("b2", "b3")]
        + [(obs["perturbation"] == k).to_numpy(float) for k in ("A", "B", "C")]
    )
    m, p = x.shape
    z = y / sf[:, None]
    fitted = np.maximum(x @ np.linalg.lstsq(x, z, rcond=None)[0], 1.0)
    rough = (((z - fitted) ** 2 - fitted) / fitted**2).sum(axis=0) / (m - p)
    moments = (z.var(axis=0, ddof=1) - np.mean(1 / sf) * z.mean(axis=0)) / z.mean(axis=0) ** 2
    start = np.clip(np.minimum(rough, moments), 1e-8, max(10.0, m))
    tables = {}
    adata.write_h5ad(tmp_path / "screen.h5ad")
    for chunk in (60, 10_000):
        a = ps.read(tmp_path / "screen.h5ad", chunk_size=chunk)
        with dask.config.set(scheduler="synchronous"):
            tables[chunk] = ps.tl.dispersions(
                a, perturbation_column="perturbation", covariates=["batch"], tol=1e-9, max_iter=100
            )
    table = tables[60]
    assert table["dispersion_converged"].all()
    for j in range(adata.n_vars):
        glm = sm.GLM(y[:, j], x, family=sm.families.NegativeBinomial(alpha=start[j]), offset=np.log(sf))
        mu = np.maximum(glm.fit(tol=1e-13, maxiter=200).fittedvalues, 0.5)

        def apl(a, j=j, mu=mu):
            alpha = np.exp(a)
            w = mu / (1 + alpha * mu)
            return -(
                stats.nbinom.logpmf(y[:, j], 1 / alpha, 1 / (1 + alpha * mu)).sum()
                - 0.5 * np.linalg.slogdet(x.T @ (w[:, None] * x))[1]
            )

        best = minimize_scalar(apl, bounds=(np.log(1e-6), np.log(10.0)), method="bounded", options={"xatol": 1e-10})
        assert_close(table["dispersion_genewise"].iloc[j], np.exp(best.x), rtol=1e-6, err_msg=f"gene {j}")
    for column in ("dispersion_genewise", "dispersion_trend", "dispersion"):
        assert_close(tables[10_000][column], table[column], rtol=1e-8)


def test_additive_design_confounded_or_with_an_empty_level(monkeypatch):
    """A covariate confounded with the labels is refused before any pass; a gene whose counts lie in one level
    converges (its other levels' coefficients head to -inf: stopped by the Newton decrement, not 100 passes)."""
    from pertscale.tl import _nbglm

    adata = _additive_screen(n_genes=10)
    confounded = adata.copy()
    confounded.obs["batch"] = np.where(confounded.obs["perturbation"] == "A", "b2", "b1")
    monkeypatch.setattr(dask, "compute", lambda *a, **k: pytest.fail("a pass ran before the design was checked"))
    before = confounded.copy()
    with pytest.raises(ValueError, match=r"has rank 4 for 5 coefficients: a covariate is confounded with the labels"):
        ps.tl.dispersions(confounded, perturbation_column="perturbation", covariates=["batch"])
    assert "pertscale" not in confounded.uns and list(confounded.var.columns) == list(before.var.columns)
    assert (confounded.X != before.X).nnz == 0 and confounded.obs.equals(before.obs)  # the input as it was
    monkeypatch.undo()
    y = adata.X.toarray()
    y[:, 0] = 0
    y[np.flatnonzero(adata.obs["batch"] == "b1")[:3], 0] = 1  # three counts, all in batch b1
    adata.X = sp.csr_matrix(y)
    passes = []
    glm = _nbglm._additive_glm
    monkeypatch.setattr(_nbglm, "_additive_glm", lambda *a, **k: (passes.append(1), glm(*a, **k))[1])
    with dask.config.set(scheduler="synchronous"):
        table = ps.tl.fit_genewise_dispersions(adata, perturbation_column="perturbation", covariates=["batch"])
    assert table["dispersion_genewise_converged"].all()
    assert len(passes) <= 12  # one block: a call a pass (was 100: -1 a pass towards -inf)


def test_dispersion_cells_are_a_seeded_sample_stratified_by_group():
    from pertscale.tl._nbglm import dispersion_cells

    labels = pd.Series(np.repeat(["control", "A", "B", "C"], [1000, 30, 5, 60]))
    rows = dispersion_cells(labels, 200, 0)
    kept = labels.iloc[rows].value_counts()
    # the small groups whole, the control cut to what is left: 200 - 95
    assert kept.to_dict() == {"control": 105, "C": 60, "A": 30, "B": 5}
    assert (np.diff(rows) > 0).all()
    assert np.array_equal(rows, dispersion_cells(labels, 200, 0))
    assert not np.array_equal(rows, dispersion_cells(labels, 200, 1))
    assert dispersion_cells(labels, 2_000, 0) is None and dispersion_cells(labels, None, 0) is None
    with pytest.raises(ValueError, match=r"max_cells=7 keeps fewer than 2 cells of each of the design's 4 groups"):
        dispersion_cells(labels, 7, 0)
    with pytest.warns(UserWarning, match=r"keeps 11 cells of each of the design's larger groups: with fewer than 50"):
        tight = labels.iloc[dispersion_cells(labels, 40, 0)].value_counts()  # B whole, every other group cut to k
    assert tight.to_dict() == {"control": 11, "C": 11, "A": 11, "B": 5}


def _count_reads(adata) -> list:
    """Replace ``adata.X`` by itself with each block's rows counted as it is read; the list they go to."""
    reads = []
    x = adata.X

    def counted(block):
        reads.append(block.shape[0])
        return block

    adata.X = x.map_blocks(counted, dtype=x.dtype, meta=x._meta)
    return reads


def test_dispersions_on_a_sample_read_the_matrix_once_and_are_recorded(sim_h5ad):
    """With max_cells and the sample in memory, the fit reads each block once; the MAP step takes the same cells."""
    adata = _raw(sim_h5ad, chunk_size=500)
    ps.pp.size_factors(adata)
    x = adata.X
    reads = _count_reads(adata)
    n = adata.n_obs
    with dask.config.set(scheduler="synchronous"):
        ps.tl.dispersions(adata, perturbation_column="perturbation", max_cells=n // 2, cache=True)
    record = adata.uns["pertscale"]["dispersion"]
    assert record["max_cells"] == n // 2 and record["seed"] == 0 and record["n_cells"] <= n // 2
    assert sum(reads) <= n + 2 * max(x.chunks[0])  # one read, and the block read to size the cache
    sample = adata.var[["dispersion", "dispersion_genewise"]].copy()
    # the steps one by one take the same cells (from the record), and a full fit differs
    ps.tl.fit_genewise_dispersions(adata, perturbation_column="perturbation", max_cells=n // 2)
    ps.tl.fit_dispersion_trend(adata)
    ps.tl.fit_dispersion_prior(adata)
    ps.tl.fit_map_dispersions(adata)
    assert_close(adata.var["dispersion"], sample["dispersion"], rtol=1e-12)
    full = adata.copy()
    ps.tl.dispersions(full, perturbation_column="perturbation")
    assert not np.allclose(full.var["dispersion"], sample["dispersion"], equal_nan=True)
    expressed = np.isfinite(full.var["dispersion"].to_numpy())
    ratio = sample["dispersion"].to_numpy()[expressed] / full.var["dispersion"].to_numpy()[expressed]
    assert np.median(np.abs(np.log(ratio))) < 0.2  # half the cells: the same dispersions, roughly


def test_a_sample_too_large_to_prepare_is_kept_raw_and_read_once(sim_h5ad, monkeypatch):
    """A sample whose prepared blocks do not fit (by default) is gathered once and kept raw: the same estimates."""
    from pertscale.tl import _nbglm

    adata = _raw(sim_h5ad, chunk_size=500)
    ps.pp.size_factors(adata)
    n = adata.n_obs
    with dask.config.set(scheduler="synchronous"):
        prepared = ps.tl.dispersions(adata.copy(), perturbation_column="perturbation", max_cells=n // 2, cache=True)
        monkeypatch.setattr(_nbglm, "PREPARED_BYTES", 10**12)  # nothing prepared fits: the raw sample does
        x = adata.X
        reads = _count_reads(adata)
        raw = ps.tl.dispersions(adata, perturbation_column="perturbation", max_cells=n // 2)
    assert sum(reads) <= n + max(x.chunks[0])  # one read, and the block read to size the cache
    assert_close(raw["dispersion"], prepared["dispersion"], rtol=1e-12)


def test_trend_and_prior_steps_equal_pydeseq2_on_the_same_genewise_dispersions():
    pytest.importorskip("pydeseq2")
    from pydeseq2.dds import DeseqDataSet

    adata = _screen()
    with dask.config.set(scheduler="synchronous"):
        ps.pp.size_factors(adata)
        # one pass: what is compared is next
        ps.tl.fit_genewise_dispersions(adata, perturbation_column="perturbation", method="moments")
    trend = ps.tl.fit_dispersion_trend(adata)["dispersion_trend"].to_numpy()
    prior_variance = ps.tl.fit_dispersion_prior(adata)
    info = adata.uns["pertscale"]["dispersion"]
    x = adata.X.toarray().astype(np.int64)
    obs = pd.DataFrame({"condition": adata.obs["perturbation"].astype(str).to_numpy()}, index=adata.obs_names)
    nonzero = (x > 0).any(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(adata=ad.AnnData(x, obs=obs), design="~condition", quiet=True)  # 5 groups, as ours
        dds.var["non_zero"] = nonzero
        dds.non_zero_idx, dds.non_zero_genes = np.flatnonzero(nonzero), dds.var_names[nonzero]
        dds.var["genewise_dispersions"] = adata.var["dispersion_genewise"].to_numpy()
        dds.var["_normed_means"] = adata.var["baseMean"].to_numpy()
        dds.fit_dispersion_trend()
        dds.fit_dispersion_prior()
    assert info["trend"]["type"] == "parametric"
    assert_close([info["trend"]["a0"], info["trend"]["a1"]], dds.uns["trend_coeffs"].to_numpy(), rtol=1e-6)
    assert_close(trend, dds.var["fitted_dispersions"].to_numpy(), rtol=1e-6)
    assert_close(info["squared_logres"], float(dds.uns["_squared_logres"]), rtol=1e-10)
    assert_close(prior_variance, float(dds.uns["prior_disp_var"]), rtol=1e-10)


@pytest.mark.parametrize(
    ("method", "covariates", "given"),
    [("cox-reid", None, False), ("moments", "rep", False), ("cox-reid", "rep", True)],
    ids=["cox-reid", "moments-covariate", "cox-reid-covariate-array"],
)
def test_each_step_alone_equals_the_one_call(method, covariates, given):
    one, steps = _screen(), _screen()
    kw = {"covariates": covariates, "method": method}
    with dask.config.set(scheduler="synchronous"):
        for a in (one, steps):
            ps.pp.size_factors(a)
        sf = {"size_factors": steps.obs["size_factors"].to_numpy().copy()} if given else {}
        table = ps.tl.dispersions(one, perturbation_column="perturbation", **kw, **sf)
        genewise = ps.tl.fit_genewise_dispersions(steps, perturbation_column="perturbation", cache=False, **kw, **sf)
        trend = ps.tl.fit_dispersion_trend(steps)
        prior_variance = ps.tl.fit_dispersion_prior(steps)
        final = ps.tl.fit_map_dispersions(steps, **sf)
    _same(one, steps)
    assert list(table.columns) == [c for c in DISPERSION_COLUMNS if "genewise_c" not in c]
    for part in (genewise, trend, final):  # each step returns what it wrote
        for column in part:
            assert np.array_equal(part[column].to_numpy(), steps.var[column].to_numpy(), equal_nan=True), column
    assert prior_variance == steps.uns["pertscale"]["dispersion"]["prior_variance"]
    assert one.uns["pertscale"]["dispersion"]["covariates"] == (covariates or "")
    assert one.uns["pertscale"]["dispersion"]["size_factors"] == ("given" if given else "size_factors")


def test_trend_recovers_a_known_curve():
    from pertscale.kernels.nbglm import fit_trend

    rng = np.random.default_rng(0)
    mean = np.exp(rng.uniform(np.log(0.01), np.log(50), 3_000))
    truth = 0.1 + 2.0 / mean
    genewise = truth * rng.gamma(20.0, 1 / 20.0, mean.size)  # scatter around the curve
    fitted, info = fit_trend(genewise, mean, min_disp=1e-8)
    assert info["type"] == "parametric"
    assert_close([info["a0"], info["a1"]], [0.1, 2.0], rtol=0.05)
    assert_close(fitted, info["a0"] + info["a1"] / mean, rtol=1e-12)


@pytest.mark.parametrize("chunk_size", [211, 1_000])
def test_does_not_depend_on_chunking_or_caching(sim_h5ad, chunk_size):
    base = _run(_raw(sim_h5ad, chunk_size=3_000))
    other = _raw(sim_h5ad, chunk_size=chunk_size)
    with dask.config.set(scheduler="synchronous"):
        _steps(other, cache=chunk_size == 211)
    res = _run(other, steps=False)
    assert list(res.obs_names) == list(base.obs_names)
    for layer in NBGLM_STATS:
        assert_close(res.layers[layer], base.layers[layer], rtol=1e-6, atol=1e-12, err_msg=layer)


@pytest.mark.cluster
def test_distributed_equals_synchronous(sim_h5ad, cluster_client):
    sync = _run(_raw(sim_h5ad, chunk_size=700))
    dist = _run(_raw(sim_h5ad, chunk_size=700), cluster_client)
    for layer in NBGLM_STATS:
        assert_close(dist.layers[layer], sync.layers[layer], rtol=1e-6, atol=1e-12, err_msg=layer)


def test_cached_blocks_stay_on_the_workers_of_the_faces_client(sim_h5ad, cluster_client, monkeypatch):
    """cache=True under ps.cluster.using(client): the client's persist, never dask.persist into this process."""
    reference = _raw(sim_h5ad, chunk_size=700)
    with dask.config.set(scheduler="synchronous"):
        _steps(reference, cache=False)
    adata = _raw(sim_h5ad, chunk_size=700)

    def gathered(*args, **kwargs):
        raise AssertionError("dask.persist under the face's client gathers the blocks into this process")

    with ps.cluster.using(cluster_client, progress=False):
        ps.pp.size_factors(adata)
        monkeypatch.setattr(dask, "persist", gathered)
        ps.tl.dispersions(adata, perturbation_column="perturbation", cache=True)
    assert_close(adata.var["dispersion"], reference.var["dispersion"], rtol=1e-8)


def test_a_raw_sample_kept_on_the_workers_of_the_faces_client(sim_h5ad, cluster_client, monkeypatch):
    """A sample kept raw under the face's client lives on its workers while the fit needs it (no lost keys)."""
    from pertscale.tl import _nbglm

    reference = _raw(sim_h5ad, chunk_size=700)
    ps.pp.size_factors(reference)
    n = reference.n_obs
    with dask.config.set(scheduler="synchronous"):
        ps.tl.dispersions(reference, perturbation_column="perturbation", max_cells=n // 2, cache=True)
    adata = _raw(sim_h5ad, chunk_size=700)
    with ps.cluster.using(cluster_client, progress=False):
        ps.pp.size_factors(adata)
        monkeypatch.setattr(_nbglm, "PREPARED_BYTES", 10**12)  # kept raw, not prepared
        ps.tl.dispersions(adata, perturbation_column="perturbation", max_cells=n // 2)
    assert_close(adata.var["dispersion"], reference.var["dispersion"], rtol=1e-8)


def test_results_layout_units_and_stored_estimates(sim_adata):
    adata = _raw(sim_adata.copy())
    res = _run(adata, lfc_base="natural")
    assert set(NBGLM_STATS) == set(res.layers)
    assert res.uns["pertscale"]["settings"]["logfoldchanges_base"] == "natural"
    assert "size_factors" in adata.obs and "dispersion" in adata.var  # made by the steps, and kept
    assert adata.uns["pertscale"]["dispersion"]["method"] == "cox-reid"  # estimated, not the simulation's column
    assert res.uns["pertscale"]["settings"]["dispersion_method"] == "cox-reid"
    assert_close(np.exp(np.log(adata.obs["size_factors"]).mean()), 1.0, rtol=1e-12)
    assert_close(res.var["dispersion"], adata.var["dispersion"])
    log2 = _run(adata, steps=False)
    assert_close(log2.layers["logfoldchanges_raw"], res.layers["logfoldchanges_raw"] / np.log(2), rtol=1e-12)
    # recovers the simulated knock-downs
    targets = dict(
        zip(sim_adata.uns["simulation"]["perturbations"], sim_adata.uns["simulation"]["targets"], strict=False)
    )
    hits = [log2[g].layers["pvals_adj"][0, log2.var_names.get_loc(targets[g])] < 0.05 for g in log2.obs_names]
    assert np.mean(hits) >= 0.8


def test_bad_inputs_fail_early_with_the_fix(sim_adata):
    normalized = _raw(sim_adata.copy())
    ps.pp.normalize_total(normalized)
    ps.pp.log1p(normalized)
    with pytest.raises(ValueError, match=r"log1p-normalized.*nb-glm models raw counts.*layer='counts'"):
        ps.tl.rank_genes_groups(
            normalized, perturbation_column="perturbation", control_label="control", method="nb-glm"
        )
    fractional = sim_adata.copy()
    fractional.X = sp.csr_matrix(fractional.X.astype(np.float32) * 0.5)
    with pytest.raises(ValueError, match=r"non-integer values.*raw counts.*--layer counts"):
        with dask.config.set(scheduler="synchronous"):
            ps.pp.size_factors(fractional)
    bad_sf = sim_adata.copy()
    bad_sf.obs["size_factors"] = 0.0
    with pytest.raises(ValueError, match="size factors must be positive finite"):
        ps.tl.rank_genes_groups(bad_sf, perturbation_column="perturbation", control_label="control", method="nb-glm")
    with pytest.raises(ValueError, match="dispersion method 'magic'"):
        ps.tl.dispersions(
            sim_adata.copy(), perturbation_column="perturbation", size_factors=np.ones(sim_adata.n_obs), method="magic"
        )
    with pytest.raises(
        ValueError, match=r"needs size factors in obs\['sf'\]: run ps\.pp\.size_factors\(adata, key_added='sf'\) first"
    ):
        ps.tl.dispersions(sim_adata.copy(), perturbation_column="perturbation", size_factors="sf")


def test_silent_genes_and_a_one_cell_group_do_not_crash(sim_adata):
    adata = sim_adata.copy()
    dense = adata.X.toarray()
    dense[:, 0] = 0  # never detected
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    labels[np.flatnonzero(labels == "P0001")[0]] = "LONELY"  # a perturbation of one cell
    adata.obs["perturbation"] = labels
    adata.X = sp.csr_matrix(dense)
    res = _run(adata, min_cells_per_perturbation=1)
    assert np.isnan(res.var["dispersion"].iloc[0]) and np.isnan(res.layers["pvals"][:, 0]).all()
    assert np.isfinite(res["LONELY"].layers["lfcSE"][0, 1:]).mean() > 0.5
    assert np.isfinite(res.layers["pvals"][:, 1:]).mean() > 0.9


@pytest.mark.parametrize("name", ["papalexi", "schraivogel"])
def test_main_job_runs_nb_glm_on_real_screens(name, tmp_path):
    path = real_path(name)
    out = tmp_path / "out"
    args = ["run", str(path), "--perturbation-column", "perturbation", "--control-label", "control"]
    args += ["--out", str(out), "--method", "nb-glm,wilcoxon", "--scheduler", "threads", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    res = ad.read_zarr(out / "de_nb_glm.zarr")
    assert set(NBGLM_STATS) == set(res.layers) and "dispersion" in res.var
    sf = pd.read_csv(out / "size_factors.csv")
    assert list(sf.columns) == ["cell", "perturbation", "size_factor"] and (sf["size_factor"] > 0).all()
    assert (out / "de_nb_glm_significant.csv").exists() and (out / "de_wilcoxon.zarr").exists()
    if name == "papalexi":  # the IFN-gamma pathway knock-outs lead, as with the Wilcoxon
        de = pd.read_csv(out / "de_nb_glm_significant.csv")["perturbation"].value_counts()
        assert {"IFNGR1", "IFNGR2", "STAT1", "JAK2"} <= set(de.index[:6])


def test_covariates_on_a_real_screen_and_their_bad_input():
    path = real_path("papalexi")
    adata = _raw(path, chunk_size=5_000)
    res = _run(adata, "threads", covariates=["bio_rep"])
    assert list(res.uns["pertscale"]["settings"]["covariates"]) == ["bio_rep"]
    assert adata.uns["pertscale"]["dispersion"]["covariates"] == "bio_rep"  # the design's groups: label x replicate
    plain = _run(_raw(path, chunk_size=5_000), "threads")
    # the IFN-gamma receptor knock-out still leads; the fold changes move, but not far
    top = pd.Series((res.layers["pvals_adj"] < 0.05).sum(axis=1), index=res.obs_names).sort_values()
    assert "IFNGR1" in top.index[-6:]
    m = (plain.layers["baseMean"] >= 1) & np.isfinite(res.layers["logfoldchanges_raw"])
    assert np.corrcoef(res.layers["logfoldchanges_raw"][m], plain.layers["logfoldchanges_raw"][m])[0, 1] > 0.95
    one = adata.copy()
    one.obs["batch"] = "b1"
    with pytest.raises(ValueError, match=r"covariate obs\['batch'\] has a single level.*leave it out"):
        ps.tl.rank_genes_groups(
            one, perturbation_column="perturbation", control_label="control", method="nb-glm", covariates=["batch"]
        )
    gaps = adata.copy()
    gaps.obs["bio_rep"] = gaps.obs["bio_rep"].astype(object)
    gaps.obs.iloc[3, gaps.obs.columns.get_loc("bio_rep")] = None
    with pytest.raises(ValueError, match=r"covariate obs\['bio_rep'\] has 1 missing values"):
        ps.tl.rank_genes_groups(
            gaps, perturbation_column="perturbation", control_label="control", method="nb-glm", covariates=["bio_rep"]
        )
    lonely = adata.copy()
    lonely.obs["side"] = np.where(lonely.obs["perturbation"] == "control", "a", "b")
    with pytest.raises(ValueError, match=r"level\(s\) \['b'\].*have no control cells"):
        ps.tl.rank_genes_groups(
            lonely, perturbation_column="perturbation", control_label="control", method="nb-glm", covariates=["side"]
        )
    with pytest.raises(ValueError, match="covariates are supported by method='nb-glm'"):
        ps.tl.rank_genes_groups(
            adata, perturbation_column="perturbation", control_label="control", covariates=["bio_rep"]
        )


def test_main_job_checks_covariates_before_any_pass(sim_h5ad, tmp_path, monkeypatch):
    import dask

    monkeypatch.setattr(dask, "compute", lambda *a, **k: pytest.fail("a pass ran before the covariates were checked"))
    args = ["run", str(sim_h5ad), "--perturbation-column", "perturbation", "--control-label", "control"]
    args += ["--out", str(tmp_path / "out"), "--method", "nb-glm", "--scheduler", "synchronous"]
    result = CliRunner().invoke(main, [*args, "--covariates", "nope"])
    assert result.exit_code == 1 and "covariate 'nope' not found in obs" in result.output
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- nb-glm's steps missing, or made otherwise


def _counts(tiny) -> ad.AnnData:
    a = tiny.copy()
    a.layers["counts"] = a.X
    a.obs["bio_rep"] = np.where(np.arange(a.n_obs) % 2, "r1", "r2")
    return a


def _sf(a, method="sparse"):
    ps.pp.size_factors(a, layer="counts", method=method)


def _disp(a, **kw):
    ps.tl.dispersions(a, perturbation_column="perturbation", layer="counts", **{"method": "moments"} | kw)


def _up_to_trend(a):
    _sf(a)
    ps.tl.fit_genewise_dispersions(a, perturbation_column="perturbation", layer="counts", method="moments")
    ps.tl.fit_dispersion_trend(a)


def _refitted(a):
    _sf(a)
    _disp(a)
    # later steps now stale
    ps.tl.fit_genewise_dispersions(a, perturbation_column="perturbation", layer="counts", method="moments")


def _other_column(a):
    _sf(a)
    a.obs["guide"] = a.obs["perturbation"].to_numpy()
    ps.tl.dispersions(a, perturbation_column="guide", layer="counts", method="moments")


def _sf_again(a):
    _sf(a)
    _disp(a)
    _sf(a, "poscounts")


#: (what is stored first, rank_genes_groups' options, the message, with the call that fixes it)
MISSING = {
    "no-size-factors": (
        lambda a: None,
        {},
        r"nb-glm needs size factors in obs\['size_factors'\]: run ps\.pp\.size_factors\(adata, layer='counts'\) "
        r"first \(or pass size_factors=\.\.\.\)",
    ),
    "no-size-factors-poscounts": (
        lambda a: None,
        {"size_factor_method": "poscounts"},
        r"run ps\.pp\.size_factors\(adata, method='poscounts', layer='counts'\) first",
    ),
    "no-dispersions": (
        _sf,
        {},
        r"nb-glm needs dispersions estimated for obs\['perturbation'\] .* are missing\): run "
        r"ps\.tl\.dispersions\(adata, perturbation_column='perturbation', layer='counts'\) first "
        r"\(or pass dispersions=\.\.\.\)",
    ),
    "steps-stop-at-the-trend": (
        _up_to_trend,
        {"dispersion_method": "moments"},
        r"nb-glm needs the final dispersions \(var\['dispersion'\]\), but the dispersion steps for "
        r"obs\['perturbation'\] stop after the dispersion trend .*: run ps\.tl\.fit_dispersion_prior\(adata\) then "
        r"ps\.tl\.fit_map_dispersions\(adata\)",
    ),
    "gene-wise-fitted-again": (
        _refitted,
        {"dispersion_method": "moments"},
        r"stop after gene-wise dispersions .*: run ps\.tl\.fit_dispersion_trend\(adata\) then "
        r"ps\.tl\.fit_dispersion_prior\(adata\) then ps\.tl\.fit_map_dispersions\(adata\)",
    ),
    "other-method": (
        lambda a: (_sf(a), _disp(a)),
        {},
        r"were estimated with method='moments' \(asked: 'cox-reid'\): run "
        r"ps\.tl\.dispersions\(adata, perturbation_column='perturbation', layer='counts'\) first, "
        r"or pass dispersion_method='moments'",
    ),
    "other-covariates": (
        lambda a: (_sf(a), _disp(a, covariates="bio_rep")),
        {"dispersion_method": "moments"},
        r"covariates='bio_rep' \(asked: ''\): run "
        r"ps\.tl\.dispersions\(adata, perturbation_column='perturbation', method='moments', "
        r"layer='counts'\) first",
    ),
    "other-perturbation-column": (
        _other_column,
        {"dispersion_method": "moments"},
        r"perturbation_column='guide' \(asked: 'perturbation'\)",
    ),
    "size-factors-made-again": (
        _sf_again,
        {"dispersion_method": "moments", "size_factor_method": "poscounts"},
        r"the size factors are not those the dispersions were estimated with \(made again since, or other cells\): "
        r"run ps\.tl\.dispersions\(adata, perturbation_column='perturbation', method='moments', layer='counts'\) again",
    ),
    "size-factors-of-another-method": (
        _sf_again,
        {"dispersion_method": "moments"},
        r"size factors in obs\['size_factors'\] were made with method='poscounts', not size_factor_method='sparse': "
        r"pass size_factor_method='poscounts', or run ps\.pp\.size_factors\(adata, layer='counts'\) again",
    ),
}


@pytest.mark.parametrize("name", sorted(MISSING))
def test_nb_glm_names_the_missing_step_before_any_pass(name, tiny, monkeypatch):
    store, options, message = MISSING[name]
    a = _counts(tiny)
    with dask.config.set(scheduler="synchronous"):
        store(a)
    before = (pickle.dumps(a.obs), pickle.dumps(a.var), pickle.dumps(a.uns), a.X.toarray().tobytes())
    _forbid_passes(monkeypatch)  # rank_genes_groups used to run the missing steps as hidden passes here
    with pytest.raises(ValueError, match=message):
        ps.tl.rank_genes_groups(
            a, perturbation_column="perturbation", control_label="control", method="nb-glm", layer="counts", **options
        )
    monkeypatch.undo()
    assert (pickle.dumps(a.obs), pickle.dumps(a.var), pickle.dumps(a.uns), a.X.toarray().tobytes()) == before


#: (what is stored first, the step called, the message naming the step before it)
STEP_ORDER = {
    "genewise-without-size-factors": (
        lambda a: None,
        lambda a: ps.tl.fit_genewise_dispersions(a, perturbation_column="perturbation", layer="counts"),
        r"the dispersion fit needs size factors in obs\['size_factors'\]: run "
        r"ps\.pp\.size_factors\(adata, layer='counts'\) first",
    ),
    "trend-without-genewise": (
        _sf,
        ps.tl.fit_dispersion_trend,
        r"ps\.tl\.fit_dispersion_trend needs gene-wise dispersions \(var\['dispersion_genewise'\]\): run "
        r"ps\.tl\.fit_genewise_dispersions\(adata, perturbation_column=\.\.\.\) first",
    ),
    "prior-without-trend": (
        lambda a: (
            _sf(a),
            ps.tl.fit_genewise_dispersions(a, perturbation_column="perturbation", layer="counts", method="moments"),
        ),
        ps.tl.fit_dispersion_prior,
        r"ps\.tl\.fit_dispersion_prior needs the dispersion trend \(var\['dispersion_trend'\]\): run "
        r"ps\.tl\.fit_dispersion_trend\(adata\) first",
    ),
    "map-without-prior": (
        _up_to_trend,
        ps.tl.fit_map_dispersions,
        r"ps\.tl\.fit_map_dispersions needs the dispersion prior .*: run ps\.tl\.fit_dispersion_prior\(adata\) first",
    ),
    "map-without-the-size-factor-array": (
        lambda a: (
            ps.tl.fit_genewise_dispersions(
                a, perturbation_column="perturbation", size_factors=np.ones(a.n_obs), layer="counts"
            ),
            ps.tl.fit_dispersion_trend(a),
            ps.tl.fit_dispersion_prior(a),
        ),
        ps.tl.fit_map_dispersions,
        r"fitted with size factors given as an array: pass the same array to "
        r"ps\.tl\.fit_map_dispersions\(adata, size_factors=\.\.\.\)",
    ),
    "map-with-size-factors-made-again": (
        lambda a: (
            _sf(a),
            ps.tl.fit_genewise_dispersions(
                a, perturbation_column="perturbation", layer="counts"
            ),  # cox-reid: the fits read the counts
            ps.tl.fit_dispersion_trend(a),
            ps.tl.fit_dispersion_prior(a),
            _sf(a, "poscounts"),
        ),
        ps.tl.fit_map_dispersions,
        r"the size factors \(size_factors\) are not those the gene-wise dispersions were fitted with .*: run "
        r"ps\.tl\.fit_genewise_dispersions\(adata, perturbation_column='perturbation', layer='counts'\) again",
    ),
}


@pytest.mark.parametrize("name", sorted(STEP_ORDER))
def test_each_step_names_the_step_before_it(name, tiny, monkeypatch):
    store, call, message = STEP_ORDER[name]
    a = _counts(tiny)
    with dask.config.set(scheduler="synchronous"):
        store(a)
    before = (pickle.dumps(a.obs), pickle.dumps(a.var), pickle.dumps(a.uns))
    _forbid_passes(monkeypatch)
    with pytest.raises(ValueError, match=message):
        call(a)
    monkeypatch.undo()
    assert (pickle.dumps(a.obs), pickle.dumps(a.var), pickle.dumps(a.uns)) == before


def test_main_job_tests_with_the_dispersion_method_asked(sim_h5ad, tmp_path):
    out = tmp_path / "out"
    args = ["run", str(sim_h5ad), "--perturbation-column", "perturbation", "--control-label", "control"]
    args += ["--out", str(out), "--method", "nb-glm", "--dispersion", "moments"]
    args += ["--size-factors", "poscounts", "--scheduler", "synchronous", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    settings = ad.read_zarr(out / "de_nb_glm.zarr").uns["pertscale"]["settings"]
    # the main job used to estimate cox-reid dispersions again inside rank_genes_groups, whatever was asked
    assert settings["dispersion_method"] == "moments"

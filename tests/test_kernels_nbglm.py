"""The negative-binomial kernels alone, against statsmodels, PyDESeq2 and direct formulas on in-memory matrices."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import special, stats

from pertscale.kernels import nbglm as K

from .conftest import assert_close


def _counts(rng, n_cells, n_genes, *, mean=2.0, alpha=0.3, sf=None, effect=None):
    sf = rng.lognormal(0, 0.4, n_cells) if sf is None else sf
    mu = np.outer(sf, rng.lognormal(np.log(mean), 1.0, n_genes))
    if effect is not None:
        mu = mu * effect
    y = rng.negative_binomial(1 / alpha, 1 / (1 + alpha * mu))
    return sp.csr_matrix(y.astype(np.float32)), sf


@pytest.fixture(scope="module")
def two_groups():
    """400 control cells and 120 perturbed cells, 40 genes; the first 10 genes shifted in the group."""
    rng = np.random.default_rng(3)
    n_c, n_g, n_genes = 400, 120, 40
    effect = np.ones((n_c + n_g, n_genes))
    effect[n_c:, :10] = rng.choice([0.3, 2.5], size=10)
    y, sf = _counts(rng, n_c + n_g, n_genes, effect=effect)
    alpha = rng.uniform(0.05, 0.8, n_genes)
    return y, sf, alpha, n_c


def test_frozen_control_equals_a_full_two_group_glm_in_statsmodels(two_groups):
    sm = pytest.importorskip("statsmodels.api")
    y, sf, alpha, n_c = two_groups
    control = K.nb_control(y[:n_c], sf[:n_c], alpha)
    out = K.nbglm_block(
        y[n_c:], [y.shape[0] - n_c], control, rows=sf[n_c:], alpha=alpha, shrink=False, lfc_base="natural"
    )
    stat = {n: i for i, n in enumerate(K.NBGLM_STATS)}
    dense = y.toarray().astype(np.float64)
    design = np.column_stack([np.ones(y.shape[0]), np.r_[np.zeros(n_c), np.ones(y.shape[0] - n_c)]])
    for j in range(y.shape[1]):
        fam = sm.families.NegativeBinomial(alpha=alpha[j])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = sm.GLM(dense[:, j], design, family=fam, offset=np.log(sf)).fit(tol=1e-14, maxiter=200)
        assert_close(control.beta0[0, j], fit.params[0], rtol=1e-6, err_msg=f"beta0 gene {j}")
        assert_close(out[0, stat["logfoldchanges_raw"], j], fit.params[1], rtol=1e-6, atol=1e-9, err_msg=f"gene {j}")
        assert_close(out[0, stat["lfcSE"], j], fit.bse[1], rtol=1e-6, err_msg=f"SE gene {j}")
        assert_close(out[0, stat["pvals"], j], fit.pvalues[1], rtol=1e-5, atol=1e-300, err_msg=f"p gene {j}")
    assert (out[0, stat["converged"]] == 1).all() and (out[0, stat["n_iter"]] < 20).all()


def test_log2_units_and_one_sided_pvalues(two_groups):
    y, sf, alpha, n_c = two_groups
    control = K.nb_control(y[:n_c], sf[:n_c], alpha)
    args = dict(rows=sf[n_c:], alpha=alpha, shrink=False)
    nat = K.nbglm_block(y[n_c:], [y.shape[0] - n_c], control, **args, lfc_base="natural")
    two = K.nbglm_block(y[n_c:], [y.shape[0] - n_c], control, **args)
    greater = K.nbglm_block(y[n_c:], [y.shape[0] - n_c], control, **args, alternative="greater")
    stat = {n: i for i, n in enumerate(K.NBGLM_STATS)}
    assert_close(two[0, stat["logfoldchanges_raw"]], nat[0, stat["logfoldchanges_raw"]] / np.log(2), rtol=1e-12)
    assert_close(two[0, stat["lfcSE"]], nat[0, stat["lfcSE"]] / np.log(2), rtol=1e-12)
    z = two[0, stat["scores"]]
    assert_close(greater[0, stat["pvals"]], stats.norm.sf(z), rtol=1e-10)
    assert_close(two[0, stat["pvals"]], 2 * stats.norm.sf(np.abs(z)), rtol=1e-10)


def test_blocks_of_several_groups_and_control_parts_agree(two_groups):
    y, sf, alpha, n_c = two_groups
    control = K.nb_control(y[:n_c], sf[:n_c], alpha)
    parts = [K.nb_control(y[:n_c, :15], sf[:n_c], alpha[:15]), K.nb_control(y[:n_c, 15:], sf[:n_c], alpha[15:])]
    groups = y[n_c:]
    whole = np.concatenate(
        [
            K.nbglm_block(groups[:50], [50], control, rows=sf[n_c : n_c + 50], alpha=alpha),
            K.nbglm_block(groups[50:], [70], control, rows=sf[n_c + 50 :], alpha=alpha),
        ]
    )
    together = K.nbglm_block(groups, [50, 70], parts, [0, 15, 40], rows=sf[n_c:], alpha=alpha)
    assert_close(together, whole, rtol=1e-12)


def _llf(sm, y, design, sf, alpha):
    """statsmodels' NB GLM at fixed dispersion: its log likelihood and parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = sm.GLM(y, design, family=sm.families.NegativeBinomial(alpha=alpha), offset=np.log(sf)).fit(
            tol=1e-14, maxiter=300
        )
    return fit.llf, fit


@pytest.mark.parametrize("side", ["group", "control"])
def test_one_sided_genes_get_the_likelihood_ratio_test_of_statsmodels_fits(two_groups, side):
    sm = pytest.importorskip("statsmodels.api")
    y, sf, alpha, n_c = two_groups
    dense = y.toarray().astype(np.float64)
    dense[:, 0] = 0  # never detected: untested
    empty = slice(n_c, None) if side == "group" else slice(0, n_c)
    dense[empty, 1:4] = 0  # a complete knock-down (or a gene only the perturbation has), three genes
    dense[:, 4] = 0
    dense[3 if side == "group" else n_c + 3, 4] = 1  # a single count in all
    yy = sp.csr_matrix(dense)
    control = K.nb_control(yy[:n_c], sf[:n_c], alpha)
    out = K.nbglm_block(yy[n_c:], [y.shape[0] - n_c], control, rows=sf[n_c:], alpha=alpha, lfc_base="natural")
    stat = {n: i for i, n in enumerate(K.NBGLM_STATS)}
    assert np.isnan(out[0, stat["pvals"], 0]) and out[0, stat["tested"], 0] == 0
    assert (out[0, stat["tested"], 1:] == 1).all() and (out[0, stat["one_sided"], 1:5] == 1).all()
    assert (out[0, stat["one_sided"], 5:] == 0).all()
    ones = np.ones(y.shape[0])
    kept = np.arange(n_c, y.shape[0]) if side == "control" else np.arange(n_c)  # the side with counts
    for j in range(1, 5):
        # full model: the empty side's mean is 0 (likelihood 1); the other side fitted alone. Reduced: one mean.
        full, fit_side = _llf(sm, dense[kept, j], ones[kept, None], sf[kept], alpha[j])
        reduced, _ = _llf(sm, dense[:, j], ones[:, None], sf, alpha[j])
        lr = 2 * (full - reduced)
        assert_close(out[0, stat["pvals"], j], stats.chi2.sf(lr, 1), rtol=1e-6, atol=1e-300, err_msg=f"gene {j}")
        assert_close(abs(out[0, stat["scores"], j]), np.sqrt(lr), rtol=1e-7, err_msg=f"gene {j}")
        # the fold change at half a count on the empty side (Haldane-Anscombe), finite, of the right sign
        if side == "group":
            expected = np.log(0.5 / (sf[n_c:] * np.exp(fit_side.params[0])).sum())
        else:
            expected = fit_side.params[0] - np.log(0.5 / sf[:n_c].sum())
        assert_close(out[0, stat["logfoldchanges_raw"], j], expected, rtol=1e-7, err_msg=f"gene {j}")
        assert np.sign(out[0, stat["scores"], j]) == (-1 if side == "group" else 1)
        assert np.isfinite(out[0, stat["logfoldchanges"], j]) and np.isnan(out[0, stat["lfcSE"], j])
    # they take part in the multiple-testing correction with every other tested gene
    tested = out[0, stat["tested"]] == 1
    assert_close(out[0, stat["pvals_adj"], tested], stats.false_discovery_control(out[0, stat["pvals"], tested]))


def _map_reference(y, x, sf, alpha, scale):
    """apeGLM's posterior mode of (intercept, b1) by scipy, from its definition (normal(0, 15), Cauchy(0, scale))."""
    from scipy.optimize import minimize

    def negative(theta):
        eta = theta[0] + theta[1] * x + np.log(sf)
        mu = np.exp(eta)
        ll = (y * eta - (y + 1 / alpha) * np.log1p(alpha * mu)).sum()
        return -(ll - theta[0] ** 2 / (2 * 15.0**2) - np.log1p((theta[1] / scale) ** 2))

    start = [np.log((y.sum() + 0.5) / sf.sum()), 0.0]
    best = minimize(negative, start, method="Nelder-Mead", options={"xatol": 1e-11, "fatol": 1e-13, "maxiter": 20000})
    return best.x


def test_apeglm_is_the_joint_posterior_mode(two_groups):
    y, sf, alpha, n_c = two_groups
    control = K.nb_control(y[:n_c], sf[:n_c], alpha)
    out = K.nbglm_block(y[n_c:], [y.shape[0] - n_c], control, rows=sf[n_c:], alpha=alpha, lfc_base="natural")
    stat = {n: i for i, n in enumerate(K.NBGLM_STATS)}
    beta_hat, se = out[0, stat["logfoldchanges_raw"]], out[0, stat["lfcSE"]]
    beta_map = out[0, stat["logfoldchanges"]]
    # the prior scale: apeglm's estimating equation, solved here by scipy on its own
    s, d = beta_hat**2, se**2

    def objective(a):
        c = 1 / (2 * (a + d) ** 2)
        return ((s - d) * c).sum() / c.sum() - a

    from scipy.optimize import brentq

    expected = 1e-6 if objective(1e-6) < 0 else brentq(objective, 1e-6, 400)
    scale = min(np.sqrt(expected), 1.0)
    assert_close(out[0, stat["prior_scale"], 0], scale, rtol=1e-8)
    dense = y.toarray().astype(np.float64)
    x = np.r_[np.zeros(n_c), np.ones(y.shape[0] - n_c)]
    for j in range(y.shape[1]):
        reference = _map_reference(dense[:, j], x, sf, alpha[j], scale)
        assert abs(beta_map[j] - reference[1]) < 1e-6 * max(1.0, abs(reference[1])), j
        assert abs(beta_map[j]) <= abs(beta_hat[j]) + 1e-12  # shrunk towards zero, never past it


def test_apeglm_keeps_the_higher_of_two_posterior_modes():
    """A prior much narrower than a moderate fold change: a mode near 0 and one near the MLE; the higher wins.

    200 genes without effect drive apeglm's prior variance to its floor (scale 1e-3); six genes have fold
    changes of 0.15-0.35 (natural log). The reference: scipy's Nelder-Mead on the joint posterior from both
    ends (0 and the MLE), the better of the two.
    """
    from scipy.optimize import minimize

    rng = np.random.default_rng(11)
    n_c, n_g, n_null = 400, 100, 200
    null, sf = _counts(rng, n_c + n_g, n_null, mean=20.0, alpha=0.1)
    effect = np.ones((n_c + n_g, 6))
    effect[n_c:] = np.exp(np.linspace(0.15, 0.4, 6))
    moderate, _ = _counts(rng, n_c + n_g, 6, mean=1.0, alpha=0.1, sf=sf, effect=effect)
    y = sp.hstack([null, moderate]).tocsr()
    alpha = np.full(y.shape[1], 0.1)
    control = K.nb_control(y[:n_c], sf[:n_c], alpha)
    out = K.nbglm_block(y[n_c:], [n_g], control, rows=sf[n_c:], alpha=alpha, lfc_base="natural")
    stat = {n: i for i, n in enumerate(K.NBGLM_STATS)}
    scale = out[0, stat["prior_scale"], 0]
    assert scale < 0.01
    dense = y.toarray().astype(np.float64)
    x = np.r_[np.zeros(n_c), np.ones(n_g)]
    near_zero = 0
    for j in range(n_null, n_null + 6):
        yj, b_hat = dense[:, j], out[0, stat["logfoldchanges_raw"], j]

        def negative(theta, yj=yj, a=alpha[j]):
            eta = theta[0] + theta[1] * x + np.log(sf)
            ll = (yj * eta - (yj + 1 / a) * np.log1p(a * np.exp(eta))).sum()
            return -(ll - theta[0] ** 2 / (2 * 15.0**2) - np.log1p((theta[1] / scale) ** 2))

        b0 = np.log((yj[:n_c].sum() + 0.5) / sf[:n_c].sum())
        opts = {"xatol": 1e-12, "fatol": 1e-14, "maxiter": 40000}
        modes = [minimize(negative, [b0, b], method="Nelder-Mead", options=opts) for b in (0.0, b_hat)]
        best = min(modes, key=lambda m: m.fun).x[1]
        assert abs(out[0, stat["logfoldchanges"], j] - best) < 1e-6 * max(1.0, abs(best)), (j, b_hat, best)
        two = abs(modes[0].x[1] - modes[1].x[1]) > 0.05
        near_zero += two and abs(best) < 0.01 < abs(b_hat)
    assert near_zero >= 1  # the case this test is for: two modes, the one near 0 the higher


def test_apeglm_equals_pydeseq2s_map_on_a_bulk_like_design():
    """20 vs 20 samples, where holding the intercept at the control's fit would shrink too little."""
    utils = pytest.importorskip("pydeseq2.utils")
    rng = np.random.default_rng(5)
    n, n_genes = 20, 60
    effect = np.ones((2 * n, n_genes))
    effect[n:, :20] = np.exp(rng.normal(0, 1.5, 20))
    y, sf = _counts(rng, 2 * n, n_genes, mean=30.0, alpha=0.1, effect=effect)
    alpha = np.full(n_genes, 0.1)
    control = K.nb_control(y[:n], sf[:n], alpha)
    out = K.nbglm_block(y[n:], [n], control, rows=sf[n:], alpha=alpha, lfc_base="natural")
    stat = {n: i for i, n in enumerate(K.NBGLM_STATS)}
    scale = out[0, stat["prior_scale"], 0]
    dense = y.toarray().astype(np.float64)
    x = np.r_[np.zeros(n), np.ones(n)]
    design = np.column_stack([np.ones(2 * n), x])
    for j in range(n_genes):
        beta, _, _ = utils.nbinomGLM(design, dense[:, j], 1 / alpha[j], np.log(sf), 15, scale, shrink_index=1)
        reference = _map_reference(dense[:, j], x, sf, alpha[j], scale)[1]
        assert abs(out[0, stat["logfoldchanges"], j] - reference) < 1e-6 * max(1.0, abs(reference)), j
        # PyDESeq2's L-BFGS-B stops a little earlier than the mode: within 1e-3
        assert abs(out[0, stat["logfoldchanges"], j] - beta[1]) < 1e-3 * max(0.1, abs(beta[1])), j


def _nb_loglik(y, mu, alpha, *, textbook=False):
    """NB log likelihood per cell; ``textbook``: with gammaln, else the same in log1p terms (exact for small alpha)."""
    r = 1 / alpha
    if textbook:
        out = special.gammaln(y + r) - special.gammaln(r) - special.gammaln(y + 1)
        return out + r * np.log(r / (r + mu)) + y * np.log(mu / (r + mu))
    counts = np.array([np.log1p(np.arange(int(v)) * alpha).sum() for v in y])
    return counts - (r + y) * np.log1p(alpha * mu) + y * np.log(mu) - special.gammaln(y + 1)


def _apl_reference(y, sf, groups, alpha, min_mu):
    """Cox-Reid adjusted profile log likelihood from its definition, per gene: linear-model means held fixed."""
    out = 0.0
    for lo, hi in groups:
        yy, ss = y[lo:hi], sf[lo:hi]
        mu = np.maximum(ss * (yy / ss).mean(), min_mu)
        out += _nb_loglik(yy, mu, alpha).sum() - 0.5 * np.log((mu / (1 + alpha * mu)).sum())
    return out


def test_loglik_reference_is_the_textbook_formula():
    rng = np.random.default_rng(1)
    y = rng.poisson(4, 50).astype(float)
    mu = rng.uniform(0.5, 9, 50)
    for alpha in (0.05, 0.7, 4.0):
        assert_close(_nb_loglik(y, mu, alpha), _nb_loglik(y, mu, alpha, textbook=True), rtol=1e-10)
        assert_close(_nb_loglik(y, mu, alpha), stats.nbinom.logpmf(y, 1 / alpha, 1 / (1 + alpha * mu)), rtol=1e-10)


@pytest.mark.parametrize("alpha", [1e-6, 0.05, 0.7, 30.0])
def test_profile_likelihood_derivatives_match_finite_differences(alpha):
    rng = np.random.default_rng(5)
    y, sf = _counts(rng, 90, 6, mean=3.0, alpha=0.4)
    dense = y.toarray().astype(np.float64)
    dense[0, 0] = 250  # a count past the term-by-term range
    y = sp.csr_matrix(dense)
    groups = [(0, 30), (30, 55), (55, 90)]
    got = K.dispersion_apl_block(y, [30, 25, 35], sf, np.full(6, alpha), min_mu=0.5)
    a, h = np.log(alpha), 1e-4
    for j in range(6):
        f = [_apl_reference(dense[:, j], sf, groups, np.exp(a + k * h), 0.5) for k in (-1, 0, 1)]
        # value up to a constant in alpha: compare differences
        assert_close(got[1, j], (f[2] - f[0]) / (2 * h), rtol=1e-5, atol=1e-6, err_msg=f"gradient {j}")
        assert_close(got[2, j], (f[2] - 2 * f[1] + f[0]) / h**2, rtol=2e-3, atol=1e-3, err_msg=f"curvature {j}")
    other = K.dispersion_apl_block(y, [30, 25, 35], sf, np.full(6, alpha * 1.5), min_mu=0.5)
    for j in range(6):
        diff = _apl_reference(dense[:, j], sf, groups, alpha * 1.5, 0.5) - _apl_reference(
            dense[:, j], sf, groups, alpha, 0.5
        )
        assert_close(other[0, j] - got[0, j], diff, rtol=1e-8, atol=1e-8, err_msg=f"value {j}")


def test_size_factors_poscounts_equal_pydeseq2():
    pytest.importorskip("pydeseq2")
    import anndata as ad
    import pandas as pd
    from pydeseq2.dds import DeseqDataSet

    rng = np.random.default_rng(9)
    y, _ = _counts(rng, 200, 60, mean=1.0, alpha=0.5)
    dense = y.toarray().astype(np.int64)
    sums = K.log_count_sums(y)
    log_mean, usable = K.reference_log_means(sums, y.shape[0], "poscounts")
    ours, _ = K.finish_size_factors(K.cell_size_factors(y, log_mean, usable, "poscounts"))
    obs = pd.DataFrame({"condition": np.repeat(["A", "B"], 100)}, index=[f"c{i}" for i in range(200)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(adata=ad.AnnData(dense, obs=obs), design="~condition", quiet=True)
        dds.fit_size_factors(fit_type="poscounts")
    assert_close(ours, dds.obs["size_factors"].to_numpy(), rtol=1e-10)


def test_size_factors_sparse_and_ratio_from_their_definitions():
    rng = np.random.default_rng(2)
    y, _ = _counts(rng, 150, 50, mean=1.5, alpha=0.2)
    dense = y.toarray().astype(np.float64)
    dense[:, :5] += 1  # five genes without zeros, for the classic method
    y = sp.csr_matrix(dense)
    n = dense.shape[0]
    with np.errstate(divide="ignore"):
        logs = np.where(dense > 0, np.log(dense), np.nan)
    # sparse: geometric means of the non-zero counts; the median of the ratios over a cell's non-zero genes
    geo = np.exp(np.nanmean(logs, axis=0))
    expected = np.array([np.median(dense[i][dense[i] > 0] / geo[dense[i] > 0]) for i in range(n)])
    expected /= np.exp(np.mean(np.log(expected)))
    lm, us = K.reference_log_means(K.log_count_sums(y), n, "sparse")
    assert_close(K.finish_size_factors(K.cell_size_factors(y, lm, us, "sparse"))[0], expected, rtol=1e-12)
    # ratio: genes without zeros only; exp of the median log ratio
    full = (dense > 0).all(axis=0)
    lg = np.log(dense[:, full])
    expected = np.exp(np.median(lg - lg.mean(axis=0), axis=1))  # DESeq2's: not scaled
    lm, us = K.reference_log_means(K.log_count_sums(y), n, "ratio")
    assert us.sum() == full.sum()
    got = K.finish_size_factors(K.cell_size_factors(y, lm, us, "ratio"), rescale=False)[0]
    assert_close(got, expected, rtol=1e-12)


def test_counts_are_checked():
    with pytest.raises(ValueError, match="non-integer values.*raw counts.*--layer counts"):
        K.log_count_sums(sp.csr_matrix(np.array([[0.5, 1.0]])))
    with pytest.raises(ValueError, match="negative"):
        K.nb_control(sp.csr_matrix(np.array([[-1.0, 1.0]])), np.ones(1), np.ones(2))
    with pytest.raises(ValueError, match="do not split"):
        K.nbglm_block(
            sp.csr_matrix(np.ones((3, 2))),
            [2],
            K.nb_control(sp.csr_matrix(np.ones((3, 2))), np.ones(3), np.ones(2)),
            rows=np.ones(3),
            alpha=np.ones(2),
        )


@pytest.mark.parametrize("n_c", [600, 40])
def test_covariates_are_fitted_exactly_as_statsmodels_full_glm(n_c):
    """``~ rep + perturbation`` by maximum likelihood, every coefficient, a large control and a balanced design."""
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(11)
    n_g, n_genes = 40 if n_c == 40 else 200, 12
    rep = np.r_[rng.integers(0, 2, n_c), (rng.random(n_g) < 0.85).astype(int)]  # the group mostly in replicate 1
    effect = np.where(rep[:, None] == 1, 3.0, 1.0) * np.ones((n_c + n_g, n_genes))
    effect[n_c:, :4] *= 0.4  # four genes knocked down
    y, sf = _counts(rng, n_c + n_g, n_genes, effect=effect, alpha=0.2)
    alpha = np.full(n_genes, 0.2)
    rows = np.column_stack([sf, rep])
    design = np.array([[1.0, 0.0], [1.0, 1.0]])  # DESeq2's: an intercept and replicate 1's indicator
    control = K.nb_control(y[:n_c], rows[:n_c], alpha, n_levels=2, design=design)
    out = K.nbglm_block(y[n_c:], [n_g], control, rows=rows[n_c:], alpha=alpha, shrink=False, lfc_base="natural")
    stat = {n: i for i, n in enumerate(K.NBGLM_STATS)}
    dense = y.toarray().astype(np.float64)
    x = np.r_[np.zeros(n_c), np.ones(n_g)]
    full = np.column_stack([np.ones(n_c + n_g), rep, x])
    for j in range(n_genes):
        _, fit = _llf(sm, dense[:, j], full, sf, 0.2)
        assert_close(out[0, stat["logfoldchanges_raw"], j], fit.params[2], rtol=1e-6, atol=1e-9, err_msg=f"{j}")
        assert_close(out[0, stat["lfcSE"], j], fit.bse[2], rtol=1e-6, err_msg=f"SE {j}")
        assert_close(out[0, stat["pvals"], j], fit.pvalues[2], rtol=1e-5, atol=1e-300, err_msg=f"p {j}")
        # the control's own fit of the covariates' coefficients, as statsmodels fits the control alone
        _, alone = _llf(sm, dense[:n_c, j], full[:n_c, :2], sf[:n_c], 0.2)
        assert_close(control.gamma[j], alone.params, rtol=1e-6, atol=1e-9, err_msg=f"gamma {j}")
    with pytest.raises(ValueError, match="covariate level 2 has no control fit"):
        K.nbglm_block(y[n_c:], [n_g], control, rows=np.column_stack([sf[n_c:], np.full(n_g, 2)]), alpha=alpha)


def test_a_level_without_control_counts_converges_to_statsmodels_fit():
    """The control's level-1 coefficient goes to -inf alone; with the group's counts there the fit is finite."""
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(8)
    level = np.r_[np.repeat([0, 1], 100), np.repeat([0, 1], 30)]
    y = rng.poisson(5.0, (260, 3)).astype(np.float64)
    y[100:200] = 0  # no count in the control's level 1
    y[200:, 2] = 0  # gene 2: none in the group either: no count in any cell of the group's... level 0 has some
    sf = np.ones(260)
    design = np.array([[1.0, 0.0], [1.0, 1.0]])
    alpha = np.full(3, 0.1)
    rows = np.column_stack([sf, level])
    control = K.nb_control(sp.csr_matrix(y[:200]), rows[:200], alpha, n_levels=2, design=design)
    assert (control.gamma[:, 1] == -30.0).all()  # pinned at the bound, not drifting
    out = K.nbglm_block(sp.csr_matrix(y[200:]), [60], control, rows=rows[200:], alpha=alpha, shrink=False,
                        lfc_base="natural")  # fmt: skip
    stat = {n: i for i, n in enumerate(K.NBGLM_STATS)}
    full = np.column_stack([design[level], np.r_[np.zeros(200), np.ones(60)]])
    for j in range(2):
        _, fit = _llf(sm, y[:, j], full, sf, 0.1)
        assert out[0, stat["converged"], j] == 1, j
        assert_close(out[0, stat["logfoldchanges_raw"], j], fit.params[2], rtol=1e-6, err_msg=f"gene {j}")
    assert out[0, stat["one_sided"], 2] == 1 and np.isfinite(out[0, stat["pvals"], 2])


def test_every_coefficient_of_a_two_covariate_additive_design_equals_statsmodels():
    """``~ a + b + perturbation``: DESeq2's additive design, not one intercept per combination of levels."""
    sm = pytest.importorskip("statsmodels.api")
    from pertscale.kernels.nbglm._counts import normalized_csc
    from pertscale.kernels.nbglm._score import fit_comparison

    rng = np.random.default_rng(2)
    n_c, n_g, n_genes = 60, 30, 6
    a, b = rng.integers(0, 2, n_c + n_g), rng.integers(0, 3, n_c + n_g)
    level = a * 3 + b  # the combination's code
    design = np.array([[1.0, i, j == 1, j == 2] for i in range(2) for j in range(3)], dtype=np.float64)
    effect = np.exp(0.5 * a - 0.4 * (b == 1) + 0.7 * (b == 2))[:, None] * np.ones((1, n_genes))
    effect[n_c:] *= 2.0
    y, sf = _counts(rng, n_c + n_g, n_genes, mean=5.0, effect=effect, alpha=0.15)
    alpha = np.full(n_genes, 0.15)
    control = K.nb_control(y[:n_c], np.column_stack([sf, level])[:n_c], alpha, n_levels=6, design=design)
    ptr, rows, yv, _ = normalized_csc(y[n_c:], sf[n_c:])
    dense = y.toarray().astype(np.float64)
    full = np.column_stack([design[level], np.r_[np.zeros(n_c), np.ones(n_g)]])
    for j in range(n_genes):
        theta, ok, _, _, information = fit_comparison(
            0, n_g, ptr[j], ptr[j + 1], rows, yv, sf[n_c:], level[n_c:], alpha[j], j, design,
            np.ones(6, dtype=np.bool_), control.centres, control.y_coef, control.dy_coef, control.q_coef,
            control.dq_coef, np.r_[control.gamma[j], 0.0], True, True, True, 0.0, 100, 1e-12,
        )  # fmt: skip
        _, fit = _llf(sm, dense[:, j], full, sf, 0.15)
        assert ok
        assert_close(theta, fit.params, rtol=1e-6, atol=1e-9, err_msg=f"gene {j}")
        assert_close(np.sqrt(np.diag(np.linalg.inv(information))), fit.bse, rtol=1e-6, err_msg=f"SE gene {j}")


def test_dispersion_prior_and_outliers_from_their_definitions():
    rng = np.random.default_rng(3)
    trend = rng.uniform(0.05, 2.0, 200)
    genewise = trend * np.exp(rng.normal(0.0, 0.8, 200))
    genewise[:3] = np.nan  # genes without counts
    genewise[3] = 1e-9  # below 100 x the smallest dispersion: left out of the spread
    prior, squared_logres = K.dispersion_prior(genewise, trend, n_cells=50, n_params=5)
    residuals = np.log(genewise[4:]) - np.log(trend[4:])
    assert_close(squared_logres, stats.median_abs_deviation(residuals, scale="normal") ** 2, rtol=1e-6)
    assert_close(prior, max(squared_logres - special.polygamma(1, (50 - 5) / 2), 0.25), rtol=1e-12)
    posterior = trend * 1.1
    final, outlier = K.final_dispersions(genewise, trend, posterior, squared_logres=squared_logres, max_disp=10.0)
    with np.errstate(invalid="ignore"):
        far = np.log(genewise) - np.log(trend) > 2 * np.sqrt(squared_logres)
    assert outlier.any() and (outlier == far).all()
    expected = np.clip(np.where(far, genewise, posterior), K.MIN_DISP, 10.0)
    assert np.isnan(final[:3]).all()
    assert_close(final[3:], expected[3:], rtol=0)


def test_groups_pack_into_blocks_without_being_split():
    from pertscale.kernels.groups import group_pointers, pack_groups

    sizes = np.array([3, 4, 10, 2, 2])
    assert pack_groups(sizes, 6) == (3, 4, 10, 4)  # the group of 10 alone, longer than the budget
    assert pack_groups(sizes, 100) == (21,)
    assert pack_groups(np.array([], dtype=int), 6) == (0,)
    assert group_pointers(sizes).tolist() == [0, 3, 7, 17, 19, 21]

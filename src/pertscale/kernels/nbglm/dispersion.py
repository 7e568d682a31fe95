"""Dispersions: DESeq2's gene-wise Cox-Reid estimates, trend, prior and maximum a posteriori.

Pure functions of one in-memory block of raw counts, or of small per-gene
arrays; the passes over row blocks are :mod:`pertscale.tl._nbglm`'s. The
model (Love, Huber & Anders 2014), per gene: ``y_i ~ NB(mu_i, alpha)``,
``Var y_i = mu_i + alpha mu_i^2``, for the one-hot design of every label
(each group's mean fitted by the linear model, the group mean of normalized
counts ``z = y / s``, as DESeq2 and PyDESeq2 do for designs of groups, and
held fixed). The additive design of covariates, whose means are the GLM's,
is :mod:`._additive`'s.

1. Starting values (:func:`dispersion_moments_block`,
   :func:`starting_dispersions`): the smaller of DESeq2's rough (linear
   model) and moments estimates.
2. Gene-wise estimates (:func:`dispersion_apl_block`): each gene's Cox-Reid
   adjusted profile log likelihood (Cox & Reid 1987) in ``log alpha`` is a
   sum over cells plus ``-1/2 sum_groups log W_g``, so every block adds its
   groups' value, gradient and curvature, and a Newton step per pass finds
   the maximum.
3. The trend ``alpha(mu) = a0 + a1 / mu`` (:func:`fit_trend`, DESeq2's
   parametric fit, PyDESeq2's ``fit_dispersion_trend``).
4. The prior (:func:`dispersion_prior`): log-normal around the trend, its
   variance from the log residuals (PyDESeq2's ``fit_dispersion_prior``).
5. The maximum a posteriori: Newton passes on the likelihood of 2 plus the
   prior; genes far above the trend keep their gene-wise estimate
   (:func:`final_dispersions`, PyDESeq2's ``fit_MAP_dispersions``).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import lgamma

import numpy as np
from numba import njit
from scipy import special

from .._common import canonical_csr
from ..groups import group_pointers
from ._counts import check_counts, normalized_csc

#: Smallest and largest dispersion estimated (DESeq2's ``minDisp``; its ``maxDisp`` is ``max(10, n)``).
MIN_DISP = 1e-8
#: Counts up to this are summed term by term in the dispersion likelihood; above, through digamma.
DIRECT_COUNT = 64


@njit(cache=True, nogil=True)
def _digamma(x):
    r = 0.0
    while x < 6.0:
        r -= 1.0 / x
        x += 1.0
    f = 1.0 / (x * x)
    return r + np.log(x) - 0.5 / x - f * (1.0 / 12 - f * (1.0 / 120 - f * (1.0 / 252 - f * (1.0 / 240 - f / 132))))


@njit(cache=True, nogil=True)
def _trigamma(x):
    r = 0.0
    while x < 6.0:
        r += 1.0 / (x * x)
        x += 1.0
    f = 1.0 / (x * x)
    return r + 1.0 / x + f / 2.0 + (1.0 / (x * x * x)) * (1.0 / 6 - f * (1.0 / 30 - f * (1.0 / 42 - f / 30)))


@njit(cache=True, nogil=True)
def _count_terms(y, alpha):
    """``sum_{j<y} log(1 + j alpha)`` and its first two derivatives in ``log alpha``."""
    v = 0.0
    d1 = 0.0
    d2 = 0.0
    if y <= DIRECT_COUNT:
        for j in range(1, int(y)):
            t = j * alpha
            v += np.log1p(t)
            d1 += t / (1.0 + t)
            d2 += t / ((1.0 + t) * (1.0 + t))
        return v, d1, d2
    r = 1.0 / alpha
    psi = _digamma(r + y) - _digamma(r)
    tri = _trigamma(r) - _trigamma(r + y)
    v = y * np.log(alpha) + lgamma(r + y) - lgamma(r)
    d1 = y - r * psi
    d2 = r * psi - r * r * tri
    return v, d1, d2


@dataclass(frozen=True)
class CountColumns:
    """A block of raw counts by gene, ready for the dispersion kernels (made once, used by every pass).

    Attributes
    ----------
    shape
        ``(n_rows, n_genes)``.
    ptr, rows, y, z
        CSC layout: gene ``j``'s non-zero counts ``y[ptr[j]:ptr[j + 1]]`` at
        rows ``rows[...]`` (ascending), and ``z = y / s``.
    size_factors
        ``(n_rows,)`` float64.
    """

    shape: tuple[int, int]
    ptr: np.ndarray
    rows: np.ndarray
    y: np.ndarray
    z: np.ndarray
    size_factors: np.ndarray

    @property
    def nbytes(self) -> int:
        """Memory held, in bytes."""
        return sum(a.nbytes for a in (self.ptr, self.rows, self.y, self.z, self.size_factors))


def count_columns(block, size_factors: np.ndarray) -> CountColumns:
    """A raw count block (CSR) as :class:`CountColumns`.

    Raises
    ------
    ValueError
        If the block does not hold raw counts.
    """
    block = canonical_csr(block)
    check_counts(block)
    sf = np.asarray(size_factors, dtype=np.float64)
    ptr, rows, y, z = normalized_csc(block, sf)
    return CountColumns(shape=block.shape, ptr=ptr, rows=rows.astype(np.int32), y=y, z=z, size_factors=sf)


def dispersion_moments_block(block, group_sizes: np.ndarray, size_factors: np.ndarray | None = None) -> np.ndarray:
    """Per gene sums for DESeq2's starting dispersions, from a block of whole groups.

    Returns
    -------
    numpy.ndarray
        ``(4, n_genes)`` float64: ``sum z``, ``sum z^2`` over all the block's
        cells (``z = y / s``, for the moments estimate), the rough estimate's
        numerator ``sum_g sum_i ((z_i - zbar_g)^2 - zbar_g) / zbar_g^2`` with
        ``zbar_g = max(group mean of z, 1)`` (DESeq2's ``roughDispEstimate``),
        and the number of groups in the block (same in every gene).
    """
    cols = block if isinstance(block, CountColumns) else count_columns(block, size_factors)
    group_ptr = group_pointers(group_sizes)
    ptr, rows, z = cols.ptr, cols.rows, cols.z
    n_genes = cols.shape[1]
    n_groups = group_ptr.shape[0] - 1
    row_group = np.repeat(np.arange(n_groups), np.diff(group_ptr))
    gene = np.repeat(np.arange(n_genes), np.diff(ptr))
    key = row_group[rows] * n_genes + gene
    size = n_groups * n_genes
    s1 = np.bincount(key, z, minlength=size).reshape(n_groups, n_genes)
    s2 = np.bincount(key, z * z, minlength=size).reshape(n_groups, n_genes)
    m = np.diff(group_ptr).astype(np.float64)[:, None]
    zbar = np.maximum(s1 / m, 1.0)
    rough = ((s2 - 2.0 * zbar * s1 + m * zbar * zbar - m * zbar) / (zbar * zbar)).sum(axis=0)
    out = np.empty((4, n_genes))
    out[0], out[1], out[2], out[3] = s1.sum(axis=0), s2.sum(axis=0), rough, n_groups
    return out


def starting_dispersions(sums: np.ndarray, inv_size_factor_mean: float, n_cells: int) -> np.ndarray:
    """DESeq2's starting dispersions: the smaller of the rough and moments estimates, clipped.

    Where the rough estimate is 0 (sparse single-cell genes: its means are
    floored at 1) the moments estimate is taken.

    Parameters
    ----------
    sums
        :func:`dispersion_moments_block` summed over every block.
    inv_size_factor_mean
        Mean of ``1 / s`` over all cells.
    n_cells
        Cells of every group.
    """
    s1, s2, rough, n_groups = sums
    with np.errstate(divide="ignore", invalid="ignore"):
        rough = np.maximum(rough / (n_cells - n_groups), 0.0)
        mean = s1 / n_cells
        var = (s2 - n_cells * mean * mean) / (n_cells - 1)
        moments = np.nan_to_num((var - inv_size_factor_mean * mean) / (mean * mean))
    # DESeq2 starts from the smaller; the rough estimate (means floored at 1) is 0 for sparse single-cell genes
    start = np.where(rough > MIN_DISP, np.minimum(rough, moments), moments)
    return np.clip(start, MIN_DISP, max(10.0, float(n_cells)))


@njit(cache=True, nogil=True)
def _count_table(a, tv, t1, t2):
    """``sum_{j<c} log1p(j a)`` and its derivatives in ``log a``, for ``c`` up to :data:`DIRECT_COUNT` (cumulative)."""
    for c in range(1, DIRECT_COUNT + 1):
        t = (c - 1) * a
        tv[c] = tv[c - 1] + np.log1p(t)
        t1[c] = t1[c - 1] + t / (1.0 + t)
        t2[c] = t2[c - 1] + t / ((1.0 + t) * (1.0 + t))


@njit(cache=True, nogil=True)
def _apl(group_ptr, ptr, rows, y, z, sf, alpha, means, min_mu, active, out):
    # out[0:3, j]: value, d/da, d2/da2 of sum_i l_i - 1/2 sum_g log W_g (a = log alpha), this block's groups;
    # means: (n_groups, n_genes) fixed group means of z, or empty to take them from the block.
    # Per cell, with u = alpha mu, h = 1 / (1 + u), g = log1p(u) / u and p = h - g:
    # -(1/alpha) log1p(u) = -mu g; its d/da = -mu p; its d2/da2 = mu (p + u h^2)
    n_groups = group_ptr.shape[0] - 1
    n_genes = ptr.shape[0] - 1
    given = means.shape[0] > 0
    # sum_{j<y} log1p(j a) and its derivatives for y <= DIRECT_COUNT, one table per gene (cumulative in y)
    tv = np.zeros(DIRECT_COUNT + 1)
    t1 = np.zeros(DIRECT_COUNT + 1)
    t2 = np.zeros(DIRECT_COUNT + 1)
    for j in range(n_genes):
        if not active[j]:
            continue
        a = alpha[j]
        k = ptr[j]
        end = ptr[j + 1]
        _count_table(a, tv, t1, t2)
        v0 = 0.0
        v1 = 0.0
        v2 = 0.0
        for g in range(n_groups):
            lo = group_ptr[g]
            hi = group_ptr[g + 1]
            if given:
                mbar = means[g, j]
            else:
                total = 0.0
                kk = k
                while kk < end and rows[kk] < hi:
                    total += z[kk]
                    kk += 1
                mbar = total / (hi - lo)
            w = 0.0
            w1 = 0.0
            w2 = 0.0
            for i in range(lo, hi):
                # the cell's terms written out (the same in _additive._apl_block): a helper called per cell made
                # this loop 2.4x slower
                mu = sf[i] * mbar
                if mu < min_mu:
                    mu = min_mu
                u = a * mu
                h = 1.0 / (1.0 + u)
                if u < 1e-3:  # series: h - g cancels
                    gv = 1.0 - u * (0.5 - u * (1.0 / 3.0 - 0.25 * u))
                    p = -u * (0.5 - u * (2.0 / 3.0 - u * (0.75 - 0.8 * u)))
                    lp = u * gv
                else:
                    lp = np.log1p(u)
                    gv = lp / u
                    p = h - gv
                uh2 = u * h * h
                v0 -= mu * gv
                v1 -= mu * p
                v2 += mu * (p + uh2)
                if k < end and rows[k] == i:
                    yi = y[k]
                    if yi <= DIRECT_COUNT:
                        c = int(yi)
                        cv, c1, c2 = tv[c], t1[c], t2[c]
                    else:
                        cv, c1, c2 = _count_terms(yi, a)
                    v0 += cv - yi * lp
                    v1 += c1 - yi * u * h
                    v2 += c2 - yi * uh2
                    k += 1
                w += mu * h
                w1 -= mu * uh2
                w2 += mu * uh2 * (2.0 * u * h - 1.0)
            if not given:
                v0 -= 0.5 * np.log(w)
                v1 -= 0.5 * w1 / w
                v2 -= 0.5 * (w2 / w - (w1 / w) ** 2)
            else:
                out[3, j] += w
                out[4, j] += w1
                out[5, j] += w2
        out[0, j] += v0
        out[1, j] += v1
        out[2, j] += v2


def dispersion_apl_block(
    block,
    group_sizes: np.ndarray,
    size_factors: np.ndarray | None,
    alpha: np.ndarray,
    *,
    means: np.ndarray | None = None,
    min_mu: float = 0.5,
    active: np.ndarray | None = None,
) -> np.ndarray:
    """A block's share of each gene's Cox-Reid adjusted profile log likelihood, with derivatives.

    Parameters
    ----------
    block
        ``(n_rows, n_genes)`` raw counts, CSR, rows in groups, or their
        :class:`CountColumns` (then ``size_factors`` is ignored).
    group_sizes
        Rows of each group, in order. Each group is whole in this block,
        unless ``means`` is given (the cells of one large group, the
        control, in any number of pieces).
    size_factors
        ``(n_rows,)`` size factors.
    alpha
        ``(n_genes,)`` dispersions at which to evaluate.
    means
        ``(n_groups, n_genes)`` the groups' means of ``y / s``, for groups
        that are not whole here; then ``W_g`` and its derivatives are
        returned instead of ``-1/2 log W_g`` (summed over the pieces by the
        caller).
    min_mu
        Lower bound of the fitted means (DESeq2's ``minmu``).
    active
        ``(n_genes,)`` genes to evaluate; the others are left at zero.

    Returns
    -------
    numpy.ndarray
        ``(6, n_genes)`` float64: value, first and second derivative in
        ``log alpha`` of ``sum_i l_i`` (plus ``-1/2 sum_g log W_g`` for whole
        groups), constants in alpha left out; rows 3-5: ``W``, ``dW``,
        ``d2W`` of the pieces (``means`` given), else zero.
    """
    cols = block if isinstance(block, CountColumns) else count_columns(block, size_factors)
    group_ptr = group_pointers(group_sizes)
    n_genes = cols.shape[1]
    out = np.zeros((6, n_genes))
    _apl(
        group_ptr,
        cols.ptr,
        cols.rows,
        cols.y,
        cols.z,
        cols.size_factors,
        np.asarray(alpha, dtype=np.float64),
        np.empty((0, 0)) if means is None else np.ascontiguousarray(means, dtype=np.float64),
        float(min_mu),
        np.ones(n_genes, dtype=np.bool_) if active is None else np.asarray(active, dtype=np.bool_),
        out,
    )
    return out


def fit_trend(genewise: np.ndarray, base_mean: np.ndarray, *, min_disp: float = MIN_DISP) -> tuple[np.ndarray, dict]:
    """DESeq2's parametric dispersion trend ``alpha(mu) = a0 + a1 / mu``; a mean if it fails.

    Fitted as PyDESeq2's ``_fit_parametric_dispersion_trend``: a Gamma
    family GLM with identity link (minimizing ``mean(alpha / f + log f)``)
    on genes whose gene-wise estimate is at least ``100 * min_disp``,
    refitted without genes whose ratio to the curve is below 1e-4 or at
    least 15 until the coefficients settle. When it does not converge (or a
    coefficient falls to zero), a trimmed mean of the estimates above
    ``10 * min_disp`` (DESeq2's ``fitType="mean"``); the caller says so.

    Parameters
    ----------
    genewise
        ``(n_genes,)`` gene-wise dispersions, NaN for genes without counts.
    base_mean
        ``(n_genes,)`` mean normalized counts (``mu``).
    min_disp
        The smallest dispersion estimated.

    Returns
    -------
    tuple
        ``(trend at every gene's base_mean, {"type": "parametric", "a0", "a1"}
        or {"type": "mean", "mean"})``.
    """
    from scipy.optimize import minimize
    from scipy.stats import trim_mean

    usable = np.isfinite(genewise) & (base_mean > 0) & (genewise >= 100 * min_disp)
    covariate, target = 1.0 / base_mean[usable], genewise[usable]
    coeffs, old = np.array([1.0, 1.0]), np.array([0.1, 0.1])
    ok = covariate.size >= 3
    while ok and (coeffs > 1e-10).all() and (np.log(np.abs(coeffs / old)) ** 2).sum() >= 1e-6:
        old = coeffs
        design = np.column_stack([np.ones_like(covariate), covariate])

        def loss(c, design=design, target=target):
            f = design @ c
            return float(np.mean(target / f + np.log(f)))

        def grad(c, design=design, target=target):
            f = design @ c
            return -np.mean(((target / f - 1.0) / f)[:, None] * design, axis=0)

        with np.errstate(all="ignore"):
            res = minimize(loss, x0=np.array([1.0, 1.0]), jac=grad, method="L-BFGS-B", bounds=[(1e-12, None)] * 2)
        coeffs, ok = res.x, bool(res.success) and np.isfinite(res.x).all()
        if not ok or (coeffs <= 1e-10).any():
            ok = False
            break
        ratio = target / (design @ coeffs)
        keep = (ratio >= 1e-4) & (ratio < 15)
        covariate, target = covariate[keep], target[keep]
    with np.errstate(divide="ignore"):
        if ok:
            return coeffs[0] + coeffs[1] / base_mean, {"type": "parametric", "a0": coeffs[0], "a1": coeffs[1]}
    above = genewise[np.isfinite(genewise) & (genewise > 10 * min_disp)]
    mean = float(trim_mean(above, proportiontocut=0.001)) if above.size else min_disp
    return np.full_like(base_mean, mean), {"type": "mean", "mean": mean}


def dispersion_prior(
    genewise: np.ndarray, trend: np.ndarray, *, n_cells: int, n_params: int, min_disp: float = MIN_DISP
) -> tuple[float, float]:
    """The variance of DESeq2's log-normal prior on the dispersions around their trend.

    As PyDESeq2's ``fit_dispersion_prior``: over genes whose gene-wise
    estimate is at least ``100 * min_disp``, the squared median absolute
    deviation (scaled to a normal's standard deviation) of the log residuals
    ``log genewise - log trend``, less the sampling variance of a log
    dispersion, ``trigamma((n_cells - n_params) / 2)``; at least 0.25.

    Parameters
    ----------
    genewise, trend
        ``(n_genes,)`` gene-wise dispersions and the trend at each gene (NaN
        for genes without counts).
    n_cells, n_params
        Cells, and groups of the design (its columns).
    min_disp
        The smallest dispersion estimated.

    Returns
    -------
    tuple
        ``(prior_variance, squared_logres)``: both in ``(log alpha)^2``;
        ``squared_logres`` also marks dispersion outliers
        (:func:`final_dispersions`).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        residual = np.log(genewise) - np.log(trend)
    fit_genes = np.isfinite(genewise) & (genewise >= 100 * min_disp) & np.isfinite(residual)
    mad = float(np.median(np.abs(residual[fit_genes] - np.median(residual[fit_genes]))) / 0.6744897501960817)
    squared_logres = mad * mad
    prior_var = max(squared_logres - float(special.polygamma(1, (n_cells - n_params) / 2.0)), 0.25)
    return prior_var, squared_logres


def final_dispersions(
    genewise: np.ndarray,
    trend: np.ndarray,
    posterior: np.ndarray,
    *,
    squared_logres: float,
    max_disp: float,
    min_disp: float = MIN_DISP,
) -> tuple[np.ndarray, np.ndarray]:
    """The dispersions a test uses: the maximum a posteriori, except for DESeq2's dispersion outliers.

    A gene whose log gene-wise estimate is more than ``2 sqrt(squared_logres)``
    above its log trend keeps the gene-wise estimate (PyDESeq2's
    ``fit_MAP_dispersions``); all are clipped to ``[min_disp, max_disp]``.

    Parameters
    ----------
    genewise, trend, posterior
        ``(n_genes,)`` gene-wise estimates, trend and maximum a posteriori
        estimates; NaN gene-wise for genes without counts.
    squared_logres, max_disp, min_disp
        From :func:`dispersion_prior`; the range of the estimates.

    Returns
    -------
    tuple
        ``(dispersion, outlier)``: ``(n_genes,)`` float64 (NaN for genes
        without counts) and bool.
    """
    expressed = np.isfinite(genewise)
    with np.errstate(divide="ignore", invalid="ignore"):
        residual = np.log(genewise) - np.log(trend)
        outlier = expressed & (residual > 2.0 * np.sqrt(squared_logres))
    final = np.where(outlier, genewise, posterior)
    return np.where(expressed, np.clip(final, min_disp, max_disp), np.nan), outlier

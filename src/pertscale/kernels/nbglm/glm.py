"""The GLM against a frozen control: the control fit, the Wald test, apeGLM shrinkage.

Pure functions of one in-memory block of raw counts; nothing here knows
about Dask. The model, per gene, for the cells of one perturbation and the
control cells (DESeq2's, Love, Huber & Anders 2014)::

    y_i ~ NB(mu_i, alpha),   Var y_i = mu_i + alpha mu_i^2,
    log mu_i = beta0 + beta1 x_i + log s_i,

``x_i`` = 1 for the perturbation's cells, 0 for control, ``s_i`` the
cell's size factor, ``alpha`` the gene's dispersion, shared by all cells.
The score equations of ``(beta0, beta1)`` are ``sum_control r_i = 0`` and
``sum_group r_i = 0`` with ``r_i = (y_i - mu_i) / (1 + alpha mu_i)``: the
maximum likelihood ``beta0`` depends on the control cells alone, so it is
computed once (:func:`nb_control`) and frozen exactly, and ``beta1`` solves
a one-dimensional equation over the perturbation's cells alone
(:func:`nbglm_block`). With ``I = sum mu_i / (1 + alpha mu_i)`` on each side
(the expected information), the Wald variance of ``beta1`` from the 2x2
information matrix is ``1 / I_control + 1 / I_group``. apeGLM's shrinkage
(Zhu, Ibrahim & Love 2019) is the maximum a posteriori ``beta1`` under a
Cauchy prior (:func:`prior_variance`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit

from ...variables import (
    BASE_MEAN,
    CONVERGED,
    LFC_SE,
    LFC_SE_SHRUNK,
    LOGFOLDCHANGES,
    LOGFOLDCHANGES_RAW,
    N_ITER,
    PRIOR_SCALE,
    PTS,
    PTS_REST,
    PVALS,
    PVALS_ADJ,
    SCORES,
    STATISTICS,
)
from .._common import adjust_pvalues, block_inputs, canonical_csr, exclude_low_genes, normal_pvalues
from ..groups import group_pointers
from ._counts import check_counts, normalized_csc


@dataclass(frozen=True)
class NBControl:
    """Frozen per-gene fit of the control cells, per level of the covariates (one level without).

    Attributes
    ----------
    n_cells
        Number of control cells.
    beta0
        ``(n_levels, n_genes)`` float64 maximum likelihood intercepts of each
        level's control cells (natural log of their mean per unit size
        factor); ``-inf`` where they have no count.
    information
        ``(n_levels, n_genes)`` float64 ``I_c = sum mu_i / (1 + alpha mu_i)``
        over each level's control cells at its intercept.
    converged
        ``(n_genes,)`` bool, every level's fit.
    nnz
        ``(n_genes,)`` int64 control cells with a count.
    normalized_sum
        ``(n_genes,)`` float64 sum of ``y / s`` (DESeq2's ``baseMean`` numerator).
    """

    n_cells: int
    beta0: np.ndarray
    information: np.ndarray
    converged: np.ndarray
    nnz: np.ndarray
    normalized_sum: np.ndarray

    @property
    def n_genes(self) -> int:
        """Number of genes summarised."""
        return self.beta0.shape[-1]


@njit(cache=True, nogil=True)
def _score(lo, hi, first, end, rows, y, sf, lev, eoff, alpha, beta):
    """Score, expected and observed information of beta over rows [lo, hi); mu_i = s_i eoff[lev_i] exp(beta)."""
    score = 0.0
    info = 0.0
    deriv = 0.0
    k = first
    e = np.exp(beta)
    for i in range(lo, hi):
        mu = sf[i] * eoff[lev[i]] * e
        h = 1.0 / (1.0 + alpha * mu)
        yi = 0.0
        if k < end and rows[k] == i:
            yi = y[k]
            k += 1
        score += (yi - mu) * h
        info += mu * h
        deriv += mu * (1.0 + alpha * yi) * h * h
    return score, info, deriv


@njit(cache=True, nogil=True)
def _intercept(lo, hi, k0, end, rows, y, sf, lev, eoff, alpha, max_iter, tol):
    """Solve sum_i (y_i - mu_i) / (1 + alpha mu_i) = 0 over rows [lo, hi), mu_i = s_i eoff[lev_i] exp(b), for b.

    The score is decreasing in b; Newton steps kept inside a bracket, bisection when they leave it.
    Returns (b, converged, iterations); -inf when the rows have no count.
    """
    ysum = 0.0
    ssum = 0.0
    for k in range(k0, end):
        if rows[k] >= hi:
            break
        ysum += y[k]
    for i in range(lo, hi):
        ssum += sf[i] * eoff[lev[i]]
    if ysum <= 0.0 or ssum <= 0.0:
        return -np.inf if ysum <= 0.0 else np.inf, True, 0
    b = np.log(ysum / ssum)  # the Poisson solution: exact when alpha = 0
    left = -np.inf
    right = np.inf
    for it in range(1, max_iter + 1):
        score, _, deriv = _score(lo, hi, k0, end, rows, y, sf, lev, eoff, alpha, b)
        if score > 0:
            left = b
        else:
            right = b
        step = score / deriv
        if abs(step) < tol:
            return b + step, True, it
        new = b + step
        if not (left < new < right):  # outside what the signs of the score allow: bisect (or move by 1)
            new = 0.5 * (left + right) if np.isfinite(left) and np.isfinite(right) else b + np.sign(step) * 1.0
        b = new
    return b, False, max_iter


@njit(cache=True, nogil=True)
def _precision(lo, hi, sf, lev, eoff, alpha, beta, info_c, j):
    """``sum_levels I_g I_c / (I_g + I_c)``: the information on beta1 with every level's intercept free.

    With one level, ``1 / (1/I_c + 1/I_g)``. Returns (precision, I_g in all).
    """
    n_levels = info_c.shape[0]
    ig = np.zeros(n_levels)
    e = np.exp(beta)
    for i in range(lo, hi):
        mu = sf[i] * eoff[lev[i]] * e
        ig[lev[i]] += mu / (1.0 + alpha * mu)
    total = 0.0
    for level in range(n_levels):
        c = info_c[level, j]
        if ig[level] > 0 and c > 0:
            total += ig[level] * c / (ig[level] + c)
    return total, ig.sum()


@njit(cache=True, nogil=True)
def _control_fit(level_ptr, ptr, rows, y, sf, alpha, max_iter, tol, beta0, info, converged):
    lev = np.zeros(sf.shape[0], dtype=np.int64)
    one = np.ones(1)
    for j in range(ptr.shape[0] - 1):
        k = ptr[j]
        end = ptr[j + 1]
        converged[j] = True
        for level in range(level_ptr.shape[0] - 1):
            lo = level_ptr[level]
            hi = level_ptr[level + 1]
            while k < end and rows[k] < lo:
                k += 1
            b, ok, _ = _intercept(lo, hi, k, end, rows, y, sf, lev, one, alpha[j], max_iter, tol)
            beta0[level, j] = b
            converged[j] = converged[j] and ok
            information = 0.0
            if np.isfinite(b):
                _, information, _ = _score(lo, hi, k, end, rows, y, sf, lev, one, alpha[j], b)
            info[level, j] = information


def _cells(rows: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Size factors and covariate levels from ``rows``: ``(n,)`` size factors, or ``(n, 2)`` with the level."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim == 1:
        return rows, np.zeros(n, dtype=np.int64)
    return np.ascontiguousarray(rows[:, 0]), rows[:, 1].astype(np.int64)


def nb_control(
    control,
    rows: np.ndarray,
    alpha: np.ndarray,
    *,
    n_levels: int = 1,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> NBControl:
    """Fit the control cells once: each gene's intercept and information, per covariate level.

    Parameters
    ----------
    control
        ``(n_control_cells, n_genes)`` raw counts, CSR.
    rows
        ``(n_control_cells,)`` their size factors, or ``(n_control_cells,
        2)``: size factors and covariate level codes ``0 .. n_levels - 1``.
    alpha
        ``(n_genes,)`` dispersions.
    n_levels
        Number of covariate levels.
    max_iter, tol
        Newton iterations and the step below which they stop.

    Returns
    -------
    NBControl

    Raises
    ------
    ValueError
        If the counts are not non-negative whole numbers.
    """
    control = canonical_csr(control)
    check_counts(control)
    sf, lev = _cells(rows, control.shape[0])
    order = np.argsort(lev, kind="stable")  # each level's cells one run of rows
    if not np.array_equal(order, np.arange(order.size)):
        control, sf, lev = control[order], sf[order], lev[order]
    level_ptr = np.searchsorted(lev, np.arange(n_levels + 1)).astype(np.int64)
    ptr, idx, y, z = normalized_csc(control, sf)
    n_genes = control.shape[1]
    beta0, info = np.empty((n_levels, n_genes)), np.empty((n_levels, n_genes))
    converged = np.empty(n_genes, dtype=np.bool_)
    alpha = np.asarray(alpha, dtype=np.float64)
    _control_fit(level_ptr, ptr, idx, y, sf, alpha, max_iter, tol, beta0, info, converged)
    gene = np.repeat(np.arange(n_genes), np.diff(ptr))
    return NBControl(
        n_cells=int(control.shape[0]),
        beta0=beta0,
        information=info,
        converged=converged,
        nnz=np.diff(ptr).astype(np.int64),
        normalized_sum=np.bincount(gene, z, minlength=n_genes),
    )


@njit(cache=True, nogil=True)
def _group_fits(group_ptr, ptr, rows, y, z, sf, lev, alpha, beta0, info_c, max_iter, tol, out):
    # out[:, g, j]: beta1, precision (1 / variance), converged, iterations, sum of z, non-zero cells, I_g
    n_groups = group_ptr.shape[0] - 1
    eoff = np.empty(beta0.shape[0])
    for j in range(ptr.shape[0] - 1):
        k = ptr[j]
        end = ptr[j + 1]
        testable = np.isfinite(alpha[j])
        for level in range(beta0.shape[0]):
            eoff[level] = np.exp(beta0[level, j])
        testable = testable and eoff.max() > 0
        for g in range(n_groups):
            lo = group_ptr[g]
            hi = group_ptr[g + 1]
            while k < end and rows[k] < lo:
                k += 1
            first = k
            zsum = 0.0
            while k < end and rows[k] < hi:
                zsum += z[k]
                k += 1
            out[4, g, j] = zsum
            out[5, g, j] = k - first
            if not testable:
                out[0, g, j] = np.nan
                out[1, g, j] = np.nan
                out[2, g, j] = 0.0
                out[3, g, j] = 0.0
                out[6, g, j] = np.nan
                continue
            b, ok, it = _intercept(lo, hi, first, end, rows, y, sf, lev, eoff, alpha[j], max_iter, tol)
            out[0, g, j] = b
            prec, ig = (0.0, 0.0) if not np.isfinite(b) else _precision(lo, hi, sf, lev, eoff, alpha[j], b, info_c, j)
            out[1, g, j] = prec
            out[2, g, j] = 1.0 if ok else 0.0
            out[3, g, j] = it
            out[6, g, j] = ig


@njit(cache=True, nogil=True)
def _shrunk_fits(group_ptr, ptr, rows, y, sf, lev, alpha, beta0, info_c, beta_hat, scale, max_iter, tol, out):
    # apeGLM's MAP of beta1 under a Cauchy(0, scale[g]) prior, intercepts frozen: out[0] beta, out[1] precision
    n_groups = group_ptr.shape[0] - 1
    eoff = np.empty(beta0.shape[0])
    for j in range(ptr.shape[0] - 1):
        k = ptr[j]
        end = ptr[j + 1]
        for level in range(beta0.shape[0]):
            eoff[level] = np.exp(beta0[level, j])
        for g in range(n_groups):
            lo = group_ptr[g]
            hi = group_ptr[g + 1]
            while k < end and rows[k] < lo:
                k += 1
            first = k
            while k < end and rows[k] < hi:
                k += 1
            bh = beta_hat[g, j]
            s2 = scale[g] * scale[g]
            if not np.isfinite(alpha[j]) or np.isnan(bh) or eoff.max() <= 0:
                out[0, g, j] = np.nan
                out[1, g, j] = np.nan
                continue
            # the posterior's gradient is positive at the lower end of [min(0, bh), max(0, bh)], negative at the upper
            left = bh if bh < 0 else 0.0
            right = 0.0 if bh < 0 else bh
            if not np.isfinite(left):
                left = -50.0
            if not np.isfinite(right):
                right = 50.0
            b = min(max(bh, left), right)
            for _ in range(max_iter):
                score, _, deriv = _score(lo, hi, first, end, rows, y, sf, lev, eoff, alpha[j], b)
                grad = score - 2.0 * b / (s2 + b * b)
                curv = deriv + 2.0 * (s2 - b * b) / ((s2 + b * b) ** 2)
                if grad > 0:
                    left = b
                else:
                    right = b
                step = grad / curv if curv > 0 else 0.5 * (left + right) - b
                if abs(step) < tol or right - left < tol:
                    b += step
                    break
                new = b + step
                if not (left <= new <= right):
                    new = 0.5 * (left + right)
                b = new
            prec, _ = _precision(lo, hi, sf, lev, eoff, alpha[j], b, info_c, j)
            out[0, g, j] = b
            out[1, g, j] = prec


def prior_variance(lfc: np.ndarray, se: np.ndarray, *, min_var: float = 1e-6, max_var: float = 400.0) -> float:
    """The variance of apeGLM's prior on the log fold changes of one contrast, from their MLEs.

    The root in ``a`` of ``sum c (lfc^2 - se^2) / sum c - a`` with ``c = 1 /
    (2 (a + se^2)^2)`` (natural-log fold changes), as apeglm's ``priorVar``
    and PyDESeq2's ``_fit_prior_var``; ``min_var`` when it is negative there.
    """
    from scipy.optimize import brentq

    keep = np.isfinite(lfc) & np.isfinite(se)
    s, d = lfc[keep] ** 2, se[keep] ** 2
    if s.size == 0:
        return min_var

    def objective(a: float) -> float:
        c = 1.0 / (2.0 * (a + d) ** 2)
        return float(((s - d) * c).sum() / c.sum() - a)

    if objective(min_var) < 0:
        return min_var
    if objective(max_var) > 0:
        return max_var
    return float(brentq(objective, min_var, max_var, xtol=1e-12))


#: Statistics returned by :func:`nbglm_block`, in this order along axis 1 (names in :mod:`pertscale.variables`).
NBGLM_STATS: tuple[str, ...] = STATISTICS["nb-glm"]


def nbglm_block(
    block,
    group_sizes: np.ndarray,
    control: NBControl | Sequence[NBControl],
    bounds: Sequence[int] | None = None,
    *,
    rows: np.ndarray,
    alpha: np.ndarray,
    shrink: bool = True,
    lfc_base: str = "log2",
    corr_method: str = "benjamini-hochberg",
    alternative: str = "two-sided",
    max_iter: int = 100,
    tol: float = 1e-10,
    min_pct=0.0,
    min_mean=0.0,
) -> np.ndarray:
    """Wald test of every group in a block against the frozen control fit, with apeGLM shrinkage.

    Parameters
    ----------
    block
        ``(n_rows, n_genes)`` raw counts, CSR, whose rows are whole groups one
        after another.
    group_sizes
        ``(n_groups,)`` rows of each group, in order; sums to ``n_rows``.
    control
        :func:`nb_control` of the control cells, or its parts over
        consecutive ranges of genes.
    bounds
        With parts: the ``(n_parts + 1,)`` gene bounds they cover.
    rows
        ``(n_rows,)`` size factors of the block's cells, or ``(n_rows, 2)``:
        size factors and covariate level codes (see :func:`nb_control`).
    alpha
        ``(n_genes,)`` dispersions (the same the control was fitted with).
    shrink
        Add apeGLM's shrunk fold changes (Zhu, Ibrahim & Love 2019): the
        maximum a posteriori ``beta1`` under a Cauchy prior whose scale is
        estimated from all genes' MLEs of the group (apeglm's ``priorVar``,
        capped at 1 as DESeq2 and PyDESeq2 do), ``beta0`` held at the control
        fit. Without it, ``logfoldchanges`` are the MLEs.
    lfc_base
        ``"log2"`` (default, as DESeq2) or ``"natural"``: the units of the
        fold changes and their standard errors.
    corr_method, alternative
        Multiple-testing correction over each group's genes; the Wald test's
        alternative (``"greater"``: higher in the group than in control).
    max_iter, tol
        Newton iterations of each fit and the step below which they stop.
    min_pct, min_mean
        Genes whose detection fraction or mean normalized count is below
        these on both sides are untested: NaN (:func:`exclude_low_genes`).

    Returns
    -------
    numpy.ndarray
        ``(n_groups, len(NBGLM_STATS), n_genes)`` float64: Wald ``scores``
        (``beta1 / SE``), ``pvals`` (normal), ``pvals_adj``,
        ``logfoldchanges`` (shrunk, or the MLE without ``shrink``),
        ``logfoldchanges_raw`` (MLE), ``lfcSE`` (of the MLE,
        ``sqrt(1/I_control + 1/I_group)``, DESeq2's name), ``lfcSE_shrunk``
        (posterior, from the curvature at the mode), ``pts``, ``pts_rest``,
        ``baseMean`` (mean normalized count of the group's and the control's
        cells), ``converged`` (1.0 or 0.0), ``n_iter`` and the group's
        ``prior_scale`` (natural log, repeated over genes). Where a side has
        no count of a gene the test is undefined: NaN score and p-value,
        ``-inf`` or ``inf`` raw fold change.

    Raises
    ------
    ValueError
        If the block does not hold raw counts, ``group_sizes`` does not split
        it, or the control parts do not cover its genes.
    """
    n_genes = block.shape[1]
    parts, bounds, group_sizes = block_inputs(control, NBControl, bounds, n_genes, group_sizes, block.shape[0])
    if lfc_base not in ("log2", "natural"):
        raise ValueError(f"lfc_base {lfc_base!r} is not supported; choose 'log2' or 'natural'")
    block = canonical_csr(block)
    check_counts(block)
    sf, lev = _cells(rows, block.shape[0])
    alpha = np.asarray(alpha, dtype=np.float64)
    beta0 = np.concatenate([p.beta0 for p in parts], axis=-1)
    info_c = np.concatenate([p.information for p in parts], axis=-1)
    if lev.size and lev.max() >= beta0.shape[0]:
        raise ValueError(f"covariate level {int(lev.max())} has no control fit ({beta0.shape[0]} levels)")
    group_ptr = group_pointers(group_sizes)
    ptr, idx, y, z = normalized_csc(block, sf)
    n_groups = group_sizes.shape[0]
    fits = np.empty((7, n_groups, n_genes))
    _group_fits(group_ptr, ptr, idx, y, z, sf, lev, alpha, beta0, info_c, max_iter, tol, fits)
    beta, precision, converged, n_iter, zsum, nnz, _ = fits
    with np.errstate(divide="ignore", invalid="ignore"):
        se = 1.0 / np.sqrt(precision)
        scores = beta / se
    defined = np.isfinite(scores)
    scores[~defined] = np.nan
    pvals = normal_pvalues(scores, alternative)
    unit = np.log(2.0) if lfc_base == "log2" else 1.0
    out = np.empty((n_groups, len(NBGLM_STATS), n_genes))
    stat = {name: i for i, name in enumerate(NBGLM_STATS)}
    out[:, stat[SCORES]] = scores
    out[:, stat[PVALS]] = pvals
    out[:, stat[PVALS_ADJ]] = adjust_pvalues(pvals, corr_method)
    out[:, stat[LOGFOLDCHANGES_RAW]] = beta / unit
    out[:, stat[LFC_SE]] = se / unit
    m = group_sizes.astype(np.float64)[:, None]
    n_c = float(parts[0].n_cells)
    out[:, stat[PTS]] = nnz / m
    out[:, stat[PTS_REST]] = (np.concatenate([p.nnz for p in parts]) / n_c)[None, :]
    out[:, stat[BASE_MEAN]] = (zsum + np.concatenate([p.normalized_sum for p in parts])[None, :]) / (m + n_c)
    out[:, stat[CONVERGED]] = converged
    out[:, stat[N_ITER]] = n_iter
    filters = dict(
        mean=zsum / m,
        mean_rest=np.concatenate([p.normalized_sum for p in parts]) / n_c,
        pts=nnz / m,
        pts_rest=np.concatenate([p.nnz for p in parts]) / n_c,
        min_pct=min_pct,
        min_mean=min_mean,
        corr_method=corr_method,
    )
    if not shrink:
        out[:, stat[LOGFOLDCHANGES]] = beta / unit
        out[:, stat[LFC_SE_SHRUNK]] = se / unit
        out[:, stat[PRIOR_SCALE]] = np.nan
        exclude_low_genes(out, NBGLM_STATS, **filters)
        return out
    scale = np.array(
        [min(np.sqrt(prior_variance(beta[g][defined[g]], se[g][defined[g]])), 1.0) for g in range(n_groups)]
    )
    shrunk = np.empty((2, n_groups, n_genes))
    _shrunk_fits(group_ptr, ptr, idx, y, sf, lev, alpha, beta0, info_c, beta, scale, max_iter, tol, shrunk)
    b_map, precision_map = shrunk
    s2 = (scale * scale)[:, None]
    curvature = 2.0 * (s2 - b_map * b_map) / (s2 + b_map * b_map) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        var = 1.0 / (precision_map + curvature)
    out[:, stat[LOGFOLDCHANGES]] = b_map / unit
    with np.errstate(invalid="ignore"):
        out[:, stat[LFC_SE_SHRUNK]] = np.where(var > 0, np.sqrt(var), np.nan) / unit
    out[:, stat[PRIOR_SCALE]] = scale[:, None]
    exclude_low_genes(out, NBGLM_STATS, **filters)
    return out

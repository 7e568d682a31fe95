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
import scipy.sparse as sp
from numba import njit

from ...variables import (
    BASE_MEAN,
    CONVERGED,
    LFC_SE,
    LFC_SE_SHRUNK,
    LOGFOLDCHANGES,
    LOGFOLDCHANGES_RAW,
    N_ITER,
    ONE_SIDED,
    PRIOR_SCALE,
    PTS,
    PTS_REST,
    PVALS,
    PVALS_ADJ,
    SCORES,
    STATISTICS,
    TESTED,
)
from .._common import adjust_pvalues, block_inputs, canonical_csr, exclude_low_genes, normal_pvalues
from ..groups import group_pointers
from ._counts import check_counts, normalized_csc
from ._score import (
    BOUND,
    _eta_levels,
    _inverse_entry,
    control_loglik_change,
    fit_comparison,
    group_loglik,
    map_comparison,
)


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
    design
        ``(n_levels, p)`` float64: the design row of each covariate level
        (``[[1]]`` without covariates).
    gamma
        ``(n_genes, p)`` float64 maximum likelihood coefficients of the
        control cells alone (``beta0`` without covariates).
    count_sum
        ``(n_genes,)`` float64 sum of the control's counts.
    size_factor_sum
        ``(n_levels,)`` float64 sum of each level's size factors.
    centres, y_coef, dy_coef, q_coef, dq_coef
        The control's score as Chebyshev series in its linear predictor, per
        level and band of size factors (:mod:`._score`): ``(n_levels,
        n_bands)`` band centres (NaN: no band), ``(n_levels, n_bands,
        n_genes, N_CHEB + 1)`` coefficients of the counts' term and its
        derivative, ``(n_levels, n_bands, N_CHEB + 1)`` of the size factors'.
    """

    n_cells: int
    beta0: np.ndarray
    information: np.ndarray
    converged: np.ndarray
    nnz: np.ndarray
    normalized_sum: np.ndarray
    design: np.ndarray
    gamma: np.ndarray
    count_sum: np.ndarray
    size_factor_sum: np.ndarray
    centres: np.ndarray
    y_coef: np.ndarray
    dy_coef: np.ndarray
    q_coef: np.ndarray
    dq_coef: np.ndarray

    @property
    def n_genes(self) -> int:
        """Number of genes summarised."""
        return self.beta0.shape[-1]


@njit(cache=True, nogil=True, error_model="numpy")
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


@njit(cache=True, nogil=True, error_model="numpy")
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


@njit(cache=True, nogil=True, error_model="numpy")
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


@njit(cache=True, nogil=True, error_model="numpy")
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


def default_design(n_levels: int) -> np.ndarray:
    """One intercept per covariate level (``[[1]]`` for one level): the design of ``nb_control`` without one given."""
    return np.eye(n_levels)


def nb_control(
    control,
    rows: np.ndarray,
    alpha: np.ndarray,
    *,
    n_levels: int = 1,
    design: np.ndarray | None = None,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> NBControl:
    """Fit the control cells once: each gene's intercepts, information and score function, per covariate level.

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
    design
        ``(n_levels, p)`` the covariates' design row of each level (DESeq2's
        additive design ``~ a + b``: an intercept and the other levels'
        indicators of each covariate); default one intercept per level.
    max_iter, tol
        Newton iterations and the step below which they stop.

    Returns
    -------
    NBControl

    Raises
    ------
    ValueError
        If the counts are not non-negative whole numbers, or ``design`` does
        not have a row per level.
    """
    from ._score import control_series, derivative_series, fit_comparison

    control = canonical_csr(control)
    check_counts(control)
    sf, lev = _cells(rows, control.shape[0])
    design = default_design(n_levels) if design is None else np.ascontiguousarray(design, dtype=np.float64)
    if design.ndim != 2 or design.shape[0] != n_levels:
        raise ValueError(f"design must have one row per covariate level ({n_levels}); it has shape {design.shape}")
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
    # the score functions, per level
    series = []
    for level in range(n_levels):
        lo, hi = level_ptr[level], level_ptr[level + 1]
        part = sp.csc_matrix((y, idx, ptr), shape=control.shape)[lo:hi]
        part.sort_indices()
        series.append(control_series(part.indptr, part.indices, part.data, sf[lo:hi], n_genes))
    n_bands = max(1, max(c.size for c, _, _ in series))
    width = series[0][2].shape[-1]
    centres = np.full((n_levels, n_bands), np.nan)
    y_coef = np.zeros((n_levels, n_bands, n_genes, width))
    q_coef = np.zeros((n_levels, n_bands, width))
    for level, (c, yc, qc) in enumerate(series):
        centres[level, : c.size], y_coef[level, : c.size], q_coef[level, : c.size] = c, yc, qc
    dy_coef, dq_coef = derivative_series(y_coef), derivative_series(q_coef)
    p = design.shape[1]
    if n_levels == 1 and p == 1 and design[0, 0] == 1.0:
        gamma = beta0.T.copy()
    else:  # the control alone under the covariates' design, from the series
        gamma = np.full((n_genes, p), np.nan)
        present = level_ptr[1:] > level_ptr[:-1]
        for j in range(n_genes):
            finite = np.isfinite(beta0[:, j]) & present
            if not finite.any() or not np.isfinite(alpha[j]):
                continue
            start = np.linalg.lstsq(design[finite], beta0[finite, j], rcond=None)[0]
            theta, _, _, _, _ = fit_comparison(
                0, 0, 0, 0, idx, y, sf, lev, float(alpha[j]), j, design, present, centres,
                y_coef, dy_coef, q_coef, dq_coef, start,
                use_control=True, use_group=False, with_b1=False, prior_scale=0.0, max_iter=max_iter, tol=tol,
            )  # fmt: skip
            gamma[j] = theta
    return NBControl(
        n_cells=int(control.shape[0]),
        beta0=beta0,
        information=info,
        converged=converged,
        nnz=np.diff(ptr).astype(np.int64),
        normalized_sum=np.bincount(gene, z, minlength=n_genes),
        design=design,
        gamma=gamma,
        count_sum=np.bincount(gene, y, minlength=n_genes),
        size_factor_sum=np.array([sf[level_ptr[k] : level_ptr[k + 1]].sum() for k in range(n_levels)]),
        centres=centres,
        y_coef=y_coef,
        dy_coef=dy_coef,
        q_coef=q_coef,
        dq_coef=dq_coef,
    )


#: Rows of the per-comparison fits' array (``_group_fits``).
_BETA, _PREC, _CONV, _ITER, _ZSUM, _NNZ, _SCORE, _ONE_SIDED = range(8)


@njit(cache=True, nogil=True, error_model="numpy")
def _one_sided(lo, hi, first, end, rows, y, sf, lev, alpha, j, design, present, centres, yc, dyc, qc, dqc,
               gamma_c, gtot, csf, max_iter, tol):  # fmt: skip
    """The likelihood-ratio test of a gene with counts on one side only; ``(lfc, signed root, converged, iters)``.

    Group without counts: the full model's maximum is at ``b1 = -inf`` with
    the control's own fit (the group's likelihood is then 1); control
    without counts: at ``b1 = +inf``, the group fitted alone. The reduced
    model (no perturbation term) is fitted on both. The fold change is the
    one at which the side without counts would hold half a count
    (Haldane-Anscombe's correction).
    """
    n_levels, p = design.shape
    eta_full = np.empty(n_levels)
    eta_red = np.empty(n_levels)
    la = np.log(alpha)
    if gtot == 0.0:
        _eta_levels(design, gamma_c, eta_full)
        theta, ok, it, _, _ = fit_comparison(
            lo, hi, first, end, rows, y, sf, lev, alpha, j, design, present, centres, yc, dyc, qc, dqc,
            gamma_c.copy(),
            use_control=True, use_group=True, with_b1=False, prior_scale=0.0, max_iter=max_iter, tol=tol,
        )  # fmt: skip
        _eta_levels(design, theta, eta_red)
        change = 0.0
        for k in range(n_levels):
            if present[k]:
                change += control_loglik_change(centres, yc, dyc, qc, dqc, k, j, eta_red[k], eta_full[k], la)
        lr = 2.0 * (change - group_loglik(lo, hi, first, end, rows, y, sf, lev, alpha, eta_red, 0.0))
        expected = 0.0
        ssum = 0.0
        for i in range(lo, hi):
            expected += sf[i] * np.exp(eta_full[lev[i]])
            ssum += sf[i]
        if expected <= ssum * np.exp(1.0 - BOUND):  # the control has no count in the group's levels either
            return np.nan, np.nan, ok, it
        lfc = np.log(0.5 / expected)
        return lfc, -np.sqrt(max(lr, 0.0)), ok, it
    # the control without counts: the group alone, then both
    start = np.zeros(p)
    ssum = 0.0
    for i in range(lo, hi):
        ssum += sf[i]
    mean = np.log(gtot / ssum)
    solo = np.linalg.lstsq(design, np.full(n_levels, mean))[0]
    theta_g, ok1, it1, _, _ = fit_comparison(
        lo, hi, first, end, rows, y, sf, lev, alpha, j, design, present, centres, yc, dyc, qc, dqc,
        solo, use_control=False, use_group=True, with_b1=False, prior_scale=0.0, max_iter=max_iter, tol=tol,
    )  # fmt: skip
    _eta_levels(design, theta_g, eta_full)
    start[:] = theta_g
    theta_r, ok2, it2, _, _ = fit_comparison(
        lo, hi, first, end, rows, y, sf, lev, alpha, j, design, present, centres, yc, dyc, qc, dqc,
        start, use_control=True, use_group=True, with_b1=False, prior_scale=0.0, max_iter=max_iter, tol=tol,
    )  # fmt: skip
    _eta_levels(design, theta_r, eta_red)
    control = 0.0
    for k in range(n_levels):
        if present[k]:
            control += control_loglik_change(centres, yc, dyc, qc, dqc, k, j, -np.inf, eta_red[k], la)
    full = group_loglik(lo, hi, first, end, rows, y, sf, lev, alpha, eta_full, 0.0)
    lr = 2.0 * (full - group_loglik(lo, hi, first, end, rows, y, sf, lev, alpha, eta_red, 0.0) - control)
    fitted = 0.0
    for i in range(lo, hi):
        fitted += sf[i] * np.exp(eta_full[lev[i]])
    lfc = np.log(fitted / ssum) - np.log(0.5 / csf)
    return lfc, np.sqrt(max(lr, 0.0)), ok1 and ok2, it1 + it2


@njit(cache=True, nogil=True, error_model="numpy")
def _group_fits(group_ptr, ptr, rows, y, z, sf, lev, alpha, beta0, info_c, design, gamma, ctot, csf,
                centres, yc, dyc, qc, dqc, max_iter, tol, out):  # fmt: skip
    # out[:, g, j]: see the _BETA ... _ONE_SIDED rows
    n_groups = group_ptr.shape[0] - 1
    n_levels, p = design.shape
    simple = n_levels == 1 and p == 1 and design[0, 0] == 1.0
    present = np.ones(n_levels, dtype=np.bool_)
    eoff = np.empty(beta0.shape[0])
    eta = np.empty(n_levels)
    theta0 = np.empty(p + 1)
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
            zsum = 0.0
            gtot = 0.0
            while k < end and rows[k] < hi:
                zsum += z[k]
                gtot += y[k]
                k += 1
            out[_ZSUM, g, j] = zsum
            out[_NNZ, g, j] = k - first
            out[_ONE_SIDED, g, j] = 0.0
            if not np.isfinite(alpha[j]) or (gtot == 0.0 and ctot[j] == 0.0):
                out[_BETA, g, j] = np.nan
                out[_PREC, g, j] = np.nan
                out[_CONV, g, j] = 0.0
                out[_ITER, g, j] = 0.0
                out[_SCORE, g, j] = np.nan
                continue
            if gtot == 0.0 or ctot[j] == 0.0:
                lfc, root, ok, it = _one_sided(
                    lo, hi, first, end, rows, y, sf, lev, alpha[j], j, design, present, centres, yc, dyc, qc,
                    dqc, gamma[j], gtot, csf, max_iter, tol,
                )  # fmt: skip
                out[_BETA, g, j] = lfc
                out[_PREC, g, j] = np.nan
                out[_CONV, g, j] = 1.0 if ok else 0.0
                out[_ITER, g, j] = it
                out[_SCORE, g, j] = root
                out[_ONE_SIDED, g, j] = 1.0
                continue
            if simple:  # the control's intercept is its own maximum likelihood: exact, one dimension
                b, ok, it = _intercept(lo, hi, first, end, rows, y, sf, lev, eoff, alpha[j], max_iter, tol)
                prec, _ = _precision(lo, hi, sf, lev, eoff, alpha[j], b, info_c, j)
            else:  # every coefficient of ~ covariates + perturbation, together
                theta0[:p] = gamma[j]
                _eta_levels(design, gamma[j], eta)
                expected = 0.0
                for i in range(lo, hi):
                    expected += sf[i] * np.exp(eta[lev[i]])
                theta0[p] = np.log(gtot / expected)
                theta, ok, it, _, info = fit_comparison(
                    lo, hi, first, end, rows, y, sf, lev, alpha[j], j, design, present, centres, yc, dyc, qc,
                    dqc, theta0,
                    use_control=True, use_group=True, with_b1=True, prior_scale=0.0, max_iter=max_iter, tol=tol,
                )  # fmt: skip
                b = theta[p]
                prec = 1.0 / _inverse_entry(info, p)
            out[_BETA, g, j] = b
            out[_PREC, g, j] = prec
            out[_CONV, g, j] = 1.0 if ok else 0.0
            out[_ITER, g, j] = it
            out[_SCORE, g, j] = b * np.sqrt(prec)


@njit(cache=True, nogil=True, error_model="numpy")
def _shrunk_fits(group_ptr, ptr, rows, y, sf, lev, alpha, design, gamma, beta_hat, prec_hat, one_sided, scale,
                 centres, yc, dyc, qc, dqc, max_iter, tol, out):  # fmt: skip
    # apeGLM's MAP of every coefficient together: out[0] b1, out[1] its posterior standard error
    n_groups = group_ptr.shape[0] - 1
    n_levels, p = design.shape
    present = np.ones(n_levels, dtype=np.bool_)
    for j in range(ptr.shape[0] - 1):
        k = ptr[j]
        end = ptr[j + 1]
        for g in range(n_groups):
            lo = group_ptr[g]
            hi = group_ptr[g + 1]
            while k < end and rows[k] < lo:
                k += 1
            first = k
            while k < end and rows[k] < hi:
                k += 1
            bh = beta_hat[g, j]
            if not np.isfinite(alpha[j]) or not np.isfinite(bh):
                out[0, g, j] = np.nan
                out[1, g, j] = np.nan
                continue
            start = gamma[j]
            if not np.isfinite(start).all():  # the control has no count: start from the group's mean
                ssum = 0.0
                gsum = 0.0
                for i in range(lo, hi):
                    ssum += sf[i]
                for kk in range(first, k):
                    gsum += y[kk]
                start = np.linalg.lstsq(design, np.full(n_levels, np.log(gsum / ssum) - bh))[0]
            b, se, _ = map_comparison(
                lo, hi, first, k, rows, y, sf, lev, alpha[j], j, design, present, centres, yc, dyc, qc, dqc,
                start, bh * np.inf if one_sided[g, j] else bh, bh, prec_hat[g, j], scale[g], max_iter, tol,
            )  # fmt: skip
            out[0, g, j] = b
            out[1, g, j] = se


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
        maximum a posteriori of every coefficient together, a Cauchy prior on
        ``beta1`` whose scale is estimated from all genes' MLEs of the group
        (apeglm's ``priorVar``, capped at 1 as DESeq2 and PyDESeq2 do) and a
        normal(0, 15) prior on the others. Without it, ``logfoldchanges``
        are the MLEs.
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
        ``logfoldchanges_raw`` (MLE), ``lfcSE`` (of the MLE, from the
        inverse expected information, ``sqrt(1/I_control + 1/I_group)``
        without covariates; DESeq2's name), ``lfcSE_shrunk`` (posterior,
        from its observed information at the mode), ``pts``, ``pts_rest``,
        ``baseMean`` (mean normalized count of the group's and the control's
        cells), ``converged`` (1.0 or 0.0), ``n_iter`` and the group's
        ``prior_scale`` (natural log, repeated over genes), ``tested`` and
        ``one_sided``. Where one side has no count of a gene, the
        likelihood-ratio test (signed root in ``scores``), the fold change at
        half a count on the empty side, NaN ``lfcSE``; where neither has,
        untested (NaN, ``tested`` 0).

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
    design, centres, q_coef, dq_coef = parts[0].design, parts[0].centres, parts[0].q_coef, parts[0].dq_coef
    gamma = np.ascontiguousarray(np.concatenate([p.gamma for p in parts], axis=0))
    y_coef = np.ascontiguousarray(np.concatenate([p.y_coef for p in parts], axis=2))
    dy_coef = np.ascontiguousarray(np.concatenate([p.dy_coef for p in parts], axis=2))
    count_sum = np.concatenate([p.count_sum for p in parts])
    group_ptr = group_pointers(group_sizes)
    ptr, idx, y, z = normalized_csc(block, sf)
    n_groups = group_sizes.shape[0]
    fits = np.empty((8, n_groups, n_genes))
    _group_fits(
        group_ptr, ptr, idx, y, z, sf, lev, alpha, beta0, info_c, design, gamma, count_sum,
        float(parts[0].size_factor_sum.sum()), centres, y_coef, dy_coef, q_coef, dq_coef, max_iter, tol, fits,
    )  # fmt: skip
    beta, precision, converged, n_iter = fits[_BETA], fits[_PREC], fits[_CONV], fits[_ITER]
    zsum, nnz, one_sided = fits[_ZSUM], fits[_NNZ], fits[_ONE_SIDED]
    with np.errstate(divide="ignore", invalid="ignore"):
        se = 1.0 / np.sqrt(precision)
    scores = fits[_SCORE]
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
    out[:, stat[ONE_SIDED]] = np.where(defined, one_sided, np.nan)
    out[:, stat[TESTED]] = defined
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
        return _filtered(out, stat, filters)
    two_sided = defined & (one_sided == 0)
    scale = np.array(
        [min(np.sqrt(prior_variance(beta[g][two_sided[g]], se[g][two_sided[g]])), 1.0) for g in range(n_groups)]
    )
    shrunk = np.empty((2, n_groups, n_genes))
    _shrunk_fits(
        group_ptr, ptr, idx, y, sf, lev, alpha, design, gamma, np.where(defined, beta, np.nan), precision, one_sided,
        scale, centres, y_coef, dy_coef, q_coef, dq_coef, max_iter, tol, shrunk,
    )  # fmt: skip
    b_map, se_map = shrunk
    out[:, stat[LOGFOLDCHANGES]] = b_map / unit
    out[:, stat[LFC_SE_SHRUNK]] = se_map / unit
    out[:, stat[PRIOR_SCALE]] = scale[:, None]
    return _filtered(out, stat, filters)


def _filtered(out: np.ndarray, stat: dict, filters: dict) -> np.ndarray:
    """Genes below ``min_pct``/``min_mean`` on both sides untested (NaN), and ``tested`` saying so."""
    exclude_low_genes(out, NBGLM_STATS, **filters)
    out[:, stat[TESTED]] = np.isfinite(out[:, stat[PVALS]])
    return out

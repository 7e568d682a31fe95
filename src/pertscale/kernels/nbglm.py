"""Negative-binomial GLM kernels: size factors, dispersions, the Wald test against a frozen control.

Pure functions of one in-memory block of raw counts (numpy, numba); nothing
here knows about Dask. The model, per gene, for the cells of one
perturbation and the control cells (DESeq2's, Love et al. 2014)::

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
information matrix is ``1 / I_control + 1 / I_group``.

Dispersions follow DESeq2 (:func:`dispersion_moments_block`,
:func:`dispersion_apl_block`): for the one-hot design of every label, the
means are fitted by the linear model (the group mean of normalized counts,
as DESeq2 and PyDESeq2 do for designs of groups) and held fixed; each
gene's Cox-Reid adjusted profile log likelihood (Cox & Reid 1987) in
``log alpha`` is a sum over cells plus ``-1/2 sum_groups log W_g``, so every
block adds its groups' value, gradient and curvature, and a Newton step per
pass finds the maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import lgamma

import numpy as np
import scipy.sparse as sp
from numba import njit

from ._common import adjust_pvalues, block_inputs, canonical_csr, exclude_low_genes, normal_pvalues

#: Smallest and largest dispersion estimated (DESeq2's ``minDisp``; its ``maxDisp`` is ``max(10, n)``).
MIN_DISP = 1e-8
#: Counts up to this are summed term by term in the dispersion likelihood; above, through digamma.
DIRECT_COUNT = 64


# --------------------------------------------------------------------------- checks


def check_counts(block: sp.csr_matrix) -> None:
    """Raise ``ValueError`` unless the block holds non-negative whole numbers (raw counts).

    Raises
    ------
    ValueError
        Naming the problem and the fix (pass the raw counts layer).
    """
    data = block.data
    if data.size == 0:
        return
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            raise ValueError("the count matrix contains NaN or infinite values; nb-glm needs raw UMI counts")
        fractional = int((data != np.round(data)).sum())
        if fractional:
            raise ValueError(
                f"the matrix has {fractional:,} non-integer values: nb-glm models raw UMI counts, not normalized or "
                "log-transformed values; pass the raw counts (e.g. layer='counts', --layer counts or --use-raw)"
            )
    if data.min() < 0:
        raise ValueError("the count matrix contains negative values; nb-glm needs raw UMI counts")


# --------------------------------------------------------------------------- size factors


def log_count_sums(block: sp.csr_matrix | np.ndarray) -> np.ndarray:
    """Per gene: the sum of ``log y`` over non-zero counts and their number, ``(2, n_genes)`` float64."""
    block = canonical_csr(block)
    check_counts(block)
    keep = block.data > 0
    idx = block.indices[keep]
    n_genes = block.shape[1]
    return np.stack(
        [
            np.bincount(idx, np.log(block.data[keep].astype(np.float64)), minlength=n_genes),
            np.bincount(idx, minlength=n_genes).astype(np.float64),
        ]
    )


@njit(cache=True, nogil=True)
def _row_medians(indptr, indices, data, log_mean, usable, in_logs):
    n_rows = indptr.shape[0] - 1
    out = np.full(n_rows, np.nan)
    buf = np.empty(max(1, np.int64(np.max(np.diff(indptr))) if n_rows else 1))
    for r in range(n_rows):
        n = 0
        for k in range(indptr[r], indptr[r + 1]):
            j = indices[k]
            if data[k] > 0 and usable[j]:
                d = np.log(np.float64(data[k])) - log_mean[j]
                buf[n] = d if in_logs else np.exp(d)
                n += 1
        if n:
            med = np.median(buf[:n])
            out[r] = np.exp(med) if in_logs else med
    return out


#: Size factor methods: how each gene's reference is made and which genes a cell's median uses.
SIZE_FACTOR_METHODS = ("sparse", "poscounts", "ratio")


def reference_log_means(log_sums: np.ndarray, n_cells: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Each gene's log reference and whether it is used, from :func:`log_count_sums` over every cell.

    ``"sparse"`` (crispyx's default): the geometric mean of the non-zero
    counts, every gene with one. ``"poscounts"`` (DESeq2, PyDESeq2): ``sum
    log y / n_cells`` over non-zero counts, genes where it is positive.
    ``"ratio"`` (DESeq2's classic median of ratios): genes without zeros.

    Returns
    -------
    tuple
        ``(log_mean, usable)``, each ``(n_genes,)``.
    """
    log_sum, nnz = log_sums
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "sparse":
            log_mean = np.where(nnz > 0, log_sum / nnz, 0.0)
            usable = nnz > 0
        elif method == "poscounts":
            log_mean = log_sum / n_cells
            usable = (nnz > 0) & (log_mean > 0)
        elif method == "ratio":
            log_mean = log_sum / n_cells
            usable = nnz == n_cells
        else:
            raise ValueError(f"size factor method {method!r} is not supported; choose one of {SIZE_FACTOR_METHODS}")
    return log_mean, usable


def cell_size_factors(block, log_mean: np.ndarray, usable: np.ndarray, method: str) -> np.ndarray:
    """Unscaled size factors of a block's cells: the median over their non-zero usable genes.

    ``"sparse"``: the median of the ratios ``y / geometric mean`` (as
    crispyx); ``"poscounts"`` and ``"ratio"``: ``exp`` of the median of log
    ratios (as DESeq2). NaN for a cell without any usable non-zero gene.
    """
    block = canonical_csr(block)
    return _row_medians(
        block.indptr.astype(np.int64),
        block.indices.astype(np.int64),
        block.data,
        np.asarray(log_mean, dtype=np.float64),
        np.asarray(usable, dtype=np.bool_),
        method != "sparse",
    )


def finish_size_factors(raw: np.ndarray) -> tuple[np.ndarray, int]:
    """Cells without a size factor get the median of the others; then scaled to geometric mean 1.

    Returns
    -------
    tuple
        ``(size_factors, n_filled)``.

    Raises
    ------
    ValueError
        If no cell has a size factor.
    """
    raw = np.asarray(raw, dtype=np.float64).copy()
    ok = np.isfinite(raw) & (raw > 0)
    if not ok.any():
        raise ValueError("no cell has a non-zero count in a gene usable for size factors")
    raw[~ok] = np.median(raw[ok])
    return raw / np.exp(np.mean(np.log(raw))), int((~ok).sum())


# --------------------------------------------------------------------------- special functions


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


# --------------------------------------------------------------------------- dispersions


def _group_rows(group_sizes: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(group_sizes, dtype=np.int64))]).astype(np.int64)


def _normalized_csc(block, size_factors):
    """CSC (rows ascending within each gene) with counts as float64, and counts / size factor."""
    csc = canonical_csr(block).tocsc()
    csc.sort_indices()
    if (csc.data == 0).any():
        csc.eliminate_zeros()
    y = csc.data.astype(np.float64)
    return csc.indptr.astype(np.int64), csc.indices.astype(np.int64), y, y / size_factors[csc.indices]


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
    ptr, rows, y, z = _normalized_csc(block, sf)
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
    group_ptr = _group_rows(group_sizes)
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
        for c in range(1, DIRECT_COUNT + 1):
            t = (c - 1) * a
            tv[c] = tv[c - 1] + np.log1p(t)
            t1[c] = t1[c - 1] + t / (1.0 + t)
            t2[c] = t2[c - 1] + t / ((1.0 + t) * (1.0 + t))
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
    group_ptr = _group_rows(group_sizes)
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


# --------------------------------------------------------------------------- the fit against control


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
    ptr, idx, y, z = _normalized_csc(control, sf)
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


#: Statistics returned by :func:`nbglm_block`, in this order along axis 1.
NBGLM_STATS: tuple[str, ...] = (
    "scores",
    "pvals",
    "pvals_adj",
    "logfoldchanges",
    "logfoldchanges_raw",
    "standard_error",
    "standard_error_shrunk",
    "pts",
    "pts_rest",
    "baseMean",
    "converged",
    "n_iter",
    "prior_scale",
)


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
        ``logfoldchanges_raw`` (MLE), ``standard_error`` (of the MLE,
        ``sqrt(1/I_control + 1/I_group)``), ``standard_error_shrunk``
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
    group_ptr = _group_rows(group_sizes)
    ptr, idx, y, z = _normalized_csc(block, sf)
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
    out[:, stat["scores"]] = scores
    out[:, stat["pvals"]] = pvals
    out[:, stat["pvals_adj"]] = adjust_pvalues(pvals, corr_method)
    out[:, stat["logfoldchanges_raw"]] = beta / unit
    out[:, stat["standard_error"]] = se / unit
    m = group_sizes.astype(np.float64)[:, None]
    n_c = float(parts[0].n_cells)
    out[:, stat["pts"]] = nnz / m
    out[:, stat["pts_rest"]] = (np.concatenate([p.nnz for p in parts]) / n_c)[None, :]
    out[:, stat["baseMean"]] = (zsum + np.concatenate([p.normalized_sum for p in parts])[None, :]) / (m + n_c)
    out[:, stat["converged"]] = converged
    out[:, stat["n_iter"]] = n_iter
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
        out[:, stat["logfoldchanges"]] = beta / unit
        out[:, stat["standard_error_shrunk"]] = se / unit
        out[:, stat["prior_scale"]] = np.nan
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
    out[:, stat["logfoldchanges"]] = b_map / unit
    with np.errstate(invalid="ignore"):
        out[:, stat["standard_error_shrunk"]] = np.where(var > 0, np.sqrt(var), np.nan) / unit
    out[:, stat["prior_scale"]] = scale[:, None]
    exclude_low_genes(out, NBGLM_STATS, **filters)
    return out

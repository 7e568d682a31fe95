"""Welch's t-test kernels: pure functions of one in-memory block.

The control cells are reduced once to per-gene count, mean, variance and
detection (:func:`control_moments`); a block of whole perturbation groups
is reduced to the same per group and tested against them
(:func:`ttest_block`). Means and variances are taken in float64 with two
passes over the values (the sum, then squared deviations from the mean;
zeros in closed form), so they do not lose digits to cancellation.

Welch's test (Welch 1947), as ``scipy.stats.ttest_ind(equal_var=False)``
and scanpy's ``rank_genes_groups(method="t-test")``: with group mean and
variance ``m1, v1`` over ``n1`` cells and control ``m2, v2, n2``,
``t = (m1 - m2) / sqrt(v1/n1 + v2/n2)`` and Welch-Satterthwaite degrees of
freedom ``(v1/n1 + v2/n2)^2 / ((v1/n1)^2/(n1-1) + (v2/n2)^2/(n2-1))``.
scanpy's ``t-test_overestim_var`` puts ``n1`` in place of ``n2`` (a larger
control variance for small groups).

Against the rest (scanpy's ``reference="rest"``): the frozen summary is of
every cell, ``n, mean_a, M2_a`` (``M2`` the sum of squared deviations from
the mean), and each group's own cells are taken out in the block kernel
(:func:`rest_moments`): the rest has ``r = n - n1`` cells, mean
``mean_r = (n mean_a - n1 m1) / r`` and
``M2_r = M2_a - M2_1 - (m1 - mean_r)^2 n1 r / n`` (Chan, Golub & LeVeque
1983, the pairwise update read backwards), all in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import special

from ..variables import LOGFOLDCHANGES, PTS, PTS_REST, PVALS, PVALS_ADJ, SCORES, STATISTICS
from ._common import (
    adjust_pvalues,
    block_inputs,
    canonical_csr,
    check_reference,
    check_values,
    exclude_low_genes,
    log2_fold_change,
)

#: Statistics returned by :func:`ttest_block`, in this order along axis 1 (names in :mod:`pertscale.variables`).
TTEST_STATS: tuple[str, ...] = STATISTICS["t-test"]


@dataclass(frozen=True)
class ControlMoments:
    """Frozen per-gene moments of the control cells.

    Attributes
    ----------
    n_cells
        Number of control cells.
    mean
        ``(n_genes,)`` float64 mean.
    var
        ``(n_genes,)`` float64 variance with ``n - 1`` in the denominator.
    nnz
        ``(n_genes,)`` int64 control cells with a non-zero value.
    """

    n_cells: int
    mean: np.ndarray
    var: np.ndarray
    nnz: np.ndarray

    @property
    def n_genes(self) -> int:
        """Number of genes summarised."""
        return self.mean.shape[0]


def _group_moments(block: sp.csr_matrix, group_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group of consecutive rows: ``(mean, var, nnz)``, each ``(n_groups, n_genes)``.

    Two passes over the non-zero values: sums, then squared deviations from
    the mean; each group's zeros add ``(rows - nnz) * mean^2``.
    """
    if (block.data == 0).any():
        block = block.copy()
        block.eliminate_zeros()  # stored zeros are zeros
    n_groups, n_genes = group_sizes.shape[0], block.shape[1]
    row_group = np.repeat(np.arange(n_groups, dtype=np.int64), group_sizes)
    entry_group = np.repeat(row_group, np.diff(block.indptr))
    key = entry_group * n_genes + block.indices
    values = block.data.astype(np.float64)
    size = n_groups * n_genes
    m = group_sizes.astype(np.float64)[:, None]
    nnz = np.bincount(key, minlength=size).reshape(n_groups, n_genes)
    mean = np.bincount(key, values, minlength=size).reshape(n_groups, n_genes) / m
    dev = values - mean.ravel()[key]
    m2 = np.bincount(key, dev * dev, minlength=size).reshape(n_groups, n_genes) + (m - nnz) * mean**2
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(m > 1, m2 / (m - 1), 0.0)  # one cell: 0, as scanpy
    return mean, var, nnz


def control_moments(control: sp.csr_matrix | sp.spmatrix | np.ndarray) -> ControlMoments:
    """Summarise the control cells once, for every later comparison.

    Parameters
    ----------
    control
        ``(n_control_cells, n_genes)`` expression of the control cells, CSR or
        dense, non-negative, in the units of the test (log1p-normalized).

    Returns
    -------
    ControlMoments
        Per gene: mean, variance (``n - 1`` denominator) and non-zero count.

    Raises
    ------
    ValueError
        If the matrix holds NaN, infinite or negative values.
    """
    control = canonical_csr(control)
    check_values(control)
    mean, var, nnz = _group_moments(control, np.asarray([control.shape[0]], dtype=np.int64))
    return ControlMoments(n_cells=int(control.shape[0]), mean=mean[0], var=var[0], nnz=nnz[0].astype(np.int64))


def rest_moments(
    every: tuple[float, np.ndarray, np.ndarray, np.ndarray],
    group: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Moments of the rest of the cells: every cell's with a group's own cells taken out.

    Parameters
    ----------
    every
        ``(n, mean, var, nnz)`` of every cell: ``n`` a number, the others
        ``(n_genes,)`` (a :class:`ControlMoments` of all cells).
    group
        ``(m, mean, var, nnz)`` of each group: ``m`` ``(n_groups, 1)``, the
        others ``(n_groups, n_genes)``; ``var`` with ``m - 1`` in the
        denominator (0 for one cell).

    Returns
    -------
    tuple
        ``(r, mean, var, nnz)`` of the rest, ``r`` ``(n_groups, 1)`` and the
        others ``(n_groups, n_genes)`` float64; the variance with ``r - 1``
        in the denominator, 0 where the rest has no non-zero value (exactly,
        not the residue of a subtraction) and never negative.
    """
    n, mean_a, var_a, nnz_a = every
    m, mean_g, var_g, nnz_g = group
    r = n - m
    nnz = nnz_a[None, :] - nnz_g
    empty = nnz == 0  # every cell of the rest is zero: mean and variance are 0 exactly
    mean = np.where(empty, 0.0, (n * mean_a[None, :] - m * mean_g) / r)
    delta = mean_g - mean
    m2 = (n - 1.0) * var_a[None, :] - (m - 1.0) * var_g - delta * delta * (m * r / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(empty | (r < 2), 0.0, np.maximum(m2, 0.0) / (r - 1.0))
    return r, mean, var, nnz.astype(np.float64)


def welch(
    mean1: np.ndarray,
    var1: np.ndarray,
    n1: np.ndarray,
    mean2: np.ndarray,
    var2: np.ndarray,
    n2: np.ndarray,
    *,
    alternative: str = "two-sided",
) -> tuple[np.ndarray, np.ndarray]:
    """Welch's t statistic and p-value from summary statistics (broadcasting).

    Equal to ``scipy.stats.ttest_ind_from_stats(mean1, sqrt(var1), n1,
    mean2, sqrt(var2), n2, equal_var=False, alternative=alternative)``.

    Returns
    -------
    tuple
        ``(t, p)``; NaN where both variances are zero.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        vn1, vn2 = var1 / n1, var2 / n2
        df = (vn1 + vn2) ** 2 / (vn1**2 / (n1 - 1.0) + vn2**2 / (n2 - 1.0))
        t = (mean1 - mean2) / np.sqrt(vn1 + vn2)
    if alternative == "two-sided":
        p = 2.0 * special.stdtr(df, -np.abs(t))
    elif alternative == "greater":
        p = special.stdtr(df, -t)
    elif alternative == "less":
        p = special.stdtr(df, t)
    else:
        raise ValueError(f"alternative {alternative!r} is not supported; choose one of two-sided, less, greater")
    return t, p


def ttest_block(
    block: sp.csr_matrix | np.ndarray,
    group_sizes: np.ndarray,
    control: ControlMoments | Sequence[ControlMoments],
    bounds: Sequence[int] | None = None,
    *,
    overestimate_variance: bool = False,
    reference: str = "control",
    corr_method: str = "benjamini-hochberg",
    alternative: str = "two-sided",
    min_pct=0.0,
    min_mean=0.0,
) -> np.ndarray:
    """Welch's t-test of every group in a block against the frozen control, or against the rest of the cells.

    Parameters
    ----------
    block
        ``(n_rows, n_genes)`` non-negative log1p-normalized expression, CSR
        (or dense), whose rows are whole groups one after another.
    group_sizes
        ``(n_groups,)`` rows of each group, in row order; sums to ``n_rows``.
    control
        The frozen control moments (:func:`control_moments`), or their parts
        over consecutive ranges of genes. With ``reference="rest"``: the
        moments of every cell, the block's own included.
    bounds
        With parts: the ``(n_parts + 1,)`` gene bounds they cover.
    overestimate_variance
        scanpy's ``t-test_overestim_var``: the group's cell count in place of
        the control's in the control's share of the variance and in the
        degrees of freedom.
    reference
        ``"control"`` (default): each group against the cells ``control``
        summarises. ``"rest"``: against every other cell (scanpy's
        ``reference="rest"``), ``control`` summarising every cell; each
        group's own cells are taken out of it here (:func:`rest_moments`).
    corr_method
        ``"benjamini-hochberg"`` or ``"bonferroni"``, over the genes of each
        group.
    alternative
        ``"two-sided"``, ``"greater"`` (group mean above control) or
        ``"less"``, the group being the first sample as in
        ``scipy.stats.ttest_ind``.
    min_pct, min_mean
        Genes whose detection fraction or mean (log1p units) is below these
        on both sides are untested: NaN (:func:`exclude_low_genes`).

    Returns
    -------
    numpy.ndarray
        ``(n_groups, len(TTEST_STATS), n_genes)`` float64: t ``scores``
        (positive when the group mean is above control), ``pvals`` (Student
        t with Welch-Satterthwaite degrees of freedom), ``pvals_adj``,
        ``logfoldchanges`` (log2, scanpy's definition on log1p data: of
        ``expm1`` of the means), ``pts`` and ``pts_rest`` (of the control,
        or of each group's rest). Where both variances are zero the score is
        0 and the p-value 1, as in scanpy.

    Raises
    ------
    ValueError
        If the block has NaN or negative values, ``group_sizes`` does not add
        up to its rows, the control parts do not cover its genes, or
        ``reference`` is neither ``"control"`` nor ``"rest"``.

    Notes
    -----
    Welch (1947); scanpy's ``rank_genes_groups(method="t-test",
    reference=control)`` (or ``reference="rest"``) gives the same scores and
    p-values (its variances are one-pass, in float64 sums of float32
    products).
    """
    check_reference(reference)
    n_genes = block.shape[1]
    parts, bounds, group_sizes = block_inputs(control, ControlMoments, bounds, n_genes, group_sizes, block.shape[0])
    block = canonical_csr(block)
    check_values(block)
    mean, var, nnz = _group_moments(block, group_sizes)
    c_mean = np.concatenate([p.mean for p in parts])
    c_var = np.concatenate([p.var for p in parts])
    c_nnz = np.concatenate([p.nnz for p in parts]).astype(np.float64)
    c_n = float(parts[0].n_cells)
    n1 = group_sizes.astype(np.float64)[:, None]
    if reference == "rest":
        if (c_n - n1 < 1).any():
            raise ValueError(f"the summary holds {int(c_n)} cells, too few to hold every group and a rest")
        c_n, c_mean, c_var, c_nnz = rest_moments((c_n, c_mean, c_var, c_nnz), (n1, mean, var, nnz))
    else:
        c_mean, c_var, c_nnz = c_mean[None, :], c_var[None, :], c_nnz[None, :]
    n2 = n1 if overestimate_variance else c_n
    scores, pvals = welch(mean, var, n1, c_mean, c_var, n2, alternative=alternative)
    scores[np.isnan(scores)] = 0.0
    pvals[np.isnan(pvals)] = 1.0
    stat = {name: i for i, name in enumerate(TTEST_STATS)}
    out = np.empty((group_sizes.shape[0], len(TTEST_STATS), n_genes), dtype=np.float64)
    out[:, stat[SCORES]] = scores
    out[:, stat[PVALS]] = pvals
    out[:, stat[PVALS_ADJ]] = adjust_pvalues(pvals, corr_method)
    out[:, stat[LOGFOLDCHANGES]] = log2_fold_change(mean, c_mean)
    out[:, stat[PTS]] = nnz / n1
    pts_rest = c_nnz / c_n
    out[:, stat[PTS_REST]] = pts_rest
    exclude_low_genes(
        out,
        TTEST_STATS,
        mean=mean,
        mean_rest=c_mean,
        pts=nnz / n1,
        pts_rest=pts_rest,
        min_pct=min_pct,
        min_mean=min_mean,
        corr_method=corr_method,
    )
    return out

"""What every test against control shares: input checks, p-values, their adjustment, fold changes.

Pure numpy/scipy; no Dask.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy import special

from ..variables import DESCRIPTIVE, PVALS, PVALS_ADJ

#: Multiple-testing corrections over the genes of one perturbation.
CORR_METHODS = ("benjamini-hochberg", "bonferroni")
#: Alternative hypotheses, the perturbation being the first sample (as ``scipy.stats``).
ALTERNATIVES = ("two-sided", "less", "greater")
#: What each perturbation is compared with: the control cells, or every other cell (scanpy's ``reference="rest"``).
REFERENCES = ("control", "rest")


def canonical_csr(x) -> sp.csr_matrix:
    """CSR with duplicate entries summed (a copy when the input has any)."""
    x = sp.csr_matrix(x)
    if not x.has_canonical_format:
        x = x.copy()
        x.sum_duplicates()
    return x


def check_values(block: sp.csr_matrix) -> None:
    """Raise ``ValueError`` if a block holds NaN, infinite or negative values.

    Raises
    ------
    ValueError
        Naming the problem and what to do about it.
    """
    data = block.data
    if data.size == 0:
        return
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise ValueError(
            "the expression matrix contains NaN or infinite values; "
            "remove or impute them before testing (the test statistics are undefined for NaN)"
        )
    if data.min() < 0:
        raise ValueError(
            "the expression matrix contains negative values; the tests against control expect "
            "non-negative expression (raw counts or log1p-normalized counts), not scaled data"
        )


def adjust_pvalues(pvals: np.ndarray, method: str = "benjamini-hochberg") -> np.ndarray:
    """Adjust p-values along the last axis (the genes of one perturbation).

    Parameters
    ----------
    pvals
        ``(..., n_genes)`` p-values; NaN entries are left out of the family
        and stay NaN.
    method
        ``"benjamini-hochberg"`` (Benjamini & Hochberg 1995, step-up FDR) or
        ``"bonferroni"``.

    Returns
    -------
    numpy.ndarray
        Adjusted p-values, same shape, clipped to ``[0, 1]``.

    Raises
    ------
    ValueError
        For an unknown method.
    """
    if method not in CORR_METHODS:
        raise ValueError(f"corr_method {method!r} is not supported; choose one of {CORR_METHODS}")
    pvals = np.asarray(pvals, dtype=np.float64)
    flat = pvals.reshape(-1, pvals.shape[-1])
    n = (~np.isnan(flat)).sum(axis=1, keepdims=True).astype(np.float64)  # family size of each row
    if method == "bonferroni":
        return np.minimum(flat * n, 1.0).reshape(pvals.shape)
    # all rows at once: NaN sorts last, so each row's first n entries are its family, in order
    order = np.argsort(flat, axis=1, kind="stable")
    ranked = np.take_along_axis(flat, order, axis=1) * n / np.arange(1, flat.shape[1] + 1)
    ranked = np.minimum.accumulate(np.where(np.isnan(ranked), np.inf, ranked)[:, ::-1], axis=1)[:, ::-1]
    out = np.empty_like(flat)
    np.put_along_axis(out, order, np.minimum(ranked, 1.0), axis=1)
    out[np.isnan(flat)] = np.nan
    return out.reshape(pvals.shape)


def log2_fold_change(mean_group: np.ndarray, mean_rest: np.ndarray) -> np.ndarray:
    """Scanpy's log2 fold change for log1p (natural log) data.

    ``log2((expm1(mean_group) + 1e-9) / (expm1(mean_rest) + 1e-9))``, the means
    taken of log1p values, as in ``scanpy.tl.rank_genes_groups``.
    """
    return np.log2((np.expm1(mean_group) + 1e-9) / (np.expm1(mean_rest) + 1e-9))


def normal_pvalues(z: np.ndarray, alternative: str = "two-sided") -> np.ndarray:
    """P-values of standard normal statistics ``z`` (positive: the perturbation above control).

    ``"two-sided"``: ``2 * P(Z > |z|)``; ``"greater"``: ``P(Z > z)``;
    ``"less"``: ``P(Z < z)``. NaN statistics give NaN.
    """
    if alternative == "two-sided":
        return 2.0 * special.ndtr(-np.abs(z))  # = scipy.stats.norm.sf(|z|), without its overhead
    if alternative == "greater":
        return special.ndtr(-z)
    if alternative == "less":
        return special.ndtr(z)
    raise ValueError(f"alternative {alternative!r} is not supported; choose one of {ALTERNATIVES}")


def check_reference(reference: str) -> None:
    """Raise ``ValueError`` unless ``reference`` is one of :data:`REFERENCES`.

    Raises
    ------
    ValueError
        Listing the choices.
    """
    if reference not in REFERENCES:
        raise ValueError(
            f"reference {reference!r} is not supported; choose one of {REFERENCES} "
            "('control': against the control cells; 'rest': against every other cell, as scanpy's default)"
        )


def _pair(value) -> tuple[float, float]:
    """``(control, perturbation)`` thresholds from one number or a pair."""
    if np.ndim(value) == 0:
        return float(value), float(value)
    control, perturbation = value
    return float(control), float(perturbation)


def exclude_low_genes(
    out: np.ndarray,
    statistics: tuple[str, ...],
    *,
    mean: np.ndarray,
    mean_rest: np.ndarray,
    pts: np.ndarray,
    pts_rest: np.ndarray,
    min_pct=0.0,
    min_mean=0.0,
    corr_method: str = "benjamini-hochberg",
) -> None:
    """Report genes too low on both sides of a comparison as untested (NaN), in place; adjust again.

    A side (the perturbation's cells, the control's) is high enough when its
    fraction of cells with a count is at least ``min_pct`` and its mean at
    least ``min_mean``; a gene is tested in a comparison when either side
    is (crispyx's rule). Untested genes get NaN in every statistic but
    the descriptive ones (``pts``, ``pts_rest``, ``baseMean``:
    :data:`pertscale.variables.DESCRIPTIVE`), and leave the family of the
    multiple-testing correction. Thresholds are one number for both sides or
    ``(control, perturbation)``; 0 (the default) tests every gene.

    Parameters
    ----------
    out
        ``(n_groups, len(statistics), n_genes)`` a block kernel's output.
    statistics
        Its statistic names (``"pvals"`` and ``"pvals_adj"`` among them).
    mean, pts
        ``(n_groups, n_genes)`` the perturbations' means (in the test's
        units) and detection fractions.
    mean_rest, pts_rest
        ``(n_genes,)`` the control's, or ``(n_groups, n_genes)`` each
        group's own reference (the rest of the cells).
    min_pct, min_mean
        The thresholds: a number, or ``(control, perturbation)``.
    corr_method
        The correction to apply again after the exclusion.
    """
    (pct_c, pct_p), (mean_c, mean_p) = _pair(min_pct), _pair(min_mean)
    if max(pct_c, pct_p, mean_c, mean_p) <= 0:
        return
    high_group = (pts >= pct_p) & (mean >= mean_p)
    high_control = (pts_rest >= pct_c) & (mean_rest >= mean_c)
    low = ~(high_group | high_control)  # (n_genes,) or (n_groups, n_genes): broadcast either way
    if not low.any():
        return
    index = {name: i for i, name in enumerate(statistics)}
    for name, i in index.items():
        if name not in DESCRIPTIVE:
            out[:, i][low] = np.nan
    out[:, index[PVALS_ADJ]] = adjust_pvalues(out[:, index[PVALS]], corr_method)


def block_inputs(control, summary_type: type, bounds, n_genes: int, group_sizes, n_rows: int):
    """Check what a block kernel is given: the control parts cover its genes, the groups split its rows.

    Returns
    -------
    tuple
        ``(parts, bounds, group_sizes)``: a list of summaries, int64 gene
        bounds, int64 rows per group.

    Raises
    ------
    ValueError
        If the parts do not cover the genes, or a group is empty or the
        groups do not add up to the rows.
    """
    parts = [control] if isinstance(control, summary_type) else list(control)
    bounds = np.asarray([0, n_genes] if bounds is None else bounds, dtype=np.int64)
    if len(bounds) != len(parts) + 1 or bounds[-1] != n_genes or sum(p.n_genes for p in parts) != n_genes:
        raise ValueError(f"the control summary parts do not cover the block's {n_genes} genes")
    group_sizes = np.asarray(group_sizes, dtype=np.int64)
    if (group_sizes < 1).any() or group_sizes.sum() != n_rows:
        raise ValueError(f"group_sizes {group_sizes.tolist()[:10]} do not split the block's {n_rows} rows")
    return parts, bounds, group_sizes

"""Size factors: median-of-ratios variants over raw counts (DESeq2's ``estimateSizeFactors``).

Two passes over row blocks, each a pure function of one block:

1. :func:`log_count_sums` per block, summed: each gene's ``sum log y`` over
   its non-zero counts and their number; :func:`reference_log_means` turns
   them into each gene's log reference and whether it is used;
2. :func:`cell_size_factors` per block: each cell's median ratio to the
   references over its non-zero usable genes; :func:`finish_size_factors`
   fills cells without any and scales to geometric mean 1 (not the classic ``ratio`` factors, as DESeq2).

Methods (:data:`SIZE_FACTOR_METHODS`): ``"sparse"`` (crispyx's sparse-aware
variant for single cells), ``"poscounts"`` (DESeq2's ``type="poscounts"``,
PyDESeq2's ``size_factors_fit_type="poscounts"``), ``"ratio"`` (DESeq2's
classic median of ratios, Anders & Huber 2010).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from numba import njit

from .._common import canonical_csr
from ._counts import check_counts


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


def finish_size_factors(raw: np.ndarray, *, rescale: bool = True) -> tuple[np.ndarray, int]:
    """Cells without a size factor get the median of the others; then scaled to geometric mean 1 (``rescale``).

    DESeq2 scales its ``poscounts`` factors so and leaves the classic
    ``ratio`` factors as they are (``rescale=False``).

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
    return (raw / np.exp(np.mean(np.log(raw))) if rescale else raw), int((~ok).sum())

"""Quality-control and normalization kernels on one CSR row block."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

#: Per-cell statistics of :func:`cell_stats`, in column order.
CELL_STATS = ("total_counts", "n_genes_by_counts", "total_counts_mt")
#: Per-gene partial sums of :func:`gene_stats`, in row order.
GENE_STATS = ("n_cells_by_counts", "total_counts", "n_negative", "n_nan", "n_noninteger", "n_infinite")


def cell_stats(block: sp.csr_matrix, mt_mask: np.ndarray | None = None) -> np.ndarray:
    """Per-cell totals of a block.

    Parameters
    ----------
    block
        ``(n_rows, n_genes)`` CSR counts.
    mt_mask
        ``(n_genes,)`` boolean, mitochondrial genes; ``None`` for none.

    Returns
    -------
    numpy.ndarray
        ``(n_rows, 3)`` float64: ``total_counts`` (sum of the row),
        ``n_genes_by_counts`` (non-zero entries; stored zeros do not count)
        and ``total_counts_mt``.
    """
    block = sp.csr_matrix(block)
    data = block.data.astype(np.float64, copy=False)
    rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
    n = block.shape[0]
    out = np.zeros((n, 3), dtype=np.float64)
    out[:, 0] = np.bincount(rows, weights=data, minlength=n)
    out[:, 1] = np.bincount(rows, weights=(data != 0), minlength=n)
    if mt_mask is not None and mt_mask.any():
        keep = mt_mask[block.indices]
        out[:, 2] = np.bincount(rows[keep], weights=data[keep], minlength=n)
    return out


def gene_stats(block: sp.csr_matrix) -> np.ndarray:
    """Per-gene partial sums of a block, to be added across blocks.

    Returns
    -------
    numpy.ndarray
        ``(1, len(GENE_STATS), n_genes)`` float64, in the order of
        ``GENE_STATS``: cells with a non-zero value, sum of the finite
        values, and counts of negative, NaN, non-integer (finite) and
        infinite values.
    """
    block = sp.csr_matrix(block)
    n_genes = block.shape[1]
    data = block.data.astype(np.float64, copy=False)
    idx = block.indices
    out = np.zeros((1, len(GENE_STATS), n_genes), dtype=np.float64)
    nan = np.isnan(data)
    finite = np.isfinite(data)
    stat = {name: i for i, name in enumerate(GENE_STATS)}
    out[0, stat["n_cells_by_counts"]] = np.bincount(idx, weights=(data != 0) & ~nan, minlength=n_genes)
    out[0, stat["total_counts"]] = np.bincount(idx, weights=np.where(finite, data, 0.0), minlength=n_genes)
    out[0, stat["n_negative"]] = np.bincount(idx, weights=data < 0, minlength=n_genes)
    out[0, stat["n_nan"]] = np.bincount(idx, weights=nan, minlength=n_genes)
    out[0, stat["n_infinite"]] = np.bincount(idx, weights=np.isinf(data), minlength=n_genes)
    if np.issubdtype(block.dtype, np.floating):
        with np.errstate(invalid="ignore"):
            noninteger = (data != np.floor(data)) & finite
        out[0, stat["n_noninteger"]] = np.bincount(idx, weights=noninteger, minlength=n_genes)
    return out


def detection_by_group(block: sp.csr_matrix, codes: np.ndarray, keep: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per group, the number of kept cells in which each gene is detected.

    Parameters
    ----------
    block
        ``(n_rows, n_genes)`` CSR counts.
    codes
        ``(n_rows,)`` int group code of each row (-1: not counted).
    keep
        ``(n_rows,)`` bool: rows to count (e.g. cells with enough genes).
    present
        The codes to report, in this order (each row's code must be among
        them or be -1).

    Returns
    -------
    numpy.ndarray
        ``(len(present), n_genes)`` int32 counts of non-zero entries.
    """
    block = sp.csr_matrix(block)
    n_genes = block.shape[1]
    n_present = present.shape[0]
    slot = np.full(int(present.max()) + 2 if n_present else 1, -1, dtype=np.int64)
    slot[present] = np.arange(n_present)
    row_slot = np.where((codes >= 0) & keep, slot[np.maximum(codes, 0)], -1)
    rows = np.repeat(row_slot, np.diff(block.indptr))
    counted = (rows >= 0) & (block.data != 0)
    flat = rows[counted] * n_genes + block.indices[counted]
    return np.bincount(flat, minlength=n_present * n_genes).reshape(n_present, n_genes).astype(np.int32)


def normalize_rows(block: sp.csr_matrix, target_sum: float) -> sp.csr_matrix:
    """Scale each row to sum to ``target_sum``, in float32, as scanpy does.

    Mirrors ``scanpy.pp.normalize_total`` on a CSR matrix bit for bit:
    integer counts become float32, the row sums (exact for integer counts
    below 2**24 per cell) are divided by ``target_sum`` in float32, and each
    value is divided by its row's factor. Rows summing to zero stay zero.

    Parameters
    ----------
    block
        ``(n_rows, n_genes)`` counts, CSR.
    target_sum
        Counts per cell after scaling (1e4 in scanpy tutorials).

    Returns
    -------
    scipy.sparse.csr_matrix
        float32 (float64 input stays float64) scaled counts, not log
        transformed.
    """
    block = sp.csr_matrix(block)
    if np.issubdtype(block.dtype, np.integer) or block.dtype == np.bool_:
        block = block.astype(np.float32)
    else:
        block = block.copy()
    dtype = block.dtype
    lengths = np.diff(block.indptr)
    rows = np.repeat(np.arange(block.shape[0]), lengths)
    sums = np.bincount(rows, weights=block.data.astype(np.float64), minlength=block.shape[0])
    factors = sums.astype(dtype) / dtype.type(target_sum)
    factors = factors + (factors == 0)
    block.data = block.data / np.repeat(factors, lengths)
    return block


def log1p_values(block: sp.csr_matrix) -> sp.csr_matrix:
    """Natural ``log1p`` of the stored values (zeros stay zero), dtype kept."""
    block = sp.csr_matrix(block, copy=True)
    if np.issubdtype(block.dtype, np.integer):
        block = block.astype(np.float32)
    np.log1p(block.data, out=block.data)
    return block

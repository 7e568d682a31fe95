"""Quality-control and normalization kernels on one CSR row block.

The sums are numba loops over the non-zeros (they release the GIL and need no
temporary the size of the block); normalization repeats scanpy's float32
arithmetic so that its values are bit-identical to scanpy's.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from numba import njit

from ..variables import N_CELLS_BY_COUNTS, N_GENES_BY_COUNTS, TOTAL_COUNTS, TOTAL_COUNTS_MT

#: Per-cell statistics of :func:`cell_stats`, in column order (scanpy's QC names, :mod:`pertscale.variables`).
CELL_STATS = (TOTAL_COUNTS, N_GENES_BY_COUNTS, TOTAL_COUNTS_MT)
#: Per-gene partial sums of :func:`gene_stats`, in row order: two QC metrics, then the value checks' counts.
GENE_STATS = (N_CELLS_BY_COUNTS, TOTAL_COUNTS, "n_negative", "n_nan", "n_noninteger", "n_infinite")


@njit(cache=True, nogil=True)
def _rows(indptr, indices, data, mt):
    """Per row: sum of values, non-zero entries, sum over the genes flagged in ``mt``."""
    n = indptr.shape[0] - 1
    out = np.zeros((n, 3), dtype=np.float64)
    for r in range(n):
        total = 0.0
        nonzero = 0.0
        in_mt = 0.0
        for k in range(indptr[r], indptr[r + 1]):
            x = data[k]
            total += x
            if x != 0:
                nonzero += 1.0
            if mt[indices[k]]:
                in_mt += x
        out[r, 0] = total
        out[r, 1] = nonzero
        out[r, 2] = in_mt
    return out


@njit(cache=True, nogil=True)
def _genes(indices, data, n_genes, is_float):
    """Per gene: non-zero cells, sum of finite values, and counts of negative, NaN, non-integer, infinite values."""
    out = np.zeros((6, n_genes), dtype=np.float64)
    for k in range(indices.shape[0]):
        j = indices[k]
        x = data[k]
        if is_float:
            if x != x:
                out[3, j] += 1.0  # NaN
                continue
            if x == np.inf or x == -np.inf:
                out[5, j] += 1.0
                if x < 0:
                    out[2, j] += 1.0
                continue
            if x != np.floor(x):
                out[4, j] += 1.0
        if x != 0:
            out[0, j] += 1.0
        if x < 0:
            out[2, j] += 1.0
        out[1, j] += x
    return out


@njit(cache=True, nogil=True)
def _detect(indptr, indices, data, row_slot, n_slots, n_genes):
    """Per slot, the rows of that slot in which each gene is non-zero."""
    out = np.zeros((n_slots, n_genes), dtype=np.int32)
    for r in range(indptr.shape[0] - 1):
        s = row_slot[r]
        if s < 0:
            continue
        for k in range(indptr[r], indptr[r + 1]):
            if data[k] != 0:
                out[s, indices[k]] += 1
    return out


def cell_stats(block: sp.csr_matrix, mt_mask: np.ndarray | None = None) -> np.ndarray:
    """Per-cell totals of a block, in one loop over its non-zeros (no temporary of their size).

    Parameters
    ----------
    block
        ``(n_rows, n_genes)`` CSR counts.
    mt_mask
        ``(n_genes,)`` boolean, mitochondrial genes; ``None`` for none.

    Returns
    -------
    numpy.ndarray
        ``(n_rows, len(CELL_STATS))`` float64: ``total_counts`` (sum of the
        row), ``n_genes_by_counts`` (non-zero entries; stored zeros do not
        count) and ``total_counts_mt``.
    """
    block = sp.csr_matrix(block)
    mt = np.zeros(block.shape[1], dtype=np.bool_) if mt_mask is None else np.asarray(mt_mask, dtype=np.bool_)
    return _rows(block.indptr, block.indices, block.data, mt)


def gene_stats(block: sp.csr_matrix) -> np.ndarray:
    """Per-gene partial sums of a block, to be added across blocks; one loop over its non-zeros.

    Returns
    -------
    numpy.ndarray
        ``(1, len(GENE_STATS), n_genes)`` float64, in the order of
        ``GENE_STATS``: cells with a non-zero value, sum of the finite
        values, and counts of negative, NaN, non-integer (finite) and
        infinite values.
    """
    block = sp.csr_matrix(block)
    is_float = bool(np.issubdtype(block.dtype, np.floating))
    return _genes(block.indices, block.data, block.shape[1], is_float)[None]


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
    n_present = present.shape[0]
    slot = np.full(int(present.max()) + 2 if n_present else 1, -1, dtype=np.int64)
    slot[present] = np.arange(n_present)
    row_slot = np.where((codes >= 0) & keep, slot[np.maximum(codes, 0)], -1).astype(np.int64)
    return _detect(block.indptr, block.indices, block.data, row_slot, n_present, block.shape[1])


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
    sums = _rows(block.indptr, block.indices, block.data, np.zeros(block.shape[1], dtype=np.bool_))[:, 0]
    dtype = np.dtype(np.float64) if block.dtype == np.float64 else np.dtype(np.float32)
    factors = sums.astype(dtype) / dtype.type(target_sum)
    factors = factors + (factors == 0)
    lengths = np.diff(block.indptr)
    data = block.data.astype(dtype) / np.repeat(factors, lengths)
    return sp.csr_matrix((data, block.indices, block.indptr), shape=block.shape)  # the index arrays are shared


def log1p_values(block: sp.csr_matrix) -> sp.csr_matrix:
    """Natural ``log1p`` of the stored values (zeros stay zero), dtype kept."""
    block = sp.csr_matrix(block)
    dtype = block.dtype if np.issubdtype(block.dtype, np.floating) else np.dtype(np.float32)
    data = np.log1p(block.data.astype(dtype, copy=True))
    return sp.csr_matrix((data, block.indices, block.indptr), shape=block.shape)  # the index arrays are shared

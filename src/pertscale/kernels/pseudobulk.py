"""Pseudo-bulk kernels: per-group sums of one CSR row block, and their merge.

Nothing here knows about Dask or files. For a group ``g`` with cells ``C_g``
and a gene ``j``, one block contributes the sums over its own cells of ``g``:

- ``counts[g, j] = sum_c x[c, j]``, the raw counts;
- ``normalized[g, j] = sum_c n[c, j]`` with ``n[c, j] = x[c, j] / (t_c / target_sum)``
  and ``t_c`` the cell's total: ``scanpy.pp.normalize_total`` as
  :func:`pertscale.kernels.qc.normalize_rows` computes it (float32 for integer
  counts, bit for bit scanpy's values);
- ``log1p[g, j] = sum_c ln(1 + n[c, j])``, natural logarithm, as
  :func:`pertscale.kernels.qc.log1p_values` (``scanpy.pp.log1p``).

Zeros add nothing, so only the stored values are visited. The sums are
float64 (exact for integer counts below 2**53). A block reports only the
groups it holds, as sparse ``n_present x n_genes`` matrices: a partial never
holds more values than the block has non-zeros, whatever the number of
groups or the order of the cells. :func:`merge_group_sums` adds partials
row by row by group code, so a tree of merges gives the totals; means are the
sums divided by ``n_cells``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .qc import log1p_values, normalize_rows

#: The summed matrices of :class:`GroupSums`, by field name.
SUMMED = ("counts", "normalized", "log1p")
#: The value checks of :class:`GroupSums`, by field name.
VALUE_CHECKS = ("n_negative", "n_nan", "n_infinite", "n_noninteger")


@dataclass(frozen=True)
class GroupSums:
    """Per-group sums over some cells (one block, or several merged).

    Attributes
    ----------
    codes
        ``(n_present,)`` int64 group codes, sorted, distinct.
    n_cells
        ``(n_present,)`` int64 cells of each group.
    counts
        ``(n_present, n_genes)`` float64 CSR: summed raw counts.
    normalized
        ``(n_present, n_genes)`` float64 CSR: summed ``normalize_total`` values
        (counts per ``target_sum``, not log transformed).
    log1p
        ``(n_present, n_genes)`` float64 CSR: summed natural ``log1p`` of the
        normalized values.
    n_negative, n_nan, n_infinite, n_noninteger
        Stored values of the raw matrix that are negative, NaN, infinite, or
        finite but not whole numbers (all cells, counted or not).
    """

    codes: np.ndarray
    n_cells: np.ndarray
    counts: sp.csr_matrix
    normalized: sp.csr_matrix
    log1p: sp.csr_matrix
    n_negative: int
    n_nan: int
    n_infinite: int
    n_noninteger: int


def _value_checks(data: np.ndarray) -> dict[str, int]:
    if not np.issubdtype(data.dtype, np.floating):
        return {"n_negative": int((data < 0).sum()), "n_nan": 0, "n_infinite": 0, "n_noninteger": 0}
    finite = np.isfinite(data)
    return {
        "n_negative": int((data < 0).sum()),
        "n_nan": int(np.isnan(data).sum()),
        "n_infinite": int(np.isinf(data).sum()),
        "n_noninteger": int((data[finite] != np.floor(data[finite])).sum()),
    }


def group_sums(block, codes: np.ndarray, *, target_sum: float) -> GroupSums:
    """Sums of one row block per group: raw counts, normalized values and their log1p.

    Parameters
    ----------
    block
        ``(n_rows, n_genes)`` raw counts, CSR (or anything ``scipy.sparse.csr_matrix`` takes).
    codes
        ``(n_rows,)`` integer group code of each row; rows coded ``-1`` are not counted.
    target_sum
        Counts per cell after normalization (``scanpy.pp.normalize_total``'s ``target_sum``).

    Returns
    -------
    GroupSums
        The groups present in the block, in code order.

    Raises
    ------
    ValueError
        If ``codes`` does not have one entry per row.
    """
    block = sp.csr_matrix(block)
    codes = np.asarray(codes, dtype=np.int64)
    if codes.shape != (block.shape[0],):
        raise ValueError(f"codes has shape {codes.shape}; one code per row ({block.shape[0]}) is needed")
    rows = np.flatnonzero(codes >= 0)
    present, slot = np.unique(codes[rows], return_inverse=True)
    # one 1 per counted row: the product adds each group's rows (scipy's sparse product, float64 sums)
    indicator = sp.csr_matrix(
        (np.ones(rows.size, dtype=np.float64), (slot, rows)), shape=(present.size, block.shape[0])
    )
    with np.errstate(all="ignore"):  # NaN, infinite or negative counts: counted below, refused by the caller
        normalized = normalize_rows(block, target_sum)
        logged = log1p_values(normalized)
    return GroupSums(
        codes=present,
        n_cells=np.bincount(slot, minlength=present.size).astype(np.int64),
        counts=sp.csr_matrix(indicator @ block),
        normalized=sp.csr_matrix(indicator @ normalized),
        log1p=sp.csr_matrix(indicator @ logged),
        **_value_checks(block.data),
    )


def _stack(parts, name: str, slots: list[np.ndarray], shape: tuple[int, int]) -> sp.csr_matrix:
    """One summed matrix of several partials, rows moved to the merged codes (duplicates added)."""
    pieces = [getattr(p, name).tocoo() for p in parts]
    data = np.concatenate([m.data for m in pieces]) if pieces else np.empty(0)
    rows = np.concatenate([s[m.row] for m, s in zip(pieces, slots, strict=True)]) if pieces else np.empty(0, int)
    cols = np.concatenate([m.col for m in pieces]) if pieces else np.empty(0, int)
    return sp.csr_matrix((data.astype(np.float64, copy=False), (rows, cols)), shape=shape)


def merge_group_sums(*parts: GroupSums) -> GroupSums:
    """Add partial sums: the union of their groups, sums of a group added.

    Parameters
    ----------
    *parts
        Partials over disjoint sets of cells, all with the same number of genes.

    Returns
    -------
    GroupSums
        Over all their cells; its size is bounded by the groups present in
        the parts, not by the number of parts.

    Raises
    ------
    ValueError
        If no part is given or the parts disagree on the number of genes.
    """
    if not parts:
        raise ValueError("merge_group_sums needs at least one partial")
    n_genes = {p.counts.shape[1] for p in parts}
    if len(n_genes) != 1:
        raise ValueError(f"partials have different numbers of genes: {sorted(n_genes)}")
    codes = np.unique(np.concatenate([p.codes for p in parts]))
    slots = [np.searchsorted(codes, p.codes) for p in parts]
    n_cells = np.zeros(codes.size, dtype=np.int64)
    for p, s in zip(parts, slots, strict=True):
        n_cells[s] += p.n_cells  # codes are distinct within a partial
    shape = (codes.size, n_genes.pop())
    return GroupSums(
        codes=codes,
        n_cells=n_cells,
        **{name: _stack(parts, name, slots, shape) for name in SUMMED},
        **{name: sum(getattr(p, name) for p in parts) for name in VALUE_CHECKS},
    )

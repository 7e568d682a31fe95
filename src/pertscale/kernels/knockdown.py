"""Knock-down of a perturbation's own target gene, cell by cell: the control's distribution and each cell's place in it.

The control summary of one target gene is its control cells' values
(log1p-normalized expression): the number of cells ``n``, of zeros ``z``,
the median, and the sorted non-zero values. A cell of a perturbation with
value ``x`` at its target gets the mid-distribution function of the
control at ``x``,

    score(x) = (#{control < x} + 0.5 #{control = x}) / n,

0.5 for a cell typical of the control, near 0 for a cell whose target is
below almost every control cell: the mid-p value of a one-cell test of
knock-down (Lancaster 1961), a percentile that ties (zeros) share fairly.
A zero value scores ``0.5 z / n``. The non-zero values of a gene with more
than :data:`MAX_POINTS` of them are kept at :data:`MAX_POINTS` evenly spaced
order statistics with their ranks; counts between two kept values are
interpolated linearly in rank, which bounds the score's error by
``1 / MAX_POINTS`` of the non-zero cells' share.

Kernels only: numpy on one in-memory block, no Dask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

#: Most non-zero control values kept per target gene (evenly spaced order statistics beyond).
MAX_POINTS = 1024


@dataclass(frozen=True)
class ControlTargets:
    """The control's distribution at each target gene.

    Attributes
    ----------
    n
        ``(T,)`` int64 control cells.
    zeros
        ``(T,)`` int64 control cells with value 0.
    median
        ``(T,)`` float64 the control's median value (0 when at least half the cells are 0).
    values
        ``(T, K)`` float64 sorted non-zero values kept (NaN padded), ``K <= MAX_POINTS``.
    ranks
        ``(T, K)`` float64 the 0-based rank of each kept value among the gene's non-zero values.
    n_nonzero
        ``(T,)`` int64 non-zero control values.
    """

    n: np.ndarray
    zeros: np.ndarray
    median: np.ndarray
    values: np.ndarray
    ranks: np.ndarray
    n_nonzero: np.ndarray


def control_targets(control: sp.spmatrix | np.ndarray) -> ControlTargets:
    """The :class:`ControlTargets` of ``control`` (``(n_control, T)``: the control cells at the target genes)."""
    csc = sp.csc_matrix(control, dtype=np.float64)
    n_cells, n_targets = csc.shape
    width = max(1, min(MAX_POINTS, int(np.diff(csc.indptr).max(initial=0))))
    values = np.full((n_targets, width), np.nan)
    ranks = np.full((n_targets, width), np.nan)
    n_nonzero = np.zeros(n_targets, dtype=np.int64)
    median = np.zeros(n_targets)
    for t in range(n_targets):
        col = csc.data[csc.indptr[t] : csc.indptr[t + 1]]
        col = np.sort(col[col != 0])
        k = col.size
        n_nonzero[t] = k
        zeros = n_cells - k
        if k:
            keep = np.arange(k) if k <= width else np.unique(np.round(np.linspace(0, k - 1, width)).astype(np.int64))
            values[t, : keep.size] = col[keep]
            ranks[t, : keep.size] = keep
            median[t] = _median(col, zeros, n_cells)
    return ControlTargets(
        n=np.full(n_targets, n_cells, dtype=np.int64),
        zeros=n_cells - n_nonzero,
        median=median,
        values=values,
        ranks=ranks,
        n_nonzero=n_nonzero,
    )


def _median(nonzero_sorted: np.ndarray, zeros: int, n: int) -> float:
    """Median of ``zeros`` zeros and the sorted non-zero values (numpy's: the mean of the two middle values)."""

    def at(i: int) -> float:
        return 0.0 if i < zeros else float(nonzero_sorted[i - zeros])

    return 0.5 * (at((n - 1) // 2) + at(n // 2))


def concat_control_targets(parts: list[ControlTargets]) -> ControlTargets:
    """The summaries of consecutive ranges of target genes as one."""
    width = max(p.values.shape[1] for p in parts)

    def padded(a):
        return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=np.nan)

    return ControlTargets(
        n=np.concatenate([p.n for p in parts]),
        zeros=np.concatenate([p.zeros for p in parts]),
        median=np.concatenate([p.median for p in parts]),
        values=np.vstack([padded(p.values) for p in parts]),
        ranks=np.vstack([padded(p.ranks) for p in parts]),
        n_nonzero=np.concatenate([p.n_nonzero for p in parts]),
    )


def _below(summary: ControlTargets, t: int, x: np.ndarray, *, side: str) -> np.ndarray:
    """Non-zero control values of target ``t`` below each ``x`` (``side="left"``) or at most ``x`` (``"right"``)."""
    k = int(summary.n_nonzero[t])
    if k == 0:
        return np.zeros(x.shape)
    kept = summary.values[t]
    kept = kept[~np.isnan(kept)]
    i = np.searchsorted(kept, x, side=side)
    if kept.size == k:  # every value kept: exact
        return i.astype(np.float64)
    # between kept order statistics i-1 and i: the rank interpolated linearly in value
    ranks = summary.ranks[t, : kept.size]
    inner = np.clip(i, 1, kept.size - 1)
    lo, hi = kept[inner - 1], kept[inner]
    span = np.where(hi > lo, hi - lo, 1.0)
    frac = np.clip(np.where(hi > lo, (x - lo) / span, 0.0), 0.0, 1.0)
    count = ranks[inner - 1] + 1 + frac * (ranks[inner] - ranks[inner - 1] - 1)
    return np.where(i == 0, 0.0, np.where(i == kept.size, float(k), count))


def knockdown_scores(block, targets: np.ndarray, summary: ControlTargets) -> np.ndarray:
    """Each cell's value at its own target and the control's mid-distribution function there.

    Parameters
    ----------
    block
        ``(n_cells, T)`` values (log1p-normalized) of the block's cells at the target genes.
    targets
        ``(n_cells,)`` int: the column of each cell's target in ``block``; -1 for none (control, no target measured).
    summary
        The control's distributions (:func:`control_targets`), ``T`` targets.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, 2)`` float64: the value and the score (NaN where ``targets`` is -1).
    """
    block = sp.csr_matrix(block, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    out = np.full((block.shape[0], 2), np.nan)
    rows = np.flatnonzero(targets >= 0)
    if rows.size == 0:
        return out
    cols = targets[rows]
    values = np.asarray(block[rows, cols]).ravel()
    out[rows, 0] = values
    for t in np.unique(cols):
        r = rows[cols == t]
        x = out[r, 0]
        below = _below(summary, t, x, side="left")
        at_most = _below(summary, t, x, side="right")
        score = (summary.zeros[t] + below + 0.5 * (at_most - below)) / summary.n[t]
        out[r, 1] = np.where(x > 0, score, 0.5 * summary.zeros[t] / summary.n[t])
    return out

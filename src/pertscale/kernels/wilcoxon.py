"""Wilcoxon rank-sum kernels: pure functions of one in-memory block.

Nothing here knows about Dask. The numba kernels release the GIL, so
blocks run in parallel on the threaded scheduler too. :func:`control_statistics` reduces the control
cells to the frozen per-gene summary that every comparison needs, and
:func:`wilcoxon_block` turns one CSR block holding whole perturbation groups
into their finished statistics against that summary.

The mathematics (see ``DESIGN.md``): for a gene with group values
``p_1..p_m`` and control values ``c_1..c_n``, the Mann-Whitney statistic is
``U = sum_i #{c_j < p_i} + 0.5 #{c_j = p_i}``, a sum over the group's cells
of a function of the control distribution alone. Expression values are
non-negative, so a group zero contributes ``0.5 * n_ctrl_zero`` in closed
form and only the group's non-zero values are looked up in the control's
sorted distinct non-zero values: per gene, the block's values are radix
sorted once and merged with the control's, then split into groups.

Against the rest of the cells (scanpy's ``reference="rest"``) the frozen
summary is of every cell, the group's own included, and the same lookup
gives ``U_all = sum_i #{a < p_i} + 0.5 #{a = p_i}`` over all cells ``a``.
The group's pairs with itself add exactly ``m^2 / 2`` to it (each pair
``i != j`` counts 1 in total, each ``i = j`` counts 0.5), so the U against
the rest is ``U_all - m^2 / 2``, exactly (half-integers in float64). The
two samples together are every cell, so the tie term is every cell's
(zeros included), the same for every group; the rest's sum and non-zero
count are every cell's less the group's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from numba import njit

from ..variables import LOGFOLDCHANGES, PTS, PTS_REST, PVALS, PVALS_ADJ, SCORES, STATISTICS, U_STATISTIC
from ._common import (  # noqa: F401  (re-exported: the Wilcoxon's public helpers before they were shared)
    CORR_METHODS,
    adjust_pvalues,
    canonical_csr,
    check_reference,
    check_values,
    exclude_low_genes,
    log2_fold_change,
    normal_pvalues,
)

#: Statistics returned by :func:`wilcoxon_block`, in this order along axis 1 (names in :mod:`pertscale.variables`).
WILCOXON_STATS: tuple[str, ...] = STATISTICS["wilcoxon"]

# unsigned integer views of 4- and 8-byte values, for the radix sort
_KEY_TYPES = {4: np.uint32, 8: np.uint64}


@dataclass(frozen=True)
class ControlStatistics:
    """Frozen per-gene summary of the control cells.

    Attributes
    ----------
    n_cells
        Number of control cells ``n``.
    ptr
        ``(n_genes + 1,)`` int64 offsets into ``values``/``counts``/``below``.
    values
        Sorted distinct non-zero control values of each gene, concatenated,
        in the dtype of the expression matrix (ties are decided in it).
    counts
        ``int32`` multiplicity of each distinct value.
    below
        ``int32`` number of non-zero control values strictly below each
        distinct value (within its gene).
    n_zero
        ``(n_genes,)`` float64 number of control cells with value zero.
    tie_term
        ``(n_genes,)`` float64 ``sum (t^3 - t)`` over the distinct non-zero
        control values, ``t`` their multiplicities.
    sum
        ``(n_genes,)`` float64 sum of the control values (for means).
    """

    n_cells: int
    ptr: np.ndarray
    values: np.ndarray
    counts: np.ndarray
    below: np.ndarray
    n_zero: np.ndarray
    tie_term: np.ndarray
    sum: np.ndarray

    @property
    def n_genes(self) -> int:
        """Number of genes summarised."""
        return self.n_zero.shape[0]

    @property
    def mean(self) -> np.ndarray:
        """Per-gene mean of the control values, float64 ``(n_genes,)``."""
        return self.sum / self.n_cells

    @property
    def pts(self) -> np.ndarray:
        """Per-gene fraction of control cells with a non-zero value."""
        return (self.n_cells - self.n_zero) / self.n_cells

    @property
    def nbytes(self) -> int:
        """Memory held by the summary, in bytes."""
        return sum(
            a.nbytes for a in (self.ptr, self.values, self.counts, self.below, self.n_zero, self.tie_term, self.sum)
        )


def _columns_of(block: sp.csr_matrix, row_start: int, row_stop: int, n_genes: int):
    """Non-zero values of rows ``[row_start, row_stop)`` regrouped by gene."""
    return _gather_by_gene(block.indptr, block.indices, block.data, row_start, row_stop, n_genes)


@njit(cache=True, nogil=True)
def _gather_by_gene(indptr, indices, data, row_start, row_stop, n_genes):
    # Counting sort of the rows' non-zero entries by column; stored zeros dropped.
    ptr = np.zeros(n_genes + 1, dtype=np.int64)
    for k in range(indptr[row_start], indptr[row_stop]):
        if data[k] != 0:
            ptr[indices[k] + 1] += 1
    for j in range(n_genes):
        ptr[j + 1] += ptr[j]
    out = np.empty(ptr[n_genes], dtype=data.dtype)
    fill = ptr[:-1].copy()
    for k in range(indptr[row_start], indptr[row_stop]):
        if data[k] != 0:
            j = indices[k]
            out[fill[j]] = data[k]
            fill[j] += 1
    return ptr, out


@njit(cache=True, nogil=True)
def _summarise_control(ptr, values, n_genes):
    # Sort each gene's non-zero control values, then run-length encode them.
    n_distinct = np.zeros(n_genes + 1, dtype=np.int64)
    for j in range(n_genes):
        seg = values[ptr[j] : ptr[j + 1]]
        seg.sort()
        d = 0
        for i in range(seg.shape[0]):
            if i == 0 or seg[i] != seg[i - 1]:
                d += 1
        n_distinct[j + 1] = n_distinct[j] + d
    total = n_distinct[n_genes]
    uniq = np.empty(total, dtype=values.dtype)
    counts = np.empty(total, dtype=np.int32)
    below = np.empty(total, dtype=np.int32)
    tie_term = np.zeros(n_genes, dtype=np.float64)
    sums = np.zeros(n_genes, dtype=np.float64)
    for j in range(n_genes):
        seg = values[ptr[j] : ptr[j + 1]]
        pos = n_distinct[j] - 1
        seen = 0
        for i in range(seg.shape[0]):
            x = seg[i]
            sums[j] += x
            if i == 0 or x != seg[i - 1]:
                pos += 1
                uniq[pos] = x
                counts[pos] = 0
                below[pos] = seen
            counts[pos] += 1
            seen += 1
        for q in range(n_distinct[j], n_distinct[j + 1]):
            t = float(counts[q])
            tie_term[j] += t * t * t - t
    return n_distinct, uniq, counts, below, tie_term, sums


def control_statistics(control: sp.csr_matrix | sp.spmatrix | np.ndarray) -> ControlStatistics:
    """Summarise the control cells once, for every later comparison.

    Parameters
    ----------
    control
        ``(n_control_cells, n_genes)`` expression of the control cells, CSR or
        dense, non-negative (raw counts or log1p-normalized values; the same
        units as the groups it will be compared with).

    Returns
    -------
    ControlStatistics
        Per gene: the sorted distinct non-zero values with multiplicities,
        the zero count, the tie term and the sum.

    Raises
    ------
    ValueError
        If the matrix holds NaN or negative values.
    """
    control = canonical_csr(control)
    if control.dtype.itemsize not in _KEY_TYPES or control.dtype == np.bool_:
        control = control.astype(np.float32)
    check_values(control)
    n_cells, n_genes = control.shape
    ptr, values = _columns_of(control, 0, n_cells, n_genes)
    n_distinct, uniq, counts, below, tie_term, sums = _summarise_control(ptr, values, n_genes)
    nnz = np.diff(ptr).astype(np.float64)
    return ControlStatistics(
        n_cells=int(n_cells),
        ptr=n_distinct,
        values=uniq,
        counts=counts,
        below=below,
        n_zero=n_cells - nnz,
        tie_term=tie_term,
        sum=sums,
    )


RADIX_BITS = 11


@njit(cache=True, nogil=True)
def _radix_sort(keys, groups, key_bits, tmp_keys, tmp_groups, count):
    """Stable LSD radix sort of ``keys`` (unsigned bit patterns of non-negative
    values, so integer order is value order), carrying ``groups`` along.

    No comparisons; the cost is linear in the number of keys.
    """
    n = keys.shape[0]
    mask = (1 << RADIX_BITS) - 1
    for pass_ in range((key_bits + RADIX_BITS - 1) // RADIX_BITS):
        shift = pass_ * RADIX_BITS
        count[:] = 0
        for i in range(n):
            count[(np.int64(keys[i]) >> shift) & mask] += 1
        if count[(np.int64(keys[0]) >> shift) & mask] == n:
            continue  # every key has this digit: nothing to reorder
        total = 0
        for d in range(mask + 1):
            c = count[d]
            count[d] = total
            total += c
        for i in range(n):
            d = (np.int64(keys[i]) >> shift) & mask
            p = count[d]
            tmp_keys[p] = keys[i]
            tmp_groups[p] = groups[i]
            count[d] = p + 1
        for i in range(n):
            keys[i] = tmp_keys[i]
            groups[i] = tmp_groups[i]


def concat_control_statistics(parts: list[ControlStatistics]) -> ControlStatistics:
    """Join summaries of consecutive gene ranges of the same control cells.

    Raises
    ------
    ValueError
        If the parts summarise different numbers of cells.
    """
    if len({p.n_cells for p in parts}) != 1:
        raise ValueError("control summaries of different cells cannot be joined")
    offsets = np.cumsum([0] + [p.values.shape[0] for p in parts[:-1]])
    return ControlStatistics(
        n_cells=parts[0].n_cells,
        ptr=np.concatenate([[0]] + [p.ptr[1:] + o for p, o in zip(parts, offsets, strict=True)]).astype(np.int64),
        values=np.concatenate([p.values for p in parts]),
        counts=np.concatenate([p.counts for p in parts]),
        below=np.concatenate([p.below for p in parts]),
        n_zero=np.concatenate([p.n_zero for p in parts]),
        tie_term=np.concatenate([p.tie_term for p in parts]),
        sum=np.concatenate([p.sum for p in parts]),
    )


@njit(cache=True, nogil=True)
def _rank_sums(
    cptr, rows, keys_all, vals_dtype_probe, key_bits, group_ptr, c_ptr, c_values, c_counts, c_below, c_zero, c_tie
):
    """Sufficient statistics per (group, gene): U, tie term, sum, non-zero count.

    Gene-major over the non-zero entries of a block (CSC, rows ascending)
    whose rows are whole groups stored one after another. Per gene: the
    entries are radix-sorted by value, merged once with the control's
    sorted distinct values (each entry learns its control position), then
    moved, stably, into group order. Each (group, gene) then reads its sorted
    values and their control positions without searching. ``keys_all`` are
    the values reinterpreted as unsigned integers (same order, as the values
    are non-negative); ``vals_dtype_probe`` is a 1-element array of the value
    dtype.
    """
    n_genes = cptr.shape[0] - 1
    n_groups = group_ptr.shape[0] - 1
    out_u = np.empty((n_groups, n_genes), dtype=np.float64)
    out_tie = np.empty((n_groups, n_genes), dtype=np.float64)
    out_sum = np.empty((n_groups, n_genes), dtype=np.float64)
    out_nnz = np.empty((n_groups, n_genes), dtype=np.float64)
    longest = 1
    for j in range(n_genes):
        longest = max(longest, cptr[j + 1] - cptr[j])
    keys = np.empty(longest, dtype=keys_all.dtype)
    tmp_keys = np.empty(longest, dtype=keys_all.dtype)
    groups = np.empty(longest, dtype=np.int64)
    tmp_groups = np.empty(longest, dtype=np.int64)
    pos = np.empty(longest, dtype=np.int64)
    tmp_pos = np.empty(longest, dtype=np.int64)
    count = np.empty(1 << RADIX_BITS, dtype=np.int64)
    group_start = np.zeros(n_groups + 1, dtype=np.int64)
    fill = np.zeros(n_groups, dtype=np.int64)
    for j in range(n_genes):
        k0 = cptr[j]
        n = cptr[j + 1] - k0
        # group of each entry (rows ascending, groups contiguous) and group offsets
        g = 0
        for i in range(n):
            r = rows[k0 + i]
            while r >= group_ptr[g + 1]:
                g += 1
                group_start[g] = i
            groups[i] = g
            keys[i] = keys_all[k0 + i]
        while g < n_groups:
            g += 1
            group_start[g] = n
        lo = c_ptr[j]
        hi = c_ptr[j + 1]
        if n > 0:
            _radix_sort(keys[:n], groups[:n], key_bits, tmp_keys, tmp_groups, count)
            values = keys[:n].view(vals_dtype_probe.dtype)
            # one merge with the control: position of the first control value >= x,
            # encoded negative when x itself is not a control value
            a = lo
            for i in range(n):
                x = values[i]
                while a < hi and c_values[a] < x:
                    a += 1
                pos[i] = a if (a < hi and c_values[a] == x) else -(a + 1)
            # stable move into group order
            for gg in range(n_groups):
                fill[gg] = group_start[gg]
            for i in range(n):
                p = fill[groups[i]]
                tmp_keys[p] = keys[i]
                tmp_pos[p] = pos[i]
                fill[groups[i]] = p + 1
        seg_all = tmp_keys[:n].view(vals_dtype_probe.dtype)
        n_zero = c_zero[j]
        n_ctrl_nz = float(c_below[hi - 1] + c_counts[hi - 1]) if hi > lo else 0.0
        for g in range(n_groups):
            m = float(group_ptr[g + 1] - group_ptr[g])
            s0 = group_start[g]
            s1 = group_start[g + 1]
            nz = s1 - s0
            # group zeros tie with control zeros and lie below every non-zero value
            u = 0.5 * (m - nz) * n_zero
            extra_tie = 0.0
            total = 0.0
            i = s0
            while i < s1:
                x = seg_all[i]
                b = 1
                while i + b < s1 and seg_all[i + b] == x:
                    b += 1
                a = tmp_pos[i]
                if a >= 0:
                    less = n_zero + float(c_below[a])
                    eq = float(c_counts[a])
                else:
                    a = -a - 1
                    less = n_zero + (float(c_below[a]) if a < hi else n_ctrl_nz)
                    eq = 0.0
                fb = float(b)
                u += fb * (less + 0.5 * eq)
                t = eq + fb
                extra_tie += (t * t * t - t) - (eq * eq * eq - eq)
                total += fb * x
                i += b
            t0 = (m - nz) + n_zero
            out_u[g, j] = u
            out_tie[g, j] = c_tie[j] + extra_tie + t0 * t0 * t0 - t0
            out_sum[g, j] = total
            out_nnz[g, j] = nz
    return out_u, out_tie, out_sum, out_nnz


def wilcoxon_block(
    block: sp.csr_matrix | np.ndarray,
    group_sizes: np.ndarray,
    control: ControlStatistics | Sequence[ControlStatistics],
    bounds: Sequence[int] | None = None,
    *,
    tie_correct: bool = True,
    use_continuity: bool = False,
    reference: str = "control",
    corr_method: str = "benjamini-hochberg",
    alternative: str = "two-sided",
    min_pct=0.0,
    min_mean=0.0,
) -> np.ndarray:
    """Wilcoxon rank-sum of every group in a block against the frozen control, or against the rest of the cells.

    Parameters
    ----------
    block
        ``(n_rows, n_genes)`` non-negative expression, CSR (or dense), whose rows
        are whole groups stored one after another.
    group_sizes
        ``(n_groups,)`` number of rows of each group, in row order; sums to
        ``n_rows``.
    control
        The frozen control summary from :func:`control_statistics`, or its
        parts over consecutive ranges of genes. With ``reference="rest"``:
        the summary of every cell, the block's own included.
    bounds
        With parts: the ``(n_parts + 1,)`` gene bounds they cover.
    tie_correct
        Correct the variance of U for ties (zeros included), as
        ``scipy.stats.mannwhitneyu`` always does and scanpy with
        ``tie_correct=True``.
    use_continuity
        Subtract 0.5 from ``|U - m n / 2|`` before dividing by its standard
        deviation (``scipy.stats.mannwhitneyu(use_continuity=True)``). Off by
        default, as in scanpy.
    reference
        ``"control"`` (default): each group against the cells ``control``
        summarises. ``"rest"``: against every other cell (scanpy's
        ``reference="rest"``), ``control`` summarising every cell; each
        group's own cells are taken out here (see the module's notes).
    corr_method
        ``"benjamini-hochberg"`` or ``"bonferroni"``, applied over the genes of
        each group.
    alternative
        ``"two-sided"``, ``"greater"`` (the group's values tend to be larger
        than the control's) or ``"less"``, as ``scipy.stats.mannwhitneyu``
        with the group as the first sample.
    min_pct, min_mean
        Genes whose detection fraction or mean (log1p units) is below these
        on both sides are untested: NaN (:func:`exclude_low_genes`).

    Returns
    -------
    numpy.ndarray
        ``(n_groups, len(WILCOXON_STATS), n_genes)`` float64: z ``scores``
        (positive when the group ranks above control; the continuity
        correction, if on, moves them towards 0), normal ``pvals`` for the
        ``alternative``, adjusted ``pvals_adj``, ``logfoldchanges`` (log2, scanpy's
        definition on log1p data), ``pts`` and ``pts_rest`` (fractions of group
        and control cells, or of the group's rest, with a non-zero value) and the group's
        ``u_statistic``. Where every value of a gene is tied (its variance is
        zero) the score is 0 and the p-value 1, as in scanpy (scipy: NaN).

    Raises
    ------
    ValueError
        If the block has NaN or negative values, or ``group_sizes`` does not
        add up to its rows, or the summary does not match the block, or
        ``reference`` is neither ``"control"`` nor ``"rest"``.

    Notes
    -----
    Mann & Whitney (1947); the normal approximation with tie correction
    follows ``scipy.stats.mannwhitneyu(method="asymptotic")``.
    """
    check_reference(reference)
    parts = [control] if isinstance(control, ControlStatistics) else list(control)
    n_genes = block.shape[1]
    bounds = np.asarray([0, n_genes] if bounds is None else bounds, dtype=np.int64)
    if len(bounds) != len(parts) + 1 or bounds[-1] != n_genes or len({p.n_cells for p in parts}) != 1:
        raise ValueError("the control summary parts do not cover the block's genes")
    for p, a, b in zip(parts, bounds[:-1], bounds[1:], strict=True):
        if p.n_genes != b - a:
            raise ValueError(f"block has {n_genes} genes but the control summary covers {bounds[-1]} ({p.n_genes})")
    block = canonical_csr(block)
    check_values(block)
    group_sizes = np.asarray(group_sizes, dtype=np.int64)
    if (group_sizes < 1).any():
        raise ValueError("every group needs at least one row; group_sizes has sizes below 1")
    if group_sizes.sum() != block.shape[0]:
        raise ValueError(f"group_sizes add up to {group_sizes.sum()} rows but the block has {block.shape[0]}")
    dtype = parts[0].values.dtype
    if block.data.dtype != dtype:
        if dtype == np.float32 and block.dtype.itemsize < 4:
            block = block.astype(np.float32)  # small integer types were summarised as float32
        else:
            raise ValueError(
                f"the block has dtype {block.dtype} but the control summary {dtype}; "
                "summarise the control from the same matrix (casting could merge or split tied values)"
            )
    group_ptr = np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int64)
    csc = block.tocsc()  # gene-major; scipy keeps row indices ascending within a column
    csc.sort_indices()
    if (csc.data == 0).any():
        csc.eliminate_zeros()  # stored zeros are zeros
    n_groups = group_sizes.shape[0]
    sums = {k: np.empty((n_groups, n_genes)) for k in ("u", "tie", "total", "nnz")}
    for p, a, b in zip(parts, bounds[:-1], bounds[1:], strict=True):
        cptr = csc.indptr[a : b + 1].astype(np.int64)
        lo, hi = int(cptr[0]), int(cptr[-1])
        vals = csc.data[lo:hi]
        keys = vals.view(_KEY_TYPES[vals.dtype.itemsize])  # non-negative floats: bit order is value order
        u, tie, total, nnz = _rank_sums(
            cptr - lo,
            csc.indices[lo:hi],
            keys,
            vals[:1].copy() if vals.size else np.zeros(1, dtype=vals.dtype),
            8 * vals.dtype.itemsize,
            group_ptr,
            p.ptr,
            p.values,
            p.counts,
            p.below,
            p.n_zero,
            p.tie_term,
        )
        for k, v in zip(("u", "tie", "total", "nnz"), (u, tie, total, nnz), strict=True):
            sums[k][:, a:b] = v
    m = group_sizes.astype(np.float64)[:, None]
    n = float(parts[0].n_cells)
    if reference == "rest":  # the summary is of every cell: take each group's own cells out
        if (n - m < 1).any():
            raise ValueError(f"the summary holds {int(n)} cells, too few to hold every group and a rest")
        every_zero = np.concatenate([p.n_zero for p in parts])
        n_rest_nz = (n - every_zero)[None, :] - sums["nnz"]
        rest_sum = np.concatenate([p.sum for p in parts])[None, :] - sums["total"]
        n = n - m  # (n_groups, 1) cells of each group's rest
        control_mean = np.where(n_rest_nz == 0, 0.0, rest_sum / n)  # no residue of the subtraction
        control_pts = n_rest_nz / n
        u = sums["u"] - 0.5 * m * m
        sums["tie"] = np.broadcast_to(np.concatenate([p.tie_term for p in parts]) + every_zero**3 - every_zero, u.shape)
    else:
        control_mean = np.concatenate([p.mean for p in parts])[None, :]
        control_pts = np.concatenate([p.pts for p in parts])[None, :]
        u = sums["u"]
    big_n = m + n
    if tie_correct:
        var = m * n / 12.0 * ((big_n + 1.0) - sums["tie"] / (big_n * (big_n - 1.0)))
    else:
        var = np.broadcast_to(m * n * (big_n + 1.0) / 12.0, u.shape)
    diff = u - m * n / 2.0
    cc = 0.5 if use_continuity else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        sd = np.sqrt(var)
        scores = np.sign(diff) * np.maximum(np.abs(diff) - cc, 0.0) / sd
        if alternative == "two-sided":
            pvals = normal_pvalues(scores)
        else:  # scipy: z of U1 ("greater") or of U2 = m n - U1 ("less"), each less the continuity correction
            z = ((diff if alternative == "greater" else -diff) - cc) / sd
            pvals = normal_pvalues(z, "greater")
    tied = ~np.isfinite(scores)
    scores[tied] = 0.0
    pvals[tied | np.isnan(pvals)] = 1.0
    stat = {name: i for i, name in enumerate(WILCOXON_STATS)}
    out = np.empty((n_groups, len(WILCOXON_STATS), n_genes), dtype=np.float64)
    out[:, stat[SCORES]] = scores
    out[:, stat[PVALS]] = pvals
    out[:, stat[PVALS_ADJ]] = adjust_pvalues(pvals, corr_method)
    out[:, stat[LOGFOLDCHANGES]] = log2_fold_change(sums["total"] / m, control_mean)
    out[:, stat[PTS]] = sums["nnz"] / m
    out[:, stat[PTS_REST]] = control_pts
    out[:, stat[U_STATISTIC]] = u
    exclude_low_genes(
        out,
        WILCOXON_STATS,
        mean=sums["total"] / m,
        mean_rest=control_mean,
        pts=sums["nnz"] / m,
        pts_rest=control_pts,
        min_pct=min_pct,
        min_mean=min_mean,
        corr_method=corr_method,
    )
    return out

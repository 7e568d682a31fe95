r"""E-distance (energy distance) kernels: sufficient statistics of cell sets in an embedding, and the E-test.

Nothing here knows about Dask. The numba kernels release the GIL, so
batches of perturbations run in parallel on the threaded scheduler too.
:func:`control_summary` reduces the control cells' embedding to the frozen
summary every comparison needs; :func:`energy_groups` turns a block holding
whole perturbation groups (each group's rows contiguous) into each group's
E-distance to the control and its permutation count.

The mathematics. For two sets ``A`` (``n_a`` rows ``a_i``) and ``B``
(``n_b`` rows ``b_j``) of a ``d``-dimensional embedding, scPerturb's
E-distance (Peidli et al. 2024, Nature Methods 21:531, ``scperturb.edist``)
is ``E = 2 delta - sigma_A - sigma_B`` with ``delta`` the mean distance
between the sets over their ``n_a n_b`` pairs and ``sigma_A`` the mean
distance within ``A``, over its ``n_a (n_a - 1)`` ordered pairs of distinct
cells (``sample_correct=True``) or over all ``n_a^2`` (the zero distances
of each cell to itself included). With the squared Euclidean distance
(scPerturb's default) each mean is a function of per-set sufficient
statistics, the count ``n``, the sum of rows ``s`` and the sum of squared
norms ``q``:

- ``sum_{i,j} ||a_i - b_j||^2 = n_b q_a + n_a q_b - 2 s_a . s_b``;
- ``sum_{i,j} ||a_i - a_j||^2 = 2 n_a q_a - 2 ||s_a||^2 = 2 n_a M2_a``,
  ``M2_a = q_a - ||s_a||^2 / n_a`` the set's total sum of squared
  deviations from its mean ``mu_a = s_a / n_a``.

So ``delta = ||mu_a - mu_b||^2 + M2_a / n_a + M2_b / n_b``,
``sigma_A = 2 M2_a / (n_a - 1)`` (``2 M2_a / n_a`` uncorrected), and

    E = 2 ||mu_a - mu_b||^2 - 2 M2_a / (n_a (n_a - 1)) - 2 M2_b / (n_b (n_b - 1))

with ``sample_correct``, ``E = 2 ||mu_a - mu_b||^2`` without: twice the
unbiased estimate of the squared distance between the two means (the M2
terms are ``tr(S) / n``, ``S`` each set's sample covariance). The
statistic therefore sees a shift of the mean only, not a change of spread;
the Euclidean (not squared) distance of Szekely and Rizzo's energy distance
(pertpy's default) sees both but has no such closed form.

Rows are centred on the control mean before they are summed (distances do
not change under a shift), which keeps ``q - ||s||^2 / n`` free of
cancellation for sets near the control.

The E-test (scPerturb's ``etest``): the group's and the control's labels are
permuted over the pooled cells ``P`` (``N + M`` of them), the first ``N`` of
the permuted cells are the "group" and the rest the "control". A
permutation therefore draws a uniformly random ``N``-subset ``S`` of ``P``
and needs only ``(s, q)`` of ``S``: those of ``P \ S`` are ``P``'s less
``S``'s. Each permutation costs ``O(min(N, M) d)`` (the smaller side is
drawn, Floyd's algorithm, each subset equally likely); the observed value
is computed by the same function from the same sums, so a permutation that
draws the group itself ties with it. The count returned is
``#{permutations with E >= observed}`` (ties count against the group, as
scPerturb's). Each group's random numbers come from its own stream,
xoshiro256** (Blackman & Vigna 2021) seeded through SplitMix64 by
:func:`group_seeds` from ``(seed, perturbation name)``: a group's result
does not depend on which block or batch it is computed in, nor on the
order of the groups.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numba import njit

#: Outputs of :func:`energy_groups`, by name (columns of its result).
ENERGY_OUTPUTS: tuple[str, ...] = ("edistance", "n_exceed")


@dataclass(frozen=True)
class ControlSummary:
    """Frozen summary of the control cells' embedding, broadcast to every batch of groups.

    Attributes
    ----------
    center
        ``(d,)`` float64 mean of the control rows: the origin of the centred
        coordinates every sum is taken in.
    rows
        ``(n_cells, d)`` float64 C-contiguous control rows minus ``center``
        (what a permutation draws from).
    sq_norms
        ``(n_cells,)`` float64 squared Euclidean norm of each centred row.
    sum
        ``(d,)`` float64 sum of the centred rows (zero up to rounding).
    sq_sum
        Sum of ``sq_norms``: the control's ``M2`` up to ``||sum||^2 / n``.
    """

    center: np.ndarray
    rows: np.ndarray
    sq_norms: np.ndarray
    sum: np.ndarray
    sq_sum: float

    @property
    def n_cells(self) -> int:
        """Number of control cells ``M``."""
        return int(self.rows.shape[0])

    @property
    def n_dims(self) -> int:
        """Number of embedding dimensions ``d``."""
        return int(self.rows.shape[1])

    @property
    def nbytes(self) -> int:
        """Memory held by the summary, in bytes."""
        return sum(a.nbytes for a in (self.center, self.rows, self.sq_norms, self.sum))


def control_summary(rows) -> ControlSummary:
    """The :class:`ControlSummary` of the control cells' embedding.

    Parameters
    ----------
    rows
        ``(n_cells, d)`` embedding rows of the control cells (any real
        dtype; summed in float64), ``n_cells >= 1``.

    Returns
    -------
    ControlSummary

    Raises
    ------
    ValueError
        If ``rows`` is not two-dimensional, is empty, or holds NaN or
        infinite values.
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"control rows must be a non-empty (n_cells, d) array, got shape {rows.shape}")
    if not np.isfinite(rows).all():
        raise ValueError("the control cells' embedding holds NaN or infinite values")
    center = rows.mean(axis=0)
    centred = np.ascontiguousarray(rows - center)
    sq_norms = np.einsum("ij,ij->i", centred, centred)
    return ControlSummary(
        center=center,
        rows=centred,
        sq_norms=sq_norms,
        sum=centred.sum(axis=0),
        sq_sum=float(sq_norms.sum()),
    )


def group_seeds(seed: int, names: Iterable[str]) -> np.ndarray:
    r"""``(n,)`` uint64: each group's random stream key, from ``(seed, name)`` alone.

    The first 8 bytes (little endian) of the BLAKE2b digest of
    ``f"{seed}\x1f{name}"`` (UTF-8): a group draws the same permutations
    whichever block, batch or position it is computed in.
    """
    out = [
        int.from_bytes(hashlib.blake2b(f"{int(seed)}\x1f{name}".encode(), digest_size=8).digest(), "little")
        for name in names
    ]
    return np.array(out, dtype=np.uint64)


# ----------------------------------------------------------------------------------- random numbers (numba)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True, nogil=True)
def _splitmix64(x):
    """SplitMix64 step: ``(new state, output)``."""
    x = x + _GOLDEN
    z = x
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return x, z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True)
def _rotl(x, k):
    return (x << np.uint64(k)) | (x >> np.uint64(64 - k))


@njit(cache=True, nogil=True)
def _seed_state(key, state):
    """Fill the four words of a xoshiro256** ``state`` from a 64-bit key (SplitMix64, as its authors advise)."""
    x = np.uint64(key)
    for i in range(4):
        x, z = _splitmix64(x)
        state[i] = z


@njit(cache=True, nogil=True)
def _next(state):
    """The next 64-bit output of xoshiro256** (``state``: four uint64 words, advanced in place)."""
    result = _rotl(state[1] * np.uint64(5), 7) * np.uint64(9)
    t = state[1] << np.uint64(17)
    state[2] ^= state[0]
    state[3] ^= state[1]
    state[1] ^= state[2]
    state[0] ^= state[3]
    state[2] ^= t
    state[3] = _rotl(state[3], 45)
    return result


_LOW32 = np.uint64(0xFFFFFFFF)
#: Largest pool (group + control cells) a permutation draws from: :func:`_below` draws 32-bit integers.
MAX_POOL = 1 << 32


@njit(cache=True, nogil=True)
def _below(state, bound):
    """A uniform integer in ``[0, bound)``, ``bound <= 2^32``, exactly (Lemire 2019, nearly divisionless).

    The upper 32 bits of an output times ``bound``: the high word is the
    draw, rejected only when the low word falls below ``2^32 mod bound``
    (the one division, taken with probability ``bound / 2^32``).
    """
    s = np.uint64(bound)
    x = _next(state) >> np.uint64(32)
    prod = x * s
    low = prod & _LOW32
    if low < s:
        threshold = ((_LOW32 + np.uint64(1)) - s) % s
        while low < threshold:
            x = _next(state) >> np.uint64(32)
            prod = x * s
            low = prod & _LOW32
    return np.int64(prod >> np.uint64(32))


# ----------------------------------------------------------------------------------------------- E-distance


@njit(cache=True, nogil=True)
def _statistic(n_s, s_s, q_s, n_r, s_p, q_p, sample_correct):
    r"""E-distance of a set ``S`` (``n_s``, sums ``s_s``, ``q_s``) and its complement ``R = P \ S`` in ``P``.

    ``R``'s sums are ``P``'s (``s_p``, ``q_p``) less ``S``'s.
    """
    dist2 = 0.0
    norm_s = 0.0
    norm_r = 0.0
    for j in range(s_s.shape[0]):
        s_r = s_p[j] - s_s[j]
        diff = s_s[j] / n_s - s_r / n_r
        dist2 += diff * diff
        norm_s += s_s[j] * s_s[j]
        norm_r += s_r * s_r
    if not sample_correct:
        return 2.0 * dist2
    m2_s = q_s - norm_s / n_s
    m2_r = (q_p - q_s) - norm_r / n_r
    return 2.0 * dist2 - 2.0 * m2_s / (n_s * (n_s - 1.0)) - 2.0 * m2_r / (n_r * (n_r - 1.0))


@njit(cache=True, nogil=True, inline="always")
def _add(into, row):
    """``into += row`` (1-D views: LLVM vectorizes this form, not the 2-D indexed one)."""
    for j in range(into.shape[0]):
        into[j] += row[j]


#: Most (permutation, control row) draws held at once by :func:`_exceedances` (16 MB of indices).
MAX_DRAWS = 1 << 20


@njit(cache=True, nogil=True)
def _exceedances(g_rows, g_sq, c_rows, c_sq, s_p, q_p, observed, key, n_permutations, sample_correct, max_draws):
    """``#{permutations with E >= observed}`` for one group (``g_rows``: its centred rows).

    Permutations run in chunks. Within a chunk each permutation's draw is
    made (Floyd's algorithm over the pooled indices, group cells first);
    drawn group rows, which stay in cache, are added at once, and drawn
    control rows are recorded, counting-sorted by row and added in row
    order, so the control embedding is read in increasing address order
    and each drawn row once per chunk (measured here about 3 times faster
    than adding them in draw order, 8 ms CPU per group of 200 cells and
    1,000 permutations against 100,000 x 50 control rows). When a chunk draws few control rows (below 1/16 of the
    control) they are added in draw order instead, skipping the sort's pass
    over the control. Both orders are fixed by the sizes alone.
    """
    n, d = g_rows.shape
    m = c_rows.shape[0]
    total = n + m
    k = min(n, m)  # draw the smaller side: the complement's sums are P's less its own
    chunk = max(1, min(n_permutations, max_draws // k))
    mark = np.zeros(total, dtype=np.bool_)
    chosen = np.empty(k, dtype=np.int64)
    acc = np.empty((chunk, d))
    acc_q = np.empty(chunk)
    draw_row = np.empty(chunk * k, dtype=np.int64)
    draw_perm = np.empty(chunk * k, dtype=np.int64)
    by_row = np.empty(chunk * k, dtype=np.int64)
    ends = np.zeros(m + 1, dtype=np.int64)
    state = np.empty(4, dtype=np.uint64)
    _seed_state(key, state)
    s_s = np.empty(d)
    count = 0
    done = 0
    while done < n_permutations:
        b = min(chunk, n_permutations - done)
        n_draws = 0
        for p in range(b):
            for j in range(d):
                acc[p, j] = 0.0
            acc_q[p] = 0.0
            for c in range(k):  # Floyd's algorithm: a uniformly random k-subset of range(total)
                top = total - k + c
                t = _below(state, top + 1)
                if mark[t]:
                    t = top
                mark[t] = True
                chosen[c] = t
                if t < n:
                    _add(acc[p], g_rows[t])
                    acc_q[p] += g_sq[t]
                else:
                    draw_row[n_draws] = t - n
                    draw_perm[n_draws] = p
                    n_draws += 1
            for c in range(k):
                mark[chosen[c]] = False
        if 16 * n_draws < m:
            for i in range(n_draws):
                r = draw_row[i]
                p = draw_perm[i]
                _add(acc[p], c_rows[r])
                acc_q[p] += c_sq[r]
        else:  # counting sort by control row, then one pass over the control in row order
            for i in range(n_draws):
                ends[draw_row[i] + 1] += 1
            for r in range(m):
                ends[r + 1] += ends[r]
            for i in range(n_draws):
                r = draw_row[i]
                by_row[ends[r]] = draw_perm[i]
                ends[r] += 1
            start = 0
            for r in range(m):  # ends[r]: the end of row r's draws, which start where row r - 1's end
                end = ends[r]
                if end > start:
                    row = c_rows[r]
                    sq = c_sq[r]
                    for i in range(start, end):
                        p = by_row[i]
                        _add(acc[p], row)
                        acc_q[p] += sq
                start = end
            for r in range(m + 1):
                ends[r] = 0
        for p in range(b):
            if k == n:
                stat = _statistic(np.float64(n), acc[p], acc_q[p], np.float64(m), s_p, q_p, sample_correct)
            else:
                for j in range(d):
                    s_s[j] = s_p[j] - acc[p, j]
                stat = _statistic(np.float64(n), s_s, q_p - acc_q[p], np.float64(m), s_p, q_p, sample_correct)
            if stat >= observed:
                count += 1
        done += b
    return count


@njit(cache=True, nogil=True)
def _energy_groups(rows, starts, seeds, center, c_rows, c_sq, c_sum, c_sq_sum, n_permutations, sample_correct):
    n_groups = starts.shape[0] - 1
    d = rows.shape[1]
    m = c_rows.shape[0]
    out_e = np.full(n_groups, np.nan)
    out_count = np.full(n_groups, np.nan)
    s_s = np.empty(d)
    s_p = np.empty(d)
    for g in range(n_groups):
        lo = starts[g]
        n = starts[g + 1] - lo
        if n == 0 or (sample_correct and n < 2):
            continue  # no E-distance: an empty group, or one cell has no within-set pair
        g_rows = np.empty((n, d))
        g_sq = np.empty(n)
        q_g = 0.0
        for j in range(d):
            s_s[j] = 0.0
        for i in range(n):
            sq = 0.0
            for j in range(d):
                v = np.float64(rows[lo + i, j]) - center[j]
                g_rows[i, j] = v
                s_s[j] += v
                sq += v * v
            g_sq[i] = sq
            q_g += sq
        for j in range(d):
            s_p[j] = s_s[j] + c_sum[j]
        q_p = q_g + c_sq_sum
        # the observed value by the same function as the permuted ones: the group's own cells as the drawn set
        observed = _statistic(np.float64(n), s_s, q_g, np.float64(m), s_p, q_p, sample_correct)
        out_e[g] = observed
        if n_permutations > 0 and np.isfinite(observed):
            out_count[g] = _exceedances(
                g_rows, g_sq, c_rows, c_sq, s_p, q_p, observed, seeds[g], n_permutations, sample_correct, MAX_DRAWS
            )
    return out_e, out_count


def energy_groups(
    rows,
    starts,
    seeds,
    control: ControlSummary,
    *,
    n_permutations: int,
    sample_correct: bool = True,
) -> np.ndarray:
    """Each group's E-distance to the control and, over ``n_permutations`` E-test permutations, its exceedances.

    Parameters
    ----------
    rows
        ``(n_rows, d)`` embedding rows (any real dtype; float64 sums), each
        group's rows contiguous.
    starts
        ``(n_groups + 1,)`` int64 offsets of the groups in ``rows``
        (group ``g`` is ``rows[starts[g]:starts[g + 1]]``).
    seeds
        ``(n_groups,)`` uint64 random stream keys (:func:`group_seeds`).
    control
        The control's :class:`ControlSummary` (same ``d``).
    n_permutations
        Permutations per group (``0``: the E-distance only).
    sample_correct
        Within-set means over ``n (n - 1)`` pairs (``True``, scPerturb's
        default) or ``n^2``.

    Returns
    -------
    numpy.ndarray
        ``(n_groups, 2)`` float64, columns :data:`ENERGY_OUTPUTS`:
        ``edistance`` (in squared embedding units) and ``n_exceed``, the
        number of permutations whose E-distance is ``>=`` the observed one.
        Both are NaN for a group with no E-distance (no cells, or one cell
        with ``sample_correct``); ``n_exceed`` is NaN when
        ``n_permutations == 0``.

    Raises
    ------
    ValueError
        If the shapes disagree, ``starts`` does not cover ``rows`` in
        order, ``n_permutations < 0``, the control has fewer than two cells
        with ``sample_correct``, or ``rows`` holds NaN or infinite values.
    """
    rows = np.ascontiguousarray(rows, dtype=np.float64)  # one compiled kernel; float32 rows convert exactly
    starts = np.asarray(starts, dtype=np.int64)
    seeds = np.asarray(seeds, dtype=np.uint64)
    if rows.ndim != 2 or rows.shape[1] != control.n_dims:
        raise ValueError(f"rows must be (n_rows, {control.n_dims}) like the control's embedding, got {rows.shape}")
    if (
        starts.ndim != 1
        or starts.size < 1
        or starts[0] != 0
        or starts[-1] != rows.shape[0]
        or (np.diff(starts) < 0).any()
    ):
        raise ValueError("starts must rise from 0 to the number of rows (one offset per group, and the end)")
    if seeds.shape != (starts.size - 1,):
        raise ValueError(f"seeds must hold one key per group ({starts.size - 1}), got shape {seeds.shape}")
    if int(n_permutations) < 0:
        raise ValueError(f"n_permutations must be >= 0, got {n_permutations}")
    if sample_correct and control.n_cells < 2:
        raise ValueError("sample_correct needs at least two control cells (a within-set pair)")
    if starts.size > 1 and int(np.diff(starts).max()) + control.n_cells > MAX_POOL:
        raise ValueError(f"a group and the control hold more than {MAX_POOL:,} cells together; subsample the control")
    if not np.isfinite(rows).all():
        raise ValueError(
            "the embedding holds NaN or infinite values; recompute it (ps.pp.pca) from finite log1p-normalized values"
        )
    e, count = _energy_groups(
        rows,
        starts,
        seeds,
        control.center,
        control.rows,
        control.sq_norms,
        control.sum,
        control.sq_sum,
        int(n_permutations),
        bool(sample_correct),
    )
    return np.column_stack([e, count])


def edistance(x, y, *, sample_correct: bool = True) -> float:
    """E-distance of two in-memory sets with the squared Euclidean distance (scPerturb's ``edist`` of a pair).

    Parameters
    ----------
    x, y
        ``(n_x, d)`` and ``(n_y, d)`` rows.
    sample_correct
        As :func:`energy_groups`.

    Returns
    -------
    float
        ``2 delta - sigma_x - sigma_y`` (squared embedding units); NaN when
        a set has one row and ``sample_correct``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if sample_correct and min(x.shape[0], y.shape[0]) < 2:
        return float("nan")
    summary = control_summary(y)
    out = energy_groups(
        x, [0, x.shape[0]], group_seeds(0, ["x"]), summary, n_permutations=0, sample_correct=sample_correct
    )
    return float(out[0, 0])

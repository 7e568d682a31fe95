"""Guide assignment kernels: pure functions of one in-memory block of guide UMI counts, and the mixture fit.

Nothing here knows about Dask. A block is ``n_cells x n_guides`` (CSR, or
anything :func:`scipy.sparse.csr_matrix` takes) of raw guide UMI counts.

**Assignment** (:func:`assign_block`): per cell, from its guide counts
``u_1..u_G``, the largest ``u_max`` (ties go to the guide of the lowest
column index), the total ``sum_g u_g``, their ratio (0 for a cell without
guide UMIs), and which guides are *detected*:

- ``rule="threshold"``: guide ``g`` when ``u_g >= t_g`` (``t_g > 0``; the
  same ``t`` for every guide is crispat's ``ga_umi``; per-guide ``t_g`` come
  from the mixture, :func:`fit_poisson_gauss`). One detected guide assigns
  the cell to it, several make it ``MULTIPLE`` (or, with
  ``collapse_targets``, to their target when they share one), none
  ``UNASSIGNED``.
- ``rule="max"``: the guide with ``u_max`` when ``u_max / total >=
  min_fraction``; ``MULTIPLE`` below it, ``UNASSIGNED`` without guide UMIs.
  Detected guides are those with ``u_g > 0``.

**Mixture** (:func:`fit_poisson_gauss`): crispat's Poisson-Gaussian mixture
(``crispat/poisson_gauss.py``, v0.9.11, after Replogle et al. 2022), fitted
per guide to ``x = log2(u)`` of the cells with ``u > 0``:

    p(x) = (1 - w) lambda^x e^(-lambda) / Gamma(x + 1) + w N(x; mu, sigma^2)

The first term is crispat's ``cont_Poisson``: the Poisson probability
evaluated at the *log2* count (not the count), with ``Gamma`` for the
factorial; the second is the signal. crispat finds the MAP estimate with
Pyro (SVI, Adam, 500 steps, best of 10 random starts) under the priors
``mu ~ N(3, 2^2)``, ``sigma ~ LogNormal(2, 1)``, ``lambda ~ LogNormal(0, 1)``,
``(1 - w, w) ~ Dirichlet(0.9, 0.1)``. Here the same objective is maximised
by expectation-maximisation on the guide's histogram of UMI counts (each
distinct count once, weighted by its cells: exact, and small), with the
same priors on ``mu``, ``sigma`` and ``lambda`` (each M-step is a closed
form for ``mu`` and a one-dimensional Newton solve for ``log sigma`` and
``log lambda``, an ECM step that never lowers the objective), from four
deterministic starts, keeping the best. Differences from crispat: the
weights are maximum likelihood, because the Dirichlet(0.9, 0.1) density is
unbounded at ``w = 0`` (no maximum exists; SVI merely stops before it, and
with hundreds of cells per guide the difference is below ``1 / n``); the
fit is run to convergence, deterministically, not for a fixed number of
stochastic steps. As crispat, a guide is fitted only when at least 2 cells
have a non-zero count and its largest count is at least 2, and its
threshold is the smallest ``t`` in ``1..max u`` whose posterior probability
of the signal component exceeds 0.5; cells with ``u >= t`` are detected
(``inf``: none). The priors keep ``sigma`` away from 0: without them a
Gaussian on one atom of the discrete ``log2`` counts has unbounded
likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.special import gammaln

#: Code of a cell with no detected guide (``guide`` and ``label`` of :data:`CELL_DTYPE`).
UNASSIGNED = -1
#: Code of a cell with several detected guides (or targets).
MULTIPLE = -2

#: Per-cell output of :func:`assign_block`: one record per row of the block.
#: ``guide`` (column index of the assigned guide, or :data:`UNASSIGNED`/:data:`MULTIPLE`),
#: ``label`` (label code of the assigned guide's target, or the same two codes),
#: ``umi_max`` / ``umi_total`` (UMIs of the top guide / of all guides), ``max_fraction``
#: (``umi_max / umi_total``, 0 without UMIs), ``n_detected`` (guides detected),
#: ``n_invalid`` (stored values that are negative, not whole numbers, NaN or infinite).
CELL_DTYPE = np.dtype(
    [
        ("guide", np.int64),
        ("label", np.int64),
        ("umi_max", np.float64),
        ("umi_total", np.float64),
        ("max_fraction", np.float64),
        ("n_detected", np.int64),
        ("n_invalid", np.int64),
    ]
)
#: Rows of :func:`detection_block`'s output.
DETECTION_ROWS = ("n_cells_nonzero", "n_cells_detected")
RULES = ("threshold", "max")

# (guide, value) packed into one int64 key of the histograms
_VALUE_BITS = 32
_VALUE_MASK = (1 << _VALUE_BITS) - 1

# crispat's priors (poisson_gauss.py, ``model``): mu ~ N(3, 2), log sigma ~ N(2, 1), log lambda ~ N(0, 1)
PRIOR_MU = (3.0, 2.0)
PRIOR_LOG_SCALE = (2.0, 1.0)
PRIOR_LOG_LAMBDA = (0.0, 1.0)
_LOG_2PI = float(np.log(2 * np.pi))


# --------------------------------------------------------------------------- one block


def _entries(block) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``(n_rows, rows, cols, values)`` of the stored entries of a block (values as float64)."""
    block = sp.csr_matrix(block)
    n = block.shape[0]
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(block.indptr))
    return n, rows, block.indices.astype(np.int64, copy=False), block.data.astype(np.float64, copy=False)


def invalid_values(values: np.ndarray) -> np.ndarray:
    """Bool mask of values that are not raw counts: negative, not whole numbers, NaN or infinite."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(values) | (values < 0) | (values != np.floor(values))


def assign_block(
    block,
    thresholds: np.ndarray,
    guide_label: np.ndarray,
    *,
    rule: str,
    min_fraction: float = 0.5,
    collapse_targets: bool = False,
) -> np.ndarray:
    """Guide assignment of the cells of one block (see the module docstring).

    Parameters
    ----------
    block
        ``(n_cells, n_guides)`` guide UMI counts, CSR or dense.
    thresholds
        ``(n_guides,)`` float64 UMIs at which a guide is detected
        (``rule="threshold"``), each > 0; ``inf`` never. Unused by
        ``rule="max"``.
    guide_label
        ``(n_guides,)`` int64 code of each guide's label (its target, the
        control targets sharing one code).
    rule
        ``"threshold"`` or ``"max"``.
    min_fraction
        Share of the cell's guide UMIs the top guide needs (``rule="max"``).
    collapse_targets
        ``rule="threshold"``: several detected guides with one label give
        that label (their ``guide`` stays :data:`MULTIPLE`).

    Returns
    -------
    numpy.ndarray
        ``(n_cells,)`` records of :data:`CELL_DTYPE`. Invalid values
        (counted in ``n_invalid``) are left out of the rest.
    """
    if rule not in RULES:
        raise ValueError(f"rule {rule!r} is not known; use one of {RULES}")
    n, rows, cols, values = _entries(block)
    bad = invalid_values(values)
    out = np.zeros(n, dtype=CELL_DTYPE)
    out["n_invalid"] = np.bincount(rows[bad], minlength=n)
    keep = ~bad & (values > 0)
    rows, cols, values = rows[keep], cols[keep], values[keep]

    total = np.bincount(rows, weights=values, minlength=n)
    # the top guide of each row: values descending, then the lowest column (as numpy's argmax on a dense row)
    order = np.lexsort((cols, -values, rows))
    first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]] if order.size else order
    top_row, top_col = rows[first], cols[first]
    umi_max = np.zeros(n)
    umi_max[top_row] = values[first]
    top = np.full(n, UNASSIGNED, dtype=np.int64)
    top[top_row] = top_col
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(total > 0, umi_max / total, 0.0)
    out["umi_max"], out["umi_total"], out["max_fraction"] = umi_max, total, fraction

    guide_label = np.asarray(guide_label, dtype=np.int64)
    if rule == "max":
        has = total > 0
        assigned = has & (fraction >= min_fraction)
        guide = np.where(assigned, top, np.where(has, MULTIPLE, UNASSIGNED))
        label = np.where(assigned, guide_label[np.maximum(top, 0)], guide)
        out["n_detected"] = np.bincount(rows, minlength=n)
    else:
        detected = values >= np.asarray(thresholds, dtype=np.float64)[cols]
        d_rows, d_cols = rows[detected], cols[detected]
        n_detected = np.bincount(d_rows, minlength=n)
        # the one detected guide of a row that has one is the sum of its detected columns
        only = np.bincount(d_rows, weights=d_cols, minlength=n).astype(np.int64)
        guide = np.where(n_detected == 1, only, np.where(n_detected > 1, MULTIPLE, UNASSIGNED))
        label = np.where(n_detected == 1, guide_label[np.where(n_detected == 1, only, 0)], guide)
        if collapse_targets:
            n_labels = int(guide_label.max(initial=-1)) + 1
            pairs = np.unique(d_rows * max(n_labels, 1) + guide_label[d_cols])
            pair_rows, pair_labels = pairs // max(n_labels, 1), pairs % max(n_labels, 1)
            n_distinct = np.bincount(pair_rows, minlength=n)
            one = np.zeros(n, dtype=np.int64)
            one[pair_rows] = pair_labels
            label = np.where(n_distinct == 1, one, np.where(n_distinct > 1, MULTIPLE, UNASSIGNED))
        out["n_detected"] = n_detected
    out["guide"], out["label"] = guide, label
    return out


def detection_block(block, thresholds: np.ndarray) -> np.ndarray:
    """Per guide, the cells of one block with a non-zero count and with a count at or above its threshold.

    Returns
    -------
    numpy.ndarray
        ``(2, n_guides)`` float64, rows :data:`DETECTION_ROWS`. Invalid
        values (see :func:`invalid_values`) are not counted.
    """
    _, _, cols, values = _entries(block)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    keep = ~invalid_values(values) & (values > 0)
    cols, values = cols[keep], values[keep]
    n_guides = thresholds.size
    return np.vstack(
        [
            np.bincount(cols, minlength=n_guides),
            np.bincount(cols[values >= thresholds[cols]], minlength=n_guides),
        ]
    ).astype(np.float64)


# --------------------------------------------------------------------------- UMI histograms


@dataclass(frozen=True)
class UMIHistogram:
    """Cells per (guide, non-zero UMI count): all the mixture fit needs, and small.

    Attributes
    ----------
    keys
        ``(m,)`` int64, sorted and distinct: ``guide << 32 | umi``.
    n_cells
        ``(m,)`` int64 cells with that count of that guide.
    n_invalid
        Stored values that were not counts (left out).
    """

    keys: np.ndarray
    n_cells: np.ndarray
    n_invalid: int

    @property
    def guide(self) -> np.ndarray:
        """``(m,)`` int64 column index of the guide."""
        return self.keys >> _VALUE_BITS

    @property
    def umi(self) -> np.ndarray:
        """``(m,)`` int64 UMI count (>= 1)."""
        return self.keys & _VALUE_MASK


def histogram_block(block) -> UMIHistogram:
    """The :class:`UMIHistogram` of one block's non-zero, valid counts.

    Raises
    ------
    ValueError
        If a count is 2^32 or more (no guide has that many UMIs in a cell).
    """
    _, _, cols, values = _entries(block)
    bad = invalid_values(values)
    keep = ~bad & (values > 0)
    cols, values = cols[keep], values[keep]
    if values.size and values.max() > _VALUE_MASK:
        raise ValueError(f"a guide count of {values.max():.0f} UMIs in one cell: counts must be below 2^32")
    keys, n_cells = np.unique((cols << _VALUE_BITS) | values.astype(np.int64), return_counts=True)
    return UMIHistogram(keys, n_cells.astype(np.int64), int(bad.sum()))


def merge_histograms(*parts: UMIHistogram) -> UMIHistogram:
    """The histogram of the union of the blocks of ``parts`` (sums of cells per key)."""
    keys = np.concatenate([p.keys for p in parts])
    counts = np.concatenate([p.n_cells for p in parts])
    merged, inverse = np.unique(keys, return_inverse=True)
    return UMIHistogram(
        merged,
        np.bincount(inverse, weights=counts, minlength=merged.size).astype(np.int64),
        sum(p.n_invalid for p in parts),
    )


# --------------------------------------------------------------------------- the Poisson-Gaussian mixture


@dataclass(frozen=True)
class PoissonGaussFit:
    """Per-guide fit of the Poisson-Gaussian mixture; every attribute is ``(n_guides,)``.

    Attributes
    ----------
    fitted
        bool: at least 2 cells with a non-zero count and a largest count of
        at least 2 (crispat's condition); the rest are NaN and never detected.
    weight
        Signal (Gaussian) weight ``w``.
    lam
        ``lambda`` of the background term (on the log2 count scale).
    mu, scale
        Mean and standard deviation of the signal, log2 UMIs.
    threshold
        float64 UMIs at which a cell is detected: the smallest count in
        ``1..max`` whose signal posterior is > 0.5; ``inf`` when none (or
        not fitted).
    log_posterior
        The objective reached: log-likelihood plus the log priors (without
        their constants; see :func:`log_posterior`).
    n_iter
        EM iterations of the best start.
    converged
        bool: the objective changed by less than the tolerance.
    n_cells_nonzero, max_umi
        int64 cells with a non-zero count, largest count.
    """

    fitted: np.ndarray
    weight: np.ndarray
    lam: np.ndarray
    mu: np.ndarray
    scale: np.ndarray
    threshold: np.ndarray
    log_posterior: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    n_cells_nonzero: np.ndarray
    max_umi: np.ndarray


def component_log_densities(x, lam, mu, scale) -> tuple[np.ndarray, np.ndarray]:
    """``(log background, log signal)`` at ``x = log2 UMI``: crispat's ``poisson_prob`` and ``norm.pdf``, in logs."""
    x = np.asarray(x, dtype=np.float64)
    background = x * np.log(lam) - lam - gammaln(x + 1)
    signal = -0.5 * _LOG_2PI - np.log(scale) - (x - mu) ** 2 / (2 * scale**2)
    return background, signal


def log_prior(lam, mu, scale):
    """The log priors of ``lambda``, ``mu``, ``sigma`` (crispat's; without constants); the weights have none."""
    log_lam, log_scale = np.log(lam), np.log(scale)
    return (
        -((mu - PRIOR_MU[0]) ** 2) / (2 * PRIOR_MU[1] ** 2)
        - log_scale
        - (log_scale - PRIOR_LOG_SCALE[0]) ** 2 / (2 * PRIOR_LOG_SCALE[1] ** 2)
        - log_lam
        - (log_lam - PRIOR_LOG_LAMBDA[0]) ** 2 / (2 * PRIOR_LOG_LAMBDA[1] ** 2)
    )


def log_posterior(umi, n_cells, *, weight, lam, mu, scale) -> float:
    """The objective of one guide's fit: ``sum_u n_u log p(log2 u) + log prior`` (constants of the priors left out).

    Parameters
    ----------
    umi, n_cells
        Distinct non-zero UMI counts of the guide and the cells with each.
    weight, lam, mu, scale
        Mixture parameters.
    """
    x = np.log2(np.asarray(umi, dtype=np.float64))
    background, signal = component_log_densities(x, lam, mu, scale)
    with np.errstate(divide="ignore"):
        mix = np.logaddexp(np.log1p(-weight) + background, np.log(weight) + signal)
    return float(np.dot(np.asarray(n_cells, dtype=np.float64), mix) + log_prior(lam, mu, scale))


def _newton(func, start: np.ndarray, *, max_step: float = 5.0, tol: float = 1e-12, max_iter: int = 100) -> np.ndarray:
    """Roots of monotone decreasing ``func(v) -> (value, derivative)``, elementwise, from ``start`` (steps clipped).

    Each element stops on its own (so a fit does not depend on the others it is solved with).
    """
    v = start.copy()
    moving = np.ones(v.shape, dtype=bool)
    for _ in range(max_iter):
        value, slope = func(v)
        step = np.where(moving, np.clip(-value / slope, -max_step, max_step), 0.0)
        v = v + step
        moving &= np.abs(step) > tol * (1 + np.abs(v))
        if not moving.any():
            break
    return v


def _m_step(n_cells, x, fit, resp, n_fits, log_lam, log_scale):
    """One ECM update of ``(weight, log lambda, mu, log sigma)`` of every fit (MAP in ``mu``, ``sigma``, ``lambda``)."""
    total = np.bincount(fit, weights=n_cells, minlength=n_fits)
    n_signal = np.bincount(fit, weights=n_cells * resp, minlength=n_fits)
    n_background = total - n_signal
    sum_x_background = np.bincount(fit, weights=n_cells * (1 - resp) * x, minlength=n_fits)
    sum_x_signal = np.bincount(fit, weights=n_cells * resp * x, minlength=n_fits)
    sum_xx_signal = np.bincount(fit, weights=n_cells * resp * x * x, minlength=n_fits)
    weight = n_signal / total
    # log lambda: d/dv [S v - N e^v - v - (v - m)^2 / (2 s^2)] = 0 (lognormal prior on lambda)
    m_l, s_l = PRIOR_LOG_LAMBDA
    log_lam = _newton(
        lambda v: (
            sum_x_background - n_background * np.exp(v) - 1 - (v - m_l) / s_l**2,
            -n_background * np.exp(v) - 1 / s_l**2,
        ),
        log_lam,
    )
    # mu given sigma: the normal prior makes it a weighted mean
    precision = np.exp(-2 * log_scale)
    m_mu, s_mu = PRIOR_MU
    mu = (sum_x_signal * precision + m_mu / s_mu**2) / (n_signal * precision + 1 / s_mu**2)
    # log sigma given mu: d/du [-N u - Q e^(-2u) / 2 - u - (u - m)^2 / (2 s^2)] = 0
    squares = np.maximum(sum_xx_signal - 2 * mu * sum_x_signal + mu * mu * n_signal, 0.0)
    m_s, s_s = PRIOR_LOG_SCALE
    log_scale = _newton(
        lambda u: (
            -(n_signal + 1) + squares * np.exp(-2 * u) - (u - m_s) / s_s**2,
            -2 * squares * np.exp(-2 * u) - 1 / s_s**2,
        ),
        log_scale,
    )
    return weight, log_lam, mu, log_scale


def _e_step(n_cells, x, lgx, fit, n_fits, weight, log_lam, mu, log_scale):
    """Signal responsibilities of the entries and the objective of every fit."""
    lam, scale = np.exp(log_lam), np.exp(log_scale)
    f = fit
    background = x * log_lam[f] - lam[f] - lgx
    signal = -0.5 * _LOG_2PI - log_scale[f] - (x - mu[f]) ** 2 / (2 * scale[f] ** 2)
    with np.errstate(divide="ignore"):
        a = np.log1p(-weight[f]) + background
        b = np.log(weight[f]) + signal
    mix = np.logaddexp(a, b)
    with np.errstate(invalid="ignore"):
        resp = np.where(np.isneginf(b), 0.0, np.exp(b - mix))
    objective = np.bincount(f, weights=n_cells * mix, minlength=n_fits) + log_prior(lam, mu, scale)
    return resp, objective


def _starts(guide, x, n_cells, n_guides):
    """Four starts per guide: three splits of its log2 counts at weighted quantiles, and crispat's prior medians."""
    total = np.bincount(guide, weights=n_cells, minlength=n_guides)
    offsets = np.r_[0, np.cumsum(np.bincount(guide, minlength=n_guides))]
    before = np.cumsum(n_cells) - n_cells  # cells before each entry, over all guides
    within = (before - np.repeat(before[offsets[:-1]], np.diff(offsets))) / total[guide]  # share below the entry
    out = []
    for q in (0.5, 0.75, 0.9):
        upper = within >= q
        n_up = np.bincount(guide, weights=n_cells * upper, minlength=n_guides)
        n_low = total - n_up
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_up = np.bincount(guide, weights=n_cells * upper * x, minlength=n_guides) / n_up
            var_up = np.bincount(guide, weights=n_cells * upper * x * x, minlength=n_guides) / n_up - mean_up**2
            mean_low = np.bincount(guide, weights=n_cells * ~upper * x, minlength=n_guides) / n_low
        out.append(
            (
                np.clip(n_up / total, 0.05, 0.95),
                np.log(np.maximum(np.nan_to_num(mean_low, nan=0.1), 0.1)),
                np.nan_to_num(mean_up, nan=PRIOR_MU[0]),
                np.log(np.maximum(np.sqrt(np.maximum(np.nan_to_num(var_up, nan=1.0), 0.0)), 0.25)),
            )
        )
    out.append((np.full(n_guides, 0.1), np.zeros(n_guides), np.full(n_guides, PRIOR_MU[0]), np.zeros(n_guides)))
    return out


#: EM iterations at most, and the relative change of the objective below which a fit has converged.
MAX_ITER = 5_000
TOL = 1e-12
#: Histogram entries fitted at once (times the four starts, about 150 bytes each: ~80 MB): bounds the fit's memory.
_BATCH = 1 << 17


def fit_poisson_gauss(hist: UMIHistogram, n_guides: int, *, max_iter: int = MAX_ITER, tol: float = TOL):
    """Fit crispat's Poisson-Gaussian mixture to every guide's histogram, all guides at once (see the module docstring).

    Parameters
    ----------
    hist
        Cells per (guide, non-zero UMI count) over all cells.
    n_guides
        Number of guides (columns).
    max_iter, tol
        EM iterations at most; a fit stops when its objective changes by
        less than ``tol * (1 + |objective|)``.

    Returns
    -------
    PoissonGaussFit
    """
    guide, umi, n_cells = hist.guide, hist.umi, hist.n_cells.astype(np.float64)
    n_nonzero = np.bincount(guide, weights=n_cells, minlength=n_guides).astype(np.int64)
    max_umi = np.zeros(n_guides, dtype=np.int64)
    np.maximum.at(max_umi, guide, umi)
    fitted = (n_nonzero >= 2) & (max_umi >= 2)
    nan = np.full(n_guides, np.nan)
    result = {
        "weight": nan.copy(),
        "lam": nan.copy(),
        "mu": nan.copy(),
        "scale": nan.copy(),
        "log_posterior": nan.copy(),
        "n_iter": np.zeros(n_guides, dtype=np.int64),
        "converged": np.zeros(n_guides, dtype=bool),
    }
    threshold = np.full(n_guides, np.inf)
    # guides in batches of at most _BATCH histogram entries (each fitted from every start): bounded memory
    entries = np.bincount(guide, minlength=n_guides) * fitted
    ends = np.r_[0, np.cumsum(entries)]
    start = 0
    while start < n_guides:
        stop = max(int(np.searchsorted(ends, ends[start] + _BATCH, side="right")) - 1, start + 1)
        batch = np.zeros(n_guides, dtype=bool)
        batch[start:stop] = fitted[start:stop]
        start = stop
        if not batch.any():
            continue
        index = np.cumsum(batch) - 1  # guide -> its place in the batch
        lo, hi = np.searchsorted(guide, [np.argmax(batch), n_guides - np.argmax(batch[::-1])])  # sorted by guide
        keep = lo + np.flatnonzero(batch[guide[lo:hi]])
        g, x, w = index[guide[keep]], np.log2(umi[keep].astype(np.float64)), n_cells[keep]
        params = _em(g, x, w, int(batch.sum()), max_iter=max_iter, tol=tol)
        for name, values in params.items():
            result[name][batch] = values
        threshold[batch] = signal_thresholds(
            max_umi[batch], weight=params["weight"], lam=params["lam"], mu=params["mu"], scale=params["scale"]
        )
    return PoissonGaussFit(fitted=fitted, threshold=threshold, n_cells_nonzero=n_nonzero, max_umi=max_umi, **result)


def _em(guide, x, n_cells, n_guides, *, max_iter, tol) -> dict[str, np.ndarray]:
    """EM from every start of every guide at once; the best start of each guide."""
    starts = _starts(guide, x, n_cells, n_guides)
    n_starts = len(starts)
    n_fits = n_starts * n_guides
    weight, log_lam, mu, log_scale = (np.concatenate(p) for p in zip(*starts, strict=True))
    fit_all = np.concatenate([guide + k * n_guides for k in range(n_starts)])
    x_all, n_all = np.tile(x, n_starts), np.tile(n_cells, n_starts)
    lgx_all = gammaln(x_all + 1)
    objective = np.full(n_fits, -np.inf)
    n_iter = np.zeros(n_fits, dtype=np.int64)
    active = np.ones(n_fits, dtype=bool)
    for _ in range(max_iter):
        on = active[fit_all]
        ids = np.flatnonzero(active)
        local = np.full(n_fits, -1, dtype=np.int64)
        local[ids] = np.arange(ids.size)
        f, xs, ns, lg = local[fit_all[on]], x_all[on], n_all[on], lgx_all[on]
        resp, new = _e_step(ns, xs, lg, f, ids.size, weight[ids], log_lam[ids], mu[ids], log_scale[ids])
        done = np.abs(new - objective[ids]) <= tol * (1 + np.abs(new))
        objective[ids] = new
        n_iter[ids] += 1
        if done.all():
            active[ids] = False
            break
        w_new, l_new, m_new, s_new = _m_step(ns, xs, f, resp, ids.size, log_lam[ids], log_scale[ids])
        moving = ~done
        upd = ids[moving]
        weight[upd], log_lam[upd], mu[upd], log_scale[upd] = w_new[moving], l_new[moving], m_new[moving], s_new[moving]
        active[ids[done]] = False
    best = np.argmax(objective.reshape(n_starts, n_guides), axis=0)
    pick = best * n_guides + np.arange(n_guides)
    return {
        "weight": weight[pick],
        "lam": np.exp(log_lam[pick]),
        "mu": mu[pick],
        "scale": np.exp(log_scale[pick]),
        "log_posterior": objective[pick],
        "n_iter": n_iter[pick],
        "converged": ~active[pick],
    }


#: Counts scanned at once by :func:`signal_thresholds` (bounds its memory).
_SCAN = 1 << 19


def signal_thresholds(max_umi, *, weight, lam, mu, scale) -> np.ndarray:
    """Per guide, the smallest count ``t`` in ``1..max_umi`` whose signal posterior is > 0.5 (``inf``: none).

    crispat's rule (``fit_PGMM``): ``P(signal | log2 t) = w N / (w N + (1 - w) P) > 0.5``,
    compared here in logs. Guides are scanned in batches of at most
    ``2^19`` counts.
    """
    max_umi = np.asarray(max_umi, dtype=np.int64)
    params = [np.asarray(p, dtype=np.float64) for p in (weight, lam, mu, scale)]
    out = np.full(max_umi.size, np.inf)
    start = 0
    while start < max_umi.size:
        stop, size = start, 0
        while stop < max_umi.size and (stop == start or size + max_umi[stop] <= _SCAN):
            size += max_umi[stop]
            stop += 1
        lengths = max_umi[start:stop]
        which = np.repeat(np.arange(start, stop), lengths)
        t = np.arange(size) - np.repeat(np.cumsum(lengths) - lengths, lengths) + 1
        w, lam_, mu_, scale_ = (p[which] for p in params)
        background, signal = component_log_densities(np.log2(t), lam_, mu_, scale_)
        with np.errstate(divide="ignore", invalid="ignore"):
            above = np.log(w) + signal > np.log1p(-w) + background
        hits = which[above]
        first = np.full(stop - start, np.inf)
        np.minimum.at(first, hits - start, t[above].astype(np.float64))
        out[start:stop] = first
        start = stop
    return out

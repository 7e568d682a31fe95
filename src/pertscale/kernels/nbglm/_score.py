"""The control cells' likelihood as a frozen function of their linear predictor, and the fits that use it.

The control's share of a gene's negative-binomial log likelihood, for the
cells of one covariate level at linear predictor ``eta`` (``mu_i = s_i
exp(eta)``), has the score ::

    S(eta) = sum_i (y_i - mu_i) / (1 + alpha mu_i)
           = sum_{y_i > 0} y_i T_i  -  exp(eta) sum_i s_i T_i,     T_i = 1 / (1 + alpha s_i exp(eta)).

Each ``T_i`` is a logistic function of ``v = log alpha + eta``; with ``w =
tanh((v + c) / 2)`` (``c`` a band's centre in ``log s``) it is the rational
function ``(1 - tau_i)(1 - w) / (2 (1 + tau_i w))`` of ``w`` on ``[-1, 1]``
(``tau_i = tanh((log s_i - c) / 2)``),
whose pole ``-1 / tau_i`` lies outside the interval. Both sums are therefore
analytic in ``w`` over the whole real line of ``eta``, and their Chebyshev
series converge geometrically, at the rate ``coth(d / 4)`` where ``d`` is
the largest ``|log s_i - c|`` (Trefethen, *Approximation Theory and
Approximation Practice*, ch. 8). Cells are split into bands of size factors
no wider than :data:`BAND_WIDTH` in ``log s``, each with its own centre ``c``,
so that :data:`N_CHEB` + 1 coefficients give the sums to about 1e-14 of
their size. The series are the frozen control statistics: made once from
the control cells, broadcast, evaluated in ``O(N_CHEB)`` per gene whatever
the number of control cells. The log likelihood's differences, needed by the
likelihood-ratio test, are integrals of ``S`` (Gauss-Legendre).

The fits of one comparison (a perturbation's cells and the control) with
the design ``~ covariates + perturbation`` (DESeq2's, Love, Huber & Anders
2014) are Newton iterations on all coefficients, the control's share from
the series and the perturbation's from its cells (:func:`fit_comparison`).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from scipy.fft import dct

#: Degree of the Chebyshev series of the control's score (per band of size factors).
N_CHEB = 32
#: Widest band of ``log`` size factors one series covers (its cells are within half of it from its centre).
BAND_WIDTH = 3.0
#: Coefficients are kept within +-BOUND (natural log): exp(-30) ~ 1e-13, a mean below any count (DESeq2 bounds its
#: optimizer's coefficients at 30 in log2).
BOUND = 30.0
#: Normal prior's scale of the coefficients apeGLM does not shrink (DESeq2's and PyDESeq2's ``prior.no.shrink.scale``).
NO_SHRINK_SCALE = 15.0
#: Gauss-Legendre points per unit of ``eta`` for the log likelihood's differences.
_GL_X, _GL_W = np.polynomial.legendre.leggauss(16)


def size_factor_bands(log_s: np.ndarray, width: float = BAND_WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """Bands of ``log`` size factors, each at most ``width`` wide: ``(centres, band of each cell)``."""
    if log_s.size == 0:
        return np.empty(0), np.empty(0, dtype=np.int64)
    order = np.sort(np.unique(log_s))
    starts = [order[0]]
    for value in order:
        if value > starts[-1] + width:
            starts.append(value)
    starts = np.asarray(starts)
    band = np.searchsorted(starts, log_s, side="right") - 1
    lows = np.array([log_s[band == b].min() for b in range(starts.size)])
    highs = np.array([log_s[band == b].max() for b in range(starts.size)])
    return 0.5 * (lows + highs), band.astype(np.int64)


def _nodes(n: int) -> np.ndarray:
    return np.cos(np.pi * np.arange(n + 1) / n)


def _coefficients(values: np.ndarray) -> np.ndarray:
    """Chebyshev coefficients of the interpolant through values at the Chebyshev-Lobatto points (last axis)."""
    n = values.shape[-1] - 1
    c = dct(values, type=1, axis=-1) / n
    c[..., 0] *= 0.5
    c[..., n] *= 0.5
    return c


def _derivative(c: np.ndarray) -> np.ndarray:
    """Coefficients of the derivative series (same length; the last is zero)."""
    n = c.shape[-1] - 1
    d = np.zeros_like(c)
    if n >= 1:
        d[..., n - 1] = 2.0 * n * c[..., n]
    for k in range(n - 1, 0, -1):
        d[..., k - 1] = (d[..., k + 1] if k + 1 <= n else 0.0) + 2.0 * k * c[..., k]
    d[..., 0] *= 0.5
    return d


@njit(cache=True, nogil=True, error_model="numpy")
def _node_sums(ptr, rows, y, log_s, band, centre, n_bands, nodes, out):
    # out[b, j, m] = sum over gene j's non-zero cells in band b of y_i T_i(w_m)
    for j in range(ptr.shape[0] - 1):
        for k in range(ptr[j], ptr[j + 1]):
            i = rows[k]
            b = band[i]
            tau = np.tanh(0.5 * (log_s[i] - centre[b]))
            for m in range(nodes.shape[0]):
                w = nodes[m]
                out[b, j, m] += y[k] * (1.0 - tau) * (1.0 - w) / (2.0 * (1.0 + tau * w))


def control_series(ptr, rows, y, size_factors: np.ndarray, n_genes: int, n: int = N_CHEB):
    """The Chebyshev series of one level's control score terms, per band.

    Parameters
    ----------
    ptr, rows, y
        The level's counts by gene (CSC, rows of this level's cells).
    size_factors
        ``(n_cells,)`` of this level's cells.
    n_genes, n
        Genes, and the series' degree.

    Returns
    -------
    tuple
        ``(centres, y_coef, q_coef)``: ``(n_bands,)`` band centres in ``log
        s``; ``(n_bands, n_genes, n + 1)`` coefficients of ``sum y_i T_i``;
        ``(n_bands, n + 1)`` of ``sum s_i T_i``.
    """
    log_s = np.log(size_factors)
    centres, band = size_factor_bands(log_s)
    nodes = _nodes(n)
    values = np.zeros((centres.size, n_genes, n + 1))
    _node_sums(ptr, rows, y, log_s, band, centres, centres.size, nodes, values)
    q_values = np.zeros((centres.size, n + 1))
    tau = np.tanh(0.5 * (log_s - centres[band]))
    for b in range(centres.size):
        t = tau[band == b][:, None]
        q_values[b] = (size_factors[band == b][:, None] * (1.0 - t) * (1.0 - nodes) / (2.0 * (1.0 + t * nodes))).sum(0)
    return centres, _coefficients(values), _coefficients(q_values)


def derivative_series(c: np.ndarray) -> np.ndarray:
    """The derivative's coefficients (in ``w``) of series along the last axis."""
    return _derivative(c)


@njit(cache=True, nogil=True, error_model="numpy")
def _clenshaw(c, w):
    b1 = 0.0
    b2 = 0.0
    for k in range(c.shape[0] - 1, 0, -1):
        b1, b2 = 2.0 * w * b1 - b2 + c[k], b1
    return w * b1 - b2 + c[0]


@njit(cache=True, nogil=True, error_model="numpy")
def control_eval(centres, yc, dyc, qc, dqc, level, j, eta, log_alpha):
    """Score, observed and expected information of one level's control cells at ``eta``, gene ``j``.

    ``centres`` ``(n_levels, n_bands)`` (NaN: no band), ``yc``/``dyc``
    ``(n_levels, n_bands, n_genes, n + 1)``, ``qc``/``dqc`` ``(n_levels,
    n_bands, n + 1)``.
    """
    score = 0.0
    observed = 0.0
    expected = 0.0
    t = np.exp(eta)
    for b in range(centres.shape[1]):
        c = centres[level, b]
        if np.isnan(c):
            continue
        w = np.tanh(0.5 * (log_alpha + eta + c))
        dw = 0.5 * (1.0 - w * w)
        g = _clenshaw(yc[level, b, j], w)
        dg = _clenshaw(dyc[level, b, j], w) * dw
        q = _clenshaw(qc[level, b], w)
        dq = _clenshaw(dqc[level, b], w) * dw
        score += g - t * q
        observed -= dg - t * q - t * dq
        expected += t * q
    return score, observed, expected


@njit(cache=True, nogil=True, error_model="numpy")
def control_loglik_change(centres, yc, dyc, qc, dqc, level, j, eta0, eta1, log_alpha):
    """``L(eta1) - L(eta0)`` of one level's control cells, the integral of the score (Gauss-Legendre)."""
    if eta0 == eta1:
        return 0.0
    lo = min(eta0, eta1)
    hi = max(eta0, eta1)
    if lo == -np.inf:  # the control's counts are all zero there: L(-inf) = 0, the integrand decays as exp(eta)
        lo = hi - 40.0
    pieces = int(np.ceil(hi - lo))
    if pieces < 1:
        pieces = 1
    width = (hi - lo) / pieces
    total = 0.0
    for p in range(pieces):
        a = lo + p * width
        for q in range(_GL_X.shape[0]):
            x = a + 0.5 * width * (_GL_X[q] + 1.0)
            s, _, _ = control_eval(centres, yc, dyc, qc, dqc, level, j, x, log_alpha)
            total += 0.5 * width * _GL_W[q] * s
    return total if eta1 >= eta0 else -total


@njit(cache=True, nogil=True, error_model="numpy")
def _solve(a, b):
    """Solve ``a x = b`` (small, symmetric positive definite): Gaussian elimination with partial pivoting."""
    n = b.shape[0]
    m = a.copy()
    x = b.copy()
    for col in range(n):
        piv = col
        for r in range(col + 1, n):
            if abs(m[r, col]) > abs(m[piv, col]):
                piv = r
        if m[piv, col] == 0.0:
            return x * np.nan
        if piv != col:
            for k in range(n):
                m[col, k], m[piv, k] = m[piv, k], m[col, k]
            x[col], x[piv] = x[piv], x[col]
        for r in range(col + 1, n):
            f = m[r, col] / m[col, col]
            for k in range(col, n):
                m[r, k] -= f * m[col, k]
            x[r] -= f * x[col]
    for col in range(n - 1, -1, -1):
        s = x[col]
        for k in range(col + 1, n):
            s -= m[col, k] * x[k]
        x[col] = s / m[col, col]
    return x


@njit(cache=True, nogil=True, error_model="numpy")
def _inverse_entry(a, i):
    """``inv(a)[i, i]``."""
    e = np.zeros(a.shape[0])
    e[i] = 1.0
    return _solve(a, e)[i]


@njit(cache=True, nogil=True, error_model="numpy")
def _group_terms(lo, hi, first, end, rows, y, sf, lev, alpha, eta_level, b1, n_levels, out_s, out_o, out_e):
    """Per level: the group cells' score, observed and expected information at ``eta_level[k] + b1``."""
    for k in range(n_levels):
        out_s[k] = 0.0
        out_o[k] = 0.0
        out_e[k] = 0.0
    scale = np.empty(n_levels)
    for k in range(n_levels):
        scale[k] = np.exp(eta_level[k] + b1)
    kk = first
    for i in range(lo, hi):
        k = lev[i]
        mu = sf[i] * scale[k]
        yi = 0.0
        if kk < end and rows[kk] == i:
            yi = y[kk]
            kk += 1
        h = 1.0 / (1.0 + alpha * mu)
        out_s[k] += (yi - mu) * h
        out_o[k] += mu * (1.0 + alpha * yi) * h * h
        out_e[k] += mu * h


@njit(cache=True, nogil=True, error_model="numpy")
def group_loglik(lo, hi, first, end, rows, y, sf, lev, alpha, eta_level, b1):
    """The group cells' log likelihood at ``eta_level[lev] + b1``, without the terms free of ``mu``."""
    total = 0.0
    kk = first
    for i in range(lo, hi):
        eta = eta_level[lev[i]] + b1
        mu = sf[i] * np.exp(eta)
        yi = 0.0
        if kk < end and rows[kk] == i:
            yi = y[kk]
            kk += 1
        if yi > 0:
            total += yi * (eta + np.log(sf[i]))
        total -= (yi + 1.0 / alpha) * np.log1p(alpha * mu)
    return total


@njit(cache=True, nogil=True, error_model="numpy")
def fit_comparison(
    lo,
    hi,
    first,
    end,
    rows,
    y,
    sf,
    lev,
    alpha,
    j,
    design,
    control_levels,
    centres,
    yc,
    dyc,
    qc,
    dqc,
    theta0,
    use_control,
    use_group,
    with_b1,
    prior_scale,
    max_iter,
    tol,
    offset_b1=0.0,
    exact_curvature=False,  # noqa: FBT002 - numba's functions take no keyword-only arguments
    b1_low=-np.inf,
    b1_high=np.inf,
):
    """Maximum likelihood (or apeGLM's maximum a posteriori) coefficients of one comparison, one gene.

    The model ``log mu_i = design[level_i] . gamma + b1 x_i + log s_i``:
    ``theta = (gamma, b1)`` (``b1`` only ``with_b1``), the control's cells
    (``use_control``, from the series) and the group's rows ``[lo, hi)``
    (``use_group``); without ``b1``, the group's cells are at ``offset_b1``
    from the covariates' prediction. ``prior_scale > 0`` adds apeGLM's priors (Zhu, Ibrahim
    & Love 2019): Cauchy(0, ``prior_scale``) on ``b1`` and normal(0, 15) on
    ``gamma``. Newton steps on the observed information (the prior's
    curvature floored at zero), at most 1 long, until every step is below
    ``tol``. ``exact_curvature``: plain Newton on the posterior's own
    curvature, stopped unconverged (at the last point) as soon as a step is
    not uphill or takes ``b1`` out of ``(b1_low, b1_high)``.

    Returns ``(theta, converged, iterations, observed, expected)``: the
    final point, the posterior's observed information and the likelihood's
    expected information there (``(P, P)`` each).
    """
    n_levels, p = design.shape
    n_par = p + 1 if with_b1 else p
    theta = theta0.copy()
    la = np.log(alpha)
    gs = np.empty(n_levels)
    go = np.empty(n_levels)
    ge = np.empty(n_levels)
    eta = np.empty(n_levels)
    obs = np.zeros((n_par, n_par))
    exp_info = np.zeros((n_par, n_par))
    converged = False
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is returned
        for k in range(n_levels):
            e = 0.0
            for c in range(p):
                e += design[k, c] * theta[c]
            eta[k] = e
        b1 = theta[p] if with_b1 else offset_b1
        grad = np.zeros(n_par)
        obs[:, :] = 0.0
        exp_info[:, :] = 0.0
        if use_group:
            _group_terms(lo, hi, first, end, rows, y, sf, lev, alpha, eta, b1, n_levels, gs, go, ge)
            for k in range(n_levels):
                for c in range(p):
                    grad[c] += design[k, c] * gs[k]
                    for d in range(p):
                        obs[c, d] += design[k, c] * design[k, d] * go[k]
                        exp_info[c, d] += design[k, c] * design[k, d] * ge[k]
                    if with_b1:
                        obs[c, p] += design[k, c] * go[k]
                        exp_info[c, p] += design[k, c] * ge[k]
                if with_b1:
                    grad[p] += gs[k]
                    obs[p, p] += go[k]
                    exp_info[p, p] += ge[k]
        if use_control:
            for k in range(n_levels):
                if not control_levels[k]:
                    continue
                s, o, ex = control_eval(centres, yc, dyc, qc, dqc, k, j, eta[k], la)
                for c in range(p):
                    grad[c] += design[k, c] * s
                    for d in range(p):
                        obs[c, d] += design[k, c] * design[k, d] * o
                        exp_info[c, d] += design[k, c] * design[k, d] * ex
        if with_b1:
            for c in range(p):
                obs[p, c] = obs[c, p]
                exp_info[p, c] = exp_info[c, p]
        step_matrix = obs.copy()
        floored = obs.copy()
        if prior_scale > 0:
            for c in range(p):
                grad[c] -= theta[c] / (NO_SHRINK_SCALE * NO_SHRINK_SCALE)
                obs[c, c] += 1.0 / (NO_SHRINK_SCALE * NO_SHRINK_SCALE)
                step_matrix[c, c] += 1.0 / (NO_SHRINK_SCALE * NO_SHRINK_SCALE)
                floored[c, c] += 1.0 / (NO_SHRINK_SCALE * NO_SHRINK_SCALE)
            if with_b1:
                s2 = prior_scale * prior_scale
                bb = theta[p]
                grad[p] -= 2.0 * bb / (s2 + bb * bb)
                curv = 2.0 * (s2 - bb * bb) / ((s2 + bb * bb) ** 2)
                obs[p, p] += curv
                step_matrix[p, p] += curv if exact_curvature else max(curv, 0.0)
                floored[p, p] += max(curv, 0.0)
        else:
            for c in range(n_par):  # a column that nothing informs (a level absent from both sides) stays put
                if step_matrix[c, c] <= 0.0:
                    step_matrix[c, c] = 1.0
        step = _solve(step_matrix, grad)
        longest = 0.0
        for c in range(n_par):
            longest = max(longest, abs(step[c]))
        if not np.isfinite(longest):
            break
        if exact_curvature:
            uphill = 0.0
            for c in range(n_par):
                uphill += step[c] * grad[c]
            if uphill <= 0.0:  # not concave here: the step of the prior's curvature floored at zero (uphill)
                step = _solve(floored, grad)
                longest = 0.0
                for c in range(n_par):
                    longest = max(longest, abs(step[c]))
            if not (b1_low < theta[p] + min(1.0, 1.0 / max(longest, 1e-300)) * step[p] < b1_high):
                break
        if longest > 1.0:
            step = step / longest
        moved = 0.0
        for c in range(n_par):
            # a coefficient the data send to -inf (a level whose cells have no count) stops at -BOUND
            new = min(max(theta[c] + step[c], -BOUND), BOUND)
            moved = max(moved, abs(new - theta[c]))
            theta[c] = new
        if moved < tol:
            converged = True
            break
    return theta, converged, it, obs, exp_info


@njit(cache=True, nogil=True, error_model="numpy")
def _map_mode(lo, hi, first, end, rows, y, sf, lev, alpha, j, design, control_levels, centres, yc, dyc, qc,
              dqc, gamma0, b_hat, b_start, prior_scale, max_iter, tol, from_zero, retry):  # fmt: skip
    """A mode of apeGLM's posterior of one comparison and gene, every coefficient free.

    Searched from ``b1 = 0`` when ``from_zero``, else from ``b_start`` when
    it lies well outside the prior's scale; with ``retry``, plain Newton
    from the other end too before the bracketed search (left out where two
    modes are possible, so that each search stays near its own start).

    The log posterior profiled over ``gamma`` (concave for fixed ``b1``:
    Newton, :func:`fit_comparison`) has the derivative ``S_group(b1) - 2 b1
    / (scale^2 + b1^2)`` in ``b1`` (the envelope theorem); its root is
    found between 0 and the maximum likelihood ``b_hat`` (``+-inf`` for a
    gene with counts on one side only; the search starts at ``b_start``), where the
    derivative changes sign) by Newton steps on the profile's curvature (the
    Schur complement of the observed information), bisecting when a step
    leaves the bracket. Plain Newton on all coefficients is tried first; the
    bracketed search takes over when a step is not uphill or leaves the
    bracket (a prior much narrower than the likelihood: two modes). Returns
    ``(theta, posterior standard error of b1, converged)``: the error from
    the whole posterior's observed information at the mode, as apeglm and
    PyDESeq2 report it.
    """
    n_levels, p = design.shape
    s2 = prior_scale * prior_scale
    left = min(0.0, b_hat)
    right = max(0.0, b_hat)
    # first, plain Newton on every coefficient together (a few steps where the posterior is concave near its mode)
    # (from the MLE when it lies well outside the prior's scale, else from 0, where the prior is concave)
    start = np.empty(p + 1)
    start[:p] = gamma0
    start[p] = b_start if abs(b_start) > 2.0 * prior_scale and not from_zero else 0.0
    theta, ok, _, obs, _ = fit_comparison(
        lo, hi, first, end, rows, y, sf, lev, alpha, j, design, control_levels, centres, yc, dyc, qc, dqc,
        start, use_control=True, use_group=True, with_b1=True, prior_scale=prior_scale, max_iter=max_iter,
        tol=0.01 * tol, exact_curvature=True, b1_low=left - 1e-12, b1_high=right + 1e-12,
    )  # fmt: skip
    if not ok and retry and np.isfinite(b_start):  # from the other end: 0 or the MLE
        start[p] = b_start if start[p] == 0.0 else 0.0
        theta, ok, _, obs, _ = fit_comparison(
            lo, hi, first, end, rows, y, sf, lev, alpha, j, design, control_levels, centres, yc, dyc, qc, dqc,
            start, use_control=True, use_group=True, with_b1=True, prior_scale=prior_scale, max_iter=max_iter,
            tol=0.01 * tol, exact_curvature=True, b1_low=left - 1e-12, b1_high=right + 1e-12,
        )  # fmt: skip
    if ok:
        v = _inverse_entry(obs, p)
        return theta, np.sqrt(v) if v > 0 else np.nan, True
    # otherwise the profile over gamma, bracketed
    gamma = gamma0.copy()
    eta = np.empty(n_levels)
    gs = np.empty(n_levels)
    go = np.empty(n_levels)
    ge = np.empty(n_levels)
    b = 0.0 if from_zero else b_start
    converged = False
    for _ in range(4 * max_iter):
        # at most two Newton steps on gamma from the last one (warm): the bracket moves only once gamma has settled
        gamma, settled, _, obs, _ = fit_comparison(
            lo, hi, first, end, rows, y, sf, lev, alpha, j, design, control_levels, centres, yc, dyc, qc, dqc,
            gamma, use_control=True, use_group=True, with_b1=False, prior_scale=prior_scale, max_iter=2,
            tol=tol, offset_b1=b,
        )  # fmt: skip
        _eta_levels(design, gamma, eta)
        _group_terms(lo, hi, first, end, rows, y, sf, lev, alpha, eta, b, n_levels, gs, go, ge)
        grad = -2.0 * b / (s2 + b * b)
        curv = go.sum() + 2.0 * (s2 - b * b) / ((s2 + b * b) ** 2)  # minus the log posterior's second derivative
        cross = np.zeros(p)
        for k in range(n_levels):
            grad += gs[k]
            for c in range(p):
                cross[c] += design[k, c] * go[k]
        # the profile's curvature: the Schur complement of the gamma block
        curv -= (cross * _solve(obs, cross)).sum()
        if settled:
            if grad > 0:
                left = b
            else:
                right = b
        step = grad / curv if curv > 0 else np.inf
        new = b + step
        if not (left < new < right):
            if np.isfinite(left) and np.isfinite(right):
                new = 0.5 * (left + right)
            else:  # towards the open end of the bracket
                new = b + (1.0 if grad > 0 else -1.0)
        # a hundredth of tol: one more (quadratically converging) step, so that the mode does not depend on the
        # last bits of the summation order (chunking, scheduler)
        if settled and (abs(new - b) < 0.01 * tol or right - left < 0.01 * tol):
            b = new
            converged = True
            break
        b = new
    theta = np.empty(p + 1)
    theta[:p] = gamma
    theta[p] = b
    _, _, _, obs, _ = fit_comparison(
        lo, hi, first, end, rows, y, sf, lev, alpha, j, design, control_levels, centres, yc, dyc, qc, dqc,
        theta, use_control=True, use_group=True, with_b1=True, prior_scale=prior_scale, max_iter=1, tol=tol,
    )  # fmt: skip
    v = _inverse_entry(obs, p)
    return theta, np.sqrt(v) if v > 0 else np.nan, converged


@njit(cache=True, nogil=True, error_model="numpy")
def _log_posterior_change(lo, hi, first, end, rows, y, sf, lev, alpha, j, design, control_levels, centres, yc, dyc,
                          qc, dqc, theta0, theta1, prior_scale):  # fmt: skip
    """The log posterior of apeGLM at ``theta1`` less at ``theta0`` (both sides' likelihoods and both priors)."""
    n_levels, p = design.shape
    eta0 = np.empty(n_levels)
    eta1 = np.empty(n_levels)
    _eta_levels(design, theta0[:p], eta0)
    _eta_levels(design, theta1[:p], eta1)
    la = np.log(alpha)
    change = group_loglik(lo, hi, first, end, rows, y, sf, lev, alpha, eta1, theta1[p])
    change -= group_loglik(lo, hi, first, end, rows, y, sf, lev, alpha, eta0, theta0[p])
    for k in range(n_levels):
        if control_levels[k]:
            change += control_loglik_change(centres, yc, dyc, qc, dqc, k, j, eta0[k], eta1[k], la)
    for c in range(p):
        change -= (theta1[c] * theta1[c] - theta0[c] * theta0[c]) / (2.0 * NO_SHRINK_SCALE * NO_SHRINK_SCALE)
    s2 = prior_scale * prior_scale
    return change - np.log(s2 + theta1[p] * theta1[p]) + np.log(s2 + theta0[p] * theta0[p])


@njit(cache=True, nogil=True, error_model="numpy")
def map_comparison(lo, hi, first, end, rows, y, sf, lev, alpha, j, design, control_levels, centres, yc, dyc, qc,
                   dqc, gamma0, b_hat, b_start, prec_hat, prior_scale, max_iter, tol):  # fmt: skip
    """The maximum a posteriori ``b1`` of apeGLM of one comparison and gene, every coefficient free.

    The log posterior profiled over ``gamma`` is concave for fixed ``b1``,
    but in ``b1`` it can have two modes when the maximum likelihood
    ``b_hat`` lies well outside the Cauchy prior's scale: one near 0, one
    near ``b_hat``. Then both are found (:func:`_map_mode` from ``b_hat``
    and from 0) and the higher posterior kept, its difference computed from
    both sides' likelihoods (the control's from its series). A mode near 0
    needs the prior's pull, at most ``1 / scale``, to match the likelihood's
    slope there, about ``|b_hat| prec_hat`` (``prec_hat`` the MLE's
    precision, ``1 / SE^2``): the search from 0 is skipped where the slope
    is more than twice that. Returns ``(b1, posterior standard error,
    converged)``.
    """
    p = design.shape[1]
    two = np.isfinite(b_hat) and abs(b_start) > 2.0 * prior_scale and not abs(b_hat) * prec_hat > 2.0 / prior_scale
    theta, se, ok = _map_mode(
        lo, hi, first, end, rows, y, sf, lev, alpha, j, design, control_levels, centres, yc, dyc, qc, dqc,
        gamma0, b_hat, b_start, prior_scale, max_iter, tol, from_zero=False, retry=not two,
    )  # fmt: skip
    if two:  # two modes are possible: the one near 0 too
        theta0, se0, ok0 = _map_mode(
            lo, hi, first, end, rows, y, sf, lev, alpha, j, design, control_levels, centres, yc, dyc, qc, dqc,
            gamma0, b_hat, b_start, prior_scale, max_iter, tol, from_zero=True, retry=False,
        )  # fmt: skip
        if ok0 and abs(theta0[p] - theta[p]) > tol:
            gain = _log_posterior_change(
                lo, hi, first, end, rows, y, sf, lev, alpha, j, design, control_levels, centres, yc, dyc, qc,
                dqc, theta, theta0, prior_scale,
            )  # fmt: skip
            if gain > 0 or not ok:
                return theta0[p], se0, ok0
    return theta[p], se, ok


@njit(cache=True, nogil=True, error_model="numpy")
def _eta_levels(design, theta, out):
    for k in range(design.shape[0]):
        e = 0.0
        for c in range(design.shape[1]):
            e += design[k, c] * theta[c]
        out[k] = e

"""Dispersions of DESeq2's additive design ``~ covariates + perturbation``: GLM means and ``log det(X'WX)``.

With covariates the design has an intercept, each covariate's other levels
(``c_l``, one row per level combination ``l``) and one indicator per label
but a reference label. DESeq2 (``estimateDispersionsGeneEst``) then fits the
means by the NB GLM at the starting dispersions (``fitNbinomGLMs``), holds
them fixed, and maximizes the Cox-Reid adjusted profile likelihood
``sum_i l_i(alpha) - 1/2 log det(X'WX)``, ``W_i = mu_i / (1 + alpha mu_i)``.

Over row blocks, a label (all its cells) is whole in a block, or is the
reference or another large label cut into pieces. ``X'WX`` is an arrow:
``[[A, B], [B', D]]`` with ``A = sum_i W_i c c'`` (``p x p``), a column
``B_k = sum_{i in k} W_i c`` and a diagonal ``D_k = sum_{i in k} W_i`` per
label ``k``; so ``log det X'WX = sum_k log D_k + log det(A - sum_k B_k B_k' /
D_k)``, whose terms a block adds up for its labels. Likewise the GLM: each
label's coefficient is solved in its block given the covariate coefficients
``gamma`` (1-D Newton steps), and the block adds the profile's gradient
and information in ``gamma``; Newton steps on ``gamma`` are the caller's.

Per block, the groups have a kind: :data:`REFERENCE` (no coefficient of its
own), :data:`WHOLE` (a label whole here: its coefficient solved here) or
:data:`PIECE` (a piece of a large label whose coefficient the caller gives).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._score import BOUND
from .dispersion import DIRECT_COUNT, _count_table, _count_terms

#: Kinds of the groups of a block.
REFERENCE, WHOLE, PIECE = 0, 1, 2
#: A label's own coefficient is solved to this step (natural log).
BETA_TOL = 1e-12


@njit(cache=True, nogil=True, error_model="numpy")
def _eta(design, gamma, j, out):
    for lv in range(design.shape[0]):
        e = 0.0
        for c in range(design.shape[1]):
            e += design[lv, c] * gamma[c, j]
        out[lv] = e


@njit(cache=True, nogil=True, error_model="numpy")
def _label_beta(lo, hi, k0, k1, rows, y, sf, lev, eta, alpha):
    """The MLE of a label's own coefficient given the others (Newton; ``-BOUND`` without counts)."""
    total = 0.0
    for k in range(k0, k1):
        total += y[k]
    if total <= 0.0:
        return -BOUND
    base = 0.0
    for i in range(lo, hi):
        base += sf[i] * np.exp(eta[lev[i]])
    beta = min(max(np.log(total / base), -BOUND), BOUND)  # the Poisson estimate
    for _ in range(200):
        score = 0.0
        info = 0.0
        k = k0
        for i in range(lo, hi):
            mu = sf[i] * np.exp(eta[lev[i]] + beta)
            h = 1.0 / (1.0 + alpha * mu)
            yi = 0.0
            if k < k1 and rows[k] == i:
                yi = y[k]
                k += 1
            score += (yi - mu) * h
            info += mu * (1.0 + alpha * yi) * h * h  # observed: the log likelihood is concave in beta
        step = score / info
        new = min(max(beta + step, -BOUND), BOUND)
        done = abs(new - beta) < BETA_TOL
        beta = new
        if done:
            break
    return beta


@njit(cache=True, nogil=True, error_model="numpy")
def _glm_block(group_ptr, kind, ptr, rows, y, sf, lev, design, gamma, beta_given, alpha, active, grad, info, piece):
    # grad (p, n_genes), info (p, p, n_genes): the profile's gradient and Fisher information in gamma;
    # piece (2 + p, n_genes): score of the piece's own coefficient, D, and B (PIECE groups only)
    n_groups = group_ptr.shape[0] - 1
    n_genes = ptr.shape[0] - 1
    n_levels, p = design.shape
    eta = np.empty(n_levels)
    wl = np.empty(n_levels)
    gl = np.empty(n_levels)
    b = np.empty(p)
    for j in range(n_genes):
        if not active[j]:
            continue
        _eta(design, gamma, j, eta)
        a = alpha[j]
        k = ptr[j]
        end = ptr[j + 1]
        for g in range(n_groups):
            lo = group_ptr[g]
            hi = group_ptr[g + 1]
            k0 = k
            while k < end and rows[k] < hi:
                k += 1
            if kind[g] == WHOLE:
                beta = _label_beta(lo, hi, k0, k, rows, y, sf, lev, eta, a)
            elif kind[g] == PIECE:
                beta = beta_given[j]
            else:
                beta = 0.0
            wl[:] = 0.0
            gl[:] = 0.0
            kk = k0
            for i in range(lo, hi):
                mu = sf[i] * np.exp(eta[lev[i]] + beta)
                h = 1.0 / (1.0 + a * mu)
                yi = 0.0
                if kk < k and rows[kk] == i:
                    yi = y[kk]
                    kk += 1
                wl[lev[i]] += mu * h
                gl[lev[i]] += (yi - mu) * h
            d = 0.0
            b[:] = 0.0
            for lv in range(n_levels):
                d += wl[lv]
                for c in range(p):
                    b[c] += wl[lv] * design[lv, c]
                    grad[c, j] += gl[lv] * design[lv, c]
                    for e in range(p):
                        info[c, e, j] += wl[lv] * design[lv, c] * design[lv, e]
            if kind[g] == WHOLE and d > 0.0:
                for c in range(p):
                    for e in range(p):
                        info[c, e, j] -= b[c] * b[e] / d
            elif kind[g] == PIECE:
                for lv in range(n_levels):
                    piece[0, j] += gl[lv]
                piece[1, j] += d
                for c in range(p):
                    piece[2 + c, j] += b[c]


def _block_args(cols, group_sizes, kind, lev, design, gamma, beta_given) -> tuple:
    """The kernels' first arguments, as the compiled functions take them."""
    from ..groups import group_pointers

    return (
        group_pointers(group_sizes),
        np.asarray(kind, dtype=np.int64),
        cols.ptr,
        cols.rows,
        cols.y,
        cols.size_factors,
        np.asarray(lev, dtype=np.int64),
        np.ascontiguousarray(design, dtype=np.float64),
        np.ascontiguousarray(gamma, dtype=np.float64),
        np.ascontiguousarray(beta_given, dtype=np.float64),
    )


def _active(active, n_genes: int) -> np.ndarray:
    return np.ones(n_genes, dtype=np.bool_) if active is None else np.asarray(active, dtype=np.bool_)


def glm_block(cols, group_sizes, kind, lev, design, gamma, beta_given, alpha, active=None):
    """A block's share of the profile score and information of the covariate coefficients.

    Parameters
    ----------
    cols
        The block's :class:`~pertscale.kernels.nbglm.CountColumns`, rows in groups.
    group_sizes, kind
        ``(n_groups,)`` rows of each group and its kind (:data:`REFERENCE`,
        :data:`WHOLE`, :data:`PIECE`).
    lev
        ``(n_rows,)`` each row's level combination (a row of ``design``).
    design
        ``(n_levels, p)`` the covariate part of the design (intercept first).
    gamma
        ``(p, n_genes)`` covariate coefficients (natural log).
    beta_given
        ``(n_genes,)`` the coefficient of the label the :data:`PIECE` rows
        belong to.
    alpha
        ``(n_genes,)`` dispersions the means are fitted at.
    active
        ``(n_genes,)`` genes to evaluate.

    Returns
    -------
    tuple
        ``grad (p, n_genes)``, ``info (p, p, n_genes)`` (Fisher information,
        the :data:`WHOLE` labels' own coefficients profiled out: ``A - sum B
        B' / D``; a :data:`PIECE` label's terms come apart) and
        ``piece (2 + p, n_genes)`` (score of the pieces' coefficient, their
        ``D`` and ``B``).
    """
    n_genes = cols.shape[1]
    p = design.shape[1]
    grad = np.zeros((p, n_genes))
    info = np.zeros((p, p, n_genes))
    piece = np.zeros((2 + p, n_genes))
    _glm_block(
        *_block_args(cols, group_sizes, kind, lev, design, gamma, beta_given),
        np.asarray(alpha, dtype=np.float64),
        _active(active, n_genes),
        grad,
        info,
        piece,
    )
    return grad, info, piece


@njit(cache=True, nogil=True, error_model="numpy")
def _apl_block(
    group_ptr, kind, ptr, rows, y, sf, lev, design, gamma, beta_given, alpha_fit, alpha, min_mu, active, out
):
    # out[0:3, j]: sum_i l_i (value, d/da, d2/da2, a = log alpha); out[3:6]: sum over WHOLE labels of log D_k
    # and derivatives; then 3 blocks of p*p: A, A', A''; 3 of p*p: sum_k T_k = B_k B_k' / D_k and derivatives
    # (WHOLE); then D, D', D'' and 3 blocks of p: B, B', B'' of the PIECE rows.
    n_groups = group_ptr.shape[0] - 1
    n_genes = ptr.shape[0] - 1
    n_levels, p = design.shape
    pp = p * p
    o_a = 6
    o_t = o_a + 3 * pp
    o_d = o_t + 3 * pp
    o_b = o_d + 3
    eta = np.empty(n_levels)
    wl = np.empty((3, n_levels))
    bk = np.empty((3, p))
    tv = np.zeros(DIRECT_COUNT + 1)
    t1 = np.zeros(DIRECT_COUNT + 1)
    t2 = np.zeros(DIRECT_COUNT + 1)
    for j in range(n_genes):
        if not active[j]:
            continue
        _eta(design, gamma, j, eta)
        a = alpha[j]
        _count_table(a, tv, t1, t2)
        k = ptr[j]
        end = ptr[j + 1]
        v0 = 0.0
        v1 = 0.0
        v2 = 0.0
        for g in range(n_groups):
            lo = group_ptr[g]
            hi = group_ptr[g + 1]
            k0 = k
            while k < end and rows[k] < hi:
                k += 1
            if kind[g] == WHOLE:
                beta = _label_beta(lo, hi, k0, k, rows, y, sf, lev, eta, alpha_fit[j])
            elif kind[g] == PIECE:
                beta = beta_given[j]
            else:
                beta = 0.0
            wl[:, :] = 0.0
            kk = k0
            for i in range(lo, hi):
                mu = sf[i] * np.exp(eta[lev[i]] + beta)
                if mu < min_mu:
                    mu = min_mu
                # written out as in dispersion._apl (a helper called per cell is 2.4x slower)
                u = a * mu
                h = 1.0 / (1.0 + u)
                if u < 1e-3:  # series: h - g cancels
                    gv = 1.0 - u * (0.5 - u * (1.0 / 3.0 - 0.25 * u))
                    pr = -u * (0.5 - u * (2.0 / 3.0 - u * (0.75 - 0.8 * u)))
                    lp = u * gv
                else:
                    lp = np.log1p(u)
                    gv = lp / u
                    pr = h - gv
                uh2 = u * h * h
                v0 -= mu * gv
                v1 -= mu * pr
                v2 += mu * (pr + uh2)
                if kk < k and rows[kk] == i:
                    yi = y[kk]
                    if yi <= DIRECT_COUNT:
                        c = int(yi)
                        cv, c1, c2 = tv[c], t1[c], t2[c]
                    else:
                        cv, c1, c2 = _count_terms(yi, a)
                    v0 += cv - yi * lp
                    v1 += c1 - yi * u * h
                    v2 += c2 - yi * uh2
                    kk += 1
                lv = lev[i]
                wl[0, lv] += mu * h
                wl[1, lv] -= mu * uh2
                wl[2, lv] += mu * uh2 * (2.0 * u * h - 1.0)
            d0 = 0.0
            d1 = 0.0
            d2 = 0.0
            bk[:, :] = 0.0
            for lv in range(n_levels):
                d0 += wl[0, lv]
                d1 += wl[1, lv]
                d2 += wl[2, lv]
                for c in range(p):
                    x = design[lv, c]
                    for r in range(3):
                        bk[r, c] += wl[r, lv] * x
                    for e in range(p):
                        xx = x * design[lv, e]
                        for r in range(3):
                            out[o_a + r * pp + c * p + e, j] += wl[r, lv] * xx
            if kind[g] == WHOLE:
                q1 = d1 / d0
                out[3, j] += np.log(d0)
                out[4, j] += q1
                out[5, j] += d2 / d0 - q1 * q1
                for c in range(p):
                    for e in range(p):
                        bb = bk[0, c] * bk[0, e]
                        db = bk[1, c] * bk[0, e] + bk[0, c] * bk[1, e]
                        ddb = bk[2, c] * bk[0, e] + 2.0 * bk[1, c] * bk[1, e] + bk[0, c] * bk[2, e]
                        m = c * p + e
                        out[o_t + m, j] += bb / d0
                        out[o_t + pp + m, j] += db / d0 - bb * d1 / (d0 * d0)
                        out[o_t + 2 * pp + m, j] += (
                            ddb / d0
                            - 2.0 * db * d1 / (d0 * d0)
                            - bb * (d2 / (d0 * d0) - 2.0 * d1 * d1 / (d0 * d0 * d0))
                        )
            elif kind[g] == PIECE:
                out[o_d, j] += d0
                out[o_d + 1, j] += d1
                out[o_d + 2, j] += d2
                for r in range(3):
                    for c in range(p):
                        out[o_b + r * p + c, j] += bk[r, c]
        out[0, j] += v0
        out[1, j] += v1
        out[2, j] += v2


def apl_size(p: int) -> int:
    """Rows of :func:`apl_block`'s result for ``p`` covariate coefficients."""
    return 6 + 6 * p * p + 3 + 3 * p


def apl_block(cols, group_sizes, kind, lev, design, gamma, beta_given, alpha_fit, alpha, *, min_mu, active=None):
    """A block's share of each gene's Cox-Reid adjusted profile likelihood of the additive design.

    The means are those of the GLM at ``alpha_fit`` (each :data:`WHOLE`
    label's coefficient solved here given ``gamma``), floored at ``min_mu``
    (DESeq2's ``minmu``); the likelihood is evaluated at ``alpha``.

    Parameters
    ----------
    cols, group_sizes, kind, lev, design, gamma, beta_given
        As :func:`glm_block`.
    alpha_fit
        ``(n_genes,)`` dispersions the means were fitted at.
    alpha
        ``(n_genes,)`` dispersions to evaluate at.
    min_mu
        Lower bound of the means.
    active
        ``(n_genes,)`` genes to evaluate.

    Returns
    -------
    numpy.ndarray
        ``(apl_size(p), n_genes)``: ``sum_i l_i`` and its first two
        derivatives in ``log alpha`` (constants left out); ``sum_k log D_k``
        over :data:`WHOLE` labels and derivatives; ``A`` and its two
        derivatives (``p x p`` each, row-major); ``sum_k B_k B_k' / D_k``
        over :data:`WHOLE` labels and derivatives; then the :data:`PIECE`
        rows' ``D`` (3) and ``B`` (``3 x p``). :func:`cox_reid_term`
        assembles ``-1/2 log det X'WX`` from the sums over blocks.
    """
    n_genes = cols.shape[1]
    p = design.shape[1]
    out = np.zeros((apl_size(p), n_genes))
    _apl_block(
        *_block_args(cols, group_sizes, kind, lev, design, gamma, beta_given),
        np.asarray(alpha_fit, dtype=np.float64),
        np.asarray(alpha, dtype=np.float64),
        float(min_mu),
        _active(active, n_genes),
        out,
    )
    return out


def _outer_terms(d, b):
    """``T = b b' / d`` and its two derivatives, from ``d (3, n)`` and ``b (3, p, n)``: ``(3, p, p, n)``."""
    bb = np.einsum("cn,en->cen", b[0], b[0])
    db = np.einsum("cn,en->cen", b[1], b[0])
    db = db + db.transpose(1, 0, 2)
    ddb = np.einsum("cn,en->cen", b[2], b[0])
    ddb = ddb + ddb.transpose(1, 0, 2) + 2.0 * np.einsum("cn,en->cen", b[1], b[1])
    d0, d1, d2 = d
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.stack(
            [
                bb / d0,
                db / d0 - bb * d1 / d0**2,
                ddb / d0 - 2.0 * db * d1 / d0**2 - bb * (d2 / d0**2 - 2.0 * d1**2 / d0**3),
            ]
        )


def cox_reid_term(whole: np.ndarray, pieces: list[np.ndarray], p: int) -> np.ndarray:
    """``-1/2 log det X'WX`` and its two derivatives in ``log alpha``, from the blocks' sums.

    Parameters
    ----------
    whole
        :func:`apl_block`'s rows summed over every block (all labels).
    pieces
        For each large label cut into :data:`PIECE` rows, its pieces'
        :func:`apl_block` rows summed (their ``D`` and ``B`` are this
        label's).
    p
        Covariate coefficients.

    Returns
    -------
    numpy.ndarray
        ``(3, n_genes)``.
    """
    pp = p * p
    o_a, o_t = 6, 6 + 3 * pp
    o_d = o_t + 3 * pp
    o_b = o_d + 3
    n = whole.shape[1]
    logd = whole[3:6].copy()
    a = whole[o_a:o_t].reshape(3, p, p, n)
    t = whole[o_t:o_d].reshape(3, p, p, n).copy()
    for part in pieces:
        d = part[o_d : o_d + 3]
        b = part[o_b : o_b + 3 * p].reshape(3, p, n)
        with np.errstate(divide="ignore", invalid="ignore"):
            q1 = d[1] / d[0]
            logd += np.stack([np.log(d[0]), q1, d[2] / d[0] - q1 * q1])
        t += _outer_terms(d, b)
    c = np.moveaxis(a - t, -1, 1)  # (3, n, p, p)
    valid = np.isfinite(c).all(axis=(0, 2, 3))  # genes not evaluated (inactive) are zeros or NaN
    c = np.where(valid[None, :, None, None], c, np.eye(p))
    sign, logdet = np.linalg.slogdet(c[0])
    valid &= sign > 0
    inv = np.linalg.inv(np.where(valid[:, None, None], c[0], np.eye(p)))
    m1 = inv @ c[1]
    first = np.trace(m1, axis1=1, axis2=2)
    second = np.trace(inv @ c[2], axis1=1, axis2=2) - np.einsum("nij,nji->n", m1, m1)
    out = -0.5 * np.stack([logd[0] + logdet, logd[1] + first, logd[2] + second])
    return np.where(valid, out, np.nan)

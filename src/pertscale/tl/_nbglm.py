"""Negative-binomial GLM's dispersions over row blocks: DESeq2's steps, each a public call.

The steps, in PyDESeq2's order, each storing what the next one needs in
``var`` and in the record ``uns['pertscale']['dispersion']``:

1. :func:`pertscale.pp.size_factors` (``obs['size_factors']``);
2. :func:`fit_genewise_dispersions`: starting values (one pass), then
   Newton passes on the Cox-Reid adjusted profile likelihood (each pass
   adds up every block's value, gradient and curvature per gene);
3. :func:`fit_dispersion_trend`: the parametric trend (no pass);
4. :func:`fit_dispersion_prior`: the log-normal prior's variance (no pass);
5. :func:`fit_map_dispersions`: Newton passes on the posterior, and
   DESeq2's dispersion outliers.

:func:`dispersions` runs steps 2-5 in order, reading the blocks the way
both fits share (one starting pass, the prepared blocks kept when they fit
in memory). Each pass is one plain ``dask.compute`` on Dask's current
scheduler (the face's context, a ``distributed.Client``, or Dask's default
threads): the reductions a step needs to build its next pass. No block is
held from one pass to the next unless ``cache``. The arithmetic is in
:mod:`pertscale.kernels.nbglm`.
"""

from __future__ import annotations

import logging
import warnings

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._deprecation import renamed_arguments
from .._validation import as_actual, check_number, check_shape, get_matrix, label_list, perturbation_labels
from ..io._read import as_dask
from ..variables import (
    BASE_MEAN,
    DISPERSION,
    DISPERSION_CONVERGED,
    DISPERSION_GENEWISE,
    DISPERSION_GENEWISE_CONVERGED,
    DISPERSION_GENEWISE_CURVATURE,
    DISPERSION_OUTLIER,
    DISPERSION_TREND,
    DISPERSIONS_TABLE,
    GENEWISE_TABLE,
)
from ._engine import Groups, aligned

logger = logging.getLogger(__name__)

#: Dispersion estimation methods.
DISPERSION_METHODS = ("cox-reid", "moments")
#: Newton steps in log dispersion are at most this long.
MAX_STEP = 3.0
#: The record of the dispersion steps: ``uns['pertscale'][RECORD]``.
RECORD = "dispersion"
#: The dispersion steps in order, as the record's ``steps`` lists those done.
STEPS = ("genewise", "trend", "prior", "map")
#: What each step makes, and where (named in the errors of the steps after it).
MADE = {
    "genewise": "gene-wise dispersions (var['dispersion_genewise'])",
    "trend": "the dispersion trend (var['dispersion_trend'])",
    "prior": "the dispersion prior (uns['pertscale']['dispersion']['prior_variance'])",
    "map": "the final dispersions (var['dispersion'])",
}
#: The ``var`` columns each step writes (and the ones after it read).
COLUMNS = {
    "genewise": GENEWISE_TABLE,
    "trend": (DISPERSION_TREND,),
    "prior": (),
    "map": (DISPERSION, DISPERSION_OUTLIER, DISPERSION_CONVERGED),
}
#: The columns :func:`dispersions` returns (all written to ``var``).
TABLE = DISPERSIONS_TABLE


def _group_sizes(codes: np.ndarray) -> np.ndarray:
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    return np.diff(np.r_[starts, codes.shape[0]])


def _run_starts(codes: np.ndarray) -> np.ndarray:
    """Each run's group code, in the order of the block's rows."""
    codes = np.asarray(codes)
    return codes[np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])] if codes.size else codes


def _prepare(block, codes, sf, lev=None, kinds=None, genes=None):
    """A block as the dispersion kernels take it.

    Returns its counts by gene (of ``genes`` only, if given), its group sizes
    (None: a piece of a large group), ``genes``, and for the additive design
    each row's level combination and each group's kind (else None).
    """
    from ..kernels.nbglm import count_columns

    sizes = None if codes is None else _group_sizes(np.asarray(codes))
    block = sp.csr_matrix(block)
    if genes is not None:
        block = block[:, genes]
    return count_columns(block, np.asarray(sf)), sizes, genes, lev, kinds


def _moments(prepared):
    from ..kernels.nbglm import dispersion_moments_block

    cols, sizes = prepared[:2]
    if sizes is None:  # a piece of a large group: its sums of z and z^2
        z = sp.csc_matrix((cols.z, cols.rows, cols.ptr), shape=cols.shape)
        return np.stack([np.asarray(z.sum(axis=0)).ravel(), np.asarray(z.multiply(z).sum(axis=0)).ravel()])
    if sizes.size == 0:
        return np.zeros((4, cols.shape[1]))
    return dispersion_moments_block(cols, sizes)


def _likelihood(prepared, alphas, means, min_mu, active):
    """Value, gradient, curvature (and W terms of pieces): ``(n_points, 6, n_genes)`` for each row of ``alphas``."""
    from ..kernels.nbglm import dispersion_apl_block

    cols, sizes, genes = prepared[:3]
    piece = sizes is None
    out = np.zeros((alphas.shape[0], 6, alphas.shape[1]))
    if not piece and sizes.size == 0:
        return out
    if genes is not None:  # prepared for these genes only (the others are not active)
        alphas, active = alphas[:, genes], active[genes]
        means = None if means is None else means[:, genes]
    for k, alpha in enumerate(alphas):
        got = dispersion_apl_block(
            cols,
            np.array([cols.shape[0]]) if piece else sizes,
            None,
            alpha,
            means=means if piece else None,
            min_mu=min_mu,
            active=active,
        )
        if genes is None:
            out[k] = got
        else:
            out[k][:, genes] = got
    return out


def _total(*parts):
    return sum(parts[1:], parts[0].copy())


def _rows_of_groups(prepared):
    cols, sizes = prepared[:2]
    sizes = np.array([cols.shape[0]]) if sizes is None else sizes
    return sizes, np.repeat(np.arange(sizes.size), sizes)


def _additive_sums(prepared, design):
    """Pass one of the additive design: ``(3 + 2p, n_genes)`` sums for the moments and the least squares fit.

    Rows: ``sum z``, ``sum z^2``, ``sum_i c_i z_i`` (``p``), over the whole
    labels ``sum_k n_k^-1 (sum_{i in k} c_i) (sum_{i in k} z_i)`` (``p``), and
    ``sum z`` of the pieces of a large label (``z = y / s``).
    """
    from ..kernels.nbglm import PIECE, WHOLE

    cols, _, _, lev, kinds = prepared
    sizes, group = _rows_of_groups(prepared)
    n_rows, n_genes = cols.shape
    p = design.shape[1]
    z = sp.csc_matrix((cols.z, cols.rows, cols.ptr), shape=cols.shape)
    x = design[lev]
    ind = sp.csr_matrix((np.ones(n_rows), (group, np.arange(n_rows))), shape=(sizes.size, n_rows))
    zs = (ind @ z).toarray()
    out = np.zeros((3 + 2 * p, n_genes))
    out[0], out[1] = zs.sum(axis=0), np.asarray(z.multiply(z).sum(axis=0)).ravel()
    out[2 : 2 + p] = np.asarray(z.T @ x).T
    whole = kinds == WHOLE
    out[2 + p : 2 + 2 * p] = ((ind @ x)[whole] / sizes[whole, None]).T @ zs[whole]
    out[2 + 2 * p] = zs[kinds == PIECE].sum(axis=0)
    return out


def _additive_rough(prepared, design, state):
    """Pass two: DESeq2's rough estimate's numerator ``sum_i ((z_i - m_i)^2 - m_i) / m_i^2`` (``n_genes``).

    ``m_i`` is the least squares fit of ``z`` on the design, at least 1
    (``roughDispEstimate``): each whole label's coefficient from its sums
    given ``gamma``; a piece's from ``beta_given``; ``state = (gamma,
    beta_given)``.
    """
    from ..kernels.nbglm import PIECE, WHOLE

    gamma, beta_given = state
    cols, _, _, lev, kinds = prepared
    sizes, group = _rows_of_groups(prepared)
    n_rows, n_genes = cols.shape
    n_levels = design.shape[0]
    key = group * n_levels + lev
    n_keys = sizes.size * n_levels
    ind = sp.csr_matrix((np.ones(n_rows), (key, np.arange(n_rows))), shape=(n_keys, n_rows))
    count = np.bincount(key, minlength=n_keys).astype(np.float64)
    z = sp.csc_matrix((cols.z, cols.rows, cols.ptr), shape=cols.shape)
    zsum, zsq = (ind @ z).tocsc(), (ind @ z.multiply(z)).tocsc()
    bk = count.reshape(sizes.size, n_levels) @ design  # (n_groups, p)
    keep = count > 0
    whole = kinds == WHOLE
    out = np.zeros(n_genes)
    for lo in range(0, n_genes, 512):  # genes in slices: (groups x levels x genes) would be large
        hi = min(n_genes, lo + 512)
        zl, ql = zsum[:, lo:hi].toarray(), zsq[:, lo:hi].toarray()
        g = gamma[:, lo:hi]
        beta = np.zeros((sizes.size, hi - lo))
        zg = zl.reshape(sizes.size, n_levels, -1).sum(axis=1)
        beta[whole] = (zg[whole] - bk[whole] @ g) / sizes[whole, None]
        beta[kinds == PIECE] = beta_given[lo:hi]
        m = np.maximum((design @ g)[None] + beta[:, None], 1.0).reshape(n_keys, -1)[keep]
        c, zl, ql = count[keep, None], zl[keep], ql[keep]
        out[lo:hi] = ((ql - 2.0 * m * zl + c * m * m - c * m) / (m * m)).sum(axis=0)
    return out


def _state_for(prepared, state, active):
    """The additive state ``(gamma, the pieces' coefficient, alpha_fit)`` and ``active``, of the prepared genes."""
    genes = prepared[2]
    if genes is None:
        return state, active
    gamma, beta, alpha_fit = state
    return (gamma[:, genes], beta[genes], alpha_fit[genes]), active[genes]


def _scatter(got: np.ndarray, genes, n_genes: int) -> np.ndarray:
    """``got`` of the prepared genes, as all genes' (zeros elsewhere)."""
    if genes is None:
        return got
    out = np.zeros(got.shape[:-1] + (n_genes,))
    out[..., genes] = got
    return out


def _additive_glm(prepared, design, active, state):
    """A GLM pass's share: ``(p + p*p + 2 + p, n_genes)`` profile gradient and information, and the pieces' terms."""
    from ..kernels.nbglm import glm_block

    cols, sizes, genes, lev, kinds = prepared
    sizes = np.array([cols.shape[0]]) if sizes is None else sizes
    (gamma, beta, alpha_fit), act = _state_for(prepared, state, active)
    grad, info, piece = glm_block(cols, sizes, kinds, lev, design, gamma, beta, alpha_fit, act)
    return _scatter(np.concatenate([grad, info.reshape(-1, grad.shape[1]), piece]), genes, active.shape[0])


def _additive_likelihood(prepared, design, alphas, min_mu, active, state):
    """``(n_points, apl_size(p), n_genes)``: the additive design's likelihood terms at each row of ``alphas``."""
    from ..kernels.nbglm import apl_block

    cols, sizes, genes, lev, kinds = prepared
    sizes = np.array([cols.shape[0]]) if sizes is None else sizes
    (gamma, beta, alpha_fit), act = _state_for(prepared, state, active)
    return np.stack(
        [
            _scatter(
                apl_block(
                    cols,
                    sizes,
                    kinds,
                    lev,
                    design,
                    gamma,
                    beta,
                    alpha_fit,
                    alpha if genes is None else alpha[genes],
                    min_mu=min_mu,
                    active=act,
                ),
                genes,
                alphas.shape[1],
            )
            for alpha in alphas
        ]
    )


#: Prepared blocks are kept in memory between passes when they take less than this share of the available memory.
CACHE_FRACTION = 0.25


class _Layout:
    """The cells of every label in blocks, as the dispersion kernels take them.

    Groups up to a block's length are whole in a block (:func:`aligned`);
    longer ones (the control) are cut into pieces whose group means come
    from the first pass. Each block is read and turned into
    :class:`~pertscale.kernels.nbglm.CountColumns` once per pass (of the
    genes still being fitted only, once they are fewer than half), or once
    in all when the prepared blocks fit in memory (``cache``).
    """

    def __init__(
        self,
        x: da.Array,
        labels: pd.Series,
        size_factors: np.ndarray,
        *,
        cache: bool,
        levels: np.ndarray | None = None,
        design: np.ndarray | None = None,
    ) -> None:
        from ..kernels.nbglm import PIECE, REFERENCE, WHOLE

        budget = int(max(x.chunks[0]))
        codes, names = pd.factorize(labels.to_numpy(), sort=False)
        sizes = np.bincount(codes, minlength=len(names))
        self.n_cells = int(codes.size)
        #: the additive design's covariate part ``(n_levels, p)`` (None: one group per label, linear-model means)
        self.design = design
        reference = int(np.argmax(sizes))  # the additive design's reference label: the largest (the control)
        #: parameters of the design (DESeq2's ``ncol(modelMatrix)``)
        self.n_params = len(names) if design is None else design.shape[1] + len(names) - 1
        #: the additive design's state once fitted: gamma ``(p, n_genes)``, the large labels' coefficients, alpha_fit
        self.state: tuple | None = None
        if design is not None:
            n_levels = design.shape[0]
            counts = np.bincount(codes * n_levels + levels, minlength=len(names) * n_levels)
            counts = counts.reshape(len(names), n_levels).astype(np.float64)
            bk = counts @ design  # (n_labels, p): sum_{i in k} c_i
            others = np.arange(len(names)) != reference
            #: the least squares normal matrix of the covariate coefficients, the labels' own profiled out
            self.ls_matrix = design.T @ (counts.sum(axis=0)[:, None] * design) - (
                bk[others].T @ (bk[others] / sizes[others, None])
            )
        #: mean of ``1 / s`` over the layout's cells (DESeq2's moments estimate)
        self.inv_size_factor_mean = float(np.mean(1.0 / np.asarray(size_factors, dtype=np.float64)))
        self.n_groups = len(names)
        self.n_genes = int(x.shape[1])
        large = sizes > budget
        self.large_rows = [np.flatnonzero(codes == g) for g in np.flatnonzero(large)]
        if design is not None:
            # the large labels other than the reference: their coefficients are the caller's (Newton on them)
            self.ls_matrix += sum(
                bk[g][:, None] * bk[g][None] / sizes[g] for g in np.flatnonzero(large) if g != reference
            )  # (added back: they are not profiled in a block)
            self.large_counts = [(float(sizes[g]), bk[g]) for g in np.flatnonzero(large)]
        self.small: list = []
        self.pieces: list[list] = []
        if (~large[codes]).any():
            small = np.flatnonzero(~large)
            remap = np.full(len(names), -1, dtype=np.int32)
            remap[small] = np.arange(small.size, dtype=np.int32)
            groups = Groups(
                names=[str(names[g]) for g in small],
                codes=np.where(large[codes], -1, remap[codes]).astype(np.int32),
                sizes=sizes[small].astype(np.int64),
                control_rows=np.empty(0, dtype=np.int64),
            )
            lay = aligned(x, groups, budget=budget)
            bounds = np.cumsum((0,) + lay.x.chunks[0])
            blocks = lay.x.to_delayed().ravel()
            kind_of = np.where(small == reference, REFERENCE, WHOLE)
            self._small_inputs = [
                (b, lay.codes[lo:hi], size_factors[lay.rows[lo:hi]])
                + (() if design is None else (levels[lay.rows[lo:hi]], kind_of[_run_starts(lay.codes[lo:hi])]))
                for b, lo, hi in zip(blocks, bounds[:-1], bounds[1:], strict=True)
            ]
            self.small = [dask.delayed(_prepare)(*inputs) for inputs in self._small_inputs]
        self._piece_inputs = []
        #: each large label's kind (the reference's pieces have no coefficient of their own)
        self.large_kinds = [REFERENCE if g == reference else PIECE for g in np.flatnonzero(large)]
        for rows, kind in zip(self.large_rows, self.large_kinds, strict=True):
            contiguous = rows[-1] - rows[0] + 1 == rows.size
            piece = (x[int(rows[0]) : int(rows[-1]) + 1] if contiguous else x[rows]).rechunk({0: budget, 1: -1})
            bounds = np.cumsum((0,) + piece.chunks[0])
            inputs = [
                (b, None, size_factors[rows[lo:hi]])
                + (() if design is None else (levels[rows[lo:hi]], np.array([kind])))
                for b, lo, hi in zip(piece.to_delayed().ravel(), bounds[:-1], bounds[1:], strict=True)
            ]
            self._piece_inputs.append(inputs)
            self.pieces.append([dask.delayed(_prepare)(*i) for i in inputs])
        #: ``(1, n_genes)`` mean of ``y / s`` of each large group, from the first pass (:meth:`piece_means`).
        self.large_means: list | None = None
        self.cache = cache
        if cache:  # computed here, and kept (in the workers' memory with a distributed scheduler)
            kept = _persist(*self.small, *[p for pieces in self.pieces for p in pieces])
            self.small, rest = list(kept[: len(self.small)]), list(kept[len(self.small) :])
            self.pieces = [[rest.pop(0) for _ in pieces] for pieces in self.pieces]

    def moments(self):
        """Pass one: ``(4, n_genes)`` sums over whole groups, and ``(2, n_genes)`` per large group."""
        todo = [dask.delayed(_total)(*[dask.delayed(_moments)(p) for p in self.small])] if self.small else []
        todo += [dask.delayed(_total)(*[dask.delayed(_moments)(p) for p in pieces]) for pieces in self.pieces]
        got = list(dask.compute(*todo))
        small = got.pop(0) if self.small else None
        self.large_means = [(s1 / float(rows.size))[None] for rows, (s1, _) in zip(self.large_rows, got, strict=True)]
        return small, got

    def piece_means(self) -> list:
        """Each large group's ``(1, n_genes)`` mean of ``y / s``: from :meth:`moments`, or a pass over those groups."""
        if self.large_means is None:
            todo = [dask.delayed(_total)(*[dask.delayed(_moments)(p) for p in pieces]) for pieces in self.pieces]
            got = dask.compute(*todo) if todo else ()
            self.large_means = [
                (s1 / float(rows.size))[None] for rows, (s1, _) in zip(self.large_rows, got, strict=True)
            ]
        return self.large_means

    def _blocks(self, active):
        """The prepared blocks of a pass: kept ones, or read again for the active genes only when few are left."""
        if self.cache or active is None or active.sum() >= 0.5 * self.n_genes:
            return self.small, self.pieces
        genes = np.flatnonzero(active)
        small = [dask.delayed(_prepare)(*inputs, genes=genes) for inputs in getattr(self, "_small_inputs", [])]
        pieces_all = [[dask.delayed(_prepare)(*i, genes=genes) for i in inputs] for inputs in self._piece_inputs]
        return small, pieces_all

    def _sums(self, fn, *args, active=None, state=None):
        """One pass of ``fn(prepared, *args[, state(k)])`` summed: over the small blocks (or None), per large label.

        ``state(k)`` (``k`` None for the small blocks, else the large label's
        index) is put into the pass's graph once, not once per block.
        """
        small, pieces_all = self._blocks(active)

        def part(blocks, k):
            extra = () if state is None else (dask.delayed(state(k), traverse=False),)
            return dask.delayed(_total)(*[dask.delayed(fn)(b, *args, *extra) for b in blocks])

        todo = ([part(small, None)] if small else []) + [part(p, k) for k, p in enumerate(pieces_all)]
        got = list(dask.compute(*todo))
        return (got.pop(0) if small else None), got

    def _piece_labels(self) -> list[int]:
        from ..kernels.nbglm import PIECE

        return [k for k, kind in enumerate(self.large_kinds) if kind == PIECE]

    def _large_beta(self, theta: np.ndarray, p: int) -> np.ndarray:
        beta = np.zeros((len(self.large_kinds), self.n_genes))
        for m, k in enumerate(self._piece_labels()):
            beta[k] = theta[p + m]
        return beta

    def additive_start(self):
        """Two passes: DESeq2's starting dispersions of the additive design, and each gene's mean of ``y / s``.

        Pass one: the moments and the least squares fit of ``z = y / s`` on the
        design (``linearModelMu``); pass two: the rough estimate's residuals
        from that fit (``roughDispEstimate``). Returns ``(start, base_mean)``.
        """
        from ..kernels.nbglm import starting_dispersions

        design = self.design
        p = design.shape[1]
        small, large = self._sums(_additive_sums, design)
        total = sum(large, small if small is not None else np.zeros((3 + 2 * p, self.n_genes)))
        pieces = self._piece_labels()
        # the least squares system in gamma and the large labels' coefficients (the others profiled out)
        q = p + len(pieces)
        matrix = np.zeros((q, q))
        matrix[:p, :p] = self.ls_matrix
        rhs = np.zeros((q, self.n_genes))
        rhs[:p] = total[2 : 2 + p] - total[2 + p : 2 + 2 * p]
        for m, k in enumerate(pieces):
            n_k, b_k = self.large_counts[k]
            matrix[:p, p + m] = matrix[p + m, :p] = b_k
            matrix[p + m, p + m] = n_k
            rhs[p + m] = large[k][2 + 2 * p]
        theta = np.linalg.lstsq(matrix, rhs, rcond=None)[0]
        gamma, beta = theta[:p], self._large_beta(theta, p)
        small, large = self._sums(
            _additive_rough, design, state=lambda k: (gamma, np.zeros(self.n_genes) if k is None else beta[k])
        )
        rough = sum(large, small if small is not None else np.zeros(self.n_genes))
        sums = np.stack([total[0], total[1], rough, np.full(self.n_genes, float(self.n_params))])
        return starting_dispersions(sums, self.inv_size_factor_mean, self.n_cells), total[0] / self.n_cells

    def fit_means(self, alpha_fit: np.ndarray, base_mean: np.ndarray, *, max_iter: int = 100, tol: float = 1e-8):
        """The additive design's NB GLM at ``alpha_fit``, by Fisher scoring passes (DESeq2's ``fitNbinomGLMs``).

        Every label's own coefficient is solved in its block given the
        covariate coefficients (``gamma``); a pass adds up the profile's
        gradient and information in ``gamma`` (and in the coefficients of
        labels cut into pieces), and a step is taken per gene, coefficients
        within ``+-BOUND``, until every step is below ``tol``. The means are
        not floored while fitting (DESeq2's IRLS floors them at ``minmu``
        inside its iterations; the dispersion fit floors them here too).
        Genes with ``alpha_fit`` NaN (no count) are left out. Sets
        :attr:`state`; returns whether each gene converged.
        """
        from ..kernels.nbglm import BOUND

        design = self.design
        p = design.shape[1]
        n = self.n_genes
        pieces = self._piece_labels()
        q = p + len(pieces)
        expressed = np.isfinite(alpha_fit)
        alpha = np.where(expressed, alpha_fit, 1.0)
        theta = np.zeros((q, n))
        theta[0] = np.log(np.maximum(base_mean, np.exp(-BOUND)))
        active = expressed.copy()
        converged = ~expressed
        zeros = np.zeros(n)
        for _ in range(max_iter):
            if not active.any():
                break
            gamma, beta = theta[:p].copy(), self._large_beta(theta, p)
            small, large = self._sums(
                _additive_glm,
                design,
                active,
                active=active,
                state=lambda k, gamma=gamma, beta=beta: (gamma, zeros if k is None else beta[k], alpha),
            )
            got = sum(large, small.copy() if small is not None else np.zeros_like(large[0]))
            h = np.zeros((n, q, q))
            g = np.zeros((n, q))
            h[:, :p, :p] = np.moveaxis(got[p : p + p * p].reshape(p, p, n), -1, 0)
            g[:, :p] = got[:p].T
            for m, k in enumerate(pieces):
                piece = large[k][p + p * p :]
                g[:, p + m] = piece[0]
                h[:, p + m, p + m] = piece[1]
                h[:, :p, p + m] = h[:, p + m, :p] = piece[2 : 2 + p].T
            idx = np.flatnonzero(active)
            step = np.zeros((q, n))
            ridge = 1e-12 * np.abs(np.diagonal(h[idx], axis1=1, axis2=2)).max(axis=1) + 1e-300
            step[:, idx] = np.linalg.solve(h[idx] + ridge[:, None, None] * np.eye(q), g[idx][:, :, None])[:, :, 0].T
            new = np.clip(theta + np.clip(step, -MAX_STEP, MAX_STEP), -BOUND, BOUND)
            # a coefficient whose cells have no count (score = -information) heads to -inf by about one a pass:
            # it goes to -BOUND at once (its means then far below min_mu, where the dispersion fit floors them)
            diag = np.diagonal(h, axis1=1, axis2=2).T  # (q, n)
            empty = (g.T < 0) & (np.abs(g.T + diag) <= 1e-10 * diag)
            new = np.where(empty, -BOUND, new)
            done = active & (np.abs(new - theta).max(axis=0) < tol)
            theta[:, active] = new[:, active]
            converged |= done
            active &= ~done
        self.state = (theta[:p].copy(), self._large_beta(theta, p), np.where(expressed, alpha_fit, np.nan))
        return converged

    def _additive(self, alphas, min_mu, active):
        """One pass of the additive design: ``(n_points, 3, n_genes)``."""
        from ..kernels.nbglm import PIECE, cox_reid_term

        gamma, beta, alpha_fit = self.state
        fit = np.where(np.isfinite(alpha_fit), alpha_fit, 1.0)
        zeros = np.zeros(self.n_genes)
        small, large = self._sums(
            _additive_likelihood,
            self.design,
            alphas,
            min_mu,
            active,
            active=active,
            state=lambda k: (gamma, zeros if k is None else beta[k], fit),
        )
        whole = sum(large, small.copy() if small is not None else np.zeros_like(large[0]))
        out = np.zeros((alphas.shape[0], 3, alphas.shape[1]))
        for m in range(alphas.shape[0]):
            pieces = [part[m] for part, kind in zip(large, self.large_kinds, strict=True) if kind == PIECE]
            out[m] = whole[m, :3] + cox_reid_term(whole[m], pieces, self.design.shape[1])
        return out

    def likelihood(self, alphas, min_mu, active):
        """One pass: ``(n_points, 3, n_genes)`` value, gradient, curvature summed over every group."""
        if self.design is not None:
            return self._additive(alphas, min_mu, active)
        means = self.piece_means()
        small, pieces_all = self._blocks(active)
        todo = []
        if small:
            todo.append(
                dask.delayed(_total)(*[dask.delayed(_likelihood)(p, alphas, None, min_mu, active) for p in small])
            )
        for pieces, m in zip(pieces_all, means, strict=True):
            todo.append(
                dask.delayed(_total)(*[dask.delayed(_likelihood)(p, alphas, m, min_mu, active) for p in pieces])
            )
        got = dask.compute(*todo)
        total = np.zeros((alphas.shape[0], 3, alphas.shape[1]))
        for k, part in enumerate(got):
            total += part[:, :3]
            if k >= bool(self.small):  # a large group: its Cox-Reid term from its summed W
                w, w1, w2 = part[:, 3], part[:, 4], part[:, 5]
                with np.errstate(divide="ignore", invalid="ignore"):
                    total[:, 0] -= 0.5 * np.log(w)
                    total[:, 1] -= 0.5 * w1 / w
                    total[:, 2] -= 0.5 * (w2 / w - (w1 / w) ** 2)
        return total


def _persist(*objects) -> list:
    """Compute and keep ``objects``: on the workers of the face's ``distributed.Client``, else in this process.

    ``dask.persist`` under the face's scheduler function (``ps.cluster.using``)
    would gather the results into this process and put them into every later
    graph; the client's own ``persist`` keeps them where they were computed.
    """
    try:
        from distributed import Client

        client = Client.current(allow_global=False)  # the one a face made current (``as_current``)
    except (ImportError, ValueError):
        client = None
    if client is None:
        return list(dask.persist(*objects))
    return list(client.persist(list(objects)))


#: Bytes a non-zero takes in memory: prepared (CountColumns: its row, ``y`` and ``y / s``, with room to spare) and
#: as a raw CSR block (value and column index).
PREPARED_BYTES, RAW_BYTES = 28, 12


def _density(x: da.Array) -> float:
    """The share of non-zeros in ``x``'s first block (one block read, on the face's scheduler)."""
    (first,) = dask.compute(x.blocks[0, 0])
    return (first.nnz if sp.issparse(first) else np.count_nonzero(first)) / max(1, first.shape[0] * first.shape[1])


def _fits_in_memory(n_nonzero: float, bytes_per_nonzero: int) -> bool:
    """Whether ``n_nonzero`` non-zeros fit :data:`CACHE_FRACTION` of the available memory."""
    import psutil

    return n_nonzero * bytes_per_nonzero < psutil.virtual_memory().available * CACHE_FRACTION


def _newton(evaluate, a0, *, lower, upper, max_iter, tol, prior=None):
    """Maximize, per gene, a function of ``a = log alpha`` whose value, gradient and curvature ``evaluate`` gives.

    ``evaluate(a[None], active)`` returns ``(1, 3, n_genes)`` (one pass).
    Newton steps, at most :data:`MAX_STEP` long; where the curvature is
    not negative, a step of that length uphill; where the function flattens
    out towards small dispersions like ``c exp(a)`` (gradient equal to
    curvature, both negative: Newton would creep down one unit a pass), a
    jump to ``lower``. A step that lowers the value is halved back. A gene is
    done when its step in ``a`` is below ``tol`` (a test independent of the
    counts' scale: the value itself grows with them). ``prior = (center, variance)`` adds a normal prior on
    ``a``. Returns ``(a, curvature at a, converged)``.
    """
    n = a0.shape[0]
    active = np.isfinite(a0)
    best = np.where(active, a0, np.nan)
    value = np.full(n, -np.inf)
    curv = np.full(n, np.nan)
    trial = best.copy()
    converged = ~active
    for _ in range(max_iter):
        if not active.any():
            break
        v, g, h = evaluate(np.where(active, trial, 1.0)[None], active)[0]
        if prior is not None:
            center, var = prior
            d = trial - center
            v, g, h = v - d * d / (2.0 * var), g - d / var, h - 1.0 / var
        worse = active & (v < value - 1e-12 * np.abs(value))
        # worse than the last accepted point: go half way back and evaluate again
        trial[worse] = 0.5 * (trial[worse] + best[worse])
        done_back = worse & (np.abs(trial - best) < tol)
        converged |= done_back
        active &= ~done_back
        ok = active & ~worse
        best[ok], value[ok], curv[ok] = trial[ok], v[ok], h[ok]
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.where(h < 0, -g / h, np.sign(g) * MAX_STEP)
            tail = (g < 0) & (h < 0) & (np.abs(g - h) < 0.05 * np.abs(g)) & (prior is None)
        step = np.clip(step, -MAX_STEP, MAX_STEP)
        new = np.where(tail, lower, np.clip(best + step, lower, upper))
        small = np.abs(new - best) < tol  # on the step alone: the value's size grows with the counts
        finished = ok & small
        converged |= finished
        active &= ~finished
        trial[ok & ~small] = new[ok & ~small]
    return best, curv, converged


def _evaluator(layout: _Layout, min_mu: float):
    def evaluate(a, active):
        """``(n_points, 3, n_genes)`` for ``a`` of shape ``(n_points, n_genes)``; one pass."""
        return layout.likelihood(np.exp(a), min_mu, active)

    return evaluate


# --------------------------------------------------------------------------- the record of the steps

#: The public call of each step.
CALLS = {
    "genewise": "ps.tl.fit_genewise_dispersions",
    "trend": "ps.tl.fit_dispersion_trend",
    "prior": "ps.tl.fit_dispersion_prior",
    "map": "ps.tl.fit_map_dispersions",
}


def _record(adata: ad.AnnData) -> dict:
    """A copy of ``uns['pertscale']['dispersion']`` (empty without one)."""
    root = adata.uns.get("pertscale") or {}
    return dict(root.get(RECORD) or {})


def _done(adata: ad.AnnData, record: dict) -> list[str]:
    """The steps the record lists whose outputs are all present."""
    if "steps" in record:
        listed = str(record["steps"]).split(",")
    else:  # written by pertscale before its steps were public: the final dispersions only
        listed = ["map"] if "prior_variance" in record else []
    return [
        s
        for s in listed
        if s in STEPS
        and all(c in adata.var for c in COLUMNS[s])
        and (s != "prior" or {"prior_variance", "squared_logres"} <= set(record))
    ]


def _column(record: dict) -> str:
    """``perturbation_column=...`` as the calls in messages spell it."""
    column = repr(str(record["perturbation_column"])) if record.get("perturbation_column") else "..."
    return f"perturbation_column={column}"


def _genewise_call(record: dict) -> str:
    """The gene-wise fit's call with the options its record holds (those that are not the defaults)."""
    options = {
        "covariates": [c for c in str(record.get("covariates", "")).split(",") if c] or None,
        "method": None if str(record.get("method", "cox-reid")) == "cox-reid" else str(record["method"]),
        "layer": None if str(record.get("layer", "X")) == "X" else str(record["layer"]),
    }
    args = "".join(f", {k}={v!r}" for k, v in options.items() if v is not None)
    return f"ps.tl.fit_genewise_dispersions(adata, {_column(record)}{args})"


def _first_call(record: dict, when: str) -> str:
    return f"{_genewise_call(record)} {when} (or ps.tl.dispersions(adata, {_column(record)}) for every step)"


def _requires(adata: ad.AnnData, step: str) -> dict:
    """The record, checked to hold every step before ``step``.

    Raises
    ------
    ValueError
        Naming the first step missing and the call that makes it.
    """
    record = _record(adata)
    done = _done(adata, record)
    for before in STEPS[: STEPS.index(step)]:
        if before not in done:
            fix = _first_call(record, "first") if before == "genewise" else f"{CALLS[before]}(adata) first"
            raise ValueError(f"{CALLS[step]} needs {MADE[before]}: run {fix}")
    return record


def _write(adata: ad.AnnData, table: pd.DataFrame | None, record: dict, step: str) -> None:
    """Store a step's columns in ``var`` and its record; the steps after it are no longer listed as done."""
    as_actual(adata)  # a view becomes an actual AnnData (a copy), as scanpy's: its parent is not written to
    for column in () if table is None else table:
        adata.var[column] = table[column].to_numpy()
    record["steps"] = ",".join(STEPS[: STEPS.index(step) + 1])
    adata.uns.setdefault("pertscale", {})[RECORD] = record


def _digest(values: np.ndarray) -> str:
    from ..analysis import array_digest

    return array_digest(np.asarray(values, dtype=np.float64))


# --------------------------------------------------------------------------- opening the data


def _check_fit_options(adata: ad.AnnData, *, max_iter, tol, min_mu=None):
    """``max_iter``, ``tol`` (and ``min_mu``), checked; the message gives the range and why."""
    max_iter = check_number(max_iter, "max_iter", integer=True, minimum=1)
    tol = check_number(
        tol,
        "tol",
        minimum=0,
        min_open=True,
        maximum=MAX_STEP,
        max_open=True,
        why=f"a Newton step in log alpha is at most {MAX_STEP:g} long, so a larger tol would end every fit at "
        "its starting value, marked as converged; 1e-3 (the dispersion to 0.1 %) is usual",
    )
    if min_mu is not None:
        # alpha mu^2, the NB variance's second term, for alpha up to max(10, n_obs) (the upper bound of the fits)
        # and mu >= min_mu, must stay a finite float64
        largest_mu = float(np.sqrt(np.finfo(np.float64).max / max(10.0, float(adata.n_obs))))
        largest_mu = 10.0 ** np.floor(np.log10(largest_mu))  # a power of ten below it, to name in the message
        min_mu = check_number(
            min_mu,
            "min_mu",
            minimum=0,
            min_open=True,
            maximum=largest_mu,
            why="the fitted means are at least min_mu, and the negative-binomial variance alpha x mu^2 (alpha up to "
            "max(10, n_obs)) must stay a finite float64; 0.5 as DESeq2, or 1e-6 for single cells",
        )
    return max_iter, tol, min_mu


def _design_labels(adata: ad.AnnData, perturbation_column: str, covariates: list[str]) -> pd.Series:
    """Each cell's group: its label, within its level of the covariates (the sample's strata; a design of groups)."""
    labels = perturbation_labels(adata.obs, perturbation_column)
    if covariates:
        codes, _ = covariate_levels(adata.obs, covariates)
        labels = pd.Series(labels.to_numpy() + "\x1f" + codes.astype(str), index=labels.index)
    return labels


#: A sample keeping fewer cells of a group than this warns: the dispersions of sparse genes come out too high.
FEW_CELLS = 50


def dispersion_cells(labels: pd.Series, max_cells: int | None, seed: int, *, warn: bool = True) -> np.ndarray | None:
    """The cells the dispersion fits use: all (``None``), or a seeded sample stratified by the design's groups.

    Every group keeps ``min(its cells, k)`` cells, drawn without replacement
    by ``numpy.random.default_rng(seed)``, with the largest ``k`` for which
    they number at most ``max_cells``: small groups whole, large ones (the
    control) cut first. Returns the rows, ascending.

    Warns (``UserWarning``) when ``k`` is below :data:`FEW_CELLS` (unless
    not ``warn``: the same sample again).

    Raises
    ------
    ValueError
        If ``k`` would be below 2 (``max_cells`` under twice the groups).
    """
    if max_cells is None or max_cells >= labels.shape[0]:
        return None
    codes, _ = pd.factorize(labels.to_numpy(), sort=False)
    sizes = np.bincount(codes)
    order = np.sort(sizes)
    # the largest k with sum(min(sizes, k)) <= max_cells
    below = np.cumsum(order)
    k = 0
    for i, size in enumerate(order):
        room = (max_cells - (below[i - 1] if i else 0)) // (order.size - i)
        if room < size:
            k = int(room)
            break
    else:  # pragma: no cover - max_cells >= n_obs returned above
        return None
    if k < 2:
        raise ValueError(
            f"max_cells={max_cells} keeps fewer than 2 cells of each of the design's {sizes.size} groups: "
            f"give at least {2 * sizes.size} (2 a group), or leave it out to use every cell"
        )
    if k < FEW_CELLS and warn:
        warnings.warn(
            f"max_cells={max_cells} keeps {k} cells of each of the design's larger groups: with fewer than "
            f"{FEW_CELLS}, the dispersions of sparse genes come out too high (their groups' means, floored at min_mu, "
            "leave the zeros to the dispersion; measured in benchmarks/RESULTS.md); give more cells, or none",
            UserWarning,
            stacklevel=3,
        )
    rng = np.random.default_rng(seed)
    rows = []
    members = np.argsort(codes, kind="stable")
    starts = np.r_[0, np.cumsum(sizes)]
    for g in range(sizes.size):
        cells = members[starts[g] : starts[g + 1]]
        rows.append(cells if cells.size <= k else rng.choice(cells, size=k, replace=False))
    return np.sort(np.concatenate(rows)) if rows else None


def _additive(labels: pd.Series, codes: np.ndarray, levels: list[str], n_covariates: int) -> np.ndarray | None:
    """The covariate part of the design when DESeq2 would fit its means by a GLM, else None.

    DESeq2 takes the linear model's means (the group means of ``y / s``)
    when the design is one of groups, as many distinct rows as columns
    (``estimateDispersionsGeneEst``'s ``linearMu``); otherwise the GLM's.
    """
    design = additive_design(levels, n_covariates)
    label_codes, names = pd.factorize(labels.to_numpy(), sort=False)
    combos = np.unique(label_codes * len(levels) + codes)
    n_params = design.shape[1] + len(names) - 1
    # the design's distinct rows: the covariates' part, then an indicator of each label but the first
    x = np.zeros((combos.size, n_params))
    x[:, : design.shape[1]] = design[combos % len(levels)]
    label = combos // len(levels)
    x[label > 0, design.shape[1] + label[label > 0] - 1] = 1.0
    rank = int(np.linalg.matrix_rank(x))
    if rank < n_params:
        raise ValueError(
            f"the design ~ covariates + perturbation has rank {rank} for {n_params} coefficients: a covariate is "
            "confounded with the labels (some labels' cells lie only in levels that no other label shares, or the "
            "levels split the labels into separate sets); DESeq2 refuses such a design too: leave the covariate "
            "out, or drop those cells"
        )
    return None if combos.size == n_params else design


def _open(
    adata: ad.AnnData,
    perturbation_column: str,
    covariates: list[str],
    sf: np.ndarray,
    *,
    layer: str | None,
    cache: bool | None,
    rows=None,
) -> _Layout:
    """The matrix in blocks of whole groups (nothing read yet, unless ``cache``); of ``rows`` only, if given.

    Without covariates, or with a design of groups, a group is a label
    within a level of the covariates; otherwise a label, each cell with its
    level, and the design's means are fitted by the GLM.
    """
    x = as_dask(get_matrix(adata, layer))
    if x.numblocks[1] != 1:
        x = x.rechunk({1: -1})
    labels = _design_labels(adata, perturbation_column, covariates)
    codes = design = None
    if covariates:
        codes, levels = covariate_levels(adata.obs, covariates)
        plain = perturbation_labels(adata.obs, perturbation_column)
        picked = plain if rows is None else plain.iloc[rows]
        design = _additive(picked, codes if rows is None else codes[rows], levels, len(covariates))
        if design is not None:
            labels = plain
    auto = cache is None
    # the density of the whole matrix's first block: a sample's first block would read every block it spans
    density = _density(x) if auto else 0.0
    if rows is not None:
        x, labels, sf = x[rows], labels.iloc[rows], sf[rows]
        codes = None if codes is None else codes[rows]
    n_nonzero = float(x.shape[0]) * float(x.shape[1]) * density
    if auto:
        cache = _fits_in_memory(n_nonzero, PREPARED_BYTES)
        if rows is not None and not cache and _fits_in_memory(n_nonzero, RAW_BYTES):
            # a sample's rows are spread over the whole matrix: gathered once and kept (raw, smaller than prepared),
            # so that each pass does not read every block again
            (x,) = _persist(x)
    layout = _Layout(x, labels, sf, cache=cache, levels=codes if design is not None else None, design=design)
    layout.source = x  # kept: the blocks' graphs name a persisted sample's keys, which live while x does
    return layout


def _start(
    adata: ad.AnnData,
    perturbation_column: str,
    *,
    size_factors,
    covariates,
    method: str,
    min_mu,
    max_iter,
    tol,
    layer: str | None,
    cache: bool | None,
    max_cells: int | None = None,
    seed: int = 0,
) -> tuple[_Layout, np.ndarray, dict, tuple]:
    """Every check of the gene-wise fit, before any pass; the layout, size factors, record and checked options."""
    if method not in DISPERSION_METHODS:
        raise ValueError(f"dispersion method {method!r} is not supported; choose one of {DISPERSION_METHODS}")
    check_shape(adata)
    max_iter, tol, min_mu = _check_fit_options(adata, max_iter=max_iter, tol=tol, min_mu=min_mu)
    covariates = label_list(covariates, "covariates")  # a single string is one column, not its letters
    labels = _design_labels(adata, perturbation_column, covariates)
    sf = size_factor_values(adata, size_factors, needed_by="the dispersion fit", layer=layer)
    record = {
        "method": method,
        "min_mu": float(min_mu),
        "size_factors": size_factors if isinstance(size_factors, str) else "given",
        "size_factors_digest": _digest(sf),
        "perturbation_column": perturbation_column,
        "covariates": ",".join(covariates),
        "layer": layer or "X",
    }
    if max_cells is not None:
        max_cells = check_number(max_cells, "max_cells", integer=True, minimum=2)
        record |= {"max_cells": int(max_cells), "seed": int(seed)}
    rows = dispersion_cells(labels, max_cells, int(seed))
    layout = _open(adata, perturbation_column, covariates, sf, layer=layer, cache=cache, rows=rows)
    return layout, sf, record, (min_mu, max_iter, tol)


def _reopen(adata: ad.AnnData, record: dict, *, size_factors, cache: bool | None) -> _Layout:
    """The layout the gene-wise fit used, from its record; the size factors must be the same.

    Raises
    ------
    ValueError
        If they were given as an array and are not given again, or differ.
    """
    source = size_factors if size_factors is not None else str(record.get("size_factors", "size_factors"))
    if isinstance(source, str) and source == "given":
        raise ValueError(
            "the gene-wise dispersions were fitted with size factors given as an array: pass the same array to "
            "ps.tl.fit_map_dispersions(adata, size_factors=...)"
        )
    layer = None if str(record.get("layer", "X")) == "X" else str(record["layer"])
    sf = size_factor_values(adata, source, needed_by="the dispersion fit", layer=layer)
    if "size_factors_digest" in record and _digest(sf) != str(record["size_factors_digest"]):
        raise ValueError(
            f"the size factors ({source if isinstance(source, str) else 'the array given'}) are not those the "
            "gene-wise dispersions were fitted with (made again since, or other cells): run "
            f"{_first_call(record, 'again')}"
        )
    covariates = [c for c in str(record.get("covariates", "")).split(",") if c]
    labels = _design_labels(adata, str(record["perturbation_column"]), covariates)
    max_cells = int(record["max_cells"]) if "max_cells" in record else None
    rows = dispersion_cells(labels, max_cells, int(record.get("seed", 0)), warn=False)  # the same cells (warned)
    layout = _open(adata, str(record["perturbation_column"]), covariates, sf, layer=layer, cache=cache, rows=rows)
    if layout.design is not None:  # the means the gene-wise fit used: fitted again at the same starting values
        start, base_mean = layout.additive_start()
        layout.fit_means(np.where(base_mean > 0, start, np.nan), base_mean)
    return layout


# --------------------------------------------------------------------------- the steps


def _fit_genewise(
    adata: ad.AnnData, layout: _Layout, sf: np.ndarray, record: dict, *, method, min_mu, max_iter, tol
) -> pd.DataFrame:
    n = layout.n_cells
    means_converged = True
    if layout.design is not None:  # DESeq2's additive design: GLM means, fitted at the starting values
        start, base_mean = layout.additive_start()
        expressed = base_mean > 0
        if method == "cox-reid":
            means_converged = layout.fit_means(np.where(expressed, start, np.nan), base_mean)
    else:
        start, base_mean = _groups_start(layout)
        expressed = base_mean > 0
    table = _genewise_table(
        adata, layout, start, base_mean, expressed, method=method, min_mu=min_mu, max_iter=max_iter, tol=tol
    )
    table[DISPERSION_GENEWISE_CONVERGED] &= means_converged
    _write(adata, table, record | {"n_cells": int(n), "n_params": int(layout.n_params)}, "genewise")
    return table


def _groups_start(layout: _Layout):
    """One pass: DESeq2's starting dispersions of a design of groups, and each gene's mean of ``y / s``."""
    from ..kernels.nbglm import starting_dispersions

    n_genes = layout.n_genes
    small, large = layout.moments()
    sums = small if small is not None else np.zeros((4, n_genes))
    for rows, (s1, s2) in zip(layout.large_rows, large, strict=True):
        m = float(rows.size)
        zbar = np.maximum(s1 / m, 1.0)
        sums[0] += s1
        sums[1] += s2
        sums[2] += (s2 - 2.0 * zbar * s1 + m * zbar * zbar - m * zbar) / (zbar * zbar)
    sums[3] = layout.n_groups
    n = layout.n_cells
    return starting_dispersions(sums, layout.inv_size_factor_mean, n), sums[0] / n


def _genewise_table(adata, layout: _Layout, start, base_mean, expressed, *, method, min_mu, max_iter, tol):
    """The gene-wise Newton passes from ``start``; the table of :data:`GENEWISE_TABLE`."""
    from ..kernels.nbglm import MIN_DISP

    n_genes = layout.n_genes
    n = layout.n_cells
    lower, upper = np.log(MIN_DISP), np.log(max(10.0, float(n)))
    a0 = np.where(expressed, np.log(start), np.nan)
    if method == "cox-reid":
        evaluate = _evaluator(layout, min_mu)
        # genes whose moments estimate is at the floor (sparse genes: it can be negative) start from the best
        # point of a coarse grid instead, all in one pass
        floor = expressed & (a0 <= lower + 1e-9)
        if floor.any():
            grid = np.linspace(np.log(1e-4), np.log(100.0), 9)
            values = evaluate(np.repeat(grid[:, None], n_genes, axis=1), floor)[:, 0]
            a0[floor] = grid[np.argmax(values[:, floor], axis=0)]
        a_gene, curvature, converged = _newton(evaluate, a0, lower=lower, upper=upper, max_iter=max_iter, tol=tol)
    else:  # the moments estimates: no likelihood
        a_gene, curvature, converged = a0, np.full(n_genes, np.nan), expressed.copy()
    table = pd.DataFrame(
        {
            DISPERSION_GENEWISE: np.where(expressed, np.exp(a_gene), np.nan),
            DISPERSION_GENEWISE_CONVERGED: converged & expressed,
            DISPERSION_GENEWISE_CURVATURE: np.where(expressed, curvature, np.nan),
            BASE_MEAN: base_mean,
        },
        index=adata.var_names,
    )
    return table


def _fit_trend(adata: ad.AnnData) -> pd.DataFrame:
    from ..kernels.nbglm import MIN_DISP, fit_trend

    record = _requires(adata, "trend")
    genewise = adata.var[DISPERSION_GENEWISE].to_numpy(dtype=np.float64)
    trend, info = fit_trend(genewise, adata.var[BASE_MEAN].to_numpy(dtype=np.float64), min_disp=MIN_DISP)
    if info["type"] == "mean":
        warnings.warn(
            "the parametric dispersion trend did not converge; using the mean of the gene-wise dispersions",
            UserWarning,
            stacklevel=3,
        )
    table = pd.DataFrame({DISPERSION_TREND: np.where(np.isfinite(genewise), trend, np.nan)}, index=adata.var_names)
    record["trend"] = {k: (float(v) if k != "type" else v) for k, v in info.items()}
    _write(adata, table, record, "trend")
    return table


def _fit_prior(adata: ad.AnnData) -> float:
    from ..kernels.nbglm import MIN_DISP, dispersion_prior

    record = _requires(adata, "prior")
    prior_var, squared_logres = dispersion_prior(
        adata.var[DISPERSION_GENEWISE].to_numpy(dtype=np.float64),
        adata.var[DISPERSION_TREND].to_numpy(dtype=np.float64),
        n_cells=int(record["n_cells"]),
        n_params=int(record.get("n_params", record.get("n_groups", 0))),  # n_groups: earlier records
        min_disp=MIN_DISP,
    )
    record |= {"prior_variance": float(prior_var), "squared_logres": float(squared_logres)}
    _write(adata, None, record, "prior")
    return float(prior_var)


def _fit_map(adata: ad.AnnData, record: dict, layout: _Layout | None, *, max_iter, tol) -> pd.DataFrame:
    from ..kernels.nbglm import MIN_DISP, final_dispersions

    var = adata.var
    genewise = var[DISPERSION_GENEWISE].to_numpy(dtype=np.float64)
    trend = var[DISPERSION_TREND].to_numpy(dtype=np.float64)
    converged = var[DISPERSION_GENEWISE_CONVERGED].to_numpy(dtype=bool)
    expressed = np.isfinite(genewise)
    max_disp = max(10.0, float(record["n_cells"]))
    lower, upper = np.log(MIN_DISP), np.log(max_disp)
    prior_var = float(record["prior_variance"])
    if str(record["method"]) == "cox-reid":
        # start from the quadratic approximation of the likelihood at its maximum, then Newton on the posterior
        curvature = var[DISPERSION_GENEWISE_CURVATURE].to_numpy(dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            a_gene, log_trend = np.log(genewise), np.log(trend)
            prec = np.where(curvature < 0, -curvature, 0.0)
            a_start = np.where(expressed, (prec * a_gene + log_trend / prior_var) / (prec + 1.0 / prior_var), np.nan)
        a_map, _, map_converged = _newton(
            _evaluator(layout, float(record["min_mu"])),
            np.clip(a_start, lower, upper),
            lower=lower,
            upper=upper,
            max_iter=max_iter,
            tol=tol,
            prior=(log_trend, prior_var),
        )
        posterior = np.exp(a_map)
        converged = converged & map_converged
    else:  # the moments estimates are final: no likelihood, so no posterior
        posterior = genewise
    final, outlier = final_dispersions(
        genewise, trend, posterior, squared_logres=float(record["squared_logres"]), max_disp=max_disp, min_disp=MIN_DISP
    )
    table = pd.DataFrame(
        {DISPERSION: final, DISPERSION_OUTLIER: outlier, DISPERSION_CONVERGED: converged & expressed},
        index=adata.var_names,
    )
    _write(adata, table, record, "map")
    logger.info(
        "dispersions: %d genes, %d outliers, %d not converged",
        int(expressed.sum()),
        int(outlier.sum()),
        int((expressed & ~converged).sum()),
    )
    return table


# --------------------------------------------------------------------------- the public calls


@renamed_arguments(positional=("perturbation_column",))
def fit_genewise_dispersions(
    adata: ad.AnnData,
    *,
    perturbation_column: str,
    size_factors: str | np.ndarray = "size_factors",
    covariates: str | list[str] | None = None,
    method: str = "cox-reid",
    min_mu: float = 0.5,
    max_iter: int = 20,
    tol: float = 1e-3,
    layer: str | None = None,
    cache: bool | None = None,
    max_cells: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Each gene's own dispersion estimate, as DESeq2 makes it, out of core: the first dispersion step.

    The design is DESeq2's ``~ covariates + perturbation`` (Love, Huber &
    Anders 2014). Without covariates it is one group per label of
    ``obs[perturbation_column]`` (the control and every perturbation), each
    group's mean held at the mean of its normalized counts ``y / s``, as
    DESeq2 and PyDESeq2 do for designs of groups (PyDESeq2's
    ``fit_genewise_dispersions``). With covariates it is the additive
    design (an intercept, each covariate's other levels, one indicator per
    label but the largest), whose means DESeq2 fits by the NB GLM at the
    starting values (``estimateDispersionsGeneEst``: ``fitNbinomGLMs``, then
    ``log det(X'WX)`` in the Cox-Reid term), and so does this: the arrow
    shape of ``X'WX`` (labels' indicators disjoint) lets each block add its
    labels' share (:mod:`pertscale.kernels.nbglm._additive`). A design that
    is one of groups after all (as many distinct rows as coefficients: every
    label within one level) keeps the groups' means, as DESeq2 does.

    1. starting values: the smaller of DESeq2's rough (linear model) and
       moments estimates (one pass; two with the additive design, whose
       least squares fit comes first);
    2. the additive design only, with ``method="cox-reid"``: its means, by
       Fisher scoring on the covariates' coefficients (one pass a step,
       each label's own coefficient solved in its block; usually 4-8
       passes, kept in memory with ``cache``);
    3. ``method="cox-reid"``: the maximum of the Cox-Reid adjusted profile
       log likelihood in ``log alpha``, by Newton steps (one pass each, at
       most ``max_iter``; genes whose starting value is at the floor first
       take the best point of a coarse grid, one more pass), within
       ``[1e-8, max(10, n_obs)]``. ``method="moments"`` keeps the starting
       values.

    Computes here: each pass is a plain ``dask.compute`` on Dask's current
    scheduler, a reduction the next pass needs. The next step is
    :func:`fit_dispersion_trend`; :func:`dispersions` runs every step.

    Parameters
    ----------
    adata
        ``n_obs x n_vars`` raw UMI counts in ``X`` (or ``layers[layer]``).
    perturbation_column
        ``obs`` column of labels; each label is a group of the design
        (keyword-only; given positionally, as in earlier releases, it is
        still taken for one release with a ``FutureWarning``).
    size_factors
        ``obs`` column of size factors (:func:`pertscale.pp.size_factors`),
        or an ``(n_obs,)`` array of them.
    covariates
        ``obs`` columns (e.g. ``["bio_rep"]``, or ``"bio_rep"``: a string is
        one column): the design is then ``~ covariates + perturbation``
        (R's treatment contrasts, the first level of each in sorted order
        its reference), as above; checked before any pass.
    method
        ``"cox-reid"`` (default) or ``"moments"`` (fast, one pass; then the
        later steps keep these estimates as the final ones, with no prior).
    min_mu
        Lower bound of the fitted means in the likelihood (DESeq2's
        ``minmu``): 0.5 as DESeq2, PyDESeq2 and crispyx (their estimates agree
        best with it). For sparse single-cell genes it pushes the
        dispersions up; DESeq2's documentation suggests 1e-6 for single-cell
        counts. At most ``sqrt(float64 max / max(10, n_obs))`` (about 1e152),
        where the variance ``alpha mu^2`` stays finite. Recorded: the
        maximum a posteriori fit uses the same.
    max_iter
        Newton passes at most.
    tol
        A gene's fit stops when its Newton step in ``log alpha`` is shorter
        (1e-3: the dispersion to 0.1 %); below 3, the longest step.
    layer
        Use ``layers[layer]`` instead of ``X``.
    cache
        Keep the blocks, prepared for the likelihood, in memory from the
        first pass to the last (about 28 bytes a non-zero) instead of reading
        them again in every pass; default: when they take less than a
        quarter of the available memory (one block is read to tell). By
        default a sample (``max_cells``) whose prepared blocks do not fit is
        kept raw (about 12 bytes a non-zero) when that fits: its rows lie
        all over the matrix, which each pass would otherwise read whole.
    max_cells
        Fit on at most this many cells (default: all): a sample stratified
        by the design's groups, every group keeping ``min(its cells, k)``
        cells drawn by ``numpy.random.default_rng(seed)``, small groups
        whole and the largest (the control) cut first (memento's idea,
        Kim et al. 2024: dispersions need far fewer cells than the test).
        When the sample's prepared blocks fit in memory (``cache``) the
        whole fit reads the matrix once instead of once a Newton step.
        Recorded with ``seed`` in ``uns['pertscale']['dispersion']``;
        :func:`fit_map_dispersions` takes the same cells. Its effect on every
        statistic is measured in ``benchmarks/RESULTS.md``.
    seed
        Seed of that sample.

    Returns
    -------
    pandas.DataFrame
        Indexed like ``var``, also written to it: ``dispersion_genewise``
        (``(n_vars,)`` float64, NaN for genes without any count),
        ``dispersion_genewise_converged`` (bool),
        ``dispersion_genewise_curvature`` (the likelihood's second derivative
        in ``log alpha`` there, where :func:`fit_map_dispersions` starts;
        NaN with ``"moments"``) and ``baseMean`` (mean normalized count,
        ``sum(y / s) / n_obs``). The options, ``n_cells`` and ``n_params``
        (the design's coefficients) go to a new record ``uns['pertscale']['dispersion']``, which lists
        the steps done (``"genewise"``).

    Raises
    ------
    ValueError
        If the size factor column is missing (with the call that makes it),
        the matrix is not raw counts, the size factors are not positive and
        finite, a covariate is missing values or has one level, or an
        option is out of range (the message gives the range and why).
    KeyError
        If the label or a covariate column is missing.

    Notes
    -----
    On a view (``adata[mask]``), ``adata`` becomes an actual AnnData holding
    a copy of its data before ``var`` is written, as scanpy does (anndata's
    ``ImplicitModificationWarning``); its parent is left as it was.
    """
    layout, sf, record, (min_mu, max_iter, tol) = _start(
        adata,
        perturbation_column,
        size_factors=size_factors,
        covariates=covariates,
        method=method,
        min_mu=min_mu,
        max_iter=max_iter,
        tol=tol,
        layer=layer,
        cache=cache,
        max_cells=max_cells,
        seed=seed,
    )
    return _fit_genewise(adata, layout, sf, record, method=method, min_mu=min_mu, max_iter=max_iter, tol=tol)


def fit_dispersion_trend(adata: ad.AnnData) -> pd.DataFrame:
    """DESeq2's parametric trend of the gene-wise dispersions over the mean: the second dispersion step.

    ``alpha(mu) = a0 + a1 / mu`` over the genes' mean normalized counts
    (``var['baseMean']``), fitted as DESeq2's ``fitType="parametric"`` and
    PyDESeq2's ``fit_dispersion_trend`` (a Gamma family GLM with identity
    link, refitted without genes far from the curve); when that does not
    converge, a trimmed mean of the gene-wise dispersions (DESeq2's
    ``fitType="mean"``), with a warning. No pass over the matrix.

    Parameters
    ----------
    adata
        With the gene-wise dispersions of :func:`fit_genewise_dispersions`.

    Returns
    -------
    pandas.DataFrame
        Indexed like ``var``, also written to it: ``dispersion_trend``
        (``(n_vars,)`` float64, NaN for genes without any count). The
        curve (``{"type": "parametric", "a0", "a1"}`` or ``{"type": "mean",
        "mean"}``) goes to ``uns['pertscale']['dispersion']['trend']``.

    Raises
    ------
    ValueError
        If there are no gene-wise dispersions (with the call that makes them).
    """
    return _fit_trend(adata)


def fit_dispersion_prior(adata: ad.AnnData) -> float:
    """The variance of DESeq2's log-normal prior of the dispersions around the trend: the third step.

    As PyDESeq2's ``fit_dispersion_prior``: the squared median absolute
    deviation of the log residuals ``log dispersion_genewise - log
    dispersion_trend`` (genes with a gene-wise estimate of at least 1e-6),
    less ``trigamma((n_obs - n_params) / 2)`` (``n_params`` the design's
    coefficients), at least 0.25. No pass over
    the matrix.

    Parameters
    ----------
    adata
        With the trend of :func:`fit_dispersion_trend`.

    Returns
    -------
    float
        The prior variance, in ``(log alpha)^2``; also in
        ``uns['pertscale']['dispersion']['prior_variance']``, beside
        ``squared_logres`` (which marks the dispersion outliers).

    Raises
    ------
    ValueError
        If an earlier step is missing (with the call that makes it).
    """
    return _fit_prior(adata)


def fit_map_dispersions(
    adata: ad.AnnData,
    *,
    size_factors: np.ndarray | None = None,
    max_iter: int = 20,
    tol: float = 1e-3,
    cache: bool | None = None,
) -> pd.DataFrame:
    """The final dispersions: maximum a posteriori under the prior, as DESeq2; the last dispersion step.

    Newton passes on the Cox-Reid adjusted profile likelihood plus the
    log-normal prior of :func:`fit_dispersion_prior` around the trend,
    started from the quadratic approximation of the likelihood at the
    gene-wise estimate. Genes more than two median absolute deviations
    (``2 sqrt(squared_logres)``) above the trend keep their gene-wise
    estimate (DESeq2's dispersion outliers; PyDESeq2's
    ``fit_MAP_dispersions``). With ``method="moments"`` gene-wise estimates
    (no likelihood), these are final: no pass.

    The data, design and ``min_mu`` are those the gene-wise fit recorded
    (``uns['pertscale']['dispersion']``). Computes here (a plain
    ``dask.compute`` per Newton pass, on Dask's current scheduler); called
    alone, it reads the matrix once more first, for the means of groups
    longer than a block (:func:`dispersions` shares that pass with the
    gene-wise fit).

    Parameters
    ----------
    adata
        With the prior of :func:`fit_dispersion_prior`.
    size_factors
        The ``(n_obs,)`` array the gene-wise fit was given, if it was given
        one (a column is found by its recorded name).
    max_iter
        Newton passes at most.
    tol
        A gene's fit stops when its Newton step in ``log alpha`` is shorter;
        below 3, the longest step.
    cache
        As :func:`fit_genewise_dispersions`.

    Returns
    -------
    pandas.DataFrame
        Indexed like ``var``, also written to it: ``dispersion`` (final,
        ``(n_vars,)`` float64, NaN for genes without any count; what
        ``rank_genes_groups(method="nb-glm")`` uses), ``dispersion_outlier``
        (bool) and ``dispersion_converged`` (both fits, bool).

    Raises
    ------
    ValueError
        If an earlier step is missing (with the call that makes it), the
        size factors are not those the gene-wise fit used, or ``max_iter``
        or ``tol`` is out of range.
    """
    record = _requires(adata, "map")
    max_iter, tol, _ = _check_fit_options(adata, max_iter=max_iter, tol=tol)
    layout = None
    if str(record["method"]) == "cox-reid":
        layout = _reopen(adata, record, size_factors=size_factors, cache=cache)
    return _fit_map(adata, record, layout, max_iter=max_iter, tol=tol)


@renamed_arguments(positional=("perturbation_column",))
def dispersions(
    adata: ad.AnnData,
    *,
    perturbation_column: str,
    size_factors: str | np.ndarray = "size_factors",
    covariates: str | list[str] | None = None,
    method: str = "cox-reid",
    min_mu: float = 0.5,
    max_iter: int = 20,
    tol: float = 1e-3,
    layer: str | None = None,
    cache: bool | None = None,
    max_cells: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Every gene's negative-binomial dispersion, as DESeq2 estimates it, out of core; stored in ``var``.

    The one-call form of the dispersion steps, run in order on the size
    factors of :func:`pertscale.pp.size_factors`:
    :func:`fit_genewise_dispersions` -> :func:`fit_dispersion_trend` ->
    :func:`fit_dispersion_prior` -> :func:`fit_map_dispersions`, with the
    same results as those calls one by one. Both fits share the first pass
    and, with ``cache``, the prepared blocks, so this reads the matrix once
    less than the steps called alone. The steps (Love, Huber & Anders 2014;
    PyDESeq2):

    1. starting values: the smaller of DESeq2's rough (linear model) and
       moments estimates;
    2. gene-wise estimates (``method="cox-reid"``): the maximum of the
       Cox-Reid adjusted profile log likelihood in ``log alpha``, by Newton
       steps (one pass each, at most ``max_iter``), within ``[1e-8,
       max(10, n_obs)]``; ``method="moments"`` keeps the starting values as
       the gene-wise and the final estimates (one pass in all, no prior);
    3. the trend ``alpha(mu) = a0 + a1 / mu`` over the genes' mean normalized
       counts;
    4. the prior: log-normal around the trend, variance ``max(MAD^2 -
       trigamma((n - p) / 2), 0.25)`` of the log residuals;
    5. final (``dispersion``): the maximum a posteriori (Newton passes as in
       2), except for genes more than two MAD above the trend, which keep the
       gene-wise estimate (DESeq2's dispersion outliers).

    Computes here: each pass is a plain ``dask.compute`` on Dask's current
    scheduler (no block is held from one pass to the next unless
    ``cache``). :func:`pertscale.tl.rank_genes_groups` with
    ``method="nb-glm"`` then finds them in ``var['dispersion']``.

    Parameters
    ----------
    adata
        ``n_obs x n_vars`` raw UMI counts in ``X`` (or ``layers[layer]``).
    perturbation_column
        ``obs`` column of labels; each label is a group of the design
        (keyword-only; given positionally, as in earlier releases, it is
        still taken for one release with a ``FutureWarning``).
    size_factors
        ``obs`` column of size factors (:func:`pertscale.pp.size_factors`),
        or an ``(n_obs,)`` array of them.
    covariates, method, min_mu, layer, cache, max_cells, seed
        As :func:`fit_genewise_dispersions`.
    max_iter, tol
        Newton passes at most, and the step below which a gene's fit stops,
        for each of the two fits (see :func:`fit_genewise_dispersions`).

    Returns
    -------
    pandas.DataFrame
        Indexed like ``var``, also written to it: ``dispersion`` (final),
        ``dispersion_genewise``, ``dispersion_trend``, ``dispersion_outlier``,
        ``dispersion_converged``, ``baseMean`` (mean normalized count). NaN
        for genes without any count. ``var`` also receives the steps' other
        columns (``dispersion_genewise_converged``,
        ``dispersion_genewise_curvature``); the options, the trend and the
        prior variance go to ``uns['pertscale']['dispersion']``.

    Raises
    ------
    ValueError
        If the size factor column is missing (with the call that makes it),
        the matrix is not raw counts, the size factors are not positive and
        finite, a covariate is missing values or has one level, or an
        option is out of range (the message gives the range and why).
    KeyError
        If the label or a covariate column is missing.

    Notes
    -----
    On a view (``adata[mask]``), ``adata`` becomes an actual AnnData holding
    a copy of its data before ``var`` is written, as scanpy does (anndata's
    ``ImplicitModificationWarning``); its parent is left as it was.
    """
    layout, sf, record, (min_mu, max_iter, tol) = _start(
        adata,
        perturbation_column,
        size_factors=size_factors,
        covariates=covariates,
        method=method,
        min_mu=min_mu,
        max_iter=max_iter,
        tol=tol,
        layer=layer,
        cache=cache,
        max_cells=max_cells,
        seed=seed,
    )
    _fit_genewise(adata, layout, sf, record, method=method, min_mu=min_mu, max_iter=max_iter, tol=tol)
    _fit_trend(adata)
    _fit_prior(adata)
    _fit_map(adata, _requires(adata, "map"), layout, max_iter=max_iter, tol=tol)
    return adata.var[list(TABLE)].copy()


# --------------------------------------------------------------------------- what a test finds stored


def _size_factors_call(name: str, *, method: str | None = None, layer: str | None = None) -> str:
    args = "".join(
        f", {k}={v!r}"
        for k, v in (("method", method), ("layer", layer), ("key_added", name))
        if v is not None and not (k == "method" and v == "sparse") and not (k == "key_added" and v == "size_factors")
    )
    return f"ps.pp.size_factors(adata{args})"


def size_factor_values(
    adata: ad.AnnData, size_factors, *, needed_by: str = "nb-glm", layer: str | None = None
) -> np.ndarray:
    """The size factors named by an ``obs`` column or given as an array, checked.

    Parameters
    ----------
    adata
        Cells.
    size_factors
        An ``obs`` column name, or an ``(n_obs,)`` array.
    needed_by, layer
        Who needs them, and the layer of counts: named in the message when
        the column is missing.

    Returns
    -------
    numpy.ndarray
        ``(n_obs,)`` float64.

    Raises
    ------
    ValueError
        If the column is missing (with the call that makes it), or they are
        not ``(n_obs,)`` positive finite numbers.
    """
    if isinstance(size_factors, str):
        if size_factors not in adata.obs:
            raise ValueError(
                f"{needed_by} needs size factors in obs[{size_factors!r}]: run "
                f"{_size_factors_call(size_factors, layer=layer)} first (or pass size_factors=...)"
            )
        values = adata.obs[size_factors].to_numpy(dtype=np.float64)
    else:
        values = np.asarray(size_factors, dtype=np.float64).ravel()
    if values.shape != (adata.n_obs,):
        raise ValueError(f"size factors have shape {values.shape}; expected one per cell ({adata.n_obs},)")
    if not (np.isfinite(values) & (values > 0)).all():
        raise ValueError("size factors must be positive finite numbers; some are not")
    return values


def size_factors_for_test(adata: ad.AnnData, size_factors, *, method: str, layer: str | None) -> np.ndarray:
    """nb-glm's size factors: present, checked, and made with ``method`` where their record says how.

    Raises
    ------
    ValueError
        If the column is missing or was made with another method (each with
        the call that makes the right ones), or the values are not positive
        finite numbers.
    """
    from ..pp._size_factors import RECORD as SIZE_FACTORS

    if isinstance(size_factors, str) and size_factors not in adata.obs:
        raise ValueError(
            f"nb-glm needs size factors in obs[{size_factors!r}]: run "
            f"{_size_factors_call(size_factors, method=method, layer=layer)} first (or pass size_factors=...)"
        )
    values = size_factor_values(adata, size_factors, layer=layer)
    if isinstance(size_factors, str):
        made = ((adata.uns.get("pertscale") or {}).get(SIZE_FACTORS) or {}).get(size_factors) or {}
        if "method" in made and str(made["method"]) != method:
            raise ValueError(
                f"nb-glm: the size factors in obs[{size_factors!r}] were made with method={str(made['method'])!r}, "
                f"not size_factor_method={method!r}: pass size_factor_method={str(made['method'])!r}, or run "
                f"{_size_factors_call(size_factors, method=method, layer=layer)} again (then the dispersions)"
            )
    return values


def _dispersions_call(perturbation_column: str, *, size_factors, covariates, method: str, layer) -> str:
    args = [f"perturbation_column={perturbation_column!r}"]
    if not isinstance(size_factors, str):
        args.append("size_factors=...")
    elif size_factors != "size_factors":
        args.append(f"size_factors={size_factors!r}")
    if covariates:
        args.append(f"covariates={list(covariates)!r}")
    if method != "cox-reid":
        args.append(f"method={method!r}")
    if layer:
        args.append(f"layer={layer!r}")
    return f"ps.tl.dispersions(adata, {', '.join(args)})"


def dispersions_for_test(
    adata: ad.AnnData,
    *,
    perturbation_column: str,
    size_factors,
    sf: np.ndarray,
    covariates: list[str],
    method: str,
    layer: str | None,
) -> tuple[np.ndarray, dict]:
    """The final dispersions stored for this design, these size factors and ``method``, and their record.

    Nothing is computed: they must have been made first (by
    :func:`dispersions`, or its steps up to :func:`fit_map_dispersions`).

    Returns
    -------
    tuple
        ``(alpha, record)``: ``(n_vars,)`` float64 and
        ``uns['pertscale']['dispersion']``.

    Raises
    ------
    ValueError
        If they are missing, their steps stop early, or they were made for
        another perturbation column, size factors, covariates or method:
        naming what differs and the call that makes the right ones.
    """
    call = _dispersions_call(
        perturbation_column, size_factors=size_factors, covariates=covariates, method=method, layer=layer
    )
    record = _record(adata)
    if not record.get("perturbation_column"):
        raise ValueError(
            f"nb-glm needs dispersions estimated for obs[{perturbation_column!r}] (var['dispersion'] and its record "
            f"uns['pertscale']['dispersion'] are missing): run {call} first (or pass dispersions=...)"
        )
    asked = {
        "perturbation_column": perturbation_column,
        "size_factors": size_factors if isinstance(size_factors, str) else "given",
        "covariates": ",".join(covariates),
        "method": method,
    }
    differ = [f"{k}={str(record.get(k, ''))!r} (asked: {v!r})" for k, v in asked.items() if str(record.get(k, "")) != v]
    if differ:
        fix = f" or pass dispersion_method={str(record.get('method'))!r}," if differ[-1].startswith("method=") else ""
        raise ValueError(
            f"nb-glm: the dispersions in var['dispersion'] were estimated with {', '.join(differ)}: run {call} "
            f"first,{fix} or pass dispersions=..."
        )
    done = _done(adata, record)
    if "map" not in done:
        last = next((s for s in reversed(STEPS) if s in done), None)
        todo = STEPS[STEPS.index(last) + 1 :] if last else STEPS
        steps = " then ".join(_genewise_call(record) if s == "genewise" else f"{CALLS[s]}(adata)" for s in todo)
        where = f"stop after {MADE[last]}" if last else "are incomplete"
        raise ValueError(
            f"nb-glm needs {MADE['map']}, but the dispersion steps for obs[{perturbation_column!r}] {where}: "
            f"run {steps} (or {call})"
        )
    if "size_factors_digest" in record and _digest(sf) != str(record["size_factors_digest"]):
        raise ValueError(
            "nb-glm: the size factors are not those the dispersions were estimated with (made again since, or "
            f"other cells): run {call} again"
        )
    return adata.var[DISPERSION].to_numpy(dtype=np.float64), record


def covariate_levels(obs: pd.DataFrame, covariates, *, control: np.ndarray | None = None) -> tuple[np.ndarray, list]:
    """Each cell's level of the covariates (their combinations), as codes ``0`` to ``n_levels - 1``.

    Parameters
    ----------
    obs
        Cell annotation.
    covariates
        Column names (e.g. ``["bio_rep"]``).
    control
        ``(n_obs,)`` bool, the control cells: every level needs some, since
        its effect is estimated from them.

    Returns
    -------
    tuple
        ``(codes, levels)``: ``(n_obs,)`` int64 and the level names
        (``"a|b"`` for combinations).

    Raises
    ------
    KeyError
        If a column is missing.
    ValueError
        If a column has missing values or a single level, or a level has no
        control cell.
    """
    from .._validation import label_list

    names = label_list(covariates, "covariates")
    keys = []
    for name in names:
        if name not in obs.columns:
            raise KeyError(f"covariate {name!r} not found in obs; columns present: {list(obs.columns)[:20]}")
        column = obs[name]
        if column.isna().any():
            raise ValueError(
                f"covariate obs[{name!r}] has {int(column.isna().sum())} missing values; fill them or drop those cells"
            )
        values = column.astype(str).to_numpy()
        if np.unique(values).size < 2:
            raise ValueError(
                f"covariate obs[{name!r}] has a single level ({values[0]!r}): it explains nothing; leave it out"
            )
        keys.append(values)
    combined = keys[0] if len(keys) == 1 else np.array(["|".join(v) for v in zip(*keys, strict=True)], dtype=object)
    codes, levels = pd.factorize(combined, sort=True)
    if control is not None:
        present = np.bincount(codes[np.asarray(control, dtype=bool)], minlength=len(levels))
        missing = [str(levels[k]) for k in np.flatnonzero(present == 0)]
        if missing:
            raise ValueError(
                f"covariate level(s) {missing} of {names} have no control cells: their effects are estimated on "
                "the control cells; leave the covariate out, or drop those cells"
            )
    return codes.astype(np.int64), [str(v) for v in levels]


def additive_design(levels: list[str], n_covariates: int) -> np.ndarray:
    """DESeq2's additive design ``~ a + b`` of each combination of covariate levels (:func:`covariate_levels`).

    Parameters
    ----------
    levels
        The combinations' names, ``"a|b"`` for two covariates (sorted, as
        :func:`covariate_levels` returns them).
    n_covariates
        Number of covariates.

    Returns
    -------
    numpy.ndarray
        ``(n_levels, p)`` float64: an intercept, then for each covariate
        an indicator of each of its levels but the first (R's treatment
        contrasts, DESeq2's default; the first level in sorted order is the
        reference).
    """
    parts = [str(level).split("|") if n_covariates > 1 else [str(level)] for level in levels]
    columns = [np.ones(len(levels))]
    for c in range(n_covariates):
        values = [p[c] for p in parts]
        for value in sorted(set(values))[1:]:
            columns.append(np.array([v == value for v in values], dtype=np.float64))
    return np.column_stack(columns)

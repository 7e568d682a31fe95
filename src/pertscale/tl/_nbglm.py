"""Negative-binomial GLM: dispersion estimation over row blocks, and the Method the engine runs.

:func:`dispersions` estimates every gene's dispersion as DESeq2 does, out
of core: one pass for the starting values, then Newton passes on the
Cox-Reid adjusted profile likelihood (each pass adds up every block's
value, gradient and curvature per gene), the parametric trend, and Newton
passes on the posterior with DESeq2's log-normal prior. Each pass is its own
computation, so no block is held between passes. The arithmetic is in
:mod:`pertscale.kernels.nbglm`.
"""

from __future__ import annotations

import logging
import warnings

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import special

from .._validation import as_actual, check_number, check_shape, get_matrix, label_list, perturbation_labels
from ..cluster import check_scheduler, compute
from ..io._read import as_dask
from ._engine import Groups, aligned

logger = logging.getLogger(__name__)

#: Dispersion estimation methods.
DISPERSION_METHODS = ("cox-reid", "moments")
#: Newton steps in log dispersion are at most this long.
MAX_STEP = 3.0


def _group_sizes(codes: np.ndarray) -> np.ndarray:
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    return np.diff(np.r_[starts, codes.shape[0]])


def _prepare(block, codes, sf, genes=None):
    """A block as the dispersion kernels take it.

    Returns its counts by gene (of ``genes`` only, if given), its group sizes
    (None: a piece of a large group) and ``genes``.
    """
    from ..kernels.nbglm import count_columns

    sizes = None if codes is None else _group_sizes(np.asarray(codes))
    block = sp.csr_matrix(block)
    if genes is not None:
        block = block[:, genes]
    return count_columns(block, np.asarray(sf)), sizes, genes


def _moments(prepared):
    from ..kernels.nbglm import dispersion_moments_block

    cols, sizes, _ = prepared
    if sizes is None:  # a piece of a large group: its sums of z and z^2
        z = sp.csc_matrix((cols.z, cols.rows, cols.ptr), shape=cols.shape)
        return np.stack([np.asarray(z.sum(axis=0)).ravel(), np.asarray(z.multiply(z).sum(axis=0)).ravel()])
    if sizes.size == 0:
        return np.zeros((4, cols.shape[1]))
    return dispersion_moments_block(cols, sizes)


def _likelihood(prepared, alphas, means, min_mu, active):
    """Value, gradient, curvature (and W terms of pieces): ``(n_points, 6, n_genes)`` for each row of ``alphas``."""
    from ..kernels.nbglm import dispersion_apl_block

    cols, sizes, genes = prepared
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

    def __init__(self, x: da.Array, labels: pd.Series, size_factors: np.ndarray, *, cache: bool, scheduler) -> None:
        import dask

        budget = int(max(x.chunks[0]))
        codes, names = pd.factorize(labels.to_numpy(), sort=False)
        sizes = np.bincount(codes, minlength=len(names))
        self.n_cells = int(codes.size)
        self.n_groups = len(names)
        self.n_genes = int(x.shape[1])
        large = sizes > budget
        self.large_rows = [np.flatnonzero(codes == g) for g in np.flatnonzero(large)]
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
            self._small_inputs = [
                (b, lay.codes[lo:hi], size_factors[lay.rows[lo:hi]])
                for b, lo, hi in zip(blocks, bounds[:-1], bounds[1:], strict=True)
            ]
            self.small = [dask.delayed(_prepare)(*inputs) for inputs in self._small_inputs]
        self._piece_inputs = []
        for rows in self.large_rows:
            contiguous = rows[-1] - rows[0] + 1 == rows.size
            piece = (x[int(rows[0]) : int(rows[-1]) + 1] if contiguous else x[rows]).rechunk({0: budget, 1: -1})
            bounds = np.cumsum((0,) + piece.chunks[0])
            inputs = [
                (b, None, size_factors[rows[lo:hi]])
                for b, lo, hi in zip(piece.to_delayed().ravel(), bounds[:-1], bounds[1:], strict=True)
            ]
            self._piece_inputs.append(inputs)
            self.pieces.append([dask.delayed(_prepare)(*i) for i in inputs])
        self.cache = cache
        if cache:
            from ..cluster import persist

            kept = persist(*self.small, *[p for pieces in self.pieces for p in pieces], scheduler=scheduler)
            self.small, rest = list(kept[: len(self.small)]), list(kept[len(self.small) :])
            self.pieces = [[rest.pop(0) for _ in pieces] for pieces in self.pieces]

    def moments(self, *, scheduler, progress):
        """Pass one: ``(4, n_genes)`` sums over whole groups, and ``(2, n_genes)`` per large group."""
        import dask

        todo = [dask.delayed(_total)(*[dask.delayed(_moments)(p) for p in self.small])] if self.small else []
        todo += [dask.delayed(_total)(*[dask.delayed(_moments)(p) for p in pieces]) for pieces in self.pieces]
        got = list(compute(*todo, scheduler=scheduler, progress=progress, desc="dispersions: moments"))
        return (got.pop(0) if self.small else None), got

    def likelihood(self, alphas, means, min_mu, active, *, scheduler, progress):
        """One pass: ``(n_points, 3, n_genes)`` value, gradient, curvature summed over every group."""
        import dask

        small, pieces_all = self.small, self.pieces
        if not self.cache and active.sum() < 0.5 * self.n_genes:  # read again, and prepare only the active genes
            genes = np.flatnonzero(active)
            small = [dask.delayed(_prepare)(*inputs, genes) for inputs in getattr(self, "_small_inputs", [])]
            pieces_all = [[dask.delayed(_prepare)(*i, genes) for i in inputs] for inputs in self._piece_inputs]
        todo = []
        if small:
            todo.append(
                dask.delayed(_total)(*[dask.delayed(_likelihood)(p, alphas, None, min_mu, active) for p in small])
            )
        for pieces, m in zip(pieces_all, means, strict=True):
            todo.append(
                dask.delayed(_total)(*[dask.delayed(_likelihood)(p, alphas, m, min_mu, active) for p in pieces])
            )
        got = compute(*todo, scheduler=scheduler, progress=progress, desc="dispersions: likelihood")
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


def _fits_in_memory(x: da.Array, *, scheduler) -> bool:
    """Whether the prepared blocks fit :data:`CACHE_FRACTION` of the available memory (one block read to tell)."""
    import psutil

    first = x.blocks[0, 0].compute(scheduler="synchronous")
    density = (first.nnz if sp.issparse(first) else np.count_nonzero(first)) / max(1, first.shape[0] * first.shape[1])
    estimate = float(x.shape[0]) * float(x.shape[1]) * density * 28  # CountColumns: 28 bytes a non-zero
    return estimate < psutil.virtual_memory().available * CACHE_FRACTION


def _newton(evaluate, a0, *, lower, upper, max_iter, tol, prior=None):
    """Maximize, per gene, a function of ``a = log alpha`` whose value, gradient and curvature ``evaluate`` gives.

    ``evaluate(a[None], active)`` returns ``(1, 3, n_genes)`` (one pass).
    Newton steps, at most :data:`MAX_STEP` long; where the curvature is
    not negative, a step of that length uphill; where the function flattens
    out towards small dispersions like ``c exp(a)`` (gradient equal to
    curvature, both negative: Newton would creep down one unit a pass), a
    jump to ``lower``. A step that lowers the value is halved back. A gene is
    done when its step is below ``tol`` or its value would change by less
    than 1e-9 of it. ``prior = (center, variance)`` adds a normal prior on
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
        small = (np.abs(new - best) < tol) | (np.abs(g * (new - best)) < 1e-9 * (np.abs(v) + 1.0))
        finished = ok & small
        converged |= finished
        active &= ~finished
        trial[ok & ~small] = new[ok & ~small]
    return best, curv, converged


def fit_trend(genewise: np.ndarray, base_mean: np.ndarray, *, min_disp: float) -> tuple[np.ndarray, dict]:
    """DESeq2's parametric dispersion trend ``alpha(mu) = a0 + a1 / mu``; a mean if it fails.

    Fitted as PyDESeq2's ``_fit_parametric_dispersion_trend``: a Gamma
    family GLM with identity link (minimizing ``mean(alpha / f + log f)``)
    on genes whose gene-wise estimate is at least ``100 * min_disp``,
    refitted without genes whose ratio to the curve is below 1e-4 or at
    least 15 until the coefficients settle. When it does not converge (or a
    coefficient falls to zero), a trimmed mean of the estimates above
    ``10 * min_disp`` (DESeq2's ``fitType="mean"``), with a warning.

    Returns
    -------
    tuple
        ``(trend at every gene's base_mean, {"type", "a0", "a1"} or {"type", "mean"})``.
    """
    from scipy.optimize import minimize
    from scipy.stats import trim_mean

    usable = np.isfinite(genewise) & (base_mean > 0) & (genewise >= 100 * min_disp)
    covariate, target = 1.0 / base_mean[usable], genewise[usable]
    coeffs, old = np.array([1.0, 1.0]), np.array([0.1, 0.1])
    ok = covariate.size >= 3
    while ok and (coeffs > 1e-10).all() and (np.log(np.abs(coeffs / old)) ** 2).sum() >= 1e-6:
        old = coeffs
        design = np.column_stack([np.ones_like(covariate), covariate])

        def loss(c, design=design, target=target):
            f = design @ c
            return float(np.mean(target / f + np.log(f)))

        def grad(c, design=design, target=target):
            f = design @ c
            return -np.mean(((target / f - 1.0) / f)[:, None] * design, axis=0)

        with np.errstate(all="ignore"):
            res = minimize(loss, x0=np.array([1.0, 1.0]), jac=grad, method="L-BFGS-B", bounds=[(1e-12, None)] * 2)
        coeffs, ok = res.x, bool(res.success) and np.isfinite(res.x).all()
        if not ok or (coeffs <= 1e-10).any():
            ok = False
            break
        ratio = target / (design @ coeffs)
        keep = (ratio >= 1e-4) & (ratio < 15)
        covariate, target = covariate[keep], target[keep]
    with np.errstate(divide="ignore"):
        if ok:
            return coeffs[0] + coeffs[1] / base_mean, {"type": "parametric", "a0": coeffs[0], "a1": coeffs[1]}
    warnings.warn(
        "the parametric dispersion trend did not converge; using the mean of the gene-wise dispersions",
        UserWarning,
        stacklevel=3,
    )
    above = genewise[np.isfinite(genewise) & (genewise > 10 * min_disp)]
    mean = float(trim_mean(above, proportiontocut=0.001)) if above.size else min_disp
    return np.full_like(base_mean, mean), {"type": "mean", "mean": mean}


def dispersions(
    adata: ad.AnnData,
    perturbation_column: str,
    *,
    size_factors: str | np.ndarray = "size_factors",
    covariates: str | list[str] | None = None,
    method: str = "cox-reid",
    min_mu: float = 0.5,
    max_iter: int = 20,
    tol: float = 1e-3,
    layer: str | None = None,
    cache: bool | None = None,
    scheduler=None,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Every gene's negative-binomial dispersion, as DESeq2 estimates it, out of core; stored in ``var``.

    The design is one group per label of ``obs[perturbation_column]`` (the
    control and every perturbation), each group's mean held at the mean of
    its normalized counts, as DESeq2 and PyDESeq2 do for such designs.
    Steps, each a pass (or a few) over the matrix:

    1. starting values: the smaller of DESeq2's rough (linear model) and
       moments estimates;
    2. gene-wise estimates (``method="cox-reid"``): the maximum of the
       Cox-Reid adjusted profile log likelihood in ``log alpha``, by Newton
       steps (one pass each, at most ``max_iter``), within ``[1e-8,
       max(10, n_obs)]``; ``method="moments"`` keeps the starting values as
       the gene-wise and the final estimates (one pass in all, no prior);
    3. the trend ``alpha(mu) = a0 + a1 / mu`` over the genes' mean normalized
       counts (:func:`fit_trend`);
    4. the prior: log-normal around the trend, variance ``max(MAD^2 -
       trigamma((n - p) / 2), 0.25)`` of the log residuals;
    5. final (``dispersion``): the maximum a posteriori (Newton passes as in
       2), except for genes more than two MAD above the trend, which keep the
       gene-wise estimate (DESeq2's dispersion outliers).

    Computes here (each pass its own computation: no block is held from one
    pass to the next).

    Parameters
    ----------
    adata
        ``n_obs x n_vars`` raw UMI counts in ``X`` (or ``layers[layer]``).
    perturbation_column
        ``obs`` column of labels; each label is a group of the design.
    size_factors
        ``obs`` column of size factors (:func:`pertscale.pp.size_factors`),
        or an ``(n_obs,)`` array of them.
    covariates
        ``obs`` columns (e.g. ``["bio_rep"]``, or ``"bio_rep"``: a string is
        one column): the design's groups are then every label within every
        level of them; checked before any pass.
    method
        ``"cox-reid"`` (default) or ``"moments"`` (fast, one pass).
    min_mu
        Lower bound of the fitted means in the likelihood (DESeq2's
        ``minmu``): 0.5 as DESeq2, PyDESeq2 and crispyx (their estimates agree
        best with it). For sparse single-cell genes it pushes the
        dispersions up; DESeq2's documentation suggests 1e-6 for single-cell
        counts. At most ``sqrt(float64 max / max(10, n_obs))`` (about 1e152),
        where the variance ``alpha mu^2`` stays finite.
    max_iter
        Newton passes at most, for each of the two fits.
    tol
        A gene's fit stops when its Newton step in ``log alpha`` is shorter
        (1e-3: the dispersion to 0.1 %); below 3, the longest step.
    layer
        Use ``layers[layer]`` instead of ``X``.
    cache
        Keep the blocks, prepared for the likelihood, in memory from the
        first pass to the last (about 28 bytes a non-zero) instead of reading
        them again in every pass; default: when they take less than a
        quarter of the available memory (one block is read to tell).
    scheduler, progress
        Where to compute; progress bars.

    Returns
    -------
    pandas.DataFrame
        Indexed like ``var``, also written to it: ``dispersion`` (final),
        ``dispersion_genewise``, ``dispersion_trend``, ``dispersion_outlier``,
        ``dispersion_converged``, ``baseMean`` (mean normalized count). NaN
        for genes without any count. The trend and the prior variance go to
        ``uns['pertscale']['dispersion']``.

    Raises
    ------
    KeyError
        If the label or size factor column is missing.
    ValueError
        If the matrix is not raw counts, the size factors are not positive
        and finite, a covariate is missing values or has one level, or an
        option is out of range (the message gives the range and why).

    Notes
    -----
    On a view (``adata[mask]``), ``adata`` becomes an actual AnnData holding
    a copy of its data before ``var`` is written, as scanpy does (anndata's
    ``ImplicitModificationWarning``); its parent is left as it was.
    """
    check_scheduler(scheduler)
    from ..kernels.nbglm import MIN_DISP, starting_dispersions

    if method not in DISPERSION_METHODS:
        raise ValueError(f"dispersion method {method!r} is not supported; choose one of {DISPERSION_METHODS}")
    check_shape(adata)
    # alpha mu^2, the NB variance's second term, for alpha up to max(10, n_obs) (the upper bound of the fits) and
    # mu >= min_mu, must stay a finite float64
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
    covariates = label_list(covariates, "covariates")  # a single string is one column, not its letters
    labels = perturbation_labels(adata.obs, perturbation_column)
    if covariates:
        codes, _ = covariate_levels(adata.obs, covariates)
        labels = pd.Series(labels.to_numpy() + "\x1f" + codes.astype(str), index=labels.index)
    sf = size_factor_values(adata, size_factors)
    x = as_dask(get_matrix(adata, layer))
    if x.numblocks[1] != 1:
        x = x.rechunk({1: -1})
    n_genes = x.shape[1]
    if cache is None:
        cache = _fits_in_memory(x, scheduler=scheduler)
    layout = _Layout(x, labels, sf, cache=cache, scheduler=scheduler)

    # 1. starting values, from per-gene sums of z = y / s
    small, large = layout.moments(scheduler=scheduler, progress=progress)
    sums = small if small is not None else np.zeros((4, n_genes))
    large_means = []
    for rows, (s1, s2) in zip(layout.large_rows, large, strict=True):
        m = float(rows.size)
        zbar = np.maximum(s1 / m, 1.0)
        sums[0] += s1
        sums[1] += s2
        sums[2] += (s2 - 2.0 * zbar * s1 + m * zbar * zbar - m * zbar) / (zbar * zbar)
        large_means.append((s1 / m)[None])
    sums[3] = layout.n_groups
    n = layout.n_cells
    start = starting_dispersions(sums, float(np.mean(1.0 / sf)), n)
    base_mean = sums[0] / n
    expressed = sums[0] > 0
    max_disp = max(10.0, float(n))
    lower, upper = np.log(MIN_DISP), np.log(max_disp)

    def evaluate(a, active):
        """``(n_points, 3, n_genes)`` for ``a`` of shape ``(n_points, n_genes)``; one pass."""
        return layout.likelihood(np.exp(a), large_means, min_mu, active, scheduler=scheduler, progress=progress)

    a0 = np.where(expressed, np.log(start), np.nan)
    if method == "cox-reid":
        # genes whose moments estimate is at the floor (sparse genes: it can be negative) start from the best
        # point of a coarse grid instead, all in one pass
        floor = expressed & (a0 <= lower + 1e-9)
        if floor.any():
            grid = np.linspace(np.log(1e-4), np.log(100.0), 9)
            values = evaluate(np.repeat(grid[:, None], n_genes, axis=1), floor)[:, 0]
            a0[floor] = grid[np.argmax(values[:, floor], axis=0)]
        a_gene, curvature, converged = _newton(evaluate, a0, lower=lower, upper=upper, max_iter=max_iter, tol=tol)
    else:
        a_gene, curvature, converged = a0, np.full(n_genes, np.nan), expressed.copy()
    genewise = np.exp(a_gene)
    trend, trend_info = fit_trend(genewise, base_mean, min_disp=MIN_DISP)
    with np.errstate(divide="ignore", invalid="ignore"):
        residual = np.log(genewise) - np.log(trend)
    fit_genes = expressed & (genewise >= 100 * MIN_DISP) & np.isfinite(residual)
    mad = float(np.median(np.abs(residual[fit_genes] - np.median(residual[fit_genes]))) / 0.6744897501960817)
    squared_logres = mad * mad
    n_params = layout.n_groups
    prior_var = max(squared_logres - float(special.polygamma(1, (n - n_params) / 2.0)), 0.25)
    if method == "cox-reid":
        # start from the quadratic approximation of the likelihood at its maximum, then Newton on the posterior
        with np.errstate(divide="ignore", invalid="ignore"):
            prec = np.where(curvature < 0, -curvature, 0.0)
            a_start = np.where(
                expressed, (prec * a_gene + np.log(trend) / prior_var) / (prec + 1.0 / prior_var), np.nan
            )
        a_map, _, map_converged = _newton(
            evaluate,
            np.clip(a_start, lower, upper),
            lower=lower,
            upper=upper,
            max_iter=max_iter,
            tol=tol,
            prior=(np.log(trend), prior_var),
        )
        final = np.exp(a_map)
        converged &= map_converged
    else:  # the moments estimates are final: no likelihood, so no posterior
        final = genewise
    outlier = expressed & (residual > 2.0 * np.sqrt(squared_logres))
    final = np.where(outlier, genewise, final)
    final = np.where(expressed, np.clip(final, MIN_DISP, max_disp), np.nan)
    table = pd.DataFrame(
        {
            "dispersion": final,
            "dispersion_genewise": np.where(expressed, genewise, np.nan),
            "dispersion_trend": np.where(expressed, trend, np.nan),
            "dispersion_outlier": outlier,
            "dispersion_converged": converged & expressed,
            "baseMean": base_mean,
        },
        index=adata.var_names,
    )
    as_actual(adata)  # a view becomes an actual AnnData (a copy), as scanpy's: its parent is not written to
    for column in table:
        adata.var[column] = table[column].to_numpy()
    adata.uns.setdefault("pertscale", {})["dispersion"] = {
        "method": method,
        "trend": {k: (float(v) if k != "type" else v) for k, v in trend_info.items()},
        "prior_variance": float(prior_var),
        "min_mu": float(min_mu),
        "size_factors": size_factors if isinstance(size_factors, str) else "given",
        "perturbation_column": perturbation_column,
        "covariates": ",".join(covariates or []),
    }
    logger.info(
        "dispersions: %d genes, %d outliers, %d not converged",
        int(expressed.sum()),
        int(outlier.sum()),
        int((expressed & ~converged).sum()),
    )
    return table


def size_factor_values(adata: ad.AnnData, size_factors) -> np.ndarray:
    """The size factors named by an ``obs`` column or given as an array, checked.

    Raises
    ------
    KeyError
        If the column is missing (with the call that makes it).
    ValueError
        If they are not ``(n_obs,)`` positive finite numbers.
    """
    if isinstance(size_factors, str):
        if size_factors not in adata.obs:
            raise KeyError(
                f"obs[{size_factors!r}] not found: compute size factors first with "
                f"ps.pp.size_factors(adata, key_added={size_factors!r}), or pass an array"
            )
        values = adata.obs[size_factors].to_numpy(dtype=np.float64)
    else:
        values = np.asarray(size_factors, dtype=np.float64).ravel()
    if values.shape != (adata.n_obs,):
        raise ValueError(f"size factors have shape {values.shape}; expected one per cell ({adata.n_obs},)")
    if not (np.isfinite(values) & (values > 0)).all():
        raise ValueError("size factors must be positive finite numbers; some are not")
    return values


def covariate_levels(obs: pd.DataFrame, covariates, *, control: np.ndarray | None = None) -> tuple[np.ndarray, list]:
    """Each cell's level of the covariates (their combinations), as codes ``0 .. n_levels - 1``.

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

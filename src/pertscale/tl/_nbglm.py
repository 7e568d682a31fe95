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

from .._validation import check_number, check_shape, get_matrix, perturbation_labels
from ..cluster import compute
from ..io._read import as_dask, per_block
from ._engine import Groups, aligned

logger = logging.getLogger(__name__)

#: Dispersion estimation methods.
DISPERSION_METHODS = ("cox-reid", "moments")
#: Newton steps in log dispersion are at most this long.
MAX_STEP = 3.0


def _group_sizes(codes: np.ndarray) -> np.ndarray:
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    return np.diff(np.r_[starts, codes.shape[0]])


def _moments_task(block, codes, sf):
    from ..kernels.nbglm import dispersion_moments_block

    if codes.shape[0] == 0:
        return np.zeros((1, 4, block.shape[1]))
    return dispersion_moments_block(sp.csr_matrix(block), _group_sizes(codes), sf)[None]


def _piece_sums_task(block, sf):
    from ..kernels.nbglm import check_counts
    from ..kernels.wilcoxon import canonical_csr

    block = canonical_csr(block)
    check_counts(block)
    z = sp.diags(1.0 / sf) @ block.astype(np.float64)
    return np.stack([np.asarray(z.sum(axis=0)).ravel(), np.asarray(z.multiply(z).sum(axis=0)).ravel()])[None]


def _apl_task(block, codes, sf, alpha, min_mu, active):
    from ..kernels.nbglm import dispersion_apl_block

    if codes.shape[0] == 0:
        return np.zeros((1, 6, block.shape[1]))
    return dispersion_apl_block(sp.csr_matrix(block), _group_sizes(codes), sf, alpha, min_mu=min_mu, active=active)[
        None
    ]


def _apl_piece_task(block, sf, alpha, means, min_mu, active):
    from ..kernels.nbglm import dispersion_apl_block

    return dispersion_apl_block(
        sp.csr_matrix(block), np.array([block.shape[0]]), sf, alpha, means=means, min_mu=min_mu, active=active
    )[None]


def _sum_blocks(parts: list[da.Array]) -> da.Array:
    return da.concatenate(parts, axis=0).sum(axis=0, split_every=8)


class _Layout:
    """The cells of every label, in blocks: whole groups together, groups longer than a block in pieces."""

    def __init__(self, x: da.Array, labels: pd.Series, size_factors: np.ndarray) -> None:
        budget = int(max(x.chunks[0]))
        codes, names = pd.factorize(labels.to_numpy(), sort=False)
        sizes = np.bincount(codes, minlength=len(names))
        self.n_cells = int(codes.size)
        self.n_groups = len(names)
        large = sizes > budget
        self.large_rows = [np.flatnonzero(codes == g) for g in np.flatnonzero(large)]
        small_codes = np.where(large[codes], -1, codes).astype(np.int32)
        self.pieces = []
        for rows in self.large_rows:
            contiguous = rows[-1] - rows[0] + 1 == rows.size
            piece = x[int(rows[0]) : int(rows[-1]) + 1] if contiguous else x[rows]
            self.pieces.append((piece.rechunk({0: budget, 1: -1}), _chunked(size_factors[rows], budget)))
        self.lay = None
        if (small_codes >= 0).any():
            small = np.flatnonzero(~large)
            remap = np.full(len(names), -1, dtype=np.int32)
            remap[small] = np.arange(small.size, dtype=np.int32)
            codes_small = np.where(small_codes >= 0, remap[np.maximum(small_codes, 0)], -1).astype(np.int32)
            groups = Groups(
                names=[str(names[g]) for g in small],
                codes=codes_small,
                sizes=sizes[small].astype(np.int64),
                control_rows=np.empty(0, dtype=np.int64),
            )
            self.lay = aligned(x, groups, budget=budget)
            chunks = (self.lay.x.chunks[0],)
            self.codes = da.from_array(self.lay.codes, chunks=chunks)
            self.sf = da.from_array(size_factors[self.lay.rows], chunks=chunks)

    def blocks(self, func, n_out: int, *args) -> da.Array | None:
        """``func(block, codes, size_factors, *args)`` of every block of whole groups: ``(blocks, n_out, n_genes)``."""
        if self.lay is None:
            return None
        return per_block(func, n_out, (self.lay.x, "bj"), (self.codes, "b"), (self.sf, "b"), *args)


def _chunked(values: np.ndarray, budget: int) -> da.Array:
    return da.from_array(np.asarray(values, dtype=np.float64), chunks=(budget,))


def _piece_blocks(piece: da.Array, sf: da.Array, func, n_out: int, *args) -> da.Array:
    return per_block(func, n_out, (piece, "bj"), (sf, "b"), *args)


def _newton(evaluate, a0, *, lower, upper, max_iter, tol, prior=None):
    """Maximize, per gene, a function of ``a = log alpha`` given by ``evaluate(a, active) -> (V, G, H)``.

    Newton steps (at most :data:`MAX_STEP` long; a step of that length uphill
    where the curvature is not negative), halved back while the value drops, within
    ``[lower, upper]``. ``prior = (center, variance)`` adds a normal prior on
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
        v, g, h = evaluate(np.where(active, trial, 1.0), active)
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
        step = np.where(h < 0, -g / np.where(h < 0, h, 1.0), np.sign(g) * MAX_STEP)
        step = np.clip(step, -MAX_STEP, MAX_STEP)
        new = np.clip(best + step, lower, upper)
        small = np.abs(new - best) < tol
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
    size_factors: str = "size_factors",
    method: str = "cox-reid",
    min_mu: float = 1e-6,
    max_iter: int = 20,
    tol: float = 1e-4,
    layer: str | None = None,
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
        ``obs`` column of size factors (:func:`pertscale.pp.size_factors`).
    method
        ``"cox-reid"`` (default) or ``"moments"`` (fast, one pass).
    min_mu
        Lower bound of the fitted means in the likelihood (DESeq2's
        ``minmu``). The default, 1e-6, is what DESeq2's documentation gives
        for single-cell counts; DESeq2's and PyDESeq2's default 0.5 suits bulk
        counts but, where most means are far below it, pushes the dispersions
        of sparse genes up.
    max_iter
        Newton passes at most, for each of the two fits.
    tol
        A gene's fit stops when its Newton step in ``log alpha`` is shorter.
    layer
        Use ``layers[layer]`` instead of ``X``.
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
        and finite, or an option is out of range.
    """
    from ..kernels.nbglm import MIN_DISP, starting_dispersions

    if method not in DISPERSION_METHODS:
        raise ValueError(f"dispersion method {method!r} is not supported; choose one of {DISPERSION_METHODS}")
    min_mu = check_number(min_mu, "min_mu", minimum=0, min_open=True)
    max_iter = check_number(max_iter, "max_iter", integer=True, minimum=1)
    tol = check_number(tol, "tol", minimum=0, min_open=True)
    check_shape(adata)
    labels = perturbation_labels(adata.obs, perturbation_column)
    sf = size_factor_values(adata, size_factors)
    x = as_dask(get_matrix(adata, layer))
    if x.numblocks[1] != 1:
        x = x.rechunk({1: -1})
    n_genes = x.shape[1]
    layout = _Layout(x, labels, sf)

    # 1. starting values, per-gene sums of z = y / s
    small = layout.blocks(_moments_task, 4)
    pieces = [_piece_blocks(p, s, _piece_sums_task, 2).sum(axis=0) for p, s in layout.pieces]
    todo = ([small.sum(axis=0, split_every=8)] if small is not None else []) + pieces
    got = list(compute(*todo, scheduler=scheduler, progress=progress, desc="dispersions: moments"))
    sums = got.pop(0) if small is not None else np.zeros((4, n_genes))
    large_means = []
    for rows, (s1, s2) in zip(layout.large_rows, got, strict=True):
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
        alpha = np.exp(a)
        parts = []
        small = layout.blocks(_apl_task, 6, alpha, min_mu, active)
        if small is not None:
            parts.append(small.sum(axis=0, split_every=8))
        parts += [
            _piece_blocks(p, s, _apl_piece_task, 6, alpha, means, min_mu, active).sum(axis=0)
            for (p, s), means in zip(layout.pieces, large_means, strict=True)
        ]
        got = compute(*parts, scheduler=scheduler, progress=progress, desc="dispersions: likelihood")
        total = np.zeros((3, n_genes))
        for k, part in enumerate(got):
            total += part[:3]
            if k >= (small is not None):  # a group in pieces: its Cox-Reid term from the summed W
                w, w1, w2 = part[3:]
                with np.errstate(divide="ignore", invalid="ignore"):
                    total[0] -= 0.5 * np.log(w)
                    total[1] -= 0.5 * w1 / w
                    total[2] -= 0.5 * (w2 / w - (w1 / w) ** 2)
        return total[0], total[1], total[2]

    a0 = np.where(expressed, np.log(start), np.nan)
    if method == "cox-reid":
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
    for column in table:
        adata.var[column] = table[column].to_numpy()
    adata.uns.setdefault("pertscale", {})["dispersion"] = {
        "method": method,
        "trend": {k: (float(v) if k != "type" else v) for k, v in trend_info.items()},
        "prior_variance": float(prior_var),
        "min_mu": float(min_mu),
        "size_factors": size_factors,
        "perturbation_column": perturbation_column,
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

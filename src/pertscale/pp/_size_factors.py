"""Size factors of raw counts, out of core: two passes over row blocks (nb-glm's first step)."""

from __future__ import annotations

import warnings

import anndata as ad
import dask
import numpy as np

from .._validation import as_actual, check_shape, get_matrix
from ..io._read import as_dask, per_block

#: Where each size-factor column's method and layer are recorded: ``uns['pertscale'][RECORD][key_added]``.
RECORD = "size_factors"


def _log_sums(block):
    from ..kernels.nbglm import log_count_sums

    return log_count_sums(block)[None]


def _cell_factors(block, log_mean, usable, method):
    from ..kernels.nbglm import cell_size_factors

    return cell_size_factors(block, log_mean, usable, method)


def size_factors(
    adata: ad.AnnData,
    *,
    method: str = "sparse",
    layer: str | None = None,
    key_added: str = "size_factors",
) -> np.ndarray:
    """Median-of-ratios size factors of every cell, in two passes; stored in ``obs[key_added]``.

    Pass one sums ``log y`` over each gene's non-zero counts; pass two takes
    each cell's median ratio to the genes' references. Cells without any
    usable gene get the median of the others (a warning says how many).
    ``"poscounts"`` and ``"sparse"`` factors are scaled to geometric mean 1
    (DESeq2 scales ``poscounts`` so); ``"ratio"`` factors are DESeq2's own,
    not scaled (its ``estimateSizeFactorsForMatrix``).

    The first step of nb-glm (DESeq2's ``estimateSizeFactors``, PyDESeq2's
    ``fit_size_factors``); the next is :func:`pertscale.tl.dispersions` (or
    its steps, from :func:`pertscale.tl.fit_genewise_dispersions`), which
    finds them in ``obs[key_added]``. Computes here, with plain
    ``dask.compute`` on Dask's current scheduler (the face's context, a
    ``distributed.Client``, or Dask's default threads): each pass is a
    reduction the next one needs.

    Parameters
    ----------
    adata
        ``n_obs x n_vars`` raw UMI counts in ``X`` (or ``layers[layer]``),
        lazy or in memory.
    method
        ``"sparse"`` (default; crispyx's sparse-aware median of ratios): the
        reference of a gene is the geometric mean of its non-zero counts and
        a cell's factor the median of ``y / reference`` over its non-zero
        genes. ``"poscounts"`` (DESeq2's ``type="poscounts"``, PyDESeq2's
        ``size_factors_fit_type="poscounts"``): reference ``exp(sum log y /
        n_obs)`` over non-zero counts, genes with a reference above 1, the
        median taken of log ratios. ``"ratio"`` (DESeq2's classic median of
        ratios, Anders & Huber 2010): only genes with no zero count.
    layer
        Use ``layers[layer]`` instead of ``X``.
    key_added
        ``obs`` column that receives them; the method and layer are
        recorded in ``uns['pertscale']['size_factors'][key_added]``, where
        :func:`pertscale.tl.rank_genes_groups` checks them.

    Returns
    -------
    numpy.ndarray
        ``(n_obs,)`` float64 size factors (also in ``obs[key_added]``).

    Raises
    ------
    ValueError
        If the matrix is not raw counts (non-integer, negative or NaN
        values), the method is unknown, or (``"ratio"``) every gene has a
        zero count: use ``"sparse"`` or ``"poscounts"`` for single cells.

    Notes
    -----
    On a view (``adata[mask]``), ``adata`` becomes an actual AnnData holding
    a copy of its data before ``obs[key_added]`` is written, as scanpy does
    (anndata's ``ImplicitModificationWarning``); its parent is left as it
    was.
    """
    from ..kernels.nbglm import SIZE_FACTOR_METHODS, finish_size_factors, reference_log_means

    if method not in SIZE_FACTOR_METHODS:
        raise ValueError(f"size factor method {method!r} is not supported; choose one of {SIZE_FACTOR_METHODS}")
    check_shape(adata)
    x = as_dask(get_matrix(adata, layer))
    if x.numblocks[1] != 1:
        x = x.rechunk({1: -1})
    n_obs, n_vars = x.shape
    sums = per_block(_log_sums, 2, (x, "bj")).sum(axis=0, split_every=8)
    (sums,) = dask.compute(sums)
    log_mean, usable = reference_log_means(sums, n_obs, method)
    if not usable.any():
        why = "; every gene has a zero in some cell: use method='sparse' or 'poscounts'" if method == "ratio" else ""
        raise ValueError(f"no gene can serve as a reference for size factors with method={method!r}{why}")
    raw = x.map_blocks(
        _cell_factors, log_mean, usable, method, drop_axis=1, chunks=(x.chunks[0],), dtype=np.float64, meta=np.empty(0)
    )
    (raw,) = dask.compute(raw)
    factors, filled = finish_size_factors(raw, rescale=method != "ratio")
    if filled:
        warnings.warn(
            f"{filled:,} cell(s) have no count in a reference gene: they get the median size factor",
            UserWarning,
            stacklevel=2,
        )
    as_actual(adata)  # a view becomes an actual AnnData (a copy), as scanpy's: its parent is not written to
    adata.obs[key_added] = factors
    records = adata.uns.setdefault("pertscale", {}).setdefault(RECORD, {})
    records[key_added] = {"method": method, "layer": layer or "X"}
    return factors

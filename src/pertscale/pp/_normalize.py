"""Lazy, blockwise normalization."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np

from .._validation import as_actual, check_target_sum, get_matrix, log1p_record
from ..io._read import as_dask, map_csr
from ..kernels.qc import log1p_values, normalize_rows
from ..variables import TOTAL_COUNTS


def _set(adata: ad.AnnData, layer: str | None, x) -> None:
    """Replace ``X`` or a layer; a view first becomes an actual AnnData (its parent is never written to)."""
    as_actual(adata)
    if layer is None:
        adata.X = x
    else:
        adata.layers[layer] = x


def _where(layer: str | None) -> str:
    return "X" if layer is None else f"layers[{layer!r}]"


def _mark_log1p(adata: ad.AnnData, layer: str | None, record: dict | None) -> None:
    """Record (or, with ``None``, drop the record) that ``X`` or a layer holds log1p values; see ``log1p_record``."""
    if layer is None:
        if record is None:
            adata.uns.pop("log1p", None)
        else:
            adata.uns["log1p"] = record
        return
    root = adata.uns.setdefault("pertscale", {})
    layers = root.setdefault("log1p_layers", {})
    if record is None:
        layers.pop(layer, None)
        if not layers:
            root.pop("log1p_layers")
    else:
        layers[layer] = record


def _float_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def normalize_total(
    adata: ad.AnnData,
    *,
    target_sum: float | None = 1e4,
    layer: str | None = None,
) -> None:
    """Scale every cell to ``target_sum`` total counts, lazily.

    Equal to ``scanpy.pp.normalize_total(adata, target_sum=...)`` bit for bit
    on integer counts (float32 arithmetic, the same order of operations).
    Each block is scaled on its own: no pass over the matrix unless
    ``target_sum`` is ``None``.

    Parameters
    ----------
    adata
        Raw counts in ``X`` (or ``layers[layer]``); replaced by the scaled
        counts (float32; float64 stays float64), not log transformed.
    target_sum
        Counts per cell after scaling; ``None`` uses the median of the
        non-zero cell totals (one pass), as scanpy does.
    layer
        Normalize a layer instead of ``X``.

    Raises
    ------
    KeyError
        If the layer is missing.
    ValueError
        If ``target_sum`` is not a finite number between 1e-28 and 1e37
        (:data:`pertscale._validation.TARGET_SUM_RANGE`): beyond, the
        float32 arithmetic overflows or underflows and the scaling would be
        silently skipped (``1e300``, ``inf``) or every value set to 0
        (``1e-300``).
    TypeError
        If ``target_sum`` is not a number.

    Notes
    -----
    A log1p mark of the matrix (``uns['log1p']`` for ``X``) is removed: the
    matrix now holds scaled values, and :func:`log1p` logs them.

    On a view (``adata[mask]``) ``adata`` becomes an actual AnnData holding
    a copy of its data first, as scanpy does (anndata's
    ``ImplicitModificationWarning``); the AnnData it was a view of is left
    as it was. The result is float (float32; float64 stays float64), never
    the integer dtype of the counts.
    """
    target_sum = check_target_sum(target_sum, allow_none=True)
    x = as_dask(get_matrix(adata, layer))
    if target_sum is None:
        import dask

        from .._progress import labelled
        from ..kernels.qc import CELL_STATS, cell_stats

        with labelled("cell totals"):
            (cells,) = dask.compute(x.map_blocks(cell_stats, dtype=np.float64, chunks=(x.chunks[0], (3,))))
        totals = cells[:, CELL_STATS.index(TOTAL_COUNTS)]
        target_sum = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0
    dtype = _float_dtype(x.dtype)
    _set(adata, layer, map_csr(x, normalize_rows, float(target_sum), dtype=dtype))
    # the matrix now holds scaled values, not log1p ones: a mark left from before (a file whose X was put back
    # to counts) would make log1p skip them
    _mark_log1p(adata, layer, None)
    adata.uns.setdefault("pertscale", {})["normalize_total"] = {"target_sum": float(target_sum), "layer": layer or "X"}


def log1p(adata: ad.AnnData, *, layer: str | None = None) -> None:
    """Natural ``log(1 + x)`` of ``X`` (or a layer), lazily, blockwise.

    Equal to ``scanpy.pp.log1p`` (natural log, float32 kept; integers become
    float32). Zeros stay zero so the matrix stays sparse. The matrix is
    marked as log1p data: ``X`` by ``uns['log1p'] = {'base': None}``
    (scanpy's mark, which :func:`pertscale.tl.rank_genes_groups` and
    nb-glm read), a layer by ``uns['pertscale']['log1p_layers'][layer]``
    (logging a layer does not mark ``X``).

    A matrix marked already is not logged again: a warning says so and
    nothing changes (scanpy warns, then logs twice). If the mark is stale
    (the matrix was replaced by counts), drop it first:
    ``del adata.uns['log1p']``.

    On a view (``adata[mask]``) ``adata`` becomes an actual AnnData holding
    a copy of its data first, as scanpy does (anndata's
    ``ImplicitModificationWarning``); the AnnData it was a view of is left
    as it was.

    Parameters
    ----------
    adata
        Non-negative values (normalized counts) in ``X`` or ``layers[layer]``.
    layer
        Transform a layer instead of ``X``.

    Raises
    ------
    KeyError
        If the layer is missing.

    Warns
    -----
    UserWarning
        If the matrix is marked as log1p data already (then it is left as it is).
    """
    x = get_matrix(adata, layer)
    if log1p_record(adata, layer) is not None:
        mark = "uns['log1p']" if layer is None else f"uns['pertscale']['log1p_layers'][{layer!r}]"
        warnings.warn(
            f"{_where(layer)} is log1p data already ({mark} is set): it is not logged again. If it holds counts "
            f"or normalized counts and the mark is left over, delete {mark} and call log1p again",
            UserWarning,
            stacklevel=2,
        )
        return
    x = as_dask(x)
    _set(adata, layer, map_csr(x, log1p_values, dtype=_float_dtype(x.dtype)))
    _mark_log1p(adata, layer, {"base": None})

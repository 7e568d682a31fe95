"""Lazy, blockwise normalization."""

from __future__ import annotations

import anndata as ad
import numpy as np

from .._validation import check_number, get_matrix
from ..io._read import as_dask, map_csr
from ..kernels.qc import log1p_values, normalize_rows


def _set(adata: ad.AnnData, layer: str | None, x) -> None:
    if layer is None:
        adata.X = x
    else:
        adata.layers[layer] = x


def _float_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def normalize_total(
    adata: ad.AnnData,
    *,
    target_sum: float | None = 1e4,
    layer: str | None = None,
    scheduler=None,
    progress: bool | None = None,
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
    scheduler
        Where to compute the median (``target_sum=None`` only).
    progress
        Show a progress bar.

    Raises
    ------
    KeyError
        If the layer is missing.
    ValueError
        If ``target_sum`` is not a finite number above 0 (``inf`` would
        silently skip the scaling).
    TypeError
        If ``target_sum`` is not a number.
    """
    target_sum = check_number(target_sum, "target_sum", minimum=0, min_open=True, allow_none=True, flag="--target-sum")
    x = as_dask(get_matrix(adata, layer))
    if target_sum is None:
        from ..cluster import compute
        from ..kernels.qc import CELL_STATS, cell_stats

        (cells,) = compute(
            x.map_blocks(cell_stats, dtype=np.float64, chunks=(x.chunks[0], (3,))),
            scheduler=scheduler,
            progress=progress,
            desc="cell totals",
        )
        totals = cells[:, CELL_STATS.index("total_counts")]
        target_sum = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0
    dtype = _float_dtype(x.dtype)
    _set(
        adata,
        layer,
        map_csr(x, normalize_rows, float(target_sum), dtype=dtype),
    )
    adata.uns.setdefault("pertscale", {})["normalize_total"] = {"target_sum": float(target_sum)}


def log1p(adata: ad.AnnData, *, layer: str | None = None) -> None:
    """Natural ``log(1 + x)`` of ``X`` (or a layer), lazily, blockwise.

    Equal to ``scanpy.pp.log1p`` (natural log, float32 kept). Zeros stay zero
    so the matrix stays sparse.

    Raises
    ------
    KeyError
        If the layer is missing.
    """
    x = as_dask(get_matrix(adata, layer))
    dtype = _float_dtype(x.dtype)
    _set(adata, layer, map_csr(x, log1p_values, dtype=dtype))
    adata.uns["log1p"] = {"base": None}

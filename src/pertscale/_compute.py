"""The face of lazy analyses: compute an AnnData's lazy arrays, or write them, on a scheduler chosen once.

Analyses return AnnData objects whose large arrays are Dask arrays. Nothing
is computed until one of these runs. Each opens the face's context
(:func:`pertscale.cluster.using`): an active ``distributed.Client``, else
threads in this process when the data fit comfortably in memory, else the
local process cluster; inside an outer ``using`` block, that block's choice.
Then every lazy array of the object is computed in one graph, so work they
share (a pass over the matrix, the control summary) is done once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad

from .cluster import using
from .io._lazy import lazy_elements, materialize, nbytes_in_memory

__all__ = ["compute", "lazy_elements", "write"]


def compute(adata: ad.AnnData, *, scheduler=None, progress: bool | None = None) -> ad.AnnData:
    """An in-memory copy of ``adata``: every lazy array computed, in one graph.

    Parameters
    ----------
    adata
        An AnnData whose ``X``, ``layers``, ``obsm``, ``varm`` or ``uns`` may
        hold Dask arrays (the results of :func:`pertscale.tl.rank_genes_groups`,
        a normalized lazy matrix, the results stored in ``uns['pertscale']``).
    scheduler
        Where to compute (see :func:`pertscale.cluster.using`); default
        chosen from the data's size, or the enclosing ``using`` block's.
    progress
        Show a progress bar; default ``pertscale.settings.progress``.

    Returns
    -------
    anndata.AnnData
        A new object; ``adata`` itself is left lazy. Sparse Dask arrays
        become ``scipy.sparse.csr_matrix``.

    Raises
    ------
    TypeError
        If ``adata`` is not an AnnData (Dask collections go to
        ``dask.compute`` or :func:`pertscale.cluster.compute`).
    ValueError, ConnectionError
        For a scheduler that is not known or does not answer.
    """
    if not isinstance(adata, ad.AnnData):
        hint = (
            "; for Dask arrays and other collections use dask.compute(...) or ps.cluster.compute(...)"
            if hasattr(adata, "__dask_graph__")
            else ""
        )
        raise TypeError(
            "ps.compute takes an AnnData (whose lazy arrays, in X, layers, obsm, varm or uns, it computes), "
            f"not {'None' if adata is None else type(adata).__name__}{hint}"
        )
    with using(scheduler, progress=progress, nbytes=nbytes_in_memory(adata)):
        return _with_scanpy_view(materialize(adata))


def _with_scanpy_view(adata: ad.AnnData) -> ad.AnnData:
    """Add scanpy's ``uns['rank_genes_groups']`` to computed test results that asked for it (``scanpy_format=True``)."""
    root = adata.uns.get("pertscale") if isinstance(adata.uns.get("pertscale"), dict) else {}
    if root.get("scanpy_format") and "rank_genes_groups" not in adata.uns:
        from .tl._results import scanpy_uns

        scanpy_uns(adata)
    return adata


def write(
    adata: ad.AnnData | str | Path,
    path: str | Path | ad.AnnData,
    *,
    scheduler=None,
    progress: bool | None = None,
    **options: Any,
) -> Path:
    """Write AnnData atomically as ``.h5ad`` or ``.zarr``, computing its lazy arrays on a scheduler chosen once.

    :func:`pertscale.io.write` (its options: ``include``, ``compression``,
    ``compression_opts``; scanpy's argument order ``write(path, adata)``
    too) inside the face's context (:func:`pertscale.cluster.using`).

    Parameters
    ----------
    adata, path
        The object and where to write it.
    scheduler, progress
        Where to compute (default: chosen from the data's size, or the
        enclosing ``using`` block's) and whether to show progress bars.
    **options
        Passed to :func:`pertscale.io.write`.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    ValueError, TypeError, ConnectionError
        As :func:`pertscale.io.write`, and for a scheduler that is not known
        or does not answer.
    """
    from .io._write import write as write_file

    if isinstance(adata, (str, Path)) and isinstance(path, ad.AnnData):
        adata, path = path, adata
    nbytes = nbytes_in_memory(adata) if isinstance(adata, ad.AnnData) else None
    with using(scheduler, progress=progress, nbytes=nbytes):
        root = adata.uns.get("pertscale") if isinstance(adata, ad.AnnData) else None
        if isinstance(root, dict) and root.get("scanpy_format") and str(path).lower().endswith(".h5ad"):
            adata = _with_scanpy_view(materialize(adata))  # scanpy's view is made from the computed statistics
        return write_file(adata, path, **options)

"""Lazy reading of ``.h5ad`` files and ``.zarr`` stores."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import dask.array as da
import h5py
import numpy as np
import psutil
import scipy.sparse as sp

from .._settings import settings
from ..cluster import n_cores

logger = logging.getLogger(__name__)

#: Smallest automatic row chunk: below this, scheduling costs more than the work.
MIN_CHUNK_ROWS = 1_000


def _not_anndata(path: Path, why: str) -> ValueError:
    return ValueError(
        f"{str(path)!r} is not an AnnData store ({why}); pass an .h5ad file or a .zarr "
        "directory written by anndata (anndata.AnnData.write_h5ad / write_zarr)"
    )


def _open(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {str(path)!r}")
    if path.is_dir():
        import zarr

        try:
            group = zarr.open_group(str(path), mode="r")
        except Exception as err:  # zarr raises several types for a non-store
            raise _not_anndata(path, f"a directory but not a zarr group: {err}") from err
        return group, "zarr"
    if not h5py.is_hdf5(path):
        raise _not_anndata(path, "not an HDF5 file")
    return h5py.File(path, "r"), "h5ad"


def auto_chunk_size(
    n_obs: int,
    bytes_per_row: float,
    *,
    n_workers: int | None = None,
    available_bytes: int | None = None,
) -> int:
    """Rows per block, from the memory there is.

    Each worker may hold a few blocks and their working copies at once; the
    budget per block is ``memory_fraction * available / (8 * n_workers)``.
    Chunks are at least ``MIN_CHUNK_ROWS`` rows, and small enough that every
    worker gets a block when the data allow.

    Parameters
    ----------
    n_obs
        Rows (cells) of the matrix.
    bytes_per_row
        Average in-memory bytes of one row (values and column indices).
    n_workers
        Workers sharing the memory; default the core count.
    available_bytes
        Memory to plan for; default ``psutil.virtual_memory().available``.

    Returns
    -------
    int
        Row chunk size, between ``min(n_obs, MIN_CHUNK_ROWS)`` and ``n_obs``.
    """
    n_workers = n_workers or settings.n_workers or n_cores()
    available = psutil.virtual_memory().available if available_bytes is None else available_bytes
    budget = settings.memory_fraction * available / (8 * n_workers)
    rows = int(budget // max(bytes_per_row, 1.0))
    rows = min(rows, -(-n_obs // n_workers))  # one block per worker at least
    return int(max(1, min(n_obs, max(rows, MIN_CHUNK_ROWS))))


def _csr_block(block):
    return sp.csr_matrix(block)


def read(
    path: str | Path,
    *,
    layer: str | None = None,
    chunk_size: int | None = None,
) -> ad.AnnData:
    """Open an AnnData store lazily.

    ``obs`` and ``var`` are read into memory; the matrix becomes a
    ``dask.array.Array`` of ``scipy.sparse.csr_matrix`` row blocks. The graph
    carries only the path and row slices: each task opens the file itself,
    so it runs in other processes and on other machines that see the path.

    Parameters
    ----------
    path
        An ``.h5ad`` file or a ``.zarr`` directory.
    layer
        Read ``layers[layer]`` as ``X`` instead of ``X``.
    chunk_size
        Rows per block. Default: computed from available memory by
        :func:`auto_chunk_size` (large blocks: a column sum over 2 M cells
        took 15 s with 1,000-row blocks and 0.3 s with 100,000-row blocks).

    Returns
    -------
    anndata.AnnData
        ``n_obs x n_vars``, ``X`` lazy (CSR blocks, the stored dtype: raw
        counts stay integers). ``uns['pertscale']['source']`` records the path
        and layer.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is not an AnnData store, the layer is missing, or
        ``chunk_size`` is not positive.
    """
    path = Path(path)
    store, fmt = _open(path)
    try:
        for key in ("obs", "var"):
            if key not in store:
                raise _not_anndata(path, f"it has no {key!r} group")
        if layer is None:
            if "X" not in store:
                raise _not_anndata(path, "it has no 'X'")
            elem = store["X"]
        else:
            layers = list(store["layers"].keys()) if "layers" in store else []
            if layer not in layers:
                raise ValueError(f"layer {layer!r} not found in {str(path)!r}; layers present: {layers}")
            elem = store["layers"][layer]
        obs = ad.io.read_elem(store["obs"])
        var = ad.io.read_elem(store["var"])
        encoding = elem.attrs.get("encoding-type", "array")
        n_obs, n_vars = len(obs), len(var)
        if encoding in ("csr_matrix", "csc_matrix"):
            nnz = elem["data"].shape[0]
            itemsize = elem["data"].dtype.itemsize + elem["indices"].dtype.itemsize
            bytes_per_row = nnz / max(n_obs, 1) * itemsize + 8
        elif encoding == "array":
            bytes_per_row = n_vars * elem.dtype.itemsize
        else:
            raise ValueError(f"{str(path)!r}: matrix encoding {encoding!r} is not supported")
        if chunk_size is None:
            chunk_size = auto_chunk_size(n_obs, bytes_per_row)
        elif int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
        chunk_size = int(min(chunk_size, max(n_obs, 1)))
        if encoding == "csc_matrix":
            # column-major on disk: read column blocks lazily, then re-block by rows
            x = ad.experimental.read_elem_lazy(elem)
            x = x.map_blocks(_csr_block, dtype=x.dtype, meta=sp.csr_matrix((0, 0), dtype=x.dtype))
            x = x.rechunk((chunk_size, -1))
        else:
            x = ad.experimental.read_elem_lazy(elem, chunks=(chunk_size, n_vars))
        if encoding == "array":
            x = x.map_blocks(_csr_block, dtype=x.dtype, meta=sp.csr_matrix((0, 0), dtype=x.dtype))
    finally:
        if fmt == "h5ad":
            store.close()
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.uns["pertscale"] = {"source": {"path": str(path.resolve()), "layer": layer or "X", "format": fmt}}
    logger.info("opened %s lazily: %d x %d, row chunks of %d", path, n_obs, n_vars, chunk_size)
    return adata


def as_dask(x, *, chunk_size: int | None = None) -> da.Array:
    """A matrix as a Dask array of CSR row blocks spanning all columns.

    In-memory numpy or scipy matrices are wrapped; Dask arrays are rechunked
    to full-width row blocks (and dense blocks converted to CSR).
    """
    if isinstance(x, da.Array):
        if x.numblocks[1] != 1:
            x = x.rechunk({1: -1})
        if not sp.issparse(x._meta):
            x = x.map_blocks(_csr_block, dtype=x.dtype, meta=sp.csr_matrix((0, 0), dtype=x.dtype))
        return x
    if hasattr(x, "to_memory"):  # anndata backed sparse dataset
        x = x.to_memory()
    x = sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)
    n_obs = x.shape[0]
    if chunk_size is None:
        nnz = x.nnz if sp.issparse(x) else x.size
        chunk_size = auto_chunk_size(n_obs, nnz / max(n_obs, 1) * (x.dtype.itemsize + 4) + 8)
    out = da.from_array(x, chunks=(min(chunk_size, max(n_obs, 1)), -1), asarray=False)
    if not sp.issparse(x):
        out = out.map_blocks(_csr_block, dtype=x.dtype, meta=sp.csr_matrix((0, 0), dtype=x.dtype))
    return out

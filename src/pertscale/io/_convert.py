"""``ps.io.convert``: an AnnData copied between ``.h5ad`` and ``.zarr``, its matrix as CSR, out of core."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from ._blocks import StoredMatrix
from ._read import _describe, _matrix_key, _open, read

logger = logging.getLogger(__name__)

#: Entries of a CSC matrix read at once while transposing it (about 100 MB of values and indices).
SLAB_ENTRIES = 8_000_000


def csc_to_csr(stored: StoredMatrix, workdir: Path) -> sp.csr_matrix:
    """Transpose a stored CSC matrix to CSR with the values and indices in memory-mapped files under ``workdir``.

    Two reads of the stored matrix, a slab of columns at a time (about
    :data:`SLAB_ENTRIES` entries): the first counts the entries of each
    row (only the indices are read), the second places each entry at its
    row's next free position. Columns are visited in order, so every row's
    column indices come out sorted. Memory: one slab and two ``n_obs``
    int64 arrays; the ``nnz`` values and indices live in the files (the
    operating system pages them out as it needs).

    Returns
    -------
    scipy.sparse.csr_matrix
        ``n_obs x n_vars``, ``data`` and ``indices`` memory-mapped (valid
        while ``workdir`` exists).
    """
    n_obs, n_vars = stored.shape
    elem, handle = stored.open()
    try:
        col_ptr = np.asarray(elem["indptr"][:], dtype=np.int64)
        nnz = int(col_ptr[-1])
        slabs = _slabs(col_ptr, n_vars)
        counts = np.zeros(n_obs, dtype=np.int64)
        for a, b in slabs:
            counts += np.bincount(np.asarray(elem["indices"][col_ptr[a] : col_ptr[b]]), minlength=n_obs)
    finally:
        if handle is not None:
            handle.close()
    indptr = np.concatenate([[0], np.cumsum(counts)])
    index_dtype = np.int32 if n_vars < 2**31 else np.int64
    data = np.memmap(workdir / "data", dtype=stored.dtype, mode="w+", shape=(max(nnz, 1),))[:nnz]
    indices = np.memmap(workdir / "indices", dtype=index_dtype, mode="w+", shape=(max(nnz, 1),))[:nnz]
    fill = indptr[:-1].copy()
    for a, b in slabs:
        slab = stored.read_major(a, b).tocoo()  # columns a:b, entries in column order
        rows, cols, values = slab.row.astype(np.int64), slab.col.astype(np.int64) + a, slab.data
        order = np.argsort(rows, kind="stable")  # by row; within a row, still by column
        rows = rows[order]
        rank = np.arange(rows.size) - np.searchsorted(rows, rows, side="left")
        pos = fill[rows] + rank
        data[pos] = values[order]
        indices[pos] = cols[order]
        fill += np.bincount(rows, minlength=n_obs)
    if not np.array_equal(fill, indptr[1:]):  # every entry placed once
        raise RuntimeError("the transposition placed a wrong number of entries; please report this")
    data.flush()
    indices.flush()
    return sp.csr_matrix((data, indices, indptr), shape=(n_obs, n_vars), copy=False)


def _slabs(col_ptr: np.ndarray, n_vars: int) -> list[tuple[int, int]]:
    slabs, a = [], 0
    while a < n_vars:
        b = int(np.searchsorted(col_ptr, col_ptr[a] + SLAB_ENTRIES, side="right")) - 1
        b = min(max(b, a + 1), n_vars)
        slabs.append((a, b))
        a = b
    return slabs


def stored_matrix(path: str | Path, *, layer: str | None = None, use_raw: bool = False) -> StoredMatrix:
    """What and where the matrix of ``path`` is (encoding ``"csr_matrix"``, ``"csc_matrix"`` or ``"array"``,
    shape, dtype), from its metadata: no values are read.
    """
    path = Path(path)
    store, fmt = _open(path)
    try:
        key = _matrix_key(store, path, layer, use_raw=use_raw)
        attrs = store[key].attrs
        shape = tuple(int(n) for n in (attrs["shape"] if "shape" in attrs else store[key].shape))
        encoding, dtype, _ = _describe(store[key], key, path, *shape)
        return StoredMatrix(str(path.resolve()), fmt, key, encoding, shape, dtype)
    finally:
        if fmt == "h5ad":
            store.close()


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    chunk_size: int | None = None,
    compression: str | None = "gzip",
    overwrite: bool = False,
) -> Path:
    """Copy an AnnData between ``.h5ad`` and ``.zarr`` (by ``dst``'s suffix), its matrix as CSR, out of core.

    ``X`` (or ``layers[layer]``, or ``raw.X``) becomes the CSR ``X`` of
    ``dst``; ``obs``, ``var``, ``obsm``, ``varm`` and ``uns`` are copied, as
    :func:`pertscale.read` reads them. A CSR or dense matrix is copied a row
    block at a time (``chunk_size`` rows; :func:`pertscale.write` streams it
    into an ``.h5ad``). A CSC matrix is transposed once, out of core
    (:func:`csc_to_csr`: two reads of it, its entries placed in
    memory-mapped files in a temporary directory beside ``dst``), so that
    every later pass reads rows, not all columns. The write is atomic
    (:func:`pertscale.io.write`). It computes on Dask's current scheduler
    (inside :func:`pertscale.cluster.using`, a ``distributed.Client``, or
    threads).

    Parameters
    ----------
    src, dst
        ``.h5ad`` files or ``.zarr`` stores.
    layer, use_raw
        The matrix to copy, as for :func:`pertscale.read`.
    chunk_size
        Rows per block read.
    compression
        HDF5 compression of an ``.h5ad`` ``dst`` (``"gzip"``, ``"lzf"``, ``None``).
    overwrite
        Replace an existing ``dst``.

    Returns
    -------
    pathlib.Path
        ``dst``.

    Raises
    ------
    FileExistsError
        If ``dst`` exists and ``overwrite`` is not set.
    ValueError
        If ``dst`` is ``src`` or inside it, if it ends in neither ``.h5ad``
        nor ``.zarr`` (the message names the formats), or as
        :func:`pertscale.read` for ``src``.
    """
    from ._write import check_format, check_not_input, write

    src, dst = Path(src), Path(dst)
    check_format(dst, what="cannot convert to")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{str(dst)!r} exists; pass overwrite=True to replace it")
    check_not_input(dst, [src], what="cannot convert to")
    adata = read(src, layer=layer, use_raw=use_raw, chunk_size=chunk_size)
    stored = stored_matrix(src, layer=layer, use_raw=use_raw)
    workdir = None
    try:
        if stored.encoding == "csc_matrix":
            workdir = Path(tempfile.mkdtemp(prefix=f".{dst.name}.transpose-", dir=dst.parent))
            logger.info("transposing the CSC matrix of %s into CSR (out of core, in %s)", src, workdir)
            adata = ad.AnnData(
                X=csc_to_csr(stored, workdir), obs=adata.obs, var=adata.var, obsm=dict(adata.obsm),
                varm=dict(adata.varm), uns=dict(adata.uns),
            )  # fmt: skip
        adata.uns.get("pertscale", {}).pop("source", None)  # the copy is not read from src: writing is allowed
        return write(adata, dst, compression=compression)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

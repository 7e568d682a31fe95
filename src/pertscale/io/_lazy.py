"""An AnnData's lazy arrays: found, computed into memory, or written block by block into zarr stores.

Analyses return AnnData objects whose large arrays are Dask arrays.
:func:`materialize` computes every lazy array of an object in one graph,
and :func:`write_zarr_stores` writes several objects' arrays in one graph,
so work they share (a pass over the matrix, the control summary) is done
once. Both call plain ``dask.compute``: they run on the scheduler of the
face that called them (:func:`pertscale.compute`, :func:`pertscale.write`,
``pertscale run``), or Dask's current one.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import anndata as ad
import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp

from .._progress import labelled

logger = logging.getLogger(__name__)

#: Target size of one stored chunk of a dense result array, in bytes.
CHUNK_BYTES = 16 * 2**20


def lazy_elements(adata: ad.AnnData, *, nested: bool = False) -> dict[tuple, da.Array]:
    """The Dask arrays of ``X``, ``layers``, ``obsm`` and ``varm``, keyed by ``(attribute, key)``.

    With ``nested=True`` also those inside ``uns`` (stored results: a
    results AnnData's layers, PCA's scores), keyed by ``("uns", path)``
    with ``path`` the tuple of names that leads to them.
    """
    found: dict[tuple, da.Array] = {}
    if isinstance(adata.X, da.Array):
        found[("X", None)] = adata.X
    for attr in ("layers", "obsm", "varm"):
        for key, value in getattr(adata, attr).items():
            if isinstance(value, da.Array):
                found[(attr, key)] = value
    if nested:
        for path, value in _walk(adata.uns, ()):
            found[("uns", path)] = value
    return found


def _walk(node, path: tuple):
    if isinstance(node, da.Array):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, (*path, key))
    elif isinstance(node, ad.AnnData):
        for (attr, key), value in lazy_elements(node, nested=True).items():
            inner = () if key is None else key if attr == "uns" else (key,)
            yield (*path, attr, *inner), value


def _assign(adata: ad.AnnData, where: tuple, value) -> None:
    """Set ``value`` (or delete, for ``None``) at a key of :func:`lazy_elements`."""
    attr, key = where
    _set_in(adata, (attr,) if key is None else (attr, *key) if attr == "uns" else (attr, key), value)


def _set_in(node, path: tuple, value) -> None:
    if isinstance(node, ad.AnnData):
        attr, rest = path[0], path[1:]
        if attr == "X":
            node.X = value
        elif attr == "uns":
            _set_in(node.uns, rest, value)
        elif value is None:
            del getattr(node, attr)[rest[0]]
        else:
            getattr(node, attr)[rest[0]] = value
    elif len(path) > 1:
        _set_in(node[path[0]], path[1:], value)
    elif value is None:
        del node[path[0]]
    else:
        node[path[0]] = value


def materialize(adata: ad.AnnData) -> ad.AnnData:
    """An in-memory copy of ``adata``: every lazy array (also those in ``uns``) computed, in one graph.

    Returns
    -------
    anndata.AnnData
        A new object; ``adata`` itself is left lazy. Sparse Dask arrays
        become ``scipy.sparse.csr_matrix``.
    """
    lazy = lazy_elements(adata, nested=True)
    out = adata.copy()
    if not lazy:
        return out
    values = dask.compute(*lazy.values())
    for where, value in zip(lazy, values, strict=True):
        _assign(out, where, sp.csr_matrix(value) if sp.issparse(value) else value)
    return out


def nbytes_in_memory(adata: ad.AnnData) -> int | None:
    """About how many bytes ``adata``'s largest lazy matrix takes in memory (the face's choice of scheduler).

    The matrix read by :func:`pertscale.read` (its number of non-zeros is
    recorded in ``uns['pertscale']['source']``, 12 bytes each as in the
    main job's plan), scaled to the cells and genes ``adata`` holds; for
    other lazy arrays their dense size; for lazy results, at least the size
    of the matrix that computing them reads (``uns['pertscale']['reads_nbytes']``,
    recorded by :func:`pertscale.tl.rank_genes_groups`); ``None`` when
    nothing is lazy.
    """
    lazy = lazy_elements(adata, nested=True)
    if not lazy:
        return None
    record = (adata.uns.get("pertscale") or {}) if isinstance(adata.uns, dict) else {}
    source = record.get("source") or {}
    nnz, shape = source.get("nnz"), source.get("shape")
    sizes = [int(record["reads_nbytes"])] if record.get("reads_nbytes") is not None else []
    for x in lazy.values():
        if nnz is not None and shape is not None and not _is_dense(x) and x.ndim == 2:
            density = float(nnz) / max(float(shape[0]) * float(shape[1]), 1.0)
            sizes.append(int(density * x.shape[0] * x.shape[1] * 12))
        else:
            sizes.append(int(math.prod(x.shape) * x.dtype.itemsize))
    return max(sizes)


def _is_dense(x: da.Array) -> bool:
    return isinstance(x._meta, np.ndarray)


def write_zarr_stores(items, *, resume: bool = False) -> None:
    """Write AnnData objects as zarr stores, their dense Dask arrays block by block, in one computation.

    Everything else is written by anndata first; then every dense lazy
    array goes straight from the workers into its zarr array (chunks of
    about :data:`CHUNK_BYTES`, whole rows), never gathered in one process.
    All objects' arrays are computed in one graph, so work they share
    (reading a block of the matrix, the control summary of the cells they
    were tested on) is done once. Sparse Dask arrays are left to anndata.
    Every array is compressed with zstd and carries a CRC-32C of each chunk
    (:func:`pertscale.io._blocks.checksummed`), which zarr checks on every
    read: a flipped bit fails the read instead of changing a number.

    Parameters
    ----------
    items
        ``(adata, path)`` pairs; each ``path`` a new ``.zarr`` directory.
    resume
        Record each written block (in ``<path>.done/``, beside the store,
        with the Dask names of the arrays), and continue a store that an
        interrupted call with the same arrays left: its written blocks are
        not computed again. Without it (and when the arrays differ) stores
        are written from the start.
    """
    import shutil

    import zarr
    from dask.base import tokenize

    from ._blocks import checksummed

    written, paths, markers = [], [], []
    for adata, path in items:
        path = Path(path).absolute()  # the workers write into it: their working directory may not be ours
        lazy = {k: v for k, v in lazy_elements(adata, nested=True).items() if _is_dense(v)}
        done = path.with_name(path.name + ".done")
        token = tokenize(sorted((str(k), v.name) for k, v in lazy.items()))
        resuming = resume and path.exists() and (done / "token").exists() and (done / "token").read_text() == token
        if not resuming:
            for old in (path, done):
                shutil.rmtree(old, ignore_errors=True)
            shallow = adata.copy() if lazy else adata
            for where in lazy:
                _assign(shallow, where, None)
            with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
                ad.io.write_zarr(path, shallow, compressors=checksummed())  # every chunk with a CRC-32C
            if resume:
                done.mkdir()
                (done / "token").write_text(token)
        paths.append(path)
        if not lazy:
            continue
        markers.append(done)
        group = zarr.open_group(str(path), mode="a", use_consolidated=False)  # the arrays added since, too
        for j, ((attr, key), x) in enumerate(lazy.items()):
            row_bytes = max(1, math.prod(x.shape[1:]) * x.dtype.itemsize)
            rows = int(max(1, min(x.shape[0], CHUNK_BYTES // row_bytes)))
            name = attr if key is None else "/".join(map(str, (attr, *key))) if attr == "uns" else f"{attr}/{key}"
            if resuming:
                target = group[name]
            else:
                target = group.create_array(
                    name, shape=x.shape, dtype=x.dtype, chunks=(rows, *x.shape[1:]), compressors=checksummed()
                )
                target.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            src = x.rechunk({0: rows, **{i: -1 for i in range(1, x.ndim)}})
            finished = {int(p.name) for p in (done / str(j)).glob("[0-9]*")} if resuming else set()
            if resume:
                (done / str(j)).mkdir(exist_ok=True)
            starts = np.concatenate([[0], np.cumsum(src.chunks[0])])
            if finished:
                logger.info(
                    "%s/%s: %d of %d blocks written before, kept", path.name, name, len(finished), src.numblocks[0]
                )
            for i in range(src.numblocks[0]):
                if i in finished:
                    continue
                marker = str(done / str(j) / str(i)) if resume else None
                written.append(
                    src.blocks[i]
                    .map_blocks(
                        _store_block,
                        target,
                        int(starts[i]),
                        marker,
                        chunks=(1,) * src.ndim,
                        dtype=np.int64,
                        meta=np.empty((0,) * src.ndim, dtype=np.int64),
                    )
                    .sum()
                )
    if written:
        names = ", ".join(Path(p).name.split(".tmp-")[0].lstrip(".") for p in paths)
        with labelled(f"writing {names}"):
            dask.compute(da.stack(written).sum())
    for path in paths:
        zarr.consolidate_metadata(str(path))
    for done in markers:
        shutil.rmtree(done, ignore_errors=True)


def _store_block(block, target, start: int, marker: str | None):
    """Write a block of rows into a zarr array from row ``start``, then record it as written (``marker``).

    One task per stored chunk: no two tasks write one chunk.
    """
    target[start : start + block.shape[0]] = block
    if marker is not None:
        Path(marker).touch()
    return np.ones((1,) * block.ndim, dtype=np.int64)

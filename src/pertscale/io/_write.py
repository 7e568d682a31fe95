"""Atomic writing of AnnData objects."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
import warnings
from pathlib import Path

import anndata as ad
import dask.array as da
import h5py
import scipy.sparse as sp

from .._compute import compute, lazy_elements, write_zarr_stores
from ..cluster import compute as compute_collections
from ..cluster import n_workers_of, resolve_scheduler

logger = logging.getLogger(__name__)

#: Elements per HDF5 chunk of a streamed sparse matrix's ``data``, ``indices`` and ``indptr`` (resizable).
H5_CHUNK = 1 << 16


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


def overlap(target: str | Path, source: str | Path, *, replaces: bool = True) -> str | None:
    """How writing ``target`` would touch ``source``, or ``None`` if it would not.

    Paths are resolved (symbolic links followed) before they are compared.

    Parameters
    ----------
    target
        A file or directory about to be written.
    source
        An input file or store.
    replaces
        ``target`` is replaced as a whole (a file or store written by
        :func:`write`), so a ``source`` inside it would be deleted too;
        ``False`` for an output directory that only receives new files.
    """
    t, s = Path(target).resolve(), Path(source).resolve()
    if t == s:
        return "would overwrite the input"
    if s in t.parents:
        return "lies inside the input"
    if replaces and t in s.parents:
        return "would replace the directory that holds the input"
    return None


def check_not_input(target: str | Path, sources, *, what: str, replaces: bool = True) -> None:
    """Refuse to write ``target`` where it would modify any of ``sources``.

    Raises
    ------
    ValueError
        Naming the input and the fix.
    """
    for source in sources:
        how = overlap(target, source, replaces=replaces)
        if how:
            raise ValueError(
                f"{what} {str(target)!r} {how} {str(source)!r}; inputs are never modified: "
                "choose a path outside the input"
            )


def write(adata: ad.AnnData, path: str | Path, *, scheduler=None, progress: bool | None = None) -> Path:
    """Write AnnData atomically as ``.h5ad``, or ``.zarr`` when the path ends so.

    The data go to a temporary sibling first and are renamed into place, so
    an interrupted write leaves the old file or the new one, never a torn
    one. (Replacing an existing ``.zarr`` directory takes two renames; in
    between, the old store sits beside it as ``.NAME.old-*``.)

    Lazy (Dask) arrays are computed here. To ``.zarr`` their blocks go
    straight from the workers into the store, never gathered in one process
    (what results of genome-wide screens need). To ``.h5ad``, a lazy sparse
    ``X`` and lazy sparse layers (CSR row blocks, as :func:`pertscale.read`
    and the filters of :mod:`pertscale.pp` make them) are streamed: a few row
    blocks at a time (one per worker) are computed and appended to the
    file, so this process never holds the whole matrix (peak: those blocks
    and their inputs). Other lazy arrays (dense results, ``obsm``, ``varm``)
    are computed into memory first, in one graph, as before.

    Parameters
    ----------
    adata
        What to write.
    path
        Target path; its parent directory must exist and be writable.
    scheduler, progress
        Where lazy arrays are computed, and whether to show a progress bar.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    PermissionError, FileNotFoundError
        If the directory cannot be written.
    ValueError
        If ``path`` is, is inside, or holds a store that :func:`pertscale.read`
        opened in this process (its lazy matrices still read from it) or the
        source recorded in ``adata.uns['pertscale']['source']``.
    """
    path = Path(path)
    if path.suffix == ".zarr":
        return write_stores({path: adata}, scheduler=scheduler, progress=progress)[0]
    _check_target(adata, path)
    tmp = _sibling(path, "tmp")
    try:
        streamed = _streamed_elements(adata)
        if streamed:
            adata = adata.copy()  # shallow for lazy arrays: only their graphs are copied
            for attr, key in streamed:
                if key is None:
                    adata.X = None
                else:
                    del getattr(adata, attr)[key]
        if lazy_elements(adata):
            adata = compute(adata, scheduler=scheduler, progress=progress, desc=f"computing {path.name}")
        try:
            adata.write_h5ad(tmp)
            if streamed:
                with h5py.File(tmp, "a") as file:
                    _stream_sparse(file, streamed, scheduler=scheduler, progress=progress, name=path.name)
        except ValueError as err:
            if "object header message is too large" not in str(err):
                raise
            raise ValueError(
                f"cannot write {str(path)!r}: a record array in uns has more fields than an HDF5 object header "
                f"holds ({err}); scanpy's uns['rank_genes_groups'] does this past about 1,100 perturbations. "
                "The layers hold every statistic: del adata.uns['rank_genes_groups'] and write again"
            ) from err
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _streamed_elements(adata: ad.AnnData) -> dict[tuple[str, str | None], da.Array]:
    """The lazy sparse ``X`` and layers, which :func:`write` streams into an ``.h5ad`` file."""
    return {
        where: x
        for where, x in lazy_elements(adata).items()
        if where[0] in ("X", "layers") and x.ndim == 2 and sp.issparse(x._meta)
    }


def _csr(block, dtype) -> sp.csr_matrix:
    block = sp.csr_matrix(block)
    return block if block.dtype == dtype else block.astype(dtype)


def _stream_sparse(file: h5py.File, arrays: dict, *, scheduler, progress: bool | None, name: str) -> None:
    """Append the row blocks of lazy sparse matrices to an open ``.h5ad`` file, a window of blocks at a time.

    Each window (as many consecutive row blocks as the scheduler has
    workers) is one computation of the same rows of every matrix, so a
    block of the input is read once for ``X`` and the layers made from it.
    The first block of each matrix is written with anndata's
    ``write_elem`` (64-bit ``indptr``, so that appending never overflows
    it; HDF5 chunks of :data:`H5_CHUNK` elements, as the first block may be
    empty), the others appended with ``sparse_dataset(...).append``.
    """
    from tqdm.auto import tqdm

    from .._settings import settings

    arrays = {where: (x.rechunk({1: -1}) if x.numblocks[1] != 1 else x) for where, x in arrays.items()}
    chunks = next(iter(arrays.values())).chunks[0]
    arrays = {where: (x if x.chunks[0] == chunks else x.rechunk({0: chunks})) for where, x in arrays.items()}
    window = max(1, n_workers_of(resolve_scheduler(scheduler)))
    written: dict = {}
    progress = settings.progress if progress is None else progress
    with tqdm(total=len(chunks), desc=f"writing {name}", unit="block", leave=False, disable=not progress) as bar:
        for start in range(0, len(chunks), window):
            stop = min(start + window, len(chunks))
            pieces = [x.blocks[i] for x in arrays.values() for i in range(start, stop)]
            values = iter(compute_collections(*pieces, scheduler=scheduler, progress=False))
            for (attr, key), x in arrays.items():
                group, elem = (file, "X") if key is None else (file.require_group(attr), key)
                for _ in range(start, stop):
                    block = _csr(next(values), x.dtype)
                    if (attr, key) not in written:
                        block.indptr = block.indptr.astype("int64")
                        ad.io.write_elem(group, elem, block, dataset_kwargs={"chunks": (H5_CHUNK,)})
                        written[(attr, key)] = ad.io.sparse_dataset(group[elem])
                    elif block.shape[0]:
                        written[(attr, key)].append(block)
            bar.update(stop - start)
    logger.info("streamed %s into %s in %d row blocks", ", ".join(map(_element_name, arrays)), name, len(chunks))


def _element_name(where: tuple[str, str | None]) -> str:
    attr, key = where
    return "X" if key is None else f"{attr}[{key!r}]"


def _check_target(adata: ad.AnnData, path: Path) -> None:
    from ._read import OPENED_INPUTS

    source = ((adata.uns.get("pertscale") or {}).get("source") or {}).get("path")
    check_not_input(path, [*OPENED_INPUTS, *([source] if source else [])], what="cannot write")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write {str(path)!r}: directory {str(parent)!r} is not writable")


def write_stores(items: dict[Path, ad.AnnData], *, scheduler=None, progress: bool | None = None) -> list[Path]:
    """Write several AnnData objects as ``.zarr`` stores, their lazy arrays computed in one graph.

    As :func:`write` for each, but work the objects share (a pass over the
    matrix, a control summary) is done once. Each store is written to a
    temporary sibling and renamed into place once all are written.

    Raises
    ------
    PermissionError, FileNotFoundError, ValueError
        As :func:`write`, for any of the paths (before anything is written).
    """
    paths = [Path(p) for p in items]
    for path, adata in zip(paths, items.values(), strict=True):
        if path.suffix != ".zarr":
            raise ValueError(f"write_stores writes .zarr stores; {str(path)!r} is not one")
        _check_target(adata, path)
    tmps = [_sibling(path, "tmp") for path in paths]
    try:
        with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False), warnings.catch_warnings():
            # anndata consolidates zarr v3 metadata; zarr warns that this is not yet in the v3 spec
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            # scanpy's uns['rank_genes_groups'] holds record arrays, which zarr v3 has no spec for yet;
            # the layers are the canonical results, the record arrays a convenience view
            warnings.filterwarnings("ignore", message="The data type", category=Warning)
            try:
                write_zarr_stores(list(zip(items.values(), tmps, strict=True)), scheduler=scheduler, progress=progress)
            except ValueError as err:
                if "slash" not in str(err).lower():
                    raise
                raise ValueError(
                    f"cannot write {', '.join(map(str, paths))}: zarr does not allow '/' in names ({err}); a "
                    "perturbation label or column name holds one. Write .h5ad instead, or rename it"
                ) from err
        for tmp, path in zip(tmps, paths, strict=True):
            _replace_dir(tmp, path)
    finally:
        for tmp in tmps:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move directory ``tmp`` to ``path``, replacing what is there (two renames)."""
    if not path.exists():
        os.replace(tmp, path)
        return
    # a directory cannot be renamed over another: move the old one aside first,
    # and put it back if the new one cannot take its place
    old = _sibling(path, "old")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)

"""Atomic writing of AnnData objects."""

from __future__ import annotations

import fnmatch
import logging
import os
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import anndata as ad
import dask.array as da
import h5py
import pandas as pd
import scipy.sparse as sp

from .._memory import workers_now
from .._progress import steps
from ._atomic import replacing
from ._lazy import lazy_elements, materialize, write_zarr_stores

logger = logging.getLogger(__name__)

#: Elements per HDF5 chunk of a streamed sparse matrix's ``data``, ``indices`` and ``indptr`` (resizable).
H5_CHUNK = 1 << 16


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


#: The formats :func:`write` and :func:`pertscale.io.convert` write, by the target's suffix.
FORMATS = {".h5ad": "HDF5 (anndata's .h5ad)", ".zarr": "a zarr v3 directory store"}


def check_format(path: Path, *, what: str) -> None:
    """Refuse a target whose suffix names no format we write (``x.csv`` would otherwise get HDF5 bytes).

    Raises
    ------
    ValueError
        Naming the suffix and the formats.
    """
    if Path(path).suffix.lower() not in FORMATS:
        suffix = repr(Path(path).suffix) if Path(path).suffix else "no extension"
        raise ValueError(
            f"{what} {str(path)!r}: {suffix} is not a format pertscale writes; end the path with .h5ad (HDF5) "
            "or .zarr (a zarr directory store)"
        )


def write(
    adata: ad.AnnData | str | Path,
    path: str | Path | ad.AnnData,
    *,
    include: Sequence[str] | None = None,
    compression: str | None = "gzip",
    compression_opts: int | None = None,
) -> Path:
    """Write AnnData atomically as ``.h5ad``, or ``.zarr`` when the path ends so.

    ``ps.write(adata, path)`` and scanpy's order ``ps.write(path, adata)``
    both work. A sanitized copy is written; ``adata`` is not changed:

    - the result store's settings keys become strings
      (``'WilcoxonSettings::{...}'``; :func:`pertscale.read` turns them back),
      and a stored array that is also an element written (PCA's scores are
      ``obsm['X_pca']``) is written once;
    - ``obs``/``var`` columns of mixed types (numbers and text) are written
      as text, missing values kept missing;
    - with ``include``, only the elements it names are written.

    Categorical columns keep the difference between a category such as
    ``-1`` (a label) and a missing value (anndata writes code ``-1`` for
    missing, a category ``-1`` as a category): after reading,
    ``col == -1`` and ``col.isna()`` pick different cells.

    The data go to a temporary sibling first and are renamed into place, so
    an interrupted write (even a killed process) leaves the old file or the
    new one, never a torn one; a killed writer can leave its temporary
    sibling (``.NAME.tmp-*``) behind. (Replacing an existing ``.zarr``
    directory takes two renames; in between, the old store sits beside it
    as ``.NAME.old-*``.)

    Lazy (Dask) arrays are computed here (with plain ``dask.compute``: on the
    scheduler of the enclosing face, :func:`pertscale.write`, or Dask's
    current one), all in one graph (work they share,
    such as a pass over the matrix, is done once). To ``.zarr`` their dense
    blocks go straight from the workers into the store, never gathered in
    one process (what results of genome-wide screens need), stored results
    in ``uns`` included. To ``.h5ad``, a lazy sparse ``X`` and lazy sparse
    layers (CSR row blocks, as :func:`pertscale.read` and the filters of
    :mod:`pertscale.pp` make them) are streamed: a few row blocks at a time
    (one per worker) are computed and appended to the file, so this process
    never holds the whole matrix (peak: those blocks and their inputs).
    Other lazy arrays (dense results, ``obsm``, ``varm``, stored results)
    are computed into memory first, in one graph.

    Parameters
    ----------
    adata
        What to write.
    path
        Target path; its parent directory must exist and be writable.
    include
        ``None`` (default) writes everything. Otherwise glob patterns of
        ``"namespace/key"`` naming what to keep (``["obsm/X_pca",
        "obs/n_*", "uns/pertscale"]``), namespaces ``obs``, ``var``,
        ``obsm``, ``varm``, ``layers``, ``uns``, ``obsp``, ``varp``; a bare
        namespace keeps all of it. ``X``, ``raw`` and the ``obs``/``var``
        names are always written.
    compression, compression_opts
        HDF5 compression of the ``.h5ad`` datasets (``"gzip"`` default,
        ``"lzf"`` or ``None``) and its level; a ``.zarr`` store uses zarr's
        default compressor (zstd) followed by a CRC-32C of every chunk, which
        zarr checks on every read.

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
        source recorded in ``adata.uns['pertscale']['source']``; if ``path``
        ends in neither ``.h5ad`` nor ``.zarr`` (``x.csv``: the message names
        the formats); if an ``include`` pattern names an unknown namespace; if
        ``compression`` is not one of those.
    TypeError
        If neither argument is an AnnData.

    Notes
    -----
    ``include`` and the sanitizing follow valency-anndata's ``write``; the
    string keys of the result store follow ParTIpy's ``write_h5ad``.
    """
    if isinstance(adata, (str, Path)) and isinstance(path, ad.AnnData):
        adata, path = path, adata
    if not isinstance(adata, ad.AnnData):
        raise TypeError(
            f"write(adata, path) needs an AnnData and a path; got {type(adata).__name__} and {type(path).__name__}"
        )
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r} is not supported; choose one of {COMPRESSIONS}")
    path = Path(path)
    _check_target(adata, path)
    check_format(path, what="cannot write")
    adata = sanitized(adata, include=include)
    if path.suffix.lower() == ".zarr":
        return write_stores({path: adata})[0]
    dataset_kwargs = {"compression": compression, "compression_opts": compression_opts} if compression else {}
    with replacing(path) as tmp:  # renamed into place when every element is written
        streamed = _streamed_elements(adata)
        for attr, key in streamed:
            if key is None:
                adata.X = None
            else:
                del getattr(adata, attr)[key]
        if lazy_elements(adata, nested=True):
            adata = materialize(adata)
        try:
            adata.write_h5ad(
                tmp, **({"compression": compression, "compression_opts": compression_opts} if compression else {})
            )
            if streamed:
                with h5py.File(tmp, "a") as file:
                    _stream_sparse(file, streamed, name=path.name, dataset_kwargs=dataset_kwargs)
        except ValueError as err:
            if "object header message is too large" not in str(err):
                raise
            raise ValueError(
                f"cannot write {str(path)!r}: a record array in uns has more fields than an HDF5 object header "
                f"holds ({err}); scanpy's uns['rank_genes_groups'] does this past about 1,100 perturbations. "
                "The layers hold every statistic: del adata.uns['rank_genes_groups'] and write again"
            ) from err
    return path


#: HDF5 compression filters :func:`write` accepts.
COMPRESSIONS = ("gzip", "lzf", None)
#: Namespaces of ``include`` patterns.
NAMESPACES = ("obs", "var", "obsm", "varm", "layers", "uns", "obsp", "varp")


def _include_rule(include: Sequence[str] | None):
    """``keep(namespace, key) -> bool`` for the ``include`` patterns (everything for ``None``)."""
    if include is None:
        return lambda namespace, key: True
    if isinstance(include, str):
        include = [include]
    patterns = []
    for pattern in include:
        namespace, _, rest = str(pattern).partition("/")
        if namespace not in NAMESPACES:
            raise ValueError(
                f"include pattern {pattern!r} does not start with a namespace; use 'namespace/key' with namespace "
                f"one of {NAMESPACES} (X and raw are always written)"
            )
        patterns.append((namespace, rest or "*"))
    return lambda namespace, key: any(ns == namespace and fnmatch.fnmatchcase(str(key), p) for ns, p in patterns)


def _text_if_mixed(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns holding more than one type (numbers and text) as text; missing values stay missing."""
    for col in frame.columns:
        values = frame[col]
        if values.dtype == object:
            kinds = {type(v) for v in values.dropna()}
            if len(kinds) > 1:
                frame[col] = values.map(lambda v: v if pd.isna(v) else str(v)).astype(object)
    return frame


def _copy_tree(node):
    """New containers (dicts, AnnData objects) over the same arrays, which a writer may change freely."""
    if isinstance(node, dict):
        return {k: _copy_tree(v) for k, v in node.items()}
    if isinstance(node, ad.AnnData):
        return ad.AnnData(
            X=node.X,
            obs=node.obs,
            var=node.var,
            layers=dict(node.layers),
            obsm=dict(node.obsm),
            varm=dict(node.varm),
            obsp=dict(node.obsp),
            varp=dict(node.varp),
            uns=_copy_tree(dict(node.uns)),
        )
    return node


def sanitized(adata: ad.AnnData, *, include: Sequence[str] | None = None) -> ad.AnnData:
    """What :func:`write` writes: a new AnnData over the same arrays, filtered by ``include``, store keys as text.

    Raises
    ------
    ValueError
        If an ``include`` pattern names an unknown namespace.
    """
    from ..store import STORE, serialized_store, written_matrices

    keep = _include_rule(include)
    obs = _text_if_mixed(adata.obs[[c for c in adata.obs.columns if keep("obs", c)]].copy())
    var = _text_if_mixed(adata.var[[c for c in adata.var.columns if keep("var", c)]].copy())
    parts = {
        attr: {k: v for k, v in getattr(adata, attr).items() if keep(attr, k)}
        for attr in ("obsm", "varm", "layers", "obsp", "varp")
    }
    written = {f"{attr}/{k}" for attr, items in parts.items() for k in items}
    uns = {k: v for k, v in adata.uns.items() if keep("uns", k) and k != STORE}
    if STORE in adata.uns and keep("uns", STORE):
        uns[STORE] = serialized_store(adata, written=written)
        if uns[STORE].get("results"):  # what the file's matrices were, so that results stay reusable after reading
            uns[STORE]["written_matrices"] = written_matrices(adata, parts["layers"])
    out = ad.AnnData(X=adata.X, obs=obs, var=var, uns=_copy_tree(uns), **parts)
    if adata.raw is not None:
        out.raw = adata.raw.to_adata()
    return out


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


def _stream_sparse(file: h5py.File, arrays: dict, *, name: str, dataset_kwargs: dict | None = None) -> None:
    """Append the row blocks of lazy sparse matrices to an open ``.h5ad`` file, a window of blocks at a time.

    Each window (as many consecutive row blocks as Dask's current scheduler
    runs at once) is one computation of the same rows of every matrix, so a
    block of the input is read once for ``X`` and the layers made from it.
    The first block of each matrix is written with anndata's
    ``write_elem`` (64-bit ``indptr``, so that appending never overflows
    it; HDF5 chunks of :data:`H5_CHUNK` elements, as the first block may be
    empty), the others appended with ``sparse_dataset(...).append``.
    """
    import dask

    arrays = {where: (x.rechunk({1: -1}) if x.numblocks[1] != 1 else x) for where, x in arrays.items()}
    chunks = next(iter(arrays.values())).chunks[0]
    arrays = {where: (x if x.chunks[0] == chunks else x.rechunk({0: chunks})) for where, x in arrays.items()}
    window = workers_now()
    written: dict = {}
    with steps(len(chunks), f"writing {name}") as bar:
        for start in range(0, len(chunks), window):
            stop = min(start + window, len(chunks))
            pieces = [x.blocks[i] for x in arrays.values() for i in range(start, stop)]
            values = iter(dask.compute(*pieces))
            for (attr, key), x in arrays.items():
                group, elem = (file, "X") if key is None else (file.require_group(attr), key)
                for _ in range(start, stop):
                    block = _csr(next(values), x.dtype)
                    if (attr, key) not in written:
                        block.indptr = block.indptr.astype("int64")
                        ad.io.write_elem(
                            group, elem, block, dataset_kwargs={"chunks": (H5_CHUNK,), **(dataset_kwargs or {})}
                        )
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


def write_stores(items: dict[Path, ad.AnnData], *, resume: bool = False) -> list[Path]:
    """Write several AnnData objects as ``.zarr`` stores, their lazy arrays computed in one graph.

    As :func:`write` for each, but work the objects share (a pass over the
    matrix, a control summary) is done once. Each store is written to a
    temporary sibling and renamed into place once all are written.

    With ``resume``, the stores are written in place (the caller stages
    them, as ``pertscale run`` does) and record their written blocks, so
    that a call after an interruption continues them
    (:func:`pertscale.io._lazy.write_zarr_stores`); nothing is removed on
    failure.

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
    with ExitStack() as renames:  # each store renamed into place when all are written; none if one fails
        tmps = paths if resume else [renames.enter_context(replacing(path)) for path in paths]
        with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False), warnings.catch_warnings():
            # anndata consolidates zarr v3 metadata; zarr warns that this is not yet in the v3 spec
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            # scanpy's uns['rank_genes_groups'] holds record arrays, which zarr v3 has no spec for yet;
            # the layers are the canonical results, the record arrays a convenience view
            warnings.filterwarnings("ignore", message="The data type", category=Warning)
            try:
                write_zarr_stores(list(zip(items.values(), tmps, strict=True)), resume=resume)
            except ValueError as err:
                if "slash" not in str(err).lower():
                    raise
                raise ValueError(
                    f"cannot write {', '.join(map(str, paths))}: zarr does not allow '/' in names ({err}); a "
                    "perturbation label or column name holds one. Write .h5ad instead, or rename it"
                ) from err
    return paths

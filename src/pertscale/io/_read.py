"""Lazy reading of ``.h5ad`` files and ``.zarr`` stores."""

from __future__ import annotations

import copy
import itertools
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import anndata as ad
import dask.array as da
import h5py
import numpy as np
import scipy.sparse as sp

from .._memory import MIN_BLOCK_ROWS, block_rows, n_cores
from .._settings import settings
from .._validation import ABSENT_CHUNKS, check_number, unique_var_names
from ._blocks import (
    SPARSE,
    DamagedStoreError,
    StoredMatrix,
    _chunk_length,
    absent_label_chunks,
    read_block,
    reason,
)

logger = logging.getLogger(__name__)

#: Smallest automatic row chunk: below this, scheduling costs more than the work.
MIN_CHUNK_ROWS = MIN_BLOCK_ROWS
#: More row blocks than this and a chosen chunk size draws a warning: task overhead dominates.
MANY_BLOCKS = 10_000


#: Resolved paths of the stores opened by :func:`read` in this process. Their lazy matrices read
#: from them until the end, so :func:`pertscale.write` refuses to write over or into any of them.
OPENED_INPUTS: set[Path] = set()


def _not_anndata(path: Path, why: str) -> ValueError:
    return ValueError(
        f"{str(path)!r} is not an AnnData store ({why}); pass an .h5ad file or a .zarr "
        "directory written by anndata (anndata.AnnData.write_h5ad / write_zarr)"
    )


def _damaged(path: Path, err: BaseException, group=None) -> DamagedStoreError:
    where = _unreadable_annotations(group) if group is not None else ""
    return DamagedStoreError(
        f"{str(path)!r} is truncated or damaged and cannot be read{where} ({reason(err)}); copy or write it again"
    )


def _failed_checksum(err: BaseException) -> bool:
    """Whether ``err``, or what caused it, is zarr's CRC-32C mismatch (anndata re-raises it with the key read)."""
    while err is not None:
        if "checksum do not match" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _unreadable_annotations(group, limit: int = 5) -> str:
    """`` (chunk 'obs/gene/codes/c/1')``: chunks of a zarr store's obs, var, obsm, varm, uns that fail to read."""
    try:
        bad = list(itertools.islice(_failing_chunks(group), limit))
    except Exception:  # naming is a courtesy; never hide the real error behind it
        return ""
    return f" (chunk{'s' if len(bad) > 1 else ''} {', '.join(bad)})" if bad else ""


def _failing_chunks(group):
    for name in ("obs", "var", "obsm", "varm", "uns"):
        if name not in group or not hasattr(group[name], "members"):
            continue
        for _, arr in group[name].members(max_depth=None):
            if not hasattr(arr, "dtype"):
                continue  # a group
            step = _chunk_length(arr, "zarr") if arr.ndim else 1
            for first in range(0, arr.shape[0] if arr.ndim else 1, step):
                try:
                    arr[first : first + step] if arr.ndim else arr[()]
                except Exception:
                    coords = (first // step, *(0,) * (arr.ndim - 1)) if arr.ndim else ()
                    yield f"'{arr.path}/{arr.metadata.encode_chunk_key(coords)}'"


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
    if not os.access(path, os.R_OK):
        raise PermissionError(f"cannot read {str(path)!r}: permission denied")
    if not h5py.is_hdf5(path):
        raise _not_anndata(path, "not an HDF5 file")
    try:
        return h5py.File(path, "r"), "h5ad"
    except OSError as err:  # a truncated file has a valid signature but cannot be opened
        raise _damaged(path, err) from err


def _matrix_key(store, path: Path, layer: str | None, *, use_raw: bool) -> str:
    """The key of the matrix to read, or an error that says where the matrix is."""
    for key in ("obs", "var"):
        if key not in store:
            raise _not_anndata(path, f"it has no {key!r} group")
    layers = sorted(store["layers"].keys()) if _has(store, "layers") and hasattr(store["layers"], "keys") else []
    has_raw = _has(store, "raw") and hasattr(store["raw"], "keys") and _has(store["raw"], "X")
    elsewhere = [f"layers[{name!r}] (--layer {name}, or layer={name!r})" for name in layers]
    if has_raw:
        elsewhere.append("raw.X (--use-raw, or use_raw=True)")
    if use_raw:
        if layer is not None:
            raise ValueError("give either layer= (--layer) or use_raw=True (--use-raw), not both")
        if not has_raw:
            others = "X (omit --use-raw)" + (f" or a layer (--layer NAME; present: {layers})" if layers else "")
            raise ValueError(f"{str(path)!r} has no raw matrix (raw/X); read {others}")
        return "raw/X"
    if layer is not None:
        if layer not in layers:
            extra = " and raw.X (--use-raw)" if has_raw else ""
            raise ValueError(
                f"layer {layer!r} not found in {str(path)!r}; layers present: {layers}{extra}"
                + ("; X is present (omit --layer to read it)" if _has(store, "X") else "")
            )
        return f"layers/{layer}"
    if not _has(store, "X") or getattr(store["X"], "ndim", 2) == 0:  # absent, None, or a 0-d placeholder
        if elsewhere:
            raise ValueError(
                f"{str(path)!r} stores no X; its matrix is in " + " or in ".join(elsewhere) + ": read that one"
            )
        raise _not_anndata(path, "it has no 'X', no layers and no raw matrix")
    return "X"


def _has(group, key: str) -> bool:
    """``key`` is stored in ``group`` and is not anndata's placeholder for ``None`` (encoding "null")."""
    return key in group and group[key].attrs.get("encoding-type") != "null"


def _describe(elem, key: str, path: Path, n_obs: int, n_vars: int) -> tuple[str, np.dtype, float]:
    """Encoding, dtype and in-memory bytes per row of the stored matrix; shapes checked."""
    encoding = elem.attrs.get("encoding-type", "array")
    if encoding in SPARSE:
        shape = tuple(int(n) for n in elem.attrs["shape"])
        dtype = elem["data"].dtype
        itemsize = dtype.itemsize + elem["indices"].dtype.itemsize
        bytes_per_row = elem["data"].shape[0] / max(n_obs, 1) * itemsize + 8
    elif encoding == "array":
        shape = tuple(elem.shape)
        dtype = elem.dtype
        bytes_per_row = n_vars * dtype.itemsize
    else:
        raise ValueError(f"{str(path)!r}: {key} has encoding {encoding!r}, which pertscale cannot read")
    if len(shape) != 2:
        raise ValueError(f"{str(path)!r}: {key} has {len(shape)} dimensions, not 2 (cells x genes)")
    if shape != (n_obs, n_vars):
        raise DamagedStoreError(
            f"{str(path)!r}: {key} is {shape[0]:,} x {shape[1]:,} but obs has {n_obs:,} rows and var "
            f"{n_vars:,}; the store is inconsistent (damaged, or edited by hand): write it again"
        )
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise ValueError(f"{str(path)!r}: {key} holds {dtype} values, not numbers")
    if not _accepted_dtype(np.dtype(dtype)):
        raise ValueError(
            f"{str(path)!r}: {key} holds {dtype} values; pertscale reads integer, float32 or float64 matrices "
            f"(the kernels compute in float32/float64). Convert it and write the file again, e.g. "
            f"{_conversion(key)}{' (complex values: keep their real part, .real, first)' if dtype.kind == 'c' else ''}"
        )
    return encoding, np.dtype(dtype), bytes_per_row


def _accepted_dtype(dtype: np.dtype) -> bool:
    """Integers, booleans, float32 and float64: not float16 (too coarse), longdouble or complex."""
    return dtype.kind in "biu" or dtype in (np.dtype(np.float32), np.dtype(np.float64))


def _conversion(key: str) -> str:
    """The anndata line that converts the matrix at ``key`` to float32."""
    if key.startswith("layers/"):
        where = f"adata.layers[{key.split('/', 1)[1]!r}]"
        return f"{where} = {where}.astype(np.float32)"
    if key == "raw/X":
        return "raw = adata.raw.to_adata(); raw.X = raw.X.astype(np.float32); adata.raw = raw"
    return "adata.X = adata.X.astype(np.float32)"


def auto_chunk_size(
    n_obs: int,
    bytes_per_row: float,
    *,
    n_workers: int | None = None,
    available_bytes: int | None = None,
) -> int:
    """Rows per block, from the memory there is: the planner the main job uses too.

    :func:`pertscale._memory.block_rows` with each worker's share of the
    memory: a task holds about six copies of its block (read, normalized,
    log1p, gene-major, the kernel's buffers) within
    ``ps.settings.memory_fraction`` of it. Blocks are at least
    ``MIN_CHUNK_ROWS`` rows, and small enough that every worker gets about
    four when the data allow.

    Parameters
    ----------
    n_obs
        Rows (cells) of the matrix.
    bytes_per_row
        Average in-memory bytes of one row (values and column indices).
    n_workers
        Workers sharing the memory; default ``ps.settings.n_workers`` or the
        core count.
    available_bytes
        Memory to plan for, shared by the workers; default this machine's
        available memory.

    Returns
    -------
    int
        Row chunk size, between ``min(n_obs, MIN_CHUNK_ROWS)`` and ``n_obs``.
    """
    n_workers = int(n_workers or settings.n_workers or n_cores())
    memory = None if available_bytes is None else available_bytes / n_workers
    return block_rows(n_obs, bytes_per_row, n_workers=n_workers, worker_memory=memory)


def _csr_block(block):
    return sp.csr_matrix(block)


def _select_block(block, rows, cols):
    block = block[rows]
    return block if cols is None else block[:, cols]


def select(x: da.Array, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> da.Array:
    """Rows and columns of a Dask array of row blocks by boolean masks, each block filtered where it is.

    Unlike ``x[rows][:, cols]`` (which re-blocks the rows evenly, moving
    them between blocks), every block keeps its own rows: blocks that held
    whole perturbation groups still do.

    Parameters
    ----------
    x
        ``(n_obs, n_vars)`` with one block along the columns.
    rows, cols
        Boolean masks; ``None`` keeps all.
    """
    if x.numblocks[1] != 1:
        x = x.rechunk({1: -1})
    row_mask = np.ones(x.shape[0], dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    col_idx = None if cols is None else np.flatnonzero(cols)
    bounds = np.cumsum((0,) + x.chunks[0])
    kept = tuple(int(row_mask[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    return da.blockwise(
        _select_block,
        "ij",
        x,
        "ij",
        da.from_array(row_mask, chunks=(x.chunks[0],)),
        "i",
        col_idx,
        None,
        adjust_chunks={"i": kept, "j": x.shape[1] if col_idx is None else col_idx.size},
        dtype=x.dtype,
        meta=x._meta,
    )


def subset(adata: ad.AnnData, *, obs_mask: np.ndarray | None = None, var_mask: np.ndarray | None = None) -> ad.AnnData:
    """A new AnnData of the kept cells and genes; lazy matrices keep their blocks (:func:`select`).

    ``X`` and ``layers`` are subset (lazy ones blockwise), ``obs``/``var``
    and ``uns`` carried over; ``adata`` is left as it is.
    """
    obs_mask = np.ones(adata.n_obs, dtype=bool) if obs_mask is None else np.asarray(obs_mask, dtype=bool)
    var_mask = np.ones(adata.n_vars, dtype=bool) if var_mask is None else np.asarray(var_mask, dtype=bool)

    def cut(m):
        if isinstance(m, da.Array):
            return select(m, obs_mask, var_mask)
        return m[obs_mask][:, var_mask]

    return ad.AnnData(
        X=None if adata.X is None else cut(adata.X),
        obs=adata.obs[obs_mask].copy(),
        var=adata.var[var_mask].copy(),
        layers={k: cut(v) for k, v in adata.layers.items()},
        uns=copy.deepcopy(dict(adata.uns)),
    )


def per_block(func, n_out: int, *inputs) -> da.Array:
    """``func`` of each row block, whose ``(1, n_out, n_cols)`` results are stacked: ``(n_blocks, n_out, n_cols)``.

    ``inputs`` are ``(array, index)`` pairs with index ``"bj"`` for a matrix
    of row blocks (one block along the columns) and ``"b"`` for per-row
    vectors chunked like it; anything else is passed to every call as it is.
    """
    pairs = [a for item in inputs for a in (item if isinstance(item, tuple) else (item, None))]
    return da.blockwise(
        func,
        "bsj",
        *pairs,
        new_axes={"s": n_out},
        adjust_chunks={"b": 1},
        concatenate=True,
        dtype=np.float64,
        meta=np.empty((0, 0, 0)),
    )


def map_csr(x: da.Array, func, *args, dtype=None) -> da.Array:
    """``x.map_blocks(func, *args)`` for a function that returns a CSR block of each block.

    The one place that tells Dask the blocks are ``scipy.sparse.csr_matrix``
    (its ``meta``) and of which dtype, so that no function is called on an
    empty block to find out.
    """
    dtype = np.dtype(dtype or x.dtype)
    return x.map_blocks(func, *args, dtype=dtype, meta=sp.csr_matrix((0, 0), dtype=dtype))


def read(
    path: str | Path,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    chunk_size: int | None = None,
) -> ad.AnnData:
    """Open an AnnData store lazily, after checking that it is whole.

    ``obs`` and ``var`` are read into memory; the matrix becomes a
    ``dask.array.Array`` of ``scipy.sparse.csr_matrix`` row blocks. The graph
    carries only the path and row ranges: each task opens the file itself,
    so it runs in other processes and on other machines that see the path.
    Each block is checked as it is read (row pointer, column indices), and a
    failed read names the store, the rows and the chunks.

    Parameters
    ----------
    path
        An ``.h5ad`` file or a ``.zarr`` directory.
    layer
        Read ``layers[layer]`` instead of ``X``.
    use_raw
        Read ``raw.X`` (with ``raw.var`` as ``var``) instead of ``X``.
    chunk_size
        Rows per block, at least 1. Default: computed from available memory
        by :func:`auto_chunk_size` (large blocks: a column sum over 2 M cells
        took 15 s with 1,000-row blocks and 0.3 s with 100,000-row blocks).

    Returns
    -------
    anndata.AnnData
        ``n_obs x n_vars``, ``X`` lazy (CSR blocks, the stored dtype: raw
        counts stay integers). Repeated gene names are made unique (with a
        warning; the originals in ``var['original_var_name']``).
        ``uns['pertscale']['source']`` records the path and the matrix read.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    PermissionError
        If it cannot be read.
    ValueError
        If ``path`` is not an AnnData store, the matrix asked for is not
        there (the message says where the matrix is and which option reads
        it), it holds values of another dtype than integers, booleans,
        float32 or float64 (float16, complex: the message names the dtypes
        accepted and the conversion), or ``chunk_size`` is not a positive
        whole number.
    pertscale.io.DamagedStoreError
        (a ``ValueError``) If the file is truncated or damaged, a chunk of
        a sparse matrix is missing (zarr would read it as zeros), or a chunk
        of a zarr store written with a ``crc32c`` codec fails its checksum
        (the message names the chunk; for the matrix's ``data`` and
        ``indices`` this is raised when the block is read).

    Notes
    -----
    Of a zarr store, the categorical (and string) ``obs`` columns whose
    stored chunks are absent are recorded in
    ``adata.obs.attrs['pertscale_absent_chunks']``: zarr leaves out a chunk
    whose cells all carry the first category, and such cells are read as
    that category, which is wrong if the chunk was lost in a copy. Reading
    the column as perturbation labels (the main job, :func:`pertscale.io.prepare`, the
    analyses) warns, and a failed label check names the chunks.
    """
    path = Path(path)
    chunk_size = check_number(chunk_size, "chunk_size", integer=True, minimum=1, allow_none=True, flag="--chunk-size")
    store, fmt = _open(path)
    try:
        key = _matrix_key(store, path, layer, use_raw=use_raw)
        try:
            obs = ad.io.read_elem(store["obs"])
            if fmt == "zarr":  # label chunks zarr left out, or lost: the label checks name them (see ABSENT_CHUNKS)
                absent = absent_label_chunks(store["obs"], path.resolve())
                if absent:
                    obs.attrs[ABSENT_CHUNKS] = absent
            var = ad.io.read_elem(store["raw/var" if use_raw else "var"])
            extras = {name: read_tree(store[name]) for name in ("obsm", "varm", "uns") if name in store}
            elem = store[key]
            encoding, dtype, bytes_per_row = _describe(elem, key, path, len(obs), len(var))
        except (ValueError, PermissionError) as err:
            if _failed_checksum(err):  # zarr's Crc32cCodec: a chunk changed after it was written
                raise _damaged(path, err, store if fmt == "zarr" else None) from err
            raise
        except Exception as err:  # h5py/zarr/codec errors of a damaged file
            raise _damaged(path, err, store if fmt == "zarr" else None) from err
        stored = StoredMatrix(str(path.resolve()), fmt, key, encoding, (len(obs), len(var)), dtype)
        stored.check_complete(elem, path)
    finally:
        if fmt == "h5ad":
            store.close()
    n_obs, n_vars = stored.shape
    if chunk_size is None:
        chunk_size = auto_chunk_size(n_obs, bytes_per_row)
    elif n_obs / chunk_size > MANY_BLOCKS:
        warnings.warn(
            f"chunk_size={chunk_size} cuts {n_obs:,} cells into {-(-n_obs // chunk_size):,} row blocks; every "
            "pass then spends most of its time scheduling tasks (on a 22,000-cell screen, 1-row blocks made "
            "the main job 65 times slower). Omit --chunk-size (chunk_size=None) to size blocks from memory",
            UserWarning,
            stacklevel=2,
        )
    chunk_size = int(min(chunk_size, max(n_obs, 1)))
    meta = sp.csr_matrix((0, 0), dtype=dtype)
    if encoding == "csc_matrix":
        # column-major on disk: read column blocks, then re-block by rows
        x = da.map_blocks(
            partial(read_block, stored), dtype=dtype, chunks=(_layout(n_obs, n_obs), _layout(1_000, n_vars)), meta=meta
        )
        x = map_csr(x, _csr_block).rechunk((chunk_size, -1))
    else:
        x = da.map_blocks(
            partial(read_block, stored), dtype=dtype, chunks=(_layout(chunk_size, n_obs), (n_vars,)), meta=meta
        )
    adata = ad.AnnData(X=x, obs=obs, var=unique_var_names(var))
    if not use_raw:
        for name in ("obsm", "varm"):
            getattr(adata, name).update(extras.get(name) or {})
    adata.uns.update(extras.get("uns") or {})
    OPENED_INPUTS.add(Path(stored.path))
    root = adata.uns.get("pertscale")
    # its size in memory, for the face's choice of scheduler: about bytes_per_row per cell (values and indices)
    nnz = int(round(max(bytes_per_row - 8, 0) / (np.dtype(dtype).itemsize + 4) * n_obs)) if encoding in SPARSE else None
    adata.uns["pertscale"] = (root if isinstance(root, dict) else {}) | {
        "source": {
            "path": stored.path,
            "layer": layer or ("raw" if use_raw else "X"),
            "format": fmt,
            "nnz": n_obs * n_vars if nnz is None else nnz,
            "shape": [n_obs, n_vars],  # a list: anndata writes no tuples into uns
        }
    }
    written = adata.uns["pertscale"].get("written_matrices")
    if isinstance(written, dict) and (layer or use_raw):  # X here is the layer (or raw) that was read
        token = (written.get("layers") or {}).get(layer) if layer else None
        adata.uns["pertscale"]["written_matrices"] = {"X": token} if token else {}
    if layer or use_raw:  # uns['log1p'] marks the file's X as log1p data, not the layer (or raw) read as X here
        logged = (adata.uns["pertscale"].pop("log1p_layers", None) or {}).get(layer) if layer else None
        adata.uns.pop("log1p", None)
        if logged is not None:
            adata.uns["log1p"] = logged
    from ..store import ensure_result_keys

    ensure_result_keys(adata)
    logger.info("opened %s lazily: %s (%d x %d), row chunks of %d", path, key, n_obs, n_vars, chunk_size)
    return adata


@contextmanager
def open(path: str | Path, **options) -> Iterator[ad.AnnData]:  # noqa: A001 - the name users expect (ps.open)
    """Open an ``.h5ad`` or ``.zarr`` AnnData lazily for the duration of a ``with`` block.

    ``with ps.open("screen.zarr") as adata: ...`` gives what
    :func:`read` gives (``X`` lazy, large ``obsm`` arrays and stored results
    lazy, settings keys restored). Lazy arrays open the file for each block
    they read; on leaving the block every HDF5 handle this process still
    holds on the file is closed and the file is no longer counted as an
    open input (so it may be written again). Use the object inside the
    block: its lazy arrays may not read after it.

    Parameters
    ----------
    path
        The file or store.
    **options
        Passed to :func:`read` (``layer``, ``use_raw``, ``chunk_size``).

    Raises
    ------
    As :func:`read`.
    """
    adata = read(path, **options)
    resolved = Path(path).resolve()
    try:
        yield adata
    finally:
        OPENED_INPUTS.discard(resolved)
        _close_h5_handles(resolved)


def _close_h5_handles(path: Path) -> None:
    """Close every HDF5 file object of this process that has ``path`` open."""
    for ident in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
        try:
            name = Path(ident.name.decode() if isinstance(ident.name, bytes) else ident.name).resolve()
        except Exception:  # an identifier closed meanwhile
            continue
        if name == path:
            h5py.File(ident).close()


#: Dense arrays larger than this are read lazily (Dask arrays that open the file for each block).
LAZY_BYTES = 16 * 2**20


def read_tree(elem, *, lazy_bytes: int | None = None):
    """An anndata element (``uns``, ``obsm``, a nested results AnnData), its large dense arrays lazy.

    Groups are walked; dense arrays above ``lazy_bytes`` become Dask arrays
    (:func:`anndata.experimental.read_elem_lazy`, which opens the file in
    each task, so no handle is kept); the rest is read with anndata's
    ``read_elem``. A nested AnnData (a stored test result) keeps its
    ``obs``/``var`` in memory and its layers lazy.
    """
    from anndata.experimental import read_elem_lazy

    lazy_bytes = LAZY_BYTES if lazy_bytes is None else lazy_bytes
    attrs = dict(elem.attrs)
    kind = attrs.get("encoding-type")
    if isinstance(elem, h5py.Dataset) or hasattr(elem, "dtype"):
        if kind in (None, "array") and elem.dtype.kind in "biufc" and elem.size * elem.dtype.itemsize > lazy_bytes:
            return read_elem_lazy(elem)
        return ad.io.read_elem(elem)
    if kind == "anndata":
        parts = {
            name: read_tree(elem[name], lazy_bytes=lazy_bytes)
            for name in ("layers", "obsm", "varm", "uns")
            if name in elem
        }
        x = read_tree(elem["X"], lazy_bytes=lazy_bytes) if "X" in elem else None
        return ad.AnnData(
            X=x,
            obs=ad.io.read_elem(elem["obs"]),
            var=ad.io.read_elem(elem["var"]),
            **{k: v for k, v in parts.items() if v},
        )
    if kind in (None, "dict"):
        return {name: read_tree(elem[name], lazy_bytes=lazy_bytes) for name in elem.keys()}
    return ad.io.read_elem(elem)


def row_nonzeros(path: str | Path, *, layer: str | None = None, use_raw: bool = False) -> np.ndarray | None:
    """Non-zeros per row of a stored CSR matrix, from its row pointer (no values read).

    Returns ``None`` for dense or CSC storage, where that would need a pass.
    """
    path = Path(path)
    store, fmt = _open(path)
    try:
        elem = store[_matrix_key(store, path, layer, use_raw=use_raw)]
        if elem.attrs.get("encoding-type") != "csr_matrix":
            return None
        return np.diff(np.asarray(elem["indptr"][:], dtype=np.int64))
    finally:
        if fmt == "h5ad":
            store.close()


def _layout(step: int, size: int) -> tuple[int, ...]:
    """Chunks of ``step`` along an axis of ``size`` (one empty chunk for an empty axis)."""
    if size == 0:
        return (0,)
    step = max(1, min(step, size))
    return (step,) * (size // step) + ((size % step,) if size % step else ())


def as_dask(x, *, chunk_size: int | None = None) -> da.Array:
    """A matrix as a Dask array of CSR row blocks spanning all columns.

    In-memory numpy or scipy matrices are wrapped; Dask arrays are rechunked
    to full-width row blocks (and dense blocks converted to CSR).
    """
    if isinstance(x, da.Array):
        if x.numblocks[1] != 1:
            x = x.rechunk({1: -1})
        if not sp.issparse(x._meta):
            x = map_csr(x, _csr_block)
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
        out = map_csr(out, _csr_block)
    return out

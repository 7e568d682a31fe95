"""The perturbation-sorted working store: one out-of-core pass that puts each group's cells together.

Real screens are stored in cell-barcode order. Every test against control
wants each perturbation's cells in one block, and the control cells in one
slice. :func:`prepare` writes, once, a zarr store of the same matrix sorted
by perturbation (control first, then the groups in label order, each
group's cells in input order), in row blocks that never split a group.

How, out of core (memory is bounded by a block, never by the matrix):

1. *Scatter.* One task per row block of the input reads it and, for each
   output block, writes the rows that belong there to a spill file
   (lz4 with bit shuffling, indices and counts in the smallest integer type that
   holds them).
2. *Gather.* One task per output block reads its spill pieces, puts the
   rows in sorted order and writes the block to ``blocks/<k>`` of the
   store, under a temporary name renamed into place when complete.

The store records the input's fingerprint (:func:`fingerprint`: resolved
path, size, modification time, a digest of the content, the matrix read
and the settings). It is reused while the fingerprint matches, resumed
block by block after an interruption, and rebuilt when the input changed.
``obs`` holds the sorted cells and ``obs['input_row']`` their row in the
input, so per-cell outputs map back to the input's order. Every chunk of
the store carries zarr's CRC-32C (:func:`pertscale.io._blocks.checksummed`)
and each block the CRC-32 of its arrays, so damage is never read as data.

The content digest (:func:`content_digest`), a SHA-256, covers:

- every value of ``obs`` and ``var`` (and ``raw/var``): the labels, the
  cell and gene names (of a zarr store: every file under them);
- the matrix's row pointer (``indptr``), its attributes (shape,
  encoding), and of a zarr store every metadata file and the list of all
  files with their sizes, of an HDF5 file every stored chunk's offset and
  size;
- the matrix's ``data`` and ``indices`` (a dense matrix's values): all of
  them when they take at most :data:`FULL_HASH_BYTES` (64 MiB) on disk,
  else :data:`SAMPLES` (64) stored chunks of each, evenly spread, read raw
  without decoding, :data:`PIECE_BYTES` (256 KiB) of each (a smaller
  chunk whole, a larger one its first and last halves); of an unchunked
  HDF5 dataset, 64 evenly spread slices of 256 KiB.

So an input replaced by another of the same size and modification time
(a sync tool, ``touch -r``, h5ad files of one shape) is told apart. Not
covered: a change confined to chunks (or slices) that are not sampled, of
a matrix over 64 MiB on disk, that keeps every chunk's stored size and the
input's total size and modification time; nor ``obsm``, ``uns`` or other
layers, which the store does not hold. It reads about 32 MiB of the matrix
at most, plus ``obs``, ``var`` and the row pointer: 0.08 s on a simulated
200,000 x 2,000 ``.h5ad`` (its QC pass: 0.75 s warm, 2.8 s cold), 0.04 s
on its ``.zarr`` copy (QC pass 1.2-2.7 s), 0.016 s on the 20,729-cell
Papalexi file (QC pass 0.04 s).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._deprecation import renamed_arguments
from .._validation import check_control, label_list, perturbation_labels
from ._atomic import replacing
from ._blocks import DamagedStoreError, checksummed, reason, unreadable_chunks

logger = logging.getLogger(__name__)

#: Bumped when the layout changes: a store of another version is rebuilt.
FORMAT_VERSION = 1
#: Entries per stored chunk of a block's arrays.
CHUNK_ENTRIES = 4 * 2**20
#: The file that makes a directory a working store: fingerprint, block bounds, completeness.
MARKER = "pertscale_working_store.json"


# --------------------------------------------------------------------------- fingerprint and plan


def fingerprint(path: Path, **settings) -> dict:
    """What identifies the input of a working store: resolved path, size, modification time, content, settings.

    ``content`` is :func:`content_digest` of the matrix named by
    ``settings['matrix']`` (``"X"``, ``"raw"`` or a layer's name; default
    ``X``): what it covers is in this module's docstring. For a ``.zarr``
    directory, size and time are the sum and the latest over its files.
    """
    path = Path(path).resolve()
    if path.is_dir():
        stats = [p.stat() for p in path.rglob("*") if p.is_file()]
        size = sum(st.st_size for st in stats)
        mtime = max((st.st_mtime_ns for st in stats), default=0)
    else:
        st = path.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    content = content_digest(path, _matrix_element(settings.get("matrix")))
    return {
        "input": str(path),
        "size": int(size),
        "mtime_ns": int(mtime),
        "content": content,
        "version": FORMAT_VERSION,
        **settings,
    }


#: A matrix that takes at most this many bytes on disk is hashed whole; a larger one is sampled.
FULL_HASH_BYTES = 64 * 2**20
#: Stored chunks (or slices) hashed of each of a larger matrix's ``data`` and ``indices`` (or its dense array).
SAMPLES = 64
#: Bytes hashed of each sampled chunk: all of a smaller one, else its first and last half of this.
PIECE_BYTES = 256 * 2**10
#: zarr's metadata files (v3, v2, consolidated): always hashed whole.
ZARR_METADATA = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})


def _matrix_element(matrix: str | None) -> str:
    """The store key of the matrix that the settings' ``matrix`` names."""
    return {None: "X", "X": "X", "raw": "raw/X"}.get(matrix, f"layers/{matrix}")


def content_digest(path: str | Path, key: str = "X") -> str:
    """A SHA-256 over what a working store is made from: ``obs``, ``var`` and the matrix at ``key``.

    - ``obs``, ``var`` (and ``raw/var``): every value (the labels, the
      cell and gene names); of a zarr store, every file of them.
    - The matrix's row pointer (``indptr``), its metadata (shape, encoding)
      and, of a zarr store, every metadata file and the list of every file
      with its size; of an HDF5 file, every stored chunk's offset and size.
    - The matrix's ``data`` and ``indices`` (a dense matrix's values): all
      of them when they take at most :data:`FULL_HASH_BYTES` on disk; else
      :data:`SAMPLES` stored chunks of each, evenly spread (read raw, not
      decoded; :data:`PIECE_BYTES` of each: a smaller chunk whole, a larger
      one its first and last halves), or as many slices of an unchunked HDF5
      dataset.

    Not covered: a change confined to chunks (or slices) that are not
    sampled and that keeps every chunk's stored size, of a matrix larger
    than :data:`FULL_HASH_BYTES`; the caller (:func:`fingerprint`) also
    compares the total size and the modification time, so such a change
    must also keep those. Nor other elements (``obsm``, ``uns``, other
    layers), which the working store does not hold.
    """
    h = hashlib.sha256()
    path = Path(path)
    if path.is_dir():
        _digest_zarr(h, path, key)
    else:
        import h5py

        with h5py.File(path, "r") as f:
            _digest_h5(h, f, key)
    return h.hexdigest()


def _evenly(n: int, k: int) -> list[int]:
    """``k`` indices of ``range(n)`` spread evenly, first and last included (all of them when ``n <= k``)."""
    return list(range(n)) if n <= k else sorted({int(round(i)) for i in np.linspace(0, n - 1, k)})


def _piece(read, size: int) -> bytes:
    """The bytes hashed of a sampled chunk: all of it up to :data:`PIECE_BYTES`, else its two ends."""
    if size <= PIECE_BYTES:
        return read(0, size)
    half = PIECE_BYTES // 2
    return read(0, half) + read(size - half, half)


def _digest_zarr(h, root: Path, key: str) -> None:
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
    whole, sampled = [], {}
    for rel, p in files:
        size = p.stat().st_size
        h.update(f"{rel}\0{size}\n".encode())
        if p.name in ZARR_METADATA or rel.startswith(("obs/", "var/", "raw/var/", f"{key}/indptr/")):
            whole.append(p)
        elif rel.startswith(f"{key}/"):
            part = rel[len(key) + 1 :].split("/", 1)[0]
            sampled.setdefault(part if part in ("data", "indices") else "", []).append((p, size))
    for p in whole:
        h.update(p.read_bytes())
    full = sum(size for chunks in sampled.values() for _, size in chunks) <= FULL_HASH_BYTES
    for name in sorted(sampled):
        chunks = sampled[name]
        for i in range(len(chunks)) if full else _evenly(len(chunks), SAMPLES):
            p, size = chunks[i]
            if full:
                h.update(p.read_bytes())
                continue
            with open(p, "rb") as f:

                def read(offset, n, f=f):
                    f.seek(offset)
                    return f.read(n)

                h.update(_piece(read, size))


def _digest_h5(h, f, key: str) -> None:
    for name in ("obs", "var", "raw/var"):
        if name in f:
            _hash_values(h, f[name])
            items = []
            f[name].visititems(lambda n, obj, items=items: items.append((n, obj)))
            for _, obj in sorted(items, key=lambda item: item[0]):
                _hash_values(h, obj)
    if key not in f:
        return  # read() says where the matrix is
    elem = f[key]
    h.update(_attrs(elem))
    if hasattr(elem, "keys"):  # sparse: indptr whole, data and indices sampled
        h.update(np.ascontiguousarray(elem["indptr"][()]).tobytes())
        arrays = [elem[name] for name in ("data", "indices") if name in elem]
    else:
        arrays = [elem]
    full = sum(ds.id.get_storage_size() for ds in arrays) <= FULL_HASH_BYTES
    for ds in arrays:
        _hash_dataset(h, ds, full=full)


def _attrs(obj) -> bytes:
    return json.dumps({k: np.asarray(v).tolist() for k, v in obj.attrs.items()}, sort_keys=True, default=str).encode()


def _hash_values(h, obj) -> None:
    """An HDF5 group's attributes, or a dataset's name, attributes and values (strings as their bytes)."""
    h.update(obj.name.encode() + _attrs(obj))
    if not hasattr(obj, "dtype"):
        return
    values = np.asarray(obj[()])
    h.update(f"{values.dtype}{values.shape}".encode())
    if values.dtype.kind == "O":  # h5py reads variable-length strings as bytes objects
        try:
            values = values.astype("S")  # fixed width: one vectorized copy
        except (TypeError, ValueError):  # text that is not ASCII, or other objects
            values = np.array([v if isinstance(v, bytes) else str(v).encode() for v in values.ravel()], dtype="S")
    h.update(np.ascontiguousarray(values).tobytes())


def _hash_dataset(h, ds, *, full: bool) -> None:
    """A matrix dataset: all its stored chunks raw (``full``), or their offsets and sizes and a sample of them."""
    h.update(f"{ds.name}{ds.shape}{ds.dtype}".encode())
    if ds.size == 0:
        return
    if ds.chunks is None:  # contiguous: the values themselves (uncompressed), whole or in evenly spread slices
        row = max(1, int(np.prod(ds.shape[1:]))) * ds.dtype.itemsize
        step = max(1, PIECE_BYTES // row)
        starts = [0] if full else [i * step for i in _evenly(-(-ds.shape[0] // step), SAMPLES)]
        for a in starts:
            h.update(np.ascontiguousarray(ds[a : ds.shape[0] if full else a + step]).tobytes())
        return
    chunks = []
    try:
        ds.id.chunk_iter(lambda info: chunks.append((list(info.chunk_offset), int(info.byte_offset), int(info.size))))
    except (AttributeError, NotImplementedError):  # HDF5 before 1.12.3: one call per chunk
        for i in range(ds.id.get_num_chunks()):
            info = ds.id.get_chunk_info(i)
            chunks.append((list(info.chunk_offset), int(info.byte_offset), int(info.size)))
    h.update(json.dumps([(offset, size) for offset, _, size in chunks]).encode())
    with open(ds.file.filename, "rb") as f:  # the stored (compressed) bytes, read where they lie: nothing decoded

        def read(a: int, n: int) -> bytes:
            f.seek(where + a)
            return f.read(n)

        for i in range(len(chunks)) if full else _evenly(len(chunks), SAMPLES):
            _, where, size = chunks[i]
            h.update(read(0, size) if full else _piece(read, size))


@dataclass(frozen=True)
class SortPlan:
    """Where every kept input row goes.

    Attributes
    ----------
    order
        ``(n_kept,)`` int64: input row of each sorted position.
    position
        ``(n_obs,)`` int64: sorted position of each input row, -1 if dropped.
    bounds
        ``(n_blocks + 1,)`` int64 first sorted position of each output block.
    labels
        ``(n_kept,)`` the sorted labels.
    """

    order: np.ndarray
    position: np.ndarray
    bounds: np.ndarray
    labels: np.ndarray


def sort_plan(labels: pd.Series, control_label: str, *, exclude: list[str], budget: int) -> SortPlan:
    """Control first, then the groups in label order (categories order for a categorical), blocks of whole groups.

    The control, which is summarised from a slice and never tested, is cut
    into blocks of ``budget`` rows; each other group stays whole in one
    block (a group longer than ``budget`` is a block of its own).
    """
    from ..kernels.groups import pack_groups

    values = labels.astype(str).to_numpy()
    names = list(labels.cat.categories.astype(str)) if isinstance(labels.dtype, pd.CategoricalDtype) else None
    names = names or sorted(set(values))
    names = [str(control_label)] + [n for n in names if n != str(control_label) and n not in set(exclude)]
    codes = pd.Categorical(values, categories=names).codes.astype(np.int64)
    kept = codes >= 0
    rank = np.where(kept, codes, len(names))
    order = np.argsort(rank, kind="stable")[: int(kept.sum())]
    position = np.full(values.shape[0], -1, dtype=np.int64)
    position[order] = np.arange(order.size)
    sizes = np.bincount(codes[kept], minlength=len(names))
    n_control = int(sizes[0])
    control_blocks = [budget] * (n_control // budget) + ([n_control % budget] if n_control % budget else [])
    other = [s for s in pack_groups(sizes[1:][sizes[1:] > 0], budget) if s] if (sizes[1:] > 0).any() else []
    bounds = np.concatenate([[0], np.cumsum(control_blocks + other)]).astype(np.int64)
    return SortPlan(order=order, position=position, bounds=bounds, labels=values[order])


# --------------------------------------------------------------------------- spill files
#
# One spill file per input block: the compressed arrays of every piece, one after another, and an
# index (output block, array name, dtype, length, offset, bytes). A gather task reads its pieces from each
# file by offset: one file written per input block, one small read per (input block, output block).

SPILL_INDEX = np.dtype(
    [("dest", "<i8"), ("name", "S8"), ("dtype", "S8"), ("n", "<i8"), ("offset", "<i8"), ("nbytes", "<i8")]
)


def _codec():
    """lz4 with bit shuffling: small integers compress 2-3x at about 1 GB/s each way (zstd: 0.3 GB/s)."""
    import numcodecs

    return numcodecs.Blosc(cname="lz4", clevel=1, shuffle=numcodecs.Blosc.BITSHUFFLE)


def _small(a: np.ndarray) -> np.ndarray:
    """Non-negative integers in the smallest unsigned type that holds them (other values unchanged)."""
    if a.size and np.issubdtype(a.dtype, np.integer) and a.min() >= 0:
        for t in (np.uint8, np.uint16, np.uint32):
            if a.max() <= np.iinfo(t).max:
                return a.astype(t)
    return a


def _scatter(block, pos, rows_in, bounds, spill: str, done: frozenset):
    """Scatter task: write the rows of an input block (input rows ``rows_in``) to the spill, by output block."""
    codec = _codec()
    kept = np.flatnonzero(pos >= 0)
    if not kept.size:  # nothing to write (an empty block would have no row of its own to name its files by, and
        return np.array([0], dtype=np.int64)  # its empty files, named as block 0's, could replace block 0's pieces)
    r0 = int(rows_in[0])
    block = sp.csr_matrix(block)
    dest = np.searchsorted(bounds, pos[kept], side="right") - 1
    by_dest = np.argsort(dest * (bounds[-1] + 1) + pos[kept], kind="stable")  # by block, then sorted position
    kept, dest = kept[by_dest], dest[by_dest]
    index, buffers, offset = [], [], 0
    for d in np.unique(dest):
        if int(d) in done:
            continue
        rows = kept[dest == d]
        part = block[rows]
        arrays = {
            "position": pos[rows],
            "indptr": part.indptr.astype(np.int64),
            "indices": _small(part.indices),
            "data": _small(part.data),
        }
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            raw = codec.encode(a) if a.size else b""
            index.append((int(d), name, a.dtype.str, a.size, offset, len(raw)))
            buffers.append(raw)
            offset += len(raw)
    folder = Path(spill)
    folder.mkdir(parents=True, exist_ok=True)
    # both files replaced whole (a later computation of the graph writes them again, identical, while another
    # may be reading them: a file written in place could be read half written); the data file last
    with replacing(folder / f"{r0}.idx.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.array(index, dtype=SPILL_INDEX))
    with replacing(folder / f"{r0}.bin") as tmp:  # its presence marks the piece complete
        with open(tmp, "wb") as f:
            for raw in buffers:
                f.write(raw)
    return np.array([offset], dtype=np.int64)


def _read_pieces(spill: Path, k: int) -> list[dict[str, np.ndarray]]:
    """The pieces of output block ``k``, one per input block that holds some of its rows."""
    codec = _codec()
    pieces = []
    for data_file in sorted(spill.glob("*.bin"), key=lambda p: int(p.stem)):
        index = np.load(spill / f"{data_file.stem}.idx.npy")
        mine = index[index["dest"] == k]
        if not mine.size:
            continue
        piece = {}
        with open(data_file, "rb") as f:
            for entry in mine:
                f.seek(int(entry["offset"]))
                raw = codec.decode(f.read(int(entry["nbytes"]))) if entry["n"] else b""
                piece[entry["name"].decode()] = np.frombuffer(raw, dtype=np.dtype(entry["dtype"].decode()))[
                    : entry["n"]
                ]
        pieces.append(piece)
    return pieces


def _assemble(k: int, bounds: np.ndarray, n_vars: int, spill: str, what: str, fix: str) -> sp.csr_matrix:
    """Output block ``k`` from its spill pieces, rows in sorted order (values in the spill's small dtypes)."""
    lo, hi = int(bounds[k]), int(bounds[k + 1])
    pieces = _read_pieces(Path(spill), k)
    positions = np.concatenate([p["position"] for p in pieces]) if pieces else np.empty(0, np.int64)
    if positions.size != hi - lo or not np.array_equal(np.sort(positions), np.arange(lo, hi)):
        raise DamagedStoreError(
            f"{what}: block {k} is missing rows from its spill files (found {positions.size} of {hi - lo}); {fix}"
        )
    parts = [
        sp.csr_matrix((p["data"], p["indices"].astype(np.int32), p["indptr"]), shape=(p["indptr"].size - 1, n_vars))
        for p in pieces
    ]
    if not parts:
        return sp.csr_matrix((0, n_vars))
    return sp.vstack(parts, format="csr")[np.argsort(positions, kind="stable")]


def _gather(k: int, bounds: np.ndarray, n_vars: int, dtype: str, spill: str, store: str) -> int:
    """Gather task: assemble output block ``k`` from its spill pieces and write it, atomically."""
    import zarr

    final = Path(store) / "blocks" / str(k)
    if (final / "zarr.json").exists():
        return 0  # written by an earlier, interrupted run
    lo, hi = int(bounds[k]), int(bounds[k + 1])
    block = _assemble(k, bounds, n_vars, spill, f"working store {store!r}", "delete the working store and run again")
    arrays = {"indptr": block.indptr.astype(np.int64), "indices": _small(block.indices), "data": _small(block.data)}
    with replacing(final) as tmp:  # renamed into place whole: a block is there complete, or not at all
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for name, a in arrays.items():
            stored = group.create_array(  # shape and dtype, then the values: zarr 3.0's create_array takes no data=
                name,
                shape=a.shape,
                dtype=a.dtype,
                chunks=(max(1, min(a.shape[0], CHUNK_ENTRIES)),),
                compressors=checksummed(zarr.codecs.BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")),
            )
            stored[:] = a
        group.attrs.update(
            {
                "n_rows": hi - lo,
                "dtype": dtype,
                "crc32": {name: zlib.crc32(np.ascontiguousarray(a).view(np.uint8)) for name, a in arrays.items()},
                "sizes": _file_sizes(tmp),
            }
        )
    return hi - lo


def _file_sizes(block: Path) -> dict[str, int]:
    """Bytes of each file of a stored block but its own ``zarr.json`` (which holds this record)."""
    return {
        str(p.relative_to(block)): p.stat().st_size
        for p in sorted(block.rglob("*"))
        if p.is_file() and p.relative_to(block) != Path("zarr.json")
    }


def _set_aside(block: Path) -> None:
    """Move a damaged block out of the way: the next :func:`prepare` writes it again."""
    try:
        os.replace(block, block.parent / f".{block.name}.damaged-{uuid.uuid4().hex[:8]}")
    except OSError:  # another task moved it first
        pass


def _damaged_blocks(store: Path, n_blocks: int) -> list[int]:
    """Blocks missing, or whose files have other sizes than when written (truncated, replaced): no data is read."""
    damaged = []
    for k in range(n_blocks):
        block = store / "blocks" / str(k)
        try:
            recorded = json.loads((block / "zarr.json").read_text())["attributes"].get("sizes")
        except (OSError, ValueError, KeyError):
            damaged.append(k)
            continue
        if recorded is not None and _file_sizes(block) != recorded:
            damaged.append(k)
    return damaged


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class StoredBlocks:
    """A working store's matrix: what a read task needs.

    Attributes
    ----------
    path
        The working store.
    n_vars
        Genes.
    dtype
        dtype of the input's values (the store may hold a smaller integer type).
    rows
        Rows of each block, as the store's layout records them.
    """

    path: str
    n_vars: int
    dtype: str
    rows: tuple[int, ...]

    def read(self, k: int) -> sp.csr_matrix:
        """Block ``k`` as a CSR matrix in the input's dtype.

        Raises
        ------
        DamagedStoreError
            If the block cannot be read.
        """
        import zarr

        block = Path(self.path) / "blocks" / str(k)
        try:
            g = zarr.open_group(str(block), mode="r")
            arrays = {}
            for name in ("indptr", "indices", "data"):
                try:
                    arrays[name] = g[name][:]
                except Exception as err:
                    where = unreadable_chunks(g[name], "zarr")
                    raise ValueError(f"its {name} array cannot be read{where}: {reason(err)}") from err
            for name, crc in (g.attrs.get("crc32") or {}).items():
                if zlib.crc32(np.ascontiguousarray(arrays[name]).view(np.uint8)) != crc:
                    raise ValueError(f"its {name} does not match the checksum it was written with")
            indptr = arrays["indptr"]
            if indptr.size - 1 != self.rows[k]:
                raise ValueError(f"it holds {indptr.size - 1} rows where the store's layout has {self.rows[k]}")
            return sp.csr_matrix(
                (arrays["data"].astype(self.dtype), arrays["indices"].astype(np.int32), indptr),
                shape=(indptr.size - 1, self.n_vars),
            )
        except Exception as err:
            _set_aside(block)
            raise DamagedStoreError(
                f"block {k} of the working store {self.path!r} is damaged ({err}); it was set aside and is "
                "written again when the run (or ps.io.prepare) is started again"
            ) from err


def _read_block(stored: StoredBlocks, block_info=None):
    return stored.read(block_info[None]["chunk-location"][0])


def _is_complete(store: Path, fp: dict) -> bool | None:
    """``True``: complete for this input; ``False``: started for it; ``None``: absent or for another input."""
    meta = store / MARKER
    if not meta.exists():
        return None
    info = json.loads(meta.read_text())
    if info.get("fingerprint") != fp:
        return None
    return bool(info.get("complete"))


def open_prepared(store: str | Path) -> ad.AnnData:
    """A complete working store as a lazy AnnData (``X`` blocks = stored blocks, each of whole groups).

    Raises
    ------
    DamagedStoreError
        If the store is incomplete.
    """
    store = Path(store)
    meta = store / MARKER
    info = json.loads(meta.read_text()) if meta.exists() else {}
    if not info.get("complete"):
        raise DamagedStoreError(f"working store {str(store)!r} is incomplete; run ps.io.prepare again to finish it")
    import zarr

    group = zarr.open_group(str(store), mode="r")
    try:
        obs = ad.io.read_elem(group["obs"])
        var = ad.io.read_elem(group["var"])
    except Exception as err:  # a chunk that fails its checksum, or a lost file
        raise DamagedStoreError(
            f"the cell or gene table of the working store {str(store)!r} cannot be read ({reason(err)}); delete "
            "the working store and run again (it is rebuilt from the input)"
        ) from err
    rows = tuple(int(n) for n in np.diff(info["bounds"]))
    stored = StoredBlocks(str(store.resolve()), len(var), info["dtype"], rows)
    dtype = np.dtype(info["dtype"])
    x = da.map_blocks(
        partial(_read_block, stored),
        chunks=(rows, (len(var),)),
        dtype=dtype,
        meta=sp.csr_matrix((0, 0), dtype=dtype),
    )
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.uns["pertscale"] = {
        "source": {"path": info["fingerprint"]["input"], "working_store": str(store.resolve()), "format": "working"}
    }
    excluded = info.get("excluded") or {}
    if excluded.get("labels"):  # labels left out of the store, and their cells in the input (for a QC summary)
        adata.uns["pertscale"]["source"]["excluded_cells"] = {
            "perturbation_column": excluded["perturbation_column"],
            "labels": np.asarray(excluded["labels"], dtype=object),
            "n_cells": np.asarray(excluded["n_cells"], dtype=np.int64),
        }
    return adata


@renamed_arguments(positional=("perturbation_column", "control_label"))
def prepare(
    path: str | Path,
    *,
    perturbation_column: str,
    control_label: str,
    out: str | Path | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    exclude_labels=(),
    chunk_size: int | None = None,
    obs_columns: pd.DataFrame | None = None,
) -> ad.AnnData:
    """Write (or reuse) a perturbation-sorted working store of a screen, and open it lazily.

    The sorting pass computes on Dask's current scheduler: inside
    :func:`pertscale.cluster.using` (``pertscale run`` opens one), on a
    ``distributed.Client``, or dask's threads in this process.

    Parameters
    ----------
    path
        The input ``.h5ad`` or ``.zarr`` of counts (read with
        :func:`pertscale.read`, so its checks apply).
    perturbation_column, control_label
        The ``obs`` column of perturbation labels and the control's label.
    out
        The working store, a ``.zarr`` directory; default
        ``<input>.pertscale-sorted.zarr`` beside the input.
    layer, use_raw
        Read ``layers[layer]`` or ``raw.X`` instead of ``X``.
    exclude_labels
        Labels whose cells are left out of the store (e.g. ``multiple``).
    chunk_size
        Rows per block to aim for (whole groups: a block may be longer to
        hold one); default from available memory, as :func:`pertscale.read`.
    obs_columns
        Per-cell columns made outside the file (``n_obs`` rows indexed by
        its ``obs_names``, in its order; a guide assignment of
        :func:`pertscale.pp.assign_guides`), added to ``obs`` before the
        sort: ``perturbation_column`` may be one of them. A digest of their
        values is part of the store's identity.

    Returns
    -------
    anndata.AnnData
        The kept cells, sorted: control first, then each perturbation in
        label order; ``X`` a Dask array whose blocks each hold whole groups;
        ``obs['input_row']`` each cell's row in the input. The labels left
        out and their cells in the input are recorded in
        ``uns['pertscale']['source']['excluded_cells']``, so that
        :func:`pertscale.pp.qc_summary` lists them as excluded.

    Raises
    ------
    ValueError
        For a bad input, column or control label (as :func:`pertscale.read`
        and the analyses); a control label in ``exclude_labels``; an ``out``
        that is the input, lies inside a ``.zarr`` input or would replace
        the directory holding it, or is a file (all before any pass).
    pertscale.io.DamagedStoreError
        If an existing store cannot be used.

    Notes
    -----
    One read of the input and, for the spill, one write and one read of the
    kept data, compressed; the working store takes about as much disk as a
    compressed copy of the kept counts.
    """
    from .._progress import labelled
    from ._read import read
    from ._write import check_not_input

    path = Path(path)
    store = Path(out) if out is not None else path.with_name(path.name + ".pertscale-sorted.zarr")
    check_not_input(store, [path], what="the working store (out=)")
    if store.exists() and not store.is_dir():
        raise ValueError(
            f"the working store (out=) {str(store)!r} is a file, not a directory; choose a new path "
            "(--working-store / out=), ending in .zarr"
        )
    exclude = label_list(exclude_labels, "exclude_labels")
    if str(control_label) in exclude:
        raise ValueError(
            f"exclude_labels (--exclude-labels) includes the control label {str(control_label)!r}: no control cell "
            "would be left; remove it from exclude_labels"
        )
    adata = read(path, layer=layer, use_raw=use_raw, chunk_size=chunk_size)
    extra = {}
    if obs_columns is not None:  # columns made in this process (a guide assignment): part of the store's identity
        if len(obs_columns) != adata.n_obs or not obs_columns.index.astype(str).equals(adata.obs_names.astype(str)):
            raise ValueError("obs_columns must have one row per cell of the input, in its order (its obs_names)")
        for column in obs_columns.columns:
            adata.obs[column] = obs_columns[column].to_numpy()
        digest = pd.util.hash_pandas_object(obs_columns.astype(str), index=True).to_numpy().tobytes()
        extra["obs_columns"] = hashlib.sha1(digest).hexdigest()[:16]
    check_control(perturbation_labels(adata.obs, perturbation_column), control_label, perturbation_column)
    labels = adata.obs[perturbation_column]
    store = store.absolute()  # the workers write it: their working directory may not be this process's
    fp = fingerprint(
        path,
        matrix=layer or ("raw" if use_raw else "X"),
        perturbation_column=perturbation_column,
        control_label=str(control_label),
        exclude_labels=sorted(exclude),
        **extra,
    )
    state = _is_complete(store, fp)
    if state:
        bounds = json.loads((store / MARKER).read_text())["bounds"]
        damaged = _damaged_blocks(store, len(bounds) - 1)
        if not damaged:
            logger.info("reusing the working store %s", store)
            return open_prepared(store)
        logger.warning(
            "working store %s: block(s) %s are missing or damaged (file sizes differ from when they were "
            "written); writing them again",
            store,
            damaged[:10],
        )
        for k in damaged:
            _set_aside(store / "blocks" / str(k))
        state = False
    if store.exists() and not (store / MARKER).exists() and any(store.iterdir()):
        raise ValueError(
            f"the working store path {str(store)!r} is a directory that is not a working store; "
            "choose a new path (--working-store / out=), it is never emptied"
        )
    budget = int(max(adata.X.chunks[0]))
    plan = sort_plan(labels, control_label, exclude=exclude, budget=budget)
    if state is False and json.loads((store / MARKER).read_text()).get("bounds") != plan.bounds.tolist():
        state = None  # started with other blocks (another memory plan): its blocks cannot be reused
    if state is None and store.exists():
        logger.info("the working store %s was made from another input, settings or blocks: rebuilding it", store)
        shutil.rmtree(store)
    n_vars = adata.n_vars
    dtype = adata.X.dtype.str
    left_out = perturbation_labels(adata.obs, perturbation_column).value_counts()
    left_out = left_out[left_out.index.isin(exclude)]  # their cells in the input: what a QC summary reports of them
    excluded = {"perturbation_column": perturbation_column, "labels": [*left_out.index], "n_cells": left_out.tolist()}
    info = {"fingerprint": fp, "bounds": plan.bounds.tolist(), "dtype": dtype, "complete": False, "excluded": excluded}
    (store / "blocks").mkdir(parents=True, exist_ok=True)
    with replacing(store / MARKER) as tmp:
        tmp.write_text(json.dumps(info))
    n_blocks = plan.bounds.size - 1
    done = frozenset(k for k in range(n_blocks) if (store / "blocks" / str(k) / "zarr.json").exists())
    spill = store / ".spill"
    shutil.rmtree(spill, ignore_errors=True)  # pieces of an interrupted run may be incomplete: scatter again
    if len(done) < n_blocks:
        logger.info(
            "sorting %d cells into %d blocks in %s (%d already written)", plan.order.size, n_blocks, store, len(done)
        )
        x = adata.X
        scattered = da.blockwise(
            _scatter,
            "i",
            x,
            "ij",
            da.from_array(plan.position, chunks=(x.chunks[0],)),
            "i",
            da.arange(x.shape[0], chunks=(x.chunks[0],)),
            "i",
            plan.bounds,
            None,
            str(spill),
            None,
            done,
            None,
            adjust_chunks={"i": 1},
            concatenate=True,
            dtype=np.int64,
            meta=np.empty((0,), dtype=np.int64),
        )
        # one Delayed for the end of the scatter: a dask array passed to each gather task separately would be
        # optimized, and computed, once per task
        barrier = scattered.sum().to_delayed().item()
        import dask

        gathered = [
            dask.delayed(_gather_after, pure=False)(barrier, k, plan.bounds, n_vars, dtype, str(spill), str(store))
            for k in range(n_blocks)
            if k not in done
        ]
        with labelled("sorting by perturbation"):
            dask.compute(*gathered)
    shutil.rmtree(spill, ignore_errors=True)
    for old in (store / "blocks").glob(".*.damaged-*"):
        shutil.rmtree(old, ignore_errors=True)
    _write_annotations(store, adata, plan)
    info["complete"] = True
    with replacing(store / MARKER) as tmp:  # the record of a complete store, in one rename
        tmp.write_text(json.dumps(info))
    return open_prepared(store)


def _gather_after(barrier, *args):
    return _gather(*args)


# --------------------------------------------------------------------------- the same sort, lazily


#: Spill directories of lazy sorts made by this process, removed when it exits.
_SPILLS: set[str] = set()


def _remove_spills() -> None:
    for spill in list(_SPILLS):
        shutil.rmtree(spill, ignore_errors=True)
    _SPILLS.clear()


def _sorted_block(barrier, k: int, bounds: np.ndarray, n_vars: int, dtype: str, spill: str) -> sp.csr_matrix:
    """Gather task of :func:`sort_rows`: output block ``k`` in memory, in the input's dtype."""
    block = _assemble(k, bounds, n_vars, spill, "a sort by perturbation", "compute again")
    return sp.csr_matrix((block.data.astype(dtype), block.indices, block.indptr), shape=block.shape)


def sort_rows(x: da.Array, position: np.ndarray, bounds: np.ndarray) -> da.Array:
    """The rows of ``x`` at their ``position``, in blocks of ``bounds``, lazily and out of core: :func:`prepare`'s sort.

    The same two steps as the working store's (one task per input block
    writes its rows, compressed, to a spill file per output block's pieces;
    one task per output block reads its pieces and puts the rows in order),
    but the sorted blocks stay in the graph instead of being written to a
    store: what :func:`pertscale.tl.rank_genes_groups` does with cells that
    are not stored by perturbation. Memory per task is bounded by a block,
    as in ``pertscale run``; the spill (about a compressed copy of the kept
    values) goes to Dask's ``temporary-directory`` (default the system's
    temporary directory; on a cluster of several machines set it to a
    shared file system) and is written again by each computation of the
    graph; it is removed when this process exits.

    Parameters
    ----------
    x
        ``(n_obs, n_vars)`` Dask array of CSR row blocks (any values).
    position
        ``(n_obs,)`` int64: each row's sorted position, ``-1`` to leave it out.
    bounds
        ``(n_blocks + 1,)`` int64: first sorted position of each output block.

    Returns
    -------
    dask.array.Array
        ``(bounds[-1], n_vars)`` CSR row blocks of ``bounds``'s sizes.
    """
    import atexit
    import tempfile

    import dask
    from dask.base import tokenize

    if x.numblocks[1] != 1:
        x = x.rechunk({1: -1})
    position = np.asarray(position, dtype=np.int64)
    bounds = np.asarray(bounds, dtype=np.int64)
    token = tokenize(x.name, position, bounds)
    root = dask.config.get("temporary-directory", None) or tempfile.gettempdir()
    spill = str(Path(root).absolute() / f"pertscale-sort-{token}")
    if not _SPILLS:
        atexit.register(_remove_spills)
    _SPILLS.add(spill)
    scattered = da.blockwise(
        _scatter,
        "i",
        x,
        "ij",
        da.from_array(position, chunks=(x.chunks[0],)),
        "i",
        da.arange(x.shape[0], chunks=(x.chunks[0],)),
        "i",
        bounds,
        None,
        spill,
        None,
        frozenset(),
        None,
        adjust_chunks={"i": 1},
        concatenate=True,
        dtype=np.int64,
        meta=np.empty((0,), dtype=np.int64),
        name=f"sort-scatter-{token}",
    )
    barrier = scattered.sum().to_delayed().item()  # one key: every gather waits for the whole scatter
    meta = sp.csr_matrix((0, 0), dtype=x.dtype)
    blocks = [
        da.from_delayed(
            dask.delayed(_sorted_block, pure=True)(
                barrier, k, bounds, x.shape[1], x.dtype.str, spill, dask_key_name=f"sort-gather-{token}-{k}"
            ),
            shape=(int(bounds[k + 1] - bounds[k]), x.shape[1]),
            dtype=x.dtype,
            meta=meta,
        )
        for k in range(bounds.size - 1)
    ]
    return da.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]


def _write_annotations(store: Path, adata: ad.AnnData, plan: SortPlan) -> None:
    import zarr

    group = zarr.open_group(str(store), mode="a")
    obs = adata.obs.iloc[plan.order].copy()
    obs["input_row"] = plan.order
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        for key in ("obs", "var"):
            if key in group:
                del group[key]
        ad.io.write_elem(group, "obs", obs, dataset_kwargs={"compressors": checksummed()})
        ad.io.write_elem(group, "var", adata.var, dataset_kwargs={"compressors": checksummed()})


def is_sorted(labels: pd.Series, control_label: str, exclude: list[str]) -> bool:
    """Whether each kept label's cells are one contiguous run of rows (as a sorted store has them)."""
    values = labels.astype(str).to_numpy()
    keep = ~np.isin(values, exclude)
    codes, _ = pd.factorize(values)
    codes = np.where(keep, codes, -1)
    rows = np.flatnonzero(codes >= 0)
    c = codes[rows]
    order = np.argsort(c, kind="stable")
    c_sorted, r_sorted = c[order], rows[order]
    starts = np.flatnonzero(np.r_[True, c_sorted[1:] != c_sorted[:-1]])
    ends = np.r_[starts[1:], c_sorted.size]
    return bool((r_sorted[ends - 1] - r_sorted[starts] + 1 == ends - starts).all())

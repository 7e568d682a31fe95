"""Stored matrices: completeness checks and checked block reads.

A lazy read must never turn a damaged store into data. zarr reads a chunk
that is not there as its fill value (zero), and so does anndata's reader,
so a store copied or written only in part would silently give different
cells and different results. This module therefore

- checks, before any computation, that every chunk of a sparse matrix's
  ``data`` and ``indices`` is stored (zarr: the chunk keys against the
  array's shape; HDF5: the allocated chunks), and that ``indptr`` is a
  valid row pointer (non-decreasing, from 0 to ``nnz``);
- reads row blocks itself (each task opens the file, so the graph carries
  only a path and a key), checks each block's structure, and turns any read
  error into one that names the store, the element, the rows and the chunks.

A dense zarr matrix cannot be checked for missing chunks: zarr leaves out
chunks that hold only zeros by design, so a missing chunk there is
legitimately all zero.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

SPARSE = ("csr_matrix", "csc_matrix")


class DamagedStoreError(ValueError):
    """A stored matrix is incomplete or unreadable."""


def checksummed(compressor=None) -> tuple:
    """The ``compressors=`` of a zarr v3 array: ``compressor`` (default zstd level 0), then a CRC-32C of each chunk.

    zarr's ``Crc32cCodec`` appends the checksum of the compressed chunk
    when it writes and checks it when it reads, so a flipped bit fails the
    read (``ValueError: Stored and computed checksum do not match``) instead
    of decoding into other numbers. Every zarr store pertscale writes uses
    it (the working store, result stores, ``ps.write``, ``ps.io.convert``).
    """
    import zarr

    return (compressor if compressor is not None else zarr.codecs.ZstdCodec(level=0), zarr.codecs.Crc32cCodec())


@dataclass(frozen=True)
class StoredMatrix:
    """Where a matrix lives and how it is stored; what a read task needs.

    Attributes
    ----------
    path
        Resolved path of the ``.h5ad`` file or ``.zarr`` directory.
    fmt
        ``"h5ad"`` or ``"zarr"``.
    key
        The element inside the store: ``"X"``, ``"layers/NAME"`` or ``"raw/X"``.
    encoding
        anndata encoding: ``"csr_matrix"``, ``"csc_matrix"`` or ``"array"``.
    shape
        ``(n_obs, n_vars)``.
    dtype
        dtype of the stored values.
    """

    path: str
    fmt: str
    key: str
    encoding: str
    shape: tuple[int, int]
    dtype: np.dtype

    @property
    def major_axis(self) -> int:
        """The axis that ``indptr`` runs along: 1 for CSC, else 0."""
        return 1 if self.encoding == "csc_matrix" else 0

    @property
    def where(self) -> str:
        return f"{self.key} in {self.path!r}"

    def open(self):
        """The element, opened read-only; close ``handle`` after use.

        Returns
        -------
        tuple
            ``(element, handle)``; ``handle`` is the h5py file or ``None``.
        """
        if self.fmt == "h5ad":
            import h5py

            f = h5py.File(self.path, "r")
            return f[self.key], f
        import zarr

        return zarr.open_group(self.path, mode="r")[self.key], None

    def read_major(self, start: int, stop: int):
        """Rows ``start:stop`` (columns for CSC) as a scipy matrix or numpy array.

        Raises
        ------
        DamagedStoreError
            If the read fails or the block is not a valid sparse matrix;
            the message names the store, the element, the range and the
            chunks involved.
        """
        what = "columns" if self.encoding == "csc_matrix" else "rows"
        span = ""
        handle = None
        try:
            elem, handle = self.open()
            if self.encoding == "array":
                span = _chunk_names(elem, self.fmt, start, stop)
                return elem[start:stop]
            indptr = np.asarray(elem["indptr"][start : stop + 1], dtype=np.int64)
            lo, hi = int(indptr[0]), int(indptr[-1])
            span = _chunk_names(elem["data"], self.fmt, lo, hi)
            _check_pointer(indptr, elem["data"].shape[0])
            data = elem["data"][lo:hi]
            indices = elem["indices"][lo:hi]
            n_minor = self.shape[1 - self.major_axis]
            if indices.size and (indices.min() < 0 or indices.max() >= n_minor):
                raise ValueError(f"index values outside 0..{n_minor - 1}")
            shape = (stop - start, n_minor)
            if self.encoding == "csc_matrix":
                return sp.csc_matrix((data, indices, indptr - lo), shape=shape[::-1])
            return sp.csr_matrix((data, indices, indptr - lo), shape=shape)
        except (MemoryError, DamagedStoreError):
            raise
        except Exception as err:  # any failure to read is reported as a damaged store, with where
            span = self._unreadable_chunks(start, stop) or span
            raise DamagedStoreError(
                f"cannot read {what} {start:,}-{stop - 1:,} of {self.where}{span}: {reason(err)}. "
                "The store is damaged or incomplete; write or copy it again"
            ) from err
        finally:
            if handle is not None:
                handle.close()

    def _unreadable_chunks(self, start: int, stop: int) -> str:
        """After a failed read: `` (data chunk 'c/2')``, the chunks that fail when read one by one."""
        handle = None
        try:
            elem, handle = self.open()
            if self.encoding == "array":
                spans = [(elem, start, stop)]
            else:
                spans = [(elem["indptr"], start, stop + 1)]
                try:
                    lo, hi = int(elem["indptr"][start]), int(elem["indptr"][stop])
                    spans += [(elem["data"], lo, hi), (elem["indices"], lo, hi)]
                except Exception:
                    pass  # the row pointer itself is unreadable: its chunks are named below
            bad = []
            for arr, a, b in spans:
                size = _chunk_length(arr, self.fmt)
                for first in range(a - a % size, b, size):
                    try:
                        arr[first : min(first + size, arr.shape[0])]
                    except Exception:
                        bad.append(_chunk_names(arr, self.fmt, first, first + 1).strip(" ()"))
            return f" ({', '.join(bad)})" if bad else ""
        except Exception:  # naming is a courtesy; never hide the real error behind it
            return ""
        finally:
            if handle is not None:
                handle.close()

    def check_complete(self, elem, root: Path) -> None:
        """Refuse a store whose matrix is missing chunks or has a broken row pointer.

        Parameters
        ----------
        elem
            The opened element (h5py group/dataset or zarr group/array).
        root
            The store's path (for zarr, the directory the chunk keys live in).

        Raises
        ------
        DamagedStoreError
            Naming the missing chunks and the fix.
        """
        if self.encoding == "array":
            if self.fmt == "h5ad":
                self._refuse_missing("the matrix", [m[0] for m in _missing_h5_chunks(elem)])
            return  # zarr omits all-zero dense chunks by design: nothing to tell apart
        try:
            indptr = np.asarray(elem["indptr"][:], dtype=np.int64)
        except Exception as err:  # a chunk that does not decode, or fails its checksum
            bad = unreadable_chunks(elem["indptr"], self.fmt)
            raise DamagedStoreError(
                f"cannot read the row pointer (indptr) of {self.where}{bad}: {reason(err)}. The store is damaged "
                "or incomplete; write or copy it again"
            ) from err
        try:
            _check_pointer(indptr, elem["data"].shape[0], full=True)
        except Exception as err:
            raise DamagedStoreError(
                f"{self.where} has a broken row pointer (indptr: {err}); a missing or damaged chunk of "
                "indptr would be read as zeros. The store is damaged or incomplete; write or copy it again"
            ) from err
        for name in ("indices", "data"):
            arr = elem[name]
            missing = _missing_h5_chunks(arr) if self.fmt == "h5ad" else _missing_zarr_chunks(arr, root)
            if name == "indices":
                # zarr leaves out a chunk that holds only zeros: legitimate for column indices when no row
                # has two entries in it (each such row's one entry is in column 0); otherwise damage
                missing = [m for m in missing if m[1] is None or _crowded(indptr, m[1], m[2])]
            self._refuse_missing(name, [m[0] for m in missing])

    def _refuse_missing(self, name: str, missing: list[str]) -> None:
        if not missing:
            return
        shown = ", ".join(repr(m) for m in missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        hint = (
            " (If the matrix does store explicit zeros there, zarr leaves such a chunk out: drop them with "
            "X.eliminate_zeros() and write the store again.)"
            if name == "data" and self.fmt == "zarr"
            else ""
        )
        raise DamagedStoreError(
            f"{self.where} is incomplete: {len(missing)} chunk(s) of its {name} array are missing ({shown}) "
            "and would be read as zeros. The store was probably written or copied only in part: write or "
            f"copy it again.{hint}"
        )


def reason(err: BaseException) -> str:
    """What a failed chunk read says, in words: a CRC-32C mismatch is named as such, anything else as raised."""
    if "checksum do not match" in str(err):
        return "its CRC-32C checksum does not match (the chunk changed after it was written)"
    return f"{type(err).__name__}: {err}"


def unreadable_chunks(arr, fmt: str, *, limit: int = 5) -> str:
    """`` (indptr chunk 'c/2')``: the stored chunks of ``arr`` that fail when read one by one (after a failure)."""
    try:
        size = _chunk_length(arr, fmt)
        bad = []
        for first in range(0, arr.shape[0], size):
            try:
                arr[first : min(first + size, arr.shape[0])]
            except Exception:
                bad.append(_chunk_names(arr, fmt, first, first + 1).strip(" ()"))
                if len(bad) >= limit:
                    break
        return f" ({', '.join(bad)})" if bad else ""
    except Exception:  # naming is a courtesy; never hide the real error behind it
        return ""


def _crowded(indptr: np.ndarray, lo: int, hi: int) -> bool:
    """Whether some row has two or more entries among entries ``lo:hi``."""
    first = max(int(np.searchsorted(indptr, lo, side="right")) - 1, 0)
    last = int(np.searchsorted(indptr, hi, side="left"))
    starts = np.maximum(indptr[first:last], lo)
    stops = np.minimum(indptr[first + 1 : last + 1], hi)
    return bool(((stops - starts) >= 2).any())


def _check_pointer(indptr: np.ndarray, nnz: int, *, full: bool = False) -> None:
    if indptr.size == 0:
        raise ValueError("empty")
    if (np.diff(indptr) < 0).any():
        raise ValueError("values decrease")
    if indptr[0] < 0 or indptr[-1] > nnz or (full and (indptr[0] != 0 or indptr[-1] != nnz)):
        raise ValueError(f"runs from {int(indptr[0])} to {int(indptr[-1])}, outside 0..{nnz}")


def _chunk_names(arr, fmt: str, lo: int, hi: int) -> str:
    """`` (data chunks 'c/3'-'c/4')``: the stored chunks that hold entries ``lo:hi``."""
    try:
        size = _chunk_length(arr, fmt)
        first, last = lo // size, max(lo, hi - 1) // size
        name = arr.path.rsplit("/", 1)[-1] if fmt == "zarr" else arr.name.rsplit("/", 1)[-1]
        if fmt == "zarr":
            rest = (0,) * (len(arr.shape) - 1)
            a, b = (repr(arr.metadata.encode_chunk_key((i, *rest))) for i in (first, last))
        else:
            a, b = str(first), str(last)
        return f" ({name} chunk{'' if first == last else 's'} {a}{'' if first == last else '-' + b})"
    except Exception:  # naming is a courtesy; never hide the real error behind it
        return ""


def _chunk_length(arr, fmt: str) -> int:
    """Length along the first axis of one stored chunk (a shard, for sharded zarr)."""
    size = (arr.shards or arr.chunks)[0] if fmt == "zarr" else (arr.chunks or arr.shape)[0]
    return max(int(size), 1)


def _missing_zarr_chunks(arr, root: Path) -> list[tuple[str, int | None, int | None]]:
    """Stored chunks (shards) of a zarr array that are not on disk: ``(key, first entry, stop)``."""
    if arr.size == 0:
        return []
    size = arr.shards or arr.chunks
    grid = [math.ceil(s / c) for s, c in zip(arr.shape, size, strict=True)]
    base = Path(root) / arr.path
    present = {p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()}
    missing = []
    for coords in itertools.product(*map(range, grid)):
        key = arr.metadata.encode_chunk_key(coords)
        if key not in present:
            lo = coords[0] * size[0]
            missing.append((f"{arr.path}/{key}", lo, min(lo + size[0], arr.shape[0])))
    if (
        not missing
        and arr.shards
        and arr.nchunks_initialized < math.prod(math.ceil(s / c) for s, c in zip(arr.shape, arr.chunks, strict=True))
    ):
        missing.append((f"chunk(s) inside the shards of {arr.path}", None, None))
    return missing


def _missing_h5_chunks(ds) -> list[tuple[str, int | None, int | None]]:
    """Chunks of a chunked HDF5 dataset that were never written: ``(name, first entry, stop)``."""
    if ds.chunks is None or ds.size == 0:
        return []
    grid = [math.ceil(s / c) for s, c in zip(ds.shape, ds.chunks, strict=True)]
    stored = ds.id.get_num_chunks()
    if stored >= math.prod(grid):
        return []
    have = {tuple(ds.id.get_chunk_info(i).chunk_offset) for i in range(stored)}
    offsets = itertools.product(*(range(0, s, c) for s, c in zip(ds.shape, ds.chunks, strict=True)))
    return [
        (f"{ds.name} at offset {o[0] if len(o) == 1 else o}", o[0], min(o[0] + ds.chunks[0], ds.shape[0]))
        for o in offsets
        if o not in have
    ]


# --------------------------------------------------------------------------- absent chunks of obs labels


def absent_label_chunks(obs, root: Path) -> dict[str, dict]:
    """Label columns of a zarr store's ``obs`` whose stored chunks are absent: ``{column: record}``.

    zarr leaves out a chunk whose values all equal the array's fill value
    (0 for categorical codes: the first category; ``""`` for strings), so
    an absent chunk is either such a chunk or one lost in an incomplete
    copy; nothing in the store tells which. The record (``chunks``: their
    keys, ``cells``: how many cells they hold, ``reads_as``: the label those
    cells get) lets the label checks say so.
    """
    found = {}
    for column in obs.attrs.get("column-order", []):
        try:
            elem = obs[column]
            kind = elem.attrs.get("encoding-type")
            if kind == "categorical":
                arr = elem["codes"]
                fill = int(arr.metadata.fill_value or 0)
                categories = elem["categories"][:]
                reads_as = str(categories[fill]) if 0 <= fill < len(categories) else "a missing label"
            elif kind == "string-array":
                arr, reads_as = elem, ""
            else:
                continue
            missing = [m for m in _missing_zarr_chunks(arr, root) if m[1] is not None]
        except Exception:  # a column anndata cannot describe is read (and refused) elsewhere
            continue
        if missing:
            found[str(column)] = {
                "store": str(root),
                "chunks": [m[0] for m in missing],
                "cells": int(sum(m[2] - m[1] for m in missing)),
                "reads_as": reads_as,
            }
    return found


def read_block(stored: StoredMatrix, block_info=None):
    """Dask task: the block at ``block_info``'s location, read along the major axis."""
    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    if stored.major_axis == 1:
        return stored.read_major(c0, c1)
    block = stored.read_major(r0, r1)
    return sp.csr_matrix(block) if stored.encoding == "array" else block

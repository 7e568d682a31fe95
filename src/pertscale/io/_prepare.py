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

The store records the input's fingerprint (resolved path, size,
modification time, the matrix read, the labels and the settings). It is
reused while the fingerprint matches, resumed block by block after an
interruption, and rebuilt when the input changed. ``obs`` holds the sorted
cells and ``obs['input_row']`` their row in the input, so per-cell outputs
map back to the input's order.
"""

from __future__ import annotations

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

from .._validation import check_control, label_list, perturbation_labels
from ._blocks import DamagedStoreError

logger = logging.getLogger(__name__)

#: Bumped when the layout changes: a store of another version is rebuilt.
FORMAT_VERSION = 1
#: Entries per stored chunk of a block's arrays.
CHUNK_ENTRIES = 4 * 2**20
#: The file that makes a directory a working store: fingerprint, block bounds, completeness.
MARKER = "pertscale_working_store.json"


# --------------------------------------------------------------------------- fingerprint and plan


def fingerprint(path: Path, **settings) -> dict:
    """What identifies the input of a working store: resolved path, size, modification time, settings.

    For a ``.zarr`` directory, size and time are the sum and the latest over
    its files (a changed chunk changes both).
    """
    path = Path(path).resolve()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        mtime = max((p.stat().st_mtime_ns for p in files), default=0)
    else:
        st = path.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    return {"input": str(path), "size": int(size), "mtime_ns": int(mtime), "version": FORMAT_VERSION, **settings}


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
    from ..tl._engine import pack_groups

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
    r0 = int(rows_in[0]) if rows_in.size else 0
    block = sp.csr_matrix(block)
    kept = np.flatnonzero(pos >= 0)
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
    tmp = folder / f".{r0}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        for raw in buffers:
            f.write(raw)
    np.save(folder / f"{r0}.idx.npy", np.array(index, dtype=SPILL_INDEX))
    os.replace(tmp, folder / f"{r0}.bin")  # the data file last: its presence marks the piece complete
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


def _gather(k: int, bounds: np.ndarray, n_vars: int, dtype: str, spill: str, store: str) -> int:
    """Gather task: assemble output block ``k`` from its spill pieces and write it, atomically."""
    import zarr

    final = Path(store) / "blocks" / str(k)
    if (final / "zarr.json").exists():
        return 0  # written by an earlier, interrupted run
    lo, hi = int(bounds[k]), int(bounds[k + 1])
    pieces = _read_pieces(Path(spill), k)
    positions = np.concatenate([p["position"] for p in pieces]) if pieces else np.empty(0, np.int64)
    if positions.size != hi - lo or not np.array_equal(np.sort(positions), np.arange(lo, hi)):
        raise DamagedStoreError(
            f"working store {store!r}: block {k} is missing rows from its spill files (found {positions.size} "
            f"of {hi - lo}); delete the working store and run again"
        )
    parts = [
        sp.csr_matrix((p["data"], p["indices"].astype(np.int32), p["indptr"]), shape=(p["indptr"].size - 1, n_vars))
        for p in pieces
    ]
    block = sp.vstack(parts, format="csr")[np.argsort(positions, kind="stable")]
    tmp = final.parent / f".{k}.tmp-{uuid.uuid4().hex[:8]}"
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    arrays = {"indptr": block.indptr.astype(np.int64), "indices": _small(block.indices), "data": _small(block.data)}
    for name, a in arrays.items():
        group.create_array(
            name,
            data=a,
            chunks=(max(1, min(a.shape[0], CHUNK_ENTRIES)),),
            compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"),
        )
    group.attrs.update(
        {
            "n_rows": hi - lo,
            "dtype": dtype,
            "crc32": {name: zlib.crc32(np.ascontiguousarray(a).view(np.uint8)) for name, a in arrays.items()},
            "sizes": _file_sizes(tmp),
        }
    )
    os.replace(tmp, final)
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
            arrays = {name: g[name][:] for name in ("indptr", "indices", "data")}
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
                f"block {k} of the working store {self.path!r} is damaged ({type(err).__name__}: {err}); it was "
                "set aside and is written again when the run is started again"
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
    obs = ad.io.read_elem(group["obs"])
    var = ad.io.read_elem(group["var"])
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
    return adata


def prepare(
    path: str | Path,
    perturbation_column: str,
    control_label: str,
    *,
    out: str | Path | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    exclude_labels=(),
    chunk_size: int | None = None,
    scheduler=None,
    progress: bool | None = None,
) -> ad.AnnData:
    """Write (or reuse) a perturbation-sorted working store of a screen, and open it lazily.

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
    scheduler, progress
        Where to compute and whether to show progress bars.

    Returns
    -------
    anndata.AnnData
        The kept cells, sorted: control first, then each perturbation in
        label order; ``X`` a Dask array whose blocks each hold whole groups;
        ``obs['input_row']`` each cell's row in the input.

    Raises
    ------
    ValueError
        For a bad input, column or control label (as :func:`pertscale.read`
        and the analyses).
    pertscale.io.DamagedStoreError
        If an existing store cannot be used.

    Notes
    -----
    One read of the input and, for the spill, one write and one read of the
    kept data, compressed; the working store takes about as much disk as a
    compressed copy of the kept counts.
    """
    from ..cluster import compute
    from ._read import read

    path = Path(path)
    adata = read(path, layer=layer, use_raw=use_raw, chunk_size=chunk_size)
    check_control(perturbation_labels(adata.obs, perturbation_column), control_label, perturbation_column)
    labels = adata.obs[perturbation_column]
    exclude = label_list(exclude_labels, "exclude_labels")
    store = Path(out) if out is not None else path.with_name(path.name + ".pertscale-sorted.zarr")
    store = store.absolute()  # the workers write it: their working directory may not be this process's
    fp = fingerprint(
        path,
        matrix=layer or ("raw" if use_raw else "X"),
        perturbation_column=perturbation_column,
        control_label=str(control_label),
        exclude_labels=sorted(exclude),
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
    info = {"fingerprint": fp, "bounds": plan.bounds.tolist(), "dtype": dtype, "complete": False}
    (store / "blocks").mkdir(parents=True, exist_ok=True)
    (store / MARKER).write_text(json.dumps(info))
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
        compute(*gathered, scheduler=scheduler, progress=progress, desc="sorting by perturbation")
    shutil.rmtree(spill, ignore_errors=True)
    for old in (store / "blocks").glob(".*.damaged-*"):
        shutil.rmtree(old, ignore_errors=True)
    _write_annotations(store, adata, plan)
    info["complete"] = True
    (store / MARKER).write_text(json.dumps(info))
    return open_prepared(store)


def _gather_after(barrier, *args):
    return _gather(*args)


def _write_annotations(store: Path, adata: ad.AnnData, plan: SortPlan) -> None:
    import zarr

    group = zarr.open_group(str(store), mode="a")
    obs = adata.obs.iloc[plan.order].copy()
    obs["input_row"] = plan.order
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        for key in ("obs", "var"):
            if key in group:
                del group[key]
        ad.io.write_elem(group, "obs", obs)
        ad.io.write_elem(group, "var", adata.var)


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

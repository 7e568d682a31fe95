"""Simulated CRISPR screens with known effects: a start without real data, tests and benchmarks.

:func:`simulate_screen` draws a Perturb-seq screen whose true effects are
known and stored with it, so that a result can be checked against the truth:
``uns['simulation']['log2_effects']`` holds the true log2 fold change of
every perturbation (rows, in the order of ``uns['simulation']['perturbations']``)
on every gene (columns, in the order of ``var_names``); each perturbation's
target gene is in ``uns['simulation']['targets']`` and, per cell, in
``obs['target_gene']``. :func:`known_effects` lists the non-zero ones as a
table, one row per perturbation and changed gene, the form of the main job's
``de_<method>_significant.csv``. ``pertscale simulate OUT.h5ad --cells ...
--genes ... --perturbations ...`` writes such a screen from the command line.

The counts are negative binomial: cell ``i``, gene ``g`` has mean
``mu = library_i * share_g * fold(perturbation_i, g)`` and dispersion
``alpha_g = 0.05 + 0.5 / sqrt(share_g * median_umi)``, drawn as
``NB(r = 1 / alpha_g, p = r / (r + mu))``.

Cells are drawn in fixed runs of :data:`STREAM_CELLS` cells, each run from
its own random stream (``SeedSequence(seed, spawn_key=(run,))``; the design,
library sizes and cell order come from ``default_rng(seed)``). A screen
therefore depends only on its arguments and the seed, never on
``block_size``, ``n_jobs`` or whether it is kept in memory or streamed to
disk. Memory is bounded by one block of cells: the float temporaries are
``STREAM_CELLS x n_genes``, the counts of a block are held as CSR.
"""

from __future__ import annotations

import logging
import signal
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:  # anndata, pandas, h5py and zarr are imported on use: worker processes need numpy only
    import anndata as ad
    import pandas as pd

logger = logging.getLogger(__name__)

#: Cells drawn from one random stream; blocks are whole runs of these.
STREAM_CELLS = 250
#: Elements per stored chunk of ``X/data``, ``X/indices`` and ``X/indptr`` (4 MB of int32).
CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class _Design:
    """What simulating a block of cells needs (sent once to each worker process).

    Attributes
    ----------
    share
        ``(n_genes,)`` float64: expected fraction of a cell's UMIs per gene.
    r
        ``(n_genes,)`` float64: negative-binomial size, ``1 / dispersion``.
    effect_genes
        ``(n_perturbations, k)`` int64: the genes each perturbation changes
        (``k = min(n_affected, n_genes - 1) + 1``, the target last).
    effect_fold
        ``(n_perturbations, k)`` float64: their fold changes,
        ``2 ** log2_effects`` (from the float32 log2 values).
    entropy
        Entropy of the root ``numpy.random.SeedSequence``.
    """

    share: np.ndarray
    r: np.ndarray
    effect_genes: np.ndarray
    effect_fold: np.ndarray
    entropy: int


def _gene_model(rng: np.random.Generator, n_genes: int, median_umi: float):
    """Gene shares (the first draws of ``rng``), expected counts at the median library, dispersions."""
    share = rng.lognormal(mean=0.0, sigma=1.6, size=n_genes)
    share /= share.sum()
    base_mean = share * median_umi
    dispersion = 0.05 + 0.5 / np.sqrt(np.maximum(base_mean, 1e-3))
    return share, base_mean, dispersion


def _simulate_block(design: _Design, first: int, codes: np.ndarray, library: np.ndarray) -> list[sp.csr_matrix]:
    """Counts of cells ``first:first + len(codes)``, one CSR piece per random stream.

    Parameters
    ----------
    design
        Gene parameters and perturbation effects.
    first
        Index of the first cell; a multiple of :data:`STREAM_CELLS`.
    codes
        ``(n,)`` int: perturbation of each cell, ``-1`` for control.
    library
        ``(n,)`` float64: library size of each cell.

    Returns
    -------
    list of scipy.sparse.csr_matrix
        ``ceil(n / STREAM_CELLS)`` int32 matrices of ``STREAM_CELLS`` rows
        (the last may have fewer) by ``n_genes``, in cell order, no
        explicit zeros, sorted indices.
    """
    n_genes = design.share.size
    pieces = []
    for lo in range(0, codes.size, STREAM_CELLS):
        run = (first + lo) // STREAM_CELLS
        rng = np.random.default_rng(np.random.SeedSequence(design.entropy, spawn_key=(run,)))
        c = codes[lo : lo + STREAM_CELLS]
        mu = np.multiply.outer(library[lo : lo + STREAM_CELLS], design.share)  # float64, STREAM_CELLS x n_genes
        perturbed = np.flatnonzero(c >= 0)
        if perturbed.size:
            mu[perturbed[:, None], design.effect_genes[c[perturbed]]] *= design.effect_fold[c[perturbed]]
        mu += design.r
        p = np.divide(design.r, mu, out=mu)  # in place: r / (r + mu)
        flat = rng.negative_binomial(design.r, p).ravel()
        del mu, p
        nz = np.flatnonzero(flat)
        indptr = np.searchsorted(nz, np.arange(c.size + 1) * n_genes)
        pieces.append(
            sp.csr_matrix((flat[nz].astype(np.int32), (nz % n_genes).astype(np.int32), indptr), shape=(c.size, n_genes))
        )
    return pieces


_WORKER_DESIGN: _Design | None = None


def _init_worker(design: _Design) -> None:
    """Keep the design in a worker process; Ctrl-C is the parent's to handle."""
    global _WORKER_DESIGN
    _WORKER_DESIGN = design
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_block(first: int, codes: np.ndarray, library: np.ndarray) -> list[sp.csr_matrix]:
    return _simulate_block(_WORKER_DESIGN, first, codes, library)


def _blocks(design: _Design, codes: np.ndarray, library: np.ndarray, block_size: int, n_jobs: int):
    """Yield each block's CSR pieces in cell order, simulated here or in ``n_jobs`` spawned processes.

    At most ``n_jobs + 1`` blocks are submitted at a time, so besides the
    block being consumed the parent holds at most that many finished ones.
    """
    starts = range(0, codes.size, block_size)
    if n_jobs == 1 or len(starts) == 1:
        for s in starts:
            yield _simulate_block(design, s, codes[s : s + block_size], library[s : s + block_size])
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(
        min(n_jobs, len(starts)),
        mp_context=multiprocessing.get_context("spawn"),  # fork is unsafe in a process with threads
        initializer=_init_worker,
        initargs=(design,),
    )
    todo = iter(starts)
    pending: deque = deque()

    def submit() -> None:
        s = next(todo, None)
        if s is not None:
            pending.append(pool.submit(_worker_block, s, codes[s : s + block_size], library[s : s + block_size]))

    try:
        for _ in range(n_jobs + 1):
            submit()
        while pending:
            pieces = pending.popleft().result()
            submit()
            yield pieces
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Growing:
    """A growing 1-D stored array (h5py resizable dataset or zarr array), written in whole chunks.

    Appended values are buffered up to the next chunk boundary, so every
    stored chunk is written exactly once (the last one, possibly partial,
    by :meth:`close`).
    """

    def __init__(self, arr, chunk: int):
        self.arr, self.chunk, self.size = arr, chunk, 0
        self.tail: list[np.ndarray] = []
        self.tail_size = 0

    def append(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=self.arr.dtype)
        if self.tail_size:
            head = values[: self.chunk - self.tail_size]
            self.tail.append(head)
            self.tail_size += head.size
            values = values[head.size :]
            if self.tail_size < self.chunk:
                return
            self._write(np.concatenate(self.tail))
            self.tail, self.tail_size = [], 0
        whole = values.size - values.size % self.chunk
        if whole:
            self._write(values[:whole])
        if whole < values.size:
            self.tail, self.tail_size = [values[whole:].copy()], values.size - whole

    def close(self) -> None:
        if self.tail_size:
            self._write(np.concatenate(self.tail))
            self.tail, self.tail_size = [], 0

    def _write(self, values: np.ndarray) -> None:
        stop = self.size + values.size
        self.arr.resize((stop,))
        self.arr[self.size : stop] = values
        self.size = stop


class _CsrWriter:
    """Appends CSR row blocks to ``group['X']``: data int32, indices int32, indptr int64."""

    def __init__(self, group, shape: tuple[int, int], *, fmt: str, compression: str | None = None):
        x = group.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": list(shape)})
        self.shape, self.rows, self.nnz = shape, 0, 0
        self.arrays = {}
        # HDF5 allocates whole chunks: no chunk larger than the array can get, for small screens
        most = {"data": shape[0] * shape[1], "indices": shape[0] * shape[1], "indptr": shape[0] + 1}
        for name, dtype in (("data", np.int32), ("indices", np.int32), ("indptr", np.int64)):
            chunk = int(min(CHUNK_ELEMENTS, max(most[name], 1)))
            if fmt == "zarr":
                arr = x.create_array(name, shape=(0,), chunks=(chunk,), dtype=dtype)
            else:
                arr = x.create_dataset(
                    name, shape=(0,), maxshape=(None,), chunks=(chunk,), dtype=dtype, compression=compression
                )
            self.arrays[name] = _Growing(arr, chunk)
        self.arrays["indptr"].append(np.zeros(1, dtype=np.int64))

    def append(self, block: sp.csr_matrix) -> None:
        self.arrays["data"].append(block.data)
        self.arrays["indices"].append(block.indices)
        self.arrays["indptr"].append(block.indptr[1:].astype(np.int64) + self.nnz)
        self.rows += block.shape[0]
        self.nnz += block.nnz

    def close(self) -> None:
        for arr in self.arrays.values():
            arr.close()
        if self.rows != self.shape[0]:  # pragma: no cover - a bug, not a user error
            raise RuntimeError(f"wrote {self.rows:,} rows of X, expected {self.shape[0]:,}")


def _check_block_size(block_size) -> int:
    from ._validation import check_number

    block_size = check_number(block_size, "block_size", integer=True, minimum=1)
    return -(-block_size // STREAM_CELLS) * STREAM_CELLS


def _write_streamed(
    path: Path, adata: ad.AnnData, blocks, n_cells: int, *, fmt: str, name: str, compression: str | None = None
) -> None:
    """Write ``adata`` (``X`` left out) and the streamed ``blocks`` to a new ``fmt`` store at ``path``."""
    import anndata as ad

    from ._settings import settings

    if fmt == "zarr":
        import zarr

        root = zarr.open_group(str(path), mode="w", zarr_format=3)
    else:
        import h5py

        root = h5py.File(path, "w")
    from ._progress import progress_bar_class

    try:
        with (
            ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False),
            warnings.catch_warnings(),
            progress_bar_class()(
                total=n_cells, desc=f"simulating {name}", unit="cell", disable=not settings.progress
            ) as bar,
        ):
            # zarr v3 has no spec yet for variable-length strings (uns holds labels) nor consolidated metadata
            warnings.filterwarnings("ignore", message="The data type", category=Warning)
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
            # everything but X first: a label the format cannot store fails before the long part
            for key in ("obs", "var"):
                ad.io.write_elem(root, key, getattr(adata, key))
            for key in ("obsm", "varm", "obsp", "varp", "layers"):
                ad.io.write_elem(root, key, {})
            ad.io.write_elem(root, "uns", dict(adata.uns))
            x = _CsrWriter(root, (n_cells, adata.n_vars), fmt=fmt, compression=compression)
            for pieces in blocks:
                for piece in pieces:
                    x.append(piece)
                bar.update(sum(p.shape[0] for p in pieces))
            x.close()
            if fmt == "zarr":
                zarr.consolidate_metadata(str(path))
    finally:
        if fmt == "h5ad":
            root.close()


def simulate_screen(
    n_cells: int = 10_000,
    n_genes: int = 2_000,
    n_perturbations: int = 50,
    *,
    control_fraction: float = 0.1,
    seed: int = 0,
    control_label: str = "control",
    perturbation_column: str = "perturbation",
    median_umi: float = 2_000.0,
    library_sd: float = 0.4,
    knockdown: tuple[float, float] = (0.1, 0.5),
    n_affected: int = 10,
    effect_sd: float = 0.8,
    n_mito: int | None = None,
    sort: bool = False,
    path: str | Path | None = None,
    block_size: int = 5_000,
    n_jobs: int = 1,
    compression: str | None = None,
) -> ad.AnnData | Path:
    """Simulate a Perturb-seq screen of negative-binomial UMI counts.

    Per gene a base expression share (log-normal, so a few genes dominate and
    most are sparse, as in 10x data) and a dispersion that falls with the
    mean (``alpha = 0.05 + 0.5 / sqrt(mu)``, a DESeq2-like trend). Per cell a
    log-normal library size around ``median_umi``. Each perturbation knocks
    down its target gene to a fraction in ``knockdown`` of its expression and
    shifts ``n_affected`` other genes by log2 fold changes drawn from
    ``N(0, effect_sd)``.

    With ``path``, the counts are streamed to disk block by block and never
    held whole: memory is a few blocks of CSR counts per process (up to
    ``n_jobs + 2`` in the parent, 2 in each worker), whatever ``n_cells``;
    the rest that grows is ``obs`` and ``log2_effects``. The screen is the
    same with or without ``path`` and for every ``block_size`` and
    ``n_jobs``. At 8,248 genes and 38 % non-zero, one process simulates
    about 10,000 cells a minute (~0.1 us per matrix entry).

    Parameters
    ----------
    n_cells, n_genes, n_perturbations
        Size of the screen; perturbations target distinct genes while there
        are enough non-mitochondrial genes, and share targets beyond that.
    control_fraction
        Fraction of cells carrying the control label; the rest are spread
        evenly (multinomially) over the perturbations.
    seed
        Seed of the random streams; same seed, same screen.
    control_label, perturbation_column
        Label and ``obs`` column of the assignments.
    median_umi, library_sd
        Median and log-scale spread of the cell library sizes. The density
        (fraction of non-zero counts) rises with ``median_umi``; see
        :func:`median_umi_for_density`.
    knockdown
        Range of the remaining fraction of the target's expression.
    n_affected, effect_sd
        Downstream genes per perturbation and the spread of their log2
        fold changes.
    n_mito
        Genes named ``MT-...`` (for QC); default ``min(13, n_genes // 50)``.
    sort
        Store cells sorted by perturbation (control first) instead of in
        random order.
    path
        If given, write the screen there (``.h5ad``, or a zarr v3 store when
        the path ends in ``.zarr``) and return the path. The store is
        written to a temporary sibling and renamed into place, so an
        interrupted run leaves no partial store at ``path``.
    block_size
        Cells simulated (and, with ``n_jobs > 1``, sent between processes)
        at a time; rounded up to a multiple of :data:`STREAM_CELLS`. A block
        takes about ``8 * density * n_genes`` bytes per cell: ~125 MB for
        the default at 8,248 genes and 38 % non-zero.
    n_jobs
        Processes simulating blocks; with more than 1, blocks are simulated
        in worker processes (started with ``spawn``: a script must call this
        under ``if __name__ == "__main__":``) and collected or written in
        order by this one.
    compression
        HDF5 filter of the matrix in an ``.h5ad`` (``"lzf"``, ``"gzip"``);
        default none, as ``anndata.AnnData.write_h5ad``. zarr stores use
        zarr's default compressor.

    Returns
    -------
    anndata.AnnData or pathlib.Path
        ``X``: CSR int32 counts, ``n_cells x n_genes`` (stored with int32
        ``indices`` and int64 ``indptr``). ``obs``: the perturbation column
        (categorical, control first) and ``target_gene`` (categorical,
        ``""`` for control cells). ``var``: ``base_mean`` (expected counts
        at the median library size), ``dispersion``. ``uns['simulation']``,
        the truth to check results against: ``log2_effects``
        (``n_perturbations x n_genes`` float32, the true log2 fold change of
        each perturbation's mean on each gene, in the order of
        ``perturbations`` and ``var_names``; zero for the genes it leaves
        unchanged, negative for its target), ``targets`` and
        ``perturbations`` (``(n_perturbations,)`` names), and the settings:
        ``seed``, ``control_label``, ``perturbation_column``, ``n_cells``,
        ``n_genes``, ``n_perturbations``, ``n_control`` (control cells),
        ``control_fraction``, ``median_umi``, ``library_sd``, ``knockdown``,
        ``n_affected`` (as simulated: at most ``n_genes - 1``),
        ``effect_sd``, ``n_mito``, ``sort``. :func:`known_effects` lists the
        non-zero effects as a table. With ``path``, the path written.

    Raises
    ------
    TypeError
        If a size is not a number.
    ValueError
        If the sizes do not allow the design (fewer than 1 cell, gene or
        perturbation; no cell left for the perturbations after the control
        cells; only mitochondrial genes), ``control_fraction`` is not
        between 0 and 1, or ``block_size`` or ``n_jobs`` is not a positive
        integer.
    FileNotFoundError
        If the directory of ``path`` does not exist.

    See Also
    --------
    known_effects : the true effects as a table.

    Examples
    --------
    >>> import pertscale as ps
    >>> adata = ps.datasets.simulate_screen(2_000, 200, 5, seed=1)
    >>> adata.shape
    (2000, 200)
    >>> truth = ps.datasets.known_effects(adata)
    >>> bool(truth.loc[truth["is_target"], "log2_effect"].lt(0).all())  # every target knocked down
    True
    """
    import anndata as ad
    import pandas as pd

    from ._validation import check_number

    n_cells = check_number(n_cells, "n_cells", integer=True, minimum=1)
    n_genes = check_number(n_genes, "n_genes", integer=True, minimum=1)
    n_mito = min(13, n_genes // 50) if n_mito is None else n_mito
    if n_perturbations < 1 or n_genes - n_mito < 1:
        raise ValueError("n_perturbations must be at least 1, and some genes must not be mitochondrial (targets)")
    n_perturbations = check_number(n_perturbations, "n_perturbations", integer=True, minimum=1)
    if not 0 < control_fraction < 1:
        raise ValueError("control_fraction must be between 0 and 1")
    n_control = max(2, int(round(n_cells * control_fraction)))
    if n_control >= n_cells:
        raise ValueError(
            f"n_cells = {n_cells:,} leaves no cell for the perturbations after {n_control:,} control cells "
            f"(control_fraction {control_fraction}, and at least 2); simulate more cells"
        )
    block_size = _check_block_size(block_size)
    n_jobs = check_number(n_jobs, "n_jobs", integer=True, minimum=1)
    if path is not None:
        from .io._read import OPENED_INPUTS
        from .io._write import check_not_input

        path = Path(path)
        check_not_input(path, OPENED_INPUTS, what="cannot write")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise FileNotFoundError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist")

    root_seed = np.random.SeedSequence(seed)
    rng = np.random.default_rng(root_seed)
    genes = [f"MT-G{i:02d}" for i in range(n_mito)] + [f"GENE{i:05d}" for i in range(n_genes - n_mito)]
    share, base_mean, dispersion = _gene_model(rng, n_genes, median_umi)

    perts = [f"P{i:04d}" for i in range(n_perturbations)]
    # targets: well-expressed genes, so knock-downs are detectable
    order = np.argsort(-base_mean[n_mito:]) + n_mito
    pool = order[: max(n_perturbations, len(order) // 2)]
    # distinct targets while there are enough genes; beyond that, genes targeted by several perturbations
    targets = rng.choice(pool, size=n_perturbations, replace=n_perturbations > pool.size)
    k = min(n_affected, n_genes - 1)
    effect_genes = np.empty((n_perturbations, k + 1), dtype=np.int64)
    effect_log2 = np.empty((n_perturbations, k + 1), dtype=np.float32)
    for p in range(n_perturbations):
        effect_genes[p, :k] = rng.choice(np.delete(np.arange(n_genes), targets[p]), size=k, replace=False)
        effect_log2[p, :k] = rng.normal(0.0, effect_sd, size=k)
        effect_genes[p, k] = targets[p]
        effect_log2[p, k] = np.log2(rng.uniform(*knockdown))
    log2_effects = np.zeros((n_perturbations, n_genes), dtype=np.float32)
    np.put_along_axis(log2_effects, effect_genes, effect_log2, axis=1)

    per_pert = rng.multinomial(n_cells - n_control, np.full(n_perturbations, 1.0 / n_perturbations))
    codes = np.concatenate([np.full(n_control, -1), np.repeat(np.arange(n_perturbations), per_pert)])
    if not sort:
        codes = rng.permutation(codes)
    library = median_umi * rng.lognormal(0.0, library_sd, size=n_cells)

    design = _Design(
        share=share,
        r=1.0 / dispersion,
        effect_genes=effect_genes,
        effect_fold=np.exp2(effect_log2).astype(np.float64),
        entropy=root_seed.entropy,
    )
    target_names = np.asarray([genes[t] for t in targets], dtype=object)
    names, target_codes = np.unique(np.r_[[""], target_names], return_inverse=True)  # targets may repeat
    obs = pd.DataFrame(
        {
            perturbation_column: pd.Categorical.from_codes(codes + 1, categories=[control_label, *perts]),
            "target_gene": pd.Categorical.from_codes(target_codes[codes + 1], categories=names),
        },
        index=pd.Index([f"cell{i:07d}" for i in range(n_cells)]),
    )
    var = pd.DataFrame({"base_mean": base_mean, "dispersion": dispersion}, index=pd.Index(genes))
    adata = ad.AnnData(obs=obs, var=var)
    adata.uns["simulation"] = {
        "log2_effects": log2_effects,
        "targets": np.asarray(target_names, dtype=object),
        "perturbations": np.asarray(perts, dtype=object),
        "seed": int(seed),
        "control_label": control_label,
        "perturbation_column": perturbation_column,
        # the other settings, to describe and reproduce the screen (with the seed, they fix it)
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_perturbations": n_perturbations,
        "n_control": n_control,
        "control_fraction": float(control_fraction),
        "median_umi": float(median_umi),
        "library_sd": float(library_sd),
        "knockdown": np.asarray(knockdown, dtype=np.float64),
        "n_affected": int(k),
        "effect_sd": float(effect_sd),
        "n_mito": int(n_mito),
        "sort": bool(sort),
    }
    blocks = _blocks(design, codes, library, block_size, n_jobs)
    if path is None:
        pieces = [piece for block in blocks for piece in block]
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        np.cumsum(np.concatenate([np.diff(p.indptr) for p in pieces]), out=indptr[1:])
        data = np.concatenate([p.data for p in pieces])
        indices = np.concatenate([p.indices for p in pieces])
        del pieces
        adata.X = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))
        return adata

    logger.info(
        "simulating %s cells x %s genes into %s: %d blocks of %s cells, %d process(es)",
        f"{n_cells:,}",
        f"{n_genes:,}",
        path,
        -(-n_cells // block_size),
        f"{block_size:,}",
        n_jobs,
    )
    from .io._atomic import replacing

    try:
        with replacing(path) as tmp:
            fmt = "zarr" if path.suffix == ".zarr" else "h5ad"
            _write_streamed(tmp, adata, blocks, n_cells, fmt=fmt, name=path.name, compression=compression)
    finally:
        blocks.close()
    return path


def known_effects(screen: ad.AnnData | str | Path) -> pd.DataFrame:
    """The true effects of a screen of :func:`simulate_screen`: one row per perturbation and gene it changes.

    Read from ``uns['simulation']['log2_effects']`` (non-zero entries) and
    ``uns['simulation']['targets']``; from a path, only ``uns['simulation']``
    and ``var``'s index are read, never the matrix. Compare it with a
    result, for example the main job's ``de_<method>_significant.csv``
    merged on ``perturbation`` and ``gene``.

    Parameters
    ----------
    screen
        A simulated screen: an AnnData, or the path of an ``.h5ad`` file or
        ``.zarr`` store that :func:`simulate_screen` (or
        ``pertscale simulate``) wrote.

    Returns
    -------
    pandas.DataFrame
        Columns ``perturbation``, ``gene``, ``log2_effect`` (the true log2
        fold change of the gene's mean in the perturbation's cells over
        control, float) and ``is_target`` (the gene is the perturbation's
        target: the knock-down, negative). Each perturbation's rows are
        together, in the order of ``uns['simulation']['perturbations']``,
        its target first, then by decreasing ``|log2_effect|``;
        ``n_perturbations x (min(n_affected, n_genes - 1) + 1)`` rows.

    Raises
    ------
    KeyError
        If the screen holds no ``uns['simulation']`` (it was not simulated,
        or that entry was removed).
    ValueError
        If ``log2_effects`` does not match the screen's genes (genes were
        removed or reordered since it was simulated).
    FileNotFoundError
        If ``screen`` is a path that does not exist.
    """
    import pandas as pd

    if isinstance(screen, (str, Path)):
        sim, genes = _read_truth(Path(screen))
    else:
        if "simulation" not in screen.uns:
            raise KeyError(
                "this AnnData holds no uns['simulation']: known effects are recorded only in screens of "
                "ps.datasets.simulate_screen (or pertscale simulate)"
            )
        sim, genes = screen.uns["simulation"], screen.var_names
    effects = np.asarray(sim["log2_effects"])
    perts = [str(p) for p in sim["perturbations"]]
    targets = [str(t) for t in sim["targets"]]
    if effects.shape != (len(perts), len(genes)):
        raise ValueError(
            f"uns['simulation']['log2_effects'] is {effects.shape[0]:,} x {effects.shape[1]:,} but the screen has "
            f"{len(perts):,} perturbations and {len(genes):,} genes: its genes changed since it was simulated; "
            "use the screen as simulate_screen wrote it"
        )
    genes = np.asarray(genes, dtype=object)
    rows, cols = np.nonzero(effects)
    values = effects[rows, cols].astype(np.float64)
    is_target = genes[cols] == np.asarray(targets, dtype=object)[rows]
    order = np.lexsort((-np.abs(values), ~is_target, rows))  # by perturbation, target first, then |effect|
    rows, cols, values, is_target = rows[order], cols[order], values[order], is_target[order]
    return pd.DataFrame(
        {
            "perturbation": np.asarray(perts, dtype=object)[rows],
            "gene": genes[cols].astype(str),
            "log2_effect": values,
            "is_target": is_target.astype(bool),
        }
    )


def _read_truth(path: Path):
    """``uns['simulation']`` and the gene names of a stored screen, without reading its matrix."""
    import anndata as ad

    if not path.exists():
        raise FileNotFoundError(f"no screen at {str(path)!r}")
    if path.is_dir():
        import zarr

        root = zarr.open_group(str(path), mode="r")
        close = lambda: None  # noqa: E731
    else:
        import h5py

        root = h5py.File(path, "r")
        close = root.close
    try:
        if "uns" not in root or "simulation" not in root["uns"]:
            raise KeyError(
                f"{str(path)!r} holds no uns['simulation']: known effects are recorded only in screens of "
                "ps.datasets.simulate_screen (or pertscale simulate)"
            )
        sim = ad.io.read_elem(root["uns"]["simulation"])
        var = root["var"]
        index_key = var.attrs["_index"]
        genes = ad.io.read_elem(var[index_key])
    finally:
        close()
    return sim, genes


def expected_density(
    n_genes: int = 2_000,
    *,
    median_umi: float = 2_000.0,
    library_sd: float = 0.4,
    seed: int = 0,
) -> float:
    """Expected fraction of non-zero counts of :func:`simulate_screen` with these arguments.

    The probability that a count is non-zero, ``1 - (r / (r + mu))^r``,
    averaged over the screen's genes (the same gene shares, from ``seed``)
    and over the log-normal library sizes (64-point Gauss-Hermite
    quadrature). Perturbation effects are left out: they change
    ``n_affected + 1`` genes per cell, a negligible part of the matrix.

    Parameters
    ----------
    n_genes, median_umi, library_sd, seed
        As in :func:`simulate_screen`.

    Returns
    -------
    float
        Expected density, in ``(0, 1)``.
    """
    share, base_mean, dispersion = _gene_model(np.random.default_rng(seed), n_genes, median_umi)
    z, w = np.polynomial.hermite_e.hermegauss(64)
    w = w / w.sum()
    r = 1.0 / dispersion
    mu = np.multiply.outer(median_umi * np.exp(library_sd * z), share)  # 64 x n_genes
    zero = np.exp(-r * np.log1p(mu / r))
    return float(w @ (1.0 - zero).mean(axis=1))


def median_umi_for_density(
    density: float,
    n_genes: int = 2_000,
    *,
    library_sd: float = 0.4,
    seed: int = 0,
) -> float:
    """The ``median_umi`` at which :func:`simulate_screen` gives ``density`` non-zero counts.

    Solves :func:`expected_density` for ``median_umi``. At 8,248 genes,
    38 % non-zero takes a ``median_umi`` of about 11,400 (seed 0; 11,300-12,200
    over seeds 0-4); measured on 5,000 simulated cells: 37.95 %.

    Parameters
    ----------
    density
        Target fraction of non-zero counts, in ``(0, 1)``.
    n_genes, library_sd, seed
        As in :func:`simulate_screen` (the gene shares depend on ``seed``).

    Returns
    -------
    float
        The median library size.

    Raises
    ------
    ValueError
        If ``density`` is not between 0 and 1, or no library size between
        ``1e-3`` and ``1e9`` UMIs reaches it.
    """
    from scipy.optimize import brentq

    if not 0 < density < 1:
        raise ValueError(f"density must be between 0 and 1 (a fraction of non-zero counts), got {density!r}")

    def gap(log_umi: float) -> float:
        return expected_density(n_genes, median_umi=float(np.exp(log_umi)), library_sd=library_sd, seed=seed) - density

    lo, hi = np.log(1e-3), np.log(1e9)
    if gap(lo) > 0 or gap(hi) < 0:
        raise ValueError(
            f"no median_umi between 1e-3 and 1e9 gives density {density} at {n_genes:,} genes; "
            "choose a density nearer the middle"
        )
    return float(np.exp(brentq(gap, lo, hi, xtol=1e-6)))

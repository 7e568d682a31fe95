"""The main job's plan: data size, blocks, passes, memory per worker, disk, and the scheduler.

Everything here comes from the file's metadata and ``obs`` (the row
pointer gives the exact non-zeros per cell), never from a pass over the
values, so ``pertscale run --dry-run`` answers in seconds and a run that
cannot fit is refused before it starts.

Blocks are sized by the one planner of the package,
:func:`pertscale._memory.block_rows` (the reader's default chunks use it
too), within ``ps.settings.memory_fraction`` of a worker's memory: about
:data:`~pertscale._memory.COPIES_PER_BLOCK` copies of ``12 bytes x
non-zeros`` (value and index) per task. Each worker process also holds the
control summary (every part), at most ``12 bytes`` per non-zero control
value (value, multiplicity, count below). Measured peaks are in
``benchmarks/RESULTS.md``. With the threads scheduler the workers are
threads of one process: they share its memory (``memory_limit`` is that
process's), hold one copy of the control summary and one block each.

Disk: every file the job will write is counted, each at an upper bound
(statistics as float64, uncompressed) except the significant tables, which
are estimated (:data:`SIGNIFICANT_FRACTION`): the result stores and
``.h5ad`` copies of every method, the tables, ``pca.zarr`` and
``pseudobulk.h5ad``, the working store and its spill, and the CSR copy of a
CSC input with its temporary files. A working store or CSR copy already
there is reused (or rebuilt in its own place) and not counted again.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from .._memory import BLOCKS_PER_WORKER, BYTES_PER_NONZERO, COPIES_PER_BLOCK, MIN_BLOCK_ROWS, block_rows, n_cores
from .._settings import settings
from ..cluster import THREADS_BELOW_BYTES, processes_blocked

__all__ = [
    "BLOCKS_PER_WORKER",
    "BYTES_PER_NONZERO",
    "COPIES_PER_BLOCK",
    "MIN_BLOCK_ROWS",
    "THREADS_BELOW_BYTES",
    "Plan",
    "make_plan",
]

#: Bytes per non-zero control value in the frozen Wilcoxon summary (float32 value, int32 count, int32 below).
SUMMARY_BYTES_PER_NONZERO = 12
#: Compressed bytes per non-zero in the working store and its spill (small integers, lz4 with bit shuffling;
#: 1.5 measured on simulated screens at 38 % density), with margin.
STORE_BYTES_PER_NONZERO = 2.0
#: Bytes per (perturbation, gene) statistic in a result store or ``.h5ad`` (float64, uncompressed: an upper bound).
STAT_BYTES = 8
#: Bytes per (perturbation, gene) of scanpy's ``uns['rank_genes_groups']`` in an ``.h5ad`` (gene name, scores and
#: log fold changes as float32, p-values, adjusted p-values, pts and pts_rest as float64).
SCANPY_BYTES_PER_PAIR = 16 + 4 + 4 + 8 + 8 + 8 + 8
#: Fraction of (perturbation, gene) pairs the significant tables are planned for (an allowance, not a bound).
SIGNIFICANT_FRACTION = 0.1
#: Bytes per row of a significant table (perturbation, gene and four numbers as text).
CSV_ROW_BYTES = 100


def _gib(n: float) -> str:
    if n >= 2**28:
        return f"{n / 2**30:,.2f} GiB"
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


@dataclass
class Plan:
    """How the main job will run, and whether it fits.

    Attributes are sizes in bytes unless named otherwise.
    """

    n_obs: int
    n_vars: int
    nnz: int
    n_kept: int
    kept_nnz: int
    n_control: int
    control_nnz: int
    n_groups: int
    largest_group: int
    needs_sort: bool
    scheduler: str
    n_workers: int
    worker_memory: int
    block_rows: int
    n_blocks: int
    block_bytes: int
    summary_bytes: int
    peak_worker_bytes: int
    disk_working_store: int
    disk_results: int
    disk_free: int
    passes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: Threads that share one worker's memory (the threads scheduler: all of them, in this process).
    threads_per_worker: int = 1
    #: Bytes per file written into ``--out``, by name (``de_wilcoxon.zarr``, ``qc.csv``, ...).
    disk_outputs: dict[str, int] = field(default_factory=dict)
    #: Bytes of the CSR copy of a CSC input and its temporary files (0: none, or reused).
    disk_csr_copy: int = 0
    #: Whether an existing working store (or CSR copy) is reused in place.
    disk_reused: bool = False
    #: Bytes needed on ``--out``'s disk, and (when the working store is on another disk) on that disk and its free.
    disk_needed: int = 0
    disk_needed_working: int = 0
    disk_free_working: int | None = None
    #: Why the real run would be refused as ``--out`` is now (results already there, a lock held, ...):
    #: filled by ``ps.run(dry_run=True)``; the run itself raises them.
    refusals: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The plan as readable lines."""
        memory = _gib(self.worker_memory)
        if self.scheduler == "threads":  # one process: its threads share its memory, it is not theirs each
            workers = f"{self.n_workers} thread(s) in this process, sharing {memory}"
            peak = f"peak memory per worker (this process, {self.n_workers} thread(s) at once)"
        elif self.threads_per_worker > 1:
            workers = (
                f"{self.n_workers} worker(s) with {memory} each, shared by each worker's "
                f"{self.threads_per_worker} threads"
            )
            peak = f"peak memory per worker ({self.threads_per_worker} threads at once)"
        else:
            workers, peak = f"{self.n_workers} worker(s) with {memory} each", "peak memory per worker"
        if not self.needs_sort:
            store = " (not needed: input sorted)"
        elif self.disk_reused:
            store = " (there already: reused or rebuilt in place)"
        else:
            store = " (+ as much again while it is written)"
        csr = f", CSR copy of the CSC input {_gib(self.disk_csr_copy)}" if self.disk_csr_copy else ""
        disk = (
            f"disk: working store {_gib(self.disk_working_store)}{store}{csr}, results {_gib(self.disk_results)}; "
            f"needs about {_gib(self.disk_needed)} on --out's disk, {_gib(self.disk_free)} free"
        )
        if self.disk_free_working is not None:
            disk += (
                f"; the working store's disk: needs {_gib(self.disk_needed_working)}, "
                f"{_gib(self.disk_free_working)} free"
            )
        out = [
            f"input: {self.n_obs:,} cells x {self.n_vars:,} genes, {self.nnz:,} non-zeros "
            f"({_gib(self.nnz * BYTES_PER_NONZERO)} in memory as CSR)",
            f"kept after label filters: {self.n_kept:,} cells ({self.n_control:,} control, "
            f"{self.kept_nnz:,} non-zeros), {self.n_groups:,} perturbations (largest {self.largest_group:,} cells)",
            f"scheduler: {self.scheduler}, {workers}",
            f"blocks: {self.n_blocks:,} of about {self.block_rows:,} cells ({_gib(self.block_bytes)} each in memory)",
            f"control summary: up to {_gib(self.summary_bytes)}, one copy per worker",
            f"{peak}: about {_gib(self.peak_worker_bytes)} of {memory}",
            "passes over the matrix: " + "; ".join(self.passes),
            disk,
        ]
        if self.disk_outputs:
            out.append("results: " + ", ".join(f"{name} {_gib(n)}" for name, n in self.disk_outputs.items()))
        out.extend(f"does not fit: {p}" for p in self.problems)
        out.extend(f"the run would be refused: {r}" for r in self.refusals)
        return out

    def check(self) -> None:
        """Raise when the plan cannot run on this machine.

        Raises
        ------
        MemoryError
            Naming what does not fit and what to change.
        """
        if self.problems:
            raise MemoryError("the run does not fit: " + "; ".join(self.problems))


def make_plan(
    adata,
    *,
    kept: np.ndarray,
    control: np.ndarray,
    group_sizes: np.ndarray,
    needs_sort: bool,
    out: Path,
    scheduler: str | None,
    memory_limit: int | None,
    chunk_size: int | None,
    n_groups_tested: int,
    row_nnz: np.ndarray | None,
    workers: tuple[int, ...] | None = None,
    statistics: dict[str, int] | None = None,
    files: dict[str, str] | None = None,
    h5ad: bool = True,
    nb_glm: bool = False,
    steps: dict | None = None,
    working_store: Path | None = None,
    store_reused: bool = False,
    csr_copy: str | None = None,
) -> Plan:
    """The plan of a main job on ``adata`` (lazy; only metadata and ``obs`` are used).

    Parameters
    ----------
    adata
        The input, as :func:`pertscale.read` returns it.
    kept
        ``(n_obs,)`` bool: cells left after the label filters.
    control
        ``(n_obs,)`` bool: control cells.
    group_sizes
        Cells per kept perturbation.
    needs_sort
        Whether a working store must be written.
    out
        The output directory (for the free disk space).
    scheduler
        The scheduler asked for (``None``: choose).
    memory_limit
        Bytes per worker to plan for; with the threads scheduler, of the one
        process whose threads share it. Default the worker's limit on a
        distributed client, else this machine's available memory shared by
        the workers (all of it for threads: one process).
    chunk_size
        Rows per block asked for (``None``: from memory).
    n_groups_tested
        Perturbations that will be tested (for the size of the results).
    row_nnz
        ``(n_obs,)`` non-zeros per cell, or ``None`` to assume every row
        is full (an upper bound).
    workers
        ``(number, memory limit in bytes[, threads per worker])`` of the
        workers of a distributed client that will run the job; ``None`` for
        this machine.
    statistics
        Statistics per (perturbation, gene) each method writes, by method.
    files
        The job's outputs as :func:`pertscale.job.output_files` names
        them (``results:wilcoxon`` -> ``de_wilcoxon.zarr``, ...).
    h5ad
        Whether the scanpy ``.h5ad`` copies of the results are written.
    nb_glm
        Whether the negative-binomial test runs (its size factor and
        dispersion passes).
    steps
        The optional steps of the main job (``hvg``, ``pca``,
        ``pseudobulk``, with their settings), each its own passes.
    working_store
        Where the working store goes (default ``out/working_store.zarr``):
        its disk may be another.
    store_reused
        The working store is already there, complete: not written again.
    csr_copy
        ``"new"`` when a CSC input is transposed into a CSR copy beside the
        working store, ``"reused"`` when that copy is there; ``None``: none.
    """
    n_obs, n_vars = adata.shape
    if row_nnz is None:  # dense or column-major storage: every row as full, an upper bound
        row_nnz = np.full(n_obs, n_vars, dtype=np.int64)
    nnz = int(row_nnz.sum())
    kept_nnz = int(row_nnz[kept].sum())
    control_nnz = int(row_nnz[control].sum())
    n_kept = int(kept.sum())
    matrix_bytes = kept_nnz * BYTES_PER_NONZERO
    available = psutil.virtual_memory().available
    threads_per_worker = 1
    if workers is not None:  # a distributed client's workers: their number and limit, not this machine's
        chosen, n_workers = "distributed", int(workers[0])
        per_worker = int(memory_limit or workers[1] or available)
        threads_per_worker = max(int(workers[2]) if len(workers) > 2 else 1, 1)
    else:
        chosen = scheduler or ("threads" if matrix_bytes < THREADS_BELOW_BYTES or processes_blocked() else "local")
        n_workers = 1 if chosen == "synchronous" else (settings.n_workers or n_cores())
        if chosen == "threads":  # threads of this one process: they share its memory, the machine's once
            per_worker = int(memory_limit or available)
            threads_per_worker = n_workers
        else:
            per_worker = int(memory_limit or available / n_workers)
    summary = control_nnz * SUMMARY_BYTES_PER_NONZERO + n_vars * 64
    row_bytes = max(1.0, kept_nnz / max(n_kept, 1)) * BYTES_PER_NONZERO
    per_row = row_bytes * COPIES_PER_BLOCK
    tasks_per_budget = threads_per_worker  # tasks that run at once in one worker's memory
    largest = int(group_sizes.max()) if group_sizes.size else 0
    rows = block_rows(
        max(n_kept, 1),
        row_bytes,
        n_workers=n_workers,
        worker_memory=per_worker,
        tasks_at_once=tasks_per_budget,
        summary_bytes=summary,
        chunk_size=chunk_size,
    )
    block_rows_ = max(rows, largest)
    peak = summary + tasks_per_budget * block_rows_ * per_row
    problems = []
    if peak > per_worker:
        problems.append(
            f"a worker would need about {_gib(peak)} (control summary {_gib(summary)}, blocks of {block_rows_:,} "
            f"cells" + (f", {tasks_per_budget} at once" if tasks_per_budget > 1 else "") + f") but has "
            f"{_gib(per_worker)}: "
            + (
                "the largest perturbation alone is that big; give workers more memory (--memory-limit)"
                if block_rows_ == largest and largest > rows
                else "lower --chunk-size, or give workers more memory (--memory-limit)"
            )
        )
    outputs = _output_bytes(
        files or {},
        statistics or {},
        n_groups=n_groups_tested,
        n_vars=n_vars,
        n_kept=n_kept,
        n_obs_columns=adata.obs.shape[1],
        h5ad=h5ad,
        steps=steps or {},
    )
    results = sum(outputs.values())
    store = int(kept_nnz * STORE_BYTES_PER_NONZERO) if needs_sort else 0
    store_need = 0 if store_reused else 2 * store  # the spill takes as much again while the store is written
    itemsize = np.dtype(getattr(adata.X, "dtype", np.float32)).itemsize
    # the copy and the memory-mapped values and indices it is made from, uncompressed: an upper bound
    csr = 2 * nnz * (itemsize + 4) if csr_copy == "new" else 0
    out_dir = _existing(out)
    free = shutil.disk_usage(out_dir).free
    store_dir = _existing(working_store) if working_store is not None else out_dir
    if _same_disk(store_dir, out_dir):
        need, need_working, free_working = results + store_need + csr, 0, None
    else:
        need, need_working = results, store_need + csr
        free_working = shutil.disk_usage(store_dir).free
    if need > free:
        parts = [("results", results)]
        if free_working is None:
            parts += [("working store and its spill", store_need), ("CSR copy of the CSC input", csr)]
        problems.append(
            f"--out {str(out)!r} has {_gib(free)} free but the working store and results need about {_gib(need)} "
            f"({', '.join(f'{what} {_gib(n)}' for what, n in parts if n)}): "
            "choose an --out (or --working-store) on a larger disk, or free space there"
        )
    if free_working is not None and need_working > free_working:
        problems.append(
            f"--working-store {str(working_store)!r} has {_gib(free_working)} free but the working store needs "
            f"about {_gib(need_working)}: choose a --working-store on a larger disk, or free space there"
        )
    passes = ["sort into the working store (1 read, spill written and read once, compressed)"] if needs_sort else []
    passes += ["QC metrics and filters (1 read)"]
    if nb_glm:
        passes += [
            "size factors (2 reads)",
            "dispersions (1 read, then 1 read per Newton step: about 5-15; 1 read in all with --dispersion-cells "
            "when the sample fits in memory)",
        ]
    steps = steps or {}
    if "pseudobulk" in steps:
        passes += ["pseudo-bulk (1 read)"]
    if "hvg" in steps:
        reads = "2 reads" if steps["hvg"].get("flavor") == "seurat_v3" else "1 read"
        passes += [f"highly variable genes ({reads})"]
    if "pca" in steps:
        passes += [
            "PCA (1 read for the covariance up to 5,000 genes, else 1 read per iteration of the randomized method; "
            "the scores written in the test pass)"
        ]
    passes += ["control summary (reads the control slice)", "test (1 read, every method)"]
    return Plan(
        n_obs=n_obs,
        n_vars=n_vars,
        nnz=nnz,
        n_kept=n_kept,
        kept_nnz=kept_nnz,
        n_control=int(control.sum()),
        control_nnz=control_nnz,
        n_groups=int(group_sizes.size),
        largest_group=largest,
        needs_sort=needs_sort,
        scheduler=chosen,
        n_workers=n_workers,
        worker_memory=per_worker,
        block_rows=block_rows_,
        n_blocks=int(-(-n_kept // max(block_rows_, 1))),
        block_bytes=int(block_rows_ * per_row / COPIES_PER_BLOCK),
        summary_bytes=int(summary),
        peak_worker_bytes=int(peak),
        disk_working_store=store,
        disk_results=results,
        disk_free=int(free),
        passes=passes,
        problems=problems,
        threads_per_worker=threads_per_worker,
        disk_outputs=outputs,
        disk_csr_copy=csr,
        disk_reused=store_reused,
        disk_needed=need,
        disk_needed_working=need_working,
        disk_free_working=None if free_working is None else int(free_working),
    )


def _output_bytes(
    files: dict[str, str],
    statistics: dict[str, int],
    *,
    n_groups: int,
    n_vars: int,
    n_kept: int,
    n_obs_columns: int,
    h5ad: bool,
    steps: dict,
) -> dict[str, int]:
    """Bytes of each file the job writes into ``--out``, by name (upper bounds; the significant tables estimated)."""
    pairs = n_groups * n_vars
    names = (n_groups + n_vars) * 64  # obs and var of a results AnnData, settings
    sizes = {}
    for key, name in files.items():
        kind, _, method = key.partition(":")
        n_stats = statistics.get(method, 0)
        if kind == "results":
            sizes[name] = pairs * n_stats * STAT_BYTES + names
        elif kind == "h5ad" and h5ad:
            sizes[name] = pairs * (n_stats * STAT_BYTES + SCANPY_BYTES_PER_PAIR) + names
        elif kind == "significant":
            sizes[name] = int(pairs * SIGNIFICANT_FRACTION * CSV_ROW_BYTES)
        elif kind == "size_factors":
            sizes[name] = n_kept * 64
        elif kind == "hvg":
            sizes[name] = n_vars * 128
        elif kind == "pca":
            n_comps = int(steps.get("pca", {}).get("n_comps", 50))
            sizes[name] = (n_kept + n_vars) * n_comps * STAT_BYTES + n_kept * 8 * (n_obs_columns + 2) + n_vars * 128
        elif kind == "pseudobulk":
            sizes[name] = (n_groups + 1) * n_vars * STAT_BYTES * 4 + names
        elif kind == "qc":
            sizes[name] = (n_groups + 3) * 64
        elif kind == "qc_cells":  # five per-cell columns, the labels as codes (uncompressed upper bound)
            sizes[name] = n_kept * 40 + n_groups * 64
        elif kind == "run":  # settings, profile and DE genes per perturbation and method
            sizes[name] = 16_384 + (n_groups + 3) * 64 * max(len(statistics), 1)
        elif kind == "report":  # a dozen figures embedded as PNG, the tables' first rows
            sizes[name] = 4 * 2**20
        elif kind == "long":  # every pair: two labels (dictionary pages) and four float64 (uncompressed bound)
            sizes[name] = pairs * 4 * STAT_BYTES + names
        elif kind in ("effects", "knockdown", "energy_distance", "guide_concordance"):  # a row per perturbation
            sizes[name] = (n_groups + 1) * 256
        elif kind == "knockdown_cells":  # label, value, score, flag per cell (upper bound: every cell scored)
            sizes[name] = n_kept * 48
        elif kind == "guides":  # the assignment's columns per cell
            sizes[name] = n_kept * 96
        elif kind in ("calibration", "calibration_pvalues"):  # a row per split; the QQ plot's points
            sizes[name] = 2**20
        elif kind == "guide_de":  # each guide's results: up to a few guides a perturbation
            sizes[name] = 4 * pairs * n_stats * STAT_BYTES + names
    return sizes


def _existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (where its disk space is)."""
    return next((p for p in (path, *path.parents) if p.exists()), Path("."))


def _same_disk(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_dev == b.stat().st_dev
    except OSError:
        return True

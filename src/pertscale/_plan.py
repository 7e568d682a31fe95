"""The main job's plan: data size, blocks, passes, memory per worker, disk, and the scheduler.

Everything here comes from the file's metadata and ``obs`` (the row
pointer gives the exact non-zeros per cell), never from a pass over the
values, so ``pertscale run --dry-run`` answers in seconds and a run that
cannot fit is refused before it starts.

Memory model of one task of the test pass, per row of its block: the CSR
block as read, its normalized and log1p copies (float32), the gene-major
copy and the kernel's buffers: about :data:`COPIES_PER_BLOCK` copies of
``12 bytes x non-zeros`` (value and index). Each worker process also holds
the control summary (every part), at most ``12 bytes`` per non-zero
control value (value, multiplicity, count below). Measured peaks are in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from ._settings import settings
from .cluster import n_cores

#: Copies of a block's non-zeros a test task holds at its peak (measured, with margin).
COPIES_PER_BLOCK = 6
#: Bytes per non-zero of a block in memory (float32 value + int32 index + slack).
BYTES_PER_NONZERO = 12
#: Bytes per non-zero control value in the frozen Wilcoxon summary (float32 value, int32 count, int32 below).
SUMMARY_BYTES_PER_NONZERO = 12
#: Fraction of a worker's memory the plan may fill.
MEMORY_FRACTION = 0.6
#: Compressed bytes per non-zero in the working store and its spill (small integers, lz4 with bit shuffling;
#: 1.5 measured on simulated screens at 38 % density), with margin.
STORE_BYTES_PER_NONZERO = 2.0
#: Below this size of the matrix in memory, threads in this process beat a process cluster (no start-up,
#: no transfers, numba kernels release the GIL).
THREADS_BELOW_BYTES = 2 * 2**30
#: Rows per block, at least.
MIN_BLOCK_ROWS = 1_000
#: Blocks per worker, at least, when memory allows larger blocks.
BLOCKS_PER_WORKER = 4


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**28 else f"{n / 2**20:,.1f} MiB"


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

    def lines(self) -> list[str]:
        """The plan as readable lines."""
        out = [
            f"input: {self.n_obs:,} cells x {self.n_vars:,} genes, {self.nnz:,} non-zeros "
            f"({_gib(self.nnz * BYTES_PER_NONZERO)} in memory as CSR)",
            f"kept after label filters: {self.n_kept:,} cells ({self.n_control:,} control, "
            f"{self.kept_nnz:,} non-zeros), {self.n_groups:,} perturbations (largest {self.largest_group:,} cells)",
            f"scheduler: {self.scheduler}, {self.n_workers} worker(s) with {_gib(self.worker_memory)} each",
            f"blocks: {self.n_blocks:,} of about {self.block_rows:,} cells ({_gib(self.block_bytes)} each in memory)",
            f"control summary: up to {_gib(self.summary_bytes)}, one copy per worker",
            f"peak memory per worker: about {_gib(self.peak_worker_bytes)} of {_gib(self.worker_memory)}",
            "passes over the matrix: " + "; ".join(self.passes),
            f"disk: working store {_gib(self.disk_working_store)}"
            + (" (+ as much again while it is written)" if self.needs_sort else " (not needed: input sorted)")
            + f", results {_gib(self.disk_results)}; free {_gib(self.disk_free)}",
        ]
        out.extend(f"does not fit: {p}" for p in self.problems)
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
    workers: tuple[int, int] | None = None,
    n_statistics: int = 7,
    nb_glm: bool = False,
    steps: dict | None = None,
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
        Bytes per worker to plan for; default the worker's limit on a
        distributed client, else this machine's available memory shared by
        the workers.
    chunk_size
        Rows per block asked for (``None``: from memory).
    n_groups_tested
        Perturbations that will be tested (for the size of the results).
    row_nnz
        ``(n_obs,)`` non-zeros per cell, or ``None`` to assume every row
        holds the average.
    workers
        ``(number, memory limit in bytes)`` of the workers of a distributed
        client that will run the job; ``None`` for this machine.
    n_statistics
        Statistics per (perturbation, gene) written, over every method.
    nb_glm
        Whether the negative-binomial test runs (its size factor and
        dispersion passes).
    steps
        The optional steps of the main job (``hvg``, ``pca``,
        ``pseudobulk``, with their settings), each its own passes.
    """
    n_obs, n_vars = adata.shape
    if row_nnz is None:  # dense or column-major storage: every row as full, an upper bound
        row_nnz = np.full(n_obs, n_vars, dtype=np.int64)
    nnz = int(row_nnz.sum())
    kept_nnz = int(row_nnz[kept].sum())
    control_nnz = int(row_nnz[control].sum())
    matrix_bytes = kept_nnz * BYTES_PER_NONZERO
    available = psutil.virtual_memory().available
    if workers is not None:  # a distributed client's workers: their number and limit, not this machine's
        chosen, n_workers = "distributed", int(workers[0])
        per_worker = int(memory_limit or workers[1] or available)
    else:
        chosen = scheduler or ("threads" if matrix_bytes < THREADS_BELOW_BYTES else "local")
        n_workers = 1 if chosen == "synchronous" else (settings.n_workers or n_cores())
        per_worker = int(memory_limit or available / (n_workers if chosen != "threads" else 1))
    summary = control_nnz * SUMMARY_BYTES_PER_NONZERO + n_vars * 64
    per_row = max(1.0, kept_nnz / max(int(kept.sum()), 1)) * BYTES_PER_NONZERO * COPIES_PER_BLOCK
    tasks_per_budget = n_workers if chosen == "threads" else 1  # threads share one memory
    room = per_worker * MEMORY_FRACTION - summary
    largest = int(group_sizes.max()) if group_sizes.size else 0
    if chunk_size is None:
        rows = int(max(room, 0) / tasks_per_budget // per_row)
        # at least BLOCKS_PER_WORKER blocks per worker, so that the work balances and reading overlaps computing
        rows = max(MIN_BLOCK_ROWS, min(rows, -(-int(kept.sum()) // max(BLOCKS_PER_WORKER * n_workers, 1))))
    else:
        rows = int(chunk_size)
    rows = max(rows, 1)
    block_rows = max(rows, largest)
    peak = summary + tasks_per_budget * block_rows * per_row
    problems = []
    if peak > per_worker:
        problems.append(
            f"a worker would need about {_gib(peak)} (control summary {_gib(summary)}, blocks of {block_rows:,} "
            f"cells) but has {_gib(per_worker)}: "
            + (
                "the largest perturbation alone is that big; give workers more memory (--memory-limit)"
                if block_rows == largest and largest > rows
                else "lower --chunk-size, or give workers more memory (--memory-limit)"
            )
        )
    store = int(kept_nnz * STORE_BYTES_PER_NONZERO) if needs_sort else 0
    results = n_groups_tested * n_vars * n_statistics * 8
    out_dir = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(out_dir).free
    need = 2 * store + results
    if need > free:
        problems.append(
            f"--out {str(out)!r} has {_gib(free)} free but the working store and results need about {_gib(need)}: "
            "choose an --out (or --working-store) on a larger disk"
        )
    passes = ["sort into the working store (1 read, spill written and read once, compressed)"] if needs_sort else []
    passes += ["QC metrics and filters (1 read)"]
    if nb_glm:
        passes += ["size factors (2 reads)", "dispersions (1 read, then 1 read per Newton step: about 5-15)"]
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
        n_kept=int(kept.sum()),
        kept_nnz=kept_nnz,
        n_control=int(control.sum()),
        control_nnz=control_nnz,
        n_groups=int(group_sizes.size),
        largest_group=largest,
        needs_sort=needs_sort,
        scheduler=chosen,
        n_workers=n_workers,
        worker_memory=per_worker,
        block_rows=block_rows,
        n_blocks=int(-(-int(kept.sum()) // max(block_rows, 1))),
        block_bytes=int(block_rows * per_row / COPIES_PER_BLOCK),
        summary_bytes=int(summary),
        peak_worker_bytes=int(peak),
        disk_working_store=store,
        disk_results=results,
        disk_free=int(free),
        passes=passes,
        problems=problems,
    )

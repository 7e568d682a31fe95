"""How many cells a row block holds: the one memory planner of the reader, the analyses and the main job.

Memory model of one task over a block, per row: the CSR block as read, its
normalized and log1p copies (float32), the gene-major copy and the test
kernel's buffers: about :data:`COPIES_PER_BLOCK` copies of the block's
non-zeros at :data:`BYTES_PER_NONZERO` each (value, index, slack). A worker
runs ``tasks_at_once`` such tasks (its threads) and also holds the control
summary, one copy per worker. The plan may fill ``ps.settings.memory_fraction``
of a worker's memory (``--memory-limit`` / ``memory_limit=`` sets that
memory; default this machine's available memory shared by the workers).
Measured peaks are in ``benchmarks/RESULTS.md``.

This module is a leaf: it imports nothing of pertscale but the settings, so
that the reader (:func:`pertscale.io.read`), the analyses and the face plan
blocks the same way.
"""

from __future__ import annotations

import os

import psutil

from ._settings import settings

#: Copies of a block's non-zeros a test task holds at its peak (measured, with margin).
COPIES_PER_BLOCK = 6
#: Bytes per non-zero of a block in memory (float32 value + int32 index + slack).
BYTES_PER_NONZERO = 12
#: Rows per block, at least (fewer only when the matrix has fewer).
MIN_BLOCK_ROWS = 1_000
#: Blocks per worker, at least, when memory allows larger blocks: the work balances and reading overlaps computing.
BLOCKS_PER_WORKER = 4


def n_cores() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def available_memory() -> int:
    """Bytes of memory available on this machine now."""
    return int(psutil.virtual_memory().available)


def block_rows(
    n_rows: int,
    bytes_per_row: float,
    *,
    n_workers: int | None = None,
    worker_memory: int | None = None,
    tasks_at_once: int = 1,
    summary_bytes: int = 0,
    chunk_size: int | None = None,
) -> int:
    """Rows per block: as many as fit a worker's share of memory, at least a few blocks per worker.

    Parameters
    ----------
    n_rows
        Rows (cells) to be blocked.
    bytes_per_row
        In-memory bytes of one row as read (values and column indices,
        :data:`BYTES_PER_NONZERO` per non-zero is the main job's estimate);
        a task holds :data:`COPIES_PER_BLOCK` copies of it.
    n_workers
        Workers sharing the work; default ``ps.settings.n_workers`` or the
        core count.
    worker_memory
        Bytes of memory of one worker (with threads: of the one process
        they share); default this machine's available memory divided by
        ``n_workers``.
    tasks_at_once
        Tasks that run at once in one worker's memory (its threads).
    summary_bytes
        Bytes each worker holds besides its blocks (the control summary).
    chunk_size
        Rows asked for: returned as they are (at least 1).

    Returns
    -------
    int
        Rows per block, between ``min(n_rows, MIN_BLOCK_ROWS)`` and
        ``n_rows`` (or ``chunk_size``).
    """
    if chunk_size is not None:
        return max(int(chunk_size), 1)
    n_workers = max(int(n_workers or settings.n_workers or n_cores()), 1)
    memory = worker_memory if worker_memory is not None else available_memory() / n_workers
    room = max(memory * settings.memory_fraction - summary_bytes, 0)
    rows = int(room / max(tasks_at_once, 1) // max(bytes_per_row * COPIES_PER_BLOCK, 1.0))
    rows = min(rows, -(-n_rows // (BLOCKS_PER_WORKER * n_workers)))
    return int(max(1, min(n_rows, max(rows, MIN_BLOCK_ROWS))))


def workers_now() -> int:
    """Tasks that run at once on Dask's current scheduler (read from Dask's configuration, nothing started).

    The face's context (:func:`pertscale.cluster.using`) knows its workers;
    a ``distributed.Client`` counts its workers; ``"synchronous"`` is one;
    dask's threads and processes, the core count.
    """
    import dask

    scheduler = dask.config.get("scheduler", None)
    if hasattr(scheduler, "n_workers"):
        return max(int(scheduler.n_workers), 1)
    if scheduler in ("sync", "synchronous", "single-threaded"):
        return 1
    if scheduler is None:
        try:
            from distributed import get_client

            scheduler = get_client()
        except (ImportError, ValueError):
            return n_cores()
    if hasattr(scheduler, "scheduler_info"):
        return max(len(scheduler.scheduler_info().get("workers", {})), 1)
    return n_cores()

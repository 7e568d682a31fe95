"""Where computations run: scheduler selection and the compute helpers.

With no scheduler named, an active ``distributed.Client`` is used if there is
one; otherwise a ``LocalCluster`` with one single-threaded worker process per
core is started on first use and closed when Python exits. Single-threaded
processes because HDF5 serializes threads and numba's workqueue threading
layer aborts when called from several threads at once.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from contextlib import contextmanager
from typing import Any

import dask

from ._settings import settings

logger = logging.getLogger(__name__)

LOCAL_SCHEDULERS = ("synchronous", "threads", "processes")

_lock = threading.Lock()
_clients: dict[str, Any] = {}


def n_cores() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def active_client():
    """The active ``distributed.Client``, if there is one."""
    try:
        from distributed import get_client
    except ImportError:  # pragma: no cover
        return None
    try:
        return get_client()
    except ValueError:
        return None


def local_client(n_workers: int | None = None):
    """The package's own ``LocalCluster`` client, started on first use.

    Parameters
    ----------
    n_workers
        Worker processes; default ``settings.n_workers`` or the core count.
        Each worker has one thread.
    """
    from distributed import Client, LocalCluster

    n_workers = n_workers or settings.n_workers or n_cores()
    key = f"local-{n_workers}"
    with _lock:
        client = _clients.get(key)
        if client is not None and client.status == "running":
            return client
        logger.info("starting a LocalCluster with %d single-threaded worker processes", n_workers)
        # Worker logs: a task's error reaches the caller as its exception, with the message that names
        # the problem; the workers' own tracebacks of it are only shown when debugging (-vv).
        quiet = logging.ERROR if logging.getLogger("pertscale").isEnabledFor(logging.DEBUG) else logging.CRITICAL
        with _workers_ignore_sigint():
            cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                silence_logs=quiet,
            )
        client = Client(cluster, set_as_default=False)
        logger.info("Dask dashboard: %s", client.dashboard_link)
        _clients[key] = client
        return client


@contextmanager
def _workers_ignore_sigint():
    """Start worker processes that ignore SIGINT, without ever ignoring the caller's Ctrl-C.

    Ctrl-C in a terminal reaches the whole process group: the workers would
    die with tracebacks of their own while the client shuts them down
    cleanly anyway. The workers are therefore forked from a multiprocessing
    fork server whose first import, :mod:`pertscale._ignore_sigint`, makes
    it ignore SIGINT; the fork server hands that setting on to every process
    it forks (it restores, in each child, the handlers it had before serving)
    and Python and asyncio leave an ignored SIGINT ignored. This process's
    own handling of SIGINT is never touched. Where there is no fork server
    (Windows), or one was already running, the workers start as usual.
    """
    import multiprocessing
    from multiprocessing import forkserver

    if "forkserver" not in multiprocessing.get_all_start_methods():
        yield
        return
    # distributed preloads itself in the fork server too, which makes workers start faster
    forkserver.set_forkserver_preload(["pertscale._ignore_sigint", "distributed"])
    forkserver.ensure_running()
    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        yield


#: dask-jobqueue's cluster class for each batch system.
JOBQUEUE_CLUSTERS = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}


def jobqueue(
    system: str = "slurm",
    *,
    cores: int | None = None,
    memory: str | None = None,
    walltime: str | None = None,
    jobs: int = 1,
    queue: str | None = None,
    account: str | None = None,
    processes: int | None = None,
    timeout: float = 600,
    **options,
):
    """Start Dask workers as batch jobs (SLURM, PBS, SGE, LSF) through dask-jobqueue; return their client.

    Each job runs ``processes`` single-threaded worker processes (default:
    one per core, as the local cluster does: HDF5 serializes threads and
    numba's threading layer must not be entered from several threads) and
    shares the job's ``memory`` among them. Options left ``None`` come from
    dask's configuration (``jobqueue.yaml``, section ``jobqueue.<system>``),
    as with dask-jobqueue itself. The call waits until every worker has
    connected (or ``timeout`` seconds pass), so that the memory plan of
    :func:`pertscale.run` sees the workers' memory, not this machine's.
    The cluster is closed when Python exits (or with ``client.cluster.close()``).

    Workers must see the input, ``--out`` and the working store at the same
    paths as this process: a shared file system.

    Parameters
    ----------
    system
        ``"slurm"``, ``"pbs"``, ``"sge"`` or ``"lsf"``.
    cores, memory, walltime
        Per job: cores (``--cpus-per-task``), memory (``"32GB"``) and time
        limit (``"02:00:00"``).
    jobs
        Number of jobs to submit.
    queue, account
        Partition or queue, and the account (``project`` for SGE and LSF).
    processes
        Worker processes per job; default ``cores``.
    timeout
        Seconds to wait for the workers (queued jobs may wait long).
    **options
        Passed to the dask-jobqueue cluster class (``job_extra_directives``,
        ``local_directory``, ``log_directory``, ``python``, ...).

    Returns
    -------
    distributed.Client
        Pass it as ``scheduler=`` to any function, or make it the default
        with ``ps.settings.scheduler = client.scheduler.address``.

    Raises
    ------
    ImportError
        If dask-jobqueue is not installed (``pip install 'pertscale[hpc]'``).
    ValueError
        For an unknown ``system``, or ``jobs`` below 1.
    TimeoutError
        If the workers have not all connected after ``timeout`` seconds (the
        jobs are cancelled; the message says how many came).
    """
    if system not in JOBQUEUE_CLUSTERS:
        raise ValueError(f"batch system {system!r} is not supported; choose one of {tuple(JOBQUEUE_CLUSTERS)}")
    from ._validation import check_number

    jobs = check_number(jobs, "jobs", integer=True, minimum=1)
    try:
        import dask_jobqueue
    except ImportError as err:
        raise ImportError("running on a batch system needs dask-jobqueue: pip install 'pertscale[hpc]'") from err
    from distributed import Client

    cls = getattr(dask_jobqueue, JOBQUEUE_CLUSTERS[system])
    given = {"cores": cores, "memory": memory, "walltime": walltime, "queue": queue}
    given["project" if system in ("sge", "lsf") else "account"] = account
    cores = cores or dask.config.get(f"jobqueue.{system}.cores", None)
    given["processes"] = processes or cores
    cluster = cls(**{k: v for k, v in given.items() if v is not None}, **options)
    cluster.scale(jobs=jobs)
    client = Client(cluster, set_as_default=False)
    expected = jobs * int(given["processes"] or 1)
    try:
        client.wait_for_workers(expected, timeout=timeout)
    except (TimeoutError, OSError) as err:
        came = len(client.scheduler_info().get("workers", {}))
        client.close()
        cluster.close()
        raise TimeoutError(
            f"{came} of {expected} worker(s) connected within {timeout:g} s: the {system} jobs may be queued "
            "or failing; see the queue and the job logs (log_directory=...)"
        ) from err
    logger.info("%s: %d job(s), %d worker(s) connected; dashboard %s", system, jobs, expected, client.dashboard_link)
    with _lock:
        _clients[f"{system}-{id(client)}"] = client
    return client


def slurm(**options):
    """:func:`jobqueue` on SLURM: ``ps.cluster.slurm(cores=8, memory="32GB", walltime="02:00:00", jobs=4)``."""
    return jobqueue("slurm", **options)


def _address_client(address: str):
    from distributed import Client

    with _lock:
        client = _clients.get(address)
        if client is None or client.status != "running":
            client = Client(address, set_as_default=False)
            _clients[address] = client
        return client


@atexit.register
def close_clients() -> None:
    """Close the clients and clusters this package started."""
    with _lock:
        for client in _clients.values():
            cluster = getattr(client, "cluster", None)
            try:
                client.close()
                if cluster is not None:
                    cluster.close()
            except Exception:  # pragma: no cover - best effort at exit
                pass
        _clients.clear()


def resolve_scheduler(scheduler: str | Any | None = None):
    """Turn a scheduler name into what ``dask.compute`` takes.

    Parameters
    ----------
    scheduler
        ``None`` (use ``settings.scheduler``), ``"local"``, one of
        ``"synchronous"``, ``"threads"``, ``"processes"``, a scheduler address
        (``"tcp://..."``) or a ``distributed.Client``.

    Returns
    -------
    str or distributed.Client

    Raises
    ------
    ValueError
        For a name that is none of these.
    """
    scheduler = settings.scheduler if scheduler is None else scheduler
    if not isinstance(scheduler, str):
        return scheduler  # a Client
    if scheduler == "local":
        return active_client() or local_client()
    if scheduler in LOCAL_SCHEDULERS:
        return scheduler
    if "://" in scheduler or ":" in scheduler:
        return _address_client(scheduler)
    raise ValueError(
        f"scheduler {scheduler!r} is not known; use 'local', 'synchronous', 'threads', "
        "'processes' or a scheduler address such as 'tcp://127.0.0.1:8786'"
    )


def is_distributed(scheduler) -> bool:
    """Whether a resolved scheduler is a ``distributed.Client``."""
    return not isinstance(scheduler, str)


def n_workers_of(scheduler) -> int:
    """Worker processes (or threads) a resolved scheduler runs tasks on."""
    if is_distributed(scheduler):
        return max(1, len(scheduler.scheduler_info().get("workers", {})))
    return 1 if scheduler == "synchronous" else n_cores()


def compute(*collections, scheduler=None, progress: bool | None = None, desc: str | None = None):
    """Compute Dask collections on the chosen scheduler.

    Parameters
    ----------
    *collections
        Dask collections (arrays, delayed objects).
    scheduler
        See :func:`resolve_scheduler`.
    progress
        Show a progress bar; default ``settings.progress``.
    desc
        Label of the progress bar.

    Returns
    -------
    tuple
        The computed values, one per collection.
    """
    sched = resolve_scheduler(scheduler)
    progress = settings.progress if progress is None else progress
    if is_distributed(sched):
        with sched.as_current():
            # optimize once: the summaries are computed from the same graph the pass then runs
            collections = dask.optimize(*collections)
            broadcast = _replicate_summaries(sched, collections, progress=progress)
            persisted = sched.persist(list(collections), optimize_graph=False)
            _wait(persisted, progress=progress, desc=desc)
            result = tuple(dask.compute(*persisted, scheduler=sched))
            del broadcast
            return result
    if progress:
        from tqdm.dask import TqdmCallback

        with TqdmCallback(desc=desc, leave=False):
            return dask.compute(*collections, scheduler=sched)
    return dask.compute(*collections, scheduler=sched)


def persist(*collections, scheduler=None) -> tuple:
    """Compute Dask collections and keep their results where they were computed (worker memory, or here).

    Returns
    -------
    tuple
        Collections of the same kinds, backed by the results.
    """
    sched = resolve_scheduler(scheduler)
    if is_distributed(sched):
        return tuple(sched.persist(list(collections)))
    return dask.persist(*collections, scheduler=sched)


def _replicate_summaries(client, collections, *, progress: bool) -> list:
    """Compute the control summaries in ``collections`` first and copy them to every worker.

    A summary is needed by every block task. Left to the scheduler, each
    worker would fetch it from the one worker that made it; replicated,
    every worker holds its own copy before the pass starts. Later graphs
    that contain the same keys use these results instead of recomputing
    them, for as long as the returned futures are held.
    """
    from dask.delayed import Delayed

    from .tl._engine import SUMMARY_PREFIX

    keys = []
    for c in collections:
        graph = c.__dask_graph__()
        found = [k for k in graph.keys() if isinstance(k, str) and k.startswith(SUMMARY_PREFIX)]
        if found:
            tasks = dict(graph)
            keys.extend((k, tasks) for k in found)
    if not keys:
        return []
    futures = client.compute([Delayed(k, g) for k, g in keys], optimize_graph=False)
    _wait(futures, progress=progress, desc="control summary")
    if len(client.scheduler_info().get("workers", {})) > 1:
        client.replicate(futures)
    return futures


def _wait(persisted, *, progress: bool, desc: str | None) -> None:
    """Wait for persisted collections, with a bar over their output chunks."""
    from distributed import as_completed, futures_of

    futures = futures_of(persisted)
    try:
        if not progress:
            for f in as_completed(futures):
                if f.status == "error":
                    f.result()  # raises the task's exception here
            return
        from tqdm.auto import tqdm

        with tqdm(total=len(futures), desc=desc, leave=False, unit="chunk") as bar:
            for f in as_completed(futures):
                if f.status == "error":
                    f.result()
                bar.update(1)
    except BaseException:
        for f in futures:  # stop the rest of a failed or interrupted computation
            f.cancel()
        raise

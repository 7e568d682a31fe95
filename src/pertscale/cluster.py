"""Where computations run: scheduler selection and the compute helpers.

With no scheduler named, an active ``distributed.Client`` is used if there is
one; otherwise a ``LocalCluster`` with one single-threaded worker process per
core is started on first use and closed when Python exits. Single-threaded
processes because HDF5 serializes threads and numba's workqueue threading
layer aborts when called from several threads at once.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import dask
from tqdm.std import tqdm

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
    FileNotFoundError
        If the batch system's submit command (``sbatch``, ``qsub``,
        ``bsub``) is not on this machine's ``PATH`` (at once, before any
        job is submitted).
    ValueError
        For an unknown ``system``, ``jobs`` or ``cores`` below 1, or
        ``cores`` or ``memory`` neither given nor in dask's
        ``jobqueue.<system>`` configuration, or a ``memory`` that is not a
        size.
    TimeoutError
        If the workers have not all connected after ``timeout`` seconds (the
        jobs are cancelled; the message says how many came).
    """
    if system not in JOBQUEUE_CLUSTERS:
        raise ValueError(f"batch system {system!r} is not supported; choose one of {tuple(JOBQUEUE_CLUSTERS)}")
    from ._validation import check_number

    jobs = check_number(jobs, "jobs", integer=True, minimum=1)
    cores = check_number(cores, "cores", integer=True, minimum=1, allow_none=True, flag="--cores")
    try:
        import dask_jobqueue
    except ImportError as err:
        raise ImportError("running on a batch system needs dask-jobqueue: pip install 'pertscale[hpc]'") from err
    from distributed import Client

    cls = getattr(dask_jobqueue, JOBQUEUE_CLUSTERS[system])
    _check_batch_system(system, cls.job_cls.submit_command, cores=cores, memory=memory)
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


def _check_batch_system(system: str, command: str, *, cores, memory) -> None:
    """Refuse at once what would otherwise fail in the background while the call waits for its workers.

    Without the submit command, dask-jobqueue's submissions fail in a loop
    of logged tracebacks while :func:`jobqueue` waits ``timeout`` seconds;
    without cores and memory it raises with a Python example instead of
    naming the flags.
    """
    if shutil.which(command) is None:
        raise FileNotFoundError(
            f"cannot submit {system} jobs: the command {command!r} is not found on this machine (PATH); run on a "
            f"login node of the {system.upper()} cluster, or load the module that provides {command}, or run without "
            "--cluster"
        )
    cores = cores or dask.config.get(f"jobqueue.{system}.cores", None)
    memory = memory or dask.config.get(f"jobqueue.{system}.memory", None)
    missing = [name for name, value in (("cores", cores), ("memory", memory)) if value is None]
    if missing:
        raise ValueError(
            f"the {system} jobs need their {' and '.join(missing)} per job: give --cores 8 --memory 32GB "
            f"(ps.cluster.jobqueue({system!r}, cores=8, memory='32GB')), or set jobqueue.{system}.cores and "
            f"jobqueue.{system}.memory in dask's jobqueue.yaml"
        )
    from dask.utils import parse_bytes

    try:
        parse_bytes(memory)
    except (ValueError, TypeError) as err:
        raise ValueError(f"memory {memory!r} is not a size such as 32GB or 512MiB (--memory)") from err


def slurm(**options):
    """:func:`jobqueue` on SLURM: ``ps.cluster.slurm(cores=8, memory="32GB", walltime="02:00:00", jobs=4)``."""
    return jobqueue("slurm", **options)


def _address_client(address: str):
    from distributed import Client

    with _lock:
        client = _clients.get(address)
        if client is None or client.status != "running":
            _probe(address)
            try:
                client = Client(address, set_as_default=False, timeout=settings.connect_timeout)
            except (OSError, TimeoutError) as err:  # answered the probe, then not the client: rare
                raise ConnectionError(f"cannot connect to the Dask scheduler at {address}: {err}") from err
            _clients[address] = client
        return client


def _probe(address: str) -> None:
    """Ask ``address`` who it is, within ``settings.connect_timeout`` seconds, without a ``Client``.

    A ``Client`` that cannot connect raises with a traceback of the comm
    layer, and its finalizer then waits twice the timeout to close; a
    server that is not a Dask scheduler (a dashboard, a web proxy) makes
    its handshake read an HTTP reply as a frame length ("Unable to
    allocate 3 EiB"). Here every outcome is one message that names the
    address and what to check. Runs in a thread of its own, so that it
    works where an event loop is already running (Jupyter).

    Raises
    ------
    ConnectionError
        If nothing answers in time, the connection is refused, the host is
        not known, or what answers is not a Dask scheduler.
    """
    from distributed.core import rpc

    timeout = settings.connect_timeout

    async def identity():
        async with rpc(address, timeout=timeout) as server:
            return await server.identity()

    reached = threading.Event()  # something accepted a connection at the address

    def ask():
        from distributed.comm.addressing import parse_address, parse_host_port

        scheme, location = parse_address(address, strict=False)
        if scheme in ("tcp", "tls", "ws", "wss"):
            # an unknown host, and a refused connection, said at once (distributed retries until the timeout)
            host, port = parse_host_port(location)
            socket.getaddrinfo(host, port)
            socket.create_connection((host, port), timeout=timeout).close()
            reached.set()
        return asyncio.run(asyncio.wait_for(identity(), timeout + 1))

    pool = ThreadPoolExecutor(1, thread_name_prefix="pertscale-probe")
    try:
        info = pool.submit(ask).result(timeout=timeout + 6)  # the name lookup, then the bounded exchange
    except Exception as err:
        if isinstance(err, TimeoutError) or (isinstance(err, OSError) and not reached.is_set()):
            raise ConnectionError(_unreachable(address, err, timeout)) from None
        # a reply that is not a scheduler's: MemoryError on an HTTP reply, the connection closed, ...
        raise ConnectionError(
            f"{address} answered, but not as a Dask scheduler ({type(err).__name__}): check the port (a "
            "scheduler listens on 8786 unless told otherwise; 8787 is its dashboard)"
        ) from None
    finally:
        pool.shutdown(wait=False)
    kind = info.get("type") if isinstance(info, dict) else None
    if kind in ("Worker", "Nanny"):
        raise ConnectionError(
            f"{address} is a Dask {kind.lower()}, not the scheduler: give the scheduler's address (the one the "
            "workers were started with)"
        )


def _unreachable(address: str, err: BaseException, timeout: float) -> str:
    """The message for an address that gave no answer, naming the likeliest cause found in ``err``'s chain."""
    chain, e = [], err
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    head = f"cannot connect to the Dask scheduler at {address}"
    if any(isinstance(e, ConnectionRefusedError) or "Connection refused" in str(e) for e in chain):
        return (
            f"{head}: connection refused; is a scheduler running there (`dask scheduler` prints its address) and "
            "is the port right?"
        )
    if any(isinstance(e, socket.gaierror) for e in chain):
        return f"{head}: the host name is not known; check its spelling, or give the scheduler's IP address"
    return (
        f"{head}: no answer within {timeout:g} s; check the host and port, that the scheduler is running, and that "
        "this machine can reach it (firewall, VPN), or allow longer with --connect-timeout "
        "(ps.settings.connect_timeout)"
    )


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


_KNOWN = "use 'local', 'synchronous', 'threads', 'processes' or a scheduler address such as 'tcp://127.0.0.1:8786'"


def check_scheduler(scheduler: str | Any | None = None) -> None:
    """Refuse a scheduler that :func:`resolve_scheduler` would refuse, without connecting to anything.

    Every public function that takes ``scheduler=`` calls this first, so
    that a misspelt name fails at the call, before any work, with the
    command line's message. An address is checked for its form only
    (``tcp://HOST:PORT``); whether a scheduler answers there is known when
    it is first used.

    Parameters
    ----------
    scheduler
        As :func:`resolve_scheduler` takes it; ``None`` checks
        ``settings.scheduler``.

    Raises
    ------
    ValueError
        For a name that is not known, or an address that is malformed
        (``'nonsense:xyz'``).
    TypeError
        For a value that is neither a string nor a ``distributed.Client``.
    """
    scheduler = settings.scheduler if scheduler is None else scheduler
    if isinstance(scheduler, str):
        if scheduler == "local" or scheduler in LOCAL_SCHEDULERS:
            return
        if "://" not in scheduler and ":" not in scheduler:
            raise ValueError(f"scheduler {scheduler!r} is not known; {_KNOWN}")
        _check_address(scheduler)
        return
    from distributed import Client

    if not isinstance(scheduler, Client):
        raise TypeError(f"scheduler must be a name, an address or a distributed.Client, not {type(scheduler).__name__}")


def _check_address(address: str) -> None:
    """The form of a scheduler address, as distributed parses it (no connection, no name lookup)."""
    from distributed.comm import registry
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address, strict=False)
        registry.get_backend(scheme)
        if scheme != "inproc":
            _, port = parse_host_port(location)
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is not in 1-65535")
    except ValueError as err:
        reason = str(err)
        if reason.startswith("invalid literal"):  # int() of the port
            reason = f"port {address.rpartition(':')[2]!r} is not a number"
        raise ValueError(
            f"scheduler {address!r} is not a scheduler address ({reason}); give one as 'tcp://HOST:PORT' (the address "
            "`dask scheduler` prints), or use 'local', 'synchronous', 'threads' or 'processes'"
        ) from None


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
        For a name that is none of these (see :func:`check_scheduler`).
    TypeError
        For a value that is neither a string nor a ``distributed.Client``.
    ConnectionError
        For an address where no Dask scheduler answers within
        ``settings.connect_timeout`` seconds (refused, unreachable, not a
        scheduler); the message names the address and what to check.
    """
    scheduler = settings.scheduler if scheduler is None else scheduler
    check_scheduler(scheduler)
    if not isinstance(scheduler, str):
        return scheduler  # a Client
    if scheduler == "local":
        return active_client() or local_client()
    if scheduler in LOCAL_SCHEDULERS:
        return scheduler
    return _address_client(scheduler)


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

    Raises
    ------
    ValueError, TypeError, ConnectionError
        For a scheduler :func:`resolve_scheduler` refuses or cannot reach.
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

        with TqdmCallback(tqdm_class=progress_bar_class(), desc=desc, leave=False, unit="task"):
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
        with progress_bar_class()(total=len(futures), desc=desc, leave=False, unit="chunk") as bar:
            for f in as_completed(futures):
                if f.status == "error":
                    f.result()
                bar.update(1)
    except BaseException:
        for f in futures:  # stop the rest of a failed or interrupted computation
            f.cancel()
        raise


class LogLines(tqdm):
    """A progress bar as plain lines, for a log (a batch job's output, ``2> log``) rather than a terminal.

    tqdm redraws its bar in place with carriage returns, which a log file
    keeps as one ever-growing line. This bar writes a line when it starts,
    then at most one every ``settings.progress_interval`` seconds (at the
    first update after it), and a last one when it closes, each with the
    step, done/total and the time elapsed and left::

        sort into the working store: 40/120 chunks (33%), 01:00 elapsed, about 02:00 left

    It takes tqdm's arguments (``leave`` is ignored: a line once written stays).
    """

    def __init__(self, *args, **kwargs):
        interval = settings.progress_interval
        kwargs.update(mininterval=interval, maxinterval=max(interval, 10.0), miniters=1)
        kwargs["desc"] = kwargs.get("desc") or "computing"
        super().__init__(*args, **kwargs)

    def line(self) -> str:
        """The current state as one line of text."""
        n, total, elapsed = self.n, self.total, self.format_dict["elapsed"]
        unit = "" if self.unit == "it" else f" {self.unit}s"  # tqdm's default unit says nothing
        text = f"{self.desc}: {n:,}/{total:,}{unit} ({100 * n / total:.0f}%)" if total else f"{self.desc}: {n:,}{unit}"
        text += f", {self.format_interval(elapsed)} elapsed"
        if total and 0 < n < total:
            text += f", about {self.format_interval(elapsed / n * (total - n))} left"
        return text

    def display(self, msg=None, pos=None) -> bool:
        """Write the state as one line; ``close`` clearing the bar (``msg=''``) writes nothing."""
        if msg == "":
            return False
        self.fp.write((self.line() if msg is None else msg) + "\n")
        self.fp.flush()
        return True

    def close(self) -> None:
        """Write the last state (unless it was just written), then close."""
        if not self.disable and self.n != self.last_print_n:
            self.display()
        super().close()


def progress_bar_class() -> type:
    """The progress bar's class: tqdm's where stderr is a terminal or a notebook, else :class:`LogLines` (a log)."""
    from tqdm.auto import tqdm as auto

    stream = sys.stderr
    if type(stream).__module__.startswith("ipykernel"):  # a notebook's output: not a tty, but shows widgets
        return auto
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # no stream, or a closed one
        terminal = False
    return auto if terminal else LogLines

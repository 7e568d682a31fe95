"""Where computations run: the face's context (:func:`using`), its choice of scheduler, and the clusters.

Computing is the face's verb: ``pertscale run``, :func:`pertscale.compute`
and :func:`pertscale.write` open :func:`using`, which chooses the scheduler
once (an active ``distributed.Client``; else threads in this process when
the data fit comfortably in memory; else a ``LocalCluster`` with one
single-threaded worker process per core, started on first use and closed
when Python exits) and installs it, with progress bars, through Dask's own
configuration. Below the face, analyses call plain ``dask.compute`` and get
that choice; outside any face they get Dask's current scheduler, as any
Dask code. Worker processes are single-threaded because HDF5 serializes
threads and numba's workqueue threading layer aborts when called from
several threads at once.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import dask

from ._memory import n_cores
from ._progress import in_steps, label, progress_bar_class
from ._settings import LOCAL_SCHEDULERS, check_scheduler, settings

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_clients: dict[str, Any] = {}


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
    # SIGINT blocked while the fork server is started: it starts with it blocked (a signal mask survives exec), so
    # a Ctrl-C during its interpreter's start-up cannot kill it with "Fatal Python error: init_import_site"
    # (pertscale._ignore_sigint unblocks it once ignored); here a Ctrl-C meanwhile waits and is raised after.
    # multiprocessing's resource tracker is started first: starting it blocks SIGINT and then *unblocks* it
    # (around its own start), which would end our block before the fork server starts.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    blocked = hasattr(signal, "pthread_sigmask")
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if blocked else None
    try:
        forkserver.ensure_running()
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
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


def resolve_scheduler(scheduler: str | Any | None = None):
    """Turn a scheduler name into what the face computes with.

    Parameters
    ----------
    scheduler
        ``None`` (use ``settings.scheduler``), ``"local"`` (an active
        ``distributed.Client``, else the package's ``LocalCluster``), one of
        ``"synchronous"``, ``"threads"``, ``"processes"``, a scheduler
        address (``"tcp://..."``) or a ``distributed.Client``. ``"auto"`` is
        chosen by :func:`choose_scheduler`, not here: it resolves as
        ``"local"``.

    Returns
    -------
    str or distributed.Client

    Raises
    ------
    ValueError
        For a name that is none of these.
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
    if scheduler in ("local", "auto"):
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


# --------------------------------------------------------------------------- the face's context

#: Below this many bytes of data in memory, threads in this process beat a process cluster (no start-up,
#: no transfers; the numba kernels release the GIL).
THREADS_BELOW_BYTES = 2 * 2**30

_MAIN_GUARD = re.compile(r"""^\s*if\s+__name__\s*==\s*['"]__main__['"]\s*:""", re.M)


def processes_blocked() -> str | None:
    """Why worker processes cannot start from this program, or ``None`` when they can.

    Worker processes (started by a fork server or spawned) import the main
    module again: a script without an ``if __name__ == "__main__":`` guard
    runs again in each of them, the ``<stdin>`` of ``python -`` cannot be
    imported, and a frozen interpreter has no script to import. A notebook,
    the interactive prompt and ``python -c`` have no main file, and nothing
    is imported again.
    """
    if getattr(sys, "frozen", False):
        return "this is a frozen interpreter, which cannot start worker processes"
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None:
        return None
    if not os.path.isfile(path):
        return f"the main program is {path!r} (python -), which worker processes cannot import"
    try:
        text = open(path, encoding="utf-8", errors="replace").read()  # noqa: SIM115 - read once
    except OSError:
        return None
    if _MAIN_GUARD.search(text):
        return None
    return (
        f'the script {os.path.basename(path)!r} has no `if __name__ == "__main__":` guard, and worker processes '
        "would run it again"
    )


def choose_scheduler(scheduler: str | Any | None = None, *, nbytes: int | None = None):
    """The scheduler the face computes with: as asked, else an active client, else from the data's size.

    Parameters
    ----------
    scheduler
        As :func:`resolve_scheduler` takes it; ``None`` (or ``"auto"``) chooses.
        ``"local"`` (and ``"auto"`` for large data) starts the local process
        cluster, unless worker processes cannot start from this program
        (:func:`processes_blocked`): then threads, said once in one line.
    nbytes
        Bytes of the data in memory (for sparse matrices, about 12 bytes per
        non-zero), when known. Below :data:`THREADS_BELOW_BYTES` (or unknown)
        threads in this process; above, the local process cluster.

    Returns
    -------
    tuple
        ``(scheduler, reason)``: what :func:`resolve_scheduler` returns, and
        why it was chosen (for the log and the plan).

    Raises
    ------
    ValueError, TypeError, ConnectionError
        As :func:`resolve_scheduler`.
    """
    scheduler = settings.scheduler if scheduler is None else scheduler
    check_scheduler(scheduler)
    if scheduler not in ("auto", "local"):
        return resolve_scheduler(scheduler), "asked for"
    client = active_client()
    if client is not None:
        return client, "the active distributed.Client"
    if scheduler == "auto" and (nbytes is None or nbytes < THREADS_BELOW_BYTES):
        size = "" if nbytes is None else f" ({nbytes / 2**30:.2f} GiB in memory)"
        return "threads", f"the data fit in memory{size}: threads in this process"
    blocked = processes_blocked()
    if blocked is not None:  # said once per program: the run goes on
        if not _said_blocked:
            _said_blocked.append(blocked)
            logger.warning("pertscale computes with threads in this process, not worker processes: %s", blocked)
        return "threads", f"threads in this process ({blocked})"
    if scheduler == "local":
        return local_client(), "asked for"
    return local_client(), f"the data do not fit comfortably in memory ({nbytes / 2**30:.1f} GiB): the local cluster"


_said_blocked: list[str] = []


@dataclass(frozen=True)
class Context:
    """What :func:`using` chose: the scheduler (a name or a ``distributed.Client``), progress bars, and why."""

    scheduler: Any
    progress: bool
    reason: str

    @property
    def n_workers(self) -> int:
        """Tasks that run at once (worker processes, or threads of this process)."""
        return n_workers_of(self.scheduler)


_context: contextvars.ContextVar[Context | None] = contextvars.ContextVar("pertscale_context", default=None)


def current() -> Context | None:
    """The context of the innermost :func:`using` block, or ``None`` outside one."""
    return _context.get()


@contextmanager
def using(scheduler: str | Any | None = None, *, progress: bool | None = None, nbytes: int | None = None):
    """Compute inside the block on one scheduler, with progress bars: the face's context.

    Every Dask computation inside, ``dask.compute`` and ``.compute()`` made
    by the analyses included, runs on the chosen scheduler (through Dask's
    own ``dask.config.set(scheduler=...)`` and ``Client.as_current()``) and
    draws a progress bar (tqdm's in a terminal or notebook, plain lines in a
    log). On a ``distributed.Client`` the control summaries of a test are
    computed first and copied to every worker. A ``using`` block inside
    another one, without arguments, keeps the outer one's choice.

    Parameters
    ----------
    scheduler
        ``None`` / ``"auto"`` (``ps.settings.scheduler``'s default): an
        active ``distributed.Client``, else threads in this process when
        ``nbytes`` fits comfortably in memory (or is unknown), else the local
        process cluster; when worker processes cannot start (a script without
        a main guard, ``python -``, a frozen interpreter) threads, said in
        one line. Or a name or client as :func:`resolve_scheduler` takes.
    progress
        Progress bars; default ``ps.settings.progress``.
    nbytes
        The data's size in memory, for the choice.

    Yields
    ------
    Context
        The scheduler chosen and why.

    Raises
    ------
    ValueError, TypeError, ConnectionError
        For a scheduler that is not known or does not answer.

    Examples
    --------
    >>> with ps.cluster.using("threads"):               # doctest: +SKIP
    ...     ps.pp.pca(adata)                             # its pass runs on threads, with a bar
    """
    outer = _context.get()
    if outer is not None and scheduler is None and progress is None:
        yield outer
        return
    chosen, reason = choose_scheduler(scheduler, nbytes=nbytes)
    context = Context(chosen, settings.progress if progress is None else bool(progress), reason)
    logger.info("computing on %s: %s", chosen if isinstance(chosen, str) else "a distributed.Client", reason)
    token = _context.set(context)
    try:
        with ExitStack() as stack:
            if is_distributed(chosen):
                stack.enter_context(chosen.as_current())
            stack.enter_context(dask.config.set(scheduler=_Runner(context)))
            yield context
    finally:
        _context.reset(token)


class _Runner:
    """The scheduler function :func:`using` installs: runs a graph on the chosen scheduler with a bar.

    Dask calls it as any scheduler's ``get(graph, keys, **kwargs)``.
    """

    def __init__(self, context: Context) -> None:
        self.context = context

    def __reduce__(self):
        """Pickled as ``None`` (Dask's default scheduler).

        distributed hands a copy of Dask's configuration to every worker
        process it starts or restarts (a lost worker's replacement, inside a
        ``using`` block); the runner holds the client, which cannot be
        pickled, and a worker computes on its own scheduler anyway.
        """
        return (type(None), ())

    @property
    def n_workers(self) -> int:
        """Tasks that run at once (read by loops below the face through Dask's config)."""
        return self.context.n_workers

    def __call__(self, graph, keys, **kwargs):
        scheduler, show = self.context.scheduler, self.context.progress and not in_steps()
        desc = label() or _describe(graph)
        if is_distributed(scheduler):
            return _run_distributed(scheduler, graph, keys, progress=show, desc=desc, **kwargs)
        get = dask.base.named_schedulers["sync" if scheduler == "synchronous" else scheduler]
        if not show:
            return get(graph, keys, **kwargs)
        with warnings.catch_warnings():  # tqdm.dask imports tqdm.auto, which warns in a kernel without ipywidgets
            warnings.simplefilter("ignore")
            from tqdm.dask import TqdmCallback

        with TqdmCallback(tqdm_class=progress_bar_class(), desc=desc, leave=False, unit="task"):
            return get(graph, keys, **kwargs)


def _describe(graph) -> str:
    """A progress bar's label from the names of the graph's last layers (``cell_stats``, ...), cheaply."""
    from dask.highlevelgraph import HighLevelGraph
    from dask.utils import key_split

    names: list[str] = []
    todo, seen = [graph], 0
    while todo and seen < 50:  # the expression tree's first few levels hold the graph's layers
        expr, seen = todo.pop(), seen + 1
        for operand in getattr(expr, "operands", ()):
            if isinstance(operand, HighLevelGraph):
                names.extend(key_split(name) for name in operand.layers)
        todo.extend(getattr(expr, "dependencies", list)())
    generic = ("finalize", "hlgfinalize", "sum", "mean", "getitem", "rechunk", "concatenate", "stack", "astype")
    names = [n for n in dict.fromkeys(reversed(names)) if n and not n.startswith(generic)]
    return ", ".join(names[:2]) or "computing"


def _run_distributed(client, graph, keys, *, progress: bool, desc: str, **kwargs):
    """Run a graph on a ``distributed.Client``: control summaries first, on every worker; then the rest, with a bar.

    A control summary is needed by every block task. Left to the scheduler,
    each worker would fetch it from the one worker that made it; computed
    first and replicated, every worker holds its own copy before the pass
    starts, and the pass's graph (the same keys) uses them while they are
    held.
    """
    from .tl._engine import SUMMARY_PREFIX

    tasks = graph.__dask_graph__() if hasattr(graph, "__dask_graph__") else graph
    summaries = [k for k in tasks.keys() if isinstance(k, str) and k.startswith(SUMMARY_PREFIX)]
    held = []
    if summaries:
        held = client.get(graph, summaries, sync=False, **kwargs)
        _wait(held, progress=progress, desc="control summary")
        if len(client.scheduler_info().get("workers", {})) > 1:
            client.replicate(held)
    futures = client.get(graph, keys, sync=False, **kwargs)
    _wait(futures, progress=progress, desc=desc, client=client)
    result = client.gather(futures)
    del held
    return result


def _wait(futures, *, progress: bool, desc: str | None, client=None) -> None:
    """Wait for futures (nested as Dask returns them), with a bar; a failed one raises here.

    With ``client``, the bar counts every task of the graph behind the
    futures as the scheduler reports them (:class:`_SchedulerFeed`), not
    only the futures themselves (one, after Dask's finalize).
    """
    from dask.core import flatten
    from distributed import as_completed

    futures = list(flatten(futures))
    feed = None
    try:
        with progress_bar_class()(
            total=len(futures), desc=desc, leave=False, unit="task" if client else "chunk", disable=not progress
        ) as bar:
            if progress and client is not None:
                feed = _SchedulerFeed(futures, client, bar)
            for f in as_completed(futures):
                if f.status == "error":
                    f.result()  # raises the task's exception here
                if feed is None:
                    bar.update(1)
            if feed is not None:
                feed.stop()
                bar.update(bar.total - bar.n)  # all done, whatever the last report said
    except BaseException:
        for f in futures:  # stop the rest of a failed or interrupted computation
            f.cancel()
        raise
    finally:
        if feed is not None:
            feed.stop()


class _SchedulerFeed:
    """Counts of a graph's tasks (all of them, and those left) as the scheduler reports them, into a bar.

    distributed's own progress bars are fed this way (``ProgressBar.listen``:
    the scheduler's ``feed`` of a :class:`distributed.diagnostics.progress.Progress`
    over the futures and every task they depend on); here the bar is ours,
    so that it looks the same on every scheduler (tqdm's, or lines in a log).
    """

    def __init__(self, futures, client, bar) -> None:
        from distributed.diagnostics.progressbar import ProgressBar

        feed = self

        class _Listener(ProgressBar):
            def _draw_bar(self, remaining, all, **kwargs):  # noqa: A002 - distributed's keyword
                feed.report(int(all), int(all) - int(remaining))

        self.bar, self.lock, self.stopped = bar, threading.Lock(), False
        interval = min(max(settings.progress_interval, 0.05), 1.0)
        self.listener = _Listener(futures, scheduler=client.scheduler.address, interval=interval, complete=True)
        self.loop = client.loop
        self.loop.add_callback(self._listen)

    async def _listen(self) -> None:
        try:
            await self.listener.listen()
        except Exception:  # noqa: BLE001 - a bar must never fail a computation
            logger.debug("the progress feed stopped", exc_info=True)

    def report(self, total: int, done: int) -> None:
        """Called on the client's event loop with the scheduler's counts."""
        with self.lock:
            if self.stopped:
                return
            if total > (self.bar.total or 0):
                self.bar.total = total
            if done > self.bar.n:
                self.bar.update(done - self.bar.n)

    def stop(self) -> None:
        """No more reports into the bar; close the connection to the scheduler."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
        comm = getattr(self.listener, "comm", None)
        if comm is not None:
            self.loop.add_callback(comm.abort)


def compute(*collections, scheduler=None, progress: bool | None = None, nbytes: int | None = None):
    """Compute Dask collections at the face: inside :func:`using` (the outer block's choice, if there is one).

    Parameters
    ----------
    *collections
        Dask collections (arrays, delayed objects).
    scheduler, progress, nbytes
        As :func:`using` takes them.

    Returns
    -------
    tuple
        The computed values, one per collection.

    Raises
    ------
    ValueError, TypeError, ConnectionError
        For a scheduler that is not known or does not answer.
    """
    with using(scheduler, progress=progress, nbytes=nbytes):
        return dask.compute(*collections)

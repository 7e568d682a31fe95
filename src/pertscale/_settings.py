"""Package-wide settings: scheduler, progress bars, chunk budget, connection timeout.

A leaf module: it imports nothing of pertscale above :mod:`pertscale._validation`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

#: Scheduler names dask runs in this process (``"processes"``: a pool of processes of dask's own).
LOCAL_SCHEDULERS = ("synchronous", "threads", "processes")
#: Every scheduler name pertscale takes besides an address or a ``distributed.Client``.
SCHEDULER_NAMES = ("auto", "local", *LOCAL_SCHEDULERS)
_KNOWN = (
    "use 'auto', 'local', 'synchronous', 'threads', 'processes' or a scheduler address such as 'tcp://127.0.0.1:8786'"
)


def check_scheduler(scheduler: str | Any | None) -> None:
    """Refuse a scheduler that no computation could use, without connecting to anything.

    An address is checked for its form only (``tcp://HOST:PORT``); whether a
    scheduler answers there is known when it is first used.

    Raises
    ------
    ValueError
        For a name that is not known, or an address that is malformed
        (``'nonsense:xyz'``).
    TypeError
        For a value that is neither a string nor a ``distributed.Client``.
    """
    if scheduler is None:
        return
    if isinstance(scheduler, str):
        if scheduler in SCHEDULER_NAMES:
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
            "`dask scheduler` prints), or use 'auto', 'local', 'synchronous', 'threads' or 'processes'"
        ) from None


@dataclass
class Settings:
    """Defaults used when a function is not told otherwise.

    Setting a value out of range raises ``ValueError`` (``TypeError`` for
    one of the wrong type) at once.

    Attributes
    ----------
    scheduler
        Where the face (``pertscale run``, :func:`pertscale.compute`,
        :func:`pertscale.write`, :func:`pertscale.cluster.using`) computes.
        ``"auto"`` (default): an active ``distributed.Client`` if there is
        one, else chosen from the plan: threads in this process for data
        that fit comfortably in memory, the local process cluster for
        larger ones. ``"local"``: the local process cluster (a
        ``LocalCluster`` with one single-threaded worker process per core,
        started on first use). ``"synchronous"``, ``"threads"``,
        ``"processes"``: dask's own; or a scheduler address such as
        ``"tcp://10.0.0.5:8786"``. A name that is none of these is refused
        when set. Analyses called outside the face compute (their small
        reductions) on Dask's current scheduler, as any Dask code.
    progress
        Show a progress bar on computations over the matrix: tqdm's where
        stderr is a terminal (or in Jupyter), else plain lines (a log).
    progress_interval
        Seconds between two lines of progress when stderr is not a
        terminal (a batch job's log, ``2> log``); ``> 0``.
    connect_timeout
        Seconds to wait for a scheduler address to answer before failing
        with a message that names it (``pertscale run --connect-timeout``);
        ``> 0``.
    n_workers
        Worker processes of the default local cluster; ``None`` uses the
        number of cores.
    memory_fraction
        Fraction of a worker's memory that the block size may plan for
        (:func:`pertscale._memory.block_rows`, used by :func:`pertscale.read`,
        the analyses and ``pertscale run``); in ``(0, 1]``.
    """

    scheduler: str = "auto"
    progress: bool = True
    progress_interval: float = 30.0
    connect_timeout: float = 5.0
    n_workers: int | None = None
    memory_fraction: float = 0.6

    def __setattr__(self, name: str, value) -> None:
        """Validate as the value is set: a bad setting fails here, not in a later computation."""
        from ._validation import check_number

        if name == "n_workers":
            value = check_number(value, "settings.n_workers", integer=True, minimum=1, allow_none=True)
        elif name == "memory_fraction":
            value = check_number(value, "settings.memory_fraction", minimum=0, min_open=True, maximum=1)
        elif name == "progress" and not isinstance(value, bool):
            raise TypeError(f"settings.progress must be True or False, got {value!r}")
        elif name in ("progress_interval", "connect_timeout"):
            value = check_number(value, f"settings.{name}", minimum=0, min_open=True)
        elif name == "scheduler":
            if value is None:
                raise TypeError("settings.scheduler must be a name, an address or a distributed.Client, not None")
            check_scheduler(value)
        super().__setattr__(name, value)

    @contextmanager
    def override(self, **changes) -> Iterator[Settings]:
        """Temporarily change settings: ``with ps.settings.override(progress=False): ...``."""
        names = {f.name for f in fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise TypeError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(names)}")
        old = {k: getattr(self, k) for k in changes}
        for k, v in changes.items():
            setattr(self, k, v)
        try:
            yield self
        finally:
            for k, v in old.items():
                setattr(self, k, v)


settings = Settings()

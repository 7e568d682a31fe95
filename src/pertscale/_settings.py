"""Package-wide settings: scheduler, progress bars, chunk budget, connection timeout."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields


@dataclass
class Settings:
    """Defaults used when a function is not told otherwise.

    Attributes
    ----------
    scheduler
        ``"local"`` (default: an active ``distributed.Client`` if there is
        one, else a ``LocalCluster`` started on first use with one
        single-threaded worker process per core), ``"synchronous"``,
        ``"threads"``, ``"processes"``, or a scheduler address such as
        ``"tcp://10.0.0.5:8786"``. A name that is none of these is
        refused when set.
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
        Fraction of the available memory that the automatic chunk size may
        plan for, spread over the workers; in ``(0, 1]``.

    Setting a value out of range raises ``ValueError`` (``TypeError`` for
    one of the wrong type) at once.
    """

    scheduler: str = "local"
    progress: bool = True
    progress_interval: float = 30.0
    connect_timeout: float = 5.0
    n_workers: int | None = None
    memory_fraction: float = 0.5

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
        elif name == "scheduler" and value != "local":  # the default needs no check (nor, while this loads, an import)
            from .cluster import check_scheduler

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

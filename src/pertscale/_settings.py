"""Package-wide settings: scheduler, progress bars, chunk budget."""

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
        ``"tcp://10.0.0.5:8786"``.
    progress
        Show a progress bar on computations over the matrix.
    n_workers
        Worker processes of the default local cluster; ``None`` uses the
        number of cores.
    memory_fraction
        Fraction of the available memory that the automatic chunk size may
        plan for, spread over the workers.
    """

    scheduler: str = "local"
    progress: bool = True
    n_workers: int | None = None
    memory_fraction: float = 0.5

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

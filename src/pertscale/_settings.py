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
        plan for, spread over the workers; in ``(0, 1]``.

    Setting a value out of range raises ``ValueError`` (``TypeError`` for
    one of the wrong type) at once.
    """

    scheduler: str = "local"
    progress: bool = True
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

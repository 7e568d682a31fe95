"""Time and memory of the main job, per stage and per process: what ``run.json`` records and the report draws.

A :class:`Profile` times each stage (``with profile.stage("sort"):``) and,
from a background thread, samples every :data:`INTERVAL` seconds the
resident memory (RSS) of this process and of its child processes (the
workers of a local cluster), keeping the peak of each process in each
stage. Workers that are not children of this process (a SLURM or remote
cluster) are read from the active ``distributed.Client``'s scheduler, which
reports each worker's memory as its heartbeat last saw it. Sampling reads
``/proc`` through psutil; it costs well under a millisecond per tick.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import psutil

#: Seconds between two samples of the processes' memory.
INTERVAL = 0.25
#: The stage memory is charged to outside every timed stage (starting the cluster, planning, the report).
OTHER = "other"
#: Child processes that are not workers (multiprocessing's bookkeeping).
_NOT_WORKERS = ("resource_tracker", "semaphore_tracker")
#: A fork server's command line: the server itself is no worker, the processes it forks are (they keep its line).
_FORK_SERVER = "multiprocessing.forkserver"
#: Seconds between two questions to a remote cluster's scheduler (its workers report memory at each heartbeat).
REMOTE_INTERVAL = 2.0


class Profile:
    """Seconds per stage and peak resident memory per process and stage of one run.

    Attributes
    ----------
    seconds
        Stage name -> seconds, in the order the stages first ran (a stage
        entered twice adds up).
    """

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self.seconds: dict[str, float] = {}
        self._starts: dict[str, float] = {}
        self._t0 = time.perf_counter()
        self._stage = OTHER
        self._peaks: dict[str, dict[str, int]] = {}  # process name -> stage -> bytes
        self._pids: dict[tuple, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._me = psutil.Process()
        self._asked = 0.0

    def start(self) -> Profile:
        """Start sampling memory in a daemon thread; returns ``self``."""
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="pertscale-profile", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take a last sample and stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._sample()

    @contextmanager
    def stage(self, name: str):
        """Time the ``with`` block as stage ``name`` and charge the memory sampled meanwhile to it."""
        previous = self._stage
        start = time.perf_counter()
        self._starts.setdefault(name, start - self._t0)
        with self._lock:
            self._stage = name
        self._sample()
        try:
            yield
        finally:
            self._sample()
            with self._lock:
                self._stage = previous
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - a failed sample must never stop the run
                continue

    def _record(self, name: str, rss: int) -> None:
        stages = self._peaks.setdefault(name, {})
        if rss > stages.get(self._stage, 0):
            stages[self._stage] = int(rss)

    def _name(self, child: psutil.Process) -> str:
        """``"worker N"`` for a worker process, ``""`` for multiprocessing's own (the fork server, trackers)."""
        line = " ".join(child.cmdline())
        if any(word in line for word in _NOT_WORKERS):
            return ""
        if _FORK_SERVER in line and child.ppid() == self._me.pid:  # the server; what it forks are workers
            return ""
        return f"worker {sum(1 for v in self._pids.values() if v) + 1}"

    def _sample(self) -> None:
        children = 0
        with self._lock:
            try:
                self._record("main", self._me.memory_info().rss)
            except psutil.Error:  # pragma: no cover - our own process
                return
            for child in self._me.children(recursive=True):
                try:
                    key = (child.pid, child.create_time())
                    if key not in self._pids:
                        self._pids[key] = self._name(child)
                    if self._pids[key]:
                        self._record(self._pids[key], child.memory_info().rss)
                        children += 1
                except psutil.Error:  # it ended meanwhile
                    continue
            stage = self._stage
        now = time.monotonic()
        if not children and now - self._asked >= REMOTE_INTERVAL:
            self._asked = now
            self._remote_workers(stage)

    def _remote_workers(self, stage: str) -> None:
        """Workers that are not our children: their memory as the active client's scheduler last heard it.

        Asked outside the lock (a stage change never waits for the scheduler),
        at most every :data:`REMOTE_INTERVAL` seconds; the answer is charged
        to the stage it was asked in.
        """
        try:
            from distributed import get_client

            client = get_client()
        except (ImportError, ValueError):
            return
        try:
            workers = client.scheduler_info(n_workers=-1).get("workers", {})
        except Exception:  # noqa: BLE001 - a scheduler that does not answer now is asked again later
            return
        with self._lock:
            for address, info in workers.items():
                memory = (info.get("metrics") or {}).get("memory")
                if memory:
                    peaks = self._peaks.setdefault(f"worker {info.get('name', address)}", {})
                    peaks[stage] = max(peaks.get(stage, 0), int(memory))

    def to_dict(self) -> dict:
        """``run.json``'s ``profile``: stages (name, start and seconds from the run's start) and processes' peaks.

        ``{"interval": s, "stages": [{"name", "start", "seconds"}], "processes":
        [{"name": "main" | "worker N", "peak_rss": {stage: bytes}}]}``; the
        peak of the whole run is ``max(peak_rss.values())``.
        """
        with self._lock:
            processes = [{"name": name, "peak_rss": dict(stages)} for name, stages in self._peaks.items()]
        stages = [{"name": k, "start": round(self._starts.get(k, 0.0), 3), "seconds": round(v, 3)}
                  for k, v in self.seconds.items()]  # fmt: skip
        return {"interval": self.interval, "stages": stages, "processes": processes}

"""The main job's output directory: its files, checked first, written all at once or not at all.

:func:`output_files` names what a run writes into ``--out``;
:class:`OutputDir` refuses an ``out`` that cannot take them (an input, a
file in the way, another run's lock, an earlier run's results without
``overwrite``), stages the files in a hidden directory inside ``out`` and
moves them into place together (:meth:`OutputDir._commit`), recording them
in ``out/.pertscale-manifest.json``; a failed run leaves nothing, and keeps
its written result blocks for ``resume``. :class:`DiskFullError` is the
one-line error of a disk that fills up meanwhile. Single files are written
with :func:`pertscale.io._atomic.replacing` (beside, then renamed).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from .. import _signals, tl
from ..io._atomic import remove, replacing
from ..io._write import check_not_input, overlap
from ._plan import Plan, _gib

logger = logging.getLogger(__name__)

#: The tests the main job runs, by ``--method`` name: those of :func:`pertscale.tl.rank_genes_groups`.
METHODS = tuple(tl.METHODS)
#: The optional steps of the main job and the file each writes.
STEP_FILES = {
    "hvg": "genes.csv",
    "pca": "pca.zarr",
    "pseudobulk": "pseudobulk.h5ad",
    "guides": "guides.parquet",
    "calibration": "calibration.csv",
    "energy_distance": "energy_distance.csv",
    "guide_de": "de_guides.zarr",
}
#: What the run did (settings, versions, numbers, profile): read by the report and :func:`pertscale.report`.
RUN_RECORD = "run.json"
#: The run's report, one self-contained HTML page.
REPORT = "report.html"


def output_files(methods: Iterable[str], steps: Iterable[str] = (), *, report: bool = True) -> dict[str, str]:
    """The files the main job writes for ``methods`` and ``steps``, keyed ``results:METHOD``, ``h5ad:METHOD``, ...

    Per method ``de_<method>.zarr`` (always), ``de_<method>.h5ad`` (where
    scanpy's view fits) and ``de_<method>_significant.csv``, with ``-`` in
    the method's name written ``_``, with ``de_<method>.parquet`` (every
    pair, long), ``de_<method>_effects.csv`` (one row per perturbation) and
    ``de_<method>_knockdown.csv`` (each perturbation's own target);
    ``knockdown_cells.parquet`` (each perturbed cell's knock-down score and
    escaper flag), ``qc.csv`` and ``qc_cells.zarr`` (the per-cell QC
    metrics) once; with nb-glm, ``size_factors.csv``; per
    optional step (``hvg``, ``pca``, ``pseudobulk``) its file of
    :data:`STEP_FILES`; ``run.json`` (what the run did, its settings,
    versions and profile) and, with ``report``, ``report.html``.
    """
    methods = list(methods)
    files = {}
    for method in methods:
        stem = "de_" + method.replace("-", "_")
        files |= {
            f"results:{method}": f"{stem}.zarr",
            f"h5ad:{method}": f"{stem}.h5ad",
            f"significant:{method}": f"{stem}_significant.csv",
            f"long:{method}": f"{stem}.parquet",
            f"effects:{method}": f"{stem}_effects.csv",
            f"knockdown:{method}": f"{stem}_knockdown.csv",
        }
    files["knockdown_cells"] = "knockdown_cells.parquet"
    if "nb-glm" in methods:
        files["size_factors"] = "size_factors.csv"
    files |= {step: STEP_FILES[step] for step in steps} | {"qc": "qc.csv", "qc_cells": "qc_cells.zarr"}
    if "calibration" in steps:  # the p-values of the control splits, for the QQ plot
        files["calibration_pvalues"] = "calibration_pvalues.parquet"
    if "guide_de" in steps:  # each guide against control, and the agreement of the guides of a target
        files["guide_concordance"] = "guide_concordance.csv"
    return files | {"run": RUN_RECORD} | ({"report": REPORT} if report else {})


#: Every name the main job can write into ``--out`` (of any method and step): what may be in a run's way.
OUTPUT_NAMES = frozenset(output_files(METHODS, STEP_FILES).values())


def write_csv(frame: pd.DataFrame, path: Path, **options) -> None:
    """Write ``frame`` to ``path`` as CSV (``pandas.DataFrame.to_csv`` ``options``; no index by default), atomically."""
    with replacing(path) as tmp:
        frame.to_csv(tmp, **({"index": False} | options))


class DiskFullError(OSError, MemoryError):
    """The disk filled up while the main job wrote (ENOSPC): one line naming the directory and the space needed.

    An :class:`OSError` (``errno.ENOSPC``) and, like the plan's refusal of
    a run that does not fit the disk, a :class:`MemoryError`.
    """


def no_space(err: BaseException) -> OSError | None:
    """The "no space left on device" error (errno 28) in ``err`` or what caused it, as zarr, dask or h5py wrap it."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return None


def disk_full(err: OSError, *, out: Path, store: Path, plan: Plan) -> DiskFullError:
    """The one-line error of a disk that filled up, naming the directory and the space the plan counted for it."""
    where = Path(err.filename) if isinstance(err.filename, str | os.PathLike) else None

    def free_now(directory: Path) -> int:
        return shutil.disk_usage(next((p for p in (directory, *directory.parents) if p.exists()), Path("."))).free

    if plan.disk_free_working is None:  # one disk for both
        on_store_disk = False
    elif where is not None:
        on_store_disk = store.parent.resolve() in where.resolve().parents
    else:  # not said: the disk with less space left
        on_store_disk = free_now(store) < free_now(out)
    if on_store_disk:
        flag, directory, need, free = "--working-store", store, plan.disk_needed_working, plan.disk_free_working
    else:
        flag, directory, need, free = "--out", out, plan.disk_needed, plan.disk_free
    now = free_now(directory)
    writing = None
    if where is not None:  # from the output's name on (not the run's staging directory)
        first = next((i for i, p in enumerate(where.parts) if p in OUTPUT_NAMES or p == store.name), None)
        writing = "/".join(where.parts[first:]) if first is not None else str(where)
    full = DiskFullError(
        f"no space left on the disk of {flag} {str(directory)!r}"
        + (f" while writing {writing}" if writing else "")
        + f": the plan counted about {_gib(need)} for the run there, {_gib(free)} were free when it started, "
        f"{_gib(now)} are now; "
        f"free space, or choose {flag} on a larger disk; no results were written"
    )
    full.errno = errno.ENOSPC
    return full


def _identity(path: Path) -> dict | None:
    """What identifies ``path`` as the file (or ``.zarr`` directory) a run wrote; ``None`` if it is not there.

    A file: its size and modification time (ns). A directory: the number
    of files in it, their total size, their latest modification time and a
    digest of their relative names (so a file changed, added, removed or
    renamed inside shows). Symbolic links are not followed.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if stat.S_ISREG(st.st_mode):
        return {"type": "file", "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    if not stat.S_ISDIR(st.st_mode):
        return {"type": "other"}  # a link or a special file: never one a run wrote
    names = hashlib.sha256()
    n = size = mtime = 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            file = os.path.join(root, name)
            s = os.lstat(file)
            names.update(os.path.relpath(file, path).encode() + b"\0")
            n, size, mtime = n + 1, size + s.st_size, max(mtime, s.st_mtime_ns)
    return {"type": "directory", "files": n, "bytes": size, "mtime_ns": mtime, "names": names.hexdigest()}


def unwritable(directory: Path, *, probe: bool) -> str | None:
    """Why no file can be made in ``directory`` (an existing path), or ``None``.

    From its mode and its file system's read-only flag; with ``probe``,
    also by making (and removing) an empty directory there, which catches
    what the mode does not show (network file systems, ACLs).
    """
    if not directory.is_dir():
        return "not a directory"
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except (OSError, AttributeError):  # pragma: no cover - no statvfs
        pass
    if not os.access(directory, os.W_OK | os.X_OK):
        return "permission denied"
    if probe:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".pertscale-probe-", dir=directory))
        except OSError as err:
            return err.strerror or str(err)
    return None


class OutputDir:
    """The main job's output directory: checked first, filled all at once or not at all.

    Files are written into a hidden staging directory inside ``out`` and
    moved into place only when every one of them is written, so a failed or
    interrupted run leaves no partial results. A lock file keeps two runs
    from writing into the same ``out`` at once. Directories this run
    created are removed again if it fails.

    Each successful run records the files it wrote, with what identifies
    each (:func:`_identity`), in ``out/.pertscale-manifest.json``, written
    atomically as the last step of the commit. Only such files, unchanged
    since, are "results of an earlier run": replaced with ``overwrite``
    (all of them, also those of other methods, so that none is mixed with
    the new ones; restored if a move fails half-way), refused without it.
    A file at a name the job writes that no manifest lists, or that changed
    since, is never replaced or removed, not even with ``overwrite``: the
    run is refused, naming it. Other files (notes, a user's
    ``de_my_scanpy.h5ad``) are never touched.
    """

    LOCK = ".pertscale.lock"
    #: Where an interrupted run keeps its partly written result stores for ``resume``.
    PARTIAL = ".pertscale-partial"
    #: The record of the files the last successful run wrote (names, sizes, times).
    MANIFEST = ".pertscale-manifest.json"

    def __init__(
        self, out: Path, *, files: dict[str, str], inputs: list[Path], overwrite: bool, resume: bool = False
    ) -> None:
        """Nothing is checked or created before ``with``; ``files`` as :func:`output_files` names them."""
        self.out = Path(out)
        self.files = files
        self.inputs = inputs
        self.overwrite = overwrite
        self.resume = resume
        self.created: list[Path] = []
        self.staging: Path | None = None
        self._lock = None

    def check_paths(self) -> None:
        """Refuse an ``out`` that is a file, a dangling link, or would overwrite or lie inside an input.

        Raises
        ------
        ValueError
            Naming the path and the fix.
        """
        out = self.out
        if out.is_symlink() and not out.exists():
            raise ValueError(f"--out {str(out)!r} is a symbolic link to a missing path; choose an existing directory")
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {str(out)!r} is a file, not a directory; choose a directory")
        for source in self.inputs:
            check_not_input(out, [source], what="--out", replaces=False)
            for name in self.files.values():
                if overlap(out / name, source):
                    raise ValueError(
                        f"--out {str(out)!r} would overwrite the input {str(source)!r} (the job writes {name} "
                        "there); inputs are never modified: choose another --out"
                    )

    def __enter__(self) -> OutputDir:
        out = self.out
        self.check_paths()
        missing = [d for d in (out, *out.parents) if not d.exists()]  # deepest first
        try:
            try:
                out.mkdir(parents=True, exist_ok=True)
            finally:
                self.created = [d for d in missing if d.exists()]
            self._take_lock()
            self._check_contents()
            for stale in out.glob(".pertscale-run-*"):  # of runs that ended: we hold the lock, none is running
                shutil.rmtree(stale, ignore_errors=True)
            self.staging = Path(tempfile.mkdtemp(prefix=".pertscale-run-", dir=out))
            partial = out / self.PARTIAL
            if self.resume and partial.is_dir():  # the stores an interrupted run left: continued, not redone
                for item in partial.iterdir():
                    os.replace(item, self.staging / item.name)
                partial.rmdir()
                logger.info("resuming from the result blocks an interrupted run wrote")
            elif self.resume:
                logger.info("nothing to resume in %s (no interrupted run left blocks): starting from the start", out)
        except OSError as err:
            self._release()
            if isinstance(err, FileExistsError) or err.errno == errno.ENOSPC:
                raise
            raise PermissionError(self._unwritable_message(err.strerror or str(err))) from err
        except BaseException:
            self._release()
            raise
        return self

    def refusal(self) -> str | None:
        """Why entering would refuse the run as ``out`` is now, or ``None``; nothing on disk changes.

        What ``--dry-run`` reports: an ``out`` that cannot be written,
        another run's lock, files in the way, results of an earlier run
        without ``overwrite``, a ``resume`` with nothing to resume.
        """
        out = self.out
        try:
            self.check_paths()
            where = next((p for p in (out, *out.parents) if p.exists()), Path("."))
            reason = unwritable(where, probe=False)
            if reason:
                return self._unwritable_message(reason if where == out else f"{str(where)!r}: {reason}")
            if out.is_dir():
                self._check_lock_free()
                self._check_contents()
        except (OSError, ValueError) as err:
            return str(err)
        return None

    def _unwritable_message(self, reason: str) -> str:
        return f"cannot write to output directory {str(self.out)!r} ({reason}); choose a writable --out"

    def _lock_message(self) -> str:
        return (
            f"another pertscale run is writing to --out {str(self.out)!r} (it holds {self.LOCK}); "
            "wait for it to finish or choose another --out"
        )

    def _take_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        self._lock = open(self.out / self.LOCK, "a")  # noqa: SIM115 - held until _release
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise ValueError(self._lock_message()) from None

    def _check_lock_free(self) -> None:
        """Raise if another run holds the lock (without creating the lock file)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        try:
            handle = open(self.out / self.LOCK)  # noqa: SIM115 - closed below
        except OSError:
            return  # no lock file: no run holds it
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(self._lock_message()) from None

    def _survey(self) -> tuple[list[str], dict[str, str]]:
        """The outputs of an earlier run in ``out``, and the files in the way with why each may not be replaced.

        Earlier outputs: names the job writes (of any method or step) that
        the manifest lists, unchanged since. In the way: files at such names
        that it does not list (or that changed since).
        """
        try:
            record = json.loads((self.out / self.MANIFEST).read_text())
            written = record.get("written") if isinstance(record, dict) else None
            recorded = written if isinstance(written, dict) else {}
        except FileNotFoundError:
            recorded = None
        except (OSError, ValueError):  # a damaged record vouches for nothing
            recorded = {}
        earlier, foreign = [], {}
        for name in sorted(OUTPUT_NAMES):
            path = self.out / name
            if not os.path.lexists(path):
                continue
            if recorded is not None and name in recorded and _identity(path) == recorded[name]:
                earlier.append(name)
            elif recorded is None:
                foreign[name] = "no record"
            else:
                foreign[name] = "changed since pertscale wrote it" if name in recorded else "not written by pertscale"
        return earlier, foreign

    def _foreign_message(self, foreign: dict[str, str]) -> str:
        if all(why == "no record" for why in foreign.values()):
            what = (
                f"{', '.join(foreign)}: not written by pertscale, or by a pertscale version that kept no record "
                f"of its outputs (there is no {self.MANIFEST})"
            )
        else:
            what = ", ".join(
                f"{name} ({'not written by pertscale' if why == 'no record' else why})" for name, why in foreign.items()
            )
        return (
            f"--out {str(self.out)!r} holds {what}. The job writes files of these names, and replaces only what an "
            "earlier pertscale run recorded writing, unchanged; these are never replaced or removed, not even with "
            "--overwrite: move or delete them, or choose another --out"
        )

    def _check_contents(self) -> None:
        """Refuse files in the way, results of an earlier run without ``overwrite``, and a ``resume`` of nothing.

        Raises
        ------
        FileExistsError
            Naming the files and the fix.
        """
        earlier, foreign = self._survey()
        if foreign:
            raise FileExistsError(self._foreign_message(foreign))
        if earlier and self.resume and not (self.out / self.PARTIAL).is_dir():
            raise FileExistsError(
                f"nothing to resume: --out {str(self.out)!r} holds the results of a finished run "
                f"({', '.join(earlier)}) and no blocks of an interrupted one ({self.PARTIAL}); leave out --resume, "
                "and pass --overwrite to compute the results again"
            )
        if earlier and not self.overwrite:
            raise FileExistsError(
                f"--out {str(self.out)!r} already holds results of an earlier run ({', '.join(earlier)}); "
                "pass --overwrite (overwrite=True) to replace them, or choose another --out"
            )

    def path(self, key: str) -> Path:
        """Where to write output ``key`` now (inside the staging directory)."""
        assert self.staging is not None
        return self.staging / self.files[key]

    def final(self, key: str) -> Path:
        """Where output ``key`` ends up."""
        return self.out / self.files[key]

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            self._release(failed=exc_type is not None)

    def _commit(self) -> None:
        """Move every staged output into place and record them in the manifest, or change nothing.

        The outputs of an earlier run (all of them, of any method, also
        those this run does not write, so that none is mixed with the new
        ones) are moved aside first and put back if a later step fails. The
        new manifest replaces the old one last, in one rename.
        """
        assert self.staging is not None
        _signals.check()  # a Ctrl-C swallowed by a finalizer during the run stops it here, before any move
        earlier, foreign = self._survey()  # again: files may have appeared in --out while the run computed
        in_the_way = {self.files[k]: foreign[self.files[k]] for k in self.files if self.files[k] in foreign}
        if in_the_way:
            raise FileExistsError(self._foreign_message(in_the_way))
        previous = self.staging / "previous"
        previous.mkdir()
        aside: list[str] = []
        moved: list[str] = []
        try:
            for name in earlier:
                os.replace(self.out / name, previous / name)
                aside.append(name)
            for key in self.files:
                if self.path(key).exists():
                    os.replace(self.path(key), self.final(key))
                    moved.append(key)
            self._write_manifest({self.files[key]: _identity(self.final(key)) for key in moved})
        except BaseException:
            for key in moved:
                remove(self.final(key))
            for name in aside:
                os.replace(previous / name, self.out / name)
            raise

    def _write_manifest(self, written: dict[str, dict | None]) -> None:
        record = {"format": 1, "pertscale": importlib.metadata.version("pertscale"), "written": written}
        with replacing(self.out / self.MANIFEST) as tmp, open(tmp, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    def _keep_partial(self) -> None:
        """Keep the result stores with written blocks (and their records) for a run with ``resume``."""
        assert self.staging is not None
        records = [d for d in self.staging.glob("*.zarr.done") if any(d.glob("*/[0-9]*"))]
        if not records:
            return
        partial = self.out / self.PARTIAL
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for done in records:
            store = done.with_name(done.name.removesuffix(".done"))
            for item in (store, done):
                if item.exists():
                    os.replace(item, partial / item.name)
        logger.info("kept the written result blocks in %s: run again with --resume to continue", partial)

    def _release(self, *, failed: bool = True) -> None:
        if self.staging is not None:
            if failed:
                try:
                    self._keep_partial()
                except OSError:  # best effort: a run without them starts over
                    pass
            else:
                shutil.rmtree(self.out / self.PARTIAL, ignore_errors=True)
            shutil.rmtree(self.staging, ignore_errors=True)
        if self._lock is not None:
            (self.out / self.LOCK).unlink(missing_ok=True)
            self._lock.close()
            self._lock = None
        if failed:
            for d in self.created:
                try:
                    d.rmdir()  # only if empty: never remove what someone else put there meanwhile
                except OSError:
                    break


def replace_recorded(out: Path, name: str, write) -> Path:
    """Write ``out/name`` anew with ``write(tmp_path)``, atomically, and record it in the run's manifest.

    For a file a run wrote that is rebuilt later (the report,
    :func:`pertscale.report`): the file there, if any, must be the one the
    manifest records, unchanged; another run must not hold the lock.

    Raises
    ------
    FileExistsError
        If ``out/name`` exists but the manifest does not record it as
        written by pertscale, unchanged.
    ValueError
        If another run is writing into ``out`` (it holds the lock).
    """
    out = Path(out)
    target = out / name
    manifest = out / OutputDir.MANIFEST
    lock = OutputDir(out, files={}, inputs=[], overwrite=False)
    lock._take_lock()  # first: a run that commits meanwhile would find its manifest replaced by an older one
    try:
        try:
            record = json.loads(manifest.read_text())
        except (OSError, ValueError):
            record = {}
        written = record.get("written") if isinstance(record, dict) else None
        written = written if isinstance(written, dict) else {}
        if os.path.lexists(target) and written.get(name) != _identity(target):
            raise FileExistsError(
                f"{str(target)!r} is not the {name} a pertscale run recorded writing (it is another file, or "
                "changed since): it is not replaced; move it away or pass another path"
            )
        with replacing(target) as tmp:
            write(tmp)
        if record:
            written[name] = _identity(target)
            record["written"] = written
            with replacing(manifest) as tmp, open(tmp, "w") as f:
                json.dump(record, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
    finally:
        lock._release(failed=False)
    return target

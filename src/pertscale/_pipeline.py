"""The main job: QC, normalization and the tests of every perturbation against control, to files.

One read of the labels decides everything ``obs`` can tell (bad labels,
empty groups, covariates, the plan); then: one pass that sorts an unsorted
input into the working store (if needed), one pass for QC metrics and all
filters, with nb-glm the passes of its size factors and dispersions, and
one pass that tests every perturbation with every method asked for and
writes the results block by block into ``de_<method>.zarr``. The
significant tables, the counts per perturbation and (where scanpy's view
fits) ``de_<method>.h5ad`` are made from those stores, never from results
gathered whole.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import _signals, pp, tl
from ._plan import BYTES_PER_NONZERO, THREADS_BELOW_BYTES, Plan, make_plan
from ._settings import settings
from ._validation import (
    check_control,
    check_number,
    check_shape,
    check_target_sum,
    check_writable_labels,
    label_list,
    perturbation_labels,
)
from .cluster import active_client, check_scheduler, resolve_scheduler, using
from .io import read, write
from .io._prepare import fingerprint, is_sorted, prepare
from .io._read import row_nonzeros, subset
from .io._write import check_not_input, overlap, write_stores
from .kernels._common import ALTERNATIVES
from .pp._qc_summary import _keep as keep_from_qc_pass
from .tl._rank_genes_groups import METHODS as TESTS
from .tl._results import check_results_writable, scanpy_uns, write_significant

logger = logging.getLogger(__name__)

#: Significance threshold of the tidy table and of the summary.
FDR = 0.05
#: Perturbations listed by name in the summary.
SHOWN = 20


@dataclass
class RunSummary:
    """What :func:`run` did and where it wrote it."""

    n_obs_input: int
    n_vars_input: int
    n_obs_kept: int
    n_vars_kept: int
    n_control_cells: int
    perturbations_tested: list[str]
    perturbations_dropped: dict[str, str]
    de_genes: dict[str, pd.Series]
    files: dict[str, Path]
    plan: Plan | None = None
    working_store: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Human-readable summary, one line per item (the perturbations with most DE genes by name)."""
        out = [
            f"cells kept: {self.n_obs_kept:,} of {self.n_obs_input:,} ({self.n_control_cells:,} control)",
            f"genes kept: {self.n_vars_kept:,} of {self.n_vars_input:,}",
            f"perturbations tested: {len(self.perturbations_tested)}",
        ]
        if self.perturbations_dropped:
            items = sorted(self.perturbations_dropped.items())
            dropped = ", ".join(f"{k} ({v})" for k, v in items[:SHOWN])
            more = f", ... ({len(items)} in all; see qc.csv)" if len(items) > SHOWN else ""
            out.append(f"not tested: {dropped}{more}")
        for method, de in self.de_genes.items():
            counts = de.sort_values(ascending=False, kind="stable")
            median = int(np.median(counts)) if len(counts) else 0
            out.append(f"{method}: DE genes at FDR {FDR} per perturbation (median {median}):")
            out.extend(f"  {name:<20} {int(n)}" for name, n in counts.head(SHOWN).items())
            if len(counts) > SHOWN:
                stem = "de_" + method.replace("-", "_")
                out.append(f"  ... {len(counts) - SHOWN:,} more ({stem}_significant.csv)")
        out.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        out.append("files:")
        width = max(map(len, [*self.files, "working"]))
        out.extend(f"  {k:<{width}} {v}" for k, v in self.files.items())
        if self.working_store is not None:
            out.append(
                f"  {'working':<{width}} {self.working_store} "
                "(sorted by perturbation; reused while the input is unchanged)"
            )
        return out


#: The tests the main job runs, by ``--method`` name.
METHODS = ("wilcoxon", "t-test", "t-test_overestim_var", "nb-glm")


def output_files(methods: Iterable[str], steps: Iterable[str] = ()) -> dict[str, str]:
    """The files the main job writes for ``methods`` and ``steps``, keyed ``results:METHOD``, ``h5ad:METHOD``, ...

    Per method ``de_<method>.zarr`` (always), ``de_<method>.h5ad`` (where
    scanpy's view fits) and ``de_<method>_significant.csv``, with ``-`` in
    the method's name written ``_``; ``qc.csv`` once; with nb-glm,
    ``size_factors.csv``; per optional step (``hvg``, ``pca``,
    ``pseudobulk``) its file of :data:`STEP_FILES`.
    """
    files = {}
    for method in methods:
        stem = "de_" + method.replace("-", "_")
        files |= {
            f"results:{method}": f"{stem}.zarr",
            f"h5ad:{method}": f"{stem}.h5ad",
            f"significant:{method}": f"{stem}_significant.csv",
        }
    if "nb-glm" in methods:
        files["size_factors"] = "size_factors.csv"
    return files | {step: STEP_FILES[step] for step in steps} | {"qc": "qc.csv"}


#: The optional steps of the main job and the file each writes.
STEP_FILES = {"hvg": "genes.csv", "pca": "pca.zarr", "pseudobulk": "pseudobulk.h5ad"}
#: Every name the main job can write into ``--out`` (of any method and step): what may be in a run's way.
OUTPUT_NAMES = frozenset(output_files(METHODS, STEP_FILES).values())
#: The working store's name inside the output directory, unless given.
WORKING_STORE = "working_store.zarr"


#: The CSR copy of a CSC input, beside the working store.
CSR_COPY = "input_csr.zarr"


def _csr_copy(path: Path, copy: Path, *, layer, use_raw) -> Path | None:
    """A CSR copy of a CSC input (made once, out of core, and reused while the input is unchanged), else ``None``.

    Every pass reads rows; a matrix stored by columns would have each pass
    read all its columns to re-block them. :func:`pertscale.io.convert`
    transposes it once instead.
    """
    from .io._convert import convert, stored_matrix

    if stored_matrix(path, layer=layer, use_raw=use_raw).encoding != "csc_matrix":
        return None
    fp = fingerprint(path, matrix=layer or ("raw" if use_raw else "X"))
    record = copy / ".pertscale-input.json"
    if record.exists() and json.loads(record.read_text()) == fp:
        logger.info("reusing the CSR copy %s of the CSC input", copy)
        return copy
    logger.info("the input stores its matrix by columns (CSC): transposing it once into %s", copy)
    convert(path, copy, layer=layer, use_raw=use_raw, overwrite=True)
    record.write_text(json.dumps(fp))
    return copy


class DiskFullError(OSError, MemoryError):
    """The disk filled up while the main job wrote (ENOSPC): one line naming the directory and the space needed.

    An :class:`OSError` (``errno.ENOSPC``) and, like the plan's refusal of
    a run that does not fit the disk, a :class:`MemoryError`.
    """


def _no_space(err: BaseException) -> OSError | None:
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


def _disk_full(err: OSError, *, out: Path, store: Path, plan: Plan) -> DiskFullError:
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
        + f": the plan counted about {_size(need)} for the run there, {_size(free)} were free when it started, "
        f"{_size(now)} are now; "
        f"free space, or choose {flag} on a larger disk; no results were written"
    )
    full.errno = errno.ENOSPC
    return full


def _size(n: float) -> str:
    from ._plan import _gib

    return _gib(n)


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


def _unwritable(directory: Path, *, probe: bool) -> str | None:
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
            reason = _unwritable(where, probe=False)
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
                target = self.final(key)
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            for name in aside:
                os.replace(previous / name, self.out / name)
            raise

    def _write_manifest(self, written: dict[str, dict | None]) -> None:
        from . import __version__

        record = {"format": 1, "pertscale": __version__, "written": written}
        tmp = self.out / f"{self.MANIFEST}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(record, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.out / self.MANIFEST)
        finally:
            tmp.unlink(missing_ok=True)

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


def _check_labels_before_passes(
    labels: pd.Series,
    *,
    perturbation_column: str,
    control_label: str,
    exclude_labels: list[str],
    min_cells_per_perturbation: int,
) -> tuple[bool, list[str]]:
    """What ``obs`` alone can tell: raise before any pass over the matrix.

    Returns whether scanpy's ``uns['rank_genes_groups']`` fits in the
    results file (see :func:`pertscale.tl._results.check_results_writable`)
    and the perturbations large enough to be tested, at most.
    """
    control_label = str(control_label)
    check_control(labels, control_label, perturbation_column)
    if control_label in exclude_labels:
        raise ValueError(
            f"--exclude-labels includes the control label {control_label!r}: no control cell would be left; "
            "remove it from --exclude-labels"
        )
    counts = labels[~labels.isin(exclude_labels)].value_counts()
    n_control = int(counts.get(control_label, 0))
    candidates = counts.drop(control_label)
    if candidates.empty:
        raise ValueError(
            f"every cell in obs[{perturbation_column!r}] is labelled {control_label!r} (control) or has an "
            f"excluded label ({', '.join(exclude_labels) or 'none'}): there is no perturbation to test; "
            "check --perturbation-column and --exclude-labels"
        )
    if n_control < 2:
        raise ValueError(
            f"only {n_control} control cell(s) labelled {control_label!r}; at least 2 are needed to test "
            "against control"
        )
    if candidates.max() < min_cells_per_perturbation:
        raise ValueError(
            f"no perturbation has {min_cells_per_perturbation} cells even before filtering (the largest, "
            f"{candidates.index[0]!r}, has {int(candidates.iloc[0])}); lower --min-cells-per-perturbation"
        )
    testable = [str(g) for g in candidates.index[candidates >= min_cells_per_perturbation]]
    check_writable_labels(testable, perturbation_column)
    from .kernels.wilcoxon import WILCOXON_STATS

    return check_results_writable(testable, WILCOXON_STATS, perturbation_column=perturbation_column), testable


def run(
    path: str | Path,
    out: str | Path,
    *,
    perturbation_column: str,
    control_label: str,
    min_genes: int = 20,
    min_cells: int = 3,
    min_cells_per_perturbation: int = 20,
    exclude_labels: Iterable[str] = pp.DEFAULT_EXCLUDE,
    target_sum: float = 1e4,
    layer: str | None = None,
    use_raw: bool = False,
    chunk_size: int | None = None,
    method: str | Iterable[str] = "wilcoxon",
    size_factor_method: str = "sparse",
    dispersion_method: str = "cox-reid",
    shrink: bool = True,
    covariates: Iterable[str] | None = None,
    tie_correct: bool = True,
    use_continuity: bool = False,
    corr_method: str = "benjamini-hochberg",
    alternative: str = "two-sided",
    min_pct: float | tuple[float, float] = 0.0,
    min_mean: float | tuple[float, float] = 0.0,
    hvg: int | None = None,
    hvg_flavor: str = "seurat",
    pca: int | None = None,
    pseudobulk: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    working_store: str | Path | None = None,
    memory_limit: int | None = None,
    dry_run: bool = False,
    scheduler=None,
    progress: bool | None = None,
) -> RunSummary | Plan:
    """Run QC, normalization and the tests against control, and write the results.

    Steps: the label checks and the plan (from ``obs`` and the file's
    metadata); if the cells are not stored by perturbation, the working store
    (:func:`pertscale.io.prepare`, one pass; reused while the input is
    unchanged); QC metrics and both filters in one pass: drop
    ``exclude_labels``, keep cells with at least ``min_genes`` detected genes,
    drop perturbations with fewer than ``min_cells_per_perturbation`` cells,
    keep genes detected in at least ``min_cells`` of the remaining cells;
    ``normalize_total`` to ``target_sum`` and ``log1p`` (lazy); each test
    of ``method`` of every perturbation against control, all written block by
    block in one more pass.

    Writes, in ``out``, per method (``de_wilcoxon``, ``de_t_test``, ...):
    ``de_<method>.zarr`` (results AnnData, always), ``de_<method>.h5ad``
    (the same with Scanpy's ``uns['rank_genes_groups']``, only where its
    record arrays fit: about 1,100 perturbations),
    ``de_<method>_significant.csv`` (rows with ``pval_adj < 0.05``); and
    ``qc.csv`` (cells per perturbation before and after filtering, and why a
    perturbation was dropped). They appear together when the run succeeds,
    recorded (names, sizes, times) in ``out/.pertscale-manifest.json``; a
    failed or interrupted run leaves none of them (and removes ``out`` if it
    created it and nothing else is in it). The input is only read.

    Parameters
    ----------
    path
        ``.h5ad`` file or ``.zarr`` store of raw UMI counts.
    out
        Output directory, created if missing; it must not be empty (``''``),
        be, or lie inside, the input.
    perturbation_column, control_label
        The ``obs`` column of perturbation labels and the label of the
        control cells.
    min_genes, min_cells, min_cells_per_perturbation
        Filters (whole numbers >= 0; ``min_cells_per_perturbation`` >= 2).
    exclude_labels
        Labels whose cells are dropped; a single string is one label.
    target_sum
        Counts per cell after ``normalize_total``; between 1e-28 and 1e37
        (float32 normalization's range, see ``check_target_sum``).
    layer, use_raw
        Read ``layers[layer]`` or ``raw.X`` instead of ``X``.
    chunk_size
        Cells per block; default from the memory plan.
    method
        A test of :func:`pertscale.tl.rank_genes_groups` (``"wilcoxon"``,
        ``"t-test"``, ``"t-test_overestim_var"``, ``"nb-glm"``) or several;
        several share the QC pass and read each block once. nb-glm tests the
        raw counts (never the normalized values), after its size factors
        (:func:`pertscale.pp.size_factors`, written to ``size_factors.csv``)
        and dispersions (:func:`pertscale.tl.dispersions`, in the results'
        ``var``), each a few passes of its own.
    size_factor_method, dispersion_method, shrink, covariates
        nb-glm's options (see :func:`pertscale.tl.rank_genes_groups`).
    tie_correct, use_continuity, corr_method, alternative, min_pct, min_mean
        Options of :func:`pertscale.tl.rank_genes_groups`.
    hvg, hvg_flavor
        Also select the ``hvg`` most variable of the kept genes
        (:func:`pertscale.pp.highly_variable_genes` with ``hvg_flavor``:
        ``seurat`` and ``cell_ranger`` on the log1p values, one pass;
        ``seurat_v3`` on the counts, two passes) and write the genes' table
        with its columns to ``genes.csv``. Off by default.
    pca
        Also compute this many principal components of the log1p values
        (of the ``hvg`` genes when given; :func:`pertscale.pp.pca`: one pass,
        then the scores written block by block) into ``pca.zarr``: cells x
        genes without a matrix, with ``obsm['X_pca']``, ``varm['PCs']``
        and ``uns['pca']``, as scanpy lays them out. Off by default.
    pseudobulk
        Also write ``pseudobulk.h5ad`` (:func:`pertscale.pb.pseudobulk`,
        one pass): per perturbation the summed counts (``X``), mean
        log1p and mean normalized values, ``n_cells``, and the log2 fold
        change against control (layer ``log2_fold_change``, control row
        0; :func:`pertscale.pb.log_fold_change`). Off by default.
    overwrite
        Replace the results of an earlier run found in ``out``: the files an
        earlier pertscale run recorded in ``out/.pertscale-manifest.json``,
        unchanged since (all of them, of any method, so that none is mixed
        with the new ones). Without it such an ``out`` is refused before any
        work. Files at an output's name that no run recorded (another
        program's, a pertscale version's from before the record, or changed
        since) refuse the run even with ``overwrite``; other files in
        ``out`` are never touched.
    resume
        Continue a run on the same input with the same options that was
        interrupted (Ctrl-C, SIGTERM, a failure) while writing its results:
        the result blocks it wrote (kept in ``out/.pertscale-partial``) are
        not computed again; the passes before them (QC, the control
        summary) run again, and the working store is reused as always. The
        results equal those of an uninterrupted run. A run with other
        options (other Dask graphs) starts the stores over. On an ``out``
        that holds a finished run's results and no interrupted run's blocks
        there is nothing to resume: ``FileExistsError`` (with or without
        ``overwrite``); with neither, the run starts from the beginning.
    working_store
        Where the perturbation-sorted working store goes when the input is
        not sorted; default ``out/working_store.zarr``. It is kept (and reused
        by later runs on the same input) after a success or an interruption,
        and removed after a failure of a run that created it. It must not be
        empty, ``out`` itself, hold ``out``, or overlap the input, and its
        directory must be writable (checked before any pass).
    memory_limit
        Bytes of memory per worker to plan for; default the workers' limit
        or this machine's available memory. With the threads scheduler, the
        memory of this one process, which its threads share.
    dry_run
        Only make the plan and return it: nothing is read but the labels and
        the row pointer, nothing is written. ``Plan.refusals`` says why the
        real run would be refused as ``out`` is now (results of an earlier
        run without ``overwrite``, files in the way, another run's lock, an
        unwritable ``out`` or working store, nothing to resume).
    scheduler, progress
        Where to compute (default ``ps.settings.scheduler``, ``"auto"``: an
        active ``distributed.Client``, else chosen by the plan: threads in
        this process for matrices under 2 GiB in memory, else the local
        process cluster) and whether to show progress bars. Every pass runs
        inside one :func:`pertscale.cluster.using` block.

    Returns
    -------
    RunSummary or Plan
        The plan with ``dry_run``.

    Raises
    ------
    FileNotFoundError, ValueError, KeyError
        For a missing, unreadable or damaged input, a missing column, an
        unknown control label, too few control cells, labels that cannot be
        written, an option out of range or bad values. Everything that
        ``obs``, ``var`` and the file's metadata can show is checked before
        the first pass over the matrix.
    ValueError
        Also for an empty ``out`` or ``working_store``, a working store that
        is ``out``, holds it or overlaps the input (before any pass).
    MemoryError
        If the plan does not fit the workers' memory or the disk (before any
        pass).
    FileExistsError
        If ``out`` holds results of an earlier run and ``overwrite`` is off;
        if it holds files at an output's name that no run recorded writing
        (or that changed since), with or without ``overwrite``; with
        ``resume``, if it holds a finished run's results and nothing to
        resume.
    PermissionError
        If ``out`` or the working store's directory cannot be written
        (checked before any computation).
    ConnectionError
        If ``scheduler`` is an address where no Dask scheduler answers within
        ``ps.settings.connect_timeout`` seconds (before any pass).
    DiskFullError
        If the disk fills up while the run writes (an ``OSError`` with errno
        ENOSPC, also a ``MemoryError``): one line naming ``out`` (or the
        working store) and the space the run needs there.
    """
    check_scheduler(scheduler)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    min_genes = check_number(min_genes, "min_genes", integer=True, minimum=0, flag="--min-genes")
    min_cells = check_number(min_cells, "min_cells", integer=True, minimum=0, flag="--min-cells")
    min_cells_per_perturbation = check_number(
        min_cells_per_perturbation,
        "min_cells_per_perturbation",
        integer=True,
        minimum=2,
        flag="--min-cells-per-perturbation",
    )
    target_sum = check_target_sum(target_sum)  # float32 normalization's range: the CLI's check and message
    memory_limit = check_number(memory_limit, "memory_limit", minimum=2**20, allow_none=True, flag="--memory-limit")
    exclude_labels = label_list(exclude_labels, "exclude_labels")
    methods = _methods(method)
    steps = _steps(hvg=hvg, hvg_flavor=hvg_flavor, pca=pca, pseudobulk=pseudobulk)
    covariates = label_list(covariates or [], "covariates")
    if covariates and "nb-glm" not in methods:
        raise ValueError("--covariates are taken out by the nb-glm test only; add nb-glm to --method")
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative {alternative!r} is not supported; choose one of {ALTERNATIVES} (--alternative)")
    path, out = Path(path), _directory(out, "out", "--out")
    given_store = working_store is not None
    store_path = _directory(working_store, "working_store", "--working-store") if given_store else out / WORKING_STORE
    adata = read(path, layer=layer, use_raw=use_raw, chunk_size=chunk_size)
    check_shape(adata, f"the matrix in {str(path)!r}")
    files = output_files(methods, steps)
    output = OutputDir(out, files=files, inputs=[path], overwrite=overwrite, resume=resume)
    output.check_paths()  # --out is not, and is not inside, the input: before anything, also for a dry run
    labels = perturbation_labels(adata.obs, perturbation_column)
    scanpy_format, testable = _check_labels_before_passes(
        labels,
        perturbation_column=perturbation_column,
        control_label=control_label,
        exclude_labels=exclude_labels,
        min_cells_per_perturbation=min_cells_per_perturbation,
    )
    if covariates:  # checked on obs before any pass: columns, missing values, levels, control cells per level
        from .tl._nbglm import covariate_levels

        kept_cells = ~labels.isin(exclude_labels).to_numpy()
        covariate_levels(
            adata.obs[kept_cells], covariates, control=(labels[kept_cells] == str(control_label)).to_numpy()
        )
    scheduler = settings.scheduler if scheduler is None else scheduler
    if scheduler == "auto":  # an active distributed.Client, or the plan chooses (None)
        scheduler = "local" if active_client() is not None else None
    needs_sort = not is_sorted(labels, control_label, exclude_labels)
    kept = ~labels.isin(exclude_labels).to_numpy()
    csc_nnz = _csc_nonzeros(path, layer=layer, use_raw=use_raw)
    uses_store = needs_sort or csc_nnz is not None  # the sorted store, or the CSR copy beside it
    _check_working_store(store_path, out, path, given=given_store, uses_store=uses_store, csc=csc_nnz is not None)
    row_nnz = row_nonzeros(path, layer=layer, use_raw=use_raw)
    if row_nnz is None and csc_nnz is not None:  # a CSC matrix: its total from the column pointer, spread evenly
        row_nnz = np.full(adata.n_obs, csc_nnz // max(adata.n_obs, 1), dtype=np.int64)
        row_nnz[: csc_nnz - int(row_nnz.sum())] += 1
    csr_record = store_path.parent / CSR_COPY / ".pertscale-input.json"
    plan = make_plan(
        adata,
        kept=kept,
        control=(labels == str(control_label)).to_numpy(),
        group_sizes=labels[kept & (labels != str(control_label)).to_numpy()].value_counts().to_numpy(),
        needs_sort=needs_sort,
        out=out,
        scheduler=scheduler if isinstance(scheduler, str) or scheduler is None else "distributed",  # a Client
        memory_limit=memory_limit,
        chunk_size=chunk_size,
        n_groups_tested=len(testable),
        row_nnz=row_nnz,
        workers=_client_workers(scheduler),
        statistics={m: len(TESTS[m].statistics) for m in methods},
        files=files,
        h5ad=scanpy_format,
        nb_glm="nb-glm" in methods,
        steps=steps,
        working_store=store_path,
        store_reused=needs_sort and _store_complete(store_path),
        csr_copy=None if csc_nnz is None else ("reused" if csr_record.exists() else "new"),
    )
    if dry_run:  # what the run would refuse, said without creating or changing anything
        refusals = (output.refusal(), _store_refusal(store_path, out, uses_store=uses_store, probe=False))
        plan.refusals = [r for r in refusals if r]
        return plan
    plan.check()
    refused = _store_refusal(store_path, out, uses_store=uses_store, probe=True)
    if refused:
        raise PermissionError(refused)
    if scheduler is None:  # the plan's choice (the local cluster falls back to threads where it cannot start)
        scheduler = "auto" if plan.scheduler == "local" else plan.scheduler
    store_existed = store_path.exists()
    try:
        with output, using(scheduler, progress=progress, nbytes=plan.kept_nnz * BYTES_PER_NONZERO):
            try:
                t = time.perf_counter()
                csr = _csr_copy(
                    path,
                    store_path.parent / CSR_COPY,
                    layer=layer,
                    use_raw=use_raw,
                )
                if csr is not None:
                    seconds["transpose"] = time.perf_counter() - t
                res, qc, dropped, n_kept = _passes(
                    path,
                    adata,
                    plan,
                    store_path if needs_sort else None,
                    output,
                    perturbation_column=perturbation_column,
                    control_label=str(control_label),
                    min_genes=min_genes,
                    min_cells=min_cells,
                    min_cells_per_perturbation=min_cells_per_perturbation,
                    exclude_labels=exclude_labels,
                    target_sum=target_sum,
                    layer=layer,
                    use_raw=use_raw,
                    methods=methods,
                    nb_options={
                        "size_factor_method": size_factor_method,
                        "dispersion_method": dispersion_method,
                        "shrink": shrink,
                        "covariates": covariates,
                    },
                    options={
                        "tie_correct": tie_correct,
                        "use_continuity": use_continuity,
                        "corr_method": corr_method,
                        "alternative": alternative,
                        "min_pct": min_pct,
                        "min_mean": min_mean,
                    },
                    scanpy_format=scanpy_format,
                    steps=steps,
                    seconds=seconds,
                    matrix_path=csr,
                )
            except Exception:
                # kept after Ctrl-C (to resume), and after a failure once complete and costly to make again
                # (out-of-core inputs: the user fixes an option and runs again); otherwise removed
                costly = plan.kept_nnz * BYTES_PER_NONZERO >= THREADS_BELOW_BYTES and _store_complete(store_path)
                if needs_sort and not store_existed and not costly:
                    shutil.rmtree(store_path, ignore_errors=True)
                raise
    except Exception as err:  # a full disk, also as zarr, dask or h5py wrap it: one line with the space needed
        full = _no_space(err)
        if full is None or isinstance(err, DiskFullError):
            raise
        raise _disk_full(full, out=out, store=store_path, plan=plan) from err
    seconds["total"] = time.perf_counter() - t0
    return RunSummary(
        n_obs_input=int(qc["n_cells_before"].sum()),
        n_vars_input=adata.n_vars,
        n_obs_kept=n_kept,
        n_vars_kept=res["n_vars"],
        n_control_cells=res["n_control_cells"],
        perturbations_tested=res["tested"],
        perturbations_dropped=dropped,
        de_genes=res["de_genes"],
        files={key: output.final(key) for key in output.files if key in res["written"]},
        plan=plan,
        working_store=store_path if needs_sort else None,
        seconds=seconds,
    )


def _passes(
    path: Path,
    adata,
    plan: Plan,
    store_path: Path | None,
    output: OutputDir,
    *,
    perturbation_column: str,
    control_label: str,
    min_genes: int,
    min_cells: int,
    min_cells_per_perturbation: int,
    exclude_labels: list[str],
    target_sum: float,
    layer: str | None,
    use_raw: bool,
    methods: list[str],
    nb_options: dict,
    options: dict,
    scanpy_format: bool,
    steps: dict,
    seconds: dict[str, float],
    matrix_path: Path | None = None,
):
    """The passes of the main job and the writing of its outputs into the staging directory."""
    input_path = path
    before = perturbation_labels(adata.obs, perturbation_column).value_counts()
    if matrix_path is not None:  # a CSR copy of a CSC input: read it, record the input
        path, layer, use_raw = matrix_path, None, False
        adata = read(path, chunk_size=plan.block_rows)
    if store_path is not None:
        t = time.perf_counter()
        logger.info("the cells are not stored by perturbation: sorting them into %s (once)", store_path)
        adata = prepare(
            path,
            perturbation_column,
            control_label,
            out=store_path,
            layer=layer,
            use_raw=use_raw,
            exclude_labels=exclude_labels,
            chunk_size=plan.block_rows,
        )
        seconds["sort"] = time.perf_counter() - t
    elif max(adata.X.chunks[0]) != plan.block_rows:
        adata = read(path, layer=layer, use_raw=use_raw, chunk_size=plan.block_rows)

    # one pass: QC metrics, value checks, and per-group gene detection for both filters
    t = time.perf_counter()
    labels = perturbation_labels(adata.obs, perturbation_column)
    names = [control_label] + [g for g in before.index if g != control_label and g not in set(exclude_labels)]
    codes = pd.Categorical(labels.to_numpy(), categories=names).codes.astype(np.int64)
    qc_pass = pp.qc_pass(adata, codes, len(names), min_genes=min_genes)
    seconds["qc and filters"] = time.perf_counter() - t
    n_fractional = int(qc_pass.gene("n_noninteger").sum())
    if n_fractional:
        where = f"layers[{layer!r}]" if layer else ("raw.X" if use_raw else "X")
        raise ValueError(
            f"{where} has {n_fractional:,} non-integer values: it looks normalized already, and this job "
            "normalizes raw UMI counts itself; pass the raw counts (e.g. --layer counts or --use-raw)"
        )
    kept = keep_from_qc_pass(
        qc_pass.cell("n_genes_by_counts"),
        qc_pass.detection,
        codes,
        pd.Index(names),
        control_label=control_label,  # the control is never dropped for its size
        min_genes=min_genes,
        min_cells_per_perturbation=min_cells_per_perturbation,
        min_cells_per_gene=min_cells,
    )
    after_cells, group_ok = kept["after_min_genes"], kept["group_ok"]
    n_control_left = int(after_cells[0])
    if n_control_left < 2:  # said first: without controls nothing can be tested
        raise ValueError(
            f"{n_control_left} control cell(s) left after filtering (of {int(before[control_label])}); "
            "lower --min-genes or check --exclude-labels"
        )
    if not group_ok[1:].any() or after_cells[1:][group_ok[1:]].sum() == 0:
        raise ValueError(
            f"no perturbation has at least {min_cells_per_perturbation} cells after filtering; "
            "lower --min-cells-per-perturbation or --min-genes"
        )
    keep_cells, keep_genes = kept["keep_cells"], kept["keep_genes"]
    if not keep_genes.any():
        raise ValueError(f"no gene is detected in at least {min_cells} cells; lower --min-cells")
    filtered = subset(adata, obs_mask=keep_cells, var_mask=keep_genes)  # blocks keep whole groups

    if "nb-glm" in methods:  # nb-glm's steps on the raw counts: size factors, then dispersions (their own passes)
        filtered.layers["counts"] = filtered.X  # the same lazy blocks; normalization below replaces X only
        t = time.perf_counter()
        pp.size_factors(filtered, method=nb_options["size_factor_method"], layer="counts")
        seconds["size factors"] = time.perf_counter() - t
        t = time.perf_counter()
        tl.dispersions(
            filtered,
            perturbation_column,
            covariates=nb_options["covariates"] or None,
            method=nb_options["dispersion_method"],
            layer="counts",
        )
        seconds["dispersions"] = time.perf_counter() - t
        sf = filtered.obs[[perturbation_column, "size_factors"]].rename(columns={"size_factors": "size_factor"})
        _write_csv(sf.rename_axis("cell").reset_index(), output.path("size_factors"))
    if "pseudobulk" in steps:
        t = time.perf_counter()
        _pseudobulk(
            filtered,
            output.path("pseudobulk"),
            perturbation_column,
            control_label,
            target_sum=target_sum,
        )
        seconds["pseudo-bulk"] = time.perf_counter() - t
    if steps.get("hvg", {}).get("flavor") == "seurat_v3":
        filtered.layers["counts"] = filtered.X
    pp.normalize_total(filtered, target_sum=target_sum)
    pp.log1p(filtered)
    if "hvg" in steps:
        t = time.perf_counter()
        flavor = steps["hvg"]["flavor"]
        pp.highly_variable_genes(
            filtered,
            flavor=flavor,
            n_top_genes=steps["hvg"]["n_top_genes"],
            layer="counts" if flavor == "seurat_v3" else None,
        )
        _write_csv(filtered.var.rename_axis("gene").reset_index(), output.path("hvg"))
        seconds["hvg"] = time.perf_counter() - t
    if "pca" in steps:
        t = time.perf_counter()
        embedding = _pca(
            filtered, steps["pca"]["n_comps"], use_hvg="hvg" in steps
        )
        seconds["pca"] = time.perf_counter() - t
    stored = perturbation_labels(filtered.obs, perturbation_column)
    in_storage_order = [g for g in pd.unique(stored.to_numpy()) if g != control_label]
    results = {}
    for method in methods:
        nb = method == "nb-glm"
        res = tl.rank_genes_groups(
            filtered,
            perturbation_column,
            control_label,
            method=method,
            perturbations=in_storage_order,  # results rows in storage order: written as they come, never reordered
            layer="counts" if nb else None,
            **options,
            **({k: nb_options[k] for k in ("shrink", "size_factor_method", "dispersion_method")} if nb else {}),
            **({"covariates": nb_options["covariates"] or None} if nb else {}),
        )
        res.uns["pertscale"]["settings"].update(
            {
                "input": str(input_path.resolve()),
                "input_matrix": f"layers/{layer}" if layer else ("raw/X" if use_raw else "X"),
                "min_genes": int(min_genes),
                "min_cells": int(min_cells),
                "min_cells_per_perturbation": int(min_cells_per_perturbation),
                "exclude_labels": np.asarray([str(e) for e in exclude_labels], dtype=object),
                "target_sum": float(target_sum),
            }
        )
        results[method] = res
    t = time.perf_counter()
    # one computation for every method (and the PCA scores): each block is read (and normalized) once
    stores = {output.path(f"results:{m}"): r for m, r in results.items()}
    if "pca" in steps:  # the scores are written by the same pass over the blocks as the tests
        stores[output.path("pca")] = embedding
    write_stores(stores, resume=True)  # staged: written in place
    seconds["test and write"] = time.perf_counter() - t

    t = time.perf_counter()
    written = {"qc": True} | ({"size_factors": True} if "nb-glm" in methods else {}) | dict.fromkeys(steps, True)
    de_genes = {}
    for method, res in results.items():
        store = output.path(f"results:{method}")
        de_genes[method] = write_significant(store, output.path(f"significant:{method}"), max_pval_adj=FDR)
        written |= {f"results:{method}": True, f"significant:{method}": True}
        fits = scanpy_format or check_results_writable(  # decided before filtering: fewer are tested, may fit now
            list(res.obs_names), tuple(res.layers), perturbation_column=perturbation_column
        )
        if fits:
            import anndata as ad

            small = ad.read_zarr(store)
            scanpy_uns(small)
            write(small, output.path(f"h5ad:{method}"), compression=None)  # speed; the .zarr stores are compressed
            written[f"h5ad:{method}"] = True
        else:
            name = output.files[f"h5ad:{method}"]
            warnings.warn(
                f"{name} is not written: {res.n_obs:,} perturbations are more than scanpy's "
                f"uns['rank_genes_groups'] record arrays hold in an .h5ad file (about 1,100). Every statistic is in "
                f"{output.files[f'results:{method}']} (anndata.read_zarr, ps.get.dataset). For scanpy's view of some "
                f"perturbations: r = anndata.read_zarr('{output.files[f'results:{method}']}')[perturbations].copy(); "
                "ps.tl.scanpy_uns(r); r.write_h5ad('subset.h5ad')",
                UserWarning,
                stacklevel=3,
            )
    seconds["tables"] = time.perf_counter() - t

    tested = list(res.obs_names)
    after = pd.Series(np.bincount(codes[keep_cells], minlength=len(names)), index=names)
    qc = pd.DataFrame({"n_cells_before": before, "n_cells_after": after.reindex(before.index, fill_value=0)})
    qc.index.name = "perturbation"
    excluded = set(exclude_labels)
    cells_after_min_genes = pd.Series(after_cells, index=names)
    qc["status"] = [
        _status(name, control_label, excluded, cells_after_min_genes, tested, min_cells_per_perturbation)
        for name in qc.index
    ]
    dropped = {name: status for name, status in qc["status"].items() if status not in ("tested", "control")}
    qc = qc.sort_values(["status", "n_cells_before"], ascending=[True, False])
    _write_csv(qc.reset_index(), output.path("qc"))
    summary = {
        "tested": tested,
        "de_genes": de_genes,
        "n_vars": int(keep_genes.sum()),
        "n_control_cells": n_control_left,
        "written": written,
    }
    return summary, qc, dropped, int(keep_cells.sum())


def _steps(*, hvg, hvg_flavor: str, pca, pseudobulk: bool) -> dict[str, dict]:
    """The optional steps asked for, their settings checked before any pass."""
    from .pp._hvg import FLAVORS

    steps: dict[str, dict] = {}
    if hvg is not None:
        if hvg_flavor not in FLAVORS:
            raise ValueError(f"hvg_flavor {hvg_flavor!r} is not known; use one of {', '.join(FLAVORS)} (--hvg-flavor)")
        if hvg_flavor == "seurat_v3":
            try:
                import skmisc.loess  # noqa: F401
            except ImportError as err:
                raise ValueError("--hvg-flavor seurat_v3 needs scikit-misc: pip install scikit-misc") from err
        n_top = check_number(hvg, "hvg", integer=True, minimum=1, flag="--hvg")
        steps["hvg"] = {"n_top_genes": n_top, "flavor": hvg_flavor}
    if pca is not None:
        steps["pca"] = {"n_comps": check_number(pca, "pca", integer=True, minimum=1, flag="--pca")}
        if "hvg" in steps and steps["pca"]["n_comps"] >= steps["hvg"]["n_top_genes"]:
            raise ValueError(
                f"--pca {pca} needs fewer components than the --hvg genes it uses ({hvg}); "
                f"lower --pca below {hvg} or raise --hvg"
            )
    if pseudobulk:
        steps["pseudobulk"] = {}
    return steps


def _pseudobulk(
    filtered, path: Path, perturbation_column: str, control_label: str, *, target_sum: float
):
    """Pseudo-bulk profiles of the kept cells and their log2 fold change against control, written to ``path``."""
    from . import pb

    bulk = pb.pseudobulk(
        filtered, groupby=perturbation_column, target_sum=target_sum
    )
    lfc = pb.log_fold_change(bulk, control_label=control_label, perturbation_column=perturbation_column)
    values = np.zeros(bulk.shape, dtype=np.float64)
    rows = pd.Index(bulk.obs[perturbation_column].astype(str)).get_indexer(lfc.obs[perturbation_column].astype(str))
    values[rows] = np.asarray(lfc.X)
    bulk.layers["log2_fold_change"] = values
    write(bulk, path, compression=None)


def _pca(filtered, n_comps: int, *, use_hvg: bool):
    """Principal components of the kept cells (one pass): obs, var, lazy obsm, varm and uns, no matrix.

    On the genes of this run's ``--hvg`` only: a ``highly_variable`` column the input carried is not used.
    """
    import anndata as ad

    pp.pca(filtered, n_comps=n_comps, use_highly_variable=use_hvg)
    embedding = ad.AnnData(
        obs=filtered.obs.copy(),
        var=filtered.var.copy(),
        obsm={"X_pca": filtered.obsm["X_pca"]},
        varm={"PCs": filtered.varm["PCs"]},
        uns={"pca": filtered.uns["pca"]},
    )
    return embedding


def _methods(method: str | Iterable[str]) -> list[str]:
    """The tests asked for (a name, a comma-separated list or a list), in order, once each.

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    """
    items = [method] if isinstance(method, str) else list(method)
    names = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        shown = ", ".join(map(repr, unknown)) or repr(method)
        raise ValueError(f"method {shown} is not available; choose from {', '.join(METHODS)} (--method)")
    return list(dict.fromkeys(names))


def _client_workers(scheduler) -> tuple[int, int, int] | None:
    """Number, smallest memory limit and most threads of the workers of the distributed client the job will use."""
    client = active_client() if scheduler in (None, "local") else resolve_scheduler(scheduler)  # an address: connect
    if client is None or isinstance(client, str):
        return None
    workers = client.scheduler_info().get("workers", {})
    limits = [w.get("memory_limit") or 0 for w in workers.values()]
    threads = [w.get("nthreads") or 1 for w in workers.values()]
    return (len(workers), min(limits), max(threads)) if workers else None


def _directory(value, name: str, flag: str) -> Path:
    """A directory option as a path; an empty one (``--out ''``, which would mean the current directory) is refused.

    Raises
    ------
    ValueError
        For an empty or blank path.
    """
    if not str(value).strip():
        raise ValueError(
            f"{name} ({flag}) is empty: give a directory, for example {flag} results/ "
            "(an empty path would write into the current directory)"
        )
    return Path(value)


def _csc_nonzeros(path: Path, *, layer, use_raw) -> int | None:
    """The non-zeros of a matrix stored by columns (CSC), from its column pointer; ``None`` for other layouts."""
    from .io._convert import stored_matrix

    stored = stored_matrix(path, layer=layer, use_raw=use_raw)
    if stored.encoding != "csc_matrix":
        return None
    elem, handle = stored.open()
    try:
        return int(elem["indptr"][-1])
    finally:
        if handle is not None:
            handle.close()


def _check_working_store(store: Path, out: Path, source: Path, *, given: bool, uses_store: bool, csc: bool) -> None:
    """Refuse a working store that is ``out``, holds it, is where an output goes, or would touch the input.

    Raises
    ------
    ValueError
        Naming both paths and the fix.
    """
    what = "--working-store" if given else f"the working store (default: {WORKING_STORE} in --out)"
    s, o = store.resolve(), out.resolve()
    if s == o:
        raise ValueError(
            f"--working-store {str(store)!r} is --out itself; the working store is a directory of its own, rebuilt "
            f"when the input changes: leave --working-store out (it goes to {str(out / WORKING_STORE)!r}) or give "
            "another path"
        )
    if s in o.parents:
        raise ValueError(
            f"--out {str(out)!r} lies inside --working-store {str(store)!r}, which is rebuilt when the input "
            "changes; choose a --working-store that does not hold --out"
        )
    for name in sorted(OUTPUT_NAMES):
        if s == o / name or o / name in s.parents:
            raise ValueError(
                f"--working-store {str(store)!r} is where the job writes {name} in --out; choose another path"
            )
    if uses_store:
        check_not_input(store, [source], what=what)
        if csc:
            check_not_input(store.parent / CSR_COPY, [source], what=f"the CSR copy of the CSC input, beside {what},")


def _store_refusal(store: Path, out: Path, *, uses_store: bool, probe: bool) -> str | None:
    """Why the working store (or the CSR copy beside it) cannot be written, or ``None``.

    Not asked when no store is written, when a complete one is there
    (reused), or when it goes straight into ``out`` (checked with it).
    """
    if not uses_store or store.parent.resolve() == out.resolve() or _store_complete(store):
        return None
    where = next((p for p in (store, *store.parents) if p.exists()), Path("."))
    reason = _unwritable(where, probe=probe)
    if reason is None:
        return None
    return (
        f"cannot write the working store {str(store)!r} ({str(where)!r}: {reason}); "
        "choose a --working-store on a writable disk, or leave it out (it then goes into --out)"
    )


def _store_complete(store: Path) -> bool:
    import json

    from .io._prepare import MARKER

    try:
        return bool(json.loads((store / MARKER).read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def _status(name, control_label, excluded, cells_after_min_genes, tested, min_cells_per_perturbation) -> str:
    if name == control_label:
        return "control"
    if name in excluded:
        return "excluded label"
    n = int(cells_after_min_genes.get(name, 0))
    if n == 0:
        return "no cells left after min_genes"
    if n < min_cells_per_perturbation:
        return f"fewer than {min_cells_per_perturbation} cells"
    return "tested" if name in set(tested) else "not tested"


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

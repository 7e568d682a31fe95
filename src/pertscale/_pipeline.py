"""The main job: QC, normalization and Wilcoxon of every perturbation, to files."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import pp, tl
from ._validation import (
    check_control,
    check_number,
    check_shape,
    check_writable_labels,
    label_list,
    perturbation_labels,
)
from .io import read, write
from .io._write import check_not_input, overlap
from .tl._results import check_results_writable

logger = logging.getLogger(__name__)

#: Significance threshold of the tidy table and of the summary.
FDR = 0.05


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
    de_genes: pd.Series
    files: dict[str, Path]
    seconds: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Human-readable summary, one line per item."""
        out = [
            f"cells kept: {self.n_obs_kept:,} of {self.n_obs_input:,} ({self.n_control_cells:,} control)",
            f"genes kept: {self.n_vars_kept:,} of {self.n_vars_input:,}",
            f"perturbations tested: {len(self.perturbations_tested)}",
        ]
        if self.perturbations_dropped:
            dropped = ", ".join(f"{k} ({v})" for k, v in sorted(self.perturbations_dropped.items()))
            out.append(f"not tested: {dropped}")
        counts = self.de_genes.sort_values(ascending=False)
        out.append(f"DE genes at FDR {FDR} per perturbation (median {int(np.median(counts)) if len(counts) else 0}):")
        out.extend(f"  {name:<20} {int(n)}" for name, n in counts.items())
        out.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        out.append("files:")
        out.extend(f"  {k:<12} {v}" for k, v in self.files.items())
        return out


#: The files the main job writes in its output directory.
OUTPUT_FILES = {
    "results": "de_wilcoxon.h5ad",
    "significant": "de_wilcoxon_significant.csv",
    "qc": "qc.csv",
}


class OutputDir:
    """The main job's output directory: checked first, filled all at once or not at all.

    Files are written into a hidden staging directory inside ``out`` and
    moved into place only when every one of them is written, so a failed or
    interrupted run leaves no partial results. Results of an earlier run are
    replaced only with ``overwrite``, and restored if the move of the new
    ones fails half-way. A lock file keeps two runs from writing into the
    same ``out`` at once. Directories this run created are removed again if
    it fails.
    """

    LOCK = ".pertscale.lock"

    def __init__(self, out: Path, *, inputs: list[Path], overwrite: bool) -> None:
        self.out = Path(out)
        self.inputs = inputs
        self.overwrite = overwrite
        self.created: list[Path] = []
        self.staging: Path | None = None
        self._lock = None

    def __enter__(self) -> OutputDir:
        out = self.out
        if out.is_symlink() and not out.exists():
            raise ValueError(f"--out {str(out)!r} is a symbolic link to a missing path; choose an existing directory")
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {str(out)!r} is a file, not a directory; choose a directory")
        for source in self.inputs:
            check_not_input(out, [source], what="--out", replaces=False)
            for name in OUTPUT_FILES.values():
                if overlap(out / name, source):
                    raise ValueError(
                        f"--out {str(out)!r} would overwrite the input {str(source)!r} (the job writes {name} "
                        "there); inputs are never modified: choose another --out"
                    )
        missing = [d for d in (out, *out.parents) if not d.exists()]  # deepest first
        try:
            try:
                out.mkdir(parents=True, exist_ok=True)
            finally:
                self.created = [d for d in missing if d.exists()]
            self._take_lock()
            earlier = [name for name in OUTPUT_FILES.values() if (out / name).exists()]
            if earlier and not self.overwrite:
                raise FileExistsError(
                    f"--out {str(out)!r} already holds results of an earlier run ({', '.join(earlier)}); "
                    "pass --overwrite (overwrite=True) to replace them, or choose another --out"
                )
            self.staging = Path(tempfile.mkdtemp(prefix=".pertscale-run-", dir=out))
        except OSError as err:
            self._release()
            if isinstance(err, FileExistsError):
                raise
            raise PermissionError(
                f"cannot write to output directory {str(out)!r} ({err.strerror or err}); choose a writable --out"
            ) from err
        except BaseException:
            self._release()
            raise
        return self

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
            raise ValueError(
                f"another pertscale run is writing to --out {str(self.out)!r} (it holds {self.LOCK}); "
                "wait for it to finish or choose another --out"
            ) from None

    def path(self, key: str) -> Path:
        """Where to write output ``key`` now (inside the staging directory)."""
        assert self.staging is not None
        return self.staging / OUTPUT_FILES[key]

    def final(self, key: str) -> Path:
        """Where output ``key`` ends up."""
        return self.out / OUTPUT_FILES[key]

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            self._release(failed=exc_type is not None)

    def _commit(self) -> None:
        """Move every output into place, or none: earlier files are kept (hard links) until all moved."""
        assert self.staging is not None
        previous = self.staging / "previous"
        previous.mkdir()
        existed = {key for key in OUTPUT_FILES if self.final(key).exists()}
        kept, moved = set(), []
        for key in existed:
            try:
                os.link(self.final(key), previous / OUTPUT_FILES[key])
                kept.add(key)
            except OSError:  # no hard links on this file system: that file cannot be restored
                pass
        try:
            for key in OUTPUT_FILES:
                os.replace(self.path(key), self.final(key))
                moved.append(key)
        except BaseException:
            for key in moved:
                if key in kept:
                    os.replace(previous / OUTPUT_FILES[key], self.final(key))
                elif key not in existed:
                    self.final(key).unlink(missing_ok=True)
            raise

    def _release(self, *, failed: bool = True) -> None:
        if self.staging is not None:
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
) -> bool:
    """What ``obs`` alone can tell: raise before any pass over the matrix.

    Returns whether scanpy's ``uns['rank_genes_groups']`` fits in the
    results file (see :func:`pertscale.tl._results.check_results_writable`).
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

    return check_results_writable(testable, WILCOXON_STATS, perturbation_column=perturbation_column)


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
    tie_correct: bool = True,
    use_continuity: bool = False,
    corr_method: str = "benjamini-hochberg",
    overwrite: bool = False,
    scheduler=None,
    progress: bool | None = None,
) -> RunSummary:
    """Run QC, normalization and the Wilcoxon test, and write the results.

    Steps: QC metrics (one pass); drop ``exclude_labels``; keep cells with at
    least ``min_genes`` detected genes; drop perturbations with fewer than
    ``min_cells_per_perturbation`` cells; keep genes detected in at least
    ``min_cells`` of the remaining cells (one pass); ``normalize_total`` to
    ``target_sum`` and ``log1p`` (lazy); Wilcoxon rank-sum of every
    perturbation against control (:func:`pertscale.tl.rank_genes_groups`).

    Writes, in ``out``: ``de_wilcoxon.h5ad`` (results AnnData with Scanpy's
    ``uns['rank_genes_groups']``), ``de_wilcoxon_significant.csv`` (rows with
    ``pval_adj < 0.05``) and ``qc.csv`` (cells per perturbation before and
    after filtering, and why a perturbation was dropped). The three files
    appear together when the run succeeds; a failed or interrupted run
    leaves none of them (and removes ``out`` if it created it). The input is
    only read.

    Parameters
    ----------
    path
        ``.h5ad`` file or ``.zarr`` store of raw UMI counts.
    out
        Output directory, created if missing; it must not be, or lie inside,
        the input.
    perturbation_column, control_label
        The ``obs`` column of perturbation labels and the label of the
        control cells.
    min_genes, min_cells, min_cells_per_perturbation
        Filters (whole numbers >= 0; ``min_cells_per_perturbation`` >= 2).
    exclude_labels
        Labels whose cells are dropped; a single string is one label.
    target_sum
        Counts per cell after ``normalize_total``; finite and > 0.
    layer, use_raw
        Read ``layers[layer]`` or ``raw.X`` instead of ``X``.
    chunk_size
        Rows per block (>= 1); default from available memory.
    tie_correct, use_continuity, corr_method
        Options of :func:`pertscale.tl.rank_genes_groups`.
    overwrite
        Replace results of an earlier run found in ``out``; without it such
        an ``out`` is refused before any work.
    scheduler, progress
        Where to compute and whether to show progress bars.

    Returns
    -------
    RunSummary

    Raises
    ------
    FileNotFoundError, ValueError, KeyError
        For a missing, unreadable or damaged input, a missing column, an
        unknown control label, too few control cells, labels that cannot be
        written, an option out of range or bad values. Everything that
        ``obs``, ``var`` and the file's metadata can show is checked before
        the first pass over the matrix.
    FileExistsError
        If ``out`` holds results of an earlier run and ``overwrite`` is off.
    PermissionError
        If ``out`` cannot be written (checked before any computation).
    """
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
    target_sum = check_number(target_sum, "target_sum", minimum=0, min_open=True, flag="--target-sum")
    exclude_labels = label_list(exclude_labels, "exclude_labels")
    adata = read(path, layer=layer, use_raw=use_raw, chunk_size=chunk_size)
    check_shape(adata, f"the matrix in {str(path)!r}")
    labels = perturbation_labels(adata.obs, perturbation_column)
    scanpy_format = _check_labels_before_passes(
        labels,
        perturbation_column=perturbation_column,
        control_label=control_label,
        exclude_labels=exclude_labels,
        min_cells_per_perturbation=min_cells_per_perturbation,
    )
    with OutputDir(Path(out), inputs=[Path(path)], overwrite=overwrite) as output:
        res, qc, dropped = _compute(
            adata,
            labels,
            perturbation_column=perturbation_column,
            control_label=control_label,
            min_genes=min_genes,
            min_cells=min_cells,
            min_cells_per_perturbation=min_cells_per_perturbation,
            exclude_labels=exclude_labels,
            target_sum=target_sum,
            layer=layer,
            use_raw=use_raw,
            tie_correct=tie_correct,
            use_continuity=use_continuity,
            corr_method=corr_method,
            scanpy_format=scanpy_format,
            scheduler=scheduler,
            progress=progress,
            seconds=seconds,
            t0=t0,
        )
        res.uns["pertscale"]["settings"]["input"] = str(Path(path).resolve())
        write(res, output.path("results"))
        _write_csv(tl.tidy(res, max_pval_adj=FDR), output.path("significant"))
        _write_csv(qc.reset_index(), output.path("qc"))
    de_genes = pd.Series((res.layers["pvals_adj"] < FDR).sum(axis=1), index=res.obs_names, name="n_de_genes")
    seconds["total"] = time.perf_counter() - t0
    return RunSummary(
        n_obs_input=int(qc["n_cells_before"].sum()),
        n_vars_input=int(res.uns["pertscale"]["settings"]["n_vars_input"]),
        n_obs_kept=int(qc["n_cells_after"].sum()),
        n_vars_kept=res.n_vars,
        n_control_cells=int(res.uns["pertscale"]["settings"]["n_control_cells"]),
        perturbations_tested=list(res.obs_names),
        perturbations_dropped=dropped,
        de_genes=de_genes,
        files={key: output.final(key) for key in OUTPUT_FILES},
        seconds=seconds,
    )


def _compute(
    adata,
    labels: pd.Series,
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
    tie_correct: bool,
    use_continuity: bool,
    corr_method: str,
    scanpy_format: bool,
    scheduler,
    progress,
    seconds: dict[str, float],
    t0: float,
):
    """The passes of the main job; returns the results AnnData, the QC table and the dropped labels."""
    n_vars_input = adata.n_vars
    before = labels.value_counts()
    pp.calculate_qc_metrics(adata, perturbation_column=perturbation_column, scheduler=scheduler, progress=progress)
    seconds["qc"] = time.perf_counter() - t0
    n_fractional = adata.uns["pertscale"]["n_noninteger_values"]
    if n_fractional:
        where = f"layers[{layer!r}]" if layer else ("raw.X" if use_raw else "X")
        raise ValueError(
            f"{where} has {n_fractional:,} non-integer values: it looks normalized already, and this job "
            "normalizes raw UMI counts itself; pass the raw counts (e.g. --layer counts or --use-raw)"
        )
    excluded = pp.filter_perturbations(adata, perturbation_column, control_label, exclude_labels=exclude_labels)
    if min_genes:
        keep = adata.obs["n_genes_by_counts"].to_numpy() >= min_genes  # same numbers filter_cells would compute
        if not keep.all():
            adata._inplace_subset_obs(np.flatnonzero(keep))
    small = pp.filter_perturbations(adata, perturbation_column, control_label, min_cells=min_cells_per_perturbation)
    left = perturbation_labels(adata.obs, perturbation_column)
    n_control_left = int((left == str(control_label)).sum())
    if 0 < n_control_left == left.size:
        raise ValueError(
            f"no perturbation has at least {min_cells_per_perturbation} cells after filtering; "
            "lower --min-cells-per-perturbation or --min-genes"
        )
    if n_control_left < 2:
        raise ValueError(
            f"{n_control_left} control cell(s) left after filtering (of {int(before[str(control_label)])}); "
            "lower --min-genes or check --exclude-labels"
        )
    if min_cells:
        t = time.perf_counter()
        pp.filter_genes(adata, min_cells=min_cells, scheduler=scheduler, progress=progress)
        seconds["filter genes"] = time.perf_counter() - t
    if adata.n_vars == 0:
        raise ValueError(f"no gene is detected in at least {min_cells} cells; lower --min-cells")

    pp.normalize_total(adata, target_sum=target_sum)
    pp.log1p(adata)
    t = time.perf_counter()
    res = tl.rank_genes_groups(
        adata,
        perturbation_column,
        control_label,
        tie_correct=tie_correct,
        use_continuity=use_continuity,
        corr_method=corr_method,
        scanpy_format=scanpy_format,
        scheduler=scheduler,
        progress=progress,
    )
    seconds["wilcoxon"] = time.perf_counter() - t
    if not scanpy_format:
        warnings.warn(
            f"{res.n_obs:,} perturbations are more than scanpy's uns['rank_genes_groups'] record arrays hold in "
            "an .h5ad file; de_wilcoxon.h5ad has every statistic in its layers but not that view "
            "(scanpy.get.rank_genes_groups_df will not work on it; ps.tl.tidy does)",
            UserWarning,
            stacklevel=3,
        )
    res.uns["pertscale"]["settings"].update(
        {
            "min_genes": int(min_genes),
            "min_cells": int(min_cells),
            "min_cells_per_perturbation": int(min_cells_per_perturbation),
            "exclude_labels": np.asarray([str(e) for e in exclude_labels], dtype=object),
            "target_sum": float(target_sum),
            "n_vars_input": int(n_vars_input),
        }
    )
    res.uns["pertscale"]["settings"]["input_matrix"] = f"layers/{layer}" if layer else ("raw/X" if use_raw else "X")

    after = perturbation_labels(adata.obs, perturbation_column).value_counts()
    qc = pd.DataFrame({"n_cells_before": before, "n_cells_after": after.reindex(before.index, fill_value=0)})
    qc.index.name = "perturbation"
    qc["status"] = [
        _status(name, control_label, excluded, small, after, res.obs_names, min_cells_per_perturbation)
        for name in qc.index
    ]
    dropped = {name: status for name, status in qc["status"].items() if status not in ("tested", "control")}
    qc = qc.sort_values(["status", "n_cells_before"], ascending=[True, False])
    return res, qc, dropped


def _status(name, control_label, excluded, small, after, tested, min_cells_per_perturbation) -> str:
    if name == str(control_label):
        return "control"
    if excluded.loc[name, "reason"] == "excluded":
        return "excluded label"
    if name not in small.index:
        return "no cells left after min_genes"
    if small.loc[name, "reason"] == "min_cells":
        return f"fewer than {min_cells_per_perturbation} cells"
    if name in tested:
        return "tested"
    return "fewer than 2 cells" if name in after.index else "no cells left"


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

"""What a run leaves besides its results: ``run.json``, the per-cell QC table and the report.

``run.json`` holds what the run did (input, thresholds, numbers kept and
tested, DE genes per perturbation), its settings, the plan, the packages'
versions and the time and memory profile (:mod:`._profile`);
``qc_cells.zarr`` the per-cell QC metrics of :func:`pertscale.pp.qc_summary`
(the report's and :func:`pertscale.pl.qc_metrics`' distributions). Both are
read back by :func:`pertscale.report`, which rebuilds ``report.html`` from
an output directory alone.
"""

from __future__ import annotations

import datetime
import json
import sys
import typing
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .. import tl
from ..io import write
from ..io._atomic import replacing
from ..store._history import _versions
from ._summary import FDR, RunSummary

if typing.TYPE_CHECKING:
    from ..pp import QCSummary
    from ._run import _Job

#: Version of run.json's layout.
FORMAT = 1
#: The ``obs`` columns that may name each label's target gene (:func:`pertscale.tl.knockdown`'s).
TARGET_COLUMNS = tl.TARGET_COLUMNS


def targets_from_obs(obs: pd.DataFrame, perturbation_column: str) -> dict[str, str]:
    """Perturbation label -> its target gene: :func:`pertscale.tl.targets_from_obs` (empty when no column gives any)."""
    return tl.targets_from_obs(obs, perturbation_column)


def _plain(value):
    """``value`` with numpy scalars and arrays, paths and tuples made JSON-serializable (NaN and inf: ``None``)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def run_record(job: _Job, summary: RunSummary, *, seconds: float) -> dict:
    """``run.json``'s content for ``job`` and its ``summary`` (plain JSON types; ``seconds``: wall time so far)."""
    qc = summary.qc
    plan = summary.plan
    record = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": sys.argv if Path(sys.argv[0]).name == "pertscale" else None,
        "input": {
            "path": str(Path(job.path).resolve()),
            "matrix": job.input_matrix,
            "n_obs": summary.n_obs_input,
            "n_vars": summary.n_vars_input,
        },
        "perturbation_column": job.perturbation_column,
        "control_label": job.control_label,
        "targets": {p: job.targets[p] for p in summary.perturbations_tested if p in job.targets},
        "qc": {
            "perturbation_column": job.perturbation_column,
            "control_label": job.control_label,
            "min_genes": job.thresholds["min_genes"],
            "min_cells_per_gene": job.thresholds["min_cells"],
            "min_cells_per_perturbation": job.thresholds["min_cells_per_perturbation"],
            "exclude_labels": list(job.exclude_labels),
            "n_noninteger_values": int(qc.n_noninteger_values) if qc is not None else 0,
        },
        "settings": {
            "methods": job.methods,
            "target_sum": job.target_sum,
            **job.test_options,
            **({"nb_glm": job.nb_options} if "nb-glm" in job.methods else {}),
            "steps": job.steps,
        },
        "summary": {
            "n_obs_kept": summary.n_obs_kept,
            "n_vars_kept": summary.n_vars_kept,
            "n_control_cells": summary.n_control_cells,
            "n_perturbations_tested": len(summary.perturbations_tested),
            "perturbations_dropped": summary.perturbations_dropped,
            "fdr": FDR,
            "de_genes": {m: {str(k): int(v) for k, v in s.items()} for m, s in summary.de_genes.items()},
        },
        "plan": {
            "lines": plan.lines() if plan is not None else [],
            "scheduler": plan.scheduler if plan is not None else None,
            "n_workers": plan.n_workers if plan is not None else None,
            "block_rows": plan.block_rows if plan is not None else None,
            "passes": list(plan.passes) if plan is not None else [],
        },
        "files": {key: name for key, name in job.output.files.items() if key in summary.files},
        "seconds": seconds,
        "working_store": str(summary.working_store) if summary.working_store is not None else None,
        "versions": _versions(),
        "profile": job.profile.to_dict(),
    }
    return _plain(record)


def write_json(record: dict, path: Path) -> None:
    """Write ``record`` to ``path`` as indented JSON, atomically."""
    with replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=1, allow_nan=False)


def write_qc_cells(qc: QCSummary, path: Path) -> None:
    """The per-cell QC metrics (``QCSummary.cells``) as an AnnData without genes (``n_vars = 0``) at ``path``.

    The label and reason columns are stored as categoricals (a few bytes
    per cell); the metrics as they are (int64 and float64).
    """
    cells = qc.cells.copy()
    for column in cells.columns:
        if cells[column].dtype == object:
            cells[column] = pd.Categorical(cells[column].astype(str))
    cells.index = cells.index.astype(str)
    table = ad.AnnData(obs=cells)
    table.uns["pertscale"] = {
        "what": "per-cell QC metrics of pertscale.pp.qc_summary",
        "min_genes": int(qc.min_genes),
        "min_cells_per_perturbation": int(qc.min_cells_per_perturbation),
        "min_cells_per_gene": int(qc.min_cells_per_gene),
        "perturbation_column": qc.perturbation_column,
        "control_label": "" if qc.control_label is None else str(qc.control_label),
    }
    write(table, path)


def report(out_dir: str | Path, *, path: str | Path | None = None) -> Path:
    """Build the report of a ``pertscale run`` output directory: one self-contained HTML page.

    Reads only the files in ``out_dir`` (``run.json``, ``qc.csv``,
    ``qc_cells.zarr``, the ``de_*.zarr`` results, ``genes.csv``,
    ``pca.zarr``): the result stores are read lazily, one row per volcano
    plot, one element per perturbation for the knock-down of targets, and
    blockwise reductions for the screen-wide plots, so rebuilding the
    report of a genome-wide run does not load its results. The page embeds
    its figures as PNG and loads nothing from the network
    (:mod:`pertscale._report` says what it shows).

    Parameters
    ----------
    out_dir
        The ``--out`` directory of a finished run.
    path
        Where to write the page; default ``out_dir/report.html``, replacing
        the report the run wrote (and its entry in the run's manifest, so
        that a later ``--overwrite`` still recognises it). Written
        atomically either way.

    Returns
    -------
    pathlib.Path
        The page written.

    Raises
    ------
    FileNotFoundError
        If ``out_dir`` does not exist.
    ValueError
        If it is not the output of a ``pertscale run`` (no ``run.json`` or
        ``qc.csv``: runs of pertscale before 0.2 did not write ``run.json``;
        run again with ``--overwrite``); if a run is writing into it now
        (it holds the lock).
    FileExistsError
        If ``out_dir/report.html`` exists but is not the report a run
        recorded writing (a file of someone else's, or changed since):
        pass another ``path``.
    """
    from .._report import build_report, check_output_dir
    from ._output import REPORT, replace_recorded

    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    target = out_dir / REPORT if path is None else Path(path)
    if target.resolve() == (out_dir / REPORT).resolve():
        return replace_recorded(out_dir, REPORT, lambda tmp: build_report(out_dir, out=tmp))
    with replacing(target) as tmp:
        build_report(out_dir, out=tmp)
    return target


def write_report(directory: Path, *, files: dict[str, str]) -> None:
    """Write ``report.html`` into ``directory`` (a run's staging directory) from the files there."""
    from .._report import build_report

    build_report(Path(directory), out=Path(directory) / files["report"])

"""The main job: QC, normalization and Wilcoxon of every perturbation, to files."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import pp, tl
from ._validation import check_control, perturbation_labels
from .io import read, write

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


def _check_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".pertscale-write-test-"):
            pass
    except OSError as err:
        raise PermissionError(
            f"cannot write to output directory {str(out)!r} ({err.strerror or err}); choose a writable --out"
        ) from err


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
    chunk_size: int | None = None,
    tie_correct: bool = True,
    use_continuity: bool = False,
    corr_method: str = "benjamini-hochberg",
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
    after filtering, and why a perturbation was dropped). The input is only
    read.

    Returns
    -------
    RunSummary

    Raises
    ------
    FileNotFoundError, ValueError, KeyError
        For a missing or unreadable input, a missing column, an unknown
        control label, too few control cells or bad values.
    PermissionError
        If ``out`` cannot be written (checked before any computation).
    """
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    out = Path(out)
    adata = read(path, layer=layer, chunk_size=chunk_size)
    labels = perturbation_labels(adata.obs, perturbation_column)
    check_control(labels, control_label, perturbation_column)
    _check_output_dir(out)
    targets = [out / "de_wilcoxon.h5ad", out / "de_wilcoxon_significant.csv", out / "qc.csv"]
    if any(t.resolve() == Path(path).resolve() for t in targets):
        raise ValueError(f"--out {str(out)!r} would overwrite the input {str(path)!r}; choose another directory")
    n_obs_input, n_vars_input = adata.shape
    before = labels.value_counts()

    pp.calculate_qc_metrics(adata, perturbation_column=perturbation_column, scheduler=scheduler, progress=progress)
    seconds["qc"] = time.perf_counter() - t0
    n_fractional = adata.uns["pertscale"]["n_noninteger_values"]
    if n_fractional:
        where = f"layers[{layer!r}]" if layer else "X"
        raise ValueError(
            f"{where} has {n_fractional:,} non-integer values: it looks normalized already, and this job "
            "normalizes raw UMI counts itself; pass the raw counts (e.g. --layer counts)"
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
        scanpy_format=True,
        scheduler=scheduler,
        progress=progress,
    )
    seconds["wilcoxon"] = time.perf_counter() - t
    res.uns["pertscale"]["settings"].update(
        {
            "input": str(Path(path).resolve()),
            "min_genes": int(min_genes),
            "min_cells": int(min_cells),
            "min_cells_per_perturbation": int(min_cells_per_perturbation),
            "exclude_labels": np.asarray([str(e) for e in exclude_labels], dtype=object),
            "target_sum": float(target_sum),
        }
    )

    after = perturbation_labels(adata.obs, perturbation_column).value_counts()
    qc = pd.DataFrame({"n_cells_before": before, "n_cells_after": after.reindex(before.index, fill_value=0)})
    qc.index.name = "perturbation"
    qc["status"] = [
        _status(name, control_label, excluded, small, after, res.obs_names, min_cells_per_perturbation)
        for name in qc.index
    ]
    dropped = {name: status for name, status in qc["status"].items() if status not in ("tested", "control")}
    qc = qc.sort_values(["status", "n_cells_before"], ascending=[True, False])

    files = {
        "results": out / "de_wilcoxon.h5ad",
        "significant": out / "de_wilcoxon_significant.csv",
        "qc": out / "qc.csv",
    }
    write(res, files["results"])
    sig = tl.tidy(res, max_pval_adj=FDR)
    _write_csv(sig, files["significant"])
    _write_csv(qc.reset_index(), files["qc"])
    de_genes = pd.Series((res.layers["pvals_adj"] < FDR).sum(axis=1), index=res.obs_names, name="n_de_genes")
    seconds["total"] = time.perf_counter() - t0
    return RunSummary(
        n_obs_input=n_obs_input,
        n_vars_input=n_vars_input,
        n_obs_kept=adata.n_obs,
        n_vars_kept=adata.n_vars,
        n_control_cells=int(res.uns["pertscale"]["settings"]["n_control_cells"]),
        perturbations_tested=list(res.obs_names),
        perturbations_dropped=dropped,
        de_genes=de_genes,
        files=files,
        seconds=seconds,
    )


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

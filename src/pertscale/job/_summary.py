"""What the main job did, in lines: cells, genes and perturbations kept, DE genes per perturbation, time, files.

:class:`RunSummary` is what :func:`pertscale.run` returns and what
``pertscale run`` prints (:meth:`RunSummary.lines`). Why a perturbation was
not tested is the QC summary's own word (the filter that dropped it, as in
``qc.csv``), never a second wording.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..pp import QCSummary
from ._plan import Plan

#: Significance threshold of the tidy table and of the summary.
FDR = 0.05
#: Perturbations listed by name in the summary.
SHOWN = 20


@dataclass
class RunSummary:
    """What :func:`pertscale.run` did and where it wrote it.

    Attributes
    ----------
    n_obs_input, n_vars_input
        Cells and genes of the input.
    n_obs_kept, n_vars_kept, n_control_cells
        Cells and genes kept by the QC filters, and the control cells among them.
    perturbations_tested
        The labels tested, in the results' order.
    perturbations_dropped
        Label -> the filter that dropped it (``QCSummary.perturbations['reason']``:
        ``excluded``, ``min_genes``, ``min_cells_per_perturbation``).
    de_genes
        Per method, the genes with an adjusted p-value below :data:`FDR`, per perturbation.
    files
        Each output written, by key (:func:`pertscale.job.output_files`), and where it is.
    plan
        The plan the run followed.
    working_store
        The perturbation-sorted copy of an unsorted input, or ``None``.
    seconds
        Time per step.
    qc
        The QC summary of the run (:func:`pertscale.pp.qc_summary`): ``qc.csv`` is its ``perturbations``.
    """

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
    qc: QCSummary | None = None

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
            more = f", ... ({len(items)} in all)" if len(items) > SHOWN else ""
            out.append(f"not tested: {dropped}{more}; see qc.csv")
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

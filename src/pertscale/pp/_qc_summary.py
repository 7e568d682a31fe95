"""QC summary: metrics, the three filters and what each drops, from one pass; adaptive thresholds.

The filters are those of the main job (:func:`pertscale.run`), in this order:

1. cells whose label is in ``exclude_labels`` are dropped (``excluded``);
2. cells with fewer than ``min_genes`` detected genes (non-zero counts) are
   dropped (``min_genes``);
3. perturbations with fewer than ``min_cells_per_perturbation`` cells left
   after 1-2 are dropped with their cells (``min_cells_per_perturbation``;
   the control is never dropped for its size; a perturbation with no cell
   left after 2 is dropped for ``min_genes``);
4. genes detected in fewer than ``min_cells_per_gene`` of the cells kept by
   1-3 are dropped (``min_cells_per_gene``).

Step 4 counts cells that step 3 keeps, and step 3 depends on step 2; one
pass (:func:`pertscale.pp.qc_pass`) returns, per perturbation, the cells
passing step 2 in which each gene is detected, so the gene counts of any set
of kept perturbations are sums of its rows and no second pass is needed.

Adaptive thresholds follow crispyx's ``calculate_adaptive_qc_thresholds``:
a low percentile of cells per perturbation and of cells per gene, and a
tenth of the median genes per cell, each clipped to a fixed range.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd

from .._validation import check_number, check_shape, label_list
from ..io._read import subset
from ..variables import (
    DROPPED,
    EXCLUDED,
    IS_CONTROL,
    KEPT,
    MEAN_COUNTS,
    MIN_CELLS_PER_GENE,
    MIN_CELLS_PER_PERTURBATION,
    MIN_GENES,
    N_CELLS,
    N_CELLS_BY_COUNTS,
    N_CELLS_KEPT,
    N_CELLS_MIN_GENES,
    N_GENES_BY_COUNTS,
    PCT_COUNTS_MT,
    PCT_DROPOUT_BY_COUNTS,
    PERTURBATION,
    REASON,
    TOTAL,
    TOTAL_COUNTS,
    TOTAL_COUNTS_MT,
)
from ._qc import DEFAULT_EXCLUDE, _cell_stat, _check_labels, _gene_stat, _matrix_stats, mitochondrial_genes, qc_pass

logger = logging.getLogger(__name__)

#: Why an item is dropped, in the order the filters apply (``""``: kept).
REASONS = (EXCLUDED, MIN_GENES, MIN_CELLS_PER_PERTURBATION, MIN_CELLS_PER_GENE)
#: Percentile of the distributions that each mode of :func:`adaptive_qc_thresholds` takes.
MODES = {"conservative": 5.0, "aggressive": 10.0}
#: Range each adaptive threshold is clipped to (inclusive), as crispyx does.
ADAPTIVE_BOUNDS = {"min_genes": (5, 50), "min_cells_per_perturbation": (5, 50), "min_cells_per_gene": (5, 100)}
_SHOW = 10


@dataclass(frozen=True, eq=False, repr=False)
class QCSummary:
    """QC metrics, the filters' settings, and what each filter keeps and drops.

    Made by :func:`qc_summary`; ``reason`` columns hold ``""`` for a kept
    item, else the first filter that drops it (one of :data:`REASONS`).

    Attributes
    ----------
    cells
        ``n_obs`` rows indexed by ``obs_names``: ``perturbation`` (label as
        text), ``n_genes_by_counts`` (int64, genes with a non-zero count),
        ``total_counts`` (float64, counts), and with mitochondrial genes
        (``var['mt']`` or names starting ``MT-``/``mt-``)
        ``total_counts_mt`` (float64) and ``pct_counts_mt`` (float64,
        percent of ``total_counts``; NaN for a cell without counts);
        ``reason`` (str). Names and values as
        ``scanpy.pp.calculate_qc_metrics``.
    genes
        ``n_vars`` rows indexed by ``var_names``, over all cells:
        ``n_cells_by_counts`` (int64), ``total_counts``, ``mean_counts``
        (float64, counts per cell), ``pct_dropout_by_counts`` (float64,
        percent of cells with zero); and ``n_cells_kept`` (int64, kept cells
        in which the gene is detected: the number the gene filter bounds),
        ``reason`` (str).
    perturbations
        One row per label of ``obs[perturbation_column]`` (as text) and per
        label :func:`pertscale.io.prepare` left out of a working store (reason
        ``excluded``), most cells first: ``n_cells`` (int64, all cells),
        ``n_cells_min_genes`` (int64, cells with at least ``min_genes``
        genes; 0 for an excluded label), ``n_cells_kept`` (int64),
        ``is_control`` (bool), ``reason`` (str). ``pertscale run`` writes
        it as ``qc.csv``.
    perturbation_column
        The ``obs`` column of the labels.
    control_label
        The control label (never dropped for its size), or ``None``.
    min_genes, min_cells_per_perturbation, min_cells_per_gene
        The thresholds applied (whole numbers >= 0).
    exclude_labels
        The labels whose cells were dropped.
    n_noninteger_values
        Stored values that are not whole numbers: more than 0 means the
        matrix is not raw counts, and the thresholds mean something else.
    """

    cells: pd.DataFrame
    genes: pd.DataFrame
    perturbations: pd.DataFrame
    perturbation_column: str
    control_label: str | None
    min_genes: int
    min_cells_per_perturbation: int
    min_cells_per_gene: int
    exclude_labels: tuple[str, ...]
    n_noninteger_values: int

    @property
    def cell_mask(self) -> np.ndarray:
        """``(n_obs,)`` bool: the cells kept."""
        return (self.cells[REASON] == "").to_numpy()

    @property
    def gene_mask(self) -> np.ndarray:
        """``(n_vars,)`` bool: the genes kept."""
        return (self.genes[REASON] == "").to_numpy()

    @property
    def perturbation_mask(self) -> pd.Series:
        """Bool per label (indexed as :attr:`perturbations`): the perturbations kept."""
        return (self.perturbations[REASON] == "").rename(KEPT)

    @property
    def table(self) -> pd.DataFrame:
        """Cells, genes and perturbations: ``total``, ``kept``, ``dropped``, and dropped per reason.

        Rows ``cells``, ``genes``, ``perturbations``; columns ``total``,
        ``kept``, ``dropped`` and one per :data:`REASONS` (int64 counts).
        """
        rows = {}
        for name, frame in (("cells", self.cells), ("genes", self.genes), ("perturbations", self.perturbations)):
            counts = frame[REASON].value_counts()
            kept = int(counts.get("", 0))
            rows[name] = {TOTAL: len(frame), KEPT: kept, DROPPED: len(frame) - kept} | {
                reason: int(counts.get(reason, 0)) for reason in REASONS
            }
        return pd.DataFrame.from_dict(rows, orient="index").astype(np.int64)

    def apply(self, adata: ad.AnnData) -> ad.AnnData:
        """The kept cells and genes of ``adata``, lazily: no pass over the matrix.

        Parameters
        ----------
        adata
            The AnnData this summary was computed on (same ``obs_names`` and
            ``var_names`` in the same order).

        Returns
        -------
        anndata.AnnData
            A new object (``adata`` is left as it is) whose lazy matrices
            keep their row blocks (each block filtered where it is);
            in-memory matrices are sliced. ``obs`` gains
            ``n_genes_by_counts``, ``total_counts`` (and ``pct_counts_mt``),
            ``var`` gains ``n_cells`` (kept cells in which the gene is
            detected, as ``scanpy.pp.filter_genes`` names it), and
            ``uns['pertscale']['qc_summary']`` holds the thresholds and the
            :attr:`perturbations` table. Write it with
            :func:`pertscale.write`, which streams the matrix block by block.

        Raises
        ------
        ValueError
            If ``adata`` is not the object this summary describes.
        """
        if adata.shape != (len(self.cells), len(self.genes)) or not (
            adata.obs_names.equals(self.cells.index) and adata.var_names.equals(self.genes.index)
        ):
            raise ValueError(
                f"this QC summary describes {len(self.cells):,} cells x {len(self.genes):,} genes, but adata is "
                f"{adata.n_obs:,} x {adata.n_vars:,} or has other obs_names/var_names; apply it to the AnnData "
                "it was computed on, or call qc_summary on this one"
            )
        cells, genes = self.cell_mask, self.gene_mask
        out = subset(adata, obs_mask=cells, var_mask=genes)
        for col in (N_GENES_BY_COUNTS, TOTAL_COUNTS, PCT_COUNTS_MT):
            if col in self.cells.columns:
                out.obs[col] = self.cells[col].to_numpy()[cells]
        out.var[N_CELLS] = self.genes[N_CELLS_KEPT].to_numpy()[genes]
        settings = {
            "perturbation_column": self.perturbation_column,
            "min_genes": self.min_genes,
            "min_cells_per_perturbation": self.min_cells_per_perturbation,
            "min_cells_per_gene": self.min_cells_per_gene,
            "exclude_labels": np.asarray(self.exclude_labels, dtype=object),
        } | ({} if self.control_label is None else {"control_label": self.control_label})
        out.uns.setdefault("pertscale", {})["qc_summary"] = settings | {"perturbations": self.perturbations.copy()}
        return out

    def __repr__(self) -> str:
        t = self.table
        control = "no control label" if self.control_label is None else f"control {self.control_label!r}"
        excluded = ", ".join(map(repr, self.exclude_labels)) or "none"
        lines = [
            "QCSummary: " + ", ".join(f"{t.loc[k, 'kept']:,} of {t.loc[k, 'total']:,} {k}" for k in t.index) + " kept",
            f"obs[{self.perturbation_column!r}], {control}; min_genes={self.min_genes}, "
            f"min_cells_per_perturbation={self.min_cells_per_perturbation}, "
            f"min_cells_per_gene={self.min_cells_per_gene}; excluded labels: {excluded}",
            t.to_string(),
        ]
        dropped = self.perturbations.loc[self.perturbations[REASON] != "", REASON]
        if len(dropped):
            shown = ", ".join(f"{k} ({v})" for k, v in dropped.head(_SHOW).items())
            lines.append(
                f"perturbations dropped: {shown}" + (f", ... ({len(dropped)} in all)" if len(dropped) > _SHOW else "")
            )
        if self.n_noninteger_values:
            lines.append(f"warning: {self.n_noninteger_values:,} non-integer values: the matrix is not raw counts")
        return "\n".join(lines)


def _codes(labels: pd.Series, exclude: list[str]) -> tuple[pd.Index, np.ndarray]:
    """The labels not excluded (most cells first) and each cell's code among them (-1: excluded)."""
    counts = labels.value_counts(sort=True)
    names = counts.index[~counts.index.isin(exclude)]
    codes = pd.Categorical(labels.to_numpy(), categories=names).codes.astype(np.int64)
    return names, codes


def _keep(
    n_genes: np.ndarray,
    detection: np.ndarray,
    codes: np.ndarray,
    names: pd.Index,
    *,
    control_label: str | None,
    min_genes: int,
    min_cells_per_perturbation: int,
    min_cells_per_gene: int,
) -> dict[str, np.ndarray]:
    """Filters 2-4 from one pass: per cell and per group, whether kept; per gene, kept cells that detect it.

    ``detection`` is the ``(len(names), n_vars)`` count, from
    :func:`pertscale.pp.qc_pass`, of cells passing ``min_genes`` per group
    and gene.
    """
    cell_ok = (codes >= 0) & (n_genes >= min_genes)
    after = np.bincount(codes[cell_ok], minlength=len(names))
    is_control = np.asarray(names == control_label) if control_label is not None else np.zeros(len(names), bool)
    group_ok = (after > 0) & ((after >= min_cells_per_perturbation) | is_control)
    keep_cells = cell_ok & group_ok[np.maximum(codes, 0)]
    gene_cells = detection[group_ok].sum(axis=0, dtype=np.int64)
    return {
        "cell_ok": cell_ok,
        "after_min_genes": after,
        "group_ok": group_ok,
        "keep_cells": keep_cells,
        "gene_cells": gene_cells,
        "keep_genes": gene_cells >= min_cells_per_gene,
    }


def _check_something_left(summary: QCSummary) -> None:
    """Raise if a filter drops everything, naming the filter and a value that keeps some."""
    cells, reason = summary.cells, summary.cells[REASON]
    if reason.isin([EXCLUDED, MIN_GENES]).all():
        most = int(cells.loc[reason != EXCLUDED, N_GENES_BY_COUNTS].max())
        raise ValueError(
            f"min_genes={summary.min_genes} drops every cell: the most genes detected in one cell (not "
            f"excluded) is {most}; min_genes <= {most} keeps some"
        )
    if not summary.cell_mask.any():
        after = summary.perturbations[N_CELLS_MIN_GENES]
        largest, n = after.idxmax(), int(after.max())
        raise ValueError(
            f"min_cells_per_perturbation={summary.min_cells_per_perturbation} drops every perturbation: "
            f"after min_genes={summary.min_genes} the largest, {largest!r}, has {n} cells; "
            f"min_cells_per_perturbation <= {n} keeps some (or give control_label: the control is never dropped "
            "for its size)"
        )
    if not summary.gene_mask.any():
        detected = summary.genes[N_CELLS_KEPT]
        best, n = detected.idxmax(), int(detected.max())
        raise ValueError(
            f"min_cells_per_gene={summary.min_cells_per_gene} drops every gene: the gene detected in most "
            f"kept cells, {str(best)!r}, is detected in {n}; min_cells_per_gene <= {n} keeps some"
        )


def qc_summary(
    adata: ad.AnnData,
    *,
    perturbation_column: str,
    control_label: str | None = None,
    min_genes: int = 20,
    min_cells_per_perturbation: int = 20,
    min_cells_per_gene: int = 3,
    exclude_labels: Iterable[str] = DEFAULT_EXCLUDE,
    key_added: str = "qc",
    force: bool = False,
    allow_empty: bool = False,
) -> QCSummary:
    """QC metrics, the filters of the main job and what each drops, in one pass over the matrix.

    Computes one pass over the matrix here (plain ``dask.compute``: on the
    scheduler of the enclosing face, :func:`pertscale.cluster.using`, or
    Dask's current one); :meth:`QCSummary.apply` is lazy.

    The filters (see the module docstring): drop ``exclude_labels``, then
    cells with fewer than ``min_genes`` detected genes, then perturbations
    left with fewer than ``min_cells_per_perturbation`` cells (never the
    control), then genes detected in fewer than ``min_cells_per_gene`` of
    the cells kept. The defaults are the main job's (``pertscale run``), so
    the summary shows what a default run keeps. The same as, in scanpy on
    the data in memory, ``sc.pp.filter_cells(min_genes=...)``, dropping the small perturbations
    by ``obs[perturbation_column].value_counts()``, then
    ``sc.pp.filter_genes(min_cells=...)`` on the cells left. Nothing is
    filtered here: :meth:`QCSummary.apply` returns the filtered AnnData
    (lazily), and :func:`pertscale.write` writes it block by block.

    Parameters
    ----------
    adata
        ``n_obs x n_vars`` raw counts, lazy (:func:`pertscale.read`) or in
        memory.
    perturbation_column
        Column of ``obs`` with the perturbation labels.
    control_label
        The control label: never dropped by ``min_cells_per_perturbation``.
        ``None``: every label is filtered by its size.
    min_genes
        Cells with fewer genes with a non-zero count are dropped (20, as
        ``pertscale run --min-genes``).
    min_cells_per_perturbation
        Perturbations with fewer cells after ``min_genes`` are dropped (20,
        as ``--min-cells-per-perturbation``).
    min_cells_per_gene
        Genes detected (non-zero) in fewer of the kept cells are dropped (3,
        as ``--min-cells``).
    exclude_labels
        Labels whose cells are dropped first; default
        :data:`pertscale.pp.DEFAULT_EXCLUDE` (``("multiple",
        "unassigned")``, as ``--exclude-labels``; labels not present are
        ignored); ``()`` or ``None`` for none; a single string is one label.
    key_added
        Readable name of this result in the result store.
    force
        Run the pass even when a summary with equal settings is stored.
    allow_empty
        Return the summary even when a filter drops every cell, perturbation
        or gene, instead of raising: the caller checks what is left (the
        main job does, naming its own flags).

    Returns
    -------
    QCSummary
        Per-cell, per-gene and per-perturbation metrics with what is kept
        and why the rest is dropped; ``.table`` counts them, ``.apply``
        filters. Its tables are also stored in ``adata``'s result store,
        keyed by :class:`pertscale.QCSettings`: asked again with equal
        settings, it is returned without a pass. Labels whose cells
        :func:`pertscale.io.prepare` left out of a working store (its
        ``exclude_labels``, recorded in the store) are rows of
        ``perturbations`` too, with their cells in the input and reason
        ``excluded``: the table is the same for an input sorted already and
        for its working store. It is ``pertscale run``'s ``qc.csv``.

    Raises
    ------
    KeyError
        If ``perturbation_column`` is not in ``obs`` (the message lists the
        columns there are).
    TypeError
        If a threshold is not a number.
    ValueError
        If a threshold is not a whole number >= 0; ``control_label`` is not
        among the labels (the message lists those seen) or is excluded;
        labels are missing; every cell is excluded; a filter drops every
        cell, perturbation or gene, unless ``allow_empty`` (the message
        names the filter and a value that keeps some); or the matrix has no
        cells or genes, or holds NaN, infinite or negative values.
    """
    from ..analysis import QCSettings, build
    from ..store import cached

    exclude = tuple(label_list(exclude_labels, "exclude_labels"))
    settings = build(
        QCSettings,
        perturbation_column=perturbation_column,
        control_label=None if control_label is None else str(control_label),
        min_genes=min_genes,
        min_cells_per_perturbation=min_cells_per_perturbation,
        min_cells_per_gene=min_cells_per_gene,
        exclude_labels=exclude,
    )

    def run():
        summary = _qc_summary(
            adata,
            perturbation_column=perturbation_column,
            control_label=control_label,
            min_genes=min_genes,
            min_cells_per_perturbation=min_cells_per_perturbation,
            min_cells_per_gene=min_cells_per_gene,
            exclude_labels=exclude_labels,
        )
        stored = {
            "cells": summary.cells,
            "genes": summary.genes,
            "perturbations": summary.perturbations,
            "n_noninteger_values": summary.n_noninteger_values,
        }
        return stored, []

    summary = summary_from_store(settings, cached(adata, settings, run, key_added=key_added, force=force))
    if not allow_empty:
        _check_something_left(summary)
    return summary


def summary_from_store(settings, stored: dict) -> QCSummary:
    """The :class:`QCSummary` of a stored QC result (its tables) and its settings.

    Raises
    ------
    ValueError
        If :func:`pertscale.cleanup` removed its per-cell table.
    """
    if "cells" not in stored:
        raise ValueError("the per-cell table of this QC result was removed by ps.cleanup; run qc_summary again")
    return QCSummary(
        cells=stored["cells"],
        genes=stored["genes"],
        perturbations=stored["perturbations"],
        perturbation_column=settings.perturbation_column,
        control_label=settings.control_label,
        min_genes=settings.min_genes,
        min_cells_per_perturbation=settings.min_cells_per_perturbation,
        min_cells_per_gene=settings.min_cells_per_gene,
        exclude_labels=settings.exclude_labels,
        n_noninteger_values=int(stored["n_noninteger_values"]),
    )


def _qc_summary(
    adata: ad.AnnData,
    *,
    perturbation_column: str,
    control_label,
    min_genes,
    min_cells_per_perturbation,
    min_cells_per_gene,
    exclude_labels,
) -> QCSummary:
    """:func:`qc_summary` without the store."""
    thresholds = {
        name: check_number(value, name, integer=True, minimum=0)
        for name, value in (
            ("min_genes", min_genes),
            ("min_cells_per_perturbation", min_cells_per_perturbation),
            ("min_cells_per_gene", min_cells_per_gene),
        )
    }
    check_shape(adata)
    labels, exclude = _check_labels(adata, perturbation_column, control_label, exclude_labels)
    control_label = None if control_label is None else str(control_label)
    names, codes = _codes(labels, exclude)
    qc = qc_pass(adata, codes, len(names), min_genes=thresholds["min_genes"])
    n_genes = qc.cell(N_GENES_BY_COUNTS).astype(np.int64)
    kept = _keep(n_genes, qc.detection, codes, names, control_label=control_label, **thresholds)

    excluded = codes < 0
    cell_reason = np.full(adata.n_obs, "", dtype=object)
    cell_reason[~kept["keep_cells"]] = MIN_CELLS_PER_PERTURBATION
    cell_reason[~kept["cell_ok"]] = MIN_GENES
    cell_reason[excluded] = EXCLUDED
    cells = pd.DataFrame(index=adata.obs_names)
    cells[PERTURBATION] = labels.to_numpy()
    cells[N_GENES_BY_COUNTS] = n_genes
    cells[TOTAL_COUNTS] = qc.cell(TOTAL_COUNTS)
    if mitochondrial_genes(adata.var).any():
        cells[TOTAL_COUNTS_MT] = qc.cell(TOTAL_COUNTS_MT)
        with np.errstate(divide="ignore", invalid="ignore"):
            cells[PCT_COUNTS_MT] = qc.cell(TOTAL_COUNTS_MT) / qc.cell(TOTAL_COUNTS) * 100
    cells[REASON] = cell_reason

    genes = pd.DataFrame(index=adata.var_names)
    genes[N_CELLS_BY_COUNTS] = qc.gene(N_CELLS_BY_COUNTS).astype(np.int64)
    genes[TOTAL_COUNTS] = qc.gene(TOTAL_COUNTS)
    genes[MEAN_COUNTS] = qc.gene(TOTAL_COUNTS) / adata.n_obs
    genes[PCT_DROPOUT_BY_COUNTS] = (1 - qc.gene(N_CELLS_BY_COUNTS) / adata.n_obs) * 100
    genes[N_CELLS_KEPT] = kept["gene_cells"]
    genes[REASON] = np.where(kept["keep_genes"], "", MIN_CELLS_PER_GENE).astype(object)

    before = labels.value_counts(sort=True)
    per_group = pd.DataFrame(
        {
            "after": kept["after_min_genes"],
            KEPT: np.bincount(codes[kept["keep_cells"]], minlength=len(names)),
            REASON: np.where(
                kept["group_ok"], "", np.where(kept["after_min_genes"] == 0, MIN_GENES, MIN_CELLS_PER_PERTURBATION)
            ),
        },
        index=names,
    )
    perturbations = pd.DataFrame({N_CELLS: before.to_numpy(np.int64)}, index=before.index.astype(str))
    perturbations[N_CELLS_MIN_GENES] = per_group["after"].reindex(perturbations.index, fill_value=0).astype(np.int64)
    perturbations[N_CELLS_KEPT] = per_group[KEPT].reindex(perturbations.index, fill_value=0).astype(np.int64)
    perturbations[IS_CONTROL] = perturbations.index == control_label
    perturbations[REASON] = per_group[REASON].reindex(perturbations.index, fill_value=EXCLUDED).astype(object)
    perturbations = _with_prepared_exclusions(perturbations, adata, perturbation_column)
    perturbations.index.name = perturbation_column

    summary = QCSummary(
        cells=cells,
        genes=genes,
        perturbations=perturbations,
        perturbation_column=perturbation_column,
        control_label=control_label,
        exclude_labels=tuple(exclude),
        n_noninteger_values=int(qc.gene("n_noninteger").sum()),
        **thresholds,
    )
    if summary.n_noninteger_values:
        logger.warning(
            "%d values are not whole numbers: qc_summary expects raw counts (min_genes and min_cells_per_gene "
            "count non-zero entries, which normalization keeps, but total_counts is then not UMIs)",
            summary.n_noninteger_values,
        )
    logger.info("qc_summary:\n%s", summary.table.to_string())
    return summary


def _with_prepared_exclusions(perturbations: pd.DataFrame, adata: ad.AnnData, perturbation_column: str) -> pd.DataFrame:
    """``perturbations`` with a row for each label :func:`pertscale.io.prepare` left out of the working store.

    Their cells are not in ``adata``: their number in the input comes from
    the store's record (``uns['pertscale']['source']['excluded_cells']``).
    Rows stay ordered by cells, most first.
    """
    source = (adata.uns.get("pertscale") or {}).get("source") or {}
    record = source.get("excluded_cells") if isinstance(source, dict) else None
    if not record or record.get("perturbation_column") != perturbation_column:
        return perturbations
    counts = pd.Series(np.asarray(record["n_cells"], dtype=np.int64), index=np.asarray(record["labels"]).astype(str))
    counts = counts[~counts.index.isin(perturbations.index)]
    if counts.empty:
        return perturbations
    rows = pd.DataFrame(
        {N_CELLS: counts, N_CELLS_MIN_GENES: 0, N_CELLS_KEPT: 0, IS_CONTROL: False, REASON: EXCLUDED}
    ).astype(perturbations.dtypes.to_dict())
    return pd.concat([perturbations, rows]).sort_values(N_CELLS, ascending=False, kind="stable")


@dataclass(frozen=True)
class QCThresholds:
    """Thresholds for :func:`qc_summary` from the data, and the numbers they come from.

    Attributes
    ----------
    min_genes
        ``median_genes_per_cell // 10``, clipped to
        ``ADAPTIVE_BOUNDS['min_genes']`` (5 to 50).
    min_cells_per_perturbation
        ``floor(perturbation_size_percentile)``, clipped to 5 to 50.
    min_cells_per_gene
        ``floor(cells_per_gene_percentile)``, clipped to 5 to 100.
    mode
        ``"conservative"``, ``"aggressive"`` or ``"percentile"`` (given).
    percentile
        The percentile taken (0-100).
    median_genes_per_cell
        Median over the cells used of genes with a non-zero count.
    perturbation_size_percentile
        That percentile of the cells per perturbation label (all cells, the
        control and excluded labels left out), before rounding and clipping.
    cells_per_gene_percentile
        That percentile over genes of the cells in which each gene is
        detected (estimated for all the cells used, see ``n_cells_used``).
    n_cells_used
        Cells whose counts were read (all not excluded, or the sample).
    """

    min_genes: int
    min_cells_per_perturbation: int
    min_cells_per_gene: int
    mode: str
    percentile: float
    median_genes_per_cell: float
    perturbation_size_percentile: float
    cells_per_gene_percentile: float
    n_cells_used: int

    def as_kwargs(self) -> dict[str, int]:
        """The three thresholds by name, for ``qc_summary(adata, **thresholds.as_kwargs(), ...)``."""
        return {
            "min_genes": self.min_genes,
            "min_cells_per_perturbation": self.min_cells_per_perturbation,
            "min_cells_per_gene": self.min_cells_per_gene,
        }


def _clip(value: float, name: str) -> int:
    low, high = ADAPTIVE_BOUNDS[name]
    return int(min(max(np.floor(value), low), high))


def adaptive_qc_thresholds(
    adata: ad.AnnData,
    *,
    perturbation_column: str,
    mode: str = "conservative",
    percentile: float | None = None,
    control_label: str | None = None,
    exclude_labels: Iterable[str] = (),
    sample_size: int | None = None,
    random_state: int = 0,
) -> QCThresholds:
    """Thresholds for :func:`qc_summary` from percentiles of the data, in one pass over the matrix.

    Computes one pass over the matrix (or the sampled cells) here (plain
    ``dask.compute``: on the scheduler of the enclosing face,
    :func:`pertscale.cluster.using`, or Dask's current one); the thresholds
    are numbers.

    As crispyx's ``calculate_adaptive_qc_thresholds``:

    - ``min_cells_per_perturbation``: the ``percentile``-th percentile of
      the cells per perturbation label, rounded down, clipped to 5-50;
    - ``min_cells_per_gene``: the ``percentile``-th percentile over genes of
      the cells in which each is detected, rounded down, clipped to 5-100;
    - ``min_genes``: a tenth of the median genes detected per cell, rounded
      down, clipped to 5-50 (the same in both modes).

    ``mode="conservative"`` takes the 5th percentile and drops less,
    ``"aggressive"`` the 10th and drops more (its thresholds are never
    lower). crispyx names the two the other way round (its
    ``"conservative"`` is the 10th percentile); pass ``percentile=10`` for
    its default numbers. Percentiles are numpy's (linear interpolation).

    Parameters
    ----------
    adata
        ``n_obs x n_vars`` raw counts, lazy or in memory.
    perturbation_column
        Column of ``obs`` with the perturbation labels.
    mode
        ``"conservative"`` (5th percentile) or ``"aggressive"`` (10th).
    percentile
        A percentile in [0, 100] to take instead of the mode's.
    control_label
        Left out of the perturbation sizes (it is never filtered by size).
    exclude_labels
        Labels whose cells are left out of everything, as
        :func:`qc_summary` drops them.
    sample_size
        ``None`` (default): every cell, exact percentiles. A whole number
        >= 1: that many cells drawn at random without replacement
        (``random_state``); cells per gene are then counted on them and
        scaled by ``n_cells / sample_size``. Every row block is still read
        (the cells are spread over them): it saves computation, not I/O.
        The perturbation sizes come from ``obs`` and are always exact.
    random_state
        Seed of ``numpy.random.default_rng`` for the sample.

    Returns
    -------
    QCThresholds
        ``.as_kwargs()`` feeds :func:`qc_summary`.

    Raises
    ------
    KeyError
        If ``perturbation_column`` is not in ``obs``.
    ValueError
        If ``mode`` is unknown, ``percentile`` is outside [0, 100],
        ``sample_size`` is not a whole number >= 1, ``random_state`` not a
        whole number >= 0 (numpy's seeds), ``control_label`` is not
        among the labels, every cell is excluded, or the matrix is empty or
        holds NaN, infinite or negative values.
    """
    if percentile is None:
        if mode not in MODES:
            known = ", ".join(f"{m!r} ({p:g}th percentile)" for m, p in MODES.items())
            raise ValueError(f"mode {mode!r} is not known; choose {known}, or give percentile=")
        percentile = MODES[mode]
    else:
        percentile = check_number(percentile, "percentile", minimum=0, maximum=100)
        mode = "percentile"
    sample_size = check_number(sample_size, "sample_size", integer=True, minimum=1, allow_none=True)
    random_state = check_number(random_state, "random_state", integer=True, minimum=0)  # numpy's seeds
    check_shape(adata)
    labels, exclude = _check_labels(adata, perturbation_column, control_label, exclude_labels)
    kept = ~labels.isin(exclude).to_numpy()
    sizes = labels[kept & (labels != str(control_label)).to_numpy()].value_counts()
    if sizes.empty:
        raise ValueError(
            f"obs[{perturbation_column!r}] has no label other than the control {control_label!r} that is not "
            "excluded: there are no perturbation sizes to take a percentile of"
        )
    n_kept = int(kept.sum())
    use = kept
    if sample_size is not None and sample_size < n_kept:
        rng = np.random.default_rng(random_state)
        use = np.zeros(adata.n_obs, dtype=bool)
        use[rng.choice(np.flatnonzero(kept), size=sample_size, replace=False)] = True
    cells, genes = _matrix_stats(
        adata if use.all() else subset(adata, obs_mask=use),
        desc="adaptive QC thresholds",
    )
    n_used = int(use.sum())
    n_genes = _cell_stat(cells, N_GENES_BY_COUNTS)
    cells_per_gene = _gene_stat(genes, N_CELLS_BY_COUNTS) * (n_kept / n_used)
    size_p = float(np.percentile(sizes.to_numpy(), percentile))
    gene_p = float(np.percentile(cells_per_gene, percentile))
    median_genes = float(np.median(n_genes))
    out = QCThresholds(
        min_genes=_clip(median_genes // 10, "min_genes"),
        min_cells_per_perturbation=_clip(size_p, "min_cells_per_perturbation"),
        min_cells_per_gene=_clip(gene_p, "min_cells_per_gene"),
        mode=mode,
        percentile=float(percentile),
        median_genes_per_cell=median_genes,
        perturbation_size_percentile=size_p,
        cells_per_gene_percentile=gene_p,
        n_cells_used=n_used,
    )
    logger.info("adaptive QC thresholds (%s, %gth percentile): %s", mode, percentile, out.as_kwargs())
    return out

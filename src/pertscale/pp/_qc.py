"""Quality control: streaming metrics and filters on lazy AnnData."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._deprecation import renamed_arguments
from .._progress import labelled
from .._validation import as_actual, check_control, check_number, check_shape, label_list, perturbation_labels
from ..io._read import as_dask, subset
from ..kernels.qc import CELL_STATS, GENE_STATS, cell_stats, gene_stats
from ..variables import (
    EXCLUDED,
    LOG1P_MEAN_COUNTS,
    LOG1P_N_GENES_BY_COUNTS,
    LOG1P_TOTAL_COUNTS,
    LOG1P_TOTAL_COUNTS_MT,
    MEAN_COUNTS,
    MIN_CELLS_PER_PERTURBATION,
    MT,
    N_CELLS,
    N_CELLS_AFTER,
    N_CELLS_BEFORE,
    N_CELLS_BY_COUNTS,
    N_COUNTS,
    N_GENES,
    N_GENES_BY_COUNTS,
    PCT_COUNTS_MT,
    PCT_DROPOUT_BY_COUNTS,
    PERTURBATION,
    REASON,
    RENAMED_ARGUMENTS,
    TOTAL_COUNTS,
    TOTAL_COUNTS_MT,
)

logger = logging.getLogger(__name__)

#: Labels of cells without a clean perturbation call, excluded by default in ``pertscale run``.
DEFAULT_EXCLUDE = ("multiple", "unassigned")


def _stats_graphs(x: da.Array, mt_mask: np.ndarray | None):
    cells = x.map_blocks(cell_stats, mt_mask, dtype=np.float64, chunks=(x.chunks[0], (len(CELL_STATS),)))
    genes = da.blockwise(
        gene_stats,
        "isj",
        x,
        "ij",
        new_axes={"s": len(GENE_STATS)},
        adjust_chunks={"i": 1},
        dtype=np.float64,
        meta=np.empty((0, 0, 0), dtype=np.float64),
    ).sum(axis=0, split_every=8)
    return cells, genes


def _gene_stat(genes: np.ndarray, name: str) -> np.ndarray:
    return genes[GENE_STATS.index(name)]


def _cell_stat(cells: np.ndarray, name: str) -> np.ndarray:
    return cells[:, CELL_STATS.index(name)]


def _check_gene_stats(genes: np.ndarray) -> None:
    n_nan, n_inf = int(_gene_stat(genes, "n_nan").sum()), int(_gene_stat(genes, "n_infinite").sum())
    if n_nan or n_inf:
        raise ValueError(
            f"the matrix contains {n_nan:,} NaN and {n_inf:,} infinite values; "
            "remove or impute them before analysis (raw UMI counts are finite)"
        )
    n_negative = int(_gene_stat(genes, "n_negative").sum())
    if n_negative:
        raise ValueError(
            f"the matrix contains {n_negative:,} negative values; pertscale expects raw UMI counts "
            "(non-negative integers) here: pass the raw counts (e.g. --layer counts), not scaled data"
        )


def _matrix_stats(adata: ad.AnnData, *, mt_mask=None, desc=None):
    """One pass over ``X``: per-cell and per-gene statistics, values checked."""
    x = as_dask(adata.X)
    cells, genes = _stats_graphs(x, mt_mask)
    with labelled(desc or "QC metrics"):
        cells, genes = dask.compute(cells, genes)
    _check_gene_stats(genes)
    return cells, genes


def _detection_chunk(block, codes, min_genes):
    from ..kernels.qc import detection_by_group

    block = sp.csr_matrix(block)
    keep = _cell_stat(cell_stats(block), N_GENES_BY_COUNTS) >= min_genes
    return detection_by_group(block, codes, keep, np.unique(codes[codes >= 0]))


@dataclass(frozen=True)
class QCPass:
    """What one pass over the matrix tells the main job.

    Attributes
    ----------
    cells
        ``(n_obs, len(CELL_STATS))`` float64 per-cell statistics.
    genes
        ``(len(GENE_STATS), n_vars)`` float64 per-gene sums (value checks included).
    detection
        ``(n_codes, n_vars)`` int32: per group code, the cells with at least
        ``min_genes`` detected genes in which each gene is detected (each
        block returns the rows of its own groups; 330 MB at 10,000
        perturbations x 8,248 genes, held by the client).
    """

    cells: np.ndarray
    genes: np.ndarray
    detection: np.ndarray

    def cell(self, name: str) -> np.ndarray:
        """A per-cell statistic by name."""
        return _cell_stat(self.cells, name)

    def gene(self, name: str) -> np.ndarray:
        """A per-gene sum by name."""
        return _gene_stat(self.genes, name)


def qc_pass(adata: ad.AnnData, codes: np.ndarray, n_codes: int, *, min_genes: int) -> QCPass:
    """QC metrics, value checks and per-group gene detection, in one pass over the matrix.

    The gene filter of the main job counts, per gene, the cells that pass
    the cell filter and belong to a perturbation that is kept; which
    perturbations are kept depends on the cell filter. So the pass returns
    the detection counts per group, and the filter adds those of the kept
    groups: the filters need no second pass.

    Parameters
    ----------
    adata
        Raw counts.
    codes
        ``(n_obs,)`` group code of each cell (-1: not counted).
    n_codes
        Number of codes.
    min_genes
        Cells with fewer detected genes are not counted in ``detection``.

    Raises
    ------
    ValueError
        If the matrix holds NaN, infinite or negative values.
    """
    x = as_dask(adata.X)
    mt = mitochondrial_genes(adata.var)
    cells, genes = _stats_graphs(x, mt if mt.any() else None)
    codes = np.asarray(codes, dtype=np.int64)
    bounds = np.cumsum((0,) + x.chunks[0])
    present = [np.unique(codes[a:b][codes[a:b] >= 0]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    detection = da.blockwise(
        _detection_chunk,
        "ij",
        x,
        "ij",
        da.from_array(codes, chunks=(x.chunks[0],)),
        "i",
        int(min_genes),
        None,
        adjust_chunks={"i": tuple(len(p) for p in present)},
        concatenate=True,
        dtype=np.int32,
        meta=np.empty((0, 0), dtype=np.int32),
    )
    with labelled("QC"):
        cells, genes, rows = dask.compute(cells, genes, detection)
    _check_gene_stats(genes)
    total = np.zeros((n_codes, x.shape[1]), dtype=np.int32)  # 4 bytes per group and gene, in this process
    np.add.at(total, np.concatenate(present) if present else np.empty(0, np.int64), rows)
    return QCPass(cells=cells, genes=genes, detection=total)


def mitochondrial_genes(var: pd.DataFrame) -> np.ndarray:
    """Boolean mask of mitochondrial genes: ``var['mt']`` if present, else
    gene names starting with ``MT-`` or ``mt-`` (in ``var_names`` or a
    ``gene_symbols``/``gene_name`` column).
    """
    if "mt" in var.columns:
        return var["mt"].to_numpy(dtype=bool)
    names = pd.Series(var.index.astype(str))
    for col in ("gene_symbols", "gene_name", "gene_symbol", "feature_name"):
        if col in var.columns:
            names = var[col].astype(str).reset_index(drop=True)
            break
    return names.str.startswith(("MT-", "mt-")).to_numpy()


def calculate_qc_metrics(
    adata: ad.AnnData,
    *,
    perturbation_column: str | None = None,
    inplace: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Per-cell, per-gene and per-perturbation QC metrics in one pass.

    Computes one pass over the matrix here (plain ``dask.compute``: on the
    scheduler of the enclosing face, :func:`pertscale.cluster.using`, or
    Dask's current one); the metrics are small (per cell, per gene).

    Column names and values follow ``scanpy.pp.calculate_qc_metrics`` (with
    ``qc_vars=['mt']`` when mitochondrial genes are present, ``percent_top=None``).

    Parameters
    ----------
    adata
        ``n_obs x n_vars`` raw counts (lazy or in memory).
    perturbation_column
        If given, cells per perturbation go to
        ``uns['pertscale']['perturbation_counts']`` (a DataFrame).
    inplace
        Write the metrics into ``obs``/``var`` (default) or return them.

    Returns
    -------
    tuple of pandas.DataFrame or None
        ``(obs_metrics, var_metrics)`` when ``inplace=False``. Per cell:
        ``n_genes_by_counts``, ``log1p_n_genes_by_counts``, ``total_counts``,
        ``log1p_total_counts`` and, with mitochondrial genes (``var['mt']``
        or names starting ``MT-``), ``total_counts_mt``,
        ``log1p_total_counts_mt``, ``pct_counts_mt`` (percent). Per gene:
        ``n_cells_by_counts``, ``mean_counts``, ``log1p_mean_counts``,
        ``pct_dropout_by_counts`` (percent), ``total_counts``,
        ``log1p_total_counts``. Natural logarithms. The number of
        non-integer values (a sign of normalized data) goes to
        ``uns['pertscale']['n_noninteger_values']``. With ``inplace=True``
        on a view (``adata[mask]``), ``adata`` first becomes an actual
        AnnData holding a copy of its data, as scanpy does (anndata's
        ``ImplicitModificationWarning``); its parent is left as it was.

    Raises
    ------
    ValueError
        If the matrix has no cells or no genes, or holds NaN, infinite or
        negative values.
    """
    check_shape(adata)
    mt = mitochondrial_genes(adata.var)
    has_mt = bool(mt.any())
    cells, genes = _matrix_stats(adata, mt_mask=mt if has_mt else None, desc="QC metrics")
    obs = pd.DataFrame(index=adata.obs_names)
    obs[N_GENES_BY_COUNTS] = _cell_stat(cells, N_GENES_BY_COUNTS).astype(np.int64)
    obs[LOG1P_N_GENES_BY_COUNTS] = np.log1p(_cell_stat(cells, N_GENES_BY_COUNTS))
    obs[TOTAL_COUNTS] = _cell_stat(cells, TOTAL_COUNTS)
    obs[LOG1P_TOTAL_COUNTS] = np.log1p(_cell_stat(cells, TOTAL_COUNTS))
    if has_mt:
        obs[TOTAL_COUNTS_MT] = _cell_stat(cells, TOTAL_COUNTS_MT)
        obs[LOG1P_TOTAL_COUNTS_MT] = np.log1p(_cell_stat(cells, TOTAL_COUNTS_MT))
        with np.errstate(divide="ignore", invalid="ignore"):
            obs[PCT_COUNTS_MT] = _cell_stat(cells, TOTAL_COUNTS_MT) / _cell_stat(cells, TOTAL_COUNTS) * 100
    var = pd.DataFrame(index=adata.var_names)
    n_obs = adata.n_obs
    var[N_CELLS_BY_COUNTS] = _gene_stat(genes, N_CELLS_BY_COUNTS).astype(np.int64)
    var[MEAN_COUNTS] = _gene_stat(genes, TOTAL_COUNTS) / n_obs
    var[LOG1P_MEAN_COUNTS] = np.log1p(var[MEAN_COUNTS])
    var[PCT_DROPOUT_BY_COUNTS] = (1 - _gene_stat(genes, N_CELLS_BY_COUNTS) / n_obs) * 100
    var[TOTAL_COUNTS] = _gene_stat(genes, TOTAL_COUNTS)
    var[LOG1P_TOTAL_COUNTS] = np.log1p(_gene_stat(genes, TOTAL_COUNTS))
    if not inplace:
        return obs, var
    as_actual(adata)  # a view becomes an actual AnnData (a copy), as scanpy's: its parent is not written to
    for col in obs.columns:
        adata.obs[col] = obs[col].to_numpy()
    for col in var.columns:
        adata.var[col] = var[col].to_numpy()
    if has_mt and MT not in adata.var.columns:
        adata.var[MT] = mt
    adata.uns.setdefault("pertscale", {})["n_noninteger_values"] = int(_gene_stat(genes, "n_noninteger").sum())
    if perturbation_column is not None:
        labels = perturbation_labels(adata.obs, perturbation_column)
        counts = labels.value_counts().rename_axis(PERTURBATION).rename(N_CELLS).to_frame()
        adata.uns.setdefault("pertscale", {})["perturbation_counts"] = counts
    return None


def _bounds_mask(values, low, high) -> np.ndarray:
    mask = np.ones(values.shape[0], dtype=bool)
    if low is not None:
        mask &= values >= low
    if high is not None:
        mask &= values <= high
    return mask


def _check_bounds(**bounds) -> tuple:
    """Exactly one bound, a finite number >= 0 (whole for cell and gene numbers), as scanpy takes them."""
    given = [name for name, value in bounds.items() if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(bounds)} (as scanpy); got {given or 'none'}")
    return tuple(
        check_number(value, name, integer="counts" not in name, minimum=0, allow_none=True)
        for name, value in bounds.items()
    )


#: What each filter bounds: (axis, statistic of the detected-entries bound, column it adds for it).
_FILTERS = {
    "cells": ("obs", N_GENES_BY_COUNTS, N_GENES, N_COUNTS),
    "genes": ("var", N_CELLS_BY_COUNTS, N_CELLS, N_COUNTS),
}


#: How the drop-everything error names the largest and the smallest of each number a filter bounds.
_WHAT = {
    N_GENES_BY_COUNTS: ("the most genes detected in one cell", "the fewest genes detected in one cell"),
    N_CELLS_BY_COUNTS: ("the most cells that detect one gene", "the fewest cells that detect one gene"),
    TOTAL_COUNTS: ("the largest total count of one {item}", "the smallest total count of one {item}"),
}


def _filter(adata: ad.AnnData, which: str, detected: tuple, counts: tuple, *, names: tuple):
    """The one implementation of filter_cells and filter_genes: one pass, then a lazy subset.

    ``names`` are the names of the four bounds (min and max of detected
    entries, min and max of counts), for the error when nothing is kept.
    """
    check_shape(adata)
    axis, detected_stat, detected_col, counts_col = _FILTERS[which]
    cells, genes = _matrix_stats(adata, desc=f"filter {which}")
    by_detected = any(b is not None for b in detected)
    stat = detected_stat if by_detected else TOTAL_COUNTS
    numbers = _cell_stat(cells, stat) if axis == "obs" else _gene_stat(genes, stat)
    numbers = numbers.astype(np.int64) if by_detected else numbers
    bounds = detected if by_detected else counts
    mask = _bounds_mask(numbers, *bounds)
    logger.info("filter_%s: %d of %d kept", which, int(mask.sum()), mask.size)
    if not mask.any():
        low = bounds[0] is not None
        name = names[(0 if by_detected else 2) + (0 if low else 1)]
        item = "cell" if axis == "obs" else "gene"
        best = numbers.max() if low else numbers.min()
        best = int(best) if by_detected else float(best)
        raise ValueError(
            f"{name}={bounds[0] if low else bounds[1]!r} drops every {item}: "
            f"{_WHAT[stat][0 if low else 1].format(item=item)} is {best!r}; "
            f"{name} {'<=' if low else '>='} {best!r} keeps some"
        )
    out = subset(adata, obs_mask=mask) if axis == "obs" else subset(adata, var_mask=mask)
    getattr(out, axis)[detected_col if by_detected else counts_col] = numbers[mask]
    return out


def filter_cells(
    adata: ad.AnnData,
    *,
    min_genes: int | None = None,
    min_counts: float | None = None,
    max_genes: int | None = None,
    max_counts: float | None = None,
) -> ad.AnnData:
    """Keep cells within bounds on detected genes or total counts.

    Computes one pass over the matrix (the genes detected per cell) here
    (plain ``dask.compute``: on the scheduler of the enclosing face,
    :func:`pertscale.cluster.using`, or Dask's current one); the filtered
    matrix it returns is lazy.

    Same bounds as ``scanpy.pp.filter_cells`` (inclusive): one pass computes
    the per-cell numbers, then the kept cells are returned as a new AnnData
    whose matrix is a lazy slice (no copy of the data). ``adata`` is left as
    it is: anndata has no public way to subset an object in place.

    Parameters
    ----------
    adata
        Raw counts.
    min_genes, max_genes
        Bounds on genes with a non-zero count.
    min_counts, max_counts
        Bounds on total counts.

    Returns
    -------
    anndata.AnnData
        The kept cells, with ``obs['n_genes']`` (or ``obs['n_counts']``).

    Raises
    ------
    ValueError
        If not exactly one bound is given, the bound is not a finite number
        >= 0 (a whole number of genes), the matrix has no cells or genes or
        holds NaN, infinite or negative values, or the bound keeps no cell
        (after the pass; the message names the bound and a value that keeps
        some).
    """
    bounds = _check_bounds(min_genes=min_genes, min_counts=min_counts, max_genes=max_genes, max_counts=max_counts)
    min_genes, min_counts, max_genes, max_counts = bounds
    return _filter(
        adata,
        "cells",
        (min_genes, max_genes),
        (min_counts, max_counts),
        names=("min_genes", "max_genes", "min_counts", "max_counts"),
    )


def filter_genes(
    adata: ad.AnnData,
    *,
    min_cells: int | None = None,
    min_counts: float | None = None,
    max_cells: int | None = None,
    max_counts: float | None = None,
) -> ad.AnnData:
    """Keep genes within bounds on expressing cells or total counts.

    Computes one pass over the matrix (the cells per gene) here (plain
    ``dask.compute``: on the scheduler of the enclosing face,
    :func:`pertscale.cluster.using`, or Dask's current one); the filtered
    matrix it returns is lazy.

    Same bounds as ``scanpy.pp.filter_genes``; one pass, then a new AnnData
    with the kept genes (a lazy slice), as :func:`filter_cells`.

    Parameters
    ----------
    adata
        Raw counts.
    min_cells, max_cells
        Bounds on cells with a non-zero count.
    min_counts, max_counts
        Bounds on total counts.

    Returns
    -------
    anndata.AnnData
        The kept genes, with ``var['n_cells']`` (or ``var['n_counts']``).

    Raises
    ------
    ValueError
        If not exactly one bound is given, the bound is not a finite number
        >= 0 (a whole number of cells), the matrix has no cells or genes or
        holds NaN, infinite or negative values, or the bound keeps no gene
        (after the pass; the message names the bound and a value that keeps
        some).
    """
    bounds = _check_bounds(min_cells=min_cells, min_counts=min_counts, max_cells=max_cells, max_counts=max_counts)
    min_cells, min_counts, max_cells, max_counts = bounds
    return _filter(
        adata,
        "genes",
        (min_cells, max_cells),
        (min_counts, max_counts),
        names=("min_cells", "max_cells", "min_counts", "max_counts"),
    )


def _check_labels(adata, perturbation_column, control_label, exclude_labels) -> tuple[pd.Series, list[str]]:
    """The labels as text and the excluded ones, refused when the control is absent or excluded or nothing is left."""
    labels = perturbation_labels(adata.obs, perturbation_column)
    exclude = label_list(exclude_labels, "exclude_labels")
    if control_label is not None:
        check_control(labels, str(control_label), perturbation_column, min_cells=1)
        if str(control_label) in exclude:
            raise ValueError(
                f"exclude_labels includes the control label {str(control_label)!r}: no control cell would be left; "
                "remove it from exclude_labels"
            )
    if labels.isin(exclude).all():
        raise ValueError(
            f"every cell's label in obs[{perturbation_column!r}] is in exclude_labels "
            f"({', '.join(map(repr, exclude))}): no cell is left; remove some labels from exclude_labels"
        )
    return labels, exclude


@renamed_arguments(
    positional=("perturbation_column", "control_label"), renamed=RENAMED_ARGUMENTS["pp.filter_perturbations"]
)
def filter_perturbations(
    adata: ad.AnnData,
    *,
    perturbation_column: str,
    control_label: str | None = None,
    min_cells_per_perturbation: int | None = None,
    exclude_labels: Iterable[str] = (),
) -> ad.AnnData:
    """Drop cells by perturbation label: excluded labels and small groups.

    Computes nothing: the labels in ``obs`` decide, and the result is lazy.

    Reads only ``obs``, no pass over the matrix; returns a new AnnData (a
    lazy slice of the matrix), ``adata`` is left as it is.

    Parameters
    ----------
    adata
        Cells with a perturbation label.
    perturbation_column
        Column of ``obs`` with the labels (keyword-only, as every option;
        given positionally, as in earlier releases, it is still taken for one
        release with a ``FutureWarning``).
    control_label
        The control label, never dropped by ``min_cells_per_perturbation``
        (keyword-only, likewise).
    min_cells_per_perturbation
        Perturbations with fewer cells are dropped (as in
        :func:`qc_summary`; its earlier name ``min_cells`` is still taken for
        one release with a ``FutureWarning``: elsewhere ``min_cells`` is a
        gene's cells, as in scanpy).
    exclude_labels
        Labels whose cells are dropped, e.g. ``("multiple", "unassigned")``;
        a single string is one label.

    Returns
    -------
    anndata.AnnData
        The kept cells. ``uns['pertscale']['perturbation_filter']`` is a
        table with one row per label seen: ``n_cells_before``,
        ``n_cells_after``, ``reason`` (``""``, ``"excluded"`` or
        ``"min_cells_per_perturbation"``).

    Raises
    ------
    KeyError
        If the column is missing.
    ValueError
        If ``min_cells_per_perturbation`` is not a whole number >= 0; labels
        are missing or collide as text; ``control_label`` is not among the
        labels (the message lists those seen) or is excluded; every cell is
        excluded; or ``min_cells_per_perturbation`` drops every perturbation
        (the message names the largest). All from ``obs``, before anything
        is read.

    Warns
    -----
    FutureWarning
        If ``perturbation_column`` or ``control_label`` is given
        positionally, or ``min_cells`` is given: earlier spellings.
    """
    min_size = check_number(
        min_cells_per_perturbation, MIN_CELLS_PER_PERTURBATION, integer=True, minimum=0, allow_none=True
    )
    labels, exclude = _check_labels(adata, perturbation_column, control_label, exclude_labels)
    before = labels.value_counts()
    exclude = set(exclude)
    reason = pd.Series("", index=before.index, dtype=object)
    reason[before.index.isin(exclude)] = EXCLUDED
    if min_size is not None:
        small = (before < min_size) & (reason == "") & (before.index != str(control_label))
        reason[small] = MIN_CELLS_PER_PERTURBATION
    keep_labels = set(reason.index[reason == ""])
    if not keep_labels:  # only the size bound can leave nothing here: with a control label, the control stays
        left = before[reason != EXCLUDED]
        raise ValueError(
            f"min_cells_per_perturbation={min_size} drops every perturbation: the largest, {left.index[0]!r}, has "
            f"{int(left.iloc[0])} cells; min_cells_per_perturbation <= {int(left.iloc[0])} keeps some (or give "
            "control_label: the control is never dropped for its size)"
        )
    mask = labels.isin(keep_labels).to_numpy()
    table = pd.DataFrame({N_CELLS_BEFORE: before, N_CELLS_AFTER: before.where(reason == "", 0), REASON: reason})
    table.index.name = perturbation_column
    out = subset(adata, obs_mask=mask)
    out.uns.setdefault("pertscale", {})["perturbation_filter"] = table
    return out

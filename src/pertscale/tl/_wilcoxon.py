"""Differential expression of every perturbation against control: orchestration.

The Dask layer only builds graphs; the arithmetic is in
:mod:`pertscale.kernels.wilcoxon`.

1. The control rows are gathered once and reduced to the frozen control
   summary (:func:`~pertscale.kernels.wilcoxon.control_statistics`), which
   is persisted: on a distributed cluster it stays on a worker and every
   other worker fetches it once; locally it is one object in the graph.
2. The tested rows are reordered so that each row block holds whole
   perturbation groups (``dask.array.shuffle``; a no-op reorder when the
   input is already sorted by perturbation).
3. One ``blockwise`` pass maps each block plus the control summary to the
   finished statistics of its groups; blocks return rows for their own
   groups only.
"""

from __future__ import annotations

import importlib.metadata
import logging
import warnings

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._validation import (
    check_control,
    check_number,
    check_shape,
    check_writable_labels,
    get_matrix,
    label_list,
    perturbation_labels,
)
from ..cluster import compute, n_workers_of, persist, resolve_scheduler
from ..io._read import as_dask
from ._results import results_anndata, scanpy_uns

logger = logging.getLogger(__name__)

METHODS = ("wilcoxon",)


def _control_from_blocks(blocks):
    from ..kernels.wilcoxon import control_statistics

    return control_statistics(sp.vstack([sp.csr_matrix(b) for b in blocks], format="csr"))


def _join_controls(parts):
    from ..kernels.wilcoxon import concat_control_statistics

    return concat_control_statistics(parts)


#: Fewest genes per task of the control summary.
MIN_GENES_PER_CONTROL_TASK = 64


def control_summary(x: da.Array, control_rows: np.ndarray, *, n_parts: int = 1):
    """Lazy frozen control summary, computed over ``n_parts`` gene ranges.

    Each task sees the control cells of one range of genes only, so no task
    holds the whole control matrix and the ranges are summarised in
    parallel; the parts are joined into one summary (one object, for one
    broadcast).
    """
    ctrl = x[control_rows]
    n_genes = x.shape[1]
    n_parts = max(1, min(n_parts, n_genes // MIN_GENES_PER_CONTROL_TASK))
    bounds = np.linspace(0, n_genes, n_parts + 1).astype(int)
    parts = [
        dask.delayed(_control_from_blocks, pure=True)(ctrl[:, a:b].to_delayed().ravel().tolist())
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return parts[0] if n_parts == 1 else dask.delayed(_join_controls, pure=True)(parts)


def _wilcoxon_chunk(block, codes, control, tie_correct, use_continuity, corr_method):
    from ..kernels.wilcoxon import wilcoxon_block

    if codes.shape[0] == 0:
        from ..kernels.wilcoxon import WILCOXON_STATS

        return np.empty((0, len(WILCOXON_STATS), block.shape[1]), dtype=np.float64)
    # rows of one group are contiguous; run lengths give the group sizes
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    sizes = np.diff(np.r_[starts, codes.shape[0]])
    return wilcoxon_block(
        block, sizes, control, tie_correct=tie_correct, use_continuity=use_continuity, corr_method=corr_method
    )


def group_aligned(
    x: da.Array, rows_per_group: list[np.ndarray]
) -> tuple[da.Array, np.ndarray, tuple[int, ...], np.ndarray]:
    """Reorder rows so every block holds whole groups.

    When every group's rows are already one contiguous run (a store sorted by
    perturbation, in any group order, control anywhere), the runs are sliced
    and re-blocked at group boundaries: no data moves between workers.
    Otherwise the rows are reordered by ``dask.array.shuffle``.

    Parameters
    ----------
    x
        ``(n_obs, n_vars)`` Dask array of row blocks.
    rows_per_group
        Row positions of each group.

    Returns
    -------
    tuple
        The reordered array (full-width row blocks); the position, in
        ``rows_per_group``, of the group of each of its rows; the number of
        groups in each block; and ``order``, the groups in the order they
        appear in the array.
    """
    rows_per_group = [np.asarray(r, dtype=np.int64) for r in rows_per_group]
    contiguous = all(r.size and r[-1] - r[0] + 1 == r.size for r in rows_per_group)
    if contiguous:
        order = np.argsort([r[0] for r in rows_per_group], kind="stable")
    else:
        order = np.arange(len(rows_per_group))
    ordered = [rows_per_group[i] for i in order]
    sizes = np.array([r.size for r in ordered], dtype=np.int64)
    if contiguous:
        flat = np.concatenate(ordered)
        runs = np.split(flat, np.flatnonzero(np.diff(flat) != 1) + 1)
        pieces = [x[int(r[0]) : int(r[-1]) + 1] for r in runs]
        y = pieces[0] if len(pieces) == 1 else da.concatenate(pieces, axis=0)
        y = y.rechunk((_block_rows(sizes, max(x.chunks[0])), -1))
    else:
        # dask's shuffle splits the columns when a group is longer than the row chunks, which fails on
        # sparse blocks; our blocks hold whole groups anyway, so make the row chunks that long first
        longest = int(sizes.max())
        if longest > max(x.chunks[0]):
            x = x.rechunk({0: longest})
        y = x.shuffle([r.tolist() for r in ordered], axis=0)
        if y.numblocks[1] != 1:
            y = y.rechunk({1: -1})
    codes = np.repeat(order, sizes)
    bounds = np.cumsum((0,) + y.chunks[0])
    group_starts = np.concatenate([[0], np.cumsum(sizes)])
    if not np.isin(bounds, group_starts).all():  # pragma: no cover - both paths cut at group boundaries
        raise RuntimeError("internal error: a row block splits a perturbation group")
    per_block = tuple(
        int(np.searchsorted(group_starts, b) - np.searchsorted(group_starts, a))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    )
    return y, codes, per_block, order


def _block_rows(sizes: np.ndarray, budget: int) -> tuple[int, ...]:
    """Pack consecutive groups into blocks of about ``budget`` rows."""
    blocks: list[int] = []
    current = 0
    for s in sizes.tolist():
        if current and current + s > budget:
            blocks.append(current)
            current = 0
        current += s
    if current:
        blocks.append(current)
    return tuple(blocks)


def _warn_if_counts(adata: ad.AnnData, x: da.Array, layer: str | None, scheduler) -> None:
    """Warn when the matrix holds raw counts where log1p values are expected.

    Integer dtypes are counts for certain. A float matrix that
    :func:`pertscale.pp.log1p` (or scanpy's) has not marked in
    ``uns['log1p']`` is looked at in its first row block: whole numbers
    above 1 throughout are counts, not logarithms.
    """
    where = f"layers[{layer!r}]" if layer else "X"
    if np.issubdtype(x.dtype, np.floating) and "log1p" not in adata.uns and x.shape[0]:
        from ..cluster import compute

        (first,) = compute(x.blocks[0], scheduler=scheduler, progress=False)
        values = sp.csr_matrix(first).data[:100_000]
        counts_like = (
            values.size > 0 and values.min() >= 0 and values.max() > 1 and bool((values == np.round(values)).all())
        )
    else:
        counts_like = np.issubdtype(x.dtype, np.integer)
    if counts_like:
        warnings.warn(
            f"{where} looks like raw counts (whole numbers), but rank_genes_groups expects log1p-normalized "
            "values: the test runs, but logfoldchanges would be wrong (they undo log1p). Run "
            "ps.pp.normalize_total(adata) and ps.pp.log1p(adata) first",
            UserWarning,
            stacklevel=3,
        )


def rank_genes_groups(
    adata: ad.AnnData,
    perturbation_column: str,
    control_label: str,
    *,
    method: str = "wilcoxon",
    perturbations: list[str] | None = None,
    layer: str | None = None,
    tie_correct: bool = True,
    use_continuity: bool = False,
    corr_method: str = "benjamini-hochberg",
    min_cells: int = 2,
    scanpy_format: bool = False,
    scheduler=None,
    progress: bool | None = None,
) -> ad.AnnData:
    """Test every perturbation against the control cells, every gene.

    Parameters
    ----------
    adata
        ``n_obs x n_vars``; ``X`` (or ``layers[layer]``) holds non-negative
        log1p-normalized expression (natural log, as after
        :func:`pertscale.pp.normalize_total` and :func:`pertscale.pp.log1p`),
        lazy (Dask) or in memory.
    perturbation_column
        Column of ``obs`` naming each cell's perturbation.
    control_label
        Label of the control cells (e.g. non-targeting guides) in that column.
    method
        ``"wilcoxon"``: Wilcoxon rank-sum (Mann-Whitney U) test.
    perturbations
        Labels to test; default all labels other than ``control_label``.
    layer
        Test ``layers[layer]`` instead of ``X``.
    tie_correct
        Tie-corrected variance of U (default, as scanpy ``tie_correct=True``
        and scipy's ``mannwhitneyu``).
    use_continuity
        Continuity correction of 0.5 on ``|U - m n / 2|`` (off by default, as
        in scanpy; scipy's default is on).
    corr_method
        ``"benjamini-hochberg"`` (default) or ``"bonferroni"``, over the genes
        of each perturbation.
    min_cells
        Perturbations with fewer cells are skipped with a warning and listed
        in ``uns['pertscale']['skipped']``.
    scanpy_format
        Also write Scanpy's ``uns['rank_genes_groups']`` so that
        ``scanpy.get.rank_genes_groups_df`` works on the result.
    scheduler
        Where to compute; see :func:`pertscale.cluster.resolve_scheduler`.
    progress
        Show progress bars; default ``pertscale.settings.progress``.

    Returns
    -------
    anndata.AnnData
        ``n_perturbations x n_vars`` results: ``obs_names`` the perturbation
        labels, ``obs['n_cells']``; layers ``scores`` (z of U, positive when
        the perturbation ranks above control), ``pvals`` (two-sided, normal
        approximation), ``pvals_adj``, ``logfoldchanges`` (log2 of the ratio
        of ``expm1`` of the mean log1p values, scanpy's definition),
        ``pts``/``pts_rest`` (fraction of perturbed/control cells with a
        non-zero value) and ``u_statistic``; the settings in
        ``uns['pertscale']['settings']``.

    Raises
    ------
    KeyError
        If ``perturbation_column`` or ``layer`` is missing.
    ValueError
        If ``control_label`` is unknown, fewer than two control cells remain,
        every cell is a control cell, no perturbation can be tested, a label
        is empty or two labels are the same text (the integer ``1`` and the
        string ``"1"``), an option is not supported or out of range, the
        matrix has no cells or genes, or it holds NaN or negative values.
        All but the last are raised before any pass over the matrix.

    Warns
    -----
    UserWarning
        If the matrix looks like raw counts (an integer dtype, or whole
        numbers in a float matrix not marked by ``log1p``): fold changes
        assume log1p values. Also when gene names repeat (made unique).

    Notes
    -----
    Equal, to floating point accuracy, to
    ``scipy.stats.mannwhitneyu(group, control, method="asymptotic")`` per
    gene, and to ``scanpy.tl.rank_genes_groups(method="wilcoxon",
    reference=control_label, tie_correct=True)``. Where every value of a
    gene is tied in both groups (zero variance) the score is 0 and the
    p-value 1, as in scanpy (scipy returns NaN there).
    """
    from ..kernels.wilcoxon import CORR_METHODS, WILCOXON_STATS

    if method not in METHODS:
        raise ValueError(f"method {method!r} is not available; choose one of {METHODS}")
    if corr_method not in CORR_METHODS:
        raise ValueError(f"corr_method {corr_method!r} is not supported; choose one of {CORR_METHODS}")
    min_cells = check_number(min_cells, "min_cells", integer=True, minimum=1)
    check_shape(adata)
    labels = perturbation_labels(adata.obs, perturbation_column)
    control_mask = check_control(labels, control_label, perturbation_column)
    counts = labels[~control_mask].value_counts()
    if counts.empty:
        raise ValueError(
            f"every cell in obs[{perturbation_column!r}] is labelled {control_label!r} (control): "
            "there is no perturbation to test"
        )
    if perturbations is None:
        if isinstance(adata.obs[perturbation_column].dtype, pd.CategoricalDtype):
            order = [str(c) for c in adata.obs[perturbation_column].cat.categories]
        else:
            order = sorted(counts.index)
        candidates = [g for g in order if g in counts.index]
    else:
        candidates = list(dict.fromkeys(label_list(perturbations, "perturbations")))  # unique, order kept
        missing = [p for p in candidates if p not in counts.index]
        if missing:
            raise ValueError(
                f"perturbations not found in obs[{perturbation_column!r}] (or equal to the control label): "
                f"{missing}; labels seen: {sorted(counts.index)[:20]}"
            )
    skipped = [g for g in candidates if counts[g] < min_cells]
    groups = [g for g in candidates if counts[g] >= min_cells]
    if skipped:
        warnings.warn(
            f"{len(skipped)} perturbation(s) have fewer than {min_cells} cells and are not tested: {skipped[:20]}",
            UserWarning,
            stacklevel=2,
        )
    if not groups:
        raise ValueError(
            f"no perturbation in obs[{perturbation_column!r}] has at least {min_cells} cells; nothing to test"
        )
    check_writable_labels(groups, perturbation_column)

    x = as_dask(get_matrix(adata, layer))
    _warn_if_counts(adata, x, layer, scheduler)
    n_genes = x.shape[1]
    scheduler = resolve_scheduler(scheduler)
    control = persist(
        control_summary(x, np.flatnonzero(control_mask), n_parts=2 * n_workers_of(scheduler)),
        scheduler=scheduler,
        progress=progress,
        desc="control statistics",
    )

    label_values = labels.to_numpy()
    rows_per_group = [np.flatnonzero(label_values == g) for g in groups]
    y, codes, per_block, order = group_aligned(x, rows_per_group)
    codes_da = da.from_array(codes, chunks=(y.chunks[0],))
    out = da.blockwise(
        _wilcoxon_chunk,
        "isj",
        y,
        "ik",
        codes_da,
        "i",
        control,
        None,
        tie_correct,
        None,
        use_continuity,
        None,
        corr_method,
        None,
        new_axes={"s": len(WILCOXON_STATS), "j": n_genes},
        adjust_chunks={"i": per_block},
        concatenate=True,
        dtype=np.float64,
        meta=np.empty((0, 0, 0), dtype=np.float64),
    )
    (stats,) = compute(out, scheduler=scheduler, progress=progress, desc="wilcoxon")
    stats[order] = stats.copy()  # rows in the order of `groups`
    settings = {
        "method": method,
        "perturbation_column": perturbation_column,
        "control_label": str(control_label),
        "layer": layer or "X",
        "tie_correct": bool(tie_correct),
        "use_continuity": bool(use_continuity),
        "corr_method": corr_method,
        "min_cells": int(min_cells),
        "n_control_cells": int(control_mask.sum()),
        "logfoldchanges_base": "log2",
        "pertscale_version": importlib.metadata.version("pertscale"),
    }
    res = results_anndata(
        stats,
        WILCOXON_STATS,
        groups=groups,
        var=adata.var,
        n_cells=np.array([len(r) for r in rows_per_group]),
        settings=settings,
    )
    res.uns["pertscale"]["skipped"] = np.asarray(skipped, dtype=object) if skipped else np.asarray([], dtype=str)
    if scanpy_format:
        scanpy_uns(res)
    return res

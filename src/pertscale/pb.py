"""Pseudo-bulk: per-group sums of raw counts and means of log-normalized expression, in one pass.

:func:`pseudobulk` streams the row blocks once; each block reports the groups
it holds (:mod:`pertscale.kernels.pseudobulk`) and the partials are added
into the totals in this process as the blocks finish. :func:`log_fold_change` turns the profiles into
pseudo-bulk fold changes against control, as crispyx's
``compute_pseudobulk_expression``; :func:`to_pydeseq2` hands the summed
counts to PyDESeq2.
"""

from __future__ import annotations

import logging
import math
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._deprecation import renamed_arguments
from ._validation import (
    check_control,
    check_number,
    check_shape,
    check_target_sum,
    get_matrix,
    log1p_record,
    obs_categorical,
    perturbation_labels,
)
from .io._read import as_dask
from .variables import RENAMED_ARGUMENTS

logger = logging.getLogger(__name__)

#: Row blocks computed at once per worker; their partial sums are added here as they come.
BLOCKS_PER_WORKER = 2

__all__ = ["log_fold_change", "pseudobulk", "to_pydeseq2"]


def _groupby_columns(groupby) -> list[str]:
    columns = [groupby] if isinstance(groupby, str) else list(groupby)
    if not columns or not all(isinstance(c, str) for c in columns):
        raise TypeError(f"perturbation_column must be an obs column name or a list of them, got {groupby!r}")
    if len(set(columns)) != len(columns):
        raise ValueError(f"perturbation_column names a column more than once: {columns}")
    return columns


def _encode_groups(obs: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, pd.DataFrame]:
    """Group code of every cell (0..n_groups-1) and one ``obs`` row per group, in category order.

    Each column is encoded once (its categorical codes, or ``pandas.Categorical`` of its values); the
    codes of several columns are combined column by column, so the groups come in the order
    ``scanpy.get.aggregate`` gives them: by the first column's categories, then the second's, ...
    """
    cats = [
        obs_categorical(
            obs,
            col,
            what="perturbation_column",
            fix=f"every cell needs a group: drop those cells (adata[adata.obs[{col!r}].notna()]) or fill them with "
            f"a label of their own (adata.obs[{col!r}] = adata.obs[{col!r}].astype(object).fillna('unassigned'))",
        )
        for col in columns
    ]
    combined = np.zeros(len(obs), dtype=np.int64)
    for cat in cats:
        combined = combined * len(cat.categories) + np.asarray(cat.codes, dtype=np.int64)
        _, combined = np.unique(combined, return_inverse=True)  # dense again: no overflow over many columns
    _, first = np.unique(combined, return_index=True)
    groups = obs[columns].iloc[first].copy()
    for col in columns:  # categorical columns keep their categories' order
        groups[col] = groups[col].astype("category").cat.remove_unused_categories()
    names = pd.Index(["_".join(str(v) for v in row) for row in groups.itertuples(index=False)])
    if not names.is_unique:
        raise ValueError(
            f"groups of obs{columns} have the same name as text: {list(names[names.duplicated()][:5])}; "
            "labels that differ only in type (the number 1 and the text '1') or that contain '_' "
            "make them clash: convert the columns to strings and rename the clashing labels"
        )
    groups.index = names
    return combined.astype(np.int64, copy=False), groups


#: What to pass instead of normalized or log1p values, said by every refusal of them.
_COUNTS_FIX = (
    "pseudo-bulk sums need raw UMI counts: pass the layer that holds them (layer='counts'; keep "
    "adata.layers['counts'] = adata.X before normalizing), or, if they are in .raw, "
    "ps.pb.pseudobulk(adata.raw.to_adata(), ...)"
)


def _refuse_log1p(adata: ad.AnnData, layer: str | None) -> None:
    """Refuse a matrix marked as log1p data (``uns['log1p']`` for X): free, before any pass."""
    if log1p_record(adata, layer) is not None:
        where = "X" if layer is None else f"layers[{layer!r}]"
        mark = "uns['log1p']" if layer is None else f"uns['pertscale']['log1p_layers'][{layer!r}]"
        raise ValueError(
            f"{where} holds log1p values ({mark} is set): summing them would add logarithms; {_COUNTS_FIX}. If "
            f"{where} holds counts and the mark is left over from an earlier log1p, delete {mark}"
        )


def _check_values(total) -> None:
    if total["n_nan"] or total["n_infinite"]:
        raise ValueError(
            f"the matrix contains {total['n_nan']:,} NaN and {total['n_infinite']:,} infinite values; pseudo-bulk "
            "sums need raw UMI counts (finite): remove or impute them first"
        )
    if total["n_negative"]:
        raise ValueError(
            f"the matrix contains {total['n_negative']:,} negative values; pseudo-bulk sums need raw UMI counts "
            "(non-negative integers): pass the raw counts (e.g. layer='counts'), not scaled data"
        )
    if total["n_noninteger"]:
        raise ValueError(
            f"the matrix holds {total['n_noninteger']:,} values that are not whole numbers (normalized or log1p "
            f"data, found in the pass, which stopped there); {_COUNTS_FIX}"
        )


def _totals(x, codes: np.ndarray, n_groups: int, target_sum: float) -> dict:
    """One pass: each block's sums of its own groups, added into dense totals here as the blocks finish.

    No task ever holds more than one block's partial (at most the block's
    non-zeros): the totals (``n_groups x n_vars`` float64, three of them)
    live only in this process, which returns them anyway. The blocks are
    computed a few per worker at a time with plain ``dask.compute`` (Dask's
    current scheduler: the face's, a ``distributed.Client``, or threads).
    """
    import dask
    from dask import delayed

    from ._memory import workers_now
    from ._progress import steps
    from .kernels.pseudobulk import group_sums

    bounds = np.cumsum((0,) + x.chunks[0])
    block_sums = delayed(group_sums, pure=True)
    parts = [
        block_sums(block, codes[a:b], target_sum=target_sum)
        for block, a, b in zip(x.to_delayed().ravel(), bounds[:-1], bounds[1:], strict=True)
    ]
    at_once = BLOCKS_PER_WORKER * workers_now()
    totals = {name: np.zeros((n_groups, x.shape[1])) for name in ("counts", "normalized", "log1p")}
    totals |= {"n_cells": np.zeros(n_groups, dtype=np.int64)}
    totals |= dict.fromkeys(("n_negative", "n_nan", "n_infinite", "n_noninteger"), 0)
    with steps(len(parts), "pseudo-bulk") as bar:
        for start in range(0, len(parts), at_once):
            for part in dask.compute(*parts[start : start + at_once]):
                for name in ("counts", "normalized", "log1p"):
                    sums = getattr(part, name).tocsr()
                    sums.sum_duplicates()
                    rows = np.repeat(part.codes, np.diff(sums.indptr))
                    totals[name][rows, sums.indices] += sums.data  # (row, gene) pairs are distinct
                totals["n_cells"][part.codes] += part.n_cells
                for name in ("n_negative", "n_nan", "n_infinite", "n_noninteger"):
                    totals[name] += getattr(part, name)
                bar.update(1)
            _check_values(totals)  # refused as soon as a block shows it: the rest of the pass is not run
    return totals


@renamed_arguments(renamed=RENAMED_ARGUMENTS["pb.pseudobulk"])
def pseudobulk(
    adata: ad.AnnData,
    *,
    perturbation_column: str | list[str] = "perturbation",
    layer: str | None = None,
    target_sum: float = 1e4,
    key_added: str = "pseudobulk",
    force: bool = False,
) -> ad.AnnData:
    """Pseudo-bulk profiles: summed raw counts and mean log-normalized expression per group, in one pass.

    Computes one pass over the matrix, a few blocks per worker at a time
    here (plain ``dask.compute``: on the scheduler of the enclosing face,
    :func:`pertscale.cluster.using`, or Dask's current one); the profiles
    are groups x genes, in memory.

    Per group of cells (one per value of ``perturbation_column``, or per
    combination of values of several columns, e.g. ``["perturbation",
    "bio_rep"]`` for one sample per perturbation and replicate), the counts
    of its cells are
    added, and their ``log1p(normalize_total(target_sum))`` values averaged,
    each cell normalized exactly as :func:`pertscale.pp.normalize_total`
    then :func:`pertscale.pp.log1p` do (scanpy's float32 arithmetic). The
    result equals ``scanpy.get.aggregate(adata, by=perturbation_column, func=["sum", "mean"])``
    of the counts (``sum``) and of the log-normalized data (``mean``); the
    mean log-normalized expression is crispyx's ``compute_average_log_expression``
    profile.

    One pass over the matrix: each row block returns the groups it holds,
    as sparse sums (never more values than the block's non-zeros), added
    into the totals in this process as the blocks finish (no task holds more
    than one block's partial). The result is held in this process: three
    ``n_groups x n_vars`` float64 arrays (2 GB at 10,000 groups x 8,248 genes).

    Parameters
    ----------
    adata
        ``n_obs x n_vars`` raw UMI counts: lazy (:func:`pertscale.read`) or in memory (numpy, scipy).
    perturbation_column
        ``obs`` column(s) defining the groups; none may have missing values
        (scanpy's ``by``; the name every pertscale analysis gives the
        perturbation labels; its earlier name ``groupby`` is still taken for
        one release with a ``FutureWarning``).
    layer
        Use ``layers[layer]`` instead of ``X``.
    target_sum
        Counts per cell after normalization, for ``mean_log1p`` and ``mean_normalized``.
    key_added
        Readable name of this result in the result store.
    force
        Compute again even when a result with equal settings is stored.

    Returns
    -------
    anndata.AnnData
        ``n_groups x n_vars``, groups in the order of the columns' categories
        (sorted values for non-categorical columns), named by their labels
        joined with ``_`` (as scanpy).

        - ``X``: summed raw counts, float64 (exact for integer counts).
        - ``layers['mean_log1p']``: mean over the group's cells of
          ``ln(1 + normalized)``, natural log, float64.
        - ``layers['mean_normalized']``: mean of the normalized values
          (counts per ``target_sum``, not logged), float64; the profile of
          :func:`log_fold_change`.
        - ``obs``: the ``perturbation_column`` columns (categorical) and ``n_cells``.
        - ``var``: a copy of ``adata.var``.
        - ``uns['pertscale']['pseudobulk']``: ``groupby`` (the columns), ``layer``, ``target_sum``.

        Also stored in ``adata``'s result store, keyed by
        :class:`pertscale.PseudobulkSettings`: asked again with equal
        settings, the stored object is returned without a pass.

    Raises
    ------
    KeyError
        If a ``perturbation_column`` column or the layer is missing (the message lists those present).
    ValueError
        If a ``perturbation_column`` column has missing values (the message says how
        many and how to drop or fill them), the matrix has no cells or
        genes, ``target_sum`` is not a finite number between 1e-28 and 1e37
        (:func:`pertscale.pp.normalize_total`'s range), or the matrix is not
        raw counts: marked as log1p data (``uns['log1p']`` for ``X``; before
        any pass), or holding NaN, infinite, negative or non-integer values
        (during the pass, which stops at the first block that shows them).
        The fix named: ``layer=`` the counts layer, or
        ``adata.raw.to_adata()``.
    TypeError
        If ``perturbation_column`` is neither a column name nor a list of them.

    Warns
    -----
    FutureWarning
        If ``groupby`` (now ``perturbation_column``) is given.
    """
    from .analysis import PseudobulkSettings, build
    from .store import cached

    columns = _groupby_columns(perturbation_column)
    target_sum = check_target_sum(target_sum, flag=None)
    settings = build(PseudobulkSettings, groupby=tuple(columns), layer=layer, target_sum=target_sum)
    run = lambda: (_pseudobulk(adata, columns, layer, target_sum), [])  # noqa: E731
    return cached(adata, settings, run, key_added=key_added, force=force)


def _pseudobulk(adata: ad.AnnData, columns: list[str], layer, target_sum) -> ad.AnnData:
    """:func:`pseudobulk` without the store."""
    check_shape(adata)
    target_sum = check_target_sum(target_sum, flag=None)
    codes, groups = _encode_groups(adata.obs, columns)
    x = as_dask(get_matrix(adata, layer))
    _refuse_log1p(adata, layer)
    _warn_if_spread(x, codes, len(groups), adata.n_vars)
    total = _totals(x, codes, len(groups), target_sum)
    n_cells = total["n_cells"]
    if not (n_cells > 0).all():  # every group has cells: a broken pass otherwise
        raise RuntimeError(f"the pass returned {int((n_cells > 0).sum())} groups of {len(groups)}; please report this")
    out = ad.AnnData(X=total["counts"], obs=groups, var=adata.var.copy())
    for key, name in (("mean_log1p", "log1p"), ("mean_normalized", "normalized")):
        mean = total[name]
        mean /= n_cells[:, None]
        out.layers[key] = mean
    out.obs["n_cells"] = n_cells
    out.uns["pertscale"] = {"pseudobulk": {"groupby": columns, "layer": layer or "X", "target_sum": target_sum}}
    logger.info("pseudo-bulk: %d groups of obs%s x %d genes", out.n_obs, columns, out.n_vars)
    return out


#: Above this many groups x genes, groups spread over most blocks make each partial sum large.
SPREAD_WARN_ENTRIES = 10_000_000


def _warn_if_spread(x, codes: np.ndarray, n_groups: int, n_vars: int) -> None:
    """Warn when the cells are not stored by group: every block's partial then spans most groups x genes."""
    bounds = np.cumsum((0,) + tuple(x.chunks[0]))
    if len(bounds) < 3 or n_groups * n_vars < SPREAD_WARN_ENTRIES:
        return
    per_block = [np.unique(codes[a:b]).size for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if sum(per_block) > 4 * n_groups:
        warnings.warn(
            f"the cells are not stored by group: on average each of the {n_groups:,} groups has cells in "
            f"{sum(per_block) / n_groups:.0f} of {len(per_block)} row blocks, so each block's partial sums span "
            f"up to {n_groups:,} x {n_vars:,} values; sort the cells once with "
            "ps.io.prepare(path, perturbation_column=..., control_label=..., out=...) and aggregate the sorted "
            "store (pertscale run --pseudobulk does)",
            UserWarning,
            stacklevel=3,
        )


def _pooled(pb: ad.AnnData, labels: pd.Series) -> tuple[pd.Index, np.ndarray, np.ndarray]:
    """Rows of the same perturbation pooled: labels, cells, and the cell-weighted mean normalized profile."""
    if "mean_normalized" not in pb.layers or "n_cells" not in pb.obs.columns:
        raise ValueError(
            "pb has no layers['mean_normalized'] or obs['n_cells']; make it with "
            "ps.pb.pseudobulk(adata, perturbation_column=...)"
        )
    codes, uniques = pd.factorize(labels.to_numpy())
    n_rows = np.asarray(pb.obs["n_cells"], dtype=np.float64)
    member = sp.csr_matrix((n_rows, (codes, np.arange(codes.size))), shape=(len(uniques), codes.size))
    n_cells = np.asarray(member.sum(axis=1)).ravel()
    means = np.asarray(member @ np.asarray(pb.layers["mean_normalized"], dtype=np.float64)) / n_cells[:, None]
    return pd.Index(uniques), n_cells.astype(np.int64), means


def _check_baseline(baseline_count: float, means: np.ndarray) -> None:
    """Refuse a ``baseline_count`` whose product with a non-zero mean leaves float64's normal range.

    ``log1p(b * m)`` is float64: ``b * m`` above the largest float64 is
    infinite (fold changes NaN), below the smallest normal one it loses its
    digits or becomes 0 (fold changes 0). The means are in memory: no pass.
    """
    positive = means[means > 0]
    if positive.size == 0:
        return
    info = np.finfo(np.float64)
    low, high = float(info.tiny / positive.min()), float(info.max / positive.max())
    if not low <= baseline_count <= high:
        raise ValueError(
            f"baseline_count must be between {low:.3g} and {high:.3g} for these profiles (mean normalized values "
            f"{positive.min():.3g} to {positive.max():.3g}), got {baseline_count!r}: beyond, baseline_count x the "
            "mean leaves float64's range and the fold changes become NaN (too large) or 0 (too small); 1 is usual"
        )


def log_fold_change(
    pb: ad.AnnData,
    *,
    control_label: str,
    perturbation_column: str = "perturbation",
    baseline_count: float = 1.0,
    log_base: float = 2.0,
) -> ad.AnnData:
    """Pseudo-bulk fold change of every perturbation against control (log2 by default).

    Computes nothing: it works on the pseudo-bulk profiles in memory.

    The method of crispyx's ``compute_pseudobulk_expression``: a
    perturbation's pseudo-bulk profile is the mean over its cells of the
    ``normalize_total`` values (``m``, counts per ``target_sum``, not logged;
    ``layers['mean_normalized']`` of :func:`pseudobulk`), and

    ``lfc = log_base((1 + b * m_pert) / (1 + b * m_control))``
    ``    = (ln(1 + b * m_pert) - ln(1 + b * m_control)) / ln(log_base)``

    with ``b = baseline_count``, a scale inside the ``log1p`` (not a
    pseudo-count added to the counts). crispyx reports the natural-log value
    (``log_base=math.e``); the default here is log2. Rows of ``pb`` with the
    same perturbation (e.g. replicates, from
    ``perturbation_column=["perturbation", "bio_rep"]``) are pooled, weighted by their cells, before the log.

    Parameters
    ----------
    pb
        Output of :func:`pseudobulk`.
    control_label
        The control's label in ``obs[perturbation_column]``.
    perturbation_column
        ``obs`` column of the perturbation labels.
    baseline_count
        ``b`` above, > 0.
    log_base
        Base of the fold change, > 1: 2 (log2) or ``math.e`` (natural log, crispyx's numbers).

    Returns
    -------
    anndata.AnnData
        ``n_perturbations x n_vars`` (control excluded), in the order of ``pb``:

        - ``X``: fold change in ``log_base`` (log2 by default), float64.
        - ``layers['log1p_bulk']``: ``ln(1 + b * m_pert)``, natural log
          (crispyx's ``perturbation_bulk``).
        - ``var['control_log1p_bulk']``: ``ln(1 + b * m_control)``, natural log.
        - ``obs``: ``perturbation_column`` and ``n_cells``.
        - ``uns['pertscale']['log_fold_change']``: ``control_label``,
          ``baseline_count``, ``log_base``.

    Raises
    ------
    KeyError
        If ``perturbation_column`` is missing from ``pb.obs``.
    ValueError
        If ``control_label`` is not among the labels (the message lists
        them), ``pb`` is not a :func:`pseudobulk` result, or
        ``baseline_count``/``log_base`` are out of range (``baseline_count``
        times every non-zero mean must stay a normal float64 number).
    """
    baseline_count = check_number(baseline_count, "baseline_count", minimum=0, min_open=True)
    log_base = check_number(log_base, "log_base", minimum=1, min_open=True)
    labels = perturbation_labels(pb.obs, perturbation_column)
    check_control(labels, control_label, perturbation_column, min_cells=1)
    names, n_cells, means = _pooled(pb, labels)
    _check_baseline(baseline_count, means)
    bulk = np.log1p(baseline_count * means)  # natural log
    is_control = np.asarray(names == str(control_label))
    control = bulk[is_control][0]
    obs = pd.DataFrame({perturbation_column: names[~is_control], "n_cells": n_cells[~is_control]})
    obs.index = names[~is_control].astype(str)
    var = pb.var.copy()
    var["control_log1p_bulk"] = control
    out = ad.AnnData(X=(bulk[~is_control] - control) / math.log(log_base), obs=obs, var=var)
    out.layers["log1p_bulk"] = bulk[~is_control]
    out.uns["pertscale"] = {
        "log_fold_change": {
            "control_label": str(control_label),
            "baseline_count": baseline_count,
            "log_base": log_base,
            "perturbation_column": perturbation_column,
        }
    }
    return out


def to_pydeseq2(
    pb: ad.AnnData,
    *,
    design: str = "~perturbation",
    control_label: str | None = None,
    perturbation_column: str = "perturbation",
    **kwargs,
):
    """A ``pydeseq2.dds.DeseqDataSet`` of the pseudo-bulk counts, ready for ``.deseq2()``.

    The summed counts of :func:`pseudobulk` (``X``) become PyDESeq2's integer
    counts, one sample per group; ``obs`` is the sample metadata. DESeq2
    needs replicates to estimate dispersions: group by perturbation and
    replicate (``perturbation_column=["perturbation", "bio_rep"]``), not by perturbation alone.

    Parameters
    ----------
    pb
        Output of :func:`pseudobulk` (raw counts summed).
    design
        A formulaic formula over ``obs`` columns (``"~perturbation"``,
        ``"~bio_rep + perturbation"``), or a single column name.
    control_label
        If given, made the first level of ``obs[perturbation_column]``, so
        that it is the reference of the design's treatment coding.
    perturbation_column
        ``obs`` column of the perturbation labels (used with ``control_label``).
    **kwargs
        Passed on to ``DeseqDataSet`` (``n_cpus``, ``quiet``, ``fit_type``, ...).

    Returns
    -------
    pydeseq2.dds.DeseqDataSet
        Not fitted.

    Raises
    ------
    ImportError
        If PyDESeq2 is not installed (``pip install pydeseq2``).
    KeyError
        If ``perturbation_column`` is missing (with ``control_label``).
    ValueError
        If the counts are not finite non-negative whole numbers, or
        ``control_label`` is not among the labels.
    """
    try:
        from pydeseq2.dds import DeseqDataSet
    except ImportError as err:
        raise ImportError("to_pydeseq2 needs PyDESeq2: pip install pydeseq2") from err
    counts = np.asarray(pb.X.toarray() if sp.issparse(pb.X) else pb.X, dtype=np.float64)
    if not np.isfinite(counts).all() or (counts < 0).any() or (counts != np.round(counts)).any():
        raise ValueError(
            "pb.X is not finite non-negative whole numbers: DESeq2 needs summed raw UMI counts; "
            "make pb with ps.pb.pseudobulk on the raw counts (layer= if they are in a layer)"
        )
    metadata = pb.obs.copy()
    if control_label is not None:
        labels = perturbation_labels(metadata, perturbation_column)
        check_control(labels, control_label, perturbation_column, min_cells=1)
        levels = [str(control_label), *(v for v in pd.unique(labels) if v != str(control_label))]
        metadata[perturbation_column] = pd.Categorical(labels, categories=levels)
    design = design if design.lstrip().startswith("~") else f"~{design}"
    frame = pd.DataFrame(counts.astype(np.int64), index=pb.obs_names.astype(str), columns=pb.var_names.astype(str))
    metadata.index = frame.index
    return DeseqDataSet(counts=frame, metadata=metadata, design=design, **kwargs)

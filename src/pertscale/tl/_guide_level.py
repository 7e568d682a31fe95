"""Guides as groups: each cell's guide as a label, and how well the guides of one target agree.

:func:`guide_labels` makes the label column that lets
:func:`pertscale.tl.rank_genes_groups` test each guide against control
(``groupby="guide"``); :func:`guide_concordance` compares, per target, the
log2 fold changes of its guides over the genes either calls DE.
"""

from __future__ import annotations

import itertools
import logging

import anndata as ad
import numpy as np
import pandas as pd

from .._validation import check_number
from ..io._infer import is_control_alias
from ..variables import LOGFOLDCHANGES, PVALS_ADJ

logger = logging.getLogger(__name__)

#: ``obs`` columns that may name each cell's guide, in the order they are tried.
GUIDE_COLUMNS = (
    "guide",
    "perturbation_assigned_guide",
    "guide_id",
    "guide_ids",
    "guide_identity",
    "sgRNA",
    "sgrna",
    "gRNA",
    "grna",
    "feature_call",
)
#: Labels of cells that carry no single guide: kept as they are.
NOT_ONE_GUIDE = ("multiple", "unassigned")
#: The accepted inputs, for error messages.
ACCEPTED = (
    "a per-cell guide column in obs (one of " + ", ".join(GUIDE_COLUMNS) + "; or guide_column=), for example "
    "the 'perturbation_assigned_guide' column that ps.pp.assign_guides writes from per-guide UMI counts "
    "(obsm['grna_counts'] with uns['grna_ids'] and uns['grna_targets'])"
)


def guide_targets(adata: ad.AnnData) -> dict[str, str]:
    """Guide id -> target, from ``uns['grna_ids']`` and ``uns['grna_targets']`` (empty when absent)."""
    ids, targets = adata.uns.get("grna_ids"), adata.uns.get("grna_targets")
    if ids is None or targets is None or len(ids) != len(targets):
        return {}
    return {str(i): str(t) for i, t in zip(np.asarray(ids), np.asarray(targets), strict=True)}


def find_guide_column(obs: pd.DataFrame, guide_column: str | None = None) -> str:
    """The ``obs`` column of each cell's guide.

    Raises
    ------
    KeyError
        If ``guide_column`` is given and absent, or none of :data:`GUIDE_COLUMNS` is in ``obs``
        (the message says which inputs are accepted).
    """
    if guide_column is not None:
        if guide_column not in obs:
            raise KeyError(f"guide_column {guide_column!r} is not in obs; accepted: {ACCEPTED}")
        return guide_column
    for column in GUIDE_COLUMNS:
        if column in obs:
            return column
    raise KeyError(f"no guide identities found: obs has none of the guide columns. Accepted: {ACCEPTED}")


def guide_labels(
    adata: ad.AnnData,
    *,
    control_label: str,
    perturbation_column: str | None = None,
    guide_column: str | None = None,
) -> pd.Series:
    """Each cell's guide as a label to test, the control's cells as ``control_label``.

    Parameters
    ----------
    adata
        Cells in ``obs``; guide ids in a column of :data:`GUIDE_COLUMNS` (or ``guide_column``).
    control_label
        The label given to control cells: those whose ``perturbation_column``
        is ``control_label``, or (without one) whose guide targets a control
        (``uns['grna_targets']`` of the guide is ``non-targeting``,
        ``control``, ...) or whose guide id is such a word itself.
    perturbation_column
        The cells' perturbation labels; default the labels of the guide
        assignment that made the guide column (``obs['perturbation_assigned']``
        beside ``obs['perturbation_assigned_guide']``), else
        ``obs['perturbation']`` when present. Its ``multiple`` and ``unassigned`` cells keep those labels
        (a cell's top guide does not make it a single-guide cell).
    guide_column
        The ``obs`` column of guide ids; default the first of :data:`GUIDE_COLUMNS`.

    Returns
    -------
    pandas.Series
        ``(n_obs,)`` strings indexed like ``obs``.

    Raises
    ------
    KeyError
        If no guide column is found (the message says which inputs are
        accepted) or ``perturbation_column`` is given and absent.
    """
    column = find_guide_column(adata.obs, guide_column)
    guides = adata.obs[column].astype("string").fillna("unassigned").astype(str)
    labels = guides.copy()
    targets = guide_targets(adata)
    if perturbation_column is None:  # the labels of the assignment that made the guide column, else 'perturbation'
        made_with = column[: -len("_guide")] if column.endswith("_guide") else None
        if made_with is not None and made_with in adata.obs:
            perturbation_column = made_with
        elif "perturbation" in adata.obs:
            perturbation_column = "perturbation"
    if perturbation_column is not None:
        if perturbation_column not in adata.obs:
            raise KeyError(f"perturbation_column {perturbation_column!r} is not in obs")
        perts = adata.obs[perturbation_column].astype(str)
        control = perts == str(control_label)
        labels[perts.isin(NOT_ONE_GUIDE)] = perts[perts.isin(NOT_ONE_GUIDE)]
    else:
        target = guides.map(lambda g: targets.get(g, g))
        control = target.map(is_control_alias) | (target == str(control_label))
    labels[control] = str(control_label)
    logger.info("guide labels from obs[%r]: %d guides, %d control cells", column,
                labels[~control & ~labels.isin(NOT_ONE_GUIDE)].nunique(), int(control.sum()))  # fmt: skip
    return labels


def guide_concordance(
    results: ad.AnnData,
    *,
    targets: dict[str, str] | None = None,
    fdr: float = 0.05,
    min_genes: int = 5,
    min_correlation: float = 0.2,
    adata: ad.AnnData | None = None,
    return_pairs: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Per target, the agreement of its guides: the correlation of their log2 fold changes over DE genes.

    For each pair of guides of one target, the Pearson correlation of their
    ``logfoldchanges`` over the genes with ``pvals_adj < fdr`` for either
    guide (the genes where there is an effect to agree on). A guide is
    discordant when its mean correlation with the other guides of its target
    is below ``min_correlation`` while those others agree with each other
    (or, for a target with two guides, when the pair is below it: both are
    flagged, which one is off cannot be told).

    Parameters
    ----------
    results
        Results of ``ps.tl.rank_genes_groups(..., groupby="guide")``:
        guides x genes, lazy or in memory.
    targets
        Guide id -> target gene; default from ``adata.uns['grna_ids']`` and
        ``uns['grna_targets']`` (``adata`` given) or ``results.uns``.
    fdr
        Adjusted p-value below which a gene is DE for a guide.
    min_genes
        Pairs with fewer DE genes get no correlation (NaN).
    min_correlation
        Below it a guide is flagged discordant.
    adata
        The AnnData the guides were tested on (for its guide targets).
    return_pairs
        Also return the per-pair table.

    Returns
    -------
    pandas.DataFrame
        One row per guide of a target with at least two tested guides:
        ``target``, ``guide``, ``n_de_genes`` (its own), ``mean_correlation``
        (with the target's other guides), ``min_correlation``, ``n_pairs``,
        ``discordant`` (bool). With ``return_pairs``, ``(table, pairs)``:
        ``pairs`` has ``target, guide_1, guide_2, n_genes, correlation``.

    Raises
    ------
    ValueError
        If no target has two guides among the results, or an option is out of range.
    """
    fdr = check_number(fdr, "fdr", minimum=0, maximum=1)
    min_genes = check_number(min_genes, "min_genes", integer=True, minimum=2)
    if targets is None:
        targets = guide_targets(adata) if adata is not None else {}
        if not targets:
            targets = guide_targets(results)
    guides = [str(g) for g in results.obs_names]
    by_target: dict[str, list[int]] = {}
    for i, g in enumerate(guides):
        t = targets.get(g)
        if t is not None and not is_control_alias(t):
            by_target.setdefault(str(t), []).append(i)
    by_target = {t: rows for t, rows in by_target.items() if len(rows) >= 2}
    if not by_target:
        raise ValueError(
            "no target has two tested guides in these results: test guides with "
            "ps.tl.rank_genes_groups(..., groupby='guide') and give targets= (guide -> target) when adata.uns has "
            "no grna_ids/grna_targets"
        )
    pair_rows, guide_rows = [], []
    for target, rows, lfc, padj in _rows_by_target(results, by_target):
        de = np.nan_to_num(padj, nan=1.0) < fdr
        corr = np.full((len(rows), len(rows)), np.nan)
        for a, b in itertools.combinations(range(len(rows)), 2):
            genes = (de[a] | de[b]) & np.isfinite(lfc[a]) & np.isfinite(lfc[b])
            r = np.nan
            if genes.sum() >= min_genes and np.std(lfc[a, genes]) > 0 and np.std(lfc[b, genes]) > 0:
                r = float(np.corrcoef(lfc[a, genes], lfc[b, genes])[0, 1])
            corr[a, b] = corr[b, a] = r
            pair_rows.append((target, guides[rows[a]], guides[rows[b]], int(genes.sum()), r))
        for a in range(len(rows)):
            others = np.delete(corr[a], a)
            mean = float(np.nanmean(others)) if np.isfinite(others).any() else np.nan
            guide_rows.append(
                {
                    "target": target,
                    "guide": guides[rows[a]],
                    "n_de_genes": int(de[a].sum()),
                    "mean_correlation": mean,
                    "min_correlation": float(np.nanmin(others)) if np.isfinite(others).any() else np.nan,
                    "n_pairs": int(np.isfinite(others).sum()),
                }
            )
    table = pd.DataFrame(guide_rows)
    table["discordant"] = _discordant(table, min_correlation)
    if return_pairs:
        pairs = pd.DataFrame(pair_rows, columns=["target", "guide_1", "guide_2", "n_genes", "correlation"])
        return table, pairs
    return table


#: Guides whose rows are read in one computation (whole targets): memory is this many rows of two statistics.
ROWS_PER_READ = 512


def _rows_by_target(results: ad.AnnData, by_target: dict[str, list[int]]):
    """``(target, rows, lfc, padj)`` per target, the rows of several targets read in one computation."""
    import dask

    batch: list[tuple[str, list[int]]] = []
    items = list(by_target.items())
    for k, (target, rows) in enumerate(items):
        batch.append((target, rows))
        if sum(len(r) for _, r in batch) < ROWS_PER_READ and k + 1 < len(items):
            continue
        wanted = np.concatenate([r for _, r in batch])
        order = np.argsort(wanted, kind="stable")
        picked = [results.layers[name][wanted[order]] for name in (LOGFOLDCHANGES, PVALS_ADJ)]
        lfc, padj = (np.asarray(v, dtype=np.float64) for v in dask.compute(*picked))
        back = np.empty_like(order)
        back[order] = np.arange(order.size)
        lfc, padj = lfc[back], padj[back]
        start = 0
        for name, rows in batch:
            stop = start + len(rows)
            yield name, rows, lfc[start:stop], padj[start:stop]
            start = stop
        batch = []


def _discordant(table: pd.DataFrame, min_correlation: float) -> np.ndarray:
    """A guide below ``min_correlation`` with its siblings, where they agree among themselves (two guides: both)."""
    flags = np.zeros(len(table), dtype=bool)
    for _, group in table.groupby("target", sort=False):
        known = group["mean_correlation"].dropna()
        low = known < min_correlation
        if known.empty:  # too few DE genes to tell
            continue
        if len(group) == 2 or low.all():
            flags[low.index[low]] = True
            continue
        worst = known.idxmin()  # the guide that drags the others' mean down
        if low[worst]:
            flags[worst] = True
    return flags

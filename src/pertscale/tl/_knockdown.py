"""Did each perturbation knock its target down? Per perturbation from a test, per cell from the control's values.

:func:`knockdown` matches each perturbation to its target gene (an ``obs``
column, a mapping, or a label that is itself a gene), reads the target's
statistics from a test's results and scores every perturbed cell against
the control's distribution of its target (:mod:`pertscale.kernels.knockdown`)
in one pass over the row blocks; the control's distributions are made
once (one read of the control rows at the target genes) and broadcast.
"""

from __future__ import annotations

import logging

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd

from .._validation import check_number, check_shape, get_matrix, log1p_record, perturbation_labels
from ..io._infer import SYMBOL_COLUMNS, is_control_alias
from ..io._read import as_dask, select
from ..kernels.knockdown import concat_control_targets, control_targets, knockdown_scores
from ..variables import ESCAPER, KNOCKDOWN_SCORE, KNOCKDOWN_VALUE, LOGFOLDCHANGES, PVALS, PVALS_ADJ, SCORES

logger = logging.getLogger(__name__)

#: ``obs`` columns that may name each cell's target gene, in the order they are tried.
TARGET_COLUMNS = ("target_gene", "target", "gene_target", "target_gene_max", "target_max")
#: The per-cell columns :func:`knockdown` writes into ``obs``.
SCORE_COLUMN, ESCAPER_COLUMN = KNOCKDOWN_SCORE, ESCAPER
#: Target genes per part of the control summary (each part one read of the control rows at its genes).
TARGETS_PER_PART = 512


def targets_from_obs(obs: pd.DataFrame, perturbation_column: str, *, target_column: str | None = None) -> dict:
    """Perturbation label -> target gene, from ``target_column`` or the first ``obs`` column of :data:`TARGET_COLUMNS`.

    A label counts when all its cells carry one target (missing values
    aside); labels whose cells carry several (``multiple``, a per-cell
    column such as the target of each cell's top guide) are left out. Empty
    when no column gives any.

    Raises
    ------
    KeyError
        If ``target_column`` is given and not in ``obs``.
    """
    if target_column is not None and target_column not in obs:
        raise KeyError(f"target_column {target_column!r} is not in obs; columns: {list(obs.columns)[:30]}")
    labels = obs[perturbation_column].astype(str)
    for column in [target_column] if target_column else TARGET_COLUMNS:
        if column not in obs or column == perturbation_column:
            continue
        frame = pd.DataFrame({"label": labels.to_numpy(), "target": obs[column].astype("string").to_numpy()})
        frame = frame.dropna()
        frame = frame[frame["target"].str.len() > 0]
        per_label = frame.groupby("label")["target"].nunique()
        single = per_label.index[per_label == 1]
        if len(single):
            first = frame[frame["label"].isin(single)].drop_duplicates("label")
            return {str(k): str(v) for k, v in zip(first["label"], first["target"], strict=True)}
    return {}


def gene_positions(var: pd.DataFrame, var_names: pd.Index, genes) -> np.ndarray:
    """Column of each gene in ``genes`` (-1 where not measured): by ``var_names``, then a symbol column, then case.

    A target is looked up in ``var_names`` first, then in the first column
    of ``var`` named like a gene-symbol column (:data:`pertscale.io._infer.SYMBOL_COLUMNS`:
    ``gene_symbols``, ``feature_name``, ...), then ignoring case in both.
    """
    genes = [str(g) for g in genes]
    names = [pd.Index(var_names.astype(str))]
    names += [pd.Index(var[c].astype(str)) for c in var.columns if str(c).lower() in SYMBOL_COLUMNS]
    found = np.full(len(genes), -1, dtype=np.int64)
    for upper in (False, True):
        for index in names:
            missing = np.flatnonzero(found < 0)
            if not missing.size:
                return found
            keys = index.str.upper() if upper else index
            asked = [genes[i].upper() if upper else genes[i] for i in missing]
            found[missing] = _first_positions(keys, asked)
    return found


def _first_positions(index: pd.Index, asked: list[str]) -> np.ndarray:
    """Position of each name in ``index`` (its first occurrence), -1 where absent."""
    first = pd.Series(np.arange(len(index)), index=index)
    first = first[~first.index.duplicated(keep="first")]
    return first.reindex(asked).fillna(-1).to_numpy(dtype=np.int64)


def knockdown(
    adata: ad.AnnData,
    *,
    perturbation_column: str,
    control_label: str,
    results: ad.AnnData | None = None,
    method: str = "wilcoxon",
    target_column: str | None = None,
    targets: dict | None = None,
    layer: str | None = None,
    fdr: float = 0.05,
    min_control_detection: float = 0.5,
    key_added: str = "knockdown",
    force: bool = False,
) -> pd.DataFrame:
    """Each perturbation's knock-down of its own target gene, and each cell's, with escapers flagged.

    Per perturbation whose target gene is measured: the target's log2 fold
    change and p-values in ``results`` (a test against control), its rank
    among all genes of that perturbation, and the fraction of the group's
    cells whose target expression lies below the control's median. Per
    cell of such a perturbation (written into ``adata.obs``): its value at
    its target, a knock-down score and an escaper flag.

    Parameters
    ----------
    adata
        ``n_obs x n_vars``, log1p-normalized values in ``X`` (or
        ``layers[layer]``; natural log, as after :func:`pertscale.pp.normalize_total`
        and :func:`pertscale.pp.log1p`), lazy or in memory; ``obs`` holds
        the perturbation labels.
    perturbation_column, control_label
        The labels and the control's.
    results
        A results AnnData of :func:`pertscale.tl.rank_genes_groups` (lazy or
        in memory; perturbations x genes) for the per-perturbation
        statistics. Default: the one stored in ``adata`` for ``method``
        (:func:`pertscale.get.result`); ``None`` when none is stored leaves
        those columns NaN.
    method
        Which stored test to use when ``results`` is not given.
    target_column
        The ``obs`` column naming each cell's target gene (one per
        perturbation). Default: the first of ``target_gene``, ``target``,
        ``gene_target``, ``target_gene_max``, ``target_max`` present; else
        each label is its own target (screens labelled by target gene).
    targets
        Perturbation label -> target gene, instead of a column.
    layer
        Read ``layers[layer]`` instead of ``X``.
    fdr
        A perturbation whose target is not significantly lower
        (``pvals_adj >= fdr`` or ``logfoldchanges >= 0``) is flagged
        ``knockdown_detected = False``.
    min_control_detection
        Escapers are called only at targets detected (non-zero) in at least
        this fraction of control cells: below, the control's median is 0
        and no cell can lie below it (the flag is missing, ``<NA>``).
    key_added, force
        The table is stored in ``adata``'s result store under its settings
        (:class:`pertscale.analysis.KnockdownSettings`; ``key_added`` its
        readable name): asked again with equal settings it is returned
        without a pass, unless ``force`` or ``results`` is given.

    Returns
    -------
    pandas.DataFrame
        One row per perturbation (index ``perturbation``) with a target:
        ``target``, ``gene`` (the ``var_names`` entry it matched, ``""``
        when not measured), ``measured`` (bool), ``n_cells``, ``logfoldchanges``
        (log2), ``pvals``, ``pvals_adj``, ``scores``, ``rank`` (1 = the most
        significant gene of that perturbation, by p-value then ``|score|``;
        NaN where the target was not tested),
        ``control_median`` (log1p units), ``control_detection`` (fraction of
        control cells with a non-zero value), ``fraction_below_control_median``,
        ``mean_knockdown_score``, ``fraction_escapers``,
        ``knockdown_detected`` (nullable boolean: ``<NA>`` where the target
        is not measured or has no statistics in the results). ``attrs['unmeasured']``: the perturbations
        whose target is not among the genes (listed, not an error).
        Writes ``obs['knockdown_value']`` (log1p expression at the cell's own
        target), ``obs['knockdown_score']`` (float, NaN for cells without a
        measured target, control cells included) and
        ``obs['knockdown_escaper']`` (nullable boolean).

    Raises
    ------
    KeyError
        If ``perturbation_column`` or ``target_column`` is not in ``obs``.
    ValueError
        If the control label has no cells, no perturbation has a target, or
        ``fdr``/``min_control_detection`` are not in ``[0, 1]``.

    Notes
    -----
    The knock-down score of a cell with value ``x`` at its target is the
    control's mid-distribution function at ``x``: the fraction of control
    cells below ``x`` plus half the fraction equal to it (Lancaster 1961's
    mid-p), 0.5 for a cell typical of the control, near 0 for a knocked
    down one (:mod:`pertscale.kernels.knockdown`). A cell is an escaper when
    its value is at or above the control's median (score >= 0.5 where the
    control has no ties at its median): the rule of a one-gene
    classification of knock-down, as the target-expression filters of
    Replogle et al. 2022 (on-target knock-down relative to the control's
    expression) and, on the whole perturbation signature, mixscape's
    non-perturbed class (Papalexi et al. 2021). It is conservative on a
    gene whose control expression is sparse (half the cells of a control
    at a zero median cannot be told from knocked down): there the flag is
    ``<NA>``. Cells flagged ``True`` are left out by
    ``rank_genes_groups(..., exclude_escapers=True)``.
    """
    from ..analysis import KnockdownSettings, array_digest, build
    from ..store import cached

    fdr = check_number(fdr, "fdr", minimum=0, maximum=1)
    min_control_detection = check_number(min_control_detection, "min_control_detection", minimum=0, maximum=1)
    settings = build(
        KnockdownSettings,
        perturbation_column=perturbation_column,
        control_label=str(control_label),
        test=method if results is None else "given",
        target_column=target_column,
        targets=None if targets is None else array_digest(np.array(sorted(map(str, targets.items())))),
        layer=layer,
        fdr=fdr,
        min_control_detection=min_control_detection,
    )
    force = force or results is not None  # results given: not a key of the store, computed again
    fields = [f"obs/{KNOCKDOWN_VALUE}", f"obs/{SCORE_COLUMN}", f"obs/{ESCAPER_COLUMN}"]
    return cached(
        adata,
        settings,
        lambda: (
            _knockdown(adata, perturbation_column, str(control_label), results, method, target_column=target_column,
                       targets=targets, layer=layer, fdr=fdr, min_control_detection=min_control_detection),
            fields,
        ),
        key_added=key_added,
        force=force,
    )  # fmt: skip


def _knockdown(adata, perturbation_column, control_label, results, method, *, target_column, targets, layer, fdr,
               min_control_detection) -> pd.DataFrame:  # fmt: skip
    """:func:`knockdown`'s computation (no store)."""
    check_shape(adata)
    labels = perturbation_labels(adata.obs, perturbation_column)
    control = (labels == control_label).to_numpy()
    if not control.any():
        raise ValueError(
            f"control_label {control_label!r} has no cells in obs[{perturbation_column!r}]; "
            f"labels seen: {sorted(labels.unique())[:20]}"
        )
    if layer is None and log1p_record(adata, None) is None and np.issubdtype(np.dtype(adata.X.dtype), np.integer):
        logger.warning("knockdown: X holds integer counts; the scores are of those, the fold changes of the results")
    if targets is None:
        targets = targets_from_obs(adata.obs, perturbation_column, target_column=target_column)
    if not targets:  # each label its own target
        targets = {g: g for g in labels.unique() if g != control_label and not is_control_alias(g)}
    targets = {str(p): str(t) for p, t in targets.items() if str(p) != control_label and t is not None and str(t)}
    sizes = labels.value_counts()
    perturbations = [p for p in targets if p in sizes.index]
    if not perturbations:
        raise ValueError(
            f"no perturbation of obs[{perturbation_column!r}] has a target gene; give target_column= or targets="
        )
    where = gene_positions(adata.var, adata.var_names, [targets[p] for p in perturbations])
    table = pd.DataFrame(
        {
            "target": [targets[p] for p in perturbations],
            "gene": [str(adata.var_names[w]) if w >= 0 else "" for w in where],
            "measured": where >= 0,
            "n_cells": [int(sizes[p]) for p in perturbations],
        },
        index=pd.Index(perturbations, name="perturbation"),
    )
    unmeasured = [p for p, w in zip(perturbations, where, strict=True) if w < 0]
    if unmeasured:
        logger.info("knockdown: %d perturbation(s) target genes that are not measured: %s", len(unmeasured),
                    ", ".join(f"{p} ({targets[p]})" for p in unmeasured[:20]))  # fmt: skip
    genes = np.unique(where[where >= 0])  # the target genes' columns, sorted
    column_of = dict(zip(perturbations, np.searchsorted(genes, np.maximum(where, 0)), strict=True))
    cell_target = np.full(labels.shape[0], -1, dtype=np.int64)
    codes = pd.Categorical(
        labels.to_numpy(), categories=[p for p, w in zip(perturbations, where, strict=True) if w >= 0]
    )
    measured_cols = np.array([column_of[p] for p in codes.categories], dtype=np.int64)
    has = codes.codes >= 0
    cell_target[has] = measured_cols[codes.codes[has]]

    values = np.full((labels.shape[0], 2), np.nan)
    summary = None
    if genes.size:
        mask = np.zeros(adata.n_vars, dtype=bool)
        mask[genes] = True
        x = select(as_dask(get_matrix(adata, layer)), cols=mask)
        summary = _control_summary(x, control)
        cells = da.blockwise(
            _score_block,
            "iq",
            x,
            "ij",
            da.from_array(cell_target, chunks=(x.chunks[0],)),
            "i",
            summary,
            None,
            new_axes={"q": 2},
            concatenate=True,
            dtype=np.float64,
            meta=np.empty((0, 0)),
        )
        values, summary = dask.compute(cells, summary)
    adata.obs[KNOCKDOWN_VALUE] = values[:, 0]
    adata.obs[SCORE_COLUMN] = values[:, 1]
    table = _per_perturbation(table, labels, values, summary, column_of, min_control_detection)
    escaper = _escapers(values, cell_target, summary, min_control_detection)
    adata.obs[ESCAPER_COLUMN] = pd.array(escaper, dtype="boolean")
    table = _with_statistics(table, _target_statistics(adata, results, method, table, perturbation_column), fdr)
    table.attrs["unmeasured"] = unmeasured
    return table


def _with_statistics(table: pd.DataFrame, statistics: pd.DataFrame, fdr: float) -> pd.DataFrame:
    """``table`` with the targets' statistics (replacing any) and ``knockdown_detected`` from them."""
    table = table.drop(columns=[c for c in [*statistics.columns, "knockdown_detected"] if c in table]).join(statistics)
    lower = (table[PVALS_ADJ] < fdr) & (table[LOGFOLDCHANGES] < 0)
    known = table["measured"] & table[PVALS_ADJ].notna()
    table["knockdown_detected"] = pd.array(np.where(known, lower, None), dtype="boolean")  # <NA>: not measured
    return table


def knockdown_statistics(table: pd.DataFrame, results: ad.AnnData, *, fdr: float = 0.05) -> pd.DataFrame:
    """A :func:`knockdown` table with its targets' statistics taken from other ``results`` (another test's).

    The per-cell part (the control's median, the fractions below it and of
    escapers) does not depend on the test: only ``logfoldchanges``,
    ``pvals``, ``pvals_adj``, ``scores``, ``rank`` and
    ``knockdown_detected`` are replaced, read from ``results`` (a results
    AnnData of :func:`pertscale.tl.rank_genes_groups`, lazy or in memory)
    without a pass over the cells.

    Raises
    ------
    ValueError
        If ``fdr`` is not in ``[0, 1]``.
    """
    fdr = check_number(fdr, "fdr", minimum=0, maximum=1)
    out = _with_statistics(table, _target_statistics(None, results, None, table, None), fdr)
    out.attrs = dict(table.attrs)
    return out


def _control_summary(x: da.Array, control: np.ndarray):
    """The control's distributions at the target columns of ``x``, lazily: parts of at most 512 genes, joined."""
    ctrl = select(x, rows=control)
    n = x.shape[1]
    bounds = list(range(0, n, TARGETS_PER_PART)) + [n]
    parts = [
        dask.delayed(_summarise)(ctrl[:, a:b].to_delayed().ravel().tolist())
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return dask.delayed(concat_control_targets)(parts)


def _summarise(blocks):
    import scipy.sparse as sp

    return control_targets(sp.vstack([sp.csr_matrix(b) for b in blocks], format="csr"))


def _score_block(block, targets, summary):
    return knockdown_scores(block, targets, summary)


def _escapers(values, cell_target, summary, min_control_detection) -> np.ndarray:
    """Per cell: True at or above the control's median, False below, NaN (no flag) where it cannot be told."""
    out = np.full(values.shape[0], np.nan)
    has = cell_target >= 0
    if summary is None or not has.any():
        return out
    detection = summary.n_nonzero / np.maximum(summary.n, 1)
    t = cell_target[has]
    ok = detection[t] >= min_control_detection
    flag = (values[has, 0] >= summary.median[t]).astype(np.float64)
    out[np.flatnonzero(has)[ok]] = flag[ok]
    return out


def _per_perturbation(table, labels, values, summary, column_of, min_control_detection) -> pd.DataFrame:
    """Control median and detection at each target, and the fractions of each group's cells below and escaping."""
    n = len(table)
    median = np.full(n, np.nan)
    detection = np.full(n, np.nan)
    below = np.full(n, np.nan)
    mean_score = np.full(n, np.nan)
    escaping = np.full(n, np.nan)
    if summary is not None:
        frame = pd.DataFrame({"label": labels.to_numpy(), "value": values[:, 0], "score": values[:, 1]})
        grouped = frame[frame["label"].isin(table.index)].groupby("label", observed=True)
        for i, p in enumerate(table.index):
            if not table["measured"].iloc[i]:
                continue
            t = column_of[p]
            median[i] = summary.median[t]
            detection[i] = summary.n_nonzero[t] / summary.n[t]
            cells = grouped.get_group(p)
            below[i] = float(np.mean(cells["value"].to_numpy() < median[i]))
            mean_score[i] = float(cells["score"].mean())
            if detection[i] >= min_control_detection:
                escaping[i] = float(np.mean(cells["value"].to_numpy() >= median[i]))
    return table.assign(
        control_median=median,
        control_detection=detection,
        fraction_below_control_median=below,
        mean_knockdown_score=mean_score,
        fraction_escapers=escaping,
    )


def _target_statistics(adata, results, method, table, perturbation_column) -> pd.DataFrame:
    """The target's log2 fold change, p-values and score in ``results``, and its rank in the perturbation's row."""
    columns = [LOGFOLDCHANGES, PVALS, PVALS_ADJ, SCORES, "rank"]
    out = pd.DataFrame(np.nan, index=table.index, columns=columns)
    if results is None:
        from ..store import select as stored

        try:
            _, results = stored(adata, method=method, perturbation_column=perturbation_column)
        except ValueError:
            logger.info("knockdown: no stored %s result; give results= for the targets' statistics", method)
            return out
    rows = pd.Index(results.obs_names.astype(str)).get_indexer(table.index)
    # the matched gene (a var name of adata) first; the target as given where the results' genes are others
    cols = pd.Index(results.var_names.astype(str)).get_indexer(table["gene"])
    by_target = gene_positions(results.var, results.var_names, table["target"])
    cols = np.where(cols >= 0, cols, by_target)
    ok = np.flatnonzero((rows >= 0) & (cols >= 0))
    if not ok.size:
        return out
    r, c = rows[ok], cols[ok]
    layers = {name: results.layers[name] for name in (LOGFOLDCHANGES, PVALS, PVALS_ADJ, SCORES)}
    picked = {name: _pick(layer, r, c) for name, layer in layers.items()}
    pvals, scores = layers[PVALS], layers[SCORES]
    order = np.argsort(r)
    ranks = _ranks(pvals, scores, r[order], c[order])
    (picked, ranks) = dask.compute(picked, ranks)
    for name, v in picked.items():
        out.iloc[ok, columns.index(name)] = np.asarray(v, dtype=np.float64)
    rank = np.empty(ok.size)
    rank[order] = ranks
    out.iloc[ok, columns.index("rank")] = rank
    return out


def _pick(layer, rows, cols):
    if isinstance(layer, da.Array):
        return layer.vindex[rows, cols]
    return np.asarray(layer[rows, cols]).ravel() if not hasattr(layer, "toarray") else layer[rows, cols].A1


def _ranks(pvals, scores, rows: np.ndarray, cols: np.ndarray):
    """Rank of gene ``cols[k]`` in row ``rows[k]``: 1 + genes with a smaller p-value (or equal, larger ``|score|``)."""
    p = da.asarray(pvals)[rows]
    s = da.asarray(scores)[rows]
    cols_d = da.from_array(cols, chunks=(p.chunks[0],))
    return da.map_blocks(_rank_block, p, s, cols_d[:, None], dtype=np.float64, drop_axis=1, chunks=(p.chunks[0],))


def _rank_block(p, s, cols):
    p = np.asarray(p, dtype=np.float64)
    s = np.abs(np.asarray(s, dtype=np.float64))
    idx = np.arange(p.shape[0])
    cols = np.asarray(cols).ravel()
    p_t, s_t = p[idx, cols][:, None], s[idx, cols][:, None]
    p = np.where(np.isnan(p), np.inf, p)
    smaller = (p < p_t) | ((p == p_t) & (s > s_t))
    return np.where(np.isnan(p_t[:, 0]), np.nan, 1 + smaller.sum(axis=1)).astype(np.float64)  # untested: no rank

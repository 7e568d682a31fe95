"""QC plots: the distributions of the cells' QC metrics with the thresholds, and cells per perturbation.

They read a :class:`pertscale.pp.QCSummary` (from :func:`pertscale.pp.qc_summary`)
or a run's output directory: ``qc.csv`` (the per-perturbation table),
``qc_cells.zarr`` (an AnnData without genes whose ``obs`` is the per-cell
table; only the columns plotted are read) and ``run.json`` (the thresholds,
under ``"qc"``). Histograms are counted with :func:`numpy.histogram` and
drawn as one step patch per class of cells, so a plot of two million cells
holds a few artists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..variables import (
    EXCLUDED,
    IS_CONTROL,
    MIN_CELLS_PER_PERTURBATION,
    MIN_GENES,
    N_CELLS,
    N_CELLS_KEPT,
    N_GENES_BY_COUNTS,
    PCT_COUNTS_MT,
    REASON,
    TOTAL_COUNTS,
    TOTAL_COUNTS_MT,
)
from ._common import check_names, finish, pyplot, read_obs_columns, read_run_json, run_file, zarr_group

#: The metrics :func:`qc_metrics` draws by default (those present: the mitochondrial one needs ``MT-`` genes).
QC_KEYS = (N_GENES_BY_COUNTS, TOTAL_COUNTS, PCT_COUNTS_MT)
#: Metrics that exist only when the data have mitochondrial genes: left out of the default panels without them.
_MT_KEYS = (TOTAL_COUNTS_MT, PCT_COUNTS_MT)
#: The threshold drawn on each metric's panel (the option of :func:`pertscale.pp.qc_summary` bounding it).
THRESHOLDS = {N_GENES_BY_COUNTS: MIN_GENES}
#: Colours of the kept cells and of the cells each filter drops (stacked in this order).
COLORS = {
    "": "#4878a8",
    EXCLUDED: "#9d9d9d",
    MIN_GENES: "#d1495b",
    MIN_CELLS_PER_PERTURBATION: "#edae49",
    "other": "#6b4c9a",
}
_BEFORE, _AFTER, _CONTROL, _DROPPED = "#b8cde0", "#4878a8", "#2a9d55", "#d1495b"
#: Above this many perturbations, the labels of the largest and smallest listed in a box (this many each).
_N_NAMED = 3


@dataclass(frozen=True)
class _QC:
    """What the QC plots read, from a QCSummary or a run's output directory."""

    perturbations: pd.DataFrame | None
    cells: pd.DataFrame | None
    thresholds: dict[str, int]
    control_label: str | None


def _is_summary(source) -> bool:
    from ..pp._qc_summary import QCSummary

    return isinstance(source, QCSummary)


def _check_source(source) -> None:
    if not (_is_summary(source) or isinstance(source, (str, Path))):
        raise TypeError(
            "a QC plot takes a pertscale.pp.QCSummary (from ps.pp.qc_summary) or the output directory of "
            f"`pertscale run`, not {type(source).__name__}"
        )


def _thresholds(record: dict) -> tuple[dict[str, int], str | None]:
    qc = record.get("qc") if isinstance(record.get("qc"), dict) else {}
    names = (MIN_GENES, MIN_CELLS_PER_PERTURBATION, "min_cells_per_gene")
    return {k: int(qc[k]) for k in names if qc.get(k) is not None}, qc.get("control_label")


def _read_table(path: Path) -> pd.DataFrame:
    """``qc.csv`` as :attr:`pertscale.pp.QCSummary.perturbations` (labels as text, ``""`` for kept)."""
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in (N_CELLS, N_CELLS_KEPT, IS_CONTROL, REASON) if c not in raw.columns]
    if missing:
        raise ValueError(
            f"{path} lacks the column(s) {', '.join(missing)} of the table `pertscale run` writes; it holds "
            f"{', '.join(raw.columns)}"
        )
    table = raw.set_index(raw.columns[0])
    for col in (N_CELLS, N_CELLS_KEPT, "n_cells_min_genes"):
        if col in table.columns:
            table[col] = pd.to_numeric(table[col]).astype(np.int64)
    table[IS_CONTROL] = table[IS_CONTROL].str.lower() == "true"
    return table


def _load(source, *, cells: list[str] | None = None, optional: tuple[str, ...] = (), perturbations: bool = False):
    """The tables a QC plot needs: per-cell columns ``cells`` (those of ``optional`` only if present)."""
    _check_source(source)
    if _is_summary(source):
        thresholds = {
            MIN_GENES: source.min_genes,
            MIN_CELLS_PER_PERTURBATION: source.min_cells_per_perturbation,
            "min_cells_per_gene": source.min_cells_per_gene,
        }
        frame = None
        if cells is not None:
            asked = [c for c in cells if c not in optional or c in source.cells.columns]
            check_names(asked, source.cells.columns, "QC metric")
            frame = source.cells[[*asked, REASON]]
        return _QC(source.perturbations if perturbations else None, frame, thresholds, source.control_label)
    directory = Path(source)
    table = _read_table(run_file(directory, "qc.csv")) if perturbations else None
    thresholds, control = _thresholds(read_run_json(directory))
    frame = None
    if cells is not None:
        group = zarr_group(run_file(directory, "qc_cells.zarr"))
        stored = list(group["obs"].attrs.get("column-order", []))
        asked = [c for c in cells if c not in optional or c in stored]
        check_names(asked, stored, "QC metric")
        frame = read_obs_columns(group, [*asked, REASON])
        frame[REASON] = frame[REASON].astype(str).replace("nan", "")
    return _QC(table, frame, thresholds, control)


# ---------------------------------------------------------------------------------------------- metrics


def _draw_metric(ax, values: np.ndarray, reason: np.ndarray, key: str, *, bins, log: bool, threshold) -> list:
    """One metric's histogram on ``ax``: kept cells, then those of each drop reason stacked; its threshold line."""
    finite = np.isfinite(values)
    values, reason = values[finite], reason[finite]
    n_missing = int((~finite).sum())
    if values.size == 0:
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", va="center")
        ax.set_title(key)
        return []
    edges = np.histogram_bin_edges(values, bins=bins)
    present = pd.unique(reason)
    order = [""] + [r for r in (EXCLUDED, MIN_GENES, MIN_CELLS_PER_PERTURBATION) if r in present]
    order += sorted(str(r) for r in present if r not in order)
    bottom = np.zeros(len(edges) - 1, dtype=np.int64)
    for r in order:
        counts, _ = np.histogram(values[reason == r], edges)
        label = "kept" if r == "" else f"dropped: {r}"
        ax.stairs(
            bottom + counts,
            edges,
            baseline=bottom.copy(),
            fill=True,
            color=COLORS.get(r, COLORS["other"]),
            label=label,
            gid=f"qc-hist:{r or 'kept'}",
        )
        bottom = bottom + counts
    if threshold is not None:
        name, value = threshold
        ax.axvline(
            value, color="black", linestyle="--", linewidth=1.2, label=f"{name} = {value}", gid=f"qc-threshold:{name}"
        )
    n_kept = int((reason == "").sum())
    title = f"{key}\n{n_kept:,} kept, {values.size - n_kept:,} dropped cells"
    if n_missing:
        title += f" ({n_missing:,} without a value)"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(key)
    ax.set_ylabel("cells")
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.8)
    else:
        ax.set_ylim(bottom=0)
    return ax.get_legend_handles_labels()


def _metric_keys(keys) -> tuple[list[str], tuple[str, ...]]:
    keys = [keys] if isinstance(keys, str) else [str(k) for k in keys]
    if not keys:
        raise ValueError("keys is empty: name at least one QC metric, e.g. 'n_genes_by_counts'")
    # the default panels leave out the mitochondrial metric of data without mitochondrial genes
    optional = _MT_KEYS if tuple(keys) == QC_KEYS else ()
    return keys, optional


def _draw_metrics(axes_list, data: _QC, keys: list[str], *, bins, log: bool) -> tuple[list, list]:
    handles: dict[str, object] = {}
    reason = data.cells[REASON].to_numpy().astype(str)
    for ax, key in zip(axes_list, keys, strict=True):
        name = THRESHOLDS.get(key)
        threshold = (name, data.thresholds[name]) if name in data.thresholds else None
        values = data.cells[key].to_numpy(dtype=np.float64)
        h, labels = _draw_metric(ax, values, reason, key, bins=bins, log=log, threshold=threshold) or ([], [])
        for handle, label in zip(h, labels, strict=True):
            handles.setdefault(label, handle)
    return list(handles.values()), list(handles)


def qc_metrics(
    source,
    *,
    keys=QC_KEYS,
    log: bool = True,
    bins: int | str = 50,
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Histograms of the cells' QC metrics, kept and dropped cells stacked, with the chosen thresholds.

    One panel per metric: the kept cells, then above them the cells each
    filter drops (an excluded label, ``min_genes``,
    ``min_cells_per_perturbation``), counted in the same bins with
    :func:`numpy.histogram`; ``min_genes`` drawn as a dashed line on
    ``n_genes_by_counts``. Titles give the cells kept and dropped. As the
    histograms of scanpy's QC tutorial, with the filters' outcome.

    Parameters
    ----------
    source
        A :class:`pertscale.pp.QCSummary`, or the output directory of
        ``pertscale run`` (reads ``qc_cells.zarr``, only the columns
        plotted, and the thresholds of ``run.json``).
    keys
        Per-cell metrics, one panel each: ``n_genes_by_counts`` (genes with
        a non-zero count), ``total_counts`` (UMIs), ``pct_counts_mt``
        (percent of a cell's counts in mitochondrial genes),
        ``total_counts_mt``. The default draws the first three, leaving out
        the mitochondrial one when the data have no ``MT-`` genes. Cells
        without a value (``pct_counts_mt`` of a cell without counts) are
        left out and counted in the title.
    log
        Logarithmic count axis (cells per bin), so that a few dropped cells
        stay visible beside many kept ones.
    bins
        Bins per panel, as :func:`numpy.histogram_bin_edges` takes them.
    figsize
        Inches; default 4 wide per panel by 3.6.
    save
        Write the figure to this path (format from the suffix).
    show
        Show the figure (``pyplot.show``); ``None``: left open unless saved (see
        :func:`~pertscale.pl._common.finish`).

    Returns
    -------
    matplotlib.figure.Figure
        One axes per metric, in the order of ``keys``.

    Raises
    ------
    KeyError
        If a metric asked for is not among the cells' columns (naming the
        closest).
    FileNotFoundError
        If ``source`` is a directory that is not a run's output directory,
        or lacks ``qc_cells.zarr`` or ``run.json`` (saying what writes them).
    TypeError
        If ``source`` is neither a QCSummary nor a path.
    """
    keys, optional = _metric_keys(keys)
    data = _load(source, cells=keys, optional=optional)
    keys = [k for k in keys if k in data.cells.columns]
    plt = pyplot()
    fig, axs = plt.subplots(
        1, len(keys), figsize=figsize or (4.0 * len(keys), 3.6), layout="constrained", squeeze=False
    )
    handles, labels = _draw_metrics(list(axs[0]), data, keys, bins=bins, log=log)
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), frameon=False, fontsize=9)
    return finish(fig, save=save, show=show)


# ------------------------------------------------------------------------------------ cells per perturbation


def _draw_counts(ax, table: pd.DataFrame, threshold: int | None, *, n_labels: int, log: bool | None) -> None:
    """Cells per perturbation before and after QC on ``ax``, most cells first."""
    t = table.sort_values(N_CELLS, ascending=False, kind="stable")
    labels = t.index.astype(str).to_numpy()
    before = t[N_CELLS].to_numpy(dtype=np.int64)
    after = t[N_CELLS_KEPT].to_numpy(dtype=np.int64)
    dropped = (t[REASON].astype(str) != "").to_numpy()
    control = t[IS_CONTROL].to_numpy(dtype=bool)
    n = len(t)
    if log is None:  # a control many times larger than the perturbations flattens a linear axis
        positive = before[before > 0]
        log = positive.size > 0 and positive.max() > 20 * np.median(positive)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    extra = []
    if n <= n_labels:
        x = np.arange(n)
        ax.bar(x, before, width=0.8, color=_BEFORE, label="before QC (n_cells)", gid="qc-before")
        colors = np.where(control, _CONTROL, _AFTER)
        ax.bar(x, after, width=0.8, color=colors, label="after QC (n_cells_kept)", gid="qc-after")
        ax.set_xticks(x, labels, rotation=90, fontsize=8 if n > 20 else 9)
        for tick, is_control, is_dropped in zip(ax.get_xticklabels(), control, dropped, strict=True):
            if is_control:
                tick.set_fontweight("bold")
                tick.set_color(_CONTROL)
            elif is_dropped:
                tick.set_color(_DROPPED)
        if dropped.any():
            top = before[dropped].astype(np.float64)
            ax.scatter(x[dropped], top, marker="x", color=_DROPPED, s=25, zorder=3, gid="qc-dropped")
            extra.append(Line2D([], [], marker="x", color=_DROPPED, linestyle="", label=f"dropped ({dropped.sum()})"))
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_xlabel("perturbation (label in red: dropped; bold green: control)")
    else:  # a ranked step plot: two lines and two marker sets, whatever the number of perturbations
        rank = np.arange(1, n + 1)
        ax.step(rank, before, where="mid", color="#7fa7cc", linewidth=1.2, label="before QC (n_cells)", gid="qc-before")
        # after QC ranked on its own: the kept perturbations' cells, most first (the curve ends at the number kept)
        kept_after = np.sort(after[~dropped])[::-1]
        ax.step(
            rank[: kept_after.size], kept_after, where="mid", color=_AFTER, linewidth=1.2,
            label="after QC (n_cells_kept, ranked)", gid="qc-after",
        )  # fmt: skip
        if dropped.any():
            ax.scatter(
                rank[dropped], before[dropped], marker="|", color=_DROPPED, s=30, zorder=3, linewidths=0.8,
                label=f"dropped ({dropped.sum():,})", gid="qc-dropped",
            )  # fmt: skip
        for i in np.flatnonzero(control):
            ax.scatter(rank[i], before[i], marker="*", s=120, color=_CONTROL, zorder=4, gid="qc-control")
            ax.annotate(
                f"{labels[i]} ({before[i]:,})", (rank[i], before[i]), xytext=(8, -4), textcoords="offset points",
                fontsize=8, color=_CONTROL, fontweight="bold", va="top",
            )  # fmt: skip
        others = np.flatnonzero(~control)
        head, tail = others[:_N_NAMED], others[-_N_NAMED:] if others.size > _N_NAMED else others[:0]
        text = "largest: " + ", ".join(f"{labels[i]} ({before[i]:,})" for i in head)
        if tail.size:
            text += "\nsmallest: " + ", ".join(f"{labels[i]} ({before[i]:,})" for i in tail)
        ax.text(
            0.98, 0.96, text, transform=ax.transAxes, ha="right", va="top", fontsize=8,
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.8", "alpha": 0.9},
        )  # fmt: skip
        ax.set_xlim(0.5, n + 0.5)
        ax.set_xlabel(f"perturbation rank (by cells before QC; {n:,} labels)")
        extra.append(Line2D([], [], marker="*", color=_CONTROL, linestyle="", markersize=9, label="control"))
    if threshold is not None:
        ax.axhline(
            threshold, color="black", linestyle="--", linewidth=1.0,
            label=f"min_cells_per_perturbation = {threshold}", gid="qc-threshold:min_cells_per_perturbation",
        )  # fmt: skip
    if n <= n_labels and control.any():
        extra.append(Patch(color=_CONTROL, label="control (after QC)"))
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.8)
    ax.set_ylabel("cells")
    kept = int((~dropped).sum())
    ax.set_title(f"cells per perturbation: {kept:,} of {n:,} perturbations kept", fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    if n <= n_labels:  # the bars' own handles take the first bar's colour, which may be the control's
        handles = [
            Patch(color=_AFTER if name.startswith("after") else _BEFORE) if name.startswith(("after", "before")) else h
            for h, name in zip(handles, names, strict=True)
        ]
    ax.legend(
        handles + extra,
        names + [h.get_label() for h in extra],
        fontsize=8,
        loc="best" if n <= n_labels else "lower left",
    )


def qc_perturbation_counts(
    source,
    *,
    n_labels: int = 40,
    log: bool | None = None,
    ax=None,
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Cells per perturbation before and after QC, most first, with ``min_cells_per_perturbation`` drawn.

    Up to ``n_labels`` perturbations: one bar each, cells before QC
    (``n_cells``) behind cells kept (``n_cells_kept``), labels on the axis
    (the control bold green, dropped ones red and marked x). More: a
    ranked step plot of the same two columns (two lines, whatever the
    number of perturbations), dropped ones marked by a tick, the control by
    a star, and the largest and smallest named in a box. As crispyx's
    ``cx.pl.qc_perturbation_counts``.

    Parameters
    ----------
    source
        A :class:`pertscale.pp.QCSummary`, or the output directory of
        ``pertscale run`` (reads ``qc.csv`` and ``run.json``).
    n_labels
        Most perturbations drawn as labelled bars.
    log
        Logarithmic cell axis; ``None``: when the largest label holds more
        than 20 times the median.
    ax
        Axes to draw on; default a new figure.
    figsize
        Inches of a new figure; default from the number of bars.
    save, show
        As :func:`qc_metrics`.

    Returns
    -------
    matplotlib.axes.Axes

    Raises
    ------
    FileNotFoundError
        If ``source`` is a directory that is not a run's output directory,
        or lacks ``qc.csv`` or ``run.json`` (saying what writes them).
    ValueError
        If ``qc.csv`` lacks the columns of the table ``pertscale run``
        writes, or ``n_labels`` is negative.
    TypeError
        If ``source`` is neither a QCSummary nor a path.
    """
    if int(n_labels) < 0:
        raise ValueError(f"n_labels={n_labels} is negative: give the most perturbations to draw as labelled bars")
    data = _load(source, perturbations=True)
    if ax is None:
        n = len(data.perturbations)
        width = min(max(4.0, 0.22 * n + 1.5), 12.0) if n <= n_labels else 8.0
        ax = pyplot().subplots(figsize=figsize or (width, 4.2), layout="constrained")[1]
    _draw_counts(
        ax, data.perturbations, data.thresholds.get(MIN_CELLS_PER_PERTURBATION), n_labels=int(n_labels), log=log
    )
    return finish(ax, save=save, show=show)


def qc_summary(
    source,
    *,
    keys=QC_KEYS,
    n_labels: int = 40,
    log: bool = True,
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """The QC metrics' histograms (top row) and the cells per perturbation (bottom) in one figure.

    The panels of :func:`qc_metrics` and :func:`qc_perturbation_counts`,
    under a title of what QC keeps; as crispyx's ``cx.pl.qc_summary``.

    Parameters
    ----------
    source
        A :class:`pertscale.pp.QCSummary`, or the output directory of
        ``pertscale run`` (reads ``qc.csv``, ``qc_cells.zarr`` and
        ``run.json``).
    keys, log
        As :func:`qc_metrics` (``log`` applies to the histograms; the
        perturbation axis chooses its own, as :func:`qc_perturbation_counts`).
    n_labels
        As :func:`qc_perturbation_counts`.
    figsize
        Inches; default from the number of metrics.
    save, show
        As :func:`qc_metrics`.

    Returns
    -------
    matplotlib.figure.Figure
        The metric axes first, then the perturbation axes.

    Raises
    ------
    KeyError, FileNotFoundError, ValueError, TypeError
        As :func:`qc_metrics` and :func:`qc_perturbation_counts`.
    """
    keys, optional = _metric_keys(keys)
    data = _load(source, cells=keys, optional=optional, perturbations=True)
    keys = [k for k in keys if k in data.cells.columns]
    plt = pyplot()
    k = len(keys)
    fig = plt.figure(figsize=figsize or (max(4.0 * k, 9.0), 8.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=(1.0, 1.1))
    metric_axes = list(top.subplots(1, k, squeeze=False)[0])
    handles, labels = _draw_metrics(metric_axes, data, keys, bins=50, log=log)
    top.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), frameon=False, fontsize=9)
    _draw_counts(
        bottom.subplots(),
        data.perturbations,
        data.thresholds.get(MIN_CELLS_PER_PERTURBATION),
        n_labels=int(n_labels),
        log=None,
    )
    reason = data.cells[REASON].astype(str)
    n_cells, n_kept = len(reason), int((reason == "").sum())
    table = data.perturbations
    fig.suptitle(
        f"QC: {n_kept:,} of {n_cells:,} cells and {int((table[REASON].astype(str) == '').sum()):,} of "
        f"{len(table):,} perturbations kept"
    )
    return finish(fig, save=save, show=show)

"""Plots of differential expression: one perturbation (volcano, MA, top genes) or the whole screen.

Every function reads the results lazily through :func:`pertscale.get.dataset`:
a plot of one perturbation reads that perturbation's row of each statistic it
shows (``ds[var].sel(perturbation=p)``); a screen-wide plot reads a reduction
computed block by block (:func:`de_counts`: significant genes per
perturbation), then only the rows or elements it draws. Nothing here loads
a whole ``perturbations x genes`` statistic.

Fold changes are in the base the results record
(``attrs['logfoldchanges_base']``: log2 unless an nb-glm run asked for
natural logarithms); the axes say which.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from .._validation import check_number
from ..variables import (
    BASE_MEAN,
    GENE,
    LOGFOLDCHANGES,
    N_CELLS,
    N_DE_GENES,
    PERTURBATION,
    PTS,
    PTS_REST,
    PVALS,
    PVALS_ADJ,
    SCORES,
)
from ._common import MAX_PANELS, axes, check_names, check_statistic, finish, pyplot, results_dataset

logger = logging.getLogger(__name__)

#: Colours of genes significantly up, down, and of the rest.
UP, DOWN, NOT_SIGNIFICANT = "#d62728", "#1f77b4", "#c7c7c7"
#: Where a p-value of exactly 0 is drawn (-log10 of the smallest positive normal float64: 307.65).
ZERO_P = float(np.finfo(np.float64).tiny)
#: :func:`de_genes_per_perturbation` draws one bar per perturbation up to this many, one step line beyond.
MAX_BARS = 100
#: :func:`de_heatmap`'s colour limit by default: this quantile of the absolute values shown.
ROBUST_QUANTILE = 0.99
#: :func:`knockdown` names the perturbations on its axis up to this many, a ranked scatter beyond.
MAX_NAMED = 60
#: Names per column of the list of the first-ranked perturbations beside a ranked line.
_LIST_ROWS = 40
#: Offsets (points) and directions (16) tried around a point for its label, nearest first.
_RADII = (3.0, 8.0, 14.0, 22.0, 32.0, 45.0, 60.0, 80.0)
_N_DIRECTIONS = 16
#: Margin (points) around each label's box: two labels stay twice this apart, and this far inside the axes.
_PAD = 2.0


# --------------------------------------------------------------------------------------------- shared helpers


def _compute(*collections):
    """Compute Dask-backed selections at the face (an outer ``ps.cluster.using`` block, an active client, threads)."""
    from ..cluster import compute

    return compute(*collections)


def _one_perturbation(ds, perturbation) -> str:
    if not isinstance(perturbation, str):
        raise TypeError(f"perturbation must be one label (a str), got {type(perturbation).__name__}")
    return check_names(perturbation, ds[PERTURBATION].values, "perturbation")[0]


def _rows(ds, perturbation: str, variables: Iterable[str]) -> dict[str, np.ndarray]:
    """``{variable: (n_genes,) float64}``: one perturbation's row of each variable, read in one computation."""
    variables = list(dict.fromkeys(variables))
    for name in variables:
        check_statistic(ds, name)
    (sub,) = _compute(ds[variables].sel({PERTURBATION: perturbation}))
    return {name: np.asarray(sub[name].values, dtype=np.float64) for name in variables}


def _lfc_label(ds) -> str:
    base = str(ds.attrs.get("logfoldchanges_base", "log2"))
    return "ln fold change" if base == "natural" else "log2 fold change"


def _control(ds) -> str:
    return str(ds.attrs.get("control_label", "control"))


def _thresholds(pval_threshold, lfc_threshold) -> tuple[float, float]:
    p = check_number(pval_threshold, "pval_threshold", minimum=0.0, maximum=1.0, min_open=True)
    lfc = check_number(lfc_threshold, "lfc_threshold", minimum=0.0, allow_none=True)
    return p, (0.0 if lfc is None else lfc)


def _significant(pvals: np.ndarray, lfc: np.ndarray, pval_threshold: float, lfc_threshold: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return (pvals < pval_threshold) & (np.abs(lfc) >= lfc_threshold)


def _gene_names(ds) -> np.ndarray:
    return np.asarray(ds[GENE].values).astype(str)


def _rank(values: np.ndarray, rank_by: str) -> np.ndarray:
    """Indices of the finite ``values``, the largest first (``"up"``), smallest (``"down"``), or largest |value|."""
    if rank_by not in ("up", "down", "abs"):
        raise ValueError(f"rank_by must be 'up', 'down' or 'abs'; got {rank_by!r}")
    finite = np.flatnonzero(np.isfinite(values))
    key = {"up": -values[finite], "down": values[finite], "abs": -np.abs(values[finite])}[rank_by]
    return finite[np.argsort(key, kind="stable")]


def _place_labels(ax, x, y, names, *, fontsize: float = 7.0, avoid=()) -> list:
    """Write ``names`` at the data points ``(x, y)`` without overlaps; return the label artists placed.

    Greedy, in the order given (most important first), in display
    coordinates: each label takes the first offset around its point (rings of
    :data:`_RADII` points, 16 directions, the side away from the axes' centre
    first) where its box stays inside the axes and overlaps no label placed
    before, no labelled point and no box in ``avoid`` (display-coordinate
    ``Bbox`` es). A label that finds no place is left out (logged). A label
    set away from its point is joined to it by a thin line (an empty
    annotation). Labels are placed in points from their data point, so they
    keep their layout when the figure is saved at another dpi; call this
    after the axes' limits are final.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size == 0:
        return []
    fig = ax.figure
    px = ax.transData.transform(np.column_stack([x, y]))
    frame = ax.get_window_extent()
    centre = 0.5 * (frame.x0 + frame.x1)
    scale = fig.dpi / 72.0
    marker = 3.0 * scale  # half the side of the box kept free around each labelled point
    boxes = [(p[0] - marker, p[1] - marker, p[0] + marker, p[1] + marker) for p in px]
    boxes += [(b.x0, b.y0, b.x1, b.y1) for b in avoid]
    taken = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    placed, skipped = [], []
    pad = _PAD * scale
    for i, ((x_i, y_i), (p_x, p_y), name) in enumerate(zip(zip(x, y, strict=True), px, names, strict=True)):
        probe = ax.text(0, 0, str(name), fontsize=fontsize, transform=None)  # its size in pixels
        extent = probe.get_window_extent()
        probe.remove()
        w, h = extent.width, extent.height
        start = 0.0 if p_x >= centre else math.pi
        steps = [0] + [s for k in range(1, _N_DIRECTIONS // 2 + 1) for s in (k, -k)][: _N_DIRECTIONS - 1]
        angles = [start + math.pi / 6 + s * 2 * math.pi / _N_DIRECTIONS for s in steps]
        spot = None
        for radius in _RADII:
            for angle in angles:
                dx, dy = radius * math.cos(angle), radius * math.sin(angle)
                ha = "left" if dx > 0.3 * radius else ("right" if dx < -0.3 * radius else "center")
                va = "bottom" if dy > 0.3 * radius else ("top" if dy < -0.3 * radius else "center")
                ax_x = p_x + dx * scale
                ax_y = p_y + dy * scale
                x0 = ax_x - {"left": 0.0, "center": w / 2, "right": w}[ha]
                y0 = ax_y - {"bottom": 0.0, "center": h / 2, "top": h}[va]
                box = (x0 - pad, y0 - pad, x0 + w + pad, y0 + h + pad)
                if box[0] < frame.x0 or box[1] < frame.y0 or box[2] > frame.x1 or box[3] > frame.y1:
                    continue
                hit = (taken[:, 0] < box[2]) & (taken[:, 2] > box[0]) & (taken[:, 1] < box[3]) & (taken[:, 3] > box[1])
                # a label may cover the free box of its own point only at the nearest ring (it touches it)
                own = np.zeros(taken.shape[0], dtype=bool)
                own[i] = radius == _RADII[0]
                if not (hit & ~own).any():
                    spot = (dx, dy, ha, va, box)
                    break
            if spot is not None:
                break
        if spot is None:
            skipped.append(str(name))
            continue
        dx, dy, ha, va, box = spot
        label = ax.annotate(
            str(name),
            xy=(x_i, y_i),
            xytext=(dx, dy),
            textcoords="offset points",
            ha=ha,
            va=va,
            fontsize=fontsize,
            annotation_clip=False,
        )
        if math.hypot(dx, dy) > 6.0:
            ax.annotate(
                "",
                xy=(x_i, y_i),
                xytext=(dx, dy),
                textcoords="offset points",
                arrowprops={"arrowstyle": "-", "color": "0.35", "lw": 0.5, "shrinkA": 0, "shrinkB": 1.5},
                annotation_clip=False,
            )
        placed.append(label)
        taken = np.vstack([taken, box])
    if skipped:
        logger.info("%d labels found no free place and are left out: %s", len(skipped), ", ".join(skipped[:10]))
    return placed


def _label_top(ax, x, y, genes, *, candidates, pv, lfc, n_labels: int) -> None:
    """Name the ``n_labels`` candidate genes with the smallest p-values (ties: largest ``|lfc|``) at ``(x, y)``."""
    pool = np.flatnonzero(candidates)
    order = pool[np.lexsort((-np.abs(lfc[pool]), pv[pool]))][:n_labels]
    _place_labels(ax, x[order], y[order], genes[order])


def _symmetric_limits(values: np.ndarray, *, at_least: float = 0.0, margin: float = 0.08) -> tuple[float, float]:
    finite = np.abs(values[np.isfinite(values)])
    top = max(float(finite.max()) if finite.size else 1.0, at_least, 1e-12) * (1 + margin)
    return -top, top


# ------------------------------------------------------------------------------------------ one perturbation


def volcano(
    results,
    perturbation: str,
    *,
    method: str | None = None,
    pval_threshold: float = 0.05,
    lfc_threshold: float | None = 1.0,
    n_labels: int = 10,
    use_pvals_adj: bool = True,
    ax=None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Volcano plot of one perturbation: -log10 p-value against fold change, one point per tested gene.

    Genes with ``p < pval_threshold`` and ``|logfoldchanges| >=
    lfc_threshold`` are significant: red when up, blue when down; the rest
    grey. The thresholds are drawn as dashed lines. The ``n_labels``
    significant genes with the smallest p-values (ties: the largest
    ``|fold change|``; when none is significant, the tested genes) are named,
    without overlaps (a label that finds no free place is left out). A
    p-value of exactly 0 (below float64's range) is drawn at
    ``-log10(ZERO_P)`` = 307.65 as a triangle and counted in the legend.
    Untested genes (NaN) are not drawn.

    Parameters
    ----------
    results
        Test results: a results AnnData (``ps.tl.rank_genes_groups``), the
        path of ``de_<method>.zarr``/``.h5ad``, an AnnData holding a result
        store, or an ``xarray.Dataset`` of :func:`pertscale.get.dataset`.
    perturbation
        The perturbation's label.
    method
        Which stored test, when ``results`` holds several (``"wilcoxon"``,
        ``"t-test"``, ``"nb-glm"``).
    pval_threshold
        Significance threshold on the p-values, in (0, 1].
    lfc_threshold
        Least ``|logfoldchanges|`` (log2 units) of a significant gene;
        ``None`` or 0: none.
    n_labels
        Genes named.
    use_pvals_adj
        Plot the adjusted p-values (``pvals_adj``, Benjamini-Hochberg by
        default); ``False``: the raw ``pvals``.
    ax
        Axes to draw in; default a new figure.
    save
        Path of an image to save the figure to (format from the suffix).
    show
        Show the figure (``pyplot.show``); ``None``: left open unless saved
        (see :func:`pertscale.pl._common.finish`).

    Returns
    -------
    matplotlib.axes.Axes
        The scatter's points (``ax.collections``) are ``(logfoldchanges,
        -log10 p)`` of the tested genes.

    Raises
    ------
    KeyError
        If ``perturbation`` is not in the results (the message lists the
        closest labels).
    ValueError
        If the results lack a statistic plotted, or a threshold is out of
        range.

    Notes
    -----
    Reads the perturbation's row of ``logfoldchanges`` and of ``pvals_adj`` (or
    ``pvals``): ``2 x n_genes`` values.
    """
    p_max, lfc_min = _thresholds(pval_threshold, lfc_threshold)
    n_labels = check_number(n_labels, "n_labels", integer=True, minimum=0)
    ds = results_dataset(results, method)
    p_name = PVALS_ADJ if use_pvals_adj else PVALS
    label = _one_perturbation(ds, perturbation)
    values = _rows(ds, label, (LOGFOLDCHANGES, p_name))
    lfc, pv = values[LOGFOLDCHANGES], values[p_name]
    genes = _gene_names(ds)
    tested = np.isfinite(lfc) & np.isfinite(pv)
    zero = tested & (pv <= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = -np.log10(np.where(zero, ZERO_P, pv))
    sig = _significant(pv, lfc, p_max, lfc_min) & tested
    up, down = sig & (lfc > 0), sig & (lfc < 0)
    rest = tested & ~up & ~down

    ax = axes(ax)
    for mask, colour, size, name in (
        (rest, NOT_SIGNIFICANT, 5, "not significant"),
        (down, DOWN, 9, "down"),
        (up, UP, 9, "up"),
    ):
        drawn = mask & ~zero
        ax.scatter(lfc[drawn], y[drawn], s=size, c=colour, linewidths=0, label=f"{name} ({int(mask.sum())})")
    if zero.any():
        colours = np.where(up[zero], UP, np.where(down[zero], DOWN, NOT_SIGNIFICANT))
        ax.scatter(
            lfc[zero],
            y[zero],
            s=22,
            marker="^",
            c=colours,
            edgecolors="black",
            linewidths=0.5,
            label=f"p = 0, drawn at {ZERO_P:.1e} ({int(zero.sum())})",
        )
    ax.axhline(-math.log10(p_max), ls="--", lw=0.8, c="0.35", zorder=0)
    if lfc_min > 0:
        for edge in (-lfc_min, lfc_min):
            ax.axvline(edge, ls="--", lw=0.8, c="0.35", zorder=0)
    ax.set_xlim(*_symmetric_limits(lfc[tested], at_least=1.2 * lfc_min))
    top = float(np.max(y[tested])) if tested.any() else 1.0
    top = max(top, -math.log10(p_max)) * 1.1 + 0.1
    ax.set_ylim(-0.02 * top, top)
    ax.set_xlabel(f"{_lfc_label(ds)} ({label} vs {_control(ds)})")
    ax.set_ylabel("-log10 adjusted p-value" if use_pvals_adj else "-log10 p-value")
    ax.set_title(label)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=7, markerscale=1.5)

    _label_top(ax, lfc, y, genes, candidates=sig if sig.any() else tested, pv=pv, lfc=lfc, n_labels=n_labels)
    return finish(ax, save=save, show=show)


def ma(
    results,
    perturbation: str,
    *,
    method: str | None = None,
    pval_threshold: float = 0.05,
    lfc_threshold: float | None = 1.0,
    n_labels: int = 10,
    ax=None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """MA plot of one perturbation: fold change against how much the gene is expressed.

    The x axis, log-scaled:

    - nb-glm results: ``baseMean``, the mean normalized count over the
      perturbation's and the control's cells (DESeq2's MA plot);
    - Wilcoxon and t-test results, which store no mean: the fraction of
      cells detecting the gene over the perturbation's and the control's
      cells, ``(pts * n + pts_rest * n_control) / (n + n_control)``
      (``n`` the perturbation's cells, the coordinate ``n_cells``;
      ``n_control`` the settings' ``n_control_cells``), the pooled analogue
      of ``baseMean``; where the cell numbers are not known, the control
      cells' fraction ``pts_rest``. The axis label says which.

    Genes whose x value is 0 cannot be drawn on the log axis and are left
    out (their fold changes are NaN: untested). Significant genes
    (``pvals_adj < pval_threshold`` and ``|logfoldchanges| >=
    lfc_threshold``) are coloured as in :func:`volcano`, the
    ``n_labels`` with the smallest adjusted p-values named; dashed lines at
    ``+-lfc_threshold``.

    Parameters
    ----------
    results, perturbation, method, pval_threshold, lfc_threshold, n_labels, ax, save, show
        As :func:`volcano`.

    Returns
    -------
    matplotlib.axes.Axes
        The scatter's points are ``(x, logfoldchanges)`` of the drawn genes.

    Raises
    ------
    KeyError
        If ``perturbation`` is not in the results (with the closest labels).
    ValueError
        If the results hold neither ``baseMean`` nor ``pts``/``pts_rest``, or
        a threshold is out of range.

    Notes
    -----
    Reads the perturbation's row of ``logfoldchanges``, ``pvals_adj`` and
    ``baseMean`` (or ``pts`` and ``pts_rest``).
    """
    p_max, lfc_min = _thresholds(pval_threshold, lfc_threshold)
    n_labels = check_number(n_labels, "n_labels", integer=True, minimum=0)
    ds = results_dataset(results, method)
    label = _one_perturbation(ds, perturbation)
    if BASE_MEAN in ds.data_vars:
        values = _rows(ds, label, (LOGFOLDCHANGES, PVALS_ADJ, BASE_MEAN))
        x = values[BASE_MEAN]
        x_label = "mean normalized count (baseMean)"
    else:
        values = _rows(ds, label, (LOGFOLDCHANGES, PVALS_ADJ, PTS, PTS_REST))
        n_control = ds.attrs.get("n_control_cells")
        if N_CELLS in ds.coords and n_control:
            n = float(ds[N_CELLS].sel({PERTURBATION: label}).values)
            x = (values[PTS] * n + values[PTS_REST] * float(n_control)) / (n + float(n_control))
            x_label = f"fraction of cells detecting the gene ({label} and {_control(ds)} cells)"
        else:
            x = values[PTS_REST]
            x_label = f"fraction of {_control(ds)} cells detecting the gene (pts_rest)"
    lfc, pv = values[LOGFOLDCHANGES], values[PVALS_ADJ]
    genes = _gene_names(ds)
    drawn = np.isfinite(lfc) & np.isfinite(x) & (x > 0)
    sig = _significant(pv, lfc, p_max, lfc_min) & drawn
    up, down = sig & (lfc > 0), sig & (lfc < 0)
    rest = drawn & ~up & ~down

    ax = axes(ax)
    for mask, colour, size, name in (
        (rest, NOT_SIGNIFICANT, 5, "not significant"),
        (down, DOWN, 9, "down"),
        (up, UP, 9, "up"),
    ):
        ax.scatter(x[mask], lfc[mask], s=size, c=colour, linewidths=0, label=f"{name} ({int(mask.sum())})")
    ax.set_xscale("log")
    ax.axhline(0, lw=0.8, c="0.35", zorder=0)
    if lfc_min > 0:
        for edge in (-lfc_min, lfc_min):
            ax.axhline(edge, ls="--", lw=0.8, c="0.35", zorder=0)
    ax.set_ylim(*_symmetric_limits(lfc[drawn], at_least=1.2 * lfc_min))
    if drawn.any():
        lo, hi = float(x[drawn].min()), float(x[drawn].max())
        ax.set_xlim(lo / 1.5, hi * 1.5)
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{_lfc_label(ds)} ({label} vs {_control(ds)})")
    ax.set_title(label)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=7, markerscale=1.5)
    _label_top(ax, x, lfc, genes, candidates=sig if sig.any() else drawn, pv=pv, lfc=lfc, n_labels=n_labels)
    return finish(ax, save=save, show=show)


def top_genes_bar(
    results,
    perturbation: str,
    *,
    method: str | None = None,
    n_genes: int = 20,
    key: str = SCORES,
    rank_by: str = "abs",
    ax=None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Horizontal bars of one perturbation's top genes by a statistic (scores or fold changes).

    The first-ranked gene is at the top; bars are red where the statistic
    is positive (above control), blue where negative.

    Parameters
    ----------
    results, perturbation, method, ax, save, show
        As :func:`volcano`.
    n_genes
        Genes shown.
    key
        The statistic: ``"scores"`` (the test statistic: z of Wilcoxon's U,
        Welch's t, nb-glm's Wald z), ``"logfoldchanges"`` (log2), or any other
        of the results' statistics.
    rank_by
        ``"abs"``: the largest ``|key|`` (both directions, the default: a
        knock-down is a large negative score); ``"up"``: the largest values
        (scanpy's order); ``"down"``: the smallest.

    Returns
    -------
    matplotlib.axes.Axes
        ``ax.patches`` are the bars, top-ranked first from the top.

    Raises
    ------
    KeyError
        If ``perturbation`` is not in the results (with the closest labels).
    ValueError
        If the results lack ``key`` (naming the method that makes it), or
        ``rank_by`` is not one of ``"abs"``, ``"up"``, ``"down"``.

    Notes
    -----
    Reads the perturbation's row of ``key``.
    """
    n_genes = check_number(n_genes, "n_genes", integer=True, minimum=1)
    ds = results_dataset(results, method)
    label = _one_perturbation(ds, perturbation)
    values = _rows(ds, label, (key,))[key]
    top = _rank(values, rank_by)[:n_genes]
    genes = _gene_names(ds)
    ax = axes(ax, figsize=(4.0, 0.6 + 0.18 * max(len(top), 4)))
    positions = np.arange(len(top))[::-1]
    ax.barh(positions, values[top], color=np.where(values[top] > 0, UP, DOWN), height=0.75)
    ax.set_yticks(positions, genes[top], fontsize=7)
    ax.set_ylim(-0.6, len(top) - 0.4)
    ax.axvline(0, lw=0.8, c="0.35")
    unit = f" ({_lfc_label(ds)})" if key == LOGFOLDCHANGES else ""
    ax.set_xlabel(f"{key}{unit}")
    ax.set_title(f"{label} vs {_control(ds)}: top {len(top)} genes")
    return finish(ax, save=save, show=show)


def rank_genes_groups(
    results,
    perturbations: str | Iterable[str] | None = None,
    *,
    method: str | None = None,
    n_genes: int = 20,
    ncols: int = 4,
    sharey: bool = True,
    key: str = SCORES,
    rank_by: str = "up",
    fontsize: float = 8,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """One panel per perturbation, gene names written at their rank and value: scanpy's ``rank_genes_groups`` plot.

    In each panel the ``n_genes`` top genes by ``key`` are written
    vertically, gene ``i`` (from 0) at ``x = i`` and ``y`` its value, as
    scanpy draws them (titles ``"<perturbation> vs <control>"``, x label
    ``ranking``).

    Parameters
    ----------
    results, method, save, show
        As :func:`volcano`.
    perturbations
        The perturbations to draw (one label or several); default all of
        them, when there are at most :data:`~pertscale.pl._common.MAX_PANELS`.
    n_genes
        Genes per panel.
    ncols
        Panels per row.
    sharey
        One y range for all panels.
    key
        The statistic ranked and drawn (``"scores"``, ``"logfoldchanges"``,
        ...).
    rank_by
        ``"up"`` (scanpy's order: the largest values), ``"down"`` or
        ``"abs"``; see :func:`top_genes_bar`.
    fontsize
        Size of the gene names (points).

    Returns
    -------
    matplotlib.figure.Figure
        One axes per perturbation (``fig.axes``, in the order asked).

    Raises
    ------
    KeyError
        If a perturbation is not in the results (with the closest labels).
    ValueError
        If ``perturbations`` is not given and the results hold more than
        ``MAX_PANELS`` perturbations (the screen-wide plots
        :func:`de_genes_per_perturbation` and :func:`de_heatmap` summarize
        them), or the results lack ``key``.

    Notes
    -----
    Reads the rows of ``key`` of the perturbations drawn.
    """
    n_genes = check_number(n_genes, "n_genes", integer=True, minimum=1)
    ncols = check_number(ncols, "ncols", integer=True, minimum=1)
    ds = results_dataset(results, method)
    check_statistic(ds, key)
    available = ds[PERTURBATION].values
    if perturbations is None:
        if len(available) > MAX_PANELS:
            raise ValueError(
                f"the results hold {len(available)} perturbations, more than the {MAX_PANELS} panels this plot "
                "draws: pass perturbations=[...] (a few labels), or summarize the screen with "
                "ps.pl.de_genes_per_perturbation(results) or ps.pl.de_heatmap(results)"
            )
        labels = [str(a) for a in available]
    else:
        labels = check_names(perturbations, available, "perturbation")
        if len(labels) > MAX_PANELS:
            raise ValueError(
                f"{len(labels)} perturbations asked for, more than the {MAX_PANELS} panels this plot draws: pass "
                "fewer, or summarize the screen with ps.pl.de_genes_per_perturbation(results) or "
                "ps.pl.de_heatmap(results)"
            )
    if not labels:
        raise ValueError("no perturbations to draw")
    (block,) = _compute(ds[key].sel({PERTURBATION: labels}))
    block = np.asarray(block.values, dtype=np.float64).reshape(len(labels), -1)
    genes = _gene_names(ds)
    tops = [_rank(values, rank_by)[:n_genes] for values in block]

    plt = pyplot()
    ncols = min(ncols, len(labels))
    nrows = math.ceil(len(labels) / ncols)
    fig, grid = plt.subplots(
        nrows, ncols, figsize=(3.2 * ncols, 3.0 * nrows), squeeze=False, gridspec_kw={"wspace": 0.22, "hspace": 0.3}
    )
    shown = np.concatenate([values[top] for values, top in zip(block, tops, strict=True)])
    shared = (float(shown.min()), float(shown.max())) if shown.size else (0.0, 1.0)
    tops_needed = []
    for count, (ax, label, values, top) in enumerate(zip(grid.flat, labels, block, tops, strict=False)):
        texts = [
            ax.text(rank, values[g], genes[g], rotation="vertical", va="bottom", ha="center", fontsize=fontsize)
            for rank, g in enumerate(top)
        ]
        ax.set_xlim(-0.9, n_genes - 0.1)
        lo, hi = shared if sharey else ((float(values[top].min()), float(values[top].max())) if top.size else (0, 1))
        lo -= 0.05 * ((hi - lo) or 1.0)
        # the names stand on their values: the top must leave room for the tallest above hi (pixels -> data)
        height = ax.get_window_extent().height
        need = hi
        for text, g in zip(texts, top, strict=True):
            share = min(text.get_window_extent().height / height, 0.9) + 0.03
            need = max(need, (values[g] - share * lo) / (1.0 - share))
        tops_needed.append(need)
        ax.set_ylim(lo, need)
        ax.set_title(f"{label} vs {_control(ds)}", fontsize=9)
        if count >= ncols * (nrows - 1) or count + ncols >= len(labels):
            ax.set_xlabel("ranking")
        if count % ncols == 0:
            ax.set_ylabel(key)
    if sharey:
        for ax in grid.flat[: len(labels)]:
            ax.set_ylim(ax.get_ylim()[0], max(tops_needed))
    for ax in grid.flat[len(labels) :]:
        ax.remove()
    return finish(fig, save=save, show=show)


# ------------------------------------------------------------------------------------------ the whole screen


def de_counts(
    results,
    *,
    pval_threshold: float = 0.05,
    lfc_threshold: float | None = None,
    method: str | None = None,
) -> pd.Series:
    """Differentially expressed genes per perturbation, counted block by block.

    A gene counts when ``pvals_adj < pval_threshold`` and, with
    ``lfc_threshold``, ``|logfoldchanges| >= lfc_threshold`` (log2 units);
    untested genes (NaN) never count. The sum over genes is a Dask reduction
    over the stored chunks: memory holds a chunk at a time, whatever the
    screen's size.

    Parameters
    ----------
    results, method
        As :func:`volcano`.
    pval_threshold
        False discovery rate threshold on ``pvals_adj``, in (0, 1].
    lfc_threshold
        Least ``|logfoldchanges|``; ``None`` (default): no fold-change
        threshold.

    Returns
    -------
    pandas.Series
        ``(n_perturbations,)`` int64 named ``n_de_genes``, indexed by
        perturbation label (name ``perturbation``), in the results' order.

    Raises
    ------
    ValueError
        If the results lack ``pvals_adj`` (or ``logfoldchanges`` with a
        fold-change threshold), or a threshold is out of range.
    """
    p_max, lfc_min = _thresholds(pval_threshold, lfc_threshold)
    ds = results_dataset(results, method)
    check_statistic(ds, PVALS_ADJ)
    hit = ds[PVALS_ADJ] < p_max
    if lfc_min > 0:
        check_statistic(ds, LOGFOLDCHANGES)
        hit = hit & (abs(ds[LOGFOLDCHANGES]) >= lfc_min)
    (count,) = _compute(hit.sum(GENE))
    index = pd.Index(np.asarray(ds[PERTURBATION].values).astype(str), name=PERTURBATION)
    return pd.Series(np.asarray(count.values, dtype=np.int64), index=index, name=N_DE_GENES)


def _given_counts(counts, ds) -> pd.Series:
    """``counts`` (DE genes per perturbation, by label) in the results' order.

    Raises
    ------
    ValueError
        If a perturbation of the results has no count.
    """
    labels = [str(p) for p in ds[PERTURBATION].values]
    given = pd.Series(counts).rename(index=str).reindex(labels)
    if given.isna().any():
        missing = list(given.index[given.isna()][:5])
        raise ValueError(f"counts= has no number for perturbation(s) {missing} of the results; pass de_counts(results)")
    return given.astype(np.int64)


def de_genes_per_perturbation(
    results,
    *,
    method: str | None = None,
    pval_threshold: float = 0.05,
    lfc_threshold: float | None = None,
    n_labels: int = 30,
    counts: pd.Series | None = None,
    ax=None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """DE genes of every perturbation, ranked: the screen at a glance, at any number of perturbations.

    Perturbations are ranked by their number of DE genes (:func:`de_counts`;
    ties in the results' order). Up to :data:`MAX_BARS` perturbations: one
    bar each, the first ``n_labels`` named on the x axis. Beyond: one step
    line over the ranks (log-scaled x axis, rank 1 first), the first
    ``n_labels`` marked on it and listed beside the axes with their counts
    (names in rank order: 40 to a column): the figure has a fixed number of
    artists whatever the screen's size.

    Parameters
    ----------
    results, method, ax, save, show
        As :func:`volcano`.
    pval_threshold, lfc_threshold
        As :func:`de_counts`.
    n_labels
        Perturbations named, from the first-ranked.
    counts
        DE genes per perturbation counted already (as :func:`de_counts`
        returns them at these thresholds, indexed by label; ``run.json``
        holds them): the results are then not read at all.

    Returns
    -------
    matplotlib.axes.Axes
        Bars (``ax.patches``, heights the counts in rank order) or one line
        (``ax.lines[0]``: x the ranks from 1, y the counts).

    Raises
    ------
    ValueError
        As :func:`de_counts`.

    Notes
    -----
    Reads the reduction of :func:`de_counts` (one number per perturbation).
    """
    n_labels = check_number(n_labels, "n_labels", integer=True, minimum=0)
    if counts is None:
        counts = de_counts(results, pval_threshold=pval_threshold, lfc_threshold=lfc_threshold, method=method)
    else:
        counts = _given_counts(counts, results_dataset(results, method))
    ranked = counts.iloc[np.argsort(-counts.to_numpy(), kind="stable")]
    n = len(ranked)
    heights = ranked.to_numpy()
    names = ranked.index.to_numpy()
    threshold = f"adjusted p < {pval_threshold:g}" + (f", |log2 FC| >= {lfc_threshold:g}" if lfc_threshold else "")
    if n <= MAX_BARS:
        ax = axes(ax, figsize=(max(4.0, 0.8 + 0.16 * n), 3.6))
        ax.bar(np.arange(n), heights, color="#4c72b0", width=0.8)
        named = min(n_labels, n)
        ax.set_xticks(np.arange(named), names[:named], rotation=90, fontsize=7)
        ax.set_xlim(-0.7, n - 0.3)
        ax.set_xlabel(f"perturbations, ranked ({n}; first {named} named)")
    else:
        ax = axes(ax, figsize=(6.0, 4.0))
        ranks = np.arange(1, n + 1)
        ax.step(ranks, heights, where="mid", color="#4c72b0", lw=1.2)
        ax.set_xscale("log")
        ax.set_xlim(0.8, n * 1.25)
        ax.set_ylim(0, max(1, heights.max()) * 1.15)
        ax.set_xlabel(f"perturbations, ranked ({n:,})")
        named = min(n_labels, n)
        if named:
            ax.scatter(ranks[:named], heights[:named], s=6, c="black", zorder=3, label=f"first {named}, listed")
            width = len(str(named))
            lines = [f"{k + 1:>{width}} {names[k]} ({heights[k]:,})" for k in range(named)]
            left = 1.03
            for start in range(0, named, _LIST_ROWS):
                column = ax.text(
                    left,
                    1.0,
                    "\n".join(lines[start : start + _LIST_ROWS]),
                    transform=ax.transAxes,
                    va="top",
                    ha="left",
                    fontsize=6.5,
                    family="monospace",
                )
                extent = column.get_window_extent().transformed(ax.transAxes.inverted())
                left = extent.x1 + 0.03
            ax.legend(loc="lower left", frameon=False, fontsize=7)
    ax.set_ylabel(f"DE genes ({threshold})")
    ax.set_title(f"DE genes per perturbation ({int((heights > 0).sum()):,} of {n:,} with any)")
    return finish(ax, save=save, show=show)


def de_heatmap(
    results,
    *,
    method: str | None = None,
    n_perturbations: int = 40,
    n_genes: int = 40,
    key: str = LOGFOLDCHANGES,
    pval_threshold: float = 0.05,
    lfc_threshold: float | None = None,
    cluster: bool = True,
    cmap: str = "RdBu_r",
    vmax: float | None = None,
    counts: pd.Series | None = None,
    ax=None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Heatmap of the top perturbations (by DE genes) x their top genes, clustered; colours centred at 0.

    Perturbations: the ``n_perturbations`` with the most DE genes
    (:func:`de_counts`; ties in the results' order). Genes: among those
    rows, the ``n_genes`` significant in the most of them (``pvals_adj <
    pval_threshold``, and ``|logfoldchanges| >= lfc_threshold`` if given),
    ties broken by the larger sum of ``|key|`` over the rows where they are
    significant; when fewer genes are significant, the rest by the largest
    mean ``|key|``. Cells are ``key`` (NaN, untested, shown grey).

    With ``cluster``, rows and columns are ordered by hierarchical
    clustering (``scipy.cluster.hierarchy.linkage``, average linkage,
    Euclidean distance, NaN taken as 0, ``optimal_ordering=True``; its
    ``leaves_list``), computed on the matrix with rows in rank order (most DE
    genes first) and columns in the gene order above. Without, rows are in
    rank order and columns in gene order.

    Parameters
    ----------
    results, method, ax, save, show
        As :func:`volcano`.
    n_perturbations, n_genes
        Rows and columns.
    key
        The statistic shown (default ``logfoldchanges``, log2).
    pval_threshold, lfc_threshold
        What makes a gene DE, as :func:`de_counts`.
    cluster
        Order rows and columns by clustering.
    cmap
        A diverging colormap, centred at 0.
    vmax
        The colour scale's limit (``-vmax`` to ``vmax``); default the
        :data:`ROBUST_QUANTILE` quantile of ``|key|`` over the cells shown
        (so that one extreme knock-down does not wash out the rest; the
        colour bar's ends show when values are beyond).
    counts
        DE genes per perturbation counted already (:func:`de_counts` at
        these thresholds, indexed by label): the reduction is not read again.

    Returns
    -------
    matplotlib.axes.Axes
        ``ax.images[0]`` holds the matrix as drawn; the tick labels name
        rows and columns.

    Raises
    ------
    ValueError
        If the results lack a statistic needed, or an argument is out of
        range.

    Notes
    -----
    Reads the reduction of :func:`de_counts`, then the chosen rows of ``key``,
    ``pvals_adj`` (and ``logfoldchanges`` with ``lfc_threshold``):
    ``n_perturbations x n_genes_in_results`` values each (from the stored
    chunks holding those rows).
    """
    from scipy.cluster.hierarchy import leaves_list, linkage

    n_perturbations = check_number(n_perturbations, "n_perturbations", integer=True, minimum=1)
    n_genes = check_number(n_genes, "n_genes", integer=True, minimum=1)
    vmax = check_number(vmax, "vmax", minimum=0.0, min_open=True, allow_none=True)
    p_max, lfc_min = _thresholds(pval_threshold, lfc_threshold)
    ds = results_dataset(results, method)
    check_statistic(ds, key)
    if counts is None:
        counts = de_counts(ds, pval_threshold=p_max, lfc_threshold=lfc_threshold)
    else:
        counts = _given_counts(counts, ds)
    rows = np.argsort(-counts.to_numpy(), kind="stable")[:n_perturbations]
    variables = list(dict.fromkeys([key, PVALS_ADJ] + ([LOGFOLDCHANGES] if lfc_min > 0 else [])))
    (sub,) = _compute(ds[variables].isel({PERTURBATION: rows}))
    values = np.asarray(sub[key].values, dtype=np.float64)
    pv = np.asarray(sub[PVALS_ADJ].values, dtype=np.float64)
    lfc = np.asarray(sub[LOGFOLDCHANGES].values, dtype=np.float64) if lfc_min > 0 else np.zeros_like(pv)
    sig = _significant(pv, lfc, p_max, lfc_min)
    magnitude = np.abs(np.nan_to_num(values))
    n_sig = sig.sum(axis=0)
    columns = np.lexsort((-(magnitude * sig).sum(axis=0), -n_sig))
    columns = columns[n_sig[columns] > 0][:n_genes]
    if columns.size < n_genes:
        rest = np.setdiff1d(np.arange(values.shape[1]), columns)
        rest = rest[np.argsort(-magnitude[:, rest].mean(axis=0), kind="stable")]
        columns = np.concatenate([columns, rest[: n_genes - columns.size]])
    matrix = values[:, columns]
    row_names = np.asarray(counts.index)[rows]
    col_names = _gene_names(ds)[columns]
    if cluster:
        filled = np.nan_to_num(matrix)
        if matrix.shape[0] > 1:
            order = leaves_list(linkage(filled, method="average", metric="euclidean", optimal_ordering=True))
            matrix, row_names = matrix[order], row_names[order]
            filled = filled[order]
        if matrix.shape[1] > 1:
            order = leaves_list(linkage(filled.T, method="average", metric="euclidean", optimal_ordering=True))
            matrix, col_names = matrix[:, order], col_names[order]
    if vmax is not None:
        limit = vmax
    else:
        finite = np.abs(matrix[np.isfinite(matrix)])
        limit = float(np.quantile(finite, ROBUST_QUANTILE)) if finite.size else 1.0
        limit = limit or (float(finite.max()) if finite.size else 0.0) or 1.0
    plt = pyplot()
    colormap = plt.get_cmap(cmap).with_extremes(bad="0.85")
    n_r, n_c = matrix.shape
    ax = axes(ax, figsize=(1.8 + 0.17 * n_c, 1.2 + 0.17 * n_r))
    image = ax.imshow(
        np.ma.masked_invalid(matrix), aspect="auto", cmap=colormap, vmin=-limit, vmax=limit, interpolation="nearest"
    )
    ax.set_xticks(np.arange(n_c), col_names, rotation=90, fontsize=6.5)
    ax.set_yticks(np.arange(n_r), row_names, fontsize=6.5)
    ax.tick_params(length=0)
    clipped = np.nanmax(np.abs(matrix)) > limit if np.isfinite(matrix).any() else False
    ax.figure.colorbar(
        image,
        ax=ax,
        shrink=min(1.0, 0.25 + 0.06 * n_r),
        extend="both" if clipped else "neither",
        label=_lfc_label(ds) if key == LOGFOLDCHANGES else key,
    )
    ax.set_xlabel("genes")
    ax.set_ylabel("perturbations")
    ax.set_title(f"top {n_r} perturbations by DE genes" + (", clustered" if cluster else ""), fontsize=9)
    return finish(ax, save=save, show=show)


# ------------------------------------------------------------------------------------------------ knock-down


def knockdown_table(results, *, targets: Mapping[str, str] | None = None, method: str | None = None) -> pd.DataFrame:
    """Each perturbation's statistics at its own target gene, where the target is measured.

    Parameters
    ----------
    results, method
        As :func:`volcano`.
    targets
        Perturbation label -> target gene. Entries whose target is empty or
        ``None`` are skipped. Default: every perturbation whose label is
        itself a gene of the results (screens labelled by target gene, as
        papalexi's and schraivogel's).

    Returns
    -------
    pandas.DataFrame
        One row per perturbation whose target is among the results' genes,
        sorted by ``logfoldchanges`` (strongest knock-down first; NaN last);
        columns ``perturbation``, ``target``, ``logfoldchanges`` (log2),
        ``pvals_adj``, ``pts``, ``pts_rest`` (fractions of cells detecting
        the target). ``attrs['n_asked']``: the perturbations considered
        (with a target in ``targets``; by default all of them).

    Raises
    ------
    KeyError
        If a perturbation of ``targets`` is not in the results (with the
        closest labels).
    ValueError
        If the results lack one of the statistics.

    Notes
    -----
    Reads one element per perturbation of each statistic (pointwise, ``vindex``):
    the stored chunks holding them, one at a time.
    """
    return _knockdown_table(results_dataset(results, method), targets)


def _knockdown_table(ds, targets) -> pd.DataFrame:
    import xarray as xr

    columns = (LOGFOLDCHANGES, PVALS_ADJ, PTS, PTS_REST)
    for name in columns:
        check_statistic(ds, name)
    labels = np.asarray(ds[PERTURBATION].values).astype(str)
    genes = pd.Index(_gene_names(ds))
    if targets is None:
        pairs = [(p, p) for p in labels]
    else:
        if not isinstance(targets, Mapping):
            raise TypeError(f"targets must map perturbation -> gene (a dict), got {type(targets).__name__}")
        pairs = [(str(p), str(g)) for p, g in targets.items() if g is not None and str(g) != ""]
        check_names([p for p, _ in pairs], labels, "perturbation")
    gene_at = genes.get_indexer([g for _, g in pairs])
    keep = np.flatnonzero(gene_at >= 0)
    frame = pd.DataFrame({PERTURBATION: [pairs[k][0] for k in keep], "target": [pairs[k][1] for k in keep]})
    if keep.size:
        rows = pd.Index(labels).get_indexer(frame[PERTURBATION])
        where = {PERTURBATION: xr.DataArray(rows, dims="k"), GENE: xr.DataArray(gene_at[keep], dims="k")}
        (points,) = _compute(ds[list(columns)].isel(where))
        for name in columns:
            frame[name] = np.asarray(points[name].values, dtype=np.float64)
    else:
        for name in columns:
            frame[name] = np.array([], dtype=np.float64)
    frame = frame.sort_values(LOGFOLDCHANGES, kind="stable", na_position="last").reset_index(drop=True)
    frame.attrs["n_asked"] = len(pairs)
    return frame


def knockdown(
    results,
    *,
    targets: Mapping[str, str] | None = None,
    method: str | None = None,
    pval_threshold: float = 0.05,
    ax=None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Knock-down of each perturbation's own target: its fold change, sorted, significance marked.

    One dot per perturbation whose target is measured
    (:func:`knockdown_table`), sorted from the strongest knock-down: filled
    where ``pvals_adj < pval_threshold`` (blue down, red up), open grey
    where not. Up to :data:`MAX_NAMED` perturbations the y axis names them
    (``"perturbation (target)"`` where the two differ); beyond, the x axis
    is the rank and no names are written.

    Parameters
    ----------
    results, method, ax, save, show
        As :func:`volcano`.
    targets
        As :func:`knockdown_table`.
    pval_threshold
        Significance threshold on ``pvals_adj``.

    Returns
    -------
    matplotlib.axes.Axes
        The dots (``ax.collections``) are ``(logfoldchanges, position)``
        (named) or ``(rank, logfoldchanges)`` (ranked) in the table's order.

    Raises
    ------
    KeyError, ValueError
        As :func:`knockdown_table`; ValueError also when no target is
        measured.

    Notes
    -----
    Reads as :func:`knockdown_table`: one element per perturbation.
    """
    p_max, _ = _thresholds(pval_threshold, None)
    ds = results_dataset(results, method)
    table = _knockdown_table(ds, targets)
    if table.empty:
        raise ValueError(
            "no perturbation's target is among the results' genes: pass targets={perturbation: gene} "
            "(the labels are not gene names, or the targets are not measured)"
        )
    lfc = table[LOGFOLDCHANGES].to_numpy()
    sig = table[PVALS_ADJ].to_numpy() < p_max
    colours = np.where(sig, np.where(lfc < 0, DOWN, UP), "none")
    edges = np.where(sig, colours, "0.45")
    n = len(table)
    title = (
        f"knock-down of the target: measured for {n} of {table.attrs['n_asked']} perturbations\n"
        f"(filled: adjusted p < {p_max:g})"
    )
    if n <= MAX_NAMED:
        ax = axes(ax, figsize=(4.5, 0.8 + 0.17 * max(n, 4)))
        positions = np.arange(n)[::-1]
        ax.scatter(lfc, positions, s=28, c=colours, edgecolors=edges, linewidths=0.8, zorder=3)
        names = [p if p == t else f"{p} ({t})" for p, t in zip(table[PERTURBATION], table["target"], strict=True)]
        ax.set_yticks(positions, names, fontsize=7)
        ax.set_ylim(-0.7, n - 0.3)
        ax.axvline(0, lw=0.8, c="0.35", zorder=0)
        ax.grid(axis="y", lw=0.3, c="0.9")
        ax.set_xlabel(f"{_lfc_label(ds)} of the target gene (vs {_control(ds)})")
    else:
        ax = axes(ax, figsize=(6.0, 4.0))
        ranks = np.arange(1, n + 1)
        ax.scatter(ranks, lfc, s=8, c=colours, edgecolors=edges, linewidths=0.5)
        ax.axhline(0, lw=0.8, c="0.35", zorder=0)
        ax.set_xlabel("perturbations, ranked by the target's fold change")
        ax.set_ylabel(f"{_lfc_label(ds)} of the target gene")
    ax.set_title(title, fontsize=8)
    return finish(ax, save=save, show=show)


# ---------------------------------------------------------------------------------------------------- overlap


def overlap_heatmap(
    overlap,
    *,
    metric: str = "jaccard",
    annotate: bool | None = None,
    cmap: str = "viridis",
    ax=None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Heatmap of pairwise overlaps of gene sets (:func:`pertscale.tl.compute_overlap`), as crispyx's.

    Parameters
    ----------
    overlap
        An :class:`~pertscale.tl._overlap.OverlapResult`, or a square
        ``DataFrame`` (sets x sets).
    metric
        ``"jaccard"`` (``|A & B| / |A | B|``, from 0 to 1) or ``"count"``
        (``|A & B|``; set sizes on the diagonal).
    annotate
        Write each cell's value; default when there are at most 15 sets.
    cmap
        The colormap; NaN (the Jaccard index of two empty sets) is grey.
    ax, save, show
        As :func:`volcano`.

    Returns
    -------
    matplotlib.axes.Axes
        ``ax.images[0]`` holds the matrix in the order of the sets.

    Raises
    ------
    ValueError
        If ``metric`` is not ``"jaccard"`` or ``"count"``, the result does
        not hold that metric (it was computed with the other one), or the
        matrix is not square.
    TypeError
        If ``overlap`` is neither an ``OverlapResult`` nor a ``DataFrame``.
    """
    if metric not in ("jaccard", "count"):
        raise ValueError(f"metric must be 'jaccard' or 'count'; got {metric!r}")
    if isinstance(overlap, pd.DataFrame):
        matrix = overlap
    elif hasattr(overlap, "jaccard_matrix") and hasattr(overlap, "count_matrix"):
        matrix = overlap.jaccard_matrix if metric == "jaccard" else overlap.count_matrix
        if matrix is None:
            raise ValueError(
                f"this OverlapResult holds no {metric} matrix: compute it with "
                f"ps.tl.compute_overlap(sets, metric={metric!r}) (or metric='both')"
            )
    else:
        raise TypeError(f"overlap must be an OverlapResult or a DataFrame, got {type(overlap).__name__}")
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"an overlap matrix is square (sets x sets); got {matrix.shape[0]} x {matrix.shape[1]}")
    values = matrix.to_numpy(dtype=np.float64)
    names = [str(n) for n in matrix.index]
    n = len(names)
    plt = pyplot()
    colormap = plt.get_cmap(cmap).with_extremes(bad="0.85")
    ax = axes(ax, figsize=(1.8 + 0.28 * n, 1.2 + 0.28 * n) if n > 12 else (4.8, 4.0))
    vmin, vmax = (0.0, 1.0) if metric == "jaccard" else (0.0, max(1.0, float(np.nanmax(values)) if n else 1.0))
    image = ax.imshow(np.ma.masked_invalid(values), cmap=colormap, vmin=vmin, vmax=vmax, interpolation="nearest")
    if n <= 80:
        ax.set_xticks(np.arange(n), names, rotation=90, fontsize=7)
        ax.set_yticks(np.arange(n), names, fontsize=7)
    ax.tick_params(length=0)
    if annotate if annotate is not None else n <= 15:
        for i in range(n):
            for j in range(n):
                v = values[i, j]
                if np.isfinite(v):
                    text = f"{v:.2f}" if metric == "jaccard" else f"{int(v)}"
                    shade = (v - vmin) / (vmax - vmin or 1.0)
                    ax.text(j, i, text, ha="center", va="center", fontsize=6.5, c="white" if shade < 0.6 else "black")
    ax.figure.colorbar(image, ax=ax, label="Jaccard index" if metric == "jaccard" else "shared genes")
    ax.set_title("overlap of gene sets" + (" (Jaccard)" if metric == "jaccard" else " (shared genes)"), fontsize=9)
    return finish(ax, save=save, show=show)


__all__ = [
    "de_counts",
    "de_genes_per_perturbation",
    "de_heatmap",
    "knockdown",
    "knockdown_table",
    "ma",
    "overlap_heatmap",
    "rank_genes_groups",
    "top_genes_bar",
    "volcano",
]

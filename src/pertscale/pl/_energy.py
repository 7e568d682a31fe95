"""Plot of the E-distances of a screen (:func:`pertscale.tl._energy.energy_distance`): perturbations ranked.

The table is one row per perturbation (small), so the plot reads it whole:
from the returned ``DataFrame``, or from the result store of the AnnData it
was computed on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .._validation import check_number
from ._common import axes, finish

#: Colours of the perturbations called (adjusted p below ``fdr``) and of the rest.
CALLED, NOT_CALLED = "#d62728", "#9e9e9e"
#: Up to this many perturbations each is named on the y axis; beyond, a ranked scatter names the first ones.
MAX_NAMED = 40
#: The y axis turns symmetric-logarithmic when the largest E-distance is this many times the median absolute one.
LOG_RATIO = 50.0
#: Columns the plot reads.
_NEEDED = ("edistance", "pvalue_adj")


def _table(result, key: str) -> pd.DataFrame:
    """The E-distance table of ``result``: the ``DataFrame`` itself, or the stored one named ``key`` of an AnnData."""
    if isinstance(result, pd.DataFrame):
        table = result
    elif hasattr(result, "uns") and hasattr(result, "obsm"):
        from ..store import select

        try:
            settings, table = select(result, key=key)
        except ValueError as err:
            raise ValueError(
                f"{err}. This AnnData holds no E-distances under {key!r}: run "
                "ps.tl.energy_distance(adata, perturbation_column=..., control_label=...) first, or pass its table"
            ) from None
        if getattr(settings, "method", None) != "energy_distance" or not isinstance(table, pd.DataFrame):
            raise ValueError(f"the stored result {key!r} is a {settings.method} result, not E-distances")
    else:
        raise TypeError(
            f"expected the table of ps.tl.energy_distance or an AnnData holding it, got {type(result).__name__}"
        )
    missing = [c for c in _NEEDED if c not in table.columns]
    if missing:
        raise ValueError(
            f"the table has no {missing} column(s) (it has {list(table.columns)}); pass the table "
            "ps.tl.energy_distance returns"
        )
    return table


def energy_distance_ranking(
    result,
    *,
    fdr: float = 0.05,
    n_named: int = 10,
    key: str = "energy_distance",
    ax=None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Perturbations ranked by their E-distance to control, those called at ``fdr`` in colour.

    A perturbation is called when its Benjamini-Hochberg adjusted E-test
    p-value (``pvalue_adj``) is below ``fdr``: a red dot; the others are
    grey. Up to :data:`MAX_NAMED` perturbations, one row each, strongest on
    top, named on the y axis; beyond, the x axis is the rank (strongest
    first) and the first ``n_named`` are named beside their dots. When the
    largest E-distance is :data:`LOG_RATIO` times the median absolute one,
    the distance axis is symmetric-logarithmic (linear near 0, where the
    E-distances of perturbations without effect scatter on both sides of
    it: an unbiased estimate can be negative). Perturbations without an
    E-distance (one cell) are not drawn; the title counts them.

    Parameters
    ----------
    result
        The table of :func:`pertscale.tl._energy.energy_distance`, or an
        AnnData on which it ran (its result store holds it under ``key``).
    fdr
        Threshold on ``pvalue_adj``; in ``(0, 1)``.
    n_named
        Perturbations named on the ranked scatter (more than
        :data:`MAX_NAMED` perturbations), the strongest first; ``0``: none.
    key
        The result's readable name in the store (the ``key_added`` of
        ``energy_distance``), when ``result`` is an AnnData.
    ax
        Axes to draw into; a new figure's by default.
    save
        Write the figure to this path (PNG, PDF, SVG: by the suffix).
    show
        As :func:`pertscale.pl.volcano` (``None``: leave open unless saved).

    Returns
    -------
    matplotlib.axes.Axes
        ``ax.collections[0]`` holds the dots in rank order (strongest first):
        ``(edistance, position)`` with names on the y axis, ``(rank,
        edistance)`` ranked.

    Raises
    ------
    TypeError
        If ``result`` is neither a table nor an AnnData.
    ValueError
        If ``fdr`` is not in ``(0, 1)``, the table lacks ``edistance`` or
        ``pvalue_adj``, no perturbation has an E-distance, or the AnnData
        holds no E-distance result under ``key``.
    """
    fdr = check_number(fdr, "fdr", minimum=0.0, maximum=1.0, min_open=True, max_open=True)
    n_named = check_number(n_named, "n_named", integer=True, minimum=0)
    table = _table(result, key)
    e_all = table["edistance"].to_numpy(dtype=np.float64)
    finite = np.isfinite(e_all)
    if not finite.any():
        raise ValueError("no perturbation has an E-distance (all NaN): nothing to rank")
    order = np.flatnonzero(finite)[np.argsort(-e_all[finite], kind="stable")]
    e = e_all[order]
    padj = table["pvalue_adj"].to_numpy(dtype=np.float64)[order]
    names = np.asarray(table.index.astype(str))[order]
    called = padj < fdr
    tested = bool(np.isfinite(padj).any())
    colours = np.where(called, CALLED, NOT_CALLED)
    n = e.size
    dropped = int((~finite).sum())
    noise = _noise_level(e, called if tested else None)
    log_axis = n > 2 and e[0] > LOG_RATIO * noise
    if n <= MAX_NAMED:
        ax = axes(ax, figsize=(4.8, 0.9 + 0.19 * max(n, 4)))
        positions = np.arange(n)[::-1]
        ax.scatter(e, positions, s=26, c=colours, edgecolors="none", zorder=3)
        ax.hlines(positions, np.minimum(e, 0.0), np.maximum(e, 0.0), colors=colours, lw=1.0, zorder=2)
        ax.set_yticks(positions, names, fontsize=7)
        for tick, is_called in zip(ax.get_yticklabels(), called, strict=True):
            tick.set_color("black" if is_called else "0.35")
        ax.set_ylim(-0.7, n - 0.3)
        ax.axvline(0, lw=0.8, c="0.35", zorder=1)
        ax.grid(axis="y", lw=0.3, c="0.92")
        _distance_axis(ax.xaxis, ax.set_xscale, ax.set_xlim, e, noise, log_axis=log_axis)
        ax.set_xlabel("E-distance to control (squared embedding units)")
    else:
        ax = axes(ax, figsize=(6.0, 4.0))
        ranks = np.arange(1, n + 1)
        ax.scatter(ranks, e, s=10, c=colours, edgecolors="none", zorder=3)
        ax.axhline(0, lw=0.8, c="0.35", zorder=1)
        ax.set_xscale("log")
        ax.set_xlim(0.7, n * 1.3)
        _distance_axis(ax.yaxis, ax.set_yscale, ax.set_ylim, e, noise, log_axis=log_axis)
        ax.set_xlabel("rank by E-distance (log scale)")
        ax.set_ylabel("E-distance to control")
        if n_named:
            from ._de import _place_labels

            ax.figure.canvas.draw()  # final limits and scales before the labels are placed in display space
            top = np.arange(min(n_named, n))
            _place_labels(ax, ranks[top], e[top], names[top])
    if tested:
        what = f"{int(called.sum())} of {n} called (red: BH-adjusted E-test p < {fdr:g})"
    else:
        what = f"{n} perturbations, not tested (n_permutations=0)"
    extra = f"; {dropped} without E-distance (one cell)" if dropped else ""
    ax.set_title(f"E-distance to control: {what}{extra}", fontsize=8)
    return finish(ax, save=save, show=show)


def _noise_level(e: np.ndarray, called: np.ndarray | None) -> float:
    """How far E-distances without effect scatter from 0: the largest |E| not called (tested), or the median |E|."""
    if called is not None and (~called).any():
        level = float(np.max(np.abs(e[~called])))
    else:
        level = float(np.median(np.abs(e)))
    return max(level, 1e-9)


def _distance_axis(axis, set_scale, set_limits, e: np.ndarray, noise: float, *, log_axis: bool) -> None:
    """The E-distance axis: symmetric-log (linear within the noise) when the range is wide, limits with a margin."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    low, high = min(float(e.min()), 0.0), max(float(e.max()), 0.0)
    if log_axis:
        set_scale("symlog", linthresh=noise, linscale=0.6)
        # 0 and the powers of 10 outside the linear range (inside it they would crowd 0)
        up = 10.0 ** np.arange(np.ceil(np.log10(noise)), np.floor(np.log10(high * 1.8)) + 1)
        down = -(10.0 ** np.arange(np.ceil(np.log10(noise)), np.floor(np.log10(-low)) + 1)) if low < -noise else []
        axis.set_major_locator(FixedLocator(np.concatenate([down, [0.0], up])))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        set_limits(low - 0.4 * noise if low < 0 else -0.1 * noise, high * 1.8)
    else:
        pad = 0.06 * (high - low or 1.0)
        set_limits(low - pad, high + pad)

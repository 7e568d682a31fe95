"""QQ plot of a calibration check: observed against uniform p-values, with the band uniform p-values stay in.

Reads what :func:`pertscale.tl.calibration_check` keeps of the pooled
p-values (their histogram and their smallest values,
:meth:`~pertscale.tl._calibration.CalibrationResult.qq`), or the table of
QQ points a run wrote (:meth:`~pertscale.tl._calibration.CalibrationResult.qq_frame`,
``calibration_pvalues.parquet``), never a ``splits x genes`` table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ._common import axes, finish

#: Where a p-value of exactly 0 is drawn (-log10 of the smallest positive normal float64).
ZERO_P = float(np.finfo(np.float64).tiny)
#: What each split was tested against: in full in the title, short in a label.
AGAINST = {"rest": "each vs the other control cells", "control": "each vs the held-out control cells"}
SHORT = {"rest": "vs the rest", "control": "vs held-out"}
#: Colour of the band of uniform p-values.
BAND = "0.85"
#: Columns every table of QQ points has.
QQ_COLUMNS = ("rank", "expected", "observed")


def _curves(result, *, max_points: int, level: float) -> dict[str, pd.DataFrame]:
    """``{label: qq_frame}`` from a result, a sequence or mapping of them, or a table of QQ points.

    Raises
    ------
    TypeError, ValueError
        As :func:`calibration_qq`.
    """
    from ..tl._calibration import CalibrationResult

    if isinstance(result, pd.DataFrame):
        missing = [c for c in QQ_COLUMNS if c not in result.columns]
        if missing:
            raise ValueError(
                f"the table has no {missing} column(s): give the QQ points of CalibrationResult.qq_frame() "
                "(a run's calibration_pvalues.parquet) or the results of ps.tl.calibration_check"
            )
        if "method" in result.columns:
            curves = {str(m): g for m, g in result.groupby("method", sort=False)}
        else:
            curves = {"p-values": result}
    else:
        if isinstance(result, CalibrationResult):
            items = {result.method or "p-values": result}
        elif isinstance(result, Mapping):
            items = {str(k): v for k, v in result.items()}
        elif isinstance(result, Sequence) and not isinstance(result, str):
            items = {}
            for r in result:
                label = getattr(r, "method", "") or "p-values"
                while label in items:  # two results of one method: number them
                    label = f"{label} ({len(items) + 1})"
                items[label] = r
        else:
            raise TypeError(
                "calibration_qq takes a CalibrationResult of ps.tl.calibration_check, a list of them, a "
                f"{{label: result}} mapping or a table of QQ points, not {type(result).__name__}"
            )
        bad = [k for k, v in items.items() if not isinstance(v, CalibrationResult)]
        if bad:
            raise TypeError(f"{bad} are not CalibrationResult objects (ps.tl.calibration_check returns them)")
        curves = {k: v.qq_frame(max_points=max_points, level=level) for k, v in items.items()}
    if not curves:
        raise ValueError("calibration_qq was given no result to draw")
    empty = [k for k, v in curves.items() if v.empty]
    if empty:
        raise ValueError(f"{empty} hold no p-value to draw (every gene was untested or sparse: lower min_nonzero)")
    return {k: v.sort_values("rank") for k, v in curves.items()}


def _band(qq: pd.DataFrame, level: float) -> tuple[np.ndarray, np.ndarray]:
    """``(lower, upper)`` p-values of the pointwise band: from the number of p-values when known, else as given."""
    from scipy import stats

    rank = qq["rank"].to_numpy(dtype=np.float64)
    if "n_pvalues" in qq.columns:
        n = float(qq["n_pvalues"].iloc[0])
        alpha = (1.0 - level) / 2
        return stats.beta.ppf(alpha, rank, n - rank + 1), stats.beta.ppf(1 - alpha, rank, n - rank + 1)
    return qq["lower"].to_numpy(dtype=np.float64), qq["upper"].to_numpy(dtype=np.float64)


def _first(qq: pd.DataFrame, column: str, default=None):
    return qq[column].iloc[0] if column in qq.columns else default


def _design(qq: pd.DataFrame) -> tuple[str, str]:
    """How a curve's splits were made and what they were tested against: ``("86 random splits", "rest")``."""
    n = _first(qq, "n_splits")
    if n is None:
        return "", str(_first(qq, "reference", ""))
    design = {"guides": f"{int(n)} guides", "random": f"{int(n)} random splits"}
    return design.get(str(_first(qq, "design", "")), f"{int(n)} splits"), str(_first(qq, "reference", ""))


def _label(label: str, qq: pd.DataFrame, own: str) -> str:
    text = f"{label} ({own})" if own else label
    if "frac_p05" not in qq.columns:
        return text
    ks = float(_first(qq, "ks_pvalue", np.nan))
    ks_text = f"={ks:.2g}" if not ks < 1e-300 else "<1e-300"
    return (
        f"{text}: p<0.05 {float(_first(qq, 'frac_p05')):.1%}, p<0.01 {float(_first(qq, 'frac_p01')):.1%}, "
        f"KS p{ks_text}, {int(_first(qq, 'n_discoveries', 0))} discoveries"
    )


def calibration_qq(
    result,
    *,
    level: float = 0.95,
    max_points: int = 2000,
    ax=None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """QQ plot of a calibration check's pooled p-values against Uniform(0, 1).

    Observed ``-log10 p`` (sorted) against the expected ``-log10`` of the
    uniform order statistics, the diagonal, and the pointwise ``level``
    band in which uniform p-values stay (Beta order statistics: the
    ``i``-th smallest of ``n`` is ``Beta(i, n - i + 1)``). Points above the
    band: too many small p-values (anti-conservative); below it:
    conservative. One curve per result, labelled with its pooled figures.

    Parameters
    ----------
    result
        A :class:`~pertscale.tl._calibration.CalibrationResult` of
        :func:`pertscale.tl.calibration_check`, a list of them (one curve
        per method, labelled by it), a ``{label: result}`` mapping, or a
        table of QQ points
        (:meth:`~pertscale.tl._calibration.CalibrationResult.qq_frame`,
        several concatenated: one curve per ``method``; a run's
        ``calibration_pvalues.parquet``).
    level
        Coverage of the pointwise band (default 0.95).
    max_points
        Points per curve, spread evenly in ``log10(rank)`` (results only; a
        table is drawn as it is).
    ax
        Axes to draw in (default: a new figure).
    save
        Save the figure to this path.
    show
        Show the figure (see :func:`pertscale.pl._common.finish`).

    Returns
    -------
    matplotlib.axes.Axes

    Raises
    ------
    TypeError
        If ``result`` is none of these.
    ValueError
        If a result holds no p-value, a table lacks the QQ columns, or
        ``level`` is not in (0, 1).
    """
    from .._validation import check_number

    level = check_number(level, "level", minimum=0, maximum=1, min_open=True, max_open=True)
    curves = _curves(result, max_points=max_points, level=level)
    plt_ax = axes(ax, figsize=(4.8, 4.4))
    # the band at a point depends on the number of p-values: one grey band (of the most) when the curves
    # have about as many (within 10 %), else each curve's band outlined in its colour
    sizes = [float(_first(qq, "n_pvalues", qq["rank"].max())) for qq in curves.values()]
    shared = max(sizes) <= 1.1 * min(sizes)
    widest = int(np.argmax(sizes))
    x_top = y_top = 0.0
    for i, qq in enumerate(curves.values()):
        if shared and i != widest:
            continue
        lower, upper = _band(qq, level)
        x = -np.log10(qq["expected"].to_numpy(dtype=np.float64))
        lo, hi = -np.log10(np.maximum(upper, ZERO_P)), -np.log10(np.maximum(lower, ZERO_P))
        if shared:
            plt_ax.fill_between(x, lo, hi, color=BAND, linewidth=0, label=f"{level:.0%} band of uniform p-values")
        else:
            band = f"{level:.0%} band of uniform p-values (as many as each curve)" if i == 0 else None
            plt_ax.fill_between(x, lo, hi, color=f"C{i % 10}", alpha=0.12, linewidth=0, label=band)
            plt_ax.plot(x, lo, x, hi, color=f"C{i % 10}", linewidth=0.5, alpha=0.6)
        y_top = max(y_top, float(np.nanmax(hi)))
    # how the splits were made and tested: in the title where every curve shares it, else in each label
    designs = {label: _design(qq) for label, qq in curves.items()}
    same = [len({d[k] for d in designs.values()}) == 1 for k in (0, 1)]
    for i, (label, qq) in enumerate(curves.items()):
        x = -np.log10(qq["expected"].to_numpy(dtype=np.float64))
        y = -np.log10(np.maximum(qq["observed"].to_numpy(dtype=np.float64), ZERO_P))
        design, reference = designs[label]
        own = ", ".join(p for p, s in ((design, same[0]), (SHORT.get(reference, reference), same[1])) if p and not s)
        plt_ax.plot(x, y, ".", color=f"C{i % 10}", markersize=3, label=_label(label, qq, own), zorder=3)
        x_top = max(x_top, float(np.nanmax(x)))
        y_top = max(y_top, float(np.nanmax(y)))
    x_top, y_top = x_top * 1.05, y_top * 1.05
    plt_ax.plot([0, max(x_top, y_top)], [0, max(x_top, y_top)], color="0.3", linewidth=0.8, linestyle="--", zorder=2)
    plt_ax.set_xlim(0, x_top)
    plt_ax.set_ylim(0, y_top)
    plt_ax.set_xlabel("expected $-\\log_{10}$ p (uniform)")
    plt_ax.set_ylabel("observed $-\\log_{10}$ p")
    design, reference = next(iter(designs.values()))
    common = ", ".join(p for p, s in ((design, same[0]), (AGAINST.get(reference, ""), same[1])) if p and s)
    plt_ax.set_title("Calibration on control cells only" + (f"\n{common}" if common else ""), fontsize=9)
    plt_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=7, frameon=False)
    return finish(plt_ax, save=save, show=show)

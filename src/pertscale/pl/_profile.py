"""The time and memory profile of a run: seconds per stage, and each process's peak memory per stage.

``pertscale run`` records in ``run.json``, under ``"profile"``, the stages
in order with their start and seconds, and per process (the main process,
each worker) the peak resident set size (RSS, bytes) it reached during each
stage, sampled every ``interval`` seconds (``"other"``: between the timed
stages; see :mod:`pertscale.job._profile`)::

    {"interval": 0.25,
     "stages": [{"name": "sort", "start": 0.1, "seconds": 12.3}, ...],
     "processes": [{"name": "main", "peak_rss": {"sort": 123456789, ...}},
                   {"name": "worker 1", "peak_rss": {...}}, ...]}
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ._common import finish, pyplot, read_run_json

#: Bytes per GiB, the unit of the memory axis.
GIB = 2**30
#: Up to this many processes the memory panel draws grouped bars; more, a stages x processes heat map.
MAX_GROUPED = 6
_COLORS = ("#4878a8", "#edae49", "#2a9d55", "#d1495b", "#6b4c9a", "#8c564b")


def _record(source) -> dict:
    """The ``"profile"`` record from a run's output directory, its ``run.json``, or a dict."""
    where = "the dict"
    if isinstance(source, Mapping):
        record = source
    elif isinstance(source, (str, Path)):
        record, where = read_run_json(source), f"the run.json of {source}"
    else:
        raise TypeError(
            "profile takes a run's output directory, the path of its run.json, or the dict of run.json (or of its "
            f"'profile'), not {type(source).__name__}"
        )
    if "profile" in record:
        record = record["profile"]
    elif "stages" not in record:
        raise ValueError(
            f"{where} holds no 'profile' (keys: {', '.join(map(str, record)) or 'none'}): `pertscale run` records "
            "it in run.json (runs of earlier pertscale versions did not)"
        )
    if not isinstance(record, Mapping) or not isinstance(record.get("stages"), list):
        raise ValueError(f"the profile in {where} has no list of 'stages' (each {{'name', 'start', 'seconds'}})")
    for i, stage in enumerate(record["stages"]):
        if not isinstance(stage, Mapping) or "name" not in stage or not _is_number(stage.get("seconds")):
            raise ValueError(f"stage {i} of the profile in {where} is {stage!r}: expected {{'name', 'seconds'}}")
    for i, proc in enumerate(record.get("processes") or []):
        if not isinstance(proc, Mapping) or not isinstance(proc.get("peak_rss", {}), Mapping):
            raise ValueError(f"process {i} of the profile in {where} is {proc!r}: expected {{'name', 'peak_rss'}}")
    return dict(record)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _rss_table(record: dict, stages: list[str]) -> tuple[list[str], list[str], np.ndarray]:
    """Stages (the record's order, then any only in ``peak_rss``), process names, and GiB ``(stages, processes)``."""
    processes = list(record.get("processes") or [])
    names = [str(p.get("name", f"process {p.get('pid', i)}")) for i, p in enumerate(processes)]
    rows = list(stages)
    for proc in processes:
        rows += [str(s) for s in proc.get("peak_rss", {}) if str(s) not in rows]
    table = np.full((len(rows), len(processes)), np.nan)
    for j, proc in enumerate(processes):
        for stage, value in (proc.get("peak_rss") or {}).items():
            if _is_number(value):
                table[rows.index(str(stage)), j] = float(value) / GIB
    return rows, names, table


def profile(
    source,
    *,
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Seconds per stage of a run and each process's peak memory (RSS) per stage.

    Left: a horizontal bar per stage, in the order the stages ran, with its
    seconds. Right, on the same rows: the peak resident memory (GiB) of
    each process during each stage: grouped bars for up to
    ``MAX_GROUPED`` (6) processes (the main process and its workers), a
    stages x processes heat map for more. A stage that a process did not
    sample is left blank.

    Parameters
    ----------
    source
        A run's output directory (reads ``run.json``), the path of a
        ``run.json``, or its dict (or the dict of its ``"profile"``):
        ``{"interval": s, "stages": [{"name", "start", "seconds"}, ...],
        "processes": [{"name", "pid", "peak_rss": {stage: bytes}}, ...]}``.
    figsize
        Inches; default from the number of stages and processes.
    save
        Write the figure to this path (format from the suffix).
    show
        Show the figure (``pyplot.show``); ``None``: left open unless saved (see
        :func:`~pertscale.pl._common.finish`).

    Returns
    -------
    matplotlib.figure.Figure
        The time axes, then the memory axes.

    Raises
    ------
    FileNotFoundError
        If ``source`` is a directory that is not a run's output directory or
        has no ``run.json`` (saying what writes it).
    ValueError
        If the record holds no profile, or a stage or process entry is not
        of the form above.
    TypeError
        If ``source`` is not a path or a dict.
    """
    record = _record(source)
    stage_names = [str(s["name"]) for s in record["stages"]]
    seconds = {str(s["name"]): float(s["seconds"]) for s in record["stages"]}
    rows, processes, rss = _rss_table(record, stage_names)
    n = max(len(rows), 1)
    heat = len(processes) > MAX_GROUPED
    plt = pyplot()
    fig, (ax_t, ax_m) = plt.subplots(
        1, 2, figsize=figsize or (11.0, 1.2 + 0.42 * n), layout="constrained", sharey=True,
        gridspec_kw={"width_ratios": (1.0, 1.5 if heat else 1.2)},
    )  # fmt: skip
    y = np.arange(len(rows), dtype=np.float64)
    widths = np.array([seconds.get(r, np.nan) for r in rows])
    shown = np.isfinite(widths)
    ax_t.barh(y[shown], widths[shown], height=0.7, color="#4878a8", gid="profile-seconds")
    top = np.nanmax(widths) if shown.any() else 1.0
    for yi, w in zip(y[shown], widths[shown], strict=True):
        ax_t.text(w + 0.01 * top, yi, f"{w:,.1f} s", va="center", fontsize=8)
    for yi in y[~shown]:  # a row only in peak_rss (e.g. "other": the time between stages)
        ax_t.text(0.01 * top, yi, "not timed", va="center", fontsize=8, color="0.5")
    ax_t.set_xlim(0, 1.18 * top if top > 0 else 1)
    ax_t.set_yticks(y, rows)
    ax_t.invert_yaxis()
    ax_t.set_xlabel("seconds")
    total = float(np.nansum(widths))
    ax_t.set_title(f"time per stage (total {total:,.1f} s)", fontsize=10)
    interval = record.get("interval")
    every = f", sampled every {interval:g} s" if _is_number(interval) else ""
    if not processes:
        ax_m.text(0.5, 0.5, "no memory recorded", transform=ax_m.transAxes, ha="center", va="center")
        ax_m.set_xticks([])
    elif heat:
        image = ax_m.imshow(
            np.ma.masked_invalid(rss), aspect="auto", cmap="viridis", interpolation="nearest",
            extent=(-0.5, len(processes) - 0.5, len(rows) - 0.5, -0.5), gid="profile-rss",
        )  # fmt: skip
        ax_m.set_xticks(np.arange(len(processes)), processes, rotation=90, fontsize=8)
        if rss.size <= 200:
            limit = np.nanmax(rss) if np.isfinite(rss).any() else 0
            for (i, j), v in np.ndenumerate(rss):
                if np.isfinite(v):
                    color = "black" if v > 0.6 * limit else "white"
                    ax_m.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color=color)
        fig.colorbar(image, ax=ax_m, label="peak RSS (GiB)", fraction=0.05, pad=0.02)
        ax_m.set_xlabel("process")
    else:
        k = len(processes)
        height = 0.8 / k
        for j, name in enumerate(processes):
            offset = (j - (k - 1) / 2) * height
            ok = np.isfinite(rss[:, j])
            ax_m.barh(
                y[ok] + offset, rss[ok, j], height=height, color=_COLORS[j % len(_COLORS)], label=name,
                gid=f"profile-rss:{name}",
            )  # fmt: skip
        ax_m.set_xlabel("peak RSS (GiB)")
        ax_m.set_xlim(left=0)
        ax_m.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax_m.set_title(f"peak memory per stage and process{every}", fontsize=10)
    ax_m.tick_params(axis="y", left=False)
    return finish(fig, save=save, show=show)

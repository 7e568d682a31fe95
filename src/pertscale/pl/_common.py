"""What every plot shares: the results it reads (lazily), names checked with the closest ones, axes, saving.

Plots read results through :func:`pertscale.get.dataset` (an
``xarray.Dataset`` of Dask arrays over the stored chunks), so a plot of one
perturbation reads one row and a screen-wide plot reads a reduction;
nothing here loads a whole perturbations x genes result.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

#: A plot meant for one perturbation per panel refuses more panels than this (and says which plot summarizes).
MAX_PANELS = 48
#: Above this many points a scatter plot is drawn as a hexbin density (no artist per point).
MAX_POINTS = 50_000
#: What makes each statistic a plot may need: said when a result does not hold it.
MADE_BY = {
    "baseMean": "method='nb-glm' (pertscale run --method nb-glm)",
    "lfcSE": "method='nb-glm'",
    "u_statistic": "method='wilcoxon'",
}


def pyplot():
    """``matplotlib.pyplot``, imported on use (``import pertscale`` does not import matplotlib).

    matplotlib chooses a non-interactive backend (Agg) by itself where there
    is no display, so plots save in a headless session.
    """
    import matplotlib.pyplot as plt

    return plt


def results_dataset(results, method: str | None = None):
    """The statistics of ``results`` as a lazy ``xarray.Dataset`` (anything :func:`pertscale.get.dataset` takes)."""
    import xarray as xr

    if isinstance(results, xr.Dataset):
        return results
    from ..get import dataset

    return dataset(results) if method is None else dataset(results, method)


def closest(name: str, names: Iterable[str], n: int = 5) -> str:
    """The names in ``names`` closest to ``name``, as text for an error message."""
    names = [str(x) for x in names]
    near = difflib.get_close_matches(str(name), names, n=n, cutoff=0.0) if len(names) < 200_000 else []
    return ", ".join(map(repr, near)) if near else "none"


def check_names(asked, available, kind: str) -> list[str]:
    """``asked`` (a name or names) as a list, each checked to be in ``available``.

    Raises
    ------
    KeyError
        Naming the first missing name, with the closest names available.
    """
    asked_list = [asked] if isinstance(asked, str) else [str(a) for a in asked]
    index = {str(a) for a in available}
    for name in asked_list:
        if name not in index:
            raise KeyError(f"{kind} {name!r} is not in the results; the closest: {closest(name, index)}")
    return asked_list


def check_statistic(ds, name: str) -> None:
    """Raise when the results ``ds`` do not hold the statistic ``name``, saying which run makes it.

    Raises
    ------
    ValueError
        Naming the statistic, what the results hold and how to make it.
    """
    if name not in ds.data_vars:
        made = MADE_BY.get(name)
        how = f"; it is made by {made}" if made else ""
        held = ", ".join(map(str, ds.data_vars))
        raise ValueError(f"these results hold no {name!r} (they hold {held}){how}")


def row(ds, variable: str, perturbation: str) -> np.ndarray:
    """``(n_genes,)`` float64: one perturbation's values of ``variable``, reading only its row."""
    return np.asarray(ds[variable].sel(perturbation=perturbation).values, dtype=np.float64)


def axes(ax=None, *, figsize=(4.5, 4.0)):
    """``ax`` or a new figure's axes (matplotlib's current style, as scanpy draws)."""
    if ax is not None:
        return ax
    _, ax = pyplot().subplots(figsize=figsize)
    return ax


def finish(artist, *, save: str | Path | None = None, show: bool | None = None, dpi: int = 150):
    """Save the figure of ``artist`` (an ``Axes`` or ``Figure``) to ``save``, show it if asked; return ``artist``.

    ``show=True`` calls ``matplotlib.pyplot.show``; ``show=None`` leaves the
    figure open (a notebook displays it at the end of the cell) unless it
    was saved, when it is closed so that loops over a screen do not keep
    figures open (pass ``show=True`` to save and display).
    """
    plt = pyplot()
    fig = artist if hasattr(artist, "savefig") else artist.figure
    if save is not None:
        save = Path(save)
        save.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=dpi, bbox_inches="tight")
    if show:
        plt.show()
    elif save is not None and show is None:
        plt.close(fig)
    return artist


# ---------------------------------------------------------------- a run's output directory (QC, PCA, profile plots)

#: What writes each file of a run's output directory that a plot reads: said when the file is missing.
RUN_FILES = {
    "run.json": "`pertscale run` writes it with every run (runs of earlier pertscale versions did not)",
    "qc.csv": "`pertscale run` writes it with every run",
    "qc_cells.zarr": "`pertscale run` writes it with every run (runs of earlier pertscale versions did not)",
    "pca.zarr": "`pertscale run --pca N` writes it (ps.run(..., pca=N))",
}
#: Files whose presence makes a directory a pertscale output directory.
RUN_MARKERS = ("run.json", "qc.csv", ".pertscale-manifest.json")


def is_run_directory(directory: str | Path) -> bool:
    """Whether ``directory`` is a directory holding one of :data:`RUN_MARKERS`."""
    directory = Path(directory)
    return directory.is_dir() and any((directory / name).exists() for name in RUN_MARKERS)


def run_file(directory: str | Path, name: str) -> Path:
    """``directory / name``, a file of a run's output directory, checked to exist.

    Raises
    ------
    FileNotFoundError
        If ``directory`` does not exist, is not a pertscale output directory
        (none of :data:`RUN_MARKERS`), or lacks ``name``: saying which and
        what writes it (:data:`RUN_FILES`).
    """
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise FileNotFoundError(f"{directory} {what}: give the output directory of `pertscale run INPUT --out DIR`")
    path = directory / name
    if path.exists():
        return path
    if not is_run_directory(directory):
        raise FileNotFoundError(
            f"{directory} is not a pertscale output directory: it has no {name} (nor run.json or qc.csv); "
            f"`pertscale run INPUT --out {directory}` writes them"
        )
    raise FileNotFoundError(f"{directory} has no {name}: {RUN_FILES.get(name, '`pertscale run` writes it')}")


def read_run_json(source: str | Path) -> dict:
    """The record ``run.json`` of a run: ``source`` is the output directory or the path of the file.

    Raises
    ------
    FileNotFoundError
        As :func:`run_file`.
    ValueError
        If the file is not a JSON object.
    """
    import json

    path = Path(source)
    if not (path.is_file() and path.suffix == ".json"):
        path = run_file(path, "run.json")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); `pertscale run` writes it: run again") from err
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds a JSON {type(record).__name__}, not the object `pertscale run` writes")
    return record


def zarr_group(path: str | Path):
    """The root group of an AnnData zarr store at ``path``, opened read-only."""
    import zarr

    return zarr.open_group(str(path), mode="r")


def read_obs_columns(group, columns: Iterable[str], *, element: str = "obs"):
    """The ``columns`` of ``obs`` (or ``var``) of the AnnData zarr store ``group``, reading only those.

    Returns
    -------
    pandas.DataFrame
        One column per name, indexed by position (the names are not read).

    Raises
    ------
    KeyError
        Naming a missing column, with the closest of those stored.
    """
    import anndata as ad
    import pandas as pd

    frame = group[element]
    stored = list(frame.attrs.get("column-order", []))
    names = check_names(list(columns), stored, f"{element} column")
    return pd.DataFrame({name: ad.io.read_elem(frame[name]) for name in names})


def read_index(group, *, element: str = "var") -> np.ndarray:
    """The index (``obs_names`` or ``var_names``) of the AnnData zarr store ``group``, as strings."""
    import anndata as ad

    frame = group[element]
    return np.asarray(ad.io.read_elem(frame[frame.attrs.get("_index", "_index")])).astype(str)

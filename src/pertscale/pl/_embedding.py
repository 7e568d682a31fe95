"""Embedding plots: PCA and UMAP scatter plots, the PCA variance ratio and loadings.

They read an AnnData (in memory or with lazy arrays: only the two columns
plotted of ``obsm`` are computed), or an AnnData store on disk: a run's
output directory (its ``pca.zarr``), a ``.zarr`` or an ``.h5ad`` file, of
which only the elements plotted are read (two columns of ``obsm``, one
``obs`` column, ``uns['pca']``, a few columns of ``varm['PCs']``).

Up to ``MAX_POINTS`` (50,000) cells are drawn as one
scatter artist; more as a raster image (as datashader draws them): the
cells are counted per pixel with :func:`numpy.bincount` over a
``gridsize x gridsize`` grid, per category for a categorical colour (each
pixel the mix of its coloured categories' colours, weighted by their
cells, and grey only without any, as the scatter draws them over the grey
``other`` cells), as the
mean value for a numeric colour, or as the number of cells; a pixel's
opacity grows with the logarithm of its cells. Memory is a few arrays of
the number of cells and the grid, whatever the number of cells.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from . import _common
from ._common import axes, check_names, finish, is_run_directory, pyplot, read_index, read_run_json, run_file

#: Readable names of the bases: axis labels ``PC1``, ``UMAP1``.
AXIS_NAMES = {"X_pca": "PC", "X_umap": "UMAP", "X_tsne": "tSNE"}
#: What makes each basis: said when it is missing.
MADE_BY_BASIS = {
    "X_pca": "run ps.pp.pca(adata) first (or `pertscale run --pca N`, which writes pca.zarr)",
    "X_umap": "run ps.pp.neighbors(adata) and ps.tl.umap(adata) first (scanpy's, on the PCA)",
}
#: The default colour: the perturbation labels (a run's ``perturbation_column`` when it has another name).
PERTURBATION = "perturbation"
#: Colour of the cells of categories not shown and of cells without a value.
OTHER_COLOR = "#d3d3d3"


# --------------------------------------------------------------------------------------------- sources


class _Store:
    """An AnnData in memory or an AnnData store on disk (zarr group or h5py file), read one element at a time."""

    def __init__(self, adata=None, group=None, *, name: str, perturbation_column: str | None = None):
        self.adata, self.group, self.name = adata, group, name
        self._perturbation_column = perturbation_column

    @property
    def obs_columns(self) -> list[str]:
        if self.adata is not None:
            return [str(c) for c in self.adata.obs.columns]
        return [str(c) for c in self.group["obs"].attrs.get("column-order", [])]

    def color(self, color: str | None) -> str | None:
        """``color``; ``"perturbation"`` absent from ``obs`` is the run's perturbation column when it has another."""
        if color == PERTURBATION and color not in self.obs_columns and self._perturbation_column in self.obs_columns:
            return self._perturbation_column
        return color

    def has(self, element: str, key: str) -> bool:
        if self.adata is not None:
            return key in getattr(self.adata, element)
        return element in self.group and key in self.group[element]

    def keys(self, element: str) -> list[str]:
        if self.adata is not None:
            return [str(k) for k in getattr(self.adata, element).keys()]
        return [str(k) for k in self.group[element].keys()] if element in self.group else []

    def columns(self, element: str, key: str, cols: Sequence[int]) -> np.ndarray:
        """``(n, len(cols))`` float64: the columns ``cols`` of ``obsm[key]`` or ``varm[key]``, reading only those."""
        array = getattr(self.adata, element)[key] if self.adata is not None else self.group[element][key]
        return _columns(array, list(cols))

    def width(self, element: str, key: str) -> int:
        array = getattr(self.adata, element)[key] if self.adata is not None else self.group[element][key]
        return int(array.shape[1])

    def obs(self, name: str):
        check_names(name, self.obs_columns, "obs column")
        if self.adata is not None:
            return self.adata.obs[name]
        import anndata as ad

        return ad.io.read_elem(self.group["obs"][name])

    def var_names(self) -> np.ndarray:
        if self.adata is not None:
            return np.asarray(self.adata.var_names).astype(str)
        return read_index(self.group, element="var")

    def uns_pca(self, key: str = "pca") -> dict | None:
        if self.adata is not None:
            value = self.adata.uns.get(key)
            return dict(value) if isinstance(value, dict) else None
        if "uns" not in self.group or key not in self.group["uns"]:
            return None
        import anndata as ad

        return dict(ad.io.read_elem(self.group["uns"][key]))


def _columns(array, cols: list[int]) -> np.ndarray:
    """Columns ``cols`` of a 2-d array of any kind (numpy, Dask, zarr, h5py, DataFrame), read or computed alone."""
    if isinstance(array, pd.DataFrame):
        return array.iloc[:, cols].to_numpy(dtype=np.float64)
    if hasattr(array, "__dask_graph__"):  # on the scheduler of the enclosing face, or Dask's current one
        import dask

        (values,) = dask.compute(array[:, cols])
        return np.asarray(values, dtype=np.float64)
    if hasattr(array, "oindex"):  # zarr: each chunk read once for both columns
        return np.asarray(array.oindex[:, cols], dtype=np.float64)
    if isinstance(array, np.ndarray):
        return np.asarray(array[:, cols], dtype=np.float64)
    if hasattr(array, "toarray"):  # scipy.sparse
        return np.asarray(array[:, cols].toarray(), dtype=np.float64)
    return np.column_stack([np.asarray(array[:, i], dtype=np.float64) for i in cols])  # h5py: one column each


@contextlib.contextmanager
def _opened(source, *, what: str):
    """``source`` as a :class:`_Store`: an AnnData, a run's output directory (its pca.zarr), a .zarr or .h5ad path."""
    import anndata as ad

    if isinstance(source, ad.AnnData):
        yield _Store(adata=source, name="adata")
        return
    if not isinstance(source, (str, Path)):
        raise TypeError(
            f"{what} takes an AnnData, the output directory of `pertscale run`, or the path of a .zarr or "
            f".h5ad AnnData, not {type(source).__name__}"
        )
    path = Path(source)
    perturbation_column = None
    if path.is_dir() and not (path / "zarr.json").exists() and not (path / ".zgroup").exists():
        if is_run_directory(path) and not (path / "pca.zarr").exists():
            raise ValueError(
                f"{path} holds no PCA: this run was made without --pca; `pertscale run --pca N` writes "
                "pca.zarr (or compute it in Python with ps.pp.pca(adata))"
            )
        path = run_file(path, "pca.zarr")
        with contextlib.suppress(FileNotFoundError, ValueError):
            perturbation_column = (read_run_json(path.parent).get("qc") or {}).get("perturbation_column")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give an AnnData, a run's output directory or a .zarr/.h5ad")
    if path.suffix == ".h5ad" or path.is_file():
        import h5py

        with h5py.File(path, "r") as file:
            yield _Store(group=file, name=str(path), perturbation_column=perturbation_column)
        return
    yield _Store(group=_common.zarr_group(path), name=str(path), perturbation_column=perturbation_column)


def _check_basis(store: _Store, basis: str) -> None:
    if not store.has("obsm", basis):
        held = ", ".join(map(repr, store.keys("obsm"))) or "none"
        how = MADE_BY_BASIS.get(basis, f"compute obsm[{basis!r}] first")
        raise ValueError(f"{store.name} has no obsm[{basis!r}] (its obsm holds {held}): {how}")


def _components(components, n_available: int, *, n: int | None, what: str) -> list[int]:
    """1-based components (``"1,2"`` or integers) as 0-based column indices, checked."""
    if isinstance(components, str):
        try:
            chosen = [int(c) for c in components.replace(" ", "").split(",") if c]
        except ValueError as err:
            raise ValueError(f"components={components!r} is not a comma-separated list of numbers, e.g. '1,2'") from err
    elif isinstance(components, (int, np.integer)):
        chosen = [int(components)]
    else:
        chosen = [int(c) for c in components]
    if n is not None and len(chosen) != n:
        raise ValueError(f"components={components!r}: {what} draws {n} components, e.g. '1,2'")
    if not chosen:
        raise ValueError(f"components={components!r} is empty: give 1-based component numbers, e.g. '1,2'")
    bad = [c for c in chosen if not 1 <= c <= n_available]
    if bad:
        raise ValueError(
            f"components={components!r}: {bad[0]} is not a component; there are {n_available} (numbered from 1)"
        )
    return [c - 1 for c in chosen]


# ---------------------------------------------------------------------------------------------- drawing


def _palette(n: int, palette=None) -> list:
    import matplotlib as mpl
    from matplotlib.colors import to_rgba

    if palette is not None:
        if isinstance(palette, str):
            cmap = mpl.colormaps[palette]
            colors = list(getattr(cmap, "colors", cmap(np.linspace(0, 1, max(n, 2)))))
        else:
            colors = list(palette)
        if len(colors) < n:
            raise ValueError(f"palette has {len(colors)} colours for {n} categories: give at least {n}")
        return [to_rgba(c) for c in colors[:n]]
    if n <= 20:  # tab20 without its greys (the colour of 'other'), strong colours first, as scanpy's default_20
        tab20 = list(mpl.colormaps["tab20"].colors)
        colors = [*tab20[0:14:2], *tab20[16::2], *tab20[1:14:2], *tab20[17::2], "#ad494a", "#8c6d31"]
        return [to_rgba(c) for c in colors[:n]]
    return [tuple(c) for c in mpl.colormaps["turbo"](np.linspace(0.05, 0.95, n))]


def _categories(values, *, groups, max_categories: int):
    """Category codes, the names coloured (code order) and each cell's code among them (-1: other or missing)."""
    cat = pd.Categorical(values)
    names = np.asarray(cat.categories).astype(str)
    codes = cat.codes.astype(np.int64)
    if groups is not None:
        shown = check_names(groups, names, "category")
        shown_idx = [int(np.flatnonzero(names == g)[0]) for g in shown]
    elif len(names) <= max_categories:
        shown_idx = list(range(len(names)))
    else:  # the largest categories, in category order
        sizes = np.bincount(codes[codes >= 0], minlength=len(names))
        shown_idx = sorted(np.argsort(-sizes, kind="stable")[:max_categories].tolist())
    remap = np.full(len(names) + 1, -1, dtype=np.int64)  # index -1 (missing) maps to the last entry: -1
    remap[shown_idx] = np.arange(len(shown_idx))
    return names[shown_idx], remap[codes], len(names) - len(shown_idx)


def _grid(xy: np.ndarray, gridsize: int):
    """Pixel index of each finite cell on a ``gridsize x gridsize`` grid over the data, and the extent."""
    finite = np.isfinite(xy).all(axis=1)
    lo, hi = xy[finite].min(axis=0), xy[finite].max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    lo, hi = lo - 0.01 * span, hi + 0.01 * span
    ij = np.floor((xy[finite] - lo) / (hi - lo) * gridsize).astype(np.int64)
    ij = np.clip(ij, 0, gridsize - 1)
    pixel = ij[:, 1] * gridsize + ij[:, 0]  # row = y, column = x
    return finite, pixel, (lo[0], hi[0], lo[1], hi[1])


def _alpha(total: np.ndarray) -> np.ndarray:
    """Opacity of each pixel from its cells: 0 for none, 0.35 to 1 with the logarithm of the cells."""
    top = np.log1p(total.max()) if total.max() > 0 else 1.0
    return np.where(total > 0, 0.35 + 0.65 * np.log1p(total) / top, 0.0)


def _raster(ax, xy, *, kind: str, codes=None, colors=None, values=None, cmap="viridis", gridsize: int):
    """Cells as an image over ``gridsize x gridsize`` pixels (no artist per cell); returns the mappable or None."""
    import matplotlib as mpl
    from matplotlib.colors import to_rgba

    finite, pixel, extent = _grid(xy, gridsize)
    size = gridsize * gridsize
    total = np.bincount(pixel, minlength=size).astype(np.float64)
    rgba = np.zeros((size, 4))
    mappable = None
    if kind == "category":
        palette = np.vstack([np.asarray(colors, dtype=np.float64).reshape(-1, 4), [to_rgba(OTHER_COLOR)]])
        code = codes[finite]
        code = np.where(code < 0, len(palette) - 1, code)
        counts = np.bincount(code * size + pixel, minlength=len(palette) * size).reshape(len(palette), size)
        # as the scatter draws the coloured cells over the grey ones: a pixel with coloured cells takes their mix
        shown = counts[:-1].sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mix = (counts[:-1].T @ palette[:-1, :3]) / shown[:, None]
        rgba[:, :3] = np.where((shown > 0)[:, None], mix, palette[-1, :3])
    elif kind == "value":
        v = values[finite]
        ok = np.isfinite(v)
        n_ok = np.bincount(pixel[ok], minlength=size)
        sums = np.bincount(pixel[ok], weights=v[ok], minlength=size)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = sums / n_ok
        norm = mpl.colors.Normalize(np.nanmin(v) if ok.any() else 0, np.nanmax(v) if ok.any() else 1)
        cm = mpl.colormaps[cmap]
        rgba[:, :3] = np.where((n_ok > 0)[:, None], cm(norm(np.nan_to_num(mean)))[:, :3], to_rgba(OTHER_COLOR)[:3])
        mappable = mpl.cm.ScalarMappable(norm=norm, cmap=cm)
    else:
        cm = mpl.colormaps["viridis"]
        norm = mpl.colors.LogNorm(1, max(total.max(), 2))
        rgba[:, :3] = cm(norm(np.maximum(total, 1)))[:, :3]
        mappable = mpl.cm.ScalarMappable(norm=norm, cmap=cm)
    rgba[:, 3] = _alpha(total) if kind != "none" else total > 0  # the density's own colour shows the cells
    rgba = np.nan_to_num(rgba).reshape(gridsize, gridsize, 4)
    ax.imshow(rgba, extent=extent, origin="lower", aspect="auto", interpolation="nearest", gid="embedding-density")
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    return mappable


def _draw(
    ax,
    xy: np.ndarray,
    values,
    *,
    name: str | None,
    groups,
    max_categories: int,
    size,
    palette,
    cmap: str,
    gridsize: int,
    legend_loc: str | None,
    legend_fontsize,
) -> None:
    """The scatter (or its raster above MAX_POINTS) of ``xy`` coloured by ``values`` on ``ax``."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    n = len(xy)
    dense = n > _common.MAX_POINTS
    size = size if size is not None else min(20.0, 120_000 / max(n, 1))
    if values is None:
        kind = "none"
    else:
        dtype = getattr(values, "dtype", np.asarray(values).dtype)
        numeric = pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
        kind = "value" if numeric and not isinstance(dtype, pd.CategoricalDtype) else "category"
    mappable = None
    if kind == "category":
        names, codes, n_other = _categories(values, groups=groups, max_categories=max_categories)
        colors = _palette(len(names), palette)
        if dense:
            _raster(ax, xy, kind="category", codes=codes, colors=colors, gridsize=gridsize)
        else:
            other = codes < 0
            if other.any():
                ax.scatter(*xy[other].T, s=size, c=OTHER_COLOR, linewidths=0, gid="embedding-other", plotnonfinite=True)
            if (~other).any():  # in a random order: a file sorted by label would draw the last label on top
                order = np.flatnonzero(~other)
                order = order[np.random.default_rng(0).permutation(order.size)]
                c = np.asarray(colors)[codes[order]]
                ax.scatter(*xy[order].T, s=size, c=c, linewidths=0, gid="embedding-points")
        if legend_loc == "right margin":
            handles = [
                Line2D([], [], marker="o", linestyle="", color=col, markersize=6, label=str(nm))
                for nm, col in zip(names, colors, strict=True)
            ]
            if n_other or (codes < 0).any():
                what = f"other ({n_other} categories)" if n_other else "no value"
                handles.append(Line2D([], [], marker="o", linestyle="", color=OTHER_COLOR, markersize=6, label=what))
            ncol = 1 if len(handles) <= 14 else 2 if len(handles) <= 30 else 3
            ax.legend(
                handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
                fontsize=legend_fontsize, ncol=ncol, handletextpad=0.1, columnspacing=0.8,
            )  # fmt: skip
    elif kind == "value":
        v = np.asarray(values, dtype=np.float64)
        if dense:
            mappable = _raster(ax, xy, kind="value", values=v, cmap=cmap, gridsize=gridsize)
        else:
            missing = ~np.isfinite(v)
            if missing.any():
                ax.scatter(*xy[missing].T, s=size, c=OTHER_COLOR, linewidths=0, gid="embedding-other")
            order = np.flatnonzero(~missing)[np.argsort(v[~missing], kind="stable")]  # high values on top
            mappable = ax.scatter(*xy[order].T, s=size, c=v[order], cmap=cmap, linewidths=0, gid="embedding-points")
        if mappable is not None:
            plt.colorbar(mappable, ax=ax, fraction=0.05, pad=0.02, label=name)
    else:
        if dense:
            mappable = _raster(ax, xy, kind="none", gridsize=gridsize)
            plt.colorbar(mappable, ax=ax, fraction=0.05, pad=0.02, label="cells per pixel")
        else:
            ax.scatter(*xy.T, s=size, c="#4878a8", linewidths=0, gid="embedding-points")


def embedding(
    source,
    basis: str,
    *,
    color: str | None = PERTURBATION,
    components="1,2",
    groups: str | Sequence[str] | None = None,
    max_categories: int = 20,
    size: float | None = None,
    palette=None,
    cmap: str = "viridis",
    gridsize: int | None = None,
    legend_loc: str | None = "right margin",
    legend_fontsize: float | None = 8,
    title: str | None = None,
    annotate_var_explained: bool = False,
    ax=None,
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Cells in two components of the embedding ``obsm[basis]``, coloured by an ``obs`` column.

    As ``scanpy.pl.embedding``: categorical colours with a legend in the
    right margin, numeric ones with a colour bar (cells with higher values
    drawn last). Cells of categories are drawn in a random order (seed 0),
    after the grey ``other`` ones, so that no label hides the others
    because of the order of the file (a run's ``pca.zarr`` is sorted by
    perturbation). Up to ``MAX_POINTS`` (50,000) cells one scatter artist; more a
    raster image (see the module docstring), never an artist per cell.

    Parameters
    ----------
    source
        An AnnData (``obsm[basis]`` in memory or a Dask array: only the two
        columns plotted are computed, with ``dask.compute`` on the
        scheduler of an enclosing :func:`pertscale.cluster.using` block or
        Dask's current one; for the lazy scores of :func:`pertscale.pp.pca`
        that is one pass over the matrix), a run's output directory (its
        ``pca.zarr``), or the path of a ``.zarr`` or ``.h5ad`` AnnData (only
        the elements plotted are read).
    basis
        Key of ``obsm``, e.g. ``"X_pca"``, ``"X_umap"``.
    color
        An ``obs`` column, or ``None`` for one colour. The default,
        ``"perturbation"``, is the run's ``perturbation_column`` when a run's
        ``pca.zarr`` names it otherwise. Text, boolean and categorical
        columns are categories; numbers a colour scale.
    components
        Two 1-based components, ``"1,2"`` or ``(1, 2)``.
    groups
        Categories to colour (the others grey); default all, or the
        ``max_categories`` largest when there are more.
    max_categories
        Most categories coloured without ``groups``; the rest grey
        ``other`` (counted in the legend).
    size
        Marker area in points^2; default ``min(20, 120000 / n_cells)``
        (scanpy's).
    palette
        Colours of the categories (a list, or a matplotlib colormap name);
        default up to 20 the colours of ``tab20`` without its greys (as
        scanpy's ``default_20``), ``turbo`` above.
    cmap
        Colormap of a numeric ``color``.
    gridsize
        Pixels per side of the raster drawn above ``MAX_POINTS`` (50,000) cells;
        default ``sqrt(n_cells / 2)`` clipped to 64-300 (a few cells per
        pixel where there are cells).
    legend_loc
        ``"right margin"`` or ``None`` (no legend).
    legend_fontsize
        Points.
    title
        Default: the colour's name.
    annotate_var_explained
        Add the percent of variance of each component to the axis labels
        (needs ``uns['pca']['variance_ratio']``), as scanpy's.
    ax
        Axes to draw on; default a new figure.
    figsize
        Inches of a new figure.
    save
        Write the figure to this path (format from the suffix).
    show
        Show the figure (``pyplot.show``); ``None``: left open unless saved (see
        :func:`~pertscale.pl._common.finish`).

    Returns
    -------
    matplotlib.axes.Axes

    Raises
    ------
    ValueError
        If ``obsm[basis]`` is missing (saying what computes it), a run's
        output directory holds no PCA (``pertscale run --pca N`` writes it),
        or ``components`` is not two components of the embedding.
    KeyError
        If ``color`` is not an ``obs`` column or ``groups`` names a
        category that is not in it (naming the closest).
    FileNotFoundError
        If a path does not exist or a directory is not a pertscale output.
    TypeError
        If ``source`` is neither an AnnData nor a path.
    """
    if legend_loc not in ("right margin", None):
        raise ValueError(f"legend_loc={legend_loc!r}: use 'right margin' or None")
    if int(max_categories) < 0:
        raise ValueError(f"max_categories={max_categories} is negative")
    with _opened(source, what=f"a plot of obsm[{basis!r}]") as store:
        _check_basis(store, basis)
        cols = _components(components, store.width("obsm", basis), n=2, what="a scatter plot")
        color = store.color(color)
        values = store.obs(color) if color is not None else None
        xy = store.columns("obsm", basis, cols)
        ratio = None
        if annotate_var_explained:
            uns = store.uns_pca(basis[2:] if basis.startswith("X_") else basis) or {}
            if "variance_ratio" not in uns:
                raise ValueError(f"annotate_var_explained needs uns['pca']['variance_ratio'], which {store.name} lacks")
            ratio = np.asarray(uns["variance_ratio"], dtype=np.float64)
    if gridsize is None:
        gridsize = int(np.clip(np.sqrt(len(xy) / 2), 64, 300))
    ax = axes(ax, figsize=figsize or (4.5, 4.0))
    _draw(
        ax, xy, values, name=color, groups=groups, max_categories=int(max_categories), size=size, palette=palette,
        cmap=cmap, gridsize=int(gridsize), legend_loc=legend_loc, legend_fontsize=legend_fontsize,
    )  # fmt: skip
    prefix = AXIS_NAMES.get(basis, basis.removeprefix("X_"))
    labels = [f"{prefix}{c + 1}" for c in cols]
    if ratio is not None:
        labels = [f"{lab} ({100 * ratio[c]:.1f} %)" for lab, c in zip(labels, cols, strict=True)]
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_xticks([])
    ax.set_yticks([])
    if title is None:
        title = color or ""
        if len(xy) > _common.MAX_POINTS:
            title = f"{title} ({len(xy):,} cells, density)" if title else f"{len(xy):,} cells, density"
    ax.set_title(title)
    return finish(ax, save=save, show=show)


def pca(
    source,
    *,
    color: str | None = PERTURBATION,
    components="1,2",
    groups: str | Sequence[str] | None = None,
    max_categories: int = 20,
    annotate_var_explained: bool = False,
    ax=None,
    save: str | Path | None = None,
    show: bool | None = None,
    **kwargs,
):
    """Cells in two principal components, coloured by an ``obs`` column (scanpy's ``sc.pl.pca``).

    :func:`embedding` of ``obsm['X_pca']``; see there for the drawing
    (one scatter artist up to ``MAX_POINTS`` (50,000) cells, a raster above).

    Parameters
    ----------
    source
        An AnnData after :func:`pertscale.pp.pca` (the lazy scores: only the
        two components plotted are computed), a run's output directory of
        ``pertscale run --pca N`` (reads ``pca.zarr``), or the path of a
        ``.zarr``/``.h5ad`` AnnData with ``obsm['X_pca']``.
    color
        An ``obs`` column (default the perturbation labels), or ``None``
        for one colour.
    components
        Two 1-based components, ``"1,2"``.
    groups, max_categories
        Categories coloured (the rest grey ``other``): ``groups``, else all
        up to ``max_categories``, else the ``max_categories`` largest.
    annotate_var_explained
        Percent of variance on the axis labels (``uns['pca']``).
    ax, save, show
        As :func:`embedding`.
    **kwargs
        Further options of :func:`embedding` (``size``, ``palette``,
        ``cmap``, ``gridsize``, ``legend_loc``, ``title``, ``figsize``).

    Returns
    -------
    matplotlib.axes.Axes

    Raises
    ------
    ValueError
        If the source has no ``obsm['X_pca']`` (run ``ps.pp.pca`` or
        ``pertscale run --pca N``), or for bad ``components``.
    KeyError, FileNotFoundError, TypeError
        As :func:`embedding`.
    """
    return embedding(
        source, "X_pca", color=color, components=components, groups=groups, max_categories=max_categories,
        annotate_var_explained=annotate_var_explained, ax=ax, save=save, show=show, **kwargs,
    )  # fmt: skip


def umap(
    adata,
    *,
    color: str | None = PERTURBATION,
    components="1,2",
    groups: str | Sequence[str] | None = None,
    max_categories: int = 20,
    ax=None,
    save: str | Path | None = None,
    show: bool | None = None,
    **kwargs,
):
    """Cells in the UMAP embedding ``obsm['X_umap']``, coloured by an ``obs`` column (scanpy's ``sc.pl.umap``).

    :func:`embedding` of ``obsm['X_umap']``.

    Parameters
    ----------
    adata
        An AnnData with ``obsm['X_umap']`` (:func:`pertscale.tl.umap`, or
        scanpy's ``sc.tl.umap``), or the path of a ``.zarr``/``.h5ad``
        AnnData holding it.
    color, components, groups, max_categories, ax, save, show, **kwargs
        As :func:`pca`.

    Returns
    -------
    matplotlib.axes.Axes

    Raises
    ------
    ValueError
        If there is no ``obsm['X_umap']`` (saying what computes it).
    KeyError, FileNotFoundError, TypeError
        As :func:`embedding`.
    """
    return embedding(
        adata, "X_umap", color=color, components=components, groups=groups, max_categories=max_categories,
        ax=ax, save=save, show=show, **kwargs,
    )  # fmt: skip


def _variance_ratio(store: _Store) -> np.ndarray:
    uns = store.uns_pca("pca")
    if not uns or "variance_ratio" not in uns:
        raise ValueError(f"{store.name} has no uns['pca']['variance_ratio']: {MADE_BY_BASIS['X_pca']}")
    return np.asarray(uns["variance_ratio"], dtype=np.float64)


def pca_variance_ratio(
    source,
    *,
    n_pcs: int = 50,
    log: bool = False,
    ax=None,
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """The share of the genes' variance of each principal component, in order (scanpy's ``sc.pl.pca_variance_ratio``).

    Points at ``(k, variance_ratio[k - 1])`` for the first ``n_pcs``
    components; the title gives their sum. An elbow suggests how many
    components to keep.

    Parameters
    ----------
    source
        As :func:`pca` (reads ``uns['pca']['variance_ratio']`` only).
    n_pcs
        Components shown (all when fewer were computed).
    log
        Logarithmic ratio axis.
    ax
        Axes to draw on; default a new figure.
    figsize
        Inches of a new figure.
    save, show
        As :func:`embedding`.

    Returns
    -------
    matplotlib.axes.Axes

    Raises
    ------
    ValueError
        If there is no ``uns['pca']`` (run ``ps.pp.pca`` or
        ``pertscale run --pca N``), or ``n_pcs`` is below 1.
    FileNotFoundError, TypeError
        As :func:`embedding`.
    """
    if int(n_pcs) < 1:
        raise ValueError(f"n_pcs={n_pcs}: show at least 1 component")
    with _opened(source, what="pca_variance_ratio") as store:
        ratio = _variance_ratio(store)
    shown = ratio[: int(n_pcs)]
    ax = axes(ax, figsize=figsize or (5.0, 3.6))
    k = np.arange(1, len(shown) + 1)
    ax.plot(k, shown, "o-", color="#4878a8", markersize=4, linewidth=1, gid="pca-variance-ratio")
    ax.set_xlabel("principal component")
    ax.set_ylabel("variance ratio")
    if log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"PCA: the first {len(shown)} PCs explain {100 * shown.sum():.1f} % of the variance", fontsize=10)
    return finish(ax, save=save, show=show)


def pca_loadings(
    source,
    *,
    components="1,2,3",
    n_genes: int = 10,
    include_lowest: bool = True,
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """The genes with the highest (and lowest) loadings of each principal component (scanpy's ``sc.pl.pca_loadings``).

    One panel per component: the ``n_genes`` genes of largest loading in
    ``varm['PCs']``, then with ``include_lowest`` the ``n_genes`` of
    smallest (most negative), as horizontal bars named by gene, largest at
    the top: the genes scanpy's plot names, as bars (no overlapping text).

    Parameters
    ----------
    source
        As :func:`pca` (reads ``var_names`` and the columns of
        ``varm['PCs']`` shown only).
    components
        1-based components, ``"1,2,3"`` or a list of numbers.
    n_genes
        Genes per side of each panel.
    include_lowest
        Also the genes of the lowest loadings.
    figsize
        Inches; default 3.6 wide per panel.
    save, show
        As :func:`embedding`.

    Returns
    -------
    matplotlib.figure.Figure
        One axes per component.

    Raises
    ------
    ValueError
        If there is no ``varm['PCs']`` (run ``ps.pp.pca`` or
        ``pertscale run --pca N``), ``components`` names a component not
        computed, or ``n_genes`` is below 1.
    FileNotFoundError, TypeError
        As :func:`embedding`.
    """
    if int(n_genes) < 1:
        raise ValueError(f"n_genes={n_genes}: show at least 1 gene per side")
    n_genes = int(n_genes)
    with _opened(source, what="pca_loadings") as store:
        if not store.has("varm", "PCs"):
            held = ", ".join(map(repr, store.keys("varm"))) or "none"
            raise ValueError(f"{store.name} has no varm['PCs'] (its varm holds {held}): {MADE_BY_BASIS['X_pca']}")
        cols = _components(components, store.width("varm", "PCs"), n=None, what="pca_loadings")
        loadings = store.columns("varm", "PCs", cols)
        genes = store.var_names()
    plt = pyplot()
    rows = n_genes * (2 if include_lowest else 1)
    fig, axs = plt.subplots(
        1, len(cols), figsize=figsize or (3.6 * len(cols), 0.9 + 0.2 * rows), layout="constrained", squeeze=False
    )
    for ax, c, score in zip(axs[0], cols, loadings.T, strict=True):
        order = np.argsort(score, kind="stable")[::-1]
        top = order[: min(n_genes, len(order))]
        picked = list(top)
        if include_lowest:
            bottom = order[max(len(top), len(order) - n_genes) :]
            picked += list(bottom)
        y = np.arange(len(picked))[::-1].astype(np.float64)
        if include_lowest and len(picked) > len(top):
            y[len(top) :] -= 0.8  # a gap between the highest and the lowest
        values = score[picked]
        colors = np.where(values >= 0, "#c44e52", "#4878a8")
        ax.barh(y, values, color=colors, height=0.8, gid="pca-loadings")
        ax.set_yticks(y, genes[picked], fontsize=8)
        ax.axvline(0, color="0.3", linewidth=0.8)
        ax.set_title(f"PC{c + 1}", fontsize=10)
        ax.set_xlabel("loading")
        ax.set_ylim(y.min() - 0.7, y.max() + 0.7)
    return finish(fig, save=save, show=show)

"""Views of stored results: an ``xarray.Dataset`` over the perturbation x gene statistics."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np


def dataset(results: ad.AnnData | str | Path):
    """The statistics of a results AnnData as an ``xarray.Dataset``, lazily.

    Parameters
    ----------
    results
        A results AnnData (from :func:`pertscale.tl.rank_genes_groups`, lazy
        or in memory), or the path of a results ``.zarr`` store written by
        :func:`pertscale.write` or ``pertscale run`` (``de_wilcoxon.zarr``).

    Returns
    -------
    xarray.Dataset
        Dimensions ``perturbation`` and ``gene``; one variable per statistic
        (``scores``, ``pvals``, ``pvals_adj``, ``logfoldchanges`` (log2),
        ``pts``, ...), each ``(n_perturbations, n_genes)``; coordinate
        ``n_cells`` along ``perturbation``; the run's settings in ``attrs``.
        From a store, the variables are Dask arrays reading its chunks: a
        selection (``ds.sel(perturbation="STAT1")``) reads only what it needs.

    Raises
    ------
    FileNotFoundError
        If the path does not exist.
    ValueError
        If it holds no perturbation x gene statistics.
    """
    import xarray as xr

    if isinstance(results, (str, Path)):
        results = _open_results(Path(results))
    if not results.layers:
        raise ValueError("these results hold no statistics (no layers)")
    dims = ("perturbation", "gene")
    coords = {"perturbation": np.asarray(results.obs_names, dtype=object), "gene": np.asarray(results.var_names)}
    if "n_cells" in results.obs:
        coords["n_cells"] = ("perturbation", results.obs["n_cells"].to_numpy())
    settings = dict(((results.uns.get("pertscale") or {}).get("settings")) or {})
    return xr.Dataset(
        {name: (dims, results.layers[name]) for name in results.layers},
        coords=coords,
        attrs={k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in settings.items()},
    )


def _open_results(path: Path) -> ad.AnnData:
    """A results ``.zarr`` store as an AnnData whose layers are Dask arrays over its chunks."""
    import dask.array as da
    import zarr

    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {str(path)!r}")
    group = zarr.open_group(str(path), mode="r")
    obs = ad.io.read_elem(group["obs"])
    var = ad.io.read_elem(group["var"])
    uns = ad.io.read_elem(group["uns"]) if "uns" in group else {}
    layers = {name: da.from_zarr(group["layers"][name]) for name in group["layers"].keys()} if "layers" in group else {}
    return ad.AnnData(obs=obs, var=var, layers=layers, uns=uns)

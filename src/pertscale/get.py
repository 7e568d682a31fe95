"""Getters of stored results: by settings, as a table of what is stored, as lazy ``xarray`` views.

Every analysis stores its output in the AnnData it ran on, keyed by its
settings (:mod:`pertscale.store`). These functions read them back without
computing anything:

- :func:`result`: one stored result, picked by analysis and any settings field.
- :func:`summary`: a table of the stored results.
- :func:`dataset`: a test's statistics as an ``xarray.Dataset`` (lazy).
- :func:`compare`: several tests' statistics stacked along a new dimension.
- :func:`rerun`: a recorded run (:class:`pertscale.RunInfo`) made again.

The store below them imports no analysis; running one again is done here,
at the face.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np


def result(
    adata: ad.AnnData, method: str | None = None, *, key: str | None = None, return_settings: bool = False, **filters
):
    """The one stored result that the analysis ``method``, the name ``key`` and the settings ``filters`` pick.

    Parameters
    ----------
    adata
        An AnnData analyses ran on, or one read back from its file
        (:func:`pertscale.read`, or anndata's readers followed by
        :func:`pertscale.ensure_result_keys`).
    method
        The analysis: ``"wilcoxon"``, ``"t-test"``, ``"t-test_overestim_var"``,
        ``"nb-glm"``, ``"qc"``, ``"hvg"``, ``"pca"``, ``"pseudobulk"``.
    key
        The readable name of the latest result of a kind (``"de_wilcoxon"``,
        the ``key_added`` of the call).
    return_settings
        Also return the settings object: ``(settings, result)``.
    **filters
        Settings fields and their values (``control_label="NT"``,
        ``alternative="greater"``, ``n_comps=30``): see the settings models
        in :mod:`pertscale.analysis`.

    Returns
    -------
    anndata.AnnData, pertscale.pp.QCSummary, pandas.DataFrame or dict
        The result as the analysis returned it: the results AnnData of a
        test (``n_perturbations x n_genes``) or of pseudo-bulk (``n_groups x
        n_genes``), a :class:`pertscale.pp.QCSummary`, the
        highly-variable-genes ``DataFrame`` (``n_vars`` rows), or PCA's dict
        (``X_pca`` ``n_obs x n_comps``, ``PCs`` ``n_vars x n_comps``,
        ``variance``, ``variance_ratio``). With ``return_settings``, the
        tuple ``(settings, result)``.

    Raises
    ------
    ValueError
        If nothing is stored, the filters match no result or several (the
        message lists them and the fields that tell them apart), or a filter
        is not a settings field.
    """
    from .store import select

    settings, value = select(adata, method=method, key=key, **filters)
    if settings.method == "qc":
        from .pp._qc_summary import summary_from_store

        value = summary_from_store(settings, value)
    return (settings, value) if return_settings else value


def summary(adata: ad.AnnData):
    """The stored results of ``adata`` as a table (one row each); see :func:`pertscale.store.summary`."""
    from .store import summary as _summary

    return _summary(adata)


def rerun(run, adata: ad.AnnData | None = None, **changes):
    """Run a recorded analysis again: ``ps.<run.function>(adata, **run.call_args(), **changes)``.

    Parameters
    ----------
    run
        A :class:`pertscale.RunInfo` (``ps.RunInfo(adata)``: the latest run).
    adata
        The AnnData to run on; default the one the run was read from
        (``run.adata``).
    **changes
        Arguments that replace the recorded ones (``alternative="greater"``;
        ``force=True`` recomputes instead of returning the stored result).

    Returns
    -------
    What the analysis returns (a test's results AnnData is lazy: compute it
    with :func:`pertscale.compute` or write it with :func:`pertscale.write`).

    Raises
    ------
    TypeError
        If ``run`` is not a :class:`pertscale.RunInfo`, or a change is not
        an argument of the analysis.
    ValueError
        If a change is not a valid value (as the analysis itself says).
    """
    from importlib import import_module

    from .store import RunInfo

    if not isinstance(run, RunInfo):
        raise TypeError(f"rerun() takes a pertscale.RunInfo (ps.RunInfo(adata)), not {type(run).__name__}")
    module, _, name = f"pertscale.{run.settings.function}".rpartition(".")  # the settings' class names it
    func = getattr(import_module(module), name)
    args = run.call_args()
    for old, new in getattr(func, "renamed_arguments", {}).items():
        if old in changes:  # a change under an argument's earlier name replaces it (the call warns)
            args.pop(new, None)
    return func(run.adata if adata is None else adata, **(args | changes))


def dataset(results: ad.AnnData | str | Path, method: str | None = None, *, key: str | None = None, **filters):
    """The statistics of a test's results as an ``xarray.Dataset``, lazily.

    Parameters
    ----------
    results
        A results AnnData (from :func:`pertscale.tl.rank_genes_groups`, lazy
        or in memory); an AnnData whose result store holds tests (then
        ``method``, ``key`` and ``filters`` pick one, as :func:`result`); or
        the path of a results file written by :func:`pertscale.write` or
        ``pertscale run`` (``de_wilcoxon.zarr``, ``de_wilcoxon.h5ad``), or of
        an ``.h5ad``/``.zarr`` file holding a result store (its statistics
        are read lazily, block by block).
    method, key, **filters
        Pick a stored test, as :func:`result` does. For the results of one
        test (a ``de_*`` file) they are optional and checked against it:
        ``method="wilcoxon"`` on ``de_wilcoxon.h5ad`` is that file, on
        ``de_t_test.h5ad`` an error.

    Returns
    -------
    xarray.Dataset
        Dimensions ``perturbation`` and ``gene``; one variable per statistic
        (``scores``, ``pvals``, ``pvals_adj``, ``logfoldchanges`` (log2),
        ``pts``, ...), each ``(n_perturbations, n_genes)``; coordinate
        ``n_cells`` along ``perturbation``; the run's settings in ``attrs``.
        From a store, the variables are Dask arrays reading its chunks: a
        selection (``ds.sel(perturbation="STAT1")``) reads only what it needs.
        Statistics written under an earlier release's name (nb-glm's
        ``standard_error``, ``standard_error_shrunk``) are named as now
        (``lfcSE``, ``lfcSE_shrunk``; :data:`pertscale.variables.DEPRECATED`).

    Raises
    ------
    FileNotFoundError
        If the path does not exist.
    ValueError
        If it holds no perturbation x gene statistics, or the results of
        one test were asked for with a ``method``, ``key`` or settings that
        are not theirs (the message says what they hold).
    """
    import xarray as xr

    from .variables import GENE, N_CELLS, PERTURBATION, current_name

    if isinstance(results, (str, Path)):
        results = _open_results(Path(results))
    if not _has_store(results) and _held_method(results) is not None:
        _check_held(results, method, key, filters)  # one test's results: method= and filters must describe it
    elif _has_store(results) or method is not None or key is not None or filters:
        from .analysis import DESettings

        settings, results = result(results, method, key=key, return_settings=True, **filters)
        if not isinstance(settings, DESettings):
            raise ValueError(
                f"dataset() views the results of a test (wilcoxon, t-test, nb-glm), not of {settings.method!r}; "
                "pick a test with method="
            )
    if not results.layers:
        raise ValueError("these results hold no statistics (no layers)")
    dims = (PERTURBATION, GENE)
    coords = {PERTURBATION: np.asarray(results.obs_names, dtype=object), GENE: np.asarray(results.var_names)}
    if N_CELLS in results.obs:
        coords[N_CELLS] = (PERTURBATION, results.obs[N_CELLS].to_numpy())
    settings = dict(((results.uns.get("pertscale") or {}).get("settings")) or {})
    return xr.Dataset(
        {current_name(name): (dims, results.layers[name]) for name in results.layers},
        coords=coords,
        attrs={k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in settings.items()},
    )


def _has_store(adata: ad.AnnData) -> bool:
    from .store import STORE

    return bool((adata.uns.get(STORE) or {}).get("results"))


def compare(
    source: ad.AnnData | str | Path,
    selections: list[dict] | None = None,
    *,
    dim: str = "result",
    names: list[str] | None = None,
    join: str = "inner",
):
    """Several stored tests' statistics stacked along a new dimension, lazily.

    Parameters
    ----------
    source
        An AnnData with a result store, or the path of a file holding one.
    selections
        One dict of :func:`result` arguments per result
        (``[{"method": "wilcoxon"}, {"method": "t-test"}]``); default every
        stored test.
    dim
        Name of the new dimension.
    names
        Its coordinate values; default the analyses' names, with the
        differing settings when two share one.
    join
        How perturbations and genes are aligned (``"inner"``: those all
        results share; ``"outer"``: all, NaN where missing).

    Returns
    -------
    xarray.Dataset
        Dimensions ``(dim, perturbation, gene)``; the statistics all results
        have (``scores``, ``pvals``, ``pvals_adj``, ``logfoldchanges``,
        ``pts``, ...); lazy where the results are.

    Raises
    ------
    ValueError
        If fewer than one result is selected, a selection is ambiguous, or
        ``names`` has the wrong length.
    """
    import xarray as xr

    from .analysis import DESettings
    from .store import results as stored_results
    from .variables import N_CELLS

    if isinstance(source, (str, Path)):
        from .io._read import read

        source = read(source)
    if selections is None:
        selections = [
            {"method": s.method, **{k: v for k, v in s.model_dump().items() if k != "method"}}
            for s in stored_results(source)
            if isinstance(s, DESettings)
        ]
    if not selections:
        raise ValueError("no stored test results to compare: run ps.tl.rank_genes_groups first")
    picked = [result(source, return_settings=True, **sel) for sel in selections]
    if names is None:
        names = [s.method for s, _ in picked]
        if len(set(names)) < len(names):
            names = [
                s.method
                + "".join(f",{k}={a!r}" for k, (a, _) in s.differences(picked[(i + 1) % len(picked)][0]).items())
                for i, (s, _) in enumerate(picked)
            ]
    if len(names) != len(picked):
        raise ValueError(f"names has {len(names)} entries for {len(picked)} results")
    views = [dataset(r) for _, r in picked]
    common = set.intersection(*(set(v.data_vars) for v in views))
    views = [v[sorted(common)].drop_vars(N_CELLS, errors="ignore") for v in views]
    out = xr.concat(views, dim=dim, join=join, combine_attrs="drop")
    return out.assign_coords({dim: names})


def _held_method(results: ad.AnnData) -> str | None:
    """The test whose results ``results`` is (``uns['pertscale']['settings']['method']``), or ``None``."""
    settings = (results.uns.get("pertscale") or {}).get("settings") if isinstance(results, ad.AnnData) else None
    method = settings.get("method") if isinstance(settings, dict) else None
    return str(method) if method is not None else None


def _check_held(results: ad.AnnData, method: str | None, key: str | None, filters: dict) -> None:
    """Refuse a ``method``, ``key`` or settings filter that the results of one test do not match."""
    from .analysis import _plain

    held = _held_method(results)
    settings = dict(results.uns["pertscale"]["settings"])
    if method is not None and method != held:
        raise ValueError(
            f"these are the results of {held!r}, not {method!r}; pass method={held!r} or omit method=, or open the "
            f"file of the {method} results (pertscale run writes de_{method.replace('-', '_')}.zarr/.h5ad)"
        )
    if key is not None and key.replace("-", "_") != f"de_{held}".replace("-", "_"):
        raise ValueError(f"these are the results of {held!r} (key 'de_{held}'), not {key!r}; omit key=")
    unknown = sorted(set(filters) - set(settings))
    if unknown:
        raise ValueError(f"{unknown} are not settings of these {held} results; settings: {sorted(settings)}")
    differ = {k: settings[k] for k, v in filters.items() if _plain(settings[k]) != _plain(v)}
    if differ:
        shown = ", ".join(f"{k}={_plain(v)!r}" for k, v in differ.items())
        raise ValueError(f"these {held} results were computed with {shown}, not as asked")


def open_results(path: str | Path) -> ad.AnnData:
    """A test's results file (``de_wilcoxon.zarr`` or ``.h5ad``) as an AnnData whose layers are lazy Dask arrays.

    Only ``obs``, ``var`` and ``uns['pertscale']`` are read; each layer is
    read chunk by chunk when computed, so results of any size open at once
    (perturbations x genes x statistics are never loaded whole).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    """
    return _open_results(Path(path))


def _open_results(path: Path) -> ad.AnnData:
    """A results file (``de_wilcoxon.zarr`` or ``.h5ad``) as an AnnData whose layers are Dask arrays over its chunks.

    A file that holds a result store (a cell-level ``.h5ad`` or ``.zarr``
    written by :func:`pertscale.write`) is opened with :func:`pertscale.read`.
    Of a results file only ``obs``, ``var``, ``uns['pertscale']`` and the
    layers (lazily) are read: scanpy's ``uns['rank_genes_groups']`` view
    can be as large as the layers.
    """
    import dask.array as da
    import h5py
    import zarr

    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {str(path)!r}")
    if path.is_dir():
        group = zarr.open_group(str(path), mode="r")
        if _is_results(group):
            layers = {name: da.from_zarr(group["layers"][name]) for name in group["layers"].keys()}
            return _results_adata(group, layers)
    elif h5py.is_hdf5(path):
        from anndata.experimental import read_elem_lazy

        with h5py.File(path, "r") as f:
            if _is_results(f):
                layers = {name: read_elem_lazy(f["layers"][name]) for name in f["layers"].keys()}
                return _results_adata(f, layers)
    from .io._read import read

    return read(path)


def _is_results(group) -> bool:
    """A results AnnData as written: layers of statistics and its settings in ``uns/pertscale/settings``."""
    try:
        return "settings" in group["uns/pertscale"] and "layers" in group and len(list(group["layers"].keys())) > 0
    except (KeyError, TypeError):
        return False


def _results_adata(group, layers: dict) -> ad.AnnData:
    uns = {"pertscale": ad.io.read_elem(group["uns/pertscale"])}
    return ad.AnnData(obs=ad.io.read_elem(group["obs"]), var=ad.io.read_elem(group["var"]), layers=layers, uns=uns)

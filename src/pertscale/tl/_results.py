"""Results AnnData for perturbation x gene statistics, and views of it."""

from __future__ import annotations

import io
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from .._validation import check_number, unique_var_names
from ..io._atomic import replacing
from ..variables import (
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
    TIDY_COLUMNS,
)

#: The statistics of the tidy table: its columns after ``perturbation`` and ``gene`` (layers of the same name).
TIDY_STATISTICS = TIDY_COLUMNS[2:]


def clean_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings made safe for ``uns`` in h5ad and zarr (no ``None``, plain types)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = np.asarray([str(v) for v in value], dtype=object) if value else np.asarray([], dtype=str)
        elif isinstance(value, (np.integer, np.floating, np.bool_)):
            value = value.item()
        out[key] = value
    return out


def lazy_results(
    stats,
    stat_names: tuple[str, ...],
    *,
    groups: list[str],
    var: pd.DataFrame,
    n_cells: np.ndarray,
    settings: dict[str, Any],
) -> ad.AnnData:
    """Assemble the ``n_perturbations x n_genes`` results AnnData, lazily when ``stats`` is lazy.

    Parameters
    ----------
    stats
        ``(n_groups, len(stat_names), n_genes)`` float64, a Dask or numpy
        array. Each layer is a view of it: nothing is copied or computed.
    stat_names
        Layer name of each statistic.
    groups
        Perturbation labels, the ``obs_names``.
    var
        Gene annotation; its index gives the ``var_names``.
    n_cells
        ``(n_groups,)`` cells per perturbation, ``obs['n_cells']``.
    settings
        Stored in ``uns['pertscale']['settings']``.
    """
    obs = pd.DataFrame({N_CELLS: np.asarray(n_cells, dtype=np.int64)}, index=pd.Index(groups, name=PERTURBATION))
    var = unique_var_names(var[[c for c in ("original_var_name",) if c in var.columns]].copy())
    var.index.name = GENE
    layers = {name: stats[:, i, :] for i, name in enumerate(stat_names)}
    res = ad.AnnData(obs=obs, var=var, layers=layers)
    res.uns["pertscale"] = {"settings": clean_settings(settings)}
    return res


def scanpy_uns(results: ad.AnnData, *, key: str = "rank_genes_groups") -> None:
    """Add Scanpy's ``uns['rank_genes_groups']`` to a results AnnData in memory.

    Afterwards ``scanpy.get.rank_genes_groups_df(results, group)`` works on it.
    Genes are ranked per perturbation by descending score, as scanpy does.
    Scanpy's record arrays have one field per perturbation: an ``.h5ad``
    file holds them up to about 1,100 perturbations.

    Raises
    ------
    ValueError
        If the layers are lazy: compute them first (:func:`pertscale.compute`).
    """
    if any(not isinstance(results.layers[k], np.ndarray) for k in results.layers):
        raise ValueError("the results are lazy; compute them first: results = ps.compute(results)")
    s = results.uns["pertscale"]["settings"]
    groups = list(results.obs_names)
    genes = np.asarray(results.var_names)
    scores = results.layers[SCORES]
    order = np.argsort(-scores, axis=1, kind="stable")

    def rec(values: np.ndarray, dtype) -> np.recarray:
        cols = [np.take(values[g], order[g]) for g in range(len(groups))]
        return np.rec.fromarrays(cols, dtype=[(g, dtype) for g in groups])

    out: dict[str, Any] = {
        "params": {
            "groupby": s["perturbation_column"],
            "reference": "rest" if s.get("reference") == "rest" else s["control_label"],
            "method": s["method"],
            "use_raw": False,
            "layer": s.get("layer", "X"),
            "corr_method": s["corr_method"],
        },
        "names": rec(np.broadcast_to(genes, scores.shape), object),
    }
    for name in (SCORES, LOGFOLDCHANGES, PVALS, PVALS_ADJ):  # scanpy's names and dtypes
        out[name] = rec(results.layers[name], "float32" if name in (SCORES, LOGFOLDCHANGES) else "float64")
    out[PTS] = pd.DataFrame(results.layers[PTS].T, index=genes, columns=groups)
    out[PTS_REST] = pd.DataFrame(results.layers[PTS_REST].T, index=genes, columns=groups)
    results.uns[key] = out


def tidy(results: ad.AnnData, *, max_pval_adj: float | None = None) -> pd.DataFrame:
    """Long table: one row per (perturbation, gene).

    Columns ``perturbation, gene, logfoldchanges, scores, pvals, pvals_adj``
    (the layers' names, as ``scanpy.get.rank_genes_groups_df`` names them;
    ``logfoldchange``, ``score``, ``pval``, ``pval_adj`` in earlier releases),
    sorted by perturbation then adjusted p-value. ``max_pval_adj`` keeps
    rows with ``pvals_adj < max_pval_adj``.

    Raises
    ------
    ValueError
        If ``max_pval_adj`` is not a number in ``[0, 1]``.
    """
    max_pval_adj = check_number(max_pval_adj, "max_pval_adj", minimum=0, maximum=1, allow_none=True)
    n_groups, n_genes = results.shape
    df = pd.DataFrame(
        {
            PERTURBATION: np.repeat(np.asarray(results.obs_names), n_genes),
            GENE: np.tile(np.asarray(results.var_names), n_groups),
            **{name: np.asarray(results.layers[name]).ravel() for name in TIDY_STATISTICS},
        }
    )
    if max_pval_adj is not None:
        df = df[df[PVALS_ADJ] < max_pval_adj]
    return df.sort_values([PERTURBATION, PVALS_ADJ, GENE], kind="stable").reset_index(drop=True)


#: h5py's words when a record array has more fields than an HDF5 object header holds.
TOO_MANY_FIELDS = "object header message is too large"


def _skeleton(groups: list[str], stat_names: tuple[str, ...], *, scanpy_format: bool) -> ad.AnnData:
    settings = {"method": "-", "perturbation_column": "-", "control_label": "-", "corr_method": "-"}
    stats = np.zeros((len(groups), len(stat_names), 1))
    res = lazy_results(
        stats,
        stat_names,
        groups=groups,
        var=pd.DataFrame(index=["gene"]),
        n_cells=np.ones(len(groups)),
        settings=settings,
    )
    if scanpy_format:
        scanpy_uns(res)
    return res


def _write_in_memory(adata: ad.AnnData) -> None:
    with h5py.File(io.BytesIO(), "w") as f:
        ad.io.write_elem(f, "/", adata)


def check_results_writable(groups: list[str], stat_names: tuple[str, ...], *, perturbation_column: str) -> bool:
    """Write an empty results file for these perturbation labels, in memory, before any pass.

    A label can be fine as text and still not fit the file: ``'dtype'`` or
    ``'_index'`` clash with anndata's layout of scanpy's
    ``uns['rank_genes_groups']``, a ``'/'`` opens an HDF5 group, and more
    than about 1,100 perturbations do not fit scanpy's record arrays in one
    HDF5 object header. This writes the results' layout (one gene) to an
    in-memory HDF5 file, as the real write would, so such problems show up
    before the computation instead of after it.

    Parameters
    ----------
    groups
        The perturbation labels that will be tested.
    stat_names
        The statistics (layers) of the results.
    perturbation_column
        Named in the message.

    Returns
    -------
    bool
        Whether scanpy's ``uns['rank_genes_groups']`` fits; ``False`` when
        there are too many perturbations for its record arrays (the layers
        hold every statistic either way).

    Raises
    ------
    ValueError
        Naming the labels that cannot be written, and the fix.
    """
    slashed = [f"{g!r} ('/' separates groups in HDF5 and zarr)" for g in groups if "/" in g]
    if not slashed:
        try:
            _write_in_memory(_skeleton(groups, stat_names, scanpy_format=True))
            return True
        except Exception as err:  # anndata and h5py raise several types for a layout they cannot write
            first_error = err
    else:
        first_error = None
    scanpy_fits = first_error is None or TOO_MANY_FIELDS not in str(first_error)
    if not scanpy_fits:  # too many perturbations for scanpy's record arrays: the layers alone must fit
        try:
            _write_in_memory(_skeleton(groups, stat_names, scanpy_format=False))
            return False
        except Exception as err:
            first_error = err
    bad = list(slashed)
    for g in groups:
        if "/" in g:
            continue
        try:
            _write_in_memory(_skeleton([g], stat_names, scanpy_format=scanpy_fits))
        except Exception as err:
            bad.append(f"{g!r} ({type(err).__name__}: {str(err).splitlines()[0][:80]})")
    if bad:
        raise ValueError(
            f"obs[{perturbation_column!r}] has label(s) whose results cannot be written to .h5ad: "
            f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; names such as 'dtype' and '_index', or "
            "with a '/', clash with the file's layout. Rename them"
        )
    if first_error is not None:  # no label fails alone; together they do
        raise ValueError(
            f"the results of the labels in obs[{perturbation_column!r}] cannot be written to .h5ad "
            f"({type(first_error).__name__}: {first_error}); rename the labels"
        ) from first_error
    return scanpy_fits


def write_significant(results, path, *, max_pval_adj: float = 0.05, rows_per_block: int = 256) -> pd.Series:
    """Write the tidy table of significant (perturbation, gene) pairs from a results store, block by block.

    The rows of :func:`tidy` with ``pvals_adj < max_pval_adj``, for results
    of any size: read from the ``.zarr`` store ``rows_per_block``
    perturbations at a time, never whole. ``pertscale run`` writes its
    ``de_<method>_significant.csv`` with it. The file is written beside
    ``path`` and renamed into place (an interrupted call leaves the old one).

    Parameters
    ----------
    results
        Path of a results ``.zarr`` store (as :func:`pertscale.write` writes one).
    path
        The ``.csv`` to write: columns ``perturbation, gene, logfoldchanges
        (log2), scores, pvals, pvals_adj`` (as :func:`tidy`); the
        perturbations in results order, each one's genes by adjusted
        p-value, then name.
    max_pval_adj
        Rows with ``pvals_adj < max_pval_adj`` are written.
    rows_per_block
        Perturbations read at a time: memory is bounded by this many rows of
        the statistics, whatever the number of perturbations.

    Returns
    -------
    pandas.Series
        Significant genes per perturbation (``n_de_genes``, indexed by ``perturbation``).

    Raises
    ------
    ValueError
        If ``max_pval_adj`` is not a number in ``[0, 1]``.
    """
    import zarr

    max_pval_adj = check_number(max_pval_adj, "max_pval_adj", minimum=0, maximum=1)
    group = zarr.open_group(str(results), mode="r")
    obs_names = np.asarray(ad.io.read_elem(group["obs"]).index)
    var_names = np.asarray(ad.io.read_elem(group["var"]).index)
    layers = {name: group["layers"][name] for name in TIDY_STATISTICS}
    counts = np.zeros(obs_names.size, dtype=np.int64)
    with replacing(path) as tmp, open(tmp, "w", newline="") as handle:
        pd.DataFrame(columns=list(TIDY_COLUMNS)).to_csv(handle, index=False)
        for a in range(0, obs_names.size, rows_per_block):
            b = min(a + rows_per_block, obs_names.size)
            values = {name: arr[a:b] for name, arr in layers.items()}
            hit = values[PVALS_ADJ] < max_pval_adj
            counts[a:b] = hit.sum(axis=1)
            g, j = np.nonzero(hit)
            block = pd.DataFrame(
                {PERTURBATION: obs_names[a:b][g], GENE: var_names[j], **{c: v[g, j] for c, v in values.items()}}
            )
            block = block.sort_values([PVALS_ADJ, GENE], kind="stable")
            block = block.iloc[np.argsort(g[block.index.to_numpy()], kind="stable")]
            block.to_csv(handle, index=False, header=False)
    return pd.Series(counts, index=pd.Index(obs_names, name=PERTURBATION), name=N_DE_GENES)

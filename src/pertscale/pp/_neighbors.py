"""Neighbors graph and UMAP of the in-memory embedding, through scanpy (pynndescent, umap-learn)."""

from __future__ import annotations

from functools import cache

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._validation import check_number


def _scanpy():
    try:
        import scanpy as sc
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "neighbors and UMAP run through scanpy (pynndescent, umap-learn): pip install 'pertscale[embedding]'"
        ) from err
    return sc


def _embedding(adata: ad.AnnData, use_rep: str) -> np.ndarray:
    """The embedding in memory: a lazy one (PCA's scores) is computed (plain ``dask.compute``: it is small)."""
    if use_rep not in adata.obsm:
        raise KeyError(f"obsm[{use_rep!r}] not found (obsm holds {list(adata.obsm)}); run ps.pp.pca first")
    rep = adata.obsm[use_rep]
    if isinstance(rep, da.Array):
        (rep,) = dask.compute(rep)
    rep = np.asarray(rep)
    if not np.isfinite(rep).all():
        raise ValueError(f"obsm[{use_rep!r}] holds NaN or infinite values")
    return rep


@cache
def _pynndescent_csr_matrix() -> type:
    """The class of pynndescent's transformer, returning a ``scipy.sparse.csr_matrix`` (0.7 returns a ``csr_array``)."""
    from pynndescent import PyNNDescentTransformer

    class PyNNDescentCSRMatrix(PyNNDescentTransformer):
        def transform(self, X, y=None):
            return sp.csr_matrix(super().transform(X, y))

    return PyNNDescentCSRMatrix


def _transformer(n_obs: int, *, n_neighbors: int, metric: str, random_state: int, n_jobs):
    """The approximate search scanpy makes for large data, as an instance whose output scanpy can read; or ``None``.

    From 4,096 cells (8,192 with the euclidean metric) ``scanpy.pp.neighbors``
    searches with pynndescent, whose 0.7 release returns a ``csr_array``;
    scanpy up to 1.11.5 calls ``getnnz`` on it, which scipy 1.17 removed
    from sparse arrays (``AttributeError``). This is the transformer scanpy
    1.10-1.11 builds there (the same settings: umap's ``n_trees`` and
    ``n_iters``), returning a ``csr_matrix``, so the graph is scanpy's with
    every allowed pynndescent and scipy. Below those sizes scanpy searches
    exactly (scikit-learn) and needs nothing: ``None``.
    """
    if n_obs < 4096 or (metric == "euclidean" and n_obs < 8192):
        return None
    return _pynndescent_csr_matrix()(
        n_neighbors=n_neighbors,
        metric=metric,
        metric_kwds={},
        random_state=random_state,
        n_jobs=n_jobs,
        n_trees=min(64, 5 + round(n_obs**0.5 / 20.0)),
        n_iters=max(5, round(np.log2(n_obs))),
    )


def _light(adata: ad.AnnData, obsm: dict) -> ad.AnnData:
    """An AnnData of the cells only (no matrix), holding what scanpy needs."""
    return ad.AnnData(
        obs=pd.DataFrame(index=adata.obs_names),
        obsm=obsm,
        uns={k: adata.uns[k] for k in ("neighbors",) if k in adata.uns},
    )


def neighbors(
    adata: ad.AnnData,
    *,
    n_neighbors: int = 15,
    n_pcs: int | None = None,
    use_rep: str = "X_pca",
    metric: str = "euclidean",
    random_state: int = 0,
) -> None:
    """The k-nearest-neighbor graph of cells on an embedding (``obsm['X_pca']``), as ``scanpy.pp.neighbors``.

    Computes the embedding (``obsm[use_rep]``, cells x components) if it is
    lazy, with plain ``dask.compute``; the graph is scanpy's, in memory.

    The embedding (``n_obs x n_comps``, a few hundred bytes per cell) is
    computed into memory if it is lazy; the graph is scanpy's own
    (pynndescent for large data, UMAP's fuzzy connectivities, McInnes et
    al. 2018), so scanpy's plots and ``scanpy.tl.leiden`` read the output.

    Parameters
    ----------
    adata
        Cells with ``obsm[use_rep]``.
    n_neighbors
        Neighbors per cell (the cell itself included, as scanpy counts).
    n_pcs
        Use the first ``n_pcs`` columns of the embedding; ``None``: all.
    use_rep
        Key of ``obsm`` holding the embedding.
    metric
        Distance (any metric scanpy accepts; euclidean by default).
    random_state
        Seed of the approximate search.

    Returns
    -------
    None
        Writes ``obsp['distances']``, ``obsp['connectivities']`` (sparse
        ``n_obs x n_obs``) and ``uns['neighbors']``, in scanpy's layout.

    Raises
    ------
    KeyError
        If ``obsm[use_rep]`` is missing.
    ValueError
        If ``n_neighbors`` is not a whole number in ``[2, n_obs]``, or the
        embedding holds non-finite values.
    ImportError
        If scanpy is not installed (``pip install 'pertscale[embedding]'``).
    """
    sc = _scanpy()
    n_neighbors = check_number(n_neighbors, "n_neighbors", integer=True, minimum=2, maximum=max(2, adata.n_obs))
    rep = _embedding(adata, use_rep)
    light = _light(adata, {use_rep: rep})
    sc.pp.neighbors(
        light,
        n_neighbors=n_neighbors,
        n_pcs=n_pcs,
        use_rep=use_rep,
        metric=metric,
        random_state=random_state,
        transformer=_transformer(
            adata.n_obs, n_neighbors=n_neighbors, metric=metric, random_state=random_state, n_jobs=sc.settings.n_jobs
        ),
    )
    adata.obsp["distances"] = light.obsp["distances"]
    adata.obsp["connectivities"] = light.obsp["connectivities"]
    adata.uns["neighbors"] = light.uns["neighbors"]


def umap(adata: ad.AnnData, *, min_dist: float = 0.5, spread: float = 1.0, random_state: int = 0) -> None:
    """UMAP of the cells from the neighbors graph (McInnes et al. 2018), as ``scanpy.tl.umap``.

    Parameters
    ----------
    adata
        Cells with the graph of :func:`neighbors` and its embedding.
    min_dist, spread
        UMAP's layout parameters (scanpy's defaults).
    random_state
        Seed of the layout.

    Returns
    -------
    None
        Writes ``obsm['X_umap']`` (``n_obs x 2`` float32) and ``uns['umap']``.

    Raises
    ------
    KeyError
        If :func:`neighbors` has not been run.
    ImportError
        If scanpy is not installed.
    """
    sc = _scanpy()
    if "neighbors" not in adata.uns or "connectivities" not in adata.obsp:
        raise KeyError("no neighbors graph (uns['neighbors'], obsp['connectivities']); run ps.pp.neighbors first")
    use_rep = adata.uns["neighbors"].get("params", {}).get("use_rep", "X_pca")
    light = _light(adata, {use_rep: _embedding(adata, use_rep)})
    light.obsp["distances"] = adata.obsp["distances"]
    light.obsp["connectivities"] = adata.obsp["connectivities"]
    sc.tl.umap(light, min_dist=min_dist, spread=spread, random_state=random_state)
    adata.obsm["X_umap"] = light.obsm["X_umap"]
    adata.uns["umap"] = light.uns["umap"]

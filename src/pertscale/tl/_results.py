"""Results AnnData for perturbation x gene statistics, and views of it."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .._validation import unique_var_names


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


def results_anndata(
    stats: np.ndarray,
    stat_names: tuple[str, ...],
    *,
    groups: list[str],
    var: pd.DataFrame,
    n_cells: np.ndarray,
    settings: dict[str, Any],
) -> ad.AnnData:
    """Assemble the ``n_perturbations x n_genes`` results AnnData.

    Parameters
    ----------
    stats
        ``(n_groups, len(stat_names), n_genes)`` float64.
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
    obs = pd.DataFrame({"n_cells": np.asarray(n_cells, dtype=np.int64)}, index=pd.Index(groups, name="perturbation"))
    var = unique_var_names(var[[c for c in ("original_var_name",) if c in var.columns]].copy())
    var.index.name = "gene"
    layers = {name: np.ascontiguousarray(stats[:, i, :]) for i, name in enumerate(stat_names)}
    res = ad.AnnData(obs=obs, var=var, layers=layers)
    res.uns["pertscale"] = {"settings": clean_settings(settings)}
    return res


def scanpy_uns(results: ad.AnnData, *, key: str = "rank_genes_groups") -> None:
    """Add Scanpy's ``uns['rank_genes_groups']`` to a results AnnData.

    Afterwards ``scanpy.get.rank_genes_groups_df(results, group)`` works on it.
    Genes are ranked per perturbation by descending score, as scanpy does.
    """
    s = results.uns["pertscale"]["settings"]
    groups = list(results.obs_names)
    genes = np.asarray(results.var_names)
    scores = results.layers["scores"]
    order = np.argsort(-scores, axis=1, kind="stable")

    def rec(values: np.ndarray, dtype) -> np.recarray:
        cols = [np.take(values[g], order[g]) for g in range(len(groups))]
        return np.rec.fromarrays(cols, dtype=[(g, dtype) for g in groups])

    out: dict[str, Any] = {
        "params": {
            "groupby": s["perturbation_column"],
            "reference": s["control_label"],
            "method": s["method"],
            "use_raw": False,
            "layer": s.get("layer", "X"),
            "corr_method": s["corr_method"],
        },
        "names": rec(np.broadcast_to(genes, scores.shape), object),
    }
    for name in ("scores", "logfoldchanges", "pvals", "pvals_adj"):
        out[name] = rec(results.layers[name], "float32" if name in ("scores", "logfoldchanges") else "float64")
    out["pts"] = pd.DataFrame(results.layers["pts"].T, index=genes, columns=groups)
    out["pts_rest"] = pd.DataFrame(results.layers["pts_rest"].T, index=genes, columns=groups)
    results.uns[key] = out


def tidy(results: ad.AnnData, *, max_pval_adj: float | None = None) -> pd.DataFrame:
    """Long table: one row per (perturbation, gene).

    Columns ``perturbation, gene, logfoldchange, score, pval, pval_adj``,
    sorted by perturbation then adjusted p-value. ``max_pval_adj`` keeps
    rows with ``pval_adj < max_pval_adj``.
    """
    n_groups, n_genes = results.shape
    df = pd.DataFrame(
        {
            "perturbation": np.repeat(np.asarray(results.obs_names), n_genes),
            "gene": np.tile(np.asarray(results.var_names), n_groups),
            "logfoldchange": results.layers["logfoldchanges"].ravel(),
            "score": results.layers["scores"].ravel(),
            "pval": results.layers["pvals"].ravel(),
            "pval_adj": results.layers["pvals_adj"].ravel(),
        }
    )
    if max_pval_adj is not None:
        df = df[df["pval_adj"] < max_pval_adj]
    return df.sort_values(["perturbation", "pval_adj", "gene"], kind="stable").reset_index(drop=True)

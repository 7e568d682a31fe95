"""Plots of pertscale's results (matplotlib), read lazily from results in memory or on disk.

Each plot returns its matplotlib ``Axes`` (or ``Figure`` for a panel of
axes), takes ``ax=`` where it draws one axes, and saves with ``save=PATH``.
Keyword names follow scanpy's where scanpy has the same plot.

Differential expression (a result of :func:`pertscale.tl.rank_genes_groups`,
a ``de_*.zarr``/``.h5ad`` path, or an ``xarray.Dataset`` of
:func:`pertscale.get.dataset`): :func:`volcano`, :func:`ma`,
:func:`top_genes_bar`, :func:`rank_genes_groups` (one perturbation's row
each), :func:`de_genes_per_perturbation`, :func:`de_heatmap`,
:func:`de_counts` (screen-wide, from a blockwise reduction),
:func:`knockdown`, :func:`knockdown_table` (one element per perturbation),
:func:`overlap_heatmap`.

QC, embeddings and the run (a :class:`pertscale.pp.QCSummary`, an AnnData,
or a ``pertscale run`` output directory): :func:`qc_metrics`,
:func:`qc_perturbation_counts`, :func:`qc_summary`, :func:`pca`,
:func:`umap`, :func:`embedding`, :func:`pca_variance_ratio`,
:func:`pca_loadings`, :func:`profile`.

Screen-level analyses: :func:`calibration_qq` (a
:func:`pertscale.tl.calibration_check` result or a run's
``calibration_pvalues.parquet``), :func:`energy_distance_ranking` (the
table of :func:`pertscale.tl.energy_distance`).

matplotlib is imported when a plot is drawn, not with ``import pertscale``.
"""

from importlib import import_module

_WHERE = {
    **dict.fromkeys(
        (
            "volcano",
            "ma",
            "top_genes_bar",
            "rank_genes_groups",
            "de_counts",
            "de_genes_per_perturbation",
            "de_heatmap",
            "knockdown",
            "knockdown_table",
            "overlap_heatmap",
        ),
        "._de",
    ),
    **dict.fromkeys(("qc_metrics", "qc_perturbation_counts", "qc_summary"), "._qc"),
    **dict.fromkeys(("pca", "umap", "embedding", "pca_variance_ratio", "pca_loadings"), "._embedding"),
    "profile": "._profile",
    "calibration_qq": "._calibration",
    "energy_distance_ranking": "._energy",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'pertscale.pl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})

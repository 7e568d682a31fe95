"""Tools: differential expression of perturbations against control, overlap of gene sets, UMAP."""

from ..pp._neighbors import umap
from ._nbglm import (
    dispersions,
    fit_dispersion_prior,
    fit_dispersion_trend,
    fit_genewise_dispersions,
    fit_map_dispersions,
)
from ._overlap import compute_overlap
from ._rank_genes_groups import rank_genes_groups
from ._results import scanpy_uns, tidy

__all__ = [
    "compute_overlap",
    "dispersions",
    "fit_dispersion_prior",
    "fit_dispersion_trend",
    "fit_genewise_dispersions",
    "fit_map_dispersions",
    "rank_genes_groups",
    "scanpy_uns",
    "tidy",
    "umap",
]

"""Tools: differential expression of perturbations against control, overlap of gene sets, UMAP."""

from ..pp._neighbors import umap
from ._nbglm import dispersions
from ._overlap import compute_overlap
from ._rank_genes_groups import rank_genes_groups
from ._results import scanpy_uns, tidy

__all__ = ["compute_overlap", "dispersions", "rank_genes_groups", "scanpy_uns", "tidy", "umap"]

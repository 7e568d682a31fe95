"""Tools: differential expression of perturbations against control."""

from ._nbglm import dispersions
from ._rank_genes_groups import rank_genes_groups
from ._results import scanpy_uns, tidy

__all__ = ["dispersions", "rank_genes_groups", "scanpy_uns", "tidy"]

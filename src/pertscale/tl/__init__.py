"""Tools: differential expression of perturbations against control."""

from ._rank_genes_groups import rank_genes_groups
from ._results import scanpy_uns, tidy

__all__ = ["rank_genes_groups", "scanpy_uns", "tidy"]

"""Tools: differential expression of perturbations against control."""

from ._results import scanpy_uns, tidy
from ._wilcoxon import rank_genes_groups

__all__ = ["rank_genes_groups", "scanpy_uns", "tidy"]

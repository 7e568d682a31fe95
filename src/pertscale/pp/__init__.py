"""Preprocessing: guides, QC, normalization, size factors, highly variable genes and PCA over row blocks; neighbors."""

from ._guides import assign_guides
from ._hvg import highly_variable_genes
from ._neighbors import neighbors
from ._normalize import log1p, normalize_total
from ._pca import pca
from ._qc import (
    DEFAULT_EXCLUDE,
    calculate_qc_metrics,
    filter_cells,
    filter_genes,
    filter_perturbations,
    mitochondrial_genes,
    qc_pass,
)
from ._qc_summary import QCSummary, QCThresholds, adaptive_qc_thresholds, qc_summary
from ._size_factors import size_factors

__all__ = [
    "DEFAULT_EXCLUDE",
    "QCSummary",
    "QCThresholds",
    "adaptive_qc_thresholds",
    "assign_guides",
    "calculate_qc_metrics",
    "filter_cells",
    "filter_genes",
    "filter_perturbations",
    "highly_variable_genes",
    "log1p",
    "mitochondrial_genes",
    "neighbors",
    "normalize_total",
    "pca",
    "qc_pass",
    "qc_summary",
    "size_factors",
]

"""Preprocessing: quality control, normalization and size factors, streaming over row blocks."""

from ._normalize import log1p, normalize_total
from ._qc import (
    DEFAULT_EXCLUDE,
    calculate_qc_metrics,
    filter_cells,
    filter_genes,
    filter_perturbations,
    mitochondrial_genes,
    qc_pass,
)
from ._size_factors import size_factors

__all__ = [
    "DEFAULT_EXCLUDE",
    "calculate_qc_metrics",
    "filter_cells",
    "filter_genes",
    "filter_perturbations",
    "log1p",
    "mitochondrial_genes",
    "normalize_total",
    "qc_pass",
    "size_factors",
]

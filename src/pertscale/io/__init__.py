"""Reading and writing AnnData stores, and the perturbation-sorted working store."""

from ._blocks import DamagedStoreError
from ._convert import convert
from ._infer import (
    detect_control_label,
    detect_gene_symbol_column,
    detect_perturbation_column,
    infer_columns,
    normalise_perturbation_labels,
)
from ._prepare import open_prepared, prepare
from ._read import auto_chunk_size, open, read
from ._write import write

__all__ = [
    "DamagedStoreError",
    "auto_chunk_size",
    "convert",
    "detect_control_label",
    "detect_gene_symbol_column",
    "detect_perturbation_column",
    "infer_columns",
    "normalise_perturbation_labels",
    "open",
    "open_prepared",
    "prepare",
    "read",
    "write",
]

"""Reading and writing AnnData stores, and the perturbation-sorted working store."""

from ._blocks import DamagedStoreError
from ._prepare import open_prepared, prepare
from ._read import auto_chunk_size, open, read
from ._write import write

__all__ = ["DamagedStoreError", "auto_chunk_size", "open", "open_prepared", "prepare", "read", "write"]

"""Reading and writing AnnData stores."""

from ._blocks import DamagedStoreError
from ._read import auto_chunk_size, read
from ._write import write

__all__ = ["DamagedStoreError", "auto_chunk_size", "read", "write"]

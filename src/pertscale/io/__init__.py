"""Reading and writing AnnData stores."""

from ._read import auto_chunk_size, read
from ._write import write

__all__ = ["auto_chunk_size", "read", "write"]

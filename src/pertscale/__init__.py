"""pertscale: a Dask-distributed, out-of-core engine for single-cell CRISPR screens.

>>> import pertscale as ps
>>> adata = ps.read("screen.h5ad")                      # lazy
>>> ps.pp.normalize_total(adata); ps.pp.log1p(adata)    # lazy, blockwise
>>> de = ps.tl.rank_genes_groups(adata, "perturbation", "control")
"""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, pp, tl
from ._pipeline import run
from ._settings import settings
from .io import read, write

try:
    __version__ = version("pertscale")
except PackageNotFoundError:  # pragma: no cover - not installed
    __version__ = "0+unknown"

__all__ = ["__version__", "datasets", "pp", "read", "run", "settings", "tl", "write"]

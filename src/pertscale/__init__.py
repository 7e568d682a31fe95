"""pertscale: a Dask-distributed, out-of-core engine for single-cell CRISPR screens.

>>> import pertscale as ps
>>> adata = ps.read("screen.h5ad")                      # lazy
>>> ps.pp.normalize_total(adata); ps.pp.log1p(adata)    # lazy, blockwise
>>> de = ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control")

Submodules and functions are imported on first use, so ``import pertscale``
(and ``pertscale --help``) does not wait for anndata, dask and numba.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("pertscale")
except PackageNotFoundError:  # pragma: no cover - not installed
    __version__ = "0+unknown"

_SUBMODULES = ("analysis", "cluster", "datasets", "get", "io", "pb", "pl", "pp", "store", "tl")
_FUNCTIONS = {
    "compute": "._compute",
    "open": ".io",
    "read": ".io",
    "write": "._compute",
    "run": ".job",
    "report": ".job",
    "settings": "._settings",
    "RunInfo": ".store",
    "cleanup": ".store",
    "ensure_result_keys": ".store",
    **{
        name: ".analysis"
        for name in (
            "WilcoxonSettings",
            "TTestSettings",
            "NBGLMSettings",
            "QCSettings",
            "HVGSettings",
            "PCASettings",
            "PseudobulkSettings",
        )
    },
}

__all__ = [
    "HVGSettings",
    "NBGLMSettings",
    "PCASettings",
    "PseudobulkSettings",
    "QCSettings",
    "RunInfo",
    "TTestSettings",
    "WilcoxonSettings",
    "__version__",
    "analysis",
    "cleanup",
    "cluster",
    "compute",
    "datasets",
    "ensure_result_keys",
    "get",
    "io",
    "open",
    "pb",
    "pl",
    "pp",
    "read",
    "report",
    "run",
    "settings",
    "store",
    "tl",
    "write",
]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    if name in _FUNCTIONS:
        return getattr(import_module(_FUNCTIONS[name], __name__), name)
    raise AttributeError(f"module 'pertscale' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES, *_FUNCTIONS})


if TYPE_CHECKING:  # pragma: no cover
    from . import analysis, cluster, datasets, get, io, pb, pl, pp, store, tl
    from ._compute import compute, write
    from ._settings import settings
    from .analysis import (
        HVGSettings,
        NBGLMSettings,
        PCASettings,
        PseudobulkSettings,
        QCSettings,
        TTestSettings,
        WilcoxonSettings,
    )
    from .io import open, read
    from .job import report, run
    from .store import RunInfo, cleanup, ensure_result_keys

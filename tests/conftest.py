"""Shared fixtures and parameter lists, as anndata's tests share theirs.

Real screens from ../shared/data and simulated screens; the array types
(:data:`ARRAY_TYPES`, :func:`as_array_type`) and schedulers
(:data:`SCHEDULERS`, the ``scheduler`` fixture; ``distributed`` on a
``LocalCluster`` behind the ``cluster`` marker) that every analysis's
reference test meets (tests/test_references.py); the one tolerance helper
(:func:`assert_close`); and a suite-wide guard, as sgkit's test mode, that
fails any test in which a function documented as lazy computes
(:data:`LAZY_FUNCTIONS`, :func:`lazy_guard`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp

import pertscale as ps

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(__import__("os").environ.get("PERTSCALE_DATA", ROOT.parent / "shared" / "data"))
REAL = {
    "papalexi": DATA_DIR / "papalexi2021_eccite.h5ad",
    "schraivogel": DATA_DIR / "schraivogel2020_tapseq.h5ad",
}


@pytest.fixture(autouse=True)
def _quiet():
    with ps.settings.override(progress=False):
        yield


def real_path(name: str) -> Path:
    path = REAL[name]
    if not path.exists():
        pytest.skip(f"real data {path.name} not found in {DATA_DIR} (set PERTSCALE_DATA to its folder)")
    return path


@pytest.fixture(params=sorted(REAL))
def real_screen(request) -> Path:
    return real_path(request.param)


@pytest.fixture(scope="session")
def sim_adata():
    """A small screen in random cell order: 3,000 cells x 300 genes, 12 perturbations."""
    return ps.datasets.simulate_screen(3_000, 300, 12, control_fraction=0.2, seed=7, n_affected=20)


@pytest.fixture(scope="session")
def sim_h5ad(sim_adata, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sim") / "screen.h5ad"
    sim_adata.write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def cluster_client():
    """A LocalCluster with 2 single-threaded worker processes."""
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=50
    )
    client = distributed.Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


def assert_close(actual, expected, *, rtol=1e-10, atol=0.0, err_msg=""):
    """NaN pattern first, then relative error (the one tolerance helper)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shapes differ: {actual.shape} vs {expected.shape} {err_msg}"
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    assert (nan_a == nan_e).all(), f"NaN pattern differs at {np.argwhere(nan_a != nan_e)[:5].tolist()} {err_msg}"
    np.testing.assert_allclose(actual[~nan_a], expected[~nan_e], rtol=rtol, atol=atol, err_msg=err_msg)


# --------------------------------------------------------------------------------------------- array types

#: Every kind of matrix an analysis meets: in memory (numpy, CSR, CSC), Dask (dense and CSR row blocks of
#: :data:`CHUNK_ROWS` rows), and read lazily with ``ps.read`` from ``.h5ad`` and ``.zarr``.
ARRAY_TYPES = ("numpy", "csr", "csc", "dask-dense", "dask-csr", "h5ad", "zarr")

#: Rows per block of the Dask and file-backed types: blocks that split perturbation groups.
CHUNK_ROWS = 97


def as_array_type(adata: ad.AnnData, kind: str, directory: Path, *, chunk_rows: int = CHUNK_ROWS) -> ad.AnnData:
    """A copy of ``adata`` (its ``X`` in memory) whose ``X`` is of array type ``kind`` (see :data:`ARRAY_TYPES`).

    The file-backed types are written once into ``directory`` (as ``screen.h5ad`` / ``screen.zarr``) and
    read with ``ps.read``; the in-memory and Dask types are built from a CSR copy of ``X``.
    """
    a = adata.copy()
    x = sp.csr_matrix(a.X)
    if kind in ("h5ad", "zarr"):
        path = Path(directory) / f"screen.{kind}"
        if not path.exists():
            a.X = x
            if kind == "h5ad":
                a.write_h5ad(path)
            else:  # zarr v3 without consolidated metadata (anndata's write_zarr warns of both)
                import zarr

                with ad.settings.override(auto_shard_zarr_v3=False):
                    ad.io.write_elem(zarr.open_group(str(path), mode="w", zarr_format=3), "/", a)
        return ps.read(path, chunk_size=chunk_rows)
    if kind == "numpy":
        a.X = x.toarray()
    elif kind == "csr":
        a.X = x
    elif kind == "csc":
        a.X = sp.csc_matrix(x)
    elif kind == "dask-dense":
        a.X = da.from_array(x.toarray(), chunks=(chunk_rows, -1))
    elif kind == "dask-csr":
        a.X = da.from_array(x, chunks=(chunk_rows, -1), asarray=False)
    else:
        raise ValueError(f"array type {kind!r} is not known; choose one of {ARRAY_TYPES}")
    return a


@pytest.fixture(params=ARRAY_TYPES)
def array_type(request) -> str:
    """Each of :data:`ARRAY_TYPES` in turn."""
    return request.param


# ---------------------------------------------------------------------------------------------- schedulers

#: Every scheduler the face computes on; ``distributed`` is the ``cluster_client`` LocalCluster.
SCHEDULERS = ("synchronous", "threads", "processes", pytest.param("distributed", marks=pytest.mark.cluster))


@pytest.fixture(scope="session")
def process_pool():
    """Two worker processes for Dask's ``processes`` scheduler, started once (not for every computation)."""
    import multiprocessing

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@pytest.fixture(params=SCHEDULERS)
def scheduler(request):
    """Each of :data:`SCHEDULERS` in turn, as the face takes it: a name, or the LocalCluster's client.

    Pass it to the face: ``ps.compute(..., scheduler=scheduler)`` or
    ``with ps.cluster.using(scheduler):`` around an analysis that computes.
    """
    if request.param == "distributed":
        yield request.getfixturevalue("cluster_client")
    elif request.param == "processes":
        with dask.config.set(pool=request.getfixturevalue("process_pool")):
            yield "processes"
    else:
        yield request.param


# ------------------------------------------------------------------------------- the guard against computing


class HiddenCompute(BaseException):
    """A function documented as lazy computed (a ``BaseException``: no ``except Exception`` hides it)."""


#: Public functions documented as lazy: while one of them runs, a Dask scheduler that raises
#: :class:`HiddenCompute` is installed (``dask.config.set(scheduler=...)``), so a computation hidden in the
#: building of a graph fails the test that called it. Each entry: the module that exports it, the name
#: (``Class.method`` for a method), and ``None`` or a predicate of the call's arguments saying when the call
#: is lazy. Analyses that compute a reduction they need to build their next graph, and say so in their
#: docstrings, are not listed: pca, highly_variable_genes, calculate_qc_metrics, filter_cells,
#: filter_genes, qc_summary, adaptive_qc_thresholds, size_factors, dispersions and the nb-glm steps,
#: pseudobulk, and normalize_total with ``target_sum=None`` (the median).
LAZY_FUNCTIONS = (
    ("pertscale.io", "read", None),
    ("pertscale.io", "open_prepared", None),
    ("pertscale.pp", "normalize_total", lambda a: a["target_sum"] is not None),
    ("pertscale.pp", "log1p", None),
    ("pertscale.pp", "filter_perturbations", None),
    ("pertscale.pp", "QCSummary.apply", None),
    ("pertscale.tl", "rank_genes_groups", lambda a: a["method"] in ("wilcoxon", "t-test", "t-test_overestim_var")),
    ("pertscale.pb", "log_fold_change", None),
    ("pertscale.get", "dataset", None),
)

#: Modules whose attributes are replaced when they are the lazy function itself (``ps.read is ps.io.read``).
_EXPORTERS = ("pertscale", "pertscale.io", "pertscale.pp", "pertscale.tl", "pertscale.pb", "pertscale.get")


def _refuse(name: str):
    def scheduler(dsk, keys, **kwargs):
        raise HiddenCompute(
            f"{name} is documented as lazy but computed while it built its graph: return the lazy result and "
            "let the face (ps.compute, ps.write, the caller) compute it, or, if it needs a reduction, say so in "
            "its docstring and remove it from LAZY_FUNCTIONS in tests/conftest.py"
        )

    return scheduler


def lazy_guard(func, *, name: str | None = None, when=None):
    """``func`` wrapped so that any Dask computation during its call raises :class:`HiddenCompute`.

    ``when(arguments)`` (the call's bound arguments, defaults applied)
    says whether this call is lazy; other calls run unguarded.
    """
    name = name or getattr(func, "__qualname__", repr(func))
    signature = inspect.signature(func)

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        if when is not None:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:  # a wrong call: the function says so itself
                return func(*args, **kwargs)
            bound.apply_defaults()
            if not when(bound.arguments):
                return func(*args, **kwargs)
        with dask.config.set(scheduler=_refuse(name)):
            return func(*args, **kwargs)

    # a warning that func attributes to its caller (stacklevel=2) names func's own file, as unguarded: the
    # command line shows pertscale's warnings by their file (cli.py), and the guard must not change what it shows
    source = inspect.getsourcefile(inspect.unwrap(func))
    if source:
        guarded.__code__ = guarded.__code__.replace(co_filename=source)
    guarded.lazy_guard = True
    return guarded


@functools.cache
def _lazy_targets() -> tuple:
    """``(owner, attribute, guarded)`` for every place a lazy function is found, resolved once (unpatched)."""
    targets = []
    for module_name, name, when in LAZY_FUNCTIONS:
        owner = importlib.import_module(module_name)
        *classes, attr = name.split(".")
        for cls in classes:
            owner = getattr(owner, cls)
        original = vars(owner)[attr] if classes else getattr(owner, attr)
        guarded = lazy_guard(original, name=f"{module_name.replace('pertscale', 'ps')}.{name}", when=when)
        if classes:
            targets.append((owner, attr, guarded))
            continue
        homes = {*_EXPORTERS, original.__module__}
        for home in sorted(homes):
            module = importlib.import_module(home)
            if getattr(module, attr, None) is original:
                targets.append((module, attr, guarded))
    return tuple(targets)


@pytest.fixture(autouse=True)
def _no_hidden_compute(monkeypatch):
    """Every test runs with the lazy functions guarded (:data:`LAZY_FUNCTIONS`)."""
    for owner, attr, guarded in _lazy_targets():
        monkeypatch.setattr(owner, attr, guarded)
    yield

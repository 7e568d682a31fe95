"""Shared fixtures: real screens from ../shared/data, simulated screens, a LocalCluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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

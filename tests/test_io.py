"""Lazy reading and atomic writing."""

from __future__ import annotations

import pickle

import anndata as ad
import dask
import dask.array as da
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

import pertscale as ps
from pertscale.io import auto_chunk_size

from .conftest import real_path


def _same_matrix(lazy, expected):
    got = lazy.compute(scheduler="synchronous")
    assert sp.issparse(got) and got.format == "csr"
    expected = sp.csr_matrix(expected)
    assert got.shape == expected.shape
    assert (got != expected).nnz == 0


def test_read_h5ad_is_lazy_and_equal(real_screen):
    adata = ps.read(real_screen, chunk_size=3_000)
    ref = ad.read_h5ad(real_screen)
    assert isinstance(adata.X, da.Array)
    assert adata.X.chunks[0][0] == 3_000 and adata.X.numblocks[1] == 1
    assert sp.issparse(adata.X._meta)
    assert adata.X.dtype == ref.X.dtype  # counts stay integers
    assert adata.obs.equals(ref.obs) and adata.var.equals(ref.var)
    _same_matrix(adata.X, ref.X)
    # the graph carries paths, not open handles: it pickles and runs elsewhere
    pickle.loads(pickle.dumps(adata.X.dask))


def test_read_zarr_dense_and_layer(sim_adata, tmp_path):
    a = sim_adata.copy()
    a.layers["counts"] = a.X.copy()
    ps.write(a, tmp_path / "s.zarr")
    z = ps.read(tmp_path / "s.zarr", chunk_size=700)
    _same_matrix(z.X, sim_adata.X)
    assert ps.read(tmp_path / "s.zarr", layer="counts").uns["pertscale"]["source"]["layer"] == "counts"
    with pytest.raises(ValueError, match="layer 'nope' not found.*counts"):
        ps.read(tmp_path / "s.zarr", layer="nope")
    dense = sim_adata.copy()
    dense.X = dense.X.toarray()
    dense.write_h5ad(tmp_path / "dense.h5ad")
    d = ps.read(tmp_path / "dense.h5ad", chunk_size=1000)
    assert sp.issparse(d.X._meta)
    _same_matrix(d.X, sim_adata.X)


def test_read_csc(sim_adata, tmp_path):
    a = sim_adata.copy()
    a.X = sp.csc_matrix(a.X)
    a.write_h5ad(tmp_path / "csc.h5ad")
    x = ps.read(tmp_path / "csc.h5ad", chunk_size=800).X
    assert x.numblocks[1] == 1
    _same_matrix(x, sim_adata.X)


def test_read_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        ps.read(tmp_path / "missing.h5ad")
    text = tmp_path / "notes.h5ad"
    text.write_text("not hdf5")
    with pytest.raises(ValueError, match="not an AnnData store.*not an HDF5 file"):
        ps.read(text)
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(ValueError, match="not an AnnData store.*'obs'"):
        ps.read(tmp_path / "plain.h5")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="not an AnnData store"):
        ps.read(tmp_path / "empty_dir")
    with pytest.raises(ValueError, match="chunk_size"):
        ps.read(real_path("papalexi"), chunk_size=0)


def test_auto_chunk_size_follows_memory():
    gib = 1 << 30
    small = auto_chunk_size(2_000_000, 4_000, n_workers=2, available_bytes=1 * gib)
    large = auto_chunk_size(2_000_000, 4_000, n_workers=2, available_bytes=64 * gib)
    assert 1_000 <= small < large <= 250_000  # at least four blocks per worker
    assert auto_chunk_size(500, 4_000, n_workers=2) == 500  # tiny data: one block
    # the main job's model: memory_fraction of a worker's share holds six copies of a block
    assert small == int(ps.settings.memory_fraction * gib / 2 // (6 * 4_000))


def test_write_is_atomic_and_overwrites(sim_adata, tmp_path):
    for name in ("r.h5ad", "r.zarr"):
        target = tmp_path / name
        ps.write(sim_adata[:10].copy(), target)
        ps.write(sim_adata[:20].copy(), target)
        back = ad.read_h5ad(target) if name.endswith("h5ad") else ad.read_zarr(target)
        assert back.n_obs == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5ad", "r.zarr"]  # no temporaries left
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ps.write(sim_adata, tmp_path / "no" / "such" / "dir.h5ad")


def test_lazy_graph_does_not_compute_on_build(sim_h5ad, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a computation ran while only building graphs")

    # every way a computation could start: our helpers, dask.compute and Array.compute
    monkeypatch.setattr(dask, "compute", forbidden)
    monkeypatch.setattr(da.Array, "compute", forbidden)
    monkeypatch.setattr(ps.cluster, "compute", forbidden)
    a = ps.read(sim_h5ad)
    ps.pp.normalize_total(a)
    ps.pp.log1p(a)
    assert isinstance(a.X, da.Array) and a.X.dtype == np.float32
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="a computation ran"), monkeypatch.context() as m:
        m.setattr(dask, "compute", forbidden)
        ps.pp.calculate_qc_metrics(ps.read(sim_h5ad))  # the guard does catch a pass

"""Simulated screens."""

from __future__ import annotations

import numpy as np
import pytest

import pertscale as ps


def test_simulation_is_reproducible_and_shaped():
    a = ps.datasets.simulate_screen(2_000, 150, 8, control_fraction=0.25, seed=3)
    b = ps.datasets.simulate_screen(2_000, 150, 8, control_fraction=0.25, seed=3)
    c = ps.datasets.simulate_screen(2_000, 150, 8, control_fraction=0.25, seed=4)
    assert a.shape == (2_000, 150) and a.X.format == "csr" and a.X.dtype == np.int32
    assert (a.X != b.X).nnz == 0 and (a.X != c.X).nnz > 0
    counts = a.obs["perturbation"].value_counts()
    assert counts["control"] == 500 and len(counts) == 9
    assert a.var_names.str.startswith("MT-").sum() == 3
    effects = a.uns["simulation"]["log2_effects"]
    assert effects.shape == (8, 150)
    # realistic sparsity: most entries zero, but every cell has counts
    density = a.X.nnz / np.prod(a.shape)
    assert 0.05 < density < 0.8 and (np.diff(a.X.indptr) > 0).all()


def test_knockdown_visible_in_means():
    a = ps.datasets.simulate_screen(4_000, 100, 4, control_fraction=0.5, seed=1, n_affected=0, knockdown=(0.1, 0.1))
    x = a.X.toarray()
    size = x.sum(1, keepdims=True)
    labels = a.obs["perturbation"].astype(str).to_numpy()
    for p, gene in zip(a.uns["simulation"]["perturbations"], a.uns["simulation"]["targets"], strict=False):
        j = a.var_names.get_loc(gene)
        ratio = (x[labels == p, j] / size[labels == p, 0]).mean() / (
            x[labels == "control", j] / size[labels == "control", 0]
        ).mean()
        assert 0.05 < ratio < 0.2


def test_simulation_writes_files(tmp_path):
    for name in ("s.h5ad", "s.zarr"):
        path = ps.datasets.simulate_screen(500, 50, 3, path=tmp_path / name, sort=True)
        back = ps.read(path)
        assert back.shape == (500, 50)
        assert back.obs["perturbation"].iloc[0] == "control"  # sorted: control first


def test_simulation_rejects_impossible_designs():
    with pytest.raises(ValueError, match="n_perturbations"):
        ps.datasets.simulate_screen(100, 5, 0)


def test_more_perturbations_than_genes_share_targets():
    a = ps.datasets.simulate_screen(400, 20, 30, seed=1, n_affected=2)
    targets = a.uns["simulation"]["targets"]
    assert len(targets) == 30 and len(set(targets)) < 30  # 20 genes cannot give 30 distinct targets
    assert a.obs["perturbation"].nunique() == 31
    with pytest.raises(ValueError, match="control_fraction"):
        ps.datasets.simulate_screen(100, 50, 3, control_fraction=1.5)


def _read_store(path):
    import anndata as ad

    return ad.read_zarr(path) if str(path).endswith(".zarr") else ad.read_h5ad(path)


def _assert_same_screen(a, b):
    import pandas as pd

    assert a.shape == b.shape and a.X.dtype == b.X.dtype == np.int32
    np.testing.assert_array_equal(a.X.indptr, b.X.indptr)
    np.testing.assert_array_equal(a.X.indices, b.X.indices)
    np.testing.assert_array_equal(a.X.data, b.X.data)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    sa, sb = a.uns["simulation"], b.uns["simulation"]
    np.testing.assert_array_equal(sa["log2_effects"], sb["log2_effects"])
    assert sb["log2_effects"].dtype == np.float32
    for key in ("targets", "perturbations"):
        assert list(sa[key]) == list(sb[key])
    assert int(sa["seed"]) == int(sb["seed"])


SMALL = {"n_cells": 1_100, "n_genes": 120, "n_perturbations": 6, "control_fraction": 0.2, "seed": 5}


@pytest.mark.parametrize("name", ["s.h5ad", "s.zarr"])
def test_streamed_store_equals_in_memory_screen_and_never_stacks_blocks(tmp_path, monkeypatch, name):
    import scipy.sparse as sp

    memory = ps.datasets.simulate_screen(**SMALL)

    def no_vstack(*args, **kwargs):
        raise AssertionError("the streaming writer must not stack blocks")

    monkeypatch.setattr(sp, "vstack", no_vstack)
    monkeypatch.setattr(ps.datasets, "CHUNK_ELEMENTS", 1_000)  # many stored chunks: whole ones and buffered tails
    path = ps.datasets.simulate_screen(**SMALL, path=tmp_path / name, block_size=250)  # 5 blocks, the last short
    monkeypatch.undo()  # reading back may stack
    assert path == tmp_path / name and sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary left
    back = _read_store(path)
    _assert_same_screen(memory, back)
    assert back.X.indptr.dtype == np.int64 and back.X.indices.dtype == np.int32
    lazy = ps.read(path, chunk_size=400)
    assert (lazy.X.compute() != memory.X).nnz == 0


def test_screen_does_not_depend_on_block_size_or_n_jobs():
    one = ps.datasets.simulate_screen(**SMALL)
    _assert_same_screen(one, ps.datasets.simulate_screen(**SMALL, block_size=1))  # rounded up to 250 cells
    _assert_same_screen(one, ps.datasets.simulate_screen(**SMALL, block_size=500, n_jobs=2))


def test_parallel_streamed_store_equals_serial(tmp_path):
    path = ps.datasets.simulate_screen(**SMALL, path=tmp_path / "p.h5ad", block_size=250, n_jobs=2)
    _assert_same_screen(ps.datasets.simulate_screen(**SMALL), _read_store(path))


def test_streaming_memory_does_not_grow_with_cells(tmp_path, monkeypatch):
    import tracemalloc

    # stored chunks smaller than the matrices, so the write buffers (< one chunk) are alike at both sizes
    monkeypatch.setattr(ps.datasets, "CHUNK_ELEMENTS", 1 << 16)

    def peak_mb(n_cells):
        tracemalloc.start()
        try:
            ps.datasets.simulate_screen(n_cells, 300, 10, seed=2, path=tmp_path / f"{n_cells}.h5ad", block_size=500)
            return tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()

    peak_mb(500)  # imports and first-use caches
    small, large = peak_mb(4_000), peak_mb(16_000)
    x = _read_store(tmp_path / "16000.h5ad").X
    x_mb = (x.data.nbytes + x.indices.nbytes) / 2**20
    assert large < 1.3 * small + 2 and large < 0.6 * x_mb, (small, large, x_mb)


def test_failed_stream_leaves_no_store(tmp_path, monkeypatch):
    from pertscale import datasets

    real = datasets._simulate_block

    def fail_late(design, first, codes, library):
        if first > 0:
            raise RuntimeError("worker died")
        return real(design, first, codes, library)

    monkeypatch.setattr(datasets, "_simulate_block", fail_late)
    for name in ("f.h5ad", "f.zarr"):
        with pytest.raises(RuntimeError, match="worker died"):
            datasets.simulate_screen(**SMALL, path=tmp_path / name, block_size=250)
    assert list(tmp_path.iterdir()) == []


def test_expected_density_matches_simulation_and_inverts():
    a = ps.datasets.simulate_screen(1_000, 400, 5, seed=4, median_umi=3_000.0)
    expected = ps.datasets.expected_density(400, median_umi=3_000.0, seed=4)
    assert abs(a.X.nnz / np.prod(a.shape) - expected) < 0.01
    umi = ps.datasets.median_umi_for_density(0.38, 8_248)
    assert 10_000 < umi < 13_000
    assert ps.datasets.expected_density(8_248, median_umi=umi) == pytest.approx(0.38, abs=1e-6)


def test_simulation_rejects_bad_streaming_options(tmp_path):
    with pytest.raises(ValueError, match="block_size"):
        ps.datasets.simulate_screen(100, 50, 3, block_size=0)
    with pytest.raises(ValueError, match="n_jobs"):
        ps.datasets.simulate_screen(100, 50, 3, n_jobs=0)
    with pytest.raises(ValueError, match="density"):
        ps.datasets.median_umi_for_density(1.5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ps.datasets.simulate_screen(100, 50, 3, path=tmp_path / "missing" / "s.h5ad")

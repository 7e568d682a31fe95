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
        ps.datasets.simulate_screen(100, 5, 10)
    with pytest.raises(ValueError, match="control_fraction"):
        ps.datasets.simulate_screen(100, 50, 3, control_fraction=1.5)

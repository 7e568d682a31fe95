"""Relative paths mean the caller's working directory, also for the worker processes that write them.

A notebook changes directory after its cluster started (or the workers run
on other nodes): the paths handed to the workers must not be resolved in
their own working directory.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import pertscale as ps


@pytest.mark.cluster
def test_relative_outputs_land_in_the_callers_directory(tmp_path, monkeypatch):
    a = ps.datasets.simulate_screen(600, 30, 3, control_fraction=0.3, seed=4, n_affected=2)
    del a.uns["simulation"]
    a.write_h5ad(tmp_path / "in.h5ad")
    ps.cluster.local_client()  # workers started in the directory pytest runs in
    here = tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    with ps.cluster.using("local"):
        sorted_ = ps.io.prepare(
            tmp_path / "in.h5ad", perturbation_column="perturbation", control_label="control", out="sorted.zarr"
        )
    assert (here / "sorted.zarr" / "blocks" / "0").is_dir()
    ps.pp.normalize_total(sorted_)
    ps.pp.log1p(sorted_)
    de = ps.tl.rank_genes_groups(sorted_, perturbation_column="perturbation", control_label="control")
    ps.write(de, "de.zarr", scheduler="local")
    got = ad.read_zarr(here / "de.zarr")
    ref = ps.compute(de, scheduler="synchronous")
    assert list(got.obs_names) == list(ref.obs_names)
    np.testing.assert_array_equal(got.layers["scores"], ref.layers["scores"])

"""The main job's optional steps (--hvg, --pca, --pseudobulk) against scanpy on the same kept cells and genes."""

from __future__ import annotations

import hashlib
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

import pertscale as ps
from pertscale.cli import main

from .conftest import assert_close

sc = pytest.importorskip("scanpy")


@pytest.fixture(scope="module")
def steps_run(sim_h5ad, tmp_path_factory):
    out = tmp_path_factory.mktemp("steps") / "out"
    args = ["run", str(sim_h5ad), "--perturbation-column", "perturbation", "--control-label", "control"]
    flags = ["--out", str(out), "--scheduler", "synchronous", "--hvg", "60", "--pca", "8", "--pseudobulk"]
    result = CliRunner().invoke(main, [*args, *flags])
    assert result.exit_code == 0, result.output
    return out, result.output


def _kept(sim_h5ad, out):
    """The kept cells and genes of the run, in memory, as scanpy would hold them."""
    pca = ad.read_zarr(out / "pca.zarr")
    raw = ad.read_h5ad(sim_h5ad)
    return raw[pca.obs_names, pca.var_names].copy(), pca


def test_steps_write_their_files_and_report_their_time(steps_run):
    out, output = steps_run
    for name in ("genes.csv", "pca.zarr", "pseudobulk.h5ad", "de_wilcoxon.zarr", "qc.csv"):
        assert (out / name).exists(), name
    assert re.search(r"hvg [\d.]+ s, pca [\d.]+ s", output) and "pseudo-bulk" in output


def test_hvg_and_pca_steps_equal_scanpy_on_the_kept_cells(sim_h5ad, steps_run):
    out, _ = steps_run
    kept, pca = _kept(sim_h5ad, out)
    sc.pp.normalize_total(kept, target_sum=1e4)
    sc.pp.log1p(kept)
    sc.pp.highly_variable_genes(kept, flavor="seurat", n_top_genes=60)
    genes = pd.read_csv(out / "genes.csv", index_col="gene")
    np.testing.assert_array_equal(genes["highly_variable"].to_numpy(), kept.var["highly_variable"].to_numpy())
    np.testing.assert_array_equal(pca.var["highly_variable"].to_numpy(), kept.var["highly_variable"].to_numpy())
    kept.X = sp.csr_matrix(kept.X, dtype=np.float64)
    sc.pp.pca(kept, n_comps=8, svd_solver="arpack")  # on var['highly_variable'], as ours
    assert_close(pca.uns["pca"]["variance_ratio"], kept.uns["pca"]["variance_ratio"], rtol=1e-6)
    signs = np.sign((pca.varm["PCs"] * kept.varm["PCs"]).sum(0))
    np.testing.assert_allclose(pca.obsm["X_pca"] * signs, kept.obsm["X_pca"], atol=1e-4)


def test_pseudobulk_step_equals_scanpy_aggregate(sim_h5ad, steps_run):
    out, _ = steps_run
    kept, _ = _kept(sim_h5ad, out)
    bulk = ad.read_h5ad(out / "pseudobulk.h5ad")
    ref = sc.get.aggregate(kept, by="perturbation", func="sum")
    order = pd.Index(ref.obs_names).get_indexer(bulk.obs["perturbation"].astype(str))
    assert (order >= 0).all()
    assert_close(bulk.X, ref.layers["sum"][order], rtol=1e-12)
    control = np.flatnonzero(bulk.obs["perturbation"].astype(str) == "control")
    assert (bulk.layers["log2_fold_change"][control] == 0).all()
    assert np.isfinite(bulk.layers["log2_fold_change"]).all()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--hvg", "0"], "--hvg"),
        (["--pca", "0"], "--pca"),
        (["--hvg", "10", "--hvg-flavor", "pearson"], "--hvg-flavor"),
        (["--pca", "5000"], "n_comps=5000 must be below"),
    ],
)
def test_step_flags_are_checked(sim_h5ad, tmp_path, flags, message):
    before = hashlib.sha256(sim_h5ad.read_bytes()).hexdigest()
    args = ["run", str(sim_h5ad), "--perturbation-column", "perturbation", "--control-label", "control"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o"), "--scheduler", "synchronous", *flags])
    assert result.exit_code != 0
    assert message in result.output
    assert not (tmp_path / "o").exists()  # nothing left behind
    assert hashlib.sha256(sim_h5ad.read_bytes()).hexdigest() == before  # the input is only read


def test_steps_from_python(sim_h5ad, tmp_path):
    summary = ps.run(
        sim_h5ad,
        tmp_path / "o",
        perturbation_column="perturbation",
        control_label="control",
        pca=4,
        scheduler="synchronous",
        progress=False,
    )
    assert set(summary.files) >= {"pca", "qc"} and "hvg" not in summary.files
    assert ad.read_zarr(summary.files["pca"]).obsm["X_pca"].shape[1] == 4


def test_dry_run_plans_the_steps_passes(sim_h5ad, tmp_path):
    plan = ps.run(
        sim_h5ad,
        tmp_path / "o",
        perturbation_column="perturbation",
        control_label="control",
        hvg=50,
        hvg_flavor="seurat_v3",
        pca=5,
        pseudobulk=True,
        dry_run=True,
    )
    text = "; ".join(plan.passes)
    assert "pseudo-bulk (1 read)" in text and "highly variable genes (2 reads)" in text and "PCA" in text
    assert not (tmp_path / "o").exists()


def test_pca_without_hvg_uses_every_kept_gene_not_a_stale_column(sim_adata, tmp_path):
    adata = sim_adata.copy()
    adata.var["highly_variable"] = np.arange(adata.n_vars) < 20  # left by an earlier scanpy run
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    summary = ps.run(
        path,
        tmp_path / "o",
        perturbation_column="perturbation",
        control_label="control",
        pca=5,
        scheduler="synchronous",
        progress=False,
    )
    pcs = ad.read_zarr(summary.files["pca"]).varm["PCs"]
    assert (pcs[20:] != 0).any()  # genes outside the stale column are used


def test_pca_must_be_below_hvg_before_any_pass(sim_h5ad, tmp_path):
    with pytest.raises(ValueError, match="--pca 50 needs fewer components than the --hvg genes it uses"):
        ps.run(
            sim_h5ad,
            tmp_path / "o",
            perturbation_column="perturbation",
            control_label="control",
            hvg=50,
            pca=50,
        )
    assert not (tmp_path / "o").exists()

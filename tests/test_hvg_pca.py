"""Highly variable genes, PCA, neighbors and UMAP against scanpy on the same data."""

from __future__ import annotations

import anndata as ad
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp

import pertscale as ps

from .conftest import assert_close, real_path

sc = pytest.importorskip("scanpy")

CASES = [("seurat", None), ("seurat", 40), ("cell_ranger", None), ("cell_ranger", 40), ("seurat_v3", 40)]


def _lazy(path, *, chunk_size=2_000, log=True):
    adata = ps.read(path, chunk_size=chunk_size)
    if log:
        ps.pp.normalize_total(adata)
        ps.pp.log1p(adata)
    return adata


def _reference(path, *, log=True, dtype=np.float32):
    adata = ad.read_h5ad(path)
    if log:
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
    adata.X = sp.csr_matrix(adata.X, dtype=dtype)
    return adata


@pytest.mark.parametrize(("flavor", "n_top"), CASES)
def test_hvg_equals_scanpy_on_real_screens(real_screen, flavor, n_top):
    log = flavor != "seurat_v3"
    ref = _reference(real_screen, log=log)
    sc.pp.highly_variable_genes(ref, flavor=flavor, n_top_genes=n_top)
    ours = _lazy(real_screen, log=log)
    with ps.cluster.using("synchronous"):
        ps.pp.highly_variable_genes(ours, flavor=flavor, n_top_genes=n_top)
    np.testing.assert_array_equal(ours.var["highly_variable"].to_numpy(), ref.var["highly_variable"].to_numpy())
    assert ours.var["highly_variable"].any()
    assert ours.uns["hvg"] == {"flavor": flavor}
    # scanpy sums float32 squares; we sum in float64
    columns = ["means", "variances", "variances_norm"] if flavor == "seurat_v3" else ["means", "dispersions_norm"]
    for col in columns:
        assert_close(ours.var[col], ref.var[col], rtol=5e-4, atol=1e-9, err_msg=col)


@pytest.mark.parametrize(("flavor", "n_top"), CASES)
def test_hvg_with_batches_equals_scanpy(flavor, n_top):
    path = real_path("papalexi")  # three replicates in obs['bio_rep']
    log = flavor != "seurat_v3"
    ref = _reference(path, log=log)
    ref.obs["bio_rep"] = ref.obs["bio_rep"].astype("category")
    sc.pp.highly_variable_genes(ref, flavor=flavor, n_top_genes=n_top, batch_key="bio_rep")
    ours = _lazy(path, log=log)
    ps.pp.highly_variable_genes(ours, flavor=flavor, n_top_genes=n_top, batch_key="bio_rep")
    np.testing.assert_array_equal(ours.var["highly_variable"].to_numpy(), ref.var["highly_variable"].to_numpy())
    np.testing.assert_array_equal(
        ours.var["highly_variable_nbatches"].to_numpy(), ref.var["highly_variable_nbatches"].to_numpy()
    )
    columns = ["means", "variances_norm", "highly_variable_rank"] if not log else ["means", "dispersions_norm"]
    for col in columns:
        assert_close(ours.var[col], ref.var[col], rtol=5e-4, atol=1e-9, err_msg=col)


def test_hvg_batch_key_errors(sim_adata):
    adata = sim_adata.copy()
    with pytest.raises(KeyError, match="batch_key 'rep' not found"):
        ps.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=10, batch_key="rep")
    adata.obs["rep"] = ["a"] * (adata.n_obs - 1) + ["b"]
    with pytest.raises(ValueError, match=r"at least 2 cells per batch; got 1 \(b\)"):
        ps.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=10, batch_key="rep")


def test_hvg_control_only_equals_scanpy_on_the_control_cells():
    path = real_path("papalexi")
    ref = _reference(path)
    ref = ref[ref.obs["perturbation"] == "control"].copy()
    sc.pp.highly_variable_genes(ref, flavor="seurat", n_top_genes=50)
    ours = _lazy(path)
    out = ps.pp.highly_variable_genes(
        ours,
        flavor="seurat",
        n_top_genes=50,
        control_only=True,
        perturbation_column="perturbation",
        control_label="control",
        inplace=False,
    )
    np.testing.assert_array_equal(out["highly_variable"].to_numpy(), ref.var["highly_variable"].to_numpy())
    assert "highly_variable" not in ours.var  # inplace=False leaves adata alone


@pytest.mark.parametrize(
    ("chunk_size", "scheduler"),
    [
        (333, "synchronous"),
        (1_000, "synchronous"),
        (5_000, "synchronous"),
        (333, "threads"),
        pytest.param(1_000, "cluster", marks=pytest.mark.cluster),
    ],
)
def test_hvg_does_not_depend_on_chunks_or_scheduler(sim_h5ad, chunk_size, scheduler, request):
    if scheduler == "cluster":
        scheduler = request.getfixturevalue("cluster_client")
    base = ps.read(sim_h5ad, chunk_size=3_000)
    expected = ps.pp.highly_variable_genes(base, flavor="seurat_v3", n_top_genes=50, inplace=False)
    adata = ps.read(sim_h5ad, chunk_size=chunk_size)
    with ps.cluster.using(scheduler):
        got = ps.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=50, inplace=False)
    np.testing.assert_array_equal(got["highly_variable"], expected["highly_variable"])
    assert_close(got["variances_norm"], expected["variances_norm"], rtol=1e-12)


def test_hvg_wrong_kind_of_data_is_named(sim_adata):
    counts = sim_adata.copy()
    with pytest.raises(ValueError, match="expects log1p-normalized data.*normalize_total"):
        ps.pp.highly_variable_genes(counts, flavor="seurat")
    logged = sim_adata.copy()
    ps.pp.normalize_total(logged)
    ps.pp.log1p(logged)
    with pytest.raises(ValueError, match="seurat_v3' expects raw counts.*non-integer"):
        ps.pp.highly_variable_genes(logged, flavor="seurat_v3", n_top_genes=10)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"flavor": "pearson"}, ValueError, "flavor 'pearson' is not known"),
        ({"flavor": "seurat_v3"}, ValueError, "needs n_top_genes"),
        ({"flavor": "seurat_v3", "n_top_genes": 0}, ValueError, "n_top_genes"),
        ({"flavor": "seurat_v3", "n_top_genes": 10, "span": 0}, ValueError, "span"),
        ({"flavor": "seurat_v3", "n_top_genes": 10, "control_only": True}, ValueError, "perturbation_column"),
        ({"flavor": "seurat_v3", "n_top_genes": 10, "layer": "nope"}, KeyError, "layer 'nope' not found"),
        (
            {
                "flavor": "seurat_v3",
                "n_top_genes": 10,
                "control_only": True,
                "perturbation_column": "perturbation",
                "control_label": "NT",
            },
            ValueError,
            "control_label 'NT' not found",
        ),
    ],
)
def test_hvg_bad_settings(sim_adata, kwargs, error, match):
    with pytest.raises(error, match=match):
        ps.pp.highly_variable_genes(sim_adata.copy(), **kwargs)


def _cosines(a, b):
    return np.abs((a * b).sum(0)) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)


@pytest.mark.parametrize("name", ["papalexi", "schraivogel"])
def test_pca_equals_scanpy_arpack(name):
    path = real_path(name)
    ref = _reference(path, dtype=np.float64)  # scanpy's ARPACK in float64: a reference to 1e-6
    n_comps = min(30, ref.n_vars - 1)
    sc.pp.pca(ref, n_comps=n_comps, svd_solver="arpack", mask_var=None)
    ours = _lazy(path)
    with ps.cluster.using("synchronous"):
        ps.pp.pca(ours, n_comps=n_comps, method="covariance")
    assert isinstance(ours.obsm["X_pca"], da.Array)  # scores stay lazy
    assert_close(ours.uns["pca"]["variance_ratio"], ref.uns["pca"]["variance_ratio"], rtol=1e-6)
    assert_close(ours.uns["pca"]["variance"], ref.uns["pca"]["variance"], rtol=1e-6)
    variance = ours.uns["pca"]["variance"]
    distinct = np.ones(n_comps, dtype=bool)
    gaps = np.abs(np.diff(variance)) / variance[:-1] > 1e-4
    distinct[:-1] &= gaps
    distinct[1:] &= gaps
    assert distinct.sum() >= n_comps // 2
    assert _cosines(ours.varm["PCs"], ref.varm["PCs"])[distinct].min() >= 0.9999
    signs = np.sign((ours.varm["PCs"] * ref.varm["PCs"]).sum(0))
    scores = ours.obsm["X_pca"].compute()
    np.testing.assert_allclose((scores * signs)[:, distinct], ref.obsm["X_pca"][:, distinct], atol=1e-5)


def test_pca_randomized_agrees_on_the_leading_components():
    path = real_path("papalexi")
    ref = _reference(path, dtype=np.float64)
    sc.pp.pca(ref, n_comps=20, svd_solver="arpack", mask_var=None)
    ours = _lazy(path)
    with ps.cluster.using("synchronous"):
        ps.pp.pca(ours, n_comps=20, method="randomized", n_iter=8)
    assert_close(ours.uns["pca"]["variance_ratio"][:10], ref.uns["pca"]["variance_ratio"][:10], rtol=1e-4)
    assert _cosines(ours.varm["PCs"][:, :5], ref.varm["PCs"][:, :5]).min() >= 0.999


def test_pca_uses_the_highly_variable_genes(sim_adata):
    adata = sim_adata.copy()
    ps.pp.normalize_total(adata)
    ps.pp.log1p(adata)
    ps.pp.highly_variable_genes(adata, flavor="cell_ranger", n_top_genes=60)
    ps.pp.pca(adata, n_comps=10)
    hvg = adata.var["highly_variable"].to_numpy()
    assert (adata.varm["PCs"][~hvg] == 0).all() and (adata.varm["PCs"][hvg] != 0).any()
    ref = ad.AnnData(sp.csr_matrix(adata.X.compute(), dtype=np.float64)[:, hvg])
    sc.pp.pca(ref, n_comps=10, svd_solver="arpack")
    assert_close(adata.uns["pca"]["variance_ratio"], ref.uns["pca"]["variance_ratio"], rtol=1e-6)


@pytest.mark.parametrize(
    ("chunk_size", "scheduler"),
    [
        (250, "synchronous"),
        (1_000, "synchronous"),
        (3_000, "synchronous"),
        (250, "threads"),
        (1_000, "threads"),
        pytest.param(1_000, "cluster", marks=pytest.mark.cluster),
    ],
)
def test_pca_does_not_depend_on_chunks_or_scheduler(sim_h5ad, chunk_size, scheduler, request):
    if scheduler == "cluster":
        scheduler = request.getfixturevalue("cluster_client")
    base = _lazy(sim_h5ad, chunk_size=3_000)
    with ps.cluster.using("synchronous"):
        ps.pp.pca(base, n_comps=10)
    adata = _lazy(sim_h5ad, chunk_size=chunk_size)
    with ps.cluster.using(scheduler):
        ps.pp.pca(adata, n_comps=10)
    assert_close(adata.uns["pca"]["variance"], base.uns["pca"]["variance"], rtol=1e-10)
    np.testing.assert_allclose(adata.varm["PCs"], base.varm["PCs"], atol=1e-9)
    (scores,) = ps.cluster.compute(adata.obsm["X_pca"], scheduler=scheduler, progress=False)
    np.testing.assert_allclose(scores, base.obsm["X_pca"].compute(), atol=1e-8)


def test_pca_in_memory_input_gives_in_memory_scores(sim_adata):
    adata = sim_adata.copy()
    ps.pp.log1p(adata)
    adata.X = adata.X.compute() if isinstance(adata.X, da.Array) else adata.X
    ps.pp.pca(adata, n_comps=5, use_highly_variable=False)
    assert isinstance(adata.obsm["X_pca"], np.ndarray) and adata.obsm["X_pca"].shape == (adata.n_obs, 5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_comps": 300}, ValueError, r"n_comps=300 must be below .* genes used \(300\); pass n_comps=299"),
        ({"n_comps": 0}, ValueError, "n_comps"),
        ({"method": "arpack"}, ValueError, "method 'arpack' is not known"),
        ({"use_highly_variable": True}, KeyError, "highly_variable"),
    ],
)
def test_pca_bad_settings(sim_adata, kwargs, error, match):
    with pytest.raises(error, match=match):
        ps.pp.pca(sim_adata.copy(), **kwargs)


def test_pca_no_highly_variable_gene_is_an_error(sim_adata):
    adata = sim_adata.copy()
    adata.var["highly_variable"] = False
    with pytest.raises(ValueError, match="marks no gene"):
        ps.pp.pca(adata)


def test_neighbors_and_umap_equal_scanpy_on_the_same_embedding(sim_adata):
    adata = sim_adata.copy()
    ps.pp.normalize_total(adata)
    ps.pp.log1p(adata)
    ps.pp.pca(adata, n_comps=10)
    ps.pp.neighbors(adata, n_neighbors=10)
    ref = ad.AnnData(obs=adata.obs[[]], obsm={"X_pca": adata.obsm["X_pca"].compute()})
    sc.pp.neighbors(ref, n_neighbors=10, use_rep="X_pca", random_state=0)
    # the same neighbors of every cell; distances equal up to BLAS summation order
    for key in ("distances", "connectivities"):
        ours, theirs = adata.obsp[key].tocsr(), ref.obsp[key].tocsr()
        ours.sort_indices()
        theirs.sort_indices()
        np.testing.assert_array_equal(ours.indptr, theirs.indptr)
        np.testing.assert_array_equal(ours.indices, theirs.indices)
        np.testing.assert_allclose(ours.data, theirs.data, rtol=1e-6, err_msg=key)
    assert adata.uns["neighbors"]["params"]["n_neighbors"] == 10
    ps.tl.umap(adata)
    assert adata.obsm["X_umap"].shape == (adata.n_obs, 2) and np.isfinite(adata.obsm["X_umap"]).all()


def test_neighbors_and_umap_need_their_inputs(sim_adata):
    adata = sim_adata.copy()
    with pytest.raises(KeyError, match="run ps.pp.pca first"):
        ps.pp.neighbors(adata)
    with pytest.raises(KeyError, match="run ps.pp.neighbors first"):
        ps.tl.umap(adata)
    adata.obsm["X_pca"] = np.full((adata.n_obs, 3), np.nan)
    with pytest.raises(ValueError, match="NaN"):
        ps.pp.neighbors(adata)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger", "seurat_v3"])
def test_hvg_non_finite_values_are_named(sim_adata, flavor, bad):
    adata = sim_adata.copy()
    x = sp.csr_matrix(adata.X, dtype=np.float64)
    if flavor != "seurat_v3":
        x = sp.csr_matrix(np.log1p(x.toarray()))
    x.data[3] = bad
    adata.X = x
    with pytest.raises(ValueError, match="NaN or infinite values"):
        ps.pp.highly_variable_genes(adata, flavor=flavor, n_top_genes=10)


def test_hvg_seurat_undoes_a_log1p_of_another_base_as_scanpy():
    path = real_path("papalexi")
    ref = ad.read_h5ad(path)
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref, base=2)
    ref.X = sp.csr_matrix(ref.X, dtype=np.float32)
    ours = ref.copy()
    sc.pp.highly_variable_genes(ref, flavor="seurat", n_top_genes=40)
    with ps.cluster.using("synchronous"):
        ps.pp.highly_variable_genes(ours, flavor="seurat", n_top_genes=40)
    np.testing.assert_array_equal(ours.var["highly_variable"].to_numpy(), ref.var["highly_variable"].to_numpy())
    assert_close(ours.var["means"], ref.var["means"], rtol=5e-4)


def test_hvg_too_many_batches_is_refused(sim_adata, monkeypatch):
    monkeypatch.setattr("pertscale.pp._hvg.MAX_BATCH_BYTES", 2**20)
    adata = sim_adata.copy()
    adata.obs["cell"] = adata.obs_names  # one batch per cell
    with pytest.raises(ValueError, match="batches: each block's sums would take"):
        ps.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=10, batch_key="cell")

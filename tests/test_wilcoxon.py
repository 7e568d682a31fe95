"""rank_genes_groups: references, chunk and scheduler invariance, bad input."""

from __future__ import annotations

import warnings

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from scipy import stats

import pertscale as ps

from .conftest import assert_close

LAYERS = ("scores", "pvals", "pvals_adj", "logfoldchanges", "pts", "pts_rest", "u_statistic")


def _prepared(path_or_adata, *, chunk_size=None, exclude=("multiple", "unassigned")):
    adata = (
        ps.read(path_or_adata, chunk_size=chunk_size) if not isinstance(path_or_adata, ad.AnnData) else path_or_adata
    )
    adata = ps.pp.filter_perturbations(
        adata, perturbation_column="perturbation", control_label="control", exclude_labels=exclude
    )
    ps.pp.normalize_total(adata, target_sum=1e4)
    ps.pp.log1p(adata)
    return adata


def _scanpy_reference(ref):
    """scanpy's own pipeline on an in-memory AnnData of raw counts."""
    ref = ref[~ref.obs["perturbation"].isin(["multiple", "unassigned"])].copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)  # scanpy's own DataFrame building
        sc.tl.rank_genes_groups(ref, "perturbation", reference="control", method="wilcoxon", tie_correct=True, pts=True)
    return ref


def _assert_equals_scanpy(res, ref):
    ref_groups = set(ref.uns["rank_genes_groups"]["names"].dtype.names)
    assert set(res.obs_names) == ref_groups
    control = ref[ref.obs["perturbation"] == "control"].X
    control_pts = np.asarray((control != 0).mean(axis=0)).ravel()  # scanpy gives pts_rest only for 'rest'
    for g in res.obs_names:
        df = sc.get.rank_genes_groups_df(ref, g, pval_cutoff=None).set_index("names").loc[res.var_names]
        row = res[g]
        # scanpy stores scores and logfoldchanges as float32
        assert_close(row.layers["scores"][0], df["scores"], rtol=1e-6, atol=1e-6, err_msg=g)
        assert_close(row.layers["pvals"][0], df["pvals"], rtol=1e-9, err_msg=g)
        assert_close(row.layers["pvals_adj"][0], df["pvals_adj"], rtol=1e-9, err_msg=g)
        assert_close(row.layers["logfoldchanges"][0], df["logfoldchanges"], rtol=1e-5, atol=1e-5, err_msg=g)
        assert_close(row.layers["pts"][0], df["pct_nz_group"], rtol=1e-12, err_msg=g)
        assert_close(row.layers["pts_rest"][0], control_pts, rtol=1e-12, err_msg=g)


def test_equals_scanpy_on_real_data(real_screen):
    res = _run(_prepared(real_screen, chunk_size=4_000))
    _assert_equals_scanpy(res, _scanpy_reference(ad.read_h5ad(real_screen)))


def test_equals_scanpy_on_simulated_data_with_split_chunks(sim_adata, sim_h5ad):
    # 997-row chunks split every perturbation group across blocks of the input
    res = _run(_prepared(sim_h5ad, chunk_size=997))
    _assert_equals_scanpy(res, _scanpy_reference(sim_adata.copy()))


@pytest.mark.parametrize("use_continuity", [False, True])
def test_equals_scipy_mannwhitneyu(sim_adata, use_continuity):
    adata = _prepared(sim_adata.copy())
    res = _run(adata, use_continuity=use_continuity)
    x = adata.X.compute().toarray().astype(np.float64)
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    control = x[labels == "control"]
    for g in res.obs_names:
        r = stats.mannwhitneyu(x[labels == g], control, method="asymptotic", use_continuity=use_continuity, axis=0)
        defined = ~np.isnan(r.pvalue)
        assert_close(res[g].layers["u_statistic"][0], r.statistic, rtol=0)
        assert_close(res[g].layers["pvals"][0][defined], r.pvalue[defined], rtol=1e-10, err_msg=g)
        assert res[g].obs["n_cells"].iloc[0] == (labels == g).sum()


def test_recovers_simulated_knockdowns(sim_adata):
    res = _run(_prepared(sim_adata.copy()))
    targets = dict(
        zip(sim_adata.uns["simulation"]["perturbations"], sim_adata.uns["simulation"]["targets"], strict=False)
    )
    found = 0
    for g in res.obs_names:
        t = res.var_names.get_loc(targets[g])
        assert res[g].layers["logfoldchanges"][0, t] < 0  # knock-down lowers its target
        found += res[g].layers["pvals_adj"][0, t] < 0.05
    assert found >= 0.8 * res.n_obs


def _run(adata, scheduler="synchronous", **kw):
    """The test, computed (the results of rank_genes_groups are lazy)."""
    res = ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control", **kw)
    return ps.compute(res, scheduler=scheduler)  # scanpy_format=True: ps.compute adds uns['rank_genes_groups']


def _assert_same(a, b):
    assert list(a.obs_names) == list(b.obs_names)
    for layer in LAYERS:
        np.testing.assert_array_equal(a.layers[layer], b.layers[layer], err_msg=layer)


def _run_without_shuffle(path, chunk_size, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(da.Array, "shuffle", lambda *a, **k: pytest.fail("contiguous groups must not be shuffled"))
        return _run(_prepared(path, chunk_size=chunk_size))


@pytest.mark.parametrize("chunk_size", [97, 1_000, 3_000])
def test_results_do_not_depend_on_chunking(sim_h5ad, chunk_size):
    base = _run(_prepared(sim_h5ad, chunk_size=2_999))
    res = _run(_prepared(sim_h5ad, chunk_size=chunk_size))
    assert list(res.obs_names) == list(base.obs_names)
    _assert_same(res, base)


def test_sorted_input_takes_the_slice_path_and_agrees(sim_adata, tmp_path, monkeypatch):
    order = np.argsort(sim_adata.obs["perturbation"].cat.codes.to_numpy(), kind="stable")
    sorted_path = tmp_path / "sorted.h5ad"
    sim_adata[order].copy().write_h5ad(sorted_path)
    _assert_same(_run_without_shuffle(sorted_path, 500, monkeypatch), _run(_prepared(sim_adata.copy())))


@pytest.mark.cluster
def test_distributed_equals_synchronous(sim_h5ad, cluster_client):
    sync = _run(_prepared(sim_h5ad, chunk_size=700))
    dist = _run(_prepared(sim_h5ad, chunk_size=700), scheduler=cluster_client)
    _assert_same(dist, sync)


def test_threads_and_in_memory_input_agree(sim_adata):
    lazy = _run(_prepared(sim_adata.copy()), scheduler="threads")
    mem = sim_adata.copy()
    sc.pp.normalize_total(mem, target_sum=1e4)
    sc.pp.log1p(mem)
    eager = _run(mem)
    _assert_same(lazy, eager)


def test_results_anndata_round_trip_and_scanpy_view(sim_adata, tmp_path):
    res = _run(_prepared(sim_adata.copy()), scanpy_format=True, corr_method="bonferroni")
    assert res.shape == (12, sim_adata.n_vars)
    assert res.uns["pertscale"]["settings"]["corr_method"] == "bonferroni"
    g = res.obs_names[3]
    df = sc.get.rank_genes_groups_df(res, g).set_index("names").loc[res.var_names]
    assert_close(df["pvals"], res[g].layers["pvals"][0], rtol=1e-12)
    assert_close(df["scores"], res[g].layers["scores"][0], rtol=1e-6)
    ranked = sc.get.rank_genes_groups_df(res, g)
    assert ranked["scores"].is_monotonic_decreasing  # scanpy's view ranks genes by score
    # the lazy results are flagged; writing them to .h5ad adds scanpy's view as ps.compute does
    lazy = ps.tl.rank_genes_groups(
        _prepared(sim_adata.copy()), perturbation_column="perturbation", control_label="control", scanpy_format=True
    )
    assert "rank_genes_groups" not in lazy.uns
    ps.write(lazy, tmp_path / "lazy.h5ad", scheduler="synchronous")
    written = sc.get.rank_genes_groups_df(ad.read_h5ad(tmp_path / "lazy.h5ad"), g).set_index("names")
    assert_close(written.loc[res.var_names, "scores"], res[g].layers["scores"][0], rtol=1e-6)
    for name in ("de.h5ad", "de.zarr"):
        ps.write(res, tmp_path / name)
        back = ad.read_h5ad(tmp_path / name) if name.endswith("h5ad") else ad.read_zarr(tmp_path / name)
        np.testing.assert_array_equal(back.layers["pvals_adj"], res.layers["pvals_adj"])
        assert back.uns["pertscale"]["settings"]["control_label"] == "control"
        assert back.obs["n_cells"].tolist() == res.obs["n_cells"].tolist()


def test_bad_inputs(sim_adata):
    adata = _prepared(sim_adata.copy())
    with pytest.raises(KeyError, match="perturbation_column 'guide' not found.*'perturbation'"):
        ps.tl.rank_genes_groups(adata, perturbation_column="guide", control_label="control")
    with pytest.raises(ValueError, match="control_label 'NT' not found.*labels seen: .*'control'"):
        ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="NT")
    with pytest.raises(ValueError, match="method 'magic'"):
        ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control", method="magic")
    with pytest.raises(ValueError, match="perturbations not found"):
        ps.tl.rank_genes_groups(
            adata, perturbation_column="perturbation", control_label="control", perturbations=["nope"]
        )


def test_too_few_control_cells(sim_adata):
    adata = sim_adata.copy()
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    ctrl = np.flatnonzero(labels == "control")
    labels[ctrl[1:]] = "P0000"
    adata.obs["perturbation"] = labels
    with pytest.raises(ValueError, match="only 1 cell.*at least 2 control cells"):
        ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control")


def test_small_perturbation_is_skipped_with_warning(sim_adata):
    adata = sim_adata.copy()
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    labels[np.flatnonzero(labels == "P0001")[0]] = "LONELY"
    adata.obs["perturbation"] = labels
    with pytest.warns(UserWarning, match="fewer than 2 cells.*LONELY"):
        res = _run(_prepared(adata))
    assert "LONELY" not in res.obs_names and list(res.uns["pertscale"]["skipped"]) == ["LONELY"]


@pytest.mark.parametrize("bad", [np.nan, -1.0])
def test_nan_or_negative_expression_fails(sim_adata, bad):
    adata = sim_adata.copy()
    adata.X = sp.csr_matrix(adata.X.astype(np.float32))
    adata.X.data[10] = bad
    adata.uns["log1p"] = {"base": None}
    with pytest.raises(ValueError, match="NaN|negative"):
        _run(adata)


@pytest.mark.slow
@pytest.mark.cluster
def test_larger_screen_chunk_and_scheduler_invariance(tmp_path, cluster_client):
    path = ps.datasets.simulate_screen(60_000, 1_000, 60, control_fraction=0.1, seed=11, path=tmp_path / "big.zarr")
    runs = [
        _run(_prepared(path, chunk_size=7_919)),
        _run(_prepared(path, chunk_size=25_000), scheduler=cluster_client),
        _run(_prepared(path, chunk_size=60_000), scheduler="threads"),
    ]
    for other in runs[1:]:
        _assert_same(other, runs[0])
    x = _prepared(path, chunk_size=60_000).X.compute()
    labels = ps.read(path).obs["perturbation"].astype(str).to_numpy()
    control = x[labels == "control"].toarray().astype(np.float64)
    g = runs[0].obs_names[17]
    r = stats.mannwhitneyu(
        x[labels == g].toarray().astype(np.float64), control, method="asymptotic", use_continuity=False, axis=0
    )
    defined = ~np.isnan(r.pvalue)
    assert_close(runs[0][g].layers["pvals"][0][defined], r.pvalue[defined], rtol=1e-10)


def test_contiguous_groups_in_any_order_are_sliced_not_shuffled(sim_adata, tmp_path, monkeypatch):
    labels = sim_adata.obs["perturbation"].astype(str).to_numpy()
    # storage order: groups in reverse label order, control in the middle
    names = sorted(set(labels) - {"control"}, reverse=True)
    names.insert(len(names) // 2, "control")
    order = np.concatenate([np.flatnonzero(labels == n) for n in names])
    path = tmp_path / "blocks.h5ad"
    sim_adata[order].copy().write_h5ad(path)
    # results come in label order, not storage order
    _assert_same(_run_without_shuffle(path, 450, monkeypatch), _run(_prepared(sim_adata.copy())))

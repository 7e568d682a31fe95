"""The result store: settings objects, reuse by settings, getters, round trips, history, cleanup, writing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from datetime import datetime

import anndata as ad
import dask
import h5py
import numpy as np
import pandas as pd
import pytest

import pertscale as ps
from pertscale import store
from pertscale.analysis import AnalysisSettings

from .conftest import assert_close

S = "synchronous"
#: The perturbation column and control label of the simulated screen.
DE = {"perturbation_column": "perturbation", "control_label": "control"}


@pytest.fixture(autouse=True)
def _synchronous():
    with ps.settings.override(scheduler=S):
        yield


@pytest.fixture
def screen(sim_adata):
    """A fresh log-normalized copy of the simulated screen, counts in layers['counts']."""
    adata = sim_adata.copy()
    adata.uns.pop("pertscale", None)
    adata.layers["counts"] = adata.X.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ps.pp.normalize_total(adata)
        ps.pp.log1p(adata)
    return adata


def _nbglm_steps(adata) -> None:
    """nb-glm's prerequisites, as explicit steps: size factors, then dispersions."""
    ps.pp.size_factors(adata, layer="counts")
    ps.tl.dispersions(adata, perturbation_column="perturbation", layer="counts")


def _run_all(adata) -> dict[str, object]:
    """Every analysis once, on the same AnnData; returns what each gave."""
    out = {}
    for method in ("wilcoxon", "t-test"):
        out[method] = ps.compute(ps.tl.rank_genes_groups(adata, **DE, method=method), scheduler=S)
    _nbglm_steps(adata)
    out["nb-glm"] = ps.compute(
        ps.tl.rank_genes_groups(adata, **DE, method="nb-glm", layer="counts", perturbations=["P0000"]),
        scheduler=S,
    )
    out["qc"] = ps.pp.qc_summary(
        adata,
        perturbation_column="perturbation",
        control_label="control",
        min_genes=1,
        min_cells_per_gene=1,
        min_cells_per_perturbation=1,
    )
    out["hvg"] = ps.pp.highly_variable_genes(adata, n_top_genes=50, inplace=False)
    ps.pp.pca(adata, n_comps=5)
    out["pca"] = np.asarray(adata.obsm["X_pca"])
    out["pseudobulk"] = ps.pb.pseudobulk(adata, perturbation_column="perturbation", layer="counts")
    return out


# --------------------------------------------------------------------------- settings objects


def test_settings_compare_hash_print_and_key_round_trip():
    a = ps.WilcoxonSettings(perturbation_column="gene", control_label="NT/1%", min_pct=(0.1, 0.2))
    b = ps.WilcoxonSettings(perturbation_column="gene", control_label="NT/1%", min_pct=[0.1, 0.2])
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a != ps.WilcoxonSettings(perturbation_column="gene", control_label="NT")
    assert repr(a).startswith("WilcoxonSettings(") and "control_label='NT/1%'" in str(a)
    key = a.key()
    assert key.startswith("WilcoxonSettings::{") and "/" not in key and "\\" not in key
    assert AnalysisSettings.from_key(key) == a
    with pytest.raises(Exception, match="frozen"):
        a.min_cells = 3
    with pytest.raises(ValueError, match="not a pertscale settings key"):
        AnalysisSettings.from_key("Nope::{}")
    with pytest.raises(ValueError, match="extra"):
        ps.WilcoxonSettings(perturbation_column="g", control_label="c", bogus=1)


def test_settings_call_args_name_the_function_arguments():
    pca = ps.PCASettings(n_comps=7, solver="randomized", genes="array:0")
    assert pca.call_args()["method"] == "randomized" and "genes" not in pca.call_args()
    assert "method" not in ps.QCSettings(perturbation_column="p").call_args()
    assert ps.TTestSettings(perturbation_column="p", control_label="c").call_args()["method"] == "t-test"


# --------------------------------------------------------------------------- reuse by settings


def test_equal_settings_reuse_the_stored_result_without_computing(screen, monkeypatch):
    import pertscale.tl._rank_genes_groups as rgg

    calls = []
    original = rgg._test
    monkeypatch.setattr(rgg, "_test", lambda *a, **k: calls.append(k["method"]) or original(*a, **k))
    first = ps.tl.rank_genes_groups(screen, **DE)
    again = ps.tl.rank_genes_groups(screen, **DE, key_added="de_again")  # not a setting
    assert again is first and calls == ["wilcoxon"]
    assert ps.get.result(screen, key="de_again") is first
    other = ps.tl.rank_genes_groups(screen, **DE, alternative="greater")
    assert other is not first and calls == ["wilcoxon", "wilcoxon"]
    forced = ps.tl.rank_genes_groups(screen, **DE, force=True)
    assert forced is not first and len(calls) == 3
    assert ps.get.result(screen, "wilcoxon", alternative="two-sided") is forced
    # other cells: the stored result is not reused
    subset = screen[screen.obs["perturbation"] != "P0001"].copy()
    ps.tl.rank_genes_groups(subset, **DE)
    assert len(calls) == 4


@pytest.mark.parametrize(
    ("method", "module", "inner"),
    [
        ("qc", "pertscale.pp._qc_summary", "_qc_summary"),
        ("hvg", "pertscale.pp._hvg", "_highly_variable_genes"),
        ("pca", "pertscale.pp._pca", "_pca"),
        ("pseudobulk", "pertscale.pb", "_pseudobulk"),
    ],
)
def test_every_analysis_is_reused_by_settings(screen, monkeypatch, method, module, inner):
    import importlib

    mod = importlib.import_module(module)
    calls = []
    original = getattr(mod, inner)
    monkeypatch.setattr(mod, inner, lambda *a, **k: calls.append(1) or original(*a, **k))
    run = {
        "qc": lambda **o: ps.pp.qc_summary(screen, perturbation_column="perturbation", min_genes=1, **o),
        "hvg": lambda **o: ps.pp.highly_variable_genes(screen, n_top_genes=40, **o),
        "pca": lambda **o: ps.pp.pca(screen, n_comps=4, **o),
        "pseudobulk": lambda **o: ps.pb.pseudobulk(screen, layer="counts", **o),
    }[method]
    first = run()
    if method == "hvg":
        screen.var["highly_variable"] = False  # the stored columns are put back on reuse
    if method == "pca":
        expected = np.asarray(screen.obsm["X_pca"])
        del screen.obsm["X_pca"]
    second = run()
    assert calls == [1]
    if method == "hvg":
        assert screen.var["highly_variable"].sum() == 40
    elif method == "pca":
        assert_close(np.asarray(screen.obsm["X_pca"]), expected)
    elif method == "qc":
        pd.testing.assert_frame_equal(second.cells, first.cells)
    else:
        assert second is first
    run(force=True)
    assert calls == [1, 1]
    assert [r.method for r in map(lambda i: ps.RunInfo(screen, i), range(2))] == [method, method]


def test_pca_on_another_gene_selection_is_another_result(screen):
    ps.pp.highly_variable_genes(screen, n_top_genes=40)
    ps.pp.pca(screen, n_comps=3)
    ps.pp.highly_variable_genes(screen, n_top_genes=60)
    ps.pp.pca(screen, n_comps=3)
    pcas = [s for s in store.results(screen) if s.method == "pca"]
    assert len(pcas) == 2 and pcas[0].genes != pcas[1].genes


# --------------------------------------------------------------------------- getters


def test_getters_select_by_settings_and_say_what_is_ambiguous_or_missing(screen):
    two = ps.tl.rank_genes_groups(screen, **DE)
    greater = ps.tl.rank_genes_groups(screen, **DE, alternative="greater")
    ps.tl.rank_genes_groups(screen, **DE, method="t-test")
    assert ps.get.result(screen, "wilcoxon", alternative="greater") is greater
    assert ps.get.result(screen, key="de_wilcoxon") is greater  # the latest of that name
    settings, value = ps.get.result(screen, "wilcoxon", alternative="two-sided", return_settings=True)
    assert value is two and settings.alternative == "two-sided"
    with pytest.raises(ValueError, match=r"2 stored results match method='wilcoxon'; they differ in \['alternative'\]"):
        ps.get.result(screen, "wilcoxon")
    with pytest.raises(ValueError, match="no stored result matches method='wilcoxon', alternative='less'"):
        ps.get.result(screen, "wilcoxon", alternative="less")
    with pytest.raises(ValueError, match=r"\['n_comps'\] are not settings"):
        ps.get.result(screen, "wilcoxon", n_comps=3)
    with pytest.raises(ValueError, match="not an analysis"):
        ps.get.result(screen, "wilcox")
    with pytest.raises(ValueError, match="no stored result is named"):
        ps.get.result(screen, key="de_nothing")
    table = ps.get.summary(screen)
    assert list(table["method"]) == ["wilcoxon", "wilcoxon", "t-test"]
    assert list(table["alternative"]) == ["two-sided", "greater", "two-sided"]
    assert table.loc[1, "key_added"] == "de_wilcoxon" and table["lazy"].all()
    with pytest.raises(ValueError, match="no results are stored"):
        ps.get.result(ad.AnnData(np.zeros((2, 2))), "wilcoxon")


# --------------------------------------------------------------------------- round trips


def _same(a, b):
    if isinstance(a, ad.AnnData):
        assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
        assert set(a.layers) == set(b.layers)
        for name in a.layers:
            assert_close(np.asarray(b.layers[name]), np.asarray(a.layers[name]), err_msg=name)
        if a.X is not None:
            assert_close(np.asarray(b.X), np.asarray(a.X))
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(b, a, check_dtype=False, check_categorical=False)
    elif isinstance(a, np.ndarray):  # PCA scores: a block product, summed in another order when written
        assert_close(np.asarray(b), a, rtol=1e-9, atol=1e-12)
    else:  # QCSummary
        for table in ("cells", "genes", "perturbations"):
            pd.testing.assert_frame_equal(getattr(b, table), getattr(a, table), check_dtype=False)
        assert b.min_genes == a.min_genes and b.control_label == a.control_label


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_every_result_type_round_trips_and_is_reused_after_reading(screen, tmp_path, suffix, monkeypatch):
    made = _run_all(screen)
    n_runs = len(ps.store.history(screen))
    before = {s.key() for s in store.results(screen)}
    path = ps.write(screen, tmp_path / f"screen{suffix}")
    assert {s.key() for s in store.results(screen)} == before  # the input object is unchanged
    back = ps.read(path)
    assert {s.key() for s in store.results(back)} == before
    for method, value in made.items():
        got = np.asarray(ps.get.result(back, method)["X_pca"]) if method == "pca" else ps.get.result(back, method)
        _same(value, got)
    assert len(ps.store.history(back)) == n_runs
    assert ps.RunInfo(back, 0).settings == ps.RunInfo(screen, 0).settings
    # asked again after the round trip, nothing runs
    import pertscale.tl._rank_genes_groups as rgg

    monkeypatch.setattr(rgg, "_test", lambda *a, **k: pytest.fail("recomputed a stored result"))
    ps.tl.rank_genes_groups(back, **DE)
    # PCA's scores are written once: the store refers to obsm['X_pca']
    if suffix == ".h5ad":
        with h5py.File(path) as f:
            group = f["uns/pertscale/results"]
            pca = next(k for k in group if k.startswith("PCASettings-"))
            assert group[pca]["result/X_pca"][()].decode() == "ref:obsm/X_pca"


def test_files_opened_by_anndata_get_their_keys_back_idempotently(screen, tmp_path):
    ps.tl.rank_genes_groups(screen, **DE, method="t-test")
    path = ps.write(screen, tmp_path / "screen.h5ad")
    plain = ad.read_h5ad(path)
    (entry,) = plain.uns["pertscale"]["results"].values()
    assert entry["settings"].startswith("TTestSettings::")
    assert ps.ensure_result_keys(plain) is plain
    assert ps.ensure_result_keys(plain) is plain  # twice: no change
    (settings,) = store.results(plain)
    assert settings == ps.TTestSettings(perturbation_column="perturbation", control_label="control")


# --------------------------------------------------------------------------- history


def test_history_reproduces_a_run_exactly(screen):
    res = ps.compute(ps.tl.rank_genes_groups(screen, **DE, alternative="less", min_pct=0.05), scheduler=S)
    run = ps.RunInfo(screen)
    assert run.method == "wilcoxon" and run.function == "pertscale.tl.rank_genes_groups"
    assert run.input["n_obs"] == screen.n_obs and run.versions["pertscale"] == ps.__version__
    elapsed = (datetime.fromisoformat(run.finished) - datetime.fromisoformat(run.started)).total_seconds()
    assert abs(elapsed - run.seconds) <= 1.1, (run.started, run.finished, run.seconds)  # whole seconds
    kwargs = run.call_args()
    assert kwargs["alternative"] == "less" and kwargs["min_pct"] == 0.05
    again = ps.compute(ps.tl.rank_genes_groups(screen, **kwargs, force=True), scheduler=S)
    for name in res.layers:
        assert_close(again.layers[name], res.layers[name], err_msg=name)
    kwargs["alternative"] = "greater"  # edit and run: a new result
    ps.tl.rank_genes_groups(screen, **kwargs)
    diff = ps.RunInfo(screen).compare_with(0)
    assert diff.loc["settings.alternative"].tolist() == ["greater", "less"]
    assert ps.RunInfo(screen, 0, method="wilcoxon").run_id == 0
    with pytest.raises(IndexError, match="out of range"):
        ps.RunInfo(screen, 10)
    rerun = ps.get.rerun(run, force=True)  # at the face: the store imports no analysis
    assert_close(ps.compute(rerun, scheduler=S).layers["pvals"], res.layers["pvals"])
    assert not hasattr(run, "rerun")


def test_rerun_at_the_face_applies_changes_and_runs_on_another_anndata(screen):
    ps.pp.pca(screen, n_comps=3)
    run = ps.RunInfo(screen)
    assert run.adata is screen
    ps.get.rerun(run)  # equal settings: the stored result, no run recorded
    assert len(ps.store.history(screen)) == 1
    ps.get.rerun(run, n_comps=4)
    assert screen.obsm["X_pca"].shape == (screen.n_obs, 4)
    assert ps.RunInfo(screen).settings.n_comps == 4 and len(ps.store.history(screen)) == 2
    other = screen[:100].copy()
    ps.get.rerun(run, other)
    assert other.obsm["X_pca"].shape == (100, 3) and len(ps.store.history(screen)) == 2
    with pytest.raises(TypeError, match=r"takes a pertscale.RunInfo \(ps.RunInfo\(adata\)\), not dict"):
        ps.get.rerun(run.record)
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_components'"):
        ps.get.rerun(run, n_components=3)


def test_overwritten_fields_are_reported(screen):
    ps.pp.pca(screen, n_comps=3)
    ps.pp.pca(screen, n_comps=4)
    assert ps.RunInfo(screen, 0).overwritten_fields == ["obsm/X_pca", "varm/PCs", "uns/pca"]
    assert ps.RunInfo(screen, 1).overwritten_fields == []


def test_cleanup_removes_large_parts_keeps_statistics_and_marks_history(screen):
    ps.tl.rank_genes_groups(screen, **DE)
    ps.pp.pca(screen, n_comps=3)
    copy = ps.cleanup(screen, inplace=False)
    assert "u_statistic" in ps.get.result(screen, "wilcoxon").layers  # inplace=False leaves the input
    ps.cleanup(screen, run_ids=0)
    res = ps.get.result(screen, "wilcoxon")
    assert set(res.layers) == set(store.DEFAULT_KEEP_LAYERS)
    assert "X_pca" in screen.obsm  # run 1 not cleaned
    assert any(f.endswith("/layers/u_statistic") for f in ps.RunInfo(screen, 0).removed_fields)
    assert any(f.endswith("/layers/pts") for f in ps.RunInfo(screen, 0).missing_fields)
    assert "X_pca" not in copy.obsm
    # a cleaned result is computed again when asked
    again = ps.tl.rank_genes_groups(screen, **DE)
    assert "u_statistic" in again.layers
    with pytest.raises(IndexError):
        ps.cleanup(screen, run_ids=7)


# --------------------------------------------------------------------------- writing


def test_write_include_patterns_and_argument_orders(screen, tmp_path):
    ps.pp.pca(screen, n_comps=3)
    screen.obsm["X_other"] = np.zeros((screen.n_obs, 2))
    screen.obs["n_guides"] = 1
    path = ps.write(tmp_path / "some.h5ad", screen, include=["obsm/X_p*", "obs/perturb*", "uns/pertscale"])
    back = ad.read_h5ad(path)
    assert list(back.obsm) == ["X_pca"] and list(back.obs.columns) == ["perturbation"]
    assert list(back.uns) == ["pertscale"] and list(back.var.columns) == [] and not back.varm
    assert back.X.shape == screen.shape  # X always kept
    # PCs are not written: the stored loadings are written in the store itself
    ps.ensure_result_keys(back)
    assert ps.get.result(back, "pca")["PCs"].shape == (screen.n_vars, 3)
    assert "X_other" in screen.obsm and "n_guides" in screen.obs  # the input is not changed
    with pytest.raises(ValueError, match="does not start with a namespace"):
        ps.write(screen, tmp_path / "bad.h5ad", include=["X_pca"])
    with pytest.raises(ValueError, match="compression"):
        ps.write(screen, tmp_path / "bad.h5ad", compression="zstd")
    with pytest.raises(TypeError, match="needs an AnnData"):
        ps.write("a.h5ad", "b.h5ad")


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_categorical_minus_one_and_missing_stay_different(tmp_path, suffix):
    labels = pd.Categorical([-1, 0, 1, np.nan, -1, np.nan])
    obs = pd.DataFrame({"cluster": labels, "mixed": [1, "a", None, 2.5, "b", 3]}, index=[f"c{i}" for i in range(6)])
    adata = ad.AnnData(np.ones((6, 2)), obs=obs, var=pd.DataFrame(index=["g0", "g1"]))
    back = ps.read(ps.write(adata, tmp_path / f"x{suffix}"))
    got = back.obs["cluster"]
    assert (got == -1).tolist() == [True, False, False, False, True, False]
    assert got.isna().tolist() == [False, False, False, True, False, True]
    assert back.obs["mixed"].tolist()[:2] == ["1", "a"] and pd.isna(back.obs["mixed"].iloc[2])
    assert adata.obs["mixed"].tolist()[0] == 1  # the input keeps its values


WRITER = textwrap.dedent(
    """
    import sys, numpy as np, anndata as ad, pertscale as ps
    rng = np.random.default_rng(int(sys.argv[2]))
    adata = ad.AnnData(rng.random((4000, 2000)).astype("float32"))
    adata.uns["tag"] = "new"
    print("writing", flush=True)
    ps.write(adata, sys.argv[1], compression="gzip")
    print("done", flush=True)
    """
)


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_a_killed_writer_leaves_the_old_file_or_the_new_never_a_torn_one(tmp_path, suffix):
    path = tmp_path / f"target{suffix}"
    old = ad.AnnData(np.ones((3, 2), dtype="float32"))
    old.uns["tag"] = "old"
    ps.write(old, path)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    killed_mid_write = 0
    for seed, delay in enumerate((0.3, 0.8, 1.5)):
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(seed)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed_mid_write += 1
        proc.wait(timeout=60)
        back = ps.read(path)  # readable: old or new, whole
        tag = back.uns["tag"]
        assert tag in ("old", "new")
        if tag == "new":
            assert back.shape == (4000, 2000)
            written = np.random.default_rng(seed).random((4000, 2000)).astype("float32")
            np.testing.assert_array_equal(_dense(back.X[-5:]), written[-5:])
        else:
            assert back.shape == (3, 2)
        ps.io._read.OPENED_INPUTS.discard(path.resolve())
    assert killed_mid_write >= 1


def _dense(x) -> np.ndarray:
    """A lazy or in-memory, sparse or dense matrix as a numpy array."""
    x = x.compute() if isinstance(x, dask.array.Array) else x
    return x.toarray() if hasattr(x, "toarray") else np.asarray(x)


# --------------------------------------------------------------------------- lazy views and the handle


def _no_compute(*args, **kwargs):
    raise AssertionError("something was computed")


def test_dataset_and_compare_of_a_file_read_nothing_until_computed(screen, tmp_path, monkeypatch):
    ps.tl.rank_genes_groups(screen, **DE)
    ps.tl.rank_genes_groups(screen, **DE, method="t-test")
    expected = ps.compute(ps.get.result(screen, "t-test"), scheduler=S)
    path = ps.write(screen, tmp_path / "screen.zarr")
    monkeypatch.setattr(ps.io._read, "LAZY_BYTES", 0)  # every stored array lazy, however small
    with dask.config.set(scheduler=_no_compute):
        ds = ps.get.dataset(path, method="t-test")
        both = ps.get.compare(path)
        assert all(isinstance(v.data, dask.array.Array) for v in ds.data_vars.values())
        assert sorted(both["result"].values) == ["t-test", "wilcoxon"]
    assert_close(ds["pvals"].compute().values, expected.layers["pvals"])
    t = both.sel(result="t-test")["scores"].values
    assert_close(t, expected.layers["scores"])


def test_open_releases_file_handles_on_exit(screen, tmp_path):
    ps.pp.pca(screen, n_comps=3)
    path = ps.write(screen, tmp_path / "screen.h5ad")
    ps.io._read.OPENED_INPUTS.discard(path.resolve())
    with ps.open(path) as adata:
        assert adata.obsm["X_pca"].shape == (screen.n_obs, 3)
        handle = h5py.File(path, "r")  # e.g. one a user or a library left open
        assert path.resolve() in ps.io._read.OPENED_INPUTS
        with pytest.raises(ValueError, match="would overwrite the input"):
            ps.write(screen, path)
    assert not handle.id.valid
    assert path.resolve() not in ps.io._read.OPENED_INPUTS
    ps.write(screen, path)  # may be written again


def test_values_changed_in_place_are_seen_and_recomputed(screen, tmp_path, monkeypatch):
    import pertscale.pb as pb

    calls = []
    original = pb._pseudobulk
    monkeypatch.setattr(pb, "_pseudobulk", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = ps.pb.pseudobulk(screen, layer="counts")
    screen.layers["counts"][0, 0] += 5  # same names, same shape, other values
    second = ps.pb.pseudobulk(screen, layer="counts")
    assert len(calls) == 2 and second is not first
    assert np.asarray(second.X).sum() == np.asarray(first.X).sum() + 5
    # a lazy matrix is named by its graph: normalizing again is another matrix
    lazy = ps.read(ps.write(screen, tmp_path / "screen.h5ad"))
    n_runs = len(ps.store.history(lazy))
    ps.tl.rank_genes_groups(lazy, **DE, method="t-test")
    ps.tl.rank_genes_groups(lazy, **DE, method="t-test")
    assert len(ps.store.history(lazy)) == n_runs + 1
    ps.pp.normalize_total(lazy)
    with pytest.warns(UserWarning, match="not marked as log1p"):  # normalize_total's values are not log1p ones
        ps.tl.rank_genes_groups(lazy, **DE, method="t-test")
    assert len(ps.store.history(lazy)) == n_runs + 2


def test_anndata_writes_and_reads_the_store_as_it_is(screen, tmp_path, monkeypatch):
    ps.pp.pca(screen, n_comps=3)
    res = ps.compute(ps.tl.rank_genes_groups(screen, **DE, method="t-test"), scheduler=S)
    ps.store.put(screen, ps.get.result(screen, "t-test", return_settings=True)[0], res)
    screen.write_h5ad(tmp_path / "plain.h5ad")  # anndata's own writer, no pertscale involved
    plain = ad.read_h5ad(tmp_path / "plain.h5ad")
    ps.ensure_result_keys(plain)
    assert_close(ps.get.result(plain, "t-test").layers["pvals"], res.layers["pvals"])
    # in memory, X is as written: the stored results are reused
    import pertscale.tl._rank_genes_groups as rgg

    monkeypatch.setattr(rgg, "_test", lambda *a, **k: pytest.fail("recomputed a stored result"))
    written = ps.write(screen, tmp_path / "ours.h5ad")
    ours = ad.read_h5ad(written)
    ps.ensure_result_keys(ours)
    ps.tl.rank_genes_groups(ours, **DE, method="t-test")


def test_changed_labels_are_seen_and_recomputed(screen):
    first = ps.tl.rank_genes_groups(screen, **DE, method="t-test")
    labels = screen.obs["perturbation"].astype(str).to_numpy().copy()
    labels[labels == "P0001"] = "P0002"  # relabel: same names, same matrix, other groups
    screen.obs["perturbation"] = pd.Categorical(labels)
    second = ps.tl.rank_genes_groups(screen, **DE, method="t-test")
    assert second is not first and "P0001" not in second.obs_names and "P0001" in first.obs_names


def test_views_are_not_stored_and_raw_is_written(screen, tmp_path):
    first = ps.tl.rank_genes_groups(screen, **DE)
    view = screen[screen.obs["perturbation"].isin(["control", "P0000", "P0001"])]
    sub = ps.tl.rank_genes_groups(view, **DE)
    assert sub.n_obs == 2 and view.is_view
    assert ps.get.result(screen, "wilcoxon") is first and len(ps.store.history(screen)) == 1
    screen.raw = screen
    raw = ps.read(ps.write(screen, tmp_path / "raw.h5ad"), use_raw=True)
    assert list(raw.var_names) == list(screen.raw.var_names)
    assert_close(_dense(raw.X), _dense(screen.raw.X).astype(raw.X.dtype))


def test_a_result_reused_on_a_view_leaves_the_parents_records_alone(screen):
    ps.tl.rank_genes_groups(screen, **DE, alternative="greater")
    ps.tl.rank_genes_groups(screen, **DE)  # the latest de_wilcoxon: two-sided
    latest = dict(screen.uns["pertscale"]["latest"])
    view = screen[:, :]  # the same cells and genes: the stored result is reused
    assert view.is_view
    again = ps.tl.rank_genes_groups(view, **DE, alternative="greater")
    assert again is ps.get.result(screen, "wilcoxon", alternative="greater")
    assert dict(screen.uns["pertscale"]["latest"]) == latest


def test_reuse_survives_text_labels_and_sees_new_dispersions(screen, tmp_path):
    screen.obs["perturbation"] = screen.obs["perturbation"].astype(str)  # anndata reads it back as categorical
    ps.tl.rank_genes_groups(screen, **DE, method="t-test")
    back = ps.read(ps.write(screen, tmp_path / "s.h5ad"))
    n = len(ps.store.history(back))
    ps.tl.rank_genes_groups(back, **DE, method="t-test")
    assert len(ps.store.history(back)) == n
    kw = {"method": "nb-glm", "layer": "counts", "perturbations": ["P0000"]}
    _nbglm_steps(screen)
    first = ps.tl.rank_genes_groups(screen, **DE, **kw)
    assert ps.tl.rank_genes_groups(screen, **DE, **kw) is first
    screen.var["dispersion"] = screen.var["dispersion"] * 10
    assert ps.tl.rank_genes_groups(screen, **DE, **kw) is not first
    with pytest.raises(ValueError, match="covariates are supported by method='nb-glm'"):
        ps.tl.rank_genes_groups(screen, **DE, covariates=["target_gene"])
    assert ps.pp.qc_summary(screen, perturbation_column="perturbation", exclude_labels=None, min_genes=1).min_genes == 1

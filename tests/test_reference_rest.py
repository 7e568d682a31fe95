"""rank_genes_groups(reference="rest"): every group against all other cells (scanpy's default reference).

References: scipy's ``mannwhitneyu`` and ``ttest_ind`` of the group against the rest, and scanpy's own
``rank_genes_groups(reference="rest")`` on the same log1p-normalized cells of the Papalexi screen; chunk and
scheduler invariance on the simulated screen; bad input.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats

import pertscale as ps

from .conftest import assert_close, real_path

sc = pytest.importorskip("scanpy", reason="the scanpy reference needs scanpy (pip install -e '.[test]')")

#: Labels the screens carry that are not perturbations.
EXCLUDED = ["multiple", "unassigned"]
#: Papalexi groups compared with scipy (each comparison ranks all ~20,000 cells): the control, the
#: smallest group, a large one and a middling one.
SCIPY_GROUPS = ("control", "SPI1", "IFNGR1", "MYC")
#: The statistics every run must reproduce exactly across chunkings and schedulers.
LAYERS = ("scores", "pvals", "pvals_adj", "logfoldchanges", "pts", "pts_rest")


def _prepared(path_or_adata, *, chunk_size=None) -> ad.AnnData:
    a = ps.read(path_or_adata, chunk_size=chunk_size) if not isinstance(path_or_adata, ad.AnnData) else path_or_adata
    a = ps.pp.filter_perturbations(
        a, perturbation_column="perturbation", control_label="control", exclude_labels=EXCLUDED
    )
    ps.pp.normalize_total(a, target_sum=1e4)
    ps.pp.log1p(a)
    return a


def _rest(adata, method, *, scheduler="synchronous", **kw):
    res = ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", method=method, reference="rest", **kw)
    with ps.settings.override(progress=False):  # module-scoped fixtures run outside conftest's _quiet
        return ps.compute(res, scheduler=scheduler)


def _dense(adata):
    x = adata.X.compute() if hasattr(adata.X, "compute") else adata.X
    return x.toarray().astype(np.float64), adata.obs["perturbation"].astype(str).to_numpy()


def _max_rel(actual, expected):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    ok = np.isfinite(expected) & (expected != 0)
    return float(np.max(np.abs(actual[ok] - expected[ok]) / np.abs(expected[ok])))


# ------------------------------------------------------------------------------------------- the real screen


@pytest.fixture(scope="module")
def papalexi() -> ad.AnnData:
    """The Papalexi screen, log1p-normalized by pertscale (lazy, 4,000-row chunks)."""
    return _prepared(real_path("papalexi"), chunk_size=4_000)


@pytest.fixture(scope="module")
def papalexi_dense(papalexi):
    return _dense(papalexi)


@pytest.fixture(scope="module")
def ours(papalexi) -> dict[str, ad.AnnData]:
    """Every label against the rest, each method (control_label not given: scanpy's groups='all')."""
    return {m: _rest(papalexi, m) for m in ("wilcoxon", "t-test", "t-test_overestim_var")}


@pytest.fixture(scope="module")
def scanpy_rest(papalexi_dense, papalexi):
    """scanpy's rank_genes_groups(reference='rest') on the same values, per method."""
    x, labels = papalexi_dense
    ref = ad.AnnData(
        x.astype(np.float32),
        obs=pd.DataFrame({"perturbation": pd.Categorical(labels)}, index=papalexi.obs_names),
        var=pd.DataFrame(index=papalexi.var_names),
    )
    ref.uns["log1p"] = {"base": None}
    out = {}
    for method in ("wilcoxon", "t-test", "t-test_overestim_var"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.PerformanceWarning)  # scanpy's own DataFrame building
            warnings.simplefilter("ignore", RuntimeWarning)  # scipy on genes without variance
            sc.tl.rank_genes_groups(
                ref, "perturbation", reference="rest", method=method, tie_correct=True, pts=True, key_added=method
            )
        out[method] = ref
    return out


@pytest.mark.parametrize("use_continuity", [False, True])
def test_wilcoxon_rest_equals_scipy_mannwhitneyu(papalexi, papalexi_dense, ours, use_continuity):
    x, labels = papalexi_dense
    if use_continuity:
        res = _rest(papalexi, "wilcoxon", perturbations=list(SCIPY_GROUPS), use_continuity=True)
    else:
        res = ours["wilcoxon"]
    worst = 0.0
    for g in SCIPY_GROUPS:
        r = stats.mannwhitneyu(
            x[labels == g], x[labels != g], use_continuity=use_continuity, method="asymptotic", axis=0
        )
        defined = ~np.isnan(r.pvalue)
        assert defined.sum() > 0.9 * defined.size
        row = res[g]
        assert_close(row.layers["u_statistic"][0], r.statistic, rtol=0, err_msg=g)  # U of the group, exactly
        assert_close(row.layers["pvals"][0][defined], r.pvalue[defined], rtol=1e-12, atol=1e-300, err_msg=g)
        assert (row.layers["pvals"][0][~defined] == 1).all()  # every value tied: scanpy's convention
        worst = max(worst, _max_rel(row.layers["pvals"][0][defined], r.pvalue[defined]))
        assert row.obs["n_cells"].iloc[0] == (labels == g).sum()
    print(f"wilcoxon rest vs scipy (use_continuity={use_continuity}): max relative error of pvals {worst:.3g}")


def test_ttest_rest_equals_scipy_welch(papalexi_dense, ours):
    x, labels = papalexi_dense
    res = ours["t-test"]
    worst = {"scores": 0.0, "pvals": 0.0}
    for g in SCIPY_GROUPS:
        grp, rest = x[labels == g], x[labels != g]
        with np.errstate(invalid="ignore", divide="ignore"):
            r = stats.ttest_ind(grp, rest, equal_var=False, axis=0)
        defined = ~np.isnan(r.pvalue)
        assert defined.sum() > 0.9 * defined.size
        row = res[g]
        assert_close(row.layers["scores"][0][defined], r.statistic[defined], rtol=1e-9, err_msg=g)
        assert_close(row.layers["pvals"][0][defined], r.pvalue[defined], rtol=1e-9, atol=1e-300, err_msg=g)
        assert (row.layers["scores"][0][~defined] == 0).all() and (row.layers["pvals"][0][~defined] == 1).all()
        for name, ref in (("scores", r.statistic), ("pvals", r.pvalue)):
            worst[name] = max(worst[name], _max_rel(row.layers[name][0][defined], ref[defined]))
        # the rest's own descriptive statistics
        mean_rest = rest.mean(axis=0)
        expected_lfc = np.log2((np.expm1(grp.mean(axis=0)) + 1e-9) / (np.expm1(mean_rest) + 1e-9))
        assert_close(row.layers["logfoldchanges"][0], expected_lfc, rtol=1e-9, atol=1e-9, err_msg=g)
        assert_close(row.layers["pts_rest"][0], (rest != 0).mean(axis=0), rtol=1e-12, err_msg=g)
    # t-test_overestim_var: the group's count in place of the rest's (scanpy's hack), rest moments unchanged
    over = ours["t-test_overestim_var"]
    for g in SCIPY_GROUPS:
        grp, rest = x[labels == g], x[labels != g]
        with np.errstate(invalid="ignore", divide="ignore"):
            r = stats.ttest_ind_from_stats(
                grp.mean(0), grp.std(0, ddof=1), len(grp), rest.mean(0), rest.std(0, ddof=1), len(grp), False
            )
        defined = ~np.isnan(r.pvalue)
        assert_close(over[g].layers["pvals"][0][defined], r.pvalue[defined], rtol=1e-9, atol=1e-300, err_msg=g)
    print(f"t-test rest vs scipy: max relative error {worst}")


@pytest.mark.parametrize("method", ["wilcoxon", "t-test", "t-test_overestim_var"])
def test_rest_equals_scanpy(ours, scanpy_rest, method):
    ref, res = scanpy_rest[method], ours[method]
    assert list(res.obs_names) == list(ref.uns[method]["names"].dtype.names)  # every label, scanpy's order
    worst = dict.fromkeys(("scores", "pvals", "logfoldchanges", "pts_rest"), 0.0)
    for g in res.obs_names:
        df = sc.get.rank_genes_groups_df(ref, g, key=method, pval_cutoff=None).set_index("names").loc[res.var_names]
        pts_rest = ref.uns[method]["pts_rest"][g].loc[res.var_names].to_numpy()
        row = res[g]
        if method == "wilcoxon":
            # exact rank sums on both sides; scanpy stores scores as float32
            assert_close(row.layers["scores"][0], df["scores"], rtol=1e-6, atol=1e-6, err_msg=g)
            assert_close(row.layers["pvals"][0], df["pvals"], rtol=1e-9, err_msg=g)
            assert_close(row.layers["pvals_adj"][0], df["pvals_adj"], rtol=1e-9, err_msg=g)
        else:
            # scanpy: one-pass variances (float32 squares summed in float64), scores stored as float32
            assert_close(row.layers["scores"][0], df["scores"], rtol=1e-4, atol=1e-5, err_msg=g)
            logp = (-np.log(np.maximum(p, 1e-300)) for p in (row.layers["pvals"][0], df["pvals"].to_numpy()))
            assert_close(*logp, rtol=1e-4, atol=1e-9, err_msg=g)
        assert_close(row.layers["logfoldchanges"][0], df["logfoldchanges"], rtol=1e-5, atol=1e-5, err_msg=g)
        assert_close(row.layers["pts"][0], df["pct_nz_group"], rtol=1e-12, err_msg=g)
        assert_close(row.layers["pts_rest"][0], pts_rest, rtol=1e-12, err_msg=g)
        for name, theirs in (
            ("scores", df["scores"]),
            ("pvals", df["pvals"]),
            ("logfoldchanges", df["logfoldchanges"]),
            ("pts_rest", pts_rest),
        ):
            worst[name] = max(worst[name], _max_rel(row.layers[name][0], theirs))
    print(f"{method} rest vs scanpy: max relative error {worst}")


def test_control_label_given_is_part_of_the_rest_and_not_tested(papalexi, ours):
    res = _rest(papalexi, "wilcoxon", control_label="control")
    assert "control" not in res.obs_names
    assert list(res.obs_names) == [g for g in ours["wilcoxon"].obs_names if g != "control"]
    for layer in LAYERS:  # the same comparisons: the control cells are in every rest either way
        np.testing.assert_array_equal(res.layers[layer], ours["wilcoxon"][res.obs_names].layers[layer], err_msg=layer)
    assert res.uns["pertscale"]["settings"]["reference"] == "rest"
    assert "n_control_cells" not in res.uns["pertscale"]["settings"]
    # listed, the control label is tested against the rest too
    listed = _rest(papalexi, "t-test", control_label="control", perturbations=["control", "SPI1"])
    np.testing.assert_array_equal(listed.layers["scores"], ours["t-test"][["control", "SPI1"]].layers["scores"])


# ------------------------------------------------------------------------------ invariance, store, bad input


@pytest.mark.parametrize("method", ["wilcoxon", "t-test"])
def test_rest_does_not_depend_on_chunking_or_scheduler(sim_h5ad, method):
    base = _rest(_prepared(sim_h5ad, chunk_size=2_999), method, control_label="control")
    for chunk_size, scheduler in ((97, "synchronous"), (997, "threads")):
        res = _rest(_prepared(sim_h5ad, chunk_size=chunk_size), method, control_label="control", scheduler=scheduler)
        assert list(res.obs_names) == list(base.obs_names)
        for layer in LAYERS:
            np.testing.assert_array_equal(res.layers[layer], base.layers[layer], err_msg=f"{layer} {chunk_size}")


def test_rest_and_control_results_are_stored_apart(sim_adata):
    adata = _prepared(sim_adata.copy())
    kw = {"perturbation_column": "perturbation", "control_label": "control", "method": "t-test"}
    vs_control = ps.tl.rank_genes_groups(adata, **kw)
    vs_rest = ps.tl.rank_genes_groups(adata, **kw, reference="rest")
    assert ps.tl.rank_genes_groups(adata, **kw, reference="rest") is vs_rest  # reused, not recomputed
    assert ps.get.result(adata, "t-test", reference="rest") is vs_rest
    assert ps.get.result(adata, "t-test", reference="control") is vs_control
    assert ps.get.result(adata, key="de_t-test_rest") is vs_rest
    c, r = ps.compute(vs_control, scheduler="synchronous"), ps.compute(vs_rest, scheduler="synchronous")
    assert not np.array_equal(c.layers["pts_rest"], r.layers["pts_rest"])
    ps.tl.scanpy_uns(r)
    assert r.uns["rank_genes_groups"]["params"]["reference"] == "rest"


def test_bad_reference(sim_adata):
    adata = _prepared(sim_adata.copy())
    kw = {"perturbation_column": "perturbation", "control_label": "control"}
    with pytest.raises(ValueError, match=r"reference 'others' is not supported; choose one of \('control', 'rest'\)"):
        ps.tl.rank_genes_groups(adata, **kw, reference="others")
    with pytest.raises(ValueError, match="method='nb-glm' tests against the control only.*reference='control'"):
        ps.tl.rank_genes_groups(adata, **kw, method="nb-glm", reference="rest", layer="counts")
    with pytest.raises(ValueError, match="control_label is required.*reference='rest'"):
        ps.tl.rank_genes_groups(adata, perturbation_column="perturbation")
    # a group that is (almost) every cell has no rest to compare with
    one = adata[:50].copy()
    one.obs["perturbation"] = pd.Categorical(["P"] * 49 + ["Q"])
    with pytest.raises(ValueError, match=r"\['P'\] leave fewer than 2 of the 50 cells"):
        ps.tl.rank_genes_groups(one, perturbation_column="perturbation", reference="rest", min_cells_per_perturbation=1)

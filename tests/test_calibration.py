"""ps.tl.calibration_check and ps.pl.calibration_qq: are the p-values uniform on control-only splits?

References: Uniform(0, 1) itself (the fractions below 0.05 and 0.01 and ``scipy.stats.kstest``), on the
control cells of both real screens for the Wilcoxon, t- and nb-glm tests; ``scipy.stats.kstest`` and
``scipy.stats.false_discovery_control`` for the summary of a block; deliberately miscalibrated tests that
the check must catch; reproducible splits; chunk-size invariance; the result store; bad input.

Measured (seed 0; random splits of 100 cells, Wilcoxon and t-test each against the other control cells,
nb-glm against the held-out ones; ``min_nonzero=7``; pooled fraction of p < 0.05, < 0.01, KS p, discoveries
at FDR 0.05 within each split):

- papalexi    wilcoxon 0.053 0.016 0.64 3;  t-test 0.048 0.013 0.30 4;  nb-glm 0.031 0.006 9e-33 0
- schraivogel wilcoxon 0.051 0.010 0.73 8;  t-test 0.050 0.011 0.85 14; nb-glm 0.057 0.012 0.15 9

With every gene (``min_nonzero=0``) the Welch t-test is anti-conservative (papalexi 0.127 0.095, 574
discoveries; schraivogel 0.069 0.032, 147): a gene absent from a split but present in the rest gets a
variance from one side only. The Wilcoxon test's fractions stay nominal (papalexi 0.048 0.015) but KS
rejects there (p = 4e-4): its normal approximation on genes with a few non-zero cells (measured against a
permutation test: 5x too small p-values for genes with 8-11 non-zero cells in a split of 100). nb-glm is
conservative on papalexi's low counts (186 UMI a cell). One split per non-targeting guide: papalexi's 9
guides are exchangeable (Wilcoxon 0.057 0.014 KS p 0.63); three of schraivogel's 30 are not (63
discoveries; 2 without them).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats

import pertscale as ps
from pertscale.pl._calibration import calibration_qq
from pertscale.tl._calibration import (
    KS_RESOLUTION,
    TABLE,
    CalibrationResult,
    adjust,
    calibration_check,
    histogram_edges,
    pooled_ks,
    random_splits,
    summarise_block,
)

from .conftest import assert_close, real_path

#: Labels of the screens that are not perturbations (the main job's QC leaves them out).
EXCLUDED = ["multiple", "unassigned"]
CHECK = {"perturbation_column": "perturbation", "control_label": "control"}
#: Random splits as large as a small perturbation, and SCEPTRE's pairwise QC on the summary.
RANDOM = {"guide_column": False, "group_size": 100, "min_nonzero": 7}


def _prepared(name: str) -> ad.AnnData:
    """A real screen as the main job prepares it: QC labels out, nb-glm's steps on the counts, then log1p."""
    a = ad.read_h5ad(real_path(name))
    a = ps.pp.filter_perturbations(
        a, perturbation_column="perturbation", control_label="control", exclude_labels=EXCLUDED
    )
    a.layers["counts"] = a.X
    with ps.settings.override(progress=False):
        ps.pp.size_factors(a, layer="counts")
        ps.tl.dispersions(a, perturbation_column="perturbation", layer="counts")
    ps.pp.normalize_total(a, target_sum=1e4)
    ps.pp.log1p(a)
    return a


@pytest.fixture(scope="module")
def papalexi():
    return _prepared("papalexi")


@pytest.fixture(scope="module")
def schraivogel():
    return _prepared("schraivogel")


def _figures(res: CalibrationResult) -> str:
    p = res.pooled
    return (
        f"{res.method} ({int(p['n_splits'])} splits, {int(p['n_tested'])} p-values): p<0.05 {p['frac_p05']:.4f}, "
        f"p<0.01 {p['frac_p01']:.4f}, KS D={p['ks_statistic']:.4f} p={p['ks_pvalue']:.3g}, "
        f"{int(p['n_discoveries'])} discoveries"
    )


# ------------------------------------------------------------------------------------ the real screens


@pytest.mark.parametrize("screen", ["papalexi", "schraivogel"])
@pytest.mark.parametrize("method", ["wilcoxon", "t-test"])
def test_uniform_on_real_control_cells(screen, method, request):
    adata = request.getfixturevalue(screen)
    res = calibration_check(adata, method=method, **CHECK, **RANDOM)
    print(f"\n{screen} {_figures(res)}")
    p = res.pooled
    n_control = int((adata.obs["perturbation"] == "control").sum())
    assert res.info["design"] == "random" and res.info["reference"] == "rest"
    assert (res.splits["n_cells"] == 100).all() and (res.splits["n_reference"] == n_control - 100).all()
    assert res.info["n_heldout"] >= 100  # a held-out control at least as large as the largest split
    assert p["ks_pvalue"] > 0.01, _figures(res)
    assert 0.035 < p["frac_p05"] < 0.065 and p["frac_p01"] < 0.02, _figures(res)
    assert p["n_discoveries"] <= 0.01 * p["n_tested"]


def test_guides_are_the_splits_when_known(papalexi, schraivogel, caplog):
    """One split per non-targeting guide (obs['guide_id'] detected): papalexi's are exchangeable,
    schraivogel's are not: three non-targeting guides have effects of their own (00022: ATP6V1C1 up
    1.0 log2, p = 1e-30), which random splits of the same cells do not show."""
    with caplog.at_level("INFO", logger="pertscale.tl._calibration"):
        res = calibration_check(papalexi, method="wilcoxon", min_nonzero=7, **CHECK)
    assert "obs['guide_id']" in caplog.text and "detected" in caplog.text
    guides = papalexi.obs.loc[papalexi.obs["perturbation"] == "control", "guide_id"].astype(str)
    assert res.info["design"] == "guides" and res.info["guide_column"] == "guide_id"
    assert sorted(res.splits.index) == sorted(guides.unique())
    assert_close(res.splits.loc[sorted(guides.unique()), "n_cells"], guides.value_counts().sort_index())
    print(f"\npapalexi guides {_figures(res)}")
    assert res.pooled["ks_pvalue"] > 0.01 and 0.035 < res.pooled["frac_p05"] < 0.065

    res = calibration_check(schraivogel, method="wilcoxon", min_nonzero=7, **CHECK)
    print(f"schraivogel guides {_figures(res)}")
    worst = res.splits.sort_values("n_discoveries", ascending=False)
    print(worst[["n_cells", "frac_p05", "ks_pvalue", "n_discoveries"]].head(4).to_string())
    assert res.pooled["ks_pvalue"] < 1e-4  # not uniform: ...
    flagged = {g[-5:] for g in worst.index[:3]}
    assert flagged == {"00006", "00013", "00022"}  # ... because these guides change expression
    assert tuple(res.smallest.iloc[0][["split", "gene"]]) == (
        worst.index[worst.index.str.endswith("00022")][0],
        "ATP6V1C1",
    )
    # without those three guides' cells, the other guides are exchangeable
    ctrl = schraivogel.obs["perturbation"] == "control"
    bad = ctrl & schraivogel.obs["guide_id"].astype(str).str[-5:].isin(sorted(flagged))
    clean = schraivogel[~bad.to_numpy()].copy()
    res = calibration_check(clean, method="wilcoxon", min_nonzero=7, **CHECK)
    print(f"schraivogel guides without 00006, 00013, 00022: {_figures(res)}")
    assert res.pooled["n_discoveries"] <= 5  # 63 with them (other guides differ a little: 0.070 below 0.05)


@pytest.mark.parametrize("screen", ["papalexi", "schraivogel"])
def test_nbglm_on_real_control_cells(screen, request):
    """nb-glm (held-out design, the real analysis's dispersions): calibrated on schraivogel (726 UMI a cell),
    conservative on papalexi (186 UMI a cell): the Wald test on genes below ~0.2 counts a cell hardly ever
    gives p < 0.05. Never anti-conservative."""
    adata = request.getfixturevalue(screen)
    res = calibration_check(adata, method="nb-glm", layer="counts", **CHECK, **RANDOM)
    print(f"\n{screen} {_figures(res)}")
    p = res.pooled
    assert res.info["reference"] == "control"
    assert (res.splits["n_reference"] == res.info["n_heldout"]).all() and res.info["n_heldout"] >= 100
    assert p["frac_p05"] < 0.065 and p["frac_p01"] < 0.02 and p["n_discoveries"] <= 0.01 * p["n_tested"]
    if screen == "schraivogel":
        assert p["ks_pvalue"] > 0.01 and p["frac_p05"] > 0.035
    else:
        assert p["ks_pvalue"] < 1e-6 and p["frac_p05"] < 0.04  # conservative, as measured


def test_default_random_splits_fit_a_small_control(papalexi, caplog):
    """Papalexi's perturbations (median 689 cells) are about as large as its control (2,304 cells): the drawn
    sizes are capped at a quarter of the control, and the splits still follow the perturbations' sizes."""
    with caplog.at_level("INFO", logger="pertscale.tl._calibration"):
        res = calibration_check(papalexi, method="wilcoxon", guide_column=False, **CHECK)
    assert "capped at 576" in caplog.text
    sizes = papalexi.obs["perturbation"].value_counts()
    allowed = set(np.minimum(sizes[sizes.index != "control"].to_numpy(), 576))
    assert len(res.splits) >= 3 and set(res.splits["n_cells"]) <= allowed
    assert res.info["n_heldout"] >= res.splits["n_cells"].max()


def test_miscalibrated_tests_are_caught(papalexi):
    """Welch's t-test on every gene (genes absent from a split) and the Wilcoxon test without tie correction
    on low-UMI data: KS rejects, in the direction of the fault."""
    ttest = calibration_check(papalexi, method="t-test", **CHECK, **(RANDOM | {"min_nonzero": 0}))
    print(f"\nt-test, every gene: {_figures(ttest)}")
    assert ttest.pooled["ks_pvalue"] < 1e-10 and ttest.pooled["frac_p01"] > 0.05  # anti-conservative
    assert ttest.pooled["n_discoveries"] > 100
    untied = calibration_check(papalexi, method="wilcoxon", tie_correct=False, **CHECK, **RANDOM)
    print(f"wilcoxon, tie_correct=False: {_figures(untied)}")
    assert untied.pooled["ks_pvalue"] < 1e-10 and untied.pooled["frac_p05"] < 0.03  # conservative


def test_qq_plot(papalexi, tmp_path):
    kw = CHECK | RANDOM
    results = [calibration_check(papalexi, method=m, **kw) for m in ("wilcoxon", "t-test")]
    untied = calibration_check(papalexi, method="wilcoxon", tie_correct=False, **kw)
    path = tmp_path / "qq.png"
    ax = calibration_qq(results, save=path)
    assert path.stat().st_size > 10_000
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    drawn = [line.get_xydata() for line in ax.lines]
    assert labels[0].startswith("95% band") and labels[1].startswith("wilcoxon:") and labels[2].startswith("t-test:")
    ax = calibration_qq({"calibrated": results[0], "tie_correct=False": untied}, save=tmp_path / "qq2.png")
    # the conservative curve lies below the diagonal, the calibrated one near it
    below = ax.lines[-2].get_xydata()  # the last line is the diagonal
    assert np.median(below[:, 1] - below[:, 0]) < -0.2
    # the table a run writes (calibration_pvalues.parquet) draws the same curves
    frame = pd.concat([r.qq_frame() for r in results], ignore_index=True)
    frame.to_parquet(tmp_path / "qq.parquet", index=False)
    ax2 = calibration_qq(pd.read_parquet(tmp_path / "qq.parquet"), save=tmp_path / "qq3.png")
    assert [t.get_text() for t in ax2.get_legend().get_texts()] == labels
    for xy, line in zip(drawn, ax2.lines, strict=True):
        assert_close(line.get_xydata(), xy, rtol=1e-12)
    with pytest.raises(TypeError, match="CalibrationResult"):
        calibration_qq(papalexi)
    with pytest.raises(ValueError, match="no \\['observed'\\] column"):
        calibration_qq(frame.drop(columns="observed"))
    with pytest.raises(ValueError, match="level"):
        calibration_qq(results[0], level=1.5)


# ------------------------------------------------------------------------------------- the summary itself


def test_block_summary_matches_scipy():
    rng = np.random.default_rng(3)
    p = rng.uniform(size=(6, 400)) ** 1.3  # a little anti-conservative
    p[0, :5] = np.nan
    nonzero = rng.integers(0, 30, size=p.shape)
    nonzero_ref = rng.integers(0, 300, size=p.shape)
    nonzero[1, :7] = 0
    nonzero_ref[1, :7] = 0  # no value on either side: untested
    edges = histogram_edges()
    out = summarise_block(
        p, nonzero, nonzero_ref, min_nonzero=5, fdr=0.1, corr_method="benjamini-hochberg", edges=edges, n_smallest=50
    )
    table = pd.DataFrame(out["table"], columns=TABLE)
    kept = np.isfinite(p) & ((nonzero > 0) | (nonzero_ref > 0)) & (nonzero >= 5) & (nonzero_ref >= 5)
    for i in range(p.shape[0]):
        q = p[i, kept[i]]
        ks = stats.kstest(q, "uniform")
        assert_close([table["ks_statistic"][i], table["ks_pvalue"][i]], [ks.statistic, ks.pvalue], rtol=1e-12)
        assert table["n_tested"][i] == q.size and table["n_p05"][i] == (q < 0.05).sum()
        assert table["n_discoveries"][i] == (stats.false_discovery_control(q) < 0.1).sum()
        assert_close(adjust(q, "benjamini-hochberg"), stats.false_discovery_control(q), rtol=1e-12)
    assert table["n_untested"].tolist()[:2] == [5, 7]
    assert out["histogram"].sum() == kept.sum()
    all_kept = p[kept]
    assert_close(out["smallest"][:, 0], np.sort(all_kept)[:50], rtol=0)
    d, d_p = pooled_ks(out["histogram"], edges)
    exact = stats.kstest(all_kept, "uniform")
    assert abs(d - exact.statistic) <= KS_RESOLUTION
    assert_close(d_p, stats.kstwo.sf(exact.statistic, all_kept.size), rtol=0.05)


def test_qq_points_of_uniform_pvalues():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(40, 500))
    edges = histogram_edges()
    out = summarise_block(
        p, np.ones_like(p), np.ones_like(p), min_nonzero=0, fdr=0.05, corr_method="benjamini-hochberg", edges=edges
    )
    res = CalibrationResult(
        splits=pd.DataFrame(),
        pooled=pd.Series(dtype=float),
        histogram=out["histogram"],
        edges=edges,
        smallest=pd.DataFrame({"pvals": out["smallest"][:, 0]}),
    )
    qq = res.qq(max_points=100_000)
    truth = np.sort(p.ravel())
    rank = qq["rank"].to_numpy().astype(int)
    exact = rank <= 1000
    assert_close(qq["observed"][exact], truth[rank[exact] - 1], rtol=0)
    # beyond the exact ones: the upper edge of the bin of the rank-th smallest value
    upper = qq["observed"][~exact].to_numpy()
    assert (truth[rank[~exact] - 1] < upper).all() and (upper - truth[rank[~exact] - 1] <= 1.0 / 2**14 + 1e-12).all()
    inside = (qq["lower"] <= qq["observed"]) & (qq["observed"] <= qq["upper"])
    assert inside.mean() > 0.8  # a pointwise 95 % band (neighbouring points are correlated)
    assert len(res.qq(max_points=300)) <= 301


# --------------------------------------------------------------------------------- splits and invariance


def test_splits_are_reproducible():
    sizes = np.array([40, 80, 120, 200])
    a = random_splits(3000, sizes_seen=sizes, n_splits=None, group_size=None, seed=5, min_cells=2)
    b = random_splits(3000, sizes_seen=sizes, n_splits=None, group_size=None, seed=5, min_cells=2)
    c = random_splits(3000, sizes_seen=sizes, n_splits=None, group_size=None, seed=6, min_cells=2)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert not np.array_equal(a.codes, c.codes)
    assert set(a.sizes) <= set(sizes) and a.n_heldout >= a.sizes.max()
    assert a.sizes.sum() + a.n_heldout == 3000
    # greedy: one more split of any size would leave too small a held-out control
    assert a.n_heldout < 2 * sizes.max() + sizes.max()


@pytest.mark.parametrize(
    "scheduler",
    [
        "synchronous",
        "threads",
        pytest.param("processes", marks=pytest.mark.slow),  # ~15 s: the worker processes start
        pytest.param("distributed", marks=[pytest.mark.slow, pytest.mark.cluster]),
    ],
    indirect=True,
)
def test_result_reproducible_and_chunk_invariant(sim_adata, scheduler):
    a = sim_adata.copy()
    ps.pp.normalize_total(a, target_sum=1e4)
    ps.pp.log1p(a)
    kw = CHECK | {"method": "wilcoxon", "guide_column": False, "group_size": 40, "seed": 3}
    first = calibration_check(a, **kw)
    again = calibration_check(a, force=True, **kw)
    other = calibration_check(a, **(kw | {"seed": 4}))
    b = a.copy()
    b.X = a.X.rechunk({0: 97})
    with ps.cluster.using(scheduler):
        chunked = calibration_check(b, **kw)
    assert first.splits.shape[0] == int((a.obs["perturbation"] == "control").sum()) // 40 - 1
    for res in (again, chunked):
        pd.testing.assert_frame_equal(res.splits, first.splits)
        np.testing.assert_array_equal(res.histogram, first.histogram)
        pd.testing.assert_frame_equal(res.smallest, first.smallest)
    assert not np.array_equal(other.histogram, first.histogram)


def test_stored_and_reused(sim_adata, tmp_path, monkeypatch):
    a = sim_adata.copy()
    ps.pp.normalize_total(a, target_sum=1e4)
    ps.pp.log1p(a)
    kw = CHECK | {"method": "t-test", "guide_column": False, "group_size": 50}
    res = calibration_check(a, **kw)
    from pertscale.tl import _calibration

    def fail(*args, **kwargs):
        raise AssertionError("the stored result was not reused")

    monkeypatch.setattr(_calibration, "_check", fail)
    again = calibration_check(a, **kw)
    pd.testing.assert_frame_equal(again.splits, res.splits)
    settings, stored = ps.store.select(a, method="calibration")
    assert settings.test == "t-test" and settings.guide_column is None and settings.call_args()["guide_column"] is False
    a.X = a.X.compute()
    path = tmp_path / "screen.h5ad"
    a.write_h5ad(path)
    back = ad.read_h5ad(path)
    ps.store.ensure_result_keys(back)
    _, stored = ps.store.select(back, method="calibration")
    read = CalibrationResult.from_stored(stored)
    pd.testing.assert_frame_equal(read.splits, res.splits, check_dtype=False)
    assert_close(read.pooled[res.pooled.index], res.pooled)
    np.testing.assert_array_equal(read.histogram, res.histogram)


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_input(sim_adata, papalexi):
    a = sim_adata.copy()
    ps.pp.normalize_total(a, target_sum=1e4)
    ps.pp.log1p(a)
    n_control = int((a.obs["perturbation"] == "control").sum())
    with pytest.raises(ValueError, match=rf"need 6,?0[0-9]{{2}} control cells .* there are {n_control}"):
        calibration_check(a, n_splits=30, group_size=195, guide_column=False, **CHECK)
    with pytest.raises(ValueError, match="at least two are needed: pass a smaller group_size"):
        calibration_check(a, group_size=n_control // 2, guide_column=False, **CHECK)
    with pytest.raises(KeyError, match="guide_column 'sgRNA' not found in obs.*guide_column=False"):
        calibration_check(a, guide_column="sgRNA", **CHECK)
    with pytest.raises(ValueError, match="method 'mann-whitney' is not available"):
        calibration_check(a, method="mann-whitney", **CHECK)
    with pytest.raises(ValueError, match="reference='control'"):
        calibration_check(a, method="nb-glm", reference="rest", layer="counts", **CHECK)
    with pytest.raises(ValueError, match=r"\['perturbations'\] are set by calibration_check"):
        calibration_check(a, perturbations=["g1"], guide_column=False, **CHECK)
    with pytest.raises(ValueError, match="control_label 'NT' not found"):
        calibration_check(a, perturbation_column="perturbation", control_label="NT")
    with pytest.raises(ValueError, match="fdr"):
        calibration_check(a, fdr=1.0, guide_column=False, **CHECK)
    with pytest.raises(ValueError, match="n_splits and group_size make random splits.*guide_id.*detected"):
        calibration_check(papalexi, n_splits=5, **CHECK)

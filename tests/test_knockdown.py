"""Knock-down, escapers, guides as groups, guide concordance, the effect table and the long export.

References: scipy's Mann-Whitney U and numpy on the raw counts of the real
screens, numpy's percentiles of the control cells, numpy's correlation,
pyarrow's reader; chunk-size invariance.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import scipy.stats as st

import pertscale as ps
from pertscale.kernels import knockdown as kd_kernels

from .conftest import assert_close, real_path

#: papalexi's perturbations whose target gene is among its 299 genes.
PAPALEXI_MEASURED = {"CMTM6", "IFNGR2", "JAK2", "NFKBIA", "STAT1", "STAT2", "STAT3", "TNFRSF14", "UBE2L6"}


def _papalexi(chunk_size=None):
    adata = ps.read(real_path("papalexi"), chunk_size=chunk_size)
    raw = ad.read_h5ad(real_path("papalexi"))
    ps.pp.normalize_total(adata)
    ps.pp.log1p(adata)
    return adata, raw


class _Logged:
    """The log1p values ps.pp made (normalization is tested against scanpy elsewhere), one gene at a time."""

    def __init__(self, adata):
        self.x = adata.X

    def __getitem__(self, key):
        _, g = key
        column = self.x[:, g : g + 1].compute()
        return sp.csr_matrix(column, dtype=np.float64)  # scipy computes in its input's precision


def _log1p_cp10k(raw, adata) -> _Logged:
    return _Logged(adata)


@pytest.fixture(scope="module")
def papalexi_knockdown():
    adata, raw = _papalexi()
    ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control")
    table = ps.tl.knockdown(adata, perturbation_column="perturbation", control_label="control")
    return adata, raw, table


def test_papalexi_measured_targets_are_knocked_down_as_scipy_sees_on_the_raw_counts(papalexi_knockdown):
    adata, raw, table = papalexi_knockdown
    measured = table[table["measured"]]
    assert set(measured.index) == PAPALEXI_MEASURED  # the nine targeted genes among the 299
    assert set(table.attrs["unmeasured"]) == set(table.index) - PAPALEXI_MEASURED
    logged = _log1p_cp10k(raw, adata)
    labels = raw.obs["perturbation"].astype(str).to_numpy()
    control = labels == "control"
    for pert, row in measured.iterrows():
        g = raw.var_names.get_loc(row["target"])
        group = labels == pert
        # the direction on the raw counts: the group's share of the target's UMIs below the control's
        counts = raw.X[:, g].toarray().ravel()
        totals = np.asarray(raw.X.sum(axis=1)).ravel()
        assert counts[group].sum() / totals[group].sum() < counts[control].sum() / totals[control].sum()
        assert row["logfoldchanges"] < 0 and row["knockdown_detected"]
        # the p-value: scipy's Mann-Whitney U on the log1p values
        values = logged[:, g].toarray().ravel()
        ref = st.mannwhitneyu(values[group], values[control], method="asymptotic", use_continuity=False)
        # (on the log scale: in the normal tail at z ~ 12-30 a 1e-7 difference in z moves p by 1e-5 relative)
        assert_close(np.log(row["pvals"]), np.log(ref.pvalue), rtol=1e-9, err_msg=pert)
        # the rank: 1 + genes with a smaller p-value (none ties here)
        # the control's median and the fraction of the group below it
        ctrl = values[control]
        assert row["control_median"] == pytest.approx(np.median(ctrl), rel=1e-12)
        assert row["fraction_below_control_median"] == pytest.approx(np.mean(values[group] < np.median(ctrl)))


def test_cell_scores_and_escapers_are_the_control_percentiles(papalexi_knockdown):
    adata, raw, table = papalexi_knockdown
    logged = _log1p_cp10k(raw, adata)
    labels = raw.obs["perturbation"].astype(str).to_numpy()
    ctrl_rows = labels == "control"
    for pert in ("STAT1", "JAK2", "TNFRSF14"):
        g = raw.var_names.get_loc(pert)
        values = logged[:, g].toarray().ravel()
        ctrl = values[ctrl_rows]
        rows = np.flatnonzero(labels == pert)
        expected = np.array([(np.sum(ctrl < v) + 0.5 * np.sum(ctrl == v)) / ctrl.size for v in values[rows]])
        got = adata.obs["knockdown_score"].to_numpy()[rows]
        # exact up to MAX_POINTS non-zero control values, within the documented bound beyond
        bound = (
            1e-12 if np.sum(ctrl != 0) <= kd_kernels.MAX_POINTS else np.mean(ctrl != 0) / (kd_kernels.MAX_POINTS - 1)
        )
        assert np.max(np.abs(got - expected)) <= bound + 1e-12
        assert_close(adata.obs["knockdown_value"].to_numpy()[rows], values[rows], rtol=1e-6)
        escaper = adata.obs["knockdown_escaper"].to_numpy()[rows]
        assert np.array_equal(escaper.astype(bool), values[rows] >= np.median(ctrl))
    # control cells and cells of unmeasured targets carry no score and no flag
    assert adata.obs.loc[ctrl_rows, "knockdown_score"].isna().all()
    assert adata.obs.loc[labels == "ATF2", "knockdown_escaper"].isna().all()


def test_thinned_control_values_bound_the_score_error(monkeypatch):
    rng = np.random.default_rng(3)
    control = sp.csr_matrix(np.where(rng.random((5000, 2)) < 0.3, 0, rng.gamma(2.0, 1.0, (5000, 2))))
    cells = rng.gamma(2.0, 1.0, 200)
    block = sp.csr_matrix(np.c_[cells, cells])
    monkeypatch.setattr(kd_kernels, "MAX_POINTS", 100_000)
    exact = kd_kernels.knockdown_scores(block, np.zeros(200, dtype=int), kd_kernels.control_targets(control))
    monkeypatch.setattr(kd_kernels, "MAX_POINTS", 64)
    thin = kd_kernels.knockdown_scores(block, np.zeros(200, dtype=int), kd_kernels.control_targets(control))
    col = control[:, 0].toarray().ravel()
    direct = np.array([(np.sum(col < v) + 0.5 * np.sum(col == v)) / col.size for v in cells])
    assert_close(exact[:, 1], direct, rtol=1e-12)
    share = np.mean(col != 0)
    assert np.max(np.abs(thin[:, 1] - direct)) <= share / 63 + 1e-12
    assert np.max(np.abs(thin[:, 1] - direct)) > 0  # the thinning was used


def test_knockdown_does_not_depend_on_the_row_blocks():
    tables, scores = [], []
    for chunk in (700, 20_729):
        adata, _ = _papalexi(chunk)
        tables.append(ps.tl.knockdown(adata, perturbation_column="perturbation", control_label="control"))
        scores.append(adata.obs[["knockdown_value", "knockdown_score", "knockdown_escaper"]].copy())
    pd.testing.assert_frame_equal(tables[0], tables[1])
    pd.testing.assert_frame_equal(scores[0], scores[1])


def test_knockdown_is_stored_by_settings_and_reused():
    adata, _ = _papalexi()
    ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control")
    first = ps.tl.knockdown(adata, perturbation_column="perturbation", control_label="control")
    again = ps.tl.knockdown(adata, perturbation_column="perturbation", control_label="control")
    assert again is first
    other = ps.tl.knockdown(adata, perturbation_column="perturbation", control_label="control", fdr=0)
    assert other is not first
    assert first["knockdown_detected"].sum() == 9 and not other["knockdown_detected"].any()
    # without a stored test the targets' statistics are missing, not made up
    bare, _ = _papalexi()
    assert ps.tl.knockdown(bare, perturbation_column="perturbation", control_label="control")["pvals"].isna().all()


def test_exclude_escapers_tests_only_the_knocked_down_cells(papalexi_knockdown):
    adata, raw, _ = papalexi_knockdown
    res = ps.compute(
        ps.tl.rank_genes_groups(
            adata, perturbation_column="perturbation", control_label="control", exclude_escapers=True
        )
    )
    labels = raw.obs["perturbation"].astype(str).to_numpy()
    escaper = adata.obs["knockdown_escaper"].to_numpy(dtype=float, na_value=0.0) == 1
    logged = _log1p_cp10k(raw, adata)
    g = raw.var_names.get_loc("PSMB9")
    values = logged[:, g].toarray().ravel()
    kept = (labels == "STAT1") & ~escaper
    assert res.obs.loc["STAT1", "n_cells"] == kept.sum() < (labels == "STAT1").sum()
    ref = st.mannwhitneyu(values[kept], values[labels == "control"], method="asymptotic", use_continuity=False)
    assert_close(res[["STAT1"], ["PSMB9"]].layers["pvals"][0, 0], ref.pvalue, rtol=1e-8)
    # a perturbation without a measured target keeps every cell
    assert res.obs.loc["ATF2", "n_cells"] == (labels == "ATF2").sum()


def test_guides_as_groups_against_control_equal_scipy():
    adata, raw = _papalexi()
    res = ps.compute(ps.tl.rank_genes_groups(adata, groupby="guide", control_label="control"))
    guides = raw.obs["guide_id"].astype(str).to_numpy()
    perts = raw.obs["perturbation"].astype(str).to_numpy()
    single = ~np.isin(perts, ["control", "multiple", "unassigned"])
    assert {"STAT1g1", "IFNGR2g1", "multiple"} <= set(res.obs_names)
    assert "control" not in res.obs_names and not any(n.startswith("NTg") for n in res.obs_names)
    logged = _log1p_cp10k(raw, adata)
    g = raw.var_names.get_loc("PSMB9")
    values = logged[:, g].toarray().ravel()
    group = single & (guides == "STAT1g2")
    assert res.obs.loc["STAT1g2", "n_cells"] == group.sum()
    ref = st.mannwhitneyu(values[group], values[perts == "control"], method="asymptotic", use_continuity=False)
    assert_close(res[["STAT1g2"], ["PSMB9"]].layers["pvals"][0, 0], ref.pvalue, rtol=1e-8)


def test_guide_concordance_is_the_correlation_over_de_genes():
    rng = np.random.default_rng(0)
    n_genes = 200
    effect = rng.normal(0, 1, n_genes) * (rng.random(n_genes) < 0.2)
    guides = ["Ag1", "Ag2", "Ag3", "Bg1", "Bg2"]
    lfc = np.vstack(
        [effect + rng.normal(0, 0.1, n_genes) for _ in range(2)]
        + [rng.normal(0, 1, n_genes)]  # Ag3 does something else
        + [effect[::-1] + rng.normal(0, 0.1, n_genes) for _ in range(2)]
    )
    padj = np.where(np.abs(lfc) > 0.5, 1e-4, 0.5)
    res = ad.AnnData(
        X=np.zeros_like(lfc),
        obs=pd.DataFrame(index=guides),
        var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
        layers={"logfoldchanges": lfc, "pvals_adj": padj},
    )
    targets = {g: g[0] for g in guides}
    table, pairs = ps.tl.guide_concordance(res, targets=targets, return_pairs=True)
    de = padj < 0.05
    genes = de[0] | de[1]
    expected = np.corrcoef(lfc[0, genes], lfc[1, genes])[0, 1]
    got = pairs.set_index(["guide_1", "guide_2"]).loc[("Ag1", "Ag2"), "correlation"]
    assert got == pytest.approx(expected, rel=1e-12)
    flagged = set(table.loc[table["discordant"], "guide"])
    assert flagged == {"Ag3"}
    with pytest.raises(ValueError, match="two tested guides"):
        ps.tl.guide_concordance(res, targets={g: f"T{i}" for i, g in enumerate(guides)})


def test_effect_table_and_long_export_against_numpy(tmp_path, sim_adata):
    adata = sim_adata.copy()
    adata.layers["counts"] = adata.X.copy()
    ps.pp.size_factors(adata, layer="counts")
    ps.tl.dispersions(adata, perturbation_column="perturbation", layer="counts")
    res = ps.compute(
        ps.tl.rank_genes_groups(
            adata, perturbation_column="perturbation", control_label="control", method="nb-glm", layer="counts"
        )
    )
    table = ps.tl.effect_table(res)
    lfc, se = res.layers["logfoldchanges_raw"], res.layers["lfcSE"]
    z, padj = res.layers["scores"], res.layers["pvals_adj"]
    for i, name in enumerate(res.obs_names):
        ok = np.isfinite(lfc[i]) & np.isfinite(se[i])
        assert table.loc[name, "impact"] == pytest.approx(np.mean(lfc[i, ok] ** 2 - se[i, ok] ** 2), rel=1e-10)
        tested = np.isfinite(z[i])
        assert table.loc[name, "impact_z"] == pytest.approx(np.mean(z[i, tested] ** 2 - 1), rel=1e-10)
        assert table.loc[name, "n_de_genes"] == np.sum(np.nan_to_num(padj[i], nan=1) < 0.05)
    paths = [tmp_path / f"long{k}.parquet" for k in (1, 2)]
    n = ps.tl.write_long(res, paths[0], rows_per_block=3)
    ps.tl.write_long(res, paths[1], rows_per_block=1000)
    first, second = (pq.read_table(p).to_pandas() for p in paths)
    pd.testing.assert_frame_equal(first, second)
    assert n == res.n_obs * res.n_vars == len(first)
    row = first.iloc[res.n_vars * 2 + 5]
    assert row["perturbation"] == res.obs_names[2] and row["gene"] == res.var_names[5]
    assert_close(row["standard_error"], res.layers["lfcSE_shrunk"][2, 5], rtol=0)
    assert_close(row["pvals_adj"], res.layers["pvals_adj"][2, 5], rtol=0)


def test_knockdown_and_guides_bad_input():
    adata, _ = _papalexi()
    with pytest.raises(ValueError, match="ps.tl.knockdown"):
        ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control",
                                exclude_escapers=True)  # fmt: skip
    with pytest.raises(ValueError, match="no cells"):
        ps.tl.knockdown(adata, perturbation_column="perturbation", control_label="NT")
    with pytest.raises(KeyError, match="target_column"):
        ps.tl.knockdown(adata, perturbation_column="perturbation", control_label="control", target_column="nope")
    bare = adata.copy()
    bare.obs = bare.obs[["perturbation"]]
    with pytest.raises(KeyError, match="Accepted: a per-cell guide column"):
        ps.tl.rank_genes_groups(bare, groupby="guide", control_label="control")
    with pytest.raises(TypeError, match="perturbation_column="):
        ps.tl.rank_genes_groups(adata, control_label="control")


def test_targets_matched_through_a_symbol_column_keep_their_statistics():
    adata, _ = _papalexi()
    symbols = adata.var_names.astype(str)
    adata.var["gene_symbols"] = symbols
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    res = ps.compute(ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control"))
    table = ps.tl.knockdown(adata, perturbation_column="perturbation", control_label="control", results=res)
    stat1 = table.loc["STAT1"]
    assert stat1["gene"] == adata.var_names[list(symbols).index("STAT1")]
    assert stat1["logfoldchanges"] < -4 and stat1["rank"] == 1 and stat1["knockdown_detected"]


def test_an_untested_target_has_no_rank_and_an_emptied_group_is_said():
    from pertscale.tl._knockdown import _rank_block

    ranks = _rank_block(np.array([[0.01, 0.2, np.nan, 0.5]]), np.array([[1.0, 2, 3, 4]]), np.array([[2]]))
    assert np.isnan(ranks[0])
    assert _rank_block(np.array([[0.01, 0.2, 0.3]]), np.array([[1.0, 2, 3]]), np.array([[2]]))[0] == 3
    adata, _ = _papalexi()
    ps.tl.knockdown(adata, perturbation_column="perturbation", control_label="control")
    adata.obs.loc[adata.obs["perturbation"] == "STAT1", "knockdown_escaper"] = True
    with pytest.warns(UserWarning, match="every cell of 1 perturbation"):
        res = ps.tl.rank_genes_groups(
            adata, perturbation_column="perturbation", control_label="control", exclude_escapers=True
        )
    assert "STAT1" not in res.obs_names


def test_guide_labels_follow_the_assignment_that_made_the_guide_column():
    adata = ad.read_h5ad(real_path("schraivogel"))
    ps.pp.assign_guides(adata, method="umi_threshold", threshold=5)
    labels = ps.tl.guide_labels(adata, control_label="control")
    assigned = adata.obs["perturbation_assigned"].astype(str)
    assert ((labels == "control") == (assigned == "control")).all()
    assert (labels[assigned == "multiple"] == "multiple").all()
    single = ~assigned.isin(["control", "multiple", "unassigned"])
    assert (labels[single] == adata.obs["perturbation_assigned_guide"].astype(str)[single]).all()


def test_knockdown_statistics_of_another_test_equal_a_knockdown_with_it(papalexi_knockdown):
    adata, _, table = papalexi_knockdown
    ttest = ps.compute(
        ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control", method="t-test")
    )
    direct = ps.tl.knockdown(adata, perturbation_column="perturbation", control_label="control", results=ttest)
    restated = ps.tl.knockdown_statistics(table, ttest)
    pd.testing.assert_frame_equal(restated[direct.columns], direct)
    assert not np.allclose(restated["pvals"].dropna(), table["pvals"].dropna(), rtol=1e-3, atol=0)  # the t-test's

"""The main job's screen-level steps: the same results as the public calls, in the output directory.

``pertscale run --assign-guides --guides --calibration --pca --energy-distance`` on schraivogel's
screen: the assigned labels are crispat's published ones, and every table equals the calls a user
makes on the run's own outputs (one path), and is shown in the report.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import pertscale as ps

from .conftest import assert_close, real_path


@pytest.fixture(scope="module")
def screen_run(tmp_path_factory):
    path = real_path("schraivogel")
    out = tmp_path_factory.mktemp("screen") / "out"
    summary = ps.run(
        path,
        out,
        perturbation_column="perturbation",
        control_label="control",
        assign_guides="umi_threshold",
        guides=True,
        calibration=True,
        pca=10,
        energy_distance=True,
        n_permutations=300,
        progress=False,
    )
    return path, out, summary


@pytest.mark.slow  # one run with every screen step (~1-2 min): CI's slow job
def test_assigned_labels_are_crispats_and_are_the_ones_tested(screen_run):
    path, out, _ = screen_run
    raw = ad.read_h5ad(path)
    guides = pd.read_parquet(out / "guides.parquet").set_index("cell")
    published = raw.obs["perturbation_crispat_umi_t5"].astype(str)
    assert (guides.loc[raw.obs_names, "perturbation_assigned"].astype(str) == published).all()
    res = ps.get.open_results(out / "de_wilcoxon.zarr")
    counts = published.value_counts()
    for p in ("MYC", "GATA1", "CCNE2"):  # QC keeps every cell of this screen's perturbations with >= 20 genes
        assert res.obs.loc[p, "n_cells"] <= counts[p]
        assert res.obs.loc[p, "n_cells"] >= 0.95 * counts[p]
    assert "multiple" not in res.obs_names


@pytest.mark.slow  # one run with every screen step (~1-2 min): CI's slow job
def test_the_run_tables_equal_the_public_calls_on_its_outputs(screen_run):
    _, out, _ = screen_run
    res = ps.compute(ps.get.open_results(out / "de_wilcoxon.zarr"))
    energy = pd.read_csv(out / "energy_distance.csv", index_col=0)
    knock = pd.read_csv(out / "de_wilcoxon_knockdown.csv", index_col=0)
    effects = pd.read_csv(out / "de_wilcoxon_effects.csv", index_col=0)
    again = ps.tl.effect_table(res, knockdown=knock, energy_distance=energy)
    pd.testing.assert_frame_equal(effects, again.astype(effects.dtypes.to_dict()), check_dtype=False)
    # the energy distance: the public call on the run's PCA scores and labels
    pca = ad.read_zarr(out / "pca.zarr")
    cells = ad.AnnData(obs=pca.obs[["perturbation_assigned"]].copy(), obsm={"X_pca": np.asarray(pca.obsm["X_pca"])})
    direct = ps.tl.energy_distance(
        cells, perturbation_column="perturbation_assigned", control_label="control", n_permutations=300
    )
    assert_close(energy.loc[direct.index, "edistance"].to_numpy(), direct["edistance"].to_numpy(), rtol=1e-10)
    assert_close(energy.loc[direct.index, "pvalue"].to_numpy(), direct["pvalue"].to_numpy(), rtol=1e-12)  # (CSV)
    # every measured target (this screen's CRISPRi targets that are in its 72-gene panel) knocked down
    measured = knock[knock["measured"]]
    assert len(measured) >= 5 and (measured["logfoldchanges"] < 0).all()
    long = pd.read_parquet(out / "de_wilcoxon.parquet")
    assert len(long) == res.n_obs * res.n_vars
    row = long.iloc[3]
    assert_close(row["pvals"], res[[row["perturbation"]], [row["gene"]]].layers["pvals"][0, 0], rtol=0)


@pytest.mark.slow  # one run with every screen step (~1-2 min): CI's slow job
def test_calibration_guides_and_report(screen_run):
    _, out, summary = screen_run
    table = pd.read_csv(out / "calibration.csv")
    pooled = table[table["split"] == "pooled"].iloc[0]
    assert pooled["method"] == "wilcoxon" and pooled["n_splits"] >= 2
    assert 0.02 < pooled["frac_p05"] < 0.1
    qq = pd.read_parquet(out / "calibration_pvalues.parquet")
    assert set(qq["method"]) == {"wilcoxon"}
    concordance = pd.read_csv(out / "guide_concordance.csv")
    assert concordance["target"].nunique() >= 10 and concordance["guide"].is_unique
    guides = ps.get.open_results(out / "de_guides.zarr")
    assert set(concordance["guide"]) <= set(guides.obs_names)
    page = (out / "report.html").read_text()
    for text in ("Calibration on control cells", "Energy distance to control", "effect of each perturbation"):
        assert text in page
    assert {"energy_distance", "calibration", "guide_concordance", "guides"} <= set(summary.files)


def test_an_empty_block_does_not_replace_the_first_blocks_spill(tmp_path):
    """The sort's scatter named an empty block's files as block 0's: whichever ran last won (rows went missing)."""
    import scipy.sparse as sp

    from pertscale.io._prepare import _assemble, _scatter

    block = sp.random(6, 4, density=0.6, format="csr", random_state=1)
    bounds = np.array([0, 6])
    spill = str(tmp_path / "spill")
    _scatter(block, np.arange(6), np.arange(6), bounds, spill, frozenset())
    _scatter(sp.csr_matrix((0, 4)), np.empty(0, np.int64), np.empty(0, np.int64), bounds, spill, frozenset())
    got = _assemble(0, bounds, 4, spill, "a sort", "again")
    assert abs(sp.csr_matrix(got, dtype=np.float64) - block).sum() < 1e-6

"""nb-glm through rank_genes_groups and the main job: PyDESeq2 references, invariance, bad input."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner
from scipy import stats

import pertscale as ps
from pertscale.cli import main
from pertscale.kernels.nbglm import NBGLM_STATS

from .conftest import assert_close, real_path


def _raw(path_or_adata, *, chunk_size=None):
    a = ps.read(path_or_adata, chunk_size=chunk_size) if not isinstance(path_or_adata, ad.AnnData) else path_or_adata
    return ps.pp.filter_perturbations(a, "perturbation", "control", exclude_labels=["multiple", "unassigned"])


def _run(adata, scheduler="synchronous", **kw):
    res = ps.tl.rank_genes_groups(adata, "perturbation", "control", method="nb-glm", scheduler=scheduler, **kw)
    return ps.compute(res, scheduler=scheduler)


def _pydeseq2(raw: ad.AnnData, group: str):
    """PyDESeq2 on the control and one perturbation, design ~condition, poscounts size factors."""
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.ds import DeseqStats

    sub = raw[raw.obs["perturbation"].isin(["control", group])]
    x = sub.X.toarray().astype(np.int64)
    keep = x.sum(axis=0) > 0
    obs = pd.DataFrame({"condition": np.where(sub.obs["perturbation"] == group, "B", "A")}, index=sub.obs_names)
    data = ad.AnnData(x[:, keep], obs=obs, var=pd.DataFrame(index=sub.var_names[keep]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(adata=data, design="~condition", size_factors_fit_type="poscounts", quiet=True)
        dds.deseq2()
        res = DeseqStats(dds, contrast=["condition", "B", "A"], quiet=True)
        res.summary()
    return res.results_df


@pytest.mark.parametrize("size_factor_method", ["sparse", "poscounts"])
def test_agrees_with_pydeseq2_per_comparison_on_papalexi(size_factor_method):
    pytest.importorskip("pydeseq2")
    path = real_path("papalexi")
    res = _run(_raw(path, chunk_size=5_000), size_factor_method=size_factor_method, shrink=False, scheduler="threads")
    raw = ad.read_h5ad(path)
    for group in ("IFNGR1", "BRD4", "CAV1"):  # a strong, a medium and a null perturbation
        ref = _pydeseq2(raw, group)
        ours = pd.DataFrame({k: res[group].layers[k][0] for k in ("logfoldchanges", "pvals")}, index=res.var_names)
        ours = ours.loc[ref.index]
        m = (ref["baseMean"] >= 1).to_numpy() & np.isfinite(ref["log2FoldChange"].to_numpy())
        assert m.sum() >= 40
        r = np.corrcoef(ours["logfoldchanges"][m], ref["log2FoldChange"][m])[0, 1]
        assert r >= 0.99, (group, r)
        rho = stats.spearmanr(-np.log10(ours["pvals"][m]), -np.log10(ref["pvalue"][m])).statistic
        assert rho >= 0.95, (group, rho)


def test_dispersions_equal_pydeseq2_fits_given_the_same_means():
    pytest.importorskip("pydeseq2")
    from pydeseq2.utils import fit_alpha_mle

    adata = ps.datasets.simulate_screen(1_500, 60, 4, control_fraction=0.3, seed=8)
    del adata.uns["simulation"]
    ps.pp.size_factors(adata, scheduler="synchronous")
    table = ps.tl.dispersions(adata, "perturbation", scheduler="synchronous", tol=1e-6)
    info = adata.uns["pertscale"]["dispersion"]
    x = adata.X.toarray().astype(np.float64)
    sf = adata.obs["size_factors"].to_numpy()
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    design = pd.get_dummies(labels).to_numpy(dtype=float)
    z = x / sf[:, None]
    means = (design.T @ z) / design.sum(axis=0)[:, None]  # the linear model's group means
    mu = np.maximum(sf[:, None] * (design @ means), info["min_mu"])
    checked = 0
    for j in np.flatnonzero(np.isfinite(table["dispersion"].to_numpy()))[:25]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            genewise, _ = fit_alpha_mle(x[:, j], design, mu[:, j], 0.5, 1e-8, 1_500.0)
            trend = table["dispersion_trend"].iloc[j]
            posterior, _ = fit_alpha_mle(
                x[:, j], design, mu[:, j], trend, 1e-8, 1_500.0, prior_disp_var=info["prior_variance"], prior_reg=True
            )
        assert_close(table["dispersion_genewise"].iloc[j], genewise, rtol=2e-3, err_msg=f"gene-wise {j}")
        if not table["dispersion_outlier"].iloc[j]:
            assert_close(table["dispersion"].iloc[j], posterior, rtol=2e-3, err_msg=f"MAP {j}")
        checked += 1
    assert checked >= 20
    assert table["dispersion_converged"].all()


def test_trend_recovers_a_known_curve():
    from pertscale.tl._nbglm import fit_trend

    rng = np.random.default_rng(0)
    mean = np.exp(rng.uniform(np.log(0.01), np.log(50), 3_000))
    truth = 0.1 + 2.0 / mean
    genewise = truth * rng.gamma(20.0, 1 / 20.0, mean.size)  # scatter around the curve
    fitted, info = fit_trend(genewise, mean, min_disp=1e-8)
    assert info["type"] == "parametric"
    assert_close([info["a0"], info["a1"]], [0.1, 2.0], rtol=0.05)
    assert_close(fitted, info["a0"] + info["a1"] / mean, rtol=1e-12)


@pytest.mark.parametrize("chunk_size", [211, 1_000])
def test_does_not_depend_on_chunking_or_caching(sim_h5ad, chunk_size):
    base = _run(_raw(sim_h5ad, chunk_size=3_000))
    other = _raw(sim_h5ad, chunk_size=chunk_size)
    ps.pp.size_factors(other, scheduler="synchronous")
    ps.tl.dispersions(other, "perturbation", cache=chunk_size == 211, scheduler="synchronous")
    res = _run(other)
    assert list(res.obs_names) == list(base.obs_names)
    for layer in NBGLM_STATS:
        assert_close(res.layers[layer], base.layers[layer], rtol=1e-6, atol=1e-12, err_msg=layer)


@pytest.mark.cluster
def test_distributed_equals_synchronous(sim_h5ad, cluster_client):
    sync = _run(_raw(sim_h5ad, chunk_size=700))
    dist = _run(_raw(sim_h5ad, chunk_size=700), scheduler=cluster_client)
    for layer in NBGLM_STATS:
        assert_close(dist.layers[layer], sync.layers[layer], rtol=1e-6, atol=1e-12, err_msg=layer)


def test_results_layout_units_and_stored_estimates(sim_adata):
    adata = _raw(sim_adata.copy())
    res = _run(adata, lfc_base="natural")
    assert set(NBGLM_STATS) == set(res.layers)
    assert res.uns["pertscale"]["settings"]["logfoldchanges_base"] == "natural"
    assert "size_factors" in adata.obs and "dispersion" in adata.var  # computed first, and kept
    assert adata.uns["pertscale"]["dispersion"]["method"] == "cox-reid"  # estimated, not the simulation's column
    assert_close(np.exp(np.log(adata.obs["size_factors"]).mean()), 1.0, rtol=1e-12)
    assert_close(res.var["dispersion"], adata.var["dispersion"])
    log2 = _run(adata)
    assert_close(log2.layers["logfoldchanges_raw"], res.layers["logfoldchanges_raw"] / np.log(2), rtol=1e-12)
    # recovers the simulated knock-downs
    targets = dict(
        zip(sim_adata.uns["simulation"]["perturbations"], sim_adata.uns["simulation"]["targets"], strict=False)
    )
    hits = [log2[g].layers["pvals_adj"][0, log2.var_names.get_loc(targets[g])] < 0.05 for g in log2.obs_names]
    assert np.mean(hits) >= 0.8


def test_bad_inputs_fail_early_with_the_fix(sim_adata):
    normalized = _raw(sim_adata.copy())
    ps.pp.normalize_total(normalized)
    ps.pp.log1p(normalized)
    with pytest.raises(ValueError, match=r"log1p-normalized.*nb-glm models raw counts.*layer='counts'"):
        ps.tl.rank_genes_groups(normalized, "perturbation", "control", method="nb-glm")
    fractional = sim_adata.copy()
    fractional.X = sp.csr_matrix(fractional.X.astype(np.float32) * 0.5)
    with pytest.raises(ValueError, match=r"non-integer values.*raw counts.*--layer counts"):
        ps.pp.size_factors(fractional, scheduler="synchronous")
    bad_sf = sim_adata.copy()
    bad_sf.obs["size_factors"] = 0.0
    with pytest.raises(ValueError, match="size factors must be positive finite"):
        ps.tl.rank_genes_groups(bad_sf, "perturbation", "control", method="nb-glm")
    with pytest.raises(ValueError, match="dispersion method 'magic'"):
        ps.tl.dispersions(sim_adata.copy(), "perturbation", size_factors=np.ones(sim_adata.n_obs), method="magic")
    with pytest.raises(KeyError, match=r"obs\['sf'\] not found.*ps.pp.size_factors"):
        ps.tl.dispersions(sim_adata.copy(), "perturbation", size_factors="sf")


def test_silent_genes_and_a_one_cell_group_do_not_crash(sim_adata):
    adata = sim_adata.copy()
    dense = adata.X.toarray()
    dense[:, 0] = 0  # never detected
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    labels[np.flatnonzero(labels == "P0001")[0]] = "LONELY"  # a perturbation of one cell
    adata.obs["perturbation"] = labels
    adata.X = sp.csr_matrix(dense)
    res = _run(adata, min_cells=1)
    assert np.isnan(res.var["dispersion"].iloc[0]) and np.isnan(res.layers["pvals"][:, 0]).all()
    assert np.isfinite(res["LONELY"].layers["standard_error"][0, 1:]).mean() > 0.5
    assert np.isfinite(res.layers["pvals"][:, 1:]).mean() > 0.9


@pytest.mark.parametrize("name", ["papalexi", "schraivogel"])
def test_main_job_runs_nb_glm_on_real_screens(name, tmp_path):
    path = real_path(name)
    out = tmp_path / "out"
    args = ["run", str(path), "--perturbation-column", "perturbation", "--control-label", "control"]
    args += ["--out", str(out), "--method", "nb-glm,wilcoxon", "--scheduler", "threads", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    res = ad.read_zarr(out / "de_nb_glm.zarr")
    assert set(NBGLM_STATS) == set(res.layers) and "dispersion" in res.var
    sf = pd.read_csv(out / "size_factors.csv")
    assert list(sf.columns) == ["cell", "perturbation", "size_factor"] and (sf["size_factor"] > 0).all()
    assert (out / "de_nb_glm_significant.csv").exists() and (out / "de_wilcoxon.zarr").exists()
    if name == "papalexi":  # the IFN-gamma pathway knock-outs lead, as with the Wilcoxon
        de = pd.read_csv(out / "de_nb_glm_significant.csv")["perturbation"].value_counts()
        assert {"IFNGR1", "IFNGR2", "STAT1", "JAK2"} <= set(de.index[:6])


def test_covariates_on_a_real_screen_and_their_bad_input():
    path = real_path("papalexi")
    adata = _raw(path, chunk_size=5_000)
    res = _run(adata, covariates=["bio_rep"], scheduler="threads")
    assert list(res.uns["pertscale"]["settings"]["covariates"]) == ["bio_rep"]
    assert adata.uns["pertscale"]["dispersion"]["covariates"] == "bio_rep"  # the design's groups: label x replicate
    plain = _run(_raw(path, chunk_size=5_000), scheduler="threads")
    # the IFN-gamma receptor knock-out still leads; the fold changes move, but not far
    top = pd.Series((res.layers["pvals_adj"] < 0.05).sum(axis=1), index=res.obs_names).sort_values()
    assert "IFNGR1" in top.index[-6:]
    m = (plain.layers["baseMean"] >= 1) & np.isfinite(res.layers["logfoldchanges_raw"])
    assert np.corrcoef(res.layers["logfoldchanges_raw"][m], plain.layers["logfoldchanges_raw"][m])[0, 1] > 0.95
    one = adata.copy()
    one.obs["batch"] = "b1"
    with pytest.raises(ValueError, match=r"covariate obs\['batch'\] has a single level.*leave it out"):
        ps.tl.rank_genes_groups(one, "perturbation", "control", method="nb-glm", covariates=["batch"])
    gaps = adata.copy()
    gaps.obs["bio_rep"] = gaps.obs["bio_rep"].astype(object)
    gaps.obs.iloc[3, gaps.obs.columns.get_loc("bio_rep")] = None
    with pytest.raises(ValueError, match=r"covariate obs\['bio_rep'\] has 1 missing values"):
        ps.tl.rank_genes_groups(gaps, "perturbation", "control", method="nb-glm", covariates=["bio_rep"])
    lonely = adata.copy()
    lonely.obs["side"] = np.where(lonely.obs["perturbation"] == "control", "a", "b")
    with pytest.raises(ValueError, match=r"level\(s\) \['b'\].*have no control cells"):
        ps.tl.rank_genes_groups(lonely, "perturbation", "control", method="nb-glm", covariates=["side"])
    with pytest.raises(ValueError, match="covariates are supported by method='nb-glm'"):
        ps.tl.rank_genes_groups(adata, "perturbation", "control", covariates=["bio_rep"])


def test_main_job_checks_covariates_before_any_pass(sim_h5ad, tmp_path, monkeypatch):
    import dask

    monkeypatch.setattr(dask, "compute", lambda *a, **k: pytest.fail("a pass ran before the covariates were checked"))
    args = ["run", str(sim_h5ad), "--perturbation-column", "perturbation", "--control-label", "control"]
    args += ["--out", str(tmp_path / "out"), "--method", "nb-glm", "--scheduler", "synchronous"]
    result = CliRunner().invoke(main, [*args, "--covariates", "nope"])
    assert result.exit_code == 1 and "covariate 'nope' not found in obs" in result.output
    assert not (tmp_path / "out").exists()

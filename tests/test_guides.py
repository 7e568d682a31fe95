"""Guide assignment (ps.pp.assign_guides): published assignments, an independent mixture fit, chunk invariance.

References: the Schraivogel screen's published crispat UMI-threshold
assignment (``obs['perturbation_crispat_umi_t5']``, crispat's ``ga_umi`` with
t = 5) and both screens' ``obs['perturbation']`` (their ``uns['label_rule']``);
for the mixture, a direct numerical maximisation (scipy L-BFGS-B from
several starts) of crispat's Poisson-Gaussian log posterior, written here
from ``scipy.stats`` densities, and simulated counts with known guides.
"""

from __future__ import annotations

import warnings

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats
from scipy.optimize import minimize
from scipy.special import expit, gammaln

from pertscale.kernels import guides as K
from pertscale.pp._guides import assign_guides, obs_columns

from .conftest import real_path

PUBLISHED = "perturbation_crispat_umi_t5"


@pytest.fixture(scope="module")
def schraivogel() -> ad.AnnData:
    return ad.read_h5ad(real_path("schraivogel"))


@pytest.fixture(scope="module")
def papalexi() -> ad.AnnData:
    return ad.read_h5ad(real_path("papalexi"))


def _labels(df: pd.DataFrame, key: str = "perturbation_assigned") -> np.ndarray:
    return df[key].astype(str).to_numpy()


# --------------------------------------------------------------------------- published assignments


def test_umi_threshold_equals_published_crispat_assignment(schraivogel):
    a = schraivogel.copy()
    df = assign_guides(a, method="umi_threshold", threshold=5)
    published = a.obs[PUBLISHED].astype(str).to_numpy()
    agreement = (_labels(df) == published).mean()
    assert agreement == 1.0  # measured: 21,977 of 21,977 cells
    # counting targets instead of guides (two guides of one target -> that target) agrees less: 98.2%
    collapsed = assign_guides(a, method="umi_threshold", threshold=5, collapse_targets=True, key_added="by_target")
    by_target = (_labels(collapsed, "by_target") == published).mean()
    assert 0.98 < by_target < 0.985, by_target
    x = a.obsm["grna_counts"].toarray()
    assert np.array_equal(df["perturbation_assigned_n_guides_detected"], (x >= 5).sum(1))
    # the data's own guide_* columns are left alone; ours are prefixed
    assert np.array_equal(a.obs["n_guides_detected"], (x > 0).sum(1))
    assert list(df.columns) == list(obs_columns("perturbation_assigned").values())
    pd.testing.assert_frame_equal(a.obs[df.columns], df)


@pytest.mark.parametrize("screen", ["schraivogel", "papalexi"])
def test_max_reproduces_published_perturbation(screen, request):
    a = request.getfixturevalue(screen).copy()
    df = assign_guides(a, method="max", min_fraction=0.5)
    assert np.array_equal(_labels(df), a.obs["perturbation"].astype(str).to_numpy())
    p = "perturbation_assigned_"
    assert np.array_equal(df[p + "guide_umi_max"], a.obs["guide_umi_max"])
    assert np.array_equal(df[p + "guide_umi_total"], a.obs["guide_umi_total"])
    np.testing.assert_array_equal(df[p + "guide_max_fraction"], a.obs["guide_max_fraction"])
    assert np.array_equal(df[p + "n_guides_detected"], a.obs["n_guides_detected"])
    assigned = ~np.isin(_labels(df), ["multiple", "unassigned"])
    assert np.array_equal(
        df[p + "guide"].astype(str).to_numpy()[assigned], a.obs["guide_id"].astype(str).to_numpy()[assigned]
    )


# --------------------------------------------------------------------------- the mixture


def _negative_log_posterior(theta, x, n):
    """crispat's model (poisson_gauss.py) from scipy densities; weights without prior (as pertscale)."""
    w, lam, mu, scale = expit(theta[0]), np.exp(theta[1]), theta[2], np.exp(theta[3])
    background = x * np.log(lam) - lam - gammaln(x + 1)  # log of crispat's poisson_prob(x, lam)
    mix = np.logaddexp(np.log1p(-w) + background, np.log(w) + stats.norm.logpdf(x, mu, scale))
    # mu ~ N(3, 2), scale ~ LogNormal(2, 1), lam ~ LogNormal(0, 1); a lognormal density is N(log v) / v
    prior = stats.norm.logpdf([mu, np.log(scale), np.log(lam)], [3, 2, 0], [2, 1, 1]).sum() - np.log(scale * lam)
    return -(n @ mix + prior)


def _scipy_fit(umi, n_cells):
    x, n = np.log2(umi.astype(float)), n_cells.astype(float)
    best = None
    for start in ([0, 0, 3, 0], [-1, -2, 6, 0], [-2, 0, 8, -0.5]):
        with np.errstate(all="ignore"):
            r = minimize(
                _negative_log_posterior, start, args=(x, n), method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-9}
            )
        if np.isfinite(r.fun) and (best is None or r.fun < best.fun):
            best = r
    w, lam, mu, scale = expit(best.x[0]), np.exp(best.x[1]), best.x[2], np.exp(best.x[3])
    # crispat's threshold: smallest t in 1..max whose P(normal component) > 0.5, with its own formulas
    t = np.arange(1, umi.max() + 1)
    normal = stats.norm.pdf(np.log2(t), mu, scale) * w
    poisson = lam ** np.log2(t) * np.exp(-lam) / np.exp(gammaln(np.log2(t) + 1)) * (1 - w)
    above = t[normal / (normal + poisson) > 0.5]
    return (w, lam, mu, scale), (above.min() if above.size else np.inf), best.fun


@pytest.mark.parametrize("screen", ["schraivogel", "papalexi"])
def test_mixture_equals_scipy_fit_of_the_same_model(screen, request):
    x = request.getfixturevalue(screen).obsm["grna_counts"]
    hist = K.histogram_block(x)
    fit = K.fit_poisson_gauss(hist, x.shape[1])
    for g in np.argsort(-fit.n_cells_nonzero)[[0, 30]]:  # guides with many, and fewer, cells
        here = hist.guide == g
        (w, lam, mu, scale), threshold, nlp = _scipy_fit(hist.umi[here], hist.n_cells[here])
        np.testing.assert_allclose([fit.weight[g], fit.lam[g], fit.mu[g], fit.scale[g]], [w, lam, mu, scale], rtol=2e-4)
        assert fit.threshold[g] == threshold
        theta = [np.log(fit.weight[g] / (1 - fit.weight[g])), np.log(fit.lam[g]), fit.mu[g], np.log(fit.scale[g])]
        ours = _negative_log_posterior(theta, np.log2(hist.umi[here].astype(float)), hist.n_cells[here].astype(float))
        assert ours <= nlp + 1e-6
    # the objective the kernel reports is the one optimised (up to the priors' constants)
    g = int(np.argmax(fit.n_cells_nonzero))
    here = hist.guide == g
    value = K.log_posterior(
        hist.umi[here], hist.n_cells[here], weight=fit.weight[g], lam=fit.lam[g], mu=fit.mu[g], scale=fit.scale[g]
    )
    assert value == pytest.approx(fit.log_posterior[g], rel=1e-12)
    assert fit.converged[fit.fitted].all()


def test_mixture_fit_is_the_same_in_batches(papalexi, monkeypatch):
    x = papalexi.obsm["grna_counts"]
    hist = K.histogram_block(x)
    whole = K.fit_poisson_gauss(hist, x.shape[1])
    monkeypatch.setattr(K, "_BATCH", 300)  # about two guides per batch
    monkeypatch.setattr(K, "_SCAN", 50)  # thresholds scanned guide by guide
    batched = K.fit_poisson_gauss(hist, x.shape[1])
    for name in ("weight", "lam", "mu", "scale", "threshold", "log_posterior", "n_iter"):
        np.testing.assert_array_equal(getattr(batched, name), getattr(whole, name), err_msg=name)


def _dense_reference(x, thresholds, label, *, rule, min_fraction=0.5, collapse=False):
    """The assignment rules on a dense matrix, row by row."""
    guide, out_label, n_det = [], [], []
    for row in x:
        total, top = row.sum(), int(np.argmax(row))
        if rule == "max":
            detected = np.flatnonzero(row > 0)
            if total == 0:
                g = lab = K.UNASSIGNED
            elif row[top] / total >= min_fraction:
                g, lab = top, label[top]
            else:
                g = lab = K.MULTIPLE
        else:
            detected = np.flatnonzero((row >= thresholds) & (row > 0))
            code = {0: K.UNASSIGNED, 1: None}.get(len(detected), K.MULTIPLE)
            g = detected[0] if code is None else code
            labels = set(label[detected])
            if collapse:
                lab = label[detected[0]] if len(labels) == 1 else (K.UNASSIGNED if not labels else K.MULTIPLE)
            else:
                lab = label[detected[0]] if code is None else code
        guide.append(g), out_label.append(lab), n_det.append(len(detected))
    return np.array(guide), np.array(out_label), np.array(n_det)


@pytest.mark.parametrize(("rule", "collapse"), [("threshold", False), ("threshold", True), ("max", False)])
def test_assign_block_equals_dense_reference(rule, collapse):
    rng = np.random.default_rng(3)
    x = rng.choice([0, 0, 0, 1, 2, 3, 5, 8], size=(400, 9)).astype(np.int64)
    x[:40] = 0  # cells without guide UMIs
    x[40:60, :2] = 4  # ties between the first two guides
    block = sp.csr_matrix(x)
    block.data[::7] = 0  # explicit zeros are not counts
    x = block.toarray()
    perm = rng.random(block.nnz)  # unsorted column indices within rows
    for r in range(block.shape[0]):
        lo, hi = block.indptr[r], block.indptr[r + 1]
        order = lo + np.argsort(perm[lo:hi])
        block.indices[lo:hi], block.data[lo:hi] = block.indices[order].copy(), block.data[order].copy()
    block.has_sorted_indices = False
    thresholds = rng.choice([1, 2, 3, 5, np.inf], size=9).astype(float)
    label = np.array([0, 0, 1, 1, 2, 2, 3, 3, 3])
    out = K.assign_block(block, thresholds, label, rule=rule, min_fraction=0.5, collapse_targets=collapse)
    guide, lab, n_det = _dense_reference(x, thresholds, label, rule=rule, collapse=collapse)
    assert np.array_equal(out["guide"], guide)
    assert np.array_equal(out["label"], lab)
    assert np.array_equal(out["n_detected"], n_det)
    assert np.array_equal(out["umi_max"], x.max(1)) and np.array_equal(out["umi_total"], x.sum(1))
    assert (out["n_invalid"] == 0).all()


def _simulated(n_cells=4_000, n_guides=24, seed=0):
    """Guide counts with known guides: one guide (90%), two (5%) or none (5%); lognormal signal, Poisson ambient."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=n_cells, p=[0.9, 0.05, 0.05])
    first = rng.integers(0, n_guides, n_cells)
    second = (first + rng.integers(1, n_guides, n_cells)) % n_guides
    counts = rng.poisson(0.15, size=(n_cells, n_guides)).astype(np.int64)  # ambient guide reads
    signal = np.maximum(np.rint(2 ** rng.normal(6, 1, size=(n_cells, 2))), 1).astype(np.int64)
    one = kind != 2
    counts[np.flatnonzero(one), first[one]] += signal[one, 0]
    two = kind == 1
    counts[np.flatnonzero(two), second[two]] += signal[two, 1]
    targets = np.array([f"T{g // 2}" for g in range(n_guides - 4)] + ["non-targeting"] * 4, dtype=object)
    truth = np.where(kind == 0, targets[first], np.where(kind == 1, "multiple", "unassigned"))
    truth = np.where(truth == "non-targeting", "control", truth)
    a = ad.AnnData(obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]))
    a.obsm["grna_counts"] = sp.csr_matrix(counts)
    a.uns["grna_ids"] = np.array([f"g{g}" for g in range(n_guides)], dtype=object)
    a.uns["grna_targets"] = targets
    return a, truth


def test_mixture_recovers_simulated_assignments():
    a, truth = _simulated()
    df = assign_guides(a, method="mixture")
    labels = _labels(df)
    assert (labels == truth).mean() > 0.995
    guides = a.uns["perturbation_assigned"]["guides"]
    assert guides["fitted"].all() and guides["converged"].all()
    # ambient counts (Poisson 0.15: 1-3 UMIs) stay below every threshold, the signal (2^6 = 64 UMIs) above
    assert guides["threshold"].between(3, 20).all(), guides["threshold"].describe()
    # a fixed UMI threshold of 5 gives the same here, the max rule too (fractions are clear-cut)
    assert (_labels(assign_guides(a, method="umi_threshold", key_added="t"), "t") == labels).mean() > 0.99


# --------------------------------------------------------------------------- out of core


@pytest.mark.parametrize("method", ["umi_threshold", "max", "mixture"])
def test_block_size_invariance(schraivogel, method):
    base = schraivogel.copy()
    expected = assign_guides(base, method=method, chunk_size=21_977)
    guides = base.uns["perturbation_assigned"]["guides"]
    for chunk_size in (997, 7_000):  # 23 and 4 blocks: the histogram tree has two levels, then one
        got = assign_guides(schraivogel.copy(), method=method, chunk_size=chunk_size)
        pd.testing.assert_frame_equal(got, expected)
    a = schraivogel.copy()
    a.obsm["grna_counts"] = da.from_array(a.obsm["grna_counts"], chunks=(3_001, -1), asarray=False)
    with dask.config.set(scheduler="threads"):
        pd.testing.assert_frame_equal(assign_guides(a, method=method), expected)
    pd.testing.assert_frame_equal(a.uns["perturbation_assigned"]["guides"], guides)


def test_histogram_merge_is_exact(papalexi):
    x = papalexi.obsm["grna_counts"]
    whole = K.histogram_block(x)
    parts = [K.histogram_block(x[i : i + 1_234]) for i in range(0, x.shape[0], 1_234)]
    merged = K.merge_histograms(K.merge_histograms(*parts[:5]), K.merge_histograms(*parts[5:]))
    assert np.array_equal(merged.keys, whole.keys) and np.array_equal(merged.n_cells, whole.n_cells)
    assert merged.n_cells.sum() == x.nnz


def test_guide_anndata_and_path_equal_obsm(schraivogel, tmp_path):
    a = schraivogel.copy()
    expected = assign_guides(a, method="mixture")
    guides = ad.AnnData(
        X=a.obsm["grna_counts"].copy(),
        obs=pd.DataFrame(index=a.obs_names.copy()),
        var=pd.DataFrame({"target": np.asarray(a.uns["grna_targets"])}, index=np.asarray(a.uns["grna_ids"])),
    )
    # more cells than adata, in another order: matched by obs_names
    extra = ad.AnnData(X=sp.csr_matrix((5, guides.n_vars), dtype=np.int32), obs=pd.DataFrame(index=list("abcde")))
    extra.var = guides.var.copy()
    shuffled = ad.concat([guides, extra], merge="same")
    shuffled = shuffled[np.random.default_rng(0).permutation(shuffled.n_obs)].copy()
    path = tmp_path / "guides.h5ad"
    shuffled.write_h5ad(path)
    bare = ad.AnnData(obs=a.obs[["perturbation"]].copy())
    from_path = assign_guides(bare, counts=path, method="mixture", chunk_size=2_000)
    pd.testing.assert_frame_equal(from_path, expected)
    from_anndata = assign_guides(ad.AnnData(obs=bare.obs.copy()), counts=shuffled, method="mixture")
    pd.testing.assert_frame_equal(from_anndata, expected)


def test_equal_settings_reuse_the_stored_result(schraivogel):
    a = schraivogel.copy()
    first = assign_guides(a, method="mixture")

    def no_compute(*args, **kwargs):
        raise AssertionError("computed although an equal result is stored")

    with dask.config.set(scheduler=no_compute):
        again = assign_guides(a, method="mixture", key_added="again")
    pd.testing.assert_frame_equal(again.set_axis(first.columns, axis=1), first)
    assert "again_guide" in a.obs.columns
    changed = assign_guides(a, method="mixture", control_label="NT", key_added="nt")  # other settings: computed
    assert "NT" in set(_labels(changed, "nt")) and "control" not in set(_labels(changed, "nt"))


# --------------------------------------------------------------------------- bad input


@pytest.fixture()
def small():
    a, _ = _simulated(n_cells=300, n_guides=8, seed=1)
    return a


def test_missing_obsm_key_says_what_is_accepted(small):
    with pytest.raises(KeyError, match=r"not a key of adata.obsm \(keys: \['grna_counts'\]\).*guide-count AnnData"):
        assign_guides(small, counts="guides")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        assign_guides(small, counts="missing.h5ad")
    with pytest.raises(TypeError, match="not accepted"):
        assign_guides(small, counts=np.zeros((300, 8)))


def test_ids_and_targets_of_the_wrong_length(small):
    with pytest.raises(ValueError, match="guide_ids has 7 entries but obsm\\['grna_counts'\\] has 8 guide columns"):
        assign_guides(small, guide_ids=[f"x{i}" for i in range(7)])
    with pytest.raises(ValueError, match="guide_targets has 9 entries"):
        assign_guides(small, guide_targets=["A"] * 9)
    with pytest.raises(ValueError, match="guide_targets has 1 missing entries"):
        assign_guides(small, guide_targets=["A"] * 7 + [None])
    b = small.copy()
    b.uns["grna_targets"] = b.uns["grna_targets"][:5]
    with pytest.raises(ValueError, match=r"adata.uns\['grna_targets'\] \(the default guide_targets\) has 5 entries"):
        assign_guides(b)
    del b.uns["grna_ids"]
    with pytest.raises(ValueError, match="no guide ids.*pass guide_ids="):
        assign_guides(b)
    with pytest.raises(ValueError, match="repeat"):
        assign_guides(small, guide_ids=["g"] * 8)
    with pytest.raises(ValueError, match="control_targets 'NT' are not among the guide targets"):
        assign_guides(small, control_targets=["NT"])


def test_guide_matrix_whose_cells_do_not_match(small):
    guides = ad.AnnData(X=small.obsm["grna_counts"].copy(), obs=pd.DataFrame(index=[f"other{i}" for i in range(300)]))
    guides.var_names = small.uns["grna_ids"]
    guides.var["target"] = small.uns["grna_targets"]
    with pytest.raises(ValueError, match="300 of adata's 300 cells are not in the guide-count AnnData"):
        assign_guides(small, counts=guides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata's warning of repeated obs names
        twice = ad.concat([guides, guides], merge="same")
    with pytest.raises(ValueError, match="repeated cell names"):
        assign_guides(small, counts=twice)


@pytest.mark.parametrize("method", ["umi_threshold", "max", "mixture"])
@pytest.mark.parametrize(("value", "kind"), [(-1.0, "negative"), (2.5, "not whole")])
def test_counts_that_are_not_raw_umis(small, method, value, kind):
    b = small.copy()
    x = b.obsm["grna_counts"].astype(np.float64).tolil()
    x[7, 3] = value
    b.obsm["grna_counts"] = x.tocsr()
    with pytest.raises(ValueError, match=rf"1 values that are not raw UMI counts.*the first 'cell7' \('g3': {value}\)"):
        assign_guides(b, method=method)


def test_bad_options(small):
    with pytest.raises(ValueError, match="method 'gmm' is not known"):
        assign_guides(small, method="gmm")
    with pytest.raises(ValueError, match="threshold must be > 0"):
        assign_guides(small, threshold=0)
    with pytest.raises(ValueError, match="min_fraction must be >= 0 and <= 1"):
        assign_guides(small, method="max", min_fraction=1.5)
    with pytest.raises(ValueError, match="collapse_targets=True applies"):
        assign_guides(small, method="max", collapse_targets=True)
    with pytest.raises(ValueError, match="'T0' is also a targeting guide's target"):
        assign_guides(small, control_label="T0")

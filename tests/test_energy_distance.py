"""E-distance to control and the E-test (``pertscale.tl._energy``, ``pertscale.kernels.energy``), and its plot.

References, each independent of the code under test:

- ``scperturb.edist`` and ``scperturb.edist_to_control`` (scPerturb 0.1.0,
  sklearn pairwise distances, pip-installed) on papalexi's PCA embedding
  made with ``ps.pp``: E-distances to 1e-6 relative (measured: about 1e-12);
- ``scperturb.etest`` (its permutations from numpy's global state) on a
  subsample of papalexi: p-values within Monte Carlo error (tolerance
  derived below from the binomial standard error);
- brute force: every pairwise squared distance with ``scipy.spatial.distance.cdist``
  and explicit label permutations with ``numpy.random.Generator.permutation``
  on small random sets.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist

import pertscale as ps
from pertscale.kernels.energy import control_summary, edistance, energy_groups, group_seeds
from pertscale.pl._energy import CALLED, NOT_CALLED, energy_distance_ranking
from pertscale.tl._energy import COLUMNS, energy_distance

from .conftest import assert_close, real_path

ARTIFACTS = os.environ.get("PERTSCALE_ARTIFACTS")
OPTS = {"perturbation_column": "perturbation", "control_label": "control"}


# --------------------------------------------------------------------------------------------- references


def brute_edistance(x: np.ndarray, y: np.ndarray, *, sample_correct: bool = True) -> float:
    """scPerturb's definition from every pairwise squared Euclidean distance."""
    nx, ny = len(x), len(y)
    delta = cdist(x, y, "sqeuclidean").sum() / (nx * ny)
    sigma_x = cdist(x, x, "sqeuclidean").sum() / (nx * (nx - 1) if sample_correct else nx * nx)
    sigma_y = cdist(y, y, "sqeuclidean").sum() / (ny * (ny - 1) if sample_correct else ny * ny)
    return 2 * delta - sigma_x - sigma_y


def brute_pvalue(x: np.ndarray, y: np.ndarray, n_permutations: int, rng) -> float:
    """``(1 + #{E(permuted) >= E}) / (1 + B)``, the pooled labels permuted explicitly, distances brute force."""
    pooled = np.vstack([x, y])
    observed = brute_edistance(x, y)
    hits = 0
    for _ in range(n_permutations):
        p = rng.permutation(len(pooled))
        hits += brute_edistance(pooled[p[: len(x)]], pooled[p[len(x) :]]) >= observed
    return (1 + hits) / (1 + n_permutations)


def mc_tolerance(p: float, n1: int, n2: int, *, z: float = 4.0) -> float:
    """Half-width for two Monte Carlo estimates of one permutation p-value from ``n1`` and ``n2`` permutations.

    Each estimate is a binomial proportion with standard error ``sqrt(p (1 - p) / n)``; their difference has
    variance ``p (1 - p) (1/n1 + 1/n2)``. ``z = 4`` standard errors, with ``p`` floored at ``5 / min(n1, n2)``
    (a p-value near 0 is estimated from a handful of exceedances), plus ``2 / min(n1, n2)`` for the formulas
    (ours ``(1 + k) / (1 + n)``, scPerturb's ``max(k, 1) / n``).
    """
    p = min(max(p, 5.0 / min(n1, n2)), 0.5)
    return z * math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2)) + 2.0 / min(n1, n2)


def screen(
    *,
    n_groups: int = 12,
    n_control: int = 400,
    d: int = 6,
    seed: int = 0,
    sizes=(2, 60),
    shift: float = 0.6,
) -> ad.AnnData:
    """Cells in random order: control N(0, 1), groups N(shift_g, 1) with every third group unshifted."""
    rng = np.random.default_rng(seed)
    n = rng.integers(sizes[0], sizes[1], size=n_groups)
    labels = np.concatenate([np.repeat("control", n_control), *[np.repeat(f"P{g:02d}", k) for g, k in enumerate(n)]])
    offsets = np.zeros((len(labels), d))
    for g in range(n_groups):
        if g % 3:
            offsets[labels == f"P{g:02d}"] = rng.normal(0, shift, size=d)
    x = rng.normal(size=(len(labels), d)) * rng.uniform(0.5, 2.0, size=d) + offsets + 3.0
    order = rng.permutation(len(labels))
    obs = pd.DataFrame({"perturbation": pd.Categorical(labels[order])}, index=[f"c{i}" for i in range(len(labels))])
    return ad.AnnData(obs=obs, obsm={"X_pca": x[order]})


def with_chunks(adata: ad.AnnData, rows: int | None) -> ad.AnnData:
    """A copy of ``adata`` whose embedding is a Dask array of ``rows``-row blocks (``None``: in memory)."""
    out = adata.copy()
    if rows is not None:
        out.obsm["X_pca"] = da.from_array(np.asarray(adata.obsm["X_pca"]), chunks=(rows, -1))
    return out


# --------------------------------------------------------------------------------------------- papalexi


@pytest.fixture(scope="module")
def papalexi():
    """papalexi normalized, log1p, 20 PCs with ``ps.pp`` (the embedding lazy), and a copy in memory."""
    adata = ps.read(real_path("papalexi"))
    ps.pp.normalize_total(adata)
    ps.pp.log1p(adata)
    ps.pp.pca(adata, n_comps=20)
    assert isinstance(adata.obsm["X_pca"], da.Array)
    eager = ad.AnnData(
        obs=adata.obs[["perturbation"]].astype(str),
        obsm={"X_pca": np.asarray(adata.obsm["X_pca"].compute())},
    )
    return adata, eager


def test_edistance_equals_scperturb_on_papalexi(papalexi):
    scperturb = pytest.importorskip("scperturb", reason="the reference scPerturb 0.1.0 (pip install scperturb==0.1.0)")

    lazy, eager = papalexi
    table = energy_distance(lazy, **OPTS, n_permutations=0)  # the embedding lazy: ps.pp.pca's projection of X
    assert list(table.columns) == list(COLUMNS) and table.index.name == "perturbation"
    counts = eager.obs["perturbation"].value_counts()
    assert (table["n_cells"] == counts[table.index]).all() and (table["n_control"] == counts["control"]).all()
    assert table["pvalue"].isna().all()
    # every perturbation against control: scPerturb's edist_to_control
    reference = scperturb.edist_to_control(eager, obs_key="perturbation", control="control", n_jobs=1, verbose=False)
    assert_close(table["edistance"], reference.loc[table.index, "distance"], rtol=1e-6)
    # the pairwise edist (its control column) on a subset of labels, both estimators
    few = ["control", "IFNGR1", "STAT1", "SPI1", "CAV1", "ATF2", "MYC"]
    subset = eager[eager.obs["perturbation"].isin(few)].copy()
    for correct in (True, False):
        ours = energy_distance(
            eager, **OPTS, perturbations=few[1:], n_permutations=0, sample_correct=correct, key_added="sub"
        )
        pairwise = scperturb.edist(subset, obs_key="perturbation", sample_correct=correct, n_jobs=1, verbose=False)
        assert_close(ours["edistance"], pairwise.loc[few[1:], "control"].astype(float), rtol=1e-6)
    # the in-memory embedding gives the lazy one's numbers
    assert_close(energy_distance(eager, **OPTS, n_permutations=0)["edistance"], table["edistance"], rtol=1e-12)


def test_pvalues_match_scperturb_etest(papalexi):
    """Within Monte Carlo error of scPerturb's etest (see :func:`mc_tolerance`), on a subsample it runs quickly."""
    scperturb = pytest.importorskip("scperturb", reason="the reference scPerturb 0.1.0 (pip install scperturb==0.1.0)")

    _, eager = papalexi
    rng = np.random.default_rng(0)
    keep = []
    for label, n in (("control", 250), ("NFKBIA", 80), ("STAT3", 80), ("IRF7", 80), ("STAT1", 50)):
        keep.extend(rng.choice(np.flatnonzero(eager.obs["perturbation"].to_numpy() == label), n, replace=False))
    sub = eager[np.sort(keep)].copy()
    runs, ours_b = 400, 4000
    np.random.seed(0)  # etest permutes with numpy's global state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # statsmodels' holm-sidak on the control's p = 1
        reference = scperturb.etest(sub, obs_key="perturbation", control="control", runs=runs, n_jobs=1, verbose=False)
    ours = energy_distance(sub, **OPTS, n_permutations=ours_b)
    assert_close(ours["edistance"], reference.loc[ours.index, "edist"], rtol=1e-6)
    for name, p in ours["pvalue"].items():
        theirs = reference.loc[name, "pvalue"]
        assert abs(p - theirs) <= mc_tolerance(p, ours_b, runs), (name, p, theirs)
    assert ours.loc["STAT1", "pvalue"] == 1 / (ours_b + 1)  # never 0; scPerturb reports 1/runs there
    assert reference.loc["STAT1", "pvalue"] == 1 / runs
    assert 0.1 < ours.loc["IRF7", "pvalue"] < 0.9  # one perturbation in the middle of its null distribution


# ----------------------------------------------------------------------------------- the kernel, brute force


@pytest.mark.parametrize("sample_correct", [True, False])
def test_kernel_equals_brute_force(sample_correct):
    rng = np.random.default_rng(1)
    y = rng.normal(size=(40, 5)) * 2 + 7.0
    groups = [rng.normal(size=(n, 5)) + s for n, s in ((2, 7.0), (9, 7.5), (25, 6.0), (60, 7.0))]
    rows = np.vstack(groups)
    starts = np.cumsum([0, *map(len, groups)])
    out = energy_groups(
        rows, starts, group_seeds(0, "abcd"), control_summary(y), n_permutations=0, sample_correct=sample_correct
    )
    expected = [brute_edistance(g, y, sample_correct=sample_correct) for g in groups]
    assert_close(out[:, 0], expected, rtol=1e-10)
    assert np.isnan(out[:, 1]).all()
    assert_close(edistance(groups[2], y, sample_correct=sample_correct), expected[2], rtol=1e-10)
    # float32 rows are exact in float64
    single = energy_groups(
        groups[1].astype(np.float32), [0, 9], group_seeds(0, "b"), control_summary(y), n_permutations=0
    )
    assert_close(single[0, 0], brute_edistance(groups[1].astype(np.float32).astype(np.float64), y), rtol=1e-10)


def test_one_cell_has_no_edistance_with_sample_correct():
    y = np.random.default_rng(2).normal(size=(10, 3))
    x = np.ones((1, 3))
    out = energy_groups(x, [0, 1], group_seeds(0, "a"), control_summary(y), n_permutations=5)
    assert np.isnan(out).all()
    out = energy_groups(x, [0, 1], group_seeds(0, "a"), control_summary(y), n_permutations=5, sample_correct=False)
    assert_close(out[0, 0], brute_edistance(x, y, sample_correct=False), rtol=1e-12)


@pytest.mark.parametrize(
    ("n_group", "n_control", "shift", "n_permutations"),
    [
        (12, 30, 0.5, 3000),  # the control draws counting-sorted (many draws per control row)
        (30, 10, 0.4, 3000),  # a group larger than the control: the control's side is drawn
        (4, 40_000, 0.5, 300),  # few draws for a large control: added in draw order
    ],
)
def test_permutation_pvalues_match_brute_force(n_group, n_control, shift, n_permutations):
    rng = np.random.default_rng(n_group)
    y = rng.normal(size=(n_control, 3))
    x = rng.normal(size=(n_group, 3)) + shift
    out = energy_groups(x, [0, n_group], group_seeds(5, ["g"]), control_summary(y), n_permutations=n_permutations)
    ours = (1 + out[0, 1]) / (1 + n_permutations)
    if n_control > 1000:  # pairwise distances of 40,000 cells are too many: the closed form from the sums
        pooled = np.vstack([x, y])
        total, total_sq = pooled.sum(0), (pooled**2).sum()

        def closed(s, q, n, m):
            sr, qr = total - s, total_sq - q
            diff = ((s / n - sr / m) ** 2).sum()
            return 2 * diff - 2 * (q - (s**2).sum() / n) / (n * (n - 1)) - 2 * (qr - (sr**2).sum() / m) / (m * (m - 1))

        observed = closed(x.sum(0), (x**2).sum(), n_group, n_control)
        hits, n_ref = 0, 3000
        for _ in range(n_ref):
            while True:  # distinct indices drawn uniformly: a uniform subset (Generator.choice is O(pool))
                drawn = rng.integers(0, len(pooled), n_group)
                if np.unique(drawn).size == n_group:
                    break
            drawn = pooled[drawn]
            hits += closed(drawn.sum(0), (drawn**2).sum(), n_group, n_control) >= observed
        reference = (1 + hits) / (1 + n_ref)
    else:
        n_ref = 3000
        reference = brute_pvalue(x, y, n_ref, rng)
    assert 0.005 < reference < 0.9, reference  # informative: not at the floor
    assert abs(ours - reference) <= mc_tolerance(reference, n_permutations, n_ref), (ours, reference)


def test_group_streams_do_not_depend_on_batching():
    """A group's result is its own: computed alone, with others, or in another order, bit for bit."""
    rng = np.random.default_rng(3)
    summary = control_summary(rng.normal(size=(200, 4)))
    groups = {name: rng.normal(size=(n, 4)) + 0.2 for name, n in (("a", 5), ("b", 40), ("c", 17))}
    names = list(groups)
    together = energy_groups(
        np.vstack(list(groups.values())),
        np.cumsum([0, *(len(g) for g in groups.values())]),
        group_seeds(9, names),
        summary,
        n_permutations=500,
    )
    for i, name in enumerate(names):
        alone = energy_groups(groups[name], [0, len(groups[name])], group_seeds(9, [name]), summary, n_permutations=500)
        np.testing.assert_array_equal(alone[0], together[i])
    other_seed = energy_groups(groups["b"], [0, 40], group_seeds(10, ["b"]), summary, n_permutations=500)
    assert other_seed[0, 1] != together[1, 1] or other_seed[0, 0] == together[1, 0]


# --------------------------------------------------------------------------------- invariance of the table


def test_chunk_size_invariance_and_reproducibility():
    base = screen(n_groups=30, n_control=600, seed=4)
    tables = []
    for rows in (None, 97, 500, 2_000):
        tables.append(energy_distance(with_chunks(base, rows), **OPTS, n_permutations=599, seed=11))
    for other in tables[1:]:
        pd.testing.assert_frame_equal(other, tables[0], check_exact=True)
    again = energy_distance(with_chunks(base, 97), **OPTS, n_permutations=599, seed=11, force=True)
    pd.testing.assert_frame_equal(again, tables[0], check_exact=True)
    reseeded = energy_distance(with_chunks(base, 97), **OPTS, n_permutations=599, seed=12)
    pd.testing.assert_series_equal(reseeded["edistance"], tables[0]["edistance"], check_exact=True)
    assert not reseeded["pvalue"].equals(tables[0]["pvalue"])
    # a perturbation's p-value does not depend on which others are tested
    few = ["P04", "P01", "P17"]
    part = energy_distance(with_chunks(base, 500), **OPTS, perturbations=few, n_permutations=599, seed=11)
    assert list(part.index) == few
    pd.testing.assert_frame_equal(
        part.drop(columns="pvalue_adj"), tables[0].loc[few].drop(columns="pvalue_adj"), check_exact=True
    )


def test_results_and_bh(caplog):
    base = screen(n_groups=15, n_control=300, seed=5, sizes=(2, 40))
    base.obs["perturbation"] = base.obs["perturbation"].cat.add_categories("single")
    base.obs.iloc[0, 0] = "single"  # a perturbation of one cell
    with caplog.at_level(logging.WARNING, logger="pertscale.tl._energy"):
        table = energy_distance(base, **OPTS, n_permutations=499)
    assert np.isnan(table.loc["single", ["edistance", "pvalue", "pvalue_adj"]].to_numpy(dtype=float)).all()
    assert "single" in caplog.text
    x = np.asarray(base.obsm["X_pca"])
    labels = base.obs["perturbation"].to_numpy()
    for name in ("P00", "P05"):
        assert_close(table.loc[name, "edistance"], brute_edistance(x[labels == name], x[labels == "control"]))
    tested = table["pvalue"].dropna()
    assert np.allclose(tested * 500, np.round(tested * 500)) and (tested >= 1 / 500).all()  # (1 + k) / (1 + B)
    from statsmodels.stats.multitest import multipletests

    assert_close(table.loc[tested.index, "pvalue_adj"], multipletests(tested, method="fdr_bh")[1], rtol=1e-12)
    assert table["n_cells"].dtype == np.int64 and table.loc["single", "n_cells"] == 1


def test_null_pvalues_are_uniform():
    """Perturbations drawn like the control: p-values uniform on {1, ..., B + 1} / (B + 1)."""
    rng = np.random.default_rng(12)
    n_groups, size, n_control, b = 300, 15, 400, 199
    labels = np.concatenate([np.repeat("control", n_control), np.repeat([f"N{g:03d}" for g in range(n_groups)], size)])
    adata = ad.AnnData(
        obs=pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(labels.size)]),
        obsm={"X_pca": rng.normal(size=(labels.size, 4))},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 300 tests and 199 permutations: no lone discovery
        p = energy_distance(adata, **OPTS, n_permutations=b)["pvalue"].to_numpy()
    # P(p <= 0.05) = 10/200 exactly; 300 draws: binomial sd 3.8, 4 sd either side
    assert abs((p <= 0.05).sum() - 15) <= 4 * math.sqrt(300 * 0.05 * 0.95)
    assert abs(p.mean() - 0.5025) <= 4 * 0.2887 / math.sqrt(300)


@pytest.mark.parametrize(
    "scheduler", ["synchronous", "threads", pytest.param("distributed", marks=pytest.mark.cluster)], indirect=True
)
def test_scheduler_invariance(scheduler):
    base = with_chunks(screen(n_groups=20, n_control=500, seed=6), 150)
    with dask.config.set(scheduler="synchronous"):
        expected = energy_distance(base.copy(), **OPTS, n_permutations=399)
    with ps.cluster.using(scheduler, progress=False):
        got = energy_distance(base.copy(), **OPTS, n_permutations=399)
    pd.testing.assert_frame_equal(got, expected, check_exact=True)


# ------------------------------------------------------------------------------------------ store, options


def test_store_reuse_and_control_subsample(caplog):
    adata = screen(n_groups=8, n_control=300, seed=7)
    first = energy_distance(adata, **OPTS, n_permutations=199)
    assert energy_distance(adata, **OPTS, n_permutations=199) is first  # reused from the store
    settings, stored = ps.store.select(adata, key="energy_distance")
    assert stored is first and settings.method == "energy_distance" and settings.n_permutations == 199
    assert settings.embedding.startswith("array:")
    adata.obsm["X_pca"] = adata.obsm["X_pca"] + 1.0  # a new embedding (distances unchanged): another result
    moved = energy_distance(adata, **OPTS, n_permutations=199)
    assert moved is not first
    assert_close(moved["edistance"], first["edistance"], rtol=1e-9)
    with caplog.at_level(logging.INFO, logger="pertscale.tl._energy"):
        sub = energy_distance(adata, **OPTS, n_permutations=199, control_subsample=120, key_added="sub")
    assert "control_subsample=120 of 300" in caplog.text
    assert (sub["n_control"] == 120).all()
    settings, _ = ps.store.select(adata, key="sub")
    assert settings.control_subsample == 120 and settings.seed == 0
    # the subsample is seeded: the same cells again, and the E-distance of exactly those cells
    again = energy_distance(adata, **OPTS, n_permutations=199, control_subsample=120, force=True, key_added="sub")
    pd.testing.assert_frame_equal(again, sub, check_exact=True)
    x = np.asarray(adata.obsm["X_pca"])
    labels = adata.obs["perturbation"].to_numpy()
    control = np.flatnonzero(labels == "control")
    picked = np.sort(control[np.random.default_rng(0).choice(control.size, 120, replace=False)])
    assert_close(sub.loc["P01", "edistance"], brute_edistance(x[labels == "P01"], x[picked]), rtol=1e-10)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_inputs():
    adata = screen(n_groups=4, n_control=50, seed=8)
    with pytest.raises(KeyError, match=r"ps\.pp\.pca.*pertscale run --pca"):
        energy_distance(ad.AnnData(obs=adata.obs), **OPTS)
    with pytest.raises(ValueError, match=r"n_comps=7 but obsm\['X_pca'\] has 6 columns"):
        energy_distance(adata, **OPTS, n_comps=7)
    with pytest.raises(ValueError, match="control_label 'NT' not found"):
        energy_distance(adata, perturbation_column="perturbation", control_label="NT")
    one = adata.copy()
    one.obs["perturbation"] = one.obs["perturbation"].astype(str)
    one.obs.loc[one.obs["perturbation"] == "control", "perturbation"] = "P00"
    one.obs.iloc[0, 0] = "control"
    with pytest.raises(ValueError, match="at least 2 control cells"):
        energy_distance(one, **OPTS)
    with pytest.raises(KeyError, match="perturbation_column 'gene' not found"):
        energy_distance(adata, perturbation_column="gene", control_label="control")
    with pytest.raises(ValueError, match=r"n_permutations=10 cannot reach fdr=0.05.*n_permutations=19 or more"):
        energy_distance(adata, **OPTS, n_permutations=10)
    with pytest.warns(UserWarning, match=r"single perturbation cannot be a discovery.*n_permutations=79 or more"):
        energy_distance(adata, **OPTS, n_permutations=50)
    with pytest.raises(ValueError, match=r"control_subsample=51 is larger than the control \(50 cells"):
        energy_distance(adata, **OPTS, control_subsample=51)
    with pytest.raises(ValueError, match="metric='euclidean'.*not supported.*sqeuclidean"):
        energy_distance(adata, **OPTS, metric="euclidean")
    with pytest.raises(ValueError, match="metric 'cosine' is not known"):
        energy_distance(adata, **OPTS, metric="cosine")
    with pytest.raises(ValueError, match="lists the control label"):
        energy_distance(adata, **OPTS, perturbations=["P00", "control"])
    with pytest.raises(KeyError, match="have no cell"):
        energy_distance(adata, **OPTS, perturbations=["P00", "NOPE"])
    with pytest.raises(ValueError, match="n_permutations"):
        energy_distance(adata, **OPTS, n_permutations=-1)
    with pytest.raises(ValueError, match="fdr"):
        energy_distance(adata, **OPTS, fdr=1.5)
    only_control = adata[adata.obs["perturbation"] == "control"].copy()
    with pytest.raises(ValueError, match="no perturbation to test"):
        energy_distance(only_control, **OPTS)
    bad = adata.copy()
    bad.obsm["X_pca"] = np.where(np.arange(bad.n_obs)[:, None] == 3, np.nan, bad.obsm["X_pca"])
    with pytest.raises(ValueError, match="NaN or infinite"):
        energy_distance(bad, **OPTS, n_permutations=0)


# -------------------------------------------------------------------------------------------------- plot


@pytest.fixture
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def publish(path: Path) -> None:
    if ARTIFACTS:
        figures = Path(ARTIFACTS) / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        (figures / path.name).write_bytes(path.read_bytes())
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.usefixtures("_close_figures")
def test_ranking_plot(papalexi, tmp_path):
    from matplotlib.colors import to_hex

    lazy, _ = papalexi
    table = energy_distance(lazy, **OPTS, n_permutations=999, key_added="plot")
    path = tmp_path / "energy_distance_ranking.png"
    ax = energy_distance_ranking(lazy, key="plot", save=path, show=False)
    publish(path)
    dots = ax.collections[0]
    order = table["edistance"].sort_values(ascending=False)
    np.testing.assert_array_equal(dots.get_offsets()[:, 0], order.to_numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == list(order.index)  # the strongest on top
    colours = [to_hex(c) for c in dots.get_facecolors()]
    called = table.loc[order.index, "pvalue_adj"] < 0.05
    assert colours == [CALLED if c else NOT_CALLED for c in called]
    assert f"{int(called.sum())} of {len(table)} called" in ax.get_title()
    # many perturbations: a ranked scatter, the first named
    rng = np.random.default_rng(0)
    e = np.concatenate([rng.normal(0, 0.2, 460), rng.lognormal(2, 1.5, 40)])
    big = pd.DataFrame({"edistance": e, "pvalue_adj": np.where(e > 1, 0.001, 0.5)}, index=[f"G{i}" for i in range(500)])
    path = tmp_path / "energy_distance_ranking_many.png"
    ax = energy_distance_ranking(big, n_named=8, save=path, show=False)
    publish(path)
    np.testing.assert_array_equal(ax.collections[0].get_offsets()[:, 1], np.sort(e)[::-1])
    named = {t.get_text() for t in ax.texts} - {""}  # (a label set away from its dot has an empty leader)
    assert big["edistance"].idxmax() in named and 0 < len(named) <= 8
    assert ax.get_yscale() == "symlog"
    with pytest.raises(ValueError, match="holds no E-distances"):
        energy_distance_ranking(ad.AnnData(obs=pd.DataFrame(index=["a"])))
    with pytest.raises(TypeError, match="expected the table"):
        energy_distance_ranking([1, 2])

"""Our results read by the tools a biologist hands them to: scanpy, PyDESeq2, decoupler, pertpy.

Each test hands a result of pertscale (the files of ``ps.run`` on the real
Papalexi screen, or a lazy AnnData of the Python API) to the other tool and
checks the values that tool reads or computes against an independent
reference: scanpy's own ``rank_genes_groups`` on the same cells, numpy
group sums of the raw counts, scipy's regression and distance formulas. The
page ``docs/interop.md`` says how to do each hand-over and where a tool
cannot read a result; its Python blocks run here too
(:func:`test_interop_page_runs_as_written`).

Optional tools are skipped with the reason when they are not installed
(decoupler, pertpy: ``pip install 'pertpy>=1.0,<1.1' 'statsmodels<0.15'
filelock decoupler``; pertpy 1.0.3 imports ``multipletests`` from
``statsmodels.sandbox``, which statsmodels 0.15 removed).
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats
from scipy.spatial.distance import cdist

import pertscale as ps

from .conftest import DATA_DIR, ROOT, assert_close, real_path

sc = pytest.importorskip("scanpy", reason="the scanpy hand-over needs scanpy (pip install -e '.[test]')")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")  # headless: figures are drawn and saved, never shown
import matplotlib.pyplot as plt  # noqa: E402

#: The filters of ``pertscale run`` at its defaults (``--exclude-labels``, ``--min-genes``,
#: ``--min-cells-per-perturbation``, ``--min-cells``), applied in numpy for the references.
EXCLUDED = ("multiple", "unassigned")
MIN_GENES, MIN_CELLS_PER_PERTURBATION, MIN_CELLS = 20, 20, 3
#: Perturbations whose target gene is among Papalexi's 299 measured genes: DESeq2 must see each knocked down.
MEASURED_TARGETS = ("STAT1", "JAK2", "CMTM6", "STAT2", "UBE2L6", "STAT3", "TNFRSF14", "IFNGR2", "NFKBIA")
#: A few perturbations for the plots and the per-group tools.
SHOWN = ("STAT1", "IFNGR2", "JAK2")
STATS = ("scores", "logfoldchanges", "pvals", "pvals_adj")

#: scanpy 1.11's embedding plots call Colormap.set_bad, which matplotlib 3.11 marks for deprecation: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The set_bad function will be deprecated:PendingDeprecationWarning")


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def papalexi() -> Path:
    return real_path("papalexi")


@pytest.fixture(scope="module")
def raw(papalexi) -> ad.AnnData:
    """The screen in memory, raw counts, read by anndata (not by pertscale)."""
    return ad.read_h5ad(papalexi)


@pytest.fixture(scope="module")
def kept(raw) -> tuple[np.ndarray, np.ndarray]:
    """Cells and genes that the run keeps, by the run's documented filters applied in numpy.

    Cells: label not excluded, at least ``MIN_GENES`` detected genes; then perturbations with at least
    ``MIN_CELLS_PER_PERTURBATION`` such cells (the control kept); then genes detected in at least
    ``MIN_CELLS`` of the remaining cells.
    """
    x = sp.csr_matrix(raw.X)
    labels = raw.obs["perturbation"].astype(str).to_numpy()
    cells = ~np.isin(labels, EXCLUDED) & (np.diff(x.indptr) >= MIN_GENES)  # CSR without explicit zeros
    sizes = pd.Series(labels[cells]).value_counts()
    small = sizes.index[(sizes < MIN_CELLS_PER_PERTURBATION) & (sizes.index != "control")]
    cells &= ~np.isin(labels, small)
    genes = np.asarray((x[cells] > 0).sum(axis=0)).ravel() >= MIN_CELLS
    return cells, genes


@pytest.fixture(scope="module")
def scanpy_reference(raw, kept) -> ad.AnnData:
    """scanpy's own pipeline on the kept cells and genes: normalize_total, log1p, Wilcoxon against control."""
    cells, genes = kept
    ref = raw[cells][:, genes].copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)  # scanpy's own DataFrame building
        sc.tl.rank_genes_groups(ref, "perturbation", reference="control", method="wilcoxon", tie_correct=True, pts=True)
    return ref


@pytest.fixture(scope="module")
def run_out(papalexi, tmp_path_factory) -> Path:
    """The main job's outputs, with PCA and pseudo-bulk: ``ps.run`` as ``pertscale run --pca 20 --pseudobulk``."""
    out = tmp_path_factory.mktemp("interop") / "out"
    ps.run(
        papalexi,
        out,
        perturbation_column="perturbation",
        control_label="control",
        pca=20,
        pseudobulk=True,
        working_store=out.parent / "working_store.zarr",
        progress=False,
        report=False,
    )
    return out


@pytest.fixture(scope="module")
def processed(papalexi) -> ad.AnnData:
    """The README's Python path, lazily: read, the job's QC filters, counts layer, normalize_total, log1p."""
    with ps.settings.override(progress=False):
        adata = ps.read(papalexi)
        qc = ps.pp.qc_summary(adata, perturbation_column="perturbation", control_label="control")
        adata = qc.apply(adata)
    adata.layers["counts"] = adata.X
    ps.pp.normalize_total(adata, target_sum=1e4)
    ps.pp.log1p(adata)
    return adata


@pytest.fixture(scope="module")
def subset(processed) -> ad.AnnData:
    """Control and the :data:`SHOWN` perturbations of the processed screen, lazy, unused labels dropped."""
    a = processed[processed.obs["perturbation"].isin(["control", *SHOWN])].copy()
    a.obs["perturbation"] = a.obs["perturbation"].cat.remove_unused_categories()
    return a


def _top_names(res: ad.AnnData, group: str, n: int) -> list[str]:
    """The ``n`` genes of highest score of ``group`` in our layers (checked to have no tie at the cut)."""
    scores = np.asarray(res[group].layers["scores"][0], dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    assert scores[order[n - 1]] > scores[order[n]], f"a tie at rank {n} of {group}: choose another n"
    return list(res.var_names[order[:n]])


def _assert_frame_matches(ours: pd.DataFrame, ref: pd.DataFrame, *, group: str) -> None:
    """Two ``rank_genes_groups_df`` frames: same genes in the same order up to exact ties, same statistics."""
    assert set(ours["names"]) == set(ref["names"]), group
    assert (np.diff(ours["scores"].to_numpy(np.float64)) <= 0).all(), f"{group}: not ranked by descending score"
    # rank by rank: the scores agree, so the genes differ at most in the order of tied scores
    assert_close(ours["scores"], ref["scores"], rtol=1e-6, atol=1e-6, err_msg=group)
    o, r = ours.set_index("names"), ref.set_index("names").loc[ours["names"]]
    assert_close(o["scores"], r["scores"], rtol=1e-6, atol=1e-6, err_msg=group)  # scanpy stores float32
    assert_close(o["logfoldchanges"], r["logfoldchanges"], rtol=1e-5, atol=1e-5, err_msg=group)
    assert_close(o["pvals"], r["pvals"], rtol=1e-9, err_msg=group)
    assert_close(o["pvals_adj"], r["pvals_adj"], rtol=1e-9, err_msg=group)
    assert_close(o["pct_nz_group"], r["pct_nz_group"], rtol=1e-12, err_msg=group)


def _assert_frame_equals_layers(df: pd.DataFrame, res: ad.AnnData, group: str) -> None:
    """``rank_genes_groups_df`` of ``group`` holds our layers' values, gene by gene (scores, lfc as float32)."""
    df = df.set_index("names").loc[res.var_names]
    row = res[group]
    for name in STATS:
        values = np.asarray(row.layers[name][0])
        if name in ("scores", "logfoldchanges"):  # scanpy's dtypes
            values = values.astype(np.float32)
        np.testing.assert_array_equal(df[name].to_numpy(), values, err_msg=f"{group} {name}")
    np.testing.assert_array_equal(df["pct_nz_group"].to_numpy(), np.asarray(row.layers["pts"][0]), err_msg=group)


# ------------------------------------------------------------------------------- 1. rank_genes_groups_df


def test_rank_genes_groups_df_reads_the_runs_h5ad(run_out, scanpy_reference, kept):
    res = ad.read_h5ad(run_out / "de_wilcoxon.h5ad")
    cells, genes = kept
    ref_groups = set(scanpy_reference.uns["rank_genes_groups"]["names"].dtype.names)
    assert set(res.obs_names) == ref_groups and res.n_vars == genes.sum()
    assert res.uns["rank_genes_groups"]["params"]["reference"] == "control"
    for g in res.obs_names:
        df = sc.get.rank_genes_groups_df(res, group=g)
        _assert_frame_equals_layers(df, res, g)
        _assert_frame_matches(df, sc.get.rank_genes_groups_df(scanpy_reference, group=g), group=g)
    # several groups at once: scanpy's long frame, one block per group
    both = sc.get.rank_genes_groups_df(res, group=list(SHOWN))
    assert list(pd.unique(both["group"])) == list(SHOWN) and len(both) == len(SHOWN) * res.n_vars


def test_scanpy_uns_of_the_zarr_store_equals_the_h5ad(run_out):
    """The store the run writes for any number of perturbations gets scanpy's view with ps.tl.scanpy_uns."""
    h5 = ad.read_h5ad(run_out / "de_wilcoxon.h5ad").uns["rank_genes_groups"]
    res = ad.read_zarr(run_out / "de_wilcoxon.zarr")
    assert "rank_genes_groups" not in res.uns
    ps.tl.scanpy_uns(res)
    got = res.uns["rank_genes_groups"]
    assert got["params"] == h5["params"]
    for key in ("names", *STATS):
        assert got[key].dtype.names == h5[key].dtype.names
        for g in got[key].dtype.names:
            np.testing.assert_array_equal(got[key][g], h5[key][g], err_msg=f"{key} {g}")
    # a subset of perturbations (when the full record arrays do not fit an .h5ad file)
    part = res[list(SHOWN)].copy()
    del part.uns["rank_genes_groups"]
    ps.tl.scanpy_uns(part)
    _assert_frame_equals_layers(sc.get.rank_genes_groups_df(part, group="JAK2"), part, "JAK2")


def test_rank_genes_groups_df_reads_a_lazy_result(processed, scanpy_reference):
    de = ps.tl.rank_genes_groups(processed, perturbation_column="perturbation", control_label="control")
    assert isinstance(de.layers["scores"], da.Array)
    with pytest.raises(ValueError, match="lazy; compute them first"):
        ps.tl.scanpy_uns(de)  # scanpy's record arrays need the values
    res = ps.compute(de)
    ps.tl.scanpy_uns(res)
    for g in res.obs_names:
        df = sc.get.rank_genes_groups_df(res, group=g)
        _assert_frame_equals_layers(df, res, g)
        _assert_frame_matches(df, sc.get.rank_genes_groups_df(scanpy_reference, group=g), group=g)
    # the other documented path: scanpy_format=True, and the face adds the view when it computes
    flagged = ps.compute(
        ps.tl.rank_genes_groups(
            processed, perturbation_column="perturbation", control_label="control", scanpy_format=True
        )
    )
    for g in SHOWN:
        pd.testing.assert_frame_equal(
            sc.get.rank_genes_groups_df(flagged, group=g), sc.get.rank_genes_groups_df(res, group=g)
        )


# ---------------------------------------------------------------------------------------- 2. scanpy plots


def test_sc_pl_rank_genes_groups_shows_our_top_genes(run_out, tmp_path):
    res = ad.read_h5ad(run_out / "de_wilcoxon.h5ad")
    axes = sc.pl.rank_genes_groups(res, groups=list(SHOWN), n_genes=10, show=False)
    assert [ax.get_title() for ax in axes] == [f"{g} vs. control" for g in SHOWN]
    for ax, g in zip(axes, SHOWN, strict=True):
        assert [t.get_text() for t in ax.texts] == _top_names(res, g, 10), g
        heights = np.asarray([t.get_position()[1] for t in ax.texts])  # each name drawn at its score
        assert_close(heights, np.sort(res[g].layers["scores"][0])[::-1][:10], rtol=1e-6, err_msg=g)
    plt.gcf().savefig(tmp_path / "rank_genes_groups.png", bbox_inches="tight")
    plt.close("all")


@pytest.mark.parametrize("kind", ["dotplot", "heatmap"])
def test_sc_pl_rank_genes_groups_dotplot_and_heatmap_on_the_expression(kind, run_out, subset, tmp_path):
    """scanpy's expression plots of the top genes: the processed AnnData in memory with the results' uns."""
    res = ad.read_h5ad(run_out / "de_wilcoxon.h5ad")
    mem = ps.compute(subset)
    mem.uns["rank_genes_groups"] = res.uns["rank_genes_groups"]
    plot = getattr(sc.pl, f"rank_genes_groups_{kind}")
    axes = plot(mem, groups=list(SHOWN), n_genes=4, dendrogram=False, show=False)
    main = axes["mainplot_ax" if kind == "dotplot" else "heatmap_ax"]
    expected = [name for g in SHOWN for name in _top_names(res, g, 4)]
    assert [t.get_text() for t in main.get_xticklabels()] == expected
    brackets = axes["gene_group_ax" if kind == "dotplot" else "gene_groups_ax"]
    assert [t.get_text() for t in brackets.texts] == list(SHOWN)
    rows = axes["mainplot_ax" if kind == "dotplot" else "groupby_ax"].get_yticklabels()
    assert {t.get_text() for t in rows} == {"control", *SHOWN}
    plt.gcf().savefig(tmp_path / f"rank_genes_groups_{kind}.png", bbox_inches="tight")
    plt.close("all")


def test_scanpy_plots_need_the_lazy_arrays_computed(run_out, subset):
    """What docs/interop.md says: scanpy 1.11 cannot plot a Dask X or obsm; ps.compute first."""
    lazy = subset.copy()
    lazy.uns["rank_genes_groups"] = ad.read_h5ad(run_out / "de_wilcoxon.h5ad").uns["rank_genes_groups"]
    with pytest.raises(TypeError):
        sc.pl.rank_genes_groups_dotplot(lazy, groups=list(SHOWN), n_genes=4, dendrogram=False, show=False)
    plt.close("all")
    ps.pp.pca(lazy, n_comps=10)
    assert isinstance(lazy.obsm["X_pca"], da.Array)
    with pytest.raises(TypeError):
        sc.pl.pca(lazy, color="perturbation", show=False)
    plt.close("all")


# ------------------------------------------------------------------------------------------- 3. PCA, UMAP


def _offsets(ax) -> np.ndarray:
    """The coordinates of the cells in scanpy's embedding plot (its first scatter; the others are legend marks)."""
    return np.asarray(ax.collections[0].get_offsets(), dtype=np.float64)


def test_sc_pl_pca_reads_pca_zarr(run_out, raw, kept, tmp_path):
    pca = ad.read_zarr(run_out / "pca.zarr")
    cells, _ = kept
    assert set(pca.obs_names) == set(raw.obs_names[cells])
    assert isinstance(pca.obsm["X_pca"], np.ndarray) and pca.obsm["X_pca"].shape == (cells.sum(), 20)
    # the labels the filters dropped (multiple) are not among its categories: the legend lists only kept labels
    assert list(pca.obs["perturbation"].cat.categories) == sorted(set(pca.obs["perturbation"]))
    ax = sc.pl.pca(pca, color="perturbation", show=False)
    np.testing.assert_array_equal(_offsets(ax), pca.obsm["X_pca"][:, :2])
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("PC1", "PC2")
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert legend == set(raw.obs.loc[cells, "perturbation"].astype(str))
    plt.gcf().savefig(tmp_path / "pca.png", bbox_inches="tight")
    plt.close("all")
    sc.pl.pca_variance_ratio(pca, n_pcs=20, show=False)
    texts = plt.gcf().axes[0].texts  # each component's name drawn at its variance ratio
    assert [t.get_text() for t in texts] == [f"PC{i + 1}" for i in range(20)]
    assert_close([t.get_position()[1] for t in texts], pca.uns["pca"]["variance_ratio"], rtol=1e-12)
    plt.close("all")


def test_sc_pl_pca_on_the_processed_anndata(subset, tmp_path):
    adata = subset.copy()
    ps.pp.pca(adata, n_comps=20)
    assert isinstance(adata.obsm["X_pca"], da.Array)  # lazy: scanpy needs it computed
    mem = ps.compute(adata)
    assert isinstance(mem.obsm["X_pca"], np.ndarray)
    ax = sc.pl.pca(mem, color="perturbation", show=False)
    np.testing.assert_array_equal(_offsets(ax), mem.obsm["X_pca"][:, :2])
    np.testing.assert_array_equal(_offsets(ax), adata.obsm["X_pca"][:, :2].compute())
    plt.gcf().savefig(tmp_path / "pca_processed.png", bbox_inches="tight")
    plt.close("all")


@pytest.mark.slow  # UMAP's numba functions compile on first use: ~15 s on 3,900 cells
def test_sc_pl_umap_on_the_processed_anndata(subset, tmp_path):
    pytest.importorskip("umap", reason="ps.tl.umap needs umap-learn (pip install 'pertscale[embedding]')")
    adata = subset.copy()
    ps.pp.pca(adata, n_comps=20)
    ps.pp.neighbors(adata)
    ps.tl.umap(adata)
    assert isinstance(adata.obsm["X_umap"], np.ndarray)  # in memory: sc.pl.umap reads it as it is
    ax = sc.pl.umap(adata, color="perturbation", show=False)
    np.testing.assert_array_equal(_offsets(ax), adata.obsm["X_umap"])
    assert adata.obsm["X_umap"].shape == (adata.n_obs, 2) and np.isfinite(adata.obsm["X_umap"]).all()
    plt.gcf().savefig(tmp_path / "umap.png", bbox_inches="tight")
    plt.close("all")


# -------------------------------------------------------------------------------------------- 4. pseudo-bulk


def _group_sums(x, keys: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``x`` summed per distinct row of ``keys`` (numpy, through pandas' groupby on dense counts)."""
    dense = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
    frame = pd.DataFrame(dense)
    return frame.groupby([keys[c].astype(str).to_numpy() for c in keys.columns]).sum()


def test_pseudobulk_h5ad_equals_numpy_group_sums(run_out, raw, kept):
    pb = ad.read_h5ad(run_out / "pseudobulk.h5ad")
    cells, genes = kept
    ref = _group_sums(raw.X[cells][:, genes], raw.obs.loc[cells, ["perturbation"]])
    ref.index = ref.index.astype(str)
    assert list(pb.var_names) == list(raw.var_names[genes])
    np.testing.assert_array_equal(pb.X, ref.loc[pb.obs["perturbation"].astype(str)].to_numpy())
    counts = raw.obs.loc[cells, "perturbation"].astype(str).value_counts()
    np.testing.assert_array_equal(pb.obs["n_cells"], counts.loc[pb.obs["perturbation"].astype(str)])
    pytest.importorskip("pydeseq2", reason="the DESeq2 hand-over needs PyDESeq2 (pip install pydeseq2)")
    with pytest.raises(ValueError, match="no replicates to estimate the dispersion"):  # as docs/interop.md says
        ps.pb.to_pydeseq2(pb, design="~perturbation", control_label="control", quiet=True, n_cpus=1).deseq2()


@pytest.fixture(scope="module")
def replicate_pb(papalexi) -> ad.AnnData:
    """Per perturbation and replicate (obs['bio_rep']), from the file read lazily, 'multiple' left out."""
    with ps.settings.override(progress=False):
        pb = ps.pb.pseudobulk(ps.read(papalexi), perturbation_column=["perturbation", "bio_rep"])
    pb = pb[pb.obs["perturbation"] != "multiple"].copy()
    labels = pb.obs["perturbation"].cat.remove_unused_categories()
    pb.obs["perturbation"] = labels.cat.reorder_categories(
        ["control", *(c for c in labels.cat.categories if c != "control")]
    )
    return pb


def test_replicate_pseudobulk_equals_numpy_group_sums(replicate_pb, raw):
    ref = _group_sums(raw.X, raw.obs[["perturbation", "bio_rep"]])
    keys = list(zip(replicate_pb.obs["perturbation"].astype(str), replicate_pb.obs["bio_rep"].astype(str), strict=True))
    np.testing.assert_array_equal(replicate_pb.X, ref.loc[keys].to_numpy())
    assert replicate_pb.n_obs == 26 * 3  # 25 perturbations and the control, 3 replicates each


def test_replicate_pseudobulk_into_pydeseq2(replicate_pb):
    pytest.importorskip("pydeseq2", reason="the DESeq2 hand-over needs PyDESeq2 (pip install pydeseq2)")
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.ds import DeseqStats

    pb = replicate_pb
    counts = pd.DataFrame(pb.X.astype(np.int64), index=pb.obs_names, columns=pb.var_names)
    dds = DeseqDataSet(counts=counts, metadata=pb.obs, design="~bio_rep + perturbation", quiet=True, n_cpus=1)
    np.testing.assert_array_equal(dds.X, pb.X)  # DESeq2 got our sums as they are
    dds.deseq2()
    sf = dds.obs["size_factors"].to_numpy()  # median of ratios to the genes' geometric means (no zero)
    x = pb.X[:, (pb.X > 0).all(axis=0)]
    log_ratios = np.log(x) - np.log(x).mean(axis=0)
    assert_close(sf, np.exp(np.median(log_ratios, axis=1)), rtol=1e-10)
    for target in MEASURED_TARGETS:  # each perturbation lowers its own target's counts
        st = DeseqStats(dds, contrast=["perturbation", target, "control"], quiet=True, n_cpus=1)
        st.summary()
        row = st.results_df.loc[target]
        assert row["log2FoldChange"] < -0.3 and row["padj"] < 0.05, (target, row.to_dict())
    # ps.pb.to_pydeseq2 makes the same data set
    ours = ps.pb.to_pydeseq2(pb, design="~bio_rep + perturbation", control_label="control", quiet=True, n_cpus=1)
    np.testing.assert_array_equal(ours.X, dds.X)
    pd.testing.assert_frame_equal(ours.obsm["design_matrix"], dds.obsm["design_matrix"])


def test_decoupler_reads_our_pseudobulk_and_results(replicate_pb, raw, run_out):
    dc = pytest.importorskip("decoupler", reason="the decoupler hand-over needs decoupler (pip install decoupler)")
    theirs = dc.pp.pseudobulk(raw, sample_col="bio_rep", groups_col="perturbation")
    rows = [f"{r}_{p}" for p, r in zip(replicate_pb.obs["perturbation"], replicate_pb.obs["bio_rep"], strict=True)]
    np.testing.assert_array_equal(np.asarray(theirs[rows].X), replicate_pb.X)
    np.testing.assert_array_equal(theirs[rows].obs["psbulk_cells"], replicate_pb.obs["n_cells"])
    # decoupler's edgeR-style gene filter takes our AnnData as it is, and keeps the same genes as on its own
    kept_ours = dc.pp.filter_by_expr(replicate_pb.copy(), group="perturbation", inplace=False)
    kept_theirs = dc.pp.filter_by_expr(theirs[rows].copy(), group="perturbation", inplace=False)
    assert 0 < len(kept_ours) < replicate_pb.n_vars and list(kept_ours) == list(kept_theirs)
    # its sample filter needs its own column names
    pb = replicate_pb.copy()
    with pytest.raises(AssertionError, match="psbulk_cells"):
        dc.pp.filter_samples(pb, min_cells=150, min_counts=1000)
    pb.obs["psbulk_cells"] = pb.obs["n_cells"]
    pb.obs["psbulk_counts"] = pb.X.sum(axis=1)
    keep = dc.pp.filter_samples(pb, min_cells=150, min_counts=1000, inplace=False)
    assert set(keep) == set(pb.obs_names[(pb.obs["n_cells"] >= 150) & (pb.obs["psbulk_counts"] >= 1000)])
    # enrichment of our test statistics: ulm's score is the t of a regression on set membership
    res = ad.read_h5ad(run_out / "de_wilcoxon.h5ad")
    scores = res.to_df(layer="scores")
    ifn = ["STAT1", "JAK2", "STAT2", "UBE2L6", "PSMB9", "IFNGR2", "STAT3", "NFKBIA", "CMTM6", "TNFRSF14"]
    rest = [g for g in res.var_names if g.startswith("RP11-")]
    net = pd.DataFrame({"source": ["IFN"] * len(ifn) + ["RP11"] * len(rest), "target": ifn + rest})
    es, padj = dc.mt.ulm(data=scores, net=net, tmin=5)
    for source, members in (("IFN", ifn), ("RP11", rest)):
        inside = np.isin(res.var_names, members).astype(np.float64)
        fits = [stats.linregress(inside, scores.loc[g].to_numpy()) for g in scores.index]
        assert_close(es.loc[scores.index, source], [f.slope / f.stderr for f in fits], rtol=1e-8, err_msg=source)
    assert es.loc["STAT1", "IFN"] < 0 and padj.loc["STAT1", "IFN"] < 0.05  # STAT1 lowers the interferon genes


# ----------------------------------------------------------------------------------------------------- 5. pertpy


@pytest.fixture(scope="module")
def pt():
    """pertpy, or a skip that says why it does not import here and what installs it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jaxopt's DeprecationWarning, and others, on import
            import pertpy
    except ImportError as err:
        pytest.skip(
            f"pertpy does not import ({type(err).__name__}: {err}); pertpy 1.0 needs statsmodels < 0.15 and filelock: "
            "pip install 'pertpy>=1.0,<1.1' 'statsmodels<0.15' filelock"
        )
    return pertpy


def test_pertpy_edistance_reads_our_pca(pt, subset):
    adata = subset.copy()
    ps.pp.pca(adata, n_comps=20)
    distance = pt.tools.Distance(metric="edistance", obsm_key="X_pca")
    lazy = distance.onesided_distances(
        adata, groupby="perturbation", selected_group="control", show_progressbar=False, n_jobs=1
    )
    mem = ps.compute(adata)
    got = distance.onesided_distances(
        mem, groupby="perturbation", selected_group="control", show_progressbar=False, n_jobs=1
    )
    pd.testing.assert_series_equal(lazy, got)  # the lazy scores are read as they are
    x, labels = mem.obsm["X_pca"], mem.obs["perturbation"].astype(str).to_numpy()
    control = x[labels == "control"]
    for g in SHOWN:  # E-distance: 2 E|X - Y| - E|X - X'| - E|Y - Y'| over all pairs
        group = x[labels == g]
        expected = 2 * cdist(group, control).mean() - cdist(group, group).mean() - cdist(control, control).mean()
        assert_close(got[g], expected, rtol=1e-8, err_msg=g)
        assert got[g] > 0
    assert got["control"] == 0


def _pertpy_quietly(func, *args, **kwargs):
    """A pertpy test, without its division-by-zero warning (log2 of a zero mean in its ``log_fc``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "divide by zero encountered in log2", RuntimeWarning)
        return func(*args, **kwargs)


@pytest.mark.parametrize(("tool", "method", "options"), [
    ("WilcoxonTest", "wilcoxon", {}),                 # scipy's mannwhitneyu: continuity-corrected by default
    ("TTest", "t-test", {"equal_var": False}),       # scipy's ttest_ind is Student's unless told: Welch's here
])  # fmt: skip
def test_pertpy_simple_tests_equal_ours(pt, subset, tool, method, options):
    mem = ps.compute(subset)
    mem.layers["log1p_float64"] = mem.X.astype(np.float64)  # scipy computes in the input's dtype (X is float32)
    kw = {"use_continuity": True} if method == "wilcoxon" else {}
    ours = ps.compute(
        ps.tl.rank_genes_groups(mem, perturbation_column="perturbation", control_label="control", method=method, **kw)
    )
    for g in SHOWN:
        got = _pertpy_quietly(
            getattr(pt.tools, tool).compare_groups,
            mem,
            column="perturbation",
            baseline="control",
            groups_to_compare=g,
            layer="log1p_float64",
            test_kwargs=options,
        ).set_index("variable")
        got = got.loc[ours.var_names]
        assert_close(got["p_value"], ours[g].layers["pvals"][0], rtol=1e-10, err_msg=f"{tool} {g}")
        # one comparison at a time, pertpy's FDR is ours (Benjamini-Hochberg over the genes)
        assert_close(got["adj_p_value"], ours[g].layers["pvals_adj"][0], rtol=1e-10, err_msg=f"{tool} {g}")
    assert (ours["STAT1"].layers["pvals"][0] < 1e-38).any()  # values float32 cannot hold: why float64 is given


def test_pertpy_pydeseq2_on_our_pseudobulk(pt, replicate_pb):
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    model = pt.tools.PyDESeq2(replicate_pb.copy(), design="~bio_rep + perturbation")
    model.fit(n_cpus=1, quiet=True)
    got = model.test_contrasts(
        model.contrast(column="perturbation", baseline="control", group_to_compare="STAT1"), quiet=True, n_cpus=1
    ).set_index("variable")
    dds = DeseqDataSet(
        adata=replicate_pb.copy(), design="~bio_rep + perturbation", quiet=True, inference=DefaultInference(n_cpus=1)
    )
    dds.deseq2()
    st = DeseqStats(dds, contrast=["perturbation", "STAT1", "control"], quiet=True, n_cpus=1)
    st.summary()
    ref = st.results_df
    got = got.loc[ref.index]
    for ours, theirs in (("log_fc", "log2FoldChange"), ("p_value", "pvalue"), ("adj_p_value", "padj")):
        assert_close(got[ours], ref[theirs], rtol=1e-10, err_msg=ours)
    assert got.loc["STAT1", "log_fc"] < -1 and got.loc["STAT1", "adj_p_value"] < 1e-10


# ------------------------------------------------------------------------------------------------ the docs page

PAGE = "docs/interop.md"
BLOCK = re.compile(r"(?:<!-- needs: (?P<needs>[\w ,-]+?) -->\s*\n)?^```python\n(?P<code>.*?)^```", re.S | re.M)


@pytest.mark.slow  # the page runs the main job and each hand-over: ~40 s
def test_interop_page_runs_as_written(tmp_path, monkeypatch):
    """The Python blocks of docs/interop.md, in order in one namespace, from a directory beside ../shared/data.

    A block marked ``<!-- needs: pertpy -->`` runs when that package imports; otherwise it and the
    blocks after it are left out, and the test is skipped at the end with the reason (what ran, ran).
    """
    real_path("papalexi")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(DATA_DIR.resolve(), target_is_directory=True)
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    text = (ROOT / PAGE).read_text()
    assert len(re.findall(r"^```python\n", text, flags=re.M)) == len(list(BLOCK.finditer(text))) > 0
    namespace: dict = {"__name__": "__interop__"}
    missing: set[str] = set()
    ran = 0
    for m in BLOCK.finditer(text):
        needs = {n.strip() for n in (m["needs"] or "").split(",") if n.strip()}
        missing |= {n for n in needs if not _imports(n)}
        if missing:
            break
        line = text.count("\n", 0, m.start("code")) + 1
        try:
            with warnings.catch_warnings():
                if needs:  # pertpy's import warns (jaxopt), and its tests divide by zero in their log_fc
                    warnings.simplefilter("ignore", DeprecationWarning)
                    warnings.filterwarnings("ignore", "divide by zero encountered in log2", RuntimeWarning)
                exec(compile(m["code"], f"{PAGE}, block at line {line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{PAGE}: the Python block at line {line} fails: {type(err).__name__}: {err}") from err
        finally:
            plt.close("all")
        ran += 1
    assert ran > 0
    if missing:
        pytest.skip(f"{PAGE}: {ran} blocks ran; the rest need {', '.join(sorted(missing))}, which does not import here")


def _imports(name: str) -> bool:
    """Whether ``name`` imports (quietly: pertpy warns on import)."""
    if importlib.util.find_spec(name) is None:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            __import__(name)
    except ImportError:
        return False
    return True

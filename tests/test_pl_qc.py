"""The QC, embedding and profile plots of ``ps.pl``: what they draw equals the data, computed here with numpy.

Sources: a QCSummary of papalexi (real data) and of simulated screens, a real
``pertscale run`` output directory (qc.csv, qc_cells.zarr, run.json with the
profile, pca.zarr), an AnnData after ``ps.pp.pca``. Each figure is saved as
PNG under tmp_path; with ``$PERTSCALE_ARTIFACTS`` set (CI sets it) also copied
into its ``figures/`` (for looking at them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr

import pertscale as ps
from pertscale.pl import _common, _embedding, _profile, _qc

from .conftest import real_path

plt = pytest.importorskip("matplotlib.pyplot")
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.colors import to_hex, to_rgba  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def saved(artist, tmp_path: Path, name: str) -> Path:
    """Save the figure of ``artist`` to ``tmp_path/name.png`` (and ``$PERTSCALE_ARTIFACTS/figures``); check the PNG."""
    fig = artist if hasattr(artist, "savefig") else artist.figure
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("PERTSCALE_ARTIFACTS"):
        out = Path(os.environ["PERTSCALE_ARTIFACTS"]) / "figures"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.name)
    return path


# ------------------------------------------------------------------------------------------------ sources


@pytest.fixture(scope="module")
def papalexi_qc():
    adata = ps.read(real_path("papalexi"))
    return ps.pp.qc_summary(adata, perturbation_column="perturbation", control_label="control", min_genes=40)


@pytest.fixture(scope="module")
def sim_qc():
    """A screen whose thresholds drop cells for min_genes and whole perturbations for their size."""
    adata = ps.datasets.simulate_screen(2_000, 200, 8, control_fraction=0.2, seed=3, n_mito=4)
    small = adata.obs["perturbation"].astype(str).isin(["P0001", "P0002"])
    keep = ~small.to_numpy() | (np.arange(adata.n_obs) % 4 == 0)  # two small perturbations
    adata = adata[keep].copy()
    genes = np.asarray((adata.X > 0).sum(axis=1)).ravel()
    min_genes = int(np.percentile(genes, 10))
    return ps.pp.qc_summary(
        adata, perturbation_column="perturbation", control_label="control", min_genes=min_genes,
        min_cells_per_perturbation=100,
    )  # fmt: skip


def write_run_dir(directory: Path, qc, profile: dict | None = None) -> Path:
    """A run's output directory as `pertscale run` lays it out, written from a QCSummary (the format fixed in #23)."""
    directory.mkdir(parents=True, exist_ok=True)
    qc.perturbations.to_csv(directory / "qc.csv", index_label="perturbation")
    with ad.settings.override(auto_shard_zarr_v3=False):  # zarr v3, as the job writes (write_zarr warns of v2)
        ad.io.write_elem(
            zarr.open_group(str(directory / "qc_cells.zarr"), mode="w", zarr_format=3), "/", ad.AnnData(obs=qc.cells)
        )
    record = {
        "qc": {
            "min_genes": qc.min_genes,
            "min_cells_per_gene": qc.min_cells_per_gene,
            "min_cells_per_perturbation": qc.min_cells_per_perturbation,
            "control_label": qc.control_label,
            "perturbation_column": qc.perturbation_column,
        }
    }
    if profile is not None:
        record["profile"] = profile
    (directory / "run.json").write_text(json.dumps(record))
    return directory


@pytest.fixture(scope="module")
def run_out(sim_h5ad, tmp_path_factory) -> Path:
    """A real `pertscale run --pca 5` output directory (qc.csv, qc_cells.zarr, run.json, pca.zarr)."""
    out = tmp_path_factory.mktemp("run") / "out"
    ps.run(
        sim_h5ad, out, perturbation_column="perturbation", control_label="control", pca=5, report=False,
        scheduler="threads", progress=False,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def papalexi_pca():
    adata = ps.read(real_path("papalexi"))
    ps.pp.normalize_total(adata)
    ps.pp.log1p(adata)
    ps.pp.pca(adata, n_comps=10)
    scores = np.asarray(adata.obsm["X_pca"].compute())  # the reference: every score, computed here
    return adata, scores


# ------------------------------------------------------------------------------------------------ QC metrics


def hist_patches(ax) -> dict[str, np.ndarray]:
    """The stacked histogram layers of a metric panel: label -> cumulative heights, and their edges."""
    layers = {p.get_gid(): p.get_data() for p in ax.patches if str(p.get_gid()).startswith("qc-hist:")}
    assert layers, "no histogram drawn"
    return layers


def check_metric_panels(fig, cells: pd.DataFrame, keys, min_genes: int) -> None:
    assert [ax.get_xlabel() for ax in fig.axes] == list(keys)
    kept = (cells["reason"].astype(str) == "").to_numpy()
    for ax, key in zip(fig.axes, keys, strict=True):
        values = cells[key].to_numpy(dtype=np.float64)
        finite = np.isfinite(values)
        edges = np.histogram_bin_edges(values[finite], bins=50)
        layers = hist_patches(ax)
        tops = [d.values for d in layers.values()]
        np.testing.assert_allclose(layers["qc-hist:kept"].edges, edges)
        np.testing.assert_array_equal(layers["qc-hist:kept"].values, np.histogram(values[finite & kept], edges)[0])
        # the top of the stack: every cell with a value, as numpy counts it
        np.testing.assert_array_equal(np.max(tops, axis=0), np.histogram(values[finite], edges)[0])
        assert f"{int(kept[finite].sum()):,} kept" in ax.get_title()
        lines = [ln for ln in ax.get_lines() if ln.get_gid() == "qc-threshold:min_genes"]
        if key == "n_genes_by_counts":
            (line,) = lines
            assert np.all(np.asarray(line.get_xdata(), dtype=float) == min_genes)
            # every cell dropped for min_genes lies left of the line
            dropped = cells.loc[cells["reason"].astype(str) == "min_genes", key]
            assert (dropped < min_genes).all() and len(dropped) > 0
        else:
            assert not lines


def test_qc_metrics_histograms_equal_numpy(papalexi_qc, tmp_path):
    fig = _qc.qc_metrics(papalexi_qc, save=tmp_path / "qc_metrics.png")
    assert (tmp_path / "qc_metrics.png").read_bytes()[:4] == b"\x89PNG"
    check_metric_panels(fig, papalexi_qc.cells, _qc.QC_KEYS, papalexi_qc.min_genes)
    assert fig.axes[0].get_yscale() == "log"
    saved(fig, tmp_path, "qc_metrics_papalexi")


def test_qc_metrics_from_run_directory_equal_the_summary(sim_qc, tmp_path):
    out = write_run_dir(tmp_path / "out", sim_qc)
    keys = ("n_genes_by_counts", "total_counts", "pct_counts_mt", "total_counts_mt")
    fig = _qc.qc_metrics(out, keys=keys, log=False)
    check_metric_panels(fig, sim_qc.cells, keys, sim_qc.min_genes)
    reasons = {gid for ax in fig.axes for gid in hist_patches(ax)}
    assert {"qc-hist:min_genes", "qc-hist:min_cells_per_perturbation"} <= reasons
    saved(fig, tmp_path, "qc_metrics_sim_dir")


def test_qc_metrics_default_leaves_out_mitochondria_only_when_absent(tmp_path):
    adata = ps.datasets.simulate_screen(400, 60, 3, seed=1, n_mito=0)
    qc = ps.pp.qc_summary(adata, perturbation_column="perturbation", control_label="control", min_genes=5)
    assert "pct_counts_mt" not in qc.cells.columns
    fig = _qc.qc_metrics(qc)
    assert [ax.get_xlabel() for ax in fig.axes] == ["n_genes_by_counts", "total_counts"]
    with pytest.raises(KeyError, match="pct_counts_mt.*closest.*'total_counts'"):
        _qc.qc_metrics(qc, keys=["n_genes_by_counts", "pct_counts_mt"])


def test_qc_metrics_unknown_key_names_the_closest(papalexi_qc):
    with pytest.raises(KeyError, match="'n_genes_by_count'.*closest: 'n_genes_by_counts'"):
        _qc.qc_metrics(papalexi_qc, keys=["n_genes_by_count"])


# ------------------------------------------------------------------------------------ cells per perturbation


def bars(ax, gid: str) -> np.ndarray:
    return np.array([p.get_height() for p in ax.patches if p.get_gid() == gid])


def test_qc_perturbation_counts_bars_equal_the_table(papalexi_qc, tmp_path):
    ax = _qc.qc_perturbation_counts(papalexi_qc)
    table = papalexi_qc.perturbations.sort_values("n_cells", ascending=False, kind="stable")
    np.testing.assert_array_equal(bars(ax, "qc-before"), table["n_cells"].to_numpy())
    np.testing.assert_array_equal(bars(ax, "qc-after"), table["n_cells_kept"].to_numpy())
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == list(table.index.astype(str))
    (line,) = [ln for ln in ax.get_lines() if ln.get_gid() == "qc-threshold:min_cells_per_perturbation"]
    assert np.all(np.asarray(line.get_ydata(), dtype=float) == papalexi_qc.min_cells_per_perturbation)
    colors = {t.get_text(): t.get_color() for t in ax.get_xticklabels()}
    weights = {t.get_text(): t.get_fontweight() for t in ax.get_xticklabels()}
    assert weights["control"] == "bold"
    dropped = table.index[table["reason"] != ""].astype(str)
    assert len(dropped) == 1 and colors[dropped[0]] == _qc._DROPPED  # 'multiple', an excluded label
    saved(ax, tmp_path, "qc_perturbation_counts_papalexi")


def test_qc_perturbation_counts_at_10000_perturbations_is_a_ranked_line(tmp_path):
    rng = np.random.default_rng(0)
    n = 10_000
    before = np.r_[20_000, np.sort(rng.negative_binomial(4, 0.04, n - 1) + 1)[::-1]]
    after = np.minimum(before, (before * rng.uniform(0.8, 1.0, n)).astype(np.int64))
    reason = np.where(after < 30, "min_cells_per_perturbation", "")
    reason[0] = ""
    after[reason != ""] = 0
    table = pd.DataFrame(
        {"n_cells": before, "n_cells_min_genes": before, "n_cells_kept": after, "is_control": np.arange(n) == 0,
         "reason": reason},
        index=pd.Index(["non-targeting"] + [f"GENE{i:05d}" for i in range(1, n)], name="perturbation"),
    )  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    table.to_csv(out / "qc.csv", index_label="perturbation")
    record = {"qc": {"min_cells_per_perturbation": 30, "control_label": "non-targeting"}}
    (out / "run.json").write_text(json.dumps(record))
    ax = _qc.qc_perturbation_counts(out)
    assert len(ax.patches) < 10 and len(ax.texts) < 5  # no artist per perturbation
    assert all(len(c.get_offsets()) <= int((reason != "").sum()) for c in ax.collections)
    (line_before,) = [ln for ln in ax.get_lines() if ln.get_gid() == "qc-before"]
    (line_after,) = [ln for ln in ax.get_lines() if ln.get_gid() == "qc-after"]
    np.testing.assert_array_equal(line_before.get_ydata(), np.sort(before)[::-1])
    np.testing.assert_array_equal(line_after.get_ydata(), np.sort(after[reason == ""])[::-1])
    assert ax.get_yscale() == "log"  # a control 100 times the median perturbation
    text = ax.texts[-1].get_text()
    assert "largest: GENE00001" in text
    saved(ax, tmp_path, "qc_perturbation_counts_10000")


def test_qc_summary_figure_from_a_real_run(run_out, sim_adata, tmp_path):
    fig = _qc.qc_summary(run_out, save=tmp_path / "summary.png")
    table = pd.read_csv(run_out / "qc.csv", keep_default_na=False)
    assert len(fig.axes) == 4  # three metrics (the screen has MT- genes) and the counts
    kept = int((table["reason"] == "").sum())
    assert f"{kept:,} of {len(table):,} perturbations kept" in fig.get_suptitle()
    # the run's per-cell metrics, plotted, equal numpy's on the input's counts
    genes = np.asarray((sim_adata.X > 0).sum(axis=1)).ravel()
    edges = np.histogram_bin_edges(genes, bins=50)
    total = np.max([d.values for d in hist_patches(fig.axes[0]).values()], axis=0)
    np.testing.assert_array_equal(total, np.histogram(genes, edges)[0])
    (line,) = [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "qc-threshold:min_genes"]
    assert line.get_xdata()[0] == json.loads((run_out / "run.json").read_text())["qc"]["min_genes"]
    np.testing.assert_array_equal(bars(fig.axes[3], "qc-after"), table["n_cells_kept"].to_numpy())
    saved(fig, tmp_path, "qc_summary_run")


def test_qc_plots_refuse_a_directory_that_is_not_a_run(tmp_path, papalexi_qc):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a pertscale output directory.*qc.csv.*pertscale run"):
        _qc.qc_perturbation_counts(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _qc.qc_metrics(tmp_path / "missing")
    out = write_run_dir(tmp_path / "out", papalexi_qc)
    shutil.rmtree(out / "qc_cells.zarr")
    with pytest.raises(FileNotFoundError, match="has no qc_cells.zarr: `pertscale run` writes it"):
        _qc.qc_metrics(out)
    with pytest.raises(TypeError, match="QCSummary"):
        _qc.qc_metrics(papalexi_qc.cells)


# ------------------------------------------------------------------------------------------------ embeddings


def points(ax) -> list[PathCollection]:
    return [c for c in ax.collections if isinstance(c, PathCollection)]


def test_pca_scatter_offsets_equal_the_scores(papalexi_pca, tmp_path):
    adata, scores = papalexi_pca
    ax = _embedding.pca(adata, max_categories=30)  # 27 labels: every cell in one artist (in a random order)
    (coll,) = points(ax)
    offsets = np.asarray(coll.get_offsets())
    drawn, ref = np.lexsort(offsets.T), np.lexsort(scores[:, :2].T)
    np.testing.assert_allclose(offsets[drawn], scores[ref][:, :2], rtol=1e-12)
    legend = ax.get_legend()
    names = [t.get_text() for t in legend.get_texts()]
    assert names == sorted(adata.obs["perturbation"].astype(str).unique())
    # each cell has its label's colour in the legend
    handles = zip(legend.get_texts(), legend.legend_handles, strict=True)
    colour = {t.get_text(): to_hex(h.get_color()) for t, h in handles}
    labels = adata.obs["perturbation"].astype(str).to_numpy()[ref]
    assert [to_hex(c) for c in coll.get_facecolors()[drawn]] == [colour[label] for label in labels]
    ax = _embedding.pca(adata, components="2,3", color="guide_umi_total")
    (coll,) = points(ax)
    order = np.argsort(adata.obs["guide_umi_total"].to_numpy(), kind="stable")  # high values drawn last
    np.testing.assert_allclose(coll.get_offsets(), scores[order][:, [1, 2]], rtol=1e-12)
    np.testing.assert_allclose(coll.get_array(), adata.obs["guide_umi_total"].to_numpy()[order])
    saved(ax, tmp_path, "pca_papalexi_umi")


def test_pca_colours_the_largest_categories_and_the_rest_grey(papalexi_pca, tmp_path):
    adata, scores = papalexi_pca
    ax = _embedding.pca(adata, annotate_var_explained=True)
    labels = adata.obs["perturbation"].astype(str)
    counts = labels.value_counts()
    largest = set(counts.index[:20])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert set(legend[:-1]) == largest and legend[-1] == "other (7 categories)"
    other = [c for c in points(ax) if c.get_gid() == "embedding-other"][0]
    assert len(other.get_offsets()) == int((~labels.isin(largest)).sum())
    ratio = adata.uns["pca"]["variance_ratio"]
    assert ax.get_xlabel() == f"PC1 ({100 * ratio[0]:.1f} %)"
    saved(ax, tmp_path, "pca_papalexi")
    ax = _embedding.pca(adata, groups=["control", "IFNGR1"])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["control", "IFNGR1", "other (25 categories)"]
    shown = np.asarray([c for c in points(ax) if c.get_gid() == "embedding-points"][0].get_offsets())
    ref = scores[labels.isin(["control", "IFNGR1"]).to_numpy()][:, :2]
    np.testing.assert_allclose(shown[np.lexsort(shown.T)], ref[np.lexsort(ref.T)])


@pytest.mark.parametrize("color", ["perturbation", "guide_umi_total", None])
def test_pca_above_max_points_draws_a_density_image(papalexi_pca, monkeypatch, tmp_path, color):
    adata, scores = papalexi_pca
    monkeypatch.setattr(_common, "MAX_POINTS", 1_000)
    ax = _embedding.pca(adata, color=color, gridsize=120)
    assert not any(len(c.get_offsets()) > 1_000 for c in ax.collections)  # no artist per cell
    (image,) = [im for im in ax.get_images() if isinstance(im, AxesImage)]
    x0, x1, y0, y1 = image.get_extent()
    counts, _, _ = np.histogram2d(scores[:, 0], scores[:, 1], bins=120, range=[[x0, x1], [y0, y1]])
    alpha = np.asarray(image.get_array())[:, :, 3]
    # numpy's histogram2d is (x, y); the image is rows = y: painted exactly where cells are
    np.testing.assert_array_equal(alpha > 0, counts.T > 0)
    assert counts.sum() == adata.n_obs
    if color is None:
        saved(ax, tmp_path, "pca_density")
    elif color == "perturbation":
        saved(ax, tmp_path, "pca_density_perturbation")


def test_pca_density_colours_the_pixels_of_the_groups_shown(papalexi_pca, monkeypatch):
    adata, scores = papalexi_pca
    monkeypatch.setattr(_common, "MAX_POINTS", 1_000)
    ax = _embedding.pca(adata, groups=["control"], gridsize=100)
    (image,) = ax.get_images()
    x0, x1, y0, y1 = image.get_extent()
    control = (adata.obs["perturbation"] == "control").to_numpy()
    counts, _, _ = np.histogram2d(scores[control, 0], scores[control, 1], bins=100, range=[[x0, x1], [y0, y1]])
    rgb = np.asarray(image.get_array())[:, :, :3]
    (handle,) = [h for h, t in zip(ax.get_legend().legend_handles, ax.get_legend().get_texts(), strict=True)
                 if t.get_text() == "control"]  # fmt: skip
    is_control_colour = np.isclose(rgb, np.asarray(to_rgba(handle.get_color()))[:3]).all(axis=2)
    np.testing.assert_array_equal(is_control_colour, counts.T > 0)


def test_pca_reads_a_run_directory(run_out, tmp_path):
    ax = _embedding.pca(run_out, color="total_counts")
    stored = ad.read_zarr(run_out / "pca.zarr")
    x = np.asarray(stored.obsm["X_pca"])
    (coll,) = points(ax)
    order = np.argsort(stored.obs["total_counts"].to_numpy(), kind="stable")
    np.testing.assert_allclose(coll.get_offsets(), x[order][:, :2])
    ax = _embedding.pca(run_out)  # colour by the run's perturbation column
    assert ax.get_title() == "perturbation"
    assert len(ax.get_legend().get_texts()) == stored.obs["perturbation"].nunique()
    saved(ax, tmp_path, "pca_run")
    vr = _embedding.pca_variance_ratio(run_out, n_pcs=3)
    (line,) = [ln for ln in vr.get_lines() if ln.get_gid() == "pca-variance-ratio"]
    np.testing.assert_allclose(line.get_ydata(), np.asarray(stored.uns["pca"]["variance_ratio"])[:3])


def test_pca_reads_only_what_it_plots_from_an_h5ad(sim_adata, tmp_path):
    adata = sim_adata.copy()
    rng = np.random.default_rng(2)
    adata.obsm["X_pca"] = rng.normal(size=(adata.n_obs, 4))
    adata.varm["PCs"] = rng.normal(size=(adata.n_vars, 4))
    adata.uns["pca"] = {"variance_ratio": np.array([0.4, 0.3, 0.2, 0.1])}
    adata.write_h5ad(tmp_path / "a.h5ad")
    ax = _embedding.pca(tmp_path / "a.h5ad", color=None, components=(3, 1))
    (coll,) = points(ax)
    np.testing.assert_array_equal(coll.get_offsets(), adata.obsm["X_pca"][:, [2, 0]])
    fig = _embedding.pca_loadings(tmp_path / "a.h5ad", components=[2], n_genes=3, include_lowest=False)
    top = np.asarray(adata.var_names)[np.argsort(adata.varm["PCs"][:, 1])[::-1][:3]]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(top)


def test_pca_without_scores_says_what_computes_them(tmp_path, run_out, sim_adata):
    with pytest.raises(ValueError, match=r"no obsm\['X_pca'\].*ps\.pp\.pca.*pertscale run --pca N"):
        _embedding.pca(sim_adata)
    with pytest.raises(ValueError, match=r"no uns\['pca'\]"):
        _embedding.pca_variance_ratio(sim_adata)
    with pytest.raises(ValueError, match=r"no varm\['PCs'\]"):
        _embedding.pca_loadings(sim_adata)
    no_pca = tmp_path / "no_pca"
    no_pca.mkdir()
    shutil.copy(run_out / "run.json", no_pca / "run.json")
    with pytest.raises(ValueError, match="without --pca.*pertscale run --pca N"):
        _embedding.pca(no_pca)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a pertscale output directory"):
        _embedding.pca(tmp_path / "empty")
    with pytest.raises(ValueError, match="components='1,9'.*9 is not a component; there are 5"):
        _embedding.pca(run_out, components="1,9")


def test_pca_unknown_colour_names_the_closest(papalexi_pca, run_out):
    adata, _ = papalexi_pca
    with pytest.raises(KeyError, match="'perturbatoin'.*closest: 'perturbation'"):
        _embedding.pca(adata, color="perturbatoin")
    with pytest.raises(KeyError, match="'total_count'.*closest: 'total_counts'"):
        _embedding.pca(run_out, color="total_count")
    with pytest.raises(KeyError, match="category 'IFNGR'.*closest: .*'IFNGR1'"):
        _embedding.pca(adata, groups=["IFNGR"])


def test_pca_variance_ratio_points_equal_uns(papalexi_pca, tmp_path):
    adata, _ = papalexi_pca
    ax = _embedding.pca_variance_ratio(adata, n_pcs=8, log=True)
    (line,) = [ln for ln in ax.get_lines() if ln.get_gid() == "pca-variance-ratio"]
    np.testing.assert_array_equal(line.get_xdata(), np.arange(1, 9))
    np.testing.assert_allclose(line.get_ydata(), np.asarray(adata.uns["pca"]["variance_ratio"])[:8])
    assert ax.get_yscale() == "log"
    saved(_embedding.pca_variance_ratio(adata), tmp_path, "pca_variance_ratio")


def test_pca_loadings_name_the_extreme_genes(papalexi_pca, tmp_path):
    adata, _ = papalexi_pca
    fig = _embedding.pca_loadings(adata, components="1,2,3", n_genes=6)
    loadings = np.asarray(adata.varm["PCs"])
    names = np.asarray(adata.var_names)
    for k, ax in enumerate(fig.axes):
        order = np.argsort(loadings[:, k])[::-1]
        expected = list(names[order[:6]]) + list(names[order[-6:]])
        # read top to bottom: the largest first
        ticks = sorted(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels()), strict=True), reverse=True)
        assert [name for _, name in ticks] == expected
        widths = [p.get_width() for p in ax.patches if p.get_gid() == "pca-loadings"]
        np.testing.assert_allclose(widths, loadings[np.r_[order[:6], order[-6:]], k])
        assert ax.get_title() == f"PC{k + 1}"
    saved(fig, tmp_path, "pca_loadings")


def test_umap_shares_the_scatter_and_names_what_computes_it(sim_adata, tmp_path):
    adata = sim_adata.copy()
    rng = np.random.default_rng(1)
    adata.obsm["X_umap"] = rng.normal(size=(adata.n_obs, 2))
    ax = _embedding.umap(adata, color=None)  # one colour: every cell in the file's order
    (coll,) = points(ax)
    np.testing.assert_array_equal(coll.get_offsets(), adata.obsm["X_umap"])
    ax = _embedding.umap(adata)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("UMAP1", "UMAP2")
    saved(ax, tmp_path, "umap")
    del adata.obsm["X_umap"]
    with pytest.raises(ValueError, match=r"no obsm\['X_umap'\].*ps\.tl\.umap"):
        _embedding.umap(adata)


# ------------------------------------------------------------------------------------------------- profile


def fake_profile(n_workers: int) -> dict:
    rng = np.random.default_rng(n_workers)
    names = ["transpose", "sort", "qc and filters", "size factors", "dispersions", "test and write", "tables"]
    stages, start = [], 0.0
    for name in names:
        seconds = float(np.round(rng.uniform(0.5, 60), 2))
        stages.append({"name": name, "start": start, "seconds": seconds})
        start += seconds
    processes = [{"name": "main", "pid": 1, "peak_rss": {s: int(rng.uniform(0.2, 3) * 2**30) for s in names}}]
    processes += [
        {"name": f"worker {i}", "pid": 100 + i, "peak_rss": {s: int(rng.uniform(0.2, 2) * 2**30) for s in names[3:]}}
        for i in range(1, n_workers + 1)
    ]
    return {"interval": 0.5, "stages": stages, "processes": processes}


def test_profile_bars_equal_the_record(tmp_path, sim_qc):
    record = fake_profile(2)
    fig = _profile.profile({"profile": record})
    ax_t, ax_m = fig.axes[:2]
    seconds = [p.get_width() for p in ax_t.patches if p.get_gid() == "profile-seconds"]
    np.testing.assert_allclose(seconds, [s["seconds"] for s in record["stages"]])
    assert [t.get_text() for t in ax_t.get_yticklabels()] == [s["name"] for s in record["stages"]]
    for proc in record["processes"]:
        widths = [p.get_width() for p in ax_m.patches if p.get_gid() == f"profile-rss:{proc['name']}"]
        np.testing.assert_allclose(widths, np.array(list(proc["peak_rss"].values())) / 2**30)
    saved(fig, tmp_path, "profile")
    # the same from run.json and from the directory
    out = write_run_dir(tmp_path / "out", sim_qc, profile=record)
    for source in (out, out / "run.json", record):
        again = _profile.profile(source).axes[0]
        np.testing.assert_allclose([p.get_width() for p in again.patches], seconds)


def test_profile_of_many_workers_is_a_table(tmp_path):
    record = fake_profile(12)
    fig = _profile.profile(record)
    (image,) = fig.axes[1].get_images()
    table = np.ma.filled(image.get_array(), np.nan)
    main = record["processes"][0]["peak_rss"]
    np.testing.assert_allclose(table[:, 0], np.array([main[s["name"]] for s in record["stages"]]) / 2**30)
    assert np.isnan(table[:3, 1:]).all()  # the workers start at size factors
    saved(fig, tmp_path, "profile_heatmap")


def test_profile_of_a_real_run(run_out, tmp_path):
    record = json.loads((run_out / "run.json").read_text())["profile"]
    fig = _profile.profile(run_out)
    seconds = [p.get_width() for p in fig.axes[0].patches if p.get_gid() == "profile-seconds"]
    np.testing.assert_allclose(seconds, [s["seconds"] for s in record["stages"]])
    saved(fig, tmp_path, "profile_run")


def test_profile_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="holds no 'profile'.*pertscale run"):
        _profile.profile({"qc": {}})
    with pytest.raises(ValueError, match="stage 0"):
        _profile.profile({"stages": [{"name": "sort"}]})
    with pytest.raises(FileNotFoundError, match="not a pertscale output directory.*run.json"):
        _profile.profile(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        _profile.profile(tmp_path)


# ------------------------------------------------------------------------------------------------ headless


def test_plots_save_without_a_display(tmp_path, sim_qc):
    """No DISPLAY, no MPLBACKEND, a fresh interpreter: matplotlib falls back to Agg and the plots save."""
    out = write_run_dir(tmp_path / "out", sim_qc, profile=fake_profile(1))
    script = (
        "import sys, matplotlib\n"
        "from pertscale.pl import _qc, _profile\n"
        "out = sys.argv[1]\n"
        "_qc.qc_summary(out, save=out + '/qc.png')\n"
        "_profile.profile(out, save=out + '/profile.png')\n"
        "print(matplotlib.get_backend())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND", "WAYLAND_DISPLAY")}
    done = subprocess.run(
        [sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().lower() == "agg"
    for name in ("qc.png", "profile.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

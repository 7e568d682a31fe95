"""Plots of differential expression (``pertscale.pl._de``): what they draw is what the results store.

Results are made with ``ps.tl.rank_genes_groups`` on a simulated screen
(known targets) and on papalexi, written with ``ps.write`` and plotted from
the path. The references are the stored arrays read back with anndata
(``anndata.read_zarr``) and numpy/scipy on them. Each figure is saved under
``tmp_path`` and, when ``$PERTSCALE_ARTIFACTS`` is set (CI sets it), copied
into its ``figures/`` for a person to look at.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from scipy.cluster.hierarchy import leaves_list, linkage

import pertscale as ps
from pertscale.pl import _de as pl

from .conftest import assert_close, real_path

ARTIFACTS = os.environ.get("PERTSCALE_ARTIFACTS")
TINY = np.finfo(np.float64).tiny


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def keep(tmp_path: Path, name: str) -> Path:
    """Where a test saves a figure: under tmp_path; also copied into FIGURES when that is wanted."""
    return tmp_path / f"{name}.png"


def publish(path: Path) -> None:
    """Copy a saved figure into ``$PERTSCALE_ARTIFACTS/figures`` (when the variable is set)."""
    if ARTIFACTS:
        figures = Path(ARTIFACTS) / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        (figures / path.name).write_bytes(path.read_bytes())
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def stored(path: Path) -> ad.AnnData:
    """The results as written, read back by anndata (the reference)."""
    return ad.read_zarr(path)


def points(ax) -> np.ndarray:
    """All scatter points of ``ax`` (n, 2)."""
    offsets = [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)]
    return np.concatenate([np.asarray(o, dtype=np.float64).reshape(-1, 2) for o in offsets])


def sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


def top_down(ax) -> list[str]:
    """The y tick labels from the top of the axes down."""
    ticks = sorted(ax.get_yticklabels(), key=lambda t: -t.get_position()[1])
    return [t.get_text() for t in ticks]


def labels(ax) -> list:
    return [t for t in ax.texts if t.get_text()]


def assert_no_overlaps(ax) -> None:
    """Label boxes (text only) overlap neither each other nor leave the axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # at the figure's dpi (a text keeps the renderer it was last saved with; a closed figure has no Agg canvas)
    renderer = FigureCanvasAgg(ax.figure).get_renderer()
    boxes = [t.get_window_extent(renderer) for t in labels(ax)]
    frame = ax.get_window_extent(renderer)
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    for b in boxes:
        assert frame.x0 - 1 <= b.x0 and b.x1 <= frame.x1 + 1 and frame.y0 - 1 <= b.y0 and b.y1 <= frame.y1 + 1


def dashed(ax, orientation: str) -> list[float]:
    """Positions of the dashed reference lines: horizontal (y) or vertical (x)."""
    out = []
    for line in ax.lines:
        if line.get_linestyle() != "--":
            continue
        x, y = (np.asarray(v, dtype=float) for v in line.get_data())
        if orientation == "h" and np.all(y == y[0]) and not np.all(x == x[0]):
            out.append(float(y[0]))
        if orientation == "v" and np.all(x == x[0]):
            out.append(float(x[0]))
    return sorted(out)


# ------------------------------------------------------------------------------------------------- results


def _normalized(adata):
    ps.pp.normalize_total(adata, target_sum=1e4)
    ps.pp.log1p(adata)
    return adata


@pytest.fixture(scope="module", autouse=True)
def _quiet_module():
    with ps.settings.override(progress=False):  # the module's fixtures compute before the per-test fixture
        yield


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """A simulated screen's Wilcoxon results on disk, and its true targets."""
    adata = ps.datasets.simulate_screen(n_cells=2_000, n_genes=200, n_perturbations=10, control_fraction=0.2, seed=3)
    design = adata.uns["simulation"]
    targets = dict(zip(map(str, design["perturbations"]), map(str, design["targets"]), strict=True))
    de = ps.tl.rank_genes_groups(_normalized(adata), perturbation_column="perturbation", control_label="control")
    path = tmp_path_factory.mktemp("sim") / "de_wilcoxon.zarr"
    ps.write(de, path)
    return path, targets


@pytest.fixture(scope="module")
def sim_in_memory(sim):
    """The same screen's lazy results AnnData, and the AnnData holding them in its result store."""
    adata = ps.datasets.simulate_screen(n_cells=2_000, n_genes=200, n_perturbations=10, control_fraction=0.2, seed=3)
    de = ps.tl.rank_genes_groups(_normalized(adata), perturbation_column="perturbation", control_label="control")
    return de, adata


@pytest.fixture(scope="module")
def sim_nbglm(tmp_path_factory):
    """nb-glm results (baseMean) of a small simulated screen."""
    adata = ps.datasets.simulate_screen(n_cells=1_000, n_genes=120, n_perturbations=4, control_fraction=0.25, seed=5)
    ps.pp.size_factors(adata)
    ps.tl.dispersions(adata, perturbation_column="perturbation")
    de = ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control", method="nb-glm")
    path = tmp_path_factory.mktemp("nb") / "de_nb_glm.zarr"
    ps.write(de, path)
    return path


@pytest.fixture(scope="module")
def papalexi(tmp_path_factory):
    """papalexi's Wilcoxon results on disk (labels are target gene names)."""
    adata = _normalized(ps.read(real_path("papalexi")))
    de = ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control")
    path = tmp_path_factory.mktemp("papalexi") / "de_wilcoxon.zarr"
    ps.write(de, path)
    return path


# ----------------------------------------------------------------------------------------- one perturbation


@pytest.mark.parametrize("screen", ["sim", "papalexi"])
def test_volcano_draws_the_stored_values_thresholds_and_labels(screen, request, tmp_path):
    path = request.getfixturevalue("sim")[0] if screen == "sim" else request.getfixturevalue("papalexi")
    res = stored(path)
    p = "P0002" if screen == "sim" else "IFNGR1"
    i = list(res.obs_names).index(p)
    lfc, padj = res.layers["logfoldchanges"][i], res.layers["pvals_adj"][i]
    out = keep(tmp_path, f"volcano_{screen}")
    ax = pl.volcano(path, p, save=out)
    publish(out)

    tested = np.isfinite(lfc) & np.isfinite(padj)
    expected = np.column_stack([lfc[tested], -np.log10(np.maximum(padj[tested], TINY))])
    assert_close(sorted_rows(points(ax)), sorted_rows(expected))
    by_label = {c.get_label().split(" (")[0]: np.asarray(c.get_offsets()) for c in ax.collections}
    up = tested & (padj < 0.05) & (lfc >= 1)
    down = tested & (padj < 0.05) & (lfc <= -1)
    assert_close(np.sort(by_label["up"][:, 0]), np.sort(lfc[up]))
    assert_close(np.sort(by_label["down"][:, 0]), np.sort(lfc[down]))
    assert down.any()
    assert dashed(ax, "h") == pytest.approx([-np.log10(0.05)])
    assert dashed(ax, "v") == pytest.approx([-1.0, 1.0])

    names = np.asarray(res.var_names)
    sig = np.flatnonzero(up | down)
    top = sig[np.lexsort((-np.abs(lfc[sig]), padj[sig]))][:10]
    written = [t.get_text() for t in labels(ax)]
    assert written == list(names[top])  # every one found a place, most significant first
    assert_no_overlaps(ax)


def test_volcano_keeps_p_zero_and_marks_it(sim, tmp_path):
    path, _ = sim
    ds = ps.get.dataset(path).load()
    ds["pvals_adj"][0, :3] = 0.0
    lfc = ds["logfoldchanges"].values[0]
    out = keep(tmp_path, "volcano_p_zero")
    ax = pl.volcano(ds, str(ds.perturbation.values[0]), save=out)
    publish(out)
    triangles = [c for c in ax.collections if c.get_label().startswith("p = 0")]
    assert len(triangles) == 1
    drawn = np.asarray(triangles[0].get_offsets())
    assert_close(np.sort(drawn[:, 0]), np.sort(lfc[:3]))
    assert_close(drawn[:, 1], np.full(3, -np.log10(TINY)))
    assert len(points(ax)) == int(np.isfinite(ds["pvals_adj"].values[0]).sum())
    assert ax.get_ylim()[1] > -np.log10(TINY)


def test_ma_wilcoxon_uses_pooled_detection(sim, tmp_path):
    path, _ = sim
    res = stored(path)
    p = "P0004"
    i = list(res.obs_names).index(p)
    n, n_control = float(res.obs["n_cells"].iloc[i]), float(res.uns["pertscale"]["settings"]["n_control_cells"])
    x = (res.layers["pts"][i] * n + res.layers["pts_rest"][i] * n_control) / (n + n_control)
    lfc = res.layers["logfoldchanges"][i]
    out = keep(tmp_path, "ma_wilcoxon")
    ax = pl.ma(path, p, save=out, lfc_threshold=0.5)
    publish(out)
    drawn = np.isfinite(lfc) & (x > 0)
    assert_close(sorted_rows(points(ax)), sorted_rows(np.column_stack([x[drawn], lfc[drawn]])))
    assert "fraction of cells detecting" in ax.get_xlabel() and ax.get_xscale() == "log"
    assert dashed(ax, "h") == pytest.approx([-0.5, 0.5])
    assert_no_overlaps(ax)


def test_ma_nbglm_uses_base_mean(sim_nbglm, tmp_path):
    res = stored(sim_nbglm)
    p = str(res.obs_names[1])
    lfc, base = res.layers["logfoldchanges"][1], res.layers["baseMean"][1]
    out = keep(tmp_path, "ma_nbglm")
    ax = pl.ma(sim_nbglm, p, save=out)
    publish(out)
    drawn = np.isfinite(lfc) & (base > 0)
    assert_close(sorted_rows(points(ax)), sorted_rows(np.column_stack([base[drawn], lfc[drawn]])))
    assert "baseMean" in ax.get_xlabel()


@pytest.mark.parametrize(("key", "rank_by"), [("scores", "abs"), ("logfoldchanges", "down")])
def test_top_genes_bar(sim, tmp_path, key, rank_by):
    path, _ = sim
    res = stored(path)
    values = res.layers[key][5]
    finite = np.flatnonzero(np.isfinite(values))
    order = finite[np.argsort(np.abs(values[finite]) * -1 if rank_by == "abs" else values[finite], kind="stable")]
    out = keep(tmp_path, f"top_genes_bar_{key}")
    ax = pl.top_genes_bar(path, str(res.obs_names[5]), key=key, rank_by=rank_by, n_genes=12, save=out)
    publish(out)
    bars = sorted(ax.patches, key=lambda b: -b.get_y())  # top bar first
    assert_close([b.get_width() for b in bars], values[order[:12]])
    assert top_down(ax) == list(np.asarray(res.var_names)[order[:12]])


def test_rank_genes_groups_layout_and_panel_limit(sim, tmp_path, monkeypatch):
    path, _ = sim
    res = stored(path)
    chosen = ["P0001", "P0007", "P0003"]
    out = keep(tmp_path, "rank_genes_groups")
    fig = pl.rank_genes_groups(path, chosen, n_genes=8, ncols=2, save=out)
    publish(out)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    names = np.asarray(res.var_names)
    for ax, p in zip(fig.axes, chosen, strict=True):
        scores = res.layers["scores"][list(res.obs_names).index(p)]
        top = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:8]
        texts = ax.texts
        assert [t.get_text() for t in texts] == list(names[top])
        assert_close([t.get_position()[0] for t in texts], np.arange(8))
        assert_close([t.get_position()[1] for t in texts], scores[top])
        assert all(t.get_rotation() == 90 for t in texts)
        assert_no_overlaps(ax)  # and every name inside its panel
        assert ax.get_title() == f"{p} vs control"
    assert len({ax.get_ylim() for ax in fig.axes}) == 1  # sharey

    monkeypatch.setattr(pl, "MAX_PANELS", 5)
    with pytest.raises(ValueError, match=r"10 perturbations.*de_genes_per_perturbation.*de_heatmap"):
        pl.rank_genes_groups(path)
    assert len(pl.rank_genes_groups(path, ["P0000", "P0009"], save=tmp_path / "two.png").axes) == 2


# ------------------------------------------------------------------------------------------ the whole screen


@pytest.mark.parametrize("lfc_threshold", [None, 0.5])
def test_de_counts_equal_numpy(papalexi, lfc_threshold):
    res = stored(papalexi)
    padj, lfc = res.layers["pvals_adj"], res.layers["logfoldchanges"]
    with np.errstate(invalid="ignore"):
        hit = padj < 0.01
        if lfc_threshold is not None:
            hit &= np.abs(lfc) >= lfc_threshold
    counts = pl.de_counts(papalexi, pval_threshold=0.01, lfc_threshold=lfc_threshold)
    assert counts.name == "n_de_genes" and counts.dtype == np.int64
    assert list(counts.index) == list(res.obs_names)
    np.testing.assert_array_equal(counts.to_numpy(), hit.sum(axis=1))
    assert counts.max() > 0


def test_de_genes_per_perturbation_bars_and_line(papalexi, tmp_path, monkeypatch):
    res = stored(papalexi)
    with np.errstate(invalid="ignore"):
        counts = (res.layers["pvals_adj"] < 0.05).sum(axis=1)
    order = np.argsort(-counts, kind="stable")
    out = keep(tmp_path, "de_genes_per_perturbation")
    ax = pl.de_genes_per_perturbation(papalexi, n_labels=10, save=out)
    publish(out)
    assert_close([b.get_height() for b in ax.patches], counts[order])
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == list(np.asarray(res.obs_names)[order[:10]])

    monkeypatch.setattr(pl, "MAX_BARS", 5)  # as a screen of more perturbations than bars: one line
    out = keep(tmp_path, "de_genes_per_perturbation_ranked")
    ax = pl.de_genes_per_perturbation(papalexi, n_labels=12, save=out)
    publish(out)
    assert len(ax.patches) == 0 and len(ax.lines) == 1
    x, y = ax.lines[0].get_data()
    assert_close(x, np.arange(1, len(counts) + 1))
    assert_close(y, counts[order])
    listed = "\n".join(t.get_text() for t in ax.texts).splitlines()
    assert [line.split()[1] for line in listed] == list(np.asarray(res.obs_names)[order[:12]])


def test_de_heatmap_rows_columns_and_clustering(papalexi, tmp_path):
    res = stored(papalexi)
    padj, lfc = res.layers["pvals_adj"], res.layers["logfoldchanges"]
    names, genes = np.asarray(res.obs_names), np.asarray(res.var_names)
    with np.errstate(invalid="ignore"):
        counts = (padj < 0.05).sum(axis=1)
    out = keep(tmp_path, "de_heatmap")
    ax = pl.de_heatmap(papalexi, n_perturbations=12, n_genes=15, save=out)
    publish(out)
    rows = [t.get_text() for t in ax.get_yticklabels()]
    cols = [t.get_text() for t in ax.get_xticklabels()]
    ranked = names[np.argsort(-counts, kind="stable")[:12]]
    assert sorted(rows) == sorted(ranked)
    row_i = [list(names).index(r) for r in rows]
    col_i = [list(genes).index(c) for c in cols]
    image = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
    assert_close(image, lfc[np.ix_(row_i, col_i)])
    vmin, vmax = ax.images[0].get_clim()
    assert vmin == -vmax > -np.inf

    # the genes: DE in the most of these rows, ties by the larger sum of |lfc| where DE (numpy on the stored rows)
    ranked_i = [list(names).index(r) for r in ranked]
    sig = np.nan_to_num(padj[ranked_i], nan=1.0) < 0.05
    n_sig, weight = sig.sum(axis=0), (np.abs(np.nan_to_num(lfc[ranked_i])) * sig).sum(axis=0)
    chosen = [g for g in np.lexsort((-weight, -n_sig)) if n_sig[g] > 0][:15]
    assert len(chosen) == 15 and sorted(col_i) == sorted(chosen)
    # the order is scipy's: linkage of the rows in rank order, of the columns in the order chosen
    block = np.nan_to_num(lfc[np.ix_(ranked_i, chosen)])
    row_order = leaves_list(linkage(block, method="average", metric="euclidean", optimal_ordering=True))
    col_order = leaves_list(linkage(block.T, method="average", metric="euclidean", optimal_ordering=True))
    assert rows == list(ranked[row_order])
    assert cols == list(genes[np.asarray(chosen)[col_order]])


# ------------------------------------------------------------------------------------------------ knock-down


def test_knockdown_table_and_plot_papalexi(papalexi, tmp_path):
    res = stored(papalexi)
    genes = list(res.var_names)
    measured = [p for p in res.obs_names if p in genes]
    table = pl.knockdown_table(papalexi)
    assert sorted(table["perturbation"]) == sorted(measured) and (table["target"] == table["perturbation"]).all()
    for name in ("logfoldchanges", "pvals_adj", "pts", "pts_rest"):
        expected = [res.layers[name][list(res.obs_names).index(p), genes.index(p)] for p in table["perturbation"]]
        assert_close(table[name], expected, err_msg=name)
    assert table["logfoldchanges"].is_monotonic_increasing
    assert table.attrs["n_asked"] == res.n_obs

    out = keep(tmp_path, "knockdown_papalexi")
    ax = pl.knockdown(papalexi, save=out)
    publish(out)
    drawn = points(ax)
    assert_close(drawn[:, 0], table["logfoldchanges"])
    assert top_down(ax) == list(table["perturbation"])


def test_knockdown_simulated_targets_are_down(sim, tmp_path):
    path, targets = sim
    with pytest.raises(ValueError, match="pass targets="):
        pl.knockdown(path)  # labels P0000... are not gene names
    table = pl.knockdown_table(path, targets=targets)
    assert len(table) == len(targets)
    res = stored(path)
    genes = list(res.var_names)
    for row in table.itertuples():
        i = list(res.obs_names).index(row.perturbation)
        assert row.target == targets[row.perturbation]
        assert row.logfoldchanges == res.layers["logfoldchanges"][i, genes.index(row.target)]
    assert (table["logfoldchanges"] < 0).all()
    assert (table["pvals_adj"] < 0.05).mean() >= 0.8
    out = keep(tmp_path, "knockdown_simulated")
    ax = pl.knockdown(path, targets=targets, save=out)
    publish(out)
    assert top_down(ax) == [f"{p} ({t})" for p, t in zip(table.perturbation, table.target, strict=True)]


# ------------------------------------------------------------------------------------------ reading lazily


class Recorder:
    """An array-like that records every index it is read with (for ``da.from_array``)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values, self.shape, self.dtype, self.ndim = values, values.shape, values.dtype, values.ndim
        self.reads: list = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.values[key]


def recorded(path, chunks) -> tuple[xr.Dataset, dict]:
    """The results of ``path`` as a Dataset whose every variable reads through a :class:`Recorder`."""
    ds = ps.get.dataset(path).load()
    recorders = {}
    for name in list(ds.data_vars):
        recorders[name] = Recorder(ds[name].values)
        ds[name] = (ds[name].dims, da.from_array(recorders[name], chunks=chunks, asarray=True))
        recorders[name].reads.clear()  # dask reads an empty corner for the meta: not a read of values
    return ds, recorders


def touched(recorder: Recorder) -> set:
    rows, cols = np.arange(recorder.shape[0]), np.arange(recorder.shape[1])
    out = set()
    for key in recorder.reads:
        r, c = key if isinstance(key, tuple) else (key, slice(None))
        out |= set(itertools.product(np.atleast_1d(rows[r]).tolist(), np.atleast_1d(cols[c]).tolist()))
    return out


def test_one_perturbation_plots_read_one_row(sim, tmp_path):
    path, _ = sim
    ds, recorders = recorded(path, chunks=(1, -1))
    n_genes = ds.sizes["gene"]
    row = 6
    pl.volcano(ds, str(ds.perturbation.values[row]), save=tmp_path / "v.png")
    pl.ma(ds, str(ds.perturbation.values[row]), save=tmp_path / "m.png")
    pl.top_genes_bar(ds, str(ds.perturbation.values[row]), save=tmp_path / "b.png")
    read = {name: touched(r) for name, r in recorders.items() if r.reads}
    assert set(read) == {"logfoldchanges", "pvals_adj", "pts", "pts_rest", "scores"}
    for name, cells in read.items():
        assert cells == {(row, g) for g in range(n_genes)}, name


def test_knockdown_reads_one_element_per_perturbation(sim):
    path, targets = sim
    ds, recorders = recorded(path, chunks=(1, 1))
    genes = list(ds.gene.values)
    labels_ = list(ds.perturbation.values)
    pl.knockdown_table(ds, targets=targets)
    wanted = {(labels_.index(p), genes.index(g)) for p, g in targets.items()}
    for name in ("logfoldchanges", "pvals_adj", "pts", "pts_rest"):
        assert touched(recorders[name]) == wanted, name
    assert not recorders["scores"].reads


# ------------------------------------------------------------------------------------------------ overlap


def test_overlap_heatmap(sim, tmp_path):
    path, _ = sim
    res = stored(path)
    genes = np.asarray(res.var_names)
    with np.errstate(invalid="ignore"):
        sets = {p: genes[res.layers["pvals_adj"][i] < 0.05] for i, p in enumerate(res.obs_names)}
    overlap = ps.tl.compute_overlap(sets)
    out = keep(tmp_path, "overlap_heatmap")
    ax = pl.overlap_heatmap(overlap, save=out)
    publish(out)
    union = np.array([[len(set(a) | set(b)) for b in sets.values()] for a in sets.values()])
    shared = np.array([[len(set(a) & set(b)) for b in sets.values()] for a in sets.values()])
    expected = np.where(union > 0, shared / np.maximum(union, 1), np.nan)
    assert_close(np.ma.filled(ax.images[0].get_array().astype(float), np.nan), expected)
    assert len(labels(ax)) == int(np.isfinite(expected).sum())  # annotated: 10 sets
    ax = pl.overlap_heatmap(overlap, metric="count", save=tmp_path / "count.png")
    assert_close(np.asarray(ax.images[0].get_array()), shared)
    with pytest.raises(ValueError, match="metric='count'"):
        pl.overlap_heatmap(ps.tl.compute_overlap(sets, metric="jaccard"), metric="count")


# ------------------------------------------------------------------------------------------------ bad input


def test_unknown_perturbation_or_target_lists_closest(papalexi):
    with pytest.raises(KeyError, match=r"'STAT11'.*'STAT1'"):
        pl.volcano(papalexi, "STAT11")
    with pytest.raises(KeyError, match=r"'IFNGR'.*'IFNGR1'"):
        pl.rank_genes_groups(papalexi, ["STAT1", "IFNGR"])
    with pytest.raises(KeyError, match=r"'JAK'.*'JAK2'"):
        pl.knockdown_table(papalexi, targets={"JAK": "JAK2"})


def test_missing_statistic_names_the_method(sim):
    path, _ = sim
    with pytest.raises(ValueError, match=r"no 'baseMean'.*nb-glm"):
        pl.top_genes_bar(path, "P0001", key="baseMean")
    with pytest.raises(ValueError, match=r"no 'lfcSE'.*nb-glm"):
        pl.rank_genes_groups(path, ["P0001"], key="lfcSE")
    lean = ps.get.dataset(path).drop_vars(["pts", "pts_rest"])
    with pytest.raises(ValueError, match="no 'pts'"):
        pl.ma(lean, "P0001")
    with pytest.raises(ValueError, match="pval_threshold"):
        pl.de_counts(path, pval_threshold=0)


def test_headless_plot_saves(sim, tmp_path):
    path, _ = sim
    out = tmp_path / "headless.png"
    code = (
        "import matplotlib, sys; from pertscale.pl._de import volcano; "
        f"volcano({str(path)!r}, 'P0001', save={str(out)!r}); print(matplotlib.get_backend())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND", "WAYLAND_DISPLAY")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().lower() == "agg"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_results_form_plots_the_same(sim, sim_in_memory, tmp_path):
    path, _ = sim
    lazy, with_store = sim_in_memory
    from_path = pl.de_counts(path)
    pd.testing.assert_series_equal(pl.de_counts(ps.get.dataset(path)), from_path)
    pd.testing.assert_series_equal(pl.de_counts(lazy), from_path)  # computed here, blockwise
    pd.testing.assert_series_equal(pl.de_counts(with_store, method="wilcoxon"), from_path)
    drawn = [points(pl.volcano(r, "P0003", save=tmp_path / f"{k}.png")) for k, r in enumerate((path, lazy, with_store))]
    assert_close(drawn[1], drawn[0])
    assert_close(drawn[2], drawn[0])
    pd.testing.assert_series_equal(pl.de_counts(stored(path)), from_path)  # an in-memory results AnnData


def test_counts_given_are_not_read_again(papalexi):
    """With counts= (run.json's), the screen-wide plots do not read pvals_adj for the reduction."""
    res = stored(papalexi)
    with np.errstate(invalid="ignore"):
        counts = pd.Series((res.layers["pvals_adj"] < 0.05).sum(axis=1), index=res.obs_names)
    ds = ps.get.dataset(papalexi)

    def refuse(block):
        raise AssertionError("pvals_adj was read for the reduction")

    unread = ds.copy()
    unread["pvals_adj"] = (ds["pvals_adj"].dims, da.map_blocks(refuse, ds["pvals_adj"].data, dtype=np.float32))
    ax = pl.de_genes_per_perturbation(unread, counts=counts)
    heights = [p.get_height() for p in ax.patches]
    assert heights == sorted(counts.to_numpy(), reverse=True)
    with pytest.raises(ValueError, match="counts= has no number for perturbation"):
        pl.de_genes_per_perturbation(unread, counts=counts.iloc[1:])
    # the heatmap reads the chosen rows only: the same top perturbations as without counts=
    given = pl.de_heatmap(papalexi, counts=counts)
    counted = pl.de_heatmap(papalexi)
    np.testing.assert_array_equal(given.images[0].get_array(), counted.images[0].get_array())

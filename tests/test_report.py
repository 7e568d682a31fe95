"""report.html: written by every run (``--no-report`` leaves it out), self-contained, rebuilt by ``ps.report``.

The page is checked as a person sees it: headless Chromium (Debian's
``chromium``) loads it from disk with the network off and takes a
screenshot (kept in ``$PERTSCALE_ARTIFACTS``, default ``.ci/artifacts/``,
as CI's artifact) and dumps the DOM it built; the numbers the page shows are
checked against the files with numpy and pandas.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import pertscale as ps

from .conftest import ROOT, real_path

ARTIFACTS = Path(os.environ.get("PERTSCALE_ARTIFACTS", ROOT / ".ci" / "artifacts"))
SECTIONS = ("summary", "qc", "method-wilcoxon", "method-t-test", "steps", "profile", "settings", "files")


@pytest.fixture(scope="module")
def papalexi_run(tmp_path_factory):
    """``ps.run`` on the real screen with two tests, HVG and PCA: its output directory."""
    path = real_path("papalexi")
    out = tmp_path_factory.mktemp("report") / "out"
    ps.run(
        path,
        out,
        perturbation_column="perturbation",
        control_label="control",
        method="wilcoxon,t-test",
        hvg=100,
        pca=10,
        scheduler="threads",
        progress=False,
    )
    return out


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        why = "headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)"
        if os.environ.get("PERTSCALE_REQUIRE_CHROMIUM"):  # CI: the screenshot is an artifact it must have
            pytest.fail(why)
        pytest.skip(why)
    return exe


def browse(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``page`` with its network off (no page of ours may need one)."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--proxy-server=127.0.0.1:9",  # any request off the disk fails
    ]
    return subprocess.run(
        [chromium(), *flags, *args, page.resolve().as_uri()], capture_output=True, text=True, timeout=180
    )


def test_report_is_self_contained_and_its_numbers_are_the_files(papalexi_run):
    out = papalexi_run
    page = (out / "report.html").read_text()
    # self-contained: every image embedded, nothing loaded from elsewhere
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page)
    assert "<script" not in page and "<link" not in page
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', page)
    assert len(images) >= 8, len(images)
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    # the headline numbers, from the files
    qc = pd.read_csv(out / "qc.csv", index_col=0, keep_default_na=False)
    kept = int(qc["n_cells_kept"].sum())
    assert f"{kept:,}</div><div class=\"k\">cells kept of 20,729" in page
    tested = int(((qc["reason"] == "") & ~qc["is_control"]).sum())
    assert f'{tested:,}</div><div class="k">perturbations tested' in page
    pvals_adj = ad.read_zarr(out / "de_wilcoxon.zarr").layers["pvals_adj"]
    pairs = int((np.asarray(pvals_adj) < 0.05).sum())
    assert f'{pairs:,}</div><div class="k">wilcoxon: DE pairs at FDR 0.05' in page
    # every output file is linked, by its relative name
    for name in json.loads((out / "run.json").read_text())["files"].values():
        assert f'href="{name}"' in page, name


def test_knockdown_table_in_the_report_is_the_stored_fold_change(papalexi_run):
    out = papalexi_run
    page = (out / "report.html").read_text()
    res = ad.read_zarr(out / "de_wilcoxon.zarr")
    genes = list(res.var_names)
    targets = [p for p in res.obs_names if p in genes]
    assert targets  # papalexi's labels are target genes, 9 of them measured
    lfc = np.asarray(res.layers["logfoldchanges"])
    sig = np.asarray(res.layers["pvals_adj"]) < 0.05
    down = sum(bool(lfc[i, genes.index(p)] < 0 and sig[i, genes.index(p)]) for i, p in enumerate(res.obs_names)
               if p in genes)  # fmt: skip
    assert f"{down} of {len(targets)} perturbations whose target is measured lower it significantly" in page


def test_chromium_renders_the_report(papalexi_run, tmp_path):
    page = papalexi_run / "report.html"
    dom = browse(page, tmp_path, "--dump-dom", "--virtual-time-budget=5000")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for section in SECTIONS:
        assert f'id="{section}"' in html, section
    assert "pertscale report: papalexi2021_eccite.h5ad" in html
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report_papalexi.png"
    shot.unlink(missing_ok=True)
    done = browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1280,3000", "--virtual-time-budget=5000")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (3000, 1280)
    # the header's colour (#243b55) across the top, and figures below it: many colours, not a blank page
    assert np.allclose(pixels[10, 640], np.array([0x24, 0x3B, 0x55]) / 255, atol=0.02)
    body = (pixels[300:] * 255).astype(np.uint8).reshape(-1, 3)
    assert len(np.unique(body[::7], axis=0)) > 500


def test_report_rebuilds_from_the_directory_and_overwrite_still_recognises_it(papalexi_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(papalexi_run, out, symlinks=True)
    before = (out / "report.html").read_text()
    (out / "report.html").unlink()
    # a manifest entry for a missing file is fine: it is written again and recorded
    written = ps.report(out)
    assert written == out / "report.html"
    after = written.read_text()
    # images may differ in bytes; the rebuilt page's profile shows the first report's own time too, and its
    # files table the size of run.json as it was rewritten with that time
    strip = re.compile(r'src="data:image/png;base64,[^"]*"|<section id="(profile|files)">.*?</section>', re.S)
    assert strip.sub("", after) == strip.sub("", before)
    profile = re.compile(r'<section id="profile">.*?</section>', re.S)
    assert "<td>report</td>" in profile.search(after)[0] and "<td>report</td>" not in profile.search(before)[0]
    path = real_path("papalexi")
    ps.run(path, out, perturbation_column="perturbation", control_label="control", overwrite=True,
           scheduler="threads", progress=False)  # fmt: skip
    assert (out / "report.html").stat().st_size > 0


def test_report_refuses_what_is_not_a_run(papalexi_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ps.report(tmp_path / "nowhere")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "qc.csv").write_text("perturbation,n_cells\n")
    with pytest.raises(ValueError, match=r"not the output of a pertscale run: it has no run.json"):
        ps.report(tmp_path / "notes")
    out = tmp_path / "copy"
    shutil.copytree(papalexi_run, out, symlinks=True)
    (out / "report.html").write_text("<p>my own notes</p>")
    with pytest.raises(FileExistsError, match="is not the report.html a pertscale run recorded"):
        ps.report(out)
    assert (out / "report.html").read_text() == "<p>my own notes</p>"
    elsewhere = ps.report(out, path=tmp_path / "mine.html")
    assert "<section id=\"summary\">" in elsewhere.read_text()


def test_no_report(tmp_path):
    path = real_path("papalexi")
    summary = ps.run(path, tmp_path / "out", perturbation_column="perturbation", control_label="control",
                     report=False, scheduler="threads", progress=False)  # fmt: skip
    assert not (tmp_path / "out" / "report.html").exists()
    assert (tmp_path / "out" / "run.json").exists() and "report" not in summary.files
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    stages = [s["name"] for s in record["profile"]["stages"]]
    assert "test and write" in stages and "report" not in stages
    assert record["summary"]["n_obs_kept"] == summary.n_obs_kept
    assert record["profile"]["processes"][0]["name"] == "main"
    assert max(record["profile"]["processes"][0]["peak_rss"].values()) > 50 * 2**20


def test_targets_come_from_obs_per_label():
    from pertscale.job._record import targets_from_obs

    obs = ad.read_h5ad(real_path("papalexi"), backed="r").obs
    targets = targets_from_obs(obs, "perturbation")
    # target_gene_max: the target of each cell's top guide; a label whose cells disagree (multiple) has none
    labels = set(obs["perturbation"].astype(str)) - {"multiple"}
    assert set(targets) == labels
    assert all(targets[p] == p for p in labels if p != "control")  # papalexi's labels are the target genes
    obs = pd.DataFrame({"perturbation": ["a", "a", "b", "c"], "target_gene": ["G1", "G1", "G2", None]})
    assert targets_from_obs(obs, "perturbation") == {"a": "G1", "b": "G2"}
    assert targets_from_obs(obs.drop(columns="target_gene"), "perturbation") == {}


def test_report_of_nb_glm_and_pseudobulk_on_labels_that_are_not_genes(tmp_path):
    """A simulated screen: labels P0000...; targets from obs['target_gene'], which the simulation knows."""
    path = tmp_path / "sim.h5ad"
    ps.datasets.simulate_screen(n_cells=3_000, n_genes=200, n_perturbations=6, seed=3, path=path)
    truth = ps.datasets.known_effects(path)
    truth = truth[truth["is_target"]].set_index("perturbation")["gene"]
    out = tmp_path / "out"
    ps.run(path, out, perturbation_column="perturbation", control_label="control", method="wilcoxon,nb-glm",
           pseudobulk=True, scheduler="threads", progress=False)  # fmt: skip
    record = json.loads((out / "run.json").read_text())
    assert record["targets"] == {str(p): str(g) for p, g in truth.items()}
    page = (out / "report.html").read_text()
    assert '<section id="method-nb-glm">' in page and "could not be drawn" not in page
    res = ad.read_zarr(out / "de_nb_glm.zarr")
    lfc = pd.DataFrame(np.asarray(res.layers["logfoldchanges"]), index=res.obs_names, columns=res.var_names)
    sig = pd.DataFrame(np.asarray(res.layers["pvals_adj"]) < 0.05, index=res.obs_names, columns=res.var_names)
    down = sum(bool(lfc.loc[p, g] < 0 and sig.loc[p, g]) for p, g in truth.items())
    assert down >= 4  # the simulated knock-downs are found
    assert f"{down} of {len(truth)} perturbations whose target is measured lower it significantly" in page
    assert "pseudobulk.h5ad" in page


@pytest.mark.cluster
def test_profile_records_each_local_worker(tmp_path):
    path = tmp_path / "sim.h5ad"
    ps.datasets.simulate_screen(n_cells=2_000, n_genes=100, n_perturbations=4, seed=1, path=path)
    out = tmp_path / "out"
    ps.run(path, out, perturbation_column="perturbation", control_label="control", scheduler="local",
           report=False, progress=False)  # fmt: skip
    processes = {p["name"]: p["peak_rss"] for p in json.loads((out / "run.json").read_text())["profile"]["processes"]}
    workers = sorted(name for name in processes if name.startswith("worker"))
    assert workers == [f"worker {i}" for i in range(1, len(workers) + 1)] and len(workers) >= 1
    # a worker process holds Python, numpy, dask and distributed: tens of MiB at least, and it ran the test pass
    assert all(max(processes[w].values()) > 30 * 2**20 for w in workers)
    assert any("test and write" in processes[w] for w in workers)


def test_report_waits_for_no_run_and_refuses_while_one_writes(papalexi_run, tmp_path):
    import fcntl

    out = tmp_path / "copy"
    shutil.copytree(papalexi_run, out, symlinks=True)
    with open(out / ".pertscale.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run writing into out holds it
        with pytest.raises(ValueError, match="another pertscale run is writing"):
            ps.report(out)
    assert ps.report(out) == out / "report.html"

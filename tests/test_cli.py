"""The `pertscale` command, as the README runs it."""

from __future__ import annotations

import hashlib
import re
import shlex
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pertscale.cli import main

from .conftest import ROOT, real_path


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _readme_main_job() -> list[str]:
    """The `pertscale run ...` line of the README, as arguments."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^pertscale run .*$", text, flags=re.MULTILINE)
    assert match, "README.md shows no `pertscale run` command"
    return shlex.split(match.group(0))[1:]


def _invoke(path, out, *extra):
    args = ["run", str(path), "--perturbation-column", "perturbation", "--control-label", "control"]
    return CliRunner().invoke(main, [*args, "--out", str(out), "--scheduler", "synchronous", *extra])


@pytest.mark.cluster
def test_readme_main_job_on_real_screen(tmp_path):
    path = real_path("papalexi")
    args = _readme_main_job()
    # run it as written, in a subprocess (the default LocalCluster), with --out redirected here
    out = tmp_path / "out"
    args[args.index("--out") + 1] = str(out)
    args = [str(path) if a.endswith("papalexi2021_eccite.h5ad") else a for a in args]
    before = _sha256(path)
    proc = subprocess.run(
        [sys.executable, "-m", "pertscale.cli", *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _sha256(path) == before  # the input is never modified
    res = ad.read_h5ad(out / "de_wilcoxon.h5ad")
    assert res.n_obs == 25 and res.n_vars > 250
    assert set(res.layers) >= {"scores", "pvals", "pvals_adj", "logfoldchanges", "pts", "pts_rest", "u_statistic"}
    sig = pd.read_csv(out / "de_wilcoxon_significant.csv")
    assert list(sig.columns) == ["perturbation", "gene", "logfoldchanges", "scores", "pvals", "pvals_adj"]
    assert (sig["pvals_adj"] < 0.05).all()
    assert len(sig) == int((res.layers["pvals_adj"] < 0.05).sum())
    qc = pd.read_csv(out / "qc.csv").set_index("perturbation")
    assert qc.loc["multiple", "reason"] == "excluded" and qc.loc["multiple", "n_cells_kept"] == 0
    assert qc.loc["control", "n_cells"] == 2304 and qc.loc["control", "is_control"]
    assert (qc["n_cells_kept"] <= qc["n_cells"]).all()
    assert "perturbations tested: 25" in proc.stdout and "DE genes at FDR 0.05" in proc.stdout
    # IFNGR1 knock-out: IFN-gamma signalling targets are among the strongest effects (Papalexi 2021)
    assert (res["IFNGR1"].layers["pvals_adj"] < 0.05).sum() > 50


def test_cli_synchronous_and_skipped_perturbations(sim_adata, sim_h5ad, tmp_path):
    counts = sim_adata.obs["perturbation"].value_counts().drop("control")
    cutoff = int(counts.median())
    result = _invoke(
        sim_h5ad, tmp_path / "o", "--min-cells-per-perturbation", str(cutoff), "--no-progress", "--chunk-size", "500"
    )
    assert result.exit_code == 0, result.output
    qc = pd.read_csv(tmp_path / "o" / "qc.csv").set_index("perturbation")
    small = qc.index[qc["reason"] == "min_cells_per_perturbation"]
    assert set(small) == set(counts.index[counts < cutoff]) and len(small) > 0
    assert "not tested:" in result.output
    res = ad.read_h5ad(tmp_path / "o" / "de_wilcoxon.h5ad")
    assert not set(small) & set(res.obs_names)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--perturbation-column", "guide"], "perturbation_column 'guide' not found"),
        (["--control-label", "NT"], "control_label 'NT' not found.*labels seen"),
    ],
)
def test_cli_bad_input_messages(sim_h5ad, tmp_path, args, message):
    base = {"--perturbation-column": "perturbation", "--control-label": "control", "--out": str(tmp_path / "o")}
    base.update(dict(zip(args[::2], args[1::2], strict=False)))
    flat = [x for kv in base.items() for x in kv]
    result = CliRunner().invoke(main, ["run", str(sim_h5ad), *flat, "--scheduler", "synchronous"])
    assert result.exit_code != 0
    assert re.search(message, result.output), result.output


def test_cli_missing_file_and_unwritable_out(sim_h5ad, tmp_path):
    runner = CliRunner()
    common = ["--perturbation-column", "perturbation", "--control-label", "control", "--scheduler", "synchronous"]
    result = runner.invoke(main, ["run", str(tmp_path / "nope.h5ad"), "--out", str(tmp_path / "o"), *common])
    assert result.exit_code != 0 and "no such file" in result.output
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = runner.invoke(main, ["run", str(sim_h5ad), "--out", str(blocker / "sub"), *common])
    assert result.exit_code != 0 and "cannot write to output directory" in result.output


def test_help_documents_the_flags():
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0
    for flag in (
        "--min-genes",
        "--min-cells",
        "--min-cells-per-perturbation",
        "--exclude-labels",
        "--target-sum",
        "--chunk-size",
        "--scheduler",
        "--perturbation-column",
        "--control-label",
        "--out",
    ):
        assert flag in result.output
    assert CliRunner().invoke(main, ["--help"]).exit_code == 0


def test_negative_counts_fail_cleanly(sim_adata, tmp_path):
    bad = sim_adata.copy()
    bad.X = bad.X.astype(np.float32)
    bad.X.data[5] = -2
    bad.write_h5ad(tmp_path / "bad.h5ad")
    result = _invoke(tmp_path / "bad.h5ad", tmp_path / "o")
    assert result.exit_code != 0 and "negative values" in result.output


def test_refuses_to_overwrite_the_input(sim_adata, tmp_path):
    path = tmp_path / "de_wilcoxon.h5ad"
    sim_adata.write_h5ad(path)
    before = _sha256(path)
    result = _invoke(path, tmp_path)
    assert result.exit_code != 0 and "would overwrite the input" in result.output
    assert _sha256(path) == before


def test_normalized_input_is_rejected(sim_adata, tmp_path):
    norm = sim_adata.copy()
    norm.X = norm.X.astype(np.float32)
    norm.X.data = np.log1p(norm.X.data)
    norm.write_h5ad(tmp_path / "norm.h5ad")
    result = _invoke(tmp_path / "norm.h5ad", tmp_path / "o")
    assert result.exit_code != 0 and "looks normalized" in result.output and "--layer" in result.output


def test_filters_that_remove_the_controls_are_named(sim_h5ad, tmp_path):
    result = _invoke(sim_h5ad, tmp_path / "o", "--exclude-labels", "control")
    assert result.exit_code != 0 and "--exclude-labels includes the control label" in result.output
    result = _invoke(sim_h5ad, tmp_path / "o", "--min-cells-per-perturbation", "100000")
    assert result.exit_code != 0 and "lower --min-cells-per-perturbation" in result.output


def test_several_methods_share_the_passes_and_equal_single_runs(sim_h5ad, tmp_path, monkeypatch):
    from pertscale.io._prepare import StoredBlocks

    reads = []
    original = StoredBlocks.read
    monkeypatch.setattr(StoredBlocks, "read", lambda self, k: reads.append(k) or original(self, k))
    store = tmp_path / "store.zarr"
    alone = {}
    for method in ("wilcoxon", "t-test"):
        result = _invoke(sim_h5ad, tmp_path / method, "--method", method, "--working-store", str(store))
        assert result.exit_code == 0, result.output
        alone[method] = len(reads)
        reads.clear()
    assert alone["wilcoxon"] == alone["t-test"] > 0
    result = _invoke(sim_h5ad, tmp_path / "both", "--method", "wilcoxon,t-test", "--working-store", str(store))
    assert result.exit_code == 0, result.output
    assert len(reads) == alone["wilcoxon"]  # the second test reads no block again: one pass for both
    assert "wilcoxon: DE genes" in result.output and "t-test: DE genes" in result.output
    for method, stem in (("wilcoxon", "de_wilcoxon"), ("t-test", "de_t_test")):
        both, single = (ad.read_zarr(tmp_path / d / f"{stem}.zarr") for d in ("both", method))
        for layer in single.layers:
            np.testing.assert_array_equal(both.layers[layer], single.layers[layer], err_msg=f"{method} {layer}")
        assert both.uns["pertscale"]["settings"]["method"] == method
        assert all((tmp_path / "both" / f"{stem}{end}").exists() for end in ("_significant.csv", ".h5ad"))


def test_method_and_alternative_flags_are_checked(sim_h5ad, tmp_path):
    result = _invoke(sim_h5ad, tmp_path / "out", "--method", "wilcoxon,deseq")
    assert result.exit_code != 0 and "method 'deseq' is not available" in result.output and "t-test" in result.output
    assert not (tmp_path / "out").exists()
    result = _invoke(sim_h5ad, tmp_path / "out", "--alternative", "up")
    assert result.exit_code == 2 and "'up' is not one of" in result.output


def test_an_earlier_run_of_another_method_is_never_mixed_in(sim_h5ad, tmp_path):
    out = tmp_path / "out"
    assert _invoke(sim_h5ad, out, "--method", "t-test").exit_code == 0
    refused = _invoke(sim_h5ad, out)
    assert refused.exit_code == 1 and "de_t_test" in refused.output and "--overwrite" in refused.output
    assert _invoke(sim_h5ad, out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("de_")) == [
        "de_wilcoxon.h5ad",
        "de_wilcoxon.parquet",
        "de_wilcoxon.zarr",
        "de_wilcoxon_effects.csv",
        "de_wilcoxon_knockdown.csv",
        "de_wilcoxon_significant.csv",
    ]

"""Inference of the perturbation column and control label; label normalisation."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import pertscale as ps

from .conftest import real_path


def _adata(**columns) -> ad.AnnData:
    n = len(next(iter(columns.values())))
    obs = pd.DataFrame(columns, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(obs=obs, var=pd.DataFrame(index=["g0"]))


@pytest.mark.parametrize("name", ["papalexi", "schraivogel"])
def test_real_screens_are_inferred_as_their_authors_label_them(name):
    adata = ps.read(real_path(name))
    got = ps.io.infer_columns(adata)
    # papalexi also has target_gene_max (with 'non-targeting'), schraivogel target_max: 'perturbation' wins by name
    assert got == {"perturbation_column": "perturbation", "control_label": "control", "gene_symbol_column": None}


@pytest.mark.parametrize("label", ["non-targeting", "Non_Targeting", "NTC", "nt", "safe-targeting", "CTRL"])
def test_control_names_in_any_case_and_spelling(label):
    adata = _adata(gene=["MYC", label, "GATA1", label], batch=["a", "b", "a", "b"])
    assert ps.io.infer_columns(adata)["control_label"] == label
    assert ps.io.detect_perturbation_column(adata) == "gene"


def test_ambiguity_and_absence_are_errors_that_list_the_candidates():
    two_controls = _adata(perturbation=["MYC", "NT", "control", "GATA1"])
    with pytest.raises(ValueError, match=r"several control labels: 'NT', 'control'.*--control-label"):
        ps.io.infer_columns(two_controls)
    none = _adata(perturbation=["MYC", "GATA1", "KLF1", "TAL1"])
    with pytest.raises(ValueError, match=r"no obs column holds a control label.*--perturbation-column"):
        ps.io.infer_columns(none)
    with pytest.raises(ValueError, match=r"no control label found in obs\['perturbation'\].*'MYC'"):
        ps.io.detect_control_label(none.obs["perturbation"])
    two_columns = _adata(target=["MYC", "NT", "A", "B"], gene=["KLF1", "NT", "C", "D"])
    with pytest.raises(ValueError, match=r"several obs columns could name the perturbations: 'target', 'gene'"):
        ps.io.detect_perturbation_column(two_columns)
    # the same labels under two names are not ambiguous; a given control label decides too
    same = _adata(target=["MYC", "NT", "A", "B"], gene=["MYC", "NT", "A", "B"])
    assert ps.io.detect_perturbation_column(same) == "target"
    given = _adata(target=["MYC", "NT", "A", "B"], gene=["KLF1", "ref", "C", "D"])
    assert ps.io.detect_perturbation_column(given, control_label="ref") == "gene"


def test_gene_symbol_column_only_when_names_are_ensembl():
    adata = ad.AnnData(
        obs=pd.DataFrame(index=["c"]),
        var=pd.DataFrame({"gene_symbols": ["MYC", "GATA1"]}, index=["ENSG00000136997", "ENSG00000102145"]),
    )
    assert ps.io.detect_gene_symbol_column(adata) == "gene_symbols"
    adata.var_names = ["MYC", "GATA1"]
    assert ps.io.detect_gene_symbol_column(adata) is None


def test_normalise_perturbation_labels():
    raw = pd.Series(["sg-MYC_KO", "Non-Targeting", "NTC_", "MYC,GATA1", None, "scrambled", "sg-KLF1-P2"])
    got = ps.io.normalise_perturbation_labels(
        raw, strip_prefixes=["sg-"], strip_suffixes=["_KO"], strip_suffix_regex=r"-P[0-9]+$", control_aliases=["NTC_"]
    )
    assert got.tolist()[:4] == ["MYC", "control", "control", "multiple"]
    assert pd.isna(got.iloc[4]) and got.tolist()[5:] == ["control", "KLF1"]
    assert isinstance(got.dtype, pd.CategoricalDtype) and (got.index == raw.index).all()
    assert ps.io.normalise_perturbation_labels(["NT"], canonical_control="NTC").tolist() == ["NTC"]
    assert ps.io.normalise_perturbation_labels(["A,B"], multiple_separators=()).tolist() == ["A,B"]


def test_pertscale_run_without_the_label_flags_says_what_it_chose(tmp_path):
    path = tmp_path / "screen.h5ad"
    adata = ps.datasets.simulate_screen(1_500, 100, 4, seed=1)
    adata.obs = adata.obs.drop(columns="target_gene").rename(columns={"perturbation": "target_gene"})
    adata.obs["target_gene"] = adata.obs["target_gene"].cat.rename_categories({"control": "Non-Targeting"})
    adata.write_h5ad(path)
    done = subprocess.run(
        [sys.executable, "-m", "pertscale.cli", "run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]
        + ["--scheduler", "synchronous"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "inferred: --perturbation-column target_gene --control-label Non-Targeting" in done.stderr
    assert (tmp_path / "out" / "de_wilcoxon.zarr").exists()
    assert np.isin(["P0000"], ps.get.dataset(tmp_path / "out" / "de_wilcoxon.zarr").perturbation.values).all()

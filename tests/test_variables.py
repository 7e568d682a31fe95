"""One vocabulary (issue 22, item 6): every name written is registered, scanpy's spellings, deprecated spellings.

The names a run actually writes (layers, ``obs``/``var`` columns, table
columns) are read from real calls and checked against the registry of
:mod:`pertscale.variables`; the spellings the registry claims for scanpy are
checked against scanpy itself; ``docs/usage.md``'s table must be the one the
registry generates. Each earlier spelling of an argument (positional labels,
``min_cells=``, ``groupby=``) must warn and give what the new spelling gives.
"""

from __future__ import annotations

import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import pertscale as ps
from pertscale import variables as V

from .conftest import ROOT, assert_close

LABELS = {"perturbation_column": "perturbation", "control_label": "control"}


@pytest.fixture(scope="module")
def counts() -> ad.AnnData:
    """Raw counts: 600 cells x 80 genes (one mitochondrial), 4 perturbations, cells in random order."""
    return ps.datasets.simulate_screen(600, 80, 4, control_fraction=0.3, seed=1, n_affected=5)


def _log1p(counts: ad.AnnData) -> ad.AnnData:
    a = counts.copy()
    a.layers["counts"] = a.X.copy()
    ps.pp.normalize_total(a)
    ps.pp.log1p(a)
    return a


@pytest.fixture(scope="module")
def results(counts) -> dict[str, ad.AnnData]:
    """Each method's results, computed (nb-glm on the counts after its steps)."""
    a = _log1p(counts)
    out = {m: ps.compute(ps.tl.rank_genes_groups(a, **LABELS, method=m)) for m in ("wilcoxon", "t-test")}
    ps.pp.size_factors(a, layer="counts")
    ps.tl.dispersions(a, perturbation_column="perturbation", method="moments", layer="counts")
    out["nb-glm"] = ps.compute(
        ps.tl.rank_genes_groups(a, **LABELS, method="nb-glm", layer="counts", dispersion_method="moments")
    )
    return out


# --------------------------------------------------------------------------- the registry


def test_every_table_name_is_registered_and_every_registered_name_is_in_a_table():
    in_tables = {name for names in V.TABLES.values() for name in names}
    assert in_tables <= set(V.VARIABLES), sorted(in_tables - set(V.VARIABLES))
    assert set(V.VARIABLES) <= in_tables, sorted(set(V.VARIABLES) - in_tables)
    assert set(V.DEPRECATED.values()) <= set(V.VARIABLES)
    assert not set(V.DEPRECATED) & set(V.VARIABLES)
    with pytest.raises(ValueError, match="registered already"):
        V.register("scores", "again", dtype="float64", dims=("perturbation", "gene"))
    with pytest.raises(ValueError, match="registered already"):
        V.register("new_name", "an old one", dtype="float64", dims=("gene",), deprecated=("pval",))
    assert "new_name" not in V.VARIABLES


def test_fold_changes_and_their_errors_say_their_base():
    logs = [v for v in V.VARIABLES.values() if v.name.startswith(("lfc", "logfold", "log1p_"))]
    assert len(logs) >= 8
    for v in logs:
        assert v.units in ("log2", "natural log"), v.name


# --------------------------------------------------------------------------- everything written is registered


def test_every_statistic_each_method_writes_is_registered(results):
    for method, spec in ps.tl.METHODS.items():
        assert set(spec.statistics) <= set(V.VARIABLES), method
    for method, res in results.items():
        assert tuple(res.layers) == V.STATISTICS[method], method
        assert list(res.obs.columns) == [V.N_CELLS]
        assert set(res.var.columns) <= set(V.RESULTS_VAR_NBGLM), (method, list(res.var.columns))
        assert res.obs_names.name == V.PERTURBATION and res.var_names.name == V.GENE
    assert set(results["nb-glm"].var.columns) == set(V.RESULTS_VAR_NBGLM)
    assert results["nb-glm"].uns["pertscale"]["settings"][f"{V.LOGFOLDCHANGES}_base"] == "log2"


def test_nbglm_standard_errors_use_deseq2s_names(results):
    res = results["nb-glm"]
    assert "standard_error" not in res.layers and "baseMean" in res.layers
    raw, se = res.layers[V.LOGFOLDCHANGES_RAW], res.layers[V.LFC_SE]
    ok = np.isfinite(res.layers[V.SCORES])
    assert ok.any()
    assert_close(res.layers[V.SCORES][ok], raw[ok] / se[ok], rtol=1e-9)  # DESeq2's stat = log2FoldChange / lfcSE


def test_tidy_and_significant_tables_use_the_layers_names_as_scanpy(results, tmp_path):
    res = results["wilcoxon"]
    table = ps.tl.tidy(res, max_pval_adj=0.05)
    assert tuple(table.columns) == V.TIDY_COLUMNS
    assert len(table) > 0 and (table[V.PVALS_ADJ] < 0.05).all()
    ps.write(res, tmp_path / "r.zarr")
    counts = ps.tl.write_significant(tmp_path / "r.zarr", tmp_path / "sig.csv", max_pval_adj=0.05)
    sig = pd.read_csv(tmp_path / "sig.csv")
    assert tuple(sig.columns) == V.TIDY_COLUMNS and len(sig) == len(table)
    assert counts.name == V.N_DE_GENES and counts.index.name == V.PERTURBATION
    # scanpy's own table of the same results names the statistics as the registry says
    res = res.copy()
    ps.tl.scanpy_uns(res)
    group = res.obs_names[0]
    df = sc.get.rank_genes_groups_df(res, group)
    for name in V.TIDY_COLUMNS:
        if V.VARIABLES[name].scanpy and name != V.PERTURBATION:  # scanpy's 'group' only with several groups
            assert V.VARIABLES[name].scanpy in df.columns, (name, list(df.columns))
    one = table[table[V.PERTURBATION] == group].set_index(V.GENE)
    theirs = df.set_index("names").loc[one.index]
    assert_close(theirs["pvals_adj"].to_numpy(), one[V.PVALS_ADJ].to_numpy(), rtol=1e-12)


def test_qc_metrics_are_scanpys_columns_and_registered(counts):
    obs, var = ps.pp.calculate_qc_metrics(counts.copy(), inplace=False)
    assert tuple(obs.columns) == V.QC_OBS and tuple(var.columns) == V.QC_VAR
    ref = counts.copy()
    ref.var["mt"] = ref.var_names.str.startswith("MT-")
    theirs_obs, theirs_var = sc.pp.calculate_qc_metrics(ref, qc_vars=["mt"], percent_top=None, inplace=False)
    assert set(obs.columns) == set(theirs_obs.columns) and set(var.columns) == set(theirs_var.columns)
    for name in (*V.QC_OBS, *V.QC_VAR, V.MT):
        assert V.VARIABLES[name].scanpy == name
    a = counts.copy()
    ps.pp.calculate_qc_metrics(a, perturbation_column="perturbation")
    assert set(V.QC_VAR) | {V.MT} <= set(a.var.columns)
    assert list(a.uns["pertscale"]["perturbation_counts"].columns) == [V.N_CELLS]


def test_qc_summary_tables_and_filters_name_only_registered_columns(counts):
    s = ps.pp.qc_summary(counts.copy(), **LABELS, min_genes=5, min_cells_per_perturbation=100, min_cells_per_gene=3)
    assert tuple(s.cells.columns) == V.QC_CELLS
    assert tuple(s.genes.columns) == V.QC_GENES
    assert tuple(s.perturbations.columns) == V.QC_PERTURBATIONS
    assert tuple(s.table.columns) == V.QC_TABLE
    assert set(s.perturbations[V.REASON]) <= {"", *V.QC_REASONS}
    assert (s.perturbations[V.REASON] == V.MIN_CELLS_PER_PERTURBATION).any()  # the 88-cell perturbation
    kept = s.apply(counts)
    assert set(kept.obs.columns) - set(counts.obs.columns) == set(V.QC_APPLY_OBS)
    assert set(kept.var.columns) - set(counts.var.columns) == set(V.QC_APPLY_VAR)
    cells = ps.pp.filter_cells(counts, min_genes=5)
    assert set(cells.obs.columns) - set(counts.obs.columns) == {V.N_GENES}
    genes = ps.pp.filter_genes(counts, min_counts=1)
    assert set(genes.var.columns) - set(counts.var.columns) == {V.N_COUNTS}
    table = ps.pp.filter_perturbations(counts, **LABELS, min_cells_per_perturbation=100)
    table = table.uns["pertscale"]["perturbation_filter"]
    assert tuple(table.columns) == V.PERTURBATION_FILTER
    assert table.loc["P0002", V.REASON] == V.MIN_CELLS_PER_PERTURBATION


def test_docs_table_is_the_registrys():
    text = (ROOT / "docs" / "usage.md").read_text()
    start, end = "<!-- generated by python -m pertscale.variables: do not edit by hand -->\n", "<!-- end of generated"
    found = re.search(f"{re.escape(start)}(.*?){re.escape(end)}", text, re.S)
    assert found, "docs/usage.md has no generated table of names"
    assert found.group(1) == V.markdown_table(), "regenerate it: python -m pertscale.variables"
    listed = re.findall(r"^\| `([^`]+)` \|", found.group(1), flags=re.M)
    assert listed == list(V.VARIABLES)


def test_cli_help_names_the_registered_statistics():
    from click.testing import CliRunner

    from pertscale.cli import main

    text = " ".join(CliRunner().invoke(main, ["run", "--help"]).output.split())
    for name in (*V.STATISTICS["nb-glm"], *V.TIDY_COLUMNS, V.U_STATISTIC):
        assert re.search(rf"\b{re.escape(name)}\b", text), name
    assert not re.search(r"\bpval_adj\b|\bstandard_error\b", text)


# --------------------------------------------------------------------------- earlier spellings, for one release


def _quiet(func, *args, **kwargs):
    """``func(*args, **kwargs)``, asserting that it gives no ``FutureWarning`` (other warnings are let through)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = func(*args, **kwargs)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    return out


def test_positional_labels_and_min_cells_warn_and_give_the_same_results(counts):
    a = _log1p(counts)
    new = _quiet(ps.tl.rank_genes_groups, a, **LABELS, min_cells_per_perturbation=100, force=True)
    with pytest.warns(FutureWarning, match=r"positionally is deprecated.*perturbation_column='perturbation'"):
        with pytest.warns(UserWarning, match="fewer than 100 cells"):
            old = ps.tl.rank_genes_groups(a, "perturbation", "control", min_cells_per_perturbation=100, force=True)
    with pytest.warns(FutureWarning, match=r"min_cells=\.\.\.\) is deprecated.*min_cells_per_perturbation="):
        with pytest.warns(UserWarning, match="fewer than 100 cells"):  # P0002 (88 cells) is skipped
            renamed = ps.tl.rank_genes_groups(a, **LABELS, min_cells=100, force=True)
    new, old, renamed = ps.compute(new), ps.compute(old), ps.compute(renamed)
    assert list(new.obs_names) == list(old.obs_names) == list(renamed.obs_names) and "P0002" not in new.obs_names
    for name in new.layers:
        np.testing.assert_array_equal(old.layers[name], new.layers[name])
        np.testing.assert_array_equal(renamed.layers[name], new.layers[name])
    with pytest.raises(TypeError, match="got both min_cells= and min_cells_per_perturbation="):
        ps.tl.rank_genes_groups(a, **LABELS, min_cells=3, min_cells_per_perturbation=3)
    with pytest.raises(TypeError, match="multiple values for argument 'perturbation_column'"):
        ps.tl.rank_genes_groups(a, "perturbation", perturbation_column="perturbation", control_label="control")
    with pytest.raises(TypeError, match="positional argument"):
        ps.tl.rank_genes_groups(a, "perturbation", "control", "wilcoxon")
    # a recorded run gives the current names: rerun without a warning
    run = ps.RunInfo(a)
    assert run.call_args()["min_cells_per_perturbation"] == 100 and "min_cells" not in run.call_args()
    again = _quiet(ps.get.rerun, run, force=True)
    np.testing.assert_array_equal(ps.compute(again).layers["scores"], new.layers["scores"])


def test_filter_perturbations_earlier_spellings_warn_and_agree(counts):
    new = _quiet(ps.pp.filter_perturbations, counts, **LABELS, min_cells_per_perturbation=100)
    with pytest.warns(FutureWarning, match="positionally"):
        old = ps.pp.filter_perturbations(counts, "perturbation", "control", min_cells_per_perturbation=100)
    with pytest.warns(FutureWarning, match="min_cells_per_perturbation"):
        renamed = ps.pp.filter_perturbations(counts, **LABELS, min_cells=100)
    for other in (old, renamed):
        assert list(other.obs_names) == list(new.obs_names)
        pd.testing.assert_frame_equal(
            other.uns["pertscale"]["perturbation_filter"], new.uns["pertscale"]["perturbation_filter"]
        )
    assert new.n_obs == counts.n_obs - 88


def test_dispersion_calls_take_the_column_positionally_with_a_warning(counts):
    one, two, three = counts.copy(), counts.copy(), counts.copy()
    for a in (one, two, three):
        ps.pp.size_factors(a)
    new = _quiet(ps.tl.dispersions, one, perturbation_column="perturbation", method="moments")
    with pytest.warns(FutureWarning, match=r"ps\.tl\.dispersions\(\.\.\., perturbation_column='perturbation'\)"):
        old = ps.tl.dispersions(two, "perturbation", method="moments")
    pd.testing.assert_frame_equal(old, new)
    with pytest.warns(FutureWarning, match=r"ps\.tl\.fit_genewise_dispersions"):
        genewise = ps.tl.fit_genewise_dispersions(three, "perturbation", method="moments")
    np.testing.assert_array_equal(genewise[V.DISPERSION_GENEWISE], new[V.DISPERSION_GENEWISE])


def test_pseudobulk_groupby_warns_and_agrees(counts):
    new = _quiet(ps.pb.pseudobulk, counts.copy(), perturbation_column="perturbation")
    with pytest.warns(FutureWarning, match=r"groupby=\.\.\.\) is deprecated: the argument is now perturbation_column="):
        old = ps.pb.pseudobulk(counts.copy(), groupby="perturbation")
    assert list(old.obs_names) == list(new.obs_names)
    np.testing.assert_array_equal(old.X, new.X)
    # the sums themselves, against pandas
    dense = pd.DataFrame(counts.X.toarray(), index=counts.obs["perturbation"].astype(str).to_numpy())
    expected = dense.groupby(level=0).sum().loc[list(new.obs_names)].to_numpy()
    np.testing.assert_array_equal(new.X, expected)


def test_results_stores_with_earlier_statistic_names_are_read_under_the_current_ones(results, tmp_path):
    res = results["nb-glm"].copy()
    old = res.copy()
    for earlier, current in (("standard_error", V.LFC_SE), ("standard_error_shrunk", V.LFC_SE_SHRUNK)):
        old.layers[earlier] = old.layers.pop(current)
    ps.write(old, tmp_path / "old.zarr")
    ds = ps.get.dataset(tmp_path / "old.zarr")
    assert V.LFC_SE in ds and V.LFC_SE_SHRUNK in ds and "standard_error" not in ds
    np.testing.assert_array_equal(ds[V.LFC_SE].values, res.layers[V.LFC_SE])
    np.testing.assert_array_equal(ds[V.LFC_SE_SHRUNK].values, res.layers[V.LFC_SE_SHRUNK])


def test_settings_give_the_current_argument_names():
    """A stored result's settings reproduce it with today's spellings (no FutureWarning under filterwarnings=error)."""
    from pertscale.analysis import PseudobulkSettings, WilcoxonSettings

    args = WilcoxonSettings(perturbation_column="perturbation", control_label="control", min_cells=5).call_args()
    assert args["min_cells_per_perturbation"] == 5 and "min_cells" not in args
    args = PseudobulkSettings(groupby=("perturbation",)).call_args()
    assert args["perturbation_column"] == ["perturbation"] and "groupby" not in args

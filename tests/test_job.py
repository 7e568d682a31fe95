"""The main job (``ps.run``, ``pertscale run``) is the public analyses composed.

The job's outputs are bitwise equal to those of the same public calls made
by hand (``ps.io.prepare`` -> ``ps.pp.qc_summary`` -> ``QCSummary.apply``
-> nb-glm's size factors and dispersions -> ``ps.pb.pseudobulk`` ->
``normalize_total`` -> ``log1p`` -> ``highly_variable_genes`` -> ``pca``
-> ``ps.tl.rank_genes_groups`` per method -> ``ps.compute``); the job's
modules import only public names of the analyses; and an input already
sorted by perturbation (no working store) gives the results of the same
input unsorted (through the working store).
"""

from __future__ import annotations

import ast
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import pertscale as ps
import pertscale.job as ps_job

from .conftest import assert_close

COLUMN, CONTROL = "perturbation", "control"
METHODS = ("wilcoxon", "t-test", "nb-glm")
N_HVG, N_PCS = 60, 5
#: Rows per block of the job: several blocks over the 3,000 cells, so that block order matters.
CHUNK = 500
S = "synchronous"
JOB = Path(ps_job.__file__).parent


def _same(actual, expected, what: str) -> None:
    """Bitwise equal: same dtype, same shape, same values (NaN where NaN)."""
    actual = actual.toarray() if sp.issparse(actual) else np.asarray(actual)
    expected = expected.toarray() if sp.issparse(expected) else np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    nan = actual.dtype.kind in "fc"
    assert np.array_equal(actual, expected, equal_nan=nan), f"{what}: values differ"


def _csv(path: Path, index: str) -> pd.DataFrame:
    """A table the job wrote, its floats read back exactly."""
    return pd.read_csv(path, index_col=index, float_precision="round_trip", keep_default_na=False, na_values=[""])


@pytest.fixture(scope="module")
def screen() -> ad.AnnData:
    """3,000 cells x 300 genes in random order, 10 perturbations; one too small to test, a few doublets."""
    adata = ps.datasets.simulate_screen(3_000, 300, 10, control_fraction=0.2, seed=3, n_affected=20)
    labels = adata.obs[COLUMN].astype(str).to_numpy().copy()
    labels[np.flatnonzero(labels == "P0003")[15:]] = "P0004"  # P0003 keeps 15 cells: dropped (< 20)
    labels[np.flatnonzero(labels == "P0005")[:12]] = "multiple"  # excluded by default
    adata.obs[COLUMN] = pd.Categorical(labels)
    return adata


@pytest.fixture(scope="module")
def unsorted_h5ad(screen, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("unsorted") / "screen.h5ad"
    screen.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def sorted_h5ad(screen, tmp_path_factory) -> Path:
    """The same cells, each label's cells together (control first): the job needs no working store."""
    labels = screen.obs[COLUMN].astype(str)
    order = np.lexsort((labels.to_numpy(), (labels != CONTROL).to_numpy()))
    path = tmp_path_factory.mktemp("sorted") / "screen.h5ad"
    screen[order].copy().write_h5ad(path)
    return path


def _run(path: Path, out: Path) -> ps_job.RunSummary:
    return ps.run(
        path,
        out,
        perturbation_column=COLUMN,
        control_label=CONTROL,
        method=list(METHODS),
        hvg=N_HVG,
        pca=N_PCS,
        pseudobulk=True,
        chunk_size=CHUNK,
        scheduler=S,
    )


@pytest.fixture(scope="module")
def job(unsorted_h5ad, tmp_path_factory) -> ps_job.RunSummary:
    return _run(unsorted_h5ad, tmp_path_factory.mktemp("job") / "out")


@pytest.fixture(scope="module")
def by_hand(unsorted_h5ad, job, tmp_path_factory) -> dict:
    """The same calls made by hand with the public API, on the job's block size."""
    store = tmp_path_factory.mktemp("hand") / "sorted.zarr"
    with ps.cluster.using(S):
        adata = ps.io.prepare(
            unsorted_h5ad,
            perturbation_column=COLUMN,
            control_label=CONTROL,
            out=store,
            exclude_labels=ps.pp.DEFAULT_EXCLUDE,
            chunk_size=job.plan.block_rows,
        )
        qc = ps.pp.qc_summary(adata, perturbation_column=COLUMN, control_label=CONTROL)
        kept = qc.apply(adata)
        kept.layers["counts"] = kept.X  # nb-glm tests the counts
        ps.pp.size_factors(kept, layer="counts")
        ps.tl.dispersions(kept, perturbation_column=COLUMN, layer="counts")
        bulk = ps.pb.pseudobulk(kept, perturbation_column=COLUMN, target_sum=1e4)
        lfc = ps.pb.log_fold_change(bulk, control_label=CONTROL, perturbation_column=COLUMN)
        ps.pp.normalize_total(kept, target_sum=1e4)
        ps.pp.log1p(kept)
        ps.pp.highly_variable_genes(kept, n_top_genes=N_HVG)
        ps.pp.pca(kept, n_comps=N_PCS, use_highly_variable=True)
        results = {
            m: ps.compute(
                ps.tl.rank_genes_groups(
                    kept,
                    perturbation_column=COLUMN,
                    control_label=CONTROL,
                    method=m,
                    layer="counts" if m == "nb-glm" else None,  # nb-glm tests the counts, the others log1p
                )
            )
            for m in METHODS
        }
    return {"qc": qc, "kept": kept, "bulk": bulk, "lfc": lfc, "results": results}


# --------------------------------------------------------------------------- the job equals the calls by hand


@pytest.mark.parametrize("method", METHODS)
def test_results_are_bitwise_those_of_the_calls_made_by_hand(job, by_hand, method):
    ours = ad.read_zarr(job.files[f"results:{method}"])
    hand = by_hand["results"][method]
    assert sorted(ours.obs_names) == sorted(hand.obs_names) and "P0003" not in ours.obs_names
    assert list(ours.var_names) == list(hand.var_names)
    hand = hand[ours.obs_names]
    assert set(ours.layers) == set(hand.layers) and len(ours.layers) >= 4
    for name in ours.layers:
        _same(ours.layers[name], hand.layers[name], f"{method} layers[{name!r}]")
    assert list(ours.var.columns) == list(hand.var.columns)
    for column in ours.var.columns:  # nb-glm: the dispersions it used
        _same(ours.var[column].to_numpy(), hand.var[column].to_numpy(), f"{method} var[{column!r}]")
    if method == "nb-glm":
        assert {"dispersion", "dispersion_trend"} <= set(ours.var.columns)


def test_size_factors_and_dispersions_are_those_made_by_hand(job, by_hand):
    kept = by_hand["kept"]
    factors = _csv(job.files["size_factors"], "cell")
    assert list(factors.index) == list(kept.obs_names)
    _same(factors["size_factor"].to_numpy(), kept.obs["size_factors"].to_numpy(), "size factors")
    ours = ad.read_zarr(job.files["results:nb-glm"])
    for column in ("dispersion", "dispersion_genewise", "dispersion_trend"):
        _same(ours.var[column].to_numpy(), kept.var[column].to_numpy(), f"var[{column!r}]")


def test_qc_table_is_the_summary_made_by_hand(job, by_hand):
    qc = by_hand["qc"]
    table = _csv(job.files["qc"], "perturbation")
    expected = qc.perturbations.copy()
    expected.index = expected.index.astype(str)
    expected["reason"] = expected["reason"].astype(str)
    table["reason"] = table["reason"].fillna("")
    pd.testing.assert_frame_equal(table, expected, check_names=False, check_index_type=False)
    assert table.loc["P0003", "reason"] != "" and table.loc["multiple", "reason"] != ""
    assert job.n_obs_kept == int(qc.cell_mask.sum()) and job.n_vars_kept == int(qc.gene_mask.sum())


def test_optional_steps_are_those_made_by_hand(job, by_hand):
    kept, bulk, lfc = by_hand["kept"], by_hand["bulk"], by_hand["lfc"]
    genes = _csv(job.files["hvg"], "gene")
    assert list(genes.index) == list(kept.var_names)
    for column in ("means", "dispersions", "dispersions_norm", "highly_variable"):
        _same(genes[column].to_numpy(), kept.var[column].to_numpy(), f"genes.csv {column}")
    assert genes["highly_variable"].sum() == N_HVG
    pca = ad.read_zarr(job.files["pca"])
    assert list(pca.obs_names) == list(kept.obs_names)
    _same(pca.obsm["X_pca"], kept.obsm["X_pca"], "X_pca")
    _same(pca.varm["PCs"], kept.varm["PCs"], "PCs")
    for key in ("variance", "variance_ratio"):
        _same(pca.uns["pca"][key], kept.uns["pca"][key], f"uns['pca'][{key!r}]")
    ours = ad.read_h5ad(job.files["pseudobulk"])
    assert list(ours.obs_names) == list(bulk.obs_names)
    _same(ours.X, bulk.X, "pseudo-bulk X")
    for name in bulk.layers:
        _same(ours.layers[name], bulk.layers[name], f"pseudo-bulk layers[{name!r}]")
    rows = pd.Index(ours.obs[COLUMN].astype(str)).get_indexer(lfc.obs[COLUMN].astype(str))
    assert (rows >= 0).all() and len(rows) == ours.n_obs - 1  # every perturbation but the control
    _same(ours.layers["log2_fold_change"][rows], lfc.X, "log2 fold change")


# --------------------------------------------------------------------------- public names only


#: The analyses: the job uses their public names only (io, below the job, may lend it private helpers).
ANALYSES = ("pp", "tl", "pb", "kernels")


def _private_uses(source: str, module: str) -> list[str]:
    """Imports of, and attributes used on, the analyses that are private or not in their ``__all__``.

    ``module`` is the dotted name of the module the source belongs to (for relative imports).
    """
    found = []
    package = module.rsplit(".", 1)[0]
    bound = {}  # local name -> analysis package it is bound to
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            parts = target.split(".")
            if target == "pertscale":  # from pertscale import pp, tl
                bound |= {a.asname or a.name: a.name for a in node.names if a.name in ANALYSES}
                continue
            if parts[0] != "pertscale" or parts[1] not in ANALYSES:
                continue
            if any(p.startswith("_") for p in parts[2:]):
                found.append(f"from {target} import ...")
                continue
            public = getattr(__import__(target, fromlist=["__all__"]), "__all__", ())
            found += [f"from {target} import {a.name}" for a in node.names if a.name not in public]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pertscale" and len(parts) > 2 and parts[1] in ANALYSES:
                    if any(p.startswith("_") for p in parts[2:]):
                        found.append(f"import {alias.name}")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            name = bound[node.value.id]
            public = getattr(__import__(f"pertscale.{name}", fromlist=["__all__"]), "__all__", ())
            if node.attr not in public:
                found.append(f"{node.value.id}.{node.attr}")
    return found


def test_the_rule_finds_private_names_of_the_analyses():
    source = "\n".join(
        [
            "from .. import pb, pp, tl",
            "from ..io._read import row_nonzeros",  # io: allowed
            "from ..kernels._common import ALTERNATIVES",
            "from ..tl._results import tidy",
            "from ..pp import _qc",
            "import pertscale.tl._nbglm",
            "x = tl._rank_genes_groups",
            "y = pp.normalize_total, tl.rank_genes_groups, pb.pseudobulk",  # public: allowed
        ]
    )
    assert _private_uses(source, "pertscale.job._run") == [
        "from pertscale.kernels._common import ...",
        "from pertscale.tl._results import ...",
        "from pertscale.pp import _qc",
        "import pertscale.tl._nbglm",
        "tl._rank_genes_groups",
    ]


def test_the_job_imports_only_public_names_of_the_analyses():
    modules = sorted(JOB.glob("*.py"))
    assert {p.name for p in modules} >= {"__init__.py", "_run.py", "_output.py", "_plan.py"}
    uses = {p.name: _private_uses(p.read_text(), f"pertscale.job.{p.stem}") for p in modules}
    assert not any(uses.values()), uses
    run_source = (JOB / "_run.py").read_text()
    assert "pp.qc_summary(" in run_source and "tl.rank_genes_groups(" in run_source  # the rule sees the calls


# --------------------------------------------------------------------------- sorted or not


def test_sorted_input_needs_no_working_store_and_gives_the_same_results(job, sorted_h5ad, tmp_path):
    out = tmp_path / "out"
    direct = _run(sorted_h5ad, out)
    assert direct.working_store is None and not (out / ps_job.WORKING_STORE).exists()
    assert job.working_store is not None and Path(job.working_store).is_dir()
    assert sorted(direct.perturbations_tested) == sorted(job.perturbations_tested)
    for method in METHODS:
        a = ad.read_zarr(direct.files[f"results:{method}"])
        b = ad.read_zarr(job.files[f"results:{method}"])
        b = b[a.obs_names]
        assert set(a.layers) == set(b.layers)
        for name in a.layers:
            if method == "nb-glm":  # its size factors sum over the cells: other blocks, other rounding
                assert_close(a.layers[name], b.layers[name], rtol=1e-9, err_msg=f"{method} layers[{name!r}]")
            else:
                _same(a.layers[name], b.layers[name], f"{method} layers[{name!r}], sorted vs unsorted")
    qc_sorted, qc_unsorted = _csv(direct.files["qc"], "perturbation"), _csv(job.files["qc"], "perturbation")
    pd.testing.assert_frame_equal(qc_sorted.sort_index(), qc_unsorted.sort_index())
    bulk_sorted = ad.read_h5ad(direct.files["pseudobulk"])
    bulk_unsorted = ad.read_h5ad(job.files["pseudobulk"])
    bulk_unsorted = bulk_unsorted[bulk_sorted.obs_names]
    _same(bulk_sorted.X, bulk_unsorted.X, "pseudo-bulk sums, sorted vs unsorted")

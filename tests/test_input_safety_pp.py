"""Input safety of preprocessing, pseudo-bulk and the numbers they take (issue 21, slice A).

Views of an AnnData, a repeated log1p, pseudo-bulk of log1p data, numbers
beyond what float32 normalization holds, a covariate given as one string,
filters that keep nothing, and the defaults of ``qc_summary``. Each case
asserts the exception (or exit code) and a fragment of the message that
names the fix, or checks the result against an independent reference; and
that the input is unchanged.
"""

from __future__ import annotations

import pickle
import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from anndata import ImplicitModificationWarning
from click.testing import CliRunner

import pertscale as ps
import pertscale.kernels.pseudobulk as pseudobulk_kernels
from pertscale.cli import main

from . import test_bad_inputs
from .conftest import assert_close
from .test_bad_inputs import _args, _forbid_passes, _prepared, checksum, h5ad

tiny = test_bad_inputs.tiny  # the bad-input suite's fixture: 400 cells x 40 genes, 4 perturbations

S = "synchronous"


@pytest.fixture(autouse=True)
def _synchronous():
    with ps.settings.override(scheduler=S):
        yield


def _dense(x) -> np.ndarray:
    x = x.compute() if hasattr(x, "compute") else x
    return np.asarray(x.toarray() if sp.issparse(x) else x)


def _snapshot(a: ad.AnnData) -> tuple:
    """Everything of an AnnData that a function could change, to compare before and after."""
    return (
        id(a.X),
        a.X.dtype,
        _dense(a.X).tobytes(),
        pickle.dumps(a.obs),
        pickle.dumps(a.var),
        pickle.dumps(a.uns),
        sorted(a.obsm),
        sorted(a.varm),
        sorted(a.layers),
    )


def _counts(tiny) -> ad.AnnData:
    a = tiny.copy()
    a.obs["bio_rep"] = np.where(np.arange(a.n_obs) % 2, "r1", "r2")
    return a


# ---------------------------------------------------------------- 1. in-place functions on views


def _logged(tiny) -> ad.AnnData:
    a = _prepared(tiny)
    a.X = a.X.compute()  # in memory, as after scanpy's
    return a


def _with_size_factors(tiny) -> ad.AnnData:
    a = _counts(tiny)
    ps.pp.size_factors(a)
    return a


def _x(a):
    return _dense(a.X)


#: Each in-place function: the data it takes, the call, and what it writes (compared with the same call on a copy).
IN_PLACE = {
    "normalize_total": (_counts, lambda a: ps.pp.normalize_total(a), _x),
    "log1p": (_counts, lambda a: ps.pp.log1p(a), _x),
    "calculate_qc_metrics": (
        _counts,
        lambda a: ps.pp.calculate_qc_metrics(a),
        lambda a: pd.concat([a.obs.select_dtypes("number").stack(), a.var.select_dtypes("number").stack()]).to_numpy(),
    ),
    "highly_variable_genes": (
        _logged,
        lambda a: ps.pp.highly_variable_genes(a, n_top_genes=10),
        lambda a: a.var[["means", "dispersions_norm", "highly_variable"]].to_numpy(dtype=float),
    ),
    "pca": (
        _logged,
        lambda a: ps.pp.pca(a, n_comps=5, use_highly_variable=False),
        lambda a: np.r_[_dense(a.obsm["X_pca"]).ravel(), a.varm["PCs"].ravel()],
    ),
    "size_factors": (_counts, lambda a: ps.pp.size_factors(a), lambda a: a.obs["size_factors"].to_numpy()),
    "dispersions": (
        _with_size_factors,
        lambda a: ps.tl.dispersions(a, perturbation_column="perturbation", method="moments"),
        lambda a: a.var["dispersion"].to_numpy(),
    ),
}


def _lazy(a: ad.AnnData, tmp_path) -> ad.AnnData:
    return ps.read(h5ad(a, tmp_path / "parent.h5ad"))


@pytest.mark.parametrize("storage", ["memory", "lazy"])
@pytest.mark.parametrize("axis", ["obs", "var"])
@pytest.mark.parametrize("name", sorted(IN_PLACE))
def test_in_place_function_on_a_view_makes_it_actual_and_leaves_the_parent(name, axis, storage, tiny, tmp_path):
    make, call, written = IN_PLACE[name]
    parent = make(tiny)
    if storage == "lazy":
        parent = _lazy(parent, tmp_path)
    keep = (np.arange(parent.n_obs) % 3 != 0) if axis == "obs" else (np.arange(parent.n_vars) >= 5)
    view = parent[keep] if axis == "obs" else parent[:, keep]
    assert view.is_view
    reference = view.copy()  # the same call on an actual AnnData of the same data
    call(reference)
    before = _snapshot(parent)
    with pytest.warns(ImplicitModificationWarning, match="initializing view as actual"):
        call(view)
    assert not view.is_view
    assert_close(written(view), written(reference), rtol=1e-12, err_msg=name)
    if name in ("normalize_total", "log1p"):  # the values changed: a float matrix, never the counts' int32
        assert np.issubdtype(view.X.dtype, np.floating) and view.X.dtype == reference.X.dtype == np.float32
        assert not np.allclose(_x(view), np.round(_x(view)))  # not quantized
    assert _snapshot(parent) == before, "the parent AnnData changed"


def test_normalize_total_on_a_view_equals_scanpy(tiny):
    parent = _counts(tiny)
    before = _snapshot(parent)
    view = parent[parent.obs["perturbation"] != "control"]
    with pytest.warns(ImplicitModificationWarning):
        ps.pp.normalize_total(view)
        ps.pp.log1p(view)
    ref = parent[parent.obs["perturbation"] != "control"].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scanpy's "Received a view" is not raised on a copy
        sc.pp.normalize_total(ref, target_sum=1e4)
        sc.pp.log1p(ref)
    assert view.X.dtype == ref.X.dtype == np.float32
    assert_close(_x(view), _dense(ref.X), rtol=0)  # bit for bit
    assert _snapshot(parent) == before


# ---------------------------------------------------------------- 2. log1p twice; a layer's own mark


def test_log1p_twice_warns_and_leaves_the_data(tiny):
    a = _prepared(tiny)
    before = _snapshot(a)
    with pytest.warns(UserWarning, match=r"X is log1p data already \(uns\['log1p'\] is set\): it is not logged again"):
        ps.pp.log1p(a)
    assert _snapshot(a) == before
    ref = tiny.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    assert_close(_x(a), _dense(ref.X), rtol=0)  # logged once, as scanpy


def test_log1p_of_a_layer_marks_that_layer_only(tiny):
    a = _counts(tiny)
    a.layers["norm"] = a.X.astype(np.float32) / 2
    ps.pp.log1p(a, layer="norm")
    assert "log1p" not in a.uns  # X still holds counts
    assert a.uns["pertscale"]["log1p_layers"] == {"norm": {"base": None}}
    before = _snapshot(a)
    norm = _dense(a.layers["norm"])
    with pytest.warns(UserWarning, match=r"layers\['norm'\] is log1p data already"):
        ps.pp.log1p(a, layer="norm")
    assert _snapshot(a) == before and (_dense(a.layers["norm"]) == norm).all()
    with pytest.raises(ValueError, match=r"layers\['norm'\] holds log1p-normalized values.*layer='counts'"):
        ps.tl.rank_genes_groups(
            a, perturbation_column="perturbation", control_label="control", method="nb-glm", layer="norm"
        )
    ps.pp.log1p(a)  # X is not marked: it is logged
    assert a.uns["log1p"] == {"base": None}


def test_normalize_total_drops_a_left_over_log1p_mark(tiny):
    # X put back to counts, uns['log1p'] left from before: normalizing, then log1p, logs them (once)
    a = tiny.copy()
    a.uns["log1p"] = {"base": None}
    ps.pp.normalize_total(a)
    assert "log1p" not in a.uns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ps.pp.log1p(a)
    ref = tiny.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    assert_close(_x(a), _dense(ref.X), rtol=0)


def test_cli_layer_of_counts_in_a_logged_file(tiny, tmp_path):
    # a scanpy-processed file: X log1p (uns['log1p'] set), counts in a layer; the job reads the layer
    a = tiny.copy()
    a.layers["counts"] = a.X.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    path = h5ad(a, tmp_path / "in.h5ad")
    before = checksum(path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, _args(path, out, "--layer", "counts", "--pseudobulk"))
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output  # neither "log1p data already" nor a refused pseudo-bulk
    pb = ad.read_h5ad(out / "pseudobulk.h5ad")
    ref = sc.get.aggregate(tiny, by="perturbation", func="sum")
    assert_close(pb.X, ref[pb.obs_names].layers["sum"], rtol=1e-12)
    reference = tmp_path / "reference"
    assert CliRunner().invoke(main, _args(h5ad(tiny, tmp_path / "counts.h5ad"), reference)).exit_code == 0
    got, expected = ad.read_zarr(out / "de_wilcoxon.zarr"), ad.read_zarr(reference / "de_wilcoxon.zarr")
    for layer in expected.layers:
        assert_close(got.layers[layer], expected.layers[layer], rtol=1e-12, err_msg=layer)  # logged once
    assert checksum(path) == before


def test_cli_counts_with_a_left_over_log1p_mark_are_logged(tiny, tmp_path):
    # X put back to counts, uns['log1p'] left in the file: the job normalizes and logs them, once
    stale = tiny.copy()
    stale.uns["log1p"] = {"base": None}
    path = h5ad(stale, tmp_path / "stale.h5ad")
    before = checksum(path)
    results = {}
    for name, source in (("stale", path), ("clean", h5ad(tiny, tmp_path / "clean.h5ad"))):
        result = CliRunner().invoke(main, _args(source, tmp_path / name, "--method", "t-test"))
        assert result.exit_code == 0, result.output
        results[name] = ad.read_zarr(tmp_path / name / "de_t_test.zarr")
    for layer in results["clean"].layers:
        assert_close(results["stale"].layers[layer], results["clean"].layers[layer], rtol=1e-12, err_msg=layer)
    assert checksum(path) == before


# ---------------------------------------------------------------- 3. pseudo-bulk needs counts


def test_pseudobulk_refuses_log1p_data_before_any_pass(tiny, tmp_path, monkeypatch):
    path = h5ad(_prepared(tiny), tmp_path / "logged.h5ad")  # X log1p, uns['log1p'] set
    before = checksum(path)
    a = ps.read(path)
    snap = _snapshot(a)
    _forbid_passes(monkeypatch)
    with pytest.raises(ValueError, match=r"X holds log1p values \(uns\['log1p'\] is set\).*layer='counts'.*raw"):
        ps.pb.pseudobulk(a)
    monkeypatch.undo()
    assert _snapshot(a) == snap and checksum(path) == before


def test_pseudobulk_refuses_a_logged_layer(tiny, monkeypatch):
    a = _counts(tiny)
    a.layers["lg"] = a.X.astype(np.float32)
    ps.pp.log1p(a, layer="lg")
    before = _snapshot(a)
    _forbid_passes(monkeypatch)
    with pytest.raises(ValueError, match=r"layers\['lg'\] holds log1p values.*adata\.raw\.to_adata\(\)"):
        ps.pb.pseudobulk(a, layer="lg")
    monkeypatch.undo()
    assert _snapshot(a) == before
    assert ps.pb.pseudobulk(a).n_obs == 5  # X, the counts, is not marked


def test_pseudobulk_refuses_non_integer_values_in_the_pass_and_stops(tiny, tmp_path, monkeypatch):
    a = tiny.copy()
    a.X = a.X.astype(np.float32)
    a.X.data = np.log1p(a.X.data)  # logged without the mark
    path = h5ad(a, tmp_path / "unmarked.h5ad")
    before = checksum(path)
    blocks = []
    real = pseudobulk_kernels.group_sums

    def counted(*args, **kwargs):
        blocks.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pseudobulk_kernels, "group_sums", counted)
    lazy = ps.read(path, chunk_size=50)  # 8 blocks
    with pytest.raises(ValueError, match=r"values that are not whole numbers.*layer='counts'.*raw\.to_adata"):
        ps.pb.pseudobulk(lazy)
    assert 0 < len(blocks) < lazy.X.numblocks[0], "the pass went on after the first blocks showed the values"
    assert checksum(path) == before


# ---------------------------------------------------------------- 4. numbers in the range the computation uses


@pytest.mark.parametrize("value", ["1e300", "1e-300", "1e38", "1e-29"])
def test_cli_target_sum_beyond_float32(value, tiny, tmp_path, monkeypatch):
    path = h5ad(tiny, tmp_path / "in.h5ad")
    before = checksum(path)
    out = tmp_path / "out"
    _forbid_passes(monkeypatch)
    result = CliRunner().invoke(main, _args(path, out, "--target-sum", value))
    monkeypatch.undo()
    assert result.exit_code == 2, result.output
    assert re.search(r"target_sum \(--target-sum\) must be between 1e-28 and 1e\+37.*float32", result.output)
    assert checksum(path) == before and not out.exists()


@pytest.mark.parametrize("target_sum", [1e-28, 1e37])
def test_target_sum_at_the_bounds_is_exact(target_sum, tiny):
    a = tiny.copy()
    before = _snapshot(tiny)
    ps.pp.normalize_total(a, target_sum=target_sum)
    got = _dense(a.X).astype(np.float64)
    counts = _dense(tiny.X).astype(np.float64)
    expected = counts / counts.sum(axis=1, keepdims=True) * target_sum  # float64 arithmetic
    assert np.isfinite(got).all() and ((got > 0) == (counts > 0)).all()
    assert_close(got, expected, rtol=1e-6)
    assert_close(np.log1p(got), np.log1p(expected), rtol=1e-6)
    assert _snapshot(tiny) == before


def test_cli_min_mean_above_every_reachable_mean(tiny, tmp_path):
    path = h5ad(tiny, tmp_path / "in.h5ad")
    before = checksum(path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, _args(path, out, "--min-mean", "1e300"))
    assert result.exit_code == 1, result.output
    assert re.search(
        r"min_mean \(--min-mean\) 1e\+300 is above 9\.21 = log1p\(target_sum=10000\).*min_mean <= 9", result.output
    )
    assert checksum(path) == before and not out.exists()


def test_cli_min_genes_of_30_digits_is_a_whole_number(tiny, tmp_path):
    path = h5ad(tiny, tmp_path / "in.h5ad")
    before = checksum(path)
    result = CliRunner().invoke(main, _args(path, tmp_path / "out", "--min-genes", str(10**30)))
    assert result.exit_code == 1, result.output
    assert "whole number" not in result.output
    assert re.search(r"0 control cell\(s\) left after filtering.*lower --min-genes", result.output)
    assert checksum(path) == before


def _pseudobulk(tiny) -> ad.AnnData:
    return ps.pb.pseudobulk(_counts(tiny))


#: API calls with a number beyond what the computation uses: (input, call, error, message, refused before any pass).
NUMBERS = {
    "normalize-target-sum-huge": (
        _counts,
        lambda a: ps.pp.normalize_total(a, target_sum=1e300),
        ValueError,
        r"target_sum \(--target-sum\) must be between 1e-28 and 1e\+37, got 1e\+300: beyond.*float32",
        True,
    ),
    "normalize-target-sum-tiny": (
        _counts,
        lambda a: ps.pp.normalize_total(a, target_sum=1e-300),
        ValueError,
        r"must be between 1e-28 and 1e\+37.*sets every value to 0",
        True,
    ),
    "pseudobulk-target-sum-huge": (
        _counts,
        lambda a: ps.pb.pseudobulk(a, target_sum=10.0**30 * 2**63),
        ValueError,
        r"target_sum must be between 1e-28 and 1e\+37",
        True,
    ),
    "pca-n-iter-2**63": (
        _logged,
        lambda a: ps.pp.pca(a, n_comps=5, method="randomized", n_iter=2**63),
        ValueError,
        r"n_iter must be >= 0 and <= 100, got 9223372036854775808: each iteration is a pass over the matrix",
        True,
    ),
    "pca-random-state-fraction": (
        _logged,
        lambda a: ps.pp.pca(a, n_comps=5, random_state=1e-300),
        ValueError,
        r"random_state must be a whole number",
        True,
    ),
    "hvg-n-bins-2**63": (
        _logged,
        lambda a: ps.pp.highly_variable_genes(a, n_bins=2**63),
        ValueError,
        r"n_bins must be >= 1 and <= 40, got 9223372036854775808: bins of mean expression hold genes",
        True,
    ),
    "dispersions-tol-huge": (
        _with_size_factors,
        lambda a: ps.tl.dispersions(a, perturbation_column="perturbation", tol=1e300),
        ValueError,
        r"tol must be > 0 and < 3.0, got 1e\+300: a Newton step in log alpha is at most 3 long",
        True,
    ),
    "dispersions-min-mu-huge": (
        _with_size_factors,
        lambda a: ps.tl.dispersions(a, perturbation_column="perturbation", min_mu=1e300),
        ValueError,
        r"min_mu must be > 0 and <= 1e\+152, got 1e\+300: .*finite float64",
        True,
    ),
    "adaptive-random-state-negative": (
        _counts,
        lambda a: ps.pp.adaptive_qc_thresholds(a, perturbation_column="perturbation", random_state=-1),
        ValueError,
        r"random_state must be >= 0",
        True,
    ),
    "lfc-baseline-count-huge": (
        _pseudobulk,
        lambda pb: ps.pb.log_fold_change(pb, control_label="control", baseline_count=1e306),
        ValueError,
        r"baseline_count must be between .* got 1e\+306: .*float64's range",
        False,
    ),
    "lfc-baseline-count-tiny": (
        _pseudobulk,
        lambda pb: ps.pb.log_fold_change(pb, control_label="control", baseline_count=1e-320),
        ValueError,
        r"baseline_count must be between .*fold changes become NaN \(too large\) or 0 \(too small\)",
        False,
    ),
    "min-mean-unreachable": (
        _logged,
        lambda a: ps.tl.rank_genes_groups(
            a, perturbation_column="perturbation", control_label="control", min_mean=(10.0, 1e300)
        ),
        ValueError,
        r"above 9\.21 = log1p\(target_sum=10000\).*no gene would be tested",
        True,
    ),
}


@pytest.mark.parametrize("name", sorted(NUMBERS))
def test_api_number_beyond_the_computation(name, tiny, monkeypatch):
    make, call, error, message, early = NUMBERS[name]
    a = make(tiny)
    before = _snapshot(a)
    if early:
        _forbid_passes(monkeypatch)
    with pytest.raises(error, match=message):
        call(a)
    monkeypatch.undo()
    assert _snapshot(a) == before


def test_seurat_v3_span_too_small_is_an_error_not_a_crash(tiny):
    pytest.importorskip("skmisc")
    a = _counts(tiny)
    before = _snapshot(a)
    with pytest.raises(ValueError, match=r"span=1e-300 puts .* genes in each loess window.*use span >= 0\.0"):
        ps.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=10, span=1e-300)
    assert _snapshot(a) == before


def test_whole_numbers_beyond_float_precision_are_whole(tiny):
    a = _counts(tiny)
    # the control stays
    kept = ps.pp.filter_perturbations(
        a, perturbation_column="perturbation", control_label="control", min_cells_per_perturbation=10**30
    )
    assert set(kept.obs["perturbation"].astype(str)) == {"control"}
    assert ps.pp.adaptive_qc_thresholds(a, perturbation_column="perturbation", random_state=10**30).min_genes >= 5


# ---------------------------------------------------------------- 5. one covariate as a string


def test_covariate_as_a_string_is_one_column(tiny):
    a = _counts(tiny)
    a.layers["counts"] = a.X
    ps.pp.size_factors(a, layer="counts")  # nb-glm's steps, made first
    ps.tl.dispersions(a, perturbation_column="perturbation", covariates="bio_rep", method="moments", layer="counts")
    kw = {"method": "nb-glm", "layer": "counts", "dispersion_method": "moments", "perturbations": ["P0000"]}
    by_string = ps.compute(
        ps.tl.rank_genes_groups(
            a.copy(), perturbation_column="perturbation", control_label="control", covariates="bio_rep", **kw
        )
    )
    by_list = ps.compute(
        ps.tl.rank_genes_groups(
            a.copy(), perturbation_column="perturbation", control_label="control", covariates=["bio_rep"], **kw
        )
    )
    assert list(by_string.uns["pertscale"]["settings"]["covariates"]) == ["bio_rep"]
    for layer in by_list.layers:
        assert_close(by_string.layers[layer], by_list.layers[layer], rtol=1e-12, err_msg=layer)
    d = a.copy()
    ps.pp.size_factors(d)
    table = ps.tl.dispersions(d, perturbation_column="perturbation", covariates="bio_rep", method="moments")
    assert d.uns["pertscale"]["dispersion"]["covariates"] == "bio_rep"
    e = a.copy()
    ps.pp.size_factors(e)
    assert_close(
        table["dispersion"],
        ps.tl.dispersions(e, perturbation_column="perturbation", covariates=["bio_rep"], method="moments")[
            "dispersion"
        ],
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda a: ps.tl.rank_genes_groups(
            a, perturbation_column="perturbation", control_label="control", method="nb-glm", covariates="batch"
        ),
        lambda a: ps.tl.dispersions(
            a, perturbation_column="perturbation", size_factors=np.ones(a.n_obs), covariates="batch"
        ),
    ],
    ids=["rank_genes_groups", "dispersions"],
)
def test_missing_covariate_string_is_refused_before_any_pass(call, tiny, monkeypatch):
    a = _counts(tiny)
    before = _snapshot(a)
    _forbid_passes(monkeypatch)  # nb-glm's size factors (a pass) used to come first
    with pytest.raises(KeyError, match=r"covariate 'batch' not found in obs; columns present"):
        call(a)
    monkeypatch.undo()
    assert _snapshot(a) == before


def test_run_covariate_string_is_refused_before_any_pass(tiny, tmp_path, monkeypatch):
    path = h5ad(_counts(tiny), tmp_path / "in.h5ad")
    before = checksum(path)
    _forbid_passes(monkeypatch)
    with pytest.raises(ValueError, match=r"covariate level\(s\) .* of \['perturbation'\] have no control cells"):
        ps.run(
            path,
            tmp_path / "out",
            perturbation_column="perturbation",
            control_label="control",
            method="nb-glm",
            covariates="perturbation",  # one column (levels without control cells), not 12 letters
        )
    monkeypatch.undo()
    assert checksum(path) == before and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 6. filters that keep nothing


FILTERS = {
    "cells-min-genes": (
        lambda a: ps.pp.filter_cells(a, min_genes=1_000),
        r"min_genes=1000 drops every cell: the most genes detected in one cell is \d+; min_genes <= \d+ keeps some",
    ),
    "cells-max-genes": (
        lambda a: ps.pp.filter_cells(a, max_genes=0),
        r"max_genes=0 drops every cell: the fewest genes detected in one cell is \d+; max_genes >= \d+ keeps some",
    ),
    "cells-min-counts": (
        lambda a: ps.pp.filter_cells(a, min_counts=1e300),
        r"min_counts=1e\+300 drops every cell: the largest total count of one cell is [\d.]+; min_counts <= [\d.]+",
    ),
    "genes-min-cells": (
        lambda a: ps.pp.filter_genes(a, min_cells=10**30),
        r"min_cells=10{30} drops every gene: the most cells that detect one gene is \d+; min_cells <= \d+",
    ),
    "genes-max-counts": (
        lambda a: ps.pp.filter_genes(a, max_counts=0),
        r"max_counts=0.0 drops every gene: the smallest total count of one gene is [\d.]+; max_counts >= ",
    ),
}


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_filter_that_keeps_nothing(name, tiny, tmp_path):
    call, message = FILTERS[name]
    path = h5ad(tiny, tmp_path / "in.h5ad")
    before = checksum(path)
    a = ps.read(path)
    snap = _snapshot(a)
    with pytest.raises(ValueError, match=message):
        call(a)
    assert _snapshot(a) == snap and checksum(path) == before


PERTURBATION_FILTERS = {
    "control-absent": (
        lambda a: ps.pp.filter_perturbations(a, perturbation_column="perturbation", control_label="NT"),
        r"control_label 'NT' not found in obs\['perturbation'\]; labels seen: 'control', 'P000",
    ),
    "control-excluded": (
        lambda a: ps.pp.filter_perturbations(
            a, perturbation_column="perturbation", control_label="control", exclude_labels="control"
        ),
        r"exclude_labels includes the control label 'control': no control cell would be left; remove it",
    ),
    "all-excluded": (
        lambda a: ps.pp.filter_perturbations(
            a, perturbation_column="perturbation", exclude_labels=["control", "P0000", "P0001", "P0002", "P0003"]
        ),
        r"every cell's label in obs\['perturbation'\] is in exclude_labels.*remove some labels",
    ),
    "min-cells-drops-all": (
        lambda a: ps.pp.filter_perturbations(a, perturbation_column="perturbation", min_cells_per_perturbation=500),
        r"min_cells_per_perturbation=500 drops every perturbation: the largest, 'control', has 100 cells; "
        r"min_cells_per_perturbation <= 100 keeps some \(or give control_label",
    ),
}


@pytest.mark.parametrize("name", sorted(PERTURBATION_FILTERS))
def test_filter_perturbations_refuses_before_any_pass(name, tiny, tmp_path, monkeypatch):
    call, message = PERTURBATION_FILTERS[name]
    path = h5ad(tiny, tmp_path / "in.h5ad")
    before = checksum(path)
    a = ps.read(path)
    snap = _snapshot(a)
    _forbid_passes(monkeypatch)
    with pytest.raises(ValueError, match=message):
        call(a)
    monkeypatch.undo()
    assert _snapshot(a) == snap and checksum(path) == before


# ---------------------------------------------------------------- 7. qc_summary's defaults are the main job's


def test_qc_summary_defaults_are_the_main_jobs(tiny, tmp_path):
    a = tiny.copy()
    labels = a.obs["perturbation"].astype(str).to_numpy()
    labels[np.flatnonzero(labels == "P0003")[:30]] = "unassigned"  # excluded by default, in both
    a.obs["perturbation"] = labels
    path = h5ad(a, tmp_path / "in.h5ad")
    before = checksum(path)
    summary = ps.pp.qc_summary(ps.read(path), perturbation_column="perturbation", control_label="control")
    assert (summary.min_genes, summary.min_cells_per_perturbation, summary.min_cells_per_gene) == (20, 20, 3)
    assert summary.exclude_labels == ps.pp.DEFAULT_EXCLUDE
    out = tmp_path / "out"
    result = CliRunner().invoke(main, _args(path, out))
    assert result.exit_code == 0, result.output
    job = pd.read_csv(out / "qc.csv", index_col="perturbation")
    kept = summary.perturbations["n_cells_kept"]
    assert_close(kept.reindex(job.index).to_numpy(), job["n_cells_kept"].to_numpy(), rtol=0)
    assert summary.perturbations.loc["unassigned", "reason"] == "excluded"
    table = summary.table
    assert f"cells kept: {table.loc['cells', 'kept']} of {a.n_obs}" in result.output
    assert f"genes kept: {table.loc['genes', 'kept']} of {a.n_vars}" in result.output
    assert checksum(path) == before

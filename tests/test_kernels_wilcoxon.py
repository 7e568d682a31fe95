"""The Wilcoxon kernels alone, against scipy on in-memory matrices."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from pertscale.kernels.wilcoxon import (
    WILCOXON_STATS,
    adjust_pvalues,
    control_statistics,
    wilcoxon_block,
)

from .conftest import assert_close

S = {name: i for i, name in enumerate(WILCOXON_STATS)}


def _scipy_reference(group, control, *, use_continuity):
    res = stats.mannwhitneyu(
        group.astype(np.float64), control.astype(np.float64), method="asymptotic", use_continuity=use_continuity, axis=0
    )
    return res.statistic, res.pvalue


def _blocks(rng, n_ctrl, sizes, n_genes, *, lam=0.8, scale=1.0, dtype=np.float32):
    control = (rng.poisson(lam, size=(n_ctrl, n_genes)) * scale).astype(dtype)
    groups = [(rng.poisson(lam * rng.uniform(0.5, 2), size=(m, n_genes)) * scale).astype(dtype) for m in sizes]
    return control, groups


def test_control_statistics_match_numpy_unique():
    rng = np.random.default_rng(1)
    control = rng.poisson(1.2, size=(200, 30)).astype(np.float32)
    cs = control_statistics(sp.csr_matrix(control))
    for j in range(30):
        col = control[:, j]
        values, counts = np.unique(col[col != 0], return_counts=True)
        sl = slice(cs.ptr[j], cs.ptr[j + 1])
        np.testing.assert_array_equal(cs.values[sl], values)
        np.testing.assert_array_equal(cs.counts[sl], counts)
        np.testing.assert_array_equal(cs.below[sl], np.r_[0, np.cumsum(counts)[:-1]])
        assert cs.n_zero[j] == (col == 0).sum()
        assert cs.tie_term[j] == float(np.sum(counts.astype(float) ** 3 - counts))
        assert cs.sum[j] == pytest.approx(col.astype(np.float64).sum())


@pytest.mark.parametrize("use_continuity", [False, True])
def test_block_matches_scipy_mannwhitneyu(use_continuity):
    rng = np.random.default_rng(2)
    control, groups = _blocks(rng, 400, [37, 5, 120], 60)
    cs = control_statistics(control)
    out = wilcoxon_block(
        sp.csr_matrix(np.vstack(groups)), [g.shape[0] for g in groups], cs, use_continuity=use_continuity
    )
    for k, group in enumerate(groups):
        u, p = _scipy_reference(group, control, use_continuity=use_continuity)
        assert_close(out[k, S["u_statistic"]], u, rtol=0)
        defined = ~np.isnan(p)  # scipy: NaN where all values tie
        assert_close(out[k, S["pvals"]][defined], p[defined], rtol=1e-12)
        assert (out[k, S["pvals"]][~defined] == 1).all()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_ctrl=st.integers(2, 60),
    sizes=st.lists(st.integers(1, 25), min_size=1, max_size=4),
    lam=st.floats(0.05, 3.0),
    dtype=st.sampled_from([np.float32, np.float64, np.int32]),
)
def test_block_matches_scipy_on_drawn_data(seed, n_ctrl, sizes, lam, dtype):
    # heavy ties and zeros: small Poisson counts, small groups
    rng = np.random.default_rng(seed)
    control, groups = _blocks(rng, n_ctrl, sizes, 8, lam=lam, scale=0.5, dtype=dtype)
    out = wilcoxon_block(np.vstack(groups), sizes, control_statistics(control))
    for k, group in enumerate(groups):
        u, p = _scipy_reference(group, control, use_continuity=False)
        assert_close(out[k, S["u_statistic"]], u, rtol=0)
        defined = ~np.isnan(p)
        assert_close(out[k, S["pvals"]][defined], p[defined], rtol=1e-9, atol=1e-300)


def test_no_tie_correction_uses_plain_variance():
    rng = np.random.default_rng(3)
    control, groups = _blocks(rng, 150, [40], 20)
    out = wilcoxon_block(groups[0], [40], control_statistics(control), tie_correct=False)
    m, n = 40, 150
    u, _ = _scipy_reference(groups[0], control, use_continuity=False)
    z = (u - m * n / 2) / np.sqrt(m * n * (m + n + 1) / 12)
    assert_close(out[0, S["scores"]], z, rtol=1e-12)
    assert_close(out[0, S["pvals"]], 2 * stats.norm.sf(np.abs(z)), rtol=1e-12)


def test_means_fractions_and_fold_changes():
    rng = np.random.default_rng(4)
    control, groups = _blocks(rng, 100, [30], 10)
    control = np.log1p(control)
    group = np.log1p(groups[0])
    out = wilcoxon_block(group, [30], control_statistics(control))
    expected_lfc = np.log2(
        (np.expm1(group.mean(0, dtype=np.float64)) + 1e-9) / (np.expm1(control.mean(0, dtype=np.float64)) + 1e-9)
    )
    assert_close(out[0, S["logfoldchanges"]], expected_lfc, rtol=1e-6)
    assert_close(out[0, S["pts"]], (group != 0).mean(0), rtol=1e-12)
    assert_close(out[0, S["pts_rest"]], (control != 0).mean(0), rtol=1e-12)


def test_all_zero_gene_scores_zero_pvalue_one():
    control = np.zeros((10, 3), dtype=np.float32)
    control[:, 1] = 1
    group = np.zeros((4, 3), dtype=np.float32)
    out = wilcoxon_block(group, [4], control_statistics(control))
    assert out[0, S["scores"], 0] == 0 and out[0, S["pvals"], 0] == 1  # everything tied
    assert out[0, S["scores"], 1] < 0  # group below control


def test_stored_zeros_are_zeros():
    control = sp.csr_matrix(np.array([[0, 1], [2, 0], [0, 0]], dtype=np.float32))
    control.data[0] = 0.0  # explicit zero in the structure
    dense = control.toarray()
    group = sp.csr_matrix(np.array([[0, 3], [1, 0]], dtype=np.float32))
    group.data[0] = 0.0
    out = wilcoxon_block(group, [2], control_statistics(control))
    u, _ = _scipy_reference(group.toarray(), dense, use_continuity=False)
    assert_close(out[0, S["u_statistic"]], u, rtol=0)


@pytest.mark.parametrize("bad", [np.nan, -1.0, np.inf])
def test_bad_values_raise(bad):
    x = np.ones((3, 2), dtype=np.float32)
    x[1, 1] = bad
    with pytest.raises(ValueError, match="NaN|negative"):
        control_statistics(x)
    with pytest.raises(ValueError, match="NaN|negative"):
        wilcoxon_block(x, [3], control_statistics(np.ones((3, 2), dtype=np.float32)))


def test_group_sizes_must_cover_block():
    cs = control_statistics(np.ones((3, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="group_sizes add up"):
        wilcoxon_block(np.ones((4, 2), dtype=np.float32), [3], cs)


def test_benjamini_hochberg_matches_scipy():
    rng = np.random.default_rng(5)
    p = rng.uniform(size=(4, 500)) ** 3
    p[1, :10] = np.nan
    adj = adjust_pvalues(p)
    for r in range(4):
        ok = ~np.isnan(p[r])
        assert_close(adj[r, ok], stats.false_discovery_control(p[r, ok], method="bh"), rtol=1e-12)
        assert np.isnan(adj[r, ~ok]).all()
    assert_close(adjust_pvalues(p[:1], "bonferroni"), np.minimum(p[:1] * 500, 1), rtol=1e-12)
    with pytest.raises(ValueError, match="corr_method"):
        adjust_pvalues(p, "holm-sidak")


def test_duplicate_entries_are_summed():
    # (row 0, col 0) stored twice: 1 + 1 = 2, as scipy.sparse would read it
    dup = sp.csr_matrix((np.array([1.0, 1.0, 3.0], np.float32), np.array([0, 0, 1]), np.array([0, 2, 3])), shape=(2, 2))
    assert not dup.has_canonical_format
    control = np.array([[1, 0], [2, 1], [0, 3]], dtype=np.float32)
    out = wilcoxon_block(dup, [2], control_statistics(control))
    u, _ = _scipy_reference(dup.toarray(), control, use_continuity=False)
    assert_close(out[0, S["u_statistic"]], u, rtol=0)
    cs_dup = control_statistics(sp.vstack([dup, sp.csr_matrix(control)]).tocsr())
    cs_ref = control_statistics(np.vstack([dup.toarray(), control]))
    np.testing.assert_array_equal(cs_dup.values, cs_ref.values)
    np.testing.assert_array_equal(cs_dup.n_zero, cs_ref.n_zero)


def test_dtype_mismatch_and_empty_groups_raise():
    cs = control_statistics(np.ones((3, 2), dtype=np.int32))
    with pytest.raises(ValueError, match="dtype float32 but the control summary int32"):
        wilcoxon_block(np.ones((2, 2), dtype=np.float32), [2], cs)
    with pytest.raises(ValueError, match="at least one row"):
        wilcoxon_block(np.ones((2, 2), dtype=np.int32), [2, 0], cs)
    small = control_statistics(np.ones((3, 2), dtype=np.int16))  # small integers are summarised as float32
    assert small.values.dtype == np.float32
    assert wilcoxon_block(np.ones((2, 2), dtype=np.int16), [2], small).shape == (1, len(WILCOXON_STATS), 2)


def test_control_summary_by_gene_ranges_equals_whole():
    from pertscale.kernels.wilcoxon import concat_control_statistics

    rng = np.random.default_rng(9)
    control = sp.csr_matrix(rng.poisson(0.9, size=(120, 50)).astype(np.float32))
    whole = control_statistics(control)
    joined = concat_control_statistics([control_statistics(control[:, a:b]) for a, b in [(0, 7), (7, 30), (30, 50)]])
    for field in ("ptr", "values", "counts", "below", "n_zero", "tie_term", "sum"):
        np.testing.assert_array_equal(getattr(joined, field), getattr(whole, field), err_msg=field)
    with pytest.raises(ValueError, match="different cells"):
        concat_control_statistics([whole, control_statistics(control[:10])])

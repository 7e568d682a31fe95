"""compute_overlap against Python set arithmetic, empty sets, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pertscale as ps

from .conftest import assert_close


def _by_hand(sets):
    names = list(sets)
    as_sets = {k: set(v) for k, v in sets.items()}
    count = pd.DataFrame([[len(as_sets[a] & as_sets[b]) for b in names] for a in names], index=names, columns=names)
    jaccard = pd.DataFrame(
        [
            [
                len(as_sets[a] & as_sets[b]) / len(as_sets[a] | as_sets[b]) if as_sets[a] | as_sets[b] else np.nan
                for b in names
            ]
            for a in names
        ],
        index=names,
        columns=names,
    )
    return count, jaccard


def test_small_example():
    res = ps.tl.compute_overlap({"A": {"BRCA1", "TP53", "EGFR"}, "B": ["TP53", "KRAS", "TP53"], "C": []})
    assert res.count_matrix.loc["A", "B"] == 1 and res.count_matrix.loc["A", "A"] == 3
    assert res.count_matrix.loc["B", "B"] == 2  # repeats count once
    assert res.jaccard_matrix.loc["A", "B"] == pytest.approx(1 / 4)
    assert res.jaccard_matrix.loc["A", "C"] == 0.0  # empty against non-empty
    assert np.isnan(res.jaccard_matrix.loc["C", "C"])  # two empty sets: undefined
    assert res.set_sizes.to_dict() == {"A": 3, "B": 2, "C": 0}
    assert res.count_matrix.dtypes.unique().tolist() == [np.dtype(np.int64)]


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.text("abcdef", min_size=1, max_size=4),
        st.lists(st.sampled_from([f"G{i}" for i in range(25)]), max_size=30),
        max_size=8,
    )
)
def test_equals_set_arithmetic(sets):
    res = ps.tl.compute_overlap(sets)
    count, jaccard = _by_hand(sets)
    assert list(res.count_matrix.index) == list(sets) and list(res.jaccard_matrix.columns) == list(sets)
    assert (res.count_matrix.to_numpy() == count.to_numpy()).all()
    assert_close(res.jaccard_matrix.to_numpy(), jaccard.to_numpy().astype(float), rtol=1e-15)
    assert (res.count_matrix.to_numpy() == res.count_matrix.to_numpy().T).all()
    assert (res.set_sizes.to_numpy() == np.array([len(set(v)) for v in sets.values()], dtype=np.int64)).all()


def test_metric_choice():
    sets = {"x": [1, 2, 3], "y": (2, 3, 4)}
    counts_only = ps.tl.compute_overlap(sets, metric="count")
    assert counts_only.jaccard_matrix is None and counts_only.count_matrix.loc["x", "y"] == 2
    jaccard_only = ps.tl.compute_overlap(sets, metric="jaccard")
    assert jaccard_only.count_matrix is None and jaccard_only.jaccard_matrix.loc["x", "y"] == pytest.approx(0.5)
    empty = ps.tl.compute_overlap({})
    assert empty.count_matrix.shape == (0, 0) and empty.jaccard_matrix.shape == (0, 0)


def test_bad_input():
    with pytest.raises(ValueError, match="metric must be one of 'both', 'count', 'jaccard'; got 'dice'"):
        ps.tl.compute_overlap({"a": ["G1"]}, metric="dice")
    with pytest.raises(TypeError, match=r"sets\['a'\] is the string 'STAT1'"):
        ps.tl.compute_overlap({"a": "STAT1"})
    with pytest.raises(TypeError, match="must be an iterable"):
        ps.tl.compute_overlap({"a": 3})
    with pytest.raises(TypeError, match="must be a mapping"):
        ps.tl.compute_overlap([["G1"], ["G2"]])

"""Pairwise overlap of named gene sets: intersection counts and Jaccard index."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

METRICS = ("both", "count", "jaccard")


@dataclass(frozen=True)
class OverlapResult:
    """Pairwise overlaps of named sets, as crispyx's ``OverlapResult``.

    Attributes
    ----------
    count_matrix
        ``(n_sets, n_sets)`` int64 DataFrame, index and columns the set names:
        ``|A & B|``; the diagonal holds the set sizes. ``None`` when
        ``metric="jaccard"``.
    jaccard_matrix
        ``(n_sets, n_sets)`` float64 DataFrame: ``|A & B| / |A | B|``; 1 on
        the diagonal; NaN where both sets are empty (0 / 0). ``None`` when
        ``metric="count"``.
    set_sizes
        ``(n_sets,)`` int64 Series: distinct elements of each set.
    """

    count_matrix: pd.DataFrame | None
    jaccard_matrix: pd.DataFrame | None
    set_sizes: pd.Series


def _as_set(name, values) -> set:
    if isinstance(values, (str, bytes)):
        raise TypeError(
            f"sets[{name!r}] is the string {values!r}; give an iterable of gene names, e.g. [{values!r}], "
            "not one string (it would be read as a set of characters)"
        )
    if not isinstance(values, Iterable):
        raise TypeError(f"sets[{name!r}] must be an iterable of gene names, got {type(values).__name__}")
    return set(values)


def compute_overlap(sets: Mapping[str, Iterable], *, metric: str = "both") -> OverlapResult:
    """Pairwise intersection sizes and Jaccard indices of named sets (for example the hit genes of each perturbation).

    The statistics of crispyx's ``compute_overlap``, with three deliberate
    differences: the Jaccard index of two empty sets is NaN (undefined; crispyx
    gives 0), a metric not asked for is ``None`` (not computed), and the sizes
    are named ``size``. Computed as one sparse
    product: a ``sets x elements`` incidence matrix ``M`` gives all
    intersection sizes as ``M @ M.T``; the Jaccard index is
    ``|A & B| / (|A| + |B| - |A & B|)``. Elements are compared as Python set
    members (repeats within a set count once).

    Parameters
    ----------
    sets
        Mapping of name to an iterable of elements (set, list, index, ...);
        a plain string is refused (it is not a list of genes).
    metric
        Which matrices to compute: ``"count"``, ``"jaccard"`` or ``"both"``.

    Returns
    -------
    OverlapResult
        ``count_matrix`` and/or ``jaccard_matrix`` (names x names, in the
        order of ``sets``) and ``set_sizes``. The Jaccard index of two empty
        sets is undefined and reported as NaN; an empty and a non-empty set
        have index 0.

    Raises
    ------
    TypeError
        If ``sets`` is not a mapping, or one of its values is a string or not iterable.
    ValueError
        If ``metric`` is not one of ``"both"``, ``"count"``, ``"jaccard"``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(repr(m) for m in METRICS)}; got {metric!r}")
    if not isinstance(sets, Mapping):
        raise TypeError(f"sets must be a mapping of name to genes (a dict), got {type(sets).__name__}")
    names = pd.Index(list(sets.keys()))
    members = [_as_set(name, values) for name, values in sets.items()]
    sizes = np.array([len(m) for m in members], dtype=np.int64)
    element_code: dict = {}
    cols = np.fromiter(
        (element_code.setdefault(e, len(element_code)) for m in members for e in m), dtype=np.int64, count=sizes.sum()
    )
    rows = np.repeat(np.arange(len(members)), sizes)
    incidence = sp.csr_matrix(
        (np.ones(cols.size, dtype=np.int64), (rows, cols)), shape=(len(members), len(element_code))
    )
    shared = np.asarray((incidence @ incidence.T).toarray(), dtype=np.int64)
    count = jaccard = None
    if metric in ("both", "count"):
        count = pd.DataFrame(shared, index=names, columns=names)
    if metric in ("both", "jaccard"):
        union = sizes[:, None] + sizes[None, :] - shared
        ratio = np.where(union > 0, shared / np.maximum(union, 1), np.nan)
        jaccard = pd.DataFrame(ratio, index=names, columns=names)
    return OverlapResult(
        count_matrix=count, jaccard_matrix=jaccard, set_sizes=pd.Series(sizes, index=names, name="size")
    )

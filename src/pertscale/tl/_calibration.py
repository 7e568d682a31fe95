"""Calibration check: are the p-values uniform when no perturbation has an effect?

:func:`calibration_check` makes pseudo-perturbations from the control cells
alone (one per non-targeting guide, or random groups of the real
perturbations' sizes), tests each of them with
:func:`pertscale.tl.rank_genes_groups` exactly as the real analysis tests a
perturbation, and summarises how far the p-values are from Uniform(0, 1):
per pseudo-perturbation and pooled, the fraction below 0.05 and 0.01, a
Kolmogorov-Smirnov test, the discoveries at a false discovery rate.

The summary is one streaming pass over the test's results, block of
pseudo-perturbations by block (:func:`summarise_block`, a pure function of
one block), merged in a tree: what is kept of the pooled p-values is a
histogram on fixed edges (:func:`histogram_edges`) and the smallest
:data:`N_SMALLEST` of them, never the whole ``splits x genes`` table. The
pooled Kolmogorov-Smirnov statistic is read from the histogram, within the
width of its widest bin (:data:`KS_RESOLUTION`) of the exact one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd
from scipy import stats

from .._validation import check_control, check_number, get_matrix, perturbation_labels
from ..io._read import as_dask, select
from ..variables import PTS, PTS_REST, PVALS
from ._rank_genes_groups import METHODS, rank_genes_groups

logger = logging.getLogger(__name__)

#: ``obs`` columns taken for guide identities when ``guide_column`` is not given (compared case-insensitively).
GUIDE_COLUMNS = ("guide_id", "guide", "guide_ids", "guide_identity", "guide_name", "sgrna", "sgrna_id", "grna")
#: Linear bins of the pooled histogram on [0, 1]: the pooled KS statistic is exact to within 1 / this.
LINEAR_BINS = 2**14
#: Spacing (in -log10 p) of the logarithmic bins of the pooled histogram, down to ``10 ** -LOG_DECADES``.
LOG_STEP = 0.01
LOG_DECADES = 50
#: Pooled KS statistic: largest error of the histogram's value (the widest bin).
KS_RESOLUTION = 1.0 / LINEAR_BINS
#: The smallest pooled p-values kept exactly (with their split and gene), for the tail of the QQ plot.
N_SMALLEST = 1000
#: Blocks of results merged per task in the summary's tree.
SPLIT_EVERY = 8
#: Options of :func:`pertscale.tl.rank_genes_groups` that :func:`calibration_check` sets itself.
OWN_OPTIONS = (
    "perturbation_column",
    "control_label",
    "method",
    "reference",
    "perturbations",
    "layer",
    "key_added",
    "groupby",
)
#: Columns of :func:`summarise_block`'s table, in order.
TABLE = ("n_tested", "n_untested", "n_sparse", "n_p05", "n_p01", "ks_statistic", "ks_pvalue", "n_discoveries")


def histogram_edges() -> np.ndarray:
    """``(n_bins + 1,)`` float64 ascending edges of the pooled p-value histogram, from 0 to 1.

    The union of :data:`LINEAR_BINS` equal bins on [0, 1] (for the
    Kolmogorov-Smirnov statistic) and bins :data:`LOG_STEP` wide in
    ``-log10 p`` down to ``10 ** -LOG_DECADES`` (for the QQ plot); below that
    one bin reaches 0. Bins are ``[e_i, e_(i+1))``, the last one closed.
    """
    log_edges = 10.0 ** -np.arange(0.0, LOG_DECADES + LOG_STEP / 2, LOG_STEP)
    return np.unique(np.concatenate([[0.0], log_edges, np.linspace(0.0, 1.0, LINEAR_BINS + 1)]))


# ---------------------------------------------------------------------------------------- the pure summary


def summarise_block(
    pvals: np.ndarray,
    nonzero: np.ndarray,
    nonzero_reference: np.ndarray,
    *,
    min_nonzero: int,
    fdr: float,
    corr_method: str,
    edges: np.ndarray,
    n_smallest: int = N_SMALLEST,
) -> dict[str, np.ndarray]:
    """What the calibration summary keeps of one block of pseudo-perturbations (no Dask inside).

    Parameters
    ----------
    pvals
        ``(n_splits, n_genes)`` float64 p-values of the block's
        pseudo-perturbations (NaN: untested).
    nonzero, nonzero_reference
        ``(n_splits, n_genes)`` cells with a non-zero value of the gene in
        the pseudo-perturbation and in its reference.
    min_nonzero
        A gene enters a split's summary when both counts are at least this
        and one is positive; the others with a p-value are counted as sparse.
    fdr
        A discovery is a gene whose adjusted p-value is below ``fdr``.
    corr_method
        ``"benjamini-hochberg"`` or ``"bonferroni"``: the adjustment, over
        the summarised genes of each split.
    edges
        Histogram edges (:func:`histogram_edges`).
    n_smallest
        How many of the smallest p-values to keep.

    Returns
    -------
    dict
        ``table``: ``(n_splits, len(TABLE))`` float64, the columns of
        :data:`TABLE` (exact, from the split's own p-values;
        :func:`scipy.stats.kstest` against Uniform(0, 1), NaN without
        p-values); ``histogram``: ``(len(edges) - 1,)`` int64 counts of the
        summarised p-values; ``smallest``: ``(k, 3)`` float64 rows ``(p,
        split row, gene)`` of the ``k <= n_smallest`` smallest of them,
        sorted.
    """
    pvals = np.asarray(pvals, dtype=np.float64)
    n_rows = pvals.shape[0]
    untested = ~np.isfinite(pvals) | ((nonzero <= 0) & (nonzero_reference <= 0))
    sparse = ~untested & ((nonzero < min_nonzero) | (nonzero_reference < min_nonzero))
    kept = ~untested & ~sparse
    table = np.full((n_rows, len(TABLE)), np.nan)
    table[:, 0] = kept.sum(axis=1)
    table[:, 1] = untested.sum(axis=1)
    table[:, 2] = sparse.sum(axis=1)
    table[:, 3] = (kept & (pvals < 0.05)).sum(axis=1)
    table[:, 4] = (kept & (pvals < 0.01)).sum(axis=1)
    for i in range(n_rows):
        q = pvals[i, kept[i]]
        table[i, 7] = int((adjust(q, corr_method) < fdr).sum())
        if q.size:
            test = stats.kstest(q, "uniform")
            table[i, 5], table[i, 6] = test.statistic, test.pvalue
    values = pvals[kept]
    bins = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, edges.size - 2)
    histogram = np.bincount(bins, minlength=edges.size - 1).astype(np.int64)
    rows, genes = np.nonzero(kept)
    smallest = np.column_stack([values, rows, genes]).astype(np.float64)
    return {"table": table, "histogram": histogram, "smallest": _smallest(smallest, n_smallest)}


def adjust(pvals: np.ndarray, corr_method: str) -> np.ndarray:
    """Benjamini-Hochberg (step-up, capped at 1) or Bonferroni adjusted p-values of one family, in its order."""
    m = pvals.size
    if corr_method == "bonferroni":
        return np.minimum(pvals * m, 1.0)
    order = np.argsort(pvals, kind="stable")
    scaled = pvals[order] * m / np.arange(1, m + 1)
    out = np.empty(m)
    out[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return out


def _smallest(rows: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` rows ``(p, split, gene)`` of smallest p, ties by split then gene: a total order, chunk-invariant."""
    if rows.shape[0] > k:
        cut = np.partition(rows[:, 0], k - 1)[k - 1]
        rows = rows[rows[:, 0] <= cut]
    order = np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))
    return rows[order[:k]]


def _block_summary(block, start, n_cells, n_reference, options):
    """:func:`summarise_block` of a block of the stacked results ``(splits, 3, genes)``, splits numbered globally."""
    block = np.asarray(block, dtype=np.float64)
    nonzero = np.rint(block[:, 1] * n_cells[:, None])
    nonzero_ref = np.rint(block[:, 2] * n_reference[:, None])
    out = summarise_block(block[:, 0], nonzero, nonzero_ref, **options)
    out["smallest"][:, 1] += start
    return out


def _merge(*parts):
    """Merge block summaries: tables stacked in split order, histograms added, smallest p-values merged."""
    return {
        "table": np.concatenate([p["table"] for p in parts], axis=0),
        "histogram": np.sum([p["histogram"] for p in parts], axis=0),
        "smallest": _smallest(np.concatenate([p["smallest"] for p in parts], axis=0), N_SMALLEST),
    }


def pooled_ks(histogram: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
    """Kolmogorov-Smirnov statistic against Uniform(0, 1) of the p-values binned in ``histogram``, and its p-value.

    ``D = sup |F_n(x) - x|`` read at the bin edges, where the empirical CDF is
    known: within the widest bin (:data:`KS_RESOLUTION`) of the exact
    statistic. The p-value is the exact two-sided distribution's
    (:data:`scipy.stats.kstwo`) for ``n = histogram.sum()``.
    """
    n = int(histogram.sum())
    if n == 0:
        return float("nan"), float("nan")
    below = np.concatenate([[0], np.cumsum(histogram)]) / n  # F_n just below each edge
    d = float(np.max(np.abs(below - edges)))
    return d, float(stats.kstwo.sf(d, n))


# ------------------------------------------------------------------------------------------------ the result


@dataclass(frozen=True)
class CalibrationResult:
    """The calibration check's summary: per pseudo-perturbation, pooled, and what the QQ plot needs.

    Attributes
    ----------
    splits
        One row per pseudo-perturbation (index: its name, the guide's for
        guide splits): ``guide`` (the guide, or ``""``), ``n_cells``,
        ``n_reference`` (cells it was tested against), ``n_tested`` (genes
        in its summary), ``n_untested`` (NaN p-value, or no non-zero value
        on either side), ``n_sparse`` (fewer than ``min_nonzero`` non-zero
        cells on a side), ``frac_p05`` and ``frac_p01`` (fraction of the
        tested genes' p-values below 0.05 and 0.01), ``ks_statistic`` and
        ``ks_pvalue`` (:func:`scipy.stats.kstest` against Uniform(0, 1)),
        ``n_discoveries`` (genes whose p-value adjusted within the split,
        over its summarised genes, is below ``fdr``; expected about 0).
    pooled
        The same over every split's p-values (``n_cells``, ``n_reference``:
        sums; fractions and counts exact; the KS statistic from
        :attr:`histogram`, within :data:`KS_RESOLUTION`), plus
        ``n_splits`` and ``ks_resolution``.
    histogram, edges
        ``(n_bins,)`` int64 counts of the pooled p-values in the bins
        ``[edges[i], edges[i + 1])`` (:func:`histogram_edges`).
    smallest
        The :data:`N_SMALLEST` smallest pooled p-values: columns ``split``,
        ``gene``, ``pvals``, ascending.
    info
        How the splits were made and tested: ``method``, ``reference``
        (``"rest"``: each split against every other control cell;
        ``"control"``: against the held-out control cells), ``design``
        (``"guides"`` or ``"random"``), ``guide_column``, ``n_control``,
        ``n_heldout``, ``seed``, ``fdr``, ``min_nonzero``.
    """

    splits: pd.DataFrame
    pooled: pd.Series
    histogram: np.ndarray
    edges: np.ndarray
    smallest: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        """The test checked (``info['method']``)."""
        return str(self.info.get("method", ""))

    def to_stored(self) -> dict[str, Any]:
        """The form kept in the result store (what anndata writes): tables, arrays and a dict of scalars."""
        return {
            "splits": self.splits,
            "pooled": self.pooled.to_frame().T,
            "histogram": self.histogram,
            "edges": self.edges,
            "smallest": self.smallest,
            "info": dict(self.info),
        }

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> CalibrationResult:
        """The result from its stored form (:meth:`to_stored`, or as read back from a file)."""
        pooled = stored["pooled"]
        pooled = pooled.iloc[0] if isinstance(pooled, pd.DataFrame) else pd.Series(pooled)
        smallest = pd.DataFrame(stored["smallest"])
        return cls(
            splits=pd.DataFrame(stored["splits"]),
            pooled=pooled.rename("pooled"),
            histogram=np.asarray(stored["histogram"], dtype=np.int64),
            edges=np.asarray(stored["edges"], dtype=np.float64),
            smallest=smallest,
            info={k: (v.item() if isinstance(v, np.generic) else v) for k, v in dict(stored["info"]).items()},
        )

    def qq(self, *, max_points: int = 2000, level: float = 0.95) -> pd.DataFrame:
        """Points of the QQ plot of the pooled p-values against Uniform(0, 1), with a pointwise band.

        The ``i``-th smallest of ``n`` uniform p-values is ``Beta(i, n - i + 1)``:
        ``expected`` is its mean ``i / (n + 1)``, ``lower``/``upper`` its
        ``(1 -/+ level) / 2`` quantiles. ``observed`` is exact for the
        :data:`N_SMALLEST` smallest p-values and, beyond them, the upper edge
        of the histogram bin the ``i``-th smallest falls in (bins 2.3 %
        wide in p or narrower). Thinned to about ``max_points`` points evenly
        spread in ``log10(rank)``.

        Returns
        -------
        pandas.DataFrame
            Columns ``rank``, ``expected``, ``observed``, ``lower``, ``upper``,
            ascending in rank.
        """
        n = int(self.histogram.sum())
        if n == 0:
            return pd.DataFrame(columns=["rank", "expected", "observed", "lower", "upper"], dtype=np.float64)
        exact = np.asarray(self.smallest["pvals"], dtype=np.float64)
        ranks = [np.arange(1, exact.size + 1, dtype=np.float64)]
        observed = [exact]
        cumulative = np.cumsum(self.histogram)
        beyond = (self.histogram > 0) & (cumulative > exact.size)
        ranks.append(cumulative[beyond].astype(np.float64))
        observed.append(self.edges[1:][beyond])
        rank = np.concatenate(ranks)
        obs = np.concatenate(observed)
        if rank.size > max_points:  # one point per bin of log10(rank), the first in it
            cell = np.floor(np.log10(rank) / (np.log10(n) + 1e-12) * max_points)
            _, first = np.unique(cell, return_index=True)
            rank, obs = rank[first], obs[first]
        alpha = (1.0 - level) / 2
        return pd.DataFrame(
            {
                "rank": rank,
                "expected": rank / (n + 1),
                "observed": obs,
                "lower": stats.beta.ppf(alpha, rank, n - rank + 1),
                "upper": stats.beta.ppf(1 - alpha, rank, n - rank + 1),
            }
        )

    def qq_frame(self, *, max_points: int = 2000, level: float = 0.95) -> pd.DataFrame:
        """:meth:`qq` with the pooled figures and the design as constant columns: a table the QQ plot reads alone.

        Columns of :meth:`qq`, then ``n_pvalues``, ``n_splits``, ``frac_p05``,
        ``frac_p01``, ``ks_pvalue``, ``n_discoveries``, ``method``, ``design``
        and ``reference``; frames of several results concatenated (and
        written, e.g. to Parquet) are drawn by
        :func:`pertscale.pl.calibration_qq`, one curve per ``method``.
        """
        p = self.pooled
        return self.qq(max_points=max_points, level=level).assign(
            n_pvalues=int(self.histogram.sum()),
            n_splits=int(p["n_splits"]),
            frac_p05=float(p["frac_p05"]),
            frac_p01=float(p["frac_p01"]),
            ks_pvalue=float(p["ks_pvalue"]),
            n_discoveries=int(p["n_discoveries"]),
            method=self.method,
            design=str(self.info.get("design", "")),
            reference=str(self.info.get("reference", "")),
        )

    def __repr__(self) -> str:
        """One line: the method, the splits and the pooled figures."""
        p = self.pooled
        return (
            f"CalibrationResult({self.method}, {len(self.splits)} splits ({self.info.get('design', '')}) against "
            f"{self.info.get('reference', '')}: {int(p['n_tested'])} p-values, p<0.05 {p['frac_p05']:.4f}, "
            f"p<0.01 {p['frac_p01']:.4f}, KS D={p['ks_statistic']:.4f} p={p['ks_pvalue']:.3g}, "
            f"{int(p['n_discoveries'])} discoveries at FDR {self.info.get('fdr', '')})"
        )


# -------------------------------------------------------------------------------------------- making splits


@dataclass(frozen=True)
class Splits:
    """Pseudo-perturbations made of control cells.

    Attributes
    ----------
    names
        ``(n_splits,)`` their labels, in results order.
    codes
        ``(n_control,)`` int64: each control cell's split (position in
        ``names``), -1 for held-out cells.
    guides
        ``(n_splits,)`` the guide of each split (``""`` for random splits).
    design
        ``"guides"`` or ``"random"``.
    """

    names: list[str]
    codes: np.ndarray
    guides: list[str]
    design: str

    @property
    def sizes(self) -> np.ndarray:
        """``(n_splits,)`` cells per split."""
        return np.bincount(self.codes[self.codes >= 0], minlength=len(self.names)).astype(np.int64)

    @property
    def n_heldout(self) -> int:
        """Control cells in no split."""
        return int((self.codes < 0).sum())


def find_guide_column(obs: pd.DataFrame, guide_column, *, control: np.ndarray, perturbation_column: str) -> str | None:
    """The ``obs`` column of guide identities: ``guide_column``, or one of :data:`GUIDE_COLUMNS` found; ``None``.

    Raises
    ------
    KeyError
        If ``guide_column`` is given and absent (the message lists the
        columns and says how to split at random instead).
    TypeError
        If ``guide_column`` is neither a name, ``None`` nor ``False``.
    """
    if guide_column is False:
        return None
    if guide_column is not None and not isinstance(guide_column, str):
        raise TypeError(
            f"guide_column must be an obs column name, None (detect one) or False (random splits), not {guide_column!r}"
        )
    if guide_column is not None:
        if guide_column not in obs.columns:
            raise KeyError(
                f"guide_column {guide_column!r} not found in obs; columns present: {list(obs.columns)[:30]}. "
                "Name the column of guide identities, or pass guide_column=False to split the control cells at random"
            )
        return str(guide_column)
    lower = {str(c).lower(): str(c) for c in obs.columns if str(c) != perturbation_column}
    for name in GUIDE_COLUMNS:
        column = lower.get(name)
        if column is not None and obs[column][control].dropna().nunique() >= 2:
            logger.info(
                "calibration_check: guide identities taken from obs[%r] (detected; guide_column=False splits the "
                "control cells at random instead)",
                column,
            )
            return column
    return None


def guide_splits(guides: pd.Series, *, heldout: bool, min_cells: int, seed: int, guide_column: str) -> Splits:
    """One pseudo-perturbation per guide of the control cells.

    With ``heldout`` (the held-out design), guides are taken in a seeded
    random order into the held-out control until it holds at least as many
    cells as the largest guide left to test; without it every guide is
    tested. Guides with fewer than ``min_cells`` cells, and cells without a
    guide, are held out.

    Raises
    ------
    ValueError
        If fewer than two guides have ``min_cells`` cells, or (without
        ``heldout``) a guide holds more than half of the control cells.
    """
    missing = guides.isna().to_numpy()
    values = np.where(missing, "", guides.astype(object).to_numpy().astype(str))
    counts = pd.Series(values[~missing]).value_counts()
    usable = sorted(str(g) for g in counts.index[counts >= min_cells])
    small = sorted(str(g) for g in counts.index[counts < min_cells])
    if small:
        logger.info(
            "calibration_check: %d guide(s) with fewer than %d control cells are held out: %s",
            len(small),
            min_cells,
            small[:10],
        )
    if len(usable) < 2:
        raise ValueError(
            f"obs[{guide_column!r}] has {len(usable)} guide(s) with at least {min_cells} control cells "
            f"({dict(counts.head(5))}): a guide-level calibration check needs at least two; pass guide_column=False "
            "to split the control cells at random"
        )
    n_control = values.size
    tested = usable
    if heldout:
        order = [usable[i] for i in np.random.default_rng(seed).permutation(len(usable))]
        held: list[str] = []
        while order and sum(int(counts[g]) for g in held) < max(int(counts[g]) for g in order):
            held.append(order.pop(0))
        if not order:
            raise ValueError(
                f"the {len(usable)} guides of obs[{guide_column!r}] cannot be split into tested guides and a held-out "
                "control at least as large as the largest tested guide; pass guide_column=False to split the control "
                "cells at random, or use a method that tests against the rest (method='wilcoxon' or 't-test')"
            )
        tested = sorted(order)
    else:
        big = [g for g in tested if 2 * int(counts[g]) > n_control]
        if big:
            raise ValueError(
                f"guide(s) {big} hold more than half of the {n_control} control cells: their rest would be smaller "
                "than the guide; pass guide_column=False to split the control cells at random"
            )
    code_of = {g: i for i, g in enumerate(tested)}
    codes = np.where(missing, -1, pd.Series(values).map(code_of).fillna(-1).to_numpy()).astype(np.int64)
    return Splits(names=list(tested), codes=codes, guides=list(tested), design="guides")


def random_splits(
    n_control: int,
    *,
    sizes_seen: np.ndarray,
    n_splits: int | None,
    group_size: int | None,
    seed: int,
    min_cells: int,
) -> Splits:
    """Disjoint random groups of control cells, of the real perturbations' sizes, and a held-out control.

    Sizes are drawn (seeded, with replacement) from ``sizes_seen`` (or are
    all ``group_size``); the cells of a seeded permutation of the control
    are cut into groups of those sizes. The cells in no group, the held-out
    control, must be at least as many as the largest group. Without
    ``n_splits``, groups are drawn until the next would not leave that
    held-out control, and sizes drawn from ``sizes_seen`` are capped at a
    quarter of the control cells (logged), so that a control about as large
    as the perturbations still holds three splits.

    Raises
    ------
    ValueError
        If the control cells are too few (saying how many are needed and how
        many there are), or no perturbation size is known.
    """
    rng = np.random.default_rng(seed)
    if group_size is not None:
        pool = np.array([group_size], dtype=np.int64)
        source = f"group_size={group_size}"
    else:
        pool = np.asarray(sizes_seen, dtype=np.int64)
        pool = pool[pool >= min_cells]
        if pool.size == 0:
            raise ValueError(
                "no perturbation has enough cells to take a size from; pass group_size= (cells per pseudo-perturbation)"
            )
        source = f"the sizes of the {pool.size} perturbations (median {int(np.median(pool))})"
        if n_splits is None and pool.max() > n_control // 4:  # a control about as large as the perturbations
            cap = max(n_control // 4, min_cells)
            logger.info(
                "calibration_check: split sizes drawn from the perturbations' are capped at %d (a quarter of the "
                "%d control cells), so that at least three splits and a held-out control fit",
                cap,
                n_control,
            )
            pool = np.minimum(pool, cap)
            source += f", capped at {cap}"
    if n_splits is not None:
        sizes = rng.choice(pool, size=n_splits, replace=True)
        needed = int(sizes.sum() + sizes.max())
        if needed > n_control:
            raise ValueError(
                f"{n_splits} pseudo-perturbations of {source} need {needed:,} control cells ({int(sizes.sum()):,} in "
                f"the splits and {int(sizes.max()):,} held out, as many as the largest split); there are "
                f"{n_control:,}: lower n_splits or group_size"
            )
    else:
        drawn: list[int] = []
        while True:
            s = int(rng.choice(pool))
            if sum(drawn) + s + max(drawn + [s]) > n_control:
                break
            drawn.append(s)
        sizes = np.asarray(drawn, dtype=np.int64)
        if sizes.size < 2:
            fit = max(n_control // max(int(np.median(pool)) // 4, min_cells) - 1, 2)
            raise ValueError(
                f"the {n_control:,} control cells hold {sizes.size} pseudo-perturbation(s) of {source} and a held-out "
                f"control at least as large as the largest split; at least two are needed: pass a smaller group_size "
                f"(e.g. group_size={max(n_control // (fit + 1), min_cells)} gives {fit}) or guide_column=..."
            )
    order = rng.permutation(n_control)
    codes = np.full(n_control, -1, dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        codes[order[a:b]] = i
    width = len(str(len(sizes) - 1))
    names = [f"split_{i:0{width}d}" for i in range(len(sizes))]
    return Splits(names=names, codes=codes, guides=[""] * len(names), design="random")


# ----------------------------------------------------------------------------------------------- the analysis


def calibration_check(
    adata: ad.AnnData,
    *,
    perturbation_column: str,
    control_label: str,
    method: str = "wilcoxon",
    n_splits: int | None = None,
    group_size: int | None = None,
    guide_column: str | bool | None = None,
    reference: str | None = None,
    fdr: float = 0.05,
    min_nonzero: int = 0,
    seed: int = 0,
    layer: str | None = None,
    key_added: str = "calibration",
    force: bool = False,
    **test_options,
) -> CalibrationResult:
    """Check that a test's p-values are uniform on pseudo-perturbations made of control cells only.

    The control cells are cut into pseudo-perturbations (splits) that no
    guide perturbed, each is tested by :func:`pertscale.tl.rank_genes_groups`
    with the same options as the real analysis, and the p-values are
    compared with Uniform(0, 1): a calibrated test gives about 5 % below
    0.05, a Kolmogorov-Smirnov test that does not reject, and about no
    discoveries.

    Parameters
    ----------
    adata
        ``n_obs x n_vars``, prepared as for the real analysis: log1p-normalized
        ``X`` for the Wilcoxon and t-tests (:func:`pertscale.pp.normalize_total`,
        :func:`pertscale.pp.log1p`), raw counts (``layer="counts"``) with size
        factors and dispersions made (:func:`pertscale.pp.size_factors`,
        :func:`pertscale.tl.dispersions`) for nb-glm. Lazy or in memory; only
        the control cells are read.
    perturbation_column, control_label
        The column of perturbation labels and the control's label: the
        control cells are the only cells used; the other labels give the
        sizes of random splits.
    method
        The test, as :func:`pertscale.tl.rank_genes_groups`'s ``method``.
    n_splits
        Random splits: how many (default: as many as the control holds
        while keeping the held-out control; sizes drawn from the
        perturbations' are then capped at a quarter of the control cells).
        Not with guide splits.
    group_size
        Random splits: cells per split (default: each split's size is drawn
        from the sizes of the real perturbations, seeded).
    guide_column
        ``obs`` column of guide identities: one split per non-targeting
        guide of the control cells. ``None`` (default) takes one of
        :data:`GUIDE_COLUMNS` when present (logged; when its guides cannot
        make the splits, e.g. fewer than two, random splits are made
        instead, logged); ``False`` always splits at random.
    reference
        What each split is tested against. ``"rest"``: every other control
        cell (the other splits' and the held-out ones), as SCEPTRE's
        low-MOI calibration check; the default for the Wilcoxon and
        t-tests. ``"control"``: the held-out control cells (those in no
        split), the real analysis's ``reference="control"`` path; the
        default, and the only choice, for nb-glm.
    fdr
        A split's discoveries are its genes whose adjusted p-value is below
        ``fdr``: the real analysis's adjustment (``corr_method``,
        Benjamini-Hochberg by default) within each perturbation, over the
        genes summarised (with ``min_nonzero=0`` those the real analysis
        adjusts over, less the genes with no non-zero value on either side).
    min_nonzero
        Summarise only the genes with at least this many cells with a
        non-zero value both in the split and in its reference (SCEPTRE's
        pairwise QC, ``n_nonzero_trt_thresh = n_nonzero_cntrl_thresh = 7``);
        the others are counted as ``n_sparse``. The test itself is
        unchanged. 0 (default): every gene with a non-zero value on either
        side.
    seed
        Seed of the random splits (and of the held-out guides with
        ``reference="control"``): equal seeds make equal splits.
    layer
        Test ``layers[layer]`` instead of ``X`` (``"counts"`` for nb-glm).
    key_added
        Readable name of the result in the store.
    force
        Check again even when a result with equal settings is stored.
    **test_options
        Any other option of :func:`pertscale.tl.rank_genes_groups`
        (``tie_correct``, ``min_pct``, ``corr_method``, ``size_factors``,
        ``covariates``...), passed to it unchanged. ``size_factors`` given
        as an array is of every cell of ``adata``.

    Returns
    -------
    CalibrationResult
        Per-split table, pooled summary, the pooled p-values' histogram and
        smallest values (:meth:`CalibrationResult.qq`,
        :func:`pertscale.pl.calibration_qq`). Also stored in ``adata``'s
        result store, keyed by its settings
        (:class:`pertscale.analysis.CalibrationSettings`): asked again with
        equal settings and unchanged input, the stored result is returned.

    Raises
    ------
    KeyError
        If ``perturbation_column``, ``guide_column`` or ``layer`` is missing.
    TypeError
        If ``guide_column`` is neither a name, ``None`` nor ``False``.
    ValueError
        If ``method`` is unknown, ``reference`` is not ``"rest"`` or
        ``"control"`` (or is ``"rest"`` with nb-glm), ``control_label`` is
        not found, the control cells are too few for the splits and a
        held-out control at least as large as the largest split (the message
        says how many are needed and how many there are), fewer than two
        guides can be tested, ``n_splits``/``group_size`` are given with guide
        splits, a number is out of range, or ``test_options`` sets an option
        the check sets itself; and whatever
        :func:`pertscale.tl.rank_genes_groups` refuses. Raised before any
        pass over the matrix.

    Notes
    -----
    **Splits.** With guide identities, each non-targeting guide's control
    cells are one split (SCEPTRE's undercover idea at the level of single
    guides; a guide with its own effect shows as a split with discoveries).
    Otherwise the control cells, in a seeded random order, are cut into
    groups whose sizes are drawn from the real perturbations' sizes, so that
    each split is as large as a perturbation the real analysis tests. The
    cells in no split are the held-out control, at least as large as the
    largest split; without ``n_splits``, splits are drawn until one more
    would leave less. With guides and ``reference="control"``, guides taken
    in a seeded random order are held out until they hold as many cells as
    the largest guide left, and the others are tested.

    **One call for every split.** All splits are labelled in one column of
    an AnnData of the control cells (the matrix sliced lazily, block by
    block) and tested by one :func:`~pertscale.tl.rank_genes_groups` call:
    with ``reference="rest"`` the engine summarises every control cell once
    (the frozen summary broadcast to every block, as the control's is) and
    each block takes its splits' own cells out of it, so each split is
    tested against all the other control cells exactly, without a summary
    per split; with ``reference="control"`` the held-out cells carry the
    control label, their summary is the frozen control summary, and every
    split is tested against that one complement (the complement of all
    splits, not of each). nb-glm has no test against the rest (its frozen
    intercept is fitted on the control), so it uses the held-out design,
    with the dispersions and size factors of the real analysis (those
    stored for ``perturbation_column``, made on every cell).

    **Summary.** Genes whose p-value is NaN or that have no non-zero value
    on either side are untested (Welch's t-test gives them p = 1 by
    convention, which is not evidence) and counted. The split's figures use
    its own p-values exactly; the pooled Kolmogorov-Smirnov statistic comes
    from a histogram (within :data:`KS_RESOLUTION`), the pooled fractions
    and discoveries are exact. KS p-values assume independent p-values;
    genes are correlated and splits share their reference, so they are a
    yardstick, not an exact test.

    **Differences from pysceptre 0.6.0's** ``run_calibration_check``
    (SCEPTRE, Barry et al. 2024). SCEPTRE's synthetic targets are unions of
    ``calibration_group_size`` non-targeting guides (the median number of
    guides per real target), drawn as distinct random combinations that may
    share guides; here a split is one guide or a random group of the size
    of a real perturbation, and splits are disjoint. In low MOI
    (``control_group="nt_cells"``) SCEPTRE tests each synthetic target
    against the remaining non-targeting cells, as ``reference="rest"`` does
    here. SCEPTRE tests sampled (gene, target) pairs that pass its pairwise
    QC (at least 7 non-zero cells on each side), with its resampling-based
    score test; here every gene of every split is tested by the real
    analysis's test and ``min_nonzero`` applies SCEPTRE's QC to the summary
    only. SCEPTRE reports the p-values and its discoveries at
    ``multiple_testing_alpha`` (default 0.1, Benjamini-Hochberg over all
    pairs together); here discoveries are counted within each split, as the
    real analysis adjusts within each perturbation, and the uniformity is
    summarised (fractions, KS) rather than left to a QQ plot alone.

    **Sparse genes.** The asymptotic tests are least accurate on genes with
    a few non-zero cells: Welch's t-test of a gene absent from one side takes
    its variance from the other side only and is anti-conservative (on the
    papalexi control cells, random splits of 100 cells, every gene: 9.5 % of
    p-values below 0.01); the Wilcoxon test's normal approximation gives
    p-values on few values and, in the upper tail, too small ones (5 times a
    permutation test's for genes with 8 to 11 non-zero cells in a split of
    100). SCEPTRE's QC exists for this; ``min_nonzero`` shows how much of a
    deviation comes from such genes (``min_nonzero=7``: fractions nominal
    and KS p > 0.01 for both tests on both real screens, seed 0). nb-glm's
    Wald test is conservative on genes below about 0.2 counts a cell
    (papalexi: 3 % below 0.05).

    Computes: the test's p-values (one pass over the control cells) and
    their summary, with a plain :func:`dask.compute` on the scheduler the
    enclosing face chose; what it gathers is per split and per bin, never
    ``splits x genes``.

    Examples
    --------
    >>> ps.pp.normalize_total(adata); ps.pp.log1p(adata)  # doctest: +SKIP
    >>> res = ps.tl.calibration_check(adata, perturbation_column="gene", control_label="NT")  # doctest: +SKIP
    >>> res.pooled[["frac_p05", "ks_pvalue", "n_discoveries"]]  # doctest: +SKIP
    >>> ps.pl.calibration_qq(res)  # doctest: +SKIP
    """
    from ..analysis import CalibrationSettings, build
    from ..store import cached

    if method not in METHODS:
        raise ValueError(f"method {method!r} is not available; choose one of {tuple(METHODS)}")
    reference = _reference(method, reference)
    fdr = check_number(fdr, "fdr", minimum=0, maximum=1, min_open=True, max_open=True)
    min_nonzero = check_number(min_nonzero, "min_nonzero", integer=True, minimum=0)
    seed = check_number(seed, "seed", integer=True, minimum=0)
    n_splits = check_number(n_splits, "n_splits", integer=True, minimum=1, allow_none=True)
    min_cells = check_number(
        test_options.get("min_cells_per_perturbation", 2), "min_cells_per_perturbation", integer=True, minimum=1
    )
    group_size = check_number(group_size, "group_size", integer=True, minimum=max(min_cells, 2), allow_none=True)
    clash = sorted(set(test_options) & set(OWN_OPTIONS))
    if clash:
        raise ValueError(
            f"{clash} are set by calibration_check itself (it tests its own splits of the control cells); "
            "leave them out of the options"
        )
    get_matrix(adata, layer)  # a missing layer is a KeyError naming the layers there are
    labels = perturbation_labels(adata.obs, perturbation_column)
    control = check_control(labels, control_label, perturbation_column)
    column = find_guide_column(adata.obs, guide_column, control=control, perturbation_column=perturbation_column)
    if column is not None:
        if n_splits is not None or group_size is not None:
            raise ValueError(
                f"n_splits and group_size make random splits, but the splits are the guides of obs[{column!r}]"
                f"{' (detected)' if guide_column is None else ''}: pass guide_column=False to split the control "
                "cells at random"
            )
        try:
            splits = guide_splits(
                adata.obs[column][control],
                heldout=reference == "control",
                min_cells=min_cells,
                seed=seed,
                guide_column=column,
            )
        except ValueError as err:
            if guide_column is not None:  # asked for: say why not
                raise
            logger.info(
                "calibration_check: the guides of obs[%r] are not used (%s); random splits instead", column, err
            )
            column = None
    if column is None:
        splits = random_splits(
            int(control.sum()),
            sizes_seen=labels[~control].value_counts().to_numpy(),
            n_splits=n_splits,
            group_size=group_size,
            seed=seed,
            min_cells=min_cells,
        )
    options = dict(test_options)
    if method == "nb-glm":
        options = _nbglm_options(adata, perturbation_column, control, layer=layer, options=options)
    settings = build(
        CalibrationSettings,
        perturbation_column=perturbation_column,
        control_label=str(control_label),
        test=method,
        reference=reference,
        n_splits=n_splits,
        group_size=group_size,
        guide_column=column,
        fdr=fdr,
        min_nonzero=min_nonzero,
        seed=seed,
        layer=layer,
        test_options=_options_key(test_options),
        inputs=_inputs_digest(adata, column, control, options),
    )
    logger.info(
        "calibration_check: %d splits (%s) of %d control cells (%d held out), %s against the %s",
        len(splits.names),
        "one per guide" if splits.design == "guides" else "random",
        int(control.sum()),
        splits.n_heldout,
        method,
        "rest of the control cells" if reference == "rest" else "held-out control cells",
    )

    def run():
        result = _check(
            adata,
            splits,
            control,
            control_label=str(control_label),
            method=method,
            reference=reference,
            layer=layer,
            fdr=fdr,
            min_nonzero=min_nonzero,
            options=options,
            info={"guide_column": column or "", "seed": seed},
        )
        return result.to_stored(), []

    stored = cached(adata, settings, run, key_added=key_added, force=force)
    return CalibrationResult.from_stored(stored)


def _reference(method: str, reference: str | None) -> str:
    rest = METHODS[method].rest
    if reference is None:
        return "rest" if rest else "control"
    if reference not in ("rest", "control"):
        raise ValueError(
            f"reference {reference!r} is not supported; choose 'rest' (each split against every other control cell) "
            "or 'control' (against the held-out control cells)"
        )
    if reference == "rest" and not rest:
        raise ValueError(
            f"method={method!r} tests against the control only (its frozen intercept is fitted on the control cells): "
            "use reference='control' (the held-out control cells; the default for it)"
        )
    return reference


def _nbglm_options(adata, perturbation_column, control, *, layer, options) -> dict:
    """nb-glm's size factors (the control cells') and the real analysis's dispersions, given as arrays."""
    from ._nbglm import dispersions_for_test, size_factors_for_test

    size_factors = options.get("size_factors", "size_factors")
    sf = size_factors_for_test(adata, size_factors, method=options.get("size_factor_method", "sparse"), layer=layer)
    if options.get("dispersions") is None:
        covariates = options.get("covariates") or []
        covariates = [covariates] if isinstance(covariates, str) else list(covariates)
        alpha, _ = dispersions_for_test(
            adata,
            perturbation_column=perturbation_column,
            size_factors=size_factors,
            sf=sf,
            covariates=covariates,
            method=options.get("dispersion_method", "cox-reid"),
            layer=layer,
        )
        options["dispersions"] = alpha
    if not isinstance(size_factors, str):
        options["size_factors"] = np.asarray(sf, dtype=np.float64)[control]
    return options


def _options_key(options: dict) -> str:
    """The test options as canonical JSON (arrays by a digest), for the settings."""
    from ..analysis import _plain, array_digest

    def plain(v):
        if isinstance(v, np.ndarray) or (isinstance(v, (list, tuple)) and len(v) > 16):
            return array_digest(v)
        v = _plain(v)
        return list(v) if isinstance(v, tuple) else v

    return json.dumps({k: plain(v) for k, v in sorted(options.items())}, sort_keys=True)


def _inputs_digest(adata, column, control, options) -> str:
    """Digest of what the check reads beyond the matrix and labels: guides, nb-glm's size factors and dispersions."""
    digest = hashlib.sha1()
    if column is not None:
        digest.update(pd.util.hash_pandas_object(adata.obs[column][control], index=False).to_numpy().tobytes())
    for name in ("size_factors", "dispersions"):
        value = options.get(name)
        if isinstance(value, str) and value in adata.obs:
            digest.update(np.ascontiguousarray(adata.obs[value].to_numpy(dtype=np.float64)).tobytes())
        elif value is not None and not isinstance(value, str):
            digest.update(np.ascontiguousarray(np.asarray(value, dtype=np.float64)).tobytes())
    return digest.hexdigest()[:16]


def _control_adata(adata, control, splits, *, control_label, layer, options) -> tuple[ad.AnnData, str]:
    """A new AnnData of the control cells (the tested matrix sliced lazily), its splits labelled in one column."""
    matrix = select(as_dask(get_matrix(adata, layer)), control)
    obs = adata.obs.loc[control].copy()
    label = "calibration_split"
    while label in obs.columns:
        label = f"_{label}"
    names = np.asarray(splits.names + [control_label], dtype=object)
    obs[label] = pd.Categorical(names[splits.codes], categories=list(dict.fromkeys(names.tolist())))
    uns = {k: v for k, v in adata.uns.items() if k != "pertscale"}
    records = adata.uns.get("pertscale") or {}
    uns["pertscale"] = {k: v for k, v in records.items() if k not in ("results", "history", "latest")}
    var = adata.var.copy()
    sub = ad.AnnData(
        X=matrix if layer is None else None,
        obs=obs,
        var=var,
        layers={} if layer is None else {layer: matrix},
        uns=uns,
    )
    return sub, label


def _check(adata, splits, control, *, control_label, method, reference, layer, fdr, min_nonzero, options, info):
    """Test the splits (one rank_genes_groups call) and summarise the p-values block by block (one computation)."""
    sub, label = _control_adata(adata, control, splits, control_label=control_label, layer=layer, options=options)
    has_heldout = splits.n_heldout > 0
    res = rank_genes_groups(
        sub,
        perturbation_column=label,
        control_label=control_label if has_heldout else None,
        method=method,
        reference=reference,
        perturbations=splits.names,
        layer=layer,
        **options,
    )
    n_cells = res.obs["n_cells"].to_numpy(dtype=np.float64)
    n_control = int(control.sum())
    n_reference = n_control - n_cells if reference == "rest" else np.full(n_cells.shape, float(splits.n_heldout))
    stacked = da.stack([da.asarray(res.layers[k]) for k in (PVALS, PTS, PTS_REST)], axis=1)
    stacked = stacked.rechunk({1: -1, 2: -1})
    edges = histogram_edges()
    corr_method = options.get("corr_method", "benjamini-hochberg")
    opts = {"min_nonzero": min_nonzero, "fdr": fdr, "corr_method": corr_method, "edges": edges}
    bounds = np.cumsum((0,) + stacked.chunks[0])
    level = [
        dask.delayed(_block_summary, pure=True)(block, int(a), n_cells[a:b], n_reference[a:b], opts)
        for block, a, b in zip(stacked.to_delayed().ravel(), bounds[:-1], bounds[1:], strict=True)
    ]
    while len(level) > 1:
        level = [
            dask.delayed(_merge, pure=True)(*level[i : i + SPLIT_EVERY]) for i in range(0, len(level), SPLIT_EVERY)
        ]
    (summary,) = dask.compute(level[0])
    return _result(
        summary,
        res,
        splits,
        n_cells=n_cells,
        n_reference=n_reference,
        edges=edges,
        info={
            "method": method,
            "reference": reference,
            "design": splits.design,
            "n_control": n_control,
            "n_heldout": splits.n_heldout,
            "fdr": fdr,
            "min_nonzero": min_nonzero,
            **info,
        },
    )


def _result(summary, res, splits, *, n_cells, n_reference, edges, info) -> CalibrationResult:
    table = summary["table"]
    names = list(res.obs_names)
    n_tested = table[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        frame = pd.DataFrame(
            {
                "guide": [splits.guides[splits.names.index(n)] for n in names],
                "n_cells": n_cells.astype(np.int64),
                "n_reference": np.asarray(n_reference).astype(np.int64),
                "n_tested": n_tested.astype(np.int64),
                "n_untested": table[:, 1].astype(np.int64),
                "n_sparse": table[:, 2].astype(np.int64),
                "frac_p05": table[:, 3] / n_tested,
                "frac_p01": table[:, 4] / n_tested,
                "ks_statistic": table[:, 5],
                "ks_pvalue": table[:, 6],
                "n_discoveries": table[:, 7].astype(np.int64),
            },
            index=pd.Index(names, name="split"),
        )
    histogram = np.asarray(summary["histogram"], dtype=np.int64)
    d, p = pooled_ks(histogram, edges)
    total = int(n_tested.sum())
    pooled = pd.Series(
        {
            "n_splits": float(len(names)),
            "n_cells": float(frame["n_cells"].sum()),
            "n_reference": float(frame["n_reference"].sum()),
            "n_tested": float(total),
            "n_untested": float(frame["n_untested"].sum()),
            "n_sparse": float(frame["n_sparse"].sum()),
            "frac_p05": table[:, 3].sum() / total if total else np.nan,
            "frac_p01": table[:, 4].sum() / total if total else np.nan,
            "ks_statistic": d,
            "ks_pvalue": p,
            "ks_resolution": KS_RESOLUTION,
            "n_discoveries": float(frame["n_discoveries"].sum()),
        },
        name="pooled",
    )
    small = summary["smallest"]
    genes = np.asarray(res.var_names).astype(str)
    smallest = pd.DataFrame(
        {
            "split": np.asarray(names, dtype=object)[small[:, 1].astype(np.int64)].astype(str),
            "gene": genes[small[:, 2].astype(np.int64)],
            "pvals": small[:, 0],
        }
    )
    return CalibrationResult(
        splits=frame, pooled=pooled, histogram=histogram, edges=edges, smallest=smallest, info=info
    )

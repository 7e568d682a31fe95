"""E-distance of every perturbation to control in an embedding, and its permutation E-test, out of core.

The embedding (``obsm[obsm_key]``, cells x components, in memory or a lazy
Dask array of row blocks) is read by row blocks. The control rows are
gathered once and reduced to a frozen summary
(:class:`pertscale.kernels.energy.ControlSummary`), one task whose result
every batch task reads (once per worker on a distributed cluster). The
tested perturbations' rows are brought together, each group whole in one
batch, by one Dask shuffle (:func:`dask.array.shuffle`: each row block is
split once, each batch concatenates its pieces); each batch runs the numba
kernel :func:`pertscale.kernels.energy.energy_groups` on its groups. No
task reads all cells for one perturbation, and no process holds more than
the control's rows and one batch.

Each perturbation's permutations come from its own random stream, keyed by
``(seed, perturbation name)``, and its rows reach the kernel in cell order,
so the table is the same, bit for bit, whatever the row blocks, the batches
or the scheduler.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd

from .._progress import labelled
from .._validation import check_control, check_number, label_list, perturbation_labels

logger = logging.getLogger(__name__)

#: Metrics of :func:`energy_distance` (the cell-to-cell distance the E-distance averages).
METRICS = ("sqeuclidean",)
#: Columns of the table :func:`energy_distance` returns (its index: the perturbations).
COLUMNS = ("edistance", "pvalue", "pvalue_adj", "n_cells", "n_control")
#: Most tested cells gathered into one batch task (``rows x n_comps`` float64: 8 MB at 50 components).
BATCH_CELLS = 20_000
#: Fewest tested cells per batch when the work is split for parallelism.
MIN_BATCH_CELLS = 2_000
#: Batches per worker aimed at, so that workers stay busy while batches differ in cost.
BATCHES_PER_WORKER = 4


def energy_distance(
    adata: ad.AnnData,
    *,
    perturbation_column: str,
    control_label: str,
    perturbations: Sequence[str] | None = None,
    obsm_key: str = "X_pca",
    n_comps: int | None = None,
    metric: str = "sqeuclidean",
    n_permutations: int = 1000,
    control_subsample: int | None = None,
    fdr: float = 0.05,
    seed: int = 0,
    sample_correct: bool = True,
    key_added: str = "energy_distance",
    force: bool = False,
) -> pd.DataFrame:
    """E-distance of each perturbation to the control cells in an embedding, and its permutation E-test.

    The E-distance of scPerturb (Peidli et al. 2024, Nature Methods 21:531;
    ``scperturb.edist``, ``etest``) and pertpy's ``Distance("edistance")``:
    ``E = 2 delta - sigma_P - sigma_C``, ``delta`` the mean squared
    Euclidean distance between a perturbation's cells and the control
    cells, ``sigma_P`` and ``sigma_C`` the mean distance between distinct
    cells within each set. With the squared Euclidean distance it equals
    ``2 ||mu_P - mu_C||^2 - 2 tr(S_P) / n_P - 2 tr(S_C) / n_C`` (``mu``
    the mean and ``S`` the sample covariance of each set), computed exactly
    from each set's count, sum of rows and sum of squared norms: it tests a
    shift of the mean in the embedding, not a change of spread. The
    E-test permutes the labels of the perturbation's and the control's
    cells, pooled, ``n_permutations`` times (scPerturb's ``etest``); each
    permutation costs ``O(n_P d)`` from the same sums, not a pairwise
    distance matrix (see :mod:`pertscale.kernels.energy`).

    Computes here (plain ``dask.compute``, on the scheduler of the
    enclosing face, :func:`pertscale.cluster.using`, or Dask's current one)
    and returns the table; it is also stored in ``adata``'s result store,
    keyed by :class:`pertscale.analysis.EnergyDistanceSettings`, so that the
    same call again returns it without computing.

    Parameters
    ----------
    adata
        Cells with an embedding in ``obsm[obsm_key]`` (``n_obs x n_comps``;
        numpy or a lazy Dask array) and labels in ``obs``.
    perturbation_column
        Column of ``obs`` naming each cell's perturbation.
    control_label
        Label of the control cells in that column.
    perturbations
        Labels to test, in the table's order; ``None``: every label but the
        control, sorted (labels such as ``"multiple"`` included: list the
        ones to test to leave them out).
    obsm_key
        Key of ``obsm`` holding the embedding (``"X_pca"``: made by
        :func:`pertscale.pp.pca`, or ``pertscale run --pca N``).
    n_comps
        Use the first ``n_comps`` columns of the embedding; ``None``: all.
    metric
        The distance between two cells: ``"sqeuclidean"`` (squared
        Euclidean, scPerturb's default). The Euclidean distance
        (Szekely-Rizzo energy distance, pertpy's default) is refused: it
        has no per-set sufficient statistics, so each permutation would cost
        ``O((n_P + n_C) n_P d)`` (see Notes).
    n_permutations
        Permutations of the E-test per perturbation; ``0`` computes the
        E-distances only (``pvalue`` and ``pvalue_adj`` are NaN).
    control_subsample
        Use this many control cells, drawn without replacement (seeded by
        ``seed``, logged, recorded in the settings; ``n_control`` says how
        many), instead of all: the control's rows are held whole by every
        worker. ``None``: all control cells.
    fdr
        The false discovery rate the p-values are meant for: checks that
        ``n_permutations`` can reach it (see Raises and Warns). Not a setting:
        the table does not depend on it.
    seed
        Seed of the permutations and of the control subsample. Each
        perturbation's permutations come from the stream keyed by
        ``(seed, perturbation name)``
        (:func:`pertscale.kernels.energy.group_seeds`): a perturbation's
        p-value does not depend on which others are tested nor on the
        chunking. The subsample is ``numpy.random.default_rng(seed)``'s
        choice among the control cells in cell order.
    sample_correct
        Within-set means over the ``n (n - 1)`` pairs of distinct cells
        (``True``, scPerturb's default, an unbiased estimate) or over all
        ``n^2`` pairs (``False``: then ``E = 2 ||mu_P - mu_C||^2``).
    key_added
        Readable name of the result in the store (``uns['pertscale']['latest']``).
    force
        Compute again even when a result with equal settings is stored.

    Returns
    -------
    pandas.DataFrame
        Indexed by perturbation (index name ``"perturbation"``), columns
        :data:`COLUMNS`: ``edistance`` (float64, squared embedding units),
        ``pvalue`` (float64, ``(1 + #{permutations with E >= observed}) /
        (1 + n_permutations)``), ``pvalue_adj`` (Benjamini-Hochberg over
        the tested perturbations), ``n_cells`` and ``n_control`` (int64:
        the cells of each set). A perturbation with a single cell has no
        within-set pair: with ``sample_correct`` its ``edistance`` and
        p-values are NaN (logged) and it is left out of the BH family.

    Raises
    ------
    KeyError
        If ``obsm[obsm_key]`` or the perturbation column is missing, or a
        label of ``perturbations`` has no cell.
    ValueError
        For an unknown ``metric`` or ``"euclidean"``; ``n_comps`` above the
        embedding's columns; no (or one) control cell; the control label
        among ``perturbations``; no perturbation to test; a
        ``control_subsample`` larger than the control; NaN or infinite
        values in the embedding (at compute time); or ``n_permutations``
        too small for ``fdr``: the smallest attainable p-value
        ``1 / (n_permutations + 1)`` above ``fdr`` means Benjamini-Hochberg
        can reject nothing, whatever the data.
    TypeError
        If the embedding is not a dense two-dimensional array.

    Warns
    -----
    UserWarning
        When ``1 / (n_permutations + 1) > fdr / n_perturbations``: a single
        perturbation, however strong, cannot be a discovery; at least
        ``ceil(n_perturbations / ((n_permutations + 1) fdr))`` perturbations
        at the smallest p-value are needed. The message says which
        ``n_permutations`` removes the limit.

    Notes
    -----
    Where this differs from scPerturb's ``etest`` (``runs`` permutations):
    the p-value here is ``(1 + k) / (1 + n_permutations)`` (Phipson & Smyth
    2010, Stat Appl Genet Mol Biol 9:39: a valid p-value, never 0), not
    scPerturb's ``max(k, 1) / runs``; it is corrected by Benjamini-Hochberg,
    not Holm-Sidak; the control label is not in the table (scPerturb lists
    it with E = 0); and permutations are seeded per perturbation
    (scPerturb draws from numpy's global state). ``k`` counts ties as
    scPerturb does (``>=``; pertpy's ``DistanceTest`` counts ``>``). The
    E-distances are scPerturb's ``edist`` (and ``edist_to_control``)
    values. pertpy's ``Edistance`` uses the Euclidean distance, not the
    squared one, and averages within sets over ``n (n - 1)`` pairs when it
    computes from the cells but over ``n^2`` from precomputed distances;
    its values are not comparable with these.

    Cost: one shuffle of the tested cells' rows (``n_tested x n_comps``),
    one gather of the control's, and ``O(n_permutations n_P n_comps)`` per
    perturbation. Memory per worker: the control's rows (``n_control x
    n_comps`` float64; bound it with ``control_subsample``) and one batch
    of at most :data:`BATCH_CELLS` tested cells (more for a larger
    perturbation, which stays whole).
    """
    from ..analysis import EnergyDistanceSettings, array_digest, build
    from ..store import cached

    plan = _plan(
        adata,
        perturbation_column=perturbation_column,
        control_label=control_label,
        perturbations=perturbations,
        obsm_key=obsm_key,
        n_comps=n_comps,
        metric=metric,
        n_permutations=n_permutations,
        control_subsample=control_subsample,
        fdr=fdr,
        seed=seed,
    )
    embedding = plan["embedding"]
    token = f"dask:{embedding.name}" if isinstance(embedding, da.Array) else array_digest(embedding)
    settings = build(
        EnergyDistanceSettings,
        perturbation_column=perturbation_column,
        control_label=control_label,
        perturbations=None if perturbations is None else plan["names"],
        obsm_key=obsm_key,
        n_comps=n_comps,
        metric=metric,
        n_permutations=plan["n_permutations"],
        control_subsample=control_subsample,
        seed=plan["seed"],
        sample_correct=bool(sample_correct),
        embedding=token,
    )

    def run():
        return _energy_table(plan, sample_correct=bool(sample_correct)), []

    return cached(adata, settings, run, key_added=key_added, force=force)


def _plan(
    adata,
    *,
    perturbation_column,
    control_label,
    perturbations,
    obsm_key,
    n_comps,
    metric,
    n_permutations,
    control_subsample,
    fdr,
    seed,
) -> dict:
    """Check every input before any computing; return what :func:`_energy_table` needs."""
    if metric == "euclidean":
        raise ValueError(
            "metric='euclidean' (the Szekely-Rizzo energy distance, pertpy's Edistance) is not supported: it has no "
            "per-set sufficient statistics, so the E-distance costs n_P x n_control distances and each permutation "
            "n_P x (n_P + n_control); use metric='sqeuclidean' (scPerturb's default), or pertpy on a subsample"
        )
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not known; use one of {', '.join(map(repr, METRICS))}")
    n_permutations = check_number(n_permutations, "n_permutations", integer=True, minimum=0)
    fdr = check_number(fdr, "fdr", minimum=0.0, maximum=1.0, min_open=True, max_open=True)
    seed = check_number(seed, "seed", integer=True, minimum=0)
    n_comps = check_number(n_comps, "n_comps", integer=True, minimum=1, allow_none=True)
    control_subsample = check_number(control_subsample, "control_subsample", integer=True, minimum=2, allow_none=True)
    x = _embedding(adata, obsm_key, n_comps)

    labels = perturbation_labels(adata.obs, perturbation_column)
    control = check_control(labels, control_label, perturbation_column, min_cells=2)
    counts = labels.value_counts()
    if perturbations is None:
        names = sorted(str(n) for n in counts.index if n != str(control_label))
    else:
        names = label_list(perturbations, "perturbations")
        if str(control_label) in names:
            raise ValueError(
                f"perturbations lists the control label {control_label!r}: the control is what each perturbation "
                "is compared with; leave it out"
            )
        missing = [n for n in names if n not in counts.index]
        if missing:
            raise KeyError(
                f"perturbations {missing[:5]} have no cell in obs[{perturbation_column!r}]; "
                f"labels seen: {', '.join(map(repr, counts.index[:20]))}"
            )
        if len(set(names)) != len(names):
            raise ValueError("perturbations lists a label twice; give each once")
    if not names:
        raise ValueError(
            f"no perturbation to test: obs[{perturbation_column!r}] holds only the control label {control_label!r}"
        )
    control_rows = np.flatnonzero(control)
    n_control = control_rows.size
    if control_subsample is not None:
        if control_subsample > n_control:
            raise ValueError(
                f"control_subsample={control_subsample:,} is larger than the control ({n_control:,} cells labelled "
                f"{control_label!r}); pass control_subsample={n_control:,} or fewer, or None for all of them"
            )
        pick = np.random.default_rng(seed).choice(n_control, size=control_subsample, replace=False)
        control_rows = np.sort(control_rows[pick])
        logger.info(
            "energy_distance: control_subsample=%d of %d control cells, drawn with seed %d",
            control_subsample,
            n_control,
            seed,
        )
    if n_permutations > 0:
        _check_resolution(n_permutations, fdr, len(names))

    codes = pd.Categorical(labels.to_numpy(), categories=names).codes  # -1: not tested
    order = np.argsort(codes, kind="stable")  # cells by tested perturbation, each in cell order
    order = order[codes[order] >= 0]
    sizes = np.bincount(codes[codes >= 0], minlength=len(names)).astype(np.int64)
    return {
        "embedding": adata.obsm[obsm_key],
        "x": x,
        "names": names,
        "sizes": sizes,
        "order": order,
        "control_rows": control_rows,
        "n_permutations": n_permutations,
        "seed": seed,
    }


def _check_resolution(n_permutations: int, fdr: float, n_tests: int) -> None:
    """Refuse permutations that cannot reach ``fdr`` at all; warn when a lone perturbation cannot."""
    smallest = 1.0 / (n_permutations + 1)
    if smallest > fdr:
        raise ValueError(
            f"n_permutations={n_permutations} cannot reach fdr={fdr:g}: the smallest p-value it can give, "
            f"1/(n_permutations + 1) = {smallest:.3g}, is above fdr, so nothing can be called; pass "
            f"n_permutations={math.ceil(1 / fdr) - 1} or more (or n_permutations=0 for the E-distances alone)"
        )
    if smallest > fdr / n_tests:
        needed = math.ceil(n_tests / ((n_permutations + 1) * fdr))
        enough = math.ceil(n_tests / fdr) - 1
        warnings.warn(
            f"with n_permutations={n_permutations} and {n_tests} perturbations, a single perturbation cannot be "
            f"a discovery at fdr={fdr:g} (smallest p-value {smallest:.3g} > fdr/{n_tests} = {fdr / n_tests:.3g}); "
            f"at least {needed} must reach the smallest p-value together. Pass n_permutations={enough} or more "
            "for any one perturbation to be detectable on its own",
            UserWarning,
            stacklevel=3,
        )


def _embedding(adata, obsm_key: str, n_comps: int | None) -> da.Array:
    """``obsm[obsm_key][:, :n_comps]`` as a Dask array of full-width row blocks, checked."""
    if obsm_key not in adata.obsm:
        made = (
            "ps.pp.pca(adata) makes it (pertscale run --pca N writes it)"
            if obsm_key == "X_pca"
            else "compute that embedding first"
        )
        raise KeyError(f"obsm[{obsm_key!r}] not found (obsm holds {list(adata.obsm)}); {made}")
    emb = adata.obsm[obsm_key]
    if isinstance(emb, pd.DataFrame):
        emb = emb.to_numpy()
    if not isinstance(emb, da.Array):
        if not isinstance(emb, np.ndarray):
            raise TypeError(
                f"obsm[{obsm_key!r}] is a {type(emb).__name__}; the E-distance needs a dense cells x components "
                "array (numpy or Dask)"
            )
        emb = da.from_array(emb, chunks=(BATCH_CELLS, -1))
    if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.number) or np.issubdtype(emb.dtype, np.complexfloating):
        raise TypeError(f"obsm[{obsm_key!r}] must be a real two-dimensional array, got {emb.dtype} {emb.shape}")
    if any(math.isnan(c) for c in emb.chunks[0]):
        raise ValueError(f"obsm[{obsm_key!r}] has unknown row chunk sizes; call .compute_chunk_sizes() on it first")
    width = emb.shape[1]
    if n_comps is not None and n_comps > width:
        raise ValueError(
            f"n_comps={n_comps} but obsm[{obsm_key!r}] has {width} columns; pass n_comps={width} or fewer, "
            f"or compute more components (ps.pp.pca(adata, n_comps={n_comps}))"
        )
    if n_comps is not None and n_comps < width:
        emb = emb[:, :n_comps]
    return emb.rechunk({1: -1})


def _batch_rows(n_tested: int) -> int:
    """Tested cells per batch: a few batches per worker, between :data:`MIN_BATCH_CELLS` and :data:`BATCH_CELLS`."""
    import os

    from .._settings import settings

    workers = settings.n_workers or os.cpu_count() or 1
    return int(min(BATCH_CELLS, max(MIN_BATCH_CELLS, math.ceil(n_tested / (BATCHES_PER_WORKER * workers)))))


def _energy_table(plan: dict, *, sample_correct: bool) -> pd.DataFrame:
    """Build the graph (control summary, shuffle, one kernel task per batch), compute it, assemble the table."""
    from ..kernels._common import adjust_pvalues
    from ..kernels.energy import ENERGY_OUTPUTS, control_summary, energy_groups, group_seeds

    x, names, sizes, order = plan["x"], plan["names"], plan["sizes"], plan["order"]
    n_permutations, control_rows = plan["n_permutations"], plan["control_rows"]
    batch = _batch_rows(order.size)
    if x.numblocks[0] > 0 and x.shape[0] / x.numblocks[0] > 2 * batch:
        x = x.rechunk({0: batch})  # the shuffle sizes its output blocks like its input's
    # unoptimized blocks: one graph at compute, so the control's and the batches' rows share the blocks they read
    control_block = x[control_rows].rechunk({0: -1}).to_delayed(optimize_graph=False).ravel()[0]
    summary = dask.delayed(control_summary, pure=True)(control_block)

    starts = np.concatenate([[0], np.cumsum(sizes)])
    indexer = [order[a:b].tolist() for a, b in zip(starts[:-1], starts[1:], strict=True)]
    grouped = da.shuffle(x, indexer, axis=0).rechunk({1: -1})  # a perturbation larger than a block splits columns
    seeds = group_seeds(plan["seed"], names)
    bounds = np.concatenate([[0], np.cumsum(grouped.chunks[0])])
    first = np.searchsorted(starts, bounds)  # the groups of block b are first[b]:first[b + 1]
    if not np.array_equal(starts[first], bounds):
        raise AssertionError("dask's shuffle split a perturbation between blocks")  # documented never to
    tasks = []
    for b, block in enumerate(grouped.to_delayed(optimize_graph=False).ravel()):
        g0, g1 = first[b], first[b + 1]
        tasks.append(
            dask.delayed(energy_groups, pure=True)(
                block,
                starts[g0 : g1 + 1] - starts[g0],
                seeds[g0:g1],
                summary,
                n_permutations=n_permutations,
                sample_correct=sample_correct,
            )
        )
    with labelled(f"energy distance ({len(names)} perturbations, {n_permutations} permutations)"):
        parts = dask.compute(*tasks)
    out = np.concatenate(parts, axis=0) if parts else np.empty((0, len(ENERGY_OUTPUTS)))
    stats = dict(zip(ENERGY_OUTPUTS, out.T, strict=True))
    pvalue = (1.0 + stats["n_exceed"]) / (1.0 + n_permutations)
    single = [n for n, e in zip(names, stats["edistance"], strict=True) if np.isnan(e)]
    if single:
        logger.warning(
            "energy_distance: %d perturbation(s) with one cell have no E-distance with sample_correct=True "
            "(NaN, left out of the BH family): %s",
            len(single),
            ", ".join(single[:10]),
        )
    table = pd.DataFrame(
        {
            "edistance": stats["edistance"],
            "pvalue": pvalue,
            "pvalue_adj": adjust_pvalues(pvalue),
            "n_cells": sizes,
            "n_control": np.full(len(names), control_rows.size, dtype=np.int64),
        },
        index=pd.Index(names, name="perturbation", dtype=object),
    )
    logger.info(
        "energy_distance: %d perturbations against %d control cells in %d dimensions, %d permutations",
        len(names),
        control_rows.size,
        x.shape[1],
        n_permutations,
    )
    return table

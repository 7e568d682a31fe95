"""The engine of every test against control: a frozen control summary, one pass of block kernels.

A method is declared, not orchestrated (:class:`Method`): a kernel that
summarises the control cells of one range of genes, a kernel that maps one
block of whole perturbation groups plus the summary to the groups'
statistics, and the names of those statistics. This module builds the Dask
graph around them and returns the statistics lazily; nothing here computes.

1. Groups are found in one linear pass over the labels
   (:func:`find_groups`): a categorical code per cell, no scan per group.
2. The tested rows are arranged so that every block holds whole groups
   (:func:`aligned`): slices when each group is one contiguous run of rows
   (the perturbation-sorted working store of :func:`pertscale.io.prepare`,
   or any input stored by group), otherwise the working store's own sort,
   out of core and lazily (:func:`pertscale.io._prepare.sort_rows`), so that
   memory per task is bounded by a block as in ``pertscale run``.
3. The control summary is a list of parts, one per range of genes, each
   made by its own task from the control rows of that range. The parts are
   never joined into one object: the block kernel walks them range by
   range. Their keys start with :data:`SUMMARY_PREFIX`, so that the face
   that computes (:func:`pertscale.cluster.compute`) can replicate them to
   every worker once before the pass.
4. One ``blockwise`` pass maps each block to a
   ``(groups in block, statistics, genes)`` array; the statistics stay a
   Dask array, chunked by block, and are written block by block.

Against the rest of the cells (``reference="rest"``, scanpy's default) the
same engine runs with a summary of every cell in place of the control's,
made in the same parts, and the block kernel takes each group's own cells
out of it (the block holds them whole): no second pass, no summary per
group. The summary's parts are then cut so that each reads about one
block's worth of entries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp
from dask.base import tokenize

from ..kernels._common import check_reference
from ..kernels.groups import pack_groups

#: Key prefix of the control summary parts in a graph.
SUMMARY_PREFIX = "control-summary-"

#: Fewest genes per control summary part.
MIN_GENES_PER_PART = 64


@dataclass(frozen=True)
class Method:
    """A differential test of every perturbation against control, as the engine runs it.

    Attributes
    ----------
    name
        The ``method=`` value that selects it.
    statistics
        Names of the statistics, in the order of axis 1 of ``block``'s output;
        they become the layers of the results.
    summarise
        ``summarise(control, **inputs)``: the frozen summary of the control
        cells for one range of genes, from a ``(n_control, genes in range)``
        CSR matrix; ``inputs`` are the per-cell values of the control cells
        (``rows=``), the per-gene values of the range and fixed options, when
        the test is given any (see :func:`test_against_control`).
    block
        ``block(x, group_sizes, summaries, bounds, **options)``: the
        statistics of the groups of one block, ``(n_groups, len(statistics),
        n_genes)`` float64. ``x`` is ``(n_rows, n_genes)`` CSR whose rows are
        whole groups one after another, ``group_sizes`` their row counts,
        ``summaries`` the summary parts and ``bounds`` the gene ranges they
        cover (``bounds[i]:bounds[i + 1]``); with per-cell values, ``rows=``
        holds those of the block's rows.
    rest
        Whether ``block`` also tests against the rest of the cells: given
        ``reference="rest"`` and summaries of every cell, it takes each
        group's own cells out of them.
    """

    name: str
    statistics: tuple[str, ...]
    summarise: Callable[[sp.csr_matrix], Any]
    block: Callable[..., np.ndarray]
    rest: bool = False


@dataclass(frozen=True)
class Groups:
    """The cells of each tested perturbation and of the control, from one pass over the labels.

    Attributes
    ----------
    names
        Tested perturbations, in results order.
    codes
        ``(n_obs,)`` int32: each cell's position in ``names``; -1 for cells
        not tested (the control and any other label).
    sizes
        ``(n_groups,)`` int64 cells per tested perturbation.
    control_rows
        ``(n_control,)`` int64 rows of the control cells, ascending (none
        without a control label).
    """

    names: list[str]
    codes: np.ndarray
    sizes: np.ndarray
    control_rows: np.ndarray


def find_groups(labels: pd.Series, names: Sequence[str], control_label: str | None) -> Groups:
    """Codes of the tested perturbations and rows of the control, linear in cells.

    Parameters
    ----------
    labels
        ``(n_obs,)`` perturbation labels as strings.
    names
        The perturbations to test, in results order.
    control_label
        The control's label; ``None``: no control (tests against the rest).
    """
    values = labels.to_numpy()
    codes = pd.Categorical(values, categories=list(names)).codes.astype(np.int32)
    sizes = np.bincount(codes[codes >= 0], minlength=len(names)).astype(np.int64)
    if control_label is None:
        control_rows = np.empty(0, dtype=np.int64)
    else:
        control_rows = np.flatnonzero(values == str(control_label)).astype(np.int64)
    return Groups(names=list(names), codes=codes, sizes=sizes, control_rows=control_rows)


@dataclass(frozen=True)
class Aligned:
    """Tested rows arranged so that every block holds whole groups.

    Attributes
    ----------
    x
        ``(tested cells, n_genes)`` row blocks, each of whole groups.
    codes
        ``(tested cells,)`` int32 group of each row of ``x`` (positions in
        :attr:`Groups.names`).
    groups_per_block
        Number of groups in each block of ``x``.
    order
        The groups (positions in :attr:`Groups.names`) in the order they
        appear in ``x``.
    sliced
        Whether the rows were sliced (groups stored contiguously) rather
        than sorted out of core.
    rows
        ``(tested cells,)`` int64 the row of ``x``'s input each of its rows
        comes from.
    """

    x: da.Array
    codes: np.ndarray
    groups_per_block: tuple[int, ...]
    order: np.ndarray
    sliced: bool
    rows: np.ndarray


def aligned(x: da.Array, groups: Groups, *, budget: int | None = None) -> Aligned:
    """Arrange the tested rows of ``x`` in blocks of whole groups.

    When every group's rows are one contiguous run (in any order of the
    groups), the runs are sliced and re-blocked at group boundaries: no data
    moves between workers. Otherwise they are sorted out of core, as the
    working store is (:func:`pertscale.io._prepare.sort_rows`: spill files,
    then blocks; never ``dask.array.shuffle``, whose peak follows the
    largest group). Blocks hold about ``budget`` rows (default: the
    largest chunk of ``x``); a group longer than that is a block of its own.

    Parameters
    ----------
    x
        ``(n_obs, n_genes)`` Dask array of row blocks.
    groups
        From :func:`find_groups`.
    budget
        Rows per block to aim for.
    """
    budget = int(budget or max(x.chunks[0]))
    codes = groups.codes
    n_untested = int((codes < 0).sum())
    rows = np.argsort(codes, kind="stable")[n_untested:]  # tested rows, by group, ascending within a group
    ends = np.cumsum(groups.sizes)
    starts = ends - groups.sizes
    first, last = rows[starts], rows[ends - 1]
    contiguous = bool((last - first + 1 == groups.sizes).all())
    if contiguous:
        order = np.argsort(first, kind="stable")  # groups in storage order
        sizes = groups.sizes[order]
        lo, hi = first[order], last[order] + 1
        rows = np.repeat(lo - np.cumsum(np.r_[0, sizes[:-1]]), sizes) + np.arange(int(sizes.sum()))
        # adjacent runs become one slice
        breaks = np.flatnonzero(lo[1:] != hi[:-1]) + 1
        pieces = [x[int(lo[a]) : int(hi[b - 1])] for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(lo)], strict=True)]
        y = pieces[0] if len(pieces) == 1 else da.concatenate(pieces, axis=0)
        group_starts = np.concatenate([[0], np.cumsum(sizes)])
        cuts = np.cumsum((0,) + y.chunks[0])
        if not (np.isin(cuts, group_starts).all() and max(y.chunks[0]) <= max(budget, int(sizes.max()))):
            y = y.rechunk({0: pack_groups(sizes, budget), 1: -1})  # keep blocks that already hold whole groups
        elif y.numblocks[1] != 1:
            y = y.rechunk({1: -1})
    else:
        # the working store's sort, out of core and lazily: spill files, then blocks of whole groups
        # (never dask's shuffle, whose peak follows the largest group)
        from ..io._prepare import sort_rows

        order = np.arange(len(groups.names))
        sizes = groups.sizes
        position = np.full(x.shape[0], -1, dtype=np.int64)
        position[rows] = np.arange(rows.size)
        blocks = [b for b in pack_groups(sizes, budget) if b]
        y = sort_rows(x, position, np.concatenate([[0], np.cumsum(blocks)]).astype(np.int64))
    bounds = np.cumsum((0,) + y.chunks[0])
    group_starts = np.concatenate([[0], np.cumsum(sizes)])
    if not np.isin(bounds, group_starts).all():  # pragma: no cover - both paths cut at group boundaries
        raise RuntimeError("internal error: a row block splits a perturbation group")
    per_block = tuple(
        int(np.searchsorted(group_starts, b) - np.searchsorted(group_starts, a))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    )
    return Aligned(
        x=y,
        codes=np.repeat(order, sizes).astype(np.int32),
        groups_per_block=per_block,
        order=order,
        sliced=contiguous,
        rows=rows.astype(np.int64),
    )


def _summarise_part(blocks, summarise, inputs):
    return summarise(sp.vstack([sp.csr_matrix(b) for b in blocks], format="csr"), **inputs)


def control_summary(
    x: da.Array,
    control_rows: np.ndarray,
    method: Method,
    *,
    n_parts: int,
    row_values: np.ndarray | None = None,
    gene_values: dict[str, np.ndarray] | None = None,
    summary_options: dict | None = None,
) -> tuple[list, np.ndarray]:
    """The frozen control summary, lazily: one part per range of genes.

    ``control_rows`` are the rows summarised: the control's, or every row
    for a test against the rest. Each part's task reads those rows of its
    genes only, so no task
    holds the whole control matrix, and the parts are summarised in
    parallel. A sorted store makes the control rows one slice.
    ``row_values`` (``(n_obs,)`` or ``(n_obs, k)``, per cell) go to every
    part as ``rows=`` for the control cells, ``gene_values`` (``(n_genes,)``
    each) by name, cut to the part's genes, and ``summary_options`` as they
    are.

    Returns
    -------
    tuple
        ``(parts, bounds)``: the parts as ``Delayed`` objects whose keys start
        with :data:`SUMMARY_PREFIX`, and the ``(n_parts + 1,)`` gene bounds.
    """
    control_rows = np.asarray(control_rows, dtype=np.int64)
    if control_rows.size and control_rows[-1] - control_rows[0] + 1 == control_rows.size:
        ctrl = x[int(control_rows[0]) : int(control_rows[-1]) + 1]
    else:
        ctrl = x[control_rows]
    n_genes = x.shape[1]
    n_parts = max(1, min(n_parts, n_genes // MIN_GENES_PER_PART))
    bounds = np.linspace(0, n_genes, n_parts + 1).astype(np.int64)
    token = tokenize(x.name, control_rows, method.name, n_parts, row_values, gene_values, summary_options)
    cells = dict(summary_options or {})
    if row_values is not None:
        cells["rows"] = np.asarray(row_values)[control_rows]
    parts = [
        dask.delayed(_summarise_part, pure=True)(
            ctrl[:, a:b].to_delayed().ravel().tolist(),
            method.summarise,
            cells | {k: np.asarray(v)[a:b] for k, v in (gene_values or {}).items()},
            dask_key_name=f"{SUMMARY_PREFIX}{token}-{i}",
        )
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    ]
    return parts, bounds


def _block_task(block, codes, rows, method, bounds, options, *summaries):
    n_genes = block.shape[1]
    if codes.shape[0] == 0:
        return np.empty((0, len(method.statistics), n_genes), dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    sizes = np.diff(np.r_[starts, codes.shape[0]])
    extra = {} if rows is None else {"rows": rows}
    return method.block(sp.csr_matrix(block), sizes, list(summaries), bounds, **options, **extra)


def test_against_control(
    x: da.Array,
    groups: Groups,
    method: Method,
    *,
    n_parts: int = 4,
    budget: int | None = None,
    options: dict | None = None,
    row_values: np.ndarray | None = None,
    gene_values: dict[str, np.ndarray] | None = None,
    summary_options: dict | None = None,
    reference: str = "control",
) -> tuple[da.Array, Aligned]:
    """Every tested perturbation against the control (or against the rest of the cells), lazily.

    Parameters
    ----------
    x
        ``(n_obs, n_genes)`` Dask array of CSR row blocks, in the units the
        method expects.
    groups
        From :func:`find_groups`.
    method
        The test.
    n_parts
        Ranges of genes the control summary is made in.
    budget
        Rows per block (default: the largest chunk of ``x``).
    options
        Keyword arguments of ``method.block``.
    row_values
        ``(n_obs,)`` or ``(n_obs, k)`` values per cell (size factors,
        covariate levels): the control's go to ``method.summarise``, each
        block's to ``method.block``, as ``rows=``, in row order.
    gene_values
        ``(n_genes,)`` values per gene (dispersions), by name: cut to each
        summary part's genes for ``method.summarise``; ``method.block``
        takes them whole through ``options``.
    summary_options
        Keyword arguments of ``method.summarise``.
    reference
        ``"control"`` (default): the summary is of ``groups.control_rows``.
        ``"rest"``: of every row of ``x`` (scanpy's ``reference="rest"``),
        in at least ``ceil(n_obs / budget)`` parts (each part's task reads
        about one block's worth), and ``method.block`` is given
        ``reference="rest"`` to take each group's own cells out of it.

    Returns
    -------
    tuple
        ``(statistics, aligned)``: a ``(n_groups, len(method.statistics),
        n_genes)`` float64 Dask array whose rows follow ``groups.names``, one
        chunk of rows per block; and the row arrangement used.

    Raises
    ------
    ValueError
        If ``reference`` is neither ``"control"`` nor ``"rest"``, or is
        ``"rest"`` for a method that does not test against the rest.
    """
    check_reference(reference)
    summary_rows = groups.control_rows
    if reference == "rest":
        if not method.rest:
            raise ValueError(
                f"method {method.name!r} tests against the control only; use reference='control' with a "
                "control_label, or method='wilcoxon' or 't-test' to test against the rest"
            )
        summary_rows = np.arange(x.shape[0], dtype=np.int64)
        n_parts = max(n_parts, -(-x.shape[0] // int(budget or max(x.chunks[0]))))
        options = {**(options or {}), "reference": "rest"}
    parts, bounds = control_summary(
        x,
        summary_rows,
        method,
        n_parts=n_parts,
        row_values=row_values,
        gene_values=gene_values,
        summary_options=summary_options,
    )
    lay = aligned(x, groups, budget=budget)
    codes = da.from_array(lay.codes, chunks=(lay.x.chunks[0],))
    if row_values is None:
        rows: tuple = (None, None)
    else:
        per_row = np.asarray(row_values, dtype=np.float64)[lay.rows]
        chunks = (lay.x.chunks[0],) + tuple((n,) for n in per_row.shape[1:])
        rows = (da.from_array(per_row, chunks=chunks), "i" + "q"[: per_row.ndim - 1])  # q: not the genes
    # the parts go to each block task as separate arguments: each is one key, replicated on its own
    part_args = [a for part in parts for a in (part, None)]
    stats = da.blockwise(
        _block_task,
        "isj",
        lay.x,
        "ik",
        codes,
        "i",
        *rows,
        method,
        None,
        bounds,
        None,
        options or {},
        None,
        *part_args,
        new_axes={"s": len(method.statistics), "j": x.shape[1]},
        adjust_chunks={"i": lay.groups_per_block},
        concatenate=True,
        dtype=np.float64,
        meta=np.empty((0, 0, 0), dtype=np.float64),
    )
    if not np.array_equal(lay.order, np.arange(len(lay.order))):
        stats = stats[np.argsort(lay.order)]  # rows in the order of groups.names
    return stats, lay

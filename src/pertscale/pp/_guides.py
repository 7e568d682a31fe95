"""Guide assignment: each cell's perturbation label from its guide (sgRNA) UMI counts, out of core.

Three methods, each a streaming pass over row blocks of the cells x guides
count matrix (:mod:`pertscale.kernels.guides` holds the kernels and the
mathematics):

- ``"umi_threshold"``: crispat's ``ga_umi``: a guide is detected in a cell
  when it has at least ``threshold`` UMIs. One pass.
- ``"max"``: the guide with the most UMIs, when it holds at least
  ``min_fraction`` of the cell's guide UMIs (the ``label_rule`` of the
  screens in ``shared/data``). One pass.
- ``"mixture"``: crispat's Poisson-Gaussian mixture per guide (``ga_poisson_gauss``),
  fitted by EM: one pass builds every guide's histogram of non-zero UMI
  counts by tree reduction, the fit runs in memory on the histograms, and
  each guide's fit becomes a UMI threshold for the assignment pass, which
  is ``"umi_threshold"``'s with one threshold per guide. Two passes.

Memory: a task holds one row block and its per-cell output (seven numbers
per cell); the reductions hold per-guide vectors and the histograms (one
entry per distinct (guide, UMI count) pair, at most the non-zeros, in
practice a few hundred per guide). The per-cell table (``n_obs`` rows) is
gathered: it becomes ``obs`` columns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._progress import labelled
from .._validation import _listing, as_actual, check_number, label_list
from ..io._infer import is_control_alias
from ..io._read import as_dask, per_block, select
from ..kernels.guides import (
    CELL_DTYPE,
    DETECTION_ROWS,
    MULTIPLE,
    PoissonGaussFit,
    UMIHistogram,
    assign_block,
    detection_block,
    fit_poisson_gauss,
    histogram_block,
    invalid_values,
    merge_histograms,
)

logger = logging.getLogger(__name__)

METHODS = ("umi_threshold", "max", "mixture")
#: Label (and ``guide``) of a cell with several detected guides, and of a cell with none.
MULTIPLE_LABEL = "multiple"
UNASSIGNED_LABEL = "unassigned"
#: ``var`` columns of a guide-count AnnData read as the guides' targets, in this order.
TARGET_COLUMNS = ("target", "gene")
#: ``uns`` keys of the guide ids and targets of ``obsm[counts]`` (as in ``shared/data``).
IDS_KEY, TARGETS_KEY = "grna_ids", "grna_targets"

#: Columns of the per-cell table besides the label; in ``obs`` each is prefixed with ``key_added + "_"``.
GUIDE = "guide"
GUIDE_UMI_MAX = "guide_umi_max"
GUIDE_UMI_TOTAL = "guide_umi_total"
GUIDE_MAX_FRACTION = "guide_max_fraction"
N_GUIDES_DETECTED = "n_guides_detected"
CELL_COLUMNS = (GUIDE, GUIDE_UMI_MAX, GUIDE_UMI_TOTAL, GUIDE_MAX_FRACTION, N_GUIDES_DETECTED)
# the label's column in the stored table (its obs name is key_added, which is not a setting)
_LABEL = "label"

#: Blocks merged per node of the histogram tree.
SPLIT_EVERY = 8


def obs_columns(key_added: str) -> dict[str, str]:
    """``{column of the table: obs column}``: the label is ``key_added``, the rest ``f"{key_added}_{column}"``."""
    return {_LABEL: key_added} | {c: f"{key_added}_{c}" for c in CELL_COLUMNS}


@dataclass(frozen=True)
class _GuideInput:
    """The guide counts, resolved: a Dask array of CSR row blocks and what to call it."""

    x: da.Array  # rows: the cells of adata (in ``row_names`` order), columns: guides
    row_names: pd.Index  # obs names of the rows of x
    order: np.ndarray | None  # adata cell i is row order[i] of x (None: the same order)
    ids: np.ndarray  # (n_guides,) str
    targets: np.ndarray  # (n_guides,) str
    where: str  # how messages name the matrix
    name: str  # the settings' ``counts``
    token: str  # identifies the values


def _token(matrix) -> str:
    """What identifies a matrix's values: a Dask graph's name, or a BLAKE2b digest of the data."""
    if isinstance(matrix, da.Array):
        return matrix.name
    digest = hashlib.blake2b(f"{type(matrix).__name__}{matrix.shape}{matrix.dtype}".encode(), digest_size=16)
    parts = (matrix.data, matrix.indices, matrix.indptr) if sp.issparse(matrix) and hasattr(matrix, "indptr") else None
    if parts is None:
        parts = (sp.csr_matrix(matrix).data,) if sp.issparse(matrix) else (np.asarray(matrix),)
    for part in parts:
        digest.update(np.ascontiguousarray(part).view(np.uint8).ravel())
    return f"blake2b:{digest.hexdigest()}"


def _text(values, what: str) -> np.ndarray:
    """Names as an object array of ``str``; a missing name (None, NaN) is an error, not the text ``'nan'``."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{what} must be a list of names (one per guide column), got {values!r}")
    values = np.asarray(values, dtype=object).ravel()
    missing = np.flatnonzero(pd.isna(values))
    if missing.size:
        raise ValueError(
            f"{what} has {missing.size:,} missing entries (at columns {_listing(missing[:5])}); give every guide "
            "column a name"
        )
    return np.asarray([str(v) for v in values], dtype=object)


def _accepted() -> str:
    return (
        "counts must be a key of adata.obsm holding the cells x guides UMI counts (sparse, dense or Dask; "
        "guide ids in adata.uns['grna_ids'], targets in adata.uns['grna_targets'], or guide_ids=/guide_targets=), "
        "a guide-count AnnData (cells x guides, var_names the guide ids, targets in var['target'] or var['gene']), "
        "or the path of one (.h5ad or .zarr, read lazily)"
    )


def _source(adata: ad.AnnData, counts, chunk_size):
    """The guide counts and what they carry: ``(matrix, (ids, targets), origins, cells, where, name, suffix)``."""
    from ..io._read import read

    if isinstance(counts, (str, os.PathLike)) and not (isinstance(counts, str) and counts in adata.obsm):
        path = Path(counts)
        if not (path.suffix in (".h5ad", ".zarr") or path.exists()):
            keys = list(adata.obsm.keys())
            raise KeyError(f"counts {str(counts)!r} is not a key of adata.obsm (keys: {keys}); {_accepted()}")
        if not path.exists():
            raise FileNotFoundError(f"the guide-count file {str(path)!r} does not exist; {_accepted()}")
        stat = path.stat()
        counts, where = read(path, chunk_size=chunk_size), f"the guide counts in {path.name}"
        name, suffix = str(path.resolve()), f"@{stat.st_size}:{stat.st_mtime_ns}"
    elif isinstance(counts, ad.AnnData):
        where, name, suffix = "the guide-count AnnData", "<AnnData>", ""
    elif isinstance(counts, str):
        matrix = adata.obsm[counts]
        ids = adata.uns.get(IDS_KEY)
        if isinstance(matrix, pd.DataFrame):
            ids, matrix = matrix.columns, matrix.to_numpy()
        origins = (
            "its columns" if isinstance(adata.obsm[counts], pd.DataFrame) else f"adata.uns[{IDS_KEY!r}]",
            f"adata.uns[{TARGETS_KEY!r}]",
        )
        return matrix, (ids, adata.uns.get(TARGETS_KEY)), origins, None, f"obsm[{counts!r}]", counts, ""
    else:
        raise TypeError(f"counts of type {type(counts).__name__} is not accepted; {_accepted()}")
    if counts.X is None:
        raise ValueError(f"{where} has no X; its X must hold the cells x guides UMI counts")
    found = next((c for c in TARGET_COLUMNS if c in counts.var.columns), None)
    targets = counts.var[found].to_numpy() if found is not None else counts.uns.get(TARGETS_KEY)
    origins = ("its var_names", f"its var[{found!r}]" if found is not None else f"its uns[{TARGETS_KEY!r}]")
    return counts.X, (counts.var_names, targets), origins, counts.obs_names, where, name, suffix


def _match_cells(adata: ad.AnnData, cells: pd.Index, where: str):
    """``(row mask over the guide counts' cells or None, order or None)`` matching them to ``adata.obs_names``."""
    if cells.equals(adata.obs_names):
        return None, None
    if not cells.is_unique:
        repeated = cells[cells.duplicated()].unique()
        raise ValueError(
            f"{where} has repeated cell names ({_listing(repeated)}); cells are matched to adata by obs_names, "
            "which must be unique there"
        )
    index = cells.get_indexer(adata.obs_names)
    missing = adata.obs_names[index < 0]
    if len(missing):
        raise ValueError(
            f"{len(missing):,} of adata's {adata.n_obs:,} cells are not in {where} ({_listing(missing[:5])}); "
            f"its {len(cells):,} cells ({_listing(cells[:3])}) must include every cell of adata, matched by "
            "obs_names: subset adata to the cells with guide counts, or give the guide counts of these cells"
        )
    mask = np.zeros(len(cells), dtype=bool)
    mask[index] = True
    kept = np.flatnonzero(mask)
    order = np.searchsorted(kept, index)
    return mask, (None if np.array_equal(order, np.arange(adata.n_obs)) else order)


def _guide_input(adata, counts, *, guide_ids, guide_targets, chunk_size) -> _GuideInput:
    matrix, (ids, targets), origins, cells, where, name, suffix = _source(adata, counts, chunk_size)
    if getattr(matrix, "ndim", 2) != 2:
        raise ValueError(f"{where} must be 2-D (cells x guides), got shape {matrix.shape}")
    if not isinstance(matrix, da.Array) and not sp.issparse(matrix):
        matrix = np.asarray(matrix)
    dtype = np.dtype(matrix.dtype)
    if dtype.kind not in "biuf":
        raise TypeError(f"{where} holds {dtype} values; guide assignment needs raw guide UMI counts (numbers)")
    n_cells, n_guides = matrix.shape
    if n_guides == 0:
        raise ValueError(f"{where} has no guide columns; there is nothing to assign")
    if guide_ids is None and ids is None:
        raise ValueError(f"no guide ids for {where}: {origins[0]} is missing; pass guide_ids= (one per guide column)")
    if guide_targets is None and targets is None:
        raise ValueError(
            f"no guide targets for {where}: pass guide_targets= (one per guide column), or put them in "
            f"adata.uns[{TARGETS_KEY!r}] (obsm input) or a var column {' or '.join(map(repr, TARGET_COLUMNS))} "
            "of the guide-count AnnData"
        )
    resolved = {}
    for arg, given, found, origin in (
        ("guide_ids", guide_ids, ids, origins[0]),
        ("guide_targets", guide_targets, targets, origins[1]),
    ):
        values = _text(given if given is not None else found, arg if given is not None else origin)
        if len(values) != n_guides:
            what = arg if given is not None else f"{origin} (the default {arg})"
            raise ValueError(
                f"{what} has {len(values):,} entries but {where} has {n_guides:,} guide columns; give one per "
                "column, in column order"
            )
        resolved[arg] = values
    ids, targets = resolved["guide_ids"], resolved["guide_targets"]
    ids_index = pd.Index(ids)
    if not ids_index.is_unique:
        raise ValueError(
            f"guide ids repeat ({_listing(ids_index[ids_index.duplicated()].unique())}); they must be unique"
        )
    reserved = ids_index.intersection([MULTIPLE_LABEL, UNASSIGNED_LABEL])
    if len(reserved):
        raise ValueError(
            f"guide id(s) {_listing(reserved)} are the labels of cells with several or no guides; rename them"
        )
    mask = order = None
    if cells is None:
        row_names = adata.obs_names
    else:
        if n_cells != len(cells):
            raise ValueError(f"{where} has {n_cells:,} rows but {len(cells):,} cell names")
        mask, order = _match_cells(adata, pd.Index(cells), where)
        row_names = adata.obs_names if mask is None else pd.Index(cells)[mask]
    token = _token(matrix) + suffix
    x = as_dask(matrix, chunk_size=None if isinstance(matrix, da.Array) else chunk_size)
    if mask is not None:
        x = select(x, rows=mask)
    return _GuideInput(x, row_names, order, ids, targets, where, name, token)


def _guide_labels(targets: np.ndarray, control_targets, control_label: str):
    """``(label code per guide, label names, control targets)``: control targets share ``control_label``."""
    present = list(dict.fromkeys(targets))
    if control_targets is None:
        controls = [t for t in present if is_control_alias(t)]
    else:
        controls = list(dict.fromkeys(label_list(control_targets, "control_targets")))
        absent = [c for c in controls if c not in present]
        if absent:
            raise ValueError(
                f"control_targets {_listing(absent)} are not among the guide targets ({_listing(present)}); "
                "give targets as they are spelled there, or control_targets=None to recognise "
                "non-targeting/control/safe-targeting targets by name"
            )
    others = [t for t in present if t not in controls]
    for name in (MULTIPLE_LABEL, UNASSIGNED_LABEL):
        if name in others or control_label == name:
            raise ValueError(
                f"{name!r} is a guide target (or the control_label), but it labels cells with "
                f"{'several' if name == MULTIPLE_LABEL else 'no'} detected guides; rename that target"
            )
    if controls and control_label in others:
        raise ValueError(
            f"control_label {control_label!r} is also a targeting guide's target: its cells and the control "
            "cells would share a label; choose another control_label"
        )
    names = ([control_label] if controls else []) + others
    code = {t: names.index(control_label if t in controls else t) for t in present}
    return np.array([code[t] for t in targets], dtype=np.int64), names, controls


# --------------------------------------------------------------------------- passes


def _histogram_of(block) -> UMIHistogram:
    return histogram_block(block)


def _histogram(x: da.Array) -> UMIHistogram:
    """Every guide's histogram of non-zero counts: one pass, merged by a tree (``SPLIT_EVERY`` per node)."""
    parts = [dask.delayed(_histogram_of)(b) for b in x.to_delayed().ravel()]
    while len(parts) > 1:
        parts = [dask.delayed(merge_histograms)(*parts[i : i + SPLIT_EVERY]) for i in range(0, len(parts), SPLIT_EVERY)]
    with labelled("guide UMI histograms"):
        (hist,) = dask.compute(parts[0])
    return hist


def _detection_of(block, thresholds):
    return detection_block(block, thresholds)[None]


def _assign_pass(x: da.Array, thresholds, label_codes, *, rule, min_fraction, collapse_targets):
    """Per-cell records (:data:`CELL_DTYPE`) and per-guide detection counts: one pass."""
    cells = x.map_blocks(
        assign_block,
        thresholds,
        label_codes,
        rule=rule,
        min_fraction=min_fraction,
        collapse_targets=collapse_targets,
        dtype=CELL_DTYPE,
        chunks=(x.chunks[0],),
        drop_axis=1,
        meta=np.empty((0,), dtype=CELL_DTYPE),
    )
    detection = per_block(_detection_of, len(DETECTION_ROWS), (x, "bj"), thresholds).sum(
        axis=0, split_every=SPLIT_EVERY
    )
    with labelled("guide assignment"):
        return dask.compute(cells, detection)


def _invalid_error(gi: _GuideInput, n_invalid: np.ndarray) -> ValueError:
    """The error for values that are not counts, naming the first cell and its values."""
    rows = np.flatnonzero(n_invalid)
    first = int(rows[0])
    (row,) = dask.compute(gi.x[first : first + 1])
    row = sp.csr_matrix(row)
    bad = invalid_values(row.data)
    shown = ", ".join(
        f"{gi.ids[c]!r}: {float(v)!r}" for c, v in zip(row.indices[bad][:3], row.data[bad][:3], strict=True)
    )
    return ValueError(
        f"{gi.where} holds {int(n_invalid.sum()):,} values that are not raw UMI counts (negative, not whole "
        f"numbers, NaN or infinite) in {rows.size:,} cells, the first {str(gi.row_names[first])!r} ({shown}); "
        "guide assignment needs the raw guide UMI counts, not normalized or log values"
    )


def _digest(*parts) -> str:
    text = json.dumps([list(map(str, p)) for p in parts], separators=(",", ":"))
    return f"array:{hashlib.sha1(text.encode()).hexdigest()[:16]}"


# --------------------------------------------------------------------------- the public function


def assign_guides(
    adata: ad.AnnData,
    *,
    counts="grna_counts",
    method: str = "umi_threshold",
    threshold: float = 5,
    min_fraction: float = 0.5,
    guide_ids=None,
    guide_targets=None,
    control_targets=None,
    control_label: str = "control",
    collapse_targets: bool = False,
    key_added: str = "perturbation_assigned",
    chunk_size: int | None = None,
    force: bool = False,
) -> pd.DataFrame:
    """Assign each cell its guide and perturbation label from its guide UMI counts, out of core.

    Computes here (plain ``dask.compute``: on the scheduler of the
    enclosing face, :func:`pertscale.cluster.using`, or Dask's current
    one) and writes ``obs`` columns. Passes over the guide counts:
    ``"umi_threshold"`` and ``"max"`` one, ``"mixture"`` two (histograms,
    then assignment). Each pass is a ``map_blocks`` over row blocks of the
    ``n_obs x n_guides`` matrix with small per-cell outputs; per-guide
    numbers are tree-reduced. Peak memory per task is one row block;
    nothing of size cells x guides is gathered (a 2 M x 20,000 guide
    matrix streams as any expression matrix does).

    Methods (kernels and mathematics in :mod:`pertscale.kernels.guides`):

    - ``"umi_threshold"``: crispat's UMI threshold (``ga_umi``): a guide is
      detected in a cell with ``>= threshold`` UMIs of it.
    - ``"max"``: the guide with the most UMIs, when it holds at least
      ``min_fraction`` of the cell's guide UMIs; else ``multiple``; a cell
      without guide UMIs is ``unassigned``. Ties go to the guide of the
      lowest column (numpy's ``argmax``). With ``min_fraction=0.5`` this is
      the ``uns['label_rule']`` of the screens in ``shared/data`` and gives
      their ``obs['perturbation']`` exactly.
    - ``"mixture"``: crispat's Poisson-Gaussian mixture
      (``ga_poisson_gauss``) per guide on the log2 of its non-zero counts,
      MAP-fitted by EM on the guide's UMI histogram instead of Pyro's SVI
      (weights by maximum likelihood; see the kernels' module docstring
      for the model and every difference); a guide is detected from the
      smallest count whose posterior probability of the signal component is
      > 0.5 (crispat's per-guide threshold). Guides with fewer than 2
      cells with UMIs or a largest count below 2 are not fitted and never
      detected, as in crispat.

    With the threshold methods, one detected guide assigns the cell to its
    target; several are ``multiple`` *even when they share a target* (as
    crispat's assignment lists each guide, and as the published
    ``perturbation_crispat_umi_t5`` of the Schraivogel screen counts them:
    equal in every cell; counting targets instead agrees in 98.2%), unless
    ``collapse_targets=True``; none are ``unassigned``. Guides whose target
    is a control target get ``control_label``.

    Parameters
    ----------
    adata
        The cells (``n_obs`` rows); its expression matrix is not read.
    counts
        The ``n_obs x n_guides`` raw guide UMI counts (whole numbers >= 0):
        a key of ``adata.obsm`` (sparse, dense, a Dask array or a DataFrame
        whose columns are the guide ids), or a guide-count AnnData (cells x
        guides; its ``var_names`` the guide ids), or the path of one
        (``.h5ad``/``.zarr``, read lazily with :func:`pertscale.read`).
        A guide-count AnnData's cells are matched to ``adata.obs_names``; it
        may hold more cells, in any order.
    method
        ``"umi_threshold"``, ``"max"`` or ``"mixture"``.
    threshold
        UMIs (> 0) at which a guide is detected (``"umi_threshold"``; 5 as
        the published crispat assignment).
    min_fraction
        Share of the cell's guide UMIs, in [0, 1], the top guide needs
        (``"max"``). Below 0.5 two guides can tie; the lower column wins.
    guide_ids, guide_targets
        One id / target per guide column, in column order. Default: for an
        ``obsm`` key, ``adata.uns['grna_ids']`` / ``['grna_targets']``; for a
        guide-count AnnData, its ``var_names`` and ``var['target']`` (or
        ``var['gene']``, or its ``uns['grna_targets']``).
    control_targets
        Targets of the control guides; default those named like a control
        (``non-targeting``, ``control``, ``safe-targeting``, ... compared
        without case or punctuation: :data:`pertscale.io._infer.CONTROL_ALIASES`).
    control_label
        The label of cells assigned a control guide.
    collapse_targets
        ``"umi_threshold"``/``"mixture"``: several detected guides of one
        target give that target (``guide`` stays ``multiple``). Not for
        ``"max"``, which picks one guide.
    key_added
        ``obs[key_added]`` gets the labels; the other columns are
        ``obs[key_added + "_guide"]``, ``..._guide_umi_max``,
        ``..._guide_umi_total``, ``..._guide_max_fraction``,
        ``..._n_guides_detected`` (prefixed, so the data's own ``guide_*``
        columns are never overwritten); ``uns[key_added]`` gets ``params``
        and the per-guide table ``guides``.
    chunk_size
        Rows per block of an in-memory guide matrix, or of one read from a
        path; a Dask array keeps its blocks. Default: from memory.
    force
        Compute again even when a result with equal settings is stored.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``obs_names``, the columns written to ``obs`` (named as
        there): ``key_added`` (categorical: a target, ``control_label``,
        ``multiple`` or ``unassigned``), ``..._guide`` (categorical: the
        assigned guide id, ``multiple`` or ``unassigned``), ``..._guide_umi_max``
        (int64, UMIs of the cell's top guide), ``..._guide_umi_total``
        (int64, all its guide UMIs), ``..._guide_max_fraction`` (float64,
        their ratio; 0 without UMIs), ``..._n_guides_detected`` (int64:
        guides at or above their threshold; for ``"max"``, guides with any
        UMI). ``uns[key_added]['guides']`` has per guide: ``target``,
        ``label``, ``threshold`` (UMIs; ``inf`` never, NaN for ``"max"``),
        ``n_cells_nonzero``, ``n_cells_detected``, ``n_cells_assigned``, and
        for the mixture ``fitted``, ``weight_signal``, ``lambda``, ``mu``,
        ``scale`` (log2 UMIs), ``log_posterior``, ``n_iter``, ``converged``.
        The tables are kept in ``adata``'s result store, keyed by
        :class:`pertscale.analysis.GuideAssignmentSettings` (with digests of
        the guide counts and of the guides): asked again with equal
        settings they are put back without a pass.

    Raises
    ------
    KeyError
        If ``counts`` is neither an ``obsm`` key nor a path (the message
        lists the ``obsm`` keys and what is accepted).
    FileNotFoundError
        If the ``.h5ad``/``.zarr`` path does not exist.
    TypeError
        For ``counts`` of another type, non-numeric counts, or a number of
        the wrong type.
    ValueError
        For an unknown method; ``threshold`` not > 0; ``min_fraction``
        outside [0, 1]; ``collapse_targets`` with ``"max"``; no guide ids or
        targets, or not one per guide column; repeated guide ids;
        ``control_targets`` not among the targets; a target named
        ``multiple``/``unassigned``; a ``control_label`` that is a target;
        cells of ``adata`` missing from a guide-count AnnData; or counts
        that are negative, not whole numbers, NaN or infinite (the message
        names the first cell; found by the first pass).

    Notes
    -----
    Sources: crispat 0.9.11 (Braunger et al. 2024, velten-group/crispat),
    ``crispat/umi_t.py`` and ``crispat/poisson_gauss.py``. The stored result
    is reused only while the guide counts are the same: an in-memory matrix
    is digested, a Dask array named by its graph, a path by its size and
    modification time (a ``.zarr`` directory's own, so pass ``force=True``
    after rewriting chunks in place).
    """
    from ..analysis import GuideAssignmentSettings, build
    from ..store import cached

    if method not in METHODS:
        raise ValueError(f"method {method!r} is not known; use one of {', '.join(map(repr, METHODS))}")
    threshold = check_number(threshold, "threshold", minimum=0, min_open=True)
    min_fraction = check_number(min_fraction, "min_fraction", minimum=0, maximum=1)
    chunk_size = check_number(chunk_size, "chunk_size", integer=True, minimum=1, allow_none=True)
    for name, value in (("key_added", key_added), ("control_label", control_label)):
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a non-empty string, got {value!r}")
    if collapse_targets and method == "max":
        raise ValueError(
            "collapse_targets=True applies to method='umi_threshold' or 'mixture' (several detected guides); "
            "method='max' picks one guide"
        )
    if adata.n_obs == 0:
        raise ValueError("adata has no cells (n_obs = 0); there is nothing to assign")
    gi = _guide_input(adata, counts, guide_ids=guide_ids, guide_targets=guide_targets, chunk_size=chunk_size)
    label_codes, label_names, controls = _guide_labels(gi.targets, control_targets, control_label)
    defaults = GuideAssignmentSettings.model_fields
    settings = build(
        GuideAssignmentSettings,
        assignment=method,
        counts=gi.name,
        threshold=threshold if method == "umi_threshold" else defaults["threshold"].default,
        min_fraction=min_fraction if method == "max" else defaults["min_fraction"].default,
        control_targets=None if control_targets is None else tuple(controls),
        control_label=control_label,
        collapse_targets=bool(collapse_targets) and method != "max",
        counts_token=gi.token,
        guides=_digest(gi.ids, gi.targets, label_codes),
    )
    columns = obs_columns(key_added)

    def restore(stored: dict) -> None:
        as_actual(adata)  # a view becomes an actual AnnData (a copy): its parent is not written to
        cells = stored["cells"]
        for column, obs_name in columns.items():
            adata.obs[obs_name] = cells[column].to_numpy() if cells[column].dtype != "category" else cells[column].array
        adata.uns[key_added] = {"params": dict(stored["params"]), "guides": stored["guides"]}

    def run():
        cells, guides, params = _assign_guides(
            adata,
            gi,
            method=method,
            threshold=threshold,
            min_fraction=min_fraction,
            collapse_targets=bool(collapse_targets),
            label_codes=label_codes,
            label_names=label_names,
            controls=controls,
            control_label=control_label,
        )
        stored = {"cells": cells, "guides": guides, "params": params}
        restore(stored)
        return stored, [f"obs/{c}" for c in columns.values()] + [f"uns/{key_added}"]

    stored = cached(adata, settings, run, key_added=key_added, force=force, restore=restore)
    out = stored["cells"].rename(columns=columns)
    out.index = adata.obs_names.copy()
    return out


def _assign_guides(
    adata,
    gi: _GuideInput,
    *,
    method,
    threshold,
    min_fraction,
    collapse_targets,
    label_codes,
    label_names,
    controls,
    control_label,
):
    """The per-cell table, the per-guide table and the parameters of :func:`assign_guides`, without the store."""
    n_guides = gi.ids.size
    fit: PoissonGaussFit | None = None
    if method == "mixture":
        hist = _histogram(gi.x)
        if hist.n_invalid:
            (cells_check, _) = _assign_pass(
                gi.x, np.ones(n_guides), label_codes, rule="max", min_fraction=0.5, collapse_targets=False
            )
            raise _invalid_error(gi, cells_check["n_invalid"])
        fit = fit_poisson_gauss(hist, n_guides)
        thresholds = fit.threshold
    elif method == "umi_threshold":
        thresholds = np.full(n_guides, float(threshold))
    else:
        thresholds = np.ones(n_guides)
    cells, detection = _assign_pass(
        gi.x,
        thresholds,
        label_codes,
        rule="max" if method == "max" else "threshold",
        min_fraction=min_fraction,
        collapse_targets=collapse_targets,
    )
    if cells["n_invalid"].any():
        raise _invalid_error(gi, cells["n_invalid"])
    if gi.order is not None:
        cells = cells[gi.order]

    guide, label = cells["guide"], cells["label"]
    n_labels = len(label_names)
    table = pd.DataFrame(index=adata.obs_names.copy())
    table[_LABEL] = pd.Categorical.from_codes(
        np.where(label >= 0, label, np.where(label == MULTIPLE, n_labels, n_labels + 1)),
        categories=[*label_names, MULTIPLE_LABEL, UNASSIGNED_LABEL],
    )
    table[GUIDE] = pd.Categorical.from_codes(
        np.where(guide >= 0, guide, np.where(guide == MULTIPLE, n_guides, n_guides + 1)),
        categories=[*gi.ids, MULTIPLE_LABEL, UNASSIGNED_LABEL],
    )
    table[GUIDE_UMI_MAX] = cells["umi_max"].astype(np.int64)
    table[GUIDE_UMI_TOTAL] = cells["umi_total"].astype(np.int64)
    table[GUIDE_MAX_FRACTION] = cells["max_fraction"]
    table[N_GUIDES_DETECTED] = cells["n_detected"]

    guides = pd.DataFrame(index=pd.Index(gi.ids, name="guide"))
    guides["target"] = gi.targets
    guides["label"] = np.asarray(label_names, dtype=object)[label_codes]
    guides["threshold"] = np.nan if method == "max" else thresholds
    for row, name in enumerate(DETECTION_ROWS):
        guides[name] = detection[row].astype(np.int64)
    guides["n_cells_assigned"] = np.bincount(guide[guide >= 0], minlength=n_guides).astype(np.int64)
    if fit is not None:
        guides["fitted"] = fit.fitted
        guides["weight_signal"] = fit.weight
        guides["lambda"] = fit.lam
        guides["mu"] = fit.mu
        guides["scale"] = fit.scale
        guides["log_posterior"] = fit.log_posterior
        guides["n_iter"] = fit.n_iter
        guides["converged"] = fit.converged
    params = {
        "method": method,
        "counts": gi.name,
        "threshold": float(threshold),
        "min_fraction": float(min_fraction),
        "control_label": control_label,
        "control_targets": np.asarray(controls, dtype=str),
        "collapse_targets": bool(collapse_targets),
        "n_passes": 2 if method == "mixture" else 1,
    }
    counts = table[_LABEL].value_counts()
    logger.info(
        "assign_guides (%s, %d pass(es)) on %s: %d of %d cells assigned, %d multiple, %d unassigned",
        method,
        params["n_passes"],
        gi.where,
        len(table) - int(counts.get(MULTIPLE_LABEL, 0)) - int(counts.get(UNASSIGNED_LABEL, 0)),
        len(table),
        int(counts.get(MULTIPLE_LABEL, 0)),
        int(counts.get(UNASSIGNED_LABEL, 0)),
    )
    return table, guides, params

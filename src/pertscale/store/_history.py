"""Run history: one JSON record per run of an analysis, read with :class:`RunInfo`; :func:`cleanup`.

The records are ``uns['pertscale']['history']``, an object array of JSON
strings (anndata writes it as text): the settings, the public function that
ran, the fields written, start and end, the input's fingerprint and the
versions of the packages. Running an analysis again is the face's business
(:func:`pertscale.get.rerun`): the store imports no analysis.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from ..analysis import AnalysisSettings
from ..variables import LOGFOLDCHANGES, PVALS, PVALS_ADJ, RENAMED_ARGUMENTS, SCORES, current_name
from ._keys import STORE, location, results, root

logger = logging.getLogger("pertscale.store")

#: Packages whose versions a run records.
VERSIONED = ("pertscale", "anndata", "dask", "distributed", "numpy", "scipy", "pandas", "zarr", "h5py", "numba")


# --------------------------------------------------------------------------- records


def records(adata: ad.AnnData) -> list[dict]:
    """The history's records, oldest first (new dicts: edit them and write them back with :func:`set_records`)."""
    raw = (adata.uns.get(STORE) or {}).get("history")
    if raw is None:
        return []
    return [json.loads(str(r)) for r in np.atleast_1d(np.asarray(raw, dtype=object))]


def set_records(adata: ad.AnnData, found: list[dict]) -> None:
    """Replace the history's records."""
    root(adata)["history"] = np.asarray([json.dumps(r, sort_keys=True) for r in found], dtype=object)


def last_run(adata: ad.AnnData, settings: AnalysisSettings) -> dict | None:
    """The record of the latest run with ``settings``, or ``None``."""
    key = settings.key()
    return next((r for r in reversed(records(adata)) if r["settings_key"] == key), None)


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def record_run(
    adata: ad.AnnData,
    settings: AnalysisSettings,
    *,
    key_added: str,
    fields: list[str],
    started: str,
    seconds: float,
    fingerprint: dict[str, Any],
) -> None:
    """Append the record of a run that stored its result under ``settings``."""
    found = records(adata)
    found.append(
        {
            "run_id": len(found),
            "method": settings.method,
            "function": f"pertscale.{settings.function}",
            "settings_key": settings.key(),
            "settings": json.loads(settings.model_dump_json()),
            "key_added": key_added,
            "fields": [location(settings), *fields],
            "removed": [],
            "started": started,
            "finished": now(),
            "seconds": round(seconds, 3),
            "input": fingerprint,
            "versions": _versions(),
        }
    )
    set_records(adata, found)


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


# --------------------------------------------------------------------------- reading the history


class RunInfo:
    """A recorded run of an analysis on this AnnData: its settings, versions, times and fields.

    Parameters
    ----------
    adata
        The AnnData the analysis ran on (or one read back from its file).
    run_id
        Index into the history; negative counts from the end (default the latest).
    method
        Count only runs of this analysis (``"wilcoxon"``, ``"pca"``, ...).

    Attributes
    ----------
    adata
        The AnnData whose history this run was read from.
    run_id
        The run's index in the whole history.
    method, function, key_added
        The analysis, the public function that ran it, its readable name.
    settings
        The settings object (:mod:`pertscale.analysis`).
    started, finished, seconds
        UTC times (ISO 8601) and the duration.
    input
        ``n_obs``, ``n_vars``, ``names_sha1`` (a digest of the cell and gene
        names), ``matrix`` (the token of the matrix read: a Dask graph's name
        or a digest of the data), ``layer``, ``columns`` (a digest of the
        ``obs``/``var`` columns the settings name) and ``source`` (the file,
        when it was read from one).
    versions
        Versions of Python, pertscale, anndata, dask and the rest.
    fields
        Where the run wrote: the store entry and the readable fields.
    removed_fields
        Fields :func:`cleanup` removed since.

    Raises
    ------
    IndexError
        If there is no such run.

    See Also
    --------
    pertscale.get.rerun : run the analysis again with these settings.
    """

    def __init__(self, adata: ad.AnnData, run_id: int = -1, *, method: str | None = None):
        found = records(adata)
        if method is not None:
            found = [r for r in found if r["method"] == method]
        if not found:
            raise IndexError(f"no run{f' of {method!r}' if method else ''} is recorded in this AnnData")
        try:
            record = found[run_id]
        except IndexError:
            raise IndexError(f"run_id {run_id} is out of range: {len(found)} run(s) recorded") from None
        self._adata = adata
        self.record = record
        self.run_id: int = record["run_id"]
        self.method: str = record["method"]
        self.function: str = record["function"]
        self.key_added: str = record["key_added"]
        self.settings: AnalysisSettings = AnalysisSettings.from_key(record["settings_key"])
        self.started: str = record["started"]
        self.finished: str = record["finished"]
        self.seconds: float = record["seconds"]
        self.input: dict = record["input"]
        self.versions: dict = record["versions"]
        self.fields: list[str] = record["fields"]
        self.removed_fields: list[str] = record.get("removed", [])

    def __repr__(self) -> str:
        return (
            f"RunInfo(run_id={self.run_id}, method={self.method!r}, finished={self.finished!r}, "
            f"seconds={self.seconds}, settings={self.settings!r})"
        )

    @property
    def adata(self) -> ad.AnnData:
        """The AnnData whose history this run was read from."""
        return self._adata

    def call_args(self) -> dict[str, Any]:
        """Keyword arguments that reproduce the run: ``ps.<function>(adata, **run.call_args())``.

        A plain dict: edit it before calling to vary the run. Arrays given
        as options are not stored (only their digest): pass them again.
        :func:`pertscale.get.rerun` makes the call. Settings fields whose
        argument was renamed (``min_cells`` of the tests, now
        ``min_cells_per_perturbation``) are given under the current name
        (:data:`pertscale.variables.RENAMED_ARGUMENTS`).
        """
        renamed = RENAMED_ARGUMENTS.get(self.settings.function, {})
        return {renamed.get(k, k): v for k, v in self.settings.call_args().items()}

    @property
    def overwritten_fields(self) -> list[str]:
        """Readable fields that a later run wrote again (``obsm/X_pca`` of a second PCA)."""
        later = {f for r in records(self._adata)[self.run_id + 1 :] for f in r["fields"][1:]}
        return [f for f in self.fields[1:] if f in later]

    @property
    def missing_fields(self) -> list[str]:
        """Fields the run wrote that are no longer in the AnnData (removed, deleted or not written to its file)."""
        return [f for f in self.fields if not _present(self._adata, f)] + [
            f for f in self.removed_fields if f not in self.fields
        ]

    def compare_with(self, other: RunInfo | int) -> pd.DataFrame:
        """Settings and versions that differ between this run and ``other`` (a ``RunInfo`` or a run id).

        Returns
        -------
        pandas.DataFrame
            Index ``what`` (``settings.<field>``, ``versions.<package>``,
            ``input.<field>``), columns ``this`` and ``other``; empty when
            the runs agree.
        """
        if not isinstance(other, RunInfo):
            other = RunInfo(self._adata, other)
        rows = {f"settings.{k}": v for k, v in self.settings.differences(other.settings).items()}
        for name, mine, theirs in (("versions", self.versions, other.versions), ("input", self.input, other.input)):
            for k in dict.fromkeys([*mine, *theirs]):
                if mine.get(k) != theirs.get(k):
                    rows[f"{name}.{k}"] = (mine.get(k), theirs.get(k))
        return pd.DataFrame([(k, *v) for k, v in rows.items()], columns=["what", "this", "other"]).set_index("what")


def history(adata: ad.AnnData) -> pd.DataFrame:
    """The run history as a table: ``run_id``, ``method``, ``key_added``, ``started``, ``seconds``, ``settings_key``."""
    cols = ["run_id", "method", "key_added", "started", "finished", "seconds", "settings_key"]
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in records(adata)], columns=cols)


def _present(adata: ad.AnnData, field: str) -> bool:
    attr, _, key = field.partition("/")
    if attr == "uns" and key.startswith(f"{STORE}/results/"):
        rest = key[len(f"{STORE}/results/") :]
        settings_key, _, inner = rest.partition("/")
        try:
            settings = AnalysisSettings.from_key(settings_key)
        except ValueError:
            return False
        value = results(adata).get(settings)
        if value is None:
            return False
        if not inner:
            return True
        where, _, name = inner.partition("/")
        if isinstance(value, ad.AnnData):
            return name in getattr(value, where, {})
        return isinstance(value, dict) and where in value
    if attr in ("obs", "var"):
        return key in getattr(adata, attr).columns
    if attr in ("obsm", "varm", "layers", "uns", "obsp", "varp"):
        return key in getattr(adata, attr)
    return False


# --------------------------------------------------------------------------- cleanup


def _own_obsm(found: list[dict], settings: AnalysisSettings) -> list[tuple[str, str]]:
    """The ``obsm`` fields the last run with ``settings`` wrote and no later run wrote again."""
    key = settings.key()
    last = max((i for i, r in enumerate(found) if r["settings_key"] == key), default=None)
    if last is None:
        return []
    later = {f for r in found[last + 1 :] for f in r["fields"][1:]}
    return [tuple(f.split("/", 1)) for f in found[last]["fields"][1:] if f.startswith("obsm/") and f not in later]


#: Statistics that :func:`cleanup` keeps in the results of a test by default.
DEFAULT_KEEP_LAYERS = (SCORES, LOGFOLDCHANGES, PVALS, PVALS_ADJ)
#: Per-cell (large) entries of dict results, removed by :func:`cleanup`.
PER_CELL_ENTRIES = {"pca": ("X_pca",), "qc": ("cells",)}


def cleanup(
    adata: ad.AnnData,
    run_ids: int | Iterable[int] | None = None,
    *,
    keep_layers: Iterable[str] | bool = DEFAULT_KEEP_LAYERS,
    keep_per_cell: bool = False,
    inplace: bool = True,
) -> ad.AnnData | None:
    """Remove the large parts of stored results, keep their statistics, and mark what went in the history.

    - Tests and pseudo-bulk (results AnnData): layers not in
      ``keep_layers`` (by default ``pts``, ``pts_rest``, ``u_statistic``,
      standard errors and the rest go; ``scores``, ``logfoldchanges``,
      ``pvals``, ``pvals_adj`` stay).
    - PCA: the per-cell scores (``X_pca``, also from ``obsm`` when it is
      the same array); loadings and variances stay.
    - QC: the per-cell table; the gene and perturbation tables stay.

    A result something was removed from is not reused: the analysis runs
    again when asked with its settings. :class:`RunInfo` lists the removed
    fields.

    Parameters
    ----------
    adata
        AnnData with stored results.
    run_ids
        Runs (history indices; negative from the end) whose results to
        clean; default every stored result.
    keep_layers
        Layers of results AnnData to keep; ``True`` keeps all, ``False`` none.
    keep_per_cell
        Keep PCA's scores and QC's per-cell table.
    inplace
        Modify ``adata`` (default) or return a cleaned copy.

    Returns
    -------
    anndata.AnnData or None
        The copy when ``inplace=False``.

    Raises
    ------
    IndexError
        If a run id is out of range.
    """
    if not inplace:
        adata = adata.copy()
    found = records(adata)
    store = results(adata)
    if run_ids is None:
        chosen = {s.key() for s in store}
    else:
        ids = [run_ids] if isinstance(run_ids, (int, np.integer)) else list(run_ids)
        chosen = set()
        for i in ids:
            if not -len(found) <= i < len(found):
                raise IndexError(f"run_id {i} is out of range: {len(found)} run(s) recorded")
            chosen.add(found[i]["settings_key"])
    shared = {id(v): (attr, key) for attr in ("obsm",) for key, v in getattr(adata, attr).items()}
    for settings in list(store):
        if settings.key() not in chosen:
            continue
        value, removed = store[settings], []
        where = location(settings)
        if isinstance(value, ad.AnnData):
            keep = set(value.layers) if keep_layers is True else set() if keep_layers is False else set(keep_layers)
            keep = {current_name(k) for k in keep}  # an earlier release's name keeps the statistic, stored either way
            for name in [n for n in value.layers if n not in keep and current_name(n) not in keep]:
                del value.layers[name]
                removed.append(f"{where}/layers/{name}")
        elif isinstance(value, dict) and not keep_per_cell:
            for name in PER_CELL_ENTRIES.get(settings.method, ()):
                if name in value:
                    array = value.pop(name)
                    removed.append(f"{where}/{name}")
                    for attr, key in [shared[id(array)]] if id(array) in shared else _own_obsm(found, settings):
                        if key in getattr(adata, attr):
                            del getattr(adata, attr)[key]
                            removed.append(f"{attr}/{key}")
        if removed:
            run = next((r for r in reversed(found) if r["settings_key"] == settings.key()), None)
            if run is not None:
                run["removed"] = sorted(set(run.get("removed", [])) | set(removed))
            logger.info("cleanup: removed %s", ", ".join(removed))
    if found:
        set_records(adata, found)
    return None if inplace else adata

"""The result store: every analysis's output kept in the AnnData, keyed by the settings that produced it.

Layout, in ``adata.uns['pertscale']``:

- ``results``: one entry per settings object (:mod:`pertscale.analysis`)
  an analysis ran with, ``{'<Class>-<digest>': {'settings': key, 'result':
  result}}``, ``key`` the settings' prefixed JSON
  (:meth:`~pertscale.analysis.AnalysisSettings.key`). A result is in the
  form anndata writes: the results AnnData of a test or of pseudo-bulk
  (lazy until computed or written), a ``DataFrame`` (highly variable genes),
  a dict of tables (QC) or of arrays (PCA). :func:`results` gives them as
  ``{settings object: result}``.
- ``latest``: ``{key_added: settings key}``, the latest result of each
  readable name (``'de_wilcoxon'``, ``'pca'``, ...).
- ``history``: one JSON record per run (settings, versions, start and end,
  input fingerprint, fields written, fields removed), read with
  :class:`RunInfo`.

An analysis asked again with equal settings returns the stored result
without computing (``force=True`` recomputes), unless its input changed:
the cell and gene names, the values of the matrix it read (a lazy matrix
by its Dask graph, one in memory by a digest of its bytes), or the
``obs``/``var`` columns its settings name (perturbation labels, batches,
covariates, size factors; nb-glm's ``var['dispersion']``), or unless
:func:`cleanup` removed part of it. An analysis on a view of an AnnData is
not stored (a view's ``uns`` is its parent's).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .analysis import ANALYSES, AnalysisSettings, _plain

logger = logging.getLogger(__name__)

#: ``adata.uns`` key of the store.
STORE = "pertscale"
#: Prefix of a stored reference to an array kept elsewhere in the same AnnData (``'ref:obsm/X_pca'``).
REF = "ref:"
#: Packages whose versions a run records.
VERSIONED = ("pertscale", "anndata", "dask", "distributed", "numpy", "scipy", "pandas", "zarr", "h5py", "numba")


# --------------------------------------------------------------------------- the store in uns


def _root(adata: ad.AnnData) -> dict:
    root = adata.uns.get(STORE)
    if root is None:
        root = adata.uns[STORE] = {}
    return root


def entry_name(settings: AnalysisSettings) -> str:
    """The short name of a result's entry: ``'<Class>-<first 12 hex of the key's SHA-1>'``."""
    return f"{type(settings).__name__}-{hashlib.sha1(settings.key().encode()).hexdigest()[:12]}"


@functools.lru_cache(maxsize=4096)
def _parse(key: str) -> AnalysisSettings:
    return AnalysisSettings.from_key(key)


def results(adata: ad.AnnData) -> dict[AnalysisSettings, Any]:
    """The stored results of ``adata`` as a new dict ``{settings: result}``, in the order they were stored.

    The results are the stored objects themselves; to store or drop one use
    :func:`put` and :func:`drop` (this dict is a view built for reading).
    """
    ensure_result_keys(adata)
    entries = (adata.uns.get(STORE) or {}).get("results") or {}
    return {_parse(e["settings"]): e["result"] for e in entries.values()}


def put(adata: ad.AnnData, settings: AnalysisSettings, value) -> None:
    """Store ``value`` as the result of ``settings`` (replacing an equal one; moved to the end)."""
    entries = _root(adata).setdefault("results", {})
    name = entry_name(settings)
    entries.pop(name, None)
    entries[name] = {"settings": settings.key(), "result": value}


def ensure_result_keys(adata: ad.AnnData) -> ad.AnnData:
    """Bring a result store read from a file (or built by hand) into the form the getters read; idempotent.

    In memory and in files alike, each result is an entry
    ``uns['pertscale']['results']['<Class>-<digest>'] = {'settings':
    "WilcoxonSettings::{...json...}", 'result': ...}``: the settings' prefixed
    JSON key (:meth:`~pertscale.analysis.AnalysisSettings.key`) is a value,
    since file systems limit the length of the names a ``.zarr`` store
    gives its keys; anndata writes it as it is (``adata.write_h5ad`` works;
    :func:`pertscale.write` also writes shared arrays once). This function
    checks every stored key names a known analysis, converts entries keyed
    by settings objects or by the key strings themselves, and resolves
    references to arrays written once elsewhere in the file (PCA's scores
    are ``obsm['X_pca']``). :func:`pertscale.read` calls it; call it on
    files opened with ``anndata.read_h5ad``/``read_zarr`` or
    ``scanpy.read_h5ad``.

    Returns
    -------
    anndata.AnnData
        ``adata`` itself.

    Raises
    ------
    ValueError
        If a stored key is not a settings key of a known analysis.
    """
    root = adata.uns.get(STORE)
    if not isinstance(root, dict):
        return adata
    _alias_written(adata, root)
    if not root.get("results"):
        return adata
    entries = {}
    for name, value in root["results"].items():
        if isinstance(value, dict) and set(value) == {"settings", "result"}:
            settings = _parse(str(value["settings"]))
            value = value["result"]
        else:  # {settings object or key string: result}
            settings = name if isinstance(name, AnalysisSettings) else _parse(str(name))
        entries[entry_name(settings)] = {"settings": settings.key(), "result": _resolve_refs(adata, value)}
    old = root["results"]
    same = list(entries) == list(old) and all(
        isinstance(old[n], dict) and old[n].get("settings") == e["settings"] and old[n].get("result") is e["result"]
        for n, e in entries.items()
    )
    if not same:
        root["results"] = entries
    return adata


def serialized_store(adata: ad.AnnData, *, written: set[str] | None = None) -> dict | None:
    """A copy of ``uns['pertscale']`` for :func:`pertscale.write`: shared arrays as references, matrix tokens.

    A result array that is the very object at ``obsm/<key>``, ``varm/<key>``
    or ``layers/<key>`` of ``adata`` (PCA's scores and loadings) is stored
    as a reference to it when that element is written too (``written``: the
    ``'attr/key'`` names that will be; default all), so it is written once.
    """
    ensure_result_keys(adata)
    root = adata.uns.get(STORE)
    if not isinstance(root, dict):
        return None
    out = dict(root)
    out.pop("matrix_aliases", None)  # names of this process's Dask graphs
    out.pop("written_matrices", None)
    if root.get("results"):
        out["results"] = {
            name: {"settings": e["settings"], "result": _with_refs(adata, e["result"], written)}
            for name, e in root["results"].items()
        }
    return out


def _shared_elements(adata: ad.AnnData, written: set[str] | None) -> dict[int, str]:
    found = {}
    for attr in ("obsm", "varm", "layers"):
        for key, value in getattr(adata, attr).items():
            name = f"{attr}/{key}"
            if written is None or name in written:
                found[id(value)] = name
    return found


def _with_refs(adata: ad.AnnData, value, written):
    if not isinstance(value, dict):
        return value
    shared = _shared_elements(adata, written)
    return {k: (REF + shared[id(v)] if id(v) in shared else v) for k, v in value.items()}


def _resolve_refs(adata: ad.AnnData, value):
    if not isinstance(value, dict) or not any(isinstance(v, str) and v.startswith(REF) for v in value.values()):
        return value  # the stored object itself
    out = {}
    for k, v in value.items():
        if isinstance(v, str) and v.startswith(REF):
            attr, _, key = v[len(REF) :].partition("/")
            mapping = getattr(adata, attr, {})
            if key not in mapping:
                continue  # not in this file (left out by ``include``): the result is incomplete
            v = mapping[key]
        out[k] = v
    return out


# --------------------------------------------------------------------------- fingerprints and history


def matrix_token(adata: ad.AnnData, layer: str | None = None, *, aliased: bool = True) -> str | None:
    """What identifies the values of ``X`` (or ``layers[layer]``): the Dask graph's name, or a digest of the data.

    A lazy matrix is named by its graph (normalizing makes a new graph, a new
    name); a matrix in memory by a BLAKE2b digest of its bytes (one read of
    it, about 1 GB/s). A matrix read by :func:`pertscale.read` from a file
    that :func:`pertscale.write` wrote carries the token of the matrix that
    was written (``uns['pertscale']['matrix_aliases']``), so results stored
    with it are reused after the round trip. ``None`` for a matrix of
    another kind (not checked) or a missing layer.
    """
    import dask.array as da
    import scipy.sparse as sp

    x = adata.X if layer is None else adata.layers[layer] if layer in adata.layers else None
    if isinstance(x, da.Array):
        token = x.name
    elif isinstance(x, np.ndarray) or sp.issparse(x):
        digest = hashlib.blake2b(f"{type(x).__name__}{x.shape}{x.dtype}".encode(), digest_size=16)
        parts = (x.data, x.indices, x.indptr) if sp.issparse(x) and hasattr(x, "indptr") else (x,)
        for part in parts:
            if not sp.issparse(part):
                digest.update(np.ascontiguousarray(part).view(np.uint8).ravel())
            else:  # another sparse layout (COO, ...): its CSR form
                csr = part.tocsr()
                for arr in (csr.data, csr.indices, csr.indptr):
                    digest.update(np.ascontiguousarray(arr).view(np.uint8).ravel())
        token = f"blake2b:{digest.hexdigest()}"
    else:
        return None
    aliases = ((adata.uns.get(STORE) or {}).get("matrix_aliases") or {}) if aliased else {}
    return str(aliases.get(token, token))


def written_matrices(adata: ad.AnnData, layers: Iterable[str]) -> dict[str, Any]:
    """Tokens of ``X`` and ``layers`` as :func:`pertscale.write` records them: ``{'X': t, 'layers': {name: t}}``."""
    found: dict[str, Any] = {"layers": {}}
    if (token := matrix_token(adata)) is not None:
        found["X"] = token
    for name in layers:
        if (token := matrix_token(adata, name)) is not None:
            found["layers"][name] = token
    return found


def _alias_written(adata: ad.AnnData, root: dict) -> None:
    """The matrices of a file as the tokens of the matrices written to it (once, right after reading)."""
    written = root.pop("written_matrices", None)
    if not isinstance(written, dict):
        return
    aliases = dict(root.get("matrix_aliases") or {})
    pairs = [(None, written.get("X"))] + [(k, v) for k, v in (written.get("layers") or {}).items()]
    for layer, token in pairs:
        if token is None or (layer is not None and layer not in adata.layers):
            continue
        current = matrix_token(adata, layer, aliased=False)
        if current is not None:
            aliases[current] = str(token)
    root["matrix_aliases"] = aliases


#: Digests of name indices already seen, by ``id``: ``(weak reference, digest)``; indices are immutable.
_NAME_DIGESTS: dict[int, tuple[weakref.ref, str]] = {}


def _names_digest(*indices: pd.Index) -> str:
    """SHA-1 prefix of the cell and gene names (0.5 s per 2 M names, once per index object)."""
    parts = []
    for index in indices:
        cached = _NAME_DIGESTS.get(id(index))
        if cached is None or cached[0]() is not index:
            text = "\x00".join(map(str, index)).encode()
            key = id(index)
            cached = (
                weakref.ref(index, lambda _, key=key: _NAME_DIGESTS.pop(key, None)),
                hashlib.sha1(text).hexdigest(),
            )
            _NAME_DIGESTS[id(index)] = cached
        parts.append(cached[1])
    return hashlib.sha1("".join(parts).encode()).hexdigest()[:16]


#: Settings fields that name ``obs``/``var`` columns whose values a result depends on.
COLUMN_FIELDS = ("perturbation_column", "batch_key", "groupby", "covariates", "size_factors", "dispersions")


def columns_digest(adata: ad.AnnData, settings: AnalysisSettings) -> str:
    """SHA-1 prefix of the values of the ``obs``/``var`` columns the settings name (labels, batches, covariates)."""
    digest = hashlib.sha1()
    names = []
    for field in COLUMN_FIELDS:
        value = getattr(settings, field, None)
        names.extend((value,) if isinstance(value, str) else value or ())
    if settings.method == "nb-glm" and getattr(settings, "dispersions", None) is None:
        names.append("dispersion")  # the dispersions stored by ps.tl.dispersions, read when none are given
    for name in names:
        for where, frame in (("obs", adata.obs), ("var", adata.var)):
            if name in frame.columns:
                # values only: anndata reads text columns back as categoricals, which hash alike
                digest.update(f"{where}/{name}".encode())
                digest.update(pd.util.hash_pandas_object(frame[name], index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def input_fingerprint(adata: ad.AnnData, layer: str | None = None) -> dict[str, Any]:
    """What identifies the data an analysis ran on: shape, a digest of the names, the matrix's token, the source."""
    source = ((adata.uns.get(STORE) or {}).get("source") or {}).get("path")
    return {
        "n_obs": int(adata.n_obs),
        "n_vars": int(adata.n_vars),
        "names_sha1": _names_digest(adata.obs_names, adata.var_names),
        "matrix": matrix_token(adata, layer),
        "layer": layer or "X",
        **({"source": str(source)} if source else {}),
    }


def _history(adata: ad.AnnData) -> list[dict]:
    raw = (adata.uns.get(STORE) or {}).get("history")
    if raw is None:
        return []
    return [json.loads(str(r)) for r in np.atleast_1d(np.asarray(raw, dtype=object))]


def _set_history(adata: ad.AnnData, records: list[dict]) -> None:
    _root(adata)["history"] = np.asarray([json.dumps(r, sort_keys=True) for r in records], dtype=object)


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- running an analysis through the store


def _location(settings: AnalysisSettings) -> str:
    return f"uns/{STORE}/results/{settings.key()}"


def _last_run(adata: ad.AnnData, settings: AnalysisSettings) -> dict | None:
    key = settings.key()
    return next((r for r in reversed(_history(adata)) if r["settings_key"] == key), None)


def _reusable(run: dict | None, now: dict) -> str | None:
    """Why the stored result of ``run`` cannot be reused on data with fingerprint ``now``, or ``None``."""
    if run is None:
        return None  # stored by hand or by a file without history: trust the key
    if run.get("removed"):
        return f"ps.cleanup removed {', '.join(run['removed'][:3])}"
    then = run.get("input", {})
    for field in ("n_obs", "n_vars", "names_sha1"):
        if then.get(field) != now[field]:
            return f"it was computed on other cells or genes ({then.get('n_obs')} x {then.get('n_vars')})"
    if then.get("matrix") != now["matrix"]:
        return f"the values of {now['layer']} changed since (another graph or other data)"
    if then.get("columns") != now.get("columns"):
        return "the obs/var columns it used (labels, batches, covariates) changed since"
    return None


def cached(
    adata: ad.AnnData,
    settings: AnalysisSettings,
    run: Callable[[], tuple[Any, list[str]]],
    *,
    key_added: str,
    force: bool = False,
    restore: Callable[[Any], None] | None = None,
):
    """Return the stored result for ``settings``, or run the analysis, store and record it.

    Parameters
    ----------
    adata
        The AnnData whose ``uns['pertscale']`` holds the store.
    settings
        The analysis's settings: the key.
    run
        Runs the analysis; returns the result to store and the fields it
        wrote outside the store (``'obsm/X_pca'``, ``'var/highly_variable'``).
    key_added
        Readable name of the latest result of this kind (``uns['pertscale']['latest']``).
    force
        Run even when an equal result is stored.
    restore
        Puts a reused result back in its readable places (PCA's ``obsm``).

    Returns
    -------
    The result (as ``run`` made it, or as stored).
    """
    store = results(adata)
    fingerprint = input_fingerprint(adata, getattr(settings, "layer", None))
    fingerprint["columns"] = columns_digest(adata, settings)
    if settings in store and not force:
        why = _reusable(_last_run(adata, settings), fingerprint)
        if why is None:
            logger.info("reusing the stored result of %r", settings)
            if restore is not None:
                restore(store[settings])
            if not adata.is_view:  # a view's uns is its parent's: leave the parent's records alone
                _root(adata).setdefault("latest", {})[key_added] = settings.key()
            return store[settings]
        logger.info("recomputing %s: the stored result cannot be reused (%s)", type(settings).__name__, why)
    started, clock = _now(), time.perf_counter()
    value, fields = run()
    if adata.is_view:  # its uns is its parent's: storing would change another object's results
        logger.info("%s ran on a view of an AnnData: the result is not stored", type(settings).__name__)
        return value
    fingerprint["columns"] = columns_digest(adata, settings)  # nb-glm may have added the size factors it used
    put(adata, settings, value)
    _root(adata).setdefault("latest", {})[key_added] = settings.key()
    records = _history(adata)
    records.append(
        {
            "run_id": len(records),
            "method": settings.method,
            "function": f"pertscale.{settings.function}",
            "settings_key": settings.key(),
            "settings": json.loads(settings.model_dump_json()),
            "key_added": key_added,
            "fields": [_location(settings), *fields],
            "removed": [],
            "started": started,
            "finished": _now(),
            "seconds": round(time.perf_counter() - clock, 3),
            "input": fingerprint,
            "versions": _versions(),
        }
    )
    _set_history(adata, records)
    return value


# --------------------------------------------------------------------------- selecting stored results


def _matches(settings: AnalysisSettings, filters: dict[str, Any]) -> bool:
    return all(getattr(settings, k, _MISSING) == _plain(v) for k, v in filters.items())


_MISSING = object()


def select(adata: ad.AnnData, *, method: str | None = None, key: str | None = None, **filters):
    """The one stored result that ``method``, ``key`` and the settings ``filters`` pick: ``(settings, result)``.

    Raises
    ------
    ValueError
        If nothing is stored, the filters match no result or several (the
        message lists them and the fields in which they differ), ``method``
        is unknown, or a filter names no settings field.
    """
    store = results(adata)
    if not store:
        raise ValueError("no results are stored in this AnnData: run an analysis first (e.g. ps.tl.rank_genes_groups)")
    if method is not None and method not in ANALYSES:
        raise ValueError(f"method {method!r} is not an analysis; choose one of {tuple(ANALYSES)}")
    candidates = list(store)
    if key is not None:
        latest = _root(adata).get("latest", {})
        if key not in latest:
            raise ValueError(f"no stored result is named {key!r}; names: {sorted(latest)}")
        candidates = [s for s in candidates if s.key() == latest[key]]
    if method is not None:
        candidates = [s for s in candidates if s.method == method]
    known = set().union(*(type(s).model_fields for s in candidates)) if candidates else set()
    unknown = sorted(set(filters) - known)
    if candidates and unknown:
        raise ValueError(f"{unknown} are not settings of the {method or 'stored'} results; fields: {sorted(known)}")
    picked = [s for s in candidates if _matches(s, filters)]
    asked = ", ".join([*([f"method={method!r}"] if method else []), *([f"key={key!r}"] if key else [])])
    asked = ", ".join([asked, *(f"{k}={v!r}" for k, v in filters.items())]).strip(", ")
    if not picked:
        stored = "; ".join(sorted({repr(s) for s in store}))[:1500]
        raise ValueError(f"no stored result matches {asked or 'these filters'}; stored: {stored}")
    if len(picked) > 1:
        differing = sorted({k for s in picked for k in s.differences(picked[0])})
        options = "; ".join("(" + ", ".join(f"{k}={getattr(s, k, None)!r}" for k in differing) + ")" for s in picked)
        raise ValueError(
            f"{len(picked)} stored results match {asked or 'these filters'}; they differ in {differing}: "
            f"{options}. Add one of these fields as a filter"
        )
    return picked[0], store[picked[0]]


def summary(adata: ad.AnnData) -> pd.DataFrame:
    """One row per stored result: analysis, readable name, run, time, size and settings.

    Columns ``method``, ``key_added`` (names under which it is the latest
    result), ``run_id``, ``finished``, ``seconds``, ``shape``, ``lazy``
    (not computed yet), ``removed`` (fields removed by :func:`cleanup`),
    then every settings field of any stored result (``NaN`` where a result
    has no such field).
    """
    store = results(adata)
    latest = _root(adata).get("latest", {})
    rows = []
    for settings, value in store.items():
        run = _last_run(adata, settings) or {}
        rows.append(
            {
                "method": settings.method,
                "key_added": ",".join(k for k, v in latest.items() if v == settings.key()),
                "run_id": run.get("run_id"),
                "finished": run.get("finished"),
                "seconds": run.get("seconds"),
                "shape": _shape(value),
                "lazy": _is_lazy(value),
                "removed": ",".join(run.get("removed", [])),
                **{k: v for k, v in settings.model_dump().items() if k != "method"},
            }
        )
    return pd.DataFrame(rows)


def _shape(value) -> tuple | None:
    if isinstance(value, (ad.AnnData, pd.DataFrame)):
        return tuple(value.shape)
    if isinstance(value, dict):
        first = next((v for v in value.values() if hasattr(v, "shape")), None)
        return tuple(first.shape) if first is not None else None
    return None


def _is_lazy(value) -> bool:
    import dask.array as da

    if isinstance(value, ad.AnnData):
        return any(isinstance(v, da.Array) for v in [value.X, *value.layers.values()])
    if isinstance(value, dict):
        return any(isinstance(v, da.Array) for v in value.values())
    return False


# --------------------------------------------------------------------------- run history


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
    """

    def __init__(self, adata: ad.AnnData, run_id: int = -1, *, method: str | None = None):
        records = _history(adata)
        if method is not None:
            records = [r for r in records if r["method"] == method]
        if not records:
            raise IndexError(f"no run{f' of {method!r}' if method else ''} is recorded in this AnnData")
        try:
            record = records[run_id]
        except IndexError:
            raise IndexError(f"run_id {run_id} is out of range: {len(records)} run(s) recorded") from None
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

    def call_args(self) -> dict[str, Any]:
        """Keyword arguments that reproduce the run: ``ps.<function>(adata, **run.call_args())``.

        A plain dict: edit it before calling to vary the run. Arrays given
        as options are not stored (only their digest): pass them again.
        """
        return self.settings.call_args()

    def rerun(self, adata: ad.AnnData | None = None, **changes):
        """Run the analysis again with these settings (and ``changes``) on ``adata`` (default the same object)."""
        import pertscale

        target = self._adata if adata is None else adata
        func = pertscale
        for part in self.function.split(".")[1:]:
            func = getattr(func, part)
        return func(target, **(self.call_args() | changes))

    @property
    def overwritten_fields(self) -> list[str]:
        """Readable fields that a later run wrote again (``obsm/X_pca`` of a second PCA)."""
        later = {f for r in _history(self._adata)[self.run_id + 1 :] for f in r["fields"][1:]}
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
    records = _history(adata)
    cols = ["run_id", "method", "key_added", "started", "finished", "seconds", "settings_key"]
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in records], columns=cols)


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


def _own_obsm(records: list[dict], settings: AnalysisSettings) -> list[tuple[str, str]]:
    """The ``obsm`` fields the last run with ``settings`` wrote and no later run wrote again."""
    key = settings.key()
    last = max((i for i, r in enumerate(records) if r["settings_key"] == key), default=None)
    if last is None:
        return []
    later = {f for r in records[last + 1 :] for f in r["fields"][1:]}
    return [tuple(f.split("/", 1)) for f in records[last]["fields"][1:] if f.startswith("obsm/") and f not in later]


#: Statistics that :func:`cleanup` keeps in the results of a test by default.
DEFAULT_KEEP_LAYERS = ("scores", "logfoldchanges", "pvals", "pvals_adj")
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
    records = _history(adata)
    store = results(adata)
    if run_ids is None:
        chosen = {s.key() for s in store}
    else:
        ids = [run_ids] if isinstance(run_ids, (int, np.integer)) else list(run_ids)
        chosen = set()
        for i in ids:
            if not -len(records) <= i < len(records):
                raise IndexError(f"run_id {i} is out of range: {len(records)} run(s) recorded")
            chosen.add(records[i]["settings_key"])
    shared = {id(v): (attr, key) for attr in ("obsm",) for key, v in getattr(adata, attr).items()}
    for settings in list(store):
        if settings.key() not in chosen:
            continue
        value, removed = store[settings], []
        where = _location(settings)
        if isinstance(value, ad.AnnData):
            keep = set(value.layers) if keep_layers is True else set() if keep_layers is False else set(keep_layers)
            for name in [n for n in value.layers if n not in keep]:
                del value.layers[name]
                removed.append(f"{where}/layers/{name}")
        elif isinstance(value, dict) and not keep_per_cell:
            for name in PER_CELL_ENTRIES.get(settings.method, ()):
                if name in value:
                    array = value.pop(name)
                    removed.append(f"{where}/{name}")
                    for attr, key in [shared[id(array)]] if id(array) in shared else _own_obsm(records, settings):
                        if key in getattr(adata, attr):
                            del getattr(adata, attr)[key]
                            removed.append(f"{attr}/{key}")
        if removed:
            run = next((r for r in reversed(records) if r["settings_key"] == settings.key()), None)
            if run is not None:
                run["removed"] = sorted(set(run.get("removed", [])) | set(removed))
            logger.info("cleanup: removed %s", ", ".join(removed))
    if records:
        _set_history(adata, records)
    return None if inplace else adata

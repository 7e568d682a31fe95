"""Results: reuse by settings unless the input changed (:func:`cached`), and picking stored results.

An analysis asked again with equal settings gets the stored result back
without computing, unless its input changed since: its fingerprint (shape,
a digest of the cell and gene names, the token of the matrix it read, a
digest of the ``obs``/``var`` columns its settings name) is compared with
the one its run recorded.
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import anndata as ad
import pandas as pd

from ..analysis import ANALYSES, AnalysisSettings, _plain
from ..variables import DISPERSION, ESCAPER
from ._history import last_run, now, record_run
from ._keys import STORE, matrix_token, put, results, root

logger = logging.getLogger("pertscale.store")


# --------------------------------------------------------------------------- input fingerprints


#: Digests of name indices already seen, by ``id``: ``(weak reference, digest)``; indices are immutable.
_NAME_DIGESTS: dict[int, tuple[weakref.ref, str]] = {}


def _names_digest(*indices: pd.Index) -> str:
    """SHA-1 prefix of the cell and gene names (0.5 s per 2 M names, once per index object)."""
    parts = []
    for index in indices:
        cached_digest = _NAME_DIGESTS.get(id(index))
        if cached_digest is None or cached_digest[0]() is not index:
            text = "\x00".join(map(str, index)).encode()
            key = id(index)
            cached_digest = (
                weakref.ref(index, lambda _, key=key: _NAME_DIGESTS.pop(key, None)),
                hashlib.sha1(text).hexdigest(),
            )
            _NAME_DIGESTS[id(index)] = cached_digest
        parts.append(cached_digest[1])
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
        names.append(DISPERSION)  # the dispersions stored by ps.tl.dispersions, read when none are given
    if getattr(settings, "exclude_escapers", False):
        names.append(ESCAPER)  # the escaper flags of ps.tl.knockdown
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


# --------------------------------------------------------------------------- running an analysis through the store


def _reusable(run: dict | None, fingerprint: dict) -> str | None:
    """Why the stored result of ``run`` cannot be reused on data with this ``fingerprint``, or ``None``."""
    if run is None:
        return None  # stored by hand or by a file without history: trust the key
    if run.get("removed"):
        return f"ps.cleanup removed {', '.join(run['removed'][:3])}"
    then = run.get("input", {})
    for field in ("n_obs", "n_vars", "names_sha1"):
        if then.get(field) != fingerprint[field]:
            return f"it was computed on other cells or genes ({then.get('n_obs')} x {then.get('n_vars')})"
    if then.get("matrix") != fingerprint["matrix"]:
        return f"the values of {fingerprint['layer']} changed since (another graph or other data)"
    if then.get("columns") != fingerprint.get("columns"):
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
        why = _reusable(last_run(adata, settings), fingerprint)
        if why is None:
            logger.info("reusing the stored result of %r", settings)
            if restore is not None:
                restore(store[settings])
            if not adata.is_view:  # a view's uns is its parent's: leave the parent's records alone
                root(adata).setdefault("latest", {})[key_added] = settings.key()
            return store[settings]
        logger.info("recomputing %s: the stored result cannot be reused (%s)", type(settings).__name__, why)
    started, clock = now(), time.perf_counter()
    value, fields = run()
    if adata.is_view:  # its uns is its parent's: storing would change another object's results
        logger.info("%s ran on a view of an AnnData: the result is not stored", type(settings).__name__)
        return value
    fingerprint["columns"] = columns_digest(adata, settings)  # the run may have added a column its settings name
    put(adata, settings, value)
    root(adata).setdefault("latest", {})[key_added] = settings.key()
    record_run(
        adata,
        settings,
        key_added=key_added,
        fields=fields,
        started=started,
        seconds=time.perf_counter() - clock,
        fingerprint=fingerprint,
    )
    return value


# --------------------------------------------------------------------------- selecting stored results


_MISSING = object()


def _matches(settings: AnalysisSettings, filters: dict[str, Any]) -> bool:
    return all(getattr(settings, k, _MISSING) == _plain(v) for k, v in filters.items())


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
        latest = root(adata).get("latest", {})
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
    latest = root(adata).get("latest", {})
    rows = []
    for settings, value in store.items():
        run = last_run(adata, settings) or {}
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

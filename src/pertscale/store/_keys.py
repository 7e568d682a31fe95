"""Settings keys: the store's layout in ``uns``, its entries, and its form in files.

Each result is an entry ``uns['pertscale']['results'][entry_name(settings)]
= {'settings': settings.key(), 'result': result}``. Everything that turns
this layout into what a file can hold and back lives here: references to
arrays written once elsewhere in the file (``'ref:obsm/X_pca'``) and the
tokens of the matrices written, which a file read back takes as its own
(so results stored before writing are reused after reading).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from typing import Any

import anndata as ad
import numpy as np

from ..analysis import AnalysisSettings

#: ``adata.uns`` key of the store.
STORE = "pertscale"
#: Prefix of a stored reference to an array kept elsewhere in the same AnnData (``'ref:obsm/X_pca'``).
REF = "ref:"


def root(adata: ad.AnnData) -> dict:
    """``adata.uns['pertscale']``, created empty when missing."""
    found = adata.uns.get(STORE)
    if found is None:
        found = adata.uns[STORE] = {}
    return found


def entry_name(settings: AnalysisSettings) -> str:
    """The short name of a result's entry: ``'<Class>-<first 12 hex of the key's SHA-1>'``."""
    return f"{type(settings).__name__}-{hashlib.sha1(settings.key().encode()).hexdigest()[:12]}"


@functools.lru_cache(maxsize=4096)
def parse_key(key: str) -> AnalysisSettings:
    """The settings object of a stored key (cached: keys are parsed at every read of the store)."""
    return AnalysisSettings.from_key(key)


def location(settings: AnalysisSettings) -> str:
    """Where a result is stored, as the history names fields: ``'uns/pertscale/results/<key>'``."""
    return f"uns/{STORE}/results/{settings.key()}"


def results(adata: ad.AnnData) -> dict[AnalysisSettings, Any]:
    """The stored results of ``adata`` as a new dict ``{settings: result}``, in the order they were stored.

    The results are the stored objects themselves; to store one use
    :func:`put` (this dict is a view built for reading).
    """
    ensure_result_keys(adata)
    entries = (adata.uns.get(STORE) or {}).get("results") or {}
    return {parse_key(e["settings"]): e["result"] for e in entries.values()}


def put(adata: ad.AnnData, settings: AnalysisSettings, value) -> None:
    """Store ``value`` as the result of ``settings`` (replacing an equal one; moved to the end)."""
    entries = root(adata).setdefault("results", {})
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
    found = adata.uns.get(STORE)
    if not isinstance(found, dict):
        return adata
    _alias_written(adata, found)
    if not found.get("results"):
        return adata
    entries = {}
    for name, value in found["results"].items():
        if isinstance(value, dict) and set(value) == {"settings", "result"}:
            settings = parse_key(str(value["settings"]))
            value = value["result"]
        else:  # {settings object or key string: result}
            settings = name if isinstance(name, AnalysisSettings) else parse_key(str(name))
        entries[entry_name(settings)] = {"settings": settings.key(), "result": _resolve_refs(adata, value)}
    old = found["results"]
    same = list(entries) == list(old) and all(
        isinstance(old[n], dict) and old[n].get("settings") == e["settings"] and old[n].get("result") is e["result"]
        for n, e in entries.items()
    )
    if not same:
        found["results"] = entries
    return adata


# --------------------------------------------------------------------------- the form in files


def serialized_store(adata: ad.AnnData, *, written: set[str] | None = None) -> dict | None:
    """A copy of ``uns['pertscale']`` for :func:`pertscale.write`: shared arrays as references, matrix tokens.

    A result array that is the very object at ``obsm/<key>``, ``varm/<key>``
    or ``layers/<key>`` of ``adata`` (PCA's scores and loadings) is stored
    as a reference to it when that element is written too (``written``: the
    ``'attr/key'`` names that will be; default all), so it is written once.
    """
    ensure_result_keys(adata)
    found = adata.uns.get(STORE)
    if not isinstance(found, dict):
        return None
    out = dict(found)
    out.pop("matrix_aliases", None)  # names of this process's Dask graphs
    out.pop("written_matrices", None)
    if found.get("results"):
        out["results"] = {
            name: {"settings": e["settings"], "result": _with_refs(adata, e["result"], written)}
            for name, e in found["results"].items()
        }
    return out


def _shared_elements(adata: ad.AnnData, written: set[str] | None) -> dict[int, str]:
    shared = {}
    for attr in ("obsm", "varm", "layers"):
        for key, value in getattr(adata, attr).items():
            name = f"{attr}/{key}"
            if written is None or name in written:
                shared[id(value)] = name
    return shared


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


def _alias_written(adata: ad.AnnData, found: dict) -> None:
    """The matrices of a file as the tokens of the matrices written to it (once, right after reading)."""
    written = found.pop("written_matrices", None)
    if not isinstance(written, dict):
        return
    aliases = dict(found.get("matrix_aliases") or {})
    pairs = [(None, written.get("X"))] + [(k, v) for k, v in (written.get("layers") or {}).items()]
    for layer, token in pairs:
        if token is None or (layer is not None and layer not in adata.layers):
            continue
        current = matrix_token(adata, layer, aliased=False)
        if current is not None:
            aliases[current] = str(token)
    found["matrix_aliases"] = aliases

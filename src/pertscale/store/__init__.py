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

The package is split by concern, each part importing only those before it:

- ``_keys``: settings keys, the layout in ``uns``, reading and putting
  entries, and the form in files (:func:`ensure_result_keys`,
  :func:`serialized_store`, references, matrix tokens);
- ``_history``: run records, :class:`RunInfo`, :func:`history`, :func:`cleanup`;
- ``_results``: input fingerprints, reuse by settings (:func:`cached`),
  :func:`select` and :func:`summary`.

The store imports no analysis (``pertscale.pp``, ``tl``, ``pb``, ``io``)
and nothing of the face (``cluster``, the compute module, the main job):
running a recorded analysis again is :func:`pertscale.get.rerun`. The
``.importlinter`` contracts check this (``lint-imports``).
"""

from ._history import DEFAULT_KEEP_LAYERS, PER_CELL_ENTRIES, VERSIONED, RunInfo, cleanup, history
from ._keys import (
    REF,
    STORE,
    ensure_result_keys,
    entry_name,
    matrix_token,
    put,
    results,
    serialized_store,
    written_matrices,
)
from ._results import COLUMN_FIELDS, cached, columns_digest, input_fingerprint, select, summary

__all__ = [
    "COLUMN_FIELDS",
    "DEFAULT_KEEP_LAYERS",
    "PER_CELL_ENTRIES",
    "REF",
    "STORE",
    "VERSIONED",
    "RunInfo",
    "cached",
    "cleanup",
    "columns_digest",
    "ensure_result_keys",
    "entry_name",
    "history",
    "input_fingerprint",
    "matrix_token",
    "put",
    "results",
    "select",
    "serialized_store",
    "summary",
    "written_matrices",
]

"""Per-gene moments and Gram matrices of one CSR row block: the kernels of HVG and PCA.

Every function here takes one in-memory row block (``scipy.sparse.csr_matrix``
of ``n_rows x n_genes``) and returns float64 partial sums that add up across
blocks; nothing here knows about Dask or files.

- :func:`gene_moments`: per gene ``sum x``, ``sum x^2`` over the block's
  rows, with an optional transform of each stored value (``expm1``, to undo
  ``log1p`` as Seurat's dispersion does) and an optional per-gene upper clip
  (Seurat v3's ``min(x, mu + sqrt(n) * sigma_reg)``), plus the number of
  non-integer values and the largest value (what the callers check the kind
  of data with). Zeros contribute nothing to any of these, so only the
  stored values are visited.
- :func:`gram`: ``X_b^T X_b`` (genes x genes) and the column sums of the
  block's selected genes, in float64, computed on dense slabs of rows so
  that BLAS does the work and memory stays at one slab.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp

#: Rows of ``gene_moments``' output, by name.
MOMENTS = ("sum", "sum_squares", "n_noninteger", "n_nonfinite", "max")

#: Transforms of a stored value before it is summed.
TRANSFORMS = ("none", "expm1")


@numba.njit(cache=True, nogil=True)
def _moments(indices, data, n_genes, expm1, scale, clip):
    out = np.zeros((5, n_genes), dtype=np.float64)
    has_clip = clip.size > 0
    for k in range(data.size):
        j = indices[k]
        v = np.float64(data[k])
        if not np.isfinite(v):
            out[3, j] += 1.0
            continue
        if v != np.floor(v):
            out[2, j] += 1.0
        if v > out[4, j]:
            out[4, j] = v
        if expm1:
            v = np.expm1(v * scale)
        if has_clip and v > clip[j]:
            v = clip[j]
        out[0, j] += v
        out[1, j] += v * v
    return out


def gene_moments(block, *, transform: str = "none", scale: float = 1.0, clip: np.ndarray | None = None) -> np.ndarray:
    """Per-gene partial sums of one row block.

    Parameters
    ----------
    block
        ``(n_rows, n_genes)`` CSR block (or anything ``scipy.sparse.csr_matrix`` takes).
    transform
        ``"none"`` or ``"expm1"`` (natural ``exp(scale * x) - 1``, applied
        before clipping and summing).
    scale
        Factor of each value before ``expm1`` (``ln(base)`` for
        ``log1p`` data of another base).
    clip
        ``(n_genes,)`` float64 upper bound of each gene's (transformed)
        values, or ``None``.

    Returns
    -------
    numpy.ndarray
        ``(len(MOMENTS), n_genes)`` float64: ``sum``, ``sum_squares``,
        ``n_noninteger`` (finite stored values, before transform),
        ``n_nonfinite`` (NaN or infinite stored values, left out of every
        other statistic), ``max``
        (of the stored values before transform; 0 where a gene has none).
    """
    block = sp.csr_matrix(block)
    clip = np.empty(0, dtype=np.float64) if clip is None else np.asarray(clip, dtype=np.float64)
    return _moments(block.indices, block.data, block.shape[1], transform == "expm1", float(scale), clip)


def gram(block, *, slab_rows: int = 4_096) -> tuple[np.ndarray, np.ndarray]:
    """``X_b^T X_b`` and the column sums of one row block, in float64.

    Parameters
    ----------
    block
        ``(n_rows, n_genes)`` CSR block (or dense).
    slab_rows
        Rows densified at a time (memory: ``slab_rows x n_genes x 8`` bytes).

    Returns
    -------
    tuple of numpy.ndarray
        ``(n_genes, n_genes)`` Gram matrix and ``(n_genes,)`` column sums.
    """
    block = sp.csr_matrix(block)
    n_genes = block.shape[1]
    out = np.zeros((n_genes, n_genes), dtype=np.float64)
    sums = np.zeros(n_genes, dtype=np.float64)
    for start in range(0, block.shape[0], slab_rows):
        slab = block[start : start + slab_rows].toarray().astype(np.float64, copy=False)
        out += slab.T @ slab
        sums += slab.sum(axis=0)
    return out, sums


def project(block, components: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Scores of one row block on principal axes: ``(X_b - mean) @ components``.

    Parameters
    ----------
    block
        ``(n_rows, n_genes)`` CSR block.
    components
        ``(n_genes, n_comps)`` float64 principal axes (columns).
    mean
        ``(n_genes,)`` float64 gene means (implicit centering: the block is never densified).

    Returns
    -------
    numpy.ndarray
        ``(n_rows, n_comps)`` float64.
    """
    block = sp.csr_matrix(block)
    return np.asarray(block @ components) - mean @ components

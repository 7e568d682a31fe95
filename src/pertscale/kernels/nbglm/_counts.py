"""Raw counts as the negative-binomial kernels take them: the check, and the layout by gene.

Shared by :mod:`.dispersion` and :mod:`.glm`; pure numpy/scipy.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .._common import canonical_csr


def check_counts(block: sp.csr_matrix) -> None:
    """Raise ``ValueError`` unless the block holds non-negative whole numbers (raw counts).

    Raises
    ------
    ValueError
        Naming the problem and the fix (pass the raw counts layer).
    """
    data = block.data
    if data.size == 0:
        return
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            raise ValueError("the count matrix contains NaN or infinite values; nb-glm needs raw UMI counts")
        fractional = int((data != np.round(data)).sum())
        if fractional:
            raise ValueError(
                f"the matrix has {fractional:,} non-integer values: nb-glm models raw UMI counts, not normalized or "
                "log-transformed values; pass the raw counts (e.g. layer='counts', --layer counts or --use-raw)"
            )
    if data.min() < 0:
        raise ValueError("the count matrix contains negative values; nb-glm needs raw UMI counts")


def normalized_csc(block, size_factors: np.ndarray):
    """A block by gene: CSC (rows ascending within each gene), counts as float64, and counts / size factor.

    Returns
    -------
    tuple
        ``(indptr, rows, y, z)``: int64 ``(n_genes + 1,)`` and ``(nnz,)``,
        float64 ``(nnz,)`` counts ``y`` and ``z = y / s`` of their cells.
    """
    csc = canonical_csr(block).tocsc()
    csc.sort_indices()
    if (csc.data == 0).any():
        csc.eliminate_zeros()
    y = csc.data.astype(np.float64)
    return csc.indptr.astype(np.int64), csc.indices.astype(np.int64), y, y / size_factors[csc.indices]

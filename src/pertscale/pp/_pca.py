"""PCA out of core: the gene covariance with implicit centering, from per-block sums."""

from __future__ import annotations

import logging

import anndata as ad
import dask
import dask.array as da
import numpy as np

from .._progress import labelled
from .._validation import as_actual, check_number, get_matrix
from ..io._read import as_dask, per_block, select
from ..kernels.moments import gram, project

logger = logging.getLogger(__name__)

METHODS = ("auto", "covariance", "randomized")

#: Above this many genes ``method="auto"`` avoids the genes x genes matrix (200 MB in float64 at 5,000).
MAX_COVARIANCE_GENES = 5_000


def _gram_block(block):
    g, sums = gram(block)
    return np.vstack([g, sums[None]])[None]


def _power_block(block, omega):
    """``X_b^T (X_b @ omega)`` (rows of its transpose), column sums and sums of squares of one block."""
    import scipy.sparse as sp

    block = sp.csr_matrix(block)
    y = np.asarray(block @ omega)
    z = np.asarray(block.T @ y).T
    data = block.data.astype(np.float64)
    sums = np.bincount(block.indices, weights=data, minlength=block.shape[1])
    squares = np.bincount(block.indices, weights=data * data, minlength=block.shape[1])
    return np.vstack([z, sums[None], squares[None]])[None]


def _flip_signs(components: np.ndarray) -> np.ndarray:
    """Each axis (column) signed so that its largest absolute loading is positive (scikit-learn's ``svd_flip``)."""
    top = np.argmax(np.abs(components), axis=0)
    signs = np.sign(components[top, np.arange(components.shape[1])])
    signs[signs == 0] = 1
    return components * signs


def _covariance(x: da.Array, n_comps: int):
    n, p = x.shape
    with labelled("PCA (covariance)"):
        (parts,) = dask.compute(per_block(_gram_block, p + 1, (x, "bj")).sum(axis=0, split_every=4))
    mean = parts[p] / n
    cov = (parts[:p] - n * np.outer(mean, mean)) / (n - 1)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:n_comps]
    return mean, values[order], vectors[:, order], float(np.trace(cov)), 1


def _randomized(x: da.Array, n_comps: int, *, n_oversamples: int, n_iter: int, random_state):
    """Subspace iteration on the implicitly centred covariance, then Rayleigh-Ritz (Halko et al. 2011, alg. 4.4)."""
    n, p = x.shape
    width = min(p, n_comps + n_oversamples)
    omega = np.random.default_rng(random_state).standard_normal((p, width))
    omega, _ = np.linalg.qr(omega)
    mean = squares = None
    for i in range(n_iter + 1):
        with labelled(f"PCA (randomized, pass {i + 1} of {n_iter + 1})"):
            (parts,) = dask.compute(per_block(_power_block, width + 2, (x, "bj"), omega).sum(axis=0, split_every=4))
        if mean is None:
            mean, squares = parts[width] / n, parts[width + 1]
        # C @ omega with C = (X^T X - n mean mean^T) / (n - 1): the centred matrix is never formed
        c_omega = (parts[:width].T - n * np.outer(mean, mean @ omega)) / (n - 1)
        if i == n_iter:
            break
        omega, _ = np.linalg.qr(c_omega)
    small = omega.T @ c_omega
    values, rotation = np.linalg.eigh((small + small.T) / 2)
    order = np.argsort(values)[::-1][:n_comps]
    total = float((squares - n * mean**2).sum() / (n - 1))
    return mean, values[order], omega @ rotation[:, order], total, n_iter + 1


def pca(
    adata: ad.AnnData,
    *,
    n_comps: int = 50,
    use_highly_variable: bool | None = None,
    method: str = "auto",
    layer: str | None = None,
    n_oversamples: int = 50,
    n_iter: int = 6,
    random_state: int = 0,
    key_added: str | None = None,
    force: bool = False,
) -> None:
    """Principal components of the genes, out of core, with implicit centering.

    Computes the covariance (one pass; one per iteration of
    ``method='randomized'``) here (plain ``dask.compute``: on the scheduler
    of the enclosing face, :func:`pertscale.cluster.using`, or Dask's
    current one); the scores ``obsm['X_pca']`` stay lazy for a lazy matrix.

    ``method="covariance"``: one pass sums each row block's Gram matrix
    ``X_b^T X_b`` and column sums (tree-reduced); the covariance
    ``(X^T X - n mu mu^T) / (n - 1)`` is eigendecomposed in memory
    (``numpy.linalg.eigh``). Exact; memory ``n_genes^2`` float64.
    ``method="randomized"``: randomized subspace iteration on the same
    implicitly centred covariance (Halko, Martinsson & Tropp 2011, SIAM
    Review 53:217, algorithm 4.4 with Rayleigh-Ritz), one pass per
    iteration, memory ``n_genes x (n_comps + n_oversamples)``; approximate
    for the trailing components. ``"auto"``: covariance up to 5,000 genes.
    The scores ``(X - mu) V`` are a lazy blockwise product, computed where
    the caller computes (``ps.write``, ``ps.compute``). The centred matrix
    is never formed, so sparse blocks stay sparse.

    Equal to ``scanpy.pp.pca`` (ARPACK, ``zero_center=True``) up to the sign
    of each axis; axes are signed as scikit-learn signs them (largest
    absolute loading positive).

    Parameters
    ----------
    adata
        ``n_obs x n_vars`` log1p-normalized values (natural log) in ``X`` or
        ``layers[layer]``, lazy or in memory.
    n_comps
        Number of components; less than both the cells and the genes used.
    use_highly_variable
        Use only the genes of ``var['highly_variable']``; ``None``: if that
        column exists.
    method
        ``"auto"``, ``"covariance"`` or ``"randomized"``.
    layer
        Use ``layers[layer]`` instead of ``X``.
    n_oversamples, n_iter, random_state
        Extra dimensions of the random subspace, its power iterations and
        the seed of its start (``method="randomized"``).
    key_added
        As scanpy: ``None`` writes ``obsm['X_pca']``, ``varm['PCs']`` and
        ``uns['pca']``; a name writes ``obsm[key_added]``,
        ``varm[key_added]`` and ``uns[key_added]``. Also the readable name
        of the result in the result store (default ``"pca"``).
    force
        Compute again even when a result with equal settings is stored.

    Returns
    -------
    None
        Writes, as scanpy does: ``obsm['X_pca']`` (``n_obs x n_comps``
        float64 scores; a Dask array when the input is lazy),
        ``varm['PCs']`` (``n_vars x n_comps`` loadings; zero for genes not
        used), ``uns['pca']`` with ``variance`` (eigenvalues of the
        covariance, ``n_comps``), ``variance_ratio`` (their share of the
        total variance of the genes used) and ``params``. The same arrays
        are kept in ``adata``'s result store, keyed by
        :class:`pertscale.PCASettings` (with a digest of the genes used):
        asked again with equal settings, they are put back without a pass.

    Raises
    ------
    ValueError
        For an unknown method, ``n_comps`` not below both the number of
        cells and of genes used, ``n_iter`` above 100 (each is a pass),
        ``random_state`` not a whole number >= 0, no highly variable genes,
        or non-finite values.
    KeyError
        If ``use_highly_variable=True`` without ``var['highly_variable']``,
        or the layer is missing.

    Notes
    -----
    On a view (``adata[mask]``), ``adata`` first becomes an actual AnnData
    holding a copy of its data, as scanpy does (anndata's
    ``ImplicitModificationWarning``); its parent is left as it was.
    """
    from ..analysis import PCASettings, array_digest, build
    from ..store import cached

    _check_method(method)
    n_iter = _check_n_iter(n_iter)
    random_state = check_number(random_state, "random_state", integer=True, minimum=0)  # numpy's seeds
    if use_highly_variable is None:
        use_highly_variable = "highly_variable" in adata.var.columns
    use_hvg = bool(use_highly_variable) and "highly_variable" in adata.var.columns
    settings = build(
        PCASettings,
        n_comps=n_comps,
        use_highly_variable=bool(use_highly_variable),
        solver=method,
        layer=layer,
        n_oversamples=n_oversamples,
        n_iter=n_iter,
        random_state=random_state,
        genes=array_digest(adata.var["highly_variable"].to_numpy(dtype=bool)) if use_hvg else None,
    )
    obsm_key, varm_key, uns_key = ("X_pca", "PCs", "pca") if key_added is None else (key_added,) * 3

    def restore(stored: dict) -> None:
        as_actual(adata)  # a view becomes an actual AnnData (a copy), as scanpy's: its parent is not written to
        adata.obsm[obsm_key] = stored["X_pca"]
        adata.varm[varm_key] = stored["PCs"]
        adata.uns[uns_key] = {
            "variance": stored["variance"],
            "variance_ratio": stored["variance_ratio"],
            "params": {"zero_center": True, "use_highly_variable": bool(use_highly_variable), "method": method},
        }

    def run():
        scores, loadings, variance, total = _pca(
            adata,
            n_comps=n_comps,
            use_highly_variable=use_highly_variable,
            method=method,
            layer=layer,
            n_oversamples=n_oversamples,
            n_iter=n_iter,
            random_state=random_state,
        )
        stored = {"X_pca": scores, "PCs": loadings, "variance": variance, "variance_ratio": variance / total}
        restore(stored)
        return stored, [f"obsm/{obsm_key}", f"varm/{varm_key}", f"uns/{uns_key}"]

    cached(adata, settings, run, key_added=key_added or "pca", force=force, restore=restore)


#: Most power iterations of ``method="randomized"`` (each one a pass over the matrix).
MAX_ITER = 100


def _check_n_iter(n_iter) -> int:
    return check_number(
        n_iter,
        "n_iter",
        integer=True,
        minimum=0,
        maximum=MAX_ITER,
        why="each iteration is a pass over the matrix, and subspace iteration converges geometrically: a few "
        "are enough (6 by default; scikit-learn takes 4 to 7)",
    )


def _check_method(method) -> None:
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not known; use one of {', '.join(map(repr, METHODS))}")


def _pca(
    adata: ad.AnnData,
    *,
    n_comps,
    use_highly_variable,
    method,
    layer,
    n_oversamples,
    n_iter,
    random_state,
):
    """Scores, loadings, variances and total variance of :func:`pca`, without the store (``adata`` not changed)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not known; use one of {', '.join(map(repr, METHODS))}")
    n_comps = check_number(n_comps, "n_comps", integer=True, minimum=1)
    n_oversamples = check_number(n_oversamples, "n_oversamples", integer=True, minimum=0)
    n_iter = _check_n_iter(n_iter)
    if use_highly_variable is None:
        use_highly_variable = "highly_variable" in adata.var.columns
    if use_highly_variable:
        if "highly_variable" not in adata.var.columns:
            raise KeyError("use_highly_variable=True but var['highly_variable'] is missing; run highly_variable_genes")
        genes = adata.var["highly_variable"].to_numpy(dtype=bool)
        if not genes.any():
            raise ValueError("var['highly_variable'] marks no gene; select genes first or use_highly_variable=False")
    else:
        genes = np.ones(adata.n_vars, dtype=bool)
    matrix = get_matrix(adata, layer)
    x = select(as_dask(matrix), cols=genes if not genes.all() else None)
    n, p = x.shape
    if n_comps >= min(n, p):
        raise ValueError(
            f"n_comps={n_comps} must be below both the number of cells ({n:,}) and of genes used ({p:,}); "
            f"pass n_comps={max(1, min(n, p) - 1)} or fewer"
        )
    if method == "auto":
        method = "covariance" if p <= MAX_COVARIANCE_GENES else "randomized"
    if method == "covariance":
        mean, variance, axes, total, passes = _covariance(x, n_comps)
    else:
        mean, variance, axes, total, passes = _randomized(
            x,
            n_comps,
            n_oversamples=n_oversamples,
            n_iter=n_iter,
            random_state=random_state,
        )
    if not (np.isfinite(variance).all() and np.isfinite(total)):
        raise ValueError("the matrix holds NaN or infinite values; PCA needs finite log1p-normalized values")
    axes = _flip_signs(axes)
    logger.info("pca (%s, %d passes): %d components of %d genes x %d cells", method, passes, n_comps, p, n)
    scores = x.map_blocks(
        project, axes, mean, dtype=np.float64, chunks=(x.chunks[0], (n_comps,)), meta=np.empty((0, 0))
    )
    if not isinstance(matrix, da.Array):
        (scores,) = dask.compute(scores)  # an in-memory matrix gets its scores in memory, as scanpy
    loadings = np.zeros((adata.n_vars, n_comps), dtype=np.float64)
    loadings[genes] = axes
    return scores, loadings, variance, total

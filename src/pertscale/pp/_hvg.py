"""Highly variable genes from per-gene moments: one pass (two for Seurat v3)."""

from __future__ import annotations

import logging
import warnings

import anndata as ad
import dask
import numpy as np
import pandas as pd

from .._progress import labelled
from .._validation import (
    as_actual,
    check_control,
    check_number,
    get_matrix,
    log1p_record,
    obs_categorical,
    perturbation_labels,
)
from ..io._read import as_dask, per_block, select
from ..kernels.moments import MOMENTS, gene_moments

logger = logging.getLogger(__name__)

FLAVORS = ("seurat", "cell_ranger", "seurat_v3")

#: Largest per-block array of per-batch sums (``n_batches x len(MOMENTS) x n_vars`` float64).
MAX_BATCH_BYTES = 256 * 2**20


def _moments_block(block, batches, n_batches, transform, scale, clip):
    """``gene_moments`` of each batch's rows of one block: ``(1, n_batches * len(MOMENTS), n_genes)``."""
    import scipy.sparse as sp

    block = sp.csr_matrix(block)
    out = np.zeros((n_batches, len(MOMENTS), block.shape[1]))
    for b in np.unique(batches):
        rows = block if n_batches == 1 else block[batches == b]
        out[b] = gene_moments(rows, transform=transform, scale=scale, clip=None if clip is None else clip[b])
    return out.reshape(1, -1, block.shape[1])


def _moments(x, batches, n_batches, *, transform="none", scale=1.0, clip=None, desc) -> dict:
    """One pass: per batch and gene each statistic of ``MOMENTS``: ``(n_batches, n_genes)`` arrays by name."""
    import dask.array as da

    codes = da.from_array(batches, chunks=(x.chunks[0],))
    parts = per_block(
        _moments_block, n_batches * len(MOMENTS), (x, "bj"), (codes, "b"), n_batches, transform, scale, clip
    )
    parts = parts.reshape(parts.shape[0], n_batches, len(MOMENTS), x.shape[1])
    top = MOMENTS.index("max")
    with labelled(desc):
        sums, peak = dask.compute(
            parts[:, :, :top].sum(axis=0, split_every=8), parts[:, :, top].max(axis=0, split_every=8)
        )
    return {name: sums[:, i] for i, name in enumerate(MOMENTS[:top])} | {"max": peak}


def _mean_var(total: np.ndarray, squares: np.ndarray, n) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance (ddof 1, as scanpy and R) from sums over ``n`` cells."""
    n = np.asarray(n, dtype=np.float64)
    mean = total / n
    var = squares / n - mean**2
    return mean, np.where(n > 1, var * (n / np.maximum(n - 1, 1)), var)


def _batches(obs: pd.DataFrame, batch_key: str | None) -> tuple[np.ndarray, list[str]]:
    """Batch code of every cell and the batch names (one batch without ``batch_key``)."""
    if batch_key is None:
        return np.zeros(len(obs), dtype=np.int64), ["all"]
    cat = obs_categorical(obs, batch_key, what="batch_key", fix="give those cells a batch or drop them")
    cat = cat.remove_unused_categories()
    return np.asarray(cat.codes, dtype=np.int64), [str(c) for c in cat.categories]


def _check_kind(m: dict[str, np.ndarray], flavor: str) -> None:
    nonfinite = int(m["n_nonfinite"].sum())
    if nonfinite:
        raise ValueError(
            f"the matrix holds {nonfinite:,} NaN or infinite values; highly variable genes need finite values: "
            "remove or impute them first"
        )
    noninteger = int(m["n_noninteger"].sum())
    if flavor == "seurat_v3" and noninteger:
        raise ValueError(
            f"flavor='seurat_v3' expects raw counts, but the matrix holds {noninteger:,} non-integer values "
            "(normalized or log data); run it before normalize_total/log1p, or pass the counts layer (layer=...)"
        )
    if flavor != "seurat_v3" and not noninteger and float(m["max"].max(initial=0)) > 0:
        raise ValueError(
            f"flavor={flavor!r} expects log1p-normalized data, but every value is an integer (raw counts?); "
            "run ps.pp.normalize_total and ps.pp.log1p first, or use flavor='seurat_v3' on raw counts"
        )


def _dispersion_table(mean, var, *, flavor: str, n_bins: int) -> pd.DataFrame:
    """Dispersions normalized within bins of mean expression (Seurat; Cell Ranger by percentiles), as scanpy."""
    mean = mean.copy()
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    if flavor == "seurat":
        dispersion[dispersion == 0] = np.nan
        dispersion = np.log(dispersion)
        mean = np.log1p(mean)
        bins = n_bins
    else:
        bins = np.r_[-np.inf, np.percentile(mean, np.arange(10, 105, 5)), np.inf]
    df = pd.DataFrame({"means": mean, "dispersions": dispersion})
    df["mean_bin"] = pd.cut(df["means"], bins=bins)
    grouped = df.groupby("mean_bin", observed=True)["dispersions"]
    if flavor == "seurat":
        stats = grouped.agg(avg="mean", dev="std")
        single = stats["dev"].isnull()  # one gene in the bin: its normalized dispersion is set to 1
        stats.loc[single, "dev"] = stats.loc[single, "avg"]
        stats.loc[single, "avg"] = 0
    else:
        stats = grouped.agg(avg="median", dev=_mad)
    stats = stats.loc[df["mean_bin"]].set_index(df.index)
    df["dispersions_norm"] = (df["dispersions"] - stats["avg"]) / stats["dev"]
    return df


def _mad(values) -> float:
    """Median absolute deviation scaled to the normal's standard deviation (statsmodels' ``mad``)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return np.nan
    return float(np.median(np.abs(values - np.median(values))) / 0.6744897501960817)


def _top(score: np.ndarray, n_top_genes: int) -> np.ndarray:
    """Genes whose score is at least the ``n_top_genes``-th highest (NaN never selected), as scanpy."""
    finite = score[~np.isnan(score)]
    if finite.size == 0:
        return np.zeros(score.shape, dtype=bool)
    n = min(n_top_genes, finite.size)
    cut = np.sort(finite)[::-1][n - 1]
    return np.nan_to_num(score, nan=-np.inf) >= cut


def _seurat_v3(x, m, batches, n_cells, *, n_top_genes: int, span: float) -> pd.DataFrame:
    """Seurat v3 (``vst``): variance of values standardized by a loess fit of log variance on log mean, clipped.

    Per batch (``n_cells[b]`` cells): the loess, the clip and the normalized
    variance; genes ranked within each batch, then by their median rank
    among the batches where they are in the top ``n_top_genes`` (ties: in
    more batches first), as scanpy's ``seurat_v3``.
    """
    try:
        from skmisc.loess import loess
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("flavor='seurat_v3' needs scikit-misc: pip install scikit-misc") from err
    n_batches = len(n_cells)
    mean, var = _mean_var(m["sum"], m["sum_squares"], n_cells[:, None])
    reg_std = np.ones_like(mean)
    for b in range(n_batches):
        not_const = var[b] > 0
        n_fit = int(not_const.sum())
        # a local quadratic needs 3 points in each window; with fewer than 1 scikit-misc crashes the process
        if span * n_fit < 3:
            raise ValueError(
                f"span={span} puts {span * n_fit:.2g} genes in each loess window (span x the {n_fit:,} genes with "
                f"a non-zero variance{' in batch ' + str(b) if n_batches > 1 else ''}); the degree-2 fit of "
                f"flavor='seurat_v3' needs at least 3: use span >= {min(1.0, 3 / max(n_fit, 1)):.3g} (0.3 is usual)"
            )
        model = loess(np.log10(mean[b, not_const]), np.log10(var[b, not_const]), span=span, degree=2)
        try:
            model.fit()
        except ValueError as err:  # scikit-misc's own words (e.g. 'k-d tree limited by memory'): too few points
            raise ValueError(
                f"the loess fit of flavor='seurat_v3' failed ({err}) with span={span} over {n_fit:,} genes "
                f"({span * n_fit:.0f} in each window): use a larger span (0.3 is usual), or more genes"
            ) from err
        reg_std[b, not_const] = np.sqrt(10**model.outputs.fitted_values)
    clip = reg_std * np.sqrt(n_cells)[:, None] + mean
    clipped = _moments(x, batches, n_batches, clip=clip, desc="HVG (clipped)")
    n = n_cells[:, None].astype(np.float64)
    norm_var = (n * mean**2 + clipped["sum_squares"] - 2 * clipped["sum"] * mean) / ((n - 1) * reg_std**2)
    rank = np.argsort(np.argsort(-norm_var, axis=1), axis=1).astype(np.float32)
    n_batches_hv = (rank < n_top_genes).sum(axis=0)
    rank[rank >= n_top_genes] = np.nan
    median = np.ma.median(np.ma.masked_invalid(rank), axis=0).filled(np.nan)
    all_mean, all_var = _mean_var(m["sum"].sum(0), m["sum_squares"].sum(0), n_cells.sum())
    df = pd.DataFrame({"means": all_mean, "variances": all_var, "variances_norm": norm_var.mean(axis=0)})
    df["highly_variable_rank"] = median
    df["highly_variable_nbatches"] = n_batches_hv
    order = df.sort_values(
        ["highly_variable_rank", "highly_variable_nbatches"], ascending=[True, False], na_position="last"
    ).index
    df["highly_variable"] = False
    df.loc[order[:n_top_genes], "highly_variable"] = True
    return df


def _dispersion_batched(m, n_cells, *, flavor: str, n_bins: int, n_top_genes, cutoffs) -> pd.DataFrame:
    """``seurat``/``cell_ranger`` with batches, as scanpy: per batch on its expressed genes, then merged.

    Within a batch, genes with no count there are left out of the bins and
    count as 0; the batches' ``means``, ``dispersions`` and
    ``dispersions_norm`` are averaged; with ``n_top_genes`` genes are ranked
    by the number of batches that select them, then by ``dispersions_norm``.
    """
    n_batches, n_genes = m["sum"].shape
    columns = ("means", "dispersions", "dispersions_norm")
    per_batch = {c: np.zeros((n_batches, n_genes)) for c in columns}  # 0 where the batch has no count
    n_selected = np.zeros(n_genes, dtype=np.int64)
    for b in range(n_batches):
        mean, var = _mean_var(m["sum"][b], m["sum_squares"][b], n_cells[b])
        expressed = m["sum"][b] > 0
        df = _dispersion_table(mean[expressed], var[expressed], flavor=flavor, n_bins=n_bins)
        for c in columns:
            per_batch[c][b, expressed] = df[c].to_numpy()
        n_selected[expressed] += _select(df, n_top_genes=n_top_genes, cutoffs=cutoffs)
    with warnings.catch_warnings():  # a gene NaN in every batch stays NaN, as pandas' mean leaves it
        warnings.simplefilter("ignore", RuntimeWarning)
        df = pd.DataFrame({c: np.nanmean(per_batch[c], axis=0) for c in columns})
    df["highly_variable_nbatches"] = n_selected
    df["highly_variable_intersection"] = n_selected == n_batches
    if n_top_genes is not None:
        order = df.sort_values(
            ["highly_variable_nbatches", "dispersions_norm"], ascending=False, na_position="last"
        ).index
        df["highly_variable"] = False
        df.loc[order[:n_top_genes], "highly_variable"] = True
    else:
        df["dispersions_norm"] = df["dispersions_norm"].fillna(0)
        df["highly_variable"] = _in_bounds(df["means"].to_numpy(), df["dispersions_norm"].to_numpy(), cutoffs)
    return df


def _in_bounds(means, norm, cutoffs) -> np.ndarray:
    min_mean, max_mean, min_disp, max_disp = cutoffs
    return (means > min_mean) & (means < max_mean) & (norm > min_disp) & (norm < max_disp)


def _select(df: pd.DataFrame, *, n_top_genes, cutoffs) -> np.ndarray:
    """The rule of scanpy on one table: the top ``n_top_genes`` by ``dispersions_norm``, else the cutoffs."""
    if n_top_genes is not None:
        return _top(df["dispersions_norm"].to_numpy(), min(n_top_genes, df.shape[0]))
    return _in_bounds(df["means"].to_numpy(), np.nan_to_num(df["dispersions_norm"].to_numpy()), cutoffs)


def _check_flavor(flavor) -> None:
    if flavor not in FLAVORS:
        raise ValueError(f"flavor {flavor!r} is not known; use one of {', '.join(map(repr, FLAVORS))}")


def highly_variable_genes(
    adata: ad.AnnData,
    *,
    flavor: str = "seurat",
    n_top_genes: int | None = None,
    min_mean: float = 0.0125,
    max_mean: float = 3.0,
    min_disp: float = 0.5,
    max_disp: float = np.inf,
    n_bins: int = 20,
    span: float = 0.3,
    layer: str | None = None,
    batch_key: str | None = None,
    control_only: bool = False,
    perturbation_column: str | None = None,
    control_label: str | None = None,
    inplace: bool = True,
    key_added: str = "hvg",
    force: bool = False,
) -> pd.DataFrame | None:
    """Annotate highly variable genes, streaming over row blocks.

    Computes one pass over the matrix (two for ``seurat_v3``) here (plain
    ``dask.compute``: on the scheduler of the enclosing face,
    :func:`pertscale.cluster.using`, or Dask's current one); the per-gene
    table is small.

    The flavors and their selection rules are scanpy's
    (``scanpy.pp.highly_variable_genes``, ``batch_key`` included), computed
    from per-gene (and per-batch) sums over row blocks instead of the matrix
    in memory:

    - ``"seurat"`` (Satija et al. 2015, Seurat's ``mean.var.plot``): on
      log1p-normalized data, mean and variance of ``expm1(x)``, log
      dispersion ``log(var / mean)`` normalized within 20 equal-width bins
      of ``log1p(mean)`` (z-score per bin). One pass.
    - ``"cell_ranger"`` (Zheng et al. 2017): on log1p-normalized data,
      dispersion ``var / mean`` normalized by median and MAD within bins
      at the 10th, 15th, ..., 100th percentiles of the mean. One pass.
    - ``"seurat_v3"`` (Stuart et al. 2019, Seurat's ``vst``): on raw counts,
      a loess fit (scikit-misc, ``span``, degree 2) of ``log10`` variance
      on ``log10`` mean gives a regularized standard deviation per gene;
      values clipped at ``mean + sqrt(n_obs) * sd_reg`` are standardized
      and their variance ranks the genes. Two passes (moments, then clipped
      moments); ``n_top_genes`` is required.

    Parameters
    ----------
    adata
        ``n_obs x n_vars``: log1p-normalized values (``seurat``,
        ``cell_ranger``; natural log, as ``ps.pp.log1p``) or raw counts
        (``seurat_v3``), in ``X`` or ``layers[layer]``; lazy or in memory.
    flavor
        One of ``"seurat"``, ``"cell_ranger"``, ``"seurat_v3"``.
    n_top_genes
        Number of genes to select; for ``seurat``/``cell_ranger`` it
        replaces the mean and dispersion cutoffs.
    min_mean, max_mean, min_disp, max_disp
        Cutoffs (exclusive) on ``means`` and ``dispersions_norm`` when
        ``n_top_genes`` is not given (``seurat``/``cell_ranger``).
    n_bins
        Bins of mean expression (``seurat``); at most the number of genes.
    span
        Fraction of genes in each loess window (``seurat_v3``); each window
        must hold at least 3 genes (``span x genes >= 3``).
    layer
        Use ``layers[layer]`` instead of ``X``.
    batch_key
        An ``obs`` column (e.g. a replicate): genes are selected within each
        batch and merged as scanpy merges them (``seurat``/``cell_ranger``:
        by the number of batches that select a gene, then the mean
        normalized dispersion; ``seurat_v3``: by the median rank, then the
        number of batches); adds ``highly_variable_nbatches`` (and
        ``highly_variable_intersection`` for the dispersion flavors). The
        same passes as without batches.
    control_only
        Compute the statistics on the control cells only (needs
        ``perturbation_column`` and ``control_label``): genes variable
        among unperturbed cells, not variable because of the perturbations.
    perturbation_column, control_label
        Where the control cells are (``control_only=True``).
    inplace
        Write the columns into ``adata.var`` (default) or return them.
    key_added
        Readable name of this result in the result store.
    force
        Compute again even when a result with equal settings is stored.

    Returns
    -------
    pandas.DataFrame or None
        Per gene (``n_vars`` rows): ``highly_variable`` (bool), ``means``
        and, for ``seurat``/``cell_ranger``, ``dispersions`` and
        ``dispersions_norm`` (``seurat``: ``means`` is ``log1p`` of the mean
        of ``expm1(x)`` and dispersions are natural logs); for
        ``seurat_v3``, ``variances``, ``variances_norm`` and
        ``highly_variable_rank`` (0 = most variable; NaN outside the top).
        With ``inplace=True`` they go to ``adata.var`` and
        ``adata.uns['hvg'] = {'flavor': flavor}``. Either way they are stored
        in ``adata``'s result store, keyed by :class:`pertscale.HVGSettings`:
        asked again with equal settings, no pass is made (the stored columns
        are put back in ``var``).

    Raises
    ------
    ValueError
        For an unknown flavor, ``seurat_v3`` without ``n_top_genes`` or on
        data with non-integer values, ``seurat``/``cell_ranger`` on raw
        counts (every value an integer), non-finite or out-of-range
        numbers (``n_bins`` above the number of genes, loess windows of
        fewer than 3 genes, or a loess fit that fails), ``control_only``
        without the control's column and label, or fewer than 2 cells.
    KeyError
        If the layer, the perturbation column or the batch column is missing.

    Notes
    -----
    With ``inplace=True`` on a view (``adata[mask]``), ``adata`` first
    becomes an actual AnnData holding a copy of its data, as scanpy does
    (anndata's ``ImplicitModificationWarning``); its parent is left as it
    was.
    """
    from ..analysis import HVGSettings, build
    from ..store import cached

    options = dict(
        flavor=flavor,
        n_top_genes=n_top_genes,
        min_mean=min_mean,
        max_mean=max_mean,
        min_disp=min_disp,
        max_disp=max_disp,
        n_bins=n_bins,
        span=span,
        layer=layer,
        batch_key=batch_key,
        control_only=control_only,
        perturbation_column=perturbation_column,
        control_label=None if control_label is None else str(control_label),
    )
    _check_flavor(flavor)
    settings = build(HVGSettings, **options)

    def restore(df: pd.DataFrame) -> None:
        if inplace:
            as_actual(adata)  # a view becomes an actual AnnData (a copy), as scanpy's: its parent is not written to
            for col in df.columns:
                adata.var[col] = df[col].to_numpy()
            adata.uns["hvg"] = {"flavor": flavor}

    def run():
        df = _highly_variable_genes(adata, **options)
        restore(df)
        return df, [f"var/{c}" for c in df.columns] + ["uns/hvg"] if inplace else []

    df = cached(adata, settings, run, key_added=key_added, force=force, restore=restore)
    return None if inplace else df.copy()


def _highly_variable_genes(
    adata: ad.AnnData,
    *,
    flavor,
    n_top_genes,
    min_mean,
    max_mean,
    min_disp,
    max_disp,
    n_bins,
    span,
    layer,
    batch_key,
    control_only,
    perturbation_column,
    control_label,
) -> pd.DataFrame:
    """:func:`highly_variable_genes`'s table, without the store (``adata`` is not changed)."""
    _check_flavor(flavor)
    n_top_genes = check_number(n_top_genes, "n_top_genes", integer=True, minimum=1, allow_none=True)
    if flavor == "seurat_v3" and n_top_genes is None:
        raise ValueError("flavor='seurat_v3' needs n_top_genes (e.g. n_top_genes=2000)")
    for name, value in {"min_mean": min_mean, "max_mean": max_mean, "min_disp": min_disp}.items():
        check_number(value, name)
    if not (isinstance(max_disp, int | float) and max_disp == np.inf):
        check_number(max_disp, "max_disp")
    n_bins = check_number(
        n_bins,
        "n_bins",
        integer=True,
        minimum=1,
        maximum=max(adata.n_vars, 1),
        why=f"bins of mean expression hold genes, and there are {adata.n_vars:,}; more bins than genes leave "
        "bins empty (and pandas makes every bin's edges)",
    )
    span = check_number(span, "span", minimum=0, maximum=1, min_open=True)
    x = as_dask(get_matrix(adata, layer))
    rows = np.ones(adata.n_obs, dtype=bool)
    if control_only:
        if perturbation_column is None or control_label is None:
            raise ValueError("control_only=True needs perturbation_column and control_label")
        labels = perturbation_labels(adata.obs, perturbation_column)
        rows = check_control(labels, control_label, perturbation_column)
        x = select(x, rows=rows)
    batches, names = _batches(adata.obs, batch_key)
    if len(names) * adata.n_vars * len(MOMENTS) * 8 > MAX_BATCH_BYTES:
        raise ValueError(
            f"batch_key={batch_key!r} has {len(names):,} batches: each block's sums would take "
            f"{len(names) * adata.n_vars * len(MOMENTS) * 8 / 2**20:,.0f} MiB; use a column with fewer batches "
            "(replicates, lanes), not one with a level per perturbation"
        )
    batches = batches[rows]
    n_cells = np.bincount(batches, minlength=len(names))
    if n_cells.min(initial=x.shape[0]) < 2:
        raise ValueError(
            f"highly variable genes need at least 2 cells{' per batch' if batch_key else ''}; got "
            + ", ".join(
                f"{n} ({name})" if batch_key else str(n)
                for n, name in list(zip(n_cells, names, strict=True))[:5]
                if n < 2 or not batch_key
            )
            + (" ..." if len(names) > 5 else "")
        )
    transform = "expm1" if flavor == "seurat" else "none"
    base = (log1p_record(adata, layer) or {}).get("base")
    scale = 1.0 if base is None else float(np.log(base))  # log1p of another base, undone as scanpy does
    m = _moments(x, batches, len(names), transform=transform, scale=scale, desc="HVG")
    _check_kind(m, flavor)
    cutoffs = (min_mean, max_mean, min_disp, max_disp)
    if flavor == "seurat_v3":
        df = _seurat_v3(x, m, batches, n_cells, n_top_genes=n_top_genes, span=span)
        if batch_key is None:
            df = df.drop(columns="highly_variable_nbatches")
    elif batch_key is not None:
        df = _dispersion_batched(m, n_cells, flavor=flavor, n_bins=n_bins, n_top_genes=n_top_genes, cutoffs=cutoffs)
    else:
        mean, var = _mean_var(m["sum"][0], m["sum_squares"][0], n_cells[0])
        df = _dispersion_table(mean, var, flavor=flavor, n_bins=n_bins).drop(columns="mean_bin")
        df["highly_variable"] = _select(df, n_top_genes=n_top_genes, cutoffs=cutoffs)
    df.index = adata.var_names
    logger.info("highly_variable_genes (%s): %d of %d genes", flavor, int(df["highly_variable"].sum()), df.shape[0])
    return df

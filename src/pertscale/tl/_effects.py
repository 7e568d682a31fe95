"""One row per perturbation (size, DE genes, knock-down, energy distance, transcriptome-wide impact); a long export.

:func:`effect_table` reduces each perturbation's row of a test's results
(row blocks, never the whole perturbations x genes array) and joins the
knock-down (:func:`pertscale.tl.knockdown`) and energy-distance
(:func:`pertscale.tl.energy_distance`) tables where they are given or
stored. :func:`write_long` writes every (perturbation, gene) pair as
Parquet, block by block.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd

from .._validation import check_number
from ..io._atomic import replacing
from ..variables import GENE, LFC_SE, LOGFOLDCHANGES, LOGFOLDCHANGES_RAW, PERTURBATION, PVALS, PVALS_ADJ, SCORES

logger = logging.getLogger(__name__)

#: The columns of the long export, in order.
LONG_COLUMNS = (PERTURBATION, GENE, LOGFOLDCHANGES, "standard_error", PVALS, PVALS_ADJ)


def _results_of(adata: ad.AnnData, method: str | None, perturbation_column: str | None) -> ad.AnnData:
    """``adata`` itself when it is a test's results, else the one its store holds for ``method``."""
    if PVALS in adata.layers and SCORES in adata.layers:
        return adata
    from ..store import select

    filters = {} if perturbation_column is None else {"perturbation_column": perturbation_column}
    _, results = select(adata, method=method, **filters)
    return results


def _stored_table(adata: ad.AnnData, method: str) -> pd.DataFrame | None:
    """The table stored in ``adata`` by the analysis ``method`` (knock-down, energy distance), or ``None``."""
    if PVALS in adata.layers:
        return None
    from ..store import select

    try:
        _, table = select(adata, method=method)
    except ValueError:
        return None
    return table if isinstance(table, pd.DataFrame) else None


def _is_nbglm(results: ad.AnnData) -> bool:
    return LFC_SE in results.layers and LOGFOLDCHANGES_RAW in results.layers


def _row_block(lfc, se, z, padj, *, fdr: float) -> np.ndarray:  # se: None or the standard errors
    """Per row: tested genes, DE genes at ``fdr``, mean ``z^2 - 1``, mean ``lfc^2 - se^2`` (NaN without ``se``)."""
    z = np.asarray(z, dtype=np.float64)
    padj = np.asarray(padj, dtype=np.float64)
    tested = np.isfinite(z)
    n = tested.sum(axis=1)
    out = np.full((z.shape[0], 5), np.nan)
    out[:, 0] = n
    out[:, 1] = (np.nan_to_num(padj, nan=1.0) < fdr).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:, 2] = np.where(tested, z * z - 1.0, 0.0).sum(axis=1) / np.where(n > 0, n, np.nan)
        if se is not None:
            lfc = np.asarray(lfc, dtype=np.float64)
            se = np.asarray(se, dtype=np.float64)
            ok = np.isfinite(lfc) & np.isfinite(se)
            k = ok.sum(axis=1)
            out[:, 3] = np.where(ok, lfc * lfc - se * se, 0.0).sum(axis=1) / np.where(k > 0, k, np.nan)
            out[:, 4] = k
    return out


def effect_table(
    adata: ad.AnnData,
    *,
    method: str | None = None,
    fdr: float = 0.05,
    knockdown: pd.DataFrame | None = None,
    energy_distance: pd.DataFrame | None = None,
    perturbation_column: str | None = None,
) -> pd.DataFrame:
    """One row per perturbation: cells, DE genes, knock-down, energy distance and transcriptome-wide impact.

    Parameters
    ----------
    adata
        A test's results (``ps.tl.rank_genes_groups``'s, perturbations x
        genes, lazy or in memory), or an AnnData whose result store holds
        one (``method`` and ``perturbation_column`` pick it; its stored
        knock-down and energy-distance tables are joined too).
    method
        The test to pick from the store (``"wilcoxon"``, ``"t-test"``, ``"nb-glm"``).
    fdr
        Adjusted p-value below which a gene counts as DE (``n_de_genes``).
    knockdown
        The table of :func:`pertscale.tl.knockdown` (default: the one stored in ``adata``, if any).
    energy_distance
        The table of :func:`pertscale.tl.energy_distance` (default: the one stored, if any).
    perturbation_column
        Picks the stored test when several are stored.

    Returns
    -------
    pandas.DataFrame
        Index ``perturbation`` in results order; columns ``n_cells``,
        ``n_genes_tested``, ``n_de_genes``, ``impact_z`` (mean over tested
        genes of ``z^2 - 1``, ``z`` the test's score), ``impact`` and
        ``impact_rms_log2fc`` (nb-glm only: mean over genes of
        ``lfc^2 - lfcSE^2`` with the maximum-likelihood log2 fold change and
        its standard error, and the square root of its positive part); with
        a knock-down table ``target``, ``knockdown_log2fc``,
        ``knockdown_pvals_adj``, ``knockdown_rank``,
        ``fraction_below_control_median``, ``knockdown_detected``; with an
        energy-distance table ``edistance``, ``edistance_pvalue``,
        ``edistance_pvalue_adj``.

    Raises
    ------
    ValueError
        If ``adata`` holds no results (or several match), or ``fdr`` is not in ``[0, 1]``.

    Notes
    -----
    Transcriptome-wide impact. With ``b_g`` the estimated log2 fold change
    of gene ``g`` and ``s_g`` its standard error, ``E[b_g^2] = beta_g^2 +
    s_g^2`` for an unbiased estimate, so ``mean_g(b_g^2 - s_g^2)`` is an
    unbiased estimate of the mean squared true effect across genes, the
    quantity TRADE calls the transcriptome-wide impact (Nadig et al. 2025,
    Nature Genetics, "Transcriptome-wide analysis of differential expression
    in perturbation atlases"), there estimated by fitting a mixture
    (adaptive shrinkage) to the effects; this is its method-of-moments
    form, unbiased but noisy, and negative by chance when there is no effect
    (reported as it is, not clipped; ``impact_rms_log2fc`` is
    ``sqrt(max(impact, 0))``, log2 units). It needs standard errors: nb-glm's
    ``lfcSE`` of the MLE (``logfoldchanges_raw``; genes with a
    likelihood-ratio test only, which have none, are left out). For every
    test, ``impact_z`` is the same estimator on the standardized scale:
    ``z_g`` is about ``N(delta_g, 1)``, so ``mean_g(z_g^2 - 1)`` estimates
    the mean squared non-centrality (0 without effects; it grows with the
    group's size as well as with the effect). For the t-test ``z`` is
    Welch's t, whose square has mean ``df / (df - 2)`` without an effect:
    ``impact_z`` is then biased up by about ``2 / (df - 2)`` (0.1 for groups
    of about 20 cells).
    """
    fdr = check_number(fdr, "fdr", minimum=0, maximum=1)
    results = _results_of(adata, method, perturbation_column)
    nb = _is_nbglm(results)
    layers = [results.layers[LOGFOLDCHANGES_RAW if nb else LOGFOLDCHANGES]]
    layers += [results.layers[LFC_SE] if nb else None, results.layers[SCORES], results.layers[PVALS_ADJ]]
    arrays = [None if a is None else da.asarray(a) for a in layers]
    chunks = arrays[2].chunks[0]
    arrays = [None if a is None else a.rechunk({0: chunks, 1: -1}) for a in arrays]
    lfc, se, z, padj = arrays
    rows = da.map_blocks(
        _row_block,
        lfc,
        z if se is None else se,  # without standard errors the slot is unused: its columns are set to NaN below
        z,
        padj,
        fdr=fdr,
        dtype=np.float64,
        chunks=(chunks, (5,)),
        meta=np.empty((0, 0)),
    )
    (values,) = dask.compute(rows)
    if not nb:
        values[:, 3:] = np.nan
    table = pd.DataFrame(index=pd.Index(results.obs_names.astype(str), name=PERTURBATION))
    table["n_cells"] = np.asarray(results.obs["n_cells"]) if "n_cells" in results.obs else np.nan
    table["n_genes_tested"] = values[:, 0].astype(np.int64)
    table["n_de_genes"] = values[:, 1].astype(np.int64)
    table["impact_z"] = values[:, 2]
    table["impact"] = values[:, 3]
    table["impact_rms_log2fc"] = np.sqrt(np.clip(values[:, 3], 0, None))
    if knockdown is None:
        knockdown = _stored_table(adata, "knockdown")
    if knockdown is not None:
        kd = knockdown.rename(
            columns={
                LOGFOLDCHANGES: "knockdown_log2fc",
                PVALS_ADJ: "knockdown_pvals_adj",
                "rank": "knockdown_rank",
            }
        )
        keep = ["target", "knockdown_log2fc", "knockdown_pvals_adj", "knockdown_rank",
                "fraction_below_control_median", "knockdown_detected"]  # fmt: skip
        table = table.join(kd[[c for c in keep if c in kd.columns]])
    if energy_distance is None:
        energy_distance = _stored_table(adata, "energy_distance")
    if energy_distance is not None:
        ed = energy_distance.rename(columns={"pvalue": "edistance_pvalue", "pvalue_adj": "edistance_pvalue_adj"})
        table = table.join(ed[[c for c in ("edistance", "edistance_pvalue", "edistance_pvalue_adj") if c in ed]])
    return table


def write_long(results: ad.AnnData | str | Path, path: str | Path, *, rows_per_block: int = 256) -> int:
    """Write every (perturbation, gene) pair of a test's results as a Parquet table, block by block.

    Columns ``perturbation``, ``gene``, ``logfoldchanges`` (log2; nb-glm:
    the shrunk value when the results were shrunk), ``standard_error``
    (nb-glm: ``lfcSE_shrunk`` beside a shrunk fold change, else ``lfcSE``;
    other tests: ``|logfoldchanges / scores|``, the standard error that
    gives the fold change the test's z, NaN where the score is 0), ``pvals``,
    ``pvals_adj``; the perturbations in results order, genes in ``var``
    order. Read by pandas, polars, arrow, R's ``arrow::read_parquet``.
    Written beside ``path`` and renamed into place.

    Parameters
    ----------
    results
        A results AnnData (lazy or in memory) or the path of a results ``.zarr`` store.
    path
        The ``.parquet`` file.
    rows_per_block
        Perturbations per row group: memory is bounded by this many rows.

    Returns
    -------
    int
        Rows written (perturbations x genes).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows_per_block = check_number(rows_per_block, "rows_per_block", integer=True, minimum=1)
    if not isinstance(results, ad.AnnData):
        import zarr

        group = zarr.open_group(str(results), mode="r")
        names = np.asarray(ad.io.read_elem(group["obs"]).index).astype(str)
        genes = np.asarray(ad.io.read_elem(group["var"]).index).astype(str)
        layers = {k: group["layers"][k] for k in group["layers"].keys()}
    else:
        names = np.asarray(results.obs_names).astype(str)
        genes = np.asarray(results.var_names).astype(str)
        layers = dict(results.layers)
    nb = LFC_SE in layers
    shrunk = nb and "lfcSE_shrunk" in layers
    schema = pa.schema(
        [(PERTURBATION, pa.string()), (GENE, pa.string())] + [(c, pa.float64()) for c in LONG_COLUMNS[2:]]
    )
    n_genes = genes.size
    written = 0
    with replacing(path) as tmp, pq.ParquetWriter(str(tmp), schema) as writer:
        for a in range(0, names.size, rows_per_block):
            b = min(a + rows_per_block, names.size)
            got = {k: np.asarray(_rows(layers[k], a, b), dtype=np.float64) for k in (LOGFOLDCHANGES, PVALS, PVALS_ADJ)}
            if nb:
                se = np.asarray(_rows(layers["lfcSE_shrunk" if shrunk else LFC_SE], a, b), dtype=np.float64)
            else:
                z = np.asarray(_rows(layers[SCORES], a, b), dtype=np.float64)
                with np.errstate(divide="ignore", invalid="ignore"):
                    se = np.where(z != 0, np.abs(got[LOGFOLDCHANGES] / z), np.nan)
            table = pa.table(
                {
                    PERTURBATION: np.repeat(names[a:b], n_genes),
                    GENE: np.tile(genes, b - a),
                    LOGFOLDCHANGES: got[LOGFOLDCHANGES].ravel(),
                    "standard_error": se.ravel(),
                    PVALS: got[PVALS].ravel(),
                    PVALS_ADJ: got[PVALS_ADJ].ravel(),
                },
                schema=schema,
            )
            writer.write_table(table)
            written += table.num_rows
    return written


def _rows(layer, a: int, b: int) -> np.ndarray:
    block = layer[a:b]
    if isinstance(block, da.Array):
        (block,) = dask.compute(block)
    return np.asarray(block)

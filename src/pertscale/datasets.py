"""Simulated CRISPR screens with known effects, for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def simulate_screen(
    n_cells: int = 10_000,
    n_genes: int = 2_000,
    n_perturbations: int = 50,
    *,
    control_fraction: float = 0.1,
    seed: int = 0,
    control_label: str = "control",
    perturbation_column: str = "perturbation",
    median_umi: float = 2_000.0,
    library_sd: float = 0.4,
    knockdown: tuple[float, float] = (0.1, 0.5),
    n_affected: int = 10,
    effect_sd: float = 0.8,
    n_mito: int | None = None,
    sort: bool = False,
    path: str | Path | None = None,
    block_size: int = 20_000,
) -> ad.AnnData | Path:
    """Simulate a Perturb-seq screen of negative-binomial UMI counts.

    Per gene a base expression share (log-normal, so a few genes dominate and
    most are sparse, as in 10x data) and a dispersion that falls with the
    mean (``alpha = 0.05 + 0.5 / sqrt(mu)``, a DESeq2-like trend). Per cell a
    log-normal library size around ``median_umi``. Each perturbation knocks
    down its target gene to a fraction in ``knockdown`` of its expression and
    shifts ``n_affected`` other genes by log2 fold changes drawn from
    ``N(0, effect_sd)``.

    Parameters
    ----------
    n_cells, n_genes, n_perturbations
        Size of the screen; perturbations target distinct genes.
    control_fraction
        Fraction of cells carrying the control label; the rest are spread
        evenly (multinomially) over the perturbations.
    seed
        Seed of ``numpy.random.default_rng``; same seed, same screen.
    control_label, perturbation_column
        Label and ``obs`` column of the assignments.
    median_umi, library_sd
        Median and log-scale spread of the cell library sizes.
    knockdown
        Range of the remaining fraction of the target's expression.
    n_affected, effect_sd
        Downstream genes per perturbation and the spread of their log2
        fold changes.
    n_mito
        Genes named ``MT-...`` (for QC); default ``min(13, n_genes // 50)``.
    sort
        Store cells sorted by perturbation (control first) instead of in
        random order.
    path
        If given, write the screen there (``.h5ad``, or ``.zarr`` when the
        path ends so) and return the path.
    block_size
        Cells simulated at a time (bounds memory).

    Returns
    -------
    anndata.AnnData or pathlib.Path
        ``X``: CSR int32 counts, ``n_cells x n_genes``. ``obs``: the
        perturbation column (categorical, control first) and
        ``target_gene``. ``var``: ``base_mean`` (expected counts at the
        median library size), ``dispersion``. ``uns['simulation']``:
        ``log2_effects`` (``n_perturbations x n_genes`` true log2 fold
        changes, targets included) and the settings.

    Raises
    ------
    ValueError
        If the sizes do not allow the design.
    """
    n_mito = min(13, n_genes // 50) if n_mito is None else n_mito
    if n_perturbations < 1 or n_perturbations > n_genes - n_mito:
        raise ValueError(
            "n_perturbations must be between 1 and the number of non-mitochondrial genes (each targets its own gene)"
        )
    if not 0 < control_fraction < 1:
        raise ValueError("control_fraction must be between 0 and 1")
    rng = np.random.default_rng(seed)
    genes = [f"MT-G{i:02d}" for i in range(n_mito)] + [f"GENE{i:05d}" for i in range(n_genes - n_mito)]
    share = rng.lognormal(mean=0.0, sigma=1.6, size=n_genes)
    share /= share.sum()
    base_mean = share * median_umi
    dispersion = 0.05 + 0.5 / np.sqrt(np.maximum(base_mean, 1e-3))

    perts = [f"P{i:04d}" for i in range(n_perturbations)]
    # targets: well-expressed genes, so knock-downs are detectable
    order = np.argsort(-base_mean[n_mito:]) + n_mito
    pool = order[: max(n_perturbations, len(order) // 2)]
    targets = rng.choice(pool, size=n_perturbations, replace=False)
    log2_effects = np.zeros((n_perturbations, n_genes), dtype=np.float32)
    for p in range(n_perturbations):
        others = rng.choice(
            np.setdiff1d(np.arange(n_genes), [targets[p]]), size=min(n_affected, n_genes - 1), replace=False
        )
        log2_effects[p, others] = rng.normal(0.0, effect_sd, size=others.size)
        log2_effects[p, targets[p]] = np.log2(rng.uniform(*knockdown))

    n_control = max(2, int(round(n_cells * control_fraction)))
    per_pert = rng.multinomial(n_cells - n_control, np.full(n_perturbations, 1.0 / n_perturbations))
    codes = np.concatenate([np.full(n_control, -1), np.repeat(np.arange(n_perturbations), per_pert)])
    if not sort:
        codes = rng.permutation(codes)

    library = median_umi * rng.lognormal(0.0, library_sd, size=n_cells)
    blocks = []
    for start in range(0, n_cells, block_size):
        c = codes[start : start + block_size]
        fold = np.where(c[:, None] >= 0, np.exp2(log2_effects[np.maximum(c, 0)]), 1.0)
        mu = library[start : start + block_size, None] * share[None, :] * fold
        r = 1.0 / dispersion
        counts = rng.negative_binomial(r[None, :], r[None, :] / (r[None, :] + mu))
        blocks.append(sp.csr_matrix(counts.astype(np.int32)))
    x = sp.vstack(blocks, format="csr")

    labels = np.where(codes >= 0, np.asarray(perts, dtype=object)[np.maximum(codes, 0)], control_label)
    target = np.where(codes >= 0, np.asarray(genes, dtype=object)[targets[np.maximum(codes, 0)]], "")
    obs = pd.DataFrame(
        {
            perturbation_column: pd.Categorical(labels, categories=[control_label, *perts]),
            "target_gene": target,
        },
        index=pd.Index([f"cell{i:07d}" for i in range(n_cells)]),
    )
    var = pd.DataFrame({"base_mean": base_mean, "dispersion": dispersion}, index=pd.Index(genes))
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.uns["simulation"] = {
        "log2_effects": log2_effects,
        "targets": np.asarray([genes[t] for t in targets], dtype=object),
        "perturbations": np.asarray(perts, dtype=object),
        "seed": int(seed),
        "control_label": control_label,
        "perturbation_column": perturbation_column,
    }
    if path is None:
        return adata
    from .io import write

    return write(adata, path)

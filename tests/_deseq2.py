"""A DESeq2 reference harness: R's DESeq2 run on given counts, every stage returned; and the agreement tables.

Not a test file: :mod:`tests.test_deseq2_reference` and
``benchmarks/bench_deseq2_agreement.py`` import it. Pieces:

* :func:`run_deseq2` (and :func:`run_deseq2_batch`, several runs in one
  ``Rscript``: loading DESeq2 takes ~5 s) writes the counts and sample table
  as CSV to a temporary folder, runs :data:`R_SCRIPT` and returns every
  stage: size factors, gene-wise / trend / MAP / final dispersions, all
  coefficients and their SEs (log2, as ``coef(dds)``, and natural log), the
  Wald statistic, p-value and BH-adjusted p, and with ``test="LRT"`` the
  LRT's. Needs Debian's ``r-bioc-deseq2`` (:func:`deseq2_available`).
* :func:`simulate_bulk`: seeded negative-binomial bulk-like designs.
* :func:`pertscale_table` and :func:`pydeseq2_table`: the same per-gene
  statistics from pertscale's public API and from PyDESeq2, as tables keyed
  by gene name with the columns of :data:`STAGES` (and a per-sample table of
  size factors); :func:`deseq2_table` makes the same table of a
  :func:`run_deseq2` result.
* :func:`agreement`: max and median relative error per column of two such
  tables. Nothing here depends on how pertscale's kernel computes: only
  ``ps.pp.size_factors``, ``ps.tl.dispersions``,
  ``ps.tl.rank_genes_groups(method="nb-glm")`` and ``ps.compute``.

DESeq2's ``coef()`` and ``results()`` are in log2; the natural-log
coefficients are ``coef * log(2)`` (``= coef / log2(e)``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

#: Why the tests that need R's DESeq2 skip.
SKIP_REASON = "DESeq2 (Debian r-bioc-deseq2) is not installed"

#: Per-gene statistics of the comparison tables (log2 fold changes and SEs, as DESeq2's results()).
STAGES = (
    "baseMean",
    "disp_genewise",
    "disp_trend",
    "disp_map",
    "dispersion",
    "lfc",
    "lfc_se",
    "stat",
    "pvalue",
    "padj",
    "lfc_shrunk",
    "lrt_stat",
    "lrt_pvalue",
)

R_SCRIPT = r"""
suppressPackageStartupMessages(library(DESeq2))
run_job <- function(d) {
  o <- as.list(read.csv(file.path(d, "options.csv"), colClasses = "character"))
  counts <- as.matrix(read.csv(file.path(d, "counts.csv"), row.names = 1, check.names = FALSE))
  cts <- t(counts)  # DESeq2 takes genes x samples
  if (any(cts > .Machine$integer.max)) stop("counts above R's integer maximum (2^31 - 1)")
  mode(cts) <- "integer"
  coldata <- read.csv(file.path(d, "coldata.csv"), row.names = 1, colClasses = "character", check.names = FALSE)
  lv <- read.csv(file.path(d, "levels.csv"), colClasses = "character")
  for (col in colnames(coldata)) {
    if (col %in% lv$column) {
      coldata[[col]] <- factor(coldata[[col]], levels = lv$level[lv$column == col])
    } else {
      coldata[[col]] <- as.numeric(coldata[[col]])
    }
  }
  if (nzchar(o$contrast_var)) coldata[[o$contrast_var]] <- relevel(coldata[[o$contrast_var]], ref = o$contrast_den)
  minmu <- as.numeric(o$minmu)
  dds <- DESeqDataSetFromMatrix(cts, coldata, design = as.formula(o$design))
  if (o$size_factors == "given") {
    sizeFactors(dds) <- read.csv(file.path(d, "size_factors_in.csv"))$x
  } else {
    dds <- estimateSizeFactors(dds, type = o$size_factors)
  }
  if (o$dispersions_given == "1") {
    dispersions(dds) <- read.csv(file.path(d, "dispersions_in.csv"))$x
  } else {
    dds <- estimateDispersions(dds, fitType = o$fit_type, minmu = minmu, quiet = TRUE)
  }
  dds <- nbinomWaldTest(dds, minmu = minmu, quiet = TRUE)
  contrast <- if (nzchar(o$contrast_var)) c(o$contrast_var, o$contrast_num, o$contrast_den) else NULL
  res <- results(dds, contrast = contrast, independentFiltering = FALSE, cooksCutoff = FALSE)
  mc <- mcols(dds)
  col <- function(name) if (name %in% colnames(mc)) as.numeric(mc[[name]]) else rep(NA_real_, nrow(dds))
  genes <- data.frame(
    baseMean = col("baseMean"), allZero = as.numeric(mc$allZero),
    dispGeneEst = col("dispGeneEst"), dispGeneIter = col("dispGeneIter"), dispFit = col("dispFit"),
    dispMAP = col("dispMAP"), dispersion = as.numeric(dispersions(dds)), dispOutlier = col("dispOutlier"),
    betaConv = col("betaConv"), betaIter = col("betaIter"), maxCooks = col("maxCooks"),
    log2FoldChange = res$log2FoldChange, lfcSE = res$lfcSE, stat = res$stat, pvalue = res$pvalue, padj = res$padj,
    row.names = rownames(dds), check.names = FALSE
  )
  if (o$test == "LRT") {
    lrt <- nbinomLRT(dds, reduced = as.formula(o$reduced), minmu = minmu, quiet = TRUE)
    rl <- results(lrt, contrast = contrast, independentFiltering = FALSE, cooksCutoff = FALSE)
    genes$lrt_log2FoldChange <- rl$log2FoldChange
    genes$lrt_stat <- rl$stat
    genes$lrt_pvalue <- rl$pvalue
    genes$lrt_padj <- rl$padj
  }
  write.csv(genes, file.path(d, "genes.csv"))
  write.csv(data.frame(size_factor = sizeFactors(dds), row.names = colnames(dds)), file.path(d, "samples.csv"))
  write.csv(coef(dds), file.path(d, "coef.csv"))
  write.csv(coef(dds, SE = TRUE), file.path(d, "coef_se.csv"))
  fun <- dispersionFunction(dds)
  tc <- attr(fun, "coefficients")
  info <- data.frame(
    version = as.character(packageVersion("DESeq2")),
    asympDisp = if (is.null(tc)) NA_real_ else as.numeric(tc[["asymptDisp"]]),
    extraPois = if (is.null(tc)) NA_real_ else as.numeric(tc[["extraPois"]]),
    dispPriorVar = if (is.null(attr(fun, "dispPriorVar"))) NA_real_ else attr(fun, "dispPriorVar"),
    varLogDispEsts = if (is.null(attr(fun, "varLogDispEsts"))) NA_real_ else attr(fun, "varLogDispEsts")
  )
  write.csv(info, file.path(d, "info.csv"), row.names = FALSE)
}
for (d in commandArgs(trailingOnly = TRUE)) {
  err <- tryCatch({ run_job(d); NULL }, error = function(e) conditionMessage(e))
  if (!is.null(err)) writeLines(err, file.path(d, "error.txt"))
}
"""


@functools.cache
def deseq2_available() -> bool:
    """Whether ``Rscript`` runs and finds the DESeq2 package (checked once; without loading it: ~0.2 s)."""
    rscript = shutil.which("Rscript")
    if rscript is None:
        return False
    try:
        out = subprocess.run(
            [rscript, "--vanilla", "-e", 'cat(nzchar(system.file(package="DESeq2")))'],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip().endswith("TRUE")


def _levels(coldata: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for column in coldata.columns:
        values = coldata[column]
        if isinstance(values.dtype, pd.CategoricalDtype):
            levels = [str(v) for v in values.cat.categories]
        elif pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            continue
        else:
            levels = sorted({str(v) for v in values})
        rows += [(column, level) for level in levels]
    return pd.DataFrame(rows, columns=["column", "level"])


def _job_key(counts, coldata, options, size_factors, dispersions) -> str:
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(counts).tobytes())
    h.update(str(counts.shape).encode())
    h.update(coldata.to_csv().encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    h.update(R_SCRIPT.encode())
    for extra in (size_factors, dispersions):
        if isinstance(extra, np.ndarray):
            h.update(np.ascontiguousarray(extra, dtype=np.float64).tobytes())
        else:
            h.update(repr(extra).encode())
    return h.hexdigest()


_CACHE: dict[str, dict] = {}


def _write_job(
    d: Path,
    counts,
    coldata,
    design,
    *,
    contrast=("condition", "perturbed", "control"),
    size_factors=None,
    dispersions=None,
    test="Wald",
    reduced=None,
    fit_type="parametric",
    minmu=0.5,
) -> tuple[dict, pd.Index, pd.Index]:
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[0] != len(coldata):
        raise ValueError(f"counts must be samples x genes with one row per coldata row; got {counts.shape}")
    if not np.issubdtype(counts.dtype, np.integer):
        if not np.array_equal(counts, np.round(counts)):
            raise ValueError("counts must be whole numbers")
        counts = counts.astype(np.int64)
    if test not in ("Wald", "LRT"):
        raise ValueError(f"test {test!r}: choose 'Wald' or 'LRT'")
    if test == "LRT" and not reduced:
        raise ValueError("test='LRT' needs reduced= (e.g. '~1')")
    samples = pd.Index([str(s) for s in coldata.index], name="sample")
    genes = pd.Index([f"g{j}" for j in range(counts.shape[1])], name="gene")
    sf_mode = "ratio" if size_factors is None else size_factors
    if isinstance(sf_mode, np.ndarray):
        pd.DataFrame({"x": np.asarray(size_factors, dtype=np.float64)}).to_csv(d / "size_factors_in.csv", index=False)
        sf_mode = "given"
    elif sf_mode not in ("ratio", "poscounts"):
        raise ValueError(f"size_factors {size_factors!r}: choose None (DESeq's default, 'ratio'), 'poscounts', 'ratio'")
    if dispersions is not None:
        disp = np.asarray(dispersions, dtype=np.float64)
        if disp.shape != (counts.shape[1],):
            raise ValueError(f"dispersions must have one value per gene ({counts.shape[1]},); got {disp.shape}")
        pd.DataFrame({"x": disp}).to_csv(d / "dispersions_in.csv", index=False, float_format="%.17g")
    contrast = tuple(contrast) if contrast else ("", "", "")
    options = {
        "design": design,
        "contrast_var": contrast[0],
        "contrast_num": contrast[1],
        "contrast_den": contrast[2],
        "size_factors": sf_mode,
        "dispersions_given": "1" if dispersions is not None else "0",
        "test": test,
        "reduced": reduced or "",
        "fit_type": fit_type,
        "minmu": repr(float(minmu)),
    }
    pd.DataFrame([options]).to_csv(d / "options.csv", index=False)
    pd.DataFrame(counts, index=samples, columns=genes).to_csv(d / "counts.csv")
    cd = coldata.copy()
    cd.index = samples
    cd.astype(str).to_csv(d / "coldata.csv")
    _levels(coldata).to_csv(d / "levels.csv", index=False)
    return options, samples, genes


def _read_job(d: Path, genes: pd.Index) -> dict:
    if (d / "error.txt").exists():
        raise RuntimeError(f"DESeq2 failed: {(d / 'error.txt').read_text().strip()}")
    table = pd.read_csv(d / "genes.csv", index_col=0)
    table.index = genes
    coef_log2 = pd.read_csv(d / "coef.csv", index_col=0).set_axis(genes)
    se_log2 = pd.read_csv(d / "coef_se.csv", index_col=0).set_axis(genes)
    se_log2.columns = [c.removeprefix("SE_") for c in se_log2.columns]  # coef(dds, SE=TRUE) names them SE_...
    samples = pd.read_csv(d / "samples.csv", index_col=0)
    info = pd.read_csv(d / "info.csv").iloc[0].to_dict()
    out = {
        "size_factors": samples["size_factor"].to_numpy(dtype=np.float64),
        "baseMean": table["baseMean"].to_numpy(),
        "dispGeneEst": table["dispGeneEst"].to_numpy(),
        "dispFit": table["dispFit"].to_numpy(),
        "dispMAP": table["dispMAP"].to_numpy(),
        "dispersion": table["dispersion"].to_numpy(),
        "dispOutlier": table["dispOutlier"].to_numpy(),
        "coef_log2": coef_log2,
        "coef_se_log2": se_log2,
        "coef": coef_log2 * np.log(2.0),  # natural log: DESeq2's coef() is log2
        "coef_se": se_log2 * np.log(2.0),
        "log2FoldChange": table["log2FoldChange"].to_numpy(),
        "lfcSE": table["lfcSE"].to_numpy(),
        "stat": table["stat"].to_numpy(),
        "pvalue": table["pvalue"].to_numpy(),
        "padj": table["padj"].to_numpy(),
        "genes": table,
        "trend": {"asympDisp": info["asympDisp"], "extraPois": info["extraPois"]},
        "prior_variance": info["dispPriorVar"],
        "version": str(info["version"]),
    }
    if "lrt_stat" in table:
        for key in ("lrt_log2FoldChange", "lrt_stat", "lrt_pvalue", "lrt_padj"):
            out[key] = table[key].to_numpy()
    return out


def run_deseq2_batch(jobs: list[dict], *, cache_dir: str | Path | None = None, timeout: float = 900.0) -> list[dict]:
    """Several :func:`run_deseq2` calls (each a dict of its arguments) in one ``Rscript``; results in order.

    Results are kept in memory by a digest of the inputs and of :data:`R_SCRIPT`: the same job again costs
    nothing. With ``cache_dir``, also on disk there (a pickle per job; clear it after upgrading DESeq2).
    """
    if not deseq2_available():
        raise RuntimeError(SKIP_REASON)
    results: list = [None] * len(jobs)
    with tempfile.TemporaryDirectory(prefix="deseq2-") as tmp:
        tmp = Path(tmp)
        todo = []
        for k, job in enumerate(jobs):
            job = dict(job)
            counts, coldata, design = job.pop("counts"), job.pop("coldata"), job.pop("design")
            d = tmp / f"job{k}"
            d.mkdir()
            options, _, genes = _write_job(d, counts, coldata, design, **job)
            key = _job_key(np.asarray(counts), coldata, options, job.get("size_factors"), job.get("dispersions"))
            stored = Path(cache_dir) / f"{key}.pkl" if cache_dir is not None else None
            if key not in _CACHE and stored is not None and stored.exists():
                with stored.open("rb") as f:
                    _CACHE[key] = pickle.load(f)
            if key in _CACHE:
                results[k] = _CACHE[key]
            else:
                todo.append((k, d, genes, key))
        if todo:
            script = tmp / "deseq2.R"
            script.write_text(R_SCRIPT)
            proc = subprocess.run(
                ["Rscript", "--vanilla", str(script), *[str(d) for _, d, _, _ in todo]],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"Rscript failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            for k, d, genes, key in todo:
                results[k] = _CACHE[key] = _read_job(d, genes)
                if cache_dir is not None:
                    Path(cache_dir).mkdir(parents=True, exist_ok=True)
                    with (Path(cache_dir) / f"{key}.pkl").open("wb") as f:
                        pickle.dump(results[k], f)
    return results


def run_deseq2(
    counts: np.ndarray,
    coldata: pd.DataFrame,
    design: str,
    *,
    contrast=("condition", "perturbed", "control"),
    size_factors=None,
    dispersions=None,
    test: str = "Wald",
    reduced: str | None = None,
    fit_type: str = "parametric",
    minmu: float = 0.5,
) -> dict:
    """R's DESeq2, step by step, on ``counts`` (samples x genes, whole numbers) and ``coldata`` (one row a sample).

    The steps: ``estimateSizeFactors(type=size_factors)`` (``None``: DESeq's
    default, ``"ratio"``; an array: set with ``sizeFactors(dds) <- ...``),
    ``estimateDispersions(fitType=fit_type, minmu=minmu)`` unless
    ``dispersions`` (one per gene) are given (then ``dispersions(dds) <-
    ...`` and no dispersion stage is returned), ``nbinomWaldTest(minmu=)``
    and ``results(contrast=, independentFiltering=FALSE,
    cooksCutoff=FALSE)``; with ``test="LRT"`` also ``nbinomLRT(reduced=)``.
    No outlier replacement (as PyDESeq2's ``refit_cooks=False``). Factors:
    ``coldata``'s categorical columns keep their category order, other
    non-numeric columns are sorted; the contrast's denominator is made the
    reference level. Genes are named ``g0, g1, ...``.

    Returns
    -------
    dict
        ``size_factors`` (samples), ``baseMean``, ``dispGeneEst``
        (gene-wise), ``dispFit`` (trend), ``dispMAP``, ``dispersion``
        (final, ``dispersions(dds)``), ``dispOutlier``, ``coef_log2`` and
        ``coef_se_log2`` (genes x coefficients, as ``coef(dds)``), ``coef``
        and ``coef_se`` (natural log: ``coef_log2 * log(2)``),
        ``log2FoldChange``, ``lfcSE``, ``stat``, ``pvalue``, ``padj`` of the
        contrast (Wald); with LRT ``lrt_log2FoldChange``, ``lrt_stat``,
        ``lrt_pvalue``, ``lrt_padj``; ``genes`` (every per-gene column as one
        DataFrame), ``trend`` (``asympDisp``, ``extraPois``),
        ``prior_variance`` and ``version``. Arrays are ``(n_genes,)``
        float64, NaN where DESeq2 gives NA.
    """
    job = dict(
        counts=counts,
        coldata=coldata,
        design=design,
        contrast=contrast,
        size_factors=size_factors,
        dispersions=dispersions,
        test=test,
        reduced=reduced,
        fit_type=fit_type,
        minmu=minmu,
    )
    return run_deseq2_batch([job])[0]


def deseq2_table(res: dict) -> pd.DataFrame:
    """A :func:`run_deseq2` result as the comparison table (:data:`STAGES`; no shrunk LFC: apeglm is missing)."""
    g = res["genes"]
    table = pd.DataFrame(index=g.index)
    table["baseMean"] = g["baseMean"]
    table["disp_genewise"] = g["dispGeneEst"]
    table["disp_trend"] = g["dispFit"]
    table["disp_map"] = g["dispMAP"].where(g["dispOutlier"] != 1)  # where the final dispersion is the MAP
    table["dispersion"] = g["dispersion"]
    table["lfc"] = g["log2FoldChange"]
    table["lfc_se"] = g["lfcSE"]
    table["stat"] = g["stat"]
    table["pvalue"] = g["pvalue"]
    table["padj"] = g["padj"]
    table["lfc_shrunk"] = np.nan
    table["lrt_stat"] = g["lrt_stat"] if "lrt_stat" in g else np.nan
    table["lrt_pvalue"] = g["lrt_pvalue"] if "lrt_pvalue" in g else np.nan
    return table


# ------------------------------------------------------------------------------------------------ simulation


def simulate_bulk(
    n_samples: int = 40,
    n_genes: int = 500,
    *,
    seed: int = 0,
    groups: int = 0,
    affected: float = 0.2,
    zero_genes: int = 0,
    huge_genes: int = 0,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Negative-binomial bulk-like counts: ``(counts (samples x genes) int64, coldata)``.

    Half the samples ``condition="perturbed"``, half ``"control"``; per-gene
    means log-uniform over 5-2,000, dispersions ``0.02 + 1 / mean`` times
    log-normal scatter, size factors log-normal (sd 0.3); ``affected`` of
    the genes get a natural-log fold change drawn from N(0, 1). ``groups``
    > 1 adds ``coldata['group']`` (``g1``, ...) with per-gene group effects
    (sd 0.5), unbalanced against the condition (a group's share of the
    perturbed samples differs from its share of controls). The first
    ``zero_genes`` genes have no count in any perturbed sample; the next
    ``huge_genes`` have means from 1e7 to 1e9 (counts stay below 2^31, R's
    integer maximum).
    """
    rng = np.random.default_rng(seed)
    perturbed = np.arange(n_samples) % 2 == 1
    coldata = pd.DataFrame(
        {"condition": pd.Categorical(np.where(perturbed, "perturbed", "control"), categories=["control", "perturbed"])},
        index=[f"s{i}" for i in range(n_samples)],
    )
    mean = np.exp(rng.uniform(np.log(5.0), np.log(2_000.0), n_genes))
    disp = (0.02 + 1.0 / mean) * np.exp(rng.normal(0.0, 0.5, n_genes))
    lfc = np.where(rng.random(n_genes) < affected, rng.normal(0.0, 1.0, n_genes), 0.0)
    sf = np.exp(rng.normal(0.0, 0.3, n_samples))
    log_mu = np.log(mean)[None, :] + perturbed[:, None] * lfc[None, :] + np.log(sf)[:, None]
    if groups > 1:
        # controls spread evenly over the groups, perturbed samples mostly in the first
        level = np.where(
            perturbed,
            rng.choice(groups, n_samples, p=np.r_[0.6, np.full(groups - 1, 0.4 / (groups - 1))]),
            np.arange(n_samples) % groups,
        )
        for g in range(groups):  # every group in each condition
            for cond in (False, True):
                if not ((level == g) & (perturbed == cond)).any():
                    level[np.flatnonzero(perturbed == cond)[g]] = g
        names = [f"g{g + 1}" for g in range(groups)]
        coldata["group"] = pd.Categorical(np.array(names)[level], categories=names)
        effect = rng.normal(0.0, 0.5, (groups, n_genes))
        effect[0] = 0.0
        log_mu = log_mu + effect[level]
    mu = np.exp(log_mu)
    if huge_genes:
        h = slice(zero_genes, zero_genes + huge_genes)
        base = np.exp(np.linspace(np.log(1e7), np.log(1e9), huge_genes))
        mu[:, h] = sf[:, None] * base[None, :] * np.exp(perturbed[:, None] * lfc[None, h])
        disp[h] = 0.01 * np.exp(rng.normal(0.0, 0.3, huge_genes))
    # NB as a gamma-Poisson mixture (numpy's negative_binomial takes integer-ish n badly for tiny dispersions)
    lam = rng.gamma(1.0 / disp[None, :], mu * disp[None, :])
    counts = rng.poisson(lam).astype(np.int64)
    if zero_genes:
        counts[np.ix_(perturbed, np.arange(zero_genes))] = 0
    if huge_genes:
        counts = np.minimum(counts, 2**31 - 1)
    return counts, coldata


# ----------------------------------------------------------------------------------- pertscale and PyDESeq2


def pertscale_table(
    counts: np.ndarray,
    coldata: pd.DataFrame,
    *,
    size_factors: str = "ratio",
    covariates: list[str] | None = None,
    shrink: bool = True,
    condition: str = "condition",
    control: str = "control",
    perturbed: str = "perturbed",
    dispersions: np.ndarray | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """pertscale's public nb-glm on ``counts``: ``(samples table, genes table)``, the genes' columns :data:`STAGES`.

    ``dispersions``: test with these (``rank_genes_groups(dispersions=)``)
    instead of those pertscale estimates (which are still estimated, for
    the table's dispersion columns).

    ``ps.pp.size_factors(method=size_factors)``, ``ps.tl.dispersions(
    perturbation_column=condition, covariates=)``,
    ``ps.tl.rank_genes_groups(method="nb-glm", covariates=, shrink=)`` read
    with ``ps.compute``. ``disp_map`` is the final dispersion where it is
    the MAP (not a dispersion outlier). No LRT: NaN.
    """
    import anndata as ad
    import dask
    import scipy.sparse as sp

    import pertscale as ps

    genes = pd.Index([f"g{j}" for j in range(counts.shape[1])], name="gene")
    obs = coldata.copy()
    obs.index = pd.Index([str(s) for s in coldata.index])
    obs[condition] = obs[condition].astype(str)
    for c in covariates or []:
        obs[c] = obs[c].astype(str)
    adata = ad.AnnData(sp.csr_matrix(np.asarray(counts, dtype=np.float64)), obs=obs, var=pd.DataFrame(index=genes))
    with dask.config.set(scheduler="synchronous"), ps.settings.override(progress=False):
        sf = ps.pp.size_factors(adata, method=size_factors)
        ps.tl.dispersions(adata, perturbation_column=condition, covariates=covariates)
        res = ps.tl.rank_genes_groups(
            adata,
            perturbation_column=condition,
            control_label=control,
            method="nb-glm",
            size_factor_method=size_factors,
            covariates=covariates,
            shrink=shrink,
            dispersions=dispersions,
        )
        res = ps.compute(res)
    var = adata.var
    row = list(res.obs_names).index(perturbed)

    def layer(name):
        return np.asarray(res.layers[name][row], dtype=np.float64)

    table = pd.DataFrame(index=genes)
    table["baseMean"] = var["baseMean"].to_numpy(dtype=np.float64)
    table["disp_genewise"] = var["dispersion_genewise"].to_numpy(dtype=np.float64)
    table["disp_trend"] = var["dispersion_trend"].to_numpy(dtype=np.float64)
    table["disp_map"] = var["dispersion"].where(~var["dispersion_outlier"].astype(bool)).to_numpy(dtype=np.float64)
    table["dispersion"] = var["dispersion"].to_numpy(dtype=np.float64)
    table["lfc"] = layer("logfoldchanges_raw")  # log2 (lfc_base default)
    table["lfc_se"] = layer("lfcSE")
    table["stat"] = layer("scores")
    table["pvalue"] = layer("pvals")
    table["padj"] = layer("pvals_adj")
    table["lfc_shrunk"] = layer("logfoldchanges") if shrink else np.nan
    table["lrt_stat"] = np.nan
    table["lrt_pvalue"] = np.nan
    samples = pd.DataFrame({"size_factor": np.asarray(sf, dtype=np.float64)}, index=obs.index)
    return samples, table


def pydeseq2_table(
    counts: np.ndarray,
    coldata: pd.DataFrame,
    design: str,
    *,
    size_factors: str = "ratio",
    contrast=("condition", "perturbed", "control"),
    shrink: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """PyDESeq2 (0.5 API) on the same data: ``(samples table, genes table)`` with the columns of :data:`STAGES`.

    ``DeseqDataSet(counts=, metadata=, design=, size_factors_fit_type=,
    refit_cooks=False, min_mu=0.5, max_disp=max(10, n_samples))`` (DESeq2's
    bounds), ``DeseqStats(contrast=, cooks_filter=False,
    independent_filter=False)``; ``lfc_shrink`` (apeGLM) for ``lfc_shrunk``.
    Its warnings are silenced.
    """
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    genes = pd.Index([f"g{j}" for j in range(counts.shape[1])], name="gene")
    samples = pd.Index([str(s) for s in coldata.index])
    frame = pd.DataFrame(np.asarray(counts, dtype=np.int64), index=samples, columns=genes)
    meta = coldata.copy()
    meta.index = samples
    for c in meta.columns:
        if not pd.api.types.is_numeric_dtype(meta[c]) or isinstance(meta[c].dtype, pd.CategoricalDtype):
            meta[c] = meta[c].astype(str)
    inference = DefaultInference(n_cpus=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(
            counts=frame,
            metadata=meta,
            design=design,
            size_factors_fit_type=size_factors,
            refit_cooks=False,
            min_mu=0.5,
            max_disp=max(10.0, float(len(samples))),
            inference=inference,
            quiet=True,
        )
        dds.deseq2()
        ds = DeseqStats(
            dds,
            contrast=list(contrast),
            cooks_filter=False,
            independent_filter=False,
            inference=inference,
            quiet=True,
        )
        ds.summary()
        wald = ds.results_df.copy()
        shrunk = np.full(len(genes), np.nan)
        if shrink:
            coeff = f"{contrast[0]}[T.{contrast[1]}]"
            ds.lfc_shrink(coeff=coeff)
            shrunk = ds.results_df["log2FoldChange"].to_numpy(dtype=np.float64)
    var = dds.var
    table = pd.DataFrame(index=genes)
    table["baseMean"] = wald["baseMean"].to_numpy(dtype=np.float64)
    table["disp_genewise"] = var["genewise_dispersions"].to_numpy(dtype=np.float64)
    table["disp_trend"] = var["fitted_dispersions"].to_numpy(dtype=np.float64)
    outlier = var["_outlier_genes"].to_numpy(dtype=bool) if "_outlier_genes" in var else np.zeros(len(genes), bool)
    table["disp_map"] = np.where(outlier, np.nan, var["MAP_dispersions"].to_numpy(dtype=np.float64))
    table["dispersion"] = var["dispersions"].to_numpy(dtype=np.float64)
    for ours, theirs in (("lfc", "log2FoldChange"), ("lfc_se", "lfcSE"), ("stat", "stat")):
        table[ours] = wald[theirs].to_numpy(dtype=np.float64)
    table["pvalue"] = wald["pvalue"].to_numpy(dtype=np.float64)
    table["padj"] = wald["padj"].to_numpy(dtype=np.float64)
    table["lfc_shrunk"] = shrunk
    table["lrt_stat"] = np.nan
    table["lrt_pvalue"] = np.nan
    sf = pd.DataFrame({"size_factor": dds.obs["size_factors"].to_numpy(dtype=np.float64)}, index=samples)
    return sf, table


# ---------------------------------------------------------------------------------------------- agreement


#: Floors of the denominators of :func:`relative_error` for signed statistics: near-zero fold changes (log2)
#: and Wald statistics give absolute errors.
FLOORS = {"lfc": 0.01, "stat": 0.01, "lfc_shrunk": 0.01, "lrt_stat": 0.01}


def relative_error(actual, expected, *, floor: float = 0.0) -> np.ndarray:
    """``|actual - expected| / max(|expected|, floor)`` (absolute where that is 0); 0 for the same infinity."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = np.abs(a - e)
        both_inf = np.isinf(a) & np.isinf(e) & (np.sign(a) == np.sign(e))
        diff = np.where(both_inf, 0.0, diff)
        scale = np.maximum(np.abs(e), floor)
        return np.where(scale > 0, diff / np.where(scale > 0, scale, 1.0), diff)


def agreement(ours: pd.DataFrame, ref: pd.DataFrame, columns=None, *, genes=None, floors=None) -> pd.DataFrame:
    """Per column of two tables keyed by gene: ``max``, ``q90``, ``median`` relative error, ``n``, ``nan_mismatch``.

    A gene is compared in a column where both are finite (or the same
    infinity); ``nan_mismatch`` counts genes finite in one table and not in
    the other. ``genes``: a boolean mask over ``ref``'s rows, or names.
    ``floors``: per column, the least denominator (see :data:`FLOORS`).
    """
    columns = [c for c in (columns if columns is not None else ours.columns) if c in ref.columns and c in ours.columns]
    if genes is None:
        index = ref.index
    else:
        g = np.asarray(genes)
        index = ref.index[g] if g.dtype == bool else pd.Index(g)
    rows = {}
    for c in columns:
        a = ours.loc[index, c].to_numpy(dtype=np.float64)
        e = ref.loc[index, c].to_numpy(dtype=np.float64)
        fa, fe = np.isfinite(a), np.isfinite(e)
        same_inf = np.isinf(a) & np.isinf(e) & (np.sign(a) == np.sign(e))
        both = (fa & fe) | same_inf
        err = relative_error(a[both], e[both], floor=(floors or {}).get(c, 0.0))
        rows[c] = {
            "max": float(err.max()) if err.size else np.nan,
            "q90": float(np.quantile(err, 0.9)) if err.size else np.nan,
            "median": float(np.median(err)) if err.size else np.nan,
            "n": int(both.sum()),
            "nan_mismatch": int((fa != fe).sum()),
        }
    return pd.DataFrame(rows, index=["max", "q90", "median", "n", "nan_mismatch"]).T


def size_factor_agreement(ours, ref, *, up_to_constant: bool) -> dict:
    """``max``, ``q90``, ``median`` relative error of size factors; ``up_to_constant``: both scaled to geometric mean 1.

    Also ``constant``: the geometric mean of ``ref / ours``.
    """
    a = np.asarray(ours, dtype=np.float64)
    e = np.asarray(ref, dtype=np.float64)
    constant = float(np.exp(np.mean(np.log(e / a))))
    if up_to_constant:
        a = a / np.exp(np.mean(np.log(a)))
        e = e / np.exp(np.mean(np.log(e)))
    err = relative_error(a, e)
    return {
        "max": float(err.max()),
        "q90": float(np.quantile(err, 0.9)),
        "median": float(np.median(err)),
        "n": int(err.size),
        "constant": constant,
    }


def median_of_ratios(counts: np.ndarray, *, method: str = "ratio") -> np.ndarray:
    """Size factors in plain numpy, as DESeq2's ``estimateSizeFactors`` documents them (independent of R).

    ``"ratio"``: ``median_j y_ij / geomean_i(y_ij)`` over genes without a
    zero; ``"poscounts"``: reference ``exp(sum log y / n)`` over the non-zero
    counts (all ``n`` samples in the denominator), every gene with a count,
    zeros left out of each sample's median, then scaled to geometric mean 1
    (DESeq2 1.38's ``estimateSizeFactors(type="poscounts")``).
    """
    y = np.asarray(counts, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logy = np.log(y)
    if method == "ratio":
        keep = (y > 0).all(axis=0)
        ref = logy[:, keep].mean(axis=0)
        return np.exp(np.median(logy[:, keep] - ref, axis=1))
    if method == "poscounts":
        ref = np.where(y > 0, logy, 0.0).sum(axis=0) / y.shape[0]
        keep = (y > 0).any(axis=0)  # R: is.finite(log(geoMeans)), geoMeans 0 only for genes without a count
        sf = np.array([np.exp(np.median((logy[i, keep] - ref[keep])[y[i, keep] > 0])) for i in range(y.shape[0])])
        return sf / np.exp(np.mean(np.log(sf)))
    raise ValueError(f"method {method!r}: choose 'ratio' or 'poscounts'")

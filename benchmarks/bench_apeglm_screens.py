"""pertscale's NB-GLM fold changes (MLE and apeGLM-shrunk) against PyDESeq2 on the real screens, beside PyDESeq2 vs R.

For each screen (``../shared/data`` or ``$PERTSCALE_DATA``; an absent one is skipped with a message): all
control cells and the ``--perturbations`` perturbations with the most cells (``multiple`` and
``unassigned`` dropped), and of those cells' genes the ``--genes`` with the highest mean count among those
with mean >= ``--min-mean`` (cells without a count in those genes dropped). On exactly that subset, the
one-factor design ``~ perturbation`` (control the reference level), ``poscounts`` size factors in all three:

* pertscale: ``ps.pp.size_factors(method="poscounts")``, ``ps.tl.dispersions``,
  ``ps.tl.rank_genes_groups(method="nb-glm", size_factor_method="poscounts")`` (apeGLM on, the default),
  read with ``ps.compute``: ``logfoldchanges_raw`` (MLE) and ``logfoldchanges`` (shrunk), log2;
* PyDESeq2 (one ``DeseqDataSet`` fit, n_cpus=1, ``refit_cooks=False``, ``min_mu``): per perturbation
  ``DeseqStats(contrast=["perturbation", p, "control"], cooks_filter=False, independent_filter=False)`` and
  ``lfc_shrink(coeff="perturbation[T.p]")`` (apeGLM);
* R's DESeq2 through ``tests/_deseq2.py`` (``estimateSizeFactors(type="poscounts")``, ``estimateDispersions``,
  ``nbinomWaldTest``; no outlier replacement): ``coef(dds)`` per perturbation, the Wald p-value
  ``2 * pnorm(-|coef / SE|)`` (what ``results()`` gives for a coefficient against the reference). apeglm
  is not installable in R here: shrunk fold changes are pertscale vs PyDESeq2 only.

``--min-mu`` (default 0.5, DESeq2's and PyDESeq2's default; DESeq2's vignette advises 1e-6 for single
cells) floors the fitted means in DESeq2's and PyDESeq2's dispersion and coefficient fits, and is passed to
``ps.tl.dispersions(min_mu=)``; pertscale's test has no such floor. Where most fitted means of a gene are
below the floor (low-count genes of single cells), DESeq2's IRLS converges to a point that is not the
maximum likelihood: the largest MLE differences are refitted here both ways to show which each tool
returns. The largest shrunk differences are refitted too (the exact apeGLM posterior mode at each tool's
own dispersion and prior scale), and put in classes: PyDESeq2 away from its mode, pertscale away from its
mode, or both at their own modes (a difference of prior scale or dispersion).

Compared per (perturbation, gene): relative error ``|a - b| / max(|b|, floor)`` (floor 0.01 for the
fold changes, as ``bench_deseq2_agreement.py``; 0 for dispersions and p-values) and absolute error, median /
90th percentile / max. The second of each pair is the reference (R's DESeq2, else PyDESeq2). Pairs that a
tool leaves NaN are excluded and counted; pairs where the perturbation's or the control's cells have no
count of the gene ("one-sided": pertscale's likelihood-ratio test and Haldane fold change, DESeq2's Wald
fold change stops where its iterations do) are counted and left out of the fold change and p-value rows.

    OMP_NUM_THREADS=1 python benchmarks/bench_apeglm_screens.py [--datasets papalexi,schraivogel]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import _deseq2 as h  # noqa: E402

DATA_DIR = Path(os.environ.get("PERTSCALE_DATA", ROOT.parent / "shared" / "data"))
REAL = {
    "papalexi": DATA_DIR / "papalexi2021_eccite.h5ad",
    "schraivogel": DATA_DIR / "schraivogel2020_tapseq.h5ad",
}
COLUMN, CONTROL, DROP = "perturbation", "control", ("multiple", "unassigned")
FLOOR = 0.01


def subset(path: Path, *, n_perturbations: int, n_genes: int, min_mean: float):
    """The subset AnnData (counts CSR int64, ``obs['perturbation']`` categorical with control first), or None."""
    import anndata as ad
    import scipy.sparse as sp

    if not path.exists():
        print(f"\n_{path.name} not found (set PERTSCALE_DATA): skipped_\n")
        return None
    a = ad.read_h5ad(path)
    labels = a.obs[COLUMN].astype(str)
    counts = labels[~labels.isin([*DROP, CONTROL])].value_counts()
    top = list(counts.index[:n_perturbations])
    cells = labels.isin([CONTROL, *top]).to_numpy()
    x = sp.csr_matrix(a.X[cells]).astype(np.int64)
    mean = np.asarray(x.mean(axis=0)).ravel()
    ok = np.flatnonzero(mean >= min_mean)
    genes = np.sort(ok[np.argsort(-mean[ok], kind="stable")[:n_genes]])
    x = x[:, genes]
    has = np.asarray(x.sum(axis=1)).ravel() > 0
    obs = pd.DataFrame(
        {COLUMN: pd.Categorical(labels[cells].to_numpy()[has], categories=[CONTROL, *top])},
        index=pd.Index([str(c) for c in a.obs_names[cells][has]]),
    )
    var = pd.DataFrame(index=pd.Index([str(g) for g in a.var_names[genes]]))
    sub = ad.AnnData(sp.csr_matrix(x[has]), obs=obs, var=var)
    sub.uns["dropped_cells"] = int((~has).sum())
    sub.uns["perturbation_cells"] = {p: int(counts[p]) for p in top}
    return sub


def run_pertscale(adata, min_mu: float) -> dict:
    """Per perturbation x gene tables (DataFrames, perturbations as rows) of pertscale's nb-glm, and its dispersions."""
    import anndata as ad
    import dask
    import scipy.sparse as sp

    import pertscale as ps

    a = ad.AnnData(sp.csr_matrix(adata.X, dtype=np.float64), obs=adata.obs.copy(), var=adata.var.copy())
    a.obs[COLUMN] = a.obs[COLUMN].astype(str)
    with dask.config.set(scheduler="synchronous"), ps.settings.override(progress=False):
        sf = ps.pp.size_factors(a, method="poscounts")
        ps.tl.dispersions(a, perturbation_column=COLUMN, min_mu=min_mu)
        res = ps.compute(
            ps.tl.rank_genes_groups(
                a,
                perturbation_column=COLUMN,
                control_label=CONTROL,
                method="nb-glm",
                size_factor_method="poscounts",
                shrink=True,
                lfc_base="log2",
            )
        )
    perts = list(adata.obs[COLUMN].cat.categories[1:])
    rows = [list(res.obs_names).index(p) for p in perts]

    def layer(name):
        return pd.DataFrame(np.asarray(res.layers[name], dtype=np.float64)[rows], index=perts, columns=a.var_names)

    pairs = (("lfc", "logfoldchanges_raw"), ("lfc_shrunk", "logfoldchanges"), ("pvalue", "pvals"))
    out = {k: layer(v) for k, v in pairs}
    out["one_sided"] = layer("one_sided").fillna(0).astype(bool) if "one_sided" in res.layers else None
    out["dispersion"] = a.var["dispersion"].to_numpy(dtype=np.float64)
    out["size_factors"] = np.asarray(sf, dtype=np.float64)
    # apeGLM's prior scale (natural log): a layer repeated over the genes (NaN where untested)
    scale = layer("prior_scale").to_numpy() if "prior_scale" in res.layers else np.full((len(perts), 1), np.nan)
    out["prior_scale"] = pd.Series([np.nanmax(s) if np.isfinite(s).any() else np.nan for s in scale], index=perts)
    return out


def run_pydeseq2(adata, min_mu: float) -> dict:
    """The same tables from PyDESeq2 0.5 (one fit, then a DeseqStats and lfc_shrink per perturbation)."""
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    perts = list(adata.obs[COLUMN].cat.categories[1:])
    frame = pd.DataFrame(adata.X.toarray(), index=adata.obs_names, columns=adata.var_names)
    meta = adata.obs[[COLUMN]].copy()  # categorical, control first: formulaic makes it the reference level
    inference = DefaultInference(n_cpus=1)
    out = {k: pd.DataFrame(np.nan, index=perts, columns=adata.var_names) for k in ("lfc", "lfc_shrunk", "pvalue")}
    scales = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(
            counts=frame,
            metadata=meta,
            design=f"~{COLUMN}",
            size_factors_fit_type="poscounts",
            refit_cooks=False,
            min_mu=min_mu,
            max_disp=max(10.0, float(adata.n_obs)),
            inference=inference,
            quiet=True,
        )
        dds.deseq2()
        for p in perts:
            ds = DeseqStats(
                dds,
                contrast=[COLUMN, p, CONTROL],
                cooks_filter=False,
                independent_filter=False,
                inference=inference,
                quiet=True,
            )
            ds.summary()
            out["lfc"].loc[p] = ds.results_df["log2FoldChange"].to_numpy(dtype=np.float64)
            out["pvalue"].loc[p] = ds.results_df["pvalue"].to_numpy(dtype=np.float64)
            coeff = f"{COLUMN}[T.{p}]"
            try:  # the prior scale lfc_shrink uses (natural log); a private method of PyDESeq2 0.5
                idx = ds.LFC.columns.get_loc(coeff)
                scales[p] = min(float(np.sqrt(ds._fit_prior_var(coeff_idx=idx))), 1.0)
            except Exception:  # noqa: BLE001 - only a diagnostic
                scales[p] = np.nan
            ds.lfc_shrink(coeff=coeff)
            out["lfc_shrunk"].loc[p] = ds.results_df["log2FoldChange"].to_numpy(dtype=np.float64)
    out["dispersion"] = dds.var["dispersions"].to_numpy(dtype=np.float64)
    out["size_factors"] = dds.obs["size_factors"].to_numpy(dtype=np.float64)
    out["prior_scale"] = pd.Series(scales)
    return out


def run_r(adata, min_mu: float) -> dict:
    """The same tables from R's DESeq2 (tests/_deseq2.py's script; MLE only)."""
    from scipy.stats import norm

    perts = list(adata.obs[COLUMN].cat.categories[1:])
    counts = adata.X.toarray()
    coldata = adata.obs[[COLUMN]].copy()
    (res,) = h.run_deseq2_batch(
        [
            dict(
                counts=counts,
                coldata=coldata,
                design=f"~{COLUMN}",
                contrast=(COLUMN, perts[0], CONTROL),
                size_factors="poscounts",
                minmu=min_mu,
            )
        ]
    )
    coef, se = res["coef_log2"], res["coef_se_log2"]
    names = list(coef.columns[1:])  # R: Intercept, then perturbation_<level>_vs_control in level order
    if len(names) != len(perts) or not all(p.replace("-", ".") in n for p, n in zip(perts, names, strict=True)):
        raise RuntimeError(f"DESeq2's coefficients {names} do not match the levels {perts}")
    lfc = pd.DataFrame(coef.iloc[:, 1:].to_numpy().T, index=perts, columns=adata.var_names)
    z = coef.iloc[:, 1:].to_numpy() / se.iloc[:, 1:].to_numpy()
    pvalue = pd.DataFrame(2.0 * norm.sf(np.abs(z)).T, index=perts, columns=adata.var_names)
    # the harness's own results() p-values of the first contrast check the conversion
    check = np.nanmax(np.abs(pvalue.iloc[0].to_numpy() - res["pvalue"]) / np.maximum(res["pvalue"], 1e-300))
    return {
        "lfc": lfc,
        "pvalue": pvalue,
        "dispersion": np.asarray(res["dispersion"], dtype=np.float64),
        "size_factors": np.asarray(res["size_factors"], dtype=np.float64),
        "version": res["version"],
        "pvalue_check": float(check),
    }


def nb_fit(y, s, group, alpha, *, min_mu: float = 0.0, max_iter: int = 500) -> float:
    """log2 fold change of ``y ~ NB(s exp(b0 + b1 group), alpha)`` by IRLS; ``min_mu > 0``: DESeq2's iteration,
    whose weights and working response take the fitted means floored at ``min_mu`` (its fixed point is not
    the maximum likelihood where many fitted means fall below the floor)."""
    xm = np.column_stack([np.ones_like(group), group])
    b = np.array([np.log(max(y[group == 0].mean(), 1e-3)), 0.0])
    for _ in range(max_iter):
        mu = s * np.exp(xm @ b)
        if min_mu > 0:
            mu = np.maximum(mu, min_mu)
        w = mu / (1.0 + alpha * mu)
        z = np.log(mu / s) + (y - mu) / mu
        new = np.linalg.solve(xm.T @ (w[:, None] * xm), xm.T @ (w * z))
        if np.max(np.abs(new - b)) < 1e-13:
            b = new
            break
        b = new
    return float(b[1] / np.log(2.0))


def ape_mode(y, s, group, alpha, scale: float, candidates) -> tuple[float, object]:
    """apeGLM's posterior mode of ``b1`` (log2), to ~1e-9, and the negative log posterior (of ``b1``, natural log).

    ``y ~ NB(s exp(b0 + b1 group), alpha)``, ``b0 ~ N(0, 15^2)``, ``b1 ~ Cauchy(0, scale)`` (PyDESeq2's and
    apeglm's priors; in the one-factor design the other perturbations' coefficients only free their own
    cells): ``b0`` profiled out by Newton; ``b1`` the best of a grid spanning 0 and the ``candidates``
    (log2: the MLEs and shrunk values of the tools; the Cauchy prior can make the posterior bimodal, so
    the grid also holds 0, +-scale and the candidates themselves), refined by Brent's method.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import gammaln

    r, off = 1.0 / alpha, np.log(s)
    const = np.sum(gammaln(y + r) - gammaln(r) - gammaln(y + 1))
    start = np.log(max(y[group == 0].sum(), 0.5) / s[group == 0].sum())

    def objective(b1):
        b0 = start
        for _ in range(100):
            mu = np.exp(b0 + b1 * group + off)
            step = (-np.sum((y - mu) / (1 + alpha * mu)) + b0 / 225.0) / (np.sum(mu / (1 + alpha * mu)) + 1 / 225.0)
            b0 -= step
            if abs(step) < 1e-13:
                break
        mu = np.exp(b0 + b1 * group + off)
        ll = const + np.sum(r * np.log(r / (r + mu)) + y * np.log(mu / (r + mu)))
        return -ll + b0 * b0 / 450.0 + np.log1p(b1 * b1 / (scale * scale))

    c = np.log(2.0) * np.asarray([v for v in candidates if np.isfinite(v)], dtype=np.float64)
    lo, hi = min(0.0, c.min()) - 0.1, max(0.0, c.max()) + 0.1
    grid = np.unique(np.r_[np.linspace(lo, hi, 201), 0.0, scale, -scale, c])
    values = np.array([objective(v) for v in grid])
    i = int(np.argmin(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    best = minimize_scalar(objective, bounds=(a, b), method="bounded", options={"xatol": 1e-10})
    x = best.x if best.fun <= values[i] else grid[i]
    return float(x / np.log(2.0)), objective


def errors(a, b, *, floor: float, mask=None) -> dict:
    """Median / q90 / max of relative and absolute error of ``a`` against ``b``, over pairs finite in both."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    keep = np.ones(a.size, bool) if mask is None else np.asarray(mask, bool).ravel()
    fa, fb = np.isfinite(a), np.isfinite(b)
    both = keep & fa & fb
    rel = h.relative_error(a[both], b[both], floor=floor)
    ab = np.abs(a[both] - b[both])

    def q(v, p):
        return float(np.quantile(v, p)) if v.size else np.nan

    return {
        "n": int(both.sum()),
        "NaN (a, b)": f"{int((keep & ~fa).sum())}, {int((keep & ~fb).sum())}",
        "rel median": q(rel, 0.5),
        "rel q90": q(rel, 0.9),
        "rel max": q(rel, 1.0),
        "abs median": q(ab, 0.5),
        "abs q90": q(ab, 0.9),
        "abs max": q(ab, 1.0),
    }


def markdown(rows: list[tuple[str, dict]]) -> str:
    cols = list(rows[0][1])
    lines = ["| comparison | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, r in rows:
        cells = [v if isinstance(v, str) else str(v) if isinstance(v, int) else f"{v:.2e}" for v in r.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def worst(ours: pd.DataFrame, ref: pd.DataFrame, mask: np.ndarray, base_mean: pd.Series, extra: dict, k: int = 8):
    """The ``k`` (perturbation, gene) pairs with the largest absolute difference, with context columns."""
    diff = (ours - ref).abs().where(mask)
    s = diff.stack().sort_values(ascending=False).head(k)
    t = pd.DataFrame({"abs diff": s})
    for name, frame in extra.items():
        t[name] = [frame.loc[p, g] for p, g in s.index]
    t["control mean"] = [base_mean[g] for _, g in s.index]
    return t.to_string(float_format=lambda v: f"{v:.4g}")


def refit_shrunk(adata, ours, py, two, *, threshold: float = 1e-3, most: int = 40, show: int = 8) -> None:
    """Why the shrunk fold changes differ: pairs off by more than ``threshold`` (log2), the ``most`` largest,
    refitted exactly at each tool's own dispersion and prior scale (:func:`ape_mode`).

    Each pair is put in one class: ``PyDESeq2 off its mode`` (its value's negative log posterior, at its
    own settings, exceeds the exact mode's by > 1e-4: L-BFGS-B stopped early or found a local mode);
    ``pertscale off its mode`` (likewise at pertscale's settings); ``settings`` (each is its own exact mode:
    the difference is the prior scale's and the dispersion's).
    """
    import scipy.sparse as sp

    x = sp.csr_matrix(adata.X)
    labels = adata.obs[COLUMN].to_numpy()
    diff = (ours["lfc_shrunk"] - py["lfc_shrunk"]).abs().where(two).stack().sort_values(ascending=False)
    over = diff[diff > threshold]
    print(
        f"Shrunk pairs off by more than {threshold} log2: {over.size} of {int(two.sum())}; the {min(most, over.size)} "
        "largest refitted exactly (posterior mode at each tool's own dispersion and prior scale). Gap: negative log "
        "posterior of the tool's value minus the exact mode's (> 1e-4: the tool is not at the global mode)\n"
    )
    rows, classes = (
        [],
        {"PyDESeq2 off its mode": 0, "pertscale off its mode": 0, "settings (prior scale, dispersion)": 0},
    )
    for p, g in over.index[:most]:
        j = adata.var_names.get_loc(g)
        cells = (labels == CONTROL) | (labels == p)
        y = np.asarray(x[cells][:, j].toarray()).ravel().astype(np.float64)
        grp = (labels[cells] == p).astype(np.float64)
        a, b = ours["lfc_shrunk"].loc[p, g], py["lfc_shrunk"].loc[p, g]
        cand = [a, b, ours["lfc"].loc[p, g], py["lfc"].loc[p, g]]
        m_py, f_py = ape_mode(y, py["size_factors"][cells], grp, py["dispersion"][j], py["prior_scale"][p], cand)
        m_ou, f_ou = ape_mode(y, ours["size_factors"][cells], grp, ours["dispersion"][j], ours["prior_scale"][p], cand)
        gap_py = f_py(b * np.log(2.0)) - f_py(m_py * np.log(2.0))
        gap_ou = f_ou(a * np.log(2.0)) - f_ou(m_ou * np.log(2.0))
        if gap_py > 1e-4:
            classes["PyDESeq2 off its mode"] += 1
        if gap_ou > 1e-4:
            classes["pertscale off its mode"] += 1
        if gap_py <= 1e-4 and gap_ou <= 1e-4:
            classes["settings (prior scale, dispersion)"] += 1
        rows.append(f"| {p} | {g} | {a:.6f} | {m_ou:.6f} | {gap_ou:.2g} | {b:.6f} | {m_py:.6f} | {gap_py:.2g} |")
    print("; ".join(f"{k}: {v}" for k, v in classes.items()) + "\n")
    print(
        "| perturbation | gene | pertscale | exact mode (ours' settings) | gap | PyDESeq2 | exact mode (Py's settings) "
        "| gap |\n|---|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows[:show]) + "\n")


def one_screen(name: str, path: Path, args) -> None:
    import scipy.sparse as sp

    adata = subset(path, n_perturbations=args.perturbations, n_genes=args.genes, min_mean=args.min_mean)
    if adata is None:
        return
    perts = list(adata.obs[COLUMN].cat.categories[1:])
    n_cells = adata.obs[COLUMN].value_counts()
    print(f"## {name}: {adata.n_obs:,} cells x {adata.n_vars} genes, min_mu = {args.min_mu:g}\n")
    print(
        f"{n_cells[CONTROL]:,} control cells; perturbations (cells): "
        + ", ".join(f"{p} ({n_cells[p]:,})" for p in perts)
        + f"; genes: the top {args.genes} by mean count among mean >= {args.min_mean}; "
        f"{adata.uns['dropped_cells']} cells without a count in them dropped.\n"
    )
    times = {}
    t0 = time.perf_counter()
    r = run_r(adata, args.min_mu)
    times["DESeq2 (R)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    py = run_pydeseq2(adata, args.min_mu)
    times["PyDESeq2"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = run_pertscale(adata, args.min_mu)
    times["pertscale"] = time.perf_counter() - t0
    print(
        "Seconds: "
        + ", ".join(f"{k} {v:.1f}" for k, v in times.items())
        + f" (DESeq2 {r['version']}; R's p-values from coef/SE vs its results(): max rel. diff "
        f"{r['pvalue_check']:.1e})\n"
    )

    # one-sided pairs: the perturbation's or the control's cells hold no count of the gene
    x = sp.csr_matrix(adata.X)
    labels = adata.obs[COLUMN].to_numpy()
    ctrl_sum = np.asarray(x[labels == CONTROL].sum(axis=0)).ravel()
    one_sided = np.vstack([(np.asarray(x[labels == p].sum(axis=0)).ravel() == 0) | (ctrl_sum == 0) for p in perts])
    two = ~one_sided
    if ours["one_sided"] is not None:
        marked = int(ours["one_sided"].to_numpy().sum())
        print(f"One-sided pairs: {int(one_sided.sum())} of {one_sided.size} (pertscale marks {marked}); left out.\n")
    else:
        print(f"One-sided pairs: {int(one_sided.sum())} of {one_sided.size}; left out.\n")

    sf = [
        ("size factors: pertscale vs DESeq2", errors(ours["size_factors"], r["size_factors"], floor=0)),
        ("size factors: PyDESeq2 vs DESeq2", errors(py["size_factors"], r["size_factors"], floor=0)),
        ("dispersion: pertscale vs DESeq2", errors(ours["dispersion"], r["dispersion"], floor=0)),
        ("dispersion: PyDESeq2 vs DESeq2", errors(py["dispersion"], r["dispersion"], floor=0)),
        ("dispersion: pertscale vs PyDESeq2", errors(ours["dispersion"], py["dispersion"], floor=0)),
    ]
    lfc = [
        ("MLE log2FC: pertscale vs PyDESeq2", errors(ours["lfc"], py["lfc"], floor=FLOOR, mask=two)),
        ("MLE log2FC: pertscale vs DESeq2", errors(ours["lfc"], r["lfc"], floor=FLOOR, mask=two)),
        ("MLE log2FC: PyDESeq2 vs DESeq2 (yardstick)", errors(py["lfc"], r["lfc"], floor=FLOOR, mask=two)),
        (
            "**shrunk log2FC: pertscale vs PyDESeq2 lfc_shrink**",
            errors(ours["lfc_shrunk"], py["lfc_shrunk"], floor=FLOOR, mask=two),
        ),
        ("p-value: pertscale vs DESeq2", errors(ours["pvalue"], r["pvalue"], floor=0, mask=two)),
        ("p-value: PyDESeq2 vs DESeq2", errors(py["pvalue"], r["pvalue"], floor=0, mask=two)),
        ("p-value: pertscale vs PyDESeq2", errors(ours["pvalue"], py["pvalue"], floor=0, mask=two)),
    ]
    print(f"Per gene ({adata.n_vars} genes); NaN (a, b): genes each side leaves NaN, excluded\n")
    print(markdown(sf) + "\n")
    print(f"Per (perturbation, gene), two-sided pairs only ({int(two.sum())} of {two.size}); NaN (a, b) likewise\n")
    print(markdown(lfc) + "\n")

    # per perturbation: the shrunk agreement and the yardstick, side by side, with apeGLM's prior scales
    per = []
    for i, p in enumerate(perts):
        m = two[i]
        e_s = errors(ours["lfc_shrunk"].loc[p], py["lfc_shrunk"].loc[p], floor=FLOOR, mask=m)
        e_y = errors(py["lfc"].loc[p], r["lfc"].loc[p], floor=FLOOR, mask=m)
        e_m = errors(ours["lfc"].loc[p], py["lfc"].loc[p], floor=FLOOR, mask=m)
        per.append(
            f"| {p} | {e_s['n']} | {ours['prior_scale'][p]:.6g} | {py['prior_scale'].get(p, np.nan):.6g} | "
            f"{e_s['rel median']:.2e} | {e_s['rel max']:.2e} | {e_s['abs max']:.2e} | "
            f"{e_m['abs max']:.2e} | {e_y['rel median']:.2e} | {e_y['rel max']:.2e} | {e_y['abs max']:.2e} |"
        )
    print(
        "Per perturbation: apeGLM prior scale (natural log; pertscale, PyDESeq2); shrunk pertscale vs PyDESeq2; "
        "MLE pertscale vs PyDESeq2; MLE PyDESeq2 vs DESeq2 (yardstick)\n\n"
        "| perturbation | n | prior scale ours | prior scale Py | shrunk rel median | shrunk rel max | "
        "shrunk abs max | MLE ours-vs-Py abs max | yardstick rel median | yardstick rel max | yardstick abs max |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    print("\n".join(per) + "\n")

    base = pd.Series(np.asarray(x[labels == CONTROL].mean(axis=0)).ravel(), index=adata.var_names)
    ctx = {
        "ours shrunk": ours["lfc_shrunk"],
        "Py shrunk": py["lfc_shrunk"],
        "ours MLE": ours["lfc"],
        "Py MLE": py["lfc"],
        "R MLE": r["lfc"],
    }
    print("Largest shrunk differences (pertscale vs PyDESeq2):\n\n```")
    print(worst(ours["lfc_shrunk"], py["lfc_shrunk"], two, base, ctx) + "\n```\n")
    refit_shrunk(adata, ours, py, two)
    print("Largest MLE differences PyDESeq2 vs DESeq2 (the yardstick):\n\n```")
    print(worst(py["lfc"], r["lfc"], two, base, ctx) + "\n```\n")
    print("Largest MLE differences pertscale vs DESeq2:\n\n```")
    print(worst(ours["lfc"], r["lfc"], two, base, ctx) + "\n```\n")

    # the three largest MLE differences pertscale vs DESeq2 refitted here at each tool's dispersion:
    # the exact maximum likelihood, and DESeq2's IRLS fixed point with fitted means floored at --min-mu
    diff = (ours["lfc"] - r["lfc"]).abs().where(two).stack().sort_values(ascending=False).head(3)
    sf = ours["size_factors"]
    print(
        "Those pairs refitted (control + perturbation cells, log2): the exact MLE, and DESeq2's IRLS whose fitted "
        f"means are floored at min_mu = {args.min_mu:g} in the weights and working response (its fixed point)\n"
    )
    print("| perturbation | gene | ours | DESeq2 | exact MLE (ours' disp, R's disp) | floored IRLS (same) |")
    print("|---|---|---|---|---|---|")
    for p, g in diff.index:
        j = adata.var_names.get_loc(g)
        cells = (labels == CONTROL) | (labels == p)
        y = np.asarray(x[cells][:, j].toarray()).ravel().astype(np.float64)
        grp = (labels[cells] == p).astype(np.float64)
        fits = [
            nb_fit(y, sf[cells], grp, d[j], min_mu=mm)
            for mm in (0.0, args.min_mu)
            for d in (ours["dispersion"], r["dispersion"])
        ]
        print(
            f"| {p} | {g} | {ours['lfc'].loc[p, g]:.6f} | {r['lfc'].loc[p, g]:.6f} | "
            f"{fits[0]:.6f}, {fits[1]:.6f} | {fits[2]:.6f}, {fits[3]:.6f} |"
        )
    print()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="papalexi,schraivogel", help="comma-separated: " + ",".join(REAL))
    p.add_argument("--perturbations", type=int, default=5, help="the perturbations with the most cells")
    p.add_argument("--genes", type=int, default=300, help="at most this many genes, highest mean count first")
    p.add_argument(
        "--min-mu",
        type=float,
        default=0.5,
        help="floor of the fitted means in DESeq2's and PyDESeq2's fits and in pertscale's dispersions "
        "(DESeq2's default 0.5; its single-cell advice 1e-6)",
    )
    p.add_argument("--min-mean", type=float, default=0.05, help="least mean count of a gene over the subset")
    args = p.parse_args(argv)
    print("```\n$ " + " ".join(shlex.quote(a) for a in ["python", sys.argv[0], *(argv or sys.argv[1:])]) + "\n```\n")
    if not h.deseq2_available():
        print(f"**skipped**: {h.SKIP_REASON}")
        return 0
    import pydeseq2

    import pertscale as ps

    print(
        f"pertscale from {Path(ps.__file__).parent}, PyDESeq2 {pydeseq2.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n"
    )
    for name in [d for d in args.datasets.split(",") if d]:
        if name not in REAL:
            p.error(f"dataset {name!r} is not known; choose from {list(REAL)}")
        one_screen(name, REAL[name], args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

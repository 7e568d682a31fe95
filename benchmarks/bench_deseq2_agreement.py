"""Agreement with R's DESeq2, stage by stage: pertscale beside PyDESeq2 (the yardstick).

Runs R's DESeq2 (Debian's r-bioc-deseq2, through tests/_deseq2.py), pertscale's public nb-glm
(ps.pp.size_factors, ps.tl.dispersions, ps.tl.rank_genes_groups(method="nb-glm"), read with ps.compute)
and PyDESeq2 on the same counts, and prints a markdown table per design: for each stage (size factors,
gene-wise / trend / MAP / final dispersion, fold change, its SE, Wald statistic, p, padj, and the shrunk
fold change against PyDESeq2's lfc_shrink, since apeglm is not installable here) the max, 90th
percentile and median relative error of pertscale vs DESeq2 and of PyDESeq2 vs DESeq2.

Designs (``--designs``, comma-separated):

* ``one``: ``~condition``, 40 samples x 500 genes (ratio and poscounts size factors);
* ``two``: ``~group + condition`` (pertscale: ``covariates=["group"]``), 48 samples x 400 genes, 3 groups
  unbalanced against the condition;
* ``zeros``: ``~condition``, 20 samples x 300 genes, the first 5 genes without any count in the perturbed
  samples (DESeq2's Wald and LRT of those printed);
* ``huge``: ``~condition``, 30 samples x 300 genes, 100 genes with means 1e7-1e9.

``--real pseudobulk`` adds the real screens (../shared/data, or $PERTSCALE_DATA) as pseudo-bulk: the
control and one perturbation's cells split into pseudo-replicates, counts summed; ``--real cells`` tests
single cells of one comparison at a subset of genes. A screen that is absent is skipped with a message.

Relative error: ``|x - ref| / |ref|``; for the signed fold changes and Wald statistics the denominator is
at least 0.01 (near-zero fold changes give absolute errors). Ratio size factors are compared up to a
constant (pertscale rescales them to geometric mean 1; DESeq2 does not), and baseMean accordingly.
Gene-wise dispersions are compared where DESeq2's is above 1e-6 (not at its lower bound 1e-8); MAP
where the gene is not a dispersion outlier of either.

    python benchmarks/bench_deseq2_agreement.py --designs one,two,zeros,huge [--real pseudobulk]
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
    "papalexi": (DATA_DIR / "papalexi2021_eccite.h5ad", "IFNGR1"),
    "schraivogel": (DATA_DIR / "schraivogel2020_tapseq.h5ad", "FAM83A"),
}

#: design name -> (simulate_bulk arguments, DESeq2 design, pertscale covariates, size factor methods)
DESIGNS = {
    "one": (dict(n_samples=40, n_genes=500, seed=0), "~condition", None, ("ratio", "poscounts")),
    "two": (dict(n_samples=48, n_genes=400, seed=1, groups=3), "~group + condition", ["group"], ("ratio",)),
    "zeros": (dict(n_samples=20, n_genes=300, seed=2, zero_genes=5), "~condition", None, ("poscounts",)),
    "huge": (dict(n_samples=30, n_genes=300, seed=3, huge_genes=100), "~condition", None, ("ratio",)),
}

ROWS = (
    ("size factors", "size_factor"),
    ("baseMean", "baseMean"),
    ("gene-wise dispersion", "disp_genewise"),
    ("trend dispersion", "disp_trend"),
    ("MAP dispersion", "disp_map"),
    ("final dispersion", "dispersion"),
    ("log2 fold change", "lfc"),
    ("lfcSE", "lfc_se"),
    ("Wald statistic", "stat"),
    ("p-value", "pvalue"),
    ("padj", "padj"),
    ("shrunk LFC (vs PyDESeq2 lfc_shrink)", "lfc_shrunk"),
)


def _read(name: str):
    """A real screen read whole, or None (said) when its file is absent."""
    import anndata as ad

    path = REAL[name][0]
    if not path.exists():
        print(f"\n_{name}: {path} not found (set PERTSCALE_DATA): skipped_\n")
        return None
    return ad.read_h5ad(path)


def _pseudobulk(name: str, *, replicates: int = 6, n_genes: int = 1000, seed: int = 0):
    import scipy.sparse as sp

    a = _read(name)
    if a is None:
        return None
    group = REAL[name][1]
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for cond, label in (("control", "control"), ("perturbed", group)):
        cells = rng.permutation(np.flatnonzero(a.obs["perturbation"].astype(str).to_numpy() == label))
        for part in np.array_split(cells, replicates):
            x = a.X[part]
            rows.append(np.asarray(x.sum(axis=0) if sp.issparse(x) else x.sum(axis=0)).ravel())
            labels.append(cond)
    counts = np.rint(np.vstack(rows)).astype(np.int64)
    keep = np.argsort(-counts.sum(axis=0))[:n_genes]
    keep = np.sort(keep[(counts[:, keep] > 0).all(axis=0)])
    coldata = pd.DataFrame(
        {"condition": pd.Categorical(labels, categories=["control", "perturbed"])},
        index=[f"s{i}" for i in range(len(labels))],
    )
    return counts[:, keep], coldata


def _cells(name: str, *, n_cells: int = 400, n_genes: int = 100, seed: int = 0):
    import scipy.sparse as sp

    a = _read(name)
    if a is None:
        return None
    group = REAL[name][1]
    rng = np.random.default_rng(seed)
    labels = a.obs["perturbation"].astype(str).to_numpy()
    pick = []
    for label in ("control", group):
        cells = np.flatnonzero(labels == label)
        pick.append(rng.choice(cells, min(n_cells, cells.size), replace=False))
    pick = np.sort(np.concatenate(pick))
    x = a.X[pick]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    counts = np.rint(x).astype(np.int64)
    keep = np.sort(np.argsort(-counts.mean(axis=0))[:n_genes])
    cond = np.where(labels[pick] == group, "perturbed", "control")
    coldata = pd.DataFrame(
        {"condition": pd.Categorical(cond, categories=["control", "perturbed"])},
        index=[f"c{i}" for i in range(pick.size)],
    )
    return counts[:, keep], coldata


def compare(ours: pd.DataFrame, py: pd.DataFrame, ref: pd.DataFrame, sf: tuple, *, ratio: bool) -> pd.DataFrame:
    """The agreement table of one run: a row per stage, pertscale's and PyDESeq2's errors against DESeq2."""
    ours_sf, py_sf, ref_sf = sf
    out = {}
    a = h.size_factor_agreement(ours_sf, ref_sf, up_to_constant=ratio)
    b = h.size_factor_agreement(py_sf, ref_sf, up_to_constant=False)
    out["size_factor"] = {f"ours {k}": a[k] for k in ("max", "q90", "median")} | {
        f"PyDESeq2 {k}": b[k] for k in ("max", "q90", "median")
    }
    ours = ours.copy()
    ours["baseMean"] = ours["baseMean"] / a["constant"]  # undo the rescaling of ratio factors
    interior = (ref["disp_genewise"] > 1e-6).to_numpy()
    for _, col in ROWS[1:]:
        if col == "lfc_shrunk":
            e_ours = h.agreement(ours, py, [col], floors=h.FLOORS).loc[col]
            e_py = pd.Series({"max": np.nan, "q90": np.nan, "median": np.nan})
        else:
            genes = interior if col == "disp_genewise" else None
            e_ours = h.agreement(ours, ref, [col], genes=genes, floors=h.FLOORS).loc[col]
            e_py = h.agreement(py, ref, [col], genes=genes, floors=h.FLOORS).loc[col]
        out[col] = {f"ours {k}": e_ours[k] for k in ("max", "q90", "median")} | {
            f"PyDESeq2 {k}": e_py[k] for k in ("max", "q90", "median")
        }
        out[col]["n (ours NaN mismatch)"] = f"{int(e_ours['n'])} ({int(e_ours['nan_mismatch'])})"
    table = pd.DataFrame(out).T
    table.attrs["constant"] = a["constant"]
    return table


def _markdown(table: pd.DataFrame) -> str:
    names = dict(ROWS)
    lines = ["| stage | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
    for col, row in table.iterrows():
        label = next((k for k, v in names.items() if v == col), col)
        cells = [v if isinstance(v, str) else ("-" if not np.isfinite(v) else f"{v:.2e}") for v in row]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _genes(ref: pd.DataFrame, ours: pd.DataFrame, py: pd.DataFrame, genes, columns) -> str:
    t = pd.concat({"DESeq2": ref.loc[genes, columns], "pertscale": ours.loc[genes, columns]}, axis=1)
    t = pd.concat([t, pd.concat({"PyDESeq2": py.loc[genes, columns]}, axis=1)], axis=1)
    return t.T.to_string(float_format=lambda v: f"{v:.4g}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--designs", default="one,two,zeros,huge", help="comma-separated: " + ",".join(DESIGNS))
    p.add_argument("--real", default="", help="'pseudobulk' and/or 'cells' (comma-separated): the real screens")
    args = p.parse_args(argv)
    print("```\n$ python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]) + "\n```\n")
    if not h.deseq2_available():
        print(f"**skipped**: {h.SKIP_REASON}")
        return 0
    import pydeseq2

    import pertscale as ps

    print(f"pertscale from {Path(ps.__file__).parent}, ", end="")
    print(f"PyDESeq2 {pydeseq2.__version__}", end="")
    runs = []  # (title, counts, coldata, design, covariates, size factor method, extra DESeq2 options)
    for name in [d for d in args.designs.split(",") if d]:
        if name not in DESIGNS:
            p.error(f"design {name!r} is not known; choose from {list(DESIGNS)}")
        kw, design, covariates, methods = DESIGNS[name]
        counts, coldata = h.simulate_bulk(**kw)
        for method in methods:
            extra = {"test": "LRT", "reduced": "~1"} if name in ("zeros", "huge") else {}
            runs.append((f"{name} ({design}, {method})", name, counts, coldata, design, covariates, method, extra))
    for kind in [k for k in args.real.split(",") if k]:
        for screen in REAL:
            got = _pseudobulk(screen) if kind == "pseudobulk" else _cells(screen) if kind == "cells" else None
            if got is not None:
                method = "ratio" if kind == "pseudobulk" else "poscounts"
                runs.append((f"{screen} {kind} (~condition, {method})", kind, *got, "~condition", None, method, {}))
    if not runs:
        return 0
    jobs = [dict(counts=c, coldata=cd, design=d, size_factors=m, **extra) for _, _, c, cd, d, _, m, extra in runs]
    t0 = time.perf_counter()
    refs = h.run_deseq2_batch(jobs)
    print(f", DESeq2 {refs[0]['version']} ({time.perf_counter() - t0:.1f} s for {len(jobs)} runs)\n")
    for (title, name, counts, coldata, design, covariates, method, _), res in zip(runs, refs, strict=True):
        ref = h.deseq2_table(res)
        t0 = time.perf_counter()
        try:
            ours_sf, ours = h.pertscale_table(counts, coldata, size_factors=method, covariates=covariates)
        except Exception as e:  # report and go on: the kernel is being rewritten
            print(f"### {title}\n\npertscale failed: {e!r}\n")
            continue
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            py_sf, py = h.pydeseq2_table(counts, coldata, design, size_factors=method)
        t_py = time.perf_counter() - t0
        table = compare(
            ours,
            py,
            ref,
            (ours_sf["size_factor"], py_sf["size_factor"], res["size_factors"]),
            ratio=method == "ratio",
        )
        print(f"### {title}: {counts.shape[0]} samples x {counts.shape[1]} genes\n")
        print(f"pertscale {t_ours:.1f} s, PyDESeq2 {t_py:.1f} s; relative errors against DESeq2\n")
        print(_markdown(table))
        outliers = (res["dispOutlier"] == 1).sum()
        print(
            f"\nDESeq2: {int(outliers)} dispersion outliers, {int((res['dispGeneEst'] <= 1e-6).sum())} gene-wise "
            f"estimates at the lower bound, trend {res['trend']}, prior variance {res['prior_variance']:.4g}\n"
        )
        if name == "zeros":
            genes = ref.index[:5]
            cols = ["baseMean", "dispersion", "lfc", "lfc_se", "stat", "pvalue", "lrt_stat", "lrt_pvalue"]
            print("Genes without a count in the perturbed samples:\n\n```\n" + _genes(ref, ours, py, genes, cols))
            print("```\n")
        if name == "huge":
            genes = ref.index[:100:20]
            ours = ours.assign(baseMean=ours["baseMean"] / table.attrs["constant"])
            cols = ["baseMean", "disp_genewise", "disp_trend", "dispersion", "lfc", "lfc_se", "pvalue"]
            print("Genes with means 1e7-1e9:\n\n```\n" + _genes(ref, ours, py, genes, cols) + "\n```\n")
            huge = h.agreement(ours, ref, cols, genes=ref.index[:100], floors=h.FLOORS)
            print("pertscale vs DESeq2 on the 100 huge genes only:\n\n```\n" + huge.to_string() + "\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

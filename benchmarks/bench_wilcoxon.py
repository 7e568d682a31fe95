"""Wilcoxon rank-sum of every perturbation against control: pertscale and its peers.

Runs pertscale, illico, crispyx and scanpy on the same log1p-normalized data in
one run, each tool in its own subprocess (so peak memory is its own), twice:
the first call includes one-time costs (numba compilation, cluster start),
the second is the warm time. Prints seconds per tool, the ratio to pertscale,
peak resident memory, and how far each tool's p-values are from pertscale's.

    python benchmarks/bench_wilcoxon.py                       # all datasets, all tools
    python benchmarks/bench_wilcoxon.py --datasets sim30k --tools pertscale,illico
    python benchmarks/bench_wilcoxon.py --datasets sim30k-sorted --tools pertscale,pertscale-local,illico

Needs the ``bench`` extra: ``pip install -e ".[bench]"``.
Real datasets are read from ../shared/data (or $PERTSCALE_DATA) and skipped
with a message when absent.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("PERTSCALE_DATA", HERE.parent.parent / "shared" / "data"))
DATASETS = {
    "sim30k": None,  # simulated: 30,000 cells x 2,000 genes, 100 perturbations + control
    "sim30k-sorted": None,  # the same cells stored sorted by perturbation (as the working store will be)
    "papalexi": DATA / "papalexi2021_eccite.h5ad",
    "schraivogel": DATA / "schraivogel2020_tapseq.h5ad",
}
TOOLS = ("pertscale", "pertscale-local", "illico", "crispyx", "scanpy")
COLUMN, CONTROL = "perturbation", "control"


# --------------------------------------------------------------------------- preparation
def prepare(name: str, workdir: Path) -> Path | None:
    """Log1p-normalized CSR h5ad of a dataset (cached in workdir)."""
    out = workdir / f"{name}.norm.h5ad"
    if out.exists():
        return out
    import anndata as ad
    import scanpy as sc

    import pertscale as ps

    if name.endswith("-sorted"):
        base = ad.read_h5ad(prepare(name.removesuffix("-sorted"), workdir))
        order = np.argsort(base.obs[COLUMN].cat.codes.to_numpy(), kind="stable")
        base[order].copy().write_h5ad(out)
        return out
    if DATASETS[name] is None:
        adata = ps.datasets.simulate_screen(30_000, 2_000, 100, control_fraction=0.1, seed=0)
    else:
        if not DATASETS[name].exists():
            print(f"skipping {name}: {DATASETS[name]} not found (set PERTSCALE_DATA)", file=sys.stderr)
            return None
        adata = ad.read_h5ad(DATASETS[name])
    adata = adata[~adata.obs[COLUMN].isin(["multiple", "unassigned"])].copy()
    adata.obs[COLUMN] = adata.obs[COLUMN].astype(str).astype("category")
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.uns = {}
    adata.obsm.clear()
    adata.write_h5ad(out)
    return out


# --------------------------------------------------------------------------- one tool, in a subprocess
def _groups_genes(adata):
    groups = [g for g in adata.obs[COLUMN].cat.categories if g != CONTROL]
    return groups, list(adata.var_names)


def run_pertscale(path: Path, scheduler: str):
    import pertscale as ps

    ps.settings.progress = False
    adata = ps.read(path)  # lazy: reading the file is part of the timed work
    res = ps.compute(
        ps.tl.rank_genes_groups(adata, perturbation_column=COLUMN, control_label=CONTROL), scheduler=scheduler
    )
    return list(res.obs_names), list(res.var_names), res.layers["pvals"]


def run_illico(adata):
    import illico

    df = illico.asymptotic_wilcoxon(
        adata, is_log1p=True, group_keys=COLUMN, reference=CONTROL, use_continuity=False, tie_correct=True, n_threads=2
    )
    groups, genes = _groups_genes(adata)
    p = df["p_value"].unstack("feature").reindex(index=groups, columns=genes)
    return groups, genes, p.to_numpy(dtype=np.float64)


def run_crispyx(path: Path, outdir: Path):
    import crispyx

    res = crispyx.de.wilcoxon_test(
        str(path),
        perturbation_column=COLUMN,
        control_label=CONTROL,
        min_pct_ctrl=0.0,
        min_pct_pert=0.0,
        min_mean_ctrl=0.0,
        min_mean_pert=0.0,
        tie_correct=True,
        output_dir=str(outdir),
        verbose=False,
        force=True,
    )
    return [str(g) for g in res.groups], [str(g) for g in res.genes], np.asarray(res.pvalues, dtype=np.float64)


def run_scanpy(adata):
    import pandas as pd
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(adata, COLUMN, reference=CONTROL, method="wilcoxon", tie_correct=True)
    rgg = adata.uns["rank_genes_groups"]
    groups, genes = list(rgg["names"].dtype.names), list(adata.var_names)
    p = np.vstack([pd.Series(rgg["pvals"][g], index=rgg["names"][g]).reindex(genes).to_numpy() for g in groups])
    return groups, genes, p


def worker(tool: str, path: Path, out: Path) -> None:
    in_memory = tool in ("illico", "scanpy")
    if in_memory:
        import anndata as ad

        adata = ad.read_h5ad(path)  # not timed: these tools need the matrix in memory
    times = []
    for _ in range(2):
        if in_memory:
            fresh = adata.copy()
        t = time.perf_counter()
        if tool == "pertscale":
            result = run_pertscale(path, "synchronous")
        elif tool == "pertscale-local":
            result = run_pertscale(path, "local")
        elif tool == "illico":
            result = run_illico(fresh)
        elif tool == "crispyx":
            with tempfile.TemporaryDirectory() as tmp:
                result = run_crispyx(path, Path(tmp))
        elif tool == "scanpy":
            result = run_scanpy(fresh)
        times.append(time.perf_counter() - t)
        if tool == "scanpy":
            break  # slow and without one-time costs worth separating
    groups, genes, p = result
    np.savez(out, groups=np.array(groups), genes=np.array(genes), pvals=p)
    peak = peak_rss_mb()
    if tool == "pertscale-local":  # add the worker processes' peaks
        from pertscale.cluster import local_client

        peak += sum(local_client().run(peak_rss_mb).values())
    print(json.dumps({"cold": times[0], "warm": times[-1], "peak_mb": peak}))


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM: reset at exec, unlike ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- driver
def compare(ref: np.lib.npyio.NpzFile, other: np.lib.npyio.NpzFile) -> tuple[float, float]:
    """Max relative difference of p-values and max |log10 p| difference, on shared (group, gene)."""
    gi = {g: i for i, g in enumerate(other["groups"])}
    ji = {g: i for i, g in enumerate(other["genes"])}
    rows = [i for i, g in enumerate(ref["groups"]) if g in gi]
    cols = [j for j, g in enumerate(ref["genes"]) if g in ji]
    a = ref["pvals"][np.ix_(rows, cols)]
    b = other["pvals"][np.ix_([gi[ref["groups"][i]] for i in rows], [ji[ref["genes"][j]] for j in cols])]
    ok = ~np.isnan(a) & ~np.isnan(b)
    rel = np.abs(a[ok] - b[ok]) / np.maximum(a[ok], 1e-300)
    dlog = np.abs(np.log10(np.maximum(a[ok], 1e-300)) - np.log10(np.maximum(b[ok], 1e-300)))
    return float(rel.max()), float(dlog.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="sim30k,papalexi,schraivogel")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--workdir", default=str(HERE / "_data"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, Path(args.input), Path(args.out))
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tools = args.tools.split(",")
    print(
        f"{'dataset':<12} {'cells x genes':>14} {'tool':<16} {'cold s':>8} {'warm s':>8} {'ratio':>7} "
        f"{'peak MB':>8} {'max rel dp':>11} {'max dlog10p':>11}"
    )
    for name in args.datasets.split(","):
        path = prepare(name, workdir)
        if path is None:
            continue
        import anndata as ad

        shape = ad.read_h5ad(path, backed="r").shape
        rows, base = {}, None
        for tool in tools:
            out = workdir / f"{name}.{tool}.npz"
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", tool, "--input", str(path), "--out", str(out)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                print(f"{name:<12} {tool}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows[tool] = json.loads(proc.stdout.strip().splitlines()[-1])
            if tool == "pertscale":
                base = (rows[tool]["warm"], np.load(out))
        for tool, r in rows.items():
            ratio = r["warm"] / base[0] if base else float("nan")
            rel, dlog = compare(base[1], np.load(workdir / f"{name}.{tool}.npz")) if base else (np.nan, np.nan)
            print(
                f"{name:<12} {shape[0]:>7,}x{shape[1]:<6,} {tool:<16} {r['cold']:>8.2f} {r['warm']:>8.2f} "
                f"{ratio:>7.2f} {r['peak_mb']:>8.0f} {rel:>11.1e} {dlog:>11.1e}"
            )


if __name__ == "__main__":
    main()

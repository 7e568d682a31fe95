"""Highly variable genes, PCA and pseudo-bulk as whole processes: pertscale against scanpy.

Each tool runs as its own process on the same file (imports included), as a
user would run it, and is timed from start to exit; the peak resident memory
of every process of its tree (the client, the fork server, each Dask worker)
is sampled every 50 ms (``measure`` of ``bench_main_job.py``). The children
print their own stage times, which the table shows next to the total.

Tasks:

- ``pca``: pertscale ``ps.read``, ``ps.pp.normalize_total``, ``ps.pp.log1p``
  (both lazy, blockwise), ``ps.pp.highly_variable_genes(flavor="seurat",
  n_top_genes=2000)`` (one pass), ``ps.pp.pca(n_comps=50)`` (lazy scores),
  then ``ps.write`` of the scores and ``uns['pca']`` to a zarr store (the
  scores are computed there, block by block). Stages: ``cluster`` (start of
  the default local cluster), ``hvg`` (reading included: normalization is
  lazy), ``pca``, ``write``. scanpy: ``anndata.read_h5ad`` (``read_zarr``)
  of the whole matrix into memory, ``sc.pp.normalize_total(target_sum=1e4)``,
  ``sc.pp.log1p``, ``sc.pp.highly_variable_genes(flavor="seurat",
  n_top_genes=2000)``, ``sc.pp.pca(n_comps=50, svd_solver="arpack",
  mask_var="highly_variable")``, ``obsm['X_pca']`` saved as ``.npy``.
  Agreement: genes whose HVG call differs, the largest relative difference
  of ``variance_ratio``, the smallest ``abs(cosine)`` between the two tools'
  first 10 loadings (and first 10 score columns).
- ``pseudobulk``: pertscale ``ps.io.prepare`` (the cells sorted by
  perturbation into a working store, as ``pertscale run`` does, when the
  file is not sorted; stage ``sort``), ``ps.pb.pseudobulk(...,
  perturbation_column="perturbation")`` (one pass) and ``ps.write`` to h5ad; scanpy
  ``sc.get.aggregate(adata, by="perturbation", func="sum")`` on the matrix
  read into memory, written to h5ad. Agreement: the largest relative
  difference of the summed counts (``|a - b| / max(|b|, 1)``).

Each tool saves what it computed into a temporary directory under
``--data-dir``; the comparison runs in this (parent) process afterwards.
``one pass`` is ``bench_main_job``'s: every row block of the file read and
summed, threads in one process; each pertscale stage is also given in passes
(its seconds over that).

pertscale runs with its defaults (a ``LocalCluster`` of one single-threaded
worker process per core) unless ``--scheduler`` names another (``threads``).

Datasets: those of ``bench_main_job.py`` (``sim30k``, ``100k``, ``genome-zarr``,
...), simulated into ``--data-dir`` on first use. scanpy is skipped on
``genome`` (2 M cells x 8,248 genes at 38 % non-zero: ~100 GiB in memory).

    python benchmarks/bench_preprocess.py --datasets sim30k,100k
    python benchmarks/bench_preprocess.py --datasets genome-zarr --tools pertscale

Needs the ``bench`` extra (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_main_job import ONE_PASS, _mem, _size, dataset, measure  # noqa: E402

#: Datasets scanpy cannot hold in this machine's memory (24 GiB).
TOO_BIG_FOR_SCANPY = ("genome",)
N_TOP, N_COMPS, N_COMPARED = 2_000, 50, 10

_HEAD = """
import sys, time
t0 = time.perf_counter()
stages = {}
def lap(name):
    global t0
    t = time.perf_counter()
    stages[name] = t - t0
    t0 = t
"""

PS_PCA = _HEAD + textwrap.dedent(
    """
    from pathlib import Path
    import anndata, numpy as np, pertscale as ps
    path, out, scheduler = sys.argv[1], Path(sys.argv[2]), sys.argv[3] or "local"
    ps.settings.progress = False
    lap("import")
    ps.cluster.using(scheduler).__enter__()  # the face's context for the whole script; the local cluster starts here
    lap("cluster")
    a = ps.read(path)
    ps.pp.normalize_total(a)
    ps.pp.log1p(a)
    lap("read")
    ps.pp.highly_variable_genes(a, flavor="seurat", n_top_genes=2000)
    lap("hvg")
    ps.pp.pca(a, n_comps=50)
    lap("pca")
    scores = anndata.AnnData(obs=a.obs[[]], obsm={"X_pca": a.obsm["X_pca"]}, uns={"pca": a.uns["pca"]})
    ps.write(scores, out / "pca.zarr")
    lap("write")
    np.save(out / "hvg.npy", a.var["highly_variable"].to_numpy())
    np.save(out / "loadings.npy", a.varm["PCs"])
    print("stages:", ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    """
)

SC_PCA = _HEAD + textwrap.dedent(
    """
    from pathlib import Path
    import anndata, numpy as np, scanpy as sc
    path, out = sys.argv[1], Path(sys.argv[2])
    lap("import")
    a = anndata.read_h5ad(path) if path.endswith(".h5ad") else anndata.read_zarr(path)
    lap("read")
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    lap("normalize")
    sc.pp.highly_variable_genes(a, flavor="seurat", n_top_genes=2000)
    lap("hvg")
    sc.pp.pca(a, n_comps=50, svd_solver="arpack", mask_var="highly_variable")
    lap("pca")
    np.save(out / "X_pca.npy", a.obsm["X_pca"])
    lap("write")
    np.save(out / "hvg.npy", a.var["highly_variable"].to_numpy())
    np.save(out / "loadings.npy", a.varm["PCs"])
    np.save(out / "variance_ratio.npy", a.uns["pca"]["variance_ratio"])
    print("stages:", ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    """
)

PS_PB = _HEAD + textwrap.dedent(
    """
    from pathlib import Path
    import pertscale as ps
    path, out, scheduler = sys.argv[1], Path(sys.argv[2]), sys.argv[3] or "local"
    ps.settings.progress = False
    lap("import")
    ps.cluster.using(scheduler).__enter__()  # the face's context for the whole script
    lap("cluster")
    adata = ps.read(path)
    if not ps.io._prepare.is_sorted(adata.obs["perturbation"].astype(str), "control", ()):
        # cells in barcode order: sort once (as pertscale run does), so each block holds few groups
        adata = ps.io.prepare(path, perturbation_column="perturbation", control_label="control",
            out=out / "sorted.zarr")
        lap("sort")
    result = ps.pb.pseudobulk(adata, perturbation_column="perturbation")
    lap("pseudobulk")
    ps.write(result, out / "pb.h5ad")
    lap("write")
    print("stages:", ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    """
)

SC_PB = _HEAD + textwrap.dedent(
    """
    from pathlib import Path
    import anndata, scanpy as sc
    path, out = sys.argv[1], Path(sys.argv[2])
    lap("import")
    a = anndata.read_h5ad(path) if path.endswith(".h5ad") else anndata.read_zarr(path)
    lap("read")
    result = sc.get.aggregate(a, by="perturbation", func="sum")
    lap("aggregate")
    result.write_h5ad(out / "pb.h5ad")
    lap("write")
    print("stages:", ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    """
)

SCRIPTS = {("pertscale", "pca"): PS_PCA, ("scanpy", "pca"): SC_PCA, ("pertscale", "pseudobulk"): PS_PB}
SCRIPTS[("scanpy", "pseudobulk")] = SC_PB


def _stage_times(stdout: str) -> dict[str, float]:
    m = re.search(r"^stages: (.*)$", stdout, flags=re.MULTILINE)
    if not m:
        return {}
    return {k: float(v) for k, v in (part.rsplit(" ", 1) for part in m.group(1).split(", "))}


def _stages_text(stages: dict[str, float], pass_s: float, tool: str) -> str:
    """Stage seconds; pertscale's stages over the matrix also in passes (seconds / one pass)."""
    parts = []
    for k, v in stages.items():
        passes = tool == "pertscale" and k not in ("import", "cluster", "read") and pass_s == pass_s
        parts.append(f"{k} {v:.1f}" + (f" ({v / pass_s:.1f} p)" if passes else ""))
    return ", ".join(parts)


def _total_memory(peaks: dict) -> int:
    return sum(v for _, v in peaks.values())


def _abs_cosines(a, b, n: int):
    import numpy as np

    a, b = np.asarray(a[:, :n], dtype=np.float64), np.asarray(b[:, :n], dtype=np.float64)
    return np.abs((a * b).sum(axis=0)) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))


def agree_pca(ps_dir: Path, sc_dir: Path) -> str:
    """HVG genes differing, max relative difference of variance_ratio, min |cos| of the first loadings and scores."""
    import anndata
    import numpy as np

    ours = anndata.read_zarr(ps_dir / "pca.zarr")
    hvg = int((np.load(ps_dir / "hvg.npy") != np.load(sc_dir / "hvg.npy")).sum())
    ratio_ps, ratio_sc = np.asarray(ours.uns["pca"]["variance_ratio"]), np.load(sc_dir / "variance_ratio.npy")
    ratio = float(np.max(np.abs(ratio_ps - ratio_sc) / np.abs(ratio_sc)))
    loadings = _abs_cosines(np.load(ps_dir / "loadings.npy"), np.load(sc_dir / "loadings.npy"), N_COMPARED).min()
    scores = _abs_cosines(np.asarray(ours.obsm["X_pca"]), np.load(sc_dir / "X_pca.npy"), N_COMPARED).min()
    return (
        f"HVG differing {hvg} of {N_TOP}; variance_ratio max rel diff {ratio:.1e}; "
        f"min abs(cos) first {N_COMPARED} loadings {loadings:.6f}, scores {scores:.6f}"
    )


def agree_pseudobulk(ps_dir: Path, sc_dir: Path) -> str:
    """Largest relative difference of the summed counts, groups matched by name."""
    import anndata
    import numpy as np
    import scipy.sparse as sp

    ours, theirs = anndata.read_h5ad(ps_dir / "pb.h5ad"), anndata.read_h5ad(sc_dir / "pb.h5ad")
    if set(ours.obs_names) != set(theirs.obs_names):
        return f"groups differ: {len(set(ours.obs_names) ^ set(theirs.obs_names))} not in both"
    theirs = theirs[ours.obs_names]
    a = ours.X.toarray() if sp.issparse(ours.X) else np.asarray(ours.X)
    b = theirs.layers["sum"]
    b = b.toarray() if sp.issparse(b) else np.asarray(b)
    rel = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1)))
    return f"{ours.n_obs:,} groups x {ours.n_vars:,} genes; sums max rel diff {rel:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="sim30k,100k")
    parser.add_argument("--tools", default="pertscale,scanpy")
    parser.add_argument("--tasks", default="pca,pseudobulk")
    parser.add_argument("--data-dir", type=Path, default=Path("/work/bench-data"))
    parser.add_argument("--scheduler", default="", help="pertscale's scheduler (default: its own, a LocalCluster).")
    parser.add_argument("--no-one-pass", action="store_true", help="Skip timing one pass over the file.")
    args = parser.parse_args()
    tools, tasks = args.tools.split(","), args.tasks.split(",")
    rows = []
    for name in args.datasets.split(","):
        path = dataset(name, args.data_dir)
        if path is None:
            continue
        pass_s = float("nan")
        if not args.no_one_pass:
            one_pass = measure([sys.executable, "-c", ONE_PASS, str(path)])
            pass_s = float(one_pass["stdout"].strip() or "nan")
        print(f"{name}: {path} ({_size(path) / 2**30:.1f} GiB), one pass over the file {pass_s:.1f} s", flush=True)
        for task in tasks:
            work = Path(tempfile.mkdtemp(prefix=f"bench-pre-{name}-{task}-", dir=args.data_dir))
            try:
                results = {}
                for tool in tools:
                    if tool == "scanpy" and name.partition("-")[0] in TOO_BIG_FOR_SCANPY:
                        print(f"{name:<12} {task:<10} scanpy: skipped, does not fit in memory", flush=True)
                        rows.append((name, task, tool, "", None, "", "skipped, does not fit in memory", "", "", ""))
                        continue
                    out = work / tool
                    out.mkdir()
                    cmd = [sys.executable, "-c", SCRIPTS[(tool, task)], str(path), str(out)]
                    cmd += [args.scheduler] if tool == "pertscale" else []
                    r = measure(cmd)
                    ok = r["code"] == 0
                    results[tool] = (r, out, ok)
                    sched = (args.scheduler or "local cluster") if tool == "pertscale" else "-"
                    stages = _stages_text(_stage_times(r["stdout"]), pass_s, tool)
                    status = "ok" if ok else f"FAILED (exit {r['code']})"
                    rows.append([name, task, tool, sched, r["seconds"], _mem(r["peaks"]), stages, "", "", status])
                    print(
                        f"{name:<12} {task:<10} {tool:<9} {r['seconds']:8.1f} s  {_mem(r['peaks'])}  "
                        f"[{stages}] {status}",
                        flush=True,
                    )
                    if not ok:
                        print(r["stderr"][-3000:], file=sys.stderr, flush=True)
                if all(t in results and results[t][2] for t in ("pertscale", "scanpy")):
                    (rp, dp, _), (rs, ds, _) = results["pertscale"], results["scanpy"]
                    try:
                        agreement = (agree_pca if task == "pca" else agree_pseudobulk)(dp, ds)
                    except Exception as err:  # a failed comparison is a result too
                        agreement = f"comparison failed: {err!r}"
                    ratios = (
                        f"{rs['seconds'] / rp['seconds']:.2f}x time, "
                        f"{_total_memory(rs['peaks']) / _total_memory(rp['peaks']):.2f}x memory"
                    )
                    rows[-1][7], rows[-1][8] = ratios, agreement
                    print(f"{name:<12} {task:<10} scanpy / pertscale: {ratios}; {agreement}", flush=True)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    print("\n| data | task | tool | pertscale scheduler | seconds | peak memory | stages (s; p = passes) |", end="")
    print(" scanpy / pertscale | agreement | |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, task, tool, sched, sec, mem, stages, ratios, agreement, status in rows:
        seconds = "" if sec is None else f"{sec:.1f}"
        print(
            f"| {name} | {task} | {tool} | {sched} | {seconds} | {mem} | {stages} | {ratios} | {agreement} | {status} |"
        )


if __name__ == "__main__":
    main()

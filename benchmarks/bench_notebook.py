"""The notebook path as whole processes: the README's Python calls against scanpy (PCA) and illico (Wilcoxon).

Each tool runs the same work as its own process on the same file, as a
script a user writes (no main guard, no scheduler named), timed from start to
exit, with the peak resident memory of every process of its tree sampled
every 50 ms (``measure`` of ``bench_main_job.py``):

- ``pertscale``: ``ps.read``, ``ps.pp.normalize_total``, ``ps.pp.log1p``
  (lazy), ``ps.pp.pca(n_comps=30)`` (one pass), ``ps.tl.rank_genes_groups``
  of every perturbation against the control (Wilcoxon; cells in barcode
  order: sorted out of core inside the graph), computed with ``ps.compute``
  (the scheduler chosen by the face: threads for these sizes).
- ``scanpy+illico`` (the faster peer): ``anndata.read_h5ad``,
  ``sc.pp.normalize_total``, ``sc.pp.log1p``, ``sc.pp.pca(n_comps=30)``
  (arpack), ``illico.asymptotic_wilcoxon`` of every perturbation against the
  control (2 threads).
- ``scanpy``: the same with ``sc.tl.rank_genes_groups(method="wilcoxon",
  reference="control")`` instead of illico (only with ``--tools`` naming it:
  it takes minutes).

Each script runs twice as a new process: ``cold`` first (numba caches filled
by earlier runs of the same code are kept, as a user's are; the first run
after an install compiles), then ``warm`` (the file in the page cache). The
children print the seconds of their stages. ``ratio`` is pertscale's time over
the faster peer's, per run kind. Agreement: the largest absolute difference
of the Wilcoxon p-values of pertscale and the peer (over every perturbation
and gene) and the smallest ``abs(cosine)`` of the first 10 PCA loadings.

    python benchmarks/bench_notebook.py --datasets sim30k,papalexi,schraivogel

Needs the ``bench`` extra (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_main_job import dataset, measure  # noqa: E402

PERTSCALE = textwrap.dedent(
    """
    import sys, time
    t0 = time.perf_counter()
    import numpy as np
    import pertscale as ps
    ps.settings.progress = False
    path, out = sys.argv[1], sys.argv[2]
    t = time.perf_counter(); stages = {"import": t - t0}
    adata = ps.read(path)
    ps.pp.normalize_total(adata)
    ps.pp.log1p(adata)
    ps.pp.pca(adata, n_comps=30)
    stages["read, normalize, log1p, pca"] = time.perf_counter() - t; t = time.perf_counter()
    de = ps.compute(ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control"))
    stages["wilcoxon"] = time.perf_counter() - t
    np.savez(out, pvals=de.layers["pvals"], groups=np.asarray(de.obs_names, dtype=str),
             genes=np.asarray(de.var_names, dtype=str), loadings=adata.varm["PCs"][:, :10])
    print("stages: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    """
)

PEER = textwrap.dedent(
    """
    import sys, time
    t0 = time.perf_counter()
    import numpy as np
    import anndata as ad, scanpy as sc
    wilcoxon = sys.argv[3]
    if wilcoxon == "illico":
        import illico
    path, out = sys.argv[1], sys.argv[2]
    t = time.perf_counter(); stages = {"import": t - t0}
    a = ad.read_h5ad(path)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.pca(a, n_comps=30, svd_solver="arpack")
    stages["read, normalize, log1p, pca"] = time.perf_counter() - t; t = time.perf_counter()
    a.obs["perturbation"] = a.obs["perturbation"].astype(str).astype("category")
    groups = sorted(set(a.obs["perturbation"]) - {"control"})
    if wilcoxon == "illico":
        df = illico.asymptotic_wilcoxon(a, is_log1p=True, group_keys="perturbation", reference="control",
                                        use_continuity=False, tie_correct=True, n_threads=2)
        stages["wilcoxon"] = time.perf_counter() - t
        table = df["p_value"].unstack("feature").loc[groups, a.var_names]  # index (pert, feature)
    else:
        sc.tl.rank_genes_groups(a, "perturbation", reference="control", method="wilcoxon", tie_correct=True)
        stages["wilcoxon"] = time.perf_counter() - t
        import pandas as pd
        table = pd.DataFrame({g: sc.get.rank_genes_groups_df(a, g).set_index("names").loc[a.var_names, "pvals"]
                              for g in groups}).T
    np.savez(out, pvals=table.to_numpy(), groups=np.asarray(groups, dtype=str),
             genes=np.asarray(a.var_names, dtype=str), loadings=a.varm["PCs"][:, :10])
    print("stages: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    """
)


def _agreement(ours: Path, theirs: Path) -> str:
    import numpy as np

    a, b = np.load(ours), np.load(theirs)
    common = [g for g in a["groups"] if g in set(b["groups"])]
    ia = [list(a["groups"]).index(g) for g in common]
    ib = [list(b["groups"]).index(g) for g in common]
    order = {g: i for i, g in enumerate(b["genes"])}
    jb = [order[g] for g in a["genes"]]
    pa, pb = a["pvals"][ia], b["pvals"][ib][:, jb]
    both = np.isfinite(pa) & np.isfinite(pb)
    dp = float(np.abs(pa[both] - pb[both]).max()) if both.any() else float("nan")
    la, lb = a["loadings"], b["loadings"][jb]
    cos = np.abs((la * lb).sum(axis=0) / (np.linalg.norm(la, axis=0) * np.linalg.norm(lb, axis=0)))
    return f"max |dp| {dp:.1e}, min |cos| PCs 1-10 {cos.min():.4f}"


def _stages(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("stages: ")]
    return lines[-1].removeprefix("stages: ") if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="sim30k,papalexi,schraivogel")
    parser.add_argument("--tools", default="pertscale,scanpy+illico")
    parser.add_argument("--data-dir", type=Path, default=Path("/work/bench-data"))
    args = parser.parse_args()
    rows = []
    for name in args.datasets.split(","):
        path = dataset(name, args.data_dir)
        if path is None:
            continue
        work = Path(tempfile.mkdtemp(prefix=f"notebook-{name}-", dir=args.data_dir))
        try:
            times: dict[tuple[str, str], float] = {}
            for tool in args.tools.split(","):
                script = work / f"run_{tool.replace('+', '_')}.py"  # not pertscale.py: it would shadow the package
                script.write_text(PERTSCALE if tool == "pertscale" else PEER)
                out = work / f"out_{tool.replace('+', '_')}.npz"
                extra = [] if tool == "pertscale" else ["illico" if tool == "scanpy+illico" else "scanpy"]
                for kind in ("cold", "warm"):
                    r = measure([sys.executable, str(script), str(path), str(out), *extra])
                    ok = "ok" if r["code"] == 0 else f"FAILED {r['stderr'].strip().splitlines()[-1:]}"
                    times[(tool, kind)] = r["seconds"]
                    from bench_main_job import _mem

                    rows.append([name, tool, kind, r["seconds"], _mem(r["peaks"]), _stages(r["stdout"]), ok])
                    print(f"{name:<12} {tool:<14} {kind:<5} {r['seconds']:7.2f} s  {rows[-1][4]}  [{rows[-1][5]}] {ok}")
                    if kind == "warm" and tool != "pertscale" and (work / "out_pertscale.npz").exists():
                        rows[-1].append(_agreement(work / "out_pertscale.npz", out))
            for row in rows:
                if row[0] == name and row[1] == "pertscale":
                    peers = [times[(t, row[2])] for t, k in times if t != "pertscale" and k == row[2]]
                    row.append(f"ratio to the faster peer {row[3] / min(peers):.2f}" if peers else "")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| data | tool | run | seconds | peak memory | stages (s) | | |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        name, tool, kind, sec, mem, stages, ok, *more = row
        print(f"| {name} | {tool} | {kind} | {sec:.2f} | {mem} | {stages} | {ok} | {'; '.join(more)} |")


if __name__ == "__main__":
    main()

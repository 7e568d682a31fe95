"""Negative-binomial GLM: pertscale against crispyx and PyDESeq2, as whole processes, on the same files.

Each tool runs in its own process from the raw-count file to its results
(timed from start to exit; peak resident memory of the process tree):

- ``pertscale``: ``ps.read`` -> drop ``multiple``/``unassigned`` ->
  ``ps.pp.size_factors`` -> ``ps.tl.dispersions`` ->
  ``ps.tl.rank_genes_groups(method="nb-glm")`` (threads in one process, as
  the main job's plan picks for inputs of this size), results computed;
- ``crispyx``: ``crispyx.de.nb_glm_test(path, ..., n_jobs=2)`` with its
  defaults (global sparse size factors and Cox-Reid dispersions), the same
  perturbations;
- ``pydeseq2``: PyDESeq2 0.5 run per comparison (the control cells and one
  perturbation's, design ``~condition``, ``size_factors_fit_type=
  "poscounts"``, 2 CPUs) on ``--pydeseq2-groups`` perturbations; its time
  for all perturbations is extrapolated from them and labelled so.

Agreement is measured against PyDESeq2 on the perturbations it ran: per
perturbation, Pearson correlation of log2 fold changes (MLE) over genes
with PyDESeq2 ``baseMean >= 1``, Spearman correlation of ``-log10 p`` and
the overlap of the 50 genes with the smallest p-values, among all genes
and among those with ``baseMean >= 1``; the table gives their medians.

    python benchmarks/bench_nbglm.py                      # sim20k, papalexi, schraivogel
    python benchmarks/bench_nbglm.py --datasets papalexi --pydeseq2-groups 25
    python benchmarks/bench_nbglm.py --tools pertscale,pertscale-apeglm   # without and with apeGLM (the default)

Needs the ``bench`` extra and PyDESeq2 (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_main_job import REAL, _mem, measure  # noqa: E402

EXCLUDE = ["multiple", "unassigned"]

PERTSCALE = textwrap.dedent(
    """
    import sys, numpy as np, pertscale as ps
    def main():
        path, out = sys.argv[1], sys.argv[2]
        ps.settings.progress = False
        a = ps.read(path)
        a = ps.pp.filter_perturbations(
            a, perturbation_column="perturbation", control_label="control", exclude_labels=["multiple", "unassigned"]
        )
        with ps.cluster.using("threads"):  # nb-glm's steps, then the test
            ps.pp.size_factors(a)
            ps.tl.dispersions(a, perturbation_column="perturbation")
            r = ps.tl.rank_genes_groups(
                a, perturbation_column="perturbation", control_label="control", method="nb-glm", shrink=False
            )
            r = ps.compute(r)
        np.savez(out, lfc=r.layers["logfoldchanges_raw"], p=r.layers["pvals"], groups=np.array(r.obs_names, dtype=str),
                 genes=np.array(r.var_names, dtype=str))
    if __name__ == "__main__":
        main()
    """
)

CRISPYX = textwrap.dedent(
    """
    import sys, tempfile, numpy as np, anndata as ad
    from crispyx.de import nb_glm_test
    def main():
        path, out = sys.argv[1], sys.argv[2]
        labels = ad.read_h5ad(path, backed="r").obs["perturbation"].astype(str)
        groups = sorted(set(labels) - {"control", "multiple", "unassigned"})
        with tempfile.TemporaryDirectory() as tmp:
            res = nb_glm_test(path, perturbation_column="perturbation", control_label="control",
                                         perturbations=groups, n_jobs=2, output_path=f"{tmp}/nb.h5ad", verbose=False)
            np.savez(out, lfc=np.asarray(res.logfoldchanges), p=np.asarray(res.pvalues),
                     groups=np.array(res.groups, dtype=str), genes=np.array(res.genes, dtype=str))
    if __name__ == "__main__":
        main()
    """
)

PYDESEQ2 = textwrap.dedent(
    """
    import sys, time, warnings, numpy as np, pandas as pd, anndata as ad
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.ds import DeseqStats
    def main():
        path, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
        warnings.simplefilter("ignore")
        raw = ad.read_h5ad(path)
        labels = raw.obs["perturbation"].astype(str).to_numpy()
        groups = sorted(set(labels) - {"control", "multiple", "unassigned"})
        picked = [groups[i] for i in np.linspace(0, len(groups) - 1, min(n, len(groups))).round().astype(int)]
        lfc, p, base, seconds = [], [], [], []
        for g in picked:
            t = time.perf_counter()
            sub = raw[np.isin(labels, ["control", g])]
            x = sub.X.toarray().astype(np.int64)
            obs = pd.DataFrame({"condition": np.where(sub.obs["perturbation"] == g, "B", "A")}, index=sub.obs_names)
            dds = DeseqDataSet(adata=ad.AnnData(x, obs=obs), design="~condition", size_factors_fit_type="poscounts",
                               quiet=True, n_cpus=2)
            dds.deseq2()
            st = DeseqStats(dds, contrast=["condition", "B", "A"], quiet=True, n_cpus=2)
            st.summary()
            r = st.results_df
            lfc.append(r["log2FoldChange"].to_numpy())
            p.append(r["pvalue"].to_numpy())
            base.append(r["baseMean"].to_numpy())
            seconds.append(time.perf_counter() - t)
        np.savez(out, lfc=np.array(lfc), p=np.array(p), base=np.array(base), groups=np.array(picked, dtype=str),
                 genes=np.array(raw.var_names, dtype=str), seconds=np.array(seconds), n_groups=len(groups))
    if __name__ == "__main__":
        main()
    """
)


def dataset(name: str, data_dir: Path) -> Path | None:
    """The h5ad file of a dataset (the simulated one made on first use)."""
    if name in ("papalexi", "schraivogel"):
        path = REAL / {"papalexi": "papalexi2021_eccite.h5ad", "schraivogel": "schraivogel2020_tapseq.h5ad"}[name]
        if not path.exists():
            print(f"skipping {name}: {path} not found (set PERTSCALE_DATA)", file=sys.stderr)
            return None
        return path
    path = data_dir / "nb20k.h5ad"
    if not path.exists():
        import pertscale as ps

        data_dir.mkdir(parents=True, exist_ok=True)
        ps.datasets.simulate_screen(20_000, 2_000, 50, control_fraction=0.1, seed=0, path=path)
    return path


def agreement(tool: dict, ref: dict) -> tuple[float, float, float, float]:
    """Medians over PyDESeq2's perturbations: Pearson of log2 FC (baseMean >= 1), Spearman of -log10 p, top 50.

    The top-50 overlap is given among all genes and among genes with PyDESeq2 ``baseMean >= 1``.
    """
    from scipy import stats

    rows = {g: i for i, g in enumerate(tool["groups"])}
    cols = {g: j for j, g in enumerate(tool["genes"])}
    take = np.array([cols[g] for g in ref["genes"]])
    pearson, spearman, top, top_high = [], [], [], []
    for k, g in enumerate(ref["groups"]):
        lfc, p = tool["lfc"][rows[g]][take], tool["p"][rows[g]][take]
        rl, rp = ref["lfc"][k], ref["p"][k]
        both = np.isfinite(lfc) & np.isfinite(rl) & np.isfinite(p) & np.isfinite(rp)
        m = both & (ref["base"][k] >= 1)
        pearson.append(np.corrcoef(lfc[m], rl[m])[0, 1])
        spearman.append(stats.spearmanr(-np.log10(np.maximum(p[m], 1e-300)), -np.log10(np.maximum(rp[m], 1e-300)))[0])
        for mask, into in ((both, top), (m, top_high)):
            idx = np.flatnonzero(mask)
            into.append(len(set(idx[np.argsort(p[idx])[:50]]) & set(idx[np.argsort(rp[idx])[:50]])))
    return tuple(float(np.median(v)) for v in (pearson, spearman, top, top_high))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="sim20k,papalexi,schraivogel")
    parser.add_argument("--tools", default="pertscale,crispyx,pydeseq2")
    parser.add_argument("--pydeseq2-groups", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=Path("/work/bench-data"))
    args = parser.parse_args()
    lines = []
    for name in args.datasets.split(","):
        path = dataset(name, args.data_dir)
        if path is None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            results, rows = {}, []
            for tool in args.tools.split(","):
                script = Path(tmp) / f"run_{tool}.py"  # not the package's own name: it would import itself
                scripts = {"pertscale": PERTSCALE, "crispyx": CRISPYX, "pydeseq2": PYDESEQ2}
                scripts["pertscale-apeglm"] = PERTSCALE.replace("shrink=False", "shrink=True")  # the default
                script.write_text(scripts[tool])
                out = Path(tmp) / f"{tool}.npz"
                cmd = [sys.executable, str(script), str(path), str(out)]
                r = measure(cmd + ([str(args.pydeseq2_groups)] if tool == "pydeseq2" else []))
                if r["code"] != 0:
                    print(f"{name} {tool} FAILED: {r['stderr'].strip().splitlines()[-3:]}", flush=True)
                    continue
                results[tool] = dict(np.load(out, allow_pickle=False))
                seconds = r["seconds"]
                note = ""
                if tool == "pydeseq2":
                    per = results[tool]["seconds"]
                    seconds = float(per.mean() * int(results[tool]["n_groups"]))
                    total = int(results[tool]["n_groups"])
                    note = (
                        f"all {total} comparisons, one after another"
                        if per.size == total
                        else f"extrapolated from {per.size} of {total} comparisons"
                    )
                rows.append((tool, seconds, _mem(r["peaks"]), note))
                print(f"{name:<12} {tool:<10} {seconds:8.1f} s  {_mem(r['peaks'])} {note}", flush=True)
            base = next((s for t, s, _, _ in rows if t == "pertscale"), None)
            for tool, seconds, mem, note in rows:
                agree = (
                    ""
                    if tool == "pydeseq2" or "pydeseq2" not in results
                    else agreement(results[tool], results["pydeseq2"])
                )
                ratio = f"{seconds / base:.1f}" if base else ""
                agree_s = (
                    f"{agree[0]:.4f} | {agree[1]:.4f} | {agree[2]:.0f} | {agree[3]:.0f}" if agree else "reference | | |"
                )
                lines.append(f"| {name} | {tool} | {seconds:.1f} | {ratio} | {mem} | {agree_s} | {note} |")
    header = ["data", "tool", "seconds", "x pertscale", "peak memory", "r log2FC", "rho -log10 p", "top-50"]
    print("\n| " + " | ".join([*header, "top-50, baseMean >= 1", ""]) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""nb-glm's dispersions on a sample of cells (``max_cells``) against all cells: time, reads and every statistic.

For each screen: size factors once, then ``ps.tl.dispersions`` on all cells
and on stratified samples of ``--cells`` cells (seed 0), each followed by
``ps.tl.rank_genes_groups(method="nb-glm")`` (apeGLM on, the default). The
matrix's blocks are counted as they are read. Printed per sample size: the
dispersion stage's seconds and reads (in units of the whole matrix), the
test's seconds, and the sample's effect on each statistic against the
all-cells run: final dispersions (median and 99th percentile of the
relative difference), fold changes (MLE and shrunk, largest absolute
difference in log2), ``-log10 p`` (median relative difference among genes
with p < 0.05 on all cells) and the DE calls at ``pvals_adj < 0.05``
(agreement: shared / either).

    python benchmarks/bench_dispersion_sample.py --datasets papalexi,schraivogel --cells 5000,10000
    python benchmarks/bench_dispersion_sample.py --datasets sim100k --cells 20000,50000

Real screens from ``../shared/data`` (skipped with a message when absent);
``sim100k`` is ``/work/bench-data/100k.h5ad``, ``sim1m`` ``/work/bench-data/1m.h5ad`` (``--data-dir``).

``--cli``: the same comparison as whole ``pertscale run`` processes (nb-glm
only), once on all cells and once per ``--cells`` value with
``--dispersion-cells N``, each into its own ``--out`` under ``--data-dir``
(its own working store, so every run is cold; all removed at the end),
timed from start to exit with the peak resident memory of every process of
its tree (``bench_main_job.measure``). Printed per run: seconds, the run's
own stage times, peak memory, its warnings, and the sample's effect on the
statistics of ``de_nb_glm.zarr`` (dispersions from its ``var``) against the
all-cells run:

    python benchmarks/bench_dispersion_sample.py --cli --datasets papalexi --cells 5000
    python benchmarks/bench_dispersion_sample.py --cli --datasets sim1m --cells 60000,20000
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL = {
    "papalexi": ROOT.parent / "shared" / "data" / "papalexi2021_eccite.h5ad",
    "schraivogel": ROOT.parent / "shared" / "data" / "schraivogel2020_tapseq.h5ad",
}


def _screen(name: str, data_dir: Path):
    import pertscale as ps

    path = REAL.get(name, data_dir / f"{name.replace('sim', '')}.h5ad")
    if not path.exists():
        print(f"skipping {name}: {path} not found", file=sys.stderr)
        return None
    a = ps.read(path)
    return ps.pp.filter_perturbations(
        a, perturbation_column="perturbation", control_label="control", exclude_labels=["multiple", "unassigned"]
    )


def _run(adata, max_cells):
    import pertscale as ps

    reads = []

    def counted(block):
        reads.append(block.shape[0])
        return block

    a = adata.copy()
    x = a.X
    a.X = x.map_blocks(counted, dtype=x.dtype, meta=x._meta)
    start = time.perf_counter()
    ps.tl.dispersions(a, perturbation_column="perturbation", max_cells=max_cells)
    t_disp = time.perf_counter() - start
    n_reads = sum(reads) / a.n_obs
    a.X = x
    start = time.perf_counter()
    res = ps.compute(
        ps.tl.rank_genes_groups(a, perturbation_column="perturbation", control_label="control", method="nb-glm")
    )
    t_test = time.perf_counter() - start
    return a.var["dispersion"].to_numpy(), res, t_disp, n_reads, t_test


def _effect(full, sample) -> str:
    (d0, r0), (d1, r1) = full, sample
    ok = np.isfinite(d0) & np.isfinite(d1)
    rel = np.abs(d1[ok] / d0[ok] - 1)
    lfc_raw = np.nanmax(np.abs(r1.layers["logfoldchanges_raw"] - r0.layers["logfoldchanges_raw"]))
    lfc = np.nanmax(np.abs(r1.layers["logfoldchanges"] - r0.layers["logfoldchanges"]))
    p0, p1 = r0.layers["pvals"], r1.layers["pvals"]
    sig = np.isfinite(p0) & np.isfinite(p1) & (p0 < 0.05) & (p0 > 0) & (p1 > 0)
    logp = np.median(np.abs(np.log10(p1[sig]) / np.log10(p0[sig]) - 1)) if sig.any() else float("nan")
    de0, de1 = r0.layers["pvals_adj"] < 0.05, r1.layers["pvals_adj"] < 0.05
    either = int((de0 | de1).sum())
    agree = (de0 & de1).sum() / either if either else 1.0
    return (
        f"{np.median(rel):.2e} | {np.quantile(rel, 0.99):.2e} | {lfc_raw:.3f} | {lfc:.3f} | {logp:.2e} | "
        f"{agree:.3f} ({int(de0.sum())} / {int(de1.sum())})"
    )


#: the layers of the results that :func:`_effect` compares.
LAYERS = ("logfoldchanges_raw", "logfoldchanges", "pvals", "pvals_adj")


def _results(out: Path):
    """Dispersions (``var``) and the compared layers of a run's ``de_nb_glm.zarr``, read without the others."""
    import anndata as ad
    import zarr

    group = zarr.open_group(out / "de_nb_glm.zarr", mode="r")
    obs, var = ad.io.read_elem(group["obs"]), ad.io.read_elem(group["var"])
    layers = {k: np.asarray(ad.io.read_elem(group["layers"][k]), dtype=np.float64) for k in LAYERS}
    return var["dispersion"].to_numpy(dtype=np.float64), SimpleNamespace(layers=layers), obs.index, var.index


def _aligned(reference, other):
    """``other``'s results in ``reference``'s row and gene order (the same input: the same rows and genes)."""
    _, _, rows0, genes0 = reference
    d, r, rows, genes = other
    i, j = rows.get_indexer(rows0), genes.get_indexer(genes0)
    if (i < 0).any() or (j < 0).any():
        raise ValueError(f"the runs' results differ in rows or genes ({(i < 0).sum()} rows, {(j < 0).sum()} genes)")
    return d[j], SimpleNamespace(layers={k: v[np.ix_(i, j)] for k, v in r.layers.items()})


def _stage(stages: str, name: str) -> str:
    m = re.search(rf"(?:^|, ){name} ([\d.]+) s", stages)
    return m.group(1) if m else "?"


def _cli(args) -> None:
    """Whole ``pertscale run --method nb-glm`` processes, all cells against ``--dispersion-cells N``."""
    import bench_main_job as bench

    rows = []
    for name in args.datasets.split(","):
        path = REAL.get(name, args.data_dir / f"{name.replace('sim', '')}.h5ad")
        if not path.exists():
            print(f"skipping {name}: {path} not found", file=sys.stderr)
            continue
        work = Path(tempfile.mkdtemp(prefix=f"bench-dispersion-{name}-", dir=args.data_dir))
        try:
            reference = None
            for cells in [None, *(int(c) for c in args.cells.split(","))]:
                out = work / f"out-{cells or 'all'}"
                cmd = [sys.executable, "-m", "pertscale.cli", "run", str(path), "--perturbation-column", "perturbation"]
                cmd += ["--control-label", "control", "--method", "nb-glm", "--out", str(out), "--no-progress"]
                cmd += [] if cells is None else ["--dispersion-cells", str(cells)]
                print("running: " + shlex.join(cmd), flush=True)
                r = bench.measure(cmd)
                stages, mem = bench._stages(r["stdout"]), bench._mem(r["peaks"])
                # the working store is the run's own (cold each time); removed now to keep the disk free
                shutil.rmtree(out / "working_store.zarr", ignore_errors=True)
                if r["code"] != 0:
                    tail = " / ".join(r["stderr"].strip().splitlines()[-3:])
                    print(f"  FAILED (exit {r['code']}): {tail}", flush=True)
                    rows.append(
                        (name, f"{cells or 'all'}", r["seconds"], stages, mem, f"FAILED (exit {r['code']}) | | | | |")
                    )
                    continue
                record = json.loads((out / "run.json").read_text())
                recorded = record["settings"]["nb_glm"]["dispersion_cells"]
                if recorded != cells:
                    print(f"  warning: run.json records dispersion_cells={recorded}, not {cells}", flush=True)
                print(f"  {r['seconds']:.1f} s  {mem}  [{stages}]", flush=True)
                for warning in dict.fromkeys(w.strip() for w in r["stderr"].splitlines() if "Warning" in w):
                    print(f"  {warning}", flush=True)  # e.g. the dispersion trend's fallback to the mean
                results = _results(out)
                if cells is None:
                    reference = results
                    label, effect = f"all {record['summary']['n_obs_kept']:,}", "reference | | | | |"
                else:
                    label = f"{cells:,}"
                    effect = (
                        "no reference | | | | |"
                        if reference is None
                        else _effect(reference[:2], _aligned(reference, results))
                    )
                print(f"  effect against all cells: {effect}", flush=True)
                rows.append((name, label, r["seconds"], stages, mem, effect))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    header = (
        "| data | cells for dispersions | seconds | dispersions (s) | test and write (s) | stages | peak memory "
        "(MiB) | dispersion rel. diff: median | p99 | max abs diff log2FC MLE | shrunk | -log10 p rel. diff "
        "(p < 0.05) | DE calls shared / either (all / sample) |"
    )
    print("\n" + header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, label, sec, stages, mem, effect in rows:
        disp, test = _stage(stages, "dispersions"), _stage(stages, "test and write")
        print(f"| {name} | {label} | {sec:.1f} | {disp} | {test} | {stages} | {mem} | {effect} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="papalexi,schraivogel")
    parser.add_argument("--cells", default="5000,10000")
    parser.add_argument("--data-dir", type=Path, default=Path("/work/bench-data"))
    parser.add_argument("--cli", action="store_true", help="Whole `pertscale run` processes (see the docstring).")
    args = parser.parse_args()
    print("command: python benchmarks/bench_dispersion_sample.py " + shlex.join(sys.argv[1:]), flush=True)
    if args.cli:
        _cli(args)
        return
    import pertscale as ps

    ps.settings.progress = False
    header = (
        "| data | cells for dispersions | dispersions (s) | reads of the matrix | test (s) | dispersion rel. diff: "
        "median | p99 | max abs diff log2FC MLE | shrunk | -log10 p rel. diff (p < 0.05) | DE calls shared / either "
        "(all / sample) |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in args.datasets.split(","):
        adata = _screen(name, args.data_dir)
        if adata is None:
            continue
        with ps.cluster.using("threads"):
            ps.pp.size_factors(adata)
            d0, r0, t0, n0, s0 = _run(adata, None)
            row = f"| {name} | all {adata.n_obs:,} | {t0:.1f} | {n0:.1f} | {s0:.1f} | reference | | | | | |"
            print(row, flush=True)
            for cells in [int(c) for c in args.cells.split(",")]:
                if cells >= adata.n_obs:
                    continue
                d1, r1, t1, n1, s1 = _run(adata, cells)
                effect = _effect((d0, r0), (d1, r1))
                print(f"| {name} | {cells:,} | {t1:.1f} | {n1:.1f} | {s1:.1f} | {effect} |", flush=True)


if __name__ == "__main__":
    main()

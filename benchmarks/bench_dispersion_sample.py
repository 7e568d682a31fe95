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
``sim100k`` is ``/work/bench-data/100k.h5ad`` (``--data-dir``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="papalexi,schraivogel")
    parser.add_argument("--cells", default="5000,10000")
    parser.add_argument("--data-dir", type=Path, default=Path("/work/bench-data"))
    args = parser.parse_args()
    print("command: python benchmarks/bench_dispersion_sample.py " + shlex.join(sys.argv[1:]), flush=True)
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

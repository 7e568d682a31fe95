"""Screen-level analyses at scale: calibration on control splits and the energy distance of every perturbation.

Each measurement is a whole process (``bench_main_job.measure``: wall time
and the peak resident memory of every process of its tree, workers
included), on a simulated screen (``bench_main_job.SIMULATED``, made on
first use in ``--data-dir``) or a real one:

1. ``pca``: ``ps.read`` -> ``normalize_total`` -> ``log1p`` -> ``pp.pca(50)``
   (one pass) with the scores written to ``X_pca.npy`` (a second pass), the
   embedding the other steps read;
2. ``energy``: ``ps.tl.energy_distance`` of every perturbation against all
   control cells in that embedding, ``--permutations`` each;
3. ``calibration``: ``ps.tl.calibration_check`` (Wilcoxon, ``--splits``
   random control splits) on the log1p values;
4. ``scperturb``: scPerturb's ``etest`` (the reference; it holds the
   pairwise distance matrix of all the cells it is given) and pertscale's
   ``energy_distance`` on the same subset of the embedding (``--subset-perts``
   perturbations and ``--subset-control`` control cells, seeded), each in
   its own process, with the ratio and the largest difference of their
   E-distances. Needs ``pip install scperturb``.

    python benchmarks/bench_screen.py --datasets 1m --splits 20 --permutations 1000
    python benchmarks/bench_screen.py --datasets papalexi,schraivogel
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_main_job import _mem, dataset, measure  # noqa: E402

PCA = textwrap.dedent(
    """
    import sys, time, numpy as np
    import pertscale as ps
    if __name__ == "__main__":
        ps.settings.progress = False
        path, out = sys.argv[1], sys.argv[2]
        t = time.perf_counter()
        a = ps.read(path)
        ps.pp.normalize_total(a); ps.pp.log1p(a)
        ps.pp.pca(a, n_comps=50)
        fit = time.perf_counter() - t
        t = time.perf_counter()
        (scores,) = ps.cluster.compute(a.obsm["X_pca"])
        np.save(out + "/X_pca.npy", np.asarray(scores, dtype=np.float32))
        a.obs[["perturbation"]].astype(str).to_parquet(out + "/obs.parquet")
        print(f"time: fit {fit:.1f}, scores {time.perf_counter() - t:.1f}")
    """
)

ENERGY = textwrap.dedent(
    """
    import sys, time, numpy as np, pandas as pd, anndata as ad
    import pertscale as ps
    if __name__ == "__main__":
        ps.settings.progress = False
        out, n_perm = sys.argv[1], int(sys.argv[2])
        rows = None if len(sys.argv) < 4 else np.load(sys.argv[3])
        scores = np.load(out + "/X_pca.npy", mmap_mode="r")
        obs = pd.read_parquet(out + "/obs.parquet")
        if rows is not None:
            scores, obs = np.asarray(scores[rows]), obs.iloc[rows]
        a = ad.AnnData(obs=obs, obsm={"X_pca": np.asarray(scores, dtype=np.float64)})
        t = time.perf_counter()
        with ps.cluster.using():
            table = ps.tl.energy_distance(a, perturbation_column="perturbation", control_label="control",
                                          n_permutations=n_perm)
        s = time.perf_counter() - t
        table.to_csv(out + ("/energy.csv" if rows is None else "/energy_subset.csv"))
        print(f"time: energy {s:.1f}; perturbations {len(table)}, significant {(table['pvalue_adj'] < 0.05).sum()}")
    """
)

CALIBRATION = textwrap.dedent(
    """
    import sys, time, json
    import pertscale as ps
    if __name__ == "__main__":
        ps.settings.progress = False
        path, n_splits = sys.argv[1], int(sys.argv[2])
        t = time.perf_counter()
        a = ps.read(path)
        ps.pp.normalize_total(a); ps.pp.log1p(a)
        with ps.cluster.using():
            res = ps.tl.calibration_check(a, perturbation_column="perturbation", control_label="control",
                                          method="wilcoxon", n_splits=n_splits, guide_column=False)
        s = time.perf_counter() - t
        p = res.pooled
        print(f"time: calibration {s:.1f}")
        print("pooled: " + json.dumps({k: (float(v) if hasattr(v, "__float__") else str(v)) for k, v in p.items()}))
    """
)

SCPERTURB = textwrap.dedent(
    """
    import sys, time, numpy as np, pandas as pd, anndata as ad
    import scperturb
    out, n_perm = sys.argv[1], int(sys.argv[2])
    rows = np.load(sys.argv[3])
    scores = np.asarray(np.load(out + "/X_pca.npy", mmap_mode="r")[rows], dtype=np.float64)
    obs = pd.read_parquet(out + "/obs.parquet").iloc[rows]
    obs["perturbation"] = obs["perturbation"].astype("category")
    a = ad.AnnData(obs=obs, obsm={"X_pca": scores})
    t = time.perf_counter()
    df = scperturb.etest(a, obs_key="perturbation", obsm_key="X_pca", control="control", runs=n_perm,
                         dist="sqeuclidean", n_jobs=1, verbose=False)
    s = time.perf_counter() - t
    df.to_csv(out + "/scperturb_subset.csv")
    print(f"time: etest {s:.1f}")
    """
)


def _subset(out: Path, n_perts: int, n_control: int, seed: int = 0) -> Path:
    """Rows of ``n_perts`` perturbations (all their cells) and ``n_control`` control cells, seeded; saved as .npy."""
    import numpy as np
    import pandas as pd

    obs = pd.read_parquet(out / "obs.parquet")
    labels = obs["perturbation"].to_numpy()
    rng = np.random.default_rng(seed)
    perts = [p for p in pd.unique(labels) if p != "control"]
    chosen = rng.choice(perts, size=min(n_perts, len(perts)), replace=False)
    control = np.flatnonzero(labels == "control")
    rows = np.sort(np.r_[np.flatnonzero(np.isin(labels, chosen)), rng.choice(control, min(n_control, control.size),
                                                                              replace=False)])  # fmt: skip
    path = out / f"subset_{n_perts}_{n_control}.npy"
    np.save(path, rows)
    return path


def _report(name: str, step: str, r: dict) -> dict:
    stage = next((line[6:] for line in r["stdout"].splitlines() if line.startswith("time: ")), "")
    print(f"{name} {step}: {r['seconds']:.1f} s ({stage}); {_mem(r['peaks'])}", flush=True)
    if r["code"] != 0:
        print(r["stderr"][-3000:], file=sys.stderr)
    extra = [line for line in r["stdout"].splitlines() if line.startswith("pooled: ")]
    if extra:
        print("  " + extra[0], flush=True)
    return {"dataset": name, "step": step, "seconds": r["seconds"], "stages": stage, "memory": _mem(r["peaks"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="papalexi,schraivogel")
    parser.add_argument("--data-dir", type=Path, default=Path("/work/bench-data"))
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--subset-perts", type=int, default=10)
    parser.add_argument("--subset-control", type=int, default=2000)
    parser.add_argument("--steps", default="pca,energy,calibration,scperturb")
    parser.add_argument("--work", type=Path, help="Reuse this directory's X_pca.npy and obs.parquet (skip pca).")
    args = parser.parse_args()
    steps = args.steps.split(",")
    rows = []
    for name in args.datasets.split(","):
        path = dataset(name, args.data_dir)
        if path is None:
            continue
        py = sys.executable
        if args.work is not None:
            work = args.work
        else:
            work = Path(tempfile.mkdtemp(prefix=f"bench-screen-{name}-", dir=args.data_dir))
            rows.append(_report(name, "pca", measure([py, "-c", PCA, str(path), str(work)])))
        if "energy" in steps:
            r = measure([py, "-c", ENERGY, str(work), str(args.permutations)])
            rows.append(_report(name, f"energy ({args.permutations} permutations)", r))
        if "calibration" in steps:
            r = measure([py, "-c", CALIBRATION, str(path), str(args.splits)])
            rows.append(_report(name, f"calibration ({args.splits} splits)", r))
        if "scperturb" in steps:
            sub = _subset(work, args.subset_perts, args.subset_control)
            ours = measure([py, "-c", ENERGY, str(work), str(args.permutations), str(sub)])
            rows.append(_report(name, "subset: pertscale energy", ours))
            theirs = measure([py, "-c", SCPERTURB, str(work), str(args.permutations), str(sub)])
            rows.append(_report(name, "subset: scPerturb etest", theirs))
            if ours["code"] == 0 and theirs["code"] == 0:
                import pandas as pd

                a = pd.read_csv(work / "energy_subset.csv", index_col=0)
                b = pd.read_csv(work / "scperturb_subset.csv", index_col=0)
                common = a.index.intersection(b.index)
                rel = ((a.loc[common, "edistance"] - b.loc[common, "edist"]).abs() / b.loc[common, "edist"].abs()).max()
                print(f"  subset ({len(common)} perturbations): scPerturb / pertscale = "
                      f"{theirs['seconds'] / ours['seconds']:.1f}x; E-distance max relative difference {rel:.2e}",
                      flush=True)  # fmt: skip
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

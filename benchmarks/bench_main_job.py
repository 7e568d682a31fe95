"""The main job as whole processes: ``pertscale run`` against a plain illico script, at the sizes that matter.

Each tool runs as its own process on the same file, as a user would run it,
and is timed from start to exit; the peak resident memory of every process
of its tree (the client, the fork server, each worker) is sampled every
50 ms. pertscale runs twice: ``cold`` is the first run (it writes the
perturbation-sorted working store when the cells are stored unsorted),
``warm`` a second run with ``--overwrite``, which reuses that store. The
stage times are pertscale's own (``time:`` line of its summary); one pass
over the file is measured separately (reading every row block and summing
it, synchronous), so each stage can be compared with it.

The illico script reads the file with anndata, drops ``multiple`` and
``unassigned``, filters cells (min 20 genes), perturbations (min 20 cells)
and genes (min 3 cells) with scanpy, normalizes (1e4) and log1p, runs
``illico.asymptotic_wilcoxon`` against the control and writes the
significant rows as CSV: the main job's work, in memory.

Datasets (cells stored in random order, as real screens are; simulated
block by block with ``ps.datasets.simulate_screen(path=...)`` into
``--data-dir`` and kept there for later runs):

- ``sim30k``: 30,000 cells x 2,000 genes, 100 perturbations (h5ad);
- ``papalexi``, ``schraivogel``: the real screens in ``../shared/data``;
- ``100k``, ``300k``, ``1m``: cells x 8,000 genes at 38 % non-zero, 2,000 perturbations;
- ``genome``: 2,000,000 cells x 8,248 genes at 38 % non-zero, 10,000 perturbations, ~75,000 control cells.

Append ``-zarr`` to a simulated name for the zarr copy (``1m-zarr``), ``-lzf`` for an h5ad whose
matrix is lzf-compressed (``genome-lzf``: the uncompressed genome-wide h5ad, 50 GB, does not fit
this machine's disk beside its working store).

    python benchmarks/bench_main_job.py --datasets sim30k,papalexi --tools pertscale,illico
    python benchmarks/bench_main_job.py --datasets 100k,300k,1m --tools pertscale
    python benchmarks/bench_main_job.py --datasets genome-zarr --tools pertscale --no-warm

Tools: ``pertscale`` (``pertscale run``), ``illico`` (the script above),
``before`` (``pertscale run`` of another checkout, ``--before SRC`` naming its
``src`` directory: the same command with that code first on ``PYTHONPATH``, to
compare a change with the code before it), and ``api`` (the Python API as a
notebook user calls it: ``ps.read``, ``qc_summary`` with the job's filters and
its ``apply``, ``normalize_total``, ``log1p``, ``ps.tl.rank_genes_groups`` and
``ps.write`` of the results to zarr, the scheduler chosen by the face; on
cells in random order the API sorts them lazily, out of core, as the job's
working store does, so its peak memory per worker should equal the job's):

    python benchmarks/bench_main_job.py --datasets 100k --tools pertscale,api
    python benchmarks/bench_main_job.py --datasets sim30k,100k --tools before,pertscale --before /work/before/src

Needs the ``bench`` extra (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REAL = Path(os.environ.get("PERTSCALE_DATA", HERE.parent.parent / "shared" / "data"))
COLUMN, CONTROL = "perturbation", "control"
#: median UMI per cell giving ~38 % non-zero at 8,000-8,248 genes with the simulator's gene model.
MEDIAN_UMI_38 = 11_400.0
SIMULATED = {
    "sim30k": dict(n_cells=30_000, n_genes=2_000, n_perturbations=100, control_fraction=0.1, median_umi=2_000.0),
    "100k": dict(
        n_cells=100_000, n_genes=8_000, n_perturbations=2_000, control_fraction=0.05, median_umi=MEDIAN_UMI_38
    ),
    "300k": dict(
        n_cells=300_000, n_genes=8_000, n_perturbations=2_000, control_fraction=0.05, median_umi=MEDIAN_UMI_38
    ),
    "1m": dict(
        n_cells=1_000_000, n_genes=8_000, n_perturbations=2_000, control_fraction=0.05, median_umi=MEDIAN_UMI_38
    ),
    "genome": dict(
        n_cells=2_000_000, n_genes=8_248, n_perturbations=10_000, control_fraction=0.0375, median_umi=MEDIAN_UMI_38
    ),
}

ILLICO_SCRIPT = textwrap.dedent(
    """
    import sys, anndata as ad, scanpy as sc, illico
    path, out = sys.argv[1], sys.argv[2]
    a = ad.read_h5ad(path) if path.endswith(".h5ad") else ad.read_zarr(path)
    a = a[~a.obs["perturbation"].isin(["multiple", "unassigned"])].copy()
    sc.pp.filter_cells(a, min_genes=20)
    counts = a.obs["perturbation"].value_counts()
    keep = [g for g, n in counts.items() if n >= 20 or g == "control"]
    a = a[a.obs["perturbation"].isin(keep)].copy()
    sc.pp.filter_genes(a, min_cells=3)
    a.obs["perturbation"] = a.obs["perturbation"].astype(str).astype("category")
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    df = illico.asymptotic_wilcoxon(a, is_log1p=True, group_keys="perturbation", reference="control",
                                    use_continuity=False, tie_correct=True, n_threads=2)
    df = df[df["p_value_adj"] < 0.05] if "p_value_adj" in df.columns else df
    df.to_csv(out)
    """
)

API_SCRIPT = textwrap.dedent(
    """
    import sys, time
    t0 = time.perf_counter()
    import pertscale as ps

    if __name__ == "__main__":  # worker processes may start (a script without the guard computes on threads)
        ps.settings.progress = False
        path, out = sys.argv[1], sys.argv[2]
        stages = {"import": time.perf_counter() - t0}
        t = time.perf_counter()
        adata = ps.read(path)
        qc = ps.pp.qc_summary(adata, perturbation_column="perturbation", control_label="control", min_genes=20,
                              min_cells_per_perturbation=20, min_cells_per_gene=3)
        adata = qc.apply(adata)
        stages["QC"] = time.perf_counter() - t
        ps.pp.normalize_total(adata, target_sum=1e4)
        ps.pp.log1p(adata)
        t = time.perf_counter()
        res = ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control")
        ps.write(res, out)
        stages["test and write"] = time.perf_counter() - t
        print("time: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    """
)

ONE_PASS = textwrap.dedent(
    """
    import sys, time, numpy as np, pertscale as ps
    ps.settings.progress = False
    a = ps.read(sys.argv[1])
    t = time.perf_counter()
    a.X.map_blocks(lambda b: np.asarray(b.sum(axis=0)), chunks=(1, a.n_vars)).sum(axis=0).compute(scheduler="threads")
    print(f"{time.perf_counter() - t:.2f}")
    """
)


def dataset(name: str, data_dir: Path) -> Path | None:
    """The file of a dataset, simulated into ``data_dir`` on first use."""
    if name in ("papalexi", "schraivogel"):
        path = REAL / {"papalexi": "papalexi2021_eccite.h5ad", "schraivogel": "schraivogel2020_tapseq.h5ad"}[name]
        if not path.exists():
            print(f"skipping {name}: {path} not found (set PERTSCALE_DATA)", file=sys.stderr)
            return None
        return path
    base, _, fmt = name.partition("-")
    path = data_dir / (f"{base}.zarr" if fmt == "zarr" else f"{base}{'.lzf' if fmt == 'lzf' else ''}.h5ad")
    if not path.exists():
        import pertscale as ps

        data_dir.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        print(f"simulating {name} into {path} ...", file=sys.stderr, flush=True)
        ps.datasets.simulate_screen(
            **SIMULATED[base], seed=0, n_affected=10, path=path, n_jobs=2, compression="lzf" if fmt == "lzf" else None
        )
        print(f"  {time.perf_counter() - t:.0f} s, {_size(path) / 2**30:.1f} GiB", file=sys.stderr, flush=True)
    return path


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall seconds, exit code, output, and the peak RSS of each process of its tree."""
    import psutil

    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peaks: dict[int, tuple[str, int]] = {}
    root = psutil.Process(proc.pid)
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            for p in tree:
                try:
                    rss = p.memory_info().rss
                    role = _role(p, root)
                except psutil.Error:
                    continue
                old = peaks.get(p.pid, (role, 0))
                peaks[p.pid] = (role, max(old[1], rss))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    return {"seconds": time.perf_counter() - t, "code": proc.returncode, "stdout": out, "stderr": err, "peaks": peaks}


def _role(p, root) -> str:
    if p.pid == root.pid:
        return "main"
    cmd = " ".join(p.cmdline())
    if "forkserver" in cmd and p.ppid() == root.pid:
        return "forkserver"  # the processes it forks share its command line: those are the workers
    if "resource_tracker" in cmd:
        return "tracker"
    return "worker"


def _stages(stdout: str) -> str:
    m = re.search(r"^time: (.*)$", stdout, flags=re.MULTILINE)
    return m.group(1) if m else ""


def _mem(peaks: dict) -> str:
    main = max((v for r, v in peaks.values() if r == "main"), default=0)
    workers = [v for r, v in peaks.values() if r == "worker"]
    total = sum(v for _, v in peaks.values())
    w = f", workers {len(workers)} x max {max(workers) / 2**20:,.0f}" if workers else ""
    return f"main {main / 2**20:,.0f}{w}, all {total / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="sim30k,papalexi,schraivogel")
    parser.add_argument("--tools", default="pertscale,illico")
    parser.add_argument("--data-dir", type=Path, default=Path("/work/bench-data"))
    parser.add_argument("--no-warm", action="store_true", help="Run pertscale once (cold) only.")
    parser.add_argument("--extra", default="", help="More arguments for pertscale run.")
    parser.add_argument("--before", type=Path, help="The src directory of the code to compare with (tool 'before').")
    args = parser.parse_args()
    tools = args.tools.split(",")
    rows = []
    for name in args.datasets.split(","):
        path = dataset(name, args.data_dir)
        if path is None:
            continue
        one_pass = measure([sys.executable, "-c", ONE_PASS, str(path)])
        pass_s = float(one_pass["stdout"].strip() or "nan")
        print(f"{name}: one pass over the file {pass_s:.1f} s", flush=True)
        work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=args.data_dir))
        try:
            for tool in tools:
                env = None
                if tool in ("pertscale", "before"):
                    cmd = [sys.executable, "-m", "pertscale.cli", "run", str(path), "--perturbation-column", COLUMN]
                    cmd += ["--control-label", CONTROL, "--out", str(work / f"out-{tool}"), "--no-progress"]
                    cmd += args.extra.split()
                    runs = [("cold", cmd)] + ([] if args.no_warm else [("warm", [*cmd, "--overwrite"])])
                    if tool == "before":
                        if args.before is None:
                            raise SystemExit("tool 'before' needs --before SRC (the src directory of the older code)")
                        env = {**os.environ, "PYTHONPATH": str(args.before.resolve())}
                elif tool == "api":
                    script = work / "api_script.py"
                    script.write_text(API_SCRIPT)
                    out = str(work / "api.zarr")
                    runs = [("cold", [sys.executable, str(script), str(path), out])]
                else:
                    script = work / "illico_script.py"
                    script.write_text(ILLICO_SCRIPT)
                    runs = [("cold", [sys.executable, str(script), str(path), str(work / "illico.csv")])]
                for kind, cmd in runs:
                    if tool == "api" and Path(out).exists():
                        shutil.rmtree(out)
                    r = measure(cmd, env)
                    ok = "ok" if r["code"] == 0 else f"FAILED ({r['stderr'].strip().splitlines()[-1:]})"
                    rows.append((name, tool, kind, r["seconds"], pass_s, _mem(r["peaks"]), _stages(r["stdout"]), ok))
                    print(
                        f"{name:<12} {tool:<10} {kind:<5} {r['seconds']:8.1f} s "
                        f"({r['seconds'] / pass_s:5.1f} passes)  "
                        f"{_mem(r['peaks'])}  [{_stages(r['stdout'])}] {ok}",
                        flush=True,
                    )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| data | tool | run | seconds | one pass s | peak memory | pertscale stages | |")
    print("|---|---|---|---|---|---|---|---|")
    for name, tool, kind, sec, pass_s, mem, stages, ok in rows:
        print(f"| {name} | {tool} | {kind} | {sec:.1f} | {pass_s:.1f} | {mem} | {stages} | {ok} |")


if __name__ == "__main__":
    main()

"""What the report adds to the main job: ``pertscale run`` with and without ``--report``, as whole processes.

For each dataset the job runs once to make the working store (not timed),
then ``--report`` and ``--no-report`` alternately (``--repeats`` times each,
``--overwrite``, the working store reused: warm), each as its own process
timed from start to exit. Printed: the median wall time of each, the
report's own stage time as the run recorded it (``run.json``'s profile,
stage ``report``), its share of the run, and the time of rebuilding the
report from the output directory alone (``python -c 'ps.report(out)'``,
a whole process: imports included) with its peak resident memory, the
main process's peak during the report stage (``run.json``) and the
report's size.

    python benchmarks/bench_report.py --datasets sim30k,papalexi
    python benchmarks/bench_report.py --datasets genome-zarr --once

``--once``: one cold run with ``--report`` only (the genome-wide job takes
minutes a run): its wall time and its report stage.

Datasets as in ``bench_main_job.py`` (kept in ``--data-dir``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_main_job import dataset  # noqa: E402


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _report_seconds(out: Path) -> float:
    """The report's stage time, as the run recorded it in run.json's profile."""
    record = json.loads((out / "run.json").read_text())
    return next(s["seconds"] for s in record["profile"]["stages"] if s["name"] == "report")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="sim30k,papalexi")
    parser.add_argument("--data-dir", type=Path, default=Path("/work/bench-data"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--extra", default="", help="More arguments for pertscale run.")
    parser.add_argument("--once", action="store_true", help="One cold run with --report only.")
    args = parser.parse_args()
    print("| dataset | run --no-report (s) | run --report (s) | report stage (s) | share of the run | main process "
          "in the report stage (MiB) | ps.report(out) process (s) | its peak (MiB) | report.html |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        path = dataset(name, args.data_dir)
        if path is None:
            print(f"| {name} | (not available) |")
            continue
        with tempfile.TemporaryDirectory(dir=args.data_dir) as tmp:
            out = Path(tmp) / "out"
            base = ["pertscale", "run", str(path), "--perturbation-column", "perturbation", "--control-label",
                    "control", "--out", str(out), "--no-progress", *args.extra.split()]  # fmt: skip
            with_report, without, stage = [], [], []
            if args.once:
                with_report.append(timed([*base, "--report"]))
                without.append(float("nan"))
                stage.append(_report_seconds(out))
            else:
                subprocess.run([*base, "--no-report"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(0 if args.once else args.repeats):
                without.append(timed([*base, "--overwrite", "--no-report"]))
                with_report.append(timed([*base, "--overwrite", "--report"]))
                stage.append(_report_seconds(out))
            record = json.loads((out / "run.json").read_text())
            print("stages:", ", ".join(f"{s['name']} {s['seconds']:.1f} s" for s in record["profile"]["stages"]),
                  flush=True)  # fmt: skip
            code = (f"import resource, pertscale as ps; ps.report({str(out)!r}); "
                    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")  # fmt: skip
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
            rebuild, rebuild_kib = time.perf_counter() - start, int(done.stdout.split()[-1])
            size = (out / "report.html").stat().st_size
            main_peak = next(p for p in record["profile"]["processes"] if p["name"] == "main")["peak_rss"]
            a, b, r = statistics.median(without), statistics.median(with_report), statistics.median(stage)
            print(f"| {name} | {a:.1f} | {b:.1f} | {r:.2f} | {r / b:.1%} | {main_peak.get('report', 0) / 2**20:,.0f} "
                  f"| {rebuild:.1f} | {rebuild_kib / 1024:,.0f} | {size / 2**20:.1f} MiB |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

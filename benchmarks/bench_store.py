"""The result store as users live it: analyse and save, then reopen and get a result; pertscale against scanpy.

Two sessions per tool, each its own process (imports included), timed from
start to exit, with the peak resident memory of every process of its tree
(``measure`` of ``bench_main_job.py``):

- ``save``: pertscale ``ps.read``, ``ps.pp.normalize_total``, ``ps.pp.log1p``,
  ``ps.tl.rank_genes_groups(method="t-test")`` (lazy; kept in the AnnData's
  result store, keyed by its settings), ``ps.write(adata, "screen.zarr")``:
  the normalized matrix and the stored test, block by block. scanpy:
  ``anndata.read_h5ad`` into memory, ``sc.pp.normalize_total``,
  ``sc.pp.log1p``, ``sc.tl.rank_genes_groups(method="t-test",
  reference="control")`` (its results in ``uns``), ``write_h5ad`` (or, when
  its record arrays have more fields than an HDF5 object header holds, past
  about 1,100 perturbations, ``write_zarr``, as the table notes).
- ``reopen``: a new process opens the saved file and gets one
  perturbation's table. pertscale: ``with ps.open("screen.zarr") as a``, the
  same ``ps.tl.rank_genes_groups`` call (the stored result is reused: the
  script checks that nothing was tested again), and
  ``ps.get.dataset(a, method="t-test").sel(perturbation=P)`` (only that
  perturbation's rows are read). scanpy: ``anndata.read_h5ad`` of the
  whole file and ``sc.get.rank_genes_groups_df(a, group=P)``.

Agreement: the largest difference of the t statistics of ``P`` between the
two tools' tables (scanpy stores them as float32).

    python benchmarks/bench_store.py --datasets sim30k,100k

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
from bench_main_job import _mem, dataset, measure  # noqa: E402

PS_SAVE = textwrap.dedent(
    """
    import sys
    import pertscale as ps
    path, out = sys.argv[1], sys.argv[2]
    ps.settings.progress = False
    a = ps.read(path)
    ps.pp.normalize_total(a)
    ps.pp.log1p(a)
    ps.tl.rank_genes_groups(a, perturbation_column="perturbation", control_label="control", method="t-test")
    ps.write(a, out)
    """
)

PS_REOPEN = textwrap.dedent(
    """
    import sys
    import pertscale as ps
    import pertscale.tl._rank_genes_groups as rgg
    path, group, out = sys.argv[1], sys.argv[2], sys.argv[3]
    ps.settings.progress = False
    def refuse(*args, **kwargs):
        raise SystemExit("the stored result was not reused")
    rgg._test = refuse
    with ps.open(path) as a:
        # reused, nothing runs
        ps.tl.rank_genes_groups(a, perturbation_column="perturbation", control_label="control", method="t-test")
        one = ps.get.dataset(a, method="t-test").sel(perturbation=group).to_dataframe()
        one.sort_values("scores", ascending=False).to_csv(out)
    """
)

SC_SAVE = textwrap.dedent(
    """
    import sys
    import anndata, scanpy as sc
    path, out = sys.argv[1], sys.argv[2]
    a = anndata.read_h5ad(path) if path.endswith(".h5ad") else anndata.read_zarr(path)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.tl.rank_genes_groups(a, "perturbation", method="t-test", reference="control")
    try:
        a.write_h5ad(out)
    except ValueError as err:  # more perturbations than its record arrays hold in an HDF5 object header
        print("h5ad failed:", str(err).splitlines()[0], "- writing .zarr instead", file=sys.stderr)
        import pathlib, shutil
        pathlib.Path(out).unlink(missing_ok=True)
        a.write_zarr(out.replace(".h5ad", ".zarr"))
    """
)

SC_REOPEN = textwrap.dedent(
    """
    import sys
    import anndata, scanpy as sc
    path, group, out = sys.argv[1], sys.argv[2], sys.argv[3]
    import os
    zarr_path = path.replace(".h5ad", ".zarr")
    a = anndata.read_zarr(zarr_path) if os.path.exists(zarr_path) else anndata.read_h5ad(path)
    sc.get.rank_genes_groups_df(a, group=group).to_csv(out)
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="sim30k")
    parser.add_argument("--data-dir", type=Path, default=Path("/work/bench-data"))
    args = parser.parse_args()
    import anndata
    import pandas as pd

    rows = []
    for name in args.datasets.split(","):
        path = dataset(name, args.data_dir)
        if path is None:
            continue
        obs = anndata.io.read_elem(__import__("h5py").File(path)["obs"]) if path.suffix == ".h5ad" else None
        group = sorted(set(obs["perturbation"].astype(str)) - {"control"})[0]
        work = Path(tempfile.mkdtemp(dir=args.data_dir))
        try:
            res = {}
            for tool, save, reopen, saved in (
                ("pertscale", PS_SAVE, PS_REOPEN, work / "screen.zarr"),
                ("scanpy", SC_SAVE, SC_REOPEN, work / "screen.h5ad"),
            ):
                first = measure([sys.executable, "-c", save, str(path), str(saved)])
                table = work / f"{tool}.csv"
                second = measure([sys.executable, "-c", reopen, str(saved), group, str(table)])
                for m in (first, second):
                    if m["code"]:
                        raise SystemExit(f"{tool} failed:\n{m['stderr'][-3000:]}")
                res[tool] = (first, second, table)
                if not saved.exists():  # scanpy's fallback
                    saved = saved.with_suffix(".zarr")
                    tool += " (h5ad write failed: record arrays too large; .zarr)"
                size = sum(p.stat().st_size for p in saved.rglob("*")) if saved.is_dir() else saved.stat().st_size
                rows.append(
                    f"| {name} | {tool} | {first['seconds']:.1f} s ({_mem(first['peaks'])}) | {size / 2**20:,.0f} MiB "
                    f"| {second['seconds']:.1f} s ({_mem(second['peaks'])}) |"
                )
            ours = pd.read_csv(res["pertscale"][2], index_col="gene")["scores"]
            theirs = pd.read_csv(res["scanpy"][2], index_col="names")["scores"]
            diff = float((ours - theirs.reindex(ours.index)).abs().max())
            ratio = res["scanpy"][1]["seconds"] / res["pertscale"][1]["seconds"]
            rows.append(
                f"| {name} | scanpy / pertscale, reopen | | | {ratio:.1f}x; max abs diff of t for {group}: {diff:.1e} |"
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print("| data | tool | analyse and save | file | reopen and get one perturbation |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

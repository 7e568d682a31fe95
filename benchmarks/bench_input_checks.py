"""What the input checks cost: opening and one pass over a store, pertscale's checked reader vs anndata's.

pertscale checks a store when it opens it (every chunk of ``data`` and
``indices`` present, ``indptr`` read whole and valid) and checks every block
as it reads it (row pointer, column indices). This script measures both
against anndata's own lazy reader (``anndata.experimental.read_elem_lazy``,
no checks) on the same files, in one run, and prints the ratios:

- ``open``: ``ps.read(path)`` vs ``read_elem_lazy`` on the matrix, obs and var read and an
  AnnData built by both;
- ``pass``: one synchronous pass over every row block (a column sum), the
  work every analysis starts with.

    python benchmarks/bench_input_checks.py                    # 2,000,000 cells x 200 genes, h5ad and zarr
    python benchmarks/bench_input_checks.py --n-cells 500000

The data are simulated (sparse Poisson counts, about 5 % non-zero) and
written to a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def _simulate(n_cells: int, n_genes: int, density: float, seed: int = 0):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, n_cells, 200_000):
        n = min(200_000, n_cells - start)
        x = sp.random(n, n_genes, density=density, format="csr", dtype=np.float32, rng=rng)
        x.data = rng.poisson(3, x.data.size).astype(np.int32) + 1
        blocks.append(x.astype(np.int32))
    obs = pd.DataFrame({"perturbation": rng.choice(["control", "A", "B"], n_cells)}, index=map(str, range(n_cells)))
    return ad.AnnData(
        sp.vstack(blocks, format="csr"), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])
    )


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=2_000_000)
    parser.add_argument("--n-genes", type=int, default=200)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--chunk-size", type=int, default=100_000)
    args = parser.parse_args()

    import anndata as ad
    import h5py
    import zarr

    import pertscale as ps

    warnings.simplefilter("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="pertscale-bench-"))
    try:
        adata = _simulate(args.n_cells, args.n_genes, args.density)
        paths = {"h5ad": tmp / "screen.h5ad", "zarr": tmp / "screen.zarr"}
        adata.write_h5ad(paths["h5ad"])
        adata.write_zarr(paths["zarr"])
        print(
            f"{args.n_cells:,} cells x {args.n_genes} genes, {adata.X.nnz:,} non-zeros, "
            f"row blocks of {args.chunk_size:,}"
        )
        del adata

        def anndata_open(path, fmt):
            store = h5py.File(path, "r") if fmt == "h5ad" else zarr.open_group(str(path), mode="r")
            obs, var = ad.io.read_elem(store["obs"]), ad.io.read_elem(store["var"])
            x = ad.experimental.read_elem_lazy(store["X"], chunks=(args.chunk_size, args.n_genes))
            ad.AnnData(X=x, obs=obs, var=var)  # as ps.read returns one (this checks obs_names are unique)
            return x, store

        def column_sum(x):
            return (
                x.map_blocks(lambda b: np.asarray(b.sum(axis=0)), chunks=(1, x.shape[1]))
                .sum(axis=0)
                .compute(scheduler="synchronous")
            )

        print(f"{'format':<6} {'step':<5} {'pertscale s':>12} {'anndata s':>10} {'ratio':>6}")
        for fmt, path in paths.items():
            ps.read(path, chunk_size=args.chunk_size)  # imports and caches warmed
            t_ps = _best(lambda p=path: ps.read(p, chunk_size=args.chunk_size))
            t_ad = _best(lambda p=path, f=fmt: anndata_open(p, f))
            print(f"{fmt:<6} {'open':<5} {t_ps:>12.3f} {t_ad:>10.3f} {t_ps / t_ad:>6.2f}")
            x_ps = ps.read(path, chunk_size=args.chunk_size).X
            x_ad, store = anndata_open(path, fmt)
            assert np.array_equal(column_sum(x_ps), column_sum(x_ad))
            t_ps = _best(lambda x=x_ps: column_sum(x), repeat=2)
            t_ad = _best(lambda x=x_ad: column_sum(x), repeat=2)
            print(f"{fmt:<6} {'pass':<5} {t_ps:>12.2f} {t_ad:>10.2f} {t_ps / t_ad:>6.2f}")
            if fmt == "h5ad":
                store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

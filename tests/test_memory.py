"""Memory is bounded by the block size, not by the number of cells.

Peak traced memory (``tracemalloc``: every Python and NumPy allocation) of
one process running everything (the synchronous scheduler: client and
worker in one), at 20,000 and 80,000 cells. What legitimately grows with
cells is per-cell metadata held by the client (``obs``, labels, per-cell QC
metrics: a few hundred bytes a cell) and the frozen control summary (about
12 bytes per control non-zero; the control is 5 % of the cells here, and
the plan counts the summary in every worker's budget); what must not grow
is anything the size of the matrix. The number of perturbations is the same at both sizes,
so that the results (written block by block) are the same size. The assertion: going from 20,000 to 80,000 cells adds
less than a quarter of one in-memory copy of the added cells' matrix
(8 bytes a non-zero). A process that held the matrix, or the normalized
copy, or the control and tested rows gathered, would add at least one copy.
Each measurement follows a warm-up on a small screen, so that numba's
compilation and first imports are not counted.
"""

from __future__ import annotations

import tracemalloc

import anndata as ad
import pytest

import pertscale as ps

SIZES = (20_000, 80_000)
#: Perturbations at both sizes: results (perturbations x genes) are the same size, only cells grow.
PERTURBATIONS = 100
#: Bytes a non-zero takes in memory as CSR (float32 or int32 value + int32 column index).
BYTES_PER_NONZERO = 8


def _peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def _nonzeros_per_cell(path) -> float:
    a = ad.read_h5ad(path) if str(path).endswith(".h5ad") else ad.read_zarr(path)
    return a.X.nnz / a.n_obs


def _assert_flat(peaks: dict[int, float], per_cell_nnz: float, what: str) -> None:
    small, large = (peaks[n] for n in SIZES)
    added = SIZES[1] - SIZES[0]
    per_cell = (large - small) * 2**20 / added
    matrix_per_cell = per_cell_nnz * BYTES_PER_NONZERO
    print(f"{what}: peak MB {peaks}; {per_cell:.0f} B more per added cell; the matrix is {matrix_per_cell:.0f} B/cell")
    assert per_cell < 0.25 * matrix_per_cell, (what, peaks, per_cell, matrix_per_cell)


@pytest.mark.slow
def test_qc_and_sorted_wilcoxon_memory_does_not_grow_with_cells(tmp_path):
    def qc(path):
        with ps.cluster.using("synchronous"):
            ps.pp.calculate_qc_metrics(ps.read(path, chunk_size=2_000))

    def wilcoxon(path, out):
        a = ps.read(path, chunk_size=2_000)
        ps.pp.normalize_total(a)
        ps.pp.log1p(a)
        ps.write(
            ps.tl.rank_genes_groups(a, perturbation_column="perturbation", control_label="control"),
            out,
            scheduler="synchronous",
        )

    warm = ps.datasets.simulate_screen(4_000, 1_000, 10, seed=1, sort=True, path=tmp_path / "warm.zarr")
    qc(warm)
    wilcoxon(warm, tmp_path / "warm_out.zarr")
    peaks_qc, peaks_test, nnz = {}, {}, 0.0
    for n_cells in SIZES:
        # stored sorted (as the working store is); the same perturbations, 4x the cells in each
        path = ps.datasets.simulate_screen(
            n_cells, 1_000, PERTURBATIONS, control_fraction=0.05, seed=1, sort=True, path=tmp_path / f"s{n_cells}.zarr"
        )
        nnz = _nonzeros_per_cell(path)
        peaks_qc[n_cells] = _peak_mb(lambda path=path: qc(path))
        peaks_test[n_cells] = _peak_mb(lambda path=path, n=n_cells: wilcoxon(path, tmp_path / f"res{n}.zarr"))
    _assert_flat(peaks_qc, nnz, "QC")
    _assert_flat(peaks_test, nnz, "Wilcoxon written block by block")


@pytest.mark.slow
def test_main_job_memory_on_unsorted_input_does_not_grow_with_cells(tmp_path):
    # cells in random order, as real screens are stored: the working store, the fused QC pass and the test
    # written block by block hold a few blocks, never all cells (was 1.92x from 100 k to 300 k cells)
    def job(path, out):
        ps.run(
            path,
            out,
            perturbation_column="perturbation",
            control_label="control",
            chunk_size=2_000,
            scheduler="synchronous",
            progress=False,
        )

    warm = ps.datasets.simulate_screen(4_000, 1_000, 10, seed=1, path=tmp_path / "warm.h5ad")
    job(warm, tmp_path / "warm_out")
    peaks, nnz = {}, 0.0
    for n_cells in SIZES:
        path = ps.datasets.simulate_screen(
            n_cells, 1_000, PERTURBATIONS, control_fraction=0.05, seed=1, path=tmp_path / f"u{n_cells}.h5ad"
        )
        nnz = _nonzeros_per_cell(path)
        peaks[n_cells] = _peak_mb(lambda path=path, n=n_cells: job(path, tmp_path / f"out{n}"))
    _assert_flat(peaks, nnz, "main job")

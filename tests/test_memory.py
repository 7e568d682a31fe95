"""Memory is bounded by the chunk size, not by the number of cells."""

from __future__ import annotations

import tracemalloc

import pytest

import pertscale as ps


def _peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_qc_and_sorted_wilcoxon_memory_does_not_grow_with_cells(tmp_path):
    peaks = {}
    for n_cells in (20_000, 80_000):
        # perturbation groups of ~400 cells, stored sorted (as the working store will be)
        path = ps.datasets.simulate_screen(
            n_cells, 600, n_cells // 400, control_fraction=0.05, seed=1, sort=True, path=tmp_path / f"s{n_cells}.zarr"
        )

        def qc(path=path):
            ps.pp.calculate_qc_metrics(ps.read(path, chunk_size=2_000), scheduler="synchronous")

        def wilcoxon(path=path):
            a = ps.read(path, chunk_size=2_000)
            ps.pp.normalize_total(a)
            ps.pp.log1p(a)
            ps.compute(ps.tl.rank_genes_groups(a, "perturbation", "control"), scheduler="synchronous")

        peaks[n_cells] = (_peak_mb(qc), _peak_mb(wilcoxon))
    print("peak traced MB (qc, wilcoxon) by cells:", peaks)
    small, large = peaks[20_000], peaks[80_000]
    # per-cell QC outputs and per-perturbation results grow with the screen (~0.1 MB and
    # ~4 MB more here); the working memory must not: 4x the cells, well under 2x the peak
    assert large[0] < 1.5 * small[0] + 5, peaks
    assert large[1] < 1.5 * small[1] + 10, peaks


@pytest.mark.slow
def test_main_job_memory_on_unsorted_input_does_not_grow_with_cells(tmp_path):
    # cells in random order, as real screens are stored: the working store, the fused QC pass and the test
    # written block by block must hold a few blocks, never all cells (was 1.92x from 100 k to 300 k cells)
    peaks = {}
    for n_cells in (20_000, 80_000):
        path = ps.datasets.simulate_screen(
            n_cells, 600, n_cells // 400, control_fraction=0.05, seed=1, path=tmp_path / f"u{n_cells}.h5ad"
        )

        def job(path=path, n_cells=n_cells):
            ps.run(
                path,
                tmp_path / f"out{n_cells}",
                perturbation_column="perturbation",
                control_label="control",
                chunk_size=2_000,
                scheduler="synchronous",
            )

        peaks[n_cells] = _peak_mb(job)
    print("peak traced MB of the main job by cells:", peaks)
    assert peaks[80_000] < 1.5 * peaks[20_000] + 10, peaks

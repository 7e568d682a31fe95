"""Faults: a worker process killed in the middle of a run; a damaged block of the working store."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import zarr
from dask.utils import key_split

import pertscale as ps
from pertscale.io._prepare import _file_sizes

from .conftest import assert_close

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big_h5ad(tmp_path_factory):
    """Long enough to kill a worker in the middle: 40,000 cells x 1,000 genes, 60 perturbations, unsorted."""
    path = tmp_path_factory.mktemp("faults") / "screen.h5ad"
    ps.datasets.simulate_screen(40_000, 1_000, 60, control_fraction=0.2, seed=3).write_h5ad(path)
    return path


def test_a_killed_worker_does_not_change_the_results(big_h5ad, tmp_path):
    distributed = pytest.importorskip("distributed")
    options = {"perturbation_column": "perturbation", "control_label": "control", "chunk_size": 1_000}
    ps.run(big_h5ad, tmp_path / "calm", scheduler="synchronous", progress=False, **options)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=50)
    client = distributed.Client(cluster, set_as_default=False)
    try:
        pids = list(client.run(os.getpid).values())
        killed = []

        def kill_one_during_the_test():
            # wait until the test pass runs (the engine's block tasks, after the frozen control summary was
            # replicated to the workers), then kill a worker: its blocks and its copy of the summary are lost
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed:
                processing = client.processing()
                if any(key_split(k) == "block_task" for keys in processing.values() for k in keys):
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(time.monotonic())
                time.sleep(0.05)

        killer = threading.Thread(target=kill_one_during_the_test, daemon=True)
        killer.start()
        ps.run(big_h5ad, tmp_path / "killed", scheduler=client, progress=False, **options)
        killer.join(timeout=5)
        assert killed, "the worker was not killed during the run"
        assert pids[0] not in client.run(os.getpid).values()  # a new worker process took its place
    finally:
        client.close()
        cluster.close()
    a = zarr.open_group(str(tmp_path / "killed" / "de_wilcoxon.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "calm" / "de_wilcoxon.zarr"), mode="r")
    for name in b["layers"].keys():
        assert_close(np.asarray(a["layers"][name]), np.asarray(b["layers"][name]), err_msg=name)


def _matrix(adata) -> np.ndarray:
    return adata.X.compute(scheduler="synchronous").toarray()


def test_a_damaged_working_store_block_is_detected_and_rebuilt_never_read(sim_h5ad, tmp_path, caplog):
    import json

    store = tmp_path / "work.zarr"
    options = {"out": store, "chunk_size": 500}
    expected = _matrix(ps.io.prepare(sim_h5ad, perturbation_column="perturbation", control_label="control", **options))
    # 1. a truncated chunk file: seen from the file sizes when the store is reused, and the block written again
    chunk = next(
        p for p in sorted((store / "blocks" / "1" / "data").rglob("*")) if p.is_file() and p.name != "zarr.json"
    )
    chunk.write_bytes(chunk.read_bytes()[:-7])
    with caplog.at_level("WARNING", logger="pertscale"):
        again = ps.io.prepare(sim_h5ad, perturbation_column="perturbation", control_label="control", **options)
    assert "block(s) [1] are missing or damaged" in caplog.text
    np.testing.assert_array_equal(_matrix(again), expected)
    # 2. values replaced by others of the same size (a silent corruption): the checksum catches it on reading
    group = zarr.open_group(str(store / "blocks" / "2"), mode="a")
    data = group["data"][:]
    group["data"][:] = data[::-1].copy()
    meta = json.loads((store / "blocks" / "2" / "zarr.json").read_text())
    meta["attributes"]["sizes"] = _file_sizes(store / "blocks" / "2")  # as if written so
    (store / "blocks" / "2" / "zarr.json").write_text(json.dumps(meta))
    damaged = ps.io.prepare(
        sim_h5ad, perturbation_column="perturbation", control_label="control", **options
    )  # sizes match: reused
    with pytest.raises(ps.io.DamagedStoreError, match="block 2 of the working store .* is damaged .*checksum"):
        _matrix(damaged)
    rebuilt = ps.io.prepare(
        sim_h5ad, perturbation_column="perturbation", control_label="control", **options
    )  # the block was set aside
    np.testing.assert_array_equal(_matrix(rebuilt), expected)
    assert not list((store / "blocks").glob(".*damaged*"))


def test_an_interrupted_run_resumes_from_its_written_blocks(sim_h5ad, tmp_path, monkeypatch):
    import pertscale.io._lazy as comp

    monkeypatch.setattr(comp, "CHUNK_BYTES", 300 * 8)  # 1 perturbation x 300 genes per stored chunk: 12 blocks a layer
    options = {"perturbation_column": "perturbation", "control_label": "control", "scheduler": "synchronous"}
    ps.run(sim_h5ad, tmp_path / "calm", progress=False, **options)
    total = []
    original = comp._store_block

    def interrupt_after(n):
        def store(*args, **kwargs):
            if len(total) == n:
                raise KeyboardInterrupt
            total.append(1)
            return original(*args, **kwargs)

        return store

    out = tmp_path / "out"
    monkeypatch.setattr(comp, "_store_block", interrupt_after(30))
    with pytest.raises(KeyboardInterrupt):
        ps.run(sim_h5ad, out, progress=False, **options)
    assert not list(out.glob("de_*")), "an interrupted run left results that read as complete"
    assert (out / ".pertscale-partial").is_dir()
    total.clear()
    monkeypatch.setattr(comp, "_store_block", interrupt_after(10**9))
    ps.run(sim_h5ad, out, progress=False, resume=True, **options)
    n_layers = len(list(zarr.open_group(str(out / "de_wilcoxon.zarr"), mode="r")["layers"].keys()))
    assert len(total) == 12 * n_layers - 30  # the 30 blocks written before the interruption were not written again
    assert not (out / ".pertscale-partial").exists()
    a = zarr.open_group(str(out / "de_wilcoxon.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "calm" / "de_wilcoxon.zarr"), mode="r")
    for name in b["layers"].keys():
        assert_close(np.asarray(a["layers"][name]), np.asarray(b["layers"][name]), err_msg=name)
    # without --resume, a run starts over
    total.clear()
    monkeypatch.setattr(comp, "_store_block", interrupt_after(5))
    with pytest.raises(KeyboardInterrupt):
        ps.run(sim_h5ad, tmp_path / "again", progress=False, **options)
    total.clear()
    monkeypatch.setattr(comp, "_store_block", interrupt_after(10**9))
    ps.run(sim_h5ad, tmp_path / "again", progress=False, **options)
    assert len(total) == 12 * n_layers

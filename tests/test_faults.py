"""Faults: a worker process killed in the middle of a run."""

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

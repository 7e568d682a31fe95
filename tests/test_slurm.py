"""The main job on a real SLURM cluster: workers are SLURM jobs (started by .ci/slurm-up on this machine)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zarr

from .conftest import assert_close

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, check=False).stdout
    return any(state in out for state in ("idle", "mix", "alloc"))


@pytest.fixture(scope="module")
def slurm():
    pytest.importorskip("dask_jobqueue", reason="needs dask-jobqueue (pip install 'pertscale[hpc]')")
    if not _slurm_up():
        pytest.skip("no SLURM cluster is up on this machine: run .ci/slurm-up (needs root and Debian's slurm-wlm)")


def _run(args: list[str], cwd) -> subprocess.CompletedProcess:
    # sbatch writes each job's log (slurm-<id>.out) into the directory it is called from: a temporary one
    return subprocess.run(
        [sys.executable, "-m", "pertscale.cli", "run", *args, "--no-progress"], capture_output=True, text=True, cwd=cwd
    )


def test_main_job_runs_its_workers_as_slurm_jobs_and_equals_a_local_run(slurm, sim_h5ad, tmp_path):
    seen: list[str] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True).stdout
            seen.extend(line for line in out.splitlines() if "dask-worker" in line)
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    common = [str(sim_h5ad), "--perturbation-column", "perturbation", "--control-label", "control"]
    t = time.perf_counter()
    on_slurm = _run(
        [*common, "--out", str(tmp_path / "slurm"), "--cluster", "slurm", "--cores", "1", "--memory", "3GB"]
        + ["--walltime", "00:15:00", "--jobs", "2"],
        cwd=tmp_path,
    )
    seconds = time.perf_counter() - t
    done.set()
    watcher.join()
    assert on_slurm.returncode == 0, on_slurm.stderr[-3000:]
    assert "slurm: 2 job(s) running, 2 worker(s) connected" in on_slurm.stderr
    jobs = {line.split()[0] for line in seen if line.split()[-1] == "RUNNING"}
    assert len(jobs) == 2, seen[:10]
    local = _run([*common, "--out", str(tmp_path / "local"), "--scheduler", "synchronous"], cwd=tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    a = zarr.open_group(str(tmp_path / "slurm" / "de_wilcoxon.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "local" / "de_wilcoxon.zarr"), mode="r")
    for name in b["layers"].keys():
        assert_close(np.asarray(a["layers"][name]), np.asarray(b["layers"][name]), err_msg=name)
    print(f"SLURM run: {seconds:.1f} s; jobs {sorted(jobs)}")
    # the jobs end with the run
    time.sleep(2)
    left = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert not set(left) & jobs


def test_bad_cluster_options_fail_early(sim_h5ad, tmp_path):
    common = [str(sim_h5ad), "--perturbation-column", "perturbation", "--control-label", "control"]
    both = _run([*common, "--out", str(tmp_path / "x"), "--cluster", "slurm", "--scheduler", "threads"], cwd=tmp_path)
    assert both.returncode != 0 and "give --cluster or --scheduler, not both" in both.stderr
    alone = _run([*common, "--out", str(tmp_path / "y"), "--cores", "4"], cwd=tmp_path)
    assert alone.returncode != 0 and "go with --cluster" in alone.stderr


def test_jobqueue_settings_come_from_dask_config_as_dask_jobqueue_users_keep_them(slurm, tmp_path, monkeypatch):
    import dask

    import pertscale as ps

    monkeypatch.chdir(tmp_path)  # where sbatch writes the job's log
    config = {"jobqueue.slurm.cores": 1, "jobqueue.slurm.memory": "2GB", "jobqueue.slurm.walltime": "00:05:00"}
    with dask.config.set(config):  # as ~/.config/dask/jobqueue.yaml would set them (for as long as the cluster runs)
        client = ps.cluster.slurm(jobs=1)
        try:
            (worker,) = client.scheduler_info()["workers"].values()
            assert worker["memory_limit"] == pytest.approx(2e9, rel=0.01)
            script = client.cluster.job_script()
            assert "--mem=" in script and "00:05:00" in script
            assert client.submit(sum, [1, 2]).result() == 3
        finally:
            client.close()
            client.cluster.close()

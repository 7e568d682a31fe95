"""The face's context: one choice of scheduler, by context, for every computation below it.

``ps.cluster.using`` chooses once (an active ``distributed.Client``; else
threads for data that fit in memory; else the local process cluster) and
installs the choice through Dask's own configuration, so that the plain
``dask.compute`` of an analysis runs there. Where worker processes cannot
start (a script without a main guard, ``python -``, a frozen interpreter)
the computation goes on with threads, said in one line, no traceback.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import dask
import dask.array as da
import numpy as np
import pytest

import pertscale as ps
from pertscale import cluster

from .conftest import assert_close, real_path

SCRIPT = """
import numpy as np
import pertscale as ps
a = ps.read({path!r})
ps.pp.normalize_total(a)
ps.pp.log1p(a)
de = ps.tl.rank_genes_groups(a, perturbation_column="perturbation", control_label="control")
de = ps.compute(de, scheduler="local", progress=False)
np.save({out!r}, de.layers["scores"])
print("tested", de.n_obs)
"""


def _reference(path):
    a = ps.read(path)
    ps.pp.normalize_total(a)
    ps.pp.log1p(a)
    return ps.compute(
        ps.tl.rank_genes_groups(a, perturbation_column="perturbation", control_label="control"),
        scheduler="synchronous",
        progress=False,
    )


@pytest.mark.parametrize("how", ["script without a main guard", "python - (stdin)"])
def test_worker_processes_that_cannot_start_fall_back_to_threads_in_one_line(how, tmp_path):
    path = real_path("schraivogel")
    code = SCRIPT.format(path=str(path), out=str(tmp_path / "scores.npy"))
    if how.startswith("script"):
        (tmp_path / "analysis.py").write_text(code)
        done = subprocess.run(
            [sys.executable, "analysis.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        reason = 'has no `if __name__ == "__main__":` guard'
    else:
        done = subprocess.run(
            [sys.executable, "-"], input=code, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        reason = "(python -)"
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "threads in this process" in lines[0] and reason in lines[0], done.stderr
    assert_close(np.load(tmp_path / "scores.npy"), _reference(path).layers["scores"], rtol=1e-12)


def test_a_script_with_a_main_guard_may_start_worker_processes(tmp_path, monkeypatch):
    script = tmp_path / "guarded.py"
    script.write_text('import pertscale\n\nif __name__ == "__main__":\n    pass\n')
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__file__=str(script)))
    assert cluster.processes_blocked() is None
    script.write_text("import pertscale\nprint(1)\n")
    assert "no `if __name__" in cluster.processes_blocked()
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace())  # a notebook, the prompt, python -c
    assert cluster.processes_blocked() is None
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert "frozen" in cluster.processes_blocked()


def test_the_choice_follows_the_data_and_an_active_client(monkeypatch):
    started = []
    monkeypatch.setattr(cluster, "local_client", lambda *a, **k: started.append(1) or "the local cluster")
    monkeypatch.setattr(cluster, "processes_blocked", lambda: None)
    with ps.settings.override(scheduler="auto"):
        assert cluster.choose_scheduler(nbytes=10 * 2**20)[0] == "threads"
        assert cluster.choose_scheduler(nbytes=None)[0] == "threads"
        assert not started  # small data: no cluster is started
        chosen, reason = cluster.choose_scheduler(nbytes=cluster.THREADS_BELOW_BYTES)
        assert chosen == "the local cluster" and "do not fit" in reason
        monkeypatch.setattr(cluster, "processes_blocked", lambda: "a test says so")
        assert cluster.choose_scheduler(nbytes=cluster.THREADS_BELOW_BYTES)[0] == "threads"


@pytest.mark.cluster
def test_a_client_the_user_made_is_used_and_gives_the_same_results(sim_adata):
    from distributed import Client, LocalCluster

    adata = sim_adata.copy()
    ps.pp.normalize_total(adata)
    ps.pp.log1p(adata)
    res = ps.tl.rank_genes_groups(adata, perturbation_column="perturbation", control_label="control")
    ref = ps.compute(res, scheduler="synchronous", progress=False)
    no_memory_management = {f"distributed.worker.memory.{k}": False for k in ("target", "spill", "pause", "terminate")}
    with (
        dask.config.set(no_memory_management),
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as lc,
        Client(lc) as client,
    ):
        with ps.cluster.using() as context:
            assert context.scheduler is client and "distributed.Client" in context.reason
        got = ps.compute(res, progress=False)
        # a plain analysis (its own reduction) runs on the client too, as any Dask code
        pca = adata.copy()
        ps.pp.pca(pca, n_comps=5)
    for layer in ref.layers:
        assert_close(got.layers[layer], ref.layers[layer], rtol=1e-12, err_msg=layer)
    assert pca.obsm["X_pca"].shape == (adata.n_obs, 5)


def test_using_installs_the_scheduler_for_plain_dask_compute_and_nests():
    seen = []

    def spy(dsk, keys, **kwargs):
        seen.append(len(keys))
        return dask.get(dsk, keys, **kwargs)

    x = da.ones((100, 4), chunks=10)
    with ps.cluster.using("synchronous", progress=False) as outer:
        assert dask.config.get("scheduler").n_workers == 1
        with ps.cluster.using() as inner:  # no arguments: the outer block's choice
            assert inner is outer
        assert x.sum().compute() == 400
    with dask.config.set(scheduler=spy):  # outside the face: Dask's own configuration rules
        assert x.sum().compute() == 400
    assert seen


def test_the_face_refuses_a_bogus_scheduler_before_any_work(sim_adata):
    for call in (
        lambda: ps.compute(sim_adata, scheduler="gpu"),
        lambda: ps.cluster.compute(da.ones(3), scheduler="gpu"),
        lambda: ps.cluster.using("gpu").__enter__(),
    ):
        with pytest.raises(ValueError, match=r"scheduler 'gpu' is not known; use 'auto', 'local'"):
            call()


def test_progress_is_labelled_by_the_analysis_that_computes(capsys, sim_adata):
    adata = sim_adata.copy()
    ps.pp.normalize_total(adata)
    ps.pp.log1p(adata)
    with ps.settings.override(progress=True), ps.cluster.using("synchronous"):
        ps.pp.pca(adata, n_comps=3)
    err = capsys.readouterr().err
    assert "PCA (covariance)" in err  # a log: plain lines, named after the pass


def test_analyses_take_no_scheduler():
    import inspect

    for module in (ps.pp, ps.tl, ps.pb, ps.io):
        for name in getattr(module, "__all__", dir(module)):
            obj = getattr(module, name)
            if callable(obj) and not isinstance(obj, type):
                params = inspect.signature(obj).parameters if not isinstance(obj, types.ModuleType) else {}
                assert "scheduler" not in params and "progress" not in params, f"{module.__name__}.{name}"


def test_readme_analysis_in_a_script_is_not_slowed_by_a_process_cluster(tmp_path):
    # the 21,511-cell screen: PCA and every perturbation's Wilcoxon in seconds, on threads (no cluster started)
    code = textwrap.dedent(
        f"""
        import time
        import pertscale as ps
        t = time.perf_counter()
        a = ps.read({str(real_path("schraivogel"))!r})
        ps.pp.normalize_total(a); ps.pp.log1p(a)
        ps.pp.pca(a, n_comps=10)
        de = ps.tl.rank_genes_groups(a, perturbation_column="perturbation", control_label="control")
        de = ps.compute(de, progress=False)
        import pertscale.cluster as c
        assert not c._clients, c._clients  # no LocalCluster was started
        print(round(time.perf_counter() - t, 2))
        """
    )
    done = subprocess.run([sys.executable, "-"], input=code, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.strip() == "", done.stderr
    assert float(done.stdout.split()[-1]) < 20  # the issue measured ~23 s with a process cluster


@pytest.mark.cluster
def test_a_worker_lost_inside_the_face_is_restarted(cluster_client):
    """distributed copies Dask's configuration into every worker it (re)starts: the face's runner must pickle."""
    import os
    import signal
    import time

    pids = cluster_client.run(os.getpid)
    address, pid = sorted(pids.items())[0]
    with ps.cluster.using(cluster_client, progress=False):
        os.kill(pid, signal.SIGKILL)  # as a worker killed by the OOM killer
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                now = cluster_client.run(os.getpid)
            except OSError:  # the dead worker's connection, while the scheduler has not noticed yet
                now = {}
            if len(now) == len(pids) and pid not in now.values():
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the worker {address} was not restarted within 60 s inside ps.cluster.using")
        assert dask.compute(da.ones(10, chunks=5).sum())[0] == 10


@pytest.mark.cluster
def test_a_notebook_kernel_runs_the_analysis_quietly(tmp_path):
    """In a Jupyter kernel (nbclient runs one, as a notebook does): threads for a small screen, and a process
    cluster when asked; no traceback, no tqdm widget warning without ipywidgets, at most one line about where."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    path = real_path("schraivogel")
    out = tmp_path / "scores.npy"
    cells = [
        f"""
import numpy as np
import pertscale as ps
a = ps.read({str(path)!r})
ps.pp.normalize_total(a)
ps.pp.log1p(a)
ps.pp.pca(a, n_comps=5)  # a pass, on the face's choice (threads: the screen is small), with a progress bar
de = ps.compute(ps.tl.rank_genes_groups(a, perturbation_column="perturbation", control_label="control"))
print("tested", de.n_obs)
""",
        f"""
de = ps.compute(ps.tl.rank_genes_groups(a, perturbation_column="perturbation", control_label="control"),
                scheduler="local", progress=False)  # worker processes start in a kernel
np.save({str(out)!r}, de.layers["scores"])
""",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in nb.cells for o in cell.outputs]
    assert not [o for o in outputs if o["output_type"] == "error"], outputs
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    for bad in ("Traceback", "TqdmWarning", "Nanny failed", "IProgress"):
        assert bad not in stderr, stderr
    stdout = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    assert "tested 16" in stdout
    assert_close(np.load(out), _reference(path).layers["scores"], rtol=1e-12)


def test_lazy_results_are_sized_by_the_matrix_they_read(sim_adata):
    """The face chooses threads or the process cluster for results by what computing them reads, as the job does."""
    from pertscale.io._lazy import nbytes_in_memory

    a = sim_adata.copy()
    a.X = da.from_array(a.X, chunks=(500, -1), asarray=False)
    a.uns["pertscale"] = {"source": {"nnz": int(sim_adata.X.nnz), "shape": list(sim_adata.shape)}}
    ps.pp.normalize_total(a)
    ps.pp.log1p(a)
    res = ps.tl.rank_genes_groups(a, perturbation_column="perturbation", control_label="control")
    reads = nbytes_in_memory(a)
    assert reads == pytest.approx(
        int(sim_adata.X.nnz) * 12, rel=1e-6
    )  # 12 bytes per non-zero, as the main job's plan counts
    assert res.n_obs * res.n_vars * 8 < reads <= nbytes_in_memory(res)  # not the size of the statistics alone
    with monkeypatch_threshold(reads):
        assert ps.cluster.choose_scheduler(nbytes=nbytes_in_memory(res))[0] != "threads"


def monkeypatch_threshold(nbytes):
    """THREADS_BELOW_BYTES at ``nbytes`` for the block, and worker processes reported blocked (none start)."""
    import contextlib
    from unittest import mock

    @contextlib.contextmanager
    def patched():
        with (
            mock.patch.object(cluster, "THREADS_BELOW_BYTES", nbytes),
            mock.patch.object(cluster, "processes_blocked", lambda: None),
            mock.patch.object(cluster, "local_client", lambda: "a local cluster"),
        ):
            yield

    return patched()

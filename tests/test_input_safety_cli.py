"""Input safety of the command line, schedulers, batch clusters and progress (issue 21, slice C).

Scheduler addresses that refuse, do not answer or are not a scheduler;
``--cluster`` without the batch system's submit command or without cores
and memory; ``-v`` after the subcommand; progress as plain lines where
stderr is not a terminal; ``scheduler=`` only at the face, where a bogus
one is refused with the command line's message; ``ps.compute`` of something that is not an AnnData; and the
neighbors graph at the size where scanpy searches with pynndescent. Each
case asserts the exit code (or exception type), a fragment of the message
that names the fix, and that the input is unchanged.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import pertscale as ps
from pertscale._progress import labelled
from pertscale.cli import main

from . import test_bad_inputs
from .test_bad_inputs import _args, _forbid_passes, checksum, h5ad

tiny = test_bad_inputs.tiny  # the bad-input suite's fixture: 400 cells x 40 genes, 4 perturbations


def _one_error_line(output: str) -> str:
    """The output is exactly one ``Error: ...`` line, without a traceback; return it."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    assert "Traceback" not in output and "EiB" not in output
    return lines[0]


def _invoke(args: list[str]):
    t = time.monotonic()
    result = CliRunner().invoke(main, args)
    return result, time.monotonic() - t


# ---------------------------------------------------------------- 1. scheduler addresses


def _closed_port() -> int:
    """A port on this machine where nothing listens: a connection is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def silent_server():
    """A server that accepts connections (the kernel's backlog) and never answers: as an address that hangs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture()
def http_server():
    """A server that answers with HTTP, as a dashboard port or a web proxy does (the "3 EiB" of issue 21)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = s.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                time.sleep(0.5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{s.getsockname()[1]}"
    stop.set()
    thread.join(5)
    s.close()


ADDRESS_CASES = {
    "refused": (lambda request: f"tcp://127.0.0.1:{_closed_port()}", r"connection refused; is a scheduler running"),
    "no-answer": (
        lambda request: request.getfixturevalue("silent_server"),
        r"no answer within 1 s; check the host and port.*--connect-timeout",
    ),
    "not-a-scheduler": (
        lambda request: request.getfixturevalue("http_server"),
        r"answered, but not as a Dask scheduler \(MemoryError\): check the port",
    ),
}


@pytest.mark.parametrize("name", sorted(ADDRESS_CASES))
def test_cli_scheduler_address_that_does_not_answer_is_one_error_line(name, tiny, tmp_path, request, monkeypatch):
    make, message = ADDRESS_CASES[name]
    address = make(request)
    path, out = h5ad(tiny, tmp_path / "in.h5ad"), tmp_path / "out"
    before = checksum(path)
    _forbid_passes(monkeypatch)  # the plan needs the workers: the address is tried before any pass
    result, seconds = _invoke(_args(path, out, "--connect-timeout", "1", scheduler=address))
    monkeypatch.undo()
    assert result.exit_code == 1, f"{result.output}\n{result.exception!r}"
    line = _one_error_line(result.output)
    assert f"at {address}" in line or line.startswith(f"Error: {address}")
    assert re.search(message, line), line
    assert seconds < 15, f"took {seconds:.1f} s with --connect-timeout 1"
    assert checksum(path) == before
    assert not out.exists(), "a failed run left an output directory behind"


def test_cli_malformed_scheduler_address_fails_at_once(tiny, tmp_path, monkeypatch):
    path, out = h5ad(tiny, tmp_path / "in.h5ad"), tmp_path / "out"
    before = checksum(path)
    _forbid_passes(monkeypatch)
    result, _ = _invoke(_args(path, out, scheduler="nonsense:xyz"))
    monkeypatch.undo()
    assert result.exit_code == 1
    line = _one_error_line(result.output)
    assert "scheduler 'nonsense:xyz' is not a scheduler address (port 'xyz' is not a number)" in line
    assert "give one as 'tcp://HOST:PORT'" in line
    assert checksum(path) == before and not out.exists()


def test_api_scheduler_address_that_does_not_answer_raises_connection_error(tiny, tiny_h5ad, tmp_path, monkeypatch):
    address = f"tcp://127.0.0.1:{_closed_port()}"
    before = checksum(tiny_h5ad)
    lazy = ps.read(tiny_h5ad)
    _forbid_passes(monkeypatch)
    with ps.settings.override(connect_timeout=1):
        with pytest.raises(ConnectionError, match=rf"cannot connect to the Dask scheduler at {address}: connection"):
            ps.run(
                tiny_h5ad,
                tmp_path / "out",
                perturbation_column="perturbation",
                control_label="control",
                scheduler=address,
                progress=False,
            )
        with pytest.raises(ConnectionError, match="connection refused"):
            ps.compute(lazy, scheduler=address)
        with pytest.raises(ValueError, match=r"is not a scheduler address \(port 99999 is not in 1-65535\)"):
            ps.compute(lazy, scheduler="tcp://127.0.0.1:99999")
    monkeypatch.undo()
    assert checksum(tiny_h5ad) == before and not (tmp_path / "out").exists()


@pytest.fixture()
def tiny_h5ad(tiny, tmp_path) -> Path:
    return h5ad(tiny, tmp_path / "tiny.h5ad")


@pytest.mark.cluster
def test_cli_scheduler_address_plans_with_its_workers(tiny, tmp_path):
    """A reachable address: the plan counts its workers and their memory, not this machine's."""
    from distributed import LocalCluster

    path = h5ad(tiny, tmp_path / "in.h5ad")
    before = checksum(path)
    # an in-process worker would measure this whole test process's memory against its 1 GiB, and pause
    no_memory_management = {f"distributed.worker.memory.{k}": False for k in ("target", "spill", "pause", "terminate")}
    with (
        dask.config.set(no_memory_management),
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            protocol="tcp",
            memory_limit="1GiB",
            dashboard_address=":0",
        ) as cluster,
    ):
        try:
            dry, _ = _invoke(_args(path, tmp_path / "dry", "--dry-run", scheduler=cluster.scheduler_address))
            assert dry.exit_code == 0, dry.output
            assert "scheduler: distributed, 1 worker(s) with 1.00 GiB each" in dry.output
            result, _ = _invoke(_args(path, tmp_path / "out", scheduler=cluster.scheduler_address))
            assert result.exit_code == 0, result.output
            assert (tmp_path / "out" / "de_wilcoxon.zarr").exists()
        finally:
            ps.cluster.close_clients()  # the client to the address, before its cluster goes
    assert checksum(path) == before


# ---------------------------------------------------------------- 2. batch clusters


@pytest.fixture()
def fake_bin(tmp_path, monkeypatch):
    """A PATH with only a directory of fake submit commands (none unless a test adds one)."""
    pytest.importorskip("dask_jobqueue")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


def _fake_command(bin_dir: Path, name: str) -> None:
    command = bin_dir / name
    command.write_text("#!/bin/sh\necho 'not a batch system' >&2\nexit 1\n")
    command.chmod(0o755)


SUBMIT = [("slurm", "sbatch"), ("pbs", "qsub"), ("sge", "qsub"), ("lsf", "bsub")]


@pytest.mark.parametrize(("system", "command"), SUBMIT)
def test_cli_cluster_without_the_submit_command_fails_at_once(system, command, tiny, tmp_path, fake_bin, monkeypatch):
    path, out = h5ad(tiny, tmp_path / "in.h5ad"), tmp_path / "out"
    before = checksum(path)
    args = [*_args(path, out), "--cluster", system, "--cores", "2", "--memory", "4GB"]
    args.remove("--scheduler")
    args.remove("synchronous")
    _forbid_passes(monkeypatch)
    result, seconds = _invoke(args)
    assert result.exit_code == 1
    line = _one_error_line(result.output)
    assert f"cannot submit {system} jobs: the command {command!r} is not found on this machine (PATH)" in line
    assert "run without --cluster" in line
    assert seconds < 10, f"took {seconds:.1f} s: it waited for workers"
    assert checksum(path) == before and not out.exists()


def test_cli_cluster_without_cores_and_memory_names_the_flags(tiny, tmp_path, fake_bin, monkeypatch):
    _fake_command(fake_bin, "sbatch")
    path, out = h5ad(tiny, tmp_path / "in.h5ad"), tmp_path / "out"
    before = checksum(path)
    base = [a for a in _args(path, out) if a not in ("--scheduler", "synchronous")]
    _forbid_passes(monkeypatch)
    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}):  # no jobqueue.yaml
        neither, _ = _invoke([*base, "--cluster", "slurm"])
        no_memory, _ = _invoke([*base, "--cluster", "slurm", "--cores", "4"])
    assert neither.exit_code == 1 and no_memory.exit_code == 1
    line = _one_error_line(neither.output)
    assert "the slurm jobs need their cores and memory per job: give --cores 8 --memory 32GB" in line
    assert "jobqueue.slurm.cores" in line and "cluster = SLURMCluster" not in line
    assert "need their memory per job" in _one_error_line(no_memory.output)
    assert checksum(path) == before and not out.exists()


def test_api_jobqueue_names_the_missing_command_and_arguments(fake_bin):
    with pytest.raises(FileNotFoundError, match="the command 'qsub' is not found"):
        ps.cluster.jobqueue("pbs", cores=1, memory="1GB")
    _fake_command(fake_bin, "sbatch")
    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}):
        with pytest.raises(ValueError, match=r"cores and memory per job: .*cores=8, memory='32GB'"):
            ps.cluster.slurm()
    with pytest.raises(ValueError, match="memory 'lots' is not a size such as 32GB"):
        ps.cluster.slurm(cores=1, memory="lots")
    with pytest.raises(ValueError, match=r"cores \(--cores\) must be >= 1"):
        ps.cluster.slurm(cores=0, memory="1GB")


# ---------------------------------------------------------------- 3. -v after the subcommand


@pytest.mark.parametrize(
    ("where", "level"),
    [([], logging.WARNING), (["-v"], logging.INFO), (["-vv"], logging.DEBUG), (["-v", "-v"], logging.DEBUG)],
)
def test_cli_verbose_after_the_subcommand_counts(where, level, tiny, tmp_path, monkeypatch):
    path = h5ad(tiny, tmp_path / "in.h5ad")
    before = checksum(path)
    levels: list[int] = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: levels.append(kw["level"]))
    after = CliRunner().invoke(main, [*_args(path, tmp_path / "a", "--dry-run"), *where])
    before_run = CliRunner().invoke(main, [*where, *_args(path, tmp_path / "b", "--dry-run")])
    assert after.exit_code == 0, after.output
    assert before_run.exit_code == 0, before_run.output
    assert levels == [level, level]
    assert checksum(path) == before


def test_cli_verbose_after_the_subcommand_logs(tiny, tmp_path):
    path = h5ad(tiny, tmp_path / "in.h5ad")
    before = checksum(path)
    cmd = [sys.executable, "-m", "pertscale.cli", *_args(path, tmp_path / "out", "--dry-run")]
    quiet = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    info = subprocess.run([*cmd, "-v"], capture_output=True, text=True, timeout=120, check=False)
    debug = subprocess.run([*cmd, "-vv"], capture_output=True, text=True, timeout=120, check=False)
    assert quiet.returncode == info.returncode == debug.returncode == 0, info.stderr
    assert "INFO pertscale" not in quiet.stderr
    assert "INFO pertscale.io._read: opened" in info.stderr and "DEBUG" not in info.stderr
    assert "DEBUG" in debug.stderr
    assert "No such option" not in info.stderr + debug.stderr
    assert checksum(path) == before


# ---------------------------------------------------------------- 4. progress where stderr is not a terminal

PROGRESS_LINE = re.compile(
    r"^(?P<desc>[^:\r]+): (?P<n>[\d,]+)/(?P<total>[\d,]+) (tasks|chunks) \(\d+%\), \d\d:\d\d elapsed"
)


def _slow(n: int) -> da.Array:
    return da.ones(n, chunks=1).map_blocks(lambda b: (time.sleep(0.02), b)[1])


@pytest.mark.parametrize(
    "scheduler",
    [
        "synchronous",
        "threads",
        pytest.param("distributed", marks=pytest.mark.cluster),
    ],
)
def test_progress_is_plain_periodic_lines_without_a_terminal(scheduler, capsys, request):
    sched = request.getfixturevalue("cluster_client") if scheduler == "distributed" else scheduler
    with ps.settings.override(progress=True, progress_interval=0.1), labelled("slow step"):
        (ones,) = ps.cluster.compute(_slow(40), scheduler=sched)  # 40 chunks, 20 ms each
    assert ones.sum() == 40
    err = capsys.readouterr().err
    assert "\r" not in err, "a carriage return: tqdm's redraw in a log"
    lines = err.splitlines()
    matches = [PROGRESS_LINE.match(line) for line in lines]
    assert lines and all(matches), err
    assert {m["desc"] for m in matches} == {"slow step"}
    done = [int(m["n"].replace(",", "")) for m in matches]
    assert len(lines) >= 3 and done == sorted(done), err  # a start, some periodic lines, an end
    assert done[-1] == int(matches[-1]["total"].replace(",", "")) and "(100%)" in lines[-1]


def test_cli_progress_in_a_log_is_lines_and_in_a_terminal_a_bar(tiny, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    path = h5ad(tiny, tmp_path / "in.h5ad")
    before = checksum(path)

    def cmd(out):
        args = [a for a in _args(path, tmp_path / out) if a != "--no-progress"]
        return [sys.executable, "-m", "pertscale.cli", *args]

    log = subprocess.run(cmd("log"), capture_output=True, text=True, timeout=120, check=False)
    assert log.returncode == 0, log.stderr
    assert "\r" not in log.stderr
    assert re.search(r"^QC: [\d,]+/[\d,]+ tasks \(100%\), \d\d:\d\d elapsed$", log.stderr, flags=re.MULTILINE)
    primary, secondary = pty.openpty()  # stderr a terminal: tqdm's bar, redrawn with carriage returns
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm draws nothing 0 wide
    chunks: list[bytes] = []

    def read_terminal():
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the terminal's other side is closed and everything was read
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        term = subprocess.run(cmd("term"), stdout=subprocess.PIPE, stderr=secondary, timeout=120, check=False)
    finally:
        os.close(secondary)
        reader.join(10)
        os.close(primary)
    terminal = b"".join(chunks).decode(errors="replace")
    assert term.returncode == 0, terminal
    assert "\r" in terminal and "QC" in terminal
    assert checksum(path) == before


# ---------------------------------------------------------------- 5. scheduler= only at the face
#
# Computing is the face's verb (issue 22): below it no public function takes ``scheduler=`` (or
# ``progress=``); the faces refuse a bogus name with the command line's own message, before any work.

#: Modules below the face whose public functions and classes' methods must not take a scheduler.
BELOW_THE_FACE = {"ps.pp": ps.pp, "ps.tl": ps.tl, "ps.pb": ps.pb, "ps.io": ps.io, "ps.get": ps.get}


def _public_callables(module) -> dict:
    """Every public function exported by ``module``, and every public method of the classes it exports."""
    import inspect

    found = {}
    for attr in getattr(module, "__all__", [a for a in dir(module) if not a.startswith("_")]):
        obj = getattr(module, attr, None)
        if inspect.isclass(obj):
            if obj.__module__.startswith("pertscale"):
                found[attr] = obj
                for name in vars(obj):
                    if not name.startswith("_") and callable(getattr(obj, name, None)):
                        found[f"{attr}.{name}"] = getattr(obj, name)
        elif callable(obj) and getattr(obj, "__module__", "").startswith("pertscale"):
            found[attr] = obj
    return found


def test_no_function_below_the_face_takes_a_scheduler_or_progress():
    import inspect

    checked, offending = 0, []
    for module_name, module in BELOW_THE_FACE.items():
        for name, obj in _public_callables(module).items():
            try:
                params = inspect.signature(obj).parameters
            except (TypeError, ValueError):  # a builtin without a signature
                continue
            checked += 1
            offending += [f"{module_name}.{name}({p}=)" for p in ("scheduler", "progress") if p in params]
    assert offending == [], f"computing is the face's verb; these take a scheduler or progress: {offending}"
    assert checked > 40  # the walk did find the analyses (pp, tl, pb, io, get)


def _faces(tmp: Path, path: Path, adata: ad.AnnData) -> dict:
    labels = {"perturbation_column": "perturbation", "control_label": "control"}
    return {
        "ps.run": lambda s: ps.run(path, tmp / "out", **labels, scheduler=s),
        "ps.compute": lambda s: ps.compute(adata, scheduler=s),
        "ps.write": lambda s: ps.write(adata, tmp / "x.h5ad", scheduler=s),
        "ps.cluster.using": lambda s: ps.cluster.using(s).__enter__(),
        "ps.cluster.compute": lambda s: ps.cluster.compute(adata.X, scheduler=s),
    }


FACES = sorted(_faces(Path("."), Path("."), ad.AnnData(np.zeros((2, 2)))).keys())


def _cli_message(tiny, tmp_path, scheduler: str) -> str:
    """The command line's one error line for ``--scheduler <scheduler>``, without its ``Error: ``."""
    path = h5ad(tiny, tmp_path / "cli.h5ad")
    result, _ = _invoke(_args(path, tmp_path / "cli-out", scheduler=scheduler))
    assert result.exit_code != 0 and not (tmp_path / "cli-out").exists()
    return _one_error_line(result.output).removeprefix("Error: ")


@pytest.mark.parametrize("name", FACES)
def test_the_faces_refuse_an_unknown_scheduler_with_the_cli_message(name, tiny, tiny_h5ad, tmp_path, monkeypatch):
    expected = {s: _cli_message(tiny, tmp_path, s) for s in ("gpu", "nonsense:xyz")}
    assert expected["gpu"].startswith("scheduler 'gpu' is not known; use 'auto', 'local', 'synchronous', 'threads'")
    assert "is not a scheduler address (port 'xyz' is not a number)" in expected["nonsense:xyz"]
    lazy = ps.read(tiny_h5ad)  # ps.compute and ps.write would compute it
    lazy.uns.pop("pertscale", None)  # not the file it was read from: ps.write may write elsewhere
    file_before = checksum(tiny_h5ad)
    call = _faces(tmp_path, tiny_h5ad, lazy)[name]
    _forbid_passes(monkeypatch)
    for scheduler, message in expected.items():
        with pytest.raises(ValueError) as err:
            call(scheduler)
        assert str(err.value) == message
    monkeypatch.undo()
    assert ps.cluster.current() is None  # no context was left open
    assert checksum(tiny_h5ad) == file_before
    assert not any(tmp_path.glob("x.*")) and not (tmp_path / "out").exists()


def test_every_face_that_takes_a_scheduler_is_covered():
    """The faces above are every top-level function with a ``scheduler=`` argument (a new one must be added)."""
    import inspect

    found = {
        f"ps.{attr}"
        for attr in ps.__all__
        if inspect.isfunction(getattr(ps, attr)) and "scheduler" in inspect.signature(getattr(ps, attr)).parameters
    }
    assert found and found <= set(FACES), sorted(found - set(FACES))


def test_settings_refuse_an_unknown_scheduler():
    before = ps.settings.scheduler
    with pytest.raises(ValueError, match="scheduler 'gpu' is not known"):
        ps.settings.scheduler = "gpu"
    with pytest.raises(ValueError, match="is not a scheduler address"), ps.settings.override(scheduler="nonsense:xyz"):
        pass
    with pytest.raises(TypeError, match="must be a name, an address or a distributed.Client, not int"):
        ps.settings.scheduler = 3
    with pytest.raises(ValueError, match=r"settings.connect_timeout must be > 0"):
        ps.settings.connect_timeout = 0
    assert ps.settings.scheduler == before


# ---------------------------------------------------------------- 6. ps.compute of something else


@pytest.mark.parametrize("value", ["str", 3, {"X": 1}, None, [1, 2]])
def test_api_compute_of_not_an_anndata_is_a_type_error(value):
    import copy

    before = copy.deepcopy(value)
    with pytest.raises(TypeError, match=r"^ps.compute takes an AnnData \(whose lazy arrays, in X, layers"):
        ps.compute(value)
    assert value == before


def test_api_compute_of_a_dask_array_names_dask_compute():
    x = da.ones(4, chunks=2)
    with pytest.raises(TypeError, match=r"not Array; for Dask arrays .* use dask.compute\(\.\.\.\)"):
        ps.compute(x)
    assert (x.compute() == 1).all()


# ---------------------------------------------------------------- 7. neighbors where scanpy uses pynndescent


def test_neighbors_where_scanpy_searches_with_pynndescent():
    """8,192 cells: scanpy searches with pynndescent (0.7 returns a csr_array that scanpy 1.11 cannot read on
    scipy >= 1.16). The graph is scanpy's (n_neighbors a row, itself included on this path, a symmetric
    connectivity) and its neighbors are the exact ones for nearly every cell. About 30 s, nearly all of it
    numba compiling pynndescent."""
    pytest.importorskip("scanpy")
    from sklearn.neighbors import NearestNeighbors

    n, k = 8192, 10
    rng = np.random.default_rng(1)
    embedding = rng.normal(size=(n, 8)).astype(np.float32)
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]), obsm={"X_pca": embedding.copy()})
    ps.pp.neighbors(adata, n_neighbors=k)
    np.testing.assert_array_equal(adata.obsm["X_pca"], embedding)  # the input is unchanged
    dist, conn = adata.obsp["distances"].tocsr(), adata.obsp["connectivities"].tocsr()
    assert dist.shape == conn.shape == (n, n)
    assert (np.diff(dist.indptr) >= k - 1).all() and (np.diff(conn.indptr) > 0).all()
    assert abs(conn - conn.T).max() < 1e-6
    assert adata.uns["neighbors"]["params"]["n_neighbors"] == k
    exact = NearestNeighbors(n_neighbors=k - 1).fit(embedding).kneighbors(return_distance=False)  # itself left out
    found = np.split(dist.indices, dist.indptr[1:-1])
    recall = np.mean([len(set(f) & set(e)) / (k - 1) for f, e in zip(found, exact, strict=True)])
    assert recall > 0.98, recall

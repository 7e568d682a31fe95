"""Issue 21, slice B1: the output directory, the plan, disk space, dry run and resume.

Every case asserts the exit code (or the exception type), a fragment of the
message that names the fix, and that the input is unchanged; the cases that
must be refused before any pass over the matrix run with every computation
forbidden (``_forbid_passes``).
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import pertscale as ps
import pertscale.io._lazy as lazy_module
import pertscale.job._plan as plan_module
from pertscale.cli import main
from pertscale.job import METHODS, DiskFullError, output_files

from .test_bad_inputs import _args, _forbid_passes, checksum, h5ad, write_zarr

OPTIONS = {"perturbation_column": "perturbation", "control_label": "control", "scheduler": "synchronous"}
MANIFEST = ".pertscale-manifest.json"


@pytest.fixture(scope="module")
def tiny():
    """As test_bad_inputs: 400 cells x 40 genes, 100 control cells, four perturbations, random cell order."""
    a = ps.datasets.simulate_screen(400, 40, 4, control_fraction=0.25, seed=3, n_affected=3)
    del a.uns["simulation"]
    return a


@pytest.fixture()
def input_h5ad(tiny, tmp_path) -> Path:
    return h5ad(tiny, tmp_path / "in.h5ad")


@pytest.fixture()
def finished(input_h5ad, tmp_path) -> Path:
    """The --out of a finished run, with its manifest."""
    out = tmp_path / "out"
    ps.run(input_h5ad, out, **OPTIONS)
    assert (out / MANIFEST).is_file()
    return out


def _cli(path, out, *extra, monkeypatch=None):
    """``pertscale run`` on ``path``; with ``monkeypatch``, every pass over the matrix is forbidden."""
    if monkeypatch is not None:
        _forbid_passes(monkeypatch)
    try:
        return CliRunner().invoke(main, _args(path, out, *extra))
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()


def _tree(out: Path) -> dict[str, str]:
    """Every entry of ``out`` but the lock, with its checksum."""
    return {p.name: checksum(p) for p in out.iterdir() if p.name != ".pertscale.lock"}


# ---------------------------------------------------------------- 1. --overwrite replaces only what a run recorded


def test_overwrite_replaces_an_earlier_run_and_never_touches_other_files(input_h5ad, finished, monkeypatch):
    before = checksum(input_h5ad)
    users = {"de_my_scanpy.h5ad": b"\x89HDF\r\n my own results", "notes.txt": b"do not delete"}
    for name, data in users.items():
        (finished / name).write_bytes(data)
    earlier = _tree(finished)
    refused = _cli(input_h5ad, finished, monkeypatch=monkeypatch)
    assert refused.exit_code == 1, refused.output
    assert "already holds results of an earlier run (de_wilcoxon.h5ad, de_wilcoxon.parquet, de_wilcoxon.zarr" in (
        refused.output
    )
    assert "pass --overwrite" in refused.output and "de_my_scanpy" not in refused.output
    assert _tree(finished) == earlier
    replaced = _cli(input_h5ad, finished, "--overwrite", "--method", "t-test")
    assert replaced.exit_code == 0, replaced.output
    assert all((finished / name).read_bytes() == data for name, data in users.items())  # byte for byte
    assert not list(finished.glob("de_wilcoxon*"))  # the earlier run's other method: replaced, not mixed in
    written = json.loads((finished / MANIFEST).read_text())["written"]
    assert sorted(written) == [
        "de_t_test.h5ad",
        "de_t_test.parquet",
        "de_t_test.zarr",
        "de_t_test_effects.csv",
        "de_t_test_knockdown.csv",
        "de_t_test_significant.csv",
        "knockdown_cells.parquet",
        "qc.csv",
        "qc_cells.zarr",
        "report.html",
        "run.json",
    ]
    assert checksum(input_h5ad) == before


@pytest.mark.parametrize("how", ["cli", "api"])
def test_a_file_pertscale_did_not_write_is_never_replaced(tiny, input_h5ad, tmp_path, monkeypatch, how):
    out = tmp_path / "out"
    out.mkdir()
    h5ad(tiny[:50].copy(), out / "de_wilcoxon.h5ad")  # the user's own results, at the name the job writes
    (out / "de_my_scanpy.h5ad").write_bytes(b"mine")
    earlier, before = _tree(out), checksum(input_h5ad)
    if how == "cli":
        result = _cli(input_h5ad, out, "--overwrite", monkeypatch=monkeypatch)
        assert result.exit_code == 1, result.output
        message = result.output
    else:
        _forbid_passes(monkeypatch)
        with pytest.raises(FileExistsError) as err:
            ps.run(input_h5ad, out, overwrite=True, **OPTIONS)
        message = str(err.value)
    assert "holds de_wilcoxon.h5ad: not written by pertscale" in message
    assert "not even with --overwrite: move or delete them" in message
    assert "results of an earlier run" not in message and "de_my_scanpy" not in message
    assert _tree(out) == earlier and checksum(input_h5ad) == before


def test_an_output_changed_since_or_not_in_the_manifest_is_refused_by_name(input_h5ad, finished, monkeypatch):
    with open(finished / "qc.csv", "a") as f:
        f.write("my,own,row\n")  # changed since pertscale wrote it
    (finished / "de_t_test.zarr").mkdir()  # a store of another method that no run recorded
    (finished / "de_t_test.zarr" / "zarr.json").write_text("{}")
    earlier, before = _tree(finished), checksum(input_h5ad)
    result = _cli(input_h5ad, finished, "--overwrite", monkeypatch=monkeypatch)
    assert result.exit_code == 1, result.output
    assert "de_t_test.zarr (not written by pertscale), qc.csv (changed since pertscale wrote it)" in result.output
    assert "move or delete them" in result.output and "results of an earlier run" not in result.output
    assert _tree(finished) == earlier and checksum(input_h5ad) == before


# ---------------------------------------------------------------- 2. disk full


def _enospc_while_storing(monkeypatch):
    """Writing a block of a result store fails as a full disk does, wrapped as a library would wrap it."""

    def full(block, target, start, marker):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "de_wilcoxon.zarr/layers/scores/c/0/0")
        except OSError as err:
            raise RuntimeError("failed to write chunk") from err

    monkeypatch.setattr(lazy_module, "_store_block", full)


@pytest.mark.parametrize("how", ["cli", "api"])
def test_a_full_disk_is_one_line_naming_out_and_the_space_needed(input_h5ad, tmp_path, monkeypatch, how):
    before, out = checksum(input_h5ad), tmp_path / "out"
    _enospc_while_storing(monkeypatch)
    if how == "cli":
        result = CliRunner().invoke(main, _args(input_h5ad, out))
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
        message = result.output
    else:
        with pytest.raises(DiskFullError) as err:
            ps.run(input_h5ad, out, **OPTIONS)
        assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
        assert isinstance(err.value, MemoryError)  # as the plan's refusal of a run that does not fit the disk
        message = str(err.value)
    assert f"no space left on the disk of --out {str(out)!r}" in message
    assert "the plan counted about" in message and "choose --out on a larger disk" in message
    assert checksum(input_h5ad) == before
    assert not out.exists()  # created by the run, removed again


def test_the_plan_counts_every_output_and_refuses_too_little_disk(tiny, tmp_path, monkeypatch):
    tiny = tiny.copy()
    tiny.X = tiny.X.tocsc()  # the job also writes a CSR copy of a CSC input
    path = h5ad(tiny, tmp_path / "in.h5ad")
    before, out = checksum(path), tmp_path / "out"
    steps = {"hvg": 10, "pca": 3, "pseudobulk": True}
    plan = ps.run(path, out, method=",".join(METHODS), dry_run=True, **steps, **OPTIONS)
    names = set(output_files(METHODS, ["hvg", "pca", "pseudobulk"]).values())
    assert set(plan.disk_outputs) == names and all(n > 0 for n in plan.disk_outputs.values())
    assert plan.disk_csr_copy > 0 and plan.disk_working_store > 0
    total = sum(plan.disk_outputs.values()) + 2 * plan.disk_working_store + plan.disk_csr_copy
    assert plan.disk_needed == total and not plan.problems
    assert any(line.startswith("results: de_wilcoxon.zarr") for line in plan.lines())
    real = plan_module.shutil.disk_usage
    monkeypatch.setattr(plan_module.shutil, "disk_usage", lambda p: real(p)._replace(free=total - 1))
    args = ["--method", ",".join(METHODS), "--hvg", "10", "--pca", "3", "--pseudobulk"]
    result = _cli(path, out, *args, monkeypatch=monkeypatch)
    assert result.exit_code == 1, result.output
    assert "free but the working store and results need about" in result.output
    assert "CSR copy of the CSC input" in result.output and "on a larger disk" in result.output
    assert not out.exists() and checksum(path) == before


# ---------------------------------------------------------------- 3. --out and --working-store before any pass


def _read_only(directory: Path, monkeypatch) -> None:
    """Make ``directory`` unwritable: by its mode, or (as root, whom modes do not stop) as a read-only file system."""
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o500)
        return
    real = os.statvfs

    def statvfs(path):
        result = real(path)
        if Path(path).resolve() == directory.resolve():
            values = list(result)
            values[8] |= os.ST_RDONLY  # f_flag
            return os.statvfs_result(values)
        return result

    monkeypatch.setattr(os, "statvfs", statvfs)


def _cases(tmp: Path, tiny, monkeypatch):
    """(input, --out, extra options, API options, message) of each bad --out / --working-store."""
    path = h5ad(tiny, tmp / "in.h5ad")
    store = write_zarr(tiny, tmp / "in.zarr")
    (tmp / "data").mkdir()
    nested = h5ad(tiny, tmp / "data" / "in.h5ad")
    _read_only(tmp / "ro", monkeypatch)
    out = tmp / "out"
    return {
        "empty-out": (path, "", [], {}, r"out \(--out\) is empty: give a directory"),
        "empty-working-store": (
            path, out, ["--working-store", ""], {"working_store": ""},
            r"working_store \(--working-store\) is empty",
        ),
        "working-store-is-out": (
            path, out, ["--working-store", str(out)], {"working_store": out}, r"is --out itself.*another path"
        ),
        "out-inside-working-store": (
            path, out / "r", ["--working-store", str(out)], {"working_store": out},
            r"lies inside --working-store.*does not hold --out",
        ),
        "working-store-is-an-output": (
            path, out, ["--working-store", str(out / "qc.csv")], {"working_store": out / "qc.csv"},
            r"is where the job writes qc.csv",
        ),
        "working-store-read-only": (
            path, out, ["--working-store", str(tmp / "ro" / "w.zarr")], {"working_store": tmp / "ro" / "w.zarr"},
            r"cannot write the working store .*: (read-only file system|permission denied)\).*writable disk",
        ),
        "working-store-is-the-input": (
            path, out, ["--working-store", str(path)], {"working_store": path}, r"would overwrite the input"
        ),
        "working-store-inside-the-input": (
            store, out, ["--working-store", str(store / "w.zarr")], {"working_store": store / "w.zarr"},
            r"lies inside the input",
        ),
        "working-store-holds-the-input": (
            nested, out, ["--working-store", str(tmp / "data")], {"working_store": tmp / "data"},
            r"would replace the directory that holds the input",
        ),
    }  # fmt: skip


@pytest.mark.parametrize(
    "name",
    [
        "empty-out",
        "empty-working-store",
        "working-store-is-out",
        "out-inside-working-store",
        "working-store-is-an-output",
        "working-store-read-only",
        "working-store-is-the-input",
        "working-store-inside-the-input",
        "working-store-holds-the-input",
    ],
)
@pytest.mark.parametrize("how", ["cli", "api"])
def test_bad_out_or_working_store_is_refused_before_any_pass(name, how, tiny, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # an empty --out must not write here
    path, out, extra, options, message = _cases(tmp_path, tiny, monkeypatch)[name]
    before = {p: checksum(p) for p in (tmp_path / "in.h5ad", tmp_path / "in.zarr", tmp_path / "data")}
    _forbid_passes(monkeypatch)
    if how == "cli":
        result = CliRunner().invoke(main, _args(path, out, *extra))
        assert result.exit_code == 1, result.output
        assert re.search(message, result.output, flags=re.DOTALL), result.output
        assert "Traceback" not in result.output
    else:
        with pytest.raises((ValueError, PermissionError), match=message):
            ps.run(path, out, **options, **OPTIONS)
    assert {p: checksum(p) for p in before} == before
    assert not (tmp_path / "out").exists() and not list(cwd.iterdir())
    assert not (tmp_path / "ro" / "w.zarr").exists()


# ---------------------------------------------------------------- 4. --dry-run says when the run would be refused


def test_dry_run_says_the_run_would_be_refused_and_writes_nothing(input_h5ad, finished, tmp_path, monkeypatch):
    import fcntl

    before, earlier = checksum(input_h5ad), _tree(finished)
    result = _cli(input_h5ad, finished, "--dry-run", monkeypatch=monkeypatch)
    assert result.exit_code == 1, result.output
    assert "passes over the matrix" in result.output  # the plan is printed
    assert "the run would be refused: --out" in result.output
    assert "already holds results of an earlier run" in result.output and "pass --overwrite" in result.output
    assert _tree(finished) == earlier
    fine = _cli(input_h5ad, finished, "--dry-run", "--overwrite", monkeypatch=monkeypatch)
    assert fine.exit_code == 0 and "would be refused" not in fine.output, fine.output
    with open(finished / ".pertscale.lock", "a") as lock:  # another run writing there
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _forbid_passes(monkeypatch)
        plan = ps.run(input_h5ad, finished, overwrite=True, dry_run=True, **OPTIONS)
        monkeypatch.undo()
    assert plan.refusals and "another pertscale run is writing to --out" in plan.refusals[0]
    (finished / ".pertscale.lock").unlink()
    (finished / "pca.zarr").mkdir()  # in the way of a run, whatever its options
    result = _cli(input_h5ad, finished, "--dry-run", "--overwrite", monkeypatch=monkeypatch)
    assert result.exit_code == 1 and "would be refused: --out" in result.output
    assert "holds pca.zarr (not written by pertscale)" in result.output
    new = tmp_path / "new"
    result = _cli(input_h5ad, new, "--dry-run", monkeypatch=monkeypatch)
    assert result.exit_code == 0 and "would be refused" not in result.output, result.output
    assert not new.exists() and checksum(input_h5ad) == before


# ---------------------------------------------------------------- 5. --resume on a finished run


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_resume_on_a_finished_run_says_there_is_nothing_to_resume(input_h5ad, finished, monkeypatch, extra):
    before, earlier = checksum(input_h5ad), _tree(finished)
    result = _cli(input_h5ad, finished, "--resume", *extra, monkeypatch=monkeypatch)
    assert result.exit_code == 1, result.output
    assert "nothing to resume" in result.output and "leave out --resume" in result.output
    assert "pass --overwrite to compute the results again" in result.output
    _forbid_passes(monkeypatch)
    with pytest.raises(FileExistsError, match="nothing to resume"):
        ps.run(input_h5ad, finished, resume=True, overwrite=bool(extra), **OPTIONS)
    assert _tree(finished) == earlier and checksum(input_h5ad) == before


# ---------------------------------------------------------------- 6. the plan's memory with threads


def test_threads_share_one_process_memory_in_the_plan(input_h5ad, tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(plan_module, "n_cores", lambda: 8)
    monkeypatch.setattr(plan_module.psutil, "virtual_memory", lambda: SimpleNamespace(available=4 * 2**30))
    options = {**OPTIONS, "dry_run": True}
    for scheduler, limit in (("threads", 2**30), (None, None)):  # asked for, or chosen by the plan (small input)
        options["scheduler"] = scheduler
        plan = ps.run(input_h5ad, tmp_path / "out", memory_limit=limit, **options)
        memory = limit or 4 * 2**30  # the process's, once: not once per thread
        assert plan.scheduler == "threads" and plan.n_workers == 8 and plan.threads_per_worker == 8
        assert plan.worker_memory == memory
        assert plan.peak_worker_bytes >= plan.summary_bytes + 8 * plan.block_bytes  # every thread's block at once
        text = "\n".join(plan.lines())
        shown = "1.00 GiB" if limit else "4.00 GiB"
        assert f"scheduler: threads, 8 thread(s) in this process, sharing {shown}" in text
        assert "each" not in text.split("scheduler:")[1].splitlines()[0]
    local = ps.run(input_h5ad, tmp_path / "out", **{**options, "scheduler": "local"})
    assert local.worker_memory == 4 * 2**30 // 8  # processes: the machine's memory shared out, once
    assert "8 worker(s) with 0.50 GiB each" in "\n".join(local.lines())
    args = _args(input_h5ad, tmp_path / "out", "--dry-run", "--memory-limit", "1GiB", scheduler="threads")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "8 thread(s) in this process, sharing 1.00 GiB" in result.output
    assert "peak memory per worker (this process, 8 thread(s) at once): about" in result.output
    assert not (tmp_path / "out").exists()

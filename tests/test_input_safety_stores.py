"""Stores and readers (issue 21): stale working stores, checksummed chunks, absent label chunks, dtypes, formats.

Each case builds a tiny input, runs the command line and/or the Python API
on it, and asserts the exit code (or exception type), a fragment of the
message that names the fix, and that the input is unchanged. Cases that
must fail before any pass over the matrix run under ``_forbid_passes``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from click.testing import CliRunner
from zarr.codecs import Crc32cCodec, ZstdCodec

import pertscale as ps
from pertscale.cli import main

from .test_bad_inputs import _args, _forbid_passes, checksum, h5ad, write_zarr

# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny() -> ad.AnnData:
    """As test_bad_inputs: 400 cells x 40 genes, 100 control cells, four perturbations, random cell order."""
    a = ps.datasets.simulate_screen(400, 40, 4, control_fraction=0.25, seed=3, n_affected=3)
    del a.uns["simulation"]
    return a


def _invoke(path: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, _args(path, out, *extra))


def _sorted_rows(prepared: ad.AnnData) -> np.ndarray:
    return ps.compute(prepared, scheduler="synchronous").X.toarray()


def _same_size_other_content(tiny: ad.AnnData, what: str) -> ad.AnnData:
    """A screen of the same shape whose file has the same size: the values, or two labels, moved between cells."""
    other = tiny.copy()
    if what == "matrix":
        other.X = other.X.copy()
        other.X.data = np.roll(other.X.data, 1)  # the same values and nnz, in other places
    else:
        labels = other.obs["perturbation"].to_numpy().copy()
        a = int(np.flatnonzero(labels == "control")[0])
        b = int(np.flatnonzero(labels == "P0001")[0])
        labels[a], labels[b] = labels[b], labels[a]
        other.obs["perturbation"] = pd.Categorical(labels, categories=other.obs["perturbation"].cat.categories)
    return other


def _replace_keeping_size_and_mtime(path: Path, adata: ad.AnnData) -> None:
    """What a sync tool or ``touch -r`` does: another file in place, with the old size and modification time."""
    st = path.stat()
    new = path.with_name("replacement.h5ad")
    adata.write_h5ad(new)
    assert new.stat().st_size == st.st_size, "the replacement must have the same size for this test"
    os.replace(new, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def _flip_byte(chunk: Path) -> None:
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))


def _unchecksummed_arrays(store: Path) -> list[str]:
    """Arrays of a zarr store (its root or any group below) without a CRC-32C codec."""
    group = zarr.open_group(str(store), mode="r", use_consolidated=False)
    if (store / "blocks").is_dir():  # a working store: its blocks are zarr groups of their own
        blocks = [zarr.open_group(str(b), mode="r") for b in (store / "blocks").iterdir()]
        groups = [group["obs"], group["var"], *blocks]
    else:
        groups = [group]
    return [
        f"{g.path}/{name}"
        for g in groups
        for name, arr in g.members(max_depth=None)
        if hasattr(arr, "dtype")
        and arr.attrs.get("encoding-type") != "null"  # anndata's placeholder for None (raw=None): no data
        and not any(isinstance(c, Crc32cCodec) for c in arr.metadata.codecs)
    ]


# ---------------------------------------------------------------- 1. a stale working store is not reused


@pytest.mark.parametrize("what", ["matrix", "labels"])
def test_prepare_rebuilds_for_an_input_replaced_with_the_same_size_and_mtime(what, tiny, tmp_path, caplog):
    path = h5ad(tiny, tmp_path / "in.h5ad")
    store = tmp_path / "sorted.zarr"
    with ps.cluster.using("synchronous"):
        ps.io.prepare(path, perturbation_column="perturbation", control_label="control", out=store)
    other = _same_size_other_content(tiny, what)
    _replace_keeping_size_and_mtime(path, other)
    before = checksum(path)
    with caplog.at_level(logging.INFO, logger="pertscale.io._prepare"):
        with ps.cluster.using("synchronous"):
            again = ps.io.prepare(path, perturbation_column="perturbation", control_label="control", out=store)
    assert "rebuilding it" in caplog.text and "reusing" not in caplog.text
    rows = again.obs["input_row"].to_numpy()
    np.testing.assert_array_equal(_sorted_rows(again), other.X[rows].toarray())
    labels = other.obs["perturbation"].astype(str).to_numpy()
    np.testing.assert_array_equal(again.obs["perturbation"].astype(str).to_numpy(), labels[rows])
    assert checksum(path) == before


def test_prepare_reuses_an_unchanged_input(tiny, tmp_path, caplog):
    path = h5ad(tiny, tmp_path / "in.h5ad")
    with ps.cluster.using("synchronous"):
        ps.io.prepare(path, perturbation_column="perturbation", control_label="control", out=tmp_path / "s.zarr")
    with caplog.at_level(logging.INFO, logger="pertscale.io._prepare"):
        with ps.cluster.using("synchronous"):
            ps.io.prepare(path, perturbation_column="perturbation", control_label="control", out=tmp_path / "s.zarr")
    assert "reusing the working store" in caplog.text


def test_fingerprint_covers_the_content(tiny, tmp_path):
    from pertscale.io._prepare import fingerprint

    path = h5ad(tiny, tmp_path / "in.h5ad")
    first = fingerprint(path, matrix="X")
    _replace_keeping_size_and_mtime(path, _same_size_other_content(tiny, "matrix"))
    second = fingerprint(path, matrix="X")
    assert {k: v for k, v in first.items() if k != "content"} == {k: v for k, v in second.items() if k != "content"}
    assert first["content"] != second["content"]
    content = fingerprint(write_zarr(tiny, tmp_path / "in.zarr"), matrix="X")["content"]
    assert fingerprint(write_zarr(tiny, tmp_path / "again.zarr"), matrix="X")["content"] == content  # not the path
    other = write_zarr(_same_size_other_content(tiny, "matrix"), tmp_path / "other.zarr")
    assert fingerprint(other, matrix="X")["content"] != content


def test_cli_rebuilds_for_an_input_replaced_with_the_same_size_and_mtime(tiny, tmp_path):
    path = h5ad(tiny, tmp_path / "in.h5ad")
    store = tmp_path / "ws.zarr"
    first = _invoke(path, tmp_path / "out1", "--working-store", str(store))
    assert first.exit_code == 0, first.output
    other = _same_size_other_content(tiny, "matrix")
    _replace_keeping_size_and_mtime(path, other)
    before = checksum(path)
    again = _invoke(path, tmp_path / "out2", "--working-store", str(store))
    assert again.exit_code == 0, again.output
    assert checksum(path) == before
    fresh_input = h5ad(other, tmp_path / "fresh.h5ad")
    fresh = _invoke(fresh_input, tmp_path / "out3")
    assert fresh.exit_code == 0, fresh.output
    got = ad.read_h5ad(tmp_path / "out2" / "de_wilcoxon.h5ad")
    want = ad.read_h5ad(tmp_path / "out3" / "de_wilcoxon.h5ad")
    stale = ad.read_h5ad(tmp_path / "out1" / "de_wilcoxon.h5ad")
    np.testing.assert_allclose(got.layers["scores"], want.layers["scores"], rtol=1e-6, equal_nan=True)
    assert not np.allclose(got.layers["scores"], stale.layers["scores"], equal_nan=True)


# ---------------------------------------------------------------- 2. a flipped bit in a zarr chunk


def _checksummed_input(tiny, path: Path) -> Path:
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    with ad.settings.override(auto_shard_zarr_v3=False):
        kwargs = {"chunks": (2_000,), "compressors": (ZstdCodec(level=0), Crc32cCodec())}
        ad.io.write_elem(group, "/", tiny, dataset_kwargs=kwargs)
    return path


FLIPPED = (
    r"cannot read rows .* of X in .*in\.zarr.* \(data chunk 'c/1'\): its CRC-32C checksum does not match.*"
    r"write or copy it again"
)


def test_cli_flipped_bit_in_a_checksummed_input_is_caught(tiny, tmp_path):
    store = _checksummed_input(tiny, tmp_path / "in.zarr")
    _flip_byte(store / "X" / "data" / "c" / "1")
    before = checksum(store)
    result = _invoke(store, tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert re.search(FLIPPED, result.output, flags=re.DOTALL), result.output
    assert "Traceback" not in result.output
    assert checksum(store) == before
    assert not (tmp_path / "out").exists()


def test_api_flipped_bit_in_a_checksummed_input_is_caught(tiny, tmp_path):
    store = _checksummed_input(tiny, tmp_path / "in.zarr")
    _flip_byte(store / "X" / "data" / "c" / "1")
    before = checksum(store)
    adata = ps.read(store)
    with pytest.raises(ps.io.DamagedStoreError, match=FLIPPED):
        ps.compute(adata, scheduler="synchronous")
    assert checksum(store) == before


def test_api_flipped_bit_in_a_checksummed_row_pointer_is_caught_on_opening(tiny, tmp_path, monkeypatch):
    store = _checksummed_input(tiny, tmp_path / "in.zarr")
    _flip_byte(store / "X" / "indptr" / "c" / "0")
    before = checksum(store)
    _forbid_passes(monkeypatch)
    with pytest.raises(ps.io.DamagedStoreError, match=r"row pointer .*indptr chunk 'c/0'.*CRC-32C.*write or copy"):
        ps.read(store)
    assert checksum(store) == before


def test_api_flipped_bit_in_checksummed_labels_is_named(tiny, tmp_path, monkeypatch):
    store = _checksummed_input(tiny, tmp_path / "in.zarr")
    _flip_byte(store / "obs" / "perturbation" / "codes" / "c" / "0")
    before = checksum(store)
    _forbid_passes(monkeypatch)
    with pytest.raises(ps.io.DamagedStoreError, match=r"'obs/perturbation/codes/c/0'.*CRC-32C checksum does not match"):
        ps.read(store)
    assert checksum(store) == before


def test_every_store_pertscale_writes_is_checksummed(tiny, tmp_path):
    path = h5ad(tiny, tmp_path / "in.h5ad")
    before = checksum(path)
    result = _invoke(path, tmp_path / "out", "--pca", "5")
    assert result.exit_code == 0, result.output
    written = [*sorted((tmp_path / "out").glob("*.zarr"))]
    assert {p.name for p in written} >= {"de_wilcoxon.zarr", "pca.zarr", "working_store.zarr"}
    a = ps.read(path)
    written.append(ps.write(a, tmp_path / "w.zarr", scheduler="synchronous"))
    with ps.cluster.using("synchronous"):
        written.append(ps.io.convert(path, tmp_path / "c.zarr"))
    for store in written:
        assert _unchecksummed_arrays(store) == [], store
    assert checksum(path) == before


def test_flipped_bit_in_a_results_store_fails_loudly(tiny, tmp_path):
    path = h5ad(tiny, tmp_path / "in.h5ad")
    result = _invoke(path, tmp_path / "out")
    assert result.exit_code == 0, result.output
    store = tmp_path / "out" / "de_wilcoxon.zarr"
    np.testing.assert_allclose(
        ps.get.dataset(store)["scores"].values, ad.read_h5ad(tmp_path / "out" / "de_wilcoxon.h5ad").layers["scores"]
    )
    _flip_byte(next(p for p in (store / "layers" / "scores" / "c").rglob("*") if p.is_file()))
    with pytest.raises(ValueError, match=r"checksum do not match"):
        ps.get.dataset(store)["scores"].load()
    with pytest.raises(ValueError, match=r"checksum do not match"):
        ad.read_zarr(store)


def test_flipped_bit_in_a_written_store_fails_loudly(tiny, tmp_path):
    out = ps.write(tiny, tmp_path / "w.zarr")
    _flip_byte(out / "X" / "data" / "c" / "0")
    with pytest.raises(ps.io.DamagedStoreError, match=r"data chunk 'c/0'\): its CRC-32C checksum does not match"):
        ps.compute(ps.read(out), scheduler="synchronous")


def test_flipped_bit_in_the_working_store_is_caught_and_rewritten(tiny, tmp_path):
    path = h5ad(tiny, tmp_path / "in.h5ad")
    store = tmp_path / "sorted.zarr"
    with ps.cluster.using("synchronous"):
        good = _sorted_rows(ps.io.prepare(path, perturbation_column="perturbation", control_label="control", out=store))
    _flip_byte(store / "blocks" / "0" / "data" / "c" / "0")
    with ps.cluster.using("synchronous"):
        again = ps.io.prepare(
            path, perturbation_column="perturbation", control_label="control", out=store
        )  # sizes unchanged
    with pytest.raises(
        ps.io.DamagedStoreError,
        match=r"block 0 of the working store .* is damaged \(its data array cannot be read \(data chunk 'c/0'\): "
        r"its CRC-32C checksum does not match.*written again",
    ):
        _sorted_rows(again)
    with ps.cluster.using("synchronous"):
        rebuilt = ps.io.prepare(path, perturbation_column="perturbation", control_label="control", out=store)
    np.testing.assert_array_equal(_sorted_rows(rebuilt), good)


# ---------------------------------------------------------------- 3. absent chunks of an obs label column


def _control_first_not_category_zero(tiny) -> ad.AnnData:
    """Control cells in rows 0-99, 'control' not the first category: their codes chunk is never legitimately absent."""
    a = tiny[np.argsort(tiny.obs["perturbation"].astype(str) != "control", kind="stable")].copy()
    cats = [c for c in a.obs["perturbation"].cat.categories if c != "control"] + ["control"]
    a.obs["perturbation"] = a.obs["perturbation"].cat.reorder_categories(cats)
    return a


def _absent_control_chunk(tiny, tmp_path) -> Path:
    store = write_zarr(_control_first_not_category_zero(tiny), tmp_path / "in.zarr", chunks=100)
    os.remove(store / "obs" / "perturbation" / "codes" / "c" / "0")
    return store


ABSENT = (
    r"control_label 'control' not found in obs\['perturbation'\].*1 chunk\(s\) of obs\['perturbation'\] are absent "
    r"from the zarr store .*'obs/perturbation/codes/c/0'.*100 cells read as 'P0000'.*incompletely copied"
)


def test_cli_absent_label_chunk_is_named_when_the_control_is_not_found(tiny, tmp_path, monkeypatch):
    store = _absent_control_chunk(tiny, tmp_path)
    before = checksum(store)
    _forbid_passes(monkeypatch)
    result = _invoke(store, tmp_path / "out")
    monkeypatch.undo()
    assert result.exit_code == 1, result.output
    assert re.search(ABSENT, result.output, flags=re.DOTALL), result.output
    assert checksum(store) == before
    assert not (tmp_path / "out").exists()


def test_api_absent_label_chunk_is_named_when_the_control_is_not_found(tiny, tmp_path, monkeypatch):
    store = _absent_control_chunk(tiny, tmp_path)
    before = checksum(store)
    _forbid_passes(monkeypatch)
    with pytest.warns(UserWarning, match=r"absent"), pytest.raises(ValueError, match=ABSENT):
        ps.io.prepare(store, perturbation_column="perturbation", control_label="control", out=tmp_path / "s.zarr")
    assert checksum(store) == before
    assert not (tmp_path / "s.zarr").exists()


def test_absent_chunk_of_the_perturbation_column_warns(tiny, tmp_path):
    store = write_zarr(tiny, tmp_path / "in.zarr", chunks=100)
    os.remove(store / "obs" / "perturbation" / "codes" / "c" / "1")
    before = checksum(store)
    adata = ps.read(store)  # no warning: read does not know which column holds the perturbations
    with pytest.warns(
        UserWarning,
        match=r"1 chunk\(s\) of obs\['perturbation'\] are absent .*'obs/perturbation/codes/c/1'\): their 100 cells "
        r"read as 'control'.*copied or written incompletely",
    ):
        ps.pp.filter_perturbations(adata, perturbation_column="perturbation", control_label="control")
    assert checksum(store) == before


def test_cli_absent_chunk_of_the_perturbation_column_warns_once(tiny, tmp_path):
    store = write_zarr(tiny, tmp_path / "in.zarr", chunks=100)
    os.remove(store / "obs" / "perturbation" / "codes" / "c" / "1")
    before = checksum(store)
    result = _invoke(store, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert re.search(r"warning: 1 chunk\(s\) of obs\['perturbation'\] are absent", result.output), result.output
    assert result.output.count("are absent from the zarr store") == 1
    assert checksum(store) == before


def test_absent_chunk_of_another_column_is_not_reported(tiny, tmp_path):
    store = write_zarr(tiny, tmp_path / "in.zarr", chunks=100)
    os.remove(store / "obs" / "target_gene" / "codes" / "c" / "1")
    adata = ps.read(store)
    # warnings are errors: none is given
    ps.pp.filter_perturbations(adata, perturbation_column="perturbation", control_label="control")


# ---------------------------------------------------------------- 4. float16 and complex matrices


def _float16_dense(tmp, tiny):
    a = tiny.copy()
    a.X = a.X.toarray().astype(np.float16)
    return h5ad(a, tmp / "in.h5ad")


def _complex_sparse(tmp, tiny):
    a = tiny.copy()
    a.X = sp.csr_matrix(a.X, dtype=np.complex64)
    return h5ad(a, tmp / "in.h5ad")


def _float16_sparse_data(tmp, tiny):
    path = h5ad(tiny, tmp / "in.h5ad")
    with h5py.File(path, "a") as f:  # as another writer may store it: a CSR whose values are float16
        data = f["X/data"][()].astype(np.float16)
        del f["X/data"]
        f["X/data"] = data
    return path


def _float16_layer(tmp, tiny):
    a = tiny.copy()
    a.layers["counts"] = a.X.toarray().astype(np.float16)
    return h5ad(a, tmp / "in.h5ad")


DTYPES = {
    "float16-dense": (_float16_dense, (), r"holds float16 values; pertscale reads integer, float32 or float64"),
    "complex-sparse": (_complex_sparse, (), r"holds complex64 values.*keep their real part"),
    "float16-sparse": (_float16_sparse_data, (), r"X holds float16 values.*adata\.X = adata\.X\.astype\(np\.float32\)"),
    "float16-layer": (
        _float16_layer,
        ("--layer", "counts"),
        r"layers/counts holds float16.*adata\.layers\['counts'\] = adata\.layers\['counts'\]\.astype\(np\.float32\)",
    ),
}


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_cli_unsupported_dtype_is_refused_at_once(name, tiny, tmp_path, monkeypatch):
    build, extra, message = DTYPES[name]
    path = build(tmp_path, tiny)
    before = checksum(path)
    _forbid_passes(monkeypatch)
    result = _invoke(path, tmp_path / "out", *extra)
    monkeypatch.undo()
    assert result.exit_code == 1, result.output
    assert re.search(message, result.output, flags=re.DOTALL), result.output
    assert "astype(np.float32)" in result.output and "Traceback" not in result.output
    assert checksum(path) == before


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_api_unsupported_dtype_is_refused_when_opened(name, tiny, tmp_path, monkeypatch):
    build, extra, message = DTYPES[name]
    path = build(tmp_path, tiny)
    before = checksum(path)
    _forbid_passes(monkeypatch)
    with pytest.raises(ValueError, match=message):
        ps.read(path, layer=extra[1] if extra else None)
    assert checksum(path) == before


# ---------------------------------------------------------------- 5. unknown extensions


def test_write_refuses_an_unknown_extension(tiny, tmp_path, monkeypatch):
    _forbid_passes(monkeypatch)
    for name in ("x.csv", "x"):
        with pytest.raises(ValueError, match=r"is not a format pertscale writes; end the path with \.h5ad .*\.zarr"):
            ps.write(tiny, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_convert_refuses_an_unknown_extension(tiny, tmp_path, monkeypatch):
    path = h5ad(tiny, tmp_path / "in.h5ad")
    before = checksum(path)
    _forbid_passes(monkeypatch)
    with pytest.raises(ValueError, match=r"cannot convert to .*x\.csv.*'\.csv' is not a format.*\.h5ad .*\.zarr"):
        ps.io.convert(path, tmp_path / "x.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]
    assert checksum(path) == before


def test_write_accepts_the_formats_in_any_case(tiny, tmp_path):
    back = ps.read(ps.write(tiny, tmp_path / "X.H5AD"))
    assert back.shape == tiny.shape


# ---------------------------------------------------------------- 6. ps.get.dataset on the command line's files


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_dataset_opens_the_cli_results(suffix, tiny, tmp_path):
    path = h5ad(tiny, tmp_path / "in.h5ad")
    before = checksum(path)
    result = _invoke(path, tmp_path / "out", "--method", "wilcoxon,t-test")
    assert result.exit_code == 0, result.output
    want = ad.read_h5ad(tmp_path / "out" / "de_t_test.h5ad")
    for method in (None, "t-test"):
        ds = ps.get.dataset(tmp_path / "out" / f"de_t_test{suffix}", method=method)
        assert ds.attrs["method"] == "t-test"
        assert list(ds.perturbation.values) == list(want.obs_names)
        np.testing.assert_allclose(ds["scores"].values, want.layers["scores"], equal_nan=True)
    assert ps.get.dataset(tmp_path / "out" / f"de_wilcoxon{suffix}", "wilcoxon", control_label="control").sizes == {
        "perturbation": 4,
        "gene": 40,
    }
    with pytest.raises(ValueError, match=r"these are the results of 'wilcoxon', not 't-test'; pass method='wilcoxon'"):
        ps.get.dataset(tmp_path / "out" / f"de_wilcoxon{suffix}", method="t-test")
    with pytest.raises(ValueError, match=r"computed with control_label='control', not as asked"):
        ps.get.dataset(tmp_path / "out" / f"de_wilcoxon{suffix}", control_label="NT")
    assert checksum(path) == before


# ---------------------------------------------------------------- 7. prepare(out=...) and an excluded control


PREPARE_REFUSED = {
    "out-is-the-h5ad-input": (lambda t, p, z: p, r"the working store \(out=\) .* would overwrite the input"),
    "out-is-the-zarr-input": (lambda t, p, z: z, r"would overwrite the input.*choose a path outside"),
    "out-inside-the-zarr-input": (lambda t, p, z: z / "sorted.zarr", r"lies inside the input"),
    "out-holds-the-input": (lambda t, p, z: t, r"would replace the directory that holds the input"),
}


@pytest.mark.parametrize("name", sorted(PREPARE_REFUSED))
def test_prepare_refuses_an_out_that_would_touch_the_input(name, tiny, tmp_path, monkeypatch):
    where, message = PREPARE_REFUSED[name]
    path = h5ad(tiny, tmp_path / "in.h5ad")
    store = write_zarr(tiny, tmp_path / "in.zarr")
    source = store if "zarr" in name else path
    before = checksum(source)
    _forbid_passes(monkeypatch)
    with pytest.raises(ValueError, match=message):
        ps.io.prepare(
            source, perturbation_column="perturbation", control_label="control", out=where(tmp_path, path, store)
        )
    assert checksum(source) == before


def test_prepare_refuses_an_excluded_control(tiny, tmp_path, monkeypatch):
    path = h5ad(tiny, tmp_path / "in.h5ad")
    before = checksum(path)
    _forbid_passes(monkeypatch)
    with pytest.raises(ValueError, match=r"exclude_labels \(--exclude-labels\) includes the control label 'control'"):
        ps.io.prepare(
            path,
            perturbation_column="perturbation",
            control_label="control",
            exclude_labels=["multiple", "control"],
            out=tmp_path / "s.zarr",
        )
    assert checksum(path) == before
    assert not (tmp_path / "s.zarr").exists()


def test_cli_working_store_on_the_input_is_refused(tiny, tmp_path, monkeypatch):
    path = h5ad(tiny, tmp_path / "in.h5ad")
    before = checksum(path)
    _forbid_passes(monkeypatch)
    result = _invoke(path, tmp_path / "out", "--working-store", str(path))
    monkeypatch.undo()
    assert result.exit_code != 0, result.output
    assert re.search(r"would overwrite the input", result.output), result.output
    assert checksum(path) == before


def test_store_marker_records_the_content(tiny, tmp_path):
    path = h5ad(tiny, tmp_path / "in.h5ad")
    with ps.cluster.using("synchronous"):
        ps.io.prepare(path, perturbation_column="perturbation", control_label="control", out=tmp_path / "s.zarr")
    recorded = json.loads((tmp_path / "s.zarr" / "pertscale_working_store.json").read_text())["fingerprint"]
    assert len(recorded["content"]) == 64 and recorded["perturbation_column"] == "perturbation"
    shutil.rmtree(tmp_path / "s.zarr")

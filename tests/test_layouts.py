"""Every common input layout gives the main job the same results: h5ad CSR/CSC/dense, layers, raw/X, zarr v2/v3."""

from __future__ import annotations

import hashlib
import warnings

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import zarr

import pertscale as ps

from .conftest import assert_close

OPTIONS = {"perturbation_column": "perturbation", "control_label": "control", "scheduler": "synchronous"}


def _layouts(adata, tmp_path) -> dict[str, tuple]:
    """name -> (path, read options): the same counts stored every way anndata stores them."""
    import anndata as ad

    out = {}
    counts = adata.X.tocsr()

    def save(name, obj, suffix=".h5ad", zarr_format=None):
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".h5ad":
            obj.write_h5ad(path)
        else:
            with ad.settings.override(zarr_write_format=zarr_format), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # anndata: v2 will stop being its default
                obj.write_zarr(path)
        return path

    out["csr"] = (save("csr", adata), {})
    csc = adata.copy()
    csc.X = sp.csc_matrix(counts)
    out["csc"] = (save("csc", csc), {})
    dense = adata.copy()
    dense.X = counts.toarray()
    out["dense"] = (save("dense", dense), {})
    floats = adata.copy()
    floats.X = counts.astype(np.float32)
    out["float counts"] = (save("floats", floats), {})
    layered = adata.copy()
    layered.layers["counts"] = counts
    layered.X = sp.csr_matrix(np.log1p(counts.toarray()))
    out["layer"] = (save("layer", layered), {"layer": "counts"})
    raw = adata.copy()
    raw.raw = adata.copy()
    raw.X = sp.csr_matrix(np.log1p(counts.toarray()))
    out["raw/X"] = (save("raw", raw), {"use_raw": True})
    out["zarr v2"] = (save("v2", adata, ".zarr", 2), {})
    out["zarr v3"] = (save("v3", adata, ".zarr", 3), {})
    wide = save("int64", adata)
    with h5py.File(wide, "a") as f:  # indptr as 64-bit, as anndata writes it past 2**31 non-zeros
        indptr = f["X/indptr"][:].astype(np.int64)
        del f["X/indptr"]
        f["X"].create_dataset("indptr", data=indptr)
    out["int64 indptr"] = (wide, {})
    return out


@pytest.fixture(scope="module")
def layouts(sim_adata, tmp_path_factory):
    return _layouts(sim_adata, tmp_path_factory.mktemp("layouts"))


@pytest.fixture(scope="module")
def reference(layouts, tmp_path_factory):
    path, read = layouts["csr"]
    out = tmp_path_factory.mktemp("ref") / "csr"
    ps.run(path, out, progress=False, **OPTIONS, **read)
    return zarr.open_group(str(out / "de_wilcoxon.zarr"), mode="r")


@pytest.mark.parametrize(
    "name", ["csc", "dense", "float counts", "layer", "raw/X", "zarr v2", "zarr v3", "int64 indptr"]
)
def test_every_layout_gives_the_same_results(layouts, reference, tmp_path, name):
    path, read = layouts[name]
    with h5py.File(layouts["int64 indptr"][0]) as f:
        assert f["X/indptr"].dtype == np.int64
    for fmt in (2, 3):  # the stores are what they say
        assert zarr.open_group(str(layouts[f"zarr v{fmt}"][0]), mode="r").metadata.zarr_format == fmt
    ps.run(path, tmp_path / "out", progress=False, **OPTIONS, **read)
    got = zarr.open_group(str(tmp_path / "out" / "de_wilcoxon.zarr"), mode="r")
    assert list(got["layers"].keys()) == list(reference["layers"].keys())
    for stat in reference["layers"].keys():
        assert_close(np.asarray(got["layers"][stat]), np.asarray(reference["layers"][stat]), err_msg=f"{name}: {stat}")
    copy = tmp_path / "out" / "input_csr.zarr"
    assert copy.exists() == (name == "csc")  # a CSC input is transposed once, out of core, into a CSR copy
    if name == "csc":
        made = (copy / ".pertscale-input.json").stat().st_mtime_ns
        ps.run(path, tmp_path / "out", progress=False, overwrite=True, **OPTIONS, **read)
        assert (copy / ".pertscale-input.json").stat().st_mtime_ns == made  # reused while the input is unchanged
        settings = zarr.open_group(str(tmp_path / "out" / "de_wilcoxon.zarr"), mode="r")["uns/pertscale/settings"]
        assert settings["input"][()] == str(path.resolve())  # the input recorded, not the copy


def test_convert_transposes_csc_out_of_core_and_copies_between_formats(sim_adata, tmp_path, monkeypatch):
    import anndata as ad

    import pertscale.io._convert as convert_module

    monkeypatch.setattr(convert_module, "SLAB_ENTRIES", 2_000)  # many slabs: the transposition is exercised
    expected = sim_adata.X.tocsr()
    csc = sim_adata.copy()
    csc.X = sp.csc_matrix(expected)
    csc.obsm["X_umap"] = np.arange(2 * csc.n_obs, dtype=float).reshape(-1, 2)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    before = hashlib.sha256((tmp_path / "csc.h5ad").read_bytes()).hexdigest()
    with ps.cluster.using("synchronous"):
        as_zarr = ps.io.convert(tmp_path / "csc.h5ad", tmp_path / "csr.zarr")
        back = ps.io.convert(as_zarr, tmp_path / "csr.h5ad", compression="lzf")
    for path in (as_zarr, back):
        got = ad.read_zarr(path) if path.suffix == ".zarr" else ad.read_h5ad(path)
        assert sp.isspmatrix_csr(got.X) and got.X.has_sorted_indices
        assert (got.X != expected).nnz == 0 and got.X.dtype == expected.dtype
        np.testing.assert_array_equal(got.obsm["X_umap"], csc.obsm["X_umap"])
        assert list(got.obs["perturbation"]) == list(sim_adata.obs["perturbation"])
    with h5py.File(back) as f:
        assert f["X/data"].compression == "lzf"
    assert not list(tmp_path.glob(".*transpose*"))  # the memory-mapped files are gone
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ps.io.convert(tmp_path / "csc.h5ad", back)
    with pytest.raises(ValueError, match="would overwrite the input"):
        ps.io.convert(back, back, overwrite=True)
    assert hashlib.sha256((tmp_path / "csc.h5ad").read_bytes()).hexdigest() == before  # the input is unchanged

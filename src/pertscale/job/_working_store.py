"""Where the main job keeps what it makes from the input: the working store and the CSR copy of a CSC input.

An input stored in barcode order is sorted once by :func:`pertscale.io.prepare`
into the working store (default ``out/working_store.zarr``); a matrix
stored by columns is transposed once by :func:`pertscale.io.convert` into a
CSR copy beside it. Both are reused while the input is unchanged. This
module checks, before any pass, that they can go where they are asked to
(not onto ``out``, an output or the input; on a writable disk), and makes
the CSR copy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..io import convert
from ..io._atomic import replacing
from ..io._convert import stored_matrix
from ..io._prepare import MARKER, fingerprint
from ..io._write import check_not_input
from ._output import OUTPUT_NAMES, unwritable

logger = logging.getLogger(__name__)

#: The working store's name inside the output directory, unless given.
WORKING_STORE = "working_store.zarr"
#: The CSR copy of a CSC input, beside the working store.
CSR_COPY = "input_csr.zarr"
#: The record, inside the CSR copy, of the input it was made from.
CSR_RECORD = ".pertscale-input.json"


def csc_nonzeros(path: Path, *, layer, use_raw) -> int | None:
    """The non-zeros of a matrix stored by columns (CSC), from its column pointer; ``None`` for other layouts."""
    stored = stored_matrix(path, layer=layer, use_raw=use_raw)
    if stored.encoding != "csc_matrix":
        return None
    elem, handle = stored.open()
    try:
        return int(elem["indptr"][-1])
    finally:
        if handle is not None:
            handle.close()


def csr_copy(path: Path, copy: Path, *, layer, use_raw) -> Path | None:
    """A CSR copy of a CSC input (made once, out of core, and reused while the input is unchanged), else ``None``.

    Every pass reads rows; a matrix stored by columns would have each pass
    read all its columns to re-block them. :func:`pertscale.io.convert`
    transposes it once instead.
    """
    if stored_matrix(path, layer=layer, use_raw=use_raw).encoding != "csc_matrix":
        return None
    fp = fingerprint(path, matrix=layer or ("raw" if use_raw else "X"))
    record = copy / CSR_RECORD
    if record.exists() and json.loads(record.read_text()) == fp:
        logger.info("reusing the CSR copy %s of the CSC input", copy)
        return copy
    logger.info("the input stores its matrix by columns (CSC): transposing it once into %s", copy)
    convert(path, copy, layer=layer, use_raw=use_raw, overwrite=True)
    with replacing(record) as tmp:
        tmp.write_text(json.dumps(fp))
    return copy


def check_working_store(store: Path, out: Path, source: Path, *, given: bool, uses_store: bool, csc: bool) -> None:
    """Refuse a working store that is ``out``, holds it, is where an output goes, or would touch the input.

    Raises
    ------
    ValueError
        Naming both paths and the fix.
    """
    what = "--working-store" if given else f"the working store (default: {WORKING_STORE} in --out)"
    s, o = store.resolve(), out.resolve()
    if s == o:
        raise ValueError(
            f"--working-store {str(store)!r} is --out itself; the working store is a directory of its own, rebuilt "
            f"when the input changes: leave --working-store out (it goes to {str(out / WORKING_STORE)!r}) or give "
            "another path"
        )
    if s in o.parents:
        raise ValueError(
            f"--out {str(out)!r} lies inside --working-store {str(store)!r}, which is rebuilt when the input "
            "changes; choose a --working-store that does not hold --out"
        )
    for name in sorted(OUTPUT_NAMES):
        if s == o / name or o / name in s.parents:
            raise ValueError(
                f"--working-store {str(store)!r} is where the job writes {name} in --out; choose another path"
            )
    if uses_store:
        check_not_input(store, [source], what=what)
        if csc:
            check_not_input(store.parent / CSR_COPY, [source], what=f"the CSR copy of the CSC input, beside {what},")


def store_refusal(store: Path, out: Path, *, uses_store: bool, probe: bool) -> str | None:
    """Why the working store (or the CSR copy beside it) cannot be written, or ``None``.

    Not asked when no store is written, when a complete one is there
    (reused), or when it goes straight into ``out`` (checked with it).
    """
    if not uses_store or store.parent.resolve() == out.resolve() or store_complete(store):
        return None
    where = next((p for p in (store, *store.parents) if p.exists()), Path("."))
    reason = unwritable(where, probe=probe)
    if reason is None:
        return None
    return (
        f"cannot write the working store {str(store)!r} ({str(where)!r}: {reason}); "
        "choose a --working-store on a writable disk, or leave it out (it then goes into --out)"
    )


def store_complete(store: Path) -> bool:
    """Whether a complete working store is at ``store`` (its record says so)."""
    try:
        return bool(json.loads((store / MARKER).read_text()).get("complete"))
    except (OSError, ValueError):
        return False

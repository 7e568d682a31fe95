"""Atomic replacement of a file or a directory: write it beside its place, then rename it into place.

Every writer in pertscale that must never leave a torn file behind (``.h5ad``
and ``.zarr`` results, the main job's tables and manifest, the working
store's blocks, spill pieces and record, simulated screens) writes into a
temporary sibling, ``.NAME.tmp-XXXXXXXX`` in the same directory, and renames
it onto ``NAME`` once the writing succeeded: one ``os.replace``, so a reader
sees the old file or the new one, never a part. A directory cannot be
renamed over another one: the old one is first moved aside
(``.NAME.old-XXXXXXXX``), put back if the rename fails, and removed after.
When the writing fails, the temporary sibling is removed; a killed process
can leave it behind (hidden, never read).

>>> with replacing(path) as tmp:        # doctest: +SKIP
...     frame.to_csv(tmp, index=False)  # path is replaced only if this succeeds
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["remove", "replace", "replacing", "sibling"]


def sibling(path: str | Path, tag: str = "tmp") -> Path:
    """A new hidden name beside ``path``: ``.NAME.TAG-XXXXXXXX`` (8 random hex digits)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


def remove(path: str | Path) -> None:
    """Remove a file, a link or a directory tree at ``path``, if there is one."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace(tmp: str | Path, path: str | Path) -> None:
    """Rename ``tmp`` onto ``path``, replacing what is there: a file in one rename, a directory in two.

    A directory (as ``tmp``, or at ``path``) cannot be renamed over what is
    at ``path``: that is moved aside first, and removed once ``tmp`` took
    its place.

    Raises
    ------
    OSError
        If a rename fails; what was moved aside is put back first.
    """
    tmp, path = Path(tmp), Path(path)
    is_dir = lambda p: p.is_dir() and not p.is_symlink()  # noqa: E731
    if not os.path.lexists(path) or not (is_dir(tmp) or is_dir(path)):
        os.replace(tmp, path)
        return
    old = sibling(path, "old")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        os.replace(old, path)
        raise
    remove(old)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (a file or a directory); rename it onto ``path`` on success.

    Nothing is created here: the block creates the file or directory at the
    yielded path. When the block raises (or is interrupted), ``path`` is
    left as it was and the temporary sibling is removed.

    Yields
    ------
    pathlib.Path
        ``.NAME.tmp-XXXXXXXX`` in ``path``'s directory (the same file
        system, so the rename is atomic).
    """
    tmp = sibling(path)
    try:
        yield tmp
        replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            remove(tmp)

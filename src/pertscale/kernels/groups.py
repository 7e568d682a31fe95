"""Groups of consecutive rows: their pointers, and how they pack into row blocks.

Pure numpy; used by the kernels that walk a block group by group and by the
orchestration that cuts a matrix into blocks of whole groups
(:mod:`pertscale.tl._engine`, :mod:`pertscale.io._prepare`).
"""

from __future__ import annotations

import numpy as np


def group_pointers(group_sizes: np.ndarray) -> np.ndarray:
    """``(n_groups + 1,)`` int64 first row of each group, then the number of rows (``[0, cumsum(sizes)]``)."""
    return np.concatenate([[0], np.cumsum(np.asarray(group_sizes, dtype=np.int64))]).astype(np.int64)


def pack_groups(sizes: np.ndarray, budget: int) -> tuple[int, ...]:
    """Rows per block when consecutive groups of ``sizes`` are packed into blocks of about ``budget``.

    A group is never split: a block closes before the group that would take
    it over ``budget``, and a group longer than ``budget`` is a block alone.
    """
    blocks: list[int] = []
    current = 0
    for s in np.asarray(sizes).tolist():
        if current and current + s > budget:
            blocks.append(current)
            current = 0
        current += s
    if current or not blocks:
        blocks.append(current)
    return tuple(blocks)

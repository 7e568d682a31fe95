"""Input checks shared by the analyses: columns, labels, groups."""

from __future__ import annotations

import numpy as np
import pandas as pd

_SHOW = 20


def _listing(values) -> str:
    values = [str(v) for v in values]
    shown = ", ".join(repr(v) for v in values[:_SHOW])
    return shown + (f", ... ({len(values)} in all)" if len(values) > _SHOW else "")


def get_matrix(adata, layer: str | None):
    """``adata.X`` or ``adata.layers[layer]``.

    Raises
    ------
    KeyError
        If the layer is missing; the message lists the layers there are.
    ValueError
        If ``X`` is empty.
    """
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is empty; pass layer= to use a layer")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} not found; layers present: {list(adata.layers)}")
    return adata.layers[layer]


def perturbation_labels(obs: pd.DataFrame, perturbation_column: str) -> pd.Series:
    """The perturbation column of ``obs`` as strings.

    Raises
    ------
    KeyError
        If the column is missing; the message lists the columns there are.
    ValueError
        If it has missing values.
    """
    if perturbation_column not in obs.columns:
        raise KeyError(
            f"perturbation_column {perturbation_column!r} not found in obs; columns present: {_listing(obs.columns)}"
        )
    labels = obs[perturbation_column]
    if labels.isna().any():
        raise ValueError(
            f"obs[{perturbation_column!r}] has {int(labels.isna().sum())} missing labels; "
            "label them (e.g. 'unassigned') and exclude them, or drop those cells"
        )
    return labels.astype(str)


def check_control(labels: pd.Series, control_label: str, perturbation_column: str, *, min_cells: int = 2) -> np.ndarray:
    """Boolean mask of the control cells.

    Raises
    ------
    ValueError
        If the label is not present (the message lists the labels seen) or
        fewer than ``min_cells`` cells carry it.
    """
    mask = (labels == str(control_label)).to_numpy()
    if not mask.any():
        seen = labels.value_counts().index
        raise ValueError(
            f"control_label {control_label!r} not found in obs[{perturbation_column!r}]; labels seen: {_listing(seen)}"
        )
    if mask.sum() < min_cells:
        raise ValueError(
            f"only {int(mask.sum())} cell(s) labelled {control_label!r} in obs[{perturbation_column!r}]; "
            f"at least {min_cells} control cells are needed to test against control"
        )
    return mask

"""Input checks shared by the analyses: numbers, columns, labels, groups, shapes.

Every public function validates its input here before it builds a graph, so
that a bad argument fails at once, with a message that names the problem and
the fix, and never after a pass over the matrix.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

_SHOW = 20


def _listing(values) -> str:
    values = [str(v) for v in values]
    shown = ", ".join(repr(v) for v in values[:_SHOW])
    return shown + (f", ... ({len(values)} in all)" if len(values) > _SHOW else "")


def check_number(
    value,
    name: str,
    *,
    integer: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    allow_none: bool = False,
    flag: str | None = None,
    why: str | None = None,
):
    """A finite number within bounds, or an error that names it.

    Parameters
    ----------
    value
        The number to check.
    name
        The parameter's name in the Python API.
    integer
        Require an integer (``2.0`` is accepted as ``2``; ``2.5`` and
        booleans are not).
    minimum, maximum
        Inclusive bounds.
    min_open
        Make the lower bound exclusive (``value > minimum``).
    max_open
        Make the upper bound exclusive (``value < maximum``).
    allow_none
        Accept ``None`` (returned as it is).
    flag
        The command-line flag of the same option, named in the message.
    why
        Why the bounds are what they are, said after an out-of-bounds value.

    Returns
    -------
    int or float or None
        ``value`` as a Python ``int`` (``integer=True``) or ``float``.

    Raises
    ------
    TypeError
        If ``value`` is not a real number (or ``None`` where not allowed).
    ValueError
        If it is NaN, infinite, not an integer where one is needed, or out
        of bounds.
    """
    label = f"{name} ({flag})" if flag else name
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{label} must be a number, got None")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{label} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{label} must be a finite number, got {value!r}")
    given = value
    if integer:
        # an int is whole as it is (float(10**30) is not 10**30: compare as floats only what is a float)
        if not isinstance(value, numbers.Integral) and not float(value).is_integer():
            raise ValueError(f"{label} must be a whole number, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    below = value <= minimum if (minimum is not None and min_open) else minimum is not None and value < minimum
    above = value >= maximum if (maximum is not None and max_open) else maximum is not None and value > maximum
    if below or above:
        low = "" if minimum is None else (f"> {minimum}" if min_open else f">= {minimum}")
        high = "" if maximum is None else (f"< {maximum}" if max_open else f"<= {maximum}")
        raise ValueError(
            f"{label} must be {' and '.join(b for b in (low, high) if b)}, got {given!r}" + (f": {why}" if why else "")
        )
    return value


#: ``target_sum`` between these (see :func:`check_target_sum` for where they come from).
TARGET_SUM_RANGE = (1e-28, 1e37)


def check_target_sum(value, *, flag: str | None = "--target-sum", allow_none: bool = False):
    """``target_sum`` of ``normalize_total``: a number whose normalized values float32 holds.

    The bounds come from the arithmetic of
    :func:`pertscale.kernels.qc.normalize_rows` (scanpy's): each count ``x``
    of a cell with ``t`` counts is divided by the cell's factor
    ``t / target_sum``, both in float32, so the values lie between
    ``target_sum / t_max`` (one count in the largest cell) and ``target_sum``
    (a cell with all its counts in one gene). Nothing is lost while the
    factor and the values are normal float32 numbers, between
    ``tiny = 1.18e-38`` and ``max = 3.40e38``:

    - the factor, for ``1 <= t <= t_max``: ``t_max / target_sum <= max`` and
      ``1 / target_sum >= tiny``, so ``target_sum <= 1 / tiny = 8.5e37``;
    - the values: ``target_sum <= max`` and ``target_sum / t_max >= tiny``,
      so ``target_sum >= t_max * tiny``.

    With ``t_max = 2**31`` counts in one cell (single-cell libraries hold
    about 1e6 UMIs), ``target_sum`` lies between 2.5e-29 and 8.5e37, taken
    inwards to powers of ten: :data:`TARGET_SUM_RANGE`. Beyond, normalizing
    breaks without an error: at 1e300, ``float32(target_sum)`` is infinite,
    every factor 0 (then set to 1) and normalization a no-op; at 1e-300 it
    is 0, every factor infinite and every value 0. Everything downstream is
    float64 (the log1p values, at most ``ln(1e37) = 85``; HVG's ``expm1``
    and squares; PCA's Gram matrix; the t-test's variances; the pseudo-bulk
    sums), so the float32 step is the one that binds. float64 matrices stay
    float64 and could go further; one range keeps the API and the command
    line alike.

    Parameters
    ----------
    value
        The number (``None`` too with ``allow_none``: the median total).
    flag
        The command-line flag named in the message.
    allow_none
        Accept ``None``.

    Returns
    -------
    float or None

    Raises
    ------
    TypeError
        If it is not a number.
    ValueError
        If it is not finite, not above 0, or outside :data:`TARGET_SUM_RANGE`.
    """
    value = check_number(value, "target_sum", minimum=0, min_open=True, allow_none=allow_none, flag=flag)
    low, high = TARGET_SUM_RANGE
    if value is not None and not low <= value <= high:
        label = f"target_sum ({flag})" if flag else "target_sum"
        raise ValueError(
            f"{label} must be between {low:g} and {high:g}, got {value!r}: beyond, the normalized values (float32, "
            "as scanpy computes them) leave float32's range, and normalization silently becomes a no-op (too "
            "large) or sets every value to 0 (too small); 1e4 is usual"
        )
    return value


#: A key written to, then removed from, a view's ``uns``: anndata's copy-on-write makes the view actual.
_ACTUALIZE = "pertscale_actualize"


def as_actual(adata) -> None:
    """Make a view of an AnnData an actual AnnData before an in-place function writes to it.

    A write to a view otherwise reaches its parent: anndata's ``X`` setter
    writes into the parent's matrix (in the parent's dtype, so normalized
    counts are truncated to integers), and the nested dictionaries of a
    view's ``uns`` are the parent's own. A write to one of a view's mappings
    is anndata's public copy-on-write: the view becomes an actual AnnData
    holding a copy of its data (lazy matrices stay lazy), with anndata's
    ``ImplicitModificationWarning``, and the parent is left as it was, as
    scanpy's in-place functions do with views. Does nothing to an actual
    AnnData.
    """
    if adata.is_view:
        adata.uns[_ACTUALIZE] = True
        del adata.uns[_ACTUALIZE]


def log1p_record(adata, layer: str | None) -> dict | None:
    """How ``X`` or a layer was log1p-transformed (``{'base': ...}``), or ``None`` if it is not marked.

    ``X``'s record is scanpy's ``uns['log1p']``; a layer's is
    ``uns['pertscale']['log1p_layers'][layer]`` (written by
    :func:`pertscale.pp.log1p`), so logging a layer does not mark ``X``.
    """
    if layer is None:
        record = adata.uns.get("log1p")
    else:
        record = ((adata.uns.get("pertscale") or {}).get("log1p_layers") or {}).get(layer)
    if record is None:
        return None
    return dict(record) if isinstance(record, Mapping) else {}


def label_list(values, name: str) -> list[str]:
    """Labels given as one string or an iterable of them, as a list of strings.

    A plain string is one label, not a sequence of one-letter labels.

    Raises
    ------
    TypeError
        If ``values`` is neither a string nor an iterable.
    """
    if values is None:
        return []
    if isinstance(values, (str, bytes, numbers.Number)):
        return [str(values)]
    if not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a label or a list of labels, got {values!r}")
    return [str(v) for v in values]


def check_shape(adata, what: str = "the matrix") -> None:
    """Refuse a matrix without cells or without genes.

    Raises
    ------
    ValueError
        If ``n_obs`` or ``n_vars`` is zero.
    """
    n_obs, n_vars = adata.shape
    if n_obs == 0:
        raise ValueError(f"{what} has no cells (n_obs = 0, n_vars = {n_vars}); there is nothing to analyse")
    if n_vars == 0:
        raise ValueError(f"{what} has no genes (n_vars = 0, n_obs = {n_obs}); there is nothing to analyse")


def unique_var_names(var: pd.DataFrame, *, column: str = "original_var_name") -> pd.DataFrame:
    """``var`` with unique names: repeats get ``-1``, ``-2``, ... as anndata's ``var_names_make_unique``.

    The original names are kept in ``var[column]`` and a warning says how
    many names repeated. ``var`` is returned unchanged when its names are
    already unique.
    """
    names = var.index.astype(str)
    if names.is_unique:
        return var
    import anndata as ad

    repeated = names[names.duplicated(keep=False)].value_counts()
    made = ad.utils.make_index_unique(pd.Index(names))
    out = var.copy()
    out.index = made
    if column not in out.columns:
        out[column] = np.asarray(names, dtype=object)
    examples = ", ".join(f"{k!r} x{v}" for k, v in repeated.head(5).items())
    warnings.warn(
        f"{len(repeated)} gene name(s) occur more than once ({examples}); they were made unique by "
        f"appending '-1', '-2', ... (anndata's var_names_make_unique) and the original names are in "
        f"var[{column!r}]",
        UserWarning,
        stacklevel=3,
    )
    return out


def obs_categorical(obs: pd.DataFrame, column: str, *, what: str, fix: str) -> pd.Categorical:
    """An ``obs`` column as a ``pandas.Categorical`` (its own categories if it is one), every cell labelled.

    Parameters
    ----------
    obs
        The cells' table.
    column
        The column.
    what
        What the column is to the caller (``"groupby column"``, ``"batch_key"``), named in the errors.
    fix
        What to do about missing labels, said after the count.

    Raises
    ------
    KeyError
        If the column is missing; the message lists the columns there are.
    ValueError
        If some cells have no label.
    """
    if column not in obs.columns:
        raise KeyError(f"{what} {column!r} not found in obs; columns present: {list(obs.columns)}")
    values = obs[column]
    n_missing = int(values.isna().sum())
    if n_missing:
        raise ValueError(f"obs[{column!r}] has {n_missing:,} cells with a missing label (of {len(obs):,}); {fix}")
    return values.array if isinstance(values.dtype, pd.CategoricalDtype) else pd.Categorical(values.to_numpy())


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
    # one string object per distinct label, shared by its cells (8 bytes a cell, not a new string each)
    if isinstance(labels.dtype, pd.CategoricalDtype):
        codes, uniques = labels.cat.codes.to_numpy(), labels.cat.categories
    else:
        codes, uniques = pd.factorize(labels.to_numpy())
    names = np.array([str(u) for u in uniques], dtype=object)
    as_str = pd.Series(names[codes] if names.size else np.empty(0, dtype=object), index=labels.index, name=labels.name)
    _check_distinct_as_strings(labels, as_str, perturbation_column)
    as_str.attrs = dict(obs.attrs)  # what pertscale.read found in the store (absent label chunks), for the checks
    warn_absent_chunks(obs, perturbation_column)
    return as_str


def _check_distinct_as_strings(labels: pd.Series, as_str: pd.Series, perturbation_column: str) -> None:
    """Refuse labels that become one label as strings (the integer 1 and the string '1')."""
    if isinstance(labels.dtype, pd.CategoricalDtype):
        originals = pd.Series(labels.cat.categories)
    elif labels.dtype == object:
        originals = pd.Series(pd.unique(labels.to_numpy()))
    else:
        return  # one numeric or string dtype: distinct values stay distinct as strings
    keyed = pd.DataFrame({"label": originals.astype(str), "value": [(_kind(v), v) for v in originals]})
    clashes = keyed.groupby("label")["value"].nunique()
    clashes = clashes[clashes > 1]
    if len(clashes):
        shown = "; ".join(
            " and ".join(f"{v!r} ({t})" for t, v in keyed.loc[keyed["label"] == lab, "value"]) for lab in clashes.index
        )
        raise ValueError(
            f"obs[{perturbation_column!r}] holds labels that are different values but the same text: {shown}; "
            "they would be merged into one group. Convert the column to strings yourself so each label is "
            f"what you mean, e.g. adata.obs[{perturbation_column!r}] = adata.obs[{perturbation_column!r}].map(str) "
            "after renaming one of them"
        )


def _kind(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "float"
    return "str" if isinstance(value, str) else type(value).__name__


def check_writable_labels(labels: Iterable[str], perturbation_column: str) -> None:
    """Refuse perturbation labels that no results file can hold.

    Raises
    ------
    ValueError
        For an empty (or whitespace-only) label, or one with a NUL character
        (HDF5 strings cannot hold it).
    """
    bad = [lab for lab in labels if not lab.strip() or "\x00" in lab]
    if bad:
        raise ValueError(
            f"obs[{perturbation_column!r}] has label(s) that cannot name a result: {_listing(bad)} "
            "(empty, blank or containing a NUL character); rename them (e.g. to 'unassigned', "
            "then exclude them with exclude_labels / --exclude-labels if they are not perturbations)"
        )


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
            + absent_chunks_note(labels, perturbation_column)
        )
    if mask.sum() < min_cells:
        raise ValueError(
            f"only {int(mask.sum())} cell(s) labelled {control_label!r} in obs[{perturbation_column!r}]; "
            f"at least {min_cells} control cells are needed to test against control"
            + absent_chunks_note(labels, perturbation_column)
        )
    return mask


# --------------------------------------------------------------------------- absent chunks of obs labels

#: The ``obs.attrs`` key under which :func:`pertscale.read` records label columns of a zarr store with absent chunks.
ABSENT_CHUNKS = "pertscale_absent_chunks"
#: Stores and columns warned about in this process (one warning each, however often the labels are read).
_WARNED: set[tuple] = set()



def _absent_record(frame_or_labels, column: str) -> dict | None:
    record = (getattr(frame_or_labels, "attrs", None) or {}).get(ABSENT_CHUNKS) or {}
    return record.get(str(column))


def _chunk_list(record: dict) -> str:
    keys = record["chunks"]
    return ", ".join(repr(k) for k in keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")


def absent_chunks_note(labels, column: str) -> str:
    """For an error about ``column``'s labels: ``"; obs['gene'] ... absent chunk(s) ..."``, or ``""``.

    ``labels`` is ``obs`` or the labels read from it (their ``attrs`` carry
    what :func:`pertscale.read` found).
    """
    record = _absent_record(labels, column)
    if not record:
        return ""
    return (
        f". Note: {len(record['chunks'])} chunk(s) of obs[{str(column)!r}] are absent from the zarr store "
        f"{record['store']!r} ({_chunk_list(record)}), so their {record['cells']:,} cells read as "
        f"{record['reads_as']!r}; the likely cause is an incompletely copied or written store: copy or write it "
        "again (zarr leaves out only chunks whose cells all carry that label)"
    )


def warn_absent_chunks(obs, column: str) -> None:
    """Warn (once per store and column) when the labels of ``column`` come from absent zarr chunks."""
    import warnings

    record = _absent_record(obs, column)
    if not record:
        return
    seen = (record["store"], str(column), tuple(record["chunks"]))
    if seen in _WARNED:
        return
    _WARNED.add(seen)
    warnings.warn(
        f"{len(record['chunks'])} chunk(s) of obs[{str(column)!r}] are absent from the zarr store "
        f"{record['store']!r} ({_chunk_list(record)}): their {record['cells']:,} cells read as "
        f"{record['reads_as']!r}. zarr leaves out a chunk whose cells all carry that label, so this is right "
        "if they do; if the store was copied or written incompletely, those cells are mislabelled: copy or "
        "write it again",
        UserWarning,
        stacklevel=3,
    )

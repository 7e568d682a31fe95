"""Inference of the perturbation column, the control label and the gene-symbol column; label normalisation.

As crispyx's ``crispyx.data`` helpers (``detect_perturbation_column``,
``resolve_control_label``, ``detect_gene_symbol_column``,
``normalise_perturbation_labels``), with one difference: where two
candidates are equally likely, pertscale raises an error that lists them
instead of picking one, because a wrong control silently changes every
result.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import anndata as ad
import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

#: Control labels, compared case-insensitively with ``-``, ``_``, ``.`` and spaces removed.
CONTROL_ALIASES = (
    "non-targeting",
    "nontargeting",
    "non-target",
    "NT",
    "NTC",
    "control",
    "ctrl",
    "safe-targeting",
    "safe",
    "scramble",
    "scrambled",
    "negative-control",
    "neg-ctrl",
    "negctrl",
    "no-target",
    "targeting-control",
)
#: Names of perturbation columns (the same comparison).
PERTURBATION_COLUMNS = (
    "perturbation",
    "perturbations",
    "gene",
    "target",
    "target_gene",
    "gene_target",
    "targets",
    "perturbed_gene",
    "guide_target",
    "sgRNA_target",
    "condition",
)
#: Words that make a column name look like a perturbation column.
PERTURBATION_WORDS = ("perturb", "target", "gene", "guide", "sgrna", "knock")
#: Names of gene-symbol columns of ``var``.
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "symbol", "symbols", "gene_name", "gene_names", "feature_name")
ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}")


def _canon(text) -> str:
    return re.sub(r"[-_.\s]", "", str(text)).lower()


_CONTROL_CANON = frozenset(_canon(a) for a in CONTROL_ALIASES)


def is_control_alias(label) -> bool:
    """Whether ``label`` is one of :data:`CONTROL_ALIASES` (case, ``-``, ``_``, ``.`` and spaces ignored)."""
    return _canon(label) in _CONTROL_CANON


def _labels(values) -> list[str]:
    values = pd.Series(values)
    cats = values.cat.categories if isinstance(values.dtype, pd.CategoricalDtype) else values.dropna().unique()
    return [str(v) for v in cats]


def detect_control_label(labels, *, column: str = "perturbation") -> str:
    """The one label of ``labels`` that names control cells (:data:`CONTROL_ALIASES`).

    Parameters
    ----------
    labels
        The perturbation labels (a column of ``obs``, or its categories).
    column
        Named in the messages.

    Returns
    -------
    str
        The control label as written in the data (e.g. ``"Non-Targeting"``).

    Raises
    ------
    ValueError
        If no label or more than one label is a control name (the message
        lists the candidates, or the labels seen, and the option that fixes it).
    """
    seen = _labels(labels)
    found = [label for label in seen if is_control_alias(label)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(
            f"no control label found in obs[{column!r}] (looked for {', '.join(CONTROL_ALIASES)}, in any case); "
            f"labels seen: {', '.join(map(repr, seen[:20]))}{' ...' if len(seen) > 20 else ''}. "
            "Pass it: --control-label / control_label="
        )
    raise ValueError(
        f"obs[{column!r}] has several control labels: {', '.join(map(repr, found))}; pick one with "
        "--control-label / control_label=, or merge them (ps.io.normalise_perturbation_labels)"
    )


def _score(name: str, values: pd.Series, control_label: str | None, n_obs: int) -> int:
    if not (
        isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object or pd.api.types.is_string_dtype(values)
    ):
        return 0
    labels = _labels(values)
    if control_label is not None:
        if str(control_label) not in labels:
            return 0
    elif not any(is_control_alias(label) for label in labels):
        return 0  # a perturbation column must hold the control cells
    score = 2 + 2  # text, with a control
    canon = _canon(name)
    if canon in {_canon(a) for a in PERTURBATION_COLUMNS}:
        score += 3
    elif any(word in canon for word in PERTURBATION_WORDS):
        score += 1
    if 2 <= len(labels) <= max(5_000, n_obs // 2):
        score += 1
    return score


def detect_perturbation_column(adata: ad.AnnData, *, control_label: str | None = None) -> str:
    """The ``obs`` column that names each cell's perturbation.

    A candidate is a text or categorical column holding a control label
    (``control_label`` when given, else one of :data:`CONTROL_ALIASES`);
    candidates score higher for a perturbation-like name (``perturbation``,
    ``gene``, ``target_gene``, ...: +3; containing ``perturb``, ``target``,
    ``gene``, ``guide``: +1) and a plausible number of labels (+1), as
    crispyx scores them.

    Parameters
    ----------
    adata
        Only ``obs`` is read.
    control_label
        The control label, when known.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        If no column qualifies, or several score the same and hold
        different labels (the message lists them and the option that fixes it).
    """
    obs = adata.obs
    scores = {c: _score(c, obs[c], control_label, adata.n_obs) for c in obs.columns}
    best = max(scores.values(), default=0)
    if best == 0:
        what = f"the control label {control_label!r}" if control_label is not None else "a control label"
        raise ValueError(
            f"no obs column holds {what}; columns: {', '.join(map(repr, obs.columns))}. "
            "Pass it: --perturbation-column / perturbation_column="
        )
    top = [c for c, s in scores.items() if s == best]
    distinct = {c: tuple(obs[c].astype(str)) for c in top}
    if len(set(distinct.values())) > 1:
        raise ValueError(
            f"several obs columns could name the perturbations: {', '.join(map(repr, top))}; pick one with "
            "--perturbation-column / perturbation_column="
        )
    return top[0]


def detect_gene_symbol_column(adata: ad.AnnData) -> str | None:
    """The ``var`` column of gene symbols, or ``None`` when ``var_names`` are symbols already (or none is found).

    A column qualifies by name (:data:`SYMBOL_COLUMNS`) and by values that
    are not Ensembl identifiers; it is only looked for when most
    ``var_names`` are Ensembl identifiers (``ENSG...``, ``ENSMUSG...``).
    """
    names = pd.Index(adata.var_names.astype(str))
    if names.size == 0 or np.mean([bool(ENSEMBL.match(n)) for n in names[:1000]]) < 0.5:
        return None
    for col in adata.var.columns:
        if _canon(col) in {_canon(a) for a in SYMBOL_COLUMNS}:
            values = adata.var[col].astype(str)
            if np.mean([not ENSEMBL.match(v) for v in values[:1000]]) > 0.5:
                return col
    return None


def infer_columns(adata: ad.AnnData, *, control_label: str | None = None) -> dict[str, str | None]:
    """Perturbation column, control label and gene-symbol column, each inferred (see the functions above).

    Returns
    -------
    dict
        ``perturbation_column``, ``control_label``, ``gene_symbol_column``
        (``None``: ``var_names`` are used).

    Raises
    ------
    ValueError
        As :func:`detect_perturbation_column` and :func:`detect_control_label`.
    """
    column = detect_perturbation_column(adata, control_label=control_label)
    label = control_label if control_label is not None else detect_control_label(adata.obs[column], column=column)
    return {
        "perturbation_column": column,
        "control_label": str(label),
        "gene_symbol_column": detect_gene_symbol_column(adata),
    }


def normalise_perturbation_labels(
    labels,
    *,
    strip_prefixes: Iterable[str] = (),
    strip_suffixes: Iterable[str] = (),
    strip_suffix_regex: str | None = None,
    control_aliases: Iterable[str] = (),
    canonical_control: str = "control",
    multiple_separators: Iterable[str] = (",", ";", "|"),
    multiple_label: str = "multiple",
) -> pd.Series:
    """Perturbation labels cleaned up: prefixes and suffixes stripped, controls merged, multiple-guide cells marked.

    In order, as crispyx's ``normalise_perturbation_labels``: strip each of
    ``strip_prefixes`` (e.g. ``["sg-", "sg"]``) and ``strip_suffixes``
    (``["_KO", "-P1P2"]``), apply ``strip_suffix_regex`` (removed where it
    matches), turn every control name (:data:`CONTROL_ALIASES` and
    ``control_aliases``, in any case) into ``canonical_control``; then
    labels holding one of ``multiple_separators`` (cells with guides for
    several genes, ``"MYC,GATA1"``) become ``multiple_label``, which the
    main job excludes by default. Missing values stay missing.

    Parameters
    ----------
    labels
        A column of ``obs`` (``pandas.Series``) or a sequence of labels.
    strip_prefixes, strip_suffixes
        Removed from the start and the end of each label, in the order given.
    strip_suffix_regex
        A regular expression removed wherever it matches (``"-P[0-9]+$"``).
    control_aliases
        More names of the control, besides :data:`CONTROL_ALIASES`.
    canonical_control
        What every control name becomes.
    multiple_separators, multiple_label
        A label holding one of the separators becomes ``multiple_label``
        (``()`` turns this off; add ``"+"`` for ``"MYC+GATA1"``-style pairs).

    Returns
    -------
    pandas.Series
        Categorical, same index as ``labels``; assign it back
        (``adata.obs["perturbation"] = ps.io.normalise_perturbation_labels(...)``).
        crispyx's default canonical control is ``"NTC"``; pass
        ``canonical_control="NTC"`` for the same labels.
    """
    series = pd.Series(labels)
    text = series.astype("string")
    for prefix in strip_prefixes:
        text = text.str.removeprefix(prefix)
    for suffix in strip_suffixes:
        text = text.str.removesuffix(suffix)
    if strip_suffix_regex:
        text = text.str.replace(strip_suffix_regex, "", regex=True)
    extra = {_canon(a) for a in control_aliases}
    known = text.notna().to_numpy()
    is_control = np.zeros(len(text), dtype=bool)
    is_control[known] = [is_control_alias(v) or _canon(v) in extra for v in text[known]]
    text = text.mask(is_control, canonical_control)
    separators = [re.escape(s) for s in multiple_separators]
    if separators:
        several = text.str.contains("|".join(separators), regex=True).fillna(value=False).astype(bool)
        text = text.mask(several, multiple_label)
    return text.astype(object).where(text.notna(), np.nan).astype("category")

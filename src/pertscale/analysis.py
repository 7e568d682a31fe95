"""Frozen settings of every analysis: what a result is keyed by in the result store.

Each analysis has one settings model (pydantic, frozen, extra fields
refused) that groups the function's options, with its defaults. The data
the result also depends on (the matrix, the columns the options name) are
fingerprinted by :mod:`pertscale.store`, not part of the settings. nb-glm's
``size_factor_method`` and ``dispersion_method`` say how the size factors and
dispersions it finds stored were made (checked where recorded; the test
computes neither). The public functions take plain keyword arguments and
build their model; the model is the key under which the result is stored
(:mod:`pertscale.store`), so calling again with equal settings reuses the
stored result. Models compare by value, hash, print as
``WilcoxonSettings(method='wilcoxon', perturbation_column='gene', ...)``
and turn into a string key and back::

    >>> s = ps.WilcoxonSettings(perturbation_column="gene", control_label="NT")
    >>> s == ps.WilcoxonSettings.from_key(s.key())
    True

Options that do not change a result (``scheduler``, ``progress``,
``key_added``, ``inplace``) are not settings. Arrays given where a column
name is expected (nb-glm's ``size_factors=`` or ``dispersions=``) are
recorded by a digest of their bytes, ``"array:<sha1 prefix>"``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal
from urllib.parse import unquote

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

#: Separates the class name from the settings' JSON in a stored key.
KEY_SEPARATOR = "::"
#: Characters percent-encoded in a key ('%' first, so that decoding is exact).
_ENCODED = ("%", "/", "\\")


class AnalysisSettings(BaseModel):
    """Base of the settings models: frozen, compared by value, keyed as ``ClassName::{json}``."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    #: The public function that runs the analysis (dotted path under ``pertscale``).
    function: ClassVar[str] = ""
    #: Settings fields whose function argument has another name.
    argument_names: ClassVar[dict[str, str]] = {}
    #: Fields derived from the data, not arguments of the function.
    derived: ClassVar[tuple[str, ...]] = ()
    #: Whether the function takes the analysis name as its ``method`` argument (the tests do).
    method_is_argument: ClassVar[bool] = False
    #: Numeric fields checked as the functions check them (:func:`pertscale._validation.check_number` options).
    numbers: ClassVar[dict[str, dict[str, Any]]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _check_numbers(cls, value, info: ValidationInfo):
        """Numbers are checked by the same rules and with the same messages as the functions' own checks."""
        rule = cls.numbers.get(info.field_name or "")
        if rule is None:
            return value
        from ._validation import check_number

        return check_number(value, info.field_name, **rule)

    def key(self) -> str:
        r"""The settings as a string: ``ClassName::{sorted JSON}``, a valid name for an HDF5 or zarr group.

        ``%``, ``/`` and ``\\`` inside it are percent-encoded (``%25``, ``%2F``,
        ``%5C``): HDF5 and zarr read the last two as path separators.
        """
        text = json.dumps(json.loads(self.model_dump_json()), sort_keys=True, separators=(",", ":"))
        for char in _ENCODED:
            text = text.replace(char, f"%{ord(char):02X}")
        return f"{type(self).__name__}{KEY_SEPARATOR}{text}"

    @staticmethod
    def from_key(key: str) -> AnalysisSettings:
        """The settings object a :meth:`key` was made from.

        Raises
        ------
        ValueError
            If ``key`` is not a settings key of a known analysis.
        """
        name, sep, text = key.partition(KEY_SEPARATOR)
        cls = SETTINGS_CLASSES.get(name)
        if not sep or cls is None:
            raise ValueError(f"{key[:80]!r} is not a pertscale settings key (known: {sorted(SETTINGS_CLASSES)})")
        return cls.model_validate_json(unquote(text))

    def __str__(self) -> str:
        """``ClassName(field=value, ...)``."""
        return repr(self)

    def call_args(self) -> dict[str, Any]:
        """Keyword arguments of :attr:`function` that reproduce this analysis (edit them to vary it)."""
        args = {}
        for field in type(self).model_fields:
            if (field == "method" and not self.method_is_argument) or field in self.derived:
                continue
            value = getattr(self, field)
            if isinstance(value, tuple):
                value = list(value)
            args[self.argument_names.get(field, field)] = value
        return args

    def differences(self, other: AnalysisSettings) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ, as ``{field: (this, other)}`` (``None`` for a field one side lacks)."""
        mine, theirs = self.model_dump(), other.model_dump()
        return {
            k: (mine.get(k), theirs.get(k)) for k in dict.fromkeys([*mine, *theirs]) if mine.get(k) != theirs.get(k)
        }


Pair = float | tuple[float, float]


class DESettings(AnalysisSettings):
    """Options shared by the tests of every perturbation against control (:func:`pertscale.tl.rank_genes_groups`)."""

    function: ClassVar[str] = "tl.rank_genes_groups"
    #: the field keeps its earlier name so that stored keys stay valid; the argument is the current one
    argument_names: ClassVar[dict[str, str]] = {"min_cells": "min_cells_per_perturbation"}
    method_is_argument: ClassVar[bool] = True

    perturbation_column: str
    control_label: str
    perturbations: tuple[str, ...] | None = None
    layer: str | None = None
    corr_method: Literal["benjamini-hochberg", "bonferroni"] = "benjamini-hochberg"
    alternative: Literal["two-sided", "greater", "less"] = "two-sided"
    min_pct: Pair = 0.0
    min_mean: Pair = 0.0
    min_cells: int = 2
    #: cells flagged in ``obs['knockdown_escaper']`` (:func:`pertscale.tl.knockdown`) left out of their groups
    exclude_escapers: bool = False

    numbers: ClassVar[dict[str, dict[str, Any]]] = {"min_cells": {"integer": True, "minimum": 1}}


class WilcoxonSettings(DESettings):
    """Wilcoxon rank-sum test against control, or against the rest of the cells."""

    method: Literal["wilcoxon"] = "wilcoxon"
    #: ``None`` only with ``reference="rest"``: every label is tested against the rest
    control_label: str | None = None
    tie_correct: bool = True
    use_continuity: bool = False
    #: against the control cells, or every other cell (scanpy's ``reference="rest"``)
    reference: Literal["control", "rest"] = "control"


class TTestSettings(DESettings):
    """Welch's t-test against control or the rest of the cells (``"t-test_overestim_var"``: scanpy's variant)."""

    method: Literal["t-test", "t-test_overestim_var"] = "t-test"
    #: ``None`` only with ``reference="rest"``: every label is tested against the rest
    control_label: str | None = None
    #: against the control cells, or every other cell (scanpy's ``reference="rest"``)
    reference: Literal["control", "rest"] = "control"


class NBGLMSettings(DESettings):
    """Negative-binomial GLM Wald test against control, DESeq2's model, apeGLM shrinkage."""

    method: Literal["nb-glm"] = "nb-glm"
    size_factors: str = "size_factors"
    size_factor_method: str = "sparse"
    dispersions: str | None = None
    dispersion_method: str = "cox-reid"
    covariates: tuple[str, ...] = ()
    shrink: bool = True
    lfc_base: str = "log2"


class QCSettings(AnalysisSettings):
    """The filters of :func:`pertscale.pp.qc_summary` (the main job's)."""

    function: ClassVar[str] = "pp.qc_summary"

    method: Literal["qc"] = "qc"
    perturbation_column: str
    control_label: str | None = None
    min_genes: int = 20
    min_cells_per_perturbation: int = 20
    min_cells_per_gene: int = 3
    exclude_labels: tuple[str, ...] = ("multiple", "unassigned")

    numbers: ClassVar[dict[str, dict[str, Any]]] = {
        name: {"integer": True, "minimum": 0}
        for name in ("min_genes", "min_cells_per_perturbation", "min_cells_per_gene")
    }


class HVGSettings(AnalysisSettings):
    """Highly variable genes (:func:`pertscale.pp.highly_variable_genes`)."""

    function: ClassVar[str] = "pp.highly_variable_genes"

    method: Literal["hvg"] = "hvg"
    flavor: Literal["seurat", "cell_ranger", "seurat_v3"] = "seurat"
    n_top_genes: int | None = None
    min_mean: float = 0.0125
    max_mean: float = 3.0
    min_disp: float = 0.5
    max_disp: float = float("inf")
    n_bins: int = 20
    span: float = 0.3
    layer: str | None = None
    batch_key: str | None = None
    control_only: bool = False
    perturbation_column: str | None = None
    control_label: str | None = None

    numbers: ClassVar[dict[str, dict[str, Any]]] = {
        "n_top_genes": {"integer": True, "minimum": 1, "allow_none": True},
        "n_bins": {"integer": True, "minimum": 1},
        "span": {"minimum": 0, "maximum": 1, "min_open": True},
        **{name: {} for name in ("min_mean", "max_mean", "min_disp")},
    }


class PCASettings(AnalysisSettings):
    """Principal components (:func:`pertscale.pp.pca`).

    ``solver`` is the function's ``method``; ``genes`` a digest of
    ``var['highly_variable']`` when it selects the genes (another selection
    is another result), derived from the data rather than passed.
    """

    function: ClassVar[str] = "pp.pca"
    argument_names: ClassVar[dict[str, str]] = {"solver": "method"}
    derived: ClassVar[tuple[str, ...]] = ("genes",)

    method: Literal["pca"] = "pca"
    n_comps: int = 50
    use_highly_variable: bool | None = None
    solver: Literal["auto", "covariance", "randomized"] = "auto"
    layer: str | None = None
    n_oversamples: int = 50
    n_iter: int = 6
    random_state: int = 0
    genes: str | None = None

    numbers: ClassVar[dict[str, dict[str, Any]]] = {
        "n_comps": {"integer": True, "minimum": 1},
        "n_oversamples": {"integer": True, "minimum": 0},
        "n_iter": {"integer": True, "minimum": 0},
    }


class PseudobulkSettings(AnalysisSettings):
    """Pseudo-bulk profiles (:func:`pertscale.pb.pseudobulk`)."""

    function: ClassVar[str] = "pb.pseudobulk"
    argument_names: ClassVar[dict[str, str]] = {"groupby": "perturbation_column"}

    method: Literal["pseudobulk"] = "pseudobulk"
    groupby: tuple[str, ...] = ("perturbation",)
    layer: str | None = None
    target_sum: float = 1e4

    numbers: ClassVar[dict[str, dict[str, Any]]] = {"target_sum": {"minimum": 0, "min_open": True}}


class CalibrationSettings(AnalysisSettings):
    """Calibration check of a test on control-only pseudo-perturbations (:func:`pertscale.tl.calibration_check`).

    ``test`` is the function's ``method``; ``guide_column`` and ``reference``
    are the resolved ones (``None``: random splits); ``test_options`` the
    options passed on to the test, as canonical JSON; ``inputs`` a digest of
    what the check reads beyond the matrix and the labels (the guides,
    nb-glm's size factors and dispersions), derived from the data.
    """

    function: ClassVar[str] = "tl.calibration_check"
    argument_names: ClassVar[dict[str, str]] = {"test": "method"}
    derived: ClassVar[tuple[str, ...]] = ("inputs",)

    method: Literal["calibration"] = "calibration"
    perturbation_column: str
    control_label: str
    test: Literal["wilcoxon", "t-test", "t-test_overestim_var", "nb-glm"] = "wilcoxon"
    reference: Literal["control", "rest"] = "rest"
    n_splits: int | None = None
    group_size: int | None = None
    guide_column: str | None = None
    fdr: float = 0.05
    min_nonzero: int = 0
    seed: int = 0
    layer: str | None = None
    test_options: str = "{}"
    inputs: str | None = None

    numbers: ClassVar[dict[str, dict[str, Any]]] = {
        "n_splits": {"integer": True, "minimum": 1, "allow_none": True},
        "group_size": {"integer": True, "minimum": 1, "allow_none": True},
        "fdr": {"minimum": 0, "maximum": 1, "min_open": True, "max_open": True},
        "min_nonzero": {"integer": True, "minimum": 0},
        "seed": {"integer": True, "minimum": 0},
    }

    def call_args(self) -> dict[str, Any]:
        """Arguments of :func:`pertscale.tl.calibration_check`: test options spread, random splits as ``False``."""
        args = super().call_args()
        args.update(json.loads(args.pop("test_options")))
        if args["guide_column"] is None:
            args["guide_column"] = False
        return args


class KnockdownSettings(AnalysisSettings):
    """Knock-down of each perturbation's own target and escaper flags (:func:`pertscale.tl.knockdown`)."""

    function: ClassVar[str] = "tl.knockdown"

    method: Literal["knockdown"] = "knockdown"
    perturbation_column: str
    control_label: str
    test: str = "wilcoxon"
    target_column: str | None = None
    targets: str | None = None
    layer: str | None = None
    fdr: float = 0.05
    min_control_detection: float = 0.5
    argument_names: ClassVar[dict[str, str]] = {"test": "method"}


class EnergyDistanceSettings(AnalysisSettings):
    """E-distance of each perturbation to control in an embedding and its E-test (:func:`pertscale.tl.energy_distance`).

    ``embedding`` identifies the values of ``obsm[obsm_key]`` (a lazy
    embedding by its Dask graph's name, one in memory by a digest of its
    bytes), derived from the data: a new PCA under the same key is another
    result. ``fdr`` is not a setting: it only checks that ``n_permutations``
    can reach it.
    """

    function: ClassVar[str] = "tl.energy_distance"
    derived: ClassVar[tuple[str, ...]] = ("embedding",)

    method: Literal["energy_distance"] = "energy_distance"
    perturbation_column: str
    control_label: str
    perturbations: tuple[str, ...] | None = None
    obsm_key: str = "X_pca"
    n_comps: int | None = None
    metric: Literal["sqeuclidean"] = "sqeuclidean"
    n_permutations: int = 1000
    control_subsample: int | None = None
    seed: int = 0
    sample_correct: bool = True
    embedding: str | None = None

    numbers: ClassVar[dict[str, dict[str, Any]]] = {
        "n_comps": {"integer": True, "minimum": 1, "allow_none": True},
        "n_permutations": {"integer": True, "minimum": 0},
        "control_subsample": {"integer": True, "minimum": 2, "allow_none": True},
        "seed": {"integer": True, "minimum": 0},
    }


class GuideAssignmentSettings(AnalysisSettings):
    """Guide assignment from guide UMI counts (:func:`pertscale.pp.assign_guides`).

    ``assignment`` is the function's ``method``; ``counts`` the ``obsm`` key
    or the resolved path of the guide counts (``"<AnnData>"`` for an AnnData
    given in memory). ``counts_token`` identifies the counts' values and
    ``guides`` is a digest of the guide ids, targets and labels used; both
    are derived from the data rather than passed. Options a method does not
    use are kept at their defaults (``threshold`` is ``"umi_threshold"``'s,
    ``min_fraction`` ``"max"``'s).
    """

    function: ClassVar[str] = "pp.assign_guides"
    argument_names: ClassVar[dict[str, str]] = {"assignment": "method"}
    derived: ClassVar[tuple[str, ...]] = ("counts_token", "guides")

    method: Literal["assign_guides"] = "assign_guides"
    assignment: Literal["umi_threshold", "max", "mixture"] = "umi_threshold"
    counts: str = "grna_counts"
    threshold: float = 5.0
    min_fraction: float = 0.5
    control_targets: tuple[str, ...] | None = None
    control_label: str = "control"
    collapse_targets: bool = False
    counts_token: str | None = None
    guides: str | None = None

    numbers: ClassVar[dict[str, dict[str, Any]]] = {
        "threshold": {"minimum": 0, "min_open": True},
        "min_fraction": {"minimum": 0, "maximum": 1},
    }


#: Settings model of each analysis, by class name (how keys name them).
SETTINGS_CLASSES: dict[str, type[AnalysisSettings]] = {
    cls.__name__: cls
    for cls in (
        WilcoxonSettings,
        TTestSettings,
        NBGLMSettings,
        QCSettings,
        HVGSettings,
        PCASettings,
        PseudobulkSettings,
        CalibrationSettings,
        KnockdownSettings,
        EnergyDistanceSettings,
        GuideAssignmentSettings,
    )
}

#: Settings model by analysis name (the ``method`` filter of the getters).
ANALYSES: dict[str, type[AnalysisSettings]] = {
    "wilcoxon": WilcoxonSettings,
    "t-test": TTestSettings,
    "t-test_overestim_var": TTestSettings,
    "nb-glm": NBGLMSettings,
    "qc": QCSettings,
    "hvg": HVGSettings,
    "pca": PCASettings,
    "pseudobulk": PseudobulkSettings,
    "calibration": CalibrationSettings,
    "knockdown": KnockdownSettings,
    "energy_distance": EnergyDistanceSettings,
    "assign_guides": GuideAssignmentSettings,
}


def array_digest(values) -> str:
    """``"array:<sha1 prefix>"``: how an array given as an option is recorded in settings."""
    arr = np.ascontiguousarray(np.asarray(values))
    digest = hashlib.sha1(arr.dtype.str.encode() + str(arr.shape).encode() + arr.tobytes()).hexdigest()
    return f"array:{digest[:16]}"


def build(cls: type[AnalysisSettings], **options) -> AnalysisSettings:
    """``cls(**options)``, with a :class:`ValueError` that names the option when one is not valid.

    Lists become tuples (settings must hash); numpy scalars become Python
    numbers.

    Raises
    ------
    ValueError
        Naming the option, the value given and what it must be.
    """
    clean = {k: _plain(v) for k, v in options.items()}
    try:
        return cls(**clean)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "value_error":  # our own check's message
            raise ValueError(str(first["ctx"]["error"])) from None
        field = ".".join(str(p) for p in first["loc"][:1]) or "option"
        raise ValueError(f"{field} {clean.get(field)!r} is not valid: {first['msg']}") from None


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple, np.ndarray)) and not isinstance(value, str):
        return tuple(_plain(v) for v in value)
    return value

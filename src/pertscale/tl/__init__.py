"""Tools: differential expression against control, knock-down, guides, per-perturbation effects, overlap, UMAP."""

from ..pp._neighbors import umap
from ._calibration import CalibrationResult, calibration_check
from ._effects import effect_table, write_long
from ._energy import energy_distance
from ._guide_level import guide_concordance, guide_labels, guide_targets
from ._knockdown import TARGET_COLUMNS, knockdown, knockdown_statistics, targets_from_obs
from ._nbglm import (
    covariate_levels,
    dispersions,
    fit_dispersion_prior,
    fit_dispersion_trend,
    fit_genewise_dispersions,
    fit_map_dispersions,
)
from ._overlap import compute_overlap
from ._rank_genes_groups import METHODS, rank_genes_groups
from ._results import check_results_writable, scanpy_uns, tidy, write_significant

__all__ = [
    "TARGET_COLUMNS",
    "CalibrationResult",
    "METHODS",
    "calibration_check",
    "check_results_writable",
    "compute_overlap",
    "covariate_levels",
    "dispersions",
    "effect_table",
    "energy_distance",
    "fit_dispersion_prior",
    "fit_dispersion_trend",
    "fit_genewise_dispersions",
    "fit_map_dispersions",
    "guide_concordance",
    "guide_labels",
    "guide_targets",
    "knockdown",
    "knockdown_statistics",
    "rank_genes_groups",
    "scanpy_uns",
    "tidy",
    "targets_from_obs",
    "umap",
    "write_long",
    "write_significant",
]

"""Negative-binomial GLM kernels: size factors, dispersions, the Wald test against a frozen control.

Pure functions of one in-memory block of raw counts (numpy, numba) or of
small per-gene arrays; nothing here knows about Dask. One module per step
of DESeq2's model (Love, Huber & Anders 2014), in the order they run:

- :mod:`.size_factors`: median-of-ratios size factors (DESeq2's
  ``estimateSizeFactors``, PyDESeq2's ``fit_size_factors``);
- :mod:`.dispersion`: gene-wise Cox-Reid estimates, the trend, the prior
  and the maximum a posteriori (PyDESeq2's ``fit_genewise_dispersions`` ->
  ``fit_dispersion_trend`` -> ``fit_dispersion_prior`` ->
  ``fit_MAP_dispersions``);
- :mod:`.glm`: the control fit, the Wald test of every perturbation and
  apeGLM's shrinkage.

Every public name is re-exported here.
"""

from ._additive import PIECE, REFERENCE, WHOLE, apl_block, apl_size, cox_reid_term, glm_block
from ._counts import check_counts
from ._score import BOUND
from .dispersion import (
    DIRECT_COUNT,
    MIN_DISP,
    CountColumns,
    count_columns,
    dispersion_apl_block,
    dispersion_moments_block,
    dispersion_prior,
    final_dispersions,
    fit_trend,
    starting_dispersions,
)
from .glm import NBGLM_STATS, NBControl, nb_control, nbglm_block, prior_variance
from .size_factors import (
    SIZE_FACTOR_METHODS,
    cell_size_factors,
    finish_size_factors,
    log_count_sums,
    reference_log_means,
)

__all__ = [
    "BOUND",
    "PIECE",
    "REFERENCE",
    "WHOLE",
    "apl_block",
    "apl_size",
    "cox_reid_term",
    "glm_block",
    "DIRECT_COUNT",
    "MIN_DISP",
    "NBGLM_STATS",
    "SIZE_FACTOR_METHODS",
    "CountColumns",
    "NBControl",
    "cell_size_factors",
    "check_counts",
    "count_columns",
    "dispersion_apl_block",
    "dispersion_moments_block",
    "dispersion_prior",
    "final_dispersions",
    "finish_size_factors",
    "fit_trend",
    "log_count_sums",
    "nb_control",
    "nbglm_block",
    "prior_variance",
    "reference_log_means",
    "starting_dispersions",
]

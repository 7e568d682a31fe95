"""Differential expression of every perturbation against control or the rest: the public call, the declared methods.

:func:`rank_genes_groups` checks its input, picks the test's
:class:`~pertscale.tl._engine.Method` and lets :mod:`pertscale.tl._engine`
build the graph; the arithmetic is in :mod:`pertscale.kernels` (one module
per test).
"""

from __future__ import annotations

import importlib.metadata
import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd

from .._deprecation import renamed_arguments
from .._memory import n_cores
from .._settings import settings
from .._validation import (
    check_control,
    check_number,
    check_shape,
    check_writable_labels,
    get_matrix,
    label_list,
    log1p_record,
    perturbation_labels,
)
from ..io._lazy import nbytes_in_memory
from ..io._read import as_dask
from ..kernels._common import ALTERNATIVES, CORR_METHODS, check_reference
from ..kernels.nbglm import NBGLM_STATS, nb_control, nbglm_block
from ..kernels.ttest import TTEST_STATS, control_moments, ttest_block
from ..kernels.wilcoxon import WILCOXON_STATS, control_statistics, wilcoxon_block
from ..variables import ESCAPER, LOGFOLDCHANGES, RENAMED_ARGUMENTS, RESULTS_VAR_NBGLM
from ._engine import Method, find_groups, test_against_control
from ._results import lazy_results

logger = logging.getLogger(__name__)


WILCOXON = Method(
    name="wilcoxon", statistics=WILCOXON_STATS, summarise=control_statistics, block=wilcoxon_block, rest=True
)
TTEST = Method(name="t-test", statistics=TTEST_STATS, summarise=control_moments, block=ttest_block, rest=True)
NBGLM = Method(name="nb-glm", statistics=NBGLM_STATS, summarise=nb_control, block=nbglm_block)
#: The tests against control, by ``method=`` name (scanpy's names, and ``nb-glm``).
METHODS = {"wilcoxon": WILCOXON, "t-test": TTEST, "t-test_overestim_var": TTEST, "nb-glm": NBGLM}


#: The label escapers carry with ``exclude_escapers``: neither tested nor the control.
ESCAPER_LABEL = "\x00escaper"


def _groups_column(adata: ad.AnnData, perturbation_column: str | None, groupby: str | None, control_label) -> str:
    """The ``obs`` column of the groups: ``perturbation_column`` or scanpy's ``groupby``; ``"guide"`` made if absent.

    Raises
    ------
    TypeError
        If neither or two different ones are given.
    KeyError
        For ``groupby="guide"`` without guide identities (naming the accepted inputs).
    """
    if groupby is not None and perturbation_column is not None and groupby != perturbation_column:
        raise TypeError(f"give perturbation_column= or groupby=, not both ({perturbation_column!r}, {groupby!r})")
    column = groupby if groupby is not None else perturbation_column
    if column is None:
        raise TypeError("rank_genes_groups needs perturbation_column= (the obs column of labels; scanpy's groupby=)")
    if groupby == "guide" and "guide" not in adata.obs:
        from ._guide_level import guide_labels

        if control_label is None:
            raise ValueError("groupby='guide' needs control_label= (the label the control cells get)")
        adata.obs["guide"] = pd.Categorical(guide_labels(adata, control_label=str(control_label)))
    return column


def _check_escapers(adata: ad.AnnData, reference: str) -> None:
    """``exclude_escapers`` needs the flags of :func:`pertscale.tl.knockdown` and a test against control."""
    if ESCAPER not in adata.obs:
        raise ValueError(
            f"exclude_escapers=True needs obs[{ESCAPER!r}]: run ps.tl.knockdown(adata, perturbation_column=..., "
            "control_label=...) first"
        )
    if reference != "control":
        raise ValueError("exclude_escapers=True tests against the control only (reference='control')")


def _warn_if_counts(adata: ad.AnnData, dtype: np.dtype, layer: str | None) -> None:
    """Warn when the matrix is not log1p data, from its dtype and its log1p mark: no data is read."""
    where = f"layers[{layer!r}]" if layer else "X"
    mark = "uns['log1p']" if layer is None else f"uns['pertscale']['log1p_layers'][{layer!r}]"
    if np.issubdtype(dtype, np.integer):
        reason = f"{where} holds integers: raw counts"
    elif log1p_record(adata, layer) is None:
        reason = f"{where} is not marked as log1p data ({mark} is missing)"
    else:
        return
    warnings.warn(
        f"{reason}, but rank_genes_groups expects log1p-normalized values: the test runs, but "
        "logfoldchanges would be wrong (they undo log1p). Run ps.pp.normalize_total(adata) and "
        "ps.pp.log1p(adata) first; if the values are log1p data already, set adata.uns['log1p'] = {'base': None}",
        UserWarning,
        stacklevel=3,
    )


@renamed_arguments(
    positional=("perturbation_column", "control_label"), renamed=RENAMED_ARGUMENTS["tl.rank_genes_groups"]
)
def rank_genes_groups(
    adata: ad.AnnData,
    *,
    perturbation_column: str | None = None,
    control_label: str | None = None,
    method: str = "wilcoxon",
    groupby: str | None = None,
    exclude_escapers: bool = False,
    reference: str = "control",
    perturbations: list[str] | None = None,
    layer: str | None = None,
    tie_correct: bool = True,
    use_continuity: bool = False,
    corr_method: str = "benjamini-hochberg",
    alternative: str = "two-sided",
    min_pct: float | tuple[float, float] = 0.0,
    min_mean: float | tuple[float, float] = 0.0,
    size_factors: str | np.ndarray = "size_factors",
    size_factor_method: str = "sparse",
    dispersions: str | np.ndarray | None = None,
    dispersion_method: str = "cox-reid",
    covariates: str | list[str] | None = None,
    shrink: bool = True,
    lfc_base: str = "log2",
    min_cells_per_perturbation: int = 2,
    scanpy_format: bool = False,
    key_added: str | None = None,
    force: bool = False,
) -> ad.AnnData:
    """Test every perturbation against the control cells (or against all other cells), every gene.

    Parameters
    ----------
    adata
        ``n_obs x n_vars``; ``X`` (or ``layers[layer]``) holds non-negative
        log1p-normalized expression (natural log, as after
        :func:`pertscale.pp.normalize_total` and :func:`pertscale.pp.log1p`),
        lazy (Dask) or in memory.
    perturbation_column
        Column of ``obs`` naming each cell's perturbation (keyword-only, as
        every option; given positionally, as in earlier releases, it is
        still taken for one release with a ``FutureWarning``).
    control_label
        Label of the control cells (e.g. non-targeting guides) in that column
        (keyword-only, likewise). Required with ``reference="control"``.
        With ``reference="rest"`` it is optional: given, the control cells
        are part of every group's rest and the control label is not tested
        unless listed in ``perturbations``; ``None`` (scanpy's behaviour,
        ``groups="all"``), every label is tested against the rest.
    method
        ``"wilcoxon"``: Wilcoxon rank-sum (Mann-Whitney U) test;
        ``"t-test"``: Welch's t-test; ``"t-test_overestim_var"``: scanpy's
        variant of it that puts the group's cell count in place of the
        control's (a larger control variance for small groups); ``"nb-glm"``:
        the negative-binomial GLM Wald test on raw counts (DESeq2's model,
        the control's intercept fitted once and frozen; see Notes).
    groupby
        scanpy's name: the ``obs`` column of the groups, in place of
        ``perturbation_column``. ``"guide"`` tests each guide against the
        control: when ``obs`` has no ``guide`` column one is made
        (:func:`pertscale.tl.guide_labels`: each cell's guide from a guide
        column such as ``guide_id`` or the ``perturbation_assigned_guide`` of
        :func:`pertscale.pp.assign_guides`, control cells as
        ``control_label``, ``multiple``/``unassigned`` kept) and written to
        ``obs['guide']``; without guide identities a ``KeyError`` says which
        inputs are accepted.
    exclude_escapers
        Leave out of their groups the cells that
        :func:`pertscale.tl.knockdown` flagged as escapers
        (``obs['knockdown_escaper']`` is True: the target not knocked down);
        the control is unchanged. Against control only.
    reference
        What each perturbation is compared with. ``"control"`` (default):
        the cells labelled ``control_label``. ``"rest"``: every other cell
        of ``adata`` (scanpy's default ``reference="rest"``, illico's
        ``reference=None``): the cells of all other labels, the control's and
        those of labels not tested (skipped or not listed in
        ``perturbations``) included; ``pts_rest`` and the fold changes are
        then of each group's rest. The summary of every cell is made once
        (as the control's is) and each group's own cells are taken out of it
        in the same single pass over the blocks: per-gene moments for the
        t-tests, the sorted distinct values for the Wilcoxon (whose size
        grows with the non-zero entries of the whole matrix, not of the
        control alone). Wilcoxon and t-tests only: nb-glm's frozen intercept
        is the control's.
    perturbations
        Labels to test; default all labels other than ``control_label``
        (with ``reference="rest"`` and no ``control_label``: every label).
        With ``reference="rest"`` the control label may be listed too.
    layer
        Test ``layers[layer]`` instead of ``X``.
    tie_correct
        Wilcoxon: tie-corrected variance of U (default, as scanpy
        ``tie_correct=True`` and scipy's ``mannwhitneyu``).
    use_continuity
        Wilcoxon: continuity correction of 0.5 on ``|U - m n / 2|`` (off by
        default, as in scanpy; scipy's default is on).
    corr_method
        ``"benjamini-hochberg"`` (default) or ``"bonferroni"``, over the genes
        of each perturbation.
    alternative
        ``"two-sided"`` (default), ``"greater"`` (expression higher in the
        perturbation than in control) or ``"less"``: the perturbation is the
        first sample, as in ``scipy.stats.mannwhitneyu`` and
        ``scipy.stats.ttest_ind``. Scores keep their sign either way.
    min_pct, min_mean
        A gene is tested in a comparison when, on the perturbation's side or
        the control's, at least ``min_pct`` of the cells have a count and its
        mean is at least ``min_mean`` (log1p units, at most
        ``log1p(target_sum)``; nb-glm: normalized counts); otherwise its
        statistics are NaN (``pts``/``pts_rest`` kept)
        and it leaves the multiple-testing family: reported, never dropped.
        One number for both sides or ``(control, perturbation)``, as crispyx's
        ``min_pct_ctrl``/``min_pct_pert``; 0 (default) tests every gene.
    size_factors
        nb-glm: an ``obs`` column (default ``"size_factors"``), made first
        by :func:`pertscale.pp.size_factors`, or an ``(n_obs,)`` array.
        Nothing is computed here: a missing column is an error that names
        the call.
    size_factor_method
        nb-glm: the method the size factors were made with (``"sparse"``,
        ``"poscounts"``, ``"ratio"``), checked where
        :func:`pertscale.pp.size_factors` recorded it.
    dispersions
        nb-glm: a ``var`` column or an ``(n_vars,)`` array of dispersions
        to use as they are; default (``None``) the final ones
        :func:`pertscale.tl.dispersions` (or its steps, up to
        :func:`pertscale.tl.fit_map_dispersions`) stored for this
        ``perturbation_column``, these size factors, ``covariates`` and
        ``dispersion_method``; made first, never here (a column merely
        named ``dispersion``, say from a simulation, is not taken for them).
    dispersion_method
        nb-glm: the method they were estimated with (``"cox-reid"`` or
        ``"moments"``), checked.
    covariates
        nb-glm: ``obs`` columns whose effects (e.g. ``["bio_rep"]``, or
        ``"bio_rep"``: a string is one column) are taken out, checked before
        any pass (columns, missing values, levels, control cells per level):
        the model is DESeq2's additive design ``~ covariates + perturbation``
        (an intercept, each covariate's other levels' indicators, R's
        treatment contrasts with the first sorted level as reference), fitted
        by maximum likelihood on the control's and the perturbation's cells
        together, every coefficient free: as DESeq2 (or statsmodels' NB GLM
        at the same dispersion) fits those cells. The control's share of the
        likelihood enters through its frozen score series (see Notes); the
        standard error is the expected information's, ``inv(X' W X)``.
    shrink
        nb-glm: ``logfoldchanges`` are apeGLM's shrunk estimates (default):
        the maximum a posteriori of every coefficient together, as
        ``lfcShrink(type="apeglm")``; ``logfoldchanges_raw`` always holds
        the MLE. Where the Cauchy prior is much narrower than the MLE the
        posterior can have two modes (one near 0): both are found and the
        higher is kept.

        The coefficients are the maximum likelihood estimates. DESeq2's and
        PyDESeq2's IRLS floor the fitted means at ``minmu`` (0.5 by
        default) inside their iterations, which for single-cell genes whose
        means are mostly below 0.5 stops short of the maximum (up to 1.8
        log2 on the papalexi screen, ``benchmarks/RESULTS.md``); with
        ``minmu=1e-6``, DESeq2's advice for single cells, they agree with
        these as closely as with each other.
    lfc_base
        nb-glm: ``"log2"`` (default) or ``"natural"`` fold changes and
        standard errors (recorded in the settings).
    min_cells_per_perturbation
        Perturbations with fewer cells are skipped with a warning and listed
        in ``uns['pertscale']['skipped']``. Its earlier name ``min_cells``
        is still taken for one release, with a ``FutureWarning``: elsewhere
        ``min_cells`` is a gene's cells, as in scanpy.
    scanpy_format
        Add Scanpy's ``uns['rank_genes_groups']`` when the results are
        computed (:func:`pertscale.compute`) or written
        (:func:`pertscale.write`), so that
        ``scanpy.get.rank_genes_groups_df`` works on them (its record arrays
        hold up to about 1,100 perturbations in an ``.h5ad`` file). Nothing
        is computed here either way.
    key_added
        Readable name of this result in the result store (default
        ``"de_<method>"``, ``"de_<method>_rest"`` with ``reference="rest"``):
        ``ps.get.result(adata, key="de_wilcoxon")``.
    force
        Test again even when a result with equal settings is stored.

    Returns
    -------
    anndata.AnnData
        Also stored in ``adata``'s result store, keyed by its settings
        (:class:`pertscale.WilcoxonSettings`, :class:`pertscale.TTestSettings`,
        :class:`pertscale.NBGLMSettings`; ``reference`` among them, so that
        tests against control and against the rest are stored apart): asked
        again with equal settings,
        the stored object is returned without any pass (see
        :mod:`pertscale.store`; :func:`pertscale.get.result` reads it back).
        Lazy (unless ``scanpy_format``): the layers are Dask arrays, computed
        by :func:`pertscale.compute`, written block by block by
        :func:`pertscale.write` (``.zarr``), or viewed with
        :func:`pertscale.get.dataset`.
        ``n_perturbations x n_vars`` results: ``obs_names`` the perturbation
        labels, ``obs['n_cells']``; layers ``scores`` (Wilcoxon: z of U;
        t-test: Welch's t; positive when the perturbation is above control),
        ``pvals`` (Wilcoxon: normal approximation; t-test: Student t with
        Welch-Satterthwaite degrees of freedom; for ``alternative``),
        ``pvals_adj``, ``logfoldchanges`` (log2 of the ratio of ``expm1`` of
        the mean log1p values, scanpy's definition), ``pts``/``pts_rest``
        (fraction of perturbed/control cells with a non-zero value; with
        ``reference="rest"``, ``pts_rest`` is of each perturbation's rest)
        and, for the Wilcoxon, ``u_statistic`` (the perturbation's U, first
        sample); all ``n_perturbations x n_vars`` float64. The settings are
        in ``uns['pertscale']['settings']`` (``reference`` among them;
        ``n_control_cells`` only against control). nb-glm: ``scores`` are Wald z,
        ``pvals`` normal, ``logfoldchanges`` apeGLM-shrunk and
        ``logfoldchanges_raw`` the MLE (``lfc_base``), ``lfcSE`` (standard
        error of the MLE, DESeq2's name) and ``lfcSE_shrunk`` (posterior),
        ``baseMean`` (mean normalized count of the perturbation's and the
        control's cells), ``converged``, ``n_iter`` and ``prior_scale``
        (apeGLM's, natural log, one value per perturbation); ``var`` also
        holds the dispersions (``dispersion``, ``dispersion_genewise``,
        ``dispersion_trend``, ``dispersion_outlier``). Every name is
        registered, with its units and scanpy's or DESeq2's spelling, in
        :mod:`pertscale.variables`.

    Raises
    ------
    KeyError
        If ``perturbation_column`` or ``layer`` is missing.
    ValueError
        If ``control_label`` is unknown (or not given with
        ``reference="control"``), fewer than two control cells remain,
        every cell is a control cell, no perturbation can be tested,
        ``reference`` is neither ``"control"`` nor ``"rest"`` (the message
        lists both) or is ``"rest"`` with ``method="nb-glm"``, a tested
        perturbation leaves fewer than two cells for its rest, a label is
        empty or two labels are the same text (the integer ``1`` and the
        string ``"1"``), an option is not supported or out of range
        (``min_mean`` above ``log1p(target_sum)`` of the
        :func:`pertscale.pp.normalize_total` that made the matrix: no gene
        could be tested), nb-glm is given a matrix marked as log1p data or
        ``covariates`` that do not fit (a missing column, missing values, a
        single level, a level without control cells), nb-glm's size factors
        or dispersions are missing, stop at an earlier step or were made for
        another perturbation column, size factors, covariates or method (the
        message names the step and the call that makes them), the matrix has no
        cells or genes, or it holds NaN or negative values. All but the last
        are raised before any pass over the matrix.

    Warns
    -----
    UserWarning
        If the matrix holds raw counts (an integer dtype) or is a float
        matrix not marked by ``log1p`` (``uns['log1p']`` for ``X``,
        ``uns['pertscale']['log1p_layers']`` for a layer): fold changes assume
        log1p values. Also when gene names repeat (made unique).
    FutureWarning
        If ``perturbation_column`` or ``control_label`` is given
        positionally, or ``min_cells`` is given (now
        ``min_cells_per_perturbation``): earlier spellings, taken for one
        more release.

    Notes
    -----
    Wilcoxon: equal, to floating point accuracy, to
    ``scipy.stats.mannwhitneyu(group, control, method="asymptotic")`` per
    gene (Mann & Whitney 1947), and to
    ``scanpy.tl.rank_genes_groups(method="wilcoxon", reference=control_label,
    tie_correct=True)``. t-test: equal to ``scipy.stats.ttest_ind(group,
    control, equal_var=False)`` (Welch 1947) and to scanpy's
    ``method="t-test"``. Where a gene has no variance in either group the
    score is 0 and the p-value 1, as in scanpy (scipy returns NaN there).
    With ``reference="rest"`` the second sample is every other cell:
    ``scipy.stats.mannwhitneyu(group, rest)`` and ``scipy.stats.ttest_ind(group,
    rest, equal_var=False)``, and ``scanpy.tl.rank_genes_groups(reference="rest",
    tie_correct=True)``; scanpy's ``t-test_overestim_var`` then puts the
    group's cell count in place of the rest's, as here.

    nb-glm (Love, Huber & Anders 2014; PyDESeq2, Muzellec et al. 2023): per
    gene ``y ~ NB(mu, alpha)``, ``log mu = beta0 + beta1 x + log s``. The
    intercept's maximum likelihood estimate depends on the control cells
    alone, so freezing it at the control-only fit is exact: ``beta1`` and
    its standard error ``sqrt(1/I_control + 1/I_group)`` equal a full
    two-group GLM (statsmodels' ``NegativeBinomial`` family, same ``alpha``
    and offsets). The dispersions are shared by all comparisons, estimated
    from all cells (:func:`pertscale.tl.dispersions`), where DESeq2 run per
    comparison estimates them from the two groups' cells. The control's
    share of each gene's likelihood is also frozen as a function of its
    linear predictor: Chebyshev series of its score terms in ``tanh`` of the
    log mean, per band of size factors, exact to about 1e-14
    (:mod:`pertscale.kernels.nbglm._score`), so that fits that move the
    control's coefficients (covariates, apeGLM, the likelihood-ratio test)
    are exact too, at ``O(32)`` a gene and evaluation whatever the number of
    control cells. apeGLM (Zhu, Ibrahim & Love 2019) is the posterior mode
    of the intercept (normal prior, scale 15) and ``beta1`` (Cauchy prior
    whose scale comes from the perturbation's MLEs, apeglm's ``priorVar``,
    capped at 1), fitted together as apeglm and PyDESeq2 do; its standard
    error is the posterior's observed information's. P-values come from the
    MLE, as in DESeq2. Where one side has no count of a gene (a complete
    knock-down, or a gene only the perturbation expresses) the MLE of
    ``beta1`` is infinite and the Wald test undefined; those genes get the
    likelihood-ratio test of ``~ covariates`` against ``~ covariates +
    perturbation`` (the full model's likelihood at its limit), ``scores``
    the signed root of the statistic, ``logfoldchanges_raw`` the fold change
    at which the empty side would hold half a count (Haldane 1956's
    correction), and they take part in the multiple-testing correction
    (``one_sided`` marks them). DESeq2's Wald test gives such genes a finite
    fold change and p-value only because its iterations stop (and its
    fitted means are floored at 0.5); its ``test="LRT"`` is the comparable
    one. Genes with no count on either side, or below ``min_pct`` /
    ``min_mean`` on both sides, are untested: NaN, and ``tested`` is 0.
    """
    from ..analysis import NBGLMSettings, TTestSettings, WilcoxonSettings, array_digest, build
    from ..store import cached

    perturbation_column = _groups_column(adata, perturbation_column, groupby, control_label)
    if exclude_escapers:
        _check_escapers(adata, reference)
    options = dict(
        exclude_escapers=bool(exclude_escapers),
        method=method,
        reference=reference,
        perturbations=perturbations,
        layer=layer,
        tie_correct=tie_correct,
        use_continuity=use_continuity,
        corr_method=corr_method,
        alternative=alternative,
        min_pct=min_pct,
        min_mean=min_mean,
        size_factors=size_factors,
        size_factor_method=size_factor_method,
        dispersions=dispersions,
        dispersion_method=dispersion_method,
        covariates=covariates,
        shrink=shrink,
        lfc_base=lfc_base,
        min_cells_per_perturbation=min_cells_per_perturbation,
    )
    _check_choices(method, corr_method, alternative, reference, control_label)
    covariates = label_list(covariates, "covariates")  # a single string is one column, not its letters
    options["covariates"] = covariates
    if covariates and method != "nb-glm":
        raise ValueError(f"covariates are supported by method='nb-glm', not by {method!r}")
    cls = {"wilcoxon": WilcoxonSettings, "nb-glm": NBGLMSettings}.get(method, TTestSettings)
    fields = {k: v for k, v in options.items() if k in cls.model_fields}
    # the settings' field keeps its name (stored keys); checked here to name the argument
    fields["min_cells"] = check_number(
        min_cells_per_perturbation, "min_cells_per_perturbation", integer=True, minimum=1
    )
    if perturbations is not None:
        fields["perturbations"] = tuple(dict.fromkeys(label_list(perturbations, "perturbations")))
    fields["min_pct"] = _thresholds(min_pct, "min_pct", maximum=1)
    fields["min_mean"] = _thresholds(min_mean, "min_mean")
    for name in ("size_factors", "dispersions"):
        if name in fields and fields[name] is not None and not isinstance(fields[name], str):
            fields[name] = array_digest(fields[name])
    if "covariates" in fields:
        fields["covariates"] = tuple(covariates)
    control = None if control_label is None else str(control_label)
    settings = build(cls, perturbation_column=perturbation_column, control_label=control, **fields)
    res = cached(
        adata,
        settings,
        lambda: (_test(adata, perturbation_column, control_label, **options), []),
        key_added=key_added or f"de_{method}" + ("_rest" if reference == "rest" else ""),
        force=force,
    )
    if scanpy_format:  # the face (ps.compute, ps.write) adds scanpy's view when it computes the results
        res.uns["pertscale"]["scanpy_format"] = True
    return res


def _test(
    adata: ad.AnnData,
    perturbation_column: str,
    control_label: str | None,
    *,
    method: str,
    reference,
    perturbations,
    layer,
    tie_correct,
    use_continuity,
    corr_method,
    alternative,
    min_pct,
    min_mean,
    size_factors,
    size_factor_method,
    dispersions,
    dispersion_method,
    covariates,
    shrink,
    lfc_base,
    min_cells_per_perturbation,
    exclude_escapers=False,
) -> ad.AnnData:
    """The lazy results of :func:`rank_genes_groups`, its options checked (no store)."""
    _check_choices(method, corr_method, alternative, reference, control_label)
    min_size = check_number(min_cells_per_perturbation, "min_cells_per_perturbation", integer=True, minimum=1)
    check_shape(adata)
    labels = perturbation_labels(adata.obs, perturbation_column)
    if exclude_escapers:  # their label becomes one that is neither tested nor the control
        escaper = adata.obs[ESCAPER].to_numpy(dtype=float, na_value=0.0) == 1
        before = set(labels.unique())
        labels = labels.where(~escaper | (labels == str(control_label)), ESCAPER_LABEL)
        emptied = sorted(before - set(labels.unique()))
        if emptied:
            warnings.warn(
                f"exclude_escapers: every cell of {len(emptied)} perturbation(s) is an escaper (none knocked its "
                f"target below the control's median); not tested: {emptied[:20]}",
                UserWarning,
                stacklevel=3,
            )
    rest = reference == "rest"
    if control_label is None:  # reference="rest" only (checked): every label is a perturbation
        control_mask = np.zeros(labels.shape[0], dtype=bool)
    else:  # against the rest the control label is only left out of the default perturbations: one cell will do
        control_mask = check_control(labels, control_label, perturbation_column, min_cells=1 if rest else 2)
    counts = labels[~control_mask].value_counts()
    if counts.empty and not (rest and perturbations is not None):
        raise ValueError(
            f"every cell in obs[{perturbation_column!r}] is labelled {control_label!r} (control): "
            "there is no perturbation to test"
        )
    if perturbations is None:
        if isinstance(adata.obs[perturbation_column].dtype, pd.CategoricalDtype):
            order = [str(c) for c in adata.obs[perturbation_column].cat.categories]
        else:
            order = sorted(counts.index)
        candidates = [g for g in order if g in counts.index and g != ESCAPER_LABEL]
    else:
        candidates = list(dict.fromkeys(label_list(perturbations, "perturbations")))  # unique, order kept
        if rest:  # the control label may be tested against the rest too
            counts = labels.value_counts()
        missing = [p for p in candidates if p not in counts.index]
        if missing:
            raise ValueError(
                f"perturbations not found in obs[{perturbation_column!r}] (or equal to the control label): "
                f"{missing}; labels seen: {sorted(counts.index)[:20]}"
            )
    skipped = [g for g in candidates if counts[g] < min_size]
    groups = [g for g in candidates if counts[g] >= min_size]
    if skipped:
        warnings.warn(
            f"{len(skipped)} perturbation(s) have fewer than {min_size} cells and are not tested: {skipped[:20]}",
            UserWarning,
            stacklevel=2,
        )
    if not groups:
        raise ValueError(
            f"no perturbation in obs[{perturbation_column!r}] has at least min_cells_per_perturbation={min_size} "
            "cells; nothing to test"
        )
    check_writable_labels(groups, perturbation_column)
    if rest:
        small = [g for g in groups if labels.shape[0] - counts[g] < 2]
        if small:
            raise ValueError(
                f"perturbation(s) {small} leave fewer than 2 of the {labels.shape[0]} cells for their rest: "
                "nothing to compare with; test against a control (reference='control') or leave them out of "
                "perturbations"
            )

    x = as_dask(get_matrix(adata, layer))
    found = find_groups(labels, groups, control_label)
    test = METHODS[method]
    options: dict = {
        "corr_method": corr_method,
        "alternative": alternative,
        "min_pct": _thresholds(min_pct, "min_pct", maximum=1),
        "min_mean": _thresholds(min_mean, "min_mean"),
    }
    inputs: dict = {}
    extra_settings: dict = {f"{LOGFOLDCHANGES}_base": "log2"}
    if test is NBGLM:
        inputs, extra_settings = _nbglm_inputs(
            adata,
            perturbation_column,
            layer=layer,
            size_factors=size_factors,
            size_factor_method=size_factor_method,
            dispersions=dispersions,
            dispersion_method=dispersion_method,
            covariates=covariates,
            control=control_mask,
        )
        if lfc_base not in ("log2", "natural"):
            raise ValueError(f"lfc_base {lfc_base!r} is not supported; choose 'log2' or 'natural'")
        options |= {"alpha": inputs["gene_values"]["alpha"], "shrink": bool(shrink), "lfc_base": lfc_base}
        extra_settings |= {f"{LOGFOLDCHANGES}_base": lfc_base, "shrink": "apeglm" if shrink else "none"}
    else:
        if covariates:
            raise ValueError(f"covariates are supported by method='nb-glm', not by {method!r}")
        _warn_if_counts(adata, x.dtype, layer)
        _check_min_mean_reachable(adata, layer, options["min_mean"])
        if test is WILCOXON:
            options |= {"tie_correct": bool(tie_correct), "use_continuity": bool(use_continuity)}
        else:
            options["overestimate_variance"] = method == "t-test_overestim_var"
    stats, lay = test_against_control(
        x, found, test, n_parts=2 * (settings.n_workers or n_cores()), options=options, reference=reference, **inputs
    )
    logger.info(
        "%s against the %s: %d perturbations in %d blocks (%s)",
        method,
        reference,
        len(groups),
        len(lay.groups_per_block),
        "sliced: groups stored contiguously" if lay.sliced else "sorted into groups out of core",
    )
    res = lazy_results(
        stats,
        test.statistics,
        groups=groups,
        var=adata.var,
        n_cells=found.sizes,
        settings={
            "method": method,
            "reference": reference,
            "perturbation_column": perturbation_column,
            "control_label": None if control_label is None else str(control_label),  # None: left out
            "layer": layer or "X",
            **{
                k: v for k, v in options.items() if k in ("corr_method", "alternative", "tie_correct", "use_continuity")
            },
            "min_pct": np.asarray(np.broadcast_to(options["min_pct"], 2), dtype=float),  # (control, perturbation)
            "min_mean": np.asarray(np.broadcast_to(options["min_mean"], 2), dtype=float),
            "min_cells_per_perturbation": int(min_size),
            "n_control_cells": None if rest else int(control_mask.sum()),  # the rest differs per perturbation
            **extra_settings,
            "pertscale_version": importlib.metadata.version("pertscale"),
        },
    )
    if test is NBGLM:
        for column in RESULTS_VAR_NBGLM:
            if column in adata.var:
                res.var[column] = adata.var[column].to_numpy()
    res.uns["pertscale"]["skipped"] = np.asarray(skipped, dtype=object) if skipped else np.asarray([], dtype=str)
    reads = nbytes_in_memory(adata)  # what computing the results reads: the face chooses its scheduler by it
    if reads is not None:
        res.uns["pertscale"]["reads_nbytes"] = int(reads)
    return res


def _check_min_mean_reachable(adata: ad.AnnData, layer: str | None, min_mean) -> None:
    """Refuse a ``min_mean`` that no gene can reach on log1p(normalize_total(target_sum)) values.

    Every such value is at most ``log1p(target_sum)`` (a cell with all its
    counts in one gene), and so is every mean: above it on both sides, no
    gene would be tested and every p-value would be NaN. Known only when
    :func:`pertscale.pp.normalize_total` and :func:`pertscale.pp.log1p` made
    the matrix (their records in ``uns``); otherwise nothing is refused.
    """
    record = (adata.uns.get("pertscale") or {}).get("normalize_total") or {}
    if "target_sum" not in record or record.get("layer", "X") != (layer or "X"):
        return
    if log1p_record(adata, layer) is None:
        return
    largest = float(np.log1p(float(record["target_sum"])))
    if min(np.atleast_1d(min_mean)) > largest:
        raise ValueError(
            f"min_mean (--min-mean) {min_mean!r} is above {largest:.4g} = log1p(target_sum={record['target_sum']:g}), "
            "the largest mean log1p-normalized values can have: no gene would be tested and every p-value would be "
            f"NaN; use min_mean <= {largest:.4g} (log1p units, natural log)"
        )


def _check_choices(method: str, corr_method: str, alternative: str, reference: str, control_label) -> None:
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not available; choose one of {tuple(METHODS)}")
    check_reference(reference)
    if reference == "rest" and not METHODS[method].rest:
        raise ValueError(
            f"method={method!r} tests against the control only (its frozen intercept is fitted on the control "
            "cells); use reference='control' with control_label=..., or method='wilcoxon', 't-test' or "
            "'t-test_overestim_var' to test against the rest"
        )
    if reference == "control" and control_label is None:
        raise ValueError(
            "control_label is required to test against control (reference='control'); give control_label=..., "
            "or reference='rest' to test every label against all other cells"
        )
    if corr_method not in CORR_METHODS:
        raise ValueError(f"corr_method {corr_method!r} is not supported; choose one of {CORR_METHODS}")
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative {alternative!r} is not supported; choose one of {ALTERNATIVES}")


def _nbglm_inputs(
    adata: ad.AnnData,
    perturbation_column: str,
    *,
    layer: str | None,
    size_factors,
    size_factor_method: str,
    dispersions,
    dispersion_method: str,
    covariates,
    control: np.ndarray,
) -> tuple[dict, dict]:
    """Size factors and dispersions for nb-glm, as stored by their steps, and their settings; nothing is computed.

    Raises
    ------
    ValueError
        If the matrix is marked as log1p data, or the size factors or the
        dispersions are missing or were made otherwise than asked (each
        message names the step and the call that makes them).
    """
    from ._nbglm import additive_design, covariate_levels, dispersions_for_test, size_factors_for_test

    where = f"layers[{layer!r}]" if layer else "X"
    if log1p_record(adata, layer) is not None:
        mark = "uns['log1p']" if layer is None else f"uns['pertscale']['log1p_layers'][{layer!r}]"
        raise ValueError(
            f"{where} holds log1p-normalized values ({mark} is set), but nb-glm models raw counts; "
            "pass the raw counts layer (layer='counts'), e.g. keep adata.layers['counts'] = adata.X before normalizing"
        )
    covariates = label_list(covariates, "covariates")
    # obs alone tells: columns, missing values, levels, control cells per level
    levels, names = covariate_levels(adata.obs, covariates, control=control) if covariates else (None, [])
    sf = size_factors_for_test(adata, size_factors, method=size_factor_method, layer=layer)
    if dispersions is not None:
        alpha = adata.var[dispersions].to_numpy(dtype=np.float64) if isinstance(dispersions, str) else dispersions
        alpha = np.asarray(alpha, dtype=np.float64).ravel()
        if alpha.shape != (adata.n_vars,) or (np.isfinite(alpha) & (alpha <= 0)).any():
            raise ValueError(f"dispersions must be {adata.n_vars} positive numbers (NaN for genes not to test)")
        info = {"method": "given"}
    else:
        alpha, info = dispersions_for_test(
            adata,
            perturbation_column=perturbation_column,
            size_factors=size_factors,
            sf=sf,
            covariates=covariates,
            method=dispersion_method,
            layer=layer,
        )
    rows = sf if levels is None else np.column_stack([sf, levels.astype(np.float64)])
    n_levels = 1 if levels is None else len(names)
    design = additive_design(names, len(covariates)) if covariates else None
    summary = {"n_levels": n_levels, "design": design}
    return {"row_values": rows, "gene_values": {"alpha": alpha}, "summary_options": summary}, {
        "covariates": np.asarray(covariates, dtype=object) if covariates else np.asarray([], dtype=str),
        "size_factors": size_factors if isinstance(size_factors, str) else "given",
        "dispersion_method": str(info.get("method", "given")),
        "dispersion_prior_variance": float(info.get("prior_variance", np.nan)),
        "dispersion_max_cells": int(info.get("max_cells", 0)),  # 0: every cell
    }


def _thresholds(value, name: str, *, maximum: float | None = None):
    """A threshold for both sides, or a ``(control, perturbation)`` pair, each finite and in range.

    Raises
    ------
    ValueError
        Naming the option and the range.
    """
    values = None if isinstance(value, str) else np.atleast_1d(np.asarray(value, dtype=np.float64))
    if values is None or values.ndim != 1 or values.size not in (1, 2):
        raise ValueError(f"{name} must be a number or a (control, perturbation) pair; got {value!r}")
    for v in values:
        check_number(float(v), name, minimum=0, maximum=maximum)
    return float(values[0]) if values.size == 1 else (float(values[0]), float(values[1]))

"""The main job, ``pertscale run`` / :func:`pertscale.run`: the public analyses composed, in one face context.

What ``obs`` and the file's metadata can tell is checked first (options,
labels, covariates, the plan, ``--out`` and the working store), so that a
run that cannot succeed stops before any pass over the matrix. Then, inside
one :func:`pertscale.cluster.using` block, the calls a user would make in
Python, each one pass over the matrix or none:

1. :func:`pertscale.io.prepare`, when the cells are not stored by
   perturbation (one pass writes the sorted working store; reused after);
2. :func:`pertscale.pp.qc_summary` (one pass: QC metrics, value checks, the
   filters) and :meth:`~pertscale.pp.QCSummary.apply` (lazy);
3. with nb-glm, on the raw counts: :func:`pertscale.pp.size_factors` and
   :func:`pertscale.tl.dispersions` (their passes);
4. optionally :func:`pertscale.pb.pseudobulk` (one pass, on the counts);
5. :func:`pertscale.pp.normalize_total` and :func:`pertscale.pp.log1p` (lazy);
6. optionally :func:`pertscale.pp.highly_variable_genes` and
   :func:`pertscale.pp.pca` (their passes; the scores are written with the
   tests);
7. :func:`pertscale.tl.rank_genes_groups` of each method (lazy); one pass
   then writes every method's results (and the PCA scores) block by block
   into ``de_<method>.zarr``;
8. the tables, from those stores: ``de_<method>_significant.csv``
   (:func:`pertscale.tl.write_significant`), ``de_<method>.h5ad`` where
   scanpy's view fits, and ``qc.csv``, the QC summary's own
   per-perturbation table.

The results equal those of the same calls made by hand (``tests/test_job.py``).
"""

from __future__ import annotations

import logging
import shutil
import time
import typing
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .. import pb, pp, tl
from .._memory import BYTES_PER_NONZERO
from .._settings import settings
from .._validation import (
    check_control,
    check_number,
    check_shape,
    check_target_sum,
    check_writable_labels,
    label_list,
    perturbation_labels,
)
from ..analysis import DESettings, HVGSettings
from ..cluster import THREADS_BELOW_BYTES, active_client, check_scheduler, resolve_scheduler, using
from ..io import prepare, read, write
from ..io._atomic import remove, replacing
from ..io._prepare import is_sorted
from ..io._read import row_nonzeros
from ..io._write import write_stores
from ._output import METHODS, DiskFullError, OutputDir, disk_full, no_space, output_files, write_csv
from ._plan import Plan, make_plan
from ._profile import Profile
from ._record import run_record, targets_from_obs, write_json, write_qc_cells, write_report
from ._summary import FDR, RunSummary
from ._working_store import (
    CSR_COPY,
    CSR_RECORD,
    WORKING_STORE,
    check_working_store,
    csc_nonzeros,
    csr_copy,
    store_complete,
    store_refusal,
)

logger = logging.getLogger(__name__)

#: The flavors of ``--hvg-flavor``: those :class:`pertscale.HVGSettings` takes.
HVG_FLAVORS = typing.get_args(HVGSettings.model_fields["flavor"].annotation)
#: Genes with fewer non-zero cells on a side of a control split are left out of the calibration summary
#: (SCEPTRE's pairwise QC: 7 cells); the asymptotic p-values of sparser genes are not uniform even when exact.
CALIBRATION_MIN_NONZERO = 7
#: The methods of ``--assign-guides``: those of :func:`pertscale.pp.assign_guides`.
GUIDE_METHODS = ("umi_threshold", "max", "mixture")
#: The ``obs`` column of the labels ``--assign-guides`` makes (and the run tests).
ASSIGNED = "perturbation_assigned"
#: The alternatives of ``--alternative``: those :class:`pertscale.analysis.DESettings` takes.
ALTERNATIVES = typing.get_args(DESettings.model_fields["alternative"].annotation)


def _check_labels_before_passes(
    labels: pd.Series,
    *,
    perturbation_column: str,
    control_label: str,
    exclude_labels: list[str],
    min_cells_per_perturbation: int,
) -> tuple[bool, list[str]]:
    """What ``obs`` alone can tell: raise before any pass over the matrix.

    Returns whether scanpy's ``uns['rank_genes_groups']`` fits in the
    results file (see :func:`pertscale.tl.check_results_writable`) and the
    perturbations large enough to be tested, at most.
    """
    control_label = str(control_label)
    check_control(labels, control_label, perturbation_column)
    if control_label in exclude_labels:
        raise ValueError(
            f"--exclude-labels includes the control label {control_label!r}: no control cell would be left; "
            "remove it from --exclude-labels"
        )
    counts = labels[~labels.isin(exclude_labels)].value_counts()
    n_control = int(counts.get(control_label, 0))
    candidates = counts.drop(control_label)
    if candidates.empty:
        raise ValueError(
            f"every cell in obs[{perturbation_column!r}] is labelled {control_label!r} (control) or has an "
            f"excluded label ({', '.join(exclude_labels) or 'none'}): there is no perturbation to test; "
            "check --perturbation-column and --exclude-labels"
        )
    if n_control < 2:
        raise ValueError(
            f"only {n_control} control cell(s) labelled {control_label!r}; at least 2 are needed to test "
            "against control"
        )
    if candidates.max() < min_cells_per_perturbation:
        raise ValueError(
            f"no perturbation has {min_cells_per_perturbation} cells even before filtering (the largest, "
            f"{candidates.index[0]!r}, has {int(candidates.iloc[0])}); lower --min-cells-per-perturbation"
        )
    testable = [str(g) for g in candidates.index[candidates >= min_cells_per_perturbation]]
    check_writable_labels(testable, perturbation_column)
    statistics = tl.METHODS["wilcoxon"].statistics
    return tl.check_results_writable(testable, statistics, perturbation_column=perturbation_column), testable


def run(
    path: str | Path,
    out: str | Path,
    *,
    perturbation_column: str,
    control_label: str,
    min_genes: int = 20,
    min_cells: int = 3,
    min_cells_per_perturbation: int = 20,
    exclude_labels: Iterable[str] = pp.DEFAULT_EXCLUDE,
    target_sum: float = 1e4,
    layer: str | None = None,
    use_raw: bool = False,
    chunk_size: int | None = None,
    method: str | Iterable[str] = "wilcoxon",
    size_factor_method: str = "sparse",
    dispersion_method: str = "cox-reid",
    dispersion_cells: int | None = None,
    shrink: bool = True,
    covariates: Iterable[str] | None = None,
    tie_correct: bool = True,
    use_continuity: bool = False,
    corr_method: str = "benjamini-hochberg",
    alternative: str = "two-sided",
    min_pct: float | tuple[float, float] = 0.0,
    min_mean: float | tuple[float, float] = 0.0,
    hvg: int | None = None,
    hvg_flavor: str = "seurat",
    pca: int | None = None,
    pseudobulk: bool = False,
    assign_guides: str | None = None,
    guide_threshold: int = 5,
    calibration: bool = False,
    energy_distance: bool = False,
    n_permutations: int = 1000,
    guides: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    working_store: str | Path | None = None,
    memory_limit: int | None = None,
    dry_run: bool = False,
    scheduler=None,
    progress: bool | None = None,
    report: bool = True,
) -> RunSummary | Plan:
    """Run QC, normalization and the tests against control, and write the results.

    The public analyses, composed (see :mod:`pertscale.job`): the label
    checks and the plan (from ``obs`` and the file's metadata); if the cells
    are not stored by perturbation, the working store
    (:func:`pertscale.io.prepare`, one pass; reused while the input is
    unchanged); :func:`pertscale.pp.qc_summary` (QC metrics and the filters
    in one pass: drop ``exclude_labels``, keep cells with at least
    ``min_genes`` detected genes, drop perturbations with fewer than
    ``min_cells_per_perturbation`` cells, keep genes detected in at least
    ``min_cells`` of the remaining cells) and its ``apply``;
    :func:`pertscale.pp.normalize_total` to ``target_sum`` and
    :func:`pertscale.pp.log1p` (lazy); :func:`pertscale.tl.rank_genes_groups`
    for each test of ``method``, all written block by block in one more
    pass. The same calls made by hand give bitwise-equal results.

    Writes, in ``out``, per method (``de_wilcoxon``, ``de_t_test``, ...):
    ``de_<method>.zarr`` (results AnnData, always), ``de_<method>.h5ad``
    (the same with Scanpy's ``uns['rank_genes_groups']``, only where its
    record arrays fit: about 1,100 perturbations),
    ``de_<method>_significant.csv`` (rows with ``pvals_adj < 0.05``); and
    ``qc.csv``: the per-perturbation table of the run's QC summary
    (``QCSummary.perturbations`` of :func:`pertscale.pp.qc_summary`: cells
    per label in the input, after ``min_genes``, kept, whether it is the
    control, and the filter that dropped it). They appear together when the run succeeds,
    recorded (names, sizes, times) in ``out/.pertscale-manifest.json``; a
    failed or interrupted run leaves none of them (and removes ``out`` if it
    created it and nothing else is in it). The input is only read.

    Parameters
    ----------
    path
        ``.h5ad`` file or ``.zarr`` store of raw UMI counts.
    out
        Output directory, created if missing; it must not be empty (``''``),
        be, or lie inside, the input.
    perturbation_column, control_label
        The ``obs`` column of perturbation labels and the label of the
        control cells.
    min_genes, min_cells, min_cells_per_perturbation
        Filters (whole numbers >= 0; ``min_cells_per_perturbation`` >= 2).
    exclude_labels
        Labels whose cells are dropped; a single string is one label.
    target_sum
        Counts per cell after ``normalize_total``; between 1e-28 and 1e37
        (float32 normalization's range, see ``check_target_sum``).
    layer, use_raw
        Read ``layers[layer]`` or ``raw.X`` instead of ``X``.
    chunk_size
        Cells per block; default from the memory plan.
    method
        A test of :func:`pertscale.tl.rank_genes_groups` (``"wilcoxon"``,
        ``"t-test"``, ``"t-test_overestim_var"``, ``"nb-glm"``) or several;
        several share the QC pass and read each block once. nb-glm tests the
        raw counts (never the normalized values), after its size factors
        (:func:`pertscale.pp.size_factors`, written to ``size_factors.csv``)
        and dispersions (:func:`pertscale.tl.dispersions`, in the results'
        ``var``), each a few passes of its own.
    size_factor_method, dispersion_method, shrink, covariates
        nb-glm's options (see :func:`pertscale.tl.rank_genes_groups`).
    dispersion_cells
        nb-glm: fit the dispersions on at most this many cells, a seeded
        sample stratified by perturbation (``max_cells`` of
        :func:`pertscale.tl.dispersions`; seed 0, recorded): one read of the
        matrix for the whole fit when the sample fits in memory. Default: all
        cells.
    tie_correct, use_continuity, corr_method, alternative, min_pct, min_mean
        Options of :func:`pertscale.tl.rank_genes_groups`.
    hvg, hvg_flavor
        Also select the ``hvg`` most variable of the kept genes
        (:func:`pertscale.pp.highly_variable_genes` with ``hvg_flavor``:
        ``seurat`` and ``cell_ranger`` on the log1p values, one pass;
        ``seurat_v3`` on the counts, two passes) and write the genes' table
        with its columns to ``genes.csv``. Off by default.
    pca
        Also compute this many principal components of the log1p values
        (of the ``hvg`` genes when given; :func:`pertscale.pp.pca`: one pass,
        then the scores written block by block) into ``pca.zarr``: cells x
        genes without a matrix, with ``obsm['X_pca']``, ``varm['PCs']``
        and ``uns['pca']``, as scanpy lays them out. Off by default.
    assign_guides, guide_threshold
        Assign each cell its guide first, from the per-guide UMI counts in
        ``obsm['grna_counts']`` (:func:`pertscale.pp.assign_guides` with this
        ``method``: ``"umi_threshold"``, ``"max"`` or ``"mixture"``), and
        test the assigned labels (``obs['perturbation_assigned']``, which
        replaces ``perturbation_column``); the per-cell assignment is
        written to ``guides.parquet``. ``guide_threshold``: the UMI
        threshold of ``"umi_threshold"``.
    calibration
        Also check each test's calibration on control cells only
        (:func:`pertscale.tl.calibration_check`, the same options as the
        real tests; genes with fewer than 7 non-zero cells on a side of a
        split left out of the summary, SCEPTRE's pairwise QC) into ``calibration.csv`` (one row per split and a pooled
        row per method) and ``calibration_pvalues.parquet`` (what the QQ
        plot needs).
    energy_distance, n_permutations
        Also compute each perturbation's energy distance to the control in
        the PCA embedding and its permutation test
        (:func:`pertscale.tl.energy_distance`, ``n_permutations``) into
        ``energy_distance.csv``; needs ``pca``.
    guides
        Also test each guide against control
        (``rank_genes_groups(groupby="guide")`` with the first of the
        methods that is not nb-glm, Wilcoxon when nb-glm is the only one)
        into ``de_guides.zarr``, and write, per target, the correlation of
        its guides' log2 fold changes over their DE genes with discordant
        guides flagged (:func:`pertscale.tl.guide_concordance`) to
        ``guide_concordance.csv``. Needs a per-cell guide column (such as
        ``guide_id``, or ``assign_guides``').
    pseudobulk
        Also write ``pseudobulk.h5ad`` (:func:`pertscale.pb.pseudobulk`,
        one pass): per perturbation the summed counts (``X``), mean
        log1p and mean normalized values, ``n_cells``, and the log2 fold
        change against control (layer ``log2_fold_change``, control row
        0; :func:`pertscale.pb.log_fold_change`). Off by default.
    overwrite
        Replace the results of an earlier run found in ``out``: the files an
        earlier pertscale run recorded in ``out/.pertscale-manifest.json``,
        unchanged since (all of them, of any method, so that none is mixed
        with the new ones). Without it such an ``out`` is refused before any
        work. Files at an output's name that no run recorded (another
        program's, a pertscale version's from before the record, or changed
        since) refuse the run even with ``overwrite``; other files in
        ``out`` are never touched.
    resume
        Continue a run on the same input with the same options that was
        interrupted (Ctrl-C, SIGTERM, a failure) while writing its results:
        the result blocks it wrote (kept in ``out/.pertscale-partial``) are
        not computed again; the passes before them (QC, the control
        summary) run again, and the working store is reused as always. The
        results equal those of an uninterrupted run. A run with other
        options (other Dask graphs) starts the stores over. On an ``out``
        that holds a finished run's results and no interrupted run's blocks
        there is nothing to resume: ``FileExistsError`` (with or without
        ``overwrite``); with neither, the run starts from the beginning.
    working_store
        Where the perturbation-sorted working store goes when the input is
        not sorted; default ``out/working_store.zarr``. It is kept (and reused
        by later runs on the same input) after a success or an interruption,
        and removed after a failure of a run that created it. It must not be
        empty, ``out`` itself, hold ``out``, or overlap the input, and its
        directory must be writable (checked before any pass).
    memory_limit
        Bytes of memory per worker to plan for; default the workers' limit
        or this machine's available memory. With the threads scheduler, the
        memory of this one process, which its threads share.
    dry_run
        Only make the plan and return it: nothing is read but the labels and
        the row pointer, nothing is written. ``Plan.refusals`` says why the
        real run would be refused as ``out`` is now (results of an earlier
        run without ``overwrite``, files in the way, another run's lock, an
        unwritable ``out`` or working store, nothing to resume).
    report
        Also write ``report.html`` (:func:`pertscale.report`): one
        self-contained page with the run's figures, tables, plan, time and
        memory profile, settings and links to every output; on by default.
    scheduler, progress
        Where to compute (default ``ps.settings.scheduler``, ``"auto"``: an
        active ``distributed.Client``, else chosen by the plan: threads in
        this process for matrices under 2 GiB in memory, else the local
        process cluster) and whether to show progress bars. Every pass runs
        inside one :func:`pertscale.cluster.using` block.

    Returns
    -------
    RunSummary or Plan
        The plan with ``dry_run``.

    Raises
    ------
    FileNotFoundError, ValueError, KeyError
        For a missing, unreadable or damaged input, a missing column, an
        unknown control label, too few control cells, labels that cannot be
        written, an option out of range or bad values. Everything that
        ``obs``, ``var`` and the file's metadata can show is checked before
        the first pass over the matrix.
    ValueError
        Also for an empty ``out`` or ``working_store``, a working store that
        is ``out``, holds it or overlaps the input (before any pass).
    MemoryError
        If the plan does not fit the workers' memory or the disk (before any
        pass).
    FileExistsError
        If ``out`` holds results of an earlier run and ``overwrite`` is off;
        if it holds files at an output's name that no run recorded writing
        (or that changed since), with or without ``overwrite``; with
        ``resume``, if it holds a finished run's results and nothing to
        resume.
    PermissionError
        If ``out`` or the working store's directory cannot be written
        (checked before any computation).
    ConnectionError
        If ``scheduler`` is an address where no Dask scheduler answers within
        ``ps.settings.connect_timeout`` seconds (before any pass).
    DiskFullError
        If the disk fills up while the run writes (an ``OSError`` with errno
        ENOSPC, also a ``MemoryError``): one line naming ``out`` (or the
        working store) and the space the run needs there.
    """
    check_scheduler(scheduler)
    t0 = time.perf_counter()
    profile = Profile()
    seconds = profile.seconds
    min_genes = check_number(min_genes, "min_genes", integer=True, minimum=0, flag="--min-genes")
    min_cells = check_number(min_cells, "min_cells", integer=True, minimum=0, flag="--min-cells")
    min_cells_per_perturbation = check_number(
        min_cells_per_perturbation,
        "min_cells_per_perturbation",
        integer=True,
        minimum=2,
        flag="--min-cells-per-perturbation",
    )
    target_sum = check_target_sum(target_sum)  # float32 normalization's range: the CLI's check and message
    memory_limit = check_number(memory_limit, "memory_limit", minimum=2**20, allow_none=True, flag="--memory-limit")
    exclude_labels = label_list(exclude_labels, "exclude_labels")
    methods = _methods(method)
    steps = _steps(
        hvg=hvg,
        hvg_flavor=hvg_flavor,
        pca=pca,
        pseudobulk=pseudobulk,
        assign_guides=assign_guides,
        guide_threshold=guide_threshold,
        calibration=calibration,
        energy_distance=energy_distance,
        n_permutations=n_permutations,
        guides=guides,
    )
    covariates = label_list(covariates or [], "covariates")
    if covariates and "nb-glm" not in methods:
        raise ValueError("--covariates are taken out by the nb-glm test only; add nb-glm to --method")
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative {alternative!r} is not supported; choose one of {ALTERNATIVES} (--alternative)")
    path, out = Path(path), _directory(out, "out", "--out")
    given_store = working_store is not None
    store_path = _directory(working_store, "working_store", "--working-store") if given_store else out / WORKING_STORE
    adata = read(path, layer=layer, use_raw=use_raw, chunk_size=chunk_size)
    check_shape(adata, f"the matrix in {str(path)!r}")
    assignment = None
    if "guides" in steps:  # before any check of the labels: the assigned ones are tested
        assignment = pp.assign_guides(
            adata,
            method=steps["guides"]["method"],
            threshold=steps["guides"]["threshold"],
            control_label=str(control_label),
            key_added=ASSIGNED,
        )
        perturbation_column = ASSIGNED
    files = output_files(methods, steps, report=report)
    output = OutputDir(out, files=files, inputs=[path], overwrite=overwrite, resume=resume)
    output.check_paths()  # --out is not, and is not inside, the input: before anything, also for a dry run
    labels = perturbation_labels(adata.obs, perturbation_column)
    scanpy_format, testable = _check_labels_before_passes(
        labels,
        perturbation_column=perturbation_column,
        control_label=control_label,
        exclude_labels=exclude_labels,
        min_cells_per_perturbation=min_cells_per_perturbation,
    )
    if "guide_de" in steps:  # a guide column, before any pass (KeyError naming the accepted inputs)
        tl.guide_labels(adata, control_label=str(control_label))
    kept = ~labels.isin(exclude_labels).to_numpy()
    if covariates:  # checked on obs before any pass: columns, missing values, levels, control cells per level
        tl.covariate_levels(adata.obs[kept], covariates, control=(labels[kept] == str(control_label)).to_numpy())
    scheduler = settings.scheduler if scheduler is None else scheduler
    if scheduler == "auto":  # an active distributed.Client, or the plan chooses (None)
        scheduler = "local" if active_client() is not None else None
    needs_sort = not is_sorted(labels, control_label, exclude_labels)
    csc_nnz = csc_nonzeros(path, layer=layer, use_raw=use_raw)
    uses_store = needs_sort or csc_nnz is not None  # the sorted store, or the CSR copy beside it
    check_working_store(store_path, out, path, given=given_store, uses_store=uses_store, csc=csc_nnz is not None)
    row_nnz = row_nonzeros(path, layer=layer, use_raw=use_raw)
    if row_nnz is None and csc_nnz is not None:  # a CSC matrix: its total from the column pointer, spread evenly
        row_nnz = np.full(adata.n_obs, csc_nnz // max(adata.n_obs, 1), dtype=np.int64)
        row_nnz[: csc_nnz - int(row_nnz.sum())] += 1
    csr_record = store_path.parent / CSR_COPY / CSR_RECORD
    plan = make_plan(
        adata,
        kept=kept,
        control=(labels == str(control_label)).to_numpy(),
        group_sizes=labels[kept & (labels != str(control_label)).to_numpy()].value_counts().to_numpy(),
        needs_sort=needs_sort,
        out=out,
        scheduler=scheduler if isinstance(scheduler, str) or scheduler is None else "distributed",  # a Client
        memory_limit=memory_limit,
        chunk_size=chunk_size,
        n_groups_tested=len(testable),
        row_nnz=row_nnz,
        workers=_client_workers(scheduler),
        statistics={m: len(tl.METHODS[m].statistics) for m in methods},
        files=files,
        h5ad=scanpy_format,
        nb_glm="nb-glm" in methods,
        steps=steps,
        working_store=store_path,
        store_reused=needs_sort and store_complete(store_path),
        csr_copy=None if csc_nnz is None else ("reused" if csr_record.exists() else "new"),
    )
    if dry_run:  # what the run would refuse, said without creating or changing anything
        refusals = (output.refusal(), store_refusal(store_path, out, uses_store=uses_store, probe=False))
        plan.refusals = [r for r in refusals if r]
        return plan
    plan.check()
    refused = store_refusal(store_path, out, uses_store=uses_store, probe=True)
    if refused:
        raise PermissionError(refused)
    if scheduler is None:  # the plan's choice (the local cluster falls back to threads where it cannot start)
        scheduler = "auto" if plan.scheduler == "local" else plan.scheduler
    store_existed = store_path.exists()
    job = _Job(
        path=path,
        plan=plan,
        output=output,
        perturbation_column=perturbation_column,
        control_label=str(control_label),
        exclude_labels=exclude_labels,
        input_matrix=f"layers/{layer}" if layer else ("raw/X" if use_raw else "X"),
        thresholds={
            "min_genes": min_genes,
            "min_cells": min_cells,
            "min_cells_per_perturbation": min_cells_per_perturbation,
        },
        target_sum=target_sum,
        methods=methods,
        test_options={
            "tie_correct": tie_correct,
            "use_continuity": use_continuity,
            "corr_method": corr_method,
            "alternative": alternative,
            "min_pct": min_pct,
            "min_mean": min_mean,
        },
        nb_options={
            "size_factor_method": size_factor_method,
            "dispersion_method": dispersion_method,
            "dispersion_cells": dispersion_cells,
            "shrink": shrink,
            "covariates": covariates,
        },
        steps=steps,
        scanpy_format=scanpy_format,
        profile=profile,
        targets=targets_from_obs(adata.obs, perturbation_column),
        assignment=assignment,
    )
    profile.start()
    try:
        with output, using(scheduler, progress=progress, nbytes=plan.kept_nnz * BYTES_PER_NONZERO):
            try:
                csr = None
                if csc_nnz is not None:  # a CSC matrix: a CSR copy beside the working store, once
                    with profile.stage("transpose"):
                        csr = csr_copy(path, store_path.parent / CSR_COPY, layer=layer, use_raw=use_raw)
                if csr is not None:
                    matrix = read(csr, chunk_size=plan.block_rows)
                    source, layer, use_raw = csr, None, False
                elif max(adata.X.chunks[0]) != plan.block_rows:
                    matrix, source = read(path, layer=layer, use_raw=use_raw, chunk_size=plan.block_rows), path
                else:
                    matrix, source = adata, path
                if assignment is not None and matrix is not adata:  # the input's rows, read again
                    for column in assignment.columns:
                        matrix.obs[column] = adata.obs[column].to_numpy()
                if needs_sort:
                    logger.info("the cells are not stored by perturbation: sorting them into %s (once)", store_path)
                    with profile.stage("sort"):
                        matrix = prepare(
                            source,
                            perturbation_column=perturbation_column,
                            control_label=control_label,
                            out=store_path,
                            layer=layer,
                            use_raw=use_raw,
                            exclude_labels=exclude_labels,
                            chunk_size=plan.block_rows,
                            obs_columns=None if assignment is None else adata.obs[list(assignment.columns)],
                        )
                qc, results, de_genes, written = job.compose(matrix)
                summary = RunSummary(
                    n_obs_input=adata.n_obs,
                    n_vars_input=adata.n_vars,
                    n_obs_kept=int(qc.cell_mask.sum()),
                    n_vars_kept=int(qc.gene_mask.sum()),
                    n_control_cells=int(qc.perturbations.loc[qc.perturbations["is_control"], "n_cells_kept"].sum()),
                    perturbations_tested=list(next(iter(results.values())).obs_names),
                    perturbations_dropped={
                        str(k): str(v) for k, v in qc.perturbations["reason"].items() if str(v) != ""
                    },
                    de_genes=de_genes,
                    files={key: output.final(key) for key in output.files if key in written | {"run", "report"}},
                    # ^ report.html is left out again if it cannot be written (finish)
                    plan=plan,
                    working_store=store_path if needs_sort else None,
                    seconds=seconds,
                    qc=qc,
                )
                job.finish(summary, started=t0)
            except Exception:
                # kept after Ctrl-C (to resume), and after a failure once complete and costly to make again
                # (out-of-core inputs: the user fixes an option and runs again); otherwise removed
                costly = plan.kept_nnz * BYTES_PER_NONZERO >= THREADS_BELOW_BYTES and store_complete(store_path)
                if needs_sort and not store_existed and not costly:
                    shutil.rmtree(store_path, ignore_errors=True)
                raise
    except Exception as err:  # a full disk, also as zarr, dask or h5py wrap it: one line with the space needed
        full = no_space(err)
        if full is None or isinstance(err, DiskFullError):
            raise
        raise disk_full(full, out=out, store=store_path, plan=plan) from err
    finally:
        profile.stop()
    seconds["total"] = time.perf_counter() - t0
    return summary


@dataclass
class _Job:
    """The composition of the analyses, with the run's settings: :meth:`compose` runs it on the matrix."""

    path: Path
    plan: Plan
    output: OutputDir
    perturbation_column: str
    control_label: str
    exclude_labels: list[str]
    input_matrix: str
    thresholds: dict[str, int]
    target_sum: float
    methods: list[str]
    test_options: dict
    nb_options: dict
    steps: dict[str, dict]
    scanpy_format: bool
    profile: Profile
    targets: dict[str, str]
    assignment: pd.DataFrame | None = None

    def compose(self, adata: ad.AnnData) -> tuple[pp.QCSummary, dict[str, ad.AnnData], dict[str, pd.Series], set]:
        """QC, the optional steps and the tests on ``adata`` (blocks of whole groups), written into the staging.

        Returns the QC summary, the (lazy) results of each method, the DE
        genes per perturbation of each method and the keys of the outputs
        written.
        """
        filtered, qc = self._qc(adata)
        written = {"qc", "qc_cells"}
        if self.assignment is not None:
            frame = self.assignment.rename_axis("cell").reset_index()
            with replacing(self.output.path("guides")) as tmp:
                frame.astype({c: str for c in frame.columns if frame[c].dtype == object}).to_parquet(tmp, index=False)
            written.add("guides")
        write_qc_cells(qc, self.output.path("qc_cells"))
        if "nb-glm" in self.methods:
            self._nb_glm_steps(filtered)
            written.add("size_factors")
        if "pseudobulk" in self.steps:
            with self._timed("pseudo-bulk"):
                _pseudobulk(filtered, self.output.path("pseudobulk"), self.perturbation_column, self.control_label,
                            target_sum=self.target_sum)  # fmt: skip
        if self.steps.get("hvg", {}).get("flavor") == "seurat_v3":
            filtered.layers["counts"] = filtered.X  # its second pass reads the counts
        pp.normalize_total(filtered, target_sum=self.target_sum)
        pp.log1p(filtered)
        if "hvg" in self.steps:
            with self._timed("hvg"):
                flavor = self.steps["hvg"]["flavor"]
                pp.highly_variable_genes(
                    filtered,
                    flavor=flavor,
                    n_top_genes=self.steps["hvg"]["n_top_genes"],
                    layer="counts" if flavor == "seurat_v3" else None,
                )
                write_csv(filtered.var.rename_axis("gene").reset_index(), self.output.path("hvg"))
        stores = {}
        if "pca" in self.steps:  # the scores are written by the same pass over the blocks as the tests
            with self._timed("pca"):
                n_comps = self.steps["pca"]["n_comps"]
                stores[self.output.path("pca")] = _pca(filtered, n_comps, use_hvg="hvg" in self.steps)
        results = {method: self._test(filtered, method) for method in self.methods}
        if "guide_de" in self.steps:  # each guide against control, in the same pass as the tests
            stores[self.output.path("guide_de")] = self._guide_test(filtered)
        with self._timed("test and write"):  # one computation for every method: each block is read once
            write_stores({self.output.path(f"results:{m}"): r for m, r in results.items()} | stores, resume=True)
        written |= set(self.steps) | {f"results:{m}" for m in results}
        with self._timed("tables"):
            de_genes = {}
            for method, res in results.items():
                de_genes[method] = self._tables(method, res, written)
            write_csv(qc.perturbations, self.output.path("qc"), index=True, index_label="perturbation")
        energy = None
        if "energy_distance" in self.steps:
            with self._timed("energy distance"):
                energy = self._energy_distance(filtered)
                write_csv(energy.reset_index(), self.output.path("energy_distance"))
                written.add("energy_distance")
        with self._timed("knock-down and effects"):
            self._screen_tables(filtered, written, energy)
        if "guide_de" in self.steps:
            with self._timed("guide concordance"):
                self._guide_concordance(filtered)
                written.add("guide_concordance")
        if "calibration" in self.steps:
            with self._timed("calibration"):
                self._calibration(filtered)
                written |= {"calibration", "calibration_pvalues"}
        return qc, results, de_genes, written

    def _guide_method(self) -> str:
        """The test of the guides: the first method that is not nb-glm (its dispersions are per perturbation)."""
        return next((m for m in self.methods if m != "nb-glm"), "wilcoxon")

    def _guide_test(self, filtered: ad.AnnData) -> ad.AnnData:
        """Each guide of the kept cells against the control, lazily (``rank_genes_groups(groupby="guide")``)."""
        filtered.obs["guide"] = pd.Categorical(
            tl.guide_labels(filtered, control_label=self.control_label, perturbation_column=self.perturbation_column)
        )
        return tl.rank_genes_groups(
            filtered, groupby="guide", control_label=self.control_label, method=self._guide_method(),
            **self.test_options,
        )  # fmt: skip

    def _guide_concordance(self, filtered: ad.AnnData) -> None:
        """Per target, the agreement of its guides (from ``de_guides.zarr``), to ``guide_concordance.csv``."""
        from .. import get

        res = get.open_results(self.output.path("guide_de"))
        targets = tl.guide_targets(filtered) or _guide_targets_from_obs(filtered.obs, self.perturbation_column)
        try:
            table = tl.guide_concordance(res, targets=targets, fdr=FDR)
        except ValueError as err:  # no target with two tested guides: said in the file and the log
            logger.warning("guide concordance: %s", err)
            table = pd.DataFrame(columns=["target", "guide", "n_de_genes", "mean_correlation", "min_correlation",
                                          "n_pairs", "discordant"])  # fmt: skip
        write_csv(table, self.output.path("guide_concordance"))

    def _energy_distance(self, filtered: ad.AnnData) -> pd.DataFrame:
        """:func:`pertscale.tl.energy_distance` in the PCA scores written to ``pca.zarr`` (read lazily, not again)."""
        import dask.array as da
        import zarr

        scores = da.from_zarr(zarr.open_group(str(self.output.path("pca")), mode="r")["obsm"]["X_pca"])
        cells = ad.AnnData(obs=filtered.obs[[self.perturbation_column]].copy(), obsm={"X_pca": scores})
        return tl.energy_distance(
            cells,
            perturbation_column=self.perturbation_column,
            control_label=self.control_label,
            n_permutations=self.steps["energy_distance"]["n_permutations"],
            fdr=FDR,
        )

    def _calibration(self, filtered: ad.AnnData) -> None:
        """Each method's calibration check on the control cells, its tables and QQ data written."""
        splits, pvalues = [], []
        for method in self.methods:
            nb = method == "nb-glm"
            options = dict(self.test_options)
            if nb:
                options |= {k: self.nb_options[k] for k in ("shrink", "size_factor_method", "dispersion_method")}
                options["covariates"] = self.nb_options["covariates"] or None
            check = tl.calibration_check(
                filtered,
                perturbation_column=self.perturbation_column,
                control_label=self.control_label,
                method=method,
                layer="counts" if nb else None,
                fdr=FDR,
                min_nonzero=CALIBRATION_MIN_NONZERO,
                **options,
            )
            table = check.splits.assign(method=method)
            pooled = check.pooled.to_frame().T.assign(method=method)
            pooled.index = ["pooled"]
            splits.append(pd.concat([table, pooled]).rename_axis("split").reset_index())
            pvalues.append(check.qq_frame().assign(method=method))
        write_csv(pd.concat(splits, ignore_index=True), self.output.path("calibration"))
        with replacing(self.output.path("calibration_pvalues")) as tmp:
            pd.concat(pvalues, ignore_index=True).to_parquet(tmp, index=False)

    def _screen_tables(self, filtered: ad.AnnData, written: set, energy: pd.DataFrame | None = None) -> None:
        """Per method: the knock-down of each perturbation's target, the effect table and the long Parquet export.

        The knock-down reads the written results (lazily) and makes one pass
        over the kept cells at the target genes (for the first method; the
        others' statistics are read from their results);
        the per-cell scores and escaper flags go to ``knockdown_cells.parquet``.
        """
        from .. import get

        first = None
        for method in self.methods:
            store = self.output.path(f"results:{method}")
            res = get.open_results(store)
            if first is None:  # one pass over the cells; the other methods' statistics are read from their results
                table = first = tl.knockdown(
                    filtered,
                    perturbation_column=self.perturbation_column,
                    control_label=self.control_label,
                    results=res,
                    targets=self.targets or None,
                    fdr=FDR,
                )
                _write_knockdown_cells(filtered, self.perturbation_column, self.output.path("knockdown_cells"))
                written.add("knockdown_cells")
            else:
                table = tl.knockdown_statistics(first, res, fdr=FDR)
            write_csv(table.reset_index(), self.output.path(f"knockdown:{method}"))
            effects = tl.effect_table(res, fdr=FDR, knockdown=table, energy_distance=energy)
            write_csv(effects.reset_index(), self.output.path(f"effects:{method}"))
            tl.write_long(store, self.output.path(f"long:{method}"))
            written |= {f"knockdown:{method}", f"effects:{method}", f"long:{method}"}

    def _timed(self, step: str):
        """A context that times its block as stage ``step`` of the run's profile (seconds and memory)."""
        return self.profile.stage(step)

    def finish(self, summary: RunSummary, *, started: float) -> None:
        """Write ``run.json`` (what the run did, its settings, versions and profile) and, if asked, the report.

        Both go into the staging directory with the other outputs, so they
        appear with them; the report reads the staged files (the same
        reader :func:`pertscale.report` uses on a finished output
        directory), and ``run.json`` is written again after it so that its
        profile includes the report's own time.
        """
        record = run_record(self, summary, seconds=time.perf_counter() - started)
        write_json(record, self.output.path("run"))
        if "report" in self.output.files:
            with self._timed("report"):
                try:
                    write_report(self.output.staging, files=self.output.files)
                except Exception as err:  # noqa: BLE001 - the results are complete: a report that fails loses none
                    where = str(self.output.final("run").parent)
                    logger.warning("report.html is not written: %s (ps.report(%r) tries again)", err, where)
                    remove(self.output.path("report"))
                    summary.files.pop("report", None)
            record["profile"] = self.profile.to_dict()
            write_json(record, self.output.path("run"))

    def _qc(self, adata: ad.AnnData) -> tuple[ad.AnnData, pp.QCSummary]:
        """:func:`pertscale.pp.qc_summary` (one pass) and its ``apply``; refused when too little is left to test.

        Raises
        ------
        ValueError
            For non-integer values (normalized data), fewer than two control
            cells left, no perturbation or no gene left; naming the flag to
            change.
        """
        with self._timed("qc and filters"):
            qc = pp.qc_summary(
                adata,
                perturbation_column=self.perturbation_column,
                control_label=self.control_label,
                min_genes=self.thresholds["min_genes"],
                min_cells_per_perturbation=self.thresholds["min_cells_per_perturbation"],
                min_cells_per_gene=self.thresholds["min_cells"],
                exclude_labels=self.exclude_labels,
                allow_empty=True,  # what is left is checked here, with the flags of the command
            )
        if qc.n_noninteger_values:
            where = {"X": "X", "raw/X": "raw.X"}.get(self.input_matrix, f"layers[{self.input_matrix[7:]!r}]")
            raise ValueError(
                f"{where} has {qc.n_noninteger_values:,} non-integer values: it looks normalized already, and this "
                "job normalizes raw UMI counts itself; pass the raw counts (e.g. --layer counts or --use-raw)"
            )
        groups = qc.perturbations
        control = groups.loc[groups["is_control"]].iloc[0]
        if control["n_cells_min_genes"] < 2:  # said first: without controls nothing can be tested
            raise ValueError(
                f"{int(control['n_cells_min_genes'])} control cell(s) left after filtering (of "
                f"{int(control['n_cells'])}); lower --min-genes or check --exclude-labels"
            )
        if not (qc.perturbation_mask & ~groups["is_control"]).any():
            raise ValueError(
                f"no perturbation has at least {self.thresholds['min_cells_per_perturbation']} cells after filtering; "
                "lower --min-cells-per-perturbation or --min-genes"
            )
        if not qc.gene_mask.any():
            raise ValueError(f"no gene is detected in at least {self.thresholds['min_cells']} cells; lower --min-cells")
        return qc.apply(adata), qc

    def _nb_glm_steps(self, filtered: ad.AnnData) -> None:
        """nb-glm's steps on the raw counts (``layers['counts']``): size factors, then dispersions; their passes."""
        filtered.layers["counts"] = filtered.X  # the same lazy blocks; normalization replaces X only
        with self._timed("size factors"):
            pp.size_factors(filtered, method=self.nb_options["size_factor_method"], layer="counts")
        with self._timed("dispersions"):
            tl.dispersions(
                filtered,
                perturbation_column=self.perturbation_column,
                covariates=self.nb_options["covariates"] or None,
                method=self.nb_options["dispersion_method"],
                layer="counts",
                max_cells=self.nb_options.get("dispersion_cells"),
            )
        factors = filtered.obs[[self.perturbation_column, "size_factors"]]
        factors = factors.rename(columns={"size_factors": "size_factor"})
        write_csv(factors.rename_axis("cell").reset_index(), self.output.path("size_factors"))

    def _test(self, filtered: ad.AnnData, method: str) -> ad.AnnData:
        """:func:`pertscale.tl.rank_genes_groups` of ``method`` (lazy), its settings completed with the run's."""
        stored = perturbation_labels(filtered.obs, self.perturbation_column)
        nb = method == "nb-glm"
        nb_options = {k: self.nb_options[k] for k in ("shrink", "size_factor_method", "dispersion_method")}
        res = tl.rank_genes_groups(
            filtered,
            perturbation_column=self.perturbation_column,
            control_label=self.control_label,
            method=method,
            # results rows in storage order: written as they come, never reordered
            perturbations=[g for g in pd.unique(stored.to_numpy()) if g != self.control_label],
            layer="counts" if nb else None,
            **self.test_options,
            **(nb_options | {"covariates": self.nb_options["covariates"] or None} if nb else {}),
        )
        res.uns["pertscale"]["settings"].update(
            {
                "input": str(self.path.resolve()),
                "input_matrix": self.input_matrix,
                # the QC filters of the run, by qc_summary's names: the test's own min_cells (a perturbation's
                # smallest size, DESettings' field) keeps its value and meaning
                "min_genes": int(self.thresholds["min_genes"]),
                "min_cells_per_gene": int(self.thresholds["min_cells"]),
                "min_cells_per_perturbation": int(self.thresholds["min_cells_per_perturbation"]),
                "exclude_labels": np.asarray([str(e) for e in self.exclude_labels], dtype=object),
                "target_sum": float(self.target_sum),
            }
        )
        return res

    def _tables(self, method: str, res: ad.AnnData, written: set) -> pd.Series:
        """A method's significant table and, where scanpy's view fits, its ``.h5ad``; its DE genes per perturbation."""
        output = self.output
        store = output.path(f"results:{method}")
        de_genes = tl.write_significant(store, output.path(f"significant:{method}"), max_pval_adj=FDR)
        written.add(f"significant:{method}")
        fits = self.scanpy_format or tl.check_results_writable(  # decided before filtering: fewer may fit now
            list(res.obs_names), tuple(res.layers), perturbation_column=self.perturbation_column
        )
        if fits:
            small = ad.read_zarr(store)
            tl.scanpy_uns(small)
            write(small, output.path(f"h5ad:{method}"), compression=None)  # speed; the .zarr stores are compressed
            written.add(f"h5ad:{method}")
        else:
            zarr_name = output.files[f"results:{method}"]
            warnings.warn(
                f"{output.files[f'h5ad:{method}']} is not written: {res.n_obs:,} perturbations are more than scanpy's "
                f"uns['rank_genes_groups'] record arrays hold in an .h5ad file (about 1,100). Every statistic is in "
                f"{zarr_name} (anndata.read_zarr, ps.get.dataset). For scanpy's view of some "
                f"perturbations: r = anndata.read_zarr('{zarr_name}')[perturbations].copy(); "
                "ps.tl.scanpy_uns(r); r.write_h5ad('subset.h5ad')",
                UserWarning,
                stacklevel=4,  # the caller of run: _tables < compose < run < caller
            )
        return de_genes


def _guide_targets_from_obs(obs: pd.DataFrame, perturbation_column: str) -> dict[str, str]:
    """Guide -> target from the cells: each value of ``obs['guide']`` whose cells carry one perturbation label."""
    frame = pd.DataFrame({"guide": obs["guide"].astype(str), "target": obs[perturbation_column].astype(str)})
    single = frame.groupby("guide")["target"].nunique()
    first = frame[frame["guide"].isin(single.index[single == 1])].drop_duplicates("guide")
    return dict(zip(first["guide"], first["target"], strict=True))


def _write_knockdown_cells(filtered: ad.AnnData, perturbation_column: str, path: Path) -> None:
    """The cells scored by :func:`pertscale.tl.knockdown` (a measured target): label, value, score, escaper flag."""
    columns = ["knockdown_value", "knockdown_score", "knockdown_escaper"]
    obs = filtered.obs
    scored = obs["knockdown_score"].notna().to_numpy()
    frame = pd.DataFrame(
        {"cell": obs.index[scored].astype(str), "perturbation": obs[perturbation_column].astype(str)[scored].to_numpy()}
        | {c: obs[c].to_numpy()[scored] for c in columns}
    )
    with replacing(path) as tmp:
        frame.to_parquet(tmp, index=False)


def _pseudobulk(filtered: ad.AnnData, path: Path, perturbation_column: str, control_label: str, *, target_sum: float):
    """Pseudo-bulk profiles of the kept cells and their log2 fold change against control, written to ``path``."""
    bulk = pb.pseudobulk(filtered, perturbation_column=perturbation_column, target_sum=target_sum)
    lfc = pb.log_fold_change(bulk, control_label=control_label, perturbation_column=perturbation_column)
    values = np.zeros(bulk.shape, dtype=np.float64)
    rows = pd.Index(bulk.obs[perturbation_column].astype(str)).get_indexer(lfc.obs[perturbation_column].astype(str))
    values[rows] = np.asarray(lfc.X)
    bulk.layers["log2_fold_change"] = values
    write(bulk, path, compression=None)


def _pca(filtered: ad.AnnData, n_comps: int, *, use_hvg: bool) -> ad.AnnData:
    """Principal components of the kept cells (one pass): obs, var, lazy obsm, varm and uns, no matrix.

    On the genes of this run's ``--hvg`` only: a ``highly_variable`` column the input carried is not used.
    """
    pp.pca(filtered, n_comps=n_comps, use_highly_variable=use_hvg)
    obs = filtered.obs.copy()
    for column in obs.columns:  # the labels the filters dropped are not categories of the kept cells
        if isinstance(obs[column].dtype, pd.CategoricalDtype):
            obs[column] = obs[column].cat.remove_unused_categories()
    return ad.AnnData(
        obs=obs,
        var=filtered.var.copy(),
        obsm={"X_pca": filtered.obsm["X_pca"]},
        varm={"PCs": filtered.varm["PCs"]},
        uns={"pca": filtered.uns["pca"]},
    )


def _steps(
    *,
    hvg,
    hvg_flavor: str,
    pca,
    pseudobulk: bool,
    assign_guides: str | None = None,
    guide_threshold: int = 5,
    calibration: bool = False,
    energy_distance: bool = False,
    n_permutations: int = 1000,
    guides: bool = False,
) -> dict[str, dict]:
    """The optional steps asked for, their settings checked before any pass."""
    steps: dict[str, dict] = {}
    if guides:
        steps["guide_de"] = {}
    if assign_guides is not None:
        if assign_guides not in GUIDE_METHODS:
            raise ValueError(
                f"assign_guides {assign_guides!r} is not a method; choose one of {', '.join(GUIDE_METHODS)} "
                "(--assign-guides)"
            )
        threshold = check_number(guide_threshold, "guide_threshold", integer=True, minimum=1, flag="--guide-threshold")
        steps["guides"] = {"method": assign_guides, "threshold": threshold}
    if calibration:
        steps["calibration"] = {}
    if energy_distance:
        if pca is None:
            raise ValueError(
                "--energy-distance measures each perturbation in the PCA embedding: add --pca N (e.g. --pca 50)"
            )
        n_permutations = check_number(n_permutations, "n_permutations", integer=True, minimum=1, flag="--permutations")
        if 1 / (n_permutations + 1) > FDR:  # nothing could be called: said before any pass
            raise ValueError(
                f"--permutations {n_permutations} cannot reach the run's FDR {FDR}: the smallest p-value a "
                f"permutation test gives is 1/(permutations + 1); use --permutations {int(1 / FDR)} or more"
            )
        steps["energy_distance"] = {"n_permutations": n_permutations}
    if hvg is not None:
        if hvg_flavor not in HVG_FLAVORS:
            raise ValueError(
                f"hvg_flavor {hvg_flavor!r} is not known; use one of {', '.join(HVG_FLAVORS)} (--hvg-flavor)"
            )
        if hvg_flavor == "seurat_v3":
            try:
                import skmisc.loess  # noqa: F401
            except ImportError as err:
                raise ValueError("--hvg-flavor seurat_v3 needs scikit-misc: pip install scikit-misc") from err
        n_top = check_number(hvg, "hvg", integer=True, minimum=1, flag="--hvg")
        steps["hvg"] = {"n_top_genes": n_top, "flavor": hvg_flavor}
    if pca is not None:
        steps["pca"] = {"n_comps": check_number(pca, "pca", integer=True, minimum=1, flag="--pca")}
        if "hvg" in steps and steps["pca"]["n_comps"] >= steps["hvg"]["n_top_genes"]:
            raise ValueError(
                f"--pca {pca} needs fewer components than the --hvg genes it uses ({hvg}); "
                f"lower --pca below {hvg} or raise --hvg"
            )
    if pseudobulk:
        steps["pseudobulk"] = {}
    return steps


def _methods(method: str | Iterable[str]) -> list[str]:
    """The tests asked for (a name, a comma-separated list or a list), in order, once each.

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    """
    items = [method] if isinstance(method, str) else list(method)
    names = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        shown = ", ".join(map(repr, unknown)) or repr(method)
        raise ValueError(f"method {shown} is not available; choose from {', '.join(METHODS)} (--method)")
    return list(dict.fromkeys(names))


def _client_workers(scheduler) -> tuple[int, int, int] | None:
    """Number, smallest memory limit and most threads of the workers of the distributed client the job will use."""
    client = active_client() if scheduler in (None, "local") else resolve_scheduler(scheduler)  # an address: connect
    if client is None or isinstance(client, str):
        return None
    workers = client.scheduler_info().get("workers", {})
    limits = [w.get("memory_limit") or 0 for w in workers.values()]
    threads = [w.get("nthreads") or 1 for w in workers.values()]
    return (len(workers), min(limits), max(threads)) if workers else None


def _directory(value, name: str, flag: str) -> Path:
    """A directory option as a path; an empty one (``--out ''``, which would mean the current directory) is refused.

    Raises
    ------
    ValueError
        For an empty or blank path.
    """
    if not str(value).strip():
        raise ValueError(
            f"{name} ({flag}) is empty: give a directory, for example {flag} results/ "
            "(an empty path would write into the current directory)"
        )
    return Path(value)

"""The ``pertscale`` command."""

from __future__ import annotations

import logging
import os
import sys

import click

from . import __version__
from .variables import LOGFOLDCHANGES, LOGFOLDCHANGES_RAW, PVALS_ADJ, STATISTICS, TIDY_COLUMNS, U_STATISTIC


def _count_verbose(ctx: click.Context, param, value: int) -> None:
    """Count -v/--verbose before the subcommand (``pertscale -v run``) and after it (``pertscale run ... -vv``)."""
    root = ctx.find_root()
    root.ensure_object(dict)
    root.obj["verbose"] = root.obj.get("verbose", 0) + value


#: -v/--verbose, taken by the group and by each subcommand alike
verbose_option = click.option(
    "-v",
    "--verbose",
    count=True,
    expose_value=False,
    callback=_count_verbose,
    help="More log messages (-v info, -vv debug); before or after the subcommand.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pertscale")
@verbose_option
@click.pass_context
def main(ctx: click.Context) -> None:
    """pertscale: out-of-core analysis of single-cell CRISPR screens on Dask.

    Run `pertscale run --help` for the main job.
    """
    ctx.ensure_object(dict)


def _configure_logging() -> int:
    """Configure logging from every -v given (the subcommand's options are parsed by now); return the count."""
    verbose = click.get_current_context().find_root().ensure_object(dict).get("verbose", 0)
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2), format="%(levelname)s %(name)s: %(message)s")
    return verbose


def _quiet_libraries(verbose: int) -> None:
    """Quiet distributed's loggers unless asked (-v).

    distributed warns about lost workers and slow closes when a run stops on
    an error or Ctrl-C; the run's own message says what happened.
    """
    import distributed  # noqa: F401  (configures its loggers on import; set their levels after)

    level = logging.WARNING - 10 * min(verbose, 2)
    for noisy in ("distributed", "bokeh", "tornado"):
        logging.getLogger(noisy).setLevel(logging.ERROR if verbose == 0 else max(level, logging.WARNING))


def _silence_exit_handlers() -> None:
    """Send what exit handlers print to /dev/null: the run has said why it stopped.

    The outputs are cleaned up by then; what remains is shutting the cluster
    down, and distributed's own exit handler raises (and prints a traceback)
    on a cluster that Ctrl-C caught while it was starting.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # not a real file (e.g. click's test runner)
            continue
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)


def _infer_labels(path, column, label, *, layer, use_raw) -> tuple[str, str]:
    """The perturbation column and control label not given, inferred from obs (said on stderr)."""
    from .io import detect_control_label, detect_perturbation_column, read

    adata = read(path, layer=layer, use_raw=use_raw)
    if column is None:
        column = detect_perturbation_column(adata, control_label=label)
    if label is None:
        if column not in adata.obs:
            raise KeyError(
                f"perturbation_column {column!r} not found in obs; columns present: {list(adata.obs.columns)}"
            )
        label = detect_control_label(adata.obs[column], column=column)
    click.echo(f"inferred: --perturbation-column {column} --control-label {label}", err=True)
    return column, label


def _bytes(text: str | None) -> int | None:
    """``8GB``, ``512MiB`` or a number of bytes, as dask writes memory limits."""
    if text is None:
        return None
    from dask.utils import parse_bytes

    try:
        return int(parse_bytes(text))
    except (ValueError, TypeError) as err:
        raise click.BadParameter(f"{text!r} is not a size such as 8GB or 512MiB", param_hint="--memory-limit") from err


def _finite(name: str, **bounds):
    """A click callback: the option is a finite number within bounds (one message for CLI and API)."""

    def callback(ctx, param, value):
        from ._validation import check_number

        try:
            return check_number(value, name, allow_none=True, flag=param.opts[0], **bounds)
        except (TypeError, ValueError) as err:
            raise click.UsageError(str(err), ctx) from err

    return callback


def _target_sum(ctx, param, value):
    """A click callback: --target-sum in the range float32 normalization holds (the API's check and message)."""
    from ._validation import check_target_sum

    try:
        return check_target_sum(value, flag=param.opts[0])
    except (TypeError, ValueError) as err:
        raise click.UsageError(str(err), ctx) from err


def _pair(name: str, **bounds):
    """A click callback: one number, or two comma-separated (control, perturbation), each finite and in range."""

    def callback(ctx, param, value):
        from ._validation import check_number

        parts = [p.strip() for p in str(value).split(",")]
        usage = f"{param.opts[0]} takes one number or two (CONTROL,PERTURBATION), not {value!r}"
        try:
            if len(parts) not in (1, 2):
                raise ValueError(usage)
            try:
                floats = [float(p) for p in parts]
            except ValueError:
                raise ValueError(usage) from None
            numbers = [check_number(v, name, flag=param.opts[0], minimum=0, **bounds) for v in floats]
        except (TypeError, ValueError) as err:
            raise click.UsageError(str(err), ctx) from err
        return numbers[0] if len(numbers) == 1 else tuple(numbers)

    return callback


#: ``pertscale run --help``: the statistics and columns named from :mod:`pertscale.variables`.
RUN_HELP = f"""QC, normalization and a test of every perturbation against control.

    INPUT is an .h5ad file or a .zarr store of raw UMI counts. Writes, in
    --out, per --method: de_<method>.zarr (perturbations x genes; layers
    {", ".join(s for s in STATISTICS["wilcoxon"] if s != U_STATISTIC)} ({LOGFOLDCHANGES} in log2), and
    {U_STATISTIC} for the Wilcoxon; nb-glm: {", ".join(STATISTICS["nb-glm"])}),
    de_<method>.h5ad (the same with scanpy's view, where it fits),
    de_<method>_significant.csv (columns {", ".join(TIDY_COLUMNS)}; rows with
    {PVALS_ADJ} < 0.05), de_<method>.parquet (every pair, long),
    de_<method>_effects.csv (one row per perturbation: DE genes, knock-down,
    transcriptome-wide impact), de_<method>_knockdown.csv and
    knockdown_cells.parquet (each perturbation's own target; escapers); and
    qc.csv (cells per perturbation before and after filtering); with --hvg,
    --pca and --pseudobulk also genes.csv, pca.zarr and pseudobulk.h5ad; with
    --assign-guides guides.parquet, --calibration calibration.csv,
    --energy-distance energy_distance.csv, and --guides de_guides.zarr and
    guide_concordance.csv. The files appear together when the run succeeds; a
    failed or interrupted run (Ctrl-C: exit code 130) leaves none. The input
    is never modified, and an --out holding earlier results is refused unless
    --overwrite is given. Every name is explained in docs/usage.md ("Names of
    statistics and columns").

    \b
    Example:
        pertscale run screen.h5ad --perturbation-column perturbation
        --control-label control --out results/
    """


@main.command(help=RUN_HELP)
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=str))
@click.option(
    "--perturbation-column",
    default=None,
    help="obs column naming each cell's perturbation (default: inferred, when one column clearly is).",
)
@click.option(
    "--control-label",
    default=None,
    help="Label of the control cells, e.g. non-targeting (default: inferred from the usual names: "
    "non-targeting, NT, NTC, control, ctrl, safe-targeting, ...).",
)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str), help="Output directory (created).")
@click.option("--layer", default=None, help="Read this layer of raw counts instead of X.")
@click.option("--use-raw", is_flag=True, default=False, help="Read raw.X (raw counts kept in .raw) instead of X.")
@click.option(
    "--overwrite",
    is_flag=True,
    default=False,
    help="Replace the results of an earlier pertscale run in --out (refused without it). Only files a run "
    "recorded writing (.pertscale-manifest.json), unchanged since, are replaced; other files of an output's name "
    "refuse the run, and no other file is touched.",
)
@click.option(
    "--min-genes",
    default=20,
    show_default=True,
    type=click.IntRange(min=0),
    help="Keep cells with at least this many detected genes (0: off).",
)
@click.option(
    "--min-cells",
    default=3,
    show_default=True,
    type=click.IntRange(min=0),
    help="Keep genes detected in at least this many cells (0: off).",
)
@click.option(
    "--min-cells-per-perturbation",
    default=20,
    show_default=True,
    type=click.IntRange(min=2),
    help="Test perturbations with at least this many cells after filtering.",
)
@click.option(
    "--exclude-labels",
    default="multiple,unassigned",
    show_default=True,
    help="Comma-separated labels whose cells are dropped ('' for none).",
)
@click.option(
    "--target-sum",
    default=1e4,
    show_default=True,
    type=float,
    callback=_target_sum,
    help="Counts per cell after normalize_total, before log1p (between 1e-28 and 1e37: beyond, the float32 "
    "normalized values overflow or underflow).",
)
@click.option(
    "--chunk-size",
    default=None,
    type=click.IntRange(min=1),
    help="Cells per row block (default: from available memory).",
)
@click.option(
    "--scheduler",
    default=None,
    help="local (LocalCluster, one process per core), synchronous, threads, processes, or an address "
    "(default: chosen by the plan: threads for matrices under 2 GiB in memory, else local).",
)
@click.option(
    "--connect-timeout",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds to wait for a --scheduler address to answer (default 5).",
)
@click.option(
    "--cluster",
    "batch_system",
    default=None,
    type=click.Choice(["slurm", "pbs", "sge", "lsf"]),
    help="Run the workers as batch jobs through dask-jobqueue (pip install 'pertscale[hpc]'); options left out "
    "come from dask's jobqueue.yaml. Input, --out and the working store must be on a shared file system.",
)
@click.option("--cores", default=None, type=click.IntRange(min=1), help="--cluster: cores per job.")
@click.option("--memory", default=None, help="--cluster: memory per job, e.g. 32GB.")
@click.option("--walltime", default=None, help="--cluster: time limit per job, e.g. 02:00:00.")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1), help="--cluster: jobs to submit.")
@click.option("--queue", default=None, help="--cluster: partition or queue.")
@click.option("--account", default=None, help="--cluster: account (project) to charge.")
@click.option(
    "--memory-limit",
    default=None,
    help="Memory per worker to plan for, e.g. 8GB (default: the workers' limit or the available memory).",
)
@click.option(
    "--working-store",
    default=None,
    type=click.Path(path_type=str),
    help="Where to write the perturbation-sorted copy of an unsorted input (default: OUT/working_store.zarr).",
)
@click.option(
    "--resume",
    is_flag=True,
    default=False,
    help="Continue an interrupted run with the same input and options: the result blocks it wrote are kept. "
    "On an --out holding a finished run's results and nothing interrupted it stops with 'nothing to resume' "
    "(exit code 1); with neither, it starts from the beginning.",
)
@click.option(
    "--report/--no-report",
    default=True,
    show_default=True,
    help="Write OUT/report.html: one self-contained page (figures embedded, opens offline) with QC, the DE genes "
    "per perturbation, volcano plots, knock-down of targets, the plan, time and memory, settings and files.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    default=False,
    help="Print the plan (memory, disk, passes) and whether the run would be refused (results already in --out, "
    "files in the way, a lock held), and stop; exit code 1 if it would not run. Nothing is written.",
)
@click.option(
    "--method",
    default="wilcoxon",
    show_default=True,
    help="Test(s) against control, comma-separated: wilcoxon, t-test, t-test_overestim_var, nb-glm (raw counts). "
    "Several share the QC pass and read each block once; each writes de_<method>.* (- as _).",
)
@click.option(
    "--size-factors",
    "size_factor_method",
    type=click.Choice(["sparse", "poscounts", "ratio"]),
    default="sparse",
    show_default=True,
    help="nb-glm: median-of-ratios size factors (sparse: over each cell's non-zero genes, as crispyx; poscounts: "
    "DESeq2's single-cell variant; ratio: DESeq2's classic).",
)
@click.option(
    "--dispersion",
    "dispersion_method",
    type=click.Choice(["cox-reid", "moments"]),
    default="cox-reid",
    show_default=True,
    help="nb-glm: gene-wise dispersions by Cox-Reid adjusted profile likelihood (then trend and prior, as DESeq2) "
    "or by moments (one pass, fast).",
)
@click.option(
    "--dispersion-cells",
    "dispersion_cells",
    type=click.IntRange(min=2),
    default=None,
    help="nb-glm: fit the dispersions on at most this many cells (a sample stratified by perturbation, seed 0, "
    "recorded): one read of the matrix instead of one per Newton step when it fits in memory. Default: all cells.",
)
@click.option(
    "--covariates",
    default="",
    help="nb-glm: comma-separated obs columns (e.g. bio_rep) whose effects are estimated on the control cells "
    "and taken out.",
)
@click.option(
    "--shrink/--no-shrink",
    default=True,
    show_default=True,
    help=f"nb-glm: apeGLM-shrunk {LOGFOLDCHANGES} (the MLE is kept as {LOGFOLDCHANGES_RAW}).",
)
@click.option(
    "--alternative",
    type=click.Choice(["two-sided", "greater", "less"]),
    default="two-sided",
    show_default=True,
    help="Alternative hypothesis; greater: higher in the perturbation than in control.",
)
@click.option(
    "--min-pct",
    default="0",
    show_default=True,
    callback=_pair("min_pct", maximum=1),
    help="Test a gene in a comparison only when, on the perturbation's or the control's side, at least this "
    "fraction of cells has a count (and --min-mean holds); others are NaN. One number, or CONTROL,PERTURBATION.",
)
@click.option(
    "--min-mean",
    default="0",
    show_default=True,
    callback=_pair("min_mean"),
    help="The same with the mean (log1p units; nb-glm: normalized counts).",
)
@click.option(
    "--continuity/--no-continuity",
    default=False,
    show_default=True,
    help="Continuity correction of the normal approximation.",
)
@click.option(
    "--corr-method",
    type=click.Choice(["benjamini-hochberg", "bonferroni"]),
    default="benjamini-hochberg",
    show_default=True,
    help="Multiple-testing correction over the genes of each perturbation.",
)
@click.option(
    "--hvg",
    default=None,
    type=click.IntRange(min=1),
    help="Also select this many highly variable genes of the kept genes (one pass; off by default); "
    "their table goes to genes.csv.",
)
@click.option(
    "--hvg-flavor",
    type=click.Choice(["seurat", "cell_ranger", "seurat_v3"]),
    default="seurat",
    show_default=True,
    help="--hvg: scanpy's flavor (seurat_v3 reads the counts, two passes, needs scikit-misc).",
)
@click.option(
    "--pca",
    default=None,
    type=click.IntRange(min=1),
    help="Also compute this many principal components of the log1p values (of the --hvg genes when given) "
    "into pca.zarr (off by default).",
)
@click.option(
    "--pseudobulk",
    is_flag=True,
    default=False,
    help="Also write pseudobulk.h5ad: summed counts, mean log1p and log2 fold change against control per "
    "perturbation (one pass).",
)
@click.option(
    "--assign-guides",
    "assign_guides",
    type=click.Choice(["umi_threshold", "max", "mixture"]),
    default=None,
    help="First assign each cell its guide from the per-guide UMI counts in obsm['grna_counts'] (ps.pp.assign_guides) "
    "and test the assigned labels; writes guides.parquet.",
)
@click.option(
    "--guide-threshold",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="--assign-guides umi_threshold: UMIs at which a guide counts as detected in a cell.",
)
@click.option(
    "--calibration",
    is_flag=True,
    default=False,
    help="Also test pseudo-perturbations made of control cells only with each method and check that their "
    "p-values are uniform (calibration.csv, calibration_pvalues.parquet; QQ plot in the report).",
)
@click.option(
    "--energy-distance",
    "energy_distance",
    is_flag=True,
    default=False,
    help="Also compute each perturbation's energy distance to control in the PCA embedding with a permutation "
    "test (energy_distance.csv); needs --pca.",
)
@click.option(
    "--guides",
    is_flag=True,
    default=False,
    help="Also test each guide against control (de_guides.zarr, from a per-cell guide column such as guide_id) "
    "and write the agreement of the guides of each target (guide_concordance.csv).",
)
@click.option(
    "--permutations",
    "n_permutations",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="--energy-distance: permutations per perturbation.",
)
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Progress bars; plain lines, one every 30 s, where stderr is not a terminal (a batch job's log).",
)
@verbose_option
def run(
    *,
    input_path,
    perturbation_column,
    control_label,
    out_dir,
    layer,
    use_raw,
    overwrite,
    min_genes,
    min_cells,
    min_cells_per_perturbation,
    exclude_labels,
    target_sum,
    chunk_size,
    scheduler,
    connect_timeout,
    batch_system,
    cores,
    memory,
    walltime,
    jobs,
    queue,
    account,
    memory_limit,
    working_store,
    resume,
    dry_run,
    method,
    size_factor_method,
    dispersion_method,
    dispersion_cells,
    covariates,
    shrink,
    alternative,
    min_pct,
    min_mean,
    continuity,
    corr_method,
    hvg,
    hvg_flavor,
    pca,
    pseudobulk,
    assign_guides,
    guide_threshold,
    calibration,
    energy_distance,
    n_permutations,
    guides,
    progress,
    report,
) -> None:  # noqa: PLR0913
    """The main job (``pertscale run``); its help is :data:`RUN_HELP`."""
    import warnings

    from ._settings import settings
    from ._signals import Terminated, recorded

    verbose = _configure_logging()
    labels = tuple(s.strip() for s in exclude_labels.split(",") if s.strip())
    timeout = {} if connect_timeout is None else {"connect_timeout": connect_timeout}
    # Ctrl-C, and a batch system's SIGTERM, clean up and are never lost (see _signals)
    with warnings.catch_warnings(record=True) as caught, recorded(), settings.override(**timeout):
        warnings.simplefilter("always", UserWarning)
        try:
            _quiet_libraries(verbose)
            from .cluster import check_scheduler
            from .job import run as run_pipeline

            check_scheduler(scheduler)  # a misspelt name or malformed address: at once, before reading the input

            if assign_guides is not None:  # the labels are made from the guide counts
                perturbation_column = perturbation_column or "perturbation_assigned"
                control_label = control_label or "control"
            if perturbation_column is None or control_label is None:
                perturbation_column, control_label = _infer_labels(
                    input_path, perturbation_column, control_label, layer=layer, use_raw=use_raw
                )
            if batch_system is not None:
                if scheduler is not None:
                    raise ValueError("give --cluster or --scheduler, not both")
                from .cluster import jobqueue

                scheduler = jobqueue(
                    batch_system,
                    cores=cores,
                    memory=memory,
                    walltime=walltime,
                    jobs=jobs,
                    queue=queue,
                    account=account,
                )
                n = len(scheduler.scheduler_info()["workers"])
                click.echo(f"{batch_system}: {jobs} job(s) running, {n} worker(s) connected", err=True)
            elif any(v is not None for v in (cores, memory, walltime, queue, account)):
                raise ValueError("--cores, --memory, --walltime, --queue and --account go with --cluster")
            summary = run_pipeline(
                input_path,
                out_dir,
                perturbation_column=perturbation_column,
                control_label=control_label,
                min_genes=min_genes,
                min_cells=min_cells,
                min_cells_per_perturbation=min_cells_per_perturbation,
                exclude_labels=labels,
                target_sum=target_sum,
                layer=layer,
                use_raw=use_raw,
                overwrite=overwrite,
                chunk_size=chunk_size,
                memory_limit=_bytes(memory_limit),
                working_store=working_store,
                resume=resume,
                dry_run=dry_run,
                method=method,
                size_factor_method=size_factor_method,
                dispersion_method=dispersion_method,
                dispersion_cells=dispersion_cells,
                shrink=shrink,
                covariates=[c.strip() for c in covariates.split(",") if c.strip()],
                alternative=alternative,
                min_pct=min_pct,
                min_mean=min_mean,
                use_continuity=continuity,
                corr_method=corr_method,
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
                scheduler=scheduler,
                progress=progress,
                report=report,
            )
        except (
            FileNotFoundError,
            FileExistsError,
            PermissionError,
            ValueError,
            KeyError,
            MemoryError,
            TimeoutError,
            ConnectionError,
            ImportError,
        ) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise click.ClickException(str(message)) from err
        except (KeyboardInterrupt, Terminated) as stop:
            term = isinstance(stop, Terminated)
            click.echo(f"\n{'terminated' if term else 'interrupted'}: no results were written", err=True)
            _silence_exit_handlers()
            raise click.exceptions.Exit(143 if term else 130) from None
    for w in caught:
        if issubclass(w.category, UserWarning) and "pertscale" in str(w.filename):
            click.echo(f"warning: {w.message}", err=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for line in summary.lines():
        click.echo(line)
    if dry_run and (getattr(summary, "problems", None) or getattr(summary, "refusals", None)):
        raise click.exceptions.Exit(1)


#: ``pertscale simulate --help``.
SIMULATE_HELP = """Write a simulated screen with known effects: a start without real data.

    OUT is the .h5ad file or .zarr store to write (the format by its suffix).
    The counts are negative binomial, as ps.datasets.simulate_screen draws
    them: each perturbation knocks down its target gene to 10-50 % of its
    expression and changes 10 other genes. The true effects are stored with
    the screen, to check results against: uns['simulation']['log2_effects']
    (perturbations x genes, log2 fold changes), uns['simulation']['targets']
    and obs['target_gene']; ps.datasets.known_effects(OUT) lists them as a
    table. The same seed and sizes give the same screen, whatever --jobs.
    The counts are streamed to disk block by block: memory is a few blocks
    of cells (and obs), whatever --cells. An existing OUT is refused unless
    --overwrite is given; an interrupted run (Ctrl-C: exit code 130) leaves
    OUT as it was.

    \b
    Example:
        pertscale simulate sim.h5ad --cells 20000 --genes 1000 --perturbations 50
        pertscale run sim.h5ad --perturbation-column perturbation
        --control-label control --out results/sim
    """


@main.command(help=SIMULATE_HELP)
@click.argument("out_path", metavar="OUT", type=click.Path(path_type=str))
@click.option("--cells", default=10_000, show_default=True, type=click.IntRange(min=1), help="Cells, control included.")
@click.option("--genes", default=2_000, show_default=True, type=click.IntRange(min=1), help="Genes.")
@click.option(
    "--perturbations",
    default=50,
    show_default=True,
    type=click.IntRange(min=1),
    help="Perturbations, each with its own target gene while there are enough genes.",
)
@click.option(
    "--control-fraction",
    default=0.1,
    show_default=True,
    type=float,
    callback=_finite("control_fraction", minimum=0, maximum=1, min_open=True, max_open=True),
    help="Fraction of the cells labelled control; the others are spread evenly over the perturbations.",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed: same seed, same screen.")
@click.option(
    "--sorted",
    "sort",
    is_flag=True,
    default=False,
    help="Store the cells sorted by perturbation (control first) instead of in random order, as a real screen's "
    "barcodes are.",
)
@click.option(
    "--jobs",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Processes simulating blocks of cells (the screen is the same for any number).",
)
@click.option("--overwrite", is_flag=True, default=False, help="Replace OUT if it exists (refused without it).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar.")
@verbose_option
def simulate(*, out_path, cells, genes, perturbations, control_fraction, seed, sort, jobs, overwrite, progress) -> None:
    """``pertscale simulate``: :func:`pertscale.datasets.simulate_screen` to a file; help in :data:`SIMULATE_HELP`."""
    import re
    import shlex
    import time
    from pathlib import Path

    from ._settings import settings
    from ._signals import Terminated, recorded

    _configure_logging()
    path = Path(out_path)
    flags = {"n_cells": "--cells", "n_genes": "--genes", "n_perturbations": "--perturbations"}
    flags["control_fraction"] = "--control-fraction"
    start = time.perf_counter()
    with recorded(), settings.override(progress=progress):
        try:
            from .datasets import simulate_screen
            from .io._write import check_format

            check_format(path, what="cannot write")
            if os.path.lexists(path):
                if not overwrite:
                    raise FileExistsError(f"{out_path!r} already exists; pass --overwrite to replace it")
                store = path.is_dir() and any((path / m).exists() for m in ("zarr.json", ".zgroup", ".zattrs"))
                if path.is_dir() and not store:
                    raise FileExistsError(
                        f"{out_path!r} is a directory but not a zarr store: not replaced, even with --overwrite; "
                        "choose another path"
                    )
            simulate_screen(
                cells,
                genes,
                perturbations,
                control_fraction=control_fraction,
                seed=seed,
                sort=sort,
                path=path,
                n_jobs=jobs,
            )
        except (FileNotFoundError, FileExistsError, PermissionError, ValueError, TypeError) as err:
            # the API names its parameters; say the options
            message = re.sub(r"\b(n_cells|n_genes|n_perturbations|control_fraction)\b", lambda m: flags[m[1]], str(err))
            raise click.ClickException(message) from err
        except (KeyboardInterrupt, Terminated) as stop:
            term = isinstance(stop, Terminated)
            click.echo(f"\n{'terminated' if term else 'interrupted'}: {out_path} was not written", err=True)
            raise click.exceptions.Exit(143 if term else 130) from None
    seconds = time.perf_counter() - start

    # what was written, read back from the store (its obs column, the matrix's row pointer and the settings)
    import anndata as ad

    if path.is_dir():
        import zarr

        root, close = zarr.open_group(str(path), mode="r"), (lambda: None)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    else:
        import h5py

        root = h5py.File(path, "r")
        close, size = root.close, path.stat().st_size
    try:
        nnz = int(root["X"]["indptr"][-1])
        sim = {k: ad.io.read_elem(root["uns"]["simulation"][k]) for k in ("n_mito", "n_affected", "control_label")}
        labels = ad.io.read_elem(root["obs"]["perturbation"])
    finally:
        close()
    n_control = int((labels == sim["control_label"]).sum())
    name = shlex.quote(out_path)
    for line in (
        f"wrote {out_path} ({size / 2**20:,.1f} MiB) in {seconds:.1f} s",
        f"cells: {cells:,} ({n_control:,} control: {sim['control_label']!r} in obs['perturbation'])",
        f"genes: {genes:,} ({int(sim['n_mito'])} mitochondrial, MT-...)",
        f"perturbations: {perturbations:,}, each knocking down its target (obs['target_gene']) and changing "
        f"{int(sim['n_affected'])} other genes",
        f"non-zero counts: {nnz:,} ({nnz / (cells * genes):.1%} of the matrix)",
        f"known effects: uns['simulation']['log2_effects'] ({perturbations:,} perturbations x {genes:,} genes, "
        "true log2 fold changes; targets in uns['simulation']['targets']); "
        f"as a table: ps.datasets.known_effects({out_path!r})",
        f"seed: {seed} (the same seed and sizes give the same screen)",
        f"next: pertscale run {name} --perturbation-column perturbation --control-label control "
        f"--out {shlex.quote('results/' + path.stem)}",
    ):
        click.echo(line)


def entry() -> None:
    """The console script: ``main`` with Ctrl-C at any moment ending in exit code 130, quietly."""
    try:
        code = main.main(standalone_mode=False)
    except click.exceptions.Abort:  # click's wrapping of a KeyboardInterrupt outside the run itself
        click.echo("\ninterrupted: no results were written", err=True)
        code = 130
    except click.ClickException as err:
        err.show()
        code = err.exit_code
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    entry()

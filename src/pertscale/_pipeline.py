"""Deprecated location of the main job, kept for one release: use :mod:`pertscale.job` (``ps.run``)."""

from .job import (  # noqa: F401
    CSR_COPY,
    FDR,
    METHODS,
    OUTPUT_NAMES,
    STEP_FILES,
    WORKING_STORE,
    DiskFullError,
    OutputDir,
    Plan,
    RunSummary,
    make_plan,
    output_files,
    run,
)

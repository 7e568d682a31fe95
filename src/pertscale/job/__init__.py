"""The main job, ``pertscale run`` and :func:`pertscale.run`: the public analyses composed, at the face.

A module per concern:

- :mod:`~pertscale.job._run`: :func:`run`, the checks before any pass and
  the composition of the analyses (``prepare`` -> ``qc_summary`` ->
  ``apply`` -> nb-glm's steps -> ``normalize_total`` -> ``log1p`` -> the
  optional steps -> ``rank_genes_groups`` of each method -> one write ->
  the tables), inside one :func:`pertscale.cluster.using` block;
- :mod:`~pertscale.job._plan`: :class:`Plan` and :func:`make_plan`, from
  the file's metadata and ``obs`` only (blocks, memory per worker, disk,
  passes, the scheduler);
- :mod:`~pertscale.job._output`: the output directory (:class:`OutputDir`:
  checked first, files staged and committed together, the manifest), the
  names of the outputs, :class:`DiskFullError`;
- :mod:`~pertscale.job._working_store`: where the working store and the
  CSR copy of a CSC input go, and whether they can;
- :mod:`~pertscale.job._summary`: :class:`RunSummary`, what the command prints;
- :mod:`~pertscale.job._profile`: the time and memory of each stage and process;
- :mod:`~pertscale.job._record`: ``run.json``, ``qc_cells.zarr`` and the
  report (:func:`report` makes it again from an output directory).

The job imports only the public names of the analyses (``pp``, ``tl``,
``pb``); ``tests/test_job.py`` checks it.
"""

from ._output import METHODS, OUTPUT_NAMES, STEP_FILES, DiskFullError, OutputDir, output_files
from ._plan import Plan, make_plan
from ._record import report
from ._run import run
from ._summary import FDR, RunSummary
from ._working_store import CSR_COPY, WORKING_STORE

__all__ = [
    "CSR_COPY",
    "FDR",
    "METHODS",
    "OUTPUT_NAMES",
    "STEP_FILES",
    "WORKING_STORE",
    "DiskFullError",
    "OutputDir",
    "Plan",
    "RunSummary",
    "report",
    "make_plan",
    "output_files",
    "run",
]

"""Deprecated location of the main job's plan, kept for one release: use :mod:`pertscale.job`."""

from .job._plan import *  # noqa: F403
from .job._plan import Plan, make_plan  # noqa: F401

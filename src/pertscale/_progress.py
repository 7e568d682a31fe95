"""Progress bars: tqdm's in a terminal or a notebook, plain periodic lines in a log.

A leaf module (display only, nothing is computed here): the face's context
(:func:`pertscale.cluster.using`) draws a bar for each computation it runs,
labelled by :func:`labelled` where an analysis names its pass; a loop below
the face that computes in steps (pseudo-bulk's batches, the streaming
writer) draws one bar over its steps with :func:`steps`, inside which the
face draws none of its own. Outside the face nothing is drawn unless a loop
asks.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.std import tqdm

from ._settings import settings

#: Whether a loop's own bar is showing: the face then draws none per computation.
_in_steps: contextvars.ContextVar[bool] = contextvars.ContextVar("pertscale_in_steps", default=False)
#: What is being computed, for the label of the face's bar (``"QC metrics"``).
_label: contextvars.ContextVar[str | None] = contextvars.ContextVar("pertscale_label", default=None)


class LogLines(tqdm):
    """A progress bar as plain lines, for a log (a batch job's output, ``2> log``) rather than a terminal.

    tqdm redraws its bar in place with carriage returns, which a log file
    keeps as one ever-growing line. This bar writes a line when it starts,
    then at most one every ``settings.progress_interval`` seconds (at the
    first update after it), and a last one when it closes, each with the
    step, done/total and the time elapsed and left::

        sort into the working store: 40/120 chunks (33%), 01:00 elapsed, about 02:00 left

    It takes tqdm's arguments (``leave`` is ignored: a line once written stays).
    """

    def __init__(self, *args, **kwargs):
        interval = settings.progress_interval
        kwargs.update(mininterval=interval, maxinterval=max(interval, 10.0), miniters=1)
        kwargs["desc"] = kwargs.get("desc") or "computing"
        super().__init__(*args, **kwargs)

    def line(self) -> str:
        """The current state as one line of text."""
        n, total, elapsed = self.n, self.total, self.format_dict["elapsed"]
        unit = "" if self.unit == "it" else f" {self.unit}s"  # tqdm's default unit says nothing
        text = f"{self.desc}: {n:,}/{total:,}{unit} ({100 * n / total:.0f}%)" if total else f"{self.desc}: {n:,}{unit}"
        text += f", {self.format_interval(elapsed)} elapsed"
        if total and 0 < n < total:
            text += f", about {self.format_interval(elapsed / n * (total - n))} left"
        return text

    def display(self, msg=None, pos=None) -> bool:
        """Write the state as one line; ``close`` clearing the bar (``msg=''``) writes nothing."""
        if msg == "":
            return False
        self.fp.write((self.line() if msg is None else msg) + "\n")
        self.fp.flush()
        return True

    def close(self) -> None:
        """Write the last state (unless it was just written), then close."""
        if not self.disable and self.n != self.last_print_n:
            self.display()
        super().close()


def progress_bar_class() -> type:
    """The progress bar's class: tqdm's where stderr is a terminal or a notebook, else :class:`LogLines` (a log).

    In a notebook, tqdm's widget where ipywidgets is installed, else its text
    bar (tqdm's widget module warns at every bar without ipywidgets).
    """
    import importlib.util

    stream = sys.stderr
    if type(stream).__module__.startswith("ipykernel"):  # a notebook's output: not a tty, but may show widgets
        if importlib.util.find_spec("ipywidgets") is None:
            return tqdm
        from tqdm.notebook import tqdm as widget

        return widget
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # no stream, or a closed one
        terminal = False
    return tqdm if terminal else LogLines


def label() -> str | None:
    """The label of what is computed now (:func:`labelled`), or ``None``."""
    return _label.get()


@contextmanager
def labelled(desc: str) -> Iterator[None]:
    """Name what the computations inside are, for the label of the face's progress bar."""
    token = _label.set(desc)
    try:
        yield
    finally:
        _label.reset(token)


def in_steps() -> bool:
    """Whether a loop's bar (:func:`steps`) is showing now."""
    return _in_steps.get()


@contextmanager
def steps(total: int, desc: str, *, unit: str = "block") -> Iterator[tqdm]:
    """A bar over the steps of a loop that computes in parts; per-computation bars are off inside it.

    Shown when ``ps.settings.progress`` is on (a disabled bar otherwise),
    as :func:`progress_bar_class` draws it.
    """
    token = _in_steps.set(True)
    try:
        with progress_bar_class()(total=total, desc=desc, leave=False, unit=unit, disable=not settings.progress) as bar:
            yield bar
    finally:
        _in_steps.reset(token)

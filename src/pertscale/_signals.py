"""Ctrl-C and SIGTERM in the ``pertscale`` command: never lost, even when Python swallows the exception.

Python runs a signal handler between two bytecodes of the main thread. When
that happens inside a finalizer (a weakref callback, ``__del__``, which the
garbage collector runs at any moment), the exception it raises is printed as
"Exception ignored in ..." and dropped, and the run would go on to finish as
if nothing had happened. The handlers of :func:`recorded` also record the signal, and
:func:`check` raises it again where results are about to be committed.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

#: Signals received by the handlers of :func:`install`, in order.
received: list[int] = []


class Terminated(BaseException):
    """SIGTERM arrived (a batch system ending the job): unwind, clean up, exit 143."""


def _raise(signum: int) -> None:
    if signum == signal.SIGTERM:
        raise Terminated
    raise KeyboardInterrupt


def _handler(signum, frame) -> None:
    received.append(signum)
    _raise(signum)


@contextmanager
def recorded() -> Iterator[None]:
    """Within: SIGINT and SIGTERM are recorded, then raised (``KeyboardInterrupt``, ``Terminated``).

    A stop raised inside a finalizer is not printed ("Exception ignored
    in ..."): :func:`check` raises it again. The previous handlers are
    restored on exit. Main thread only.
    """
    received.clear()
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook

    def quiet(unraisable) -> None:  # a swallowed stop is recorded and raised again: do not print it
        if not isinstance(unraisable.exc_value, KeyboardInterrupt | Terminated):
            hook(unraisable)

    sys.unraisablehook = quiet
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for s, h in previous.items():
            signal.signal(s, h)


def check() -> None:
    """Raise again a signal that :func:`recorded` recorded; nothing when none arrived.

    Raises
    ------
    KeyboardInterrupt, Terminated
        For SIGINT and SIGTERM.
    """
    if received:
        _raise(received[0])

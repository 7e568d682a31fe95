"""Imported by the fork server of pertscale's local cluster: its worker processes ignore SIGINT.

See :func:`pertscale.cluster._workers_ignore_sigint`.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
if hasattr(signal, "pthread_sigmask"):  # started with SIGINT blocked (see there): a pending one is now discarded
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

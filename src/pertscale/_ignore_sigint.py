"""Imported by the fork server of pertscale's local cluster: its worker processes ignore SIGINT.

See :func:`pertscale.cluster._workers_ignore_sigint`.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)

"""Plots of pertscale's results (matplotlib), read lazily from results in memory or on disk.

Each plot returns its matplotlib ``Axes`` (or ``Figure`` for a panel of
axes), takes ``ax=`` where it draws one axes, and saves with ``save=PATH``.
Keyword names follow scanpy's where scanpy has the same plot.
"""

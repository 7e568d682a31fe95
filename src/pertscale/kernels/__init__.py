"""Pure block kernels (numpy, scipy, numba): no Dask inside.

Each kernel is a function of one in-memory block and, where needed, small
frozen statistics; the Dask orchestration in :mod:`pertscale.pp` and
:mod:`pertscale.tl` maps them over row blocks. Modules that use numba are
imported lazily by the orchestration so that ``import pertscale`` stays fast.
"""

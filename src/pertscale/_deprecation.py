"""Deprecated spellings of arguments, still taken for one release with a ``FutureWarning``.

One decorator, :func:`renamed_arguments`, for every public function whose
arguments changed: arguments that became keyword-only (``perturbation_column``
and ``control_label``) are still taken positionally, and old argument names
(``groupby`` of :func:`pertscale.pb.pseudobulk`, ``min_cells`` of
:func:`pertscale.tl.rank_genes_groups`) are still taken by name; each with a
``FutureWarning`` that names the new spelling.

A leaf module: it imports nothing of pertscale.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def renamed_arguments(*, positional: tuple[str, ...] = (), renamed: dict[str, str] | None = None) -> Callable[[F], F]:
    """Take the earlier spellings of a function's arguments, with a ``FutureWarning`` naming the new one.

    Parameters
    ----------
    positional
        Keyword-only arguments that earlier releases took positionally, in
        their earlier order, right after the function's positional
        arguments (``("perturbation_column", "control_label")``).
    renamed
        Earlier argument names -> the current ones (``{"groupby":
        "perturbation_column"}``; :data:`pertscale.variables.RENAMED_ARGUMENTS`);
        also kept on the function as ``renamed_arguments``.

    Returns
    -------
    callable
        A decorator. The decorated function keeps its signature and
        docstring (``functools.wraps``).

    Raises
    ------
    TypeError
        At call time, if an argument is given both ways, or more
        positional arguments are given than the earlier spelling took.
    """
    renamed = dict(renamed or {})

    def decorate(func: F) -> F:
        params = inspect.signature(func).parameters.values()
        n_positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
        name = f"{func.__module__.replace('pertscale', 'ps').split('._')[0]}.{func.__name__}"

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            for old, new in renamed.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{name}() got both {old}= and {new}=; {old} is the old name of {new}")
                    warnings.warn(
                        f"{name}(..., {old}=...) is deprecated: the argument is now {new}=",
                        FutureWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            extra = args[n_positional:]
            if extra:
                if len(extra) > len(positional):
                    raise TypeError(
                        f"{name}() takes {n_positional} positional argument(s) "
                        f"({n_positional + len(positional)} in earlier releases) but {len(args)} were given"
                    )
                names = positional[: len(extra)]
                both = [n for n in names if n in kwargs]
                if both:
                    raise TypeError(f"{name}() got multiple values for argument {both[0]!r}")
                spelled = ", ".join(f"{n}={v!r}" for n, v in zip(names, extra, strict=False))
                warnings.warn(
                    f"passing {', '.join(names)} to {name}() positionally is deprecated: they are keyword-only; "
                    f"call {name}(..., {spelled})",
                    FutureWarning,
                    stacklevel=2,
                )
                kwargs.update(zip(names, extra, strict=False))
                args = args[:n_positional]
            return func(*args, **kwargs)

        wrapper.renamed_arguments = renamed  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate

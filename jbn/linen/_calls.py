"""Which ``__call__`` a linen interceptor sees: a batch norm's own, or a subclass's around it.

``intercept()`` and ``frozen_batch_norms()`` replace the base batch norm's
``__call__``. A subclass (or a lifted transform such as ``nn.remat``) that runs
its own ``__call__`` keeps its code, provided that code reaches the base
``__call__``; one that never does would silently keep normalizing its own way, so
it gets an error instead. This per-thread tracker is that check, written once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from flax import linen as nn
from flax.linen.module import InterceptorContext

from ._batch_norm import BatchNorm


class SubclassCalls(threading.local):
    """Per thread, like flax's interceptor stack: the subclass ``__call__``s running."""

    def __init__(self) -> None:
        self._pending: list[list[bool]] = []  # one [reached a base __call__] per call

    def reached_base(self) -> None:
        """Marks that the innermost running subclass ``__call__`` reached a base ``__call__``."""
        if self._pending:
            self._pending[-1][0] = True

    def run(
        self,
        next_fun: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        error: Callable[[], Exception],
    ) -> Any:
        """Runs a subclass's own ``__call__``; raises ``error()`` if it never reached the base."""
        self._pending.append([False])
        try:
            out = next_fun(*args, **kwargs)
        finally:
            reached = self._pending.pop()[0]
        if not reached:
            raise error()
        return out

    def dispatch(
        self,
        next_fun: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        context: InterceptorContext,
        *,
        active: bool,
        on_base: Callable[[Any], Any],
        error: Callable[[type], Exception],
        classes: tuple[type, ...] | None = None,
        bases: tuple[Any, ...] | None = None,
        check: Callable[[type], None] | None = None,
    ) -> Any:
        """Routes one method call that a tool's linen interceptor sees.

        Calls other than ``__call__`` of an instance of ``classes`` (default:
        ``flax.linen.BatchNorm`` and ``jbn.BatchNorm``), or any call while the tool
        is not ``active``, run unchanged. A base ``__call__`` (its undecorated
        function in ``bases``, default :func:`raw_calls`) is replaced by
        ``on_base(module)``; a subclass's own ``__call__`` runs as it is and must
        reach a base one, or ``error(type(module))`` is raised (e.g.
        :func:`never_reaches_base`). ``check(type(module))`` runs first, for a tool
        that refuses some classes outright.
        """
        if classes is None:
            classes = (nn.BatchNorm, BatchNorm)
        if bases is None:
            bases = raw_calls()
        module = context.module
        if not active or context.method_name != "__call__" or not isinstance(module, classes):
            return next_fun(*args, **kwargs)
        if check is not None:
            check(type(module))
        if getattr(context.orig_method, "func", None) in bases:
            self.reached_base()
            return on_base(module)
        return self.run(next_fun, args, kwargs, lambda: error(type(module)))


def raw_calls() -> tuple[Any, ...]:
    """The undecorated ``__call__`` of ``flax.linen.BatchNorm`` and ``jbn.BatchNorm``.

    What an interceptor's ``context.orig_method.func`` is when a batch norm's own
    ``__call__`` runs (not a subclass's override).
    """
    # flax wraps each Module method at class creation and keeps the original as
    # __wrapped__, which the plain function type it declares does not show.
    return (
        nn.BatchNorm.__call__.__wrapped__,  # pyright: ignore[reportFunctionMemberAccess]
        BatchNorm.__call__.__wrapped__,  # pyright: ignore[reportFunctionMemberAccess]
    )


def never_reaches_base(refusal: str) -> Callable[[type], TypeError]:
    """The error for a subclass whose ``__call__`` never reaches either base ``__call__``.

    Args:
      refusal: what the tool cannot do, e.g. ``"jbn.linen.use_prior cannot adapt"``;
        the class's name follows it.
    """
    return lambda cls: TypeError(
        f"{refusal} {cls.__qualname__}: its __call__ never calls flax.linen.BatchNorm's or "
        "jbn.BatchNorm's __call__, so it would keep normalizing with its own code"
    )

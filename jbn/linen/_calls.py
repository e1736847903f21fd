"""Which ``__call__`` a linen interceptor sees: a batch norm's own, or a subclass's around it.

``intercept()`` and ``frozen_batch_norms()`` replace the base batch norm's
``__call__``. A subclass (or a lifted transform such as ``nn.remat``) that runs
its own ``__call__`` keeps its code, provided that code reaches the base
``__call__``; one that never does would silently keep normalizing its own way, so
it gets an error instead. This per-thread tracker is that check, written once.

:func:`intercepting` is the body the three contexts (``intercept``,
``frozen_batch_norms``, ``use_prior``) share. It puts the context's settings
into ``jax.jit``'s cache key (:func:`jax.make_user_context`), so a function
jitted outside the context is traced anew inside it instead of replaying a
program that never met the context; and it refuses, on leaving, a context in
which linen modules ran but no batch norm did (a model without batch norm).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen.module import InterceptorContext
from jax.core import Tracer

from ._batch_norm import BatchNorm

# The settings of the active contexts, innermost last: part of jax.jit's cache key.
_JIT_KEY = jax.make_user_context(())


class _Seen(threading.local):
    """Per thread, one ``[linen module calls, batch-norm calls]`` per active context."""

    def __init__(self) -> None:
        self.stack: list[list[int]] = []

    def count(self, batch_norm: bool) -> None:
        if self.stack:
            self.stack[-1][0] += 1
            self.stack[-1][1] += batch_norm


_seen = _Seen()


def jit_key(value: Any) -> Any:
    """A setting as part of jit's cache key: itself if hashable, a number for a concrete scalar.

    Anything else (a traced prior) gets a key of its own, so a jitted function
    is traced anew under every such context: never a stale program.
    """
    if isinstance(value, Tracer):
        return object()
    if isinstance(value, (jax.Array, np.ndarray, np.generic)) and jnp.shape(value) == ():
        return float(value)
    try:
        hash(value)
    except TypeError:
        return object()
    return value


@contextlib.contextmanager
def intercepting(
    interceptor: Callable[..., Any], tool: str, settings: tuple[Any, ...]
) -> Iterator[None]:
    """Runs a linen tool's ``interceptor`` while the context is active.

    ``settings`` (what the interceptor does, e.g. the prior) join ``jax.jit``'s
    cache key, so jit traces anew under a context with other settings (a
    program traced outside it would run flax's batch norm). On a normal exit,
    a context in which linen modules ran but no batch norm did raises a
    ``ValueError`` naming ``tool``.
    """
    key = (tool, *(jit_key(v) for v in settings))
    seen = [0, 0]
    _seen.stack.append(seen)
    try:
        with _JIT_KEY((*_JIT_KEY.value, key)), nn.intercept_methods(interceptor):
            yield
    finally:
        _seen.stack.pop()
        if _seen.stack:  # the enclosing context saw them too
            _seen.stack[-1][0] += seen[0]
            _seen.stack[-1][1] += seen[1]
    if seen[0] and not seen[1]:
        raise ValueError(
            f"{tool} found no batch norm: the linen modules that ran inside it include no "
            "flax.linen.BatchNorm or jbn.BatchNorm (a model without batch norm has nothing "
            "for it to change)"
        )


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
        is_call = context.method_name == "__call__"
        if active and is_call:
            _seen.count(isinstance(module, (nn.BatchNorm, BatchNorm)))
        if not active or not is_call or not isinstance(module, classes):
            return next_fun(*args, **kwargs)
        if check is not None:
            check(type(module))
        if getattr(context.orig_method, "func", None) in bases:
            self.reached_base()
            return on_base(module)
        return self.run(next_fun, args, kwargs, lambda: error(type(module)))


@dataclasses.dataclass(frozen=True)
class Call:
    """One batch-norm ``__call__`` an interceptor stands in for: the original and its arguments."""

    next_fun: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def run(self) -> Any:
        """The original call, unchanged."""
        return self.next_fun(*self.args, **self.kwargs)

    @property
    def x(self) -> Any:
        """The input (flax's and jbn's BatchNorm both name it ``x``)."""
        return self.args[0] if self.args else self.kwargs["x"]


def interceptor(
    on_base: Callable[[Any, Call], Any],
    *,
    active: Callable[[], bool],
    error: Callable[[type], Exception],
    classes: tuple[type, ...] | None = None,
    bases: tuple[Any, ...] | None = None,
    check: Callable[[type], None] | None = None,
) -> Callable[..., Any]:
    """A linen tool's interceptor: every call through :meth:`SubclassCalls.dispatch`.

    A base ``__call__`` becomes ``on_base(module, call)``; ``active()`` says whether
    the tool's context is open; the other arguments are :meth:`SubclassCalls.dispatch`'s.
    The tracker of subclass calls is the interceptor's own (per thread).
    """
    calls = SubclassCalls()

    def intercept(
        next_fun: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        context: InterceptorContext,
    ) -> Any:
        call = Call(next_fun, args, kwargs)
        return calls.dispatch(
            next_fun,
            args,
            kwargs,
            context,
            active=active(),
            on_base=lambda module: on_base(module, call),
            error=error,
            classes=classes,
            bases=bases,
            check=check,
        )

    return intercept


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

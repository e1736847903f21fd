"""Which ``__call__`` a linen interceptor sees: a batch norm's own, or a subclass's around it.

``intercept()`` and ``frozen_batch_norms()`` replace the base batch norm's
``__call__``. A subclass (or a lifted transform such as ``nn.remat``) that runs
its own ``__call__`` keeps its code, provided that code reaches the base
``__call__``; one that never does would silently keep normalizing its own way, so
it gets an error instead. This per-thread tracker is that check, written once.

:func:`intercepting` is the body the four contexts (``intercept``,
``frozen_batch_norms``, ``use_prior``, ``use_stream``) share. It puts the context's settings
into ``jax.jit``'s cache key (:func:`jax.make_user_context`), so a function
jitted outside the context is traced anew inside it instead of replaying a
program that never met the context; and it refuses, on leaving, a context in
which linen modules ran but no batch norm did (a model without batch norm).
Every other module call the tools see is watched for classes that look like
batch norms but are none of jbn's or flax's (:class:`InterceptWarning`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
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


class _Context:
    """What one active context saw: linen module calls, batch-norm calls, lookalikes."""

    def __init__(self, tool: str) -> None:
        self.tool = tool
        self.modules = 0
        self.batch_norms = 0
        self.lookalikes: set[type] = set()

    def absorb(self, inner: _Context) -> None:
        """An inner context's calls, which this enclosing one saw too."""
        self.modules += inner.modules
        self.batch_norms += inner.batch_norms
        self.lookalikes |= inner.lookalikes


class _Seen(threading.local):
    """Per thread, what each active context saw, innermost last."""

    def __init__(self) -> None:
        self.stack: list[_Context] = []

    def count(self, batch_norm: bool) -> None:
        if self.stack:
            self.stack[-1].modules += 1
            self.stack[-1].batch_norms += batch_norm


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
    seen = _Context(tool)
    _seen.stack.append(seen)
    try:
        with _JIT_KEY((*_JIT_KEY.value, key)), nn.intercept_methods(interceptor):
            yield
    finally:
        _seen.stack.pop()
        if _seen.stack:  # the enclosing context saw them too
            _seen.stack[-1].absorb(seen)
    if seen.modules and not seen.batch_norms:
        lookalikes = ""
        if seen.lookalikes:
            names = ", ".join(sorted(class_name(c) for c in seen.lookalikes))
            lookalikes = (
                f"; {names} looks like a batch norm but is not a flax.linen.BatchNorm (nor a "
                "subclass) or jbn.BatchNorm, so it ran unchanged: subclass flax.linen.BatchNorm "
                "or use jbn.BatchNorm in its place"
            )
        raise ValueError(
            f"{tool} found no batch norm: the linen modules that ran inside it include no "
            "flax.linen.BatchNorm or jbn.BatchNorm (a model without batch norm has nothing "
            f"for it to change){lookalikes}"
        )


class InterceptWarning(UserWarning):
    """A linen tool met a module that looks like a batch norm and left it unchanged.

    :func:`jbn.linen.intercept`, :func:`jbn.linen.frozen_batch_norms`,
    :func:`jbn.linen.use_prior` and :func:`jbn.linen.use_stream` change
    ``flax.linen.BatchNorm`` (and its subclasses) and ``jbn.BatchNorm`` only. A
    linen module of another class *looks like a batch norm* when, inside one of
    them, either

    - it holds variables of its own (not a child's) in the ``batch_stats``
      collection after its call, as a home-made batch norm keeps its running
      statistics; or
    - its class name contains ``BatchNorm`` or ``batch_norm`` (any case, e.g.
      ``BatchNormalization``, ``FrozenBatchNorm2d``) and no flax or jbn batch norm
      ran inside its call (a block wrapping flax's is not a lookalike).

    Such a module runs its own code, unchanged; the tool warns once per class
    (and tool), naming it, since a model that mixes it with flax's batch norms
    would otherwise be changed only in part without a word. A user who means it
    silences the warning with ``warnings.filterwarnings("ignore",
    category=jbn.linen.InterceptWarning)``.
    """


_NAME = re.compile(r"batch_?norm", re.IGNORECASE)
_warned: set[tuple[type, str]] = set()
_lookalike_classes: set[type] = set()  # classes already found to look like batch norms


def class_name(cls: type) -> str:
    """``module.QualName`` of a class, as the warning and the errors name it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _own_batch_stats(module: nn.Module) -> bool:
    """Whether ``module`` itself (not a child) holds variables in ``batch_stats``."""
    if module.scope is None or module.scope.is_collection_empty("batch_stats"):
        return False
    stats = module.scope.variables().get("batch_stats", {})
    return any(not isinstance(v, Mapping) for v in stats.values())


def _watched(
    module: nn.Module, next_fun: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Runs a call that no tool changes; notes its class if it looks like a batch norm."""
    if not _seen.stack:
        return next_fun(*args, **kwargs)
    seen = _seen.stack[-1]
    before = seen.batch_norms
    out = next_fun(*args, **kwargs)
    cls = type(module)
    if (
        cls in _lookalike_classes
        or _own_batch_stats(module)
        or (_NAME.search(cls.__name__) is not None and seen.batch_norms == before)
    ):
        _lookalike_classes.add(cls)
        seen.lookalikes.add(cls)
        if (cls, seen.tool) not in _warned:
            _warned.add((cls, seen.tool))
            warnings.warn(
                f"{seen.tool} leaves {class_name(cls)} unchanged: it looks like a batch norm "
                "but is not a flax.linen.BatchNorm (nor a subclass) or jbn.BatchNorm, so it runs "
                "its own code, untouched by jbn, while flax's and jbn's batch norms change. Subclass "
                "flax.linen.BatchNorm or use jbn.BatchNorm in its place, or filter "
                "jbn.linen.InterceptWarning if this is meant",
                InterceptWarning,
                stacklevel=2,
            )
    return out


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
            is_batch_norm = isinstance(module, (nn.BatchNorm, BatchNorm))
            _seen.count(is_batch_norm)
            if not is_batch_norm:
                return _watched(module, next_fun, args, kwargs)
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

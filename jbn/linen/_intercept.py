"""``intercept()``: run every ``flax.linen.BatchNorm`` of any linen model through jbn.

A flax method interceptor (``flax.linen.intercept_methods``) replaces the body of
``flax.linen.BatchNorm.__call__``: the flax module builds a :class:`jbn.BatchNorm`
with its own field values and lets it use its scope (``flax.linen.share_scope``),
so the variables are the flax module's own (same names, shapes, dtypes,
initializers and random keys) and ``init``, ``apply``, ``mutable``, ``jit``,
``pmap`` and ``shard_map`` behave as they do for ``jbn.BatchNorm``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Iterator
from typing import Any

from flax import linen as nn

from ._batch_norm import BatchNorm
from ._calls import intercepting, interceptor

__all__ = ("intercept",)

# flax's own BatchNorm.__call__ (the function under flax's method wrapper): the
# interceptor replaces exactly this function, wherever it is called from (a
# subclass's super().__call__, a lifted transform such as nn.remat). flax keeps it as
# __wrapped__, which the plain function type it declares does not show.
_FLAX_CALL = nn.BatchNorm.__call__.__wrapped__  # pyright: ignore[reportFunctionMemberAccess]

# Names flax writes into every Module subclass's __dict__ (dataclass machinery,
# the fields, the module bookkeeping): their presence in a subclass overrides no
# behaviour.
_GENERATED = frozenset(nn.BatchNorm.__dict__) - {"__call__"}


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))


@functools.cache
def _jbn_class() -> tuple[type, tuple[str, ...]]:
    """jbn.BatchNorm and its jbn-only options."""
    missing = sorted(set(_fields(nn.BatchNorm)) - set(_fields(BatchNorm)))
    if missing:  # a flax version with options jbn does not know
        raise TypeError(
            f"jbn.linen.intercept: flax.linen.BatchNorm has options {missing} that "
            "jbn.BatchNorm does not support; use flax's BatchNorm outside intercept()"
        )
    return BatchNorm, tuple(sorted(set(_fields(BatchNorm)) - set(_fields(nn.BatchNorm))))


class _State(threading.local):
    """Per thread, like flax's interceptor stack."""

    def __init__(self) -> None:
        self.options: list[dict[str, Any]] = []  # one entry per active intercept()


_state = _State()


def active_options() -> dict[str, Any]:
    """The jbn options of the innermost active :func:`intercept` (empty outside one)."""
    return dict(_state.options[-1]) if _state.options else {}


@functools.cache
def _check_class(cls: type) -> None:
    """Raises if a BatchNorm subclass overrides behaviour that jbn would drop."""
    overridden = []
    for klass in cls.__mro__:
        if klass is nn.BatchNorm:
            break
        fields = getattr(klass, "__dataclass_fields__", {})
        for name in klass.__dict__:
            if name in _GENERATED or name in fields or name in ("__call__", "setup"):
                continue
            if hasattr(nn.BatchNorm, name):
                overridden.append(f"{klass.__qualname__}.{name}")
    if overridden:
        raise TypeError(
            f"jbn.linen.intercept cannot run {cls.__qualname__} through jbn: it overrides "
            f"{', '.join(sorted(overridden))}, which jbn's BatchNorm does not call, so that "
            "behaviour would be lost. Use jbn.BatchNorm in its place, or apply this model "
            "outside intercept()"
        )


def _jbn_module(module: nn.BatchNorm, options: dict[str, Any]) -> nn.Module:
    jbn_batch_norm, _ = _jbn_class()
    fields = {name: getattr(module, name) for name in _fields(nn.BatchNorm)}
    # Created inside flax's compact method, so bound as a child; share_scope then
    # makes it read and write the flax module's own variables.
    child = jbn_batch_norm(**fields, **options)
    nn.share_scope(module, child)
    return child


# A subclass's (or a lifted transform's) own __call__ keeps its code, and the
# flax BatchNorm.__call__ it reaches runs through jbn.
_interceptor = interceptor(
    lambda module, call: _jbn_module(module, _state.options[-1])(*call.args, **call.kwargs),
    active=lambda: bool(_state.options),
    classes=(nn.BatchNorm,),
    bases=(_FLAX_CALL,),
    error=lambda cls: TypeError(
        f"jbn.linen.intercept cannot run {cls.__qualname__} through jbn: its __call__ "
        "never calls flax.linen.BatchNorm.__call__ (super().__call__), so it normalizes "
        "with its own code. Use jbn.BatchNorm in its place, or apply this model outside "
        "intercept()"
    ),
    check=_check_class,
)


@contextlib.contextmanager
def intercept(**options: Any) -> Iterator[None]:
    """Runs every ``flax.linen.BatchNorm`` through jbn while the context is active.

    Under ``with intercept():`` each ``flax.linen.BatchNorm`` of any linen model
    computes with :class:`jbn.BatchNorm` (exact statistics, analytic backward
    pass) on its own variables: the same ``params/scale``, ``params/bias``,
    ``batch_stats/mean``, ``batch_stats/var`` (names, shapes, dtypes,
    initializers, random keys), and every field honoured (``use_fast_variance``
    becomes jbn's exact statistics). ``init``, ``apply``, ``mutable``, ``jit``,
    ``pmap`` and ``shard_map`` with ``axis_name`` work as with ``jbn.BatchNorm``;
    see its docstring for the few differences from flax (a train-mode ``init``
    with one value per feature normalizes with the initial running statistics;
    the reductions stay float32 with ``force_float32_reductions=False``)::

      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jbn.linen import intercept
      >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=False)])
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> with intercept():
      ...     variables = model.init(jax.random.key(1), x)
      ...     y, updates = model.apply(variables, x, mutable=["batch_stats"])

    Leaving the context (also by an exception) restores flax's BatchNorm; contexts
    nest, the innermost options apply. ``intercept()`` also works as a decorator.
    The context and its options are part of ``jax.jit``'s cache key
    (:func:`jax.make_user_context`): a function jitted and traced outside it is
    traced anew inside it, with jbn, instead of replaying flax's program. Linen
    modules that run inside it without a single batch norm raise a
    ``ValueError`` on exit (nothing to intercept).

    Subclasses of ``flax.linen.BatchNorm`` that only change fields work. One that
    overrides ``__call__`` keeps its own code and the ``super().__call__`` it
    reaches runs through jbn (flax's lifted transforms such as ``nn.remat`` work
    this way); one whose ``__call__`` never reaches flax's, or that overrides any
    other method of ``flax.linen.BatchNorm``, raises a ``TypeError`` rather than
    silently lose its behaviour. No other class is changed: a model's own batch
    norm written on ``nn.Module`` runs unchanged, with a
    :class:`jbn.linen.InterceptWarning` naming its class once.

    Args:
      **options: jbn-only options given to every intercepted batch norm, those of
        :class:`jbn.BatchNorm` that flax lacks: ``residual``, ``min_scale``,
        ``unbiased_running_var``, ``virtual_batch_size``, ``renorm``, ``rmax``,
        ``dmax``.

    Yields:
      None.
    """
    _, jbn_options = _jbn_class()
    unknown = sorted(set(options) - set(jbn_options))
    if unknown:
        raise TypeError(
            f"intercept() got unknown options {unknown}: it takes jbn's own options "
            f"{list(jbn_options)} (flax's options are read from each flax.linen.BatchNorm)"
        )
    _state.options.append(dict(options))
    try:
        with intercepting(_interceptor, "jbn.linen.intercept", tuple(sorted(options.items()))):
            yield
    finally:
        _state.options.pop()

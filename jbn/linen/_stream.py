"""Statistics that follow a stream, for linen models: :func:`use_stream` and :func:`reset_stream`.

:func:`use_stream` is a context manager (and decorator) under which every
``flax.linen.BatchNorm`` and ``jbn.BatchNorm`` (or those a ``where`` predicate
selects) runs in the stream mode of :func:`jbn.bn_forward`. The memory of the
stream's statistics lives in the model's own ``batch_stats`` collection, beside
the running statistics (``stream_mean``, ``stream_var``, ``stream_count``), so
``apply`` needs ``mutable=["batch_stats"]`` and returns it updated.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
from flax import linen as nn
from flax.core import unfreeze
from flax.linen import dtypes as linen_dtypes
from flax.linen.module import InterceptorContext

from .._batch_norm import bn_forward
from .._prior import Prior
from .._stream import MEMORY, Stream, check_stream
from .._stream import reset_stream as reset_state
from ._calls import SubclassCalls, intercepting, never_reaches_base

if TYPE_CHECKING:
    from .._accumulate import Accumulate
    from ._accumulate import Commit

    Mode = Prior | Stream | Accumulate | Commit


class _State(threading.local):
    def __init__(self) -> None:
        # (mode, where, tool) per active use_prior / use_stream context, innermost last.
        self.settings: list[tuple[Mode | None, Any, str]] = []
        self.calls = SubclassCalls()


_state = _State()


def run_batch_norm(
    module: nn.Module,
    x: Any,
    mask: Any,
    mode: Prior | Stream | Accumulate | bool,
    state: dict[str, Any],
    **jbn_options: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A linen batch norm's ``bn_forward`` in ``mode``, from its own parameters.

    Args:
      module: a bound ``flax.linen.BatchNorm`` or ``jbn.BatchNorm``.
      x, mask: its call's input and mask.
      mode: a :class:`jbn.Prior`, :class:`jbn.Stream`, :class:`jbn.Accumulate`
        or False (evaluation).
      state: the ``bn_forward`` state, from its ``batch_stats``.
      **jbn_options: further ``bn_forward`` options (e.g. ``residual``).

    Returns:
      ``bn_forward``'s ``(y, new_state)``.
    """
    params = {
        name: module.get_variable("params", name)
        for name, used in (("scale", module.use_scale), ("bias", module.use_bias))
        if used
    }
    x = jax.numpy.asarray(x)
    dtype = linen_dtypes.canonicalize_dtype(x, *params.values(), dtype=module.dtype)
    return bn_forward(
        params,
        state,
        x,
        mode,
        axis=module.axis,
        epsilon=module.epsilon,
        mask=mask,
        axis_name=module.axis_name,
        axis_index_groups=module.axis_index_groups,
        dtype=dtype,
        **jbn_options,
    )


def _stream_forward(module: nn.Module, x: Any, mask: Any, stream: Stream) -> jax.Array:
    """The module's output in the stream mode; stores the memory in its batch_stats."""
    if not module.is_mutable_collection("batch_stats"):
        raise ValueError(
            "jbn.linen.use_stream keeps the memory of the stream in the batch_stats collection: "
            "pass mutable=['batch_stats'] to apply, e.g. `y, updates = model.apply(variables, x, "
            "mutable=['batch_stats'])`, then `variables = {**variables, **updates}`"
        )
    names = ("mean", "var", *(k for k in MEMORY if module.has_variable("batch_stats", k)))
    state = {name: module.get_variable("batch_stats", name) for name in names}
    y, new = run_batch_norm(module, x, mask, stream, state)
    for k in MEMORY:
        module.put_variable("batch_stats", k, new[k])
    return y


def _test_time_forward(module: nn.Module, x: Any, mask: Any, mode: Prior | Stream) -> jax.Array:
    """The module's output in a test-time mode; a stream's memory goes to its batch_stats."""
    if isinstance(mode, Stream):
        return _stream_forward(module, x, mask, mode)
    state = {name: module.get_variable("batch_stats", name) for name in ("mean", "var")}
    return run_batch_norm(module, x, mask, mode, state)[0]


def _interceptor(
    next_fun: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    context: InterceptorContext,
) -> Any:
    mode, where, tool = _state.settings[-1] if _state.settings else (None, None, "")

    def adapted(module: Any) -> Any:
        if (
            mode is None
            or (where is not None and not where(module.path))
            or module.is_initializing()
            or not module.has_variable("batch_stats", "mean")
        ):
            return next_fun(*args, **kwargs)
        if not isinstance(mode, (Prior, Stream)):  # gradient accumulation
            from ._accumulate import accumulation_forward  # it imports this module

            y = accumulation_forward(module, mode, args, kwargs)
            return next_fun(*args, **kwargs) if y is None else y
        x = args[0] if args else kwargs["x"]
        return _test_time_forward(module, x, kwargs.get("mask"), mode)

    return _state.calls.dispatch(
        next_fun,
        args,
        kwargs,
        context,
        active=bool(_state.settings),
        on_base=adapted,
        error=never_reaches_base(f"{tool} cannot adapt"),
    )


@contextlib.contextmanager
def adapting(mode: Mode | None, where: Any, tool: str, settings: tuple[Any, ...]) -> Iterator[None]:
    """The body of :func:`use_prior`, :func:`use_stream` and gradient accumulation's
    contexts: ``mode`` for every batch norm.

    One stack for both, so the innermost context applies whichever it is; ``settings``
    join ``jax.jit``'s cache key (:func:`jbn.linen._calls.intercepting`).
    """
    if where is not None and not callable(where):
        raise TypeError(f"where must be a predicate on module paths or None, got {where!r}")
    _state.settings.append((mode, where, tool))
    try:
        with intercepting(_interceptor, tool, settings):
            yield
    finally:
        _state.settings.pop()


@contextlib.contextmanager
def use_stream(
    stream: Stream | None, *, where: Callable[[tuple[str, ...]], bool] | None = None
) -> Iterator[None]:
    """The stream mode for every linen batch norm while the context is active.

    Each ``flax.linen.BatchNorm`` and ``jbn.BatchNorm`` normalizes every batch
    with a memory of the stream's statistics, counted as ``stream.prior``
    examples, pooled with the batch's own, and updates the memory
    (:class:`jbn.Stream`), whatever ``use_running_average`` the model passes;
    the running statistics are left alone. The memory lives in
    ``batch_stats`` (``stream_mean``, ``stream_var``, ``stream_count``),
    created from the running statistics on the first call, so ``apply`` needs
    ``mutable=["batch_stats"]``; :func:`reset_stream` removes it, back to the
    training statistics::

      >>> import jax, jax.numpy as jnp, flax.linen as nn, jbn
      >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=True)])
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> with jbn.linen.use_stream(jbn.Stream(horizon=500.0, prior=64.0)):
      ...     y, updates = model.apply(variables, jnp.ones((1, 3)), mutable=["batch_stats"])
      >>> variables = {**variables, **updates}   # the memory, carried to the next batch
      >>> variables = jbn.linen.reset_stream(variables)

    Contexts nest (the innermost applies; None takes the layers out again) and
    work as decorators. The context's settings are part of ``jax.jit``'s cache
    key, so a function jitted outside it is traced anew inside it. A context in
    which linen modules ran but no batch norm did raises a ``ValueError``.

    Args:
      stream: a :class:`jbn.Stream`, or None.
      where: a predicate on a batch norm's module path (a tuple of names): only
        the layers it accepts run in the mode; default all.

    Yields:
      None.
    """
    if stream is not None:
        check_stream(stream)
    with adapting(stream, where, "jbn.linen.use_stream", (stream, where)):
        yield


def reset_stream(variables: Mapping[str, Any]) -> dict[str, Any]:
    """``variables`` without the memory :func:`use_stream` keeps: back to the training statistics.

    The next call under :func:`use_stream` starts the memory again from the
    running statistics, bit for bit as the first time.
    """
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:
        raise ValueError("variables must be a linen variables dict with a batch_stats collection")

    def strip(tree: Any) -> Any:
        if isinstance(tree, Mapping):
            if "mean" in tree and "var" in tree:
                return reset_state(tree)
            return {k: strip(v) for k, v in tree.items()}
        return tree

    return {**variables, "batch_stats": strip(unfreeze(variables["batch_stats"]))}

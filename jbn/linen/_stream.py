"""Statistics that follow a stream, for linen models: :func:`use_stream` and its memory.

:func:`use_stream` is a context manager (and decorator) under which every
``flax.linen.BatchNorm`` and ``jbn.BatchNorm`` (or those a ``where`` predicate
selects) runs in the stream mode of :func:`jbn.bn_forward`. The memory of the
stream's statistics lives in the model's own ``batch_stats`` collection, beside
the running statistics (``stream_mean``, ``stream_var``, ``stream_count``), so
``apply`` needs ``mutable=["batch_stats"]`` and returns it updated.
:func:`start_stream` seeds the memory of every batch norm at once (a carry of
fixed structure for ``jax.lax.scan``) and :func:`reset_stream` removes it.
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

from .._batch_norm import bn_forward
from .._prior import Prior
from .._relay import Relay, linked
from .._stream import MEMORY, Stream, check_stream
from .._stream import reset_stream as reset_state
from .._stream import start_stream as start_state
from ._calls import Call, intercepting, interceptor, never_reaches_base

if TYPE_CHECKING:
    from .._accumulate import Accumulate

# A context's handling of one batch-norm call: (module, call, mode) -> the call's output.
Forward = Callable[[Any, Call, Any], Any]


class _State(threading.local):
    def __init__(self) -> None:
        # (mode, where, tool, forward) per active adapting context (use_prior, use_stream,
        # gradient accumulation's), innermost last.
        self.settings: list[tuple[Any, Any, str, Forward]] = []
        # The stream mode's verdict, from a forward pass's first batch norm to the rest,
        # dropped when the outermost module call (at depth 0) returns.
        self.relay = Relay()
        self.depth = 0


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
    root = None if module.scope is None else module.scope.root  # the model call: one apply
    with linked(_state.relay, module.path, root):
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


def _test_time_call(module: nn.Module, call: Call, mode: Prior | Stream) -> jax.Array:
    """A batch norm's call under :func:`use_prior` or :func:`use_stream`."""
    return _test_time_forward(module, call.x, call.kwargs.get("mask"), mode)


def _adapted(module: Any, call: Call) -> Any:
    mode, where, _, forward = _state.settings[-1]
    if (
        mode is None
        or (where is not None and not where(module.path))
        or module.is_initializing()
        or not module.has_variable("batch_stats", "mean")
    ):
        return call.run()
    return forward(module, call, mode)


_adapting = interceptor(
    _adapted,
    active=lambda: bool(_state.settings),
    error=lambda cls: never_reaches_base(f"{_state.settings[-1][2]} cannot adapt")(cls),
)


def _interceptor(
    next_fun: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], context: Any
) -> Any:
    """``_adapting``; the relay's verdict is dropped when the outermost module call returns."""
    _state.depth += 1
    try:
        return _adapting(next_fun, args, kwargs, context)
    finally:
        _state.depth -= 1
        if _state.depth == 0:
            _state.relay.clear()


@contextlib.contextmanager
def adapting(
    mode: Any,
    where: Any,
    tool: str,
    settings: tuple[Any, ...],
    forward: Forward = _test_time_call,
) -> Iterator[None]:
    """The body of :func:`use_prior`, :func:`use_stream` and gradient accumulation's
    contexts: ``mode`` for every batch norm (None: none).

    One stack for all, so the innermost context applies whichever it is; ``settings``
    join ``jax.jit``'s cache key (:func:`jbn.linen._calls.intercepting`). ``forward``
    runs each selected batch norm's call in ``mode``: the test-time modes' by
    default; gradient accumulation hands in its own (:mod:`jbn.linen._accumulate`),
    so this module never imports the tools built on it.
    """
    if where is not None and not callable(where):
        raise TypeError(f"where must be a predicate on module paths or None, got {where!r}")
    _state.settings.append((mode, where, tool, forward))
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

    Each ``flax.linen.BatchNorm`` and ``jbn.BatchNorm`` normalizes every
    example with its own statistics pooled with a memory of the stream's
    statistics, counted as ``stream.prior`` examples, and updates the memory
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


def _map_batch_norms(variables: Any, tool: str, fn: Callable[[Any], Any]) -> dict[str, Any]:
    """``variables`` with ``fn`` applied to every batch norm's ``batch_stats`` entry.

    A batch norm's entry is a dict holding ``mean`` and ``var`` (flax's and jbn's
    names). Raises a ``ValueError`` naming ``tool`` for anything but a linen
    variables dict with a ``batch_stats`` collection.
    """
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:
        got = type(variables).__name__
        if isinstance(variables, Mapping):
            got = f"a dict with the collections {sorted(variables)}"
        raise ValueError(
            f"{tool}: variables must be a linen variables dict with a batch_stats collection "
            f"(what model.init returns), got {got}"
        )

    def walk(tree: Any) -> Any:
        if isinstance(tree, Mapping):
            if "mean" in tree and "var" in tree:
                return fn(tree)
            return {k: walk(v) for k, v in tree.items()}
        return tree

    return {**variables, "batch_stats": walk(unfreeze(variables["batch_stats"]))}


def start_stream(variables: Mapping[str, Any], stream: Stream) -> dict[str, Any]:
    """``variables`` with the memory of ``stream`` seeded in every batch norm: a fixed carry.

    Under :func:`use_stream` each batch norm creates its memory on its first
    call, so the ``batch_stats`` a call returns has more entries than the ones
    it was given. ``jax.lax.scan`` needs a carry whose structure never changes:
    seed the whole tree first, each batch norm's entry with
    :func:`jbn.start_stream` (its running statistics, counted as
    ``stream.horizon``), exactly the memory the first call would create::

      >>> import jax, jax.numpy as jnp, flax.linen as nn, jbn
      >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=True)])
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> mode = jbn.Stream(horizon=500.0, prior=64.0)
      >>> def step(stats, x):
      ...     with jbn.linen.use_stream(mode):
      ...         y, updates = model.apply(
      ...             {**variables, "batch_stats": stats}, x, mutable=["batch_stats"]
      ...         )
      ...     return updates["batch_stats"], y
      >>> stats = jbn.linen.start_stream(variables, mode)["batch_stats"]
      >>> stats, ys = jax.lax.scan(step, stats, jnp.ones((5, 2, 3)))
      >>> sorted(stats["layers_1"])
      ['mean', 'stream_count', 'stream_mean', 'stream_var', 'var']

    Any memory already there is replaced; :func:`reset_stream` removes it.

    Args:
      variables: a linen variables dict with a ``batch_stats`` collection holding
        at least one batch norm's running statistics (``mean`` and ``var``).
      stream: a :class:`jbn.Stream`.

    Returns:
      ``variables`` with ``stream_mean``, ``stream_var`` and ``stream_count`` in
      every batch norm's ``batch_stats`` entry; the other collections as they were.
    """
    check_stream(stream)
    seeded = 0

    def seed(entry: Any) -> dict[str, Any]:
        nonlocal seeded
        seeded += 1
        return start_state(entry, stream)

    out = _map_batch_norms(variables, "jbn.linen.start_stream", seed)
    if not seeded:
        raise ValueError(
            "jbn.linen.start_stream: variables['batch_stats'] holds no batch norm's running "
            "statistics (no entry with 'mean' and 'var'), so there is no memory to seed"
        )
    return out


def reset_stream(variables: Mapping[str, Any]) -> dict[str, Any]:
    """``variables`` without the memory :func:`use_stream` keeps: back to the training statistics.

    The next call under :func:`use_stream` starts the memory again from the
    running statistics, bit for bit as the first time.
    """
    return _map_batch_norms(variables, "jbn.linen.reset_stream", reset_state)

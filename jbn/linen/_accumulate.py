"""Gradient accumulation for linen models: :func:`use_accumulation` and :func:`commit_batch_stats`.

:func:`use_accumulation` is a context manager (and decorator) under which
every ``flax.linen.BatchNorm`` and ``jbn.BatchNorm`` called in training mode
runs in the accumulation mode of :func:`jbn.bn_forward`: the micro-batch is
normalized with its own statistics, the running statistics are left alone, and
the micro-batch's statistics are added to an accumulator in the layer's
``batch_stats`` (``accum_count``, ``accum_mean``, ``accum_m2``).
:func:`commit_batch_stats` applies each layer's one running update with that
layer's own options (:func:`jbn.bn_commit`). Both reuse the test-time modes'
interceptor (:func:`jbn.linen._stream.adapting`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
from flax import linen as nn
from flax.core import unfreeze

from .. import _options as options
from .._accumulate import ACCUMULATOR, Accumulate, bn_commit
from .._accumulate import start_accumulation as start_state
from ._batch_norm import BatchNorm
from ._calls import Call
from ._intercept import active_options
from ._stream import adapting, run_batch_norm


@dataclasses.dataclass(frozen=True)
class Commit:
    """The marker :func:`commit_batch_stats` runs the layers under: commit, not normalize."""


_TOOLS = {Accumulate: "jbn.linen.use_accumulation", Commit: "jbn.linen.commit_batch_stats"}


def _layer_options(module: nn.Module) -> dict[str, Any]:
    """The jbn options of a linen batch norm: its own, or ``intercept()``'s for flax's."""
    if isinstance(module, BatchNorm):
        return options.jbn_kwargs(module)
    return {**options.JBN, **active_options()}


def accumulation_forward(
    module: nn.Module, mode: Accumulate | Commit, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> jax.Array | None:
    """A batch norm's call under :func:`use_accumulation` or :func:`commit_batch_stats`.

    Returns None for a call in evaluation mode (it runs unchanged), else the output.
    """
    given = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    evaluation = nn.merge_param("use_running_average", module.use_running_average, given)
    layer = _layer_options(module)
    if evaluation or layer["prior"] is not None:
        return None
    tool = _TOOLS[type(mode)]
    if not module.is_mutable_collection("batch_stats"):
        raise ValueError(
            f"{tool} writes the accumulator and the running statistics into batch_stats: pass "
            "mutable=['batch_stats'] to apply, e.g. `y, updates = model.apply(variables, x, "
            "mutable=['batch_stats'])`"
        )
    if layer["virtual_batch_size"] is not None or layer["renorm"]:
        raise ValueError(
            f"{tool}: the batch norm at {module.path} has virtual_batch_size="
            f"{layer['virtual_batch_size']!r}, renorm={layer['renorm']!r}; accumulation "
            "normalizes each micro-batch with its own statistics (the micro-batch is the ghost "
            "batch): use neither"
        )
    x = args[0] if args else kwargs["x"]
    mask = kwargs.get("mask")
    names = [
        k for k in ("mean", "var", "count", *ACCUMULATOR) if module.has_variable("batch_stats", k)
    ]
    state = {k: module.get_variable("batch_stats", k) for k in names}
    forward = {k: layer[k] for k in ("residual", "min_scale")}
    if isinstance(mode, Accumulate):
        y, new = run_batch_norm(module, x, mask, mode, state, **forward)
        for k in ACCUMULATOR:
            module.put_variable("batch_stats", k, new[k])
        return y
    if not any(k in state for k in ACCUMULATOR):
        raise ValueError(
            f"jbn.linen.commit_batch_stats: the batch norm at {module.path} has no accumulator: "
            "run the micro-batches under jbn.linen.use_accumulation() first (or start it with "
            "jbn.linen.start_accumulation(variables))"
        )
    new = bn_commit(
        state,
        momentum=module.momentum,
        unbiased_running_var=layer["unbiased_running_var"],
        finite_running_stats=layer["finite_running_stats"],
    )
    for k, v in new.items():
        module.put_variable("batch_stats", k, v)
    running = {k: state[k] for k in ("mean", "var")}
    return run_batch_norm(module, x, mask, False, running)[0]  # unused: jit drops it


def _accumulation_call(module: nn.Module, call: Call, mode: Accumulate | Commit) -> Any:
    """The forward :func:`use_accumulation` and :func:`commit_batch_stats` hand to ``adapting``."""
    y = accumulation_forward(module, mode, call.args, call.kwargs)
    return call.run() if y is None else y


@contextlib.contextmanager
def use_accumulation() -> Iterator[None]:
    """Gradient accumulation for every linen batch norm while the context is active.

    Each ``flax.linen.BatchNorm`` and ``jbn.BatchNorm`` called in training mode
    (``use_running_average=False``) normalizes the micro-batch with its own
    statistics, with the training backward, leaves its running statistics
    alone and adds the micro-batch's exact statistics to an accumulator in its
    ``batch_stats`` (:class:`jbn.Accumulate`), created on the first call, so
    ``apply`` needs ``mutable=["batch_stats"]``. Calls in evaluation mode run as
    usual. :func:`commit_batch_stats` then applies one running update per
    layer::

      >>> import jax, jax.numpy as jnp, flax.linen as nn, jbn
      >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=False)])
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = model.init(jax.random.key(1), x)
      >>> apply = lambda v, x: model.apply(v, x, mutable=["batch_stats"])
      >>> with jbn.linen.use_accumulation():
      ...     for micro in jnp.split(x, 2):
      ...         y, updates = apply(variables, micro)
      ...         variables = {**variables, **updates}
      >>> variables = jbn.linen.commit_batch_stats(apply, variables, x)

    Works on flax's batch norms directly and under :func:`jbn.linen.intercept`
    (whose options then apply). Contexts nest with :func:`jbn.linen.use_prior`
    and :func:`jbn.linen.use_stream` (the innermost applies), work as
    decorators, and are part of ``jax.jit``'s cache key. A layer with
    ``virtual_batch_size`` or ``renorm`` raises a ``ValueError``.

    Yields:
      None.
    """
    mode = Accumulate()
    with adapting(mode, None, _TOOLS[Accumulate], (mode,), _accumulation_call):
        yield


def commit_batch_stats(
    apply_fn: Callable[[Any, Any], Any], variables: Mapping[str, Any], x: Any
) -> dict[str, Any]:
    """``variables`` with every batch norm's accumulated micro-batches committed.

    Runs ``apply_fn(variables, x)``, in which each batch norm called in training
    mode applies one running update from its accumulator with its own options
    (``momentum``, ``unbiased_running_var``, ``finite_running_stats``; see
    :func:`jbn.bn_commit`), as one training step on the concatenation of the
    accumulated micro-batches would, and empties the accumulator. The layers'
    outputs are not used, so under ``jax.jit`` the forward pass is dropped and
    ``x`` may be any input the model takes (e.g. one micro-batch). A layer
    without an accumulator raises a ``ValueError``; one with nothing
    accumulated is left unchanged.

    Args:
      apply_fn: ``(variables, x) -> (output, updates)``, the training apply, e.g.
        ``lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])``.
      variables: the model's variables, with the accumulators in ``batch_stats``.
      x: an input for ``apply_fn``.

    Returns:
      The new variables: ``batch_stats`` committed, the accumulators empty.
    """
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:
        raise ValueError("variables must be a linen variables dict with a batch_stats collection")
    mode = Commit()
    with adapting(mode, None, _TOOLS[Commit], (mode,), _accumulation_call):
        out = apply_fn(variables, x)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
        raise ValueError(
            "jbn.linen.commit_batch_stats needs apply_fn to return (output, updates): call "
            "model.apply(..., mutable=['batch_stats'])"
        )
    return {**variables, **out[1]}


def start_accumulation(variables: Mapping[str, Any]) -> dict[str, Any]:
    """``variables`` with an empty accumulator in every batch norm's ``batch_stats``.

    :func:`use_accumulation` creates the accumulators on the first call; start
    them before a ``jax.lax.scan`` over micro-batches so that the carry keeps
    one structure.
    """
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:
        raise ValueError("variables must be a linen variables dict with a batch_stats collection")

    def start(tree: Any) -> Any:
        if isinstance(tree, Mapping):
            if "mean" in tree and "var" in tree:
                return start_state(tree)
            return {k: start(v) for k, v in tree.items()}
        return tree

    return {**variables, "batch_stats": start(unfreeze(variables["batch_stats"]))}

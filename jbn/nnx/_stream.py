"""Statistics that follow a stream, for NNX models: :func:`use_stream` and :func:`reset_stream`.

:func:`use_stream` puts every batch norm of a model (or of a part of it) into
the stream mode of :func:`jbn.bn_forward`, in place: the memory of the stream's
statistics lives in ``nnx.BatchStat`` variables of each layer
(``stream_mean``, ``stream_var``, ``stream_count``), so ``nnx.jit``,
``nnx.split`` and checkpoints carry it like the running statistics.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
from flax.nnx import graph

from .. import _checks as checks
from .._relay import Link, Relay
from .._stream import MEMORY, Stream, check_stream, start_memory
from ._batch_norm import BatchNorm
from ._convert import _check_to_jbn, _to_jbn
from ._graph import replace_modules


def _batch_norms(model: Any, tool: str) -> list[BatchNorm]:
    found = [n for _, n in [((), model), *graph.iter_graph(model)] if isinstance(n, BatchNorm)]
    checks.found_batch_norms(len(found), tool, "jbn.nnx.BatchNorm layers (or flax's, converted)")
    return found


def use_stream(model: Any, stream: Stream | None) -> Any:
    """Puts, in place, every batch norm of an NNX model into the stream mode (or out of it).

    Each ``jbn.nnx.BatchNorm`` then normalizes every example with its own
    statistics pooled with a memory of the stream's, counted as
    ``stream.prior`` examples, and updates the memory (:class:`jbn.Stream`), in
    training and evaluation mode alike; the running statistics are left alone.
    The memory starts from the running statistics; :func:`reset_stream` returns
    to them and ``use_stream(model, None)`` takes the layers out of the mode,
    removing the memory. A ``flax.nnx.BatchNorm`` is first converted to
    ``jbn.nnx.BatchNorm`` (as by :func:`jbn.nnx.convert`)::

      >>> import jax.numpy as jnp, jbn
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
      >>> model = jbn.nnx.use_stream(model, jbn.Stream(horizon=500.0, prior=64.0))
      >>> y = model(jnp.ones((1, 3)))          # one example at a time
      >>> jbn.nnx.reset_stream(model)          # back to the training statistics
      >>> model = jbn.nnx.use_stream(model, None)

    Args:
      model: an NNX module (or a list, dict or tuple of them), or a part of one.
      stream: a :class:`jbn.Stream`, or None.

    Returns:
      ``model``, changed in place (the new layer if ``model`` is itself a flax batch norm).
    """
    if stream is not None:
        check_stream(stream)
        flax_bns = [n for _, n in [((), model), *graph.iter_graph(model)]]
        for node in flax_bns:
            if isinstance(node, nnx.BatchNorm):
                _check_to_jbn(node)
        model = replace_modules(model, lambda m: isinstance(m, nnx.BatchNorm), _to_jbn)
    bns = _batch_norms(model, "jbn.nnx.use_stream")
    passing = Relay(len(bns))  # the model's: the first batch norm's verdict, to the rest
    for index, node in enumerate(bns):
        if stream is None:
            if getattr(node, "stream", None) is not None:
                for k in MEMORY:
                    delattr(node, k)
            node.stream = None
            node.stream_link = None
        else:
            node.stream = stream
            node.stream_link = Link(passing, index)
            _seed(node, stream)
    return model


def _seed(node: BatchNorm, stream: Stream) -> None:
    memory = start_memory(node.mean[...], node.var[...], stream)
    for k, v in memory.items():
        setattr(node, k, nnx.BatchStat(v))


def reset_stream(model: Any) -> None:
    """Returns every batch norm of ``model`` in the stream mode to the training statistics.

    In place: the memory becomes, bit for bit, what :func:`use_stream` started with.
    """
    for node in _batch_norms(model, "jbn.nnx.reset_stream"):
        stream = getattr(node, "stream", None)
        if stream is not None:
            _seed(node, stream)

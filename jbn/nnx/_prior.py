"""Test-time adaptation for NNX models: prior-weighted statistics and TENT.

:func:`use_prior` puts every batch norm of a model (or of any part of it: pass
the submodule) into the prior mode of :func:`jbn.bn_forward`, in place, and
``use_prior(model, None)`` takes it out. :class:`Tent` minimizes the entropy of
the model's predictions by moving only its batch-norm scales and biases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from flax.nnx import graph

from .. import _checks as checks
from .._checks import PriorForm
from .._optimize import optimize_only
from .._stream import Stream
from .._tent import TentLoop, check_stream, optimizer
from ._batch_norm import BatchNorm as JbnNnxBatchNorm
from ._convert import _check_to_jbn, _to_jbn, count_batch_norms
from ._freeze import batch_norm_mask
from ._graph import replace_modules
from ._stream import use_stream


def use_prior(
    model: Any, prior: float | jax.typing.ArrayLike | None, *, prior_form: PriorForm = "pooled"
) -> Any:
    """Sets, in place, the prior of every batch norm of an NNX model (test-time adaptation).

    Each ``jbn.nnx.BatchNorm`` then normalizes with its running statistics,
    counted as ``prior`` examples, pooled with the statistics of the batch it is
    given (:func:`jbn.bn_forward`'s ``prior``), in training and evaluation mode
    alike, and updates nothing; ``prior=None`` takes the layers out again. A
    ``flax.nnx.BatchNorm`` is first converted to ``jbn.nnx.BatchNorm`` (as by
    :func:`jbn.nnx.convert`: same Variables, options and mode; it stays jbn's
    after ``use_prior(model, None)``, which computes what flax's did). Serving
    one image at a time::

      >>> import jax.numpy as jnp, jbn
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
      >>> model = jbn.nnx.use_prior(model, 16)
      >>> y = model(jnp.ones((1, 3)))
      >>> model = jbn.nnx.use_prior(model, None)

    Args:
      model: an NNX module (or a list, dict or tuple of them), or a part of one.
      prior: N >= 0 (``inf``: the running statistics; 0: the batch's), or None.
      prior_form: ``"pooled"`` (default: Chan's exact pooling) or ``"linear"``.

    Returns:
      ``model``, changed in place (the new layer if ``model`` is itself a flax batch norm).
    """
    if prior is not None:
        checks.prior(prior, False)
    checks.prior_form(prior_form)
    _check_has_batch_norm(model, "jbn.nnx.use_prior")
    if prior is not None:
        for _, node in [((), model), *graph.iter_graph(model)]:
            if isinstance(node, nnx.BatchNorm):
                _check_to_jbn(node)
        model = replace_modules(model, lambda m: isinstance(m, nnx.BatchNorm), _to_jbn)
    for _, node in [((), model), *graph.iter_graph(model)]:
        if isinstance(node, JbnNnxBatchNorm):
            node.prior = prior
            node.prior_form = prior_form
    return model


def _check_has_batch_norm(model: Any, tool: str) -> None:
    checks.found_batch_norms(
        count_batch_norms(model), tool, "flax.nnx.BatchNorm and jbn.nnx.BatchNorm layers"
    )


class Tent(TentLoop):
    """TENT (Wang et al. 2021) on an NNX model: entropy minimization on its batch norms.

    The model is put into the prior mode (:func:`use_prior`, batch statistics by
    default) and each step moves only its batch-norm scales and biases
    (:func:`jbn.nnx.batch_norm_mask`, :func:`jbn.optimize_only`), in place;
    every other parameter stays bit-identical::

      tent = jbn.nnx.Tent(model)
      logits = tent.step(batch)   # online: a step on the batch, then its logits
      tent.adapt(batches)         # offline: a step per batch, then ...
      logits = model(x)           # ... the model itself predicts (or tent.predict(x))
      tent.reset()                # back to the source parameters (episodic)

    Take the model out of the prior mode with ``jbn.nnx.use_prior(model, None)``.

    Args:
      model: an NNX model returning logits; ``model(x)`` is what is adapted
        (or ``apply_fn(model, x)``).
      apply_fn: optional ``(model, x) -> logits``.
      tx: an optax optimizer (default ``optax.adam(1e-3)``).
      prior: N of the prior-weighted statistics (default 0: the batch's).
      prior_form: ``"pooled"`` or ``"linear"``.
      episodic: reset to the source parameters before every step.
      stream: a :class:`jbn.Stream`: adapt with the stream statistics in place
        of the prior (:func:`jbn.nnx.use_stream`), which does not collapse when
        the stream's classes come in runs; the memory, in the model, takes each
        step's batch in, and ``reset`` starts it again.
    """

    def __init__(
        self,
        model: nnx.Module,
        *,
        apply_fn: Callable[[Any, Any], Any] | None = None,
        tx: Any = None,
        prior: float | jax.typing.ArrayLike = 0.0,
        prior_form: PriorForm = "pooled",
        episodic: bool = False,
        stream: Stream | None = None,
    ) -> None:
        checks.prior(prior, False)
        check_stream(prior, stream)
        _check_has_batch_norm(model, "jbn.nnx.Tent")
        if stream is None:
            use_prior(model, prior, prior_form=prior_form)
        else:
            use_stream(model, stream)
        tx = optimizer(tx, "jbn.nnx.Tent")
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        mask = batch_norm_mask(model)
        apply_fn = (lambda m, x: m(x)) if apply_fn is None else apply_fn
        self.model = model
        rest = nnx.as_pure(rest)

        def logits_fn(params: Any, x: Any) -> Any:
            return apply_fn(nnx.merge(graphdef, params, rest), x)

        def stream_fn(params: Any, memory: Any, x: Any) -> tuple[Any, Any]:
            adapted = nnx.merge(graphdef, params, memory)
            logits = apply_fn(adapted, x)
            return logits, nnx.as_pure(nnx.split(adapted, nnx.Param, ...)[2])

        super().__init__(
            logits_fn if stream is None else stream_fn,
            nnx.as_pure(params),
            mask,
            optimize_only(tx, mask),
            episodic=episodic,
            carry=None if stream is None else rest,
        )

    def _sync(self) -> None:
        nnx.update(self.model, self.params)
        if self.carry is not None:
            nnx.update(self.model, self.carry)

    def reset(self) -> None:
        super().reset()
        if hasattr(self, "model"):
            self._sync()

    def update(self, x: Any) -> None:
        super().update(x)
        self._sync()

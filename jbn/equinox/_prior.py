"""Test-time adaptation for Equinox models: prior-weighted statistics and TENT.

:func:`use_prior` returns the model with every ``jbn.equinox.BatchNorm`` (of
the whole model, or of the part given) in the prior mode of
:func:`jbn.bn_forward`; ``use_prior(model, None)`` takes them out.
:func:`batch_norm_mask` marks the batch-norm parameters, and :class:`Tent`
minimizes the entropy of the model's predictions by moving only them. optax is
imported by :class:`Tent` alone, so ``jbn.equinox`` needs no optax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jax.core import Tracer

from .. import _checks as checks
from .._checks import PriorForm
from .._optimize import optimize_only
from .._stream import Stream
from .._tent import TentLoop, check_stream, optimizer
from ._batch_norm import BatchNorm
from ._convert import count_batch_norms
from ._forward import is_batch_norm, vmapped_forward
from ._freeze import FrozenBatchNorm
from ._stream import use_stream


def use_prior(model: Any, prior: float | None, *, prior_form: PriorForm = "pooled") -> Any:
    """The model with every ``jbn.equinox.BatchNorm`` set to the prior ``prior``.

    Each then normalizes with its running statistics, counted as ``prior``
    values, pooled with the statistics of the batch along its ``axis_name``
    (:func:`jbn.bn_forward`'s ``prior``), in training and inference mode alike,
    and leaves the state as it is; ``prior=None`` takes the layers out again.
    Serving one image at a time is a vmap over a batch of one::

      >>> import equinox as eqx, jax, jax.numpy as jnp, jbn.equinox
      >>> bn, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(3, "batch")
      >>> adapted = jbn.equinox.use_prior(bn, 16.0)
      >>> run = jax.vmap(adapted, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, state = run(jnp.ones((1, 3)), state)

    Convert a model's ``eqx.nn.BatchNorm`` layers first with
    :func:`jbn.equinox.convert`. For a part of a model, use ``eqx.tree_at``:
    ``eqx.tree_at(lambda m: m.head, model, use_prior(model.head, 16.0))``.

    Args:
      model: any pytree holding ``jbn.equinox.BatchNorm`` layers.
      prior: N >= 0 (a Python float; ``inf``: the running statistics), or None.
      prior_form: ``"pooled"`` (default: Chan's exact pooling) or ``"linear"``.

    Returns:
      The new model (``model`` is not modified).
    """
    if prior is not None:
        if isinstance(prior, Tracer):
            raise TypeError("prior must be a Python float here (a static field), not a tracer")
        checks.prior(prior, False)
        prior = float(prior)
    checks.prior_form(prior_form)
    _check_has_batch_norm(model, "jbn.equinox.use_prior")

    def set_prior(node: Any) -> Any:
        if isinstance(node, eqx.nn.BatchNorm):
            raise TypeError(
                "jbn.equinox.use_prior adapts jbn.equinox.BatchNorm layers; this model has an "
                "eqx.nn.BatchNorm: convert it first with jbn.equinox.convert(model, state)"
            )
        if isinstance(node, BatchNorm):
            # prior and prior_form are static fields (not leaves eqx.tree_at can reach).
            new = object.__new__(BatchNorm)
            for field in dataclasses.fields(node):
                object.__setattr__(new, field.name, getattr(node, field.name))
            object.__setattr__(new, "prior", prior)
            object.__setattr__(new, "prior_form", prior_form)
            return new
        return node

    return jax.tree.map(set_prior, model, is_leaf=is_batch_norm)


def _check_has_batch_norm(model: Any, tool: str) -> None:
    checks.found_batch_norms(count_batch_norms(model), tool, "jbn.equinox.BatchNorm layers")


def batch_norm_mask(model: Any) -> Any:
    """Bools over ``eqx.filter(model, eqx.is_inexact_array)``: True on the batch norms' weights and biases.

    Batch norms are ``jbn.equinox.BatchNorm`` and :class:`jbn.equinox.FrozenBatchNorm`.

    Use it with :func:`jbn.optimize_only` on the parameters
    ``eqx.filter(model, eqx.is_inexact_array)``; the mask is a module, which is
    callable, so give optax ``lambda _: mask`` (optax calls a callable mask).
    """
    is_layer = lambda n: isinstance(n, (BatchNorm, FrozenBatchNorm))  # noqa: E731
    checks.found_batch_norms(
        sum(map(is_layer, jax.tree.leaves(model, is_leaf=is_layer))),
        "jbn.equinox.batch_norm_mask",
        "jbn.equinox.BatchNorm and jbn.equinox.FrozenBatchNorm layers (convert an "
        "eqx.nn.BatchNorm model first)",
    )
    params = eqx.filter(model, eqx.is_inexact_array)

    def mark(node: Any) -> Any:
        return jax.tree.map(lambda _: is_layer(node), node)

    return jax.tree.map(mark, params, is_leaf=is_layer)


class Tent(TentLoop):
    """TENT (Wang et al. 2021) on an Equinox model: entropy minimization on its batch norms.

    The model's batch norms normalize with prior-weighted statistics
    (:func:`use_prior`, batch statistics by default) and each step moves only
    their weights and biases (:func:`batch_norm_mask`, :func:`jbn.optimize_only`);
    every other parameter stays bit-identical::

      tent = jbn.equinox.Tent(model, state)
      logits = tent.step(batch)   # online: a step on the batch, then its logits
      tent.adapt(batches)         # offline: a step per batch ...
      logits = tent.predict(x)    # ... then predict; tent.model is the adapted model
      tent.reset()                # back to the source model (episodic)

    Args:
      model: a model with ``jbn.equinox.BatchNorm`` layers (see
        :func:`jbn.equinox.convert`).
      state: its ``eqx.nn.State`` (used as it is; nothing updates it).
      apply_fn: ``(model, state, x) -> logits`` for a batch ``x``; default
        ``jax.vmap(model, axis_name=<the batch norms' axis_name>, in_axes=(0,
        None), out_axes=(0, None))(x, state)[0]``.
      tx: an optax optimizer (default ``optax.adam(1e-3)``).
      prior: N of the prior-weighted statistics (default 0: the batch's).
      prior_form: ``"pooled"`` or ``"linear"``.
      episodic: reset to the source model before every step.
      stream: a :class:`jbn.Stream`: adapt with the stream statistics in place
        of the prior (:func:`jbn.equinox.use_stream`), which does not collapse
        when the stream's classes come in runs. The memory lives in the state
        (:attr:`state`), takes each step's batch in, and ``reset`` starts it
        again; ``apply_fn`` must then return ``(logits, state)``.
    """

    def __init__(
        self,
        model: Any,
        state: eqx.nn.State,
        *,
        apply_fn: Callable[[Any, Any, Any], Any] | None = None,
        tx: Any = None,
        prior: float = 0.0,
        prior_form: PriorForm = "pooled",
        episodic: bool = False,
        stream: Stream | None = None,
    ) -> None:
        check_stream(prior, stream)
        _check_has_batch_norm(model, "jbn.equinox.Tent")
        if stream is None:
            model = use_prior(model, prior, prior_form=prior_form)
        else:
            model, state = use_stream(model, state, stream)
        tx = optimizer(tx, "jbn.equinox.Tent")
        if apply_fn is None:
            forward = vmapped_forward(model, "jbn.equinox.Tent")
            apply_fn = forward if stream is not None else lambda m, s, x: forward(m, s, x)[0]

        params, static = eqx.partition(model, eqx.is_inexact_array)
        mask = batch_norm_mask(model)

        def logits_fn(params: Any, x: Any) -> Any:
            return apply_fn(eqx.combine(params, static), state, x)

        def stream_fn(params: Any, memory: Any, x: Any) -> tuple[Any, Any]:
            logits, memory = apply_fn(eqx.combine(params, static), memory, x)
            return logits, memory

        self._static = static
        self._state = state
        # An Equinox module is callable, which optax would take for a mask function.
        tx = optimize_only(tx, lambda _: mask)
        super().__init__(
            logits_fn if stream is None else stream_fn,
            params,
            mask,
            tx,
            episodic=episodic,
            carry=None if stream is None else state,
        )

    @property
    def state(self) -> eqx.nn.State:
        """The state: with ``stream``, the memory after the last step."""
        return self._state if self.carry is None else self.carry

    @property
    def model(self) -> Any:
        """The adapted model (in the prior mode)."""
        return eqx.combine(self.params, self._static)

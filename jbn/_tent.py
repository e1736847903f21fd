"""TENT (Wang et al., ICLR 2021): test-time entropy minimization on the batch-norm parameters.

The loop is written once here, on pure pytrees, for the frontends to wrap
(``jbn.linen.Tent``, ``jbn.nnx.Tent``, ``jbn.equinox.Tent``): each gives a
function ``logits_fn(params, x)`` that runs its model with prior-weighted
statistics, the model's trainable parameters and a bool mask that is True on
the batch-norm scales and biases. Only the masked leaves are differentiated
and moved; every other leaf is returned as the same array, bit for bit. The
optimizer is any optax ``GradientTransformation``, passed in (this module
imports optax only to build the default, :func:`optimizer`).

A step whose loss or gradient is not finite (a NaN or inf in the batch) moves
nothing: the parameters and the optimizer state stay bit for bit as they were,
and the step is counted in ``skipped``. The choice is made inside the jitted
step (``jnp.where`` on one all-finite flag), so a stream costs no extra host
synchronization.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from ._extras import require

Array = jax.Array


def entropy(logits: Array) -> Array:
    """The mean over the batch of the Shannon entropy of softmax(logits) (last axis)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
    return -jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=-1))


def _split(tree: Any, mask: Any) -> tuple[list, list, Any]:
    leaves, treedef = jax.tree.flatten(tree)
    flags = jax.tree.leaves(mask)
    if len(flags) != len(leaves):
        raise ValueError(
            f"the batch-norm mask has {len(flags)} leaves but the parameters have {len(leaves)}"
        )
    return leaves, [bool(f) for f in flags], treedef


def optimizer(tx: Any, owner: str) -> Any:
    """``tx``, checked; TENT's default ``optax.adam(1e-3)`` (the paper's) if it is None.

    Args:
      tx: an optax ``GradientTransformation`` or None.
      owner: what asks, for the error if optax is missing (e.g. ``"jbn.nnx.Tent"``).
    """
    if tx is None:
        require("optax", owner)
        import optax

        return optax.adam(1e-3)
    for method in ("init", "update"):
        if not callable(getattr(tx, method, None)):
            raise TypeError(
                f"tx must be an optax GradientTransformation (with init and update), got "
                f"{type(tx).__name__}"
            )
    return tx


def check_stream(prior: Any, stream: Any) -> None:
    """``stream`` is None or a :class:`jbn.Stream`, and then ``prior`` is left at 0."""
    if stream is None:
        return
    from ._stream import check_stream as check_mode

    check_mode(stream)
    if not (isinstance(prior, (int, float)) and prior == 0.0):
        raise ValueError(
            f"pass prior={prior!r} or stream={stream!r}, not both: the stream mode normalizes "
            "with its memory counted as stream.prior examples"
        )


def check_mask(params: Any, mask: Any) -> None:
    _, flags, _ = _split(params, mask)
    if not any(flags):
        raise ValueError(
            "TENT found no batch-norm scale or bias to adapt: the model has no batch norm with "
            "use_scale/use_bias (or channelwise_affine) among its trainable parameters"
        )


class TentLoop:
    """Entropy-minimization steps on the masked leaves of ``params``.

    Args:
      logits_fn: ``(params, x) -> logits`` (classes on the last axis).
      params: the source parameters (a pytree).
      mask: bools of ``params``' structure, True on what TENT adapts.
      tx: an optax ``GradientTransformation`` for the masked leaves.
      episodic: reset to the source parameters before every :meth:`step`.
      carry: None, or a pytree the model carries from batch to batch (the
        memory of :class:`jbn.Stream`); ``logits_fn`` is then ``(params, carry,
        x) -> (logits, new_carry)``. A step keeps the new carry (a non-finite
        step keeps the old one); :meth:`predict` uses the carry without keeping
        what it returns, and :meth:`reset` returns to the first carry.

    Attributes:
      skipped: the number of steps skipped, since the loop was made, because
        their loss or gradient was not finite (:meth:`reset` keeps the count).
    """

    def __init__(
        self,
        logits_fn: Callable[..., Any],
        params: Any,
        mask: Any,
        tx: Any,
        *,
        episodic: bool = False,
        carry: Any = None,
    ) -> None:
        if not isinstance(episodic, bool):
            raise TypeError(f"episodic must be a bool, got {episodic!r}")
        check_mask(params, mask)
        self.source = params
        self.mask = mask
        self.tx = optimizer(tx, "jbn's TENT")
        self.episodic = episodic
        self.source_carry = carry
        _, flags, treedef = _split(params, mask)

        def run(params: Any, carry: Any, x: Any) -> tuple[Array, Any]:
            if self.source_carry is None:
                return logits_fn(params, x), carry
            return logits_fn(params, carry, x)

        def adapted_loss(adapted: list, frozen: list, carry: Any, x: Any) -> tuple[Array, Any]:
            it_a, it_f = iter(adapted), iter(frozen)
            leaves = [next(it_a) if f else next(it_f) for f in flags]
            logits, carry = run(jax.tree.unflatten(treedef, leaves), carry, x)
            return entropy(logits), carry

        def step(
            params: Any, opt_state: Any, skipped: Array, carry: Any, x: Any
        ) -> tuple[Any, Any, Array, Any, Array]:
            leaves = jax.tree.leaves(params)
            adapted = [v for v, f in zip(leaves, flags, strict=True) if f]
            frozen = [v for v, f in zip(leaves, flags, strict=True) if not f]
            (loss, new_carry), grads = jax.value_and_grad(adapted_loss, has_aux=True)(
                adapted, frozen, carry, x
            )
            finite = jnp.all(jnp.isfinite(loss))
            for g in grads:
                finite &= jnp.all(jnp.isfinite(g))
            it = iter(grads)
            full = [
                next(it) if f else jnp.zeros_like(v) for v, f in zip(leaves, flags, strict=True)
            ]
            updates, new_opt = tx.update(jax.tree.unflatten(treedef, full), opt_state, params)
            it_u = iter(jax.tree.leaves(updates))
            new = []
            for v, f in zip(leaves, flags, strict=True):
                u = next(it_u)
                # A frozen leaf is returned as it is: bit-identical, whatever tx does.
                new.append(jnp.where(finite, (v + u).astype(v.dtype), v) if f else v)
            # A non-finite step keeps the old optimizer state too (a NaN moment would stay).
            opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_opt, opt_state)
            carry = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_carry, carry)
            skipped = skipped + jnp.where(finite, 0, 1).astype(skipped.dtype)
            return jax.tree.unflatten(treedef, new), opt_state, skipped, carry, loss

        self._step = jax.jit(step)
        self._predict = jax.jit(lambda params, carry, x: run(params, carry, x)[0])
        self._skipped = jnp.zeros((), jnp.int32)
        self.reset()

    @property
    def skipped(self) -> int:
        """Steps skipped for a non-finite loss or gradient (never reset)."""
        return int(self._skipped)

    def reset(self) -> None:
        """Back to the source parameters and a fresh optimizer state (episodic TENT)."""
        self.params = self.source
        self.opt_state = self.tx.init(self.source)
        self.carry = self.source_carry
        self.loss = None

    def update(self, x: Any) -> None:
        """One entropy-minimization step on the batch ``x`` (no prediction).

        A batch whose loss or gradient is not finite changes nothing and is
        counted in :attr:`skipped`.
        """
        if self.episodic:
            self.reset()
        self.params, self.opt_state, self._skipped, self.carry, self.loss = self._step(
            self.params, self.opt_state, self._skipped, self.carry, x
        )

    def step(self, x: Any) -> Array:
        """Online TENT: one step on ``x``, then the logits of ``x`` with the new parameters."""
        self.update(x)
        return self.predict(x)

    def adapt(self, batches: Iterable[Any], *, epochs: int = 1) -> None:
        """Offline TENT: one step per batch, ``epochs`` times over ``batches``."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        for _ in range(epochs):
            for x in batches:
                self.update(x)

    def predict(self, x: Any) -> Array:
        """The logits of ``x`` with the current parameters (no step)."""
        return self._predict(self.params, self.carry, x)

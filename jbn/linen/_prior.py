"""Test-time adaptation for linen models: prior-weighted statistics and TENT.

:func:`use_prior` is a context manager (and decorator) under which every
``flax.linen.BatchNorm`` and ``jbn.BatchNorm`` (or those a ``where`` predicate
selects) normalizes with its running statistics pooled with the batch's own
(:func:`jbn.bn_forward` with ``prior``), whatever ``use_running_average`` the
model passes, and updates nothing. :class:`Tent` minimizes the entropy of a
model's predictions on test batches by moving only its batch-norm scales and
biases (Wang et al. 2021).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax

from .. import _checks as checks
from .._checks import PriorForm
from .._optimize import optimize_only
from .._prior import Prior
from .._stream import Stream
from .._tent import TentLoop, check_stream, optimizer
from ._freeze import batch_norm_mask
from ._stream import adapting, start_stream, use_stream


@contextlib.contextmanager
def use_prior(
    prior: float | jax.typing.ArrayLike | None,
    *,
    prior_form: PriorForm = "pooled",
    where: Callable[[tuple[str, ...]], bool] | None = None,
) -> Iterator[None]:
    """Test-time adaptation of every linen batch norm while the context is active.

    Each ``flax.linen.BatchNorm`` and ``jbn.BatchNorm`` normalizes with its
    running statistics, counted as ``prior`` examples, pooled with the statistics
    of the batch it is given (:func:`jbn.bn_forward`'s ``prior``), whatever
    ``use_running_average`` the model passes, and updates nothing. Serving one
    image at a time on shifted data::

      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jbn.linen import use_prior
      >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=True)])
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> with use_prior(16):
      ...     y = model.apply(variables, jnp.ones((1, 3)) + 5.0)

    ``prior=0`` is the batch statistics alone, ``prior=inf`` the running
    statistics; None inside another ``use_prior`` takes the layers out again.
    Contexts nest (the innermost applies) and work as decorators; the settings
    are part of ``jax.jit``'s cache key, so a function jitted outside is traced
    anew under each new setting. A model that runs no batch norm inside the
    context raises a ``ValueError`` on exit. Models adopted through
    :func:`jbn.linen.intercept` work too; ``init`` is left as it is.

    Args:
      prior: N, the number of examples the running statistics count as (>= 0,
        ``inf`` allowed, a Python float or a scalar array); None: no adaptation.
      prior_form: ``"pooled"`` (default: Chan's exact pooling) or ``"linear"``
        (Schneider et al.'s mix, without the between-groups term).
      where: a predicate on a batch norm's module path (a tuple of names, e.g.
        ``("backbone", "BatchNorm_0")``): only the layers it accepts adapt;
        default all.

    Yields:
      None.
    """
    if prior is not None:
        checks.prior(prior, False)
    checks.prior_form(prior_form)
    mode = None if prior is None else Prior(prior, prior_form)
    with adapting(mode, where, "jbn.linen.use_prior", (prior, prior_form, where)):
        yield


class Tent(TentLoop):
    """TENT (Wang et al. 2021) on a linen model: entropy minimization on its batch norms.

    Every step runs ``apply_fn`` under :func:`use_prior` (batch statistics by
    default, ``prior=0``), and moves only the batch-norm scales and biases
    (:func:`jbn.linen.batch_norm_mask` and :func:`jbn.optimize_only`) to
    lower the mean entropy of the predictions; every other parameter stays
    bit-identical and the running statistics do not change::

      tent = jbn.linen.Tent(lambda v, x: model.apply(v, x, train=False), variables)
      logits = tent.step(batch)   # online: a step on the batch, then its logits
      tent.adapt(batches)         # offline: a step per batch ...
      logits = tent.predict(x)    # ... then predict
      tent.reset()                # back to the source model (episodic)

    Args:
      apply_fn: ``(variables, x) -> logits``, e.g. ``lambda v, x: model.apply(v,
        x, train=False)`` (the batch norms adapt whatever mode it sets).
      variables: the source model's variables, with ``params`` and ``batch_stats``.
      tx: an optax optimizer for the batch-norm parameters (default
        ``optax.adam(1e-3)``, the paper's).
      prior: N of the prior-weighted statistics (default 0: the batch's).
      prior_form: ``"pooled"`` or ``"linear"``.
      episodic: reset to the source model before every step.
      stream: a :class:`jbn.Stream`: adapt with the stream statistics
        (:func:`use_stream`) in place of the prior, which does not collapse
        when the stream's classes come in runs. ``apply_fn`` must then return
        ``(logits, updates)``, e.g. ``lambda v, x: model.apply(v, x,
        train=False, mutable=["batch_stats"])``; the memory starts from the
        running statistics, each step takes its batch in, and ``reset`` starts
        it again.

    Attributes:
      variables: the current (adapted) variables, the memory of ``stream``
        included.
      loss: the mean entropy at the last step (before it).
    """

    def __init__(
        self,
        apply_fn: Callable[[Any, Any], Any],
        variables: Mapping[str, Any],
        *,
        tx: Any = None,
        prior: float | jax.typing.ArrayLike = 0.0,
        prior_form: PriorForm = "pooled",
        episodic: bool = False,
        stream: Stream | None = None,
    ) -> None:
        checks.prior(prior, False)
        checks.prior_form(prior_form)
        check_stream(prior, stream)
        mask = batch_norm_mask(variables)
        others = {k: v for k, v in variables.items() if k != "params"}
        tx = optimizer(tx, "jbn.linen.Tent")
        self._others = others
        self._stream = stream
        if stream is None:

            def logits_fn(params: Any, x: Any) -> Any:
                with use_prior(prior, prior_form=prior_form):
                    return apply_fn({**others, "params": params}, x)

            super().__init__(
                logits_fn, variables["params"], mask, optimize_only(tx, mask), episodic=episodic
            )
            return

        def stream_fn(params: Any, memory: Any, x: Any) -> tuple[Any, Any]:
            with use_stream(stream):
                out = apply_fn({**others, "batch_stats": memory, "params": params}, x)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError(
                    "jbn.linen.Tent(stream=...) needs apply_fn to return (logits, updates): "
                    "call model.apply(..., mutable=['batch_stats'])"
                )
            return out[0], out[1]["batch_stats"]

        super().__init__(
            stream_fn,
            variables["params"],
            mask,
            optimize_only(tx, mask),
            episodic=episodic,
            carry=start_stream(others, stream)["batch_stats"],
        )

    @property
    def variables(self) -> dict[str, Any]:
        if self._stream is None:
            return {**self._others, "params": self.params}
        return {**self._others, "batch_stats": self.carry, "params": self.params}

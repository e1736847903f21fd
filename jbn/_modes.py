"""The mode of :func:`jbn.bn_forward`: one value, its ``train`` argument.

``True`` (training: batch statistics, the running ones updated), ``False``
(evaluation: the running statistics), :class:`jbn.Prior` (test-time
adaptation: the running statistics pooled with the batch's, nothing updated)
or :class:`jbn.Stream` (a memory of the stream's statistics pooled with each
example's own, the memory updated), or :class:`jbn.Accumulate` (gradient
accumulation: batch statistics, added to an accumulator that
:func:`jbn.bn_commit` turns into one running update). Each mode carries its own settings; the older
keywords ``prior=N, prior_form=...`` with ``train=False`` are the same
``Prior`` mode.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _checks as checks
from ._accumulate import Accumulate
from ._prior import Prior
from ._stream import Stream

Mode = bool | Prior | Stream | Accumulate


def resolve(train: Any, prior: Any, prior_form: Any) -> Mode:
    """The one mode that ``train`` and the ``prior``/``prior_form`` keywords select."""
    if isinstance(train, (Prior, Stream, Accumulate)):
        if prior is not None:
            raise ValueError(
                f"train={train!r} already is a mode; prior={prior!r} is the older spelling of "
                "train=jbn.Prior(N): pass one of them"
            )
        return train
    if isinstance(train, type) and train in (Prior, Stream, Accumulate):
        raise TypeError(
            f"train={train.__name__} is the class of a mode: pass an instance, e.g. "
            f"train=jbn.{train.__name__}()"
        )
    if not isinstance(train, (bool, np.bool_)):
        raise TypeError(
            "train must be a Python bool or a mode (jbn.Prior(N), jbn.Stream(horizon, prior), "
            f"jbn.Accumulate()), got {train!r}; under jax.jit make it static, e.g. "
            "jax.jit(step, static_argnames='train')"
        )
    train = bool(train)
    if prior is None:
        return train
    checks.prior(prior, train)  # a prior with train=True is an error
    return Prior(prior, prior_form)  # Prior checks the form


def layer_mode(
    train: bool,
    prior: Any,
    prior_form: Any,
    stream: Stream | None,
    accumulation: Accumulate | None = None,
) -> Mode:
    """A layer's one mode: its stream, its prior, its accumulation in training, else ``train``.

    A frontend's layer keeps its test-time mode in attributes (``stream``, set by
    ``use_stream``; ``prior`` and ``prior_form``, set by ``use_prior`` or the
    constructor), and it overrides the layer's train flag. Its accumulation mode
    (``accumulation``, set by ``use_accumulation``) replaces training only: an
    evaluation call (``train=False``) still uses the running statistics.
    """
    if stream is not None:
        return stream
    if prior is not None:
        return Prior(prior, prior_form)
    if train and accumulation is not None:
        return accumulation
    return train

"""Whole-model folding: which batch norms fold into which layers, found by tracing the model once.

A frontend runs its model once on a probe batch and tells a :class:`Recorder`
what it sees: "linear layer L returned the object o" and "batch norm B received
the object i". A batch norm folds into a layer when its input *is* (``is``, the
same traced array) that layer's output, each is called once, the layer's output
feeds no other batch norm, and the batch norm's single feature axis is the
layer's output-feature axis. Everything else stays and gets a reason.
:func:`fold_traced` is the whole tool, run by every frontend: trace, plan, fold
(:func:`jbn.fold_batch_norm` per pair, by the frontend), then compare the folded
model with the original on the probe batch.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from . import _checks as checks
from ._fold import relative_difference

NOT_AFTER_LAYER = (
    "its input is not the output of a linear layer (Dense/Linear, Conv, ConvTranspose, "
    "DenseGeneral/LinearGeneral): something sits in between (an add, an activation, a "
    "reshape, pooling)"
)


@dataclasses.dataclass(frozen=True)
class FoldReport:
    """What a ``fold_batch_norms`` did: the pairs it folded, and the batch norms it left.

    Attributes:
      folded: ``(layer, batch_norm)`` names, in call order; each batch norm is gone
        and its layer holds it.
      left: ``{batch_norm: reason}`` for each batch norm left in place, which still
        normalizes as before.
    """

    folded: tuple[tuple[str, str], ...]
    left: Mapping[str, str]


class Folded(tuple[Any, Any]):
    """The pair a ``fold_batch_norms`` returns, e.g. ``(folded_apply_fn, folded_variables)``.

    It unpacks as the pair; its ``report`` attribute is the :class:`FoldReport`.
    """

    report: FoldReport

    def __new__(cls, first: Any, second: Any, report: FoldReport) -> Folded:
        self = super().__new__(cls, (first, second))
        self.report = report
        return self


@dataclasses.dataclass
class _Layer:
    output: Any  # kept alive, so that no other object takes its id
    name: str
    feature_axis: int | None
    refusal: str | None


class Recorder:
    """What one trace of a model saw: its linear layers' outputs and its batch norms' inputs.

    Frontends name layers and batch norms by strings (their paths in the model)
    and keep a key of their own per name (a module, a path) to read and write
    its variables.
    """

    def __init__(self) -> None:
        self._outputs: dict[int, _Layer] = {}
        self._layer_calls: Counter[str] = Counter()
        self._bn_calls: Counter[str] = Counter()
        self._bns: dict[str, tuple[Any, tuple[int, ...], str | None]] = {}

    def layer(
        self, name: str, output: Any, feature_axis: int | None, refusal: str | None = None
    ) -> None:
        """Linear layer ``name`` returned ``output``, its output features on ``feature_axis``.

        ``refusal``: why no batch norm can fold into this layer, or None.
        """
        self._layer_calls[name] += 1
        ndim = getattr(output, "ndim", None)
        if feature_axis is not None and ndim is not None:
            feature_axis %= ndim
        self._outputs[id(output)] = _Layer(output, name, feature_axis, refusal)

    def batch_norm(
        self, name: str, x: Any, axes: tuple[int, ...], refusal: str | None = None
    ) -> None:
        """Batch norm ``name`` received ``x`` and normalizes its feature ``axes`` (each >= 0).

        ``refusal``: why this batch norm cannot be folded whatever comes before it, or None.
        """
        self._bn_calls[name] += 1
        if name not in self._bns:
            self._bns[name] = (x, axes, refusal)

    def plan(self, tool: str) -> tuple[FoldReport, dict[str, str]]:
        """The report, and ``{batch_norm: layer}`` for the pairs to fold.

        Raises:
          ValueError: the trace met no batch norm, or none can be folded (naming each reason).
        """
        if not self._bns:
            raise ValueError(
                f"{tool}: the model ran no batch norm on x, so there is nothing to fold"
            )
        feeds = Counter(id(x) for x, _, _ in self._bns.values())
        pairs: dict[str, str] = {}
        left: dict[str, str] = {}
        for bn, (x, axes, refusal) in self._bns.items():
            layer = self._outputs.get(id(x))
            if refusal is not None:
                reason = refusal
            elif self._bn_calls[bn] > 1:
                reason = f"it is called {self._bn_calls[bn]} times (a folded one runs once)"
            elif layer is None or layer.output is not x:
                reason = NOT_AFTER_LAYER
            else:
                reason = _layer_reason(layer, axes, self._layer_calls[layer.name], feeds[id(x)])
                if reason is None:
                    pairs[bn] = layer.name
            if reason is not None:
                left[bn] = reason
        if not pairs:
            reasons = "; ".join(f"{bn}: {why}" for bn, why in left.items())
            raise ValueError(f"{tool}: no batch norm of the model can be folded ({reasons})")
        folded = tuple((layer, bn) for bn, layer in pairs.items())
        return FoldReport(folded, left), pairs


def _layer_reason(layer: _Layer, axes: tuple[int, ...], calls: int, feeds: int) -> str | None:
    """Why a batch norm cannot fold into the layer whose output it normalizes, or None."""
    if layer.refusal is not None:
        return f"its layer {layer.name} cannot take it: {layer.refusal}"
    if calls > 1:
        return f"its layer {layer.name} is called {calls} times"
    if feeds > 1:
        return f"its layer {layer.name}'s output feeds {feeds} batch norms"
    if len(axes) != 1:
        return f"it normalizes several feature axes {axes}"
    if axes[0] != layer.feature_axis:
        return (
            f"it normalizes axis {axes[0]} of its input, but {layer.name}'s output features "
            f"are on axis {layer.feature_axis}"
        )
    return None


def feature_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    """A batch norm's ``axis`` (an int or a sequence of ints) as sorted axes >= 0 of an ndim array."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def fold_traced(
    tool: str,
    trace: Callable[[Recorder], Any],
    fold: Callable[[dict[str, str]], Any],
    run: Callable[[Any], Any],
    rtol: float,
) -> tuple[Any, FoldReport]:
    """Traces, plans, folds and checks: the one ``fold_batch_norms`` every frontend runs.

    Args:
      tool: the frontend's function name, for the errors.
      trace: runs the original model in evaluation mode on the probe batch, telling
        the recorder what it sees, and returns the output.
      fold: builds (or makes, in place) the folded model from ``{batch_norm: layer}``.
      run: the folded model's output on the probe batch, given what ``fold`` returned.
      rtol: the tolerance, relative to the largest output.

    Returns:
      ``(what fold returned, the report)``.

    Raises:
      ValueError: no batch norm, none foldable, or a folded model that differs from
        the original by more than ``rtol`` (the difference measured is in the message).
    """
    rtol = checks.static_float(rtol, "rtol", positive=True)
    recorder = Recorder()
    reference = trace(recorder)
    report, pairs = recorder.plan(tool)
    folded = fold(pairs)
    error = relative_difference(reference, run(folded))
    if not error <= rtol:
        raise ValueError(
            f"{tool}: the folded model differs from the original by {error:.3g} (relative to "
            f"the largest output; rtol={rtol:g}) on x, so folding {list(report.folded)} does not "
            "preserve the model, which is left as it was. Usual causes: a folded layer's output "
            "is also used elsewhere than by its batch norm (e.g. a skip connection), or the "
            "model is not run in evaluation mode (dropout, a batch norm in training mode)"
        )
    return folded, report

"""``convert``: swap flax's NNX batch norms for jbn's in a model graph, and back.

The swap itself is :func:`jbn.nnx._graph.replace_modules`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from flax import nnx
from flax.nnx import graph

from .. import _checks as checks
from . import _batch_norm as jbn_nnx
from ._graph import replace_modules

__all__ = ("convert",)

_VARIABLES = ("mean", "var", "scale", "bias")
_INTERNAL = ("_pytree__nodes", "_pytree__state")
# jbn layer attributes that are no constructor options.
_JBN_STATE = ("count",)

_Module = TypeVar("_Module", bound=nnx.Module)


def _options(cls: type) -> dict[str, Any]:
    """A class's constructor options and their defaults (without ``rngs``)."""
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name not in ("self", "rngs")
    }


def _check_plain(module: nnx.Module, cls: type, known: tuple[str, ...]) -> None:
    """Raises unless ``module`` is exactly ``cls`` with only the attributes ``cls`` sets."""
    if type(module) is not cls:
        raise TypeError(
            f"jbn.nnx.convert cannot convert {type(module).__qualname__}, a subclass of "
            f"{cls.__module__}.{cls.__qualname__}: its own behaviour would be lost. Convert "
            "its layers yourself, or leave it out (convert(..., to=...) converts only "
            "exact instances)"
        )
    extra = sorted(set(vars(module)) - set(known) - set(_INTERNAL))
    if extra:
        raise TypeError(
            f"jbn.nnx.convert cannot convert this {cls.__qualname__}: it has attributes "
            f"{extra} that the converted module would not have"
        )


def _move(old: nnx.Module, new: _Module, options: dict[str, Any]) -> _Module:
    """``new`` takes ``old``'s variables (the same Variable objects) and options."""
    for name in _VARIABLES:
        setattr(new, name, getattr(old, name))
    for name, value in options.items():
        setattr(new, name, value)
    return new


def _common(old: nnx.Module) -> dict[str, Any]:
    """``old``'s options that both classes take (the initializers are not kept by flax)."""

    both = set(_options(nnx.BatchNorm)) & set(_options(jbn_nnx.BatchNorm))
    return {
        name: getattr(old, name) for name in sorted(both - {"num_features"}) if name in vars(old)
    }


def _check_to_jbn(old: nnx.BatchNorm) -> None:

    flax_options = _options(nnx.BatchNorm)
    _check_plain(old, nnx.BatchNorm, (*flax_options, *_VARIABLES))
    jbn_options = _options(jbn_nnx.BatchNorm)
    unsupported = [
        f"{name}={getattr(old, name)!r}"
        for name, default in flax_options.items()
        if name not in jbn_options and name in vars(old) and getattr(old, name) != default
    ]
    if unsupported:  # a flax version with options jbn lacks
        raise ValueError(
            f"jbn.nnx.convert: jbn.nnx.BatchNorm cannot express {', '.join(unsupported)} "
            "of a flax.nnx.BatchNorm"
        )


def _to_jbn(old: nnx.BatchNorm) -> jbn_nnx.BatchNorm:

    options = _common(old)
    # Throwaway initial values (rngs are needed to build one), replaced by old's.
    new = jbn_nnx.BatchNorm(old.num_features, **options, rngs=nnx.Rngs(0))
    return _move(old, new, options)


def _flax_num_features(old: jbn_nnx.BatchNorm) -> int:
    """The flax ``num_features`` of a jbn layer; raises if flax cannot express the layer."""

    jbn_options = _options(jbn_nnx.BatchNorm)
    _check_plain(old, jbn_nnx.BatchNorm, (*jbn_options, *_VARIABLES, *_JBN_STATE))
    flax_options = _options(nnx.BatchNorm)
    # jbn's own options at their defaults are fine; anything else flax cannot do.
    unsupported = [
        f"{name}={getattr(old, name)!r}"
        for name, default in jbn_options.items()
        if name not in flax_options and getattr(old, name) != default
    ]
    if old.momentum is None:
        unsupported.append("momentum=None (cumulative average)")
    num_features = old.num_features
    if not isinstance(num_features, int):
        if len(num_features) != 1:
            unsupported.append(f"num_features={num_features!r} (several feature axes)")
        else:
            num_features = num_features[0]
    if getattr(old, "recalibration", None) is not None:
        unsupported.append("a recalibration in progress")
    if unsupported:
        raise ValueError(
            "jbn.nnx.convert(model, to='flax'): flax.nnx.BatchNorm cannot express "
            f"{', '.join(unsupported)} of a jbn.nnx.BatchNorm"
        )
    assert isinstance(num_features, int)  # several feature axes are unsupported, above
    return num_features


def _to_flax(old: jbn_nnx.BatchNorm) -> nnx.BatchNorm:
    num_features = _flax_num_features(old)
    options = _common(old)
    new = nnx.BatchNorm(num_features, **options, rngs=nnx.Rngs(0))
    return _move(old, new, options)


def convert(model: Any, *, to: Literal["jbn", "flax"] = "jbn") -> Any:
    """Swaps, in place, the batch norms of an NNX model between flax and jbn.

    ``to="jbn"`` replaces every ``flax.nnx.BatchNorm`` with a
    ``jbn.nnx.BatchNorm``; ``to="flax"`` does the reverse. Wherever the layers
    sit (attributes of nested modules, ``nnx.List``, ``nnx.Dict``,
    ``nnx.Sequential``, containers wrapped in ``nnx.data``), each new layer takes
    over the old one's Variable objects (values, dtypes, metadata, so an
    optimizer state built on the model still matches), its options and its
    train/eval state (``use_running_average``)::

      >>> import jax, jbn
      >>> from flax import nnx
      >>> from jbn.nnx import convert
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
      >>> model = convert(model)
      >>> type(model.layers[1]) is jbn.nnx.BatchNorm
      True

    Subclasses are not converted silently: a subclass of the source class, or a
    layer with attributes of its own, raises a ``TypeError``; a jbn layer with
    one of jbn's own options away from its default (``residual="output"``,
    ``renorm``, ghost batches, ``unbiased_running_var``, ...), ``momentum=None`` or
    several feature axes raises a ``ValueError`` with ``to="flax"``. Every layer is checked before any is
    converted, so on an error the model is left as it was.

    Args:
      model: an NNX module (or a list, dict or tuple of them).
      to: ``"jbn"`` (default) or ``"flax"``.

    Returns:
      ``model``, converted in place; when ``model`` is itself a batch norm, the
      new layer.
    """
    if to not in ("jbn", "flax"):
        raise ValueError(f"to must be 'jbn' or 'flax', got {to!r}")
    checks.found_batch_norms(
        count_batch_norms(model),
        "jbn.nnx.convert",
        "flax.nnx.BatchNorm and jbn.nnx.BatchNorm layers",
    )
    if to == "jbn":
        return _swap(model, nnx.BatchNorm, _check_to_jbn, _to_jbn)
    if to == "flax":
        return _swap(model, jbn_nnx.BatchNorm, _flax_num_features, _to_flax)
    raise ValueError(f"to must be 'jbn' or 'flax', got {to!r}")


def count_batch_norms(model: Any) -> int:
    """The ``flax.nnx.BatchNorm`` and ``jbn.nnx.BatchNorm`` layers of ``model`` (itself included)."""
    types = (nnx.BatchNorm, jbn_nnx.BatchNorm)
    return sum(isinstance(n, types) for _, n in [((), model), *graph.iter_graph(model)])


def _swap(
    model: Any,
    source: type[_Module],
    check: Callable[[_Module], object],
    make: Callable[[_Module], nnx.Module],
) -> Any:
    """Checks every ``source`` layer of ``model``, then replaces each with ``make(layer)``."""
    if isinstance(model, source):
        check(model)
    for _, node in graph.iter_graph(model):
        if isinstance(node, source):
            check(node)
    return replace_modules(model, lambda m: isinstance(m, source), make)

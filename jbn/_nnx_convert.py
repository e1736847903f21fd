"""``convert``: swap flax's NNX batch norms for jbn's in a model graph, and back.

The graph walk, :func:`replace_modules`, is generic: it replaces, in place, every
module of an NNX graph that a predicate selects, wherever it sits (module
attributes, ``nnx.List``, ``nnx.Dict``, ``nnx.Sequential``, lists, dicts and
tuples wrapped in ``nnx.data``), and a module shared by several parents stays
shared.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from flax import nnx
from flax.nnx import graph

__all__ = ("convert", "replace_modules")

_VARIABLES = ("mean", "var", "scale", "bias")
_INTERNAL = ("_pytree__nodes", "_pytree__state")
# jbn layer attributes that are no constructor options.
_JBN_STATE = ("count", "recalibration")


def _options(cls: type) -> dict[str, Any]:
    """A class's constructor options and their defaults (without ``rngs``)."""
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name not in ("self", "rngs")
    }


def replace_modules(
    model: Any,
    predicate: Callable[[nnx.Module], bool],
    make: Callable[[nnx.Module], nnx.Module],
) -> Any:
    """Replaces, in place, every module of an NNX graph for which ``predicate`` holds.

    Each selected module ``m`` is replaced by ``make(m)`` in every place that
    refers to it (one ``make`` call per module, so shared modules stay shared);
    the walk does not descend into selected modules nor into what ``make``
    returns. Mutable containers (modules, ``nnx.List``, ``nnx.Dict``, lists,
    dicts) are changed in place; an immutable one (a tuple) is rebuilt and
    stored in its parent.

    Args:
      model: an NNX graph node: a module, or a list, dict or tuple of them.
      predicate: selects the modules to replace.
      make: builds the replacement of one selected module.

    Returns:
      ``model`` itself, or ``make(model)`` when ``model`` is itself selected,
      or a rebuilt ``model`` when it is a tuple.
    """
    made: dict[int, Any] = {}
    visited: dict[int, Any] = {}  # id -> the node or its rebuilt replacement

    def replacement(node: Any) -> Any:
        if isinstance(node, nnx.Module) and predicate(node):
            if id(node) not in made:
                made[id(node)] = (node, make(node))  # keeps node alive: ids stay unique
            return made[id(node)][1]
        return walk(node)

    def walk(node: Any) -> Any:
        if id(node) in visited:
            return visited[id(node)][1]
        impl = graph.get_node_impl(node)
        if impl is None:  # a leaf: Variable, array, static value
            return node
        visited[id(node)] = (node, node)
        changed = {}
        for key, child in impl.node_dict(node).items():
            new = replacement(child)
            if new is not child:
                changed[key] = new
        if not changed:
            return node
        if impl.set_key is not None:
            for key, new in changed.items():
                impl.set_key(node, key, new)
            return node
        children, aux = impl.flatten(node)
        rebuilt = impl.unflatten([(k, changed.get(k, v)) for k, v in children], aux)
        visited[id(node)] = (node, rebuilt)
        return rebuilt

    return replacement(model)


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


def _move(old: nnx.Module, new: nnx.Module, options: dict[str, Any]) -> nnx.Module:
    """``new`` takes ``old``'s variables (the same Variable objects) and options."""
    for name in _VARIABLES:
        setattr(new, name, getattr(old, name))
    for name, value in options.items():
        setattr(new, name, value)
    return new


def _common(old: nnx.Module) -> dict[str, Any]:
    """``old``'s options that both classes take (the initializers are not kept by flax)."""
    from . import nnx as jbn_nnx

    both = set(_options(nnx.BatchNorm)) & set(_options(jbn_nnx.BatchNorm))
    return {
        name: getattr(old, name) for name in sorted(both - {"num_features"}) if name in vars(old)
    }


def _check_to_jbn(old: nnx.BatchNorm) -> None:
    from . import nnx as jbn_nnx

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


def _to_jbn(old: nnx.BatchNorm) -> nnx.Module:
    from . import nnx as jbn_nnx  # the public module; here to avoid an import cycle

    options = _common(old)
    # Throwaway initial values (rngs are needed to build one), replaced by old's.
    new = jbn_nnx.BatchNorm(old.num_features, **options, rngs=nnx.Rngs(0))
    return _move(old, new, options)


def _flax_num_features(old: nnx.Module) -> int:
    """The flax ``num_features`` of a jbn layer; raises if flax cannot express the layer."""
    from . import nnx as jbn_nnx

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
    return num_features


def _to_flax(old: nnx.Module) -> nnx.BatchNorm:
    num_features = _flax_num_features(old)
    options = _common(old)
    new = nnx.BatchNorm(num_features, **options, rngs=nnx.Rngs(0))
    return _move(old, new, options)


def convert(model: Any, *, to: str = "jbn") -> Any:
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
      >>> from jbn._nnx_convert import convert
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
      >>> model = convert(model)
      >>> type(model.layers[1]).__module__
      'jbn.nnx'

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
    from . import nnx as jbn_nnx

    if to == "jbn":
        source, check, make = nnx.BatchNorm, _check_to_jbn, _to_jbn
    elif to == "flax":
        source, check, make = jbn_nnx.BatchNorm, _flax_num_features, _to_flax
    else:
        raise ValueError(f"to must be 'jbn' or 'flax', got {to!r}")
    if isinstance(model, source):
        check(model)
    for _, node in graph.iter_graph(model):
        if isinstance(node, source):
            check(node)
    return replace_modules(model, lambda m: isinstance(m, source), make)

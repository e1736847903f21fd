"""jbn is fully annotated: a regression fails here even where the type checker is not run.

``make typecheck`` (basedpyright on ``jbn/``) checks that the annotations are
right; these tests check that they are there: every parameter and return of
every public function, method and class of ``jbn``, ``jbn.linen``, ``jbn.nnx``
and ``jbn.equinox`` (each ``__all__``), every function anywhere in ``jbn/``
(read with ``ast``, so private helpers too), and a ``Literal`` for every string
option.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pathlib
import sys
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import jbn

PACKAGE = pathlib.Path(jbn.__file__).parent
NAMESPACES = ("jbn", "jbn.linen", "jbn.nnx", "jbn.equinox")
# Methods of a public class that are part of its API, besides the public ones.
DUNDERS = ("__init__", "__call__")


def _own(fn: Any) -> bool:
    """Whether ``fn`` is a function written in jbn (not flax's, equinox's or generated)."""
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    return code is not None and pathlib.Path(code.co_filename).is_relative_to(PACKAGE)


def _public_callables() -> Iterator[tuple[str, Callable[..., Any]]]:
    """``(qualified name, function)`` for every public function and method of jbn's API."""
    for namespace in NAMESPACES:
        module = importlib.import_module(namespace)
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                continue  # a namespace of its own, listed in NAMESPACES
            if inspect.isclass(obj):
                for attr, value in vars(obj).items():
                    if attr.startswith("_") and attr not in DUNDERS:
                        continue
                    if isinstance(value, (staticmethod, classmethod)):
                        value = value.__func__
                    if inspect.isfunction(inspect.unwrap(value)) and _own(value):
                        yield f"{namespace}.{name}.{attr}", value
            elif callable(obj):
                yield f"{namespace}.{name}", obj


PUBLIC = dict(_public_callables())


def _missing(fn: Callable[..., Any]) -> list[str]:
    """The parameters of ``fn`` without an annotation, and "return" if it has none."""
    signature = inspect.signature(inspect.unwrap(fn))
    missing = [
        name
        for name, p in signature.parameters.items()
        if p.annotation is inspect.Parameter.empty and name not in ("self", "cls")
    ]
    if signature.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


def test_public_api_is_found():
    # The walk finds the API (a broken walk would pass every test below vacuously).
    for name in (
        "jbn.bn_forward",
        "jbn.sync_batch_stats",
        "jbn.linen.BatchNorm.__call__",
        "jbn.linen.intercept",
        "jbn.nnx.BatchNorm.__init__",
        "jbn.nnx.BatchNorm.__call__",
        "jbn.nnx.convert",
        "jbn.equinox.BatchNorm.__init__",
        "jbn.equinox.BatchNorm.__call__",
        "jbn.equinox.convert",
    ):
        assert name in PUBLIC, sorted(PUBLIC)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_function_fully_annotated(name):
    missing = _missing(PUBLIC[name])
    assert not missing, f"{name} lacks annotations for {missing}"


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _unannotated(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = node.args
    params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
    params += [p for p in (a.vararg, a.kwarg) if p is not None]
    missing = [p.arg for p in params if p.annotation is None and p.arg not in ("self", "cls")]
    if node.returns is None:
        missing.append("return")
    return missing


SOURCES = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("source", SOURCES)
def test_every_function_fully_annotated(source):
    tree = ast.parse((PACKAGE / source).read_text(encoding="utf-8"))
    gaps = [
        f"{node.name} (line {node.lineno}): {missing}"
        for node in _functions(tree)
        if (missing := _unannotated(node))
    ]
    assert not gaps, f"jbn/{source}: functions without full annotations:\n" + "\n".join(gaps)


def test_unannotated_function_is_caught():
    # The checks above can fail.
    def bare(x, y: int):
        return x

    assert _missing(bare) == ["x", "return"]
    tree = ast.parse("def f(a, *args: int, b=1, **kw) -> None: ...")
    assert _unannotated(next(_functions(tree))) == ["a", "b", "kw"]


def _resolve(namespace: dict[str, Any], annotation: Any) -> Any:
    """An annotation as an object (annotations are strings under ``from __future__``)."""
    if not isinstance(annotation, str):
        return annotation
    return eval(annotation, {**vars(typing), **namespace})  # noqa: S307


def _string_options() -> Iterator[tuple[str, str, Any, str]]:
    """``(where, name, annotation, default)`` for every parameter or field with a string default."""
    for name, fn in sorted(PUBLIC.items()):
        fn = inspect.unwrap(fn)
        for param, p in inspect.signature(fn).parameters.items():
            if isinstance(p.default, str):
                yield name, param, _resolve(fn.__globals__, p.annotation), p.default
    for namespace in NAMESPACES:
        module = importlib.import_module(namespace)
        for name in module.__all__:
            cls = getattr(module, name)
            if not (inspect.isclass(cls) and dataclasses.is_dataclass(cls)):
                continue
            for field in dataclasses.fields(cls):
                owner = next(
                    k for k in cls.__mro__ if field.name in vars(k).get("__annotations__", {})
                )
                if isinstance(field.default, str) and owner.__module__.startswith("jbn."):
                    globals_ = vars(sys.modules[owner.__module__])
                    annotation = _resolve(globals_, owner.__annotations__[field.name])
                    yield f"{namespace}.{name}", field.name, annotation, field.default


STRING_OPTIONS = list(_string_options())


def test_string_options_found():
    found = {(name, param) for name, param, _, _ in STRING_OPTIONS}
    assert ("jbn.bn_forward", "residual") in found
    assert ("jbn.nnx.convert", "to") in found
    assert ("jbn.linen.BatchNorm", "residual") in found  # a dataclass field


@pytest.mark.parametrize(
    "name, param, annotation, default",
    STRING_OPTIONS,
    ids=[f"{name}-{param}" for name, param, _, _ in STRING_OPTIONS],
)
def test_string_option_is_literal(name, param, annotation, default):
    assert typing.get_origin(annotation) is typing.Literal, (
        f"{name}({param}=...) takes a string option: annotate it with Literal[...] of its "
        f"values, not {annotation!r}"
    )
    assert default in typing.get_args(annotation)


def test_residual_values():
    from jbn._checks import RESIDUALS

    annotation = inspect.signature(jbn.bn_forward).parameters["residual"].annotation
    assert (
        typing.get_args(_resolve(jbn.bn_forward.__globals__, annotation))
        == RESIDUALS
        == ("input", "output")
    )

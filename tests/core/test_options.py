"""jbn's options are declared once (jbn._options.OPTIONS): every frontend and bn_forward match it.

Each frontend spells the options out (for type checkers and readers); these
tests fail when one lacks an option, misnames it, or has another default or
annotation. Also: no class in jbn is over 200 lines.
"""

import ast
import dataclasses
import inspect
import pathlib

import pytest

import jbn
from jbn import _options as options

ROOT = pathlib.Path(jbn.__file__).parent


def _signature_options(fn):
    return {
        name: (p.default, p.annotation)
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _linen_options():
    linen = pytest.importorskip("jbn.linen")
    return {f.name: (f.default, f.type) for f in dataclasses.fields(linen.BatchNorm)}


def _nnx_options():
    nnx = pytest.importorskip("jbn.nnx")
    return _signature_options(nnx.BatchNorm.__init__)


def _equinox_options():
    pytest.importorskip("equinox")
    import jbn.equinox

    return _signature_options(jbn.equinox.BatchNorm.__init__)


FRONTENDS = {
    "bn_forward": lambda: _signature_options(jbn.bn_forward),
    "linen": _linen_options,
    "nnx": _nnx_options,
    "equinox": _equinox_options,
}


def declared_mismatches(found, per_call_arrays=False):
    """What ``found`` ({name: (default, annotation)}) gets wrong about OPTIONS."""
    errors = []
    for o in options.OPTIONS:
        if o.name not in found:
            errors.append(f"{o.name} is missing")
            continue
        default, annotation = found[o.name]
        if default != o.default or type(default) is not type(o.default):
            errors.append(f"{o.name} defaults to {default!r}, declared {o.default!r}")
        expected = {o.annotation}
        if per_call_arrays and o.per_call:
            expected.add(f"{o.annotation} | ArrayLike")
        if annotation not in expected:
            errors.append(f"{o.name} is annotated {annotation!r}, declared {o.annotation!r}")
    return errors


@pytest.mark.parametrize("frontend", sorted(FRONTENDS))
def test_every_frontend_declares_every_option(frontend):
    found = FRONTENDS[frontend]()
    assert declared_mismatches(found, per_call_arrays=frontend == "bn_forward") == []


def test_the_consistency_check_can_fail():
    good = {o.name: (o.default, o.annotation) for o in options.OPTIONS}
    assert declared_mismatches(good) == []
    missing = {k: v for k, v in good.items() if k != "renorm"}
    assert declared_mismatches(missing) == ["renorm is missing"]
    renamed = {("min_scal" if k == "min_scale" else k): v for k, v in good.items()}
    assert declared_mismatches(renamed) == ["min_scale is missing"]
    assert declared_mismatches(good | {"rmax": (2.0, "float")}) == [
        "rmax defaults to 2.0, declared 3.0"
    ]
    assert declared_mismatches(good | {"residual": ("input", "str")}) == [
        "residual is annotated 'str', declared 'Residual'"
    ]


def test_declarations_are_sound():
    assert len({o.name for o in options.OPTIONS}) == len(options.OPTIONS)
    for o in options.OPTIONS:
        assert o.check(o.default, o.name) == o.default  # every default passes its own check
        assert o.help and o.help.endswith(".")
    assert options.BY_NAME["residual"].annotation == "Residual"
    assert jbn._checks.RESIDUALS == ("input", "output")


def test_docstrings_carry_every_options_help():
    docs = {"bn_forward": jbn.bn_forward.__doc__}
    for name in ("linen", "nnx", "equinox"):
        try:
            module = __import__(f"jbn.{name}", fromlist=["BatchNorm"])
        except ImportError:
            continue
        docs[name] = module.BatchNorm.__doc__
    for where, doc in docs.items():
        assert options.MARKER not in doc, where
        flat = " ".join(doc.split())
        for o in options.OPTIONS:
            assert f"{o.name}: {o.help}" in flat, (where, o.name)


@pytest.mark.parametrize(
    "name, value, error, match",
    [
        ("unbiased_running_var", "no", TypeError, "unbiased_running_var must be a Python bool"),
        ("finite_running_stats", 1, TypeError, "finite_running_stats must be a Python bool"),
        ("renorm", "yes", TypeError, "renorm must be a Python bool"),
        ("residual", "x", ValueError, "residual must be 'input' or 'output', got 'x'"),
        ("min_scale", float("inf"), ValueError, "min_scale must be a finite number > 0.0"),
        ("min_scale", 0.0, ValueError, r"min_scale must be > 0\.0, got 0\.0"),
        ("virtual_batch_size", 0, ValueError, "virtual_batch_size must be a positive int"),
        ("rmax", 0.5, ValueError, r"rmax must be >= 1\.0"),
        ("dmax", -1.0, ValueError, r"dmax must be >= 0\.0"),
    ],
)
def test_bn_forward_refuses_bad_options(name, value, error, match):
    import jax.numpy as jnp

    params, state = jbn.bn_init(3)
    with pytest.raises(error, match=match):
        jbn.bn_forward(params, state, jnp.ones((4, 3)), True, **{name: value})


def _classes():
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                yield f"{path.relative_to(ROOT.parent)}:{node.name}", node.end_lineno - start + 1


def test_no_class_is_over_200_lines():
    sizes = dict(_classes())
    assert "jbn/equinox/_batch_norm.py:BatchNorm" in sizes
    assert {name: n for name, n in sizes.items() if n > 200} == {}

"""The core needs jax alone: `import jbn` loads no framework, and a missing one is a clear error.

Each check runs in a fresh interpreter, since this test process has imported
flax and equinox already.
"""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FRAMEWORKS = ("flax", "optax", "equinox")


def run(code: str, *, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh Python, with the packages in ``block`` made unimportable."""
    blocker = textwrap.dedent(
        f"""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {block!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, _Block())
        """
    )
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-c", blocker + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


def test_import_jbn_loads_no_framework():
    out = run(
        """
        import sys
        import jax.numpy as jnp
        import jbn
        from jbn import *  # the core's names only: no framework needed
        params, state = bn_init(3)
        y, _ = jbn.bn_forward(params, state, jnp.ones((4, 3)), True)
        jbn.sync_batch_stats([state, state])
        print(sorted(m for m in ("flax", "optax", "equinox") if m in sys.modules))
        """,
        block=FRAMEWORKS,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_core_and_equinox_work_without_flax_and_optax():
    out = run(
        """
        import sys
        import equinox as eqx, jax, jax.numpy as jnp
        import jbn, jbn.equinox
        bn, state = eqx.nn.make_with_state(jbn.equinox.BatchNorm)(3, axis_name="batch")
        y, state = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            jnp.arange(12.0).reshape(4, 3), state
        )
        assert abs(float(y.mean())) < 1e-6
        print(sorted(m for m in ("flax", "optax") if m in sys.modules))
        """,
        block=("flax", "optax"),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "name, missing, extra",
    [
        ("jbn.linen", "flax", "flax"),
        ("jbn.nnx", "flax", "flax"),
        ("jbn.equinox", "equinox", "equinox"),
        ("jbn.BatchNorm", "flax", "flax"),
    ],
)
def test_missing_framework_names_the_extra(name, missing, extra):
    attribute = name.split(".", 1)[1]
    out = run(
        f"""
        import jbn
        try:
            getattr(jbn, {attribute!r})
        except ModuleNotFoundError as e:
            print(type(e).__name__, e.name, "|", e)
        """,
        block=(missing,),
    )
    assert out.returncode == 0, out.stderr
    kind, module = out.stdout.split(" ", 2)[:2]
    assert kind == "ModuleNotFoundError" and module == missing, out.stdout
    assert f'pip install "jbn[{extra}]"' in out.stdout, out.stdout


def test_optimize_only_without_optax_names_the_extra():
    out = run(
        """
        import jbn
        try:
            jbn.optimize_only(None, {})
        except ModuleNotFoundError as e:
            print(e)
        """,
        block=("optax",),
    )
    assert out.returncode == 0, out.stderr
    assert 'pip install "jbn[flax]"' in out.stdout, out.stdout


def test_lazy_names_are_the_frontends():
    import jbn.equinox
    import jbn.linen
    import jbn.nnx

    assert jbn.BatchNorm is jbn.linen.BatchNorm
    assert jbn.recalibrate_batch_stats is jbn.linen.recalibrate_batch_stats
    assert set(jbn.__all__) <= set(dir(jbn))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        jbn.nope  # noqa: B018


def test_no_module_outside_the_frontends_imports_a_framework():
    """Only jbn/linen, jbn/nnx and jbn/equinox import flax, optax or equinox at top level."""
    import ast
    import pathlib

    root = pathlib.Path(REPO) / "jbn"
    offenders = []
    for path in root.rglob("*.py"):
        if path.relative_to(root).parts[0] in ("linen", "nnx", "equinox"):
            continue
        for node in ast.parse(path.read_text()).body:  # top level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] in FRAMEWORKS]
    assert not offenders

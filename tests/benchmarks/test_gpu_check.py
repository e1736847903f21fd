"""The GPU check runs on the CPU: ``benchmarks/gpu.py --tiny`` and the shell script's syntax.

``python -m benchmarks.gpu --tiny`` runs once, as a user runs it (a subprocess from
the repository root); its JSON and Markdown must hold real numbers for jbn and
flax, and torch's column exactly when torch is installed. The tiny ResNet's
first loss must match between jbn's and flax's batch norm (same weights, same
batch: the same forward pass), and the full ResNet-50 must have the reference
architecture's 25,557,032 parameters and 53 batch norms.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks import gpu  # noqa: E402

HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with open(out / "gpu.json") as f:
        data = json.load(f)
    return data, (out / "gpu.md").read_text()


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_layer_records_hold_real_numbers(tiny_run):
    data, _ = tiny_run
    layer = data["layer"]
    assert {(r["case"], r["dtype"]) for r in layer} == {
        (c, d)
        for c in ("64x16 NC", "4x6x6x8 NHWC", "4x8x6x6 NCHW")
        for d in ("float32", "bfloat16")
    }
    for r in layer:
        impls = {"jbn", "flax"} | ({"torch"} if HAS_TORCH and "torch_error" not in r else set())
        assert set(r["times_s"]) == impls
        for name in impls:
            for mode in gpu.LAYER_MODES:
                assert _positive(r["times_s"][name][mode]), (r["case"], name, mode)
        assert all(_positive(r["jbn_x_flax"][m]) for m in gpu.LAYER_MODES)
        assert ("jbn_x_torch" in r) == ("torch" in impls)
    assert all("torch_error" not in r for r in layer), [r.get("torch_error") for r in layer]


def test_machine_names_device_and_versions(tiny_run):
    data, md = tiny_run
    m = data["machine"]
    assert m["jax"] == jax.__version__ and m["backend"] == jax.default_backend()
    assert m["jax_device"] == jax.devices()[0].device_kind
    assert f"Device: **{m['jax_device']}**" in md and f"jax {m['jax']}" in md
    if HAS_TORCH:
        assert m["torch"] and m["torch_device"] and f"torch {m['torch']}" in md
    else:
        assert m["torch"] is None and "torch not installed" in md
        assert data["layer_note"] == "torch is not installed: no torch column"


def test_tiny_resnet_step_matches_flax_and_reports_memory(tiny_run):
    data, _ = tiny_run
    recs = {r["impl"]: r for r in data["model"]["records"]}
    assert set(recs) == {"jbn", "flax"} and data["model"]["out_of_memory_batches"] == []
    # stem + 2 bottlenecks of 3 + the 2 projections: 9 batch norms, whichever the class.
    assert recs["jbn"]["bn_layers"] == recs["flax"]["bn_layers"] == 9
    assert recs["jbn"]["params"] == recs["flax"]["params"]
    # Same weights and batch: the first loss is the same forward pass.
    assert recs["jbn"]["loss"] == pytest.approx(recs["flax"]["loss"], rel=1e-4)
    for r in recs.values():
        assert r["batch"] == 2 and _positive(r["images_per_s"]) and _positive(r["step_s"])
        assert r["memory"]["temp_bytes"] > 0
        assert r["temp_x_flax"] == pytest.approx(
            r["memory"]["temp_bytes"] / recs["flax"]["memory"]["temp_bytes"]
        )
    assert recs["flax"]["throughput_x_flax"] == 1.0


def _table(md: str, title_start: str) -> list[list[str]]:
    """The body rows of the Markdown table under the heading that starts with ``title_start``."""
    lines = md.split(f"## {title_start}", 1)[1].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = lines[first + 2 : end]  # below the header and the |---| row
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_markdown_tables_parse_to_numbers(tiny_run):
    data, md = tiny_run
    for title in ("One layer, forward + backward", "One layer, training forward"):
        rows = _table(md, title)
        assert len(rows) == len(data["layer"])
        for cells in rows:
            jbn_ms, flax_ms, torch_ms, x_flax, x_torch = cells[2:]
            assert float(jbn_ms) > 0 and float(flax_ms) > 0 and float(x_flax) > 0
            if HAS_TORCH:
                assert float(torch_ms) > 0 and float(x_torch) > 0
            else:
                assert torch_ms == x_torch == "n/a"
    rows = _table(md, "tiny ResNet train step")
    assert [r[0] for r in rows] == ["`jbn.BatchNorm`", "`flax.linen.BatchNorm`"]
    for cells in rows:
        assert int(cells[1]) == 2 and all(float(c) >= 0 for c in cells[2:])
    assert re.search(r"\| `flax.linen.BatchNorm` \| 2 \| [^|]+ \| [^|]+ \| 1\.00 \|", md)


def test_torch_column_renders(tiny_run):
    """The torch column as a GPU run fills it, whether or not torch is installed here."""
    data, _ = tiny_run
    rec = dict(data["layer"][0])
    rec["times_s"] = {**rec["times_s"], "torch": {"fwd_bwd": 0.00125, "fwd_train": 0.5}}
    rec["jbn_x_torch"] = {"fwd_bwd": 0.75, "fwd_train": 1.5}
    md = gpu.markdown({**data, "layer": [rec]})
    fwd_bwd, fwd = (
        _table(md, "One layer, forward + backward")[0],
        _table(md, "One layer, training")[0],
    )
    assert (fwd_bwd[4], fwd_bwd[6], fwd[4], fwd[6]) == ("1.25", "0.75", "500", "1.50")


def test_resnet50_is_the_reference_architecture():
    """25,557,032 parameters and 53 batch norms, as the ResNet-50 of He et al. (2016)."""
    from benchmarks.model import norm_factory

    model = gpu.resnet_class()(norm_factory("jbn")[0])
    image = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), image)
    assert sum(p.size for p in jax.tree_util.tree_leaves(shapes["params"])) == 25_557_032
    means = [
        path
        for path, _ in jax.tree_util.tree_leaves_with_path(shapes["batch_stats"])
        if path[-1].key == "mean"
    ]
    assert len(means) == 1 + 3 * 16 + 4  # the stem, 16 bottlenecks, 4 projections
    assert jax.eval_shape(model.apply, shapes, image).shape == (1, 1000)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "x", "--batch", "0"], "--batch must be a positive integer, got 0"),
        (["--out", "x", "--repeats", "-1"], "--repeats must be a positive integer, got -1"),
        (["--tiny"], "the following arguments are required: --out"),
    ],
)
def test_bad_arguments_say_which(argv, message, capsys):
    with pytest.raises(SystemExit):
        gpu.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_script_parses():
    done = subprocess.run(
        ["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr

"""Smoke test of the benchmarks: tiny shapes, one repeat, outputs present and sane.

No timing is asserted; only that every number exists, the residual accounting
adds up (jbn keeps x, or y with residual="output", plus per-feature vectors) and
the reports are written.
"""

import importlib.util
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import _timing, layer, run  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--tiny",
        "--shapes",
        "4x6x6x8",
        "--impls",
        "jbn",
        "jbn_out",
        "--models",
        "cnn",
        "--out",
        str(out),
    ]
    assert run.main(argv) == 0
    with open(out / "results.json") as f:
        data = json.load(f)
    return out, data


def test_writes_json_markdown_png(results):
    out, data = results
    md = (out / "results.md").read_text()
    assert "| shape | implementation |" in md
    assert "## Targets (jbn)" in md and "## Model train step" in md
    assert data["machine"]["cpu"] in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("cpu", "cores", "jax", "backend", "load_average_start"):
        assert key in data["machine"]


@pytest.mark.parametrize("missing", ["attribute", "oserror"])
def test_load_average_absent(monkeypatch, missing):
    # Windows has no os.getloadavg (AttributeError); elsewhere it may raise OSError.
    if missing == "attribute":
        monkeypatch.delattr(os, "getloadavg", raising=False)
    else:

        def unavailable():
            raise OSError("load average unobtainable")

        monkeypatch.setattr(os, "getloadavg", unavailable)
    assert _timing.load_average() is None
    info = _timing.machine_info()
    assert info["load_average_start"] is None
    assert "load average" not in _timing.describe_machine(info)


def test_layer_records_are_complete(results):
    _, data = results
    recs = data["layer"]
    got = {(r["dtype"], r["impl"]) for r in recs}
    assert got == {(d, i) for d in ("float32", "bfloat16") for i in ("jbn", "jbn_out", "flax")}
    for r in recs:
        assert r["case"] == "4x6x6x8 NHWC"
        for mode in layer.MODES:
            t = r["times"][mode]
            assert t["median_s"] > 0 and math.isfinite(t["median_s"]) and len(t["samples_s"]) == 1
            assert math.isfinite(r["x_4copies"][mode]) and math.isfinite(r["x_flax"][mode])
            mem = r["memory"][mode]
            assert mem["temp_bytes"] >= 0 and mem["output_bytes"] > 0
        assert r["memory"]["fwd_bwd"]["argument_bytes"] >= 2 * r["input_bytes"]  # x and dy
        # XLA's traffic estimate: forward + backward reads and writes at least ~8 arrays of x's size.
        assert r["fwd_bwd_bytes_accessed_over_input"] > 4
        # Every implementation keeps at least one array of x's size for the backward pass.
        assert r["residual_bytes"] >= r["input_bytes"]


def test_jbn_residuals(results):
    _, data = results
    for r in data["layer"]:
        slack = layer.expected_slack_bytes(r)
        if r["impl"] == "jbn":  # x plus per-feature vectors
            assert r["residual_bytes"] <= r["input_bytes"] + slack
            assert r["residual_full_size_leaves"] == 1
        if r["impl"] == "jbn_out":  # y plus per-feature vectors: nothing extra of x's size
            assert 0 <= r["residual_minus_output_bytes"] <= slack
            assert r["residual_full_size_leaves"] == 1
    targets = {(t["case"], t["dtype"]): t for t in data["targets"]}
    assert len(targets) == 2 and all(t["met_residual"] for t in targets.values())


def test_model_records(results):
    _, data = results
    recs = {r["impl"]: r for r in data["model"]}
    assert set(recs) == {"jbn", "jbn_out", "flax"}
    for r in recs.values():
        assert r["model"] == "cnn" and r["bn_layers"] == 3
        assert r["step"]["median_s"] > 0 and r["images_per_s"] > 0
        assert r["memory"]["temp_bytes"] > 0
        assert r["throughput_x_flax"] > 0
    assert recs["flax"]["throughput_x_flax"] == 1.0


def test_shape_filter_rejects_unknown_shapes():
    with pytest.raises(SystemExit, match="matches none"):
        layer.select_cases(layer.FULL_CASES, ["3x3"])
    assert [c.key for c in layer.select_cases(layer.FULL_CASES, ["4096,1024"])] == ["4096x1024"]


def test_grad_harness_records(results):
    out, data = results
    recs = data["grad"]
    got = {(r["dtype"], r["impl"]) for r in recs}
    assert got == {(d, i) for d in ("float32", "bfloat16") for i in ("jbn", "flax", "flax_slowvar")}
    for r in recs:
        for mode in ("grad", "fwd_train"):
            assert r[mode]["median_s"] > 0 and math.isfinite(r[mode]["x_flax"])
            assert len(r[mode]["x_flax_rounds"]) == data["config"]["grad_repeats"]
        if r["impl"] == "flax":
            assert r["grad"]["x_flax"] == r["fwd_train"]["x_flax"] == 1.0
    assert "## jax.grad through the layer" in (out / "results.md").read_text()
    assert {t["case"] for t in data["grad_targets"]} == {"4x6x6x8 NHWC"}

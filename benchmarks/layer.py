"""Layer-level benchmark: one batch-norm layer, forward and backward, time and memory.

Implementations (all compute in float32 and return ``x``'s dtype):

- ``jbn``: :func:`jbn.bn_forward` (custom_vjp, residual="input").
- ``jbn_out``: the same with ``residual="output"`` (keeps y instead of x).
- ``flax``: :class:`flax.linen.BatchNorm` with its defaults (``use_fast_variance=True``).
- ``flax_slowvar``: the same with ``use_fast_variance=False`` (two-pass variance).
- ``naive``: plain jnp batch norm, differentiated by JAX.
- ``torch``: ``torch.nn.functional.batch_norm`` (only when torch is importable;
  NHWC cases use torch's channels_last layout).
- ``copy``: ``x * c`` for a runtime scalar c: one read and one write of x, the
  memory-bandwidth yardstick. Forward + backward has to move about 8 arrays (x
  read 3 times, dy twice, y and dx written), i.e. 4 copies.

Modes: ``fwd_train`` (batch statistics and the running-average update),
``fwd_eval`` (running statistics), ``bwd`` (the jitted vjp function from
``jax.vjp``, run on saved residuals) and ``fwd_bwd`` (both in one jit).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._timing import TimingConfig, time_interleaved

EPSILON = 1e-5
MOMENTUM = 0.99  # flax's convention; torch's momentum is 1 - this
MODES = ("fwd_train", "fwd_eval", "bwd", "fwd_bwd")
JAX_IMPLS = ("jbn", "jbn_out", "flax", "flax_slowvar", "naive")
ALL_IMPLS = JAX_IMPLS + ("torch",)
DTYPES = {
    "float32": jnp.float32,
    "f32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One input shape and its feature axis."""

    shape: tuple[int, ...]
    axis: int
    layout: str  # "NC", "NHWC" or "NCHW"

    @property
    def key(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def name(self) -> str:
        return f"{self.key} {self.layout}"

    @property
    def channels(self) -> int:
        return self.shape[self.axis]


FULL_CASES = (
    Case((4096, 1024), -1, "NC"),
    Case((64, 32, 32, 64), -1, "NHWC"),
    Case((256, 28, 28, 32), -1, "NHWC"),
    Case((32, 56, 56, 256), -1, "NHWC"),
    Case((64, 64, 32, 32), 1, "NCHW"),  # the (64, 32, 32, 64) activations, channels first
)
TINY_CASES = (
    Case((64, 16), -1, "NC"),
    Case((4, 6, 6, 8), -1, "NHWC"),
    Case((4, 8, 6, 6), 1, "NCHW"),
)


def select_cases(cases: Sequence[Case], wanted: Sequence[str] | None) -> list[Case]:
    """Cases whose key ("4096x1024"), name or comma form ("4096,1024") is in ``wanted``."""
    if not wanted:
        return list(cases)
    norm = {
        w.strip().lower().replace(",", "x").replace("(", "").replace(")", "").replace(" ", "")
        for w in wanted
    }
    picked = [c for c in cases if c.key in norm or c.name.lower().replace(" ", "") in norm]
    if not picked:
        raise SystemExit(f"--shapes {list(wanted)} matches none of {[c.key for c in cases]}")
    return picked


# --------------------------------------------------------------------------- #
# JAX implementations: train(x, scale, bias, mean, var) -> (y, (new_mean, new_var)),
# evaluate(x, scale, bias, mean, var) -> y.
# --------------------------------------------------------------------------- #


def _reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a != axis % ndim)


def _bshape(shape, axis) -> tuple[int, ...]:
    return tuple(s if a == axis % len(shape) else 1 for a, s in enumerate(shape))


def jbn_impl(axis: int, residual: str = "input", module: Any = None):
    if module is None:
        import jbn as module

    def train(x, scale, bias, mean, var):
        y, st = module.bn_forward(
            {"scale": scale, "bias": bias},
            {"mean": mean, "var": var},
            x,
            True,
            axis=axis,
            momentum=MOMENTUM,
            epsilon=EPSILON,
            residual=residual,
        )
        return y, (st["mean"], st["var"])

    def evaluate(x, scale, bias, mean, var):
        y, _ = module.bn_forward(
            {"scale": scale, "bias": bias},
            {"mean": mean, "var": var},
            x,
            False,
            axis=axis,
            momentum=MOMENTUM,
            epsilon=EPSILON,
        )
        return y

    return train, evaluate


def flax_impl(axis: int, dtype, use_fast_variance: bool):
    import flax.linen as nn

    bn = nn.BatchNorm(
        axis=axis,
        momentum=MOMENTUM,
        epsilon=EPSILON,
        dtype=dtype,
        use_fast_variance=use_fast_variance,
    )

    def variables(scale, bias, mean, var):
        return {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": mean, "var": var}}

    def train(x, scale, bias, mean, var):
        y, upd = bn.apply(
            variables(scale, bias, mean, var), x, use_running_average=False, mutable=["batch_stats"]
        )
        return y, (upd["batch_stats"]["mean"], upd["batch_stats"]["var"])

    def evaluate(x, scale, bias, mean, var):
        return bn.apply(variables(scale, bias, mean, var), x, use_running_average=True)

    return train, evaluate


def naive_impl(axis: int):
    """Textbook batch norm in jnp (two-pass variance), for JAX's autodiff."""

    def train(x, scale, bias, mean, var):
        ra, bshape = _reduce_axes(x.ndim, axis), _bshape(x.shape, axis)
        xf = x.astype(jnp.float32)
        mu = jnp.mean(xf, axis=ra, keepdims=True)
        sigma2 = jnp.mean(jnp.square(xf - mu), axis=ra, keepdims=True)
        y = (xf - mu) * lax.rsqrt(sigma2 + EPSILON) * scale.reshape(bshape) + bias.reshape(bshape)
        mu, sigma2 = (
            lax.stop_gradient(mu).reshape(mean.shape),
            lax.stop_gradient(sigma2).reshape(var.shape),
        )
        new = (MOMENTUM * mean + (1 - MOMENTUM) * mu, MOMENTUM * var + (1 - MOMENTUM) * sigma2)
        return y.astype(x.dtype), new

    def evaluate(x, scale, bias, mean, var):
        bshape = _bshape(x.shape, axis)
        a = scale * lax.rsqrt(var + EPSILON)
        y = (x.astype(jnp.float32) - mean.reshape(bshape)) * a.reshape(bshape) + bias.reshape(
            bshape
        )
        return y.astype(x.dtype)

    return train, evaluate


def load_core(path: str, name: str):
    """Imports a copy of the jbn package directory under another name (for A/B runs).

    E.g. ``cp -r jbn /tmp/jbn_before`` before a change, then ``--compare-core
    /tmp/jbn_before``: the copy's modules import each other relatively, so the
    whole package runs under ``name`` beside the current ``jbn``.
    """
    init = os.path.join(path, "__init__.py")
    if not os.path.isfile(init):
        raise SystemExit(
            f"--compare-core: {path!r} is not a copy of the jbn package directory "
            "(no __init__.py in it)"
        )
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[os.path.abspath(path)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"--compare-core: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _nbytes_unique(leaves) -> int:
    seen, total = set(), 0
    for leaf in leaves:
        if hasattr(leaf, "nbytes") and id(leaf) not in seen:
            seen.add(id(leaf))
            total += int(leaf.nbytes)
    return total


def _memory(compiled) -> dict[str, int] | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    out = {
        "temp_bytes": int(stats.temp_size_in_bytes),
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
    }
    peak = getattr(stats, "peak_memory_in_bytes", None)
    if peak is not None:
        out["peak_bytes"] = int(peak)
    return out


def _cost(compiled) -> dict[str, float] | None:
    """XLA's own estimate of the bytes an executable moves and its flops (exact, not timed)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    return {
        "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
        "flops": float(cost.get("flops", float("nan"))),
    }


def _jax_entry(train: Callable, evaluate: Callable, x, scale, bias, mean, var, dy):
    """Jitted callables for the four modes, residual bytes and compiled memory statistics."""
    fwd_train = jax.jit(train)
    fwd_eval = jax.jit(evaluate)

    def with_state(x, scale, bias):
        return train(x, scale, bias, mean, var)

    # Residuals as the backward pass receives them: jax.vjp of the jitted forward.
    y, vjp_fn, _ = jax.vjp(jax.jit(with_state), x, scale, bias, has_aux=True)
    residual_leaves = jax.tree_util.tree_leaves(vjp_fn)
    bwd = jax.jit(lambda vjp_fn, dy: vjp_fn(dy))

    def fwd_bwd_fn(x, scale, bias, mean, var, dy):
        y, vjp, new_state = jax.vjp(
            lambda x, s, b: train(x, s, b, mean, var), x, scale, bias, has_aux=True
        )
        return y, new_state, vjp(dy)

    fwd_bwd = jax.jit(fwd_bwd_fn)
    args = (x, scale, bias, mean, var)
    # Compiled once, ahead of time: the same executables are timed and analysed.
    compiled = {
        "fwd_train": (fwd_train.lower(*args).compile(), args),
        "fwd_eval": (fwd_eval.lower(*args).compile(), args),
        "bwd": (bwd.lower(vjp_fn, dy).compile(), (vjp_fn, dy)),
        "fwd_bwd": (fwd_bwd.lower(*args, dy).compile(), (*args, dy)),
    }
    memory = {mode: _memory(exe) for mode, (exe, _) in compiled.items()}
    for mode, (exe, _) in compiled.items():
        if memory[mode] is not None:
            memory[mode]["cost"] = _cost(exe)
    thunks = {mode: functools.partial(exe, *a) for mode, (exe, a) in compiled.items()}
    residual = {
        "residual_bytes": _nbytes_unique(residual_leaves),
        "residual_leaves": len(residual_leaves),
        "residual_full_size_leaves": sum(
            1 for r in residual_leaves if getattr(r, "size", 0) == x.size
        ),
        "output_bytes": int(y.nbytes),
    }
    return thunks, residual, memory


# --------------------------------------------------------------------------- #
# torch.
# --------------------------------------------------------------------------- #


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def _torch_entry(case: Case, x_np: np.ndarray, dy_np: np.ndarray, dtype_name: str):
    import torch
    import torch.nn.functional as F

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]

    def to_torch(a):
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        if case.layout == "NHWC":  # NCHW view with channels_last strides, no copy
            t = t.permute(0, 3, 1, 2)
        return t.to(tdtype)

    x, dy = to_torch(x_np), to_torch(dy_np)
    c = case.channels
    weight = torch.ones(c, requires_grad=True)
    bias = torch.zeros(c, requires_grad=True)
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    xg = x.detach().requires_grad_(True)

    def forward(inp, training):
        return F.batch_norm(
            inp,
            running_mean,
            running_var,
            weight,
            bias,
            training=training,
            momentum=1 - MOMENTUM,
            eps=EPSILON,
        )

    def fwd_train():
        with torch.no_grad():
            return forward(x, True)

    def fwd_eval():
        with torch.no_grad():
            return forward(x, False)

    saved: dict[Any, int] = {}

    def pack(t):
        saved[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward(xg, True)

    def bwd():
        return torch.autograd.grad(y, (xg, weight, bias), dy, retain_graph=True)

    def fwd_bwd():
        out = forward(xg, True)
        return torch.autograd.grad(out, (xg, weight, bias), dy)

    thunks = {"fwd_train": fwd_train, "fwd_eval": fwd_eval, "bwd": bwd, "fwd_bwd": fwd_bwd}
    residual = {
        "residual_bytes": sum(saved.values()),
        "residual_leaves": len(saved),
        "residual_full_size_leaves": sum(1 for (_, n, _) in saved if n == x.numel()),
        "output_bytes": y.numel() * y.element_size(),
    }
    return thunks, residual, None


# --------------------------------------------------------------------------- #
# The benchmark.
# --------------------------------------------------------------------------- #


def run_case(
    case: Case,
    dtype_name: str,
    impls: Sequence[str],
    timing: TimingConfig,
    extra_cores: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """All implementations of one shape and dtype, timed interleaved. One record per implementation."""
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(0)
    x_np = rng.normal(0.5, 1.0, case.shape).astype(np.float32)
    dy_np = rng.normal(0.0, 1.0, case.shape).astype(np.float32)
    x, dy = jnp.asarray(x_np, dtype), jnp.asarray(dy_np, dtype)
    c = case.channels
    scale, bias = jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32)
    mean, var = jnp.zeros((c,), jnp.float32), jnp.ones((c,), jnp.float32)

    builders: dict[str, Callable[[], tuple]] = {}
    for name in impls:
        if name == "jbn":
            builders[name] = lambda: jbn_impl(case.axis)
        elif name == "jbn_out":
            builders[name] = lambda: jbn_impl(case.axis, residual="output")
        elif name == "flax":
            builders[name] = lambda: flax_impl(case.axis, dtype, True)
        elif name == "flax_slowvar":
            builders[name] = lambda: flax_impl(case.axis, dtype, False)
        elif name == "naive":
            builders[name] = lambda: naive_impl(case.axis)
    for label, module in (extra_cores or {}).items():
        builders[label] = functools.partial(jbn_impl, case.axis, "input", module)

    entries, residuals, memories = {}, {}, {}
    for name, build in builders.items():
        train, evaluate = build()
        entries[name], residuals[name], memories[name] = _jax_entry(
            train, evaluate, x, scale, bias, mean, var, dy
        )
    if "torch" in impls and torch_available():
        entries["torch"], residuals["torch"], memories["torch"] = _torch_entry(
            case, x_np, dy_np, dtype_name
        )

    one = jnp.asarray(1.0, dtype)
    copy = jax.jit(lambda x, c: x * c).lower(x, one).compile()
    fns = {"copy": functools.partial(copy, x, one)}
    for name, thunks in entries.items():
        for mode in MODES:
            fns[f"{name}:{mode}"] = thunks[mode]
    times = time_interleaved(fns, timing)

    copy_s = times["copy"]["median_s"]
    input_bytes = int(x.nbytes)
    records = []
    for name in entries:
        rec = {
            "case": case.name,
            "shape": list(case.shape),
            "axis": case.axis,
            "layout": case.layout,
            "dtype": dtype_name,
            "impl": name,
            "input_bytes": input_bytes,
            "copy_s": copy_s,
            "times": {mode: times[f"{name}:{mode}"] for mode in MODES},
            **residuals[name],
            "memory": memories[name],
        }
        rec["residual_over_input"] = rec["residual_bytes"] / input_bytes
        cost = (rec["memory"] or {}).get("fwd_bwd", {}).get("cost") if rec["memory"] else None
        # Forward + backward has to move at least 8 arrays of x's size (x 3 reads, dy 2, y and dx).
        rec["fwd_bwd_bytes_accessed_over_input"] = (
            None if not cost else cost["bytes_accessed"] / input_bytes
        )
        rec["residual_minus_output_bytes"] = rec["residual_bytes"] - rec["output_bytes"]
        rec["x_4copies"] = {mode: rec["times"][mode]["median_s"] / (4 * copy_s) for mode in MODES}
        records.append(rec)
    flax = next((r for r in records if r["impl"] == "flax"), None)
    for rec in records:
        if flax is not None:
            rec["x_flax"] = {
                mode: rec["times"][mode]["median_s"] / flax["times"][mode]["median_s"]
                for mode in MODES
            }
            fm, m = flax["memory"], rec["memory"]
            if fm and m:
                rec["temp_x_flax"] = {
                    mode: m[mode]["temp_bytes"] / max(fm[mode]["temp_bytes"], 1) for mode in MODES
                }
    jbn_rec = next((r for r in records if r["impl"] == "jbn"), None)
    if jbn_rec is not None:
        log(
            f"  {case.name:22s} {dtype_name:8s} copy {copy_s * 1e3:8.2f} ms | jbn fwd+bwd "
            f"{jbn_rec['times']['fwd_bwd']['median_s'] * 1e3:8.2f} ms = {jbn_rec['x_4copies']['fwd_bwd']:.2f}x 4 copies"
            + (f", {jbn_rec['x_flax']['fwd_bwd']:.2f}x flax" if "x_flax" in jbn_rec else "")
        )
    del entries, fns
    gc.collect()
    return records


def run(
    cases: Sequence[Case],
    dtypes: Sequence[str],
    impls: Sequence[str],
    timing: TimingConfig,
    extra_cores: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    records = []
    for dtype_name in dtypes:
        for case in cases:
            records.extend(run_case(case, dtype_name, impls, timing, extra_cores, log))
    return records


def expected_slack_bytes(rec: dict[str, Any]) -> int:
    """What a residual may hold beyond x (or y): a few per-feature float32 vectors."""
    return (
        16
        * 4
        * math.prod(s for a, s in enumerate(rec["shape"]) if a == rec["axis"] % len(rec["shape"]))
        + 1024
    )

"""A layer measured the way users call it: ``jax.grad`` through it, and its training forward.

For each shape and dtype: ``jax.jit(jax.grad(lambda x, γ, β: vdot(y, dy)))`` with
respect to x and both parameters (forward + backward in one executable, as in a
train step), and the jitted training forward alone (batch statistics and the
running-average update). jbn, flax (default) and flax (``use_fast_variance=False``)
are timed interleaved over rounds (11 by default), each sample at least 30 ms of
back-to-back calls; the figure is the median over rounds of the per-round ratio
to flax, which cancels most of a shared machine's slow spells.
"""

from __future__ import annotations

import functools
import gc
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._timing import TimingConfig, time_interleaved
from .layer import DTYPES, Case, flax_impl, jbn_impl

IMPLS = ("jbn", "flax", "flax_slowvar")
MODES = ("grad", "fwd_train")


def _builders(case: Case, dtype, extra_cores: dict[str, Any] | None):
    out = {
        "jbn": lambda: jbn_impl(case.axis)[0],
        "flax": lambda: flax_impl(case.axis, dtype, True)[0],
        "flax_slowvar": lambda: flax_impl(case.axis, dtype, False)[0],
    }
    for label, module in (extra_cores or {}).items():
        out[label] = functools.partial(lambda m: jbn_impl(case.axis, "input", m)[0], module)
    return out


def run_case(
    case: Case,
    dtype_name: str,
    timing: TimingConfig,
    extra_cores: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """jbn, flax and flax_slowvar (and copies of the core) on one shape and dtype."""
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(0.5, 1.0, case.shape).astype(np.float32), dtype)
    dy = jnp.asarray(rng.normal(0.0, 1.0, case.shape).astype(np.float32), dtype)
    c = case.channels
    scale, bias = jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32)
    mean, var = jnp.zeros((c,), jnp.float32), jnp.ones((c,), jnp.float32)

    fns = {}
    for name, build in _builders(case, dtype, extra_cores).items():
        train = build()

        def loss(x, scale, bias, dy, mean, var, train=train):
            y, _ = train(x, scale, bias, mean, var)
            return jnp.vdot(y, dy).astype(jnp.float32)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        grad_args = (x, scale, bias, dy, mean, var)
        fwd_args = (x, scale, bias, mean, var)
        fns[f"{name}:grad"] = functools.partial(grad.lower(*grad_args).compile(), *grad_args)
        fns[f"{name}:fwd_train"] = functools.partial(
            jax.jit(train).lower(*fwd_args).compile(), *fwd_args
        )
    times = time_interleaved(fns, timing)

    records = []
    names = list(dict.fromkeys(k.split(":")[0] for k in fns))
    for name in names:
        rec = {
            "case": case.name,
            "shape": list(case.shape),
            "layout": case.layout,
            "dtype": dtype_name,
            "impl": name,
        }
        for mode in MODES:
            mine, ref = times[f"{name}:{mode}"], times[f"flax:{mode}"]
            ratios = [a / b for a, b in zip(mine["samples_s"], ref["samples_s"], strict=True)]
            rec[mode] = {
                "median_s": mine["median_s"],
                "inner": mine["inner"],
                "x_flax": statistics.median(ratios),
                "x_flax_rounds": ratios,
            }
        records.append(rec)
    jbn = records[0]
    log(
        f"  {case.name:22s} {dtype_name:8s} grad {jbn['grad']['median_s'] * 1e3:8.2f} ms = "
        f"{jbn['grad']['x_flax']:.2f}x flax | fwd train {jbn['fwd_train']['median_s'] * 1e3:8.2f} ms"
        f" = {jbn['fwd_train']['x_flax']:.2f}x flax"
    )
    del fns
    gc.collect()
    return records


def run(
    cases: Sequence[Case],
    dtypes: Sequence[str],
    timing: TimingConfig,
    extra_cores: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    return [
        rec
        for dtype_name in dtypes
        for case in cases
        for rec in run_case(case, dtype_name, timing, extra_cores, log)
    ]

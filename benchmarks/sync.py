"""``python -m benchmarks sync``: what a synchronized batch norm sends, read from the compiled HLO.

For P fake CPU devices (each P in its own process, ``XLA_FLAGS`` set before JAX
starts), one batch norm layer (C = 256 features, 8 examples per device) in
``shard_map`` over a 'data' mesh axis, forward + backward (``jax.grad`` of a
linear loss with respect to the parameters and the input), for jbn and
``flax.linen.BatchNorm``. From the compiled HLO text: the collectives (all-reduce,
all-gather, reduce-scatter, collective-permute, all-to-all), how many of them sit
in a conditional branch (they run only when the branch is taken), and the bytes
each device receives, counted as the size of each collective's result (an
all-gather's result holds every device's piece; an all-reduce's is the sum it
delivers). Then each layer runs on x = 10⁴ + N(0, 1) from a fresh state: the
output's standard deviation (1 when exact), its largest difference from jbn on
one device holding the whole batch, and, for P <= 8, the time of a forward +
backward step (the fake devices share the machine's cores).

    python -m benchmarks sync                   # P = 8, 64, 256
    python -m benchmarks sync --devices 8 --no-time
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

FEATURES = 256
PER_DEVICE = 8
DEVICES = (8, 64, 256)

# Bytes per element of the HLO element types a collective may carry.
_ELEMENT_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_OPS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# `%name = <shape> op(` or `name = <shape> op-start(`; <shape> is `f32[2,8]{1,0}` or a tuple.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>\(.*?\)|\S+)\s+"
    r"(?P<op>" + "|".join(_OPS) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_BRANCHES = re.compile(
    r"(?:branch_computations=\{(?P<list>[^}]*)\}|(?:true|false)_computation=%?(?P<one>[\w.\-]+))"
)
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled HLO module."""

    op: str
    bytes: int  # the result's size: what each device receives
    conditional: bool  # inside a conditional's branch: runs only when that branch is taken


def shape_bytes(shape: str) -> int:
    """The size in bytes of an HLO shape, e.g. ``f32[2,8]{1,0}`` or ``(f32[8], f32[8])``."""
    total = 0
    for element, dims in _ARRAY.findall(shape):
        if element not in _ELEMENT_BYTES:
            raise ValueError(f"unknown HLO element type {element!r} in shape {shape!r}")
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * _ELEMENT_BYTES[element]
    return total


def collectives(hlo: str) -> list[Collective]:
    """Every collective of the HLO text ``hlo`` (``compiled.as_text()``), in order.

    A collective is marked ``conditional`` when its computation is reached from a
    conditional's branch (directly or through calls).
    """
    owner: dict[int, str] = {}
    calls: dict[str, set[str]] = {}
    branches: set[str] = set()
    current = ""
    lines = hlo.splitlines()
    for i, line in enumerate(lines):
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("{")[0]:
            current = header.group("name")
            calls.setdefault(current, set())
            continue
        owner[i] = current
        for match in _BRANCHES.finditer(line):
            names = match.group("list") or match.group("one") or ""
            branches.update(n.strip().lstrip("%") for n in names.split(",") if n.strip())
        calls.setdefault(current, set()).update(_CALLS.findall(line))
    reached, todo = set(), list(branches)
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(calls.get(name, ()))
    found = []
    for i, line in enumerate(lines):
        match = _INSTRUCTION.match(line)
        if match:
            found.append(
                Collective(
                    match.group("op"), shape_bytes(match.group("shape")), owner[i] in reached
                )
            )
    return found


def _layers(devices: Sequence[Any]) -> dict[str, Any]:
    """jbn's and flax's layer, forward + backward in shard_map: name -> (step, single device)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import jbn

    mesh = Mesh(np.array(devices), ("data",))
    params, state = jbn.bn_init(FEATURES)
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, axis_name="data")
    flax_vars = flax_bn.init(jax.random.key(0), jnp.zeros((2, FEATURES)))

    def jbn_layer(p, x, axis_name):
        return jbn.bn_forward(p, state, x, True, axis_name=axis_name)[0]

    def flax_layer(p, x, axis_name):
        del axis_name
        variables = {"params": p, "batch_stats": flax_vars["batch_stats"]}
        return flax_bn.apply(variables, x, mutable=["batch_stats"])[0]

    def step(layer, p):
        def per_device(p, x, w):
            def loss(p, x):
                y = layer(p, x, "data")
                return jnp.vdot(y, w), y

            (g, y) = jax.grad(loss, argnums=(0, 1), has_aux=True)(p, x)
            return g[0], g[1], y

        mapped = jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=(P(), P("data"), P("data")),
        )
        return jax.jit(mapped), p

    return {
        "jbn": (*step(jbn_layer, params), lambda x: jbn_layer(params, x, None)),
        "flax": (*step(flax_layer, flax_vars["params"]), None),
    }


def measure(devices: int, time_it: bool, pool: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """This process's row per implementation, on the first ``devices`` of ``pool``
    (default ``jax.devices()``)."""
    import jax
    import jax.numpy as jnp

    from ._timing import TimingConfig, time_interleaved

    pool = jax.devices() if pool is None else pool
    if len(pool) < devices:
        raise RuntimeError(f"{devices} devices needed, {len(pool)} given")
    kx, kw = jax.random.split(jax.random.key(0))
    shape = (devices * PER_DEVICE, FEATURES)
    x = 1e4 + jax.random.normal(kx, shape)
    w = jax.random.normal(kw, shape)
    rows, timed = [], {}
    for name, (fn, p, single) in _layers(list(pool)[:devices]).items():
        found = collectives(fn.lower(p, x, w).compile().as_text())
        _, _, y = fn(p, x, w)
        row: dict[str, Any] = {
            "devices": devices,
            "impl": name,
            "bytes": sum(c.bytes for c in found),
            "collectives": len(found),
            "conditional": sum(c.conditional for c in found),
            "ops": sorted(c.op for c in found),
            "std": float(jnp.std(y)),
        }
        if single is not None:
            row["vs_one_device"] = float(jnp.max(jnp.abs(y - jax.jit(single)(x))))
        timed[name] = lambda fn=fn, p=p: fn(p, x, w)
        rows.append(row)
    if time_it:
        times = time_interleaved(timed, TimingConfig(repeats=5, target_s=0.05))
        for row in rows:
            row["ms"] = 1e3 * times[row["impl"]]["median_s"]
    return rows


def run_in_subprocess(devices: int, time_it: bool) -> list[dict[str, Any]]:
    """:func:`measure` in a fresh Python with ``devices`` fake CPU devices."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "benchmarks.sync", "--worker", str(devices)]
    if not time_it:
        command.append("--no-time")
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the P={devices} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of the rows."""
    lines = [
        "| P | impl | received per device | per feature | collectives (in a conditional) "
        "| output std, x = 1e4 + N(0, 1), fresh state | max abs diff vs one device | fwd+bwd ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = f"{r['vs_one_device']:.1e}" if "vs_one_device" in r else ""
        ms = f"{r['ms']:.2f}" if "ms" in r else ""
        lines.append(
            f"| {r['devices']} | {r['impl']} | {r['bytes'] / 1024:,.1f} KiB "
            f"| {r['bytes'] / FEATURES:g} B | {r['collectives']} ({r['conditional']}) "
            f"| {r['std']:.6g} | {diff} | {ms} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks sync", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("--devices", type=int, nargs="+", default=list(DEVICES), metavar="P")
    p.add_argument("--no-time", action="store_true", help="skip the timing (bytes and std only)")
    p.add_argument("--worker", type=int, metavar="P", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(measure(args.worker, not args.no_time)))
        return 0
    rows = []
    for devices in args.devices:
        # P fake devices share this machine's cores: a time at large P says little.
        rows.extend(run_in_subprocess(devices, not args.no_time and devices <= 8))
    print(
        f"One batch norm, C = {FEATURES}, {PER_DEVICE} examples per device, forward + backward "
        "in shard_map over P fake CPU devices (float32):\n"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

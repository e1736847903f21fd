"""Timing discipline and the machine description shared by the layer and model benchmarks.

Every timed callable runs once to compile and warm up, is calibrated so that one
sample lasts at least ``target_s`` (a sample is ``inner`` back-to-back calls, each
waited for), and is then sampled ``repeats`` times, round-robin with the other
callables of the same group, so a slow spell of the machine hits them all alike.
The reported time is the median sample divided by ``inner``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    """How hard to time: samples per callable, minimum sample length, warm-up calls."""

    repeats: int = 7
    target_s: float = 0.05
    warmup: int = 1


def _block(out: Any) -> None:
    import jax

    jax.block_until_ready(out)


def _call(fn: Callable[[], Any]) -> None:
    _block(fn())


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], cfg: TimingConfig
) -> dict[str, dict[str, Any]]:
    """Times zero-argument callables, interleaved; returns per-label median and samples.

    Args:
      fns: label -> callable; each returns something ``jax.block_until_ready``
        accepts (JAX arrays, or anything else, which is returned as is).
      cfg: repeats, minimum sample length and warm-up.

    Returns:
      label -> ``{"median_s", "min_s", "samples_s", "inner"}``, times per call.
    """
    labels = list(fns)
    for label in labels:
        for _ in range(max(cfg.warmup, 1)):
            _call(fns[label])
    inner = {}
    for label in labels:
        t0 = time.perf_counter()
        _call(fns[label])
        dt = max(time.perf_counter() - t0, 1e-7)
        inner[label] = max(1, min(1000, math.ceil(cfg.target_s / dt)))
    samples: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(cfg.repeats):
        # Rotate the order each round: no callable always runs right after the same one.
        order = labels[r % len(labels) :] + labels[: r % len(labels)]
        for label in order:
            fn, k = fns[label], inner[label]
            t0 = time.perf_counter()
            for _ in range(k):
                _call(fn)
            samples[label].append((time.perf_counter() - t0) / k)
    return {
        label: {
            "median_s": statistics.median(s),
            "min_s": min(s),
            "samples_s": s,
            "inner": inner[label],
        }
        for label, s in samples.items()
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, or None where the OS has none (Windows)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # AttributeError: no os.getloadavg on Windows
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, library versions, backend."""
    import flax
    import jax
    import jaxlib
    import optax

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    devices = jax.devices()
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "device": devices[0].device_kind,
        "device_count": len(devices),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start": load_average(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def describe_machine(info: Mapping[str, Any]) -> str:
    """One line for the table header."""
    torch = ""
    if info.get("torch"):
        torch = f", torch {info['torch']} ({info.get('torch_threads')} threads, OMP_WAIT_POLICY={info.get('omp_wait_policy')})"
    load = info.get("load_average_start")
    load_end = info.get("load_average_end")
    loads = ""
    if load:
        loads = f"; 1-min load average {load[0]} at start" + (
            f", {load_end[0]} at end" if load_end else ""
        )
    return (
        f"{info['cpu']}, {info['usable_cores']} of {info['cores']} cores usable, "
        f"{info['memory_gib']} GiB; jax {info['jax']} (jaxlib {info['jaxlib']}), flax {info['flax']}, "
        f"backend {info['backend']} ({info['device']}, {info['device_count']} device(s)){torch}; "
        f"Python {info['python']}{loads}"
    )

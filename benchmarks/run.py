"""Command line of the benchmarks: ``python -m benchmarks [--quick | --tiny] [filters]``.

Writes ``results.json``, ``results.md`` and ``results.png`` into ``--out``
(default ``benchmarks/results/``, git-ignored). Run from the repository root.
``python -m benchmarks sync`` instead measures what a synchronized layer sends
over devices (benchmarks/sync.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Speed and memory of jbn's batch norm against flax.linen.BatchNorm, autodiff of a "
        "naive jnp batch norm and torch (when installed): one layer, and whole train steps.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer, shorter repeats (3 x 20 ms)")
    size.add_argument(
        "--tiny",
        action="store_true",
        help="tiny shapes and models, 1 repeat: a smoke test of the benchmark itself",
    )
    p.add_argument(
        "--only",
        choices=("layer", "grad", "model"),
        help="run only the layer benchmark, the jax.grad harness (benchmarks/grad.py) or the model "
        "benchmark",
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        metavar="SHAPE",
        help="layer shapes to run, e.g. 4096x1024 32x56x56x256 (default: all)",
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        metavar="DTYPE",
        default=["float32", "bfloat16"],
        help="float32 (f32) and/or bfloat16 (bf16); default both",
    )
    p.add_argument(
        "--impls",
        nargs="+",
        metavar="IMPL",
        help="layer implementations: jbn jbn_out flax flax_slowvar naive torch (default all; "
        "flax is always kept, as the reference of the ratios)",
    )
    p.add_argument("--models", nargs="+", metavar="MODEL", help="resnet and/or cnn (default both)")
    p.add_argument(
        "--repeats", type=int, help="timed samples per number (default 7; --quick 3; --tiny 1)"
    )
    p.add_argument(
        "--compare-core",
        nargs="+",
        default=[],
        metavar="DIR",
        help="also time copies of the jbn package directory (e.g. `cp -r jbn /tmp/jbn_before`), "
        "named jbn@DIR: as layer implementations, in the grad harness, and in the models through "
        "a thin local linen wrapper",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else list(argv)
    if given[:1] == ["sync"]:  # python -m benchmarks sync: see benchmarks/sync.py
        from . import sync

        return sync.main(given[1:])
    args = parse_args(argv)
    # torch's OpenMP threads busy-wait after each call by default, taking the cores
    # from the XLA calls timed next (and XLA's from torch's): tiny torch calls ran
    # ~300x slower, and JAX's about 2x. Passive waiting, set before torch loads
    # OpenMP, keeps the interleaved timings independent.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Imported here so that --help is instant.
    import jax

    from . import grad, layer, model, report
    from ._timing import TimingConfig, describe_machine, load_average, machine_info

    if args.tiny:
        timing = TimingConfig(repeats=1, target_s=0.0, warmup=1)
    elif args.quick:
        timing = TimingConfig(repeats=3, target_s=0.02, warmup=1)
    else:
        timing = TimingConfig()
    if args.repeats is not None:
        timing = TimingConfig(repeats=args.repeats, target_s=timing.target_s, warmup=timing.warmup)
    # The grad harness: 11 rounds of >= 30 ms samples unless told otherwise.
    grad_timing = TimingConfig(
        repeats=timing.repeats if (args.repeats or args.quick or args.tiny) else 11,
        target_s=timing.target_s if args.tiny else max(timing.target_s, 0.03),
        warmup=timing.warmup,
    )

    dtypes = []
    for d in args.dtypes:
        if d.lower() not in layer.DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {d!r}; use float32/f32 or bfloat16/bf16")
        name = str(jax.numpy.dtype(layer.DTYPES[d.lower()]))
        if name not in dtypes:
            dtypes.append(name)
    impls = list(layer.ALL_IMPLS) if not args.impls else list(dict.fromkeys(["flax", *args.impls]))
    unknown = sorted(set(impls) - set(layer.ALL_IMPLS))
    if unknown:
        raise SystemExit(f"--impls: unknown {unknown}; choose from {list(layer.ALL_IMPLS)}")
    if "torch" in impls and not layer.torch_available():
        impls.remove("torch")
    cases = layer.select_cases(layer.TINY_CASES if args.tiny else layer.FULL_CASES, args.shapes)
    all_models = model.TINY_MODELS if args.tiny else model.FULL_MODELS
    models = [m for m in all_models if not args.models or m.name in args.models]
    extra = {}
    for i, path in enumerate(args.compare_core):
        label = "jbn@" + os.path.basename(os.path.normpath(path))
        extra[label] = layer.load_core(path, f"_bench_core_{i}")

    info = machine_info()
    command = "python -m benchmarks" + (
        ""
        if argv is None and len(sys.argv) <= 1
        else " " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    )
    print(describe_machine(info), flush=True)
    results: dict[str, Any] = {
        "machine": info,
        "config": {
            "command": command,
            "repeats": timing.repeats,
            "target_s": timing.target_s,
            "warmup": timing.warmup,
            "grad_repeats": grad_timing.repeats,
            "grad_target_s": grad_timing.target_s,
            "dtypes": dtypes,
            "cases": [c.name for c in cases],
            "impls": impls + list(extra),
            "models": [m.name for m in models],
        },
    }
    t0 = time.perf_counter()
    if args.only in (None, "layer"):
        print(f"layer: {len(cases)} shapes x {dtypes}, {impls + list(extra)}", flush=True)
        results["layer"] = layer.run(
            cases, dtypes, impls, timing, extra, log=lambda s: print(s, flush=True)
        )
    if args.only in (None, "grad"):
        print(f"grad: {len(cases)} shapes x {dtypes}, {list(grad.IMPLS) + list(extra)}", flush=True)
        results["grad"] = grad.run(
            cases, dtypes, grad_timing, extra, log=lambda s: print(s, flush=True)
        )
    if args.only in (None, "model"):
        print(f"model: {[m.name for m in models]}", flush=True)
        results["model"] = model.run(models, timing, extra, log=lambda s: print(s, flush=True))
    info["load_average_end"] = load_average()
    results["elapsed_s"] = time.perf_counter() - t0
    if "layer" in results:
        results["targets"] = report.target_rows(results["layer"])
    if "grad" in results:
        results["grad_targets"] = report.grad_target_rows(results["grad"])

    os.makedirs(args.out, exist_ok=True)
    paths = {k: os.path.join(args.out, f"results.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1)
    md = report.markdown(results)
    with open(paths["md"], "w") as f:
        f.write(md)
    try:
        report.plot(results, paths["png"])
    except ImportError:  # matplotlib is in the demo extra, not a dependency
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        del paths["png"]
    print(md)
    print(f"wrote {', '.join(paths.values())} in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        # `python benchmarks/run.py`: make the repository root importable, then run as a package.
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from benchmarks.run import main as _main

        sys.exit(_main())
    sys.exit(main())

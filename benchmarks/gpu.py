"""GPU check: jbn, flax and torch's cuDNN batch norm on one layer, and a ResNet-50 train step.

``python -m benchmarks.gpu --out DIR [--tiny] [--batch N]`` (run from the repository root;
``benchmarks/gpu_check.sh`` runs it after the test suite and ``python -m benchmarks --quick``).

- Layer: the shapes of :mod:`benchmarks.layer`, float32 and bfloat16. jbn and
  flax (default) are timed the way users call a layer, as in :mod:`benchmarks.grad`:
  ``jax.jit(jax.grad(...))`` of ``vdot(y, dy)`` with respect to x, scale and bias
  (forward + backward) and the jitted training forward alone. Beside them,
  ``torch.nn.functional.batch_norm`` in training mode (cuDNN on CUDA; on the CPU
  when there is no GPU, so this runs anywhere): the forward under ``no_grad``, and
  the forward plus ``torch.autograd.grad`` with respect to x, weight and bias.
  torch sees NCHW tensors, in ``channels_last`` memory where the JAX shape is NHWC.
  Every call is waited for (``block_until_ready``, ``torch.cuda.synchronize``), and
  all callables of one shape are timed interleaved (:mod:`benchmarks._timing`).
- Model: a ResNet-50 (bottleneck blocks [3, 4, 6, 3], 224x224x3 images, 1000
  classes, NHWC, float32) train step with ``jbn.BatchNorm`` and with
  ``flax.linen.BatchNorm``, built, initialized and stepped as in
  :mod:`benchmarks.model`: images per second and the compiled step's temporary
  memory (``memory_analysis().temp_size_in_bytes``). The batch (``--batch``,
  default 256 on a GPU) is halved while it does not fit.

Writes ``gpu.json`` and ``gpu.md`` into ``--out``, after each part, so a run
stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

JAX_IMPLS = ("jbn", "flax")
LAYER_MODES = ("fwd_bwd", "fwd_train")
MODE_TITLES = {
    "fwd_bwd": "forward + backward (JAX: `jax.jit(jax.grad)` of vdot(y, dy); torch: autograd)",
    "fwd_train": "training forward",
}
RESNET50_STAGES = (3, 4, 6, 3)
GPU_BATCH = 256  # ResNet-50 float32 at 256 fills a good part of an 80 GB GPU
CPU_BATCH = 8


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu",
        description="jbn, flax and torch's cuDNN batch norm on one layer, and a ResNet-50 "
        "train step with jbn's and flax's batch norm; for a GPU, runs on the CPU too.",
    )
    p.add_argument("--out", required=True, help="output directory (gpu.json, gpu.md)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny shapes, a tiny ResNet at batch 2, 1 repeat: a smoke test of this script",
    )
    p.add_argument(
        "--batch",
        type=int,
        help=f"ResNet-50 batch (default {GPU_BATCH} on a GPU, {CPU_BATCH} on the CPU, 2 with "
        "--tiny); halved while it does not fit",
    )
    p.add_argument("--repeats", type=int, help="timed samples per number (default 5; --tiny 1)")
    p.add_argument("--only", choices=("layer", "model"), help="run only one part")
    p.add_argument("--no-torch", action="store_true", help="leave torch out of the layer part")
    args = p.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        p.error(f"--batch must be a positive integer, got {args.batch}")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be a positive integer, got {args.repeats}")
    return args


# --------------------------------------------------------------------------- #
# Versions and devices.
# --------------------------------------------------------------------------- #


def torch_info() -> dict[str, Any]:
    """torch's version and device; ``{"torch": None, ...}`` when it is not installed."""
    if importlib.util.find_spec("torch") is None:
        return {"torch": None, "torch_device": None, "torch_note": "torch is not installed"}
    import torch

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_cudnn": torch.backends.cudnn.version() if cuda else None,
        "torch_device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }


def device_info() -> dict[str, Any]:
    """jax's and torch's versions and devices, on top of :func:`machine_info`."""
    import jax

    from ._timing import machine_info

    info = machine_info()
    info["jax_device"] = jax.devices()[0].device_kind
    info["jax_default_matmul_precision"] = getattr(jax.config, "jax_default_matmul_precision", None)
    info.update(torch_info())
    return info


# --------------------------------------------------------------------------- #
# Layer.
# --------------------------------------------------------------------------- #


def _jax_thunks(case, dtype, x, dy) -> dict[str, Callable[[], Any]]:
    """``impl:mode`` -> a zero-argument call of a compiled executable."""
    import jax
    import jax.numpy as jnp

    from .layer import flax_impl, jbn_impl

    c = case.channels
    scale, bias = jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32)
    mean, var = jnp.zeros((c,), jnp.float32), jnp.ones((c,), jnp.float32)
    trains = {
        "jbn": jbn_impl(case.axis)[0],
        "flax": flax_impl(case.axis, dtype, True)[0],
    }
    thunks = {}
    for name, train in trains.items():

        def loss(x, scale, bias, dy, mean, var, train=train):
            y, _ = train(x, scale, bias, mean, var)
            return jnp.vdot(y, dy).astype(jnp.float32)

        grad_args = (x, scale, bias, dy, mean, var)
        fwd_args = (x, scale, bias, mean, var)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*grad_args).compile()
        fwd = jax.jit(train).lower(*fwd_args).compile()
        thunks[f"{name}:fwd_bwd"] = functools.partial(grad, *grad_args)
        thunks[f"{name}:fwd_train"] = functools.partial(fwd, *fwd_args)
    return thunks


def _torch_thunks(case, dtype_name: str, x_np, dy_np) -> dict[str, Callable[[], Any]]:
    """torch's ``F.batch_norm`` (training mode) on CUDA if there is one, else on the CPU."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]

    def to_torch(a):
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        if case.layout == "NHWC":  # an NCHW view whose memory is channels_last
            t = t.permute(0, 3, 1, 2)
        t = t.to(device=device, dtype=tdtype)
        if case.layout == "NHWC":
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    x, dy = to_torch(x_np), to_torch(dy_np)
    c = case.channels
    f32 = dict(device=device, dtype=torch.float32)
    weight = torch.ones(c, requires_grad=True, **f32)
    bias = torch.zeros(c, requires_grad=True, **f32)
    running_mean, running_var = torch.zeros(c, **f32), torch.ones(c, **f32)
    xg = x.detach().requires_grad_(True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward(inp):
        return F.batch_norm(
            inp, running_mean, running_var, weight, bias, training=True, momentum=0.01, eps=1e-5
        )

    def fwd_train():
        with torch.no_grad():
            forward(x)
        sync()

    def fwd_bwd():
        torch.autograd.grad(forward(xg), (xg, weight, bias), dy)
        sync()

    return {"torch:fwd_bwd": fwd_bwd, "torch:fwd_train": fwd_train}


def run_layer_case(case, dtype_name: str, timing, use_torch: bool, log=print) -> dict[str, Any]:
    """jbn, flax (and torch) on one shape and dtype, timed interleaved: one record."""
    import jax.numpy as jnp
    import numpy as np

    from ._timing import time_interleaved
    from .layer import DTYPES

    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(0)
    x_np = rng.normal(0.5, 1.0, case.shape).astype(np.float32)
    dy_np = rng.normal(0.0, 1.0, case.shape).astype(np.float32)
    x, dy = jnp.asarray(x_np, dtype), jnp.asarray(dy_np, dtype)
    fns = _jax_thunks(case, dtype, x, dy)
    rec: dict[str, Any] = {
        "case": case.name,
        "shape": list(case.shape),
        "layout": case.layout,
        "dtype": dtype_name,
    }
    if use_torch:
        try:
            torch_fns = _torch_thunks(case, dtype_name, x_np, dy_np)
            for fn in torch_fns.values():
                fn()  # fails here, not inside the timing loop
            fns.update(torch_fns)
        except Exception as e:  # e.g. a dtype this torch build's kernel lacks
            rec["torch_error"] = f"{type(e).__name__}: {e}"
    times = time_interleaved(fns, timing)
    impls = list(dict.fromkeys(k.split(":")[0] for k in fns))
    rec["times_s"] = {
        name: {mode: times[f"{name}:{mode}"]["median_s"] for mode in LAYER_MODES} for name in impls
    }
    rec["samples_s"] = {
        name: {mode: times[f"{name}:{mode}"]["samples_s"] for mode in LAYER_MODES} for name in impls
    }

    def ratio(a: str, b: str, mode: str) -> float:
        """Median over rounds of a's time / b's time (same round: same state of the machine)."""
        pairs = zip(rec["samples_s"][a][mode], rec["samples_s"][b][mode], strict=True)
        return statistics.median(p / q for p, q in pairs)

    rec["jbn_x_flax"] = {mode: ratio("jbn", "flax", mode) for mode in LAYER_MODES}
    if "torch" in impls:
        rec["jbn_x_torch"] = {mode: ratio("jbn", "torch", mode) for mode in LAYER_MODES}
    t = rec["times_s"]["jbn"]
    log(
        f"  {case.name:22s} {dtype_name:8s} jbn fwd+bwd {t['fwd_bwd'] * 1e3:8.3f} ms = "
        f"{rec['jbn_x_flax']['fwd_bwd']:.2f}x flax"
        + (f", {rec['jbn_x_torch']['fwd_bwd']:.2f}x torch" if "jbn_x_torch" in rec else "")
        + f" | fwd train {t['fwd_train'] * 1e3:8.3f} ms = {rec['jbn_x_flax']['fwd_train']:.2f}x flax"
        + (f", {rec['jbn_x_torch']['fwd_train']:.2f}x torch" if "jbn_x_torch" in rec else "")
    )
    del fns
    gc.collect()
    return rec


# --------------------------------------------------------------------------- #
# ResNet-50.
# --------------------------------------------------------------------------- #


def resnet_class():
    """The ResNet class (defined on first use, so ``--help`` does not import flax)."""
    import flax.linen as nn
    import jax.numpy as jnp

    class Bottleneck(nn.Module):
        """1x1 -> 3x3 (strided) -> 1x1 (4x wider), each conv followed by batch norm."""

        features: int
        strides: int
        norm: Callable[..., nn.Module]

        @nn.compact
        def __call__(self, x, train: bool):
            norm = functools.partial(self.norm, use_running_average=not train)
            s = (self.strides, self.strides)
            y = nn.relu(norm()(nn.Conv(self.features, (1, 1), use_bias=False)(x)))
            y = nn.relu(norm()(nn.Conv(self.features, (3, 3), s, use_bias=False)(y)))
            y = norm()(nn.Conv(4 * self.features, (1, 1), use_bias=False)(y))
            if x.shape != y.shape:
                x = norm()(nn.Conv(4 * self.features, (1, 1), s, use_bias=False)(x))
            return nn.relu(x + y)

    class ResNet(nn.Module):
        """ImageNet ResNet (He et al. 2016): 7x7/2 stem, 3x3/2 max pool, bottleneck stages."""

        norm: Callable[..., nn.Module]
        stages: Sequence[int] = RESNET50_STAGES
        width: int = 64
        classes: int = 1000

        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False)(x)
            x = nn.relu(self.norm(use_running_average=not train)(x))
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
            for i, blocks in enumerate(self.stages):
                for j in range(blocks):
                    strides = 2 if i > 0 and j == 0 else 1
                    x = Bottleneck(self.width * 2**i, strides, self.norm)(x, train)
            return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))

    return ResNet


def _out_of_memory(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _model_attempt(spec: dict[str, Any], batch: int, timing, log) -> list[dict[str, Any]]:
    """jbn's and flax's ResNet train step at one batch, timed interleaved."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from ._timing import time_interleaved
    from .layer import _memory
    from .model import init_variables, make_train_step, norm_factory

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(0.0, 1.0, (batch, *spec["image"])), jnp.float32)
    labels = jnp.asarray(rng.integers(0, spec["classes"], batch), jnp.int32)
    tx = optax.sgd(0.05, momentum=0.9)
    ResNet = resnet_class()
    fns, info = {}, {}
    for kind in JAX_IMPLS:
        norm, label = norm_factory(kind)
        model = ResNet(norm, stages=spec["stages"], width=spec["width"], classes=spec["classes"])
        params, batch_stats = init_variables(model, images)
        args = (params, batch_stats, tx.init(params), images, labels)
        t0 = time.perf_counter()
        compiled = make_train_step(model, tx).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        loss = float(compiled(*args)[3])
        info[kind] = {
            "norm": label,
            "params": sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params)),
            "bn_layers": sum(
                1
                for path, _ in jax.tree_util.tree_leaves_with_path(batch_stats)
                if getattr(path[-1], "key", None) == "mean"
            ),
            "memory": _memory(compiled),
            "compile_s": compile_s,
            "loss": loss,
        }
        log(f"  {kind}: compiled in {compile_s:.1f} s, first loss {loss:.3f}")
        fns[kind] = functools.partial(compiled, *args)
    times = time_interleaved(fns, timing)
    records = []
    for kind in fns:
        t = times[kind]
        records.append(
            {
                "model": spec["name"],
                "batch": batch,
                "image": list(spec["image"]),
                "classes": spec["classes"],
                "impl": kind,
                **info[kind],
                "step_s": t["median_s"],
                "step_samples_s": t["samples_s"],
                "images_per_s": batch / t["median_s"],
            }
        )
    flax = next(r for r in records if r["impl"] == "flax")
    for rec in records:
        rec["throughput_x_flax"] = rec["images_per_s"] / flax["images_per_s"]
        if rec["memory"] and flax["memory"]:
            rec["temp_x_flax"] = rec["memory"]["temp_bytes"] / max(flax["memory"]["temp_bytes"], 1)
    return records


def run_model(spec: dict[str, Any], batch: int, timing, log=print) -> dict[str, Any]:
    """The train step at ``batch``, halved (at most 3 times) while it runs out of memory."""
    failed = []
    for _ in range(4):
        try:
            records = _model_attempt(spec, batch, timing, log)
            return {"records": records, "out_of_memory_batches": failed}
        except Exception as e:
            if not _out_of_memory(e) or batch == 1:
                raise
            log(f"  batch {batch} does not fit ({str(e).splitlines()[0][:200]}); halving")
            failed.append(batch)
            batch //= 2
            gc.collect()
    return {"records": [], "out_of_memory_batches": failed}


# --------------------------------------------------------------------------- #
# Report.
# --------------------------------------------------------------------------- #


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1e3:.3g}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown(results: dict[str, Any]) -> str:
    """The Markdown report: device and versions, layer tables, the model table."""
    m = results["machine"]
    torch = (
        f"torch {m['torch']} on {m['torch_device']}"
        + (f" (CUDA {m['torch_cuda']}, cuDNN {m['torch_cudnn']})" if m.get("torch_cudnn") else "")
        if m.get("torch")
        else "torch not installed"
    )
    lines = [
        "# GPU check: jbn, flax and torch batch norm",
        "",
        f"Device: **{m['jax_device']}** (jax backend {m['backend']}, {m['device_count']} "
        f"device(s)); jax {m['jax']} (jaxlib {m['jaxlib']}), flax {m['flax']}, {torch}; "
        f"host {m['cpu']}, {m['usable_cores']} cores. Command: `{results['command']}`.",
    ]
    layer = results.get("layer") or []
    for mode in LAYER_MODES:
        if not layer:
            break
        lines += [
            "",
            f"## One layer, {MODE_TITLES[mode]}: ms",
            "",
            "| shape | dtype | jbn | flax | torch | jbn ×flax | jbn ×torch |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in layer:
            t = r["times_s"]
            lines.append(
                f"| {r['case']} | {r['dtype']} | {_ms(t['jbn'][mode])} | {_ms(t['flax'][mode])} "
                f"| {_ms(t['torch'][mode]) if 'torch' in t else 'n/a'} | {_x(r['jbn_x_flax'][mode])} "
                f"| {_x(r.get('jbn_x_torch', {}).get(mode))} |"
            )
        errors = [
            f"{r['case']} {r['dtype']}: {r['torch_error']}" for r in layer if "torch_error" in r
        ]
        if errors and mode == LAYER_MODES[-1]:
            lines += ["", "torch failed on: " + "; ".join(errors)]
    if results.get("layer_note"):
        lines += ["", results["layer_note"]]
    model = results.get("model")
    if model:
        recs = model["records"]
        if recs:
            r0 = recs[0]
            h, w, c = r0["image"]
            lines += [
                "",
                f"## {r0['model']} train step (float32, SGD with momentum, {r0['bn_layers']} batch "
                f"norms, {r0['params'] / 1e6:.3g} M parameters, {h}x{w}x{c} images, "
                f"{r0['classes']} classes)",
                "",
                "| batch norm | batch | step ms | images/s | throughput ×flax | temp MiB | temp ×flax "
                "| compile s |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in recs:
                temp = r["memory"]["temp_bytes"] / 2**20 if r["memory"] else None
                lines.append(
                    f"| `{r['norm']}` | {r['batch']} | {_ms(r['step_s'])} | {r['images_per_s']:.1f} "
                    f"| {_x(r['throughput_x_flax'])} | {'n/a' if temp is None else f'{temp:.4g}'} "
                    f"| {_x(r.get('temp_x_flax'))} | {r['compile_s']:.1f} |"
                )
        if model["out_of_memory_batches"]:
            lines += ["", f"Out of memory at batch {model['out_of_memory_batches']}."]
    if results.get("model_error"):
        lines += ["", f"Model part failed: {results['model_error']}"]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "gpu.md"), "w") as f:
        f.write(markdown(results))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # As in benchmarks/run.py: torch's busy-waiting OpenMP threads would slow the XLA calls.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import jax

    from ._timing import TimingConfig
    from .layer import FULL_CASES, TINY_CASES

    on_gpu = jax.default_backend() == "gpu"
    repeats = args.repeats or (1 if args.tiny else 5)
    layer_timing = TimingConfig(repeats=repeats, target_s=0.0 if args.tiny else 0.02)
    model_timing = TimingConfig(repeats=repeats, target_s=0.0 if args.tiny else 0.1)
    if args.tiny:
        spec = {"name": "tiny ResNet", "stages": (1, 1), "width": 4, "classes": 10}
        spec["image"], batch = (32, 32, 3), args.batch or 2
    else:
        spec = {"name": "ResNet-50", "stages": RESNET50_STAGES, "width": 64, "classes": 1000}
        spec["image"], batch = (224, 224, 3), args.batch or (GPU_BATCH if on_gpu else CPU_BATCH)
    use_torch = not args.no_torch and importlib.util.find_spec("torch") is not None

    results: dict[str, Any] = {
        "command": "python -m benchmarks.gpu "
        + shlex.join(sys.argv[1:] if argv is None else list(argv)),
        "machine": device_info(),
        "repeats": repeats,
    }
    m = results["machine"]
    print(
        f"jax {m['jax']} on {m['jax_device']} ({m['backend']}); "
        + (f"torch {m['torch']} on {m['torch_device']}" if m["torch"] else "torch not installed"),
        flush=True,
    )
    if not use_torch:
        results["layer_note"] = (
            "torch left out (--no-torch)"
            if args.no_torch
            else "torch is not installed: no torch column"
        )
    t0 = time.perf_counter()
    if args.only in (None, "layer"):
        print("layer:", flush=True)
        results["layer"] = []
        for dtype_name in ("float32", "bfloat16"):
            for case in TINY_CASES if args.tiny else FULL_CASES:
                rec = run_layer_case(case, dtype_name, layer_timing, use_torch)
                results["layer"].append(rec)
                write(results, args.out)
        if use_torch:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give the model its memory
    if args.only in (None, "model"):
        print(f"model: {spec['name']}, batch {batch}, image {spec['image']}", flush=True)
        try:
            results["model"] = run_model(spec, batch, model_timing)
        except Exception as e:  # keep the layer results, say what failed
            results["model_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            print(f"model part failed: {results['model_error']}", flush=True)
    results["elapsed_s"] = time.perf_counter() - t0
    write(results, args.out)
    print(markdown(results), flush=True)
    print(f"wrote {os.path.join(args.out, 'gpu.json')} and gpu.md in {results['elapsed_s']:.0f} s")
    return 1 if "model_error" in results else 0


if __name__ == "__main__":
    sys.exit(main())

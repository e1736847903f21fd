"""Markdown tables, target checks and the PNG figure from the benchmark's JSON results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._timing import describe_machine
from .layer import expected_slack_bytes

# Performance targets of the core.
TARGET_X_FLAX = 0.8  # layer fwd+bwd time / flax's
TARGET_FWD_X_FLAX = 1.0  # layer training-forward time / flax's
TARGET_X_4COPIES = 2.0  # layer fwd+bwd time / (4 copies of x)
TARGET_RESIDUAL = 1.0  # residual bytes / input bytes

IMPL_LABELS = {
    "jbn": "jbn",
    "jbn_out": "jbn residual=output",
    "flax": "flax",
    "flax_slowvar": "flax use_fast_variance=False",
    "naive": "naive jnp + autodiff",
    "torch": "torch F.batch_norm",
}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.3g}"


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def layer_table(records: Sequence[Mapping[str, Any]], dtype: str) -> str:
    rows = [r for r in records if r["dtype"] == dtype]
    if not rows:
        return ""
    head = (
        "| shape | implementation | fwd train ms | fwd eval ms | bwd ms | fwd+bwd ms "
        "| fwd+bwd ×flax | fwd+bwd ×4 copies | fwd+bwd XLA bytes ×input | residual MiB (×input) | fwd+bwd temp MiB |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines, last_case = [], None
    for r in rows:
        case = r["case"]
        shown = ""
        if case != last_case:
            shown = f"{case} (copy {_ms(r['copy_s'])} ms)"
            last_case = case
        t = r["times"]
        mem = r.get("memory") or {}
        temp = _mb(mem["fwd_bwd"]["temp_bytes"]) if mem.get("fwd_bwd") else "n/a"
        lines.append(
            f"| {shown} | {IMPL_LABELS.get(r['impl'], r['impl'])} | {_ms(t['fwd_train']['median_s'])} "
            f"| {_ms(t['fwd_eval']['median_s'])} | {_ms(t['bwd']['median_s'])} | {_ms(t['fwd_bwd']['median_s'])} "
            f"| {_x(r.get('x_flax', {}).get('fwd_bwd'))} | {_x(r['x_4copies']['fwd_bwd'])} "
            f"| {_x(r.get('fwd_bwd_bytes_accessed_over_input')) or 'n/a'} "
            f"| {_mb(r['residual_bytes'])} ({r['residual_over_input']:.2f}) | {temp} |"
        )
    return head + "\n".join(lines) + "\n"


def target_rows(records: Sequence[Mapping[str, Any]], impl: str = "jbn") -> list[dict[str, Any]]:
    """Per shape and dtype: where ``impl`` stands against each layer target."""
    out = []
    for r in records:
        if r["impl"] != impl:
            continue
        x_flax = r.get("x_flax", {}).get("fwd_bwd")
        x_copies = r["x_4copies"]["fwd_bwd"]
        resid = r["residual_over_input"]
        out.append(
            {
                "case": r["case"],
                "dtype": r["dtype"],
                "x_flax": x_flax,
                "x_4copies": x_copies,
                "residual_over_input": resid,
                "met_x_flax": None if x_flax is None else x_flax <= TARGET_X_FLAX,
                "met_x_4copies": x_copies <= TARGET_X_4COPIES,
                # Per-feature vectors (mean, 1/std, scale, bias) come on top of x: O(C), not O(x).
                "met_residual": r["residual_bytes"]
                <= TARGET_RESIDUAL * r["input_bytes"] + expected_slack_bytes(r),
            }
        )
    return out


def grad_target_rows(records: Sequence[Mapping[str, Any]], impl: str = "jbn") -> list[dict]:
    """Per shape and dtype: the grad harness's median per-round ratios to flax, against the targets."""
    return [
        {
            "case": r["case"],
            "dtype": r["dtype"],
            "grad_x_flax": r["grad"]["x_flax"],
            "fwd_train_x_flax": r["fwd_train"]["x_flax"],
            "met_grad": r["grad"]["x_flax"] <= TARGET_X_FLAX,
            "met_fwd_train": r["fwd_train"]["x_flax"] <= TARGET_FWD_X_FLAX,
        }
        for r in records
        if r["impl"] == impl
    ]


def grad_table(records: Sequence[Mapping[str, Any]]) -> str:
    """The grad harness: per shape, dtype and implementation, time and median ratio to flax."""
    if not records:
        return ""
    lines = [
        "| shape | dtype | implementation | grad ms | grad ×flax | fwd train ms | fwd train ×flax |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in records:
        g, f = r["grad"], r["fwd_train"]
        mark_g = mark_f = ""
        if r["impl"] == "jbn":
            mark_g = " " + _mark(g["x_flax"] <= TARGET_X_FLAX)
            mark_f = " " + _mark(f["x_flax"] <= TARGET_FWD_X_FLAX)
        lines.append(
            f"| {r['case']} | {r['dtype']} | {IMPL_LABELS.get(r['impl'], r['impl'])} "
            f"| {_ms(g['median_s'])} | {_x(g['x_flax'])}{mark_g} "
            f"| {_ms(f['median_s'])} | {_x(f['x_flax'])}{mark_f} |"
        )
    return "\n".join(lines) + "\n"


def _mark(ok: bool | None) -> str:
    return "" if ok is None else ("met" if ok else "**missed**")


def targets_table(records: Sequence[Mapping[str, Any]], impl: str = "jbn") -> str:
    rows = target_rows(records, impl)
    if not rows:
        return ""
    lines = [
        f"| shape | dtype | fwd+bwd ×flax (≤ {TARGET_X_FLAX}) | fwd+bwd ×4 copies (≤ {TARGET_X_4COPIES}) "
        f"| residual ×input (≤ {TARGET_RESIDUAL} + per-feature vectors) |",
        "|---|---|---:|---:|---:|",
    ]
    for t in rows:
        lines.append(
            f"| {t['case']} | {t['dtype']} | {_x(t['x_flax'])} {_mark(t['met_x_flax'])} "
            f"| {_x(t['x_4copies'])} {_mark(t['met_x_4copies'])} "
            f"| {t['residual_over_input']:.3f} {_mark(t['met_residual'])} |"
        )
    return "\n".join(lines) + "\n"


def model_table(records: Sequence[Mapping[str, Any]]) -> str:
    if not records:
        return ""
    lines = [
        "| model | BN layers | batch | batch norm | step ms | images/s | throughput ×flax | temp MiB | temp ×flax |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        mem = r.get("memory") or {}
        lines.append(
            f"| {r['model']} | {r['bn_layers']} | {r['batch']} | {r['norm']} | {_ms(r['step']['median_s'])} "
            f"| {r['images_per_s']:.0f} | {r['throughput_x_flax']:.3f} "
            f"| {_mb(mem['temp_bytes']) if mem else 'n/a'} "
            f"| {'' if r.get('temp_x_flax') is None else format(r['temp_x_flax'], '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def markdown(results: Mapping[str, Any]) -> str:
    machine = results["machine"]
    cfg = results["config"]
    parts = [
        "# jbn benchmarks\n",
        f"Machine: {describe_machine(machine)}.\n",
        f"Command: `{cfg['command']}`; {cfg['repeats']} interleaved repeats per number, median, "
        f"each repeat at least {cfg['target_s'] * 1e3:.0f} ms of back-to-back calls.\n",
        "Times in ms. ×flax: time / flax.linen.BatchNorm's (default settings). ×4 copies: time / 4 × "
        "the time of `x * c` (one read and one write of x), the memory-bandwidth bound of "
        "forward + backward, which moves about 8 arrays. Residual: bytes `jax.vjp` keeps for the "
        "backward pass (torch: saved tensors), ×input bytes. XLA bytes: `compile().cost_analysis()['bytes "
        "accessed']` of the jitted forward + backward, ×input bytes (at least 8: x read 3 times, dy twice, "
        "y and dx written; exact, not timed). Temp: XLA's "
        "`compile().memory_analysis().temp_size_in_bytes` of the jitted forward + backward.\n",
    ]
    layer = results.get("layer") or []
    dtypes = list(dict.fromkeys(r["dtype"] for r in layer))
    if layer:
        parts.append("## Targets (jbn)\n")
        parts.append(targets_table(layer))
        if any(r["impl"] == "jbn_out" for r in layer):
            lines = [
                '| shape | dtype | residual − output bytes (residual="output") |',
                "|---|---|---:|",
            ]
            for r in layer:
                if r["impl"] == "jbn_out":
                    lines.append(
                        f"| {r['case']} | {r['dtype']} | {r['residual_minus_output_bytes']} |"
                    )
            parts.append("\n".join(lines) + "\n")
    for dtype in dtypes:
        parts.append(f"## Layer, {dtype}\n")
        parts.append(layer_table(layer, dtype))
    grad = results.get("grad") or []
    if grad:
        parts.append("## jax.grad through the layer, and the training forward\n")
        parts.append(
            f"`jax.jit(jax.grad(vdot(y, dy)))` with respect to x, scale and bias, and the jitted "
            f"training forward alone; {cfg.get('grad_repeats')} interleaved rounds of samples of "
            f"at least {cfg.get('grad_target_s', 0) * 1e3:.0f} ms; ×flax is the median over rounds "
            f"of the per-round ratio (targets: grad ≤ {TARGET_X_FLAX}, forward ≤ "
            f"{TARGET_FWD_X_FLAX}).\n"
        )
        parts.append(grad_table(grad))
    models = results.get("model") or []
    if models:
        parts.append("## Model train step (float32)\n")
        parts.append(model_table(models))
    return "\n".join(parts)


def plot(results: Mapping[str, Any], path: str) -> None:
    """fwd+bwd time in units of 4 copies, per shape and implementation, one panel per dtype; model panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layer = results.get("layer") or []
    models = results.get("model") or []
    dtypes = list(dict.fromkeys(r["dtype"] for r in layer))
    panels = len(dtypes) + (1 if models else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(6.5 * max(panels, 1), 4.8), squeeze=False)
    axes = axes[0]
    for ax, dtype in zip(axes, dtypes, strict=False):
        rows = [r for r in layer if r["dtype"] == dtype]
        cases = list(dict.fromkeys(r["case"] for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            vals = []
            for c in cases:
                r = next((r for r in rows if r["case"] == c and r["impl"] == impl), None)
                vals.append(np.nan if r is None else r["x_4copies"]["fwd_bwd"])
            ax.bar(
                np.arange(len(cases)) + (i - (len(impls) - 1) / 2) * width,
                vals,
                width,
                label=IMPL_LABELS.get(impl, impl),
            )
        ax.axhline(
            TARGET_X_4COPIES, color="k", ls="--", lw=1, label=f"target ({TARGET_X_4COPIES}× bound)"
        )
        ax.axhline(1.0, color="gray", ls=":", lw=1, label="bandwidth bound")
        ax.set_xticks(np.arange(len(cases)))
        ax.set_xticklabels([c.replace(" ", "\n") for c in cases], fontsize=8)
        ax.set_ylabel("forward + backward time / (4 × copy of x)")
        ax.set_title(f"layer, {dtype}")
        ax.legend(fontsize=7)
    if models:
        ax = axes[len(dtypes)]
        names = list(dict.fromkeys(r["model"] for r in models))
        bars = [
            (impl, key, f"{IMPL_LABELS.get(impl, impl)}: {label}")
            for impl in ("jbn", "jbn_out")
            for key, label in (
                ("throughput_x_flax", "throughput ×flax"),
                ("temp_x_flax", "temp memory ×flax"),
            )
            if any(r["impl"] == impl for r in models)
        ]
        width = 0.8 / max(len(bars), 1)
        for i, (impl, key, label) in enumerate(bars):
            vals = [
                next(
                    (r.get(key, np.nan) for r in models if r["model"] == n and r["impl"] == impl),
                    np.nan,
                )
                for n in names
            ]
            ax.bar(
                np.arange(len(names)) + (i - (len(bars) - 1) / 2) * width, vals, width, label=label
            )
        ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.set_xticks(np.arange(len(names)))
        ax.set_xticklabels(names)
        ax.set_title("model train step, jbn / flax")
        ax.legend(fontsize=8)
    fig.suptitle(describe_machine(results["machine"])[:150], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

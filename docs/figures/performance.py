"""Draws docs/figures/performance.png from the tables in docs/performance.md.

The figure shows the measured numbers the page prints, so it is drawn from the page itself:
jbn's time as a fraction of flax's for each shape, from the "(×flax)" figures of the forward +
backward tables and from the grad harness table. Run by `make figures`:

    python docs/figures/performance.py [docs/performance.md] [docs/figures/performance.png]
"""

from __future__ import annotations

import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent


def tables(text: str) -> dict[str, list[list[str]]]:
    """Each Markdown table under a heading, by heading: rows of cells (header row first)."""
    found: dict[str, list[list[str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("|") and not re.fullmatch(r"[|\-: ]+", line):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            found.setdefault(heading, []).append(cells)
    return found


def ratio(cell: str) -> float:
    """'41.3 (0.96)' -> 0.96; '0.85' -> 0.85."""
    match = re.search(r"\(([\d.]+)\)", cell)
    return float(match.group(1) if match else cell)


def ratios(page: str) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    """Shapes, and per dtype the jbn ×flax series: forward + backward, jax.grad, forward."""
    found = tables(page)
    layer = {
        dtype: found[f"Forward + backward, {dtype}: ms (×flax)"]
        for dtype in ("float32", "bfloat16")
    }
    grad = found["The grad harness"]
    shapes = [row[0] for row in layer["float32"][1:]]
    out: dict[str, dict[str, list[float]]] = {}
    for dtype, short in (("float32", "f32"), ("bfloat16", "bf16")):
        header = grad[0]
        column = {
            name: header.index(f"{short} {name} ×flax")
            for name in ("`jax.grad`", "training forward")
        }
        out[dtype] = {
            "forward + backward (layer harness)": [ratio(r[1]) for r in layer[dtype][1:]],
            "jax.jit(jax.grad(...)) (grad harness)": [
                ratio(r[column["`jax.grad`"]]) for r in grad[1:]
            ],
            "training forward (grad harness)": [
                ratio(r[column["training forward"]]) for r in grad[1:]
            ],
        }
    return shapes, out


def plot(page: pathlib.Path, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shapes, series = ratios(page.read_text())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    top = max(max(v) for s in series.values() for v in s.values())
    for ax, (dtype, bars) in zip(axes, series.items(), strict=True):
        width = 0.8 / len(bars)
        for j, (name, values) in enumerate(bars.items()):
            ax.bar(np.arange(len(shapes)) + (j - 1) * width, values, width, label=name)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_xticks(np.arange(len(shapes)), [s.replace(" ", "\n") for s in shapes], fontsize=8)
        ax.set(title=dtype, ylim=(0, 1.15 * top))
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("jbn time / flax time (below 1: faster)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=3, fontsize=9, frameon=False)
    fig.suptitle("One batch-norm layer, jbn against flax.linen.BatchNorm (CPU)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    page = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent / "performance.md"
    out = pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else HERE / "performance.png"
    plot(page, out)
    print(f"wrote {out}")

"""The demo's figures read on their own: integer epoch ticks, legends that cover no data."""

import numpy as np
import pytest

from mnist_demo import plots


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions make, drawn, instead of written to PNG files."""
    figures = []

    def keep(fig, path):
        fig.canvas.draw()
        figures.append(fig)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def history(epochs=3):
    return [
        {
            "epoch": e,
            "train_loss": 1.0 / e,
            "test_loss": 1.2 / e,
            "train_accuracy": 0.9 + 0.02 * e,
            "test_accuracy": 0.88 + 0.02 * e,
        }
        for e in range(1, epochs + 1)
    ]


def visible_xticks(ax):
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticks() if low <= t <= high]


def covered_points(ax):
    """How many data points of the figure's lines and bars lie under ``ax``'s legend."""
    box = ax.get_legend().get_window_extent()
    count = 0
    for other in ax.figure.axes:  # a legend beside its axes may reach into the next panel
        for line in other.get_lines():
            xy = other.transData.transform(np.column_stack(line.get_data()))
            count += sum(box.contains(x, y) for x, y in xy)
        count += sum(box.overlaps(bar.get_window_extent()) for bar in other.patches)
    return count


def test_epoch_ticks_are_integers(drawn, tmp_path):
    plots.plot_curves(tmp_path / "curves.png", history(), "curves")
    plots.plot_compare(tmp_path / "compare.png", {"jbn": history(), "none": history()}, "compare")
    axes = [ax for fig in drawn for ax in fig.axes]
    assert len(axes) == 4
    for ax in axes:
        ticks = visible_xticks(ax)
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_domain_shift_legend_covers_no_bar(drawn, tmp_path):
    records = [
        {"domain": d, "method": m, "batches": b, "test_accuracy": 0.99}
        for d in ("clean", "noise", "inverted")
        for m, b in (
            ("stale", None),
            ("recalibrated", 1),
            ("recalibrated", 10),
            ("bn_finetuned", None),
        )
    ]
    plots.plot_domain_shift(tmp_path / "domain_shift.png", records)
    (ax,) = drawn[0].axes
    assert covered_points(ax) == 0
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "recalibrated (1 batch)" in labels and "recalibrated (10 batches)" in labels


def test_domain_shift_with_a_prior_grid_legends_cover_no_data(drawn, tmp_path):
    # The second panel (accuracy against the prior N) with curves that reach its top corners.
    records = [
        {"domain": d, "method": "stale", "batches": None, "test_accuracy": 0.99}
        for d in ("clean", "noise")
    ]
    curves = {  # the measured curves (mean over the shifted domains): no corner is free
        ("prior", 1): (0.097, 0.48, 0.264, 0.235, 0.225, 0.22),
        ("prior", 8): (0.661, 0.678, 0.683, 0.517, 0.275, 0.235),
        ("prior", 128): (0.687, 0.688, 0.692, 0.7, 0.7, 0.536),
        ("prior_linear", 1): (0.097, 0.436, 0.253, 0.234, 0.224, 0.22),
        ("prior_linear", 8): (0.661, 0.668, 0.668, 0.464, 0.262, 0.233),
        ("prior_linear", 128): (0.687, 0.687, 0.688, 0.689, 0.682, 0.485),
    }
    for (method, size), accuracies in curves.items():
        for n, accuracy in zip((0, 1, 4, 16, 64, 256), accuracies, strict=True):
            for d in ("clean", "noise"):
                records.append(
                    {
                        "domain": d,
                        "method": method,
                        "batches": None,
                        "prior": n,
                        "batch_size": size,
                        "test_accuracy": accuracy,
                    }
                )
    plots.plot_domain_shift(tmp_path / "domain_shift.png", records)
    axes = drawn[0].axes
    assert len(axes) == 2
    for ax in axes:
        assert covered_points(ax) == 0, ax.get_title()


def test_fig1_legends_cover_no_curve(drawn, tmp_path):
    steps = list(range(0, 5001, 500))
    rising = np.linspace(-1.0, 2.4, len(steps))
    results = {
        "steps": steps,
        "unit": 0,
        "learning_rate": 0.5,
        "batch_size": 60,
        "baseline": {
            "accuracy": list(np.linspace(0.1, 0.96, len(steps))),
            "percentiles": [[-4.2 + r / 10, -1.6, -0.5] for r in rising],
        },
        "batchnorm": {
            "accuracy": list(np.linspace(0.8, 0.98, len(steps))),
            "percentiles": [[-r, 0.0, r] for r in rising],  # the top curve reaches the maximum
        },
    }
    plots.plot_fig1(tmp_path / "fig1.png", results)
    for ax in drawn[0].axes:
        assert covered_points(ax) == 0, ax.get_title()


def test_streams_figure_legend_covers_no_bar(drawn, tmp_path):
    records = [
        {"method": m, "order": o, "batch_size": s, "domain": d, "test_accuracy": a}
        for m, a in (("stale", 0.2), ("stream", 0.6), ("tent_stream", 0.5))
        for o in ("iid", "sorted")
        for s in (1, 8, 64)
        for d in ("clean", "noise", "inverted")
    ]
    plots.plot_streams(tmp_path / "domain_shift_streams.png", records)
    axes = drawn[0].axes
    assert len(axes) == 4  # (shifted, clean) x (iid, sorted)
    assert covered_points(axes[1]) == 0  # the legend, beside the top right panel, on no bar
    for ax in axes:
        heights = sorted({round(p.get_height(), 6) for p in ax.patches})
        assert heights == [20.0, 50.0, 60.0]  # the mean accuracy of each method, in percent
    labels = [t.get_text() for t in axes[1].get_legend().get_texts()]
    assert labels == ["stale", "stream", "tent_stream"]


def test_streams_figure_with_the_continual_and_mixed_orders(drawn, tmp_path):
    single = [
        {"method": m, "order": o, "batch_size": s, "domain": d, "test_accuracy": 0.5}
        for m in ("stale", "stream", "tent_stream")
        for o in ("iid", "sorted")
        for s in (1, 8)
        for d in ("clean", "noise")
    ]
    # Continual: clean 90 %, noise 30 %, clean again 70 % (stale: 80 %); mixed: 60 % and 40 %.
    continual = [
        {
            "method": m,
            "order": "continual",
            "batch_size": s,
            "segment": i,
            "domain": d,
            "test_accuracy": a if m == "stream" or i < 2 else 0.8,
        }  # fmt: skip
        for m in ("stale", "stream")
        for s in (1, 8)
        for i, (d, a) in enumerate((("clean", 0.9), ("noise", 0.3), ("clean", 0.7)))
    ]
    mixed = [
        {"method": m, "order": "mixed", "batch_size": s, "domain": d, "test_accuracy": a}
        for m in ("stale", "stream")
        for s in (1, 8)
        for d, a in (("clean", 0.6), ("noise", 0.4))
    ]
    plots.plot_streams(tmp_path / "domain_shift_streams.png", single + continual + mixed)
    axes = drawn[0].axes
    assert len(axes) == 8  # (shifted, clean) x (iid, sorted, continual, mixed)
    assert covered_points(axes[3]) == 0
    titles = [ax.get_title() for ax in axes]
    assert "continual stream: clean again" in titles and "mixed stream: clean" in titles

    def heights(title):
        ax = axes[titles.index(title)]
        return sorted({round(p.get_height(), 6) for p in ax.patches if np.isfinite(p.get_height())})

    assert heights("continual stream: shifted domains (mean)") == [30.0]
    assert heights("continual stream: clean again") == [70.0, 80.0]  # the last segment only
    assert heights("mixed stream: clean") == [60.0]
    assert heights("mixed stream: shifted domains (mean)") == [40.0]

"""Plots: FFN sparsity per layer and the quality / sparsity trade-off (matplotlib, no display needed)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path


def new_figure(width: float = 7.0, height: float = 4.0):
    """A figure drawn by the Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str | os.PathLike) -> str:
    """Lay out and write ``figure`` (format from the suffix). PNGs are written with a 256-colour
    palette: line plots on white lose nothing visible, and the files are about a third the size
    (results folders keep many of them)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    if out.suffix.lower() != ".png":
        figure.savefig(out)
        return str(out)
    from PIL import Image  # matplotlib's own dependency

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return str(out)


def plot_layer_sparsity(
    per_layer: Sequence[float] | Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str = "FFN sparsity per layer",
) -> str:
    """Bar chart of the FFN sparsity (fraction skipped) of each layer; several runs as a dict
    ``{label: per_layer}`` are drawn as lines. Returns the written path (format from its suffix)."""
    series = dict(per_layer) if isinstance(per_layer, Mapping) else {"": list(per_layer)}
    if not series or any(len(v) == 0 for v in series.values()):
        raise ValueError("plot_layer_sparsity needs at least one value per layer.")
    figure = new_figure()
    axes = figure.add_subplot(1, 1, 1)
    if len(series) == 1:
        values = next(iter(series.values()))
        axes.bar(range(len(values)), [100 * v for v in values], color="tab:blue")
        mean = 100 * sum(values) / len(values)
        axes.axhline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.1f}%")
    else:
        for label, values in series.items():
            axes.plot(range(len(values)), [100 * v for v in values], marker="o", label=label)
    axes.set_xlabel("layer")
    axes.set_ylabel("FFN sparsity (%)")
    axes.set_ylim(0, 100)
    axes.set_title(title)
    axes.legend()
    return save_figure(figure, path)


def plot_tradeoff(
    points: Sequence[Mapping],
    path: str | os.PathLike,
    quality_name: str = "quality",
    title: str = "Quality vs FFN sparsity",
    higher_is_better: bool = True,
) -> str:
    """Scatter/line plot of quality against FFN sparsity.

    ``points``: dicts with ``sparsity`` (0-1) and ``quality``, optional ``series`` (points of one
    series are joined, sorted by sparsity) and ``label`` (written next to the point).
    """
    if not points:
        raise ValueError("plot_tradeoff needs at least one point.")
    for i, point in enumerate(points):
        if "sparsity" not in point or "quality" not in point:
            raise ValueError(f"point {i} lacks 'sparsity' or 'quality': {dict(point)}")
    groups: dict[str, list[Mapping]] = {}
    for point in points:
        groups.setdefault(str(point.get("series", "")), []).append(point)
    figure = new_figure()
    axes = figure.add_subplot(1, 1, 1)
    for name, members in groups.items():
        members = sorted(members, key=lambda p: p["sparsity"])
        xs = [100 * p["sparsity"] for p in members]
        ys = [p["quality"] for p in members]
        axes.plot(xs, ys, marker="o", label=name or None)
        for p, x, y in zip(members, xs, ys):
            if p.get("label"):
                axes.annotate(str(p["label"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("FFN sparsity (%)")
    axes.set_ylabel(f"{quality_name} ({'higher' if higher_is_better else 'lower'} is better)")
    axes.set_title(title)
    if any(groups):
        axes.legend()
    axes.grid(alpha=0.3)
    return save_figure(figure, path)

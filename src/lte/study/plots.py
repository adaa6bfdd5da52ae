"""A study's plots: quality against sparsity or GFLOPs, eta against sparsity, per-layer profiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LTEError
from ..evaluation.plots import new_figure, save_figure
from .report import finite, reference_methods


def _style(method: str, index: int) -> dict[str, Any]:
    """Line style per method: LTE bold, its ablations dashed, up to 20 distinct colours."""
    from matplotlib import colormaps

    color = colormaps["tab20"]((index + 2) % 20)  # 0-1 are LTE's blues
    if method == "lte":
        return {"color": "tab:blue", "linewidth": 2.8, "marker": "o", "zorder": 5}
    if method.startswith("lte"):
        return {"color": color, "linewidth": 1.4, "marker": "s", "linestyle": "--"}
    return {"color": color, "linewidth": 1.2, "marker": "o"}


def plot_study(results: list[dict[str, Any]], path: str | Path, quality_name: str | None = None,
               higher_is_better: bool | None = None, x: str = "ffn_sparsity", title: str | None = None,
               log_cap: float = 20.0) -> str:
    """Quality against FFN sparsity (or `x`="gflops_per_token"), one line per method, dense dashed.

    Perplexity is drawn on a log axis cut at `log_cap` x the dense value (points above are drawn
    on the top edge as open triangles, so a collapsed method does not flatten every other curve).
    """
    if not results:
        raise LTEError("plot_study needs at least one point")
    quality_name = quality_name or results[0].get("metric", "quality")
    if higher_is_better is None:
        higher_is_better = bool(results[0].get("higher_is_better", True))
    fig = new_figure(8.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    scale = 100.0 if x == "ffn_sparsity" else 1.0
    dense = [p["quality"] for p in results if p["method"] == "dense" and finite(p.get("quality"))]
    cap = log_cap * dense[0] if quality_name == "perplexity" and dense and dense[0] > 0 else None
    refs = reference_methods(results)
    methods = [m for m in dict.fromkeys(p["method"] for p in results) if m != "dense" and m not in refs]
    for q in dense[:1]:
        ax.axhline(q, color="black", linestyle="--", linewidth=1, label="dense")
    for p in results:  # dense-ft: no sparsity, the trained methods' budget: a dotted line
        if p["method"] in refs and finite(p.get("quality")):
            q = p["quality"] if cap is None else min(p["quality"], cap)
            ax.axhline(q, color="dimgray", linestyle=":", linewidth=1.2, label=f"{p['method']} (no sparsity)")
    for i, method in enumerate(methods):
        pts = sorted((p for p in results if p["method"] == method and finite(p.get("quality"))), key=lambda p: p[x])
        xs = [scale * p[x] for p in pts]
        ys = [p["quality"] if cap is None else min(p["quality"], cap) for p in pts]
        style = _style(method, i)
        yerr = [p.get("quality_std") or 0.0 for p in pts]
        xerr = [scale * (p.get("ffn_sparsity_std") or 0.0) for p in pts] if x == "ffn_sparsity" else None
        if any(yerr) or (xerr and any(xerr)):  # means over seeds: one std as error bars
            ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, label=method, capsize=2, **style)
        else:
            ax.plot(xs, ys, label=method, **style)
        if cap is not None:
            over = [(a, cap) for a, p in zip(xs, pts) if p["quality"] > cap]
            if over:
                ax.scatter(*zip(*over), marker="^", s=60, facecolors="none", edgecolors=style["color"], zorder=6)
    if cap is not None:
        ax.set_yscale("log")
        ax.set_ylim(top=cap * 1.15)
        ax.text(0.99, 0.02, f"open triangles: perplexity above {cap:.3g} (cut)", transform=ax.transAxes,
                fontsize=7, va="bottom", ha="right")
    ax.set_xlabel("FFN sparsity (%)" if x == "ffn_sparsity" else "GFLOPs per token")
    ax.set_ylabel(f"{quality_name} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title(title or f"{results[0].get('task', '')}: {quality_name} vs {x.replace('_', ' ')}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_eta(results: list[dict[str, Any]], path: str | Path) -> str | None:
    """LTE: measured FFN sparsity and final eta against the knob (target sparsity or eta)."""
    pts = sorted((p for p in results if p["method"] == "lte"), key=lambda p: p["target"])
    if not pts:
        return None
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    knob = pts[0]["knob"]
    xs = [p["target"] for p in pts]
    ax.plot(xs, [p["ffn_sparsity"] for p in pts], marker="o", color="tab:blue", label="measured FFN sparsity")
    if knob == "target":
        ax.plot(xs, xs, linestyle=":", color="gray", label="target")
    ax.set_xlabel("target FFN sparsity" if knob == "target" else "eta")
    ax.set_ylabel("FFN sparsity")
    ax2 = ax.twinx()
    ax2.plot(xs, [p["eta"] for p in pts], marker="s", color="tab:red", label="eta (end of stage 1)")
    ax2.set_ylabel("eta")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")
    ax.set_title("LTE: eta vs sparsity")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_profiles(results: list[dict[str, Any]], path: str | Path, target: float = 0.7) -> str | None:
    """Per-layer FFN sparsity of each method at the target closest to `target`."""
    series = {}
    refs = reference_methods(results)
    for method in dict.fromkeys(p["method"] for p in results if p["method"] != "dense" and p["method"] not in refs):
        pts = [p for p in results if p["method"] == method and p.get("per_layer")]
        if pts:
            best = min(pts, key=lambda p: abs(p["ffn_sparsity"] - target))
            series[f"{method} ({100 * best['ffn_sparsity']:.0f}%)"] = best["per_layer"]
    if not series:
        return None
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for label, values in series.items():
        ax.plot(range(len(values)), [100 * v for v in values], marker="o", markersize=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("FFN sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"per-layer FFN sparsity near {100 * target:.0f}%")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_all(points: list[dict[str, Any]], out: Path, metric: str, higher: bool, profile_target: float) -> dict:
    plots = {"quality_vs_sparsity": plot_study(points, out / "quality_vs_sparsity.png", metric, higher),
             "gflops_vs_quality": plot_study(points, out / "gflops_vs_quality.png", metric, higher,
                                             x="gflops_per_token")}
    eta = plot_eta(points, out / "eta_vs_sparsity.png")
    if eta:
        plots["eta_vs_sparsity"] = eta
    prof = plot_profiles(points, out / "per_layer_sparsity.png", profile_target)
    if prof:
        plots["per_layer_sparsity"] = prof
    return plots

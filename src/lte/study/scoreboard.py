"""LTE against the best baseline across studies: one row per task and LTE point, wins and losses.

Each study's summary compares its declared LTE method (`lte_method`, see `lte.study.config`) with
every baseline at each LTE point of >= 50% sparsity (`report.compare_to_baselines`: a baseline's
quality is interpolated at LTE's measured sparsity). The scoreboard keeps, per point, the best
baseline there, the margin (positive: LTE better, in the metric's own units) and whether the margin
is inside one standard deviation over seeds of either side. Where several studies ran the same model,
data and target (a study again at four times the budget), `once_per_task` keeps the one with the
largest training budget, so that the count can be read once per task too.
"""

from __future__ import annotations

import json
from typing import Any

from .config import declared_points
from .report import fewer_seeds, fmt_margin, fmt_pm

__all__ = ["once_per_task", "pending_points", "scoreboard_markdown", "scoreboard_rows", "target_error_line", "welch_p"]

_TASK_FIELDS = ("model", "task", "glue_task", "data", "eval_data")  # a study's task: same model, data and evaluation


def scoreboard_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per LTE point of a study summary that some baseline reaches."""
    better = 1.0 if summary["higher_is_better"] else -1.0
    config = summary.get("config") or {}
    task_key = json.dumps([config.get(k) for k in _TASK_FIELDS]) if config else None
    budget = (config.get("train") or {}).get("max_steps") or 0
    rows = []
    for point in summary.get("lte_vs_others") or []:
        reached = {name: q for name, q in point["others"].items() if q is not None}
        if not reached:
            continue
        best = max(reached, key=lambda name: better * reached[name])
        margin = better * (point["quality"] - reached[best])
        stds = [s for s in (point.get("quality_std"), (point.get("others_std") or {}).get(best)) if s is not None]
        rows.append({
            "study": summary.get("name"), "metric": summary["metric"], "dense": summary["dense_quality"],
            "lte_method": point.get("method") or summary.get("lte_method") or "lte", "ffn_sparsity": point["ffn_sparsity"],
            "ffn_sparsity_std": point.get("ffn_sparsity_std"), "target": point.get("target"),
            "lte": point["quality"], "lte_std": point.get("quality_std"),
            "best_baseline": best, "baseline": reached[best], "baseline_std": (point.get("others_std") or {}).get(best),
            "margin": margin, "verdict": "win" if margin > 0 else "loss" if margin < 0 else "tie",
            "within_one_std": bool(stds) and abs(margin) <= max(stds),
            "p_value": welch_p(point["quality"], point.get("quality_std"), point.get("seeds"), reached[best],
                               (point.get("others_std") or {}).get(best), (point.get("others_seeds") or {}).get(best)),
            "references": {name: (ref["quality"], ref.get("quality_std"), fewer_seeds(ref, summary.get("seeds")))
                           for name, ref in (summary.get("references") or {}).items()},
            "task_key": task_key, "budget_steps": budget,
        })
    return rows


def once_per_task(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with one per task and target: where studies of the same model, data and evaluation both have a
    point at a target, the one of the study with the most training steps (`train.max_steps`) stays. Rows
    without a task (summaries without their config) or a target all stay."""
    chosen: dict[tuple[str, float], dict[str, Any]] = {}
    for r in rows:
        if r.get("task_key") is not None and r.get("target") is not None:
            key = (r["task_key"], round(r["target"], 6))
            if key not in chosen or r["budget_steps"] > chosen[key]["budget_steps"]:
                chosen[key] = r
    kept = {id(r) for r in chosen.values()}
    return [r for r in rows if r.get("task_key") is None or r.get("target") is None or id(r) in kept]


def welch_p(mean_a: float, std_a: float | None, n_a: int | None, mean_b: float, std_b: float | None,
            n_b: int | None) -> float | None:
    """Two-sided p-value of Welch's t-test on two means over seeds (sample stds), or None when either side has
    fewer than two seeds or no spread at all. The baseline's mean and std are interpolated at LTE's
    sparsity, so the test is approximate there."""
    if not n_a or not n_b or n_a < 2 or n_b < 2 or std_a is None or std_b is None or (std_a == 0 and std_b == 0):
        return None
    from scipy.stats import ttest_ind_from_stats

    return float(ttest_ind_from_stats(mean_a, std_a, n_a, mean_b, std_b, n_b, equal_var=False).pvalue)


def pending_points(summary: dict[str, Any], floor: float = 0.5) -> list[str]:
    """The declared LTE points of >= `floor` target that have no compared point yet ("study: method at 90%"):
    a recipe adopted before its study points ran. Methods declared for every target are not listed."""
    done = {(p.get("method"), p.get("target")) for p in summary.get("lte_vs_others") or []}
    pending = []
    for method, targets in declared_points(summary.get("lte_method") or "lte").items():
        for target in sorted(targets or ()):
            if target >= floor - 1e-9 and not any(m == method and t is not None and abs(t - target) < 1e-9
                                                 for m, t in done):
                pending.append(f"{summary.get('name')}: `{method}` at {100 * target:.0f}%")
    return pending


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return "< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.1 else f"{p:.2f}"


def _sparsity_cell(r: dict[str, Any]) -> str:
    """"75% ± 5 (target 70%)": the measured FFN sparsity, its std over seeds and the target asked for."""
    cell = f"{100 * r['ffn_sparsity']:.0f}%"
    if (r.get("ffn_sparsity_std") or 0.0) >= 0.005:  # a spread over seeds of half a point or more
        cell += f" ± {100 * r['ffn_sparsity_std']:.0f}"
    if r.get("target") is not None:
        cell += f" (target {100 * r['target']:.0f}%)"
    return cell


def target_error_line(rows: list[dict[str, Any]], allowed: float = 0.03) -> str:
    """How far the measured sparsity (mean over seeds) lies from its target, over the rows that have one."""
    aimed = [r for r in rows if r.get("target") is not None]
    if not aimed:
        return ""
    errors = [abs(r["ffn_sparsity"] - r["target"]) for r in aimed]
    worst = aimed[errors.index(max(errors))]
    inside = sum(e <= allowed + 1e-9 for e in errors)
    return (f"Target error (|mean measured sparsity - target|): within {100 * allowed:.0f} points at {inside} of "
            f"{len(aimed)} points; the largest {100 * max(errors):.1f} points ({worst['study']}, target "
            f"{100 * worst['target']:.0f}%).")


def scoreboard_markdown(rows: list[dict[str, Any]], pending: list[str] | None = None) -> str:
    """The rows as a Markdown table, then the count of wins and losses, the declared points not run yet
    (`pending_points`) and the target error."""
    lines = ["| study (metric, dense) | LTE method | sparsity | LTE | best baseline there | margin | verdict | p |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        metric = r["metric"]
        verdict = r["verdict"] + (" (within one std)" if r["within_one_std"] else "")
        refs = "".join(f"; {name} {fmt_pm(q, sd, metric)}{fewer}"
                       for name, (q, sd, fewer) in (r.get("references") or {}).items())
        lines.append(f"| {r['study']} ({metric}, {fmt_pm(r['dense'], None, metric)}{refs}) | `{r['lte_method']}` | "
                     f"{_sparsity_cell(r)} | {fmt_pm(r['lte'], r['lte_std'], metric)} | "
                     f"{r['best_baseline']} {fmt_pm(r['baseline'], r['baseline_std'], metric)} | "
                     f"{fmt_margin(r['margin'], metric)} | {verdict} | {_fmt_p(r.get('p_value'))} |")
    wins = sum(r["verdict"] == "win" for r in rows)
    losses = sum(r["verdict"] == "loss" for r in rows)
    close = sum(r["within_one_std"] for r in rows)
    tested = [r for r in rows if r.get("p_value") is not None]
    clear = {v: sum(r["verdict"] == v and r["p_value"] < 0.05 for r in tested) for v in ("win", "loss")}
    lines += ["", f"{wins} wins, {losses} losses, {len(rows) - wins - losses} ties over {len(rows)} LTE points "
              f"(>= 50% sparsity); {close} of them within one std over seeds. Margin: positive when LTE is "
              "better (the metric's units; perplexity: lower is better). Baselines are interpolated at LTE's "
              "measured sparsity; a baseline whose points do not reach it is not compared."]
    once = once_per_task(rows)
    if len(once) < len(rows):
        lines += ["", f"Once per task and target (where several studies ran the same model, data and target, as "
                  f"at 1x and 4x the budget, the one with the most training steps): "
                  f"{sum(r['verdict'] == 'win' for r in once)} wins, {sum(r['verdict'] == 'loss' for r in once)} "
                  f"losses over {len(once)} points."]
    if tested:
        lines += ["", f"p: two-sided Welch's t-test of LTE's mean against the best baseline's over the seeds (the "
                  f"baseline interpolated at LTE's sparsity, so approximate; '-' where a side has under two seeds "
                  f"or no spread). Under 0.05: {clear['win']} of the wins and {clear['loss']} of the losses "
                  f"({len(tested)} points tested)."]
    if any(r.get("references") for r in rows):
        lines += ["", "dense-ft (beside dense): the dense model fine-tuned further with the trained methods' "
                  "budget, no sparsity; a reference, never a baseline."]
    if pending:
        lines += ["", f"Declared but not run yet (not counted): {'; '.join(pending)}."]
    target = target_error_line(rows)
    lines += ["", target, ""] if target else [""]
    return "\n".join(lines)

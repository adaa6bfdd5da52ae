"""A study's summary: tolerances, LTE against the baselines, and the Markdown report."""

from __future__ import annotations

import math
from typing import Any

from .config import REFERENCES, declared_points
from .seeds import recall_over_precision


def reference_methods(points: list[dict[str, Any]]) -> set[str]:
    """The methods that are references, not baselines: `dense-ft` and its variants (their points say
    `reference`), and any method named as one of `config.REFERENCES`."""
    return {p["method"] for p in points if p.get("reference") or p["method"] in REFERENCES}


def tolerance_ok(quality: float, dense: float, metric: str, higher_is_better: bool) -> bool:
    """Within the paper's tolerance of the dense model: perplexity +0.5; other metrics 5% relative."""
    if metric == "perplexity":
        return quality <= dense + 0.5
    if higher_is_better:
        return quality >= dense * 0.95 if dense > 0 else quality >= dense
    return quality <= dense * 1.05


def interpolate_quality(points: list[dict[str, Any]], sparsity: float, reach: float = 0.02,
                        key: str = "quality") -> float | None:
    """A method's quality (or another `key`, e.g. quality_std) at `sparsity`, linear between its two
    nearest measured points.

    Within `reach` outside the measured range the nearest end point stands in; further out: None.
    """
    pts = sorted((p["ffn_sparsity"], p[key]) for p in points if finite(p.get(key)) and finite(p.get("quality")))
    for (s0, q0), (s1, q1) in zip(pts, pts[1:]):
        if s0 <= sparsity <= s1:
            return q0 if s1 == s0 else q0 + (q1 - q0) * (sparsity - s0) / (s1 - s0)
    for s0, q0 in pts[:1] + pts[-1:]:  # just outside the measured range: the nearest end point
        if abs(s0 - sparsity) <= reach:
            return q0
    return None


def compare_to_baselines(points: list[dict[str, Any]], higher_is_better: bool, method: str = "lte",
                         min_sparsity: float = 0.5) -> list[dict[str, Any]]:
    """At each point of `method` with sparsity (or target) >= `min_sparsity`: every baseline's quality there.

    `method` may join several LTE variants by "+" (one declared recipe run at different targets by
    each, see `config.lte_method`), each optionally limited to targets (`name@0.5,0.7`): their points
    are taken together, each row naming its own method.
    Baselines are the methods other than dense, the references (`reference_methods`) and LTE's own variants
    (names starting with "lte").
    They are interpolated between their measured points; a method whose points do not
    span that sparsity is reported as None (not compared). `beats` / `loses_to` / `ties` list them by name.
    """
    def counts(p: dict[str, Any]) -> bool:  # a 50% target that measured 49% still counts
        target = p["target"] if p.get("knob") == "target" else 0.0
        return max(p["ffn_sparsity"], target) >= min_sparsity - 1e-9

    spec = declared_points(method)

    def declared(p: dict[str, Any]) -> bool:
        targets = spec.get(p["method"], set())
        return p["method"] in spec and (targets is None or any(abs(p["target"] - t) < 1e-9 for t in targets))

    mine = sorted((p for p in points if declared(p) and counts(p)), key=lambda p: p["ffn_sparsity"])
    refs = reference_methods(points)
    others = [m for m in dict.fromkeys(p["method"] for p in points)  # baselines only: not dense, not LTE's ablations
              if m != "dense" and m not in refs and not m.startswith("lte")]
    rows = []
    for p in mine:
        row = {"method": p["method"], "ffn_sparsity": p["ffn_sparsity"], "ffn_sparsity_std": p.get("ffn_sparsity_std"),
               "target": p["target"] if p.get("knob") == "target" else None,
               "quality": p["quality"], "quality_std": p.get("quality_std"), "seeds": _seed_count([p]),
               "others": {}, "others_std": {}, "others_seeds": {}, "margin": {}, "beats": [], "loses_to": [],
               "ties": []}
        for other in others:
            theirs = [o for o in points if o["method"] == other]
            q = interpolate_quality(theirs, p["ffn_sparsity"])
            row["others"][other] = q
            if q is None:
                continue
            row["others_std"][other] = interpolate_quality(theirs, p["ffn_sparsity"], key="quality_std")
            row["others_seeds"][other] = _seed_count(theirs)
            row["margin"][other] = p["quality"] - q  # LTE minus the baseline (sign: see higher_is_better)
            if abs(p["quality"] - q) <= 1e-9 * max(1.0, abs(q)):
                row["ties"].append(other)
            elif (p["quality"] > q) == higher_is_better:
                row["beats"].append(other)
            else:
                row["loses_to"].append(other)
        rows.append(row)
    return rows


def _seed_count(points: list[dict[str, Any]]) -> int | None:
    """The fewest seeds any of `points` averages (None: single-seed points that do not say)."""
    counts = [len(p["seeds"]) for p in points if p.get("seeds")]
    return min(counts) if counts else None


def summarise(points: list[dict[str, Any]], metric: str, higher_is_better: bool,
              lte_method: str = "lte") -> dict[str, Any]:
    """Per method: its points, and the fewest GFLOPs/token among points within tolerance of dense;
    and LTE (`lte_method`: the config's declared LTE recipe) against every baseline at each of its
    points of >= 50% sparsity."""
    dense = next(p for p in points if p["method"] == "dense")
    table = {}
    for method in dict.fromkeys(p["method"] for p in points if p["method"] != "dense"):
        mine = [p for p in points if p["method"] == method]
        ok = [p for p in mine if tolerance_ok(p["quality"], dense["quality"], metric, higher_is_better)]
        best = min(ok, key=lambda p: p["gflops_per_token"]) if ok else None
        table[method] = {
            "points": [(round(p["ffn_sparsity"], 4), round(p["quality"], 4)) for p in mine],
            "quality_std": [p.get("quality_std") for p in mine],
            "gflops_within_tolerance": best["gflops_per_token"] if best else None,
            "sparsity_within_tolerance": best["ffn_sparsity"] if best else None,
        }
    refs = reference_methods(points)
    references = {p["method"]: {"quality": p["quality"], "quality_std": p.get("quality_std"),
                                "train_steps": p.get("train_steps"), "seeds": p.get("seeds")}
                  for p in points if p["method"] in refs}
    return {"metric": metric, "higher_is_better": higher_is_better, "dense_quality": dense["quality"],
            "dense_gflops_per_token": dense["gflops_per_token"], "methods": table, "references": references,
            "lte_method": lte_method, "lte_vs_others": compare_to_baselines(points, higher_is_better, lte_method)}


def _fmt_quality(value: float, metric: str) -> str:
    if not finite(value):
        return "n/a"
    if metric == "perplexity":
        return f"{value:.3g}" if value < 1e4 else f"{value:.2e}"
    if metric in ("accuracy", "mc_accuracy", "f1"):
        return f"{100 * value:.1f}"
    return f"{value:.3f}" if abs(value) < 2 else f"{value:.2f}"


def fmt_pm(value: float | None, std: float | None, metric: str) -> str:
    """`quality ± std` (the std only when it was measured over several seeds)."""
    if value is None:
        return "n/a"
    if not std or not finite(std):
        return _fmt_quality(value, metric)
    return f"{_fmt_quality(value, metric)} ± {_fmt_quality(std, metric)}"


def fmt_margin(value: float, metric: str) -> str:
    return ("+" if value >= 0 else "-") + _fmt_quality(abs(value), metric)


def _fmt_cell(p: dict[str, Any], metric: str, all_seeds: list[int] | None = None) -> str:
    sd = p.get("ffn_sparsity_std")
    spread = f" ± {100 * sd:.0f}" if sd else ""
    return (f"{fmt_pm(p['quality'], p.get('quality_std'), metric)} ({100 * p['ffn_sparsity']:.0f}%{spread})"
            + fewer_seeds(p, all_seeds))


def fewer_seeds(p: dict[str, Any] | None, all_seeds: list[int] | None) -> str:
    """` [seeds 0, 1]` when a point averages fewer seeds than the study ran, else nothing."""
    seeds = (p or {}).get("seeds")
    if not seeds or not all_seeds or len(seeds) >= len(all_seeds):
        return ""
    return f" [seed{'s' if len(seeds) > 1 else ''} {', '.join(str(x) for x in seeds)}]"


def study_markdown(points: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The study as Markdown tables: quality per method and target (measured sparsity in brackets),
    GFLOPs/token within tolerance, LTE against the others at >= 50% sparsity, and training time."""
    metric = summary["metric"]
    dense = next(p for p in points if p["method"] == "dense")
    percent = metric in ("accuracy", "mc_accuracy", "f1")
    unit = " (%)" if percent else ""
    lines = [f"### {summary.get('name') or dense.get('task')}: {metric}{unit}, "
             f"{'higher' if summary['higher_is_better'] else 'lower'} is better",
             "",
             f"Dense: {_fmt_quality(dense['quality'], metric)} at {dense['gflops_per_token']:.4g} GFLOPs/token"
             f" ({summary.get('device', '?')}).",
             ""]
    for name, ref in (summary.get("references") or {}).items():
        steps = f"{ref['train_steps']:.0f}" if finite(ref.get("train_steps")) else "?"
        lines += [f"`{name}` (the dense model fine-tuned further with the trained methods' budget, {steps} steps, "
                  f"no sparsity): {fmt_pm(ref['quality'], ref.get('quality_std'), metric)}"
                  f"{fewer_seeds(ref, summary.get('seeds'))}.", ""]
    refs = reference_methods(points)
    methods = [m for m in dict.fromkeys(p["method"] for p in points) if m != "dense" and m not in refs]
    targets = sorted({p["target"] for p in points if p["method"] in methods})
    knob = "target" if all(p.get("knob") != "eta" for p in points) else "target / eta"
    lines += ["| method | " + " | ".join(f"{knob} {t:g}" for t in targets) + " | GFLOPs/token within tolerance |",
              "|---" * (len(targets) + 2) + "|"]
    for method in methods:
        cells = []
        for t in targets:
            p = next((q for q in points if q["method"] == method and q["target"] == t), None)
            cells.append("" if p is None else _fmt_cell(p, metric, summary.get("seeds")))
        tol = summary["methods"].get(method, {}).get("gflops_within_tolerance")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {'-' if tol is None else f'{tol:.4g}'} |")
    seeds = summary.get("seeds")
    spread = f" over seeds {seeds}: mean ± std" if seeds else ""
    lines += ["", f"Cells: quality (measured FFN sparsity){spread}. Tolerance: " +
              ("perplexity within +0.5 of dense." if metric == "perplexity" else "within 5% (relative) of dense."), ""]
    lines += _extra_lines(points, methods, targets, metric, summary.get("seeds"))
    lines += drift_lines(points, methods, targets)
    lines += length_lines(points, methods, targets)
    rows = summary.get("lte_vs_others") or []
    if rows:
        name = summary.get("lte_method") or "lte"
        lines += [f"| LTE point (`{name}`) | LTE | better than | worse than (theirs, margin) |", "|---|---|---|---|"]
        for row in rows:
            tied = f" (equal: {', '.join(row['ties'])})" if row.get("ties") else ""
            worse = ", ".join(f"{o} ({fmt_pm(row['others'][o], row.get('others_std', {}).get(o), metric)}, "
                              f"{fmt_margin(row['margin'][o], metric)})" for o in row["loses_to"])
            lines.append(f"| {100 * row['ffn_sparsity']:.0f}% | {fmt_pm(row['quality'], row.get('quality_std'), metric)}"
                         f" | {', '.join(row['beats']) or '-'}{tied} | {worse or '-'} |")
        lines += ["", "LTE against the baselines (not its own ablations): each baseline is interpolated between "
                  "its measured points at LTE's sparsity; one whose points do not reach it is left out.", ""]
    derived = {m for m in methods if m.endswith("-topk") and m != "random-topk"}  # same model as its LTE run
    references = [m for m in dict.fromkeys(p["method"] for p in points) if m in refs]
    lines += budget_lines(points, ["dense"] + references + [m for m in methods if m not in derived])
    train = {m: sum(p.get("train_seconds") or 0.0 for p in points if p["method"] == m)
             for m in references + methods if m not in derived}
    lines += ["Training seconds per method (all targets, one worker each): " +
              ", ".join(f"{m} {s:.0f}" for m, s in train.items() if s > 0) + ".", ""]
    return "\n".join(lines)


def _extra_lines(points: list[dict[str, Any]], methods: list[str], targets: list[float], metric: str,
                 all_seeds: list[int] | None = None) -> list[str]:
    """Markdown: the points scored again on `eval.extra_text` (one table per extra text), if any."""
    names = list(dict.fromkeys(n for p in points for n in (p.get("extra_quality") or {})))
    lines = []
    def cell(p: dict[str, Any] | None, name: str) -> str:
        value = (p.get("extra_quality") or {}).get(name) if p else None
        if value is None:
            return ""
        sparsity = (p.get("extra_sparsity") or {}).get(name)
        at = f" at {sparsity:.0%}" if sparsity is not None and p["method"] != "dense" else ""
        return fmt_pm(value, (p.get("extra_quality_std") or {}).get(name), metric) + at + fewer_seeds(p, all_seeds)

    for name in names:
        dense = next(p for p in points if p["method"] == "dense")
        lines += [f"Also scored on `{name}` ({metric}; dense {cell(dense, name) or 'n/a'}):", "",
                  "| method | " + " | ".join(f"target {t:g}" for t in targets) + " |", "|---" * (len(targets) + 1) + "|"]
        for method in methods:
            found = [next((q for q in points if q["method"] == method and q["target"] == t), None) for t in targets]
            lines.append(f"| {method} | " + " | ".join(cell(p, name) for p in found) + " |")
        lines.append("")
    return lines


def _stage1_end(p: dict[str, Any]) -> str:
    """Stage 1's end sparsity: the mean, with each seed's value where they differ by a point or more."""
    seeds = [s["stage1_train_sparsity"] for s in p.get("per_seed") or [] if s.get("stage1_train_sparsity") is not None]
    if len(seeds) > 1 and max(seeds) - min(seeds) >= 0.01:
        return f"{p['stage1_train_sparsity']:.1%} ({', '.join(f'{v:.0%}' for v in seeds)})"
    return f"{p['stage1_train_sparsity']:.1%}"


def drift_lines(points: list[dict[str, Any]], methods: list[str], targets: list[float]) -> list[str]:
    """Markdown: for LTE points, the FFN sparsity of the hard masks at stage 1's end (a re-cut to the target
    follows it: the further under, the more the re-cut moves; E2E's low seeds at 0.7 ended 6 points under), at
    stage 2's last step, and as served and scored (they differ where hard masks drift while the weights move and
    a re-cut follows); nothing when no point recorded them."""
    def cell(p: dict[str, Any] | None) -> str:
        if p is None or p.get("stage2_train_sparsity") is None:
            return ""
        first = f"{_stage1_end(p)} / " if p.get("stage1_train_sparsity") is not None else ""
        return f"{first}{p['stage2_train_sparsity']:.1%} / {p['ffn_sparsity']:.1%}"

    found = {m: [next((q for q in points if q["method"] == m and q["target"] == t), None) for t in targets]
             for m in methods}
    rows = [f"| {m} | " + " | ".join(cell(p) for p in ps) + " |" for m, ps in found.items() if any(map(cell, ps))]
    if not rows:
        return []
    stage1 = any(p and p.get("stage1_train_sparsity") is not None for ps in found.values() for p in ps)
    title = ("The hard masks' FFN sparsity at stage 1's end (each seed's where they differ) / at stage 2's last step /"
             " as served and scored:" if stage1 else "Stage 2's masks: FFN sparsity at its last training step / as "
             "served and scored:")
    return [title, "",
            "| method | " + " | ".join(f"target {t:g}" for t in targets) + " |", "|---" * (len(targets) + 1) + "|",
            *rows, ""]


def length_lines(points: list[dict[str, Any]], methods: list[str], targets: list[float]) -> list[str]:
    """Markdown for generation studies: ROUGE-L recall / precision per point (the outputs' length over the
    references'; each seed's in brackets), dense first; nothing for other tasks."""
    def cell(p: dict[str, Any] | None) -> str:
        ratio = None if p is None else recall_over_precision(p)
        if ratio is None:
            return ""
        seeds = [s["recall_over_precision"] for s in p.get("per_seed") or [] if s.get("recall_over_precision") is not None]
        return f"{ratio:.2f}" + (f" ({', '.join(f'{v:.2f}' for v in seeds)})" if len(seeds) > 1 else "")

    dense = next((p for p in points if p["method"] == "dense"), None)
    found = {m: [next((q for q in points if q["method"] == m and q["target"] == t), None) for t in targets]
             for m in methods}
    rows = [f"| {m} | " + " | ".join(cell(p) for p in ps) + " |" for m, ps in found.items() if any(map(cell, ps))]
    if not rows:
        return []
    return [f"ROUGE-L recall / precision: the generated text's length over the reference's (under 1: shorter, "
            f"content left out; each seed's in brackets). Dense: {cell(dense) or 'n/a'}.", "",
            "| method | " + " | ".join(f"target {t:g}" for t in targets) + " |", "|---" * (len(targets) + 1) + "|",
            *rows, ""]


def _span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if math.isclose(lo, hi, rel_tol=1e-3) else f"{lo:{fmt}}-{hi:{fmt}}"


def budget_lines(points: list[dict[str, Any]], methods: list[str]) -> list[str]:
    """Markdown: the training budget of each method's points (optimizer steps, tokens, epochs; LTE's two
    stages together) and whether every trained method had the same one."""
    rows, budgets = [], {}
    for method in methods:
        pts = [p for p in points if p["method"] == method and finite(p.get("train_steps"))]
        steps = [float(p["train_steps"]) for p in pts]
        if not steps or max(steps) == 0:
            if method != "dense":
                rows.append(f"| {method} | - | - | - (training-free) |")
            continue
        tokens = [float(p["train_tokens"]) for p in pts if finite(p.get("train_tokens"))]
        epochs = [float(p["train_epochs"]) for p in pts if finite(p.get("train_epochs"))]
        rows.append(f"| {method}{' (fine-tune before every method)' if method == 'dense' else ''} | "
                    f"{_span(steps, '.0f')} | {_span(tokens, ',.0f') if tokens else '?'} | "
                    f"{_span(epochs, '.2f') if epochs else '?'} |")
        if method != "dense":
            budgets[method] = (min(steps), max(steps), min(tokens or [0.0]), max(tokens or [0.0]))
    if not rows:
        return []
    steps = [v for b in budgets.values() for v in b[:2]]
    tokens = [v for b in budgets.values() for v in b[2:]]
    # token counts of padded classification batches vary a little with the examples drawn: 2% is "same"
    same = not steps or (min(steps) == max(steps) and min(tokens) >= 0.98 * max(tokens))
    verdict = ("Every trained method had the same budget (tokens within 2%)." if same else
               "**Budgets differ** between trained methods or targets: compare with care.")
    return ["| method | optimizer steps | tokens | epochs |", "|---|---|---|---|", *rows, "",
            f"Training budget per point (LTE: stage 1 and stage 2 together). {verdict}", ""]


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)

"""Studies over several seeds: one sub-study per seed, and points averaged over seeds.

A study config with `seeds: [0, 1, 2]` runs every seed as its own study in `<out>/seed<N>/`
(its own dense fine-tune, grouping, router init and training order), so the spread includes
every source of run-to-run variation. The study's own `results.*`, summary, report and plots
are then drawn from the points averaged over seeds: mean and sample standard deviation of the
quality and of the measured sparsity, with the per-seed values kept in each point.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["seed_studies", "aggregate_points", "recall_over_precision", "MEAN_KEYS"]

#: Numeric point fields averaged over seeds (quality and ffn_sparsity also get a `_std`).
MEAN_KEYS = ("quality", "ffn_sparsity", "activation_sparsity", "gflops_per_token", "dense_gflops_per_token",
             "union_sparsity_16", "eta", "tau", "train_seconds", "build_seconds", "eval_seconds", "train_steps",
             "train_tokens", "train_epochs", "stage1_train_sparsity", "stage2_train_sparsity")


def seed_studies(cfg: dict[str, Any], out: Path) -> list[tuple[dict[str, Any], Path]]:
    """(config, folder) of each seed's study: `<out>/seed<N>` with `seed: N`, or [(cfg, out)] without `seeds`."""
    seeds = cfg.get("seeds")
    if not seeds:
        return [(cfg, Path(out))]
    studies = []
    for seed in seeds:
        one = dict(cfg)
        one["seed"], one["seeds"] = int(seed), None
        studies.append((one, Path(out) / f"seed{int(seed)}"))
    return studies


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean_extra(per_member: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]] | None:
    """Mean and std of each `extra_quality` entry (perplexity on more held-out text) over the seeds."""
    names = dict.fromkeys(n for d in per_member for n in d)
    if not names:
        return None
    means, stds = {}, {}
    for name in names:
        values = [float(d[name]) for d in per_member if _finite(d.get(name))]
        if values:
            means[name], stds[name] = _mean_std(values)
    return means, stds


def recall_over_precision(point: dict[str, Any]) -> float | None:
    """A generation point's mean ROUGE-L recall over its mean precision (None for other tasks).

    Per example recall / precision is the generated text's length over the reference's (the longest common
    subsequence cancels), so under 1 says the outputs are shorter than the references: a model that loses by
    leaving content out shows it here, one that loses by rambling above 1."""
    if _finite(point.get("recall_over_precision")):
        return float(point["recall_over_precision"])
    scores = point.get("eval") or {}
    precision, recall = scores.get("rougeL_precision"), scores.get("rougeL_recall")
    if _finite(precision) and _finite(recall) and precision > 0:
        return float(recall) / float(precision)
    return None


def aggregate_points(per_seed: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Average each (method, target) point over the seeds that have it.

    `per_seed`: seed -> that seed's points. Each returned point holds the means of MEAN_KEYS,
    `quality_std` / `ffn_sparsity_std` (sample std; 0 for one seed), the mean per-layer profile,
    `seeds` (the seeds averaged) and `per_seed` (seed, quality, ffn_sparsity of each); generation points
    also `recall_over_precision` (mean over the seeds, and each seed's).
    """
    groups: dict[tuple[str, float], list[tuple[int, dict[str, Any]]]] = {}
    for seed, points in sorted(per_seed.items()):
        for p in points:
            groups.setdefault((p["method"], float(p["target"])), []).append((seed, p))
    out = []
    for (method, target), members in groups.items():
        first = members[0][1]
        point = {k: v for k, v in first.items() if k not in MEAN_KEYS and k not in ("per_layer", "eval", "fingerprint")}
        for key in MEAN_KEYS:
            values = [p[key] for _, p in members if _finite(p.get(key))]
            if values:
                point[key], std = _mean_std([float(v) for v in values])
                if key in ("quality", "ffn_sparsity"):
                    point[f"{key}_std"] = std
            else:
                point[key] = None
        extra = _mean_extra([p.get("extra_quality") or {} for _, p in members])
        if extra:
            point["extra_quality"], point["extra_quality_std"] = extra
        extra_sparsity = _mean_extra([p.get("extra_sparsity") or {} for _, p in members])
        if extra_sparsity:
            point["extra_sparsity"] = extra_sparsity[0]
        ratios = [recall_over_precision(p) for _, p in members]
        if any(r is not None for r in ratios):
            point["recall_over_precision"] = _mean_std([r for r in ratios if r is not None])[0]
        layers = [p["per_layer"] for _, p in members if p.get("per_layer")]
        if layers and all(len(x) == len(layers[0]) for x in layers):
            point["per_layer"] = [sum(col) / len(col) for col in zip(*layers)]
        devices = sorted({str(p.get("device")) for _, p in members if p.get("device")})
        if devices:  # seeds run on different machines (a study resumed elsewhere) name them all
            point["device"] = " + ".join(devices)
        point["seeds"] = [seed for seed, _ in members]
        point["seed"] = None
        point["per_seed"] = [{"seed": seed, "quality": p.get("quality"), "ffn_sparsity": p.get("ffn_sparsity"),
                              **({"extra_quality": p["extra_quality"]} if p.get("extra_quality") else {}),
                              **({"stage1_train_sparsity": p["stage1_train_sparsity"]}
                                 if _finite(p.get("stage1_train_sparsity")) else {}),
                              **({"recall_over_precision": ratio} if ratio is not None else {})}
                             for (seed, p), ratio in zip(members, ratios)]
        point["method"], point["target"] = method, target
        out.append(point)
    return out

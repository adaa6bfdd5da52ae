"""ROUGE-L of an E2E study's points per number of attributes in the meaning representation (no GPU, no training).

A diagnostic over finished results: `lte study` keeps each generation point's per-example ROUGE-L
(`eval.rougeL_per_example`, in the order of the held-out MRs). This script rebuilds that order from the study's
config as its summary.json records it (data file, `prep.holdout`, `eval.max_examples`) the way `lte.study.tasks` does, counts the attributes of
each MR ("name : ... | area : ... | ..."), and prints each point's mean ROUGE-L per attribute count over its seeds,
beside the dense model's. `--correlate` adds the Pearson correlation, over every seed of the points named, between
a seed's ROUGE-L and its ROUGE-L recall / precision (the outputs' length over the references').

    python benchmarks/e2e_by_slots.py benchmarks/results/study_v2/e2e-smollm2-full \\
        dense@0 dejavu-ft@0.7 lte-s8-s1short-retau-cal-hold@0.7
    python benchmarks/e2e_by_slots.py benchmarks/results/study_v2/e2e-smollm2-full --correlate \
        lte-s8-s1short-retau-cal@0.7 lte-s8-s1short-retau-cal-hold@0.7
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lte.study.seeds import recall_over_precision
from lte.study.tasks import _generation_pairs


def held_out_slots(config: dict) -> list[int]:
    """The attribute count of each scored MR, in the order the study scored them (`config["data"]` is read
    relative to the working directory, as `lte study` reads it)."""
    pairs, _ = _generation_pairs(config["data"], config.get("generation_format"))
    cut = int(len(pairs) * (1 - config["prep"]["holdout"]))
    held = pairs[cut:]
    limit = (config.get("eval") or {}).get("max_examples")
    return [mr.count("|") + 1 for mr, _ in (held[:limit] if limit else held)]


def seed_points(study: Path, method: str, target: float) -> list[dict]:
    """Each seed's stored point (method, target) that has ROUGE-L scores."""
    found = []
    for seed_dir in sorted(study.glob("seed*")):
        for point in json.loads((seed_dir / "results.json").read_text()):
            if point["method"] == method and abs(point["target"] - target) < 1e-9 and (point.get("eval") or {}):
                found.append(point)
    return found


def length_correlation(points: list[dict]) -> float:
    """Pearson correlation of ROUGE-L with recall / precision over the given seed points."""
    pairs = [(p["quality"], recall_over_precision(p)) for p in points]
    pairs = [(q, r) for q, r in pairs if r is not None]
    if len(pairs) < 3:
        raise SystemExit(f"--correlate needs at least 3 seed points with ROUGE-L precision and recall, got {len(pairs)}")
    return float(np.corrcoef(np.array(pairs).T)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", type=Path, help="a study folder with summary.json and seed*/results.json")
    ap.add_argument("points", nargs="+", help="METHOD@TARGET, e.g. dense@0 lte-s8@0.5")
    ap.add_argument("--correlate", action="store_true",
                    help="also print the correlation of ROUGE-L with recall / precision over the points' seeds")
    args = ap.parse_args()
    summary = args.study / "summary.json"
    if not summary.is_file():
        raise SystemExit(f"{summary} not found: pass a study folder that `lte study` wrote (summary.json, seed*/).")
    config = json.loads(summary.read_text()).get("config") or {}
    if config.get("task") not in (None, "generation") or "data" not in config:
        raise SystemExit(f"{args.study} is not a generation study with its config recorded in summary.json.")
    slots = held_out_slots(config)
    counts = sorted(set(slots))
    print("| point | seeds | " + " | ".join(f"{k} attributes ({slots.count(k)} MRs)" for k in counts) + " | all |")
    print("|---" * (len(counts) + 3) + "|")
    every = []
    for spec in args.points:
        method, _, target = spec.partition("@")
        points = seed_points(args.study, method, float(target or 0))
        every += points
        runs = [p["eval"]["rougeL_per_example"] for p in points if p["eval"].get("rougeL_per_example")]
        if not runs:
            print(f"| {spec} | 0 | no per-example scores |")
            continue
        if any(len(r) != len(slots) for r in runs):
            raise SystemExit(f"{spec}: {len(runs[0])} scores for {len(slots)} held-out MRs; is this the study's config?")
        mean = [sum(col) / len(col) for col in zip(*runs)]
        cells = [sum(v for v, s in zip(mean, slots) if s == k) / slots.count(k) for k in counts]
        print(f"| {spec} | {len(runs)} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {sum(mean) / len(mean):.2f} |")
    if args.correlate:
        print(f"\nROUGE-L against recall / precision over {len(every)} seed points: "
              f"Pearson r = {length_correlation(every):.2f}")


if __name__ == "__main__":
    main()

"""The union of 16 tokens' masks in the study's trained models, from the points a study already wrote.

Every trained study point records `union_sparsity_16`: after training, on one calibration batch, the fraction of
the FFN's neurons that no token of a group of 16 consecutive real tokens needs (`lte.stats.union_sparsity`). This
prints, per study and target, the union (1 - that) of a method's points: mean and std over seeds, as a Markdown
table. Consecutive tokens of one text are more alike than the 16 sequences of a decode batch, so a decode step's
union is at least about this large.

    python benchmarks/study_unions.py benchmarks/results/study_v2 --methods sst2-minilm=lte-s8 ...
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def unions(root: Path, study: str, method: str, target: float) -> list[float]:
    """1 - union_sparsity_16 of every seed's point of `method` at `target` in `root/study`."""
    out = []
    for path in sorted((root / study).glob(f"seed*/{method}/t{target:g}/point.json")):
        value = json.loads(path.read_text()).get("union_sparsity_16")
        if value is not None:
            out.append(1.0 - value)
    return out


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.0f}% ± {100 * std:.1f} (n={len(values)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="a study root, e.g. benchmarks/results/study_v2")
    p.add_argument("--methods", nargs="+", required=True,
                   help="STUDY=METHOD, or STUDY=M50,M70,M90 for one method per target")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--baseline", default="dejavu-ft", help="a second method shown beside (its own union)")
    args = p.parse_args()
    print("| study | " + " | ".join(f"method at {t:.0%}" for t in args.targets)
          + f" | {args.baseline} " + " / ".join(f"{t:.0%}" for t in args.targets) + " |")
    print("|---" * (len(args.targets) + 2) + "|")
    for spec in args.methods:
        study, _, names = spec.partition("=")
        names = names.split(",")
        if len(names) not in (1, len(args.targets)):
            raise SystemExit(f"{spec}: give one method or one per target ({len(args.targets)})")
        per_target = names * len(args.targets) if len(names) == 1 else names
        cells = [f"`{m}` {cell(unions(args.root, study, m, t))}" for m, t in zip(per_target, args.targets)]
        base = " / ".join(cell(unions(args.root, study, args.baseline, t)).split(" ±")[0] for t in args.targets)
        print(f"| {study} | " + " | ".join(cells) + f" | {base} |")


if __name__ == "__main__":
    main()

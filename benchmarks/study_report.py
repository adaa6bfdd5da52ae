"""Rebuild the study's tables and plots from finished results (no training, no GPU).

    python benchmarks/study_report.py RUNS_DIR benchmarks/results/study --meta run_meta.json

RUNS_DIR holds one folder per study (`results.json` + `study_config.yaml`, as `lte study` writes
them, e.g. unpacked from the GPU machine's `study_results.tar.gz`). For each study this writes
results.{csv,json}, summary.json, report.md and the PNG plots into OUT/<study>/, and OUT/report.md
with every study's tables. `--meta` adds a JSON file of run facts (device, versions, commit, times)
to every summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from lte.study.cache import load_results, write_points
from lte.study.plots import plot_all
from lte.study.report import study_markdown, summarise


def rebuild(src: Path, dst: Path, meta: dict) -> str:
    points = load_results(src / "results.json")
    dense = next(p for p in points if p["method"] == "dense")
    summary = summarise(points, dense["metric"], bool(dense["higher_is_better"]))
    summary.update(name=src.name, **meta)
    dst.mkdir(parents=True, exist_ok=True)
    write_points(points, dst, "results")
    if (src / "study_config.yaml").exists():
        shutil.copy(src / "study_config.yaml", dst / "study_config.yaml")
    (dst / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    report = study_markdown(points, summary)
    (dst / "report.md").write_text(report)
    profile = 0.5 if dense["metric"] in ("perplexity", "rougeL", "mc_accuracy") else 0.7
    plot_all(points, dst, dense["metric"], bool(dense["higher_is_better"]), profile)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="folder with one sub-folder per study (results.json)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--meta", type=Path, help="JSON of run facts added to every summary")
    args = parser.parse_args()
    meta = json.loads(args.meta.read_text()) if args.meta else {}
    studies = sorted(p.parent for p in args.runs.glob("*/results.json"))
    if not studies:
        raise SystemExit(f"no <study>/results.json under '{args.runs}'")
    reports = [rebuild(src, args.out / src.name, meta) for src in studies]
    (args.out / "report.md").write_text("\n".join(reports))
    print("\n".join(reports))


if __name__ == "__main__":
    main()

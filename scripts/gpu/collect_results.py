"""Copy the new points of a GPU call's study_results.tar.gz into the committed results (run here, not there).

    python scripts/gpu/collect_results.py /path/to/study_results.tar.gz [--dest benchmarks/results]

Each study folder of the archive (`<study>/seed<N>/<method>/t<target>/point.json`, with the stage records
`stage1/lte_stage.json`, `stage2/lte_stage.json` beside them) goes to `DEST/recipe/<study>` when the study's
name starts with `recipe-`, else to `DEST/study_v2/<study>`. Points already there are kept as they are (the
archive also holds the committed points the call resumed from); the new ones are listed. Then summarise each
study again with `lte study CONFIG --root DEST/<recipe|study_v2> --collect` (with the `--set model=...` the
call used) and the scoreboard with `lte scoreboard`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

#: what a seed's dense folder keeps in the committed results (as the committed studies hold it)
DENSE_FILES = ("point.json", "lte_stage.json", "study_dense.json")


def destination(dest: Path, study: str) -> Path:
    return dest / ("recipe" if study.startswith("recipe-") else "study_v2") / study


def collect(archive: Path, dest: Path) -> list[Path]:
    """The new points copied from `archive` into `dest` (their paths there)."""
    if not archive.is_file():
        raise SystemExit(f"no archive at '{archive}': pass the study_results.tar.gz a device call returned")
    new = []
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        root = Path(tmp)
        # a method's point with its stage records; each seed's dense point with its records (no weights)
        for pattern, files in (("*/seed*/*/t*/point.json", ("point.json", "stage*/lte_stage.json")),
                               ("*/seed*/dense/point.json", DENSE_FILES)):
            for point in sorted(root.glob(pattern)):
                rel = point.relative_to(root)
                target = destination(dest, rel.parts[0]) / Path(*rel.parts[1:])
                if target.exists():
                    continue
                for file in (f for name in files for f in point.parent.glob(name)):
                    copy = target.parent / file.relative_to(point.parent)
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, copy)
                new.append(target)
    return new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive", type=Path, help="study_results.tar.gz of a device call")
    parser.add_argument("--dest", type=Path, default=Path("benchmarks/results"), help="the committed results folder")
    args = parser.parse_args(argv)
    new = collect(args.archive, args.dest)
    for path in new:
        print("new", path)
    print(f"{len(new)} new point(s); studies touched: "
          f"{', '.join(sorted({p.relative_to(args.dest).parts[1] for p in new})) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

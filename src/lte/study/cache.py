"""Finished points on disk: where each is kept, the fingerprint that says it is still valid, the tables.

Every finished (method, target) point is `<out>/<method>/t<target>/point.json` with a
fingerprint of everything it depends on; a rerun with the same settings reuses it, so an
interrupted study resumes where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..data.text import is_text_source
from .config import DEFAULTS, TRAINED, merge, method_plan
from .tasks import TaskSetup, dense_dir

CSV_FIELDS = ("task", "method", "knob", "target", "eta", "ffn_sparsity", "activation_sparsity", "quality", "metric",
              "higher_is_better", "gflops_per_token", "dense_gflops_per_token", "union_sparsity_16",
              "train_seconds", "build_seconds", "eval_seconds", "train_steps", "train_tokens", "train_epochs",
              "seed", "seeds", "quality_std", "ffn_sparsity_std")


#: Stage-1 defaults before recipe v2 (the paper's): points made then did not name them.
_PAPER_STAGE1 = {"lam": 0.5, "stage1_routing": "soft", "calibrate_tau": False}


def _stage1_as_counted(stage1: dict[str, Any], knob: str) -> dict[str, Any]:
    """An LTE point's stage-1 settings as its fingerprint counts them: the library's defaults for the
    settings recipe v2 changed (lam, stage1_routing, calibrate_tau: on with a target), with the paper's values left out. So a point made
    under the paper's defaults is not a finished point of today's recipe, and one whose config names
    its values (the paper's or today's) keeps the fingerprint it was made with."""
    from ..config import LTEConfig
    from ..training.args import TrainArgs

    defaults = TrainArgs(target_sparsity=0.5 if knob == "target" else None)
    current = {"lam": LTEConfig().lam, "stage1_routing": defaults.stage1_routing,
               "calibrate_tau": defaults.calibrate_tau, **stage1}
    return {k: v for k, v in current.items() if not (k in _PAPER_STAGE1 and v == _PAPER_STAGE1[k])}


def fingerprint_of(kind: str, name: str, sources: list[Any], settings: dict[str, Any], method: str,
                   target: float | None, base: str | None = None) -> str:
    """A digest of everything a point depends on: task, model and data paths, settings, method, target.

    Settings a method never reads are left out (an untrained baseline ignores `train` and `lte`,
    every method ignores the other methods' options and the plot settings), so changing them keeps
    its finished points.
    """
    base = base or method  # the built-in method behind a variant name
    trained = base == "dense" or base.startswith("lte") or base in TRAINED
    ignored = {"profile_target", "keep_models"} | (set() if trained else {"train", "lte"})
    relevant = {k: v for k, v in settings.items() if k not in ignored}
    if base.startswith("lte") and isinstance(relevant.get("lte"), dict):
        lte = relevant["lte"]
        relevant["lte"] = {**lte, "stage1": _stage1_as_counted(lte.get("stage1") or {}, lte.get("knob", "target"))}
    relevant["method_options"] = (settings.get("method_options") or {}).get(base)
    blob = json.dumps({"kind": kind, "name": name, "sources": [None if s is None else str(s) for s in sources],
                       "settings": relevant, "method": method, "target": None if target is None else float(target)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def settings_fingerprint(setup: TaskSetup, method: str, target: float | None,
                          base: str | None = None) -> str | None:
    """The fingerprint of a point of this task; None when model or data are objects (no resume then)."""
    sources = [setup.model_source, setup.data_source, setup.eval_source]
    if any(s is not None and not is_text_source(s) for s in sources):
        return None
    return fingerprint_of(setup.kind, setup.name, sources, setup.settings, method, target, base)


def point_path(out_dir: str | Path, method: str, target: float | None = None) -> Path:
    """Where one finished point is kept: `<out>/<method>/t<target>/point.json` (`<out>/dense/point.json`)."""
    if method == "dense":
        return dense_dir(out_dir) / "point.json"
    return Path(out_dir) / method / f"t{target:g}" / "point.json"


def save_point(path: Path, point: dict[str, Any], fingerprint: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**point, "fingerprint": fingerprint}, indent=2, default=json_default))
    tmp.replace(path)  # atomic: a killed run leaves no half-written point


def load_point(path: Path, fingerprint: str | None) -> dict[str, Any] | None:
    """A finished point, if it exists and was made with the same settings."""
    if fingerprint is None or not path.is_file():
        return None
    try:
        point = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if point.get("fingerprint") != fingerprint:
        return None
    for stage in ("stage1", "stage2"):  # points made before these were recorded: from the stage records
        key = f"{stage}_train_sparsity"
        record = path.parent / stage / "lte_stage.json"
        if key in point or not record.is_file():
            continue
        try:
            trained = json.loads(record.read_text()).get("train_sparsity")
        except json.JSONDecodeError:
            trained = None
        if trained is not None:
            point[key] = float(trained)
    return point


def stale_point_reason(cfg: dict[str, Any], out: Path, method: str, value: float | None) -> str | None:
    """Why the point file at `out` does not count, when one exists: the top-level settings in which this
    study differs from the config recorded there (`study_config.yaml`), else that its settings changed."""
    if not point_path(out, method, value).is_file():
        return None
    recorded_file = Path(out) / "study_config.yaml"
    try:
        import yaml

        recorded = yaml.safe_load(recorded_file.read_text()) if recorded_file.is_file() else None
    except yaml.YAMLError:
        recorded = None
    keys = [k for k in ("task", "name", "model", "data", "eval_data", *DEFAULTS)  # what the fingerprint reads
            if k in cfg or k in (recorded or {})]
    changed = [k for k in keys if isinstance(recorded, dict) and recorded.get(k) != cfg.get(k)]
    if changed:
        shown = ", ".join(f"{k}: {recorded.get(k)!r} there, {cfg.get(k)!r} now" for k in changed[:3])
        return (f"its point was made with other settings ({shown}); pass the same values (e.g. `--set "
                f"{changed[0]}=...`) to collect it, or run the study again to remake it")
    return "its point was made with other settings; run the study again to remake it"


def point_done(cfg: dict[str, Any], out: Path, method: str, value: float | None) -> bool:
    """Whether a finished point of this study exists on disk (same settings)."""
    return load_point(point_path(out, method, value), point_fingerprint(cfg, method, value)) is not None


def point_fingerprint(cfg: dict[str, Any], method: str, target: float | None) -> str | None:
    """The fingerprint a finished point of this study must carry (same rule as when it was made)."""
    settings = merge(DEFAULTS, {k: v for k, v in cfg.items() if k in DEFAULTS})
    base = None
    if method != "dense":
        derived = method not in cfg["methods"] and method.endswith("-topk")
        owner = method[: -len("-topk")] if derived else method  # `<m>-topk` comes from m
        base, extra = method_plan(cfg, owner)
        settings = merge(settings, extra)
    sources = [cfg.get("model"), cfg.get("data"), cfg.get("eval_data")]
    if any(s is not None and not is_text_source(s) for s in sources):
        return None
    return fingerprint_of(cfg["task"], cfg.get("name", cfg["task"]), sources, settings, method, target, base)


def write_points(points: list[dict[str, Any]], out_dir: str | Path, stem: str = "points") -> tuple[Path, Path]:
    """`<stem>.json` (everything) and `<stem>.csv` (one row per point, CSV_FIELDS)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath, cpath = out / f"{stem}.json", out / f"{stem}.csv"
    jpath.write_text(json.dumps(points, indent=2, default=json_default))
    with open(cpath, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for p in points:
            writer.writerow({k: p.get(k) for k in CSV_FIELDS})
    return jpath, cpath


def json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Read a results.json / points.json back (e.g. to re-plot)."""
    return json.loads(Path(path).read_text())

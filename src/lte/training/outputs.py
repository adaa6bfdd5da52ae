"""A stage's output folder: its `lte_stage.json` record, and what `--overwrite` / `--resume` do there.

A stage never replaces a finished run, an interrupted run's checkpoints or a saved model unless
told to (`overwrite`), and resumes only a checkpoint whose run recorded the same settings.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from lte.loading import STAGE_RECORD
from lte.training.args import TrainArgs
from lte.training.callbacks import newest_checkpoint
from lte.training.errors import StageInputError

logger = logging.getLogger(__name__)

STAGE_FILE = STAGE_RECORD
#: A stage's name in its record
STAGE_LABEL = {"dense": "dense", "1": "stage1", "2": "stage2"}


# ---------------------------------------------------------------------- stage bookkeeping
def stage_info(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The `lte_stage.json` record of a stage output directory, or None."""
    path = Path(directory) / STAGE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def is_stage_complete(directory: str | os.PathLike, stage: str | None = None) -> bool:
    """Whether `directory` holds a finished stage output (of `stage` when given)."""
    info = stage_info(directory)
    if not info or not info.get("complete") or not info.get("model_saved", True):
        return False
    return stage is None or info.get("stage") == STAGE_LABEL.get(stage, stage)


def write_stage_info(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / STAGE_FILE).write_text(json.dumps(record, indent=2, default=str))


# ---------------------------------------------------------------------- the output folder: overwrite, resume
#: Settings that may differ between a run and its resumption (they change no trained number).
_FREE_ON_RESUME = {"resume", "overwrite", "keep_checkpoints", "progress", "report_to", "logging_steps", "save_steps",
                   "save_total_limit", "dataloader_workers"}
#: What a stage writes into its folder (removed by --overwrite; other files stay).
_STAGE_OUTPUTS = ("checkpoint-*", "runs", STAGE_FILE, "train_log.jsonl", "training_args.bin", "*.safetensors",
                  "*.safetensors.index.json", "pytorch_model*.bin", "lte_config.json", "baseline_config.json",
                  "eval_*.json", "eval_*.png")


def _flat_settings(record: dict[str, Any]) -> dict[str, Any]:
    """What a run's record says it was (stage, task, model, data, every setting), flat and JSON-normalised."""
    hparams = dict(record.get("hparams") or {})
    lte_part = hparams.pop("lte", None) or {}
    flat = {k: record.get(k) for k in ("stage", "task", "source", "data")}
    flat.update(hparams)
    flat.update({f"lte.{k}": v for k, v in lte_part.items()})
    return json.loads(json.dumps(flat, default=str))


def _setting_changes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`name old -> new` for every setting that differs between a recorded run and this one.

    A setting the record does not name (an older lte wrote it, before the setting existed) counts as
    its default, so a newer lte resumes such a run when the new setting is left at its default.
    """
    old, new = _flat_settings(recorded), _flat_settings(now)
    defaults = _flat_settings({"hparams": TrainArgs().to_dict()})
    old.update({k: defaults[k] for k in set(new) - set(old) if k in defaults})
    return [f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new))
            if k not in _FREE_ON_RESUME and old.get(k) != new.get(k)]


def _holds_model(out: Path) -> bool:
    return any((out / name).is_file() for name in ("config.json", "lte_config.json", "baseline_config.json"))


def _clear_stage_outputs(out: Path) -> None:
    """Remove what an earlier stage run wrote into `out` (`--overwrite`); files of other origin stay."""
    import shutil

    for pattern in _STAGE_OUTPUTS:  # tolerant: under DDP / FSDP every process clears the same folder
        for path in out.glob(pattern):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def prepare_output(out: Path, record: dict[str, Any], hp: TrainArgs) -> str | None:
    """Check the output folder before any work; return the checkpoint to resume from (or None).

    A finished run, the checkpoints of an interrupted one, or a saved model are never replaced
    without `overwrite`; `resume` continues only a checkpoint whose run recorded the same settings.
    """
    info = stage_info(out)
    finished = is_stage_complete(out)  # a finished run whose model was saved
    checkpoint = newest_checkpoint(str(out))
    label = (info or {}).get("stage", record["stage"])
    if hp.overwrite:
        if finished or checkpoint or _holds_model(out) or info:
            _clear_stage_outputs(out)
            print(f"[lte] --overwrite: cleared the earlier {label} run in {out}", flush=True)
        return None
    if hp.resume:
        if finished:
            raise StageInputError(
                f"--resume: {out} holds a finished {label} run (step {info.get('global_step')}), nothing to continue; "
                "pass --overwrite to train it again, or choose another --out")
        if checkpoint is None:
            logger.warning("--resume: no checkpoint-N folder in %s; starting the stage from the beginning", out)
            return None
        if info is None:
            logger.warning("--resume: %s has no %s (an older lte wrote it): its settings cannot be checked", out,
                           STAGE_FILE)
        elif changes := _setting_changes(info, record):
            raise StageInputError(
                f"--resume: {checkpoint} was written by a run with other settings: {'; '.join(changes)}. "
                "Resume with the same settings, or pass --overwrite to start over")
        checked = f"its settings match {out / STAGE_FILE}" if info is not None else "settings not checked"
        print(f"[lte] {record['stage']}: resuming from {checkpoint} ({checked})", flush=True)
        return checkpoint
    if finished:
        changes = _setting_changes(info, record)
        how = "with the same settings" if not changes else f"with other settings ({'; '.join(changes)})"
        raise StageInputError(f"{out} already holds a finished {label} run {how}; pass --overwrite to replace it, "
                              "or choose another --out")
    if checkpoint is not None:
        raise StageInputError(f"{out} holds {Path(checkpoint).name} of an interrupted run: pass --resume to "
                              "continue it, or --overwrite to start over")
    if info is None and _holds_model(out):
        raise StageInputError(f"{out} already holds a saved model; pass --overwrite to replace it, or choose "
                              "another --out")
    return None


def drop_checkpoints(out: Path) -> None:
    """Remove the checkpoint-N folders (weights + optimizer state) of a finished stage."""
    import shutil

    for path in out.glob("checkpoint-*"):
        if path.is_dir():
            shutil.rmtree(path)

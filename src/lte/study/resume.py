"""A study unit that is stopped mid-training keeps what it trained, and its next run continues it.

A parallel study stops its workers at the time limit with SIGTERM (`lte.study.parallel`). A worker
catches it (`install_stop_handler`): its training run ends at the end of the current optimizer
step with a `checkpoint-N` (`lte.training.StopOnRequest`), and the worker exits without a point.
When the unit runs again with the same settings, training resumes from that checkpoint (weights,
optimizer, schedule, RNG, step), so a point that needs more than one call's time still finishes.

Each trained run folder records the fingerprint of the point's settings (`resume.json`); a
checkpoint is resumed only under the same fingerprint, and a stale one is removed.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..training.callbacks import StopOnRequest, install_stop_handler, newest_checkpoint
from ..training.errors import TrainingStopped

logger = logging.getLogger(__name__)

RESUME_FILE = "resume.json"
#: Seconds a unit trained in its earlier, stopped runs (one call's time limit can cut a unit in legs).
ELAPSED_FILE = "elapsed.json"

__all__ = ["ELAPSED_FILE", "RESUME_FILE", "checkpoint_to_resume", "earlier_legs", "install_stop_handler",
           "stop_callbacks"]


def stop_callbacks(stop: threading.Event | None) -> list[Any]:
    """`[StopOnRequest(stop)]` for a worker that can be asked to stop, else `[]`."""
    return [StopOnRequest(stop)] if stop is not None else []


def checkpoint_to_resume(run_dir: Path, key: str | None) -> str | None:
    """The newest `checkpoint-N` of `run_dir` when the run that wrote it had settings `key`, else None.

    Checkpoints of a run with other settings are removed. Records `key` for the run about to start.
    `key` None (a study of model or data objects, whose settings cannot be fingerprinted): nothing
    is resumed.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    record = run_dir / RESUME_FILE
    checkpoint = newest_checkpoint(str(run_dir))
    recorded = None
    if record.is_file():
        try:
            recorded = json.loads(record.read_text()).get("fingerprint")
        except (OSError, ValueError):
            recorded = None
    if checkpoint is not None and (key is None or recorded != key):
        logger.warning("%s: checkpoints of a run with other settings; starting over", run_dir)
        for path in run_dir.glob("checkpoint-*"):
            shutil.rmtree(path, ignore_errors=True)
        checkpoint = None
    record.write_text(json.dumps({"fingerprint": key}))
    if checkpoint is not None:
        logger.info("%s: resuming from %s", run_dir, Path(checkpoint).name)
    return checkpoint


@contextmanager
def earlier_legs(run_dir: Path, key: str | None) -> Iterator[float]:
    """The seconds this unit spent in earlier runs that were stopped, so a resumed point's
    `train_seconds` counts every leg, not only the last.

    Yields them (0 when no earlier leg with settings `key` left a checkpoint under `run_dir` to go
    on from); a run stopped inside the block adds its own seconds to `ELAPSED_FILE` before the stop
    goes on.
    """
    record = run_dir / ELAPSED_FILE
    earlier = 0.0
    if record.is_file() and key is not None and any(run_dir.rglob("checkpoint-*")):
        try:
            data = json.loads(record.read_text())
            earlier = float(data["seconds"]) if data.get("fingerprint") == key else 0.0
        except (OSError, ValueError, KeyError, TypeError):
            earlier = 0.0
    start = time.perf_counter()
    try:
        yield earlier
    except TrainingStopped:
        run_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"fingerprint": key, "seconds": earlier + time.perf_counter() - start}))
        raise

"""Errors raised by the training pipeline (all subclasses of `lte.LTEError`)."""

from __future__ import annotations

from lte.errors import LTEError

__all__ = ["LTEError", "NonFiniteLossError", "StageInputError", "TrainingStopped"]


class StageInputError(LTEError):
    """The input of a training stage (model, data, task, previous stage) is not usable."""


class NonFiniteLossError(LTEError):
    """Training met a NaN/inf loss or gradient and stopped; `last_checkpoint` is the last good one."""

    def __init__(self, message: str, step: int | None = None, last_checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


class TrainingStopped(LTEError):
    """Training was asked to stop (`StopOnRequest`) and saved a checkpoint at `step`: not finished."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step

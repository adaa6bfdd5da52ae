"""Training: `LTETrainer` (HF Trainer subclass), callbacks, and the stage helper `train_stage`.

    from lte.training import train_stage
    train_stage("dense", "smollm2-135m", "causal-lm", "builtin", "runs/dense", max_steps=50)
    train_stage("1", "runs/dense", "causal-lm", "builtin", "runs/s1", target_sparsity=0.5)
    train_stage("2", "runs/s1", "causal-lm", "builtin", "runs/s2")

Names are imported on first use, so `import lte.training` (and `lte --help`) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EtaController": "lte.training.callbacks",
    "JsonlLogger": "lte.training.callbacks",
    "NaNGuard": "lte.training.callbacks",
    "NonFiniteLossError": "lte.training.errors",
    "StageInputError": "lte.training.errors",
    "StopOnRequest": "lte.training.callbacks",
    "install_stop_handler": "lte.training.callbacks",
    "TrainingStopped": "lte.training.errors",
    "TrainArgs": "lte.training.args",
    "finetune": "lte.training.finetune",
    "STAGES": "lte.training.stages",
    "TASKS": "lte.training.stages",
    "is_stage_complete": "lte.training.outputs",
    "stage_info": "lte.training.outputs",
    "train_stage": "lte.training.stages",
    "LTETrainer": "lte.training.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lte.training' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__

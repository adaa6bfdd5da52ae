"""Training: `LTETrainer` (HF Trainer subclass), callbacks, and the stage helper `train_stage`.

    from lte.training import train_stage
    train_stage("dense", "smollm2-135m", "causal-lm", "builtin", "runs/dense", max_steps=50)
    train_stage("1", "runs/dense", "causal-lm", "builtin", "runs/s1", target_sparsity=0.5)
    train_stage("2", "runs/s1", "causal-lm", "builtin", "runs/s2")
"""

from lte.training.callbacks import EtaController, JsonlLogger, NaNGuard
from lte.training.errors import NonFiniteLossError, StageInputError
from lte.training.stages import STAGES, TASKS, TrainArgs, is_stage_complete, stage_info, train_stage
from lte.training.trainer import LTETrainer

__all__ = [
    "EtaController",
    "JsonlLogger",
    "LTETrainer",
    "NaNGuard",
    "NonFiniteLossError",
    "STAGES",
    "StageInputError",
    "TASKS",
    "TrainArgs",
    "is_stage_complete",
    "stage_info",
    "train_stage",
]

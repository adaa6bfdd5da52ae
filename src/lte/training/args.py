"""`TrainArgs`: the settings of one training stage (kept light: the CLI builds its flags from it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lte.training.errors import StageInputError

__all__ = ["TrainArgs"]


@dataclass
class TrainArgs:
    """Hyper-parameters of one stage. Defaults follow method.md section 6 where it says anything.

    Names match the CLI flags (`--batch-size` -> batch_size) and the YAML config keys.
    """

    # data
    glue_task: str | None = None  # GLUE task name for --task classification (SST-2, MRPC, ...)
    block_size: int = 512  # causal LM: tokens per packed block
    max_tokens: int | None = None  # causal LM: keep only the first tokens of the data
    text_field: str = "text"  # causal LM: the field of JSON/JSONL records that holds the text
    max_length: int = 128  # classification / instruction: truncation length
    max_examples: int | None = None  # classification / instruction: keep only the first examples
    # optimisation (AdamW, linear decay)
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = 5e-5
    router_lr: float | None = None  # routers' own learning rate (stage 1); None = lr
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool | None = None  # None: bf16 autocast when CUDA supports it
    seed: int = 0
    # checkpoints and logs
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    report_to: str = "auto"  # "auto": tensorboard when installed; "none"; or a Trainer integration name
    progress: bool = True
    resume: bool = False
    dataloader_workers: int = 0
    # LTE (stage 1 conversion and losses)
    eta: float = 0.5
    lam: float = 0.5
    tau: float = 0.5
    expert_size: int = 32
    grouping: str = "kmeans"
    router_init: str = "auto"  # stage-1 router init: "auto" (fit when target_sparsity is set, else none) |
    # "fit" (regressed on the model's own expert activations; see stages.fit_routers) | "none" | "scale" | "open"
    calibration_examples: int = 32  # examples in the router-fit calibration batch
    router_open_logit: float = 3.0  # "open": mean starting logit (sigmoid(3) = 0.95: every expert ~on)
    router_logit_std: float = 0.5  # "open": per-expert spread of the logits; "scale": their std
    loss_to_model: bool = False  # let L_eff/L_sep gradients reach the model weights too (LTEConfig.loss_to_model)
    lam_warmup: float = 0.0  # stage 1: ramp lam up over this fraction of the steps (0 = paper: constant)
    target_sparsity: float | None = None  # stage 1: steer eta to this FFN sparsity (EtaController)
    controller_kp: float = 2.0
    controller_ki: float = 0.3
    controller_smoothing: float = 0.6
    controller_warmup: int = 0
    eta_max: float = 100.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainArgs:
        known = {f.name for f in dataclasses.fields(cls)}
        clean = {k.replace("-", "_"): v for k, v in values.items() if v is not None}
        unknown = sorted(set(clean) - known)
        if unknown:
            raise StageInputError(f"unknown training setting(s) {unknown}; valid ones are {sorted(known)}")
        return cls(**clean)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

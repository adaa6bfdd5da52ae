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
    # "fit" (regressed on the model's own expert activations, every layer at the target; routing.fit.fit_routers) |
    # "fit-global" (the same, one threshold over all layers on each expert's share of its FFN's output,
    # so layers start at different sparsities) | "none" | "scale" | "open"
    calibration_examples: int = 32  # examples in the router-fit calibration batch
    router_open_logit: float = 3.0  # "open": mean starting logit (sigmoid(3) = 0.95: every expert ~on)
    router_logit_std: float = 0.5  # "open": per-expert spread of the logits; "scale": their std
    loss_to_model: bool = False  # let L_eff/L_sep gradients reach the model weights too (LTEConfig.loss_to_model)
    lam_warmup: float = 0.0  # stage 1: ramp lam up over this fraction of the steps (0 = paper: constant)
    stage1_routing: str = "soft"  # stage 1: "soft" (paper: experts scaled by G) | "ste" (ours: the hard mask in
    # the forward, the sigmoid's gradient for the routers: the model trains on the function it is served with)
    distill: float = 0.0  # weight of distillation from the dense teacher: (1-distill)*task + distill*KD (0 = paper)
    distill_temperature: float = 1.0
    teacher: str | None = None  # teacher folder for distill (default: the dense model the LTE run started from)
    calibrate_tau: bool = False  # end of stage 1: set tau so the hard-mask sparsity on held-out examples of the
    # training data equals target_sparsity (the examples are kept out of training)
    calibration_holdout: int = 64  # examples held out of stage-1 training for calibrate_tau
    target_sparsity: float | None = None  # stage 1: steer eta to this FFN sparsity (EtaController)
    controller_kp: float = 2.0
    controller_ki: float = 0.3
    controller_smoothing: float = 0.6
    controller_warmup: int = 0
    eta_max: float = 100.0

    def __post_init__(self) -> None:
        if self.stage1_routing not in ("soft", "ste"):
            raise StageInputError(f"stage1_routing must be 'soft' or 'ste', got {self.stage1_routing!r}")
        if not 0.0 <= self.distill <= 1.0:
            raise StageInputError(f"distill is a weight in [0, 1] (0: task loss only), got {self.distill}")
        if self.distill_temperature <= 0:
            raise StageInputError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.target_sparsity is not None and not 0.0 <= self.target_sparsity < 1.0:
            raise StageInputError(f"target_sparsity is a fraction of FFN neurons in [0, 1), got {self.target_sparsity}")
        if self.calibrate_tau and self.target_sparsity is None:
            raise StageInputError("calibrate_tau needs target_sparsity (the sparsity tau is calibrated to)")
        if self.calibration_holdout < 1:
            raise StageInputError(f"calibration_holdout must be >= 1 example, got {self.calibration_holdout}")

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

"""`TrainArgs`: the settings of one training stage, and the `transformers.TrainingArguments` they make.

The LTE method's own settings are an embedded `lte.LTEConfig` (`args.lte`), so each lives in one
place; its user-facing fields (`LTE_KEYS`: eta, lam, tau, expert_size, grouping, loss_to_model)
are written flat in YAML configs, `--set` overrides and flags, as before. Every field carries its
help text in its metadata; `lte train --help` is built from it (`setting_fields`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lte.config import LTEConfig
from lte.training.errors import StageInputError

__all__ = ["LTE_KEYS", "TrainArgs", "setting_fields", "training_arguments", "use_bf16"]

#: `LTEConfig` fields a stage's settings (YAML, flags) name directly, without the `lte.` prefix.
LTE_KEYS = ("eta", "lam", "tau", "expert_size", "grouping", "loss_to_model")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainArgs:
    """Hyper-parameters of one stage. Defaults follow method.md section 6 where it says anything.

    Names match the CLI flags (`--batch-size` -> batch_size) and the YAML config keys.
    """

    # data
    glue_task: str | None = field(default=None, metadata=_help(
        "GLUE task for --task classification: SST-2, MRPC, RTE, CoLA, STS-B, ..."))
    block_size: int = field(default=512, metadata=_help("causal LM: tokens per packed training block"))
    max_tokens: int | None = field(default=None, metadata=_help("causal LM: use only the first N tokens of the data"))
    text_field: str = field(default="text", metadata=_help(
        "causal LM: the field of JSON/JSONL records that holds the text"))
    max_length: int = field(default=128, metadata=_help("classification/instruction: truncate examples to N tokens"))
    max_examples: int | None = field(default=None, metadata=_help(
        "classification/instruction: keep only the first N examples"))
    # optimisation (AdamW, linear decay)
    epochs: float = field(default=1.0, metadata=_help("training epochs (float)"))
    max_steps: int = field(default=-1, metadata=_help("optimizer steps (> 0 overrides --epochs)"))
    lr: float = field(default=5e-5, metadata=_help("learning rate (AdamW, linear decay)"))
    router_lr: float | None = field(default=None, metadata=_help(
        "stage 1: learning rate of the routers (default: --lr)"))
    batch_size: int = field(default=8, metadata=_help("per-device batch size"))
    grad_accum: int = field(default=1, metadata=_help("gradient accumulation steps"))
    warmup_ratio: float = field(default=0.06, metadata=_help("fraction of the steps with a linear learning-rate warm-up"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay (routers: none)"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm"))
    bf16: bool | None = field(default=None, metadata=_help("bf16 mixed precision (default: on when CUDA supports it)"))
    seed: int = field(default=0, metadata=_help("seed of training, grouping and router init"))
    # checkpoints and logs
    save_steps: int = field(default=500, metadata=_help("write checkpoint-N every N steps (resume with --resume)"))
    save_total_limit: int | None = field(default=2, metadata=_help("checkpoints kept (the oldest are deleted)"))
    logging_steps: int = field(default=10, metadata=_help("steps between log records"))
    report_to: str = field(default="auto", metadata=_help(
        "'auto' (TensorBoard when installed), 'none', or a Trainer integration"))
    progress: bool = field(default=True, metadata=_help("progress bars"))
    resume: bool = field(default=False, metadata=_help("continue from the newest checkpoint-N in the output folder"))
    dataloader_workers: int = field(default=0, metadata=_help("data loader worker processes"))
    save_model: bool = field(default=True, metadata=_help(
        "write the trained model to the output folder at the end (no: only the stage record and logs, for "
        "pipelines that keep the model in memory, such as the study)"))
    # the LTE method: conversion (stage 1) and losses
    lte: LTEConfig = field(default_factory=LTEConfig, metadata=_help(
        "the LTE method's settings (lte.LTEConfig); its fields " + ", ".join(LTE_KEYS) + " are set by name"))
    router_init: str = field(default="auto", metadata=_help(
        "stage-1 router init: auto (fit when --target-sparsity is set, else none) | fit (regressed on the model's "
        "own expert activations, every layer at the target; lte.routing.fit.fit_routers) | fit-global (the same, "
        "one threshold over all layers on each expert's share of its FFN's output, so layers start at different "
        "sparsities) | none | scale | open"))
    calibration_examples: int = field(default=32, metadata=_help("examples in the router-init calibration batch"))
    router_open_logit: float = field(default=3.0, metadata=_help(
        "router init open: mean starting logit (sigmoid(3) = 0.95: every expert about on); fit: the logit scale"))
    router_logit_std: float = field(default=0.5, metadata=_help(
        "router init open: per-expert spread of the logits; scale: their std"))
    lam_warmup: float = field(default=0.0, metadata=_help(
        "stage 1: ramp lam up over this fraction of the steps (0 = paper: constant)"))
    stage1_routing: str = field(default="soft", metadata=_help(
        "stage 1: 'soft' (paper: experts scaled by their score) or 'ste' (ours: the hard mask in the forward, "
        "the sigmoid's gradient for the routers)"))
    distill: float = field(default=0.0, metadata=_help(
        "weight of distillation from the dense model, in [0, 1]: (1-w)*task + w*KL(dense || LTE) (0 = paper)"))
    distill_temperature: float = field(default=1.0, metadata=_help("softmax temperature of the distillation loss"))
    teacher: str | None = field(default=None, metadata=_help(
        "dense teacher folder for --distill (default: the dense model the LTE run started from)"))
    calibrate_tau: bool = field(default=False, metadata=_help(
        "end of stage 1: set tau so the hard-mask sparsity on held-out training examples equals --target-sparsity "
        "(the examples are kept out of training)"))
    calibration_holdout: int = field(default=64, metadata=_help(
        "examples of the training data held out of stage 1 for --calibrate-tau"))
    target_sparsity: float | None = field(default=None, metadata=_help(
        "stage 1: steer eta on the fly so the FFN sparsity ends near this value (0-1)"))
    controller_kp: float = field(default=2.0, metadata=_help("eta controller: proportional gain (log-eta per unit)"))
    controller_ki: float = field(default=0.3, metadata=_help("eta controller: integral gain"))
    controller_smoothing: float = field(default=0.6, metadata=_help(
        "eta controller: EMA factor of the measured sparsity"))
    controller_warmup: int = field(default=0, metadata=_help("eta controller: steps before the first update"))
    eta_max: float = field(default=100.0, metadata=_help("eta controller: largest eta"))

    def __post_init__(self) -> None:
        if isinstance(self.lte, dict):
            self.lte = LTEConfig.from_dict(self.lte)
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
        """From flat settings (`batch_size`, `eta`, ...; dashes allowed), `lte` as a dict or an LTEConfig."""
        known = {f.name for f in dataclasses.fields(cls)}
        clean = {k.replace("-", "_"): v for k, v in values.items() if v is not None}
        unknown = sorted(set(clean) - known - set(LTE_KEYS))
        if unknown:
            raise StageInputError(f"unknown training setting(s) {unknown}; valid ones are {sorted(known | set(LTE_KEYS))}")
        lte = clean.pop("lte", None)
        lte = lte.to_dict() if isinstance(lte, LTEConfig) else dict(lte or {})
        lte.update({k: clean.pop(k) for k in LTE_KEYS if k in clean})
        return cls(**clean, lte=LTEConfig.from_dict(lte))

    def to_dict(self) -> dict[str, Any]:
        """Flat settings, as `from_dict` reads them (the LTE_KEYS at top level, the rest of the LTEConfig under `lte`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "lte"}
        lte = self.lte.to_dict()
        out.update({k: lte.pop(k) for k in LTE_KEYS})
        out["lte"] = lte
        return out


def setting_fields() -> list[tuple[str, Any, Any, str]]:
    """(name, type, default, help) of every flat stage setting: TrainArgs' own fields and the LTE_KEYS.

    `type` is the plain type (`int` for `int | None`). The CLI builds one flag per entry.
    """
    def row(cls: type, f: dataclasses.Field, defaults: Any) -> tuple[str, Any, Any, str]:
        hint = typing.get_type_hints(cls)[f.name]
        return f.name, _plain_type(hint), getattr(defaults, f.name), f.metadata.get("help", "")

    lte_fields = {f.name: f for f in dataclasses.fields(LTEConfig)}
    rows = []
    for f in dataclasses.fields(TrainArgs):
        if f.name == "lte":  # the LTE method's settings, by name, where the config sits
            rows += [row(LTEConfig, lte_fields[name], LTEConfig()) for name in LTE_KEYS]
        else:
            rows.append(row(TrainArgs, f, TrainArgs()))
    return rows


def _plain_type(hint: Any) -> Any:
    """`int | None` -> int; other hints unchanged."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


# ---------------------------------------------------------------------- transformers.TrainingArguments
def _report_to(hp: TrainArgs) -> list[str]:
    if hp.report_to == "auto":
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") or importlib.util.find_spec(
            "tensorboardX") else []
    return [] if hp.report_to in ("none", "", None) else [hp.report_to]


def use_bf16(hp: TrainArgs) -> bool:
    if hp.bf16 is not None:
        return bool(hp.bf16) and torch.cuda.is_available()
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def training_arguments(out: Path, hp: TrainArgs):
    """`transformers.TrainingArguments` for one stage."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps if hp.max_steps and hp.max_steps > 0 else -1,
        learning_rate=hp.lr,
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.grad_accum,
        weight_decay=hp.weight_decay,
        warmup_steps=hp.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type="linear",
        optim="adamw_torch",
        max_grad_norm=hp.max_grad_norm,
        bf16=use_bf16(hp),
        seed=hp.seed,
        data_seed=hp.seed,
        save_strategy="steps",
        save_steps=hp.save_steps,
        save_total_limit=hp.save_total_limit,
        logging_strategy="steps",
        logging_steps=hp.logging_steps,
        report_to=_report_to(hp),
        disable_tqdm=not hp.progress,
        remove_unused_columns=False,
        dataloader_num_workers=hp.dataloader_workers,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding",  # the budget a study reports (tokens, not only steps)
    )

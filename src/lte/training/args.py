"""`TrainArgs`: the settings of one training stage, and the `transformers.TrainingArguments` they make.

The LTE method's own settings are an embedded `lte.LTEConfig` (`args.lte`), so each lives in one
place; its user-facing fields (`LTE_KEYS`: eta, lam, tau, expert_size, grouping, loss_to_model)
are written flat in YAML configs, `--set` overrides and flags, as before. Every field carries its
help text in its metadata; `lte train --help` is built from it (`setting_fields`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lte.config import LTEConfig
from lte.errors import LTEError
from lte.training.errors import StageInputError

__all__ = ["LTE_KEYS", "TrainArgs", "check_setting", "setting_fields", "training_arguments", "use_bf16"]

#: `LTEConfig` fields a stage's settings (YAML, flags) name directly, without the `lte.` prefix.
LTE_KEYS = ("eta", "lam", "tau", "expert_size", "grouping", "loss_to_model")


def _help(text: str, **rule: Any) -> dict[str, Any]:
    """Field metadata: the help text, and the rule a value must follow (`check_setting`).

    Rules: `at_least` / `above` (lower bound, inclusive / exclusive), `below` / `at_most` (upper
    bound), `choices` (allowed strings), `meaning` (said in the error); `None` always passes (not set).
    """
    return {"help": text, **rule}


@dataclass
class TrainArgs:
    """Hyper-parameters of one stage. Defaults follow method.md section 6 where it says anything.

    Names match the CLI flags (`--batch-size` -> batch_size) and the YAML config keys.
    """

    # data
    glue_task: str | None = field(default=None, metadata=_help(
        "GLUE task for --task classification: SST-2, MRPC, RTE, CoLA, STS-B, ..."))
    block_size: int = field(default=512, metadata=_help("causal LM: tokens per packed training block", at_least=2))
    max_tokens: int | None = field(default=None, metadata=_help(
        "causal LM: use only the first N tokens of the data", at_least=2))
    text_field: str = field(default="text", metadata=_help(
        "causal LM: the field of JSON/JSONL records that holds the text"))
    max_length: int = field(default=128, metadata=_help(
        "classification/instruction: truncate examples to N tokens", at_least=2))
    max_examples: int | None = field(default=None, metadata=_help(
        "classification/instruction: keep only the first N examples", at_least=1))
    # optimisation (AdamW, linear decay)
    epochs: float = field(default=1.0, metadata=_help("training epochs (float)", above=0))
    max_steps: int = field(default=-1, metadata=_help("optimizer steps (> 0 overrides --epochs; -1: use --epochs)",
                                                       at_least=-1))
    lr: float = field(default=5e-5, metadata=_help("learning rate (AdamW, linear decay)", above=0))
    router_lr: float | None = field(default=None, metadata=_help(
        "stage 1: learning rate of the routers (default: --lr)", above=0))
    batch_size: int = field(default=8, metadata=_help("per-device batch size", at_least=1))
    grad_accum: int = field(default=1, metadata=_help("gradient accumulation steps", at_least=1))
    warmup_ratio: float = field(default=0.06, metadata=_help(
        "fraction of the steps with a linear learning-rate warm-up", at_least=0, below=1))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay (routers: none)", at_least=0))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm (0: no clipping)", at_least=0))
    bf16: bool | None = field(default=None, metadata=_help("bf16 mixed precision (default: on when CUDA supports it)"))
    seed: int = field(default=0, metadata=_help("seed of training, grouping and router init"))
    # checkpoints and logs
    save_steps: int = field(default=500, metadata=_help(
        "write checkpoint-N every N steps while the stage runs (resume with --resume)", at_least=1))
    save_total_limit: int | None = field(default=2, metadata=_help(
        "checkpoints kept while the stage runs (the oldest are deleted)", at_least=1))
    logging_steps: int = field(default=10, metadata=_help("steps between log records", at_least=1))
    report_to: str = field(default="auto", metadata=_help(
        "'auto' (TensorBoard when installed), 'none', or a Trainer integration"))
    progress: bool = field(default=True, metadata=_help("progress bars"))
    resume: bool = field(default=False, metadata=_help(
        "continue an interrupted run from the newest checkpoint-N in the output folder (its recorded settings must "
        "match)"))
    overwrite: bool = field(default=False, metadata=_help(
        "replace what the output folder holds (a finished stage, or checkpoints of an interrupted run)"))
    keep_checkpoints: bool = field(default=False, metadata=_help(
        "keep the checkpoint-N folders (model + optimizer state) once the stage has finished; by default only "
        "the final model is kept"))
    dataloader_workers: int = field(default=0, metadata=_help("data loader worker processes", at_least=0))
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
        "sparsities) | none | scale | open", choices=("auto", "fit", "fit-global", "none", "scale", "open")))
    calibration_examples: int = field(default=32, metadata=_help(
        "examples in the router-init calibration batch (expert grouping, router fit); see --calibration-tokens",
        at_least=1))
    calibration_tokens: int = field(default=0, metadata=_help(
        "instead of --calibration-examples: the fewest examples that hold this many tokens (at least --batch-size), "
        "so the calibration batch does not shrink with short examples (E2E's first 32 hold 1,326 tokens; 256 "
        "examples, 14,076 tokens, were worth +11.8 ROUGE-L at 90 percent sparsity: docs/results.md). 0 = off", at_least=0))
    calibration_sample: str = field(default="first", metadata=_help(
        "which examples make the stage-1 calibration batch (expert grouping, router fit): first (the data's first "
        "examples) | spread (evenly spaced over the training part, the tau hold-out left out)",
        choices=("first", "spread")))
    router_open_logit: float = field(default=3.0, metadata=_help(
        "router init open: mean starting logit (sigmoid(3) = 0.95: every expert about on); fit: the logit scale"))
    router_logit_std: float = field(default=0.5, metadata=_help(
        "router init open: per-expert spread of the logits; scale: their std", above=0))
    lam_warmup: float = field(default=0.0, metadata=_help(
        "stage 1: ramp lam up over this fraction of the steps (0 = paper: constant)", at_least=0, at_most=1))
    stage1_routing: str = field(default="ste", metadata=_help(
        "stage 1: 'ste' (default: the hard mask in the forward, the sigmoid's gradient for the routers) or 'soft' "
        "(the paper: experts scaled by their score)", choices=("soft", "ste")))
    distill: float = field(default=0.0, metadata=_help(
        "weight of distillation from the dense model, in [0, 1]: (1-w)*task + w*KL(dense || LTE) (0 = paper)",
        at_least=0, at_most=1))
    distill_hidden: float = field(default=0.0, metadata=_help(
        "weight of matching every layer's hidden states to the dense teacher's (relative squared error, added "
        "to the loss; 0 = off)", at_least=0))
    distill_temperature: float = field(default=1.0, metadata=_help(
        "softmax temperature of the distillation loss", above=0))
    teacher: str | None = field(default=None, metadata=_help(
        "dense teacher folder for --distill (default: the dense model the LTE run started from)"))
    calibrate_tau: bool | None = field(default=None, metadata=_help(
        "end of stage 1: set tau so the hard-mask sparsity on held-out training examples equals --target-sparsity "
        "(the examples are kept out of training); default: on when --target-sparsity is set"))
    recalibrate_tau: bool | None = field(default=None, metadata=_help(
        "stage 2 with --target-sparsity: set tau again after training, on the same held-out examples (training "
        "the weights moves the routers' inputs, so the sparsity drifts from where stage 2 started); default: on "
        "(without it WikiText-2 ended 4.5-4.8 points past a 0.9 target, LoRA on SST-2 2-4 points past 0.7)"))
    tau_scope: str = field(default="global", metadata=_help(
        "what the tau calibrations (--calibrate-tau, --recalibrate-tau, --hold-target-every) set: 'global' (one "
        "threshold for every layer; the per-layer profile training learned stays) or 'layer' (one per layer, "
        "each layer skipping the target share: no layer can end far sparser than the rest)",
        choices=("global", "layer")))
    hold_target_every: int = field(default=0, metadata=_help(
        "stage 2 with --target-sparsity: set tau again every N optimizer steps on the held-out examples, so the "
        "model trains at the target sparsity instead of where the drift takes it (WikiText-2 at 0.9 drifted to "
        "0.94-0.95 during stage 2; --recalibrate-tau only brings the end back). 0 = off", at_least=0))
    sparsity_ramp: int = field(default=0, metadata=_help(
        "stage 2 with --hold-target-every: over the first N optimizer steps the sparsity the re-cuts set tau to "
        "rises linearly from --sparsity-ramp-start times the target to the target (the stage's first cut at the "
        "start), so the weights meet the target's masks gradually, as gradual pruning does; from step N on the "
        "target is held. 0 = off (the target from the first step)", at_least=0))
    sparsity_ramp_start: float = field(default=0.5, metadata=_help(
        "where --sparsity-ramp starts, as a fraction of the target", at_least=0, at_most=1))
    batch_budget: float = field(default=0.0, metadata=_help(
        "stage 2: a per-batch expert budget in training. At each position the sequences of a batch together keep at "
        "most this fraction of each layer's experts (those with the largest summed router score; with "
        "--stage2-routing topk each token then takes its k best among them), as a served "
        "decode step of that batch does with `lte generate --expert-budget round(fraction x experts)`; train "
        "with --batch-size set to the decode batch size. 0 = off", at_least=0, below=1))
    stage2_routing: str = field(default="hard", metadata=_help(
        "stage 2: 'hard' (default, the paper: each token keeps the experts whose score passes tau) or 'topk' (ours: "
        "after the re-cut at --target-sparsity each layer keeps a fixed number of experts per token, as many as its "
        "thresholds kept on the held-out examples; the masks cannot drift as the weights move, and the model is "
        "saved, evaluated and served in topk routing)", choices=("hard", "topk")))
    calibration_holdout: int = field(default=64, metadata=_help(
        "examples of the training data held out of stage 1 for --calibrate-tau", at_least=1))
    target_sparsity: float | None = field(default=None, metadata=_help(
        "stages 1 and 2: the wanted FFN sparsity, a fraction in [0, 1). Stage 1 steers eta on the fly to reach it; "
        "stage 2 re-cuts tau on held-out examples to hit it (the routers stay frozen)", at_least=0, below=1,
        meaning="the fraction of FFN neurons each token skips: 0.5 skips half"))
    controller_kp: float = field(default=2.0, metadata=_help(
        "eta controller: proportional gain (log-eta per unit)", at_least=0))
    controller_ki: float = field(default=0.3, metadata=_help("eta controller: integral gain", at_least=0))
    controller_smoothing: float = field(default=0.6, metadata=_help(
        "eta controller: EMA factor of the measured sparsity", at_least=0, below=1))
    controller_warmup: int = field(default=0, metadata=_help(
        "eta controller: steps before the first update", at_least=0))
    eta_max: float = field(default=100.0, metadata=_help("eta controller: largest eta", above=0))
    tau_gain: float = field(default=0.0, metadata=_help(
        "stage 1 with --target-sparsity: the controller also moves tau by this much per unit of sparsity error "
        "each step, holding the hard-mask sparsity at the target while the routers learn (0 = tau stays, the paper)",
        at_least=0))
    # adapters: LoRA (the peft library) on a frozen base
    peft: str | None = field(default=None, metadata=_help(
        "stage 1: 'lora' trains LoRA adapters (peft) on the attention and FFN projections with the routers, "
        "the base frozen (loaded in bf16 on a bf16 GPU); stage 2 keeps training a stage-1 output's adapters. "
        "Saves hold routers, permutations and adapters only and load onto the base by its recorded path",
        choices=("lora", "none")))
    lora_r: int = field(default=16, metadata=_help("LoRA rank", at_least=1))
    lora_alpha: float | None = field(default=None, metadata=_help(
        "LoRA alpha: updates are scaled by alpha / r (default 2 x rank)", above=0))
    lora_dropout: float = field(default=0.0, metadata=_help("dropout on the LoRA input", at_least=0, below=1))
    lora_targets: str | None = field(default=None, metadata=_help(
        "LoRA targets: all (the family's attention and FFN projections), attention, ffn, or comma-separated "
        "module names (default all)"))
    base_model: str | None = field(default=None, metadata=_help(
        "a model folder with adapters (light save): its base model (default: the path the folder records)"))
    gradient_checkpointing: bool = field(default=False, metadata=_help(
        "recompute activations in the backward pass: less memory, slower steps"))
    torch_compile: bool = field(default=False, metadata=_help(
        "compile the model with torch.compile (the Trainer's torch_compile): fewer kernel launches per step, "
        "which is what bounds the steps of small models on a GPU; the first step pays the compile"))
    torch_compile_mode: str | None = field(default=None, metadata=_help(
        "torch.compile's mode (implies --torch-compile; default: torch's): reduce-overhead replays forward and "
        "backward as CUDA graphs, for steps bound by the host's launches", choices=("default", "reduce-overhead",
                                                                                    "max-autotune")))

    def stage2_target(self, step: int) -> float | None:
        """The sparsity stage 2's tau cuts aim at after `step` optimizer steps (`sparsity_ramp`)."""
        if self.target_sparsity is None or not self.sparsity_ramp or step >= self.sparsity_ramp:
            return self.target_sparsity
        start = self.sparsity_ramp_start
        return self.target_sparsity * (start + (1.0 - start) * step / self.sparsity_ramp)

    def __post_init__(self) -> None:
        if isinstance(self.lte, dict):
            self.lte = LTEConfig.from_dict(self.lte)
        for f in dataclasses.fields(self):
            if f.name != "lte":
                check_setting(f.name, getattr(self, f.name))
        if self.tau_gain and self.target_sparsity is None:
            raise StageInputError("tau_gain needs target_sparsity (the sparsity the controller holds tau at)")
        if self.calibrate_tau is None:  # the default: calibrate whenever there is a target to calibrate to
            self.calibrate_tau = self.target_sparsity is not None
        if self.hold_target_every and self.target_sparsity is None:
            raise StageInputError("hold_target_every needs target_sparsity (the sparsity tau is held at)")
        if self.tau_scope != "global" and self.target_sparsity is None:
            raise StageInputError("tau_scope 'layer' needs target_sparsity (the sparsity each layer is calibrated to)")
        if self.stage2_routing == "topk" and self.target_sparsity is None:
            raise StageInputError("stage2_routing 'topk' needs target_sparsity (the sparsity each layer's expert count "
                                  "is set from)")
        if self.sparsity_ramp and not self.hold_target_every:
            raise StageInputError("sparsity_ramp raises the target at the re-cuts of hold_target_every: set "
                                  "hold_target_every too (e.g. every 5-25 steps)")
        if self.stage2_routing == "topk" and self.hold_target_every:
            raise StageInputError("stage2_routing 'topk' keeps a fixed number of experts per token: a held tau "
                                  "(hold_target_every) does not apply; drop it")
        if self.recalibrate_tau and self.target_sparsity is None:
            raise StageInputError("recalibrate_tau needs target_sparsity (the sparsity tau is calibrated to)")
        if self.calibrate_tau and self.target_sparsity is None:
            raise StageInputError("calibrate_tau needs target_sparsity (the sparsity tau is calibrated to)")
        if self.resume and self.overwrite:
            raise StageInputError("resume and overwrite exclude each other: --resume continues the run in the output "
                                  "folder, --overwrite replaces it; pass one")
        if self.peft == "none":
            self.peft = None

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


def _bounds_text(meta: dict[str, Any]) -> str:
    """The allowed range of a field as text: "in [0, 1)", ">= 1", "> 0"."""
    low = ("[", meta["at_least"]) if "at_least" in meta else ("(", meta["above"]) if "above" in meta else None
    high = ("]", meta["at_most"]) if "at_most" in meta else (")", meta["below"]) if "below" in meta else None
    if low and high:
        return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
    return f"{'<=' if high[0] == ']' else '<'} {high[1]:g}"


def _in_bounds(value: float, meta: dict[str, Any]) -> bool:
    return not (("at_least" in meta and value < meta["at_least"]) or ("above" in meta and value <= meta["above"])
                or ("at_most" in meta and value > meta["at_most"]) or ("below" in meta and value >= meta["below"]))


_BOUNDS = ("at_least", "above", "at_most", "below")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """`typing.get_type_hints(cls)`, once per class: it evaluates every annotation string each call (1.8 s of
    every `lte train` start went to it, once per field of every TrainArgs the parser built)."""
    return typing.get_type_hints(cls)


@functools.cache
def _train_fields() -> dict[str, tuple[Any, Any]]:
    """TrainArgs' field name -> (metadata, plain type)."""
    return {f.name: (f.metadata, _plain_type(_hints(TrainArgs)[f.name])) for f in dataclasses.fields(TrainArgs)}


def check_setting(name: str, value: Any) -> None:
    """Raise a one-line `StageInputError` when `value` is not a valid value of the stage setting `name`.

    The rules live in the fields' metadata (`TrainArgs`) or in `LTEConfig.validate` (the LTE_KEYS);
    `TrainArgs.__post_init__` and the `lte train` flags (at parse time) both call this, so Python
    and the command line give the same message. `None` (not set) always passes.
    """
    if value is None:
        return
    if name in LTE_KEYS:
        try:
            LTEConfig(**{name: value})
        except (LTEError, TypeError) as err:
            raise StageInputError(str(err)) from None
        return
    fields = _train_fields()
    if name not in fields:
        raise StageInputError(f"unknown training setting '{name}'")
    meta, kind = fields[name]
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                 or (kind is int and not float(value).is_integer())):
        raise StageInputError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if kind is bool and not isinstance(value, bool):
        raise StageInputError(f"{name} must be true or false, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise StageInputError(f"{name} must be one of {', '.join(meta['choices'])}; got {value!r}")
    if any(key in meta for key in _BOUNDS) and not _in_bounds(float(value), meta):
        meaning = f" ({meta['meaning']})" if "meaning" in meta else ""
        raise StageInputError(f"{name} must be {_bounds_text(meta)}{meaning}, got {value:g}")
    if name == "glue_task":
        from lte.data import glue_task

        glue_task(value)  # a DataError naming the valid tasks


def setting_fields() -> list[tuple[str, Any, Any, str]]:
    """(name, type, default, help) of every flat stage setting: TrainArgs' own fields and the LTE_KEYS.

    `type` is the plain type (`int` for `int | None`). The CLI builds one flag per entry.
    """
    def row(cls: type, f: dataclasses.Field, defaults: Any) -> tuple[str, Any, Any, str]:
        return f.name, _plain_type(_hints(cls)[f.name]), getattr(defaults, f.name), f.metadata.get("help", "")

    lte_fields = {f.name: f for f in dataclasses.fields(LTEConfig)}
    lte_defaults, train_defaults = LTEConfig(), TrainArgs()
    rows = []
    for f in dataclasses.fields(TrainArgs):
        if f.name == "lte":  # the LTE method's settings, by name, where the config sits
            rows += [row(LTEConfig, lte_fields[name], lte_defaults) for name in LTE_KEYS]
        else:
            rows.append(row(TrainArgs, f, train_defaults))
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
        torch_compile=hp.torch_compile or hp.torch_compile_mode is not None,
        **({"torch_compile_mode": hp.torch_compile_mode} if hp.torch_compile_mode else {}),
        **_checkpointing(hp, TrainingArguments),
    )


def _checkpointing(hp: TrainArgs, cls: type) -> dict[str, Any]:
    """Activation (gradient) checkpointing settings under the name this transformers uses, when asked for.

    Non-reentrant: gradients reach adapters inside checkpointed blocks of a frozen base.
    """
    if not hp.gradient_checkpointing:
        return {}
    name = "activation_checkpointing" if "activation_checkpointing" in cls.__dataclass_fields__ else \
        "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}

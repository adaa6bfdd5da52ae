"""The three training stages as one function: `train_stage("dense" | "1" | "2", ...)`.

- dense: fine-tune a plain HF model on the task (the paper groups an already fine-tuned model);
- 1: group the neurons of the dense model (`lte.get_lte_model`), soft routing, train all
  parameters and the routers with task + eta*L_eff + lam*L_sep (optionally steering eta to a
  target sparsity with `EtaController`);
- 2: load a stage-1 output, freeze the routers, hard routing, task loss only.

Each stage writes a directory loadable on its own (`lte.load_model`: a plain HF model for dense,
an `LTEModel` for stages 1 and 2) plus `lte_stage.json` (what ran, final numbers),
`train_log.jsonl`, TensorBoard logs under `runs/` and `checkpoint-N/` folders. Settings:
`lte.training.args.TrainArgs`; data: `lte.training.data`; router init: `lte.routing.fit`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lte.data.text import is_text_source
from lte.loading import (
    check_head,
    has_adapters,
    load_model,
    load_tokenizer,
    model_kind,
    model_source,
    saved_stage,
)
from lte.routing.fit import calibrate_routers, calibrate_tau, fit_routers, topk_for_sparsity
from lte.training.args import TrainArgs, training_arguments, use_bf16
from lte.training.callbacks import EtaController, LamWarmup, TauHold, raise_if_stopped
from lte.training.data import (
    calibration_batch,
    check_data_sources,
    examples_for_tokens,
    load_task_data,
    make_collator,
    split_holdout,
)
from lte.training.errors import NonFiniteLossError, StageInputError
from lte.training.outputs import (
    STAGE_LABEL,
    drop_checkpoints,
    prepare_output,
    stage_info,
    write_stage_info,
)

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "TASKS", "TrainArgs", "train_stage", "load_stage_model"]

STAGES = ("dense", "1", "2")
TASKS = ("causal-lm", "classification", "instruction")


# ---------------------------------------------------------------------- model loading
def _is_lte_dir(path: Path | str) -> bool:
    return isinstance(path, Path) and path.is_dir() and model_kind(path) == "lte"


def load_stage_model(stage: str, source: Path | str, task: str, num_labels: int, tokenizer,
                     hp: TrainArgs, converted_from_checkpoint: bool = False,
                     calibration_batch: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Build the model a stage trains, from the previous stage's output (see module docstring)."""
    from lte.data.zoo import ensure_pad_token

    src = Path(source) if not isinstance(source, Path) and Path(source).exists() else source
    if isinstance(src, Path):
        check_head(src, task)
        if model_kind(src) == "baseline":
            raise StageInputError(f"{src} holds a baseline model; the stages start from a plain HF or an LTE model")
    if stage == "dense" or (stage == "1" and not _is_lte_dir(src)):
        if _is_lte_dir(src):
            raise StageInputError(f"{src} is an LTE model; the dense stage needs a plain HF model")
        model = load_model(src, task=task, num_labels=num_labels, check=False,  # the head was checked above
                           **_base_dtype(hp, adapters=bool(hp.peft) and stage == "1"))
        ensure_pad_token(model, tokenizer)
        if stage == "dense":
            return model
        if hp.peft and task == "classification" and not _has_classifier(src):
            raise StageInputError(
                f"--peft keeps the base frozen, its classification head too, but {src} has no trained head: "
                "fine-tune it on the task first (--stage dense) and start stage 1 from that output")
        if not converted_from_checkpoint and not (isinstance(src, Path) and stage_info(src)):
            logger.warning("stage 1 starts from %s, which is not a dense-stage output: the paper groups a model "
                           "fine-tuned on the task first (run --stage dense)", src)
        return _convert(model, hp, calibration_batch)
    # stages 1 (continuing an LTE dir) and 2: an LTE directory is required
    if stage == "2":
        _check_stage2_source(src)
    model = load_model(src, base=hp.base_model, **_base_dtype(hp, adapters=_is_lte_dir(src) and has_adapters(src)))
    ensure_pad_token(model.base_model, tokenizer)
    return model


def _base_dtype(hp: TrainArgs, adapters: bool) -> dict[str, Any]:
    """A frozen base (adapters) loads in bf16 when training runs in bf16: it needs no fp32 master weights."""
    return {"dtype": torch.bfloat16} if adapters and use_bf16(hp) else {}


def _has_classifier(src: Path | str) -> bool:
    """Whether a model folder holds a sequence-classification head (hub names: assumed so)."""
    if not isinstance(src, Path) or not (src / "config.json").is_file():
        return True
    archs = json.loads((src / "config.json").read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def _lora(hp: TrainArgs):
    """The LoRA config of a stage's settings."""
    from lte.adapters import lora_config

    return lora_config(hp.lora_r, hp.lora_alpha, hp.lora_dropout, hp.lora_targets)


def _check_stage2_source(src: Path | str) -> None:
    """Stage 2 needs a stage-1 output: an LTE directory whose routers were trained."""
    if not _is_lte_dir(src):
        raise StageInputError(
            f"stage 2 needs the output directory of stage 1 (a folder with lte_config.json), got '{src}'. "
            "Run `lte train --stage 1 --model <dense-output> --out <dir>` first and pass that <dir>."
        )
    label = saved_stage(src)
    if label not in ("stage1", "stage2"):
        raise StageInputError(
            f"{src} is an LTE model at stage '{label}', not a stage-1 output: its routers are untrained. "
            "Run stage 1 on it first (`lte train --stage 1`)."
        )


def _convert(model: nn.Module, hp: TrainArgs, calibration_batch: dict[str, torch.Tensor] | None = None):
    """Group neurons and add routers (start of stage 1); optionally calibrate the router scale."""
    import lte

    # a copy of the config: training changes eta. Adapters are checked before grouping and start at zero
    # (LoRA's B = 0), so the router init below sees the model's own function.
    lmodel = lte.get_lte_model(model, dataclasses.replace(hp.lte, seed=hp.seed), calibration=calibration_batch,
                               adapters=_lora(hp) if hp.peft else None)
    mode = hp.router_init
    if mode == "auto":
        mode = "fit" if hp.target_sparsity is not None else "none"
    if mode in ("fit", "fit-global") and calibration_batch is not None:
        fit_routers(lmodel, calibration_batch, hp.target_sparsity if hp.target_sparsity is not None else 0.5,
                    hp.router_open_logit, threshold="global" if mode == "fit-global" else "token")
    elif mode not in ("none", "fit", "fit-global") and calibration_batch is not None:
        calibrate_routers(lmodel, calibration_batch, mode, hp.router_open_logit, hp.router_logit_std)
    return lmodel


def _prepare_for_stage(model: nn.Module, stage: str, hp: TrainArgs) -> None:
    """Routing mode, trainable routers, adapters and the stage label of an LTE model."""
    if hp.peft and not model.has_adapters:
        if stage == "2":
            raise StageInputError("--peft at stage 2 continues the adapters of a stage-1 output, and this one has "
                                  "none: run stage 1 with --peft lora, or drop --peft for full fine-tuning")
        model.add_adapters(_lora(hp))
    if hp.batch_budget and stage != "2":
        raise StageInputError("--batch-budget trains stage 2 under a per-batch expert budget; stage 1 trains the "
                              "routers without one: drop it here and pass it to stage 2")
    if stage == "1":
        model.lte_config.lam = hp.lte.lam
        if model.stage != "stage1" or not hp.resume:
            model.lte_config.eta = hp.lte.eta
        model.freeze_routers(False)
        model.set_routing(hp.stage1_routing, tau=hp.lte.tau)
        model.stage = "stage1"
    elif stage == "2":
        model.freeze_routers(True)
        model.set_routing("hard", budget=hp.batch_budget)  # a topk stage 2 switches after the re-cut (`_route_topk`)
        model.stage = "stage2"


# ---------------------------------------------------------------------- the stage
def train_stage(stage: str, model_dir_or_model: Any, task: str, data: Any, out: str | os.PathLike,
                tokenizer=None, callbacks: list | None = None, teacher: nn.Module | None = None,
                holdout: float | None = None, source_name: str | None = None, **hparams: Any) -> dict[str, Any]:
    """Run one training stage and save its output to `out`; return a summary dict.

    Args:
        stage: "dense", "1" or "2" (also accepts 1, 2, "stage1", "stage2").
        model_dir_or_model: a model folder (the previous stage's `out`), an embedded name
            (smollm2-135m, minilm, mpnet), a hub name, or a model object (then pass `tokenizer`).
        task: "causal-lm", "classification" (GLUE TSV; set glue_task) or "instruction".
        data: a file/folder path (or "builtin" for causal-lm) or a torch Dataset.
        out: output directory.
        teacher: the dense teacher for `distill` > 0 as a model object (default: loaded from
            `hparams["teacher"]`, or the dense model the LTE run started from).
        holdout: causal LM from a path: train on all but this final fraction of the text (kept
            unseen for evaluation; `lte run` sets it).
        source_name: how the stage's record names a model object (default: its class). A resumed run
            must name its source as the interrupted one did, e.g. when it passes the model rebuilt
            from the checkpoint.
        hparams: `TrainArgs` fields (lr, epochs, max_steps, batch_size, eta, target_sparsity, ...).
    """
    start = time.perf_counter()  # the record's `seconds`: where a stage's wall time goes
    stage = _normalise_stage(stage)
    if task not in TASKS:
        raise StageInputError(f"unknown task '{task}'; choose one of {list(TASKS)}")
    hp = TrainArgs.from_dict(hparams)
    _check_stage_settings(stage, hp)
    out = Path(out)
    _check_data_path(data)
    check_data_sources(task, data)  # before the model loads: the clearer error first
    if isinstance(model_dir_or_model, nn.Module):
        source, source_desc = None, source_name or type(model_dir_or_model).__name__
    else:
        source = model_source(model_dir_or_model)
        source_desc = str(source)
    data_desc = str(data) if is_text_source(data) else type(data).__name__
    record: dict[str, Any] = {"stage": STAGE_LABEL[stage], "task": task, "source": source_desc, "data": data_desc,
                              "complete": False, "hparams": hp.to_dict()}
    resume_ckpt = prepare_output(out, record, hp)

    if isinstance(model_dir_or_model, nn.Module):
        if tokenizer is None:
            raise StageInputError("pass tokenizer=... together with a model object")
        model = model_dir_or_model
        dataset = load_task_data(task, data, tokenizer, hp, holdout=holdout)
        if stage == "1" and not hasattr(model, "lte_config"):
            if hp.distill > 0 and teacher is None and hp.teacher is None:
                import copy

                teacher = copy.deepcopy(model)  # the dense model, before conversion
            model = _convert(model, hp, _calibration_batch(dataset, tokenizer, hp))
        elif stage == "2" and getattr(model, "stage", None) not in ("stage1", "stage2"):
            raise StageInputError("stage 2 needs a model that went through stage 1 (LTEModel with stage 'stage1')")
    else:
        if isinstance(source, Path):
            check_head(source, task)  # before loading data: the clearer error first
        if stage == "2":
            _check_stage2_source(source)
        # On resume of stage 1, rebuild from the checkpoint (same grouping, no k-means again).
        build_from = Path(resume_ckpt) if (resume_ckpt and stage != "dense") else source
        tokenizer = load_tokenizer(build_from)
        dataset = load_task_data(task, data, tokenizer, hp, holdout=holdout)
        num_labels = getattr(dataset, "num_labels", 2)
        model = load_stage_model(stage, build_from, task, num_labels, tokenizer, hp,
                                 converted_from_checkpoint=bool(resume_ckpt),
                                 calibration_batch=_calibration_batch(dataset, tokenizer, hp))
        _check_labels(model, dataset, task)
    loaded = time.perf_counter()  # data, model, conversion (grouping, router fit)
    teacher, teacher_desc = _resolve_teacher(stage, hp, teacher, source, task, tokenizer, dataset)
    if stage != "dense":
        _prepare_for_stage(model, stage, hp)

    # Held-out examples (the tail of the training data) for the tau calibration; never trained on.
    calibrate = hp.target_sparsity is not None and (stage == "2" or (stage == "1" and hp.calibrate_tau))
    train_set, held_out = split_holdout(dataset, hp.calibration_holdout) if calibrate else (dataset, None)
    record_extra: dict[str, Any] = {}
    if stage == "2" and calibrate:  # stage 2 honours --target-sparsity: re-cut the frozen routers first
        record_extra["tau_calibration"] = _calibrate_on(model, held_out, tokenizer, hp, hp.stage2_target(0))
        if hp.stage2_routing == "topk":
            record_extra["topk"] = _route_topk(model, record_extra["tau_calibration"]["per_layer"],
                                               resumed=bool(resume_ckpt), budget=hp.batch_budget)

    callbacks = list(callbacks or [])
    holder = None
    if stage == "2" and calibrate and hp.hold_target_every:
        holder = TauHold(hp.hold_target_every,
                         lambda m, step: _calibrate_on(m, held_out, tokenizer, hp, hp.stage2_target(step)))
        callbacks.append(holder)
    if stage == "1" and hp.lam_warmup > 0:
        callbacks.append(LamWarmup(hp.lte.lam, hp.lam_warmup))
    controller = None
    if hp.target_sparsity is not None and stage == "1":
        try:
            controller = EtaController(hp.target_sparsity, eta0=hp.lte.eta, kp=hp.controller_kp,
                                       ki=hp.controller_ki, smoothing=hp.controller_smoothing,
                                       warmup_steps=hp.controller_warmup, eta_max=hp.eta_max,
                                       tau0=model.lte_config.tau, tau_gain=hp.tau_gain)
        except ValueError as err:  # e.g. --tau-gain with a model whose tau lies outside the moving clamp
            raise StageInputError(f"{err}; pass a --tau in [0.02, 0.98] or drop --tau-gain") from None
        callbacks.append(controller)

    from lte.training.trainer import LTETrainer

    trainer = LTETrainer(
        model=model,
        args=training_arguments(out, hp),
        train_dataset=train_set,
        data_collator=make_collator(tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
        router_lr=hp.router_lr if stage == "1" else None,
        teacher=teacher,
        distill=hp.distill,
        distill_temperature=hp.distill_temperature,
        distill_hidden=hp.distill_hidden,
    )
    record.update(teacher=teacher_desc, **record_extra)
    if holdout:
        record["holdout"] = holdout
    if task == "classification" and hp.glue_task:
        model.config.finetuning_task = hp.glue_task  # saved with the model: `lte eval` needs no --glue-task
    if trainer.args.should_save:  # what this run is, before any checkpoint: --resume compares against it
        write_stage_info(out, record)
    trained_from = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume_ckpt)
    except NonFiniteLossError as err:
        record.update(error=str(err), last_good_checkpoint=err.last_checkpoint)
        if trainer.args.should_save:
            write_stage_info(out, record)
        raise
    raise_if_stopped(callbacks, out)  # asked to stop: checkpoint saved, the stage is not finished
    trained_until = time.perf_counter()
    if stage == "1" and calibrate:
        record["tau_calibration"] = _calibrate_on(model, held_out, tokenizer, hp)
    if holder is not None:
        record["tau_holds"] = holder.history
    recalibrate = hp.recalibrate_tau is not False  # default on: the trained weights moved the routers' inputs
    if stage == "2" and calibrate and recalibrate and hp.stage2_routing == "hard":  # top-k's counts cannot drift
        record["tau_final_calibration"] = _calibrate_on(model, held_out, tokenizer, hp)
    if hp.save_model:
        trainer.save_model(str(out))
    if trainer.args.should_save and tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    record.update(complete=True, model_saved=hp.save_model, global_step=trainer.state.global_step,
                  train_metrics=result.metrics,
                  train_tokens=int(trainer.state.num_input_tokens_seen or 0), train_epochs=trainer.state.epoch,
                  train_examples=len(train_set))
    if stage != "dense":
        record["adapters"] = model.has_adapters
        record["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        record["eta"] = float(model.lte_config.eta)
        record["tau"] = float(model.lte_config.tau)
        if model.lte_config.layer_tau is not None:
            record["layer_tau"] = list(model.lte_config.layer_tau)
        record["train_sparsity"] = (trainer.last_step_stats or {}).get("ffn_sparsity")
        record["train_sparsity_per_layer"] = (trainer.last_step_stats or {}).get("per_layer")
    if hp.target_sparsity is not None:
        record["target_sparsity"] = hp.target_sparsity
    record["seconds"] = {"load": loaded - start, "prepare": trained_from - loaded, "train": trained_until - trained_from,
                         "finish": time.perf_counter() - trained_until}
    logger.info("stage %s: %s", STAGE_LABEL[stage], ", ".join(f"{k} {v:.1f} s" for k, v in record["seconds"].items()))
    if trainer.args.should_save:
        write_stage_info(out, record)
        if not hp.keep_checkpoints:  # the final model is in `out`; optimizer state is only needed while running
            drop_checkpoints(out)
    record["trainer"] = trainer
    return record


def _calibration_batch(dataset, tokenizer, hp: TrainArgs) -> dict[str, torch.Tensor] | None:
    """The stage-1 calibration batch (grouping, router init) as `--calibration-sample` asks ("spread" leaves the
    tau hold-out's examples out), of `--calibration-examples` or of the examples `--calibration-tokens` needs."""
    count = hp.calibration_examples
    if hp.calibration_tokens:
        try:
            count = examples_for_tokens(dataset, hp.calibration_tokens, hp.calibration_sample, hp.calibration_holdout)
        except (TypeError, IndexError, KeyError):
            return None  # not indexable: no calibration batch, as `calibration_batch` says
        logger.info("calibration batch: %d examples for %d tokens", max(hp.batch_size, count), hp.calibration_tokens)
    return calibration_batch(dataset, tokenizer, max(hp.batch_size, count), hp.calibration_sample,
                             hp.calibration_holdout)


def _route_topk(model, per_layer: list[float], resumed: bool, budget: float) -> list[int]:
    """Switch a stage-2 model to top-k routing, each layer keeping per token as many experts as the re-cut
    thresholds kept on the held-out examples (`per_layer`), under the per-batch `budget` (0 = none);
    a resumed run keeps the counts it saved."""
    saved = model.lte_config.topk
    ks = list(saved) if resumed and isinstance(saved, list) else topk_for_sparsity(model, per_layer)
    model.lte_config.topk = ks  # saved with the model, which loads in topk routing
    model.set_routing("topk", k=ks, budget=budget)
    logger.info("stage 2 in top-k routing: %d .. %d experts per token and layer", min(ks), max(ks))
    return ks


def _calibrate_on(model, held_out, tokenizer, hp: TrainArgs, target: float | None = None) -> dict[str, Any]:
    """`calibrate_tau` on the held-out examples, batched like training, to `target` (default: the target)."""
    collate = make_collator(tokenizer)
    items = [held_out[i] for i in range(len(held_out))]
    batches = [collate(items[i:i + hp.batch_size]) for i in range(0, len(items), hp.batch_size)]
    target = hp.target_sparsity if target is None else target
    result = calibrate_tau(model, batches, target, scope=hp.tau_scope)
    result.update(examples=len(items), target=target)
    return result


def _resolve_teacher(stage: str, hp: TrainArgs, teacher: nn.Module | None, source: Any, task: str, tokenizer,
                     dataset) -> tuple[nn.Module | None, str | None]:
    """The frozen dense teacher of a distilled stage, and how it was found (for the stage record)."""
    if hp.distill <= 0 and hp.distill_hidden <= 0:
        return None, None
    if teacher is not None:
        return teacher, hp.teacher or "in-memory model"
    path = hp.teacher
    if path is None and stage == "1" and isinstance(source, Path) and not _is_lte_dir(source):
        path = str(source)  # the dense model stage 1 converts
    if path is None and stage in ("1", "2") and isinstance(source, Path):
        info = stage_info(source) or {}  # an LTE folder: the teacher its own run recorded, or that run's source
        for key in ("teacher", "source"):
            candidate = info.get(key)
            if candidate and Path(candidate).is_dir() and not _is_lte_dir(Path(candidate)):
                path = candidate
                break
    if path is None:
        raise StageInputError(
            "--distill needs the dense teacher model and none could be found: pass --teacher PATH "
            "(the dense model the LTE run started from, e.g. the output of --stage dense)")
    teacher_path = model_source(path)
    if isinstance(teacher_path, Path):
        check_head(teacher_path, task)
        if model_kind(teacher_path) != "hf":
            raise StageInputError(f"the teacher {teacher_path} is an LTE or baseline model; pass the dense model "
                                  "it came from")
    from lte.data.zoo import ensure_pad_token

    model = load_model(teacher_path, task=task, num_labels=getattr(dataset, "num_labels", 2), check=False)
    ensure_pad_token(model, tokenizer)
    return model, str(teacher_path)


def _check_stage_settings(stage: str, hp: TrainArgs) -> None:
    """Refuse settings the stage would otherwise ignore (before any work)."""
    if stage == "dense" and hp.peft:
        raise StageInputError("--peft applies to stages 1 and 2 (LoRA-LTE on a frozen base); drop it for --stage "
                              "dense, or set it under stage1: in a run config")
    if stage == "dense" and (hp.distill > 0 or hp.distill_hidden > 0):
        raise StageInputError("distill / distill_hidden apply to stages 1 and 2 (the dense model is the teacher); "
                              "drop --distill and --distill-hidden for --stage dense")
    if stage != "2" and hp.hold_target_every:
        raise StageInputError("--hold-target-every applies to stage 2 (stage 1 steers eta to the target); drop it "
                              f"for --stage {stage}")
    if stage == "dense" and hp.target_sparsity is not None:
        raise StageInputError("--target-sparsity applies to stages 1 and 2 (the dense stage skips no neuron); "
                              "drop it for --stage dense")


def _normalise_stage(stage: Any) -> str:
    text = str(stage).lower().replace("stage", "").strip(" _-")
    if text not in STAGES:
        raise StageInputError(f"unknown stage '{stage}'; choose one of dense, 1, 2")
    return text


def _check_data_path(data: Any) -> None:
    if isinstance(data, (list, tuple)):
        for source in data:
            _check_data_path(source)
        return
    if isinstance(data, (str, os.PathLike)):
        text = str(data)
        looks_local = os.sep in text or text.startswith(".") or Path(text).suffix in (".txt", ".json", ".jsonl",
                                                                                      ".tsv", ".csv")
        if looks_local and not Path(text).expanduser().exists():
            raise StageInputError(f"training data not found: '{text}'. Pass an existing file or folder.")


def _check_labels(model: nn.Module, dataset: Any, task: str) -> None:
    if task != "classification":
        return
    want = getattr(dataset, "num_labels", None)
    have = getattr(getattr(model, "config", None), "num_labels", None)
    if want is not None and have is not None and want != have:
        raise StageInputError(
            f"the model's classification head has {have} outputs but the data has {want} labels; "
            "fine-tune a dense model on this task first (--stage dense) and continue from its output"
        )

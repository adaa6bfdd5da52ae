"""`lte run`: dense fine-tune -> group -> stage 1 -> stage 2 -> evaluate -> report.

A run is described by a dict (a YAML file for the CLI):

    name: wikitext2-smollm2
    model: smollm2-135m            # folder, embedded name or hub name
    task: causal-lm                # causal-lm | classification | instruction
    data: ../shared/data/lm/wikitext2_raw_test.txt
    eval_data: null                # null: causal-lm holds out the last `holdout` of `data`;
    holdout: 0.1                   #       classification uses the GLUE dev split of `data`
    glue_task: null                # SST-2, MRPC, ... for classification
    out: runs/wikitext2-smollm2
    target_sparsity: 0.5           # any TrainArgs key at top level applies to every stage ...
    dense: {epochs: 1, lr: 5e-5}   # ... and a stage section overrides it for that stage
    stage1: {epochs: 1}
    stage2: {epochs: 1}
    skip_dense: false              # true: `model` is already fine-tuned on the task
    eval: {batch_size: 8, max_length: 512, stride: 256, max_tokens: null, max_examples: null}
    baselines: [teal]              # training-free baselines scored beside LTE at LTE's measured sparsity

Relative paths are taken relative to the current directory (run from the project root).
Stage outputs go to `<out>/dense`, `<out>/stage1`, `<out>/stage2`; a stage whose output is complete
is skipped, so re-running the same command resumes (an interrupted stage resumes from its last
checkpoint). The report is `<out>/report.json` plus `<out>/sparsity_per_layer.png`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from lte.training.errors import StageInputError

logger = logging.getLogger(__name__)

__all__ = ["run_pipeline", "load_run_config", "format_table", "STAGE_KEYS"]

STAGE_KEYS = ("dense", "stage1", "stage2")
_PIPELINE_KEYS = {"name", "model", "task", "data", "eval_data", "holdout", "out", "skip_dense", "eval",
                  "dense", "stage1", "stage2", "config", "baselines"}
#: Baselines `lte run` can build beside LTE: they need no training, only calibration text.
TRAINING_FREE = ("teal", "cats")


# ---------------------------------------------------------------------- config
def load_run_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) run description; clear errors for a missing or malformed file."""
    import yaml

    from lte.study.config import yaml_load

    p = Path(path)
    if not p.is_file():
        raise StageInputError(f"run config not found: '{p}'. Pass a YAML file such as configs/demo.yaml")
    try:
        cfg = yaml_load(p.read_text())
    except yaml.YAMLError as err:
        raise StageInputError(f"'{p}' is not valid YAML: {err}") from err
    if not isinstance(cfg, dict):
        raise StageInputError(f"'{p}' must hold a mapping of settings (key: value), got {type(cfg).__name__}")
    return {k.replace("-", "_"): v for k, v in cfg.items()}


def _stage_hparams(cfg: dict[str, Any], section: str) -> dict[str, Any]:
    """Top-level TrainArgs keys, overridden by the stage's own section."""
    from lte.training.args import LTE_KEYS, TrainArgs

    known = set(TrainArgs.__dataclass_fields__) | set(LTE_KEYS)
    shared = {k: v for k, v in cfg.items() if k in known and not (section == "dense" and k == "target_sparsity")}
    unknown = sorted(set(cfg) - known - _PIPELINE_KEYS)
    if unknown:
        raise StageInputError(f"unknown run setting(s) {unknown}; valid: {sorted(known | _PIPELINE_KEYS)}")
    own = {k.replace("-", "_"): v for k, v in (cfg.get(section) or {}).items()}
    return {**shared, **own}


# ---------------------------------------------------------------------- the pipeline
def run_pipeline(cfg: dict[str, Any], force_eval: bool = False, progress: bool = True,
                 callbacks: list | None = None) -> dict[str, Any]:
    """Run (or resume) the whole pipeline described by `cfg`; return the report dict.

    `callbacks`: more Trainer callbacks for every stage (`StopOnRequest`: a stopped stage keeps its
    checkpoint and raises `TrainingStopped`; running the pipeline again continues it)."""
    from lte.evaluation.saved import evaluate_model
    from lte.training import is_stage_complete, train_stage

    for key in ("model", "task", "data", "out"):
        if not cfg.get(key):
            raise StageInputError(f"the run config needs '{key}'")
    task, out = cfg["task"], Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    train_data, eval_data, holdout = _pipeline_data(cfg)
    dirs = {k: out / k for k in STAGE_KEYS}
    timings: dict[str, float] = {}

    source = cfg["model"]
    stages = [("1", "stage1"), ("2", "stage2")] if cfg.get("skip_dense") else [
        ("dense", "dense"), ("1", "stage1"), ("2", "stage2")]
    for stage, key in stages:
        if is_stage_complete(dirs[key], stage):
            logger.warning("%s: already complete in %s, skipped", key, dirs[key])
            print(f"[lte run] {key}: already complete in {dirs[key]}, skipped", flush=True)
        else:
            print(f"[lte run] {key}: training -> {dirs[key]}", flush=True)
            hp = _stage_hparams(cfg, key)
            hp.setdefault("progress", progress)
            has_ckpt = dirs[key].is_dir() and any(p.name.startswith("checkpoint-") for p in dirs[key].iterdir())
            hp.setdefault("resume", has_ckpt)
            t0 = time.time()
            train_stage(stage, source, task, train_data, dirs[key], holdout=holdout, callbacks=callbacks, **hp)
            timings[key] = time.time() - t0
        source = dirs[key]

    dense_ref = cfg["model"] if cfg.get("skip_dense") else dirs["dense"]
    ev = dict(cfg.get("eval") or {})
    ev.setdefault("progress", progress)
    evals = {}
    for label, model_dir, routing in (("dense", dense_ref, None), ("lte", dirs["stage2"], "served")):
        cache = out / f"eval_{label}.json"
        if cache.is_file() and not force_eval:
            evals[label] = json.loads(cache.read_text())
            continue
        print(f"[lte run] evaluating {label}: {model_dir}", flush=True)
        result = evaluate_model(model_dir, task, eval_data, glue_task=cfg.get("glue_task"), routing=routing,
                                holdout=holdout, train_block_size=int(cfg.get("block_size", 512)),
                                train_max_tokens=cfg.get("max_tokens"), text_field=cfg.get("text_field", "text"),
                                **ev)
        cache.write_text(json.dumps(result, indent=2))
        evals[label] = result
    for method in _baselines(cfg):  # at the sparsity LTE measured on the evaluation text
        cache = out / f"eval_{method}.json"
        target = float(evals["lte"].get("ffn_sparsity") or 0.0)
        cached = json.loads(cache.read_text()) if cache.is_file() and not force_eval else None
        if cached is None or abs(cached.get("built_for_sparsity", -1.0) - target) > 1e-9:
            print(f"[lte run] {method} (training-free) at {100 * target:.1f}% target sparsity", flush=True)
            _build_baseline(method, dense_ref, task, train_data, holdout, target, cfg, out / method)
            cached = evaluate_model(out / method, task, eval_data, glue_task=cfg.get("glue_task"), holdout=holdout,
                                    train_block_size=int(cfg.get("block_size", 512)),
                                    train_max_tokens=cfg.get("max_tokens"), text_field=cfg.get("text_field", "text"),
                                    **ev)
            cached["built_for_sparsity"] = target
            cache.write_text(json.dumps(cached, indent=2))
        evals[method] = cached
    report = _report(cfg, evals, dirs, timings)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    from lte.evaluation import plot_layer_sparsity

    plot_layer_sparsity({"LTE (stage 2, hard routing)": evals["lte"].get("per_layer_sparsity", [])},
                        out / "sparsity_per_layer.png", f"{cfg.get('name', 'run')}: FFN sparsity per layer")
    report["plot"] = str(out / "sparsity_per_layer.png")
    return report


def _baselines(cfg: dict[str, Any]) -> list[str]:
    methods = [str(m).lower() for m in (cfg.get("baselines") or [])]
    unknown = [m for m in methods if m not in TRAINING_FREE]
    if unknown:
        raise StageInputError(f"`baselines` of a run may list {', '.join(TRAINING_FREE)} (training-free); got "
                              f"{unknown}. Trained baselines run in `lte study`.")
    return methods


def _build_baseline(method: str, dense_dir: Any, task: str, train_data: Any, holdout: float | None,
                    target: float, cfg: dict[str, Any], out_dir: Path, calib_examples: int = 16) -> None:
    """Calibrate a training-free baseline on the dense model with training text and save it to `out_dir`."""
    from lte.baselines import apply_baseline
    from lte.data.zoo import ensure_pad_token
    from lte.loading import load_model, load_tokenizer, model_source
    from lte.training.args import TrainArgs
    from lte.training.data import load_task_data

    source = model_source(dense_dir)
    tokenizer = load_tokenizer(source)
    hp = TrainArgs.from_dict(_stage_hparams(cfg, "stage1"))
    data = load_task_data(task, train_data, tokenizer, hp, holdout=holdout)
    model = load_model(source, task=task, num_labels=getattr(data, "num_labels", 2))
    ensure_pad_token(model, tokenizer)
    calib = [data[i] for i in range(min(calib_examples, len(data)))]
    model = apply_baseline(model, method, target_sparsity=min(max(target, 0.0), 0.99), calib_data=calib,
                           batch_size=hp.batch_size)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _pipeline_data(cfg: dict[str, Any]) -> tuple[Any, Any, float | None]:
    """(train data, eval data, holdout fraction): causal-lm without eval_data holds out a tail.

    The stages train on the first (1 - holdout) of the text (`train_stage(holdout=...)`) and the
    evaluation scores the rest; the stages' block_size and max_tokens must be the top-level ones
    so that both split the text alike.
    """
    data, eval_data = cfg["data"], cfg.get("eval_data")
    if cfg["task"] == "causal-lm" and not eval_data:
        return data, data, float(cfg.get("holdout", 0.1))
    return data, eval_data or data, None


def _report(cfg, evals, dirs, timings) -> dict[str, Any]:
    from lte.training import stage_info

    dense, lte_res = evals["dense"], evals["lte"]
    s1 = stage_info(dirs["stage1"]) or {}
    metric = lte_res.get("metric", "score")
    return {
        "name": cfg.get("name"),
        "model": str(cfg["model"]),
        "task": cfg["task"],
        "metric": metric,
        "dense": _row(dense),
        "lte": _row(lte_res),
        "baselines": {k: _row(v) for k, v in evals.items() if k not in ("dense", "lte")},
        "quality_change": _change(dense.get("score"), lte_res.get("score"), metric),
        "target_sparsity": (cfg.get("stage1") or {}).get("target_sparsity", cfg.get("target_sparsity")),
        "stage1_final_eta": s1.get("eta"),
        "stage1_train_sparsity": s1.get("train_sparsity"),
        "lte_per_layer_sparsity": lte_res.get("per_layer_sparsity"),
        "stage_dirs": {k: str(v) for k, v in dirs.items()},
        "train_seconds": timings,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }


def _row(result: dict[str, Any]) -> dict[str, Any]:
    return {"score": result.get("score"), "ffn_sparsity": result.get("ffn_sparsity"),
            "gflops_per_token": result.get("gflops_per_token"), **{
                k: result[k] for k in ("perplexity", "accuracy", "f1", "matthews", "pearson") if k in result}}


def _change(dense: float | None, lte: float | None, metric: str) -> dict[str, float] | None:
    if dense is None or lte is None:
        return None
    if metric in ("perplexity", "answer_perplexity"):
        return {"relative": lte / dense - 1.0}
    return {"absolute": lte - dense}


def format_table(report: dict[str, Any]) -> str:
    """The short dense-vs-LTE table printed at the end of `lte run` / `lte demo`."""
    metric = report.get("metric", "score")
    rows = {"dense": report["dense"], "LTE": report["lte"]}
    rows.update({f"{k} (no training)": v for k, v in (report.get("baselines") or {}).items()})
    width = max(len(k) for k in rows)
    lines = [f"{'model':<{width}} {metric:>14} {'FFN sparsity':>13} {'GFLOPs/token':>13}"]
    for label, row in rows.items():
        score = row.get("score")
        lines.append(f"{label:<{width}} "
                     f"{(f'{score:.4g}' if score is not None else '-'):>14} "
                     f"{100 * (row.get('ffn_sparsity') or 0):>12.1f}% "
                     f"{row.get('gflops_per_token') or 0:>13.4f}")
    return "\n".join(lines)

"""Running a study: build, train and evaluate each (method, target), keep the points, summarise.

    points = run_sweep("teal", [0.3, 0.5, 0.7, 0.9], "causal-lm", "smollm2-135m",
                       "../shared/data/lm/wikitext2_tok_valid.txt", "runs/study/teal",
                       eval_data="../shared/data/lm/wikitext2_tok_test.txt")
    report = run_study("configs/study/wikitext2-smollm2.yaml")   # every method, CSV/JSON + PNGs

Every method starts from the same dense model, sees the same calibration / training data and is
scored by the same evaluator (`lte.study.tasks`); the methods that train (lte, dejavu-ft,
random-topk) get the same number of steps (LTE: stage 1 + stage 2 through `lte.training`; the
others: that sum in one fine-tuning run). LTE is trained with the same `train_stage` a user calls.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..baselines.methods import FINETUNED, apply_baseline, set_sparsity
from ..errors import LTEError
from ..routing.fit import topk_for_sparsity
from ..training.errors import TrainingStopped
from ..training.finetune import finetune
from .cache import (
    json_default,
    load_point,
    load_results,
    point_fingerprint,
    point_path,
    save_point,
    settings_fingerprint,
    stale_point_reason,
    write_points,
)
from .config import (
    DEFAULTS,
    REFERENCES,
    baseline_options,
    derived_methods,
    knob_values,
    lte_method,
    merge,
    method_plan,
    study_config,
    study_out,
)
from .plots import plot_all
from .report import study_markdown, summarise
from .resume import checkpoint_to_resume, earlier_legs, install_stop_handler, stop_callbacks
from .seeds import aggregate_points, seed_studies
from .tasks import TaskSetup, prepare_dense, setup_task, train_hp

logger = logging.getLogger(__name__)


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def devices_of(points: list[dict[str, Any]]) -> str:
    """The device that ran a study's points: one name, or each name with its point count when they differ
    (points resumed on another machine keep the device they ran on)."""
    counts = Counter(p.get("device") or "unknown" for p in points)
    if len(counts) == 1:
        return next(iter(counts))
    return "mixed: " + ", ".join(f"{name} ({n} point{'s' if n > 1 else ''})" for name, n in counts.most_common())


def _point(setup: TaskSetup, method: str, knob: str, target: float, result: dict[str, Any], model: nn.Module,
           timings: dict[str, float], eta: float | None = None) -> dict[str, Any]:
    stats = model.lte_stats(accumulated=True) if hasattr(model, "lte_stats") and getattr(
        model, "routing", "dense") != "dense" else None
    sparsity = float(result.get("ffn_sparsity", 0.0))
    point = {
        "task": setup.name, "method": method, "knob": knob, "target": target,
        "eta": eta,
        "ffn_sparsity": sparsity,
        "activation_sparsity": float(stats.get("activation_sparsity", sparsity)) if stats else sparsity,
        "quality": float(result["quality"]), "metric": setup.metric, "higher_is_better": setup.higher_is_better,
        "gflops_per_token": float(result.get("gflops_per_token", float("nan"))),
        "dense_gflops_per_token": float(result.get("dense_gflops_per_token", float("nan"))),
        "per_layer": list(result.get("per_layer_sparsity") or []),
        "union_sparsity_16": None, "seed": setup.settings["seed"], "device": _device_name(), **timings,
        **({"extra_quality": dict(result["extra_quality"])} if result.get("extra_quality") else {}),
        **({"extra_sparsity": dict(result["extra_sparsity"])} if result.get("extra_sparsity") else {}),
        "eval": {k: v for k, v in result.items()
                 if k not in ("per_layer_sparsity", "samples", "extra_quality", "extra_sparsity")},
    }
    return point


def _measure_union(model: nn.Module, batch: dict[str, torch.Tensor]) -> float | None:
    """Union sparsity at 16 tokens on one calibration batch (what a batched kernel could skip)."""
    if getattr(model, "routing", "dense") == "dense":
        return None
    device = next(model.parameters()).device
    with torch.no_grad():
        model(**{k: v.to(device) for k, v in batch.items()})
    return float(model.lte_stats()["union_sparsity"].get(16, float("nan")))


def _evaluate(setup: TaskSetup, model: nn.Module) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    model.eval()
    result = setup.evaluate(model)
    return result, time.perf_counter() - start


def _train_lte(setup: TaskSetup, target: float, out: Path, key: str) -> tuple[nn.Module, dict[str, float],
                                                                              dict[str, Any]]:
    """Stage 1 (eta steered to `target`, or eta = target with knob "eta") then stage 2.

    A stage stopped earlier with settings `key` (a point fingerprint) resumes from its checkpoint
    (`lte.study.resume`). Returns the model, its timings and its budget (steps, tokens, epochs of
    both stages together).
    """
    from ..model import LTEModel
    from ..training import stage_info, train_stage

    s = setup.settings
    lcfg = s["lte"]
    hp = train_hp(s, s["train"])
    hp.update(expert_size=s["expert_size"], grouping=s["grouping"], eta=lcfg["eta"],
              save_model=bool(s["keep_models"]))  # the stages hand the model over in memory
    hp1 = {**hp, "router_lr": lcfg.get("router_lr"), **lcfg.get("stage1", {})}
    if lcfg["knob"] == "eta":
        hp1["eta"] = target
    else:
        hp1["target_sparsity"] = target
    hp2 = {**hp, **lcfg.get("stage2", {})}
    if (hp2.get("recalibrate_tau") or hp2.get("hold_target_every") or hp2.get("tau_scope", "global") != "global"
            or hp2.get("stage2_routing", "hard") != "hard") and lcfg["knob"] != "eta":
        hp2["target_sparsity"] = target  # stage 2 re-cuts to the target before, during (hold) and after training
    distilled = any(stage_hp.get(k) for stage_hp in (hp1, hp2) for k in ("distill", "distill_hidden"))
    teacher = setup.dense if distilled else None  # frozen, shared, never trained
    start = time.perf_counter()
    common = {"tokenizer": setup.tokenizer, "teacher": teacher, "callbacks": stop_callbacks(setup.stop)}
    stage2_ckpt = checkpoint_to_resume(out / "stage2", key)
    stage1_done = (stage_info(out / "stage1") or {}).get("complete", False)
    if stage2_ckpt is not None and stage1_done:  # stage 1 finished in an earlier run: its record has the numbers
        r1 = stage_info(out / "stage1")
        model = LTEModel.from_pretrained(stage2_ckpt)
    else:
        stage1_ckpt = checkpoint_to_resume(out / "stage1", key)
        resumed = stage1_ckpt is not None
        model = LTEModel.from_pretrained(stage1_ckpt) if resumed else copy.deepcopy(setup.dense)
        r1 = train_stage("1", model, setup.stage_task, setup.train_data, out / "stage1",
                         source_name=type(setup.dense).__name__, **common,
                         **{**hp1, "resume": resumed, "overwrite": not resumed})
        model, stage2_ckpt = r1["trainer"].model, None
    r2 = train_stage("2", model, setup.stage_task, setup.train_data, out / "stage2", **common,
                     **{**hp2, "resume": stage2_ckpt is not None, "overwrite": stage2_ckpt is None})
    model = r2["trainer"].model
    model.set_routing("topk" if hp2.get("stage2_routing") == "topk" else "hard")  # served as it trained
    budget = {"train_steps": r1["global_step"] + r2["global_step"],
              "train_tokens": r1["train_tokens"] + r2["train_tokens"],
              "train_epochs": float(r1["train_epochs"] or 0) + float(r2["train_epochs"] or 0),
              "tau": float(model.lte_config.tau)}
    if model.lte_config.layer_tau is not None:
        budget["layer_tau"] = list(model.lte_config.layer_tau)
    if model.routing == "topk":
        budget["topk"] = model.lte_config.topk
    if "tau_calibration" in r1:
        budget["tau_calibration_sparsity"] = r1["tau_calibration"]["sparsity"]
    if "tau_final_calibration" in r2:
        budget["tau_final_calibration_sparsity"] = r2["tau_final_calibration"]["sparsity"]
    if r1.get("train_sparsity") is not None:  # stage 1's hard masks at its end (how far the re-cut after it moves)
        budget["stage1_train_sparsity"] = float(r1["train_sparsity"])
    if r2.get("train_sparsity") is not None:  # the masks stage 2 trained with at its end (drift: vs ffn_sparsity)
        budget["stage2_train_sparsity"] = float(r2["train_sparsity"])
    budget["stage_seconds"] = {"stage1": r1.get("seconds"), "stage2": r2.get("seconds")}  # where the time went
    return model, {"train_seconds": time.perf_counter() - start}, budget


def finetune_args(setup: TaskSetup) -> dict[str, Any]:
    """Fine-tuning settings of dejavu-ft / random-topk: the LTE budget (two stages) in one run."""
    s = setup.settings
    hp = train_hp(s, s["train"])
    hp["max_steps"] = 2 * int(s["train"].get("max_steps", 0))
    hp.pop("block_size", None), hp.pop("max_length", None)
    return hp


def _finetune(setup: TaskSetup, model: nn.Module, run_dir: Path, key: str, teacher: nn.Module | None) -> dict[str, Any]:
    """`finetune` with the study's settings; a run stopped earlier under settings `key` resumes."""
    return finetune(model, setup.train_data, setup.tokenizer, str(run_dir), teacher=teacher,
                    callbacks=stop_callbacks(setup.stop), resume_from=checkpoint_to_resume(run_dir, key),
                    **finetune_args(setup))


def _with_overrides(setup: TaskSetup, extra: dict[str, Any]) -> TaskSetup:
    """The task with a variant's settings (training / method settings only; the data stay as they are)."""
    return dataclasses.replace(setup, settings=merge(setup.settings, extra)) if extra else setup


def _build_point(setup: TaskSetup, name: str, base: str, knob: str, target: float, out: Path,
                 shared: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Build/train/evaluate one (method, target): [(method name, point)] (two names with `lte.also_topk`)."""
    s, dense = setup.settings, setup.dense
    options = baseline_options(s, base)
    run_dir = out / name / f"t{target:g}"
    timings: dict[str, float] = {"train_seconds": 0.0, "build_seconds": 0.0}
    budget: dict[str, Any] = {"train_steps": 0, "train_tokens": 0, "train_epochs": 0.0}
    eta = None
    start = time.perf_counter()
    teacher = setup.dense if any(finetune_args(setup).get(k) for k in ("distill", "distill_hidden")) else None
    key = settings_fingerprint(setup, name, target, base)  # what a stopped training run resumes under
    with earlier_legs(run_dir, key) as earlier:  # a unit stopped at a time limit trained in several legs
        if base == "lte":
            model, t, budget = _train_lte(setup, target, run_dir, key)
            timings.update(t)
            eta = float(model.lte_config.eta)
        elif base in ("moefication", "moefication-oracle", "sketch", "dejavu"):
            model = shared.get(name)
            if model is None:  # one router / predictor for every target of the sweep; only k moves
                model = apply_baseline(copy.deepcopy(dense), base, target, calib_data=setup.calib, **options)
                shared[name] = model
            set_sparsity(model, target)
            timings["build_seconds"] = time.perf_counter() - start
        elif base in FINETUNED:  # dejavu-ft, sketch-ft: the method, then fine-tuned with its masks on
            model = apply_baseline(copy.deepcopy(dense), FINETUNED[base], target, calib_data=setup.calib, **options)
            set_sparsity(model, target)
            model.method = base
            timings["build_seconds"] = time.perf_counter() - start
            info = _finetune(setup, model, run_dir, key, teacher)
            timings["train_seconds"] = info["seconds"]
            budget = {"train_steps": info["steps"], "train_tokens": info["tokens"], "train_epochs": info["epochs"]}
        elif base == "dense-ft":  # the reference: the same fine-tuning budget, no sparsity
            model = copy.deepcopy(dense)
            info = _finetune(setup, model, run_dir, key, teacher)
            timings["train_seconds"] = info["seconds"]
            budget = {"train_steps": info["steps"], "train_tokens": info["tokens"], "train_epochs": info["epochs"]}
        elif base == "random-topk":
            model = apply_baseline(copy.deepcopy(dense), base, target, calib_data=setup.calib, **options)
            timings["build_seconds"] = time.perf_counter() - start
            info = _finetune(setup, model, run_dir, key, teacher)
            timings["train_seconds"] = info["seconds"]
            budget = {"train_steps": info["steps"], "train_tokens": info["tokens"], "train_epochs": info["epochs"]}
            model.set_routing("topk")
        else:  # teal, cats: calibrated per target
            model = apply_baseline(copy.deepcopy(dense), base, target, calib_data=setup.calib, **options)
            timings["build_seconds"] = time.perf_counter() - start
    timings["train_seconds"] += earlier
    result, timings["eval_seconds"] = _evaluate(setup, model)
    point = _point(setup, name, knob, target, result, model, timings, eta)
    point.update(budget)
    if base in REFERENCES:
        point["reference"] = True  # not a baseline (`report.reference_methods`), whatever the variant's name
    point["union_sparsity_16"] = _measure_union(model, setup.calib[0])
    made = [(name, point)]
    if base == "lte" and s["lte"].get("also_topk"):
        # The threshold-vs-top-k ablation: the same trained model, top-k experts per token with k per
        # layer matched to the sparsity the threshold gave (no extra training).
        model.set_routing("topk", k=topk_for_sparsity(model, point["per_layer"]))
        result, seconds = _evaluate(setup, model)
        topk = _point(setup, f"{name}-topk", knob, target, result, model,
                      {"train_seconds": timings["train_seconds"], "build_seconds": 0.0, "eval_seconds": seconds}, eta)
        topk.update(budget)
        topk["union_sparsity_16"] = _measure_union(model, setup.calib[0])
        made.append((f"{name}-topk", topk))
    if not s["keep_models"] and run_dir.exists():
        _drop_weights(run_dir)
    return made


def run_method(setup: TaskSetup, method: str, targets: list[float], out_dir: str | Path,
               shared: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Build/train/evaluate one method at every target on a prepared task; returns the points.

    `method` is a built-in method or a variant of `config["variants"]`. Each finished point is kept
    in `<out>/<method>/t<target>/point.json`; a rerun with the same settings reuses it.
    """
    base, extra = method_plan(config or {}, method)
    if base in REFERENCES:
        targets = [0.0]  # no sparsity to aim at: one point
    setup = _with_overrides(setup, extra)
    shared = shared if shared is not None else {}
    out = Path(out_dir)
    if setup.dense is None:
        raise LTEError("prepare_dense(setup, out_dir) first")
    knob = setup.settings["lte"]["knob"] if base == "lte" else "target"
    names = [method] + ([f"{method}-topk"] if base == "lte" and setup.settings["lte"].get("also_topk") else [])
    points = []
    for target in targets:
        fps = {n: settings_fingerprint(setup, n, target, base) for n in names}
        cached = [load_point(point_path(out, n, target), fps[n]) for n in names]
        if all(p is not None for p in cached):
            logger.info("%s %s=%g: reusing the finished point", method, knob, target)
            points += cached
            continue
        for name, point in _build_point(setup, method, base, knob, target, out, shared):
            save_point(point_path(out, name, target), point, fps[name])
            points.append(point)
            logger.info("%s %s=%g: sparsity %.3f %s %.4g", name, knob, target, point["ffn_sparsity"],
                        setup.metric, point["quality"])
    for name in names:
        write_points([p for p in points if p["method"] == name], out / name)
    return points


def _drop_weights(run_dir: Path) -> None:
    """Remove saved weights of a finished run (keep logs and lte_stage.json)."""
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".pt") and path.name != "training_args.bin":
            path.unlink()
    for ckpt in run_dir.rglob("checkpoint-*"):
        if ckpt.is_dir():
            shutil.rmtree(ckpt, ignore_errors=True)


def dense_point(setup: TaskSetup, out_dir: str | Path | None = None) -> dict[str, Any]:
    """The dense model's quality (sparsity 0): the reference every curve is judged against (kept on disk)."""
    fp = settings_fingerprint(setup, "dense", None)
    path = point_path(out_dir, "dense") if out_dir is not None else None
    cached = load_point(path, fp) if path is not None else None
    if cached is not None:
        return cached
    result, seconds = _evaluate(setup, setup.dense)
    point = _point(setup, "dense", "none", 0.0, result, setup.dense, {"train_seconds": 0.0, "build_seconds": 0.0,
                                                                      "eval_seconds": seconds})
    point.update(train_steps=int(setup.dense_info.get("steps", 0)), train_tokens=setup.dense_info.get("tokens"),
                 train_epochs=setup.dense_info.get("epochs"))
    if path is not None:
        save_point(path, point, fp)
    return point


def run_sweep(method: str, targets_or_etas: list[float], task: str, model: Any, data: Any, out_dir: str | Path,
              eval_data: Any = None, tokenizer=None, settings: dict[str, Any] | None = None,
              setup: TaskSetup | None = None, shared: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train/evaluate one method over sparsity targets (or eta values for LTE with lte.knob "eta").

    Writes `<out_dir>/<method>/points.{csv,json}` and returns the points (dicts with
    ffn_sparsity, quality, gflops_per_token, per_layer, ...). `settings` override DEFAULTS.
    """
    if setup is None:
        values = sorted(targets_or_etas)
        options = {m: {"label_sparsity": values[len(values) // 2]} for m in ("dejavu", "dejavu-ft")}
        settings = merge({"method_options": options}, settings)  # one Deja Vu predictor: labels at the middle target
        setup = setup_task(task, model, data, eval_data, tokenizer, settings)
    prepare_dense(setup, out_dir)
    return run_method(setup, method, list(targets_or_etas), out_dir, shared)


def run_study(config: dict[str, Any] | str | Path, out_dir: str | Path | None = None, tiny: bool = False,
              methods: list[str] | None = None, targets: list[float] | None = None,
              model: Any = None, tokenizer=None, jobs: int = 1, collect_only: bool = False,
              worker: bool = False, time_limit: float | None = None) -> dict[str, Any]:
    """Every method of a study config over its targets, then plots and a summary.

    Config keys: name, task (kind), model, data, eval_data, methods, targets, lte_etas (optional,
    used when lte.knob is "eta"), variants (named ablations of a method), plus any DEFAULTS section.
    Writes `<out>/results.{json,csv}`, `<out>/summary.json` and the PNG plots. Finished points are
    kept under `<out>/<method>/t<target>/point.json`, so an interrupted study resumes where it stopped.

    `jobs` > 1 runs the (method, target) units in that many worker processes (one GPU is shared;
    with several GPUs the workers take turns over them). `collect_only` trains nothing: it summarises
    the points on disk. `worker` runs the given methods/targets and skips the summary (what each
    worker process does). `time_limit` (seconds, parallel runs) stops launching and stops running
    workers at that time; whatever finished is summarised.
    """
    if worker:  # one unit of a parallel study: the time limit's SIGTERM stops training with a checkpoint
        cfg = study_config(config, tiny)
        out = study_out(cfg, out_dir)
        failures = _run_in_process(cfg, out, model, tokenizer, methods or cfg["methods"], targets,
                                   stop=install_stop_handler())
        return {"name": cfg.get("name"), "failures": failures}
    cfg = study_config(config, tiny, methods, targets)
    out = study_out(cfg, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    studies = seed_studies(cfg, out)
    failures: dict[str, dict[str, str]] = {str(o): {} for _, o in studies}
    if jobs > 1 and not collect_only:
        if model is not None or tokenizer is not None:
            raise LTEError("parallel studies (jobs > 1) load the model from the config; pass model=None")
        from .parallel import run_parallel

        failures = run_parallel(studies, jobs, time_limit=time_limit)
    points: dict[str, list[dict[str, Any]]] = {}  # in memory too: points of in-memory models are not cached
    if not collect_only and jobs <= 1:
        for one, one_out in studies:
            points[str(one_out)] = []
            failures[str(one_out)] = _run_in_process(one, one_out, model, tokenizer, one["methods"], None,
                                                     points[str(one_out)])
    return collect_study(cfg, out, points or None, failures, seconds=time.perf_counter() - start)


def _run_in_process(cfg: dict[str, Any], out: Path, model: Any, tokenizer, methods: list[str],
                    values: list[float] | None, points: list[dict[str, Any]] | None = None,
                    stop: Any = None) -> dict[str, str]:
    """Prepare the task and the dense model, then run `methods` (at `values`, default their knob values).

    `stop`: a threading.Event that, once set, stops training with a checkpoint (`lte.study.resume`)."""
    settings = {k: v for k, v in cfg.items() if k in DEFAULTS}
    setup = setup_task(cfg["task"], model if model is not None else cfg["model"], cfg["data"], cfg.get("eval_data"),
                       tokenizer, settings, cfg.get("name", cfg["task"]))
    setup.stop = stop
    prepare_dense(setup, out)
    collected = points if points is not None else []
    collected.append(dense_point(setup, out))
    shared: dict[str, Any] = {}
    failures = {}
    for method in methods:
        if method == "dense":
            continue
        if stop is not None and stop.is_set():
            failures[method] = "not started: asked to stop"
            continue
        t0 = time.perf_counter()
        try:
            collected += run_method(setup, method, values or knob_values(cfg, method), out, shared, cfg)
        except TrainingStopped as err:  # its checkpoint is on disk: the next run continues it
            logger.warning("method %s: %s", method, err)
            failures[method] = f"stopped: {err}"
        except Exception as err:  # one broken method must not lose the others' results
            logger.exception("method %s failed", method)
            failures[method] = f"{type(err).__name__}: {err}"
        logger.info("%s done in %.1f s", method, time.perf_counter() - t0)
    return failures


def collect_study(cfg: dict[str, Any], out: Path, points: dict[str, list[dict[str, Any]]] | None = None,
                  failures: dict[str, Any] | None = None, seconds: float | None = None) -> dict[str, Any]:
    """Results table, summary and plots of a study from its points (in memory, or the finished ones on disk).

    With `seeds`, each seed's study is collected in its own folder first, then the study's own
    results are the points averaged over seeds (mean and std; `lte.study.seeds`).
    `points`: points already in memory, per study folder (else the finished ones on disk are read).
    `failures`: the failed units of each study folder (`run_parallel`'s result), {folder: {unit: reason}}.
    """
    failures = failures or {}
    studies = seed_studies(cfg, out)
    if len(studies) > 1 or studies[0][1] != Path(out):
        per_seed, missing, failed = {}, [], {}
        for one, one_out in studies:
            try:
                sub = collect_study(one, one_out, points, failures, seconds)
            except LTEError as err:  # a seed not started yet: the others still make a result
                missing.append(f"seed {one['seed']}: {err}")
                continue
            per_seed[one["seed"]] = load_results(one_out / "results.json")
            missing += [f"seed {one['seed']}: {m}" for m in sub["missing"]]
            failed.update({f"seed{one['seed']}/{k}": v for k, v in sub["failures"].items()})
        if not per_seed:
            raise LTEError(f"no seed of '{out}' has a finished dense point:\n  " + "\n  ".join(missing))
        return _summarise_points(cfg, out, aggregate_points(per_seed), failed, missing, seconds)
    missing = []
    points = (points or {}).get(str(out))
    if points is None:
        points = []
        dense = load_point(point_path(out, "dense"), point_fingerprint(cfg, "dense", None))
        if dense is None:
            reason = failures.get(str(out), {}).get(f"{Path(out).name}/dense")
            if reason:
                raise LTEError(f"the dense unit of '{out}' failed, so nothing else ran: {reason}")
            stale = stale_point_reason(cfg, out, "dense", None)
            if stale:
                raise LTEError(f"the dense point in '{out}' does not match this study: {stale}")
            raise LTEError(f"no finished dense point in '{out}': run the study (without --collect) first")
        points.append(dense)
        for method in derived_methods(cfg, cfg["methods"]):
            owner = method[: -len("-topk")] if method not in cfg["methods"] else method
            for value in knob_values(cfg, owner):
                p = load_point(point_path(out, method, value), point_fingerprint(cfg, method, value))
                if p is None:
                    missing.append(f"{method}@{value:g}")
                else:
                    points.append(p)
    return _summarise_points(cfg, out, points, dict(failures.get(str(out), {})), missing, seconds)


def _summarise_points(cfg: dict[str, Any], out: Path, points: list[dict[str, Any]], failures: dict[str, str],
                      missing: list[str], seconds: float | None) -> dict[str, Any]:
    """Write `results.*`, `summary.json`, `report.md` and the plots of a study's points."""
    write_points(points, out, "results")
    dense = next(p for p in points if p["method"] == "dense")
    summary = summarise(points, dense["metric"], bool(dense["higher_is_better"]), lte_method(cfg))
    summary.update(name=cfg.get("name"), config=cfg, failures=failures, missing=missing, seeds=cfg.get("seeds"),
                   seconds=seconds, device=devices_of(points), torch=torch.__version__)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default))
    (out / "report.md").write_text(study_markdown(points, summary))
    profile = merge(DEFAULTS, {k: v for k, v in cfg.items() if k in DEFAULTS})["profile_target"]
    summary["plots"] = plot_all(points, out, dense["metric"], bool(dense["higher_is_better"]), profile)
    return summary

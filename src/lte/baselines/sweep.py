"""Sweeps: quality against FFN sparsity for LTE and every baseline, on one task, and the plots.

    points = run_sweep("teal", [0.3, 0.5, 0.7, 0.9], "causal-lm", "smollm2-135m",
                       "../shared/data/lm/wikitext2_tok_valid.txt", "runs/study/teal",
                       eval_data="../shared/data/lm/wikitext2_tok_test.txt")
    report = run_study("configs/study/wikitext2-smollm2.yaml")   # every method, CSV/JSON + PNGs

Every method starts from the same dense model (fine-tuned on the task first unless
`dense.max_steps` is 0), sees the same calibration / training data, and is scored by the same
evaluator; the methods that train (lte, dejavu-ft, random-topk) get the same number of steps
(LTE: stage 1 + stage 2; the others: that sum in one fine-tuning run).

Task kinds: "classification" (GLUE TSV, metric per task), "causal-lm" (perplexity, lower is
better), "generation" (XSum JSONL or E2E text, ROUGE-L), "instruction" (Alpaca-style training,
multiple-choice accuracy on PIQA/BoolQ/... JSONL files).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LTEError
from .methods import METHODS, apply_baseline, as_batches, canonical_method, finetune, set_sparsity
from .seeds import aggregate_points, seed_studies

logger = logging.getLogger(__name__)

ALL_METHODS = ("lte",) + METHODS
KINDS = ("classification", "causal-lm", "generation", "instruction")

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "glue_task": None,
    "generation_format": None,  # generation: "xsum" (JSONL) or "e2e" (text); default from the suffix
    "expert_size": 32,
    "grouping": "kmeans",
    "dense": {"max_steps": 200, "lr": 5e-5, "batch_size": 16},  # max_steps 0: use the model as it is
    "train": {"max_steps": 100, "lr": 5e-5, "batch_size": 16},  # per LTE stage; fine-tuned baselines get 2x
    "lte": {"knob": "target", "eta": 0.5, "router_lr": 1e-3, "stage1": {}, "stage2": {}},
    "calib": {"tokens": 16384, "batch_size": 8},
    "prep": {"max_length": 128, "block_size": 256, "max_tokens": None, "max_examples": None, "holdout": 0.2},
    "eval": {"batch_size": 16, "max_tokens": 32768, "max_examples": None, "max_new_tokens": 48,
             "max_source_tokens": 384, "mc_files": [], "mc_max_examples": 200,
             "mmlu_dir": None, "mmlu_shots": 5, "mmlu_per_subject": None},
    "method_options": {},  # per-method options for apply_baseline, e.g. {dejavu: {rank: 64}}
    "profile_target": 0.7,
    "keep_models": False,
}

#: Overrides that make a study tiny (CPU smoke runs and tests).
TINY: dict[str, Any] = {
    "dense": {"max_steps": 2, "batch_size": 2},
    "train": {"max_steps": 2, "batch_size": 2},
    "calib": {"tokens": 256, "batch_size": 8},
    "prep": {"max_examples": 16, "max_tokens": 4096, "block_size": 32},
    "eval": {"batch_size": 2, "max_tokens": 256, "max_examples": 4, "max_new_tokens": 4, "mc_max_examples": 4},
    "method_options": {"moefication": {"router_steps": 5, "grouping_iters": 2},
                "moefication-oracle": {"grouping_iters": 2},
                "dejavu": {"predictor_steps": 5}, "dejavu-ft": {"predictor_steps": 5},
                "random-topk": {"grouping_iters": 2}},
}

CSV_FIELDS = ("task", "method", "knob", "target", "eta", "ffn_sparsity", "activation_sparsity", "quality", "metric",
              "higher_is_better", "gflops_per_token", "dense_gflops_per_token", "union_sparsity_16",
              "train_seconds", "build_seconds", "eval_seconds", "train_steps", "train_tokens", "train_epochs",
              "seed", "seeds", "quality_std", "ffn_sparsity_std")


def merge(base: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    """Recursive dict update (a copy): nested sections are merged, other values replaced."""
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------- the task
@dataclass
class TaskSetup:
    """Everything a sweep needs about one task: data, evaluator, dense model."""

    kind: str
    name: str
    tokenizer: Any
    train_data: Any  # a torch Dataset of {input_ids, attention_mask, labels}
    calib: list[dict]
    evaluate: Callable[[nn.Module], dict[str, Any]]  # returns the evaluator's dict with "quality"
    metric: str
    higher_is_better: bool
    settings: dict[str, Any]
    model_source: Any = None
    num_labels: int = 2
    dense: nn.Module | None = None
    dense_info: dict[str, Any] = field(default_factory=dict)
    data_source: Any = None  # the data / eval data as given (paths make finished points reusable)
    eval_source: Any = None

    @property
    def stage_task(self) -> str:
        """The task name `lte.training.train_stage` knows."""
        return {"generation": "instruction"}.get(self.kind, self.kind)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _load_tokenizer(model: Any):
    from ..training.stages import _load_tokenizer, _model_source

    return _load_tokenizer(_model_source(model))


def _generation_pairs(path: Any, fmt: str | None) -> tuple[list[tuple[str, Any]], str]:
    from ..data import load_e2e, load_xsum

    fmt = fmt or ("e2e" if str(path).endswith(".txt") else "xsum")
    if fmt == "e2e":
        return load_e2e(path, group=True), fmt
    if fmt == "xsum":
        return load_xsum(path), fmt
    raise LTEError(f"unknown generation format {fmt!r}; use 'xsum' (JSONL) or 'e2e' (text)")


def _generation_train_set(pairs, tokenizer, template: str, max_length: int, max_source_tokens: int):
    """Prompt + reference examples with the loss on the reference only (one per reference)."""
    from ..data.instructions import InstructionDataset, encode_instruction
    from ..evaluation.generation import truncate_tokens

    examples, records = [], []
    for source, refs in pairs:
        prompt = template.format(source=truncate_tokens(source, tokenizer, max_source_tokens))
        for ref in [refs] if isinstance(refs, str) else refs:
            enc = encode_instruction(prompt, " " + ref, tokenizer, max_length)
            if enc is not None:
                examples.append(enc)
                records.append((prompt, ref))
    if not examples:
        raise LTEError("no generation training example fits in data.max_length; raise it")
    return InstructionDataset(examples, records)


def setup_task(kind: str, model: Any, data: Any, eval_data: Any = None, tokenizer=None,
               settings: dict[str, Any] | None = None, name: str | None = None) -> TaskSetup:
    """Load the task's data and build its evaluator (see the module docstring for the kinds)."""
    from .. import evaluation
    from ..data import PROMPT_TEMPLATES, load_glue, load_instructions, load_mcqa, load_mmlu, load_text_lm

    if kind not in KINDS:
        raise LTEError(f"unknown task kind {kind!r}; choose one of {', '.join(KINDS)}")
    cfg = merge(DEFAULTS, settings)
    dcfg, ecfg = cfg["prep"], cfg["eval"]
    if tokenizer is None:
        if isinstance(model, nn.Module):
            raise LTEError("pass tokenizer=... together with a model object")
        tokenizer = _load_tokenizer(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    bs = ecfg["batch_size"]
    num_labels = 2
    if kind == "classification":
        task = cfg.get("glue_task")
        if not task:
            raise LTEError("classification sweeps need glue_task (sst2, mrpc, rte, cola, stsb, ...)")
        train = data if not isinstance(data, (str, Path)) else load_glue(
            task, data, tokenizer, "train", dcfg["max_length"], dcfg["max_examples"])
        if dcfg.get("dev_from_train"):  # recipe selection: score on the train split's tail, never the dev set
            n = int(dcfg["dev_from_train"])
            if not 0 < n < len(train) // 2:
                raise LTEError(f"prep.dev_from_train={n} must be positive and below half the {len(train)} "
                               "training examples")
            train, dev = train.select(range(len(train) - n)), train.select(range(len(train) - n, len(train)))
            if ecfg["max_examples"]:
                dev = dev.select(range(min(len(dev), ecfg["max_examples"])))
        else:
            dev = eval_data if eval_data is not None and not isinstance(eval_data, (str, Path)) else load_glue(
                task, eval_data or data, tokenizer, "dev", dcfg["max_length"], ecfg["max_examples"])
        num_labels = dev.num_labels

        def evaluate(m):
            r = evaluation.evaluate_glue(m, dev, batch_size=bs, progress=False)
            return {**r, "quality": r["score"]}
        metric, higher = dev.metric, True
    elif kind == "causal-lm":
        if isinstance(data, (str, Path)):
            if eval_data is None:
                train, held = load_text_lm(data, tokenizer, dcfg["block_size"], dcfg["max_tokens"],
                                           split_ratio=dcfg["holdout"])
            else:
                train = load_text_lm(data, tokenizer, dcfg["block_size"], dcfg["max_tokens"])
        else:
            train = data
        if eval_data is not None:
            held = eval_data if not isinstance(eval_data, (str, Path)) else load_text_lm(
                eval_data, tokenizer, block_size=2, pad_to_block=True)
        elif not isinstance(data, (str, Path)):
            raise LTEError("pass eval_data with a dataset object for a causal-lm sweep")
        window = ecfg.get("window") or dcfg["block_size"]

        def evaluate(m):
            r = evaluation.perplexity(m, held, max_length=window, stride=window, batch_size=bs,
                                      max_tokens=ecfg["max_tokens"], progress=False)
            return {**r, "quality": r["perplexity"]}
        metric, higher = "perplexity", False
    elif kind == "generation":
        pairs, fmt = _generation_pairs(data, cfg.get("generation_format"))
        if eval_data is not None:
            eval_pairs, _ = _generation_pairs(eval_data, fmt)
            train_pairs = pairs
        else:
            cut = int(len(pairs) * (1 - dcfg["holdout"]))
            train_pairs, eval_pairs = pairs[:cut], pairs[cut:]
        if dcfg["max_examples"]:
            train_pairs = train_pairs[: dcfg["max_examples"]]
        template = PROMPT_TEMPLATES[fmt]
        train = _generation_train_set(train_pairs, tokenizer, template, dcfg["max_length"], ecfg["max_source_tokens"])

        def evaluate(m):
            r = evaluation.evaluate_generation(m, tokenizer, eval_pairs, template, ecfg["max_new_tokens"], bs,
                                               max_source_tokens=ecfg["max_source_tokens"],
                                               max_examples=ecfg["max_examples"], progress=False)
            return {**r, "quality": r["rougeL"]}
        metric, higher = "rougeL", True
    else:  # instruction
        train = data if not isinstance(data, (str, Path)) else load_instructions(
            data, tokenizer, dcfg["max_length"], dcfg["max_examples"])
        files = list(ecfg["mc_files"] or ([eval_data] if eval_data else []))
        if not files and not ecfg["mmlu_dir"]:
            raise LTEError("instruction sweeps need eval.mc_files (PIQA, BoolQ, ... JSONL files) or eval.mmlu_dir")
        sets = {Path(f).stem: load_mcqa(f, ecfg["mc_max_examples"]) for f in files}
        if ecfg["mmlu_dir"]:  # every subject, `mmlu_per_subject` test questions each, few-shot from dev
            sets["mmlu"] = load_mmlu(ecfg["mmlu_dir"], num_shots=ecfg["mmlu_shots"],
                                     max_per_subject=ecfg["mmlu_per_subject"])

        def evaluate(m):
            per = {k: evaluation.multiple_choice_accuracy(m, tokenizer, v, batch_size=bs, progress=False)
                   for k, v in sets.items()}
            first = next(iter(per.values()))
            stats = {k: first[k] for k in ("ffn_sparsity", "per_layer_sparsity", "gflops_per_token",
                                           "dense_gflops_per_token", "routing") if k in first}
            acc = {k: v["accuracy"] for k, v in per.items()}
            return {"per_set": acc, "quality": sum(acc.values()) / len(acc), **stats}
        metric, higher = "mc_accuracy", True
    calib = as_batches(train, cfg["calib"]["batch_size"], cfg["calib"]["tokens"],
                       pad_token_id=tokenizer.pad_token_id or 0)
    return TaskSetup(kind, name or kind, tokenizer, train, calib, evaluate, metric, higher, cfg,
                     model_source=model, num_labels=num_labels, data_source=data, eval_source=eval_data)


# --------------------------------------------------------------------------- dense model
def prepare_dense(setup: TaskSetup, out_dir: str | Path) -> nn.Module:
    """The shared dense starting point: fine-tuned on the task (unless dense.max_steps is 0), cached."""
    if setup.dense is not None:
        return setup.dense
    from ..data.zoo import ensure_pad_token, resolve_model
    from ..training import train_stage
    from ..training.stages import is_stage_complete

    out = Path(out_dir) / "dense"
    hp = _train_hp(setup.settings, setup.settings["dense"])
    source = setup.model_source
    head = "classification" if setup.kind == "classification" else "causal-lm"
    start = time.perf_counter()
    record_path = out / "study_dense.json"
    fingerprint = _dense_fingerprint(setup)
    has_weights = any(out.glob("*.safetensors")) or any(out.glob("*.bin"))
    if is_stage_complete(out, "dense") and not has_weights:  # results carried without weights: train it again
        logger.info("%s holds a finished dense record but no weights; fine-tuning the dense model again", out)
    if is_stage_complete(out, "dense") and has_weights:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if fingerprint is None or record.get("fingerprint") != fingerprint:
            raise LTEError(f"'{out}' holds a dense model made with other settings (model, data, dense or prep) "
                           "or from in-memory objects, which cannot be checked; "
                           "use another --out folder, or delete that one to retrain it")
        model, _ = resolve_model(out, task=head, num_labels=setup.num_labels)
        setup.dense_info = {"reused": str(out), "steps": record.get("steps", 0), "tokens": record.get("tokens"),
                            "epochs": record.get("epochs")}
    else:
        if isinstance(source, nn.Module):
            model = source
        else:
            model, _ = resolve_model(source, task=head, num_labels=setup.num_labels)
        ensure_pad_token(model, setup.tokenizer)
        if hp.get("max_steps", 0) > 0:
            record = train_stage("dense", model, setup.stage_task, setup.train_data, out,
                                 tokenizer=setup.tokenizer, **hp)
            model = record["trainer"].model
            setup.dense_info = {"steps": record["global_step"], "tokens": record["train_tokens"],
                                "epochs": record["train_epochs"]}
            record_path.write_text(json.dumps({"fingerprint": fingerprint, **setup.dense_info}))
    model.to(_device()).eval()
    setup.dense_info["seconds"] = time.perf_counter() - start
    setup.dense = model
    return model


def _dense_fingerprint(setup: TaskSetup) -> str | None:
    """What the shared dense model depends on (model, data, preparation, dense training, seed)."""
    sources = [setup.model_source, setup.data_source]
    if any(not isinstance(src, (str, Path)) for src in sources):
        return None
    s = setup.settings
    keys = ("seed", "glue_task", "generation_format", "prep", "dense")
    blob = json.dumps({"kind": setup.kind, "sources": [str(src) for src in sources], **{k: s.get(k) for k in keys}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _train_hp(settings: dict[str, Any], section: dict[str, Any]) -> dict[str, Any]:
    hp = {"seed": settings["seed"], "report_to": "none", "progress": False, "save_steps": 10**9,
          "logging_steps": 10, "max_length": settings["prep"]["max_length"],
          "block_size": settings["prep"]["block_size"]}
    hp.update({k: v for k, v in section.items() if not isinstance(v, dict)})
    return hp


# --------------------------------------------------------------------------- one method
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
        "eval": {k: v for k, v in result.items() if k not in ("per_layer_sparsity", "samples")},
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


def _train_lte(setup: TaskSetup, target: float, out: Path) -> tuple[nn.Module, dict[str, float], dict[str, Any]]:
    """Stage 1 (eta steered to `target`, or eta = target with knob "eta") then stage 2.

    Returns the model, its timings and its budget (steps, tokens, epochs of both stages together).
    """
    from ..training import train_stage

    s = setup.settings
    lcfg = s["lte"]
    hp = _train_hp(s, s["train"])
    hp.update(expert_size=s["expert_size"], grouping=s["grouping"], eta=lcfg["eta"])
    hp1 = {**hp, "router_lr": lcfg.get("router_lr"), **lcfg.get("stage1", {})}
    if lcfg["knob"] == "eta":
        hp1["eta"] = target
    else:
        hp1["target_sparsity"] = target
    hp2 = {**hp, **lcfg.get("stage2", {})}
    teacher = setup.dense if (hp1.get("distill") or hp2.get("distill")) else None  # frozen, shared, never trained
    model = copy.deepcopy(setup.dense)
    start = time.perf_counter()
    r1 = train_stage("1", model, setup.stage_task, setup.train_data, out / "stage1", tokenizer=setup.tokenizer,
                     teacher=teacher, **hp1)
    r2 = train_stage("2", r1["trainer"].model, setup.stage_task, setup.train_data, out / "stage2",
                     tokenizer=setup.tokenizer, teacher=teacher, **hp2)
    model = r2["trainer"].model
    model.set_routing("hard")
    budget = {"train_steps": r1["global_step"] + r2["global_step"],
              "train_tokens": r1["train_tokens"] + r2["train_tokens"],
              "train_epochs": float(r1["train_epochs"] or 0) + float(r2["train_epochs"] or 0),
              "tau": float(model.lte_config.tau)}
    if "tau_calibration" in r1:
        budget["tau_calibration_sparsity"] = r1["tau_calibration"]["sparsity"]
    return model, {"train_seconds": time.perf_counter() - start}, budget


def _ft_args(setup: TaskSetup) -> dict[str, Any]:
    """Fine-tuning settings of dejavu-ft / random-topk: the LTE budget (two stages) in one run."""
    s = setup.settings
    hp = _train_hp(s, s["train"])
    hp["max_steps"] = 2 * int(s["train"].get("max_steps", 0))
    hp.pop("block_size", None), hp.pop("max_length", None)
    return hp


def method_plan(cfg: dict[str, Any], method: str) -> tuple[str, dict[str, Any]]:
    """(base method, settings overrides) of a study method name.

    A name is a built-in method (lte, teal, ...) or a key of the config's `variants` section, e.g.
    `variants: {lte-lam0: {base: lte, set: {lte: {stage1: {lam: 0}}}, targets: [0.5, 0.9]}}` (the
    ablations; `targets` is optional and defaults to the study's).
    """
    variants = cfg.get("variants") or {}
    if method in variants:
        spec = variants[method]
        if not isinstance(spec, dict) or "base" not in spec:
            raise LTEError(f"variant {method!r} needs a mapping with `base` (a method) and `set` (settings)")
        base = "lte" if spec["base"] == "lte" else canonical_method(spec["base"])
        return base, dict(spec.get("set") or {})
    return ("lte" if method == "lte" else canonical_method(method)), {}


def derived_methods(cfg: dict[str, Any], methods: list[str]) -> list[str]:
    """The methods whose points a study holds: its methods plus `<m>-topk` for LTE runs with `lte.also_topk`."""
    out = []
    for method in methods:
        out.append(method)
        base, extra = method_plan(cfg, method)
        if base == "lte" and merge(merge(DEFAULTS, {k: v for k, v in cfg.items() if k in DEFAULTS}), extra)[
                "lte"].get("also_topk"):
            out.append(f"{method}-topk")
    return out


def fingerprint_of(kind: str, name: str, sources: list[Any], settings: dict[str, Any], method: str,
                   target: float | None, base: str | None = None) -> str:
    """A digest of everything a point depends on: task, model and data paths, settings, method, target.

    Settings a method never reads are left out (an untrained baseline ignores `train` and `lte`,
    every method ignores the other methods' options and the plot settings), so changing them keeps
    its finished points.
    """
    base = base or method  # the built-in method behind a variant name
    trained = base == "dense" or base.startswith("lte") or base in ("dejavu-ft", "random-topk")
    ignored = {"profile_target", "keep_models"} | (set() if trained else {"train", "lte"})
    relevant = {k: v for k, v in settings.items() if k not in ignored}
    relevant["method_options"] = (settings.get("method_options") or {}).get(base)
    blob = json.dumps({"kind": kind, "name": name, "sources": [None if s is None else str(s) for s in sources],
                       "settings": relevant, "method": method, "target": None if target is None else float(target)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _settings_fingerprint(setup: TaskSetup, method: str, target: float | None,
                          base: str | None = None) -> str | None:
    """The fingerprint of a point of this task; None when model or data are objects (no resume then)."""
    sources = [setup.model_source, setup.data_source, setup.eval_source]
    if any(s is not None and not isinstance(s, (str, Path)) for s in sources):
        return None
    return fingerprint_of(setup.kind, setup.name, sources, setup.settings, method, target, base)


def point_path(out_dir: str | Path, method: str, target: float | None = None) -> Path:
    """Where one finished point is kept: `<out>/<method>/t<target>/point.json` (`<out>/dense/point.json`)."""
    if method == "dense":
        return Path(out_dir) / "dense" / "point.json"
    return Path(out_dir) / method / f"t{target:g}" / "point.json"


def _save_point(path: Path, point: dict[str, Any], fingerprint: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**point, "fingerprint": fingerprint}, indent=2, default=_json_default))
    tmp.replace(path)  # atomic: a killed run leaves no half-written point


def _load_point(path: Path, fingerprint: str | None) -> dict[str, Any] | None:
    """A finished point, if it exists and was made with the same settings."""
    if fingerprint is None or not path.is_file():
        return None
    try:
        point = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return point if point.get("fingerprint") == fingerprint else None


def _with_overrides(setup: TaskSetup, extra: dict[str, Any]) -> TaskSetup:
    """The task with a variant's settings (training / method settings only; the data stay as they are)."""
    return dataclasses.replace(setup, settings=merge(setup.settings, extra)) if extra else setup


def _matched_topk(model: nn.Module, per_layer: list[float]) -> list[int]:
    """Experts per layer that top-k routing keeps to match the measured per-layer sparsity of hard routing."""
    ks = []
    for layer, sparsity in zip(model.lte_layers(), per_layer):
        ks.append(max(0, min(layer.router.out_features, int(round((1.0 - sparsity) * layer.router.out_features)))))
    return ks


def _build_point(setup: TaskSetup, name: str, base: str, knob: str, target: float, out: Path,
                 shared: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Build/train/evaluate one (method, target): [(method name, point)] (two names with `lte.also_topk`)."""
    s, dense = setup.settings, setup.dense
    options = {"expert_size": s["expert_size"], "grouping": s["grouping"], "seed": s["seed"],
               "batch_size": s["calib"]["batch_size"], "calib_tokens": s["calib"]["tokens"],
               **s["method_options"].get(base, {})}
    run_dir = out / name / f"t{target:g}"
    timings: dict[str, float] = {"train_seconds": 0.0, "build_seconds": 0.0}
    budget: dict[str, Any] = {"train_steps": 0, "train_tokens": 0, "train_epochs": 0.0}
    eta = None
    start = time.perf_counter()
    teacher = setup.dense if _ft_args(setup).get("distill") else None
    if base == "lte":
        model, t, budget = _train_lte(setup, target, run_dir)
        timings.update(t)
        eta = float(model.lte_config.eta)
    elif base in ("moefication", "moefication-oracle", "dejavu"):
        model = shared.get(name)
        if model is None:  # one router / predictor for every target of the sweep; only k moves
            model = apply_baseline(copy.deepcopy(dense), base, target, calib_data=setup.calib, **options)
            shared[name] = model
        set_sparsity(model, target)
        timings["build_seconds"] = time.perf_counter() - start
    elif base == "dejavu-ft":
        model = apply_baseline(copy.deepcopy(dense), "dejavu", target, calib_data=setup.calib, **options)
        set_sparsity(model, target)
        model.method = "dejavu-ft"
        timings["build_seconds"] = time.perf_counter() - start
        info = finetune(model, setup.train_data, setup.tokenizer, str(run_dir), teacher=teacher, **_ft_args(setup))
        timings["train_seconds"] = info["seconds"]
        budget = {"train_steps": info["steps"], "train_tokens": info["tokens"], "train_epochs": info["epochs"]}
    elif base == "random-topk":
        model = apply_baseline(copy.deepcopy(dense), base, target, **options)
        timings["build_seconds"] = time.perf_counter() - start
        info = finetune(model, setup.train_data, setup.tokenizer, str(run_dir), teacher=teacher, **_ft_args(setup))
        timings["train_seconds"] = info["seconds"]
        budget = {"train_steps": info["steps"], "train_tokens": info["tokens"], "train_epochs": info["epochs"]}
        model.set_routing("topk")
    else:  # teal, cats: calibrated per target
        model = apply_baseline(copy.deepcopy(dense), base, target, calib_data=setup.calib, **options)
        timings["build_seconds"] = time.perf_counter() - start
    result, timings["eval_seconds"] = _evaluate(setup, model)
    point = _point(setup, name, knob, target, result, model, timings, eta)
    point.update(budget)
    point["union_sparsity_16"] = _measure_union(model, setup.calib[0])
    made = [(name, point)]
    if base == "lte" and s["lte"].get("also_topk"):
        # The threshold-vs-top-k ablation: the same trained model, top-k experts per token with k per
        # layer matched to the sparsity the threshold gave (no extra training).
        model.set_routing("topk", k=_matched_topk(model, point["per_layer"]))
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
    setup = _with_overrides(setup, extra)
    shared = shared if shared is not None else {}
    out = Path(out_dir)
    if setup.dense is None:
        raise LTEError("prepare_dense(setup, out_dir) first")
    knob = setup.settings["lte"]["knob"] if base == "lte" else "target"
    names = [method] + ([f"{method}-topk"] if base == "lte" and setup.settings["lte"].get("also_topk") else [])
    points = []
    for target in targets:
        fps = {n: _settings_fingerprint(setup, n, target, base) for n in names}
        cached = [_load_point(point_path(out, n, target), fps[n]) for n in names]
        if all(p is not None for p in cached):
            logger.info("%s %s=%g: reusing the finished point", method, knob, target)
            points += cached
            continue
        for name, point in _build_point(setup, method, base, knob, target, out, shared):
            _save_point(point_path(out, name, target), point, fps[name])
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
    fp = _settings_fingerprint(setup, "dense", None)
    path = point_path(out_dir, "dense") if out_dir is not None else None
    cached = _load_point(path, fp) if path is not None else None
    if cached is not None:
        return cached
    result, seconds = _evaluate(setup, setup.dense)
    point = _point(setup, "dense", "none", 0.0, result, setup.dense, {"train_seconds": 0.0, "build_seconds": 0.0,
                                                                      "eval_seconds": seconds})
    point.update(train_steps=int(setup.dense_info.get("steps", 0)), train_tokens=setup.dense_info.get("tokens"),
                 train_epochs=setup.dense_info.get("epochs"))
    if path is not None:
        _save_point(path, point, fp)
    return point


# --------------------------------------------------------------------------- files
def write_points(points: list[dict[str, Any]], out_dir: str | Path, stem: str = "points") -> tuple[Path, Path]:
    """`<stem>.json` (everything) and `<stem>.csv` (one row per point, CSV_FIELDS)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath, cpath = out / f"{stem}.json", out / f"{stem}.csv"
    jpath.write_text(json.dumps(points, indent=2, default=_json_default))
    with open(cpath, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for p in points:
            writer.writerow({k: p.get(k) for k in CSV_FIELDS})
    return jpath, cpath


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


# --------------------------------------------------------------------------- public entry points
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


def load_study_config(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LTEError(f"study config not found: '{p}' (see configs/study/*.yaml)")
    cfg = yaml.safe_load(p.read_text())
    if not isinstance(cfg, dict):
        raise LTEError(f"'{p}' must hold a mapping of settings")
    return cfg


def study_config(config: dict[str, Any] | str | Path, tiny: bool = False, methods: list[str] | None = None,
                 targets: list[float] | None = None) -> dict[str, Any]:
    """The full settings of a study: the YAML (or dict), tiny budgets if asked, methods and targets resolved.

    Deja Vu's label sparsity defaults to the middle target of the sweep (one predictor per sweep).
    """
    cfg = load_study_config(config) if isinstance(config, (str, Path)) else dict(config)
    if tiny:
        cfg = merge(cfg, TINY)
    for key in ("task", "data"):
        if key not in cfg:
            raise LTEError(f"the study config needs `{key}` (see configs/study/*.yaml)")
    if cfg.get("seeds") is not None:
        seeds = cfg["seeds"]
        if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds) or not all(
                isinstance(x, int) for x in seeds):
            raise LTEError(f"`seeds` must be a list of distinct integers, e.g. [0, 1, 2]; got {seeds!r}")
    cfg["methods"] = list(methods or cfg.get("methods") or ALL_METHODS)
    cfg["targets"] = [float(t) for t in (targets or cfg.get("targets") or [0.3, 0.5, 0.7, 0.9])]
    for method in cfg["methods"]:
        method_plan(cfg, method)  # unknown names fail here, before any work
    middle = sorted(cfg["targets"])[len(cfg["targets"]) // 2]
    options = cfg.setdefault("method_options", {})
    for method in ("dejavu", "dejavu-ft"):
        options[method] = {"label_sparsity": middle, **(options.get(method) or {})}
    return cfg


def knob_values(cfg: dict[str, Any], method: str) -> list[float]:
    """The values a method is run at: the targets, or `lte_etas` for LTE runs steered by eta."""
    base, extra = method_plan(cfg, method)
    lte = merge(merge(DEFAULTS, {k: v for k, v in cfg.items() if k in DEFAULTS}), extra)["lte"]
    own = (cfg.get("variants") or {}).get(method, {}).get("targets")
    if own:  # a variant (an ablation) may run at fewer values than the study
        return [float(v) for v in own]
    if base == "lte" and lte["knob"] == "eta":
        if not cfg.get("lte_etas"):
            raise LTEError("lte.knob is 'eta': give the eta values as lte_etas: [...]")
        return [float(v) for v in cfg["lte_etas"]]
    return list(cfg["targets"])


def study_out(cfg: dict[str, Any], out_dir: str | Path | None = None) -> Path:
    return Path(out_dir or cfg.get("out") or f"runs/study/{cfg.get('name', cfg.get('task', 'study'))}")


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
    if worker:
        cfg = study_config(config, tiny)
        out = study_out(cfg, out_dir)
        failures = _run_in_process(cfg, out, model, tokenizer, methods or cfg["methods"], targets)
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
                    values: list[float] | None, points: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """Prepare the task and the dense model, then run `methods` (at `values`, default their knob values)."""
    settings = {k: v for k, v in cfg.items() if k in DEFAULTS}
    setup = setup_task(cfg["task"], model if model is not None else cfg["model"], cfg["data"], cfg.get("eval_data"),
                       tokenizer, settings, cfg.get("name", cfg["task"]))
    prepare_dense(setup, out)
    collected = points if points is not None else []
    collected.append(dense_point(setup, out))
    shared: dict[str, Any] = {}
    failures = {}
    for method in methods:
        if method == "dense":
            continue
        t0 = time.perf_counter()
        try:
            collected += run_method(setup, method, values or knob_values(cfg, method), out, shared, cfg)
        except Exception as err:  # one broken method must not lose the others' results
            logger.exception("method %s failed", method)
            failures[method] = f"{type(err).__name__}: {err}"
        logger.info("%s done in %.1f s", method, time.perf_counter() - t0)
    return failures


def point_done(cfg: dict[str, Any], out: Path, method: str, value: float | None) -> bool:
    """Whether a finished point of this study exists on disk (same settings)."""
    return _load_point(point_path(out, method, value), _point_fingerprint(cfg, method, value)) is not None


def _point_fingerprint(cfg: dict[str, Any], method: str, target: float | None) -> str | None:
    """The fingerprint a finished point of this study must carry (same rule as when it was made)."""
    settings = merge(DEFAULTS, {k: v for k, v in cfg.items() if k in DEFAULTS})
    base = None
    if method != "dense":
        owner = method if method in cfg["methods"] else method[: -len("-topk")]  # `<m>-topk` comes from m
        base, extra = method_plan(cfg, owner)
        settings = merge(settings, extra)
    sources = [cfg.get("model"), cfg.get("data"), cfg.get("eval_data")]
    if any(s is not None and not isinstance(s, (str, Path)) for s in sources):
        return None
    return fingerprint_of(cfg["task"], cfg.get("name", cfg["task"]), sources, settings, method, target, base)


def collect_study(cfg: dict[str, Any], out: Path, points: dict[str, list[dict[str, Any]]] | None = None,
                  failures: dict[str, Any] | None = None, seconds: float | None = None) -> dict[str, Any]:
    """Results table, summary and plots of a study from its points (in memory, or the finished ones on disk).

    With `seeds`, each seed's study is collected in its own folder first, then the study's own
    results are the points averaged over seeds (mean and std; `lte.baselines.seeds`).
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
            raise LTEError(f"no seed of '{out}' has a finished dense point: run the study first")
        return _summarise_points(cfg, out, aggregate_points(per_seed), failed, missing, seconds)
    missing = []
    points = (points or {}).get(str(out))
    if points is None:
        points = []
        dense = _load_point(point_path(out, "dense"), _point_fingerprint(cfg, "dense", None))
        if dense is None:
            raise LTEError(f"no finished dense point in '{out}': run the study (without --collect) first")
        points.append(dense)
        for method in derived_methods(cfg, cfg["methods"]):
            owner = method[: -len("-topk")] if method not in cfg["methods"] else method
            for value in knob_values(cfg, owner):
                p = _load_point(point_path(out, method, value), _point_fingerprint(cfg, method, value))
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
    summary = summarise(points, dense["metric"], bool(dense["higher_is_better"]))
    summary.update(name=cfg.get("name"), config=cfg, failures=failures, missing=missing, seeds=cfg.get("seeds"),
                   seconds=seconds, device=dense.get("device") or _device_name(), torch=torch.__version__)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    (out / "report.md").write_text(study_markdown(points, summary))
    profile = merge(DEFAULTS, {k: v for k, v in cfg.items() if k in DEFAULTS})["profile_target"]
    summary["plots"] = plot_all(points, out, dense["metric"], bool(dense["higher_is_better"]), profile)
    return summary


def tolerance_ok(quality: float, dense: float, metric: str, higher_is_better: bool) -> bool:
    """Within the paper's tolerance of the dense model: perplexity +0.5; other metrics 5% relative."""
    if metric == "perplexity":
        return quality <= dense + 0.5
    if higher_is_better:
        return quality >= dense * 0.95 if dense > 0 else quality >= dense
    return quality <= dense * 1.05


def interpolate_quality(points: list[dict[str, Any]], sparsity: float, reach: float = 0.02,
                        key: str = "quality") -> float | None:
    """A method's quality (or another `key`, e.g. quality_std) at `sparsity`, linear between its two
    nearest measured points.

    Within `reach` outside the measured range the nearest end point stands in; further out: None.
    """
    pts = sorted((p["ffn_sparsity"], p[key]) for p in points if _finite(p.get(key)) and _finite(p.get("quality")))
    for (s0, q0), (s1, q1) in zip(pts, pts[1:]):
        if s0 <= sparsity <= s1:
            return q0 if s1 == s0 else q0 + (q1 - q0) * (sparsity - s0) / (s1 - s0)
    for s0, q0 in pts[:1] + pts[-1:]:  # just outside the measured range: the nearest end point
        if abs(s0 - sparsity) <= reach:
            return q0
    return None


def compare_to_baselines(points: list[dict[str, Any]], higher_is_better: bool, method: str = "lte",
                         min_sparsity: float = 0.5) -> list[dict[str, Any]]:
    """At each point of `method` with sparsity (or target) >= `min_sparsity`: every baseline's quality there.

    Baselines are the methods other than dense and LTE's own variants (names starting with "lte").
    They are interpolated between their measured points; a method whose points do not
    span that sparsity is reported as None (not compared). `beats` / `loses_to` / `ties` list them by name.
    """
    def counts(p: dict[str, Any]) -> bool:  # a 50% target that measured 49% still counts
        target = p["target"] if p.get("knob") == "target" else 0.0
        return max(p["ffn_sparsity"], target) >= min_sparsity - 1e-9

    mine = sorted((p for p in points if p["method"] == method and counts(p)), key=lambda p: p["ffn_sparsity"])
    others = [m for m in dict.fromkeys(p["method"] for p in points)  # baselines only: not dense, not LTE's ablations
              if m != "dense" and not m.startswith("lte")]
    rows = []
    for p in mine:
        row = {"ffn_sparsity": p["ffn_sparsity"], "quality": p["quality"], "quality_std": p.get("quality_std"),
               "others": {}, "others_std": {}, "margin": {}, "beats": [], "loses_to": [], "ties": []}
        for other in others:
            theirs = [o for o in points if o["method"] == other]
            q = interpolate_quality(theirs, p["ffn_sparsity"])
            row["others"][other] = q
            if q is None:
                continue
            row["others_std"][other] = interpolate_quality(theirs, p["ffn_sparsity"], key="quality_std")
            row["margin"][other] = p["quality"] - q  # LTE minus the baseline (sign: see higher_is_better)
            if abs(p["quality"] - q) <= 1e-9 * max(1.0, abs(q)):
                row["ties"].append(other)
            elif (p["quality"] > q) == higher_is_better:
                row["beats"].append(other)
            else:
                row["loses_to"].append(other)
        rows.append(row)
    return rows


def summarise(points: list[dict[str, Any]], metric: str, higher_is_better: bool) -> dict[str, Any]:
    """Per method: its points, and the fewest GFLOPs/token among points within tolerance of dense;
    and LTE against every other method at each LTE point of >= 50% sparsity."""
    dense = next(p for p in points if p["method"] == "dense")
    table = {}
    for method in dict.fromkeys(p["method"] for p in points if p["method"] != "dense"):
        mine = [p for p in points if p["method"] == method]
        ok = [p for p in mine if tolerance_ok(p["quality"], dense["quality"], metric, higher_is_better)]
        best = min(ok, key=lambda p: p["gflops_per_token"]) if ok else None
        table[method] = {
            "points": [(round(p["ffn_sparsity"], 4), round(p["quality"], 4)) for p in mine],
            "quality_std": [p.get("quality_std") for p in mine],
            "gflops_within_tolerance": best["gflops_per_token"] if best else None,
            "sparsity_within_tolerance": best["ffn_sparsity"] if best else None,
        }
    return {"metric": metric, "higher_is_better": higher_is_better, "dense_quality": dense["quality"],
            "dense_gflops_per_token": dense["gflops_per_token"], "methods": table,
            "lte_vs_others": compare_to_baselines(points, higher_is_better)}


# --------------------------------------------------------------------------- report
def _fmt_quality(value: float, metric: str) -> str:
    if not _finite(value):
        return "n/a"
    if metric == "perplexity":
        return f"{value:.3g}" if value < 1e4 else f"{value:.2e}"
    if metric in ("accuracy", "mc_accuracy", "f1"):
        return f"{100 * value:.1f}"
    return f"{value:.3f}" if abs(value) < 2 else f"{value:.2f}"


def _fmt_pm(value: float | None, std: float | None, metric: str) -> str:
    """`quality ± std` (the std only when it was measured over several seeds)."""
    if value is None:
        return "n/a"
    if not std or not _finite(std):
        return _fmt_quality(value, metric)
    return f"{_fmt_quality(value, metric)} ± {_fmt_quality(std, metric)}"


def _fmt_margin(value: float, metric: str) -> str:
    return ("+" if value >= 0 else "-") + _fmt_quality(abs(value), metric)


def _fmt_cell(p: dict[str, Any], metric: str) -> str:
    sd = p.get("ffn_sparsity_std")
    spread = f" ± {100 * sd:.0f}" if sd else ""
    return f"{_fmt_pm(p['quality'], p.get('quality_std'), metric)} ({100 * p['ffn_sparsity']:.0f}%{spread})"


def study_markdown(points: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The study as Markdown tables: quality per method and target (measured sparsity in brackets),
    GFLOPs/token within tolerance, LTE against the others at >= 50% sparsity, and training time."""
    metric = summary["metric"]
    dense = next(p for p in points if p["method"] == "dense")
    percent = metric in ("accuracy", "mc_accuracy", "f1")
    unit = " (%)" if percent else ""
    lines = [f"### {summary.get('name') or dense.get('task')}: {metric}{unit}, "
             f"{'higher' if summary['higher_is_better'] else 'lower'} is better",
             "",
             f"Dense: {_fmt_quality(dense['quality'], metric)} at {dense['gflops_per_token']:.4g} GFLOPs/token"
             f" ({summary.get('device', '?')}).",
             ""]
    methods = [m for m in dict.fromkeys(p["method"] for p in points) if m != "dense"]
    targets = sorted({p["target"] for p in points if p["method"] != "dense"})
    knob = "target" if all(p.get("knob") != "eta" for p in points) else "target / eta"
    lines += ["| method | " + " | ".join(f"{knob} {t:g}" for t in targets) + " | GFLOPs/token within tolerance |",
              "|---" * (len(targets) + 2) + "|"]
    for method in methods:
        cells = []
        for t in targets:
            p = next((q for q in points if q["method"] == method and q["target"] == t), None)
            cells.append("" if p is None else _fmt_cell(p, metric))
        tol = summary["methods"].get(method, {}).get("gflops_within_tolerance")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {'-' if tol is None else f'{tol:.4g}'} |")
    seeds = summary.get("seeds")
    spread = f" over seeds {seeds}: mean ± std" if seeds else ""
    lines += ["", f"Cells: quality (measured FFN sparsity){spread}. Tolerance: " +
              ("perplexity within +0.5 of dense." if metric == "perplexity" else "within 5% (relative) of dense."), ""]
    rows = summary.get("lte_vs_others") or []
    if rows:
        lines += ["| LTE point | LTE | better than | worse than (theirs, margin) |", "|---|---|---|---|"]
        for row in rows:
            tied = f" (equal: {', '.join(row['ties'])})" if row.get("ties") else ""
            worse = ", ".join(f"{o} ({_fmt_pm(row['others'][o], row.get('others_std', {}).get(o), metric)}, "
                              f"{_fmt_margin(row['margin'][o], metric)})" for o in row["loses_to"])
            lines.append(f"| {100 * row['ffn_sparsity']:.0f}% | {_fmt_pm(row['quality'], row.get('quality_std'), metric)}"
                         f" | {', '.join(row['beats']) or '-'}{tied} | {worse or '-'} |")
        lines += ["", "LTE against the baselines (not its own ablations): each baseline is interpolated between "
                  "its measured points at LTE's sparsity; one whose points do not reach it is left out.", ""]
    derived = {m for m in methods if m.endswith("-topk") and m != "random-topk"}  # same model as its LTE run
    train = {m: sum(p.get("train_seconds") or 0.0 for p in points if p["method"] == m)
             for m in methods if m not in derived}
    lines += ["Training seconds per method (all targets, one worker each): " +
              ", ".join(f"{m} {s:.0f}" for m, s in train.items() if s > 0) + ".", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
def _figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> str:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p)
    return str(p)


def _style(method: str, index: int) -> dict[str, Any]:
    """Line style per method: LTE bold, its ablations dashed, up to 20 distinct colours."""
    from matplotlib import colormaps

    color = colormaps["tab20"]((index + 2) % 20)  # 0-1 are LTE's blues
    if method == "lte":
        return {"color": "tab:blue", "linewidth": 2.8, "marker": "o", "zorder": 5}
    if method.startswith("lte"):
        return {"color": color, "linewidth": 1.4, "marker": "s", "linestyle": "--"}
    return {"color": color, "linewidth": 1.2, "marker": "o"}


def plot_study(results: list[dict[str, Any]], path: str | Path, quality_name: str | None = None,
               higher_is_better: bool | None = None, x: str = "ffn_sparsity", title: str | None = None,
               log_cap: float = 20.0) -> str:
    """Quality against FFN sparsity (or `x`="gflops_per_token"), one line per method, dense dashed.

    Perplexity is drawn on a log axis cut at `log_cap` x the dense value (points above are drawn
    on the top edge as open triangles, so a collapsed method does not flatten every other curve).
    """
    if not results:
        raise LTEError("plot_study needs at least one point")
    quality_name = quality_name or results[0].get("metric", "quality")
    if higher_is_better is None:
        higher_is_better = bool(results[0].get("higher_is_better", True))
    fig = _figure(8.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    scale = 100.0 if x == "ffn_sparsity" else 1.0
    dense = [p["quality"] for p in results if p["method"] == "dense" and _finite(p.get("quality"))]
    cap = log_cap * dense[0] if quality_name == "perplexity" and dense and dense[0] > 0 else None
    methods = [m for m in dict.fromkeys(p["method"] for p in results) if m != "dense"]
    for q in dense[:1]:
        ax.axhline(q, color="black", linestyle="--", linewidth=1, label="dense")
    for i, method in enumerate(methods):
        pts = sorted((p for p in results if p["method"] == method and _finite(p.get("quality"))), key=lambda p: p[x])
        xs = [scale * p[x] for p in pts]
        ys = [p["quality"] if cap is None else min(p["quality"], cap) for p in pts]
        style = _style(method, i)
        yerr = [p.get("quality_std") or 0.0 for p in pts]
        xerr = [scale * (p.get("ffn_sparsity_std") or 0.0) for p in pts] if x == "ffn_sparsity" else None
        if any(yerr) or (xerr and any(xerr)):  # means over seeds: one std as error bars
            ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, label=method, capsize=2, **style)
        else:
            ax.plot(xs, ys, label=method, **style)
        if cap is not None:
            over = [(a, cap) for a, p in zip(xs, pts) if p["quality"] > cap]
            if over:
                ax.scatter(*zip(*over), marker="^", s=60, facecolors="none", edgecolors=style["color"], zorder=6)
    if cap is not None:
        ax.set_yscale("log")
        ax.set_ylim(top=cap * 1.15)
        ax.text(0.99, 0.02, f"open triangles: perplexity above {cap:.3g} (cut)", transform=ax.transAxes,
                fontsize=7, va="bottom", ha="right")
    ax.set_xlabel("FFN sparsity (%)" if x == "ffn_sparsity" else "GFLOPs per token")
    ax.set_ylabel(f"{quality_name} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title(title or f"{results[0].get('task', '')}: {quality_name} vs {x.replace('_', ' ')}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_eta(results: list[dict[str, Any]], path: str | Path) -> str | None:
    """LTE: measured FFN sparsity and final eta against the knob (target sparsity or eta)."""
    pts = sorted((p for p in results if p["method"] == "lte"), key=lambda p: p["target"])
    if not pts:
        return None
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    knob = pts[0]["knob"]
    xs = [p["target"] for p in pts]
    ax.plot(xs, [p["ffn_sparsity"] for p in pts], marker="o", color="tab:blue", label="measured FFN sparsity")
    if knob == "target":
        ax.plot(xs, xs, linestyle=":", color="gray", label="target")
    ax.set_xlabel("target FFN sparsity" if knob == "target" else "eta")
    ax.set_ylabel("FFN sparsity")
    ax2 = ax.twinx()
    ax2.plot(xs, [p["eta"] for p in pts], marker="s", color="tab:red", label="eta (end of stage 1)")
    ax2.set_ylabel("eta")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")
    ax.set_title("LTE: eta vs sparsity")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_profiles(results: list[dict[str, Any]], path: str | Path, target: float = 0.7) -> str | None:
    """Per-layer FFN sparsity of each method at the target closest to `target`."""
    series = {}
    for method in dict.fromkeys(p["method"] for p in results if p["method"] != "dense"):
        pts = [p for p in results if p["method"] == method and p.get("per_layer")]
        if pts:
            best = min(pts, key=lambda p: abs(p["ffn_sparsity"] - target))
            series[f"{method} ({100 * best['ffn_sparsity']:.0f}%)"] = best["per_layer"]
    if not series:
        return None
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, values in series.items():
        ax.plot(range(len(values)), [100 * v for v in values], marker="o", markersize=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("FFN sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"per-layer FFN sparsity near {100 * target:.0f}%")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_all(points: list[dict[str, Any]], out: Path, metric: str, higher: bool, profile_target: float) -> dict:
    plots = {"quality_vs_sparsity": plot_study(points, out / "quality_vs_sparsity.png", metric, higher),
             "gflops_vs_quality": plot_study(points, out / "gflops_vs_quality.png", metric, higher,
                                             x="gflops_per_token")}
    eta = plot_eta(points, out / "eta_vs_sparsity.png")
    if eta:
        plots["eta_vs_sparsity"] = eta
    prof = plot_profiles(points, out / "per_layer_sparsity.png", profile_target)
    if prof:
        plots["per_layer_sparsity"] = prof
    return plots


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Read a results.json / points.json back (e.g. to re-plot)."""
    return json.loads(Path(path).read_text())

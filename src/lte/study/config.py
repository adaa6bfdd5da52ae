"""The settings of a study: defaults, tiny budgets, the YAML config, methods and their knob values.

A study config (configs/study/*.yaml) names a task, a model, data, methods and sparsity targets,
and overrides any section of `DEFAULTS`. `study_config` resolves it (tiny budgets, seeds,
methods, targets, Deja Vu's label sparsity); `method_plan` turns a method name (built-in, or a
variant of the config) into its base method and settings; `knob_values` gives the values it
runs at.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from ..baselines.methods import METHODS, NEURON_METHODS, canonical_method
from ..errors import LTEError
from ..training.args import LTE_KEYS, TrainArgs

ALL_METHODS = ("lte",) + METHODS
#: References that are not baselines: `dense-ft` is the dense model fine-tuned further with the budget every
#: trained method gets (2 x train.max_steps, the same distillation), no sparsity. It answers whether a trained
#: method's quality comes from sparsity training or from the extra steps alone; it runs once, at sparsity 0, and
#: is never compared as a baseline (opt-in: name it in `methods`).
REFERENCES = ("dense-ft",)
#: The methods trained with the study's fine-tuning budget (each point trains its own model).
TRAINED = ("lte", "dejavu-ft", "sketch-ft", "random-topk", "dense-ft")
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


def merge(base: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    """Recursive dict update (a copy): nested sections are merged, other values replaced."""
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def yaml_load(text: str) -> Any:
    """`yaml.safe_load` that also reads `3e-4` / `1E5` as numbers (YAML 1.2, as users write them;
    PyYAML's YAML 1.1 rules would keep them as strings and the setting would be refused)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return yaml.load(text, Loader=Loader)


def parse_set(items: list[str] | None, dashes_to_underscores: bool = False) -> dict[str, Any]:
    """`--set dense.max_steps=50 --set train.lr=1e-4` -> a nested dict (values parsed as YAML).

    `dashes_to_underscores`: write `max-steps` as `max_steps` in the keys (run configs; study keys
    keep their dashes, method names such as `dejavu-ft` have them).
    """
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise LTEError(f"--set takes KEY=VALUE (e.g. train.max_steps=50), got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_") if dashes_to_underscores else key.strip()
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml_load(value)
    return out


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
        base = spec["base"] if spec["base"] in ("lte",) + REFERENCES else canonical_method(spec["base"])
        extra = dict(spec.get("set") or {})
        moot = sorted(k for k in ("expert_size", "grouping") if k in extra)
        if base in NEURON_METHODS and moot:
            raise LTEError(f"variant {method!r}: {base} picks single neurons, so {' and '.join(moot)} would change "
                           f"nothing; remove it from the variant's `set` (it would only rerun {base})")
        if base in REFERENCES and (moot or spec.get("targets")):
            raise LTEError(f"variant {method!r}: {base} has no experts and runs once at sparsity 0, so "
                           f"{' and '.join(moot + (['targets'] if spec.get('targets') else []))} would change nothing; "
                           "remove it from the variant")
        return base, extra
    if method == "lte" or method in REFERENCES:
        return method, {}
    return canonical_method(method), {}


def _check_stage_settings(cfg: dict[str, Any], method: str) -> None:
    """Fail on a stage setting of an LTE method (`lte: {stage1: {...}, stage2: {...}}`, the config's and the
    variant's) that no training stage knows, before a study trains its dense models."""
    base, extra = method_plan(cfg, method)
    if base != "lte":
        return
    known = {f.name for f in dataclasses.fields(TrainArgs)} | set(LTE_KEYS)
    lte = merge(cfg.get("lte") or {}, extra.get("lte"))
    for stage in ("stage1", "stage2"):
        unknown = sorted({str(k).replace("-", "_") for k in (lte.get(stage) or {})} - known)
        if unknown:
            raise LTEError(f"{method}: unknown lte.{stage} setting(s) {unknown}; a stage takes the fields of "
                           f"lte.training.TrainArgs (`lte train --help` lists them), e.g. max_steps, distill")


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


def load_study_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise LTEError(f"study config not found: '{p}' (see configs/study/*.yaml)")
    cfg = yaml_load(p.read_text())
    if not isinstance(cfg, dict):
        raise LTEError(f"'{p}' must hold a mapping of settings")
    return cfg


def _cap_steps(node: Any, most: int) -> Any:
    """A copy of a config with every `max_steps` (stage sections, variants' settings) at most `most`."""
    if isinstance(node, dict):
        return {k: (min(v, most) if k == "max_steps" and isinstance(v, int) and v > 0 else _cap_steps(v, most))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_cap_steps(v, most) for v in node]
    return node


def study_config(config: dict[str, Any] | str | Path, tiny: bool = False, methods: list[str] | None = None,
                 targets: list[float] | None = None) -> dict[str, Any]:
    """The full settings of a study: the YAML (or dict), tiny budgets if asked, methods and targets resolved.

    Deja Vu's label sparsity defaults to the middle of the config's targets (one predictor per sweep; the
    same when `targets` narrows a run to some of them).
    """
    cfg = load_study_config(config) if isinstance(config, (str, Path)) else dict(config)
    if tiny:
        cfg = _cap_steps(merge(cfg, TINY), TINY["train"]["max_steps"])
    for key in ("task", "data"):
        if key not in cfg:
            raise LTEError(f"the study config needs `{key}` (see configs/study/*.yaml)")
    if cfg.get("seeds") is not None:
        seeds = cfg["seeds"]
        if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds) or not all(
                isinstance(x, int) for x in seeds):
            raise LTEError(f"`seeds` must be a list of distinct integers, e.g. [0, 1, 2]; got {seeds!r}")
    cfg["methods"] = list(methods or cfg.get("methods") or ALL_METHODS)
    config_targets = [float(t) for t in (cfg.get("targets") or [0.3, 0.5, 0.7, 0.9])]
    cfg["targets"] = config_targets  # the declaration; a run narrowed by `targets` keeps it in `run_targets`
    cfg.pop("run_targets", None)
    if targets:
        undeclared = [float(t) for t in targets if not _declared(float(t), declared_targets(cfg))]
        if undeclared:
            raise LTEError(f"targets {', '.join(f'{t:g}' for t in undeclared)}: not declared by study "
                           f"{cfg.get('name', cfg['task'])!r} (its targets, and its variants' own: "
                           f"{', '.join(f'{t:g}' for t in sorted(declared_targets(cfg)))}); add them to the config's "
                           "`targets:` (or a variant's) before running them")
        cfg["run_targets"] = [float(t) for t in targets]  # `knob_values` narrows every method to these
    for method in cfg["methods"]:
        _check_stage_settings(cfg, method)  # unknown names and stage settings fail here, before any work
    lte_method(cfg)  # so does a bad lte_method
    # Deja Vu's predictor is labelled at the middle of the config's targets, not of `--targets`: a study run
    # target by target gets the same points as one run whole
    middle = sorted(config_targets)[len(config_targets) // 2]
    options = cfg.setdefault("method_options", {})
    for method in ("dejavu", "dejavu-ft"):
        options[method] = {"label_sparsity": middle, **(options.get(method) or {})}
    return cfg


def lte_method(cfg: dict[str, Any]) -> str:
    """The LTE method the study's summary compares with the baselines: the config's `lte_method` (the
    recipe a recipe study chose before this run, e.g. a variant `lte-s8`), else `lte`. Not a setting of
    any point (it is outside `DEFAULTS`, so no fingerprint changes with it).

    A list names one recipe run at different targets by several variants whose targets do not overlap
    (e.g. `[lte-kd1-s8, lte-kd1-s8-retau]`: the recipe at 0.5 / 0.7, and with tau set again after stage 2
    at 0.9); it comes back joined by "+" (`lte-kd1-s8+lte-kd1-s8-retau`), the form `summarise` takes.
    A mapping `{target: method}` picks the method per target where variants run at the same targets
    (a recipe changed after some points ran keeps them in the report as an ablation); it comes back as
    `name@t1,t2+name2@t3` (`declared_points` reads it)."""
    cfg = {k: v for k, v in cfg.items() if k != "run_targets"}  # checked against the declaration, not one run's
    declared = cfg.get("lte_method") or "lte"
    if isinstance(declared, dict):
        return _lte_method_by_target(cfg, declared)
    names = [declared] if isinstance(declared, str) else list(declared)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise LTEError(f"lte_method: give one method name, a list of names or a mapping target: name; got {declared!r}")
    for name in names:
        _check_lte_variant(cfg, name)
    if len(names) > 1:
        seen: dict[float, str] = {}
        for name in names:
            for value in knob_values(cfg, name):
                if value in seen:
                    raise LTEError(f"lte_method: {seen[value]!r} and {name!r} both run at {value:g}; the methods "
                                   "of one declared recipe must cover different targets (set each variant's "
                                   "`targets`, or map each target to its method: {0.5: name, 0.9: other})")
                seen[value] = name
    return "+".join(names)


def _check_lte_variant(cfg: dict[str, Any], name: str) -> None:
    if name != "lte" and name not in (cfg.get("variants") or {}):
        raise LTEError(f"lte_method: {name!r} is neither `lte` nor a variant of this config")
    if name != "lte" and method_plan(cfg, name)[0] != "lte":
        raise LTEError(f"lte_method: {name!r} is a variant of a baseline, not of lte")


def _lte_method_by_target(cfg: dict[str, Any], declared: dict[Any, Any]) -> str:
    by_name: dict[str, list[float]] = {}
    for key, name in declared.items():
        try:
            target = float(key)
        except (TypeError, ValueError):
            raise LTEError(f"lte_method: the keys of a mapping are targets (numbers); got {key!r}") from None
        if not isinstance(name, str) or not name:
            raise LTEError(f"lte_method: map each target to one method name; got {name!r} at {target:g}")
        _check_lte_variant(cfg, name)
        if not any(abs(target - v) < 1e-9 for v in knob_values(cfg, name)):
            raise LTEError(f"lte_method: {name!r} does not run at {target:g} (its targets: "
                           f"{', '.join(f'{v:g}' for v in knob_values(cfg, name))})")
        by_name.setdefault(name, []).append(target)
    if not by_name:
        raise LTEError("lte_method: the mapping is empty; map each target to the LTE method compared there")
    return "+".join(f"{name}@{','.join(f'{t:g}' for t in sorted(ts))}" for name, ts in by_name.items())


def declared_points(method: str) -> dict[str, set[float] | None]:
    """`lte_method`'s joined form read back: method name -> the targets it is compared at (None: all)."""
    spec: dict[str, set[float] | None] = {}
    for part in method.split("+"):
        name, _, targets = part.partition("@")
        spec[name] = {float(t) for t in targets.split(",")} if targets else None
    return spec


def knob_values(cfg: dict[str, Any], method: str) -> list[float]:
    """The values a method is run at: the targets (a variant's own, else the study's), or `lte_etas` for LTE
    runs steered by eta; a run narrowed by `--targets` (`run_targets`) keeps only those of them."""
    base, extra = method_plan(cfg, method)
    lte = merge(merge(DEFAULTS, {k: v for k, v in cfg.items() if k in DEFAULTS}), extra)["lte"]
    if base in REFERENCES:  # no sparsity: one point, whatever the study's targets
        return [0.0]
    own = (cfg.get("variants") or {}).get(method, {}).get("targets")
    if own:  # a variant (an ablation) may run at fewer values than the study
        values = [float(v) for v in own]
    elif base == "lte" and lte["knob"] == "eta":
        if not cfg.get("lte_etas"):
            raise LTEError("lte.knob is 'eta': give the eta values as lte_etas: [...]")
        return [float(v) for v in cfg["lte_etas"]]
    else:
        values = [float(v) for v in cfg["targets"]]
    narrowed = cfg.get("run_targets")
    return values if narrowed is None else [v for v in values if _declared(v, narrowed)]


def declared_targets(cfg: dict[str, Any]) -> set[float]:
    """Every target a study declares: its `targets`, its variants' own `targets` and its `lte_etas`."""
    values = {float(t) for t in (cfg.get("targets") or [0.3, 0.5, 0.7, 0.9])}
    values |= {float(v) for v in (cfg.get("lte_etas") or [])}
    for spec in (cfg.get("variants") or {}).values():
        if isinstance(spec, dict):
            values |= {float(t) for t in (spec.get("targets") or [])}
    return values


def _declared(value: float, values: Any) -> bool:
    return any(abs(value - float(v)) < 1e-9 for v in values)


def baseline_options(settings: dict[str, Any], base: str) -> dict[str, Any]:
    """The keyword options `apply_baseline` gets for method `base` under resolved study `settings`:
    the shared expert settings (size, grouping, seed), the calibration budget, then the method's own
    `method_options` (which win)."""
    return {"expert_size": settings["expert_size"], "grouping": settings["grouping"], "seed": settings["seed"],
            "batch_size": settings["calib"]["batch_size"], "calib_tokens": settings["calib"]["tokens"],
            **(settings["method_options"].get(base) or {})}


def study_out(cfg: dict[str, Any], out_dir: str | Path | None = None) -> Path:
    return Path(out_dir or cfg.get("out") or f"runs/study/{cfg.get('name', cfg.get('task', 'study'))}")

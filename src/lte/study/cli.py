"""`lte baseline`, `lte sweep` and `lte study`: the baselines and the study from the command line.

    lte baseline --method teal --model smollm2-135m --task causal-lm --target-sparsity 0.5 \\
        --calib-data ../shared/data/lm/wikitext2_tok_valid.txt --eval-data ../shared/data/lm/wikitext2_tok_test.txt \\
        --out runs/teal50
    lte sweep --method lte,teal,cats --targets 0.3,0.5,0.7,0.9 --task causal-lm --model smollm2-135m \\
        --data ../shared/data/lm/wikitext2_tok_valid.txt --eval-data ../shared/data/lm/wikitext2_tok_test.txt --out runs/sweep
    lte study configs/study/wikitext2-smollm2.yaml --out runs/study/wikitext2-smollm2
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

from .config import parse_set

__all__ = ["add_study_commands"]


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.3,0.5,0.7, got {text!r}") from err


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a study setting, e.g. train.max_steps=50 or calib.tokens=4096 (repeatable)")
    p.add_argument("--tiny", action="store_true", help="tiny budgets (a CPU smoke run)")


def add_study_commands(sub) -> None:
    """Register `baseline`, `sweep`, `study` and `scoreboard` on the `lte` command's subparsers."""
    from ..baselines.methods import METHODS
    from .config import KINDS

    p = sub.add_parser("baseline", help="build one baseline (TEAL, CATS, MoEfication, Deja Vu, random top-k)",
                       description="Apply a baseline to a model at a target sparsity, optionally evaluate and save it.")
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--model", required=True, help="model folder, embedded name (smollm2-135m, minilm, mpnet) or hub name")
    p.add_argument("--task", default="causal-lm", choices=KINDS)
    p.add_argument("--glue-task", help="GLUE task for --task classification")
    p.add_argument("--target-sparsity", type=float, default=0.5)
    p.add_argument("--calib-data", required=True, help="data to calibrate / train predictors on (task format)")
    p.add_argument("--eval-data", help="evaluate on this data after building")
    p.add_argument("--out", help="save the baseline model here")
    _add_common(p)
    p.set_defaults(func=run_baseline)

    p = sub.add_parser("sweep", help="quality vs FFN sparsity of methods over targets, with plots",
                       description="Run methods over sparsity targets on one task; writes CSV/JSON and PNG plots.")
    p.add_argument("--method", required=True, type=_names, help="comma list: lte," + ",".join(METHODS))
    p.add_argument("--targets", type=_floats, default=[0.3, 0.5, 0.7, 0.9], help="comma list of target sparsities")
    p.add_argument("--etas", type=_floats, help="LTE: sweep eta values instead of targets")
    p.add_argument("--task", required=True, choices=KINDS)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="training / calibration data")
    p.add_argument("--eval-data", help="evaluation data (default: a held-out part of --data, or GLUE dev)")
    p.add_argument("--glue-task")
    p.add_argument("--config", help="YAML with study settings (flags override it)")
    p.add_argument("--out", required=True)
    _add_common(p)
    p.set_defaults(func=run_sweep_command)

    p = sub.add_parser("study", help="run a study config (every method, every target) and plot it",
                       description="Run configs/study/<task>.yaml: all methods over its targets, results + plots. "
                                   "Finished points are kept, so a rerun resumes where an interrupted one stopped.")
    p.add_argument("config", nargs="+", help="study YAML(s), e.g. configs/study/sst2-minilm.yaml")
    p.add_argument("--out", help="output folder of a single study (default: the config's `out` or runs/study/<name>)")
    p.add_argument("--root", default="runs/study", help="with several configs: each study goes to ROOT/<name>")
    p.add_argument("--methods", type=_names, help="only these methods (comma list); in parallel runs every seed of the first-named "
                   "starts before the next (so a run cut by --time-limit leaves whole methods done)")
    p.add_argument("--targets", type=_floats, help="run only these of the declared targets (comma list; the config's "
                   "`targets:` or a variant's own); with several configs each runs those it declares")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes run at once (units: dense, then one per trained method and target); "
                        "small models leave a GPU idle, so several workers finish sooner")
    p.add_argument("--time-limit", type=float, help="seconds: stop the workers then and summarise what finished; "
                   "a unit still training writes a checkpoint (within 60 s) that the next run resumes")
    p.add_argument("--collect", action="store_true", help="train nothing: summarise and plot the finished points")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one unit of a parallel study
    _add_common(p)
    p.set_defaults(func=run_study_command)

    p = sub.add_parser("scoreboard", help="LTE against the best baseline over finished studies (wins and losses)",
                       description="Read the summary.json of finished studies (`lte study`, `--collect`) and list, "
                                   "at each point of each study's declared LTE method (`lte_method`) of >= 50% "
                                   "sparsity, the best baseline there, the margin and whether it is within one std; "
                                   "then the wins and losses, and once per task and target where two studies ran "
                                   "the same task (the one with the most training steps).")
    p.add_argument("summaries", nargs="+", help="summary.json files or study folders, e.g. runs/study/*/")
    p.add_argument("--out", help="also write OUT.md and OUT.json")
    p.set_defaults(func=run_scoreboard_command)


def run_baseline(args: argparse.Namespace) -> int:
    from ..baselines.methods import FINETUNED, apply_baseline
    from .config import TINY, baseline_options, merge
    from .tasks import prepare_dense, setup_task

    settings = parse_set(args.set)
    if args.tiny:
        settings = merge(TINY, settings)
    if args.glue_task:
        settings["glue_task"] = args.glue_task
    settings.setdefault("dense", {})["max_steps"] = settings.get("dense", {}).get("max_steps", 0)
    setup = setup_task(args.task, args.model, args.calib_data, args.eval_data, settings=settings)
    dense = prepare_dense(setup, args.out or "runs/baseline")
    options = baseline_options(setup.settings, args.method)  # as a study builds it: --set expert_size=8 applies
    build = FINETUNED.get(args.method, args.method)  # dejavu-ft, sketch-ft: the method, then fine-tuning
    trains = args.method in (*FINETUNED, "random-topk")  # the methods that train the model: fine-tuned here
    if trains:
        from .runner import finetune_args

        hp = finetune_args(setup)
        # distillation learns from the dense model as it is now (apply_baseline changes `dense` in place)
        teacher = copy.deepcopy(dense).eval() if any(hp.get(k) for k in ("distill", "distill_hidden")) else None
    model = apply_baseline(dense, build, args.target_sparsity, calib_data=setup.calib, **options)
    if args.method in FINETUNED:
        model.method = args.method
    if trains:
        from ..training.finetune import finetune

        model.finetune_result = finetune(model, setup.train_data, setup.tokenizer,
                                         str(Path(args.out or "runs/baseline") / "finetune"), teacher=teacher, **hp)
    report: dict[str, Any] = {"method": args.method, "target_sparsity": args.target_sparsity}
    if args.eval_data:
        result = setup.evaluate(model)
        report["eval"] = {k: v for k, v in result.items() if k not in ("samples",)}
    else:
        import torch

        with torch.no_grad():
            model.reset_lte_stats()
            device = next(model.parameters()).device
            for batch in setup.calib:
                model(**{k: v.to(device) for k, v in batch.items()})
        stats = model.lte_stats(accumulated=True)
        report["calibration_stats"] = {k: v for k, v in stats.items() if k != "union_sparsity"}
    if args.out:
        model.save_pretrained(args.out)
        setup.tokenizer.save_pretrained(args.out)
        (Path(args.out) / "baseline_report.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    return 0


def run_sweep_command(args: argparse.Namespace) -> int:
    from .config import load_study_config, merge
    from .runner import run_study

    cfg = load_study_config(args.config) if args.config else {}
    cfg = merge(cfg, {"task": args.task, "model": args.model, "data": args.data, "methods": args.method,
                      "targets": args.targets, "name": cfg.get("name", Path(args.out).name)})
    if args.eval_data:
        cfg["eval_data"] = args.eval_data
    if args.glue_task:
        cfg["glue_task"] = args.glue_task
    if args.etas:
        cfg = merge(cfg, {"lte": {"knob": "eta"}, "lte_etas": args.etas})
    cfg = merge(cfg, parse_set(args.set))
    return _report(run_study(cfg, args.out, tiny=args.tiny))


def run_study_command(args: argparse.Namespace) -> int:
    from ..errors import LTEError
    from .config import load_study_config, merge, study_config, study_out
    from .runner import collect_study, run_study
    from .seeds import seed_studies

    overrides = parse_set(args.set)
    configs = [merge(load_study_config(path), overrides) for path in args.config]
    if len(configs) == 1:
        cfg = configs[0]
        out = args.out or cfg.get("out") or Path(args.root) / cfg.get("name", cfg.get("task", "study"))
        if args.worker:
            result = run_study(cfg, out, methods=args.methods, targets=args.targets, worker=True)
            return 1 if result["failures"] else 0
        return _report(run_study(cfg, out, tiny=args.tiny, methods=args.methods, targets=args.targets,
                                 jobs=args.jobs, collect_only=args.collect, time_limit=args.time_limit))
    if args.out or args.worker:
        raise LTEError("with several configs use --root (each study goes to ROOT/<name>), not --out")
    import time

    from .parallel import run_parallel

    studies = []
    per_config = _methods_per_config(configs, args.methods)
    for cfg, methods, targets in zip(configs, per_config, _targets_per_config(configs, args.targets)):
        if methods == []:
            print(f"{cfg.get('name')}: none of --methods is declared here; skipped")
            continue
        if targets == []:
            print(f"{cfg.get('name')}: none of --targets is declared here; skipped")
            continue
        full = study_config(cfg, args.tiny, methods, targets)
        studies.append((full, study_out(full, Path(args.root) / full.get("name", full["task"]))))
    start = time.perf_counter()
    failures: dict[str, dict[str, str]] = {}
    if not args.collect:  # every seed of every study shares one pool of workers
        units = [pair for full, out in studies for pair in seed_studies(full, out)]
        failures = run_parallel(units, max(1, args.jobs), time_limit=args.time_limit)
    code = 0
    for cfg, out in studies:
        try:
            code |= _report(collect_study(cfg, out, failures=failures, seconds=time.perf_counter() - start))
        except LTEError as err:
            print(f"{cfg.get('name')}: {err}")
            code = 1
    return code


def _methods_per_config(configs: list[dict[str, Any]], methods: list[str] | None) -> list[list[str] | None]:
    """With several configs, `--methods` names methods of any of them: each config runs those it declares
    (its `methods:` list or `variants`). A built-in method (`lte`, `teal`, ...) that no config declares
    runs in every config; one that some declare runs only there (`--methods dejavu-ft,lte-x` does not add
    Deja Vu + FT to a config that does not list it). A name that no config knows is an error, so a typo
    does not silently run nothing."""
    from ..baselines.methods import canonical_method
    from ..errors import LTEError
    from .config import REFERENCES

    if not methods:
        return [None] * len(configs)

    def builtin(name: str) -> bool:
        try:
            return name in ("lte",) + REFERENCES or bool(canonical_method(name))
        except LTEError:
            return False

    declared = [set(cfg.get("methods") or []) | set(cfg.get("variants") or {}) for cfg in configs]
    nowhere = {m for m in methods if not any(m in names for names in declared) and builtin(m)}
    picked = [[m for m in methods if m in names or m in nowhere] for names in declared]
    unknown = [m for m in methods if not any(m in p for p in picked)]
    if unknown:
        names = ", ".join(str(cfg.get("name")) for cfg in configs)
        raise LTEError(f"--methods: {', '.join(unknown)} is declared in none of the configs ({names}); check the "
                       "spelling against their `methods:` lists and `variants`")
    return picked


def _targets_per_config(configs: list[dict[str, Any]], targets: list[float] | None) -> list[list[float] | None]:
    """With several configs, `--targets` names targets of any of them: each config runs those it declares (its
    `targets:`, its variants' own, `lte_etas`), so one call can run a study declared at 0.9 and a round declared
    at 0.5 with `--targets 0.9,0.5` and nothing undeclared. A value no config declares is an error."""
    from ..errors import LTEError
    from .config import declared_targets

    if not targets:
        return [None] * len(configs)
    sets = [declared_targets(cfg) for cfg in configs]
    picked = [[t for t in targets if any(abs(t - v) < 1e-9 for v in values)] for values in sets]
    unknown = [t for t in targets if not any(t in p for p in picked)]
    if unknown:
        names = ", ".join(f"{cfg.get('name')} ({', '.join(f'{v:g}' for v in sorted(values))})"
                          for cfg, values in zip(configs, sets))
        raise LTEError(f"--targets: {', '.join(f'{t:g}' for t in unknown)} is declared in no config ({names}); add "
                       "it to a config's `targets:` (or a variant's) before running it")
    return picked


def run_scoreboard_command(args: argparse.Namespace) -> int:
    from ..errors import LTEError

    summaries = []
    for name in args.summaries:
        path = Path(name) / "summary.json" if Path(name).is_dir() else Path(name)
        if not path.is_file():
            raise LTEError(f"no study summary at '{path}': run `lte study CONFIG` (or `--collect`) first")
        summaries.append(json.loads(path.read_text()))
    from .scoreboard import pending_points, scoreboard_markdown, scoreboard_rows

    rows = [row for summary in summaries for row in scoreboard_rows(summary)]
    text = scoreboard_markdown(rows, [p for summary in summaries for p in pending_points(summary)])
    print(text)
    if args.out:
        md = Path(args.out).with_suffix(".md")
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text)
        md.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    return 0


def _report(summary: dict[str, Any]) -> int:
    """Print a short table: per method, the (sparsity, quality) points and GFLOPs within tolerance."""
    print(f"{summary['name']}: {summary['metric']} ({'higher' if summary['higher_is_better'] else 'lower'} "
          f"is better), dense {summary['dense_quality']:.4g}, {summary['dense_gflops_per_token']:.4g} GFLOPs/token, "
          f"{summary.get('seconds') or 0:.0f} s on {summary['device']}")
    for method, row in summary["methods"].items():
        stds = row.get("quality_std") or [None] * len(row["points"])
        pts = "  ".join(f"{100 * s:.0f}%:{q:.4g}" + (f"±{sd:.2g}" if sd else "") for (s, q), sd in zip(row["points"], stds))
        tol = row["gflops_within_tolerance"]
        print(f"  {method:18s} {pts}   within tolerance: {'-' if tol is None else f'{tol:.4g} GFLOPs/token'}")
    name = summary.get("lte_method") or "lte"
    for row in summary.get("lte_vs_others", []):
        ties = f"; ties with {', '.join(row['ties'])}" if row.get("ties") else ""
        print(f"  LTE ({name}) at {100 * row['ffn_sparsity']:.0f}%: beats {', '.join(row['beats']) or '-'}; "
              f"loses to {', '.join(row['loses_to']) or '-'}{ties}")
    for method, err in summary.get("failures", {}).items():
        print(f"  {method:18s} FAILED: {err}")
    if summary.get("missing"):
        print(f"  missing points: {', '.join(summary['missing'])}")
    print("plots: " + ", ".join(summary.get("plots", {}).values()))
    return 1 if summary.get("failures") else 0

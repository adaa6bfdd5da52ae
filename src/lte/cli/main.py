"""The `lte` command: train, eval, run, demo, generate, bench, baseline, sweep, study, scoreboard.

Every subcommand stores its handler in `func` (called with the parsed arguments, returns an
exit code). Settings of `train` and `eval` may come from `--config FILE.yaml` whose keys mirror
the flags (`batch_size` or `batch-size`); flags given on the command line override the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


# ---------------------------------------------------------------------- helpers
def _setting_type(name: str, kind: type):
    """An argparse type for the stage setting `name`: converts, then checks with `check_setting` at parse time."""
    from lte.errors import LTEError
    from lte.training.args import check_setting

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        try:
            check_setting(name, value)
        except LTEError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    """One flag per stage setting (`--batch-size`), help from the field's metadata, all defaulting to 'not given'.

    Values are checked while the command line is parsed (ranges, choices: `lte.training.args.check_setting`).
    """
    from lte.training.args import setting_fields

    group = parser.add_argument_group("training settings (YAML keys of the same name)")
    for name, kind, default, helptext in setting_fields():
        if name in ("resume", "overwrite"):  # their own flags on `lte train`
            continue
        flag = "--" + name.replace("_", "-")
        helptext = helptext + (f" (default {default})" if default is not None else "")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=helptext)
        else:
            group.add_argument(flag, type=_setting_type(name, kind), default=argparse.SUPPRESS, help=helptext)


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _glue_task_name(text: str) -> str:
    """An argparse type: a GLUE task name in any usual spelling (SST-2, sst2, ...)."""
    from lte.data import glue_task
    from lte.errors import LTEError

    try:
        glue_task(text)
    except LTEError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _given(args: argparse.Namespace, skip: tuple[str, ...] = ("command", "func", "config", "verbose")) -> dict:
    return {k: v for k, v in vars(args).items() if k not in skip}


def _merged(args: argparse.Namespace) -> dict[str, Any]:
    """Settings from --config (if any) overridden by the flags given on the command line."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        from lte.study.pipeline import load_run_config

        values.update(load_run_config(args.config))
    values.update(_given(args))
    return values


def _require(values: dict[str, Any], keys: tuple[str, ...], command: str) -> None:
    from lte.training.errors import StageInputError

    missing = [k for k in keys if values.get(k) in (None, "")]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise StageInputError(f"`lte {command}` needs {flags} (on the command line or in --config)")


# ---------------------------------------------------------------------- train
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="run one training stage: dense fine-tune, stage 1 or stage 2",
                       description="Run one training stage. Stage 1 groups the neurons of a dense (fine-tuned) "
                                   "model and trains model + routers with soft routing; stage 2 freezes the "
                                   "routers and fine-tunes with hard routing.")
    p.add_argument("--model", default=argparse.SUPPRESS,
                   help="model folder (previous stage's --out), embedded name (smollm2-135m, minilm, mpnet) or hub name")
    p.add_argument("--task", choices=("causal-lm", "classification", "instruction"), default=argparse.SUPPRESS)
    p.add_argument("--data", nargs="+", default=argparse.SUPPRESS,
                   help="training data: text/JSONL file or folder ('builtin' = text shipped with Python), "
                        "GLUE folder or TSV, instruction JSON/JSONL; causal LM: several sources train on "
                        "their mix (e.g. general text beside your own, so the routers see both)")
    p.add_argument("--stage", choices=("dense", "1", "2"), default=argparse.SUPPRESS)
    p.add_argument("--out", default=argparse.SUPPRESS, help="output directory of the stage")
    p.add_argument("--config", default=None, help="YAML file of settings (keys mirror the flags)")
    p.add_argument("--resume", action="store_true", default=argparse.SUPPRESS,
                   help="continue an interrupted run from the newest checkpoint-N in --out (refused when the "
                        "checkpoint was written with other settings)")
    p.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                   help="replace what --out holds (a finished stage, or the checkpoints of an interrupted run); "
                        "without it such a folder is refused")
    _add_train_args(p)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from lte.loading import model_source

    values = _merged(args)
    _require(values, ("model", "task", "data", "stage", "out"), "train")
    model_source(values["model"])  # a hub name that cannot be fetched fails here, before the training imports
    from lte.training import train_stage

    stage, model, task, data, out = (values.pop(k) for k in ("stage", "model", "task", "data", "out"))
    if isinstance(data, list) and len(data) == 1:
        data = data[0]  # one source, as before
    for key in ("name", "eval_data", "holdout", "eval", "dense", "stage1", "stage2", "skip_dense"):
        values.pop(key, None)  # pipeline-only keys a shared YAML file may carry
    from lte.training import StopOnRequest, TrainingStopped, install_stop_handler

    # Ctrl-C or SIGTERM: finish the step, save a checkpoint, stop (twice Ctrl-C: at once)
    stop = install_stop_handler((signal.SIGTERM, signal.SIGINT))
    try:
        record = train_stage(str(stage), model, task, data, out, callbacks=[StopOnRequest(stop)], **values)
    except TrainingStopped as err:
        print(f"[lte train] stopped at step {err.step}: checkpoint-{err.step} in {out}. Continue with the same "
              "command and --resume.", flush=True)
        return 130
    record.pop("trainer", None)
    summary = {k: record.get(k) for k in ("stage", "global_step", "eta", "train_sparsity", "target_sparsity")}
    print(f"[lte train] done: {out}  " + json.dumps({k: v for k, v in summary.items() if v is not None}))
    return 0


# ---------------------------------------------------------------------- eval
def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="quality + FFN sparsity per layer + GFLOPs/token of a saved model",
                       description="Evaluate a saved model. The result goes to <model>/eval_<task>_<data>_<hash>.json "
                                   "(named by model, data and settings, so earlier results are kept) and a PNG.")
    p.add_argument("--model", default=argparse.SUPPRESS, help="model folder (LTE or plain HF) or embedded name")
    p.add_argument("--task", choices=("causal-lm", "classification", "instruction"), default=argparse.SUPPRESS,
                   help="default: the task the model folder was trained for")
    p.add_argument("--data", default=argparse.SUPPRESS, help="evaluation data (text file, GLUE folder/TSV, ...)")
    p.add_argument("--glue-task", type=_glue_task_name, default=argparse.SUPPRESS,
                   help="GLUE task of --task classification (default: the one the model was trained on)")
    p.add_argument("--routing", choices=("hard", "soft", "dense"), default=argparse.SUPPRESS,
                   help="routing of an LTE model (default hard)")
    p.add_argument("--split", choices=("train", "dev", "test"), default=argparse.SUPPRESS,
                   help="GLUE split (default dev)")
    p.add_argument("--batch-size", type=_positive_int, default=argparse.SUPPRESS)
    p.add_argument("--max-length", type=_positive_int, default=argparse.SUPPRESS,
                   help="perplexity window / classification truncation")
    p.add_argument("--stride", type=_positive_int, default=argparse.SUPPRESS, help="perplexity window stride")
    p.add_argument("--max-tokens", type=_positive_int, default=argparse.SUPPRESS, help="score only the first N tokens")
    p.add_argument("--max-examples", type=_positive_int, default=argparse.SUPPRESS)
    p.add_argument("--text-field", default=argparse.SUPPRESS, help="JSON/JSONL field holding the text (default text)")
    p.add_argument("--out", default=argparse.SUPPRESS,
                   help="JSON result file (default <model>/eval_<task>_<data>_<hash>.json)")
    p.add_argument("--plot", default=argparse.SUPPRESS, help="per-layer sparsity PNG (default next to the JSON)")
    p.add_argument("--config", default=None, help="YAML file of settings (keys mirror the flags)")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from lte.evaluation import plot_layer_sparsity
    from lte.evaluation.saved import evaluate_model, resolve_task, result_path

    values = _merged(args)
    _require(values, ("model", "data"), "eval")
    model, data = values["model"], values["data"]
    task, glue_task = resolve_task(model, values.get("task"), values.get("glue_task"))
    keys = ("routing", "split", "batch_size", "max_length", "stride", "max_tokens", "max_examples", "text_field")
    settings = {k: values[k] for k in keys if values.get(k) is not None}
    result = evaluate_model(model, task, data, glue_task=glue_task, **settings)
    out = Path(values.get("out") or result_path(model, task, data, glue_task=glue_task, **settings))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot = Path(values.get("plot") or out.with_suffix(".png"))
    if result.get("per_layer_sparsity"):
        plot_layer_sparsity({str(model): result["per_layer_sparsity"]}, plot, f"{model}: FFN sparsity per layer")
    print(f"{result.get('metric', 'score')}: {result.get('score'):.4f}   FFN sparsity: "
          f"{100 * result.get('ffn_sparsity', 0):.1f}%   GFLOPs/token: {result.get('gflops_per_token', 0):.4f}")
    print(f"[lte eval] wrote {out}" + (f" and {plot}" if result.get("per_layer_sparsity") else ""))
    return 0


# ---------------------------------------------------------------------- run / demo
def _add_run(sub) -> None:
    p = sub.add_parser("run", help="dense fine-tune -> group -> stage 1 -> stage 2 -> eval -> report (resumable)")
    p.add_argument("--config", required=True, help="run description (YAML), e.g. configs/wikitext2-smollm2.yaml")
    p.add_argument("--out", default=None, help="override the config's output directory")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stage1.max_steps=50 (repeatable)")
    p.add_argument("--force-eval", action="store_true", help="re-run the evaluations even if cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_run)


def run_run(args: argparse.Namespace) -> int:
    from lte.study.config import merge, parse_set
    from lte.study.pipeline import load_run_config

    cfg = merge(load_run_config(args.config), parse_set(args.set, dashes_to_underscores=True))
    if args.out:
        cfg["out"] = args.out
    return _run_and_report(cfg, args.force_eval, not args.no_progress)


def _run_and_report(cfg: dict[str, Any], force_eval: bool, progress: bool) -> int:
    from lte.study.pipeline import format_table, run_pipeline
    from lte.training import StopOnRequest, TrainingStopped, install_stop_handler

    # Ctrl-C or SIGTERM: the stage in training saves a checkpoint; the same command continues it
    stop = install_stop_handler((signal.SIGTERM, signal.SIGINT))
    try:
        report = run_pipeline(cfg, force_eval=force_eval, progress=progress, callbacks=[StopOnRequest(stop)])
    except TrainingStopped as err:
        print(f"[lte] stopped at step {err.step} with a checkpoint in {cfg['out']}; run the same command again "
              "to continue from it.", flush=True)
        return 130
    out = Path(cfg["out"])
    print()
    print(format_table(report))
    print(f"\nreport: {out / 'report.json'}\nplot:   {report['plot']}")
    print(_disk_line(out))
    return 0


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _disk_line(out: Path) -> str:
    """How much disk a run's folder takes, per stage: `disk:   1.63 GB in runs/demo (dense 0.54 GB, ...)`."""
    parts = [f"{d.name} {_folder_bytes(d) / 1e9:.2f} GB" for d in sorted(out.iterdir()) if d.is_dir()]
    checkpoints = sum(1 for _ in out.glob("*/checkpoint-*"))
    kept = f"{checkpoints} checkpoint folder(s) kept" if checkpoints else "final models only, no checkpoints"
    return f"disk:   {_folder_bytes(out) / 1e9:.2f} GB in {out} ({', '.join(parts)}; {kept})"


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="offline demo: the whole pipeline on SmolLM2-135M and text shipped with Python")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--config", default=None, help="use this run description instead of the built-in demo")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a demo setting (repeatable)")
    p.add_argument("--fresh", action="store_true", help="delete the output directory first")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    import shutil

    from lte.cli.demo import demo_config
    from lte.study.config import merge, parse_set
    from lte.study.pipeline import load_run_config

    cfg = load_run_config(args.config) if args.config else demo_config()
    cfg = merge(cfg, parse_set(args.set, dashes_to_underscores=True))
    cfg["out"] = args.out
    if args.fresh and Path(args.out).exists():
        shutil.rmtree(args.out)
    return _run_and_report(cfg, False, not args.no_progress)


# ---------------------------------------------------------------------- entry point
class _Parser(argparse.ArgumentParser):
    """argparse with a short error: one line saying what is wrong, and where the options are listed.

    (The stock error prints the whole usage first, which for `lte train` is some thirty lines.)
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}  (`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    from lte import __version__

    parser = _Parser(prog="lte", description="Learn To be Efficient: structured FFN sparsity "
                                     "for Hugging Face models (train, evaluate, serve).")
    parser.add_argument("--version", action="version", version=f"lte {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_run(sub)
    _add_demo(sub)
    from lte.serving.cli import add_serving_commands
    from lte.study.cli import add_study_commands

    add_serving_commands(sub)  # generate, bench, tune
    add_study_commands(sub)  # baseline, sweep, study, scoreboard
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from lte.errors import LTEError
    from lte.training.errors import NonFiniteLossError

    try:
        return int(args.func(args) or 0)
    except NonFiniteLossError as err:
        print(f"lte: training stopped: {err}", file=sys.stderr)
        return 3
    except LTEError as err:
        print(f"lte: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lte: interrupted; run the same command with --resume (train) or again (run, study) to continue",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

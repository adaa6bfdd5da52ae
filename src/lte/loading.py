"""`load_model`: the one loader for every model lte reads.

    model = lte.load_model("runs/s2")                       # an LTE save -> LTEModel, routing as saved
    model = lte.load_model("runs/s2", routing="hard")       # ... switched to hard routing
    model = lte.load_model("runs/s2", routing="served")     # ... as trained: topk if saved so, else hard
    model = lte.load_model("runs/teal50")                   # a baseline save -> BaselineModel
    model = lte.load_model("runs/dense", task="classification", num_labels=2)   # a plain HF folder
    model = lte.load_model("smollm2-135m")                  # an embedded model, or a hub name

Training, evaluation, serving and the study load through it. The questions around a load are
answered here too, so that no caller reads save files itself: where a name points
(`model_source`), what a folder holds (`model_kind`, `saved_stage`), whether its head fits a task
(`check_head`), and its tokenizer (`load_tokenizer`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from .errors import LTEError

logger = logging.getLogger(__name__)

__all__ = ["STAGE_RECORD", "base_path", "check_head", "has_adapters", "head_task", "load_model", "load_tokenizer",
           "model_kind", "model_source", "saved_stage", "saved_task"]

KINDS = ("lte", "baseline", "hf")
#: The record a training stage writes next to its model (`lte.training.train_stage`): what ran, how, how far.
STAGE_RECORD = "lte_stage.json"


def _lte_config_name() -> str:
    from .checkpoint import CONFIG_NAME

    return CONFIG_NAME


def head_task(task: str | None) -> str:
    """The head a task needs: "classification" for classification, "causal-lm" for every other task."""
    return "classification" if task == "classification" else "causal-lm"


def model_source(model: str | os.PathLike) -> Path | str:
    """A local folder for `model` (an existing folder, the folder of an embedded name, or a hub name's cached
    snapshot when the Hub cannot be reached), else the hub name itself (`lte.hub.resolve_hub_model`)."""
    path = Path(model).expanduser()
    if path.exists():
        if path.is_dir() and (path / _lte_config_name()).is_file() and not (path / "config.json").is_file():
            if base_path(path) is None:
                raise LTEError(f"{path} is a light LTE save (routers only) that does not record its base: load its "
                               "base model yourself and call lte.LTEModel.from_base(base_model, folder)")
            return path
        if not path.is_dir() or not (path / "config.json").is_file():
            raise LTEError(
                f"model path {path} is not a saved model folder (no config.json). Pass a folder written by "
                "save_pretrained / a previous stage, an embedded name (smollm2-135m, minilm, mpnet) or a hub name."
            )
        return path
    from .data import zoo

    key = zoo.canonical_name(str(model))
    if key is not None:
        return zoo.embedded_folder(key)
    from .hub import resolve_hub_model

    return resolve_hub_model(str(model))  # the cached snapshot when offline; refused at once when unreachable


def model_kind(folder: str | os.PathLike) -> str:
    """What a model folder holds: "lte" (an LTE save), "baseline" (a baseline save) or "hf" (a plain HF model)."""
    from .baselines.model import BaselineModel
    from .model import LTEModel

    if LTEModel.is_saved_in(folder):
        return "lte"
    if BaselineModel.is_saved_in(folder):
        return "baseline"
    return "hf"


def base_path(folder: str | os.PathLike) -> str | None:
    """The base model a light LTE save records (None for a full save, or a light save without one)."""
    meta = json.loads((Path(folder) / _lte_config_name()).read_text())
    return None if meta.get("weights_permuted", True) else meta.get("base_path")


def has_adapters(folder: str | os.PathLike) -> bool:
    """Whether an LTE save holds adapters (LoRA on a frozen base)."""
    meta = json.loads((Path(folder) / _lte_config_name()).read_text())
    return bool(meta.get("adapters"))


def saved_stage(folder: str | os.PathLike) -> str:
    """The training stage an LTE save records ("converted", "stage1", "stage2", ...)."""
    meta = json.loads((Path(folder) / _lte_config_name()).read_text())
    return str(meta.get("stage", "converted"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def saved_task(folder: str | os.PathLike) -> tuple[str | None, str | None]:
    """(task, GLUE task) a model folder was trained for, so that evaluating it needs neither again.

    The stage record (`lte_stage.json`) says both; without one the head says the task (a
    sequence-classification head: "classification", a language-model head: "causal-lm") and the
    config's `finetuning_task` the GLUE task (training sets it). None where nothing tells.
    """
    folder = Path(folder)
    record = _read_json(folder / STAGE_RECORD)
    config = _read_json(folder / "config.json")
    task = record.get("task")
    glue = (record.get("hparams") or {}).get("glue_task") or config.get("finetuning_task")
    if task is None:
        archs = config.get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            task = "classification"
        elif any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            task = "causal-lm"
    return task, (glue if task == "classification" else None)


def check_head(folder: Path, task: str) -> None:
    """Refuse a model folder whose head does not fit the task (a clear error, before loading)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return
    archs = json.loads(config_file.read_text()).get("architectures") or []
    lm_head = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    cls_head = any(a.endswith("ForSequenceClassification") for a in archs)
    if task in ("causal-lm", "instruction") and archs and not lm_head:
        raise LTEError(
            f"task '{task}' needs a model with a language-model head, but {folder} holds {archs}. "
            "Use --task classification for this model, or pass a causal LM (e.g. smollm2-135m)."
        )
    if task == "classification" and lm_head and not cls_head:
        raise LTEError(
            f"task 'classification' needs an encoder or a sequence-classification model, but {folder} holds "
            f"{archs} (a language-model head). Use --task causal-lm, or pass a classifier/encoder (e.g. minilm)."
        )


def _recorded_origin(folder: Path) -> str | None:
    """Where an lte save says its model came from (`tokenizer_source`), when that is not the folder itself."""
    from .baselines.model import BaselineModel

    for name in (_lte_config_name(), BaselineModel.config_name):
        origin = _read_json(folder / name).get("tokenizer_source")
        if origin and Path(origin).expanduser().resolve() != folder.resolve():
            return str(origin)
    return None


def _auto_tokenizer(source: Path | str, shown: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise LTEError(
            f"could not load a tokenizer for '{shown}': not a local model folder, not an embedded model "
            f"(smollm2-135m, minilm, mpnet), and the hub could not provide it ({err})"
        ) from err


def load_tokenizer(source: str | os.PathLike, model: str | os.PathLike | None = None, _depth: int = 0):
    """The tokenizer of a model folder, embedded name or hub name, checked against the model's vocabulary.

    A folder without tokenizer files uses the tokenizer of the model it was saved from, when its
    save records one (`tokenizer_source`, written by `LTEModel` / `BaselineModel.save_pretrained`);
    otherwise, or when the tokenizer's size does not fit the vocabulary of `model` (default: the
    folder itself), it is refused in one line instead of tokenizing text into unknown tokens.
    """
    from .data.zoo import check_tokenizer_fits, has_tokenizer_files

    resolved = model_source(source)
    if not isinstance(resolved, Path):
        tokenizer = _auto_tokenizer(resolved, source)
    elif has_tokenizer_files(resolved):
        tokenizer = _auto_tokenizer(resolved, source)
    else:
        origin = _recorded_origin(resolved) if _depth < 4 else None
        if origin is None:
            raise LTEError(
                f"'{source}' holds no tokenizer (no tokenizer.json / tokenizer_config.json / vocab file) and does "
                "not record the model it came from: save the tokenizer into it (tokenizer.save_pretrained(folder), "
                "or LTEModel.save_pretrained(folder, tokenizer=tokenizer))")
        logger.warning("%s holds no tokenizer; using the one of %s, the model it was saved from", source, origin)
        tokenizer = load_tokenizer(origin, model=model or resolved, _depth=_depth + 1)
    target = model_source(model) if model is not None else resolved
    if isinstance(target, Path):
        check_tokenizer_fits(tokenizer, target)
    return tokenizer


def load_model(path: str | os.PathLike, task: str | None = None, num_labels: int = 2, routing: str | None = None,
               check: bool = True, base: str | os.PathLike | None = None, **hf_kwargs: Any) -> nn.Module:
    """Load a model folder lte wrote, or a plain HF model, by what the folder holds.

    Args:
        path: an LTE save (`LTEModel.save_pretrained`), a baseline save, a plain HF model folder,
            an embedded name (smollm2-135m, minilm, mpnet) or a hub name.
        task: a plain HF model gets the head the task needs (classification: a sequence-classification
            head with `num_labels` outputs, 1 = regression; any other task: the causal-LM head); with
            `check`, a folder whose head does not fit the task is refused first (`check_head`).
        routing: LTE saves only: switch to this routing mode (default: the mode it was saved in);
            "served": the mode it runs in once trained, topk for a model saved in topk routing (a stage 2
            trained with `stage2_routing="topk"`), else hard.
        base: a light LTE save (adapters): its base model folder (default: the path the save records);
            a base whose fingerprint differs from the one the save records is refused.
        hf_kwargs: passed to `from_pretrained` (dtype, device_map, ...). A plain HF model loads in
            float32 unless `dtype` says otherwise.

    Returns an `LTEModel`, a `BaselineModel` or a Hugging Face `PreTrainedModel`. Tokenizers and
    pad tokens are the caller's (`load_tokenizer`, `lte.data.zoo.ensure_pad_token`).
    """
    source = model_source(path)
    if isinstance(source, Path):
        if task is not None and check:
            check_head(source, task)
        kind = model_kind(source)
        if kind == "lte":
            from .model import LTEModel

            model = LTEModel.from_pretrained(source, base=base, **hf_kwargs)
            if routing == "served":
                routing = "topk" if model.routing == "topk" else "hard"
            if routing is not None:
                model.set_routing(routing)
            return model
        if kind == "baseline":
            from .baselines.model import BaselineModel

            return BaselineModel.from_pretrained(source, **hf_kwargs)
    from .data.zoo import load_hf_model

    try:
        return load_hf_model(source, task=head_task(task), num_labels=num_labels, **hf_kwargs)
    except OSError as err:
        raise LTEError(f"could not load model '{path}': it is not a local folder, not an embedded model "
                       f"(smollm2-135m, minilm, mpnet), and the hub could not provide it ({err})") from err

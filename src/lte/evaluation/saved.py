"""Evaluating a saved model: `evaluate_model(folder, task, data)` for `lte eval` and `lte run`.

The model is loaded with `lte.load_model` (an LTE save in the routing it is served in unless told otherwise, a
baseline save, or a plain HF model) and scored by the task's evaluator; the result holds the
quality, the FFN sparsity (overall and per layer) and the GFLOPs/token measured while scoring.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from lte.errors import LTEError
from lte.evaluation._common import default_device

__all__ = ["evaluate_model", "load_eval_model", "resolve_task", "result_path"]

#: The settings that change an evaluation's numbers: part of its result file's name.
_NAMED_SETTINGS = ("glue_task", "routing", "split", "max_length", "stride", "max_tokens", "max_examples", "text_field")


def resolve_task(model_dir: str | Path, task: str | None, glue_task: str | None) -> tuple[str, str | None]:
    """The task (and GLUE task) to evaluate: as given, else what the model folder recorded when it was trained."""
    from lte.loading import model_source, saved_task

    source = model_source(model_dir)
    saved, saved_glue = saved_task(source) if isinstance(source, Path) else (None, None)
    task = task or saved
    if task is None:
        raise LTEError(f"'{model_dir}' does not record its task; pass --task causal-lm, classification or instruction")
    if task == "classification" and not glue_task:
        glue_task = saved_glue
        if not glue_task:
            raise LTEError(f"classification evaluation needs --glue-task (e.g. SST-2): '{model_dir}' does not record "
                           "the GLUE task it was trained on")
    return task, glue_task


def _slug(text: str) -> str:
    """File-name-safe short form of a name or path."""
    import re

    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-.")[:48] or "data"


def result_path(model_dir: str | Path, task: str, data: Any, **settings: Any) -> Path:
    """Where `lte eval` keeps a result: named by model, task, data and the settings that change the numbers.

    `<model folder>/eval_<task>_<data name>_<hash>.json` (a model given by name: `./eval_<model>_...`),
    the hash covering the data's full path and `settings`, so evaluating one model on two data
    files (or with two windows) keeps both results.
    """
    import hashlib
    import json

    folder = Path(model_dir)
    data_path = Path(str(data)).expanduser()
    data_id = str(data_path.resolve()) if data_path.exists() else str(data)
    named = {k: settings.get(k) for k in _NAMED_SETTINGS if settings.get(k) is not None}
    digest = hashlib.sha1(json.dumps({"task": task, "data": data_id, **named}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:8]
    stem = data_path.stem if data_path.exists() else str(data)
    prefix = "" if folder.is_dir() else f"{_slug(str(model_dir))}_"
    return (folder if folder.is_dir() else Path(".")) / f"eval_{prefix}{task}_{_slug(stem)}_{digest}.json"


def load_eval_model(model_dir: str | Path, task: str, num_labels: int = 2, routing: str | None = None):
    """(model, tokenizer, is_lte) for evaluation (`lte.load_model`); LTE models default to the routing they are
    served in (hard; topk for a model saved in topk routing)."""
    from lte.data.zoo import ensure_pad_token
    from lte.loading import load_model, load_tokenizer, model_kind, model_source

    source = model_source(model_dir)
    is_lte = isinstance(source, Path) and model_kind(source) == "lte"
    tokenizer = load_tokenizer(source)  # a missing or foreign tokenizer is refused before the model loads
    model = load_model(source, task=task, num_labels=num_labels, routing=(routing or "served") if is_lte else None)
    ensure_pad_token(model, tokenizer)
    return model, tokenizer, is_lte


def evaluate_model(model_dir: str | Path, task: str | None, data: Any, glue_task: str | None = None,
                   routing: str | None = None, batch_size: int = 8, max_length: int | None = None,
                   stride: int | None = None, max_tokens: int | None = None, max_examples: int | None = None,
                   split: str = "dev", holdout: float | None = None, train_block_size: int = 512,
                   train_max_tokens: int | None = None, text_field: str = "text",
                   progress: bool = True) -> dict[str, Any]:
    """Quality + FFN sparsity (overall, per layer) + GFLOPs/token of a saved model.

    causal-lm: sliding-window perplexity on `data` (its last `holdout` fraction when given);
    classification: GLUE metrics on the `split` of `data`; instruction: perplexity of the answers.
    With `holdout`, the text is split exactly as training split it (`train_block_size`,
    `train_max_tokens`) and the held-out tail is scored. `task` (and `glue_task`) None: what the
    model folder recorded when it was trained (`resolve_task`).
    """
    from lte import evaluation

    task, glue_task = resolve_task(model_dir, task, glue_task)
    num_labels = 2
    if task == "classification":
        from lte.data import glue_task as glue_spec

        num_labels = glue_spec(glue_task).num_labels
    model, tokenizer, is_lte = load_eval_model(model_dir, task, num_labels, routing)
    model.to(default_device())
    start = time.time()
    if task == "causal-lm":
        eval_ds = _lm_eval_data(data, tokenizer, holdout, train_block_size, train_max_tokens, text_field)
        result = evaluation.perplexity(model, eval_ds, max_length=max_length, stride=stride, batch_size=batch_size,
                                       max_tokens=max_tokens, progress=progress)
        result["metric"] = "perplexity"
        result["score"] = result["perplexity"]
    elif task == "classification":
        from lte.data import load_glue

        ds = load_glue(glue_task, data, tokenizer, split=split, max_length=max_length or 128,
                       max_examples=max_examples)
        result = evaluation.evaluate_glue(model, ds, batch_size=batch_size, progress=progress)
    else:
        result = _answer_perplexity(model, tokenizer, data, max_length or 512, max_examples, batch_size)
    result.update(model=str(model_dir), task=task, data=str(data), lte=is_lte, eval_seconds=time.time() - start)
    if glue_task:
        result["glue_task"] = glue_task
    return result


def _lm_eval_data(data: Any, tokenizer, holdout: float | None, block_size: int, max_tokens: int | None,
                  text_field: str = "text"):
    """The token stream to score: the whole text, or the tail training did not see."""
    from lte.data import is_text_source, load_text_lm

    if not is_text_source(data):  # a path, or a list of them (a mix: its tail is the last source's)
        return data
    if holdout:
        return load_text_lm(data, tokenizer, block_size=block_size, max_tokens=max_tokens, split_ratio=holdout,
                            text_field=text_field)[1]
    return load_text_lm(data, tokenizer, block_size=2, pad_to_block=True, text_field=text_field)


@torch.no_grad()
def _answer_perplexity(model, tokenizer, data, max_length, max_examples, batch_size) -> dict[str, Any]:
    """Mean NLL of the answer tokens of an instruction set (its loss mask), as a perplexity."""
    import math

    from torch.utils.data import DataLoader

    from lte.data import load_instructions, pad_collate
    from lte.evaluation._common import finish_stats, selected_nll, start_stats

    ds = load_instructions(data, tokenizer, max_length=max_length, max_examples=max_examples)
    device = next(model.parameters()).device
    model.eval()
    start_stats(model)
    total, count = 0.0, 0
    for batch in DataLoader(ds, batch_size=batch_size, collate_fn=pad_collate(tokenizer)):
        batch = {k: v.to(device) for k, v in batch.items()}
        nll, n = selected_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        total += nll
        count += n
    if count == 0:
        raise LTEError(f"'{data}' has no answer tokens to score")
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count,
            "metric": "answer_perplexity", "score": math.exp(total / count), **finish_stats(model)}

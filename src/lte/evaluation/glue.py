"""GLUE evaluation: predictions of a sequence-classification model and the task's metrics."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lte.data.collate import pad_collate
from lte.errors import LTEError
from lte.evaluation._common import finish_stats, prepare_model, start_stats, to_device
from lte.evaluation.metrics import accuracy, f1_binary, matthews_corrcoef, pearson, spearman


def glue_metrics(task: str, predictions: list, labels: list, is_regression: bool = False) -> dict[str, float]:
    """All usual metrics of a GLUE task, plus ``score``: the task's main metric (F1 for MRPC/QQP,
    Matthews for CoLA, Pearson for STS-B, accuracy otherwise)."""
    if is_regression:
        result = {"pearson": pearson(predictions, labels), "spearman": spearman(predictions, labels)}
        result["score"] = result["pearson"]
        return result
    result = {"accuracy": accuracy(predictions, labels)}
    if task in ("mrpc", "qqp"):
        result["f1"] = f1_binary(predictions, labels)
    if task == "cola":
        result["matthews"] = matthews_corrcoef(predictions, labels)
    result["score"] = result.get("f1", result.get("matthews", result["accuracy"]))
    return result


def _check_head(model, dataset) -> None:
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if num_labels is not None and num_labels != dataset.num_labels:
        raise LTEError(
            f"the model's head has {num_labels} output(s) but {dataset.task} needs {dataset.num_labels} "
            f"({'regression' if dataset.is_regression else 'classes'}); load the model with "
            f"num_labels={dataset.num_labels}."
        )


@torch.no_grad()
def evaluate_glue(
    model,
    dataset,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    pad_token_id: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a sequence-classification model over a :class:`lte.data.GlueDataset` and score it.

    Returns ``{"task", "metric", "score", "accuracy" | "f1" | "matthews" | "pearson", "spearman",
    "examples", "ffn_sparsity", "per_layer_sparsity", "gflops_per_token", ...}``.
    """
    _check_head(model, dataset)
    if len(dataset) == 0:
        raise LTEError("the GLUE dataset is empty.")
    if pad_token_id is None:
        pad_token_id = getattr(dataset, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    run_device = prepare_model(model, device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=pad_collate(pad_token_id=pad_token_id))
    predictions: list = []
    labels: list = []
    start_stats(model)
    for batch in tqdm(loader, desc=f"eval {dataset.task}", disable=not progress, leave=False):
        targets = batch.pop("labels")
        logits = model(**to_device(batch, run_device)).logits.float()  # [B, num_labels]
        if dataset.is_regression:
            predictions.extend(logits[:, 0].tolist())
        else:
            predictions.extend(logits.argmax(dim=-1).tolist())
        labels.extend(targets.tolist())
    result = {"task": dataset.task, "metric": dataset.metric, "examples": len(labels)}
    result.update(glue_metrics(dataset.task, predictions, labels, dataset.is_regression))
    result.update(finish_stats(model))
    return result

"""Shared helpers of the evaluators: device placement, LTE statistics, batching."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def default_device() -> torch.device:
    """Where lte runs a model it loaded itself: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-less module)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def prepare_model(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Put the model in eval mode (and on ``device`` when given); return the device it runs on."""
    if device is not None:
        model.to(device)
    model.eval()
    return model_device(model)


def is_lte(model: Any) -> bool:
    """True for an ``lte.LTEModel`` (anything with ``reset_lte_stats`` and ``lte_stats``)."""
    return callable(getattr(type(model), "reset_lte_stats", None)) and callable(getattr(type(model), "lte_stats", None))


def start_stats(model: Any) -> None:
    """Reset the LTE statistics so that the following forwards are accumulated."""
    if is_lte(model):
        model.reset_lte_stats()


def finish_stats(model: Any) -> dict[str, Any]:
    """FFN sparsity and GFLOPs/token over the forwards since :func:`start_stats`, JSON-ready.

    A plain HF model reports 0 sparsity and its dense linear-layer GFLOPs per token.
    """
    if is_lte(model):
        stats = model.lte_stats(accumulated=True)
        return {
            "routing": stats.get("mode"),
            "ffn_sparsity": float(stats["ffn_sparsity"]),
            "per_layer_sparsity": [float(s) for s in stats["per_layer"]],
            "gflops_per_token": float(stats["gflops_per_token"]),
            "dense_gflops_per_token": float(stats["dense_gflops_per_token"]),
        }
    from lte.stats import linear_flops_per_token

    gflops = linear_flops_per_token(model) / 1e9
    return {
        "routing": "dense",
        "ffn_sparsity": 0.0,
        "per_layer_sparsity": [],
        "gflops_per_token": gflops,
        "dense_gflops_per_token": gflops,
    }


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def pad_id_of(tokenizer) -> int:
    """The pad id to use with ``tokenizer`` (its pad token, else eos, else 0)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0

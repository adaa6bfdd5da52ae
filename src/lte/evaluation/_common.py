"""Shared helpers of the evaluators: device placement, LTE statistics, batching."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

#: Logit elements computed at once when scoring (fp32: 4 bytes each): 64 MB, whatever the vocabulary.
LOGIT_CHUNK = 2**24


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


# ---------------------------------------------------------------------- logits only where they are scored
def _lm_parts(model: Any) -> tuple[nn.Module, nn.Module, float | None] | None:
    """(decoder, output head, logit soft-cap) of a causal LM, or None when it is not laid out that way.

    A Hugging Face causal LM computes `logits = head(decoder(...)[0])` (Gemma 2/3 then soft-cap
    them) and takes `logits_to_keep`; an LTE or baseline model wraps one.
    """
    from lte.sparse_model import SparseFFNModel

    hf = model.base_model if isinstance(model, SparseFFNModel) else model
    get_head = getattr(hf, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    get_decoder = getattr(hf, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else getattr(hf, "base_model", None)  # OPT: model.decoder
    if head is None or not isinstance(decoder, nn.Module) or decoder is hf:
        return None
    if "logits_to_keep" not in inspect.signature(hf.forward).parameters:
        return None
    return decoder, head, getattr(hf.config, "final_logit_softcapping", None)


@contextlib.contextmanager
def _captured_output(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While open, `box["hidden"]` holds the first output of `module`'s latest forward."""
    box: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        box["hidden"] = output[0]

    handle = module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def selected_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    select: torch.Tensor) -> Iterator[torch.Tensor]:
    """The fp32 logits at the positions `select` (`[B, L]` bool) marks, row-major, in chunks of rows.

    The full `[B, L, V]` logits are never built: the model runs with `logits_to_keep=1` and the
    output head is applied to the selected hidden states `LOGIT_CHUNK // V` rows at a time, so a
    262k-vocabulary model scores a batch within a few hundred MB. Models not laid out as an HF
    causal LM fall back to their full logits (a second forward; LTE sparsity ratios are unchanged).
    """
    parts = _lm_parts(model)
    box: dict[str, torch.Tensor] = {}
    if parts is not None:
        with _captured_output(parts[0]) as box:
            model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
    if "hidden" not in box:  # not an HF causal LM, or one whose head does not read its decoder's output
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, L, V]
        picked = logits[select]  # [N, V]
        yield from (chunk.float() for chunk in picked.split(max(1, LOGIT_CHUNK // picked.shape[-1])))
        return
    _, head, cap = parts
    hidden = box["hidden"][select]  # [N, D]
    rows = max(1, LOGIT_CHUNK // head.weight.shape[0])
    for chunk in hidden.split(rows):
        logits = head(chunk)  # [rows, V]
        if cap:
            logits = torch.tanh(logits / cap) * cap
        yield logits.float()


def selected_nll(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL over the positions whose label is not -100, and their count.

    `labels` are aligned with `input_ids` (the model's convention: position j predicts label j+1).
    """
    targets = labels[:, 1:]  # [B, L-1]
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = targets != -100
    wanted = targets[targets != -100]  # [N], row-major like `select`
    total, start = 0.0, 0
    for logits in selected_logits(model, input_ids, attention_mask, select):
        part = wanted[start : start + logits.shape[0]].to(logits.device)
        total += float(torch.nn.functional.cross_entropy(logits, part, reduction="sum"))
        start += logits.shape[0]
    return total, int(wanted.numel())

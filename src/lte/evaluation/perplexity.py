"""Sliding-window perplexity of a causal LM (plain HF model or LTEModel)."""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from lte.errors import LTEError
from lte.evaluation._common import finish_stats, prepare_model, selected_nll, start_stats


def token_stream(source: Any, text: str | list[str] | None = None) -> torch.Tensor:
    """A flat ``[N]`` tensor of token ids from an LMDataset, a list/tensor of ids, or a tokenizer + text.

    A list of texts is joined with blank lines (the usual WikiText recipe).
    """
    if hasattr(source, "token_ids"):  # an LMDataset
        return torch.as_tensor(source.token_ids, dtype=torch.long).reshape(-1)
    if isinstance(source, torch.Tensor) or (isinstance(source, list | tuple) and source and isinstance(source[0], int)):
        return torch.as_tensor(source, dtype=torch.long).reshape(-1)
    if callable(source):  # a tokenizer
        if text is None:
            raise LTEError("perplexity(model, tokenizer, text): pass the text (a string or a list of strings).")
        from lte.data.text import tokenize_text

        joined = text if isinstance(text, str) else "\n\n".join(text)
        return tokenize_text(joined, source)
    raise LTEError(
        f"perplexity needs an LMDataset, token ids, or a tokenizer plus text; got {type(source).__name__}."
    )


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_targets)`` windows: each scores its last ``n_targets`` tokens not yet scored.

    Every token but the first is scored exactly once; a window gives its targets up to
    ``max_length - stride`` tokens of earlier context.
    """
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _window_nll(model, ids: torch.Tensor, windows: list[tuple[int, int, int]], device: torch.device,
                pad_id: int) -> tuple[float, int]:
    """Summed NLL and number of scored tokens for a batch of windows (right-padded)."""
    length = max(end - begin for begin, end, _ in windows)
    input_ids = torch.full((len(windows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (begin, end, n_targets) in enumerate(windows):
        size = end - begin
        input_ids[row, :size] = ids[begin:end]
        attention_mask[row, :size] = 1
        labels[row, size - n_targets : size] = ids[end - n_targets : end]
    input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
    # position j predicts token j+1; logits are computed only where a target is scored, a chunk at a time
    return selected_nll(model, input_ids, attention_mask, labels)


@torch.no_grad()
def perplexity(
    model,
    source: Any,
    text: str | list[str] | None = None,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sliding-window perplexity: ``exp(total NLL / scored tokens)`` over a token stream.

    ``source``: an LMDataset (its token stream), token ids, or a tokenizer with ``text``.
    ``max_length`` (default: the model's context, at most 1024) is the window; ``stride`` (default
    half of it) how far each window moves. Returns ``{"perplexity", "nll", "tokens", "ffn_sparsity",
    "per_layer_sparsity", "gflops_per_token", ...}``; an LTEModel reports its accumulated statistics.
    """
    ids = token_stream(source, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise LTEError(f"perplexity needs at least 2 tokens, got {len(ids)}.")
    config = getattr(model, "config", None)
    if max_length is None:
        max_length = min(getattr(config, "max_position_embeddings", 1024) or 1024, 1024)
    stride = stride or max(1, max_length // 2)
    if not 0 < stride <= max_length:
        raise LTEError(f"stride must be in (0, max_length={max_length}], got {stride}.")
    run_device = prepare_model(model, device)
    pad_id = getattr(config, "pad_token_id", None) or 0
    windows = sliding_windows(len(ids), max_length, stride)
    start_stats(model)
    total_nll, total_tokens = 0.0, 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        nll, count = _window_nll(model, ids, batch, run_device, pad_id)
        total_nll += nll
        total_tokens += count
    mean_nll = total_nll / total_tokens
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": total_tokens,
        "max_length": max_length,
        "stride": stride,
        **finish_stats(model),
    }

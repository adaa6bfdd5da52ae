"""Sparsity and cost measures (method.md section 5).

Masks are [T, E] (T tokens, E experts; True/nonzero = expert computed); `expert_sizes` [E] counts
neurons per expert (sum F); `token_mask` [T] marks real tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from .conversion.permute import is_conv1d


def active_neurons(mask: torch.Tensor, expert_sizes: torch.Tensor) -> torch.Tensor:
    """Neurons computed per token, [T]."""
    return (mask != 0).to(torch.float32) @ expert_sizes.to(device=mask.device, dtype=torch.float32)


def ffn_sparsity(mask: torch.Tensor, expert_sizes: torch.Tensor, token_mask: torch.Tensor | None = None) -> float:
    """Fraction of FFN neurons not computed, averaged over real tokens."""
    f = float(expert_sizes.sum())
    active = active_neurons(mask, expert_sizes)
    if token_mask is not None:
        active = active[token_mask.bool()]
    if active.numel() == 0:
        return float("nan")
    return 1.0 - float(active.mean()) / f


def union_sparsity(mask: torch.Tensor, expert_sizes: torch.Tensor, batch_size: int,
                   token_mask: torch.Tensor | None = None) -> float:
    """Fraction of neurons that no token of a batch of `batch_size` tokens needs.

    Real tokens are taken in order, in consecutive groups of `batch_size` (a trailing partial
    group is dropped unless it is the only one), and the union sparsity is averaged over groups.
    """
    m = mask != 0
    if token_mask is not None:
        m = m[token_mask.bool()]
    t = m.shape[0]
    if t == 0:
        return float("nan")
    groups = max(t // batch_size, 1)
    b = min(batch_size, t)
    union = m[: groups * b].reshape(groups, b, -1).any(dim=1)  # [groups, E]
    return ffn_sparsity(union, expert_sizes)


def _linear_flops(module: nn.Module) -> int:
    """Multiply-adds x 2 per token of a linear-like module."""
    w = module.weight
    return 2 * w.shape[0] * w.shape[1]


def linear_flops_per_token(model: nn.Module, exclude: set[int] | None = None) -> int:
    """FLOPs per token of every nn.Linear / Conv1D of a model (attention-score FLOPs excluded)."""
    exclude = exclude or set()
    total = 0
    for module in model.modules():
        if id(module) in exclude:
            continue
        if isinstance(module, nn.Linear) or is_conv1d(module):
            total += _linear_flops(module)
    return total

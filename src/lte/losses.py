"""The LTE training losses (method.md section 3) as pure functions.

`scores` are router outputs G in [0, 1], shape [T, E] (T tokens, E experts); `token_mask` [T]
marks real tokens (padding excluded). Layers are averaged by the caller.
"""

from __future__ import annotations

import torch


def _masked_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of values [T, E] over real tokens and experts."""
    if token_mask is None:
        return values.mean()
    w = token_mask.to(values.dtype).unsqueeze(-1)  # [T, 1]
    denom = (w.sum() * values.shape[-1]).clamp_min(1.0)
    return (values * w).sum() / denom


def efficiency_loss(scores: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_eff = mean of G^2 (the paper's equation squares the scores; its prose says "mean of scores")."""
    return _masked_mean(scores.float().square(), token_mask)


def separability_loss(scores: torch.Tensor, token_mask: torch.Tensor | None = None, tau: float = 0.5,
                      eps: float = 1e-3) -> torch.Tensor:
    """L_sep = mean of 1 / ((G - tau)^2 + eps): pushes scores away from the threshold."""
    return _masked_mean(1.0 / ((scores.float() - tau).square() + eps), token_mask)


def lte_losses(scores_per_layer: list[torch.Tensor] | torch.Tensor, token_mask: torch.Tensor | None, tau: float,
               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_eff, L_sep) averaged over layers; each entry of scores_per_layer is [T, E_l].

    Layers of one width may come stacked, [L, T, E]: then both losses take a handful of tensor ops
    for all layers together (the per-layer means share one denominator, so the mean over layers is
    one sum over everything), instead of a dozen per layer.
    """
    if isinstance(scores_per_layer, torch.Tensor):
        stacked = scores_per_layer.float()  # [L, T, E]
        eff = _masked_mean_stacked(stacked.square(), token_mask)
        sep = _masked_mean_stacked(((stacked - tau).square() + eps).reciprocal(), token_mask)
        return eff, sep
    eff = torch.stack([efficiency_loss(s, token_mask) for s in scores_per_layer]).mean()
    sep = torch.stack([separability_loss(s, token_mask, tau, eps) for s in scores_per_layer]).mean()
    return eff, sep


def _masked_mean_stacked(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over layers of each layer's mean over real tokens and experts; values [L, T, E]."""
    if token_mask is None:
        return values.mean()
    w = token_mask.to(values.dtype)  # [T]
    per_token = values.sum(dim=(0, 2))  # [T]: every layer and expert of a token
    denom = (w.sum() * (values.shape[0] * values.shape[2])).clamp_min(1.0)
    return (per_token * w).sum() / denom

"""Pure-PyTorch reference for one LTE FFN with a per-token expert mask (masked dense).

Dimensions: B tokens, D model width, F FFN width, S expert size, E = ceil(F / S) experts.
Expert ``e`` owns neurons ``[e*S, min((e+1)*S, F))``; when ``F % S != 0`` the last expert is smaller.

Gated FFN (SwiGLU / GEGLU):  h = act(x Wg^T) * (x Wu^T) * m      (m expanded from experts to neurons)
Plain FFN (GELU / ReLU):     h = act(x W1^T + b1) * m
Output:                      y = h @ Wd_t (+ b2)

All weights are ``[F, D]``; the down projection is stored transposed (``Wd_t = W2^T``), so every
expert is one contiguous slab of rows in every matrix. This module is the ground truth the Triton
kernels are tested against, and the fallback on machines without a GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F_

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def num_experts(ffn_width: int, expert_size: int) -> int:
    """E = ceil(F / S): the last expert holds ``F - S * (E - 1)`` neurons."""
    return -(-ffn_width // expert_size)


def apply_activation(z: torch.Tensor, activation: str) -> torch.Tensor:
    """The FFN nonlinearity by name: silu, gelu (erf), gelu_tanh or relu."""
    if activation == "silu":
        return F_.silu(z)
    if activation == "gelu":
        return F_.gelu(z)
    if activation == "gelu_tanh":
        return F_.gelu(z, approximate="tanh")
    if activation == "relu":
        return F_.relu(z)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def expand_mask(mask: torch.Tensor, ffn_width: int, expert_size: int) -> torch.Tensor:
    """Per-expert mask [B, E] -> per-neuron mask [B, F] (the last expert may be smaller)."""
    neuron_mask = mask.repeat_interleave(expert_size, dim=-1)  # [B, E*S]
    return neuron_mask[..., :ffn_width]  # [B, F]


def sparse_ffn_reference(
    x: torch.Tensor,
    mask: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    *,
    w_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    expert_size: int = 32,
    activation: str = "silu",
    upcast: bool = True,
    s_up: torch.Tensor | None = None,
    s_gate: torch.Tensor | None = None,
    s_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked dense FFN for x [B, D] and a per-token expert mask [B, E]; returns [B, D] in x's dtype.

    ``upcast=True`` computes everything in fp32 (the exact reference used by tests and the CPU
    fallback). ``upcast=False`` keeps the weights in their own dtype (cuBLAS still accumulates in
    fp32) so that a large-token (prefill) call does not copy the weights.
    ``s_up`` / ``s_gate`` / ``s_down`` [F]: row scales of fp8 weights (``lte.kernels.quant``); a
    matrix with a scale is dequantized (W = Q * s[:, None]) into the compute dtype first.
    """
    compute_dtype = torch.float32 if upcast else x.dtype

    def cast(t: torch.Tensor | None, scale: torch.Tensor | None = None) -> torch.Tensor | None:
        if t is None:
            return None
        return t.to(compute_dtype) if scale is None else (t.float() * scale.float()[:, None]).to(compute_dtype)

    xc = x.to(compute_dtype)
    ffn_width = w_up.shape[0]
    neuron_mask = expand_mask(mask, ffn_width, expert_size).to(compute_dtype)  # [B, F]
    if w_gate is not None:
        gate = F_.linear(xc, cast(w_gate, s_gate))  # [B, F]
        up = F_.linear(xc, cast(w_up, s_up), cast(b_up))  # [B, F]
        h = apply_activation(gate, activation) * up
    else:
        h = apply_activation(F_.linear(xc, cast(w_up, s_up), cast(b_up)), activation)  # [B, F]
    h = h * neuron_mask
    y = h @ cast(w_down_t, s_down)  # [B, D]
    if b_down is not None:
        y = y + cast(b_down)
    return y.to(x.dtype)


def masked_activation_reference(gate: torch.Tensor | None, up: torch.Tensor, mask: torch.Tensor, expert_size: int,
                                activation: str) -> torch.Tensor:
    """h [B, F] = act(gate) * up * m (gated) or act(up) * m (gate None) for the expert mask [B, E],
    computed in fp32 and returned in up's dtype (the middle of the masked dense FFN)."""
    neuron_mask = expand_mask(mask, up.shape[-1], expert_size).float()  # [B, F]
    h = apply_activation(up.float(), activation) if gate is None else apply_activation(gate.float(), activation) * up.float()
    return (h * neuron_mask).to(up.dtype)


def logit_threshold(tau: float) -> float:
    """Threshold on router logits equivalent to ``sigmoid(logit) > tau``."""
    if tau <= 0.0:
        return -math.inf
    if tau >= 1.0:
        return math.inf
    return math.log(tau / (1.0 - tau))


def router_mask_reference(x: torch.Tensor, w_router: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """Hard expert mask [B, E] = sigmoid(x Wr^T) > tau, computed on the logits with fp32 accumulation."""
    logits = F_.linear(x.float(), w_router.float())  # [B, E]
    return logits > logit_threshold(tau)


def topk_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool [..., E]: in every row of ``scores`` [..., E], the ``min(k, E)`` largest entries (none for
    ``k <= 0``); ties go to the lower expert index (a stable descending sort).

    The one tie-break rule of top-k routing: the LTEModel's ``expert_gate(mode="topk")``, the served
    mask (``router_topk_mask_reference``, ``SparseMLP.dense_mask``) and ``_topk_kernel`` all keep it.
    ``-0.0`` and ``0.0`` are equal (a tie); NaN ranks above every number."""
    num_exp = scores.shape[-1]
    k = min(int(k), num_exp)
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return keep
    order = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[..., :k]  # ties: lower first
    return keep.scatter_(-1, order, True)


def router_topk_mask_reference(x: torch.Tensor, w_router: torch.Tensor, k: int, budget: int = 0) -> torch.Tensor:
    """Top-k expert mask [B, E]: for every token the ``min(k, E)`` experts with the largest router
    logits ``x . Wr[e]`` (fp32 accumulation), ties to the lower expert index (``topk_keep``). With a
    per-batch ``budget`` > 0 the batch may use only the union's experts ``budget_keep`` keeps, and
    each token takes its top k among those (``topk_among``): min(k, budget) experts per token."""
    logits = F_.linear(x.float(), w_router.float())  # [B, E]
    mask = topk_keep(logits, k)
    if budget > 0:
        mask = topk_among(logits, k, budget_keep(mask, logits, budget))
    return mask


def topk_among(scores: torch.Tensor, k: int, allowed: torch.Tensor) -> torch.Tensor:
    """Each row's ``k`` largest scores [..., E] among the ``allowed`` experts (bool, [E] or broadcast to
    the scores), ties to the lower index (``topk_keep``); a row keeps min(k, allowed) experts."""
    ranked = scores.float().masked_fill(~allowed, float("-inf"))
    return topk_keep(ranked, k) & allowed


def budget_keep(mask: torch.Tensor, logits: torch.Tensor, budget: int) -> torch.Tensor:
    """Experts [E] (bool) a per-batch budget keeps: among the experts some token of the batch
    switched on (``mask`` [B, E]), the ``budget`` with the largest summed score ``sum_b
    sigmoid(logits[b, e])``; ties go to the lower expert index. ``budget <= 0`` keeps the union."""
    union = mask.reshape(-1, mask.shape[-1]).any(dim=0)  # [E]
    if budget <= 0 or budget >= int(union.numel()):
        return union
    score = torch.sigmoid(logits.reshape(-1, logits.shape[-1]).float()).sum(dim=0)  # [E]
    key = torch.where(union, score, torch.full_like(score, -1.0))
    order = torch.sort(key, descending=True, stable=True).indices  # ties: lower index first
    keep = torch.zeros_like(union)
    keep[order[:budget]] = True
    return keep & union


def routed_mask_reference(x: torch.Tensor, w_router: torch.Tensor, tau: float = 0.5,
                          budget: int = 0) -> torch.Tensor:
    """Per-token expert mask [B, E] of the router on x [B, D], cut to a per-batch ``budget``
    (``budget_keep``; 0 = no budget)."""
    logits = F_.linear(x.float(), w_router.float())  # [B, E]
    mask = logits > logit_threshold(tau)
    if budget > 0:
        mask = mask & budget_keep(mask, logits, budget)[None, :]
    return mask


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                               scale: float) -> torch.Tensor:
    """Attention of q [B, Hkv, G, d] (one query token's G heads per KV head) over k, v [B, Hkv, L, d]; slots
    where `keep` [B, L] is False are left out (a row with none kept gives 0). fp32 arithmetic, q's dtype out."""
    scores = torch.einsum("bhgd,bhld->bhgl", q.float(), k.float()) * scale  # [B, Hkv, G, L]
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if keep is not None:  # a sequence with no slot kept: 0 instead of softmax's NaN (a NaN input still shows)
        weights = torch.where(keep.any(-1)[:, None, None, None], weights, 0.0)
    return torch.einsum("bhgl,bhld->bhgd", weights, v.float()).to(q.dtype)

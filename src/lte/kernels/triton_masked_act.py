"""The masked dense path's one Triton kernel: ``h = act(gate) * up * m`` elementwise over [B, F] (or
``act(up) * m``), for a union too full for expert skipping to pay, where every neuron goes through cuBLAS
(``lte.kernels.ops``). ``m`` is the per-token expert mask expanded to neurons, or comes from the router's logits:
over a threshold, or each token's k largest (top-k routing, ``_masked_act_topk_kernel``).
This module imports triton at import time: import it lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_jit import ACT_CODE, _activation
from .triton_masks import _order_key

__all__ = ["masked_activation_topk_triton", "masked_activation_triton"]

#: neuron lanes of one program of the top-k kernel (its experts: this over the expert size's power of two)
TOPK_BLOCK = 1024
#: most (program's experts x logits) one program of the top-k kernel compares: 32 experts against a row of 448
#: (padded to 512) for Llama-3-8B's FFN in 32-neuron experts
TOPK_RANK_TILE = 16384


@triton.jit
def _masked_act_kernel(
    gate_ptr, up_ptr, mask_ptr, out_ptr, F, E, threshold,
    stride_g, stride_u, stride_m, stride_o,
    S: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr, FROM_LOGITS: tl.constexpr,
):
    """Program (b, f-block): h[b, f] = act(g[b, f]) * u[b, f] * m[b, f // S] (gated) or act(u) * m (plain), in fp32.

    FROM_LOGITS: mask_ptr holds the router logits [B, E] and m = logit > threshold (in fp32), so the
    prefill path needs no separate sigmoid / compare launches over [B, E]."""
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < F
    if FROM_LOGITS:
        logit = tl.load(mask_ptr + b * stride_m + offs // S, mask=inside & (offs // S < E), other=0.0)
        on = (logit.to(tl.float32) > threshold) & inside & (offs // S < E)
    else:
        on = tl.load(mask_ptr + b * stride_m + offs // S, mask=inside & (offs // S < E), other=0)
    u = tl.load(up_ptr + b * stride_u + offs, mask=inside, other=0.0).to(tl.float32)
    if GATED:
        g = tl.load(gate_ptr + b * stride_g + offs, mask=inside, other=0.0).to(tl.float32)
        h = _activation(g, ACT) * u
    else:
        h = _activation(u, ACT)
    h = tl.where(on != 0, h, 0.0)
    tl.store(out_ptr + b * stride_o + offs, h.to(out_ptr.dtype.element_ty), mask=inside)


def masked_activation_triton(gate: torch.Tensor | None, up: torch.Tensor, mask: torch.Tensor, expert_size: int,
                             activation: str, block: int = 1024, threshold: float | None = None) -> torch.Tensor:
    """h [B, F] = act(gate) * up * m (gated) or act(up) * m (gate None), m the mask [B, E] (bool) expanded
    to neurons, in one launch; in up's dtype. Inputs: contiguous rows (any row stride, e.g. column slices of
    one product), gate and up the same shape. With ``threshold``, ``mask`` holds router logits [B, E] (any
    float dtype, contiguous rows too) and m = logit > threshold."""
    num_tokens, ffn_width = up.shape
    out = torch.empty_like(up)
    if num_tokens == 0:
        return out
    from_logits = threshold is not None
    mask_arg = (mask if mask.stride(-1) == 1 else mask.contiguous()) if from_logits else mask.contiguous().view(torch.uint8)
    gate_arg = up if gate is None else gate
    grid = (num_tokens, triton.cdiv(ffn_width, block))
    _masked_act_kernel[grid](gate_arg, up, mask_arg, out, ffn_width, mask.shape[1],
                             float(threshold) if from_logits else 0.0,
                             gate_arg.stride(0), up.stride(0), mask_arg.stride(0), out.stride(0),
                             S=expert_size, GATED=gate is not None, ACT=ACT_CODE[activation], BLOCK=block,
                             FROM_LOGITS=from_logits)
    return out


@triton.jit
def _masked_act_topk_kernel(
    gate_ptr, up_ptr, logit_ptr, out_ptr, F, E, k,
    stride_g, stride_u, stride_l, stride_o,
    S: tl.constexpr, S_P2: tl.constexpr, EB: tl.constexpr, E_PAD: tl.constexpr, GATED: tl.constexpr,
    ACT: tl.constexpr,
):
    """Program (b, expert block): the masked activation of experts e0 .. e0 + EB of token b, with m[b, e] = 1
    for the token's k experts of largest logit (logits [B, E] in any float dtype, ranked in fp32), ties to the
    lower expert index: ``_topk_row``'s rule and keys, computed per expert as a rank, the number of the row's
    experts ahead of it (a larger key, or the same key and a lower index), kept when below k. Each program
    reads the token's whole logit row at once ([EB, E_PAD] comparisons: one load, no loop of dependent
    loads); neurons are laid out [EB, S_P2]."""
    b = tl.program_id(0)
    e = tl.program_id(1) * EB + tl.arange(0, EB)  # [EB] this program's experts
    e_ok = e < E
    j = tl.arange(0, E_PAD)  # [E_PAD] the whole row
    j_ok = j < E
    v = tl.load(logit_ptr + b * stride_l + e, mask=e_ok, other=0.0).to(tl.float32)
    w = tl.load(logit_ptr + b * stride_l + j, mask=j_ok, other=0.0).to(tl.float32)
    key = _order_key(v)  # [EB], int32 ordered like v (-0.0 ties +0.0)
    wkey = _order_key(w)  # [E_PAD]
    ahead = (wkey[None, :] > key[:, None]) | ((wkey[None, :] == key[:, None]) & (j[None, :] < e[:, None]))
    rank = tl.sum((ahead & j_ok[None, :]).to(tl.int32), axis=1)  # [EB]
    on = e_ok & (rank < k)  # [EB]
    n = tl.arange(0, S_P2)  # [S_P2] neuron within its expert
    offs = e[:, None] * S + n[None, :]  # [EB, S_P2]
    inside = e_ok[:, None] & (n[None, :] < S) & (offs < F)
    u = tl.load(up_ptr + b * stride_u + offs, mask=inside, other=0.0).to(tl.float32)
    if GATED:
        g = tl.load(gate_ptr + b * stride_g + offs, mask=inside, other=0.0).to(tl.float32)
        h = _activation(g, ACT) * u
    else:
        h = _activation(u, ACT)
    h = tl.where(on[:, None], h, 0.0)
    tl.store(out_ptr + b * stride_o + offs, h.to(out_ptr.dtype.element_ty), mask=inside)


def masked_activation_topk_triton(gate: torch.Tensor | None, up: torch.Tensor, logits: torch.Tensor, k: int,
                                  expert_size: int, activation: str, block: int = TOPK_BLOCK) -> torch.Tensor:
    """h [B, F] = act(gate) * up * m (gated) or act(up) * m (gate None), m each token's ``k`` experts of
    largest router logit (``logits`` [B, E], any float dtype, ranked as fp32; ties to the lower expert index:
    ``reference.topk_keep``) expanded to neurons, in one launch; in up's dtype. Inputs: contiguous rows (any
    row stride, e.g. column slices of one product), gate and up the same shape. ``block``: neuron lanes per
    program (rounded to whole experts)."""
    num_tokens, ffn_width = up.shape
    num_exp = logits.shape[1]
    out = torch.empty_like(up)
    if num_tokens == 0:
        return out
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    s_p2 = triton.next_power_of_2(expert_size)
    e_pad = triton.next_power_of_2(num_exp)
    # experts per program: the block's, fewer where (experts x row) would pass TOPK_RANK_TILE comparisons
    experts_per_program = max(1, min(triton.next_power_of_2(block) // s_p2, TOPK_RANK_TILE // e_pad))
    gate_arg = up if gate is None else gate
    grid = (num_tokens, triton.cdiv(num_exp, experts_per_program))
    _masked_act_topk_kernel[grid](gate_arg, up, logits, out, ffn_width, num_exp, int(k),
                                  gate_arg.stride(0), up.stride(0), logits.stride(0), out.stride(0),
                                  S=expert_size, S_P2=s_p2, EB=experts_per_program, E_PAD=e_pad,
                                  GATED=gate is not None, ACT=ACT_CODE[activation], num_warps=8)
    return out

"""The masked dense path's one Triton kernel: ``h = act(gate) * up * m`` elementwise over [B, F] (or
``act(up) * m``), for a union too full for expert skipping to pay, where every neuron goes through cuBLAS
(``lte.kernels.ops``). ``m`` is the per-token expert mask expanded to neurons, or comes from the router's logits.
This module imports triton at import time: import it lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_jit import ACT_CODE, _activation

__all__ = ["masked_activation_triton"]


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

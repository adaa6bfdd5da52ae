"""fp8 (e4m3) weights with one scale per row, for the decode kernels.

A weight W [F, D] is stored as Q [F, D] in ``torch.float8_e4m3fn`` and s [F] in fp32 with
W ~= Q * s[:, None]: s = max_j |W[f, j]| / 448 (448 is e4m3's largest finite value), so every row
uses the whole e4m3 range. Rows are FFN neurons in all three matrices (gate, up, and the down
projection stored transposed), so an expert's rows carry their own scales and skipping an expert
skips its scales too. The kernels apply s after the row's dot product (gate/up) or to h before the
down projection; the reference dequantizes first (the same function up to fp32 rounding).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn value


def quantize_rows_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [F, D] (any float dtype) -> (Q [F, D] float8_e4m3fn, s [F] fp32), W ~= Q * s[:, None].

    A row of zeros gets s = 1 (and Q = 0). Rounding is to the nearest e4m3 value."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_rows_fp8 takes a float [F, D] matrix, got {w.dtype} {list(w.shape)}")
    w32 = w.float()
    amax = w32.abs().amax(dim=1)  # [F]
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("quantize_rows_fp8: the matrix holds inf or NaN; fp8 needs finite weights")
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # [F]
    q = (w32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.contiguous(), scale.contiguous()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Q [F, D] and s [F] -> Q * s[:, None] in ``dtype`` (computed in fp32)."""
    return (q.float() * scale.float()[:, None]).to(dtype)

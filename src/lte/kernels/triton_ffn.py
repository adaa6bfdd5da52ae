"""Triton kernels for one LTE FFN at decode time (B = 1..16 tokens) and their launcher.

Dimensions: B tokens, D model width, F FFN width, S expert size, E = ceil(F / S) experts.
Weights are ``[F, D]`` row-major (gate/up/W1 as PyTorch stores them, the down projection
transposed), so expert ``e`` is the contiguous row slab ``[e*S, min((e+1)*S, F))`` of each matrix.

Three launches, all reading the per-token expert mask on the GPU (no host sync, graph-capturable):

1. ``_ffn_in_kernel``: one program per block of ``BLOCK_F`` neuron rows. If no token of the batch
   needs any row of the block it reads nothing and returns; otherwise it reads the gate/up rows
   once for all B tokens and writes ``h[b, f] = act(g) * u * m[b, expert(f)]`` (fp32) to a scratch.
2. ``_ffn_out_kernel``: the down projection as a split-K reduction. Program (d, s) owns
   ``BLOCK_D`` output columns and the s-th slice of experts; it reads the slice's mask once, walks
   the experts some token needs (union), and accumulates ``h @ Wd_t`` in fp32 registers. It stores
   its partial sum to ``part[s, b, d]`` (plain stores, no atomics, no zeroing).
3. ``_ffn_finish_kernel``: ``y[b, d] = sum_s part[s, b, d] (+ b2)``, cast to the output dtype.

On Hopper the second and third launches use programmatic dependent launch (PDL): they start while
the previous kernel drains and wait (``gdc_wait``) only before reading its output.
B = 1 accumulates with broadcast multiply-adds; B >= 2 pads the tokens to 16 and uses ``tl.dot``.
Tile sizes: ``default_config`` (measured on an H100, see docs/kernels.md). This module imports
triton at import time: import it lazily.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .reference import ACTIVATIONS

try:  # grid dependency control (programmatic dependent launch, Hopper+), Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None

MAX_TOKENS = 16  # the decode kernels handle up to this many tokens per call
_ACT_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}  # silu 0, gelu 1, gelu_tanh 2, relu 3


@triton.jit
def _activation(z, ACT: tl.constexpr):
    """act(z) in fp32: 0 silu, 1 gelu (erf), 2 gelu (tanh approximation), 3 relu."""
    if ACT == 0:
        out = z * tl.sigmoid(z)
    elif ACT == 1:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        # 0.5 * z * (1 + tanh(u)) == z * sigmoid(2u), u = sqrt(2/pi) * (z + 0.044715 z^3)
        out = z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    else:
        out = tl.maximum(z, 0.0)
    return out


@triton.jit
def _ffn_in_kernel(
    x_ptr, mask_ptr, wg_ptr, wu_ptr, bu_ptr, h_ptr,
    B, D, F, S,
    stride_xb, stride_mb, stride_hb,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    B_PAD: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, PDL: tl.constexpr,
):
    """h[b, rows] for one block of BLOCK_F neuron rows, for all B tokens (see module doc)."""
    if PDL:
        gdc_launch_dependents()  # let the down-projection kernel start loading its weights
    pid = tl.program_id(0)
    rows = pid * BLOCK_F + tl.arange(0, BLOCK_F)  # [BLOCK_F]
    row_ok = rows < F
    toks = tl.arange(0, B_PAD)  # [B_PAD]
    tok_ok = toks < B
    bf_ok = tok_ok[:, None] & row_ok[None, :]  # [B_PAD, BLOCK_F]
    experts = rows // S
    m = tl.load(mask_ptr + toks[:, None] * stride_mb + experts[None, :], mask=bf_ok, other=0)
    needed = tl.max(tl.max(m.to(tl.int32), axis=1), axis=0)
    if needed > 0:
        w_rows = rows.to(tl.int64) * D  # [BLOCK_F] row offsets into [F, D]
        if USE_DOT:
            acc_u = tl.zeros([B_PAD, BLOCK_F], dtype=tl.float32)
            acc_g = tl.zeros([B_PAD, BLOCK_F], dtype=tl.float32)
        else:
            acc_u3 = tl.zeros([B_PAD, BLOCK_F, BLOCK_K], dtype=tl.float32)
            acc_g3 = tl.zeros([B_PAD, BLOCK_F, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            k_ok = ks < D
            xt = tl.load(x_ptr + toks[:, None] * stride_xb + ks[None, :],
                         mask=tok_ok[:, None] & k_ok[None, :], other=0.0)  # [B_PAD, BLOCK_K]
            w_off = w_rows[:, None] + ks[None, :]  # [BLOCK_F, BLOCK_K]
            w_ok = row_ok[:, None] & k_ok[None, :]
            wu = tl.load(wu_ptr + w_off, mask=w_ok, other=0.0)
            if USE_DOT:
                acc_u = tl.dot(xt, tl.trans(wu), acc_u, input_precision=DOT_PREC)
            else:
                acc_u3 += xt.to(tl.float32)[:, None, :] * wu.to(tl.float32)[None, :, :]
            if GATED:
                wg = tl.load(wg_ptr + w_off, mask=w_ok, other=0.0)
                if USE_DOT:
                    acc_g = tl.dot(xt, tl.trans(wg), acc_g, input_precision=DOT_PREC)
                else:
                    acc_g3 += xt.to(tl.float32)[:, None, :] * wg.to(tl.float32)[None, :, :]
        if not USE_DOT:
            acc_u = tl.sum(acc_u3, axis=2)  # [B_PAD, BLOCK_F]
            acc_g = tl.sum(acc_g3, axis=2)
        if HAS_BIAS:
            acc_u += tl.load(bu_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            h = _activation(acc_g, ACT) * acc_u
        else:
            h = _activation(acc_u, ACT)
        h = tl.where(m != 0, h, 0.0)  # a token only uses its own experts
        tl.store(h_ptr + toks[:, None] * stride_hb + rows[None, :], h, mask=bf_ok)


@triton.jit
def _ffn_out_kernel(
    h_ptr, mask_ptr, wd_ptr, part_ptr,
    B, D, F, S, E, exp_per_split,
    stride_hb, stride_mb,
    B_PAD: tl.constexpr, S_PAD: tl.constexpr, EXP_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, PDL: tl.constexpr,
):
    """Partial down projection part[s, b, cols] over the s-th slice of experts (see module doc).

    The slice's mask is read once up front, so skipping an expert costs no memory round trip and an
    active expert costs one (its h and Wd_t slab load together). With PDL the kernel starts while
    the first one runs: it reads the mask (written before the first kernel started) and the first
    Wd_t slab, and waits for the first kernel (gdc_wait) only before it reads h."""
    if PDL:
        gdc_launch_dependents()
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    col_ok = cols < D
    toks = tl.arange(0, B_PAD)
    tok_ok = toks < B
    slots = tl.arange(0, EXP_PAD)  # expert slots of this slice
    e_start = pid_s * exp_per_split
    e_ok = (slots < exp_per_split) & (e_start + slots < E)
    m = tl.load(mask_ptr + toks[:, None] * stride_mb + (e_start + slots)[None, :],
                mask=tok_ok[:, None] & e_ok[None, :], other=0).to(tl.int32)  # [B_PAD, EXP_PAD]
    union = tl.max(m, axis=0)  # [EXP_PAD] some token needs the expert
    offs_s = tl.arange(0, S_PAD)
    if USE_DOT:
        acc = tl.zeros([B_PAD, BLOCK_D], dtype=tl.float32)
    else:
        acc3 = tl.zeros([B_PAD, S_PAD, BLOCK_D], dtype=tl.float32)
    n_exp = tl.minimum(exp_per_split, E - e_start)
    for j in range(0, n_exp):
        if tl.max(tl.where(slots == j, union, 0), axis=0) > 0:
            tok_on = tl.max(tl.where((slots == j)[None, :], m, 0), axis=1) > 0  # [B_PAD]
            rows = (e_start + j) * S + offs_s  # [S_PAD] the expert's neuron rows
            row_ok = (offs_s < S) & (rows < F)
            w = tl.load(wd_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # [S_PAD, BLOCK_D]
            if PDL:
                gdc_wait()  # h comes from the first kernel (a no-op once it has completed)
            h = tl.load(h_ptr + toks[:, None] * stride_hb + rows[None, :],
                        mask=(tok_ok & tok_on)[:, None] & row_ok[None, :], other=0.0)  # [B_PAD, S_PAD]
            if USE_DOT:
                acc = tl.dot(h.to(w.dtype), w, acc, input_precision=DOT_PREC)
            else:
                acc3 += h[:, :, None] * w.to(tl.float32)[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc3, axis=1)  # [B_PAD, BLOCK_D]
    if PDL:
        gdc_wait()  # never complete before the first kernel, even when every expert was off
    out_off = pid_s * B * D + toks[:, None] * D + cols[None, :]
    tl.store(part_ptr + out_off, acc, mask=tok_ok[:, None] & col_ok[None, :])


@triton.jit
def _ffn_finish_kernel(
    part_ptr, bd_ptr, y_ptr,
    B, D, SPLIT, stride_yb,
    HAS_BIAS: tl.constexpr, SPLIT_PAD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """y[b, cols] = sum over splits of part[s, b, cols] (+ b2), cast to y's dtype (one load round trip)."""
    if PDL:
        gdc_wait()  # the partial sums come from the previous kernel
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    cols = pid_d * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    col_ok = cols < D
    splits = tl.arange(0, SPLIT_PAD)  # [SPLIT_PAD]
    part = tl.load(part_ptr + splits[:, None] * B * D + b * D + cols[None, :],
                   mask=(splits < SPLIT)[:, None] & col_ok[None, :], other=0.0)  # [SPLIT_PAD, BLOCK]
    acc = tl.sum(part, axis=0)
    if HAS_BIAS:
        acc += tl.load(bd_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + b * stride_yb + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings of the three launches."""

    in_block_f: int = 2  # neuron rows per program of the first kernel
    in_block_k: int = 1024  # model-width chunk per loop step
    in_warps: int = 4
    in_stages: int = 3
    out_block_d: int = 256  # output columns per program of the down projection
    out_split: int = 64  # slices of the experts (partial sums to combine)
    out_warps: int = 4
    out_stages: int = 3
    finish_block: int = 128
    pdl: bool = True  # programmatic dependent launch on Hopper+ GPUs (overlaps the launches)
    use_dot: bool | None = None  # None: tl.dot when B > DOT_MIN_TOKENS


DOT_MIN_TOKENS = 1


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_config(num_tokens: int, model_width: int, ffn_width: int) -> KernelConfig:
    """Tile sizes measured best on an H100 for D=4096, F=11008 (docs/kernels.md)."""
    if num_tokens <= DOT_MIN_TOKENS:
        return KernelConfig()
    return KernelConfig(in_block_f=32, in_block_k=256, in_warps=4, in_stages=4,
                        out_block_d=128, out_split=64 if num_tokens <= 4 else 32 if num_tokens <= 8 else 16,
                        out_warps=4)


@dataclass
class FFNLaunch:
    """Everything the three launches of one call need: inputs, scratch buffers and settings."""

    x: torch.Tensor  # [B, D]
    mask_u8: torch.Tensor  # [B, E] bytes
    w_up: torch.Tensor  # [F, D]
    w_down_t: torch.Tensor  # [F, D]
    w_gate: torch.Tensor | None  # [F, D]
    b_up: torch.Tensor | None  # [F]
    b_down: torch.Tensor | None  # [D]
    expert_size: int
    activation: str
    cfg: KernelConfig
    use_dot: bool
    b_pad: int
    split: int
    exp_per_split: int
    pdl: bool
    h: torch.Tensor  # [B, F] fp32 scratch
    part: torch.Tensor  # [SPLIT, B, D] fp32 partial sums
    y: torch.Tensor  # [B, D] output


def plan_launch(x, mask, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation,
                config: KernelConfig | None = None) -> FFNLaunch:
    """Pick tiles and allocate the scratch for one call (no kernel runs here)."""
    num_tokens, model_width = x.shape  # B, D
    ffn_width = w_up.shape[0]  # F
    if num_tokens > MAX_TOKENS:
        raise ValueError(f"the decode kernels take at most {MAX_TOKENS} tokens, got {num_tokens}")
    cfg = config or default_config(num_tokens, model_width, ffn_width)
    use_dot = cfg.use_dot if cfg.use_dot is not None else num_tokens > DOT_MIN_TOKENS
    if use_dot and x.element_size() == 4:  # fp32: same shared-memory bytes per pipeline stage as 16-bit
        cfg = replace(cfg, in_block_k=max(16, cfg.in_block_k // 2))
    b_pad = max(16, _next_pow2(num_tokens)) if use_dot else _next_pow2(num_tokens)
    num_exp = triton.cdiv(ffn_width, expert_size)  # E
    exp_per_split = triton.cdiv(num_exp, max(1, min(cfg.out_split, num_exp)))
    split = triton.cdiv(num_exp, exp_per_split)  # drop empty slices
    device = x.device
    return FFNLaunch(
        x, mask.view(torch.uint8), w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation,
        cfg, use_dot, b_pad, split, exp_per_split, cfg.pdl and _pdl_supported(device),
        h=torch.empty(num_tokens, ffn_width, device=device, dtype=torch.float32),
        part=torch.empty(split, num_tokens, model_width, device=device, dtype=torch.float32),
        y=torch.empty(num_tokens, model_width, device=device, dtype=x.dtype),
    )


@functools.cache
def _pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch needs a CUDA GPU of compute capability 9.0+ and triton's GDC ops;
    ``LTE_PDL=0`` turns it off."""
    if device.type != "cuda" or gdc_wait is None or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    if os.environ.get("LTE_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _pdl_kwargs(p: FFNLaunch) -> dict:
    return {"launch_pdl": True} if p.pdl else {}


def _dot_precision(p: FFNLaunch) -> str:
    return "ieee" if p.x.dtype == torch.float32 else "tf32"


def launch_in(p: FFNLaunch) -> None:
    """First kernel: h = act(gate) * up * mask for the rows some token needs."""
    num_tokens, model_width = p.x.shape
    ffn_width = p.w_up.shape[0]
    cfg = p.cfg
    _ffn_in_kernel[(triton.cdiv(ffn_width, cfg.in_block_f),)](
        p.x, p.mask_u8, p.w_gate if p.w_gate is not None else p.w_up, p.w_up,
        p.b_up if p.b_up is not None else p.w_up, p.h,
        num_tokens, model_width, ffn_width, p.expert_size,
        p.x.stride(0), p.mask_u8.stride(0), p.h.stride(0),
        GATED=p.w_gate is not None, HAS_BIAS=p.b_up is not None, ACT=_ACT_CODE[p.activation],
        B_PAD=p.b_pad, BLOCK_F=cfg.in_block_f, BLOCK_K=cfg.in_block_k,
        USE_DOT=p.use_dot, DOT_PREC=_dot_precision(p), PDL=p.pdl,
        num_warps=cfg.in_warps, num_stages=cfg.in_stages,
    )


def launch_out(p: FFNLaunch) -> None:
    """Second kernel: partial down projections over slices of the needed rows."""
    num_tokens, model_width = p.x.shape
    ffn_width = p.w_up.shape[0]
    cfg = p.cfg
    _ffn_out_kernel[(triton.cdiv(model_width, cfg.out_block_d), p.split)](
        p.h, p.mask_u8, p.w_down_t, p.part,
        num_tokens, model_width, ffn_width, p.expert_size, p.mask_u8.shape[1], p.exp_per_split,
        p.h.stride(0), p.mask_u8.stride(0),
        B_PAD=p.b_pad, S_PAD=max(16, _next_pow2(p.expert_size)), EXP_PAD=_next_pow2(p.exp_per_split),
        BLOCK_D=cfg.out_block_d,
        USE_DOT=p.use_dot, DOT_PREC=_dot_precision(p), PDL=p.pdl,
        num_warps=cfg.out_warps, num_stages=cfg.out_stages, **_pdl_kwargs(p),
    )


def launch_finish(p: FFNLaunch) -> None:
    """Third kernel: sum the partials, add b2, cast."""
    num_tokens, model_width = p.x.shape
    _ffn_finish_kernel[(triton.cdiv(model_width, p.cfg.finish_block), num_tokens)](
        p.part, p.b_down if p.b_down is not None else p.part, p.y,
        num_tokens, model_width, p.split, p.y.stride(0),
        HAS_BIAS=p.b_down is not None, SPLIT_PAD=_next_pow2(p.split), BLOCK=p.cfg.finish_block,
        PDL=p.pdl, **_pdl_kwargs(p),
    )


def sparse_ffn_triton(
    x: torch.Tensor,
    mask: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    w_gate: torch.Tensor | None,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    expert_size: int,
    activation: str,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Launch the three kernels for x [B, D] (B <= 16) and mask [B, E] (bool); returns y [B, D].

    Inputs must already be validated (see ``lte.kernels.sparse_ffn``): contiguous, same device
    and dtype for x and the weights.
    """
    p = plan_launch(x, mask, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation, config)
    launch_in(p)
    launch_out(p)
    launch_finish(p)
    return p.y


@triton.jit
def _router_mask_kernel(
    x_ptr, wr_ptr, out_ptr,
    B, D, E, threshold,
    stride_xb, stride_ob,
    B_PAD: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[b, e] = (x[b] . Wr[e] > threshold) for one block of BLOCK_E experts, fp32 accumulation."""
    pid = tl.program_id(0)
    experts = pid * BLOCK_E + tl.arange(0, BLOCK_E)  # [BLOCK_E]
    e_ok = experts < E
    toks = tl.arange(0, B_PAD)
    tok_ok = toks < B
    w_rows = experts.to(tl.int64) * D
    acc3 = tl.zeros([B_PAD, BLOCK_E, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        xt = tl.load(x_ptr + toks[:, None] * stride_xb + ks[None, :],
                     mask=tok_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [B_PAD, BLOCK_K]
        w = tl.load(wr_ptr + w_rows[:, None] + ks[None, :],
                    mask=e_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_E, BLOCK_K]
        acc3 += xt[:, None, :] * w[None, :, :]
    logits = tl.sum(acc3, axis=2)  # [B_PAD, BLOCK_E]
    hit = (logits > threshold).to(tl.int8)
    tl.store(out_ptr + toks[:, None] * stride_ob + experts[None, :], hit,
             mask=tok_ok[:, None] & e_ok[None, :])


def router_mask_triton(x: torch.Tensor, w_router: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fused router GEMV + threshold on the logits for x [B, D] (B <= 16); returns bool [B, E]."""
    num_tokens, model_width = x.shape  # B, D
    num_exp = w_router.shape[0]  # E
    if num_tokens > MAX_TOKENS:
        raise ValueError(f"the router kernel takes at most {MAX_TOKENS} tokens, got {num_tokens}")
    out = torch.empty(num_tokens, num_exp, device=x.device, dtype=torch.bool)  # [B, E]
    out_u8 = out.view(torch.uint8)
    b_pad = _next_pow2(num_tokens)
    block_e = 2  # many small programs: the router is latency-bound, not bandwidth-bound
    block_k = max(64, 2048 // b_pad)
    _router_mask_kernel[(triton.cdiv(num_exp, block_e),)](
        x, w_router, out_u8,
        num_tokens, model_width, num_exp, threshold,
        x.stride(0), out_u8.stride(0),
        B_PAD=b_pad, BLOCK_E=block_e, BLOCK_K=block_k,
        num_warps=8,
    )
    return out


def routed_sparse_ffn_triton(
    x: torch.Tensor,
    w_router: torch.Tensor,
    threshold: float,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    w_gate: torch.Tensor | None,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    expert_size: int,
    activation: str,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router then FFN in one call: mask = (x Wr^T > threshold) on the GPU, then the three FFN launches.

    x [B, D] (B <= 16), w_router [E, D]; returns (y [B, D], mask [B, E] bool). Validated inputs only
    (see ``lte.kernels.routed_sparse_ffn``). The router is its own (plain) launch: computing it inside
    the first FFN kernel and launching that kernel behind the router with PDL were both measured and
    dropped (docs/kernels.md, v5 and v6).
    """
    mask = router_mask_triton(x, w_router, threshold)
    p = plan_launch(x, mask, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation, config)
    launch_in(p)
    launch_out(p)
    launch_finish(p)
    return p.y, mask

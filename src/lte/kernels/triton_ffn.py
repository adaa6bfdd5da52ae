"""Launchers of the Triton kernels for one LTE FFN at decode time (B = 1..64 tokens).

The kernels themselves, and the schedule of their launches (0: router / union / budget,
1: gate/up, 2: down projection, 3: finish; PDL on Hopper), are in ``triton_jit`` (launch 0's
kernels in ``triton_masks``). Here: the tile settings of a call (``default_config``; tables and
heuristics in ``lte.kernels.tuning``), its plan and scratch buffers (``plan_launch`` ->
``FFNLaunch``), one function per launch (``launch_*``) and the entry points the
``torch.library`` ops of ``ops`` call (``*_triton``; the two halves of an FFN whose model applies the
activation itself are in ``triton_ffn_halves``).
Dimensions: B tokens, D model width, F FFN width, S expert size, E = ceil(F / S) experts.
This module imports triton at import time: import it lazily.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
import triton

from .triton_jit import ACT_CODE, HAS_GDC, _ffn_finish_kernel, _ffn_in_kernel, _ffn_out_kernel
from .triton_masks import _budget_kernel, _compact_kernel, _router_kernel, _union_kernel
from .tuning import TABLE_EXPERT_SIZE, KernelConfig, gpu_key, heuristic_config, lookup

__all__ = ["KernelConfig", "MAX_TOKENS", "default_config", "plan_launch", "routed_sparse_ffn_triton",
           "router_mask_triton", "sparse_ffn_triton"]

MAX_TOKENS = 64  # the decode kernels handle up to this many tokens per call
MAX_EXPERTS = 8192  # the kernels hold the union flags of every expert in registers
DOT_MIN_TOKENS = 1  # tl.dot above this many tokens (broadcast multiply-adds at or below)


# --------------------------------------------------------------------------- planning
def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _device_info(device: torch.device) -> tuple[str, int]:
    """(table key of the GPU, number of SMs); ("cpu", 4) off CUDA (Triton's interpreter)."""
    if device.type != "cuda":
        return "cpu", 4
    props = torch.cuda.get_device_properties(device)
    return gpu_key(props.name), props.multi_processor_count


def default_config(num_tokens: int, model_width: int, ffn_width: int,
                   device: torch.device | str | None = None, expert_size: int = TABLE_EXPERT_SIZE) -> KernelConfig:
    """The settings for this call: the tuned table row for the GPU, shape and expert size, else the heuristic."""
    dev = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    gpu, num_sms = _device_info(dev)
    tuned = lookup(gpu, model_width, ffn_width, num_tokens, expert_size)
    return tuned if tuned is not None else heuristic_config(num_tokens, model_width, ffn_width, num_sms)


@dataclass
class FFNLaunch:
    """Everything the launches of one call need: inputs, scratch buffers and settings."""

    x: torch.Tensor  # [B, D]
    mask_u8: torch.Tensor  # [B, E] bytes (1 = expert on for the token)
    union: torch.Tensor  # [E] int8, filled by the router / union / budget launch
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
    e_pad: int
    block_f: int  # rows per gate/up work item
    row_blocks: int  # RB: items per expert in the gate/up kernel (1 when in_group > 1)
    max_items: int  # E x RB
    in_grid: int
    in_slots: int
    split: int
    out_chunk: int  # expert ids the down kernel finds at a time (a multiple of out_group)
    pdl: bool
    in_group: int  # experts per gate/up item (> 1 when tl.dot's 16 rows exceed a power-of-two expert)
    out_group: int  # G: experts per step of the down kernel
    out_rows: int  # S_PAD: rows per step of the down kernel (G x the expert size, padded when G = 1)
    h: torch.Tensor  # [B, F] scratch (fp32, or x's dtype for the identity activation)
    part: torch.Tensor  # [SPLIT, B, D] fp32 partial sums
    y: torch.Tensor  # [B, D] output
    # fp8 weights (lte.kernels.quant): one fp32 scale per row of w_up / w_gate / w_down_t, [F] each
    s_up: torch.Tensor | None = None
    s_gate: torch.Tensor | None = None
    s_down: torch.Tensor | None = None
    # KernelConfig.active_list: [1 + E] int32, the union's count then its expert ids (launch_compact writes it)
    active: torch.Tensor | None = None

    @property
    def scaled(self) -> bool:
        return self.s_up is not None


def _out_chunk(num_exp: int, split: int) -> int:
    """Expert ids per step of the down kernel: the whole share when small, else what keeps the
    [CHUNK, E_PAD] comparison near 8K elements."""
    share = _next_pow2(triton.cdiv(num_exp, split))
    return max(2, min(share, max(4, 8192 // _next_pow2(num_exp))))


def _out_group(expert_size: int) -> int:
    """Experts per step of the down kernel: 32 rows per step for power-of-two experts under 32
    neurons (8-neuron experts: 4 at a time), else 1 (the expert's rows padded to a power of two)."""
    if expert_size < 32 and expert_size & (expert_size - 1) == 0:
        return 32 // expert_size
    return 1


def _slots_for(max_share: int, row_blocks: int, group: int = 1) -> int:
    """Experts one contiguous share of at most max_share items can span (power of two, >= 2); with
    `group` experts per item (row_blocks is then 1), max_share x group."""
    if group > 1:
        return max(2, _next_pow2(max(max_share, 1) * group))
    span = (max(max_share, 1) + row_blocks - 2) // row_blocks + 1
    return max(2, _next_pow2(span))


def plan_launch(x, mask, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation,
                config: KernelConfig | None = None, h_dtype: torch.dtype | None = None,
                h: torch.Tensor | None = None, need_out: bool = True,
                scales: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None) -> FFNLaunch:
    """Pick tiles and allocate the scratch for one call (no kernel runs here).

    mask [B, E] bool (or uint8); ``h_dtype`` defaults to fp32; ``h`` [B, F]: use this tensor as h
    (the down half alone); ``need_out=False``: no down-projection buffers (the gate/up half alone);
    ``scales`` = (s_up, s_gate or None, s_down), [F] fp32 each: the weights are fp8 with row scales."""
    num_tokens, model_width = x.shape  # B, D
    ffn_width = w_up.shape[0]  # F
    if not 1 <= num_tokens <= MAX_TOKENS:
        raise ValueError(f"the decode kernels take 1 to {MAX_TOKENS} tokens, got {num_tokens}")
    num_exp = triton.cdiv(ffn_width, expert_size)  # E
    if num_exp > MAX_EXPERTS:
        raise ValueError(f"the decode kernels take at most {MAX_EXPERTS} experts, got {num_exp}")
    cfg = config or default_config(num_tokens, model_width, ffn_width, x.device, expert_size)
    use_dot = cfg.use_dot if cfg.use_dot is not None else num_tokens > DOT_MIN_TOKENS
    if use_dot and x.element_size() == 4:  # fp32: same shared-memory bytes per pipeline stage as 16-bit
        cfg = replace(cfg, in_block_k=max(16, cfg.in_block_k // 2))
    b_pad = max(16, _next_pow2(num_tokens)) if use_dot else _next_pow2(num_tokens)
    pow2 = expert_size & (expert_size - 1) == 0
    # an item is at most one expert, except under tl.dot for power-of-two experts under 16 rows: then
    # the setting's row count (several experts per item)
    block_f = min(cfg.in_block_f, 64 if use_dot and pow2 and expert_size < 16 else _next_pow2(expert_size))
    if use_dot:
        block_f = max(16, block_f)  # tl.dot needs 16+ on every side
    in_group = block_f // expert_size if pow2 and block_f > expert_size else 1  # small experts: several per item
    row_blocks = 1 if in_group > 1 else triton.cdiv(expert_size, block_f)
    max_items = triton.cdiv(num_exp, in_group) * row_blocks
    _, num_sms = _device_info(x.device)
    in_grid = max_items if cfg.in_progs_per_sm <= 0 else max(1, min(max_items, num_sms * cfg.in_progs_per_sm))
    in_grid = max(in_grid, triton.cdiv(max_items * in_group, 16 * row_blocks))  # a share spans ~16 experts
    split = max(1, min(cfg.out_split, num_exp))
    group = (cfg.out_group or _out_group(expert_size)) if pow2 else 1  # grouping needs power-of-two experts
    out_rows = group * expert_size if group > 1 else max(16, _next_pow2(expert_size))
    out_chunk = _next_pow2(max(cfg.out_chunk or _out_chunk(num_exp, split), group))
    device = x.device
    mask_u8 = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    s_up, s_gate, s_down = scales if scales is not None else (None, None, None)
    return FFNLaunch(
        x, mask_u8, torch.empty(num_exp, device=device, dtype=torch.int8),
        w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation,
        cfg, use_dot, b_pad, _next_pow2(num_exp), block_f, row_blocks, max_items, in_grid,
        _slots_for(triton.cdiv(max_items, in_grid), row_blocks, in_group), split,
        out_chunk, cfg.pdl and _pdl_supported(device), in_group, group, out_rows,
        h=h if h is not None else torch.empty(num_tokens, ffn_width, device=device, dtype=h_dtype or torch.float32),
        part=torch.empty(split if need_out else 0, num_tokens, model_width, device=device, dtype=torch.float32),
        y=torch.empty(num_tokens, model_width if need_out else 0, device=device, dtype=x.dtype),
        s_up=s_up, s_gate=s_gate, s_down=s_down,
        active=torch.empty(1 + num_exp, device=device, dtype=torch.int32) if cfg.active_list else None,
    )


@functools.cache
def _pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch needs a CUDA GPU of compute capability 9.0+ and triton's GDC ops;
    ``LTE_PDL=0`` turns it off."""
    if device.type != "cuda" or not HAS_GDC or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    if os.environ.get("LTE_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _pdl_kwargs(on: bool) -> dict:
    return {"launch_pdl": True} if on else {}


def _dot_precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


#: the DOT_DTYPE code of the down kernel (the dtype fp8 rows widen to for tl.dot): x's dtype
_DOT_DTYPE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


# --------------------------------------------------------------------------- launches
def launch_union(p: FFNLaunch) -> None:
    """Union of the caller's per-token masks (the mask-given entry point)."""
    launch_mask_union(p.mask_u8, p.union, trigger=p.pdl)


def launch_mask_union(mask_u8: torch.Tensor, union: torch.Tensor, trigger: bool) -> None:
    """union [E] int8 = any over tokens of mask_u8 [B, E] (a mask the caller brings);
    ``trigger``: let the next launch start early."""
    num_tokens, num_exp = mask_u8.shape
    block_e = 256
    _union_kernel[(triton.cdiv(num_exp, block_e),)](
        mask_u8, union, num_tokens, num_exp, mask_u8.stride(0),
        B_PAD=_next_pow2(num_tokens), BLOCK_E=block_e, TRIGGER=trigger, num_warps=4,
    )


def router_blocks(num_tokens: int, model_width: int, cfg: KernelConfig) -> tuple[bool, int, int, int]:
    """The router kernel's tiling for B tokens of width D: (use tl.dot, B_PAD, BLOCK_E, BLOCK_K).
    tl.dot needs every tile side >= 16 on the GPU (Triton's interpreter does not check), so on the dot
    path B_PAD and BLOCK_K are at least 16 even where B or D is smaller (the loads mask the rest)."""
    use_dot = num_tokens > 8 and cfg.router_block_e >= 16
    b_pad = max(16, _next_pow2(num_tokens)) if use_dot else _next_pow2(num_tokens)
    block_e = cfg.router_block_e if use_dot else max(1, cfg.router_block_e)
    full_k = _next_pow2(model_width)
    if use_dot:
        block_k = min(max(16, cfg.router_block_k or 128), 256, max(16, full_k))
    else:
        fits = full_k * b_pad * block_e <= 16384  # broadcast product held in registers
        block_k = min(cfg.router_block_k or (full_k if fits else max(64, 2048 // b_pad)), full_k)
    return use_dot, b_pad, block_e, block_k


def launch_router(x: torch.Tensor, w_router: torch.Tensor, threshold: float, mask_u8: torch.Tensor | None,
                  union: torch.Tensor | None, score: torch.Tensor | None, cfg: KernelConfig, pdl: bool,
                  logits: torch.Tensor | None = None) -> None:
    """Router logits -> per-token mask (mask_u8 [B, E]), union ([E] int8) and, when ``score`` is
    given, the summed sigmoid scores ([E] fp32). With ``logits`` ([B, E] fp32) it writes the logits
    there instead, and nothing else (mask_u8, union, score and threshold unused)."""
    num_tokens, model_width = x.shape
    num_exp = w_router.shape[0]
    use_dot, b_pad, block_e, block_k = router_blocks(num_tokens, model_width, cfg)
    wait = cfg.router_pdl and pdl
    out = logits if logits is not None else mask_u8  # never-read pointers stand in for the outputs not written
    _router_kernel[(triton.cdiv(num_exp, block_e),)](
        x, w_router, out, union if union is not None else out, score if score is not None else out, out,
        num_tokens, model_width, num_exp, threshold,
        x.stride(0), out.stride(0), out.stride(0),
        B_PAD=b_pad, BLOCK_E=block_e, BLOCK_K=block_k, ONE_STEP=block_k >= model_width,
        USE_DOT=use_dot, DOT_PREC=_dot_precision(x), WITH_SCORE=score is not None, PDL=wait, TRIGGER=pdl,
        LOGITS=logits is not None, num_warps=cfg.router_warps, **_pdl_kwargs(wait),
    )


def launch_budget(p: FFNLaunch, union_in: torch.Tensor, score: torch.Tensor, budget: int) -> None:
    """Cut the union to its ``budget`` experts of largest summed score (p.union, p.mask_u8 updated)."""
    launch_budget_cut(union_in, score, p.union, p.mask_u8, budget, p.pdl)


def launch_budget_cut(union_in: torch.Tensor, score: torch.Tensor, union: torch.Tensor, mask_u8: torch.Tensor,
                      budget: int, pdl: bool) -> None:
    """Of the experts on in union_in [E], keep the ``budget`` of largest score [E] (ties: lower index):
    written to union [E] int8, and cleared from every token's row of mask_u8 [B, E]."""
    num_tokens, num_exp = mask_u8.shape
    block_e = 128
    _budget_kernel[(triton.cdiv(num_exp, block_e),)](
        union_in, score, union, mask_u8,
        num_tokens, num_exp, budget, mask_u8.stride(0),
        E_PAD=_next_pow2(num_exp), B_PAD=_next_pow2(num_tokens), BLOCK_E=block_e, PDL=pdl,
        num_warps=4, **_pdl_kwargs(pdl),
    )


def _list_arg(p: FFNLaunch) -> torch.Tensor:
    """The list pointer of the gate/up and down kernels (the union stands in, never read, without a list)."""
    return p.active if p.active is not None else p.union


def _weight_eviction(cfg: KernelConfig) -> str:
    """The weight loads' L2 eviction policy (`KernelConfig.stream_weights`)."""
    return "evict_first" if cfg.stream_weights else ""


def launch_compact(p: FFNLaunch) -> None:
    """The union as a list of expert ids (``KernelConfig.active_list``): p.active, for the gate/up and down kernels."""
    _compact_kernel[(1,)](p.union, p.active, p.union.shape[0], E_PAD=p.e_pad, PDL=p.pdl, num_warps=4,
                          **_pdl_kwargs(p.pdl))


def in_constexprs(p: FFNLaunch) -> dict:
    """The gate/up kernel's compile-time arguments (and warps / stages) for a plan: what `launch_in` passes, and
    what tests/compile_sm90.py compiles without a GPU."""
    cfg = p.cfg
    return dict(GATED=p.w_gate is not None, HAS_BIAS=p.b_up is not None, ACT=ACT_CODE[p.activation],
                B_PAD=p.b_pad, BLOCK_F=p.block_f, BLOCK_K=cfg.in_block_k, E_PAD=p.e_pad, SLOTS=p.in_slots,
                PERSISTENT=p.in_grid < p.max_items, USE_DOT=p.use_dot, DOT_PREC=_dot_precision(p.x), PDL=p.pdl,
                SCALED=p.scaled, G=p.in_group, W_EVICT=_weight_eviction(cfg), LIST=p.active is not None,
                num_warps=cfg.in_warps, num_stages=cfg.in_stages)


def out_constexprs(p: FFNLaunch, token_mask: bool = False) -> dict:
    """The down kernel's compile-time arguments (and warps / stages) for a plan, as `launch_out` passes them."""
    cfg = p.cfg
    return dict(B_PAD=p.b_pad, S_PAD=p.out_rows, E_PAD=p.e_pad, CHUNK=p.out_chunk, BLOCK_D=cfg.out_block_d,
                TOKEN_MASK=token_mask, USE_DOT=p.use_dot, DOT_PREC=_dot_precision(p.x), PDL=p.pdl,
                SCALED=p.s_down is not None, DOT_DTYPE=_DOT_DTYPE[p.x.dtype], G=p.out_group,
                PREFETCH=int(cfg.out_prefetch and p.out_group == 1), W_EVICT=_weight_eviction(cfg),
                LIST=p.active is not None, num_warps=cfg.out_warps, num_stages=cfg.out_stages)


def _fits(launch, p: FFNLaunch, kernel: str, settings: str):
    """Run `launch`; a tile set this GPU cannot hold becomes an error that names the settings to lower."""
    try:
        return launch()
    except triton.runtime.errors.OutOfResources as err:
        raise ValueError(
            f"the {kernel} kernel's tiles do not fit this GPU at B={p.x.shape[0]} tokens, {p.x.dtype}: {err}. "
            f"Lower {settings} in the KernelConfig (a table row tuned for another batch size or GPU?), or pass "
            f"config=None for the planned defaults of this shape and batch size.") from err


def launch_in(p: FFNLaunch) -> None:
    """Gate/up kernel: h = act(gate) * up * mask for the rows of the union's experts (with
    ``active_list``, the union's list first)."""
    if p.active is not None:
        launch_compact(p)
    num_tokens, model_width = p.x.shape
    ffn_width = p.w_up.shape[0]
    scale_dummy = p.union  # never read when the weights carry no scales
    _fits(lambda: _ffn_in_kernel[(p.in_grid,)](
        p.x, p.mask_u8, p.union, _list_arg(p), p.w_gate if p.w_gate is not None else p.w_up, p.w_up,
        p.b_up if p.b_up is not None else p.w_up,
        p.s_gate if p.s_gate is not None else scale_dummy, p.s_up if p.s_up is not None else scale_dummy, p.h,
        num_tokens, model_width, ffn_width, p.expert_size, p.union.shape[0], p.row_blocks,
        p.x.stride(0), p.mask_u8.stride(0), p.h.stride(0), **in_constexprs(p), **_pdl_kwargs(p.pdl),
    ), p, "gate/up", "in_block_k, in_block_f or in_stages")


def launch_out(p: FFNLaunch, token_mask: bool = False) -> None:
    """Down kernel: partial down projections over equal shares of the union's experts
    (``token_mask``: apply each token's mask to h, for an h the gate/up kernel did not write). With
    ``active_list`` it reads the list launch_in's compaction wrote."""
    num_tokens, model_width = p.x.shape
    ffn_width = p.w_up.shape[0]
    _fits(lambda: _ffn_out_kernel[(triton.cdiv(model_width, p.cfg.out_block_d), p.split)](
        p.h, p.union, _list_arg(p), p.mask_u8, p.w_down_t, p.s_down if p.s_down is not None else p.union, p.part,
        num_tokens, model_width, ffn_width, p.expert_size, p.union.shape[0],
        p.h.stride(0), p.mask_u8.stride(0), **out_constexprs(p, token_mask), **_pdl_kwargs(p.pdl),
    ), p, "down", "out_block_d or out_stages")


def launch_finish(p: FFNLaunch) -> None:
    """Finish kernel: sum the partials, add b2, cast."""
    num_tokens, model_width = p.x.shape
    _ffn_finish_kernel[(triton.cdiv(model_width, p.cfg.finish_block), num_tokens)](
        p.part, p.b_down if p.b_down is not None else p.part, p.y,
        num_tokens, model_width, p.split, p.y.stride(0),
        HAS_BIAS=p.b_down is not None, SPLIT_PAD=_next_pow2(p.split), BLOCK=p.cfg.finish_block,
        PDL=p.pdl, **_pdl_kwargs(p.pdl),
    )


def run_ffn(p: FFNLaunch) -> torch.Tensor:
    """The three FFN launches after the union is in place; returns y [B, D]."""
    launch_in(p)
    launch_out(p)
    launch_finish(p)
    return p.y


# --------------------------------------------------------------------------- entry points
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
    scales: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Union launch + the three FFN launches for x [B, D] (B <= 64) and mask [B, E] (bool); y [B, D].

    Inputs must already be validated (see ``lte.kernels.sparse_ffn``): contiguous, same device
    and dtype for x and the weights (or fp8 weights with ``scales`` = (s_up, s_gate, s_down)).
    """
    p = plan_launch(x, mask, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation, config,
                    scales=scales)
    launch_union(p)
    return run_ffn(p)


def router_mask_triton(x: torch.Tensor, w_router: torch.Tensor, threshold: float,
                       config: KernelConfig | None = None) -> torch.Tensor:
    """Fused router GEMV + threshold on the logits for x [B, D] (B <= 64); returns bool [B, E]."""
    num_tokens, model_width = x.shape  # B, D
    num_exp = w_router.shape[0]  # E
    if not 1 <= num_tokens <= MAX_TOKENS:
        raise ValueError(f"the router kernel takes 1 to {MAX_TOKENS} tokens, got {num_tokens}")
    cfg = config or default_config(num_tokens, model_width, num_exp * TABLE_EXPERT_SIZE, x.device)  # router rows: any S
    out = torch.empty(num_tokens, num_exp, device=x.device, dtype=torch.bool)  # [B, E]
    union = torch.empty(num_exp, device=x.device, dtype=torch.int8)
    launch_router(x, w_router, threshold, out.view(torch.uint8), union, None, cfg, _pdl_supported(x.device))
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
    budget: int = 0,
    scales: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router (+ budget) then the FFN launches: mask = (x Wr^T > threshold) on the GPU.

    x [B, D] (B <= 64), w_router [E, D]; ``budget > 0`` keeps at most that many experts for the
    whole batch (those with the largest summed sigmoid score among the experts some token wants).
    Returns (y [B, D], mask [B, E] bool: the experts each token used). Validated inputs only (see
    ``lte.kernels.routed_sparse_ffn``). ``scales`` = (s_up, s_gate, s_down): fp8 weights with row
    scales (``lte.kernels.quant``); the router stays in x's dtype.
    """
    num_tokens = x.shape[0]
    num_exp = w_router.shape[0]
    mask = torch.empty(num_tokens, num_exp, device=x.device, dtype=torch.bool)  # [B, E]
    p = plan_launch(x, mask, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation, config,
                    scales=scales)
    launch_route(p, x, w_router, threshold, budget)
    return run_ffn(p), mask


def launch_route(p: FFNLaunch, x: torch.Tensor, w_router: torch.Tensor, threshold: float, budget: int) -> None:
    """Router (+ budget) launches into p.mask_u8 / p.union."""
    num_exp = w_router.shape[0]
    if 0 < budget < num_exp:
        score = torch.empty(num_exp, device=x.device, dtype=torch.float32)
        final_union = p.union
        p.union = torch.empty_like(final_union)  # the router's union; the budget kernel writes the final one
        launch_router(x, w_router, threshold, p.mask_u8, p.union, score, p.cfg, p.pdl)
        raw_union, p.union = p.union, final_union
        launch_budget(p, raw_union, score, budget)
    else:
        launch_router(x, w_router, threshold, p.mask_u8, p.union, None, p.cfg, p.pdl)

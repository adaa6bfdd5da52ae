"""Compare the Triton kernels with the PyTorch reference over odd shapes, batches, masks and dtypes.

Used by the tests (on CPU through Triton's interpreter: run with ``TRITON_INTERPRET=1`` set before
triton is imported), by the GPU benchmark, and by users: ``python -m lte.kernels.selfcheck``.
Calls the launchers directly, so it checks the kernels even where the ops would fall back.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass, replace

import torch

from .reference import (
    ACTIVATIONS,
    decode_attention_reference,
    expand_mask,
    logit_threshold,
    masked_activation_reference,
    num_experts,
    routed_mask_reference,
    router_mask_reference,
    router_topk_mask_reference,
    sparse_ffn_reference,
    topk_among,
    topk_keep,
)
from .tuning import KernelConfig

# norm-relative error allowed per dtype: fp32 arithmetic, fp16 / bf16 rounding of h and y
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
SHAPES = ((72, 100, 32), (100, 160, 32), (33, 200, 48))  # (D, F, S): odd D and S, smaller last expert
#: Experts of 8 and 16 neurons (finer than the paper's 32; the recipe study tries them): `--small-experts`
SMALL_EXPERT_SHAPES = ((40, 64, 8), (36, 80, 16), (20, 72, 8), (24, 42, 4))
BATCHES = (1, 5, 40)
#: None = the default settings (one program per work item); the second a persistent grid with
#: several items per program, 8-row items (B = 1), uneven expert shares in the down kernel found
#: two ids at a time, each share's first expert read ahead of the loop (`out_prefetch`); the third
#: 32-row items under tl.dot (four 8-neuron experts per item), two experts per down-kernel step, the
#: weights streamed through L2 (`stream_weights`) and the union's experts from a list (`active_list`); the
#: fourth each case's planned default tiles with the list, two ids at a time and the read-ahead in the down kernel
#: (a function of the case: fixed B = 1 tiles hold 384 KB of shared memory at B = 40 in fp32, past any GPU's limit).
LIST_ON_DEFAULTS = {"active_list": True, "out_chunk": 2, "out_prefetch": True}
CONFIGS = (None, KernelConfig(in_block_f=8, in_block_k=64, in_progs_per_sm=1, out_block_d=32, out_split=3,
                              out_chunk=2, out_prefetch=True, router_block_e=4, router_block_k=32),
           KernelConfig(in_block_f=32, in_block_k=32, in_progs_per_sm=2, out_block_d=16, out_split=2, out_group=2,
                        stream_weights=True, active_list=True),
           "defaults+list")


def case_config(config, B: int, D: int, F: int, S: int, device) -> KernelConfig | None:
    """A `CONFIGS` entry for one case: None (the kernels plan their defaults), a KernelConfig, or "defaults+list"
    (the planned defaults of this B, D, F, S with `LIST_ON_DEFAULTS`)."""
    if config == "defaults+list":
        from .triton_ffn import default_config

        return replace(default_config(B, D, F, torch.device(device), S), **LIST_ON_DEFAULTS)
    return config


#: top-k routing's mask: experts E (one, odd, several router blocks) and widths D (one step, odd)
TOPK_EXPERTS = (1, 5, 37, 130)
TOPK_WIDTHS = (8, 67)
TOPK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: router settings of the top-k cases: default; tl.dot above 8 tokens with 32-wide steps over D;
#: broadcast multiply-adds (4 experts per program) with 32-wide steps over D
TOPK_CONFIGS = (None, KernelConfig(router_block_e=16, router_block_k=32), KernelConfig(router_block_e=4, router_block_k=32))
SPARSITIES = ("none", "random", "all")  # 0% off, a random middle fraction, 100% off
FFN_KINDS = (("silu", True, False), ("gelu_tanh", True, True), ("gelu", False, True), ("relu", False, False))
# (activation, gated, with biases)


@dataclass
class CaseResult:
    """One comparison: the case's description, its error and whether it passed."""

    case: str
    error: float
    ok: bool


def _make_mask(num_tokens: int, num_exp: int, sparsity: str, gen: torch.Generator) -> torch.Tensor:
    """Per-token expert mask [B, E]: all on, all off, or each token its own random fraction."""
    if sparsity == "none":
        return torch.ones(num_tokens, num_exp, dtype=torch.bool)
    if sparsity == "all":
        return torch.zeros(num_tokens, num_exp, dtype=torch.bool)
    keep = torch.rand(num_tokens, 1, generator=gen) * 0.8 + 0.1  # [B, 1] per-token keep rate
    return torch.rand(num_tokens, num_exp, generator=gen) < keep


def make_ffn(model_width, ffn_width, gated, with_bias, dtype, device, gen):
    """Random FFN weights as a dict of sparse_ffn keyword arguments (scaled so outputs are O(1))."""
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    return {
        "w_gate": rand(ffn_width, model_width, scale=model_width**-0.5) if gated else None,
        "w_up": rand(ffn_width, model_width, scale=model_width**-0.5),
        "w_down_t": rand(ffn_width, model_width, scale=ffn_width**-0.5),
        "b_up": rand(ffn_width) if with_bias else None,
        "b_down": rand(model_width) if with_bias else None,
    }


def check_ffn_case(D, F, S, B, sparsity, kind, dtype, device, gen, config=None) -> CaseResult:
    """Run one kernel-vs-reference comparison; 100% off must give exactly b2 (or zeros)."""
    from .triton_ffn import sparse_ffn_triton

    activation, gated, with_bias = kind
    w = make_ffn(D, F, gated, with_bias, dtype, device, gen)
    x = torch.randn(B, D, generator=gen).to(dtype=dtype, device=device)  # [B, D]
    mask = _make_mask(B, num_experts(F, S), sparsity, gen).to(device)  # [B, E]
    y = sparse_ffn_triton(x, mask, w["w_up"], w["w_down_t"], w["w_gate"], w["b_up"], w["b_down"],
                          S, activation, case_config(config, B, D, F, S, device))
    ref = sparse_ffn_reference(x, mask, expert_size=S, activation=activation, **w)
    label = ("planned" if config is None else config if isinstance(config, str)
             else f"config {CONFIGS.index(config)}" if config in CONFIGS else "custom")
    case = f"D={D} F={F} S={S} B={B} {sparsity} {activation} gated={gated} bias={with_bias} {dtype} {label}"
    if sparsity == "all":
        want = torch.zeros_like(ref) if w["b_down"] is None else w["b_down"].expand_as(ref)
        exact = torch.equal(y, want)
        return CaseResult(case, 0.0 if exact else float("inf"), exact)
    err = ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
    ok = bool(torch.isfinite(y).all()) and err <= TOLERANCE[dtype]
    return CaseResult(case, err, ok)


def check_active_list_case(D, F, S, B, sparsity, kind, dtype, device, gen) -> CaseResult:
    """``KernelConfig.active_list``: the compaction writes [n, the union's experts in order] (checked by hand
    against mask.any(0)), and the FFN with the list equals the FFN without it bit for bit (the same arithmetic in
    the same order), with one program per item and with a persistent grid."""
    from .triton_ffn import default_config, launch_compact, launch_union, plan_launch, sparse_ffn_triton

    activation, gated, with_bias = kind
    w = make_ffn(D, F, gated, with_bias, dtype, device, gen)
    x = torch.randn(B, D, generator=gen).to(dtype=dtype, device=device)  # [B, D]
    mask = _make_mask(B, num_experts(F, S), sparsity, gen).to(device)  # [B, E]
    args = (x, mask, w["w_up"], w["w_down_t"], w["w_gate"], w["b_up"], w["b_down"], S, activation)
    base = default_config(B, D, F, x.device, S)
    p = plan_launch(*args, replace(base, active_list=True))
    launch_union(p)
    launch_compact(p)
    want = torch.cat([mask.any(0).sum().view(1), mask.any(0).nonzero().view(-1)]).to(torch.int32)
    listed = p.active[: want.numel()].cpu()
    ok = torch.equal(listed, want.cpu())
    for cfg in (base, replace(base, in_progs_per_sm=1)):
        ok = ok and torch.equal(sparse_ffn_triton(*args, replace(cfg, active_list=True)), sparse_ffn_triton(*args, cfg))
    case = f"active list D={D} F={F} S={S} B={B} {sparsity} {activation} {dtype}"
    return CaseResult(case, 0.0 if ok else float("inf"), ok)


def check_fp8_case(D, F, S, B, sparsity, kind, dtype, device, gen, config=None, routed=False) -> CaseResult:
    """fp8 weights with row scales (``lte.kernels.quant``) against the reference on the same weights
    dequantized; mask given (0% / middle / 100% off) or, ``routed``, from the router kernel."""
    from .quant import quantize_rows_fp8
    from .triton_ffn import routed_sparse_ffn_triton, sparse_ffn_triton

    activation, gated, with_bias = kind
    w = make_ffn(D, F, gated, with_bias, dtype, device, gen)
    q = {k: quantize_rows_fp8(w[k]) if w[k] is not None else (None, None) for k in ("w_up", "w_gate", "w_down_t")}
    scales = (q["w_up"][1], q["w_gate"][1], q["w_down_t"][1])
    wq = dict(w, **{k: q[k][0] for k in q})
    x = torch.randn(B, D, generator=gen).to(dtype=dtype, device=device)  # [B, D]
    num_exp = num_experts(F, S)
    if routed:
        w_router = (torch.randn(num_exp, D, generator=gen) * 2 * D**-0.5).to(dtype=dtype, device=device)
        y, mask = routed_sparse_ffn_triton(x, w_router, 0.0, wq["w_up"], wq["w_down_t"], wq["w_gate"], wq["b_up"],
                                           wq["b_down"], S, activation, config, scales=scales)
    else:
        mask = _make_mask(B, num_exp, sparsity, gen).to(device)  # [B, E]
        y = sparse_ffn_triton(x, mask, wq["w_up"], wq["w_down_t"], wq["w_gate"], wq["b_up"], wq["b_down"], S,
                              activation, config, scales=scales)
    ref = sparse_ffn_reference(x, mask, expert_size=S, activation=activation, s_up=scales[0], s_gate=scales[1],
                               s_down=scales[2], **wq)
    case = (f"fp8 D={D} F={F} S={S} B={B} {'routed' if routed else sparsity} {activation} gated={gated} "
            f"bias={with_bias} {dtype} {'default' if config is None else 'persistent'}")
    if sparsity == "all" and not routed:
        want = torch.zeros_like(ref) if w["b_down"] is None else w["b_down"].expand_as(ref)
        exact = torch.equal(y, want)
        return CaseResult(case, 0.0 if exact else float("inf"), exact)
    err = ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
    return CaseResult(case, err, bool(torch.isfinite(y).all()) and err <= TOLERANCE[dtype])


def check_router_case(D, E, B, dtype, device, gen) -> CaseResult:
    """Fused router kernel vs reference; only logits within rounding of the threshold may differ."""
    from .reference import logit_threshold
    from .triton_ffn import router_mask_triton

    x = torch.randn(B, D, generator=gen).to(dtype=dtype, device=device)
    w_router = (torch.randn(E, D, generator=gen) * D**-0.5).to(dtype=dtype, device=device)
    tau = 0.4
    got = router_mask_triton(x, w_router, logit_threshold(tau))
    want = router_mask_reference(x, w_router, tau)
    logits = x.float() @ w_router.float().T  # [B, E]
    near = (logits - logit_threshold(tau)).abs() < 1e-3
    bad = ((got != want) & ~near).sum().item()
    return CaseResult(f"router D={D} E={E} B={B} {dtype}", float(bad), bad == 0)


def check_topk_case(D, E, B, k, dtype, device, gen, ties=False, config=None, budget=0) -> CaseResult:
    """Router top-k kernels vs the reference: the masks must be equal, with exactly min(k, E) experts
    per token. x holds multiples of 1/4 in [-2, 2] and w multiples of 1/8 in [-1, 1], so every logit
    is a multiple of 1/32 that fp32 sums exactly in any order, from any of the three dtypes: no
    rounding near-ties, many exact ties. ``ties``: also a second copy of the first router rows (equal
    logits: the lower index must win) and an all-zero token (every logit 0: the first k experts).
    ``budget`` > 0: the fused union + budget + re-rank kernel too; each token keeps its top k among the
    union's ``budget`` experts of largest summed sigmoid score. Summed sigmoids are not exact: where two
    of them lie within 1e-4 of each other at the cut, any of the tied experts may be the one kept, so the
    mask must then be each token's top k among some ``budget`` experts of the union."""
    from .triton_topk import router_topk_mask_triton

    x = torch.randint(-8, 9, (B, D), generator=gen) / 4  # [B, D]
    w_router = torch.randint(-8, 9, (E, D), generator=gen) / 8  # [E, D]
    if ties:
        w_router[E // 2:] = w_router[: E - E // 2].clone()
        x[0] = 0.0
    x, w_router = x.to(dtype=dtype, device=device), w_router.to(dtype=dtype, device=device)
    got = router_topk_mask_triton(x, w_router, k, config, budget=budget)
    want = router_topk_mask_reference(x, w_router, k, budget)
    case = (f"topk D={D} E={E} B={B} k={k}{f' budget={budget}' if budget else ''} {dtype}{' ties' if ties else ''} "
            f"{'default' if config is None else f'block_e={config.router_block_e}'}")
    if not budget:
        counts_ok = bool((got.sum(-1) == min(k, E)).all())
        bad = int((got != want).sum())
        return CaseResult(case, float(bad), bad == 0 and counts_ok)
    unbudgeted = router_topk_mask_reference(x, w_router, k)  # [B, E]
    union = unbudgeted.any(0)
    score = torch.where(union, torch.sigmoid(x.float() @ w_router.float().T).sum(0), -1.0).sort(descending=True).values
    near_tie = budget < int(union.sum()) and bool((score[budget - 1] - score[budget]).abs() < 1e-4)
    if near_tie:
        kept = got.any(0)  # every kept expert stays in the top k of a token that had it before the cut
        logits = x.float() @ w_router.float().T  # [B, E], exact (multiples of 1/32)
        bad = int((kept & ~union).sum()) + int((got != topk_among(logits, k, kept)).sum())
        ok = bad == 0 and int(kept.sum()) == min(budget, int(union.sum()))
    else:
        bad = int((got != want).sum())
        ok = bad == 0
    fits = " (the union fits)" if int(union.sum()) <= budget else ""
    return CaseResult(case + (" near-tie" if near_tie else "") + fits, float(bad), ok)


def check_topk_extremes_case(k, device, config=None) -> CaseResult:
    """Router top-k kernels on fp32 logits over the whole line: +-inf, +-1e30, +-0.0, equal pairs,
    tiny and negative values. x reads one channel (x[b] = (c_b, 0, ..., 0)) and Wr[e, 0] holds the
    values, so every logit is c_b * Wr[e, 0] exactly. The top-k kernel also gets such logits directly,
    with -0.0 before +0.0 (equal values: the lower index wins; a sum in the router rarely gives -0.0)."""
    from .reference import topk_keep
    from .triton_topk import launch_topk, router_topk_mask_triton

    values = torch.tensor([-float("inf"), 1e30, -1e30, 1.5, -1.5, 0.0, -0.0, 1.5, float("inf"), -1e-30, 1e-30,
                           -1.5, -0.0, 3.0e-38, -1.5e38])  # [E = 15]
    w_router = torch.zeros(values.numel(), 9)
    w_router[:, 0] = values
    x = torch.zeros(4, 9)
    x[:, 0] = torch.tensor([1.0, -1.0, 0.5, -2.0])
    x, w_router = x.to(device), w_router.to(device)
    got = router_topk_mask_triton(x, w_router, k, config)
    want = router_topk_mask_reference(x, w_router, k)
    direct = torch.stack([values, -values, torch.tensor([-0.0, 0.0] * 7 + [-0.0])]).to(device)  # [3, E]
    got_direct = torch.empty(direct.shape, dtype=torch.bool, device=device)
    launch_topk(direct, got_direct.view(torch.uint8), min(k, values.numel()), pdl=False)
    got, want = torch.cat([got, got_direct]), torch.cat([want, topk_keep(direct, k)])
    bad = int((got != want).sum())
    ok = bad == 0 and bool((got.sum(-1) == min(k, values.numel())).all())
    return CaseResult(f"topk extremes E={values.numel()} k={k}", float(bad), ok)


def check_routed_case(D, F, S, B, budget, kind, dtype, device, gen, config=None) -> CaseResult:
    """Router (+ budget) + FFN launches vs the reference mask and FFN.

    The mask may differ only where a logit lies within rounding of the threshold; with a budget,
    only where the budget's cut falls between two summed scores within rounding of each other."""
    from .triton_ffn import routed_sparse_ffn_triton

    activation, gated, with_bias = kind
    w = make_ffn(D, F, gated, with_bias, dtype, device, gen)
    num_exp = num_experts(F, S)
    x = torch.randn(B, D, generator=gen).to(dtype=dtype, device=device)  # [B, D]
    w_router = (torch.randn(num_exp, D, generator=gen) * 2 * D**-0.5).to(dtype=dtype, device=device)
    tau = 0.5
    y, mask = routed_sparse_ffn_triton(x, w_router, logit_threshold(tau), w["w_up"], w["w_down_t"], w["w_gate"],
                                       w["b_up"], w["b_down"], S, activation, config, budget=budget)
    case = f"routed D={D} F={F} S={S} B={B} budget={budget} {activation} {dtype}"
    want = routed_mask_reference(x, w_router, tau, budget)
    logits = x.float() @ w_router.float().T  # [B, E]
    near = (logits - logit_threshold(tau)).abs() < 1e-2
    if budget:
        score = torch.sigmoid(logits).sum(0).sort(descending=True).values
        if budget < num_exp and (score[budget - 1] - score[budget]).abs() < 1e-2:
            near = torch.ones_like(near)  # the cut is a near tie: any of the tied experts may win
    bad_mask = int(((mask != want) & ~near).sum())
    ref = sparse_ffn_reference(x, mask, expert_size=S, activation=activation, **w)  # the mask the kernel used
    err = ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
    over = budget and int(mask.any(0).sum()) > budget
    ok = bad_mask == 0 and not over and bool(torch.isfinite(y).all()) and err <= TOLERANCE[dtype]
    return CaseResult(case, err if bad_mask == 0 else float(bad_mask), ok)


def check_split_case(D, F, S, B, budget, activation, dtype, device, gen, config=None) -> CaseResult:
    """The two halves (router + x W1^T + b1, the model's activation, down projection) vs the reference."""
    from .reference import apply_activation
    from .triton_ffn_halves import routed_ffn_in_triton, sparse_ffn_out_triton

    w = make_ffn(D, F, False, True, dtype, device, gen)
    num_exp = num_experts(F, S)
    x = torch.randn(B, D, generator=gen).to(dtype=dtype, device=device)
    w_router = (torch.randn(num_exp, D, generator=gen) * 2 * D**-0.5).to(dtype=dtype, device=device)
    z, mask, union = routed_ffn_in_triton(x, w_router, 0.0, w["w_up"], w["b_up"], S, budget, config)
    h = apply_activation(z.float(), activation).to(dtype)  # what the model does between the halves
    y = sparse_ffn_out_triton(h, mask, union, w["w_down_t"], w["b_down"], S, config)
    ref = sparse_ffn_reference(x, mask, expert_size=S, activation=activation, **w)
    case = f"split D={D} F={F} S={S} B={B} budget={budget} {activation} {dtype}"
    err = ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
    union_ok = torch.equal(union.bool(), mask.any(0))
    ok = union_ok and bool(torch.isfinite(y).all()) and err <= TOLERANCE[dtype]
    return CaseResult(case, err if union_ok else float("inf"), ok)


def check_act_case(F, S, B, sparsity, activation, gated, dtype, device, gen, from_logits=False) -> CaseResult:
    """The masked dense path's elementwise kernel against the reference; 100% off must give exact zeros.
    ``from_logits``: the kernel thresholds router logits itself (the prefill path)."""
    from .triton_masked_act import masked_activation_triton

    up = torch.randn(B, F, generator=gen).to(dtype=dtype, device=device)  # [B, F]
    gate = torch.randn(B, F, generator=gen).to(dtype=dtype, device=device) if gated else None
    mask = _make_mask(B, num_experts(F, S), sparsity, gen).to(device)  # [B, E]
    if from_logits:  # logits on the right side of 0.3 by at least 0.5 wherever the mask says so
        threshold = 0.3
        size = torch.rand(mask.shape, generator=gen).to(device) + 0.5
        logits = (threshold + torch.where(mask, size, -size)).to(dtype)  # [B, E]
        h = masked_activation_triton(gate, up, logits, S, activation, block=64, threshold=threshold)
    else:
        h = masked_activation_triton(gate, up, mask, S, activation, block=64)  # several blocks per row
    ref = masked_activation_reference(gate, up, mask, S, activation)
    case = f"act{' logits' if from_logits else ''} F={F} S={S} B={B} {sparsity} {activation} gated={gated} {dtype}"
    if sparsity == "all":
        exact = not bool(h.any())
        return CaseResult(case, 0.0 if exact else float("inf"), exact)
    err = ((h.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
    return CaseResult(case, err, bool(torch.isfinite(h).all()) and err <= TOLERANCE[dtype])


def check_act_topk_case(F, S, B, k, activation, gated, dtype, device, gen, ties: bool = False,
                        block: int = 64) -> CaseResult:
    """The top-k masked activation (each token's k experts of largest logit, ranked inside the launch) against
    the reference; exact zeros wherever the reference's top-k mask is off. ``ties``: logits of a few integer
    values, so that the cut falls inside runs of equal logits, with -0.0 beside 0.0 and +-inf among them."""
    from .triton_masked_act import masked_activation_topk_triton

    num_exp = num_experts(F, S)
    up = torch.randn(B, F, generator=gen).to(dtype=dtype, device=device)  # [B, F]
    gate = torch.randn(B, F, generator=gen).to(dtype=dtype, device=device) if gated else None
    if ties:
        logits = torch.randint(-2, 3, (B, num_exp), generator=gen).float()  # [B, E]
        logits[logits == 0] = torch.where(torch.rand(int((logits == 0).sum()), generator=gen) > 0.5, -0.0, 0.0)
        logits[:, :: max(1, num_exp // 3)] = float("inf")
        logits[:, 1 :: max(2, num_exp // 2)] = float("-inf")
    else:
        logits = torch.randn(B, num_exp, generator=gen)
    logits = logits.to(dtype=dtype, device=device)
    h = masked_activation_topk_triton(gate, up, logits, k, S, activation, block=block)
    keep = topk_keep(logits.float(), k)  # [B, E]
    ref = masked_activation_reference(gate, up, keep, S, activation)
    off = ~expand_mask(keep, F, S)  # [B, F] neurons the reference switches off
    exact_off = not bool(h[off].any())
    case = f"act topk F={F} S={S} B={B} k={k} {activation} gated={gated} {dtype}{' ties' if ties else ''}"
    err = ((h.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
    return CaseResult(case, err, exact_off and bool(torch.isfinite(h).all()) and err <= TOLERANCE[dtype])


#: decode attention cases: (B, Hkv, G, L, d, slices; None = `split_plan`'s), odd sizes, one slot, slices of
#: unequal fill, a cache shorter than one tile
ATTENTION_CASES = ((1, 2, 4, 40, 16, None), (3, 2, 3, 100, 24, 3), (2, 1, 5, 64, 16, 2), (1, 8, 4, 130, 64, None),
                   (2, 3, 1, 1, 16, None), (4, 1, 8, 77, 32, 5))


def check_attention_case(B, kv_heads, G, L, d, splits, dtype, device, gen, masked: bool) -> CaseResult:
    """``decode_attention_triton`` (tiles of 16 slots) against the fp32 reference; with ``masked`` a random
    keep mask, one sequence with no slot kept (output 0) where B > 1."""
    from .triton_attention import decode_attention_triton

    q, k, v = (torch.randn(B, kv_heads, n, d, generator=gen).to(device=device, dtype=dtype) for n in (G, L, L))
    keep = None
    if masked:
        keep = torch.rand(B, L, generator=gen) < 0.6
        keep[0, -1] = True  # at least one slot for the first sequence
        if B > 1:
            keep[1] = False
        keep = keep.to(device)
    out = decode_attention_triton(q, k, v, keep, d**-0.5, block_l=16, splits=splits)
    ref = decode_attention_reference(q, k, v, keep, d**-0.5)
    case = f"attention B={B} Hkv={kv_heads} G={G} L={L} d={d} slices={splits} {dtype}{' masked' if masked else ''}"
    err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
    zero_rows_ok = not masked or B == 1 or bool((out[1] == 0).all())
    return CaseResult(case, err, bool(torch.isfinite(out).all()) and zero_rows_ok and err <= TOLERANCE[dtype])


def run_checks(device="cpu", dtypes=(torch.float32, torch.float16), full=False, seed=0,
               parts=("ffn", "router", "routed", "split", "act", "fp8", "topk"), shapes=SHAPES) -> list[CaseResult]:
    """All cases: with ``full`` the whole product, otherwise kinds, dtypes and settings rotate over
    the cases so that every value appears while keeping the count small (the CPU interpreter is slow).
    `shapes`: (D, F, S) cases (default `SHAPES`)."""
    results: list[CaseResult] = []

    def add(check, *args, **kwargs) -> None:
        """One case; a launch that raises (a compile error, shared memory past the GPU's) is a failed case with its
        error, and the cases after it still run."""
        try:
            results.append(check(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 - reported as the case's failure
            described = " ".join(str(a) for a in args[:5])
            results.append(CaseResult(f"{check.__name__}({described}): {type(err).__name__}: {str(err)[:300]}",
                                      float("inf"), False))

    gen = torch.Generator().manual_seed(seed)
    combos = list(itertools.product(FFN_KINDS, dtypes, CONFIGS))
    step = 0
    for (D, F, S), B, sparsity in itertools.product(shapes, BATCHES, SPARSITIES):
        if "ffn" not in parts:
            break
        chosen = combos if full else [combos[step % len(combos)]]
        step += 1
        for kind, dtype, config in chosen:
            add(check_ffn_case, D, F, S, B, sparsity, kind, dtype, device, gen, config)
    for i, ((D, F, S), B) in enumerate(itertools.product(shapes, (1, 5))):
        if "ffn" not in parts:
            break
        kind, dtype, _ = combos[i % len(combos)]
        add(check_active_list_case, D, F, S, B, SPARSITIES[i % 3], kind, dtype, device, gen)
    for (D, F, S), B in itertools.product(shapes[:2], (1, 5, 16, 33)):
        if "router" not in parts:
            break
        for dtype in dtypes:
            add(check_router_case, D, num_experts(F, S), B, dtype, device, gen)
    for i, ((D, F, S), B, budget) in enumerate(itertools.product(shapes, (1, 6, 40), (0, 3))):
        if "routed" not in parts:
            break
        kind, dtype, config = combos[i % len(combos)]
        add(check_routed_case, D, F, S, B, budget, kind, dtype, device, gen,
            case_config(config, B, D, F, S, device))
    for i, ((D, F, S), B) in enumerate(itertools.product(shapes[::2], (1, 5, 40))):
        if "split" not in parts:
            break
        kind, dtype, config = combos[i % len(combos)]
        add(check_split_case, D, F, S, B, i % 3, ("relu", "gelu")[i % 2], dtype, device, gen,
            case_config(config, B, D, F, S, device))
    for i, ((D, F, S), B, sparsity) in enumerate(itertools.product(shapes, BATCHES, (*SPARSITIES, "routed"))):
        if "fp8" not in parts:
            break
        kind, dtype, config = combos[i % len(combos)]
        add(check_fp8_case, D, F, S, B, "random" if sparsity == "routed" else sparsity, kind, dtype,
            device, gen, case_config(config, B, D, F, S, device),
            routed=sparsity == "routed")
    for i, ((_, F, S), B, sparsity) in enumerate(itertools.product(shapes, (1, 7), SPARSITIES)):
        if "act" not in parts:
            break
        activation, gated, _ = FFN_KINDS[i % len(FFN_KINDS)]
        for from_logits in (False, True):
            add(check_act_case, F, S, B, sparsity, activation, gated, dtypes[i % len(dtypes)], device, gen,
                from_logits)
        num_exp = num_experts(F, S)
        k = (num_exp + 2, num_exp // 2 + 1, 0)[SPARSITIES.index(sparsity)]  # every expert on, the middle, none
        add(check_act_topk_case, F, S, B, k, activation, gated, dtypes[(i + 1) % len(dtypes)], device, gen,
            ties=i % 2 == 1, block=(64, 1024)[i % 2])
    for i, (E, D, B) in enumerate(itertools.product(TOPK_EXPERTS, TOPK_WIDTHS, BATCHES)):
        if "topk" not in parts:
            break
        for j, k in enumerate(sorted({1, (E + 1) // 2, E} | ({E + 3} if i % 4 == 0 else set()))):
            for dtype, config in (itertools.product(TOPK_DTYPES, TOPK_CONFIGS) if full else
                                  [(TOPK_DTYPES[(i + j) % 3], TOPK_CONFIGS[(i + 2 * j) % 3])]):
                if device == "cpu" and dtype == torch.bfloat16 and B > 8 and config is not TOPK_CONFIGS[2]:
                    config = TOPK_CONFIGS[2]  # Triton's interpreter gets tl.dot wrong for bf16: broadcast path
                budget = (E + 2) // 3 if (i + j) % 3 == 2 else 0  # a per-batch budget on every third case
                add(check_topk_case, D, E, B, k, dtype, device, gen, ties=(i + j) % 2 == 1,
                    config=config, budget=budget)
    if "topk" in parts:
        for k in range(1, 16):
            add(check_topk_extremes_case, k, device, TOPK_CONFIGS[k % 3])
        for B, k, budget in ((3, 2, 20), (1, 7, 8), (5, 20, 39)):  # budgets the union fits (rows stand) or just not
            add(check_topk_case, 33, 40, B, k, TOPK_DTYPES[B % 3], device, gen, ties=B == 5,
                config=TOPK_CONFIGS[k % 3], budget=budget)
    for i, case in enumerate(ATTENTION_CASES):
        if "attn" not in parts:
            break
        for masked in (False, True):
            add(check_attention_case, *case, dtypes[(i + masked) % len(dtypes)], device, gen, masked)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="every kind x dtype for every case")
    parser.add_argument("--parts", nargs="+", default=["ffn", "router", "routed", "split", "act", "fp8", "topk", "attn"],
                        choices=["ffn", "router", "routed", "split", "act", "fp8", "topk", "attn"],
                        help="which groups of cases to run (fp8: weights in e4m3 with row scales; topk: top-k "
                             "routing's mask, fp32 / fp16 / bf16 on any device; attn: the decode attention kernel)")
    parser.add_argument("--small-experts", action="store_true", help="experts of 4, 8 and 16 neurons instead")
    args = parser.parse_args()
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if args.device != "cpu" else ())
    results = run_checks(args.device, dtypes, full=args.full, parts=tuple(args.parts),
                         shapes=SMALL_EXPERT_SHAPES if args.small_experts else SHAPES)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAIL {r.case}: error {r.error:.3g}")
    print(f"{len(results) - len(failed)}/{len(results)} cases passed; activations {ACTIVATIONS}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()

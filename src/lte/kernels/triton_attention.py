"""Decode-step attention of grouped-query models in two Triton launches (split-KV, "flash decoding").

One query token per sequence; the G query heads that share a KV head are its G query rows, so each KV
head's keys and values are read once. Launch 1 (``_decode_attn_split_kernel``): one program per
(sequence, KV head, slice of the cache) keeps a running softmax over its slice and writes the unnormalised
sum, the running max and the running denominator (fp32). Launch 2 (``_decode_attn_combine_kernel``): one
program per (sequence, KV head) rescales the slices to a common max and divides. Slicing the cache lets a
batch of one fill the GPU (a cache of 512 slots and 8 KV heads: 8 slices of 64 -> 64 programs).

Dimensions: B sequences, Hkv KV heads, G query heads per KV head, L cache slots, d head width.
Reference: ``lte.kernels.reference.decode_attention_reference``; the op: ``lte::decode_attention``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_ffn import _device_info

__all__ = ["decode_attention_triton", "split_plan"]


@triton.jit
def _decode_attn_split_kernel(
    q_ptr, k_ptr, v_ptr, keep_ptr, acc_ptr, ml_ptr,
    L, G, D, scale,
    s_qb, s_qh, s_qg, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_keep,
    HKV: tl.constexpr, SPLITS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_L: tl.constexpr,
    G_PAD: tl.constexpr, D_PAD: tl.constexpr, HAS_KEEP: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Slice `pid_s` of the cache for sequence b and KV head h: acc [G, d] = sum_l exp(s_l - m) v_l,
    m [G] the running max of the scores s_l = scale * q . k_l over kept slots, l [G] = sum_l exp(s_l - m)."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    rows = tl.arange(0, G_PAD)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < G
    col_ok = cols < D
    q = tl.load(q_ptr + b.to(tl.int64) * s_qb + h * s_qh + rows[:, None] * s_qg + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # [G_PAD, D_PAD]
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    den = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    k_base = k_ptr + b.to(tl.int64) * s_kb + h * s_kh
    v_base = v_ptr + b.to(tl.int64) * s_vb + h * s_vh
    for start in range(0, CHUNK, BLOCK_L):
        slots = pid_s * CHUNK + start + tl.arange(0, BLOCK_L)  # [BLOCK_L]
        ok = slots < L
        if HAS_KEEP:
            ok = ok & (tl.load(keep_ptr + b.to(tl.int64) * s_keep + slots, mask=ok, other=0) != 0)
        k = tl.load(k_base + slots[:, None].to(tl.int64) * s_kl + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                    other=0.0)  # [BLOCK_L, D_PAD]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale  # [G_PAD, BLOCK_L], fp32
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no kept slot yet: every term is exp(-inf) = 0
        alpha = tl.exp(m - m_ref)
        p = tl.exp(s - m_ref[:, None])  # [G_PAD, BLOCK_L]
        den = den * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slots[:, None].to(tl.int64) * s_vl + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                    other=0.0)  # [BLOCK_L, D_PAD]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m = m_new
    part = (pid_bh * SPLITS + pid_s).to(tl.int64)
    tl.store(acc_ptr + part * G_PAD * D_PAD + rows[:, None] * D_PAD + cols[None, :], acc)
    tl.store(ml_ptr + part * 2 * G_PAD + rows, m)
    tl.store(ml_ptr + part * 2 * G_PAD + G_PAD + rows, den)


@triton.jit
def _decode_attn_combine_kernel(
    acc_ptr, ml_ptr, out_ptr, G, D, s_ob, s_oh, s_og,
    HKV: tl.constexpr, SPLITS: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    """out[b, h] [G, d] = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s, M the largest m_s (0 where no
    slot was kept at all)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // HKV
    h = pid_bh % HKV
    rows = tl.arange(0, G_PAD)
    cols = tl.arange(0, D_PAD)
    base = (pid_bh * SPLITS).to(tl.int64)
    top = tl.full([G_PAD], float("-inf"), tl.float32)
    for s in range(SPLITS):
        top = tl.maximum(top, tl.load(ml_ptr + (base + s) * 2 * G_PAD + rows))
    top = tl.where(top == float("-inf"), 0.0, top)
    num = tl.zeros([G_PAD, D_PAD], tl.float32)
    den = tl.zeros([G_PAD], tl.float32)
    for s in range(SPLITS):
        w = tl.exp(tl.load(ml_ptr + (base + s) * 2 * G_PAD + rows) - top)  # [G_PAD]; a slice with no kept slot: 0
        den += w * tl.load(ml_ptr + (base + s) * 2 * G_PAD + G_PAD + rows)
        num += w[:, None] * tl.load(acc_ptr + (base + s) * G_PAD * D_PAD + rows[:, None] * D_PAD + cols[None, :])
    out = num / tl.where(den > 0.0, den, 1.0)[:, None]
    tl.store(out_ptr + b.to(tl.int64) * s_ob + h * s_oh + rows[:, None] * s_og + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(rows < G)[:, None] & (cols < D)[None, :])


def split_plan(num_seq_heads: int, cache_len: int, num_sms: int, block_l: int = 64) -> tuple[int, int]:
    """(slices, slots per slice) of a cache: enough slices that B x Hkv x slices fills about two waves of the
    GPU's SMs, each a whole number of `block_l` tiles."""
    tiles = triton.cdiv(cache_len, block_l)
    want = max(1, min(tiles, triton.cdiv(2 * num_sms, max(1, num_seq_heads))))
    chunk = triton.cdiv(tiles, want) * block_l
    return triton.cdiv(cache_len, chunk), chunk


def decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                            scale: float, block_l: int = 64, splits: int | None = None) -> torch.Tensor:
    """Attention of q [B, Hkv, G, d] over k, v [B, Hkv, L, d] (last dim contiguous), slots where `keep` [B, L]
    (bool) is False left out; returns [B, Hkv, G, d] in q's dtype. `splits`: slices of the cache (default:
    `split_plan`)."""
    num_seq, kv_heads, groups, width = q.shape
    cache_len = k.shape[2]
    g_pad = max(16, triton.next_power_of_2(groups))  # tl.dot takes tiles of at least 16 a side
    d_pad = max(16, triton.next_power_of_2(width))
    if splits is None:
        splits, chunk = split_plan(num_seq * kv_heads, cache_len, _device_info(q.device)[1], block_l)
    else:
        chunk = triton.cdiv(triton.cdiv(cache_len, splits), block_l) * block_l
        splits = triton.cdiv(cache_len, chunk)
    parts = num_seq * kv_heads * splits
    acc = torch.empty(parts, g_pad, d_pad, device=q.device, dtype=torch.float32)
    ml = torch.empty(parts, 2, g_pad, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    keep_arg = keep.view(torch.uint8) if keep is not None else ml  # unread without a mask
    _decode_attn_split_kernel[(num_seq * kv_heads, splits)](
        q, k, v, keep_arg, acc, ml, cache_len, groups, width, float(scale),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), keep.stride(0) if keep is not None else 0,
        HKV=kv_heads, SPLITS=splits, CHUNK=chunk, BLOCK_L=block_l, G_PAD=g_pad, D_PAD=d_pad,
        HAS_KEEP=keep is not None, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
    )
    _decode_attn_combine_kernel[(num_seq * kv_heads,)](
        acc, ml, out, groups, width, out.stride(0), out.stride(1), out.stride(2),
        HKV=kv_heads, SPLITS=splits, G_PAD=g_pad, D_PAD=d_pad, num_warps=4,
    )
    return out

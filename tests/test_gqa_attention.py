"""The decode-step attention that reads each KV head once (lte.serving.attention)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import lte
import tiny_models as tm
from lte.serving import StaticDecoder
from lte.serving.attention import (
    FLEX_NAME,
    NAME,
    TRITON_NAME,
    default_kind,
    flex_decode_attention,
    gqa_decode_attention,
    triton_decode_attention,
    use_gqa_decode_attention,
)


class _Attn(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def _reference(q, k, v, mask):
    """transformers' way: every KV head repeated for its query heads, then plain SDPA; [B, T, H, d]."""
    g = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), attn_mask=mask)
    return out.transpose(1, 2)


def test_hand_computed_average_over_the_unmasked_positions():
    # one KV head, two query heads, d = 1, three positions; zero queries weight every visible key alike
    q = torch.zeros(1, 2, 1, 1)
    k = torch.tensor([1.0, -2.0, 5.0]).view(1, 1, 3, 1)
    v = torch.tensor([3.0, 6.0, 100.0]).view(1, 1, 3, 1)
    mask = torch.tensor([True, True, False]).view(1, 1, 1, 3)  # position 2 not written yet
    out, weights = gqa_decode_attention(_Attn(2), q, k, v, mask)
    assert weights is None and out.shape == (1, 1, 2, 1)
    assert torch.allclose(out.flatten(), torch.tensor([4.5, 4.5]))  # (3 + 6) / 2 for both query heads


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 2), (6, 3), (4, 1)])
@pytest.mark.parametrize("mask_heads", [None, 1, "all"])
def test_matches_repeated_heads(heads, kv_heads, mask_heads):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    b, length, d = 3, 11, 8
    q = torch.randn(b, heads, 1, d, generator=g)
    k, v = (torch.randn(b, kv_heads, length, d, generator=g) for _ in range(2))
    mask = None
    if mask_heads is not None:
        mask = torch.rand(b, 1 if mask_heads == 1 else heads, 1, length, generator=g) > 0.3
        mask[..., 0] = True  # every row sees at least one key
    out, _ = gqa_decode_attention(_Attn(heads // kv_heads), q, k, v, mask)
    torch.testing.assert_close(out, _reference(q, k, v, mask))
    # query head i reads KV head i // G: moving KV head 0 changes only the first G heads' outputs
    k2 = k.clone()
    k2[:, 0] += 1.0
    moved = (gqa_decode_attention(_Attn(heads // kv_heads), q, k2, v, mask)[0] - out).abs().amax(dim=(0, 1, 3))
    g_ = heads // kv_heads
    assert torch.all(moved[g_:] == 0) and moved[:g_].max() > 0


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (3, 3)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_flex_variant_matches_repeated_heads(heads, kv_heads, mask_kind):
    """`flex_decode_attention` (flex_attention, its reference without compile here) equals repeated-heads SDPA for
    one query token, with a bool or an additive mask; a per-head mask or several query tokens go to the SDPA path."""
    g = torch.Generator().manual_seed(heads + kv_heads)
    b, length, d = 2, 128, 16  # flex takes caches of a multiple of FLEX_BLOCK slots and heads of >= 16 dims
    q = torch.randn(b, heads, 1, d, generator=g)
    k, v = (torch.randn(b, kv_heads, length, d, generator=g) for _ in range(2))
    keep = torch.rand(b, 1, 1, length + 3, generator=g) > 0.4  # a cache mask may run past the keys
    keep[..., 0] = True
    mask = {None: None, "bool": keep,
            "additive": torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)}[mask_kind]
    out, weights = flex_decode_attention(_Attn(heads // kv_heads), q, k, v, mask)
    assert weights is None
    torch.testing.assert_close(out, _reference(q, k, v, None if mask is None else keep[..., :length]))
    per_head = keep[..., :length].expand(b, heads, 1, length).clone()
    torch.testing.assert_close(flex_decode_attention(_Attn(heads // kv_heads), q, k, v, per_head)[0],
                               gqa_decode_attention(_Attn(heads // kv_heads), q, k, v, per_head)[0])
    short = keep[..., :length - 1]  # 127 slots: not a multiple of FLEX_BLOCK, the SDPA path
    odd = flex_decode_attention(_Attn(heads // kv_heads), q, k[:, :, :-1], v[:, :, :-1], short)[0]
    torch.testing.assert_close(odd, gqa_decode_attention(_Attn(heads // kv_heads), q, k[:, :, :-1], v[:, :, :-1],
                                                         short)[0])


def test_flex_variant_leaves_narrow_heads_to_sdpa(monkeypatch):
    """Heads under FLEX_MIN_HEAD_DIM dims (flex_attention's GPU kernels refuse them) take the SDPA path; 16 do not."""
    import torch.nn.attention.flex_attention as fa

    calls = []
    real = fa.flex_attention
    monkeypatch.setattr(fa, "flex_attention", lambda *a, **k: calls.append(a[0].shape[-1]) or real(*a, **k))
    g = torch.Generator().manual_seed(3)
    for d in (12, 16):
        q = torch.randn(1, 4, 1, d, generator=g)
        k, v = (torch.randn(1, 2, 128, d, generator=g) for _ in range(2))
        out, _ = flex_decode_attention(_Attn(2), q, k, v, None)
        torch.testing.assert_close(out, _reference(q, k, v, None))
    assert calls == [16]


def test_flex_kind_needs_compile_and_switches_the_model():
    model = _llama(4, 2)
    with pytest.raises(lte.LTEError, match="needs compile"):
        StaticDecoder(model, 1, 16, gqa_decode="flex")
    with pytest.raises(lte.LTEError, match="multiple of 128 slots, got cache_len 200: round it up .e.g. 256"):
        StaticDecoder(model, 1, 200, gqa_decode="flex", compile=True)
    with pytest.raises(lte.LTEError, match="heads of at least 16 dims .* this model's have 12: use gqa_decode=True"):
        StaticDecoder(model, 1, 128, gqa_decode="flex", compile=True)
    with pytest.raises(lte.LTEError, match="gqa_decode must be"):
        StaticDecoder(model, 1, 16, gqa_decode="fast")
    assert use_gqa_decode_attention(model, "flex") and model.config._attn_implementation == FLEX_NAME
    assert use_gqa_decode_attention(model) and model.config._attn_implementation == NAME  # and back
    with pytest.raises(ValueError, match="unknown decode attention"):
        use_gqa_decode_attention(model, "fast")


def test_flex_kind_compiles_with_inductor():
    """torch.compile with Inductor (its CPU flex kernel here) takes the flex decode with a padding mask the score
    modification reads, and its logits equal SDPA's over six decode steps. Without `stored_mask` Inductor fails on
    the mask built inside the graph (the CUDA failure of 2026-12-07 has the same cause)."""
    from lte.serving.decode import cache_kwarg, make_static_cache

    model = _llama(4, 2, hidden=64)
    key = cache_kwarg(model)  # `cache` on transformers >= 5.2x, `past_key_values` before
    ids = torch.randint(2, tm.VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    pad = torch.ones(2, 128, dtype=torch.long)
    pad[0, :2] = 0  # left padding: the score modification reads the mask

    def decode(forward):
        cache, logits = make_static_cache(model, 2, 128), []
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=pad[:, :6], cache_position=torch.arange(6), **{key: cache})
            for step in range(6, 12):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = forward(input_ids=nxt, attention_mask=pad, cache_position=torch.tensor([step]), **{key: cache})
                logits.append(out.logits[:, -1])
        return torch.stack(logits)

    expected = decode(model.forward)
    assert use_gqa_decode_attention(model, "flex")
    torch.testing.assert_close(decode(torch.compile(model.forward, dynamic=False)), expected)


@pytest.mark.gpu  # the CUDA kernels Inductor generates for flex_attention (the CPU test above covers its CPU kernel)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_kind_decodes_the_same_tokens_compiled():
    """Compiled and captured, the flex decode attention gives the tokens of transformers' SDPA (fp32, left padding)."""
    ids = torch.randint(2, tm.VOCAB, (2, 6), generator=torch.Generator().manual_seed(4)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    plain = StaticDecoder(_llama(4, 2, hidden=64).cuda(), 2, 128, gqa_decode=False).generate_ids(
        ids, 6, attention_mask=mask)
    model = _llama(4, 2, hidden=64).cuda()  # heads of 16 dims: the narrowest flex_attention's GPU kernels take
    dec = StaticDecoder(model, 2, 128, gqa_decode="flex", compile=True)  # a cache of FLEX_BLOCK slots
    assert dec.gqa_decode and model.config._attn_implementation == FLEX_NAME
    assert torch.equal(dec.generate_ids(ids, 6, attention_mask=mask), plain)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (3, 3)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive", "per_head"])
def test_triton_kind_matches_repeated_heads(heads, kv_heads, mask_kind):
    """`triton_decode_attention` (lte.kernels.decode_attention: its reference on the CPU) equals repeated-heads SDPA
    for every mask form; a mask with a head dimension goes to the SDPA path and still agrees."""
    g = torch.Generator().manual_seed(heads + 7 * kv_heads)
    b, length, d = 2, 13, 8
    q = torch.randn(b, heads, 1, d, generator=g)
    k, v = (torch.randn(b, kv_heads, length, d, generator=g) for _ in range(2))
    keep = torch.rand(b, 1 if mask_kind != "per_head" else heads, 1, length, generator=g) > 0.4
    keep[..., 0] = True
    mask = {None: None, "bool": keep, "per_head": keep,
            "additive": torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)}[mask_kind]
    out, weights = triton_decode_attention(_Attn(heads // kv_heads), q, k, v, mask)
    assert weights is None and out.shape == (b, 1, heads, d)
    torch.testing.assert_close(out, _reference(q, k, v, None if mask is None else keep))


def test_triton_kind_in_the_static_decoder_gives_the_same_tokens():
    ids = torch.randint(2, tm.VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    plain = StaticDecoder(_llama(4, 2), 3, 32, gqa_decode=False).generate_ids(ids, 8, attention_mask=mask)
    model = _llama(4, 2)
    dec = StaticDecoder(model, 3, 32, gqa_decode="triton")
    assert dec.gqa_decode and model.config._attn_implementation == TRITON_NAME
    assert torch.equal(dec.generate_ids(ids, 8, attention_mask=mask), plain)
    with pytest.raises(lte.LTEError, match="'triton'"):
        StaticDecoder(model, 3, 32, gqa_decode="cuda")


def test_triton_kind_named_outright_serves_one_query_head_per_kv_head(monkeypatch):
    """Multi-head attention (4 heads, 4 KV heads): "triton" runs the kernel (G = 1) at every decode step, with the
    same tokens as SDPA; the default (True) leaves such a model on SDPA, and "sdpa" too."""
    from lte import kernels

    ids = torch.randint(2, tm.VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    plain = StaticDecoder(_llama(4, 4), 2, 24, gqa_decode=False).generate_ids(ids, 6, attention_mask=mask)
    model = _llama(4, 4)
    real, groups = kernels.decode_attention, []
    monkeypatch.setattr(kernels, "decode_attention", lambda q, *a: groups.append(q.shape[2]) or real(q, *a))
    dec = StaticDecoder(model, 2, 24, gqa_decode="triton")
    assert dec.gqa_decode and model.config._attn_implementation == TRITON_NAME
    assert torch.equal(dec.generate_ids(ids, 6, attention_mask=mask), plain)
    assert groups == [1] * 5 * 2  # 5 decode steps (6 tokens, 1 from prefill), 2 layers, one query row each
    for flag in (True, "sdpa"):
        other = _llama(4, 4)
        assert StaticDecoder(other, 1, 16, gqa_decode=flag).gqa_decode is False
        assert other.config._attn_implementation == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_triton_kind_decodes_the_same_tokens_on_gpu(compile):
    """Captured (and compiled), the Triton decode attention gives the tokens of transformers' SDPA (fp32, left
    padding, a cache of several slices)."""
    ids = torch.randint(2, tm.VOCAB, (2, 6), generator=torch.Generator().manual_seed(4)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    plain = StaticDecoder(_llama(4, 2, hidden=64).cuda(), 2, 200, gqa_decode=False).generate_ids(
        ids, 6, attention_mask=mask)
    model = _llama(4, 2, hidden=64).cuda()
    dec = StaticDecoder(model, 2, 200, gqa_decode="triton", compile=compile)
    assert dec.gqa_decode and model.config._attn_implementation == TRITON_NAME
    assert torch.equal(dec.generate_ids(ids, 6, attention_mask=mask), plain)


def test_prefill_goes_to_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)  # five query tokens: not the packed path
    k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(2))
    ours, _ = gqa_decode_attention(_Attn(2), q, k, v, None)
    theirs, _ = sdpa_attention_forward(_Attn(2), q, k, v, None)
    assert torch.equal(ours, theirs)


def _llama(heads: int, kv_heads: int, attn: str = "sdpa", hidden: int = 48):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=tm.VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         attn_implementation=attn)
    return tf.LlamaForCausalLM(cfg).eval()


def test_static_decoder_gives_the_same_tokens_and_logits_with_it(monkeypatch):
    ids = torch.randint(2, tm.VOCAB, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: the mask path
    plain = StaticDecoder(_llama(4, 2), 3, 32, gqa_decode=False).generate_ids(ids, 8, attention_mask=mask)
    model = _llama(4, 2)
    dec = StaticDecoder(model, 3, 32, gqa_decode=True)
    assert dec.gqa_decode and model.config._attn_implementation == NAME
    sdpa, packed = torch.nn.functional.scaled_dot_product_attention, []

    def counting(q, k, v, **kwargs):  # packed calls: 2 KV heads on both sides, G = 2 query rows
        packed.append(q.shape[1] == k.shape[1] == 2 and q.shape[2] == 2)
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    assert torch.equal(dec.generate_ids(ids, 8, attention_mask=mask), plain)
    assert sum(packed) == 7 * 2  # every decode step (8 tokens: 1 from prefill), both layers
    monkeypatch.undo()
    # the step's logits, not only the argmax
    ref, ours = StaticDecoder(_llama(4, 2), 3, 32, gqa_decode=False), dec
    for d in (ref, ours):
        d.prefill(ids, mask)
        d.decode(3)
    a = ref._forward(ref.ids, ref.pos, ref.pad_mask, keep_last=False)
    b = ours._forward(ours.ids, ours.pos, ours.pad_mask, keep_last=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_left_alone_where_it_would_not_help():
    assert not use_gqa_decode_attention(_llama(4, 4))  # one query head per KV head
    eager = _llama(4, 2, attn="eager")
    assert not use_gqa_decode_attention(eager) and eager.config._attn_implementation == "eager"
    model = _llama(4, 2)
    assert use_gqa_decode_attention(model) and use_gqa_decode_attention(model)  # idempotent
    on = _llama(4, 2)
    assert StaticDecoder(on, 1, 16).gqa_decode is True and on.config._attn_implementation == NAME  # CPU's default
    assert default_kind("cpu") == "sdpa"


def test_default_kind_is_the_triton_kernel_on_ampere_and_newer(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, kind in (((9, 0), "triton"), ((8, 0), "triton"), ((7, 5), "sdpa"), ((7, 0), "sdpa")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert default_kind(torch.device("cuda", 1)) == kind, capability
        assert default_kind("cpu") == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_kind("cuda") == "sdpa"
    off = _llama(4, 2)
    assert StaticDecoder(off, 1, 16, gqa_decode=False).gqa_decode is False
    assert off.config._attn_implementation == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_the_gpu_it_matches_transformers_sdpa(dtype):
    """On the GPU: the first decode step's logits as transformers' SDPA gives them (left padding too), and in
    fp32 the same tokens from captured, replayed steps."""
    ids = torch.randint(2, tm.VOCAB, (4, 7), generator=torch.Generator().manual_seed(2)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    decoders = [StaticDecoder(_llama(8, 2).to("cuda", dtype), 4, 48, use_graph=True, gqa_decode=flag)
                for flag in (False, True, "sdpa")]  # True on CUDA: the Triton kernel
    assert [d.model.config._attn_implementation for d in decoders] == ["sdpa", TRITON_NAME, NAME]
    logits = []
    for dec in decoders:
        dec.prefill(ids, mask)  # prefill runs transformers' SDPA in all: the same state after it
        logits.append(dec._forward(dec.ids, dec.pos, dec.pad_mask, keep_last=False).float())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for ours in logits[1:]:
        torch.testing.assert_close(ours, logits[0], rtol=tol, atol=tol)
    if dtype == torch.float32:
        tokens = [dec.generate_ids(ids, 8, attention_mask=mask) for dec in decoders]  # captured steps
        assert torch.equal(tokens[1], tokens[0]) and torch.equal(tokens[2], tokens[0])


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"])
def test_every_grouped_query_family_decodes_the_same(family):
    """Other decoder families with 2 KV heads for 4 query heads (Gemma 2 runs eager attention: left alone)."""
    ids = torch.randint(2, tm.VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    plain = StaticDecoder(tm.build(family), 2, 24, gqa_decode=False).generate_ids(ids, 6, attention_mask=mask)
    model = tm.build(family)
    dec = StaticDecoder(model, 2, 24, gqa_decode=True)
    assert dec.gqa_decode == (model.config._attn_implementation == NAME)
    assert torch.equal(dec.generate_ids(ids, 6, attention_mask=mask), plain)


def test_lte_bench_takes_the_flag(tmp_path):
    import argparse
    import json

    from lte.serving.cli import add_serving_commands

    parser = argparse.ArgumentParser()
    add_serving_commands(parser.add_subparsers())
    rows = {}
    flags = {"sdpa": ["--no-gqa-decode"], NAME: [], TRITON_NAME: ["--decode-attention", "triton"]}
    for name, flag in flags.items():  # the default on the CPU: the grouped-query attention through SDPA
        out = tmp_path / f"b{len(rows)}.json"
        args = parser.parse_args(["bench", "--shape", "tiny", "--sparsity", "0.5", "--new-tokens", "2", "--runs", "1",
                                  "--cache-len", "32", "--batch-size", "2", "--json", str(out), *flag])
        assert args.func(args) == 0
        rows[name] = json.loads(out.read_text())
    for name, got in rows.items():
        assert {r["attention"] for r in got} == {name}  # dense and LTE rows alike

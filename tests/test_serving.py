"""lte.serving: SparseMLP / DenseMLP replacement, the static-cache decode loop, generate, bench, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import lte
import tiny_models as tm
from lte.serving import StaticDecoder, bench, generate, prepare_dense, prepare_for_inference
from lte.serving.dense import DenseMLP, dense_modules, swap_modules
from lte.serving.prepare import SparseFFNIn, SparseFFNOut, ffn_weights, sparse_modules
from lte.serving.sparse_mlp import SparseMLP
from lte.serving.synthetic import (
    SHAPES,
    pin_router_channel,
    random_llama,
    set_fixed_sparsity,
    set_random_sparsity,
    set_topk_sparsity,
)

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox",
            "opt"]


def _lte(family: str = "llama", seed: int = 0, router_scale: float = 3.0) -> lte.LTEModel:
    """A tiny converted model in hard routing whose routers switch off some experts (not all, not none)."""
    lmodel = lte.get_lte_model(tm.build(family, seed), lte.LTEConfig(grouping="random", seed=seed), progress=False)
    with torch.no_grad():
        for layer in lmodel.lte_layers():
            layer.router.weight.mul_(router_scale)
    lmodel.generation_config.eos_token_id = None
    return lmodel.set_routing("hard").eval()


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, tm.VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hard_logits(lmodel: lte.LTEModel, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    with torch.no_grad():
        out = lmodel(input_ids=ids).logits
    return out, lmodel.lte_stats()["ffn_sparsity"]


def _hf_greedy(model, ids: torch.Tensor, new: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:]


# --------------------------------------------------------------------------- prepare
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(2, 5), (3, 9)])  # 10 tokens: decode kernels path; 27: masked dense path
def test_sparse_mlp_matches_lte_hard_mode(family, shape):
    lmodel = _lte(family)
    ids = _ids(*shape)
    ref, sparsity = _hard_logits(lmodel, ids)
    assert 0.05 < sparsity < 0.95, "the test needs some experts on and some off"
    model = prepare_for_inference(lmodel)
    mods = sparse_modules(model)
    assert len(mods) == tm.LAYERS
    assert all(w.is_contiguous() for m in model.modules() for w in ffn_weights(m))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_per_layer_thresholds_are_served_per_layer():
    """A model calibrated per layer (`LTEConfig.layer_tau`) is served with each layer's own threshold: the
    served logits match the LTEModel's, and differ from those of one threshold for all."""
    lmodel = _lte("llama")
    ids = _ids(2, 5)
    taus = [0.1, 0.9] + [0.5] * (tm.LAYERS - 2)
    one, _ = _hard_logits(lmodel, ids)  # tau 0.5 everywhere
    lmodel.set_routing("hard", layer_tau=taus)
    ref, _ = _hard_logits(lmodel, ids)
    assert [layer.tau for layer in lmodel.lte_layers()] == taus and not torch.allclose(one, ref)
    model = prepare_for_inference(lmodel)  # swaps the FFNs in place
    assert [m.tau for m in sparse_modules(model)] == taus
    with torch.no_grad():
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_sparse_mlp_decode_and_prefill_paths_agree():
    model = prepare_for_inference(_lte())
    x = torch.randn(3, 4, tm.D)
    mlp = sparse_modules(model)[0]
    with torch.no_grad():
        fast = mlp(x)  # 12 tokens: router_mask + sparse_ffn
        mlp.use_kernels = False
        dense = mlp(x)  # masked dense
    torch.testing.assert_close(fast, dense, atol=1e-5, rtol=1e-4)


def test_sparse_mlp_stacks_gate_up_and_router_rows():
    """A gated FFN without an up bias keeps W_gate, W_up and W_router as rows of one parameter `w_in`: the views
    the kernels read share its storage and are contiguous, a change to the router's rows is a change to `w_in`,
    and the views follow a dtype change; a plain FFN (GPT-2) and fp8 weights keep three matrices. The LTEModel's
    own FFN parameters are emptied, so the copies are not held twice."""
    lmodel = _lte("llama")
    mlp = sparse_modules(prepare_for_inference(lmodel))[0]
    spent = lmodel.lte_layers()[0]  # its parameters are emptied: the served FFN holds its own copies
    assert spent.router.weight.numel() == 0 and all(p.numel() == 0 for p in spent.container.parameters())
    f, e = mlp.ffn_width, mlp.num_experts
    assert mlp.w_in.shape == (2 * f + e, tm.D) and "w_in" in dict(mlp.named_parameters())
    assert mlp.w_router.shape == (e, tm.D)
    assert not {"_w_gate", "_w_up", "_w_router"} & set(dict(mlp.named_parameters()))
    starts = [mlp.w_in[i].data_ptr() for i in (0, f, 2 * f)]
    assert [w.data_ptr() for w in (mlp.w_gate, mlp.w_up, mlp.w_router)] == starts
    assert all(w.is_contiguous() for w in (mlp.w_gate, mlp.w_up, mlp.w_router))
    with torch.no_grad():
        mlp.w_router.zero_()
    assert not mlp.w_in[2 * f:].any() and mlp.w_in[:2 * f].any()
    mlp.to(torch.float64)
    assert mlp.w_gate.dtype == mlp.w_router.dtype == torch.float64 and mlp.w_up.data_ptr() == mlp.w_in[f].data_ptr()
    plain = sparse_modules(prepare_for_inference(_lte("gpt2")))[0]
    assert plain.w_in is None and plain.w_gate is None and plain.w_up.shape == (plain.ffn_width, tm.D)
    fp8 = sparse_modules(prepare_for_inference(_lte("llama"), weights="fp8"))[0]
    assert fp8.w_in is None and fp8.w_gate.dtype == torch.float8_e4m3fn


def test_budget_caps_the_decode_union_and_leaves_prefill_alone():
    lmodel = _lte("llama", router_scale=1.0)
    model = prepare_for_inference(lmodel, budget=1)
    mlp = sparse_modules(model)[0]
    assert mlp.budget == 1
    x = torch.randn(5, tm.D)
    mlp.record_mask = True
    with torch.no_grad():
        y = mlp(x)  # 5 tokens: the decode path
        decode_mask = mlp.last_mask
        assert int(decode_mask.any(0).sum()) <= 1
        torch.testing.assert_close(y, mlp.masked_dense(x, decode_mask), atol=1e-5, rtol=1e-4)
        mlp.decode_max_tokens = 4
        mlp(x)  # 5 tokens > 4: the prefill path ignores the budget
    assert torch.equal(mlp.last_mask, mlp.dense_mask(x))
    with pytest.raises(lte.LTEError, match="budget"):
        mlp.budget = -2


def test_prepare_dense_matches_plain_model():
    plain = tm.build("llama")
    ids = _ids(2, 6)
    with torch.no_grad():
        ref = plain(input_ids=ids).logits
        model = prepare_dense(plain)
        out = model(input_ids=ids).logits
    assert sum(isinstance(m, DenseMLP) for m in model.modules()) == tm.LAYERS
    torch.testing.assert_close(out, ref)


def test_prepare_dense_of_lte_model_is_the_dense_function():
    lmodel = _lte()
    ids = _ids(2, 6)
    lmodel.set_routing("dense")
    with torch.no_grad():
        ref = lmodel(input_ids=ids).logits
        out = prepare_dense(lmodel)(input_ids=ids).logits
    torch.testing.assert_close(out, ref)


def test_swap_modules_round_trip():
    lmodel = _lte()
    dense = dense_modules(lmodel)
    model = prepare_for_inference(lmodel)
    sparse = swap_modules(model, dense)
    assert all(isinstance(m, SparseMLP) for m in sparse.values())
    assert not sparse_modules(model)
    swap_modules(model, sparse)
    assert len(sparse_modules(model)) == tm.LAYERS


@pytest.mark.parametrize("family", ["gemma2", "phi3", "gpt2", "gpt_neox"])
def test_prepare_dense_matches_plain_model_other_families(family):
    plain = tm.build(family)
    ids = _ids(2, 6)
    with torch.no_grad():
        ref = plain(input_ids=ids).logits
        out = prepare_dense(plain)(input_ids=ids).logits
    assert sum(isinstance(m, DenseMLP) for m in plain.modules()) == tm.LAYERS
    torch.testing.assert_close(out, ref)


def test_opt_split_ffn_round_trip_and_dense_swap():
    lmodel = _lte("opt")
    ids = _ids(2, 4)
    ref, _ = _hard_logits(lmodel, ids)
    dense = dense_modules(lmodel)  # the original fc1 / fc2 of every layer
    model = prepare_for_inference(lmodel)
    assert sum(isinstance(m, SparseFFNIn) for m in model.modules()) == tm.LAYERS
    assert sum(isinstance(m, SparseFFNOut) for m in model.modules()) == tm.LAYERS
    sparse = swap_modules(model, dense)
    lmodel.set_routing("dense")
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    swap_modules(model, sparse)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(plain, ref)  # dense differs from the sparse function
    for m in sparse_modules(model):  # the prefill path: router mask, then every neuron through cuBLAS
        m.use_kernels = False
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(lte.LTEError, match="twice"):
        prepare_for_inference(lmodel)
    mods = sparse_modules(model)
    with pytest.raises(lte.LTEError, match="did not run"):
        model.get_submodule("model.decoder.layers.0.fc2")(torch.randn(3, tm.F))
    assert mods[0].num_experts == 4


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gated SwiGLU; plain GELU with biases (Conv1D)
def test_fp8_weights_serve_the_dequantized_model(family):
    """weights='fp8': each FFN is the hard-routed FFN of its row-dequantized weights, on the decode
    path (12 tokens) and the prefill path (27), and the whole model stays close to the native one."""
    from lte.kernels import dequantize_rows

    ids_decode, ids_prefill = _ids(2, 6), _ids(3, 9)
    native = prepare_for_inference(_lte(family))
    with torch.no_grad():
        ref = [native(input_ids=ids).logits for ids in (ids_decode, ids_prefill)]
    model = prepare_for_inference(_lte(family), weights="fp8")
    mlp = sparse_modules(model)[0]
    assert mlp.fp8 and mlp.w_up.dtype == torch.float8_e4m3fn and mlp.s_up.dtype == torch.float32
    assert "weights=fp8" in repr(mlp)
    x = torch.randn(3, 4, tm.D)
    deq = SparseMLP(None if mlp.w_gate is None else dequantize_rows(mlp.w_gate, mlp.s_gate), dequantize_rows(
        mlp.w_up, mlp.s_up), dequantize_rows(mlp.w_down_t, mlp.s_down), mlp.w_router, mlp.tau, mlp.expert_size,
        mlp.activation, b_up=mlp.b_up, b_down=mlp.b_down)
    with torch.no_grad():
        want = deq(x)
        torch.testing.assert_close(mlp(x), want, atol=1e-5, rtol=1e-4)  # decode path: the fp8 op
        mlp.decode_max_tokens = 4
        torch.testing.assert_close(mlp(x), want, atol=1e-5, rtol=1e-4)  # prefill: dequantized masked dense
        mlp.decode_max_tokens = 64
        for ids, r in zip((ids_decode, ids_prefill), ref):
            out = model(input_ids=ids).logits
            assert 0 < float((out - r).norm() / r.norm()) < 0.05  # e4m3 rounding: small, not zero
    with pytest.raises(lte.LTEError, match="sparse path only"):
        mlp.ffn_path = "dense"


def test_fp8_weights_errors():
    from lte.serving.cli import _prepared

    with pytest.raises(lte.LTEError, match="weights must be one of"):
        prepare_for_inference(_lte(), weights="int4")
    with pytest.raises(lte.LTEError, match="--weights fp8 applies to the LTE FFNs"):
        _prepared(_lte(), True, dense=True, weights="fp8")
    with pytest.raises(lte.LTEError, match="not for 'opt'"):
        prepare_for_inference(_lte("opt"), weights="fp8")


def test_batch_budget_keep_by_hand():
    """Two sequences at one position, tau 0.5: masks {0, 1, 3} and {1, 2}; summed scores 1.2, 1.4, 0.75, 0.8;
    a budget of 2 keeps experts 1 and 0 for both."""
    from lte.routing.layers import batch_budget_keep

    scores = torch.tensor([[[0.9, 0.6, 0.2, 0.7]], [[0.3, 0.8, 0.55, 0.1]]])  # [B=2, T=1, E=4]
    keep = batch_budget_keep(scores, scores > 0.5, 2)
    assert keep[0, 0].tolist() == [True, True, False, False] == keep[1, 0].tolist()
    gated = (scores > 0.5) & keep
    assert gated[0, 0].tolist() == [True, True, False, False] and gated[1, 0].tolist() == [False, True, False, False]
    ties = torch.tensor([[0.6, 0.6, 0.6]])  # [T=1, E=3] one group; equal sums: the lower index wins
    assert batch_budget_keep(ties, ties > 0.5, 2).tolist() == [[True, True, False]]


@pytest.mark.parametrize("routing", ["hard", "topk"])
@pytest.mark.parametrize("batch", [1, 3])
def test_budgeted_lte_model_decodes_like_the_served_budget(batch, routing):
    """LTEModel in hard (or top-k) routing with a per-batch budget (per position over the batch's sequences)
    gives the tokens the served model with the same budget decodes (the budget applies per decode step there)."""
    lmodel = _lte("llama", router_scale=1.0)
    num_exp = lmodel.lte_layers()[0].input.num_experts
    fraction = 0.4
    k = max(1, round(fraction * num_exp))
    top = {"k": max(1, num_exp // 2)} if routing == "topk" else {}  # top-k: each token's half of the experts
    lmodel.set_routing(routing, budget=fraction, **top)
    ids = _ids(batch, 1)  # a one-token prompt: the served prefill is a decode-sized step, with the budget
    ref = _hf_greedy(lmodel, ids, 6)
    with torch.no_grad():
        lmodel(input_ids=ids)
    assert all(int((layer.input.gate != 0).any(0).sum(-1).max()) <= k for layer in lmodel.lte_layers())
    if batch > 1:  # the budget binds here: without it the union is larger, and the logits differ
        seqs = _ids(batch, 5)
        with torch.no_grad():
            budgeted = lmodel(input_ids=seqs).logits
            lmodel.set_routing(routing, **top)
            free = lmodel(input_ids=seqs).logits
        assert max(int((layer.input.gate != 0).any(0).sum(-1).max()) for layer in lmodel.lte_layers()) > k
        assert not torch.allclose(budgeted, free)
    lmodel.set_routing(routing, **top)
    served_model = prepare_for_inference(lmodel, budget=k)
    assert all(m.topk == top.get("k", 0) and m.budget == k for m in sparse_modules(served_model))
    served = StaticDecoder(served_model, batch, cache_len=16).generate_ids(ids, 6)
    torch.testing.assert_close(served, ref)
    with pytest.raises(lte.LTEError, match="budget is a fraction"):
        lmodel.set_routing("soft", budget=0.5)


def test_prepare_errors():
    with pytest.raises(lte.LTEError, match="prepare_dense"):
        prepare_for_inference(tm.build("llama"))
    with pytest.raises(lte.LTEError, match="serves llama"):
        prepare_dense(tm.build("bert"))
    lmodel = _lte()
    prepare_for_inference(lmodel)
    with pytest.raises(lte.LTEError, match="twice"):
        prepare_for_inference(lmodel)


# --------------------------------------------------------------------------- decode loop
@pytest.mark.parametrize("batch", [1, 3])
def test_static_decode_matches_hf_generate_dense(batch):
    plain = tm.build("llama")
    plain.generation_config.eos_token_id = None
    ids = _ids(batch, 6, seed=batch)
    ref = _hf_greedy(plain, ids, 7)
    model = prepare_dense(plain)
    out = StaticDecoder(model, batch, cache_len=20).generate_ids(ids, 7)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "opt"])
def test_static_decode_matches_hf_generate_lte(family):
    lmodel = _lte(family)
    ids = _ids(2, 9)
    ref = _hf_greedy(lmodel, ids, 8)  # the LTEModel's masked dense path, hard routing
    model = prepare_for_inference(lmodel)
    dec = StaticDecoder(model, 2, cache_len=24)
    torch.testing.assert_close(dec.generate_ids(ids, 8), ref)
    torch.testing.assert_close(dec.generate_ids(ids, 8), ref)  # the decoder is reusable


def test_static_decoder_compile_modes():
    """`compile` takes True/False or a mode of COMPILE_MODES (recorded as the mode's name); anything else,
    including Inductor's own CUDA-graph modes that would fight the decoder's graph, is refused with the list."""
    model = prepare_dense(tm.build("llama"))
    assert StaticDecoder(model, 1, cache_len=8).compiled is False
    assert StaticDecoder(model, 1, cache_len=8, compile=True).compiled == "default"
    assert StaticDecoder(model, 1, cache_len=8, compile="max-autotune-no-cudagraphs").compiled == \
        "max-autotune-no-cudagraphs"
    with pytest.raises(lte.LTEError, match="max-autotune-no-cudagraphs"):
        StaticDecoder(model, 1, cache_len=8, compile="reduce-overhead")


def test_static_decode_left_padding_matches_single_prompts():
    model = prepare_dense(tm.build("llama"))
    long, short = _ids(1, 7, seed=1), _ids(1, 4, seed=2)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    batch = StaticDecoder(model, 2, cache_len=20).generate_ids(ids, 6, attention_mask=mask)
    for row, prompt in enumerate((long, short)):
        single = StaticDecoder(model, 1, cache_len=20).generate_ids(prompt, 6)
        torch.testing.assert_close(batch[row:row + 1], single)


def test_sampling_is_seeded_and_in_vocab():
    model = prepare_dense(tm.build("llama"))
    ids = _ids(2, 5)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(StaticDecoder(model, 2, 16, temperature=1.0).generate_ids(ids, 6))
    torch.testing.assert_close(runs[0], runs[1])
    assert int(runs[0].min()) >= 0 and int(runs[0].max()) < tm.VOCAB


def test_decoder_errors():
    model = prepare_dense(tm.build("llama"))
    dec = StaticDecoder(model, 2, cache_len=10)
    with pytest.raises(lte.LTEError, match="batch size"):
        dec.prefill(_ids(3, 4))
    with pytest.raises(lte.LTEError, match="cache"):
        dec.prefill(_ids(2, 10))
    with pytest.raises(lte.LTEError, match="prefill"):
        dec.decode(1)
    dec.prefill(_ids(2, 4))
    with pytest.raises(lte.LTEError, match="exceed"):
        dec.decode(8)
    with pytest.raises(lte.LTEError, match="prepare_for_inference"):
        bench(_lte())


# --------------------------------------------------------------------------- generate / bench / CLI
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, tm.VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def test_generate_text_single_and_batch():
    tok = _tokenizer()
    model = prepare_for_inference(_lte())
    one = generate(model, tok, "w5 w7 w9", max_new_tokens=5)
    many = generate(model, tok, ["w5 w7 w9", "w3 w4"], max_new_tokens=5)
    assert isinstance(one, str) and one == many[0]
    assert all(w.startswith("w") for w in one.split())
    with pytest.raises(lte.LTEError, match="prepare_for_inference"):
        generate(_lte(), tok, "w5", max_new_tokens=2)


def test_bench_reports_active_fraction_of_fixed_masks():
    lmodel = _lte()
    model = prepare_for_inference(lmodel)
    res = bench(model, batch_size=2, prompt_len=3, new_tokens=3, cache_len=10, runs=1)
    assert 0.0 < res["ffn_active_fraction"] < 1.0
    assert res["ms_per_step"] > 0 and res["weight_bytes_per_step"] < sum(
        p.numel() * p.element_size() for p in model.parameters())


def test_synthetic_masks_fixed_random_and_topk():
    hf = random_llama("tiny", seed=1)
    pin_router_channel(hf)
    model = prepare_for_inference(lte.get_lte_model(hf, lte.LTEConfig(grouping="contiguous"), progress=False))
    set_fixed_sparsity(model, 0.5)
    mods = sparse_modules(model)
    for m in mods:
        m.record_mask = True
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (3, 5)))
    for m in mods:
        per_token = m.last_mask.reshape(-1, m.num_experts)
        assert (per_token == per_token[0]).all(), "every token must use the same experts"
        assert int(per_token[0].sum()) == m.num_experts - round(0.5 * m.num_experts)
    set_random_sparsity(model, 0.5)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (4, 8)))
    frac_off = 1 - torch.cat([m.last_mask.reshape(-1).float() for m in mods]).mean()
    assert 0.3 < float(frac_off) < 0.7
    set_topk_sparsity(model, 0.7)  # every token keeps exactly E - round(0.7 E) experts, not the same ones
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (4, 8)))
    for m in mods:
        per_token = m.last_mask.reshape(-1, m.num_experts)
        assert per_token.sum(-1).tolist() == [m.num_experts - round(0.7 * m.num_experts)] * per_token.shape[0]
        assert not (per_token == per_token[0]).all()
    set_topk_sparsity(model, None)
    assert {m.topk for m in mods} == {0}


def test_cli_bench_shape(tmp_path, capsys):
    from lte.serving.cli import add_serving_commands

    parser = argparse.ArgumentParser()
    add_serving_commands(parser.add_subparsers())
    out = tmp_path / "b.json"
    args = parser.parse_args(["bench", "--shape", "tiny", "--sparsity", "0.7", "--new-tokens", "2", "--runs", "1",
                              "--cache-len", "32", "--batch-size", "2", "--json", str(out)])
    assert args.func(args) == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["dense", "lte"]
    assert rows[1]["ffn_active_fraction"] < 0.5
    assert '"variant": "lte"' in capsys.readouterr().out


def test_cli_bench_fp8_weights_read_fewer_bytes(tmp_path):
    """`lte bench --weights fp8`: the same masks, and the LTE step reads the FFN slabs at one byte a weight."""
    from lte.serving.cli import add_serving_commands

    parser = argparse.ArgumentParser()
    add_serving_commands(parser.add_subparsers())
    rows = {}
    for weights in ("native", "fp8"):
        out = tmp_path / f"{weights}.json"
        args = parser.parse_args(["bench", "--shape", "tiny", "--sparsity", "0.5", "--new-tokens", "2", "--runs", "1",
                                  "--cache-len", "32", "--dtype", "bfloat16", "--weights", weights, "--json", str(out)])
        assert args.func(args) == 0
        rows[weights] = json.loads(out.read_text())
    native, fp8 = rows["native"][1], rows["fp8"][1]
    active = native["ffn_active_fraction"]
    assert fp8["ffn_active_fraction"] == active and 0.3 < active < 0.7
    assert rows["fp8"][0]["weight_bytes_per_step"] == rows["native"][0]["weight_bytes_per_step"]  # dense: bf16
    tiny = SHAPES["tiny"]
    d, f, layers = tiny["hidden_size"], tiny["intermediate_size"], tiny["num_hidden_layers"]
    saved = layers * 3 * f * (d * (2 - 1) - 4)  # per layer and matrix: one byte less a weight, 4 bytes of scale a row
    assert native["weight_bytes_per_step"] - fp8["weight_bytes_per_step"] == pytest.approx(active * saved)


def test_cli_generate_saved_lte_model(tmp_path, capsys):
    from lte.serving.cli import add_serving_commands

    lmodel = _lte()
    lmodel.save_pretrained(tmp_path / "m")
    _tokenizer().save_pretrained(tmp_path / "m")
    parser = argparse.ArgumentParser()
    add_serving_commands(parser.add_subparsers())
    for extra in ([], ["--dense"]):
        args = parser.parse_args(["generate", "--model", str(tmp_path / "m"), "--prompt", "w4 w6",
                                  "--max-new-tokens", "4", "--device", "cpu", *extra])
        assert args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("w4 w6") for line in lines)


# --------------------------------------------------------------------------- GPU: CUDA graphs
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_graph_decode_matches_eager(batch):
    lmodel = _lte()
    lmodel.base_model.to("cuda")
    model = prepare_for_inference(lmodel)
    ids = _ids(batch, 6).cuda()
    eager = StaticDecoder(model, batch, 32, use_graph=False).generate_ids(ids, 10)
    graph = StaticDecoder(model, batch, 32, use_graph=True).generate_ids(ids, 10)
    torch.testing.assert_close(graph, eager)
    ref = _hf_greedy(lmodel.base_model, ids, 10)  # prepared model under plain HF generate
    torch.testing.assert_close(graph, ref)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_decode_with_fp8_weights(batch):
    """fp8 FFN weights under the CUDA-graph decode loop: the same tokens as eager decoding, and each FFN
    (the fp8 kernels) equal to the masked dense path on its dequantized weights."""
    lmodel = _lte()
    lmodel.base_model.to("cuda", torch.bfloat16)
    model = prepare_for_inference(lmodel, weights="fp8")
    ids = _ids(batch, 6).cuda()
    eager = StaticDecoder(model, batch, 32, use_graph=False).generate_ids(ids, 10)
    graph = StaticDecoder(model, batch, 32, use_graph=True).generate_ids(ids, 10)
    torch.testing.assert_close(graph, eager)
    mlp = sparse_modules(model)[0]
    x = torch.randn(batch, tm.D, device="cuda", dtype=torch.bfloat16)
    mlp.record_mask = True
    with torch.no_grad():
        y = mlp(x)
        want = mlp.masked_dense(x.float(), mlp.last_mask)  # fp32 on the dequantized weights
    assert float((y.float() - want).norm() / want.norm()) < 1.5e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_graph_decode_in_topk_routing(batch):
    """A model in top-k routing (a top-k stage 2) served: the CUDA-graph loop gives eager decoding's tokens and
    plain HF generate's on the LTEModel, with every token keeping exactly k experts per FFN."""
    lmodel = _lte()
    lmodel.set_routing("topk", k=[2] * len(lmodel.lte_layers()))
    lmodel.base_model.to("cuda")
    ids = _ids(batch, 6).cuda()
    ref = _hf_greedy(lmodel.base_model, ids, 10)  # the LTEModel's own top-k routing
    model = prepare_for_inference(lmodel)
    assert {m.topk for m in sparse_modules(model)} == {2}
    eager = StaticDecoder(model, batch, 32, use_graph=False).generate_ids(ids, 10)
    graph = StaticDecoder(model, batch, 32, use_graph=True).generate_ids(ids, 10)
    torch.testing.assert_close(graph, eager)
    torch.testing.assert_close(graph, ref)
    mlp = sparse_modules(model)[0]
    mlp.record_mask = True
    with torch.no_grad():
        mlp(torch.randn(batch, tm.D, device="cuda"))
    assert mlp.last_mask.sum(-1).tolist() == [2] * batch


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_match_masked_dense_on_gpu_every_family(family):
    lmodel = _lte(family)
    lmodel.base_model.to("cuda", torch.bfloat16)
    model = prepare_for_inference(lmodel)
    ids = _ids(3, 1).cuda()  # one decode-shaped step of 3 tokens
    mods = sparse_modules(model)
    outs = []
    with torch.no_grad():
        for use in (True, False):
            for m in mods:
                m.use_kernels = use
            outs.append(model(input_ids=ids).logits.float())
    assert (outs[0] - outs[1]).abs().max() <= 0.05 * outs[1].abs().max() + 1e-3


@pytest.mark.gpu
@gpu
def test_cuda_graph_bf16_kernels_match_masked_dense():
    lmodel = _lte()
    lmodel.base_model.to("cuda", torch.bfloat16)
    model = prepare_for_inference(lmodel)
    ids = _ids(2, 5).cuda()
    fast = StaticDecoder(model, 2, 24, use_graph=True).generate_ids(ids, 8)
    for m in sparse_modules(model):
        m.use_kernels = False
    slow = StaticDecoder(model, 2, 24, use_graph=True).generate_ids(ids, 8)
    assert (fast == slow).float().mean() > 0.8  # bf16: rare near-ties may flip
    res = bench(model, batch_size=2, prompt_len=4, new_tokens=8, cache_len=24, runs=2)
    assert res["cuda_graph"] and res["peak_memory_gb"] > 0


def test_decode_profile_sums_kernels_by_kind_per_step(monkeypatch):
    """benchmarks/decode_profile.py's kernel table: names sorted into kinds (cuBLAS, LTE FFN, LTE router, Inductor's
    fused kernels, attention), summed and divided by the steps traced; hand-computed over 2 steps."""
    import runpy

    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))  # its `bench_util` import
    mod = runpy.run_path(str(Path(__file__).parent.parent / "benchmarks/decode_profile.py"))
    kind_of, kernel_table = mod["kind_of"], mod["kernel_table"]
    assert kind_of("void gemv2T_kernel_val<int, int, __nv_bfloat16>") == "cublas gemm/gemv"
    assert kind_of("nvjet_hsh_64x8_64x16_2x1_v_bz_TNT") == "cublas gemm/gemv"
    assert kind_of("_ffn_in_kernel") == "lte ffn" and kind_of("_ffn_out_kernel") == "lte ffn"
    assert kind_of("_router_kernel") == "lte router/mask"
    assert kind_of("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "inductor fused"
    assert kind_of("flash_fwd_splitkv_kernel") == "attention"
    assert kind_of("triton_tem_fused_flex_decoding_0") == "attention"  # flex_attention's decoding template
    assert kind_of("something_else") == "other"
    events = [("_ffn_in_kernel", 30.0), ("_ffn_out_kernel", 20.0), ("_router_kernel", 4.0),
              ("_ffn_in_kernel", 34.0), ("_ffn_out_kernel", 22.0), ("_router_kernel", 6.0),
              ("triton_poi_fused_add_0", 2.0), ("triton_poi_fused_add_0", 2.0)]
    table = kernel_table(events, steps=2)
    assert table["kinds"]["lte ffn"] == {"us_per_step": 53.0, "kernels_per_step": 2.0}  # (30+20+34+22) / 2
    assert table["kinds"]["lte router/mask"] == {"us_per_step": 5.0, "kernels_per_step": 1.0}
    assert table["kinds"]["inductor fused"] == {"us_per_step": 2.0, "kernels_per_step": 1.0}
    assert list(table["kinds"]) == ["lte ffn", "lte router/mask", "inductor fused"]  # longest first
    assert table["kernel_us_per_step"] == 60.0 and table["kernels_per_step"] == 4.0
    assert table["top"][0] == {"name": "_ffn_in_kernel", "us_per_step": 32.0, "per_step": 1.0}


def test_bench_sdpa_backend_switches_one_on(monkeypatch):
    """`--sdpa NAME` of the decode benchmarks leaves exactly that attention backend enabled ("auto": untouched)."""
    import runpy

    switches = ("cudnn", "flash", "mem_efficient", "math")
    before = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in switches}
    mod = runpy.run_path(str(Path(__file__).parent.parent / "benchmarks/bench_util.py"))
    try:
        mod["use_sdpa_backend"]("auto")
        assert {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in switches} == before
        mod["use_sdpa_backend"]("efficient")
        on = {name for name in switches if getattr(torch.backends.cuda, f"{name}_sdp_enabled")()}
        assert on == {"mem_efficient"}
        mod["use_sdpa_backend"]("math")
        assert {name for name in switches if getattr(torch.backends.cuda, f"{name}_sdp_enabled")()} == {"math"}
    finally:
        for name, state in before.items():
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(state)

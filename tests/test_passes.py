"""Calibration passes (`lte.passes`): batches split by a token budget, forwards stopped after the last
FFN, and the calibration steps built on them giving what one whole forward gives."""

from __future__ import annotations

import pytest
import torch

import lte
from lte import passes
from lte.conversion.activations import activation_profiles
from lte.conversion.locate import find_ffns
from lte.routing.fit import calibrate_tau, fit_routers
from tiny_models import batch, build, logits


def _rows(piece):
    return piece["input_ids"][:, 0].tolist()


def test_pieces_split_rows_by_the_token_budget():
    ids = torch.arange(15).reshape(5, 3)  # row r starts with 3r
    whole = {"input_ids": ids, "attention_mask": torch.ones(5, 3), "scale": torch.tensor(2.0)}
    got = list(passes.pieces(whole, max_tokens=7))  # 7 // 3 = 2 rows a piece
    assert [_rows(p) for p in got] == [[0, 3], [6, 9], [12]]
    assert all(p["attention_mask"].shape[0] == p["input_ids"].shape[0] for p in got)
    assert all(p["scale"] is whole["scale"] for p in got)  # not a per-row tensor: passed whole
    assert [_rows(p) for p in passes.pieces(whole, max_tokens=2)] == [[0], [3], [6], [9], [12]]  # >= 1 row
    assert next(passes.pieces(whole, max_tokens=15)) is whole  # fits: the batch as it is
    assert len(list(passes.pieces(whole))) == 1  # default budget: CALIBRATION_TOKENS


def test_forward_until_stops_after_every_watched_module_ran():
    model = build("llama")
    inputs = batch()
    want = logits(model, inputs)
    ran = []
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_hook(lambda *a, i=i: ran.append(f"mlp{i}"))
    model.model.norm.register_forward_hook(lambda *a: ran.append("norm"))
    model.lm_head.register_forward_hook(lambda *a: ran.append("head"))
    passes.forward_until(model, [layers[-1].mlp, layers[0].mlp], inputs)  # any order: stops after both ran
    assert ran == [f"mlp{i}" for i in range(len(layers))]
    ran.clear()
    passes.forward_until(model, [layers[0].mlp], inputs)
    assert ran == ["mlp0"]
    assert all(len(layer.mlp._forward_hooks) == 1 for layer in layers)  # only the test's own hook is left
    ran.clear()
    assert torch.equal(logits(model, inputs), want) and ran[-1] == "head"  # a plain forward is untouched


def test_calibration_passes_never_run_the_head():
    base = build("llama")
    heads = []
    base.get_output_embeddings().register_forward_hook(lambda *a: heads.append(1))
    data = batch(seed=1, batch_size=4)
    model = lte.get_lte_model(base, lte.LTEConfig(grouping="activation", grouping_iters=2), calibration=data,
                              progress=False)
    fit_routers(model, data, sparsity=0.5)
    calibrate_tau(model, [data], 0.5, tol=0.05)
    assert heads == []
    logits(model, data)
    assert heads == [1]


def test_activation_profiles_in_pieces_equal_one_forward(monkeypatch):
    model = build("llama")
    ffns = find_ffns(model)
    data = batch(seed=2, batch_size=4, length=7)  # row 0 padded: each piece keeps its own real tokens
    whole = activation_profiles(model, ffns, data, sketch_dim=16)
    monkeypatch.setattr(passes, "CALIBRATION_TOKENS", 7)  # one row a piece; the sketch's random
    split = activation_profiles(model, ffns, data, sketch_dim=16)  # vectors are drawn in the same order
    for a, b in zip(whole, split):
        assert torch.allclose(a, b, atol=1e-5)


def test_router_fit_in_pieces_equals_one_forward_on_repeated_rows(monkeypatch):
    """Each piece has its own spread s; on a batch of one row twice, each piece's s is the whole batch's
    (the median of a doubled list is the list's) and the two pieces' normal equations add up to the
    whole batch's, so the fitted routers agree."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=320, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = lte.get_lte_model(tf.LlamaForCausalLM(cfg).eval(), lte.LTEConfig(expert_size=32))
    row = torch.randint(2, 101, (1, 12), generator=torch.Generator().manual_seed(4))
    data = {"input_ids": row.repeat(2, 1), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    fit_routers(model, data, sparsity=0.5)
    whole = [layer.router.weight.clone() for layer in model.lte_layers()]
    monkeypatch.setattr(passes, "CALIBRATION_TOKENS", 12)
    assert len(list(passes.pieces(data))) == 2
    fit_routers(model, data, sparsity=0.5)
    for a, layer in zip(whole, model.lte_layers()):
        assert torch.allclose(layer.router.weight, a, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(whole[0], torch.zeros_like(whole[0]))


@pytest.mark.parametrize("threshold", ["token", "global"])
def test_router_fit_in_pieces_stays_near_the_target(monkeypatch, threshold):
    monkeypatch.setattr(passes, "CALIBRATION_TOKENS", 14)  # two rows a piece, three pieces
    model = lte.get_lte_model(build("llama"), lte.LTEConfig(expert_size=8))
    data = batch(seed=5, batch_size=6, length=7)
    achieved = fit_routers(model, data, sparsity=0.5, threshold=threshold)
    assert sum(achieved) / len(achieved) == pytest.approx(0.5, abs=0.2)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "bert"])
def test_block_calls_replay_the_forward_block_by_block(family):
    """One recorded forward, then every block run again from the first block's stored input: each block's input
    is the one the model's own whole forward gives it, and the recording forward never ran the last block."""
    model = build(family).eval()
    inputs = batch(seed=5, batch_size=3, length=9, pad_last=2)
    blocks = passes.repeated_blocks(model, [ffn.down for ffn in find_ffns(model)])
    assert blocks is not None and len(blocks) >= 2
    want: list[torch.Tensor] = []  # each block's input in a whole forward
    handles = [b.register_forward_pre_hook(lambda m, a, kw: want.append(a[0] if a else kw["hidden_states"]),
                                           with_kwargs=True) for b in blocks]
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    ran = []
    blocks[-1].register_forward_hook(lambda *a: ran.append(1))
    hidden, calls = passes.block_calls(model, blocks, inputs)
    assert ran == [] and len(calls) == len(blocks) == len(want)
    torch.testing.assert_close(hidden, want[0])
    with torch.no_grad():
        for i, (block, call) in enumerate(zip(blocks[:-1], calls)):
            hidden = call.run(block, hidden)
            torch.testing.assert_close(hidden, want[i + 1], rtol=1e-5, atol=1e-5)

"""Baselines (TEAL, CATS, MoEfication, Deja Vu, random top-k) on tiny random models of several families."""

from __future__ import annotations

import copy

import pytest
import torch

import lte
from lte.baselines import BaselineModel, apply_baseline, set_sparsity
from lte.baselines.methods import expected_topk_sparsity
from tiny_models import F, batch, build, logits

FAMILIES = ["llama", "phi3", "gpt2", "bert"]  # gated, fused gated, plain Conv1D, plain encoder


def calib(n: int = 4, seed: int = 0) -> list[dict]:
    return [batch(seed=seed + i, batch_size=4, length=16, pad_last=3) for i in range(n)]


def measured(model, batches) -> dict:
    model.reset_lte_stats()
    with torch.no_grad():
        for b in batches:
            model(**b)
    return model.lte_stats(accumulated=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["teal", "cats"])
def test_threshold_methods_hit_their_target_on_calibration_data(family, method):
    data = calib()
    model = apply_baseline(build(family), method, 0.6, calib_data=data)
    stats = measured(model, data)
    assert abs(stats["activation_sparsity"] - 0.6) < 0.03
    for sp in stats["per_layer_activation_sparsity"]:
        assert abs(sp - 0.6) < 0.06
    # Weight reads skipped: TEAL skips the thresholded inputs' columns of every FFN matrix; CATS
    # always reads the gate (or W1) and skips the rest for the masked neurons.
    gated = family in ("llama", "phi3")
    expected = 0.6 if method == "teal" else 0.6 * (2 / 3 if gated else 1 / 2)
    assert abs(stats["ffn_sparsity"] - expected) < 0.04
    assert stats["gflops_per_token"] < stats["dense_gflops_per_token"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["teal", "cats"])
def test_sequential_calibration_stops_after_its_layer_and_keeps_the_thresholds(monkeypatch, family, method):
    from lte.baselines import calibration

    def thresholds(model):
        return [(s.x_threshold.item(), s.h_threshold.item()) for s in model.sparsifiers()]

    data = calib()
    heads = []
    fast_base = build(family)
    fast_base.get_output_embeddings().register_forward_hook(lambda *a: heads.append(1))
    fast = apply_baseline(fast_base, method, 0.6, calib_data=data)
    assert heads == []  # every calibration pass stopped before the LM head
    monkeypatch.setattr(calibration, "_outputs_of", lambda model, sparsifiers: [])  # whole forwards
    slow = apply_baseline(build(family), method, 0.6, calib_data=data)
    assert thresholds(fast) == thresholds(slow)
    assert torch.equal(logits(fast, batch()), logits(slow, batch()))


ALL_FAMILIES = ["llama", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "opt", "gpt_neox", "bert", "mpnet"]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_block_by_block_calibration_gives_the_layer_by_layer_thresholds(monkeypatch, family):
    """The O(L) sequential calibration (each layer's block run on stored hidden states) sets the thresholds the
    layer-by-layer passes set, exactly, on every family (Gemma 2/3: per-layer sliding-window masks; GPT-2, OPT,
    BERT, MPNet: blocks that return tuples), and it runs the model once per batch plus one check."""
    from lte.baselines import calibration

    def thresholds(model):
        return [(s.x_threshold.item(), s.h_threshold.item()) for s in model.sparsifiers()]

    data = calib(3)
    base = build(family)
    forwards = []
    base.register_forward_pre_hook(lambda *a: forwards.append(1))
    fast = apply_baseline(base, "teal", 0.6, calib_data=data, batch_size=4)
    assert len(forwards) == len(data) + 1  # the recording forwards and the check, never one per layer
    monkeypatch.setattr(calibration, "repeated_blocks", lambda model, members: None)
    slow = apply_baseline(build(family), "teal", 0.6, calib_data=data, batch_size=4)
    assert thresholds(fast) == thresholds(slow)
    assert len({t for t in thresholds(fast)}) == len(fast.sparsifiers())  # the layers' own thresholds


def test_block_by_block_calibration_falls_back_when_the_blocks_do_not_chain(monkeypatch, caplog):
    """A model whose hidden state changes between its blocks (here: every stored block output shifted) fails the
    check on the last block's input, and the thresholds come from the layer-by-layer passes instead."""
    from lte import passes
    from lte.baselines import calibration

    data = calib(2)
    monkeypatch.setattr(calibration, "repeated_blocks", lambda model, members: None)
    slow = apply_baseline(build("llama"), "cats", 0.6, calib_data=data, batch_size=4)
    monkeypatch.undo()
    run = passes.BlockCall.run
    monkeypatch.setattr(passes.BlockCall, "run", lambda self, block, hidden: run(self, block, hidden) + 1.0)
    with caplog.at_level("WARNING", logger="lte.baselines.calibration"):
        fallen = apply_baseline(build("llama"), "cats", 0.6, calib_data=data, batch_size=4)
    assert "calibrating layer by layer instead" in caplog.text
    reference = [s.h_threshold.item() for s in slow.sparsifiers()]
    assert [s.h_threshold.item() for s in fallen.sparsifiers()] == reference


def test_block_by_block_calibration_falls_back_when_a_block_is_not_called(monkeypatch):
    """A forward that does not run every block of the list (lte.passes raises NotReplayable) leaves the thresholds to
    the layer-by-layer passes, with no error for the user."""
    from lte import passes
    from lte.baselines import calibration

    data = calib(2)
    monkeypatch.setattr(calibration, "repeated_blocks", lambda model, members: None)
    slow = apply_baseline(build("gpt2"), "teal", 0.6, calib_data=data, batch_size=4)
    monkeypatch.undo()

    def skipping(model, blocks, inputs):
        raise passes.NotReplayable("1 of 2 blocks were called in one forward")

    monkeypatch.setattr(calibration, "block_calls", skipping)
    fallen = apply_baseline(build("gpt2"), "teal", 0.6, calib_data=data, batch_size=4)
    assert [s.x_threshold.item() for s in fallen.sparsifiers()] == [s.x_threshold.item() for s in slow.sparsifiers()]


def test_repeated_blocks_finds_the_layer_list_and_only_it():
    from lte.passes import repeated_blocks

    model = build("llama")
    downs = [layer.mlp.down_proj for layer in model.model.layers]
    assert repeated_blocks(model, downs) == list(model.model.layers)
    assert repeated_blocks(model, downs[::-1]) is None  # out of order
    assert repeated_blocks(model, downs[:1]) is None  # not one per block
    assert repeated_blocks(model, []) is None


@pytest.mark.parametrize("method", ["teal", "cats"])
def test_threshold_zero_target_is_dense(method):
    base = build("llama")
    want = logits(copy.deepcopy(base), batch())
    model = apply_baseline(base, method, 0.0, calib_data=calib())
    assert torch.allclose(logits(model, batch()), want, atol=1e-6)
    assert model.lte_stats()["ffn_sparsity"] == 0.0


def test_stats_have_the_lte_keys():
    lmodel = lte.get_lte_model(build("llama"), lte.LTEConfig(grouping_iters=2)).set_routing("topk", k=2)
    lmodel(**batch())
    want = set(lmodel.lte_stats())
    for method in ["teal", "moefication-oracle", "dejavu"]:
        model = apply_baseline(build("llama"), method, 0.5, calib_data=calib(2), predictor_steps=5, grouping_iters=2)
        model(**batch())
        assert want <= set(model.lte_stats())
        assert want <= set(measured(model, calib(1)))
        assert set(model.lte_stats()["union_sparsity"]) == set(lmodel.lte_stats()["union_sparsity"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_oracle_moefication_picks_the_largest_experts(family):
    model = apply_baseline(build(family), "moefication-oracle", 0.5, grouping_iters=3)
    layer = model.baseline_layers()[0]
    sizes = layer.sparsifier.unit_sizes
    seen = {}
    layer.output.register_forward_pre_hook(lambda mod, args: seen.setdefault("h", args[0].detach().clone()))
    layer.output.base_layer.register_forward_pre_hook(lambda mod, args: seen.setdefault("masked", args[0].detach()))
    model(**batch())
    h = seen["h"].reshape(-1, F)  # [T, F], before the mask
    mass = torch.stack([part.abs().sum(-1) for part in h.split(sizes.tolist(), dim=-1)], dim=-1)  # [T, E]
    k = layer.sparsifier.k
    assert k == round(0.5 * len(sizes))
    chosen = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, mass.topk(k, dim=-1).indices, True)
    keep = torch.repeat_interleave(chosen, sizes, dim=-1)  # [T, F]
    assert torch.equal(seen["masked"].reshape(-1, F), h * keep)


def test_moefication_router_uses_lte_grouping_and_keeps_the_function_dense():
    base = build("llama")
    want = logits(copy.deepcopy(base), batch())
    model = apply_baseline(base, "moefication", 0.5, calib_data=calib(), router_steps=20, grouping_iters=3)
    assert model.baseline_layers()[0].sparsifier.unit_sizes.tolist() == [32, 32, 32, 4]
    model.set_state("off")  # permuted weights, no mask: the original function
    assert torch.allclose(logits(model, batch()), want, atol=1e-5)
    model.set_state("on")
    stats = measured(model, calib(2))
    assert 0.3 < stats["ffn_sparsity"] < 0.7
    # the router's cost is counted: 2 * (D*H + H*E) per layer on top of the FFN savings
    router = model.baseline_layers()[0].sparsifier.predictor
    assert router.flops() > 0


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_dejavu_predictor_learns_and_topk_keeps_exactly_k(family):
    model = apply_baseline(build(family), "dejavu", 0.7, calib_data=calib(6), predictor_steps=150, predictor_lr=3e-3)
    for losses in model.train_losses:
        assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10
    k = round(0.3 * F)
    seen = []
    layer = model.baseline_layers()[1]
    layer.output.base_layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    model(**batch(pad_last=0))
    assert layer.sparsifier.k == k
    assert torch.equal(layer.sparsifier.neuron_keep.reshape(-1, F).sum(-1), torch.full((14,), float(k)))
    assert abs(model.lte_stats()["ffn_sparsity"] - expected_topk_sparsity(0.7, F)) < 1e-6
    # a new target only moves k
    set_sparsity(model, 0.9)
    model(**batch())
    assert model.baseline_layers()[0].sparsifier.k == round(0.1 * F)


def test_dejavu_save_and_load(tmp_path):
    model = apply_baseline(build("llama"), "dejavu", 0.5, calib_data=calib(2), predictor_steps=10)
    want = logits(model, batch())
    model.save_pretrained(tmp_path / "dv")
    again = BaselineModel.from_pretrained(tmp_path / "dv")
    again.eval()
    assert again.method == "dejavu" and again.routing == "topk"
    assert torch.allclose(logits(again, batch()), want, atol=1e-6)


def test_random_topk_is_an_lte_model_with_frozen_random_routers():
    model = apply_baseline(build("llama"), "random-topk", 0.5, grouping_iters=2)
    assert isinstance(model, lte.LTEModel) and model.routing == "topk"
    assert not any(p.requires_grad for p in model.router_parameters())
    model(**batch())
    assert model.lte_stats()["ffn_sparsity"] > 0.3


def test_bad_input_is_a_clear_error():
    with pytest.raises(lte.LTEError, match="unknown baseline"):
        apply_baseline(build("llama"), "magic", 0.5)
    with pytest.raises(lte.LTEError, match="calibration data"):
        apply_baseline(build("llama"), "teal", 0.5)
    with pytest.raises(lte.LTEError, match="target sparsity"):
        apply_baseline(build("llama"), "teal", 1.5, calib_data=calib(1))
    with pytest.raises(lte.LTEError, match="lte.training.finetune"):
        apply_baseline(build("llama"), "dejavu-ft", 0.5, calib_data=calib(1), predictor_steps=2)
    lmodel = lte.get_lte_model(build("llama"), lte.LTEConfig(grouping_iters=2))
    with pytest.raises(lte.LTEError, match="converted by lte"):
        apply_baseline(lmodel.base_model, "teal", 0.5, calib_data=calib(1))

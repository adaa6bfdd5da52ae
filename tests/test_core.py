"""Core conversion: every family in the table, routing modes, losses, stats, save/load, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lte
from lte.conversion.permute import in_rows
from tiny_models import FAMILIES, F, batch, build, logits

ALL = sorted(FAMILIES)


def convert(model, **cfg):
    return lte.get_lte_model(model, lte.LTEConfig(**{"grouping": "kmeans", "grouping_iters": 5, **cfg}))


def test_table_covers_issue_families():
    needed = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "opt",
              "gpt_neox", "bert", "roberta", "mpnet"}
    assert needed <= set(lte.architectures.supported())


@pytest.mark.parametrize("family", ALL)
def test_dense_equals_original(family):
    model = build(family)
    original = copy.deepcopy(model)
    inputs = batch()
    ref = logits(original, inputs)
    lmodel = convert(model)
    perm = lmodel.lte_layers()[0].input.perm
    assert not torch.equal(perm, torch.arange(F)), "k-means grouping should move neurons"
    lmodel.set_routing("dense")
    assert (logits(lmodel, inputs) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("family", ALL)
def test_hard_all_on_equals_dense_and_soft_trains(family):
    lmodel = convert(build(family))
    inputs = batch()
    dense = logits(lmodel.set_routing("dense"), inputs)
    lmodel.set_routing("hard", tau=1e-9)  # every score passes: all experts on
    assert (logits(lmodel, inputs) - dense).abs().max() < 1e-5
    assert lmodel.lte_stats()["ffn_sparsity"] == 0.0

    lmodel.train()
    lmodel.set_routing("soft")
    out = lmodel(**inputs)
    out.logits.float().pow(2).mean().backward()
    for layer in lmodel.lte_layers():
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    grads = [p.grad for n, p in lmodel.named_parameters() if "router" not in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", ALL)
def test_save_load_round_trip(family, tmp_path):
    lmodel = convert(build(family))
    lmodel.set_routing("hard")
    lmodel.stage = "stage2"
    inputs = batch()
    before = logits(lmodel, inputs)
    lmodel.save_pretrained(tmp_path / "m")
    loaded = lte.LTEModel.from_pretrained(tmp_path / "m")
    loaded.eval()
    assert loaded.routing == "hard" and loaded.stage == "stage2"
    assert torch.equal(logits(loaded, inputs), before)


def test_router_init_spreads_scores():
    lmodel = convert(build("llama")).set_routing("soft")
    lmodel(**batch())
    scores = torch.cat([layer.input.scores.flatten() for layer in lmodel.lte_layers()])
    assert (scores - 0.5).abs().max() > 0.05


def test_soft_loss_is_task_plus_weighted_lte_losses():
    lmodel = convert(build("llama"), eta=0.7, lam=0.3).set_routing("soft")
    inputs = batch()
    out = lmodel(**inputs, labels=inputs["input_ids"])
    parts = lmodel.last_lte_losses
    expected = parts["task"] + 0.7 * parts["eff"] + 0.3 * parts["sep"]
    assert torch.allclose(out.loss.detach(), expected)
    # efficiency loss by hand: mean of G^2 over real tokens, experts, layers
    mask = inputs["attention_mask"].reshape(-1).bool()
    by_hand = torch.stack([layer.input.scores.reshape(-1, 4)[mask].pow(2).mean()
                           for layer in lmodel.lte_layers()]).mean()
    assert torch.allclose(parts["eff"], by_hand)
    # hard mode: the loss is the task loss alone
    lmodel.set_routing("hard")
    out_hard = lmodel(**inputs, labels=inputs["input_ids"])
    assert "eff" not in lmodel.last_lte_losses
    assert torch.isfinite(out_hard.loss)


def test_padding_excluded_from_stats_and_losses():
    lmodel = convert(build("bert")).set_routing("hard")
    inputs = batch(pad_last=3)
    lmodel(**inputs)
    s1 = lmodel.lte_stats()
    # Change only padded positions: statistics must not move.
    inputs2 = {k: v.clone() for k, v in inputs.items()}
    inputs2["input_ids"][0, -3:] = (inputs2["input_ids"][0, -3:] + 5) % 100 + 1
    lmodel(**inputs2)
    assert lmodel.lte_stats()["per_layer"] == s1["per_layer"]


def test_topk_sparsity_and_stats():
    lmodel = convert(build("llama"))
    lmodel.set_routing("topk", k=2)
    lmodel(**batch(pad_last=0))
    stats = lmodel.lte_stats()
    # experts are [32, 32, 32, 4]: two experts on means at most 64 and at least 36 of 100 neurons
    for sp in stats["per_layer"]:
        assert 1 - 64 / F - 1e-6 <= sp <= 1 - 36 / F + 1e-6
    assert stats["union_sparsity"][16] <= stats["union_sparsity"][1]
    assert stats["gflops_per_token"] < stats["dense_gflops_per_token"]


def test_accumulated_stats_and_gflops():
    lmodel = convert(build("gpt2")).set_routing("hard", tau=1e-9)
    lmodel.reset_lte_stats()
    for seed in range(3):
        lmodel(**batch(seed))
    acc = lmodel.lte_stats(accumulated=True)
    assert acc["ffn_sparsity"] == 0.0
    # all on: LTE costs the dense FLOPs plus the routers (2*D*E per layer)
    routers = sum(2 * layer.router.in_features * layer.router.out_features for layer in lmodel.lte_layers())
    assert math.isclose(acc["gflops_per_token"], acc["dense_gflops_per_token"] + routers / 1e9, rel_tol=1e-9)


def test_expert_sizes_with_remainder():
    lmodel = convert(build("opt"))
    assert lmodel.lte_layers()[0].expert_sizes == [32, 32, 32, 4]


def test_light_save_reapplies_to_base(tmp_path):
    base = build("llama", seed=3)
    fresh = copy.deepcopy(base)
    lmodel = convert(base).set_routing("hard")
    inputs = batch()
    want = logits(lmodel, inputs)
    lmodel.save_pretrained(tmp_path / "light", light=True)
    assert not (tmp_path / "light" / "config.json").exists()
    again = lte.LTEModel.from_base(fresh, tmp_path / "light")
    assert torch.equal(logits(again, inputs), want)
    with pytest.raises(lte.LTEError, match="light save"):
        lte.LTEModel.from_pretrained(tmp_path / "light")


def test_light_save_refuses_after_training(tmp_path):
    lmodel = convert(build("llama"))
    with torch.no_grad():
        lmodel.lte_layers()[0].down_weight().add_(0.01)
    with pytest.raises(lte.LTEError, match="changed since conversion"):
        lmodel.save_pretrained(tmp_path / "x", light=True)


def test_mismatched_base_is_refused(tmp_path):
    lmodel = convert(build("llama", seed=0))
    lmodel.save_pretrained(tmp_path / "light", light=True)
    with pytest.raises(lte.LTEError, match="different checkpoint"):
        lte.LTEModel.from_base(build("llama", seed=1), tmp_path / "light")
    with pytest.raises(lte.LTEError, match="different base model"):
        lte.LTEModel.from_base(build("mistral"), tmp_path / "light")


def test_unknown_family_says_how_to_describe_it():
    t5 = __import__("transformers").T5ForConditionalGeneration(__import__("transformers").T5Config(
        vocab_size=50, d_model=24, d_ff=70, num_layers=1, num_heads=2, d_kv=12, dropout_rate=0.0))
    with pytest.raises(lte.LTEError, match="ffn_spec"):
        lte.get_lte_model(t5)
    # ...and describing it works: T5's FFN is DenseReluDense with wi -> relu -> wo
    t5.eval()
    inputs = {"input_ids": torch.tensor([[3, 4, 5, 6]]), "decoder_input_ids": torch.tensor([[0, 3]])}
    ref = logits(t5, inputs)
    spec = dict(container=r"DenseReluDense$", up="wi", down="wo")
    lmodel = lte.get_lte_model(t5, lte.LTEConfig(ffn_spec=spec, grouping="random"))
    assert len(lmodel.lte_layers()) == 2  # encoder + decoder
    assert (logits(lmodel, inputs) - ref).abs().max() < 1e-5


def test_expert_size_larger_than_ffn():
    with pytest.raises(lte.LTEError, match="expert"):
        convert(build("llama"), expert_size=1000)


def test_nan_weights_are_refused():
    model = build("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(lte.LTEError, match="NaN"):
        convert(model)


def test_replaced_projection_is_refused():
    class Quantised(torch.nn.Module):  # stands in for a quantised linear layer: no plain weight to permute
        def forward(self, x):
            return x

    model = build("llama")
    model.model.layers[0].mlp.up_proj = Quantised()
    with pytest.raises(lte.LTEError, match="nn.Linear and Conv1D"):
        convert(model)
    from lte.baselines import apply_baseline

    with pytest.raises(lte.LTEError, match="nn.Linear and Conv1D"):
        apply_baseline(model, "moefication-oracle", 0.5)


def test_missing_files(tmp_path):
    with pytest.raises(lte.LTEError, match="not a directory"):
        lte.LTEModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(lte.LTEError, match="lte_config.json"):
        lte.LTEModel.from_pretrained(tmp_path / "empty")
    lmodel = convert(build("llama"))
    lmodel.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "lte_adapter.safetensors").unlink()
    with pytest.raises(lte.LTEError, match="routers"):
        lte.LTEModel.from_pretrained(tmp_path / "m")


def test_double_conversion_and_bad_modes():
    lmodel = convert(build("llama"))
    with pytest.raises(lte.LTEError, match="already converted"):
        lte.get_lte_model(lmodel.base_model)
    with pytest.raises(lte.LTEError, match="routing mode"):
        lmodel.set_routing("sparse")
    with pytest.raises(lte.LTEError, match="k"):
        lmodel.set_routing("topk")
    with pytest.raises(lte.LTEError):
        lte.LTEConfig(tau=1.5)


def test_permutation_is_applied_consistently():
    model = build("phi3")
    gate_before = in_rows(model.model.layers[0].mlp.gate_up_proj).detach().clone()
    lmodel = convert(model)
    layer = lmodel.lte_layers()[0]
    perm = layer.input.perm
    assert torch.equal(layer.gate_weight(), gate_before[:F][perm])
    assert torch.equal(layer.up_weight(), gate_before[F:][perm])


def test_generate_falls_through():
    lmodel = convert(build("llama")).set_routing("hard")
    out = lmodel.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_save_keeps_other_files_and_overwrites(tmp_path):
    lmodel = convert(build("llama"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_log.jsonl").write_text("{}\n")
    lmodel.save_pretrained(out)
    lmodel.set_routing("hard")
    lmodel.save_pretrained(out)  # overwrite in place
    assert (out / "train_log.jsonl").read_text() == "{}\n"
    assert lte.LTEModel.from_pretrained(out).routing == "hard"
    assert not list(tmp_path.glob("run.tmp-*"))

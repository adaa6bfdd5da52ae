"""The `sketch` baseline: expert scores from low-bit copies of the FFN's own weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lte.baselines import BaselineModel, apply_baseline
from lte.baselines.sketch import WeightSketch, round_groups, unit_sums
from tiny_models import F, batch, build, logits


def test_round_groups_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    # 2 bits: integers -1..1, scale 4 / 1; w / 4 = 0.25, -0.5, 0.75, -1 -> 0, -0 (half to even), 1, -1
    assert torch.equal(round_groups(w, 2, group=4), torch.tensor([[0.0, 0.0, 4.0, -4.0]]))
    # 3 bits: integers -3..3, scale 4 / 3; w / scale = 0.75, -1.5, 2.25, -3 -> 1, -2, 2, -3
    assert torch.allclose(round_groups(w, 3, group=4), torch.tensor([[4 / 3, -8 / 3, 8 / 3, -4.0]]))
    # 1 bit: signs times the group's mean magnitude (2.5)
    assert torch.equal(round_groups(w, 1, group=4), torch.tensor([[2.5, -2.5, 2.5, -2.5]]))
    # groups of 2: each pair has its own scale (2, then 4): 0.5 -> 0 (half to even), -1, 0.75 -> 1, -1
    assert torch.equal(round_groups(w, 2, group=2), torch.tensor([[0.0, -2.0, 4.0, -4.0]]))
    with pytest.raises(Exception, match="between 1 and 8"):
        round_groups(w, 0)


def test_unit_sums_equal_and_unequal_units():
    v = torch.arange(6.0).reshape(1, 6)
    assert torch.equal(unit_sums(v, torch.tensor([2, 2, 2])), torch.tensor([[1.0, 5.0, 9.0]]))
    assert torch.equal(unit_sums(v, torch.tensor([1, 3, 2])), torch.tensor([[0.0, 6.0, 9.0]]))


def _gated_ffn(values, hidden=4, width=4):
    """Bias-free gate/up/down linears with weights from {-1, 0, 1} (exact at 2 bits, one group per row)."""
    gen = torch.Generator().manual_seed(values)
    layers = [nn.Linear(hidden, width, bias=False), nn.Linear(hidden, width, bias=False),
              nn.Linear(width, hidden, bias=False)]
    for lin in layers:
        lin.weight.data = torch.randint(-1, 2, lin.weight.shape, generator=gen).float()
    return layers


def test_sketch_scores_are_the_expert_energies_when_the_rounding_is_exact():
    gate, up, down = _gated_ffn(0)
    sketch = WeightSketch(gate, up, down, torch.nn.functional.silu, True, torch.tensor([2, 2]), bits=2, group=4)
    x = torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    want = []
    for e in (0, 1):  # by the formula, neuron by neuron
        total = 0.0
        for j in (2 * e, 2 * e + 1):
            g = float(gate.weight[j].detach() @ x[0])
            u = float(up.weight[j].detach() @ x[0])
            h = g / (1 + torch.exp(torch.tensor(-g))).item() * u
            total += h * h * float(down.weight[:, j].detach().square().sum())
        want.append(total)
    assert torch.allclose(sketch(x), torch.tensor([want]), rtol=1e-5)


def test_sketch_follows_the_weights():
    gate, up, down = _gated_ffn(1)
    sketch = WeightSketch(gate, up, down, torch.nn.functional.silu, True, torch.tensor([2, 2]), bits=2, group=4)
    x = torch.randn(3, 4)
    before = sketch(x).clone()
    with torch.no_grad():
        up.weight.mul_(2.0)  # in place, as an optimizer step: the energies grow 4x
    assert torch.allclose(sketch(x), 4 * before, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "bert"])
def test_sketch_baseline_keeps_k_experts_and_picks_the_energetic_ones(family):
    model = apply_baseline(build(family), "sketch", 0.5, grouping_iters=3, bits=8)
    layer = model.baseline_layers()[0]
    s = layer.sparsifier
    seen = {}
    layer.output.register_forward_pre_hook(lambda mod, args: seen.setdefault("h", args[0].detach().clone()))
    model(**batch(pad_last=0))
    h = seen["h"].reshape(-1, F)
    down_sq = layer.output.base_layer.weight.detach().float()
    down_sq = (down_sq if down_sq.shape[1] == F else down_sq.t()).square().sum(0)  # Conv1D stores [F, D]
    energy = unit_sums(h.float().square() * down_sq, s.unit_sizes)  # the true expert energies
    keep = s.neuron_keep.reshape(-1, F)
    kept_units = unit_sums(keep, s.unit_sizes) > 0  # [T, E]
    assert torch.equal(kept_units.sum(-1), torch.full((kept_units.shape[0],), s.k))
    # 8-bit copies: the chosen experts carry (nearly) the oracle's top-k energy
    best = energy.topk(s.k, dim=-1).values.sum(-1)
    got = (energy * kept_units).sum(-1)
    assert torch.all(got >= 0.98 * best)
    assert model.options["predictor"]["kind"] == "sketch"
    assert s.predictor_flops() > 0  # its cost is counted
    # FFN sparsity counts the sketch's own reads: 8-bit copies of gate and up (gated: 2 x 8/16 of 3
    # matrices = 1/3 of the FFN's 16-bit reads; plain: 8/16 of 2 matrices = 1/4) come off the experts skipped
    extra = 1 / 3 if s.gated else 1 / 4
    unit = 1.0 - keep.float().mean().item()
    assert abs(model.lte_stats()["per_layer"][0] - (unit - extra)) < 1e-6


def test_sketch_save_and_load_rebuilds_the_sketch(tmp_path):
    model = apply_baseline(build("llama"), "sketch", 0.5, grouping_iters=3)
    want = logits(model, batch())
    model.save_pretrained(tmp_path / "sk")
    again = BaselineModel.from_pretrained(tmp_path / "sk").eval()
    assert again.method == "sketch" and isinstance(again.sparsifiers()[0].predictor, WeightSketch)
    assert torch.allclose(logits(again, batch()), want, atol=1e-6)


def test_sketch_ft_is_built_as_sketch_then_fine_tuned():
    with pytest.raises(Exception, match="sketch-ft is sketch, then fine-tuning"):
        apply_baseline(build("llama"), "sketch-ft", 0.5)


def test_sketch_in_bf16_keeps_its_copies_in_bf16_and_scores_like_fp32():
    gate, up, down = _gated_ffn(2, hidden=64, width=8)
    x = torch.randn(5, 64)
    want = WeightSketch(gate, up, down, torch.nn.functional.silu, True, torch.tensor([4, 4]), bits=4)(x)
    for lin in (gate, up, down):
        lin.to(torch.bfloat16)
    sketch = WeightSketch(gate, up, down, torch.nn.functional.silu, True, torch.tensor([4, 4]), bits=4)
    got = sketch(x.to(torch.bfloat16))
    assert sketch._rounded()[0].dtype == torch.bfloat16 and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=0.05, atol=1e-3)

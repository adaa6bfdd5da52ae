"""Conversion of the real package-shipped models: dense routing reproduces their logits."""

from __future__ import annotations

import copy

import pytest
import torch

import lte

pytestmark = [pytest.mark.slow, pytest.mark.real]


def _load(name, task):
    zoo = pytest.importorskip("lte.data.zoo")
    try:
        return zoo.load_embedded(name, task=task)
    except Exception as err:  # package not installed here
        pytest.skip(f"{name} unavailable: {err}")


@pytest.mark.parametrize("name,task", [("smollm2-135m", "causal-lm"), ("minilm", "classification")])
def test_real_model_dense_reproduces_logits(name, task):
    model, tok = _load(name, task)
    model.eval()
    enc = tok(["The quick brown fox jumps over the lazy dog.", "LTE learns structured sparsity."],
              return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = copy.deepcopy(model)(**enc).logits
    lmodel = lte.get_lte_model(model, lte.LTEConfig(grouping="kmeans", grouping_iters=5))
    with torch.no_grad():
        dense = lmodel(**enc).logits
    assert (dense - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
    lmodel.set_routing("hard", tau=1e-9)
    with torch.no_grad():
        all_on = lmodel(**enc).logits
    assert (all_on - dense).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
    lmodel.set_routing("hard")
    with torch.no_grad():
        lmodel(**enc)
    stats = lmodel.lte_stats()
    assert 0.0 <= stats["ffn_sparsity"] <= 1.0 and len(stats["per_layer"]) == model.config.num_hidden_layers

"""Stage 2 in top-k routing (`stage2_routing="topk"`): expert counts from the re-cut, exact per token, saved."""

from __future__ import annotations

import pytest
import torch

import lte
from lte.evaluation.saved import load_eval_model
from lte.routing.fit import topk_for_sparsity
from lte.routing.layers import expert_gate
from lte.serving import prepare_for_inference
from lte.serving.prepare import sparse_modules
from lte.training import train_stage
from tiny_models import save_tiny_llama, wide_llama_lte, write_text

FAST = dict(block_size=24, batch_size=4, logging_steps=1, save_steps=1000, report_to="none", progress=False,
            lr=1e-3, seed=0)


def test_topk_counts_from_per_layer_sparsity_by_hand():
    model = wide_llama_lte()  # E = 10 per layer
    # E = 10: (1 - 0) * 10 = 10, (1 - 0.62) * 10 = 3.8 -> 4, (1 - 1) * 10 = 0
    assert topk_for_sparsity(model, [0.0, 0.62, 1.0]) == [10, 4, 0]
    assert topk_for_sparsity(model, [0.26, 0.5, 0.94]) == [7, 5, 1]
    with pytest.raises(lte.LTEError, match="one sparsity per LTE layer is needed \\(3\\), got 2"):
        topk_for_sparsity(model, [0.5, 0.5])


def test_topk_per_layer_in_the_config():
    cfg = lte.LTEConfig(topk=[3, 0, 5])
    assert lte.LTEConfig.from_dict(cfg.to_dict()).topk == [3, 0, 5]
    assert lte.LTEConfig(topk=4).topk == 4
    for bad in ([3, -1], [], [2.5], -1):
        with pytest.raises(lte.LTEError, match="topk"):
            lte.LTEConfig(topk=bad)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("topk2")
    model, text = save_tiny_llama(root / "llama"), write_text(root / "text.txt")
    train_stage("1", model, "causal-lm", text, root / "s1", max_steps=2, target_sparsity=0.4, calibration_holdout=4,
                stage1_routing="ste", lam=0.0, expert_size=8, **FAST)  # F = 72: 9 experts per layer
    return {"root": root, "text": text, "s1": root / "s1"}


def _experts_per_token(model, ids) -> list[torch.Tensor]:
    model(input_ids=ids)
    return [layer.input.gate.reshape(-1, layer.input.gate.shape[-1]).sum(-1) for layer in model.lte_layers()]


def test_stage2_in_topk_keeps_the_recut_counts_for_every_token(stage1):
    root = stage1["root"]
    r = train_stage("2", stage1["s1"], "causal-lm", stage1["text"], root / "s2topk", max_steps=2, target_sparsity=0.6,
                    calibration_holdout=4, stage2_routing="topk", **FAST)
    model = r["trainer"].model
    ks = r["topk"]
    assert ks == topk_for_sparsity(model, r["tau_calibration"]["per_layer"])  # from the re-cut at the target
    assert "tau_final_calibration" not in r  # the counts cannot drift: no re-cut after training
    assert sum(1 - k / 9 for k in ks) / len(ks) == pytest.approx(0.6, abs=0.12)  # 9 experts: steps of 0.11
    ids = torch.randint(2, 20, (3, 16))
    with torch.no_grad():
        model.eval()
        counts = _experts_per_token(model, ids)
    for k, per_token in zip(ks, counts):  # every token, not only on average: a threshold would vary
        assert per_token.tolist() == [float(k)] * per_token.numel()
    loaded = lte.load_model(root / "s2topk")  # saved in topk routing with its counts
    assert loaded.routing == "topk" and loaded.lte_config.topk == ks
    assert lte.load_model(root / "s2topk", routing="served").routing == "topk"
    evaluated, _, is_lte = load_eval_model(root / "s2topk", "causal-lm")
    assert is_lte and evaluated.routing == "topk" and [layer.input.k for layer in evaluated.lte_layers()] == ks
    with torch.no_grad():
        assert [c.tolist() for c in _experts_per_token(loaded.eval(), ids)] == [c.tolist() for c in counts]
    with pytest.raises(lte.LTEError, match="topk routing.*native weights"):
        prepare_for_inference(lte.load_model(root / "s2topk"), weights="fp8")
    with torch.no_grad():
        want = loaded(input_ids=ids).logits
        for use_kernels in (False, True):  # the masked dense path; the decode ops (references on the CPU)
            served = prepare_for_inference(lte.load_model(root / "s2topk"), use_kernels=use_kernels).eval()
            assert [m.topk for m in sparse_modules(served)] == ks
            for t in (16, 1):  # 3 x 16 and 3 x 1 tokens
                got = served(input_ids=ids[:, :t]).logits
                torch.testing.assert_close(got, want[:, :t] if t == 16 else loaded(input_ids=ids[:, :1]).logits)


def test_a_hard_stage2_is_still_served_in_hard_routing(stage1):
    root = stage1["root"]
    train_stage("2", stage1["s1"], "causal-lm", stage1["text"], root / "s2hard", max_steps=1, target_sparsity=0.6,
                calibration_holdout=4, **FAST)
    assert lte.load_model(root / "s1", routing="served").routing == "hard"  # stage 1 saves in ste routing
    assert lte.load_model(root / "s2hard", routing="served").routing == "hard"
    assert lte.LTEModel.from_pretrained(root / "s2hard").lte_config.topk is None


def test_topk_stage2_settings_are_checked(stage1):
    root, s1, text = stage1["root"], stage1["s1"], stage1["text"]
    with pytest.raises(lte.LTEError, match="stage2_routing 'topk' needs target_sparsity"):
        train_stage("2", s1, "causal-lm", text, root / "x1", max_steps=1, stage2_routing="topk", **FAST)
    with pytest.raises(lte.LTEError, match="hold_target_every"):
        train_stage("2", s1, "causal-lm", text, root / "x2", max_steps=1, target_sparsity=0.6, stage2_routing="topk",
                    hold_target_every=1, **FAST)
    r = train_stage("2", s1, "causal-lm", text, root / "x4", max_steps=1, target_sparsity=0.6, stage2_routing="topk",
                    calibration_holdout=4, batch_budget=0.5, **FAST)  # top-k under a per-batch budget of half
    layers = r["trainer"].model.lte_layers()
    assert all(layer.input.mode == "topk" and layer.input.budget == 0.5 for layer in layers)
    with torch.no_grad():
        r["trainer"].model.eval()(input_ids=torch.randint(2, 20, (4, 8)))
    for layer in layers:  # at each position the 4 sequences share at most half of the 9 experts
        assert int((layer.input.gate != 0).any(0).sum(-1).max()) <= 4
    with pytest.raises(lte.LTEError, match="stage2_routing must be one of hard, topk"):
        train_stage("2", s1, "causal-lm", text, root / "x3", max_steps=1, target_sparsity=0.6,
                    stage2_routing="threshold", **FAST)


def test_served_topk_mask_keeps_the_highest_scores_by_hand():
    from lte.serving.sparse_mlp import SparseMLP

    d, f, s = 2, 8, 2  # E = 4 experts of 2 neurons
    w = torch.zeros(f, d)
    router = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [-1.0, 0.0]])  # logits: x0, x1, 2 x0, -x0
    mlp = SparseMLP(w, w.clone(), w.clone(), router, tau=0.5, expert_size=s, activation="silu", use_kernels=False,
                    topk=2)
    x = torch.tensor([[1.0, 0.5], [-1.0, 3.0]])
    # token 0: logits 1, 0.5, 2, -1 -> experts 2 and 0; token 1: -1, 3, -2, 1 -> experts 1 and 3
    assert mlp.dense_mask(x).tolist() == [[True, False, True, False], [False, True, False, True]]
    with pytest.raises(lte.LTEError, match="topk must be an int in \\[0, 4\\]"):
        SparseMLP(w, w.clone(), w.clone(), router, tau=0.5, expert_size=s, activation="silu", topk=5)
    with pytest.raises(lte.LTEError, match="native weights"):
        SparseMLP(w, w.clone(), w.clone(), router, tau=0.5, expert_size=s, activation="silu", topk=2, weights="fp8")


def test_served_topk_mask_under_a_batch_budget_by_hand():
    """Token 0's logits 1, 0.5, 2, -1 keep experts {0, 2}; token 1's -0.5, 3, -1, 0.5 keep {1, 3}. Summed
    sigmoid scores: e1 = s(0.5) + s(3) = 1.575, e2 = s(2) + s(-1) = 1.150, e0 = s(1) + s(-0.5) = 1.109,
    e3 = s(-1) + s(0.5) = 0.891. A budget of 2 keeps e1 and e2 for the step, which both tokens then take;
    3 adds e0: token 0 takes {0, 2}, token 1 (logits -0.5, 3, -1 there) {0, 1}."""
    from lte.serving.sparse_mlp import SparseMLP

    d, f, s = 2, 8, 2
    w = torch.zeros(f, d)
    router = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [-1.0, 0.0]])
    x = torch.tensor([[1.0, 0.5], [-0.5, 3.0]])
    for budget, want in ((0, [[0, 2], [1, 3]]), (2, [[1, 2], [1, 2]]), (3, [[0, 2], [0, 1]]), (4, [[0, 2], [1, 3]])):
        mlp = SparseMLP(w, w.clone(), w.clone(), router, tau=0.5, expert_size=s, activation="silu", topk=2,
                        budget=budget)  # kernels on: the decode ops (their references on the CPU)
        mlp.record_mask = True
        mlp(x)
        assert mlp.last_mask.tolist() == [[e in on for e in range(4)] for on in want], budget


def test_topk_gate_breaks_ties_to_the_lower_expert_and_passes_no_gradient():
    scores = torch.tensor([[[0.7, 0.9, 0.7, 0.7, 0.2], [0.5, 0.5, 0.5, 0.5, 0.5]],
                           [[0.1, 0.3, 0.3, 0.9, 0.3], [1.0, 1.0, 0.0, 1.0, 1.0]]], requires_grad=True)  # [B, T, E]
    want = [[[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0]],
            [[0.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0, 0.0]]]  # k = 3; equal scores: the lower indices
    gate = expert_gate(scores, "topk", 0.5, 3)
    assert gate.tolist() == want and gate.dtype == scores.dtype and not gate.requires_grad
    (scores * gate).sum().backward()  # the gate multiplies like a constant 0/1 mask
    assert scores.grad.tolist() == want
    assert expert_gate(scores, "topk", 0.5, 9).tolist() == [[[1.0] * 5] * 2] * 2  # k > E: every expert
    assert not expert_gate(scores, "topk", 0.5, 0).any()
    with pytest.raises(lte.LTEError, match="topk routing needs k"):
        expert_gate(scores, "topk", 0.5, None)


def test_served_topk_ties_match_the_lte_gate_on_both_paths(monkeypatch):
    """Equal router logits (repeated router rows): the decode path (`router_topk_mask`), the prefill path
    (`dense_mask`) and the LTEModel's gate all keep the lower expert index."""
    from lte import kernels
    from lte.serving.sparse_mlp import SparseMLP

    calls, op = [], kernels.router_topk_mask

    def counted(x, w_router, k, budget=0):
        calls.append(k)
        return op(x, w_router, k, budget=budget)

    monkeypatch.setattr(kernels, "router_topk_mask", counted)

    d, f, s = 2, 8, 2  # E = 4 experts of 2 neurons
    gen = torch.Generator().manual_seed(0)
    w_gate, w_up, w_down_t = (torch.randn(f, d, generator=gen) for _ in range(3))
    router = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # experts 2, 3 repeat 0, 1
    x = torch.tensor([[1.0, 1.0], [2.0, 1.0], [-1.0, 3.0]])
    want = [[True, True, False, False], [True, False, True, False], [False, True, False, True]]  # k = 2
    scores = torch.sigmoid(x @ router.t())
    assert (expert_gate(scores, "topk", 0.5, 2) != 0).tolist() == want
    outs = []
    for use_kernels in (True, False):
        mlp = SparseMLP(w_gate, w_up, w_down_t, router, tau=0.5, expert_size=s, activation="silu",
                        use_kernels=use_kernels, topk=2)
        mlp.record_mask = True
        with torch.no_grad():
            outs.append(mlp(x))
        assert mlp.last_mask.tolist() == want, use_kernels
        assert calls == [2], use_kernels  # the decode path's mask comes from the op, prefill's does not
        assert mlp.dense_mask(x).tolist() == want
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[1], mlp.masked_dense(x, torch.tensor(want)))

"""The training recipe's parts past the paper: straight-through stage 1, distillation from the
dense model, the global-threshold router fit and the tau calibration that hits a target sparsity.

Expected values are computed by hand (or by a plain autograd reference) on tiny inputs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import lte
from lte.routing.fit import (
    _expert_log_mass,
    _search_threshold,
    _weighted_quantile,
    calibrate_tau,
    fit_routers,
    hard_sparsity,
)
from lte.routing.layers import expert_gate
from lte.training import train_stage
from lte.training.distill import distillation_loss, hidden_state_loss
from tiny_models import batch as tiny_batch
from tiny_models import build, save_tiny_llama, wide_llama_lte, write_text

FAST = dict(block_size=24, batch_size=4, logging_steps=1, save_steps=1000, report_to="none", progress=False,
            lr=1e-3, seed=0)


# ---------------------------------------------------------------------- straight-through routing
def test_ste_gate_is_hard_forward_and_identity_backward():
    scores = torch.tensor([[0.2, 0.7, 0.5, 0.9]], requires_grad=True)
    gate = expert_gate(scores, "ste", 0.5, None)
    assert gate.tolist() == [[0.0, 1.0, 0.0, 1.0]]  # exactly the hard mask (0.5 is not > 0.5)
    (gate * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    assert scores.grad.tolist() == [[1.0, 2.0, 3.0, 4.0]]  # d gate / d score = 1 (straight through)


def test_ste_model_computes_hard_function_and_trains_routers():
    model = lte.get_lte_model(build("llama"), lte.LTEConfig(tau=0.5))
    inputs = tiny_batch(seed=3)
    model.set_routing("hard")
    with torch.no_grad():
        hard = model(**inputs).logits
    model.set_routing("ste").train()
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.equal(out.logits.detach(), hard)  # the model trains on the served function
    assert model.last_lte_losses["eff"] > 0  # LTE terms are added as in soft routing
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.router_parameters())
    model.zero_grad()
    model.set_routing("hard")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.router_parameters())


# ---------------------------------------------------------------------- distillation
def test_distillation_kl_by_hand():
    s = torch.tensor([[0.0, 0.0]])  # student: (1/2, 1/2)
    t = torch.log(torch.tensor([[0.25, 0.75]]))  # teacher: (1/4, 3/4)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert distillation_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)
    # regression heads (one output) are matched by squared error
    assert distillation_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [1.0]])).item() == pytest.approx(2.5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_matches_plain_autograd_and_ignores_padding(temperature):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)  # [B, L, V]
    t = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    loss = distillation_loss(s, t, mask, temperature, chunk_rows=3)  # chunks that straddle rows of the batch
    keep = mask.reshape(-1).bool()
    log_s = F.log_softmax(s.reshape(-1, 7)[keep] / temperature, -1)
    log_t = F.log_softmax(t.reshape(-1, 7)[keep] / temperature, -1)
    ref = temperature ** 2 * (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    (grad,) = torch.autograd.grad(loss, s)
    (ref_grad,) = torch.autograd.grad(ref, s)
    assert torch.allclose(grad, ref_grad, atol=1e-12)
    assert grad[0, 3:].abs().sum() == 0  # padded positions get no gradient
    (scaled,) = torch.autograd.grad(0.3 * distillation_loss(s, t, mask, temperature, chunk_rows=3), s)
    assert torch.allclose(scaled, 0.3 * ref_grad, atol=1e-12)  # the incoming gradient scales it
    with torch.no_grad():  # no gradient wanted: the same value
        assert distillation_loss(s, t, mask, temperature).item() == pytest.approx(ref.item(), rel=1e-10)


def test_distillation_gradient_does_not_depend_on_the_chunks(monkeypatch):
    """The chunking of the KL changes the loss only through fp32 summation order, never the gradient (so the
    CPU's smaller default chunks train the same weights); the CPU default fits CPU_CHUNK_BYTES."""
    from lte.training import distill

    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 6, 50, generator=g, requires_grad=True)  # [B, L, V], fp32: 200 bytes a row
    t = torch.randn(3, 6, 50, generator=g)
    grads, losses = [], []
    for chunk in (1, 4, 7, 18, None):
        loss = distillation_loss(s, t, chunk_rows=chunk)
        grads.append(torch.autograd.grad(loss, s)[0])
        losses.append(loss.item())
    assert all(torch.equal(grad, grads[0]) for grad in grads)
    assert losses == pytest.approx([losses[0]] * len(losses), rel=1e-6)
    seen = []
    monkeypatch.setattr(distill._ChunkedKL, "apply", lambda *args: seen.append(args[3]) or args[0].sum())
    monkeypatch.setattr(distill, "CPU_CHUNK_BYTES", 1000)
    distillation_loss(s, t)
    assert seen == [1000 // 200]  # rows of 50 fp32 logits per 1000 bytes


def test_distillation_rejects_mismatched_teacher():
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss(torch.zeros(2, 5), torch.zeros(2, 6))


def test_hidden_state_loss_by_hand():
    emb = torch.zeros(1, 2, 2)  # index 0 (embeddings) is skipped
    t1 = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # |t|^2 = 25, 1
    s1 = torch.tensor([[[3.0, 0.0], [1.0, 0.0]]])  # |s - t|^2 = 16, 0
    t2 = torch.tensor([[[0.0, 2.0], [2.0, 0.0]]])  # |t|^2 = 4, 4
    s2 = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])  # |s - t|^2 = 4, 0
    # layer 1: (16/25 + 0) / 2 = 0.32; layer 2: (4/4 + 0) / 2 = 0.5; mean over layers 0.41
    got = hidden_state_loss((emb, s1, s2), (emb, t1, t2), eps=0.0)
    assert got.item() == pytest.approx(0.41, rel=1e-6)
    # the second token masked out: layer 1 16/25, layer 2 4/4 -> 0.82
    got = hidden_state_loss((emb, s1, s2), (emb, t1, t2), torch.tensor([[1, 0]]), eps=0.0)
    assert got.item() == pytest.approx(0.82, rel=1e-6)
    assert hidden_state_loss((emb, t1, t2), (emb, t1, t2)).item() == 0.0
    with pytest.raises(ValueError, match="teacher"):
        hidden_state_loss((emb, s1), (emb, t1, t2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    return {"model": save_tiny_llama(root / "llama"), "text": write_text(root / "text.txt"), "root": root}


def test_distilled_stages_mix_losses_and_find_their_teacher(tiny):
    s1 = tiny["root"] / "s1"
    r1 = train_stage("1", tiny["model"], "causal-lm", tiny["text"], s1, max_steps=2, distill=0.5,
                     stage1_routing="ste", lam=0.0, target_sparsity=0.5, **FAST)
    assert r1["teacher"] == str(tiny["model"])  # stage 1's teacher is the dense model it converts
    rec = [json.loads(x) for x in (s1 / "train_log.jsonl").read_text().splitlines() if '"loss"' in x][0]
    # loss = (1 - 0.5) * task + 0.5 * KD + eta * L_eff (+ lam * L_sep = 0)
    expected = 0.5 * rec["task_loss"] + 0.5 * rec["distill_loss"] + rec["eta"] * rec["lte_eff"]
    assert rec["loss"] == pytest.approx(expected, rel=0.02)
    r2 = train_stage("2", s1, "causal-lm", tiny["text"], tiny["root"] / "s2", max_steps=2, distill=1.0, **FAST)
    assert r2["teacher"] == str(tiny["model"])  # found through stage 1's record
    with pytest.raises(lte.LTEError, match="stages 1 and 2"):
        train_stage("dense", tiny["model"], "causal-lm", tiny["text"], tiny["root"] / "d", max_steps=1,
                    distill=0.5, **FAST)


def test_hidden_distillation_adds_its_term_to_the_loss(tiny):
    out = tiny["root"] / "s1h"
    train_stage("1", tiny["model"], "causal-lm", tiny["text"], out, max_steps=2, distill=0.5, distill_hidden=2.0,
                stage1_routing="ste", lam=0.0, target_sparsity=0.5, **FAST)
    rec = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in x][0]
    assert rec["distill_hidden_loss"] > 0  # the routed model's layers differ from the dense teacher's
    expected = (0.5 * rec["task_loss"] + 0.5 * rec["distill_loss"] + 2.0 * rec["distill_hidden_loss"]
                + rec["eta"] * rec["lte_eff"])
    assert rec["loss"] == pytest.approx(expected, rel=0.02)


def test_stage2_distill_without_a_findable_teacher_says_what_to_pass(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = lte.get_lte_model(AutoModelForCausalLM.from_pretrained(tiny["model"]), lte.LTEConfig())
    model.stage = "stage1"
    model.save_pretrained(tmp_path / "s1")  # no lte_stage.json: the teacher is unknown
    AutoTokenizer.from_pretrained(tiny["model"]).save_pretrained(tmp_path / "s1")
    with pytest.raises(lte.LTEError, match="--teacher"):
        train_stage("2", tmp_path / "s1", "causal-lm", tiny["text"], tmp_path / "s2", max_steps=1, distill=0.5,
                    **FAST)


# ---------------------------------------------------------------------- router fit and tau calibration
def test_weighted_quantile_and_log_shares_by_hand():
    values = [torch.tensor([[3.0, 1.0, 2.0]])]  # one token, three experts
    assert _weighted_quantile(values, [torch.tensor([1, 1, 1])], 0.5) == 2.0
    assert _weighted_quantile(values, [torch.tensor([1, 10, 1])], 0.5) == 1.0  # weight 10 on the value 1
    assert _weighted_quantile(values, [torch.tensor([1, 1, 1])], 0.0) == 1.0
    assert _weighted_quantile(values, [torch.tensor([1, 1, 1])], 1.0) == 3.0
    # two layers of different widths, weights per column: layer 0 (weight 2 each) holds 0.5, 4.0 for two tokens,
    # layer 1 (weight 1) holds 1.0, 2.0, 3.0 for one token
    two = [torch.tensor([[0.5, 4.0], [0.5, 4.0]]), torch.tensor([[1.0, 2.0, 3.0]])]
    # entries with weights: 0.5 x2 (w 2 each) = 4, 4.0 x2 = 4, 1.0 / 2.0 / 3.0 (w 1) = 3; total 11
    # cumulative: 0.5 -> 4, 1.0 -> 5, 2.0 -> 6, 3.0 -> 7, 4.0 -> 11
    ws = [torch.tensor([2, 2]), torch.tensor([1, 1, 1])]
    assert _weighted_quantile(two, ws, 4 / 11) == 0.5 and _weighted_quantile(two, ws, 5.5 / 11) == 2.0
    assert _weighted_quantile(two, ws, 7.01 / 11) == 4.0


@pytest.mark.gpu
def test_weighted_quantile_on_the_gpu_matches_the_cpu():
    """The tau calibration's quantile where it runs in a study: logits on the GPU, one host read per step."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator().manual_seed(1)
    values = [torch.randn(4096, e, generator=gen) for e in (384, 192, 48)]
    weights = [torch.full((e,), 1536 // e) for e in (384, 192, 48)]
    for q in (0.5, 0.7, 0.9):
        on_gpu = _weighted_quantile([v.cuda() for v in values], [w.cuda() for w in weights], q)
        assert on_gpu == _weighted_quantile(values, weights, q), q


def test_weighted_quantile_matches_a_sorted_cumulative_sum():
    """Against the sort-based definition on random layers of different widths, ties included."""
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(50, e, generator=gen).round(decimals=1) for e in (3, 8, 5)]
    weights = [torch.randint(1, 5, (e,), generator=gen) for e in (3, 8, 5)]
    flat = torch.cat([v.reshape(-1) for v in values]).double()
    w = torch.cat([wt.double().repeat(v.shape[0]) for v, wt in zip(values, weights)])
    order = torch.argsort(flat)
    cum = torch.cumsum(w[order], 0)
    for q in (0.0, 0.1, 0.37, 0.5, 0.9, 0.999, 1.0):
        idx = int(torch.searchsorted(cum, torch.tensor(q * float(cum[-1]), dtype=cum.dtype)))
        expected = float(flat[order[min(idx, flat.numel() - 1)]])
        assert _weighted_quantile(values, weights, q) == expected, q
    # neighbouring fp32 values: the bisection must not step between them and lose the answer
    base = torch.tensor(1.0)
    close = [torch.stack([base, torch.nextafter(base, torch.tensor(2.0)),
                          torch.nextafter(torch.nextafter(base, torch.tensor(2.0)), torch.tensor(2.0))])[None]]
    for q, k in ((0.2, 0), (0.5, 1), (0.9, 2)):
        assert _weighted_quantile(close, [torch.tensor([1, 1, 1])], q) == float(close[0][0, k]), q
    odd_even = [close[0][:, 1:]]  # their midpoint rounds up to the second in fp32: a float64 bisection lost it
    assert _weighted_quantile(odd_even, [torch.tensor([1, 1])], 0.9) == float(close[0][0, 2])
    h = torch.tensor([[1.0, 1.0, 2.0]])  # one token, experts {0, 1} and {2}
    sizes = torch.tensor([2, 1])
    energy = torch.tensor([1.0, 3.0, 1.0])  # |W_j|^2: expert 0 has 1*1 + 1*3 = 4, expert 1 has 4*1 = 4
    shares = _expert_log_mass(h, sizes, energy).exp()
    assert shares[0].tolist() == pytest.approx([0.5, 0.5], rel=1e-6)
    rms2 = _expert_log_mass(h, sizes, None).exp()  # mean squares: (1 + 1) / 2 and 4 / 1
    assert rms2[0].tolist() == pytest.approx([1.0, 4.0], rel=1e-6)


def _calibration_batches(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 101, (4, 24), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def test_global_fit_keeps_overall_target_and_lets_layers_differ():
    batches = _calibration_batches(0, 1)
    model = wide_llama_lte()
    with torch.no_grad():  # layer 0's output is carried by its first 2 experts: the other 8 barely count
        model.lte_layers()[0].output.base_layer.weight[:, 64:] *= 0.02
    per_layer = fit_routers(model, batches[0], sparsity=0.5, threshold="global")
    assert sum(per_layer) / len(per_layer) == pytest.approx(0.5, abs=0.1)
    assert per_layer[0] > 0.7 and max(per_layer[1:]) < 0.5  # the weak experts go first, wherever they are
    token = fit_routers(model, batches[0], sparsity=0.5, threshold="token")
    assert max(token) - min(token) < 0.15  # the per-token fit puts every layer near the target
    with pytest.raises(lte.LTEError, match="threshold"):
        fit_routers(model, batches[0], sparsity=0.5, threshold="layer")


@pytest.mark.parametrize("target", [0.3, 0.7])
def test_calibrate_tau_hits_the_target_on_its_batches(target):
    model = wide_llama_lte()
    batches = _calibration_batches(1)
    fit_routers(model, batches[0], sparsity=0.5)
    result = calibrate_tau(model, batches, target, tol=0.01)
    measured = hard_sparsity(model, batches)
    assert sum(measured) / len(measured) == pytest.approx(target, abs=0.01)
    assert result["tau"] == model.lte_config.tau == model.lte_layers()[0].input.tau
    assert (result["tau"] > 0.5) == (target > 0.5)  # the fit put the model at 0.5: more sparsity, higher tau


def test_layer_scope_calibration_puts_every_layer_at_the_target(tmp_path):
    """One global tau keeps the profile training learned, however uneven; scope "layer" gives every layer
    its own threshold so each skips the target share (the E2E failure: layer 0 at 99.99% for a 0.9 target)."""
    model = wide_llama_lte()
    batches = _calibration_batches(2)
    with torch.no_grad():  # layer 0's output is carried by its first 2 experts: a global cut takes the rest first
        model.lte_layers()[0].output.base_layer.weight[:, 64:] *= 0.02
    fit_routers(model, batches[0], sparsity=0.5, threshold="global")
    glob = calibrate_tau(model, batches, 0.6, tol=0.01)
    assert glob["scope"] == "global" and model.lte_config.layer_tau is None
    assert glob["per_layer"][0] - min(glob["per_layer"][1:]) > 0.2  # uneven: layer 0 far sparser
    result = calibrate_tau(model, batches, 0.6, tol=0.02, scope="layer")
    measured = hard_sparsity(model, batches)
    assert max(abs(x - 0.6) for x in measured) <= 0.02 and measured == pytest.approx(result["per_layer"])
    taus = [layer.input.tau for layer in model.lte_layers()]
    assert taus == result["layer_tau"] == model.lte_config.layer_tau and len(set(taus)) == 3
    assert result["initial_sparsity"] == pytest.approx(glob["sparsity"])
    model.save_pretrained(tmp_path / "m")  # saved with the model; hard routing after loading uses them
    loaded = lte.LTEModel.from_pretrained(tmp_path / "m").set_routing("hard")
    assert [layer.input.tau for layer in loaded.lte_layers()] == pytest.approx(taus)
    assert hard_sparsity(loaded, batches) == pytest.approx(measured)
    model.set_routing("hard", tau=0.5)  # one tau again: the per-layer ones are dropped
    assert model.lte_config.layer_tau is None and {layer.input.tau for layer in model.lte_layers()} == {0.5}
    assert "layer_tau" not in model.lte_config.to_dict()  # unset: files stay as older lte wrote them
    with pytest.raises(lte.LTEError, match="tau scope"):
        calibrate_tau(model, batches, 0.6, scope="expert")


def test_layer_tau_is_checked():
    model = wide_llama_lte()
    with pytest.raises(lte.LTEError, match="one threshold in \\(0, 1\\) per LTE layer \\(3\\)"):
        model.set_routing("hard", layer_tau=[0.5, 0.5])
    with pytest.raises(lte.LTEError, match="not both"):
        model.set_routing("hard", tau=0.5, layer_tau=[0.5] * 3)
    with pytest.raises(lte.LTEError, match="layer_tau must be"):
        lte.LTEConfig(layer_tau=[0.5, 1.0])
    model.lte_config.layer_tau = [0.5] * 4  # e.g. a config from a deeper model
    with pytest.raises(lte.LTEError, match="4 thresholds for 3 LTE layers"):
        model.set_routing("hard")


def test_calibration_keeps_the_batch_budget():
    """A calibration inside a budgeted stage 2 measures and leaves the model with the budget it serves with."""
    model = wide_llama_lte()
    batches = _calibration_batches(3, 2)
    fit_routers(model, batches[0], sparsity=0.3)
    model.set_routing("hard", budget=0.2)  # 2 of 10 experts per position: sparsity >= 0.8 whatever tau
    result = calibrate_tau(model, batches, 0.5, tol=0.01)
    assert {layer.input.budget for layer in model.lte_layers()} == {0.2}
    assert min(result["per_layer"]) >= 0.8 - 1e-9
    model.set_routing("soft")  # another mode: no budget
    assert {layer.input.budget for layer in model.lte_layers()} == {0.0}


def _toy_measure(gain: float, curve: str = "logistic", start: float = 0.0):
    """A threshold search problem with a known answer: sparsity(theta) = sigmoid(theta - 2) (0.9 at
    theta = 2 + ln 9), or with curve "square" (theta / 10)^2 clipped to [0, 1] (0.9 at 10 sqrt(0.9)); the
    quantile proposal lands at root + gain x (theta - root) (gain 0: exact; gain < -1: the masks' feedback
    makes plain fixed-point rounds overshoot further every time)."""
    root = 2.0 + math.log(9.0) if curve == "logistic" else 10.0 * math.sqrt(0.9)
    calls = []

    def sparsity(t):
        return 1.0 / (1.0 + math.exp(-(t - 2.0))) if curve == "logistic" else min(max(t / 10.0, 0.0), 1.0) ** 2

    def measure(theta):
        t = start if theta is None else theta  # None: the threshold the model has (`start`)
        calls.append(t)
        return sparsity(t), [sparsity(t)], root + gain * (t - root)

    return measure, calls, sparsity, root


def test_threshold_search_takes_the_exact_proposal_in_one_round():
    measure, calls, _, root = _toy_measure(gain=0.0)
    theta, achieved, per_layer, rounds = _search_threshold(measure, 0.0, 0.9, tol=1e-9, max_rounds=12)
    assert rounds == 1 and theta == pytest.approx(root) and achieved == pytest.approx(0.9)
    assert calls == [0.0, pytest.approx(root)]  # no extra pass: the last one is the best


@pytest.mark.parametrize("curve", ["logistic", "square"])
def test_threshold_search_brackets_a_proposal_that_overshoots(curve):
    """With gain -1.5 the plain rounds overshoot further every time (error x -1.5) and never settle; once
    the target is bracketed the secant steps converge to the root."""
    measure, _, sparsity, root = _toy_measure(gain=-1.5, curve=curve)
    theta, achieved, per_layer, rounds = _search_threshold(measure, 0.0, 0.9, tol=0.002, max_rounds=12)
    assert abs(achieved - 0.9) <= 0.002 and per_layer == [achieved] and achieved == sparsity(theta)
    assert rounds <= 12 and theta == pytest.approx(root, abs=0.05)
    plain, t = [], 0.0
    for _ in range(6):  # what 6 unguarded rounds reach: still far off
        t = root - 1.5 * (t - root)
        plain.append(sparsity(t))
    assert abs(plain[-1] - 0.9) > 0.05


def test_threshold_search_returns_the_best_threshold_it_measured():
    """Out of rounds: the model is left at the closest threshold seen, not at the last one."""
    measure, calls, sparsity, _ = _toy_measure(gain=-1.5, curve="square")
    theta, achieved, _, rounds = _search_threshold(measure, 0.0, 0.9, tol=1e-12, max_rounds=2)
    seen = calls[:3]  # theta0 and the two rounds
    errors = [abs(sparsity(t) - 0.9) for t in seen]
    assert rounds == 2 and theta == pytest.approx(seen[errors.index(min(errors))])
    assert achieved == pytest.approx(sparsity(theta)) and calls[-1] == pytest.approx(theta)  # set back to it


def test_stage1_calibrates_tau_on_held_out_examples(tiny):
    out = tiny["root"] / "s1cal"
    r = train_stage("1", tiny["model"], "causal-lm", tiny["text"], out, max_steps=2, target_sparsity=0.4,
                    calibrate_tau=True, calibration_holdout=4, stage1_routing="ste", lam=0.0, **FAST)
    cal = r["tau_calibration"]
    assert cal["examples"] == 4 and cal["tau"] == pytest.approx(r["tau"])
    assert lte.LTEModel.from_pretrained(out).lte_config.tau == pytest.approx(cal["tau"])  # saved with the model
    with pytest.raises(lte.LTEError, match="target_sparsity"):
        train_stage("1", tiny["model"], "causal-lm", tiny["text"], out, max_steps=1, calibrate_tau=True, **FAST)


def test_stage2_recalibrates_tau_after_training_by_default(tiny):
    s1 = tiny["root"] / "s1re"
    train_stage("1", tiny["model"], "causal-lm", tiny["text"], s1, max_steps=2, target_sparsity=0.4,
                calibration_holdout=4, stage1_routing="ste", lam=0.0, **FAST)
    common = dict(max_steps=3, target_sparsity=0.6, calibration_holdout=4, **{**FAST, "lr": 5e-2})
    plain = train_stage("2", s1, "causal-lm", tiny["text"], tiny["root"] / "s2plain", recalibrate_tau=False, **common)
    assert "tau_final_calibration" not in plain  # turned off: the tau stage 2 started with stays
    assert plain["tau"] == pytest.approx(plain["tau_calibration"]["tau"])
    again = train_stage("2", s1, "causal-lm", tiny["text"], tiny["root"] / "s2re", **common)  # on by default
    final = again["tau_final_calibration"]
    assert final["examples"] == 4 and again["tau"] == pytest.approx(final["tau"])
    assert final["sparsity"] == pytest.approx(0.6, abs=0.05)  # on the held-out examples, after training
    model = lte.LTEModel.from_pretrained(tiny["root"] / "s2re")
    assert model.lte_config.tau == pytest.approx(final["tau"])  # the saved model routes at the final tau
    with pytest.raises(lte.LTEError, match="target_sparsity"):
        train_stage("2", s1, "causal-lm", tiny["text"], tiny["root"] / "s2x", max_steps=1, recalibrate_tau=True,
                    **FAST)


def test_stage2_with_layer_scope_saves_per_layer_thresholds(tiny):
    s1 = tiny["root"] / "s1layer"
    train_stage("1", tiny["model"], "causal-lm", tiny["text"], s1, max_steps=2, target_sparsity=0.4,
                calibration_holdout=4, stage1_routing="ste", lam=0.0, **FAST)
    r = train_stage("2", s1, "causal-lm", tiny["text"], tiny["root"] / "s2layer", max_steps=2, target_sparsity=0.6,
                    calibration_holdout=4, tau_scope="layer", **FAST)
    final = r["tau_final_calibration"]
    assert final["scope"] == "layer" and r["layer_tau"] == final["layer_tau"]
    assert max(abs(x - 0.6) for x in final["per_layer"]) < 0.1  # tiny held-out set: coarse steps
    model = lte.LTEModel.from_pretrained(tiny["root"] / "s2layer")
    assert model.lte_config.layer_tau == pytest.approx(final["layer_tau"])
    with pytest.raises(lte.LTEError, match="tau_scope 'layer' needs target_sparsity"):
        train_stage("2", s1, "causal-lm", tiny["text"], tiny["root"] / "s2y", max_steps=1, tau_scope="layer", **FAST)


def test_tau_hold_recuts_every_n_steps_but_not_at_the_last():
    from types import SimpleNamespace

    from lte.training.callbacks import TauHold

    seen = []

    def recut(model, step):
        seen.append((model, step))
        return {"initial_sparsity": 0.95, "sparsity": 0.9, "tau": 0.7, "target": 0.9}

    hold = TauHold(3, recut)
    for step in range(1, 10):  # 9 steps: re-cuts after steps 3 and 6; step 9 is the last (the final re-cut's)
        hold.on_step_end(None, SimpleNamespace(global_step=step, max_steps=9), None, model="m")
    assert [h["step"] for h in hold.history] == [3, 6] and seen == [("m", 3), ("m", 6)]
    assert hold.history[0] == {"step": 3, "target": 0.9, "found": 0.95, "left": 0.9, "tau": 0.7}
    with pytest.raises(ValueError, match=">= 1"):
        TauHold(0, recut)


def test_a_calibration_pass_leaves_a_steps_statistics_alone():
    """`hard_sparsity` in the middle of a training step (stage 2's TauHold) must not change what the step
    has accumulated: the same per-layer numbers before and after, and the pass's own are its own."""
    model = wide_llama_lte()
    batches = _calibration_batches(2)
    fit_routers(model, batches[0], sparsity=0.5)
    model.set_routing("hard")
    model.reset_lte_stats()
    model(**{k: v for k, v in batches[0].items() if k != "labels"})
    before = model.lte_stats(accumulated=True)["per_layer"]
    other = hard_sparsity(model, batches[1:])
    assert model.lte_stats(accumulated=True)["per_layer"] == before
    assert other == hard_sparsity(model, batches[1:]) and other != before  # another batch, other numbers


def test_stage2_holds_the_target_during_training(tiny):
    s1 = tiny["root"] / "s1hold"
    train_stage("1", tiny["model"], "causal-lm", tiny["text"], s1, max_steps=2, target_sparsity=0.4,
                calibration_holdout=4, stage1_routing="ste", lam=0.0, **FAST)
    common = dict(max_steps=4, target_sparsity=0.6, calibration_holdout=4, **{**FAST, "lr": 5e-2})
    held = train_stage("2", s1, "causal-lm", tiny["text"], tiny["root"] / "s2hold", hold_target_every=2, **common)
    holds = held["tau_holds"]
    assert [h["step"] for h in holds] == [2]  # step 4 is the last: the final re-cut follows training
    assert holds[0]["left"] == pytest.approx(0.6, abs=0.05)  # on the held-out examples, mid-training
    assert json.loads((tiny["root"] / "s2hold" / "lte_stage.json").read_text())["tau_holds"] == holds
    with pytest.raises(lte.LTEError, match="target_sparsity"):
        train_stage("2", s1, "causal-lm", tiny["text"], tiny["root"] / "s2x", max_steps=1, hold_target_every=2,
                    **FAST)
    with pytest.raises(lte.LTEError, match="applies to stage 2"):
        train_stage("1", tiny["model"], "causal-lm", tiny["text"], tiny["root"] / "s1x", max_steps=1,
                    target_sparsity=0.4, hold_target_every=2, **FAST)


def test_sparsity_ramp_targets():
    """`sparsity_ramp`: the re-cuts' target rises linearly from start x target to the target over N steps."""
    from lte.training.args import TrainArgs

    hp = TrainArgs(target_sparsity=0.8, hold_target_every=5, sparsity_ramp=20, sparsity_ramp_start=0.25)
    assert [hp.stage2_target(s) for s in (0, 10, 20, 40)] == pytest.approx([0.2, 0.5, 0.8, 0.8])
    assert TrainArgs(target_sparsity=0.8).stage2_target(0) == 0.8  # no ramp: the target from the first step
    with pytest.raises(lte.LTEError, match="hold_target_every"):
        TrainArgs(target_sparsity=0.8, sparsity_ramp=20)
    with pytest.raises(lte.LTEError, match="sparsity_ramp_start"):
        TrainArgs(target_sparsity=0.8, hold_target_every=5, sparsity_ramp=20, sparsity_ramp_start=1.5)


def test_stage2_ramps_the_sparsity_up(tiny):
    """Stage 2 with a ramp: the first cut at half the target, the re-cuts climbing, the final one at the target."""
    s1 = tiny["root"] / "s1ramp"
    train_stage("1", tiny["model"], "causal-lm", tiny["text"], s1, max_steps=2, target_sparsity=0.4,
                calibration_holdout=4, stage1_routing="ste", lam=0.0, **FAST)
    rec = train_stage("2", s1, "causal-lm", tiny["text"], tiny["root"] / "s2ramp", max_steps=4, target_sparsity=0.6,
                      calibration_holdout=4, hold_target_every=1, sparsity_ramp=4, **{**FAST, "lr": 5e-2})
    assert rec["tau_calibration"]["target"] == pytest.approx(0.3)
    assert rec["tau_calibration"]["sparsity"] == pytest.approx(0.3, abs=0.05)
    holds = rec["tau_holds"]
    assert [h["step"] for h in holds] == [1, 2, 3]
    assert [h["target"] for h in holds] == pytest.approx([0.375, 0.45, 0.525])
    assert [h["left"] for h in holds] == pytest.approx([0.375, 0.45, 0.525], abs=0.05)
    assert rec["tau_final_calibration"]["sparsity"] == pytest.approx(0.6, abs=0.05)


# ---------------------------------------------------------------------- grouping by activation profiles
def test_activation_grouping_needs_calibration_and_keeps_the_function():
    model = build("llama")
    inputs = tiny_batch(seed=5)
    with torch.no_grad():
        want = model(**inputs).logits
    with pytest.raises(lte.LTEError, match="calibration"):
        lte.get_lte_model(build("llama"), lte.LTEConfig(grouping="activation"))
    lmodel = lte.get_lte_model(model, lte.LTEConfig(grouping="activation"), calibration=tiny_batch(seed=6))
    with torch.no_grad():
        got = lmodel(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # a permutation: dense routing is the same model
    perms = [layer.input.perm for layer in lmodel.lte_layers()]
    assert all(sorted(p.tolist()) == list(range(p.numel())) for p in perms)


def test_activation_profiles_sketch_the_exact_profiles():
    from lte.conversion.activations import activation_profiles
    from lte.conversion.architectures import spec_for
    from lte.conversion.locate import find_ffns

    model = build("llama")
    ffns = find_ffns(model, spec_for("llama"))
    batch = tiny_batch(seed=7, batch_size=8, length=30, pad_last=5)
    exact = []
    hook = ffns[0].down.register_forward_pre_hook(lambda m, a: exact.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(**batch)
    hook.remove()
    profiles = exact[0][batch["attention_mask"].reshape(-1).bool()].abs().T  # [F, T real tokens]
    sketch = activation_profiles(model, ffns, batch, sketch_dim=4096)[0]  # [F, k]
    gram, approx = profiles @ profiles.T, sketch @ sketch.T
    assert (approx - gram).abs().max() <= 0.1 * gram.diagonal().max()  # inner products kept (JL, k = 4096)


def test_activation_grouping_recovers_planted_coactivation_groups():
    from lte.conversion.architectures import spec_for
    from lte.conversion.locate import find_ffns

    ffn = find_ffns(build("llama"), spec_for("llama"))[0]  # F = 100: experts of 32, 32, 32, 4
    g = torch.Generator().manual_seed(0)
    owner = torch.randperm(100, generator=g) % 4  # the planted group of each neuron (sizes 25 each)
    owner[owner == 3] = torch.tensor([3] * 4 + [0, 1, 2] * 7)[: int((owner == 3).sum())]
    tokens = torch.rand(4, 200, generator=g) < 0.3  # which tokens each group fires on
    features = tokens[owner].float() * (1 + torch.rand(100, 200, generator=g))  # [F, T] profiles
    perm = ffn.group(32, "activation", seed=0, n_iter=20, features=features)
    blocks = [owner[perm[i:i + 32]] for i in range(0, 96, 32)]
    purity = sum(int(torch.bincount(b).max()) for b in blocks) / 96
    weights_perm = ffn.group(32, "kmeans", seed=0, n_iter=20)  # the weight grouping knows nothing of it
    weight_blocks = [owner[weights_perm[i:i + 32]] for i in range(0, 96, 32)]
    weight_purity = sum(int(torch.bincount(b).max()) for b in weight_blocks) / 96
    assert purity > 0.75 and purity > weight_purity + 0.2


def test_stage_without_saving_the_model_is_not_complete_for_a_rerun(tiny, tmp_path):
    from lte.training import is_stage_complete

    out = tmp_path / "s1"
    record = train_stage("1", tiny["model"], "causal-lm", tiny["text"], out, max_steps=1, save_model=False, **FAST)
    assert record["model_saved"] is False and record["trainer"].model.stage == "stage1"
    assert not list(out.glob("*.safetensors"))  # only the record, the logs and the tokenizer
    assert not is_stage_complete(out, "1")  # lte run would train it again rather than load nothing

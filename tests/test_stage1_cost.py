"""The stage-1 step's extra work: the LTE losses and statistics of all layers at once, no host reads.

Same values as the per-layer formulas; fewer tensor operations (GPU kernel launches) and one host
read per optimizer step at most. Operation counts are deterministic, so they are checked here (with
room for other torch versions); times are measured by benchmarks/train_step.py.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lte
import tiny_models as tm
from lte.losses import lte_losses
from lte.stats import active_neurons


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("masked", [False, True])
def test_stacked_losses_equal_the_per_layer_ones(masked):
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(9, 5, generator=g) for _ in range(4)]
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0, 1], dtype=torch.bool) if masked else None
    want = lte_losses(scores, mask, 0.4, 1e-3)
    got = lte_losses(torch.stack(scores), mask, 0.4, 1e-3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("one_tau", [True, False])  # False: layers with their own tau, counted one by one
@pytest.mark.parametrize("mode", ["soft", "ste", "hard", "topk"])
def test_statistics_of_all_layers_at_once_equal_the_per_layer_ones(mode, one_tau):
    lmodel = lte.get_lte_model(tm.build("llama"), lte.LTEConfig(grouping="random", topk=2), progress=False)
    lmodel.set_routing(mode).train(mode in ("soft", "ste"))
    if not one_tau:
        lmodel.lte_layers()[0].input.tau = 0.45
    lmodel.reset_lte_stats()
    want_active, want_tokens = torch.zeros(tm.LAYERS, dtype=torch.float64), 0.0
    for seed in range(2):
        inputs = tm.batch(seed=seed, pad_last=3)
        lmodel(**inputs)
        w = inputs["attention_mask"].reshape(-1).float()
        for i, layer in enumerate(lmodel.lte_layers()):
            on = (layer.input.scores > layer.input.tau) if mode == "soft" else (layer.input.gate != 0)
            on = on.reshape(-1, layer.input.num_experts)  # [T, E]
            want_active[i] += float((active_neurons(on, layer.input.expert_sizes) * w).sum())
        want_tokens += float(w.sum())
    want = [1 - a / (want_tokens * tm.F) for a in want_active.tolist()]
    assert lmodel.lte_stats(accumulated=True)["per_layer"] == pytest.approx(want, rel=1e-12)
    assert lmodel.accumulated_sparsity().tolist() == pytest.approx(want, rel=1e-12)


LAYERS = 8


def _llama_and_op_counter(autocast: bool = False):
    """An 8-layer tiny LLaMA in training mode, and a function that counts the aten operations of one
    forward + backward of a model on a fixed batch (under CPU bf16 autocast when asked)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tm.VOCAB, hidden_size=32, intermediate_size=96,
                                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2))
    model.train()
    inputs = {**tm.batch(), "labels": tm.batch()["input_ids"]}

    def ops(m) -> collections.Counter:
        with _Ops() as counter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            m(**inputs).loss.backward()
        return counter.counts

    return model, ops


def test_stage1_step_costs_few_extra_ops_and_no_host_read():
    """Before issue 12 a stage-1 forward + backward of this 8-layer model cost ~100 extra ops per layer
    and the read-out one host read per layer; now ~60, and no read until the numbers are asked for."""
    model, ops = _llama_and_op_counter()
    layers = LAYERS
    dense = ops(model)
    lmodel = lte.get_lte_model(model, lte.LTEConfig(grouping="contiguous"), progress=False).set_routing("soft")
    lmodel.reset_lte_stats()
    stage1 = ops(lmodel)
    extra_per_layer = (sum(stage1.values()) - sum(dense.values())) / layers
    assert extra_per_layer < 75, f"{extra_per_layer:.0f} extra ops per layer"
    with _Ops() as counter:
        per_layer = lmodel.accumulated_sparsity()
    assert counter.counts["_local_scalar_dense"] == 0 and per_layer.shape == (layers,)


@pytest.mark.parametrize("autocast", [False, True])
def test_one_matmul_router_scores_have_the_two_matmul_gradients(autocast):
    """The task loss reaches x and the router through `scores`, the LTE losses only the router through
    `loss_scores` (as F.linear(x.detach(), W) would), from one forward matmul."""
    import torch.nn.functional as F

    from lte.routing.layers import _TrainingScores

    torch.manual_seed(0)
    x = torch.randn(2, 7, 24, requires_grad=True)
    w = torch.randn(5, 24, requires_grad=True)
    g_task, g_loss = torch.randn(2, 7, 5), torch.randn(2, 7, 5)

    def grads(fn):
        x.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            scores, loss_scores = fn()
        ((scores * g_task).sum() + (loss_scores * g_loss).sum()).backward()
        return scores.detach(), loss_scores.detach(), x.grad, w.grad

    def two_matmuls():
        return torch.sigmoid(F.linear(x, w).float()), torch.sigmoid(F.linear(x.detach(), w).float())

    got, want = grads(lambda: _TrainingScores.apply(x, w)), grads(two_matmuls)
    tol = dict(rtol=1e-2, atol=1e-2) if autocast else dict(rtol=1e-6, atol=1e-6)  # bf16: one rounding apart
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)
    x.grad = w.grad = None
    _TrainingScores.apply(x, w)[1].sum().backward()  # the LTE losses alone: nothing reaches x
    assert x.grad is None and w.grad is not None


def test_stage1_under_autocast_casts_once_per_use():
    """Under bf16 autocast the straight-through stage-1 step casts x once for the projection and its
    router, reuses the cast operands in the backward and makes the mask in the activations' dtype:
    9 extra casts per layer (14 before), and the same gradients as plain autograd ops."""
    import torch.nn.functional as F

    from lte.routing.layers import LTEInput, LTEOutput, gate_neurons

    model, ops = _llama_and_op_counter(autocast=True)
    layers = LAYERS
    dense = ops(model)
    lmodel = lte.get_lte_model(model, lte.LTEConfig(grouping="contiguous"), progress=False).set_routing("ste")
    lmodel.reset_lte_stats()
    stage1 = ops(lmodel)
    assert (stage1["_to_copy"] - dense["_to_copy"]) / layers <= 9

    # one layer against autograd's own ops: x [2, 5, D=16], F=64 in 4 experts of 16, tau 0.5
    up, down = torch.nn.Linear(16, 64, bias=False), torch.nn.Linear(64, 16, bias=False)
    inp = LTEInput(up, 4, 16, [16] * 4, generator=torch.Generator().manual_seed(1))
    out = LTEOutput(down, inp)
    inp.mode = "ste"
    x = torch.randn(2, 5, 16, requires_grad=True)

    def grads(fn):
        for t in (x, up.weight, down.weight, inp.router.weight):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn()
        (y.float() ** 2).sum().backward()
        return [t.grad.clone() for t in (x, up.weight, down.weight, inp.router.weight)]

    def reference():
        scores = torch.sigmoid(F.linear(x, inp.router.weight).float())
        gate = scores + ((scores > 0.5).float() - scores).detach()  # straight-through
        h = up(x)
        return down(gate_neurons(h, gate.to(h.dtype), 16))

    got, want = grads(lambda: out(inp(x))), grads(reference)
    assert inp.gate.dtype == torch.bfloat16
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)

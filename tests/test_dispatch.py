"""lte.serving.dispatch and the masked dense decode path: same function, chosen by the batch's union."""

from __future__ import annotations

import pytest
import torch

import lte
import lte.kernels as K
import tiny_models as tm
from lte.kernels.reference import expand_mask, masked_activation_reference, sparse_ffn_reference, topk_keep
from lte.serving import StaticDecoder, prepare_for_inference
from lte.serving.dispatch import (
    DENSE_ABOVE,
    DENSE_ABOVE_BY_GPU,
    choose_ffn_paths,
    dense_crossing,
    dense_table,
    dense_threshold,
    set_ffn_path,
    union_fraction,
)
from lte.serving.prepare import sparse_modules


def _prepared(family: str = "llama"):
    lmodel = lte.get_lte_model(tm.build(family, 0), lte.LTEConfig(grouping="random", seed=0), progress=False)
    with torch.no_grad():
        for layer in lmodel.lte_layers():
            layer.router.weight.mul_(3.0)  # some experts on, some off
    lmodel.generation_config.eos_token_id = None
    return prepare_for_inference(lmodel.set_routing("hard").eval())


def test_masked_activation_by_hand():
    up = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])  # F = 5, S = 2: experts {0,1} {2,3} {4}
    gate = torch.tensor([[0.0, 1.0, -1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, False, True]])
    silu = lambda v: v / (1 + torch.exp(-torch.tensor(v)))  # noqa: E731
    want = [silu(0.0) * 1.0, silu(1.0) * 2.0, 0.0, 0.0, silu(3.0) * 5.0]
    got = masked_activation_reference(gate, up, mask, 2, "silu")
    torch.testing.assert_close(got, torch.tensor([want]))
    plain = masked_activation_reference(None, up - 3.0, mask, 2, "relu")  # relu([-2, -1, 0, 1, 2]) * m
    assert plain.tolist() == [[0.0, 0.0, 0.0, 0.0, 2.0]]


@pytest.mark.parametrize("gated,bias,activation", [(True, False, "silu"), (False, True, "gelu"),
                                                   (True, True, "gelu_tanh")])
def test_masked_dense_ffn_is_the_sparse_function(gated, bias, activation):
    g = torch.Generator().manual_seed(0)
    D, F, S = 33, 200, 48  # a smaller last expert (E = 5)
    x = torch.randn(2, 3, D, generator=g)  # leading dims [2, 3]
    w = dict(w_up=torch.randn(F, D, generator=g), w_down_t=torch.randn(F, D, generator=g))
    extra = dict(w_gate=torch.randn(F, D, generator=g) if gated else None,
                 b_up=torch.randn(F, generator=g) if bias else None, b_down=torch.randn(D, generator=g) if bias else None)
    mask = torch.rand(2, 3, 5, generator=g) > 0.5
    got = K.masked_dense_ffn(x, mask, w["w_up"], w["w_down_t"], expert_size=S, activation=activation, **extra)
    ref = sparse_ffn_reference(x.reshape(-1, D), mask.reshape(-1, 5), w["w_up"], w["w_down_t"], expert_size=S,
                               activation=activation, **extra).reshape(2, 3, D)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="mask must have shape"):
        K.masked_dense_ffn(x, mask[..., :4], w["w_up"], w["w_down_t"], expert_size=S, **extra)


def test_thresholds_and_union_fraction_by_hand():
    assert [dense_threshold(t) for t in (1, 4, 8, 16, 32, 40, 64)] == [0.8, 0.8, 0.75, 0.75, 0.5, 0.5, 0.6]
    assert dense_threshold(2, ((4, 0.3), (8, 0.9))) == 0.3  # below the first row: the first row
    with pytest.raises(lte.LTEError, match="num_tokens"):
        dense_threshold(0)
    with pytest.raises(lte.LTEError, match="fraction"):
        dense_threshold(1, ((1, 1.5),))
    mask = torch.tensor([[True, False, False], [False, False, True]])  # F = 80, S = 32: sizes 32, 32, 16
    assert union_fraction(mask, 80, 32) == pytest.approx((32 + 16) / 80)
    assert DENSE_ABOVE[0][0] == 1


def test_dense_crossing_by_hand():
    """70 us at half the experts, 130 at all, dense 120: 0.5 + 0.5 * (120 - 70) / (130 - 70) = 0.9167."""
    assert dense_crossing([(1.0, 130.0), (0.5, 70.0), (0.1, 30.0)], 120.0) == pytest.approx(0.5 + 0.5 * 50 / 60)
    assert dense_crossing([(0.1, 30.0), (0.5, 70.0)], 50.0) == pytest.approx(0.3)  # between 0.1 and 0.5
    assert dense_crossing([(0.5, 70.0), (1.0, 110.0)], 120.0) == 1.0  # cheaper everywhere: never dense
    assert dense_crossing([(0.5, 70.0), (1.0, 130.0)], 60.0) == 0.5  # dearer at every measured point
    with pytest.raises(lte.LTEError, match="at least one"):
        dense_crossing([], 1.0)


def test_dense_table_follows_the_gpu(monkeypatch):
    """The H100 has its own measured thresholds; other GPUs, and the CPU, the first estimate."""
    assert dense_table("cpu") == DENSE_ABOVE
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert dense_table(torch.device("cuda", 0)) == DENSE_ABOVE_BY_GPU["h100"] != DENSE_ABOVE
    assert dense_threshold(4, dense_table("cuda")) == 0.90  # a B = 4 union of 85% stays sparse on the H100
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert dense_table("cuda") == DENSE_ABOVE
    assert dense_threshold(4, dense_table("cuda")) == 0.80  # and takes the dense path elsewhere


def test_sparse_mlp_dense_path_equals_sparse_path_and_refuses_a_budget():
    model = _prepared()
    mlp = sparse_modules(model)[0]
    assert mlp.w_in is not None  # the dense path's one product over the gate, up and router rows
    x = torch.randn(4, 1, tm.D)
    with torch.no_grad():
        sparse = mlp(x)
        mlp.ffn_path = "dense"
        dense = mlp(x)
        mlp.record_mask = True  # the router kernel + masked_dense_ffn path, which returns the mask it used
        recorded = mlp(x)
    torch.testing.assert_close(dense, sparse, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(recorded, sparse, atol=1e-5, rtol=1e-4)
    assert mlp.last_mask.shape == (4, 1, mlp.num_experts)
    mlp.record_mask = False
    with pytest.raises(lte.LTEError, match="budget"):
        mlp.budget = 2
    mlp.ffn_path = "sparse"
    mlp.budget = 2
    with pytest.raises(lte.LTEError, match="budget"):
        mlp.ffn_path = "dense"
    with pytest.raises(lte.LTEError, match="ffn_path"):
        mlp.ffn_path = "fast"


def test_topk_dense_path_equals_its_sparse_path():
    """Top-k routing on the dense path (gate and up in one product of `w_in`, the top-k mask applied) computes the
    sparse path's function; a wrong mask (e.g. the router rows' threshold instead of the top k) would not."""
    model = _prepared()
    mlp = sparse_modules(model)[0]
    mlp.topk = max(1, mlp.num_experts // 2)
    x = torch.randn(4, 1, tm.D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sparse = mlp(x)
        mlp.ffn_path = "dense"
        dense = mlp(x)
        mlp.topk = mlp.num_experts  # every expert on: a different function
        every = mlp(x)
    torch.testing.assert_close(dense, sparse, atol=1e-5, rtol=1e-4)
    assert (every - sparse).abs().max() > 1e-3


def test_choose_ffn_paths_follows_each_union():
    model = _prepared()
    mods = sparse_modules(model)
    num_exp = mods[0].num_experts
    with pytest.raises(lte.LTEError, match="record"):
        choose_ffn_paths(model, 1)
    full = torch.ones(1, num_exp, dtype=torch.bool)  # every expert: the dense path pays
    half = torch.zeros(1, num_exp, dtype=torch.bool)
    half[0, : num_exp // 2] = True
    mods[0].last_mask, mods[1].last_mask = full, half
    for m in mods[2:]:
        m.last_mask = full
    mods[-1].budget = 1  # a budget keeps its FFN on the sparse path
    choices = choose_ffn_paths(model, 1)
    assert [c.path for c in choices][:2] == ["dense", "sparse"]
    assert choices[-1].path == "sparse" and choices[0].union == 1.0
    assert [m.ffn_path for m in mods] == [c.path for c in choices]
    assert set_ffn_path(model, "sparse") == len(mods) and all(m.ffn_path == "sparse" for m in mods)


def test_static_decoder_auto_dispatch_keeps_the_tokens():
    ids = torch.randint(2, tm.VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
    model = _prepared()
    plain = StaticDecoder(model, 3, 32).generate_ids(ids, 6)
    auto = StaticDecoder(model, 3, 32, ffn_dispatch="auto")
    auto.prefill(ids)
    choices = auto.choose_ffn_paths()  # on CPU there is no capture: called directly
    assert len(choices) == tm.LAYERS and all(0.0 < c.union <= 1.0 for c in choices)
    assert all(m.last_mask is None and not m.record_mask for m in sparse_modules(model))
    set_ffn_path(model, "dense")  # the most different paths: every FFN dense
    assert torch.equal(auto.generate_ids(ids, 6), plain)
    with pytest.raises(lte.LTEError, match="ffn_dispatch"):
        StaticDecoder(model, 3, 32, ffn_dispatch="fastest")


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_graph_with_auto_dispatch_matches_eager(batch):
    """fp32 on the GPU: the captured step with per-FFN paths decodes the same tokens as eager sparse."""
    model = _prepared().to("cuda")
    ids = torch.randint(2, tm.VOCAB, (batch, 6), generator=torch.Generator().manual_seed(1)).cuda()
    eager = StaticDecoder(model, batch, 32, use_graph=False).generate_ids(ids, 10)
    auto = StaticDecoder(model, batch, 32, use_graph=True, ffn_dispatch="auto")
    torch.testing.assert_close(auto.generate_ids(ids, 10), eager)
    assert len(auto.ffn_paths) == tm.LAYERS
    dense = StaticDecoder(model, batch, 32, use_graph=True, ffn_dispatch="dense").generate_ids(ids, 10)
    torch.testing.assert_close(dense, eager)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masked_activation_kernel_on_gpu(dtype):
    g = torch.Generator().manual_seed(0)
    for gated, activation in ((True, "silu"), (False, "gelu"), (True, "gelu_tanh"), (False, "relu")):
        up = torch.randn(33, 1000, generator=g).to("cuda", dtype)
        gate = torch.randn(33, 1000, generator=g).to("cuda", dtype) if gated else None
        mask = (torch.rand(33, 32, generator=g) > 0.4).cuda()  # E = ceil(1000 / 32): a smaller last expert
        got = torch.ops.lte.masked_activation(gate, up, mask, 32, activation)
        ref = masked_activation_reference(gate, up, mask, 32, activation)
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
        logits = torch.randn(33, 32, generator=g).to("cuda", dtype)  # top-k ranked inside the launch
        for k in (1, 13, 32):
            got = torch.ops.lte.masked_activation_topk(gate, up, logits, k, 32, activation)
            keep = topk_keep(logits.float(), k)
            torch.testing.assert_close(got.float(), masked_activation_reference(gate, up, keep, 32, activation).float(),
                                       atol=2e-2, rtol=2e-2)
            assert not got[~expand_mask(keep, 1000, 32)].any()


@pytest.mark.gpu
@gpu
def test_topk_dense_path_on_gpu_is_the_sparse_path():
    """On the GPU the top-k dense path ranks the stacked product's logits inside the masked activation (no router
    or top-k launch); in fp32 it keeps the router kernel's experts and computes the sparse path's function, also
    replayed from a CUDA graph."""
    model = _prepared().cuda()
    mlp = sparse_modules(model)[0]
    mlp.topk = max(1, mlp.num_experts // 2)
    x = torch.randn(8, 1, tm.D, generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad():
        sparse = mlp(x)
        mlp.ffn_path = "dense"
        dense = mlp(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = mlp(x)
        graph.replay()
    torch.testing.assert_close(dense, sparse, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(replayed, dense)

"""Tests of lte.kernels: the reference, the public API and ops, the Triton kernels.

CPU: the reference against an independent per-expert computation, argument checks, the
``torch.library`` ops under ``torch.compile(fullgraph=True)``, and the Triton kernels in Triton's
interpreter (a subprocess with ``TRITON_INTERPRET=1``, which must be set before triton is imported).
GPU (``-m gpu``): the real kernels, torch.compile and CUDA-graph capture.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F_

from lte.kernels import kernels_available, num_experts, routed_sparse_ffn, router_mask, sparse_ffn
from lte.kernels.ops import reference_forced
from lte.kernels.reference import (
    apply_activation,
    expand_mask,
    logit_threshold,
    router_mask_reference,
    sparse_ffn_reference,
)
from lte.kernels.selfcheck import make_ffn

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")


def _per_expert_ffn(x, mask, w, expert_size, activation):
    """Independent reference: loop over tokens and their active experts, sum expert outputs."""
    ffn_width = w["w_up"].shape[0]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for b in range(x.shape[0]):
        for e in torch.nonzero(mask[b]).flatten().tolist():
            rows = slice(e * expert_size, min((e + 1) * expert_size, ffn_width))
            xb = x[b].double()
            up = w["w_up"][rows].double() @ xb
            if w["b_up"] is not None:
                up = up + w["b_up"][rows].double()
            if w["w_gate"] is not None:
                h = apply_activation(w["w_gate"][rows].double() @ xb, activation) * up
            else:
                h = apply_activation(up, activation)
            out[b] += h @ w["w_down_t"][rows].double()
        if w["b_down"] is not None:
            out[b] += w["b_down"].double()
    return out


@pytest.mark.parametrize("gated,with_bias,activation", [(True, False, "silu"), (True, True, "gelu_tanh"),
                                                         (False, True, "gelu"), (False, False, "relu")])
@pytest.mark.parametrize("D,F", [(72, 100), (100, 160), (33, 200)])
def test_reference_matches_per_expert_sum(gated, with_bias, activation, D, F):
    gen = torch.Generator().manual_seed(D + F)
    w = make_ffn(D, F, gated, with_bias, torch.float32, "cpu", gen)
    x = torch.randn(5, D, generator=gen)
    mask = torch.rand(5, num_experts(F, 32), generator=gen) < 0.5
    mask[0] = False  # one token with every expert off
    got = sparse_ffn_reference(x, mask, expert_size=32, activation=activation, **w)
    want = _per_expert_ffn(x, mask, w, 32, activation)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_expand_mask_smaller_last_expert():
    mask = torch.tensor([[True, False, True]])  # E=3 for F=70, S=32: last expert has 6 neurons
    neurons = expand_mask(mask, 70, 32)
    assert neurons.shape == (1, 70)
    assert neurons[0, :32].all() and not neurons[0, 32:64].any() and neurons[0, 64:].all()


def test_all_on_equals_dense_hf_style():
    gen = torch.Generator().manual_seed(1)
    w = make_ffn(40, 96, True, False, torch.float32, "cpu", gen)
    x = torch.randn(3, 40, generator=gen)
    dense = F_.linear(F_.silu(F_.linear(x, w["w_gate"])) * F_.linear(x, w["w_up"]), w["w_down_t"].t())
    mask = torch.ones(3, 3, dtype=torch.bool)
    torch.testing.assert_close(sparse_ffn_reference(x, mask, **w), dense, rtol=1e-5, atol=1e-5)


def test_router_mask_reference_and_threshold():
    gen = torch.Generator().manual_seed(2)
    x, w_router = torch.randn(6, 20, generator=gen), torch.randn(9, 20, generator=gen)
    for tau in (0.1, 0.5, 0.9):
        want = torch.sigmoid(x @ w_router.t()) > tau
        assert torch.equal(router_mask_reference(x, w_router, tau), want)
    assert router_mask_reference(x, w_router, 0.0).all()
    assert not router_mask_reference(x, w_router, 1.0).any()
    assert logit_threshold(0.5) == 0.0


def test_public_api_flattens_leading_dims_and_matches_reference():
    gen = torch.Generator().manual_seed(3)
    w = make_ffn(24, 80, True, True, torch.float32, "cpu", gen)
    x = torch.randn(2, 3, 24, generator=gen)  # [batch, seq, D]
    mask = torch.rand(2, 3, 3, generator=gen) < 0.5  # [batch, seq, E]
    y = sparse_ffn(x, mask, w["w_up"], w["w_down_t"], w_gate=w["w_gate"], b_up=w["b_up"],
                   b_down=w["b_down"], activation="gelu")
    ref = sparse_ffn_reference(x.reshape(6, 24), mask.reshape(6, 3), activation="gelu", **w)
    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(6, 24), ref)
    w_router = torch.randn(3, 24, generator=gen)
    assert torch.equal(router_mask(x, w_router, 0.3),
                       router_mask_reference(x.reshape(6, 24), w_router, 0.3).reshape(2, 3, 3))


@pytest.mark.parametrize("change,message", [
    ("mask_dtype", "bool"), ("mask_shape", "mask must have shape"), ("w_dtype", "cast the weights"),
    ("w_shape", "w_down_t must have shape"), ("non_contiguous", "contiguous"), ("activation", "unknown activation"),
    ("bias", "b_down"), ("expert_size", "expert_size"),
])
def test_bad_arguments_raise_clear_errors(change, message):
    gen = torch.Generator().manual_seed(4)
    w = make_ffn(16, 64, True, False, torch.float32, "cpu", gen)
    args = {"x": torch.randn(2, 16), "mask": torch.ones(2, 2, dtype=torch.bool), **w, "expert_size": 32,
            "activation": "silu"}
    if change == "mask_dtype":
        args["mask"] = args["mask"].float()
    elif change == "mask_shape":
        args["mask"] = torch.ones(2, 3, dtype=torch.bool)
    elif change == "w_dtype":
        args["w_up"] = args["w_up"].half()
    elif change == "w_shape":
        args["w_down_t"] = args["w_down_t"][:, :8]
    elif change == "non_contiguous":
        args["w_up"] = torch.randn(16, 64).t()
    elif change == "activation":
        args["activation"] = "tanh"
    elif change == "bias":
        args["b_down"] = torch.randn(15)
    elif change == "expert_size":
        args["expert_size"] = 0
    x, mask = args.pop("x"), args.pop("mask")
    with pytest.raises(ValueError, match=message):
        sparse_ffn(x, mask, args.pop("w_up"), args.pop("w_down_t"), **args)


def test_ops_trace_under_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(5)
    w = make_ffn(24, 80, True, False, torch.float32, "cpu", gen)
    w_router = torch.randn(3, 24, generator=gen)

    def layer(x):
        return sparse_ffn(x, router_mask(x, w_router), w["w_up"], w["w_down_t"], w_gate=w["w_gate"])

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 24, generator=gen)
    torch.testing.assert_close(compiled(x), layer(x))


def test_reference_forced_by_environment(monkeypatch):
    monkeypatch.setenv("LTE_KERNELS", "reference")
    assert reference_forced() and not kernels_available()
    monkeypatch.setenv("LTE_KERNELS", "triton")
    assert not reference_forced()


def test_import_does_not_import_triton():
    code = "import sys, lte.kernels; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow  # ~25-45 s in the Triton interpreter; CI runs it (.ci/run)
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_in_interpreter():
    """Kernels vs reference in Triton's CPU interpreter: odd shapes, B in {1,3,8,16}, 0/middle/100% off."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "lte.kernels.selfcheck", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "cases passed" in proc.stdout


def test_routed_sparse_ffn_equals_router_then_ffn():
    gen = torch.Generator().manual_seed(7)
    w = make_ffn(24, 80, True, True, torch.float32, "cpu", gen)
    w_router = torch.randn(3, 24, generator=gen)
    x = torch.randn(2, 3, 24, generator=gen)  # [batch, seq, D]
    y, mask = routed_sparse_ffn(x, w_router, w["w_up"], w["w_down_t"], tau=0.4, w_gate=w["w_gate"],
                                b_up=w["b_up"], b_down=w["b_down"], activation="gelu_tanh")
    want_mask = router_mask(x, w_router, 0.4)
    want = sparse_ffn(x, want_mask, w["w_up"], w["w_down_t"], w_gate=w["w_gate"], b_up=w["b_up"],
                      b_down=w["b_down"], activation="gelu_tanh")
    assert mask.shape == (2, 3, 3) and torch.equal(mask, want_mask)
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("change,message", [("router_rows", "w_router must have shape"),
                                            ("router_dtype", "cast the weights"), ("tau", "tau")])
def test_routed_sparse_ffn_bad_arguments(change, message):
    gen = torch.Generator().manual_seed(8)
    w = make_ffn(16, 64, True, False, torch.float32, "cpu", gen)
    w_router, tau = torch.randn(2, 16), 0.5
    if change == "router_rows":
        w_router = torch.randn(3, 16)
    elif change == "router_dtype":
        w_router = w_router.half()
    else:
        tau = 1.5
    with pytest.raises(ValueError, match=message):
        routed_sparse_ffn(torch.randn(2, 16), w_router, w["w_up"], w["w_down_t"], tau=tau, w_gate=w["w_gate"])


def test_routed_op_traces_under_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(9)
    w = make_ffn(24, 80, True, False, torch.float32, "cpu", gen)
    w_router = torch.randn(3, 24, generator=gen)

    def layer(x):
        return routed_sparse_ffn(x, w_router, w["w_up"], w["w_down_t"], w_gate=w["w_gate"])[0]

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 24, generator=gen)
    torch.testing.assert_close(compiled(x), layer(x))


ROUTED_INTERPRETER_CHECK = """
import itertools, torch
from lte.kernels.reference import logit_threshold, num_experts, router_mask_reference, sparse_ffn_reference
from lte.kernels.selfcheck import TOLERANCE, make_ffn
from lte.kernels.triton_ffn import routed_sparse_ffn_triton
gen = torch.Generator().manual_seed(0)
for (D, F, S), B, (act, gated, bias), dt in itertools.product(
        ((72, 100, 32), (33, 200, 48)), (1, 3, 16),
        (("silu", True, False), ("gelu", False, True)), (torch.float32, torch.float16)):
    w = make_ffn(D, F, gated, bias, dt, "cpu", gen)
    w_router = (torch.randn(num_experts(F, S), D, generator=gen) * D ** -0.5).to(dt)
    x = torch.randn(B, D, generator=gen).to(dt)
    for tau in (0.5, 1e-9, 1 - 1e-9):  # a middle fraction, every expert on, every expert off
        y, mask = routed_sparse_ffn_triton(x, w_router, logit_threshold(tau), w["w_up"], w["w_down_t"],
                                           w["w_gate"], w["b_up"], w["b_down"], S, act)
        logits = x.float() @ w_router.float().T
        near = (logits - logit_threshold(tau)).abs() < 1e-3
        assert not ((mask != router_mask_reference(x, w_router, tau)) & ~near).any(), (D, F, S, B, tau)
        ref = sparse_ffn_reference(x, mask, expert_size=S, activation=act, **w)
        if not mask.any():
            want = torch.zeros_like(ref) if w["b_down"] is None else w["b_down"].expand_as(ref)
            assert torch.equal(y, want), (D, F, S, B, tau)
            continue
        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err <= TOLERANCE[dt], (D, F, S, B, act, dt, tau, err)
print("routed ok")
"""


@pytest.mark.slow  # ~25-45 s in the Triton interpreter; CI runs it (.ci/run)
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_routed_kernels_in_interpreter():
    """Router-fused kernels vs reference in Triton's CPU interpreter: odd shapes, B in {1,3,16}, 0/mid/100% on."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", ROUTED_INTERPRETER_CHECK], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "routed ok" in proc.stdout


@pytest.mark.gpu
@gpu
def test_kernels_on_gpu_full_product():
    from lte.kernels.selfcheck import run_checks

    results = run_checks("cuda", (torch.float32, torch.float16, torch.bfloat16))
    failed = [f"{r.case}: {r.error:.3g}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)


def _gpu_layer(dtype=torch.bfloat16, D=256, F=1000, gated=True):
    gen = torch.Generator().manual_seed(6)
    w = make_ffn(D, F, gated, not gated, dtype, "cuda", gen)
    w_router = (torch.randn(num_experts(F, 32), D, generator=gen) * D**-0.5).to(dtype=dtype, device="cuda")
    return w, w_router


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [1, 5, 16, 40])
def test_op_on_gpu_matches_reference(num_tokens):
    w, w_router = _gpu_layer()
    x = torch.randn(num_tokens, 256, device="cuda", dtype=torch.bfloat16)
    mask = router_mask(x, w_router, 0.5)
    assert torch.equal(mask, router_mask_reference(x, w_router, 0.5)) or num_tokens > 16
    y = sparse_ffn(x, mask, w["w_up"], w["w_down_t"], w_gate=w["w_gate"])
    ref = sparse_ffn_reference(x, mask, w["w_up"], w["w_down_t"], w_gate=w["w_gate"])
    assert (y.float() - ref.float()).norm() / ref.float().norm() < 1.5e-2


@pytest.mark.gpu
@gpu
def test_torch_compile_fullgraph_on_gpu():
    w, w_router = _gpu_layer(torch.float16, gated=False)

    def layer(x):
        return sparse_ffn(x, router_mask(x, w_router), w["w_up"], w["w_down_t"], b_up=w["b_up"],
                          b_down=w["b_down"], activation="gelu")

    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 256, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


@pytest.mark.gpu
@gpu
def test_cuda_graph_capture_and_replay():
    w, w_router = _gpu_layer()
    static_x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)

    def layer(x):
        return sparse_ffn(x, router_mask(x, w_router), w["w_up"], w["w_down_t"], w_gate=w["w_gate"])

    layer(static_x)  # compile the kernels outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.testing.assert_close(static_y, layer(static_x), rtol=0, atol=0)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [1, 8])
def test_programmatic_dependent_launch_matches_plain_launch(num_tokens):
    from dataclasses import replace

    from lte.kernels.triton_ffn import default_config, sparse_ffn_triton

    w, _ = _gpu_layer(D=512, F=2000)
    x = torch.randn(num_tokens, 512, device="cuda", dtype=torch.bfloat16)
    for keep in (0.0, 0.3, 1.0):
        mask = torch.rand(num_tokens, num_experts(2000, 32), device="cuda") < keep
        args = (x, mask, w["w_up"], w["w_down_t"], w["w_gate"], None, None, 32, "silu")
        cfg = default_config(num_tokens, 512, 2000)
        with_pdl = sparse_ffn_triton(*args, replace(cfg, pdl=True))
        without = sparse_ffn_triton(*args, replace(cfg, pdl=False))
        assert torch.equal(with_pdl, without)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [1, 3, 8, 16, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_routed_op_on_gpu_matches_reference(num_tokens, dtype):
    w, w_router = _gpu_layer(dtype)
    x = torch.randn(num_tokens, 256, device="cuda", dtype=dtype)
    y, mask = routed_sparse_ffn(x, w_router, w["w_up"], w["w_down_t"], w_gate=w["w_gate"])
    logits = x.float() @ w_router.float().T
    near = logits.abs() < 1e-2  # tau 0.5: logit threshold 0
    assert not ((mask != router_mask_reference(x, w_router, 0.5)) & ~near).any()
    ref = sparse_ffn_reference(x, mask, w["w_up"], w["w_down_t"], w_gate=w["w_gate"])
    assert (y.float() - ref.float()).norm() / ref.float().norm() < 1.5e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [1, 8])
def test_routed_op_graph_replay_is_deterministic_and_pdl_neutral(num_tokens):
    from dataclasses import replace

    from lte.kernels.reference import logit_threshold
    from lte.kernels.triton_ffn import default_config, routed_sparse_ffn_triton

    w, w_router = _gpu_layer(D=512, F=2000)
    static_x = torch.randn(num_tokens, 512, device="cuda", dtype=torch.bfloat16)
    cfg = default_config(num_tokens, 512, 2000)

    def layer(x, pdl=True):
        return routed_sparse_ffn_triton(x, w_router, logit_threshold(0.5), w["w_up"], w["w_down_t"],
                                        w["w_gate"], None, None, 32, "silu", replace(cfg, pdl=pdl))

    layer(static_x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y, static_mask = layer(static_x)
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        y, mask = layer(static_x)
        y_plain, mask_plain = layer(static_x, pdl=False)
        assert torch.equal(static_mask, mask) and torch.equal(mask, mask_plain)
        assert torch.equal(static_y, y) and torch.equal(y, y_plain)

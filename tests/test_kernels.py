"""Tests of lte.kernels: the reference, the public API and ops, the Triton kernels.

CPU: the reference against an independent per-expert computation, argument checks, the
``torch.library`` ops under ``torch.compile(fullgraph=True)``, and the Triton kernels in Triton's
interpreter (a subprocess with ``TRITON_INTERPRET=1``, which must be set before triton is imported).
GPU (``-m gpu``): the real kernels, torch.compile and CUDA-graph capture.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F_

from lte.kernels import (
    FP8_DTYPE,
    decode_attention,
    dequantize_rows,
    kernels_available,
    masked_dense_ffn,
    num_experts,
    quantize_rows_fp8,
    routed_ffn_in,
    routed_masked_dense_ffn,
    routed_sparse_ffn,
    router_mask,
    router_topk_mask,
    sparse_ffn,
    sparse_ffn_out,
    stack_ffn_inputs,
    stacked_masked_dense_ffn,
    tuning,
)
from lte.kernels.ops import reference_forced
from lte.kernels.reference import (
    apply_activation,
    budget_keep,
    decode_attention_reference,
    expand_mask,
    logit_threshold,
    routed_mask_reference,
    router_mask_reference,
    router_topk_mask_reference,
    sparse_ffn_reference,
    topk_keep,
)
from lte.kernels.selfcheck import make_ffn
from lte.kernels.tuning import KernelConfig, gpu_key

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


# experts 0..4 of a 2-wide router: rows 2 and 4 repeat rows 0 and 1 (equal logits: ties)
TOPK_ROUTER = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 2.0], [0.0, 1.0]]
TOPK_TOKENS = [[2.0, 1.0], [-1.0, -1.0], [0.0, 3.0]]
# logits: token 0 (2, 1, 2, 0, 1); token 1 (-1, -1, -1, -1, -1); token 2 (0, 3, 0, 6, 3)
TOPK_BY_HAND = {  # k -> the experts each token keeps (ties: the lower index)
    1: [[0], [0], [3]],
    2: [[0, 2], [0, 1], [1, 3]],
    3: [[0, 1, 2], [0, 1, 2], [1, 3, 4]],
    4: [[0, 1, 2, 4], [0, 1, 2, 3], [0, 1, 3, 4]],
    5: [[0, 1, 2, 3, 4]] * 3,
    9: [[0, 1, 2, 3, 4]] * 3,  # k > E: every expert
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_router_topk_mask_reference_by_hand(dtype):
    x, w_router = torch.tensor(TOPK_TOKENS, dtype=dtype), torch.tensor(TOPK_ROUTER, dtype=dtype)
    for k, experts in TOPK_BY_HAND.items():
        want = [[e in on for e in range(5)] for on in experts]
        assert router_topk_mask_reference(x, w_router, k).tolist() == want, k
        assert router_topk_mask(x, w_router, k).tolist() == want, k  # the op (its CPU reference)


def test_router_topk_mask_with_a_batch_budget_by_hand():
    """k = 2 keeps {0, 2}, {0, 1}, {1, 3}: union {0, 1, 2, 3}. Summed sigmoid scores over the three
    tokens: e1 = s(1) + s(-1) + s(3) = 1.953, e3 = s(0) + s(-1) + s(6) = 1.766, e0 = e2 = s(2) + s(-1) +
    s(0) = 1.650 (a tie: the lower index first); e4 (1.953) is in no token's top 2. Each token then
    takes its top 2 among the kept: budget 2 keeps {1, 3}, which every token gets; budget 3 keeps
    {0, 1, 3}: token 0 (logits 2, 1, 0) takes {0, 1}, token 1 (all -1) {0, 1}, token 2 (0, 3, 6) {1, 3};
    budget 1 keeps {1}."""
    x, w_router = torch.tensor(TOPK_TOKENS), torch.tensor(TOPK_ROUTER)
    by_budget = {1: [[1], [1], [1]], 2: [[1, 3], [1, 3], [1, 3]], 3: [[0, 1], [0, 1], [1, 3]],
                 4: [[0, 2], [0, 1], [1, 3]], 0: [[0, 2], [0, 1], [1, 3]]}
    for budget, experts in by_budget.items():
        want = [[e in on for e in range(5)] for on in experts]
        assert router_topk_mask_reference(x, w_router, 2, budget).tolist() == want, budget
        assert router_topk_mask(x, w_router, 2, budget=budget).tolist() == want, budget
    with pytest.raises(ValueError, match="budget must be an int >= 0"):
        router_topk_mask(x, w_router, 2, budget=-1)


def test_router_topk_mask_ranks_fp32_accumulated_logits():
    """bf16 inputs whose logits differ by 2^-8: equal once rounded to bf16 (the lower index would win),
    apart in fp32 accumulation (the larger wins)."""
    x = torch.tensor([[1.0, 2.0**-8]], dtype=torch.bfloat16)
    w_router = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.bfloat16)
    assert F_.linear(x, w_router)[0, 0] == F_.linear(x, w_router)[0, 1]  # 1 + 2^-8 rounds to 1 in bf16
    assert router_topk_mask_reference(x, w_router, 1).tolist() == [[False, True]]
    assert router_topk_mask(x, w_router, 1).tolist() == [[False, True]]


def test_topk_keep_clamps_k_and_keeps_leading_dims():
    scores = torch.tensor([[[0.5, 0.5, 0.9], [0.1, 0.2, 0.3]], [[-1.0, -0.0, 0.0], [7.0, 7.0, 7.0]]])  # [2, 2, 3]
    assert topk_keep(scores, 2).tolist() == [[[True, False, True], [False, True, True]],
                                             [[False, True, True], [True, True, False]]]
    assert topk_keep(scores, 1).tolist() == [[[False, False, True], [False, False, True]],
                                             [[False, True, False], [True, False, False]]]  # -0.0 == 0.0: a tie
    assert topk_keep(scores, 4).all() and topk_keep(scores, 3).all()
    assert not topk_keep(scores, 0).any() and not topk_keep(scores, -2).any()
    assert topk_keep(torch.zeros(0, 3), 2).shape == (0, 3)


def test_router_topk_mask_flattens_leading_dims_and_checks_arguments():
    gen = torch.Generator().manual_seed(11)
    x, w_router = torch.randn(2, 3, 24, generator=gen), torch.randn(7, 24, generator=gen)
    got = router_topk_mask(x, w_router, 3)
    assert got.shape == (2, 3, 7) and got.dtype == torch.bool and (got.sum(-1) == 3).all()
    assert torch.equal(got, router_topk_mask_reference(x.reshape(6, 24), w_router, 3).reshape(2, 3, 7))
    assert router_topk_mask(x[:0], w_router, 3).shape == (0, 3, 7)
    for bad_x, bad_w, k, message in [
        (x.long(), w_router, 3, "x must be float16, bfloat16 or float32"),
        (x, w_router[:, :8], 3, "w_router must have shape"),
        (x, w_router.half(), 3, "cast the weights"),
        (x, torch.randn(24, 7).t(), 3, "contiguous"),
        (x, w_router, 0, "k must be an int >= 1"),
        (x, w_router, 2.0, "k must be an int >= 1"),
        (x, w_router, True, "k must be an int >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            router_topk_mask(bad_x, bad_w, k)


def test_router_topk_op_fake_passes_opcheck_and_traces_under_compile():
    gen = torch.Generator().manual_seed(12)
    x, w_router = torch.randn(4, 24, generator=gen), torch.randn(9, 24, generator=gen)
    torch.library.opcheck(torch.ops.lte.router_topk_mask.default, (x, w_router, 3, 4),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    w = make_ffn(24, 9 * 32, True, False, torch.float32, "cpu", gen)

    def layer(x):
        return sparse_ffn(x, router_topk_mask(x, w_router, 3), w["w_up"], w["w_down_t"], w_gate=w["w_gate"])

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_router_tiles_suit_tl_dot_for_any_width():
    """On the GPU tl.dot needs tiles of at least 16 a side (the interpreter does not check): a model
    width of 8 once compiled BLOCK_K = 8 on the dot path and failed only on the H100."""
    from lte.kernels.triton_ffn import router_blocks
    from lte.kernels.tuning import KernelConfig

    dot16 = KernelConfig(router_block_e=16, router_block_k=32)
    assert router_blocks(40, 8, dot16) == (True, 64, 16, 16)  # D = 8 < 16: the tile is padded to 16
    assert router_blocks(40, 67, dot16) == (True, 64, 16, 32)
    assert router_blocks(5, 8, dot16) == (False, 8, 16, 8)  # B <= 8: broadcast path, no tl.dot
    for cfg in (dot16, KernelConfig(router_block_e=4, router_block_k=32), KernelConfig(router_block_e=64)):
        for num_tokens in (1, 5, 9, 16, 40, 64):
            for width in (1, 5, 8, 15, 16, 67, 4096):
                use_dot, b_pad, block_e, block_k = router_blocks(num_tokens, width, cfg)
                assert b_pad >= num_tokens and block_k & (block_k - 1) == 0
                if use_dot:
                    assert min(b_pad, block_e, block_k) >= 16


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
@pytest.mark.parametrize("parts", [["ffn"], ["router", "routed", "split", "act", "fp8"],
                                   ["--small-experts", "ffn", "routed", "act", "fp8"], ["topk", "attn"]])
def test_triton_kernels_in_interpreter(parts):
    """Kernels vs reference in Triton's CPU interpreter: odd shapes, B in {1,5,40}, 0/middle/100% off,
    default and persistent settings, router (+ budget) + FFN, fp8 weights with row scales; experts of
    4, 8 and 16 neurons too; top-k routing's mask (router logits + top-k kernels: E in {1, 5, 37, 130},
    D in {8, 67}, k in {1, middle, E, E + 3}, fp32 / fp16 / bf16, constructed ties, +-inf and +-0.0
    logits), which must equal the reference exactly (``selfcheck.check_topk_case``)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    flags = [p for p in parts if p.startswith("--")]
    parts = [p for p in parts if not p.startswith("--")]
    proc = subprocess.run([sys.executable, "-m", "lte.kernels.selfcheck", "--device", "cpu", *flags, "--parts", *parts],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "cases passed" in proc.stdout


def _compile_sm90(*flags: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """tests/compile_sm90.py in a subprocess (triton in compiled mode, not the interpreter): the process and its
    "ok ..." / "FAIL ..." lines."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_sm90.py")), *flags],
                          capture_output=True, text=True, timeout=900, env=env)
    return proc, [line for line in proc.stdout.splitlines() if line.startswith(("ok ", "FAIL "))]


def test_selfcheck_reports_a_raising_case_and_goes_on(monkeypatch):
    """A case whose launch raises (as the GPU's shared-memory limit did on 2026-12-07, which stopped the whole
    selfcheck) becomes a failed case carrying the error; the cases after it still run."""
    from lte.kernels import selfcheck

    calls = []

    def router_case(D, E, B, dtype, device, gen):
        calls.append(B)
        if B == 1:
            raise RuntimeError("out of resource: shared memory")
        return selfcheck.CaseResult(f"router B={B}", 0.0, True)

    monkeypatch.setattr(selfcheck, "check_router_case", router_case)
    results = selfcheck.run_checks("cpu", (torch.float32,), parts=("router",), shapes=selfcheck.SHAPES[:1])
    failed = [r for r in results if not r.ok]
    assert len(results) == len(calls) > 1 and len(failed) == calls.count(1) >= 1
    assert all("RuntimeError: out of resource: shared memory" in r.case and r.error == float("inf") for r in failed)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_tiles_past_the_gpus_shared_memory_get_a_clear_error(monkeypatch):
    """A KernelConfig whose tiles this GPU cannot hold (Triton's OutOfResources at launch, as B = 1 tiles used at
    B = 40 in fp32 on the H100) becomes a ValueError naming the kernel, the batch, the dtype and the settings to
    lower, with Triton's error as its cause. The interpreter has no shared memory, so the launch is replaced."""
    from triton.runtime.errors import OutOfResources

    from lte.kernels import triton_ffn

    class TooLarge:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(393216, 232448, "shared memory")
            return launch

    gen = torch.Generator().manual_seed(0)
    w = make_ffn(100, 160, True, False, torch.float32, "cpu", gen)
    x = torch.randn(40, 100, generator=gen)  # [B, D]
    mask = torch.ones(40, 5, dtype=torch.bool)  # [B, E]
    monkeypatch.setattr(triton_ffn, "_ffn_in_kernel", TooLarge())
    with pytest.raises(ValueError, match=r"gate/up kernel.*B=40 tokens, torch.float32.*in_block_k") as err:
        triton_ffn.launch_in(triton_ffn.plan_launch(x, mask, w["w_up"], w["w_down_t"], w["w_gate"], None, None, 32,
                                                    "silu", KernelConfig(in_block_k=1024)))
    assert isinstance(err.value.__cause__, OutOfResources)


@pytest.mark.skipif(not HAS_TRITON or importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="needs triton with its CUDA backend (ptxas)")
def test_selfcheck_settings_fit_hopper_shared_memory():
    """Every setting the selfcheck (and so the GPU tests' full product) runs fits sm_90's shared memory at its
    largest batch in fp32, planned as the kernels plan it. On 2026-12-07 fixed B = 1 tiles used at B = 40 in fp32
    compiled and then failed at launch on the H100 (384 KB asked for); compile_sm90 now fails such a variant."""
    proc, lines = _compile_sm90("--selfcheck")
    from lte.kernels.selfcheck import CONFIGS

    assert proc.returncode == 0 and len(lines) == 2 * len(CONFIGS), proc.stdout[-4000:] + proc.stderr[-4000:]
    shared = [int(line.rsplit("smem=", 1)[1]) for line in lines]
    assert max(shared) <= 232448 and min(shared) > 0


@pytest.mark.skipif(not HAS_TRITON or importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="needs triton with its CUDA backend (ptxas)")
def test_kernels_compile_for_hopper_and_the_list_drops_the_prefix_sum():
    """The gate/up, down and compaction kernels compile to sm_90 cubins without a GPU (tests/compile_sm90.py, in a
    subprocess: triton in compiled mode), B = 1 and tl.dot shapes, with and without `active_list`; with the list
    each program's code is shorter (no prefix sum over the union's flags, no search for its expert)."""
    proc, lines = _compile_sm90()
    assert proc.returncode == 0 and len(lines) == 21, proc.stdout[-4000:] + proc.stderr[-4000:]
    counts = {line[3:].split(" | ")[0]: int(re.search(r"ptx=(\d+)", line)[1]) for line in lines}
    for name, count in counts.items():
        if "list=True" in name:
            assert count < counts[name.replace("list=True", "list=False")], name


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON or importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="needs triton with its CUDA backend (ptxas)")
def test_every_selfcheck_launch_fits_hopper():
    """`compile_sm90.py --selfcheck-all`: each selfcheck setting at each of its batch sizes, in fp32, fp16 and bf16,
    gated and plain, compiles for sm_90 within its shared memory (about a minute)."""
    proc, lines = _compile_sm90("--selfcheck-all")
    from lte.kernels.selfcheck import BATCHES, CONFIGS

    assert proc.returncode == 0 and len(lines) == 2 * len(CONFIGS) * len(BATCHES) * 3 * 2, proc.stdout[-4000:]


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


@pytest.mark.parametrize("gated,with_bias,activation", [(True, False, "silu"), (False, True, "relu")])
def test_routed_masked_dense_ffn_is_masked_dense_of_the_router_mask(gated, with_bias, activation):
    """The prefill path (router logits thresholded inside the masked activation) equals masked_dense_ffn
    with router_mask's mask, and the sparse FFN; logits kept away from the threshold."""
    gen = torch.Generator().manual_seed(13)
    w = make_ffn(24, 80, gated, with_bias, torch.float32, "cpu", gen)
    x = torch.randn(2, 7, 24, generator=gen)
    w_router = torch.randn(3, 24, generator=gen)
    w_router[0] = 0.0  # expert 0: logit 0 < log(0.3 / 0.7) is false: always on at tau 0.3
    mask = router_mask(x, w_router, 0.3)
    assert mask[..., 0].all() and 0 < mask.float().mean() < 1
    args = dict(w_gate=w["w_gate"], b_up=w["b_up"], b_down=w["b_down"], activation=activation)
    y = routed_masked_dense_ffn(x, w_router, w["w_up"], w["w_down_t"], tau=0.3, **args)
    torch.testing.assert_close(y, masked_dense_ffn(x, mask, w["w_up"], w["w_down_t"], **args))
    torch.testing.assert_close(y, sparse_ffn(x, mask, w["w_up"], w["w_down_t"], **args), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="w_router must have shape"):
        routed_masked_dense_ffn(x, w_router[:2], w["w_up"], w["w_down_t"], **args)
    torch.library.opcheck(torch.ops.lte.masked_activation_logits.default,
                          (None if not gated else torch.randn(4, 80), torch.randn(4, 80), torch.randn(4, 3), 0.4, 32,
                           activation))


def test_decode_attention_by_hand_and_its_checks():
    """One KV head, two query heads, d = 2, three slots: keys [1, 0], [0, 1], [1, 1], values 1, 2, 4 (each
    [v, -v]), scale 1, slot 2 left out. Query [1, 0] scores 1, 0: weights e / (e + 1), 1 / (e + 1), output
    (2 + e) / (1 + e). Query [0, 0] scores 0, 0: output 1.5. With every slot kept the first query adds e^1 x 4."""
    e = math.e
    q = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # [B=1, Hkv=1, G=2, d=2]
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]])  # [1, 1, L=3, 2]
    v = torch.tensor([[[[1.0, -1.0], [2.0, -2.0], [4.0, -4.0]]]])
    keep = torch.tensor([[True, True, False]])
    out = decode_attention(q, k, v, keep, scale=1.0)
    first = (e + 2.0) / (e + 1.0)
    torch.testing.assert_close(out, torch.tensor([[[[first, -first], [1.5, -1.5]]]]))
    every = (e + 2.0 + 4.0 * e) / (e + 1.0 + e)
    torch.testing.assert_close(decode_attention(q, k, v, scale=1.0)[0, 0, 0], torch.tensor([every, -every]))
    assert torch.equal(decode_attention(q, k, v, torch.zeros(1, 3, dtype=torch.bool)), torch.zeros_like(q))
    with pytest.raises(ValueError, match="keep must be a bool"):
        decode_attention(q, k, v, keep.float())
    with pytest.raises(ValueError, match="must match q"):
        decode_attention(q, k[..., :1], v[..., :1])
    torch.library.opcheck(torch.ops.lte.decode_attention.default, (q, k, v, keep, 1.0))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_decode_attention_split_plan_by_hand():
    """B x Hkv x slices near two waves of 132 SMs, whole 64-slot tiles per slice: B = 1 with 8 KV heads over 512
    slots wants 33 slices and gets all 8 tiles; B = 32 (256 programs) wants 2 slices of 4 tiles; a cache of 100
    slots has 2 tiles; one slot, one slice."""
    from lte.kernels.triton_attention import split_plan

    assert split_plan(8, 512, 132) == (8, 64)
    assert split_plan(256, 512, 132) == (2, 256)
    assert split_plan(8, 100, 132) == (2, 64)
    assert split_plan(2, 1, 132) == (1, 64)
    assert split_plan(80, 1000, 132, block_l=32) == (4, 256)  # 32 tiles of 32 slots (the last partial) in 4 slices


def test_stacked_masked_dense_ffn_by_hand():
    """Gate, up and router rows in one matrix: x = [1, 2], one-neuron experts, ReLU. gate = [1, 2], up = [-1, 2],
    router logits [1, -1] (tau 0.5: expert 0 on, expert 1 off), h = [relu(1) * -1, 0], y = -1 * [1, 1]; with
    both experts on the second neuron adds relu(2) * 2 * [5, 5]. (Gate and up read the other way round would
    give relu(-1) * 1 = 0 for the first neuron.)"""
    w_in = torch.tensor([[1.0, 0.0], [0.0, 1.0],  # W_gate
                         [-1.0, 0.0], [2.0, 0.0],  # W_up
                         [1.0, 0.0], [-1.0, 0.0]])  # W_router
    w_down_t = torch.tensor([[1.0, 1.0], [5.0, 5.0]])
    x = torch.tensor([[1.0, 2.0]])
    y = stacked_masked_dense_ffn(x, w_in, w_down_t, tau=0.5, expert_size=1, activation="relu")
    assert torch.equal(y, torch.tensor([[-1.0, -1.0]]))
    y_bias = stacked_masked_dense_ffn(x[0], w_in, w_down_t, tau=0.5, b_down=torch.tensor([0.5, -1.0]),
                                      expert_size=1, activation="relu")
    assert torch.equal(y_bias, torch.tensor([-0.5, -2.0]))  # a single token [D] keeps its shape
    w_in[5] = 1.0  # expert 1's router row: logit 1, on
    assert torch.equal(stacked_masked_dense_ffn(x, w_in, w_down_t, expert_size=1, activation="relu"),
                       torch.tensor([[19.0, 19.0]]))
    # a mask from elsewhere (top-k routing) replaces the router rows' logits: expert 0 off, 1 on gives only the
    # second neuron, relu(2) * 2 * [5, 5]; the router rows are not read
    w_in[4:] = float("nan")
    y_mask = stacked_masked_dense_ffn(x, w_in, w_down_t, mask=torch.tensor([[False, True]]), expert_size=1,
                                      activation="relu")
    assert torch.equal(y_mask, torch.tensor([[20.0, 20.0]]))


def test_stacked_masked_dense_ffn_in_topk_routing_by_hand():
    """Top-k routing ranked inside the masked activation: x = [1, 2], three one-neuron experts, ReLU. gate = [1, 2,
    3], up = [1, 1, 1], router logits [1, 2, 2] (experts 1 and 2 tie). k = 1 keeps expert 1 (the tie goes to the
    lower index): y = 2 * [0, 1]; k = 2 adds expert 2's 3 * [10, 10]; k = 3 adds expert 0's [1, 0]. (A threshold
    at tau 0.5 would keep all three; ties to the higher index would give 3 * [10, 10] at k = 1.)"""
    w_in = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0],  # W_gate
                         [1.0, 0.0], [1.0, 0.0], [1.0, 0.0],  # W_up
                         [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # W_router
    w_down_t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    x = torch.tensor([[1.0, 2.0]])
    want = {1: [[0.0, 2.0]], 2: [[30.0, 32.0]], 3: [[31.0, 32.0]], 7: [[31.0, 32.0]]}
    for k, y in want.items():
        got = stacked_masked_dense_ffn(x, w_in, w_down_t, topk=k, expert_size=1, activation="relu")
        assert torch.equal(got, torch.tensor(y)), k
    with pytest.raises(ValueError, match="topk must be an int >= 0"):
        stacked_masked_dense_ffn(x, w_in, w_down_t, topk=-1, expert_size=1)
    with pytest.raises(ValueError, match="a mask or topk"):
        stacked_masked_dense_ffn(x, w_in, w_down_t, topk=1, mask=torch.tensor([[True, True, True]]), expert_size=1)
    torch.library.opcheck(torch.ops.lte.masked_activation_topk.default,
                          (torch.randn(4, 80), torch.randn(4, 80), torch.randn(4, 3), 2, 32, "silu"))


def test_stacked_masked_dense_ffn_equals_the_separate_matrices_and_checks_its_rows():
    gen = torch.Generator().manual_seed(17)
    w = make_ffn(24, 80, True, False, torch.float32, "cpu", gen)
    w_router = torch.randn(3, 24, generator=gen)
    x = torch.randn(2, 5, 24, generator=gen)
    w_in = torch.cat([w["w_gate"], w["w_up"], w_router])  # [2F + E, D] = [163, 24]
    y = stacked_masked_dense_ffn(x, w_in, w["w_down_t"], tau=0.4, b_down=w["b_down"], activation="gelu_tanh")
    want = routed_masked_dense_ffn(x, w_router, w["w_up"], w["w_down_t"], tau=0.4, w_gate=w["w_gate"],
                                   b_down=w["b_down"], activation="gelu_tanh")
    torch.testing.assert_close(y, want)
    mask = torch.rand(2, 5, 3, generator=gen) < 0.5  # [..., E]
    torch.testing.assert_close(stacked_masked_dense_ffn(x, w_in, w["w_down_t"], mask=mask, b_down=w["b_down"]),
                               masked_dense_ffn(x, mask, w["w_up"], w["w_down_t"], w_gate=w["w_gate"],
                                                b_down=w["b_down"]))
    with pytest.raises(ValueError, match="mask"):
        stacked_masked_dense_ffn(x, w_in, w["w_down_t"], mask=mask[..., :2])
    with pytest.raises(ValueError, match=r"w_in must hold the gate, up and router rows: \[2F \+ E, D\] = \[163"):
        stacked_masked_dense_ffn(x, w_in[:-1], w["w_down_t"])
    with pytest.raises(ValueError, match="tau"):
        stacked_masked_dense_ffn(x, w_in, w["w_down_t"], tau=1.5)
    assert torch.equal(stack_ffn_inputs(w["w_gate"], w["w_up"], w_router), w_in)  # [163, 24], rows in that order
    with pytest.raises(ValueError, match=r"w_in must hold the gate, up and router rows"):
        stacked_masked_dense_ffn(x, torch.cat([w_in, torch.zeros(93, 24)]), w["w_down_t"])  # zero rows: refused
    with pytest.raises(ValueError, match="W_gate and W_up must both be"):
        stack_ffn_inputs(w["w_gate"][:-1], w["w_up"], w_router)


def test_quantize_rows_fp8_by_hand():
    """Row scale = max |w| / 448; values that are e4m3 numbers after scaling come back exactly."""
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.75, -1.5, 6.0]])
    q, s = quantize_rows_fp8(w)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32
    torch.testing.assert_close(s, torch.tensor([2.0 / 448, 1.0, 6.0 / 448]), rtol=0, atol=0)
    assert q[0].float().tolist() == [224.0, -448.0, 112.0, 0.0]  # 1.75 x 2^7, -1.75 x 2^8, 1.75 x 2^6
    assert q[2].float().tolist() == [224.0, 56.0, -112.0, 448.0]
    assert not q[1].float().any()  # a zero row: scale 1, all zeros
    torch.testing.assert_close(dequantize_rows(q, s), w, rtol=0, atol=1e-7)
    # 1.1 is not an e4m3 number: the nearest one at that scale (1.125 = 1 + 1/8) comes back
    q2, s2 = quantize_rows_fp8(torch.tensor([[448.0, 1.1]]))
    assert s2.item() == 1.0 and q2.float().tolist() == [[448.0, 1.125]]
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_rows_fp8(torch.tensor([[1.0, float("nan")]]))


def _fp8_layer(gated=True, with_bias=False, D=24, F=80, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(11)
    w = make_ffn(D, F, gated, with_bias, dtype, device, gen)
    q = {k: quantize_rows_fp8(w[k]) if w[k] is not None else (None, None) for k in ("w_up", "w_gate", "w_down_t")}
    scales = (q["w_up"][1], q["w_gate"][1], q["w_down_t"][1])
    wq = dict(w, **{k: q[k][0] for k in q})
    w_router = (torch.randn(num_experts(F, 32), D, generator=gen) * 2 * D**-0.5).to(dtype=dtype, device=device)
    return w, wq, scales, w_router


@pytest.mark.parametrize("gated,with_bias,activation", [(True, False, "silu"), (False, True, "gelu")])
def test_fp8_routed_sparse_ffn_equals_the_dequantized_weights(gated, with_bias, activation):
    """The fp8 op is the FFN of the dequantized weights (same router mask), and close to the bf16/fp32 FFN."""
    w, wq, scales, w_router = _fp8_layer(gated, with_bias)
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(12))
    y, mask = routed_sparse_ffn(x, w_router, wq["w_up"], wq["w_down_t"], w_gate=wq["w_gate"], b_up=wq["b_up"],
                                b_down=wq["b_down"], activation=activation, scales=scales)
    deq = {k: None if wq[k] is None else dequantize_rows(wq[k], s) for k, s in
           zip(("w_up", "w_gate", "w_down_t"), scales)}
    y_deq, mask_deq = routed_sparse_ffn(x, w_router, deq["w_up"], deq["w_down_t"], w_gate=deq["w_gate"],
                                        b_up=w["b_up"], b_down=w["b_down"], activation=activation)
    assert torch.equal(mask, mask_deq) and 0 < mask.float().mean() < 1
    torch.testing.assert_close(y, y_deq, rtol=1e-5, atol=1e-6)
    y_full, _ = routed_sparse_ffn(x, w_router, w["w_up"], w["w_down_t"], w_gate=w["w_gate"], b_up=w["b_up"],
                                  b_down=w["b_down"], activation=activation)
    assert 0 < _rel_err(y, y_full) < 0.08  # e4m3 keeps 3 mantissa bits: a few percent, not more


@pytest.mark.parametrize("change,message", [
    ("weights_not_fp8", "must be torch.float8_e4m3fn"), ("scale_shape", "s_down must be a contiguous fp32"),
    ("scale_dtype", "s_up must be a contiguous fp32"), ("no_gate_scale", "s_gate must be given exactly"),
    ("not_a_triple", "scales must be a tuple"),
])
def test_fp8_bad_arguments_say_what_to_do(change, message):
    w, wq, scales, w_router = _fp8_layer()
    x = torch.randn(3, 24)
    if change == "weights_not_fp8":
        wq = w
    elif change == "scale_shape":
        scales = (scales[0], scales[1], scales[2][:-1])
    elif change == "scale_dtype":
        scales = (scales[0].double(), scales[1], scales[2])
    elif change == "no_gate_scale":
        scales = (scales[0], None, scales[2])
    else:
        scales = list(scales)
    with pytest.raises(ValueError, match=message):
        routed_sparse_ffn(x, w_router, wq["w_up"], wq["w_down_t"], w_gate=wq["w_gate"], scales=scales)


def test_fp8_op_fake_and_schema_pass_opcheck():
    """torch.library.opcheck: the fake (meta) implementation and the autograd registration of the fp8 op
    (its schema check perturbs the inputs with arithmetic that fp8 tensors do not have on a CPU)."""
    _, wq, scales, w_router = _fp8_layer()
    x = torch.randn(4, 24)
    args = (x, w_router, 0.5, wq["w_up"], wq["w_down_t"], wq["w_gate"], None, None, scales[0], scales[2], scales[1],
            32, "silu", 0)
    torch.library.opcheck(torch.ops.lte.routed_sparse_ffn_fp8.default, args,
                          test_utils=("test_faketensor", "test_autograd_registration"))


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


def test_budget_keep_picks_top_summed_scores_among_the_union():
    logits = torch.tensor([[3.0, -4.0, 0.5, 2.0, -1.0],
                           [1.0, -4.0, 0.4, -3.0, 0.2]])  # [B=2, E=5]
    mask = logits > 0  # union: experts 0, 2, 3, 4 (expert 1 is off for every token)
    score = torch.sigmoid(logits).sum(0)  # expert 1 has a score but is not in the union
    keep = budget_keep(mask, logits, 2)
    assert keep.tolist() == [True, False, True, False, False]
    assert budget_keep(mask, logits, 0).tolist() == mask.any(0).tolist()  # 0 = no budget
    assert budget_keep(mask, logits, 9).tolist() == mask.any(0).tolist()  # budget above the union
    assert int(budget_keep(mask, logits, 3).sum()) == 3 and score[1] > 0


def test_budget_ties_go_to_the_lower_index():
    logits = torch.zeros(3, 6)  # every score equal
    mask = torch.ones(3, 6, dtype=torch.bool)
    assert budget_keep(mask, logits, 4).tolist() == [True] * 4 + [False] * 2


def test_routed_sparse_ffn_budget_bounds_the_union():
    gen = torch.Generator().manual_seed(10)
    w = make_ffn(24, 200, True, False, torch.float32, "cpu", gen)  # E = 7
    w_router = torch.randn(7, 24, generator=gen)
    x = torch.randn(6, 24, generator=gen)
    free_y, free_mask = routed_sparse_ffn(x, w_router, w["w_up"], w["w_down_t"], w_gate=w["w_gate"])
    assert int(free_mask.any(0).sum()) > 3, "the test needs a union larger than the budget"
    y, mask = routed_sparse_ffn(x, w_router, w["w_up"], w["w_down_t"], w_gate=w["w_gate"], budget=3)
    assert int(mask.any(0).sum()) == 3 and not (mask & ~free_mask).any()
    assert torch.equal(mask, routed_mask_reference(x, w_router, 0.5, 3))
    torch.testing.assert_close(y, sparse_ffn(x, mask, w["w_up"], w["w_down_t"], w_gate=w["w_gate"]))
    with pytest.raises(ValueError, match="budget"):
        routed_sparse_ffn(x, w_router, w["w_up"], w["w_down_t"], w_gate=w["w_gate"], budget=-1)


def test_ffn_halves_equal_the_plain_ffn():
    gen = torch.Generator().manual_seed(11)
    w = make_ffn(24, 150, False, True, torch.float32, "cpu", gen)  # E = 5, last expert 22 neurons
    w_router = torch.randn(5, 24, generator=gen)
    x = torch.randn(2, 3, 24, generator=gen)  # [batch, seq, D]
    for budget in (0, 2):
        z, mask, union = routed_ffn_in(x, w_router, w["w_up"], b_up=w["b_up"], tau=0.45, budget=budget)
        assert z.shape == (2, 3, 150) and mask.shape == (2, 3, 5) and union.dtype == torch.int8
        assert torch.equal(union.bool(), mask.reshape(-1, 5).any(0))
        y = sparse_ffn_out(F_.gelu(z), mask, union, w["w_down_t"], b_down=w["b_down"])
        want = sparse_ffn(x, mask, w["w_up"], w["w_down_t"], b_up=w["b_up"], b_down=w["b_down"], activation="gelu")
        torch.testing.assert_close(y, want)
    compiled = torch.compile(lambda t: sparse_ffn_out(F_.relu(routed_ffn_in(t, w_router, w["w_up"])[0]),
                                                      *routed_ffn_in(t, w_router, w["w_up"])[1:], w["w_down_t"]),
                             fullgraph=True, backend="aot_eager")
    x2 = torch.randn(4, 24, generator=gen)
    z, mask, union = routed_ffn_in(x2, w_router, w["w_up"])
    torch.testing.assert_close(compiled(x2), sparse_ffn_out(F_.relu(z), mask, union, w["w_down_t"]))
    with pytest.raises(ValueError, match="union must be int8"):
        sparse_ffn_out(z, mask, union.bool(), w["w_down_t"])
    with pytest.raises(ValueError, match="mask must be bool"):
        sparse_ffn_out(z, mask.float(), union, w["w_down_t"])


# --------------------------------------------------------------------------- the config table
def test_gpu_key_names():
    assert gpu_key("NVIDIA H200") == "h200"
    assert gpu_key("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_key("NVIDIA GH200 480GB") == "gh200"
    assert gpu_key("Some Future GPU") == "some-future-gpu"


def test_config_table_lookup_and_precedence(tmp_path, monkeypatch):
    tuning.clear_tables()
    assert tuning.lookup("gpu-x", 4096, 11008, 8) is None  # a GPU no table knows
    shipped = tuning.SHIPPED["h200"]["4096x14336"]["8"]
    assert tuning.lookup("h200", 4096, 14336, 8) == tuning.KernelConfig.from_dict(shipped)  # the shipped table
    table = {"gpu-x": {"4096x11008": {"1": {"in_block_f": 4}, "8": {"in_block_f": 32, "out_split": 16},
                                     "64": {"in_block_f": 16, "out_split": 4}}}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"table": table, "env": {"gpu": "GPU X"}}))
    monkeypatch.setenv(tuning.CONFIGS_ENV, str(path))
    tuning.lookup.cache_clear()
    assert tuning.lookup("gpu-x", 4096, 11008, 1).in_block_f == 4
    assert tuning.lookup("gpu-x", 4096, 11008, 5).out_split == 16  # smallest tuned B >= 5
    assert tuning.lookup("gpu-x", 4096, 11008, 40).out_split == 4
    assert tuning.lookup("gpu-x", 4096, 11008, 100).out_split == 4  # above every row: the largest
    assert tuning.lookup("h100", 4096, 11008, 8) is None
    assert tuning.lookup("gpu-x", 4096, 11008, 8, expert_size=16).out_split == 16  # no s16 rows: the 32-neuron row
    assert tuning.shape_key(4096, 11008) == "4096x11008" and tuning.shape_key(4096, 11008, 16) == "4096x11008/s16"
    other = tmp_path / "u.json"
    other.write_text(json.dumps({"gpu-x": {"4096x11008": {"64": {"in_block_f": 8}}}}))
    tuning.load_table(other)  # newest table wins
    assert tuning.lookup("gpu-x", 4096, 11008, 1).in_block_f == 8
    fine = tmp_path / "s16.json"
    fine.write_text(json.dumps({"gpu-x": {"4096x11008/s16": {"8": {"out_split": 2}}}}))
    tuning.load_table(fine)  # a table for 16-neuron experts only: the 32-neuron rows stay as they were
    assert tuning.lookup("gpu-x", 4096, 11008, 8, expert_size=16).out_split == 2  # its own row, over every 32 one
    assert tuning.lookup("gpu-x", 4096, 11008, 8).in_block_f == 8
    assert tuning.lookup("gpu-x", 4096, 11008, 8, expert_size=8).in_block_f == 8  # no s8 rows: the 32-neuron row
    assert tuning.lookup("gpu-x", 4096, 11008, 4, expert_size=16).out_split == 2  # B = 8 row serves B = 4
    # B = 32 is above the s16 rows: the 32-neuron row at that batch, not the s16 B = 8 tiles
    assert tuning.lookup("gpu-x", 4096, 11008, 32, expert_size=16).in_block_f == 8
    tuning.clear_tables()
    monkeypatch.delenv(tuning.CONFIGS_ENV)
    tuning.lookup.cache_clear()


def test_config_table_errors_and_rendering(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"h200": {"4096x11008": {"1": {"no_such_tile": 3}}}}))
    with pytest.raises(ValueError, match="no_such_tile"):
        tuning.load_table(bad)
    with pytest.raises(FileNotFoundError):
        tuning.load_table(tmp_path / "missing.json")
    table = {"h100": {"64x200": {"2": {"in_block_f": 16, "pdl": False, "out_warps": 4}, "16": {"in_warps": 8}}},
             "h200": {"64x200": {"1": {}}}}
    namespace: dict = {}
    exec("from typing import Any\n" + tuning.render_shipped(table), namespace)
    # out_warps 4 is KernelConfig's default: left out, the same config
    assert namespace["SHIPPED"] == {"h100": {"64x200": {"2": {"in_block_f": 16, "pdl": False}, "16": {"in_warps": 8}}},
                                    "h200": {"64x200": {"1": {}}}}
    assert tuning.KernelConfig.from_dict(namespace["SHIPPED"]["h100"]["64x200"]["2"]) == \
        tuning.KernelConfig.from_dict(table["h100"]["64x200"]["2"])


def test_heuristic_config_depends_on_shape_and_tokens():
    one = tuning.heuristic_config(1, 4096, 11008)
    many = tuning.heuristic_config(64, 4096, 11008)
    assert one.in_block_f < many.in_block_f and many.out_split < one.out_split
    assert tuning.heuristic_config(8, 1024, 4096).out_split >= tuning.heuristic_config(8, 8192, 4096).out_split


@pytest.mark.gpu
@pytest.mark.slow
@gpu
def test_kernels_on_gpu_full_product():
    """The whole selfcheck on the GPU (slow: every case compiles its own kernel variants)."""
    from lte.kernels.selfcheck import run_checks

    results = run_checks("cuda", (torch.float32, torch.float16, torch.bfloat16))
    failed = [f"{r.case}: {r.error:.3g}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(72, 100, 32), (33, 200, 48)])
def test_kernels_on_gpu_odd_shapes(shape, dtype):
    """Kernels vs reference on the GPU: odd D and S, a smaller last expert, B = 1 / 3 / 40, gated and
    plain with biases, default and persistent grids, 0% / middle / 100% of experts off."""
    from lte.kernels.selfcheck import CONFIGS, FFN_KINDS, check_ffn_case

    D, F, S = shape
    gen = torch.Generator().manual_seed(D)
    failed = []
    for B, kind, config in zip((1, 3, 40, 40), (FFN_KINDS[0], FFN_KINDS[2], FFN_KINDS[1], FFN_KINDS[3]),
                               (CONFIGS[0], CONFIGS[1], CONFIGS[0], CONFIGS[1])):
        for sparsity in ("none", "random", "all"):
            r = check_ffn_case(D, F, S, B, sparsity, kind, dtype, "cuda", gen, config)
            if not r.ok:
                failed.append(f"{r.case}: {r.error:.3g}")
    assert not failed, "\n".join(failed)


def _gpu_layer(dtype=torch.bfloat16, D=256, F=1000, gated=True):
    gen = torch.Generator().manual_seed(6)
    w = make_ffn(D, F, gated, not gated, dtype, "cuda", gen)
    w_router = (torch.randn(num_experts(F, 32), D, generator=gen) * D**-0.5).to(dtype=dtype, device="cuda")
    return w, w_router


def _rel_err(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [1, 5, 16, 40, 64, 80])
def test_op_on_gpu_matches_reference(num_tokens):
    w, w_router = _gpu_layer()
    x = torch.randn(num_tokens, 256, device="cuda", dtype=torch.bfloat16)
    mask = router_mask(x, w_router, 0.5)
    near = (x.float() @ w_router.float().T).abs() < 1e-2
    assert not ((mask != router_mask_reference(x, w_router, 0.5)) & ~near).any()
    y = sparse_ffn(x, mask, w["w_up"], w["w_down_t"], w_gate=w["w_gate"])
    ref = sparse_ffn_reference(x, mask, w["w_up"], w["w_down_t"], w_gate=w["w_gate"])
    assert _rel_err(y, ref) < 1.5e-2


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
@pytest.mark.parametrize("num_tokens", [4, 40])
def test_cuda_graph_capture_and_replay(num_tokens):
    w, w_router = _gpu_layer()
    static_x = torch.randn(num_tokens, 256, device="cuda", dtype=torch.bfloat16)

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
@pytest.mark.parametrize("num_tokens", [1, 8, 40])
def test_settings_do_not_change_the_result(num_tokens):
    """PDL on/off, router PDL, the weights' L2 eviction policy and the union's expert list: bit-identical outputs (the
    same arithmetic in the same order); the down kernel's
    read-ahead of its first expert (the same order, but its peeled tl.dot may compile to other MMA instructions) and
    persistent grids: the same up to rounding (another compiled kernel may pick other MMA instructions)."""
    from lte.kernels.triton_ffn import default_config, routed_sparse_ffn_triton, sparse_ffn_triton

    w, w_router = _gpu_layer(D=512, F=2000)
    x = torch.randn(num_tokens, 512, device="cuda", dtype=torch.bfloat16)
    base = default_config(num_tokens, 512, 2000)
    exact = [replace(base, pdl=False), replace(base, router_pdl=True), replace(base, stream_weights=True),
             replace(base, active_list=True), replace(base, active_list=True, pdl=False)]
    close = [replace(base, in_progs_per_sm=1), replace(base, in_progs_per_sm=4), replace(base, out_prefetch=True)]
    for keep in (0.0, 0.3, 1.0):
        mask = torch.rand(num_tokens, num_experts(2000, 32), device="cuda") < keep
        args = (x, mask, w["w_up"], w["w_down_t"], w["w_gate"], None, None, 32, "silu")
        want = sparse_ffn_triton(*args, base)
        for cfg in exact:
            assert torch.equal(sparse_ffn_triton(*args, cfg), want), cfg
        for cfg in close:
            torch.testing.assert_close(sparse_ffn_triton(*args, cfg), want, rtol=2e-2, atol=2e-3)
    thr = logit_threshold(0.5)
    want = routed_sparse_ffn_triton(x, w_router, thr, w["w_up"], w["w_down_t"], w["w_gate"], None, None, 32, "silu",
                                    base)
    for cfg in exact + close:
        got = routed_sparse_ffn_triton(x, w_router, thr, w["w_up"], w["w_down_t"], w["w_gate"], None, None, 32,
                                       "silu", cfg)
        assert torch.equal(got[1], want[1]), cfg
        if cfg in exact:
            assert torch.equal(got[0], want[0]), cfg
        else:
            torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [1, 3, 8, 16, 40, 64, 80])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_routed_op_on_gpu_matches_reference(num_tokens, dtype):
    w, w_router = _gpu_layer(dtype)
    x = torch.randn(num_tokens, 256, device="cuda", dtype=dtype)
    y, mask = routed_sparse_ffn(x, w_router, w["w_up"], w["w_down_t"], w_gate=w["w_gate"])
    logits = x.float() @ w_router.float().T
    near = logits.abs() < 1e-2  # tau 0.5: logit threshold 0
    assert not ((mask != router_mask_reference(x, w_router, 0.5)) & ~near).any()
    ref = sparse_ffn_reference(x, mask, w["w_up"], w["w_down_t"], w_gate=w["w_gate"])
    assert _rel_err(y, ref) < 1.5e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [65, 512])
def test_routed_masked_dense_on_gpu_matches_reference(num_tokens):
    """The prefill path on the GPU (router logits thresholded inside the masked activation kernel) against
    the fp32 reference with the mask of the same bf16 logits."""
    w, w_router = _gpu_layer()
    x = torch.randn(num_tokens, 256, device="cuda", dtype=torch.bfloat16)
    y = routed_masked_dense_ffn(x, w_router, w["w_up"], w["w_down_t"], w_gate=w["w_gate"], tau=0.5)
    mask = F_.linear(x, w_router).float() > 0.0  # tau 0.5: logit threshold 0
    assert 0 < mask.float().mean() < 1
    ref = sparse_ffn_reference(x, mask, w["w_up"], w["w_down_t"], w_gate=w["w_gate"])
    assert _rel_err(y, ref) < 1.5e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("batch,cache_len", [(1, 512), (8, 300), (32, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_on_gpu_matches_reference(batch, cache_len, dtype):
    """The split-KV kernel on the GPU (the op's CUDA path, the default slices) against the fp32 reference, on a
    Llama-3-8B-like head layout (8 KV heads, 4 query heads each, d = 128) with a padding-style mask."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, 8, n, 128, device="cuda", generator=gen).to(dtype) for n in (4, cache_len, cache_len))
    keep = torch.rand(batch, cache_len, device="cuda", generator=gen) < 0.8
    keep[:, 0] = True
    out = decode_attention(q, k, v, keep)
    ref = decode_attention_reference(q, k, v, keep, 128**-0.5)
    assert _rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [1, 8, 65])
def test_stacked_masked_dense_on_gpu_matches_reference(num_tokens):
    """Gate, up and router rows in one product on the GPU (the masked activation kernel reading column slices of
    it and the logits in place) against the fp32 reference with the mask of the same bf16 logits."""
    w, w_router = _gpu_layer()
    x = torch.randn(num_tokens, 256, device="cuda", dtype=torch.bfloat16)
    w_in = torch.cat([w["w_gate"], w["w_up"], w_router])
    y = stacked_masked_dense_ffn(x, w_in, w["w_down_t"], tau=0.5)
    mask = F_.linear(x, w_in)[:, 2 * w["w_up"].shape[0]:].float() > 0.0  # tau 0.5: logit threshold 0
    assert 0 < mask.float().mean() < 1
    ref = sparse_ffn_reference(x, mask, w["w_up"], w["w_down_t"], w_gate=w["w_gate"])
    assert _rel_err(y, ref) < 1.5e-2
    given = torch.rand(num_tokens, mask.shape[1], device="cuda") < 0.3  # a mask chosen elsewhere (top-k routing)
    given[:, 0] = True  # no token without experts (a zero output would make the relative error 0 / 0)
    y_given = stacked_masked_dense_ffn(x, w_in, w["w_down_t"], mask=given)
    ref_given = sparse_ffn_reference(x, given, w["w_up"], w["w_down_t"], w_gate=w["w_gate"])
    assert _rel_err(y_given, ref_given) < 1.5e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [1, 3, 8, 33, 64, 80])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_routed_op_on_gpu_matches_reference(num_tokens, dtype):
    """fp8 weights (row scales) on the GPU: the kernels (<= 64 tokens) and the prefill path (80) against
    the fp32 reference of the dequantized weights, with the mask the kernel used."""
    w, w_router = _gpu_layer(dtype)
    q = {k: quantize_rows_fp8(w[k]) for k in ("w_up", "w_gate", "w_down_t")}
    scales = (q["w_up"][1], q["w_gate"][1], q["w_down_t"][1])
    x = torch.randn(num_tokens, 256, device="cuda", dtype=dtype)
    for budget in (0, 7):
        y, mask = routed_sparse_ffn(x, w_router, q["w_up"][0], q["w_down_t"][0], w_gate=q["w_gate"][0],
                                    scales=scales, budget=budget if num_tokens <= 64 else 0)
        ref = sparse_ffn_reference(x, mask, q["w_up"][0], q["w_down_t"][0], w_gate=q["w_gate"][0], s_up=scales[0],
                                   s_gate=scales[1], s_down=scales[2])
        assert _rel_err(y, ref) < 1.5e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [1, 8, 64])
def test_ffn_halves_on_gpu(num_tokens):
    w, w_router = _gpu_layer(D=512, F=2000, gated=False)
    x = torch.randn(num_tokens, 512, device="cuda", dtype=torch.bfloat16)
    for budget in (0, 9):
        z, mask, union = routed_ffn_in(x, w_router, w["w_up"], b_up=w["b_up"], budget=budget)
        y = sparse_ffn_out(F_.relu(z), mask, union, w["w_down_t"], b_down=w["b_down"])
        ref = sparse_ffn_reference(x, mask, w["w_up"], w["w_down_t"], b_up=w["b_up"], b_down=w["b_down"],
                                   activation="relu")
        assert _rel_err(y, ref) < 1.5e-2
        assert torch.equal(union.bool(), mask.any(0)) and (budget == 0 or int(union.sum()) <= budget)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [8, 64])
def test_routed_budget_on_gpu(num_tokens):
    w, w_router = _gpu_layer(D=512, F=2000)
    x = torch.randn(num_tokens, 512, device="cuda", dtype=torch.bfloat16)
    for budget in (1, 7, 40):
        y, mask = routed_sparse_ffn(x, w_router, w["w_up"], w["w_down_t"], w_gate=w["w_gate"], budget=budget)
        assert int(mask.any(0).sum()) <= budget
        want = routed_mask_reference(x, w_router, 0.5, budget)
        assert (mask != want).float().mean() < 0.05  # only near-ties of logits or scores may differ
        ref = sparse_ffn_reference(x, mask, w["w_up"], w["w_down_t"], w_gate=w["w_gate"])
        assert _rel_err(y, ref) < 1.5e-2


def _exact_router_inputs(num_tokens, num_exp, model_width, dtype, seed):
    """x in {-1, -0.5, 0, 0.5, 1} and router rows of multiples of 1/16 in [-1, 1], the second half a copy
    of the first (ties): every logit is a multiple of 1/32 below 2^12, summed exactly in fp32 in any order."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (num_tokens, model_width), generator=gen) / 2
    w_router = torch.randint(-16, 17, (num_exp, model_width), generator=gen) / 16
    w_router[num_exp // 2:] = w_router[: num_exp - num_exp // 2].clone()
    return x.to(device="cuda", dtype=dtype), w_router.to(device="cuda", dtype=dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [1, 8, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_topk_mask_on_gpu(num_tokens, dtype):
    """Llama-3-8B's router shape (E = 448, D = 4096): the router + top-k kernels equal the reference
    exactly where logits are exact (with ties), and up to near-ties at the cut on random inputs; then
    the same call captured in a CUDA graph and replayed on new inputs."""
    E, D = 448, 4096
    x, w_router = _exact_router_inputs(num_tokens, E, D, dtype, num_tokens)
    for k in (1, 17, 224, 447, 448, 500):
        got = router_topk_mask(x, w_router, k)
        assert torch.equal(got, router_topk_mask_reference(x, w_router, k)), k
        assert (got.sum(-1) == min(k, E)).all(), k
    gen = torch.Generator(device="cuda").manual_seed(0)
    xr = torch.randn(num_tokens, D, device="cuda", generator=gen).to(dtype)
    wr = (torch.randn(E, D, device="cuda", generator=gen) * D**-0.5).to(dtype)
    logits = xr.float() @ wr.float().T  # [B, E]
    for k in (1, 100, 300):
        got = router_topk_mask(xr, wr, k)
        cut = logits.sort(dim=-1, descending=True).values[:, k - 1: k]  # [B, 1] the k-th largest
        near = (logits - cut).abs() <= 1e-4 * cut.abs().clamp_min(1.0)
        assert not ((got != router_topk_mask_reference(xr, wr, k)) & ~near).any(), k
        assert (got.sum(-1) == k).all(), k
    static_x = x.clone()
    router_topk_mask(static_x, w_router, 17)  # compile the kernels outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_mask = router_topk_mask(static_x, w_router, 17)
    for seed in range(3):
        static_x.copy_(_exact_router_inputs(num_tokens, E, D, dtype, 100 + seed)[0])
        graph.replay()
        assert torch.equal(static_mask, router_topk_mask_reference(static_x, w_router, 17)), seed


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [1, 8, 64])
def test_router_topk_mask_with_budget_on_gpu(num_tokens):
    """Top-k with a per-batch budget on Llama-3-8B's router shape: the router (logits, summed scores,
    a cleared union), top-k (rows and union) and budget kernels against the reference
    (``selfcheck.check_topk_case``: exact logits, summed scores up to near-ties at the cut; budgets
    that bind and one the union fits), then the three launches captured in a CUDA graph and replayed
    on new inputs (the union must be cleared on every replay)."""
    from lte.kernels.selfcheck import check_topk_case

    E, D = 448, 4096
    gen = torch.Generator().manual_seed(num_tokens)
    for k, budget, ties in ((17, 100, False), (17, 100, True), (224, 300, False), (1, 1, True), (100, 447, False)):
        result = check_topk_case(D, E, num_tokens, k, torch.bfloat16, "cuda", gen, ties=ties, budget=budget)
        assert result.ok, result
    x, w_router = _exact_router_inputs(num_tokens, E, D, torch.bfloat16, num_tokens)
    static_x = x.clone()
    router_topk_mask(static_x, w_router, 17, budget=40)  # compile the kernels outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_mask = router_topk_mask(static_x, w_router, 17, budget=40)
    for seed in range(3):
        static_x.copy_(torch.randn(num_tokens, D, device="cuda", dtype=torch.bfloat16))
        graph.replay()
        fresh = router_topk_mask(static_x, w_router, 17, budget=40)
        assert torch.equal(static_mask, fresh), seed  # the replay computes what a fresh call does
        assert int(static_mask.any(0).sum()) <= 40 and (static_mask.sum(-1) <= 17).all(), seed


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens,budget", [(1, 0), (8, 0), (40, 0), (8, 20), (40, 20)])
def test_routed_op_graph_replay_is_deterministic_and_pdl_neutral(num_tokens, budget):
    from lte.kernels.triton_ffn import default_config, routed_sparse_ffn_triton

    w, w_router = _gpu_layer(D=512, F=2000)
    static_x = torch.randn(num_tokens, 512, device="cuda", dtype=torch.bfloat16)
    cfg = default_config(num_tokens, 512, 2000)

    def layer(x, pdl=True):
        return routed_sparse_ffn_triton(x, w_router, logit_threshold(0.5), w["w_up"], w["w_down_t"],
                                        w["w_gate"], None, None, 32, "silu", replace(cfg, pdl=pdl), budget=budget)

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


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [1, 64])
def test_full_size_shape_in_a_graph(num_tokens):
    """Llama-3-8B FFN shape (D=4096, F=14336), union 0% / 50% / 100% on, inside a CUDA graph."""
    from lte.kernels.triton_ffn import routed_sparse_ffn_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    D, F = 4096, 14336
    w = make_ffn(D, F, True, False, torch.bfloat16, "cuda", torch.Generator().manual_seed(0))
    for keep in (1.0, 0.5, 0.0):
        on = torch.rand(num_experts(F, 32), generator=gen, device="cuda") < keep  # the same experts for every token
        x = torch.randn(num_tokens, D, generator=gen, device="cuda").to(torch.bfloat16)
        x[:, 0] = 1.0  # the router reads channel 0 only: +1 for kept experts, -1 for the others
        w_router = torch.zeros(num_experts(F, 32), D, device="cuda", dtype=torch.bfloat16)
        w_router[:, 0] = torch.where(on, 1.0, -1.0).to(torch.bfloat16)
        static = {}

        def call(x=x, w_router=w_router, static=static):
            static["out"] = routed_sparse_ffn_triton(x, w_router, 0.0, w["w_up"], w["w_down_t"], w["w_gate"], None,
                                                     None, 32, "silu")

        call()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        graph.replay()
        y, mask = static["out"]
        assert torch.equal(mask, on[None, :].expand_as(mask))
        ref = sparse_ffn_reference(x, mask, w["w_up"], w["w_down_t"], w_gate=w["w_gate"])
        if keep == 0.0:
            assert not y.any()
        else:
            assert _rel_err(y, ref) < 1.5e-2

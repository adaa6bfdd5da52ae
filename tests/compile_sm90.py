"""Compile the decode FFN kernels for sm_90 (Hopper) without a GPU: Triton's own ptxas turns each into a cubin.

    PYTHONPATH=src python tests/compile_sm90.py             # B = 1 and tl.dot variants, with and without the list
    PYTHONPATH=src python tests/compile_sm90.py --shipped   # every row of the shipped tile tables, as planned
    PYTHONPATH=src python tests/compile_sm90.py --selfcheck # the selfcheck's settings at its largest batch, fp32
    PYTHONPATH=src python tests/compile_sm90.py --selfcheck-all  # ... at each batch size and dtype (about a minute)

Run as a script (the tests start it in a subprocess so that triton is imported in its compiled mode, apart from the
interpreter the other kernel tests use). Prints one line per kernel variant, "ok <name> | ptx=<instructions>
regs=<registers a thread> stack=<bytes a thread> smem=<shared bytes a program>" (registers and stack from the cubin
by the wheel's cuobjdump; a stack above 0 means spilled registers) or "FAIL <name>: <error>" (shared memory past
Hopper's 227 KB a block is a failure: Triton compiles such a kernel and refuses it only at launch, as on the H100 on
2026-12-07), and exits 1 on any failure. A compile check, not
a run: it finds what the CPU interpreter cannot (type errors in branches the interpreter accepts, constexpr misuse,
shared memory over the limit, spills), not wrong results. The GPU machine's Triton may be older than this one.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lte.kernels.triton_jit import _ffn_in_kernel, _ffn_out_kernel
from lte.kernels.triton_masks import _compact_kernel

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED = 232448  # bytes of shared memory a block may hold on sm_90 (H100, H200)
I32 = "i32"
IN_SIGNATURE = dict(x_ptr="*bf16", mask_ptr="*u8", union_ptr="*i8", list_ptr="*i32", wg_ptr="*bf16", wu_ptr="*bf16",
                    bu_ptr="*bf16", sg_ptr="*i8", su_ptr="*i8", h_ptr="*fp32", B=I32, D=I32, F=I32, S=I32, E=I32,
                    RB=I32, stride_xb=I32, stride_mb=I32, stride_hb=I32)
OUT_SIGNATURE = dict(h_ptr="*fp32", union_ptr="*i8", list_ptr="*i32", mask_ptr="*u8", wd_ptr="*bf16", sd_ptr="*i8",
                     part_ptr="*fp32", B=I32, D=I32, F=I32, S=I32, E=I32, stride_hb=I32, stride_mb=I32)


def compile_report(fn, signature: dict, constexprs: dict, warps: int, stages: int) -> str:
    """Compile for sm_90 (raises on failure): "ptx=<instructions in the kernel's PTX body> regs=<n> stack=<bytes>"
    (regs and stack "?" without cuobjdump)."""
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}},
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})
    shared = kernel.metadata.shared
    if shared > MAX_SHARED:
        raise ValueError(f"needs {shared} bytes of shared memory, sm_90 allows {MAX_SHARED}")
    ptx = kernel.asm["ptx"]
    body = ptx[ptx.index(".entry"):].split(".section")[0]  # no debug sections
    count = sum(1 for line in body.splitlines() if re.match(r"\s+[a-z@]", line) and not line.strip().startswith("//"))
    return f"ptx={count} {resource_usage(kernel.asm['cubin'])} smem={shared}"


def resource_usage(cubin: bytes) -> str:
    """"regs=<n> stack=<bytes>" of a cubin, from the cuobjdump that triton's CUDA backend ships."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "regs=? stack=?"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"regs={found[1]} stack={found[2]}" if found else "regs=? stack=?"


def variants():
    """(name, kernel, signature, constexprs, warps, stages): B = 1 (broadcast) and B = 8 (tl.dot) shapes of the
    gate/up and down kernels with and without the union's list, and the list's compaction."""
    for listed, persistent, (b_pad, bf, bk, warps, stages, dot) in itertools.product(
            (False, True), (False, True), ((1, 2, 1024, 4, 3, False), (1, 1, 2048, 16, 1, False),
                                           (16, 32, 256, 4, 4, True))):
        yield (f"gate/up B_PAD={b_pad} rows={bf} list={listed} persistent={persistent}", _ffn_in_kernel, IN_SIGNATURE,
               dict(GATED=True, HAS_BIAS=False, ACT=0, B_PAD=b_pad, BLOCK_F=bf, BLOCK_K=bk, E_PAD=512, SLOTS=4,
                    PERSISTENT=persistent, USE_DOT=dot, DOT_PREC="tf32", PDL=True, SCALED=False, G=1,
                    W_EVICT="evict_first", LIST=listed), warps, stages)
    for listed, prefetch, (b_pad, block_d, warps, stages, dot) in itertools.product(
            (False, True), (0, 1), ((1, 512, 8, 2, False), (16, 128, 4, 3, True))):
        yield (f"down B_PAD={b_pad} list={listed} prefetch={prefetch}", _ffn_out_kernel, OUT_SIGNATURE,
               dict(B_PAD=b_pad, S_PAD=32, E_PAD=512, CHUNK=16, BLOCK_D=block_d, TOKEN_MASK=False, USE_DOT=dot,
                    DOT_PREC="tf32", PDL=True, SCALED=False, DOT_DTYPE=0, G=1, PREFETCH=prefetch,
                    W_EVICT="evict_first", LIST=listed), warps, stages)
    yield ("compact", _compact_kernel, dict(union_ptr="*i8", list_ptr="*i32", E=I32), dict(E_PAD=512, PDL=True), 4, 1)


TRITON_TYPE = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.uint8": "u8",
               "torch.int8": "i8", "torch.int32": "i32"}


def plan_variants(name: str, p):
    """The gate/up and down kernels of one plan (``lte.kernels.triton_ffn.plan_launch``), with the compile-time
    arguments and pointer types the launches give them."""
    from lte.kernels.triton_ffn import in_constexprs, out_constexprs

    def ptr(t) -> str:
        return "*" + TRITON_TYPE[str(t.dtype)]

    weight, listed = ptr(p.w_up), "*i32"
    in_sig = {**IN_SIGNATURE, "x_ptr": ptr(p.x), "wg_ptr": weight, "wu_ptr": weight, "bu_ptr": weight, "h_ptr": ptr(p.h),
              "union_ptr": ptr(p.union), "list_ptr": listed}
    out_sig = {**OUT_SIGNATURE, "h_ptr": ptr(p.h), "wd_ptr": ptr(p.w_down_t), "part_ptr": ptr(p.part),
               "union_ptr": ptr(p.union), "list_ptr": listed}
    for kernel, sig, meta, label in ((_ffn_in_kernel, in_sig, in_constexprs(p), "gate/up"),
                                     (_ffn_out_kernel, out_sig, out_constexprs(p), "down")):
        meta = dict(meta)
        warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
        yield f"{name} {label}", kernel, sig, meta, warps, stages


def _plan(tokens: int, model_width: int, ffn_width: int, expert_size: int, dtype, cfg, gated=True, bias=False):
    """A plan on the CPU for these sizes (weights on the meta device: nothing is allocated for them)."""
    import torch

    from lte.kernels.triton_ffn import plan_launch

    weight = torch.empty(ffn_width, model_width, dtype=dtype, device="meta")
    b_up = torch.empty(ffn_width, dtype=dtype, device="meta") if bias else None
    x = torch.empty(tokens, model_width, dtype=dtype)
    mask = torch.ones(tokens, -(-ffn_width // expert_size), dtype=torch.bool)
    return plan_launch(x, mask, weight, weight, weight if gated else None, b_up, None, expert_size, "silu", cfg)


def shipped_variants():
    """The gate/up and down kernels of every row of ``lte.kernels.tuning.SHIPPED`` (gated SiLU, bf16), with and
    without the union's list, as ``plan_launch`` plans them (on the CPU: a persistent grid would be sized for 4 SMs
    there, and no shipped row has one)."""
    import torch

    from lte.kernels.tuning import SHIPPED, KernelConfig

    for gpu, shapes in SHIPPED.items():
        for key, rows in shapes.items():
            dims, _, size = key.partition("/s")
            model_width, ffn_width = map(int, dims.split("x"))
            for tokens, row in rows.items():
                for listed in (False, True):
                    cfg = KernelConfig.from_dict({**row, "active_list": listed})
                    p = _plan(int(tokens), model_width, ffn_width, int(size or 32), torch.bfloat16, cfg)
                    yield from plan_variants(f"{gpu} {key} B={tokens} list={listed}", p)


def selfcheck_variants(everything: bool):
    """The kernels of every setting ``lte.kernels.selfcheck`` runs (its CONFIGS) on its largest shape: with
    ``everything`` at its batch sizes, in fp32, fp16 and bf16, gated without biases and plain with them (what the GPU
    tests' full product launches; about a minute), else only at its largest batch in fp32, gated (the most shared
    memory a setting asks for; a few seconds)."""
    import torch

    from lte.kernels.selfcheck import BATCHES, CONFIGS, SHAPES, case_config

    model_width, ffn_width, expert_size = max(SHAPES, key=lambda shape: shape[0] * shape[1])
    cases = (list(itertools.product(BATCHES, (torch.float32, torch.float16, torch.bfloat16), (True, False))) if everything
             else [(max(BATCHES), torch.float32, True)])
    for i, config in enumerate(CONFIGS):
        for tokens, dtype, gated in cases:
            cfg = case_config(config, tokens, model_width, ffn_width, expert_size, "cpu")
            p = _plan(tokens, model_width, ffn_width, expert_size, dtype, cfg, gated=gated, bias=not gated)
            yield from plan_variants(f"selfcheck config {i} B={tokens} {dtype} gated={gated}", p)


def main() -> None:
    failed = False
    args = sys.argv[1:]
    chosen = (shipped_variants() if "--shipped" in args else selfcheck_variants("--selfcheck-all" in args)
              if {"--selfcheck", "--selfcheck-all"} & set(args) else variants())
    for name, fn, signature, constexprs, warps, stages in chosen:
        try:
            print(f"ok {name} | {compile_report(fn, signature, constexprs, warps, stages)}")
        except Exception as err:  # noqa: BLE001 - every failure is reported with its variant
            failed = True
            print(f"FAIL {name}: {type(err).__name__}: {str(err)[:500]}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

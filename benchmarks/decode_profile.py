"""Where a decode step's time goes: dense vs LTE vs no FFN at all, and the GPU kernels of each (issue 11).

One random-weight shape (`lte.serving.synthetic.SHAPES`), one batch size, three variants in the same
static-cache loop (`StaticDecoder`, CUDA graphs, `--compile` as the decode benchmark):

  dense    the FFNs through cuBLAS (`DenseMLP`)
  lte      the sparse kernels at a fixed fraction of experts off (the router path included)
  no-ffn   every FFN replaced by zeros: what the rest of the step (attention, norms, head, launches) costs

So the FFN's own time is the step minus the no-FFN step, and its bandwidth is its bytes over that time.
Then each variant's kernels are traced (`torch.profiler`, CUDA activity) over `--steps` steps and summed
by kind (cuBLAS GEMM/GEMV, LTE FFN kernels, LTE router/mask kernels, Inductor's fused Triton kernels,
attention, copies) per step; kernel time below the step time is launch and idle time.

    PYTHONPATH=src python benchmarks/decode_profile.py --shape llama3-8b --batch 1 --sparsity 0.5 --compile
    LTE_BENCH_DEVICE=cpu PYTHONPATH=src python benchmarks/decode_profile.py --shape tiny --no-graph   # smoke

Writes JSON to --out and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from bench_util import BLAS_LIBRARIES, DEVICE, SDPA_BACKENDS, environment, use_blas_library, use_sdpa_backend
from torch import nn

import lte
from lte.serving.decode import COMPILE_MODES, StaticDecoder, bench
from lte.serving.dense import dense_modules, swap_modules
from lte.serving.prepare import prepare_for_inference
from lte.serving.synthetic import pin_router_channel, random_llama, set_fixed_sparsity

#: Kernel kinds by name (first match wins); cuBLAS names vary by version and GPU (gemv, gemm, nvjet, xmma, ...).
KINDS: tuple[tuple[str, str], ...] = (
    ("lte ffn", r"_ffn_in_kernel|_ffn_out_kernel|_ffn_finish_kernel|_masked_act_kernel"),
    ("lte router/mask", r"_router_kernel|_union_kernel|_budget_kernel|_topk"),
    ("attention", r"attn|attention|flash|flex|sdpa|softmax"),
    ("cublas gemm/gemv", r"gemv|gemm|nvjet|xmma|cutlass|cublas|splitk|dot_kernel"),
    ("inductor fused", r"^triton_"),
    ("copy/fill", r"copy|memcpy|memset|fill|cat|index"),
)


class ZeroMLP(nn.Module):
    """An FFN that costs nothing but a fill: the step without its FFNs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low if kind != "inductor fused" else name):
            return kind
    return "other"


def kernel_table(events: list[tuple[str, float]], steps: int) -> dict[str, Any]:
    """[(kernel name, microseconds)] of `steps` steps -> per-step time and count by kind, and the top kernels."""
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, us in events:
        for table, key in ((by_kind, kind_of(name)), (by_name, name)):
            table[key][0] += us
            table[key][1] += 1
    kinds = {k: {"us_per_step": t / steps, "kernels_per_step": n / steps} for k, (t, n) in by_kind.items()}
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
    return {"kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["us_per_step"])),
            "kernel_us_per_step": sum(t for t, _ in by_kind.values()) / steps,
            "kernels_per_step": sum(n for _, n in by_kind.values()) / steps,
            "top": [{"name": n[:120], "us_per_step": t / steps, "per_step": c / steps} for n, (t, c) in top]}


def trace(dec: StaticDecoder, steps: int) -> list[tuple[str, float]]:
    """The GPU kernels of `steps` decode steps: [(name, microseconds)] (empty where the tracer shows none)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        dec.decode(steps)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    device_kind = torch.autograd.DeviceType.CUDA
    return [(e.name, e.device_time) for e in prof.events()
            if DEVICE == "cuda" and e.device_type == device_kind and e.device_time > 0]


def _attention(args: argparse.Namespace) -> bool | str:
    """The decoder's decode attention (--decode-attention; "auto": the device's default, the Triton kernel on CUDA)."""
    return True if args.decode_attention == "auto" else args.decode_attention


def profile_variant(model: nn.Module, args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """Step time (the decode benchmark's timing) and the kernel table of one variant, one compile for both
    where the tracer sees the kernels inside the CUDA graph."""
    dec = StaticDecoder(model, args.batch, args.cache_len, use_graph=not args.no_graph, compile=args.compile,
                        gqa_decode=_attention(args))
    timing = bench(model, batch_size=args.batch, prompt_len=16, new_tokens=args.steps, cache_len=args.cache_len,
                   runs=args.runs, decoder=dec)
    out = {"variant": variant, "ms_per_step": timing["ms_per_step"], "weight_bytes_per_step":
           timing["weight_bytes_per_step"], "graph": timing["cuda_graph"]}
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, 16))
    for use_graph in ([True, False] if not args.no_graph else [False]):
        if use_graph != dec.use_graph:  # some tracers do not see the kernels inside a CUDA graph: trace eagerly
            dec = StaticDecoder(model, args.batch, args.cache_len, use_graph=use_graph, compile=args.compile,
                                gqa_decode=_attention(args))
        dec.prefill(prompt)
        dec.decode(2)  # capture / compile outside the trace
        events = trace(dec, args.steps)
        if events:
            out["kernels"] = kernel_table(events, args.steps)
            out["kernels_traced_in_graph"] = use_graph
            break
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    hf = random_llama(args.shape, DEVICE, dtype)
    pin_router_channel(hf)
    lmodel = lte.get_lte_model(hf, lte.LTEConfig(grouping="contiguous"), progress=False)
    dense = dense_modules(lmodel)
    model = prepare_for_inference(lmodel)
    del lmodel
    print(f"built {args.shape} in {time.time() - t0:.1f} s", flush=True)
    rows = []
    sparse = swap_modules(model, dense)
    rows.append(profile_variant(model, args, "dense"))
    swap_modules(model, {name: ZeroMLP() for name in dense})
    rows.append(profile_variant(model, args, "no-ffn"))
    swap_modules(model, sparse)
    set_fixed_sparsity(model, args.sparsity)
    rows.append(profile_variant(model, args, f"lte {args.sparsity:g}"))
    base = rows[1]
    for row in rows:
        row["ffn_ms_per_step"] = row["ms_per_step"] - base["ms_per_step"]
        ffn_bytes = row["weight_bytes_per_step"] - base["weight_bytes_per_step"]
        row["ffn_bytes_per_step"] = ffn_bytes
        row["ffn_gb_per_s"] = ffn_bytes / (row["ffn_ms_per_step"] / 1e3) / 1e9 if row["ffn_ms_per_step"] > 0 else None
    return {"env": environment(), "settings": vars(args), "rows": rows}


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{'variant':>10} {'ms/step':>8} {'FFN ms':>7} {'FFN GB/s':>9} {'kernel ms':>9} {'kernels':>8}  top kinds (us/step)")
    for r in result["rows"]:
        k = r.get("kernels") or {}
        kinds = ", ".join(f"{name} {v['us_per_step']:.0f}" for name, v in list(k.get("kinds", {}).items())[:5])
        gbs = f"{r['ffn_gb_per_s']:.0f}" if r.get("ffn_gb_per_s") else "-"
        kern = f"{k['kernel_us_per_step'] / 1e3:.3f}" if k else "-"
        count = f"{k['kernels_per_step']:.0f}" if k else "-"
        print(f"{r['variant']:>10} {r['ms_per_step']:>8.3f} {r['ffn_ms_per_step']:>7.3f} {gbs:>9} {kern:>9} "
              f"{count:>8}  {kinds}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", help="a shape of lte.serving.synthetic.SHAPES")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of experts off in the LTE variant")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed and traced")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cache-len", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--sdpa", default="auto", choices=SDPA_BACKENDS,
                   help="restrict scaled_dot_product_attention to one backend (dense and LTE alike; auto: PyTorch's "
                        "choice, cuDNN first on Hopper)")
    p.add_argument("--blas", default="auto", choices=BLAS_LIBRARIES,
                   help="the BLAS library torch's matrix products prefer (dense and LTE alike; auto: torch's default)")
    p.add_argument("--compile", nargs="?", const="default", default=False, choices=COMPILE_MODES,
                   help="torch.compile the decode step (as decode.py --compile; an Inductor mode may follow)")
    p.add_argument("--decode-attention", default="auto", choices=["auto", "sdpa", "triton", "flex"],
                   help="the grouped heads' decode attention (as decode.py's; auto: triton on CUDA; --sdpa picks "
                        "the SDPA backend of sdpa and of prefill)")
    p.add_argument("--no-graph", action="store_true", help="no CUDA graphs (the CPU smoke run)")
    p.add_argument("--out", type=Path, default=Path("decode_profile.json"))
    args = p.parse_args()
    use_sdpa_backend(args.sdpa)
    use_blas_library(args.blas)
    if not 0.0 <= args.sparsity <= 1.0:
        raise SystemExit(f"--sparsity must be in [0, 1], got {args.sparsity}")
    result = run(args)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print_table(result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Kernel-level benchmark of the sparse-expert FFN (issue 4): correctness, then timings vs cuBLAS.

Run from the repository root on a CUDA machine:

    PYTHONPATH=src python benchmarks/ffn_kernel.py [--tune] [--out DIR]

LLaMA-2-7B FFN shapes (D=4096, F=11008, S=32), bf16, random weights. Every measured call sits in a
CUDA graph that runs the FFN over several layers' worth of weight copies (far more bytes than the
50 MB L2), replayed many times; the figure is the median over several runs of the time per call.
Writes ``ffn_kernel.json`` and ``ffn_kernel.png`` to ``--out`` (default: $OUT or benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F_

from lte.kernels import triton_ffn
from lte.kernels.reference import num_experts, sparse_ffn_reference
from lte.kernels.selfcheck import run_checks
from lte.kernels.triton_ffn import (
    KernelConfig,
    default_config,
    launch_finish,
    launch_in,
    launch_out,
    plan_launch,
    routed_sparse_ffn_triton,
    router_mask_triton,
    sparse_ffn_triton,
)

MODEL_WIDTH, FFN_WIDTH, EXPERT_SIZE = 4096, 11008, 32  # LLaMA-2-7B: D, F, S
COPIES = 8  # weight copies rotated inside one graph: 8 x 270 MB >> 50 MB L2
REPLAYS, RUNS = 20, 5
SPARSITIES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95)
DTYPE = torch.bfloat16


def time_calls(calls, replays=REPLAYS, runs=RUNS) -> float:
    """Median microseconds per call of ``calls`` (a list of closures) captured in one CUDA graph."""
    for call in calls:  # compile kernels, create cuBLAS handles
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        per_call.append(start.elapsed_time(end) * 1e3 / (replays * len(calls)))
    return statistics.median(per_call)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_calls([lambda: dst.copy_(src)], replays=10)
    return 2 * src.numel() / (us * 1e-6) / 1e9


def make_layers(ffn_width: int, gen: torch.Generator):
    """COPIES layers of random FFN weights in both layouts (down [D, F] for cuBLAS, [F, D] for us)."""
    layers = []
    for _ in range(COPIES):
        def rand(rows, cols, scale):
            return (torch.randn(rows, cols, generator=gen, device="cuda") * scale).to(DTYPE)

        w_gate = rand(ffn_width, MODEL_WIDTH, MODEL_WIDTH**-0.5)
        w_up = rand(ffn_width, MODEL_WIDTH, MODEL_WIDTH**-0.5)
        w_down = rand(MODEL_WIDTH, ffn_width, ffn_width**-0.5)  # [D, F] as nn.Linear stores it
        layers.append({"w_gate": w_gate, "w_up": w_up, "w_down": w_down,
                       "w_down_t": w_down.t().contiguous()})  # [F, D]
    return layers


def dense_ffn(x, layer):
    """HF LlamaMLP: down(silu(gate(x)) * up(x)) through cuBLAS."""
    return F_.linear(F_.silu(F_.linear(x, layer["w_gate"])) * F_.linear(x, layer["w_up"]), layer["w_down"])


def union_masks(num_tokens: int, off: float, gen: torch.Generator) -> torch.Tensor:
    """Per-token masks [B, E] whose union is exactly round(E * (1 - off)) experts.

    Each token takes every union expert with probability 1/2 (all of them when B = 1); experts no
    token took go to a random token, so the union is exact."""
    num_exp = num_experts(FFN_WIDTH, EXPERT_SIZE)
    n_on = round(num_exp * (1.0 - off))
    union = torch.randperm(num_exp, generator=gen, device="cuda")[:n_on]  # [n_on]
    mask = torch.zeros(num_tokens, num_exp, dtype=torch.bool, device="cuda")
    if num_tokens == 1:
        mask[0, union] = True
        return mask
    pick = torch.rand(num_tokens, n_on, generator=gen, device="cuda") < 0.5  # [B, n_on]
    orphan = ~pick.any(dim=0)  # union experts no token took
    owner = torch.randint(0, num_tokens, (n_on,), generator=gen, device="cuda")
    pick[owner[orphan], torch.nonzero(orphan).squeeze(1)] = True
    mask[:, union] = pick
    return mask


def time_dense(layers, num_tokens, gen) -> float:
    xs = [torch.randn(num_tokens, MODEL_WIDTH, generator=gen, device="cuda").to(DTYPE) for _ in layers]
    return time_calls([lambda x=x, layer=layer: dense_ffn(x, layer) for x, layer in zip(xs, layers)])


def time_sparse(layers, num_tokens, off, gen, config=None, via_op=False) -> float:
    """Median us per call of our kernels at B tokens whose masks' union leaves ``off`` experts off."""
    xs = [torch.randn(num_tokens, MODEL_WIDTH, generator=gen, device="cuda").to(DTYPE) for _ in layers]
    masks = [union_masks(num_tokens, off, gen) for _ in layers]

    def call(x, mask, layer):
        if via_op:
            return torch.ops.lte.sparse_ffn(x, mask, layer["w_up"], layer["w_down_t"], layer["w_gate"],
                                            None, None, EXPERT_SIZE, "silu")
        return sparse_ffn_triton(x, mask, layer["w_up"], layer["w_down_t"], layer["w_gate"], None, None,
                                 EXPERT_SIZE, "silu", config)

    return time_calls([lambda x=x, m=m, layer=layer: call(x, m, layer) for x, m, layer in zip(xs, masks, layers)])


def check_large(layers, gen) -> list[dict]:
    """Full-size correctness: kernel vs fp32 reference at B = 1, 8, 16 and 50% union."""
    out = []
    layer = layers[0]
    for num_tokens in (1, 8, 16):
        x = torch.randn(num_tokens, MODEL_WIDTH, generator=gen, device="cuda").to(DTYPE)
        mask = union_masks(num_tokens, 0.5, gen)
        y = sparse_ffn_triton(x, mask, layer["w_up"], layer["w_down_t"], layer["w_gate"], None, None,
                              EXPERT_SIZE, "silu")
        ref = sparse_ffn_reference(x, mask, layer["w_up"], layer["w_down_t"], w_gate=layer["w_gate"],
                                   expert_size=EXPERT_SIZE)
        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        out.append({"tokens": num_tokens, "rel_error": err, "ok": err < 1.5e-2})
    return out


def bytes_read(num_exp_on: int, num_tokens: int) -> float:
    """Fewest bytes one sparse FFN call must read: active slabs of gate, up and down."""
    rows = min(FFN_WIDTH, num_exp_on * EXPERT_SIZE)
    return 3 * rows * MODEL_WIDTH * 2 + num_tokens * MODEL_WIDTH * 2 * 2


TUNE_IN = {  # (in_block_f, in_block_k, in_warps, in_stages)
    "small": [(2, 2048, 4, 3), (4, 1024, 4, 3), (2, 4096, 8, 3), (1, 4096, 4, 3), (2, 1024, 4, 3),
              (4, 2048, 8, 3), (1, 2048, 2, 3)],
    "dot": [(32, 256, 8, 3), (16, 256, 4, 4), (16, 512, 4, 3), (32, 512, 8, 3), (32, 256, 4, 4),
            (64, 128, 8, 3), (32, 128, 4, 4)],
}
TUNE_OUT = {  # (out_block_d, out_split, out_warps)
    "small": [(512, 32, 4), (256, 32, 4), (512, 16, 8), (256, 64, 4), (512, 64, 8), (1024, 32, 8), (128, 64, 4)],
    "dot": [(128, 32, 4), (128, 16, 4), (256, 16, 8), (256, 32, 8), (64, 32, 4), (128, 64, 4), (64, 64, 4)],
}
TUNE_TOKENS = ((1, "small"), (2, "small"), (2, "dot"), (4, "dot"), (8, "dot"), (16, "dot"))


def routed_inputs(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, D] and router weights [E, D] whose logits (threshold 0) reproduce ``mask`` [B, E] exactly.

    Token b is the unit vector e_b; router row e holds +1 at column b where token b uses expert e
    and -1 elsewhere (the values do not change the kernels' speed, only which experts run)."""
    num_tokens, num_exp = mask.shape
    x = torch.zeros(num_tokens, MODEL_WIDTH, device="cuda", dtype=DTYPE)
    x[torch.arange(num_tokens), torch.arange(num_tokens)] = 1.0
    w_router = torch.zeros(num_exp, MODEL_WIDTH, device="cuda", dtype=DTYPE)
    w_router[:, :num_tokens] = torch.where(mask.t(), 1.0, -1.0).to(DTYPE)  # [E, B]
    return x, w_router


def time_routed(layers, num_tokens, off, gen, config=None, fused=True) -> float:
    """Median us per call of router + FFN: fused (one op, two launches) or the separate router kernel first."""
    calls = []
    for layer in layers:
        x, w_router = routed_inputs(union_masks(num_tokens, off, gen))
        if fused:
            def call(x=x, w_router=w_router, layer=layer):
                return routed_sparse_ffn_triton(x, w_router, 0.0, layer["w_up"], layer["w_down_t"], layer["w_gate"],
                                                None, None, EXPERT_SIZE, "silu", config)
        else:
            def call(x=x, w_router=w_router, layer=layer):
                mask = router_mask_triton(x, w_router, 0.0)
                return sparse_ffn_triton(x, mask, layer["w_up"], layer["w_down_t"], layer["w_gate"], None, None,
                                         EXPERT_SIZE, "silu", config)
        calls.append(call)
    return time_calls(calls)


def routed_rows(layers, gen, dense_us) -> list[dict]:
    """Router + FFN per call: ``routed_sparse_ffn_triton`` vs the router and FFN called separately."""
    rows = []
    for num_tokens, off in ((1, 0.0), (1, 0.5), (1, 0.9), (8, 0.5)):
        cfg = default_config(num_tokens, MODEL_WIDTH, FFN_WIDTH)
        fused = time_routed(layers, num_tokens, off, gen, cfg)
        separate = time_routed(layers, num_tokens, off, gen, cfg, fused=False)
        dense = dense_us[str(num_tokens)]
        rows.append({"tokens": num_tokens, "sparsity": off, "config": f"bf{cfg.in_block_f}", "fused_us": fused,
                     "separate_us": separate, "dense_us": dense, "speedup": dense / fused})
        print(f"routed B={num_tokens} off={off} bf={cfg.in_block_f}: fused {fused:.1f} us, separate {separate} us",
              flush=True)
    return rows


def check_routed(layers, gen) -> list[dict]:
    """Full-size router-fused op: its mask equals the constructed one; y vs fp32 reference at B = 1, 8, 16."""
    out = []
    layer = layers[0]
    for num_tokens in (1, 8, 16):
        want_mask = union_masks(num_tokens, 0.5, gen)
        x, w_router = routed_inputs(want_mask)
        x = x + 0.01 * torch.randn(x.shape, generator=gen, device="cuda").to(DTYPE)  # logits stay near +-1
        y, mask = routed_sparse_ffn_triton(x, w_router, 0.0, layer["w_up"], layer["w_down_t"], layer["w_gate"],
                                           None, None, EXPERT_SIZE, "silu")
        ref = sparse_ffn_reference(x, want_mask, layer["w_up"], layer["w_down_t"], w_gate=layer["w_gate"],
                                   expert_size=EXPERT_SIZE)
        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        same = bool(torch.equal(mask, want_mask))
        out.append({"tokens": num_tokens, "mask_equal": same, "rel_error": err, "ok": same and err < 1.5e-2})
    return out


def time_kernels(layers, num_tokens, off, gen, config) -> tuple[float, float, float]:
    """Median us per launch of each of the three kernels alone (same masks and rotation)."""
    plans = []
    for layer in layers:
        x = torch.randn(num_tokens, MODEL_WIDTH, generator=gen, device="cuda").to(DTYPE)
        plans.append(plan_launch(x, union_masks(num_tokens, off, gen), layer["w_up"], layer["w_down_t"],
                                 layer["w_gate"], None, None, EXPERT_SIZE, "silu", config))
    return tuple(time_calls([lambda p=p, launch=launch: launch(p) for p in plans])
                 for launch in (launch_in, launch_out, launch_finish))


def tune(layers, gen) -> tuple[list[dict], dict[int, KernelConfig]]:
    """Time each kernel alone over its tile grid at 50% and 90% off; returns rows and the best per B."""
    rows, best = [], {}
    for num_tokens, family in TUNE_TOKENS:
        base = replace(default_config(num_tokens, MODEL_WIDTH, FFN_WIDTH), use_dot=family == "dot")
        scores_in, scores_out = {}, {}
        for (bf, bk, w, st), (bd, sp, w2) in zip(TUNE_IN[family], TUNE_OUT[family]):
            cfg = replace(base, in_block_f=bf, in_block_k=bk, in_warps=w, in_stages=st,
                          out_block_d=bd, out_split=sp, out_warps=w2)
            times = {off: time_kernels(layers, num_tokens, off, gen, cfg) for off in (0.5, 0.9)}
            rows.append({"tokens": num_tokens, "config": asdict(cfg),
                         "us_in_out_finish": {str(k): v for k, v in times.items()}})
            scores_in[(bf, bk, w, st)] = sum(t[0] for t in times.values())
            scores_out[(bd, sp, w2)] = sum(t[1] + t[2] for t in times.values())
            print(f"tune B={num_tokens} {family} in={bf, bk, w, st} out={bd, sp, w2}: "
                  + "  ".join(f"{100 * off:.0f}%: {t[0]:.1f}+{t[1]:.1f}+{t[2]:.1f}" for off, t in times.items()),
                  flush=True)
        (bf, bk, w, st) = min(scores_in, key=scores_in.get)
        (bd, sp, w2) = min(scores_out, key=scores_out.get)
        cfg = replace(base, in_block_f=bf, in_block_k=bk, in_warps=w, in_stages=st,
                      out_block_d=bd, out_split=sp, out_warps=w2)
        score = scores_in[(bf, bk, w, st)] + scores_out[(bd, sp, w2)]
        if num_tokens not in best or score < best[num_tokens][1]:
            best[num_tokens] = (cfg, score)
    return rows, {b: cfg for b, (cfg, _) in best.items()}


def config_for(tuned: dict[int, KernelConfig] | None, num_tokens: int) -> KernelConfig | None:
    """The tuned config of the largest tuned B not above num_tokens (None: the defaults)."""
    if not tuned:
        return None
    return tuned[max(b for b in tuned if b <= num_tokens)]


def plot(result: dict, path: str) -> None:
    """FFN latency vs sparsity at B=1 (dense, ideal, half-width dense) and vs B at union 50%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    dense = result["dense_us"]["1"]
    sp = [r["sparsity"] for r in result["b1_sweep"]]
    ax1.plot([100 * s for s in sp], [r["us"] for r in result["b1_sweep"]], "o-", label="LTE kernel")
    ax1.axhline(dense, color="k", ls="--", label=f"dense cuBLAS ({dense:.1f} us)")
    ax1.plot([0, 100], [dense, 0], color="gray", ls=":", label="ideal: dense x (1 - sparsity)")
    routed = [r for r in result.get("routed", []) if r["tokens"] == 1 and r["config"] == "bf2"]
    if routed:
        ax1.plot([100 * r["sparsity"] for r in routed], [r["fused_us"] for r in routed], "^-",
                 label="LTE router + FFN")
    ax1.plot([50], [result["half_width_dense_us"]], "s", color="tab:red", label="dense F=5504")
    ax1.set_xlabel("experts off (%)")
    ax1.set_ylabel("FFN latency (us)")
    ax1.set_title("B=1, D=4096, F=11008, bf16")
    ax1.legend()
    bs = [r["tokens"] for r in result["batch_sweep"]]
    ax2.plot(bs, [r["us"] for r in result["batch_sweep"]], "o-", label="LTE kernel, union 50%")
    ax2.plot(bs, [result["dense_us"][str(b)] for b in bs], "k--", label="dense cuBLAS")
    ax2.set_xlabel("tokens per call B")
    ax2.set_ylabel("FFN latency (us)")
    ax2.set_title("masks whose union is 50% of experts")
    ax2.legend()
    fig.suptitle(f"{result['gpu']}, torch {result['torch']}, triton {result['triton']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def pdl_works(layer) -> bool:
    """Try programmatic dependent launch once (eager and in a graph); turn it off if it fails."""
    x = torch.randn(2, MODEL_WIDTH, device="cuda").to(DTYPE)
    mask = union_masks(2, 0.5, torch.Generator(device="cuda").manual_seed(1))
    try:
        time_calls([lambda: sparse_ffn_triton(x, mask, layer["w_up"], layer["w_down_t"], layer["w_gate"],
                                              None, None, EXPERT_SIZE, "silu")], replays=2, runs=1)
        return True
    except Exception as err:  # noqa: BLE001 - report and go on without PDL
        print(f"PDL failed ({type(err).__name__}: {err}); timing without it", flush=True)
        os.environ["LTE_PDL"] = "0"
        triton_ffn._pdl_supported.cache_clear()
        return False


def environment() -> dict:
    import triton

    commit = os.environ.get("LTE_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": commit, "dtype": str(DTYPE), "D": MODEL_WIDTH, "F": FFN_WIDTH, "S": EXPERT_SIZE,
            "copies": COPIES, "replays": REPLAYS, "runs": RUNS, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    parser.add_argument("--tune", action="store_true", help="also sweep tile sizes")
    parser.add_argument("--skip-checks", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = environment()

    if not args.skip_checks:
        cases = run_checks("cuda", (torch.float32, torch.float16, torch.bfloat16))
        failed = [c.case for c in cases if not c.ok]
        result["checks"] = {"cases": len(cases), "failed": failed}
        print(f"small-shape checks: {len(cases) - len(failed)}/{len(cases)} passed", flush=True)
        for case in failed[:10]:
            print("  FAIL", case)

    layers = make_layers(FFN_WIDTH, gen)
    result["pdl"] = pdl_works(layers[0])
    result["large_checks"] = check_large(layers, gen)
    result["routed_checks"] = check_routed(layers, gen)
    print("full-size checks:", result["large_checks"], result["routed_checks"], flush=True)
    result["copy_GBps"] = copy_bandwidth()
    tuned = None
    if args.tune:
        result["tune"], tuned = tune(layers, gen)
        result["tuned_config"] = {str(b): asdict(c) for b, c in tuned.items()}
        print("tuned:", result["tuned_config"], flush=True)

    batch_sizes = list(range(1, 17))
    result["dense_us"] = {str(b): time_dense(layers, b, gen) for b in batch_sizes}
    half = make_layers(FFN_WIDTH // 2, gen)
    result["half_width_dense_us"] = time_dense(half, 1, gen)
    del half
    result["b1_sweep"] = []
    for off in SPARSITIES:
        us = time_sparse(layers, 1, off, gen, config_for(tuned, 1))
        n_on = round(num_experts(FFN_WIDTH, EXPERT_SIZE) * (1 - off))
        result["b1_sweep"].append({"sparsity": off, "us": us, "speedup": result["dense_us"]["1"] / us,
                                   "GBps": bytes_read(n_on, 1) / (us * 1e-6) / 1e9})
    result["b1_50_via_op_us"] = time_sparse(layers, 1, 0.5, gen, via_op=True)
    result["no_pdl_us"] = {f"B{b}_{int(100 * off)}": time_sparse(
        layers, b, off, gen, replace(config_for(tuned, b) or default_config(b, MODEL_WIDTH, FFN_WIDTH), pdl=False))
        for b, off in ((1, 0.5), (1, 0.9), (8, 0.5))}
    result["batch_sweep"] = []
    n_half = round(num_experts(FFN_WIDTH, EXPERT_SIZE) * 0.5)
    for b in batch_sizes:
        us = time_sparse(layers, b, 0.5, gen, config_for(tuned, b))
        result["batch_sweep"].append({"tokens": b, "us": us, "speedup": result["dense_us"][str(b)] / us,
                                      "GBps": bytes_read(n_half, b) / (us * 1e-6) / 1e9})
    xs = [torch.randn(b, MODEL_WIDTH, generator=gen, device="cuda").to(DTYPE) for b in (1, 8)]
    w_router = torch.randn(num_experts(FFN_WIDTH, EXPERT_SIZE), MODEL_WIDTH, device="cuda").to(DTYPE)
    result["router_us"] = {str(x.shape[0]): time_calls([lambda x=x: router_mask_triton(x, w_router, 0.0)])
                           for x in xs}
    result["routed"] = routed_rows(layers, gen, result["dense_us"])
    result["default_config"] = {str(b): asdict(default_config(b, MODEL_WIDTH, FFN_WIDTH)) for b in (1, 4, 8)}

    with open(os.path.join(args.out, "ffn_kernel.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, "ffn_kernel.png"))

    dense1 = result["dense_us"]["1"]
    print(f"\n{result['gpu']} | torch {result['torch']} | triton {result['triton']} | commit {result['commit']}")
    print(f"copy bandwidth {result['copy_GBps']:.0f} GB/s (read+write); dense B=1 {dense1:.1f} us; "
          f"dense F=5504 {result['half_width_dense_us']:.1f} us ({dense1 / result['half_width_dense_us']:.2f}x)")
    print("B=1  | off % |   us  | speed-up | GB/s")
    for r in result["b1_sweep"]:
        print(f"     | {100 * r['sparsity']:5.0f} | {r['us']:5.1f} | {r['speedup']:7.2f}x | {r['GBps']:5.0f}")
    print(f"B=1 50% through torch.ops.lte.sparse_ffn: {result['b1_50_via_op_us']:.1f} us; PDL works: "
          f"{result['pdl']}; without PDL: {result['no_pdl_us']}")
    print("union 50% | B | us | dense us | speed-up")
    for r in result["batch_sweep"]:
        print(f"          | {r['tokens']:2d} | {r['us']:5.1f} | {result['dense_us'][str(r['tokens'])]:5.1f} "
              f"| {r['speedup']:.2f}x")
    print(f"router (fused GEMV+threshold) us: {result['router_us']}")
    print("router + FFN | B | off % | config | one op us | two ops us | dense us | one-op speed-up")
    for r in result["routed"]:
        print(f"             | {r['tokens']:2d} | {100 * r['sparsity']:3.0f} | {r['config']:>6} | {r['fused_us']:5.1f} "
              f"| {r['separate_us'] if r['separate_us'] is None else round(r['separate_us'], 1)} "
              f"| {r['dense_us']:5.1f} | {r['speedup']:.2f}x")


if __name__ == "__main__":
    main()

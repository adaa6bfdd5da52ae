"""Tune the decode kernels' tiles per FFN shape and token count on this GPU, within a time budget.

    PYTHONPATH=src python benchmarks/tune_kernels.py --budget 90 --out $OUT/kernel_configs.json

For each shape (D, F) and token count B (in priority order, until the budget runs out) each
launch is timed alone over a small list of candidate tiles (gate/up and down kernels at 0%, 50%
and 90% of experts off, the router once; each gate/up candidate also with the union's expert list,
`active_list`, its extra launch included), CUDA graphs over several weight copies (far more bytes
than the L2). The best tiles of each launch are combined, then the whole routed op (router + FFN)
is timed as it is, with the router launched behind the previous kernel, with the down kernel reading its
first expert's rows before it waits for the gate/up kernel (`out_prefetch`), with both, and with the weight
loads streamed through L2 (`stream_weights`, alone, with the router launched early, and with `active_list`
switched); the best is kept
only when it beats the untuned defaults. Score of a
setting: the geometric mean of its times over the sparsities (each sparsity counts the same).

Writes ``{"env", "table": {gpu: {"DxF": {"B": settings}}}, "rows", "errors"}`` after every point;
``LTE_KERNEL_CONFIGS=that.json`` (or ``lte.kernels.load_table``) makes the kernels use it, and
``lte.kernels.tuning.render_shipped`` turns its table into the shipped defaults.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
from dataclasses import replace

import torch
from bench_util import (
    DEVICE,
    EXPERT_SIZE,
    FFN_SHAPES,
    Deadline,
    copy_bandwidth,
    environment,
    ffn_weights,
    fixed_masks,
    guarded,
    log,
    routed_inputs,
    sync,
    time_graph,
    write_json,
)

from lte.kernels import triton_ffn as tf
from lte.kernels.tuning import KernelConfig, gpu_key, heuristic_config, shape_key

SPARSITIES = (0.0, 0.5, 0.9)
# Candidates, each checked to compile for sm_90 with Triton 3.6 without register spills (the last four gate/up "fma"
# ones not yet); every new
# candidate costs a compile (about a second), so the lists stay short. The first of each list is
# the default of lte.kernels.tuning.heuristic_config.
# gate/up: (block_f, block_k, warps, stages, programs per SM; 0 = one program per item)
IN_CANDIDATES = {
    # the last four: the shapes of Inductor's own reduction configs for a one-token product (one row a program and
    # 2048 of D a step, 16 warps, one stage; 8 rows x 512), whose fused gate/up kernel read 235 MB at 3.15 TB/s on an
    # H100 against this kernel's 2.58 (docs/benchmarks.md, "Long caches, ... Inductor's own GEMVs"); not yet timed
    "fma": [(2, 1024, 4, 3, 0), (4, 512, 4, 3, 0), (8, 512, 4, 3, 0), (2, 1024, 4, 3, 8), (4, 1024, 4, 3, 4),
            (1, 2048, 16, 1, 0), (1, 2048, 8, 1, 0), (2, 2048, 8, 1, 0), (8, 512, 8, 1, 0)],
    # the last: the shipped B = 8 tile on 8 warps; under Triton 3.9 the 4-warp one spills 56 bytes a thread (255
    # registers) without the union's list, this one none either way (142 / 146 registers; tests/compile_sm90.py)
    "dot16": [(32, 256, 4, 4, 0), (32, 128, 8, 3, 0), (16, 256, 4, 3, 0), (32, 64, 4, 4, 0), (32, 128, 4, 3, 4),
              (32, 256, 8, 3, 0)],
    "dot64": [(32, 128, 4, 4, 0), (32, 128, 8, 3, 0), (32, 64, 4, 4, 0), (16, 128, 4, 4, 0), (32, 128, 8, 3, 4)],
}
# down: (block_d, split, warps, stages)
OUT_CANDIDATES = {
    # the last: a wider column block, fewer splits and two stages, the best on the H100 (29.5 us at 50% off, B = 1);
    # 1,024 columns (16 warps) was dropped: 44.2 us there, and it spills 200 bytes a thread (tests/compile_sm90.py)
    "fma": [(256, 64, 4, 3), (512, 32, 8, 3), (256, 32, 4, 3), (128, 64, 4, 3), (512, 16, 8, 2)],
    # the last of dot16 and dot64: 128 columns on 8 warps; under Triton 3.9 the 4-warp tiles of 64 and 128 columns
    # spill 8-16 bytes a thread without the union's list (128 registers), these none either way
    "dot16": [(128, 32, 4, 3), (128, 16, 4, 3), (256, 16, 8, 3), (64, 32, 4, 3), (128, 16, 8, 3)],
    "dot64": [(128, 8, 4, 3), (64, 8, 4, 3), (128, 4, 4, 3), (64, 16, 4, 3), (128, 8, 8, 3)],
}
# router: (block_e, block_k (0 = all of D in one step when it fits), warps). For 2-16 tokens the router runs
# broadcast multiply-adds over D in block_k chunks, one dependent step each (16 at D = 4096 and 256): the
# mask launches alone showed it at 12 us for B = 8 against 3.4 for B = 1 on an H100 (docs/benchmarks.md), so
# the last three try fewer, larger steps (not yet checked for register spills: the timing decides).
ROUTER_CANDIDATES = {
    "fma": [(2, 0, 8), (1, 0, 4), (4, 0, 8)],
    "dot16": [(2, 256, 8), (2, 512, 8), (4, 256, 8), (2, 1024, 8), (1, 1024, 4), (1, 2048, 8)],
    "dot64": [(16, 128, 4), (16, 128, 8), (16, 256, 8)],
}


def family(num_tokens: int) -> str:
    return "fma" if num_tokens <= 1 else "dot16" if num_tokens <= 16 else "dot64"


def with_in(cfg: KernelConfig, cand) -> KernelConfig:
    bf, bk, w, st, pps = cand
    return replace(cfg, in_block_f=bf, in_block_k=bk, in_warps=w, in_stages=st, in_progs_per_sm=pps)


def with_out(cfg: KernelConfig, cand) -> KernelConfig:
    bd, sp, w, st = cand
    return replace(cfg, out_block_d=bd, out_split=sp, out_warps=w, out_stages=st)


def with_router(cfg: KernelConfig, cand) -> KernelConfig:
    be, bk, w = cand
    return replace(cfg, router_block_e=be, router_block_k=bk, router_warps=w)


def geo(times) -> float:
    return math.exp(sum(math.log(t) for t in times) / len(times))


class Bench:
    """Weights and inputs of one (shape, B) point, and timers for each launch alone and the whole op."""

    def __init__(self, model_width: int, ffn_width: int, num_tokens: int, copies: int, gen: torch.Generator,
                 expert_size: int = EXPERT_SIZE):
        self.D, self.F, self.B, self.S = model_width, ffn_width, num_tokens, expert_size
        self.E = -(-ffn_width // expert_size)
        self.layers = ffn_weights(model_width, ffn_width, copies, torch.bfloat16, gen)
        self.inputs = {}  # sparsity -> [(x, mask, w_router)] per layer
        for off in SPARSITIES:
            rows = []
            for _ in self.layers:
                mask = fixed_masks(num_tokens, self.E, off, gen)
                x, w_router = routed_inputs(mask, model_width, torch.bfloat16)
                rows.append((x, mask, w_router))
            self.inputs[off] = rows

    def _plans(self, off: float, cfg: KernelConfig):
        plans = []
        for layer, (x, mask, _) in zip(self.layers, self.inputs[off]):
            p = tf.plan_launch(x, mask, layer["w_up"], layer["w_down_t"], layer["w_gate"], None, None,
                               self.S, "silu", cfg)
            tf.launch_union(p)
            plans.append(p)
        sync()
        return plans

    def time_in(self, off: float, cfg: KernelConfig) -> float:
        plans = self._plans(off, cfg)
        return time_graph([lambda p=p: tf.launch_in(p) for p in plans])

    def time_out(self, off: float, cfg: KernelConfig) -> float:
        plans = self._plans(off, cfg)
        for p in plans:
            tf.launch_in(p)
        return time_graph([lambda p=p: (tf.launch_out(p), tf.launch_finish(p)) for p in plans])

    def time_router(self, cfg: KernelConfig) -> float:
        rows = self.inputs[0.5]
        mask_buf = [torch.empty(self.B, self.E, dtype=torch.uint8, device=DEVICE) for _ in rows]
        union_buf = [torch.empty(self.E, dtype=torch.int8, device=DEVICE) for _ in rows]
        pdl = tf._pdl_supported(rows[0][0].device)
        return time_graph([lambda x=x, w=w, m=m, u=u: tf.launch_router(x, w, 0.0, m, u, None, cfg, pdl)
                           for (x, _, w), m, u in zip(rows, mask_buf, union_buf)])

    def time_routed(self, off: float, cfg: KernelConfig) -> float:
        calls = []
        for layer, (x, _, w_router) in zip(self.layers, self.inputs[off]):
            calls.append(lambda x=x, w=w_router, layer=layer: tf.routed_sparse_ffn_triton(
                x, w, 0.0, layer["w_up"], layer["w_down_t"], layer["w_gate"], None, None, self.S, "silu", cfg))
        return time_graph(calls)


def tune_point(bench: Bench, base: KernelConfig, rows: list, errors: list, deadline: Deadline) -> KernelConfig | None:
    """Best settings for one (shape, B): the defaults when nothing beat them; None when the defaults failed."""
    fam = family(bench.B)
    point = {"D": bench.D, "F": bench.F, "B": bench.B, "S": bench.S}
    default_times = [guarded(errors, f"default {point} off={off}", bench.time_routed, off, base)
                     for off in SPARSITIES]
    if any(t is None for t in default_times):
        return None
    rows.append({**point, "what": "routed default", "config": base.to_dict(),
                 "us": dict(zip(map(str, SPARSITIES), default_times))})
    best_in, best_in_score = None, math.inf
    # each gate/up candidate with the union's prefix sum in every program and with the union's list (`active_list`:
    # one more launch, then one load a program), timed with that launch
    for cand, listed in itertools.product(IN_CANDIDATES[fam], (False, True)):
        if deadline.over(5):
            break
        cfg = replace(with_in(base, cand), active_list=listed)
        times = [guarded(errors, f"in {cand} list={listed} {point} off={off}", bench.time_in, off, cfg)
                 for off in SPARSITIES]
        if any(t is None for t in times):
            continue
        rows.append({**point, "what": "gate/up", "candidate": cand, "active_list": listed,
                     "us": dict(zip(map(str, SPARSITIES), times))})
        if geo(times) < best_in_score:
            best_in, best_in_score = (cand, listed), geo(times)
    best_out, best_out_score = None, math.inf
    for cand in OUT_CANDIDATES[fam]:
        if deadline.over(4):
            break
        cfg = with_out(base, cand)
        times = [guarded(errors, f"out {cand} {point} off={off}", bench.time_out, off, cfg) for off in SPARSITIES]
        if any(t is None for t in times):
            continue
        rows.append({**point, "what": "down+finish", "candidate": cand, "us": dict(zip(map(str, SPARSITIES), times))})
        if geo(times) < best_out_score:
            best_out, best_out_score = cand, geo(times)
    best_group = None  # small power-of-two experts: the down kernel's experts per step, half and twice the automatic
    if best_out is not None and bench.S < 32 and bench.S & (bench.S - 1) == 0:
        auto = 32 // bench.S
        for group in (max(1, auto // 2), auto * 2):
            if deadline.over(4):
                break
            cfg = replace(with_out(base, best_out), out_group=group)
            times = [guarded(errors, f"out group {group} {point} off={off}", bench.time_out, off, cfg)
                     for off in SPARSITIES]
            if any(t is None for t in times):
                continue
            rows.append({**point, "what": "down group", "candidate": group, "us": dict(zip(map(str, SPARSITIES), times))})
            if geo(times) < best_out_score:
                best_group, best_out_score = group, geo(times)
    best_router, best_router_us = None, math.inf
    for cand in ROUTER_CANDIDATES[fam]:
        if deadline.over(3):
            break
        us = guarded(errors, f"router {cand} {point}", bench.time_router, with_router(base, cand))
        if us is None:
            continue
        rows.append({**point, "what": "router", "candidate": cand, "us": us})
        if us < best_router_us:
            best_router, best_router_us = cand, us
    cfg = base
    if best_in is not None:
        cfg = replace(with_in(cfg, best_in[0]), active_list=best_in[1])
    if best_out is not None:
        cfg = with_out(cfg, best_out)
    if best_group is not None:
        cfg = replace(cfg, out_group=best_group)
    if best_router is not None:
        cfg = with_router(cfg, best_router)
    best, best_score = None, geo(default_times)
    for variant in (cfg, replace(cfg, router_pdl=True), replace(cfg, out_prefetch=True),
                    replace(cfg, router_pdl=True, out_prefetch=True), replace(cfg, stream_weights=True),
                    replace(cfg, router_pdl=True, stream_weights=True),
                    replace(cfg, stream_weights=True, active_list=not cfg.active_list)):
        if deadline.over(2):
            break
        times = [guarded(errors, f"routed {point} off={off}", bench.time_routed, off, variant) for off in SPARSITIES]
        if any(t is None for t in times):
            continue
        rows.append({**point, "what": "routed candidate", "config": variant.to_dict(),
                     "us": dict(zip(map(str, SPARSITIES), times))})
        if geo(times) < best_score:
            best, best_score = variant, geo(times)
    log(f"tuned D={bench.D} F={bench.F} B={bench.B}: default {geo(default_times):.1f} us (geo mean) -> "
        f"{best_score:.1f} us{'' if best is not None else ' (kept the defaults)'}")
    return best if best is not None else base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=90.0, help="seconds; points not started by then are skipped")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"),
                                                      "kernel_configs.json"))
    parser.add_argument("--shapes", nargs="+", default=["llama3-8b", "llama2-7b", "qwen2.5-7b"],
                        choices=sorted(FFN_SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--gb", type=float, default=1.2, help="GB of weight copies per point (>> L2)")
    parser.add_argument("--expert-size", type=int, default=EXPERT_SIZE,
                        help="neurons per expert; rows for sizes other than 32 go to their own 'DxF/sS' keys")
    args = parser.parse_args()
    deadline = Deadline(args.budget)
    env = environment()
    gpu = gpu_key(env["gpu"])
    result = {"env": env, "gpu_key": gpu, "table": {gpu: {}}, "rows": [], "errors": [], "skipped": []}
    log(f"tuning on {env['gpu']} ({gpu}), {args.expert_size}-neuron experts, budget {args.budget:.0f} s")
    result["copy_GBps"] = guarded(result["errors"], "copy bandwidth", copy_bandwidth)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 4
    # priority: the first shape at its first three batch sizes (each batch family compiles its own
    # kernels), then every shape at the first two, then the rest
    first = [(args.shapes[0], b) for b in args.tokens[:3]]
    order = first + [(s, b) for s in args.shapes[1:] for b in args.tokens[:2]] + \
        [(s, b) for b in args.tokens[2:] for s in args.shapes]
    seen = set()
    for name, num_tokens in order:
        model_width, ffn_width = FFN_SHAPES[name]
        key = (model_width, ffn_width, num_tokens)
        if key in seen:
            continue
        seen.add(key)
        if deadline.over(8):
            result["skipped"].append({"shape": name, "B": num_tokens, "why": "time budget"})
            continue
        log(f"tuning {name} D={model_width} F={ffn_width} B={num_tokens} ({deadline.left():.0f} s left)")
        copies = max(2, math.ceil(args.gb * 1e9 / (3 * model_width * ffn_width * 2)))
        bench = guarded(result["errors"], f"weights {name}", Bench, model_width, ffn_width, num_tokens, copies, gen,
                        args.expert_size)
        if bench is None:
            continue
        base = heuristic_config(num_tokens, model_width, ffn_width, num_sms)  # the untuned start, any S
        best = guarded(result["errors"], f"tune {name} B={num_tokens}", tune_point, bench, base, result["rows"],
                       result["errors"], deadline)
        if best is not None:
            table_key = shape_key(model_width, ffn_width, args.expert_size)
            result["table"][gpu].setdefault(table_key, {})[str(num_tokens)] = best.to_dict()
        del bench
        (torch.cuda.empty_cache() if DEVICE == "cuda" else None)
        write_json(args.out, result)
    write_json(args.out, result)
    log(f"wrote {args.out}: {sum(len(v) for v in result['table'][gpu].values())} tuned rows, "
        f"{len(result['errors'])} errors, {len(result['skipped'])} skipped")


if __name__ == "__main__":
    main()

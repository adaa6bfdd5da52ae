"""Tile tuning of the decode kernels on the GPU at hand, per FFN shape and token count (`lte tune`).

For each FFN shape (D model width, F FFN width) and token count B, in priority order until the time
budget runs out, each launch is timed alone over a short list of candidate tiles: the gate/up kernel
(each candidate also with the union's expert list, `active_list`, its extra launch included), the
down kernel with its finish, and the router, at 0%, 50% and 90% of the experts off, in CUDA graphs
over enough random weight copies to miss the L2. The best tiles of each launch are combined, then the
whole routed op (router + FFN) is timed as it is and with the variants that interact (the router
launched behind the previous kernel, the down kernel's read-ahead, streamed weight loads); a setting
is kept only when it beats the untuned defaults (`heuristic_config`). Score of a setting: the
geometric mean of its times over the sparsities.

    result = tune([(4096, 14336)], tokens=(1, 8), budget=120)
    result["table"]     # {gpu: {"DxF": {"B": settings}}}: what `lte.kernels.tuning` looks up

The weights are random (only the shapes matter for speed). This module imports no model code.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch

from . import triton_ffn as tf
from .tuning import TABLE_EXPERT_SIZE, KernelConfig, heuristic_config, shape_key

SPARSITIES = (0.0, 0.5, 0.9)
#: Candidates per kernel family ("fma": one token, "dot16": 2-16 tokens, "dot64": more), each first the
#: heuristic default. Every candidate costs a compile (about a second), so the lists stay short; their history
#: (which GPU run or compile audit added or dropped each) is in docs/benchmarks.md.
#: gate/up: (rows a program, D a step, warps, stages, programs per SM; 0 = one program per item)
IN_CANDIDATES: dict[str, list[tuple[int, int, int, int, int]]] = {
    "fma": [(2, 1024, 4, 3, 0), (4, 512, 4, 3, 0), (8, 512, 4, 3, 0), (2, 1024, 4, 3, 8), (4, 1024, 4, 3, 4),
            (1, 2048, 16, 1, 0), (1, 2048, 8, 1, 0), (2, 2048, 8, 1, 0), (8, 512, 8, 1, 0)],
    "dot16": [(32, 256, 4, 4, 0), (32, 128, 8, 3, 0), (16, 256, 4, 3, 0), (32, 64, 4, 4, 0), (32, 128, 4, 3, 4),
              (32, 256, 8, 3, 0)],
    "dot64": [(32, 128, 4, 4, 0), (32, 128, 8, 3, 0), (32, 64, 4, 4, 0), (16, 128, 4, 4, 0), (32, 128, 8, 3, 4)],
}
#: down: (columns a program, splits of the active experts, warps, stages)
OUT_CANDIDATES: dict[str, list[tuple[int, int, int, int]]] = {
    "fma": [(256, 64, 4, 3), (512, 32, 8, 3), (256, 32, 4, 3), (128, 64, 4, 3), (512, 16, 8, 2)],
    "dot16": [(128, 32, 4, 3), (128, 16, 4, 3), (256, 16, 8, 3), (64, 32, 4, 3), (128, 16, 8, 3)],
    "dot64": [(128, 8, 4, 3), (64, 8, 4, 3), (128, 4, 4, 3), (64, 16, 4, 3), (128, 8, 8, 3)],
}
#: router: (experts a program, D a step (0 = all of D in one step when it fits), warps)
ROUTER_CANDIDATES: dict[str, list[tuple[int, int, int]]] = {
    "fma": [(2, 0, 8), (1, 0, 4), (4, 0, 8)],
    "dot16": [(2, 256, 8), (2, 512, 8), (4, 256, 8), (2, 1024, 8), (1, 1024, 4), (1, 2048, 8)],
    "dot64": [(16, 128, 4), (16, 128, 8), (16, 256, 8)],
}


def family(num_tokens: int) -> str:
    """The candidate list a token count takes (the kernels switch from FMA to `tl.dot` above one token)."""
    return "fma" if num_tokens <= 1 else "dot16" if num_tokens <= 16 else "dot64"


def with_in(cfg: KernelConfig, cand: Sequence[int]) -> KernelConfig:
    bf, bk, w, st, pps = cand
    return replace(cfg, in_block_f=bf, in_block_k=bk, in_warps=w, in_stages=st, in_progs_per_sm=pps)


def with_out(cfg: KernelConfig, cand: Sequence[int]) -> KernelConfig:
    bd, sp, w, st = cand
    return replace(cfg, out_block_d=bd, out_split=sp, out_warps=w, out_stages=st)


def with_router(cfg: KernelConfig, cand: Sequence[int]) -> KernelConfig:
    be, bk, w = cand
    return replace(cfg, router_block_e=be, router_block_k=bk, router_warps=w)


def geo(times: Iterable[float]) -> float:
    """Geometric mean."""
    times = list(times)
    return math.exp(sum(math.log(t) for t in times) / len(times))


# --------------------------------------------------------------------------- timing and inputs
class Deadline:
    """A wall-clock budget: ``left()`` seconds remain; ``over(need)`` when less than ``need`` remain."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def over(self, need: float = 0.0) -> bool:
        return self.left() < need


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def guarded(errors: list[dict[str, Any]], what: str, fn: Callable, *args, **kwargs) -> Any:
    """Run fn; on an exception record it (with the traceback tail), print it and return None."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - one failed candidate or point must not stop the others
        tb = traceback.format_exc(limit=6)
        errors.append({"what": what, "error": f"{type(err).__name__}: {err}", "traceback": tb[-3000:]})
        log(f"FAILED {what}: {type(err).__name__}: {str(err)[:300]}")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - a sticky CUDA error: later points fail too, and say so
                pass
        return None


def time_graph(calls: Sequence[Callable[[], Any]], cuda: bool = True, replays: int = 10, runs: int = 3) -> float:
    """Median microseconds per call of ``calls`` (closures) captured together in one CUDA graph
    (``cuda=False``: one eager pass after a warm-up, for smoke runs on a CPU; meaningless as a time)."""
    for call in calls:  # compile kernels, create cuBLAS handles
        call()
    if not cuda:
        start = time.perf_counter()
        for call in calls:
            call()
        return (time.perf_counter() - start) * 1e6 / len(calls)
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
    del graph
    return statistics.median(per_call)


def random_ffn(model_width: int, ffn_width: int, copies: int, dtype: torch.dtype, gen: torch.Generator,
               device: str | torch.device) -> list[dict[str, torch.Tensor]]:
    """``copies`` layers of random SwiGLU weights: w_gate, w_up [F, D], w_down [D, F] (as nn.Linear stores it,
    for cuBLAS) and w_down_t [F, D] (the kernels' layout)."""
    layers = []
    for _ in range(copies):
        def rand(rows, cols, scale):
            return (torch.randn(rows, cols, generator=gen, device=device) * scale).to(dtype)

        w_down = rand(model_width, ffn_width, ffn_width**-0.5)
        layers.append({"w_gate": rand(ffn_width, model_width, model_width**-0.5),
                       "w_up": rand(ffn_width, model_width, model_width**-0.5),
                       "w_down": w_down, "w_down_t": w_down.t().contiguous()})
    return layers


def fixed_masks(num_tokens: int, num_exp: int, off: float, gen: torch.Generator,
                device: str | torch.device) -> torch.Tensor:
    """The same round(E * (1 - off)) experts on for every token: [B, E] bool."""
    n_on = round(num_exp * (1.0 - off))
    on = torch.zeros(num_exp, dtype=torch.bool, device=device)
    on[torch.randperm(num_exp, generator=gen, device=device)[:n_on]] = True
    return on[None, :].expand(num_tokens, num_exp).contiguous()


def routed_inputs(mask: torch.Tensor, model_width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, D] and router weights [E, D] whose logits (threshold 0) reproduce ``mask`` [B, E].

    Token b is the unit vector e_b; router row e holds +1 at column b where token b uses expert e
    and -1 elsewhere (values do not change the kernels' speed, only which experts run). The summed
    sigmoid scores rank experts by how many tokens want them (what a batch budget keeps)."""
    num_tokens, num_exp = mask.shape
    if num_tokens > model_width:
        raise ValueError(f"routed_inputs: {num_tokens} tokens need a model width of at least that, got {model_width}")
    x = torch.zeros(num_tokens, model_width, device=mask.device, dtype=dtype)
    x[torch.arange(num_tokens), torch.arange(num_tokens)] = 1.0
    w_router = torch.zeros(num_exp, model_width, device=mask.device, dtype=dtype)
    w_router[:, :num_tokens] = torch.where(mask.t(), 1.0, -1.0).to(dtype)  # [E, B]
    return x, w_router


# --------------------------------------------------------------------------- one (shape, B) point
class Point:
    """Weights and inputs of one (shape, B) point, and timers for each launch alone and the whole op."""

    def __init__(self, model_width: int, ffn_width: int, num_tokens: int, copies: int, gen: torch.Generator,
                 expert_size: int = TABLE_EXPERT_SIZE, device: str | torch.device = "cuda") -> None:
        self.D, self.F, self.B, self.S = model_width, ffn_width, num_tokens, expert_size
        self.E = -(-ffn_width // expert_size)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.layers = random_ffn(model_width, ffn_width, copies, torch.bfloat16, gen, device)
        self.inputs = {}  # sparsity -> [(x, mask, w_router)] per layer
        for off in SPARSITIES:
            rows = []
            for _ in self.layers:
                mask = fixed_masks(num_tokens, self.E, off, gen, device)
                x, w_router = routed_inputs(mask, model_width, torch.bfloat16)
                rows.append((x, mask, w_router))
            self.inputs[off] = rows

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _plans(self, off: float, cfg: KernelConfig) -> list:
        plans = []
        for layer, (x, mask, _) in zip(self.layers, self.inputs[off]):
            p = tf.plan_launch(x, mask, layer["w_up"], layer["w_down_t"], layer["w_gate"], None, None,
                               self.S, "silu", cfg)
            tf.launch_union(p)
            plans.append(p)
        self._sync()
        return plans

    def time_in(self, off: float, cfg: KernelConfig) -> float:
        plans = self._plans(off, cfg)
        return time_graph([lambda p=p: tf.launch_in(p) for p in plans], self.cuda)

    def time_out(self, off: float, cfg: KernelConfig) -> float:
        plans = self._plans(off, cfg)
        for p in plans:
            tf.launch_in(p)
        return time_graph([lambda p=p: (tf.launch_out(p), tf.launch_finish(p)) for p in plans], self.cuda)

    def time_router(self, cfg: KernelConfig) -> float:
        rows = self.inputs[0.5]
        mask_buf = [torch.empty(self.B, self.E, dtype=torch.uint8, device=self.device) for _ in rows]
        union_buf = [torch.empty(self.E, dtype=torch.int8, device=self.device) for _ in rows]
        pdl = tf._pdl_supported(self.device)
        return time_graph([lambda x=x, w=w, m=m, u=u: tf.launch_router(x, w, 0.0, m, u, None, cfg, pdl)
                           for (x, _, w), m, u in zip(rows, mask_buf, union_buf)], self.cuda)

    def time_routed(self, off: float, cfg: KernelConfig) -> float:
        calls = []
        for layer, (x, _, w_router) in zip(self.layers, self.inputs[off]):
            calls.append(lambda x=x, w=w_router, layer=layer: tf.routed_sparse_ffn_triton(
                x, w, 0.0, layer["w_up"], layer["w_down_t"], layer["w_gate"], None, None, self.S, "silu", cfg))
        return time_graph(calls, self.cuda)


def _timed(errors: list, what: str, fn: Callable[[float], float]) -> list[float] | None:
    """fn at every sparsity, or None when any of them failed."""
    times = [guarded(errors, f"{what} off={off}", fn, off) for off in SPARSITIES]
    return None if any(t is None for t in times) else times


def _best(point: Point, cands: Sequence, cfg_of: Callable[[Any], KernelConfig], timer: Callable, what: str,
          rows: list, errors: list, deadline: Deadline, need: float,
          fields: Callable[[Any], dict] = lambda cand: {"candidate": cand}) -> tuple[Any, float]:
    """The candidate of lowest geometric-mean time (None when none ran) and that score; each timed candidate
    becomes a row of ``rows`` (``fields(cand)`` names it there)."""
    best, best_score = None, math.inf
    head = {"D": point.D, "F": point.F, "B": point.B, "S": point.S}
    for cand in cands:
        if deadline.over(need):
            break
        cfg = cfg_of(cand)
        times = _timed(errors, f"{what} {cand} {head}", lambda off, cfg=cfg: timer(off, cfg))
        if times is None:
            continue
        rows.append({**head, "what": what, **fields(cand), "us": dict(zip(map(str, SPARSITIES), times))})
        if geo(times) < best_score:
            best, best_score = cand, geo(times)
    return best, best_score


def tune_point(point: Point, base: KernelConfig, rows: list, errors: list, deadline: Deadline,
               candidates: dict[str, dict[str, list]] | None = None) -> KernelConfig | None:
    """Best settings for one (shape, B): ``base`` when nothing beat it; None when ``base`` itself failed.
    ``candidates``: {"in"/"out"/"router": {family: [...]}} to replace the default lists."""
    cands = {"in": IN_CANDIDATES, "out": OUT_CANDIDATES, "router": ROUTER_CANDIDATES, **(candidates or {})}
    fam = family(point.B)
    head = {"D": point.D, "F": point.F, "B": point.B, "S": point.S}
    default_times = _timed(errors, f"default {head}", lambda off: point.time_routed(off, base))
    if default_times is None:
        return None
    rows.append({**head, "what": "routed default", "config": base.to_dict(),
                 "us": dict(zip(map(str, SPARSITIES), default_times))})
    # each gate/up candidate with the union's prefix sum in every program and with the union's list (one more
    # launch, then one load a program), timed with that launch
    best_in, _ = _best(point, list(itertools.product(cands["in"][fam], (False, True))),
                       lambda c: replace(with_in(base, c[0]), active_list=c[1]), point.time_in, "gate/up",
                       rows, errors, deadline, 5, lambda c: {"candidate": c[0], "active_list": c[1]})
    best_out, best_out_score = _best(point, cands["out"][fam], lambda c: with_out(base, c), point.time_out,
                                     "down+finish", rows, errors, deadline, 4)
    best_group = None  # small power-of-two experts: the down kernel's experts per step, half and twice the automatic
    if best_out is not None and point.S < 32 and point.S & (point.S - 1) == 0:
        auto = 32 // point.S
        group, score = _best(point, (max(1, auto // 2), auto * 2),
                             lambda g: replace(with_out(base, best_out), out_group=g), point.time_out,
                             "down group", rows, errors, deadline, 4)
        if score < best_out_score:
            best_group = group
    best_router, best_router_us = None, math.inf
    for cand in cands["router"][fam]:
        if deadline.over(3):
            break
        us = guarded(errors, f"router {cand} {head}", point.time_router, with_router(base, cand))
        if us is None:
            continue
        rows.append({**head, "what": "router", "candidate": cand, "us": us})
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
        times = _timed(errors, f"routed {head}", lambda off, v=variant: point.time_routed(off, v))
        if times is None:
            continue
        rows.append({**head, "what": "routed candidate", "config": variant.to_dict(),
                     "us": dict(zip(map(str, SPARSITIES), times))})
        if geo(times) < best_score:
            best, best_score = variant, geo(times)
    log(f"tuned D={point.D} F={point.F} B={point.B}: default {geo(default_times):.1f} us (geo mean) -> "
        f"{best_score:.1f} us{'' if best is not None else ' (kept the defaults)'}")
    return best if best is not None else base


def tune_order(shapes: Sequence[tuple[int, int]], tokens: Sequence[int]) -> list[tuple[int, int, int]]:
    """(D, F, B) in priority order: the first shape at its first three token counts (each kernel family
    compiles its own kernels), then every other shape at the first two, then the rest; no repeats."""
    first = [(*shapes[0], b) for b in tokens[:3]]
    rest = [(*s, b) for s in shapes[1:] for b in tokens[:2]] + [(*s, b) for b in tokens[2:] for s in shapes]
    order: list[tuple[int, int, int]] = []
    for key in first + rest:
        if key not in order:
            order.append(key)
    return order


def tune(shapes: Sequence[tuple[int, int]], tokens: Sequence[int] = (1, 8, 32, 64), budget: float = 120.0,
         expert_size: int = TABLE_EXPERT_SIZE, gb: float = 1.2, device: str | torch.device = "cuda",
         candidates: dict[str, dict[str, list]] | None = None,
         on_point: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Tune the kernels' tiles for ``shapes`` [(D, F)] at ``tokens`` within ``budget`` seconds.

    Returns ``{"gpu", "gpu_key", "table": {gpu_key: {"DxF": {"B": settings}}}, "rows", "errors", "skipped"}``
    (``rows``: every timing, us); ``on_point(result)`` runs after each finished point (to save it, so an
    interruption loses nothing finished). ``gb``: GB of weight copies per point (far more than the L2).
    ``device="cpu"`` runs the same code through Triton's interpreter (set TRITON_INTERPRET=1 first) for tests;
    its times mean nothing."""
    device = torch.device(device)
    if not shapes:
        raise ValueError("tune: give at least one FFN shape (D, F)")
    for d, f in shapes:
        if d < 1 or f < 1:
            raise ValueError(f"tune: FFN shape ({d}, {f}) must have positive widths")
    if not tokens or any(b < 1 or b > tf.MAX_TOKENS for b in tokens):
        raise ValueError(f"tune: token counts must lie in 1..{tf.MAX_TOKENS}, got {list(tokens)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("tune: no CUDA device here; the kernels' tiles are tuned on the GPU that serves them")
    gpu, num_sms = tf._device_info(device)  # the table key the launches look up, as they compute it
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    deadline = Deadline(budget)
    result: dict[str, Any] = {"gpu": name, "gpu_key": gpu, "table": {gpu: {}}, "rows": [], "errors": [],
                              "skipped": []}
    log(f"tuning on {name} ({gpu}), {expert_size}-neuron experts, budget {budget:.0f} s")
    gen = torch.Generator(device=device).manual_seed(0)
    for model_width, ffn_width, num_tokens in tune_order(list(shapes), list(tokens)):
        if deadline.over(8):
            result["skipped"].append({"D": model_width, "F": ffn_width, "B": num_tokens, "why": "time budget"})
            continue
        log(f"tuning D={model_width} F={ffn_width} B={num_tokens} ({deadline.left():.0f} s left)")
        copies = max(2, math.ceil(gb * 1e9 / (3 * model_width * ffn_width * 2))) if device.type == "cuda" else 2
        point = guarded(result["errors"], f"weights D={model_width} F={ffn_width}", Point, model_width, ffn_width,
                        num_tokens, copies, gen, expert_size, device)
        if point is None:
            continue
        base = heuristic_config(num_tokens, model_width, ffn_width, num_sms)  # the untuned start
        best = guarded(result["errors"], f"tune D={model_width} F={ffn_width} B={num_tokens}", tune_point, point,
                       base, result["rows"], result["errors"], deadline, candidates)
        if best is not None:
            key = shape_key(model_width, ffn_width, expert_size)
            result["table"][gpu].setdefault(key, {})[str(num_tokens)] = best.to_dict()
        del point
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if on_point is not None:
            on_point(result)
    return result

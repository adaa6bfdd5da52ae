"""FFN-level benchmark of the LTE decode kernels against dense cuBLAS, per model shape and batch size.

    PYTHONPATH=src python benchmarks/ffn_kernel.py [--budget 100] [--out DIR] [--shapes ...] [--tokens 1 8 32 64]

For each FFN shape of the shape table (LLaMA-2-7B, Llama-3-8B / Mistral-7B, Qwen2.5-7B; bf16,
random weights) and each token count B, in one process and the same CUDA-graph loop:
- dense: the HF SwiGLU MLP through cuBLAS (gate, up, down ``F.linear`` + SiLU-mul);
- LTE: ``routed_sparse_ffn`` (router + budget + FFN kernels, what ``SparseMLP`` runs at decode) with
  the same experts off for every token at 0/50/70/90% (95% too at B=1), per-token masks at 50%
  (each token its own half of the experts: the union grows with B), and the same per-token masks
  under a per-batch budget of half the experts (B >= 8);
- anchors: the kernels without the router (mask given) at 50%, a dense FFN half as wide at B=1,
  and prefill (512 tokens: dense vs the masked dense path LTE keeps for prefill, with the router's
  threshold inside the masked activation launch, with separate sigmoid / compare launches, and
  ``prefill_lte_stacked``: gate, up and router in one product, the path a gated ``SparseMLP`` takes);
- ``lte_dense_path``: at each B, that masked dense path with every expert on: what the decoder's
  dispatch (``lte.serving.dispatch``) runs when the batch's union is (nearly) full;
  ``lte_dense_stacked``: the same with the gate, up and router rows as one matrix (one cuBLAS product for
  the three, ``stacked_masked_dense_ffn``), what a gated ``SparseMLP`` runs there since 2026-12-07; at every B its
  first product alone (``gate_up_stacked``, [2F + E, D], as SparseMLP stores it; ``gate_up_stacked_2f``
  without the router rows) beside the dense FFN's two (``gate_up_separate``), to see where the full union's cost
  over dense lies;
- with ``--fp8``: ``lte_fp8``, the same fixed masks with the FFN matrices in fp8 (e4m3, one fp32
  scale per row; ``lte.kernels.quantize_rows_fp8``), against the same bf16 dense cuBLAS FFN; and
  ``lte_fp8_wide``, the same with tiles twice as wide along D (the bf16-tuned tiles' bytes per load).
Every call sits in a CUDA graph over several weight copies (far more bytes than the L2), replayed;
the figure is the median over runs of the time per call. Bytes needed = the union's gate/up/down
slabs + router + x/y; GB/s = bytes needed / time, next to the measured copy bandwidth; the ideal
is bytes needed / copy bandwidth. Writes ffn_kernel.json to --out after every shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import math
import os

import torch
import torch.nn.functional as F_
from bench_util import (
    DEVICE,
    EXPERT_SIZE,
    FFN_SHAPES,
    Deadline,
    copy_bandwidth,
    environment,
    ffn_bytes,
    ffn_weights,
    fixed_masks,
    guarded,
    log,
    per_token_masks,
    routed_inputs,
    time_graph,
    write_json,
)

from lte.kernels import (
    masked_dense_ffn,
    quantize_rows_fp8,
    routed_masked_dense_ffn,
    stack_ffn_inputs,
    stacked_masked_dense_ffn,
)
from lte.kernels.triton_ffn import default_config, routed_sparse_ffn_triton, sparse_ffn_triton
from lte.serving.dispatch import dense_crossing

DTYPE = torch.bfloat16
PREFILL_TOKENS = 512


def fp8_wide_config(cfg, model_width: int):
    """``cfg`` (tuned for 2-byte weights) with twice the model-width elements per gate/up load and per
    down-projection program, at most the next power of two of D: the same bytes per tile for fp8."""
    cap = 1 << (model_width - 1).bit_length()
    return dataclasses.replace(cfg, in_block_k=min(2 * cfg.in_block_k, cap), out_block_d=min(2 * cfg.out_block_d, cap))


def dense_ffn(x, layer):
    """HF LlamaMLP: down(silu(gate(x)) * up(x)) through cuBLAS."""
    return F_.linear(F_.silu(F_.linear(x, layer["w_gate"])) * F_.linear(x, layer["w_up"]), layer["w_down"])


class ShapeBench:
    """One FFN shape: weight copies and timers for dense and LTE calls."""

    def __init__(self, model_width: int, ffn_width: int, gb: float, gen: torch.Generator,
                 expert_size: int = EXPERT_SIZE):
        self.D, self.F, self.S = model_width, ffn_width, expert_size
        self.E = -(-ffn_width // expert_size)
        copies = max(2, math.ceil(gb * 1e9 / (3 * model_width * ffn_width * 2)))
        self.layers = ffn_weights(model_width, ffn_width, copies, DTYPE, gen)
        self.gen = gen

    def xs(self, num_tokens: int) -> list[torch.Tensor]:
        return [torch.randn(num_tokens, self.D, generator=self.gen, device=DEVICE).to(DTYPE) for _ in self.layers]

    def dense(self, num_tokens: int) -> float:
        return time_graph([lambda x=x, layer=layer: dense_ffn(x, layer) for x, layer in zip(self.xs(num_tokens),
                                                                                           self.layers)])

    def routed(self, masks: list[torch.Tensor], budget: int = 0) -> tuple[float, float]:
        """(us per call, mean union fraction actually computed) of router + FFN for per-layer masks."""
        calls, unions = [], []
        for mask, layer in zip(masks, self.layers):
            x, w_router = routed_inputs(mask, self.D, DTYPE)
            _, used = routed_sparse_ffn_triton(x, w_router, 0.0, layer["w_up"], layer["w_down_t"], layer["w_gate"],
                                               None, None, self.S, "silu", budget=budget)
            unions.append(float(used.any(0).float().mean()))
            calls.append(lambda x=x, w=w_router, layer=layer: routed_sparse_ffn_triton(
                x, w, 0.0, layer["w_up"], layer["w_down_t"], layer["w_gate"], None, None, self.S, "silu",
                budget=budget))
        return time_graph(calls), sum(unions) / len(unions)

    def routed_fp8(self, masks: list[torch.Tensor], widen: bool = False) -> tuple[float, float]:
        """``routed`` with the FFN matrices in fp8 (row scales); the router stays bf16. ``widen``: tiles
        of twice the elements along the model width (``fp8_wide_config``), so that each load moves as
        many bytes as the bf16-tuned tile it replaces."""
        if not hasattr(self, "fp8_layers"):
            self.fp8_layers = [{k: quantize_rows_fp8(layer[k]) for k in ("w_gate", "w_up", "w_down_t")}
                               for layer in self.layers]
        calls, unions = [], []
        for mask, q in zip(masks, self.fp8_layers):
            x, w_router = routed_inputs(mask, self.D, DTYPE)
            scales = (q["w_up"][1], q["w_gate"][1], q["w_down_t"][1])
            args = (x, w_router, 0.0, q["w_up"][0], q["w_down_t"][0], q["w_gate"][0], None, None, self.S, "silu")
            cfg = fp8_wide_config(default_config(x.shape[0], self.D, self.F, expert_size=self.S), self.D) \
                if widen else None
            y, used = routed_sparse_ffn_triton(*args, config=cfg, scales=scales)
            if widen:  # other tiles, the same function: checked against the default tiles' output
                y_ref, _ = routed_sparse_ffn_triton(*args, scales=scales)
                torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2 * float(y_ref.abs().max()))
            unions.append(float(used.any(0).float().mean()))
            calls.append(lambda args=args, cfg=cfg, scales=scales: routed_sparse_ffn_triton(
                *args, config=cfg, scales=scales))
        return time_graph(calls), sum(unions) / len(unions)

    def kernel_only(self, masks: list[torch.Tensor]) -> float:
        xs = self.xs(masks[0].shape[0])
        return time_graph([lambda x=x, m=m, layer=layer: sparse_ffn_triton(
            x, m, layer["w_up"], layer["w_down_t"], layer["w_gate"], None, None, self.S, "silu")
            for x, m, layer in zip(xs, masks, self.layers)])

    def stacked_dense(self, num_tokens: int, off: float = 0.0) -> float:
        """The dense path of a `SparseMLP` whose gate, up and router rows are one matrix (decode at a full union,
        and prefill on CUDA): `stacked_masked_dense_ffn`, one cuBLAS product for all three, the masked activation,
        the down product. ``off`` 0: every expert on (router logits 0, threshold near 0); 0.5: random routers
        with the threshold at 0.5, about half of each token's experts off."""
        xs = self.xs(num_tokens)
        tau = 0.5 if off == 0.5 else 1e-9  # random logits near 0: a sigmoid threshold of ~0 keeps every expert
        return time_graph([lambda x=x, w_in=w_in, layer=layer: stacked_masked_dense_ffn(
            x, w_in, layer["w_down_t"], tau=tau, expert_size=self.S)
            for x, w_in, layer in zip(xs, self.stacked_weights(), self.layers)], replays=3)

    def stacked_weights(self) -> list[torch.Tensor]:
        """Per weight copy, the gate, up and (random) router rows as one matrix (made once), as `SparseMLP`
        stores it (`lte.kernels.stack_ffn_inputs`)."""
        if not hasattr(self, "_stacked"):
            self._stacked = [stack_ffn_inputs(layer["w_gate"], layer["w_up"],
                                              torch.randn(self.E, self.D, generator=self.gen, device=DEVICE)
                                              .to(DTYPE) * self.D**-0.5)
                             for layer in self.layers]
        return self._stacked

    def gate_up_products(self, num_tokens: int, how: str) -> float:
        """The first half of the full-union FFN alone, to see where the stacked dense path's cost over dense lies:
        "separate": gate and up as two cuBLAS products (what the dense FFN runs); "stacked_2f": one product over
        [2F, D]; "stacked": one over [2F + E, D] (gate, up and router rows, what the stacked dense path runs)."""
        xs = self.xs(num_tokens)
        if how == "separate":
            calls = [lambda x=x, layer=layer: (F_.linear(x, layer["w_gate"]), F_.linear(x, layer["w_up"]))
                     for x, layer in zip(xs, self.layers)]
        else:
            rows = {"stacked_2f": 2 * self.F, "stacked": 2 * self.F + self.E}[how]
            calls = [lambda x=x, w=w_in[:rows]: F_.linear(x, w) for x, w_in in zip(xs, self.stacked_weights())]
        return time_graph(calls)

    def prefill_lte(self, num_tokens: int, off: float, separate_router: bool = False) -> float:
        """The masked dense path SparseMLP takes above 64 tokens on CUDA, as `SparseMLP.forward` runs it:
        `routed_masked_dense_ffn` (router GEMM, projections, one launch that thresholds the logits and
        applies the mask). `separate_router`: the earlier path, a mask from sigmoid and compare launches
        over [T, E], then `masked_dense_ffn`."""
        xs = self.xs(num_tokens)
        routers = [torch.randn(self.E, self.D, generator=self.gen, device=DEVICE).to(DTYPE) * self.D**-0.5
                   for _ in self.layers]
        tau = 0.5 if off == 0.5 else 1e-9

        def call(x, w_router, layer):
            if not separate_router:
                return routed_masked_dense_ffn(x, w_router, layer["w_up"], layer["w_down_t"], tau=tau,
                                               w_gate=layer["w_gate"], expert_size=self.S)
            mask = torch.sigmoid(F_.linear(x, w_router).float()) > tau  # [T, E]
            return masked_dense_ffn(x, mask, layer["w_up"], layer["w_down_t"], w_gate=layer["w_gate"],
                                    expert_size=self.S)

        return time_graph([lambda x=x, w=w, layer=layer: call(x, w, layer)
                           for x, w, layer in zip(xs, routers, self.layers)], replays=3)

    def masks(self, kind: str, num_tokens: int, off: float) -> list[torch.Tensor]:
        make = fixed_masks if kind == "fixed" else per_token_masks
        return [make(num_tokens, self.E, off, self.gen) for _ in self.layers]


def run_shape(name: str, bench: ShapeBench, tokens: list[int], copy_gbps: float | None, rows: list, errors: list,
              deadline: Deadline, save=lambda: None, fp8: bool = False) -> None:
    """Every point of one shape; ``save()`` after each batch size (a killed run keeps what it measured)."""
    labels = [n for n, s in FFN_SHAPES.items() if s == (bench.D, bench.F)]
    base = {"shape": name, "also": labels, "D": bench.D, "F": bench.F, "expert_size": bench.S}

    def add(num_tokens, variant, masks, off, us, dense_us, active, router=True):
        if us is None:
            return
        quantized = "_fp8" in variant
        need = ffn_bytes(bench.D, bench.F, active, num_tokens, router=router, expert_size=bench.S,
                         weight_elem=1 if quantized else None, row_scale_bytes=4 if quantized else 0)
        row = {**base, "B": num_tokens, "variant": variant, "masks": masks, "off": off, "active": active,
               "us": us, "dense_us": dense_us, "speedup": None if dense_us is None else dense_us / us,
               "bytes": need, "GBps": need / (us * 1e-6) / 1e9,
               "ideal_us": None if not copy_gbps else need / (copy_gbps * 1e9) * 1e6}
        rows.append(row)
        log(f"  {name} B={num_tokens} {variant:>12} {masks:>9} off={off:.2f} active={active:.3f}: {us:7.1f} us"
            + ("" if dense_us is None else f"  ({dense_us / us:.2f}x vs dense {dense_us:.1f})"))

    for num_tokens in tokens:
        if deadline.over(6):
            rows.append({**base, "B": num_tokens, "variant": "skipped", "why": "time budget"})
            continue
        cfg = default_config(num_tokens, bench.D, bench.F, expert_size=bench.S)
        log(f"{name} B={num_tokens}: config {cfg.to_dict()}")
        dense_us = guarded(errors, f"dense {name} B={num_tokens}", bench.dense, num_tokens)
        add(num_tokens, "dense", "-", 0.0, dense_us, dense_us, 1.0, router=False)
        offs = (0.0, 0.5, 0.7, 0.9, 0.95) if num_tokens == 1 else (0.0, 0.5, 0.7, 0.9)
        timers = [("lte", bench.routed)] + ([("lte_fp8", bench.routed_fp8),
                                             ("lte_fp8_wide", functools.partial(bench.routed_fp8, widen=True))]
                                            if fp8 else [])
        for (variant, timer), off in itertools.product(timers, offs):
            if deadline.over(3):
                break
            res = guarded(errors, f"{variant} {name} B={num_tokens} off={off}", timer,
                          bench.masks("fixed", num_tokens, off))
            if res is not None:
                add(num_tokens, variant, "fixed", off, res[0], dense_us, res[1])
        if num_tokens > 1 and not deadline.over(3):
            masks = bench.masks("per_token", num_tokens, 0.5)
            res = guarded(errors, f"lte per-token {name} B={num_tokens}", bench.routed, masks)
            if res is not None:
                add(num_tokens, "lte", "per_token", 0.5, res[0], dense_us, res[1])
            if num_tokens >= 8 and not deadline.over(3):
                res = guarded(errors, f"lte budget {name} B={num_tokens}", bench.routed, masks, bench.E // 2)
                if res is not None:
                    add(num_tokens, "lte_budget", "per_token", 0.5, res[0], dense_us, res[1])
        if not deadline.over(3):  # what the decoder's dispatch runs at a full union (lte.serving.dispatch)
            us = guarded(errors, f"dense path {name} B={num_tokens}", bench.prefill_lte, num_tokens, 0.0)
            add(num_tokens, "lte_dense_path", "fixed", 0.0, us, dense_us, 1.0)
            us = guarded(errors, f"stacked dense path {name} B={num_tokens}", bench.stacked_dense, num_tokens)
            add(num_tokens, "lte_dense_stacked", "fixed", 0.0, us, dense_us, 1.0)
            if not deadline.over(3):  # its first product alone, against the dense FFN's two (the full union's cost)
                for how in ("separate", "stacked_2f", "stacked"):
                    us = guarded(errors, f"gate/up products {how} {name} B={num_tokens}", bench.gate_up_products,
                                 num_tokens, how)
                    add(num_tokens, f"gate_up_{how}", "-", 0.0, us, None, 2 / 3, router=how == "stacked")
        if num_tokens == 1 and not deadline.over(3):
            us = guarded(errors, f"kernel only {name}", bench.kernel_only, bench.masks("fixed", 1, 0.5))
            add(1, "kernel_only", "fixed", 0.5, us, dense_us, 0.5, router=False)
        save()
    if not deadline.over(4):
        half = guarded(errors, f"half-width {name}", ShapeBench, bench.D, bench.F // 2, 0.6, bench.gen, bench.S)
        if half is not None:
            us = guarded(errors, f"half-width dense {name}", half.dense, 1)
            dense1 = next((r["us"] for r in rows if r.get("shape") == name and r.get("B") == 1
                           and r.get("variant") == "dense"), None)
            add(1, "dense_half_width", "-", 0.5, us, dense1, 0.5, router=False)
            del half
    if not deadline.over(4):
        dense_pf = guarded(errors, f"prefill dense {name}", bench.dense, PREFILL_TOKENS)
        add(PREFILL_TOKENS, "prefill_dense", "-", 0.0, dense_pf, dense_pf, 1.0, router=False)
        us = guarded(errors, f"prefill lte {name}", bench.prefill_lte, PREFILL_TOKENS, 0.5)
        add(PREFILL_TOKENS, "prefill_lte", "per_token", 0.5, us, dense_pf, 1.0)
        us = guarded(errors, f"prefill lte, separate router {name}", bench.prefill_lte, PREFILL_TOKENS, 0.5, True)
        add(PREFILL_TOKENS, "prefill_lte_separate", "per_token", 0.5, us, dense_pf, 1.0)
        us = guarded(errors, f"prefill lte, stacked {name}", bench.stacked_dense, PREFILL_TOKENS, 0.5)
        add(PREFILL_TOKENS, "prefill_lte_stacked", "per_token", 0.5, us, dense_pf, 1.0)


def print_table(result: dict) -> None:
    rows = [r for r in result["rows"] if r.get("variant") not in (None, "skipped")]
    print(f"\nFFN | {result['env']['gpu']} | torch {result['env']['torch']} | triton {result['env']['triton']} "
          f"| commit {result['env']['commit']} | copy {result.get('copy_GBps') or 0:.0f} GB/s")
    print(f"{'shape':>10} {'B':>3} {'variant':>16} {'masks':>9} {'off':>5} {'active':>6} {'us':>7} {'dense':>7} "
          f"{'x dense':>7} {'GB/s':>6} {'ideal':>6}")
    for r in rows:
        print(f"{r['shape']:>10} {r['B']:>3} {r['variant']:>16} {r['masks']:>9} {r['off']:>5.2f} {r['active']:>6.3f} "
              f"{r['us']:>7.1f} {r['dense_us'] or 0:>7.1f} {r['speedup'] or 0:>6.2f}x {r['GBps']:>6.0f} "
              f"{r['ideal_us'] or 0:>6.1f}")


def dispatch_crossings(rows: list) -> dict:
    """Per shape and B: the union fraction above which the stacked dense path beats the sparse kernels (fixed
    masks, router included; `lte.serving.dispatch.dense_crossing`), the figures `DENSE_ABOVE_BY_GPU` takes."""
    out = {}
    for (shape, num_tokens) in sorted({(r["shape"], r["B"]) for r in rows if r.get("variant") == "lte"}):
        mine = [r for r in rows if r.get("shape") == shape and r.get("B") == num_tokens]
        dense = [r["us"] for r in mine if r.get("variant") == "lte_dense_stacked"]
        points = [(r["active"], r["us"]) for r in mine if r.get("variant") == "lte" and r.get("masks") == "fixed"]
        if dense and points:
            out.setdefault(shape, {})[str(num_tokens)] = round(dense_crossing(points, dense[0]), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    parser.add_argument("--budget", type=float, default=100.0, help="seconds; points not started by then are skipped")
    parser.add_argument("--shapes", nargs="+", default=["llama3-8b", "llama2-7b", "qwen2.5-7b"],
                        choices=sorted(FFN_SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--gb", type=float, default=1.2, help="GB of weight copies per shape (>> L2)")
    parser.add_argument("--fp8", action="store_true",
                        help="also time the kernels on fp8 (e4m3) FFN weights with row scales (rows lte_fp8)")
    parser.add_argument("--expert-size", type=int, default=EXPERT_SIZE,
                        help="neurons per expert (the recipe study tries 16 and 8; the paper uses 32)")
    args = parser.parse_args()
    if args.expert_size < 1:
        parser.error(f"--expert-size must be >= 1, got {args.expert_size}")
    deadline = Deadline(args.budget)
    result = {"env": environment(), "rows": [], "errors": []}
    path = os.path.join(args.out, "ffn_kernel.json")
    log(f"FFN benchmark on {result['env']['gpu']}, budget {args.budget:.0f} s, experts of {args.expert_size} neurons")
    result["copy_GBps"] = guarded(result["errors"], "copy bandwidth", copy_bandwidth)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    done = set()
    for name in args.shapes:
        shape = FFN_SHAPES[name]
        if shape in done:
            continue
        done.add(shape)
        if deadline.over(10):
            result["rows"].append({"shape": name, "variant": "skipped", "why": "time budget"})
            continue
        bench = guarded(result["errors"], f"weights {name}", ShapeBench, *shape, args.gb, gen, args.expert_size)
        if bench is not None:
            guarded(result["errors"], f"shape {name}", run_shape, name, bench, args.tokens, result["copy_GBps"],
                    result["rows"], result["errors"], deadline, lambda: write_json(path, result), args.fp8)
            del bench
            (torch.cuda.empty_cache() if DEVICE == "cuda" else None)
        write_json(path, result)
    result["dispatch_crossings"] = dispatch_crossings(result["rows"])
    write_json(path, result)
    print_table(result)
    log(f"dispatch: union fraction where the sparse kernels cost the stacked dense path's time: "
        f"{result['dispatch_crossings']}")
    log(f"wrote {path} ({len(result['errors'])} errors)")


if __name__ == "__main__":
    main()

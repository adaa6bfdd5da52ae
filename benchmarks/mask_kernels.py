"""The decode step's expert-mask launches alone: threshold routing, top-k routing, and top-k under a per-batch budget.

    PYTHONPATH=src python benchmarks/mask_kernels.py [--shapes llama3-8b] [--expert-sizes 32 8] [--tokens 1 8 32 64]

For each FFN shape of the shape table, expert size S (E = F / S experts) and token count B, in one CUDA-graph
loop over router copies (more bytes than the L2, as in a decode step): ``lte.kernels.router_mask`` (one launch:
logits, threshold, union), ``router_topk_mask`` with k = E / 2 (router + top-k) and the same with a budget of
E / 2 (one more launch that cuts the batch's union and re-ranks each token). The figure is the median time per
call; the columns after it are what top-k and the budget add over the threshold mask, per FFN, so a decode step
pays them once per layer. Off CUDA the ops run their PyTorch reference once (a smoke run, no timing meaning).
"""

from __future__ import annotations

import argparse

import torch
from bench_util import DEVICE, FFN_SHAPES, Deadline, environment, guarded, log, time_graph, write_json

from lte.kernels import router_mask, router_topk_mask

DTYPE = torch.bfloat16
ROUTER_BYTES = 256 * 2**20  # router copies per point: far more than the L2


def time_masks(model_width: int, num_exp: int, num_tokens: int, gen: torch.Generator) -> dict[str, float]:
    """Microseconds per call of the three mask variants for B tokens, E experts of width D."""
    copies = max(1, ROUTER_BYTES // (num_exp * model_width * 2))
    routers = [(torch.randn(num_exp, model_width, generator=gen) / model_width**0.5).to(DEVICE, DTYPE)
               for _ in range(copies)]
    x = torch.randn(num_tokens, model_width, generator=gen).to(DEVICE, DTYPE)
    k, budget = max(1, num_exp // 2), max(1, num_exp // 2)
    variants = {
        "threshold": lambda w: router_mask(x, w, 0.5),
        "topk": lambda w: router_topk_mask(x, w, k),
        "topk_budget": lambda w: router_topk_mask(x, w, k, budget=budget),
    }
    return {name: time_graph([lambda w=w, f=f: f(w) for w in routers]) for name, f in variants.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["llama3-8b"], choices=sorted(FFN_SHAPES))
    parser.add_argument("--expert-sizes", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--budget", type=float, default=120.0, help="seconds; points not started by then are skipped")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args()
    deadline = Deadline(args.budget)
    gen = torch.Generator().manual_seed(0)
    rows, errors = [], []
    for shape in args.shapes:
        model_width, ffn_width = FFN_SHAPES[shape]
        for size in args.expert_sizes:
            num_exp = -(-ffn_width // size)
            for num_tokens in args.tokens:
                if deadline.over():
                    log(f"time budget spent: skipping {shape} S={size} B={num_tokens}")
                    continue
                us = guarded(errors, f"{shape} S={size} B={num_tokens}", time_masks, model_width, num_exp,
                             num_tokens, gen)
                if us is None:
                    continue
                row = {"shape": shape, "expert_size": size, "experts": num_exp, "tokens": num_tokens, **us,
                       "topk_extra": us["topk"] - us["threshold"], "budget_extra": us["topk_budget"] - us["topk"]}
                rows.append(row)
                log(f"{shape:>10s} S={size:<3d} E={num_exp:<5d} B={num_tokens:<3d} threshold {us['threshold']:7.2f} us  "
                    f"topk {us['topk']:7.2f} us (+{row['topk_extra']:.2f})  budget {us['topk_budget']:7.2f} us "
                    f"(+{row['budget_extra']:.2f})")
    if args.out:
        write_json(args.out, {"benchmark": "mask_kernels", "rows": rows, "errors": errors, **environment()})


if __name__ == "__main__":
    main()

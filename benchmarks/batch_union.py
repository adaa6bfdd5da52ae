"""Union of real trained masks at a batch, and what a per-batch expert budget costs in quality.

A decode step serves B sequences at once; a skipped expert saves its weights only when *no* token
of the step needs it, so the bytes a step reads follow the union of the B tokens' masks. This
script serves a trained LTE model (`prepare_for_inference`, the same path `lte generate` takes)
and runs B held-out sequences in lockstep, teacher-forced, one token of each per decode step
(the first `--sequences` held-out sequences, at least one batch of B):

- the union: the fraction of each layer's experts that some token of the step switched on,
  averaged over steps and layers, at B = 1, 4, 8, 16, 64;
- the quality: perplexity of those same decode steps without a budget and with a per-batch budget
  (each layer keeps at most `frac x E` experts per step, those with the largest summed router
  score; `SparseMLP.budget`, `lte.kernels.routed_sparse_ffn`).

On a CPU the kernels' PyTorch reference computes the same function as the GPU kernels.

    PYTHONPATH=src python benchmarks/batch_union.py --model runs/demo/stage2 --data builtin --holdout 0.1 \\
        --out benchmarks/results/batch_union_demo.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F_

from lte.data.text import load_text_lm
from lte.errors import LTEError
from lte.loading import load_model, load_tokenizer, model_kind
from lte.routing.layers import budget_experts
from lte.serving.prepare import prepare_for_inference, sparse_modules


def held_out_sequences(data: str, tokenizer: Any, holdout: float | None, seq_len: int, count: int) -> torch.Tensor:
    """[N, L] token ids: consecutive blocks of the held-out tail (or of the whole file without holdout)."""
    if holdout is not None:
        _, dataset = load_text_lm(data, tokenizer, block_size=seq_len, split_ratio=holdout)
    else:
        dataset = load_text_lm(data, tokenizer, block_size=seq_len)
    ids = torch.as_tensor(dataset.token_ids)
    n = min(count, ids.numel() // seq_len)
    if n < 1:
        raise LTEError(f"{data}: fewer than {seq_len} held-out tokens; pass a smaller --seq-len or more text")
    return ids[: n * seq_len].reshape(n, seq_len)


@torch.no_grad()
def lockstep_decode(model: Any, seqs: torch.Tensor) -> tuple[float, int, list[float], list[float]]:
    """Teacher-forced decode of B sequences [B, L] in lockstep.

    Returns (sum of next-token NLL, number of predicted tokens, per-step mean union fraction over
    layers, per-step mean per-token active fraction over layers)."""
    mlps = sparse_modules(model)
    for m in mlps:
        m.record_mask = True
    cache = None
    nll, count, unions, actives = 0.0, 0, [], []
    for t in range(seqs.shape[1] - 1):
        out = model(input_ids=seqs[:, t: t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1].float()  # [B, V]
        nll += float(F_.cross_entropy(logits, seqs[:, t + 1], reduction="sum"))
        count += seqs.shape[0]
        masks = [m.last_mask.reshape(-1, m.last_mask.shape[-1]) for m in mlps]  # each [B, E]
        unions.append(sum(float(mk.any(0).float().mean()) for mk in masks) / len(masks))
        actives.append(sum(float(mk.float().mean()) for mk in masks) / len(masks))
    for m in mlps:
        m.record_mask = False
    return nll, count, unions, actives


def served(model_dir: str, budget_frac: float) -> tuple[Any, int]:
    """The model readied for serving with a per-batch budget of `budget_frac` of each layer's experts."""
    lmodel = load_model(model_dir, routing="served").eval()  # hard, or top-k for a top-k stage 2
    experts = lmodel.lte_layers()[0].router.out_features
    budget = 0 if budget_frac <= 0 else budget_experts(budget_frac, experts)
    return prepare_for_inference(lmodel, budget=budget).eval(), budget


def run(args: argparse.Namespace) -> dict[str, Any]:
    if model_kind(Path(args.model)) != "lte":
        raise LTEError(f"--model {args.model}: not an LTE model folder (an `lte train --stage 2` output)")
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    seqs = held_out_sequences(args.data, tokenizer, args.holdout, args.seq_len, max(args.batch_sizes))
    rows = []
    for frac in args.budgets:
        model, budget = served(args.model, frac)
        for b in args.batch_sizes:
            if b > seqs.shape[0]:
                print(f"skip B={b}: only {seqs.shape[0]} held-out sequences")
                continue
            if frac > 0 and b == 1:
                continue  # a budget at one token only cuts that token's own mask: not a batch effect
            start = time.perf_counter()
            nll, count, unions, actives = 0.0, 0, [], []
            used = max(b, args.sequences // b * b)  # the first sequences, in full batches of b
            for first in range(0, used, b):
                n, c, u, a = lockstep_decode(model, seqs[first: first + b])
                nll, count, unions, actives = nll + n, count + c, unions + u, actives + a
            row = {"batch_size": b, "budget_fraction": frac, "budget_experts": budget,
                   "perplexity": math.exp(nll / count), "predicted_tokens": count,
                   "union_active": sum(unions) / len(unions), "token_active": sum(actives) / len(actives),
                   "seconds": time.perf_counter() - start}
            rows.append(row)
            print(f"B={b:3d} budget={frac:.2f} ({budget:3d} experts): union active {row['union_active']:.3f}, "
                  f"per token {row['token_active']:.3f}, perplexity {row['perplexity']:.3f} "
                  f"({count} tokens, {row['seconds']:.0f} s)", flush=True)
        del model
    return {"benchmark": "batch_union", "model": str(args.model), "data": args.data, "holdout": args.holdout,
            "seq_len": args.seq_len, "sequences": int(seqs.shape[0]), "rows": rows,
            "device": "cpu", "torch": torch.__version__, "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained LTE model folder (stage 2 output)")
    p.add_argument("--data", default="builtin", help="text the model did not train on (or 'builtin' with --holdout)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="use the last fraction of --data (the demo's evaluation tail); 0: the whole file")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (decode steps per batch + 1)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 64])
    p.add_argument("--sequences", type=int, default=16,
                   help="held-out sequences per batch size (at least one full batch of B): the same tokens "
                        "with and without a budget at each B")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.0, 0.75, 0.5],
                   help="per-batch budgets as fractions of each layer's experts (0: no budget)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    args.holdout = args.holdout or None
    result = run(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

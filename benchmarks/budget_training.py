"""Does stage 2 trained under the per-batch expert budget make the budget cheaper at serving time?

For each stage-1 model (an `lte run` output's `stage1` folder next to its `dense` teacher), stage 2
is trained twice from it with the same steps, data, seed and distillation: once plainly, once with
`batch_budget` (at each position the sequences of a training batch together keep that fraction of
each layer's experts, as a served decode step of that batch does). Both are then served
(`prepare_for_inference`) and decode the same held-out sequences in lockstep, teacher-forced, B at a
time (`batch_union.lockstep_decode`), with and without that budget. Held-out text: the last
`--holdout` of `--data`, which stage 2 never trains on.

    PYTHONPATH=src python benchmarks/budget_training.py --stage1 runs/dev/kd0.5_s{0,1,2}/stage1 \\
        --data runs/dev/dev.txt --budget 0.75 --out benchmarks/results/cpu/budget_training.json
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
from batch_union import held_out_sequences, lockstep_decode

from lte.loading import load_model, load_tokenizer
from lte.routing.layers import budget_experts
from lte.serving.prepare import prepare_for_inference
from lte.training import train_stage


def stage2(stage1: Path, out: Path, args: argparse.Namespace, budget: float) -> None:
    """Stage 2 from `stage1` into `out` (skipped when a finished one is there), the demo's stage-2 settings;
    distillation from the dense model stage 1 started from (its recorded teacher)."""
    if (out / "lte_stage.json").is_file() and json.loads((out / "lte_stage.json").read_text()).get("complete"):
        return
    record = json.loads((stage1 / "lte_stage.json").read_text())
    train_stage("2", str(stage1), "causal-lm", args.data, str(out), holdout=args.holdout,
                max_steps=args.max_steps, lr=args.lr,
                batch_size=args.batch_size, block_size=args.block_size, distill=args.distill,
                seed=record["hparams"]["seed"], batch_budget=budget, report_to="none", progress=False,
                save_steps=10000, logging_steps=5, overwrite=True)


def score(model_dir: Path, seqs: torch.Tensor, batch: int, budget: float) -> dict[str, float]:
    """Perplexity and union of lockstep decoding of `seqs` in batches of `batch`, served with `budget`."""
    lmodel = load_model(model_dir, routing="hard").eval()
    experts = lmodel.lte_layers()[0].router.out_features
    k = 0 if budget <= 0 else budget_experts(budget, experts)
    model = prepare_for_inference(lmodel, budget=k).eval()
    nll, count, unions = 0.0, 0, []
    for first in range(0, seqs.shape[0] // batch * batch, batch):
        n, c, u, _ = lockstep_decode(model, seqs[first: first + batch])
        nll, count, unions = nll + n, count + c, unions + u
    return {"perplexity": math.exp(nll / count), "union_active": sum(unions) / len(unions), "tokens": count,
            "budget_experts": k}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage1", nargs="+", required=True, help="stage-1 folders (each with its dense teacher recorded)")
    p.add_argument("--data", required=True, help="the text stage 1 trained on (its tail is held out)")
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--budget", type=float, default=0.75, help="per-batch budget, a fraction of each layer's experts")
    p.add_argument("--batch-size", type=int, default=4, help="training batch = the decode batch it is scored at")
    p.add_argument("--max-steps", type=int, default=15)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--distill", type=float, default=0.5)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--work", default="runs/budget_training", help="where the stage-2 models go")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for folder in args.stage1:
        stage1 = Path(folder)
        name = stage1.parent.name
        start = time.perf_counter()
        trained = {"plain": Path(args.work) / name / "plain", "budget": Path(args.work) / name / f"budget{args.budget}"}
        stage2(stage1, trained["plain"], args, 0.0)
        stage2(stage1, trained["budget"], args, args.budget)
        tokenizer = load_tokenizer(str(stage1))
        seqs = held_out_sequences(args.data, tokenizer, args.holdout, args.seq_len, args.sequences)
        row: dict[str, Any] = {"stage1": str(stage1), "train_seconds": time.perf_counter() - start}
        for how, model_dir in trained.items():
            for served_budget in (0.0, args.budget):
                key = f"{how}_trained@{'budget' if served_budget else 'none'}"
                row[key] = score(model_dir, seqs, args.batch_size, served_budget)
                print(f"{name}: stage 2 {how:6s}, served {'with' if served_budget else 'without'} the budget: "
                      f"perplexity {row[key]['perplexity']:.3f}, union {row[key]['union_active']:.3f}", flush=True)
        rows.append(row)
    out = {"benchmark": "budget-aware stage 2", "budget": args.budget, "batch_size": args.batch_size,
           "data": args.data, "holdout": args.holdout, "seq_len": args.seq_len, "sequences": args.sequences,
           "max_steps": args.max_steps, "lr": args.lr, "distill": args.distill, "rows": rows,
           "torch": torch.__version__, "platform": platform.platform()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

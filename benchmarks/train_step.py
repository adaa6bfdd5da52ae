"""Stage-1 training step time vs the dense fine-tune step, on the same batch.

One step = forward + backward + AdamW step + zero_grad, bf16 autocast on CUDA (fp32 weights, as
the Trainer runs it), causal-LM loss. The stage-1 step is the LTE model in soft routing with
task + eta*L_eff + lam*L_sep, plus the per-step sparsity read-out that `LTETrainer` does for
logging and the eta controller. Reports the ratio (goal: <= 1.10).

    PYTHONPATH=src python benchmarks/train_step.py                        # SmolLM2-135M shapes, random weights
    PYTHONPATH=src python benchmarks/train_step.py --model runs/x/dense    # a saved model
    PYTHONPATH=src python benchmarks/train_step.py --tiny --steps 2       # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch


def smollm2_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                       max_position_embeddings=2048, rope_theta=100000.0)


def build_model(args):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    return LlamaForCausalLM(smollm2_config(args.tiny))


def time_steps(model, batch, steps: int, warmup: int, device, per_step_stats: bool) -> dict:
    """Mean and median seconds of `steps` optimizer steps after `warmup` untimed ones."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    times = []
    for i in range(warmup + steps):
        if per_step_stats:
            model.reset_lte_stats()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if per_step_stats:
            model.lte_stats(accumulated=True)  # what LTETrainer reads each step (one host sync)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"mean_s": sum(times) / len(times), "median_s": times[len(times) // 2], "steps": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a saved causal-LM folder (default: SmolLM2-135M shapes)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke test")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args()
    if args.tiny:
        args.batch_size, args.seq_len = min(args.batch_size, 2), min(args.seq_len, 32)

    import lte

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args).to(device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    dense = time_steps(model, batch, args.steps, args.warmup, device, per_step_stats=False)
    # Grouping does not change the step cost; contiguous skips k-means for a quick benchmark.
    lmodel = lte.get_lte_model(model, lte.LTEConfig(grouping="contiguous", eta=0.5), progress=False)
    lmodel.set_routing("soft")
    lmodel.train()
    stage1 = time_steps(lmodel, batch, args.steps, args.warmup, device, per_step_stats=True)

    result = {
        "benchmark": "train_step stage1 vs dense",
        "model": args.model or ("tiny-llama" if args.tiny else "SmolLM2-135M shapes (random weights)"),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_per_step": args.batch_size * args.seq_len,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "dense": dense,
        "stage1": stage1,
        "ratio_median": stage1["median_s"] / dense["median_s"],
        "dense_tokens_per_s": args.batch_size * args.seq_len / dense["median_s"],
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "commit": _commit(),
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    print(f"\nstage-1 step / dense step = {result['ratio_median']:.3f}  "
          f"(dense {1000 * dense['median_s']:.1f} ms, stage 1 {1000 * stage1['median_s']:.1f} ms, "
          f"{result['dense_tokens_per_s']:.0f} dense tokens/s on {result['device']})")


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    main()

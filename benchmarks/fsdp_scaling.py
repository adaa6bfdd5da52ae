"""Stage-1 LTE training under FSDP: tokens/s and peak memory per GPU, and the scaling over GPUs.

One run = one world size. Each process builds the same LLaMA-2-7B-shaped model (random weights,
fp32, on its own GPU), converts it to an LTE model (soft routing, the routers trainable, the eta
controller on) and trains it with `LTETrainer` on random tokens, with the `TrainingArguments` that
`lte train` uses (AdamW, bf16 on CUDA, gradient clipping), under the accelerate config it was
launched with. After `--warmup` optimizer steps it times `--steps` more; the peak memory counts
from the start of training (the model already sharded). Rank 0 writes one JSON.

    # one world size (the FSDP config of the repository; --num_processes 1 is the one-GPU baseline)
    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \\
        benchmarks/fsdp_scaling.py --out runs/fsdp/n2.json
    # the table: tokens/s, tokens/s per GPU, scaling efficiency against the smallest world size given
    python benchmarks/fsdp_scaling.py --summarize runs/fsdp/n*.json --out runs/fsdp/summary.json
    # all of it (1, 2 and all GPUs): OUT=runs/fsdp bash benchmarks/fsdp_scaling.sh
    # CPU smoke test (tiny shape; accelerate trains with DDP on a CPU, see docs/training.md)
    python benchmarks/fsdp_scaling.py --tiny --steps 2 --warmup 1

Scaling efficiency at N GPUs = (tokens/s per GPU at N) / (tokens/s per GPU at the baseline size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from bench_util import environment, write_json

SHAPES = {
    # LLaMA-2-7B: D 4096, F 11008 (344 experts of 32), 32 layers, 32 heads, vocabulary 32000
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    # CPU smoke test: odd FFN width (the last expert is smaller)
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False),
}


class RandomTokens(torch.utils.data.Dataset):
    """`n` causal-LM examples of `length` random token ids (the labels are the inputs)."""

    def __init__(self, n: int, length: int, vocab: int, seed: int = 0) -> None:
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _world() -> tuple[int, int]:
    """(rank, world size) of this process, from the launcher's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def build_model(shape: str, dense: bool, grouping: str, device: torch.device):
    """The model a stage-1 run trains: LLaMA-shaped, random weights (same seed on every process)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import lte

    torch.manual_seed(0)
    with device:  # built on the process's own GPU: fast initialisation; FSDP then shards it
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    if dense:
        return model
    # The grouping does not change the step cost; contiguous skips k-means on 7B weights.
    lmodel = lte.get_lte_model(model, lte.LTEConfig(grouping=grouping, eta=0.5), progress=False)
    lmodel.set_routing("soft")
    lmodel.freeze_routers(False)
    lmodel.stage = "stage1"
    return lmodel


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time at the end of every optimizer step (after a device sync); peak memory from train start."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.memory_at_start: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                self.memory_at_start = torch.cuda.memory_allocated() / 2**30
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    return StepTimer()


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train `warmup + steps` optimizer steps; rank 0 returns (and writes) the result, the others None."""
    import torch.distributed as dist
    from transformers.trainer_utils import SaveStrategy

    from lte.training import EtaController, LTETrainer, TrainArgs
    from lte.training.args import training_arguments
    from lte.training.sharding import is_sharded

    rank, world = _world()
    device = _device()
    t0 = time.perf_counter()
    model = build_model(args.shape, args.dense, args.grouping, device)
    build_s = time.perf_counter() - t0
    vocab = SHAPES[args.shape]["vocab_size"]
    total_steps = args.warmup + args.steps
    data = RandomTokens(total_steps * args.batch_size * world, args.seq_len, vocab)
    hp = TrainArgs(max_steps=total_steps, batch_size=args.batch_size, lr=1e-5, save_steps=10**9,
                   logging_steps=total_steps, report_to="none", progress=False)
    timer = _step_timer()
    callbacks = [timer] if args.dense else [timer, EtaController(0.5, eta0=0.5)]
    targs = training_arguments(Path(args.work_dir), hp)
    targs.save_strategy = SaveStrategy.NO  # no checkpoints: only the training steps are timed
    trainer = LTETrainer(model=model, args=targs, train_dataset=data, callbacks=callbacks, jsonl_log=None)
    trainer.train()
    if args.save_dir:
        t1 = time.perf_counter()
        trainer.save_model(args.save_dir)  # under FSDP: gathered on rank 0, an LTE save
        save_s = time.perf_counter() - t1
    else:
        save_s = None
    step_s = [b - a for a, b in zip(timer.ends[args.warmup:], timer.ends[args.warmup + 1:])]  # measured steps
    mine = {
        "rank": rank,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        "allocated_at_train_start_gib": timer.memory_at_start,
        "median_step_s": statistics.median(step_s),
    }
    ranks = [None] * world
    if dist.is_available() and dist.is_initialized() and world > 1:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    if rank != 0:
        return None
    tokens_per_step = args.batch_size * args.seq_len * world
    step = max(r["median_step_s"] for r in ranks)  # the slowest process sets the pace
    peaks = [r["peak_allocated_gib"] for r in ranks if r["peak_allocated_gib"] is not None]
    result = {
        "benchmark": "fsdp_scaling: LTE stage 1" + (" (dense model)" if args.dense else ""),
        "shape": args.shape,
        "world_size": world,
        "fsdp": bool(getattr(trainer, "is_fsdp_enabled", False)),
        "sharded": is_sharded(trainer.model_wrapped),
        "fsdp_version": int(os.environ.get("FSDP_VERSION", 0)) or None,
        "precision": "bf16" if trainer.args.bf16 else "fp32",
        "per_device_batch": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_per_step": tokens_per_step,
        "warmup_steps": args.warmup,
        "measured_steps": len(step_s),
        "median_step_s": step,
        "tokens_per_s": tokens_per_step / step,
        "tokens_per_s_per_gpu": tokens_per_step / step / world,
        "peak_allocated_gib_max": max(peaks) if peaks else None,
        "build_s": build_s,
        "save_s": save_s,
        "final_eta": None if args.dense else float(trainer.lte_model.lte_config.eta),
        "per_rank": ranks,
        "device": ranks[0]["device"],
        "accelerate": __import__("accelerate").__version__,
        "environment": environment(),
    }
    if args.out:
        write_json(args.out, result)
    print(f"{world} process(es), {result['device']}: {result['tokens_per_s']:.0f} tokens/s "
          f"({result['tokens_per_s_per_gpu']:.0f} per GPU), step {step:.3f} s, peak "
          f"{result['peak_allocated_gib_max'] if peaks else float('nan'):.1f} GiB per GPU, "
          f"fsdp={result['fsdp']} sharded={result['sharded']}", flush=True)
    return result


def summarize(paths: list[str], out: str | None) -> dict[str, Any]:
    """The scaling table of several runs (one JSON each), against the smallest world size among them."""
    runs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: r["world_size"])
    if not runs:
        raise SystemExit("--summarize needs at least one result JSON")
    base = runs[0]
    rows = [{
        "world_size": r["world_size"],
        "tokens_per_s": r["tokens_per_s"],
        "tokens_per_s_per_gpu": r["tokens_per_s_per_gpu"],
        "scaling_efficiency": r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"],
        "peak_allocated_gib_max": r["peak_allocated_gib_max"],
        "median_step_s": r["median_step_s"],
        "sharded": r["sharded"],
    } for r in runs]
    summary = {"benchmark": base["benchmark"], "shape": base["shape"], "relative_to_world_size": base["world_size"],
               "per_device_batch": base["per_device_batch"], "seq_len": base["seq_len"],
               "precision": base["precision"], "device": base["device"], "environment": base["environment"],
               "rows": rows}
    if out:
        write_json(out, summary)
    print(f"{summary['benchmark']}, {base['shape']}, {base['device']}, batch {base['per_device_batch']} x "
          f"{base['seq_len']} tokens per GPU, {base['precision']}; efficiency vs {base['world_size']} GPU(s)")
    print("| GPUs | tokens/s | tokens/s per GPU | scaling efficiency | peak GiB per GPU | step s | sharded |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_allocated_gib_max"] is None else f"{r['peak_allocated_gib_max']:.1f}"
        print(f"| {r['world_size']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_per_gpu']:.0f} | "
              f"{r['scaling_efficiency']:.2f} | {peak} | {r['median_step_s']:.3f} | {r['sharded']} |")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--tiny", action="store_true", help="the tiny shape and short sequences (CPU smoke test)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per GPU per step")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--grouping", default="contiguous", help="neuron grouping (contiguous: no k-means)")
    parser.add_argument("--dense", action="store_true", help="train the plain HF model instead (reference)")
    parser.add_argument("--save-dir", default=None, help="also time the final (gathered) save into this folder")
    parser.add_argument("--work-dir", default="runs/fsdp_scaling_work", help="the Trainer's output folder")
    parser.add_argument("--out", default=None, help="write the JSON result here (rank 0)")
    parser.add_argument("--summarize", nargs="+", metavar="JSON", help="print the scaling table of these results")
    args = parser.parse_args(argv)
    if args.summarize:
        summarize(args.summarize, args.out)
        return
    if args.tiny:
        args.shape, args.seq_len = "tiny", min(args.seq_len, 32)
    try:
        run(args)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # tear the process group down before exit: gloo's
            dist.destroy_process_group()  # threads otherwise may abort the interpreter's exit (SIGABRT)


if __name__ == "__main__":
    main()

"""Stage-1 training step time vs the dense fine-tune step, on the same batch.

One step = forward + backward + AdamW step + zero_grad, bf16 autocast on CUDA (fp32 weights, as
the Trainer runs it), causal-LM loss. The stage-1 step is the LTE model in soft routing (or
`--routing ste`) with task + eta*L_eff + lam*L_sep, plus the per-step sparsity read-out that
`LTETrainer` does for the eta controller; `--distill W` adds the dense teacher's forward and the
distillation loss. Reports the ratio (goal: <= 1.10).

`--count-ops` also counts, for one step of each, the aten operations dispatched (a proxy for the
GPU kernel launches a step costs: on a small model the step is bound by them) and the host syncs
(`.item()`-like reads). `--shape small` is a model small enough for that regime on a CPU.

    PYTHONPATH=src python benchmarks/train_step.py                        # SmolLM2-135M shapes, random weights
    PYTHONPATH=src python benchmarks/train_step.py --model runs/x/dense    # a saved model
    PYTHONPATH=src python benchmarks/train_step.py --tiny --steps 2       # CPU smoke test
    PYTHONPATH=src python benchmarks/train_step.py --shape small --count-ops --threads 1   # CPU profile
    PYTHONPATH=src python benchmarks/train_step.py --routing ste --profile runs/prof   # where the time goes
    PYTHONPATH=src python benchmarks/train_step.py --shape llama2-7b-4l --batch-size 4 --routing ste   # 7B layers

`--profile DIR` records two steps of each model with `torch.profiler` after the timing and writes
DIR/{dense,stage1}_ops.txt (operators by self device time, then by self CPU time) and
DIR/profile.json: per model the device busy time, the host time of the step, and the top
operators, so the extra time of the stage-1 step can be put on operators (device) or on launch and
dispatch (host).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

#: LLaMA-family shapes: (vocab, D, F, layers, heads, kv heads). "small" makes a CPU step bound by
#: per-operation costs, as a GPU step of SmolLM2 is by kernel launches.
SHAPES = {
    "smollm2": (49152, 576, 1536, 30, 9, 3),
    # LLaMA-2-7B's layers, 4 of its 32 (full fine-tuning of all 32 needs ~110 GB of optimizer state):
    # the per-layer cost of stage 1 against dense at the 7B width, which issue 12 asks about
    "llama2-7b-4l": (32000, 4096, 11008, 4, 32, 32),
    "small": (2048, 128, 352, 16, 4, 2),
    "tiny": (512, 64, 176, 2, 4, 2),
}


def llama_config(shape: str):
    from transformers import LlamaConfig

    vocab, d, f, layers, heads, kv = SHAPES[shape]
    return LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True,
                       max_position_embeddings=2048, rope_theta=100000.0)


def build_model(args):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    return LlamaForCausalLM(llama_config(args.shape))


def read_step_sparsity(model, counter=None) -> list[float]:
    """What LTETrainer reads after each optimizer step for the eta controller: one host read of [L]
    (lte before issue 12: `lte_stats(accumulated=True)`, a read per layer, which the counter sees)."""
    if hasattr(model, "accumulated_sparsity"):
        if counter is not None:
            counter.syncs += 1  # `.tolist()` is one device-to-host read that the dispatcher does not show
        return model.accumulated_sparsity().tolist()
    return model.lte_stats(accumulated=True)["per_layer"]


def one_step(model, batch, opt, autocast, per_step_stats: bool, teacher=None, distill: float = 0.0,
             counter=None) -> None:
    """Forward, backward, clipping, AdamW step (and the stage-1 read-out). `counter` (a dispatch mode)
    counts the operations of everything but the optimizer step, which costs the same in both."""
    counting = counter if counter is not None else contextlib.nullcontext()
    if per_step_stats:
        model.reset_lte_stats()
    with counting, autocast:
        out = model(**batch)
        loss = out.loss
        if teacher is not None:
            from lte.training.distill import distillation_loss

            with torch.no_grad():
                t_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
            kd = distillation_loss(out.logits, t_logits, batch["attention_mask"])
            loss = loss + distill * (kd - model.last_task_loss)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if per_step_stats:
        with counting:
            read_step_sparsity(model, counter)


def time_steps(model, batch, steps: int, warmup: int, device, per_step_stats: bool, teacher=None,
               distill: float = 0.0, count_ops: bool = False) -> dict:
    """Mean and median seconds of `steps` optimizer steps after `warmup` untimed ones."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        one_step(model, batch, opt, autocast, per_step_stats, teacher, distill)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    result = {"times": times}
    if count_ops:
        counter = OpCounter()
        one_step(model, batch, opt, autocast, per_step_stats, teacher, distill, counter)
        result.update(ops=counter.ops, host_syncs=counter.syncs, ops_by_name=counter.by_name)
    return result


def profile_steps(model, batch, device, per_step_stats: bool, teacher=None, distill: float = 0.0,
                  steps: int = 2) -> dict:
    """`steps` optimizer steps under torch.profiler: device busy time, host time and operator tables."""
    from torch.profiler import ProfilerActivity, profile

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    one_step(model, batch, opt, autocast, per_step_stats, teacher, distill)  # AdamW state outside the record
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            one_step(model, batch, opt, autocast, per_step_stats, teacher, distill)
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    device_attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"

    def top(attr: str, n: int = 25) -> list[dict]:
        rows = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:n]
        return [{"name": e.key, "calls": e.count // steps, "self_device_us": getattr(e, device_attr) / steps,
                 "self_cpu_us": e.self_cpu_time_total / steps} for e in rows]

    return {
        "step_s_profiled": wall,
        "device_busy_s": sum(getattr(e, device_attr) for e in events) / steps / 1e6,
        "host_ops_s": sum(e.self_cpu_time_total for e in events) / steps / 1e6,
        "top_device": top(device_attr),
        "top_host": top("self_cpu_time_total"),
        "table_device": events.table(sort_by=device_attr, row_limit=40),
        "table_host": events.table(sort_by="self_cpu_time_total", row_limit=40),
    }


def write_profiles(profiles: dict[str, dict], folder: Path) -> None:
    """DIR/<name>_ops.txt tables and DIR/profile.json; prints device busy time against the step time."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, p in profiles.items():
        (folder / f"{name}_ops.txt").write_text(f"{name}: by self device time\n{p['table_device']}\n\n"
                                                f"{name}: by self CPU time\n{p['table_host']}\n")
    summary = {name: {k: v for k, v in p.items() if not k.startswith("table_")} for name, p in profiles.items()}
    (folder / "profile.json").write_text(json.dumps(summary, indent=2))
    for name, p in profiles.items():
        print(f"profile {name}: step {1000 * p['step_s_profiled']:.1f} ms under the profiler, device busy "
              f"{1000 * p['device_busy_s']:.1f} ms, host operator time {1000 * p['host_ops_s']:.1f} ms")


def _summary(runs: list[dict]) -> dict:
    """Mean and median step time over every round's timed steps (and the op counts of the first)."""
    times = sorted(t for run in runs for t in run["times"])
    out = {"mean_s": sum(times) / len(times), "median_s": times[len(times) // 2], "min_s": times[0],
           "steps": len(times)}
    out.update({k: v for k, v in runs[0].items() if k != "times"})
    return out


def _op_counter_class():
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounterMode(TorchDispatchMode):
        """Counts the aten operations dispatched, and the host syncs among them."""

        def __init__(self) -> None:
            super().__init__()
            self.ops = 0
            self.syncs = 0
            self.by_name: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            name = str(func.overloadpacket.__name__)
            self.by_name[name] = self.by_name.get(name, 0) + 1
            if func is torch.ops.aten._local_scalar_dense.default:
                self.syncs += 1
            return func(*args, **(kwargs or {}))

    return OpCounterMode


def OpCounter():  # noqa: N802 - reads like a class at the call site
    return _op_counter_class()()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a saved causal-LM folder (default: SmolLM2-135M shapes)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2", help="random-weight LLaMA shape")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke test (= --shape tiny)")
    parser.add_argument("--routing", choices=("soft", "ste"), default="soft", help="stage-1 routing")
    parser.add_argument("--distill", type=float, default=0.0, help="distillation weight (teacher: the dense model)")
    parser.add_argument("--count-ops", action="store_true",
                        help="count the ops and host syncs of one step's forward, backward and read-out")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate dense and stage-1 timings this many times (a CPU shared with other work)")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both models (as `lte train --torch-compile`); warm-up steps include the compile")
    parser.add_argument("--compile-mode", default=None, choices=("default", "reduce-overhead", "max-autotune"),
                        help="torch.compile's mode with --compile (reduce-overhead: forward and backward replayed "
                             "as CUDA graphs, no per-operator launches from the host)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also record two steps of each with torch.profiler; tables and a summary to DIR")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.shape = "tiny"
        args.batch_size, args.seq_len = min(args.batch_size, 2), min(args.seq_len, 32)
    elif args.shape == "small":
        args.batch_size, args.seq_len = min(args.batch_size, 2), min(args.seq_len, 32)

    import lte

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args).to(device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    model.train()
    teacher = None
    if args.distill > 0:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    runs: dict[str, list[dict]] = {"dense": [], "stage1": []}
    # The LTE model is converted from `model` in place: one round times the dense model first; more
    # rounds alternate between a copy of it and the LTE model, so that a drifting load hits both alike.
    dense_model = copy.deepcopy(model) if args.rounds > 1 or args.profile else model  # --profile: kept dense
    if args.compile_mode and not args.compile:
        parser.error("--compile-mode needs --compile")
    maybe_compile = (lambda m: torch.compile(m, mode=args.compile_mode)) if args.compile else (lambda m: m)
    if args.rounds == 1:
        runs["dense"].append(time_steps(maybe_compile(model), batch, args.steps, args.warmup, device,
                                        per_step_stats=False, count_ops=args.count_ops))
    # Grouping does not change the step cost; contiguous skips k-means for a quick benchmark.
    lmodel = lte.get_lte_model(model, lte.LTEConfig(grouping="contiguous", eta=0.5), progress=False)
    lmodel.set_routing(args.routing)
    lmodel.train()
    timed_dense, timed_lte = maybe_compile(dense_model), maybe_compile(lmodel)
    for r in range(args.rounds):
        count = args.count_ops and r == 0
        if args.rounds > 1:
            runs["dense"].append(time_steps(timed_dense, batch, args.steps, args.warmup, device,
                                            per_step_stats=False, count_ops=count))
        runs["stage1"].append(time_steps(timed_lte, batch, args.steps, args.warmup, device, per_step_stats=True,
                                         teacher=teacher, distill=args.distill, count_ops=count))
    dense, stage1 = (_summary(runs[k]) for k in ("dense", "stage1"))

    result = {
        "benchmark": "train_step stage1 vs dense",
        "model": args.model or f"{args.shape} LLaMA shape (random weights)",
        "routing": args.routing,
        "distill": args.distill,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_per_step": args.batch_size * args.seq_len,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "compiled": args.compile,
        "compile_mode": args.compile_mode,
        "dense": dense,
        "stage1": stage1,
        "ratio_median": stage1["median_s"] / dense["median_s"],
        "ratio_min": stage1["min_s"] / dense["min_s"],
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
    if args.count_ops:
        print(f"\nops per step (forward, backward, read-out): dense {dense['ops']}, stage 1 {stage1['ops']} (+{stage1['ops'] - dense['ops']}); "
              f"host syncs: dense {dense['host_syncs']}, stage 1 {stage1['host_syncs']}")
        extra = {k: stage1["ops_by_name"].get(k, 0) - dense["ops_by_name"].get(k, 0)
                 for k in set(stage1["ops_by_name"]) | set(dense["ops_by_name"])}
        top = sorted(((n, k) for k, n in extra.items() if n), reverse=True)[:20]
        print("extra operations of the stage-1 step by name: " + ", ".join(f"{k} {n:+d}" for n, k in top))
    print(f"\nstage-1 step / dense step = {result['ratio_median']:.3f} (fastest steps: {result['ratio_min']:.3f})  "
          f"(dense {1000 * dense['median_s']:.1f} ms, stage 1 {1000 * stage1['median_s']:.1f} ms, "
          f"{result['dense_tokens_per_s']:.0f} dense tokens/s on {result['device']})")
    if args.profile:
        profiles = {name: profile_steps(m, batch, device, per_step_stats=name == "stage1",
                                        teacher=teacher if name == "stage1" else None, distill=args.distill)
                    for name, m in (("dense", timed_dense), ("stage1", timed_lte))}  # compiled with --compile
        write_profiles(profiles, Path(args.profile))


def _commit() -> str | None:
    """LTE_COMMIT when set (a copy of the tree whose .git may be older, as on a remote GPU machine), else git's."""
    if os.environ.get("LTE_COMMIT"):
        return os.environ["LTE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    main()

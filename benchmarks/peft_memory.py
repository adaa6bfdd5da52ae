"""Peak GPU memory and tokens/s of training steps: full fine-tuning vs LoRA-LTE vs dense LoRA (issue 12).

A LLaMA-2-7B-shaped model with random weights (no download), one batch of random tokens, causal-LM
loss, bf16 autocast as the Trainer runs it. Each row is one phase of training, timed over a few
optimizer steps after warm-up ones (forward, backward, AdamW, and for LTE the per-step sparsity
read-out the trainer does for the eta controller):

    full: dense / LTE stage 1 / LTE stage 2    fp32 weights (AdamW master copies), every parameter trains
    lora: dense LoRA / LoRA-LTE stage 1 / LoRA-LTE stage 2
                                                bf16 frozen base; LoRA (peft, rank --lora-r) on the
                                                attention and FFN projections; stage 1 also trains the routers

Peak memory is `torch.cuda.max_memory_allocated` over the phase (weights, optimizer state,
activations). Activation checkpointing, `--checkpointing auto`: the full fine-tuning phases use it
(a 7B model's fp32 weights, gradients and AdamW state take ~110 GB before activations), the LoRA
phases start without it and switch it on, for the rest of their kind, when a phase runs out of
memory; `on` / `off` force it. Ratios are given only between phases run alike. A phase that still
runs out of memory is reported as such. The goal of issue 12: LoRA-LTE stage 1 at >= 60% of the
dense LoRA step's tokens/s.

    PYTHONPATH=src python benchmarks/peft_memory.py                      # H200: about 2-4 minutes
    PYTHONPATH=src python benchmarks/peft_memory.py --shape tiny         # CPU smoke test (seconds)
    PYTHONPATH=src python benchmarks/peft_memory.py --only lora          # the LoRA rows only

Writes $OUT/peft_memory.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import Deadline, environment, log  # noqa: E402

#: LLaMA shapes: vocab, D, F, layers, heads, kv heads.
SHAPES = {
    "llama2-7b": (32000, 4096, 11008, 32, 32, 32),
    "tiny": (512, 64, 176, 2, 4, 4),
}
PHASES = {
    "full": ("full/dense", "full/lte-stage1", "full/lte-stage2"),
    "lora": ("lora/dense", "lora/lte-stage1", "lora/lte-stage2"),
}


def build(shape: str, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, d, f, layers, heads, kv = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype, on its device: no fp32 copy of a bf16 model on the way
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.train()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _checkpointing(model, on: bool) -> None:
    hf = getattr(model, "base_model", model) if hasattr(model, "lte_layers") else model
    if on:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_disable()


def time_phase(model, batch: dict[str, torch.Tensor], steps: int, warmup: int, lte_stats: bool,
               device: torch.device) -> dict[str, Any]:
    """Median step time and peak memory of AdamW training steps over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    # fused on CUDA: no full-size temporaries (a 7B model's fp32 AdamW state alone is ~80 GB)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if lte_stats:
            model.reset_lte_stats()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if lte_stats:
            model.accumulated_sparsity().tolist()  # the trainer's read for the eta controller
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    tokens = int(batch["input_ids"].numel())
    out = {"median_s": times[len(times) // 2], "steps": len(times), "tokens_per_step": tokens,
           "tokens_per_s": tokens / times[len(times) // 2],
           "trainable_parameters": sum(p.numel() for p in params),
           "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    del opt
    return out


def run_phase(name: str, model, batch, args, device, lte_stats: bool) -> dict[str, Any]:
    """One phase; with --checkpointing auto, retried with activation checkpointing when it runs out of
    memory, which then stays on for the later phases of its kind (`args.ckpt_kind`)."""
    kind = name.split("/")[0]
    if args.checkpointing == "auto":
        modes = (True,) if args.ckpt_kind.get(kind, kind == "full") else (False, True)
    else:
        modes = (args.checkpointing == "on",)
    result: dict[str, Any] = {"phase": name}
    for ckpt in modes:
        args.ckpt_kind[kind] = ckpt
        _checkpointing(model, ckpt)
        model.zero_grad(set_to_none=True)
        _free()
        try:
            result.update(time_phase(model, batch, args.steps, args.warmup, lte_stats, device), checkpointing=ckpt,
                          error=None)
            break
        except torch.OutOfMemoryError as err:
            result.update(checkpointing=ckpt, error=f"out of memory: {str(err).splitlines()[0][:200]}")
            model.zero_grad(set_to_none=True)
            _free()
    _checkpointing(model, False)
    if result.get("error"):
        log(f"{name}: {result['error']}")
    else:
        mem = result["peak_memory_gb"]
        log(f"{name}: {result['tokens_per_s']:.0f} tokens/s, peak "
            f"{'-' if mem is None else f'{mem:.1f} GB'}, checkpointing {'on' if result['checkpointing'] else 'off'}")
    return result


def _lte_phases(kind: str, model, batch, args, device, rows: list[dict]) -> None:
    """Stage 1 (soft or ste routing, routers train) then stage 2 (hard routing, routers frozen) of `model`."""
    model.set_routing(args.routing).freeze_routers(False)
    rows.append(run_phase(f"{kind}/lte-stage1", model, batch, args, device, lte_stats=True))
    model.freeze_routers(True)
    model.set_routing("hard")
    rows.append(run_phase(f"{kind}/lte-stage2", model, batch, args, device, lte_stats=True))
    rows[-1]["ffn_sparsity"] = model.lte_stats()["ffn_sparsity"]


def full_rows(args, device, deadline: Deadline) -> list[dict]:
    """Full fine-tuning: fp32 weights (Trainer's mixed precision), every parameter trains."""
    import lte

    rows: list[dict] = []
    model = build(args.shape, torch.float32, device)
    batch = make_batch(model, args, device)
    rows.append(run_phase("full/dense", model, batch, args, device, lte_stats=False))
    if deadline.over(60):
        return rows
    lmodel = lte.get_lte_model(model, lte.LTEConfig(grouping="contiguous"), progress=False)
    _lte_phases("full", lmodel, batch, args, device, rows)
    del model, lmodel
    _free()
    return rows


def lora_rows(args, device, deadline: Deadline) -> list[dict]:
    """LoRA on a bf16 frozen base: dense LoRA (peft alone), then LoRA-LTE on the same base."""
    import peft

    import lte
    from lte import adapters
    from lte.conversion.architectures import spec_for

    rows: list[dict] = []
    model = build(args.shape, torch.bfloat16, device)
    batch = make_batch(model, args, device)
    config = adapters.lora_config(args.lora_r)
    dense_config = adapters.plan(model, spec_for("llama"), "llama", config)  # the same targets, plain names
    peft.inject_adapter_in_model(dense_config, model)
    rows.append(run_phase("lora/dense", model, batch, args, device, lte_stats=False))
    adapters.merge(model)  # back to plain layers (random adapters: the weights' values do not matter here)
    model.requires_grad_(True)
    if deadline.over(60):
        return rows
    lmodel = lte.get_lte_model(model, lte.LTEConfig(grouping="contiguous"), progress=False)
    lmodel.add_adapters(config)
    _lte_phases("lora", lmodel, batch, args, device, rows)
    del model, lmodel
    _free()
    return rows


def make_batch(model, args, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def table(rows: list[dict]) -> str:
    lines = [f"{'phase':18s} {'tokens/s':>10s} {'peak GB':>8s} {'ckpt':>5s} {'trainable':>12s}  note"]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['phase']:18s} {'-':>10s} {'-':>8s} {'-':>5s} {'-':>12s}  {r['error'][:60]}")
            continue
        mem = "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
        note = f"FFN sparsity {r['ffn_sparsity']:.2f}" if "ffn_sparsity" in r else ""
        lines.append(f"{r['phase']:18s} {r['tokens_per_s']:10.0f} {mem:>8s} {'on' if r['checkpointing'] else 'off':>5s} "
                     f"{r['trainable_parameters']:12,d}  {note}")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> dict[str, float | str]:
    """Tokens/s of each LTE phase relative to the dense phase of its kind (the goal: lora stage 1 >= 0.6),
    for phases run with the same activation checkpointing."""
    ok = {r["phase"]: r for r in rows if not r.get("error")}
    out: dict[str, float | str] = {}
    for kind in ("full", "lora"):
        for stage in ("lte-stage1", "lte-stage2"):
            a, b = ok.get(f"{kind}/{stage}"), ok.get(f"{kind}/dense")
            if a and b:
                same = a["checkpointing"] == b["checkpointing"]
                out[f"{kind}/{stage} vs {kind}/dense"] = (a["tokens_per_s"] / b["tokens_per_s"] if same else
                                                         "n/a: run with and without activation checkpointing")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per phase")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per phase")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--routing", choices=("soft", "ste"), default="soft", help="stage-1 routing")
    parser.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto",
                        help="activation checkpointing (auto: only for a phase that runs out of memory without)")
    parser.add_argument("--only", choices=("full", "lora"), default=None, help="run one kind of phases")
    parser.add_argument("--budget-s", type=float, default=330, help="stop starting new phases after this long")
    parser.add_argument("--out", default=None, help="JSON file (default $OUT/peft_memory.json, else stdout only)")
    args = parser.parse_args()
    if args.shape == "tiny":
        args.batch_size, args.seq_len = min(args.batch_size, 2), min(args.seq_len, 32)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.ckpt_kind = {}  # kind -> activation checkpointing of its last phase (auto mode)
    deadline = Deadline(args.budget_s)
    log(f"{args.shape}, batch {args.batch_size} x {args.seq_len} tokens, LoRA rank {args.lora_r}, {device}")
    rows: list[dict] = []
    kinds = [args.only] if args.only else ["lora", "full"]  # LoRA first: the rows the goal is about
    for kind in kinds:
        if deadline.over(30):
            log(f"time budget spent: {kind} rows skipped")
            break
        rows += (lora_rows if kind == "lora" else full_rows)(args, device, deadline)
    result = {"benchmark": "peft_memory", "shape": args.shape, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "lora_r": args.lora_r, "routing": args.routing,
              "checkpointing": args.checkpointing, "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
              "rows": rows, "ratios": ratios(rows), "env": environment(),
              "peft": __import__("peft").__version__}
    out = args.out or (Path(os.environ["OUT"]) / "peft_memory.json" if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
        log(f"wrote {out}")
    print()
    print(table(rows))
    for name, value in result["ratios"].items():
        print(f"{name}: " + (f"{value:.2f}x tokens/s" if isinstance(value, float) else value))


if __name__ == "__main__":
    main()

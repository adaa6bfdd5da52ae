"""`LTEModel`: an unmodified HF model with LTE modules in its FFNs; `get_lte_model` makes one.

The conversion itself (find the FFNs, group and permute their neurons, put `LTEInput` /
`LTEOutput` in place) is `lte.conversion.convert`; this module adds what a converted model
does: routing modes, the LTE losses of a forward, statistics (`lte.sparse_model`), save and load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import CONFIG_FORMAT_VERSION, LTEConfig
from .conversion.convert import LTELayer, base_fingerprint, convert, reattach, weights_digest
from .errors import LTEError
from .losses import lte_losses
from .routing.layers import MODES, TRAINING_MODES
from .sparse_model import SparseFFNModel
from .stats import active_neurons, linear_flops_per_token, union_sparsity
from .version import __version__

CONFIG_NAME = "lte_config.json"
ADAPTER_NAME = "lte_adapter.safetensors"
#: Module-name parts that wrappers add and state dicts leave out (FSDP1 units, activation checkpointing,
#: torch.compile): `layers.0._fsdp_wrapped_module.mlp` is `layers.0.mlp` in the state dict.
_WRAPPER_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def state_dict_name(module_name: str) -> str:
    """A module's name as its tensors' state-dict keys spell it (wrapper parts dropped)."""
    return ".".join(part for part in module_name.split(".") if part not in _WRAPPER_NAMES)


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu()


def get_lte_model(model: nn.Module, config: LTEConfig | None = None, progress: bool = True,
                  calibration=None) -> LTEModel:
    """Convert a Hugging Face model into an `LTEModel`, in place.

    Groups each FFN's neurons into experts (`config.grouping`), permutes the weights so each
    expert is a contiguous block, and adds a router per FFN (`lte.conversion.convert`). The result
    starts in "dense" routing, where it computes exactly the original function.
    `calibration`: a batch {input_ids, attention_mask} (or a list of batches) of task text, needed
    by grouping "activation" (neurons grouped by their activation profiles on it).
    """
    config = config or LTEConfig()
    layers, fingerprint = convert(model, config, progress, calibration)
    return LTEModel(model, config, layers, fingerprint)


# --------------------------------------------------------------------------- the model
class LTEModel(SparseFFNModel):
    """A converted HF model: routing modes, LTE losses, statistics and save/load.

    Attribute access falls through to the HF model (`config`, `generate`, ...); statistics and
    the atomic save come from `lte.sparse_model.SparseFFNModel`.
    """

    config_name = CONFIG_NAME

    def __init__(self, base_model: nn.Module, config: LTEConfig, layers: list[LTELayer],
                 fingerprint: dict[str, Any], stage: str = "converted") -> None:
        super().__init__()
        self.base_model = base_model
        self.lte_config = config
        self._layers = layers
        self._fingerprint = fingerprint
        self.stage = stage
        self.routing = "dense"
        self.track_stats = True
        self.last_lte_losses: dict[str, torch.Tensor] = {}
        self.last_task_loss: torch.Tensor | None = None
        self._last_masks: list[torch.Tensor] = []
        self._last_token_mask: torch.Tensor | None = None
        exclude = {id(layer.router) for layer in layers}
        self._dense_flops = linear_flops_per_token(base_model, exclude)
        self._digest = weights_digest(layers)
        self.reset_lte_stats()

    # ---------------------------------------------------------------- routing
    def lte_layers(self) -> list[LTELayer]:
        return list(self._layers)

    def set_routing(self, mode: str, tau: float | None = None, k: int | Sequence[int] | None = None) -> LTEModel:
        """Switch every FFN to "dense", "soft" (stage 1, the paper), "ste" (stage 1, ours: the hard
        mask in the forward, the sigmoid's gradient in the backward), "hard" (stage 2, inference) or "topk".

        `tau`: a new routing threshold. It becomes `lte_config.tau`, the one value that routing, the
        losses, the statistics and the save use. `k` (topk): experts kept per token, one int for
        every layer or one per layer.
        """
        if mode not in MODES:
            raise LTEError(f"unknown routing mode {mode!r}; choose one of {', '.join(MODES)}")
        if tau is not None:
            if not 0.0 < tau < 1.0:
                raise LTEError(f"tau is a threshold on sigmoid scores and must lie in (0, 1), got {tau}")
            self.lte_config.tau = float(tau)
        tau = self.lte_config.tau
        k = self.lte_config.topk if k is None else k
        if mode == "topk" and k is None:
            raise LTEError("topk routing needs k: set_routing('topk', k=...) or LTEConfig(topk=...)")
        ks = list(k) if isinstance(k, Sequence) else [k] * len(self._layers)
        if len(ks) != len(self._layers):
            raise LTEError(f"set_routing got {len(ks)} values of k for {len(self._layers)} LTE layers; "
                           "pass one int or one per layer")
        for layer, k_layer in zip(self._layers, ks):
            layer.input.mode, layer.input.tau, layer.input.k = mode, tau, k_layer
            layer.input.loss_to_model = self.lte_config.loss_to_model
        self.routing = mode
        return self

    def router_parameters(self) -> list[nn.Parameter]:
        return [layer.router.weight for layer in self._layers]

    def freeze_routers(self, frozen: bool = True) -> None:
        for p in self.router_parameters():
            p.requires_grad_(not frozen)

    def freeze_selectors(self, frozen: bool = True) -> None:
        self.freeze_routers(frozen)

    # ---------------------------------------------------------------- forward
    def _token_mask(self, attention_mask: Any, tokens: int) -> torch.Tensor | None:
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.numel() == tokens:
            return attention_mask.reshape(-1) != 0
        return None

    def lte_loss(self, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_eff, L_sep) of the last forward, over real tokens (differentiable)."""
        scores = [layer.input.loss_scores for layer in self._layers]
        if any(s is None for s in scores):
            raise LTEError("no router scores: run a forward in soft, hard or topk routing first")
        flat = [s.reshape(-1, s.shape[-1]) for s in scores]  # [T, E]
        token_mask = self._token_mask(attention_mask, flat[0].shape[0])
        return lte_losses(flat, token_mask, self.lte_config.tau, self.lte_config.eps)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_model(*args, **kwargs)
        if self.routing == "dense":
            self.last_lte_losses = {}
            self.last_task_loss = getattr(out, "loss", None)
            return out
        attention_mask = kwargs.get("attention_mask")
        task = getattr(out, "loss", None)
        self.last_task_loss = task  # undetached: a trainer may mix it with other terms (distillation)
        self.last_lte_losses = {} if task is None else {"task": task.detach(), "total": task.detach()}
        if self.routing in TRAINING_MODES:
            eff, sep = self.lte_loss(attention_mask)
            self.last_lte_losses.update(eff=eff.detach(), sep=sep.detach())
            if task is not None:
                total = task + self.lte_config.eta * eff + self.lte_config.lam * sep
                self.last_lte_losses["total"] = total.detach()
                out.loss = total
        if self.track_stats:
            self._record_stats(attention_mask)
        return out

    # ---------------------------------------------------------------- statistics
    def reset_lte_stats(self) -> None:
        """Start accumulating statistics afresh (see `lte_stats(accumulated=True)`)."""
        n = len(self._layers)
        self._acc_active = [torch.zeros((), dtype=torch.float64) for _ in range(n)]
        self._acc_tokens = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def _record_stats(self, attention_mask: Any) -> None:
        masks = []
        for layer in self._layers:
            s = layer.input.scores
            g = layer.input.gate
            m = (s > layer.input.tau) if self.routing == "soft" else (g != 0)
            masks.append(m.reshape(-1, m.shape[-1]))  # [T, E]
        token_mask = self._token_mask(attention_mask, masks[0].shape[0])
        self._last_masks, self._last_token_mask = masks, token_mask
        w = None if token_mask is None else token_mask.to(torch.float32)
        for i, (layer, m) in enumerate(zip(self._layers, masks)):
            active = active_neurons(m, layer.input.expert_sizes)  # [T]
            total = active.sum() if w is None else (active * w).sum()
            self._acc_active[i] = self._acc_active[i].to(total.device) + total.double()
        n_tok = masks[0].shape[0] if w is None else w.sum()
        self._acc_tokens = self._acc_tokens.to(masks[0].device) + torch.as_tensor(n_tok, dtype=torch.float64,
                                                                                  device=masks[0].device)

    def _num_layers(self) -> int:
        return len(self._layers)

    def _accumulated_per_layer(self) -> list[float]:
        tokens = float(self._acc_tokens)
        if tokens == 0:
            raise LTEError("no statistics accumulated: run forwards after reset_lte_stats()")
        return [1.0 - float(a) / (tokens * layer.input.ffn_width) for a, layer in zip(self._acc_active, self._layers)]

    def _last_per_layer(self) -> list[float]:
        if not self._last_masks:
            raise LTEError("no statistics yet: run a forward in soft, hard or topk routing first")
        return self._last_union(1)

    def _last_union(self, batch_size: int) -> list[float]:
        return [union_sparsity(m, layer.input.expert_sizes, batch_size, self._last_token_mask)
                for layer, m in zip(self._layers, self._last_masks)]

    def _ffn_flops(self, layer: int) -> int:
        lay = self._layers[layer]
        return 2 * lay.router.in_features * lay.input.ffn_width * (3 if lay.spec.gated else 2)

    def _selector_flops(self, layer: int) -> int:
        lay = self._layers[layer]
        return 2 * lay.router.in_features * lay.input.num_experts

    def lte_stats(self, accumulated: bool = False) -> dict[str, Any]:
        """FFN sparsity (fraction of FFN neurons not computed) per layer and overall, GFLOPs/token.

        `accumulated=False`: the last forward; `True`: every forward since `reset_lte_stats()`.
        In soft routing the sparsity is what the hard cut at tau would skip; dense routing is 0.
        GFLOPs count every linear layer (routers included, attention-score products excluded).
        `accumulated=True` adds `tokens`: the real tokens the statistics cover (to weight them
        when several processes' statistics are combined).
        """
        return super().lte_stats(accumulated)

    def _extra_stats(self, accumulated: bool) -> dict[str, Any]:
        return {"tokens": float(self._acc_tokens)} if accumulated else {}

    # ---------------------------------------------------------------- save / load
    def _meta(self, weights_permuted: bool, embedding: torch.Tensor | None = None) -> dict[str, Any]:
        spec = self._layers[0].spec
        archs = getattr(self.base_model.config, "architectures", None) or [type(self.base_model).__name__]
        return {
            "format_version": CONFIG_FORMAT_VERSION,
            "lte_version": __version__,
            "lte": self.lte_config.to_dict(),
            "stage": self.stage,
            "routing": self.routing,
            "spec": spec.to_dict(),
            "activation": self._layers[0].activation,
            "layers": [layer.name for layer in self._layers],
            "weights_permuted": weights_permuted,
            "base_architecture": archs[0],
            # A full save is its own base; a light save needs the base it was converted from.
            "base": (base_fingerprint(self.base_model, self._fingerprint["ffn_widths"], embedding=embedding)
                     if weights_permuted else self._fingerprint),
            "tokenizer_source": self._tokenizer_source(),
        }

    def _module_names(self) -> dict[int, str]:
        """id(module) -> its state-dict name in this model (names of sharding/checkpoint wrappers dropped)."""
        return {id(m): state_dict_name(name) for name, m in self.named_modules()}

    def _full_state(self, state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """This model's full state dict: its own, or `state_dict` (e.g. gathered from FSDP shards) with the
        entries of parameters the model shares (tied embeddings) made one tensor again, as in its own."""
        if state_dict is None:
            return self.state_dict()
        state, first = dict(state_dict), {}
        for name, param in self.named_parameters(remove_duplicate=False):
            key = state_dict_name(name)
            owner = first.setdefault(id(param), key)
            if owner != key and owner in state and key in state:
                state[key] = state[owner]
        return state

    def _adapter_state(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Routers, permutations and expert sizes under the adapter file's names (`layers.{i}.*`)."""
        full = self._full_state(state_dict)
        names = self._module_names()
        state = {}
        for i, layer in enumerate(self._layers):
            owner = names[id(layer.input)]
            state[f"layers.{i}.router.weight"] = _cpu(full[f"{owner}.router.weight"]).contiguous()
            state[f"layers.{i}.perm"] = _cpu(full[f"{owner}.perm"])
            state[f"layers.{i}.expert_sizes"] = _cpu(full[f"{owner}.expert_sizes"])
        return state

    def _plain_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The HF model's state dict under its own key names (wrappers removed, routers dropped)."""
        prefix = "base_model."
        names = self._module_names()
        lte_names = {names[id(layer.input)][len(prefix):] for layer in self._layers}  # relative to the HF model
        state = {}
        for key, value in self._full_state(state_dict).items():
            if not key.startswith(prefix):
                continue
            key = key[len(prefix):]
            owner, _, leaf = key.rpartition(".")
            if owner in lte_names and leaf in ("perm", "expert_sizes"):
                continue
            if key.endswith(".router.weight") and key[: -len(".router.weight")] in lte_names:
                continue
            state[key.replace(".base_layer.", ".")] = value
        return state

    def _input_embedding(self, state_dict: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        """The input embedding table from `state_dict` (None: read it from the model)."""
        if state_dict is None:
            return None
        return state_dict[self._module_names()[id(self.base_model.get_input_embeddings())] + ".weight"]

    def save_pretrained(self, save_directory: str | os.PathLike, light: bool = False,
                        state_dict: dict[str, torch.Tensor] | None = None, tokenizer: Any = None,
                        **_: Any) -> None:
        """Save to a directory. Files are written to a temporary folder first and moved in with
        `lte_config.json` last, so a crash never leaves a half-written file under a final name.

        Full (default): the HF model (safetensors, permuted weights) + `lte_config.json` +
        `lte_adapter.safetensors`; reload with `LTEModel.from_pretrained(dir)` alone.
        Light: only what LTE adds (routers, permutations, config, stage); reload with
        `LTEModel.from_base(base_model_loaded_from_its_own_path, dir)`.
        `state_dict`: this model's full state dict (`self.state_dict()` keys) to write instead of the
        module tensors, e.g. gathered on one process from a model sharded by FSDP, whose own
        tensors are shards (full saves only).
        `tokenizer`: saved into the folder too, so it is self-sufficient; without one,
        `lte_config.json` records where the model came from (`tokenizer_source`) and
        `lte.loading.load_tokenizer` takes the tokenizer from there.
        """
        from safetensors.torch import save_file

        if light:
            if state_dict is not None:
                raise LTEError("save_pretrained(light=True) reads the live model; with a gathered state_dict "
                               "(sharded training) make a full save: save_pretrained(dir, state_dict=...)")
            self._check_base_unchanged()

        def write(folder: Path) -> None:
            if not light:
                self.base_model.save_pretrained(folder, state_dict=self._plain_state_dict(state_dict))
            save_file(self._adapter_state(state_dict), str(folder / ADAPTER_NAME))
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            meta = self._meta(weights_permuted=not light, embedding=self._input_embedding(state_dict))
            (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

        self._save_atomically(save_directory, write)

    def _check_base_unchanged(self) -> None:
        if weights_digest(self._layers) != self._digest:
            raise LTEError(
                "the base weights changed since conversion (training?): a light save keeps only the "
                "routers and permutations and would lose them. Use save_pretrained(dir) (full save)."
            )

    @staticmethod
    def _read(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        from safetensors.torch import load_file

        d = Path(directory)
        if not d.is_dir():
            raise LTEError(f"{d} is not a directory; pass the directory an LTE model was saved to")
        if not (d / CONFIG_NAME).is_file():
            raise LTEError(
                f"{d} has no {CONFIG_NAME}: it is not an LTE model directory. For a plain HF model, "
                "load it with transformers and convert it with lte.get_lte_model."
            )
        meta = json.loads((d / CONFIG_NAME).read_text())
        if meta.get("format_version", 1) > CONFIG_FORMAT_VERSION:
            raise LTEError(f"{d} was saved by a newer lte (format {meta['format_version']}); upgrade lte")
        if not (d / ADAPTER_NAME).is_file():
            raise LTEError(f"{d} is missing {ADAPTER_NAME} (the routers); the save is incomplete, re-save it")
        return meta, load_file(str(d / ADAPTER_NAME))

    @classmethod
    def _attach(cls, base: nn.Module, meta: dict[str, Any], state: dict[str, torch.Tensor], where: str,
                check_weights: bool) -> LTEModel:
        cfg, layers = reattach(base, meta, state, where, check_weights)
        model = cls(base, cfg, layers, meta["base"], stage=meta.get("stage", "converted"))
        model.set_routing(meta.get("routing", "dense"))
        return model

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **hf_kwargs: Any) -> LTEModel:
        """Load a full save (`save_pretrained(dir)`); HF keyword arguments (dtype, device_map) pass through."""
        import transformers

        meta, state = cls._read(directory)
        d = Path(directory)
        if not meta.get("weights_permuted", True) or not (d / "config.json").is_file():
            raise LTEError(
                f"{d} is a light save (routers only); load its base model yourself and call "
                "LTEModel.from_base(base_model, dir)"
            )
        arch = meta["base_architecture"]
        model_cls = getattr(transformers, arch, None)
        if model_cls is None:
            raise LTEError(f"{d} holds a {arch}, which this transformers version does not have; upgrade transformers")
        base = model_cls.from_pretrained(d, **hf_kwargs)
        return cls._attach(base, meta, state, str(d), check_weights=True)

    @classmethod
    def from_base(cls, base_model: nn.Module, directory: str | os.PathLike, check_weights: bool = True) -> LTEModel:
        """Re-apply a light save (routers, permutations, config) to its base model, in place."""
        meta, state = cls._read(directory)
        if meta.get("weights_permuted", False):
            raise LTEError(f"{directory} is a full save; load it with LTEModel.from_pretrained(dir)")
        return cls._attach(base_model, meta, state, str(directory), check_weights)

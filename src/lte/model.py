"""`LTEModel`: an unmodified HF model with LTE modules in its FFNs; `get_lte_model` makes one.

The conversion itself (find the FFNs, group and permute their neurons, put `LTEInput` /
`LTEOutput` in place) is `lte.conversion.convert`; this module adds what a converted model
does: routing modes, the LTE losses of a forward, statistics (`lte.sparse_model`), save and load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CONFIG_NAME, LTECheckpointMixin
from .config import LTEConfig
from .conversion.architectures import spec_for
from .conversion.convert import LTELayer, convert, weights_digest
from .errors import LTEError
from .losses import lte_losses
from .passes import forward_until
from .routing.layers import MODES, TRAINING_MODES
from .sparse_model import SparseFFNModel
from .stats import active_neurons, linear_flops_per_token, union_sparsity


def get_lte_model(model: nn.Module, config: LTEConfig | None = None, progress: bool = True,
                  calibration=None, adapters: Any = None) -> LTEModel:
    """Convert a Hugging Face model into an `LTEModel`, in place.

    Groups each FFN's neurons into experts (`config.grouping`), permutes the weights so each
    expert is a contiguous block, and adds a router per FFN (`lte.conversion.convert`). The result
    starts in "dense" routing, where it computes exactly the original function.
    `calibration`: a batch {input_ids, attention_mask} (or a list of batches) of task text, needed
    by grouping "activation" (neurons grouped by their activation profiles on it).
    `adapters`: a `peft.LoraConfig`: LoRA adapters on the frozen base (`add_adapters`).
    """
    config = config or LTEConfig()
    if adapters is not None:  # refuse bad adapter settings before the (slow) grouping
        from . import adapters as lora

        spec = spec_for(model.config.model_type, config.ffn_spec)
        lora.plan(model, spec, model.config.model_type, adapters)
    layers, fingerprint = convert(model, config, progress, calibration)
    lmodel = LTEModel(model, config, layers, fingerprint)
    return lmodel if adapters is None else lmodel.add_adapters(adapters)


def add_adapters(lmodel: LTEModel, config: Any = None, seed: int | None = None, **lora: Any) -> LTEModel:
    """LoRA adapters (peft) on a converted model's frozen base; see `LTEModel.add_adapters`."""
    return lmodel.add_adapters(config, seed=seed, **lora)


def _default_base_path(model: nn.Module) -> str | None:
    """Where an HF model was loaded from (absolute when it is a local folder), or None."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else str(name)


# --------------------------------------------------------------------------- the model
class LTEModel(LTECheckpointMixin, SparseFFNModel):
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
        #: Where the base model is loaded from, recorded by a light save (None: unknown).
        self.base_path: str | None = _default_base_path(base_model)
        self._base_permuted = False  # True when the weights at base_path are already permuted (a full save)
        self._base_changed = False  # True once adapters were merged into the base
        self._adapter_config: Any = None  # the resolved peft config of the adapters, if any
        self.reset_lte_stats()

    # ---------------------------------------------------------------- routing
    def lte_layers(self) -> list[LTELayer]:
        return list(self._layers)

    def set_routing(self, mode: str, tau: float | None = None, k: int | Sequence[int] | None = None,
                    budget: float = 0.0, layer_tau: Sequence[float] | None = None) -> LTEModel:
        """Switch every FFN to "dense", "soft" (stage 1, the paper), "ste" (stage 1, ours: the hard
        mask in the forward, the sigmoid's gradient in the backward), "hard" (stage 2, inference) or "topk".

        `tau`: a new routing threshold. It becomes `lte_config.tau`, the one value that routing, the
        losses, the statistics and the save use (and drops per-layer thresholds). `layer_tau`: one
        threshold per layer instead, kept as `lte_config.layer_tau` (saved; the losses keep `tau`).
        Without either, the thresholds the config holds stay. `k` (topk): experts kept per token, one int for
        every layer or one per layer. `budget` (hard or topk): a per-batch expert budget, the fraction of each
        layer's experts the sequences of a batch may use together at each position
        (`lte.routing.layers.batch_budget_keep`; in topk routing each token then takes its k best among
        them; what a served decode step of that batch with `prepare_for_inference(budget=round(budget x E))`
        computes); 0 = off. Not saved with the model.
        """
        if mode not in MODES:
            raise LTEError(f"unknown routing mode {mode!r}; choose one of {', '.join(MODES)}")
        if not 0.0 <= budget < 1.0 or (budget and mode not in ("hard", "topk")):
            raise LTEError(f"budget is a fraction of the experts in [0, 1) for hard or topk routing; got {budget} "
                           f"with {mode!r} routing")
        if tau is not None and layer_tau is not None:
            raise LTEError("set_routing takes tau (one threshold) or layer_tau (one per layer), not both")
        if tau is not None:
            if not 0.0 < tau < 1.0:
                raise LTEError(f"tau is a threshold on sigmoid scores and must lie in (0, 1), got {tau}")
            self.lte_config.tau = float(tau)
            self.lte_config.layer_tau = None
        if layer_tau is not None:
            taus = [float(t) for t in layer_tau]
            if len(taus) != len(self._layers) or not all(0.0 < t < 1.0 for t in taus):
                raise LTEError(f"layer_tau needs one threshold in (0, 1) per LTE layer ({len(self._layers)}); "
                               f"got {len(taus)} value(s): {taus}")
            self.lte_config.layer_tau = taus
        taus = self.lte_config.layer_tau or [self.lte_config.tau] * len(self._layers)
        if len(taus) != len(self._layers):
            raise LTEError(f"the config's layer_tau has {len(taus)} thresholds for {len(self._layers)} LTE layers: "
                           "it belongs to another model; calibrate tau again or drop layer_tau")
        k = self.lte_config.topk if k is None else k
        if mode == "topk" and k is None:
            raise LTEError("topk routing needs k: set_routing('topk', k=...) or LTEConfig(topk=...)")
        ks = list(k) if isinstance(k, Sequence) else [k] * len(self._layers)
        if len(ks) != len(self._layers):
            raise LTEError(f"set_routing got {len(ks)} values of k for {len(self._layers)} LTE layers; "
                           "pass one int or one per layer")
        for layer, k_layer, tau_layer in zip(self._layers, ks, taus):
            layer.input.mode, layer.input.tau, layer.input.k = mode, tau_layer, k_layer
            layer.input.budget = float(budget)
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

    # ---------------------------------------------------------------- adapters (peft LoRA)
    @property
    def has_adapters(self) -> bool:
        return self._adapter_config is not None

    @property
    def adapter_config(self) -> Any:
        """The `peft.LoraConfig` of the adapters (targets resolved to full module names), or None."""
        return self._adapter_config

    def add_adapters(self, config: Any = None, seed: int | None = None, **lora: Any) -> LTEModel:
        """Put LoRA adapters (the peft library) on the base model and freeze the base, in place.

        `config`: a `peft.LoraConfig`; its `target_modules` may be None / "all" (the attention and
        FFN projections of the family, `lte.conversion.architectures.adapter_targets`), "attention",
        "ffn", or module names. Without `config`, `lora` are `lte.adapters.lora_config` arguments
        (r, alpha, dropout, targets). The adapters go on the permuted layers (an FFN projection's
        target is the `base_layer` inside its LTE wrapper), so `merge_adapters` gives exactly the
        weights the kernels serve. Base weights are frozen; routers keep their `requires_grad` and
        are kept in fp32 (so are the adapters) when the base is in a 16-bit dtype. `seed`: of the
        adapters' random init (default `lte_config.seed`; the global RNG is left as it was).
        """
        from . import adapters

        if self.has_adapters:
            raise LTEError("this model already has adapters; merge them first (merge_adapters()) to add new ones")
        if config is None:
            config = adapters.lora_config(**lora)
        elif lora:
            raise LTEError(f"pass either a peft config or LoRA settings, not both (got {sorted(lora)})")
        model_type = self.base_model.config.model_type
        resolved = adapters.plan(self.base_model, self._layers[0].spec, model_type, config)
        router_grad = [p.requires_grad for p in self.router_parameters()]
        device = self._layers[0].router.weight.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.lte_config.seed if seed is None else seed)
            adapters.inject(self.base_model, resolved)  # peft freezes every non-adapter parameter
        for p, grad in zip(self.router_parameters(), router_grad):
            p.requires_grad_(grad)
        for layer in self._layers:
            if layer.router.weight.dtype in (torch.float16, torch.bfloat16):
                layer.router.float()
        self._adapter_config = resolved
        return self

    def adapter_parameters(self) -> list[nn.Parameter]:
        from . import adapters

        return [p for _, p in adapters.adapter_parameters(self.base_model)] if self.has_adapters else []

    def merge_adapters(self) -> LTEModel:
        """Add the adapters' updates to the (permuted) base weights and remove the adapters, in place.

        Afterwards the model is a plain LTE model whose base differs from the one it was loaded from:
        save it in full (`save_pretrained(dir, light=False)`). No-op without adapters.
        """
        if not self.has_adapters:
            return self
        from . import adapters

        adapters.merge(self.base_model)
        self._adapter_config = None
        self._base_changed = True
        return self

    # ---------------------------------------------------------------- forward
    def _token_mask(self, attention_mask: Any, tokens: int) -> torch.Tensor | None:
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.numel() == tokens:
            return attention_mask.reshape(-1) != 0
        return None

    def _scores(self, name: str = "loss_scores") -> list[torch.Tensor] | torch.Tensor:
        """Every layer's router scores of the last forward as [T, E]: stacked [L, T, E] when the layers
        share one shape (one tensor op then serves all layers), else a list."""
        scores = [getattr(layer.input, name) for layer in self._layers]
        if any(s is None for s in scores):
            raise LTEError("no router scores: run a forward in soft, hard or topk routing first")
        flat = [s.reshape(-1, s.shape[-1]) for s in scores]  # [T, E]
        if all(f.shape == flat[0].shape and f.dtype == flat[0].dtype for f in flat):
            return torch.stack(flat)
        return flat

    def lte_loss(self, attention_mask: torch.Tensor | None = None,
                 scores: list[torch.Tensor] | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_eff, L_sep) of the last forward, over real tokens (differentiable)."""
        scores = self._scores() if scores is None else scores
        token_mask = self._token_mask(attention_mask, scores[0].shape[0])
        return lte_losses(scores, token_mask, self.lte_config.tau, self.lte_config.eps)

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
        scores = None
        if self.routing in TRAINING_MODES:
            scores = self._scores()
            eff, sep = self.lte_loss(attention_mask, scores)
            self.last_lte_losses.update(eff=eff.detach(), sep=sep.detach())
            if task is not None:
                total = task + self.lte_config.eta * eff + self.lte_config.lam * sep
                self.last_lte_losses["total"] = total.detach()
                out.loss = total
        if self.track_stats:
            self._record_stats(attention_mask, scores)
        return out

    @torch.no_grad()
    def forward_layers(self, **inputs: Any) -> None:
        """A no-grad forward for calibration passes that read the layers through hooks: it stops once
        every LTE layer has run (the final norm and the head never run, nothing is returned) and
        records statistics as `forward` does."""
        forward_until(self.base_model, [layer.output for layer in self._layers], inputs)
        if self.routing != "dense" and self.track_stats:
            self._record_stats(inputs.get("attention_mask"))

    # ---------------------------------------------------------------- statistics
    def reset_lte_stats(self) -> None:
        """Start accumulating statistics afresh (see `lte_stats(accumulated=True)`)."""
        # Created on the device of the first recorded forward: no host-to-device copy inside a step.
        self._acc_active: torch.Tensor | None = None  # [L] float64: active neurons summed over real tokens
        self._acc_tokens: torch.Tensor | None = None  # float64: real tokens

    @contextlib.contextmanager
    def separate_lte_stats(self) -> Iterator[None]:
        """Inside the block statistics accumulate afresh; those from before it are back afterwards, so a
        calibration pass in the middle of a training step leaves the step's numbers as they were."""
        saved = (self._acc_active, self._acc_tokens, self._last_masks, self._last_token_mask)
        self.reset_lte_stats()
        try:
            yield
        finally:
            self._acc_active, self._acc_tokens, self._last_masks, self._last_token_mask = saved

    def _masks(self, scores: torch.Tensor | list[torch.Tensor] | None) -> torch.Tensor | list[torch.Tensor]:
        """The computed-expert masks of the last forward: [L, T, E] (one op) when the layers share one
        shape and one tau, else a list of [T, E]. `scores`: the stacked scores a training forward made."""
        taus = {layer.input.tau for layer in self._layers}
        budgeted = any(layer.input.budget for layer in self._layers)  # gates are then not 1[G > tau] alone
        if self.routing != "topk" and len(taus) == 1 and not budgeted:
            stacked = scores if isinstance(scores, torch.Tensor) else self._scores("scores")
            if isinstance(stacked, torch.Tensor):  # hard / ste gates are exactly 1[G > tau]
                return stacked.detach() > taus.pop()
        masks = []
        for layer in self._layers:
            s, g = layer.input.scores, layer.input.gate
            m = (s > layer.input.tau) if self.routing == "soft" else (g != 0)
            masks.append(m.reshape(-1, m.shape[-1]))  # [T, E]
        return masks

    def _cached(self, name: str, device: torch.device, make: Any) -> torch.Tensor:
        """A constant tensor built once per device by `make()` (no copy to the device inside a step)."""
        cache = self.__dict__.setdefault("_constants", {})
        key = (name, device)
        if key not in cache:
            cache[key] = make().to(device)
        return cache[key]

    def _expert_sizes(self, device: torch.device) -> torch.Tensor:
        """Neurons per expert of every layer, [L, E] float32 (layers of one width)."""
        return self._cached("sizes", device, lambda: torch.stack([lay.input.expert_sizes.float().cpu()
                                                                  for lay in self._layers]))

    @torch.no_grad()
    def _record_stats(self, attention_mask: Any, scores: torch.Tensor | list[torch.Tensor] | None = None) -> None:
        masks = self._masks(scores)
        device = masks[0].device
        token_mask = self._token_mask(attention_mask, masks[0].shape[0])
        self._last_masks, self._last_token_mask = list(masks), token_mask
        w = None if token_mask is None else token_mask.to(torch.float32)
        if isinstance(masks, torch.Tensor):  # all layers at once: [L, T, E] @ [L, E, 1] -> [L, T]
            active = torch.bmm(masks.to(torch.float32), self._expert_sizes(device).unsqueeze(-1)).squeeze(-1)
            total = active.sum(-1) if w is None else (active * w).sum(-1)  # [L]
        else:
            total = torch.stack([(a.sum() if w is None else (a * w).sum())
                                 for a in (active_neurons(m, layer.input.expert_sizes)
                                           for layer, m in zip(self._layers, masks))])
        n_tok = torch.full((), float(masks[0].shape[0]), dtype=torch.float64, device=device) if w is None else \
            w.sum().double()
        if self._acc_active is None:
            self._acc_active = torch.zeros(len(self._layers), dtype=torch.float64, device=device)
            self._acc_tokens = torch.zeros((), dtype=torch.float64, device=device)
        self._acc_active = self._acc_active.to(device) + total.double()
        self._acc_tokens = self._acc_tokens.to(device) + n_tok

    def _num_layers(self) -> int:
        return len(self._layers)

    def accumulated_sparsity(self) -> torch.Tensor:
        """FFN sparsity per layer over the forwards since `reset_lte_stats()`, [L] float64 on the model's
        device: no host sync (a trainer reads it only when it needs the numbers)."""
        if self._acc_active is None:
            raise LTEError("no statistics accumulated: run forwards after reset_lte_stats()")
        widths = self._cached("widths", self._acc_active.device, lambda: torch.tensor(
            [float(layer.input.ffn_width) for layer in self._layers], dtype=torch.float64))
        return 1.0 - self._acc_active / (self._acc_tokens * widths)

    def accumulated_statistics(self) -> torch.Tensor:
        """[L per-layer FFN sparsity, GFLOPs/token, real tokens] over the forwards since `reset_lte_stats()`,
        float64 on the model's device, without a host read (`lte_stats(accumulated=True)` reads them)."""
        per_layer = self.accumulated_sparsity()
        device = per_layer.device
        ffn = self._cached("ffn_flops", device, lambda: torch.tensor(
            [float(self._ffn_flops(i)) for i in range(len(self._layers))], dtype=torch.float64))
        selector = float(sum(self._selector_flops(i) for i in range(len(self._layers))))
        gflops = (float(self._dense_flops) + selector - (ffn * per_layer).sum()) / 1e9
        return torch.cat([per_layer, gflops.reshape(1), self._acc_tokens.reshape(1)])

    def _accumulated_per_layer(self) -> list[float]:
        if self._acc_active is None:
            raise LTEError("no statistics accumulated: run forwards after reset_lte_stats()")
        values = torch.cat([self._acc_tokens.reshape(1), self._acc_active]).tolist()  # one host sync
        tokens = values[0]
        if tokens == 0:
            raise LTEError("no statistics accumulated: run forwards after reset_lte_stats()")
        return [1.0 - a / (tokens * layer.input.ffn_width) for a, layer in zip(values[1:], self._layers)]

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
        if not accumulated:
            return {}
        return {"tokens": 0.0 if self._acc_tokens is None else float(self._acc_tokens)}

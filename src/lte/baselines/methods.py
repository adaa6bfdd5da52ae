"""The baselines: how each one is built, calibrated or trained on a plain HF model.

    model = apply_baseline(hf_model, "teal", target_sparsity=0.5, calib_data=batches)
    model(**batch); model.lte_stats()

| method | rule | needs |
|---|---|---|
| teal | |x| thresholds on the inputs of gate/up (W1) and down, one pair per layer | calib_data |
| cats | |act(gate)| threshold per layer; neurons under it skip up and down | calib_data |
| moefication | k-means experts (as LTE), a trained MLP router, top-k experts | calib_data |
| moefication-oracle | k-means experts, top-k by true expert mass sum |h| | nothing |
| sketch | k-means experts, top-k by expert energy from 4-bit copies of gate/up (`sketch.py`) | nothing |
| sketch-ft | sketch, then fine-tuning the model with its masks on | train_data |
| dejavu | a low-rank predictor per layer, top-k neurons | calib_data |
| dejavu-ft | dejavu, then fine-tuning the model with its masks on | calib_data, train_data |
| random-topk | LTE conversion with frozen random routers, top-k experts, fine-tuning | train_data (optional) |
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LTEError
from .calibration import calibrate_thresholds, record_activations
from .model import (
    BaselineModel,
    _check_target,
    attach_sketches,
    group_ffn,
    make_predictor,
    spec_of,
    wrap_ffns,
)

logger = logging.getLogger(__name__)

METHODS = ("teal", "cats", "moefication", "moefication-oracle", "sketch", "sketch-ft", "dejavu", "dejavu-ft",
           "random-topk")
#: Methods that are another method, then fine-tuned with its masks on (built as the first, trained by the caller).
FINETUNED = {"dejavu-ft": "dejavu", "sketch-ft": "sketch"}
#: Methods that pick single neurons (thresholds, Deja Vu's per-neuron top-k): experts and their grouping do not apply.
NEURON_METHODS = ("teal", "cats", "dejavu", "dejavu-ft")
_ALIASES = {"moefication-mlp": "moefication", "deja-vu": "dejavu", "dejavu+ft": "dejavu-ft",
            "random": "random-topk", "random-routers": "random-topk"}


def canonical_method(method: str) -> str:
    key = str(method).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in METHODS:
        raise LTEError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    return key


# --------------------------------------------------------------------------- calibration data
def as_batches(data: Any, batch_size: int = 8, max_tokens: int | None = None, pad_token_id: int = 0) -> list[dict]:
    """Calibration data as a list of batches {input_ids, attention_mask, ...}.

    `data`: a list/iterable of batch dicts, a torch Dataset of examples (dicts, padded here), a
    DataLoader, or an input_ids tensor [B, L]. `max_tokens` stops once that many real tokens are in.
    """
    if data is None:
        raise LTEError("this baseline needs calibration data: pass calib_data (batches, a Dataset or input_ids)")
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise LTEError(f"calibration input_ids must be [batch, length], got {tuple(data.shape)}")
        data = [{"input_ids": data, "attention_mask": torch.ones_like(data)}]
    elif isinstance(data, dict):
        data = [data]
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and len(data) and not _is_batch(data[0]):
        from ..data import pad_collate

        collate = pad_collate(pad_token_id=getattr(data, "pad_token_id", None) or pad_token_id)
        dataset = data
        data = (collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
                for i in range(0, len(dataset), batch_size))
    batches, tokens = [], 0
    for batch in data:
        if not _is_batch(batch):
            raise LTEError(f"calibration batches must be dicts with input_ids [B, L]; got {type(batch).__name__}")
        batch = {k: v for k, v in batch.items() if k != "labels"}
        batches.append(batch)
        mask = batch.get("attention_mask")
        tokens += int(mask.sum()) if isinstance(mask, torch.Tensor) else batch["input_ids"].numel()
        if max_tokens is not None and tokens >= max_tokens:
            break
    if not batches:
        raise LTEError("the calibration data is empty")
    return batches


def _is_batch(item: Any) -> bool:
    return isinstance(item, dict) and isinstance(item.get("input_ids"), torch.Tensor) and item["input_ids"].dim() == 2


# --------------------------------------------------------------------------- predictors (Deja Vu, MoEfication)
def topk_labels(magnitude: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """1 for the `keep_fraction` largest entries of each row [N, U] (ties broken by position)."""
    u = magnitude.shape[-1]
    k = max(1, min(u, int(round(keep_fraction * u))))
    labels = torch.zeros_like(magnitude)
    labels.scatter_(-1, magnitude.topk(k, dim=-1).indices, 1.0)
    return labels


def train_predictor(predictor: nn.Module, x: torch.Tensor, target: torch.Tensor, loss: str, steps: int = 300,
                    lr: float = 1e-3, batch_size: int = 1024, seed: int = 0) -> list[float]:
    """Fit a predictor on (x, target) rows with Adam; returns the loss of every step.

    loss "bce": target is 0/1 per unit (Deja Vu: is the neuron among the largest |h|);
    "soft-ce": target is a non-negative mass per unit, matched as a distribution (MoEfication).
    """
    if x.shape[0] == 0:
        raise LTEError("no training rows for the predictor: the calibration data gave no real tokens")
    device = next(predictor.parameters()).device
    x, target = x.to(device), target.to(device)
    if loss == "soft-ce":
        target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    opt = torch.optim.Adam(predictor.parameters(), lr=lr)
    history = []
    predictor.train()
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(x.shape[0], (min(batch_size, x.shape[0]),), generator=gen).to(device)
            logits = predictor(x[idx]).float()
            if loss == "bce":
                value = F.binary_cross_entropy_with_logits(logits, target[idx])
            elif loss == "soft-ce":
                value = -(target[idx] * F.log_softmax(logits, dim=-1)).sum(-1).mean()
            else:
                raise LTEError(f"unknown predictor loss {loss!r}")
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            history.append(float(value.detach()))
    predictor.eval()
    return history


def _fit_predictors(model: BaselineModel, batches: list[dict], kind: str, size: int, loss: str,
                    keep_fraction: float | None, steps: int, lr: float, seed: int) -> list[list[float]]:
    data = record_activations(model, batches)
    histories = []
    for i, (s, (x, y)) in enumerate(zip(model.sparsifiers(), data)):
        torch.manual_seed(seed + i)
        s.predictor = make_predictor(kind, s.hidden, s.width, s.num_units, size).to(x.device)
        target = topk_labels(y, keep_fraction) if loss == "bce" else y
        histories.append(train_predictor(s.predictor, x, target, loss, steps, lr, seed=seed + i))
    return histories


# --------------------------------------------------------------------------- the methods
def build_teal(hf_model: nn.Module, target_sparsity: float, calib_data: Any, calib_tokens: int = 16384,
               batch_size: int = 8, sequential: bool = True, ffn_spec: dict | None = None, **_: Any) -> BaselineModel:
    """TEAL-style: training-free magnitude thresholds on the inputs of the FFN's linear layers."""
    layers, ctx = wrap_ffns(hf_model, "input-threshold", spec_of(hf_model, ffn_spec))
    model = BaselineModel(hf_model, layers, ctx, "teal", {"calib_tokens": calib_tokens, "sequential": sequential})
    batches = as_batches(calib_data, batch_size, calib_tokens)
    calibrate_thresholds(model, batches, target_sparsity, sequential)
    model._calib = batches
    return model


def build_cats(hf_model: nn.Module, target_sparsity: float, calib_data: Any, calib_tokens: int = 16384,
               batch_size: int = 8, sequential: bool = True, ffn_spec: dict | None = None, **_: Any) -> BaselineModel:
    """CATS-style: a training-free threshold on |act(gate output)| per layer."""
    spec = spec_of(hf_model, ffn_spec)
    layers, ctx = wrap_ffns(hf_model, "gate-threshold", spec)
    for layer in layers:  # fail early on an activation we cannot evaluate
        from .wrappers import activation_fn

        activation_fn(layer.sparsifier.activation)
    model = BaselineModel(hf_model, layers, ctx, "cats", {"calib_tokens": calib_tokens, "sequential": sequential})
    batches = as_batches(calib_data, batch_size, calib_tokens)
    calibrate_thresholds(model, batches, target_sparsity, sequential)
    model._calib = batches
    return model


def build_moefication(hf_model: nn.Module, target_sparsity: float, calib_data: Any = None, oracle: bool = False,
                      expert_size: int = 32, grouping: str = "kmeans", grouping_iters: int = 15,
                      router_hidden: int | None = None, router_steps: int = 300, router_lr: float = 1e-3,
                      calib_tokens: int = 16384, batch_size: int = 8, seed: int = 0,
                      ffn_spec: dict | None = None, **_: Any) -> BaselineModel:
    """MoEfication: LTE's expert grouping, top-k experts by a trained MLP router or by the oracle."""
    spec = spec_of(hf_model, ffn_spec)
    from ..conversion.locate import find_ffns

    ffns = find_ffns(hf_model, spec)
    profiles = [None] * len(ffns)
    if grouping == "activation":  # the same activation-profile experts as LTE's grouping "activation"
        from ..conversion.activations import activation_profiles

        profiles = activation_profiles(hf_model, ffns, as_batches(calib_data, batch_size, calib_tokens), seed=seed)
    sizes = [group_ffn(ffn, expert_size, grouping, seed + i, grouping_iters, profiles[i])
             for i, ffn in enumerate(ffns)]
    rule = "oracle-topk" if oracle else "predictor-topk"
    layers, ctx = wrap_ffns(hf_model, rule, spec, unit_sizes=sizes)
    name = "moefication-oracle" if oracle else "moefication"
    options: dict[str, Any] = {"expert_size": expert_size, "grouping": grouping, "seed": seed}
    model = BaselineModel(hf_model, layers, ctx, name, options)
    if not oracle:
        hidden = router_hidden or 2 * len(sizes[0])
        batches = as_batches(calib_data, batch_size, calib_tokens)
        model.train_losses = _fit_predictors(model, batches, "mlp", hidden, "soft-ce", None, router_steps,
                                             router_lr, seed)
        options.update(predictor={"kind": "mlp", "size": hidden}, router_steps=router_steps)
        model.options = options
    model.set_topk(target_sparsity)
    model.set_state("on")
    return model


def build_sketch(hf_model: nn.Module, target_sparsity: float, expert_size: int = 32, grouping: str = "kmeans",
                 grouping_iters: int = 15, bits: int = 4, group: int = 64, seed: int = 0,
                 ffn_spec: dict | None = None, **_: Any) -> BaselineModel:
    """LTE's expert grouping, top-k experts by the energy a `bits`-bit copy of the FFN predicts.

    Learns nothing and needs no data (k-means grouping works on the weights): what it knows of a
    token comes from the model's own weights, so it does not depend on the domain of any text.
    """
    spec = spec_of(hf_model, ffn_spec)
    from ..conversion.locate import find_ffns

    sizes = [group_ffn(ffn, expert_size, grouping, seed + i, grouping_iters)
             for i, ffn in enumerate(find_ffns(hf_model, spec))]
    layers, ctx = wrap_ffns(hf_model, "predictor-topk", spec, unit_sizes=sizes)
    options = {"expert_size": expert_size, "grouping": grouping, "seed": seed,
               "predictor": {"kind": "sketch", "size": bits, "group": group}}
    model = BaselineModel(hf_model, layers, ctx, "sketch", options)
    attach_sketches(model, bits, group)
    model.set_topk(target_sparsity)
    model.set_state("on")
    return model


def build_dejavu(hf_model: nn.Module, target_sparsity: float, calib_data: Any, rank: int | None = None,
                 label_sparsity: float | None = None, predictor_steps: int = 300, predictor_lr: float = 1e-3,
                 calib_tokens: int = 16384, batch_size: int = 8, seed: int = 0, ffn_spec: dict | None = None,
                 **_: Any) -> BaselineModel:
    """Deja Vu: a low-rank predictor per layer (D -> r -> F) and top-k neurons; model unchanged.

    The predictor learns which neurons are among the `1 - label_sparsity` largest |h| of a token
    (default label_sparsity: the target), from the dense model's own activations.
    """
    spec = spec_of(hf_model, ffn_spec)
    layers, ctx = wrap_ffns(hf_model, "predictor-topk", spec)
    model = BaselineModel(hf_model, layers, ctx, "dejavu", {})
    s0 = layers[0].sparsifier
    r = rank or max(16, s0.hidden // 8)
    label = target_sparsity if label_sparsity is None else label_sparsity
    batches = as_batches(calib_data, batch_size, calib_tokens)
    model.train_losses = _fit_predictors(model, batches, "lowrank", r, "bce", 1.0 - label, predictor_steps,
                                         predictor_lr, seed)
    model.options = {"predictor": {"kind": "lowrank", "size": r}, "label_sparsity": label,
                     "predictor_steps": predictor_steps, "seed": seed}
    model.set_topk(target_sparsity)
    model.set_state("on")
    return model


def build_random_topk(hf_model: nn.Module, target_sparsity: float, expert_size: int = 32, grouping: str = "kmeans",
                      seed: int = 0, grouping_iters: int = 15, calib_data: Any = None, calib_tokens: int = 16384,
                      batch_size: int = 8, **_: Any):
    """The paper's stage-1 ablation: LTE conversion, frozen random routers, top-k experts (an LTEModel)."""
    from ..config import LTEConfig
    from ..model import get_lte_model

    _check_target(target_sparsity)
    cfg = LTEConfig(expert_size=expert_size, grouping=grouping, seed=seed, grouping_iters=grouping_iters)
    calibration = as_batches(calib_data, batch_size, calib_tokens) if grouping == "activation" else None
    lmodel = get_lte_model(hf_model, cfg, progress=False, calibration=calibration)
    experts = lmodel.lte_layers()[0].router.out_features
    k = int(round((1.0 - target_sparsity) * experts))
    lmodel.lte_config.topk = k
    lmodel.freeze_routers(True)
    lmodel.set_routing("topk", k=k)
    lmodel.stage = "random-topk"
    return lmodel


# --------------------------------------------------------------------------- entry point
_BUILDERS = {
    "teal": build_teal,
    "cats": build_cats,
    "moefication": build_moefication,
    "moefication-oracle": lambda m, t, **o: build_moefication(m, t, oracle=True, **o),
    "sketch": build_sketch,
    "dejavu": build_dejavu,
    "random-topk": build_random_topk,
}


def apply_baseline(hf_model: nn.Module, method: str, target_sparsity: float = 0.5, calib_data: Any = None,
                   **options: Any):
    """Turn a plain HF model into a baseline model (in place) at a target sparsity.

    Args:
        hf_model: a plain Hugging Face model of a supported family (not an LTEModel).
        method: one of METHODS (teal, cats, moefication, moefication-oracle, dejavu, random-topk).
            The methods that train the model are fine-tuned by the caller with
            `lte.training.finetune` (as the study does): "random-topk" returns the conversion with
            frozen random routers, to fine-tune; "dejavu-ft" is "dejavu", then fine-tuned.
        target_sparsity: top-k methods keep round((1-t) * units) experts/neurons per token;
            threshold methods zero the fraction t of the activations they threshold (calibrated).
        calib_data: batches, a Dataset or input_ids for calibration / predictor training.
        options: method settings (expert_size, rank, router_hidden, calib_tokens, sequential, seed, ...).

    Returns a `BaselineModel` (random-topk: an `lte.LTEModel` in topk routing), in eval mode.
    """
    key = canonical_method(method)
    _check_target(target_sparsity)
    if key in FINETUNED:
        raise LTEError(f"{key} is {FINETUNED[key]}, then fine-tuning: apply_baseline(model, '{FINETUNED[key]}', ...), "
                       "then lte.training.finetune(model, train_data, tokenizer, out_dir, ...)")
    model = _BUILDERS[key](hf_model, target_sparsity, calib_data=calib_data, **options)
    model.eval()
    return model


def set_sparsity(model: Any, target: float, calib_data: Any = None) -> None:
    """Move a built baseline to another target (top-k: new k; thresholds: recalibrated)."""
    _check_target(target)
    if isinstance(model, BaselineModel):
        if model.sparsifiers()[0].rule.endswith("topk"):
            model.set_topk(target)
            model.set_state("on")
        else:
            batches = as_batches(calib_data) if calib_data is not None else getattr(model, "_calib", None)
            if batches is None:
                raise LTEError("recalibrating thresholds needs calib_data")
            calibrate_thresholds(model, batches, target, model.options.get("sequential", True))
        return
    if hasattr(model, "set_routing") and getattr(model, "routing", None) == "topk":
        e = model.lte_layers()[0].router.out_features
        model.set_routing("topk", k=int(round((1.0 - target) * e)))
        return
    raise LTEError(f"cannot change the sparsity of a {type(model).__name__}")


def expected_topk_sparsity(target: float, units: int) -> float:
    """The unit sparsity top-k reaches for a target: 1 - round((1-t) * units) / units."""
    return 1.0 - int(round((1.0 - target) * units)) / units


__all__ = ["FINETUNED", "METHODS", "apply_baseline", "as_batches", "calibrate_thresholds", "canonical_method",
           "expected_topk_sparsity", "record_activations", "set_sparsity", "topk_labels",
           "train_predictor"]

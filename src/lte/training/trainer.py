"""`LTETrainer`: the HF `Trainer` for LTE models (and plain HF models for the dense stage).

What it adds to `transformers.Trainer`:
- the loss is the model's own (`LTEModel` adds eta*L_eff + lam*L_sep in soft routing);
- logs task loss, L_eff, L_sep, eta, FFN sparsity (overall and per layer) and GFLOPs/token to the
  Trainer's loggers (TensorBoard when installed) and to `<output_dir>/train_log.jsonl`;
- feeds the measured sparsity of every step to an `EtaController` callback (`--target-sparsity`);
- checkpoints (`checkpoint-N/` and the final directory) are `LTEModel.save_pretrained` saves
  (baseline models: theirs), loadable with `lte.load_model`, and `train(resume_from_checkpoint=...)`
  reads them;
- a non-finite loss or gradient stops training before it touches the weights (`NaNGuard`);
- under FSDP (`configs/accelerate/fsdp.yaml`) the saves gather the full state dict and rank 0 writes
  the same LTE save, resume broadcasts a checkpoint into the shards, and every process checks at
  the start that it built the same LTE model (FSDP, unlike DDP, does not copy rank 0's weights);
  the sparsity statistics are token-weighted over processes, so every rank drives eta alike.
Everything else (optimizer, schedule, mixed precision, accumulation, DDP and FSDP through accelerate,
progress bars, optimizer/scheduler/RNG state in checkpoints) is the stock Trainer.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from lte.errors import LTEError
from lte.model import LTEModel
from lte.routing.layers import TRAINING_MODES
from lte.sparse_model import SparseFFNModel
from lte.training import sharding
from lte.training.callbacks import EtaController, JsonlLogger, NaNGuard

logger = logging.getLogger(__name__)

__all__ = ["LTETrainer"]


class _Window:
    """Running sums of the LTE quantities between two log records (device tensors, no syncs)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: dict[str, torch.Tensor] = {}  # name -> sum over micro-batches
        self.n_losses = 0
        self.stats: torch.Tensor | None = None  # [L per-layer sparsity, GFLOPs] summed over measured steps
        self.n_stats = 0

    def add_losses(self, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            self.losses[key] = self.losses.get(key, 0.0) + value.detach().float()
        self.n_losses += 1

    def add_stats(self, stats: torch.Tensor) -> None:
        self.stats = stats if self.stats is None else self.stats + stats
        self.n_stats += 1


class _StepHook(TrainerCallback):
    """Internal: measures each optimizer step's sparsity and drives the eta controller."""

    def __init__(self, trainer: LTETrainer) -> None:
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._begin_step()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._end_step(state.global_step)


class LTETrainer(Trainer):
    """HF `Trainer` for `LTEModel`s (any routing) and plain HF models (dense stage).

    Extra keyword arguments:
        router_lr: learning rate of the routers (default: the model's learning rate).
        jsonl_log: file name of the JSONL log in `output_dir` (None: no JSONL log).
        nan_guard: add a `NaNGuard` callback when none is given (default True).
        teacher, distill, distill_temperature: distillation from a frozen teacher (the dense model):
            the task loss becomes (1 - distill) * task + distill * T^2 KL(teacher || model)
            (`lte.training.distill`); the LTE terms are added unchanged.
        distill_hidden: weight of matching every layer's hidden states to the teacher's (relative
            squared error, `lte.training.distill.hidden_state_loss`), added to the loss (0 = off).
    """

    def __init__(self, *args: Any, router_lr: float | None = None, jsonl_log: str | None = "train_log.jsonl",
                 nan_guard: bool = True, teacher: torch.nn.Module | None = None, distill: float = 0.0,
                 distill_temperature: float = 1.0, distill_hidden: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.router_lr = router_lr
        if not 0.0 <= distill <= 1.0:
            raise ValueError(f"distill is the weight of the distillation loss and must lie in [0, 1], got {distill}")
        if not distill_hidden >= 0.0:
            raise ValueError(f"distill_hidden is the weight of the hidden-state loss and must be >= 0, got {distill_hidden}")
        if (distill > 0 or distill_hidden > 0) and teacher is None:
            raise ValueError("distill / distill_hidden > 0 need a teacher model (the dense model the stage starts from)")
        self.distill = float(distill)
        self.distill_temperature = float(distill_temperature)
        self.distill_hidden = float(distill_hidden)
        # The teacher runs under no_grad in eval mode; its parameters are left as they are (it may be shared).
        uses_teacher = teacher is not None and (distill > 0 or distill_hidden > 0)
        self.teacher = teacher.eval() if uses_teacher else None
        self._window = _Window()
        self._last_stats: torch.Tensor | None = None  # [L per-layer sparsity, GFLOPs] of the last step
        if jsonl_log and not self._find(JsonlLogger):
            self.add_callback(JsonlLogger(jsonl_log))
        if nan_guard and not self._find(NaNGuard):
            self.add_callback(NaNGuard())
        self.add_callback(_StepHook(self))
        self._check_sharding_setup()

    # ------------------------------------------------------------------ helpers
    @property
    def lte_model(self) -> LTEModel | None:
        """The `LTEModel` being trained (inside its FSDP1 wrapper, if any), or None for a plain HF model."""
        model = self.model
        if not isinstance(model, LTEModel) and hasattr(self, "accelerator"):
            model = self.accelerator.unwrap_model(model)
        return model if isinstance(model, LTEModel) else None

    def _find(self, cls: type) -> Any:
        """The callback instance of type `cls` (looked up each time: resume may replace it)."""
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, cls):
                return cb
        return None

    @property
    def eta_controller(self) -> EtaController | None:
        return self._find(EtaController)

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of a small tensor over processes (identity when not distributed); the same on every rank."""
        if self._distributed():
            values = values.to(self.args.device)
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def _all_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of a small tensor over processes (identity when not distributed)."""
        return self._all_sum(values) / (dist.get_world_size() if self._distributed() else 1)

    # ------------------------------------------------------------------ sharded training (FSDP)
    def _check_sharding_setup(self) -> None:
        """Refuse FSDP settings that break an LTE model; check every process built the same one."""
        fsdp_requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if fsdp_requested and not self.is_fsdp_enabled:
            logger.warning("accelerate was launched with FSDP, but this run is not sharded: accelerate applies FSDP "
                           "only on GPUs (on CPU it trains with DDP, every process holding the whole model)")
        if self.lte_model is None:
            return
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        if plugin is not None and plugin.cpu_ram_efficient_loading:
            raise LTEError("fsdp_cpu_ram_efficient_loading must be false for LTE training: the LTE model is built "
                           "(grouped, routers added) on every process, and its permutation buffers cannot be "
                           "broadcast by that loader. Set `fsdp_cpu_ram_efficient_loading: false` in the accelerate "
                           "config (configs/accelerate/fsdp.yaml does).")
        if plugin is not None and plugin.fsdp_version == 1 and not plugin.use_orig_params:
            raise LTEError("FSDP1 needs `fsdp_use_orig_params: true` for LTE training (the routers are their own "
                           "parameters); or use FSDP2 (`fsdp_version: 2`, configs/accelerate/fsdp.yaml)")
        if self._distributed():
            self._check_same_lte_model()

    def _check_same_lte_model(self) -> None:
        """Every process must hold the same permutations and routers before training.

        DDP copies rank 0's weights to the others when it wraps the model; FSDP shards each process's own
        copy, so a grouping that came out differently on one process would silently mix two models.
        """
        parts = []
        for layer in self.lte_model.lte_layers():
            perm = layer.input.perm.detach().double().cpu()
            router = layer.router.weight.detach().double().cpu().reshape(-1)
            parts += [(perm * torch.arange(1, perm.numel() + 1, dtype=torch.float64)).sum(),  # order-sensitive
                      layer.input.expert_sizes.detach().double().cpu().sum(), router.sum(), router.abs().sum()]
        if not sharding.ranks_agree(torch.stack(parts).to(self.args.device)):
            raise LTEError("the processes built different LTE models (neuron grouping or router init differ), "
                           "so they cannot train one model together. Convert the model once, in one process "
                           "(`lte.get_lte_model` + `save_pretrained`), and start stage 1 on every process from "
                           "that folder.")

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        """AdamW as the Trainer builds it; with `router_lr`, the routers get their own group."""
        lte_model = self.lte_model
        if self.optimizer is not None or self.router_lr is None or lte_model is None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        router_ids = {id(p) for p in lte_model.router_parameters()}
        params = [p for p in lte_model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if id(p) not in router_ids], "weight_decay": self.args.weight_decay},
            {"params": [p for p in params if id(p) in router_ids], "weight_decay": 0.0, "lr": self.router_lr},
        ]
        groups = [g for g in groups if g["params"]]
        optim_cls, optim_kwargs = self.get_optimizer_cls_and_kwargs(self.args, lte_model)
        self.optimizer = optim_cls(groups, **optim_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's own loss; checks it is finite (all processes agree) and records LTE terms."""
        if self.teacher is not None and self.distill_hidden > 0 and model.training:
            inputs = {**inputs, "output_hidden_states": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            lte_model = self.lte_model
            if lte_model is not None and lte_model.last_lte_losses:
                terms = {k: v for k, v in lte_model.last_lte_losses.items() if k != "total"}
            else:
                terms = {"task": loss.detach()}
            if self.teacher is not None:
                loss, kd, hidden = self._mix_distillation(model, inputs, loss, outputs)
                if self.distill > 0:
                    terms["distill"] = kd.detach()
                if hidden is not None:
                    terms["distill_hidden"] = hidden.detach()
            self._check_finite(loss)
            self._window.add_losses(terms)
        return (loss, outputs) if return_outputs else loss

    def _mix_distillation(self, model, inputs, loss, outputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """loss + distill * (KD - task) + distill_hidden * H: the task term becomes (1 - distill) * task +
        distill * KD, plus the hidden-state term H when `distill_hidden` > 0. Returns (loss, KD, H or None)."""
        from lte.training.distill import distillation_loss, hidden_state_loss

        teacher = self.teacher
        device = outputs.logits.device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        with torch.no_grad():
            t_out = teacher(**{k: v for k, v in inputs.items() if k != "labels"})
        mask = inputs.get("attention_mask") if outputs.logits.dim() == 3 else None
        kd = distillation_loss(outputs.logits, t_out.logits, mask, self.distill_temperature) if self.distill > 0 \
            else outputs.logits.new_zeros(())
        if self.distill > 0:
            unwrapped = self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model
            task = getattr(unwrapped, "last_task_loss", None)
            task = loss if task is None else task
            loss = loss + self.distill * (kd - task)
        hidden = None
        if self.distill_hidden > 0:
            hidden = hidden_state_loss(getattr(outputs, "hidden_states", None), getattr(t_out, "hidden_states", None),
                                       inputs.get("attention_mask"))
            loss = loss + self.distill_hidden * hidden
        return loss, kd, hidden

    def _check_finite(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all().float().reshape(1)
        if self._distributed():  # every process must stop together, or the others hang in backward
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            guard = self._find(NaNGuard) or NaNGuard()
            raise guard.error(self.state.global_step + 1, "training loss", float(loss.detach().float().mean()))

    # ------------------------------------------------------------------ per-step statistics
    def _stats_active(self) -> bool:
        lte_model = self.lte_model
        return lte_model is not None and lte_model.routing != "dense"

    def _begin_step(self) -> None:
        if self._stats_active():
            self.lte_model.reset_lte_stats()

    def _end_step(self, step: int) -> None:
        """After optimizer step `step`: read the step's sparsity, update eta, keep it for the log.

        The statistics are token-weighted over processes (every rank gets the same sums), so the
        eta controller sees the same measurement, and keeps the same state, on every rank. The numbers
        stay on the device (no host read) unless the eta controller measures this step: then one read.
        """
        if not self._stats_active():
            return
        stats = self._global_step_stats_on_device()  # [L per-layer sparsity, GFLOPs]
        self._last_stats = stats
        self._window.add_stats(stats)
        controller = self.eta_controller
        if controller is not None and self.lte_model.routing in TRAINING_MODES and controller.wants_measurement(step):
            per_layer = stats[:-1].tolist()
            self.lte_model.lte_config.eta = controller.update(step, sum(per_layer) / len(per_layer))
            if controller.tau_gain and controller.tau != self.lte_model.lte_config.tau:
                self.lte_model.set_routing(self.lte_model.routing, tau=controller.tau)

    def _global_step_stats(self) -> tuple[list[float], float]:
        """(per-layer FFN sparsity, GFLOPs/token) of the forwards since the last reset, over every process's
        real tokens (each process's figures weighted by its token count); the same values on every rank."""
        values = self._global_step_stats_on_device().tolist()
        return values[:-1], values[-1]

    def _global_step_stats_on_device(self) -> torch.Tensor:
        """`_global_step_stats` as one tensor [L per-layer sparsity, GFLOPs/token] on the device (no host read)."""
        stats = self.lte_model.accumulated_statistics()  # [L, GFLOPs, tokens]
        tokens = stats[-1]
        local = torch.cat([stats[:-1], torch.ones_like(tokens).reshape(1)]) * tokens
        summed = self._all_sum(local)  # [L per-layer sparsity, GFLOPs, 1] x tokens
        return summed[:-1] / summed[-1]

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the LTE terms of the window since the last record to the training log records."""
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            logs.update(self._window_summary())
            self._window.reset()
        super().log(logs, start_time) if start_time is not None else super().log(logs)

    def _window_summary(self) -> dict[str, float]:
        w = self._window
        out: dict[str, float] = {}
        names = sorted(w.losses)
        if w.n_losses and names:
            sums = torch.stack([torch.as_tensor(w.losses[k]).reshape(()).float().cpu() for k in names])
            means = self._all_mean(sums / w.n_losses).cpu().tolist()
            label = {"task": "task_loss", "eff": "lte_eff", "sep": "lte_sep", "distill": "distill_loss",
                 "distill_hidden": "distill_hidden_loss"}
            out.update({label.get(k, k): v for k, v in zip(names, means)})
        lte_model = self.lte_model
        if lte_model is not None:
            if lte_model.routing in TRAINING_MODES:
                out["eta"] = float(lte_model.lte_config.eta)
                out["lam"] = float(lte_model.lte_config.lam)
                out["tau"] = float(lte_model.lte_config.tau)
            if w.n_stats and w.stats is not None:
                means = (w.stats / w.n_stats).tolist()
                per_layer = means[:-1]
                out["ffn_sparsity"] = sum(per_layer) / len(per_layer)
                out["gflops_per_token"] = means[-1]
                out.update({f"ffn_sparsity/layer_{i:02d}": v for i, v in enumerate(per_layer)})
            controller = self.eta_controller
            if controller is not None and controller.smoothed is not None:
                out["target_sparsity"] = controller.target
                out["smoothed_sparsity"] = float(controller.smoothed)
        return out

    @property
    def last_step_stats(self) -> dict[str, Any] | None:
        """`{"ffn_sparsity", "per_layer"}` of the last optimizer step (None before the first)."""
        if self._last_stats is None:
            return None
        per_layer = self._last_stats[:-1].tolist()
        return {"ffn_sparsity": sum(per_layer) / len(per_layer), "per_layer": per_layer}

    # ------------------------------------------------------------------ save / load
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As the Trainer's; a sharded (FSDP) `LTEModel` is gathered to a full state dict first (every
        process takes part) and rank 0 writes the usual LTE save, whatever the FSDP state-dict type."""
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        if not (isinstance(model, SparseFFNModel) and sharding.is_sharded(self.model_wrapped)):
            return super().save_model(output_dir, _internal_call)
        if not isinstance(model, LTEModel):
            raise LTEError(f"saving a {type(model).__name__} trained with FSDP is not supported; train it without "
                           "sharding (one process or DDP)")
        self._save(output_dir, state_dict=sharding.gather_full_state_dict(self.model_wrapped))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=getattr(self.args, "hub_revision", None))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save an `LTEModel` or a baseline model with its own `save_pretrained` (atomic, full save, tied
        weights included; other files in the folder stay); plain HF models as usual. `state_dict`: the
        gathered full state dict of a sharded model (rank 0), written instead of the module tensors."""
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        if not isinstance(model, SparseFFNModel):
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        if not isinstance(model, LTEModel):
            model.save_pretrained(output_dir)
            return
        model.save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load an `LTEModel` checkpoint's weights, routers and eta (and the eta controller state)."""
        target = self.lte_model
        if target is None:
            plain = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
            if isinstance(plain, SparseFFNModel):  # a baseline model (fine-tuned Deja Vu, random top-k): its own save
                self._load_baseline(resume_from_checkpoint, plain)
                return
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        wrapped = model if model is not None else self.model_wrapped
        if sharding.is_sharded(wrapped):
            self._load_sharded(resume_from_checkpoint, wrapped, target)
            return
        if target.has_adapters:  # a light checkpoint: routers and adapters only, the base is the same
            target.load_trained_state(resume_from_checkpoint)
            self._restore_controller(resume_from_checkpoint)
            return
        saved = LTEModel.from_pretrained(resume_from_checkpoint)
        result = target.load_state_dict(saved.state_dict(), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(
                f"checkpoint {resume_from_checkpoint} does not match the model being trained "
                f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}); "
                "resume from the same stage and model it was written by"
            )
        target.lte_config.eta = saved.lte_config.eta
        del saved
        self._restore_controller(resume_from_checkpoint)

    @staticmethod
    def _load_baseline(checkpoint: str, target: SparseFFNModel) -> None:
        """Load a baseline model's checkpoint (weights, predictors, thresholds) into the model being trained."""
        from lte.baselines.model import BaselineModel

        saved = BaselineModel.from_pretrained(checkpoint)
        if saved.method != getattr(target, "method", None):
            raise LTEError(f"checkpoint {checkpoint} holds a {saved.method} model, the run trains a "
                           f"{getattr(target, 'method', type(target).__name__)} model: resume the run that wrote it")
        want = target.state_dict()
        state = {k: v for k, v in saved.state_dict().items() if k in want}
        if set(state) != set(want):
            missing = sorted(set(want) - set(state))
            raise LTEError(f"checkpoint {checkpoint} does not match the model being trained (missing {missing[:5]}); "
                           "resume from the run that wrote it")
        target.load_state_dict(state)
        del saved

    def _load_sharded(self, checkpoint: str, wrapped: torch.nn.Module, target: LTEModel) -> None:
        """Resume a sharded model: rank 0 reads the LTE save, the tensors are broadcast into every shard."""
        full, problem = {}, None
        if not self._distributed() or dist.get_rank() == 0:
            saved = LTEModel.from_pretrained(checkpoint)
            full = saved.state_dict()
            want = sharding.state_dict_names(target)
            missing, unexpected = sorted(want - set(full)), sorted(set(full) - want)
            if missing or unexpected:
                problem = (f"checkpoint {checkpoint} does not match the model being trained (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}); resume from the same stage and model it was written by")
            target.lte_config.eta = saved.lte_config.eta
            del saved
        problem = sharding.broadcast_from_rank0(problem)  # every process raises, or none does
        if problem:
            raise RuntimeError(problem)
        sharding.load_full_state_dict(wrapped, full)
        target.lte_config.eta = sharding.broadcast_from_rank0(target.lte_config.eta)
        self._restore_controller(checkpoint)

    def _restore_controller(self, checkpoint: str) -> None:
        controller = self.eta_controller
        state_file = os.path.join(checkpoint, "trainer_state.json")
        if controller is None or not os.path.isfile(state_file):
            return
        with open(state_file, encoding="utf-8") as fh:
            stored = json.load(fh).get("stateful_callbacks", {}).get(type(controller).__name__)
        if isinstance(stored, list):
            stored = stored[-1] if stored else None
        if stored:
            controller.load_attributes(stored.get("attributes", {}))
            if controller.tau_gain:  # the threshold it had moved to
                self.lte_model.set_routing(self.lte_model.routing, tau=controller.tau)
            logger.info("restored the eta controller state from %s (eta=%.4g)", checkpoint, controller.eta)

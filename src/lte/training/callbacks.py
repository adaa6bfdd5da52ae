"""Trainer callbacks for LTE training: the eta controller, the NaN guard and the JSONL log.

These are ordinary `transformers.TrainerCallback`s, so they also work with a plain `Trainer`
for the parts that need no LTE statistics (JSONL log, NaN guard on gradients). The LTE-specific
measurements (hard-cut sparsity of each step) are fed to `EtaController.update` by `LTETrainer`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from lte.training.errors import NonFiniteLossError

logger = logging.getLogger(__name__)

__all__ = ["EtaController", "LamWarmup", "NaNGuard", "JsonlLogger", "StopOnRequest", "install_stop_handler"]


class EtaController(TrainerCallback, ExportableState):
    """Steer stage-1 sparsity to a target by adjusting eta on the fly (beyond the paper).

    The paper sets the sparsity indirectly with eta, the weight of the efficiency loss, and needs
    one run per eta. This controller closes the loop instead. After every `update_every` optimizer
    steps it takes the measured hard-cut FFN sparsity of the step's batches (what the threshold
    tau would skip; `LTEModel.lte_stats()["ffn_sparsity"]`, averaged over processes), smooths it
    with an exponential moving average, and sets

        error   = target - smoothed_sparsity                  (sparsity fraction, -1 .. 1)
        integral += error                                    (only while eta is not clamped)
        log(eta) = log(eta0) + kp * error + ki * integral     (clamped to [eta_min, eta_max])

    i.e. a PI controller acting on log(eta): eta changes multiplicatively, so the same gains work
    for eta = 0.05 and eta = 5. Anti-windup: when the output hits a clamp the integral step is
    undone. Positive error (too dense) raises eta, negative error lowers it.

    With `tau_gain` > 0 it also moves the threshold itself (ours), after the same warm-up:

        tau = clamp(tau + tau_gain * error, tau_min, tau_max)

    The hard-cut sparsity rises with tau, so this holds the mask stage 1 trains on (routing "ste")
    at the target while the routers learn; stage 2 then cuts where stage 1 trained instead of
    re-cutting a mask the model never saw. The trainer copies `tau` into the model after each update.

    Args:
        target: desired FFN sparsity in [0, 1).
        eta0: starting eta (the `--eta` value).
        kp, ki: proportional and integral gains (log-eta per unit of sparsity error).
        smoothing: EMA factor of the sparsity measurement (0 = no smoothing).
        update_every: optimizer steps between updates.
        eta_min, eta_max: clamp of eta.
        warmup_steps: steps before the first update (measurements still feed the EMA).
        tau0, tau_gain: starting threshold and its gain (tau per unit of sparsity error; 0: tau stays).
        tau_min, tau_max: clamp of tau.
    """

    def __init__(
        self,
        target: float,
        eta0: float = 0.5,
        kp: float = 2.0,
        ki: float = 0.3,
        smoothing: float = 0.6,
        update_every: int = 1,
        eta_min: float = 1e-3,
        eta_max: float = 100.0,
        warmup_steps: int = 0,
        tau0: float = 0.5,
        tau_gain: float = 0.0,
        tau_min: float = 0.02,
        tau_max: float = 0.98,
    ) -> None:
        if not 0.0 <= target < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {target}")
        if eta0 <= 0:
            raise ValueError(f"the starting eta must be > 0 for the eta controller, got {eta0}")
        if not eta_min < eta_max:
            raise ValueError(f"eta_min ({eta_min}) must be below eta_max ({eta_max})")
        self.target = float(target)
        self.eta0 = float(eta0)
        self.kp = float(kp)
        self.ki = float(ki)
        self.smoothing = float(smoothing)
        self.update_every = int(update_every)
        self.eta_min = float(eta_min)
        self.eta_max = float(eta_max)
        self.warmup_steps = int(warmup_steps)
        # the bounds matter only when tau moves: a fixed tau (gain 0) is whatever the model has
        if tau_gain < 0 or (tau_gain > 0 and not 0.0 < tau_min <= tau0 <= tau_max < 1.0):
            raise ValueError(f"tau controller: need tau_gain >= 0 and 0 < tau_min <= tau0 <= tau_max < 1, got "
                             f"tau_gain={tau_gain}, tau_min={tau_min}, tau0={tau0}, tau_max={tau_max}")
        self.tau_gain, self.tau_min, self.tau_max = float(tau_gain), float(tau_min), float(tau_max)
        # Controller state (saved with every checkpoint through ExportableState).
        self.eta = min(max(self.eta0, self.eta_min), self.eta_max)
        self.tau = float(tau0)
        self.integral = 0.0
        self.smoothed: float | None = None
        self.last_measured: float | None = None
        self.updates = 0

    def wants_measurement(self, step: int) -> bool:
        """Whether optimizer step number `step` (1-based) should be measured."""
        return step % self.update_every == 0

    def update(self, step: int, measured_sparsity: float) -> float:
        """Feed the sparsity measured at optimizer step `step`; return the new eta."""
        self.last_measured = float(measured_sparsity)
        s = self.smoothing
        self.smoothed = self.last_measured if self.smoothed is None else s * self.smoothed + (1 - s) * self.last_measured
        if step <= self.warmup_steps:
            return self.eta
        error = self.target - self.smoothed
        self.integral += error
        log_eta = math.log(self.eta0) + self.kp * error + self.ki * self.integral
        lo, hi = math.log(self.eta_min), math.log(self.eta_max)
        if not lo <= log_eta <= hi:  # anti-windup: do not integrate into the clamp
            self.integral -= error
            log_eta = min(max(log_eta, lo), hi)
        self.eta = math.exp(log_eta)
        if self.tau_gain:
            self.tau = min(max(self.tau + self.tau_gain * error, self.tau_min), self.tau_max)
        self.updates += 1
        return self.eta

    def state(self) -> dict[str, Any]:
        return {
            "args": {
                "target": self.target,
                "eta0": self.eta0,
                "kp": self.kp,
                "ki": self.ki,
                "smoothing": self.smoothing,
                "update_every": self.update_every,
                "eta_min": self.eta_min,
                "eta_max": self.eta_max,
                "warmup_steps": self.warmup_steps,
                "tau_gain": self.tau_gain,
                "tau_min": self.tau_min,
                "tau_max": self.tau_max,
            },
            "attributes": {
                "eta": self.eta,
                "tau": self.tau,
                "integral": self.integral,
                "smoothed": self.smoothed,
                "last_measured": self.last_measured,
                "updates": self.updates,
            },
        }

    def load_attributes(self, attributes: dict[str, Any]) -> None:
        """Restore the controller state in place (used on resume)."""
        for key, value in attributes.items():
            setattr(self, key, value)


class LamWarmup(TrainerCallback):
    """Ramp the separability weight lam linearly from 0 to `lam` over the first `fraction` of the steps (ours).

    L_sep = mean 1/(G - tau)^2 is a barrier at the threshold: it pushes every score away from tau
    on the side where it already is. With routers that start with every expert on (the "open"
    init of `calibrate_routers`), scores could then never cross tau downwards, whatever eta is.
    Ramping lam in lets L_eff (and the eta controller) move scores below tau first; by the end of
    the ramp L_sep is at full weight and separates the scores before stage 2 cuts them. The value
    depends only on the global step, so resume gives the same schedule.
    """

    def __init__(self, lam: float, fraction: float) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"lam warm-up fraction must be in (0, 1], got {fraction}")
        self.lam = float(lam)
        self.fraction = float(fraction)

    def value(self, step: int, max_steps: int) -> float:
        """lam for optimizer step `step` (0-based) of `max_steps`."""
        ramp = max(1.0, self.fraction * max_steps)
        return self.lam * min(1.0, (step + 1) / ramp)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and hasattr(model, "lte_config"):
            model.lte_config.lam = self.value(state.global_step, state.max_steps)


class TauHold(TrainerCallback):
    """Stage 2: set tau again every `every` optimizer steps, so the model trains at its target sparsity (ours).

    Stage 2 trains the weights under frozen routers; the routers' inputs move with them and the
    sparsity of a fixed tau drifts (WikiText-2 at a 0.9 target: 94-95% by the end of stage 2). Setting
    tau again only at the end brings the served model back to its target, but it then runs with
    experts on that training learned to do without. `recut(model, step)` is the calibration on held-out
    examples (`stages._calibrate_on`) to the sparsity aimed at after `step` steps (the target, or a
    point of `sparsity_ramp`); `history` keeps, per re-cut, the step, the sparsity it found
    and the one it left (the drift it corrected); after a resume, those since the resume (the tau of
    the last re-cut before it is in the checkpoint). Not at the last step: stage 2's final re-cut
    (`recalibrate_tau`) comes after training.
    """

    def __init__(self, every: int, recut) -> None:
        if every < 1:
            raise ValueError(f"hold_target_every must be >= 1 optimizer steps, got {every}")
        self.every = int(every)
        self.recut = recut
        self.history: list[dict[str, float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if model is None or step % self.every or step >= state.max_steps:
            return
        result = self.recut(model, step)
        self.history.append({"step": step, "target": result.get("target"), "found": result["initial_sparsity"],
                             "left": result["sparsity"], "tau": result["tau"]})


class StopOnRequest(TrainerCallback):
    """Stop at the end of the current optimizer step once `event` is set, saving a checkpoint first.

    A worker that is asked to stop (the study's time limit sends SIGTERM; its handler sets the event)
    keeps what it trained: the Trainer writes `checkpoint-N` (weights, optimizer, schedule, RNG) and
    `train(resume_from_checkpoint=...)` continues from it later. `stopped_at` is the step it stopped
    at (None while it has not); the caller must not treat such a run as finished
    (`raise_if_stopped`).
    """

    def __init__(self, event) -> None:
        self.event = event
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.event.is_set():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def install_stop_handler(signals: tuple[int, ...] = (signal.SIGTERM,)) -> threading.Event:
    """Make `signals` ask for a stop instead of ending the process (main thread only): the returned
    event is set, and a `StopOnRequest(event)` ends training with a checkpoint at the end of the step.
    A second SIGINT (Ctrl-C twice) stops at once."""
    event = threading.Event()

    def _request_stop(signum, frame) -> None:
        if event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.warning("asked to stop (signal %d): a checkpoint is saved at the end of this training step", signum)
        event.set()

    for sig in signals:
        signal.signal(sig, _request_stop)
    return event


def raise_if_stopped(callbacks, out_dir) -> None:
    """Raise `TrainingStopped` when a `StopOnRequest` among `callbacks` stopped the run early."""
    from lte.training.errors import TrainingStopped

    for cb in callbacks or []:
        if isinstance(cb, StopOnRequest) and cb.stopped_at is not None:
            raise TrainingStopped(f"training stopped on request at step {cb.stopped_at}; checkpoint-{cb.stopped_at} "
                                  f"in {out_dir} holds it, and a resumed run continues from there",
                                  step=cb.stopped_at)


class NaNGuard(TrainerCallback):
    """Stop training at the first non-finite loss or gradient, before it reaches the weights.

    `LTETrainer` checks every loss (all processes agree) and calls `error()`; this callback also
    checks the gradients just before each optimizer step (`check_grads`). It remembers the last
    checkpoint written, so the error names the last good checkpoint to resume from. Nothing is
    saved after the failure, so that checkpoint stays the newest one.
    """

    def __init__(self, check_grads: bool = True) -> None:
        self.check_grads = check_grads
        self.last_checkpoint: str | None = None
        self.output_dir: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.output_dir = args.output_dir
        self.last_checkpoint = newest_checkpoint(args.output_dir)

    def on_save(self, args, state, control, **kwargs):
        self.last_checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.check_grads or model is None or args.fp16:  # fp16's grad scaler handles infs itself
            return
        # Each process checks the gradients it holds (its shards under FSDP), then all processes agree.
        grads = [_local(p.grad) for p in model.parameters() if p.grad is not None]
        finite = torch.isfinite(torch.nn.utils.get_total_norm(grads)) if grads else torch.tensor(True)
        device = grads[0].device if grads else getattr(args, "device", torch.device("cpu"))
        if not _all_processes(bool(finite.item()), device):
            raise self.error(state.global_step + 1, "gradient norm", float("nan"))

    def error(self, step: int, what: str, value: float) -> NonFiniteLossError:
        """Build the clear error for a non-finite `what` at optimizer step `step`."""
        where = self.last_checkpoint or "none (no checkpoint was saved before the failure)"
        msg = (
            f"Training stopped at step {step}: the {what} became non-finite ({value}). "
            f"No weights were updated with it and nothing was saved after it. "
            f"Last good checkpoint: {where}. "
            "Lower the learning rate (or eta / the router learning rate), then resume with --resume "
            "or restart the stage."
        )
        return NonFiniteLossError(msg, step=step, last_checkpoint=self.last_checkpoint)


class JsonlLogger(TrainerCallback):
    """Append every log record of the Trainer as one JSON line to `<output_dir>/<filename>`."""

    def __init__(self, filename: str = "train_log.jsonl") -> None:
        self.filename = filename

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        record = {"step": state.global_step, "epoch": state.epoch}
        record.update({k: _jsonable(v) for k, v in logs.items()})
        with open(os.path.join(args.output_dir, self.filename), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of an FSDP2 DTensor, the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _all_processes(flag: bool, device: torch.device) -> bool:
    """`flag` and-ed over every process (itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def newest_checkpoint(output_dir: str) -> str | None:
    """Path of the highest-numbered `checkpoint-N` folder in `output_dir`, or None."""
    if not os.path.isdir(output_dir):
        return None
    steps = [
        int(name.split("-", 1)[1])
        for name in os.listdir(output_dir)
        if name.startswith("checkpoint-") and name.split("-", 1)[1].isdigit()
    ]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None

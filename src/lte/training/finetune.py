"""`finetune`: fine-tune a model whose sparsity is already chosen (a baseline, or LTE with top-k).

The masks stay on and what picks them (predictors, routers: `SparseFFNModel.freeze_selectors`)
stays frozen; the model's own weights adapt, with `LTETrainer` and the same settings as a stage
(`TrainArgs`). Deja Vu + fine-tuning and random routers + top-k in the study train this way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from lte.errors import LTEError
from lte.sparse_model import SparseFFNModel
from lte.training.args import TrainArgs, training_arguments
from lte.training.callbacks import raise_if_stopped
from lte.training.data import make_collator

__all__ = ["finetune"]


def finetune(model: nn.Module, train_data: Any, tokenizer, out_dir: str, teacher: nn.Module | None = None,
             callbacks: list | None = None, resume_from: str | None = None, **train_args: Any) -> dict[str, Any]:
    """Fine-tune `model` (its masks on, its predictors/routers frozen) with `LTETrainer`.

    `train_data`: a torch Dataset of examples ({input_ids, attention_mask, labels}).
    `teacher`: the dense model, for `distill` > 0 (distillation, as LTE's stages can use it).
    `callbacks`: more Trainer callbacks (e.g. `StopOnRequest`: then a stopped run raises `TrainingStopped`).
    `resume_from`: a `checkpoint-N` folder of an interrupted run of the same model and settings: its
    weights, optimizer, schedule and step are restored and training continues from there.
    `train_args`: `lte.training.TrainArgs` fields (max_steps, lr, batch_size, distill, ...).
    Returns {"steps", "tokens", "epochs", "seconds", "train_loss"}.
    """
    from lte.training.trainer import LTETrainer

    hp = TrainArgs.from_dict({"save_steps": 10**9, "report_to": "none", "progress": False, **train_args})
    if isinstance(model, SparseFFNModel):
        model.freeze_selectors(True)
    args = training_arguments(Path(out_dir), hp)
    if hp.distill > 0 and teacher is None:
        raise LTEError("finetune with distill > 0 needs teacher= (the dense model)")
    trainer = LTETrainer(model=model, args=args, train_dataset=train_data, data_collator=make_collator(tokenizer),
                         processing_class=tokenizer, jsonl_log="train_log.jsonl", teacher=teacher,
                         distill=hp.distill, distill_temperature=hp.distill_temperature, callbacks=callbacks)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    raise_if_stopped(callbacks, out_dir)
    model.eval()
    return {"steps": trainer.state.global_step, "tokens": int(trainer.state.num_input_tokens_seen or 0),
            "epochs": trainer.state.epoch, "seconds": time.perf_counter() - start,
            "train_loss": result.metrics.get("train_loss")}

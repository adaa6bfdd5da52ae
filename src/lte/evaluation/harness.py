"""lm-evaluation-harness for LTE models: `LTELM` scores an `LTEModel` (hard routing) like any HF model.

It is lm-eval's own Hugging Face model class (`HFLM`) given the loaded LTE model, so every task,
metric and prompt of the harness applies unchanged; the LTE model only skips the experts its
routers turn off. Needs the optional extra: `pip install 'lte[lmeval]'`.

Command line (lm-eval's own, with the model type `lte` registered):

    python -m lte.evaluation.harness --model lte --model_args pretrained=runs/x/s2 --tasks piqa,boolq
    python -m lte.evaluation.harness --model lte --model_args pretrained=runs/x/s2,routing=dense --tasks piqa

Python:

    import lm_eval
    from lte.evaluation.harness import LTELM

    lm = LTELM("runs/x/s2", batch_size=8)            # a folder lte saved, or LTELM(model, tokenizer=tok)
    results = lm_eval.simple_evaluate(model=lm, tasks=["piqa"])
    lm.lte_stats()                                   # FFN sparsity / GFLOPs over everything it scored

The harness feeds right-padded batches without an attention mask, so the sparsity it accumulates
counts padding positions too; `lte eval` (`lte.evaluation.multiple_choice_accuracy`) counts only
real tokens and gives the same accuracies.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # the optional extra is missing
    raise ImportError("the lm-evaluation-harness adapter needs lm-eval: pip install 'lte[lmeval]'") from err

from lte.evaluation._common import default_device, finish_stats, start_stats

__all__ = ["LTELM"]


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype) or value == "auto":
        return None if value == "auto" else value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}; use float32, bfloat16 or float16")
    return dtype


class LTELM(HFLM):
    """An `HFLM` over an LTE model (or any model `lte.load_model` reads), in the given routing.

    Args:
        pretrained: a model folder lte saved (LTE, baseline or plain HF), an embedded or hub
            name, or a model object (then pass `tokenizer`).
        tokenizer: the tokenizer (default: the folder's, checked against the model's vocabulary).
        routing: routing of an LTE model: "hard" (default, as served), "soft" or "dense".
        device, dtype: where and in which dtype to run (default: the GPU when there is one; float32).
        kwargs: `HFLM` options (batch_size, max_length, add_bos_token, ...).
    """

    def __init__(self, pretrained: Any, tokenizer: Any = None, routing: str = "hard", device: str | None = None,
                 dtype: str | torch.dtype | None = None, **kwargs: Any) -> None:
        from lte.loading import load_model, load_tokenizer, model_kind, model_source

        if isinstance(pretrained, (str, os.PathLike)):
            source = model_source(pretrained)
            is_lte = not isinstance(source, str) and model_kind(source) == "lte"
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source)
            load_kwargs = {"dtype": _dtype(dtype)} if _dtype(dtype) is not None else {}
            model = load_model(source, task="causal-lm", routing=routing if is_lte else None, **load_kwargs)
        else:
            if tokenizer is None:
                raise ValueError("pass tokenizer=... together with a model object")
            model = pretrained
            if hasattr(model, "set_routing"):
                model.set_routing(routing)
        run_device = torch.device(device) if device else default_device()
        if run_device.type == "cuda" and not torch.cuda.is_available():
            run_device = torch.device("cpu")
        model.to(run_device).eval()
        start_stats(model)
        self.lte_model = model
        kwargs.pop("device", None)
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)

    def lte_stats(self) -> dict[str, Any]:
        """FFN sparsity (overall, per layer) and GFLOPs/token over every forward since this object was made."""
        return finish_stats(self.lte_model)


try:
    register_model("lte")(LTELM)  # `--model lte` in lm-eval's command line and simple_evaluate(model="lte")
except ValueError:  # already registered by this module under its other name (run as a script, then imported)
    pass


if __name__ == "__main__":  # lm-eval's command line, with the model type "lte" registered above
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()

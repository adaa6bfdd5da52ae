"""Evaluation for lte: perplexity, GLUE metrics, ROUGE-L generation, multiple-choice accuracy, plots.

Every evaluator returns a JSON-ready dict that includes the FFN sparsity (overall and per layer)
and GFLOPs/token measured over the evaluation (0 sparsity for a plain HF model).
"""

from lte.evaluation._common import default_device
from lte.evaluation.generation import evaluate_generation, generate_greedy, rouge_l
from lte.evaluation.glue import evaluate_glue, glue_metrics
from lte.evaluation.metrics import accuracy, f1_binary, matthews_corrcoef, pearson, ranks, spearman
from lte.evaluation.multiple_choice import multiple_choice_accuracy
from lte.evaluation.perplexity import perplexity, sliding_windows, token_stream
from lte.evaluation.plots import plot_layer_sparsity, plot_tradeoff

__all__ = [
    "accuracy",
    "default_device",
    "evaluate_generation",
    "evaluate_glue",
    "f1_binary",
    "generate_greedy",
    "glue_metrics",
    "matthews_corrcoef",
    "multiple_choice_accuracy",
    "pearson",
    "perplexity",
    "plot_layer_sparsity",
    "plot_tradeoff",
    "ranks",
    "rouge_l",
    "sliding_windows",
    "spearman",
    "token_stream",
]

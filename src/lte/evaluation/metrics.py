"""Classification and regression metrics in plain Python (no scipy / sklearn needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"predictions and labels differ in length: {len(a)} vs {len(b)}.")
    if not a:
        raise ValueError("no predictions to score.")


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to the label."""
    _check_lengths(predictions, labels)
    return sum(int(p == y) for p, y in zip(predictions, labels)) / len(labels)


def f1_binary(predictions: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the ``positive`` class: 2 TP / (2 TP + FP + FN); 0 when there is no positive at all."""
    _check_lengths(predictions, labels)
    tp = sum(1 for p, y in zip(predictions, labels) if p == positive and y == positive)
    fp = sum(1 for p, y in zip(predictions, labels) if p == positive and y != positive)
    fn = sum(1 for p, y in zip(predictions, labels) if p != positive and y == positive)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation (multi-class form, equal to the binary formula for two classes); 0 if undefined."""
    _check_lengths(predictions, labels)
    classes = sorted(set(predictions) | set(labels))
    n = len(labels)
    correct = sum(int(p == y) for p, y in zip(predictions, labels))
    pred_counts = [sum(1 for p in predictions if p == c) for c in classes]
    true_counts = [sum(1 for y in labels if y == c) for c in classes]
    numerator = correct * n - sum(p * t for p, t in zip(pred_counts, true_counts))
    denominator = math.sqrt((n * n - sum(p * p for p in pred_counts)) * (n * n - sum(t * t for t in true_counts)))
    return 0.0 if denominator == 0 else numerator / denominator


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation coefficient; 0 when either input is constant."""
    _check_lengths(x, y)
    n = len(x)
    mean_x, mean_y = sum(x) / n, sum(y) / n
    cov = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y))
    var_x = sum((a - mean_x) ** 2 for a in x)
    var_y = sum((b - mean_y) ** 2 for b in y)
    return 0.0 if var_x == 0 or var_y == 0 else cov / math.sqrt(var_x * var_y)


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties getting the average of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        average = (start + end) / 2 + 1
        for k in range(start, end + 1):
            result[order[k]] = average
        start = end + 1
    return result


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson of the (tie-averaged) ranks."""
    _check_lengths(x, y)
    return pearson(ranks(x), ranks(y))

"""Classification and regression metrics, computed by scikit-learn and SciPy.

Thin wrappers that keep lte's conventions: inputs of equal, non-zero length (else a ValueError),
plain floats out, and 0 where a metric is undefined (a constant input for the correlations, no
positive at all for F1, a constant prediction for Matthews), as the GLUE scripts report them.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["accuracy", "f1_binary", "matthews_corrcoef", "pearson", "ranks", "spearman"]


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"predictions and labels differ in length: {len(a)} vs {len(b)}.")
    if not len(a):
        raise ValueError("no predictions to score.")


def _sklearn_metrics():
    try:
        from sklearn import metrics
    except ImportError as err:  # a dependency of lte; only a broken install lacks it
        raise ImportError("lte's metrics need scikit-learn: pip install scikit-learn") from err
    return metrics


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError as err:
        raise ImportError("lte's correlations need SciPy: pip install scipy") from err
    return stats


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to the label (`sklearn.metrics.accuracy_score`)."""
    _check_lengths(predictions, labels)
    return float(_sklearn_metrics().accuracy_score(list(labels), list(predictions)))


def f1_binary(predictions: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the `positive` class (`sklearn.metrics.f1_score`); 0 when there is no positive at all."""
    _check_lengths(predictions, labels)
    scores = _sklearn_metrics().f1_score(list(labels), list(predictions), labels=[positive], average=None,
                                         zero_division=0.0)
    return float(scores[0])


def matthews_corrcoef(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation, multi-class form (`sklearn.metrics.matthews_corrcoef`); 0 when undefined."""
    _check_lengths(predictions, labels)
    return float(_sklearn_metrics().matthews_corrcoef(list(labels), list(predictions)))


def _constant(values: Sequence[float]) -> bool:
    return min(values) == max(values)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation coefficient (`scipy.stats.pearsonr`); 0 when either input is constant."""
    _check_lengths(x, y)
    if len(x) < 2 or _constant(x) or _constant(y):
        return 0.0
    return float(_scipy_stats().pearsonr(list(x), list(y)).statistic)


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties getting the average of the ranks they span (`scipy.stats.rankdata`)."""
    return [float(r) for r in _scipy_stats().rankdata(list(values), method="average")]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (`scipy.stats.spearmanr`, ties averaged); 0 when either input is constant."""
    _check_lengths(x, y)
    if len(x) < 2 or _constant(x) or _constant(y):
        return 0.0
    return float(_scipy_stats().spearmanr(list(x), list(y)).statistic)

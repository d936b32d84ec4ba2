"""Quality metrics of labelled predictions, computed with numpy alone.

The service must not pull scikit-learn in at runtime (a large import for nine
formulas), yet its figures must agree with what users compute offline with
scikit-learn, so every metric here follows scikit-learn's definition and its
conventions for degenerate inputs; the unit tests compare the two on random data,
ties and edge cases:

- precision, recall and f1 follow ``zero_division=0``: a ratio whose denominator is 0
  (no predicted positives, no actual positives, neither) is 0, not undefined. An
  alert on "precision < 0.8" therefore fires on a window that predicted no positive.
- roc_auc is the Mann-Whitney statistic with average ranks for ties (equal to the
  trapezoidal area under scikit-learn's ROC curve); absent when the labels hold one
  class only (scikit-learn raises).
- log_loss clips probabilities as scikit-learn 1.9 does: p and 1 - p are each clipped
  to [eps, 1 - eps], eps the machine epsilon of the dtype (here float64, since scores
  are computed in float64). It is defined with one class present (scikit-learn agrees
  when given ``labels=[0, 1]``), and absent when a score lies outside [0, 1]: such a
  score is not a probability (scikit-learn raises).
- r2 is absent with fewer than 2 rows (scikit-learn returns NaN); with a constant
  target it is 1.0 for perfect predictions and 0.0 otherwise (``force_finite=True``).
"""

from __future__ import annotations

from typing import cast

import numpy as np
from scipy.stats import rankdata

from modelplane.kernel.errors import InvalidArgument
from modelplane.monitoring.v1 import monitoring_pb2 as pb

BINARY_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss")
REGRESSION_METRICS = ("mae", "rmse", "r2")

# Which way is good, so an alert rule knows whether "crossing" means below or above.
METRICS_HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "precision": True,
    "recall": True,
    "f1": True,
    "roc_auc": True,
    "r2": True,
    "log_loss": False,
    "mae": False,
    "rmse": False,
}

_METRICS_BY_TASK: dict[int, tuple[str, ...]] = {
    pb.TASK_TYPE_BINARY_CLASSIFICATION: BINARY_METRICS,
    pb.TASK_TYPE_REGRESSION: REGRESSION_METRICS,
}


def metric_names(task: int) -> tuple[str, ...]:
    """The metrics a task has; none for an unspecified (or unknown) task."""
    return _METRICS_BY_TASK.get(task, ())


def validate_metric(task: int, name: str, field: str = "metric") -> None:
    """Raises InvalidArgument (naming `field`) unless `name` is a metric of `task`."""
    names = metric_names(task)
    if not names:
        raise InvalidArgument(f"{field}: quality metrics need the config's task to be set")
    if name not in names:
        raise InvalidArgument(
            f"{field}: {name!r} is not a metric of {_task_name(task)}; one of {', '.join(names)}"
        )


def _task_name(task: int) -> str:
    return pb.TaskType.Name(cast(pb.TaskType.ValueType, task)).removeprefix("TASK_TYPE_")


def quality_metrics(
    task: int, scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """The metrics of `task` over rows of (score, label); undefined metrics are absent.

    For binary classification `scores` are the positive class's scores, a score at or
    above `threshold` predicting the positive class, and `labels` are 0 or 1. For
    regression `scores` are the predictions. No rows give no metrics. Raises
    InvalidArgument on mismatched lengths, non-finite values or non-binary labels:
    the caller filters missing rows out before asking.
    """
    y_score, y_true = _as_rows(scores, labels)
    if task == pb.TASK_TYPE_BINARY_CLASSIFICATION:
        return _binary_metrics(y_score, y_true, threshold)
    if task == pb.TASK_TYPE_REGRESSION:
        return _regression_metrics(y_score, y_true)
    return {}


def _as_rows(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_score = np.asarray(scores, dtype=np.float64).reshape(-1)
    y_true = np.asarray(labels, dtype=np.float64).reshape(-1)
    if y_score.shape != y_true.shape:
        raise InvalidArgument(f"scores: {y_score.size} rows but labels: {y_true.size} rows")
    if not (np.isfinite(y_score).all() and np.isfinite(y_true).all()):
        raise InvalidArgument("scores, labels: must be finite")
    return y_score, y_true


def _binary_metrics(y_score: np.ndarray, y_true: np.ndarray, threshold: float) -> dict[str, float]:
    if y_score.size == 0:
        return {}
    if not np.isin(y_true, (0.0, 1.0)).all():
        raise InvalidArgument("labels: a binary classifier's labels are 0 or 1")
    actual = y_true == 1.0
    predicted = y_score >= threshold
    tp = int(np.count_nonzero(actual & predicted))
    fp = int(np.count_nonzero(~actual & predicted))
    fn = int(np.count_nonzero(actual & ~predicted))
    metrics = {
        "accuracy": float(np.count_nonzero(actual == predicted)) / y_true.size,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }
    auc = _roc_auc(y_score, actual)
    if auc is not None:
        metrics["roc_auc"] = auc
    loss = _log_loss(y_score, actual)
    if loss is not None:
        metrics["log_loss"] = loss
    return metrics


def _ratio(numerator: int, denominator: int) -> float:
    """scikit-learn's zero_division=0: an empty denominator scores 0."""
    return numerator / denominator if denominator else 0.0


def _roc_auc(y_score: np.ndarray, actual: np.ndarray) -> float | None:
    """Mann-Whitney U / (n_pos * n_neg) with average ranks; None with one class."""
    n_pos = int(np.count_nonzero(actual))
    n_neg = actual.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(y_score, method="average")
    u = float(ranks[actual].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _log_loss(y_score: np.ndarray, actual: np.ndarray) -> float | None:
    """Mean negative log-likelihood, clipped like scikit-learn; None off [0, 1]."""
    if y_score.min() < 0.0 or y_score.max() > 1.0:
        return None
    eps = np.finfo(np.float64).eps
    # scikit-learn builds the column 1 - p first and clips both columns, which is
    # not quite 1 - clip(p) in floating point.
    p_true = np.where(actual, y_score, 1.0 - y_score)
    p_true = np.clip(p_true, eps, 1.0 - eps)
    return float(-np.mean(np.log(p_true)))


def _regression_metrics(y_pred: np.ndarray, y_true: np.ndarray) -> dict[str, float]:
    if y_pred.size == 0:
        return {}
    error = y_true - y_pred
    metrics = {
        "mae": float(np.mean(np.abs(error))),
        "rmse": float(np.sqrt(np.mean(error**2))),
    }
    r2 = _r2(y_pred, y_true)
    if r2 is not None:
        metrics["r2"] = r2
    return metrics


def _r2(y_pred: np.ndarray, y_true: np.ndarray) -> float | None:
    """Coefficient of determination with scikit-learn's force_finite conventions."""
    if y_true.size < 2:
        return None
    numerator = float(np.sum((y_true - y_pred) ** 2))
    denominator = float(np.sum((y_true - np.mean(y_true)) ** 2))
    if numerator == 0.0:
        return 1.0
    if denominator == 0.0:
        return 0.0
    return 1.0 - numerator / denominator

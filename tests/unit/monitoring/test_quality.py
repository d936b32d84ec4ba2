"""quality_metrics agrees with scikit-learn, which the service itself never imports."""

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from modelplane.kernel.errors import InvalidArgument
from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.services.monitoring import quality

BINARY = pb.TASK_TYPE_BINARY_CLASSIFICATION
REGRESSION = pb.TASK_TYPE_REGRESSION


def sklearn_binary(scores, labels, threshold=0.5):
    """What scikit-learn says, with its own conventions for undefined values."""
    predicted = (scores >= threshold).astype(int)
    expected = {
        "accuracy": skm.accuracy_score(labels, predicted),
        "precision": skm.precision_score(labels, predicted, zero_division=0),
        "recall": skm.recall_score(labels, predicted, zero_division=0),
        "f1": skm.f1_score(labels, predicted, zero_division=0),
        "log_loss": skm.log_loss(labels, scores, labels=[0, 1]),
    }
    if len(set(labels.tolist())) == 2:
        expected["roc_auc"] = skm.roc_auc_score(labels, scores)
    return expected


def assert_same(actual, expected):
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("seed", range(12))
def test_binary_metrics_match_sklearn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    labels = rng.integers(0, 2, n)
    if seed % 3 == 0:
        # Coarse scores: many ties across both classes.
        scores = rng.integers(0, 5, n) / 4.0
    else:
        scores = np.clip(rng.normal(0.3 + 0.4 * labels, 0.25), 0.0, 1.0)
    threshold = float(rng.choice([0.5, 0.25, 0.9]))
    assert_same(
        quality.quality_metrics(BINARY, scores, labels, threshold),
        sklearn_binary(scores, labels, threshold),
    )


def test_ties_give_the_average_rank_auc():
    scores = np.array([0.5, 0.5, 0.5, 0.5, 0.9, 0.1])
    labels = np.array([1, 0, 1, 0, 1, 0])
    got = quality.quality_metrics(BINARY, scores, labels)
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, scores), rel=1e-9)
    assert got["roc_auc"] == pytest.approx((1 + 2 * 2 * 0.5 + 2 + 2) / 9, rel=1e-9)


def test_one_class_has_no_auc_but_a_log_loss():
    scores = np.array([0.2, 0.7, 0.9])
    labels = np.array([1, 1, 1])
    got = quality.quality_metrics(BINARY, scores, labels)
    assert "roc_auc" not in got
    assert_same(got, sklearn_binary(scores, labels))


def test_no_predicted_positive_scores_zero_precision_like_sklearn():
    scores = np.array([0.1, 0.2, 0.3, 0.4])
    labels = np.array([0, 1, 0, 1])
    got = quality.quality_metrics(BINARY, scores, labels)
    assert got["precision"] == 0.0 and got["recall"] == 0.0 and got["f1"] == 0.0
    assert_same(got, sklearn_binary(scores, labels))


def test_nothing_positive_anywhere_is_zero_f1_like_sklearn():
    scores = np.array([0.1, 0.2])
    labels = np.array([0, 0])
    got = quality.quality_metrics(BINARY, scores, labels)
    assert got["accuracy"] == 1.0 and got["f1"] == 0.0
    assert_same(got, sklearn_binary(scores, labels))


def test_log_loss_clips_certain_mistakes_like_sklearn():
    scores = np.array([0.0, 1.0, 1.0, 0.0, 1e-300, 1 - 1e-17])
    labels = np.array([1, 0, 1, 0, 1, 0])
    got = quality.quality_metrics(BINARY, scores, labels)
    assert np.isfinite(got["log_loss"])
    assert got["log_loss"] == pytest.approx(skm.log_loss(labels, scores), rel=1e-9)


def test_scores_that_are_not_probabilities_have_no_log_loss():
    scores = np.array([-2.0, 3.0, 0.5])
    labels = np.array([0, 1, 1])
    got = quality.quality_metrics(BINARY, scores, labels)
    assert "log_loss" not in got
    with pytest.raises(ValueError):
        skm.log_loss(labels, scores)
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, scores), rel=1e-9)


@pytest.mark.parametrize("seed", range(8))
def test_regression_metrics_match_sklearn_on_random_data(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 300))
    truth = rng.normal(10.0, 3.0, n)
    predicted = truth + rng.normal(0.0, 1.0 + seed, n)
    expected = {
        "mae": skm.mean_absolute_error(truth, predicted),
        "rmse": skm.root_mean_squared_error(truth, predicted),
        "r2": skm.r2_score(truth, predicted),
    }
    assert_same(quality.quality_metrics(REGRESSION, predicted, truth), expected)


@pytest.mark.parametrize(
    ("truth", "predicted"),
    [([3.0, 3.0, 3.0], [3.0, 3.0, 3.0]), ([3.0, 3.0, 3.0], [2.0, 3.0, 4.0])],
)
def test_constant_target_r2_follows_sklearn_force_finite(truth, predicted):
    got = quality.quality_metrics(REGRESSION, np.array(predicted), np.array(truth))
    assert got["r2"] == skm.r2_score(truth, predicted)


def test_one_row_has_no_r2():
    got = quality.quality_metrics(REGRESSION, np.array([1.0]), np.array([2.0]))
    assert got == {"mae": 1.0, "rmse": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(skm.r2_score([2.0], [1.0]))


def test_no_rows_and_no_task_give_no_metrics():
    empty = np.array([])
    assert quality.quality_metrics(BINARY, empty, empty) == {}
    assert quality.quality_metrics(REGRESSION, empty, empty) == {}
    ones = np.ones(3)
    assert quality.quality_metrics(pb.TASK_TYPE_UNSPECIFIED, ones, ones) == {}


@pytest.mark.parametrize(
    ("scores", "labels", "field"),
    [
        ([0.1, 0.2], [1], "scores"),
        ([np.nan, 0.2], [1, 0], "finite"),
        ([0.1, 0.2], [1, 2], "labels"),
    ],
)
def test_bad_rows_are_refused(scores, labels, field):
    with pytest.raises(InvalidArgument, match=field):
        quality.quality_metrics(BINARY, np.array(scores), np.array(labels))


def test_every_metric_says_which_way_is_better():
    names = set(quality.BINARY_METRICS) | set(quality.REGRESSION_METRICS)
    assert set(quality.METRICS_HIGHER_IS_BETTER) == names
    assert quality.METRICS_HIGHER_IS_BETTER["roc_auc"] is True
    assert quality.METRICS_HIGHER_IS_BETTER["log_loss"] is False


def test_validate_metric():
    quality.validate_metric(BINARY, "f1")
    quality.validate_metric(REGRESSION, "rmse")
    with pytest.raises(InvalidArgument, match=r"rules\[1\]\.metric"):
        quality.validate_metric(BINARY, "rmse", "rules[1].metric")
    with pytest.raises(InvalidArgument, match="task"):
        quality.validate_metric(pb.TASK_TYPE_UNSPECIFIED, "f1")

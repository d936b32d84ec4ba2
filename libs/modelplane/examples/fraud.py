"""The demo fraud model `modelplane up` trains, registers and serves on first run.

It is trained as a team would: on the demo feature view's own history (the Parquet
source the feature service materializes), in the bundle's column order, so training and
serving read the same definitions. Labels are synthetic (drawn from a known risk score
of the features, with noise), the models are scikit-learn's, exported with skl2onnx,
and each version is registered with a model card, lineage, evaluation metrics (overall
and per slice) and the reference statistics monitoring compares live traffic with.
Version 1 is a logistic regression; version 2, a gradient-boosted candidate, is
registered without an alias, ready for a canary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq

from modelplane.examples import features
from modelplane.examples.models import IR_VERSION, OPSET
from modelplane.registry.v1 import registry_pb2 as pb

MODEL = "fraud"
BUNDLE = features.SCORER  # the model's input is this bundle's tensor
COLUMNS = (
    "trips_7d",
    "trips_30d",
    "avg_fare",
    "avg_rating",
    "cancel_rate",
    "card_on_file",
    "tenure_years",
    "complaints_90d",
)  # the bundle's order
SEED = 7
VIEW = "customer_stats"  # the feature view COLUMNS come from
SCORE_OUTPUT = "probabilities"  # skl2onnx's output: [rows, 2], column 1 the fraud score


@dataclass(frozen=True)
class TrainedVersion:
    path: Path
    metadata: pb.UploadMetadata


def training_data(source: Path, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Every row of the view's history as float32 [rows, 8], and a 0/1 fraud label per
    row drawn from a logistic risk of the features (about one row in ten is fraud)."""
    table = pq.read_table(source, columns=list(COLUMNS))
    x = np.column_stack([table[c].to_numpy().astype(np.float32) for c in COLUMNS])
    z = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    risk = (
        1.2 * z[:, 4]  # cancel_rate
        + 0.9 * z[:, 7]  # complaints_90d
        - 0.8 * z[:, 3]  # avg_rating
        - 0.6 * z[:, 6]  # tenure_years
        - 0.7 * z[:, 5]  # card_on_file
        - 2.6
    )
    rng = np.random.default_rng(seed)
    labels = (rng.random(len(x)) < 1 / (1 + np.exp(-risk))).astype(np.int64)
    return x, labels


def train(features_dir: Path, out_dir: Path) -> list[TrainedVersion]:
    """Trains, evaluates and exports the two versions; returns them in version order."""
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    source = features_dir / "customer_stats.parquet"
    x, y = training_data(source)
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(x))
    cut = int(len(x) * 0.8)
    train_rows, test_rows = order[:cut], order[cut:]
    candidates = [
        (
            make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=500)),
            "logistic regression on standardized features",
            {"algorithm": "logistic_regression", "C": "1.0"},
        ),
        (
            GradientBoostingClassifier(n_estimators=60, max_depth=2, random_state=SEED),
            "gradient-boosted trees (candidate)",
            {"algorithm": "gradient_boosting", "n_estimators": "60", "max_depth": "2"},
        ),
    ]
    data_version = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = []
    for number, (estimator, description, params) in enumerate(candidates, start=1):
        estimator.fit(x[train_rows], y[train_rows])
        scores = estimator.predict_proba(x[test_rows])[:, 1]
        predicted = (scores >= 0.5).astype(np.int64)
        metrics = [
            pb.Metric(name="auc", value=float(roc_auc_score(y[test_rows], scores))),
            pb.Metric(name="accuracy", value=float(accuracy_score(y[test_rows], predicted))),
        ]
        card = x[test_rows, 5] > 0.5
        for value, rows in (("yes", card), ("no", ~card)):
            if len(set(y[test_rows][rows])) == 2:
                metrics.append(
                    pb.Metric(
                        name="auc",
                        value=float(roc_auc_score(y[test_rows][rows], scores[rows])),
                        slice={"card_on_file": value},
                    )
                )
        path = out_dir / f"{MODEL}-v{number}.onnx"
        onnx.save(_to_onnx(estimator), path)
        trained.append(
            TrainedVersion(
                path,
                pb.UploadMetadata(
                    model=MODEL,
                    description=f"{description}, trained by modelplane up on synthetic labels",
                    lineage=pb.Lineage(
                        training_data_ref=str(source),
                        training_data_version=data_version,
                        code_revision="modelplane.examples.fraud",
                        params={**params, "rows": str(len(train_rows)), "seed": str(SEED)},
                        metrics=metrics,
                    ),
                    card=pb.ModelCard(
                        intended_use="Demo: scores a customer's fraud risk from the "
                        "customer_scorer feature bundle.",
                        out_of_scope_uses="Any real decision: the labels are synthetic.",
                        limitations="Trained on 1,000 synthetic customers; the risk the "
                        "labels follow is known and simple.",
                        evaluation_data="A random 20% of the view's history, held out.",
                    ),
                    feature_statistics=reference_statistics(
                        x[train_rows], estimator.predict_proba(x[train_rows])[:, 1]
                    ),
                    feature_input=pb.FeatureInput(
                        bundle=BUNDLE, missing_policy=pb.MISSING_FEATURE_POLICY_REJECT
                    ),
                ),
            )
        )
    return trained


def reference_statistics(
    x: np.ndarray, scores: np.ndarray, bins: int = 10
) -> list[pb.FeatureStatistics]:
    """Per feature, and for the score, quantile bin edges of the training rows and the
    rows in each bin: what monitoring compares live inputs and outputs with. Named as
    inference logs them: a bundle's columns by feature reference, an output column as
    output[column]."""
    statistics = []
    named = [(f"{VIEW}:{name}", x[:, column]) for column, name in enumerate(COLUMNS)]
    for name, column_values in [*named, (f"{SCORE_OUTPUT}[1]", scores)]:
        values = column_values.astype(np.float64)
        edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)))
        if len(edges) < 2:
            edges = np.array([edges[0], edges[0] + 1.0])
        counts, _ = np.histogram(values, bins=edges)
        statistics.append(
            pb.FeatureStatistics(
                name=name, bin_edges=edges.tolist(), counts=[int(c) for c in counts]
            )
        )
    return statistics


def _to_onnx(estimator: object) -> onnx.ModelProto:
    """float32 [batch, 8] "input" → "label" [batch] and "probabilities" [batch, 2]."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    model = to_onnx(
        estimator,
        initial_types=[("input", FloatTensorType([None, len(COLUMNS)]))],
        options={"zipmap": False},
        target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    model.ir_version = IR_VERSION
    return model

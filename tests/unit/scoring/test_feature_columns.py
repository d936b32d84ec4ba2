"""A batch job's tabular model input stays in columns: blocks and rows cut from them are
the rows' values, and the model fed column by column answers bit for bit as it does
fed rows."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pytest
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from modelplane.examples.models import mlp
from modelplane.scoring.batch import (
    FeatureColumns,
    ModelFeed,
    feature_input,
    rows_of,
    start_model,
)
from modelplane.scoring.model import ScoringModel

NAMES = ("a", "b", "c", "d")


def table_in_batches(rng: np.random.Generator, sizes: list[int]) -> pa.Table:
    batches = [
        pa.record_batch({name: rng.standard_normal(size).astype(np.float32) for name in NAMES})
        for size in sizes
    ]
    return pa.Table.from_batches(batches)


def as_matrix(table: pa.Table) -> np.ndarray:
    return np.column_stack([table[name].to_numpy() for name in NAMES]).astype(np.float32)


def feed(width: int = len(NAMES)) -> ModelFeed:
    return ModelFeed("input", np.float32, width, NAMES)


def test_blocks_and_rows_cut_across_record_batches_are_the_rows_values():
    table = table_in_batches(np.random.default_rng(0), [5, 0, 7, 1, 9])
    x = feature_input(table, feed())
    assert isinstance(x, FeatureColumns)
    expected = as_matrix(table)
    assert x.shape == expected.shape and len(x) == 22
    for begin, end in [(0, 22), (0, 5), (3, 13), (12, 13), (13, 22), (7, 7)]:
        block = x.block(begin, end)
        assert block.flags.c_contiguous
        np.testing.assert_array_equal(block, expected[begin:end].T)
    rows = np.array([21, 0, 12, 5, 5, 13])  # any order, repeats
    np.testing.assert_array_equal(rows_of(x, rows), expected[rows])
    np.testing.assert_array_equal(x.matrix(), expected)
    assert x.matrix().flags.c_contiguous


def test_integer_boolean_and_missing_values_become_the_models_floats():
    table = pa.table(
        {
            "a": pa.array([1, 2, 3], pa.int64()),
            "b": pa.array([True, False, True]),
            "c": pa.array([0.5, None, 1.5], pa.float64()),
            "d": pa.array([7, None, 9], pa.int32()),
        }
    )
    x = feature_input(table, feed())
    assert isinstance(x, FeatureColumns)
    np.testing.assert_array_equal(
        x.matrix(),
        np.array([[1, 1, 0.5, 7], [2, 0, np.nan, np.nan], [3, 1, 1.5, 9]], np.float32),
    )


def test_an_empty_chunk_has_no_rows():
    empty = pa.schema([(name, pa.float32()) for name in NAMES]).empty_table()
    x = feature_input(empty, feed())
    assert isinstance(x, FeatureColumns)
    assert x.shape == (0, len(NAMES))
    assert x.block(0, 0).shape == (len(NAMES), 0)


def loaded(path: Path, proto: onnx.ModelProto) -> ScoringModel:
    onnx.save(proto, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ScoringModel("m", 1, digest, path, None, session)


def sklearn_pipeline() -> onnx.ModelProto:
    # Its first operator is a Scaler (ai.onnx.ml), not a Gemm: ONNX Runtime cannot fold
    # the transpose into it and runs it as an operator of its own.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, len(NAMES))).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
    proto = to_onnx(pipeline, x[:1], options={"zipmap": False})
    proto.graph.input[0].name = "input"
    for node in proto.graph.node:
        node.input[:] = ["input" if i == "X" else i for i in node.input]
    return proto


@pytest.mark.parametrize(
    "make",
    [lambda: mlp((len(NAMES), 16, 16, 3), seed=1, name="m"), sklearn_pipeline],
    ids=["mlp", "sklearn-pipeline"],
)
def test_the_model_fed_columns_answers_bit_for_bit_as_fed_rows(tmp_path, make):
    model = loaded(tmp_path / "model.onnx", make())
    table = table_in_batches(np.random.default_rng(1), [300, 211, 489])
    x = feature_input(table, feed())
    rows = as_matrix(table)
    expected = dict(zip(model.output_names, model.session.run(None, {"input": rows}), strict=True))
    with ThreadPoolExecutor(2) as pool:
        for got in (
            start_model(model, feed(), x, batch_rows=128, pool=pool, threads=2)(),
            start_model(model, feed(), x, batch_rows=1_000)(),
        ):
            assert got.keys() == expected.keys()
            for name, values in expected.items():
                np.testing.assert_array_equal(got[name], values)


def test_a_model_file_changed_since_it_was_verified_is_not_loaded_again(tmp_path):
    path = tmp_path / "model.onnx"
    model = loaded(path, mlp((len(NAMES), 8, 2), seed=1, name="m"))
    onnx.save(mlp((len(NAMES), 8, 2), seed=2, name="m"), path)
    with pytest.raises(ValueError, match="changed since it was verified"):
        model.by_columns("input")

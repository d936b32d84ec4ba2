"""The demo features `modelplane up` serves: the YAML applies, the source materializes,
and every demo customer's bundle tensor fits the demo scorer model's input."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort

from modelplane.examples import features
from modelplane.examples.models import ensure_demo_repository
from modelplane.feature.v1 import feature_pb2 as pb
from modelplane.feature.v1 import feature_pb2_grpc as pb_grpc
from modelplane.services.feature.main import build
from tests.integration.feature.messages import int_keys
from tests.integration.feature.servers import settings_for, unique_prefix
from tests.support import running_sync


def test_every_demo_customer_is_served_as_the_scorers_input(tmp_path: Path) -> None:
    definitions = features.ensure_demo_features(tmp_path / "features")
    written = definitions.read_bytes()
    assert features.ensure_demo_features(tmp_path / "features") == definitions
    assert definitions.read_bytes() == written  # a later run keeps the files

    settings = settings_for("sqlite", tmp_path / "state", unique_prefix()).model_copy(
        update={"definitions_file": str(definitions)}
    )
    ids = list(range(1, features.CUSTOMERS + 1))
    with running_sync(build(settings)) as address, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        (view,) = stub.Materialize(pb.MaterializeRequest(), timeout=60).views
        assert (view.rows_read, view.rows_written) == (
            features.CUSTOMERS * features.ROWS_PER_CUSTOMER,
            features.CUSTOMERS,
        )
        tensor = stub.GetBundleTensor(
            pb.GetBundleTensorRequest(
                bundle=features.SCORER, entity_keys=[int_keys("customer_id", ids)]
            ),
            timeout=10,
        )
    assert list(tensor.shape) == [features.CUSTOMERS, features.WIDTH]
    assert set(tensor.statuses) == {pb.FEATURE_STATUS_PRESENT}
    values = np.array(tensor.values, np.float32).reshape(tuple(tensor.shape))

    ensure_demo_repository(tmp_path / "models")
    scorer = tmp_path / "models" / features.SCORER / "1" / "model.onnx"
    (model_input,) = onnx.load(scorer).graph.input
    assert model_input.type.tensor_type.shape.dim[1].dim_value == features.WIDTH
    session = ort.InferenceSession(scorer, providers=["CPUExecutionProvider"])
    (scores,) = session.run(None, {"input": values})
    assert scores.shape == (features.CUSTOMERS, 2) and np.isfinite(scores).all()

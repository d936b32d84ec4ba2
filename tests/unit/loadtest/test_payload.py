import numpy as np
import pytest

from inference import grpc_service_pb2 as pb
from modelplane.loadtest.payload import (
    NUMPY_DTYPES,
    PayloadError,
    build_payload,
    random_raw,
    resolve_shape,
)

Tensor = pb.ModelMetadataResponse.TensorMetadata


def _metadata(*inputs: tuple[str, str, list[int]]) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name="m",
        versions=["1"],
        inputs=[Tensor(name=n, datatype=d, shape=s) for n, d, s in inputs],
        outputs=[Tensor(name="y", datatype="FP32", shape=[-1, 1])],
    )


def test_leading_variable_dimension_is_the_batch() -> None:
    assert resolve_shape("x", [-1, 64], batch_rows=5) == (5, 64)
    assert resolve_shape("x", [-1, -1, 3], batch_rows=2) == (2, 1, 3)
    assert resolve_shape("x", [3, 4], batch_rows=1) == (3, 4)
    assert resolve_shape("x", [-1, -1], batch_rows=1, override=[2, 7]) == (2, 7)


def test_shapes_that_cannot_be_built() -> None:
    with pytest.raises(PayloadError, match="fixed first dimension"):
        resolve_shape("x", [3, 4], batch_rows=2)
    with pytest.raises(PayloadError, match="dimensions"):
        resolve_shape("x", [-1, 4], batch_rows=1, override=[1])
    with pytest.raises(PayloadError, match="does not fit"):
        resolve_shape("x", [-1, 4], batch_rows=1, override=[1, 5])
    with pytest.raises(PayloadError, match="scalar"):
        resolve_shape("x", [], batch_rows=2)


def test_request_round_trips_with_the_right_bytes() -> None:
    metadata = _metadata(("a", "FP32", [-1, 64]), ("b", "INT64", [-1, 3]))
    payload = build_payload(metadata, batch_rows=4, model_version="2")
    request = pb.ModelInferRequest.FromString(payload.message)
    assert request.model_name == "m" and request.model_version == "2"
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("a", "FP32", [4, 64]),
        ("b", "INT64", [4, 3]),
    ]
    assert len(request.raw_input_contents[0]) == 4 * 64 * 4
    assert len(request.raw_input_contents[1]) == 4 * 3 * 8
    values = np.frombuffer(request.raw_input_contents[0], dtype="<f4")
    assert np.isfinite(values).all() and values.std() > 0
    assert payload.rows == 4 and payload.shapes == {"a": (4, 64), "b": (4, 3)}


@pytest.mark.parametrize("datatype", sorted(NUMPY_DTYPES))
def test_every_numeric_datatype_has_the_right_length(datatype: str) -> None:
    raw = random_raw(datatype, (3, 5), np.random.default_rng(0))
    assert len(raw) == 15 * NUMPY_DTYPES[datatype].itemsize
    if datatype in ("FP16", "FP32", "FP64"):
        assert np.isfinite(np.frombuffer(raw, NUMPY_DTYPES[datatype])).all()


def test_bytes_elements_carry_length_prefixes() -> None:
    raw = random_raw("BYTES", (2, 3), np.random.default_rng(0))
    offset, elements = 0, 0
    while offset < len(raw):
        length = int.from_bytes(raw[offset : offset + 4], "little")
        assert 1 <= length <= 16
        offset += 4 + length
        elements += 1
    assert offset == len(raw) and elements == 6


def test_bad_requests_are_refused_before_any_load() -> None:
    with pytest.raises(PayloadError, match="unsupported datatype"):
        build_payload(_metadata(("a", "COMPLEX", [-1, 2])))
    with pytest.raises(PayloadError, match="unknown inputs"):
        build_payload(_metadata(("a", "FP32", [-1, 2])), shape_overrides={"z": [1, 2]})
    with pytest.raises(PayloadError, match="no inputs"):
        build_payload(_metadata())
    with pytest.raises(PayloadError, match="at least 1"):
        build_payload(_metadata(("a", "FP32", [-1, 2])), batch_rows=0)


def test_same_seed_same_bytes() -> None:
    metadata = _metadata(("a", "FP32", [-1, 8]))
    assert build_payload(metadata, seed=3).message == build_payload(metadata, seed=3).message
    assert build_payload(metadata, seed=3).message != build_payload(metadata, seed=4).message

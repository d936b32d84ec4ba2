"""A typed, synchronous client of the inference service, used by the CLI and any Python
caller. It makes KServe v2 calls only (the `inference` stubs), nothing modelplane-specific
beyond two optional parameters: `routing_key` on requests, `route` on responses.

numpy in, numpy out: tensors travel as raw contents in each datatype's little-endian
layout, BYTES as elements each prefixed with its 4-byte little-endian length (the same
encoding as the server's `datatypes.py` and tritonclient's).

Every call has a deadline (`timeout`). Reads (metadata, config, index, readiness) retry
UNAVAILABLE with exponential backoff and full jitter inside that deadline; `predict` is
sent once, as a non-idempotent call must be. The first call waits for the connection at
most `connect_timeout` seconds and raises `CannotConnect` if nothing answers, rather
than spending the whole deadline on an address where no server listens.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from inference import model_config_pb2 as mc
from modelplane.client.channel import (  # noqa: F401 - re-exported
    CONNECT_TIMEOUT_S,
    CannotConnect,
    ServiceClient,
)
from modelplane.client.credentials import ClientCredentials
from modelplane.kserve_types import CONTENTS_FIELD, RAW_DTYPES

DEFAULT_ADDRESS = "127.0.0.1:8001"

# Request and response parameters of modelplane's inference service.
ROUTING_KEY_PARAMETER = "routing_key"
ROUTE_PARAMETER = "route"
FEATURE_STATUSES_PARAMETER = "feature_statuses"


# Every KServe v2 datatype the server supports; FP16 has no typed contents field, so
# this client sends everything raw.
WIRE_DTYPES: dict[str, np.dtype] = {**RAW_DTYPES, "BYTES": np.dtype(np.object_)}
DATATYPES = tuple(WIRE_DTYPES)

_LENGTH = struct.Struct("<I")


class TensorError(ValueError):
    """An array this client cannot encode, or response data that does not decode."""


# --- tensors ------------------------------------------------------------------------------


def datatype_of(array: np.ndarray) -> str:
    """The KServe datatype of a numpy array: str, bytes and object arrays are BYTES."""
    dtype = array.dtype
    if dtype.kind in "OUS":
        return "BYTES"
    if dtype.kind == "b":
        return "BOOL"
    names = {"u": "UINT", "i": "INT", "f": "FP"}
    if dtype.kind in names:
        name = f"{names[dtype.kind]}{dtype.itemsize * 8}"
        if name in WIRE_DTYPES:
            return name
    raise TensorError(f"numpy dtype {dtype} has no KServe v2 datatype")


def encode_bytes(array: np.ndarray) -> bytes:
    """BYTES elements (str as UTF-8, or bytes), each after its 4-byte little-endian length."""
    parts: list[bytes] = []
    for item in array.ravel():
        if isinstance(item, str):
            data = item.encode("utf-8")
        elif isinstance(item, bytes | bytearray | memoryview):
            data = bytes(item)
        else:
            raise TensorError(
                f"a BYTES element must be str or bytes, not {type(item).__name__}: {item!r}"
            )
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_bytes(raw: bytes, count: int) -> np.ndarray:
    """`count` length-prefixed elements as an object array of bytes."""
    out = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    for index in range(count):
        if offset + 4 > len(raw):
            raise TensorError(f"BYTES data ends before element {index} of {count}")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(raw):
            raise TensorError(f"BYTES element {index} claims {length} bytes beyond the data")
        out[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise TensorError(f"BYTES data holds more than {count} elements")
    return out


def encode_tensor(array: np.ndarray, datatype: str | None = None) -> tuple[str, bytes]:
    """The datatype (from the array's dtype unless given) and the raw wire bytes."""
    array = np.asarray(array)
    wire = datatype or datatype_of(array)
    if wire not in WIRE_DTYPES:
        raise TensorError(f"datatype {wire} is not supported (one of {', '.join(DATATYPES)})")
    if wire == "BYTES":
        if array.dtype.kind not in "OUS":
            raise TensorError(f"BYTES needs str, bytes or object data, not {array.dtype}")
        return wire, encode_bytes(array.astype(object))
    return wire, np.ascontiguousarray(array, dtype=WIRE_DTYPES[wire]).tobytes()


def decode_tensor(datatype: str, shape: Iterable[int], raw: bytes) -> np.ndarray:
    """Raw wire bytes as an array of `shape`: a read-only view of `raw` for numeric types,
    an object array of bytes for BYTES."""
    dims = tuple(int(d) for d in shape)
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if datatype == "BYTES":
        return decode_bytes(raw, count).reshape(dims)
    dtype = WIRE_DTYPES.get(datatype)
    if dtype is None:
        raise TensorError(f"datatype {datatype} is not supported (one of {', '.join(DATATYPES)})")
    if len(raw) != count * dtype.itemsize:
        raise TensorError(
            f"{len(raw)} bytes of {datatype} data, but shape {list(dims)} needs "
            f"{count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(dims)


def _decode_typed(tensor: pb.ModelInferResponse.InferOutputTensor) -> np.ndarray:
    field_name = CONTENTS_FIELD.get(tensor.datatype)
    if field_name is None:
        raise TensorError(f"output '{tensor.name}': {tensor.datatype} cannot travel as contents")
    values = list(getattr(tensor.contents, field_name))
    if tensor.datatype == "BYTES":
        array = np.empty(len(values), dtype=object)
        array[:] = values
    else:
        array = np.array(values, dtype=WIRE_DTYPES[tensor.datatype])
    return array.reshape(tuple(tensor.shape))


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """One ModelInfer answer. `model_version` is the version that computed it; `route`
    the alias or route that answered ("" when the server names none)."""

    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str
    route: str
    id: str
    datatypes: dict[str, str] = field(default_factory=dict)


def _parameter(parameters: Mapping[str, pb.InferParameter], name: str) -> Any:
    if name not in parameters:
        return None
    value = parameters[name]
    choice = value.WhichOneof("parameter_choice")
    return getattr(value, choice) if choice else None


def prediction_of(response: pb.ModelInferResponse) -> Prediction:
    raw = response.raw_output_contents
    outputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for index, tensor in enumerate(response.outputs):
        try:
            if raw:
                outputs[tensor.name] = decode_tensor(tensor.datatype, tensor.shape, raw[index])
            else:
                outputs[tensor.name] = _decode_typed(tensor)
        except IndexError:
            raise TensorError(
                f"the response has {len(raw)} raw contents for {len(response.outputs)} outputs"
            ) from None
        except TensorError as exc:
            raise TensorError(f"output '{tensor.name}': {exc}") from None
        datatypes[tensor.name] = tensor.datatype
    route = _parameter(response.parameters, ROUTE_PARAMETER)
    return Prediction(
        outputs=outputs,
        model_name=response.model_name,
        model_version=response.model_version,
        route=str(route) if route is not None else "",
        id=response.id,
        datatypes=datatypes,
    )


def infer_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    version: str = "",
    routing_key: str | None = None,
    outputs: Iterable[str] | None = None,
    request_id: str = "",
    feature_statuses: bool = False,
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, value in inputs.items():
        array = np.asarray(value)
        try:
            datatype, raw = encode_tensor(array)
        except TensorError as exc:
            raise TensorError(f"input '{name}': {exc}") from None
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(raw)
    for name in outputs or ():
        request.outputs.add(name=name)
    if routing_key is not None:
        request.parameters[ROUTING_KEY_PARAMETER].string_param = routing_key
    if feature_statuses:
        request.parameters[FEATURE_STATUSES_PARAMETER].bool_param = True
    return request


def entity_keys(keys: Mapping[str, Sequence[int | str] | np.ndarray]) -> dict[str, np.ndarray]:
    """Join key columns as the inputs an enriched model takes: integers as INT64,
    strings as BYTES, one row per entity."""
    columns: dict[str, np.ndarray] = {}
    for name, values in keys.items():
        array = np.asarray(values)
        if array.dtype.kind in "iu":
            columns[name] = array.astype(np.int64).reshape(-1)
        elif array.dtype.kind in "USO":
            columns[name] = np.array(
                [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in array.ravel()],
                dtype=object,
            )
        else:
            raise TensorError(f"entity key '{name}': integers or strings, not {array.dtype}")
    return columns


def config_parameter(config: mc.ModelConfig, name: str) -> str | None:
    """A string parameter of a served model's configuration; None when absent."""
    if name not in config.parameters:
        return None
    return config.parameters[name].string_value


# --- the client ---------------------------------------------------------------------------


class InferenceClient(ServiceClient):
    """A KServe v2 client (see ServiceClient for deadlines, connection and retries)."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        timeout: float = 30.0,
        connect_timeout: float | None = CONNECT_TIMEOUT_S,
        credentials: ClientCredentials | None = None,
    ) -> None:
        super().__init__(address, timeout, connect_timeout, credentials=credentials)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    # --- calls ----------------------------------------------------------------------------

    def predict(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        version: str = "",
        routing_key: str | None = None,
        outputs: Iterable[str] | None = None,
        request_id: str = "",
        feature_statuses: bool = False,
    ) -> Prediction:
        """One inference. Each input's datatype follows its array's dtype (str or bytes
        arrays are BYTES); `outputs` names the outputs wanted (default: all);
        `routing_key` is sent as the request parameter `routing_key`. Never retried."""
        request = infer_request(
            model, inputs, version, routing_key, outputs, request_id, feature_statuses
        )
        response: pb.ModelInferResponse = self._once(self.stub.ModelInfer, request)
        return prediction_of(response)

    def predict_entities(
        self,
        model: str,
        keys: Mapping[str, Sequence[int | str] | np.ndarray],
        version: str = "",
        routing_key: str | None = None,
        feature_statuses: bool = False,
        request_id: str = "",
    ) -> Prediction:
        """One inference of a model whose input comes from a feature bundle, by entity
        ids (e.g. {"customer_id": [1, 2]}): the server fetches the features.
        `feature_statuses` adds the INT32 output `feature_status` ([rows, features]:
        1 PRESENT, 2 NOT_FOUND, 3 NULL, 4 STALE). Never retried."""
        return self.predict(
            model,
            entity_keys(keys),
            version,
            routing_key,
            request_id=request_id,
            feature_statuses=feature_statuses,
        )

    def metadata(self, model: str, version: str = "") -> pb.ModelMetadataResponse:
        """The model's versions, platform, inputs and outputs (-1: a variable dimension)."""
        request = pb.ModelMetadataRequest(name=model, version=version)
        return self._idempotent(self.stub.ModelMetadata, request)

    def config(self, model: str, version: str = "") -> mc.ModelConfig:
        """The served configuration; see `config_parameter` for its string parameters."""
        request = pb.ModelConfigRequest(name=model, version=version)
        response: pb.ModelConfigResponse = self._idempotent(self.stub.ModelConfig, request)
        return response.config

    def index(self, ready_only: bool = False) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        """Every model version the server knows, with its state and the reason for it."""
        request = pb.RepositoryIndexRequest(ready=ready_only)
        response: pb.RepositoryIndexResponse = self._idempotent(self.stub.RepositoryIndex, request)
        return list(response.models)

    def ready(self, model: str, version: str = "") -> bool:
        request = pb.ModelReadyRequest(name=model, version=version)
        response: pb.ModelReadyResponse = self._idempotent(self.stub.ModelReady, request)
        return bool(response.ready)

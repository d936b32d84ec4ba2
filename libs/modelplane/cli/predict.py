"""`modelplane predict MODEL`: one inference from the command line, with inputs from JSON,
.npy files or random data, printing the outputs and which version and route served."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from inference import grpc_service_pb2 as pb
from modelplane.client.inference import (
    DEFAULT_ADDRESS,
    WIRE_DTYPES,
    CannotConnect,
    InferenceClient,
    Prediction,
    TensorError,
    decode_tensor,
    entity_keys,
)
from modelplane.loadtest.payload import PayloadError, random_raw, resolve_shape

# Text output shows at most this many elements per tensor (numpy's summarised form);
# --json always carries every value.
PRINT_THRESHOLD = 200
PRINT_EDGE_ITEMS = 4

EPILOG = """\
inputs:
  --input x='[[1.0, 2.0, 3.0]]'      inline JSON: a nested list with the full shape, or one row
  --input x=@rows.json                a JSON file: an array of rows (or the full nested shape)
  --input x=@batch.npy                a numpy file, cast to the input's datatype
  --random [--rows 4]                 random data for every input not given, of the model's
                                      datatypes and shapes (-1: --rows for the first dimension,
                                      1 for the others)
  --entity customer_id=42,43          entity ids, for a model whose input comes from a feature
                                      bundle (the server fetches the features; one row each)
examples:
  modelplane predict demo --random --rows 2
  modelplane predict fraud --input input=@rows.json --routing-key customer-42 --json
  modelplane predict fraud --entity customer_id=42 --feature-statuses
"""


class InputError(ValueError):
    """An input the command line gave that cannot become the tensor the model takes."""


# --- shared by the inference commands -----------------------------------------------------


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help="inference service host:port (default %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per call (default %(default)s)"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        help="seconds to wait for the connection (default %(default)s)",
    )


def run_with_client(
    args: argparse.Namespace, action: Callable[[InferenceClient], int | None]
) -> int:
    """Runs `action` with a client; every failure becomes one line on stderr: exit code 1
    for the server's or the network's errors, 2 for what the caller gave."""
    try:
        with InferenceClient(
            args.address, timeout=args.timeout, connect_timeout=args.connect_timeout
        ) as client:
            return int(action(client) or 0)
    except CannotConnect as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except (InputError, TensorError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


# --- inputs -------------------------------------------------------------------------------


def _split(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise InputError(
            f"--input must look like NAME=JSON, NAME=@FILE.json or NAME=@FILE.npy, got {text!r}"
        )
    return name, value


def _load(name: str, value: str) -> Any:
    """The JSON value or numpy array an --input names."""
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            if path.suffix == ".npy":
                return np.load(path, allow_pickle=False)
            text = path.read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:
            raise InputError(f"input '{name}': cannot read {path}: {exc}") from None
        where = str(path)
    else:
        text = value
        where = repr(value if len(value) <= 40 else value[:37] + "...")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"input '{name}': {where} is not valid JSON ({exc})") from None


def _cast(name: str, value: Any, datatype: str) -> np.ndarray:
    dtype = WIRE_DTYPES.get(datatype)
    if dtype is None:
        raise InputError(f"input '{name}' has datatype {datatype}, which this client cannot send")
    if datatype == "BYTES":
        try:
            array = np.array(value, dtype=object)
        except ValueError as exc:
            raise InputError(f"input '{name}': {exc}") from None
        if any(not isinstance(v, str | bytes) for v in array.ravel()):
            raise InputError(f"input '{name}' is BYTES: give strings")
        return array
    try:
        given = np.asarray(value)
    except ValueError as exc:  # ragged nesting
        raise InputError(f"input '{name}': rows of different lengths ({exc})") from None
    if given.dtype.kind not in "biuf":
        raise InputError(f"input '{name}' is {datatype}: give numbers, not {given.dtype}")
    if datatype == "BOOL" and given.dtype.kind != "b":
        raise InputError(f"input '{name}' is BOOL: give true/false values")
    if given.dtype.kind == "f" and dtype.kind != "f":
        raise InputError(f"input '{name}' is {datatype}: give integers, not fractions")
    if given.dtype.kind in "iu" and dtype.kind in "iu" and given.size:
        info = np.iinfo(dtype)
        if given.min() < info.min or given.max() > info.max:
            raise InputError(
                f"input '{name}' is {datatype}: a value is outside {info.min}..{info.max}"
            )
    return given.astype(dtype)


def _fit(name: str, array: np.ndarray, declared: Sequence[int]) -> np.ndarray:
    """Shapes an array to the declared rank: the full shape passes as it is; with a
    variable first dimension (rows), one row gets a leading axis and flat rows are
    reshaped to the row shape. The server checks the dimensions themselves."""
    rank = len(declared)
    if array.size == 0:
        raise InputError(f"input '{name}' is empty")
    if array.ndim == rank:
        return array
    batched = rank > 0 and declared[0] < 0
    row = list(declared[1:])
    if batched and array.ndim == rank - 1:
        return array[np.newaxis, ...]
    flat_rows = batched and array.ndim == 2 and all(d >= 0 for d in row)
    if flat_rows and array.shape[1] == int(np.prod(row, dtype=np.int64)):
        return array.reshape([array.shape[0], *row])
    raise InputError(
        f"input '{name}': shape {list(array.shape)} does not fit the model's {list(declared)}"
    )


def build_inputs(
    metadata: pb.ModelMetadataResponse,
    given: Sequence[str],
    random: bool,
    rows: int,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    declared = {tensor.name: tensor for tensor in metadata.inputs}
    inputs: dict[str, np.ndarray] = {}
    for text in given:
        name, value = _split(text)
        tensor = declared.get(name)
        if tensor is None:
            takes = ", ".join(repr(n) for n in declared) or "none"
            raise InputError(f"model '{metadata.name}' has no input '{name}'; it takes {takes}")
        if name in inputs:
            raise InputError(f"input '{name}' is given twice")
        loaded = _load(name, value)
        inputs[name] = _fit(name, _cast(name, loaded, tensor.datatype), list(tensor.shape))
    missing = [name for name in declared if name not in inputs]
    if missing and not random:
        raise InputError(
            f"model '{metadata.name}' also takes {', '.join(repr(n) for n in missing)}: "
            "give it with --input NAME=... or use --random"
        )
    rng = np.random.default_rng(seed)
    for name in missing:
        tensor = declared[name]
        try:
            shape = resolve_shape(name, list(tensor.shape), rows)
            raw = random_raw(tensor.datatype, shape, rng)
            inputs[name] = decode_tensor(tensor.datatype, shape, raw)
        except (PayloadError, TensorError) as exc:
            raise InputError(f"input '{name}': {exc}") from None
    return inputs


# --- output -------------------------------------------------------------------------------


def _text_elements(array: np.ndarray) -> np.ndarray:
    """BYTES as text where it is UTF-8 (ONNX string tensors always are)."""
    if array.dtype != object:
        return array
    out = np.empty(array.shape, dtype=object)
    for index, value in np.ndenumerate(array):
        out[index] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return out


def format_tensor(array: np.ndarray) -> str:
    return np.array2string(
        _text_elements(array),
        threshold=PRINT_THRESHOLD,
        edgeitems=PRINT_EDGE_ITEMS,
        max_line_width=100,
        separator=", ",
    )


def prediction_json(prediction: Prediction) -> dict[str, Any]:
    return {
        "model": prediction.model_name,
        "model_version": prediction.model_version,
        "route": prediction.route or None,
        "id": prediction.id,
        "outputs": {
            name: {
                "datatype": prediction.datatypes.get(name, ""),
                "shape": list(array.shape),
                "data": _text_elements(array).tolist(),
            }
            for name, array in prediction.outputs.items()
        },
    }


def print_prediction(prediction: Prediction) -> None:
    print(
        f"model {prediction.model_name}  version {prediction.model_version or '-'}  "
        f"route {prediction.route or '-'}"
    )
    for name, array in prediction.outputs.items():
        datatype = prediction.datatypes.get(name, "")
        print(f"{name}  {datatype} {list(array.shape)}")
        print(format_tensor(array))


# --- command ------------------------------------------------------------------------------


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "predict",
        help="run one inference on a served model and print its outputs",
        description="Send one ModelInfer request to an inference service (any KServe v2 "
        "gRPC endpoint) and print each output, the version that computed it and the route "
        "that answered. Input datatypes and shapes come from the model's metadata.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="model name")
    add_connection_flags(parser)
    parser.add_argument(
        "-i",
        "--input",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an input: inline JSON, @FILE.json or @FILE.npy (repeatable)",
    )
    parser.add_argument(
        "-e",
        "--entity",
        action="append",
        default=[],
        metavar="KEY=ID[,ID...]",
        help="entity ids instead of the input tensor, for a model fed by a feature bundle "
        "(integers are INT64, anything else BYTES; repeatable for composite keys)",
    )
    parser.add_argument(
        "--feature-statuses",
        action="store_true",
        help="with --entity: also return each feature's status (output feature_status)",
    )
    parser.add_argument(
        "--random", action="store_true", help="random data for every input not given"
    )
    parser.add_argument(
        "--rows", type=int, default=1, help="rows of random data (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data")
    parser.add_argument("--version", default="", help="model version (default: the server's)")
    parser.add_argument("--routing-key", help="sent as the request parameter routing_key")
    parser.add_argument(
        "-o", "--output", action="append", default=None, help="only this output (repeatable)"
    )
    parser.add_argument("--id", default="", help="request id, echoed in the response")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=run_predict)


def _entity(text: str) -> tuple[str, list[int] | list[str]]:
    name, value = _split(text)
    ids = [part.strip() for part in value.split(",") if part.strip()]
    if not ids:
        raise InputError(f"--entity {name}: give at least one id")
    if all(part.lstrip("-").isdigit() for part in ids):
        return name, [int(part) for part in ids]
    return name, ids


def run_predict(args: argparse.Namespace) -> int:
    if args.rows < 1:
        print("error: --rows must be at least 1", file=sys.stderr)
        return 2

    def predict(client: InferenceClient) -> int:
        if args.entity:
            if args.input or args.random:
                raise InputError("--entity replaces the input tensor: drop --input/--random")
            inputs = entity_keys(dict(_entity(text) for text in args.entity))
        else:
            metadata = client.metadata(args.model, args.version)
            inputs = build_inputs(metadata, args.input, args.random, args.rows, args.seed)
        prediction = client.predict(
            args.model,
            inputs,
            version=args.version,
            routing_key=args.routing_key,
            outputs=args.output,
            request_id=args.id,
            feature_statuses=args.feature_statuses,
        )
        if args.json:
            print(json.dumps(prediction_json(prediction)))
        else:
            print_prediction(prediction)
        return 0

    return run_with_client(args, predict)

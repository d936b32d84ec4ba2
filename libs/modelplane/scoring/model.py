"""The registered model a scoring job runs: resolved in the registry (`name@alias` or
`name/version`), downloaded once per digest into a local cache and verified (the
registry client checks the SHA-256 as it downloads; a cached file is hashed again before
it is used), then loaded into ONNX Runtime in process.

Batch and stream scoring use this, not the inference service's code (a service's
code is never imported from another place); they talk to the registry through its
client, as any user would.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from modelplane.client.registry import RegistryClient
from modelplane.registry.v1 import registry_pb2 as pb

COLUMNS_SUFFIX = "__columns"
"""Ends the name of the [n, rows] input of `ScoringModel.by_columns`."""


@dataclass(frozen=True)
class ModelRef:
    """`name@alias` or `name/version` (a bare name means `name@production`)."""

    name: str
    alias: str = ""
    version: int = 0

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        if "@" in text:
            name, alias = text.split("@", 1)
            if not name or not alias:
                raise ValueError(f"{text!r}: expected NAME@ALIAS")
            return cls(name, alias=alias)
        if "/" in text:
            name, number = text.rsplit("/", 1)
            if not name or not number.isdigit() or int(number) < 1:
                raise ValueError(f"{text!r}: expected NAME/VERSION with VERSION >= 1")
            return cls(name, version=int(number))
        if not text:
            raise ValueError("a model reference is NAME, NAME@ALIAS or NAME/VERSION")
        return cls(text, alias="production")

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.version}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def intra_op_threads() -> int:
    """Every CPU this process may use (affinity mask), for a job bounded by the model."""
    return max(1, len(os.sched_getaffinity(0)))


@dataclass
class ScoringModel:
    """A verified registry version, loaded."""

    name: str
    version: int
    sha256: str
    path: Path
    feature_input: pb.FeatureInput | None
    session: ort.InferenceSession
    _by_columns: dict[str, ort.InferenceSession] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(None, feeds)
        return dict(zip(self.output_names, outputs, strict=True))

    def by_columns(self, input_name: str) -> ort.InferenceSession:
        """The same model, loaded again, taking its [rows, n] input `input_name` as
        [n, rows] (column by column), with the same outputs.

        Tabular inputs come as columns (Parquet, Arrow). Interleaving them into rows
        in NumPy cost a light model's job more CPU than reading them (numpy's
        transposing copy: 5.5 ns a value). A Transpose in front of the input costs
        nothing: ONNX Runtime fuses it into the first Gemm or MatMul (it then reads
        its input transposed), and runs it with its own kernels where it cannot.
        The predictions are the model's own, bit for bit. Built once per input, from
        the cached artifact verified again."""
        with self._lock:
            found = self._by_columns.get(input_name)
            if found is None:
                data = self.path.read_bytes()
                if hashlib.sha256(data).hexdigest() != self.sha256:
                    raise ValueError(f"{self.path} changed since it was verified")
                model = columns_first(onnx.load_model_from_string(data), input_name)
                found = cpu_session(
                    model.SerializeToString(),
                    self.session.get_session_options().intra_op_num_threads,
                )
                self._by_columns[input_name] = found
            return found


def cpu_session(model: str | bytes, threads: int) -> ort.InferenceSession:
    """An ONNX Runtime session of `model` (a path or the model's bytes) on the CPU with
    `threads` intra-op threads: one way to load, so that a model loaded again (by
    columns, or as the benchmark's ceiling) runs as the job's does."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def columns_first(model: onnx.ModelProto, input_name: str) -> onnx.ModelProto:
    """`model` with its 2-D input `input_name` ([rows, n]) replaced by one of the same
    name plus COLUMNS_SUFFIX taking [n, rows], transposed into the original."""
    graph = model.graph
    (spec,) = [i for i in graph.input if i.name == input_name]
    dims = spec.type.tensor_type.shape.dim
    if len(dims) != 2:
        raise ValueError(f"input {input_name!r} has {len(dims)} dimensions; expected 2")
    columns = onnx.helper.make_tensor_value_info(
        input_name + COLUMNS_SUFFIX, spec.type.tensor_type.elem_type, None
    )
    columns.type.tensor_type.shape.dim.extend([dims[1], dims[0]])
    position = list(graph.input).index(spec)
    graph.input.remove(spec)
    graph.input.insert(position, columns)
    graph.node.insert(
        0,
        onnx.helper.make_node(
            "Transpose", [columns.name], [input_name], perm=[1, 0], name=columns.name
        ),
    )
    return model


def resolve(client: RegistryClient, ref: ModelRef) -> pb.ModelVersion:
    """The version `ref` names now (an alias is read once, at the start of a job)."""
    if ref.alias:
        return client.get_version(ref.name, alias=ref.alias)
    return client.get_version(ref.name, version=ref.version)


def fetch(
    client: RegistryClient, version: pb.ModelVersion, cache_dir: Path, threads: int = 0
) -> ScoringModel:
    """Downloads the version's artifact into `cache_dir/<sha256>.onnx` unless a file
    with that digest is there already, verifies it, and loads it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    expected = version.artifact.sha256
    path = cache_dir / f"{expected}.onnx"
    if not path.exists() or sha256_of(path) != expected:
        path.unlink(missing_ok=True)
        client.download(version.model, path, version=version.version)
    session = cpu_session(str(path), threads or intra_op_threads())
    return ScoringModel(
        name=version.model,
        version=version.version,
        sha256=expected,
        path=path,
        feature_input=version.feature_input if version.HasField("feature_input") else None,
        session=session,
    )

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelplane.client.registry import RegistryClient
from modelplane.registry.v1 import registry_pb2 as pb


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

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(None, feeds)
        return dict(zip(self.output_names, outputs, strict=True))


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
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or intra_op_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return ScoringModel(
        name=version.model,
        version=version.version,
        sha256=expected,
        path=path,
        feature_input=version.feature_input if version.HasField("feature_input") else None,
        session=session,
    )

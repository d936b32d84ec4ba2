"""What the chaos scenarios do to each service: an acknowledged write, reading every
acknowledged write back, a cheap call a normal client keeps making, and the methods
slow clients hold open.

- registry: CreateModel (most writes), and every tenth write a version upload (a tiny
  ONNX model) whose alias is then set; read back with ListModels, ListVersions and
  ListAliases.
- feature: WriteFeatures of 4 rows (new entities each time) into one view; read back
  with GetOnlineFeatures.
- monitoring: LogPredictions of 8 records; read back by sending a label for every
  acknowledged record (LogLabels counts labels whose prediction is not stored).
- inference: ModelInfer of one row of the heavy demo MLP (nothing to read back).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np

from inference import grpc_service_pb2 as ipb
from inference import grpc_service_pb2_grpc as ipb_grpc
from modelplane.examples.models import HEAVY_MLP, mlp
from modelplane.feature.v1 import feature_pb2 as fpb
from modelplane.feature.v1 import feature_pb2_grpc as fpb_grpc
from modelplane.loadtest.chaos.ledger import AckLedger, lost_keys
from modelplane.monitoring.v1 import monitoring_pb2 as mpb
from modelplane.monitoring.v1 import monitoring_pb2_grpc as mpb_grpc
from modelplane.registry.v1 import registry_pb2 as rpb
from modelplane.registry.v1 import registry_pb2_grpc as rpb_grpc

ACTOR = (("x-modelplane-actor", "chaos"),)
HEAVY_MODEL = "heavy"


@dataclass(frozen=True)
class SlowMethods:
    """Full method names slow clients hold: a unary one (headers, never a body) and,
    where the service has one, a method whose client streams (opened, never written)."""

    unary: str
    client_stream: str | None = None
    bidi: bool = False
    """client_stream is bidirectional (stream_stream) rather than stream_unary."""


class Workload(Protocol):
    service: str
    slow: SlowMethods
    writes: bool

    async def prepare(self, channel: grpc.aio.Channel) -> None:
        """What must exist before the load (definitions, a probe model)."""

    async def write(
        self, channel: grpc.aio.Channel, seq: int, timeout: float, ledger: AckLedger
    ) -> None:
        """One write (or call); every acknowledgement goes to `ledger`; raises
        grpc.aio.AioRpcError as the service answered."""

    async def probe(self, channel: grpc.aio.Channel, timeout: float) -> None:
        """A normal client's cheap call."""

    async def lost(self, channel: grpc.aio.Channel, acknowledged: Mapping[str, Any]) -> int:
        """Acknowledged writes the service no longer has."""


def _method(service: Any, name: str) -> str:
    return f"/{service.full_name}/{name}"


# --- registry -------------------------------------------------------------------------


class RegistryWorkload:
    service = "registry"
    writes = True
    _registry = rpb.DESCRIPTOR.services_by_name["RegistryService"]
    slow = SlowMethods(
        unary=_method(_registry, "GetModel"), client_stream=_method(_registry, "UploadVersion")
    )
    VERSIONED = "chaos-versions"
    PROBE = "chaos-probe"
    VERSION_EVERY = 10

    async def prepare(self, channel: grpc.aio.Channel) -> None:
        stub = rpb_grpc.RegistryServiceStub(channel)
        for name in (self.VERSIONED, self.PROBE):
            try:
                await stub.CreateModel(
                    rpb.CreateModelRequest(name=name), timeout=10, metadata=ACTOR
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise

    async def write(
        self, channel: grpc.aio.Channel, seq: int, timeout: float, ledger: AckLedger
    ) -> None:
        stub = rpb_grpc.RegistryServiceStub(channel)
        if seq % self.VERSION_EVERY:
            name = f"chaos-{seq}"
            await stub.CreateModel(
                rpb.CreateModelRequest(name=name, description=f"d{seq}"),
                timeout=timeout,
                metadata=ACTOR,
            )
            ledger.acknowledge(f"model:{name}", f"d{seq}")
            return
        blob = mlp((4, 8, 2), seed=seq, name="tiny").SerializeToString()
        digest = hashlib.sha256(blob).hexdigest()
        metadata = rpb.UploadMetadata(
            model=self.VERSIONED, sha256=digest, size_bytes=len(blob), description=f"v{seq}"
        )
        requests = [
            rpb.UploadVersionRequest(metadata=metadata),
            rpb.UploadVersionRequest(chunk=blob),
        ]
        uploaded = await stub.UploadVersion(iter(requests), timeout=timeout, metadata=ACTOR)
        version = int(uploaded.version.version)
        ledger.acknowledge(f"version:{version}", digest)
        await stub.SetAlias(
            rpb.SetAliasRequest(
                model=self.VERSIONED, alias=f"a{seq}", version=version, expected_version=0
            ),
            timeout=timeout,
            metadata=ACTOR,
        )
        ledger.acknowledge(f"alias:a{seq}", version)

    async def probe(self, channel: grpc.aio.Channel, timeout: float) -> None:
        stub = rpb_grpc.RegistryServiceStub(channel)
        await stub.GetModel(rpb.GetModelRequest(name=self.PROBE), timeout=timeout)

    async def lost(self, channel: grpc.aio.Channel, acknowledged: Mapping[str, Any]) -> int:
        stub = rpb_grpc.RegistryServiceStub(channel)
        found: dict[str, Any] = {}
        token = ""
        while True:
            models = await stub.ListModels(
                rpb.ListModelsRequest(page_size=500, page_token=token), timeout=30
            )
            found.update({f"model:{m.name}": m.description for m in models.models})
            token = models.next_page_token
            if not token:
                break
        while True:
            versions = await stub.ListVersions(
                rpb.ListVersionsRequest(model=self.VERSIONED, page_size=500, page_token=token),
                timeout=30,
            )
            found.update({f"version:{v.version}": v.artifact.sha256 for v in versions.versions})
            token = versions.next_page_token
            if not token:
                break
        aliases = await stub.ListAliases(rpb.ListAliasesRequest(model=self.VERSIONED), timeout=30)
        found.update({f"alias:{a.alias}": int(a.version) for a in aliases.aliases})
        return len(lost_keys(acknowledged, found))


# --- feature --------------------------------------------------------------------------


class FeatureWorkload:
    service = "feature"
    writes = True
    slow = SlowMethods(
        unary=_method(fpb.DESCRIPTOR.services_by_name["FeatureService"], "GetOnlineFeatures")
    )
    VIEW = "chaos_view"
    ROWS = 4
    READ_CHUNK = 5_000

    async def prepare(self, channel: grpc.aio.Channel) -> None:
        definitions = fpb.Definitions(
            entities=[
                fpb.Entity(
                    name="chaos_entity",
                    join_keys=[fpb.JoinKey(name="id", type=fpb.VALUE_TYPE_INT64)],
                )
            ],
            feature_views=[
                fpb.FeatureView(
                    name=self.VIEW,
                    entity="chaos_entity",
                    features=[fpb.Feature(name="value", type=fpb.VALUE_TYPE_DOUBLE)],
                )
            ],
        )
        stub = fpb_grpc.FeatureServiceStub(channel)
        await stub.ApplyDefinitions(
            fpb.ApplyDefinitionsRequest(definitions=definitions), timeout=10
        )

    @staticmethod
    def _ids(values: list[int]) -> fpb.EntityKeyColumn:
        return fpb.EntityKeyColumn(
            name="id", values=fpb.Values(type=fpb.VALUE_TYPE_INT64, int64_values=values)
        )

    async def write(
        self, channel: grpc.aio.Channel, seq: int, timeout: float, ledger: AckLedger
    ) -> None:
        ids = [seq * self.ROWS + row for row in range(self.ROWS)]
        values = [entity / 2 for entity in ids]
        request = fpb.WriteFeaturesRequest(
            feature_view=self.VIEW,
            entity_keys=[self._ids(ids)],
            event_time_unix_us=[1_700_000_000_000_000 + seq] * self.ROWS,
            features=[
                fpb.FeatureColumn(
                    name="value",
                    values=fpb.Values(type=fpb.VALUE_TYPE_DOUBLE, double_values=values),
                )
            ],
        )
        await fpb_grpc.FeatureServiceStub(channel).WriteFeatures(request, timeout=timeout)
        for entity, value in zip(ids, values, strict=True):
            ledger.acknowledge(str(entity), value)

    async def probe(self, channel: grpc.aio.Channel, timeout: float) -> None:
        request = fpb.GetOnlineFeaturesRequest(
            entity_keys=[self._ids([0])], features=[f"{self.VIEW}:value"]
        )
        await fpb_grpc.FeatureServiceStub(channel).GetOnlineFeatures(request, timeout=timeout)

    async def lost(self, channel: grpc.aio.Channel, acknowledged: Mapping[str, Any]) -> int:
        stub = fpb_grpc.FeatureServiceStub(channel)
        keys = sorted(int(key) for key in acknowledged)
        found: dict[str, Any] = {}
        for start in range(0, len(keys), self.READ_CHUNK):
            chunk = keys[start : start + self.READ_CHUNK]
            response = await stub.GetOnlineFeatures(
                fpb.GetOnlineFeaturesRequest(
                    entity_keys=[self._ids(chunk)], features=[f"{self.VIEW}:value"]
                ),
                timeout=30,
            )
            (column,) = response.columns
            for entity, value, status in zip(
                chunk, column.values.double_values, column.statuses, strict=True
            ):
                if status == fpb.FEATURE_STATUS_PRESENT:
                    found[str(entity)] = value
        return len(lost_keys(acknowledged, found))


# --- monitoring -----------------------------------------------------------------------


class MonitoringWorkload:
    service = "monitoring"
    writes = True
    slow = SlowMethods(
        unary=_method(mpb.DESCRIPTOR.services_by_name["MonitoringService"], "LogPredictions")
    )
    MODEL = "chaos"
    RECORDS = 8
    FEATURES = ("f0", "f1", "f2", "f3")
    LABEL_CHUNK = 20_000

    async def prepare(self, channel: grpc.aio.Channel) -> None:
        return None

    async def write(
        self, channel: grpc.aio.Channel, seq: int, timeout: float, ledger: AckLedger
    ) -> None:
        ids = [f"r{seq}-{row}" for row in range(self.RECORDS)]
        rng = np.random.default_rng(seq)
        features = rng.standard_normal((self.RECORDS, len(self.FEATURES))).astype("<f4")
        scores = rng.random((self.RECORDS, 1)).astype("<f4")
        batch = mpb.PredictionBatch(
            model_name=self.MODEL,
            model_version="1",
            request_ids=ids,
            latency_ms=[1.0] * self.RECORDS,
            feature_names=self.FEATURES,
            feature_values=features.tobytes(),
            outputs=[mpb.OutputColumn(name="score", width=1)],
            output_values=scores.tobytes(),
        )
        response = await mpb_grpc.MonitoringServiceStub(channel).LogPredictions(
            mpb.LogPredictionsRequest(batches=[batch]), timeout=timeout
        )
        if response.stored + response.duplicates == self.RECORDS:
            for request_id in ids:
                ledger.acknowledge(request_id, 1)

    async def probe(self, channel: grpc.aio.Channel, timeout: float) -> None:
        await mpb_grpc.MonitoringServiceStub(channel).GetMonitorConfig(
            mpb.GetMonitorConfigRequest(model_name=self.MODEL), timeout=timeout
        )

    async def lost(self, channel: grpc.aio.Channel, acknowledged: Mapping[str, Any]) -> int:
        """Labels for every acknowledged record: those LogLabels cannot match to a stored
        prediction are the lost ones."""
        stub = mpb_grpc.MonitoringServiceStub(channel)
        ids = sorted(acknowledged)
        unmatched = 0
        for start in range(0, len(ids), self.LABEL_CHUNK):
            chunk = ids[start : start + self.LABEL_CHUNK]
            response = await stub.LogLabels(
                mpb.LogLabelsRequest(
                    batches=[
                        mpb.LabelBatch(
                            model_name=self.MODEL, request_ids=chunk, values=[1.0] * len(chunk)
                        )
                    ]
                ),
                timeout=60,
            )
            unmatched += int(response.unmatched)
        return unmatched


# --- inference ------------------------------------------------------------------------


def infer_request_bytes(model: str = HEAVY_MODEL, width: int = HEAVY_MLP[0]) -> bytes:
    """One row of zeros for the demo MLP, serialized once (sent as raw bytes)."""
    request = ipb.ModelInferRequest(
        model_name=model,
        inputs=[
            ipb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, width])
        ],
        raw_input_contents=[np.zeros((1, width), np.float32).tobytes()],
    )
    return request.SerializeToString()


def raw_unary(channel: grpc.aio.Channel, method: str) -> Any:
    """A unary method that sends and returns bytes as they are (no protobuf work)."""
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


INFER = _method(ipb.DESCRIPTOR.services_by_name["GRPCInferenceService"], "ModelInfer")


class InferenceWorkload:
    service = "inference"
    writes = False
    _inference = ipb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    slow = SlowMethods(
        unary=INFER, client_stream=_method(_inference, "ModelStreamInfer"), bidi=True
    )

    def __init__(self) -> None:
        self.request = infer_request_bytes()

    async def prepare(self, channel: grpc.aio.Channel) -> None:
        ready = await ipb_grpc.GRPCInferenceServiceStub(channel).ModelReady(
            ipb.ModelReadyRequest(name=HEAVY_MODEL), timeout=30
        )
        if not ready.ready:
            raise RuntimeError(f"model {HEAVY_MODEL} is not ready")

    async def write(
        self, channel: grpc.aio.Channel, seq: int, timeout: float, ledger: AckLedger
    ) -> None:
        await raw_unary(channel, INFER)(self.request, timeout=timeout)

    async def probe(self, channel: grpc.aio.Channel, timeout: float) -> None:
        await raw_unary(channel, INFER)(self.request, timeout=timeout)

    async def lost(self, channel: grpc.aio.Channel, acknowledged: Mapping[str, Any]) -> int:
        return 0


def workload(service: str) -> Workload:
    kinds: dict[str, type] = {
        "registry": RegistryWorkload,
        "feature": FeatureWorkload,
        "monitoring": MonitoringWorkload,
        "inference": InferenceWorkload,
    }
    result: Workload = kinds[service]()
    return result

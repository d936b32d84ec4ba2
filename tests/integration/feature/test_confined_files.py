"""Issue #17, confined files and bounded reads, through a real feature server.

Before: ApplyDefinitions took a view whose source.path was any absolute or `../`
path, Materialize read it and GetOnlineFeatures served its values; the error text
told whether a file existed and its size; one such view made every unfiltered
Materialize fail; a training set's output_path overwrote an existing file; and reads
took any number of entities and echoed names of any length.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pyarrow.parquet as pq
import pytest

from modelplane.feature.v1 import feature_pb2 as pb
from modelplane.feature.v1 import feature_pb2_grpc as pb_grpc
from modelplane.kernel.errors import InvalidArgument
from modelplane.services.feature.main import Settings, build
from modelplane.services.feature.online_store.redis import RedisOnlineStore
from tests.integration.feature.messages import DEFINITIONS, column, customers, now_us
from tests.integration.feature.servers import REDIS_URL, settings_for, unique_prefix
from tests.integration.feature.test_materialize_and_training_set import source_table
from tests.support import running_sync

SECRET_TRIPS = 31337.0
TWO_VIEWS = """
entities:
  - name: customer
    join_keys: [customer_id]
feature_views:
  - name: good
    entity: customer
    source: {{path: "{good}", timestamp_field: event_timestamp}}
    features: [{{name: trips, type: double}}]
  - name: bad
    entity: customer
    source: {{path: "{bad}", timestamp_field: event_timestamp}}
    features: [{{name: trips, type: double}}]
"""


class Server:
    def __init__(self, stub: pb_grpc.FeatureServiceStub, root: Path) -> None:
        self.stub = stub
        self.sources = root / "sources"
        self.files = root / "files"
        self.outside = root / "outside"

    def apply(self, yaml: str, timeout: float = 30) -> pb.ApplyDefinitionsResponse:
        return self.stub.ApplyDefinitions(pb.ApplyDefinitionsRequest(yaml=yaml), timeout=timeout)


def _settings(store_kind: str, root: Path, prefix: str, **update: object) -> Settings:
    return settings_for(store_kind, root / "state", prefix).model_copy(
        update={
            "source_roots": [str(root / "sources")],
            "files_dir": str(root / "files"),
            "max_entities_per_read": 10,
            **update,
        }
    )


@pytest.fixture
def server(store_kind: str, tmp_path: Path) -> Iterator[Server]:
    for folder in ("sources", "files", "outside"):
        (tmp_path / folder).mkdir()
    # A secret the service must never read: a valid source outside the roots.
    secret = source_table([{"customer_id": 1, "t": now_us() - 1_000, "trips": SECRET_TRIPS}])
    pq.write_table(secret, tmp_path / "outside" / "secret.parquet")
    prefix = unique_prefix()
    try:
        with (
            running_sync(build(_settings(store_kind, tmp_path, prefix))) as address,
            grpc.insecure_channel(address) as channel,
        ):
            yield Server(pb_grpc.FeatureServiceStub(channel), tmp_path)
    finally:
        if store_kind == "redis":
            cleaner = RedisOnlineStore(REDIS_URL, key_prefix=prefix)
            cleaner.delete_prefix()
            cleaner.close()


def _refused(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(*args, timeout=30, **kwargs)
    return error.value


def _secret_never_served(server: Server, ref: str = "customer_stats:trips") -> None:
    response = server.stub.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(entity_keys=customers(1), features=[ref]), timeout=30
    )
    assert SECRET_TRIPS not in list(column(response, ref).values.double_values)


def test_sources_outside_the_roots_are_refused_at_apply_saying_nothing_of_the_file(server):
    outside = server.outside
    (server.sources / "link.parquet").symlink_to(outside / "secret.parquet")
    (server.sources / "dirlink").symlink_to(outside)
    refused = [
        str(outside / "secret.parquet"),  # exists
        str(outside / "missing.parquet"),  # does not
        "/etc/passwd",
        "../outside/secret.parquet",
        "sub/../../outside/secret.parquet",
        "link.parquet",  # a symlink that leaves the root
        "dirlink/secret.parquet",
        "bad\\x00name.parquet",
    ]
    details = set()
    for path in refused:
        error = _refused(server.apply, DEFINITIONS.format(source=path))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, path
        assert "source.path" in error.details() and "customer_stats" in error.details()
        assert "outside" not in error.details() and "passwd" not in error.details()
        details.add(error.details())
    assert len(details) == 1  # one answer, whatever lies at the path
    assert not server.stub.ListDefinitions(pb.ListDefinitionsRequest()).definitions.feature_views

    # Inside a root: relative, or absolute under it (the file may come later).
    for path in ("stats.parquet", str(server.sources / "daily" / "stats.parquet")):
        server.apply(DEFINITIONS.format(source=path))


def test_a_symlink_that_leaves_after_apply_is_refused_at_read_time(server):
    server.apply(DEFINITIONS.format(source="later.parquet"))
    messages = []
    for target in ("secret.parquet", "missing.parquet"):
        link = server.sources / "later.parquet"
        link.unlink(missing_ok=True)
        link.symlink_to(server.outside / target)
        error = _refused(server.stub.Materialize, pb.MaterializeRequest())
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "customer_stats" in error.details() and "source_roots" in error.details()
        messages.append(error.details())
        request = pb.GetTrainingSetRequest(
            entity_csv=b"customer_id,event_timestamp\n1,2999-01-01T00:00:00Z\n",
            features=["customer_stats:trips"],
        )
        assert _refused(server.stub.GetTrainingSet, request).details() == messages[0]
    assert messages[0] == messages[1]  # existence and size of the target are not told
    assert "outside" not in messages[0] and "bytes" not in messages[0]
    _secret_never_served(server)


def test_a_folder_source_with_a_file_linked_from_outside_is_refused(server):
    folder = server.sources / "daily"
    folder.mkdir()
    pq.write_table(
        source_table([{"customer_id": 2, "t": now_us() - 5, "trips": 1.0}]), folder / "a.parquet"
    )
    (folder / "b.parquet").symlink_to(server.outside / "secret.parquet")
    server.apply(DEFINITIONS.format(source="daily"))
    error = _refused(server.stub.Materialize, pb.MaterializeRequest())
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "outside" not in error.details()
    _secret_never_served(server)


def test_a_missing_source_inside_names_the_view_not_the_machine(server):
    server.apply(DEFINITIONS.format(source="nothing/here.parquet"))
    error = _refused(server.stub.Materialize, pb.MaterializeRequest())
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "customer_stats" in error.details() and str(server.sources) not in error.details()


def test_one_bad_view_does_not_stop_an_unfiltered_materialize(server):
    now = now_us()
    pq.write_table(
        source_table([{"customer_id": 1, "t": now - 5, "trips": 7.0}]),
        server.sources / "good.parquet",
    )
    server.apply(TWO_VIEWS.format(good="good.parquet", bad="missing.parquet"))
    response = server.stub.Materialize(pb.MaterializeRequest(), timeout=30)
    views = {v.feature_view: v for v in response.views}
    assert views["good"].rows_written == 1 and not views["good"].error
    assert "not found" in views["bad"].error and views["bad"].rows_written == 0
    online = server.stub.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(entity_keys=customers(1), features=["good:trips"]), timeout=30
    )
    assert list(column(online, "good:trips").values.double_values) == [7.0]

    # Naming the bad view still fails the call (after doing the others it names).
    error = _refused(server.stub.Materialize, pb.MaterializeRequest(feature_views=["good", "bad"]))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION and "'bad'" in error.details()


def test_training_set_files_stay_in_the_files_folder_and_are_never_overwritten(server):
    pq.write_table(
        source_table([{"customer_id": 1, "t": now_us() - 5, "trips": 2.0}]),
        server.sources / "stats.parquet",
    )
    server.apply(DEFINITIONS.format(source="stats.parquet"))
    request = pb.GetTrainingSetRequest(
        entity_csv=b"customer_id,event_timestamp\n1,2999-01-01T00:00:00Z\n",
        features=["customer_stats:trips"],
        output_path="train.parquet",
    )
    first = server.stub.GetTrainingSet(request, timeout=30)
    written = server.files / "train.parquet"
    assert first.output_path == str(written) and pq.read_table(written).num_rows == 1
    before = written.read_bytes()
    error = _refused(server.stub.GetTrainingSet, request)
    assert error.code() is grpc.StatusCode.ALREADY_EXISTS and "output_path" in error.details()
    assert written.read_bytes() == before
    assert not [p for p in server.files.iterdir() if p.name.endswith(".tmp")]
    # Asked to, it replaces the file.
    request.overwrite = True
    request.entity_csv = (
        b"customer_id,event_timestamp\n1,2999-01-01T00:00:00Z\n2,2999-01-01T00:00:00Z\n"
    )
    assert server.stub.GetTrainingSet(request, timeout=30).rows == 2
    assert pq.read_table(written).num_rows == 2
    request.overwrite = False

    (server.files / "folder").mkdir()
    for bad, code in (
        (".", grpc.StatusCode.INVALID_ARGUMENT),
        ("folder", grpc.StatusCode.INVALID_ARGUMENT),
        ("train.parquet/x.parquet", grpc.StatusCode.INVALID_ARGUMENT),
        ("../outside/x.parquet", grpc.StatusCode.INVALID_ARGUMENT),
        (str(server.outside / "x.parquet"), grpc.StatusCode.INVALID_ARGUMENT),
        ("a\x00b", grpc.StatusCode.INVALID_ARGUMENT),
    ):
        request.output_path = bad
        error = _refused(server.stub.GetTrainingSet, request)
        assert error.code() is code, (bad, error.details())
        assert "output_path" in error.details()
    assert [p.name for p in server.outside.iterdir()] == ["secret.parquet"]

    entity_request = pb.GetTrainingSetRequest(features=["customer_stats:trips"])
    outside_messages = set()
    for path in (str(server.outside / "secret.parquet"), "../outside/nothing.csv", "\x00"):
        entity_request.entity_path = path
        error = _refused(server.stub.GetTrainingSet, entity_request)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "entity_path" in error.details()
        outside_messages.add(error.details())
    assert len(outside_messages) == 1
    entity_request.entity_path = "none.csv"
    error = _refused(server.stub.GetTrainingSet, entity_request)
    assert error.code() is grpc.StatusCode.NOT_FOUND and str(server.files) not in error.details()


def test_reads_take_a_bounded_number_of_entities_named_in_the_error(server):
    server.apply(DEFINITIONS.format(source="stats.parquet"))
    ten, eleven = customers(*range(10)), customers(*range(11))
    read = pb.GetOnlineFeaturesRequest(features=["customer_stats:trips"], entity_keys=ten)
    assert server.stub.GetOnlineFeatures(read, timeout=30).entity_count == 10
    tensor = pb.GetBundleTensorRequest(bundle="fraud_model", entity_keys=ten)
    assert list(server.stub.GetBundleTensor(tensor, timeout=30).shape) == [10, 3]
    del read.entity_keys[:]
    read.entity_keys.extend(eleven)
    del tensor.entity_keys[:]
    tensor.entity_keys.extend(eleven)
    for call, request in (
        (server.stub.GetOnlineFeatures, read),
        (server.stub.GetBundleTensor, tensor),
    ):
        error = _refused(call, request)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "max_entities_per_read" in error.details() and "10" in error.details()


def test_long_names_are_refused_and_never_echoed_whole(server):
    server.apply(DEFINITIONS.format(source="stats.parquet"))
    long = "v" * 10_000
    calls = [
        (
            server.stub.GetOnlineFeatures,
            pb.GetOnlineFeaturesRequest(entity_keys=customers(1), features=[f"{long}:x"]),
        ),
        (
            server.stub.GetOnlineFeatures,
            pb.GetOnlineFeaturesRequest(
                entity_keys=customers(1), features=[f"customer_stats:{long}"]
            ),
        ),
        (
            server.stub.GetOnlineFeatures,
            pb.GetOnlineFeaturesRequest(entity_keys=customers(1), bundle=long),
        ),
        (
            server.stub.GetOnlineFeatures,
            pb.GetOnlineFeaturesRequest(entity_keys=customers(1), features=[long]),
        ),
        (
            server.stub.GetBundleTensor,
            pb.GetBundleTensorRequest(entity_keys=customers(1), bundle=long),
        ),
        (server.stub.Materialize, pb.MaterializeRequest(feature_views=[long])),
        (server.stub.WriteFeatures, pb.WriteFeaturesRequest(feature_view=long)),
        (
            server.stub.GetTrainingSet,
            pb.GetTrainingSetRequest(
                entity_csv=b"customer_id,event_timestamp\n", features=[f"{long}:x"]
            ),
        ),
        (
            server.stub.ApplyDefinitions,
            pb.ApplyDefinitionsRequest(yaml=f"entities: [{{name: {long}, join_keys: [k]}}]"),
        ),
    ]
    for call, request in calls:
        error = _refused(call, request)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (call, error.details())
        assert len(error.details()) < 300, error.details()
    keys = customers(1) + customers(1)
    keys[0].name = keys[1].name = "k" * 10_000
    error = _refused(
        server.stub.GetOnlineFeatures,
        pb.GetOnlineFeaturesRequest(entity_keys=keys, features=["customer_stats:trips"]),
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 300


def test_a_startup_definitions_file_outside_the_roots_stops_the_start(store_kind, tmp_path):
    (tmp_path / "sources").mkdir()
    definitions = tmp_path / "features.yaml"
    definitions.write_text(DEFINITIONS.format(source="/etc/passwd"))
    settings = _settings(store_kind, tmp_path, unique_prefix(), definitions_file=str(definitions))
    with pytest.raises(InvalidArgument, match="source_roots"):
        build(settings)

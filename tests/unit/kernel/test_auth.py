"""The token file, the role table and the authorisation decision (no network)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from inference import grpc_service_pb2
from modelplane.cli.main import main as cli_main
from modelplane.feature.v1 import feature_pb2
from modelplane.kernel import auth
from modelplane.kernel.settings import ServiceSettings
from modelplane.monitoring.v1 import monitoring_pb2
from modelplane.registry.v1 import registry_pb2

SERVICE_MODULES = (registry_pb2, feature_pb2, monitoring_pb2, grpc_service_pb2)
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def every_method() -> list[str]:
    return [
        f"/{service.full_name}/{method.name}"
        for module in SERVICE_MODULES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def test_every_rpc_of_every_service_has_a_role() -> None:
    methods = every_method()
    assert len(methods) > 40  # all four services were found
    missing = [method for method in methods if method not in auth.REQUIRED_ROLE]
    assert missing == []
    # ...and the table names nothing that does not exist (a renamed RPC would otherwise
    # leave a stale entry while the new name is refused to everyone).
    assert sorted(set(auth.REQUIRED_ROLE) - set(methods)) == []
    assert set(auth.REQUIRED_ROLE.values()) <= set(auth.ROLES)


def test_the_issue_s_dangerous_methods_need_the_right_role() -> None:
    table = auth.REQUIRED_ROLE
    registry = "/modelplane.registry.v1.RegistryService/"
    for method in ("ReviewVersion", "SetApprovalPolicy", "SetAlias", "DeleteAlias"):
        assert table[registry + method] == auth.APPROVER
    assert table[registry + "UploadVersion"] == auth.WRITER
    assert table["/inference.GRPCInferenceService/RepositoryModelUnload"] == auth.ADMIN
    assert table["/inference.GRPCInferenceService/RepositoryModelLoad"] == auth.ADMIN
    assert table["/inference.GRPCInferenceService/ModelInfer"] == auth.READER
    assert table["/modelplane.feature.v1.FeatureService/ApplyDefinitions"] == auth.ADMIN


def test_role_grants() -> None:
    reader = auth.Principal("r", frozenset({auth.READER}))
    writer = auth.Principal("w", frozenset({auth.WRITER}))
    approver = auth.Principal("a", frozenset({auth.APPROVER}))
    admin = auth.Principal("root", frozenset({auth.ADMIN}))
    assert reader.may(auth.READER) and not reader.may(auth.WRITER)
    assert writer.may(auth.READER) and writer.may(auth.WRITER) and not writer.may(auth.APPROVER)
    assert approver.may(auth.APPROVER) and not approver.may(auth.WRITER)
    assert not approver.may(auth.ADMIN)
    assert all(admin.may(role) for role in auth.ROLES)


# --- the token file -----------------------------------------------------------------------


def test_add_token_stores_a_salted_hash_never_the_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens.jsonl"
    first = auth.add_token(path, "alice", ["reader", "writer"])
    second = auth.add_token(path, "bob", ["reader"])
    text = path.read_text()
    assert first not in text and second not in text
    assert first.split("_", 2)[2] not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["name"] for line in lines] == ["alice", "bob"]
    assert lines[0]["roles"] == ["reader", "writer"]
    assert lines[0]["salt"] != lines[1]["salt"]
    assert len(bytes.fromhex(lines[0]["hash"])) == 32
    assert os.stat(path).st_mode & 0o077 == 0  # owner only


def test_list_and_remove(tmp_path: Path) -> None:
    path = tmp_path / "tokens.jsonl"
    auth.add_token(path, "alice", ["reader"])
    auth.add_token(path, "bob", ["admin"])
    assert [(e.name, e.roles) for e in auth.read_entries(path)] == [
        ("alice", ("reader",)),
        ("bob", ("admin",)),
    ]
    assert auth.remove_token(path, "alice")
    assert not auth.remove_token(path, "alice")
    assert [e.name for e in auth.read_entries(path)] == ["bob"]


def test_add_refuses_duplicates_and_unknown_roles(tmp_path: Path) -> None:
    path = tmp_path / "tokens.jsonl"
    auth.add_token(path, "alice", ["reader"])
    with pytest.raises(ValueError, match="exists"):
        auth.add_token(path, "alice", ["writer"])
    with pytest.raises(ValueError, match="unknown role"):
        auth.add_token(path, "carol", ["superuser"])
    with pytest.raises(ValueError, match="at least one role"):
        auth.add_token(path, "carol", [])


def test_authenticate_uses_a_constant_time_compare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tokens.jsonl"
    token = auth.add_token(path, "alice", ["approver"])
    store = auth.TokenStore(path)
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    principal = store.authenticate(token)
    assert principal == auth.Principal("alice", frozenset({"approver"}))
    assert len(calls) == 1
    # A wrong secret under a real key id is compared (in constant time) and refused.
    prefix, key_id, secret = token.split("_", 2)
    wrong = f"{prefix}_{key_id}_{'A' * len(secret)}"
    assert store.authenticate(wrong) is None
    assert len(calls) == 2
    for bad in ("", "garbage", "mp_unknownkey_x", "mp__", token + "x", "x" * 10_000):
        assert store.authenticate(bad) is None


def test_a_removed_token_stops_working(tmp_path: Path) -> None:
    path = tmp_path / "tokens.jsonl"
    alice = auth.add_token(path, "alice", ["reader"])
    store = auth.TokenStore(path, reload_interval_s=0.0)
    assert store.authenticate(alice) is not None  # and now cached
    bob = auth.add_token(path, "bob", ["reader"])
    assert store.authenticate(bob) is not None
    auth.remove_token(path, "alice")
    assert store.authenticate(alice) is None


def test_a_malformed_file_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens.jsonl"
    auth.add_token(path, "alice", ["reader"])
    with path.open("a") as handle:
        handle.write('{"name": "x"}\n')
    with pytest.raises(ValueError, match=r"tokens.jsonl:2"):
        auth.TokenStore(path)


def test_a_missing_file_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        auth.TokenStore(tmp_path / "absent.jsonl")


# --- the decision ---------------------------------------------------------------------------


@pytest.fixture
def tokens(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "tokens.jsonl"
    made = {
        "reader": auth.add_token(path, "rita", ["reader"]),
        "approver": auth.add_token(path, "alice", ["approver"]),
        "admin": auth.add_token(path, "root", ["admin"]),
    }
    return path, made


def _authorizer(path: Path, table: dict[str, str] | None = None) -> auth.Authorizer:
    return auth.Authorizer(
        auth.TokenStore(path),
        ServiceSettings().auth_open_methods,
        CollectorRegistry(),
        auth.REQUIRED_ROLE if table is None else table,
    )


def test_check(tokens: tuple[Path, dict[str, str]]) -> None:
    path, made = tokens
    authorizer = _authorizer(path)
    approve = "/modelplane.registry.v1.RegistryService/ReviewVersion"

    def code_of(method: str, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode | None:
        try:
            authorizer.check(method, metadata)
        except auth._Denied as denied:
            return denied.code
        return None

    assert code_of(approve, ()) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(approve, (("authorization", "Basic abc"),)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(approve, auth.bearer_metadata("nope")) == grpc.StatusCode.UNAUTHENTICATED
    reader = auth.bearer_metadata(made["reader"])
    assert code_of(approve, reader) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(approve, auth.bearer_metadata(made["approver"])) is None
    assert code_of(approve, auth.bearer_metadata(made["admin"])) is None
    assert code_of("/modelplane.registry.v1.RegistryService/GetModel", reader) is None
    # The scheme is case-insensitive (RFC 7235).
    assert code_of(approve, (("authorization", f"bearer {made['approver']}"),)) is None
    # Not in the table: refused even to admin (fail closed).
    assert code_of("/x.New/Thing", auth.bearer_metadata(made["admin"])) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert authorizer.is_open(HEALTH_CHECK)
    assert authorizer.is_open("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not authorizer.is_open(approve)
    assert health_pb2.DESCRIPTOR.services_by_name["Health"].full_name == "grpc.health.v1.Health"


def test_denials_are_counted_and_logged_without_the_token(
    tokens: tuple[Path, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    path, made = tokens
    registry = CollectorRegistry()
    authorizer = auth.Authorizer(auth.TokenStore(path), (), registry)
    method = "/inference.GRPCInferenceService/RepositoryModelUnload"
    caplog.set_level(logging.WARNING, logger="modelplane.auth")
    for metadata in [auth.bearer_metadata(made["reader"])] * 3 + [auth.bearer_metadata("bad")]:
        try:
            authorizer.check(method, metadata)
        except auth._Denied as refusal:
            authorizer.record(method, refusal, "ipv4:127.0.0.1:1")
    denied = registry.get_sample_value(
        "modelplane_auth_denials_total", {"method": method, "code": "PERMISSION_DENIED"}
    )
    unauthenticated = registry.get_sample_value(
        "modelplane_auth_denials_total", {"method": method, "code": "UNAUTHENTICATED"}
    )
    assert (denied, unauthenticated) == (3.0, 1.0)
    # Rate-limited: one line per kind of denial in the interval.
    assert len(caplog.records) == 2
    assert all(made["reader"] not in record.getMessage() for record in caplog.records)
    assert "rita" in caplog.records[0].getMessage()


def test_off_unless_a_token_file_is_set(tmp_path: Path) -> None:
    assert auth.aio_auth_interceptors(ServiceSettings(), None) == []
    assert auth.sync_auth_interceptors(ServiceSettings(), None) == []
    path = tmp_path / "tokens.jsonl"
    auth.add_token(path, "root", ["admin"])
    settings = ServiceSettings(auth_tokens_file=path)
    assert len(auth.aio_auth_interceptors(settings, CollectorRegistry())) == 1


def test_cli_add_list_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tokens.jsonl"
    assert cli_main(["auth", "add-token", "alice", "--role", "reader", "--file", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    assert auth.TokenStore(path).authenticate(token) == auth.Principal(
        "alice", frozenset({"reader"})
    )
    assert cli_main(["auth", "list", "--json", "--file", str(path)]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(row["name"], row["roles"]) for row in listed] == [("alice", ["reader"])]
    assert token not in path.read_text()
    assert cli_main(["auth", "remove", "alice", "--file", str(path)]) == 0
    assert cli_main(["auth", "remove", "alice", "--file", str(path)]) == 1
    assert auth.read_entries(path) == []


# --- client-certificate identities -------------------------------------------------------


def test_certificate_entries_hold_no_secret_and_share_the_names(tmp_path: Path) -> None:
    path = tmp_path / "tokens.jsonl"
    auth.add_token(path, "rita", ["reader"])
    auth.add_certificate(path, "inference.modelplane", ["writer"])
    line = path.read_text().splitlines()[1]
    assert json.loads(line) == {
        "kind": "certificate",
        "name": "inference.modelplane",
        "roles": ["writer"],
        "created_at": json.loads(line)["created_at"],
    }
    entries = auth.read_entries(path)
    assert [(e.kind, e.name, e.roles) for e in entries] == [
        ("token", "rita", ("reader",)),
        ("certificate", "inference.modelplane", ("writer",)),
    ]
    # One name, one principal, whatever its kind.
    with pytest.raises(ValueError, match="a token named 'rita' exists"):
        auth.add_certificate(path, "rita", ["admin"])
    with pytest.raises(ValueError, match="a certificate named"):
        auth.add_token(path, "inference.modelplane", ["admin"])
    with pytest.raises(ValueError, match="unknown role"):
        auth.add_certificate(path, "x", ["root"])
    store = auth.TokenStore(path)
    assert store.authenticate_certificate("inference.modelplane") == auth.Principal(
        "inference.modelplane", frozenset({"writer"})
    )
    # A token principal's name is not a certificate identity.
    assert store.authenticate_certificate("rita") is None
    assert auth.remove_token(path, "inference.modelplane")
    assert [e.name for e in auth.read_entries(path)] == ["rita"]


def test_check_with_a_certificate_name(tmp_path: Path) -> None:
    path = tmp_path / "tokens.jsonl"
    token = auth.add_token(path, "rita", ["reader"])
    auth.add_certificate(path, "svc", ["approver"])
    approve = "/modelplane.registry.v1.RegistryService/ReviewVersion"

    def code_of(authorizer: auth.Authorizer, metadata: object, name: str | None) -> object:
        try:
            return authorizer.check(approve, metadata, name).name  # type: ignore[arg-type]
        except auth._Denied as denied:
            return denied.code

    on = auth.Authorizer(auth.TokenStore(path), (), CollectorRegistry(), certificates=True)
    off = auth.Authorizer(auth.TokenStore(path), (), CollectorRegistry())
    assert code_of(on, (), "svc") == "svc"
    assert code_of(on, (), "stranger") == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(on, (), None) == grpc.StatusCode.UNAUTHENTICATED
    # A token decides alone: a wrong one is refused even with a registered certificate,
    # and a right one is judged by its own roles.
    assert code_of(on, auth.bearer_metadata("mp_x_y"), "svc") == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(on, auth.bearer_metadata(token), "svc") == grpc.StatusCode.PERMISSION_DENIED
    # Where client certificates are not verified, a name proves nothing.
    assert code_of(off, (), "svc") == grpc.StatusCode.UNAUTHENTICATED


def test_peer_common_name() -> None:
    assert auth.peer_common_name(None) is None
    assert auth.peer_common_name({}) is None
    assert auth.peer_common_name({"x509_common_name": [b"svc"]}) == "svc"
    assert auth.peer_common_name({"x509_common_name": [b"a", b"b"]}) is None
    assert auth.peer_common_name({"x509_common_name": [b"\xff"]}) is None


def test_certificates_count_only_where_client_certificates_are_required(tmp_path: Path) -> None:
    path = tmp_path / "tokens.jsonl"
    auth.add_certificate(path, "svc", ["reader"])
    assert not auth._authorizer(ServiceSettings(auth_tokens_file=path), None).certificates  # type: ignore[union-attr]
    with_ca = ServiceSettings(auth_tokens_file=path, tls_client_ca_file=tmp_path / "ca.crt")
    assert auth._authorizer(with_ca, None).certificates  # type: ignore[union-attr]


def test_cli_add_cert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tokens.jsonl"
    args = ["auth", "add-cert", "svc", "--role", "reader", "--role", "writer"]
    assert cli_main([*args, "--file", str(path)]) == 0
    assert capsys.readouterr().out == ""  # nothing secret to show
    assert cli_main([*args, "--file", str(path)]) == 2
    assert cli_main(["auth", "list", "--json", "--file", str(path)]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["name"], row["kind"], row["roles"]) == ("svc", "certificate", ["reader", "writer"])
    assert cli_main(["auth", "remove", "svc", "--file", str(path)]) == 0

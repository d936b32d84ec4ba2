"""Bearer-token authentication and role checks: one server interceptor on every service.

A caller sends `authorization: Bearer <token>`. The token names a principal with roles
(`reader`, `writer`, `approver`, `admin`); `REQUIRED_ROLE` says which role each RPC
needs. No token or an unknown one → UNAUTHENTICATED; a principal without the role →
PERMISSION_DENIED. An RPC missing from the table is refused (fail closed), so a new RPC
cannot ship unguarded; the methods in `auth_open_methods` (health, reflection) need no
token. Handlers read the caller with `current_principal()` (None when auth is off).

On a port that requires client certificates (`tls_client_ca_file` set), a call without a
bearer token may instead be authenticated by its certificate: the handshake has verified
it against the client CA, and the subject's common name (`x509_common_name` of the auth
context) is the principal when the file has a certificate entry of that name
(`modelplane auth add-cert`). A bearer token, when sent, decides alone: a wrong one is
refused even over a registered certificate.

Tokens live in a file of salted hashes, one JSON object a line, written by
`modelplane auth add-token`. A token is `mp_<key id>_<secret>`: the key id finds its
line, the secret is checked against the salted PBKDF2 hash with `hmac.compare_digest`.
The secret carries 256 random bits, so the hash needs no work factor to resist guessing;
a verified token is remembered (by its SHA-256) so the hot path pays one SHA-256, not a
KDF. The file is re-read when it changes (checked at most once a second), so a removed
token stops working without a restart. Tokens are never logged.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import inspect
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter

from modelplane.kernel.interceptors import WrappedHandlers, read_out, rewrap
from modelplane.kernel.logs import RateLimitedLog
from modelplane.kernel.settings import ServiceSettings

log = logging.getLogger("modelplane.auth")

READER = "reader"
WRITER = "writer"
APPROVER = "approver"
ADMIN = "admin"
ROLES = (READER, WRITER, APPROVER, ADMIN)

# A role grants itself and the roles listed here. Writers and approvers read; an approver
# does not write (who approves is not who uploads); admin may do anything.
_GRANTS: Mapping[str, frozenset[str]] = {
    READER: frozenset({READER}),
    WRITER: frozenset({WRITER, READER}),
    APPROVER: frozenset({APPROVER, READER}),
    ADMIN: frozenset(ROLES),
}

AUTHORIZATION_KEY = "authorization"
TOKEN_PREFIX = "mp"
KDF = "pbkdf2_sha256"
KDF_ITERATIONS = 1_000
MAX_NAME_LENGTH = 128
MAX_TOKEN_LENGTH = 512


def _service_table(service: str, methods: Mapping[str, str]) -> dict[str, str]:
    return {f"/{service}/{method}": role for method, role in methods.items()}


# Every RPC of every service and the role it needs. A test checks that each method of
# each service descriptor has an entry.
REQUIRED_ROLE: Mapping[str, str] = {
    **_service_table(
        "modelplane.registry.v1.RegistryService",
        {
            "CreateModel": WRITER,
            "GetModel": READER,
            "ListModels": READER,
            "SetApprovalPolicy": APPROVER,
            "UploadVersion": WRITER,
            "GetVersion": READER,
            "ListVersions": READER,
            "DownloadArtifact": READER,
            "SetVersionStatus": APPROVER,
            "ReviewVersion": APPROVER,
            "ListReviews": READER,
            "SetAlias": APPROVER,
            "DeleteAlias": APPROVER,
            "ListAliases": READER,
            "GetAliasHistory": READER,
            "GetAliasAt": READER,
            "WatchModel": READER,
            "ListAuditEvents": READER,
            "SetRolloutPolicy": APPROVER,
            "GetRolloutPolicy": READER,
        },
    ),
    **_service_table(
        "modelplane.feature.v1.FeatureService",
        {
            "ApplyDefinitions": ADMIN,
            "ListDefinitions": READER,
            "WriteFeatures": WRITER,
            "GetOnlineFeatures": READER,
            "GetBundleTensor": READER,
            # Both read source files of the host; a training set also writes a file.
            "Materialize": WRITER,
            "GetTrainingSet": WRITER,
        },
    ),
    **_service_table(
        "modelplane.monitoring.v1.MonitoringService",
        {
            "LogPredictions": WRITER,
            "GetPredictionSummary": READER,
            "LogLabels": WRITER,
            # Thresholds and alert rules: changing them can silence alerts.
            "SetMonitorConfig": ADMIN,
            "GetMonitorConfig": READER,
            "GetReport": READER,
            "ListAlerts": READER,
            "WatchAlerts": READER,
        },
    ),
    **_service_table(
        "inference.GRPCInferenceService",
        {
            "ServerLive": READER,
            "ServerReady": READER,
            "ModelReady": READER,
            "ServerMetadata": READER,
            "ModelMetadata": READER,
            "ModelInfer": READER,
            "ModelStreamInfer": READER,
            "ModelConfig": READER,
            "ModelStatistics": READER,
            "RepositoryIndex": READER,
            "RepositoryModelLoad": ADMIN,
            "RepositoryModelUnload": ADMIN,
        },
    ),
}


@dataclass(frozen=True)
class Principal:
    """Who is calling, as their token says."""

    name: str
    roles: frozenset[str]

    def may(self, role: str) -> bool:
        return any(role in _GRANTS.get(held, ()) for held in self.roles)


_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "modelplane_principal", default=None
)


def current_principal() -> Principal | None:
    """The authenticated caller of the RPC being handled; None when auth is off (or for
    an open method). Copied into threads started with `asyncio.to_thread`."""
    return _principal.get()


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token`, for a stub's `metadata=` argument."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),)


# --- the token file ---------------------------------------------------------------------


CERTIFICATE_KIND = "certificate"


@dataclass(frozen=True)
class CertificateEntry:
    """A line naming a client certificate's common name and its roles; no secret (the
    TLS handshake proves the name)."""

    name: str
    roles: tuple[str, ...]
    created_at: str

    kind = CERTIFICATE_KIND

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": CERTIFICATE_KIND,
                "name": self.name,
                "roles": list(self.roles),
                "created_at": self.created_at,
            },
            sort_keys=True,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CertificateEntry:
        entry = cls(
            name=str(data["name"]),
            roles=tuple(str(role) for role in data["roles"]),
            created_at=str(data.get("created_at", "")),
        )
        validate_name(entry.name)
        validate_roles(entry.roles)
        return entry


@dataclass(frozen=True)
class TokenEntry:
    """One line of the token file: everything but the token itself."""

    name: str
    roles: tuple[str, ...]
    key_id: str
    salt: str
    hash: str
    iterations: int
    created_at: str

    kind = "token"

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "roles": list(self.roles),
                "key_id": self.key_id,
                "kdf": KDF,
                "iterations": self.iterations,
                "salt": self.salt,
                "hash": self.hash,
                "created_at": self.created_at,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> TokenEntry:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("kdf") != KDF:
            raise ValueError(f"not a {KDF} token entry")
        entry = cls(
            name=str(data["name"]),
            roles=tuple(str(role) for role in data["roles"]),
            key_id=str(data["key_id"]),
            salt=str(data["salt"]),
            hash=str(data["hash"]),
            iterations=int(data["iterations"]),
            created_at=str(data.get("created_at", "")),
        )
        validate_name(entry.name)
        validate_roles(entry.roles)
        bytes.fromhex(entry.salt)
        bytes.fromhex(entry.hash)
        if entry.iterations < 1:
            raise ValueError("iterations must be positive")
        return entry


def validate_name(name: str) -> None:
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable() or name != name.strip():
        raise ValueError(
            f"a token name is 1 to {MAX_NAME_LENGTH} printable characters without "
            "surrounding spaces"
        )


def validate_roles(roles: Iterable[str]) -> None:
    roles = list(roles)
    if not roles:
        raise ValueError("a token needs at least one role")
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown role(s) {', '.join(unknown)}; roles are {', '.join(ROLES)}")


def _digest(secret: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)


Entry = TokenEntry | CertificateEntry


def _entry_from_json(text: str) -> Entry:
    data = json.loads(text)
    if isinstance(data, dict) and data.get("kind") == CERTIFICATE_KIND:
        return CertificateEntry.from_dict(data)
    return TokenEntry.from_json(text)


def read_entries(path: Path) -> list[Entry]:
    """The file's entries; a missing file has none. A bad line is an error naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    entries: list[Entry] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(_entry_from_json(line))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: bad token entry ({exc})") from None
    return entries


def _write_entries(path: Path, entries: Sequence[Entry]) -> None:
    """Replaces the file atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.writelines(entry.to_json() + "\n" for entry in entries)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def add_token(path: Path, name: str, roles: Sequence[str]) -> str:
    """Creates a token for `name`, stores its salted hash and returns the token: the only
    time it exists in clear."""
    validate_name(name)
    validate_roles(roles)
    entries = read_entries(path)
    _refuse_duplicate(entries, name)
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    entry = TokenEntry(
        name=name,
        roles=tuple(dict.fromkeys(roles)),
        key_id=key_id,
        salt=salt.hex(),
        hash=_digest(secret, salt, KDF_ITERATIONS).hex(),
        iterations=KDF_ITERATIONS,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    _write_entries(path, [*entries, entry])
    return f"{TOKEN_PREFIX}_{key_id}_{secret}"


def _refuse_duplicate(entries: Sequence[Entry], name: str) -> None:
    # One name, one principal: a token and a certificate of the same name would give
    # it two sets of roles.
    for entry in entries:
        if entry.name == name:
            raise ValueError(f"a {entry.kind} named {name!r} exists; remove it first")


def add_certificate(path: Path, name: str, roles: Sequence[str]) -> None:
    """Grants `roles` to callers presenting a client certificate (signed by the server's
    tls_client_ca_file) whose subject common name is `name`."""
    validate_name(name)
    validate_roles(roles)
    entries = read_entries(path)
    _refuse_duplicate(entries, name)
    entry = CertificateEntry(
        name=name,
        roles=tuple(dict.fromkeys(roles)),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    _write_entries(path, [*entries, entry])


def remove_token(path: Path, name: str) -> bool:
    """Removes `name`'s token or certificate entry; False when there is none."""
    entries = read_entries(path)
    kept = [entry for entry in entries if entry.name != name]
    if len(kept) == len(entries):
        return False
    _write_entries(path, kept)
    return True


class TokenStore:
    """Verifies tokens against the file, following its changes."""

    CACHE_LIMIT = 4096

    def __init__(self, path: Path, reload_interval_s: float = 1.0) -> None:
        self._path = path
        self._reload_interval_s = reload_interval_s
        self._lock = threading.Lock()
        self._by_key: dict[str, TokenEntry] = {}
        self._by_common_name: dict[str, Principal] = {}
        self._verified: dict[bytes, Principal] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        if not path.is_file():
            raise FileNotFoundError(f"auth token file {path} does not exist")
        self._load()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            info = self._path.stat()
        except FileNotFoundError:
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def _load(self) -> None:
        stamp = self._file_stamp()
        entries = read_entries(self._path)
        self._by_key = {e.key_id: e for e in entries if isinstance(e, TokenEntry)}
        self._by_common_name = {
            e.name: Principal(e.name, frozenset(e.roles))
            for e in entries
            if isinstance(e, CertificateEntry)
        }
        self._verified = {}
        self._stamp = stamp

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + self._reload_interval_s
            if self._file_stamp() == self._stamp:
                return
            try:
                self._load()
            except ValueError:
                log.error(
                    "auth token file %s is malformed; keeping the tokens read before",
                    self._path,
                )

    def authenticate(self, token: str) -> Principal | None:
        self._maybe_reload()
        if len(token) > MAX_TOKEN_LENGTH:
            return None
        fingerprint = hashlib.sha256(token.encode()).digest()
        known = self._verified.get(fingerprint)
        if known is not None:
            return known
        prefix, _, rest = token.partition("_")
        key_id, _, secret = rest.partition("_")
        entry = self._by_key.get(key_id) if prefix == TOKEN_PREFIX else None
        if entry is None or not secret:
            return None
        expected = bytes.fromhex(entry.hash)
        if not hmac.compare_digest(
            _digest(secret, bytes.fromhex(entry.salt), entry.iterations), expected
        ):
            return None
        principal = Principal(entry.name, frozenset(entry.roles))
        if len(self._verified) >= self.CACHE_LIMIT:
            self._verified = {}
        self._verified[fingerprint] = principal
        return principal

    def authenticate_certificate(self, common_name: str) -> Principal | None:
        """The principal of a verified client certificate's subject common name."""
        self._maybe_reload()
        return self._by_common_name.get(common_name)


# --- the interceptor --------------------------------------------------------------------


class _Denied(Exception):
    def __init__(
        self, code: grpc.StatusCode, message: str, principal: str | None, role: str = ""
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.principal = principal
        self.role = role  # the role the method needs ("" when no role may call it)


# Told of every authenticated caller refused for lacking a role: (principal, method,
# needed role). The registry records these in its audit log.
RoleDenied = Callable[[str, str, str], None]


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == AUTHORIZATION_KEY and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class Authorizer:
    """The decision shared by both interceptors: who is calling, and may they."""

    def __init__(
        self,
        store: TokenStore,
        open_methods: Iterable[str],
        registry: CollectorRegistry | None,
        required_role: Mapping[str, str] = REQUIRED_ROLE,
        certificates: bool = False,
        on_role_denied: RoleDenied | None = None,
    ) -> None:
        self._store = store
        self._on_role_denied = on_role_denied
        # True only where the handshake verifies client certificates (a client CA is
        # set): elsewhere a peer's certificate, if any, proves nothing.
        self.certificates = certificates
        self._open = tuple(open_methods)
        self._required = required_role
        self._denials = Counter(
            "modelplane_auth_denials",
            "Calls refused by authentication (UNAUTHENTICATED) or roles (PERMISSION_DENIED)",
            ["method", "code"],
            registry=registry,
        )
        self._log = RateLimitedLog(log)

    def is_open(self, method: str) -> bool:
        return any(
            method == entry or (entry.endswith("/") and method.startswith(entry))
            for entry in self._open
        )

    def check(
        self,
        method: str,
        metadata: Iterable[tuple[str, Any]] | None,
        certificate_name: str | None = None,
    ) -> Principal:
        """`certificate_name`: the common name of the caller's verified client
        certificate, used only when no token is sent and `certificates` is on."""
        token = bearer_token(metadata)
        if token is not None:
            principal = self._store.authenticate(token)
        elif self.certificates and certificate_name is not None:
            principal = self._store.authenticate_certificate(certificate_name)
        else:
            principal = None
        if principal is None:
            raise _Denied(
                grpc.StatusCode.UNAUTHENTICATED,
                "a valid bearer token (authorization: Bearer <token>) or a registered "
                "client certificate is required"
                if self.certificates
                else "a valid bearer token is required (authorization: Bearer <token>)",
                None,
            )
        role = self._required.get(method)
        if role is None:
            raise _Denied(
                grpc.StatusCode.PERMISSION_DENIED,
                "this method is not open to any role",
                principal.name,
            )
        if not principal.may(role):
            raise _Denied(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this method needs the {role!r} role",
                principal.name,
                role,
            )
        return principal

    def record(self, method: str, denied: _Denied, peer: str) -> None:
        self._denials.labels(method, denied.code.name).inc()
        self._log.warning(
            "auth: %s %s for %s from %s",
            denied.code.name,
            method,
            denied.principal or "(no valid token)",
            peer,
            kind=denied.code.name,
        )
        if (
            self._on_role_denied is not None
            and denied.code is grpc.StatusCode.PERMISSION_DENIED
            and denied.principal is not None
        ):
            try:
                self._on_role_denied(denied.principal, method, denied.role)
            except Exception:  # the refusal stands whatever the audit hook does
                log.exception("auth: recording a denial failed")


def peer_common_name(auth_context: Mapping[str, Iterable[bytes]] | None) -> str | None:
    """The subject common name of the peer's certificate, from a servicer context's
    `auth_context()`; None without one, or when the subject has several (ambiguous)."""
    if not auth_context:
        return None
    names = list(auth_context.get("x509_common_name", ()))
    if len(names) != 1:
        return None
    try:
        return bytes(names[0]).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _certificate_name(authorizer: Authorizer, context: Any) -> str | None:
    return peer_common_name(context.auth_context()) if authorizer.certificates else None


def _reset(token: contextvars.Token[Principal | None]) -> None:
    # ValueError: closed from another context (a generator finalised elsewhere).
    with contextlib.suppress(ValueError):
        _principal.reset(token)


class AioAuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorises every call of a grpc.aio server."""

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer
        self._handlers = WrappedHandlers(
            lambda handler, method: rewrap(
                handler,
                lambda behavior, client_streaming, streaming: self._wrap(
                    behavior, client_streaming, streaming, method
                ),
            )
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self._authorizer.is_open(method):
            return handler
        return self._handlers.get(handler, method)

    async def _admit(
        self, method: str, context: grpc.aio.ServicerContext, requests: Any = None
    ) -> Principal:
        """The caller's principal, or the call refused; a client stream (`requests`) is
        read out first, else its client may read INTERNAL instead (interceptors.py)."""
        try:
            return self._authorizer.check(
                method, context.invocation_metadata(), _certificate_name(self._authorizer, context)
            )
        except _Denied as denied:
            self._authorizer.record(method, denied, context.peer())
            if requests is not None:
                await read_out(requests)
            await context.abort(denied.code, denied.message)
            raise  # unreachable: abort raises

    def _wrap(
        self, behavior: Callable[..., Any], client_streaming: bool, streaming: bool, method: str
    ) -> Callable[..., Any]:
        def admit(request: Any, context: grpc.aio.ServicerContext) -> Awaitable[Principal]:
            return self._admit(method, context, request if client_streaming else None)

        if streaming and inspect.isasyncgenfunction(behavior):

            async def gen_wrapper(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                token = _principal.set(await admit(request, context))
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    _reset(token)

            return gen_wrapper

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = _principal.set(await admit(request, context))
            try:
                return await behavior(request, context)
            finally:
                _reset(token)

        return wrapper


class SyncAuthInterceptor(grpc.ServerInterceptor):
    """Authenticates and authorises every call of a synchronous grpc.server."""

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer
        self._handlers = WrappedHandlers(
            lambda handler, method: rewrap(
                handler, lambda behavior, _cs, streaming: self._wrap(behavior, streaming, method)
            )
        )

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self._authorizer.is_open(method):
            return handler
        return self._handlers.get(handler, method)

    def _admit(self, method: str, context: grpc.ServicerContext) -> Principal:
        try:
            return self._authorizer.check(
                method, context.invocation_metadata(), _certificate_name(self._authorizer, context)
            )
        except _Denied as denied:
            self._authorizer.record(method, denied, context.peer())
            context.abort(denied.code, denied.message)
            raise  # unreachable: abort raises

    def _wrap(
        self, behavior: Callable[..., Any], streaming: bool, method: str
    ) -> Callable[..., Any]:
        if streaming:

            def gen_wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                token = _principal.set(self._admit(method, context))
                try:
                    yield from behavior(request, context)
                finally:
                    _reset(token)

            return gen_wrapper

        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            token = _principal.set(self._admit(method, context))
            try:
                return behavior(request, context)
            finally:
                _reset(token)

        return wrapper


def _authorizer(
    settings: ServiceSettings,
    registry: CollectorRegistry | None,
    on_role_denied: RoleDenied | None = None,
) -> Authorizer | None:
    if settings.auth_tokens_file is None:
        return None
    return Authorizer(
        TokenStore(settings.auth_tokens_file),
        settings.auth_open_methods,
        registry,
        certificates=settings.tls_client_ca_file is not None,
        on_role_denied=on_role_denied,
    )


def aio_auth_interceptors(
    settings: ServiceSettings,
    registry: CollectorRegistry | None,
    on_role_denied: RoleDenied | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """The auth interceptor when `auth_tokens_file` is set, else none."""
    authorizer = _authorizer(settings, registry, on_role_denied)
    return [] if authorizer is None else [AioAuthInterceptor(authorizer)]


def sync_auth_interceptors(
    settings: ServiceSettings,
    registry: CollectorRegistry | None,
    on_role_denied: RoleDenied | None = None,
) -> list[grpc.ServerInterceptor]:
    """The auth interceptor when `auth_tokens_file` is set, else none."""
    authorizer = _authorizer(settings, registry, on_role_denied)
    return [] if authorizer is None else [SyncAuthInterceptor(authorizer)]

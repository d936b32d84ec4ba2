"""How every client we ship reaches a service: plaintext or TLS (optionally presenting a
client certificate, for mutual TLS), and a bearer token on every call.

One place builds every channel (the typed clients, the CLI through them, and the
services' own calls to each other), so setting the environment once covers them all:

    MODELPLANE_TLS_CA     PEM CA bundle that signed the servers' certificates
    MODELPLANE_TLS_CERT   PEM client certificate (mutual TLS); needs MODELPLANE_TLS_KEY
    MODELPLANE_TLS_KEY    PEM private key of that certificate
    MODELPLANE_TLS        "1": TLS even with none of the files above (the system's CAs)
    MODELPLANE_TLS_SERVER_NAME  name to verify in the server's certificate instead of
                          the address's host (a server reached through an IP or a tunnel)
    MODELPLANE_TOKEN      bearer token sent as `authorization: Bearer <token>`
    MODELPLANE_TOKEN_FILE a file holding that token (a mounted secret); MODELPLANE_TOKEN
                          wins when both are set

Any of the TLS files set (or MODELPLANE_TLS=1) makes the channel TLS; nothing set leaves
it plaintext, as on a loopback development setup.

The token travels as call metadata added by a client interceptor, on TLS and plaintext
channels alike. gRPC's own `access_token_call_credentials` would refuse plaintext
channels, and `modelplane up` (loopback, no TLS) with authentication on needs a token
too; over plaintext the token is readable by anyone on the path, so a token sent
plaintext to an address other than the loopback logs a warning once per channel.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc

log = logging.getLogger("modelplane.client")

ENV_CA = "MODELPLANE_TLS_CA"
ENV_CERT = "MODELPLANE_TLS_CERT"
ENV_KEY = "MODELPLANE_TLS_KEY"
ENV_TLS = "MODELPLANE_TLS"
ENV_SERVER_NAME = "MODELPLANE_TLS_SERVER_NAME"
ENV_TOKEN = "MODELPLANE_TOKEN"
ENV_TOKEN_FILE = "MODELPLANE_TOKEN_FILE"
AUTHORIZATION_KEY = "authorization"

_TRUE = frozenset({"1", "true", "yes", "on"})
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def _host(address: str) -> str:
    address = address.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    if address.startswith("unix:"):
        return "localhost"
    if address.startswith("["):
        return address[: address.find("]") + 1]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def is_loopback(address: str) -> bool:
    host = _host(address)
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS {what} {path}: {exc.strerror}") from None


def _token_from_file(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text().strip() or None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the token file {path} ({ENV_TOKEN_FILE}): {exc}") from None


@dataclass(frozen=True)
class ClientCredentials:
    """What a client presents to a server. All unset: a plaintext channel, no token."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    token: str | None = None
    # TLS with the system's root CAs when no file is given.
    tls: bool = False
    # Name checked in the server's certificate instead of the address's host.
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = (ENV_CERT, ENV_KEY) if self.key_file is None else (ENV_KEY, ENV_CERT)
            raise ValueError(
                f"a client certificate needs its key: {given} is set but {missing} is not"
            )

    def __repr__(self) -> str:  # never print the token
        token = "set" if self.token else None
        return (
            f"ClientCredentials(ca_file={self.ca_file!r}, cert_file={self.cert_file!r}, "
            f"key_file={self.key_file!r}, token={token!r}, tls={self.tls!r}, "
            f"server_name={self.server_name!r})"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientCredentials:
        """From MODELPLANE_TLS_CA, _TLS_CERT, _TLS_KEY, _TLS, _TLS_SERVER_NAME and
        MODELPLANE_TOKEN or MODELPLANE_TOKEN_FILE (empty counts as unset)."""
        env = os.environ if environ is None else environ

        def path(name: str) -> Path | None:
            value = env.get(name, "").strip()
            return Path(value) if value else None

        return cls(
            ca_file=path(ENV_CA),
            cert_file=path(ENV_CERT),
            key_file=path(ENV_KEY),
            token=env.get(ENV_TOKEN, "").strip() or _token_from_file(path(ENV_TOKEN_FILE)),
            tls=env.get(ENV_TLS, "").strip().lower() in _TRUE,
            server_name=env.get(ENV_SERVER_NAME, "").strip() or None,
        )

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_file is not None or self.cert_file is not None

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, or None for plaintext; files are read now, so a missing one
        is a ValueError naming it, not a handshake failure later."""
        if not self.uses_tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=None if self.ca_file is None else _read(self.ca_file, "CA"),
            private_key=None if self.key_file is None else _read(self.key_file, "key"),
            certificate_chain=(
                None if self.cert_file is None else _read(self.cert_file, "certificate")
            ),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata that carries the token (empty without one)."""
        return ((AUTHORIZATION_KEY, f"Bearer {self.token}"),) if self.token else ()

    def _options(self, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        extra: list[tuple[str, Any]] = []
        if self.server_name and self.uses_tls:
            extra.append(("grpc.ssl_target_name_override", self.server_name))
        return [*options, *extra]

    def _warn_plaintext_token(self, address: str) -> None:
        if self.token and not self.uses_tls and not is_loopback(address):
            log.warning(
                "a bearer token is sent to %s without TLS: set %s (and %s/%s for mTLS)",
                address,
                ENV_CA,
                ENV_CERT,
                ENV_KEY,
            )

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A channel to `address`: TLS or plaintext as set, the token on every call."""
        credentials = self.channel_credentials()
        if credentials is None:
            channel = grpc.insecure_channel(address, options=self._options(options))
        else:
            channel = grpc.secure_channel(address, credentials, options=self._options(options))
        self._warn_plaintext_token(address)
        metadata = self.metadata()
        if not metadata:
            return channel
        return grpc.intercept_channel(channel, _MetadataInterceptor(metadata))

    def aio_channel(
        self, address: str, options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.aio.Channel:
        """The grpc.aio counterpart of `channel` (the load generator's raw channels)."""
        credentials = self.channel_credentials()
        interceptors = [_AioMetadataInterceptor(self.metadata())] if self.token else None
        self._warn_plaintext_token(address)
        if credentials is None:
            return grpc.aio.insecure_channel(
                address, options=self._options(options), interceptors=interceptors
            )
        return grpc.aio.secure_channel(
            address, credentials, options=self._options(options), interceptors=interceptors
        )


def resolve(credentials: ClientCredentials | None) -> ClientCredentials:
    """The credentials given, or those the environment sets."""
    return ClientCredentials.from_env() if credentials is None else credentials


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


def _with_metadata(details: Any, metadata: tuple[tuple[str, str], ...]) -> _CallDetails:
    return _CallDetails(
        details.method,
        details.timeout,
        [*(details.metadata or ()), *metadata],
        details.credentials,
        getattr(details, "wait_for_ready", None),
        getattr(details, "compression", None),
    )


class _MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the token) to every call, whatever its kind."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(_with_metadata(details, self._metadata), request)

    intercept_unary_unary = _call
    intercept_unary_stream = _call
    intercept_stream_unary = _call
    intercept_stream_stream = _call


class _AioMetadataInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._metadata)
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
        )

    async def intercept_unary_unary(  # type: ignore[override]
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)

    async def intercept_unary_stream(  # type: ignore[override]
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)

    async def intercept_stream_unary(  # type: ignore[override]
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)

    async def intercept_stream_stream(  # type: ignore[override]
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)

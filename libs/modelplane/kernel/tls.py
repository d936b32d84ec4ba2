"""TLS for the gRPC port of every service, from the shared settings.

`tls_cert_file` + `tls_key_file` turn the port to TLS; `tls_client_ca_file` as well makes
it mutual: a client that presents no certificate, or one the CA did not sign, fails the
handshake and never reaches a handler. The Prometheus /metrics endpoint is not covered:
it stays plain HTTP, so bind it (metrics_port) to an interface only the scraper reaches."""

from __future__ import annotations

from pathlib import Path

import grpc

from modelplane.kernel.settings import ServiceSettings
from modelplane.kernel.startup import StartupError


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the {what} {path}: {exc.strerror}") from None


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """The TLS credentials the settings ask for; None: serve plaintext. A certificate
    without its key (or the reverse), a client CA without both, or an unreadable file is
    a StartupError naming the setting, raised before anything binds."""
    cert, key, client_ca = (
        settings.tls_cert_file,
        settings.tls_key_file,
        settings.tls_client_ca_file,
    )
    if cert is None and key is None:
        if client_ca is not None:
            raise StartupError(
                "tls_client_ca_file is set but tls_cert_file and tls_key_file are not: "
                "mutual TLS needs the server's own certificate and key"
            )
        return None
    if cert is None or key is None:
        given, missing = (
            ("tls_cert_file", "tls_key_file") if key is None else ("tls_key_file", "tls_cert_file")
        )
        raise StartupError(f"{given} is set but {missing} is not: TLS needs both")
    pair = (_read_pem(key, "TLS key"), _read_pem(cert, "TLS certificate"))
    roots = None if client_ca is None else _read_pem(client_ca, "TLS client CA")
    return grpc.ssl_server_credentials(
        [pair], root_certificates=roots, require_client_auth=roots is not None
    )

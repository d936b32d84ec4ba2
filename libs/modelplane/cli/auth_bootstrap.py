"""`modelplane auth bootstrap DIR`: everything a single-host deployment needs to run with
authentication and TLS on (deploy/compose.yaml runs it once, before the services).

DIR receives:
    ca.crt, ca.key          a CA made for this deployment (clients trust ca.crt)
    server.crt, server.key  one server certificate for the services' names (registry,
                            feature, inference, monitoring and any --host) and loopback
    tokens.jsonl            the salted token hashes every service reads
    tokens/<name>.token     the tokens themselves, one per principal, owner-only:
                            admin (every role: for the operator and the CLI), inference
                            (writer: logs predictions; reads the registry and features),
                            monitoring (reader: references from the registry),
                            feature-materialize (writer)

It refuses to touch a DIR that already holds tokens.jsonl, so re-running it never rotates
credentials under running services (`modelplane auth add-token` adds more). For anything
beyond one host, use your PKI or cert-manager and your own token file (deploy/k8s).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from modelplane.kernel.auth import add_token
from modelplane.kernel.certificates import CertificateAuthority

SERVICE_HOSTS = ("registry", "feature", "inference", "monitoring")
PRINCIPALS: dict[str, tuple[str, ...]] = {
    "admin": ("admin", "approver", "writer", "reader"),
    "inference": ("writer",),
    "monitoring": ("reader",),
    "feature-materialize": ("writer",),
}


class AlreadyBootstrapped(Exception):
    pass


def _write_secret(path: Path, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text + "\n")


def bootstrap(directory: Path, hosts: Iterable[str] = (), valid_days: int = 365) -> list[Path]:
    """Writes the CA, the server certificate and the tokens; returns the files written."""
    tokens_file = directory / "tokens.jsonl"
    if tokens_file.exists():
        raise AlreadyBootstrapped(f"{directory} already holds credentials ({tokens_file})")
    directory.mkdir(parents=True, exist_ok=True)
    authority = CertificateAuthority(directory, name="ca", valid_days=valid_days)
    server = authority.server("server", names=[*SERVICE_HOSTS, *hosts])
    written = [authority.issued.cert, authority.issued.key, server.cert, server.key]
    token_dir = directory / "tokens"
    token_dir.mkdir(mode=0o700, exist_ok=True)
    for name, roles in PRINCIPALS.items():
        path = token_dir / f"{name}.token"
        _write_secret(path, add_token(tokens_file, name, roles))
        written.append(path)
    written.append(tokens_file)
    return written

"""Certificates for TLS and mutual TLS made with `cryptography`: a self-signed CA that
issues server certificates (for the names and addresses clients dial) and client
certificates (whose common name is the caller's identity under mutual TLS).

`modelplane auth bootstrap` uses it to give a single-host deployment (deploy/compose.yaml)
working TLS without an outside PKI; tests use it for their own short-lived CAs. For a
real deployment, certificates come from your PKI or cert-manager (deploy/k8s).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Issued:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    # The key is readable by its owner only, from the moment it exists.
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return Issued(cert_path, key_path)


class CertificateAuthority:
    """A self-signed CA that issues server and client certificates into `directory`,
    each valid for `valid_days`."""

    def __init__(
        self, directory: Path, name: str = "modelplane test CA", valid_days: int = 1
    ) -> None:
        self.directory = directory
        self.valid_days = valid_days
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.issued = _write(directory, name.replace(" ", "-"), self.cert, self.key)

    @property
    def cert_file(self) -> Path:
        return self.issued.cert

    def _issue(
        self, common_name: str, usage: x509.ObjectIdentifier, names: Iterable[str]
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=self.valid_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        san = [_san(name) for name in dict.fromkeys(names)]
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return _write(self.directory, common_name, cert, key)

    def server(self, common_name: str = "server", names: Iterable[str] = ()) -> Issued:
        """For `names` (DNS names or IP addresses) and the loopback (127.0.0.1, ::1,
        localhost), where health checks and local clients dial."""
        return self._issue(common_name, ExtendedKeyUsageOID.SERVER_AUTH, [*names, *LOOPBACK_NAMES])

    def client(self, common_name: str = "client") -> Issued:
        return self._issue(common_name, ExtendedKeyUsageOID.CLIENT_AUTH, [common_name])

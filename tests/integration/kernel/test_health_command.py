"""`modelplane health` / deploy/healthcheck.py (what the container probes run) against
plaintext and TLS servers, credentials from the environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modelplane.cli import health
from modelplane.cli.main import main as cli_main
from modelplane.kernel.settings import ServiceSettings
from tests.certificates import CertificateAuthority
from tests.integration.kernel import echo_service
from tests.support import running_sync

REPO = Path(__file__).resolve().parents[3]
CLIENT_ENV = (
    "MODELPLANE_TLS_CA",
    "MODELPLANE_TLS_CERT",
    "MODELPLANE_TLS_KEY",
    "MODELPLANE_TLS",
    "MODELPLANE_TLS_SERVER_NAME",
    "MODELPLANE_TOKEN",
)


@pytest.fixture(autouse=True)
def _no_credentials_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CLIENT_ENV:
        monkeypatch.delenv(name, raising=False)


def test_plaintext(tmp_path: Path) -> None:
    server = echo_service.sync_server(ServiceSettings(port=0, data_dir=tmp_path, log_json=False))
    with running_sync(server) as address:
        assert health.main([address]) == 0
        assert cli_main(["health", address]) == 0
        assert health.main([address, "no.such.Service", "--timeout", "2"]) == 1
    assert health.main([address, "--timeout", "0.5"]) == 1  # nothing listens any more


def test_tls_with_the_ca_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    issued = ca.server("modelplane-registry")  # also valid for 127.0.0.1 and localhost
    # A certificate naming only the Service, as in a cluster: the probe dials 127.0.0.1.
    service_only = CertificateAuthority(tmp_path / "pki2")
    settings = ServiceSettings(
        port=0,
        data_dir=tmp_path,
        log_json=False,
        tls_cert_file=issued.cert,
        tls_key_file=issued.key,
    )
    server = echo_service.sync_server(settings)
    server.start()
    try:
        address = server.address
        # Plaintext against a TLS port fails.
        assert health.main([address, "--timeout", "2"]) == 1
        monkeypatch.setenv("MODELPLANE_TLS_CA", str(ca.cert_file))
        assert health.main([address]) == 0
        # The certificate is checked against --server-name: a name it lacks fails.
        assert health.main([address, "--server-name", "elsewhere", "--timeout", "2"]) == 1
        assert health.main([address, "--server-name", "localhost"]) == 0
        # A CA that did not sign the server's certificate fails.
        monkeypatch.setenv("MODELPLANE_TLS_CA", str(service_only.cert_file))
        assert health.main([address, "--timeout", "2"]) == 1
        # Unusable credentials are a usage error, not "unhealthy".
        monkeypatch.setenv("MODELPLANE_TLS_CERT", str(issued.cert))
        assert health.main([address]) == 2
        monkeypatch.delenv("MODELPLANE_TLS_CERT")
        # The image's script, run as the probes run it (a process of its own).
        env = {"PATH": "/usr/bin:/bin", "MODELPLANE_TLS_CA": str(ca.cert_file)}
        script = subprocess.run(
            [sys.executable, str(REPO / "deploy" / "healthcheck.py"), address],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert script.returncode == 0, script.stderr
    finally:
        server.stop(grace=0)

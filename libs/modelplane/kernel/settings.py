"""Settings every service shares. Each service subclasses `ServiceSettings` with its
own `MODELPLANE_<SERVICE>_` environment prefix; nothing else reads the environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from modelplane.kernel.cpu_affinity import parse_cpu_list

# Triton's default: the largest message gRPC can frame.
MAX_MESSAGE_BYTES = 2**31 - 1


class ServiceSettings(BaseSettings):
    """Fields common to all four services."""

    model_config = SettingsConfigDict(env_prefix="MODELPLANE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Prometheus /metrics HTTP port; 0 picks one, unset disables.",
    )
    data_dir: Path = Field(
        Path(".modelplane"), description="Directory for embedded state (SQLite files, artifacts)."
    )
    # 64 MiB, not gRPC's largest frame: a bigger request is refused by gRPC before it is
    # read (RESOURCE_EXHAUSTED). What is larger travels in chunks (registry uploads and
    # downloads: at most 4 MiB each) or as a file (a training set with output_path).
    max_message_bytes: int = Field(
        64 * 2**20,
        gt=0,
        le=MAX_MESSAGE_BYTES,
        description="Largest gRPC message sent or received (64 MiB; at most 2 GiB - 1).",
    )
    grace_period_s: float = Field(
        10.0, ge=0, description="Seconds in-flight calls get to finish after SIGTERM."
    )
    # Slow and idle clients: see modelplane.kernel.call_bounds. A waiting call costs a
    # coroutine, not a thread, so the bound on calls in flight is sized in the thousands.
    request_body_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds a call may wait for its whole request message after its start; "
        "then DEADLINE_EXCEEDED.",
    )
    stream_idle_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Seconds a client stream may send nothing while the server sends nothing "
        "either; then DEADLINE_EXCEEDED (server-streaming watches are never idle).",
    )
    max_concurrent_rpcs: int = Field(
        4096,
        ge=1,
        description="Calls in flight (those waiting for their request included); more are "
        "refused at once with RESOURCE_EXHAUSTED.",
    )
    log_level: str = Field("INFO", description="Log level (DEBUG, INFO, WARNING, ERROR).")
    log_json: bool = Field(True, description="Log one JSON object per line instead of plain text.")
    tracing_enabled: bool | None = Field(
        None,
        description="Create OpenTelemetry spans for RPCs; unset: only when an OTLP endpoint is set",
    )
    otlp_endpoint: str | None = Field(
        None, description="OTLP/gRPC collector address for spans; unset exports nothing."
    )
    auth_tokens_file: Path | None = Field(
        None,
        description="Bearer token file (`modelplane auth add-token`); set: every RPC needs a "
        "token whose roles allow it (see modelplane.kernel.auth); unset: no authentication.",
    )
    auth_open_methods: tuple[str, ...] = Field(
        (
            "/grpc.health.v1.Health/",
            "/grpc.reflection.v1alpha.ServerReflection/",
            "/grpc.reflection.v1.ServerReflection/",
        ),
        description="RPCs callable without a token when auth is on: '/pkg.Service/Method', "
        "or '/pkg.Service/' for all of a service.",
    )
    cpus: str = Field(
        "",
        description="CPUs the process runs on, as a Linux CPU list ('1', '0-3'); empty leaves "
        "placement to the OS. One CPU per process suits a Python server: "
        "see modelplane.kernel.cpu_affinity.",
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM server certificate (chain); with tls_key_file the port serves TLS."
    )
    tls_key_file: Path | None = Field(
        None, description="PEM private key of tls_cert_file; required when the cert is set."
    )
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle; set: clients must present a certificate it signed (mTLS)."
    )

    @field_validator("cpus")
    @classmethod
    def _cpu_list(cls, value: str) -> str:
        parse_cpu_list(value)  # a ValueError here is a settings error naming the field
        return value

    @property
    def cpu_set(self) -> frozenset[int]:
        return parse_cpu_list(self.cpus)

    @property
    def spans_enabled(self) -> bool:
        """Spans cost ~100 µs of CPU per RPC even when dropped (measured), so by default
        they are made only when something exports them."""
        if self.tracing_enabled is None:
            return self.otlp_endpoint is not None
        return self.tracing_enabled

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

"""Where registry metadata lives: the `Store` contract and its SQLite and PostgreSQL
implementations (one contract test suite runs against both)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from modelplane.services.registry.domain import (
    Alias,
    AliasEvent,
    ApprovalPolicy,
    AuditEvent,
    AuditFilter,
    Model,
    ModelVersion,
    NewModel,
    NewVersion,
    Review,
    ReviewDecision,
    RolloutPolicy,
    RouteWeight,
    ShadowRoute,
    VersionStatus,
)


class Store(Protocol):
    """Blocking; the servicer runs it off the event loop."""

    def create_model(self, new: NewModel, actor: str) -> Model: ...
    def get_model(self, name: str) -> Model: ...
    def list_models(
        self,
        query: str = "",
        owner: str = "",
        tags: Mapping[str, str] | None = None,
        after: str = "",
        limit: int = 100,
    ) -> list[Model]: ...
    def set_approval_policy(self, name: str, policy: ApprovalPolicy, actor: str) -> Model: ...
    def create_version(self, model: str, new: NewVersion, actor: str) -> ModelVersion: ...
    def get_version(self, model: str, version: int) -> ModelVersion: ...
    def get_version_by_alias(self, model: str, alias: str) -> ModelVersion: ...
    def list_versions(
        self, model: str, before: int = 0, limit: int = 100
    ) -> list[ModelVersion]: ...
    def referenced_digests(self) -> set[str]: ...
    def set_version_status(
        self, model: str, version: int, status: VersionStatus, reason: str, actor: str
    ) -> ModelVersion: ...
    def add_review(
        self, model: str, version: int, decision: ReviewDecision, comment: str, actor: str
    ) -> tuple[Review, ModelVersion]: ...
    def list_reviews(self, model: str, version: int) -> list[Review]: ...
    def set_alias(
        self, model: str, alias: str, version: int, expected_version: int, reason: str, actor: str
    ) -> tuple[Alias, AliasEvent]: ...
    def delete_alias(
        self, model: str, alias: str, expected_version: int, reason: str, actor: str
    ) -> AliasEvent: ...
    def list_aliases(self, model: str) -> list[Alias]: ...
    def alias_history(self, model: str, alias: str = "") -> list[AliasEvent]: ...
    def alias_event(self, event_id: int) -> AliasEvent: ...
    def alias_at(self, model: str, alias: str, at_us: int) -> AliasEvent: ...
    def set_rollout(
        self,
        model: str,
        routes: tuple[RouteWeight, ...],
        shadow: ShadowRoute,
        expected_revision: int,
        reason: str,
        actor: str,
    ) -> RolloutPolicy: ...
    def get_rollout(self, model: str, revision: int = 0) -> RolloutPolicy: ...
    def record_audit(
        self, actor: str, action: str, target: str, details: Mapping[str, object]
    ) -> None: ...
    def list_audit(
        self, filters: AuditFilter, before_id: int = 0, limit: int = 100
    ) -> list[AuditEvent]: ...
    def schema_version(self) -> int: ...
    def close(self) -> None: ...


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_store(url: str, default_sqlite: Path, schema: str = "", pool_size: int = 10) -> Store:
    """`postgresql://...` selects PostgreSQL; a path (or `sqlite:///path`) selects SQLite;
    empty means the SQLite file `default_sqlite`."""
    if is_postgres_url(url):
        from modelplane.services.registry.store.postgres import PostgresStore

        return PostgresStore(url, schema=schema, max_connections=pool_size)
    from modelplane.services.registry.store.sqlite import SqliteStore

    if not url:
        return SqliteStore(default_sqlite)
    return SqliteStore(Path(url.removeprefix("sqlite:///") if url.startswith("sqlite:") else url))

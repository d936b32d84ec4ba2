"""The registry's SQL, shared by SQLite and PostgreSQL.

Both dialects run the same statements (written with `?` placeholders, translated for
psycopg); the subclasses supply connections, transactions and row locking. Every
mutation runs in one write transaction that first locks the model's row, so version
numbers, alias compare-and-set and approval checks see a state no concurrent writer
can change underneath them, and its audit event commits or rolls back with it.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from modelplane.kernel.errors import AlreadyExists, NotFound
from modelplane.services.registry import domain
from modelplane.services.registry.domain import (
    Alias,
    AliasEvent,
    ApprovalPolicy,
    Artifact,
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
    VersionMetadata,
    VersionStatus,
)
from modelplane.services.registry.store import codec
from modelplane.services.registry.store.migrations import LATEST_VERSION, MIGRATIONS

_MODEL_COLUMNS = (
    "name, description, owner, required_approvals, protected_aliases, latest_version,"
    " created_us, created_by, allow_self_approval"
)
_VERSION_COLUMNS = (
    "model, version, description, sha256, size_bytes, format, signature, lineage, card,"
    " feature_statistics, status, created_us, created_by, serving_config, feature_input"
)
_EVENT_COLUMNS = "model, alias, from_version, to_version, actor, time_us, reason"
_EVENT_SELECT = _EVENT_COLUMNS + ", id"
_ROLLOUT_COLUMNS = (
    "model, revision, routes, shadow_alias, shadow_percent, updated_us, updated_by, reason"
)


def now_us() -> int:
    return time.time_ns() // 1000


class Tx:
    """One open transaction: runs statements written with `?` placeholders."""

    def __init__(self, cursor: Any, placeholder: str) -> None:
        self._cursor = cursor
        self._placeholder = placeholder

    def execute(self, sql: str, params: Sequence[object] = ()) -> Any:
        if self._placeholder != "?":
            sql = sql.replace("?", self._placeholder)
        self._cursor.execute(sql, tuple(params))
        return self._cursor

    def one(self, sql: str, params: Sequence[object] = ()) -> tuple[Any, ...] | None:
        row = self.execute(sql, params).fetchone()
        return tuple(row) if row is not None else None

    def all(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self.execute(sql, params).fetchall()]


class SqlStore(ABC):
    """The Store contract over a SQL database. Blocking: run it off the event loop."""

    # Appended to the SELECT that locks a model row; SQLite needs none (its write
    # transactions already exclude each other).
    lock_clause = ""

    @abstractmethod
    def _transaction(self, write: bool) -> AbstractContextManager[Tx]: ...

    @abstractmethod
    def _migration_transaction(self) -> AbstractContextManager[Tx]: ...

    @abstractmethod
    def _dialect(self) -> Mapping[str, str]: ...

    @abstractmethod
    def close(self) -> None: ...

    def _notify(self, tx: Tx, change: Mapping[str, object]) -> None:
        """Announces a committed change to every registry process. Only PostgreSQL has a
        way (NOTIFY); with SQLite each process's servicer fans out its own changes."""
        return None

    # --- schema ---------------------------------------------------------------------------

    def migrate(self) -> int:
        """Applies the migrations this database lacks; returns the schema version."""
        with self._migration_transaction() as tx:
            tx.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY,"
                " name TEXT NOT NULL, applied_us BIGINT NOT NULL)"
            )
            applied = {row[0] for row in tx.all("SELECT version FROM schema_migrations")}
            if applied and max(applied) > LATEST_VERSION:
                raise RuntimeError(
                    f"database schema version {max(applied)} is newer than this release"
                    f" understands ({LATEST_VERSION}); upgrade modelplane"
                )
            for migration in MIGRATIONS:
                if migration.version in applied:
                    continue
                for statement in migration.statements:
                    tx.execute(statement.format(**self._dialect()))
                tx.execute(
                    "INSERT INTO schema_migrations (version, name, applied_us) VALUES (?, ?, ?)",
                    (migration.version, migration.name, now_us()),
                )
        return LATEST_VERSION

    def schema_version(self) -> int:
        with self._transaction(write=False) as tx:
            row = tx.one("SELECT MAX(version) FROM schema_migrations")
        return int(row[0]) if row and row[0] is not None else 0

    # --- models ---------------------------------------------------------------------------

    def create_model(self, new: NewModel, actor: str) -> Model:
        domain.validate_new_model(new)
        created = now_us()
        policy = new.approval_policy
        with self._transaction(write=True) as tx:
            row = tx.one(
                f"INSERT INTO models ({_MODEL_COLUMNS}) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)"
                " ON CONFLICT (name) DO NOTHING RETURNING name",
                (
                    new.name,
                    new.description,
                    new.owner,
                    policy.required_approvals,
                    codec.dumps(list(policy.protected_aliases)),
                    created,
                    actor,
                    int(policy.allow_self_approval),
                ),
            )
            if row is None:
                raise AlreadyExists(f"model {new.name!r} already exists")
            for key, value in sorted(new.tags.items()):
                tx.execute(
                    "INSERT INTO model_tags (model, key, value) VALUES (?, ?, ?)",
                    (new.name, key, value),
                )
            self._audit(
                tx,
                actor,
                "model.create",
                new.name,
                {"owner": new.owner, "tags": dict(new.tags)},
                created,
            )
            return self._model(tx, new.name)

    def get_model(self, name: str) -> Model:
        with self._transaction(write=False) as tx:
            return self._model(tx, name)

    def list_models(
        self,
        query: str = "",
        owner: str = "",
        tags: Mapping[str, str] | None = None,
        after: str = "",
        limit: int = domain.DEFAULT_PAGE_SIZE,
    ) -> list[Model]:
        sql = f"SELECT {_MODEL_COLUMNS} FROM models m WHERE name > ?"
        params: list[object] = [after]
        if query:
            sql += " AND (lower(name) LIKE ? OR lower(description) LIKE ?)"
            pattern = "%" + query.lower() + "%"
            params += [pattern, pattern]
        if owner:
            sql += " AND owner = ?"
            params.append(owner)
        for key, value in sorted((tags or {}).items()):
            sql += (
                " AND EXISTS (SELECT 1 FROM model_tags t WHERE t.model = m.name"
                " AND t.key = ? AND t.value = ?)"
            )
            params += [key, value]
        sql += " ORDER BY name LIMIT ?"
        params.append(limit)
        with self._transaction(write=False) as tx:
            rows = tx.all(sql, params)
            return [self._model_from_row(tx, row) for row in rows]

    def set_approval_policy(self, name: str, policy: ApprovalPolicy, actor: str) -> Model:
        domain.validate_policy(policy)
        with self._transaction(write=True) as tx:
            self._lock_model(tx, name)
            tx.execute(
                "UPDATE models SET required_approvals = ?, protected_aliases = ?,"
                " allow_self_approval = ? WHERE name = ?",
                (
                    policy.required_approvals,
                    codec.dumps(list(policy.protected_aliases)),
                    int(policy.allow_self_approval),
                    name,
                ),
            )
            self._audit(
                tx,
                actor,
                "model.policy.set",
                name,
                {
                    "required_approvals": policy.required_approvals,
                    "protected_aliases": list(policy.protected_aliases),
                    "allow_self_approval": policy.allow_self_approval,
                },
            )
            return self._model(tx, name)

    # --- versions -------------------------------------------------------------------------

    def create_version(self, model: str, new: NewVersion, actor: str) -> ModelVersion:
        """Registers the next version number; concurrent creators each get their own."""
        new = domain.checked_version(new)
        created = now_us()
        with self._transaction(write=True) as tx:
            self._lock_model(tx, model)
            # The increment is the number allocator: the row lock it takes (or SQLite's
            # single writer) makes concurrent creators queue, so numbers never collide.
            row = tx.one(
                "UPDATE models SET latest_version = latest_version + 1 WHERE name = ?"
                " RETURNING latest_version",
                (model,),
            )
            assert row is not None
            number = int(row[0])
            meta = new.metadata
            tx.execute(
                f"INSERT INTO versions ({_VERSION_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    model,
                    number,
                    meta.description,
                    new.artifact.sha256,
                    new.artifact.size_bytes,
                    new.artifact.format,
                    codec.signature_to_json(new.signature),
                    codec.lineage_to_json(meta.lineage),
                    codec.card_to_json(meta.card),
                    codec.stats_to_json(meta.feature_statistics),
                    VersionStatus.REGISTERED.value,
                    created,
                    actor,
                    meta.serving_config,
                    codec.feature_input_to_json(meta.feature_input),
                ),
            )
            self._notify(tx, {"kind": "version", "model": model, "version": number})
            self._audit(
                tx,
                actor,
                "version.create",
                f"{model}/v{number}",
                {
                    "sha256": new.artifact.sha256,
                    "size_bytes": new.artifact.size_bytes,
                    "feature_input": (
                        None if meta.feature_input is None else meta.feature_input.details()
                    ),
                },
                created,
            )
            return self._version(tx, model, number)

    def get_version(self, model: str, version: int) -> ModelVersion:
        with self._transaction(write=False) as tx:
            self._model(tx, model)
            return self._version(tx, model, version)

    def get_version_by_alias(self, model: str, alias: str) -> ModelVersion:
        with self._transaction(write=False) as tx:
            self._model(tx, model)
            row = tx.one(
                "SELECT version FROM aliases WHERE model = ? AND alias = ?", (model, alias)
            )
            if row is None:
                raise NotFound(f"model {model!r} has no alias {domain.quote(alias)}")
            return self._version(tx, model, int(row[0]))

    def list_versions(
        self, model: str, before: int = 0, limit: int = domain.DEFAULT_PAGE_SIZE
    ) -> list[ModelVersion]:
        with self._transaction(write=False) as tx:
            self._model(tx, model)
            sql = f"SELECT {_VERSION_COLUMNS} FROM versions WHERE model = ?"
            params: list[object] = [model]
            if before > 0:
                sql += " AND version < ?"
                params.append(before)
            rows = tx.all(sql + " ORDER BY version DESC LIMIT ?", [*params, limit])
            aliases = self._aliases_by_version(tx, model)
            reviews = self._reviews_by_version(tx, model)
            return [
                self._version_from_row(
                    row, aliases.get(int(row[1]), ()), reviews.get(int(row[1]), [])
                )
                for row in rows
            ]

    def referenced_digests(self) -> set[str]:
        with self._transaction(write=False) as tx:
            return {row[0] for row in tx.all("SELECT DISTINCT sha256 FROM versions")}

    def set_version_status(
        self, model: str, version: int, status: VersionStatus, reason: str, actor: str
    ) -> ModelVersion:
        with self._transaction(write=True) as tx:
            policy = self._lock_model(tx, model)
            current = self._version(tx, model, version)
            new_status = domain.check_status_change(
                model,
                version,
                current.status,
                status,
                current.aliases,
                current.approvals,
                policy,
            )
            if new_status != current.status:
                tx.execute(
                    "UPDATE versions SET status = ? WHERE model = ? AND version = ?",
                    (new_status.value, model, version),
                )
            self._audit(
                tx,
                actor,
                "version.status.set",
                f"{model}/v{version}",
                {"from": current.status.value, "to": new_status.value, "reason": reason},
            )
            return self._version(tx, model, version)

    def add_review(
        self,
        model: str,
        version: int,
        decision: ReviewDecision,
        comment: str,
        actor: str,
    ) -> tuple[Review, ModelVersion]:
        when = now_us()
        with self._transaction(write=True) as tx:
            policy = self._lock_model(tx, model)
            current = self._version(tx, model, version)
            domain.check_reviewable(model, version, current.status)
            tx.execute(
                "INSERT INTO reviews (model, version, actor, decision, comment, time_us)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (model, version, actor, decision.value, comment, when),
            )
            approvals = domain.count_approvals(self._reviews(tx, model, version))
            new_status = domain.status_after_review(current.status, approvals, policy)
            if new_status != current.status:
                tx.execute(
                    "UPDATE versions SET status = ? WHERE model = ? AND version = ?",
                    (new_status.value, model, version),
                )
            self._audit(
                tx,
                actor,
                f"version.review.{decision.value}",
                f"{model}/v{version}",
                {"comment": comment, "approvals": approvals},
                when,
            )
            review = Review(model, version, actor, decision, comment, codec.from_us(when))
            return review, self._version(tx, model, version)

    def list_reviews(self, model: str, version: int) -> list[Review]:
        with self._transaction(write=False) as tx:
            self._version(tx, model, version)
            return self._reviews(tx, model, version)

    # --- aliases --------------------------------------------------------------------------

    def set_alias(
        self,
        model: str,
        alias: str,
        version: int,
        expected_version: int,
        reason: str,
        actor: str,
    ) -> tuple[Alias, AliasEvent]:
        domain.validate_alias_name(alias)
        domain.validate_version_number(version)
        when = now_us()
        with self._transaction(write=True) as tx:
            policy = self._lock_model(tx, model)
            target = self._version(tx, model, version)
            current = self._alias_holder(tx, model, alias)
            domain.check_alias_expectation(model, alias, current, expected_version)
            domain.check_alias_target(
                model,
                alias,
                version,
                target.status,
                target.approvals,
                policy,
                self._rollout(tx, model).routed_aliases,
            )
            event = self._record_move(tx, model, alias, current or 0, version, actor, when, reason)
            if current is None:
                tx.execute(
                    "INSERT INTO aliases (model, alias, version, updated_us, updated_by, event_id)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (model, alias, version, when, actor, event.id),
                )
            else:
                tx.execute(
                    "UPDATE aliases SET version = ?, updated_us = ?, updated_by = ?, event_id = ?"
                    " WHERE model = ? AND alias = ?",
                    (version, when, actor, event.id, model, alias),
                )
            return Alias(model, alias, version, codec.from_us(when), actor, event.id), event

    def delete_alias(
        self, model: str, alias: str, expected_version: int, reason: str, actor: str
    ) -> AliasEvent:
        domain.validate_alias_name(alias)
        when = now_us()
        with self._transaction(write=True) as tx:
            self._lock_model(tx, model)
            current = self._alias_holder(tx, model, alias)
            if current is None:
                raise NotFound(f"model {model!r} has no alias {alias!r}")
            domain.check_alias_expectation(model, alias, current, expected_version)
            domain.check_alias_removable(model, alias, self._rollout(tx, model))
            tx.execute("DELETE FROM aliases WHERE model = ? AND alias = ?", (model, alias))
            return self._record_move(tx, model, alias, current, 0, actor, when, reason)

    def list_aliases(self, model: str) -> list[Alias]:
        with self._transaction(write=False) as tx:
            self._model(tx, model)
            rows = tx.all(
                "SELECT model, alias, version, updated_us, updated_by, event_id FROM aliases"
                " WHERE model = ? ORDER BY alias",
                (model,),
            )
        return [Alias(r[0], r[1], int(r[2]), codec.from_us(r[3]), r[4], int(r[5])) for r in rows]

    def alias_history(self, model: str, alias: str = "") -> list[AliasEvent]:
        with self._transaction(write=False) as tx:
            self._model(tx, model)
            sql = f"SELECT {_EVENT_SELECT} FROM alias_history WHERE model = ?"
            params: list[object] = [model]
            if alias:
                sql += " AND alias = ?"
                params.append(alias)
            rows = tx.all(sql + " ORDER BY id", params)
        return [self._event_from_row(row) for row in rows]

    def alias_event(self, event_id: int) -> AliasEvent:
        with self._transaction(write=False) as tx:
            row = tx.one(f"SELECT {_EVENT_SELECT} FROM alias_history WHERE id = ?", (event_id,))
        if row is None:
            raise NotFound(f"no alias event {event_id}")
        return self._event_from_row(row)

    def alias_at(self, model: str, alias: str, at_us: int) -> AliasEvent:
        """The move that set what `alias` pointed at, at time `at_us`."""
        with self._transaction(write=False) as tx:
            self._model(tx, model)
            row = tx.one(
                f"SELECT {_EVENT_SELECT} FROM alias_history WHERE model = ? AND alias = ?"
                " AND time_us <= ? ORDER BY time_us DESC, id DESC LIMIT 1",
                (model, alias, at_us),
            )
        if row is None or int(row[3]) == 0:
            raise NotFound(f"alias {alias!r} of {model} was not set at that time")
        return self._event_from_row(row)

    # --- rollout policies -----------------------------------------------------------------

    def set_rollout(
        self,
        model: str,
        routes: tuple[RouteWeight, ...],
        shadow: ShadowRoute,
        expected_revision: int,
        reason: str,
        actor: str,
    ) -> RolloutPolicy:
        """Stores the next revision of the model's policy if `expected_revision` is the
        current one; the aliases it names are checked in the same transaction."""
        shadow = domain.validate_rollout(routes, shadow)
        domain.validate_text("reason", reason)
        when = now_us()
        with self._transaction(write=True) as tx:
            approval_policy = self._lock_model(tx, model)
            current = self._rollout(tx, model)
            domain.check_rollout_revision(model, current.revision, expected_revision)
            holders = {
                alias: int(version)
                for alias, version in tx.all(
                    "SELECT alias, version FROM aliases WHERE model = ?", (model,)
                )
            }
            approvals = {
                number: domain.count_approvals(reviews)
                for number, reviews in self._reviews_by_version(tx, model).items()
            }
            domain.check_rollout(model, routes, shadow, holders, approvals, approval_policy)
            policy = RolloutPolicy(
                model,
                tuple(routes),
                shadow,
                current.revision + 1,
                codec.from_us(when),
                actor,
                reason,
            )
            tx.execute(
                f"INSERT INTO rollout_policies ({_ROLLOUT_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    model,
                    policy.revision,
                    codec.routes_to_json(policy.routes),
                    shadow.alias,
                    shadow.percent,
                    when,
                    actor,
                    reason,
                ),
            )
            self._notify(tx, {"kind": "rollout", "model": model, "revision": policy.revision})
            self._audit(tx, actor, "rollout.set", model, policy.details(), when)
            return policy

    def get_rollout(self, model: str, revision: int = 0) -> RolloutPolicy:
        """The model's current policy (revision 0 if never set), or the given revision."""
        with self._transaction(write=False) as tx:
            self._model(tx, model)
            if revision <= 0:
                return self._rollout(tx, model)
            row = tx.one(
                f"SELECT {_ROLLOUT_COLUMNS} FROM rollout_policies WHERE model = ? AND revision = ?",
                (model, revision),
            )
        if row is None:
            raise NotFound(f"model {model!r} has no rollout policy revision {revision}")
        return self._rollout_from_row(row)

    # --- audit ----------------------------------------------------------------------------

    def record_audit(
        self, actor: str, action: str, target: str, details: Mapping[str, object]
    ) -> None:
        """Records a call outside a mutation (e.g. a refused one)."""
        with self._transaction(write=True) as tx:
            self._audit(tx, actor, action, target, details)

    def list_audit(
        self,
        filters: AuditFilter,
        before_id: int = 0,
        limit: int = domain.DEFAULT_PAGE_SIZE,
    ) -> list[AuditEvent]:
        sql = "SELECT id, time_us, actor, action, target, details FROM audit_events WHERE 1 = 1"
        params: list[object] = []
        if before_id > 0:
            sql += " AND id < ?"
            params.append(before_id)
        if filters.actor:
            sql += " AND actor = ?"
            params.append(filters.actor)
        if filters.action:
            sql += " AND action = ?"
            params.append(filters.action)
        if filters.target_prefix:
            # substr, not LIKE: target names may contain LIKE's wildcards.
            sql += " AND substr(target, 1, ?) = ?"
            params += [len(filters.target_prefix), filters.target_prefix]
        if filters.since is not None:
            sql += " AND time_us >= ?"
            params.append(codec.to_us(filters.since))
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        with self._transaction(write=False) as tx:
            rows = tx.all(sql, params)
        return [
            AuditEvent(int(r[0]), codec.from_us(r[1]), r[2], r[3], r[4], json.loads(r[5]))
            for r in rows
        ]

    # --- helpers --------------------------------------------------------------------------

    def _audit(
        self,
        tx: Tx,
        actor: str,
        action: str,
        target: str,
        details: Mapping[str, object],
        when: int | None = None,
    ) -> None:
        tx.execute(
            "INSERT INTO audit_events (time_us, actor, action, target, details)"
            " VALUES (?, ?, ?, ?, ?)",
            (when or now_us(), actor, action, target, domain.details_json(details)),
        )

    def _lock_model(self, tx: Tx, name: str) -> ApprovalPolicy:
        row = tx.one(
            "SELECT required_approvals, protected_aliases, allow_self_approval FROM models"
            " WHERE name = ?" + self.lock_clause,
            (name,),
        )
        if row is None:
            raise NotFound(f"model {name!r} not found")
        return ApprovalPolicy(int(row[0]), tuple(_json_list(row[1])), bool(row[2]))

    def _model(self, tx: Tx, name: str) -> Model:
        row = tx.one(f"SELECT {_MODEL_COLUMNS} FROM models WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"model {name!r} not found")
        return self._model_from_row(tx, row)

    def _model_from_row(self, tx: Tx, row: tuple[Any, ...]) -> Model:
        tags = dict(
            tx.all("SELECT key, value FROM model_tags WHERE model = ? ORDER BY key", (row[0],))
        )
        return Model(
            name=row[0],
            description=row[1],
            owner=row[2],
            tags=tags,
            approval_policy=ApprovalPolicy(int(row[3]), tuple(_json_list(row[4])), bool(row[8])),
            latest_version=int(row[5]),
            created_at=codec.from_us(row[6]),
            created_by=row[7],
        )

    def _version(self, tx: Tx, model: str, version: int) -> ModelVersion:
        row = tx.one(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE model = ? AND version = ?",
            (model, version),
        )
        if row is None:
            if tx.one("SELECT 1 FROM models WHERE name = ?", (model,)) is None:
                raise NotFound(f"model {model!r} not found")
            raise NotFound(f"model {model!r} has no version {version}")
        aliases = tuple(
            r[0]
            for r in tx.all(
                "SELECT alias FROM aliases WHERE model = ? AND version = ? ORDER BY alias",
                (model, version),
            )
        )
        return self._version_from_row(row, aliases, self._reviews(tx, model, version))

    def _version_from_row(
        self, row: tuple[Any, ...], aliases: Sequence[str], reviews: Sequence[Review]
    ) -> ModelVersion:
        return ModelVersion(
            model=row[0],
            version=int(row[1]),
            artifact=Artifact(sha256=row[3], size_bytes=int(row[4]), format=row[5]),
            signature=codec.signature_from_json(row[6]),
            metadata=VersionMetadata(
                description=row[2],
                lineage=codec.lineage_from_json(row[7]),
                card=codec.card_from_json(row[8]),
                feature_statistics=codec.stats_from_json(row[9]),
                serving_config=row[13],
                feature_input=codec.feature_input_from_json(row[14]),
            ),
            status=VersionStatus(row[10]),
            created_at=codec.from_us(row[11]),
            created_by=row[12],
            aliases=tuple(aliases),
            approvals=domain.count_approvals(reviews),
        )

    def _reviews(self, tx: Tx, model: str, version: int) -> list[Review]:
        rows = tx.all(
            "SELECT model, version, actor, decision, comment, time_us FROM reviews"
            " WHERE model = ? AND version = ? ORDER BY id",
            (model, version),
        )
        return [self._review_from_row(r) for r in rows]

    def _reviews_by_version(self, tx: Tx, model: str) -> dict[int, list[Review]]:
        grouped: dict[int, list[Review]] = {}
        for row in tx.all(
            "SELECT model, version, actor, decision, comment, time_us FROM reviews"
            " WHERE model = ? ORDER BY id",
            (model,),
        ):
            grouped.setdefault(int(row[1]), []).append(self._review_from_row(row))
        return grouped

    def _aliases_by_version(self, tx: Tx, model: str) -> dict[int, tuple[str, ...]]:
        grouped: dict[int, tuple[str, ...]] = {}
        for alias, version in tx.all(
            "SELECT alias, version FROM aliases WHERE model = ? ORDER BY alias", (model,)
        ):
            grouped[int(version)] = (*grouped.get(int(version), ()), alias)
        return grouped

    @staticmethod
    def _review_from_row(row: tuple[Any, ...]) -> Review:
        return Review(
            row[0], int(row[1]), row[2], ReviewDecision(row[3]), row[4], codec.from_us(row[5])
        )

    def _rollout(self, tx: Tx, model: str) -> RolloutPolicy:
        row = tx.one(
            f"SELECT {_ROLLOUT_COLUMNS} FROM rollout_policies WHERE model = ?"
            " ORDER BY revision DESC LIMIT 1",
            (model,),
        )
        return RolloutPolicy(model) if row is None else self._rollout_from_row(row)

    @staticmethod
    def _rollout_from_row(row: tuple[Any, ...]) -> RolloutPolicy:
        return RolloutPolicy(
            model=row[0],
            revision=int(row[1]),
            routes=codec.routes_from_json(row[2]),
            shadow=ShadowRoute(row[3], int(row[4])),
            updated_at=codec.from_us(row[5]),
            updated_by=row[6],
            reason=row[7],
        )

    def _alias_holder(self, tx: Tx, model: str, alias: str) -> int | None:
        row = tx.one("SELECT version FROM aliases WHERE model = ? AND alias = ?", (model, alias))
        return int(row[0]) if row is not None else None

    def _record_move(
        self,
        tx: Tx,
        model: str,
        alias: str,
        from_version: int,
        to_version: int,
        actor: str,
        when: int,
        reason: str,
    ) -> AliasEvent:
        row = tx.one(
            f"INSERT INTO alias_history ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " RETURNING id",
            (model, alias, from_version, to_version, actor, when, reason),
        )
        assert row is not None
        # Only the id travels: a NOTIFY payload is limited to 8000 bytes, a reason is not.
        self._notify(tx, {"kind": "alias", "model": model, "id": int(row[0])})
        self._audit(
            tx,
            actor,
            "alias.set" if to_version else "alias.delete",
            f"{model}@{alias}",
            {"from": from_version, "to": to_version, "reason": reason},
            when,
        )
        return AliasEvent(
            model, alias, from_version, to_version, actor, codec.from_us(when), reason, int(row[0])
        )

    @staticmethod
    def _event_from_row(row: tuple[Any, ...]) -> AliasEvent:
        return AliasEvent(
            row[0],
            row[1],
            int(row[2]),
            int(row[3]),
            row[4],
            codec.from_us(row[5]),
            row[6],
            int(row[7]),
        )


def _json_list(text: str) -> list[str]:
    value = json.loads(text)
    return [str(item) for item in value]

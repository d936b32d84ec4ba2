"""Versioned schema migrations, applied in order at start and recorded in
`schema_migrations`. A migration is never edited once released: changes are new
migrations. `{id}` stands for each dialect's auto-increment primary key."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "models, versions, aliases, reviews, audit",
        (
            """CREATE TABLE models (
                name TEXT PRIMARY KEY,
                description TEXT NOT NULL,
                owner TEXT NOT NULL,
                required_approvals BIGINT NOT NULL,
                protected_aliases TEXT NOT NULL,
                latest_version BIGINT NOT NULL,
                created_us BIGINT NOT NULL,
                created_by TEXT NOT NULL
            )""",
            """CREATE TABLE model_tags (
                model TEXT NOT NULL REFERENCES models (name),
                key TEXT NOT NULL,
                value TEXT NOT NULL,
                PRIMARY KEY (model, key)
            )""",
            "CREATE INDEX model_tags_by_key_value ON model_tags (key, value)",
            """CREATE TABLE versions (
                model TEXT NOT NULL REFERENCES models (name),
                version BIGINT NOT NULL,
                description TEXT NOT NULL,
                sha256 TEXT NOT NULL,
                size_bytes BIGINT NOT NULL,
                format TEXT NOT NULL,
                signature TEXT NOT NULL,
                lineage TEXT NOT NULL,
                card TEXT NOT NULL,
                feature_statistics TEXT NOT NULL,
                status TEXT NOT NULL,
                created_us BIGINT NOT NULL,
                created_by TEXT NOT NULL,
                PRIMARY KEY (model, version)
            )""",
            "CREATE INDEX versions_by_sha256 ON versions (sha256)",
            """CREATE TABLE aliases (
                model TEXT NOT NULL REFERENCES models (name),
                alias TEXT NOT NULL,
                version BIGINT NOT NULL,
                updated_us BIGINT NOT NULL,
                updated_by TEXT NOT NULL,
                PRIMARY KEY (model, alias),
                FOREIGN KEY (model, version) REFERENCES versions (model, version)
            )""",
            """CREATE TABLE alias_history (
                id {id},
                model TEXT NOT NULL,
                alias TEXT NOT NULL,
                from_version BIGINT NOT NULL,
                to_version BIGINT NOT NULL,
                actor TEXT NOT NULL,
                time_us BIGINT NOT NULL,
                reason TEXT NOT NULL
            )""",
            "CREATE INDEX alias_history_by_time ON alias_history (model, alias, time_us)",
            """CREATE TABLE reviews (
                id {id},
                model TEXT NOT NULL,
                version BIGINT NOT NULL,
                actor TEXT NOT NULL,
                decision TEXT NOT NULL,
                comment TEXT NOT NULL,
                time_us BIGINT NOT NULL,
                FOREIGN KEY (model, version) REFERENCES versions (model, version)
            )""",
            "CREATE INDEX reviews_by_version ON reviews (model, version)",
            """CREATE TABLE audit_events (
                id {id},
                time_us BIGINT NOT NULL,
                actor TEXT NOT NULL,
                action TEXT NOT NULL,
                target TEXT NOT NULL,
                details TEXT NOT NULL
            )""",
            "CREATE INDEX audit_events_by_time ON audit_events (time_us)",
        ),
    ),
    Migration(
        2,
        "versions.serving_config",
        ("ALTER TABLE versions ADD COLUMN serving_config TEXT NOT NULL DEFAULT ''",),
    ),
    Migration(
        3,
        "aliases.event_id: the alias_history row of the move that put the alias there",
        (
            "ALTER TABLE aliases ADD COLUMN event_id BIGINT NOT NULL DEFAULT 0",
            """UPDATE aliases SET event_id = COALESCE((
                SELECT MAX(h.id) FROM alias_history h
                WHERE h.model = aliases.model AND h.alias = aliases.alias
            ), 0)""",
        ),
    ),
    Migration(
        4,
        "rollout_policies: one row per revision of a model's rollout policy",
        (
            """CREATE TABLE rollout_policies (
                model TEXT NOT NULL REFERENCES models (name),
                revision BIGINT NOT NULL,
                routes TEXT NOT NULL,
                shadow_alias TEXT NOT NULL,
                shadow_percent BIGINT NOT NULL,
                updated_us BIGINT NOT NULL,
                updated_by TEXT NOT NULL,
                reason TEXT NOT NULL,
                PRIMARY KEY (model, revision)
            )""",
        ),
    ),
    Migration(
        5,
        "versions.feature_input: JSON of the version's FeatureInput, '' for none",
        ("ALTER TABLE versions ADD COLUMN feature_input TEXT NOT NULL DEFAULT ''",),
    ),
    Migration(
        6,
        "models.allow_self_approval: 1 when an uploader's own approval counts",
        ("ALTER TABLE models ADD COLUMN allow_self_approval BIGINT NOT NULL DEFAULT 0",),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version

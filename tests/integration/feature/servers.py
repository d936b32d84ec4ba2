"""Settings and key prefixes shared by the fixtures and the tests that start servers."""

from __future__ import annotations

import uuid
from pathlib import Path

from modelplane.services.feature.main import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"


def unique_prefix() -> str:
    return f"modelplane-test:feature:{uuid.uuid4().hex[:12]}:"


def settings_for(store_kind: str, data_dir: Path, prefix: str) -> Settings:
    """Sources may lie anywhere under data_dir's parent (each test's tmp_path)."""
    return Settings(
        source_roots=[str(data_dir.parent)],
        port=0,
        data_dir=data_dir,
        online_store="sqlite" if store_kind == "sqlite" else REDIS_URL,
        redis_key_prefix=prefix,
        tracing_enabled=False,
        log_json=False,
    )

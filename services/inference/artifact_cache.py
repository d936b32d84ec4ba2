"""The inference service's local copy of registry artifacts and of what it last served.

Blobs live under `blobs/<sha256>.onnx`, written to a temporary name, verified and
renamed, so a blob path holds complete bytes or nothing, and worker processes that
share the directory never see each other's half-written files. A blob is hashed again
before every load: a cached file whose bytes no longer match its digest (disk
corruption, tampering) is deleted and fetched again, never loaded.

`models/<name>.json` records the last state of each model that was served (aliases,
rollout policy, and each served version's digest and serving config), so a restart
while the registry is unreachable serves exactly what was served before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelplane.client.registry import file_sha256

log = logging.getLogger("modelplane.inference.cache")

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class CacheCorrupted(Exception):
    """Bytes that do not hash to the digest they were fetched for."""


class ArtifactCache:
    def __init__(self, root: Path, on_corrupted: Callable[[str], None] = lambda _: None) -> None:
        self.root = root
        self._blobs = root / "blobs"
        self._models = root / "models"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._models.mkdir(parents=True, exist_ok=True)
        self._on_corrupted = on_corrupted

    def blob_path(self, digest: str) -> Path:
        if not _DIGEST.match(digest):
            raise ValueError(f"{digest[:80]!r} is not a lowercase hex SHA-256")
        return self._blobs / f"{digest}.onnx"

    def verified(self, digest: str) -> Path | None:
        """The cached blob of `digest` after hashing it again; None when absent or when
        its bytes no longer match (the bad file is then removed)."""
        path = self.blob_path(digest)
        try:
            actual = file_sha256(path)
        except FileNotFoundError:
            return None
        if actual == digest:
            return path
        log.error(
            "cached artifact %s hashes to %s; removing it, it will be fetched again",
            digest,
            actual,
            extra={"sha256": digest},
        )
        self._on_corrupted(digest)
        path.unlink(missing_ok=True)
        return None

    def fetch(self, digest: str, download: Callable[[Path], None]) -> Path:
        """The verified blob of `digest`, calling `download(path)` to write it if it is
        not cached (or was corrupted). Raises CacheCorrupted when the downloaded bytes
        do not match `digest`: nothing is kept then."""
        found = self.verified(digest)
        if found is not None:
            return found
        final = self.blob_path(digest)
        partial = final.with_name(f".{digest}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            download(partial)
            actual = file_sha256(partial)
            if actual != digest:
                self._on_corrupted(digest)
                raise CacheCorrupted(
                    f"downloaded bytes hash to {actual}, the registered digest is {digest}"
                )
            os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)
        return final

    # --- last served state ---------------------------------------------------------

    def _state_path(self, model: str) -> Path:
        # Model names are letters, digits, '-', '_' and '.', but never trust a name
        # as a path: anything else is escaped.
        safe = re.sub(r"[^A-Za-z0-9_.-]", lambda m: f"%{ord(m.group()):02x}", model)
        return self._models / f"{safe.lstrip('.') or '_'}.json"

    def save_state(self, model: str, state: dict[str, Any]) -> None:
        path = self._state_path(model)
        partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
        partial.write_text(json.dumps({"model": model, **state}, sort_keys=True))
        os.replace(partial, path)

    def load_state(self, model: str) -> dict[str, Any] | None:
        try:
            state = json.loads(self._state_path(model).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("cached state of %s is unreadable (%s); ignoring it", model, exc)
            return None
        return state if isinstance(state, dict) and state.get("model") == model else None

    def forget_state(self, model: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._state_path(model).unlink()

    def cached_models(self) -> list[str]:
        names = []
        for path in sorted(self._models.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                name = json.loads(path.read_text()).get("model")
                if isinstance(name, str):
                    names.append(name)
        return names

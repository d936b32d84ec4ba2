"""Role denials in the registry's audit log.

An authenticated principal refused for lacking a role (PERMISSION_DENIED) is a fact an
auditor asks about: "who tried to move production without the right?". It is recorded
as an `auth.denied` audit event naming the principal, the method and the role it needs.

A token holder who retries in a loop must not be able to fill the audit log or queue
unbounded writes, so events are coalesced: at most one row per (principal, method)
every `window_s`; the row says how many refusals it stands for. Writes go to one
background thread (the store blocks; the hook is called on the event loop), and at
most one write per key is ever waiting, so the backlog is bounded by the number of
principals times methods.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from modelplane.services.registry.store import Store

log = logging.getLogger("modelplane.registry.denials")

DENIED_ACTION = "auth.denied"


class DenialAuditor:
    def __init__(
        self,
        store: Store,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        # (principal, method) -> (time of the last row, refusals since it)
        self._keys: dict[tuple[str, str], tuple[float, int]] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="denial-audit")

    def __call__(self, principal: str, method: str, role: str) -> None:
        key = (principal, method)
        now = self._clock()
        with self._lock:
            last, pending = self._keys.get(key, (float("-inf"), 0))
            if now - last < self._window_s:
                self._keys[key] = (last, pending + 1)
                return
            self._keys[key] = (now, 0)
        self._writer.submit(self._write, principal, method, role, pending + 1)

    def _write(self, principal: str, method: str, role: str, refusals: int) -> None:
        try:
            self._store.record_audit(
                principal, DENIED_ACTION, method, {"needed_role": role, "refusals": refusals}
            )
        except Exception:
            log.exception("recording a role denial of %s on %s failed", principal, method)

    def close(self) -> None:
        """Writes what is waiting; later refusals are not recorded."""
        self._writer.shutdown(wait=True)

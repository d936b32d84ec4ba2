"""Role denials reach the audit log coalesced: one row per principal and method per
window, counting the refusals it stands for."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelplane.services.registry.denials import DENIED_ACTION, DenialAuditor


class RecordingStore:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, dict[str, object]]] = []

    def record_audit(
        self, actor: str, action: str, target: str, details: Mapping[str, object]
    ) -> None:
        self.rows.append((actor, action, target, dict(details)))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_repeats_within_a_window_make_one_row_and_are_counted_in_the_next() -> None:
    store, clock = RecordingStore(), Clock()
    auditor = DenialAuditor(store, window_s=10.0, clock=clock)  # type: ignore[arg-type]
    for _ in range(5):
        auditor("mallory", "/svc/SetAlias", "approver")
    auditor("mallory", "/svc/DeleteAlias", "approver")
    auditor("eve", "/svc/SetAlias", "approver")
    clock.now = 11.0
    auditor("mallory", "/svc/SetAlias", "approver")
    auditor.close()
    rows: list[tuple[Any, ...]] = [(r[0], r[2], r[3]["refusals"]) for r in store.rows]
    assert sorted(rows) == sorted(
        [
            ("mallory", "/svc/SetAlias", 1),
            ("mallory", "/svc/DeleteAlias", 1),
            ("eve", "/svc/SetAlias", 1),
            # the four suppressed in the first window, and this one
            ("mallory", "/svc/SetAlias", 5),
        ]
    )
    assert {r[1] for r in store.rows} == {DENIED_ACTION}
    assert store.rows[0][3]["needed_role"] == "approver"


def test_a_failing_store_does_not_raise_into_the_call() -> None:
    class Broken:
        def record_audit(self, *args: object) -> None:
            raise RuntimeError("database is down")

    auditor = DenialAuditor(Broken())  # type: ignore[arg-type]
    auditor("mallory", "/svc/SetAlias", "approver")
    auditor.close()

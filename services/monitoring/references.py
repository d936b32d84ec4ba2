"""Each model version's reference distribution: the registry's `feature_statistics` of
the version when it has them, else the first rows the service saw of the version,
frozen once there are enough (`DriftPolicy.reference_rows`).

A stored reference never changes (the first writer wins in the store, so replicas agree).
The registry is asked once per version, with a deadline; while it is unreachable the
question is asked again after a pause, and rows are counted without reference edges
(their histograms are derived from the quantile sketch when reported).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from modelplane.kernel.errors import ModelplaneError
from modelplane.services.monitoring.drift import (
    FeatureStatisticsLike,
    Reference,
    reference_from_registry,
    reference_from_rows,
)
from modelplane.services.monitoring.statistics import WindowStats
from modelplane.services.monitoring.store import MonitoringStore

log = logging.getLogger("modelplane.monitoring.references")

# (model, version) → the version's registry statistics; [] when it has none; None when
# the registry does not know the version. Raises (e.g. Unavailable) when it cannot say.
RegistryLookup = Callable[[str, str], Sequence[FeatureStatisticsLike] | None]

RETRY_AFTER_S = 30.0


class References:
    """Thread-safe; `edges` is on the ingest path, so answers are cached in memory."""

    def __init__(
        self,
        store: MonitoringStore,
        registry: RegistryLookup | None,
        reference_rows: Callable[[str], int],
    ) -> None:
        self._store = store
        self._registry = registry
        self._reference_rows = reference_rows
        self._lock = threading.Lock()
        self._known: dict[tuple[str, str], Reference] = {}
        self._edges: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        # Versions whose reference will be their first rows, with those rows' statistics.
        self._first_rows: dict[tuple[str, str], WindowStats] = {}
        self._retry_at: dict[tuple[str, str], float] = {}

    def get(self, model: str, version: str) -> Reference | None:
        key = (model, version)
        with self._lock:
            known = self._known.get(key)
        if known is not None:
            return known
        stored = self._store.reference(model, version)
        if stored is None:
            return None
        return self._remember(key, Reference.from_bytes(stored))

    def edges(self, model: str, version: str) -> dict[str, np.ndarray]:
        """The bin edges to count a version's rows over; empty while unknown."""
        key = (model, version)
        with self._lock:
            edges = self._edges.get(key)
            if edges is not None or key in self._first_rows:
                return edges or {}
            if time.monotonic() < self._retry_at.get(key, 0.0):
                return {}
        reference = self.get(model, version) or self._from_registry(key)
        return self._edges.get(key, {}) if reference is not None else {}

    def waiting(self, model: str, version: str) -> bool:
        """Whether the version's reference will be its first rows and is not yet frozen."""
        with self._lock:
            return (model, version) in self._first_rows

    def observe(self, model: str, version: str, rows: WindowStats) -> None:
        """Counts rows of a version that waits for its first rows to become its
        reference; freezes the reference once there are enough."""
        key = (model, version)
        with self._lock:
            pending = self._first_rows.get(key)
            if pending is None:
                return
            pending.merge(rows)
            if pending.count < self._reference_rows(model):
                return
            del self._first_rows[key]
        reference = reference_from_rows(pending)
        stored = self._store.save_reference(model, version, reference.to_bytes())
        self._remember(key, Reference.from_bytes(stored))
        log.info(
            "froze the reference of %s v%s from its first %d rows", model, version, pending.count
        )

    def _from_registry(self, key: tuple[str, str]) -> Reference | None:
        if self._registry is None:
            self._wait_for_first_rows(key)
            return None
        try:
            statistics = self._registry(*key)
        except ModelplaneError as exc:
            log.warning(
                "registry cannot give the reference of %s v%s (%s); retrying in %.0fs",
                *key,
                exc.message,
                RETRY_AFTER_S,
            )
            with self._lock:
                self._retry_at[key] = time.monotonic() + RETRY_AFTER_S
            return None
        if not statistics:
            self._wait_for_first_rows(key)
            return None
        reference = reference_from_registry(statistics)
        stored = self._store.save_reference(*key, reference.to_bytes())
        return self._remember(key, Reference.from_bytes(stored))

    def _wait_for_first_rows(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._first_rows.setdefault(key, WindowStats())

    def _remember(self, key: tuple[str, str], reference: Reference) -> Reference:
        edges = {
            name: np.asarray(column.bin_edges, dtype=np.float64)
            for name, column in reference.columns.items()
            if not column.categorical
        }
        with self._lock:
            self._known[key] = reference
            self._edges[key] = edges
            self._first_rows.pop(key, None)
        return reference

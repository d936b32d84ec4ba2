"""Events in and out: an event's fields parsed into a model row or join keys, the poison
events and their dead-letter reasons, and what one micro-batch produced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from modelplane.feature.v1 import feature_pb2 as fpb
from modelplane.scoring.stream_monitoring import _Logged

# --- one consumer -------------------------------------------------------------------------


class Poison(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def parse_features(raw: bytes | None, width: int | None) -> np.ndarray:
    """One event's `features` field as a float32 row; Poison when it cannot be one."""
    if raw is None:
        raise Poison("bad_features", "the event has no 'features' field")
    try:
        row = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as exc:
        raise Poison("bad_json", f"'features' is not JSON: {str(exc)[:200]}") from None
    if not isinstance(row, list) or not row:
        raise Poison("bad_features", "'features' must be a non-empty JSON array of numbers")
    if width is not None and len(row) != width:
        raise Poison("wrong_width", f"'features' has {len(row)} values; the model takes {width}")
    try:
        values = np.array(row, dtype=np.float64)
    except (ValueError, TypeError):
        raise Poison("bad_features", "'features' must hold numbers only") from None
    if values.ndim != 1:
        raise Poison("bad_features", "'features' must be a flat array of numbers")
    values32 = values.astype(np.float32)
    if not np.isfinite(values32).all():
        raise Poison("bad_features", "'features' holds a null or a value out of float32 range")
    return values32


def parse_key(fields: dict[bytes, bytes], name: str, value_type: int) -> int | str:
    raw = fields.get(name.encode())
    if raw is None:
        raise Poison("missing_key", f"the event has no join key field {name!r}")
    try:
        text = raw.decode("utf-8")
        if value_type == fpb.VALUE_TYPE_INT64:
            return int(text)
    except (UnicodeDecodeError, ValueError):
        raise Poison("bad_key", f"join key {name!r} is not an integer") from None
    return text


def event_ms(event_id: str) -> int:
    return int(event_id.split("-", 1)[0])


def _fields_json(fields: dict[bytes, bytes]) -> str:
    return json.dumps(
        {
            k.decode("utf-8", "replace"): v.decode("utf-8", "replace")[:4096]
            for k, v in fields.items()
        }
    )


@dataclass
class Outcome:
    """What one micro-batch produced."""

    published: list[tuple[str, str]] = field(default_factory=list)  # (event id, outputs)
    dead: list[tuple[str, str, str, str]] = field(default_factory=list)
    pending: int = 0  # left unacknowledged, to be delivered again
    logged: list[_Logged] = field(default_factory=list)  # for monitoring, once published


Entry = tuple[str, dict[bytes, bytes]]
